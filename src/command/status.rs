//! `mailer status`: where a campaign stands, from its journal (human or `--json`).

use std::path::Path;

use super::{Access, journal_for};
use crate::exit::Exit;
use crate::journal;
use crate::report;

pub fn run(
    path: &Path,
    state_dir: Option<&Path>,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let (campaign, journal) = journal_for(path, state_dir, Access::Read)?;
    let status = journal
        .latest_slot()
        .and_then(|slot| journal.status(&campaign.id, &slot.unwrap_or_default()))
        .map_err(journal::named(journal.path()))?;
    if json {
        serde_json::to_writer(&mut *out, &status)?;
        writeln!(out)?;
    } else {
        report::print_status(&status, out)?;
    }
    Ok(Exit::Complete)
}
