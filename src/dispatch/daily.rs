//! Daily: send windows and daily caps, as a run keeps to them.
//!
//! Pure: the scheduler asks with the calendar's time (the run's start on the calendar clock,
//! plus the run's own monotonic time since), so tests drive it with any clock. A message is
//! counted when it is handed to a worker — reserved before it goes, so that however many
//! connections are on the wire, no day gets more than its cap — and given back only when the
//! relay failed before taking it (it is `pending` again). Retries count like any message.
//!
//! When the window closes or the day's cap is reached, the run starts no new message
//! ([`Check::Stop`], exit 75 with when sending may go on). A domain's own cap sets its messages
//! aside until the next day ([`Check::Capped`]); the other domains go on.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::config::{Calendar, DailyCaps, Open};

/// Messages handed to the relay in one day: all of them, and per domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempted {
    pub total: u32,
    pub domains: HashMap<String, u32>,
}

/// Why a campaign waits, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// One sentence, ending with when sending may go on: "daily cap of 5,000 reached; next
    /// message after Tue 2026-12-08 09:00 Europe/Paris".
    pub reason: String,
    /// When a message may go again (`None`: never, by the windows as written).
    pub until: Option<DateTime<Utc>>,
}

/// What may happen to the next message of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Go,
    /// The domain's daily cap is reached: its messages wait until `until` (the next day).
    Capped {
        until: DateTime<Utc>,
        reason: String,
    },
    /// The window is closed or the day's cap reached: no new message in this run.
    Stop(Waiting),
}

