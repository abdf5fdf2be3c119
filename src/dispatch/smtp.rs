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
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::ehlo::{Offers, Wire, capabilities};
use super::{Gate, Refusal, RelayFailure};
use crate::config::{Security, Smtp};
use crate::outcome::{Attempt, Reply, State};
use crate::render::OutgoingMessage;

/// How long a connection that has not started with TLS waits for the relay's greeting before
/// asking, on a second connection, whether the port speaks TLS from the first byte (see
/// [`Connection::speaks_tls_first`]). A relay greets at once; one that waits for a TLS
/// hello (`ClientHello`) never does.
const GREETING_PATIENCE: Duration = Duration::from_secs(3);
/// The longest that question may take: a TCP connection and a TLS handshake.
const TLS_QUESTION_LIMIT: Duration = Duration::from_secs(10);
/// The AUTH mechanisms mailer speaks, in order of preference.
const MECHANISMS: [Mechanism; 2] = [Mechanism::Plain, Mechanism::Login];

/// Everything a worker needs to open a connection, prepared once per run.
pub struct Settings {
    smtp: Smtp,
    hello: ClientId,
    credentials: Option<Credentials>,
    /// For STARTTLS, required or taken when offered (`None` with `dangerous_plaintext`).
    starttls: Option<TlsParameters>,
    /// TLS from the first byte: every connection's with `smtps://`; with `smtp://`, only the
    /// question whether a port that sends no greeting speaks TLS.
    tls_first: tokio_rustls::TlsConnector,
    /// Whether the log has said that a loopback relay offers no STARTTLS (said once a run).
    plain_text_noted: AtomicBool,
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
        let starttls = if matches!(
            smtp.security,
            Security::StartTls | Security::StartTlsIfOffered
        ) {
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
        if smtp.security == Security::ImplicitTls {
            anyhow::ensure!(
                !smtp.accept_invalid_certs,
                "`dangerous_accept_invalid_certs` is not supported with `smtps://`; give the relay's CA in `ca_file`"
            );
        }
        Ok(Settings {
            hello: ClientId::Domain(smtp.hello_name.clone()),
            smtp: smtp.clone(),
            credentials,
            starttls,
            tls_first: implicit_tls_connector(ca.as_deref())?,
            plain_text_noted: AtomicBool::new(false),
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
struct ImplicitTls(tokio_rustls::client::TlsStream<Guarded>);

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
        self.0.get_ref().0.tcp.peer_addr()
    }
}

/// The reply to mailer's own EHLO, or the relay's refusal of it.
pub(crate) type Ehlo = Result<Response, lettre::transport::smtp::Error>;

/// One worker's connection, opened on first use and renewed as needed.
pub struct Connection {
    settings: Arc<Settings>,
    open: Option<Session>,
    messages_sent: usize,
}

/// An open connection, and what its relay offers.
struct Session {
    connection: AsyncSmtpConnection,
    offers: Offers,
    /// The stream as the session sees it under lettre.
    watch: Watch,
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
    /// The relay had closed the connection (while it was idle) before anything of this
    /// transaction was written.
    Stale,
}

impl Connection {
    pub fn new(settings: Arc<Settings>) -> Connection {
        Connection {
            settings,
            open: None,
            messages_sent: 0,
        }
    }

    /// Opens a connection as the campaign's settings say: TCP, TLS (from the first byte, or
    /// STARTTLS when required or offered), AUTH. A failure that waiting will not mend — a
    /// certificate mailer refuses, a handshake or login the relay refuses, no common AUTH
    /// mechanism, the wrong scheme for the port — is [`RelayFailure::config`] and says what
    /// to change; anything else is an outage.
    ///
    /// Between TLS and AUTH it says EHLO once more itself, for the extensions lettre does not
    /// keep (PIPELINING, CHUNKING, SIZE), and gives that reply — or the relay's refusal of it —
    /// with the connection. A second EHLO is allowed at any time (RFC 5321 §4.1.4); before
    /// AUTH, because some relays forget the login at an EHLO after it.
    pub(crate) async fn connect(&self) -> Result<(AsyncSmtpConnection, Ehlo), RelayFailure> {
        let (connection, ehlo, _) = self.establish().await?;
        Ok((connection, ehlo))
    }

    /// [`Connection::connect`], and a second handle on the socket for [`Session::hung_up`].
    async fn establish(&self) -> Result<(AsyncSmtpConnection, Ehlo, Watch), RelayFailure> {
        let s = &self.settings;
        let smtp = &s.smtp;
        let place = self.place();
        let outage = |what: &str, error: &dyn fmt::Display| {
            RelayFailure::new(format!("{what} `{place}`: {}", without_urls(error)))
        };
        let tcp = self.open_tcp().await?;
        let (tcp, watch) = guarded(tcp).map_err(|e| outage("cannot use the connection to", &e))?;
        let stream: Box<dyn AsyncTokioStream> = if smtp.security == Security::ImplicitTls {
            let name = rustls::pki_types::ServerName::try_from(smtp.host.clone())
                .map_err(|e| outage("bad TLS name for", &e))?;
            let tls = tokio::time::timeout(smtp.connect_timeout, s.tls_first.connect(name, tcp))
                .await
                .map_err(|_| outage("timed out in the TLS handshake with", &"no answer"))?
                .map_err(|e| match rustls_error(&e) {
                    Some(error) => RelayFailure::config(self.tls_refusal(error, TlsStart::First)),
                    None => outage("TLS handshake failed with", &e),
                })?;
            Box::new(ImplicitTls(tls))
        } else {
            Box::new(tcp)
        };
        let mut connection = self.greeting(stream).await?;
        let mut encrypted = smtp.security == Security::ImplicitTls;
        let starttls_offered = connection.can_starttls();
        if let Some(tls) = &s.starttls {
            if starttls_offered {
                self.starttls(&mut connection, tls).await?;
                encrypted = true;
            } else if smtp.security == Security::StartTls {
                let _ = tokio::time::timeout(smtp.command_timeout, connection.quit()).await;
                return Err(RelayFailure::config(format!(
                    "the relay at `{place}` does not offer STARTTLS, which mailer requires of a relay \
                     that is not on loopback (or with `require_starttls`): use the relay's \
                     implicit-TLS port (465) with `smtps://`, or have the relay offer STARTTLS"
                )));
            } else if let Some(ca_file) = &smtp.ca_file
                && !s.plain_text_noted.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    relay = %place,
                    ca_file = %ca_file.display(),
                    "the loopback relay offers no STARTTLS: sending in plain text, and ca_file goes unused"
                );
            }
        }
        let ehlo = self.ehlo(&mut connection).await?;
        if let Some(credentials) = &s.credentials {
            let offered = match &ehlo {
                Ok(reply) => auth_mechanisms(reply.message()),
                Err(_) => Vec::new(),
            };
            self.authenticate(
                &mut connection,
                credentials,
                encrypted,
                starttls_offered,
                &offered,
            )
            .await?;
        }
        Ok((connection, ehlo, watch))
    }

    /// mailer's own EHLO: the reply, or the relay's refusal (4xx or 5xx) of it. No reply is
    /// an outage.
    async fn ehlo(&self, connection: &mut AsyncSmtpConnection) -> Result<Ehlo, RelayFailure> {
        let smtp = &self.settings.smtp;
        let ehlo = lettre::transport::smtp::commands::Ehlo::new(self.settings.hello.clone());
        match tokio::time::timeout(smtp.command_timeout, connection.command(ehlo)).await {
            Ok(Ok(reply)) => Ok(Ok(reply)),
            Ok(Err(error)) if error.status().is_some() => Ok(Err(error)),
            Ok(Err(error)) => Err(RelayFailure::new(format!(
                "the connection to `{}` broke at EHLO: {}",
                self.place(),
                describe(&error)
            ))),
            Err(_) => Err(RelayFailure::new(format!(
                "no reply to EHLO within {} from `{}`",
                humantime::format_duration(smtp.command_timeout),
                self.place()
            ))),
        }
    }

    /// A connection for sending, and how its transactions go. A relay that refuses mailer's
    /// own EHLO is sent to command by command.
    async fn session(&self) -> Result<Session, RelayFailure> {
        let (connection, ehlo, watch) = self.establish().await?;
        let mut offers = match &ehlo {
            Ok(reply) => Offers::of(&capabilities(reply.message())),
            Err(_) => Offers::of(&[]),
        };
        let smtp = &self.settings.smtp;
        offers.wire = offers.wire.within(smtp.pipelining, smtp.chunking);
        tracing::debug!(relay = %self.place(), wire = ?offers.wire, size_limit = ?offers.size_limit, "connected");
        Ok(Session {
            connection,
            offers,
            watch,
        })
    }

    /// `host:port`, as messages name the relay.
    fn place(&self) -> String {
        format!("{}:{}", self.settings.smtp.host, self.settings.smtp.port)
    }

    async fn open_tcp(&self) -> Result<TcpStream, RelayFailure> {
        let smtp = &self.settings.smtp;
        let place = self.place();
        let tcp = tokio::time::timeout(
            smtp.connect_timeout,
            TcpStream::connect((smtp.host.as_str(), smtp.port)),
        )
        .await
        .map_err(|_| {
            RelayFailure::new(format!(
                "timed out connecting to `{place}`: {}",
                humantime::format_duration(smtp.connect_timeout)
            ))
        })?
        .map_err(|e| {
            RelayFailure::new(format!("cannot connect to `{place}`: {}", without_urls(&e)))
        })?;
        tcp.set_nodelay(true).map_err(|e| {
            RelayFailure::new(format!(
                "cannot set TCP_NODELAY on `{place}`: {}",
                without_urls(&e)
            ))
        })?;
        Ok(tcp)
    }

