//! The relay as it is: STARTTLS taken on loopback whenever offered, and the mistakes in the
//! transport's settings — the wrong scheme for the port, a certificate mailer refuses, no AUTH
//! mechanism in common, a refused login — named at once with what to change (exit 65, nothing
//! halted while nothing was sent), against the in-process sink.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_rustls::TlsAcceptor;

use crate::campaign::{Campaign, Run, mailer, people};
use crate::count;
use crate::sink::{Faults, Phase, Sink, Tls, Wire, localhost_certificate};

/// Far under the five minutes `smtp://` at an implicit-TLS port used to take: the cause must
/// be named within seconds (this bound only proves "not minutes").
const NAMED_WITHIN: Duration = Duration::from_secs(30);

/// A campaign of `rows` rows sending to `url` on the sink, with more transport keys, and the
/// relay's certificate (or CA) in `ca_file` when one is given.
fn campaign(url: &str, keys: &str, ca_pem: Option<&str>, rows: usize) -> Campaign {
    let mut campaign = Campaign::example()
        .rows(people(rows))
        .transport_kind(&format!(
            "kind = \"smtp\"\nurl = \"{url}\"\nconnections = 1\n{keys}"
        ));
    if let Some(pem) = ca_pem {
        campaign = campaign
            .file("relay-ca.pem", pem)
            .transport("ca_file = \"relay-ca.pem\"");
    }
    campaign
}

/// Sends `campaign` (approved) with the password `pw` in `TEST_SMTP_PASSWORD`, and says how
/// long it took.
fn send(campaign: &Campaign) -> (Run, Duration) {
    let path = campaign.write();
    let started = Instant::now();
    let run = mailer(
        &["send", path.to_str().unwrap()],
        &[("TEST_SMTP_PASSWORD", "pw")],
    );
    (run, started.elapsed())
}

const LOGIN: &str = "username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"";

/// A configuration failure: exit 65 naming `cause`, nothing halted, nothing sent.
fn assert_config_failure(run: &Run, took: Duration, cause: &str) {
    assert_eq!(run.code, 65, "{run:?}");
    assert!(run.stderr.contains(cause), "{cause}:\n{}", run.stderr);
    assert!(!run.stderr.contains("halted"), "{}", run.stderr);
    assert!(!run.stderr.contains("https://"), "{}", run.stderr);
    assert!(took < NAMED_WITHIN, "took {took:?}");
}

/// A self-signed certificate for `localhost`, with or without the CA flag, and the acceptor
/// that serves it.
fn self_signed(ca: bool) -> (TlsAcceptor, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.is_ca = if ca {
        rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    } else {
        // As `-addext "basicConstraints=critical,CA:FALSE"` makes it (the README's command).
        rcgen::IsCa::ExplicitNoCa
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (TlsAcceptor::from(Arc::new(config)), cert.pem())
}

#[test]
fn starttls_is_taken_on_loopback_whenever_the_relay_offers_it() {
    // A relay that offers AUTH only after STARTTLS, as Postfix does: `smtp://` to loopback,
    // no `require_starttls`.
    let (acceptor, pem) = localhost_certificate();
    let sink = Sink::tls(Tls::Starttls(acceptor));
    let url = format!("smtp://localhost:{}", sink.port());
    let tls = campaign(&url, LOGIN, Some(&pem), 3);
    let path = tls.write();
    let plan = mailer(
        &["plan", path.to_str().unwrap()],
        &[("TEST_SMTP_PASSWORD", "pw")],
    );
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout
            .contains("(STARTTLS if offered, else plain text (loopback), AUTH PLAIN or LOGIN)"),
        "{}",
        plan.stdout
    );
    let (run, _) = send(&tls);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(count(&run.stdout, "sent"), Some(3), "{}", run.stdout);
    assert_eq!(sink.logins(), ["mailer-user:pw"], "AUTH after TLS");
    let transactions = sink.transactions();
    assert!(transactions.len() == 3 && transactions.iter().all(|t| t.encrypted));
    // mailer's own EHLO (for PIPELINING, CHUNKING, SIZE) comes before AUTH: some relays
    // forget a login at an EHLO after it.
    let verbs: Vec<String> = sink.commands().into_iter().map(|(_, verb)| verb).collect();
    assert_eq!(
        verbs[..5],
        ["EHLO", "STARTTLS", "EHLO", "EHLO", "AUTH"],
        "{verbs:?}"
    );
    assert!(!verbs[5..].contains(&"EHLO".to_owned()), "{verbs:?}");

    // With CHUNKING over STARTTLS: every message in one BDAT, encrypted.
    let (acceptor, pem) = localhost_certificate();
    let chunking = Sink::faulty(
        Arc::new(|_, _| None),
        Tls::Starttls(acceptor),
        Faults {
            wire: Wire::Chunking,
            ..Faults::default()
        },
    );
    let (run, _) = send(&campaign(
        &format!("smtp://localhost:{}", chunking.port()),
        LOGIN,
        Some(&pem),
        3,
    ));
    assert_eq!(run.code, 0, "{run:?}");
    let transactions = chunking.transactions();
    assert!(
        transactions.len() == 3 && transactions.iter().all(|t| t.encrypted && t.chunks == 1),
        "{transactions:?}"
    );

    // A loopback relay that offers no STARTTLS still takes plain text, AUTH included.
    let plain = Sink::start();
    let (run, _) = send(&campaign(
        &format!("smtp://127.0.0.1:{}", plain.port()),
        LOGIN,
        None,
        3,
    ));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(plain.logins(), ["mailer-user:pw"]);
    let transactions = plain.transactions();
    assert!(transactions.len() == 3 && transactions.iter().all(|t| !t.encrypted));
}

