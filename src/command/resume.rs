//! `mailer resume`: clears a stop or a breaker trip.

use std::path::Path;

use super::{Access, journal_for};
use crate::exit::Exit;

pub fn run(path: &Path, state_dir: Option<&Path>) -> anyhow::Result<Exit> {
    let (campaign, journal) = journal_for(path, state_dir, Access::Write)?;
    match journal.clear_halt("mailer resume")? {
        Some(halt) => println!(
            "campaign `{}` may be sent again (the halt by {} was: {})",
            campaign.id, halt.by, halt.reason
        ),
        None => println!("campaign `{}` was not halted", campaign.id),
    }
    Ok(Exit::Complete)
}
