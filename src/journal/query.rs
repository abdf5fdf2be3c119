//! Reading the journal for `mailer status` and `mailer report`.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use super::{Halt, Journal, RowState, active_halt};

/// Recipients, attempts and outcomes of one run (slot) of a campaign.
#[derive(Debug, Serialize)]
pub struct Status {
    pub campaign: String,
    /// The schedule slot (RFC 3339), for cron campaigns.
    pub slot: Option<String>,
    pub total: u64,
    /// Every state, zeros included; they add up to `total`.
    pub counts: BTreeMap<String, u64>,
    /// A run has listed the recipients (before that the journal has no rows for the slot).
    pub listed: bool,
    /// Listed, and every recipient is in a terminal state.
    pub complete: bool,
    pub first_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
    /// Attempts per second over the last minute of sending.
    pub rate_per_second: Option<f64>,
    /// Seconds until everything waiting is attempted at that rate.
    pub eta_seconds: Option<u64>,
    /// The earliest a deferred recipient may be tried again.
    pub next_retry_at: Option<String>,
    /// The most frequent replies, most frequent first.
    pub replies: Vec<ReplyCount>,
    /// The largest recipient domains, largest first, with their counts per state.
    pub domains: Vec<DomainCounts>,
    /// The stop or breaker trip in force: every `send` exits 3 until `mailer resume`.
    pub halt: Option<HaltView>,
    /// The latest canary stage (its inputs' fingerprint), apart from the counts.
    pub canary: Vec<CanaryView>,
    /// Domains suspended for throttling now (campaign-wide), latest end first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub suspended: Vec<SuspendedView>,
    /// Why no message may start now, and until when: outside the send window, or the day's
    /// cap reached (filled in by `status`, which reads the campaign's calendar).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Domains whose daily cap is reached today, each with until when.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub capped: Vec<String>,
    /// The classes of the bounced, complained and failed recipients, most frequent first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bounce_classes: Vec<super::bounces::ClassCount>,
}

/// A domain suspended for throttling: nothing goes to it before `until`.
#[derive(Debug, Serialize)]
pub struct SuspendedView {
    pub domain: String,
    pub until: String,
}

/// One canary message of the latest canary stage.
#[derive(Debug, Serialize)]
pub struct CanaryView {
    pub fingerprint: String,
    pub address: String,
    pub line: u64,
    pub locale: String,
    pub state: String,
    pub at: String,
}

