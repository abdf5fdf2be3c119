//! Plan: what a send will do before it does it — counts, batches, the ETA at the configured
//! rates, the canary messages — and the [`fingerprint`] of every input, which an approval
//! (`send --approve`) pins.
//!
//! Pure: [`Plan::new`] takes the loaded campaign, what validation counted and the inputs'
//! hashes, and gives a value that prints as text or JSON. The fingerprint is the only part
//! that reads files.

pub mod fingerprint;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Calendar, Campaign, DailyCaps, Open, Rate, Transport};
use crate::printable::Shown;
use crate::problem::Problem;
use crate::recipients::{NormalisedAddress, Recipient, RecipientList};
use crate::render::Locales;
use crate::render::locale::Mismatches;

/// Hex digits of the fingerprint shown to people, and the fewest an approval may give.
pub const SHORT: usize = 12;
pub const APPROVAL_MIN: usize = 6;

/// A fingerprint as people read it: its first [`SHORT`] hex digits.
#[must_use]
pub fn short(fingerprint: &str) -> &str {
    fingerprint.get(..SHORT).unwrap_or(fingerprint)
}

/// `--approve FINGERPRINT`: a prefix (at least [`APPROVAL_MIN`] hex digits) of the plan's
/// fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval(String);

impl FromStr for Approval {
    type Err = String;

    fn from_str(text: &str) -> Result<Approval, String> {
        let hex = text.trim().to_ascii_lowercase();
        if hex.len() < APPROVAL_MIN || hex.len() > 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(format!(
                "`{text}` is not a fingerprint: give at least {APPROVAL_MIN} hex digits of the one `mailer plan` prints"
            ));
        }
        Ok(Approval(hex))
    }
}

impl Approval {
    /// Whether `fingerprint` (full, lower-case hex) is the one approved.
    #[must_use]
    pub fn matches(&self, fingerprint: &str) -> bool {
        fingerprint.starts_with(&self.0)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Approval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A canary message: sent to `address`, rendered from the row on `line`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CanaryPick {
    pub address: String,
    pub line: u64,
    pub locale: String,
}

/// Which row each canary address gets its message from: the rows `[safety] canary_rows`
/// names, or else the first row of each locale (in list order), taken in turn. Rows in `skip`
/// (invalid ones a send may skip) are never picked.
pub fn canary_rows<'a>(
    campaign: &Campaign,
    list: &'a RecipientList,
    locales: &Locales,
    skip: &BTreeSet<u64>,
) -> Result<Vec<(NormalisedAddress, &'a Recipient)>, Problem> {
    let canary = &campaign.safety.canary;
    if canary.is_empty() {
        return Ok(Vec::new());
    }
    let sendable = || list.recipients.iter().filter(|r| !skip.contains(&r.line));
    let mut rows: Vec<&Recipient> = Vec::new();
    if campaign.safety.canary_rows.is_empty() {
        let mut seen = BTreeSet::new();
        for recipient in sendable() {
            if seen.insert(locales.resolve(recipient.locale(&list.columns))) {
                rows.push(recipient);
            }
        }
    } else {
        for wanted in &campaign.safety.canary_rows {
            match sendable().find(|r| r.address == *wanted) {
                Some(row) => rows.push(row),
                None => {
                    return Err(Problem::error(
                        &campaign.file,
                        None,
                        format!(
                            "`[safety] canary_rows` names `{wanted}`, which is not a row to send to in `{}` (missing, suppressed or invalid)",
                            list.path.display()
                        ),
                    ));
                }
            }
        }
    }
    if rows.is_empty() {
        return Err(Problem::error(
            &campaign.file,
            None,
            format!(
                "`[safety] canary` has no row to render its messages from: `{}` has no one to send to",
                list.path.display()
            ),
        ));
    }
    Ok(canary
        .iter()
        .zip(rows.iter().cycle())
        .map(|(address, row)| (address.clone(), *row))
        .collect())
}

/// One domain's count, for the plan's largest domains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainCount {
    pub domain: String,
    pub count: usize,
}

/// Domains a plan lists by name.
const TOP_DOMAINS: usize = 10;

