//! The sink's own strictness, tried with a raw client that writes exactly the bytes a buggy
//! SMTP client would (bare LF, long lines, DATA without RCPT, unstuffed dots, AUTH before TLS,
//! no EHLO after STARTTLS, pipelining where it is not allowed, BDAT chunks that break RFC 3030),
//! and the real binary against the sink's harder replies: multi-line, split across writes,
//! AUTH LOGIN only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use crate::campaign::{Campaign, mailer, people};
use crate::count;
use crate::sink::{
    Faults, Phase, SIZE_LIMIT, Script, Sink, Tls, Violation, Wire, localhost_certificate,
};

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A client that sends what it is told, byte for byte, and reads whole replies.
struct Client<S: Read + Write> {
    stream: S,
    /// Read but not yet handed out.
    buffer: Vec<u8>,
}

impl Client<TcpStream> {
    /// Connected to `sink`, the greeting not read yet.
    fn connect(sink: &Sink) -> Client<TcpStream> {
        let stream = TcpStream::connect(sink.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Connected to `sink`, past its greeting.
    fn greeted(sink: &Sink) -> Client<TcpStream> {
        let mut client = Client::connect(sink);
        let greeting = client.reply();
        assert!(greeting.starts_with("220"), "{greeting}");
        client
    }

    /// STARTTLS, and the handshake, trusting `pem`.
    fn starttls(
        mut self,
        pem: &str,
    ) -> Client<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        let ready = self.command("STARTTLS");
        assert!(ready.starts_with("220 2.0.0"), "{ready}");
        assert!(self.buffer.is_empty(), "nothing after the 220");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connection =
            rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
                .unwrap();
        Client {
            stream: rustls::StreamOwned::new(connection, self.stream),
            buffer: Vec::new(),
        }
    }
}

impl<S: Read + Write> Client<S> {
    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    /// One line from the sink, CRLF included; empty when the sink hung up.
    fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                return self.buffer.drain(..=end).collect();
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                return std::mem::take(&mut self.buffer);
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// One whole reply, its lines joined by `\n` without their CRLF; empty when the sink
    /// hung up first. Every line must end in CRLF.
    fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            assert!(
                line.ends_with(b"\r\n"),
                "a reply line ends in CRLF: {line:?}"
            );
            let text = String::from_utf8(line[..line.len() - 2].to_vec()).unwrap();
            let last = text.as_bytes().get(3) != Some(&b'-');
            lines.push(text);
            if last {
                break;
            }
        }
        lines.join("\n")
    }

    fn command(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes());
        self.reply()
    }

    /// Whether the sink has closed the connection (after whatever it still had to say).
    fn closed(&mut self) -> bool {
        self.line().is_empty()
    }

    /// EHLO, MAIL, RCPT and DATA, each accepted.
    fn up_to_data(&mut self) {
        assert!(
            self.command("EHLO client.test")
                .starts_with("250-sink.test")
        );
        assert_eq!(self.command("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
        assert_eq!(self.command("RCPT TO:<b@x.test>"), "250 2.1.5 Ok");
        assert!(self.command("DATA").starts_with("354 "));
    }
}

/// The violations' texts.
fn texts(violations: &[Violation]) -> Vec<String> {
    violations.iter().map(|v| v.what.clone()).collect()
}

/// Asserts that each of `expected` is part of one violation's text, in order, and that there
/// were no others.
fn assert_violations(sink: &Sink, expected: &[&str]) {
    let got = texts(&sink.violations());
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    for (got, expected) in got.iter().zip(expected) {
        assert!(got.contains(expected), "{got:?} should say {expected:?}");
    }
}

#[test]
fn a_bare_lf_or_cr_is_no_line_end_but_a_violation() {
    let sink = Sink::start();
    // In a command: refused, and the connection closed (Postfix's smtpd_forbid_bare_newline).
    let mut client = Client::greeted(&sink);
    assert!(client.command("EHLO client.test").starts_with("250-"));
    client.send(b"NOOP\n");
    assert_eq!(
        client.reply(),
        "550 5.5.2 sink.test Error: bare <LF> received"
    );
    assert!(client.closed());
    assert_violations(&sink, &["bare LF ending a command line: NOOP\\n"]);

    // In a message: each one seen, the message refused at its end, the session goes on.
    let mut client = Client::greeted(&sink);
    client.up_to_data();
    client.send(b"Subject: a\r\nbare\rcr\r\nbare lf\n.\r\n");
    assert_eq!(
        client.reply(),
        "550 5.5.2 sink.test Error: bare <LF> received"
    );
    assert_eq!(client.command("RSET"), "250 2.0.0 Ok");
    assert_violations(
        &sink,
        &[
            "bare CR in line 2 of the message: bare\\rcr\\r\\n",
            "bare LF ending line 3 of the message: bare lf\\n",
        ],
    );
    let transactions = sink.transactions();
    assert_eq!(transactions[0].data, b"Subject: a\r\nbare\rcr\r\nbare lf\n");
    assert!(transactions[0].reply.starts_with("550"));

    // A bare CR in a command: no line end, so one odd command.
    let mut client = Client::greeted(&sink);
    client.send(b"RSET\rNOOP\r\n");
    assert_eq!(client.reply(), "502 5.5.2 Error: command not recognized");
    assert_violations(
        &sink,
        &[
            "bare CR in a command line: RSET\\rNOOP",
            "`RSET\\rNOOP` refused: 502",
        ],
    );
}

#[test]
fn lines_may_be_as_long_as_postfix_reads_commands_and_rfc_5321_allows_text() {
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    // Postfix's line_length_limit: 2,048 octets before the CRLF.
    let noop = |length: usize| format!("NOOP {}", "x".repeat(length - 5));
    assert_eq!(client.command(&noop(2048)), "250 2.0.0 Ok");
    assert!(sink.violations().is_empty());
    assert_eq!(client.command(&noop(2049)), "250 2.0.0 Ok");
    assert_violations(
        &sink,
        &["a command line: 2049 octets, over the limit of 2048"],
    );

    // RFC 5321 §4.5.3.1.6: 998 octets before the CRLF.
    client.up_to_data();
    let body = format!("{}\r\n{}\r\n.\r\n", "a".repeat(998), "b".repeat(999));
    client.send(body.as_bytes());
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert_violations(
        &sink,
        &["line 2 of the message: 999 octets, over the limit of 998"],
    );
}

#[test]
fn size_is_offered_and_a_larger_message_refused_with_552() {
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.lines().any(|l| l == "250-SIZE 10240000"), "{ehlo}");
    assert_eq!(
        client.command("MAIL FROM:<a@x.test> SIZE=10240001"),
        "552-5.3.4 Message size exceeds fixed limit\n552 5.3.4 this server takes at most 10240000 octets"
    );
    assert_eq!(
        client.command("MAIL FROM:<a@x.test> SIZE=10240000"),
        "250 2.1.0 Ok"
    );
    assert!(sink.violations().is_empty(), "a refused size is no mistake");
    drop(client);

    // A smaller limit offered by a script holds too, for the message itself.
    let small: Script = Arc::new(|phase, _| {
        (phase == Phase::Ehlo).then(|| "250-sink.test\n250-PIPELINING\n250 SIZE 100".to_owned())
    });
    let sink = Sink::scripted(small);
    let mut client = Client::greeted(&sink);
    client.up_to_data();
    client.send(format!("{}\r\n{}\r\n.\r\n", "a".repeat(60), "b".repeat(60)).as_bytes());
    assert_eq!(client.reply(), "552 5.3.4 Message size exceeds fixed limit");
    assert!(sink.violations().is_empty());
}

