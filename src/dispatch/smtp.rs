//! The SMTP transport: one lettre connection per worker, reused for many messages.
//!
//! Each connection runs over a `TcpStream` with `TCP_NODELAY` set: lettre 0.11.23 never sets it
//! and writes the final dot separately, so without it every message waits for the peer's
//! delayed ACK (about 22 messages/s). The transaction is driven command by command so that
//! there is exactly one `RCPT TO`, each phase has its own timeout, and a refusal is followed
//! by `RSET` instead of a new connection.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{Gate, Refusal, RelayFailure};
use crate::config::{Security, Smtp};
use crate::outcome::{Attempt, Reply, State};
use crate::render::OutgoingMessage;

/// Everything a worker needs to open a connection, prepared once per run.
pub struct Settings {
    smtp: Smtp,
    hello: ClientId,
    credentials: Option<Credentials>,
    starttls: Option<TlsParameters>,
    implicit_tls: Option<tokio_rustls::TlsConnector>,
}

// Written by hand: `Credentials` would print the password.
impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("host", &self.smtp.host)
            .field("port", &self.smtp.port)
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub fn new(smtp: &Smtp) -> anyhow::Result<Settings> {
        let credentials = match &smtp.auth {
            Some(auth) => Some(Credentials::new(
                auth.username.clone(),
                auth.password.read()?.expose().to_owned(),
            )),
            None => None,
        };
        let ca = match &smtp.ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("cannot read ca_file `{}`", path.display()))?,
            ),
            None => None,
        };
        let starttls = if smtp.security == Security::StartTls {
            let mut builder = TlsParameters::builder(smtp.host.clone())
                .dangerous_accept_invalid_certs(smtp.accept_invalid_certs);
            if let Some(pem) = &ca {
                builder = builder.add_root_certificate(
                    Certificate::from_pem(pem).context("ca_file holds no PEM certificate")?,
                );
            }
            Some(builder.build_rustls().context("cannot set up TLS")?)
        } else {
            None
        };
        let implicit_tls = if smtp.security == Security::ImplicitTls {
            anyhow::ensure!(
                !smtp.accept_invalid_certs,
                "`dangerous_accept_invalid_certs` is not supported with `smtps://`; give the relay's CA in `ca_file`"
            );
            Some(implicit_tls_connector(ca.as_deref())?)
        } else {
            None
        };
        Ok(Settings {
            hello: ClientId::Domain(smtp.hello_name.clone()),
            smtp: smtp.clone(),
            credentials,
            starttls,
            implicit_tls,
        })
    }

    #[must_use]
    pub fn connections(&self) -> usize {
        self.smtp.connections.get()
    }
}

fn implicit_tls_connector(ca_pem: Option<&[u8]>) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(pem) = ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(cert.context("ca_file is not valid PEM")?)
                .context("ca_file holds an unusable certificate")?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("cannot set up TLS")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A TLS stream from the first byte (`smtps://`), in the shape lettre takes.
