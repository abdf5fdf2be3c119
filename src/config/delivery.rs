//! `[rate]` and `[retry]`: how fast to send, what to do when a server says "later", and what
//! to do with a message whose fate is unknown.
//!
//! Pure: validated values only. The limiters themselves live in `dispatch::pace`.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use toml::Spanned;

use super::Validator;
use super::raw::{RawRate, RawRetry};

/// A pace: `count` messages every `per`, and up to `burst` at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub count: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

impl Pace {
    /// A pace with the default burst: 50 ms worth of messages, at least one. A burst of one
    /// would make every late timer wake-up a permanent loss of rate; 50 ms of slack absorbs
    /// them and still keeps a 1-second window within rate + burst.
    #[must_use]
    pub fn new(count: NonZeroU32, per: Duration, burst: Option<NonZeroU32>) -> Pace {
        let burst = burst.unwrap_or_else(|| {
            let fifty_ms = f64::from(count.get()) * 0.05 / per.as_secs_f64();
            // Saturating float-to-int cast: a huge rate only makes a large burst.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let burst = fifty_ms.ceil() as u32;
            NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN)
        });
        Pace { count, per, burst }
    }

    /// The time between two messages at this pace.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.per / self.count.get()
    }

    #[must_use]
    pub fn per_second(&self) -> f64 {
        f64::from(self.count.get()) / self.per.as_secs_f64()
    }
}

/// Piecemeal sending: after `size` messages, wait `pause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub size: NonZeroUsize,
    pub pause: Duration,
}

/// `[rate]`. Every limit is optional: without any, mailer sends as fast as the relay takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rate {
    pub global: Option<Pace>,
    /// For recipient domains not named in `domains`.
    pub domain_default: Option<Pace>,
    /// Keys are lower-case and IDNA-encoded, as recipients' domains are.
    pub domains: BTreeMap<String, Pace>,
    pub batch: Option<Batch>,
    /// `throttle_floor`: a domain that keeps throttling is slowed down (halved) until the next
    /// halving would go below this pace; then it is suspended (`[retry] suspension`). `None`:
    /// [`DEFAULT_THROTTLE_FLOOR`].
    pub throttle_floor: Option<Pace>,
    /// `per_day`, `warmup` and `per_domain_per_day`: messages a calendar day.
    pub daily: DailyCaps,
}

/// Daily caps: how many messages may be handed to the relay in one calendar day (in
/// `[schedule] timezone`), counting every attempt (retries too) of every run and slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DailyCaps {
    /// Every domain together, once the warm-up is over (and during it, as a ceiling).
    pub per_day: Option<NonZeroU32>,
    /// The caps of the first days, day 0 being the day of the campaign's first attempt.
    pub warmup: Vec<NonZeroU32>,
    /// For each domain not named in `domains`.
    pub domain_default: Option<NonZeroU32>,
    /// Keys are lower-case and IDNA-encoded, as recipients' domains are.
    pub domains: BTreeMap<String, NonZeroU32>,
}

impl DailyCaps {
    /// Whether any cap is set.
    #[must_use]
    pub fn any(&self) -> bool {
        self.per_day.is_some()
            || !self.warmup.is_empty()
            || self.domain_default.is_some()
            || !self.domains.is_empty()
    }

    /// The cap of every domain together on `day` (0: the day of the first attempt): the
    /// warm-up's for its days (no more than `per_day`), then `per_day`; `None`: no cap.
    #[must_use]
    pub fn global(&self, day: u32) -> Option<u32> {
        let warm = usize::try_from(day)
            .ok()
            .and_then(|d| self.warmup.get(d))
            .map(|c| c.get());
        match (warm, self.per_day.map(NonZeroU32::get)) {
            (Some(warm), Some(cap)) => Some(warm.min(cap)),
            (warm, cap) => warm.or(cap),
        }
    }

    /// `domain`'s own cap (lower-case, IDNA-encoded), if any.
    #[must_use]
    pub fn domain(&self, domain: &str) -> Option<u32> {
        self.domains
            .get(domain)
            .or(self.domain_default.as_ref())
            .map(|c| c.get())
    }
}

/// The default `[rate] throttle_floor`: six messages a minute (one every ten seconds).
pub const DEFAULT_THROTTLE_FLOOR: f64 = 0.1;

