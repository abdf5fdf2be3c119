//! `mailer probe`'s conversation with the relay: connect exactly as a send does (TCP, TLS or
//! STARTTLS, AUTH: [`super::smtp::Connection`]'s own `connect`), ask for the relay's
//! extensions with an EHLO of our own, read its certificate, then try `MAIL FROM` and one
//! `RCPT TO` — and `RSET`, `QUIT`. Never `DATA`: nothing can be delivered.
//!
//! I/O: the network. Parsing the EHLO reply and the certificate is pure. Whatever the relay
//! says is kept exact (capped in length) and escaped only where it is shown.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lettre::Address;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Ehlo, Mail, Quit, Rcpt, Rset};
use lettre::transport::smtp::extension::{Extension as LettreExtension, MailParameter};
use serde::Serialize;
use tokio::net::TcpStream;

pub use super::ehlo::{Capability, Wire};
use super::ehlo::{Offers, capabilities, capped, size_limit};
use super::smtp::{Connection, Settings, describe, reply_of};
use super::{FailureKind, RelayFailure};
use crate::config::Security;
use crate::exit::Exit;
use crate::outcome::Reply;

/// A certificate that expires sooner than this is worth a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);
/// The most characters kept of a reply's text, a certificate's name or a failure's reason.
const MAX_TEXT: usize = 512;
/// The most names kept from a certificate's subject alternative names.
const MAX_NAMES: usize = 16;

/// What the probe tries: the envelope a send would use, and what the campaign expects.
#[derive(Debug, Clone)]
pub struct Request {
    /// The campaign's sender, as `send` gives it in `MAIL FROM`.
    pub mail_from: Address,
    /// The address for `RCPT TO`: the first canary, or one the operator chose.
    pub rcpt_to: Address,
    /// `[safety] max_message_size`, to compare with the relay's `SIZE`.
    pub max_message_size: usize,
    /// Now, for the certificate's expiry.
    pub now: SystemTime,
}

/// How the probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Connection, TLS, AUTH, `MAIL FROM` and `RCPT TO` accepted: a send would get through.
    Ready,
    /// Something in the configuration (or the relay's) must change: a certificate mailer
    /// refused, credentials the relay refused, the sender or recipient refused for good.
    ConfigurationError,
    /// The relay cannot be used now: no connection, no answer, a temporary refusal (4xx).
    RelayUnavailable,
}

impl Verdict {
    /// The one place where the kinds of a failed connection become the probe's verdicts.
    #[must_use]
    pub fn of(failure: &RelayFailure) -> Verdict {
        match failure.kind {
            // mailer refused the relay's certificate, the relay refused the credentials or the
            // TLS, no AUTH mechanism in common, the wrong scheme for the port: waiting will
            // not fix it.
            FailureKind::Config => Verdict::ConfigurationError,
            // No connection, no greeting, no answer in time, a session that broke. (`Local`
            // is the outbox's, never the relay's.)
            FailureKind::Outage | FailureKind::Local => Verdict::RelayUnavailable,
        }
    }

    #[must_use]
    pub fn exit(self) -> Exit {
        match self {
            Verdict::Ready => Exit::Complete,
            Verdict::ConfigurationError => Exit::InvalidInput,
            Verdict::RelayUnavailable => Exit::RelayUnavailable,
        }
    }
}

/// How the probe's session was protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// `smtps://`: TLS from the first byte.
    ImplicitTls,
    /// `STARTTLS`, taken before this EHLO (so it is not among the extensions listed).
    Starttls,
    Plain,
}

/// The relay's certificate, as far as a person needs to see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Certificate {
    pub subject: String,
    pub issuer: String,
    /// The DNS names and IP addresses it is valid for.
    pub names: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
    /// Whole days from now until it expires (rounded towards zero).
    pub days_left: i64,
    pub expired: bool,
    /// Whether it expires within [`EXPIRY_WARNING`].
    pub expires_soon: bool,
}

/// One command of the probe and the reply to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exchange {
    pub command: String,
    /// None when there was no reply (the connection broke, or the time ran out).
    pub code: Option<u16>,
    pub enhanced: Option<String>,
    /// The reply's text, or why there was none.
    pub text: String,
}

