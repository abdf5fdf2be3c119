//! The journal: the only truth for resuming a campaign.
//!
//! An `SQLite` database (WAL) per campaign in the state folder, one row per recipient and
//! schedule slot, holding where that recipient is: `pending → in_flight → sent | deferred |
//! failed | ambiguous`, or `suppressed` / `invalid`. [`Journal::sync`] brings it in line with
//! the loaded list at the start of a run — a dead run's `in_flight` rows become `ambiguous`
//! then — and says who is due. During the run a single writer thread ([`writer`])
//! group-commits every change; a recipient's `in_flight` record is durable before its
//! `MAIL FROM` goes out. Halts (`mailer stop`, breakers) and the frozen inputs live here too.
//!
//! I/O at the edge: only this module talks SQL.

mod lock;
pub mod query;
pub mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};

use crate::recipients::Recipient;
use crate::report::State;
pub use lock::Lock;
pub use writer::{Recorder, Writer};

/// `PRAGMA application_id` of a mailer journal ("MLRJ").
const APPLICATION_ID: i64 = 0x4d4c_524a;
/// `PRAGMA user_version`: the schema below.
const SCHEMA_VERSION: i64 = 1;
/// The state a recipient has while its message may be on the wire.
pub const IN_FLIGHT: &str = "in_flight";

const SCHEMA: &str = "
CREATE TABLE campaign (
    id TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
-- One run of the campaign per schedule slot ('' without cron), with its frozen inputs.
CREATE TABLE runs (
    slot TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    inputs TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    -- When a run first listed the recipients (sync): until then the slot has no rows yet.
    listed_at INTEGER
);
CREATE TABLE recipients (
    id INTEGER PRIMARY KEY,
    slot TEXT NOT NULL,
    address TEXT,
    domain TEXT,
    line INTEGER NOT NULL,
    locale TEXT,
    message_id TEXT,
    content_hash TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reply_code INTEGER,
    reply_enhanced TEXT,
    reply_text TEXT,
    next_attempt_at INTEGER,
    created_at INTEGER NOT NULL,
    first_attempt_at INTEGER,
    last_attempt_at INTEGER,
    updated_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX recipients_address ON recipients (slot, address);
-- Stops and breaker trips; one without `cleared_at` halts every send.
CREATE TABLE halts (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    by TEXT NOT NULL,
    reason TEXT NOT NULL,
    cleared_at INTEGER,
    cleared_by TEXT
);
-- What happened to the campaign as a whole: runs, recoveries, accepted input changes.
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    slot TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

/// Milliseconds since the Unix epoch: how the journal stores time.
#[must_use]
pub fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The last attempt of all (ms), and each domain's last attempt.
pub type RecentAttempts = (Option<i64>, Vec<(String, i64)>);

/// How hard each commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous = FULL`: a commit survives a power cut. The default.
    Full,
    /// `synchronous = NORMAL`: survives a killed process, not a power cut. For benchmarks
    /// (`MAILER_JOURNAL_SYNC=normal`).
    Relaxed,
}

impl Durability {
    /// `MAILER_JOURNAL_SYNC=normal` relaxes it (benchmarks); anything else is full.
    #[must_use]
    pub fn from_env() -> Durability {
        match std::env::var("MAILER_JOURNAL_SYNC").as_deref() {
            Ok("normal") => Durability::Relaxed,
            _ => Durability::Full,
        }
    }

    fn pragma(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Relaxed => "NORMAL",
        }
    }
}

/// Where a campaign's journal and lock live.
#[derive(Debug, Clone)]
pub struct Place {
    pub journal: PathBuf,
    pub lock: PathBuf,
}

impl Place {
    /// `DIR/<campaign id>.journal` and `.lock`, where DIR is `state_dir` or, by default,
    /// `mailer-state` beside the campaign file.
    #[must_use]
    pub fn new(campaign_file: &Path, state_dir: Option<&Path>, campaign_id: &str) -> Place {
        let dir = state_dir.map_or_else(
            || {
                campaign_file
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join("mailer-state")
            },
            Path::to_path_buf,
        );
        Place {
            journal: dir.join(format!("{campaign_id}.journal")),
            lock: dir.join(format!("{campaign_id}.lock")),
        }
    }
}

/// An open journal.
pub struct Journal {
    conn: Connection,
    path: PathBuf,
}

