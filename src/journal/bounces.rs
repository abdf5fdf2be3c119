//! Bounces and complaints in the journal: one record per recipient and report, the returned
//! messages already read, and the class of every permanent refusal at send time.
//!
//! `mailer bounces` records a returned message in one transaction: its notices (`bounces`),
//! the recipients it settles (`sent` or `ambiguous` → `bounced`; → `complained`), and its
//! digest (`processed`), so that reading the same mail again changes nothing. The writer
//! records a 5xx refusal at `RCPT` or after the dot here too, classified the same way.

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

use super::{Journal, RowState};
use crate::bounce::{Action, Class, Enhanced, Severity, classify};
use crate::outcome::Reply;

/// Made when missing by any writer: a journal without them has recorded no bounce.
pub(super) const BOUNCES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bounces (
    id INTEGER PRIMARY KEY,
    -- The recipient's row (recipients.id) and its address.
    row INTEGER NOT NULL,
    address TEXT NOT NULL,
    -- failed, delayed or complaint.
    action TEXT NOT NULL,
    class TEXT NOT NULL,
    -- hard, soft, policy, complaint or unknown.
    severity TEXT NOT NULL,
    status TEXT,
    diagnostic TEXT,
    remote_mta TEXT,
    -- `smtp` for a refusal at send time, else the returned message's digest.
    source TEXT NOT NULL,
    -- How it was tied to the recipient: verp, message-id, final-recipient, text, or reply.
    matched_by TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS bounces_row ON bounces (row);
-- Every returned message recorded, by the SHA-256 of its bytes.
CREATE TABLE IF NOT EXISTS processed (
    digest TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    verdict TEXT NOT NULL,
    at INTEGER NOT NULL
);
";

/// A row a returned message may be about.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: i64,
    pub slot: String,
    pub address: String,
    pub message_id: Option<String>,
    pub state: Option<RowState>,
    pub last_attempt_at: Option<i64>,
}

/// One notice tied to a row, to record.
#[derive(Debug, Clone)]
pub struct Notice<'a> {
    pub row: i64,
    pub address: &'a str,
    pub action: Action,
    pub class: Class,
    pub severity: Severity,
    pub status: Option<&'a str>,
    pub diagnostic: Option<&'a str>,
    pub remote_mta: Option<&'a str>,
    pub matched_by: &'a str,
}

/// A row's latest bounce or complaint, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Latest {
    pub class: String,
    pub severity: String,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    pub at: i64,
}

/// How many recipients of a slot have bounced or complained, by class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassCount {
    pub class: String,
    pub severity: String,
    pub count: u64,
}

/// Records a 5xx refusal at send time, classified as a returned message would be (the
/// writer's transaction).
pub(super) fn record_refusal(
    conn: &Connection,
    row: i64,
    reply: &Reply,
    at: i64,
) -> rusqlite::Result<()> {
    if reply.code / 100 != 5 {
        return Ok(());
    }
    let enhanced = reply.enhanced.as_deref().and_then(Enhanced::parse);
    let class = classify::classify(Some(reply.code), enhanced, &reply.text);
    let severity = classify::severity(class, false);
    conn.prepare_cached(
        "INSERT INTO bounces (row, address, action, class, severity, status, diagnostic, source, matched_by, at)
         SELECT id, address, 'failed', ?2, ?3, ?4, ?5, 'smtp', 'reply', ?6 FROM recipients
         WHERE id = ?1 AND address IS NOT NULL",
    )?
    .execute(params![
        row,
        class.name(),
        severity.name(),
        reply.enhanced,
        format!("{} {}", reply.code, reply.text),
        at
    ])?;
    Ok(())
}

