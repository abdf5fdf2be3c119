//! `[schedule] timezone` and `window`: the hours of the week a campaign may send in, and the
//! calendar days its daily caps (`[rate] per_day`, `warmup`) count in.
//!
//! Pure: every question takes the time to ask about as a parameter. Times of day are local to
//! the campaign's IANA time zone (chrono-tz's bundled database, so no machine's zoneinfo
//! matters). Across a daylight-saving change, a local time that happens twice means its first
//! occurrence, and one that does not happen (in the hour the clocks skip) means the moment the
//! clocks change: a window `02:30-05:00` on the spring-forward night opens at 03:00.

use std::fmt;
use std::str::FromStr;

use chrono::{
    DateTime, Datelike as _, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta,
    TimeZone as _, Timelike as _, Utc, Weekday,
};
use chrono_tz::Tz;

/// One send window: some days of the week, from a local time to another. A window whose end is
/// at or before its start (`Fri 22:00-02:00`) crosses midnight and belongs to the day it
/// starts on (Friday 22:00 to Saturday 02:00).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    source: String,
    /// Monday first.
    days: [bool; 7],
    /// Minutes from local midnight.
    start: u32,
    /// Minutes from local midnight, 1 to 1440 (`24:00`); at or before `start`: the next day.
    end: u32,
}

/// Why a text is not a window; reads after "`window` `…` ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("is not like `Mon-Fri 09:00-17:00` (days, a space, then the hours)")]
    Shape,
    #[error("has `{0}`, which is not a day such as `Mon` or a range such as `Mon-Fri`")]
    Day(String),
    #[error("has `{0}`, which is not hours such as `09:00-17:00`")]
    Hours(String),
    #[error("starts and ends at the same time; for the whole day write `00:00-24:00`")]
    Empty,
}

fn minutes(text: &str, end: bool) -> Option<u32> {
    if end && text == "24:00" {
        return Some(1440);
    }
    let time = NaiveTime::parse_from_str(text, "%H:%M").ok()?;
    Some(time.num_seconds_from_midnight() / 60)
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(text: &str) -> Result<Window, WindowError> {
        let source = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let parts: Vec<&str> = source.split(' ').collect();
        let (days_text, hours) = match parts.as_slice() {
            [hours] if !hours.is_empty() => (None, *hours),
            [days, hours] => (Some(*days), *hours),
            _ => return Err(WindowError::Shape),
        };
        let mut days = [days_text.is_none(); 7];
        for item in days_text.into_iter().flat_map(|d| d.split(',')) {
            let day = |name: &str| {
                name.parse::<Weekday>()
                    .map_err(|_| WindowError::Day(item.to_owned()))
            };
            match item.split_once('-') {
                Some((from, to)) => {
                    let (from, to) = (day(from)?, day(to)?);
                    let mut d = from;
                    loop {
                        days[d.num_days_from_monday() as usize] = true;
                        if d == to {
                            break;
                        }
                        d = d.succ();
                    }
                }
                None => days[day(item)?.num_days_from_monday() as usize] = true,
            }
        }
        let bad_hours = || WindowError::Hours(hours.to_owned());
        let (start, end) = hours.split_once('-').ok_or_else(bad_hours)?;
        let start = minutes(start, false).ok_or_else(bad_hours)?;
        let end = minutes(end, true).ok_or_else(bad_hours)?;
        if start == end {
            return Err(WindowError::Empty);
        }
        Ok(Window {
            source,
            days,
            start,
            end,
        })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Where a moment stands with the send windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// No windows: any time.
    Always,
    /// In a window, which closes then (or the end of what was looked at, a week ahead).
    Until(DateTime<Utc>),
    /// Outside every window; the next one opens then (`None`: never, which parsing rules out).
    Closed(Option<DateTime<Utc>>),
}

/// The campaign's calendar: its time zone and send windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calendar {
    pub timezone: Tz,
    /// None: any time.
    pub windows: Vec<Window>,
}

/// `local` in `tz` as an instant: the first of two, or the moment the clocks change when it
/// falls in skipped time.
fn resolve(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.to_utc(),
        LocalResult::None => {
            let mut probe = local;
            for _ in 0..(48 * 60) {
                probe += TimeDelta::minutes(1);
                if let Some(t) = tz.from_local_datetime(&probe).earliest() {
                    return t.to_utc();
                }
            }
            // No zone skips two days; as a fallback read the time as UTC.
            local.and_utc()
        }
    }
}

impl Calendar {
    /// The local calendar day of `t`.
    #[must_use]
    pub fn day(&self, t: DateTime<Utc>) -> NaiveDate {
        t.with_timezone(&self.timezone).date_naive()
    }

