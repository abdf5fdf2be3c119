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
    let mut status = journal
        .latest_slot()
        .and_then(|slot| journal.status(&campaign.id, &slot.unwrap_or_default()))
        .map_err(journal::named(journal.path()))?;
    // Why it waits, when the campaign file reads (status works from the journal alone too).
    if !status.complete
        && let Ok(Ok(config)) = crate::config::parse_file(path)
    {
        let now = crate::clock::calendar_now()?;
        let daily = journal
            .daily(&config.schedule.calendar, &config.rate.daily, now)
            .map_err(journal::named(journal.path()))?;
        if let Some(mut daily) = daily {
            status.capped = daily.capped();
            status.waiting = daily.blocked(now).map(|w| w.reason);
        }
    }
    if json {
        serde_json::to_writer(&mut *out, &status)?;
        writeln!(out)?;
    } else {
        report::print_status(&status, out)?;
    }
    Ok(Exit::Complete)
}