    /// Reads the greeting and sends EHLO. Over plain text, a relay silent for
    /// [`GREETING_PATIENCE`] may be waiting for a TLS `ClientHello` (`smtp://` at an
    /// implicit-TLS port): a second connection asks; if it speaks TLS, the scheme is wrong
    /// and waiting is pointless; otherwise this connection goes on waiting for its greeting,
    /// up to `command_timeout` as always.
    async fn greeting(
        &self,
        stream: Box<dyn AsyncTokioStream>,
    ) -> Result<AsyncSmtpConnection, RelayFailure> {
        let s = &self.settings;
        let greeting = timed(
            s.smtp.command_timeout,
            AsyncSmtpConnection::connect_with_transport(stream, &s.hello),
        );
        tokio::pin!(greeting);
        let result = if s.smtp.security == Security::ImplicitTls {
            greeting.await
        } else {
            tokio::select! {
                result = &mut greeting => result,
                () = tokio::time::sleep(GREETING_PATIENCE) => {
                    // The greeting may still come while the question is asked.
                    let question = self.speaks_tls_first();
                    tokio::pin!(question);
                    tokio::select! {
                        result = &mut greeting => result,
                        tls_first = &mut question => {
                            if tls_first {
                                return Err(RelayFailure::config(format!(
                                    "the relay at `{}` speaks TLS from the first byte and sends no \
                                     greeting in plain text: use `smtps://` for this port, or the \
                                     relay's STARTTLS port (587 or 25) with `smtp://`",
                                    self.place()
                                )));
                            }
                            greeting.await
                        }
                    }
                }
            }
        };
        result.map_err(|e| {
            RelayFailure::new(format!("no usable greeting from `{}`: {e}", self.place()))
        })
    }

    /// Whether the relay's port answers a TLS `ClientHello`: a TLS handshake on a connection
    /// of its own, within [`TLS_QUESTION_LIMIT`]. Any TLS answer counts (a certificate mailer
    /// would refuse, an alert); plain text, silence or a hang-up do not. Nothing is sent over
    /// that connection but the handshake.
    async fn speaks_tls_first(&self) -> bool {
        let Ok(name) = rustls::pki_types::ServerName::try_from(self.settings.smtp.host.clone())
        else {
            return false;
        };
        let question = async {
            let tcp = self.open_tcp().await.ok()?;
            Some(self.settings.tls_first.connect(name, tcp).await)
        };
        match tokio::time::timeout(TLS_QUESTION_LIMIT, question).await {
            Ok(Some(Ok(_))) => true,
            Ok(Some(Err(error))) => rustls_error(&error).is_some_and(|e| {
                !matches!(
                    e,
                    rustls::Error::InvalidMessage(_) | rustls::Error::PeerMisbehaved(_)
                )
            }),
            _ => false,
        }
    }

    async fn starttls(
        &self,
        connection: &mut AsyncSmtpConnection,
        tls: &TlsParameters,
    ) -> Result<(), RelayFailure> {
        let s = &self.settings;
        let place = self.place();
        match tokio::time::timeout(
            s.smtp.command_timeout,
            connection.starttls(tls.clone(), &s.hello),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match lettre_rustls_error(&e) {
                Some(error) => RelayFailure::config(self.tls_refusal(error, TlsStart::Starttls)),
                None if e.is_permanent() => RelayFailure::config(format!(
                    "the relay at `{place}` refused STARTTLS: {}",
                    describe(&e)
                )),
                None => {
                    RelayFailure::new(format!("STARTTLS failed with `{place}`: {}", describe(&e)))
                }
            }),
            Err(_) => Err(RelayFailure::new(format!(
                "no reply to STARTTLS within {} from `{place}`",
                humantime::format_duration(s.smtp.command_timeout)
            ))),
        }
    }

    /// AUTH PLAIN or LOGIN. No mechanism in common (the error lists `offered`, the mechanisms
    /// of mailer's own EHLO reply as the relay wrote them: lettre keeps only those it knows), or
    /// a permanent refusal (535: the credentials are wrong), is a configuration failure; a 4xx
    /// is an outage.
    async fn authenticate(
        &self,
        connection: &mut AsyncSmtpConnection,
        credentials: &Credentials,
        encrypted: bool,
        starttls_offered: bool,
        offered: &[String],
    ) -> Result<(), RelayFailure> {
        let s = &self.settings;
        let place = self.place();
        if connection
            .server_info()
            .get_auth_mechanism(&MECHANISMS)
            .is_none()
        {
            let _ = tokio::time::timeout(s.smtp.command_timeout, connection.quit()).await;
            return Err(RelayFailure::config(no_common_mechanism(
                &place,
                offered,
                encrypted,
                starttls_offered,
            )));
        }
        let auth = tokio::time::timeout(
            s.smtp.command_timeout,
            connection.auth(&MECHANISMS, credentials),
        )
        .await;
        match auth {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.is_permanent() => Err(RelayFailure::config(format!(
                "the relay at `{place}` refused mailer's login: {}; check `username` and the password",
                describe(&e)
            ))),
            Ok(Err(e)) => Err(RelayFailure::new(format!(
                "authentication failed with `{place}`: {}",
                describe(&e)
            ))),
            Err(_) => Err(RelayFailure::new(format!(
                "no reply to AUTH within {} from `{place}`",
                humantime::format_duration(s.smtp.command_timeout)
            ))),
        }
    }

    /// What mailer or the relay refused in a TLS handshake, and what to change.
    fn tls_refusal(&self, error: &rustls::Error, start: TlsStart) -> String {
        let place = self.place();
        match error {
            rustls::Error::InvalidCertificate(why) => {
                certificate_refused(&place, &self.settings.smtp.host, why)
            }
            rustls::Error::InvalidMessage(_) if start == TlsStart::First => format!(
                "the relay at `{place}` does not speak TLS from the first byte: use `smtp://` \
                 (STARTTLS) for this port, or the relay's implicit-TLS port (465) with `smtps://`"
            ),
            rustls::Error::AlertReceived(alert) => format!(
                "the relay at `{place}` refused mailer's TLS handshake (alert: {alert:?}): it may \
                 want a TLS version or cipher mailer does not offer (TLS 1.2 and 1.3, modern \
                 ciphers only), or a client certificate; see the relay's log"
            ),
            other => format!(
                "the TLS handshake with the relay at `{place}` failed: {}; check the relay's TLS \
                 settings and the scheme and port in `url`",
                without_urls(other)
            ),
        }
    }

    /// Delivers one message, reconnecting once if the connection turns out to be dead.
    pub async fn deliver(
        &mut self,
        message: &OutgoingMessage,
        gate: &mut Gate,
    ) -> Result<Attempt, Refusal> {
        let mut lost_before = None;
        loop {
            let (mut session, reused) = match self.open.take() {
                Some(session) => (session, true),
                None => {
                    self.messages_sent = 0;
                    (self.session().await?, false)
                }
            };
            match transaction(&mut session, reused, message, &self.settings.smtp, gate).await {
                // Nothing was written: the message goes on a new connection. Only a reused
                // connection is looked at, so this cannot repeat.
                Step::Stale => {
                    tracing::debug!(relay = %self.place(), "the relay closed an idle connection");
                }
                Step::Done(attempt) => {
                    self.messages_sent += 1;
                    let used_up =
                        self.messages_sent >= self.settings.smtp.messages_per_connection.get();
                    if used_up || session.connection.has_broken() {
                        let _ = tokio::time::timeout(
                            self.settings.smtp.command_timeout,
                            session.connection.quit(),
                        )
                        .await;
                    } else {
                        self.open = Some(session);
                    }
                    return Ok(attempt);
                }
                // A connection in an unknown state is dropped, not QUIT: it may never answer.
                Step::DoneAndBroken(attempt) => return Ok(attempt),
                Step::Relay(reason) => {
                    let _ = tokio::time::timeout(
                        self.settings.smtp.command_timeout,
                        session.connection.quit(),
                    )
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
        if let Some(mut session) = self.open.take() {
            let _ = tokio::time::timeout(
                self.settings.smtp.command_timeout,
                session.connection.quit(),
            )
            .await;
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
    pub(super) fn tls_first(&self) -> &tokio_rustls::TlsConnector {
        &self.tls_first
    }
}

/// The most a relay may send between two writes of mailer's: lettre reads a reply line until
/// its end before it checks the line's length.
const READ_CAP: usize = 1 << 20;

/// The TCP stream under lettre (and under TLS, when there is TLS): it refuses to read more
/// than [`READ_CAP`] between two writes, and notes a failed write in `write_failed`.
#[derive(Debug)]
struct Guarded {
    tcp: TcpStream,
    /// Read since the last write.
    unasked: usize,
    /// Whether a read has begun since the last write: a write that fails after it (TLS writing
    /// an alert while it reads) is not the failure of what mailer wrote.
    reading: bool,
    write_failed: Arc<AtomicBool>,
}

/// What the session keeps of its stream once lettre has it.
struct Watch {
    /// A second handle on the socket, to look at without reading (see [`hung_up`]).
    socket: std::net::TcpStream,
    /// Whether a write failed since it was last cleared.
    write_failed: Arc<AtomicBool>,
}

/// `tcp` guarded, and the session's watch over it.
fn guarded(tcp: TcpStream) -> io::Result<(Guarded, Watch)> {
    let tcp = tcp.into_std()?;
    let socket = tcp.try_clone()?;
    let write_failed = Arc::new(AtomicBool::new(false));
    let stream = Guarded {
        tcp: TcpStream::from_std(tcp)?,
        unasked: 0,
        reading: false,
        write_failed: Arc::clone(&write_failed),
    };
    Ok((
        stream,
        Watch {
            socket,
            write_failed,
        },
    ))
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.reading = true;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        this.unasked += buf.filled().len() - before;
        if this.unasked > READ_CAP {
            return Poll::Ready(Err(io::Error::other(format!(
                "the relay sent more than {READ_CAP} bytes without being asked"
            ))));
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.tcp).poll_write(cx, buf);
        match &written {
            Poll::Ready(Ok(n)) if *n > 0 => {
                this.unasked = 0;
                this.reading = false;
            }
            Poll::Ready(Err(_)) if !this.reading => this.write_failed.store(true, Ordering::SeqCst),
            _ => {}
        }
        written
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.tcp).poll_flush(cx);
        if let Poll::Ready(Err(_)) = &flushed
            && !this.reading
        {
            this.write_failed.store(true, Ordering::SeqCst);
        }
        flushed
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for Guarded {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }
}

/// Where TLS started: from the first byte (`smtps://`) or after STARTTLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TlsStart {
    First,
    Starttls,
}

/// The rustls error inside an I/O error from a TLS handshake (tokio-rustls wraps it as
/// invalid data); `None` for the network's own errors (a reset, a hang-up).
fn rustls_error(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The rustls error behind a lettre error from STARTTLS, if the handshake failed.
fn lettre_rustls_error(error: &lettre::transport::smtp::Error) -> Option<&rustls::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(inner) = cause {
        if let Some(found) = inner.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = inner.downcast_ref::<io::Error>().and_then(rustls_error) {
            return Some(found);
        }
        cause = inner.source();
    }
    None
}

/// Why mailer refused the relay's certificate, and what to change.
fn certificate_refused(place: &str, host: &str, why: &rustls::CertificateError) -> String {
    use rustls::CertificateError as E;
    let (reason, fix) = match why {
        E::UnknownIssuer => (
            "no trusted CA signed it".to_owned(),
            "give the CA that signed it in `ca_file` (for a self-signed certificate, the \
             certificate itself, made as the README shows)"
                .to_owned(),
        ),
        E::NotValidForName | E::NotValidForNameContext { .. } => (
            format!("it is not made out to `{host}`"),
            "put a name the certificate lists in `url`, or give the relay a certificate that \
             lists this one"
                .to_owned(),
        ),
        E::Expired | E::ExpiredContext { .. } => (
            "it has expired".to_owned(),
            "renew the relay's certificate (or set this machine's clock right)".to_owned(),
        ),
        E::NotValidYet | E::NotValidYetContext { .. } => (
            "it is not valid yet".to_owned(),
            "check this machine's clock and the relay's certificate".to_owned(),
        ),
        E::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => (
            "it is a CA certificate (basicConstraints CA:TRUE) used as the relay's own, which \
             TLS does not allow"
                .to_owned(),
            "give the relay a self-signed certificate without the CA flag and with its name \
             in subjectAltName (the README shows the openssl command), and that certificate in \
             `ca_file`"
                .to_owned(),
        ),
        other => (
            without_urls(&format!("{other:?}")),
            "give the CA that signed it in `ca_file`, or fix the relay's certificate".to_owned(),
        ),
    };
    format!("mailer refused the certificate of the relay at `{place}`: {reason}; {fix}")
}

/// Why no AUTH mechanism is in common, and what to change.
fn no_common_mechanism(
    place: &str,
    offered: &[String],
    encrypted: bool,
    starttls_offered: bool,
) -> String {
    if !offered.is_empty() {
        return format!(
            "the relay at `{place}` offers AUTH {} and mailer speaks PLAIN and LOGIN: enable one \
             of them on the relay",
            offered.join(" ")
        );
    }
    if !encrypted && starttls_offered {
        return format!(
            "the relay at `{place}` offers AUTH only after STARTTLS, which \
             `dangerous_plaintext = true` turns off: remove `dangerous_plaintext`"
        );
    }
    let tls = if encrypted { "" } else { " before TLS" };
    format!(
        "the relay at `{place}` offers no AUTH{tls}: remove `username` and the password if it \
         needs no login, or enable AUTH PLAIN or LOGIN on the relay"
    )
}

/// The mechanisms of the `AUTH` line of an EHLO reply (its lines without their codes).
fn auth_mechanisms<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    lines
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let keyword = words.next()?;
            keyword
                .eq_ignore_ascii_case("AUTH")
                .then(|| words.map(str::to_owned).collect::<Vec<_>>())
        })
        .flatten()
        .collect()
}