impl Rate {
    /// The throttle floor in messages per second.
    #[must_use]
    pub fn throttle_floor_per_second(&self) -> f64 {
        self.throttle_floor
            .as_ref()
            .map_or(DEFAULT_THROTTLE_FLOOR, Pace::per_second)
    }
}

/// `[retry] on_ambiguous`: what to do with a recipient whose outcome is unknown — a message in
/// flight when a connection broke or the process died, which the server may or may not have
/// accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnAmbiguous {
    /// Record it as `ambiguous` and report it; never send it again (no duplicate, maybe no
    /// message).
    #[default]
    Report,
    /// Send it again on the next run (maybe a duplicate, never a missing message).
    Retry,
}

/// The default `[retry] suspension`: 30 minutes — between Postfix's deferred-queue back-off
/// (300 s, doubling up to 4000 s) and the hour large senders suspend a provider for after it
/// complains about the rate.
pub const DEFAULT_SUSPENSION: Duration = Duration::from_secs(30 * 60);

/// `[retry]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts per recipient in one run when the server answers 4xx; after them the
    /// recipient stays `deferred` (a 4xx alone never makes it `failed`).
    pub max_attempts: NonZeroU32,
    /// The wait after the first 4xx; it doubles with each attempt, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long a run that has nothing else left waits for deferred recipients falling due.
    pub linger: Duration,
    /// Relay-wide failures in a row (refused connection, TLS, AUTH, 421 greeting) before the
    /// run gives up with exit 69.
    pub relay_attempts: NonZeroU32,
    /// The pause after the first relay failure; it doubles, up to `max_backoff`.
    pub relay_backoff: Duration,
    /// How long a domain that keeps throttling below `[rate] throttle_floor` is suspended: its
    /// messages are left `deferred` until then, for a later run.
    pub suspension: Duration,
    /// Recipients whose outcome is unknown: reported (the default) or sent again.
    pub on_ambiguous: OnAmbiguous,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            max_attempts: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(600),
            linger: Duration::from_secs(60),
            relay_attempts: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            relay_backoff: Duration::from_secs(2),
            suspension: DEFAULT_SUSPENSION,
            on_ambiguous: OnAmbiguous::Report,
        }
    }
}

impl Retry {
    /// The wait before attempt `attempt + 1` after `attempt` failures (1-based), before
    /// jitter: `first × 2^(attempt − 1)`, capped by `max_backoff`.
    #[must_use]
    pub fn backoff_after(&self, first: Duration, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        first
            .saturating_mul(1 << doublings)
            .min(self.max_backoff.max(first))
    }
}

/// `"20/s"`, `"600/min"`, `"5000/h"`, or a whole number of messages per second.
fn parse_pace(value: &toml::Value) -> Option<(NonZeroU32, Duration)> {
    let (count, per) = match value {
        toml::Value::Integer(n) => (*n, Duration::from_secs(1)),
        toml::Value::String(text) => {
            let (count, unit) = text.split_once('/')?;
            let per = match unit.trim() {
                "s" | "sec" | "second" => Duration::from_secs(1),
                "m" | "min" | "minute" => Duration::from_secs(60),
                "h" | "hour" => Duration::from_secs(3600),
                _ => return None,
            };
            (count.trim().parse().ok()?, per)
        }
        _ => return None,
    };
    Some((NonZeroU32::new(u32::try_from(count).ok()?)?, per))
}