#[derive(Debug)]
struct ImplicitTls(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncRead for ImplicitTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

/// One worker's connection, opened on first use and renewed as needed.
pub struct Connection {
    settings: Arc<Settings>,
    open: Option<AsyncSmtpConnection>,
    messages_sent: usize,
}

/// How a transaction ended.
enum Step {
    Done(Attempt),
    /// Done, but the connection is in an unknown state and must not be reused.
    DoneAndBroken(Attempt),
    /// The connection broke before the body was sent: the server accepted nothing, so the
    /// message may go again on a new connection.
    Lost(String),
    /// The relay refused the sender itself: a relay-wide problem.
    Relay(String),
    /// The journal did not record the message as in flight: the body was not sent.
    Unrecorded(Refusal),
}

impl Connection {
    pub fn new(settings: Arc<Settings>) -> Connection {
        Connection {
            settings,
            open: None,
            messages_sent: 0,
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, RelayFailure> {
        let s = &self.settings;
        let smtp = &s.smtp;
        let place = format!("{}:{}", smtp.host, smtp.port);
        let fail = |what: &str, error: &dyn fmt::Display| {
            RelayFailure::new(format!("{what} `{place}`: {error}"))
        };
        let refused = |what: &str, error: &dyn fmt::Display| {
            RelayFailure::rejected(format!("{what} `{place}`: {error}"))
        };
        let tcp = tokio::time::timeout(
            smtp.connect_timeout,
            TcpStream::connect((smtp.host.as_str(), smtp.port)),
        )
        .await
        .map_err(|_| {
            fail(
                "timed out connecting to",
                &humantime::format_duration(smtp.connect_timeout),
            )
        })?
        .map_err(|e| fail("cannot connect to", &e))?;
        tcp.set_nodelay(true)
            .map_err(|e| fail("cannot set TCP_NODELAY on", &e))?;
        let stream: Box<dyn AsyncTokioStream> = match &s.implicit_tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(smtp.host.clone())
                    .map_err(|e| fail("bad TLS name for", &e))?;
                let tls = tokio::time::timeout(smtp.connect_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| fail("timed out in the TLS handshake with", &"no answer"))?
                    .map_err(|e| {
                        // rustls reports a refused certificate or a TLS alert as invalid data;
                        // anything else (a reset, say) is the network, not a rejection.
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            refused("TLS handshake failed with", &e)
                        } else {
                            fail("TLS handshake failed with", &e)
                        }
                    })?;
                Box::new(ImplicitTls(tls))
            }
            None => Box::new(tcp),
        };
        let mut connection = timed(
            smtp.command_timeout,
            AsyncSmtpConnection::connect_with_transport(stream, &s.hello),
        )
        .await
        .map_err(|e| fail("no usable greeting from", &e))?;
        if let Some(tls) = &s.starttls {
            if !connection.can_starttls() {
                let _ = tokio::time::timeout(smtp.command_timeout, connection.quit()).await;
                return Err(refused(
                    "STARTTLS is required but not offered by",
                    &"remove the risk: fix the relay, or use smtps://",
                ));
            }
            match tokio::time::timeout(
                smtp.command_timeout,
                connection.starttls(tls.clone(), &s.hello),
            )
            .await
            {
                Ok(Ok(())) => {}
                // A certificate or TLS failure: waiting will not fix it.
                Ok(Err(e)) if rejected_tls(&e) => {
                    return Err(refused("STARTTLS failed with", &describe(&e)));
                }
                Ok(Err(e)) => return Err(fail("STARTTLS failed with", &describe(&e))),
                Err(_) => {
                    return Err(fail(
                        "no reply to STARTTLS within",
                        &humantime::format_duration(smtp.command_timeout),
                    ));
                }
            }
        }
        if let Some(credentials) = &s.credentials {
            let auth = tokio::time::timeout(
                smtp.command_timeout,
                connection.auth(&[Mechanism::Plain, Mechanism::Login], credentials),
            )
            .await;
            match auth {
                Ok(Ok(_)) => {}
                // A permanent refusal (535): the credentials are wrong, waiting will not help.
                Ok(Err(e)) if e.is_permanent() => {
                    return Err(refused("authentication was refused by", &describe(&e)));
                }
                Ok(Err(e)) => return Err(fail("authentication failed with", &describe(&e))),
                Err(_) => {
                    return Err(fail(
                        "no reply to AUTH within",
                        &humantime::format_duration(smtp.command_timeout),
                    ));
                }
            }
        }
        Ok(connection)
    }

    /// Delivers one message, reconnecting once if the connection turns out to be dead.
    pub async fn deliver(
        &mut self,
        message: &OutgoingMessage,
        gate: &mut Gate,
    ) -> Result<Attempt, Refusal> {
        let mut lost_before = None;
        loop {
            let mut connection = match self.open.take() {
                Some(connection) => connection,
                None => {
                    self.messages_sent = 0;
                    self.connect().await?
                }
            };
            match transaction(&mut connection, message, &self.settings.smtp, gate).await {
                Step::Done(attempt) => {
                    self.messages_sent += 1;
                    let used_up =
                        self.messages_sent >= self.settings.smtp.messages_per_connection.get();
                    if used_up || connection.has_broken() {
                        let _ = tokio::time::timeout(
                            self.settings.smtp.command_timeout,
                            connection.quit(),
                        )
                        .await;
                    } else {
                        self.open = Some(connection);
                    }
                    return Ok(attempt);
                }
                // A connection in an unknown state is dropped, not QUIT: it may never answer.
                Step::DoneAndBroken(attempt) => return Ok(attempt),
                Step::Relay(reason) => {
                    let _ =
                        tokio::time::timeout(self.settings.smtp.command_timeout, connection.quit())
                            .await;
                    return Err(RelayFailure::new(reason).into());
                }
                // The server waits for a body that will not come: drop the connection.
                Step::Unrecorded(refusal) => return Err(refusal),
                Step::Lost(reason) => {
                    if let Some(earlier) = lost_before {
                        return Err(RelayFailure::new(format!(
                            "the connection broke twice: {earlier}; then {reason}"
                        ))
                        .into());
                    }
                    lost_before = Some(reason);
                }
            }
        }
    }

    pub async fn quit(&mut self) {
        if let Some(mut connection) = self.open.take() {
            let _ =
                tokio::time::timeout(self.settings.smtp.command_timeout, connection.quit()).await;
        }
    }
}