/// An error's text without the web addresses libraries put in theirs (rustls links its
/// manual when a peer hangs up without `close_notify`): a reply, a report or a log line says
/// what happened, not where a library documents it.
fn without_urls(error: &dyn fmt::Display) -> String {
    let text = error.to_string();
    let kept: Vec<&str> = text
        .split(' ')
        .filter(|word| !(word.contains("://") && word.contains("http")))
        .collect();
    kept.join(" ")
        .trim_end_matches(|c: char| c.is_whitespace() || matches!(c, ':' | ';' | ','))
        .to_owned()
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
    match std::error::Error::source(error) {
        Some(source) => without_urls(&source),
        None => without_urls(error),
    }
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

/// One SMTP transaction: MAIL FROM, exactly one RCPT TO, then the message — after `DATA`, or
/// in `BDAT` — as the relay's extensions allow (see [`Wire`]). `reused`: the connection has
/// carried a transaction before, so the relay may have closed it meanwhile.
async fn transaction(
    session: &mut Session,
    reused: bool,
    message: &OutgoingMessage,
    smtp: &Smtp,
    gate: &mut Gate,
) -> Step {
    let envelope = &message.envelope;
    let mut parameters = Vec::new();
    let info = session.connection.server_info();
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
    if let Some(limit) = session.offers.size_limit
        && message.bytes.len() > limit
    {
        return Step::Done(Attempt::without_reply(
            State::Failed,
            format!(
                "the message is {} bytes, and the relay takes at most {limit} (SIZE)",
                message.bytes.len()
            ),
        ));
    }
    // Exactly one recipient per transaction, by construction: the envelope has one address.
    let mail = Mail::new(Some(envelope.mail_from.clone()), parameters);
    let rcpt = Rcpt::new(envelope.rcpt_to.clone(), vec![]);
    let text = std::str::from_utf8(&message.bytes).ok();
    let wire = match (session.offers.wire, text) {
        // lettre writes commands as text. Rendered messages are UTF-8; were one not, DATA
        // would carry it.
        (Wire::Chunked, None) => Wire::Pipelined,
        (wire, _) => wire,
    };
    let Session {
        connection, watch, ..
    } = session;
    // A relay that closed an idle connection (often with a 421 first) has not refused
    // anything: this message goes on a new one. With CHUNKING the look comes right before the
    // write, after the wait for the journal.
    if wire != Wire::Chunked && reused && hung_up(watch) {
        return Step::Stale;
    }
    let envelope = Envelope { mail, rcpt };
    match (wire, text) {
        (Wire::Serial, _) => serial(connection, message, smtp, gate, &envelope).await,
        (Wire::Chunked, Some(text)) => {
            chunked(
                connection, watch, reused, text, message, smtp, gate, &envelope,
            )
            .await
        }
        _ => pipelined(connection, message, smtp, gate, &envelope).await,
    }
}

/// MAIL FROM and RCPT TO of one transaction.
struct Envelope {
    mail: Mail,
    rcpt: Rcpt,
}

/// Without PIPELINING: each command after the reply to the one before.
async fn serial(
    connection: &mut AsyncSmtpConnection,
    message: &OutgoingMessage,
    smtp: &Smtp,
    gate: &mut Gate,
    envelope: &Envelope,
) -> Step {
    // From MAIL FROM on, this message is in flight: the record goes to the journal now, and
    // its commit overlaps MAIL, RCPT and DATA.
    gate.start(message);
    let limit = smtp.command_timeout;
    let mail = answer(hear(connection.command(&envelope.mail), limit).await, 2);
    match mail {
        Answer::Took(_) => {}
        Answer::Refused(error) => return mail_refused(message, &error),
        Answer::Missing(why) => return Step::Lost(format!("MAIL FROM: {why}")),
    }
    let rcpt = answer(hear(connection.command(&envelope.rcpt), limit).await, 2);
    let data = match rcpt {
        Answer::Took(_) => answer(hear(connection.command(Data), limit).await, 3),
        Answer::Refused(error) => return refused_then_reset(connection, smtp, &error).await,
        Answer::Missing(why) => return Step::Lost(format!("RCPT TO: {why}")),
    };
    match data {
        Answer::Took(_) => body(connection, message, smtp, gate).await,
        Answer::Refused(error) => refused_then_reset(connection, smtp, &error).await,
        Answer::Missing(why) => Step::Lost(format!("DATA: {why}")),
    }
}

/// With PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write, and their three replies read
/// whatever the first ones say — the relay answers every command it was sent. The journal's
/// commit overlaps that round trip; the body waits for it, as without PIPELINING.
async fn pipelined(
    connection: &mut AsyncSmtpConnection,
    message: &OutgoingMessage,
    smtp: &Smtp,
    gate: &mut Gate,
    envelope: &Envelope,
) -> Step {
    gate.start(message);
    let batch = format!("{}{}{Data}", envelope.mail, envelope.rcpt);
    let answers = answers(connection, batch, [2, 2, 3], smtp.command_timeout).await;
    let [mail, rcpt, data] = &answers;
    let refused = [mail, rcpt].iter().any(|a| matches!(a, Answer::Refused(_)));
    let in_step = !answers.iter().any(|a| matches!(a, Answer::Missing(_)));
    if let (Answer::Took(_), true, true) = (data, refused, in_step) {
        // DATA was taken although MAIL or RCPT was refused (RFC 2920 §3.1): the relay waits
        // for a message. A lone dot ends it, empty; with no recipient it goes nowhere. Out of
        // step, no dot: the connection is dropped (`settle`), and nothing ends a message.
        let ended = answer(
            hear(connection.command(".\r\n"), smtp.command_timeout).await,
            2,
        );
        if let Answer::Missing(why) = ended {
            return refusal_in(&answers, message).map_or_else(
                || Step::Lost(format!("the end of an empty message: {why}")),
                Step::broken,
            );
        }
    }
    match &answers {
        [Answer::Took(_), Answer::Took(_), Answer::Took(_)] => {
            body(connection, message, smtp, gate).await
        }
        _ => {
            settle(connection, smtp, &answers, message, || {
                Step::Lost(lost_in(&answers, ["MAIL FROM", "RCPT TO", "DATA"]))
            })
            .await
        }
    }
}

/// With CHUNKING (RFC 3030) and PIPELINING: once the journal has the recipient durably in
/// flight, MAIL, RCPT and `BDAT <size> LAST` with the message, in one write; three replies.
/// The message goes as it is: no dot-stuffing (the guard has refused bare CR and LF). From
/// the write on the relay may have the whole message, so a connection lost before all three
/// replies are in leaves it ambiguous — unless a reply already refused it. `reused`: the
/// connection carried a transaction before, so `watch` looks whether the relay has closed it.
#[allow(clippy::too_many_arguments)] // one transaction's parts, passed once
async fn chunked(
    connection: &mut AsyncSmtpConnection,
    watch: &Watch,
    reused: bool,
    text: &str,
    message: &OutgoingMessage,
    smtp: &Smtp,
    gate: &mut Gate,
    envelope: &Envelope,
) -> Step {
    if let Err(refusal) = gate.pass(message).await {
        return Step::Unrecorded(refusal);
    }
    if reused && hung_up(watch) {
        return Step::Stale;
    }
    let line_end = if text.ends_with("\r\n") { "" } else { "\r\n" };
    let size = text.len() + line_end.len();
    let batch = format!(
        "{}{}BDAT {size} LAST\r\n{text}{line_end}",
        envelope.mail, envelope.rcpt
    );
    // The relay may hold the replies to MAIL and RCPT until it has the message: the three
    // share the wait the reply to the message itself may take.
    watch.write_failed.store(false, Ordering::SeqCst);
    let answers = answers(connection, batch, [2, 2, 2], smtp.data_timeout).await;
    if matches!(answers[0], Answer::Missing(_)) && watch.write_failed.load(Ordering::SeqCst) {
        // The write itself failed (the relay hung up, as after a 421): the end of the
        // message never left, and BDAT counts its bytes, so the relay cannot have taken it.
        return Step::Lost(format!(
            "the connection broke while the message was written: {}",
            lost_in(&answers, ["MAIL FROM", "RCPT TO", "BDAT"])
        ));
    }
    match &answers {
        [Answer::Took(_), Answer::Took(_), Answer::Took(reply)] => {
            let reply = reply_text(reply);
            Step::Done(Attempt {
                state: State::Sent,
                detail: reply.exact(),
                reply: Some(reply),
            })
        }
        // Taken after a refusal: the replies are out of step with the commands.
        [_, _, Answer::Took(reply)] => ambiguous(format!(
            "the relay took the message ({}) after refusing part of its transaction",
            reply_text(reply).exact()
        )),
        [Answer::Took(_), Answer::Took(_), Answer::Refused(error)] => {
            refused_then_reset(connection, smtp, error).await
        }
        _ => {
            settle(connection, smtp, &answers, message, || {
                ambiguous(format!(
                    "no reply after the message went with BDAT: {}",
                    lost_in(&answers, ["MAIL FROM", "RCPT TO", "BDAT"])
                ))
            })
            .await
        }
    }
}

/// A batch's outcome when not everything was taken: the first refusal (the sender's is the
/// relay's problem, a 421 to MAIL a closed connection), with `RSET` when the connection is
/// still in step; `lost` when nothing was refused.
async fn settle(
    connection: &mut AsyncSmtpConnection,
    smtp: &Smtp,
    answers: &[Answer; 3],
    message: &OutgoingMessage,
    lost: impl FnOnce() -> Step,
) -> Step {
    let missing = answers.iter().any(|a| matches!(a, Answer::Missing(_)));
    match refusal_in(answers, message) {
        None => lost(),
        Some(Step::Done(attempt)) if !missing => {
            if reset(connection, smtp).await {
                Step::Done(attempt)
            } else {
                Step::DoneAndBroken(attempt)
            }
        }
        Some(step) if missing => step.broken(),
        Some(step) => step,
    }
}

/// After MAIL, RCPT and DATA were taken: once the journal has the recipient durably in
/// flight, the body, dot-stuffed, and the reply to it.
async fn body(
    connection: &mut AsyncSmtpConnection,
    message: &OutgoingMessage,
    smtp: &Smtp,
    gate: &mut Gate,
) -> Step {
    // The body is the first thing the server could accept: it waits until the journal says
    // this recipient is durably in flight (the commit ran while MAIL, RCPT and DATA went back
    // and forth). A crash before this point leaves the row `pending` or `in_flight` with
    // nothing delivered; either way nothing is sent twice.
    if let Err(refusal) = gate.pass(message).await {
        return Step::Unrecorded(refusal);
    }
    // From here on the server may have the whole message: a broken connection or a missing
    // reply leaves the outcome unknown, and the message must not be sent again blindly.
    let limit = smtp.data_timeout;
    let sent = match std::str::from_utf8(&message.bytes) {
        // The body and the final dot in one write (lettre's `message` writes them apart).
        Ok(text) => tokio::time::timeout(limit, connection.command(DotStuffed(text))).await,
        Err(_) => tokio::time::timeout(limit, connection.message(&message.bytes)).await,
    };
    match sent {
        Ok(Ok(response)) if response.code().severity as u8 == 2 => {
            let reply = reply_text(&response);
            Step::Done(Attempt {
                state: State::Sent,
                detail: reply.exact(),
                reply: Some(reply),
            })
        }
        // A positive reply of the wrong kind: out of step with the relay.
        Ok(Ok(response)) => ambiguous(format!(
            "{} after the message body, where 2xx was due",
            reply_text(&response).exact()
        )),
        Ok(Err(error)) => match refused(&error) {
            // lettre has read the whole reply; the connection is still in step.
            Some(attempt) => Step::Done(attempt),
            None => ambiguous(format!(
                "no reply after the message body: {}",
                describe(&error)
            )),
        },
        Err(_) => ambiguous(format!(
            "no reply after the message body within {}",
            humantime::format_duration(smtp.data_timeout)
        )),
    }
}

/// A message as it goes after `DATA` (RFC 5321 §4.5.2): a dot doubled at the start of every
/// line, then the line with the lone dot. The same bytes as lettre's `message`, for a message
/// whose lines all end with CRLF (the guard has refused bare CR and LF).
struct DotStuffed<'a>(&'a str);

