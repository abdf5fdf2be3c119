//! `mailer status` and `mailer report`: the journal's view of a campaign, for people and
//! for programs.
//!
//! Pure: takes what the journal read and writes into any `impl Write`.

use std::io::{self, Write};

use crate::journal::query::{Row, Status};

/// The human form of `mailer status`.
pub fn print_status(status: &Status, out: &mut impl Write) -> io::Result<()> {
    match &status.slot {
        Some(slot) => writeln!(out, "campaign {} (schedule slot {slot})", status.campaign)?,
        None => writeln!(out, "campaign {}", status.campaign)?,
    }
    let counts: Vec<String> = status
        .counts
        .iter()
        .map(|(state, n)| format!("{state} {n}"))
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
                Some(enhanced) => format!("{} {enhanced} ×{}", r.code, r.count),
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
                .map(|(state, n)| format!("{state} {n}"))
                .collect();
            writeln!(
                out,
                "    {:<32} {:>8}  {}",
                domain.domain,
                domain.total,
                counts.join(" · ")
            )?;
        }
    }
    for canary in &status.canary {
        writeln!(
            out,
            "  canary {:<25} {:<10} line {} ({}), inputs {}, {}",
            canary.address,
            canary.state,
            canary.line,
            canary.locale,
            crate::plan::short(&canary.fingerprint),
            canary.at
        )?;
    }
    match &status.halt {
        Some(halt) => writeln!(
            out,
            "  HALTED since {} by {}: {} — every send exits 3 until `mailer resume`",
            halt.at, halt.by, halt.reason
        ),
        None => writeln!(out, "  not halted"),
    }
}

/// The columns of `mailer report --format csv`.
pub const REPORT_COLUMNS: [&str; 13] = [
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
];

/// One report row as CSV fields, in [`REPORT_COLUMNS`] order.
#[must_use]
pub fn csv_fields(row: &Row) -> [String; 13] {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    [
        row.line.to_string(),
        text(&row.address),
        text(&row.locale),
        row.state.clone(),
        row.attempts.to_string(),
        row.reply_code.map(|c| c.to_string()).unwrap_or_default(),
        text(&row.reply_enhanced),
        text(&row.reply_text),
        text(&row.message_id),
        text(&row.content_hash),
        text(&row.first_attempt_at),
        text(&row.last_attempt_at),
        row.updated_at.clone(),
    ]
}
