//! The command line: commands and flags. Doc comments here are the `--help` text.
//!
//! Pure apart from reading `std::env::args`. Usage errors exit 64 (sysexits), not clap's 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::exit::Exit;

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
    /// Write the first few messages of each locale as .eml files, for review before sending.
    Preview {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// Folder to write the .eml files into (one sub-folder per locale).
        #[arg(long)]
        out: PathBuf,
        /// How many messages to write per locale.
        #[arg(long, default_value_t = 3)]
        per_locale: usize,
    },
    /// Render, check and deliver the campaign: one message, one envelope, per recipient.
    ///
    /// Delivery keeps to `[rate]` (global and per domain), retries 4xx replies as `[retry]`
    /// says, pauses when the relay fails, and ends with a summary. Exit codes: 0 done, 1 done
    /// with failures, 69 relay unavailable, 75 work remaining (see the README).
    Send {
        /// The campaign file (campaign.toml).
        campaign: PathBuf,
        /// Run the whole pipeline but replace the transport with one that connects to nothing.
        #[arg(long)]
        dry_run: bool,
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
            Command::Send { campaign, dry_run } => {
                assert_eq!(campaign, PathBuf::from("c.toml"));
                assert!(dry_run);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