    /// When local day `date` starts (its midnight, or the first moment after it).
    #[must_use]
    pub fn day_start(&self, date: NaiveDate) -> DateTime<Utc> {
        resolve(self.timezone, date.and_time(NaiveTime::MIN))
    }

    /// The local day of `t` as an interval of instants: 24 hours, or 23 or 25 on the days the
    /// clocks change.
    #[must_use]
    pub fn day_bounds(&self, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let date = self.day(t);
        let next = date.succ_opt().unwrap_or(date);
        (self.day_start(date), self.day_start(next))
    }

    /// Whole local days from `first`'s day to `t`'s: 0 on the same day.
    #[must_use]
    pub fn days_since(&self, first: DateTime<Utc>, t: DateTime<Utc>) -> u32 {
        let days = (self.day(t) - self.day(first)).num_days();
        u32::try_from(days.max(0)).unwrap_or(u32::MAX)
    }

    /// The windows' open intervals from the day before `t` to eight days after, merged where
    /// they touch or overlap.
    fn intervals(&self, t: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let today = self.day(t);
        let mut spans = Vec::new();
        for offset in -1..=8 {
            let Some(date) = today.checked_add_signed(TimeDelta::days(offset)) else {
                continue;
            };
            let weekday = date.weekday().num_days_from_monday() as usize;
            for window in &self.windows {
                if !window.days[weekday] {
                    continue;
                }
                let at = |minutes: u32| {
                    let day = date + TimeDelta::days(i64::from(minutes / 1440));
                    let time =
                        NaiveTime::from_num_seconds_from_midnight_opt((minutes % 1440) * 60, 0)
                            .unwrap_or(NaiveTime::MIN);
                    resolve(self.timezone, day.and_time(time))
                };
                let end = if window.end <= window.start {
                    window.end + 1440
                } else {
                    window.end
                };
                let (from, to) = (at(window.start), at(end));
                if from < to {
                    spans.push((from, to));
                }
            }
        }
        spans.sort();
        let mut merged: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
        for (from, to) in spans {
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        merged
    }

    /// Whether `t` is in a send window, and until when; or when the next one opens.
    #[must_use]
    pub fn open(&self, t: DateTime<Utc>) -> Open {
        if self.windows.is_empty() {
            return Open::Always;
        }
        let spans = self.intervals(t);
        if let Some((_, to)) = spans.iter().find(|(from, to)| *from <= t && t < *to) {
            return Open::Until(*to);
        }
        Open::Closed(spans.iter().map(|(from, _)| *from).find(|from| *from > t))
    }

    /// The first moment at or after `t` in a send window.
    #[must_use]
    pub fn next_open(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.open(t) {
            Open::Always | Open::Until(_) => Some(t),
            Open::Closed(next) => next,
        }
    }

    /// `t` as people in the campaign's time zone read it: `Thu 2026-12-10 14:05 Europe/Paris`.
    #[must_use]
    pub fn show(&self, t: DateTime<Utc>) -> String {
        format!(
            "{} {}",
            t.with_timezone(&self.timezone).format("%a %Y-%m-%d %H:%M"),
            self.timezone.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn calendar(zone: &str, windows: &[&str]) -> Calendar {
        Calendar {
            timezone: zone.parse().unwrap(),
            windows: windows.iter().map(|w| w.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn windows_parse_days_lists_ranges_and_hours() {
        let w: Window = "Mon-Fri 09:00-17:00".parse().unwrap();
        assert_eq!(w.days, [true, true, true, true, true, false, false]);
        assert_eq!((w.start, w.end), (540, 1020));
        let w: Window = "sat,Mon  10:00-14:30".parse().unwrap();
        assert_eq!(w.days, [true, false, false, false, false, true, false]);
        assert_eq!(w.to_string(), "sat,Mon 10:00-14:30");
        let w: Window = "Fri-Mon 22:00-02:00".parse().unwrap();
        assert_eq!(w.days, [true, false, false, false, true, true, true]);
        let w: Window = "00:00-24:00".parse().unwrap();
        assert_eq!(w.days, [true; 7]);
        for (text, error) in [
            ("", WindowError::Shape),
            ("Mon Tue 09:00-10:00", WindowError::Shape),
            ("Mon-Fry 09:00-17:00", WindowError::Day("Mon-Fry".into())),
            ("Mon 9-17", WindowError::Hours("9-17".into())),
            ("Mon 09:00-25:00", WindowError::Hours("09:00-25:00".into())),
            ("Mon 09:00-09:00", WindowError::Empty),
        ] {
            assert_eq!(text.parse::<Window>(), Err(error), "{text}");
        }
    }

    #[test]
    fn window_edges_open_at_the_start_and_close_at_the_end() {
        // 2026-12-07 is a Monday; Paris is UTC+1 in December.
        let cal = calendar("Europe/Paris", &["Mon-Fri 09:00-17:00"]);
        assert_eq!(
            cal.open(utc("2026-12-07T07:59:59Z")),
            Open::Closed(Some(utc("2026-12-07T08:00:00Z")))
        );
        assert_eq!(
            cal.open(utc("2026-12-07T08:00:00Z")),
            Open::Until(utc("2026-12-07T16:00:00Z"))
        );
        assert_eq!(
            cal.open(utc("2026-12-07T15:59:59Z")),
            Open::Until(utc("2026-12-07T16:00:00Z"))
        );
        // Friday 17:00 closes until Monday 09:00.
        assert_eq!(
            cal.open(utc("2026-12-11T16:00:00Z")),
            Open::Closed(Some(utc("2026-12-14T08:00:00Z")))
        );
        assert_eq!(
            cal.next_open(utc("2026-12-12T12:00:00Z")),
            Some(utc("2026-12-14T08:00:00Z"))
        );
        assert_eq!(
            calendar("UTC", &[]).open(utc("2026-12-12T12:00:00Z")),
            Open::Always
        );
    }

    #[test]
    fn windows_crossing_midnight_and_touching_windows_merge() {
        let cal = calendar("UTC", &["Fri 22:00-02:00"]);
        // Saturday 01:00 is in Friday's window.
        assert_eq!(
            cal.open(utc("2026-12-12T01:00:00Z")),
            Open::Until(utc("2026-12-12T02:00:00Z"))
        );
        assert_eq!(
            cal.open(utc("2026-12-12T02:00:00Z")),
            Open::Closed(Some(utc("2026-12-18T22:00:00Z")))
        );
        let cal = calendar("UTC", &["Mon 00:00-24:00", "Tue 00:00-12:00"]);
        assert_eq!(
            cal.open(utc("2026-12-07T23:00:00Z")),
            Open::Until(utc("2026-12-08T12:00:00Z"))
        );
    }

    #[test]
    fn daylight_saving_changes_move_windows_and_days() {
        // Paris springs forward on 2027-03-28 (02:00 → 03:00) and falls back on 2026-10-25.
        let cal = calendar("Europe/Paris", &["Sun 02:30-05:00", "Mon 09:00-17:00"]);
        assert_eq!(
            cal.open(utc("2027-03-28T00:00:00Z")),
            // 02:30 does not happen: the window opens when the clocks change, 03:00 (01:00 UTC).
            Open::Closed(Some(utc("2027-03-28T01:00:00Z")))
        );
        assert_eq!(
            cal.open(utc("2027-03-28T01:00:00Z")),
            Open::Until(utc("2027-03-28T03:00:00Z"))
        );
        // Monday 09:00 is 08:00 UTC before the change and 07:00 after it.
        assert_eq!(
            cal.next_open(utc("2027-03-28T04:00:00Z")),
            Some(utc("2027-03-29T07:00:00Z"))
        );
        let (start, end) = cal.day_bounds(utc("2027-03-28T12:00:00Z"));
        assert_eq!(
            (start, end),
            (utc("2027-03-27T23:00:00Z"), utc("2027-03-28T22:00:00Z"))
        );
        assert_eq!(end - start, TimeDelta::hours(23));
        let (start, end) = cal.day_bounds(utc("2026-10-25T12:00:00Z"));
        assert_eq!(end - start, TimeDelta::hours(25));
        // 02:30 happens twice on 2026-10-25: the first one (00:30 UTC) counts, and 03:30
        // (after the clocks went back at 03:00) is 02:30 UTC: two hours of window that night.
        let cal = calendar("Europe/Paris", &["Sun 02:30-03:30"]);
        assert_eq!(
            cal.open(utc("2026-10-25T00:29:59Z")),
            Open::Closed(Some(utc("2026-10-25T00:30:00Z")))
        );
        assert_eq!(
            cal.open(utc("2026-10-25T00:30:00Z")),
            Open::Until(utc("2026-10-25T02:30:00Z"))
        );
    }

    #[test]
    fn days_are_counted_in_the_campaigns_time_zone() {
        let cal = calendar("America/New_York", &[]);
        // 03:00 UTC on the 8th is still the 7th in New York.
        assert_eq!(
            cal.days_since(utc("2026-12-07T15:00:00Z"), utc("2026-12-08T03:00:00Z")),
            0
        );
        assert_eq!(
            cal.days_since(utc("2026-12-07T15:00:00Z"), utc("2026-12-08T05:00:00Z")),
            1
        );
        assert_eq!(
            cal.days_since(utc("2026-12-07T15:00:00Z"), utc("2026-12-01T05:00:00Z")),
            0
        );
        assert_eq!(
            cal.show(utc("2026-12-08T05:00:00Z")),
            "Tue 2026-12-08 00:00 America/New_York"
        );
    }
}
