//! `mailer resume`: clears a stop or a breaker trip.

use std::path::Path;

use super::{Access, journal_for};
use crate::exit::Exit;
use crate::printable::Shown;

pub fn run(
    path: &Path,
    state_dir: Option<&Path>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let (campaign, journal) = journal_for(path, state_dir, Access::Write)?;
    let cleared = journal
        .clear_halt("mailer resume")
        .map_err(crate::journal::named(journal.path()))?;
    match cleared {
        Some(halt) => writeln!(
            out,
            "campaign `{}` may be sent again (the halt by {} was: {})",
            campaign.id,
            Shown(&halt.by),
            Shown(&halt.reason)
        )?,
        None => writeln!(out, "campaign `{}` was not halted", campaign.id)?,
    }
    Ok(Exit::Complete)
}
