//! Send, phase 1 — admit: whether this run may start at all, decided before anything is
//! loaded or rendered. The order is the order of the checks: approval (over SMTP), the
//! schedule slot, the campaign's lock, a halt in force, the approved fingerprint, the canary
//! stage done, an unfinished earlier cron slot, and the inputs frozen at the slot's first run.

use std::path::Path;

use super::Options;
use crate::clock;
use crate::config::{self, Campaign};
use crate::dispatch;
use crate::exit::{Exit, Failure};
use crate::journal;
use crate::plan::{self, fingerprint};
use crate::recipients;

/// The slot key of this run: `''` without cron, else the slot's RFC 3339 time. Fails with
/// exit 75 before `not_before` or the first slot.
fn slot_of(campaign: &Campaign, asked: Option<&str>) -> anyhow::Result<String> {
    let now = clock::schedule_now()?;
    let key =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if let Some(asked) = asked {
        let time = chrono::DateTime::parse_from_rfc3339(asked)
            .map_err(|e| {
                Failure::new(
                    Exit::Usage,
                    format!("--slot `{asked}` is not an RFC 3339 time: {e}"),
                )
            })?
            .to_utc();
        if campaign.schedule.cron.is_none() || !campaign.schedule.is_slot(time) || time > now {
            return Err(Failure::new(
                Exit::Usage,
                format!("--slot `{asked}` is not a past slot of this campaign's `[schedule] cron`"),
            )
            .into());
        }
        return Ok(key(time));
    }
    match campaign.schedule.due(now) {
        config::Due::Now { slot } => Ok(slot.map(key).unwrap_or_default()),
        config::Due::NotYet { until } => Err(Failure::new(
            Exit::WorkRemaining,
            format!(
                "campaign `{}` is not due yet: its next run may start at {} ([schedule]); nothing was sent",
                campaign.id,
                key(until)
            ),
        )
        .into()),
    }
}

/// The campaign's send windows and daily caps as they stand now, with what the journal counts
/// today (`None` when it has neither). Fails with exit 75 outside a window or once the day's
/// cap is reached: nothing is loaded or sent.
pub fn daily(campaign: &Campaign, j: &Journaled) -> anyhow::Result<Option<dispatch::Daily>> {
    let now = clock::calendar_now()?;
    let Some(mut daily) =
        j.journal
            .daily(&campaign.schedule.calendar, &campaign.rate.daily, now)?
    else {
        return Ok(None);
    };
    if let Some(waiting) = daily.blocked(daily.start()) {
        return Err(Failure::new(
            Exit::WorkRemaining,
            format!(
                "campaign `{}` is waiting: {}; nothing was sent",
                campaign.id, waiting.reason
            ),
        )
        .into());
    }
    Ok(Some(daily))
}

/// What a journaled run holds: the lock, the journal and the slot.
pub struct Journaled {
    _lock: journal::Lock,
    pub journal: journal::Journal,
    pub slot: String,
    pub durability: journal::Durability,
    /// The inputs differ from those frozen (and the change was accepted).
    pub inputs_changed: bool,
    /// The fingerprint of the inputs as reviewed: the canary stage is recorded under it.
    pub approved: String,
}

/// Takes the campaign's lock, opens its journal, refuses a halted campaign and checks the
/// inputs against those frozen at the slot's first run.
pub fn admit(path: &Path, campaign: &Campaign, options: &Options<'_>) -> anyhow::Result<Journaled> {
    // The canary stage belongs to no schedule slot: it runs before the first one is due.
    let slot = if options.canary() {
        String::new()
    } else {
        slot_of(campaign, options.slot)?
    };
    let (lock, journal, durability) = open(path, campaign, options)?;
    let at = journal.path().to_owned();
    check(path, campaign, options, lock, journal, durability, slot).map_err(journal::named(&at))
}

