//! The journal's single writer: one task, one connection, group commits.
//!
//! Everything a run records goes through one channel to this task. It takes whatever is
//! waiting (up to [`MAX_GROUP`] changes), applies it in one transaction, commits, and only
//! then opens the gates of the workers waiting on an `in_flight` record. So a recipient's
//! `in_flight` record is durable before its message body goes out.
//!
//! The task runs on the same thread as the scheduler and the workers, and commits there,
//! blocking that thread for the commit (the socket buffers keep filling meanwhile). A thread
//! of its own was measured slower on two cores: every record and every answer crossed
//! threads, and the context switches cost more than the commits. On one thread, all the
//! records the workers made since the last commit go in the next one, with no wake-ups.
//!
//! The channel is FIFO across senders: the scheduler records a connection's last outcome
//! before handing that connection its next message, whose `in_flight` record comes after.
//! So at most one row per connection is `in_flight` in any committed state of the journal.

use std::path::Path;
use std::time::SystemTime;

use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

use super::{Durability, Journal, millis};
use crate::dispatch::{Gate, Record};
use crate::outcome::{Reply, State};

/// Changes applied in one transaction at most.
const MAX_GROUP: usize = 4096;

/// One change to a recipient's row.
enum Change {
    /// About to be sent: durable before the sender is told to go on.
    InFlight {
        id: i64,
        locale: String,
        message_id: String,
        content_hash: String,
        at: i64,
        /// The same moment on the calendar's clock, for the daily caps.
        day_at: i64,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// What the server (or the transport) said.
    Outcome {
        id: i64,
        state: State,
        attempts: u32,
        reply: Option<Reply>,
        detail: String,
        next_attempt_at: Option<i64>,
        at: i64,
    },
    /// Not sent after all (the relay failed before the message): back to `pending`.
    Requeued { id: i64, at: i64 },
    /// A breaker tripped: recorded at once, so it holds even if the run dies before its end.
    Halt { slot: String, reason: String },
    /// A domain suspended for throttling: recorded with its pace, its deferred recipients
    /// (every slot) due no sooner than its end, and an event.
    Suspended {
        slot: String,
        domain: String,
        until: i64,
        per_second: f64,
        ceiling: f64,
        detail: String,
        at: i64,
    },
}

/// The sending side, for the scheduler and workers. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    changes: mpsc::UnboundedSender<Change>,
    /// The schedule slot of the run, for the halts it records.
    slot: std::sync::Arc<str>,
}

/// The writer; [`Writer::run`] is its task.
pub struct Writer {
    conn: Connection,
    changes: mpsc::UnboundedReceiver<Change>,
    /// The journal's write-ahead log, synced by the flusher thread (full durability only).
    wal: Option<std::sync::Arc<std::fs::File>>,
}

/// A gate waiting for the commit numbered `.0` to be on disk.
type Waiting = (u64, oneshot::Sender<Result<(), String>>);

