//! An in-process SMTP sink on 127.0.0.1:0 that records every envelope and message and can
//! script its replies. It runs on its own thread and runtime, so the code under test (the real
//! binary, or `mailer::run` with its own runtime) talks to it like to any server.
//!
//! It is as strict as Postfix's smtpd (3.7, checked against a private instance) wherever a
//! client bug could hide, and stricter where Postfix would quietly repair what it relays:
//!
//! - CRLF only: a bare LF ends nothing and a bare CR is no line end (a command line ending in a
//!   bare LF is refused and the connection closed, a message with one is refused at its end,
//!   as `smtpd_forbid_bare_newline = reject` does);
//! - a command line holds at most 2,048 octets before its CRLF (Postfix's `line_length_limit`;
//!   RFC 5321 says 512, Postfix reads up to 2,048 and cuts the rest), a message line at most
//!   998 (RFC 5321 §4.5.3.1.6: Postfix takes longer ones but breaks them when it relays);
//! - `SIZE 10240000` offered, a larger `MAIL FROM … SIZE=` or message refused with 552;
//! - `PIPELINING` offered (unless [`Faults::wire`] says [`Wire::Serial`]) and its rules kept:
//!   nothing may follow EHLO, DATA, AUTH, STARTTLS, NOOP or QUIT before their reply (RFC 2920
//!   §3.1), nor any command when it is not offered; replies to pipelined commands go out
//!   together, in one write, as Postfix's do;
//! - `CHUNKING` (RFC 3030) when [`Wire::Chunking`] offers it: `BDAT <size> [LAST]` reads exactly
//!   `size` octets after the command line, whatever it answers (a refused chunk is skipped, as
//!   Postfix does), may be pipelined, and its replies go out with those before them; a
//!   malformed BDAT, or one when CHUNKING is not offered, is answered 521 and the connection
//!   closed (Postfix's way: where the chunk ends is then anyone's guess); DATA after BDAT in a
//!   transaction is refused; once a chunk of a transaction is refused, the next are discarded
//!   (551) until LAST, which ends the transaction, refused or not;
//! - commands in order: MAIL after EHLO (as `smtpd_helo_required = yes`), RCPT in a
//!   transaction, DATA or BDAT with a recipient (554 when every one was refused), no nested
//!   MAIL;
//! - EHLO again after STARTTLS, which forgets the EHLO, the login and the transaction
//!   (RFC 3207 §4.2), and plain text sent after STARTTLS is discarded;
//! - with STARTTLS offered, AUTH only after it (`smtpd_tls_auth_only = yes`), before it 538
//!   5.7.11 as RFC 4954 says (Postfix answers 503 5.5.1 "authentication not enabled"); AUTH
//!   PLAIN and LOGIN, with or without an initial response;
//! - every data line's leading dot removed after DATA (RFC 5321 §4.5.2), so an unstuffed `.x`
//!   arrives as `x`; chunks kept byte for byte (nothing is stuffed in BDAT), and held to the
//!   rules of a message after DATA: CRLF line ends (a bare LF refused with 550 at LAST), 998
//!   octets a line, and the whole ended by CRLF (RFC 3030 §3; Postfix adds one, the sink
//!   calls it a violation); 8-bit data only with `BODY=8BITMIME` (or `SMTPUTF8`), non-ASCII
//!   addresses only with `SMTPUTF8`;
//! - the greeting and some refusals (552, 554) span several lines; 421 closes the connection.
//!
//! What the client did wrong is kept as a [`Violation`]; dropping the sink fails the test when
//! there was one nobody took with [`Sink::violations`].

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The largest message the sink takes, offered as `SIZE`: Postfix's `message_size_limit`.
pub const SIZE_LIMIT: usize = 10_240_000;
/// The longest command line, CRLF not counted: Postfix's `line_length_limit`.
pub const COMMAND_LINE_LIMIT: usize = 2048;
/// The longest line of a message, CRLF not counted (RFC 5321 §4.5.3.1.6).
pub const TEXT_LINE_LIMIT: usize = 998;
/// The pause between the pieces of a reply written in pieces ([`Faults::split_replies`]).
const SPLIT_PAUSE: Duration = Duration::from_millis(3);

/// Where in the transaction a scripted reply applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Greeting,
    /// The reply to EHLO: a script may replace the list of extensions, and the sink then holds
    /// the client to what that list offers.
    Ehlo,
    /// The reply to AUTH PLAIN or LOGIN once the credentials are in (they are recorded either
    /// way).
    Auth,
    Mail,
    Rcpt,
    /// The reply to DATA (never asked for a message sent with BDAT).
    Data,
    /// While the body comes in: `DROP` hangs up after its first line, before the final dot;
    /// with BDAT, asked at every chunk the sink takes, `DROP` hangs up halfway through the
    /// chunk. Either way before any reply, and no [`Transaction`] is recorded.
    Body,
    /// The reply to the final dot, or to `BDAT … LAST`: `DROP` hangs up once the whole message
    /// is in (it is recorded).
    EndOfData,
}

/// What the sink offers of the extensions that change how a transaction goes on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wire {
    /// Neither PIPELINING nor CHUNKING: one command, one reply.
    Serial,
    /// PIPELINING (RFC 2920), as Postfix's `smtp-sink`.
    #[default]
    Pipelining,
    /// PIPELINING and CHUNKING (RFC 3030), as Postfix's `smtpd`.
    Chunking,
}

impl Wire {
    /// Every mode, for a test that runs in each.
    pub const ALL: [Wire; 3] = [Wire::Serial, Wire::Pipelining, Wire::Chunking];
}

/// Decides a reply: `None` for the normal one, `Some("550 5.1.1 no")` to refuse, `Some("DROP")`
/// to close the connection without a word, `Some("SLEEP 300 250 ok")` to wait 300 ms first
/// (`SLEEP 300 DROP` works too). The `&str` is the recipient, once there is one.
///
/// A reply may have several lines, separated by `\n` or `\r\n`, each with or without its code
/// (`"550 5.1.1 no such user\nsee https://…"`): the sink writes them as one multi-line reply,
/// `550-` on every line but the last. A 421 closes the connection after it is written.
pub type Script = Arc<dyn Fn(Phase, &str) -> Option<String> + Send + Sync>;

/// How the sink offers TLS.
#[derive(Clone, Default)]
pub enum Tls {
    /// Plain text only; STARTTLS is not advertised, AUTH is.
    #[default]
    None,
    /// STARTTLS advertised, with this certificate; AUTH only once TLS is on.
    Starttls(TlsAcceptor),
    /// TLS from the first byte (`smtps://`).
    Implicit(TlsAcceptor),
}