impl fmt::Display for DotStuffed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        if rest.starts_with('.') {
            f.write_str(".")?;
        }
        while let Some(at) = rest.find("\r\n.") {
            f.write_str(&rest[..at + 2])?;
            f.write_str(".")?;
            rest = &rest[at + 2..];
        }
        f.write_str(rest)?;
        f.write_str("\r\n.\r\n")
    }
}

/// No reply after the message went: the relay may have it.
fn ambiguous(detail: String) -> Step {
    Step::DoneAndBroken(Attempt::without_reply(State::Ambiguous, detail))
}

/// What came back for one command.
type Heard = Result<Response, String>;

/// A reply as the command it answers wants it.
enum Answer {
    /// The positive reply the command wants: 2xx, or 3xx after `DATA`.
    Took(Response),
    /// 4xx or 5xx.
    Refused(lettre::transport::smtp::Error),
    /// No reply (the connection broke, the time ran out, what came was no reply), or a
    /// positive one of the wrong kind: either way, out of step.
    Missing(String),
}

/// The reply `reading` gives by `deadline`: a positive one, a refusal (as lettre's error, which
/// carries it), or why there was none.
async fn hear_by(
    reading: impl Future<Output = Result<Response, lettre::transport::smtp::Error>>,
    deadline: tokio::time::Instant,
) -> Result<Heard, lettre::transport::smtp::Error> {
    match tokio::time::timeout_at(deadline, reading).await {
        Ok(Ok(response)) => Ok(Ok(response)),
        Ok(Err(error)) if error.status().is_some() => Err(error),
        Ok(Err(error)) => Ok(Err(describe(&error))),
        Err(_) => Ok(Err("no reply in time".to_owned())),
    }
}

/// [`hear_by`] within `limit`.
async fn hear(
    reading: impl Future<Output = Result<Response, lettre::transport::smtp::Error>>,
    limit: Duration,
) -> Result<Heard, lettre::transport::smtp::Error> {
    hear_by(reading, tokio::time::Instant::now() + limit).await
}

/// `heard` as a command wants it: a positive reply whose first digit is `class`.
fn answer(heard: Result<Heard, lettre::transport::smtp::Error>, class: u8) -> Answer {
    match heard {
        Ok(Ok(response)) if response.code().severity as u8 == class => Answer::Took(response),
        Ok(Ok(response)) => Answer::Missing(format!(
            "{} where {class}xx was due",
            reply_text(&response).exact()
        )),
        Ok(Err(why)) => Answer::Missing(why),
        Err(error) => Answer::Refused(error),
    }
}

/// Writes `batch` (three commands, and for BDAT the message) and reads three replies, as the
/// three commands want them (`classes`), all within `limit`; once the connection is lost,
/// nothing more is read.
async fn answers(
    connection: &mut AsyncSmtpConnection,
    batch: String,
    classes: [u8; 3],
    limit: Duration,
) -> [Answer; 3] {
    let deadline = tokio::time::Instant::now() + limit;
    let first = hear_by(connection.command(batch), deadline).await;
    let lost = |heard: &Result<Heard, _>| matches!(heard, Ok(Err(_)));
    let second = if lost(&first) {
        Ok(Err("not read: the connection was lost".to_owned()))
    } else {
        hear_by(connection.read_response(), deadline).await
    };
    let third = if lost(&first) || lost(&second) {
        Ok(Err("not read: the connection was lost".to_owned()))
    } else {
        hear_by(connection.read_response(), deadline).await
    };
    [
        answer(first, classes[0]),
        answer(second, classes[1]),
        answer(third, classes[2]),
    ]
}

