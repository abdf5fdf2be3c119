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
                crate::files::read(path, crate::files::SECRET_CAP)
                    .map_err(|error| anyhow::anyhow!("ca_file {error}"))?,
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

    /// Opens a connection, TLS and AUTH included; `mailer probe` opens its own this way too.
    pub(super) async fn connect(&self) -> Result<AsyncSmtpConnection, RelayFailure> {
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

/// What `mailer probe` (`probe.rs`) reads of the settings, to talk to the relay as a send does.
impl Settings {
    pub(super) fn smtp(&self) -> &Smtp {
        &self.smtp
    }

    pub(super) fn hello(&self) -> &ClientId {
        &self.hello
    }

    /// The TLS of `smtps://`, whose stream lettre cannot look into.
    pub(super) fn implicit_tls(&self) -> Option<&tokio_rustls::TlsConnector> {
        self.implicit_tls.as_ref()
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
pub(super) fn describe(error: &lettre::transport::smtp::Error) -> String {
    match reply_of(error) {
        Some(reply) => reply.exact(),
        None => error_text(error),
    }
}

fn error_text(error: &lettre::transport::smtp::Error) -> String {
    std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string)
}

/// The server's negative reply inside a lettre error, when there was one.
pub(super) fn reply_of(error: &lettre::transport::smtp::Error) -> Option<Reply> {
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
        detail: reply.exact(),
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
                detail: reply.exact(),
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

#[cfg(test)]
mod tests {
    //! The transaction against a scripted server on loopback: it writes exactly the replies
    //! given, split where the script says, and keeps every byte it hears, per connection.

    use std::num::NonZeroUsize;
    use std::sync::Mutex;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::super::tests::{Durable, Event, Journal, message};
    use super::super::{Gate, Recorder};
    use super::*;

    /// One step of the scripted server on one connection.
    #[derive(Debug, Clone, Copy)]
    enum Turn {
        /// Writes these bytes: a reply, or a piece of one.
        Say(&'static str),
        /// Waits a little, so that what follows goes out in a write of its own.
        Pause,
        /// Reads one command line.
        Hear,
        /// Reads a message body, up to and including the line with the lone dot.
        HearBody,
        /// Hangs up.
        HangUp,
    }

    use Turn::{HangUp, Hear, HearBody, Pause, Say};

    const GREETING: Turn = Say("220 sink.test ESMTP\r\n");
    const EHLO: Turn =
        Say("250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n");
    const OK: Turn = Say("250 2.0.0 ok\r\n");
    const GO_AHEAD: Turn = Say("354 go ahead\r\n");
    const QUEUED: Turn = Say("250 2.0.0 queued as 1A2B\r\n");
    const BYE: Turn = Say("221 2.0.0 bye\r\n");

    /// Greeting and EHLO.
    fn hello() -> Vec<Turn> {
        vec![GREETING, Hear, EHLO]
    }

    /// A transaction the server accepts.
    fn accepted() -> Vec<Turn> {
        vec![Hear, OK, Hear, OK, Hear, GO_AHEAD, HearBody, QUEUED]
    }

    fn quit() -> Vec<Turn> {
        vec![Hear, BYE]
    }

    /// A server on 127.0.0.1 that takes one connection per script, then no more.
    struct Server {
        port: u16,
        heard: Arc<Mutex<Vec<Vec<u8>>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start(scripts: Vec<Vec<Turn>>) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let heard = Arc::new(Mutex::new(Vec::new()));
            let all = Arc::clone(&heard);
            let task = tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                for script in scripts {
                    let (stream, _) = listener.accept().await.unwrap();
                    let index = {
                        let mut all = all.lock().unwrap();
                        all.push(Vec::new());
                        all.len() - 1
                    };
                    connections.spawn(converse(stream, script, Arc::clone(&all), index));
                }
                // One connection more than scripted is refused.
                drop(listener);
                while let Some(done) = connections.join_next().await {
                    done.expect("the scripted server's connection");
                }
            });
            Server { port, heard, task }
        }

        /// What connection `n` has heard so far.
        fn heard(&self, n: usize) -> String {
            self.heard
                .lock()
                .unwrap()
                .get(n)
                .map(|bytes| String::from_utf8(bytes.clone()).unwrap())
                .unwrap_or_default()
        }

        /// Waits for every scripted connection to end (the client must have let go of them),
        /// and gives what each heard.
        async fn finish(self) -> Vec<String> {
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the client lets go of its connections")
                .expect("the scripted server");
            let heard = self.heard.lock().unwrap().clone();
            heard
                .into_iter()
                .map(|bytes| String::from_utf8(bytes).unwrap())
                .collect()
        }
    }

    async fn converse(
        stream: TcpStream,
        script: Vec<Turn>,
        heard: Arc<Mutex<Vec<Vec<u8>>>>,
        index: usize,
    ) {
        stream.set_nodelay(true).unwrap();
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let record = |bytes: &[u8]| heard.lock().unwrap()[index].extend_from_slice(bytes);
        for step in script {
            match step {
                Say(text) => {
                    write.write_all(text.as_bytes()).await.unwrap();
                    write.flush().await.unwrap();
                }
                Pause => tokio::time::sleep(Duration::from_millis(5)).await,
                Hear => {
                    let mut line = Vec::new();
                    read.read_until(b'\n', &mut line).await.unwrap();
                    record(&line);
                    assert!(!line.is_empty(), "the client hung up; script: {step:?}");
                }
                HearBody => loop {
                    let mut line = Vec::new();
                    read.read_until(b'\n', &mut line).await.unwrap();
                    record(&line);
                    assert!(!line.is_empty(), "the client hung up in the body");
                    if line == b".\r\n" {
                        break;
                    }
                },
                HangUp => return,
            }
        }
        // Whatever else the client says, until it lets go.
        let mut rest = Vec::new();
        let _ = read.read_to_end(&mut rest).await;
        record(&rest);
    }

    fn settings(port: u16, per_connection: usize) -> Arc<Settings> {
        let smtp = Smtp {
            host: "127.0.0.1".to_owned(),
            port,
            security: Security::Plain,
            connections: NonZeroUsize::MIN,
            messages_per_connection: NonZeroUsize::new(per_connection).unwrap(),
            hello_name: "mailer.test".to_owned(),
            auth: None,
            ca_file: None,
            accept_invalid_certs: false,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            data_timeout: Duration::from_secs(5),
        };
        Arc::new(Settings::new(&smtp).unwrap())
    }

    /// A message for `to` on journal row `line` with these exact bytes.
    fn with_bytes(line: u64, to: &str, bytes: &str) -> OutgoingMessage {
        let mut message = message(line, to);
        message.bytes = bytes.as_bytes().to_vec();
        message
    }

    /// Delivers `message` on `connection`, recording it in `journal` as row `message.line`.
    async fn deliver(
        connection: &mut Connection,
        journal: &Arc<Journal>,
        message: &OutgoingMessage,
    ) -> Result<Attempt, Refusal> {
        let row = i64::try_from(message.line).unwrap();
        let mut gate = Gate::journal(Arc::clone(journal) as Recorder, row);
        connection.deliver(message, &mut gate).await
    }

    fn attempt(state: State, code: u16, text: &str) -> Attempt {
        let reply = Reply::new(code, text);
        Attempt {
            state,
            detail: reply.exact(),
            reply: Some(reply),
        }
    }

    fn relay_failure(result: Result<Attempt, Refusal>) -> RelayFailure {
        match result {
            Err(Refusal::Relay(failure)) => failure,
            other => panic!("not a relay failure: {other:?}"),
        }
    }

    /// What mailer says for one transaction, up to the reply to the final dot.
    fn said(to: &str, wire_body: &str) -> String {
        format!("MAIL FROM:<news@sender.example>\r\nRCPT TO:<{to}>\r\nDATA\r\n{wire_body}\r\n.\r\n")
    }

    const BODY: &str =
        "From: news@sender.example\r\nTo: a@x.example\r\nSubject: Hi\r\n\r\nHello.\r\n";

    #[tokio::test]
    async fn one_transaction_is_exactly_these_bytes_with_the_body_dot_stuffed() {
        let server = Server::start(vec![[hello(), accepted(), quit()].concat()]).await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        // Lines that start with a dot, one that is a lone dot, and dots elsewhere.
        let message = with_bytes(
            1,
            "a@x.example",
            "From: news@sender.example\r\nTo: a@x.example\r\nSubject: Dots\r\n\r\n\
             .hidden\r\n..two\r\n.\r\nnot . at the start.\r\n.\r\nend\r\n",
        );
        let result = deliver(&mut connection, &journal, &message).await;
        assert_eq!(
            result.unwrap(),
            attempt(State::Sent, 250, "2.0.0 queued as 1A2B")
        );
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [format!(
                "EHLO mailer.test\r\n{}QUIT\r\n",
                said(
                    "a@x.example",
                    "From: news@sender.example\r\nTo: a@x.example\r\nSubject: Dots\r\n\r\n\
                     ..hidden\r\n...two\r\n..\r\nnot . at the start.\r\n..\r\nend\r\n"
                )
            )]
        );
        assert_eq!(journal.events(), [Event::InFlight(1)]);
    }

    #[tokio::test]
    async fn the_body_waits_until_the_in_flight_record_is_durable() {
        let server = Server::start(vec![[hello(), accepted(), quit()].concat()]).await;
        let journal = Journal::new(Durable::Held);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        let envelope = "EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<a@x.example>\r\nDATA\r\n";
        let (result, ()) = tokio::join!(deliver(&mut connection, &journal, &message), async {
            // MAIL, RCPT and DATA overlap the record's commit...
            while !server.heard(0).contains("DATA\r\n") {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(journal.events(), [Event::InFlight(1)]);
            // ...and nothing more goes until it is durable.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(server.heard(0), envelope);
            journal.release(&Ok(()));
        });
        assert_eq!(result.unwrap().state, State::Sent);
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [format!(
                "EHLO mailer.test\r\n{}QUIT\r\n",
                said("a@x.example", BODY)
            )]
        );
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_made_durable_sends_no_body_and_drops_the_connection() {
        let server = Server::start(vec![
            [hello(), vec![Hear, OK, Hear, OK, Hear, GO_AHEAD]].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Never);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        let result = deliver(&mut connection, &journal, &message).await;
        assert!(
            matches!(&result, Err(Refusal::Unrecorded(e)) if e == "disk I/O error"),
            "{result:?}"
        );
        drop(connection);
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [
                "EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<a@x.example>\r\nDATA\r\n"
            ]
        );
    }

    #[tokio::test]
    async fn a_5xx_at_rcpt_fails_the_recipient_and_rset_keeps_the_connection() {
        let server = Server::start(vec![
            [
                hello(),
                vec![
                    Hear,
                    OK,
                    Hear,
                    Say("550 5.1.1 <gone@x.example>: no such user\r\n"),
                    Hear,
                    Say("250 2.0.0 reset\r\n"),
                ],
                accepted(),
                quit(),
            ]
            .concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let gone = with_bytes(1, "gone@x.example", BODY);
        let next = with_bytes(2, "a@x.example", BODY);
        assert_eq!(
            deliver(&mut connection, &journal, &gone).await.unwrap(),
            attempt(State::Failed, 550, "5.1.1 <gone@x.example>: no such user")
        );
        assert_eq!(
            deliver(&mut connection, &journal, &next)
                .await
                .unwrap()
                .state,
            State::Sent
        );
        connection.quit().await;
        let heard = server.finish().await;
        // RSET, not DATA; then the next transaction on the same connection (no new EHLO).
        assert_eq!(
            heard,
            [format!(
                "EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<gone@x.example>\r\nRSET\r\n{}QUIT\r\n",
                said("a@x.example", BODY)
            )]
        );
        assert_eq!(journal.events(), [Event::InFlight(1), Event::InFlight(2)]);
    }

    #[tokio::test]
    async fn a_4xx_defers_and_a_refusal_after_the_body_is_final_without_rset() {
        let server = Server::start(vec![
            [
                hello(),
                // A 4xx at RCPT; then a 4xx and a 5xx to the final dot.
                vec![
                    Hear,
                    OK,
                    Hear,
                    Say("451 4.7.1 greylisted, try again later\r\n"),
                ],
                vec![Hear, Say("250 2.0.0 reset\r\n")],
                vec![Hear, OK, Hear, OK, Hear, GO_AHEAD, HearBody],
                vec![Say("452 4.3.1 insufficient system storage\r\n")],
                vec![Hear, OK, Hear, OK, Hear, GO_AHEAD, HearBody],
                vec![Say("554 5.6.0 message refused\r\n")],
                quit(),
            ]
            .concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let grey = with_bytes(1, "grey@x.example", BODY);
        let full = with_bytes(2, "full@x.example", BODY);
        let refused = with_bytes(3, "no@x.example", BODY);
        assert_eq!(
            deliver(&mut connection, &journal, &grey).await.unwrap(),
            attempt(State::Deferred, 451, "4.7.1 greylisted, try again later")
        );
        assert_eq!(
            deliver(&mut connection, &journal, &full).await.unwrap(),
            attempt(State::Deferred, 452, "4.3.1 insufficient system storage")
        );
        assert_eq!(
            deliver(&mut connection, &journal, &refused).await.unwrap(),
            attempt(State::Failed, 554, "5.6.0 message refused")
        );
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [format!(
                "EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<grey@x.example>\r\nRSET\r\n{}{}QUIT\r\n",
                said("full@x.example", BODY),
                said("no@x.example", BODY)
            )]
        );
    }

    #[tokio::test]
    async fn a_hang_up_after_the_body_is_ambiguous_and_the_connection_is_not_reused() {
        let server = Server::start(vec![
            [
                hello(),
                vec![Hear, OK, Hear, OK, Hear, GO_AHEAD, HearBody, HangUp],
            ]
            .concat(),
            [hello(), accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let lost = with_bytes(1, "a@x.example", BODY);
        let next = with_bytes(2, "b@x.example", BODY);
        let result = deliver(&mut connection, &journal, &lost).await.unwrap();
        assert_eq!(result.state, State::Ambiguous);
        assert!(result.reply.is_none());
        assert_eq!(
            result.detail,
            "no reply after the message body: incomplete response"
        );
        // The next message goes on a new connection.
        assert_eq!(
            deliver(&mut connection, &journal, &next)
                .await
                .unwrap()
                .state,
            State::Sent
        );
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [
                format!("EHLO mailer.test\r\n{}", said("a@x.example", BODY)),
                format!("EHLO mailer.test\r\n{}QUIT\r\n", said("b@x.example", BODY)),
            ]
        );
    }

    #[tokio::test]
    async fn a_hang_up_before_data_is_a_relay_failure_and_no_body_goes() {
        // The connection breaks at RCPT; the one opened again breaks at MAIL.
        let server = Server::start(vec![
            [hello(), vec![Hear, OK, Hear, HangUp]].concat(),
            [hello(), vec![Hear, HangUp]].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        let failure = relay_failure(deliver(&mut connection, &journal, &message).await);
        assert!(!failure.rejected);
        assert_eq!(
            failure.reason,
            "the connection broke twice: RCPT TO: incomplete response; \
             then MAIL FROM: incomplete response"
        );
        drop(connection);
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [
                "EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<a@x.example>\r\n",
                "EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\n",
            ]
        );
        // Recorded in flight once (before MAIL FROM), and nothing else: the scheduler puts
        // the row back to pending.
        assert_eq!(journal.events(), [Event::InFlight(1)]);
    }

    #[tokio::test]
    async fn a_hang_up_before_data_is_retried_once_on_a_new_connection() {
        let server = Server::start(vec![
            [hello(), vec![Hear, HangUp]].concat(),
            [hello(), accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        let result = deliver(&mut connection, &journal, &message).await;
        assert_eq!(
            result.unwrap(),
            attempt(State::Sent, 250, "2.0.0 queued as 1A2B")
        );
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [
                "EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\n".to_owned(),
                format!("EHLO mailer.test\r\n{}QUIT\r\n", said("a@x.example", BODY)),
            ]
        );
        assert_eq!(journal.events(), [Event::InFlight(1)]);
    }

    #[tokio::test]
    async fn a_relay_that_is_not_there_is_a_relay_failure_before_anything_is_recorded() {
        // A hang-up at once; a 421 greeting.
        let server = Server::start(vec![
            vec![HangUp],
            vec![Say("421 4.3.2 service not available\r\n"), HangUp],
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let message = with_bytes(1, "a@x.example", BODY);
        let place = format!("`127.0.0.1:{}`", server.port);
        for reason in ["incomplete response", "421 4.3.2 service not available"] {
            let mut connection = Connection::new(settings(server.port, 100));
            let failure = relay_failure(deliver(&mut connection, &journal, &message).await);
            assert!(!failure.rejected);
            assert_eq!(
                failure.reason,
                format!("no usable greeting from {place}: {reason}")
            );
        }
        let heard = server.finish().await;
        assert_eq!(heard, ["", ""]);
        assert!(journal.events().is_empty(), "{:?}", journal.events());
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_relay_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        let failure = relay_failure(deliver(&mut connection, &journal, &message).await);
        assert!(!failure.rejected);
        assert!(
            failure
                .reason
                .starts_with(&format!("cannot connect to `127.0.0.1:{port}`: ")),
            "{}",
            failure.reason
        );
        assert!(journal.events().is_empty());
    }

    #[tokio::test]
    async fn the_sender_refused_is_a_relay_failure() {
        let server = Server::start(vec![
            [
                hello(),
                vec![Hear, Say("553 5.7.1 sender not allowed\r\n")],
                quit(),
            ]
            .concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        let failure = relay_failure(deliver(&mut connection, &journal, &message).await);
        assert_eq!(
            failure.reason,
            "the relay refused the sender `news@sender.example`: 553 5.7.1 sender not allowed"
        );
        assert!(!failure.rejected);
        drop(connection);
        let heard = server.finish().await;
        assert_eq!(
            heard,
            ["EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nQUIT\r\n"]
        );
    }

    #[tokio::test]
    async fn multi_line_replies_and_replies_split_across_writes_are_read_whole() {
        let server = Server::start(vec![vec![
            Say("220-sink.test ESMTP\r\n220 "),
            Pause,
            Say("welcome\r\n"),
            Hear,
            // 8BITMIME is offered in the middle of a reply cut in three.
            Say("250-sink.te"),
            Pause,
            Say("st\r\n250-PIPELINING\r\n250-8BIT"),
            Pause,
            Say("MIME\r\n250 SIZE 1000000\r\n"),
            Hear,
            Say("2"),
            Pause,
            Say("50 2.1.0 ok\r\n"),
            Hear,
            Say("550-5.1.1 the mailbox\r\n"),
            Pause,
            Say("550 5.1.1 does not exist\r\n"),
            Hear,
            Say("250 2.0.0 reset\r\n"),
            Hear,
            OK,
            Hear,
            Say("250-2.1.5 first\r\n"),
            Pause,
            Say("250 2.1.5 ok\r\n"),
            Hear,
            Say("354 "),
            Pause,
            Say("go ahead\r\n"),
            HearBody,
            Say("250-2.0.0 ok\r\n250 2.0.0 queued "),
            Pause,
            Say("as 3C4D\r\n"),
            Hear,
            BYE,
        ]])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let body = "From: news@sender.example\r\nTo: b@x.example\r\nSubject: Caf\u{e9}\r\n\r\nD\u{e9}j\u{e0} vu.\r\n";
        let gone = with_bytes(1, "gone@x.example", body);
        let next = with_bytes(2, "b@x.example", body);
        assert_eq!(
            deliver(&mut connection, &journal, &gone).await.unwrap(),
            attempt(State::Failed, 550, "5.1.1 the mailbox does not exist")
        );
        assert_eq!(
            deliver(&mut connection, &journal, &next).await.unwrap(),
            attempt(State::Sent, 250, "2.0.0 ok 2.0.0 queued as 3C4D")
        );
        connection.quit().await;
        let heard = server.finish().await;
        // BODY=8BITMIME: the split EHLO reply was read whole.
        assert_eq!(
            heard,
            [format!(
                "EHLO mailer.test\r\n\
                 MAIL FROM:<news@sender.example> BODY=8BITMIME\r\nRCPT TO:<gone@x.example>\r\nRSET\r\n\
                 MAIL FROM:<news@sender.example> BODY=8BITMIME\r\nRCPT TO:<b@x.example>\r\nDATA\r\n\
                 {body}\r\n.\r\nQUIT\r\n"
            )]
        );
    }

    #[tokio::test]
    async fn a_non_ascii_message_needs_8bitmime_and_goes_nowhere_without_it() {
        let server = Server::start(vec![
            [vec![GREETING, Hear, Say("250 sink.test\r\n")], quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", "Subject: Caf\u{e9}\r\n\r\nCaf\u{e9}\r\n");
        let failure = relay_failure(deliver(&mut connection, &journal, &message).await);
        assert_eq!(
            failure.reason,
            "the relay does not offer 8BITMIME, which messages with non-ASCII text need"
        );
        drop(connection);
        assert_eq!(server.finish().await, ["EHLO mailer.test\r\nQUIT\r\n"]);
        assert!(journal.events().is_empty());
    }

    #[tokio::test]
    async fn a_connection_is_renewed_after_messages_per_connection() {
        let server = Server::start(vec![
            [hello(), accepted(), accepted(), quit()].concat(),
            [hello(), accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 2));
        for (line, to) in [(1, "a@x.example"), (2, "b@x.example"), (3, "c@x.example")] {
            let message = with_bytes(line, to, BODY);
            let result = deliver(&mut connection, &journal, &message).await;
            assert_eq!(result.unwrap().state, State::Sent);
        }
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [
                format!(
                    "EHLO mailer.test\r\n{}{}QUIT\r\n",
                    said("a@x.example", BODY),
                    said("b@x.example", BODY)
                ),
                format!("EHLO mailer.test\r\n{}QUIT\r\n", said("c@x.example", BODY)),
            ]
        );
    }

    #[tokio::test]
    async fn a_421_at_rcpt_defers_and_the_closed_connection_is_not_reused() {
        let server = Server::start(vec![
            [
                hello(),
                vec![
                    Hear,
                    OK,
                    Hear,
                    Say("421 4.7.0 too many messages, closing connection\r\n"),
                    HangUp,
                ],
            ]
            .concat(),
            [hello(), accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let first = with_bytes(1, "a@x.example", BODY);
        let next = with_bytes(2, "b@x.example", BODY);
        let deferred = deliver(&mut connection, &journal, &first).await.unwrap();
        assert_eq!(
            deferred,
            attempt(
                State::Deferred,
                421,
                "4.7.0 too many messages, closing connection"
            )
        );
        assert!(deferred.reply.unwrap().is_throttling());
        assert_eq!(
            deliver(&mut connection, &journal, &next)
                .await
                .unwrap()
                .state,
            State::Sent
        );
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [
                "EHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<a@x.example>\r\n"
                    .to_owned(),
                format!("EHLO mailer.test\r\n{}QUIT\r\n", said("b@x.example", BODY)),
            ]
        );
    }
}
