//! An in-process SMTP sink on 127.0.0.1:0 that records every envelope and message and can
//! script its replies. It runs on its own thread and runtime, so the code under test (the real
//! binary, or `mailer::run` with its own runtime) talks to it like to any server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Where in the transaction a scripted reply applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Greeting,
    /// The reply to EHLO: a script may replace the list of extensions.
    Ehlo,
    /// The reply to `AUTH PLAIN` (the credentials are recorded either way).
    Auth,
    Mail,
    Rcpt,
    Data,
    /// While the body comes in: `DROP` hangs up after its first line, before the final dot.
    Body,
    /// The reply to the final dot.
    EndOfData,
}

/// Decides a reply: `None` for the normal one, `Some("550 5.1.1 no")` to refuse, `Some("DROP")`
/// to close the connection without a word, `Some("SLEEP 300 250 ok")` to wait 300 ms first
/// (`SLEEP 300 DROP` works too). The `&str` is the recipient, once there is one.
pub type Script = Arc<dyn Fn(Phase, &str) -> Option<String> + Send + Sync>;

/// How the sink offers TLS.
#[derive(Clone, Default)]
pub enum Tls {
    /// Plain text only; STARTTLS is not advertised.
    #[default]
    None,
    /// STARTTLS advertised, with this certificate.
    Starttls(TlsAcceptor),
    /// TLS from the first byte (`smtps://`).
    Implicit(TlsAcceptor),
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

/// One SMTP transaction that reached the end of DATA.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub connection: usize,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The message as the client meant it: dot-stuffing undone, CRLF kept.
    pub data: Vec<u8>,
    /// The reply the sink gave to the final dot (`DROP`: it hung up instead).
    pub reply: String,
    /// Whether the transaction ran over TLS.
    pub encrypted: bool,
}

/// One `RCPT TO` the sink was sent, whatever it answered.
#[derive(Debug, Clone)]
pub struct RcptAttempt {
    pub rcpt: String,
    pub reply: String,
    pub at: std::time::Instant,
}

#[derive(Debug, Default)]
pub struct Recorded {
    pub connections: usize,
    pub transactions: Vec<Transaction>,
    pub rcpts: Vec<RcptAttempt>,
    /// Decoded `AUTH PLAIN` credentials, as `user:password`.
    pub logins: Vec<String>,
}

pub struct Sink {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Recorded>>,
}

/// Faults that are not a reply to one command.
#[derive(Clone, Copy, Default)]
pub struct Faults {
    /// Close each connection without a word after this many completed transactions, as a
    /// server that drops idle or old connections does.
    pub close_after: Option<usize>,
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

    pub fn with(script: Script, tls: Tls) -> Sink {
        Sink::faulty(script, tls, Faults::default())
    }