/// What the first refusal among the replies to MAIL, RCPT and DATA/BDAT means: a refused
/// sender (a relay-wide problem; a 421, a connection the relay closes), or the recipient's
/// outcome. `None` when nothing was refused.
fn refusal_in(answers: &[Answer; 3], message: &OutgoingMessage) -> Option<Step> {
    let [mail, rcpt, last] = answers;
    if let Answer::Refused(error) = mail {
        return Some(mail_refused(message, error));
    }
    if !matches!(mail, Answer::Took(_)) {
        return None;
    }
    [rcpt, last].into_iter().find_map(|reply| match reply {
        Answer::Refused(error) => Some(match refused(error) {
            Some(attempt) => Step::Done(attempt),
            None => Step::Lost(describe(error)),
        }),
        _ => None,
    })
}

/// Where a batch's replies stopped, for a message.
fn lost_in(answers: &[Answer; 3], commands: [&str; 3]) -> String {
    answers
        .iter()
        .zip(commands)
        .find_map(|(reply, command)| match reply {
            Answer::Missing(why) => Some(format!("{command}: {why}")),
            _ => None,
        })
        .unwrap_or_else(|| "no reply".to_owned())
}

impl Step {
    /// The same outcome, on a connection that is not in step any more.
    fn broken(self) -> Step {
        match self {
            Step::Done(attempt) => Step::DoneAndBroken(attempt),
            other => other,
        }
    }
}

/// A refused `MAIL FROM`. A 421 closes the connection (a relay's idle timeout or its limit of
/// messages per connection): the message goes again on a new one. Any other refusal is the
/// relay's of the campaign's sender, not one recipient's.
fn mail_refused(message: &OutgoingMessage, error: &lettre::transport::smtp::Error) -> Step {
    if error.status().is_some_and(|code| u16::from(code) == 421) {
        return Step::Lost(format!("MAIL FROM: {}", describe(error)));
    }
    Step::Relay(format!(
        "the relay refused the sender `{}`: {}",
        message.envelope.mail_from,
        describe(error)
    ))
}

/// The recipient's outcome from a refusal of RCPT or DATA, and `RSET` to go on with the
/// connection.
async fn refused_then_reset(
    connection: &mut AsyncSmtpConnection,
    smtp: &Smtp,
    error: &lettre::transport::smtp::Error,
) -> Step {
    let Some(attempt) = refused(error) else {
        return Step::Lost(describe(error));
    };
    if reset(connection, smtp).await {
        Step::Done(attempt)
    } else {
        Step::DoneAndBroken(attempt)
    }
}

