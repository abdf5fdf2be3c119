//! Pipeline: its front, shared by every command that renders messages. Loads
//! the campaign's inputs (config, recipients, templates and locales), makes each recipient's
//! message and guards it ([`prepare`]), and does so for every recipient in parallel
//! ([`validate`]). `check`, `plan`, `preview` and `send` all take this same path, so what was
//! checked is what is sent.
//!
//! Reads the input files through the earlier stages' loaders; otherwise pure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use rayon::prelude::*;

use crate::address::NormalisedAddress;
use crate::config::{self, Campaign};
use crate::exit::{Exit, Failure};
use crate::guard;
use crate::plan;
use crate::problem::{self, Problem, Problems};
use crate::recipients::{self, Recipient, RecipientList};
use crate::render::locale::Mismatches;
use crate::render::{OutgoingMessage, Renderer};
use crate::report::Summary;

/// A campaign with everything it needs to render, loaded and checked.
pub struct Loaded {
    pub campaign: Campaign,
    pub list: RecipientList,
    pub renderer: Renderer,
    pub rules: guard::Rules,
}

/// Loads the campaign file, the recipients and the templates and locales.
/// `Ok(Err(problems))` when the campaign cannot be rendered at all (config, templates,
/// locales); rows with problems are left out of `list.recipients` and listed in
/// `list.problems`. `Err` when a file cannot be read.
pub fn load(path: &Path) -> anyhow::Result<Result<Loaded, Problems>> {
    match config::parse_file(path)? {
        Ok(campaign) => load_campaign(campaign),
        Err(problems) => Ok(Err(problems)),
    }
}

/// [`load`] once the campaign file is parsed: the recipients, templates and locales.
pub fn load_campaign(campaign: Campaign) -> anyhow::Result<Result<Loaded, Problems>> {
    let started = std::time::Instant::now();
    let mut list = recipients::load(&campaign.recipients, &campaign.suppress)?;
    tracing::debug!(recipients = list.recipients.len(), elapsed = ?started.elapsed(), "recipient list loaded");
    match Renderer::load(&campaign, list.columns.clone())? {
        Ok(renderer) => {
            let rules = guard_rules(&campaign, &list);
            tracing::debug!(elapsed = ?started.elapsed(), "templates, locales and guard ready");
            Ok(Ok(Loaded {
                campaign,
                list,
                renderer,
                rules,
            }))
        }
        Err(problems) => {
            let mut all = std::mem::take(&mut list.problems);
            all.extend(problems);
            Ok(Err(all))
        }
    }
}

/// What the guard checks against: every address of the list — suppressed ones and those of
/// refused rows too, people whose address must not leak either — and the addresses any message
/// may hold.
fn guard_rules(campaign: &Campaign, list: &RecipientList) -> guard::Rules {
    let everyone = list
        .recipients
        .iter()
        .chain(&list.suppressed)
        .map(|r| (&*r.address.key, r.line))
        .chain(
            list.refused
                .iter()
                .map(|(address, line)| (&*address.key, *line)),
        );
    let sender = campaign.from.email.to_string();
    let reply_to = campaign.reply_to.as_ref().map(|r| r.email.to_string());
    let unsubscribe = campaign
        .unsubscribe
        .as_ref()
        .and_then(|u| u.mailto.as_ref())
        .map(ToString::to_string);
    let allowed = campaign
        .safety
        .allow_addresses
        .iter()
        .map(String::as_str)
        .chain([sender.as_str()])
        .chain(reply_to.as_deref())
        .chain(unsubscribe.as_deref());
    guard::Rules::new(campaign.from.email.clone(), everyone, allowed)
        .with_return_path(campaign.bounces.as_ref().map(|b| b.return_path.clone()))
}

/// Renders and guards one recipient's message. Shared by validation and sending, so both take
/// exactly the same path.
pub fn prepare(
    loaded: &Loaded,
    recipient: &Recipient,
    date: SystemTime,
) -> Result<OutgoingMessage, Problem> {
    guarded(
        loaded,
        recipient.line,
        loaded.renderer.render(recipient, date),
    )
}

/// The canary message to `address`, made from `row` (see [`plan::canary_rows`]) and guarded
/// like any other.
pub fn prepare_canary(
    loaded: &Loaded,
    row: &Recipient,
    address: &NormalisedAddress,
    date: SystemTime,
) -> Result<OutgoingMessage, Problem> {
    guarded(
        loaded,
        row.line,
        loaded.renderer.render_canary(row, address, date),
    )
}