/// `1234567` as `1,234,567`.
#[must_use]
pub fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A run's windows and caps, with what the current day has used.
#[derive(Debug, Clone)]
pub struct Daily {
    calendar: Calendar,
    caps: DailyCaps,
    /// Day 0 of the warm-up: the campaign's first attempt (or this run's first message).
    first: Option<DateTime<Utc>>,
    /// The current day, as instants.
    day: (DateTime<Utc>, DateTime<Utc>),
    used: Attempted,
    /// The calendar's time when the run started.
    start: DateTime<Utc>,
    /// An open window known to hold from the first to the second (spares working the
    /// windows out for every message).
    open: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Daily {
    /// At `now` (the calendar's), with what the journal counts on `now`'s day already and the
    /// campaign's first attempt.
    #[must_use]
    pub fn new(
        calendar: Calendar,
        caps: DailyCaps,
        now: DateTime<Utc>,
        first: Option<DateTime<Utc>>,
        used: Attempted,
    ) -> Daily {
        let day = calendar.day_bounds(now);
        Daily {
            calendar,
            caps,
            first,
            day,
            used,
            start: now,
            open: None,
        }
    }

    /// Starts the run's clock again at `now` (the calendar's), after a long validation.
    pub fn restart(&mut self, now: DateTime<Utc>) {
        self.roll(now);
        self.start = now;
    }

    /// The calendar's time the run started at.
    #[must_use]
    pub fn start(&self) -> DateTime<Utc> {
        self.start
    }

    /// Whether there is anything to keep to.
    #[must_use]
    pub fn any(&self) -> bool {
        self.caps.any() || !self.calendar.windows.is_empty()
    }

    #[must_use]
    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// The cap of every domain together on the current day, and the warm-up day it is (when
    /// the warm-up sets it).
    fn global_cap(&self) -> (Option<u32>, Option<u32>) {
        let day = self
            .first
            .map_or(0, |first| self.calendar.days_since(first, self.day.0));
        let cap = self.caps.global(day);
        let warm = usize::try_from(day)
            .ok()
            .and_then(|d| self.caps.warmup.get(d))
            .filter(|w| cap == Some(w.get()))
            .map(|_| day);
        (cap, warm)
    }

    /// Moves on to `now`'s day when the current one is over: nothing used yet.
    fn roll(&mut self, now: DateTime<Utc>) {
        if now >= self.day.1 || now < self.day.0 {
            self.day = self.calendar.day_bounds(now);
            self.used = Attempted::default();
        }
    }

    /// The first moment in a window from the next day on: when a capped day's sending may
    /// go on.
    fn after_today(&self) -> Option<DateTime<Utc>> {
        self.calendar.next_open(self.day.1)
    }

    fn when(&self, at: Option<DateTime<Utc>>) -> String {
        at.map_or_else(
            || "never, by `[schedule] window`".to_owned(),
            |t| self.calendar.show(t),
        )
    }

    /// Whether any message may start at `now`: the window is open and the day's cap is not
    /// reached.
    pub fn blocked(&mut self, now: DateTime<Utc>) -> Option<Waiting> {
        self.roll(now);
        let known = self
            .open
            .is_some_and(|(from, until)| from <= now && now < until);
        match if known {
            Open::Always
        } else {
            self.calendar.open(now)
        } {
            Open::Always => {}
            Open::Until(until) => self.open = Some((now, until)),
            Open::Closed(next) => {
                return Some(Waiting {
                    reason: format!(
                        "outside the send window ([schedule] window); the next opens {}",
                        self.when(next)
                    ),
                    until: next,
                });
            }
        }
        let (cap, warm) = self.global_cap();
        if let Some(cap) = cap
            && self.used.total >= cap
        {
            let until = self.after_today();
            let what = match warm {
                Some(day) => format!("warm-up day {} cap of {}", day + 1, thousands(cap)),
                None => format!("daily cap of {}", thousands(cap)),
            };
            return Some(Waiting {
                reason: format!("{what} reached; next message after {}", self.when(until)),
                until,
            });
        }
        None
    }

    /// The domains whose own cap the current day has reached, each with until when.
    #[must_use]
    pub fn capped(&self) -> Vec<String> {
        let mut capped: Vec<String> = self
            .used
            .domains
            .iter()
            .filter_map(|(domain, used)| {
                let cap = self.caps.domain(domain)?;
                (*used >= cap).then(|| {
                    format!(
                        "{domain} daily cap of {} reached; its next message after {}",
                        thousands(cap),
                        self.when(self.after_today())
                    )
                })
            })
            .collect();
        capped.sort();
        capped
    }

    /// What may happen to a message of `domain` (lower-case, IDNA-encoded) at `now`.
    pub fn check(&mut self, now: DateTime<Utc>, domain: &str) -> Check {
        if let Some(waiting) = self.blocked(now) {
            return Check::Stop(waiting);
        }
        if let Some(cap) = self.caps.domain(domain)
            && self.used.domains.get(domain).copied().unwrap_or(0) >= cap
        {
            let until = self.day.1;
            let next = self.after_today();
            return Check::Capped {
                until,
                reason: format!(
                    "{domain} daily cap of {} reached ([rate.per_domain_per_day]); its next message after {}",
                    thousands(cap),
                    self.when(next)
                ),
            };
        }
        Check::Go
    }

    /// Counts a message of `domain` handed out at `now` (after a [`Check::Go`]).
    pub fn take(&mut self, now: DateTime<Utc>, domain: &str) {
        self.roll(now);
        self.first.get_or_insert(now);
        self.used.total += 1;
        if self.caps.domain(domain).is_some() {
            *self.used.domains.entry(domain.to_owned()).or_default() += 1;
        }
    }

    /// Gives back a message the relay did not take (it failed before the body), taken at
    /// `taken_at`: a place taken on an earlier day is not given to this one.
    pub fn give_back(&mut self, domain: &str, taken_at: DateTime<Utc>) {
        if taken_at < self.day.0 || taken_at >= self.day.1 {
            return;
        }
        self.used.total = self.used.total.saturating_sub(1);
        if let Some(used) = self.used.domains.get_mut(domain) {
            *used = used.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }

    fn paris(windows: &[&str]) -> Calendar {
        Calendar {
            timezone: chrono_tz::Tz::Europe__Paris,
            windows: windows.iter().map(|w| w.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(thousands(5), "5");
        assert_eq!(thousands(5000), "5,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn the_daily_cap_counts_what_the_journal_had_and_resets_the_next_day() {
        let caps = DailyCaps {
            per_day: Some(n(3)),
            ..DailyCaps::default()
        };
        let used = Attempted {
            total: 2,
            domains: HashMap::new(),
        };
        let now = utc("2026-12-07T10:00:00Z");
        let mut daily = Daily::new(paris(&["Mon-Fri 09:00-17:00"]), caps, now, Some(now), used);
        assert_eq!(daily.check(now, "a.example"), Check::Go);
        daily.take(now, "a.example");
        let Check::Stop(waiting) = daily.check(now, "b.example") else {
            panic!("the cap is reached");
        };
        assert_eq!(
            waiting.reason,
            "daily cap of 3 reached; next message after Tue 2026-12-08 09:00 Europe/Paris"
        );
        assert_eq!(waiting.until, Some(utc("2026-12-08T08:00:00Z")));
        // A message given back (the relay failed before it) frees its place.
        daily.give_back("a.example", now);
        assert_eq!(daily.check(now, "b.example"), Check::Go);
        daily.take(now, "b.example");
        // Midnight in Paris: a new day, nothing used — but the window is closed until 09:00.
        let midnight = utc("2026-12-07T23:00:00Z");
        let Check::Stop(closed) = daily.check(midnight, "a.example") else {
            panic!("outside the window");
        };
        assert!(
            closed.reason.starts_with("outside the send window"),
            "{}",
            closed.reason
        );
        let morning = utc("2026-12-08T08:00:00Z");
        assert_eq!(daily.check(morning, "a.example"), Check::Go);
        // A place taken yesterday and given back today does not free one of today's.
        let mut today = Daily::new(
            paris(&["Mon-Fri 09:00-17:00"]),
            DailyCaps {
                per_day: Some(n(1)),
                ..DailyCaps::default()
            },
            morning,
            Some(now),
            Attempted::default(),
        );
        assert_eq!(today.check(morning, "a.example"), Check::Go);
        today.take(morning, "a.example");
        today.give_back("a.example", now);
        assert!(
            matches!(today.check(morning, "b.example"), Check::Stop(_)),
            "yesterday's place is not today's"
        );
        today.give_back("a.example", morning);
        assert_eq!(today.check(morning, "b.example"), Check::Go);
    }

    #[test]
    fn a_domain_cap_sets_only_that_domain_aside_until_the_next_day() {
        let caps = DailyCaps {
            domains: [("gmail.com".to_owned(), n(1))].into(),
            ..DailyCaps::default()
        };
        let now = utc("2026-12-07T22:30:00Z");
        let mut daily = Daily::new(paris(&[]), caps, now, None, Attempted::default());
        daily.take(now, "gmail.com");
        assert_eq!(
            daily.check(now, "gmail.com"),
            Check::Capped {
                until: utc("2026-12-07T23:00:00Z"),
                reason: "gmail.com daily cap of 1 reached ([rate.per_domain_per_day]); its next message after Tue 2026-12-08 00:00 Europe/Paris".to_owned()
            }
        );
        assert_eq!(daily.check(now, "other.example"), Check::Go);
        assert_eq!(
            daily.check(utc("2026-12-07T23:00:00Z"), "gmail.com"),
            Check::Go
        );
    }

    #[test]
    fn warm_up_days_count_from_the_first_attempt_in_the_campaigns_time_zone() {
        let caps = DailyCaps {
            per_day: Some(n(100)),
            warmup: vec![n(2), n(4)],
            ..DailyCaps::default()
        };
        // The first attempt at 23:30 Paris time on Monday: Monday is day 1 of the warm-up,
        // and Tuesday 00:30 Paris time (23:30 UTC Monday) is day 2 already.
        let first = utc("2026-12-07T22:30:00Z");
        let used = Attempted {
            total: 2,
            domains: HashMap::new(),
        };
        let mut daily = Daily::new(paris(&[]), caps.clone(), first, Some(first), used.clone());
        let Check::Stop(waiting) = daily.check(first, "a.example") else {
            panic!("day 1's cap is reached");
        };
        assert!(
            waiting.reason.starts_with(
                "warm-up day 1 cap of 2 reached; next message after Tue 2026-12-08 00:00"
            ),
            "{}",
            waiting.reason
        );
        let tuesday = utc("2026-12-07T23:30:00Z");
        let mut daily = Daily::new(paris(&[]), caps.clone(), tuesday, Some(first), used);
        assert_eq!(daily.check(tuesday, "a.example"), Check::Go);
        let four = Attempted {
            total: 4,
            domains: HashMap::new(),
        };
        let mut daily = Daily::new(paris(&[]), caps.clone(), tuesday, Some(first), four.clone());
        assert!(
            matches!(daily.check(tuesday, "a.example"), Check::Stop(w) if w.reason.starts_with("warm-up day 2 cap of 4"))
        );
        // Day 3: past the warm-up, per_day.
        let wednesday = utc("2026-12-09T10:00:00Z");
        let mut daily = Daily::new(paris(&[]), caps, wednesday, Some(first), four);
        assert_eq!(daily.check(wednesday, "a.example"), Check::Go);
    }

    #[test]
    fn on_the_day_the_clocks_go_forward_the_cap_resets_after_23_hours() {
        let caps = DailyCaps {
            per_day: Some(n(1)),
            ..DailyCaps::default()
        };
        // Paris, 2027-03-28: midnight is 23:00 UTC the day before, the next midnight 22:00 UTC.
        let morning = utc("2027-03-27T23:30:00Z");
        let mut daily = Daily::new(paris(&[]), caps, morning, None, Attempted::default());
        daily.take(morning, "a.example");
        let Check::Stop(waiting) = daily.check(utc("2027-03-28T21:59:59Z"), "a.example") else {
            panic!("the day's cap is spent");
        };
        assert_eq!(waiting.until, Some(utc("2027-03-28T22:00:00Z")));
        assert!(
            waiting
                .reason
                .ends_with("next message after Mon 2027-03-29 00:00 Europe/Paris"),
            "{}",
            waiting.reason
        );
        assert_eq!(
            daily.check(utc("2027-03-28T22:00:00Z"), "a.example"),
            Check::Go
        );
    }

    #[test]
    fn a_window_closing_stops_new_messages_and_names_the_next_opening() {
        let mut daily = Daily::new(
            paris(&["Mon-Fri 09:00-17:00"]),
            DailyCaps::default(),
            utc("2026-12-11T15:59:59Z"),
            None,
            Attempted::default(),
        );
        assert_eq!(
            daily.check(utc("2026-12-11T15:59:59Z"), "a.example"),
            Check::Go
        );
        assert_eq!(
            daily.check(utc("2026-12-11T16:00:00Z"), "a.example"),
            Check::Stop(Waiting {
                reason: "outside the send window ([schedule] window); the next opens Mon 2026-12-14 09:00 Europe/Paris".to_owned(),
                until: Some(utc("2026-12-14T08:00:00Z")),
            })
        );
    }
}