/// What a send of the campaign as it stands would do.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub campaign: String,
    /// SHA-256 (hex) over every input's name and hash: what `send --approve` pins.
    pub fingerprint: String,
    /// Each input's SHA-256 (hex).
    pub inputs: fingerprint::Inputs,
    /// Distinct addresses in the list, suppressed ones included: what `[safety]
    /// expect_count` is compared with.
    pub recipients: usize,
    /// Messages to send: recipients not suppressed whose message rendered and passed the
    /// guard.
    pub messages: usize,
    pub suppressed: usize,
    /// Rows that cannot be sent (bad row, or a message that cannot be made).
    pub invalid: usize,
    pub duplicates: usize,
    pub expect_count: Option<usize>,
    pub locales: BTreeMap<String, usize>,
    /// The requested locales no folder serves as asked, by requested tag (as `check` warns).
    pub locale_requests: Mismatches,
    /// The largest domains, most messages first.
    pub domains: Vec<DomainCount>,
    pub other_domains: usize,
    /// Batches of `[rate] batch_size` (1 without batches).
    pub batches: usize,
    pub batch_size: Option<usize>,
    pub batch_pause_seconds: Option<f64>,
    /// The global limit in messages per second, if any.
    pub per_second: Option<f64>,
    pub burst: Option<u32>,
    /// The least time the messages take at the configured limits (global, per domain,
    /// batch pauses); `None` without any limit (as fast as the relay takes them).
    pub eta_seconds: Option<f64>,
    /// With send windows or daily caps: when the last message would go if sending began now
    /// (on the calendar's clock) and nothing had been sent yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish: Option<Finish>,
    pub transport: String,
    /// The canary stage's messages, when `[safety] canary` is set.
    pub canary: Vec<CanaryPick>,
    pub errors: usize,
    pub warnings: usize,
    /// Whether `send` would go ahead (no error but invalid rows `[safety] max_invalid`
    /// allows).
    pub sendable: bool,
}

/// What validation counted, for [`Plan::new`].
pub struct Counts<'a> {
    pub messages: usize,
    pub invalid: usize,
    pub locales: &'a BTreeMap<String, usize>,
    pub locale_requests: &'a Mismatches,
    pub domains: &'a BTreeMap<String, usize>,
    pub errors: usize,
    pub warnings: usize,
    pub sendable: bool,
}

