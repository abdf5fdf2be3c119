//! `mailer probe`: whether a send would get through the campaign's relay, found without
//! sending anything. Reads the campaign file and the password (not the list or the
//! templates), then `dispatch::probe` talks to the relay; this prints what it found, as text
//! or one JSON object. Records nothing: no message goes, so there is nothing to journal.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::config::{self, Transport};
use crate::dispatch::SmtpSettings;
use crate::dispatch::probe::{self, Probe, Protection, Request, Verdict};
use crate::exit::{Exit, Failure};
use crate::printable::Shown;

pub fn run(
    path: &Path,
    to: Option<&str>,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let campaign = config::load(path)?;
    let smtp = match &campaign.transport {
        Transport::Smtp(smtp) => smtp,
        // A send would get through: it writes files. Exit 0, so that `probe && send` works
        // for either transport.
        Transport::File { outbox } => {
            if json {
                serde_json::to_writer(
                    &mut *out,
                    &NoRelay {
                        campaign: &campaign.id,
                        transport: "file",
                        outbox: &outbox.display().to_string(),
                        verdict: "no_relay",
                        exit: Exit::Complete as u8,
                    },
                )?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "no relay to probe: `{}` writes its messages to the outbox `{}`",
                    Shown(path.display()),
                    Shown(outbox.display())
                )?;
            }
            return Ok(Exit::Complete);
        }
    };
    let rcpt_to = match to {
        Some(raw) => crate::address::normalise(raw).map_err(|reason| {
            Failure::new(
                Exit::Usage,
                format!("`--to {}` is not an address: {reason}", Shown(raw)),
            )
        })?,
        None => campaign.safety.canary.first().cloned().ok_or_else(|| {
            Failure::new(
                Exit::Usage,
                format!(
                    "there is no address to try `RCPT TO` with: give one with `--to ADDRESS`, or set `[safety] canary` in `{}`",
                    Shown(path.display())
                ),
            )
        })?,
    };
    // Reads the password and `ca_file` as a send does: missing, they are errors here (65).
    let settings = Arc::new(SmtpSettings::new(smtp)?);
    // With `[bounces]`, `MAIL FROM` has the shape a send gives it: the return path with the
    // probed address's token (a relay may treat it otherwise than the sender).
    let mail_from = match &campaign.bounces {
        None => campaign.from.email.clone(),
        Some(bounces) => {
            let key = bounces
                .key()
                .map_err(|message| Failure::new(Exit::InvalidInput, message))?;
            crate::bounce::verp::return_path(
                &bounces.return_path,
                &crate::bounce::verp::token(
                    key.expose().as_bytes(),
                    &campaign.id,
                    &rcpt_to.to_string(),
                ),
            )
        }
    };
    let request = Request {
        mail_from,
        rcpt_to: rcpt_to.to_lettre(),
        max_message_size: campaign.safety.max_message_size,
        now: crate::clock::now(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let found = runtime.block_on(probe::probe(settings, &request));
    let exit = found.verdict.exit();
    if json {
        serde_json::to_writer(
            &mut *out,
            &Report {
                campaign: &campaign.id,
                transport: "smtp",
                probe: &found,
                exit: exit as u8,
            },
        )?;
        writeln!(out)?;
    } else {
        print(&found, smtp.accept_invalid_certs, out)?;
    }
    Ok(exit)
}

/// `--json` for an SMTP campaign: the probe's findings, exact, with the exit code.
#[derive(Serialize)]
struct Report<'a> {
    campaign: &'a str,
    transport: &'static str,
    #[serde(flatten)]
    probe: &'a Probe,
    exit: u8,
}

/// `--json` for a campaign with no relay.
#[derive(Serialize)]
struct NoRelay<'a> {
    campaign: &'a str,
    transport: &'static str,
    outbox: &'a str,
    verdict: &'static str,
    exit: u8,
}

/// The width of the labels on the left.
const LABEL: usize = 13;