/// A message made from the row at `line`, once the guard has passed it.
fn guarded(
    loaded: &Loaded,
    line: u64,
    made: Result<OutgoingMessage, String>,
) -> Result<OutgoingMessage, Problem> {
    let path = &loaded.list.path;
    let message = made.map_err(|reason| {
        Problem::row(
            path,
            line,
            format!("cannot render this row's message: {reason}"),
        )
    })?;
    guard::check(&message, &loaded.rules).map_err(|violations| {
        let reasons: Vec<String> = violations.iter().map(ToString::to_string).collect();
        Problem::guard(
            path,
            line,
            format!(
                "the guard stopped the message to this row: {}",
                reasons.join("; ")
            ),
        )
    })?;
    Ok(message)
}

/// What validating every recipient gave.
pub struct Validation {
    /// Every recipient whose message could not be made or failed the guard.
    pub problems: Problems,
    /// Counts per locale and domain.
    pub summary: Summary,
    /// The guarded messages in file order, when they fitted in the budget given to
    /// [`validate`]: sending them spares rendering everything a second time.
    pub messages: Option<Vec<OutgoingMessage>>,
}

/// Recipients rendered in parallel at a time.
pub const CHUNK: usize = 1024;

/// Bytes of rendered messages `send` keeps from validation (beyond that it renders again).
pub const KEEP_BYTES: usize = 256 << 20;

/// Renders and guards every recipient, in parallel. Keeps the messages while their bytes add
/// up to at most `keep_bytes`; past that, only counts and problems.
pub fn validate(loaded: &Loaded, date: SystemTime, keep_bytes: usize) -> Validation {
    let started = std::time::Instant::now();
    let mut problems = Vec::new();
    let mut summary = Summary {
        duplicates: loaded.list.duplicates.len(),
        ..Summary::default()
    };
    let mut kept = (keep_bytes > 0).then(Vec::new);
    let mut kept_bytes = 0;
    for chunk in loaded.list.recipients.chunks(CHUNK) {
        let results: Vec<_> = chunk
            .par_iter()
            .map(|recipient| prepare(loaded, recipient, date))
            .collect();
        for (recipient, result) in chunk.iter().zip(results) {
            match result {
                Ok(message) => {
                    summary.count_message(&message.locale, recipient.address.domain());
                    kept_bytes += message.bytes.len();
                    if kept_bytes > keep_bytes {
                        kept = None;
                    }
                    if let Some(kept) = kept.as_mut() {
                        kept.push(message);
                    }
                }
                Err(problem) => problems.push(problem),
            }
        }
    }
    tracing::debug!(elapsed = ?started.elapsed(), problems = problems.len(), "every message rendered and guarded");
    Validation {
        problems: Problems(problems),
        summary,
        messages: kept,
    }
}

/// Warnings that do not block: ids a locale lacks (shown from its fallback), duplicate rows.
#[must_use]
pub fn warnings(loaded: &Loaded) -> Vec<Problem> {
    let locales = loaded.renderer.locales();
    let mut found = Vec::new();
    for (index, tag) in locales.tags().enumerate() {
        // One warning per locale the missing ids come from, in chain order.
        let mut by_source: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (id, served) in locales.fallbacks(index) {
            by_source.entry(served).or_default().push(format!("`{id}`"));
        }
        for (served, ids) in by_source {
            found.push(Problem::warning(
                &loaded.campaign.locales_dir.join(tag),
                None,
                format!(
                    "{} not translated in `{tag}`; shown in `{served}` ({})",
                    ids.join(", "),
                    locales.chain_description(index)
                ),
            ));
        }
    }
    let campaign = &loaded.campaign;
    if campaign.kind == config::Kind::Marketing {
        // What the large mailbox providers ask of bulk senders since 2024.
        if campaign.dkim.is_none() {
            found.push(Problem::warning(
                &campaign.file,
                None,
                "a marketing campaign without [dkim]: one-click unsubscribe (RFC 8058) needs a DKIM signature covering it, and bulk mail without one is rejected or junked",
            ));
        }
        if campaign
            .unsubscribe
            .as_ref()
            .is_some_and(|u| u.url.is_none())
        {
            found.push(Problem::warning(
                &campaign.file,
                None,
                "[unsubscribe] has no url: a mailto alone is not one-click unsubscribe, which the large mailbox providers require of bulk senders",
            ));
        }
    }
    if let Some(dkim) = &loaded.campaign.dkim {
        // Relaxed DMARC alignment: the same organisational domain, either side a subdomain.
        let from = idna::domain_to_ascii(loaded.campaign.from.email.domain())
            .unwrap_or_default()
            .to_lowercase();
        let d = &dkim.domain;
        let aligned =
            from == *d || from.ends_with(&format!(".{d}")) || d.ends_with(&format!(".{from}"));
        if !aligned {
            found.push(Problem::warning(
                &loaded.campaign.file,
                None,
                format!(
                    "[dkim] domain `{}` does not align with the From domain `{from}`: DMARC will not count the signature",
                    dkim.domain
                ),
            ));
        }
    }
    found.extend(exposed_secrets(&loaded.campaign));
    found.extend(unused_ca_file(&loaded.campaign));
    found.extend(duplicates(&loaded.list));
    found
}