/// Everything the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// `host:port`.
    pub relay: String,
    /// None when no session was opened.
    pub protection: Option<Protection>,
    /// The user name the relay accepted, when the campaign logs in.
    pub authenticated_as: Option<String>,
    pub capabilities: Vec<Capability>,
    /// How a send's transactions would go, from the extensions (none when no EHLO reply).
    pub wire: Option<Wire>,
    pub certificate: Option<Certificate>,
    pub exchanges: Vec<Exchange>,
    pub warnings: Vec<String>,
    pub verdict: Verdict,
    /// Why the verdict is not `ready`: one sentence, the relay's words kept exact.
    pub reason: Option<String>,
}

impl Probe {
    fn ended(&mut self, verdict: Verdict, reason: &str) {
        // The first verdict against the send stands: later steps only add to the transcript.
        if self.verdict == Verdict::Ready {
            self.verdict = verdict;
            self.reason = Some(capped(reason, MAX_TEXT));
        }
    }
}

/// Talks to the relay of `settings` as a send would, and says whether a send would get
/// through.
pub async fn probe(settings: Arc<Settings>, request: &Request) -> Probe {
    let smtp = settings.smtp();
    let mut probe = Probe {
        relay: format!("{}:{}", smtp.host, smtp.port),
        protection: None,
        authenticated_as: None,
        capabilities: Vec::new(),
        wire: None,
        certificate: None,
        exchanges: Vec::new(),
        warnings: Vec::new(),
        verdict: Verdict::Ready,
        reason: None,
    };
    let (mut connection, ehlo) = match Connection::new(Arc::clone(&settings)).connect().await {
        Ok(opened) => opened,
        Err(failure) => {
            probe.ended(Verdict::of(&failure), &failure.reason);
            return probe;
        }
    };
    let protection = if smtp.security == Security::ImplicitTls {
        Protection::ImplicitTls
    } else if connection.is_encrypted() {
        Protection::Starttls
    } else {
        Protection::Plain
    };
    probe.protection = Some(protection);
    probe.authenticated_as = smtp.auth.as_ref().map(|auth| auth.username.clone());
    let timeout = smtp.command_timeout;

    // lettre keeps only a few extensions of the EHLO it said: the connection came with the
    // reply to an EHLO of mailer's own, said after TLS and before AUTH.
    let line = Ehlo::new(settings.hello().clone())
        .to_string()
        .trim_end()
        .to_owned();
    match said(line, ehlo) {
        Said::Replied(lines, mut exchange) => {
            probe.capabilities = capabilities(lines.iter().map(String::as_str));
            let offered = Offers::of(&probe.capabilities).wire;
            probe.wire = Some(offered.within(smtp.pipelining, smtp.chunking));
            // The first line names the relay; the others are listed as extensions.
            exchange.enhanced = None;
            exchange.text = capped(lines.first().map_or("", String::as_str), MAX_TEXT);
            probe.exchanges.push(exchange);
        }
        Said::Refused(_, exchange) => {
            // A send goes command by command then.
            probe.wire = Some(Wire::Serial);
            probe.warnings.push(format!(
                "the relay refused a second EHLO, so its extensions are not listed: {}",
                exchange.text
            ));
            probe.exchanges.push(exchange);
        }
        Said::Lost(exchange) => {
            let reason = format!("the connection broke at EHLO: {}", exchange.text);
            probe.exchanges.push(exchange);
            probe.ended(Verdict::RelayUnavailable, &reason);
        }
    }
    warn_about_extensions(&mut probe, &connection, protection, request);

    if probe.verdict == Verdict::Ready {
        transaction(&mut probe, &mut connection, timeout, request).await;
    }

    probe.certificate = match protection {
        Protection::Plain => None,
        Protection::Starttls => connection.peer_certificate().ok(),
        // mailer's own TLS stream, inside lettre's connection, is out of reach: the same
        // TLS settings, on a connection of their own, see the same certificate.
        Protection::ImplicitTls => match implicit_tls_certificate(&settings).await {
            Ok(der) => der,
            Err(error) => {
                probe.warnings.push(format!(
                    "the relay's certificate could not be read: {error}"
                ));
                None
            }
        },
    }
    .and_then(|der| match certificate(&der, request.now) {
        Ok(certificate) => Some(certificate),
        Err(error) => {
            probe.warnings.push(format!(
                "the relay's certificate could not be read: {error}"
            ));
            None
        }
    });
    if let Some(certificate) = &probe.certificate
        && certificate.expires_soon
    {
        probe.warnings.push(if certificate.expired {
            format!(
                "the relay's certificate expired on {}: renew it",
                certificate.not_after
            )
        } else {
            format!(
                "the relay's certificate expires on {}, in {} days: renew it before then",
                certificate.not_after, certificate.days_left
            )
        });
    }
    probe
}