    pub fn faulty(script: Script, tls: Tls, faults: Faults) -> Sink {
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let state = Arc::clone(&recorded);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let number = {
                        let mut recorded = state.lock().unwrap();
                        recorded.connections += 1;
                        recorded.connections
                    };
                    tokio::spawn(serve(
                        stream,
                        number,
                        Arc::clone(&state),
                        Arc::clone(&script),
                        tls.clone(),
                        faults,
                    ));
                }
            });
        });
        let addr = ready_rx.recv().unwrap();
        Sink { addr, recorded }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connections(&self) -> usize {
        self.recorded.lock().unwrap().connections
    }

    pub fn transactions(&self) -> Vec<Transaction> {
        self.recorded.lock().unwrap().transactions.clone()
    }

    pub fn logins(&self) -> Vec<String> {
        self.recorded.lock().unwrap().logins.clone()
    }

    pub fn rcpts(&self) -> Vec<RcptAttempt> {
        self.recorded.lock().unwrap().rcpts.clone()
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

fn angle(argument: &str) -> String {
    let start = argument.find('<').map_or(0, |i| i + 1);
    let end = argument[start..]
        .find('>')
        .map_or(argument.len(), |i| start + i);
    argument[start..end].to_owned()
}

async fn serve(
    stream: tokio::net::TcpStream,
    number: usize,
    state: Arc<Mutex<Recorded>>,
    script: Script,
    tls: Tls,
    faults: Faults,
) {
    let mut completed = 0;
    let (mut encrypted, stream): (bool, Box<dyn Io>) = match &tls {
        Tls::Implicit(acceptor) => match acceptor.accept(stream).await {
            Ok(tls) => (true, Box::new(tls)),
            Err(_) => return,
        },
        _ => (false, Box::new(stream)),
    };
    let mut read = BufReader::new(stream);
    // Writes one reply (or hangs up on `DROP`); true when it is positive.
    macro_rules! send {
        ($text:expr) => {{
            let mut text: String = $text;
            if let Some(rest) = text.strip_prefix("SLEEP ") {
                let (ms, reply) = rest.split_once(' ').unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(ms.parse().unwrap())).await;
                text = reply.to_owned();
            }
            if text == "DROP"
                || read
                    .write_all(format!("{text}\r\n").as_bytes())
                    .await
                    .is_err()
            {
                return;
            }
            text.starts_with('2') || text.starts_with('3')
        }};
    }
    // The scripted reply for a phase, or the normal one.
    macro_rules! reply {
        ($phase:expr, $rcpt:expr, $normal:expr) => {
            send!(script($phase, $rcpt).unwrap_or_else(|| $normal.to_owned()))
        };
    }
    if !reply!(Phase::Greeting, "", "220 sink.test ESMTP") {
        return;
    }
    let mut mail_from = None::<String>;
    let mut rcpt_to = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match read.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            let starttls = if matches!(tls, Tls::Starttls(_)) && !encrypted {
                "250-STARTTLS\r\n"
            } else {
                ""
            };
            let ehlo = script(Phase::Ehlo, "").unwrap_or_else(|| format!(
                "250-sink.test\r\n{starttls}250-8BITMIME\r\n250-SMTPUTF8\r\n250-AUTH PLAIN LOGIN\r\n250 ENHANCEDSTATUSCODES"
            ));
            if read
                .write_all(format!("{ehlo}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        } else if upper == "STARTTLS" {
            let Tls::Starttls(acceptor) = &tls else {
                let _ = read.write_all(b"502 5.5.1 not offered\r\n").await;
                continue;
            };
            if read
                .write_all(b"220 2.0.0 ready to start TLS\r\n")
                .await
                .is_err()
            {
                return;
            }
            let plain = read.into_inner();
            let Ok(secure) = acceptor.accept(plain).await else {
                return;
            };
            read = BufReader::new(Box::new(secure));
            encrypted = true;
            mail_from = None;
            rcpt_to.clear();
        } else if upper.starts_with("AUTH PLAIN ") {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(command[11..].trim())
                .unwrap_or_default();
            let parts: Vec<String> = decoded
                .split(|&b| b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            state.lock().unwrap().logins.push(format!(
                "{}:{}",
                parts.get(1).cloned().unwrap_or_default(),
                parts.get(2).cloned().unwrap_or_default()
            ));
            let _ = reply!(Phase::Auth, "", "235 2.7.0 accepted");
        } else if upper.starts_with("MAIL FROM:") {
            mail_from = Some(angle(&command));
            rcpt_to.clear();
            let _ = reply!(Phase::Mail, "", "250 2.1.0 ok");
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = angle(&command);
            let text = script(Phase::Rcpt, &rcpt).unwrap_or_else(|| "250 2.1.5 ok".to_owned());
            state.lock().unwrap().rcpts.push(RcptAttempt {
                rcpt: rcpt.clone(),
                reply: text.clone(),
                at: std::time::Instant::now(),
            });
            if send!(text) {
                rcpt_to.push(rcpt);
            }
        } else if upper == "DATA" {
            let first = rcpt_to.first().cloned().unwrap_or_default();
            if !reply!(Phase::Data, &first, "354 go ahead") {
                continue;
            }
            let hang_up_in_body = script(Phase::Body, &first).is_some_and(|r| r == "DROP");
            let mut data = Vec::new();
            let mut body_line = Vec::new();
            loop {
                body_line.clear();
                let mut byte = [0u8; 1];
                // Byte by byte up to LF: simple, and exact about bare CR and LF.
                loop {
                    match read.read(&mut byte).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    body_line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                if body_line == b".\r\n" {
                    break;
                }
                if hang_up_in_body {
                    return;
                }
                let unstuffed = if body_line.starts_with(b"..") {
                    &body_line[1..]
                } else {
                    &body_line[..]
                };
                data.extend_from_slice(unstuffed);
            }
            let first = rcpt_to.first().cloned().unwrap_or_default();
            let text =
                script(Phase::EndOfData, &first).unwrap_or_else(|| "250 2.0.0 queued".to_owned());
            // Recorded even when the sink then hangs up without a reply: the message arrived,
            // and that is what "ambiguous" is about.
            state.lock().unwrap().transactions.push(Transaction {
                connection: number,
                mail_from: mail_from.take().unwrap_or_default(),
                rcpt_to: std::mem::take(&mut rcpt_to),
                data,
                reply: text.clone(),
                encrypted,
            });
            let _ = send!(text);
            completed += 1;
            if faults.close_after.is_some_and(|k| completed >= k) {
                return;
            }
        } else if upper == "RSET" {
            mail_from = None;
            rcpt_to.clear();
            let _ = read.write_all(b"250 2.0.0 reset\r\n").await;
        } else if upper == "NOOP" {
            let _ = read.write_all(b"250 2.0.0 ok\r\n").await;
        } else if upper == "QUIT" {
            let _ = read.write_all(b"221 2.0.0 bye\r\n").await;
            return;
        } else {
            let _ = read.write_all(b"502 5.5.2 unknown command\r\n").await;
        }
    }
}
