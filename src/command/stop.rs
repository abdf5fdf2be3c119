//! `mailer stop`: the kill switch. Records a halt in the journal; a running send starts no new
//! message within a second, and every later send exits 3 until `mailer resume`.

use std::path::Path;

use super::{Access, journal_for};
use crate::exit::Exit;
use crate::journal;

pub fn run(path: &Path, state_dir: Option<&Path>, reason: &str) -> anyhow::Result<Exit> {
    let (campaign, journal) = journal_for(path, state_dir, Access::Create)?;
    journal.halt("", "mailer stop", reason)?;
    let halt = journal.active_halt()?;
    println!(
        "campaign `{}` is halted ({}): a running send starts no new message within a second and exits 3; so does every later send until `mailer resume {}`",
        campaign.id,
        halt.map_or_else(String::new, |h| h.reason),
        path.display()
    );
    if !campaign.existed {
        println!(
            "note: no send had run yet (the journal `{}` was created to hold the stop; every send of this campaign uses it)",
            journal.path().display()
        );
    } else if journal::Lock::acquire(&campaign.lock, &campaign.id).is_ok() {
        println!("no send is running now; the next one exits 3 at once");
    }
    Ok(Exit::Complete)
}