/// `MAIL FROM`, `RCPT TO`, then `RSET` and `QUIT`; what the relay refuses becomes the verdict.
async fn transaction(
    probe: &mut Probe,
    connection: &mut AsyncSmtpConnection,
    timeout: Duration,
    request: &Request,
) {
    let mut parameters = Vec::new();
    if !request.mail_from.to_string().is_ascii() || !request.rcpt_to.to_string().is_ascii() {
        if !connection
            .server_info()
            .supports_feature(LettreExtension::SmtpUtfEight)
        {
            probe.ended(
                Verdict::ConfigurationError,
                &format!(
                    "the relay does not offer SMTPUTF8, which `{}` or `{}` needs",
                    request.mail_from, request.rcpt_to
                ),
            );
            quit(probe, connection, timeout).await;
            return;
        }
        parameters.push(MailParameter::SmtpUtfEight);
    }
    let mail = Mail::new(Some(request.mail_from.clone()), parameters);
    match command(connection, timeout, mail).await {
        Said::Replied(_, exchange) => probe.exchanges.push(exchange),
        Said::Refused(reply, exchange) => {
            probe.exchanges.push(exchange);
            probe.ended(
                refusal(&reply),
                &format!(
                    "the relay refused the sender `{}`: {}",
                    request.mail_from,
                    reply.exact()
                ),
            );
            quit(probe, connection, timeout).await;
            return;
        }
        Said::Lost(exchange) => {
            let reason = format!("the connection broke at MAIL FROM: {}", exchange.text);
            probe.exchanges.push(exchange);
            probe.ended(Verdict::RelayUnavailable, &reason);
            return;
        }
    }
    let rcpt = Rcpt::new(request.rcpt_to.clone(), vec![]);
    match command(connection, timeout, rcpt).await {
        Said::Replied(_, exchange) => probe.exchanges.push(exchange),
        Said::Refused(reply, exchange) => {
            probe.exchanges.push(exchange);
            probe.ended(
                refusal(&reply),
                &format!(
                    "the relay refused the recipient `{}`: {}",
                    request.rcpt_to,
                    reply.exact()
                ),
            );
        }
        Said::Lost(exchange) => {
            let reason = format!("the connection broke at RCPT TO: {}", exchange.text);
            probe.exchanges.push(exchange);
            probe.ended(Verdict::RelayUnavailable, &reason);
            return;
        }
    }
    match command(connection, timeout, Rset).await {
        Said::Replied(_, exchange) | Said::Refused(_, exchange) => probe.exchanges.push(exchange),
        // The relay took MAIL and RCPT: how it ends the session does not change the verdict.
        Said::Lost(exchange) => {
            probe.exchanges.push(exchange);
            return;
        }
    }
    quit(probe, connection, timeout).await;
}

async fn quit(probe: &mut Probe, connection: &mut AsyncSmtpConnection, timeout: Duration) {
    match command(connection, timeout, Quit).await {
        Said::Replied(_, exchange) | Said::Refused(_, exchange) | Said::Lost(exchange) => {
            probe.exchanges.push(exchange);
        }
    }
}

/// A refusal of `MAIL` or `RCPT`: for good (5xx), the configuration must change; for now
/// (4xx), a send would wait and try again, as it does while the relay is away.
fn refusal(reply: &Reply) -> Verdict {
    if reply.code >= 500 {
        Verdict::ConfigurationError
    } else {
        Verdict::RelayUnavailable
    }
}

