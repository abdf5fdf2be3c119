//! The journal's single writer: one thread, one connection, group commits.
//!
//! Everything a run records goes through one channel to this thread. It takes whatever is
//! waiting (up to [`MAX_GROUP`] changes), applies it in one transaction, commits, and only
//! then answers the workers waiting on an `in_flight` record. So a recipient's `in_flight`
//! record is durable before its `MAIL FROM` goes out, and while one commit reaches the disk
//! the next group gathers: the journal does not cap throughput.
//!
//! The channel is FIFO across senders: the scheduler records a connection's last outcome
//! before handing that connection its next message, whose `in_flight` record comes after.
//! So at most one row per connection is `in_flight` in any committed state of the journal.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use rusqlite::{Connection, params};
use tokio::sync::oneshot;

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
    /// Everything before this is committed.
    Flush(oneshot::Sender<()>),
}

/// The sending side, for the scheduler and workers. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    changes: mpsc::Sender<Change>,
}

/// The writer thread; [`Writer::finish`] commits what is left and reports a failure.
pub struct Writer {
    thread: JoinHandle<Result<(), String>>,
}

impl Writer {
    /// Starts the writer on its own connection to the journal at `journal`'s path.
    pub fn start(journal: &Journal, durability: Durability) -> anyhow::Result<(Writer, Recorder)> {
        let conn = open(journal.path(), durability)?;
        let (changes, received) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || write(&conn, &received))?;
        Ok((Writer { thread }, Recorder { changes }))
    }

    /// Waits until every change sent is committed (all `Recorder`s must be dropped first).
    pub fn finish(self) -> anyhow::Result<()> {
        match self.thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => anyhow::bail!("cannot write to the journal: {error}"),
            Err(_) => anyhow::bail!("the journal writer stopped unexpectedly"),
        }
    }
}

fn open(path: &Path, durability: Durability) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", durability.pragma())?;
    Ok(conn)
}

/// The thread: groups, applies, commits, answers. On an error it answers every waiting
/// sender with it and stops, so no message goes out without its record.
fn write(conn: &Connection, changes: &mpsc::Receiver<Change>) -> Result<(), String> {
    let mut group = Vec::with_capacity(MAX_GROUP);
    let (mut commits, mut applied_changes) = (0_u64, 0_u64);
    while let Ok(first) = changes.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match changes.try_recv() {
                Ok(change) => group.push(change),
                Err(_) => break,
            }
        }
        let applied = apply(conn, &group).map_err(|e| e.to_string());
        commits += 1;
        applied_changes += group.len() as u64;
        for change in group.drain(..) {
            match change {
                Change::InFlight { done, .. } => {
                    let _ = done.send(applied.clone());
                }
                Change::Flush(done) => {
                    let _ = done.send(());
                }
                _ => {}
            }
        }
        if let Err(error) = applied {
            // Refuse everything still coming, so workers stop instead of sending blind.
            for change in changes {
                if let Change::InFlight { done, .. } = change {
                    let _ = done.send(Err(error.clone()));
                }
            }
            return Err(error);
        }
    }
    tracing::debug!(commits, changes = applied_changes, "journal writer done");
    Ok(())
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
                Change::Flush(_) => {}
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

    /// Waits until everything recorded so far is committed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.changes.send(Change::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}
