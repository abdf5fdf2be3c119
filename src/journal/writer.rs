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
use crate::dispatch::{Gate, Reply};
use crate::report::State;

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
}

/// The sending side, for the scheduler and workers. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    changes: mpsc::UnboundedSender<Change>,
}

/// The writer; [`Writer::run`] is its task.
pub struct Writer {
    conn: Connection,
    changes: mpsc::UnboundedReceiver<Change>,
    /// The journal's write-ahead log, synced by the flusher thread (full durability only).
    wal: Option<std::fs::File>,
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
                Some(
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
                )
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
            Recorder { changes },
        ))
    }

    /// Commits changes until every `Recorder` is dropped and everything sent is committed
    /// (and, for full durability, synced). On an error it refuses every waiting `in_flight`
    /// record and stops, so no message goes out without its record.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let (flush, flushed, flusher) = match self.wal.take() {
            Some(wal) => {
                let (flush, flushed, flusher) = start_flusher(wal)?;
                (Some(flush), Some(flushed), Some(flusher))
            }
            None => (None, None, None),
        };
        let result = self.commit_all(flush.as_ref(), flushed).await;
        drop(flush);
        // They end as soon as their channel closes (after their last sync, if any).
        for flusher in flusher.into_iter().flatten() {
            let _ = flusher.join();
        }
        result
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
                        // The last outcomes go to disk too, however the run ended.
                        if let Some(flush) = flush {
                            let _ = flush.send(commits);
                        }
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
                    let mut gates = false;
                    for change in group.drain(..) {
                        if let Change::InFlight { done, .. } = change {
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

/// Flusher threads: each syncs the write-ahead log whenever asked, once for however many
/// commits asked meanwhile, and says up to which commit the log is on disk. The fsyncs run
/// while the runtime goes on committing and sending. There are [`FLUSHERS`] of them, so a
/// commit that lands while one fsync is under way does not wait for it to end before its own
/// starts (the kernel merges fsyncs that overlap).
const FLUSHERS: usize = 3;

#[allow(clippy::type_complexity)]
fn start_flusher(
    wal: std::fs::File,
) -> anyhow::Result<(
    std::sync::mpsc::Sender<u64>,
    mpsc::UnboundedReceiver<Result<u64, String>>,
    Vec<std::thread::JoinHandle<()>>,
)> {
    let (flush, requests) = std::sync::mpsc::channel::<u64>();
    let requests = std::sync::Arc::new(std::sync::Mutex::new(requests));
    let wal = std::sync::Arc::new(wal);
    let (report, flushed) = mpsc::unbounded_channel();
    let mut threads = Vec::new();
    for n in 0..FLUSHERS {
        let (requests, wal, report) = (
            std::sync::Arc::clone(&requests),
            std::sync::Arc::clone(&wal),
            report.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("journal-sync-{n}"))
                .spawn(move || {
                    loop {
                        let upto = {
                            let Ok(requests) = requests.lock() else { break };
                            let Ok(mut upto) = requests.recv() else { break };
                            while let Ok(later) = requests.try_recv() {
                                upto = upto.max(later);
                            }
                            upto
                        };
                        let synced = wal.sync_data().map(|()| upto).map_err(|e| e.to_string());
                        let failed = synced.is_err();
                        if report.send(synced).is_err() || failed {
                            break;
                        }
                    }
                })?,
        );
    }
    Ok((flush, flushed, threads))
}

fn open(path: &Path, durability: Durability) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", durability.pragma())?;
    Ok(conn)
}

fn apply(conn: &Connection, group: &[Change]) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let mut in_flight = conn.prepare_cached(
            "UPDATE recipients SET state = 'in_flight', locale = ?2, message_id = ?3, content_hash = ?4,
                 first_attempt_at = coalesce(first_attempt_at, ?5), last_attempt_at = ?5, updated_at = ?5
             WHERE id = ?1",
        )?;
        let mut outcome = conn.prepare_cached(
            "UPDATE recipients SET state = ?2, attempts = ?3, reply_code = ?4, reply_enhanced = ?5,
                 reply_text = ?6, next_attempt_at = ?7, updated_at = ?8
             WHERE id = ?1",
        )?;
        let mut requeued = conn.prepare_cached(
            "UPDATE recipients SET state = 'pending', updated_at = ?2 WHERE id = ?1 AND state = 'in_flight'",
        )?;
        for change in group {
            match change {
                Change::InFlight {
                    id,
                    locale,
                    message_id,
                    content_hash,
                    at,
                    ..
                } => {
                    in_flight.execute(params![id, locale, message_id, content_hash, at])?;
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
                }
                Change::Requeued { id, at } => {
                    requeued.execute(params![id, at])?;
                }
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(error) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

impl Recorder {
    /// Records `id` as `in_flight`. The gate opens when that is durable; an error there means
    /// the journal cannot be written and the message must not be sent.
    #[must_use]
    pub fn in_flight(&self, id: i64, locale: &str, message_id: &str, bytes: &[u8]) -> Gate {
        use sha2::Digest as _;
        let content_hash = hex::encode(&sha2::Sha256::digest(bytes)[..16]);
        let (done, wait) = oneshot::channel();
        // A send to a stopped writer drops `done`, which the gate reads as a refusal.
        let _ = self.changes.send(Change::InFlight {
            id,
            locale: locale.to_owned(),
            message_id: message_id.to_owned(),
            content_hash,
            at: millis(SystemTime::now()),
            done,
        });
        Gate::new(wait)
    }

    /// Records an outcome (not waited for: a crash before it commits leaves the row
    /// `in_flight`, which the next run reports as ambiguous).
    pub fn outcome(
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
            at: millis(SystemTime::now()),
        });
    }

    /// Puts `id` back to `pending`: it was not sent after all.
    pub fn requeued(&self, id: i64) {
        let _ = self.changes.send(Change::Requeued {
            id,
            at: millis(SystemTime::now()),
        });
    }
}