/// What a command got.
enum Said {
    /// A positive reply: its lines, and the exchange.
    Replied(Vec<String>, Exchange),
    /// A negative reply.
    Refused(Reply, Exchange),
    /// No reply: the connection broke or the time ran out.
    Lost(Exchange),
}

async fn command(
    connection: &mut AsyncSmtpConnection,
    timeout: Duration,
    command: impl std::fmt::Display,
) -> Said {
    let line = command.to_string().trim_end().to_owned();
    match tokio::time::timeout(timeout, connection.command(command)).await {
        Ok(answer) => said(line, answer),
        Err(_) => Said::Lost(Exchange {
            command: line,
            code: None,
            enhanced: None,
            text: format!("no reply within {}", humantime::format_duration(timeout)),
        }),
    }
}

/// What the relay answered to `line`.
fn said(
    line: String,
    answer: Result<lettre::transport::smtp::response::Response, lettre::transport::smtp::Error>,
) -> Said {
    match answer {
        Ok(response) => {
            let lines: Vec<String> = response.message().map(str::to_owned).collect();
            let reply = Reply::new(u16::from(response.code()), &lines.join(" "));
            Said::Replied(lines, exchange(line, &reply))
        }
        Err(error) => match reply_of(&error) {
            Some(reply) => {
                let exchange = exchange(line, &reply);
                Said::Refused(reply, exchange)
            }
            None => Said::Lost(Exchange {
                command: line,
                code: None,
                enhanced: None,
                text: capped(&describe(&error), MAX_TEXT),
            }),
        },
    }
}

fn exchange(command: String, reply: &Reply) -> Exchange {
    Exchange {
        command,
        code: Some(reply.code),
        enhanced: reply.enhanced.clone(),
        text: capped(&reply.text, MAX_TEXT),
    }
}

/// What the extensions mean for this campaign's messages.
fn warn_about_extensions(
    probe: &mut Probe,
    connection: &AsyncSmtpConnection,
    protection: Protection,
    request: &Request,
) {
    // lettre's view when our EHLO did not list anything.
    let offers = |keyword: &str, extension: LettreExtension| {
        if probe.capabilities.is_empty() {
            connection.server_info().supports_feature(extension)
        } else {
            probe.capabilities.iter().any(|c| c.keyword == keyword)
        }
    };
    let eight_bit = offers("8BITMIME", LettreExtension::EightBitMime);
    let starttls = offers("STARTTLS", LettreExtension::StartTls);
    let mut warnings = Vec::new();
    if !eight_bit {
        warnings.push(
            "the relay does not offer 8BITMIME: messages with non-ASCII text cannot go through it"
                .to_owned(),
        );
    }
    if protection == Protection::Plain && starttls {
        warnings
            .push("the relay offers STARTTLS, but this session stayed in plain text".to_owned());
    }
    if let Some(limit) = size_limit(&probe.capabilities)
        && limit < request.max_message_size
    {
        warnings.push(format!(
            "the relay takes messages of at most {limit} bytes (SIZE), less than `[safety] max_message_size` ({}): larger messages would be refused",
            request.max_message_size
        ));
    }
    probe.warnings.extend(warnings);
}

