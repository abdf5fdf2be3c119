//! The journal: the only truth for resuming a campaign.
//!
//! An `SQLite` database (WAL) per campaign in the state folder, one row per recipient and
//! schedule slot, holding where that recipient is: `pending → in_flight → sent | deferred |
//! failed | ambiguous`, or `suppressed` / `invalid`. [`Journal::sync`] brings it in line with
//! the loaded list at the start of a run — a dead run's `in_flight` rows become `ambiguous`
//! then — and says who is due. During the run a single writer task ([`writer`])
//! group-commits every change; a recipient's `in_flight` record is durable before its
//! message body goes out. Halts (`mailer stop`, breakers) and the frozen inputs live here too.
//!
//! I/O at the edge: only this module talks SQL.

pub mod bounces;
mod lock;
mod place;
pub mod query;
pub mod review;
pub mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};

use crate::dispatch::Entry;
use crate::exit::{Exit, Failure};
use crate::outcome::State;
use crate::printable::Shown;
use crate::recipients::Recipient;
pub use lock::Lock;
pub use place::{Intent, Located, Place, locate, record_path};
pub use writer::{Recorder, Writer};

/// `PRAGMA application_id` of a mailer journal ("MLRJ").
const APPLICATION_ID: i64 = 0x4d4c_524a;
/// `PRAGMA user_version`: the schema below.
const SCHEMA_VERSION: i64 = 3;

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
    -- Sent again once by on_ambiguous = retry (never twice).
    resent INTEGER NOT NULL DEFAULT 0,
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

/// Format 3 added the review tables: a format-2 journal gets them on opening.
const REVIEW_SCHEMA: &str = "
-- Every plan made (`mailer plan`), by fingerprint: what an approval refers to.
CREATE TABLE IF NOT EXISTS plans (
    fingerprint TEXT PRIMARY KEY,
    inputs TEXT NOT NULL,
    plan TEXT NOT NULL,
    -- The suppressed keys the plan saw, one per line: a later send may take lists that only
    -- grew since.
    suppression TEXT NOT NULL,
    made_at INTEGER NOT NULL
);
-- The canary stage, per fingerprint of the inputs it was sent with; apart from recipients.
CREATE TABLE IF NOT EXISTS canary (
    fingerprint TEXT NOT NULL,
    address TEXT NOT NULL,
    line INTEGER NOT NULL,
    locale TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (fingerprint, address)
);
";

/// Domains suspended for throttling, campaign-wide (every slot): made when missing by any
/// writer, so that a format-3 journal without it is read as having none.
const SUSPENSIONS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS suspensions (
    domain TEXT PRIMARY KEY,
    -- Until when (ms): nothing is sent to the domain before.
    until INTEGER NOT NULL,
    -- The pace it had when suspended, and its normal pace (messages per second): a later run
    -- starts it at the first and eases back up to the second.
    per_second REAL NOT NULL,
    ceiling REAL NOT NULL,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL
);
";

/// Every message handed to the relay (its `in_flight` record), retries included, with when
/// on the calendar's clock (`clock::calendar_now`): what the daily caps and the warm-up count.
/// A message the relay failed before taking (put back to `pending`) is taken out again. Made
/// when missing by any writer, filled then with each recipient's last attempt.
const ATTEMPTS_SCHEMA: &str = "
CREATE TABLE attempts (
    id INTEGER PRIMARY KEY,
    recipient INTEGER NOT NULL,
    domain TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX attempts_at ON attempts (at);
INSERT INTO attempts (recipient, domain, at)
    SELECT id, domain, last_attempt_at FROM recipients
    WHERE last_attempt_at IS NOT NULL AND domain IS NOT NULL ORDER BY last_attempt_at;
";

pub use crate::dispatch::Attempted;

/// A domain suspended for throttling, as the journal has it.
#[derive(Debug, Clone, PartialEq)]
pub struct SuspendedDomain {
    pub domain: String,
    /// Until when (ms).
    pub until: i64,
    pub per_second: f64,
    pub ceiling: f64,
    pub detail: String,
}

pub use crate::clock::millis;

/// The last attempt of all (ms), and each domain's last attempt.
pub type RecentAttempts = (Option<i64>, Vec<(String, i64)>);

/// How hard each commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A commit survives a power cut before any gate opens: `synchronous = FULL` for the
    /// commands' own connections; for the run's writer, its write-ahead log is fdatasync'ed
    /// by a flusher thread. The default.
    Full,
    /// `synchronous = NORMAL`: survives a killed process, not a power cut
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

/// Names the journal at `path` in an error of its database, which `SQLite` reports without
/// saying which file: a full disk or a read-only file becomes "cannot read or write the
/// journal `…`", and what only a damaged file gives once it is open (a column that is no
/// longer there, text that is not UTF-8, a page that does not parse) becomes [`damaged`]
/// (both exit 74). Other errors pass as they are.
pub fn named(path: &Path) -> impl Fn(anyhow::Error) -> anyhow::Error + '_ {
    move |error| {
        let Some(cause) = error
            .chain()
            .find_map(|cause| cause.downcast_ref::<rusqlite::Error>())
        else {
            return error;
        };
        if is_damage(cause) {
            return damaged(path, &cause);
        }
        if error.chain().any(|c| c.downcast_ref::<Failure>().is_some()) {
            // Already a sentence of its own (`cannot write the journal …`).
            return error;
        }
        error.context(format!(
            "cannot read or write the journal `{}`",
            Shown(path.display())
        ))
    }
}

/// Whether a journal that opened and passed its checks gave `error` because its bytes are
/// damaged, rather than because its disk failed: our queries are fixed and were run against
/// this schema, so a missing column, text that is not UTF-8 or a value of the wrong type can
/// only come from the file.
fn is_damage(error: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    match error {
        rusqlite::Error::SqliteFailure(failure, _) => matches!(
            failure.code,
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase | ErrorCode::Unknown
        ),
        rusqlite::Error::SqlInputError { .. }
        | rusqlite::Error::Utf8Error(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::InvalidColumnName(..) => true,
        _ => false,
    }
}

/// The journal the record names is gone (exit 74): never started over.
fn missing(located: &Located, campaign: &str) -> anyhow::Result<()> {
    if located.recorded && !located.place.journal.exists() {
        return Err(Failure::new(
            Exit::IoError,
            format!(
                "the journal of campaign `{campaign}`, `{}`, is missing though `{}` records it: nothing was sent — restore it from a backup (with its -wal file); mailer does not start a new record while the old one is missing, because a new record would send everyone again (to send the whole campaign again on purpose, delete that record too)",
                located.place.journal.display(),
                located.record.display()
            ),
        )
        .into());
    }
    Ok(())
}

/// Creates the state folder `dir` if it is not there, private to its owner (0700) whatever
/// the umask. An existing folder is left as it is.
pub fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            Failure::new(
                Exit::IoError,
                format!("cannot create the state folder `{}`: {e}", dir.display()),
            )
            .into()
        })
}

/// Makes a new journal at `path` where no file is: built under a temporary name, then linked
/// into place only if nothing is there (so an existing file is never initialised over, even
/// by a race). The state folder is made private (0700), the journal 0600; `SQLite` gives its
/// `-wal` and `-shm` files the journal's permissions.
fn create_new(path: &Path, campaign: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let io = |what: &str, at: &Path, e: &dyn std::fmt::Display| {
        anyhow::Error::new(Failure::new(
            Exit::IoError,
            format!("cannot {what} `{}`: {e}", at.display()),
        ))
    };
    create_state_dir(dir)?;
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let temporary = dir.join(format!(".{name}.new-{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|e| io("create the journal", &temporary, &e))?;
    let built = (|| -> rusqlite::Result<()> {
        let conn = Connection::open_with_flags(
            &temporary,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let journal = Journal {
            conn,
            path: temporary.clone(),
            log_existed: false,
        };
        journal.create(campaign)?;
        // Closing checkpoints the write-ahead log into the file and removes it.
        journal.conn.close().map_err(|(_, e)| e)
    })();
    let linked = built
        .map_err(|e| unwritable(&temporary, &e))
        .and_then(|()| match std::fs::hard_link(&temporary, path) {
            // Another process made it first: theirs is opened and checked like any other.
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                Err(io("create the journal", path, &e))
            }
            _ => Ok(()),
        });
    let _ = std::fs::remove_file(&temporary);
    linked
}

/// Whether `error` is `SQLite` unable to set up the shared memory of a WAL reader (the folder
/// cannot be written).
fn cannot_share(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(failure, _))
                if matches!(failure.code, rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen)
        )
    }) || format!("{error:#}").contains("readonly database")
}

