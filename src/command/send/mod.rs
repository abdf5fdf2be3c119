//! `mailer send` (and `send --dry-run`, `send --stage canary`): validate everything, then
//! deliver whoever the journal says is due, recording every step. In phases, each in its
//! module:
//!
//! 1. [`admit`]: approval, schedule slot, lock, halt, approved fingerprint, canary stage done,
//!    unfinished slots, frozen inputs — before anything is loaded;
//! 2. load and validate: every recipient's message made and guarded ([`crate::pipeline`]);
//! 3. [`due`]: who the journal says is due, after settling what a dead run left in flight;
//! 4. [`deliver`]: the one delivery path, shared with the [`canary`] stage;
//! 5. [`conclude`]: the summary, the run's end in the journal, and the exit code.

mod admit;
mod canary;
mod conclude;
mod deliver;
mod due;
pub mod signals;

use std::path::Path;
use std::time::Instant;

use crate::cli;
use crate::clock;
use crate::config;
use crate::exit::Exit;
use crate::journal;
use crate::outcome::State;
use crate::pipeline;
use crate::plan;
use crate::problem::{self, Problems};
use crate::report;

/// How `send` was asked to run: the command line's flags, one field each.
#[allow(clippy::struct_excessive_bools)]
pub struct Options<'a> {
    pub dry_run: bool,
    /// How much of what validation rendered may be kept to send (see [`pipeline::KEEP_BYTES`]); past
    /// it, messages are rendered and guarded again while sending.
    pub keep_bytes: usize,
    /// A progress bar (terminal) rather than log lines.
    pub interactive: bool,
    pub state_dir: Option<&'a Path>,
    pub accept_changed_inputs: bool,
    /// An explicit schedule slot (RFC 3339).
    pub slot: Option<&'a str>,
    /// `--approve`: the reviewed plan's fingerprint (required over SMTP).
    pub approve: Option<&'a plan::Approval>,
    /// `--stage canary`: only the `[safety] canary` messages.
    pub stage: Option<cli::Stage>,
    /// `--limit`: at most this many messages in this run.
    pub limit: Option<usize>,
    /// `--move-journal`: the journal was moved to `state_dir` on purpose.
    pub move_journal: bool,
}

impl Options<'_> {
    fn canary(&self) -> bool {
        self.stage == Some(cli::Stage::Canary)
    }
}

/// Runs `send` as asked.
pub fn run(
    path: &Path,
    options: &Options<'_>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let dry_run = options.dry_run;
    let date = clock::now();
    let campaign = config::load(path)?;
    for warning in pipeline::exposed_secrets(&campaign) {
        tracing::warn!("{warning}");
    }
    admit::require_approval(path, &campaign, options)?;
    // From here a signal stops the run gracefully (see `signals`): validation goes on, and
    // delivery then starts nothing.
    let interrupts = signals::Interrupts::watch()?;
    if options.canary() {
        return canary::run(path, campaign, options, &interrupts, out);
    }
    // Refuse a halted, locked, changed or not-yet-due campaign before the long work.
    let mut journaled = if dry_run {
        None
    } else {
        Some(admit::admit(path, &campaign, options)?)
    };
    let named = |j: Option<&admit::Journaled>, error: anyhow::Error| match j {
        Some(j) => journal::named(j.journal.path())(error),
        None => error,
    };
    // Nothing due (a finished campaign, say): its own exit, whatever the window or the cap.
    if let Some(exit) =
        due::idle(journaled.as_ref(), &campaign, out).map_err(|e| named(journaled.as_ref(), e))?
    {
        return Ok(exit);
    }
    // Outside a send window, or with the day's cap reached: exit 75 before the long work.
    let mut daily = match &journaled {
        Some(j) => admit::daily(&campaign, j).map_err(|e| named(Some(j), e))?,
        None => None,
    };
    let mut loaded = pipeline::load_campaign(campaign)?.map_err(Problems::into_failure)?;
    if let Some(j) = &journaled {
        loaded.renderer.for_slot(&j.slot);
    }
    let (mut loaded, validation) = pipeline::validated(loaded, date, options.keep_bytes)?;
    pipeline::expect_count(&loaded)?;
    let mut summary = validation.summary;
    summary.dry_run = dry_run;
    let skipped = validation.problems.errors_of(problem::Kind::Row);
    for group in validation
        .problems
        .grouped()
        .iter()
        .filter(|g| g.first.kind == problem::Kind::Row)
    {
        tracing::warn!("skipped as invalid ([safety] max_invalid): {group}");
    }
    let invalid = pipeline::invalid_rows(&validation.problems);
    let mut setup = deliver::Setup::new(&loaded.campaign, dry_run)?;
    setup.interrupt = Some(interrupts.received.clone());
    let (due, settled) = due::due(journaled.as_mut(), &loaded, &invalid, skipped, out)
        .map_err(|e| named(journaled.as_ref(), e))?;
    for (state, count) in &settled {
        summary.add(*state, *count);
    }
    let total = loaded.list.recipients.len();
    // Rows of the list that rendered: the CSV's invalid rows never made it into the list.
    let sendable = total - (skipped - loaded.list.problems.errors_of(problem::Kind::Row));
    let due_count = due
        .as_ref()
        .map_or(sendable, std::collections::HashMap::len);
    tracing::info!(campaign = %loaded.campaign.id, recipients = total, due = due_count, dry_run, "sending");
    if let Some(j) = &journaled {
        journal_the_run(j, &mut setup.pacer, due_count).map_err(|e| named(Some(j), e))?;
        let (writer, recorder) =
            journal::Writer::start(&j.journal, j.durability).map_err(|e| named(Some(j), e))?;
        setup.journal = Some((writer, recorder.with_slot(&j.slot)));
        setup.halts = Some(j.journal.path().to_owned());
        if !loaded.campaign.suppress.is_empty() {
            // The set read at load seeds the live one (no second read).
            let set = std::mem::take(&mut loaded.list.suppression);
            setup.suppressed = Some(std::sync::Arc::new(std::sync::RwLock::new(set)));
        }
    }
    if let Some(daily) = &mut daily {
        daily.restart(clock::calendar_now()?);
    }
    setup.daily = daily;
    let started = Instant::now();
    let mut progress = report::Progress::new(
        options.limit.map_or(due_count, |n| n.min(due_count)) as u64,
        options.interactive,
    );
    let delivered = deliver::deliver(
        setup,
        |channel| match validation.messages {
            Some(messages) => {
                deliver::feed(messages, &due, options.limit, channel);
                Ok(())
            }
            None => deliver::produce(&loaded, date, &due, options.limit, channel),
        },
        |delivery| {
            if delivery.state != State::Sent {
                tracing::warn!(line = delivery.line, recipient = %delivery.recipient, state = %delivery.state, attempts = delivery.attempts, detail = %delivery.detail);
            }
            progress.advance(delivery.state);
            summary.record(delivery);
        },
    )?;
    progress.finish();
    // Every recipient due that the workers did not report on is still pending: counts add up.
    let reported = summary.total() - settled.values().sum::<usize>();
    summary.add(State::Pending, due_count - reported);
    summary.elapsed = Some(started.elapsed());
    conclude::conclude(path, summary, delivered, journaled.as_ref(), out)
}

