//! `mailer stop`: the kill switch. Records a halt in the journal; a running send starts no new
//! message within a second, and every later send exits 3 until `mailer resume`.

use std::path::Path;

use super::{Access, journal_for};
use crate::exit::Exit;
use crate::journal;
use crate::printable::Shown;

pub fn run(
    path: &Path,
    state_dir: Option<&Path>,
    reason: &str,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let (campaign, journal) = journal_for(path, state_dir, Access::Create)?;
    let halt = journal
        .halt("", "mailer stop", reason)
        .and_then(|()| journal.active_halt())
        .map_err(journal::named(journal.path()))?;
    writeln!(
        out,
        "campaign `{}` is halted ({}): a running send starts no new message within a second and exits 3; so does every later send until `mailer resume {}`",
        campaign.id,
        Shown(halt.map_or_else(String::new, |h| h.reason)),
        Shown(path.display())
    )?;
    if !campaign.existed {
        writeln!(
            out,
            "note: no send had run yet (the journal `{}` was created to hold the stop; every send of this campaign uses it)",
            Shown(journal.path().display())
        )?;
    } else if journal::Lock::acquire(&campaign.lock, &campaign.id).is_ok() {
        writeln!(out, "no send is running now; the next one exits 3 at once")?;
    }
    Ok(Exit::Complete)
}