/// The write-ahead log of the journal at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Whether the journal at `path` has no write-ahead log to replay (none, or an empty one).
fn wal_is_empty(path: &Path) -> bool {
    std::fs::metadata(wal_path(path)).map_or(true, |m| m.len() == 0)
}

/// The journal at `path` opened as a file nobody changes (`SQLite`'s `immutable`): no locks,
/// no shared memory. Only for reading a journal with no write-ahead log.
fn open_immutable(path: &Path) -> anyhow::Result<Connection> {
    const PATH: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'?')
        .add(b'#')
        .add(b'%')
        .add(b'"');
    let encoded = percent_encoding::utf8_percent_encode(&path.to_string_lossy(), PATH).to_string();
    Connection::open_with_flags(
        format!("file:{encoded}?immutable=1"),
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| unreadable(path, &e))
}

/// A journal that could not be opened (exit 74).
fn unreadable(path: &Path, e: &rusqlite::Error) -> anyhow::Error {
    anyhow::Error::new(Failure::new(
        Exit::IoError,
        format!("cannot open the journal `{}`: {e}", path.display()),
    ))
}

/// A journal that could not be written: full disk, read-only, permissions (exit 74).
fn unwritable(path: &Path, e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Failure::new(
        Exit::IoError,
        format!("cannot write the journal `{}`: {e}", path.display()),
    ))
}

/// A file that is not an intact journal (exit 74: the journal cannot be read).
fn damaged(path: &Path, e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Failure::new(
        Exit::IoError,
        format!(
            "the journal `{}` is damaged or not a mailer journal ({}); it was left as it is and nothing more was sent — `mailer report` shows what it still holds if it opens, and a backup can replace it; moving it aside would start the campaign's record over, and send to everyone not in it again",
            Shown(path.display()),
            Shown(e)
        ),
    ))
}

/// An open journal.
pub struct Journal {
    conn: Connection,
    path: PathBuf,
    /// Whether the write-ahead log was there when this journal was opened for writing.
    log_existed: bool,
}

/// A stop or breaker trip in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Halt {
    pub at: i64,
    pub by: String,
    pub reason: String,
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
    /// The locale a recipient's message is made in, recorded with its row from the start so
    /// that `report` shows it for recipients still pending.
    pub locale: &'a dyn Fn(&Recipient) -> String,
}

/// Where a recipient's row stands, as the journal stores it (`recipients.state`): an outcome
/// [`State`] under the same name, or `in_flight` while its message may be on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    Pending,
    InFlight,
    Sent,
    Deferred,
    Failed,
    Ambiguous,
    Suppressed,
    Invalid,
    Bounced,
    Complained,
}

impl RowState {
    pub const ALL: [RowState; 10] = [
        RowState::Pending,
        RowState::InFlight,
        RowState::Sent,
        RowState::Deferred,
        RowState::Failed,
        RowState::Ambiguous,
        RowState::Suppressed,
        RowState::Invalid,
        RowState::Bounced,
        RowState::Complained,
    ];

    /// The name stored in the journal.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            RowState::Pending => "pending",
            RowState::InFlight => "in_flight",
            RowState::Sent => "sent",
            RowState::Deferred => "deferred",
            RowState::Failed => "failed",
            RowState::Ambiguous => "ambiguous",
            RowState::Suppressed => "suppressed",
            RowState::Invalid => "invalid",
            RowState::Bounced => "bounced",
            RowState::Complained => "complained",
        }
    }

    /// The state stored as `name`; `None` for a name no mailer writes.
    #[must_use]
    pub fn parse(name: &str) -> Option<RowState> {
        RowState::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The outcome a row counts as among the settled: `in_flight` as `ambiguous`, its outcome
    /// being unknown.
    #[must_use]
    pub fn counted_as(self) -> State {
        match self {
            RowState::Pending => State::Pending,
            RowState::InFlight | RowState::Ambiguous => State::Ambiguous,
            RowState::Sent => State::Sent,
            RowState::Deferred => State::Deferred,
            RowState::Failed => State::Failed,
            RowState::Suppressed => State::Suppressed,
            RowState::Invalid => State::Invalid,
            RowState::Bounced => State::Bounced,
            RowState::Complained => State::Complained,
        }
    }
}

impl From<State> for RowState {
    fn from(state: State) -> RowState {
        match state {
            State::Pending => RowState::Pending,
            State::Sent => RowState::Sent,
            State::Deferred => RowState::Deferred,
            State::Failed => RowState::Failed,
            State::Ambiguous => RowState::Ambiguous,
            State::Suppressed => RowState::Suppressed,
            State::Invalid => RowState::Invalid,
            State::Bounced => RowState::Bounced,
            State::Complained => RowState::Complained,
        }
    }
}

/// What `sync` reads of a row the journal already has for an address.
#[derive(Debug)]
struct KnownRow {
    id: i64,
    state: RowState,
    attempts: u32,
    next_attempt_at: Option<i64>,
    line: i64,
}

/// The rows of a slot that have an address, by address.
type Known = HashMap<Box<str>, KnownRow>;

