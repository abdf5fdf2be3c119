//! campaign.toml → a validated, typed [`Campaign`].
//!
//! Two steps, as in ripgrep: [`raw`] mirrors the file (serde, unknown keys rejected), then
//! [`parse`] checks every value and resolves paths against the campaign file's folder. Every
//! problem is collected with its line. Only [`load`] touches the file system.

mod calendar;
mod bounces;
mod delivery;
mod dkim;
pub mod raw;
mod schedule;
mod unsubscribe;

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lettre::message::Mailbox;
use toml::Spanned;
use unic_langid::LanguageIdentifier;

use crate::address::NormalisedAddress;
use crate::problem::{Problem, Problems, line_of};
pub use bounces::Bounces;
pub use calendar::{Calendar, Open, Window, WindowError};
pub use delivery::{Batch, DailyCaps, OnAmbiguous, Pace, Rate, Retry};
pub use dkim::Dkim;
use raw::{RawFile, RawKind, RawTransport, RawTransportKind};
pub use schedule::{Cron, CronError, Due, Schedule};
pub use unsubscribe::Unsubscribe;

/// A campaign whose every value has been checked. Paths are absolute or relative to the
/// working directory, already joined to the campaign file's folder.
#[derive(Debug, Clone)]
pub struct Campaign {
    pub file: PathBuf,
    pub id: String,
    pub from: Mailbox,
    pub reply_to: Option<Mailbox>,
    pub template_dir: PathBuf,
    pub locales_dir: PathBuf,
    pub default_locale: LanguageIdentifier,
    pub kind: Kind,
    pub recipients: PathBuf,
    pub suppress: Vec<PathBuf>,
    pub transport: Transport,
    pub rate: Rate,
    pub retry: Retry,
    pub safety: Safety,
    /// When a `send` may run; by default at any time.
    pub schedule: Schedule,
    /// `[unsubscribe]`: how recipients leave the list (required for marketing).
    pub unsubscribe: Option<Unsubscribe>,
    /// `[campaign] list_id`: the `List-Id` header (RFC 2919), when given.
    pub list_id: Option<String>,
    /// `[dkim]`: signing, when configured.
    pub dkim: Option<Dkim>,
    /// `[bounces]`: a return path per recipient (VERP), when configured.
    pub bounces: Option<Bounces>,
    /// `[campaign] inline_css`: move the HTML's `<style>` rules into `style` attributes (for
    /// mail clients that drop `<style>`).
    pub inline_css: bool,
}

/// `[safety]`: what the guard lets through, how many bad rows a send may skip, and when a run
/// stops because too many recipients fail.
#[derive(Debug, Clone, PartialEq)]
pub struct Safety {
    /// Normalised addresses any message may contain (a support address, say).
    pub allow_addresses: Vec<String>,
    /// Invalid rows a send may skip (recorded as invalid); by default none.
    pub max_invalid: usize,
    /// The permanent-failure breaker: once a run has `halt_min_sample` answered recipients, it
    /// halts when more than this fraction of them failed permanently. In (0, 1]; 0.2 by
    /// default; 1 never halts. A wrong list or a blocked sender shows early, before it costs the
    /// whole campaign and the sender's reputation.
    pub halt_failure_ratio: f64,
    /// Answered recipients (sent or failed) a run needs before the breaker may trip, so that a
    /// few early failures do not halt it; 100 by default.
    pub halt_min_sample: NonZeroUsize,
    /// Seed addresses `send --stage canary` sends one message each before the campaign; a
    /// full send waits for them to be accepted.
    pub canary: Vec<NormalisedAddress>,
    /// The rows (by address) the canary messages are rendered from, in turn; when empty, the
    /// first row of each locale.
    pub canary_rows: Vec<NormalisedAddress>,
    /// The number of distinct addresses the recipient list must hold (suppressed ones
    /// included); any other count refuses the send.
    pub expect_count: Option<usize>,
    /// The most bytes one message may have, checked while its templates render (so that a
    /// runaway template stops early) and on the final message.
    pub max_message_size: usize,
    /// CSV columns the HTML template may output unescaped (`{{{r.<column>}}}`); any other
    /// column's raw output is an error, since it lets the list's data write HTML.
    pub raw_html_columns: Vec<String>,
}

/// `[safety] max_message_size` by default: ten times what the largest webmail shows before
/// clipping a message, far above any campaign's, far below what would exhaust memory.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;
/// The largest `[safety] max_message_size` accepted.
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 64 << 20;