/// [`admit`] once the journal is open: the checks that read and write it.
fn check(
    path: &Path,
    campaign: &Campaign,
    options: &Options<'_>,
    lock: journal::Lock,
    journal: journal::Journal,
    durability: journal::Durability,
    slot: String,
) -> anyhow::Result<Journaled> {
    if options.slot.is_none() {
        not_before_started(campaign, &journal, &slot)?;
    }
    let inputs = fingerprint::inputs(campaign)?;
    let combined = fingerprint::combine(&inputs);
    let approved = approved(
        path,
        campaign,
        &journal,
        options.approve,
        &inputs,
        &combined,
    )?;
    let mut journaled = Journaled {
        _lock: lock,
        journal,
        slot,
        durability,
        inputs_changed: false,
        approved,
    };
    if options.canary() {
        return Ok(journaled);
    }
    canary_done(path, campaign, &journaled.journal, &journaled.approved)?;
    if !journaled.slot.is_empty()
        && options.slot.is_none()
        && let Some(earlier) = unfinished_slot(&journaled.journal, &journaled.slot, &inputs)?
    {
        journaled.slot = earlier;
    }
    journaled.inputs_changed = freeze_inputs(
        campaign,
        &journaled.journal,
        &journaled.slot,
        &inputs,
        &combined,
        options.accept_changed_inputs,
    )?;
    Ok(journaled)
}

/// The campaign's lock and journal, unless a halt is in force (exit 3).
fn open(
    path: &Path,
    campaign: &Campaign,
    options: &Options<'_>,
) -> anyhow::Result<(journal::Lock, journal::Journal, journal::Durability)> {
    if options.move_journal && options.state_dir.is_none() {
        return Err(Failure::new(
            Exit::Usage,
            "--move-journal needs --state-dir: the folder the journal was moved to",
        )
        .into());
    }
    let intent = if options.move_journal {
        journal::Intent::Move
    } else {
        journal::Intent::Write
    };
    let located = journal::locate(path, options.state_dir, &campaign.id, intent)?;
    let place = &located.place;
    journal::create_state_dir(place.dir())?;
    let lock = journal::Lock::acquire(&place.lock, &campaign.id)?;
    let durability = journal::Durability::from_env();
    let journal = journal::Journal::open_located(&located, &campaign.id, true, durability)?;
    // This run holds the lock: no other send is running. A lost log halts, just below.
    journal
        .settle_unfinished_run()
        .map_err(journal::named(journal.path()))?;
    if let Some(halt) = journal.active_halt()? {
        return Err(Failure::new(
            Exit::Halted,
            format!(
                "campaign `{}` is halted since {} ({}: {}); nothing was sent — `mailer resume {}` allows sending again",
                campaign.id,
                journal::query::time(halt.at),
                halt.by,
                halt.reason,
                path.display()
            ),
        )
        .into());
    }
    Ok((lock, journal, durability))
}

/// Whether a run has started a schedule slot later than `slot` (sent with `--slot`).
fn overtaken(journal: &journal::Journal, slot: &str) -> anyhow::Result<bool> {
    Ok(journal
        .latest_started_slot()?
        .is_some_and(|latest| latest.as_str() > slot))
}

/// Refuses (exit 75) to start a schedule slot earlier than one a run has started already: the
/// clock went back, or `MAILER_NOW` is set to the past. Sending an older slot after a newer one
/// would mail the list again under the older slot's name.
fn not_before_started(
    campaign: &Campaign,
    journal: &journal::Journal,
    slot: &str,
) -> anyhow::Result<()> {
    if slot.is_empty() {
        return Ok(());
    }
    match journal.latest_started_slot()? {
        Some(latest) if latest.as_str() > slot => Err(Failure::new(
            Exit::WorkRemaining,
            format!(
                "campaign `{}`: the clock says the current schedule slot is {slot}, but the later slot {latest} has already started; nothing was sent — check the clock (and MAILER_NOW); `--slot` sends a missed slot on purpose",
                campaign.id
            ),
        )
        .into()),
        _ => Ok(()),
    }
}