impl Journal {
    /// Opens the journal at `path` for writing, creating it when `create` and no file is
    /// there, and checks that it is an intact journal of `campaign`. A journal is created only
    /// where no file exists: an existing file — empty, damaged, foreign, of another campaign or
    /// of a newer format — is refused and left as it is, never initialised over.
    pub fn open(
        path: &Path,
        campaign: &str,
        create: bool,
        durability: Durability,
    ) -> anyhow::Result<Journal> {
        if !path.exists() {
            if !create {
                anyhow::bail!(
                    "no journal at `{}`: campaign `{campaign}` has never been sent from this state folder",
                    path.display()
                );
            }
            create_new(path, campaign)?;
        }
        // Before connecting: SQLite makes the file when it opens the journal.
        let log_existed = wal_path(path).exists();
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| unreadable(path, &e))?;
        let journal = Journal {
            conn,
            path: path.to_owned(),
            log_existed,
        };
        // SQLite opens a file it may not write read-only, without a word.
        if journal.conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
            return Err(Failure::new(
                Exit::IoError,
                format!(
                    "the journal `{}` cannot be written (its permissions, or a read-only disk): nothing was sent — `mailer status` and `mailer report` can still read it",
                    path.display()
                ),
            )
            .into());
        }
        journal.verify(campaign, true)?;
        journal
            .configure(durability)
            .map_err(|e| unwritable(path, &e))?;
        journal
            .conn
            .execute_batch(SUSPENSIONS_SCHEMA)
            .map_err(|e| unwritable(path, &e))?;
        if !journal
            .has_table("attempts")
            .map_err(|e| unwritable(path, &e))?
        {
            journal
                .conn
                .execute_batch(&format!("BEGIN; {ATTEMPTS_SCHEMA} COMMIT;"))
                .map_err(|e| unwritable(path, &e))?;
        }
        journal
            .conn
            .execute_batch(bounces::BOUNCES_SCHEMA)
            .map_err(|e| unwritable(path, &e))?;
        Ok(journal)
    }

    /// Records a send's start, and makes sure that record is in the journal file itself, not
    /// only in its write-ahead log: a later open that finds the run unfinished and the log
    /// gone knows records were lost (see [`Journal::settle_unfinished_run`]).
    pub fn run_started(&self, slot: &str, detail: &str) -> anyhow::Result<()> {
        self.event(slot, "run", detail)?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Settles a send that stopped without recording its end (killed, power cut), when no send
    /// is running (the caller holds the campaign's lock). Its write-ahead log was there when
    /// this journal was opened: its records are all here, and the run is noted as ended. The
    /// log was gone: records of that run may be lost — the recipients it sent would be sent
    /// again — so the campaign is halted (exit 3 until `mailer resume`) for someone to look.
    pub fn settle_unfinished_run(&self) -> anyhow::Result<()> {
        let last: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT slot, detail FROM events WHERE kind = 'run' ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((slot, detail)) = last.filter(|(_, d)| d.starts_with("started")) else {
            return Ok(());
        };
        if self.log_existed {
            return self.event(
                &slot,
                "run",
                &format!("ended without recording its end (the run {detail}); its records were all in the journal"),
            );
        }
        let reason = format!(
            "the journal's write-ahead log `{}` was missing after a run that did not end cleanly (the run {detail}): records of that run may be lost, and the recipients it sent would be sent again — restore that file if you have it; otherwise compare `mailer report` with the relay's log, then `mailer resume`",
            wal_path(&self.path).display()
        );
        tracing::error!("{reason}");
        self.halt(&slot, "breaker", &reason)?;
        self.event(&slot, "run", "ended: its write-ahead log was lost")
    }

    /// Opens the journal at `path` only to read it (`status`, `report`): it may be read-only,
    /// and nothing in it changes.
    pub fn open_read_only(path: &Path, campaign: &str) -> anyhow::Result<Journal> {
        if !path.exists() {
            anyhow::bail!(
                "no journal at `{}`: campaign `{campaign}` has never been sent from this state folder",
                path.display()
            );
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| unreadable(path, &e))?;
        let journal = Journal {
            conn,
            path: path.to_owned(),
            log_existed: false,
        };
        match journal.verify(campaign, false) {
            Err(error) if cannot_share(&error) && wal_is_empty(path) => {
                // A read-only folder: SQLite cannot make the `-shm` file that readers of a
                // WAL journal share. With no write-ahead log to read, the file alone is the
                // whole journal, and it can be read as an unchanging one.
                let journal = Journal {
                    conn: open_immutable(path)?,
                    path: path.to_owned(),
                    log_existed: false,
                };
                journal.verify(campaign, false)?;
                Ok(journal)
            }
            verified => verified.map(|()| journal),
        }
    }

    /// Checks that this is an intact journal of `campaign` in this format (upgrading a
    /// format-2 one when `writable`).
    fn verify(&self, campaign: &str, writable: bool) -> anyhow::Result<()> {
        let path = &self.path;
        let damaged = |e: &dyn std::fmt::Display| damaged(path, e);
        self.conn
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| damaged(&e))?;
        let application_id: i64 = self
            .conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(|e| damaged(&e))?;
        let tables: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .map_err(|e| damaged(&e))?;
        if application_id == 0 && tables == 0 {
            return Err(Failure::new(
                Exit::IoError,
                format!(
                    "the journal `{}` is empty (emptied, or cut short): it was left as it is and nothing was sent — restore it from a backup; mailer never starts a record over an existing file, because a new record would send everyone again",
                    path.display()
                ),
            )
            .into());
        }
        if application_id != APPLICATION_ID {
            return Err(damaged(&"another program's database"));
        }
        let mut version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| damaged(&e))?;
        if version == 2 && writable {
            self.upgrade().map_err(|e| unwritable(path, &e))?;
            version = SCHEMA_VERSION;
        }
        if version != SCHEMA_VERSION {
            anyhow::bail!(
                "the journal `{}` has format {version}, this mailer reads format {SCHEMA_VERSION}; use the mailer version that wrote it",
                path.display()
            );
        }
        let check: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| damaged(&e))?;
        if check != "ok" {
            return Err(damaged(&check));
        }
        let owner: Option<String> = self
            .conn
            .query_row("SELECT id FROM campaign", [], |r| r.get(0))
            .optional()
            .map_err(|e| damaged(&e))?;
        match owner {
            Some(owner) if owner == campaign => Ok(()),
            Some(owner) => anyhow::bail!(
                "the journal `{}` belongs to campaign `{owner}`, not `{campaign}`; give this campaign its own state folder or id",
                path.display()
            ),
            None => Err(damaged(&"it names no campaign")),
        }
    }

    /// Opens the journal `located` names, for writing; creates it when `create` and it has
    /// never existed. A journal the record names that is gone is refused: starting over would
    /// send everyone again.
    pub fn open_located(
        located: &Located,
        campaign: &str,
        create: bool,
        durability: Durability,
    ) -> anyhow::Result<Journal> {
        missing(located, campaign)?;
        let journal = Journal::open(&located.place.journal, campaign, create, durability)?;
        located.record()?;
        Ok(journal)
    }

    /// [`Journal::settle_unfinished_run`] when no send is running — for the commands that
    /// write without holding the campaign's lock (`stop`, `resume`, `plan`).
    pub fn settle_if_idle(&self, place: &Place, campaign: &str) -> anyhow::Result<()> {
        match Lock::acquire(&place.lock, campaign) {
            Ok(_idle) => self.settle_unfinished_run(),
            Err(_) => Ok(()),
        }
    }

    /// Opens the journal `located` names, only to read it.
    pub fn open_located_read_only(located: &Located, campaign: &str) -> anyhow::Result<Journal> {
        missing(located, campaign)?;
        Journal::open_read_only(&located.place.journal, campaign)
    }

    /// Creates the schema and names the campaign in one transaction: a process killed
    /// half-way leaves an empty file (created again next time), never a journal without owner.
    fn create(&self, campaign: &str) -> rusqlite::Result<()> {
        self.conn.pragma_update(None, "journal_mode", "WAL")?;
        self.conn.execute_batch("BEGIN")?;
        let created = (|| {
            self.conn.execute_batch(&format!(
                "{SCHEMA} {REVIEW_SCHEMA} {SUSPENSIONS_SCHEMA} {ATTEMPTS_SCHEMA} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
            ))?;
            self.conn.execute(
                "INSERT INTO campaign (id, created_at) VALUES (?1, ?2)",
                params![campaign, crate::clock::now_millis()],
            )?;
            self.conn.execute_batch("COMMIT")
        })();
        if created.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        created
    }

    /// Format 2 → 3: adds the review tables, in one transaction.
    fn upgrade(&self) -> rusqlite::Result<()> {
        // Two processes may open the same old journal at once: the tables are created only
        // if missing, and the second one's upgrade changes nothing.
        let upgraded = self.conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {REVIEW_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        ));
        if upgraded.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        upgraded
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
            let now = crate::clock::now_millis();
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
            params![crate::clock::now_millis(), slot, kind, detail],
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
             ON CONFLICT (slot) DO UPDATE SET fingerprint = excluded.fingerprint, inputs = excluded.inputs,
                 -- Changed inputs: the slot is listed again (new rows, removed ones) before any
                 -- run may call it idle, even if the run that accepted them dies first.
                 listed_at = NULL",
            params![slot, fingerprint, text, crate::clock::now_millis()],
        )?;
        if let Some(changed) = accepted_change {
            self.event(
                slot,
                "inputs-accepted",
                &format!("changed inputs accepted: {changed}; fingerprint now {fingerprint}"),
            )?;
        }
        Ok(())
    }

    /// Whether any message of `slot` may have reached the relay: a row that was ever in
    /// flight or attempted, or has an outcome that only an attempt gives. Rows merely listed
    /// (`pending`, `suppressed`, `invalid`) do not count.
    pub fn slot_has_attempts(&self, slot: &str) -> anyhow::Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM recipients WHERE slot = ?1 AND (
                 first_attempt_at IS NOT NULL OR attempts > 0
                 OR state IN ('in_flight', 'sent', 'failed', 'deferred', 'ambiguous', 'bounced', 'complained')))",
            params![slot],
            |r| r.get(0),
        )?)
    }

    /// The last attempt times since `since` (ms), in any slot: the latest of all, and each
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

    fn has_table(&self, name: &str) -> rusqlite::Result<bool> {
        self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
            params![name],
            |r| r.get(0),
        )
    }

    /// The messages handed to the relay from `from` (ms, included) to `to` (excluded), in
    /// every slot: for the daily caps.
    pub fn attempted(&self, from: i64, to: i64) -> anyhow::Result<Attempted> {
        let mut attempted = Attempted::default();
        if !self.has_table("attempts")? {
            return Ok(attempted);
        }
        let mut statement = self.conn.prepare(
            "SELECT domain, count(*) FROM attempts WHERE at >= ?1 AND at < ?2 GROUP BY domain",
        )?;
        let rows = statement.query_map(params![from, to], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?))
        })?;
        for row in rows {
            let (domain, count) = row?;
            attempted.total = attempted.total.saturating_add(count);
            attempted.domains.insert(domain, count);
        }
        Ok(attempted)
    }

    /// The campaign's send windows and daily caps at `now` (the calendar's clock), with what
    /// this journal counts on `now`'s day; `None` when the campaign has neither.
    pub fn daily(
        &self,
        calendar: &crate::config::Calendar,
        caps: &crate::config::DailyCaps,
        now: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Option<crate::dispatch::Daily>> {
        if !caps.any() && calendar.windows.is_empty() {
            return Ok(None);
        }
        let (from, to) = calendar.day_bounds(now);
        let used = self.attempted(from.timestamp_millis(), to.timestamp_millis())?;
        let first = self
            .first_attempt()?
            .and_then(chrono::DateTime::from_timestamp_millis);
        Ok(Some(crate::dispatch::Daily::new(
            calendar.clone(),
            caps.clone(),
            now,
            first,
            used,
        )))
    }

    /// When the campaign's first message was handed to the relay (ms, calendar clock): day 0
    /// of the warm-up.
    pub fn first_attempt(&self) -> anyhow::Result<Option<i64>> {
        if !self.has_table("attempts")? {
            return Ok(None);
        }
        Ok(self
            .conn
            .query_row("SELECT min(at) FROM attempts", [], |r| r.get(0))?)
    }

    /// The domains suspended until `since` (ms) or later, latest first.
    pub fn suspensions(&self, since: i64) -> anyhow::Result<Vec<SuspendedDomain>> {
        let exists: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'suspensions')",
            [],
            |r| r.get(0),
        )?;
        if !exists {
            return Ok(Vec::new());
        }
        let mut statement = self.conn.prepare(
            "SELECT domain, until, per_second, ceiling, detail FROM suspensions
             WHERE until >= ?1 ORDER BY until DESC, domain",
        )?;
        let rows = statement
            .query_map(params![since], |r| {
                Ok(SuspendedDomain {
                    domain: r.get(0)?,
                    until: r.get(1)?,
                    per_second: r.get(2)?,
                    ceiling: r.get(3)?,
                    detail: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Schedule slots before `slot` with recipients of the given states, oldest first, with
    /// how many: for a cron campaign, the runs an earlier slot left unfinished.
    pub fn slots_with(
        &self,
        before: &str,
        states: &[RowState],
    ) -> anyhow::Result<Vec<(String, u64)>> {
        let names: Vec<&str> = states.iter().map(|s| s.name()).collect();
        let mut statement = self.conn.prepare(
            "SELECT slot, count(*) FROM recipients
             WHERE slot != '' AND slot < ?1 AND state IN (SELECT value FROM json_each(?2))
             GROUP BY slot ORDER BY slot",
        )?;
        let rows = statement
            .query_map(params![before, serde_json::to_string(&names)?], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Brings the journal's rows for `slot` in line with `roster` and says who is due at
    /// `now` (ms). One transaction:
    ///
    /// 1. `in_flight` rows (a run died with them on the wire) become `ambiguous`;
    ///    with `retry_ambiguous`, every `ambiguous` row not sent again yet goes back to
    ///    `pending`.
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
        let mut sync = Sync {
            recovered: recover_in_flight(&tx, slot, now)?,
            ..Sync::default()
        };
        if retry_ambiguous {
            sync.retried_ambiguous = retry_ambiguous_once(&tx, slot, now)?;
        }
        drop_invalid(&tx, slot)?;
        let known = known_rows(&tx, slot, &self.path)?;
        record_moves(&tx, roster, &known)?;
        let sync = match_roster(&tx, slot, now, roster, &known, sync)?;
        tx.execute(
            "UPDATE runs SET listed_at = coalesce(listed_at, ?2) WHERE slot = ?1",
            params![slot, now],
        )?;
        tx.commit()?;
        Ok(sync)
    }
}

/// The rows of `slot` a dead run left `in_flight` become `ambiguous` (one attempt more, no
/// reply), with an event naming them; gives them as (line, address).
fn recover_in_flight(tx: &Connection, slot: &str, now: i64) -> anyhow::Result<Vec<(u64, String)>> {
    let recovered: Vec<(u64, String)> = {
        let mut stuck = tx.prepare(
            "SELECT line, coalesce(address, '') FROM recipients WHERE slot = ?1 AND state = 'in_flight'",
        )?;
        stuck
            .query_map(params![slot], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?)))?
            .map(|row| row.map(|(line, address)| (u64::try_from(line).unwrap_or(0), address)))
            .collect::<Result<_, _>>()?
    };
    tx.execute(
        "UPDATE recipients SET state = 'ambiguous', attempts = attempts + 1,
             reply_code = NULL, reply_enhanced = NULL,
             reply_text = 'outcome unknown: the run sending it stopped before the server answered',
             updated_at = ?2
         WHERE slot = ?1 AND state = 'in_flight'",
        params![slot, now],
    )?;
    if !recovered.is_empty() {
        let lines: Vec<String> = recovered
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
    Ok(recovered)
}

/// `on_ambiguous = "retry"`: the `ambiguous` rows of `slot` go back to `pending`, once — a
/// recipient whose second try is ambiguous too stays ambiguous. Gives how many.
fn retry_ambiguous_once(tx: &Connection, slot: &str, now: i64) -> rusqlite::Result<usize> {
    tx.execute(
        "UPDATE recipients SET state = 'pending', resent = 1, updated_at = ?2
         WHERE slot = ?1 AND state = 'ambiguous' AND resent = 0",
        params![slot, now],
    )
}

/// Drops the `invalid` rows of `slot`: this run's roster records them again, or sends to a
/// row since fixed.
fn drop_invalid(tx: &Connection, slot: &str) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM recipients WHERE slot = ?1 AND state = 'invalid'",
        params![slot],
    )?;
    Ok(())
}

/// The rows of `slot` that have an address. A state no mailer writes is an error: the
/// journal at `path` is damaged or from another version.
fn known_rows(tx: &Connection, slot: &str, path: &Path) -> anyhow::Result<Known> {
    let mut known = Known::new();
    let mut statement = tx.prepare(
        "SELECT id, address, state, attempts, next_attempt_at, line FROM recipients
         WHERE slot = ?1 AND address IS NOT NULL",
    )?;
    let mut rows = statement.query(params![slot])?;
    while let Some(row) = rows.next()? {
        let address: String = row.get(1)?;
        let name: String = row.get(2)?;
        let Some(state) = RowState::parse(&name) else {
            anyhow::bail!(
                "the journal `{}` has a recipient in an unknown state `{name}`; it is damaged or from another version of mailer",
                path.display()
            );
        };
        let known_row = KnownRow {
            id: row.get(0)?,
            state,
            attempts: row.get(3)?,
            next_attempt_at: row.get(4)?,
            line: row.get(5)?,
        };
        known.insert(address.into_boxed_str(), known_row);
    }
    Ok(known)
}

/// A known recipient that moved in the list (changed inputs, accepted) is recorded at its
/// new line.
fn record_moves(tx: &Connection, roster: &Roster<'_>, known: &Known) -> anyhow::Result<()> {
    let mut moved = tx.prepare("UPDATE recipients SET line = ?2 WHERE id = ?1")?;
    for recipient in roster.recipients.iter().chain(roster.suppressed) {
        if let Some(row) = known.get(&*recipient.address.key)
            && u64::try_from(row.line).ok() != Some(recipient.line)
        {
            moved.execute(params![row.id, i64::try_from(recipient.line)?])?;
        }
    }
    Ok(())
}

/// Matches `roster` against the `known` rows of `slot`, in order: the recipients, the
/// suppressed, the bad rows without an address, then the known addresses no longer listed.
/// Adds to `sync` who is due and who is settled.
fn match_roster(
    tx: &Connection,
    slot: &str,
    now: i64,
    roster: &Roster<'_>,
    known: &Known,
    sync: Sync,
) -> anyhow::Result<Sync> {
    let mut listing = Listing::new(tx, slot, roster.locale, now, sync)?;
    for recipient in roster.recipients {
        let invalid = roster.invalid.get(&recipient.line).map(String::as_str);
        listing.recipient(recipient, known.get(&*recipient.address.key), invalid)?;
    }
    for recipient in roster.suppressed {
        listing.suppressed(recipient, known.get(&*recipient.address.key))?;
    }
    let listed: HashSet<u64> = roster.recipients.iter().map(|r| r.line).collect();
    for (line, why) in roster.invalid {
        if !listed.contains(line) {
            listing.invalid_line(*line, why)?;
        }
    }
    let seen: HashSet<&str> = roster
        .recipients
        .iter()
        .chain(roster.suppressed)
        .map(|r| &*r.address.key)
        .collect();
    for (address, row) in known {
        if !seen.contains(&**address) {
            listing.unlisted(row)?;
        }
    }
    Ok(listing.sync)
}

/// How `match_roster` writes the rows of a slot, and what it found so far.
struct Listing<'t> {
    conn: &'t Connection,
    insert: rusqlite::Statement<'t>,
    update: rusqlite::Statement<'t>,
    locale: &'t dyn Fn(&Recipient) -> String,
    slot: &'t str,
    now: i64,
    sync: Sync,
}