/// A certificate for `localhost` signed by a CA of its own, valid from a day ago until `days`
/// and a half from now (so that it has `days` whole days left however long the test takes):
/// the acceptor (which sends the leaf and the CA) and the CA's PEM to trust it by. Names the
/// leaf `localhost relay` and the CA `mailer test CA`.
pub fn ca_signed_certificate(days: u64) -> (TlsAcceptor, String) {
    let now = mailer::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "mailer test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost relay");
    leaf.not_before = epoch + now.checked_sub(Duration::from_secs(86_400)).unwrap();
    leaf.not_after = epoch + (now + Duration::from_secs(days * 86_400 + 43_200));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone(), ca.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (TlsAcceptor::from(Arc::new(config)), ca.pem())
}

/// A self-signed certificate for `localhost`: the acceptor and the PEM to trust it by.
pub fn localhost_certificate() -> (TlsAcceptor, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let pem = certified.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    (TlsAcceptor::from(Arc::new(config)), pem)
}

/// Anything the session can run over: a plain or an encrypted stream.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One SMTP transaction that reached the end of DATA, or `BDAT … LAST`.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub connection: usize,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The message as the client meant it: after DATA, the first dot of every line that starts
    /// with one removed, line ends kept as they came; with BDAT, its chunks' octets as they
    /// came (only the first `SIZE_LIMIT + 1` of a message over the limit).
    pub data: Vec<u8>,
    /// How many BDAT chunks carried it (`BDAT 0 LAST` counts); 0: it came after DATA.
    pub chunks: usize,
    /// The reply the sink gave to the final dot or to `BDAT … LAST` (`DROP`: it hung up
    /// instead).
    pub reply: String,
    /// Whether the transaction ran over TLS.
    pub encrypted: bool,
}

/// One `RCPT TO` the sink was sent, whatever it answered.
#[derive(Debug, Clone)]
pub struct RcptAttempt {
    pub rcpt: String,
    pub reply: String,
    pub at: Instant,
}

/// Something the client sent that a real server refuses or repairs.
#[derive(Debug, Clone)]
pub struct Violation {
    pub connection: usize,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection {}: {}", self.connection, self.what)
    }
}

/// One write of the sink's, as it went on the wire.
#[derive(Debug, Clone)]
pub struct Written {
    pub connection: usize,
    pub bytes: Vec<u8>,
}

/// One session, from the connection's accept to its end.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: Instant,
    end: Option<Instant>,
    /// The sink ended it with a 421.
    closed_by_421: bool,
}

#[derive(Debug, Default)]
struct Recorded {
    connections: usize,
    /// Sessions still running.
    active: usize,
    /// Every session, by connection number − 1.
    spans: Vec<Span>,
    transactions: Vec<Transaction>,
    rcpts: Vec<RcptAttempt>,
    /// Decoded AUTH PLAIN and LOGIN credentials, as `user:password`.
    logins: Vec<String>,
    violations: Vec<Violation>,
    writes: Vec<Written>,
    /// Every command's verb, in order, with its connection (arguments left out: AUTH's hold
    /// credentials).
    commands: Vec<(usize, String)>,
    /// Every EHLO reply's extensions (its lines after the first, codes stripped).
    offers: Vec<Vec<String>>,
}

type Shared = Arc<Mutex<Recorded>>;

/// The records, whatever a panicking holder of the lock left: a test that failed must still
/// be able to report.
fn lock(shared: &Shared) -> MutexGuard<'_, Recorded> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct Sink {
    pub addr: SocketAddr,
    recorded: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Faults that are not a reply to one command.
#[derive(Clone, Copy, Default)]
pub struct Faults {
    /// Close each connection without a word after this many completed transactions, as a
    /// server that drops idle or old connections does.
    pub close_after: Option<usize>,
    /// Write every reply (or every batch of replies) in three pieces, each flushed, a few ms
    /// apart: half of its first line, the rest but the last byte, the final LF. As a reply
    /// crosses a slow or fragmenting link: the client must read until the reply is whole.
    pub split_replies: bool,
    /// Extensions added at the end of every EHLO reply, for a client that only lists them
    /// (`mailer probe`). Offered like the others: `CHUNKING` among them makes the sink take
    /// BDAT, any other's command is refused as unknown.
    pub extensions: &'static [&'static str],
    /// Whether the EHLO reply offers PIPELINING, and CHUNKING (by default PIPELINING only).
    pub wire: Wire,
    /// Answer DATA with 354 even when every RCPT was refused (RFC 2920 §3.1 allows it; Postfix
    /// says 554): the client must then end the empty message with a lone dot, and anything
    /// it sends before that dot is a violation. The dot gets the 554.
    pub go_ahead_without_recipients: bool,
}

impl Sink {
    pub fn start() -> Sink {
        Sink::scripted(Arc::new(|_, _| None))
    }

    pub fn scripted(script: Script) -> Sink {
        Sink::with(script, Tls::None)
    }

    pub fn tls(tls: Tls) -> Sink {
        Sink::with(Arc::new(|_, _| None), tls)
    }

    /// A plain-text sink that offers `wire`'s extensions.
    pub fn on_wire(script: Script, wire: Wire) -> Sink {
        let faults = Faults {
            wire,
            ..Faults::default()
        };
        Sink::faulty(script, Tls::None, faults)
    }

    pub fn with(script: Script, tls: Tls) -> Sink {
        Sink::faulty(script, tls, Faults::default())
    }

