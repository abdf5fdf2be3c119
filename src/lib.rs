//! `mailer`: bulk email campaigns, one envelope per recipient.
//!
//! The modules follow the pipeline, in order:
//!
//! ```text
//! campaign.toml ─► config ─► recipients ─► render ─► guard ─► dispatch ─► report
//! ```
//!
//! [`config`] validates the campaign file; [`recipients`] streams the CSV into normalised,
//! deduplicated recipients; [`render`] makes one message per recipient with handlebars and
//! Fluent; [`guard`] checks each final message; [`dispatch`] hands it to the SMTP, file or
//! dry-run transport; [`report`] counts the outcomes. [`run`] wires them together for each
//! command; `main.rs` only maps the result to an exit code.

pub mod cli;
pub mod config;
pub mod dispatch;
pub mod exit;
pub mod guard;
pub mod journal;
pub mod plan;
pub mod problem;
pub mod recipients;
pub mod render;
pub mod report;
pub mod scaffold;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use rayon::prelude::*;

use cli::{Cli, Command, LogFormat};
use config::Campaign;
use exit::{Exit, Failure};
use plan::fingerprint;
use problem::{Problem, Problems};
use recipients::{Recipient, RecipientList};
use render::{OutgoingMessage, Renderer};
use report::{Delivery, State, Summary};

/// Runs one command. Errors carry their exit code (see [`exit::Exit::of_error`]).
pub fn run(cli: &Cli) -> anyhow::Result<Exit> {
    init_logging(cli.log_format);
    match &cli.command {
        Command::Init { dir } => {
            scaffold::init(dir)?;
            println!(
                "created a campaign in `{}`; try: mailer check {}",
                dir.display(),
                dir.join("campaign.toml").display()
            );
            Ok(Exit::Complete)
        }
        Command::Check { campaign } => check(campaign, &mut std::io::stdout().lock()),
        Command::Preview {
            campaign,
            out,
            per_locale,
            recipients,
            show,
        } => preview(
            campaign,
            out.as_deref(),
            &report::preview::Request {
                per_locale: *per_locale,
                recipients,
            },
            *show,
        ),
        Command::Plan { campaign, json } => plan(
            campaign,
            cli.state_dir.as_deref(),
            *json,
            &mut std::io::stdout().lock(),
        ),
        Command::Send {
            campaign,
            dry_run,
            accept_changed_inputs,
            slot,
            approve,
            stage,
            limit,
        } => send(
            campaign,
            &SendOptions {
                dry_run: *dry_run,
                keep_bytes: KEEP_BYTES,
                // A bar on a terminal; on anything else (cron, a pipe, JSON logs), log lines.
                interactive: cli.log_format == LogFormat::Text
                    && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                state_dir: cli.state_dir.as_deref(),
                accept_changed_inputs: *accept_changed_inputs,
                slot: slot.as_deref(),
                approve: approve.as_ref(),
                stage: *stage,
                limit: *limit,
            },
            &mut std::io::stdout().lock(),
        ),
        Command::Status { campaign, json } => status(
            campaign,
            cli.state_dir.as_deref(),
            *json,
            &mut std::io::stdout().lock(),
        ),
        Command::Stop { campaign, reason } => stop(campaign, cli.state_dir.as_deref(), reason),
        Command::Resume { campaign } => resume(campaign, cli.state_dir.as_deref()),
        Command::UnsubscribeToken {
            campaign,
            address,
            verify,
        } => unsubscribe_token(campaign, address, verify.as_deref()),
        Command::Report { campaign, format } => report_rows(
            campaign,
            cli.state_dir.as_deref(),
            *format,
            &mut std::io::stdout().lock(),
        ),
    }
}

fn init_logging(format: LogFormat) {
    // lettre's own `tracing` feature is off (it would log AUTH credentials); the filter keeps
    // it quiet even if a dependency turns it on, whatever MAILER_LOG asks for.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive("lettre=warn".parse().expect("a constant, valid directive"))
        // handlebars logs every helper call with its arguments — recipients' data — at DEBUG.
        .add_directive(
            "handlebars=warn"
                .parse()
                .expect("a constant, valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(report::BarSafeStderr::default)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.without_time().with_target(false).try_init(),
    };
}

/// The clock, in one place: every message of a run carries the same `Date`.
fn now() -> SystemTime {
    SystemTime::now()
}

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
    match config::parse(path, &read(path)?) {
        Ok(campaign) => load_campaign(campaign),
        Err(problems) => Ok(Err(problems)),
    }
}