impl<'t> Listing<'t> {
    fn new(
        conn: &'t Connection,
        slot: &'t str,
        locale: &'t dyn Fn(&Recipient) -> String,
        now: i64,
        sync: Sync,
    ) -> rusqlite::Result<Self> {
        Ok(Listing {
            conn,
            insert: conn.prepare(
                "INSERT INTO recipients (slot, address, domain, line, locale, state, reply_text, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            )?,
            locale,
            update: conn.prepare(
                "UPDATE recipients SET state = ?2, reply_text = ?3, line = ?4, updated_at = ?5 WHERE id = ?1",
            )?,
            slot,
            now,
            sync,
        })
    }

    /// A recipient on the list: a new one is added `pending` and due, or `invalid` when its
    /// message cannot be made (`invalid` says why).
    fn recipient(
        &mut self,
        recipient: &Recipient,
        known: Option<&KnownRow>,
        invalid: Option<&str>,
    ) -> anyhow::Result<()> {
        let line = i64::try_from(recipient.line)?;
        match (known, invalid) {
            (None, None) => {
                let id = self.insert(Some(recipient), line, RowState::Pending, None)?;
                self.sync
                    .due
                    .insert(recipient.line, Entry { id, attempts: 0 });
            }
            (None, Some(why)) => {
                self.insert(Some(recipient), line, RowState::Invalid, Some(why))?;
                self.settle(State::Invalid);
            }
            (Some(row), invalid) => self.known_recipient(recipient.line, line, row, invalid)?,
        }
        Ok(())
    }

    /// A recipient on the list the journal knows (at CSV `line`; `at` for SQL): one still
    /// waiting whose message cannot be made becomes `invalid`; a `pending` one is due, and so
    /// is a `suppressed` one listed again (back to `pending`) and a `deferred` one whose
    /// backoff is over; any other is settled.
    fn known_recipient(
        &mut self,
        line: u64,
        at: i64,
        row: &KnownRow,
        invalid: Option<&str>,
    ) -> anyhow::Result<()> {
        let waiting = matches!(
            row.state,
            RowState::Pending | RowState::Deferred | RowState::Suppressed
        );
        if waiting && let Some(why) = invalid {
            self.update(row.id, RowState::Invalid, Some(why), at)?;
            self.settle(State::Invalid);
            return Ok(());
        }
        let due = Entry {
            id: row.id,
            attempts: row.attempts,
        };
        match row.state {
            RowState::Pending => {
                self.sync.due.insert(line, due);
            }
            RowState::Suppressed => {
                self.update(row.id, RowState::Pending, None, at)?;
                self.sync.due.insert(line, due);
            }
            RowState::Deferred if row.next_attempt_at.is_none_or(|n| n <= self.now) => {
                self.sync.due.insert(line, due);
            }
            RowState::Deferred => {
                let next = row.next_attempt_at;
                self.sync.next_due = self.sync.next_due.min(next).or(next);
                self.settle(State::Deferred);
            }
            other => self.settle(other.counted_as()),
        }
        Ok(())
    }

    /// A recipient on a suppression list: recorded `suppressed` unless it was settled.
    fn suppressed(
        &mut self,
        recipient: &Recipient,
        known: Option<&KnownRow>,
    ) -> anyhow::Result<()> {
        const WHY: &str = "on a suppression list";
        let line = i64::try_from(recipient.line)?;
        match known {
            None => {
                self.insert(Some(recipient), line, RowState::Suppressed, Some(WHY))?;
                self.settle(State::Suppressed);
            }
            Some(row) if matches!(row.state, RowState::Pending | RowState::Deferred) => {
                self.update(row.id, RowState::Suppressed, Some(WHY), line)?;
                self.settle(State::Suppressed);
            }
            Some(row) => self.settle(row.state.counted_as()),
        }
        Ok(())
    }

    /// A bad row without an address: recorded `invalid`, with why.
    fn invalid_line(&mut self, line: u64, why: &str) -> anyhow::Result<()> {
        self.insert(None, i64::try_from(line)?, RowState::Invalid, Some(why))?;
        self.settle(State::Invalid);
        Ok(())
    }

    /// A known address no longer on the list: `suppressed` if it was still waiting.
    fn unlisted(&mut self, row: &KnownRow) -> rusqlite::Result<()> {
        if matches!(row.state, RowState::Pending | RowState::Deferred) {
            self.conn.execute(
                "UPDATE recipients SET state = 'suppressed', reply_text = 'no longer in the recipient list', updated_at = ?2 WHERE id = ?1",
                params![row.id, self.now],
            )?;
            self.settle(State::Suppressed);
        } else {
            self.settle(row.state.counted_as());
        }
        Ok(())
    }

    /// Adds a row at `line` (of `recipient`, if any) in `state`, with `why` as its reply
    /// text; gives its id.
    fn insert(
        &mut self,
        recipient: Option<&Recipient>,
        line: i64,
        state: RowState,
        why: Option<&str>,
    ) -> rusqlite::Result<i64> {
        self.insert.execute(params![
            self.slot,
            recipient.map(|r| &*r.address.key),
            recipient.map(|r| r.address.domain()),
            line,
            recipient.map(self.locale),
            state.name(),
            why,
            self.now
        ])?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Moves row `id` to `state`, with `why` as its reply text, at `line`.
    fn update(
        &mut self,
        id: i64,
        state: RowState,
        why: Option<&str>,
        line: i64,
    ) -> rusqlite::Result<()> {
        self.update
            .execute(params![id, state.name(), why, line, self.now])?;
        Ok(())
    }

    fn settle(&mut self, state: State) {
        *self.sync.settled.entry(state).or_default() += 1;
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
    let now = crate::clock::now_millis();
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
        match active_halt(&conn) {
            Ok(Some(halt)) => {
                on_halt(halt);
                return Ok(());
            }
            Ok(None) => {}
            // A busy or briefly unreadable journal: look again at the next tick.
            Err(error) => {
                tracing::warn!("cannot read the journal for a stop (trying again): {error}");
            }
        }
        match done.recv_timeout(every) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return Ok(()),
        }
    }
}

/// What the journal's tests share.
#[cfg(test)]
mod fixtures {
    use std::time::Duration;