/// A cron slot left unfinished (the relay was down, say) is finished first, with the inputs
/// it started with: its recipients would otherwise be skipped for good. The current slot
/// comes next. If the inputs changed since (the next edition is ready), it is named and left
/// to `--slot` instead of being finished with the new ones.
fn unfinished_slot(
    journal: &journal::Journal,
    slot: &str,
    inputs: &fingerprint::Inputs,
) -> anyhow::Result<Option<String>> {
    let mut finish_first = None;
    for (earlier, waiting) in journal.slots_with(
        slot,
        &[journal::RowState::Pending, journal::RowState::InFlight],
    )? {
        if finish_first.is_none() && journal.frozen_inputs(&earlier)?.as_ref() == Some(inputs) {
            tracing::warn!(
                slot = %earlier,
                waiting,
                next = %slot,
                "an earlier schedule slot is not finished: finishing it first"
            );
            finish_first = Some(earlier);
        } else {
            tracing::warn!(
                slot = %earlier,
                waiting,
                "an earlier schedule slot is not finished and its inputs have changed since; it is left as it is (`--slot` finishes it, with its own inputs restored)"
            );
        }
    }
    for (earlier, deferred) in journal.slots_with(slot, &[journal::RowState::Deferred])? {
        if finish_first.as_ref() == Some(&earlier) {
            continue;
        }
        tracing::warn!(
            slot = %earlier,
            deferred,
            "an earlier schedule slot still has deferred recipients; they are tried again only with --slot"
        );
    }
    Ok(finish_first)
}

/// Freezes the inputs at the slot's first run, or checks them against those frozen: a change
/// is refused (exit 65) unless accepted, or unless it only touches the suppression lists.
/// Whether the inputs differ from those frozen (and the change was taken).
fn freeze_inputs(
    campaign: &Campaign,
    journal: &journal::Journal,
    slot: &str,
    inputs: &fingerprint::Inputs,
    combined: &str,
    accept_changed_inputs: bool,
) -> anyhow::Result<bool> {
    let mut inputs_changed = false;
    match journal.frozen_inputs(slot)? {
        None => journal.freeze_inputs(slot, combined, inputs, None)?,
        Some(frozen) if !journal.slot_has_attempts(slot)? && !overtaken(journal, slot)? => {
            // The runs that froze these inputs handed no message to the relay — refused by
            // validation, `expect_count`, the relay's TLS or AUTH before the first message —
            // so nothing was sent under them: the fixed inputs are frozen in their place,
            // without a flag. Not for a slot a later one has overtaken: its changed inputs
            // are most likely that later slot's edition, already sent to the same list.
            let changes = fingerprint::changes(&frozen, inputs);
            if !changes.is_empty() {
                inputs_changed = true;
                journal.freeze_inputs(slot, combined, inputs, None)?;
                journal.event(
                    slot,
                    "inputs-refrozen",
                    &format!(
                        "{} (no message was handed to the relay under the earlier inputs)",
                        changes.join(", ")
                    ),
                )?;
            }
        }
        Some(frozen) => {
            let changes = fingerprint::changes(&frozen, inputs);
            // Suppression lists only ever take recipients away, and an unsubscribe endpoint
            // appends to them while a campaign is under way: a change to them alone is taken
            // (and recorded), not refused.
            let suppression_only = changes.iter().all(|c| c.starts_with("suppress["));
            if !changes.is_empty() {
                if !accept_changed_inputs && !suppression_only {
                    return Err(Failure::new(
                        Exit::InvalidInput,
                        format!(
                            "the inputs of campaign `{}` changed since its first run ({}); nothing was sent — if the change is intended, run again with --accept-changed-inputs",
                            campaign.id,
                            changes.join(", ")
                        ),
                    )
                    .into());
                }
                let how = if suppression_only {
                    "suppression lists only, taken without the flag"
                } else {
                    "--accept-changed-inputs"
                };
                tracing::warn!(changes = %changes.join(", "), how, "changed inputs accepted");
                inputs_changed = true;
                let accepted = format!("{} ({how})", changes.join(", "));
                journal.freeze_inputs(slot, combined, inputs, Some(&accepted))?;
            }
        }
    }
    Ok(inputs_changed)
}