impl Default for Safety {
    fn default() -> Safety {
        Safety {
            allow_addresses: Vec::new(),
            max_invalid: 0,
            halt_failure_ratio: 0.2,
            halt_min_sample: NonZeroUsize::new(100).unwrap_or(NonZeroUsize::MIN),
            canary: Vec::new(),
            canary_rows: Vec::new(),
            expect_count: None,
            max_message_size: MAX_MESSAGE_SIZE,
            raw_html_columns: Vec::new(),
        }
    }
}

impl Safety {
    /// Whether a run with `failed` permanent failures among `answered` recipients must halt:
    /// at least `halt_min_sample` answered, and `failed / answered` above the ratio.
    #[must_use]
    pub fn halts(&self, failed: usize, answered: usize) -> bool {
        // Exact for counts below 2^53, far above any campaign.
        #[allow(clippy::cast_precision_loss)]
        let ratio = failed as f64 / answered as f64;
        answered >= self.halt_min_sample.get() && ratio > self.halt_failure_ratio
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Announcement,
    Marketing,
}

#[derive(Debug, Clone)]
pub enum Transport {
    /// One `.eml` file per message in `outbox`.
    File {
        outbox: PathBuf,
    },
    Smtp(Smtp),
}

/// How to reach the relay. Built only by [`parse`], which enforces TLS unless loopback or opted out.
#[derive(Debug, Clone)]
pub struct Smtp {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub connections: NonZeroUsize,
    pub messages_per_connection: NonZeroUsize,
    pub hello_name: String,
    pub auth: Option<Auth>,
    pub ca_file: Option<PathBuf>,
    pub accept_invalid_certs: bool,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// The wait for the reply to the final dot: long, as RFC 5321 §4.5.3.2.6 suggests.
    pub data_timeout: Duration,
    /// Whether PIPELINING and CHUNKING are used when the relay offers them (`pipelining =
    /// false`, `chunking = false`: for a relay that offers more than it handles).
    pub pipelining: bool,
    pub chunking: bool,
}

/// What the transport requires of the relay's TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// `smtps://`: TLS from the first byte.
    ImplicitTls,
    /// `smtp://` to anything but loopback (or with `require_starttls = true`): STARTTLS, and
    /// the send fails if it is not offered.
    StartTls,
    /// `smtp://` to loopback: STARTTLS when the relay offers it (verified as always), plain
    /// text when it does not.
    StartTlsIfOffered,
    /// `dangerous_plaintext = true`: plain text, STARTTLS never tried.
    Plain,
}

impl Security {
    /// What the transport requires, as `plan` shows it.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Security::ImplicitTls => "TLS from the first byte",
            Security::StartTls => "STARTTLS required",
            Security::StartTlsIfOffered => "STARTTLS if offered, else plain text (loopback)",
            Security::Plain => "plain text, no STARTTLS (dangerous_plaintext)",
        }
    }

    /// Whether TLS may be used at all (what `ca_file` is for).
    #[must_use]
    pub fn may_use_tls(self) -> bool {
        self != Security::Plain
    }
}

/// Credentials: a user name and where the password lives. The password itself is read only
/// when a connection needs it, and only into a [`Secret`].
#[derive(Debug, Clone)]
pub struct Auth {
    pub username: String,
    pub password: PasswordSource,
}

#[derive(Debug, Clone)]
pub enum PasswordSource {
    Env(String),
    File(PathBuf),
}

impl PasswordSource {
    /// Reads the password. The error names the variable or file, never the value.
    pub fn read(&self) -> anyhow::Result<Secret> {
        match self {
            PasswordSource::Env(name) => std::env::var(name).map(Secret).map_err(|error| {
                let why = match error {
                    std::env::VarError::NotPresent => "is not set",
                    std::env::VarError::NotUnicode(_) => "is not valid UTF-8",
                };
                anyhow::anyhow!("the environment variable `{name}` named by password_env {why}")
            }),
            PasswordSource::File(path) => crate::files::read_text(path, crate::files::SECRET_CAP)
                .map(|text| Secret(text.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|error| anyhow::anyhow!("password_file {error}")),
        }
    }
}

/// A secret string that never shows itself in `Debug` or `Display`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    #[must_use]
    pub fn new(secret: String) -> Secret {
        Secret(secret)
    }

    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Campaign {
    /// The folders the template files may live in (links included): the template folder and
    /// the campaign file's folder.
    #[must_use]
    pub fn template_folders(&self) -> crate::files::Folders {
        crate::files::Folders::new([self.template_dir.as_path(), self.folder()])
    }

    /// The folders the `.ftl` files may live in (links included): the locales folder and the
    /// campaign file's folder.
    #[must_use]
    pub fn locale_folders(&self) -> crate::files::Folders {
        crate::files::Folders::new([self.locales_dir.as_path(), self.folder()])
    }

    /// The folder of the campaign file.
    #[must_use]
    pub fn folder(&self) -> &Path {
        match self.file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }
}

/// A campaign id: 1 to 64 letters, digits, `-`, `_` or `.` (it names the journal's files).
#[must_use]
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
}

