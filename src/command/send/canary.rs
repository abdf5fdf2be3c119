//! `send --stage canary`: the `[safety] canary` addresses get one message each, made from real
//! rows (see [`plan::canary_rows`]), through the campaign's transport, limits and guard, and
//! the same delivery path as the full send. Their outcomes are journaled apart from the
//! recipients', under the approved fingerprint; an address already accepted for these inputs
//! is not sent again.

use std::collections::HashSet;
use std::path::Path;

use super::Options;
use super::admit;
use super::deliver::{self, Delivered};
use crate::clock;
use crate::config::Campaign;
use crate::dispatch::Queued;
use crate::exit::{Exit, Failure};
use crate::journal;
use crate::outcome::{Delivery, State};
use crate::pipeline;
use crate::plan;
use crate::printable::Shown;
use crate::problem::Problems;
use crate::render::OutgoingMessage;
use crate::report::Summary;

/// Runs the canary stage.
pub fn run(
    path: &Path,
    campaign: Campaign,
    options: &Options<'_>,
    interrupts: &super::signals::Interrupts,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    if campaign.safety.canary.is_empty() {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "campaign `{}` has no `[safety] canary` addresses: there is no canary stage to send",
                campaign.id
            ),
        )
        .into());
    }
    let date = clock::now();
    let mut journaled = if options.dry_run {
        None
    } else {
        Some(admit::admit(path, &campaign, options)?)
    };
    let loaded = pipeline::load_campaign(campaign)?.map_err(Problems::into_failure)?;
    let (loaded, validation) = pipeline::validated(loaded, date, 0)?;
    pipeline::expect_count(&loaded)?;
    let done = match &journaled {
        Some(j) => j.journal.canary_sent(&j.approved)?,
        None => HashSet::new(),
    };
    let messages = messages(&loaded, &validation.problems, &done, date)?;
    let approved = journaled
        .as_ref()
        .map(|j| plan::short(&j.approved).to_owned());
    let next = format!(
        "mailer send {}{}",
        Shown(path.display()),
        approved
            .as_ref()
            .map(|a| format!(" --approve {a}"))
            .unwrap_or_default()
    );
    if messages.is_empty() {
        writeln!(
            out,
            "the canary stage is already done for these inputs: every canary address accepted its message; next: {next}"
        )?;
        return Ok(Exit::Complete);
    }
    let count = messages.len();
    let mut setup = deliver::Setup::new(&loaded.campaign, options.dry_run)?;
    setup.halts = journaled.as_ref().map(|j| j.journal.path().to_owned());
    setup.interrupt = Some(interrupts.received.clone());
    let mut deliveries = Vec::new();
    let Delivered {
        ended,
        producer_halt,
        ..
    } = deliver::deliver(
        setup,
        |channel| {
            for message in messages {
                let queued = Queued {
                    message,
                    entry: None,
                };
                if channel.send_blocking(queued).is_err() {
                    break;
                }
            }
            Ok(())
        },
        |delivery| deliveries.push(delivery),
    )?;
    if let Some(j) = journaled.as_mut() {
        j.journal
            .record_canary(&j.approved, &outcomes(&deliveries))?;
    }
    let dry = if options.dry_run { " (dry run)" } else { "" };
    writeln!(out, "canary stage{dry}: {count} message(s)")?;
    let mut summary = Summary::default();
    for delivery in deliveries {
        print_delivery(&delivery, options.dry_run, out)?;
        summary.record(delivery);
    }
    summary.add(State::Pending, count - summary.total());
    if let Some(reason) = producer_halt.or(ended.halted) {
        return Err(Failure::new(Exit::Halted, format!("halted: {reason}")).into());
    }
    if let Some(failure) = ended.failure {
        let what = match failure.kind {
            crate::dispatch::FailureKind::Config => "the relay cannot be used as configured",
            _ => "relay unavailable",
        };
        return Err(Failure::new(
            failure.kind.exit(),
            format!("{what} during the canary stage: {}", failure.reason),
        )
        .into());
    }
    let exit = summary.exit();
    if exit == Exit::Complete && !options.dry_run {
        writeln!(
            out,
            "canary stage done: look at what the canary mailboxes got; the campaign is sent with: {next}"
        )?;
    }
    Ok(exit)
}

/// The canary messages not yet accepted for these inputs (`done`), made and guarded; any that
/// cannot be refuses the stage (exit 65) with nothing sent.
fn messages(
    loaded: &pipeline::Loaded,
    problems: &Problems,
    done: &HashSet<String>,
    date: std::time::SystemTime,
) -> anyhow::Result<Vec<OutgoingMessage>> {
    let rows = plan::canary_rows(
        &loaded.campaign,
        &loaded.list,
        loaded.renderer.locales(),
        &pipeline::invalid_lines(problems),
    )
    .map_err(|problem| Failure::new(Exit::InvalidInput, problem.to_string()))?;
    let mut messages = Vec::new();
    for (address, row) in rows {
        if done.contains(&*address.key) {
            continue;
        }
        let message = pipeline::prepare_canary(loaded, row, &address, date).map_err(|problem| {
            Failure::new(
                Exit::InvalidInput,
                format!("the canary message to `{address}`: {problem}; nothing was sent"),
            )
        })?;
        messages.push(message);
    }
    Ok(messages)
}

/// The canary's outcomes as the journal keeps them.
fn outcomes(deliveries: &[Delivery]) -> Vec<journal::review::CanaryOutcome> {
    deliveries
        .iter()
        .map(|d| journal::review::CanaryOutcome {
            address: d.recipient.clone(),
            line: d.line,
            locale: d.locale.clone(),
            state: d.state.name().to_owned(),
            attempts: d.attempts,
            detail: d.detail.clone(),
        })
        .collect()
}

fn print_delivery(
    delivery: &Delivery,
    dry_run: bool,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let state = if dry_run && delivery.state == State::Sent {
        "would send"
    } else {
        delivery.state.name()
    };
    writeln!(
        out,
        "  {state:<10} {}  (line {}, {}){}",
        Shown(&delivery.recipient),
        delivery.line,
        Shown(&delivery.locale),
        if delivery.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", Shown(&delivery.detail))
        }
    )
}
