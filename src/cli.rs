//! The command line: commands and flags. Doc comments here are the `--help` text.
//!
//! Pure apart from reading `std::env::args`. Usage errors exit 64 (sysexits), not clap's 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::exit::Exit;
use crate::plan::Approval;

/// Send bulk email campaigns safely: one envelope per recipient, every message rendered,
/// translated and checked before the first one leaves.
#[derive(Debug, Parser)]
#[command(name = "mailer", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format on standard error: `text`, or `json` for cron and log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Folder holding the campaigns' journals and locks (default: `mailer-state` beside the
    /// campaign file).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Formats of `mailer report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Csv,
    Json,
}

/// Stages of `mailer send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// The `[safety] canary` addresses, one message each.
    Canary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scaffold a working campaign folder: campaign.toml, templates, locales and a sample CSV.
    Init {
        /// Folder to create (it must not exist, or be empty).
        dir: PathBuf,
    },
    /// Load the campaign and render every recipient's message in memory; report every problem.
    Check {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
    },
    /// Write the first few messages of each locale as .eml files and an HTML gallery of them,
    /// for review before sending; or print one row's message.
    ///
    /// The gallery, `index.html` in the `--out` folder, is one self-contained page that loads
    /// nothing from the network. For each locale it shows the untranslated message ids and each
    /// sample's headers and parts, read back from the bytes that would be sent; it also counts
    /// the rows per locale and domain, suppressed, invalid and duplicated.
    Preview {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// Folder to write into: `index.html`, and the .eml files in one sub-folder per locale.
        #[arg(long, value_name = "DIR", required_unless_present = "show")]
        out: Option<PathBuf>,
        /// How many messages to write per locale: the first rows of each, in file order.
        #[arg(long, value_name = "N", default_value_t = 3)]
        per_locale: usize,
        /// Include this recipient's message too, marked as asked for (repeatable). The address
        /// must be on a row that would be sent.
        #[arg(long = "recipient", value_name = "ADDRESS", requires = "out")]
        recipients: Vec<String>,
        /// Print the message of the CSV row on this line to standard output: its headers as a
        /// mail client shows them, a blank line, then its text part. `--out` is optional then.
        #[arg(long, value_name = "LINE")]
        show: Option<u64>,
    },
    /// Everything `check` does, then the plan: counts, batches, the least duration at the
    /// configured limits (and the day it ends, with send windows or daily caps), the canary
    /// messages, and the fingerprint of every input that
    /// `send --approve` pins. The plan is recorded in the campaign's journal.
    Plan {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// One JSON object (with the full `fingerprint`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Try the relay as a send would, without sending anything: connect (TLS, STARTTLS,
    /// AUTH), list the relay's extensions and its certificate, then `MAIL FROM` the campaign's
    /// sender (with `[bounces]`, the return path with the address's token) and `RCPT TO` the
    /// first `[safety] canary` address (or `--to`), `RSET` and
    /// `QUIT` — never `DATA`. Records nothing and needs no approval. Exit codes: 0 a send
    /// would get through (or the campaign writes to an outbox: no relay), 64 no address to
    /// try, 65 something in the configuration must change (the campaign file, a missing
    /// password, a certificate mailer refuses, credentials, sender or recipient refused for
    /// good), 69 the relay cannot be used now (no connection, no answer, a 4xx).
    Probe {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// The address for `RCPT TO` instead of the first `[safety] canary` address.
        #[arg(long, value_name = "ADDRESS")]
        to: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Render, check and deliver the campaign: one message, one envelope, per recipient.
    ///
    /// Every outcome is recorded in the campaign's journal: running `send` again resumes
    /// where the last run stopped and never sends anyone twice. Delivery keeps to `[rate]`
    /// (global and per domain), retries 4xx replies as `[retry]` says, pauses when the relay
    /// fails, and ends with a summary. Over SMTP it needs `--approve` with the fingerprint
    /// `mailer plan` printed for these inputs. Exit codes: 0 done, 1 done with failures, 3
    /// halted, 64 no approval, canary not done or another journal than the campaign's, 65
    /// invalid input or inputs not those approved, 69 relay unavailable, 74 the journal, state
    /// folder or outbox cannot be written, 75 work remaining, not due yet, locked or stopped
    /// by a signal (see the README).
    Send {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// Run the whole pipeline but replace the transport with one that connects to nothing.
        /// Reads and writes no journal.
        #[arg(long)]
        dry_run: bool,
        /// Go on although the inputs (campaign file, templates, locales, lists) changed since
        /// this campaign's first run. The journal records the acceptance.
        #[arg(long)]
        accept_changed_inputs: bool,
        /// Run this schedule slot (RFC 3339) of a `[schedule] cron` campaign instead of the
        /// current one: how a missed slot is sent.
        #[arg(long, value_name = "TIME")]
        slot: Option<String>,
        /// The fingerprint `mailer plan` printed for the reviewed inputs (at least 6 hex
        /// digits). Required to send over SMTP; a send whose inputs differ is refused.
        #[arg(long, value_name = "FINGERPRINT")]
        approve: Option<Approval>,
        /// `canary`: send only the `[safety] canary` messages, and stop. A full send waits
        /// for them when a canary is configured.
        #[arg(long, value_enum)]
        stage: Option<Stage>,
        /// Send at most N messages in this run; exit 75 when recipients remain.
        #[arg(long, value_name = "N", conflicts_with = "stage")]
        limit: Option<usize>,
        /// The campaign's journal was moved to `--state-dir` on purpose (the file, with its
        /// -wal and -shm files): record its new place. Without it, a `--state-dir` other than
        /// the campaign's recorded one is refused, since a second journal sends everyone again.
        #[arg(long)]
        move_journal: bool,
    },
    /// Show a campaign's progress from its journal: counts per state, rate, ETA, top replies,
    /// domains, why it waits (outside a send window, a daily cap reached), and the halt in
    /// force if any.
    Status {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Kill switch: a running `send` starts no new message within a second and exits 3;
    /// every later `send` exits 3 until `mailer resume`.
    Stop {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// Why, for the journal and `status`.
        #[arg(long, default_value = "stopped by the operator")]
        reason: String,
    },
    /// Clear a stop or a breaker trip so that `send` may run again.
    Resume {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
    },
    /// A recipient's one-click unsubscribe token and link, or, with `--verify`, whether a token
    /// is theirs (exit 0 if it is, 1 if not): for whoever implements the unsubscribe endpoint.
    /// Reads the key from the variable `[unsubscribe] secret_env` names.
    UnsubscribeToken {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// The recipient's address.
        address: String,
        /// A token to check instead of printing one.
        #[arg(long, value_name = "TOKEN")]
        verify: Option<String>,
    },
    /// Read returned mail — bounces, complaints, auto-replies — from a Maildir, an mbox file or
    /// standard input (`-`, one message): attribute each to its recipient (VERP token, original
    /// Message-ID, Final-Recipient), classify it, and record it in the journal (`bounced`,
    /// `complained`). Never deletes or changes mail; unattributed messages are listed; a
    /// message already recorded is skipped, so running it twice changes nothing.
    #[command(group = clap::ArgGroup::new("input").required(true).args(["maildir", "mbox", "stdin"]))]
    Bounces {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// A Maildir: the messages in its `new` and `cur` folders.
        #[arg(long, value_name = "DIR")]
        maildir: Option<PathBuf>,
        /// An mbox file.
        #[arg(long, value_name = "FILE")]
        mbox: Option<PathBuf>,
        /// `-`: one message on standard input.
        #[arg(value_name = "-", value_parser = clap::builder::PossibleValuesParser::new(["-"]))]
        stdin: Option<String>,
        /// Add the hard bounces and complaints (not soft or policy ones) to this suppression
        /// file, one address per line, each once (appended under a lock). Only bounces tied to their
        /// recipient by token, Message-ID or a refusal at send time are added: a report that only
        /// names an address can come from anyone.
        #[arg(long, value_name = "FILE")]
        suppress: Option<PathBuf>,
        /// Move each Maildir message recorded (or ignored, as an auto-reply) into this folder;
        /// unattributed ones stay where they are.
        #[arg(long, value_name = "DIR", requires = "maildir")]
        move_to: Option<PathBuf>,
    },
    /// Every recipient's outcome from the journal: state, attempts, last reply, timestamps,
    /// Message-ID, and the latest bounce or complaint.
    Report {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        #[arg(long, value_enum, default_value_t = ReportFormat::Csv)]
        format: ReportFormat,
    },
}

impl Cli {
    /// Parses the process arguments; usage errors come back ready to exit with code 64.
    pub fn try_parse_args() -> Result<Cli, UsageError> {
        Cli::try_parse().map_err(UsageError)
    }
}

/// A command line clap rejected, or a request for `--help` / `--version`.
#[derive(Debug)]
pub struct UsageError(clap::Error);

impl UsageError {
    /// Prints clap's message and gives the exit code: 0 for help and version, 64 otherwise.
    #[must_use]
    pub fn exit_code(self) -> ExitCode {
        let _ = self.0.print();
        if self.0.use_stderr() {
            Exit::Usage.into()
        } else {
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn send_takes_the_campaign_and_dry_run() {
        let cli = Cli::try_parse_from(["mailer", "send", "c.toml", "--dry-run"]).unwrap();
        match cli.command {
            Command::Send {
                campaign, dry_run, ..
            } => {
                assert_eq!(campaign, PathBuf::from("c.toml"));
                assert!(dry_run);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