/// Refuses a send over SMTP without `--approve` (exit 64), before anything else: an
/// unreviewed send is never a default. The file transport and dry runs send to no one.
pub fn require_approval(
    path: &Path,
    campaign: &Campaign,
    options: &Options<'_>,
) -> anyhow::Result<()> {
    if options.dry_run
        || options.approve.is_some()
        || !matches!(campaign.transport, config::Transport::Smtp(_))
    {
        return Ok(());
    }
    Err(Failure::new(
        Exit::Usage,
        format!(
            "campaign `{}` sends over SMTP, which needs --approve: run `mailer plan {}`, review it, then send with the fingerprint it prints; nothing was sent",
            campaign.id,
            path.display()
        ),
    )
    .into())
}

/// The fingerprint the send is approved for: `--approve` must match the inputs as they are
/// now (exit 65 if not, naming what changed since when the journal knows the plan). Without
/// `--approve` (file transport), the current inputs'.
fn approved(
    path: &Path,
    campaign: &Campaign,
    journal: &journal::Journal,
    approve: Option<&plan::Approval>,
    inputs: &fingerprint::Inputs,
    combined: &str,
) -> anyhow::Result<String> {
    let Some(approval) = approve else {
        return Ok(combined.to_owned());
    };
    if approval.matches(combined) {
        return Ok(combined.to_owned());
    }
    let why = match journal.known_inputs(approval.as_str())? {
        Some(known) => {
            let changes = fingerprint::changes(&known.inputs, inputs);
            if suppression_only_grew(campaign, &known, &changes)? {
                // Unsubscribes arrive while a reviewed campaign waits for its time: a list
                // that only gained addresses sends to fewer people, never to others.
                tracing::warn!(changes = %changes.join(", "), "the suppression lists only grew since the approved plan: taken");
                return Ok(known.fingerprint);
            }
            format!(
                "since the {} of {} with fingerprint {}: {}",
                known.source,
                journal::query::time(known.at),
                plan::short(&known.fingerprint),
                changes.join(", ")
            )
        }
        None => format!(
            "this journal knows no plan with a fingerprint starting `{approval}` (made with another --state-dir, or mistyped?)"
        ),
    };
    Err(Failure::new(
        Exit::InvalidInput,
        format!(
            "--approve {approval} does not match the inputs of campaign `{}` as they are now; {why}; nothing was sent — run `mailer plan {}`, review it, and approve its fingerprint",
            campaign.id,
            path.display()
        ),
    )
    .into())
}

/// Whether the only inputs that changed since a plan are suppression lists, and together
/// they still hold every address the plan saw suppressed.
fn suppression_only_grew(
    campaign: &Campaign,
    known: &journal::review::Known,
    changes: &[String],
) -> anyhow::Result<bool> {
    let Some(before) = &known.suppression else {
        return Ok(false);
    };
    if changes.is_empty() || !changes.iter().all(|c| c.starts_with("suppress[")) {
        return Ok(false);
    }
    let (now, problems) = recipients::read_suppressions(&campaign.suppress)?;
    Ok(problems.errors() == 0 && before.is_subset(&now))
}

/// A campaign with a canary sends to its recipients only once every canary address has
/// accepted its message for these same inputs (exit 64 otherwise).
fn canary_done(
    path: &Path,
    campaign: &Campaign,
    journal: &journal::Journal,
    approved: &str,
) -> anyhow::Result<()> {
    let canary = &campaign.safety.canary;
    if canary.is_empty() {
        return Ok(());
    }
    let sent = journal.canary_sent(approved)?;
    let waiting: Vec<&str> = canary
        .iter()
        .map(|a| &*a.key)
        .filter(|a| !sent.contains(*a))
        .collect();
    if waiting.is_empty() {
        return Ok(());
    }
    Err(Failure::new(
        Exit::Usage,
        format!(
            "campaign `{}` has a canary, and {} of its {} addresses have not accepted their message for these inputs ({}); nothing was sent — run `mailer send {} --stage canary --approve {}` first, look at what the canary mailboxes got, then send again",
            campaign.id,
            waiting.len(),
            canary.len(),
            waiting.join(", "),
            path.display(),
            plan::short(approved)
        ),
    )
    .into())
}