impl Writer {
    /// A writer on its own connection to the journal at `journal`'s path.
    pub fn start(journal: &Journal, durability: Durability) -> anyhow::Result<(Writer, Recorder)> {
        // Commits on the runtime's thread are `synchronous = NORMAL` (no fsync); for full
        // durability the flusher syncs the log before the gates open.
        let conn = open(journal.path(), Durability::Relaxed)?;
        let wal = match durability {
            Durability::Full => {
                let mut name = journal.path().as_os_str().to_owned();
                name.push("-wal");
                Some(std::sync::Arc::new(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&name)
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "cannot open the journal's log `{}`: {e}",
                                name.display()
                            )
                        })?,
                ))
            }
            Durability::Relaxed => None,
        };
        let (changes, received) = mpsc::unbounded_channel();
        Ok((
            Writer {
                conn,
                changes: received,
                wal,
            },
            Recorder {
                changes,
                slot: "".into(),
            },
        ))
    }

    /// Commits changes until every `Recorder` is dropped and everything sent is committed
    /// (and, for full durability, synced). On an error it refuses every waiting `in_flight`
    /// record and stops, so no message goes out without its record.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let (flush, flushed, flusher) = match &self.wal {
            Some(wal) => {
                let (flush, flushed, flusher) = start_flusher(std::sync::Arc::clone(wal))?;
                (Some(flush), Some(flushed), Some(flusher))
            }
            None => (None, None, None),
        };
        let result = self.commit_all(flush.as_ref(), flushed).await;
        drop(flush);
        // It ends as soon as its channel closes.
        if let Some(flusher) = flusher {
            let _ = flusher.join();
        }
        result?;
        // The last outcomes go to disk too, however the run ended.
        if let Some(wal) = &self.wal {
            wal.sync_data()
                .map_err(|e| anyhow::anyhow!("cannot sync the journal to disk: {e}"))?;
        }
        Ok(())
    }

    async fn commit_all(
        &mut self,
        flush: Option<&std::sync::mpsc::Sender<u64>>,
        mut flushed: Option<mpsc::UnboundedReceiver<Result<u64, String>>>,
    ) -> anyhow::Result<()> {
        let mut group = Vec::with_capacity(MAX_GROUP);
        let mut waiting: std::collections::VecDeque<Waiting> = std::collections::VecDeque::new();
        let (mut commits, mut applied_changes, mut syncs) = (0_u64, 0_u64, 0_u64);
        let mut open = true;
        while open || !waiting.is_empty() {
            let synced = async {
                match flushed.as_mut() {
                    Some(flushed) => flushed.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                taken = self.changes.recv_many(&mut group, MAX_GROUP), if open => {
                    if taken == 0 {
                        open = false;
                        continue;
                    }
                    let applied = apply(&self.conn, &group).map_err(|e| e.to_string());
                    commits += 1;
                    applied_changes += group.len() as u64;
                    if let Err(error) = applied {
                        refuse(group.drain(..), waiting.drain(..), &error);
                        self.changes.close();
                        while let Ok(change) = self.changes.try_recv() {
                            refuse([change], [], &error);
                        }
                        anyhow::bail!("cannot write to the journal: {error}");
                    }
                    let stray = applied.unwrap_or_default();
                    let mut gates = false;
                    for change in group.drain(..) {
                        if let Change::InFlight { id, done, .. } = change {
                            if stray.contains(&id) {
                                // Not a recipient waiting to be sent: never let it go.
                                let _ = done.send(Err(format!(
                                    "journal row {id} is not a recipient waiting to be sent"
                                )));
                                continue;
                            }
                            gates = true;
                            match flush {
                                Some(_) => waiting.push_back((commits, done)),
                                None => {
                                    let _ = done.send(Ok(()));
                                }
                            }
                        }
                    }
                    if let (true, Some(flush)) = (gates, flush) {
                        let _ = flush.send(commits);
                    }
                }
                synced = synced => match synced {
                    Some(Ok(upto)) => {
                        syncs += 1;
                        while waiting.front().is_some_and(|(n, _)| *n <= upto) {
                            if let Some((_, done)) = waiting.pop_front() {
                                let _ = done.send(Ok(()));
                            }
                        }
                        if !open && waiting.is_empty() {
                            break;
                        }
                    }
                    Some(Err(error)) => {
                        refuse([], waiting.drain(..), &error);
                        self.changes.close();
                        while let Ok(change) = self.changes.try_recv() {
                            refuse([change], [], &error);
                        }
                        anyhow::bail!("cannot sync the journal to disk: {error}");
                    }
                    None => anyhow::bail!("the journal's flusher stopped unexpectedly"),
                },
            }
        }
        tracing::debug!(
            commits,
            syncs,
            changes = applied_changes,
            "journal writer done"
        );
        Ok(())
    }
}

/// Refuses the gates of `changes` and `waiting` with `error`.
fn refuse(
    changes: impl IntoIterator<Item = Change>,
    waiting: impl IntoIterator<Item = Waiting>,
    error: &str,
) {
    for change in changes {
        if let Change::InFlight { done, .. } = change {
            let _ = done.send(Err(error.to_owned()));
        }
    }
    for (_, done) in waiting {
        let _ = done.send(Err(error.to_owned()));
    }
}

