//! `mailer status` and `mailer report`: the journal's view of a campaign, for people and
//! for programs.
//!
//! Pure: takes what the journal read and writes into any `impl Write`.

use std::io::{self, Write};

use crate::journal::query::{Row, Status};
use crate::printable::Shown;

/// The human form of `mailer status`.
pub fn print_status(status: &Status, out: &mut impl Write) -> io::Result<()> {
    match &status.slot {
        Some(slot) => writeln!(
            out,
            "campaign {} (schedule slot {})",
            Shown(&status.campaign),
            Shown(slot)
        )?,
        None => writeln!(out, "campaign {}", Shown(&status.campaign))?,
    }
    let counts: Vec<String> = status
        .counts
        .iter()
        .map(|(state, n)| format!("{} {n}", Shown(state)))
        .collect();
    writeln!(out, "  recipients {}: {}", status.total, counts.join(" · "))?;
    writeln!(
        out,
        "  {}",
        if status.complete {
            "complete: every recipient is in a final state"
        } else if status.listed {
            "not complete: recipients are waiting"
        } else {
            "not started: no run has listed the recipients yet"
        }
    )?;
    if let (Some(first), Some(last)) = (&status.first_attempt_at, &status.last_attempt_at) {
        writeln!(out, "  attempts from {first} to {last}")?;
    }
    if let Some(rate) = status.rate_per_second {
        write!(out, "  rate {rate:.1}/s over the last minute of sending")?;
        match status.eta_seconds {
            Some(eta) => writeln!(
                out,
                "; ETA {} at that rate",
                humantime::format_duration(std::time::Duration::from_secs(eta))
            )?,
            None => writeln!(out)?,
        }
    }
    if let Some(next) = &status.next_retry_at {
        writeln!(out, "  next retry of a deferred recipient at {next}")?;
    }
    if !status.replies.is_empty() {
        let replies: Vec<String> = status
            .replies
            .iter()
            .map(|r| match &r.enhanced {
                Some(enhanced) => format!("{} {} ×{}", r.code, Shown(enhanced), r.count),
                None => format!("{} ×{}", r.code, r.count),
            })
            .collect();
        writeln!(out, "  top replies: {}", replies.join(", "))?;
    }
    if !status.domains.is_empty() {
        writeln!(out, "  largest domains:")?;
        for domain in &status.domains {
            let counts: Vec<String> = domain
                .counts
                .iter()
                .map(|(state, n)| format!("{} {n}", Shown(state)))
                .collect();
            writeln!(
                out,
                "    {:<32} {:>8}  {}",
                Shown(&domain.domain).to_string(),
                domain.total,
                counts.join(" · ")
            )?;
        }
    }
    if let Some(waiting) = &status.waiting {
        writeln!(out, "  waiting: {waiting}")?;
    }
    for capped in &status.capped {
        writeln!(out, "  capped: {capped}")?;
    }
    if !status.bounce_classes.is_empty() {
        let classes: Vec<String> = status
            .bounce_classes
            .iter()
            .map(|c| format!("{} ({}) ×{}", Shown(&c.class), Shown(&c.severity), c.count))
            .collect();
        writeln!(out, "  top bounce classes: {}", classes.join(", "))?;
    }
    for suspended in &status.suspended {
        writeln!(
            out,
            "  {} suspended until {} (it kept throttling): nothing goes to it before then",
            Shown(&suspended.domain),
            suspended.until
        )?;
    }
    for canary in &status.canary {
        writeln!(
            out,
            "  canary {:<25} {:<10} line {} ({}), inputs {}, {}",
            Shown(&canary.address).to_string(),
            Shown(&canary.state).to_string(),
            canary.line,
            Shown(&canary.locale),
            crate::plan::short(&canary.fingerprint),
            canary.at
        )?;
    }
    match &status.halt {
        Some(halt) => writeln!(
            out,
            "  HALTED since {} by {}: {} — every send exits 3 until `mailer resume`",
            halt.at,
            Shown(&halt.by),
            Shown(&halt.reason)
        ),
        None => writeln!(out, "  not halted"),
    }
}

/// The columns of `mailer report --format csv`.
pub const REPORT_COLUMNS: [&str; 18] = [
    "line",
    "address",
    "locale",
    "state",
    "attempts",
    "reply_code",
    "reply_enhanced",
    "reply_text",
    "message_id",
    "content_hash",
    "first_attempt_at",
    "last_attempt_at",
    "updated_at",
    "bounce_class",
    "bounce_severity",
    "bounce_status",
    "bounce_diagnostic",
    "bounced_at",
];

/// One report row as CSV fields, in [`REPORT_COLUMNS`] order, each safe to open in a
/// spreadsheet (see [`cell`]). The numbers are ours and left as they are.
#[must_use]
pub fn csv_fields(row: &Row) -> [String; 18] {
    let text = |v: &Option<String>| v.as_deref().map(cell).unwrap_or_default();
    [
        row.line.to_string(),
        text(&row.address),
        text(&row.locale),
        cell(&row.state),
        row.attempts.to_string(),
        row.reply_code.map(|c| c.to_string()).unwrap_or_default(),
        text(&row.reply_enhanced),
        text(&row.reply_text),
        text(&row.message_id),
        text(&row.content_hash),
        text(&row.first_attempt_at),
        text(&row.last_attempt_at),
        cell(&row.updated_at),
        text(&row.bounce_class),
        text(&row.bounce_severity),
        text(&row.bounce_status),
        text(&row.bounce_diagnostic),
        text(&row.bounced_at),
    ]
}

/// A text cell of the CSV report: control characters escaped as on a terminal, and a value a
/// spreadsheet would take for a formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage
/// return, as OWASP lists them) given a leading `'`, so that it shows as text. An address such
/// as `=1+1@example.com` is valid mail; in a spreadsheet it must stay an address.
#[must_use]
pub fn cell(value: &str) -> String {
    let formula = value.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let escaped = crate::printable::escape(value);
    if formula {
        format!("'{escaped}")
    } else {
        escaped.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: &str, expected: &str) {
        assert_eq!(cell(value), expected, "{value:?}");
    }

    #[test]
    fn cells_that_look_like_formulas_are_text() {
        check("=1+1@example.com", "'=1+1@example.com");
        check("+x@example.com", "'+x@example.com");
        check("-x@example.com", "'-x@example.com");
        check("@SUM(A1:A9)", "'@SUM(A1:A9)");
        check("\tx", "'\\tx");
        check("\r=1", "'\\r=1");
        check("x=1+1@example.com", "x=1+1@example.com");
        check("550", "550");
        check("2026-12-01T09:00:00Z", "2026-12-01T09:00:00Z");
    }

    #[test]
    fn cells_have_no_control_characters() {
        check("\x1b[2J\x1b[31mFAKE\x07", "\\x1b[2J\\x1b[31mFAKE\\x07");
        check("a\0b\u{9b}c\u{202e}", "a\\x00b\\u{9b}c\\u{202e}");
        check("Zoë 中", "Zoë 中");
    }
}