    pub fn faulty(script: Script, tls: Tls, faults: Faults) -> Sink {
        let recorded = Shared::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::clone(&recorded);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Leaving this block drops the runtime, and every session with it.
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(_) => return,
                        },
                        _ = &mut stopped => return,
                    };
                    let number = {
                        let mut recorded = lock(&state);
                        recorded.connections += 1;
                        recorded.active += 1;
                        recorded.spans.push(Span {
                            start: Instant::now(),
                            end: None,
                            closed_by_421: false,
                        });
                        recorded.connections
                    };
                    let active = Active(Arc::clone(&state), number);
                    tokio::spawn(serve(
                        stream,
                        number,
                        Arc::clone(&state),
                        Arc::clone(&script),
                        tls.clone(),
                        faults,
                        active,
                    ));
                }
            });
        });
        let addr = ready_rx.recv().unwrap();
        Sink {
            addr,
            recorded,
            stop: Some(stop),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connections(&self) -> usize {
        lock(&self.recorded).connections
    }

    /// When the last session the sink ended with a 421 ended.
    pub fn last_421_close(&self) -> Option<Instant> {
        lock(&self.recorded)
            .spans
            .iter()
            .filter(|s| s.closed_by_421)
            .filter_map(|s| s.end)
            .max()
    }

    /// The most sessions open at once at any moment from `after` on (sessions that ended by
    /// then do not count).
    pub fn max_concurrent_after(&self, after: Instant) -> usize {
        let spans = lock(&self.recorded).spans.clone();
        let open_at_start = spans
            .iter()
            .filter(|s| s.start <= after && s.end.is_none_or(|end| end > after))
            .count();
        // Starts (+1) and ends (−1) after `after`, ends first at the same instant.
        let mut changes: Vec<(Instant, i64)> = Vec::new();
        for span in spans.iter().filter(|s| s.start > after) {
            changes.push((span.start, 1));
        }
        for span in &spans {
            if let Some(end) = span.end.filter(|end| *end > after) {
                changes.push((end, -1));
            }
        }
        changes.sort();
        let mut open = i64::try_from(open_at_start).unwrap();
        let mut most = open;
        for (_, change) in changes {
            open += change;
            most = most.max(open);
        }
        usize::try_from(most).unwrap()
    }

    pub fn transactions(&self) -> Vec<Transaction> {
        lock(&self.recorded).transactions.clone()
    }

    pub fn logins(&self) -> Vec<String> {
        lock(&self.recorded).logins.clone()
    }

    pub fn rcpts(&self) -> Vec<RcptAttempt> {
        lock(&self.recorded).rcpts.clone()
    }

    /// The verbs of every command the sink was sent, in order, with their connection.
    pub fn commands(&self) -> Vec<(usize, String)> {
        lock(&self.recorded).commands.clone()
    }

    /// The extensions of every EHLO reply the sink gave, in order: `SIZE 10240000`, …
    pub fn offers(&self) -> Vec<Vec<String>> {
        lock(&self.recorded).offers.clone()
    }

    /// Every write the sink made, in order.
    pub fn writes(&self) -> Vec<Written> {
        lock(&self.recorded).writes.clone()
    }

    /// The violations recorded so far, handed over: for a test that provokes them on purpose.
    /// Those taken here no longer fail the test when the sink is dropped; later ones do.
    pub fn violations(&self) -> Vec<Violation> {
        std::mem::take(&mut lock(&self.recorded).violations)
    }

    /// How many transactions each recipient got that the sink answered with 2xx.
    pub fn accepted(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for t in self.transactions() {
            if t.reply.starts_with('2') {
                *counts.entry(t.rcpt_to[0].clone()).or_default() += 1;
            }
        }
        counts
    }
}

/// Every test checks what its client sent: a violation nobody took fails it.
impl Drop for Sink {
    fn drop(&mut self) {
        // A client that has gone may have left bytes the sink has not read yet: let the
        // sessions finish (one stuck in a long SLEEP is not waited for).
        let deadline = Instant::now() + Duration::from_secs(2);
        while lock(&self.recorded).active > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if std::thread::panicking() {
            return;
        }
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "the client sent what a real SMTP server refuses:\n{}",
            violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Counts a session as running while it lives, and records when it ended.
struct Active(Shared, usize);

impl Drop for Active {
    fn drop(&mut self) {
        let mut recorded = lock(&self.0);
        recorded.active -= 1;
        recorded.spans[self.1 - 1].end = Some(Instant::now());
    }
}

/// The session is over: the client went, or the sink hung up.
struct End;

type Step<T = ()> = Result<T, End>;

/// What the last EHLO reply offered.
#[derive(Debug, Default, Clone)]
struct Offers {
    /// The keywords, in upper case: `PIPELINING`, `STARTTLS`, `AUTH`, `8BITMIME`…
    keywords: Vec<String>,
    /// `SIZE` with its limit (0: offered without one).
    size: Option<usize>,
}

impl Offers {
    /// The extensions listed by an EHLO reply.
    fn of(reply: &str) -> Offers {
        let mut offers = Offers::default();
        if !reply.starts_with('2') {
            return offers;
        }
        for line in reply.lines().skip(1) {
            let mut words = line.get(4..).unwrap_or("").split_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            if keyword == "SIZE" {
                offers.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
            }
            offers.keywords.push(keyword);
        }
        offers
    }

    fn has(&self, keyword: &str) -> bool {
        self.keywords.iter().any(|k| k == keyword)
    }
}

/// The open transaction: after a MAIL FROM the sink accepted.
struct Mail {
    from: String,
    /// `BODY=8BITMIME` or `SMTPUTF8`: 8-bit data may follow.
    eight_bit: bool,
    smtputf8: bool,
    /// The recipients the sink accepted.
    rcpt_to: Vec<String>,
    /// Whether there was a RCPT, accepted or not.
    rcpt_tried: bool,
    /// How its message is coming, once it is.
    message: Message,
}

/// How the message of a transaction is coming.
#[derive(Default)]
enum Message {
    /// Neither DATA nor BDAT yet.
    #[default]
    NotYet,
    /// DATA was tried: BDAT may not follow (RFC 3030 §3).
    Data,
    /// In BDAT chunks, these so far.
    Chunks(Chunked),
    /// A BDAT was refused: the next chunks are discarded until LAST, as Postfix does.
    Refused,
}

/// A message coming in BDAT chunks.
#[derive(Default)]
struct Chunked {
    /// The octets so far, at most `size_limit + 1` of them.
    data: Vec<u8>,
    /// How many octets came, kept or not.
    total: u64,
    chunks: usize,
}

/// One line from the client, as it came.
struct Line {
    bytes: Vec<u8>,
    /// Where its line end starts.
    end: usize,
    bare_lf: bool,
}

impl Line {
    fn text(&self) -> &[u8] {
        &self.bytes[..self.end]
    }
}

/// A line for a message: the start of it, escaped.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
        .escape_debug()
        .to_string();
    if bytes.len() > 60 {
        format!("{text}…")
    } else {
        text
    }
}

/// A reply as it goes on the wire: every line with the code, `-` after it on all but the
/// last, CRLF after each.
fn wire(text: &str) -> String {
    let code = text.get(..3).unwrap_or("500");
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let rest = match line.strip_prefix(code) {
            Some(rest) if rest.is_empty() => rest,
            Some(rest) if rest.starts_with([' ', '-']) => &rest[1..],
            _ => line,
        };
        let separator = if i + 1 == lines.len() { ' ' } else { '-' };
        write!(out, "{code}{separator}{rest}\r\n").unwrap();
    }
    out
}