/// The flusher: a thread that syncs the write-ahead log whenever asked, once for however many
/// commits asked meanwhile, and says up to which commit the log is on disk. The fsync runs
/// while the runtime goes on committing and sending. One thread, so that a failed fsync (which
/// the kernel reports to one caller only) can never be followed by a success that covers it.
#[allow(clippy::type_complexity)] // the three ends of one mechanism, used together once
fn start_flusher(
    wal: std::sync::Arc<std::fs::File>,
) -> anyhow::Result<(
    std::sync::mpsc::Sender<u64>,
    mpsc::UnboundedReceiver<Result<u64, String>>,
    std::thread::JoinHandle<()>,
)> {
    let (flush, requests) = std::sync::mpsc::channel::<u64>();
    let (report, flushed) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("journal-sync".into())
        .spawn(move || {
            while let Ok(mut upto) = requests.recv() {
                while let Ok(later) = requests.try_recv() {
                    upto = upto.max(later);
                }
                let synced = wal.sync_data().map(|()| upto).map_err(|e| e.to_string());
                let failed = synced.is_err();
                if report.send(synced).is_err() || failed {
                    break;
                }
            }
        })?;
    Ok((flush, flushed, thread))
}

fn open(path: &Path, durability: Durability) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", durability.pragma())?;
    Ok(conn)
}