/// Duplicate rows named one by one before the rest are only counted: a list of a million
/// copies of one row must not make a million warnings.
const DUPLICATES_NAMED: usize = 10;

/// A warning for each of the first duplicate rows, and one that counts the others.
fn duplicates(list: &RecipientList) -> Vec<Problem> {
    let mut found: Vec<Problem> = list
        .duplicates
        .iter()
        .take(DUPLICATES_NAMED)
        .map(|(line, first)| {
            Problem::warning(
                &list.path,
                Some(*line),
                format!("repeats the address of line {first}; sent once"),
            )
        })
        .collect();
    let more = list.duplicates.len().saturating_sub(DUPLICATES_NAMED);
    if more > 0 {
        found.push(Problem::warning(
            &list.path,
            None,
            format!(
                "{more} more row{} repeat an earlier row's address; each address is sent once",
                if more == 1 { "" } else { "s" }
            ),
        ));
    }
    found
}

/// The locales the recipients to send to asked for that no folder serves as asked, counted
/// by requested tag (bounded, see [`crate::render::Locales::requests`]).
#[must_use]
pub fn locale_requests(loaded: &Loaded) -> Mismatches {
    let columns = &loaded.list.columns;
    loaded
        .renderer
        .locales()
        .requests(loaded.list.recipients.iter().map(|r| r.locale(columns)))
}

/// One warning on the recipient list per line of `requests`.
#[must_use]
pub fn request_warnings(loaded: &Loaded, requests: &Mismatches) -> Vec<Problem> {
    requests
        .lines()
        .into_iter()
        .map(|line| Problem::warning(&loaded.list.path, None, line))
        .collect()
}

/// A warning when `ca_file` is given but no TLS will be spoken to use it with.
fn unused_ca_file(campaign: &Campaign) -> Option<Problem> {
    let config::Transport::Smtp(smtp) = &campaign.transport else {
        return None;
    };
    let ca_file = smtp.ca_file.as_ref()?;
    (!smtp.security.may_use_tls()).then(|| {
        Problem::warning(
            &campaign.file,
            None,
            format!(
                "ca_file `{}` is not used: `dangerous_plaintext = true` turns TLS off; remove one of them",
                ca_file.display()
            ),
        )
    })
}

/// Errors for the secrets a send over SMTP will need and cannot get: a `password_env` that is
/// not set or is empty, a `password_file` or `ca_file` that cannot be read. Found by `check` and
/// `plan` as well as `send`, so that review does not pass a campaign the send would refuse.
#[must_use]
pub fn missing_secrets(campaign: &Campaign) -> Vec<Problem> {
    let config::Transport::Smtp(smtp) = &campaign.transport else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if let Some(auth) = &smtp.auth {
        match auth.password.read() {
            Ok(secret) if secret.expose().is_empty() => {
                let source = match &auth.password {
                    config::PasswordSource::Env(name) => {
                        format!("the environment variable `{name}` named by password_env")
                    }
                    config::PasswordSource::File(path) => {
                        format!("password_file `{}`", path.display())
                    }
                };
                found.push(Problem::error(
                    &campaign.file,
                    None,
                    format!("{source} is empty: the relay would refuse the login"),
                ));
            }
            Ok(_) => {}
            Err(error) => found.push(Problem::error(&campaign.file, None, format!("{error:#}"))),
        }
    }
    if let Some(path) = &smtp.ca_file
        && let Err(error) = crate::files::read(path, crate::files::SECRET_CAP)
    {
        found.push(Problem::error(
            &campaign.file,
            None,
            format!("ca_file {error}"),
        ));
    }
    found
}

/// Warnings for the files holding secrets — a `password_file`, the DKIM key — that other
/// users of the machine may read (group or others have any permission on them).
#[must_use]
pub fn exposed_secrets(campaign: &Campaign) -> Vec<Problem> {
    use std::os::unix::fs::PermissionsExt as _;
    let password = match &campaign.transport {
        config::Transport::Smtp(smtp) => smtp.auth.as_ref().and_then(|auth| match &auth.password {
            config::PasswordSource::File(path) => Some(("password_file", path)),
            config::PasswordSource::Env(_) => None,
        }),
        config::Transport::File { .. } => None,
    };
    let dkim = campaign
        .dkim
        .as_ref()
        .map(|d| ("[dkim] key_path", &d.key_path));
    password
        .into_iter()
        .chain(dkim)
        .filter_map(|(key, path)| {
            let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
            (mode & 0o077 != 0).then(|| {
                Problem::warning(
                    &campaign.file,
                    None,
                    format!(
                        "{key} `{}` can be read by other users of this machine (mode {mode:04o}): `chmod 600` it",
                        path.display()
                    ),
                )
            })
        })
        .collect()
}