/// The address between `<` and `>` after `keyword` (`FROM:` or `TO:`), and the parameters
/// after it; `None` when the syntax is wrong.
fn path<'a>(args: &'a str, keyword: &str) -> Option<(String, Vec<&'a str>)> {
    let rest = args
        .get(..keyword.len())
        .filter(|k| k.eq_ignore_ascii_case(keyword))
        .map(|_| &args[keyword.len()..])?;
    let inside = rest.strip_prefix('<')?;
    let (address, params) = inside.split_once('>')?;
    Some((address.to_owned(), params.split_whitespace().collect()))
}

async fn serve(
    stream: tokio::net::TcpStream,
    number: usize,
    state: Shared,
    script: Script,
    tls: Tls,
    faults: Faults,
    _active: Active,
) {
    let (encrypted, io): (bool, Box<dyn Io>) = match &tls {
        Tls::Implicit(acceptor) => match acceptor.accept(stream).await {
            Ok(tls) => (true, Box::new(tls)),
            Err(_) => return,
        },
        _ => (false, Box::new(stream)),
    };
    let mut session = Session {
        io: BufReader::new(io),
        out: Vec::new(),
        number,
        state,
        script,
        tls,
        faults,
        encrypted,
        greeted: false,
        offers: Offers::default(),
        authenticated: false,
        mail: None,
        awaited: None,
        unseen_mail_refusal: None,
        completed: 0,
    };
    let _ = session.run().await;
    // What was said before the end goes out, a 421 or a 221 with it.
    let _ = session.flush().await;
}

struct Session {
    io: BufReader<Box<dyn Io>>,
    /// Replies not written yet: they wait while the client's next commands are already here.
    out: Vec<u8>,
    number: usize,
    state: Shared,
    script: Script,
    tls: Tls,
    faults: Faults,
    encrypted: bool,
    /// EHLO or HELO since the connection or the TLS handshake.
    greeted: bool,
    offers: Offers,
    authenticated: bool,
    mail: Option<Mail>,
    /// What the client must wait for the reply to before it sends more (RFC 2920 §3.1).
    awaited: Option<String>,
    /// A refusal of MAIL not written yet: the client, pipelining, cannot have seen it, so
    /// the RCPT, DATA or BDAT it sent after MAIL are refused as usual, not as its mistake.
    unseen_mail_refusal: Option<String>,
    completed: usize,
}

impl Session {
    fn violation(&self, what: String) {
        lock(&self.state).violations.push(Violation {
            connection: self.number,
            what,
        });
    }

    /// Refuses `command` as a protocol error: a violation, and `reply`.
    fn refuse(&mut self, command: &str, reply: &str) {
        self.violation(format!("`{}` refused: {reply}", shown(command.as_bytes())));
        self.queue(reply);
    }

    fn queue(&mut self, text: &str) {
        self.out.extend_from_slice(wire(text).as_bytes());
    }