/// Whether a STARTTLS error is the relay's TLS being refused (a certificate we do not trust,
/// a TLS alert) rather than the network: rustls reports those as invalid data, and lettre
/// wraps them as a connection error.
fn rejected_tls(error: &lettre::transport::smtp::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(inner) = cause {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::InvalidData;
        }
        if inner.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        cause = inner.source();
    }
    error.is_tls()
}

/// Runs `future` with a deadline, folding the timeout into lettre's error type's place.
async fn timed<T>(
    limit: Duration,
    future: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(describe(&error)),
        Err(_) => Err(format!(
            "no reply within {}",
            humantime::format_duration(limit)
        )),
    }
}

/// A lettre error as one line: the reply code and text when there was a reply.
fn describe(error: &lettre::transport::smtp::Error) -> String {
    match reply_of(error) {
        Some(reply) => reply.to_string(),
        None => error_text(error),
    }
}

fn error_text(error: &lettre::transport::smtp::Error) -> String {
    std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string)
}

/// The server's negative reply inside a lettre error, when there was one.
fn reply_of(error: &lettre::transport::smtp::Error) -> Option<Reply> {
    error
        .status()
        .map(|code| Reply::new(u16::from(code), &error_text(error)))
}

/// A refusal of one recipient: 4xx defers, 5xx fails.
fn refused(error: &lettre::transport::smtp::Error) -> Option<Attempt> {
    let state = if error.is_transient() {
        State::Deferred
    } else if error.is_permanent() {
        State::Failed
    } else {
        return None;
    };
    let reply = reply_of(error)?;
    Some(Attempt {
        state,
        detail: reply.to_string(),
        reply: Some(reply),
    })
}