#[test]
fn dangerous_plaintext_never_tries_starttls_and_says_what_keeps_auth_away() {
    let (acceptor, pem) = localhost_certificate();
    let sink = Sink::tls(Tls::Starttls(acceptor));
    let url = format!("smtp://localhost:{}", sink.port());
    let opted_out = campaign(&url, "dangerous_plaintext = true", Some(&pem), 2);
    // `ca_file` cannot be used: check and plan say so.
    for command in ["check", "plan"] {
        let run = opted_out.run(command, &[]);
        assert_eq!(run.code, 0, "{run:?}");
        let all = format!("{}{}", run.stdout, run.stderr);
        assert!(
            all.contains("ca_file `")
                && all.contains("is not used: `dangerous_plaintext = true` turns TLS off"),
            "{command}: {all}"
        );
    }
    let (run, _) = send(&opted_out);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(sink.transactions().iter().all(|t| !t.encrypted));

    // With a login, the relay's AUTH after TLS is out of reach: named, not retried.
    let (run, took) = send(&campaign(
        &url,
        &format!("dangerous_plaintext = true\n{LOGIN}"),
        None,
        2,
    ));
    assert_config_failure(
        &run,
        took,
        "offers AUTH only after STARTTLS, which `dangerous_plaintext = true` turns off: remove `dangerous_plaintext`",
    );
    assert_eq!(sink.transactions().len(), 2, "nothing more was sent");
}

#[test]
fn smtps_at_a_starttls_port_is_named_at_once() {
    let (acceptor, pem) = localhost_certificate();
    let sink = Sink::tls(Tls::Starttls(acceptor));
    let place = format!("localhost:{}", sink.port());
    let wrong = campaign(&format!("smtps://{place}"), "", Some(&pem), 2);
    let (run, took) = send(&wrong);
    assert_config_failure(
        &run,
        took,
        &format!(
            "the relay at `{place}` does not speak TLS from the first byte: use `smtp://` \
             (STARTTLS) for this port, or the relay's implicit-TLS port (465) with `smtps://`"
        ),
    );
    assert!(sink.transactions().is_empty());
    // Nothing halted: the same mistake is named again, not "halted since".
    let (again, took) = send(&wrong);
    assert_config_failure(&again, took, "does not speak TLS from the first byte");
    // What the sink heard on each connection: a TLS ClientHello (a handshake record, 0x16
    // 0x03 0x01), and nothing after it.
    let violations = sink.violations();
    assert!(
        !violations.is_empty()
            && violations
                .iter()
                .all(|v| v.what.contains("\\u{16}\\u{3}\\u{1}")),
        "{violations:?}"
    );
}

