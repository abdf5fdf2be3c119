//! Report: what happened to each recipient, counted, and the one-screen summary.
//!
//! Pure: [`Summary`] is fed [`Delivery`] values and prints into any `impl Write`. What comes
//! from outside (addresses, replies, domains) is printed through [`Shown`]. The preview
//! ([`preview`] picks and reads back sample messages, [`gallery`] makes the HTML page of them)
//! is pure too, but for [`preview::write`], which writes the files.

pub mod gallery;
mod logging;
pub mod preview;
mod progress;
mod status;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::Duration;

use crate::exit::Exit;
use crate::outcome::{Delivery, State};
use crate::printable::Shown;
pub use logging::{JsonLines, QuietStderr, text_fields};
pub use progress::{BarSafeStderr, Progress};
pub use status::{REPORT_COLUMNS, csv_fields, print_status};

/// Counts of one run, which always add up to the number of recipients.
#[derive(Debug, Default)]
pub struct Summary {
    pub dry_run: bool,
    pub states: BTreeMap<State, usize>,
    pub locales: BTreeMap<String, usize>,
    pub domains: BTreeMap<String, usize>,
    /// Deliveries that did not end as sent, first ones only (see [`Summary::KEEP`]).
    pub notable: Vec<Delivery>,
    pub duplicates: usize,
    /// How long delivery took (sends only).
    pub elapsed: Option<Duration>,
    /// 4xx replies that were retried within the run.
    pub retried: usize,
    /// Pauses because the relay as a whole failed.
    pub relay_pauses: usize,
    /// Connections the relay refused while it answered on the others (its connection limit).
    pub connections_refused: usize,
    /// Times the connection pool grew back to `connections` after an outage or a limit.
    pub regrown: usize,
    /// Domains slowed down by throttling replies, with the slowest pace (per second).
    pub throttled: BTreeMap<String, f64>,
    /// Domains suspended for throttling: until when, and how many recipients this run left
    /// deferred until then.
    pub suspended: BTreeMap<String, (std::time::SystemTime, usize)>,
    /// Domains that reached their daily cap: until when (the next day), and how many
    /// recipients this run left deferred until then.
    pub capped: BTreeMap<String, (std::time::SystemTime, usize)>,
    /// Why the run stopped before the end: the send window closed or the day's cap was
    /// reached, and when sending may go on.
    pub waiting: Option<String>,
    /// Recipients this run attempted (the rest were settled by earlier runs, or are waiting).
    pub attempted: usize,
    /// Recipients sent by this run.
    pub sent_now: usize,
}

impl Summary {
    /// How many non-sent deliveries to keep for the summary screen.
    pub const KEEP: usize = 20;

    pub fn add(&mut self, state: State, count: usize) {
        *self.states.entry(state).or_default() += count;
    }

    pub fn record(&mut self, delivery: Delivery) {
        self.add(delivery.state, 1);
        self.attempted += 1;
        self.sent_now += usize::from(delivery.state == State::Sent);
        if delivery.state != State::Sent && self.notable.len() < Self::KEEP {
            self.notable.push(delivery);
        }
    }

    /// Counts one message by its locale and recipient domain (for the planning view).
    pub fn count_message(&mut self, locale: &str, domain: &str) {
        for (map, key) in [(&mut self.locales, locale), (&mut self.domains, domain)] {
            // Look up before inserting: a million recipients share a few keys.
            match map.get_mut(key) {
                Some(count) => *count += 1,
                None => {
                    map.insert(key.to_owned(), 1);
                }
            }
        }
    }

    #[must_use]
    pub fn count(&self, state: State) -> usize {
        self.states.get(&state).copied().unwrap_or(0)
    }

    #[must_use]
    pub fn total(&self) -> usize {
        self.states.values().sum()
    }

    /// The exit code this run deserves.
    #[must_use]
    pub fn exit(&self) -> Exit {
        if self.count(State::Pending) > 0 || self.count(State::Deferred) > 0 {
            Exit::WorkRemaining
        } else if self.count(State::Failed) > 0 || self.count(State::Ambiguous) > 0 {
            Exit::PermanentFailures
        } else {
            Exit::Complete
        }
    }

    /// `by locale: de 2, en 12, …`
    #[must_use]
    pub fn locale_line(&self) -> String {
        let locales: Vec<String> = self
            .locales
            .iter()
            .map(|(l, n)| format!("{} {n}", Shown(l)))
            .collect();
        format!("by locale: {}", locales.join(", "))
    }