#[derive(Debug, Serialize)]
pub struct ReplyCount {
    pub code: u16,
    pub enhanced: Option<String>,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct DomainCounts {
    pub domain: String,
    pub total: u64,
    pub counts: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct HaltView {
    pub at: String,
    pub by: String,
    pub reason: String,
}

/// One recipient's row, for `mailer report`.
#[derive(Debug, Serialize)]
pub struct Row {
    pub line: u64,
    pub address: Option<String>,
    pub locale: Option<String>,
    pub state: String,
    pub attempts: u32,
    pub reply_code: Option<u16>,
    pub reply_enhanced: Option<String>,
    pub reply_text: Option<String>,
    pub message_id: Option<String>,
    pub content_hash: Option<String>,
    pub first_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
    pub updated_at: String,
    /// The latest bounce or complaint (`mailer bounces`), or the class of a 5xx refusal.
    pub bounce_class: Option<String>,
    pub bounce_severity: Option<String>,
    pub bounce_status: Option<String>,
    pub bounce_diagnostic: Option<String>,
    pub bounced_at: Option<String>,
}

/// RFC 3339 in UTC, to the millisecond.
#[must_use]
pub fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// Seconds until `waiting` recipients are attempted at `rate` per second.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn eta(rate: Option<f64>, waiting: u64) -> Option<u64> {
    rate.filter(|r| *r > 0.0 && waiting > 0)
        .map(|r| (waiting as f64 / r).ceil() as u64)
}

/// How many domains `status` lists.
const DOMAINS: usize = 10;
/// How many reply codes `status` lists.
const REPLIES: usize = 5;

impl Journal {
    /// The slot of the latest run, `''` without cron; `None` before the first run.
    pub fn latest_slot(&self) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT slot FROM runs ORDER BY created_at DESC, slot DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The latest schedule slot any run has started (frozen its inputs for), by time.
    pub fn latest_started_slot(&self) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT max(slot) FROM runs WHERE slot != ''", [], |r| {
                r.get(0)
            })?)
    }

    /// Counts per state of `slot`: every state present, zeros included.
    pub fn counts(&self, slot: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut counts: BTreeMap<String, u64> = RowState::ALL
            .iter()
            .map(|s| (s.name().to_owned(), 0))
            .collect();
        let mut statement = self
            .conn
            .prepare("SELECT state, count(*) FROM recipients WHERE slot = ?1 GROUP BY state")?;
        let rows =
            statement.query_map(params![slot], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
        for row in rows {
            let (state, count) = row?;
            counts.insert(state, count);
        }
        Ok(counts)
    }

    /// For a slot a run has listed where nobody is due at `now` (ms) — nobody `pending` or
    /// `in_flight`, no `deferred` recipient whose retry time has come — its counts per state;
    /// `None` when there is work to do (or the slot was never listed). With `retry_ambiguous`,
    /// an ambiguous recipient not sent again yet is work to do.
    pub fn idle(
        &self,
        slot: &str,
        now: i64,
        retry_ambiguous: bool,
    ) -> anyhow::Result<Option<BTreeMap<String, usize>>> {
        let (listed, busy): (bool, bool) = self.conn.query_row(
            "SELECT
                 EXISTS (SELECT 1 FROM runs WHERE slot = ?1 AND listed_at IS NOT NULL),
                 EXISTS (SELECT 1 FROM recipients WHERE slot = ?1 AND (state IN ('pending', 'in_flight')
                     OR (state = 'deferred' AND coalesce(next_attempt_at, 0) <= ?2)
                     OR (?3 AND state = 'ambiguous' AND resent = 0)))",
            params![slot, now, retry_ambiguous],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if !listed || busy {
            return Ok(None);
        }
        let counts = self.counts(slot)?;
        Ok(Some(
            counts
                .into_iter()
                .map(|(state, n)| (state, usize::try_from(n).unwrap_or(usize::MAX)))
                .collect(),
        ))
    }

    /// The status of `slot` (see [`Status`]).
    pub fn status(&self, campaign: &str, slot: &str) -> anyhow::Result<Status> {
        let counts = self.counts(slot)?;
        let total = counts.values().sum();
        let waiting = [RowState::Pending, RowState::Deferred, RowState::InFlight]
            .iter()
            .map(|s| counts.get(s.name()).copied().unwrap_or(0))
            .sum::<u64>();
        let (first, last) = self.attempt_span(slot)?;
        let rate = last.map(|last| self.rate(slot, last)).transpose()?;
        let next_retry = self.next_retry(slot)?;
        let replies = self.top_replies(slot)?;
        let domains = self.top_domains(slot)?;
        let listed = self.listed(slot)?;
        let halt = active_halt(&self.conn)?.map(|Halt { at, by, reason }| HaltView {
            at: time(at),
            by,
            reason,
        });
        let canary = self.latest_canary()?;
        let bounce_classes = self.bounce_classes(slot)?;
        let suspended = self
            .suspensions(crate::clock::now_millis())?
            .into_iter()
            .map(|s| SuspendedView {
                domain: s.domain,
                until: time(s.until),
            })
            .collect();
        Ok(Status {
            waiting: None,
            capped: Vec::new(),
            campaign: campaign.to_owned(),
            slot: (!slot.is_empty()).then(|| slot.to_owned()),
            total,
            listed,
            complete: listed && waiting == 0,
            counts,
            first_attempt_at: first.map(time),
            last_attempt_at: last.map(time),
            rate_per_second: rate,
            eta_seconds: eta(rate, waiting),
            next_retry_at: next_retry.map(time),
            replies,
            domains,
            halt,
            canary,
            suspended,
            bounce_classes,
        })
    }

    /// The first and the last attempt of `slot` (ms), if any.
    fn attempt_span(&self, slot: &str) -> rusqlite::Result<(Option<i64>, Option<i64>)> {
        self.conn.query_row(
            "SELECT min(first_attempt_at), max(last_attempt_at) FROM recipients WHERE slot = ?1",
            params![slot],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// Attempts per second in `slot` over the minute up to its `last` attempt (ms).
    fn rate(&self, slot: &str, last: i64) -> rusqlite::Result<f64> {
        let (count, earliest): (u64, Option<i64>) = self.conn.query_row(
            "SELECT count(*), min(last_attempt_at) FROM recipients
             WHERE slot = ?1 AND last_attempt_at >= ?2",
            params![slot, last - 60_000],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let span = (last - earliest.unwrap_or(last)).max(1000);
        #[allow(clippy::cast_precision_loss)]
        Ok(count as f64 * 1000.0 / span as f64)
    }

    /// The earliest a deferred recipient of `slot` may be tried again (ms).
    fn next_retry(&self, slot: &str) -> rusqlite::Result<Option<i64>> {
        self.conn.query_row(
            "SELECT min(next_attempt_at) FROM recipients WHERE slot = ?1 AND state = 'deferred'",
            params![slot],
            |r| r.get(0),
        )
    }

    /// The most frequent replies in `slot`, most frequent first.
    fn top_replies(&self, slot: &str) -> rusqlite::Result<Vec<ReplyCount>> {
        let mut statement = self.conn.prepare(
            "SELECT reply_code, reply_enhanced, count(*) AS n FROM recipients
             WHERE slot = ?1 AND reply_code IS NOT NULL
             GROUP BY reply_code, reply_enhanced ORDER BY n DESC, reply_code LIMIT ?2",
        )?;
        statement
            .query_map(params![slot, REPLIES], |r| {
                Ok(ReplyCount {
                    code: r.get(0)?,
                    enhanced: r.get(1)?,
                    count: r.get(2)?,
                })
            })?
            .collect()
    }

    /// The largest recipient domains of `slot`, largest first, with their counts per state.
    fn top_domains(&self, slot: &str) -> rusqlite::Result<Vec<DomainCounts>> {
        let mut statement = self.conn.prepare(
            "SELECT domain, state, count(*) FROM recipients
             WHERE slot = ?1 AND domain IN (
                 SELECT domain FROM recipients WHERE slot = ?1 AND domain IS NOT NULL
                 GROUP BY domain ORDER BY count(*) DESC, domain LIMIT ?2)
             GROUP BY domain, state",
        )?;
        let mut by_domain: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let rows = statement.query_map(params![slot, DOMAINS], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        for row in rows {
            let (domain, state, count) = row?;
            by_domain.entry(domain).or_default().insert(state, count);
        }
        let mut domains: Vec<DomainCounts> = by_domain
            .into_iter()
            .map(|(domain, counts)| DomainCounts {
                domain,
                total: counts.values().sum(),
                counts,
            })
            .collect();
        domains.sort_by(|a, b| b.total.cmp(&a.total).then(a.domain.cmp(&b.domain)));
        Ok(domains)
    }

    /// Whether a run has listed the recipients of `slot`.
    fn listed(&self, slot: &str) -> rusqlite::Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT listed_at IS NOT NULL FROM runs WHERE slot = ?1",
                params![slot],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// The messages of the latest canary stage, by address.
    fn latest_canary(&self) -> rusqlite::Result<Vec<CanaryView>> {
        let mut statement = self.conn.prepare(
            "SELECT fingerprint, address, line, locale, state, at FROM canary
             WHERE fingerprint = (SELECT fingerprint FROM canary ORDER BY at DESC LIMIT 1)
             ORDER BY address",
        )?;
        statement
            .query_map([], |r| {
                Ok(CanaryView {
                    fingerprint: r.get(0)?,
                    address: r.get(1)?,
                    line: r.get(2)?,
                    locale: r.get(3)?,
                    state: r.get(4)?,
                    at: time(r.get(5)?),
                })
            })?
            .collect()
    }

    /// Calls `each` with every row of `slot`, in CSV order.
    pub fn rows(
        &self,
        slot: &str,
        mut each: impl FnMut(Row) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut statement = self.conn.prepare(
            "SELECT line, address, locale, state, attempts, reply_code, reply_enhanced, reply_text,
                    message_id, content_hash, first_attempt_at, last_attempt_at, updated_at
             FROM recipients WHERE slot = ?1 ORDER BY line",
        )?;
        let mut bounces = self.latest_bounces(slot)?;
        let mut rows = statement.query(params![slot])?;
        while let Some(r) = rows.next()? {
            let bounce = bounces.remove(&r.get::<_, u64>(0)?);
            each(Row {
                line: r.get(0)?,
                address: r.get(1)?,
                locale: r.get(2)?,
                state: r.get(3)?,
                attempts: r.get(4)?,
                reply_code: r.get(5)?,
                reply_enhanced: r.get(6)?,
                reply_text: r.get(7)?,
                message_id: r.get(8)?,
                content_hash: r.get(9)?,
                first_attempt_at: r.get::<_, Option<i64>>(10)?.map(time),
                last_attempt_at: r.get::<_, Option<i64>>(11)?.map(time),
                updated_at: time(r.get(12)?),
                bounce_class: bounce.as_ref().map(|b| b.class.clone()),
                bounce_severity: bounce.as_ref().map(|b| b.severity.clone()),
                bounce_status: bounce.as_ref().and_then(|b| b.status.clone()),
                bounce_diagnostic: bounce.as_ref().and_then(|b| b.diagnostic.clone()),
                bounced_at: bounce.as_ref().map(|b| time(b.at)),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::dispatch::Record as _;
    use crate::journal::{Durability, Roster, Sync, millis};
    use crate::outcome::{Reply, State};

    use crate::journal::fixtures::{journal, record};

    const CSV: &str = "email\nann@example.com\nbob@example.com\ncat@example.org\n";

    fn sync(journal: &mut Journal) -> Sync {
        let list =
            crate::recipients::parse_reader(Path::new("r.csv"), CSV.as_bytes(), &HashSet::new());
        let roster = Roster {
            recipients: &list.recipients,
            suppressed: &list.suppressed,
            invalid: &BTreeMap::new(),
            locale: &|_: &crate::recipients::Recipient| "en".to_owned(),
        };
        journal
            .sync("", &roster, false, crate::clock::now_millis())
            .unwrap()
    }

    /// Records `state` for every due recipient of `sync` (after its `in_flight`).
    async fn settle(journal: &Journal, sync: &Sync, state: State, next: Option<SystemTime>) {
        record(journal, Durability::Relaxed, |recorder| {
            let mut gates = Vec::new();
            for entry in sync.due.values() {
                gates.push(recorder.in_flight(entry.id, "en", "<m@x>", b"x"));
                let reply = Reply {
                    code: if state == State::Sent { 250 } else { 451 },
                    enhanced: None,
                    text: String::new(),
                };
                recorder.outcome(entry.id, state, 1, Some(reply), "reply".to_owned(), next);
            }
            gates
        })
        .await;
    }

    #[test]
    fn times_are_rfc3339_utc_to_the_millisecond() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(1_234), "1970-01-01T00:00:01.234Z");
        assert_eq!(time(i64::MAX), i64::MAX.to_string());
    }

    #[test]
    fn the_latest_slot_is_the_last_one_frozen() {
        let (_dir, journal) = journal();
        assert_eq!(journal.latest_slot().unwrap(), None);
        journal
            .freeze_inputs("2030-01-01T00:00:00Z", "fp", &BTreeMap::new(), None)
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
        journal
            .freeze_inputs("2030-01-02T00:00:00Z", "fp", &BTreeMap::new(), None)
            .unwrap();
        assert_eq!(
            journal.latest_slot().unwrap().as_deref(),
            Some("2030-01-02T00:00:00Z")
        );
    }

    #[test]
    fn status_shows_the_latest_canary_stage_apart_from_the_counts() {
        let (_dir, mut journal) = journal();
        assert!(journal.status("c", "").unwrap().canary.is_empty());
        let outcome = crate::journal::fixtures::canary;
        journal
            .record_canary("old", &[outcome("a@x.org", "sent")])
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
        journal
            .record_canary(
                "new",
                &[outcome("b@x.org", "deferred"), outcome("c@x.org", "sent")],
            )
            .unwrap();
        let status = journal.status("c", "").unwrap();
        let canary: Vec<(&str, &str, &str)> = status
            .canary
            .iter()
            .map(|c| (c.fingerprint.as_str(), c.address.as_str(), c.state.as_str()))
            .collect();
        assert_eq!(
            canary,
            [("new", "b@x.org", "deferred"), ("new", "c@x.org", "sent")]
        );
        assert_eq!(status.total, 0, "canary messages are not recipients");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn status_is_complete_only_once_listed_and_all_sent() {
        let (_dir, mut journal) = journal();
        journal
            .freeze_inputs("", "fp", &BTreeMap::new(), None)
            .unwrap();
        let before = journal.status("c", "").unwrap();
        assert!(!before.listed && !before.complete, "{before:?}");
        assert_eq!(before.total, 0);
        assert_eq!(before.slot, None);
        assert!(before.counts.values().all(|n| *n == 0));
        assert!(
            before.counts.contains_key(RowState::InFlight.name())
                && before.counts.contains_key("sent")
        );
        assert_eq!(before.counts.len(), State::ALL.len() + 1);

        let first = sync(&mut journal);
        let listed = journal.status("c", "").unwrap();
        assert!(listed.listed && !listed.complete, "{listed:?}");
        assert_eq!((listed.total, listed.counts["pending"]), (3, 3));
        assert_eq!(listed.first_attempt_at, None);
        assert_eq!((listed.rate_per_second, listed.eta_seconds), (None, None));

        settle(&journal, &first, State::Sent, None).await;
        let again = sync(&mut journal);
        assert!(again.due.is_empty());
        let done = journal.status("c", "").unwrap();
        assert!(done.listed && done.complete, "{done:?}");
        assert_eq!((done.total, done.counts["sent"]), (3, 3));
        assert!(done.first_attempt_at.is_some() && done.last_attempt_at.is_some());
        assert!(done.rate_per_second.is_some_and(|r| r > 0.0));
        assert_eq!(done.eta_seconds, None);
        assert_eq!(done.replies.len(), 1);
        assert_eq!((done.replies[0].code, done.replies[0].count), (250, 3));
        let domains: Vec<(&str, u64)> = done
            .domains
            .iter()
            .map(|d| (d.domain.as_str(), d.total))
            .collect();
        assert_eq!(domains, [("example.com", 2), ("example.org", 1)]);
        assert_eq!(done.domains[0].counts["sent"], 2);
        assert!(done.halt.is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn deferred_recipients_keep_the_status_incomplete_with_a_next_retry() {
        let (_dir, mut journal) = journal();
        journal
            .freeze_inputs("", "fp", &BTreeMap::new(), None)
            .unwrap();
        let first = sync(&mut journal);
        let next = crate::clock::now() + Duration::from_secs(600);
        settle(&journal, &first, State::Deferred, Some(next)).await;
        let status = journal.status("c", "").unwrap();
        assert!(status.listed && !status.complete, "{status:?}");
        assert_eq!(status.counts["deferred"], 3);
        assert_eq!(status.next_retry_at, Some(time(millis(next))));
        assert!(status.eta_seconds.is_some_and(|s| s > 0), "{status:?}");
    }

    #[test]
    fn rows_come_in_csv_order_with_their_details() {
        let (_dir, mut journal) = journal();
        journal
            .freeze_inputs("", "fp", &BTreeMap::new(), None)
            .unwrap();
        sync(&mut journal);
        let mut seen = Vec::new();
        journal
            .rows("", |row| {
                seen.push((row.line, row.address.unwrap_or_default(), row.state));
                Ok(())
            })
            .unwrap();
        let expected: Vec<(u64, String, String)> = [
            (2, "ann@example.com"),
            (3, "bob@example.com"),
            (4, "cat@example.org"),
        ]
        .into_iter()
        .map(|(l, a)| (l, a.to_owned(), "pending".to_owned()))
        .collect();
        assert_eq!(seen, expected);
        // An error from the callback stops the walk and comes back.
        let mut calls = 0;
        let stopped = journal.rows("", |_| {
            calls += 1;
            anyhow::bail!("enough")
        });
        assert_eq!((calls, stopped.is_err()), (1, true));
    }
}