/// The certificate of an `smtps://` relay, read with the send's own TLS settings on a
/// connection that says nothing once TLS is up.
async fn implicit_tls_certificate(settings: &Settings) -> Result<Option<Vec<u8>>, String> {
    let connector = settings.tls_first();
    let smtp = settings.smtp();
    let name = rustls::pki_types::ServerName::try_from(smtp.host.clone())
        .map_err(|e| format!("bad TLS name: {e}"))?;
    let tcp = tokio::time::timeout(
        smtp.connect_timeout,
        TcpStream::connect((smtp.host.as_str(), smtp.port)),
    )
    .await
    .map_err(|_| "no connection in time".to_owned())?
    .map_err(|e| e.to_string())?;
    let mut tls = tokio::time::timeout(smtp.connect_timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| "no TLS handshake in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.to_vec());
    let _ = tokio::time::timeout(
        smtp.command_timeout,
        tokio::io::AsyncWriteExt::shutdown(&mut tls),
    )
    .await;
    Ok(der)
}

/// The parts of a DER certificate a person checks, with its time left from `now`.
pub fn certificate(der: &[u8], now: SystemTime) -> Result<Certificate, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not X.509: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(alternative)) = parsed.subject_alternative_name() {
        for name in &alternative.value.general_names {
            let shown = match name {
                GeneralName::DNSName(dns) => (*dns).to_owned(),
                GeneralName::IPAddress(bytes) => match <[u8; 4]>::try_from(*bytes) {
                    Ok(v4) => std::net::IpAddr::from(v4).to_string(),
                    Err(_) => match <[u8; 16]>::try_from(*bytes) {
                        Ok(v6) => std::net::IpAddr::from(v6).to_string(),
                        Err(_) => continue,
                    },
                },
                _ => continue,
            };
            names.push(capped(&shown, MAX_TEXT));
            if names.len() == MAX_NAMES {
                break;
            }
        }
    }
    let not_after = parsed.validity().not_after.timestamp();
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let left = not_after.saturating_sub(now);
    let warning = i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX);
    Ok(Certificate {
        subject: capped(&parsed.subject().to_string(), MAX_TEXT),
        issuer: capped(&parsed.issuer().to_string(), MAX_TEXT),
        names,
        not_after: chrono::DateTime::from_timestamp(not_after, 0).map_or_else(
            || not_after.to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
        days_left: left / 86_400,
        expired: left < 0,
        expires_soon: left < warning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_for_good_is_the_configuration_and_for_now_the_relay() {
        assert_eq!(
            refusal(&Reply::new(550, "5.1.1 no")),
            Verdict::ConfigurationError
        );
        assert_eq!(
            refusal(&Reply::new(554, "5.7.1 relay denied")),
            Verdict::ConfigurationError
        );
        assert_eq!(
            refusal(&Reply::new(451, "4.7.1 later")),
            Verdict::RelayUnavailable
        );
        assert_eq!(
            refusal(&Reply::new(421, "4.3.2 bye")),
            Verdict::RelayUnavailable
        );
        assert_eq!(Verdict::ConfigurationError.exit(), Exit::InvalidInput);
        assert_eq!(Verdict::RelayUnavailable.exit(), Exit::RelayUnavailable);
        assert_eq!(Verdict::Ready.exit(), Exit::Complete);
        assert_eq!(
            Verdict::of(&RelayFailure::config("535 bad password")),
            Verdict::ConfigurationError
        );
        assert_eq!(
            Verdict::of(&RelayFailure::new("connection refused")),
            Verdict::RelayUnavailable
        );
    }

    #[test]
    fn a_certificate_shows_its_names_and_time_left() {
        let mut params = rcgen::CertificateParams::new(vec![
            "relay.example.com".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "relay.example.com");
        params.not_after = rcgen::date_time_ymd(2030, 1, 31);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let at = |t: &str| SystemTime::from(chrono::DateTime::parse_from_rfc3339(t).unwrap());

        let early = certificate(&der, at("2030-01-01T00:00:00Z")).unwrap();
        assert_eq!(early.subject, "CN=relay.example.com");
        assert_eq!(early.issuer, "CN=relay.example.com");
        assert_eq!(early.names, ["relay.example.com", "127.0.0.1"]);
        assert_eq!(early.not_after, "2030-01-31T00:00:00Z");
        assert_eq!(early.days_left, 30);
        assert!(!early.expires_soon);

        let late = certificate(&der, at("2030-01-20T12:00:00Z")).unwrap();
        assert_eq!(late.days_left, 10);
        assert!(late.expires_soon);

        let last = certificate(&der, at("2030-01-30T23:59:59Z")).unwrap();
        assert_eq!(last.days_left, 0);
        assert!(!last.expired);

        let gone = certificate(&der, at("2030-02-01T00:00:01Z")).unwrap();
        assert_eq!(gone.days_left, -1);
        assert!(gone.expired && gone.expires_soon);

        assert!(certificate(b"not a certificate", at("2030-01-01T00:00:00Z")).is_err());
    }
}
