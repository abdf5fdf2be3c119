//! The clock, in one place: every wall-clock read of the program goes through here.
//! `clippy.toml` bans `SystemTime::now` and chrono's `now` everywhere else, so a test can
//! reason about time by reading this file alone. Monotonic `Instant`s (elapsed times, the rate
//! limiter's own clock) are not wall-clock reads and are not routed here.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::exit::{Exit, Failure};

/// Now, for timestamps: message `Date`s, journal records, retry times; and for the time a
/// relay's certificate has left (`probe`: TLS checks it against the real clock too).
#[must_use]
#[allow(clippy::disallowed_methods)] // the one permitted read
pub fn now() -> SystemTime {
    SystemTime::now()
}

/// Milliseconds since the Unix epoch, as the journal stores times.
#[must_use]
pub fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// [`now`] in the journal's milliseconds.
#[must_use]
pub fn now_millis() -> i64 {
    millis(now())
}

/// `MAILER_NOW`, read once per process (the send path asks for the calendar's time with every
/// message): `None` when it is not set, else the time or why it is not one.
fn fixed() -> Option<&'static Result<chrono::DateTime<chrono::Utc>, String>> {
    static FIXED: std::sync::OnceLock<Option<Result<chrono::DateTime<chrono::Utc>, String>>> =
        std::sync::OnceLock::new();
    FIXED
        .get_or_init(|| {
            let text = std::env::var_os("MAILER_NOW")?;
            let text = text.to_string_lossy();
            Some(
                chrono::DateTime::parse_from_rfc3339(&text)
                    .map(|t| t.to_utc())
                    .map_err(|e| format!("MAILER_NOW `{text}` is not an RFC 3339 time: {e}")),
            )
        })
        .as_ref()
}

/// Now, for schedules (`[schedule] not_before` and cron slots). `MAILER_NOW` (RFC 3339)
/// replaces it, so that a schedule can be tried out and tested at a fixed time.
#[allow(clippy::disallowed_methods)] // the one permitted read
pub fn schedule_now() -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    match fixed() {
        Some(Ok(time)) => Ok(*time),
        Some(Err(why)) => Err(Failure::new(Exit::Usage, why.clone()).into()),
        None => Ok(chrono::Utc::now()),
    }
}

/// Now, for when deferred recipients and suspended domains fall due, both when their due time
/// is written and when it is compared. `MAILER_NOW` replaces it as it does for schedules, so
/// that a later run can be tried out (and tested) at a fixed time without waiting for it.
pub fn due_now() -> anyhow::Result<SystemTime> {
    if fixed().is_some() {
        return Ok(SystemTime::from(schedule_now()?));
    }
    Ok(now())
}

/// [`due_now`], or the real clock if `MAILER_NOW` is not a time (the command refused it
/// before anything was sent).
#[must_use]
pub fn due_now_or_now() -> SystemTime {
    due_now().unwrap_or_else(|_| now())
}

/// Now, for the calendar: send windows and the days of the daily caps, and the time each
/// attempt is counted at. `MAILER_NOW` fixes the moment this process first asks; from there the
/// clock runs at the monotonic clock's pace, so that a window can close during a run on a
/// fixed clock too.
pub fn calendar_now() -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    if fixed().is_none() {
        return schedule_now();
    }
    let elapsed = chrono::TimeDelta::from_std(start.elapsed()).unwrap_or_default();
    Ok(schedule_now()? + elapsed)
}

/// [`calendar_now`] in the journal's milliseconds; the real clock if `MAILER_NOW` is not a
/// time (the command refused it before anything was sent).
#[must_use]
pub fn calendar_millis() -> i64 {
    calendar_now().map_or_else(|_| now_millis(), |t| t.timestamp_millis())
}

/// When `MAILER_NOW` replaces the schedule's clock: a sentence saying so, and by how much it
/// differs from the real clock. Every command says it, so that nobody runs a real send on a
/// fake clock unawares.
#[must_use]
#[allow(clippy::disallowed_methods)] // compared with the real clock, on purpose
pub fn override_notice() -> Option<String> {
    let text = std::env::var("MAILER_NOW").ok()?;
    let fixed = chrono::DateTime::parse_from_rfc3339(&text).ok()?.to_utc();
    Some(describe_override(&text, fixed, chrono::Utc::now()))
}

fn describe_override(
    text: &str,
    fixed: chrono::DateTime<chrono::Utc>,
    real: chrono::DateTime<chrono::Utc>,
) -> String {
    let seconds = (fixed - real).abs().to_std().unwrap_or_default().as_secs();
    // For people: whole days past two of them, whole seconds below.
    let apart = if seconds >= 2 * 86_400 {
        format!("{} days", seconds / 86_400)
    } else {
        humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
    };
    let side = if fixed < real { "behind" } else { "ahead of" };
    format!(
        "MAILER_NOW={text} replaces the clock for schedules and due times: {apart} {side} the real clock"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_counts_from_the_epoch_and_clamps_before_it() {
        use std::time::Duration;
        assert_eq!(millis(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[test]
    fn an_overridden_clock_says_by_how_much() {
        let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc();
        let real = at("2026-12-06T04:00:00Z");
        assert_eq!(
            describe_override("2020-01-01T00:00:00Z", at("2020-01-01T00:00:00Z"), real),
            "MAILER_NOW=2020-01-01T00:00:00Z replaces the clock for schedules and due times: 2531 days behind the real clock"
        );
        assert!(
            describe_override("x", at("2026-12-06T05:00:00Z"), real)
                .ends_with("1h ahead of the real clock")
        );
    }
}
