//! `[schedule]`: when a campaign may be sent, and the cron slots of a recurring one.
//!
//! Pure: every question takes the time to ask about as a parameter; nothing here reads the
//! clock. Cron expressions are UTC: `0 9 * * 1` is Monday 09:00 UTC, whatever the machine's time
//! zone, so that a slot means the same thing on every host. Send windows and the days of the
//! daily caps are in `timezone` (see [`super::calendar`]).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, TimeDelta, Timelike as _, Utc};
use croner::parser::{CronParser, Seconds, Year};
use toml::Spanned;

use super::Validator;
use super::calendar::{Calendar, Window};
use super::raw::RawSchedule;

/// `[schedule]`. The default has no constraints: a `send` may run at any time, once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Nothing is sent before this instant.
    pub not_before: Option<DateTime<Utc>>,
    /// A recurring campaign: each occurrence (in UTC) is a slot, and each slot is its own run.
    pub cron: Option<Cron>,
    /// `timezone` and `window`: when in the week messages may start.
    pub calendar: Calendar,
}

/// What a `send` at a given time may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Send now. `slot` is the cron occurrence this run belongs to; `None` without `cron`.
    Now { slot: Option<DateTime<Utc>> },
    /// Too early: nothing may be sent before `until`. [`DateTime::<Utc>::MAX_UTC`] if the cron
    /// expression has no occurrence left before the year 5000.
    NotYet { until: DateTime<Utc> },
}

impl Schedule {
    /// The run a `send` at `now` belongs to.
    ///
    /// Without `cron`: [`Due::NotYet`] until `not_before`, then `Now { slot: None }`. With `cron`:
    /// the latest occurrence at or before `now` that is not before `not_before` is the slot; if
    /// there is none yet, `NotYet` until the first occurrence at or after both `now` and
    /// `not_before`.
    #[must_use]
    pub fn due(&self, now: DateTime<Utc>) -> Due {
        let Some(cron) = &self.cron else {
            return match self.not_before {
                Some(until) if now < until => Due::NotYet { until },
                _ => Due::Now { slot: None },
            };
        };
        let slot = cron
            .latest_at_or_before(now)
            .filter(|slot| self.not_before.is_none_or(|start| *slot >= start));
        if slot.is_some() {
            return Due::Now { slot };
        }
        let from = self.not_before.map_or(now, |start| start.max(now));
        Due::NotYet {
            until: cron
                .first_at_or_after(from)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// Whether `t` is an occurrence of the cron expression and not before `not_before`: the
    /// check for an operator who asks to run a missed slot explicitly. Without `cron` there are
    /// no slots, so it is always false.
    #[must_use]
    pub fn is_slot(&self, t: DateTime<Utc>) -> bool {
        self.cron.as_ref().is_some_and(|cron| cron.matches(t))
            && self.not_before.is_none_or(|start| t >= start)
    }
}

/// A cron expression, evaluated in UTC, with the text the user wrote (for messages).
///
/// Five fields — minute, hour, day of month, month, day of week — or six with seconds first;
/// names (`MON`, `JAN`), ranges, lists and steps (`*/5`) as in Vixie cron, and `@hourly`,
/// `@daily`, `@weekly`, `@monthly`, `@yearly`. As in Vixie cron, when both the day of month and
/// the day of week are restricted, a day matching either one matches. Built only by parsing,
/// which also refuses an expression that never matches a date (`0 0 30 2 *`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    source: String,
    cron: croner::Cron,
}

const NICKNAMES: [&str; 6] = [
    "@hourly",
    "@daily",
    "@weekly",
    "@monthly",
    "@yearly",
    "@annually",
];

/// Why a text is not a usable cron expression; reads after "`cron` = `…` ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "is empty; give 5 fields (minute, hour, day of month, month, day of week) such as `0 9 * * 1`"
    )]
    Empty,
    #[error(
        "has {0} fields; give 5 (minute, hour, day of month, month, day of week) such as `0 9 * * 1`, or 6 with seconds first"
    )]
    Fields(usize),
    #[error("has a bad {name} field `{value}` ({reason})")]
    Field {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("is not one of `@hourly`, `@daily`, `@weekly`, `@monthly` or `@yearly`")]
    Nickname,
    #[error(
        "is not a cron expression ({0}); give 5 fields (minute, hour, day of month, month, day of week) such as `0 9 * * 1`"
    )]
    Syntax(String),
    #[error("never matches a date; check the day of month against the month")]
    Never,
}