/// How long after its end a suspension's reduced pace still starts its domain slow.
const CARRY_THROTTLE_FOR: i64 = 24 * 3_600_000;

/// Before the first message: limits hold across a restart (the last run's recent attempts
/// count; a domain suspended for throttling stays suspended until its time and then starts
/// at the pace it had), and the run's start is recorded.
fn journal_the_run(
    j: &admit::Journaled,
    pacer: &mut crate::dispatch::Pacer,
    due_count: usize,
) -> anyhow::Result<()> {
    let now_ms = clock::now_millis();
    let (latest, domains) = j.journal.recent_attempts(now_ms - 3_600_000)?;
    let ago = |at: i64| std::time::Duration::from_millis(u64::try_from(now_ms - at).unwrap_or(0));
    let domains: Vec<(String, std::time::Duration)> =
        domains.into_iter().map(|(d, at)| (d, ago(at))).collect();
    pacer.carry_over(latest.map(ago), &domains);
    let due_ms = clock::millis(clock::due_now()?);
    for suspended in j.journal.suspensions(due_ms - CARRY_THROTTLE_FOR)? {
        let until = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(u64::try_from(suspended.until).unwrap_or(0));
        if suspended.until > due_ms {
            let remaining = std::time::Duration::from_millis(
                u64::try_from(suspended.until - due_ms).unwrap_or(0),
            );
            tracing::warn!(domain = %suspended.domain, until = %humantime::format_rfc3339_seconds(until), "domain still suspended: nothing goes to it before then");
            pacer.carry_suspension(crate::dispatch::Suspension {
                domain: suspended.domain.clone(),
                until,
                remaining,
                detail: suspended.detail,
            });
        }
        tracing::info!(domain = %suspended.domain, per_second = suspended.per_second, normal = suspended.ceiling, "domain suspended by an earlier run for throttling: it starts at the pace it had, easing back up");
        pacer.carry_throttle(&suspended.domain, suspended.per_second, suspended.ceiling);
    }
    j.journal.run_started(
        &j.slot,
        &format!("started by process {}: {due_count} due", std::process::id()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example campaign, dry run, with everything kept from validation or nothing.
    fn dry_run(keep_bytes: usize) -> (Exit, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let mut out = Vec::new();
        let options = Options {
            dry_run: true,
            keep_bytes,
            interactive: false,
            state_dir: None,
            accept_changed_inputs: false,
            slot: None,
            approve: None,
            stage: None,
            limit: None,
            move_journal: false,
        };
        let exit = run(&path, &options, &mut out).unwrap();
        // Timings differ from run to run.
        let text = String::from_utf8(out).unwrap();
        let steady: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("  elapsed") && !l.starts_with("  sent per second"))
            .collect();
        (exit, steady.join("\n"))
    }

    #[test]
    fn a_list_too_large_to_keep_is_rendered_again_with_the_same_outcome() {
        let (kept_exit, kept) = dry_run(pipeline::KEEP_BYTES);
        let (again_exit, again) = dry_run(0);
        assert_eq!((kept_exit, again_exit), (Exit::Complete, Exit::Complete));
        assert!(
            again.contains("would be sent (dry run)         19"),
            "{again}"
        );
        assert_eq!(kept, again);
    }
}