/// Whether the relay has hung up, or said something nobody asked for (a 421 before it hangs
/// up, a TLS alert), since the last reply was read: looked at on the socket `watch`, without
/// waiting and without taking anything from the stream.
fn hung_up(watch: &Watch) -> bool {
    let mut byte = [0u8; 1];
    !matches!(watch.socket.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// A reply as mailer keeps it: code and text.
fn reply_text(response: &Response) -> Reply {
    Reply::new(
        u16::from(response.code()),
        &response.message().collect::<Vec<_>>().join(" "),
    )
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
    use super::super::{FailureKind, Gate, Recorder};
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
        /// Reads a `BDAT <size> LAST` line and the chunk of `size` octets after it.
        HearChunk,
        /// Hangs up.
        HangUp,
    }

    use Turn::{HangUp, Hear, HearBody, HearChunk, Pause, Say};

    const GREETING: Turn = Say("220 sink.test ESMTP\r\n");
    /// Neither PIPELINING nor CHUNKING: one command at a time.
    const EHLO: Turn = Say("250-sink.test\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n");
    const OK: Turn = Say("250 2.0.0 ok\r\n");
    const GO_AHEAD: Turn = Say("354 go ahead\r\n");
    const QUEUED: Turn = Say("250 2.0.0 queued as 1A2B\r\n");
    const BYE: Turn = Say("221 2.0.0 bye\r\n");

    /// Greeting, lettre's EHLO and mailer's own.
    fn hello() -> Vec<Turn> {
        vec![GREETING, Hear, EHLO, Hear, EHLO]
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
        /// How many connections the server has closed.
        ended: Arc<std::sync::atomic::AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start(scripts: Vec<Vec<Turn>>) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let heard = Arc::new(Mutex::new(Vec::new()));
            let all = Arc::clone(&heard);
            let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let count = Arc::clone(&ended);
            let task = tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                for script in scripts {
                    let (stream, _) = listener.accept().await.unwrap();
                    let index = {
                        let mut all = all.lock().unwrap();
                        all.push(Vec::new());
                        all.len() - 1
                    };
                    let conversation = converse(stream, script, Arc::clone(&all), index);
                    let count = Arc::clone(&count);
                    connections.spawn(async move {
                        // The stream is closed when `converse` returns.
                        conversation.await;
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    });
                }
                // One connection more than scripted is refused.
                drop(listener);
                while let Some(done) = connections.join_next().await {
                    done.expect("the scripted server's connection");
                }
            });
            Server {
                port,
                heard,
                ended,
                task,
            }
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
                HearChunk => {
                    let mut line = Vec::new();
                    read.read_until(b'\n', &mut line).await.unwrap();
                    record(&line);
                    let command = String::from_utf8(line.clone()).unwrap();
                    let size = command
                        .strip_prefix("BDAT ")
                        .and_then(|rest| rest.strip_suffix(" LAST\r\n"))
                        .and_then(|size| size.parse::<usize>().ok())
                        .unwrap_or_else(|| panic!("not a BDAT LAST: {command:?}"));
                    let mut chunk = vec![0; size];
                    read.read_exact(&mut chunk).await.unwrap();
                    record(&chunk);
                }
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
            pipelining: true,
            chunking: true,
        };
        Arc::new(Settings::new(&smtp).unwrap())
    }

    /// Settings that log in as `mailer-user` with the password `secret` (from a file kept in
    /// `dir`).
    fn settings_with_login(port: u16, dir: &tempfile::TempDir) -> Arc<Settings> {
        let password = dir.path().join("password");
        std::fs::write(&password, "secret\n").unwrap();
        let mut smtp = settings(port, 100).smtp.clone();
        smtp.auth = Some(crate::config::Auth {
            username: "mailer-user".to_owned(),
            password: crate::config::PasswordSource::File(password),
        });
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\n{}QUIT\r\n",
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
        let envelope = "EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<a@x.example>\r\nDATA\r\n";
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\n{}QUIT\r\n",
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<a@x.example>\r\nDATA\r\n"
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<gone@x.example>\r\nRSET\r\n{}QUIT\r\n",
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<grey@x.example>\r\nRSET\r\n{}{}QUIT\r\n",
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
                format!(
                    "EHLO mailer.test\r\nEHLO mailer.test\r\n{}",
                    said("a@x.example", BODY)
                ),
                format!(
                    "EHLO mailer.test\r\nEHLO mailer.test\r\n{}QUIT\r\n",
                    said("b@x.example", BODY)
                ),
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
        assert_eq!(failure.kind, FailureKind::Outage);
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<a@x.example>\r\n",
                "EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\n",
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\n"
                    .to_owned(),
                format!(
                    "EHLO mailer.test\r\nEHLO mailer.test\r\n{}QUIT\r\n",
                    said("a@x.example", BODY)
                ),
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
            assert_eq!(failure.kind, FailureKind::Outage);
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
        assert_eq!(failure.kind, FailureKind::Outage);
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
        assert_eq!(failure.kind, FailureKind::Outage);
        drop(connection);
        let heard = server.finish().await;
        assert_eq!(
            heard,
            ["EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nQUIT\r\n"]
        );
    }

    #[tokio::test]
    async fn multi_line_replies_and_replies_split_across_writes_are_read_whole() {
        let server = Server::start(vec![vec![
            Say("220-sink.test ESMTP\r\n220 "),
            Pause,
            Say("welcome\r\n"),
            Hear,
            // 8BITMIME is offered in the middle of a reply cut in three, to lettre's EHLO and
            // to mailer's own.
            Say("250-sink.te"),
            Pause,
            Say("st\r\n250-8BIT"),
            Pause,
            Say("MIME\r\n250 SIZE 1000000\r\n"),
            Hear,
            Say("250-sink.test\r\n250-8BIT"),
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\n\
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
        assert_eq!(
            server.finish().await,
            ["EHLO mailer.test\r\nEHLO mailer.test\r\nQUIT\r\n"]
        );
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
                    "EHLO mailer.test\r\nEHLO mailer.test\r\n{}{}QUIT\r\n",
                    said("a@x.example", BODY),
                    said("b@x.example", BODY)
                ),
                format!(
                    "EHLO mailer.test\r\nEHLO mailer.test\r\n{}QUIT\r\n",
                    said("c@x.example", BODY)
                ),
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
                "EHLO mailer.test\r\nEHLO mailer.test\r\nMAIL FROM:<news@sender.example>\r\nRCPT TO:<a@x.example>\r\n"
                    .to_owned(),
                format!("EHLO mailer.test\r\nEHLO mailer.test\r\n{}QUIT\r\n", said("b@x.example", BODY)),
            ]
        );
    }

    /// PIPELINING offered: MAIL, RCPT and DATA in one write.
    const PIPELINING: Turn =
        Say("250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n");
    /// PIPELINING and CHUNKING offered: the whole transaction in one write.
    const CHUNKING: Turn = Say(
        "250-sink.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n",
    );
    const HELLO: &str = "EHLO mailer.test\r\nEHLO mailer.test\r\n";

    /// Greeting, lettre's EHLO and mailer's own, which offers `offers`.
    fn hello_with(offers: Turn) -> Vec<Turn> {
        vec![GREETING, Hear, offers, Hear, offers]
    }

    /// MAIL, RCPT and DATA, as one pipelined write.
    fn batch(to: &str) -> String {
        format!("MAIL FROM:<news@sender.example>\r\nRCPT TO:<{to}>\r\nDATA\r\n")
    }

    /// A chunked transaction: MAIL, RCPT, `BDAT <size> LAST` and the message as it is.
    fn chunk(to: &str, message: &str) -> String {
        format!(
            "MAIL FROM:<news@sender.example>\r\nRCPT TO:<{to}>\r\nBDAT {} LAST\r\n{message}",
            message.len()
        )
    }

    /// A pipelined transaction the server takes: it reads all three commands before it
    /// answers any (a client that waited for a reply would wait here until it timed out).
    fn pipelined_accepted() -> Vec<Turn> {
        vec![Hear, Hear, Hear, OK, OK, GO_AHEAD, HearBody, QUEUED]
    }

    /// A chunked transaction the server takes.
    fn chunked_accepted() -> Vec<Turn> {
        vec![Hear, Hear, HearChunk, OK, OK, QUEUED]
    }

    #[tokio::test]
    async fn with_pipelining_mail_rcpt_and_data_go_together_and_the_body_waits_for_the_record() {
        let server = Server::start(vec![
            [hello_with(PIPELINING), pipelined_accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Held);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        let (result, ()) = tokio::join!(deliver(&mut connection, &journal, &message), async {
            while !server.heard(0).contains("DATA\r\n") {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(journal.events(), [Event::InFlight(1)]);
            // The three replies are in; the body waits for the record.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(server.heard(0), format!("{HELLO}{}", batch("a@x.example")));
            journal.release(&Ok(()));
        });
        assert_eq!(
            result.unwrap(),
            attempt(State::Sent, 250, "2.0.0 queued as 1A2B")
        );
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [format!("{HELLO}{}QUIT\r\n", said("a@x.example", BODY))]
        );
    }

    #[tokio::test]
    async fn with_pipelining_every_reply_is_read_and_a_refused_rcpt_is_the_outcome() {
        let reset = Say("250 2.0.0 reset\r\n");
        let no_user = Say("550 5.1.1 no such user\r\n");
        let server = Server::start(vec![
            [
                hello_with(PIPELINING),
                // RCPT refused, and DATA for want of a recipient.
                vec![
                    Hear,
                    Hear,
                    Hear,
                    OK,
                    no_user,
                    Say("554 5.5.1 no valid recipients\r\n"),
                ],
                vec![Hear, reset],
                // RCPT refused, and yet 354 for DATA: a lone dot ends the empty message.
                vec![Hear, Hear, Hear, OK, no_user, GO_AHEAD],
                vec![Hear, Say("554 5.5.1 no valid recipients\r\n"), Hear, reset],
                // DATA refused for now.
                vec![
                    Hear,
                    Hear,
                    Hear,
                    OK,
                    OK,
                    Say("451 4.3.0 try again later\r\n"),
                ],
                vec![Hear, reset],
                pipelined_accepted(),
                quit(),
            ]
            .concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let outcomes = [
            (
                "gone@x.example",
                attempt(State::Failed, 550, "5.1.1 no such user"),
            ),
            (
                "left@x.example",
                attempt(State::Failed, 550, "5.1.1 no such user"),
            ),
            (
                "later@x.example",
                attempt(State::Deferred, 451, "4.3.0 try again later"),
            ),
            (
                "a@x.example",
                attempt(State::Sent, 250, "2.0.0 queued as 1A2B"),
            ),
        ];
        for (line, (to, expected)) in (1..).zip(&outcomes) {
            let message = with_bytes(line, to, BODY);
            assert_eq!(
                deliver(&mut connection, &journal, &message).await.unwrap(),
                *expected,
                "{to}"
            );
        }
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [format!(
                "{HELLO}{}RSET\r\n{}.\r\nRSET\r\n{}RSET\r\n{}QUIT\r\n",
                batch("gone@x.example"),
                batch("left@x.example"),
                batch("later@x.example"),
                said("a@x.example", BODY)
            )]
        );
        let recorded: Vec<Event> = (1..=4).map(Event::InFlight).collect();
        assert_eq!(journal.events(), recorded);
    }

    #[tokio::test]
    async fn with_pipelining_a_354_after_a_reply_out_of_step_gets_no_end_of_data() {
        // A 3xx to MAIL: out of step. The relay says 354 to DATA and waits for a message; a
        // lone dot could deliver an empty one before the journal has the recipient, so the
        // connection is dropped instead, and the message goes on a new one.
        let server = Server::start(vec![
            [
                hello_with(PIPELINING),
                vec![Hear, Hear, Hear, Say("354 odd\r\n"), OK, GO_AHEAD],
            ]
            .concat(),
            [hello_with(PIPELINING), pipelined_accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        assert_eq!(
            deliver(&mut connection, &journal, &message)
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
                format!("{HELLO}{}", batch("a@x.example")),
                format!("{HELLO}{}QUIT\r\n", said("a@x.example", BODY)),
            ]
        );
    }

    #[tokio::test]
    async fn with_pipelining_the_sender_refused_is_a_relay_failure_after_every_reply() {
        let server = Server::start(vec![
            [
                hello_with(PIPELINING),
                vec![
                    Hear,
                    Hear,
                    Hear,
                    Say("553 5.7.1 sender not allowed\r\n"),
                    Say("503 5.5.1 need MAIL command\r\n"),
                    Say("503 5.5.1 need RCPT command\r\n"),
                ],
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
        let heard = server.finish().await;
        // QUIT after the three replies, in step.
        assert_eq!(heard, [format!("{HELLO}{}QUIT\r\n", batch("a@x.example"))]);
    }

    #[tokio::test]
    async fn with_pipelining_a_hang_up_before_the_body_is_retried_and_a_421_is_not() {
        let server = Server::start(vec![
            // Gone after the batch, before any reply: nothing was taken.
            [hello_with(PIPELINING), vec![Hear, Hear, Hear, HangUp]].concat(),
            // 421 at RCPT, and the connection closed: DATA's reply never comes.
            [
                hello_with(PIPELINING),
                vec![
                    Hear,
                    Hear,
                    Hear,
                    OK,
                    Say("421 4.7.0 too busy, closing connection\r\n"),
                    HangUp,
                ],
            ]
            .concat(),
            [hello_with(PIPELINING), pipelined_accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let first = with_bytes(1, "a@x.example", BODY);
        let next = with_bytes(2, "b@x.example", BODY);
        assert_eq!(
            deliver(&mut connection, &journal, &first).await.unwrap(),
            attempt(State::Deferred, 421, "4.7.0 too busy, closing connection")
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
        assert_eq!(
            heard,
            [
                format!("{HELLO}{}", batch("a@x.example")),
                format!("{HELLO}{}", batch("a@x.example")),
                format!("{HELLO}{}QUIT\r\n", said("b@x.example", BODY)),
            ]
        );
        assert_eq!(journal.events(), [Event::InFlight(1), Event::InFlight(2)]);
    }

    #[tokio::test]
    async fn with_chunking_the_transaction_is_one_write_after_the_record_and_is_not_dot_stuffed() {
        let dots = "From: news@sender.example\r\nTo: a@x.example\r\nSubject: Dots\r\n\r\n\
                    .hidden\r\n..two\r\n.\r\nend\r\n";
        let unended = "From: news@sender.example\r\nTo: b@x.example\r\n\r\nno line end";
        let server = Server::start(vec![
            [
                hello_with(CHUNKING),
                chunked_accepted(),
                chunked_accepted(),
                quit(),
            ]
            .concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Held);
        let mut connection = Connection::new(settings(server.port, 100));
        let message = with_bytes(1, "a@x.example", dots);
        let (result, ()) = tokio::join!(deliver(&mut connection, &journal, &message), async {
            while journal.events().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Recorded, not durable yet: nothing of the transaction goes.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(server.heard(0), HELLO);
            journal.release(&Ok(()));
        });
        assert_eq!(
            result.unwrap(),
            attempt(State::Sent, 250, "2.0.0 queued as 1A2B")
        );
        // A message must end with a line end (RFC 3030 §2): one is added.
        let second = with_bytes(2, "b@x.example", unended);
        let (result, ()) = tokio::join!(deliver(&mut connection, &journal, &second), async {
            while journal.events().len() < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            journal.release(&Ok(()));
        });
        assert_eq!(result.unwrap().state, State::Sent);
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [format!(
                "{HELLO}{}{}QUIT\r\n",
                chunk("a@x.example", dots),
                chunk("b@x.example", &format!("{unended}\r\n"))
            )]
        );
    }

    #[tokio::test]
    async fn with_chunking_refusals_are_the_outcome_and_the_connection_goes_on() {
        let reset = Say("250 2.0.0 reset\r\n");
        let server = Server::start(vec![
            [
                hello_with(CHUNKING),
                // RCPT refused: the relay drops the chunk.
                vec![
                    Hear,
                    Hear,
                    HearChunk,
                    OK,
                    Say("550 5.1.1 no such user\r\n"),
                    Say("554 5.5.1 no valid recipients\r\n"),
                    Hear,
                    reset,
                ],
                // The message refused, for now and for good.
                vec![
                    Hear,
                    Hear,
                    HearChunk,
                    OK,
                    OK,
                    Say("452 4.3.1 storage full\r\n"),
                ],
                vec![Hear, reset],
                vec![Hear, Hear, HearChunk, OK, OK, Say("554 5.6.0 refused\r\n")],
                vec![Hear, reset],
                chunked_accepted(),
                // The sender refused: the relay's problem, not the recipient's.
                vec![
                    Hear,
                    Hear,
                    HearChunk,
                    Say("553 5.7.1 sender not allowed\r\n"),
                    Say("503 5.5.1 need MAIL command\r\n"),
                    Say("503 5.5.1 need MAIL command\r\n"),
                ],
                quit(),
            ]
            .concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let outcomes = [
            (
                "gone@x.example",
                attempt(State::Failed, 550, "5.1.1 no such user"),
            ),
            (
                "full@x.example",
                attempt(State::Deferred, 452, "4.3.1 storage full"),
            ),
            ("no@x.example", attempt(State::Failed, 554, "5.6.0 refused")),
            (
                "a@x.example",
                attempt(State::Sent, 250, "2.0.0 queued as 1A2B"),
            ),
        ];
        for (line, (to, expected)) in (1..).zip(&outcomes) {
            let message = with_bytes(line, to, BODY);
            assert_eq!(
                deliver(&mut connection, &journal, &message).await.unwrap(),
                *expected,
                "{to}"
            );
        }
        let last = with_bytes(5, "b@x.example", BODY);
        let failure = relay_failure(deliver(&mut connection, &journal, &last).await);
        assert_eq!(
            failure.reason,
            "the relay refused the sender `news@sender.example`: 553 5.7.1 sender not allowed"
        );
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [format!(
                "{HELLO}{}RSET\r\n{}RSET\r\n{}RSET\r\n{}{}QUIT\r\n",
                chunk("gone@x.example", BODY),
                chunk("full@x.example", BODY),
                chunk("no@x.example", BODY),
                chunk("a@x.example", BODY),
                chunk("b@x.example", BODY),
            )]
        );
    }

    #[tokio::test]
    async fn with_chunking_a_hang_up_after_the_write_is_ambiguous_unless_a_reply_refused() {
        let server = Server::start(vec![
            // Gone before any reply.
            [hello_with(CHUNKING), vec![Hear, Hear, HearChunk, HangUp]].concat(),
            // Gone before the reply to BDAT.
            [
                hello_with(CHUNKING),
                vec![Hear, Hear, HearChunk, OK, OK, HangUp],
            ]
            .concat(),
            // RCPT refused, then gone: the message went nowhere.
            [
                hello_with(CHUNKING),
                vec![
                    Hear,
                    Hear,
                    HearChunk,
                    OK,
                    Say("550 5.1.1 no such user\r\n"),
                    HangUp,
                ],
            ]
            .concat(),
            [hello_with(CHUNKING), chunked_accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let unknown = Attempt::without_reply(
            State::Ambiguous,
            "no reply after the message went with BDAT: MAIL FROM: incomplete response",
        );
        let unknown_at_bdat = Attempt::without_reply(
            State::Ambiguous,
            "no reply after the message went with BDAT: BDAT: incomplete response",
        );
        let outcomes = [
            ("a@x.example", unknown),
            ("b@x.example", unknown_at_bdat),
            (
                "gone@x.example",
                attempt(State::Failed, 550, "5.1.1 no such user"),
            ),
            (
                "c@x.example",
                attempt(State::Sent, 250, "2.0.0 queued as 1A2B"),
            ),
        ];
        for (line, (to, expected)) in (1..).zip(&outcomes) {
            let message = with_bytes(line, to, BODY);
            assert_eq!(
                deliver(&mut connection, &journal, &message).await.unwrap(),
                *expected,
                "{to}"
            );
        }
        connection.quit().await;
        let heard = server.finish().await;
        // None is sent again; each next one goes on a new connection.
        assert_eq!(
            heard,
            [
                format!("{HELLO}{}", chunk("a@x.example", BODY)),
                format!("{HELLO}{}", chunk("b@x.example", BODY)),
                format!("{HELLO}{}", chunk("gone@x.example", BODY)),
                format!("{HELLO}{}QUIT\r\n", chunk("c@x.example", BODY)),
            ]
        );
        let recorded: Vec<Event> = (1..=4).map(Event::InFlight).collect();
        assert_eq!(journal.events(), recorded);
    }

    #[tokio::test]
    async fn a_connection_the_relay_closed_while_idle_is_not_written_to_on_any_wire() {
        let timeout = Say("421 4.4.2 sink.test Error: timeout exceeded\r\n");
        let wires = [
            (EHLO, accepted(), said as fn(&str, &str) -> String),
            (PIPELINING, pipelined_accepted(), said),
            (CHUNKING, chunked_accepted(), chunk),
        ];
        for (offers, accepted, sent) in wires {
            // The relay closes the connection between two messages: silently, or as Postfix
            // does after `smtpd_timeout`, with a 421 first. Written to, the closed connection
            // would leave the message ambiguous (BDAT) or pause the relay (a 421 read as MAIL's
            // reply); the message goes on a new connection instead.
            for closing in [vec![HangUp], vec![timeout, HangUp]] {
                let case = format!("{offers:?} then {closing:?}");
                let server = Server::start(vec![
                    [hello_with(offers), accepted.clone(), closing].concat(),
                    [hello_with(offers), accepted.clone(), quit()].concat(),
                ])
                .await;
                let journal = Journal::new(Durable::Yes);
                let mut connection = Connection::new(settings(server.port, 100));
                let first = with_bytes(1, "a@x.example", BODY);
                let next = with_bytes(2, "b@x.example", BODY);
                let first = deliver(&mut connection, &journal, &first).await.unwrap();
                assert_eq!(first.state, State::Sent, "{case}");
                // The server has hung up after its reply; the client has not noticed yet.
                while server.ended.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let next = deliver(&mut connection, &journal, &next).await.unwrap();
                assert_eq!(next.state, State::Sent, "{case}");
                connection.quit().await;
                assert_eq!(
                    server.finish().await,
                    [
                        format!("{HELLO}{}", sent("a@x.example", BODY)),
                        format!("{HELLO}{}QUIT\r\n", sent("b@x.example", BODY)),
                    ],
                    "{case}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_421_to_mail_goes_again_on_a_new_connection_even_after_a_bdat_write() {
        let closing = Say("421 4.7.0 too many messages in this session\r\n");
        for (offers, refused, accepted, sent) in [
            (
                EHLO,
                vec![Hear, closing, HangUp],
                accepted(),
                said("a@x.example", BODY),
            ),
            (
                PIPELINING,
                vec![Hear, Hear, Hear, closing, HangUp],
                pipelined_accepted(),
                said("a@x.example", BODY),
            ),
            // MAIL refused: the relay cannot have taken the message that followed it.
            (
                CHUNKING,
                vec![Hear, Hear, HearChunk, closing, HangUp],
                chunked_accepted(),
                chunk("a@x.example", BODY),
            ),
        ] {
            let server = Server::start(vec![
                [hello_with(offers), refused].concat(),
                [hello_with(offers), accepted, quit()].concat(),
            ])
            .await;
            let journal = Journal::new(Durable::Yes);
            let mut connection = Connection::new(settings(server.port, 100));
            let message = with_bytes(1, "a@x.example", BODY);
            assert_eq!(
                deliver(&mut connection, &journal, &message)
                    .await
                    .unwrap()
                    .state,
                State::Sent
            );
            connection.quit().await;
            let heard = server.finish().await;
            assert_eq!(heard[1], format!("{HELLO}{sent}QUIT\r\n"));
            assert_eq!(journal.events(), [Event::InFlight(1)]);
        }
    }

    #[tokio::test]
    async fn with_chunking_a_hang_up_while_the_record_is_synced_is_seen_before_the_write() {
        let mut first = [hello_with(CHUNKING), chunked_accepted()].concat();
        first.extend([Pause, Pause, Pause, HangUp]);
        let server = Server::start(vec![
            first,
            [hello_with(CHUNKING), chunked_accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Held);
        let mut connection = Connection::new(settings(server.port, 100));
        let one = with_bytes(1, "a@x.example", BODY);
        let two = with_bytes(2, "b@x.example", BODY);
        let (result, ()) = tokio::join!(deliver(&mut connection, &journal, &one), async {
            while journal.events().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            journal.release(&Ok(()));
        });
        assert_eq!(result.unwrap().state, State::Sent);
        // The second record waits for its sync while the relay hangs up.
        let (result, ()) = tokio::join!(deliver(&mut connection, &journal, &two), async {
            while journal.events().len() < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            while server.ended.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            journal.release(&Ok(()));
        });
        assert_eq!(result.unwrap().state, State::Sent);
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [
                format!("{HELLO}{}", chunk("a@x.example", BODY)),
                format!("{HELLO}{}QUIT\r\n", chunk("b@x.example", BODY)),
            ]
        );
    }

    #[tokio::test]
    async fn with_chunking_replies_out_of_step_leave_the_message_ambiguous_and_the_connection() {
        let server = Server::start(vec![
            // 354 to BDAT: no relay says that; this one may wait for data.
            [
                hello_with(CHUNKING),
                vec![Hear, Hear, HearChunk, OK, OK, GO_AHEAD],
            ]
            .concat(),
            // The recipient refused, and yet the message taken.
            [
                hello_with(CHUNKING),
                vec![
                    Hear,
                    Hear,
                    HearChunk,
                    OK,
                    Say("550 5.1.1 no such user\r\n"),
                    QUEUED,
                ],
            ]
            .concat(),
            [hello_with(CHUNKING), chunked_accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let outcomes = [
            (
                "a@x.example",
                Attempt::without_reply(
                    State::Ambiguous,
                    "no reply after the message went with BDAT: BDAT: 354 go ahead where 2xx was due",
                ),
            ),
            (
                "b@x.example",
                Attempt::without_reply(
                    State::Ambiguous,
                    "the relay took the message (250 2.0.0 queued as 1A2B) after refusing part of its transaction",
                ),
            ),
            (
                "c@x.example",
                attempt(State::Sent, 250, "2.0.0 queued as 1A2B"),
            ),
        ];
        for (line, (to, expected)) in (1..).zip(&outcomes) {
            let message = with_bytes(line, to, BODY);
            assert_eq!(
                deliver(&mut connection, &journal, &message).await.unwrap(),
                *expected,
                "{to}"
            );
        }
        connection.quit().await;
        // Each next message on a new connection.
        assert_eq!(server.finish().await.len(), 3);
    }

    #[tokio::test]
    async fn with_chunking_a_hang_up_in_the_middle_of_the_write_goes_again_on_a_new_connection() {
        // Exim's way at its limit of messages per connection: 421 to MAIL, and it hangs up
        // while the rest of a large message is still being written.
        let server = Server::start(vec![
            [
                hello_with(CHUNKING),
                vec![Hear, Say("421 4.7.0 too many messages\r\n"), HangUp],
            ]
            .concat(),
            [hello_with(CHUNKING), chunked_accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let line = format!("{}\r\n", "x".repeat(900));
        let large = format!("{BODY}{}", line.repeat(9_000));
        let message = with_bytes(1, "a@x.example", &large);
        assert_eq!(
            deliver(&mut connection, &journal, &message)
                .await
                .unwrap()
                .state,
            State::Sent
        );
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard[1],
            format!("{HELLO}{}QUIT\r\n", chunk("a@x.example", &large))
        );
        assert_eq!(journal.events(), [Event::InFlight(1)]);
    }

    #[tokio::test]
    async fn a_write_that_fails_once_a_read_has_begun_is_not_the_message_failing() {
        // TLS writes an alert when a read goes wrong: that write failing says nothing about
        // whether the message mailer wrote before it left whole.
        use std::io::Write as _;
        use tokio::io::AsyncWriteExt as _;
        for read_first in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let tcp = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (relay, _) = listener.accept().await.unwrap();
            let (mut stream, watch) = guarded(tcp).unwrap();
            stream
                .write_all(b"MAIL FROM:<a@x.example>\r\n")
                .await
                .unwrap();
            if read_first {
                let mut byte = [0u8; 1];
                let nothing =
                    tokio::time::timeout(Duration::from_millis(5), stream.read(&mut byte)).await;
                assert!(nothing.is_err(), "the relay said nothing");
            }
            // The relay goes; bytes written past mailer's stream draw its reset, after which
            // every write fails.
            drop(relay);
            for _ in 0..1000 {
                if (&watch.socket).write(b"x").is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(
                stream
                    .write_all(b"RCPT TO:<b@x.example>\r\n")
                    .await
                    .is_err()
            );
            assert_eq!(
                watch.write_failed.load(Ordering::SeqCst),
                !read_first,
                "read first: {read_first}"
            );
        }
    }

    #[tokio::test]
    async fn a_relay_that_talks_without_end_is_cut_off() {
        // A reply line that never ends: lettre would read it whole before judging its length.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = std::thread::spawn(move || {
            use std::io::{BufRead as _, Write as _};
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            writer.write_all(b"220 sink.test ESMTP\r\n250-").unwrap();
            let mut ehlo = String::new();
            reader.read_line(&mut ehlo).unwrap();
            let piece = vec![b'x'; 64 << 10];
            let mut sent = 0;
            while writer.write_all(&piece).is_ok() {
                sent += piece.len();
            }
            sent
        });
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(port, 100));
        let message = with_bytes(1, "a@x.example", BODY);
        let failure = relay_failure(deliver(&mut connection, &journal, &message).await);
        assert_eq!(failure.kind, FailureKind::Outage);
        assert!(
            failure
                .reason
                .contains(&format!("more than {READ_CAP} bytes without being asked")),
            "{}",
            failure.reason
        );
        assert!(journal.events().is_empty());
        drop(connection);
        // It stopped once mailer let go; what it sent is bounded by the cap and the buffers.
        assert!(relay.join().unwrap() > READ_CAP);
    }

    #[tokio::test]
    async fn a_message_over_the_relays_size_limit_fails_without_a_transaction() {
        const SMALL: Turn = Say("250-sink.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n");
        let server = Server::start(vec![
            [hello_with(SMALL), pipelined_accepted(), quit()].concat(),
        ])
        .await;
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings(server.port, 100));
        let big = with_bytes(
            1,
            "big@x.example",
            &format!("{BODY}{}\r\n", "x".repeat(100)),
        );
        let small = with_bytes(2, "a@x.example", "Subject: s\r\n\r\nHi.\r\n");
        assert_eq!(
            deliver(&mut connection, &journal, &big).await.unwrap(),
            Attempt::without_reply(
                State::Failed,
                format!(
                    "the message is {} bytes, and the relay takes at most 100 (SIZE)",
                    big.bytes.len()
                )
            )
        );
        assert_eq!(
            deliver(&mut connection, &journal, &small)
                .await
                .unwrap()
                .state,
            State::Sent
        );
        connection.quit().await;
        let heard = server.finish().await;
        assert_eq!(
            heard,
            [format!(
                "{HELLO}{}QUIT\r\n",
                said("a@x.example", "Subject: s\r\n\r\nHi.\r\n")
            )]
        );
        assert_eq!(journal.events(), [Event::InFlight(2)]);
    }

    #[tokio::test]
    async fn no_auth_mechanism_in_common_is_a_configuration_failure_naming_what_the_relay_offers() {
        const OFFERS: Turn =
            Say("250-sink.test\r\n250-AUTH CRAM-MD5 DIGEST-MD5\r\n250 8BITMIME\r\n");
        // lettre's EHLO and mailer's own, whose reply lists the mechanisms for the message.
        let server =
            Server::start(vec![vec![GREETING, Hear, OFFERS, Hear, OFFERS, Hear, BYE]]).await;
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings_with_login(server.port, &dir));
        let message = with_bytes(1, "a@x.example", BODY);
        let failure = relay_failure(deliver(&mut connection, &journal, &message).await);
        assert_eq!(failure.kind, FailureKind::Config);
        assert_eq!(
            failure.reason,
            format!(
                "the relay at `127.0.0.1:{}` offers AUTH CRAM-MD5 DIGEST-MD5 and mailer speaks \
                 PLAIN and LOGIN: enable one of them on the relay",
                server.port
            )
        );
        drop(connection);
        // No AUTH was tried, and no message.
        assert_eq!(
            server.finish().await,
            ["EHLO mailer.test\r\nEHLO mailer.test\r\nQUIT\r\n"]
        );
        assert!(journal.events().is_empty());
    }

    #[test]
    fn without_auth_the_message_says_whether_tls_would_bring_it() {
        let place = "relay.test:25";
        assert_eq!(
            no_common_mechanism(place, &[], false, true),
            "the relay at `relay.test:25` offers AUTH only after STARTTLS, which \
             `dangerous_plaintext = true` turns off: remove `dangerous_plaintext`"
        );
        for (encrypted, before) in [(false, " before TLS"), (true, "")] {
            assert_eq!(
                no_common_mechanism(place, &[], encrypted, false),
                format!(
                    "the relay at `relay.test:25` offers no AUTH{before}: remove `username` and \
                     the password if it needs no login, or enable AUTH PLAIN or LOGIN on the relay"
                )
            );
        }
        assert_eq!(
            auth_mechanisms(
                [
                    "sink.test",
                    "PIPELINING",
                    "auth cram-md5 SCRAM-SHA-256",
                    "SIZE 100"
                ]
                .into_iter()
            ),
            ["cram-md5", "SCRAM-SHA-256"]
        );
    }

    #[tokio::test]
    async fn a_refused_login_is_a_configuration_failure() {
        const OFFERS: Turn = Say("250-sink.test\r\n250 AUTH PLAIN LOGIN\r\n");
        let server = Server::start(vec![vec![
            GREETING,
            Hear,
            OFFERS,
            Hear,
            OFFERS,
            Hear,
            Say("535 5.7.8 authentication failed\r\n"),
        ]])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(Durable::Yes);
        let mut connection = Connection::new(settings_with_login(server.port, &dir));
        let message = with_bytes(1, "a@x.example", BODY);
        let failure = relay_failure(deliver(&mut connection, &journal, &message).await);
        assert_eq!(failure.kind, FailureKind::Config);
        assert_eq!(
            failure.reason,
            format!(
                "the relay at `127.0.0.1:{}` refused mailer's login: 535 5.7.8 authentication \
                 failed; check `username` and the password",
                server.port
            )
        );
        assert!(!failure.reason.contains("secret"));
        drop(connection);
        let heard = server.finish().await;
        assert!(
            heard[0].starts_with("EHLO mailer.test\r\nEHLO mailer.test\r\nAUTH PLAIN "),
            "{heard:?}"
        );
        assert!(journal.events().is_empty());
    }

    #[test]
    fn dot_stuffing_doubles_every_leading_dot_and_ends_with_the_lone_dot() {
        // Line by line, as RFC 5321 §4.5.2 says it: the reference the writer must agree with.
        let reference = |text: &str| {
            let lines: Vec<String> = text
                .split("\r\n")
                .map(|line| {
                    if line.starts_with('.') {
                        format!(".{line}")
                    } else {
                        line.to_owned()
                    }
                })
                .collect();
            format!("{}\r\n.\r\n", lines.join("\r\n"))
        };
        for text in [
            "",
            ".",
            ".\r\n",
            "..\r\n",
            "a\r\n.\r\n..b\r\n. c\r\n",
            ".start\r\nmiddle . dot\r\n\r\n.\r\nend",
            "no line end",
            "\r\n\r\n.\r\n\r\n",
        ] {
            assert_eq!(DotStuffed(text).to_string(), reference(text), "{text:?}");
        }
    }

    #[test]
    fn web_addresses_are_taken_out_of_error_texts() {
        // rustls' text when a peer hangs up without close_notify.
        let rustls = "peer closed connection without sending TLS close_notify: \
                      https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof";
        assert_eq!(
            without_urls(&rustls),
            "peer closed connection without sending TLS close_notify"
        );
        assert_eq!(
            without_urls(&"connection refused (os error 111)"),
            "connection refused (os error 111)"
        );
    }

    #[test]
    fn a_refused_certificate_says_who_refused_what_and_the_fix() {
        use rustls::CertificateError as E;
        let says = |why: E| certificate_refused("relay.test:587", "relay.test", &why);
        assert_eq!(
            says(E::UnknownIssuer),
            "mailer refused the certificate of the relay at `relay.test:587`: no trusted CA \
             signed it; give the CA that signed it in `ca_file` (for a self-signed certificate, \
             the certificate itself, made as the README shows)"
        );
        assert_eq!(
            says(E::NotValidForName),
            "mailer refused the certificate of the relay at `relay.test:587`: it is not made \
             out to `relay.test`; put a name the certificate lists in `url`, or give the relay a \
             certificate that lists this one"
        );
        assert!(says(E::Expired).contains(": it has expired; renew the relay's certificate"));
    }
}
