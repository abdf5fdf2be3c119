//! Send, phase 5 — conclude: the summary, the run's end (and any halt the dispatcher could not
//! record) in the journal, and the exit code.

use std::path::Path;

use super::admit::Journaled;
use super::deliver::Delivered;
use crate::dispatch::FailureKind;
use crate::exit::{Exit, Failure};
use crate::outcome::State;
use crate::printable::Shown;
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
    if let (Err(error), Some(j)) = (&written, journaled) {
        return unrecorded(path, j, error, out);
    }
    let recorded = written.map_err(|e| Failure::new(Exit::IoError, format!("{e:#}")));
    summary.retried = ended.tally.retried;
    summary.relay_pauses = ended.tally.relay_pauses;
    summary.connections_refused = ended.tally.connections_refused;
    summary.regrown = ended.tally.regrown;
    summary.throttled = ended.tally.throttled.clone();
    for (domain, suspended) in &ended.tally.suspended {
        tracing::warn!(
            domain,
            until = %humantime::format_rfc3339_seconds(suspended.until),
            deferred = suspended.deferred,
            "domain suspended for throttling: its recipients are deferred until then, for a later run"
        );
        summary
            .suspended
            .insert(domain.clone(), (suspended.until, suspended.deferred));
    }
    for (domain, capped) in &ended.tally.capped {
        summary
            .capped
            .insert(domain.clone(), (capped.until, capped.deferred));
    }
    summary.waiting = ended.waiting.as_ref().map(|w| w.reason.clone());
    summary.print(out)?;
    if summary.dry_run {
        writeln!(
            out,
            "dry run: nothing was written or sent, and no connection was opened"
        )?;
    }
    let halted = producer_halt.or_else(|| ended.halted.clone());
    let exit = if halted.is_some() {
        Exit::Halted
    } else if let Some(failure) = &ended.failure {
        failure.kind.exit()
    } else if ended.interrupted.is_some() || ended.waiting.is_some() {
        Exit::WorkRemaining
    } else {
        summary.exit()
    };
    if let Some(j) = journaled {
        if let Some(waiting) = &ended.waiting
            && let Err(error) = j.journal.event(&j.slot, "waiting", &waiting.reason)
        {
            tracing::error!("cannot record why the run stopped in the journal: {error:#}");
        }
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
        let pending = summary.count(State::Pending);
        let message = match failure.kind {
            FailureKind::Local => format!(
                "the run stopped, {pending} recipients left pending: {}",
                failure.reason
            ),
            FailureKind::Outage => format!(
                "relay unavailable, {pending} recipients left pending: {}",
                failure.reason
            ),
            // Nothing is halted: once the setting is fixed, the next send goes on.
            FailureKind::Config => format!(
                "{} (the relay has taken nothing from this run; {pending} recipients left pending)",
                failure.reason
            ),
        };
        return Err(Failure::new(failure.kind.exit(), message).into());
    }
    if let Some(waiting) = ended.waiting {
        return Err(Failure::new(
            Exit::WorkRemaining,
            format!(
                "{}: {} recipients left pending, nothing is halted — `mailer send {}` then goes on",
                waiting.reason,
                summary.count(State::Pending),
                path.display()
            ),
        )
        .into());
    }
    if let Some(signal) = ended.interrupted {
        return Err(Failure::new(
            Exit::WorkRemaining,
            format!(
                "stopped by {signal}: {} recipients left pending, nothing is halted — the next `mailer send {}` goes on",
                summary.count(State::Pending),
                path.display()
            ),
        )
        .into());
    }
    Ok(exit)
}

/// The journal stopped taking the run's records (a full disk, say): the run stopped there, as
/// nothing may go out unrecorded. The summary is the journal's own counts — what the next run
/// will find — and the exit code 74; no halt is recorded, so the next run resumes once the
/// journal can be written.
fn unrecorded(
    path: &Path,
    j: &Journaled,
    error: &anyhow::Error,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let journal = j.journal.path();
    // Best effort (the disk may still be full): a run recorded as ended is not taken for one
    // whose write-ahead log was lost, should the log be merged and removed before the next.
    let _ = j.journal.event(
        &j.slot,
        "run",
        "ended with exit 74: the journal could not be written",
    );
    if let Ok(counts) = j.journal.counts(&j.slot) {
        let count = |name: &str| {
            usize::try_from(counts.get(name).copied().unwrap_or(0)).unwrap_or(usize::MAX)
        };
        let mut summary = Summary::default();
        for state in State::ALL {
            summary.add(state, count(state.name()));
        }
        let in_flight = count(crate::journal::RowState::InFlight.name());
        summary.add(State::Ambiguous, in_flight);
        writeln!(out, "as the journal `{}` has it:", Shown(journal.display()))?;
        summary.print(out)?;
        if in_flight > 0 {
            writeln!(
                out,
                "  ({in_flight} of the ambiguous were on the wire when the journal stopped: their outcome is unknown)"
            )?;
        }
    }
    Err(Failure::new(
        Exit::IoError,
        format!(
            "the journal `{}` could not be written ({error:#}); the run stopped so that nothing goes out unrecorded — once it can be written again, `mailer send {}` resumes where the journal says",
            Shown(journal.display()),
            Shown(path.display())
        ),
    )
    .into())
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