impl Plan {
    #[must_use]
    pub fn new(
        campaign: &Campaign,
        list: &RecipientList,
        counts: &Counts<'_>,
        inputs: fingerprint::Inputs,
        canary: Vec<CanaryPick>,
    ) -> Plan {
        let mut domains: Vec<DomainCount> = counts
            .domains
            .iter()
            .map(|(domain, &count)| DomainCount {
                domain: domain.clone(),
                count,
            })
            .collect();
        domains.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.domain.cmp(&b.domain)));
        let other_domains = domains.len().saturating_sub(TOP_DOMAINS);
        let eta = eta(&campaign.rate, counts.messages, counts.domains);
        domains.truncate(TOP_DOMAINS);
        let batch = campaign.rate.batch.as_ref();
        Plan {
            campaign: campaign.id.clone(),
            fingerprint: fingerprint::combine(&inputs),
            inputs,
            recipients: list.recipients.len() + list.suppressed.len(),
            messages: counts.messages,
            suppressed: list.suppressed.len(),
            invalid: counts.invalid,
            duplicates: list.duplicates.len(),
            expect_count: campaign.safety.expect_count,
            locales: counts.locales.clone(),
            locale_requests: counts.locale_requests.clone(),
            domains,
            other_domains,
            batches: batch.map_or(1, |b| counts.messages.div_ceil(b.size.get()).max(1)),
            batch_size: batch.map(|b| b.size.get()),
            batch_pause_seconds: batch.map(|b| b.pause.as_secs_f64()),
            per_second: campaign.rate.global.as_ref().map(per_second),
            burst: campaign.rate.global.as_ref().map(|p| p.burst.get()),
            eta_seconds: eta.map(|d| d.as_secs_f64()),
            finish: None,
            transport: describe(&campaign.transport),
            canary,
            errors: counts.errors,
            warnings: counts.warnings,
            sendable: counts.sendable,
        }
    }

    /// Adds when the campaign would end across its send windows and daily caps, sending from
    /// `now` at the pace of [`eta`] (`domains`: every domain's messages).
    pub fn with_calendar(
        &mut self,
        campaign: &Campaign,
        domains: &BTreeMap<String, usize>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let calendar = &campaign.schedule.calendar;
        if calendar.windows.is_empty() && !campaign.rate.daily.any() {
            return;
        }
        #[allow(clippy::cast_precision_loss)] // counts far below 2^53
        let per_second = self
            .eta_seconds
            .filter(|s| *s > 0.0)
            .map(|s| self.messages as f64 / s);
        self.finish = Some(finish(
            calendar,
            &campaign.rate.daily,
            per_second,
            domains,
            now,
        ));
    }

    /// The fingerprint as people read it: its first [`SHORT`] hex digits.
    #[must_use]
    pub fn short(&self) -> &str {
        short(&self.fingerprint)
    }

    /// The plan for people, after `check`'s report.
    pub fn print(&self, campaign_path: &str, out: &mut impl Write) -> io::Result<()> {
        writeln!(out, "plan for campaign `{}`:", Shown(&self.campaign))?;
        let expect = match self.expect_count {
            Some(expected) if expected == self.recipients => {
                " (as [safety] expect_count says)".to_owned()
            }
            Some(expected) => format!(" — [safety] expect_count is {expected}: a send is refused"),
            None => String::new(),
        };
        writeln!(
            out,
            "  recipients      {} distinct addresses in the list{expect}",
            self.recipients
        )?;
        writeln!(
            out,
            "  to send         {} messages ({} suppressed, {} invalid, {} duplicate rows)",
            self.messages, self.suppressed, self.invalid, self.duplicates
        )?;
        let locales: Vec<String> = self
            .locales
            .iter()
            .map(|(locale, count)| format!("{} {count}", Shown(locale)))
            .collect();
        writeln!(out, "  by locale       {}", locales.join(", "))?;
        let mut domains: Vec<String> = self
            .domains
            .iter()
            .map(|d| format!("{} {}", Shown(&d.domain), d.count))
            .collect();
        if self.other_domains > 0 {
            domains.push(format!("and {} more domains", self.other_domains));
        }
        writeln!(out, "  largest domains {}", domains.join(", "))?;
        writeln!(out, "  transport       {}", Shown(&self.transport))?;
        let rate = match (self.per_second, self.burst) {
            (Some(rate), Some(burst)) => format!("{rate}/s, burst {burst}"),
            _ => "no global limit".to_owned(),
        };
        let batches = match (self.batch_size, self.batch_pause_seconds) {
            (Some(size), Some(pause)) => {
                format!("{} batches of {size}, {pause} s apart", self.batches)
            }
            _ => "one batch".to_owned(),
        };
        writeln!(out, "  pace            {rate}; {batches}")?;
        let eta = self.eta_seconds.map_or_else(
            || "as fast as the relay takes them (no limit configured)".to_owned(),
            |s| format!("at least {} at the configured limits", duration(s)),
        );
        writeln!(out, "  duration        {eta}")?;
        if let Some(finish) = &self.finish {
            writeln!(out, "  calendar        {}", finish.shown)?;
        }
        for pick in &self.canary {
            writeln!(
                out,
                "  canary          {} gets the message of line {} ({})",
                Shown(&pick.address),
                pick.line,
                Shown(&pick.locale)
            )?;
        }
        writeln!(out, "  fingerprint     {}", self.short())?;
        if self.sendable {
            let stage = if self.canary.is_empty() {
                ""
            } else {
                " --stage canary"
            };
            writeln!(
                out,
                "to send these inputs as reviewed: mailer send {}{stage} --approve {}",
                Shown(campaign_path),
                self.short()
            )?;
        }
        Ok(())
    }
}

fn per_second(pace: &crate::config::Pace) -> f64 {
    f64::from(pace.count.get()) / pace.per.as_secs_f64()
}