#[test]
fn smtp_at_an_implicit_tls_port_is_named_within_seconds() {
    // A relay that waits for a TLS ClientHello and never greets in plain text: this used to
    // wait `command_timeout` (a minute) five times.
    let (acceptor, _) = localhost_certificate();
    let sink = Sink::tls(Tls::Implicit(acceptor));
    let place = format!("localhost:{}", sink.port());
    let (run, took) = send(&campaign(&format!("smtp://{place}"), "", None, 2));
    assert_config_failure(
        &run,
        took,
        &format!(
            "the relay at `{place}` speaks TLS from the first byte and sends no greeting in plain \
             text: use `smtps://` for this port"
        ),
    );
    assert!(sink.transactions().is_empty());
}

#[test]
fn no_auth_mechanism_in_common_is_named_exit_65_without_a_halt() {
    let sink = Sink::scripted(Arc::new(|phase, _| {
        (phase == Phase::Ehlo)
            .then(|| "250-sink.test\nAUTH CRAM-MD5 SCRAM-SHA-256\n8BITMIME\nSMTPUTF8".to_owned())
    }));
    let place = format!("127.0.0.1:{}", sink.port());
    let mismatch = campaign(&format!("smtp://{place}"), LOGIN, None, 2);
    let (run, took) = send(&mismatch);
    assert_config_failure(
        &run,
        took,
        &format!(
            "the relay at `{place}` offers AUTH CRAM-MD5 SCRAM-SHA-256 and mailer speaks PLAIN and \
             LOGIN: enable one of them on the relay"
        ),
    );
    assert_eq!(sink.connections(), 1, "not retried");
    assert!(sink.logins().is_empty());
    let status = mismatch.run("status", &[]);
    assert!(status.stdout.contains("not halted"), "{}", status.stdout);
}

#[test]
fn a_wrong_password_before_anything_is_sent_is_exit_65_and_mid_run_it_halts() {
    let sink = Sink::scripted(Arc::new(|phase, _| {
        (phase == Phase::Auth).then(|| "535 5.7.8 Error: authentication failed".to_owned())
    }));
    let place = format!("127.0.0.1:{}", sink.port());
    let (run, took) = send(&campaign(&format!("smtp://{place}"), LOGIN, None, 2));
    assert_config_failure(
        &run,
        took,
        &format!(
            "the relay at `{place}` refused mailer's login: 535 5.7.8 Error: authentication \
             failed; check `username` and the password"
        ),
    );
    assert_eq!(sink.connections(), 1, "not retried");
    assert!(!run.stderr.contains("pw"), "{}", run.stderr);

    // The second login is refused, after a message went: the breaker halts the campaign.
    let logins = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&logins);
    let sink = Sink::faulty(
        Arc::new(move |phase, _| {
            (phase == Phase::Auth && counted.fetch_add(1, Ordering::SeqCst) >= 1)
                .then(|| "535 5.7.8 Error: authentication failed".to_owned())
        }),
        Tls::None,
        Faults {
            close_after: Some(1),
            ..Faults::default()
        },
    );
    let mid_run = campaign(&format!("smtp://127.0.0.1:{}", sink.port()), LOGIN, None, 3);
    let (run, _) = send(&mid_run);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains(
            "halted: a new connection to the relay failed after messages had gone out: the relay at"
        ) && run.stderr.contains("refused mailer's login"),
        "{}",
        run.stderr
    );
    assert_eq!(sink.transactions().len(), 1);
    let (again, _) = send(&mid_run);
    assert_eq!(again.code, 3, "{again:?}");
    assert!(again.stderr.contains("is halted since"), "{}", again.stderr);
}