/// A stop or breaker trip in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Halt {
    pub at: i64,
    pub by: String,
    pub reason: String,
}

/// A recipient due in this run: its journal row and the attempts earlier runs made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub attempts: u32,
}

/// What [`Journal::sync`] found.
#[derive(Debug, Default)]
pub struct Sync {
    /// Recipients to try in this run, by CSV line.
    pub due: HashMap<u64, Entry>,
    /// Recipients not due in this run, by state (the journal's counts minus `due`).
    pub settled: BTreeMap<State, usize>,
    /// Recipients a dead run left `in_flight`, now `ambiguous`: (line, address).
    pub recovered: Vec<(u64, String)>,
    /// Ambiguous recipients put back to `pending` by `[retry] on_ambiguous = "retry"`.
    pub retried_ambiguous: usize,
    /// When the earliest deferred recipient that is not due yet falls due (ms).
    pub next_due: Option<i64>,
}

/// The rows of the CSV this run sends to, or knows cannot be sent to.
pub struct Roster<'a> {
    /// Valid, unique, not suppressed, in file order.
    pub recipients: &'a [Recipient],
    pub suppressed: &'a [Recipient],
    /// Lines that cannot be sent (bad row, or a message that cannot be made), with why.
    pub invalid: &'a BTreeMap<u64, String>,
}

fn state_of(name: &str) -> Option<State> {
    State::ALL.into_iter().find(|s| s.name() == name)
}

