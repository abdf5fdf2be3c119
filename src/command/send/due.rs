//! Send, phase 3 — due: who this run sends to. From the journal, after settling what a dead
//! run left in flight; in a dry run, every row that rendered.

use std::collections::BTreeMap;

use super::admit::Journaled;
use super::deliver::Due;
use crate::clock;
use crate::config::{self, Campaign};
use crate::exit::Exit;
use crate::journal;
use crate::outcome::State;
use crate::pipeline::Loaded;
use crate::printable::Shown;
use crate::report::Summary;

/// A cron call on a campaign with nothing due (finished, or waiting for a backoff) and
/// unchanged inputs: nothing to render, nothing to send. Says where it stands; the exit code
/// when the run is over.
pub fn idle(
    journaled: Option<&Journaled>,
    campaign: &Campaign,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Option<Exit>> {
    let Some(j) = journaled.filter(|j| !j.inputs_changed) else {
        return Ok(None);
    };
    let retry_ambiguous = campaign.retry.on_ambiguous == config::OnAmbiguous::Retry;
    let now = clock::millis(clock::due_now()?);
    let Some(counts) = j.journal.idle(&j.slot, now, retry_ambiguous)? else {
        return Ok(None);
    };
    let mut summary = Summary {
        elapsed: Some(std::time::Duration::ZERO),
        ..Summary::default()
    };
    for state in State::ALL {
        summary.add(state, counts.get(state.name()).copied().unwrap_or(0));
    }
    summary.print(out)?;
    writeln!(
        out,
        "nothing due: every recipient of this run is settled or waiting for its retry time (`mailer status` shows when)"
    )?;
    for suspended in j.journal.suspensions(now)? {
        writeln!(
            out,
            "suspended: {} until {} (it kept throttling)",
            Shown(&suspended.domain),
            journal::query::time(suspended.until)
        )?;
    }
    Ok(Some(summary.exit()))
}

/// Who is due, and how many recipients are settled by state (not due in this run).
pub fn due(
    journaled: Option<&mut Journaled>,
    loaded: &Loaded,
    invalid: &BTreeMap<u64, String>,
    skipped: usize,
    out: &mut impl std::io::Write,
) -> anyhow::Result<(Due, BTreeMap<State, usize>)> {
    let Some(j) = journaled else {
        let mut settled = BTreeMap::new();
        settled.insert(State::Suppressed, loaded.list.suppressed.len());
        settled.insert(State::Invalid, skipped);
        return Ok((None, settled));
    };
    let locales = loaded.renderer.locales();
    let locale = |recipient: &crate::recipients::Recipient| {
        locales
            .tag(locales.resolve(recipient.locale(&loaded.list.columns)))
            .to_owned()
    };
    let roster = journal::Roster {
        recipients: &loaded.list.recipients,
        suppressed: &loaded.list.suppressed,
        invalid,
        locale: &locale,
    };
    let retry_ambiguous = loaded.campaign.retry.on_ambiguous == config::OnAmbiguous::Retry;
    let sync = j.journal.sync(
        &j.slot,
        &roster,
        retry_ambiguous,
        clock::millis(clock::due_now()?),
    )?;
    if !sync.recovered.is_empty() {
        writeln!(
            out,
            "{} recipient(s) were in flight when the last run stopped; their outcome is unknown, so they are recorded as ambiguous{}:",
            sync.recovered.len(),
            if retry_ambiguous {
                " and sent again ([retry] on_ambiguous = \"retry\")"
            } else {
                " and not sent again"
            }
        )?;
        for (line, address) in &sync.recovered {
            writeln!(out, "  line {line}  {}", Shown(address))?;
            tracing::warn!(line, recipient = %address, "in flight when the last run stopped: ambiguous");
        }
    }
    if sync.due.is_empty()
        && let Some(next) = sync.next_due
    {
        writeln!(
            out,
            "nothing due now: the next deferred recipient may be tried at {}",
            journal::query::time(next)
        )?;
    }
    if sync.retried_ambiguous > 0 {
        tracing::warn!(
            count = sync.retried_ambiguous,
            "ambiguous recipients sent again ([retry] on_ambiguous = \"retry\")"
        );
    }
    Ok((Some(sync.due), sync.settled))
}