/// Reads and validates the campaign file at `path`.
pub fn load(path: &Path) -> anyhow::Result<Campaign> {
    parse_file(path)?.map_err(|problems| problems.into_failure().into())
}

/// Reads and validates the campaign file at `path`, giving its problems as values (for the
/// commands that list them): `Err` only when it cannot be read.
pub fn parse_file(path: &Path) -> anyhow::Result<Result<Campaign, Problems>> {
    Ok(parse(path, &read(path)?))
}

/// The campaign file's text, for [`parse`].
pub fn read(path: &Path) -> anyhow::Result<String> {
    crate::files::read_text(path, crate::files::SOURCE_CAP)
        .map_err(|error| anyhow::anyhow!("the campaign file {error}"))
}

/// Validates campaign.toml text; `path` names the file in errors and anchors relative paths.
pub fn parse(path: &Path, source: &str) -> Result<Campaign, Problems> {
    let raw: RawFile = toml::from_str(source).map_err(|error| {
        let line = error.span().map(|span| line_of(source, span.start));
        let message = error.message().trim_end().replace('\n', " ");
        Problems(vec![Problem::error(path, line, message)])
    })?;
    Validator {
        path,
        source,
        dir: path.parent().unwrap_or(Path::new("")),
        problems: Problems::default(),
    }
    .campaign(raw)
}

struct Validator<'a> {
    path: &'a Path,
    source: &'a str,
    dir: &'a Path,
    problems: Problems,
}

