//! The clock, in one place: every wall-clock read of the program goes through here.
//! `clippy.toml` bans `SystemTime::now` and chrono's `now` everywhere else, so a test can
//! reason about time by reading this file alone. Monotonic `Instant`s (elapsed times, the rate
//! limiter's own clock) are not wall-clock reads and are not routed here.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::exit::{Exit, Failure};

/// Now, for timestamps: message `Date`s, journal records, retry times.
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

/// Now, for schedules (`[schedule] not_before` and cron slots). `MAILER_NOW` (RFC 3339)
/// replaces it, so that a schedule can be tried out and tested at a fixed time.
#[allow(clippy::disallowed_methods)] // the one permitted read
pub fn schedule_now() -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    match std::env::var("MAILER_NOW") {
        Ok(text) => chrono::DateTime::parse_from_rfc3339(&text)
            .map(|t| t.to_utc())
            .map_err(|e| {
                Failure::new(
                    Exit::Usage,
                    format!("MAILER_NOW `{text}` is not an RFC 3339 time: {e}"),
                )
                .into()
            }),
        Err(_) => Ok(chrono::Utc::now()),
    }
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
}