/// The parser for every expression: seconds optional (six fields), no year field.
fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

/// croner's message about `text` as a lower-case phrase: its first sentence, without the final
/// full stop.
fn reason(error: &croner::errors::CronError, text: &str) -> String {
    use croner::errors::CronError as E;
    let text = match error {
        E::InvalidPattern(message) | E::ComponentError(message) => message.clone(),
        // croner quotes the character upper-cased; show it as the user wrote it.
        E::IllegalCharacters(message) => {
            let quoted = message.split('\'').nth(1).and_then(|c| c.chars().next());
            match quoted.and_then(|q| text.chars().find(|c| c.to_ascii_uppercase() == q)) {
                Some(c) => format!("`{c}` is not allowed there"),
                None => "a character is not allowed there".to_owned(),
            }
        }
        other => other.to_string(),
    };
    let sentence = text
        .split(". ")
        .next()
        .unwrap_or_default()
        .trim_end_matches('.');
    let mut chars = sentence.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}

impl FromStr for Cron {
    type Err = CronError;

    fn from_str(text: &str) -> Result<Cron, CronError> {
        let source = text.trim();
        let fields: Vec<&str> = source.split_whitespace().collect();
        if source.starts_with('@') {
            if !NICKNAMES.contains(&source.to_ascii_lowercase().as_str()) {
                return Err(CronError::Nickname);
            }
        } else if fields.is_empty() {
            return Err(CronError::Empty);
        } else if !(5..=6).contains(&fields.len()) {
            return Err(CronError::Fields(fields.len()));
        }
        let cron = parser().parse(source).map_err(|error| {
            // Name the field at fault: parse each one alone, the others left as `*`.
            let names: &[&'static str] = if fields.len() == 6 {
                &[
                    "second",
                    "minute",
                    "hour",
                    "day of month",
                    "month",
                    "day of week",
                ]
            } else {
                &["minute", "hour", "day of month", "month", "day of week"]
            };
            let single = names
                .iter()
                .zip(&fields)
                .enumerate()
                .find_map(|(i, (name, value))| {
                    let mut probe = vec!["*"; names.len()];
                    probe[i] = value;
                    parser()
                        .parse(&probe.join(" "))
                        .err()
                        .map(|error| CronError::Field {
                            name,
                            value: (*value).to_owned(),
                            reason: reason(&error, value),
                        })
                });
            single.unwrap_or_else(|| CronError::Syntax(reason(&error, source)))
        })?;
        // Without a year field an expression repeats with the Gregorian calendar, every 400
        // years, and croner searches up to the year 5000: one search from a fixed date finds
        // whether it ever matches, and reads no clock.
        if cron
            .find_next_occurrence(&DateTime::<Utc>::UNIX_EPOCH, true)
            .is_err()
        {
            return Err(CronError::Never);
        }
        Ok(Cron {
            source: source.to_owned(),
            cron,
        })
    }
}