impl Validator<'_> {
    fn line<T>(&self, value: &Spanned<T>) -> u64 {
        line_of(self.source, value.span().start)
    }

    fn error<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        let line = self.line(at);
        self.problems
            .push(Problem::error(self.path, Some(line), message));
    }

    fn relative(&self, value: &Spanned<String>) -> PathBuf {
        self.dir.join(value.get_ref())
    }

    fn mailbox(&mut self, key: &str, value: &Spanned<String>) -> Option<Mailbox> {
        match Mailbox::from_str(value.get_ref()) {
            Ok(mailbox) => Some(mailbox),
            Err(error) => {
                self.error(
                    value,
                    format!(
                        "`{key}` = `{}` is not a valid address ({error})",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn campaign(mut self, raw: RawFile) -> Result<Campaign, Problems> {
        let c = raw.campaign;
        let dkim = raw.dkim.as_ref().and_then(|d| self.dkim(d));
        let unsubscribe = raw.unsubscribe.as_ref().and_then(|u| self.unsubscribe(u));
        let bounces = raw.bounces.as_ref().and_then(|b| self.bounces(b));
        let list_id = self.list_id(c.list_id.as_ref());
        let id = self.campaign_id(&c.id);
        let from = self.mailbox("from", &c.from);
        let reply_to = c
            .reply_to
            .as_ref()
            .and_then(|r| self.mailbox("reply_to", r));
        let default_locale = self.default_locale(&c.default_locale);
        let kind = self.kind(c.kind.as_ref(), raw.unsubscribe.is_some());
        let (template_dir, locales_dir) = self.folders(&c);
        let (recipients, suppress) = self.recipients(&raw.recipients);
        let safety = self.safety(raw.safety.as_ref());
        let rate = self.rate(raw.rate.as_ref());
        let retry = self.retry(raw.retry.as_ref());
        let schedule = self.schedule(raw.schedule.as_ref());
        let hello_default = from.as_ref().map(|m| m.email.domain().to_owned());
        let transport = self.transport(&raw.transport, hello_default.unwrap_or_default());

        match (from, default_locale, transport) {
            (Some(from), Some(default_locale), Some(transport)) if self.problems.errors() == 0 => {
                Ok(Campaign {
                    file: self.path.to_path_buf(),
                    id,
                    from,
                    reply_to,
                    template_dir,
                    locales_dir,
                    default_locale,
                    kind,
                    recipients,
                    suppress,
                    transport,
                    rate,
                    retry,
                    safety,
                    schedule,
                    unsubscribe,
                    list_id,
                    dkim,
                    bounces,
                    inline_css: c.inline_css.unwrap_or(false),
                })
            }
            _ => Err(self.problems),
        }
    }

    /// `[campaign] list_id`, when given.
    fn list_id(&mut self, value: Option<&Spanned<String>>) -> Option<String> {
        let value = value?;
        let text = value.get_ref();
        if unsubscribe::valid_list_id(text) {
            Some(text.clone())
        } else {
            self.error(
                value,
                format!("`list_id` = `{text}` must look like `Description <label.example.com>` (RFC 2919), on one line"),
            );
            None
        }
    }

    /// `[campaign] id`; an invalid one is reported and still given back.
    fn campaign_id(&mut self, value: &Spanned<String>) -> String {
        let id = value.get_ref().clone();
        if !valid_id(&id) {
            self.error(
                value,
                format!("campaign `id` = `{id}` must be 1 to 64 letters, digits, `-`, `_` or `.`"),
            );
        }
        id
    }

    fn default_locale(&mut self, value: &Spanned<String>) -> Option<LanguageIdentifier> {
        match value.get_ref().parse::<LanguageIdentifier>() {
            Ok(locale) => Some(locale),
            Err(_) => {
                let locale = value.get_ref().clone();
                self.error(
                    value,
                    format!("`default_locale` = `{locale}` is not a language tag such as `en` or `fr-CA`"),
                );
                None
            }
        }
    }

    /// `[campaign] kind`: an announcement by default; marketing needs `[unsubscribe]`.
    fn kind(&mut self, value: Option<&Spanned<RawKind>>, has_unsubscribe: bool) -> Kind {
        match value.map(|k| (*k.get_ref(), k)) {
            None | Some((RawKind::Announcement, _)) => Kind::Announcement,
            Some((RawKind::Marketing, at)) => {
                if !has_unsubscribe {
                    self.error(
                        at,
                        "`kind = \"marketing\"` needs an `[unsubscribe]` section (one-click unsubscribe, RFC 8058): mailbox providers reject bulk mail without it",
                    );
                }
                Kind::Marketing
            }
        }
    }

    /// `[campaign] template` and `locales`: the two folders, each checked to exist.
    fn folders(&mut self, c: &raw::RawCampaign) -> (PathBuf, PathBuf) {
        let template_dir = self.relative(&c.template);
        let locales_dir = self.relative(&c.locales);
        for (key, value, dir) in [
            ("template", &c.template, &template_dir),
            ("locales", &c.locales, &locales_dir),
        ] {
            if !dir.is_dir() {
                self.error(
                    value,
                    format!(
                        "`{key}` = `{}` is not a folder (looked for `{}`)",
                        value.get_ref(),
                        dir.display()
                    ),
                );
            }
        }
        (template_dir, locales_dir)
    }

    /// `[recipients]`: the list and the suppression files, each checked to exist.
    fn recipients(&mut self, raw: &raw::RawRecipients) -> (PathBuf, Vec<PathBuf>) {
        let recipients = self.relative(&raw.path);
        if !recipients.is_file() {
            self.error(
                &raw.path,
                format!(
                    "recipients `path` = `{}` is not a file (looked for `{}`)",
                    raw.path.get_ref(),
                    recipients.display()
                ),
            );
        }
        let suppress: Vec<PathBuf> = raw.suppress.iter().map(|s| self.relative(s)).collect();
        for (value, file) in raw.suppress.iter().zip(&suppress) {
            if !file.is_file() {
                self.error(
                    value,
                    format!("suppress file `{}` does not exist", value.get_ref()),
                );
            }
        }
        (recipients, suppress)
    }

    fn safety(&mut self, raw: Option<&raw::RawSafety>) -> Safety {
        let Some(raw) = raw else {
            return Safety::default();
        };
        let canary = self.addresses("canary", &raw.canary);
        let canary_rows = self.addresses("canary_rows", &raw.canary_rows);
        if canary.is_empty()
            && let Some(first) = raw.canary_rows.first()
        {
            self.error(
                first,
                "`canary_rows` chooses the rows the canary messages are made from, but there is no `canary` address to send them to",
            );
        }
        let expect_count = raw.expect_count.as_ref().map(|value| {
            usize::try_from(*value.get_ref()).unwrap_or_else(|_| {
                self.error(value, "`expect_count` must be a whole number, 0 or more");
                0
            })
        });
        let mut allow_addresses = Vec::new();
        for value in &raw.allow_addresses {
            match crate::address::normalise(value.get_ref()) {
                Ok(address) => allow_addresses.push(address.key.into_string()),
                Err(reason) => self.error(
                    value,
                    format!(
                        "`allow_addresses` entry `{}` is not a valid address: {reason}",
                        value.get_ref()
                    ),
                ),
            }
        }
        let max_invalid = match &raw.max_invalid {
            None => 0,
            Some(value) => usize::try_from(*value.get_ref()).unwrap_or_else(|_| {
                self.error(value, "`max_invalid` must be a whole number, 0 or more");
                0
            }),
        };
        let defaults = Safety::default();
        let halt_failure_ratio = match &raw.halt_failure_ratio {
            None => defaults.halt_failure_ratio,
            Some(value) if *value.get_ref() > 0.0 && *value.get_ref() <= 1.0 => *value.get_ref(),
            Some(value) => {
                self.error(
                    value,
                    format!(
                        "`halt_failure_ratio` = `{}` must be a fraction above 0 and at most 1, such as `0.2`",
                        value.get_ref()
                    ),
                );
                defaults.halt_failure_ratio
            }
        };
        let halt_min_sample = self.positive(
            "halt_min_sample",
            raw.halt_min_sample.as_ref(),
            defaults.halt_min_sample.get(),
        );
        Safety {
            allow_addresses,
            max_invalid,
            halt_failure_ratio,
            halt_min_sample,
            canary,
            canary_rows,
            expect_count,
            max_message_size: self.message_size(raw.max_message_size.as_ref()),
            raw_html_columns: raw
                .raw_html_columns
                .iter()
                .map(|column| column.get_ref().trim().to_owned())
                .collect(),
        }
    }

    /// `[safety] max_message_size`: bytes, from 1 KiB to [`MAX_MESSAGE_SIZE_LIMIT`].
    fn message_size(&mut self, value: Option<&Spanned<i64>>) -> usize {
        let Some(value) = value else {
            return MAX_MESSAGE_SIZE;
        };
        match usize::try_from(*value.get_ref()) {
            Ok(bytes) if (1024..=MAX_MESSAGE_SIZE_LIMIT).contains(&bytes) => bytes,
            _ => {
                self.error(
                    value,
                    format!(
                        "`max_message_size` is in bytes, from 1024 to {MAX_MESSAGE_SIZE_LIMIT} (64 MiB), such as `2_097_152` for 2 MiB"
                    ),
                );
                MAX_MESSAGE_SIZE
            }
        }
    }

    /// A list of addresses, each checked and normalised; a repeated one is an error.
    fn addresses(&mut self, key: &str, values: &[Spanned<String>]) -> Vec<NormalisedAddress> {
        let mut found: Vec<NormalisedAddress> = Vec::new();
        for value in values {
            match crate::address::normalise(value.get_ref()) {
                Ok(address) if found.contains(&address) => {
                    self.error(value, format!("`{key}` names `{}` twice", value.get_ref()));
                }
                Ok(address) => found.push(address),
                Err(reason) => self.error(
                    value,
                    format!(
                        "`{key}` entry `{}` is not a valid address: {reason}",
                        value.get_ref()
                    ),
                ),
            }
        }
        found
    }

    fn positive(
        &mut self,
        key: &str,
        value: Option<&Spanned<i64>>,
        default: usize,
    ) -> NonZeroUsize {
        let fallback = NonZeroUsize::new(default).unwrap_or(NonZeroUsize::MIN);
        let Some(value) = value else { return fallback };
        match usize::try_from(*value.get_ref())
            .ok()
            .and_then(NonZeroUsize::new)
        {
            Some(n) => n,
            None => {
                self.error(
                    value,
                    format!("`{key}` must be a whole number of at least 1"),
                );
                fallback
            }
        }
    }

    fn duration(
        &mut self,
        key: &str,
        value: Option<&Spanned<String>>,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(duration) if !duration.is_zero() => duration,
            _ => {
                self.error(
                    value,
                    format!(
                        "`{key}` = `{}` is not a duration such as `30s` or `10m`",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn transport(&mut self, t: &RawTransport, hello_default: String) -> Option<Transport> {
        if let Some(password) = &t.password {
            self.error(password, "a literal `password` is refused in campaign.toml; use `password_env` or `password_file`");
        }
        let kind = t
            .kind
            .as_ref()
            .map_or(RawTransportKind::File, |k| *k.get_ref());
        if kind == RawTransportKind::File {
            return Some(self.file_transport(t));
        }
        self.smtp(t, hello_default).map(Transport::Smtp)
    }

    /// `kind = "file"`: the outbox, beside the campaign file by default.
    fn file_transport(&mut self, t: &RawTransport) -> Transport {
        let smtp_only = [
            &t.url,
            &t.hello_name,
            &t.username,
            &t.password_env,
            &t.password_file,
            &t.ca_file,
        ];
        if let Some(key) = smtp_only.into_iter().flatten().next() {
            self.error(key, "this key only applies to `kind = \"smtp\"`");
        }
        let outbox = t
            .outbox
            .as_ref()
            .map_or_else(|| self.dir.join("outbox"), |o| self.relative(o));
        Transport::File { outbox }
    }

    /// `kind = "smtp"`: the relay's address and security, the credentials, the connection
    /// pool and the timeouts.
    fn smtp(&mut self, t: &RawTransport, hello_default: String) -> Option<Smtp> {
        if let Some(outbox) = &t.outbox {
            self.error(outbox, "`outbox` only applies to `kind = \"file\"`");
        }
        let Some(url_value) = &t.url else {
            let kind_at = t.kind.as_ref()?;
            self.error(
                kind_at,
                "`kind = \"smtp\"` needs a `url` such as `smtp://relay.example.com:587`",
            );
            return None;
        };
        let (url, host) = self.smtp_url(url_value)?;
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        let (security, default_port) = self.security(t, url_value, url.scheme(), loopback)?;
        let auth = self.auth(t);
        if auth.is_some() && !security.may_use_tls() && !loopback {
            self.error(
                url_value,
                "refusing to send a password over plain text; use `smtps://` or STARTTLS",
            );
        }
        if let Some(at) = &t.dangerous_accept_invalid_certs
            && *at.get_ref()
            && security == Security::ImplicitTls
        {
            self.error(
                at,
                "`dangerous_accept_invalid_certs` is not supported with `smtps://`; give the relay's CA (or its self-signed certificate) in `ca_file`",
            );
        }
        let connections = self.positive("connections", t.connections.as_ref(), 4);
        let messages_per_connection = self.positive(
            "messages_per_connection",
            t.messages_per_connection.as_ref(),
            1000,
        );
        Some(Smtp {
            port: url.port().unwrap_or(default_port),
            host,
            security,
            connections,
            messages_per_connection,
            hello_name: t
                .hello_name
                .as_ref()
                .map_or(hello_default, |h| h.get_ref().clone()),
            auth,
            ca_file: t.ca_file.as_ref().map(|f| self.relative(f)),
            accept_invalid_certs: t
                .dangerous_accept_invalid_certs
                .as_ref()
                .is_some_and(|v| *v.get_ref()),
            connect_timeout: self.duration(
                "connect_timeout",
                t.connect_timeout.as_ref(),
                Duration::from_secs(30),
            ),
            command_timeout: self.duration(
                "command_timeout",
                t.command_timeout.as_ref(),
                Duration::from_secs(60),
            ),
            data_timeout: self.duration(
                "data_timeout",
                t.data_timeout.as_ref(),
                Duration::from_secs(600),
            ),
            pipelining: t.pipelining.as_ref().is_none_or(|v| *v.get_ref()),
            chunking: t.chunking.as_ref().is_none_or(|v| *v.get_ref()),
        })
    }

    /// The relay's `url`, parsed, and its host (without an IPv6 address's brackets).
    fn smtp_url(&mut self, url_value: &Spanned<String>) -> Option<(url::Url, String)> {
        let url = match url::Url::parse(url_value.get_ref()) {
            Ok(url) => url,
            Err(error) => {
                self.error(
                    url_value,
                    format!("`url` = `{}` is not a URL ({error})", url_value.get_ref()),
                );
                return None;
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            self.error(url_value, "`url` must not carry credentials; use `username` with `password_env` or `password_file`");
        }
        let Some(host) = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        else {
            self.error(url_value, "`url` has no host");
            return None;
        };
        Some((url, host))
    }

    /// The security the `url` scheme and the opt-ins ask for, with its default port: TLS
    /// required unless `dangerous_plaintext` says otherwise, or the relay is loopback (then
    /// STARTTLS whenever it is offered).
    fn security(
        &mut self,
        t: &RawTransport,
        url_value: &Spanned<String>,
        scheme: &str,
        loopback: bool,
    ) -> Option<(Security, u16)> {
        let plaintext_opt_out = t.dangerous_plaintext.as_ref().is_some_and(|v| *v.get_ref());
        let require_starttls = t.require_starttls.as_ref().is_some_and(|v| *v.get_ref());
        if let (true, Some(at)) = (require_starttls && plaintext_opt_out, &t.require_starttls) {
            self.error(
                at,
                "`require_starttls` and `dangerous_plaintext` contradict each other",
            );
        }
        match scheme {
            "smtps" => Some((Security::ImplicitTls, 465)),
            "smtp" if require_starttls => Some((Security::StartTls, 587)),
            "smtp" if plaintext_opt_out => Some((Security::Plain, 25)),
            "smtp" if loopback => Some((Security::StartTlsIfOffered, 25)),
            "smtp" => Some((Security::StartTls, 587)),
            other => {
                self.error(
                    url_value,
                    format!("`url` scheme `{other}` is not `smtp` or `smtps`"),
                );
                None
            }
        }
    }

    /// The credentials: a `username` with exactly one password source, or none of them.
    fn auth(&mut self, t: &RawTransport) -> Option<Auth> {
        match (&t.username, &t.password_env, &t.password_file) {
            (None, None, None) => None,
            (Some(user), Some(env), None) => Some(Auth {
                username: user.get_ref().clone(),
                password: PasswordSource::Env(env.get_ref().clone()),
            }),
            (Some(user), None, Some(file)) => Some(Auth {
                username: user.get_ref().clone(),
                password: PasswordSource::File(self.relative(file)),
            }),
            (Some(user), None, None) => {
                self.error(user, "`username` needs `password_env` or `password_file`");
                None
            }
            (None, Some(at), _) | (None, None, Some(at)) => {
                self.error(at, "a password source needs a `username`");
                None
            }
            (Some(_), Some(_), Some(file)) => {
                self.error(file, "give `password_env` or `password_file`, not both");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A campaign folder with the files the minimal config points at.
    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("t")).unwrap();
        std::fs::create_dir_all(dir.path().join("l")).unwrap();
        std::fs::write(dir.path().join("r.csv"), "email\n").unwrap();
        dir
    }

    const MINIMAL: &str = r#"
[campaign]
id = "c1"
from = "Ops <ops@example.com>"
template = "t"
locales = "l"
default_locale = "en"

[recipients]
path = "r.csv"
"#;

    /// The minimal campaign with `extra` appended (its first line is line 11): the campaign,
    /// or its problems as `line: message` lines.
    pub(super) fn check(extra: &str) -> Result<Campaign, String> {
        let dir = folder();
        let path = dir.path().join("campaign.toml");
        parse(&path, &format!("{MINIMAL}{extra}")).map_err(|problems| {
            problems
                .0
                .iter()
                .map(|p| format!("{}: {}", p.line.unwrap_or(0), p.message))
                .collect::<Vec<_>>()
                .join("\n")
        })
    }

    #[test]
    fn minimal_campaign_uses_the_file_outbox_beside_it() {
        let campaign = check("").unwrap();
        assert_eq!(campaign.id, "c1");
        assert_eq!(campaign.from.email.to_string(), "ops@example.com");
        assert!(
            matches!(campaign.transport, Transport::File { ref outbox } if outbox.ends_with("outbox"))
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let error = check("\n[transport]\nkind = \"file\"\nspeed = 3\n").unwrap_err();
        assert!(error.starts_with("14: unknown field `speed`"), "{error}");
    }

    #[test]
    fn accepting_invalid_certificates_is_refused_with_smtps_at_review() {
        let error = check("[transport]\nkind = \"smtp\"\nurl = \"smtps://relay.example.com\"\ndangerous_accept_invalid_certs = true\n").unwrap_err();
        assert!(
            error.contains("`dangerous_accept_invalid_certs` is not supported with `smtps://`"),
            "{error}"
        );
    }

    #[test]
    fn plain_smtp_is_only_for_loopback() {
        // Loopback: STARTTLS when offered, plain text otherwise; [::1] and localhost alike.
        for host in ["127.0.0.1", "[::1]", "localhost"] {
            let local = check(&format!(
                "[transport]\nkind = \"smtp\"\nurl = \"smtp://{host}:2525\"\n"
            ))
            .unwrap();
            let Transport::Smtp(smtp) = local.transport else {
                panic!()
            };
            assert_eq!(
                (smtp.security, smtp.port),
                (Security::StartTlsIfOffered, 2525),
                "{host}"
            );
        }
        let local_opted_out = check("[transport]\nkind = \"smtp\"\nurl = \"smtp://127.0.0.1\"\ndangerous_plaintext = true\n").unwrap();
        let Transport::Smtp(smtp) = local_opted_out.transport else {
            panic!()
        };
        assert_eq!((smtp.security, smtp.port), (Security::Plain, 25));

        let remote =
            check("[transport]\nkind = \"smtp\"\nurl = \"smtp://relay.example.com\"\n").unwrap();
        let Transport::Smtp(smtp) = remote.transport else {
            panic!()
        };
        assert_eq!((smtp.security, smtp.port), (Security::StartTls, 587));

        let local_tls = check("[transport]\nkind = \"smtp\"\nurl = \"smtp://localhost:2525\"\nrequire_starttls = true\n").unwrap();
        let Transport::Smtp(smtp) = local_tls.transport else {
            panic!()
        };
        assert_eq!(smtp.security, Security::StartTls);

        let opted_out = check("[transport]\nkind = \"smtp\"\nurl = \"smtp://relay.example.com\"\ndangerous_plaintext = true\n").unwrap();
        let Transport::Smtp(smtp) = opted_out.transport else {
            panic!()
        };
        assert_eq!(smtp.security, Security::Plain);
    }

    #[test]
    fn literal_passwords_and_credentials_in_urls_are_refused() {
        let error = check("[transport]\nkind = \"smtp\"\nurl = \"smtps://u:p@relay.example.com\"\npassword = \"hunter2\"\n").unwrap_err();
        assert!(error.contains("literal `password` is refused"), "{error}");
        assert!(error.contains("must not carry credentials"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = folder();
        let text = "[campaign]\nid = \"bad id\"\nfrom = \"not an address\"\ntemplate = \"missing\"\nlocales = \"l\"\ndefault_locale = \"en\"\n[recipients]\npath = \"nope.csv\"\n[dkim]\nselector = \"bad selector\"\ndomain = \"example.com\"\nkey_path = \"k.pem\"\n[safety]\ncanary = [\"x@example.com\", \"x@EXAMPLE.com\"]\nallow_addresses = [\"nope\"]\nmax_invalid = -1\n";
        let problems = parse(&dir.path().join("c.toml"), text).unwrap_err();
        let lines: Vec<_> = problems.0.iter().map(|p| p.line.unwrap()).collect();
        assert_eq!(lines, vec![10, 2, 3, 4, 8, 14, 15, 16], "{problems:?}");
    }

    #[test]
    fn safety_normalises_allowed_addresses() {
        let campaign =
            check("[safety]\nallow_addresses = [\"Support@Example.COM\"]\nmax_invalid = 3\n")
                .unwrap();
        assert_eq!(campaign.safety.allow_addresses, vec!["Support@example.com"]);
        assert_eq!(campaign.safety.max_invalid, 3);
    }

    #[test]
    fn the_failure_breaker_has_defaults_and_bounds() {
        let defaults = check("").unwrap().safety;
        assert_eq!(
            (defaults.halt_failure_ratio, defaults.halt_min_sample.get()),
            (0.2, 100)
        );
        let set = check("[safety]\nhalt_failure_ratio = 0.05\nhalt_min_sample = 20\n")
            .unwrap()
            .safety;
        assert_eq!(
            (set.halt_failure_ratio, set.halt_min_sample.get()),
            (0.05, 20)
        );
        let never = check("[safety]\nhalt_failure_ratio = 1\n").unwrap().safety;
        assert!((never.halt_failure_ratio - 1.0).abs() < f64::EPSILON);

        for (value, line) in [
            ("0", 12),
            ("0.0", 12),
            ("1.5", 12),
            ("-0.1", 12),
            ("nan", 12),
        ] {
            let error = check(&format!("[safety]\nhalt_failure_ratio = {value}\n")).unwrap_err();
            assert_eq!(
                error,
                format!(
                    "{line}: `halt_failure_ratio` = `{}` must be a fraction above 0 and at most 1, such as `0.2`",
                    value.parse::<f64>().unwrap()
                ),
            );
        }
        let error = check("[safety]\nmax_invalid = 2\nhalt_min_sample = 0\n").unwrap_err();
        assert_eq!(
            error,
            "13: `halt_min_sample` must be a whole number of at least 1"
        );
    }

    #[test]
    fn the_breaker_trips_above_the_ratio_once_the_sample_is_large_enough() {
        let safety = Safety {
            halt_failure_ratio: 0.2,
            halt_min_sample: NonZeroUsize::new(10).unwrap(),
            ..Safety::default()
        };
        assert!(!safety.halts(0, 0));
        assert!(!safety.halts(9, 9), "below the sample");
        assert!(!safety.halts(2, 10), "at the ratio, not above it");
        assert!(safety.halts(3, 10));
        assert!(safety.halts(21, 100));
        let never = Safety {
            halt_failure_ratio: 1.0,
            halt_min_sample: NonZeroUsize::MIN,
            ..Safety::default()
        };
        assert!(!never.halts(5, 5));
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let secret = Secret("hunter2".into());
        assert_eq!(format!("{secret:?} {secret}"), "Secret(***) ***");
    }
}
