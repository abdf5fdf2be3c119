//! Commands: one module each, wiring the stages together for what the user asked. No stage
//! imports a command.
//!
//! [`run`] hands each parsed command to its module. `init_logging` sets up tracing once.

mod bounces;
mod check;
mod init;
mod plan;
mod preview;
mod probe;
mod report;
mod resume;
pub mod send;
mod status;
mod stop;
mod unsubscribe_token;

use std::path::{Path, PathBuf};

use crate::cli::{Cli, Command, LogFormat};
use crate::config;
use crate::exit::Exit;
use crate::journal;
use crate::problem::Problems;

/// Runs one command. Errors carry their exit code (see [`Exit::of_error`]).
pub fn run(cli: &Cli) -> anyhow::Result<Exit> {
    init_logging(cli.log_format);
    send::signals::survive_file_size_limit();
    if let Some(notice) = crate::clock::override_notice() {
        tracing::warn!("{notice}");
    }
    let state_dir = cli.state_dir.as_deref();
    let out = &mut Stdout::default();
    match &cli.command {
        Command::Init { dir } => init::run(dir, out),
        Command::Check { campaign } => check::run(campaign, out),
        Command::Preview {
            campaign,
            out: folder,
            per_locale,
            recipients,
            show,
        } => preview::run(
            campaign,
            folder.as_deref(),
            &crate::report::preview::Request {
                per_locale: *per_locale,
                recipients,
            },
            *show,
            out,
        ),
        Command::Plan { campaign, json } => plan::run(campaign, state_dir, *json, out),
        Command::Probe { campaign, to, json } => probe::run(campaign, to.as_deref(), *json, out),
        Command::Send {
            campaign,
            dry_run,
            accept_changed_inputs,
            slot,
            approve,
            stage,
            limit,
            move_journal,
        } => send::run(
            campaign,
            &send::Options {
                dry_run: *dry_run,
                keep_bytes: crate::pipeline::KEEP_BYTES,
                // A bar on a terminal; on anything else (cron, a pipe, JSON logs), log lines.
                interactive: cli.log_format == LogFormat::Text
                    && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                state_dir,
                accept_changed_inputs: *accept_changed_inputs,
                slot: slot.as_deref(),
                approve: approve.as_ref(),
                stage: *stage,
                limit: *limit,
                move_journal: *move_journal,
            },
            out,
        ),
        Command::Status { campaign, json } => status::run(campaign, state_dir, *json, out),
        Command::Stop { campaign, reason } => stop::run(campaign, state_dir, reason, out),
        Command::Resume { campaign } => resume::run(campaign, state_dir, out),
        Command::UnsubscribeToken {
            campaign,
            address,
            verify,
        } => unsubscribe_token::run(campaign, address, verify.as_deref(), out),
        Command::Report { campaign, format } => report::run(campaign, state_dir, *format, out),
        Command::Bounces {
            campaign,
            maildir,
            mbox,
            stdin: _,
            suppress,
            move_to,
        } => bounces::run(
            campaign,
            state_dir,
            &bounces::Options {
                input: match (maildir, mbox) {
                    (Some(dir), _) => bounces::Input::Maildir(dir),
                    (None, Some(file)) => bounces::Input::Mbox(file),
                    (None, None) => bounces::Input::Stdin,
                },
                suppress: suppress.as_deref(),
                move_to: move_to.as_deref(),
            },
            out,
        ),
    }
}

fn init_logging(format: LogFormat) {
    // lettre's own `tracing` feature is off (it would log AUTH credentials); the filter keeps
    // it quiet even if a dependency turns it on, whatever MAILER_LOG asks for.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive("lettre=warn".parse().expect("a constant, valid directive"))
        // handlebars logs every helper call with its arguments — recipients' data — at DEBUG.
        .add_directive(
            "handlebars=warn"
                .parse()
                .expect("a constant, valid directive"),
        );
    // Every value is escaped (see report::logging), and a line that cannot be written is
    // dropped without a word: tracing-subscriber would otherwise say so with `eprintln!`,
    // which panics when standard error is closed.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::report::QuietStderr::default)
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.event_format(crate::report::JsonLines).try_init(),
        LogFormat::Text => builder
            .fmt_fields(crate::report::text_fields())
            .without_time()
            .with_target(false)
            .try_init(),
    };
}

/// Standard output, which its reader may close early (`mailer report … | head -1`): from then
/// on what is written to it goes nowhere, quietly, and the command goes on to its own end and
/// exit code. So a send whose summary nobody reads still delivers and records everything, and
/// cron still gets its exit code. (Rust ignores SIGPIPE: a write to a closed pipe fails with
/// `BrokenPipe` instead of ending the process.)
struct Stdout {
    inner: std::io::StdoutLock<'static>,
    closed: bool,
}

impl Default for Stdout {
    fn default() -> Self {
        Stdout {
            inner: std::io::stdout().lock(),
            closed: false,
        }
    }
}

impl Stdout {
    fn unless_closed<T>(&mut self, done: T, result: std::io::Result<T>) -> std::io::Result<T> {
        match result {
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(done)
            }
            other => other,
        }
    }
}

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        let written = self.inner.write(buf);
        self.unless_closed(buf.len(), written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let flushed = self.inner.flush();
        self.unless_closed((), flushed)
    }
}

/// A campaign as the journal commands see it: its id, where its lock is, and whether its
/// journal existed before this command.
struct CampaignRef {
    id: String,
    lock: PathBuf,
    existed: bool,
}

/// How a journal command uses the journal.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// `status`, `report`: opened read-only (a read-only journal is fine).
    Read,
    /// `resume`: written, never created.
    Write,
    /// `stop`: written, created if the campaign has none yet (to hold the stop).
    Create,
}

/// Opens a campaign's journal for `status`, `stop`, `resume` and `report`: the one the
/// campaign's record names (see `journal::locate`). Only `[campaign] id` is read, so that an
/// operator can stop a send (or look at it) while the campaign file is half-edited.
fn journal_for(
    path: &Path,
    state_dir: Option<&Path>,
    access: Access,
) -> anyhow::Result<(CampaignRef, journal::Journal)> {
    let id = campaign_id(path)?;
    let intent = match access {
        Access::Read => journal::Intent::Read,
        Access::Write | Access::Create => journal::Intent::Write,
    };
    let located = journal::locate(path, state_dir, &id, intent)?;
    let existed = located.place.journal.exists();
    let journal = match access {
        Access::Read => journal::Journal::open_located_read_only(&located, &id)?,
        Access::Write | Access::Create => {
            let journal = journal::Journal::open_located(
                &located,
                &id,
                access == Access::Create,
                journal::Durability::Full,
            )?;
            journal
                .settle_if_idle(&located.place, &id)
                .map_err(journal::named(journal.path()))?;
            journal
        }
    };
    Ok((
        CampaignRef {
            id,
            lock: located.place.lock,
            existed,
        },
        journal,
    ))
}

/// `[campaign] id`, or the full check's errors when it cannot be read on its own.
fn campaign_id(path: &Path) -> anyhow::Result<String> {
    let text = config::read(path)?;
    let id = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|table| Some(table.get("campaign")?.get("id")?.as_str()?.to_owned()))
        .filter(|id| config::valid_id(id));
    match id {
        Some(id) => Ok(id),
        None => Ok(config::parse(path, &text)
            .map_err(Problems::into_failure)?
            .id),
    }
}