    /// Writes the replies waiting, in pieces when the faults say so.
    async fn flush(&mut self) -> Step {
        if self.out.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.out);
        self.unseen_mail_refusal = None;
        let first_line = bytes
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(bytes.len());
        let pieces: Vec<&[u8]> = if self.faults.split_replies && bytes.len() >= 3 {
            let middle = (first_line / 2).max(1);
            vec![
                &bytes[..middle],
                &bytes[middle..bytes.len() - 1],
                &bytes[bytes.len() - 1..],
            ]
        } else {
            vec![&bytes]
        };
        for (i, piece) in pieces.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(SPLIT_PAUSE).await;
            }
            lock(&self.state).writes.push(Written {
                connection: self.number,
                bytes: piece.to_vec(),
            });
            let stream = self.io.get_mut();
            if stream.write_all(piece).await.is_err() || stream.flush().await.is_err() {
                return Err(End);
            }
        }
        Ok(())
    }

    /// Whether the client has sent more that the sink has not read: in the buffer, or on
    /// the socket right now (without waiting).
    async fn input_waiting(&mut self) -> bool {
        if !self.io.buffer().is_empty() {
            return true;
        }
        matches!(
            tokio::time::timeout(Duration::ZERO, self.io.fill_buf()).await,
            Ok(Ok(more)) if !more.is_empty()
        )
    }

    /// Before the next command: input that came before the reply the client had to wait for
    /// is a violation (that reply has not been written yet, so it cannot have been seen).
    async fn before_read(&mut self) {
        if let Some(command) = self.awaited.take()
            && self.input_waiting().await
        {
            self.violation(format!(
                "sent more before the reply to {command}: {}",
                shown(self.io.buffer())
            ));
        }
    }

    /// The next line, up to its LF; `what` names it in violations. Not ended by CRLF, with a
    /// bare CR in it, or longer than `limit` octets before its line end: a violation. A
    /// client gone mid-line ends the session (it died; it did not break a rule).
    async fn line(&mut self, limit: usize, what: &str) -> Step<Line> {
        // The replies go out when the client has nothing more waiting to be read, as
        // Postfix's do: replies to pipelined commands leave together, in one write.
        if self.io.buffer().is_empty() {
            self.flush().await?;
        }
        let mut bytes = Vec::new();
        match self.io.read_until(b'\n', &mut bytes).await {
            Ok(0) | Err(_) => return Err(End),
            Ok(_) => {}
        }
        if bytes.last() != Some(&b'\n') {
            return Err(End);
        }
        let bare_lf = !bytes.ends_with(b"\r\n");
        let end = bytes.len() - if bare_lf { 1 } else { 2 };
        let line = Line {
            bytes,
            end,
            bare_lf,
        };
        if bare_lf {
            self.violation(format!("bare LF ending {what}: {}", shown(&line.bytes)));
        }
        if line.text().contains(&b'\r') {
            self.violation(format!("bare CR in {what}: {}", shown(&line.bytes)));
        }
        if line.end > limit {
            self.violation(format!(
                "{what}: {} octets, over the limit of {limit}: {}",
                line.end,
                shown(&line.bytes)
            ));
        }
        Ok(line)
    }

    /// Gives `text` (a script's or the normal reply): waits first on `SLEEP`, hangs up without
    /// a word on `DROP`, hangs up after a 421. True when the reply is positive.
    async fn say(&mut self, text: String) -> Step<bool> {
        let mut text = text;
        if let Some(rest) = text.strip_prefix("SLEEP ") {
            let (ms, reply) = rest.split_once(' ').expect("SLEEP <ms> <reply>");
            self.pause(Duration::from_millis(ms.parse().expect("SLEEP <ms>")))
                .await?;
            text = reply.to_owned();
        }
        if text == "DROP" {
            return Err(End);
        }
        self.queue(&text);
        if text.starts_with("421") {
            lock(&self.state).spans[self.number - 1].closed_by_421 = true;
            return Err(End);
        }
        Ok(text.starts_with('2') || text.starts_with('3'))
    }

    /// Waits `duration`, or until the client hangs up: then nobody waits for the reply, and
    /// the session ends (so that the sink need not wait for it when it is dropped).
    async fn pause(&mut self, duration: Duration) -> Step {
        let sleep = tokio::time::sleep(duration);
        tokio::pin!(sleep);
        if self.io.buffer().is_empty() {
            tokio::select! {
                () = &mut sleep => return Ok(()),
                more = self.io.fill_buf() => {
                    if more.map_or(true, <[u8]>::is_empty) {
                        return Err(End);
                    }
                }
            }
        }
        // More came meanwhile: it waits for the reply, and for its turn.
        sleep.await;
        Ok(())
    }

    /// The scripted reply for `phase`, or `normal`.
    fn scripted(&self, phase: Phase, rcpt: &str, normal: &str) -> String {
        (self.script)(phase, rcpt).unwrap_or_else(|| normal.to_owned())
    }

    /// Forgets the transaction (RSET, EHLO, a new TLS session, the end of DATA).
    fn reset(&mut self) {
        self.mail = None;
    }

    /// The most the sink takes: what it offered, or its own limit.
    fn size_limit(&self) -> usize {
        match self.offers.size {
            Some(limit) if limit > 0 => limit,
            _ => SIZE_LIMIT,
        }
    }

    async fn run(&mut self) -> Step {
        let greeting = self.scripted(
            Phase::Greeting,
            "",
            "220-sink.test ESMTP\n220 as strict as Postfix's smtpd",
        );
        if !self.say(greeting).await? {
            return Err(End);
        }
        self.awaited = Some("the greeting".to_owned());
        loop {
            self.before_read().await;
            let line = self.line(COMMAND_LINE_LIMIT, "a command line").await?;
            if line.bare_lf {
                self.queue("550 5.5.2 sink.test Error: bare <LF> received");
                return Err(End);
            }
            // Cut where Postfix cuts a long command.
            let text = &line.text()[..line.end.min(COMMAND_LINE_LIMIT)];
            let command = String::from_utf8_lossy(text).into_owned();
            let (verb, args) = command.split_once(' ').unwrap_or((&command, ""));
            let verb = verb.to_ascii_uppercase();
            lock(&self.state).commands.push((self.number, verb.clone()));
            let last = matches!(
                verb.as_str(),
                "EHLO" | "HELO" | "STARTTLS" | "AUTH" | "DATA" | "NOOP" | "QUIT"
            );
            if last || !self.offers.has("PIPELINING") {
                self.awaited = Some(verb.clone());
            }
            match verb.as_str() {
                "EHLO" | "HELO" => self.ehlo(&command, &verb, args),
                "STARTTLS" => self.starttls(&command, args).await?,
                "AUTH" => self.auth(args).await?,
                "MAIL" => self.mail(&command, args).await?,
                "RCPT" => self.rcpt(&command, args).await?,
                "DATA" => self.data(&command, args).await?,
                "BDAT" => self.bdat(&command, args).await?,
                "RSET" if args.is_empty() => {
                    self.reset();
                    self.queue("250 2.0.0 Ok");
                }
                "NOOP" => self.queue("250 2.0.0 Ok"),
                "QUIT" => {
                    self.queue("221 2.0.0 Bye");
                    return Err(End);
                }
                "RSET" => self.refuse(&command, "501 5.5.4 Syntax: RSET"),
                "" => self.refuse(&command, "500 5.5.2 Error: bad syntax"),
                _ => self.refuse(&command, "502 5.5.2 Error: command not recognized"),
            }
        }
    }

    fn ehlo(&mut self, command: &str, verb: &str, args: &str) {
        if args.trim().is_empty() {
            self.refuse(command, &format!("501 Syntax: {verb} hostname"));
            return;
        }
        self.reset();
        let text = if verb == "HELO" {
            "250 sink.test".to_owned()
        } else {
            let before_tls = matches!(self.tls, Tls::Starttls(_)) && !self.encrypted;
            let size = format!("SIZE {SIZE_LIMIT}");
            let mut lines = vec!["250-sink.test"];
            if self.faults.wire != Wire::Serial {
                lines.push("PIPELINING");
            }
            lines.push(&size);
            lines.push(if before_tls {
                "STARTTLS"
            } else {
                "AUTH PLAIN LOGIN"
            });
            lines.extend(["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]);
            if self.faults.wire == Wire::Chunking {
                lines.push("CHUNKING");
            }
            for extra in self.faults.extensions {
                if !lines.contains(extra) {
                    lines.push(extra);
                }
            }
            self.scripted(Phase::Ehlo, "", &lines.join("\n"))
        };
        let sent = wire(&text);
        if verb == "EHLO" && text.starts_with('2') {
            let extensions = sent.lines().skip(1);
            let extensions = extensions.map(|l| l.get(4..).unwrap_or_default().to_owned());
            lock(&self.state).offers.push(extensions.collect());
        }
        self.offers = Offers::of(&sent);
        self.greeted = text.starts_with('2');
        self.out.extend_from_slice(sent.as_bytes());
    }

    async fn starttls(&mut self, command: &str, args: &str) -> Step {
        let acceptor = match &self.tls {
            Tls::Starttls(acceptor) if self.offers.has("STARTTLS") && !self.encrypted => {
                acceptor.clone()
            }
            _ if self.encrypted => {
                self.refuse(command, "554 5.5.1 Error: TLS already active");
                return Ok(());
            }
            _ => {
                self.refuse(command, "502 5.5.1 Error: command not implemented");
                return Ok(());
            }
        };
        if !args.is_empty() {
            self.refuse(command, "501 5.5.4 Syntax: STARTTLS");
            return Ok(());
        }
        self.queue("220 2.0.0 Ready to start TLS");
        self.awaited = None;
        // Plain text sent after STARTTLS is discarded (RFC 3207 §4.2): a client that counts
        // on it is open to command injection.
        if self.input_waiting().await {
            self.violation(format!(
                "sent more after STARTTLS before TLS began: {}",
                shown(self.io.buffer())
            ));
        }
        self.flush().await?;
        let placeholder: Box<dyn Io> = Box::new(tokio::io::duplex(1).0);
        let plain = std::mem::replace(&mut self.io, BufReader::new(placeholder)).into_inner();
        let Ok(secure) = acceptor.accept(plain).await else {
            return Err(End);
        };
        self.io = BufReader::new(Box::new(secure));
        self.encrypted = true;
        self.greeted = false;
        self.offers = Offers::default();
        self.authenticated = false;
        self.reset();
        Ok(())
    }

    /// A response to a `334` challenge; `None` when the client cancelled with `*` (answered).
    async fn challenge(&mut self, prompt: &str) -> Step<Option<Vec<u8>>> {
        self.queue(&format!("334 {prompt}"));
        self.awaited = Some("AUTH's challenge".to_owned());
        self.before_read().await;
        let line = self.line(COMMAND_LINE_LIMIT, "an AUTH response").await?;
        if line.text() == b"*" {
            self.queue("501 5.7.0 Authentication aborted");
            return Ok(None);
        }
        Ok(Some(line.text().to_vec()))
    }

    /// A base64 AUTH response, decoded (`=` is an empty one); a violation and a refusal when
    /// it is not base64.
    fn decode(&mut self, command: &str, response: &[u8]) -> Option<Vec<u8>> {
        use base64::Engine as _;
        if response == b"=" {
            return Some(Vec::new());
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(response)
            .ok();
        if decoded.is_none() {
            self.refuse(command, "501 5.5.2 Cannot decode response");
        }
        decoded
    }

    async fn auth(&mut self, args: &str) -> Step {
        let mut words = args.split_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(|r| r.as_bytes().to_vec());
        // Named without the credentials, which a failing test would print.
        let command = &format!("AUTH {mechanism}");
        let refusal = if !self.greeted {
            Some("503 5.5.1 Error: send HELO/EHLO first")
        } else if matches!(self.tls, Tls::Starttls(_)) && !self.encrypted {
            Some("538 5.7.11 Encryption required for requested authentication mechanism")
        } else if !self.offers.has("AUTH") {
            Some("503 5.5.1 Error: authentication not enabled")
        } else if self.mail.is_some() {
            Some("503 5.5.1 Error: MAIL transaction in progress")
        } else if self.authenticated {
            Some("503 5.5.1 Error: already authenticated")
        } else {
            None
        };
        if let Some(reply) = refusal {
            self.refuse(command, reply);
            return Ok(());
        }
        let login = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(response) => response,
                    None => match self.challenge("").await? {
                        Some(response) => response,
                        None => return Ok(()),
                    },
                };
                let Some(decoded) = self.decode(command, &response) else {
                    return Ok(());
                };
                // authorization identity NUL user NUL password
                let parts: Vec<String> = decoded
                    .split(|&b| b == 0)
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                format!(
                    "{}:{}",
                    parts.get(1).cloned().unwrap_or_default(),
                    parts.get(2).cloned().unwrap_or_default()
                )
            }
            "LOGIN" => {
                let user = match initial {
                    Some(response) => response,
                    // "Username:"
                    None => match self.challenge("VXNlcm5hbWU6").await? {
                        Some(response) => response,
                        None => return Ok(()),
                    },
                };
                let Some(user) = self.decode(command, &user) else {
                    return Ok(());
                };
                // "Password:"
                let Some(password) = self.challenge("UGFzc3dvcmQ6").await? else {
                    return Ok(());
                };
                let Some(password) = self.decode(command, &password) else {
                    return Ok(());
                };
                format!(
                    "{}:{}",
                    String::from_utf8_lossy(&user),
                    String::from_utf8_lossy(&password)
                )
            }
            _ => {
                self.refuse(
                    command,
                    "535 5.7.8 Error: authentication failed: no mechanism available",
                );
                return Ok(());
            }
        };
        lock(&self.state).logins.push(login);
        self.awaited = Some("AUTH".to_owned());
        let reply = self.scripted(Phase::Auth, "", "235 2.7.0 Authentication successful");
        if self.say(reply).await? {
            self.authenticated = true;
        }
        Ok(())
    }

    async fn mail(&mut self, command: &str, args: &str) -> Step {
        if !self.greeted {
            self.refuse(command, "503 5.5.1 Error: send HELO/EHLO first");
            return Ok(());
        }
        if self.mail.is_some() {
            self.refuse(command, "503 5.5.1 Error: nested MAIL command");
            return Ok(());
        }
        let Some((from, params)) = path(args, "FROM:") else {
            self.refuse(command, "501 5.5.4 Syntax: MAIL FROM:<address>");
            return Ok(());
        };
        let mut mail = Mail {
            from,
            eight_bit: false,
            smtputf8: false,
            rcpt_to: Vec::new(),
            rcpt_tried: false,
            message: Message::NotYet,
        };
        let mut too_big = false;
        for param in params {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let offered = match key.to_ascii_uppercase().as_str() {
                "SIZE" => match value.parse::<usize>() {
                    Ok(size) => {
                        too_big = size > self.size_limit();
                        self.offers.size.is_some()
                    }
                    Err(_) => false,
                },
                "BODY" if value.eq_ignore_ascii_case("8BITMIME") => {
                    mail.eight_bit = true;
                    self.offers.has("8BITMIME")
                }
                "BODY" => value.eq_ignore_ascii_case("7BIT"),
                "SMTPUTF8" if value.is_empty() => {
                    mail.smtputf8 = true;
                    self.offers.has("SMTPUTF8")
                }
                _ => false,
            };
            if !offered {
                self.refuse(command, &format!("555 5.5.4 Unsupported option: {param}"));
                return Ok(());
            }
        }
        if !mail.from.is_ascii() && !mail.smtputf8 {
            self.refuse(
                command,
                "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
            );
            return Ok(());
        }
        if too_big {
            // The client may try; the server says no. Not the client's mistake.
            let reply = format!(
                "552-5.3.4 Message size exceeds fixed limit\n552 5.3.4 this server takes at most {} octets",
                self.size_limit()
            );
            self.queue(&reply);
            self.unseen_mail_refusal = Some(reply);
            return Ok(());
        }
        let reply = self.scripted(Phase::Mail, "", "250 2.1.0 Ok");
        if self.say(reply.clone()).await? {
            mail.eight_bit |= mail.smtputf8;
            self.mail = Some(mail);
        } else {
            self.unseen_mail_refusal = Some(reply);
        }
        Ok(())
    }

    /// A command that needs a transaction when there is none: the client's mistake, unless
    /// it pipelined it after a MAIL whose refusal it has not seen.
    fn need_mail(&mut self, command: &str, reply: &str) {
        if self.unseen_mail_refusal.is_some() {
            self.queue(reply);
        } else {
            self.refuse(command, reply);
        }
    }

    async fn rcpt(&mut self, command: &str, args: &str) -> Step {
        let Some(smtputf8) = self.mail.as_ref().map(|m| m.smtputf8) else {
            self.need_mail(command, "503 5.5.1 Error: need MAIL command");
            return Ok(());
        };
        let Some((rcpt, params)) = path(args, "TO:") else {
            self.refuse(command, "501 5.5.4 Syntax: RCPT TO:<address>");
            return Ok(());
        };
        if let Some(param) = params.first() {
            self.refuse(command, &format!("555 5.5.4 Unsupported option: {param}"));
            return Ok(());
        }
        if !rcpt.is_ascii() && !smtputf8 {
            self.refuse(
                command,
                "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
            );
            return Ok(());
        }
        if let Some(mail) = self.mail.as_mut() {
            mail.rcpt_tried = true;
        }
        let text = self.scripted(Phase::Rcpt, &rcpt, "250 2.1.5 Ok");
        lock(&self.state).rcpts.push(RcptAttempt {
            rcpt: rcpt.clone(),
            reply: text.clone(),
            at: Instant::now(),
        });
        if self.say(text).await?
            && let Some(mail) = self.mail.as_mut()
        {
            mail.rcpt_to.push(rcpt);
        }
        Ok(())
    }

    /// 354 for a transaction without a recipient, then `reply` to its end: only a lone dot
    /// may come, nothing of a message meant for nobody.
    async fn empty_message(&mut self, reply: &str) -> Step {
        self.queue("354 End data with <CR><LF>.<CR><LF>");
        // It goes out with the next read: nothing may have come before it.
        self.awaited = Some("DATA".to_owned());
        self.before_read().await;
        loop {
            let line = self
                .line(TEXT_LINE_LIMIT, "the end of an empty message")
                .await?;
            if line.text() == b"." {
                break;
            }
            self.violation(format!(
                "a message after every RCPT TO was refused: {}",
                shown(&line.bytes)
            ));
        }
        self.reset();
        self.queue(reply);
        Ok(())
    }

    async fn data(&mut self, command: &str, args: &str) -> Step {
        if !args.is_empty() {
            self.refuse(command, "501 5.5.4 Syntax: DATA");
            return Ok(());
        }
        let Some(mail) = &mut self.mail else {
            self.need_mail(command, "503 5.5.1 Error: need RCPT command");
            return Ok(());
        };
        if matches!(mail.message, Message::Chunks(_) | Message::Refused) {
            // RFC 3030 §3: one transaction, one way to send the message.
            self.refuse(command, "503 5.5.1 Error: DATA after BDAT");
            return Ok(());
        }
        mail.message = Message::Data;
        let eight_bit = mail.eight_bit;
        let Some(first) = mail.rcpt_to.first().cloned() else {
            // After refused RCPTs, a pipelining client sends DATA all the same (RFC 2920
            // §3.1); without any RCPT it is a mistake.
            let reply = "554-5.5.1 Error: no valid recipients\n554 5.5.1 every RCPT TO of this transaction was refused";
            if !mail.rcpt_tried {
                self.refuse(command, reply);
            } else if self.faults.go_ahead_without_recipients {
                self.empty_message(reply).await?;
            } else {
                self.queue(reply);
            }
            return Ok(());
        };
        let go_ahead = self.scripted(Phase::Data, &first, "354 End data with <CR><LF>.<CR><LF>");
        if !self.say(go_ahead).await? {
            return Ok(());
        }
        // The 354 goes out now: the client must have waited for it.
        self.before_read().await;
        let hang_up_in_body = (self.script)(Phase::Body, &first).is_some_and(|r| r == "DROP");
        let mut data = Vec::new();
        let mut bare_lf = false;
        let mut eight_bit_told = false;
        for number in 1.. {
            let line = self
                .line(TEXT_LINE_LIMIT, &format!("line {number} of the message"))
                .await?;
            // A dot alone ends the data; with a bare LF too (a violation already), so that
            // the test fails on it rather than waiting for a timeout.
            if line.text() == b"." {
                break;
            }
            if hang_up_in_body {
                return Err(End);
            }
            bare_lf |= line.bare_lf;
            if !eight_bit && !eight_bit_told && !line.text().is_ascii() {
                self.violation(format!(
                    "8-bit data without BODY=8BITMIME in line {number} of the message: {}",
                    shown(&line.bytes)
                ));
                eight_bit_told = true;
            }
            // RFC 5321 §4.5.2: the first character of every line that starts with a dot goes.
            let unstuffed = line.bytes.strip_prefix(b".").unwrap_or(&line.bytes);
            data.extend_from_slice(unstuffed);
        }
        let text = if bare_lf {
            "550 5.5.2 sink.test Error: bare <LF> received".to_owned()
        } else if data.len() > self.size_limit() {
            "552 5.3.4 Message size exceeds fixed limit".to_owned()
        } else {
            self.scripted(Phase::EndOfData, &first, "250 2.0.0 Ok: queued")
        };
        // Recorded even when the sink then hangs up without a reply: the message arrived,
        // and that is what "ambiguous" is about.
        let mail = self.mail.take().expect("the transaction checked above");
        lock(&self.state).transactions.push(Transaction {
            connection: self.number,
            mail_from: mail.from,
            rcpt_to: mail.rcpt_to,
            data,
            chunks: 0,
            reply: text.clone(),
            encrypted: self.encrypted,
        });
        if !self.offers.has("PIPELINING") {
            self.awaited = Some("the final dot".to_owned());
        }
        self.say(text).await?;
        self.completed += 1;
        if self.faults.close_after.is_some_and(|k| self.completed >= k) {
            return Err(End);
        }
        Ok(())
    }

    /// `BDAT <size> [LAST]` (RFC 3030): the chunk's octets are read whatever the reply, so
    /// that the next command is read where it starts.
    async fn bdat(&mut self, command: &str, args: &str) -> Step {
        if !self.offers.has("CHUNKING") {
            // Postfix hangs up too: the bytes of the chunk, read as commands, would bury the
            // mistake under others.
            self.refuse(command, "521 5.5.1 Error: command not implemented");
            return Err(End);
        }
        let mut words = args.split_whitespace();
        let size = words
            .next()
            .filter(|w| w.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|w| w.parse::<u64>().ok());
        let last = match words.next() {
            None => Some(false),
            Some(word) if word.eq_ignore_ascii_case("LAST") => Some(true),
            Some(_) => None,
        };
        let (Some(size), Some(last), None) = (size, last, words.next()) else {
            // Where the chunk ends is unknown: Postfix answers 521 and hangs up.
            self.refuse(command, "521 5.5.4 Syntax: BDAT count [LAST]");
            return Err(End);
        };
        let refusal = match &self.mail {
            // A mistake unless pipelined after a MAIL whose refusal the client has not seen.
            None => Some((
                "503 5.5.1 Error: need RCPT command".to_owned(),
                self.unseen_mail_refusal.is_none(),
            )),
            // The rest of a message whose chunk was refused: refused, no mistake again.
            Some(mail) if matches!(mail.message, Message::Refused) => Some((
                format!("551 5.0.0 Discarded {size} bytes after earlier error"),
                false,
            )),
            Some(mail) if matches!(mail.message, Message::Data) => {
                Some(("503 5.5.1 Error: BDAT after DATA".to_owned(), true))
            }
            // After refused RCPTs a pipelining client sends BDAT all the same (RFC 3030 §4.2);
            // without any RCPT it is a mistake.
            Some(mail) if mail.rcpt_to.is_empty() => Some((
                "554-5.5.1 Error: no valid recipients\n554 5.5.1 every RCPT TO of this transaction was refused".to_owned(),
                !mail.rcpt_tried,
            )),
            _ if size == 0 && !last => Some(("551 5.7.1 Null BDAT request".to_owned(), true)),
            _ => None,
        };
        if let Some((reply, mistake)) = refusal {
            self.chunk(size, None).await?;
            if mistake {
                self.refuse(command, &reply);
            } else {
                self.queue(&reply);
            }
            if let Some(mail) = self.mail.as_mut() {
                mail.message = Message::Refused;
            }
            if last {
                // LAST ends the transaction, refused or not (as Postfix does).
                self.reset();
            }
            return Ok(());
        }
        let mail = self.mail.as_mut().expect("the transaction checked above");
        let first = mail.rcpt_to[0].clone();
        let mut chunked = match std::mem::take(&mut mail.message) {
            Message::Chunks(chunked) => chunked,
            _ => Chunked::default(),
        };
        if (self.script)(Phase::Body, &first).is_some_and(|r| r == "DROP") {
            // Halfway through the chunk, before any reply: no message arrived.
            self.chunk(size / 2, Some(&mut chunked.data)).await?;
            return Err(End);
        }
        self.chunk(size, Some(&mut chunked.data)).await?;
        chunked.total += size;
        chunked.chunks += 1;
        let over = chunked.total > self.size_limit() as u64;
        if !last {
            let mail = self.mail.as_mut().expect("the transaction checked above");
            if over {
                // The client may try; the server says no. The rest is discarded.
                mail.message = Message::Refused;
                self.queue("552 5.3.4 Chunk exceeds message size limit");
            } else {
                mail.message = Message::Chunks(chunked);
                self.queue(&format!("250 2.0.0 Ok: {size} bytes"));
            }
            return Ok(());
        }
        let eight_bit = self.mail.as_ref().is_some_and(|m| m.eight_bit);
        // Over the limit, the message is cut: its lines say nothing.
        let bare_lf = !over && self.check_chunked(&chunked.data, eight_bit);
        let text = if bare_lf {
            "550 5.5.2 sink.test Error: bare <LF> received".to_owned()
        } else if over {
            "552 5.3.4 Message size exceeds fixed limit".to_owned()
        } else {
            self.scripted(Phase::EndOfData, &first, "250 2.0.0 Ok: queued")
        };
        // Recorded even when the sink then hangs up without a reply, as after DATA.
        let mail = self.mail.take().expect("the transaction checked above");
        lock(&self.state).transactions.push(Transaction {
            connection: self.number,
            mail_from: mail.from,
            rcpt_to: mail.rcpt_to,
            data: chunked.data,
            chunks: chunked.chunks,
            reply: text.clone(),
            encrypted: self.encrypted,
        });
        self.say(text).await?;
        self.completed += 1;
        if self.faults.close_after.is_some_and(|k| self.completed >= k) {
            return Err(End);
        }
        Ok(())
    }

    /// Reads `size` octets of a chunk, into `keep` (up to `size_limit + 1` octets in all, the
    /// rest read and dropped) or nowhere. Never allocates what the client announced: a huge
    /// size costs reading, not memory. A client gone mid-chunk ends the session.
    async fn chunk(&mut self, size: u64, mut keep: Option<&mut Vec<u8>>) -> Step {
        let cap = self.size_limit() + 1;
        let mut left = size;
        while left > 0 {
            let available = match self.io.fill_buf().await {
                Ok(bytes) if !bytes.is_empty() => bytes,
                _ => return Err(End),
            };
            let n = available
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            if let Some(keep) = keep.as_deref_mut() {
                let room = cap.saturating_sub(keep.len()).min(n);
                keep.extend_from_slice(&available[..room]);
            }
            self.io.consume(n);
            left -= n as u64;
        }
        Ok(())
    }

    /// Holds a message that came in chunks to the rules of one after DATA: lines ended by
    /// CRLF, at most 998 octets, 8-bit only when declared; and ended by CRLF (RFC 3030 §3).
    /// True when a line ended in a bare LF (the message is then refused, as after DATA).
    fn check_chunked(&self, data: &[u8], eight_bit: bool) -> bool {
        let mut bare_lf = false;
        let mut eight_bit_told = false;
        for (i, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
            let what = format!("line {} of the message", i + 1);
            let text = if let Some(text) = line.strip_suffix(b"\r\n") {
                text
            } else if let Some(text) = line.strip_suffix(b"\n") {
                self.violation(format!("bare LF ending {what}: {}", shown(line)));
                bare_lf = true;
                text
            } else {
                self.violation(format!(
                    "the message sent with BDAT does not end with CRLF: its {what} is {}",
                    shown(line)
                ));
                line
            };
            if text.contains(&b'\r') {
                self.violation(format!("bare CR in {what}: {}", shown(line)));
            }
            if text.len() > TEXT_LINE_LIMIT {
                self.violation(format!(
                    "{what}: {} octets, over the limit of {TEXT_LINE_LIMIT}: {}",
                    text.len(),
                    shown(line)
                ));
            }
            if !eight_bit && !eight_bit_told && !text.is_ascii() {
                self.violation(format!(
                    "8-bit data without BODY=8BITMIME in {what}: {}",
                    shown(line)
                ));
                eight_bit_told = true;
            }
        }
        bare_lf
    }
}

/// A sink that holds its reply to the final dot of the `n`th message (from 1) until the test
/// lets go by clearing the flag it gives back, and counts the final dots it has seen: a send
/// that cannot end, or go on, before the test has done what it does meanwhile, however slow
/// the machine.
pub fn held_sink(
    n: usize,
) -> (
    Sink,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let held = Arc::new(AtomicBool::new(true));
    let ends = Arc::new(AtomicUsize::new(0));
    let script: Script = {
        let (held, ends) = (Arc::clone(&held), Arc::clone(&ends));
        Arc::new(move |phase, _| {
            if phase == Phase::EndOfData && ends.fetch_add(1, Ordering::SeqCst) + 1 == n {
                // The sink's thread waits: with one connection, nothing else is due meanwhile.
                while held.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            None
        })
    };
    (Sink::scripted(script), held, ends)
}
