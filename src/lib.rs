//! `mailer`: bulk email campaigns, one envelope per recipient.
//!
//! The modules are listed in the order of the pipeline; each imports only the modules above
//! it (ARCHITECTURE.md gives the order, and a test holds the code to it):
//!
//! ```text
//! campaign.toml ─► config ─► recipients ─► render ─► guard ─► plan ─► dispatch ─► journal ─► report
//! ```
//!
//! Below the stages, the vocabulary they share: [`exit`] codes, values made [`printable`],
//! [`problem`]s with file and line, bounded reads of the campaign's [`files`], the [`clock`],
//! normalised [`address`]es and the [`outcome`] of a delivery. Above
//! them, [`pipeline`] (load, render and guard every recipient: the front that `check`, `plan`,
//! `preview` and `send` share), the command line ([`cli`]) and one module per [`command`].
//! `main.rs` only maps the result of [`run`] to an exit code.

// The vocabulary.
pub mod exit;
pub mod printable;
pub mod problem;
pub mod files;
pub mod clock;
pub mod address;
pub mod outcome;
pub mod bounce;

// The stages, in pipeline order.
pub mod config;
pub mod recipients;
pub mod render;
pub mod guard;
pub mod plan;
pub mod dispatch;
pub mod journal;
pub mod report;

// What the commands share, and the commands.
pub mod pipeline;
pub mod cli;
pub mod command;

use exit::Exit;

/// Runs one command. Errors carry their exit code (see [`exit::Exit::of_error`]).
pub fn run(cli: &cli::Cli) -> anyhow::Result<Exit> {
    command::run(cli)
}
