//! Reading the journal for `mailer status` and `mailer report`.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use super::{Halt, IN_FLIGHT, Journal, active_halt};
use crate::report::State;

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
}

/// RFC 3339 in UTC, to the millisecond.
#[must_use]
pub fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
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

    /// Counts per state of `slot`: every state present, zeros included.
    pub fn counts(&self, slot: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut counts: BTreeMap<String, u64> = State::ALL
            .iter()
            .map(|s| (s.name().to_owned(), 0))
            .chain([(IN_FLIGHT.to_owned(), 0)])
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

    /// The status of `slot` (see [`Status`]).
    pub fn status(&self, campaign: &str, slot: &str) -> anyhow::Result<Status> {
        let counts = self.counts(slot)?;
        let total = counts.values().sum();
        let waiting = ["pending", "deferred", IN_FLIGHT]
            .iter()
            .map(|s| counts.get(*s).copied().unwrap_or(0))
            .sum::<u64>();
        let (first, last): (Option<i64>, Option<i64>) = self.conn.query_row(
            "SELECT min(first_attempt_at), max(last_attempt_at) FROM recipients WHERE slot = ?1",
            params![slot],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let rate = match last {
            Some(last) => {
                let (count, earliest): (u64, Option<i64>) = self.conn.query_row(
                    "SELECT count(*), min(last_attempt_at) FROM recipients
                     WHERE slot = ?1 AND last_attempt_at >= ?2",
                    params![slot, last - 60_000],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let span = (last - earliest.unwrap_or(last)).max(1000);
                #[allow(clippy::cast_precision_loss)]
                Some(count as f64 * 1000.0 / span as f64)
            }
            None => None,
        };
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let eta = rate
            .filter(|r| *r > 0.0 && waiting > 0)
            .map(|r| (waiting as f64 / r).ceil() as u64);
        let next_retry: Option<i64> = self.conn.query_row(
            "SELECT min(next_attempt_at) FROM recipients WHERE slot = ?1 AND state = 'deferred'",
            params![slot],
            |r| r.get(0),
        )?;
        let mut statement = self.conn.prepare(
            "SELECT reply_code, reply_enhanced, count(*) AS n FROM recipients
             WHERE slot = ?1 AND reply_code IS NOT NULL
             GROUP BY reply_code, reply_enhanced ORDER BY n DESC, reply_code LIMIT ?2",
        )?;
        let replies = statement
            .query_map(params![slot, REPLIES], |r| {
                Ok(ReplyCount {
                    code: r.get(0)?,
                    enhanced: r.get(1)?,
                    count: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
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
        let listed: bool = self
            .conn
            .query_row(
                "SELECT listed_at IS NOT NULL FROM runs WHERE slot = ?1",
                params![slot],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false);
        let halt = active_halt(&self.conn)?.map(|Halt { at, by, reason }| HaltView {
            at: time(at),
            by,
            reason,
        });
        Ok(Status {
            campaign: campaign.to_owned(),
            slot: (!slot.is_empty()).then(|| slot.to_owned()),
            total,
            listed,
            complete: listed && waiting == 0,
            counts,
            first_attempt_at: first.map(time),
            last_attempt_at: last.map(time),
            rate_per_second: rate,
            eta_seconds: eta,
            next_retry_at: next_retry.map(time),
            replies,
            domains,
            halt,
        })
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
        let mut rows = statement.query(params![slot])?;
        while let Some(r) = rows.next()? {
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
            })?;
        }
        Ok(())
    }
}