/// Loads and validates; on any error, fails with all of them (exit 65) having sent nothing.
pub fn load_valid(
    path: &Path,
    date: SystemTime,
    keep_bytes: usize,
) -> anyhow::Result<(Loaded, Validation)> {
    let loaded = load(path)?.map_err(Problems::into_failure)?;
    validated(loaded, date, keep_bytes)
}

/// Validates every recipient; on any error (beyond the invalid rows `[safety] max_invalid`
/// lets a send skip), fails with all of them (exit 65) having sent nothing.
pub fn validated(
    loaded: Loaded,
    date: SystemTime,
    keep_bytes: usize,
) -> anyhow::Result<(Loaded, Validation)> {
    let mut validation = validate(&loaded, date, keep_bytes);
    let mut all = loaded.list.problems.clone();
    all.extend(std::mem::take(&mut validation.problems));
    all.extend(missing_secrets(&loaded.campaign));
    let invalid_rows = all.errors_of(problem::Kind::Row);
    let blocking = all.errors() - invalid_rows;
    let max_invalid = loaded.campaign.safety.max_invalid;
    if blocking > 0 || invalid_rows > max_invalid {
        let mut failure = all.into_failure();
        if blocking == 0 {
            let plural = if invalid_rows == 1 { "" } else { "s" };
            let _ = write!(
                failure.message,
                "\n{invalid_rows} invalid row{plural} and `[safety] max_invalid` is {max_invalid}: fix them, or raise max_invalid to skip them"
            );
        }
        return Err(failure.into());
    }
    validation.problems = all;
    Ok((loaded, validation))
}

/// The rows that cannot be sent, from validation's problems: line → why.
#[must_use]
pub fn invalid_rows(problems: &Problems) -> BTreeMap<u64, String> {
    problems
        .0
        .iter()
        .filter(|p| p.kind == problem::Kind::Row && p.severity == problem::Severity::Error)
        .filter_map(|p| p.line.map(|line| (line, p.message.clone())))
        .collect()
}

/// The lines of the rows that cannot be sent.
#[must_use]
pub fn invalid_lines(problems: &Problems) -> BTreeSet<u64> {
    invalid_rows(problems).into_keys().collect()
}

/// What `[safety]` expects of the list: `expect_count` addresses, and rows for the canary.
#[must_use]
pub fn expectations(loaded: &Loaded, problems: &Problems) -> Vec<Problem> {
    let mut found: Vec<Problem> = miscount(loaded).into_iter().collect();
    if let Err(problem) = plan::canary_rows(
        &loaded.campaign,
        &loaded.list,
        loaded.renderer.locales(),
        &invalid_lines(problems),
    ) {
        found.push(problem);
    }
    found
}

/// `[safety] expect_count` against the distinct addresses of the list (suppressed ones
/// included, so that unsubscribes arriving do not change it). Without it, a list with no
/// rows at all is an error: an export that came out empty is not a campaign that is done.
fn miscount(loaded: &Loaded) -> Option<Problem> {
    let list = &loaded.list;
    let count = list.recipients.len() + list.suppressed.len();
    let empty = count == 0 && list.refused.is_empty() && list.problems.errors() == 0;
    if empty && loaded.campaign.safety.expect_count.is_none() {
        return Some(Problem::error(
            &list.path,
            None,
            "the recipient list has no rows, only a header: nothing to send; if that is expected, say so with `[safety] expect_count = 0`",
        ));
    }
    let expected = loaded.campaign.safety.expect_count?;
    (expected != count).then(|| {
        Problem::error(
            &loaded.campaign.file,
            None,
            format!(
                "`[safety] expect_count` is {expected}, but `{}` holds {count} distinct addresses (suppressed ones included): check that it is the right list, or correct expect_count",
                list.path.display()
            ),
        )
    })
}

/// Refuses a send whose list does not hold `[safety] expect_count` addresses (exit 65).
pub fn expect_count(loaded: &Loaded) -> anyhow::Result<()> {
    match miscount(loaded) {
        None => Ok(()),
        Some(problem) => {
            Err(Failure::new(Exit::InvalidInput, format!("{problem}; nothing was sent")).into())
        }
    }
}