#[test]
fn a_refused_certificate_with_nothing_sent_is_exit_65_and_the_fixed_campaign_sends() {
    let (acceptor, pem) = localhost_certificate();
    let (_, other_pem) = localhost_certificate();
    let sink = Sink::tls(Tls::Starttls(acceptor));
    let place = format!("localhost:{}", sink.port());
    let url = format!("smtp://{place}");
    let refused = |run: &Run, took: Duration| {
        assert_config_failure(
            run,
            took,
            &format!("mailer refused the certificate of the relay at `{place}`: "),
        );
        assert!(
            run.stderr
                .contains("give the CA that signed it in `ca_file`"),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("the relay rejected"), "{}", run.stderr);
        assert!(sink.logins().is_empty() && sink.transactions().is_empty());
    };
    // No `ca_file`: nobody vouches for the relay's certificate.
    let unverified = campaign(&url, LOGIN, None, 3);
    let (run, took) = send(&unverified);
    assert!(
        run.stderr.contains(": no trusted CA signed it; "),
        "{}",
        run.stderr
    );
    refused(&run, took);
    // campaign.toml gets a `ca_file`, which holds some other certificate.
    let wrong = unverified
        .file("relay-ca.pem", &other_pem)
        .transport("ca_file = \"relay-ca.pem\"");
    let (run, took) = send(&wrong);
    refused(&run, took);

    // The right certificate in `ca_file`, and the send goes: no `mailer resume`, nothing to
    // accept (nothing reached the relay under the earlier inputs).
    let fixed = wrong.file("relay-ca.pem", &pem);
    let (run, _) = send(&fixed);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(count(&run.stdout, "sent"), Some(3), "{}", run.stdout);
    assert!(sink.transactions().iter().all(|t| t.encrypted));
}

#[test]
fn a_self_signed_certificate_without_the_ca_flag_is_trusted_through_ca_file() {
    // Made as the README says: self-signed, CA:FALSE, the relay's name in subjectAltName.
    let (acceptor, pem) = self_signed(false);
    let sink = Sink::tls(Tls::Starttls(acceptor));
    let url = format!("smtp://localhost:{}", sink.port());
    let (run, _) = send(&campaign(&url, LOGIN, Some(&pem), 2));
    assert_eq!(run.code, 0, "{run:?}");
    let transactions = sink.transactions();
    assert!(transactions.len() == 2 && transactions.iter().all(|t| t.encrypted));

    // With the CA flag, TLS refuses it as the server's own: the error says how to make one.
    let (acceptor, pem) = self_signed(true);
    let sink = Sink::tls(Tls::Starttls(acceptor));
    let place = format!("localhost:{}", sink.port());
    let (run, took) = send(&campaign(&format!("smtp://{place}"), LOGIN, Some(&pem), 2));
    assert_config_failure(
        &run,
        took,
        &format!(
            "mailer refused the certificate of the relay at `{place}`: it is a CA certificate \
             (basicConstraints CA:TRUE) used as the relay's own, which TLS does not allow; give \
             the relay a self-signed certificate without the CA flag and with its name in \
             subjectAltName (the README shows the openssl command)"
        ),
    );
    assert!(sink.transactions().is_empty());
}

#[test]
fn a_plain_relay_slow_to_greet_is_still_waited_for() {
    // Silent for longer than mailer's patience: the TLS question, on a second connection, gets
    // plain text back (or nothing in time), and the first connection goes on waiting for its
    // greeting.
    let sink = Sink::scripted(Arc::new(|phase, _| {
        (phase == Phase::Greeting).then(|| "SLEEP 4000 220 sink.test ESMTP".to_owned())
    }));
    let (run, _) = send(&campaign(
        &format!("smtp://127.0.0.1:{}", sink.port()),
        "",
        None,
        2,
    ));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sink.transactions().len(), 2);
    // What the question's connection sent, if the sink read it: a TLS ClientHello only.
    let violations = sink.violations();
    assert!(
        violations
            .iter()
            .all(|v| v.what.contains("\\u{16}\\u{3}\\u{1}")),
        "{violations:?}"
    );
}

#[test]
fn pipelining_and_chunking_can_be_turned_off_for_a_relay_that_offers_more_than_it_handles() {
    for (keys, expected) in [
        ("chunking = false", Wire::Pipelining),
        ("pipelining = false", Wire::Serial),
    ] {
        let sink = Sink::on_wire(Arc::new(|_, _| None), Wire::Chunking);
        let (run, _) = send(&campaign(
            &format!("smtp://127.0.0.1:{}", sink.port()),
            keys,
            None,
            3,
        ));
        assert_eq!(run.code, 0, "{keys}: {run:?}");
        assert_eq!(sink.transactions().len(), 3, "{keys}");
        crate::delivery::on_the_wire(keys, expected, &sink);
    }
}