impl Cron {
    /// The expression as written in campaign.toml, trimmed.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The latest occurrence at or before `t`, if any since the year 1.
    #[must_use]
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // croner drops the fraction of a second, which keeps its answer at or before `t`.
        self.cron
            .find_previous_occurrence(&t, true)
            .ok()
            .filter(|slot| *slot <= t)
    }

    /// The first occurrence at or after `t`, if any before the year 5000.
    #[must_use]
    pub fn first_at_or_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // croner drops the fraction of a second, so from 09:05:00.5 it would find 09:05:00:
        // start from the next whole second instead.
        let start = if t.nanosecond() == 0 {
            t
        } else {
            t.with_nanosecond(0)?
                .checked_add_signed(TimeDelta::seconds(1))?
        };
        self.cron
            .find_next_occurrence(&start, true)
            .ok()
            .filter(|slot| *slot >= t)
    }

    /// Whether `t` is exactly an occurrence, to the second, with no fraction.
    #[must_use]
    pub fn matches(&self, t: DateTime<Utc>) -> bool {
        t.nanosecond() == 0 && self.cron.is_time_matching(&t).unwrap_or(false)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A local date and time, as TOML or RFC 3339 would write it without an offset.
fn is_local_datetime(text: &str) -> bool {
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .any(|format| NaiveDateTime::parse_from_str(text, format).is_ok())
}

impl Validator<'_> {
    pub(super) fn schedule(&mut self, raw: Option<&RawSchedule>) -> Schedule {
        let Some(raw) = raw else {
            return Schedule::default();
        };
        let not_before = raw.not_before.as_ref().and_then(|v| self.not_before(v));
        let cron = raw
            .cron
            .as_ref()
            .and_then(|text| match text.get_ref().parse::<Cron>() {
                Ok(cron) => Some(cron),
                Err(error) => {
                    self.error(text, format!("`cron` = `{}` {error}", text.get_ref()));
                    None
                }
            });
        let timezone = raw.timezone.as_ref().map_or_else(chrono_tz::Tz::default, |zone| {
            zone.get_ref().trim().parse().unwrap_or_else(|_| {
                self.error(
                    zone,
                    format!(
                        "`timezone` = `{}` is not an IANA time zone name such as `Europe/Paris` or `UTC`",
                        zone.get_ref()
                    ),
                );
                chrono_tz::Tz::default()
            })
        });
        let mut windows = Vec::new();
        for text in raw.window.iter().flatten() {
            match text.get_ref().parse::<Window>() {
                Ok(window) => windows.push(window),
                Err(error) => self.error(text, format!("`window` `{}` {error}", text.get_ref())),
            }
        }
        Schedule {
            not_before,
            cron,
            calendar: Calendar { timezone, windows },
        }
    }

    fn not_before(&mut self, value: &Spanned<toml::Value>) -> Option<DateTime<Utc>> {
        let text = match value.get_ref() {
            toml::Value::String(text) => text.trim().to_owned(),
            // toml writes a date-time back in RFC 3339, offset and all.
            toml::Value::Datetime(datetime) => datetime.to_string(),
            other => {
                let what = match other {
                    toml::Value::Integer(_) | toml::Value::Float(_) => "a number",
                    toml::Value::Boolean(_) => "a boolean",
                    toml::Value::Array(_) => "an array",
                    _ => "a table",
                };
                self.error(
                    value,
                    format!(
                        "`not_before` is {what}, not a date and time such as `2026-12-01T09:00:00Z`"
                    ),
                );
                return None;
            }
        };
        match DateTime::parse_from_rfc3339(&text) {
            Ok(datetime) => Some(datetime.to_utc()),
            Err(_) if is_local_datetime(&text) => {
                self.error(
                    value,
                    format!("`not_before` = `{text}` needs an offset, e.g. Z for UTC (`{text}Z`) or `+01:00`"),
                );
                None
            }
            Err(_) => {
                self.error(
                    value,
                    format!("`not_before` = `{text}` is not an RFC 3339 date and time such as `2026-12-01T09:00:00Z`"),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn given(not_before: Option<&str>, cron: Option<&str>) -> Schedule {
        Schedule {
            not_before: not_before.map(utc),
            cron: cron.map(|c| c.parse().unwrap()),
            calendar: Calendar::default(),
        }
    }

    fn schedule_with(not_before: &str, cron: &str) -> Schedule {
        given(Some(not_before), Some(cron))
    }

    fn now(slot: &str) -> Due {
        Due::Now {
            slot: Some(utc(slot)),
        }
    }

    fn not_yet(until: &str) -> Due {
        Due::NotYet { until: utc(until) }
    }

    /// `[schedule]` lines appended to a minimal campaign: its schedule, or its problems as
    /// `line: message` (the section's first line is line 11).
    fn check(section: &str) -> Result<Schedule, String> {
        super::super::tests::check(section).map(|campaign| campaign.schedule)
    }

    #[test]
    fn without_a_schedule_a_send_is_always_due() {
        let schedule = Schedule::default();
        assert_eq!(
            schedule.due(utc("2026-12-01T09:00:00Z")),
            Due::Now { slot: None }
        );
        assert!(!schedule.is_slot(utc("2026-12-01T09:00:00Z")));
    }

    #[test]
    fn not_before_alone_holds_the_send_until_then() {
        let schedule = given(Some("2026-12-01T09:00:00+01:00"), None);
        assert_eq!(
            schedule.due(utc("2026-12-01T07:59:59Z")),
            not_yet("2026-12-01T08:00:00Z")
        );
        for at in ["2026-12-01T08:00:00Z", "2027-01-01T00:00:00Z"] {
            assert_eq!(schedule.due(utc(at)), Due::Now { slot: None }, "{at}");
        }
        assert!(!schedule.is_slot(utc("2026-12-01T08:00:00Z")));
    }

    #[test]
    fn every_five_minutes_the_slot_is_the_latest_occurrence() {
        let schedule = given(None, Some("*/5 * * * *"));
        for (at, slot) in [
            ("2026-12-01T09:07:30Z", "2026-12-01T09:05:00Z"),
            ("2026-12-01T09:05:00Z", "2026-12-01T09:05:00Z"),
            ("2026-12-01T09:04:59.999Z", "2026-12-01T09:00:00Z"),
            ("2026-12-01T09:05:00.500Z", "2026-12-01T09:05:00Z"),
            ("2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ] {
            assert_eq!(schedule.due(utc(at)), now(slot), "{at}");
        }
    }

    #[test]
    fn weekly_at_nine_on_monday_in_utc() {
        // 2026-11-30 and 2026-12-07 are Mondays.
        let schedule = given(None, Some("0 9 * * 1"));
        for (at, slot) in [
            ("2026-12-01T12:00:00Z", "2026-11-30T09:00:00Z"),
            ("2026-12-07T08:59:59Z", "2026-11-30T09:00:00Z"),
            ("2026-12-07T09:00:00Z", "2026-12-07T09:00:00Z"),
            // 09:30 in Paris is 08:30 UTC: still the previous week's slot.
            ("2026-12-07T09:30:00+01:00", "2026-11-30T09:00:00Z"),
        ] {
            assert_eq!(schedule.due(utc(at)), now(slot), "{at}");
        }
    }

    #[test]
    fn cron_slots_before_not_before_do_not_count() {
        let schedule = given(Some("2026-12-01T09:02:00Z"), Some("*/5 * * * *"));
        for (at, due) in [
            ("2026-12-01T08:00:00Z", not_yet("2026-12-01T09:05:00Z")),
            // 09:00 is the latest occurrence, but it is before not_before.
            ("2026-12-01T09:03:00Z", not_yet("2026-12-01T09:05:00Z")),
            ("2026-12-01T09:05:00Z", now("2026-12-01T09:05:00Z")),
            ("2026-12-01T09:12:00Z", now("2026-12-01T09:10:00Z")),
        ] {
            assert_eq!(schedule.due(utc(at)), due, "{at}");
        }

        let weekly = schedule_with("2026-12-02T00:00:00Z", "0 9 * * 1");
        assert_eq!(
            weekly.due(utc("2026-12-01T12:00:00Z")),
            not_yet("2026-12-07T09:00:00Z")
        );
        assert_eq!(
            weekly.due(utc("2026-12-05T12:00:00Z")),
            not_yet("2026-12-07T09:00:00Z")
        );
        assert_eq!(
            weekly.due(utc("2026-12-08T12:00:00Z")),
            now("2026-12-07T09:00:00Z")
        );
    }

    #[test]
    fn fractions_of_a_second_never_move_a_slot_across_not_before() {
        // The 09:05:00 occurrence is 0.2 s before not_before: the next one is the first due.
        let schedule = schedule_with("2026-12-01T09:05:00.200Z", "*/5 * * * *");
        assert_eq!(
            schedule.due(utc("2026-12-01T09:05:00.500Z")),
            not_yet("2026-12-01T09:10:00Z")
        );
        let cron: Cron = "*/5 * * * *".parse().unwrap();
        assert_eq!(
            cron.first_at_or_after(utc("2026-12-01T09:05:00.500Z")),
            Some(utc("2026-12-01T09:10:00Z"))
        );
    }

    #[test]
    fn six_fields_put_seconds_first_and_nicknames_are_known() {
        let schedule = given(None, Some("30 */5 * * * *"));
        assert_eq!(
            schedule.due(utc("2026-12-01T09:05:29Z")),
            now("2026-12-01T09:00:30Z")
        );
        let daily = given(None, Some("@daily"));
        assert_eq!(
            daily.due(utc("2026-12-01T09:05:29Z")),
            now("2026-12-01T00:00:00Z")
        );
        assert_eq!(daily.cron.unwrap().source(), "@daily");
    }

    #[test]
    fn is_slot_wants_an_exact_occurrence_not_before_the_start() {
        let schedule = schedule_with("2026-12-01T09:02:00Z", "*/5 * * * *");
        assert!(schedule.is_slot(utc("2026-12-01T09:05:00Z")));
        assert!(schedule.is_slot(utc("2027-03-04T10:15:00+01:00")));
        for not_a_slot in [
            "2026-12-01T09:06:00Z",
            "2026-12-01T09:05:01Z",
            "2026-12-01T09:05:00.500Z",
            // An occurrence, but before not_before.
            "2026-12-01T09:00:00Z",
        ] {
            assert!(!schedule.is_slot(utc(not_a_slot)), "{not_a_slot}");
        }
    }

    #[test]
    fn bad_cron_expressions_say_what_is_wrong() {
        for (text, expected) in [
            ("", CronError::Empty),
            ("* * * *", CronError::Fields(4)),
            ("0 0 * * * * 2030", CronError::Fields(7)),
            ("@reboot", CronError::Nickname),
            ("0 0 30 2 *", CronError::Never),
            ("0 0 31 4 *", CronError::Never),
        ] {
            assert_eq!(text.parse::<Cron>(), Err(expected), "{text}");
        }
        for (text, field, value) in [
            ("61 * * * *", "minute", "61"),
            ("0 24 * * *", "hour", "24"),
            ("0 9 * * 8", "day of week", "8"),
            ("0 9 * fooday *", "month", "fooday"),
            ("0/5 * * * *", "minute", "0/5"),
            ("61 0 9 * * *", "second", "61"),
            ("1-x * * * *", "minute", "1-x"),
        ] {
            match text.parse::<Cron>() {
                Err(CronError::Field {
                    name,
                    value: v,
                    reason,
                }) => {
                    assert_eq!((name, v.as_str()), (field, value), "{text}");
                    assert!(!reason.is_empty() && !reason.contains(". "), "{reason}");
                    assert!(!reason.starts_with(char::is_uppercase), "{reason}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(
            "0 9 * fooday *".parse::<Cron>().unwrap_err().to_string(),
            "has a bad month field `fooday` (`f` is not allowed there)"
        );
    }

    #[test]
    fn the_schedule_section_is_read_with_strings_or_toml_date_times() {
        let schedule = check(
            "[schedule]\nnot_before = \"2026-12-01T09:00:00+01:00\"\ncron = \" 0 9 * * MON \"\n",
        )
        .unwrap();
        assert_eq!(schedule.not_before, Some(utc("2026-12-01T08:00:00Z")));
        assert_eq!(schedule.cron.unwrap().to_string(), "0 9 * * MON");

        let native = check("[schedule]\nnot_before = 2026-12-01T09:00:00Z\n").unwrap();
        assert_eq!(native.not_before, Some(utc("2026-12-01T09:00:00Z")));
        assert_eq!(native.cron, None);

        assert_eq!(check("").unwrap(), Schedule::default());
    }

    #[test]
    fn time_zones_and_windows_are_read_and_bad_ones_named_with_their_line() {
        let schedule = check(
            "[schedule]\ntimezone = \"Europe/Paris\"\nwindow = [\"Mon-Fri 09:00-17:00\", \"Sat 10:00-14:00\"]\n",
        )
        .unwrap();
        assert_eq!(schedule.calendar.timezone, chrono_tz::Tz::Europe__Paris);
        assert_eq!(schedule.calendar.windows.len(), 2);
        assert_eq!(check("").unwrap().calendar.timezone, chrono_tz::Tz::UTC);
        let error = check(
            "[schedule]\ntimezone = \"Europe/Pariss\"\nwindow = [\n  \"Mon-Fri 09:00-17:00\",\n  \"Mon 09:00\",\n]\n",
        )
        .unwrap_err();
        assert_eq!(
            error,
            "12: `timezone` = `Europe/Pariss` is not an IANA time zone name such as `Europe/Paris` or `UTC`\n\
             15: `window` `Mon 09:00` has `09:00`, which is not hours such as `09:00-17:00`"
        );
    }

    #[test]
    fn bad_schedules_are_refused_with_their_line() {
        let error = check("[schedule]\nnot_before = 2026-12-01T09:00:00\ncron = \"61 * * * *\"\n")
            .unwrap_err();
        assert_eq!(
            error,
            "12: `not_before` = `2026-12-01T09:00:00` needs an offset, e.g. Z for UTC (`2026-12-01T09:00:00Z`) or `+01:00`\n\
             13: `cron` = `61 * * * *` has a bad minute field `61` (number out of bounds)"
        );
        for (section, expected) in [
            (
                "[schedule]\nnot_before = \"2026-12-01 09:00\"\n",
                "12: `not_before` = `2026-12-01 09:00` is not an RFC 3339 date and time such as `2026-12-01T09:00:00Z`",
            ),
            (
                "[schedule]\nnot_before = \"2026-12-01 09:00:00\"\n",
                "12: `not_before` = `2026-12-01 09:00:00` needs an offset, e.g. Z for UTC (`2026-12-01 09:00:00Z`) or `+01:00`",
            ),
            (
                "[schedule]\nnot_before = 2026-12-01\n",
                "12: `not_before` = `2026-12-01` is not an RFC 3339 date and time such as `2026-12-01T09:00:00Z`",
            ),
            (
                "[schedule]\nnot_before = 20261201\n",
                "12: `not_before` is a number, not a date and time such as `2026-12-01T09:00:00Z`",
            ),
            (
                "[schedule]\ncron = \"0 0 30 2 *\"\n",
                "12: `cron` = `0 0 30 2 *` never matches a date; check the day of month against the month",
            ),
        ] {
            assert_eq!(check(section).unwrap_err(), expected, "{section}");
        }
        let unknown = check("[schedule]\nevery = \"day\"\n").unwrap_err();
        assert!(
            unknown.starts_with("12: unknown field `every`, expected one of `not_before`, `cron`"),
            "{unknown}"
        );
    }
}