/// `1 h 02 min`, `3 min 20 s`, `12.5 s`.
fn duration(seconds: f64) -> String {
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    // Whole seconds of a plan's ETA: far below u64's range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let total = seconds.round() as u64;
    let (hours, minutes, secs) = (total / 3600, total / 60 % 60, total % 60);
    if hours > 0 {
        format!("{hours} h {minutes:02} min")
    } else {
        format!("{minutes} min {secs:02} s")
    }
}

/// The least time `messages` take at `rate`: the slowest of the global limit and each
/// domain's, after the burst, plus the pauses between batches. `None` without any limit.
#[must_use]
pub fn eta(rate: &Rate, messages: usize, domains: &BTreeMap<String, usize>) -> Option<Duration> {
    // Counts of messages: far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    let time = |count: usize, pace: &crate::config::Pace| {
        let after_burst = count.saturating_sub(pace.burst.get() as usize) as f64;
        after_burst / per_second(pace)
    };
    let mut limited = false;
    let mut seconds: f64 = 0.0;
    if let Some(global) = &rate.global {
        limited = true;
        seconds = seconds.max(time(messages, global));
    }
    for (domain, &count) in domains {
        if let Some(pace) = rate.domains.get(domain).or(rate.domain_default.as_ref()) {
            limited = true;
            seconds = seconds.max(time(count, pace));
        }
    }
    if let Some(batch) = &rate.batch {
        let pauses = messages.div_ceil(batch.size.get()).saturating_sub(1);
        if pauses > 0 {
            limited = true;
            // Batch pauses number far fewer than 2^32.
            seconds +=
                batch.pause.as_secs_f64() * f64::from(u32::try_from(pauses).unwrap_or(u32::MAX));
        }
    }
    limited.then(|| Duration::from_secs_f64(seconds))
}

/// When the last message goes, across send windows and daily caps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finish {
    /// RFC 3339, UTC; `None`: never (a domain's messages with no way through).
    pub ends_at: Option<String>,
    /// Calendar days with sending, from the first to the last (in the campaign's time zone).
    pub days: u32,
    /// For people: `4 days: ends Thu 2026-12-10 14:05 Europe/Paris`.
    pub shown: String,
}

/// When `domains`' messages are all sent, starting at `now` with nothing sent yet (day 0 of
/// the warm-up), at `per_second` overall (`None`: no limit), only inside the send windows, and
/// no more a day than the caps allow. Domains with a cap of their own go first each day (it
/// gives the least time; the scheduler takes turns, so this is a lower bound like [`eta`]).
#[must_use]
pub fn finish(
    calendar: &Calendar,
    caps: &DailyCaps,
    per_second: Option<f64>,
    domains: &BTreeMap<String, usize>,
    now: chrono::DateTime<chrono::Utc>,
) -> Finish {
    // Domains with their own cap, and every other message together.
    let mut capped: Vec<(usize, u64)> = Vec::new();
    let mut free: u64 = 0;
    for (domain, &count) in domains {
        match caps.domain(domain) {
            Some(cap) => capped.push((count, u64::from(cap))),
            None => free += count as u64,
        }
    }
    let mut t = now;
    let mut first_day: Option<chrono::NaiveDate> = None;
    let mut last = now;
    // The current day, and what its caps still allow.
    let mut today: Option<chrono::NaiveDate> = None;
    let mut global_left = u64::MAX;
    let mut domain_left: Vec<u64> = capped.iter().map(|(_, cap)| *cap).collect();
    // Four years of windows at most: past that the campaign is said never to end.
    for _ in 0..(366 * 4 * 8) {
        if free + capped.iter().map(|(n, _)| *n as u64).sum::<u64>() == 0 {
            break;
        }
        let until = match calendar.open(t) {
            Open::Closed(Some(next)) => {
                t = next;
                continue;
            }
            Open::Closed(None) => break,
            Open::Always => None,
            Open::Until(until) => Some(until),
        };
        let (_, day_end) = calendar.day_bounds(t);
        let day = calendar.day(t);
        if today != Some(day) {
            today = Some(day);
            let index = first_day.map_or(0, |first| {
                u32::try_from((day - first).num_days()).unwrap_or(u32::MAX)
            });
            global_left = caps.global(index).map_or(u64::MAX, u64::from);
            domain_left = capped.iter().map(|(_, cap)| *cap).collect();
        }
        let end = until.map_or(day_end, |u| u.min(day_end));
        // Messages the rate lets go before `end`.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let by_rate = per_second.map_or(u64::MAX, |r| {
            ((end - t).num_milliseconds().max(0) as f64 / 1000.0 * r).floor() as u64
        });
        let mut room = by_rate.min(global_left);
        let mut sent: u64 = 0;
        for ((count, _), allowed) in capped.iter_mut().zip(&mut domain_left) {
            let n = (*count as u64).min(*allowed).min(room);
            *count -= usize::try_from(n).unwrap_or(*count);
            *allowed -= n;
            room -= n;
            sent += n;
        }
        let n = free.min(room);
        free -= n;
        sent += n;
        global_left = global_left.saturating_sub(sent);
        if sent > 0 {
            first_day.get_or_insert(day);
            #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
            let took = per_second.map_or(0, |r| ((sent - 1) as f64 / r * 1000.0).ceil() as i64);
            last = (t + chrono::TimeDelta::milliseconds(took)).min(end);
        }
        // Fewer than the rate allowed: the caps hold the rest until the next day; otherwise
        // the window (or the day) is over.
        t = if sent < by_rate { day_end } else { end };
    }
    let left = free + capped.iter().map(|(n, _)| *n as u64).sum::<u64>();
    if left > 0 {
        return Finish {
            ends_at: None,
            days: 0,
            shown: format!(
                "{left} messages can never go within `[schedule] window` and the daily caps"
            ),
        };
    }
    let days = first_day.map_or(1, |first| {
        u32::try_from((calendar.day(last) - first).num_days() + 1).unwrap_or(u32::MAX)
    });
    let plural = if days == 1 { "" } else { "s" };
    Finish {
        ends_at: Some(last.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        days,
        shown: format!("{days} day{plural}: ends {}", calendar.show(last)),
    }
}