/// Applies `group` in one transaction. Gives the `in_flight` records that matched no waiting
/// recipient (their gates must stay shut).
fn apply(conn: &Connection, group: &[Change]) -> rusqlite::Result<Vec<i64>> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let mut in_flight = conn.prepare_cached(
            "UPDATE recipients SET state = 'in_flight', locale = ?2, message_id = ?3, content_hash = ?4,
                 first_attempt_at = coalesce(first_attempt_at, ?5), last_attempt_at = ?5, updated_at = ?5
             WHERE id = ?1 AND state IN ('pending', 'deferred')",
        )?;
        let mut stray = Vec::new();
        let mut outcome = conn.prepare_cached(
            "UPDATE recipients SET state = ?2, attempts = ?3, reply_code = ?4, reply_enhanced = ?5,
                 reply_text = ?6, next_attempt_at = ?7, updated_at = ?8
             WHERE id = ?1",
        )?;
        let mut requeued = conn.prepare_cached(
            "UPDATE recipients SET state = 'pending', updated_at = ?2 WHERE id = ?1 AND state = 'in_flight'",
        )?;
        let mut attempt = conn.prepare_cached(
            "INSERT INTO attempts (recipient, domain, at) SELECT id, domain, ?2 FROM recipients
             WHERE id = ?1 AND domain IS NOT NULL",
        )?;
        let mut not_taken = conn.prepare_cached(
            "DELETE FROM attempts WHERE id = (SELECT max(id) FROM attempts WHERE recipient = ?1)",
        )?;
        for change in group {
            match change {
                Change::InFlight {
                    id,
                    locale,
                    message_id,
                    content_hash,
                    at,
                    day_at,
                    ..
                } => {
                    if in_flight.execute(params![id, locale, message_id, content_hash, at])? == 0 {
                        stray.push(*id);
                    } else {
                        attempt.execute(params![id, day_at])?;
                    }
                }
                Change::Outcome {
                    id,
                    state,
                    attempts,
                    reply,
                    detail,
                    next_attempt_at,
                    at,
                } => {
                    outcome.execute(params![
                        id,
                        state.name(),
                        attempts,
                        reply.as_ref().map(|r| r.code),
                        reply.as_ref().and_then(|r| r.enhanced.clone()),
                        detail,
                        next_attempt_at,
                        at
                    ])?;
                    if let (State::Failed, Some(reply)) = (state, reply) {
                        super::bounces::record_refusal(conn, *id, reply, *at)?;
                    }
                }
                Change::Requeued { id, at } => {
                    if requeued.execute(params![id, at])? > 0 {
                        not_taken.execute(params![id])?;
                    }
                }
                Change::Halt { slot, reason } => {
                    super::halt(conn, slot, "breaker", reason)?;
                }
                Change::Suspended {
                    slot,
                    domain,
                    until,
                    per_second,
                    ceiling,
                    detail,
                    at,
                } => {
                    conn.execute(
                        "INSERT INTO suspensions (domain, until, per_second, ceiling, detail, at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (domain) DO UPDATE SET until = ?2, per_second = ?3,
                             ceiling = ?4, detail = ?5, at = ?6",
                        params![domain, until, per_second, ceiling, detail, at],
                    )?;
                    conn.execute(
                        "UPDATE recipients SET next_attempt_at = max(coalesce(next_attempt_at, 0), ?2)
                         WHERE domain = ?1 AND state = 'deferred'",
                        params![domain, until],
                    )?;
                    conn.execute(
                        "INSERT INTO events (at, slot, kind, detail) VALUES (?1, ?2, 'suspended', ?3)",
                        params![at, slot, detail],
                    )?;
                }
            }
        }
        Ok(stray)
    })();
    match result {
        Ok(stray) => conn.execute_batch("COMMIT").map(|()| stray),
        Err(error) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

impl Recorder {
    /// The same recorder, recording halts for schedule slot `slot`.
    #[must_use]
    pub fn with_slot(mut self, slot: &str) -> Recorder {
        self.slot = slot.into();
        self
    }
}

/// How dispatch records: see [`Record`] for what each call promises.
impl Record for Recorder {
    fn in_flight(&self, id: i64, locale: &str, message_id: &str, bytes: &[u8]) -> Gate {
        let content_hash =
            hex::encode(&ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()[..16]);
        let (done, wait) = oneshot::channel();
        // A send to a stopped writer drops `done`, which the gate reads as a refusal.
        let _ = self.changes.send(Change::InFlight {
            id,
            locale: locale.to_owned(),
            message_id: message_id.to_owned(),
            content_hash,
            at: crate::clock::now_millis(),
            day_at: crate::clock::calendar_millis(),
            done,
        });
        Gate::sent(wait)
    }

    fn outcome(
        &self,
        id: i64,
        state: State,
        attempts: u32,
        reply: Option<Reply>,
        detail: String,
        next_attempt_at: Option<SystemTime>,
    ) {
        let _ = self.changes.send(Change::Outcome {
            id,
            state,
            attempts,
            reply,
            detail,
            next_attempt_at: next_attempt_at.map(millis),
            at: crate::clock::now_millis(),
        });
    }

    /// No-op when a halt is in force already.
    fn halt(&self, reason: &str) {
        let _ = self.changes.send(Change::Halt {
            slot: self.slot.to_string(),
            reason: reason.to_owned(),
        });
    }

    fn suspended(
        &self,
        domain: &str,
        until: SystemTime,
        per_second: f64,
        ceiling: f64,
        detail: &str,
    ) {
        let _ = self.changes.send(Change::Suspended {
            slot: self.slot.to_string(),
            domain: domain.to_owned(),
            until: millis(until),
            per_second,
            ceiling,
            detail: detail.to_owned(),
            at: crate::clock::now_millis(),
        });
    }

    fn requeued(&self, id: i64) {
        let _ = self.changes.send(Change::Requeued {
            id,
            at: crate::clock::now_millis(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::time::Duration;

    use super::*;
    use crate::dispatch::Entry;
    use crate::dispatch::Refusal;
    use crate::journal::Roster;

    use crate::journal::fixtures::MESSAGE;

    /// A journal of campaign `c` listing `count` recipients (lines 2…), and their entries.
    fn journal(durability: Durability, count: usize) -> (tempfile::TempDir, Journal, Vec<Entry>) {
        let dir = tempfile::tempdir().unwrap();
        let mut journal =
            Journal::open(&dir.path().join("c.journal"), "c", true, durability).unwrap();
        journal
            .freeze_inputs("", "fp", &BTreeMap::new(), None)
            .unwrap();
        let csv: String = std::iter::once("email\n".to_owned())
            .chain((0..count).map(|n| format!("r{n}@example.com\n")))
            .collect();
        let list =
            crate::recipients::parse_reader(Path::new("r.csv"), csv.as_bytes(), &HashSet::new());
        assert_eq!(list.recipients.len(), count);
        let roster = Roster {
            recipients: &list.recipients,
            suppressed: &list.suppressed,
            invalid: &BTreeMap::new(),
            locale: &|_: &crate::recipients::Recipient| "en".to_owned(),
        };
        let sync = journal
            .sync("", &roster, false, crate::clock::now_millis())
            .unwrap();
        let entries = (0..count as u64).map(|n| sync.due[&(n + 2)]).collect();
        (dir, journal, entries)
    }

    /// (state, locale, message id, content hash, first attempt) of row `id`, read on a
    /// connection of its own.
    #[allow(clippy::type_complexity)]
    fn row(
        path: &Path,
        id: i64,
    ) -> (
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
    ) {
        Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT state, locale, message_id, content_hash, first_attempt_at
                 FROM recipients WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap()
    }

    fn states(path: &Path) -> BTreeMap<String, u64> {
        let conn = Connection::open(path).unwrap();
        let mut statement = conn
            .prepare("SELECT state, count(*) FROM recipients GROUP BY state")
            .unwrap();
        statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    const PATIENCE: Duration = Duration::from_secs(20);

    #[tokio::test(flavor = "current_thread")]
    async fn with_full_durability_a_gate_opens_on_a_record_other_connections_can_read() {
        let (_dir, journal, entries) = journal(Durability::Full, 2);
        let path = journal.path().to_owned();
        let (writer, recorder) = Writer::start(&journal, Durability::Full).unwrap();
        let running = tokio::spawn(writer.run());
        let before = crate::clock::now_millis();
        let mut gate = recorder.in_flight(entries[0].id, "de-CH", "<1@example.com>", b"body");
        tokio::time::timeout(PATIENCE, gate.pass(&MESSAGE))
            .await
            .expect("the gate opens")
            .unwrap();
        // Later calls pass at once.
        gate.pass(&MESSAGE).await.unwrap();

        let (state, locale, message_id, hash, first) = row(&path, entries[0].id);
        assert_eq!(state, "in_flight");
        assert_eq!(locale.as_deref(), Some("de-CH"));
        assert_eq!(message_id.as_deref(), Some("<1@example.com>"));
        let expected =
            hex::encode(&ring::digest::digest(&ring::digest::SHA256, b"body").as_ref()[..16]);
        assert_eq!(hash, Some(expected));
        assert!(first.is_some_and(|at| at >= before), "{first:?}");
        assert_eq!(row(&path, entries[1].id).0, "pending");

        recorder.outcome(
            entries[0].id,
            State::Sent,
            1,
            Some(Reply {
                code: 250,
                enhanced: Some("2.0.0".to_owned()),
                text: "queued".to_owned(),
            }),
            "250 2.0.0 queued".to_owned(),
            None,
        );
        drop(recorder);
        tokio::time::timeout(PATIENCE, running)
            .await
            .expect("the writer ends once its recorders are gone")
            .unwrap()
            .unwrap();
        let (state, ..) = row(&path, entries[0].id);
        assert_eq!(state, "sent");
        let (code, enhanced, text): (u16, Option<String>, String) = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT reply_code, reply_enhanced, reply_text FROM recipients WHERE id = ?1",
                [entries[0].id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (code, enhanced.as_deref(), text.as_str()),
            (250, Some("2.0.0"), "250 2.0.0 queued")
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_suspension_is_kept_with_its_pace_and_holds_the_domains_deferred_rows() {
        let (_dir, journal, entries) = journal(Durability::Relaxed, 3);
        let path = journal.path().to_owned();
        let (writer, recorder) = Writer::start(&journal, Durability::Relaxed).unwrap();
        let running = tokio::spawn(writer.run());
        let now = crate::clock::now();
        // Row 0 was deferred for a second; row 1 was sent; row 2 is pending.
        let deferred = |id| {
            recorder.outcome(
                id,
                State::Deferred,
                1,
                None,
                "451 later".to_owned(),
                Some(now + Duration::from_secs(1)),
            );
        };
        deferred(entries[0].id);
        recorder.outcome(entries[1].id, State::Sent, 1, None, "250".to_owned(), None);
        let until = now + Duration::from_secs(1800);
        recorder.suspended("example.com", until, 0.5, 4.0, "example.com suspended");
        // Suspended again later: the record is replaced.
        let later = until + Duration::from_secs(60);
        recorder.suspended(
            "example.com",
            later,
            0.25,
            4.0,
            "example.com suspended again",
        );
        drop(recorder);
        tokio::time::timeout(PATIENCE, running)
            .await
            .expect("the writer ends")
            .unwrap()
            .unwrap();
        let next = |id: i64| -> Option<i64> {
            Connection::open(&path)
                .unwrap()
                .query_row(
                    "SELECT next_attempt_at FROM recipients WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(next(entries[0].id), Some(millis(later)));
        assert_eq!(next(entries[1].id), None);
        assert_eq!(next(entries[2].id), None);
        let journal = Journal::open(&path, "c", false, Durability::Relaxed).unwrap();
        let suspensions = journal.suspensions(millis(now)).unwrap();
        assert_eq!(
            suspensions,
            [crate::journal::SuspendedDomain {
                domain: "example.com".to_owned(),
                until: millis(later),
                per_second: 0.25,
                ceiling: 4.0,
                detail: "example.com suspended again".to_owned(),
            }]
        );
        assert!(journal.suspensions(millis(later) + 1).unwrap().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_in_flight_record_counts_as_an_attempt_and_a_requeued_one_is_taken_back() {
        let (_dir, journal, entries) = journal(Durability::Relaxed, 3);
        let path = journal.path().to_owned();
        let (writer, recorder) = Writer::start(&journal, Durability::Relaxed).unwrap();
        let running = tokio::spawn(writer.run());
        for entry in &entries {
            let _ = recorder.in_flight(entry.id, "en", "m@example.com", &MESSAGE.bytes);
        }
        // Row 0 gets a 4xx and is tried again: two attempts. Row 2 never reached the relay.
        let first = entries[0].id;
        recorder.outcome(first, State::Deferred, 1, None, "451".to_owned(), None);
        let _ = recorder.in_flight(first, "en", "m@example.com", &MESSAGE.bytes);
        recorder.requeued(entries[2].id);
        drop(recorder);
        tokio::time::timeout(PATIENCE, running)
            .await
            .expect("the writer ends")
            .unwrap()
            .unwrap();
        let journal = Journal::open(&path, "c", false, Durability::Relaxed).unwrap();
        let attempted = journal.attempted(0, i64::MAX).unwrap();
        assert_eq!(attempted.total, 3);
        assert_eq!(attempted.domains["example.com"], 3);
        let first_at = journal.first_attempt().unwrap().expect("a first attempt");
        assert_eq!(
            journal
                .attempted(first_at + 3_600_000, i64::MAX)
                .unwrap()
                .total,
            0
        );
        drop(journal);
        // A journal from before the attempts were kept gets each recipient's last attempt.
        Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE attempts")
            .unwrap();
        let journal = Journal::open(&path, "c", false, Durability::Relaxed).unwrap();
        assert_eq!(journal.attempted(0, i64::MAX).unwrap().total, 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_writer_runs_until_every_recorder_is_dropped() {
        for durability in [Durability::Full, Durability::Relaxed] {
            let (_dir, journal, entries) = journal(durability, 2);
            let (writer, recorder) = Writer::start(&journal, durability).unwrap();
            let clone = recorder.clone();
            let running = tokio::spawn(writer.run());
            drop(recorder);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!running.is_finished(), "{durability:?}: a recorder is left");

            let mut gate = clone.in_flight(entries[1].id, "en", "<2@x>", b"x");
            tokio::time::timeout(PATIENCE, gate.pass(&MESSAGE))
                .await
                .expect("the gate opens")
                .unwrap();
            clone.outcome(
                entries[1].id,
                State::Failed,
                1,
                None,
                "550 no".to_owned(),
                None,
            );
            drop(clone);
            tokio::time::timeout(PATIENCE, running)
                .await
                .expect("the writer ends")
                .unwrap()
                .unwrap();
            // What was sent before the last recorder went is committed.
            assert_eq!(
                row(journal.path(), entries[1].id).0,
                "failed",
                "{durability:?}"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn many_gates_all_open_and_every_record_is_committed() {
        let (_dir, journal, entries) = journal(Durability::Full, 300);
        let (writer, recorder) = Writer::start(&journal, Durability::Full).unwrap();
        let running = tokio::spawn(writer.run());
        let mut gates = Vec::new();
        for (n, entry) in entries.iter().enumerate() {
            gates.push(recorder.in_flight(entry.id, "en", &format!("<{n}@x>"), b"x"));
            if n % 7 == 0 {
                // Let the writer take what is waiting: commits of every size.
                tokio::task::yield_now().await;
            }
        }
        for gate in &mut gates {
            tokio::time::timeout(PATIENCE, gate.pass(&MESSAGE))
                .await
                .expect("every gate opens")
                .unwrap();
        }
        assert_eq!(states(journal.path()).get("in_flight"), Some(&300));
        for entry in &entries[..100] {
            recorder.outcome(entry.id, State::Sent, 1, None, "250".to_owned(), None);
        }
        for entry in &entries[100..200] {
            recorder.requeued(entry.id);
        }
        drop(recorder);
        tokio::time::timeout(PATIENCE, running)
            .await
            .expect("the writer ends")
            .unwrap()
            .unwrap();
        let expected: BTreeMap<String, u64> = [("sent", 100), ("pending", 100), ("in_flight", 100)]
            .into_iter()
            .map(|(s, n)| (s.to_owned(), n))
            .collect();
        assert_eq!(states(journal.path()), expected);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_gate_is_refused_when_the_writer_is_gone() {
        let (_dir, journal, entries) = journal(Durability::Relaxed, 1);
        let (writer, recorder) = Writer::start(&journal, Durability::Relaxed).unwrap();
        drop(writer);
        let mut gate = recorder.in_flight(entries[0].id, "en", "<1@x>", b"x");
        match gate.pass(&MESSAGE).await {
            Err(Refusal::Unrecorded(why)) => assert!(why.contains("stopped"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(row(journal.path(), entries[0].id).0, "pending");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_commit_refuses_every_gate_and_stops_the_writer() {
        for durability in [Durability::Full, Durability::Relaxed] {
            let (_dir, journal, entries) = journal(durability, 2);
            let (writer, recorder) = Writer::start(&journal, durability).unwrap();
            Connection::open(journal.path())
                .unwrap()
                .execute_batch("DROP TABLE recipients")
                .unwrap();
            let mut first = recorder.in_flight(entries[0].id, "en", "<1@x>", b"x");
            let mut second = recorder.in_flight(entries[1].id, "en", "<2@x>", b"x");
            let ran = tokio::time::timeout(PATIENCE, writer.run())
                .await
                .expect("the writer stops");
            let error = format!("{:#}", ran.unwrap_err());
            assert!(
                error.contains("cannot write to the journal"),
                "{durability:?}: {error}"
            );
            for gate in [&mut first, &mut second] {
                assert!(
                    matches!(gate.pass(&MESSAGE).await, Err(Refusal::Unrecorded(_))),
                    "{durability:?}"
                );
            }
            // And nothing recorded later gets through.
            let mut late = recorder.in_flight(entries[0].id, "en", "<3@x>", b"x");
            assert!(matches!(
                late.pass(&MESSAGE).await,
                Err(Refusal::Unrecorded(_))
            ));
        }
    }

    /// The transport's path: a gate for the row, started right before `MAIL FROM`, passed
    /// right before the body. Passing must still wait for the record, and a refusal must
    /// still stop the body.
    #[tokio::test(flavor = "current_thread")]
    async fn a_journal_gate_started_before_mail_from_waits_for_its_record_at_the_body() {
        let (_dir, journal, entries) = journal(Durability::Full, 2);
        let path = journal.path().to_owned();
        let (writer, recorder) = Writer::start(&journal, Durability::Full).unwrap();

        // The writer is not running yet: nothing is recorded, so the gate must not open.
        let mut early = Gate::journal(std::sync::Arc::new(recorder.clone()), entries[0].id);
        early.start(&MESSAGE);
        let passed = tokio::time::timeout(Duration::from_millis(100), early.pass(&MESSAGE)).await;
        assert!(
            passed.is_err(),
            "the gate opened before the record was written: {passed:?}"
        );

        let mut gate = Gate::journal(std::sync::Arc::new(recorder.clone()), entries[1].id);
        gate.start(&MESSAGE);
        let running = tokio::spawn(writer.run());
        tokio::time::timeout(PATIENCE, gate.pass(&MESSAGE))
            .await
            .expect("the gate opens")
            .unwrap();
        let (state, locale, message_id, hash, _) = row(&path, entries[1].id);
        assert_eq!(state, "in_flight", "passed before its record was committed");
        assert_eq!(locale.as_deref(), Some("en"));
        assert_eq!(message_id.as_deref(), Some("x@example.org"));
        let expected = ring::digest::digest(&ring::digest::SHA256, b"x");
        assert_eq!(hash, Some(hex::encode(&expected.as_ref()[..16])));
        drop(recorder);
        tokio::time::timeout(PATIENCE, running)
            .await
            .expect("the writer ends")
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_journal_gate_started_on_a_stopped_writer_refuses_the_body() {
        let (_dir, journal, entries) = journal(Durability::Relaxed, 1);
        let (writer, recorder) = Writer::start(&journal, Durability::Relaxed).unwrap();
        drop(writer);
        let mut gate = Gate::journal(std::sync::Arc::new(recorder), entries[0].id);
        gate.start(&MESSAGE);
        let passed = gate.pass(&MESSAGE).await;
        assert!(
            matches!(passed, Err(Refusal::Unrecorded(_))),
            "the body would go out unrecorded: {passed:?}"
        );
        assert!(Gate::open().pass(&MESSAGE).await.is_ok());
    }
}