/// [`load`] once the campaign file is parsed: the recipients, templates and locales.
fn load_campaign(campaign: Campaign) -> anyhow::Result<Result<Loaded, Problems>> {
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

fn read(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the campaign file `{}`", path.display()))
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
}

/// Renders and guards one recipient's message. Shared by validation and sending, so both take
/// exactly the same path.
pub fn prepare(
    loaded: &Loaded,
    recipient: &Recipient,
    date: SystemTime,
) -> Result<OutgoingMessage, Problem> {
    let path = &loaded.list.path;
    let message = loaded.renderer.render(recipient, date).map_err(|reason| {
        Problem::row(
            path,
            recipient.line,
            format!("cannot render this row's message: {reason}"),
        )
    })?;
    guard::check(&message, &loaded.rules).map_err(|violations| {
        let reasons: Vec<String> = violations.iter().map(ToString::to_string).collect();
        Problem::guard(
            path,
            recipient.line,
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
const CHUNK: usize = 1024;

/// Bytes of rendered messages `send` keeps from validation (beyond that it renders again).
const KEEP_BYTES: usize = 256 << 20;

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
fn warnings(loaded: &Loaded) -> Vec<Problem> {
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
    for (line, first) in &loaded.list.duplicates {
        found.push(Problem::warning(
            &loaded.list.path,
            Some(*line),
            format!("repeats the address of line {first}; sent once"),
        ));
    }
    found
}

/// Loads and validates; on any error, fails with all of them (exit 65) having sent nothing.
fn load_valid(
    path: &Path,
    date: SystemTime,
    keep_bytes: usize,
) -> anyhow::Result<(Loaded, Validation)> {
    let loaded = load(path)?.map_err(Problems::into_failure)?;
    validated(loaded, date, keep_bytes)
}

/// Validates every recipient; on any error (beyond the invalid rows `[safety] max_invalid`
/// lets a send skip), fails with all of them (exit 65) having sent nothing.
fn validated(
    loaded: Loaded,
    date: SystemTime,
    keep_bytes: usize,
) -> anyhow::Result<(Loaded, Validation)> {
    let mut validation = validate(&loaded, date, keep_bytes);
    let mut all = loaded.list.problems.clone();
    all.extend(std::mem::take(&mut validation.problems));
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

/// What `check` found: the loaded campaign and its counts when it could be loaded, and every
/// problem.
struct Examination {
    loaded: Option<(Loaded, Summary)>,
    /// Messages that rendered and passed the guard.
    rendered: usize,
    problems: Problems,
}

impl Examination {
    fn failed(problems: Problems) -> Examination {
        Examination {
            loaded: None,
            rendered: 0,
            problems,
        }
    }

    /// Whether `send` would go ahead: nothing wrong but the invalid rows `[safety]
    /// max_invalid` lets it skip.
    fn sendable(&self) -> bool {
        let Some((loaded, _)) = &self.loaded else {
            return false;
        };
        let rows = self.problems.errors_of(problem::Kind::Row);
        self.problems.errors() == rows && rows <= loaded.campaign.safety.max_invalid
    }

    /// `check`'s report.
    fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        if let Some((loaded, summary)) = &self.loaded {
            let list = &loaded.list;
            writeln!(
                out,
                "{} of {} messages rendered and checked",
                self.rendered,
                list.recipients.len()
            )?;
            writeln!(
                out,
                "{} invalid rows, {} duplicate rows, {} suppressed",
                list.invalid(),
                list.duplicates.len(),
                list.suppressed.len()
            )?;
            writeln!(out, "{}", summary.locale_line())?;
        }
        for group in self.problems.grouped() {
            writeln!(out, "{group}")?;
        }
        writeln!(
            out,
            "{} errors ({} in the campaign files, {} in rows, {} stopped by the guard), {} warnings",
            self.problems.errors(),
            self.problems.errors_of(problem::Kind::Input),
            self.problems.errors_of(problem::Kind::Row),
            self.problems.errors_of(problem::Kind::Guard),
            self.problems.warnings()
        )
    }
}

/// Loads, renders and guards every recipient, and checks the `[safety]` expectations.
fn examine(campaign: Campaign) -> anyhow::Result<Examination> {
    let loaded = match load_campaign(campaign)? {
        Ok(loaded) => loaded,
        Err(problems) => return Ok(Examination::failed(problems)),
    };
    let Validation {
        problems: rendering,
        summary,
        ..
    } = validate(&loaded, now(), 0);
    let rendered = summary.locales.values().sum();
    let mut problems = loaded.list.problems.clone();
    problems.extend(rendering);
    problems.extend(expectations(&loaded, &problems));
    problems.extend(warnings(&loaded));
    Ok(Examination {
        loaded: Some((loaded, summary)),
        rendered,
        problems,
    })
}

/// The rows that cannot be sent, from validation's problems: line → why.
fn invalid_rows(problems: &Problems) -> BTreeMap<u64, String> {
    problems
        .0
        .iter()
        .filter(|p| p.kind == problem::Kind::Row && p.severity == problem::Severity::Error)
        .filter_map(|p| p.line.map(|line| (line, p.message.clone())))
        .collect()
}

/// The lines of the rows that cannot be sent.
fn invalid_lines(problems: &Problems) -> std::collections::BTreeSet<u64> {
    invalid_rows(problems).into_keys().collect()
}

/// What `[safety]` expects of the list: `expect_count` addresses, and rows for the canary.
fn expectations(loaded: &Loaded, problems: &Problems) -> Vec<Problem> {
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
/// included, so that unsubscribes arriving do not change it).
fn miscount(loaded: &Loaded) -> Option<Problem> {
    let list = &loaded.list;
    let count = list.recipients.len() + list.suppressed.len();
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
fn expect_count(loaded: &Loaded) -> anyhow::Result<()> {
    match miscount(loaded) {
        None => Ok(()),
        Some(problem) => {
            Err(Failure::new(Exit::InvalidInput, format!("{problem}; nothing was sent")).into())
        }
    }
}

fn check(path: &Path, out: &mut impl std::io::Write) -> anyhow::Result<Exit> {
    let examination = match config::parse(path, &read(path)?) {
        Ok(campaign) => examine(campaign)?,
        Err(problems) => Examination::failed(problems),
    };
    examination.print(out)?;
    Ok(if examination.problems.errors() > 0 {
        Exit::InvalidInput
    } else {
        Exit::Complete
    })
}

/// `mailer plan`: `check`, then what a send would do and the fingerprint that approves it.
/// A plan that can be sent is recorded in the journal, so that a later `send --approve`
/// with a stale fingerprint can say what changed since.
fn plan(
    path: &Path,
    state_dir: Option<&Path>,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let mut report = Vec::new();
    let campaign = match config::parse(path, &read(path)?) {
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
    let invalid = invalid_lines(&examination.problems);
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
        domains: &summary.domains,
        errors: examination.problems.errors(),
        warnings: examination.problems.warnings(),
        sendable,
    };
    let plan = plan::Plan::new(&loaded.campaign, &loaded.list, &counts, inputs, canary);
    let text = serde_json::to_string(&plan)?;
    if json {
        writeln!(out, "{text}")?;
    } else {
        out.write_all(&report)?;
        plan.print(&path.display().to_string(), out)?;
    }
    if !sendable {
        if json {
            std::io::Write::write_all(&mut std::io::stderr(), &report)?;
        }
        return Ok(Exit::InvalidInput);
    }
    let place = journal::Place::new(path, state_dir, &loaded.campaign.id);
    let recorded = journal::Journal::open(
        &place.journal,
        &loaded.campaign.id,
        true,
        journal::Durability::Full,
    )
    .and_then(|journal| {
        journal.record_plan(
            &plan.fingerprint,
            &plan.inputs,
            &text,
            &loaded.list.suppression,
        )
    });
    if let Err(error) = recorded {
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

/// `mailer preview`: everything is rendered, read back and checked before anything is
/// written or printed, so an unknown `--recipient` or `--show` line leaves no files behind.
fn preview(
    path: &Path,
    out: Option<&Path>,
    request: &report::preview::Request<'_>,
    show: Option<u64>,
) -> anyhow::Result<Exit> {
    let date = now();
    let (loaded, validation) = load_valid(path, date, 0)?;
    let render = |recipient: &Recipient| prepare(&loaded, recipient, date);
    let shown = show
        .map(|line| report::preview::show(&loaded.list, line, render))
        .transpose()?;
    let gallery = match out {
        None => None,
        Some(out) => {
            let list = &loaded.list;
            let counts = report::preview::Counts::new(
                &validation.summary,
                list.suppressed.len(),
                validation.problems.errors_of(problem::Kind::Row),
                list.duplicates.len(),
            );
            let preview = report::preview::collect(
                &loaded.campaign.id,
                list,
                loaded.renderer.locales(),
                counts,
                request,
                render,
            )?;
            Some((out, preview))
        }
    };
    if let Some(shown) = shown {
        print!("{shown}");
    }
    if let Some((out, preview)) = gallery {
        let written = report::preview::write(out, &preview, &report::gallery::page(&preview))?;
        for line in written {
            // With `--show`, standard output is the message alone.
            if show.is_some() {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
    }
    Ok(Exit::Complete)
}

/// A campaign's journal, for the commands that read or halt it.
/// A campaign as the journal commands see it: its id, where its lock is, and whether its
/// journal existed before this command.
struct CampaignRef {
    id: String,
    lock: std::path::PathBuf,
    existed: bool,
}

/// Opens a campaign's journal for `status`, `stop`, `resume` and `report`. Only
/// `[campaign] id` is read, so that an operator can stop a send (or look at it) while the
/// campaign file is half-edited.
fn journal_for(
    path: &Path,
    state_dir: Option<&Path>,
    create: bool,
) -> anyhow::Result<(CampaignRef, journal::Journal)> {
    let id = campaign_id(path)?;
    let place = journal::Place::new(path, state_dir, &id);
    let existed = place.journal.exists();
    let journal = journal::Journal::open(&place.journal, &id, create, journal::Durability::Full)?;
    Ok((
        CampaignRef {
            id,
            lock: place.lock,
            existed,
        },
        journal,
    ))
}

/// `[campaign] id`, or the full check's errors when it cannot be read on its own.
fn campaign_id(path: &Path) -> anyhow::Result<String> {
    let text = read(path)?;
    let id = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|table| Some(table.get("campaign")?.get("id")?.as_str()?.to_owned()))
        .filter(|id| config::valid_id(id));
    match id {
        Some(id) => Ok(id),
        None => Ok(config::parse(path, &text)
            .map_err(Problems::into_failure)?
            .id),
    }
}

fn status(
    path: &Path,
    state_dir: Option<&Path>,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let (campaign, journal) = journal_for(path, state_dir, false)?;
    let slot = journal.latest_slot()?.unwrap_or_default();
    let status = journal.status(&campaign.id, &slot)?;
    if json {
        serde_json::to_writer(&mut *out, &status)?;
        writeln!(out)?;
    } else {
        report::print_status(&status, out)?;
    }
    Ok(Exit::Complete)
}

fn stop(path: &Path, state_dir: Option<&Path>, reason: &str) -> anyhow::Result<Exit> {
    let (campaign, journal) = journal_for(path, state_dir, true)?;
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
            "note: no send had run from this state folder yet (the journal `{}` was created to hold the stop); a send that uses another --state-dir is not stopped",
            journal.path().display()
        );
    } else if journal::Lock::acquire(&campaign.lock, &campaign.id).is_ok() {
        println!("no send is running now; the next one exits 3 at once");
    }
    Ok(Exit::Complete)
}

fn resume(path: &Path, state_dir: Option<&Path>) -> anyhow::Result<Exit> {
    let (campaign, journal) = journal_for(path, state_dir, false)?;
    match journal.clear_halt("mailer resume")? {
        Some(halt) => println!(
            "campaign `{}` may be sent again (the halt by {} was: {})",
            campaign.id, halt.by, halt.reason
        ),
        None => println!("campaign `{}` was not halted", campaign.id),
    }
    Ok(Exit::Complete)
}

fn report_rows(
    path: &Path,
    state_dir: Option<&Path>,
    format: cli::ReportFormat,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let (_, journal) = journal_for(path, state_dir, false)?;
    let slot = journal.latest_slot()?.unwrap_or_default();
    match format {
        cli::ReportFormat::Csv => {
            let mut csv = csv::Writer::from_writer(out);
            csv.write_record(report::REPORT_COLUMNS)?;
            journal.rows(&slot, |row| Ok(csv.write_record(report::csv_fields(&row))?))?;
            csv.flush()?;
        }
        cli::ReportFormat::Json => {
            write!(out, "[")?;
            let mut first = true;
            journal.rows(&slot, |row| {
                if !first {
                    write!(out, ",")?;
                }
                first = false;
                writeln!(out)?;
                serde_json::to_writer(&mut *out, &row)?;
                Ok(())
            })?;
            writeln!(out, "\n]")?;
        }
    }
    Ok(Exit::Complete)
}

fn unsubscribe_token(path: &Path, address: &str, verify: Option<&str>) -> anyhow::Result<Exit> {
    let campaign = config::parse(path, &read(path)?).map_err(Problems::into_failure)?;
    let Some(config::Unsubscribe {
        url: Some(url),
        secret_env: Some(name),
        ..
    }) = &campaign.unsubscribe
    else {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "campaign `{}` has no `[unsubscribe] url`: there is no token",
                campaign.id
            ),
        )
        .into());
    };
    let key = std::env::var(name).map_err(|_| {
        Failure::new(
            Exit::InvalidInput,
            format!(
                "the environment variable `{name}` named by [unsubscribe] secret_env is not set"
            ),
        )
    })?;
    let address = recipients::normalise(address).map_err(|why| {
        Failure::new(Exit::Usage, format!("`{address}` is not an address: {why}"))
    })?;
    let key = key.as_bytes();
    match verify {
        Some(token) => {
            let valid = render::unsubscribe::verify(key, &campaign.id, &address.key, token);
            println!("{}", if valid { "valid" } else { "invalid" });
            Ok(if valid {
                Exit::Complete
            } else {
                Exit::PermanentFailures
            })
        }
        None => {
            println!(
                "{}",
                render::unsubscribe::token(key, &campaign.id, &address.key)
            );
            println!(
                "{}",
                render::unsubscribe::link(url, key, &campaign.id, &address.key)
            );
            Ok(Exit::Complete)
        }
    }
}

/// How `send` was asked to run.
pub struct SendOptions<'a> {
    pub dry_run: bool,
    /// How much of what validation rendered may be kept to send (see [`KEEP_BYTES`]); past
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
}

impl SendOptions<'_> {
    fn canary(&self) -> bool {
        self.stage == Some(cli::Stage::Canary)
    }
}

/// The wall clock for schedules. `MAILER_NOW` (RFC 3339) replaces it, so that schedules can
/// be tried out and tested at a fixed time.
fn wall_clock() -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    match std::env::var("MAILER_NOW") {
        Ok(text) => chrono::DateTime::parse_from_rfc3339(&text)
            .map(|t| t.to_utc())
            .map_err(|e| {
                Failure::new(
                    Exit::Usage,
                    format!("MAILER_NOW `{text}` is not an RFC 3339 time: {e}"),
                )
                .into()
            }),
        Err(_) => Ok(chrono::Utc::now()),
    }
}

/// The slot key of this run: `''` without cron, else the slot's RFC 3339 time. Fails with
/// exit 75 before `not_before` or the first slot.
fn slot_of(campaign: &Campaign, asked: Option<&str>) -> anyhow::Result<String> {
    let now = wall_clock()?;
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

/// What a journaled run holds: the lock, the journal and the slot.
struct Journaled {
    _lock: journal::Lock,
    journal: journal::Journal,
    slot: String,
    durability: journal::Durability,
    /// The inputs differ from those frozen (and the change was accepted).
    inputs_changed: bool,
    /// The fingerprint of the inputs as reviewed: the canary stage is recorded under it.
    approved: String,
}

/// Takes the campaign's lock, opens its journal, refuses a halted campaign and checks the
/// inputs against those frozen at the slot's first run.
fn open_for_send(
    path: &Path,
    campaign: &Campaign,
    options: &SendOptions<'_>,
) -> anyhow::Result<Journaled> {
    // The canary stage belongs to no schedule slot: it runs before the first one is due.
    let mut slot = if options.canary() {
        String::new()
    } else {
        slot_of(campaign, options.slot)?
    };
    let place = journal::Place::new(path, options.state_dir, &campaign.id);
    if let Some(dir) = place.lock.parent() {
        use anyhow::Context as _;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state folder `{}`", dir.display()))?;
    }
    let lock = journal::Lock::acquire(&place.lock, &campaign.id)?;
    let durability = journal::Durability::from_env();
    let journal = journal::Journal::open(&place.journal, &campaign.id, true, durability)?;
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
    if options.canary() {
        return Ok(Journaled {
            _lock: lock,
            journal,
            slot,
            durability,
            inputs_changed: false,
            approved,
        });
    }
    canary_done(path, campaign, &journal, &approved)?;
    if !slot.is_empty() && options.slot.is_none() {
        // A cron slot left unfinished (the relay was down, say) is finished first, with the
        // inputs it started with: its recipients would otherwise be skipped for good. The
        // current slot comes next. If the inputs changed since (the next edition is ready),
        // it is named and left to --slot instead of being finished with the new ones.
        let mut finish_first = None;
        for (earlier, waiting) in journal.slots_with(&slot, &["pending", "in_flight"])? {
            if finish_first.is_none() && journal.frozen_inputs(&earlier)?.as_ref() == Some(&inputs)
            {
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
        for (earlier, deferred) in journal.slots_with(&slot, &["deferred"])? {
            if finish_first.as_ref() == Some(&earlier) {
                continue;
            }
            tracing::warn!(
                slot = %earlier,
                deferred,
                "an earlier schedule slot still has deferred recipients; they are tried again only with --slot"
            );
        }
        if let Some(earlier) = finish_first {
            slot = earlier;
        }
    }
    let mut inputs_changed = false;
    match journal.frozen_inputs(&slot)? {
        None => journal.freeze_inputs(&slot, &combined, &inputs, None)?,
        Some(frozen) if !journal.slot_has_rows(&slot)? => {
            // The runs that froze these inputs listed nobody — refused by validation or
            // `expect_count`, say — so nothing was sent under them: the fixed inputs are frozen
            // in their place, without a flag.
            let changes = fingerprint::changes(&frozen, &inputs);
            if !changes.is_empty() {
                inputs_changed = true;
                journal.freeze_inputs(&slot, &combined, &inputs, None)?;
                journal.event(
                    &slot,
                    "inputs-refrozen",
                    &format!(
                        "{} (no recipient was listed under the earlier inputs)",
                        changes.join(", ")
                    ),
                )?;
            }
        }
        Some(frozen) => {
            let changes = fingerprint::changes(&frozen, &inputs);
            // Suppression lists only ever take recipients away, and an unsubscribe endpoint
            // appends to them while a campaign is under way: a change to them alone is taken
            // (and recorded), not refused.
            let suppression_only = changes.iter().all(|c| c.starts_with("suppress["));
            if !changes.is_empty() {
                if !options.accept_changed_inputs && !suppression_only {
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
                journal.freeze_inputs(&slot, &combined, &inputs, Some(&accepted))?;
            }
        }
    }
    Ok(Journaled {
        _lock: lock,
        journal,
        slot,
        durability,
        inputs_changed,
        approved,
    })
}

/// Refuses a send over SMTP without `--approve` (exit 64), before anything else: an
/// unreviewed send is never a default. The file transport and dry runs send to no one.
fn require_approval(
    path: &Path,
    campaign: &Campaign,
    options: &SendOptions<'_>,
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

/// `send` and `send --dry-run`: validate everything, then deliver what the journal says is
/// due, recording every step.
fn send(
    path: &Path,
    options: &SendOptions<'_>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let dry_run = options.dry_run;
    let date = now();
    let campaign = config::parse(path, &read(path)?).map_err(Problems::into_failure)?;
    require_approval(path, &campaign, options)?;
    if options.canary() {
        return send_canary(path, campaign, options, out);
    }
    // Refuse a halted, locked, changed or not-yet-due campaign before the long work.
    let mut journaled = if dry_run {
        None
    } else {
        Some(open_for_send(path, &campaign, options)?)
    };
    // A cron call on a campaign with nothing due (finished, or waiting for a backoff) with
    // unchanged inputs: nothing to render, nothing to send. Say where it stands and stop.
    if let Some(j) = journaled.as_ref().filter(|j| !j.inputs_changed)
        && let Some(counts) = j.journal.idle(
            &j.slot,
            journal::millis(std::time::SystemTime::now()),
            campaign.retry.on_ambiguous == config::OnAmbiguous::Retry,
        )?
    {
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
        return Ok(summary.exit());
    }
    let mut loaded = load_campaign(campaign)?.map_err(Problems::into_failure)?;
    if let Some(j) = &journaled {
        loaded.renderer.for_slot(&j.slot);
    }
    let validation = validated(loaded, date, options.keep_bytes)?;
    let (mut loaded, validation) = validation;
    expect_count(&loaded)?;
    let mut summary = validation.summary;
    let skipped = validation.problems.errors_of(problem::Kind::Row);
    for group in validation
        .problems
        .grouped()
        .iter()
        .filter(|g| g.first.kind == problem::Kind::Row)
    {
        tracing::warn!("skipped as invalid ([safety] max_invalid): {group}");
    }
    let invalid = invalid_rows(&validation.problems);
    let transport = dispatch::Transport::for_campaign(&loaded.campaign.transport, dry_run)?;
    summary.dry_run = dry_run;
    // Who is due: from the journal, or, in a dry run, every row that rendered.
    let (due, settled) = match journaled.as_mut() {
        Some(j) => {
            let roster = journal::Roster {
                recipients: &loaded.list.recipients,
                suppressed: &loaded.list.suppressed,
                invalid: &invalid,
            };
            let retry_ambiguous = loaded.campaign.retry.on_ambiguous == config::OnAmbiguous::Retry;
            let sync = j.journal.sync(
                &j.slot,
                &roster,
                retry_ambiguous,
                journal::millis(std::time::SystemTime::now()),
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
                    writeln!(out, "  line {line}  {address}")?;
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
            (Some(sync.due), sync.settled)
        }
        None => {
            let mut settled = BTreeMap::new();
            settled.insert(State::Suppressed, loaded.list.suppressed.len());
            settled.insert(State::Invalid, skipped);
            (None, settled)
        }
    };
    for (state, count) in &settled {
        summary.add(*state, *count);
    }
    let total = loaded.list.recipients.len();
    // Rows of the list that rendered: the CSV's invalid rows never made it into the list.
    let sendable = total - (skipped - loaded.list.problems.errors_of(problem::Kind::Row));
    let due_count = due.as_ref().map_or(sendable, HashMap::len);
    tracing::info!(campaign = %loaded.campaign.id, recipients = total, due = due_count, dry_run, "sending");
    // A dry run shows what would be sent, not how long it would take: no pacing, no pauses.
    let rate = if dry_run {
        config::Rate::default()
    } else {
        loaded.campaign.rate.clone()
    };
    let pacer = dispatch::Pacer::new(&rate);
    let mut writer: Option<journal::Writer> = None;
    let mut recorder = None;
    if let Some(j) = &journaled {
        // Limits hold across a restart: the last run's recent attempts count.
        let now_ms = journal::millis(std::time::SystemTime::now());
        let (latest, domains) = j.journal.recent_attempts(now_ms - 3_600_000)?;
        let ago =
            |at: i64| std::time::Duration::from_millis(u64::try_from(now_ms - at).unwrap_or(0));
        let domains: Vec<(String, std::time::Duration)> =
            domains.into_iter().map(|(d, at)| (d, ago(at))).collect();
        pacer.carry_over(latest.map(ago), &domains);
        j.journal.event(
            &j.slot,
            "run",
            &format!("started by process {}: {due_count} due", std::process::id()),
        )?;
        let (w, r) = journal::Writer::start(&j.journal, j.durability)?;
        writer = Some(w);
        recorder = Some(r.with_slot(&j.slot));
    }

    // One thread drives every connection: the work is waiting on sockets, and keeping it on
    // one thread spares cross-thread wake-ups (measured ~8% faster than two workers), leaving
    // the other core to rendering.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let (messages_in, messages_out) = async_channel::bounded::<dispatch::Queued>(1024);
    let (results_in, mut results_out) = tokio::sync::mpsc::channel::<Delivery>(1024);
    let (halt_in, halt_out) = tokio::sync::watch::channel::<Option<String>>(None);
    let (watch_stop, watching) = std::sync::mpsc::channel::<()>();
    let journal_path = journaled.as_ref().map(|j| j.journal.path().to_owned());
    // The suppression lists, read again whenever a file changes during the run, and checked
    // just before each message goes (not in a dry run: it sends nothing).
    let (suppress_stop, suppress_watching) = std::sync::mpsc::channel::<()>();
    let suppressed: Option<dispatch::Suppressed> = if dry_run || loaded.campaign.suppress.is_empty()
    {
        None
    } else {
        let set = std::mem::take(&mut loaded.list.suppression);
        Some(std::sync::Arc::new(std::sync::RwLock::new(set)))
    };

    let started = std::time::Instant::now();
    let interactive = options.interactive;
    let (produced, (ended, written)) = std::thread::scope(|scope| {
        if let Some(live) = &suppressed {
            let files = &loaded.campaign.suppress;
            scope.spawn(move || {
                recipients::watch_suppressions(
                    files,
                    std::time::Duration::from_millis(200),
                    &suppress_watching,
                    |set| {
                        if let Ok(mut live) = live.write() {
                            live.extend(set);
                        }
                    },
                );
            });
        }
        // A `mailer stop` from another process, seen within a fifth of a second.
        if let Some(journal_path) = &journal_path {
            let halt_in = &halt_in;
            scope.spawn(move || {
                let watched = journal::watch_halts(
                    journal_path,
                    std::time::Duration::from_millis(200),
                    &watching,
                    |halt| {
                        let _ = halt_in.send(Some(format!("{}: {}", halt.by, halt.reason)));
                    },
                );
                if let Err(error) = watched {
                    // The kill switch must work: a run that cannot watch for it stops.
                    let _ = halt_in.send(Some(format!(
                        "cannot watch the journal for a stop: {error:#}"
                    )));
                }
            });
        }
        // When the producer is done, the channel closes and the workers drain it and stop.
        let producer = scope.spawn(|| {
            let produced = match validation.messages {
                Some(messages) => {
                    feed(messages, due.as_ref(), options.limit, &messages_in);
                    Ok(())
                }
                None => produce(&loaded, date, due.as_ref(), options.limit, &messages_in),
            };
            if let Err(problem) = &produced {
                // A guard violation: nothing more leaves, not even what is already queued.
                let _ = halt_in.send(Some(format!("guard: {problem}")));
            }
            messages_in.close();
            produced
        });
        let ended = runtime.block_on(async {
            let settings = dispatch::Settings {
                rate: &rate,
                retry: &loaded.campaign.retry,
                safety: &loaded.campaign.safety,
                journal: recorder.take(),
                halt: halt_out,
                suppressed: suppressed.clone(),
            };
            let dispatching = dispatch::run(transport, settings, pacer, messages_out, results_in);
            let writing = async {
                match writer.take() {
                    Some(writer) => writer.run().await,
                    None => Ok(()),
                }
            };
            let collecting = async {
                let mut progress = report::Progress::new(
                    options.limit.map_or(due_count, |n| n.min(due_count)) as u64,
                    interactive,
                );
                while let Some(delivery) = results_out.recv().await {
                    if delivery.state != State::Sent {
                        tracing::warn!(line = delivery.line, recipient = %delivery.recipient, state = %delivery.state, attempts = delivery.attempts, detail = %delivery.detail);
                    }
                    progress.advance(delivery.state);
                    summary.record(delivery);
                }
                progress.finish();
            };
            let (ended, (), written) = tokio::join!(dispatching, collecting, writing);
            (ended, written)
        });
        drop(watch_stop);
        drop(suppress_stop);
        (producer.join(), ended)
    });
    // A journal that cannot be written halts the campaign: nothing may go out unrecorded.
    let recorded = written.map_err(|e| Failure::new(Exit::Halted, format!("halted: {e:#}")));
    // Every recipient due that the workers did not report on is still pending: counts add up.
    let reported = summary.total() - settled.values().sum::<usize>();
    summary.add(State::Pending, due_count - reported);
    summary.elapsed = Some(started.elapsed());
    summary.retried = ended.tally.retried;
    summary.relay_pauses = ended.tally.relay_pauses;
    summary.connections_retired = ended.tally.connections_retired;
    summary.throttled = ended.tally.throttled.clone();
    summary.print(out)?;
    if dry_run {
        writeln!(
            out,
            "dry run: nothing was written or sent, and no connection was opened"
        )?;
    }
    let halted = match produced {
        Ok(Ok(())) => ended.halted.clone(),
        Ok(Err(problem)) => Some(format!("guard: {problem}")),
        Err(_) => Some("the rendering thread stopped unexpectedly".to_owned()),
    };
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
    if let Some(j) = &journaled {
        // The scheduler records the halts it acts on the moment they happen (so that a
        // `mailer resume` while the last messages drain is not undone here); these are the
        // ones it could not: the journal itself failing, the rendering thread dying.
        if ended.halted.is_none()
            && let Some(reason) = &halted
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

/// `send --stage canary`: the `[safety] canary` addresses get one message each, rendered from
/// real rows (see [`plan::canary_rows`]), through the campaign's transport, limits and guard.
/// Their outcomes are journaled apart from the recipients', under the approved fingerprint;
/// an address already accepted for these inputs is not sent again.
fn send_canary(
    path: &Path,
    campaign: Campaign,
    options: &SendOptions<'_>,
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
    let date = now();
    let mut journaled = if options.dry_run {
        None
    } else {
        Some(open_for_send(path, &campaign, options)?)
    };
    let loaded = load_campaign(campaign)?.map_err(Problems::into_failure)?;
    let (loaded, validation) = validated(loaded, date, 0)?;
    expect_count(&loaded)?;
    let rows = plan::canary_rows(
        &loaded.campaign,
        &loaded.list,
        loaded.renderer.locales(),
        &invalid_lines(&validation.problems),
    )
    .map_err(|problem| Failure::new(Exit::InvalidInput, problem.to_string()))?;
    let done = match &journaled {
        Some(j) => j.journal.canary_sent(&j.approved)?,
        None => std::collections::HashSet::new(),
    };
    let mut messages = Vec::new();
    for (address, row) in rows {
        if done.contains(&*address.key) {
            continue;
        }
        let refused = |why: String| {
            Failure::new(
                Exit::InvalidInput,
                format!(
                    "the canary message to `{address}` (from line {} of `{}`) {why}; nothing was sent",
                    row.line,
                    loaded.list.path.display()
                ),
            )
        };
        let message = loaded
            .renderer
            .render_canary(row, &address, date)
            .map_err(|reason| refused(format!("cannot be made: {reason}")))?;
        guard::check(&message, &loaded.rules).map_err(|violations| {
            let reasons: Vec<String> = violations.iter().map(ToString::to_string).collect();
            refused(format!("was stopped by the guard: {}", reasons.join("; ")))
        })?;
        messages.push(message);
    }
    let approved = journaled
        .as_ref()
        .map(|j| plan::short(&j.approved).to_owned());
    let next = format!(
        "mailer send {}{}",
        path.display(),
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
    let transport = dispatch::Transport::for_campaign(&loaded.campaign.transport, options.dry_run)?;
    let rate = if options.dry_run {
        config::Rate::default()
    } else {
        loaded.campaign.rate.clone()
    };
    let count = messages.len();
    let (ended, deliveries) = deliver_all(transport, &rate, &loaded.campaign, messages)?;
    if let Some(j) = journaled.as_mut() {
        let outcomes: Vec<journal::review::CanaryOutcome> = deliveries
            .iter()
            .map(|d| journal::review::CanaryOutcome {
                address: d.recipient.clone(),
                line: d.line,
                locale: d.locale.clone(),
                state: d.state.name().to_owned(),
                attempts: d.attempts,
                detail: d.detail.clone(),
            })
            .collect();
        j.journal.record_canary(&j.approved, &outcomes)?;
    }
    let dry = if options.dry_run { " (dry run)" } else { "" };
    writeln!(out, "canary stage{dry}: {count} message(s)")?;
    let mut summary = Summary::default();
    for delivery in deliveries {
        let state = if options.dry_run && delivery.state == State::Sent {
            "would send"
        } else {
            delivery.state.name()
        };
        writeln!(
            out,
            "  {state:<10} {}  (line {}, {}){}",
            delivery.recipient,
            delivery.line,
            delivery.locale,
            if delivery.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", delivery.detail)
            }
        )?;
        summary.record(delivery);
    }
    summary.add(State::Pending, count - summary.total());
    if let Some(reason) = ended.halted {
        return Err(Failure::new(Exit::Halted, format!("halted: {reason}")).into());
    }
    if let Some(failure) = ended.failure {
        return Err(Failure::new(
            Exit::RelayUnavailable,
            format!(
                "relay unavailable during the canary stage: {}",
                failure.reason
            ),
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

/// Delivers a handful of messages (the canary's) with the campaign's transport and limits,
/// without a journal row per message; gives back every outcome.
fn deliver_all(
    transport: dispatch::Transport,
    rate: &config::Rate,
    campaign: &Campaign,
    messages: Vec<OutgoingMessage>,
) -> anyhow::Result<(dispatch::Ended, Vec<Delivery>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let (messages_in, messages_out) = async_channel::unbounded::<dispatch::Queued>();
    for message in messages {
        // Unbounded and still open: this cannot fail.
        let _ = messages_in.try_send(dispatch::Queued {
            message,
            entry: None,
        });
    }
    messages_in.close();
    let (results_in, mut results_out) = tokio::sync::mpsc::channel::<Delivery>(64);
    let (_halt_in, halt_out) = tokio::sync::watch::channel::<Option<String>>(None);
    let pacer = dispatch::Pacer::new(rate);
    Ok(runtime.block_on(async {
        let settings = dispatch::Settings {
            rate,
            retry: &campaign.retry,
            safety: &campaign.safety,
            journal: None,
            halt: halt_out,
            suppressed: None,
        };
        let dispatching = dispatch::run(transport, settings, pacer, messages_out, results_in);
        let collecting = async {
            let mut all = Vec::new();
            while let Some(delivery) = results_out.recv().await {
                all.push(delivery);
            }
            all
        };
        tokio::join!(dispatching, collecting)
    }))
}

/// A message for the workers, when its recipient is due (`due`: `None` means everyone).
fn queued(
    message: OutgoingMessage,
    due: Option<&HashMap<u64, journal::Entry>>,
) -> Option<dispatch::Queued> {
    match due {
        None => Some(dispatch::Queued {
            message,
            entry: None,
        }),
        Some(due) => due.get(&message.line).map(|entry| dispatch::Queued {
            message,
            entry: Some(*entry),
        }),
    }
}

/// Feeds the workers the messages validation kept (already guarded), in file order, at most
/// `limit` of them.
fn feed(
    messages: Vec<OutgoingMessage>,
    due: Option<&HashMap<u64, journal::Entry>>,
    limit: Option<usize>,
    channel: &async_channel::Sender<dispatch::Queued>,
) {
    let mut left = limit.unwrap_or(usize::MAX);
    for message in messages {
        if left == 0 {
            break;
        }
        let Some(queued) = queued(message, due) else {
            continue;
        };
        left -= 1;
        if channel.send_blocking(queued).is_err() {
            break;
        }
    }
}

/// Renders and guards in parallel, a chunk at a time, and feeds the workers in file order, at
/// most `limit` messages. Stops quietly when the workers stop taking messages.
fn produce(
    loaded: &Loaded,
    date: SystemTime,
    due: Option<&HashMap<u64, journal::Entry>>,
    limit: Option<usize>,
    messages: &async_channel::Sender<dispatch::Queued>,
) -> Result<(), Problem> {
    let mut left = limit.unwrap_or(usize::MAX);
    for chunk in loaded.list.recipients.chunks(CHUNK) {
        if left == 0 {
            break;
        }
        let rendered: Vec<Result<OutgoingMessage, Problem>> = chunk
            .par_iter()
            .filter(|r| due.is_none_or(|due| due.contains_key(&r.line)))
            .map(|r| prepare(loaded, r, date))
            .collect();
        for message in rendered {
            let message = match message {
                Ok(message) => message,
                // Validation found this row invalid and `[safety] max_invalid` lets it be skipped.
                Err(problem) if problem.kind == problem::Kind::Row => continue,
                Err(problem) => return Err(problem),
            };
            if left == 0 {
                break;
            }
            let Some(queued) = queued(message, due) else {
                continue;
            };
            left -= 1;
            if messages.send_blocking(queued).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example campaign, dry run, with everything kept from validation or nothing.
    fn dry_run(keep_bytes: usize) -> (Exit, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let mut out = Vec::new();
        let options = SendOptions {
            dry_run: true,
            keep_bytes,
            interactive: false,
            state_dir: None,
            accept_changed_inputs: false,
            slot: None,
            approve: None,
            stage: None,
            limit: None,
        };
        let exit = send(&path, &options, &mut out).unwrap();
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
        let (kept_exit, kept) = dry_run(KEEP_BYTES);
        let (again_exit, again) = dry_run(0);
        assert_eq!((kept_exit, again_exit), (Exit::Complete, Exit::Complete));
        assert!(
            again.contains("would be sent (dry run)         19"),
            "{again}"
        );
        assert_eq!(kept, again);
    }
}