#[test]
fn commands_out_of_order_are_refused_as_postfix_does() {
    let script: Script = Arc::new(|phase, rcpt| match (phase, rcpt) {
        (Phase::Rcpt, "gone@x.test") => Some("550 5.1.1 no such user".to_owned()),
        (Phase::Rcpt, "busy@x.test") => Some("421 4.7.0 too busy, closing".to_owned()),
        _ => None,
    });
    let sink = Sink::scripted(script);
    let mut client = Client::greeted(&sink);
    // As `smtpd_helo_required = yes`.
    assert_eq!(
        client.command("MAIL FROM:<a@x.test>"),
        "503 5.5.1 Error: send HELO/EHLO first"
    );
    client.command("EHLO client.test");
    assert_eq!(client.command("DATA"), "503 5.5.1 Error: need RCPT command");
    assert_eq!(
        client.command("RCPT TO:<b@x.test>"),
        "503 5.5.1 Error: need MAIL command"
    );
    assert_eq!(client.command("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
    assert_eq!(
        client.command("MAIL FROM:<a@x.test>"),
        "503 5.5.1 Error: nested MAIL command"
    );
    // DATA without any RCPT: 554, and a mistake.
    let no_recipients = "554-5.5.1 Error: no valid recipients\n554 5.5.1 every RCPT TO of this transaction was refused";
    assert_eq!(client.command("DATA"), no_recipients);
    assert_violations(
        &sink,
        &[
            "`MAIL FROM:<a@x.test>` refused: 503 5.5.1 Error: send HELO/EHLO first",
            "`DATA` refused: 503 5.5.1 Error: need RCPT command",
            "`RCPT TO:<b@x.test>` refused: 503 5.5.1 Error: need MAIL command",
            "`MAIL FROM:<a@x.test>` refused: 503 5.5.1 Error: nested MAIL command",
            "`DATA` refused: 554-5.5.1 Error: no valid recipients",
        ],
    );

    // DATA after every RCPT was refused: 554 and no 354, but no mistake (a pipelining client
    // sends it before it knows).
    assert_eq!(
        client.command("RCPT TO:<gone@x.test>"),
        "550 5.1.1 no such user"
    );
    assert_eq!(client.command("DATA"), no_recipients);
    assert!(sink.violations().is_empty());

    // A 421 closes the connection.
    assert_eq!(
        client.command("RCPT TO:<busy@x.test>"),
        "421 4.7.0 too busy, closing"
    );
    assert!(client.closed());
    assert!(sink.transactions().is_empty());
}

#[test]
fn the_first_dot_of_every_line_that_starts_with_one_is_removed() {
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    client.up_to_data();
    // `.x` is what a client that does not stuff sends for `.x`: it arrives as `x`.
    client.send(b"Subject: dots\r\n\r\n.x\r\n..y\r\n...\r\nz.\r\n.\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert_eq!(
        sink.transactions()[0].data,
        b"Subject: dots\r\n\r\nx\r\n.y\r\n..\r\nz.\r\n"
    );
}

#[test]
fn eight_bit_data_needs_body_8bitmime_and_unicode_addresses_smtputf8() {
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    client.up_to_data();
    client.send("Subject: café\r\n\r\nx\r\n.\r\n".as_bytes());
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert_violations(
        &sink,
        &["8-bit data without BODY=8BITMIME in line 1 of the message"],
    );

    for (mail, reply) in [
        ("MAIL FROM:<zoë@x.test>", "553 5.6.7 Must declare SMTPUTF8"),
        (
            "MAIL FROM:<a@x.test> RET=HDRS",
            "555 5.5.4 Unsupported option: RET=HDRS",
        ),
        ("MAIL FROM:<a@x.test> BODY=BINARYMIME", "555 5.5.4"),
        (
            "MAIL FROM: <a@x.test>",
            "501 5.5.4 Syntax: MAIL FROM:<address>",
        ),
    ] {
        let answer = client.command(mail);
        assert!(answer.starts_with(reply), "{mail}: {answer}");
        assert_eq!(sink.violations().len(), 1, "{mail}");
    }

    for mail in [
        "MAIL FROM:<zoë@x.test> SMTPUTF8",
        "MAIL FROM:<a@x.test> BODY=8BITMIME",
    ] {
        assert_eq!(client.command(mail), "250 2.1.0 Ok");
        assert_eq!(client.command("RCPT TO:<b@x.test>"), "250 2.1.5 Ok");
        assert!(client.command("DATA").starts_with("354 "));
        client.send("Subject: café\r\n\r\nx\r\n.\r\n".as_bytes());
        assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    }
    assert!(sink.violations().is_empty());
}

#[test]
fn with_starttls_offered_auth_waits_for_tls_and_ehlo_comes_again() {
    let (acceptor, pem) = localhost_certificate();
    let sink = Sink::tls(Tls::Starttls(acceptor.clone()));
    let plain = base64(b"\0user\0secret");
    let mut client = Client::greeted(&sink);
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert_eq!(
        client.command(&format!("AUTH PLAIN {plain}")),
        "538 5.7.11 Encryption required for requested authentication mechanism"
    );
    assert!(sink.logins().is_empty(), "the credentials were not read");
    assert_violations(&sink, &["`AUTH PLAIN` refused: 538 5.7.11"]);

    // Over TLS, the EHLO, the login and the transaction are forgotten (RFC 3207 §4.2).
    let mut client = client.starttls(&pem);
    assert_eq!(
        client.command("MAIL FROM:<a@x.test>"),
        "503 5.5.1 Error: send HELO/EHLO first"
    );
    assert_violations(&sink, &["503 5.5.1 Error: send HELO/EHLO first"]);
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(
        client.command(&format!("AUTH PLAIN {plain}")),
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(sink.logins(), ["user:secret"]);
    client.up_to_data();
    client.send(b"Subject: over TLS\r\n\r\nhello\r\n.\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert!(sink.transactions()[0].encrypted);
    assert_eq!(
        client.command("STARTTLS"),
        "554 5.5.1 Error: TLS already active"
    );
    assert_violations(&sink, &["`STARTTLS` refused: 554 5.5.1"]);
    drop(client);

    // Plain text after STARTTLS, in the same write, is discarded: counting on it is how
    // commands get injected.
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    client.send(b"STARTTLS\r\nRSET\r\n");
    assert_eq!(client.reply(), "220 2.0.0 Ready to start TLS");
    drop(client);
    assert_violations(&sink, &["sent more after STARTTLS before TLS began: RSET"]);

    // Without TLS to offer, AUTH is offered in plain text, and STARTTLS is no command.
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(
        client.command("STARTTLS"),
        "502 5.5.1 Error: command not implemented"
    );
    assert_violations(&sink, &["`STARTTLS` refused: 502"]);
}

#[test]
fn auth_login_and_auth_plain_on_a_second_line_are_recorded_like_plain() {
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    assert_eq!(client.command("AUTH LOGIN"), "334 VXNlcm5hbWU6");
    assert_eq!(client.command(&base64(b"login-user")), "334 UGFzc3dvcmQ6");
    assert_eq!(
        client.command(&base64(b"login pass")),
        "235 2.7.0 Authentication successful"
    );
    assert_eq!(
        client.command(&format!("AUTH PLAIN {}", base64(b"\0again\0x"))),
        "503 5.5.1 Error: already authenticated"
    );
    assert_violations(
        &sink,
        &["`AUTH PLAIN` refused: 503 5.5.1 Error: already authenticated"],
    );

    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    // The empty challenge is "334 " with its space.
    assert_eq!(client.command("AUTH PLAIN"), "334 ");
    assert_eq!(
        client.command(&base64(b"\0plain-user\0plain pass")),
        "235 2.7.0 Authentication successful"
    );

    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    assert_eq!(
        client.command(&format!("AUTH LOGIN {}", base64(b"initial-user"))),
        "334 UGFzc3dvcmQ6"
    );
    assert_eq!(client.command("*"), "501 5.7.0 Authentication aborted");
    assert_eq!(
        client.command("AUTH PLAIN not-base64!"),
        "501 5.5.2 Cannot decode response"
    );
    assert_violations(&sink, &["`AUTH PLAIN` refused: 501 5.5.2"]);
    assert_eq!(
        client.command("AUTH CRAM-MD5"),
        "535 5.7.8 Error: authentication failed: no mechanism available"
    );
    assert_violations(&sink, &["`AUTH CRAM-MD5` refused: 535"]);

    assert_eq!(
        sink.logins(),
        ["login-user:login pass", "plain-user:plain pass"]
    );
}

/// The sink's writes on `connection`, as text.
fn writes(sink: &Sink, connection: usize) -> Vec<String> {
    sink.writes()
        .into_iter()
        .filter(|w| w.connection == connection)
        .map(|w| String::from_utf8(w.bytes).unwrap())
        .collect()
}

#[test]
fn pipelined_commands_get_their_replies_in_one_write_and_wait_where_rfc_2920_says() {
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.contains("250-PIPELINING"), "{ehlo}");
    client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n");
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    assert_eq!(client.reply(), "250 2.1.5 Ok");
    assert!(client.reply().starts_with("354 "));
    // The message and what follows its end may go together.
    client.send(b"Subject: pipelined\r\n\r\nhi\r\n.\r\nQUIT\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert_eq!(client.reply(), "221 2.0.0 Bye");
    assert!(client.closed());
    let written = writes(&sink, 1);
    assert_eq!(
        written[2..],
        [
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
            "250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n"
        ],
        "{written:#?}"
    );
    assert!(sink.violations().is_empty());

    // But nothing may follow EHLO before its reply (nor DATA, AUTH, STARTTLS, NOOP, QUIT).
    let mut client = Client::greeted(&sink);
    client.send(b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\n");
    assert!(client.reply().starts_with("250-sink.test"));
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    client.send(b"RCPT TO:<b@x.test>\r\nDATA\r\nSubject: early\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok");
    assert!(client.reply().starts_with("354 "));
    client.send(b"\r\nhi\r\n.\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert_violations(
        &sink,
        &[
            "sent more before the reply to EHLO: MAIL FROM:<a@x.test>",
            "sent more before the reply to DATA: Subject: early",
        ],
    );
    drop(client);

    // Without PIPELINING offered, nothing may follow any command before its reply; nor may
    // anything come before the greeting.
    let script: Script = Arc::new(|phase, _| match phase {
        Phase::Greeting => Some("SLEEP 200 220 sink.test ESMTP".to_owned()),
        Phase::Ehlo => Some("250-sink.test\n250 8BITMIME".to_owned()),
        _ => None,
    });
    let sink = Sink::scripted(script);
    let mut client = Client::connect(&sink);
    client.send(b"EHLO client.test\r\n");
    assert_eq!(client.reply(), "220 sink.test ESMTP");
    assert_eq!(client.reply(), "250-sink.test\n250 8BITMIME");
    client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n");
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    assert_eq!(client.reply(), "250 2.1.5 Ok");
    assert_violations(
        &sink,
        &[
            "sent more before the reply to the greeting: EHLO client.test",
            "sent more before the reply to MAIL: RCPT TO:<b@x.test>",
        ],
    );
}

#[test]
fn split_replies_come_in_pieces_and_the_client_reads_them_whole() {
    let faults = Faults {
        split_replies: true,
        ..Faults::default()
    };
    let sink = Sink::faulty(Arc::new(|_, _| None), Tls::None, faults);
    let mut client = Client::greeted(&sink);
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.ends_with("\n250 SMTPUTF8"), "{ehlo}");
    assert_eq!(client.command("NOOP"), "250 2.0.0 Ok");
    let written = writes(&sink, 1);
    assert_eq!(
        written.len(),
        9,
        "three replies, three pieces each: {written:#?}"
    );
    for piece in written.chunks(3) {
        assert!(!piece[0].contains('\n'), "cut in its first line: {piece:?}");
        assert!(piece[1].ends_with('\r'), "{piece:?}");
        assert_eq!(piece[2], "\n");
    }
    assert_eq!(written[6..].concat(), "250 2.0.0 Ok\r\n");
}

#[test]
#[should_panic(expected = "connection 1: bare LF ending a command line: QUIT\\n")]
fn a_violation_nobody_took_fails_the_test_when_the_sink_goes() {
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    client.send(b"QUIT\n");
    assert!(client.reply().starts_with("550 5.5.2"));
    drop(client);
    drop(sink);
}

/// A script for the binary's run: only AUTH LOGIN offered (so that the client must use it),
/// and a multi-line refusal for user1.
fn login_only_and_multi_line_refusal() -> Script {
    Arc::new(|phase, rcpt| match phase {
        Phase::Ehlo => Some(
            "250-sink.test\n250-PIPELINING\n250-SIZE 10240000\n250-AUTH LOGIN\n\
             250-ENHANCEDSTATUSCODES\n250-8BITMIME\n250 SMTPUTF8"
                .to_owned(),
        ),
        Phase::Rcpt if rcpt.starts_with("user1@") => Some(
            "550 5.1.1 The email account that you tried to reach does not exist.\n\
             550 5.1.1 Please check the address for typos."
                .to_owned(),
        ),
        _ => None,
    })
}

#[test]
fn the_binary_reads_split_multi_line_replies_and_logs_in_with_auth_login() {
    let faults = Faults {
        split_replies: true,
        ..Faults::default()
    };
    let sink = Sink::faulty(login_only_and_multi_line_refusal(), Tls::None, faults);
    let campaign = Campaign::example()
        .smtp(&sink, 2)
        .transport("username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"")
        .rows(people(5));
    let path = campaign.write();
    let run = mailer(
        &["send", path.to_str().unwrap()],
        &[("TEST_SMTP_PASSWORD", "login pass")],
    );
    assert_eq!(run.code, 1, "a recipient failed: {run:?}");
    assert_eq!(count(&run.stdout, "sent"), Some(4), "{}", run.stdout);
    assert_eq!(count(&run.stdout, "failed"), Some(1), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("user1@example1.com failed: 550 5.1.1 The email account"),
        "{}",
        run.stdout
    );
    let logins = sink.logins();
    assert!(
        !logins.is_empty() && logins.iter().all(|l| l == "mailer-user:login pass"),
        "{logins:?}"
    );
    assert_eq!(sink.accepted().len(), 4);
    assert!(
        sink.writes().iter().any(|w| w.bytes == b"\n"),
        "the replies were split"
    );

    // And over STARTTLS, split all the same: AUTH PLAIN once TLS is on.
    let (acceptor, pem) = localhost_certificate();
    let sink = Sink::faulty(Arc::new(|_, _| None), Tls::Starttls(acceptor), faults);
    let campaign = crate::over_starttls(Campaign::example(), &sink, &pem)
        .transport("username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"")
        .rows(people(3));
    let path = campaign.write();
    let run = mailer(
        &["send", path.to_str().unwrap()],
        &[("TEST_SMTP_PASSWORD", "plain pass")],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sink.logins(), ["mailer-user:plain pass"]);
    let transactions = sink.transactions();
    assert!(transactions.len() == 3 && transactions.iter().all(|t| t.encrypted));
}

/// A sink that offers PIPELINING and CHUNKING, with `script`.
fn chunking(script: Script) -> Sink {
    Sink::on_wire(script, Wire::Chunking)
}

/// `BDAT <size of chunk>[ LAST]` and the chunk, as one piece of a write.
fn bdat(chunk: &[u8], last: bool) -> Vec<u8> {
    let mut bytes = format!(
        "BDAT {}{}\r\n",
        chunk.len(),
        if last { " LAST" } else { "" }
    )
    .into_bytes();
    bytes.extend_from_slice(chunk);
    bytes
}

#[test]
fn each_wire_offers_its_keywords_and_serial_holds_every_command_to_its_reply() {
    for wire in Wire::ALL {
        let sink = Sink::on_wire(Arc::new(|_, _| None), wire);
        let mut client = Client::greeted(&sink);
        client.command("EHLO client.test");
        let offers = &sink.offers()[0];
        let has = |keyword: &str| offers.iter().any(|o| o == keyword);
        assert_eq!(
            has("PIPELINING"),
            wire != Wire::Serial,
            "{wire:?}: {offers:?}"
        );
        assert_eq!(
            has("CHUNKING"),
            wire == Wire::Chunking,
            "{wire:?}: {offers:?}"
        );
    }

    // Serial: MAIL and RCPT in one write are a mistake, and so is a command after a chunk
    // before BDAT's reply (CHUNKING offered by the list alone, without PIPELINING).
    let faults = Faults {
        wire: Wire::Serial,
        extensions: &["CHUNKING"],
        ..Faults::default()
    };
    let sink = Sink::faulty(Arc::new(|_, _| None), Tls::None, faults);
    let mut client = Client::greeted(&sink);
    let ehlo = client.command("EHLO client.test");
    assert!(
        !ehlo.contains("PIPELINING") && ehlo.ends_with("\n250 CHUNKING"),
        "{ehlo}"
    );
    client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n");
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    assert_eq!(client.reply(), "250 2.1.5 Ok");
    assert_violations(
        &sink,
        &["sent more before the reply to MAIL: RCPT TO:<b@x.test>"],
    );
    // The chunk may follow its command line in the same write: it is part of it.
    client.send(&bdat(b"Subject: serial\r\n\r\nhi\r\n", true));
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert!(sink.violations().is_empty());
    assert_eq!(client.command("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
    assert_eq!(client.command("RCPT TO:<b@x.test>"), "250 2.1.5 Ok");
    let mut batch = bdat(b"Subject: early\r\n\r\nhi\r\n", true);
    batch.extend_from_slice(b"QUIT\r\n");
    client.send(&batch);
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert_eq!(client.reply(), "221 2.0.0 Bye");
    assert_violations(&sink, &["sent more before the reply to BDAT: QUIT"]);
    assert_eq!(sink.transactions().len(), 2);
}

#[test]
fn bdat_last_pipelined_with_mail_and_rcpt_is_recorded_byte_for_byte_and_answered_in_one_write() {
    let sink = chunking(Arc::new(|_, _| None));
    let mut client = Client::greeted(&sink);
    let ehlo = client.command("EHLO client.test");
    assert!(
        ehlo.contains("250-PIPELINING") && ehlo.contains("CHUNKING"),
        "{ehlo}"
    );
    // Nothing is stuffed in a chunk: `.x` and a lone `.` are the message's own lines.
    let message = b"Subject: chunked\r\n\r\n.x\r\n.\r\n..y\r\n";
    let mut batch = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n".to_vec();
    batch.extend_from_slice(&bdat(message, true));
    client.send(&batch);
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    assert_eq!(client.reply(), "250 2.1.5 Ok");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    // After LAST, the next transaction may come in the same write, QUIT too.
    let mut batch = b"MAIL FROM:<c@x.test>\r\nRCPT TO:<d@x.test>\r\n".to_vec();
    batch.extend_from_slice(&bdat(b"Subject: second\r\n\r\nhi\r\n", true));
    batch.extend_from_slice(b"QUIT\r\n");
    client.send(&batch);
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    assert_eq!(client.reply(), "250 2.1.5 Ok");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert_eq!(client.reply(), "221 2.0.0 Bye");
    assert!(client.closed());

    let written = writes(&sink, 1);
    assert_eq!(
        written[2..],
        [
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n",
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n",
        ],
        "{written:#?}"
    );
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 2);
    assert_eq!(transactions[0].data, message);
    assert_eq!(transactions[0].chunks, 1);
    assert_eq!(transactions[0].rcpt_to, ["b@x.test"]);
    assert_eq!(transactions[1].mail_from, "c@x.test");
    assert_eq!(transactions[1].reply, "250 2.0.0 Ok: queued");
    let verbs: Vec<String> = sink.commands().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        verbs,
        [
            "EHLO", "MAIL", "RCPT", "BDAT", "MAIL", "RCPT", "BDAT", "QUIT"
        ]
    );
}

#[test]
fn a_message_may_come_in_several_chunks_and_bdat_0_last_ends_it() {
    let sink = chunking(Arc::new(|_, _| None));
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    assert_eq!(client.command("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
    assert_eq!(client.command("RCPT TO:<b@x.test>"), "250 2.1.5 Ok");
    // A chunk may end between CR and LF: the lines are the message's, not the chunks'.
    client.send(&bdat(b"Subject: three\r", false));
    assert_eq!(client.reply(), "250 2.0.0 Ok: 15 bytes");
    client.send(&bdat(b"\n\r\nbody\r\n", false));
    assert_eq!(client.reply(), "250 2.0.0 Ok: 9 bytes");
    client.send(b"BDAT 0 LAST\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    // RSET after it, and a message after DATA in the next transaction.
    assert_eq!(client.command("RSET"), "250 2.0.0 Ok");
    client.up_to_data();
    client.send(b"Subject: data\r\n\r\n..z\r\n.\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued");
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye");
    let transactions = sink.transactions();
    assert_eq!(transactions[0].data, b"Subject: three\r\n\r\nbody\r\n");
    assert_eq!(transactions[0].chunks, 3);
    assert_eq!(transactions[1].data, b"Subject: data\r\n\r\n.z\r\n");
    assert_eq!(transactions[1].chunks, 0);
    assert!(sink.violations().is_empty());
}

#[test]
fn bdat_after_refused_recipients_gets_554_and_its_chunk_is_skipped() {
    let script: Script = Arc::new(|phase, rcpt| {
        (phase == Phase::Rcpt && rcpt == "gone@x.test").then(|| "550 5.1.1 no such user".to_owned())
    });
    let sink = chunking(script);
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    // The chunk reads like QUIT: were it read as a command, the sink would say goodbye.
    let mut batch = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<gone@x.test>\r\n".to_vec();
    batch.extend_from_slice(&bdat(b"QUIT\r\n", true));
    batch.extend_from_slice(b"MAIL FROM:<a@x.test>\r\n");
    client.send(&batch);
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    assert_eq!(client.reply(), "550 5.1.1 no such user");
    assert_eq!(
        client.reply(),
        "554-5.5.1 Error: no valid recipients\n554 5.5.1 every RCPT TO of this transaction was refused"
    );
    // LAST ended the transaction, refused as it was: a new MAIL is no nested one.
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    // A refused chunk that is not the last: the next ones are discarded until LAST.
    assert_eq!(
        client.command("RCPT TO:<gone@x.test>"),
        "550 5.1.1 no such user"
    );
    client.send(&bdat(b"NOOP\r\n", false));
    assert!(client.reply().starts_with("554-5.5.1"));
    client.send(&bdat(b"Subject: x\r\n", true));
    assert_eq!(
        client.reply(),
        "551 5.0.0 Discarded 12 bytes after earlier error"
    );
    assert_eq!(client.command("NOOP"), "250 2.0.0 Ok");
    assert!(
        sink.violations().is_empty(),
        "a pipelining client sends BDAT before it knows"
    );
    assert!(sink.transactions().is_empty());
}

#[test]
fn bdat_where_not_offered_malformed_or_out_of_order_is_refused_as_postfix_does() {
    // Not offered: 521, and the connection closed (its chunk would read as commands).
    let sink = Sink::start();
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    client.command("MAIL FROM:<a@x.test>");
    client.command("RCPT TO:<b@x.test>");
    client.send(&bdat(b"RSET\r\n", true));
    assert_eq!(client.reply(), "521 5.5.1 Error: command not implemented");
    assert!(client.closed());
    assert_violations(&sink, &["`BDAT 6 LAST` refused: 521 5.5.1"]);
    assert!(sink.transactions().is_empty());

    // Malformed: where its chunk ends is unknown, so 521 and closed too.
    let sink = chunking(Arc::new(|_, _| None));
    for command in ["BDAT", "BDAT x", "BDAT -1", "BDAT 5 MORE", "BDAT 5 LAST x"] {
        let mut client = Client::greeted(&sink);
        client.command("EHLO client.test");
        assert_eq!(
            client.command(command),
            "521 5.5.4 Syntax: BDAT count [LAST]",
            "{command}"
        );
        assert!(client.closed(), "{command}");
        assert_violations(&sink, &["refused: 521 5.5.4"]);
    }

    // Without MAIL, without any RCPT, or empty but not the last: refused, the chunk skipped.
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    client.send(&bdat(b"QUIT\r\n", true));
    assert_eq!(client.reply(), "503 5.5.1 Error: need RCPT command");
    assert_eq!(client.command("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
    client.send(&bdat(b"QUIT\r\n", true));
    assert!(
        client
            .reply()
            .starts_with("554-5.5.1 Error: no valid recipients")
    );
    assert_eq!(client.command("MAIL FROM:<a@x.test>"), "250 2.1.0 Ok");
    assert_eq!(client.command("RCPT TO:<b@x.test>"), "250 2.1.5 Ok");
    assert_eq!(client.command("BDAT 0"), "551 5.7.1 Null BDAT request");
    assert_violations(
        &sink,
        &[
            "`BDAT 6 LAST` refused: 503 5.5.1 Error: need RCPT command",
            "`BDAT 6 LAST` refused: 554-5.5.1 Error: no valid recipients",
            "`BDAT 0` refused: 551 5.7.1 Null BDAT request",
        ],
    );
    assert!(sink.transactions().is_empty());
}

#[test]
fn data_and_bdat_in_one_transaction_are_a_violation() {
    let script: Script =
        Arc::new(|phase, _| (phase == Phase::Data).then(|| "451 4.3.0 try again later".to_owned()));
    let sink = chunking(script);
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    client.command("MAIL FROM:<a@x.test>");
    client.command("RCPT TO:<b@x.test>");
    client.send(&bdat(b"Subject: x\r\n", false));
    assert_eq!(client.reply(), "250 2.0.0 Ok: 12 bytes");
    assert_eq!(client.command("DATA"), "503 5.5.1 Error: DATA after BDAT");
    assert_eq!(client.command("RSET"), "250 2.0.0 Ok");
    client.command("MAIL FROM:<a@x.test>");
    client.command("RCPT TO:<b@x.test>");
    assert_eq!(client.command("DATA"), "451 4.3.0 try again later");
    client.send(&bdat(b"QUIT\r\n", true));
    assert_eq!(client.reply(), "503 5.5.1 Error: BDAT after DATA");
    assert_eq!(client.command("NOOP"), "250 2.0.0 Ok");
    assert_violations(
        &sink,
        &[
            "`DATA` refused: 503 5.5.1 Error: DATA after BDAT",
            "`BDAT 6 LAST` refused: 503 5.5.1 Error: BDAT after DATA",
        ],
    );
    assert!(sink.transactions().is_empty());
}

#[test]
fn chunks_keep_the_rules_of_a_message_after_data() {
    let sink = chunking(Arc::new(|_, _| None));
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    let mut send = |mail: &str, message: &[u8]| {
        assert_eq!(client.command(mail), "250 2.1.0 Ok");
        assert_eq!(client.command("RCPT TO:<b@x.test>"), "250 2.1.5 Ok");
        client.send(&bdat(message, true));
        client.reply()
    };
    // A bare LF or CR: seen, and the message refused as after DATA.
    assert_eq!(
        send(
            "MAIL FROM:<a@x.test>",
            b"Subject: a\r\nbare\rcr\r\nbare lf\nend\r\n"
        ),
        "550 5.5.2 sink.test Error: bare <LF> received"
    );
    assert_violations(
        &sink,
        &[
            "bare CR in line 2 of the message: bare\\rcr\\r\\n",
            "bare LF ending line 3 of the message: bare lf\\n",
        ],
    );
    // Not ended by CRLF (RFC 3030 §3): Postfix would add one; a mistake all the same.
    assert_eq!(
        send("MAIL FROM:<a@x.test>", b"Subject: a\r\n\r\nno end"),
        "250 2.0.0 Ok: queued"
    );
    assert_violations(
        &sink,
        &["does not end with CRLF: its line 3 of the message is no end"],
    );
    // A line over 998 octets, and 8-bit data without BODY=8BITMIME.
    let long = format!("{}\r\n{}\r\ncafé\r\n", "a".repeat(998), "b".repeat(999));
    assert_eq!(
        send("MAIL FROM:<a@x.test>", long.as_bytes()),
        "250 2.0.0 Ok: queued"
    );
    assert_violations(
        &sink,
        &[
            "line 2 of the message: 999 octets, over the limit of 998",
            "8-bit data without BODY=8BITMIME in line 3 of the message",
        ],
    );
    for mail in [
        "MAIL FROM:<a@x.test> BODY=8BITMIME",
        "MAIL FROM:<zoë@x.test> SMTPUTF8",
    ] {
        assert_eq!(send(mail, "café\r\n".as_bytes()), "250 2.0.0 Ok: queued");
    }
    assert!(sink.violations().is_empty());
    assert_eq!(sink.transactions().len(), 5);
}

#[test]
fn a_chunk_over_the_size_limit_is_refused_with_552_and_not_kept_whole() {
    let sink = chunking(Arc::new(|_, _| None));
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    let line = format!("{}\r\n", "a".repeat(98));
    let limit = line.repeat(SIZE_LIMIT / 100);
    assert_eq!(limit.len(), SIZE_LIMIT);
    client.command("MAIL FROM:<a@x.test>");
    client.command("RCPT TO:<b@x.test>");
    client.send(&bdat(limit.as_bytes(), false));
    assert_eq!(client.reply(), format!("250 2.0.0 Ok: {SIZE_LIMIT} bytes"));
    client.send(&bdat(line.as_bytes(), true));
    assert_eq!(client.reply(), "552 5.3.4 Message size exceeds fixed limit");
    let transactions = sink.transactions();
    assert_eq!(
        transactions[0].data.len(),
        SIZE_LIMIT + 1,
        "kept up to the limit and one"
    );
    assert_eq!(
        transactions[0].reply,
        "552 5.3.4 Message size exceeds fixed limit"
    );

    // A chunk that is not the last: refused, and the rest of the message discarded.
    client.command("MAIL FROM:<a@x.test>");
    client.command("RCPT TO:<b@x.test>");
    client.send(format!("BDAT {}\r\n", SIZE_LIMIT + line.len()).as_bytes());
    client.send(limit.as_bytes());
    client.send(line.as_bytes());
    assert_eq!(client.reply(), "552 5.3.4 Chunk exceeds message size limit");
    client.send(&bdat(line.as_bytes(), true));
    assert_eq!(
        client.reply(),
        "551 5.0.0 Discarded 100 bytes after earlier error"
    );
    assert_eq!(client.command("NOOP"), "250 2.0.0 Ok");
    assert_eq!(sink.transactions().len(), 1);
    assert!(sink.violations().is_empty(), "a refused size is no mistake");
}

#[test]
fn a_drop_in_a_chunk_records_nothing_and_a_drop_at_last_records_the_message() {
    let script: Script = Arc::new(|phase, rcpt| match (phase, rcpt) {
        (Phase::Body, "mid@x.test") | (Phase::EndOfData, "end@x.test") => Some("DROP".to_owned()),
        (Phase::Data, _) => panic!("DATA's reply is not asked for a message sent with BDAT"),
        _ => None,
    });
    let sink = chunking(script);
    let message = format!("Subject: drop\r\n\r\n{}\r\n", "x".repeat(80));
    // Mid-chunk: the sink hangs up with half of it read, before the rest is even sent.
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    let mut batch = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<mid@x.test>\r\n".to_vec();
    batch.extend_from_slice(format!("BDAT {} LAST\r\n", message.len()).as_bytes());
    batch.extend_from_slice(&message.as_bytes()[..message.len() / 2]);
    client.send(&batch);
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    assert_eq!(client.reply(), "250 2.1.5 Ok");
    assert!(client.closed(), "no reply to BDAT");
    assert!(sink.transactions().is_empty());

    // At LAST: the whole message arrived, no reply.
    let mut client = Client::greeted(&sink);
    client.command("EHLO client.test");
    let mut batch = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<end@x.test>\r\n".to_vec();
    batch.extend_from_slice(&bdat(message.as_bytes(), true));
    client.send(&batch);
    assert_eq!(client.reply(), "250 2.1.0 Ok");
    assert_eq!(client.reply(), "250 2.1.5 Ok");
    assert!(client.closed(), "no reply to BDAT");
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 1);
    assert_eq!(transactions[0].data, message.as_bytes());
    assert_eq!(transactions[0].reply, "DROP");
    assert!(sink.violations().is_empty());
}