/// One SMTP transaction: MAIL FROM, exactly one RCPT TO, DATA, the body.
async fn transaction(
    connection: &mut AsyncSmtpConnection,
    message: &OutgoingMessage,
    smtp: &Smtp,
    gate: &mut Gate,
) -> Step {
    let envelope = &message.envelope;
    let mut parameters = Vec::new();
    let info = connection.server_info();
    if !message.bytes.is_ascii() {
        // Every message of a campaign with non-ASCII text is 8-bit: a relay without 8BITMIME
        // is a relay-wide problem, not this recipient's.
        if !info.supports_feature(Extension::EightBitMime) {
            return Step::Relay(
                "the relay does not offer 8BITMIME, which messages with non-ASCII text need"
                    .to_owned(),
            );
        }
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    if !envelope.rcpt_to.to_string().is_ascii() || !envelope.mail_from.to_string().is_ascii() {
        if !info.supports_feature(Extension::SmtpUtfEight) {
            return Step::Done(Attempt::without_reply(
                State::Failed,
                "the address has non-ASCII characters and the server lacks SMTPUTF8",
            ));
        }
        parameters.push(MailParameter::SmtpUtfEight);
    }

    // From MAIL FROM on, this message is in flight: the record goes to the journal now, and
    // its commit overlaps MAIL, RCPT and DATA.
    gate.start(message);
    match tokio::time::timeout(
        smtp.command_timeout,
        connection.command(Mail::new(Some(envelope.mail_from.clone()), parameters)),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(error)) if error.status().is_some() => {
            return Step::Relay(format!(
                "the relay refused the sender `{}`: {}",
                envelope.mail_from,
                describe(&error)
            ));
        }
        Ok(Err(error)) => return Step::Lost(format!("MAIL FROM: {}", describe(&error))),
        Err(_) => return Step::Lost("MAIL FROM: no reply in time".to_owned()),
    }
    // Exactly one recipient per transaction, by construction: the envelope has one address.
    for command in [Phase::Rcpt, Phase::Data] {
        let reply = match command {
            Phase::Rcpt => {
                tokio::time::timeout(
                    smtp.command_timeout,
                    connection.command(Rcpt::new(envelope.rcpt_to.clone(), vec![])),
                )
                .await
            }
            Phase::Data => {
                tokio::time::timeout(smtp.command_timeout, connection.command(Data)).await
            }
        };
        match reply {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                let Some(attempt) = refused(&error) else {
                    return Step::Lost(format!("{}: {}", command.name(), describe(&error)));
                };
                return if reset(connection, smtp).await {
                    Step::Done(attempt)
                } else {
                    Step::DoneAndBroken(attempt)
                };
            }
            Err(_) => return Step::Lost(format!("{}: no reply in time", command.name())),
        }
    }
    // The body is the first thing the server could accept: it waits until the journal says
    // this recipient is durably in flight (the commit ran while MAIL, RCPT and DATA went back
    // and forth). A crash before this point leaves the row `pending` or `in_flight` with
    // nothing delivered; either way nothing is sent twice.
    if let Err(refusal) = gate.pass(message).await {
        return Step::Unrecorded(refusal);
    }
    // From here on the server may have the whole message: a broken connection or a missing
    // reply leaves the outcome unknown, and the message must not be sent again blindly.
    match tokio::time::timeout(smtp.data_timeout, connection.message(&message.bytes)).await {
        Ok(Ok(response)) => {
            let reply = Reply::new(
                u16::from(response.code()),
                &response.message().collect::<Vec<_>>().join(" "),
            );
            Step::Done(Attempt {
                state: State::Sent,
                detail: reply.to_string(),
                reply: Some(reply),
            })
        }
        Ok(Err(error)) => match refused(&error) {
            // lettre has read the whole reply; the connection is still in step.
            Some(attempt) => Step::Done(attempt),
            None => Step::DoneAndBroken(Attempt::without_reply(
                State::Ambiguous,
                format!("no reply after the message body: {}", describe(&error)),
            )),
        },
        Err(_) => Step::DoneAndBroken(Attempt::without_reply(
            State::Ambiguous,
            format!(
                "no reply after the message body within {}",
                humantime::format_duration(smtp.data_timeout)
            ),
        )),
    }
}

#[derive(Clone, Copy)]
enum Phase {
    Rcpt,
    Data,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Rcpt => "RCPT TO",
            Phase::Data => "DATA",
        }
    }
}

/// After a refusal, RSET keeps the connection usable; false when it did not work (a 421 closes
/// the connection, for one).
async fn reset(connection: &mut AsyncSmtpConnection, smtp: &Smtp) -> bool {
    matches!(
        tokio::time::timeout(smtp.command_timeout, connection.command(Rset)).await,
        Ok(Ok(_))
    )
}