/// The probe as text: every value from the relay escaped.
fn print(
    probe: &Probe,
    accept_invalid_certs: bool,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let mut session = Vec::new();
    match probe.protection {
        None => {}
        Some(Protection::Plain) => session.push("plain text".to_owned()),
        Some(tls) => {
            session.push(
                if tls == Protection::Starttls {
                    "STARTTLS"
                } else {
                    "TLS (smtps)"
                }
                .to_owned(),
            );
            session.push(
                if accept_invalid_certs {
                    "certificate NOT verified (dangerous_accept_invalid_certs)"
                } else {
                    "certificate verified"
                }
                .to_owned(),
            );
        }
    }
    if let Some(user) = &probe.authenticated_as {
        session.push(format!("logged in as `{}`", Shown(user)));
    }
    write!(out, "{:LABEL$}{}", "relay", Shown(&probe.relay))?;
    if session.is_empty() {
        writeln!(out)?;
    } else {
        writeln!(out, " ({})", session.join(", "))?;
    }
    if let Some(certificate) = &probe.certificate {
        let self_signed = if certificate.subject == certificate.issuer {
            " (self-signed)"
        } else {
            ""
        };
        let left = if certificate.expired {
            "expired".to_owned()
        } else {
            format!("in {} days", certificate.days_left)
        };
        let mut lines = vec![
            format!("subject {}", Shown(&certificate.subject)),
            format!("issuer  {}{self_signed}", Shown(&certificate.issuer)),
        ];
        if !certificate.names.is_empty() {
            lines.push(format!("names   {}", Shown(certificate.names.join(", "))));
        }
        lines.push(format!("expires {} ({left})", certificate.not_after));
        block(out, "certificate", &lines)?;
    }
    if probe.protection.is_some() {
        let mut lines = Vec::new();
        if probe.protection == Some(Protection::Starttls) {
            lines.push("STARTTLS (taken before this list)".to_owned());
        }
        for capability in &probe.capabilities {
            lines.push(if capability.parameters.is_empty() {
                capability.keyword.clone()
            } else {
                format!("{} {}", capability.keyword, Shown(&capability.parameters))
            });
        }
        if lines.is_empty() {
            lines.push("none listed".to_owned());
        }
        block(out, "extensions", &lines)?;
    }
    if let Some(wire) = probe.wire {
        block(out, "sending", &[wire.describe().to_owned()])?;
    }
    if !probe.exchanges.is_empty() {
        let mut lines = Vec::new();
        for exchange in &probe.exchanges {
            lines.push(format!("> {}", Shown(&exchange.command)));
            let mut reply = String::from("< ");
            match exchange.code {
                Some(code) => reply.push_str(&code.to_string()),
                None => reply.push_str("(no reply)"),
            }
            for part in [exchange.enhanced.as_deref(), Some(exchange.text.as_str())]
                .into_iter()
                .flatten()
                .filter(|p| !p.is_empty())
            {
                reply.push(' ');
                reply.push_str(&Shown(part).to_string());
            }
            lines.push(reply);
        }
        block(out, "transcript", &lines)?;
    }
    for warning in &probe.warnings {
        writeln!(out, "warning: {}", Shown(warning))?;
    }
    let exit = probe.verdict.exit() as u8;
    let reason = probe.reason.as_deref().unwrap_or_default();
    match probe.verdict {
        Verdict::Ready => writeln!(
            out,
            "ready: a send would get through this relay; nothing was sent (exit {exit})"
        ),
        Verdict::ConfigurationError => writeln!(
            out,
            "configuration error: {} — change the campaign's configuration (or the relay's) before sending (exit {exit})",
            Shown(reason)
        ),
        // Without a session: the relay may be down, or this is the wrong place for it.
        Verdict::RelayUnavailable if probe.protection.is_none() => writeln!(
            out,
            "relay unavailable: {} — a send now would wait and try again; check that the relay is up and that the host, port and scheme are right (exit {exit})",
            Shown(reason)
        ),
        Verdict::RelayUnavailable => writeln!(
            out,
            "relay unavailable: {} — a send now would wait and try again (exit {exit})",
            Shown(reason)
        ),
    }
}

/// Lines under a label: the label on the first, the others indented to match.
fn block(out: &mut impl std::io::Write, label: &str, lines: &[String]) -> std::io::Result<()> {
    for (i, line) in lines.iter().enumerate() {
        let label = if i == 0 { label } else { "" };
        writeln!(out, "{label:LABEL$}{line}")?;
    }
    Ok(())
}