    use super::{Durability, Journal, Recorder, Writer};
    use crate::dispatch::Gate;
    use crate::render::{Envelope, OutgoingMessage};

    /// A canary outcome for `address` (line 2, `en`, one attempt).
    pub fn canary(address: &str, state: &str) -> super::review::CanaryOutcome {
        super::review::CanaryOutcome {
            address: address.to_owned(),
            line: 2,
            locale: "en".to_owned(),
            state: state.to_owned(),
            attempts: 1,
            detail: String::new(),
        }
    }

    /// A new journal of campaign `c` in a temporary folder (kept while the folder lives).
    pub fn journal() -> (tempfile::TempDir, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(
            &dir.path().join("c.journal"),
            "c",
            true,
            Durability::Relaxed,
        )
        .unwrap();
        (dir, journal)
    }

    /// Runs a writer over `journal` while `record` uses its recorder, and waits for the
    /// gates it returns and for the writer to finish.
    pub async fn record(
        journal: &Journal,
        durability: Durability,
        record: impl FnOnce(&Recorder) -> Vec<Gate>,
    ) {
        let (writer, recorder) = Writer::start(journal, durability).unwrap();
        let gates = record(&recorder);
        drop(recorder);
        let passed = async {
            for mut gate in gates {
                gate.pass(&MESSAGE).await.unwrap();
            }
        };
        let (ran, ()) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(writer.run(), passed)
        })
        .await
        .expect("the writer finishes");
        ran.unwrap();
    }

    /// Any message: a gate already recorded does not look at it.
    pub static MESSAGE: std::sync::LazyLock<OutgoingMessage> =
        std::sync::LazyLock::new(|| OutgoingMessage {
            line: 2,
            envelope: Envelope {
                mail_from: "ops@example.org".parse().unwrap(),
                rcpt_to: "r@example.com".parse().unwrap(),
            },
            message_id: "x@example.org".to_owned(),
            locale: "en".to_owned(),
            bytes: b"x".to_vec(),
        });
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::path::Path;
    use std::time::Duration;

    use rusqlite::Connection;

    use super::*;
    use crate::dispatch::Record as _;
    use crate::outcome::Reply;
    use crate::recipients::{RecipientList, parse_reader};

    use super::fixtures::record;

    /// Ann (2), Bob (3), a bad row (4), Cat (5), Dan (6).
    const CSV: &str = "email,name\nann@example.com,Ann\nbob@example.com,Bob\nnot-an-address,X\ncat@example.com,Cat\ndan@example.org,Dan\n";

    fn list(csv: &str, suppressed: &[&str]) -> RecipientList {
        let suppressed: HashSet<String> = suppressed.iter().map(|s| (*s).to_owned()).collect();
        parse_reader(Path::new("r.csv"), csv.as_bytes(), &suppressed)
    }

    /// The list's bad rows, as `send` hands them to the journal.
    fn invalid_of(list: &RecipientList) -> BTreeMap<u64, String> {
        list.problems
            .0
            .iter()
            .filter_map(|p| p.line.map(|line| (line, p.message.clone())))
            .collect()
    }

    fn now() -> i64 {
        crate::clock::now_millis()
    }

    /// A fresh journal of campaign `c` whose slot `""` has frozen inputs.
    fn journal(durability: Durability) -> (tempfile::TempDir, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let journal =
            Journal::open(&dir.path().join("state/c.journal"), "c", true, durability).unwrap();
        journal
            .freeze_inputs("", "fp", &BTreeMap::new(), None)
            .unwrap();
        (dir, journal)
    }

    fn sync_with(
        journal: &mut Journal,
        list: &RecipientList,
        invalid: &BTreeMap<u64, String>,
        retry_ambiguous: bool,
    ) -> Sync {
        let roster = Roster {
            recipients: &list.recipients,
            suppressed: &list.suppressed,
            invalid,
            locale: &|_: &crate::recipients::Recipient| "en".to_owned(),
        };
        journal.sync("", &roster, retry_ambiguous, now()).unwrap()
    }

    fn sync(journal: &mut Journal, list: &RecipientList) -> Sync {
        sync_with(journal, list, &invalid_of(list), false)
    }

    /// (line, address, state, attempts, reply text)
    type RowSummary = (u64, Option<String>, String, u32, Option<String>);

    /// Every row of slot `""`, in CSV order.
    fn rows(journal: &Journal) -> Vec<RowSummary> {
        let mut rows = Vec::new();
        journal
            .rows("", |r| {
                rows.push((r.line, r.address, r.state, r.attempts, r.reply_text));
                Ok(())
            })
            .unwrap();
        rows
    }

    fn state_of_line(journal: &Journal, line: u64) -> String {
        let found: Vec<String> = rows(journal)
            .into_iter()
            .filter(|r| r.0 == line)
            .map(|r| r.2)
            .collect();
        assert_eq!(found.len(), 1, "line {line}: {:?}", rows(journal));
        found[0].clone()
    }

    fn due_lines(sync: &Sync) -> Vec<u64> {
        let mut lines: Vec<u64> = sync.due.keys().copied().collect();
        lines.sort_unstable();
        lines
    }

    fn settled(pairs: &[(State, usize)]) -> BTreeMap<State, usize> {
        pairs.iter().copied().collect()
    }

    fn events(path: &Path, kind: &str) -> Vec<(String, String)> {
        let conn = Connection::open(path).unwrap();
        let mut statement = conn
            .prepare("SELECT slot, detail FROM events WHERE kind = ?1 ORDER BY id")
            .unwrap();
        statement
            .query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn reply(code: u16) -> Reply {
        Reply {
            code,
            enhanced: Some(format!("{}.0.0", code / 100)),
            text: "ok".to_owned(),
        }
    }

    #[test]
    fn row_states_are_stored_under_the_outcome_names() {
        for state in State::ALL {
            assert_eq!(RowState::from(state).name(), state.name());
            assert_eq!(RowState::from(state).counted_as(), state);
        }
        for row_state in RowState::ALL {
            assert_eq!(RowState::parse(row_state.name()), Some(row_state));
        }
        assert_eq!(RowState::InFlight.name(), "in_flight");
        assert_eq!(RowState::InFlight.counted_as(), State::Ambiguous);
        assert_eq!(RowState::parse("bounced"), Some(RowState::Bounced));
        assert_eq!(RowState::parse("returned"), None);
    }

    #[test]
    fn a_fresh_sync_lists_everyone_pending_suppressed_or_invalid_and_the_counts_add_up() {
        let (_dir, mut journal) = journal(Durability::Relaxed);
        let list = list(CSV, &["dan@example.org"]);
        let mut invalid = invalid_of(&list);
        assert_eq!(invalid.keys().copied().collect::<Vec<_>>(), [4]);
        // A listed row whose message cannot be made: invalid, with its address.
        invalid.insert(5, "the template cannot be rendered".to_owned());
        let found = sync_with(&mut journal, &list, &invalid, false);

        assert_eq!(due_lines(&found), [2, 3]);
        assert!(found.due.values().all(|e| e.attempts == 0));
        assert_ne!(found.due[&2].id, found.due[&3].id);
        assert_eq!(
            found.settled,
            settled(&[(State::Suppressed, 1), (State::Invalid, 2)])
        );
        assert!(found.recovered.is_empty());
        assert_eq!((found.retried_ambiguous, found.next_due), (0, None));

        let rows = rows(&journal);
        let summary: Vec<(u64, Option<&str>, &str)> = rows
            .iter()
            .map(|r| (r.0, r.1.as_deref(), r.2.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (2, Some("ann@example.com"), "pending"),
                (3, Some("bob@example.com"), "pending"),
                (4, None, "invalid"),
                (5, Some("cat@example.com"), "invalid"),
                (6, Some("dan@example.org"), "suppressed"),
            ]
        );
        let texts: Vec<Option<&str>> = rows.iter().map(|r| r.4.as_deref()).collect();
        assert!(
            texts[2].is_some_and(|t| t.contains("is not a valid address")),
            "{texts:?}"
        );
        assert_eq!(texts[3], Some("the template cannot be rendered"));
        assert_eq!(texts[4], Some("on a suppression list"));

        // The due entries point at the rows of their lines.
        let address_of = |id: i64| -> String {
            journal
                .conn
                .query_row("SELECT address FROM recipients WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        assert_eq!(address_of(found.due[&2].id), "ann@example.com");
        assert_eq!(address_of(found.due[&3].id), "bob@example.com");

        let counts = journal.counts("").unwrap();
        assert_eq!(counts["pending"], 2);
        assert_eq!(counts["suppressed"], 1);
        assert_eq!(counts["invalid"], 2);
        assert_eq!(counts[RowState::InFlight.name()], 0);
        assert_eq!(counts["sent"], 0);
        let total = found.due.len() + found.settled.values().sum::<usize>();
        assert_eq!(total, 5);
        assert_eq!(counts.values().sum::<u64>(), 5);
        assert_eq!(journal.status("c", "").unwrap().total, 5);

        // Again with the same list: the same rows, the same ids, nothing doubled.
        let again = sync_with(&mut journal, &list, &invalid, false);
        assert_eq!(again.due, found.due);
        assert_eq!(again.settled, found.settled);
        assert_eq!(journal.counts("").unwrap(), counts);
    }

    #[test]
    fn slots_are_kept_apart() {
        let (_dir, mut journal) = journal(Durability::Relaxed);
        let list = list(CSV, &[]);
        let invalid = invalid_of(&list);
        sync(&mut journal, &list);
        let roster = Roster {
            recipients: &list.recipients,
            suppressed: &list.suppressed,
            invalid: &invalid,
            locale: &|_: &crate::recipients::Recipient| "en".to_owned(),
        };
        let other = journal
            .sync("2030-01-01T00:00:00Z", &roster, false, now())
            .unwrap();
        assert_eq!(due_lines(&other), [2, 3, 5, 6]);
        assert_eq!(journal.counts("").unwrap()["pending"], 4);
        assert_eq!(
            journal.counts("2030-01-01T00:00:00Z").unwrap()["pending"],
            4
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rows_left_in_flight_become_ambiguous_and_are_retried_only_when_asked() {
        let (dir, mut journal) = journal(Durability::Relaxed);
        let list = list("email\nann@example.com\nbob@example.com\n", &[]);
        let first = sync(&mut journal, &list);
        let (ann, bob) = (first.due[&2], first.due[&3]);
        // The run dies after ann's record is durable, before any outcome.
        record(&journal, Durability::Relaxed, |r| {
            vec![r.in_flight(ann.id, "en", "<1@x>", b"body")]
        })
        .await;
        assert_eq!(state_of_line(&journal, 2), RowState::InFlight.name());

        let next = sync(&mut journal, &list);
        assert_eq!(next.recovered, [(2, "ann@example.com".to_owned())]);
        assert_eq!(due_lines(&next), [3]);
        assert_eq!(next.settled, settled(&[(State::Ambiguous, 1)]));
        assert_eq!(next.retried_ambiguous, 0);
        let ann_row = rows(&journal).remove(0);
        assert_eq!((ann_row.2.as_str(), ann_row.3), ("ambiguous", 1));
        assert!(
            ann_row.4.is_some_and(|t| t.starts_with("outcome unknown")),
            "the reason is recorded"
        );
        let recovered = events(&journal.path, "recovered");
        assert_eq!(recovered.len(), 1);
        assert!(
            recovered[0].1.contains("line 2 <ann@example.com>"),
            "{recovered:?}"
        );

        // Once recovered, it is not recovered again, and stays unsent.
        let calm = sync(&mut journal, &list);
        assert!(calm.recovered.is_empty());
        assert_eq!(due_lines(&calm), [3]);
        assert_eq!(events(&journal.path, "recovered").len(), 1);

        // Bob dies in flight too; this time ambiguous ones are retried.
        record(&journal, Durability::Full, |r| {
            vec![r.in_flight(bob.id, "en", "<2@x>", b"body")]
        })
        .await;
        let retried = sync_with(&mut journal, &list, &BTreeMap::new(), true);
        assert_eq!(retried.recovered, [(3, "bob@example.com".to_owned())]);
        assert_eq!(retried.retried_ambiguous, 2);
        assert_eq!(due_lines(&retried), [2, 3]);
        assert_eq!(
            retried.due[&2],
            Entry {
                id: ann.id,
                attempts: 1
            }
        );
        assert_eq!(
            retried.due[&3],
            Entry {
                id: bob.id,
                attempts: 1
            }
        );
        assert!(retried.settled.is_empty(), "{:?}", retried.settled);
        assert_eq!(journal.counts("").unwrap()["pending"], 2);
        drop(dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn outcomes_decide_who_is_due_next_time() {
        let (_dir, mut journal) = journal(Durability::Relaxed);
        let list = list(
            "email\nann@example.com\nbob@example.com\ncat@example.com\ndan@example.com\n",
            &[],
        );
        let first = sync(&mut journal, &list);
        assert_eq!(due_lines(&first), [2, 3, 4, 5]);
        let id = |line: u64| first.due[&line].id;
        let later = crate::clock::now() + Duration::from_secs(3600);
        let earlier = crate::clock::now() - Duration::from_secs(1);
        record(&journal, Durability::Relaxed, |r| {
            let gates = (2..=5)
                .map(|line| r.in_flight(id(line), "en", &format!("<{line}@x>"), b"body"))
                .collect();
            r.outcome(
                id(2),
                State::Sent,
                1,
                Some(reply(250)),
                "250 ok".to_owned(),
                None,
            );
            r.outcome(
                id(3),
                State::Deferred,
                1,
                Some(reply(451)),
                "451 later".to_owned(),
                Some(later),
            );
            r.outcome(
                id(4),
                State::Deferred,
                2,
                Some(reply(421)),
                "421 busy".to_owned(),
                Some(earlier),
            );
            r.requeued(id(5));
            gates
        })
        .await;
        let states: Vec<(u64, String, u32)> = rows(&journal)
            .into_iter()
            .map(|r| (r.0, r.2, r.3))
            .collect();
        assert_eq!(
            states,
            [
                (2, "sent".to_owned(), 1),
                (3, "deferred".to_owned(), 1),
                (4, "deferred".to_owned(), 2),
                (5, "pending".to_owned(), 0),
            ]
        );

        let next = sync(&mut journal, &list);
        assert_eq!(due_lines(&next), [4, 5]);
        assert_eq!(
            next.due[&4],
            Entry {
                id: id(4),
                attempts: 2
            }
        );
        assert_eq!(
            next.due[&5],
            Entry {
                id: id(5),
                attempts: 0
            }
        );
        assert_eq!(
            next.settled,
            settled(&[(State::Sent, 1), (State::Deferred, 1)])
        );
        assert_eq!(next.next_due, Some(millis(later)));
        assert!(next.recovered.is_empty());

        // Requeuing touches only rows in flight: a sent row stays sent.
        record(&journal, Durability::Relaxed, |r| {
            r.requeued(id(2));
            vec![]
        })
        .await;
        assert_eq!(state_of_line(&journal, 2), "sent");

        // The attempts count towards the pacing of the next run, per domain.
        let (latest, domains) = journal.recent_attempts(now() - 60_000).unwrap();
        assert!(latest.is_some_and(|at| at <= now()));
        assert_eq!(
            domains.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>(),
            ["example.com"]
        );
        assert_eq!(
            journal.recent_attempts(now() + 60_000).unwrap(),
            (None, vec![])
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn next_due_is_the_earliest_deferral_whatever_the_order() {
        let (_dir, mut journal) = journal(Durability::Relaxed);
        let list = list(
            "email\nann@example.com\nbob@example.com\ncat@example.com\n",
            &[],
        );
        let first = sync(&mut journal, &list);
        let base = crate::clock::now() + Duration::from_secs(3600);
        let offsets = [(2, 300), (3, 100), (4, 200)];
        record(&journal, Durability::Relaxed, |r| {
            for (line, secs) in offsets {
                r.outcome(
                    first.due[&line].id,
                    State::Deferred,
                    1,
                    Some(reply(451)),
                    "451".to_owned(),
                    Some(base + Duration::from_secs(secs)),
                );
            }
            vec![]
        })
        .await;
        let next = sync(&mut journal, &list);
        assert!(next.due.is_empty());
        assert_eq!(next.next_due, Some(millis(base + Duration::from_secs(100))));
        assert_eq!(next.settled, settled(&[(State::Deferred, 3)]));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_recipient_taken_off_the_list_is_suppressed_unless_already_sent() {
        let (_dir, mut journal) = journal(Durability::Relaxed);
        let all = list(
            "email\nann@example.com\nbob@example.com\ncat@example.com\n",
            &[],
        );
        let first = sync(&mut journal, &all);
        record(&journal, Durability::Relaxed, |r| {
            r.outcome(
                first.due[&3].id,
                State::Sent,
                1,
                Some(reply(250)),
                "250".to_owned(),
                None,
            );
            vec![]
        })
        .await;

        let only_cat = list("email\ncat@example.com\n", &[]);
        let next = sync(&mut journal, &only_cat);
        assert_eq!(due_lines(&next), [2]);
        assert_eq!(next.due[&2].id, first.due[&4].id, "cat moved to line 2");
        assert_eq!(
            next.settled,
            settled(&[(State::Sent, 1), (State::Suppressed, 1)])
        );
        let by_address: BTreeMap<String, (String, Option<String>)> = rows(&journal)
            .into_iter()
            .map(|r| (r.1.unwrap(), (r.2, r.4)))
            .collect();
        assert_eq!(
            by_address["ann@example.com"],
            (
                "suppressed".to_owned(),
                Some("no longer in the recipient list".to_owned())
            )
        );
        assert_eq!(by_address["bob@example.com"].0, "sent");
        assert_eq!(by_address["cat@example.com"].0, "pending");

        // Put back on the list, the waiting one is due again; the sent one is not.
        let back = sync(&mut journal, &all);
        assert_eq!(due_lines(&back), [2, 4]);
        assert_eq!(back.due[&2].id, first.due[&2].id);
        assert_eq!(back.settled, settled(&[(State::Sent, 1)]));
        assert_eq!(state_of_line(&journal, 2), "pending");
        assert_eq!(journal.counts("").unwrap()["suppressed"], 0);
    }

    #[test]
    fn a_suppression_applies_to_waiting_recipients_only_and_a_later_invalid_row_is_recorded() {
        let (_dir, mut journal) = journal(Durability::Relaxed);
        let plain = list("email\nann@example.com\nbob@example.com\n", &[]);
        sync(&mut journal, &plain);
        let suppressed = list(
            "email\nann@example.com\nbob@example.com\n",
            &["ann@example.com"],
        );
        let next = sync(&mut journal, &suppressed);
        assert_eq!(due_lines(&next), [3]);
        assert_eq!(next.settled, settled(&[(State::Suppressed, 1)]));
        assert_eq!(state_of_line(&journal, 2), "suppressed");

        let mut invalid = BTreeMap::new();
        invalid.insert(3, "cannot render".to_owned());
        let later = sync_with(&mut journal, &suppressed, &invalid, false);
        assert!(later.due.is_empty());
        assert_eq!(
            later.settled,
            settled(&[(State::Suppressed, 1), (State::Invalid, 1)])
        );
        assert_eq!(state_of_line(&journal, 3), "invalid");
        // Fixed, it is due again.
        let fixed = sync(&mut journal, &plain);
        assert_eq!(due_lines(&fixed), [2, 3]);
    }

    #[test]
    fn frozen_inputs_round_trip_and_an_accepted_change_is_recorded() {
        let (dir, journal) = journal(Durability::Relaxed);
        assert_eq!(journal.frozen_inputs("").unwrap(), Some(BTreeMap::new()));
        assert_eq!(journal.frozen_inputs("2030-01-01T00:00:00Z").unwrap(), None);
        let inputs: BTreeMap<String, String> = [("campaign", "aa"), ("recipients", "bb")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        journal.freeze_inputs("s", "fp1", &inputs, None).unwrap();
        assert_eq!(journal.frozen_inputs("s").unwrap(), Some(inputs.clone()));
        assert!(events(&journal.path, "inputs-accepted").is_empty());

        let mut changed = inputs.clone();
        changed.insert("recipients".to_owned(), "cc".to_owned());
        journal
            .freeze_inputs("s", "fp2", &changed, Some("recipients"))
            .unwrap();
        assert_eq!(journal.frozen_inputs("s").unwrap(), Some(changed));
        let accepted = events(&journal.path, "inputs-accepted");
        assert_eq!(accepted.len(), 1, "{accepted:?}");
        assert_eq!(accepted[0].0, "s");
        assert!(
            accepted[0].1.contains("recipients") && accepted[0].1.contains("fp2"),
            "{accepted:?}"
        );
        let fingerprint: String = journal
            .conn
            .query_row("SELECT fingerprint FROM runs WHERE slot = 's'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(fingerprint, "fp2");
        drop(dir);
    }

    #[test]
    fn a_second_halt_keeps_the_first_and_clearing_gives_it_back() {
        let (_dir, journal) = journal(Durability::Relaxed);
        assert_eq!(journal.active_halt().unwrap(), None);
        assert_eq!(journal.clear_halt("me").unwrap(), None);
        assert!(events(&journal.path, "resumed").is_empty());

        journal.halt("", "mailer stop", "first").unwrap();
        journal.halt("", "breaker", "second").unwrap();
        let halt = journal.active_halt().unwrap().unwrap();
        assert_eq!(
            (halt.by.as_str(), halt.reason.as_str()),
            ("mailer stop", "first")
        );
        assert_eq!(events(&journal.path, "halted").len(), 1);
        assert_eq!(
            journal.status("c", "").unwrap().halt.map(|h| h.reason),
            Some("first".to_owned())
        );

        assert_eq!(journal.clear_halt("me").unwrap(), Some(halt));
        assert_eq!(journal.active_halt().unwrap(), None);
        assert_eq!(journal.clear_halt("me").unwrap(), None);
        assert_eq!(events(&journal.path, "resumed").len(), 1);

        // A new halt is recorded after the old one was cleared.
        journal.halt("", "breaker", "third").unwrap();
        assert_eq!(journal.active_halt().unwrap().unwrap().reason, "third");
    }

    #[test]
    fn watch_halts_sees_a_halt_recorded_by_another_connection() {
        let (_dir, journal) = journal(Durability::Relaxed);
        let (_done, waiting) = std::sync::mpsc::channel::<()>();
        let path = journal.path().to_owned();
        let seen = std::thread::scope(|scope| {
            let path = &path;
            let watcher = scope.spawn(move || {
                let mut seen = None;
                watch_halts(path, Duration::from_millis(10), &waiting, |h| {
                    seen = Some(h);
                })
                .unwrap();
                seen
            });
            std::thread::sleep(Duration::from_millis(30));
            journal.halt("", "mailer stop", "enough").unwrap();
            watcher.join().unwrap()
        });
        assert_eq!(seen.map(|h| h.reason), Some("enough".to_owned()));
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        for (name, garbage) in [
            ("short", b"hello".to_vec()),
            ("long", b"not a database\n".repeat(400)),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, &garbage).unwrap();
            let error = Journal::open(&path, "c", true, Durability::Full)
                .err()
                .unwrap();
            let text = format!("{error:#}");
            assert!(
                text.contains("damaged or not a mailer journal"),
                "{name}: {text}"
            );
            assert_eq!(std::fs::read(&path).unwrap(), garbage, "{name}");
        }

        // Another program's SQLite databases: empty but tagged, and with tables.
        let path = dir.path().join("tagged.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "application_id", 42)
            .unwrap();
        let before = std::fs::read(&path).unwrap();
        let error = Journal::open(&path, "c", true, Durability::Full)
            .err()
            .unwrap();
        assert!(
            format!("{error:#}").contains("another program"),
            "{error:#}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let before = std::fs::read(&path).unwrap();
        let error = Journal::open(&path, "c", true, Durability::Full)
            .err()
            .unwrap();
        let text = format!("{error:#}");
        assert!(
            text.contains("damaged or not a mailer journal") && text.contains("another program"),
            "{text}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let tables: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 1);
    }

    #[test]
    fn a_journal_opens_only_as_its_own_campaign() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.journal");
        drop(Journal::open(&path, "a", true, Durability::Full).unwrap());
        let error = Journal::open(&path, "b", true, Durability::Full)
            .err()
            .unwrap();
        let text = format!("{error:#}");
        assert!(text.contains("belongs to campaign `a`, not `b`"), "{text}");
        Journal::open(&path, "a", false, Durability::Full).unwrap();
    }

    #[test]
    fn a_missing_journal_is_created_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep/er/c.journal");
        let error = Journal::open(&path, "c", false, Durability::Full)
            .err()
            .unwrap();
        assert!(format!("{error:#}").contains("no journal at"), "{error:#}");
        assert!(!path.exists());
        let journal = Journal::open(&path, "c", true, Durability::Full).unwrap();
        assert_eq!(journal.path(), path);
        assert!(path.exists());
    }

    /// An empty file where the journal should be was emptied (or cut short): a journal is
    /// never started over an existing file, which would send everyone again. A new journal is
    /// made only where no file is, in WAL mode, private.
    #[test]
    fn an_empty_file_is_refused_and_a_new_journal_made_only_where_none_is() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.journal");
        std::fs::write(&path, b"").unwrap();
        for create in [false, true] {
            let error = Journal::open(&path, "c", create, Durability::Full)
                .err()
                .expect("refused");
            assert_eq!(Exit::of_error(&error), Exit::IoError);
            assert!(format!("{error:#}").contains("is empty"), "{error:#}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left as it is");
        }
        std::fs::remove_file(&path).unwrap();
        let journal = Journal::open(&path, "c", true, Durability::Full).unwrap();
        let application_id: i64 = journal
            .conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(application_id, APPLICATION_ID);
        let mode: String = journal
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(journal);
        let permissions = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(permissions, 0o600);
        // No temporary file is left beside it, and it stays a journal.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        Journal::open(&path, "c", false, Durability::Relaxed).unwrap();
    }

    #[test]
    fn a_format_2_journal_gains_the_review_tables_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.journal");
        let journal = Journal::open(&path, "c", true, Durability::Full).unwrap();
        journal
            .freeze_inputs("", "fp", &BTreeMap::new(), None)
            .unwrap();
        drop(journal);
        // What a format-2 journal is: no review tables.
        Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE plans; DROP TABLE canary; PRAGMA user_version = 2;")
            .unwrap();
        let journal = Journal::open(&path, "c", false, Durability::Full).unwrap();
        assert_eq!(journal.frozen_inputs("").unwrap(), Some(BTreeMap::new()));
        journal
            .record_plan(
                "ab12cd",
                &BTreeMap::new(),
                "{}",
                &std::collections::HashSet::new(),
            )
            .unwrap();
        assert!(journal.known_inputs("ab12cd").unwrap().is_some());
        assert!(journal.canary_sent("ab12cd").unwrap().is_empty());
        let version: i64 = journal
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_journal_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.journal");
        drop(Journal::open(&path, "c", true, Durability::Full).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let error = Journal::open(&path, "c", false, Durability::Full)
            .err()
            .unwrap();
        let other = format!("has format {}", SCHEMA_VERSION + 1);
        assert!(format!("{error:#}").contains(&other), "{error:#}");
    }

    /// A recipient whose row moved in the CSV keeps its old line in the journal while it is
    /// waiting: `due` says line 4, the journal (and so `mailer report`, and a later
    /// "recovered" message) still says line 2, which is now another row's line.
    #[test]
    fn a_waiting_recipient_that_moved_in_the_list_is_recorded_at_its_new_line() {
        let (_dir, mut journal) = journal(Durability::Relaxed);
        sync(
            &mut journal,
            &list("email\nann@example.com\nbob@example.com\n", &[]),
        );
        let moved = list(
            "email\nnot an address\nbob@example.com\nann@example.com\n",
            &[],
        );
        let found = sync(&mut journal, &moved);
        assert_eq!(due_lines(&found), [3, 4]);
        let lines: Vec<(u64, Option<String>)> =
            rows(&journal).into_iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            lines,
            [
                (2, None),
                (3, Some("bob@example.com".to_owned())),
                (4, Some("ann@example.com".to_owned())),
            ]
        );
    }
}