/// The transport in a line, without credentials.
fn describe(transport: &Transport) -> String {
    match transport {
        Transport::File { outbox } => {
            format!("file: one .eml per message in `{}`", outbox.display())
        }
        Transport::Smtp(smtp) => {
            let security = smtp.security.describe();
            let auth = if smtp.auth.is_some() {
                ", AUTH PLAIN or LOGIN"
            } else {
                ""
            };
            format!(
                "smtp {}:{} ({security}{auth}), {} connections",
                smtp.host, smtp.port, smtp.connections
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Batch, Pace};
    use std::num::{NonZeroU32, NonZeroUsize};

    fn pace(count: u32, burst: u32) -> Pace {
        Pace::new(
            NonZeroU32::new(count).unwrap(),
            Duration::from_secs(1),
            NonZeroU32::new(burst),
        )
    }

    #[test]
    fn an_approval_is_a_long_enough_hex_prefix() {
        let approval: Approval = " 3F9A1C ".parse().unwrap();
        assert!(approval.matches("3f9a1c00aa"));
        assert!(!approval.matches("3f9a1d00aa"));
        assert!(
            "3f9a1".parse::<Approval>().is_err(),
            "five digits are too few"
        );
        let error = "3f9a1g".parse::<Approval>().unwrap_err();
        assert!(error.contains("`3f9a1g`"), "{error}");
        assert!("".parse::<Approval>().is_err());
    }

    #[test]
    fn the_eta_is_the_slowest_limit_plus_the_batch_pauses() {
        let domains: BTreeMap<String, usize> = [
            ("big.example".to_owned(), 600),
            ("small.example".to_owned(), 400),
        ]
        .into();
        assert_eq!(eta(&Rate::default(), 1000, &domains), None);
        let global = Rate {
            global: Some(pace(100, 10)),
            ..Rate::default()
        };
        // (1000 - 10) / 100.
        assert_eq!(
            eta(&global, 1000, &domains),
            Some(Duration::from_millis(9900))
        );
        // One domain at 10/s is slower: (600 - 1) / 10.
        let mut per_domain = global.clone();
        per_domain
            .domains
            .insert("big.example".to_owned(), pace(10, 1));
        assert_eq!(
            eta(&per_domain, 1000, &domains),
            Some(Duration::from_millis(59900))
        );
        let batched = Rate {
            batch: Some(Batch {
                size: NonZeroUsize::new(300).unwrap(),
                pause: Duration::from_secs(60),
            }),
            ..Rate::default()
        };
        // Four batches, three pauses.
        assert_eq!(
            eta(&batched, 1000, &domains),
            Some(Duration::from_secs(180))
        );
    }

    fn utc(text: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn paris(windows: &[&str]) -> Calendar {
        Calendar {
            timezone: chrono_tz::Tz::Europe__Paris,
            windows: windows.iter().map(|w| w.parse().unwrap()).collect(),
        }
    }

    fn one_domain(count: usize) -> BTreeMap<String, usize> {
        [("example.com".to_owned(), count)].into()
    }

    #[test]
    fn the_plan_ends_across_windows_and_daily_caps() {
        let monday_nine = utc("2026-12-07T08:00:00Z");
        let office = paris(&["Mon-Fri 09:00-17:00"]);
        let cap = |n| DailyCaps {
            per_day: NonZeroU32::new(n),
            ..DailyCaps::default()
        };
        // 5,000 a day at 1/s: 5,000 Monday, 5,000 Tuesday, 2,000 Wednesday from 09:00.
        let f = finish(
            &office,
            &cap(5000),
            Some(1.0),
            &one_domain(12_000),
            monday_nine,
        );
        assert_eq!(f.shown, "3 days: ends Wed 2026-12-09 09:33 Europe/Paris");
        assert_eq!(f.ends_at.as_deref(), Some("2026-12-09T08:33:19Z"));
        // No cap: the rate fills each 8-hour window (28,800), the rest on Tuesday.
        let f = finish(
            &office,
            &DailyCaps::default(),
            Some(1.0),
            &one_domain(40_000),
            monday_nine,
        );
        assert_eq!(f.shown, "2 days: ends Tue 2026-12-08 12:06 Europe/Paris");
        // Friday 16:00: an hour on Friday, the rest on Monday morning.
        let f = finish(
            &office,
            &DailyCaps::default(),
            Some(1.0),
            &one_domain(7200),
            utc("2026-12-11T15:00:00Z"),
        );
        assert_eq!(f.shown, "4 days: ends Mon 2026-12-14 09:59 Europe/Paris");
        // Planned outside the window: it starts at the next opening.
        let f = finish(
            &office,
            &cap(5000),
            None,
            &one_domain(10),
            utc("2026-12-12T12:00:00Z"),
        );
        assert_eq!(f.shown, "1 day: ends Mon 2026-12-14 09:00 Europe/Paris");
    }

    #[test]
    fn the_plan_follows_the_warm_up_and_domain_caps_day_by_day() {
        let caps = DailyCaps {
            warmup: vec![NonZeroU32::new(100).unwrap(), NonZeroU32::new(200).unwrap()],
            ..DailyCaps::default()
        };
        let any_time = paris(&[]);
        let f = finish(
            &any_time,
            &caps,
            None,
            &one_domain(250),
            utc("2026-12-07T10:00:00Z"),
        );
        assert_eq!(f.shown, "2 days: ends Tue 2026-12-08 00:00 Europe/Paris");
        // Past the warm-up without per_day: no cap.
        let f = finish(
            &any_time,
            &caps,
            None,
            &one_domain(10_000),
            utc("2026-12-07T10:00:00Z"),
        );
        assert_eq!(f.days, 3);
        let gmail = DailyCaps {
            domains: [("gmail.com".to_owned(), NonZeroU32::new(10).unwrap())].into(),
            ..DailyCaps::default()
        };
        let domains: BTreeMap<String, usize> = [
            ("gmail.com".to_owned(), 25),
            ("example.com".to_owned(), 1000),
        ]
        .into();
        let f = finish(
            &any_time,
            &gmail,
            None,
            &domains,
            utc("2026-12-07T10:00:00Z"),
        );
        assert_eq!(f.shown, "3 days: ends Wed 2026-12-09 00:00 Europe/Paris");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(duration(12.46), "12.5 s");
        assert_eq!(duration(200.0), "3 min 20 s");
        assert_eq!(duration(3720.0), "1 h 02 min");
    }
}