impl Journal {
    /// Opens the journal at `path`, creating it when `create` (and its folder), and checks
    /// that it is an intact journal of `campaign`. A damaged or foreign file is an error and
    /// is left untouched.
    pub fn open(
        path: &Path,
        campaign: &str,
        create: bool,
        durability: Durability,
    ) -> anyhow::Result<Journal> {
        let exists = path.exists();
        if !exists && !create {
            anyhow::bail!(
                "no journal at `{}`: campaign `{campaign}` has never been sent from this state folder",
                path.display()
            );
        }
        if !exists && let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the state folder `{}`", dir.display()))?;
        }
        let damaged = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "the journal `{}` is damaged or not a mailer journal ({e}); it was left as it is — restore it from a backup, or move it aside to start the campaign's record over (everyone not in it would be sent again)",
                path.display()
            )
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| damaged(&e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| damaged(&e))?;
        let application_id: i64 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(|e| damaged(&e))?;
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .map_err(|e| damaged(&e))?;
        let journal = Journal {
            conn,
            path: path.to_owned(),
        };
        if application_id == 0 && tables == 0 {
            journal.create(campaign).map_err(|e| damaged(&e))?;
        } else if application_id != APPLICATION_ID {
            return Err(damaged(&"another program's database"));
        }
        journal.configure(durability).map_err(|e| damaged(&e))?;
        let version: i64 = journal
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| damaged(&e))?;
        if version != SCHEMA_VERSION {
            anyhow::bail!(
                "the journal `{}` has format {version}, this mailer reads format {SCHEMA_VERSION}; use the mailer version that wrote it",
                path.display()
            );
        }
        let check: String = journal
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| damaged(&e))?;
        if check != "ok" {
            return Err(damaged(&check));
        }
        let owner: Option<String> = journal
            .conn
            .query_row("SELECT id FROM campaign", [], |r| r.get(0))
            .optional()
            .map_err(|e| damaged(&e))?;
        match owner {
            Some(owner) if owner == campaign => Ok(journal),
            Some(owner) => anyhow::bail!(
                "the journal `{}` belongs to campaign `{owner}`, not `{campaign}`; give this campaign its own state folder or id",
                path.display()
            ),
            None => Err(damaged(&"it names no campaign")),
        }
    }

    /// Creates the schema and names the campaign in one transaction: a process killed
    /// half-way leaves an empty file (created again next time), never a journal without owner.
    fn create(&self, campaign: &str) -> rusqlite::Result<()> {
        self.conn.pragma_update(None, "journal_mode", "WAL")?;
        self.conn.execute_batch("BEGIN")?;
        let created = (|| {
            self.conn.execute_batch(&format!(
                "{SCHEMA} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
            ))?;
            self.conn.execute(
                "INSERT INTO campaign (id, created_at) VALUES (?1, ?2)",
                params![campaign, millis(SystemTime::now())],
            )?;
            self.conn.execute_batch("COMMIT")
        })();
        if created.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        created
    }

    fn configure(&self, durability: Durability) -> rusqlite::Result<()> {
        self.conn.pragma_update(None, "journal_mode", "WAL")?;
        self.conn
            .pragma_update(None, "synchronous", durability.pragma())?;
        Ok(())
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The halt in force, if any.
    pub fn active_halt(&self) -> anyhow::Result<Option<Halt>> {
        Ok(active_halt(&self.conn)?)
    }

    /// Records a halt (unless one is already in force) and an event.
    pub fn halt(&self, slot: &str, by: &str, reason: &str) -> anyhow::Result<()> {
        halt(&self.conn, slot, by, reason)?;
        Ok(())
    }

    /// Clears the halt in force; gives it back, or `None` when there was none.
    pub fn clear_halt(&self, by: &str) -> anyhow::Result<Option<Halt>> {
        let halt = self.active_halt()?;
        if halt.is_some() {
            let now = millis(SystemTime::now());
            self.conn.execute(
                "UPDATE halts SET cleared_at = ?1, cleared_by = ?2 WHERE cleared_at IS NULL",
                params![now, by],
            )?;
            self.event("", "resumed", &format!("halt cleared by {by}"))?;
        }
        Ok(halt)
    }

    /// Appends an event to the campaign's history.
    pub fn event(&self, slot: &str, kind: &str, detail: &str) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT INTO events (at, slot, kind, detail) VALUES (?1, ?2, ?3, ?4)",
            params![millis(SystemTime::now()), slot, kind, detail],
        )?;
        Ok(())
    }

    /// The inputs frozen for `slot` at its first run: name → hash.
    pub fn frozen_inputs(&self, slot: &str) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT inputs FROM runs WHERE slot = ?1",
                params![slot],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| serde_json::from_str(&t).context("the journal's frozen inputs are unreadable"))
            .transpose()
    }

    /// Freezes `inputs` for `slot` (first run), or replaces them and records the acceptance.
    pub fn freeze_inputs(
        &self,
        slot: &str,
        fingerprint: &str,
        inputs: &BTreeMap<String, String>,
        accepted_change: Option<&str>,
    ) -> anyhow::Result<()> {
        let text = serde_json::to_string(inputs)?;
        self.conn.execute(
            "INSERT INTO runs (slot, fingerprint, inputs, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (slot) DO UPDATE SET fingerprint = excluded.fingerprint, inputs = excluded.inputs",
            params![slot, fingerprint, text, millis(SystemTime::now())],
        )?;
        if let Some(changed) = accepted_change {
            self.event(
                slot,
                "inputs-accepted",
                &format!("changed inputs accepted (--accept-changed-inputs): {changed}; fingerprint now {fingerprint}"),
            )?;
        }
        Ok(())
    }

    /// The last attempt times of `slot` since `since` (ms): the latest of all, and each
    /// domain's latest — so limits can hold across a restart.
    pub fn recent_attempts(&self, since: i64) -> anyhow::Result<RecentAttempts> {
        let mut statement = self.conn.prepare(
            "SELECT domain, max(last_attempt_at) FROM recipients
             WHERE last_attempt_at >= ?1 AND domain IS NOT NULL GROUP BY domain",
        )?;
        let domains: Vec<(String, i64)> = statement
            .query_map(params![since], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let latest = domains.iter().map(|(_, at)| *at).max();
        Ok((latest, domains))
    }

    /// Brings the journal's rows for `slot` in line with `roster` and says who is due at
    /// `now` (ms). One transaction:
    ///
    /// 1. `in_flight` rows (a run died with them on the wire) become `ambiguous`;
    ///    with `retry_ambiguous`, every `ambiguous` row goes back to `pending`.
    /// 2. New addresses are added `pending`; suppressed ones and invalid rows are recorded
    ///    as such (unless already settled); addresses no longer on the list that were still
    ///    waiting become `suppressed`.
    /// 3. Due: `pending` rows, and `deferred` ones whose backoff is over.
    pub fn sync(
        &mut self,
        slot: &str,
        roster: &Roster<'_>,
        retry_ambiguous: bool,
        now: i64,
    ) -> anyhow::Result<Sync> {
        let tx = self.conn.transaction()?;
        let mut sync = Sync::default();
        {
            let mut stuck = tx.prepare(
                "SELECT line, coalesce(address, '') FROM recipients WHERE slot = ?1 AND state = 'in_flight'",
            )?;
            sync.recovered = stuck
                .query_map(params![slot], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?)))?
                .map(|row| row.map(|(line, address)| (u64::try_from(line).unwrap_or(0), address)))
                .collect::<Result<_, _>>()?;
        }
        tx.execute(
            "UPDATE recipients SET state = 'ambiguous', attempts = attempts + 1,
                 reply_code = NULL, reply_enhanced = NULL,
                 reply_text = 'outcome unknown: the run sending it stopped before the server answered',
                 updated_at = ?2
             WHERE slot = ?1 AND state = 'in_flight'",
            params![slot, now],
        )?;
        if !sync.recovered.is_empty() {
            let lines: Vec<String> = sync
                .recovered
                .iter()
                .map(|(line, address)| format!("line {line} <{address}>"))
                .collect();
            tx.execute(
                "INSERT INTO events (at, slot, kind, detail) VALUES (?1, ?2, 'recovered', ?3)",
                params![
                    now,
                    slot,
                    format!(
                        "in flight when the last run stopped, now ambiguous: {}",
                        lines.join(", ")
                    )
                ],
            )?;
        }
        if retry_ambiguous {
            sync.retried_ambiguous = tx.execute(
                "UPDATE recipients SET state = 'pending', updated_at = ?2
                 WHERE slot = ?1 AND state = 'ambiguous'",
                params![slot, now],
            )?;
        }
        tx.execute(
            "DELETE FROM recipients WHERE slot = ?1 AND state = 'invalid'",
            params![slot],
        )?;
        // address → (id, state, attempts, next attempt)
        let mut known: HashMap<Box<str>, (i64, String, u32, Option<i64>)> = HashMap::new();
        {
            let mut rows = tx.prepare(
                "SELECT id, address, state, attempts, next_attempt_at FROM recipients
                 WHERE slot = ?1 AND address IS NOT NULL",
            )?;
            let mut rows = rows.query(params![slot])?;
            while let Some(row) = rows.next()? {
                let address: String = row.get(1)?;
                known.insert(
                    address.into_boxed_str(),
                    (row.get(0)?, row.get(2)?, row.get(3)?, row.get(4)?),
                );
            }
        }
        let mut seen: HashSet<&str> = HashSet::with_capacity(roster.recipients.len());
        {
            let mut insert = tx.prepare(
                "INSERT INTO recipients (slot, address, domain, line, state, reply_text, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            )?;
            let mut update = tx.prepare(
                "UPDATE recipients SET state = ?2, reply_text = ?3, line = ?4, updated_at = ?5 WHERE id = ?1",
            )?;
            let settle = |state: State, sync: &mut Sync| {
                *sync.settled.entry(state).or_default() += 1;
            };
            for recipient in roster.recipients {
                let address = &*recipient.address.key;
                seen.insert(address);
                let line = i64::try_from(recipient.line)?;
                let invalid = roster.invalid.get(&recipient.line);
                match (known.get(address), invalid) {
                    (None, None) => {
                        insert.execute(params![
                            slot,
                            address,
                            recipient.address.domain(),
                            line,
                            "pending",
                            None::<String>,
                            now
                        ])?;
                        let id = tx.last_insert_rowid();
                        sync.due.insert(recipient.line, Entry { id, attempts: 0 });
                    }
                    (None, Some(why)) => {
                        insert.execute(params![
                            slot,
                            address,
                            recipient.address.domain(),
                            line,
                            "invalid",
                            why,
                            now
                        ])?;
                        settle(State::Invalid, &mut sync);
                    }
                    (Some((id, state, attempts, next)), invalid) => {
                        let waiting =
                            matches!(state.as_str(), "pending" | "deferred" | "suppressed");
                        if let (true, Some(why)) = (waiting, invalid) {
                            update.execute(params![id, "invalid", why, line, now])?;
                            settle(State::Invalid, &mut sync);
                            continue;
                        }
                        match state.as_str() {
                            "pending" | "suppressed" => {
                                if state == "suppressed" {
                                    update.execute(params![
                                        id,
                                        "pending",
                                        None::<String>,
                                        line,
                                        now
                                    ])?;
                                }
                                sync.due.insert(
                                    recipient.line,
                                    Entry {
                                        id: *id,
                                        attempts: *attempts,
                                    },
                                );
                            }
                            "deferred" if next.is_none_or(|n| n <= now) => {
                                sync.due.insert(
                                    recipient.line,
                                    Entry {
                                        id: *id,
                                        attempts: *attempts,
                                    },
                                );
                            }
                            "deferred" => {
                                sync.next_due = sync.next_due.min(*next).or(*next);
                                settle(State::Deferred, &mut sync);
                            }
                            other => settle(state_of(other).unwrap_or(State::Ambiguous), &mut sync),
                        }
                    }
                }
            }
            for recipient in roster.suppressed {
                let address = &*recipient.address.key;
                seen.insert(address);
                let line = i64::try_from(recipient.line)?;
                match known.get(address) {
                    None => {
                        insert.execute(params![
                            slot,
                            address,
                            recipient.address.domain(),
                            line,
                            "suppressed",
                            "on a suppression list",
                            now
                        ])?;
                        settle(State::Suppressed, &mut sync);
                    }
                    Some((id, state, _, _)) if matches!(state.as_str(), "pending" | "deferred") => {
                        update.execute(params![
                            id,
                            "suppressed",
                            "on a suppression list",
                            line,
                            now
                        ])?;
                        settle(State::Suppressed, &mut sync);
                    }
                    Some((_, state, _, _)) => {
                        settle(state_of(state).unwrap_or(State::Ambiguous), &mut sync);
                    }
                }
            }
            let listed: HashSet<u64> = roster.recipients.iter().map(|r| r.line).collect();
            for (line, why) in roster.invalid {
                if !listed.contains(line) {
                    insert.execute(params![
                        slot,
                        None::<String>,
                        None::<String>,
                        i64::try_from(*line)?,
                        "invalid",
                        why,
                        now
                    ])?;
                    settle(State::Invalid, &mut sync);
                }
            }
            for (address, (id, state, _, _)) in &known {
                if seen.contains(&**address) {
                    continue;
                }
                if matches!(state.as_str(), "pending" | "deferred") {
                    tx.execute(
                        "UPDATE recipients SET state = 'suppressed', reply_text = 'no longer in the recipient list', updated_at = ?2 WHERE id = ?1",
                        params![id, now],
                    )?;
                    settle(State::Suppressed, &mut sync);
                } else {
                    settle(state_of(state).unwrap_or(State::Ambiguous), &mut sync);
                }
            }
        }
        tx.execute(
            "UPDATE runs SET listed_at = coalesce(listed_at, ?2) WHERE slot = ?1",
            params![slot, now],
        )?;
        tx.commit()?;
        Ok(sync)
    }
}