    /// The one-screen summary.
    pub fn print(&self, out: &mut impl Write) -> io::Result<()> {
        let sent = if self.dry_run {
            "would be sent (dry run)"
        } else {
            "sent"
        };
        writeln!(out, "{} recipients", self.total())?;
        for state in State::ALL {
            let count = self.count(state);
            if count > 0 || state == State::Sent {
                let label = if state == State::Sent {
                    sent
                } else {
                    state.name()
                };
                writeln!(out, "  {label:<24} {count:>9}")?;
            }
        }
        if self.duplicates > 0 {
            writeln!(
                out,
                "  {:<24} {:>9}",
                "duplicate rows skipped", self.duplicates
            )?;
        }
        if self.retried > 0 {
            writeln!(out, "  {:<24} {:>9}", "retries after 4xx", self.retried)?;
        }
        if self.relay_pauses > 0 {
            writeln!(out, "  {:<24} {:>9}", "relay pauses", self.relay_pauses)?;
        }
        if self.connections_refused > 0 {
            writeln!(
                out,
                "  {:<24} {:>9}",
                "connections refused", self.connections_refused
            )?;
        }
        if self.regrown > 0 {
            writeln!(out, "  {:<24} {:>9}", "pool grown back", self.regrown)?;
        }
        if let Some(elapsed) = self.elapsed {
            #[allow(clippy::cast_precision_loss)] // counts far below 2^52
            let rate = self.sent_now as f64 / elapsed.as_secs_f64().max(1e-3);
            if self.sent_now != self.count(State::Sent) || self.attempted == 0 {
                writeln!(
                    out,
                    "  {:<24} {:>9}",
                    "attempted in this run", self.attempted
                )?;
                writeln!(out, "  {:<24} {:>9}", "sent in this run", self.sent_now)?;
            }
            writeln!(
                out,
                "  {:<24} {:>9}",
                "elapsed",
                format!("{:.1} s", elapsed.as_secs_f64())
            )?;
            writeln!(
                out,
                "  {:<24} {:>9}",
                "sent per second",
                format!("{rate:.0}")
            )?;
        }
        for (domain, per_second) in &self.throttled {
            writeln!(
                out,
                "throttled: {} slowed to {per_second:.2}/s after a throttling reply",
                Shown(domain)
            )?;
        }
        for (domain, (until, deferred)) in &self.suspended {
            writeln!(
                out,
                "suspended: {} until {} (it kept throttling below `[rate] throttle_floor`): {deferred} recipients deferred until then",
                Shown(domain),
                humantime::format_rfc3339_seconds(*until)
            )?;
        }
        for (domain, (until, deferred)) in &self.capped {
            writeln!(
                out,
                "capped: {} reached its daily cap ([rate.per_domain_per_day]): {deferred} recipients deferred until {}",
                Shown(domain),
                humantime::format_rfc3339_seconds(*until)
            )?;
        }
        if let Some(reason) = &self.waiting {
            writeln!(out, "waiting: {reason}")?;
        }
        if !self.locales.is_empty() {
            writeln!(out, "{}", self.locale_line())?;
        }
        if !self.domains.is_empty() {
            let mut domains: Vec<_> = self.domains.iter().collect();
            domains.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let top: Vec<String> = domains
                .iter()
                .take(10)
                .map(|(d, n)| format!("{} {n}", Shown(d)))
                .collect();
            let more = domains.len().saturating_sub(10);
            let tail = if more > 0 {
                format!(" (+{more} more)")
            } else {
                String::new()
            };
            writeln!(out, "by domain: {}{tail}", top.join(", "))?;
        }
        for delivery in &self.notable {
            writeln!(
                out,
                "  line {} {} {}: {}",
                delivery.line,
                Shown(&delivery.recipient),
                delivery.state,
                Shown(&delivery.detail)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(state: State) -> Delivery {
        Delivery {
            line: 2,
            recipient: "a@example.com".into(),
            locale: "en".into(),
            state,
            attempts: 1,
            detail: "550 5.1.1 no such user".into(),
        }
    }

    #[test]
    fn exit_codes_follow_the_worst_outcome() {
        let mut summary = Summary::default();
        summary.record(delivery(State::Sent));
        assert_eq!(summary.exit(), Exit::Complete);
        summary.record(delivery(State::Failed));
        assert_eq!(summary.exit(), Exit::PermanentFailures);
        summary.record(delivery(State::Deferred));
        assert_eq!(summary.exit(), Exit::WorkRemaining);
        assert_eq!(summary.total(), 3);
    }

    #[test]
    fn the_summary_lists_counts_breakdowns_and_problems() {
        let mut summary = Summary::default();
        summary.record(delivery(State::Sent));
        summary.record(delivery(State::Failed));
        summary.add(State::Suppressed, 2);
        summary.count_message("fr", "example.com");
        let mut out = Vec::new();
        summary.print(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("4 recipients\n"), "{text}");
        assert!(
            text.contains("  suppressed                       2\n"),
            "{text}"
        );
        assert!(text.contains("by locale: fr 1\n"), "{text}");
        assert!(
            text.contains("line 2 a@example.com failed: 550 5.1.1 no such user"),
            "{text}"
        );
    }
}