impl Validator<'_> {
    fn count_u32(&mut self, key: &str, value: &Spanned<i64>) -> Option<NonZeroU32> {
        let parsed = u32::try_from(*value.get_ref())
            .ok()
            .and_then(NonZeroU32::new);
        if parsed.is_none() {
            self.error(
                value,
                format!("`{key}` must be a whole number of at least 1"),
            );
        }
        parsed
    }

    pub(super) fn rate(&mut self, raw: Option<&RawRate>) -> Rate {
        let Some(raw) = raw else {
            return Rate::default();
        };
        let burst = raw.burst.as_ref().and_then(|b| self.count_u32("burst", b));
        let given: Vec<(&str, &Spanned<i64>, Duration)> = [
            ("per_second", &raw.per_second, 1),
            ("per_minute", &raw.per_minute, 60),
            ("per_hour", &raw.per_hour, 3600),
        ]
        .into_iter()
        .filter_map(|(key, value, seconds)| {
            value
                .as_ref()
                .map(|v| (key, v, Duration::from_secs(seconds)))
        })
        .collect();
        let global = match given.as_slice() {
            [] => {
                if let Some(at) = &raw.burst {
                    self.error(at, "`burst` needs `per_second`, `per_minute` or `per_hour`");
                }
                None
            }
            [(key, value, per)] => self
                .count_u32(key, value)
                .map(|count| Pace::new(count, *per, burst)),
            [_, (key, value, _), ..] => {
                self.error(
                    *value,
                    format!("`{key}` repeats the global rate; give one of `per_second`, `per_minute` or `per_hour`"),
                );
                None
            }
        };
        let mut domain_default = None;
        let mut domains = BTreeMap::new();
        for (domain, value) in &raw.per_domain {
            let Some((count, per)) = parse_pace(value.get_ref()) else {
                self.error(
                    value,
                    format!("`per_domain` value for `{domain}` must be like `20/s`, `600/min` or `5000/h` (at least 1)"),
                );
                continue;
            };
            let pace = Pace::new(count, per, None);
            if domain == "default" {
                domain_default = Some(pace);
                continue;
            }
            match idna::domain_to_ascii(domain.trim_end_matches('.')) {
                Ok(key) if key.contains('.') => {
                    if domains.insert(key.clone(), pace).is_some() {
                        self.error(
                            value,
                            format!("`per_domain` names `{key}` twice (keys are compared lower-case, IDNA-encoded)"),
                        );
                    }
                }
                _ => self.error(
                    value,
                    format!("`per_domain` key `{domain}` is not a domain such as `example.com`"),
                ),
            }
        }
        let batch = match (&raw.batch_size, &raw.batch_pause) {
            (None, None) => None,
            (Some(size), pause) => {
                let size = self.positive("batch_size", Some(size), 1);
                let pause = self.duration("batch_pause", pause.as_ref(), Duration::from_secs(60));
                Some(Batch { size, pause })
            }
            (None, Some(pause)) => {
                self.error(pause, "`batch_pause` needs `batch_size`");
                None
            }
        };
        let throttle_floor = raw.throttle_floor.as_ref().and_then(|value| {
            let parsed = parse_pace(value.get_ref());
            if parsed.is_none() {
                self.error(
                    value,
                    "`throttle_floor` must be like `6/min`, `1/s` or `100/h` (at least 1)",
                );
            }
            parsed.map(|(count, per)| Pace::new(count, per, None))
        });
        let daily = self.daily(raw);
        Rate {
            global,
            domain_default,
            domains,
            batch,
            throttle_floor,
            daily,
        }
    }

    fn daily(&mut self, raw: &RawRate) -> DailyCaps {
        let per_day = raw
            .per_day
            .as_ref()
            .and_then(|v| self.count_u32("per_day", v));
        let warmup = raw
            .warmup
            .iter()
            .flatten()
            .filter_map(|v| self.count_u32("warmup", v))
            .collect();
        let mut domain_default = None;
        let mut domains = BTreeMap::new();
        for (domain, value) in &raw.per_domain_per_day {
            let Some(cap) =
                self.count_u32(&format!("per_domain_per_day` value for `{domain}"), value)
            else {
                continue;
            };
            if domain == "default" {
                domain_default = Some(cap);
                continue;
            }
            match idna::domain_to_ascii(domain.trim_end_matches('.')) {
                Ok(key) if key.contains('.') => {
                    if domains.insert(key.clone(), cap).is_some() {
                        self.error(
                            value,
                            format!("`per_domain_per_day` names `{key}` twice (keys are compared lower-case, IDNA-encoded)"),
                        );
                    }
                }
                _ => self.error(
                    value,
                    format!(
                        "`per_domain_per_day` key `{domain}` is not a domain such as `example.com`"
                    ),
                ),
            }
        }
        DailyCaps {
            per_day,
            warmup,
            domain_default,
            domains,
        }
    }

    pub(super) fn retry(&mut self, raw: Option<&RawRetry>) -> Retry {
        let defaults = Retry::default();
        let Some(raw) = raw else {
            return defaults;
        };
        let on_ambiguous = match raw.on_ambiguous.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None => defaults.on_ambiguous,
            Some((_, "report")) => OnAmbiguous::Report,
            Some((_, "retry")) => OnAmbiguous::Retry,
            Some((at, other)) => {
                self.error(
                    at,
                    format!("`on_ambiguous` = `{other}` must be `report` (never send again) or `retry` (send again, maybe twice)"),
                );
                defaults.on_ambiguous
            }
        };
        let max_attempts = raw
            .max_attempts
            .as_ref()
            .and_then(|v| self.count_u32("max_attempts", v))
            .unwrap_or(defaults.max_attempts);
        let relay_attempts = raw
            .relay_attempts
            .as_ref()
            .and_then(|v| self.count_u32("relay_attempts", v))
            .unwrap_or(defaults.relay_attempts);
        let backoff = self.duration("backoff", raw.backoff.as_ref(), defaults.backoff);
        // Without a cap of its own, the cap is at least the first wait.
        let max_backoff = self.duration(
            "max_backoff",
            raw.max_backoff.as_ref(),
            defaults.max_backoff.max(backoff),
        );
        if let (Some(at), true) = (&raw.max_backoff, max_backoff < backoff) {
            self.error(at, "`max_backoff` is shorter than `backoff`");
        }
        Retry {
            max_attempts,
            backoff,
            max_backoff,
            linger: match &raw.linger {
                // "0s" is allowed here: a run that never waits for retries.
                Some(value)
                    if humantime::parse_duration(value.get_ref()).is_ok_and(|d| d.is_zero()) =>
                {
                    Duration::ZERO
                }
                other => self.duration("linger", other.as_ref(), defaults.linger),
            },
            relay_attempts,
            relay_backoff: self.duration(
                "relay_backoff",
                raw.relay_backoff.as_ref(),
                defaults.relay_backoff,
            ),
            suspension: self.duration("suspension", raw.suspension.as_ref(), defaults.suspension),
            on_ambiguous,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(extra: &str) -> Result<super::super::Campaign, String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let example = std::fs::read_to_string(dir.join("example.toml")).unwrap();
        // The example's own [rate] and [retry] give way to the test's.
        let base = &example[..example.find("\n[rate]").unwrap_or(example.len())];
        super::super::parse(&dir.join("example.toml"), &format!("{base}\n{extra}"))
            .map_err(|problems| problems.into_failure().message)
    }

    fn n(value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap()
    }

    #[test]
    fn rates_take_one_unit_a_burst_and_per_domain_paces() {
        let campaign = parse(
            "[rate]\nper_minute = 600\nburst = 3\nbatch_size = 100\nbatch_pause = \"2s\"\n[rate.per_domain]\ndefault = \"5/s\"\n\"Example.COM\" = 2\n\"bücher.example\" = \"100/h\"\n",
        )
        .unwrap();
        let rate = campaign.rate;
        assert_eq!(
            rate.global,
            Some(Pace {
                count: n(600),
                per: Duration::from_secs(60),
                burst: n(3)
            })
        );
        assert_eq!(rate.global.unwrap().interval(), Duration::from_millis(100));
        assert_eq!(
            rate.domain_default,
            Some(Pace::new(n(5), Duration::from_secs(1), None))
        );
        assert_eq!(
            rate.domains.keys().collect::<Vec<_>>(),
            ["example.com", "xn--bcher-kva.example"]
        );
        assert_eq!(rate.domains["example.com"].burst, n(1));
        assert_eq!(
            rate.batch,
            Some(Batch {
                size: NonZeroUsize::new(100).unwrap(),
                pause: Duration::from_secs(2)
            })
        );
    }

    #[test]
    fn the_default_burst_is_fifty_milliseconds_of_the_rate() {
        assert_eq!(Pace::new(n(200), Duration::from_secs(1), None).burst, n(10));
        assert_eq!(Pace::new(n(30), Duration::from_secs(1), None).burst, n(2));
        assert_eq!(
            Pace::new(n(100), Duration::from_secs(3600), None).burst,
            n(1)
        );
    }

    #[test]
    fn bad_rates_and_retries_are_refused_with_their_line() {
        let error = parse(
            "[rate]\nper_second = 10\nper_hour = 5\n[rate.per_domain]\n\"x\" = \"3/s\"\n\"a.example\" = \"3/fortnight\"\n[retry]\nbackoff = \"10m\"\nmax_backoff = \"1m\"\non_ambiguous = \"always\"\n",
        )
        .unwrap_err();
        for expected in [
            "`per_hour` repeats the global rate",
            "`per_domain` key `x` is not a domain",
            "`per_domain` value for `a.example` must be like `20/s`",
            "`max_backoff` is shorter than `backoff`",
            "`on_ambiguous` = `always` must be `report` (never send again) or `retry`",
        ] {
            assert!(error.contains(expected), "{expected} missing from {error}");
        }
    }

    #[test]
    fn the_throttle_floor_and_the_suspension_have_defaults_and_are_checked() {
        let campaign = parse("").unwrap();
        assert!((campaign.rate.throttle_floor_per_second() - 0.1).abs() < 1e-9);
        assert_eq!(campaign.retry.suspension, Duration::from_secs(1800));
        let campaign =
            parse("[rate]\nthrottle_floor = \"2/s\"\n[retry]\nsuspension = \"5m\"\n").unwrap();
        assert!((campaign.rate.throttle_floor_per_second() - 2.0).abs() < 1e-9);
        assert_eq!(campaign.retry.suspension, Duration::from_secs(300));
        let error =
            parse("[rate]\nthrottle_floor = \"slow\"\n[retry]\nsuspension = \"0s\"\n").unwrap_err();
        for expected in [
            "toml:23: `throttle_floor` must be like `6/min`, `1/s` or `100/h` (at least 1)",
            "toml:25: `suspension` = `0s` is not a duration such as `30s` or `10m`",
        ] {
            assert!(error.contains(expected), "{expected} missing from {error}");
        }
    }

    #[test]
    fn daily_caps_warm_up_then_hold_at_per_day() {
        let campaign = parse(
            "[rate]\nper_day = 1500\nwarmup = [500, 1000, 2000]\n[rate.per_domain_per_day]\ndefault = 300\n\"GMail.com\" = 200\n",
        )
        .unwrap();
        let daily = campaign.rate.daily;
        assert!(daily.any());
        // Day 2's 2000 is held to per_day; past the warm-up, per_day.
        let caps: Vec<Option<u32>> = (0..5).map(|d| daily.global(d)).collect();
        assert_eq!(
            caps,
            [Some(500), Some(1000), Some(1500), Some(1500), Some(1500)]
        );
        assert_eq!(daily.domain("gmail.com"), Some(200));
        assert_eq!(daily.domain("example.org"), Some(300));
        let warm_only = parse("[rate]\nwarmup = [10, 20]\n").unwrap().rate.daily;
        assert_eq!(
            (0..3).map(|d| warm_only.global(d)).collect::<Vec<_>>(),
            [Some(10), Some(20), None]
        );
        assert_eq!(warm_only.domain("gmail.com"), None);
        assert!(!parse("").unwrap().rate.daily.any());
        let error =
            parse("[rate]\nper_day = 0\nwarmup = [10, -1]\n[rate.per_domain_per_day]\n\"x\" = 5\n")
                .unwrap_err();
        for expected in [
            "`per_day` must be a whole number of at least 1",
            "`warmup` must be a whole number of at least 1",
            "`per_domain_per_day` key `x` is not a domain",
        ] {
            assert!(error.contains(expected), "{expected} missing from {error}");
        }
    }

    #[test]
    fn on_ambiguous_reports_unless_told_to_retry() {
        let on_ambiguous = |extra: &str| parse(extra).map(|c| c.retry.on_ambiguous);
        assert_eq!(on_ambiguous(""), Ok(OnAmbiguous::Report));
        assert_eq!(on_ambiguous("[retry]\n"), Ok(OnAmbiguous::Report));
        assert_eq!(
            on_ambiguous("[retry]\non_ambiguous = \"report\"\n"),
            Ok(OnAmbiguous::Report)
        );
        assert_eq!(
            on_ambiguous("[retry]\non_ambiguous = \"retry\"\n"),
            Ok(OnAmbiguous::Retry)
        );
        let error = on_ambiguous("[retry]\non_ambiguous = \"Retry\"\n").unwrap_err();
        assert!(
            error.contains("`on_ambiguous` = `Retry` must be `report`"),
            "{error}"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let retry = Retry {
            max_backoff: Duration::from_secs(100),
            ..Retry::default()
        };
        let first = Duration::from_secs(30);
        let waits: Vec<u64> = (1..=4)
            .map(|a| retry.backoff_after(first, a).as_secs())
            .collect();
        assert_eq!(waits, [30, 60, 100, 100]);
    }
}