fn active_halt(conn: &Connection) -> rusqlite::Result<Option<Halt>> {
    conn.query_row(
        "SELECT at, by, reason FROM halts WHERE cleared_at IS NULL ORDER BY id LIMIT 1",
        [],
        |r| {
            Ok(Halt {
                at: r.get(0)?,
                by: r.get(1)?,
                reason: r.get(2)?,
            })
        },
    )
    .optional()
}

fn halt(conn: &Connection, slot: &str, by: &str, reason: &str) -> rusqlite::Result<()> {
    if active_halt(conn)?.is_some() {
        return Ok(());
    }
    let now = millis(SystemTime::now());
    conn.execute(
        "INSERT INTO halts (at, by, reason) VALUES (?1, ?2, ?3)",
        params![now, by, reason],
    )?;
    conn.execute(
        "INSERT INTO events (at, slot, kind, detail) VALUES (?1, ?2, 'halted', ?3)",
        params![now, slot, format!("{by}: {reason}")],
    )?;
    Ok(())
}

/// Watches for a halt recorded by another process (`mailer stop`) while a run goes on:
/// polls the journal every `every` on its own connection and calls `on_halt` once. Returns
/// as soon as `done` is dropped or sent to.
pub fn watch_halts(
    path: &Path,
    every: std::time::Duration,
    done: &std::sync::mpsc::Receiver<()>,
    on_halt: impl FnOnce(Halt),
) -> anyhow::Result<()> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    loop {
        if let Some(halt) = active_halt(&conn)? {
            on_halt(halt);
            return Ok(());
        }
        match done.recv_timeout(every) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return Ok(()),
        }
    }
}
