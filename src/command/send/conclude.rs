//! Send, phase 5 — conclude: the summary, the run's end (and any halt the dispatcher could not
//! record) in the journal, and the exit code.

use std::path::Path;

use super::admit::Journaled;
use super::deliver::Delivered;
use crate::exit::{Exit, Failure};
use crate::outcome::State;
use crate::report::Summary;

/// Prints the summary and gives the run's exit code, or its failure.
pub fn conclude(
    path: &Path,
    mut summary: Summary,
    delivered: Delivered,
    journaled: Option<&Journaled>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let Delivered {
        ended,
        written,
        producer_halt,
    } = delivered;
    // A journal that cannot be written halts the campaign: nothing may go out unrecorded.
    let recorded = written.map_err(|e| Failure::new(Exit::Halted, format!("halted: {e:#}")));
    summary.retried = ended.tally.retried;
    summary.relay_pauses = ended.tally.relay_pauses;
    summary.connections_retired = ended.tally.connections_retired;
    summary.throttled = ended.tally.throttled.clone();
    summary.print(out)?;
    if summary.dry_run {
        writeln!(
            out,
            "dry run: nothing was written or sent, and no connection was opened"
        )?;
    }
    let halted = producer_halt.or_else(|| ended.halted.clone());
    // A journal that failed to take the run's records halts the campaign (exit 3). The
    // bookkeeping after the summary is best effort: the journal may be the thing that is broken.
    let halted = match (&recorded, halted) {
        (Err(failure), None) => Some(failure.message.clone()),
        (_, halted) => halted,
    };
    let exit = if halted.is_some() {
        Exit::Halted
    } else if ended.failure.is_some() {
        Exit::RelayUnavailable
    } else {
        summary.exit()
    };
    if let Some(j) = journaled {
        record_end(j, ended.halted.is_none(), halted.as_deref(), exit, &summary);
    }
    recorded?;
    if let Some(reason) = halted {
        return Err(Failure::new(
            Exit::Halted,
            format!(
                "halted: {reason}; {} recipients left pending — `mailer resume {}` allows sending again",
                summary.count(State::Pending),
                path.display()
            ),
        )
        .into());
    }
    if let Some(failure) = ended.failure {
        return Err(Failure::new(
            Exit::RelayUnavailable,
            format!(
                "relay unavailable, {} recipients left pending: {}",
                summary.count(State::Pending),
                failure.reason
            ),
        )
        .into());
    }
    Ok(exit)
}

/// Records the run's end, best effort. The scheduler records the halts it acts on the moment
/// they happen (so that a `mailer resume` while the last messages drain is not undone here);
/// `halted` is recorded only when it is one it could not: the journal itself failing, the
/// rendering thread dying (`unrecorded`).
fn record_end(
    j: &Journaled,
    unrecorded: bool,
    halted: Option<&str>,
    exit: Exit,
    summary: &Summary,
) {
    if unrecorded
        && let Some(reason) = halted
        && let Err(error) = j.journal.halt(&j.slot, "breaker", reason)
    {
        tracing::error!("cannot record the halt in the journal: {error:#}");
    }
    let ended = j.journal.event(
        &j.slot,
        "run",
        &format!(
            "ended with exit {}: {} sent, {} pending",
            exit as u8,
            summary.count(State::Sent),
            summary.count(State::Pending)
        ),
    );
    if let Err(error) = ended {
        tracing::error!("cannot record the end of the run in the journal: {error:#}");
    }
}
