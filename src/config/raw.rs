//! The campaign file as written: a serde mirror of campaign.toml, unknown keys rejected.
//!
//! Pure. Values keep their spans so that validation can name the line of a bad value.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub campaign: RawCampaign,
    pub recipients: RawRecipients,
    #[serde(default)]
    pub transport: RawTransport,
    pub rate: Option<RawRate>,
    pub retry: Option<RawRetry>,
    pub safety: Option<RawSafety>,
    pub schedule: Option<RawSchedule>,
    pub unsubscribe: Option<Spanned<RawUnsubscribe>>,
    pub dkim: Option<Spanned<RawDkim>>,
    pub bounces: Option<Spanned<RawBounces>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDkim {
    pub selector: Spanned<String>,
    pub domain: Spanned<String>,
    pub key_path: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBounces {
    pub return_path: Spanned<String>,
    pub secret_env: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUnsubscribe {
    pub url: Option<Spanned<String>>,
    pub mailto: Option<Spanned<String>>,
    pub secret_env: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCampaign {
    pub id: Spanned<String>,
    pub from: Spanned<String>,
    pub reply_to: Option<Spanned<String>>,
    pub template: Spanned<String>,
    pub locales: Spanned<String>,
    pub default_locale: Spanned<String>,
    pub kind: Option<Spanned<RawKind>>,
    pub list_id: Option<Spanned<String>>,
    pub inline_css: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawKind {
    Announcement,
    Marketing,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSafety {
    #[serde(default)]
    pub allow_addresses: Vec<Spanned<String>>,
    pub max_invalid: Option<Spanned<i64>>,
    /// A fraction: serde reads a TOML integer (`1`) as a float too.
    pub halt_failure_ratio: Option<Spanned<f64>>,
    pub max_message_size: Option<Spanned<i64>>,
    #[serde(default)]
    pub raw_html_columns: Vec<Spanned<String>>,
    pub halt_min_sample: Option<Spanned<i64>>,
    #[serde(default)]
    pub canary: Vec<Spanned<String>>,
    #[serde(default)]
    pub canary_rows: Vec<Spanned<String>>,
    pub expect_count: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: Option<Spanned<i64>>,
    pub per_minute: Option<Spanned<i64>>,
    pub per_hour: Option<Spanned<i64>>,
    pub burst: Option<Spanned<i64>>,
    /// Domain → `"N/s"`, `"N/min"`, `"N/h"` or a whole number per second; `default` for the rest.
    #[serde(default)]
    pub per_domain: std::collections::BTreeMap<String, Spanned<toml::Value>>,
    pub batch_size: Option<Spanned<i64>>,
    pub batch_pause: Option<Spanned<String>>,
    /// The slowest pace a throttled domain is slowed to before it is suspended, like a
    /// `per_domain` value.
    pub throttle_floor: Option<Spanned<toml::Value>>,
    /// Messages a calendar day, every domain together.
    pub per_day: Option<Spanned<i64>>,
    /// Daily caps for the first days since the campaign's first message.
    pub warmup: Option<Vec<Spanned<i64>>>,
    /// Domain → messages a calendar day; `default` for each domain not named.
    #[serde(default)]
    pub per_domain_per_day: std::collections::BTreeMap<String, Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_attempts: Option<Spanned<i64>>,
    pub backoff: Option<Spanned<String>>,
    pub max_backoff: Option<Spanned<String>>,
    pub linger: Option<Spanned<String>>,
    pub relay_attempts: Option<Spanned<i64>>,
    pub relay_backoff: Option<Spanned<String>>,
    /// How long a domain that keeps throttling is suspended.
    pub suspension: Option<Spanned<String>>,
    /// `"report"` or `"retry"`; a string rather than a serde enum so that a bad value is one
    /// more collected problem, not the end of parsing.
    pub on_ambiguous: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    /// An RFC 3339 string, or a TOML offset date-time (a local one is refused with its line).
    pub not_before: Option<Spanned<toml::Value>>,
    pub cron: Option<Spanned<String>>,
    /// An IANA time zone name, for `window` and the daily caps' days.
    pub timezone: Option<Spanned<String>>,
    /// Send windows such as `Mon-Fri 09:00-17:00`.
    pub window: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipients {
    pub path: Spanned<String>,
    #[serde(default)]
    pub suppress: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTransport {
    pub kind: Option<Spanned<RawTransportKind>>,
    pub outbox: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub connections: Option<Spanned<i64>>,
    pub messages_per_connection: Option<Spanned<i64>>,
    pub hello_name: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    /// Never accepted: parsed only to refuse it with a helpful message.
    pub password: Option<Spanned<toml::Value>>,
    pub ca_file: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub command_timeout: Option<Spanned<String>>,
    pub data_timeout: Option<Spanned<String>>,
    pub require_starttls: Option<Spanned<bool>>,
    pub dangerous_plaintext: Option<Spanned<bool>>,
    pub dangerous_accept_invalid_certs: Option<Spanned<bool>>,
    pub pipelining: Option<Spanned<bool>>,
    pub chunking: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawTransportKind {
    File,
    Smtp,
}
