//! `mailer plan`: everything `check` does, then what a send would do — counts, batches, the
//! least duration, the canary — and the fingerprint that approves it. A plan that can be sent
//! is recorded in the journal.

use std::path::Path;

use super::check::{Examination, examine};
use crate::config;
use crate::exit::Exit;
use crate::journal;
use crate::pipeline;
use crate::plan::{self, fingerprint};

/// A plan that can be sent is recorded in the journal, so that a later `send --approve` with
/// a stale fingerprint can say what changed since.
pub fn run(
    path: &Path,
    state_dir: Option<&Path>,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let mut report = Vec::new();
    let campaign = match config::parse_file(path)? {
        Ok(campaign) => campaign,
        Err(problems) => {
            Examination::failed(problems).print(&mut report)?;
            return plan_refused(&report, json, out);
        }
    };
    // The inputs are hashed before they are loaded: if a file changes in between, the
    // fingerprint is of the older version and a send of what was shown here is refused,
    // never the other way round.
    let inputs = fingerprint::inputs(&campaign)?;
    let examination = examine(campaign)?;
    examination.print(&mut report)?;
    let Some((loaded, summary)) = &examination.loaded else {
        return plan_refused(&report, json, out);
    };
    let invalid = pipeline::invalid_lines(&examination.problems);
    let canary = plan::canary_rows(
        &loaded.campaign,
        &loaded.list,
        loaded.renderer.locales(),
        &invalid,
    )
    .unwrap_or_default()
    .into_iter()
    .map(|(address, row)| plan::CanaryPick {
        address: address.key.to_string(),
        line: row.line,
        locale: loaded
            .renderer
            .locales()
            .tag(
                loaded
                    .renderer
                    .locales()
                    .resolve(row.locale(&loaded.list.columns)),
            )
            .to_owned(),
    })
    .collect();
    let sendable = examination.sendable();
    let counts = plan::Counts {
        messages: examination.rendered,
        invalid: invalid.len(),
        locales: &summary.locales,
        locale_requests: &examination.locale_requests,
        domains: &summary.domains,
        errors: examination.problems.errors(),
        warnings: examination.problems.warnings(),
        sendable,
    };
    let mut plan = plan::Plan::new(&loaded.campaign, &loaded.list, &counts, inputs, canary);
    plan.with_calendar(
        &loaded.campaign,
        &summary.domains,
        crate::clock::calendar_now()?,
    );
    let text = serde_json::to_string(&plan)?;
    if json {
        writeln!(out, "{text}")?;
    } else {
        out.write_all(&report)?;
        plan.print(&path.display().to_string(), out)?;
    }
    if !sendable {
        if json {
            // The exit code says it already; a closed standard error must not change it.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), &report);
        }
        return Ok(Exit::InvalidInput);
    }
    // Another journal than the campaign's is refused (as `send` would refuse it).
    let located = journal::locate(path, state_dir, &loaded.campaign.id, journal::Intent::Write)?;
    let at = located.place.journal.clone();
    let recorded = Ok(located)
        .and_then(|located| {
            let journal = journal::Journal::open_located(
                &located,
                &loaded.campaign.id,
                true,
                journal::Durability::Full,
            )?;
            journal.settle_if_idle(&located.place, &loaded.campaign.id)?;
            Ok(journal)
        })
        .and_then(|journal| {
            journal.record_plan(
                &plan.fingerprint,
                &plan.inputs,
                &text,
                &loaded.list.suppression,
            )
        });
    if let Err(error) = recorded.map_err(journal::named(&at)) {
        // The fingerprint approves a send all the same; only "what changed since" is lost.
        tracing::warn!("the plan could not be recorded in the journal: {error:#}");
    }
    Ok(Exit::Complete)
}

/// A campaign that cannot be planned: `check`'s report (on stderr for `--json`), exit 65.
fn plan_refused(report: &[u8], json: bool, out: &mut impl std::io::Write) -> anyhow::Result<Exit> {
    if json {
        std::io::Write::write_all(&mut std::io::stderr(), report)?;
    } else {
        out.write_all(report)?;
    }
    Ok(Exit::InvalidInput)
}