impl Journal {
    fn has_bounces(&self) -> rusqlite::Result<bool> {
        self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'bounces')",
            [],
            |r| r.get(0),
        )
    }

    /// Every row with an address, in every slot: what attribution looks among.
    pub fn bounce_candidates(&self) -> anyhow::Result<Vec<Candidate>> {
        let mut statement = self.conn.prepare(
            "SELECT id, slot, address, message_id, state, last_attempt_at FROM recipients
             WHERE address IS NOT NULL ORDER BY id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(Candidate {
                id: r.get(0)?,
                slot: r.get(1)?,
                address: r.get(2)?,
                message_id: r.get(3)?,
                state: RowState::parse(&r.get::<_, String>(4)?),
                last_attempt_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether the returned message of `digest` was recorded already.
    pub fn processed(&self, digest: &str) -> anyhow::Result<bool> {
        if !self.has_bounces()? {
            return Ok(false);
        }
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM processed WHERE digest = ?1",
                params![digest],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Records one returned message: its notices, the rows it settles, its digest. Gives the
    /// rows that changed state (id, new state), or `None` when it was recorded before.
    pub fn record_returned(
        &self,
        digest: &str,
        source: &str,
        verdict: &str,
        notices: &[Notice<'_>],
        at: i64,
    ) -> anyhow::Result<Option<Vec<(i64, RowState)>>> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| -> rusqlite::Result<Option<Vec<(i64, RowState)>>> {
            let inserted = self.conn.execute(
                "INSERT OR IGNORE INTO processed (digest, source, verdict, at) VALUES (?1, ?2, ?3, ?4)",
                params![digest, source, verdict, at],
            )?;
            if inserted == 0 {
                return Ok(None);
            }
            let mut moved = Vec::new();
            for notice in notices {
                self.conn.execute(
                    "INSERT INTO bounces (row, address, action, class, severity, status, diagnostic,
                         remote_mta, source, matched_by, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        notice.row,
                        notice.address,
                        notice.action.name(),
                        notice.class.name(),
                        notice.severity.name(),
                        notice.status,
                        notice.diagnostic,
                        notice.remote_mta,
                        digest,
                        notice.matched_by,
                        at
                    ],
                )?;
                // Only a message that may have been delivered can come back; a complaint
                // outranks a bounce. A delay settles nothing.
                let (state, from) = match notice.action {
                    Action::Failed => (RowState::Bounced, "('sent', 'ambiguous')"),
                    Action::Complaint => (RowState::Complained, "('sent', 'ambiguous', 'bounced')"),
                    Action::Delayed => continue,
                };
                let changed = self.conn.execute(
                    &format!(
                        "UPDATE recipients SET state = ?2, updated_at = ?3 WHERE id = ?1 AND state IN {from}"
                    ),
                    params![notice.row, state.name(), at],
                )?;
                if changed > 0 {
                    moved.push((notice.row, state));
                }
            }
            Ok(Some(moved))
        })();
        match result {
            Ok(moved) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(moved)
            }
            Err(error) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(error.into())
            }
        }
    }

    /// The addresses with a hard bounce or a complaint, in any slot, sorted — only where the
    /// bounce was tied to the recipient by something a stranger cannot forge: its VERP token,
    /// the Message-ID mailer gave its message, or the relay's own refusal at send time. A
    /// report that only names an address (Final-Recipient, a text bounce) is recorded, but
    /// anyone can send one, so it suppresses nobody.
    pub fn suppressible(&self) -> anyhow::Result<Vec<String>> {
        if !self.has_bounces()? {
            return Ok(Vec::new());
        }
        let mut statement = self.conn.prepare(
            "SELECT DISTINCT address FROM bounces WHERE severity IN ('hard', 'complaint')
             AND action IN ('failed', 'complaint') AND matched_by IN ('verp', 'message-id', 'reply')
             ORDER BY address",
        )?;
        let rows = statement.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The classes of the bounced, complained and failed rows of `slot` (each row by its
    /// latest record), most frequent first.
    pub fn bounce_classes(&self, slot: &str) -> anyhow::Result<Vec<ClassCount>> {
        if !self.has_bounces()? {
            return Ok(Vec::new());
        }
        let mut statement = self.conn.prepare(
            "SELECT b.class, b.severity, count(*) AS n FROM recipients r
             JOIN bounces b ON b.id = (SELECT max(id) FROM bounces WHERE row = r.id AND action != 'delayed')
             WHERE r.slot = ?1 AND r.state IN ('bounced', 'complained', 'failed')
             GROUP BY b.class, b.severity ORDER BY n DESC, b.class LIMIT 10",
        )?;
        let rows = statement.query_map(params![slot], |r| {
            Ok(ClassCount {
                class: r.get(0)?,
                severity: r.get(1)?,
                count: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The latest bounce or complaint (not delay) of each row of `slot` that has one, by line.
    pub fn latest_bounces(
        &self,
        slot: &str,
    ) -> anyhow::Result<std::collections::HashMap<u64, Latest>> {
        if !self.has_bounces()? {
            return Ok(std::collections::HashMap::new());
        }
        let mut statement = self.conn.prepare(
            "SELECT r.line, b.class, b.severity, b.status, b.diagnostic, b.at FROM recipients r
             JOIN bounces b ON b.id = (SELECT max(id) FROM bounces WHERE row = r.id AND action != 'delayed')
             WHERE r.slot = ?1",
        )?;
        let rows = statement.query_map(params![slot], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                Latest {
                    class: r.get(1)?,
                    severity: r.get(2)?,
                    status: r.get(3)?,
                    diagnostic: r.get(4)?,
                    at: r.get(5)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of slot '' in these states, ids 1, 2, …
    fn rows(journal: &Journal, states: &[(&str, &str)]) {
        for (line, (address, state)) in states.iter().enumerate() {
            journal
                .conn
                .execute(
                    "INSERT INTO recipients (slot, address, domain, line, state, created_at, updated_at)
                     VALUES ('', ?1, 'example.com', ?2, ?3, 0, 0)",
                    params![address, line + 2, state],
                )
                .unwrap();
        }
    }

    fn state(journal: &Journal, id: i64) -> String {
        journal
            .conn
            .query_row(
                "SELECT state FROM recipients WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .unwrap()
    }

    fn notice(row: i64, address: &str, action: Action, class: Class) -> Notice<'_> {
        Notice {
            row,
            address,
            action,
            class,
            severity: classify::severity(class, action == Action::Delayed),
            status: None,
            diagnostic: None,
            remote_mta: None,
            matched_by: "verp",
        }
    }

    #[test]
    fn a_returned_message_settles_only_what_may_have_been_delivered_and_only_once() {
        let (_dir, journal) = crate::journal::fixtures::journal();
        rows(
            &journal,
            &[
                ("ann@example.com", "sent"),
                ("bob@example.com", "ambiguous"),
                ("cat@example.com", "failed"),
                ("dan@example.com", "sent"),
                ("eve@example.com", "sent"),
            ],
        );
        let notices = [
            notice(
                1,
                "ann@example.com",
                Action::Failed,
                Class::InvalidRecipient,
            ),
            notice(2, "bob@example.com", Action::Failed, Class::QuotaIssues),
            notice(
                3,
                "cat@example.com",
                Action::Failed,
                Class::InvalidRecipient,
            ),
            notice(
                4,
                "dan@example.com",
                Action::Delayed,
                Class::TransientFailure,
            ),
        ];
        let moved = journal
            .record_returned("d1", "new/1", "attributed", &notices, 10)
            .unwrap();
        assert_eq!(
            moved,
            Some(vec![(1, RowState::Bounced), (2, RowState::Bounced)])
        );
        assert_eq!(
            [1, 2, 3, 4].map(|id| state(&journal, id)),
            ["bounced", "bounced", "failed", "sent"],
            "a failed row stays failed, a delay settles nothing"
        );
        assert!(journal.processed("d1").unwrap());
        assert_eq!(
            journal
                .record_returned("d1", "new/1", "attributed", &notices, 11)
                .unwrap(),
            None
        );
        let count: i64 = journal
            .conn
            .query_row("SELECT count(*) FROM bounces", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 4, "nothing recorded twice");
        // A complaint outranks a bounce.
        let complaint = [
            notice(1, "ann@example.com", Action::Complaint, Class::Complaint),
            notice(5, "eve@example.com", Action::Complaint, Class::Complaint),
        ];
        journal
            .record_returned("d2", "new/2", "attributed", &complaint, 12)
            .unwrap();
        assert_eq!(state(&journal, 1), "complained");
        assert_eq!(state(&journal, 5), "complained");
        // Dan's hard bounce only names his address (anyone can send such a report): it is
        // recorded, and suppresses nobody.
        let forged = [Notice {
            matched_by: "final-recipient",
            ..notice(
                4,
                "dan@example.com",
                Action::Failed,
                Class::InvalidRecipient,
            )
        }];
        journal
            .record_returned("d3", "new/3", "attributed", &forged, 13)
            .unwrap();
        assert_eq!(state(&journal, 4), "bounced");
        // Hard bounces and complaints only: not Bob's full mailbox, nor Dan's unverified one.
        assert_eq!(
            journal.suppressible().unwrap(),
            ["ann@example.com", "cat@example.com", "eve@example.com"]
        );
        let classes: Vec<(String, u64)> = journal
            .bounce_classes("")
            .unwrap()
            .into_iter()
            .map(|c| (c.class, c.count))
            .collect();
        assert_eq!(
            classes,
            [
                ("Complaint".to_owned(), 2),
                // Cat's, and Dan's unverified one.
                ("InvalidRecipient".to_owned(), 2),
                ("QuotaIssues".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn a_refusal_at_send_time_is_recorded_with_its_class_when_permanent() {
        let (_dir, journal) = crate::journal::fixtures::journal();
        rows(
            &journal,
            &[
                ("ann@example.com", "failed"),
                ("bob@example.com", "deferred"),
            ],
        );
        let gone = Reply::new(
            550,
            "5.1.1 <ann@example.com>: Recipient address rejected: User unknown",
        );
        record_refusal(&journal.conn, 1, &gone, 5).unwrap();
        record_refusal(&journal.conn, 2, &Reply::new(451, "4.7.1 try later"), 5).unwrap();
        let latest = journal.latest_bounces("").unwrap();
        assert_eq!(latest.len(), 1, "4xx is not recorded");
        let ann = &latest[&2];
        assert_eq!(
            (ann.class.as_str(), ann.severity.as_str()),
            ("InvalidRecipient", "hard")
        );
        assert_eq!(ann.status.as_deref(), Some("5.1.1"));
    }
}
