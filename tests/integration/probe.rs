//! `mailer probe` against the sink: what it lists, what it says to the relay (never DATA), and
//! its exit codes.

use std::sync::Arc;

use crate::campaign::{Campaign, Run, mailer, people};
use crate::sink::{self, Faults, Phase, Sink, Tls};

const PASSWORD: &str = "s3cret-probe-pw";
const CANARY: &str = "[safety]\ncanary = [\"canary@example.org\", \"second@example.org\"]\n";

/// A campaign on `sink` (plain text, loopback) with a canary and a login.
fn on(sink: &Sink) -> Campaign {
    Campaign::example()
        .smtp(sink, 1)
        .transport("username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"")
        .rows(people(3))
        .extra(CANARY)
}

/// A campaign on `sink` over STARTTLS (required), trusting `pem` when given.
fn over_starttls(sink: &Sink, pem: Option<&str>) -> Campaign {
    let mut campaign = on(sink).transport_kind(&format!(
        "kind = \"smtp\"\nurl = \"smtp://localhost:{}\"\nconnections = 1\nrequire_starttls = true",
        sink.port()
    ));
    if let Some(pem) = pem {
        campaign = campaign
            .file("relay-ca.pem", pem)
            .transport("ca_file = \"relay-ca.pem\"");
    }
    campaign
}

fn probe(campaign: &Campaign, args: &[&str]) -> Run {
    let path = campaign.write();
    let run = mailer(
        &[&["probe", path.to_str().unwrap()], args].concat(),
        &[("TEST_SMTP_PASSWORD", PASSWORD)],
    );
    assert!(!run.stdout.contains(PASSWORD), "{run:?}");
    assert!(!run.stderr.contains(PASSWORD), "{run:?}");
    run
}

/// The verbs the sink heard on each connection, in order.
fn heard(sink: &Sink) -> Vec<Vec<String>> {
    let mut by_connection: Vec<Vec<String>> = vec![Vec::new(); sink.connections()];
    for (connection, verb) in sink.commands() {
        by_connection[connection - 1].push(verb);
    }
    by_connection
}

fn verbs(list: &[&str]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

/// Nothing written beside the campaign: no journal, no record of one.
fn nothing_recorded(campaign: &Campaign) {
    let names: Vec<String> = std::fs::read_dir(campaign.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with(".mailer-") || n == "mailer-state"),
        "{names:?}"
    );
}

#[test]
fn the_probe_lists_extensions_and_certificate_then_tries_the_canary_without_data() {
    let (acceptor, pem) = sink::ca_signed_certificate(200);
    let faults = Faults {
        extensions: &["CHUNKING"],
        ..Faults::default()
    };
    let sink = Sink::faulty(Arc::new(|_, _| None), Tls::Starttls(acceptor), faults);
    let campaign = over_starttls(&sink, Some(&pem));
    let run = probe(&campaign, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let out = &run.stdout;

    // Every extension of the EHLO after TLS (the probe's own), and STARTTLS from before it.
    let offers = sink.offers();
    let after_tls = offers.last().unwrap();
    assert!(after_tls.contains(&"CHUNKING".to_owned()), "{offers:?}");
    for extension in after_tls {
        assert!(
            out.lines().any(|l| l.ends_with(&format!(" {extension}"))),
            "{extension} not listed:\n{out}"
        );
    }
    for listed in [
        "PIPELINING",
        "SIZE 10240000",
        "AUTH PLAIN LOGIN",
        "CHUNKING",
        "8BITMIME",
        "SMTPUTF8",
        "STARTTLS (taken before this list)",
    ] {
        assert!(out.contains(listed), "{listed} missing:\n{out}");
    }
    assert!(
        out.starts_with(&format!(
            "relay        localhost:{} (STARTTLS, certificate verified, logged in as `mailer-user`)\n",
            sink.port()
        )),
        "{out}"
    );
    // PIPELINING and CHUNKING: what a send would do.
    assert!(
        out.contains(
            "sending      MAIL, RCPT and BDAT with the message in one write (PIPELINING, CHUNKING): one round trip per message\n"
        ),
        "{out}"
    );
    assert!(out.contains("subject CN=localhost relay\n"), "{out}");
    assert!(out.contains("issuer  CN=mailer test CA\n"), "{out}");
    assert!(out.contains("names   localhost\n"), "{out}");
    assert!(out.contains("(in 200 days)\n"), "{out}");
    assert!(!out.contains("warning:"), "{out}");
    assert!(out.contains("> MAIL FROM:<news@example.com>\n"), "{out}");
    assert!(out.contains("> RCPT TO:<canary@example.org>\n"), "{out}");
    assert!(out.contains("< 250 2.1.5 Ok\n"), "{out}");
    assert!(
        out.ends_with("ready: a send would get through this relay; nothing was sent (exit 0)\n"),
        "{out}"
    );

    // Connected as a send does (STARTTLS, then AUTH), and never said DATA.
    assert_eq!(
        heard(&sink),
        [verbs(&[
            "EHLO", "STARTTLS", "EHLO", "EHLO", "AUTH", "MAIL", "RCPT", "RSET", "QUIT"
        ])]
    );
    assert!(sink.transactions().is_empty());
    assert_eq!(sink.logins(), [format!("mailer-user:{PASSWORD}")]);
    let rcpts: Vec<String> = sink.rcpts().into_iter().map(|r| r.rcpt).collect();
    assert_eq!(rcpts, ["canary@example.org"]);
    nothing_recorded(&campaign);

    // --to instead of the canary, and --json.
    let run = probe(&campaign, &["--to", "Someone@Example.NET", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["campaign"], "test-campaign");
    assert_eq!(json["verdict"], "ready");
    assert_eq!(json["exit"], 0);
    assert_eq!(json["protection"], "starttls");
    assert_eq!(json["authenticated_as"], "mailer-user");
    assert_eq!(json["wire"], "chunked");
    assert_eq!(json["certificate"]["issuer"], "CN=mailer test CA");
    assert_eq!(json["certificate"]["expires_soon"], false);
    let keywords: Vec<&str> = json["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["keyword"].as_str().unwrap())
        .collect();
    for keyword in [
        "PIPELINING",
        "SIZE",
        "AUTH",
        "CHUNKING",
        "8BITMIME",
        "SMTPUTF8",
    ] {
        assert!(keywords.contains(&keyword), "{keywords:?}");
    }
    let auth = json["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["keyword"] == "AUTH")
        .unwrap();
    assert_eq!(auth["parameters"], "PLAIN LOGIN");
    let rcpt = &json["exchanges"][2];
    assert_eq!(rcpt["command"], "RCPT TO:<Someone@example.net>");
    assert_eq!(rcpt["code"], 250);
    assert_eq!(rcpt["enhanced"], "2.1.5");
    assert_eq!(rcpt["text"], "Ok");
    let rcpts: Vec<String> = sink.rcpts().into_iter().map(|r| r.rcpt).collect();
    assert_eq!(rcpts, ["canary@example.org", "Someone@example.net"]);
    assert!(sink.transactions().is_empty());
    assert!(!sink.commands().iter().any(|(_, verb)| verb == "DATA"));
    nothing_recorded(&campaign);
}

#[test]
fn a_certificate_that_expires_within_14_days_is_warned_about() {
    let (acceptor, pem) = sink::ca_signed_certificate(5);
    let sink = Sink::tls(Tls::Starttls(acceptor));
    let run = probe(&over_starttls(&sink, Some(&pem)), &[]);
    // The relay works today: a warning, not a failure.
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("(in 5 days)\n"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("warning: the relay's certificate expires on ")
            && run.stdout.contains(", in 5 days: renew it before then\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn an_smtps_relays_certificate_is_shown_too() {
    let (acceptor, pem) = sink::ca_signed_certificate(30);
    let sink = Sink::tls(Tls::Implicit(acceptor));
    let campaign = on(&sink)
        .transport_kind(&format!(
            "kind = \"smtp\"\nurl = \"smtps://localhost:{}\"\nconnections = 1",
            sink.port()
        ))
        .file("relay-ca.pem", &pem)
        .transport("ca_file = \"relay-ca.pem\"");
    let run = probe(&campaign, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("(TLS (smtps), certificate verified"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("subject CN=localhost relay\n"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("(in 30 days)\n"), "{}", run.stdout);
    // The session, and a second handshake that only looks at the certificate.
    assert_eq!(
        heard(&sink),
        [
            verbs(&["EHLO", "EHLO", "AUTH", "MAIL", "RCPT", "RSET", "QUIT"]),
            vec![]
        ]
    );
}

#[test]
fn a_refused_password_is_a_configuration_error() {
    let sink = Sink::scripted(Arc::new(|phase, _| {
        (phase == Phase::Auth).then(|| "535 5.7.8 Error: authentication failed".to_owned())
    }));
    let run = probe(&on(&sink), &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stdout.contains("configuration error: ")
            && run
                .stdout
                .contains("535 5.7.8 Error: authentication failed")
            && run.stdout.ends_with("(exit 65)\n"),
        "{}",
        run.stdout
    );
    assert_eq!(heard(&sink)[0][..3], verbs(&["EHLO", "EHLO", "AUTH"]));
    assert!(!sink.commands().iter().any(|(_, v)| v == "MAIL"));
}

#[test]
fn a_missing_password_is_a_configuration_error_before_any_connection() {
    let sink = Sink::start();
    let campaign = on(&sink);
    let path = campaign.write();
    let run = mailer(&["probe", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr
            .contains("`TEST_SMTP_PASSWORD` named by password_env is not set"),
        "{}",
        run.stderr
    );
    assert_eq!(sink.connections(), 0);
}

#[test]
fn an_untrusted_certificate_is_a_configuration_error() {
    let (acceptor, _pem) = sink::ca_signed_certificate(30);
    let sink = Sink::tls(Tls::Starttls(acceptor));
    // Nothing vouches for the relay's CA.
    let run = probe(&over_starttls(&sink, None), &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stdout.contains("configuration error: "),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("certificate"), "{}", run.stdout);
    assert!(run.stdout.ends_with("(exit 65)\n"), "{}", run.stdout);
    // Nothing after the handshake: no credentials went.
    assert_eq!(heard(&sink), [verbs(&["EHLO", "STARTTLS"])]);
    assert!(sink.logins().is_empty());
}

#[test]
fn a_refused_recipient_is_a_configuration_error_and_a_deferred_one_the_relay() {
    // The relay's text is shown escaped.
    let sink = Sink::scripted(Arc::new(|phase, rcpt| {
        (phase == Phase::Rcpt).then(|| {
            if rcpt.starts_with("later") {
                "451 4.7.1 try again later".to_owned()
            } else {
                "550 5.1.1 no such user \x1b[2J".to_owned()
            }
        })
    }));
    let campaign = on(&sink);
    let run = probe(&campaign, &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stdout.contains("< 550 5.1.1 no such user \\x1b[2J\n"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains('\x1b'), "{}", run.stdout);
    assert!(
        run.stdout.contains(
            "configuration error: the relay refused the recipient `canary@example.org`: 550 5.1.1 no such user \\x1b[2J"
        ),
        "{}",
        run.stdout
    );
    assert_eq!(
        heard(&sink),
        [verbs(&[
            "EHLO", "EHLO", "AUTH", "MAIL", "RCPT", "RSET", "QUIT"
        ])]
    );

    let run = probe(&campaign, &["--to", "later@example.org", "--json"]);
    assert_eq!(run.code, 69, "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["verdict"], "relay_unavailable");
    assert_eq!(json["exit"], 69);
    assert_eq!(
        json["reason"],
        "the relay refused the recipient `later@example.org`: 451 4.7.1 try again later"
    );
    assert!(!sink.commands().iter().any(|(_, v)| v == "DATA"));
    assert!(sink.transactions().is_empty());
}

#[test]
fn a_refused_sender_is_a_configuration_error_and_no_recipient_is_tried() {
    let sink = Sink::scripted(Arc::new(|phase, _| {
        (phase == Phase::Mail).then(|| "553 5.7.1 sender not allowed".to_owned())
    }));
    let run = probe(&on(&sink), &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stdout.contains(
            "configuration error: the relay refused the sender `news@example.com`: 553 5.7.1 sender not allowed"
        ),
        "{}",
        run.stdout
    );
    assert_eq!(
        heard(&sink),
        [verbs(&["EHLO", "EHLO", "AUTH", "MAIL", "QUIT"])]
    );
    assert!(sink.rcpts().is_empty());
}

#[test]
fn a_closed_port_is_an_unavailable_relay() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let campaign = Campaign::example()
        .transport_kind(&format!(
            "kind = \"smtp\"\nurl = \"smtp://127.0.0.1:{port}\"\nconnections = 1"
        ))
        .rows(people(2))
        .extra(CANARY);
    let run = probe(&campaign, &[]);
    assert_eq!(run.code, 69, "{run:?}");
    assert!(
        run.stdout
            .starts_with(&format!("relay        127.0.0.1:{port}\n")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "relay unavailable: cannot connect to `127.0.0.1:{port}`"
        )),
        "{}",
        run.stdout
    );
    assert!(run.stdout.ends_with("(exit 69)\n"), "{}", run.stdout);
}

#[test]
fn without_an_address_to_try_the_probe_is_a_usage_error() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(2));
    let run = probe(&campaign, &[]);
    assert_eq!(run.code, 64, "{run:?}");
    assert!(
        run.stderr
            .contains("give one with `--to ADDRESS`, or set `[safety] canary`"),
        "{}",
        run.stderr
    );
    let run = probe(&campaign, &["--to", "not an address"]);
    assert_eq!(run.code, 64, "{run:?}");
    assert!(
        run.stderr
            .contains("`--to not an address` is not an address"),
        "{}",
        run.stderr
    );
    assert_eq!(sink.connections(), 0);
}

#[test]
fn a_campaign_that_writes_files_has_no_relay_to_probe() {
    let campaign = Campaign::example().rows(people(2));
    let run = probe(&campaign, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.starts_with("no relay to probe: ") && run.stdout.contains("outbox"),
        "{}",
        run.stdout
    );
    let run = probe(&campaign, &["--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["verdict"], "no_relay");
    assert_eq!(json["transport"], "file");
}

#[test]
fn no_auth_mechanism_in_common_is_a_configuration_error() {
    // Plain text by the opt-out, to a relay that offers AUTH only after STARTTLS (as Postfix
    // does): the probe names what keeps AUTH away, exit 65, and tries no transaction.
    let (acceptor, _) = sink::localhost_certificate();
    let sink = Sink::tls(Tls::Starttls(acceptor));
    let campaign = on(&sink).transport_kind(&format!(
        "kind = \"smtp\"\nurl = \"smtp://localhost:{}\"\nconnections = 1\ndangerous_plaintext = true",
        sink.port()
    ));
    let run = probe(&campaign, &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stdout.contains("offers AUTH only after STARTTLS"),
        "{}",
        run.stdout
    );
    assert!(!sink.commands().iter().any(|(_, v)| v == "MAIL"));
}
