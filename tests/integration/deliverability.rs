//! Deliverability (issue 7): what the messages carry besides the campaign's words.

use crate::campaign::{Campaign, mailer};
use crate::sink::Sink;

#[test]
fn an_html_only_campaign_delivers_a_text_part_with_the_translated_words() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .row("ann@example.com,Ann,fr,Pro")
        .row("bob@example.com,Bob,de,Team");
    let path = campaign.write();
    std::fs::remove_file(campaign.dir().join("templates/text.hbs")).unwrap();
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 2);
    for t in &transactions {
        let raw = String::from_utf8_lossy(&t.data);
        assert!(
            raw.contains("multipart/alternative") && raw.contains("Content-Type: text/plain"),
            "a real text/plain part, not one a reader would derive: {raw}"
        );
        let message = crate::parse(&t.data);
        assert_eq!(message.text_body_count(), 1, "one text part");
        assert_eq!(message.html_body_count(), 1, "and the HTML");
        let text = message.body_text(0).unwrap();
        let html = message.body_html(0).unwrap();
        assert!(!html.is_empty());
        assert!(!text.contains('<'), "no markup in the text part: {text}");
        // What the translation of each recipient's locale says (locales/fr, locales/de).
        let expected: &[&str] = if t.rcpt_to[0] == "ann@example.com" {
            &["Bonjour Ann", "Votre formule actuelle : Pro."]
        } else {
            &["Hallo Bob", "Team"]
        };
        for words in expected {
            assert!(text.contains(words), "{words:?} in {text}");
        }
    }
}

/// The key the marketing campaign's links are signed with (in the child's environment only).
const KEY: &str = "test-unsubscribe-key-0123456789";

/// A marketing campaign with one-click unsubscribe and a List-Id, over SMTP to `sink`.
fn marketing(sink: &Sink, rows: &[&str]) -> (Campaign, std::path::PathBuf) {
    marketing_over(Campaign::example().smtp(sink, 1), rows)
}

/// `campaign`, its transport set, made a marketing campaign as [`marketing`] makes it.
fn marketing_over(campaign: Campaign, rows: &[&str]) -> (Campaign, std::path::PathBuf) {
    let mut campaign = campaign.extra(
        "[unsubscribe]\nurl = \"https://example.com/unsubscribe?list=news\"\nmailto = \"leave@example.com\"\nsecret_env = \"TEST_UNSUBSCRIBE_KEY\"\n",
    );
    for row in rows {
        campaign = campaign.row(row);
    }
    let path = campaign.write();
    let toml = std::fs::read_to_string(&path).unwrap().replacen(
        "default_locale = \"en\"",
        "default_locale = \"en\"\nkind = \"marketing\"\nlist_id = \"Example news <news.example.com>\"",
        1,
    );
    std::fs::write(&path, toml).unwrap();
    (campaign, path)
}

/// The header block of a message, its `Date` (the only line that changes) blanked.
fn headers(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap();
    head.lines()
        .map(|l| {
            if l.starts_with("Date: ") {
                "Date: (the run's date)"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_marketing_message_carries_one_click_unsubscribe_and_its_list_id() {
    let sink = Sink::start();
    let (_campaign, path) = marketing(
        &sink,
        &["ann@example.com,Ann,en,Pro", "bob@example.org,Bob,fr,Team"],
    );
    let path = path.to_str().unwrap();
    let env = [("TEST_UNSUBSCRIBE_KEY", KEY)];
    let run = mailer(&["send", path], &env);
    assert_eq!(run.code, 0, "{run:?}");
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 2);
    let ann = transactions
        .iter()
        .find(|t| t.rcpt_to[0] == "ann@example.com")
        .unwrap();
    insta::assert_snapshot!("marketing_headers", headers(&ann.data));

    // Each link names its own recipient, with a token that verifies for that recipient only.
    let mut tokens = Vec::new();
    for t in &transactions {
        let message = crate::parse(&t.data);
        let value = message
            .header_raw("List-Unsubscribe")
            .expect("List-Unsubscribe")
            .trim()
            .replace("\r\n", "");
        assert_eq!(
            message.header_raw("List-Unsubscribe-Post").map(str::trim),
            Some("List-Unsubscribe=One-Click")
        );
        let link = value.split(['<', '>']).nth(1).unwrap().to_owned();
        let url = url::Url::parse(&link).unwrap();
        let query: std::collections::BTreeMap<String, String> =
            url.query_pairs().into_owned().collect();
        assert_eq!(query["r"], t.rcpt_to[0], "{link}");
        assert_eq!(query["c"], "test-campaign");
        assert_eq!(query["list"], "news", "the URL's own query is kept");
        assert!(
            value.contains("<mailto:leave@example.com?subject=unsubscribe>"),
            "{value}"
        );
        let own = mailer(
            &[
                "unsubscribe-token",
                path,
                &t.rcpt_to[0],
                "--verify",
                &query["t"],
            ],
            &env,
        );
        assert_eq!((own.code, own.stdout.trim()), (0, "valid"), "{own:?}");
        tokens.push((t.rcpt_to[0].clone(), query["t"].clone()));
    }
    assert_ne!(tokens[0].1, tokens[1].1, "tokens differ per recipient");
    let swapped = mailer(
        &[
            "unsubscribe-token",
            path,
            &tokens[0].0,
            "--verify",
            &tokens[1].1,
        ],
        &env,
    );
    assert_eq!(
        (swapped.code, swapped.stdout.trim()),
        (1, "invalid"),
        "{swapped:?}"
    );
    let printed = mailer(&["unsubscribe-token", path, &tokens[0].0], &env);
    assert_eq!(
        printed.stdout.lines().next(),
        Some(tokens[0].1.as_str()),
        "{printed:?}"
    );
    // At every log level too: the_unsubscribe_key_and_the_dkim_key_never_show.
    assert!(
        !run.stderr.contains(KEY) && !run.stdout.contains(KEY),
        "the key never shows"
    );
}

#[test]
fn the_unsubscribe_key_and_the_dkim_key_never_show() {
    use base64::Engine as _;
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/dkim");
    let (acceptor, pem) = crate::sink::localhost_certificate();
    // Each loudness with one of the kinds of key file (RSA in PKCS #1 and PKCS #8, Ed25519).
    let key_files = [
        "rsa-pkcs1.pem",
        "rsa-pkcs8.pem",
        "ed25519.pem",
        "rsa-pkcs1.pem",
    ];
    for (loud, key_file) in crate::Loud::ALL.into_iter().zip(key_files) {
        let context = format!("{loud:?}, {key_file}");
        // The DKIM key as its file has it, line by line (any long line of it is a leak), in hex
        // (as bytes are printed) and decoded (as a database could hold it).
        let key = std::fs::read_to_string(keys.join(key_file)).unwrap();
        let body: Vec<&str> = key
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.concat())
            .unwrap();
        let mut secrets = vec![
            ("the unsubscribe key", KEY.as_bytes().to_vec()),
            ("the DKIM key, in hex", hex::encode(&der).into_bytes()),
            ("the DKIM key, decoded", der),
        ];
        for line in body.iter().filter(|l| l.len() >= 16) {
            secrets.push(("a line of the DKIM key file", line.as_bytes().to_vec()));
        }

        let copies = crate::StateCopies::default();
        let sink = Sink::with(
            copies.script(),
            crate::sink::Tls::Starttls(acceptor.clone()),
        );
        let (campaign, path) = marketing_over(
            crate::over_starttls(Campaign::example(), &sink, &pem),
            &["ann@example.com,Ann,fr,Pro", "bob@example.org,Bob,de,Team"],
        );
        std::fs::write(campaign.dir().join("dkim.pem"), &key).unwrap();
        let toml = std::fs::read_to_string(&path).unwrap()
            + "\n[dkim]\nselector = \"s2026\"\ndomain = \"example.com\"\nkey_path = \"dkim.pem\"\n";
        std::fs::write(&path, toml).unwrap();
        copies.watch(campaign.dir().join("mailer-state"));
        let env = [("TEST_UNSUBSCRIBE_KEY", KEY)];
        let run = mailer(
            &loud.args(&["send", path.to_str().unwrap()]),
            &loud.env(&env),
        );
        assert_eq!(run.code, 0, "{context}: {run:?}");
        // Both keys were used: each message is signed, and carries its signed link.
        let transactions = sink.transactions();
        assert_eq!(transactions.len(), 2, "{context}");
        for t in &transactions {
            assert!(t.encrypted, "{context}: over TLS");
            let message = crate::parse(&t.data);
            assert!(
                message.header_raw("DKIM-Signature").is_some(),
                "{context}: signed"
            );
            let unsubscribe = message
                .header_raw("List-Unsubscribe")
                .unwrap_or_default()
                .replace("\r\n", "");
            assert!(unsubscribe.contains("&t="), "{context}: {unsubscribe}");
        }
        loud.assert_logged(&run.stderr);
        crate::assert_never_shows(
            &secrets,
            &path,
            &run,
            loud,
            &env,
            &copies,
            ("ann@example.com", 2),
        );
    }
}

#[test]
fn a_marketing_campaign_without_its_key_sends_nothing() {
    let sink = Sink::start();
    let (_campaign, path) = marketing(&sink, &["ann@example.com,Ann,en,Pro"]);
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr
            .contains("`TEST_UNSUBSCRIBE_KEY` named by [unsubscribe] secret_env is not set"),
        "{}",
        run.stderr
    );
    assert_eq!(sink.connections(), 0);
}

#[test]
fn an_address_suppressed_while_the_send_runs_never_reaches_the_relay() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    // One connection. The sink holds its reply to the fourth message until the run has said
    // that it read the changed suppression list again; the two addresses suppressed meanwhile
    // are near the end of the list, so their turn comes after that, however slow the machine.
    let ends = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(AtomicBool::new(true));
    let script: crate::sink::Script = {
        let (ends, held) = (Arc::clone(&ends), Arc::clone(&held));
        Arc::new(move |phase, _| {
            if phase == crate::sink::Phase::EndOfData && ends.fetch_add(1, Ordering::SeqCst) == 3 {
                while held.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            None
        })
    };
    let sink = Sink::scripted(script);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(crate::campaign::people(20));
    let path = campaign.write();
    let suppress_file = campaign.dir().join("suppressed.txt");
    std::fs::write(&suppress_file, "user3@example3.com\n").unwrap();
    let toml = std::fs::read_to_string(&path).unwrap().replacen(
        "path = \"recipients.csv\"",
        "path = \"recipients.csv\"\nsuppress = [\"suppressed.txt\"]",
        1,
    );
    std::fs::write(&path, toml).unwrap();

    let mut running = crate::campaign::Running::send(&path, &[]);
    let log = running.log();
    let read_again = || log.contains("a suppression list changed; read again");
    // The limits below only keep a broken build from hanging the suite.
    let started = Instant::now();
    while ends.load(Ordering::SeqCst) < 4 {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Two more addresses suppressed. The watcher compares the file with what it saw when the
    // send began: written again, one line longer each time, until the run has read it.
    let mut writes = 0;
    while !read_again() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run never read the list again: {}",
            log.text()
        );
        std::fs::write(
            &suppress_file,
            format!(
                "user3@example3.com\n# asked to leave during the send\nUSER17@example3.com\nuser18@example4.com\n{}",
                "#\n".repeat(writes)
            ),
        )
        .unwrap();
        writes += 1;
        let written = Instant::now();
        while !read_again() && written.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    held.store(false, Ordering::SeqCst);
    let run = running.finish();
    let log = log.finish();
    let stdout = run.stdout.as_str();
    assert_eq!(run.code, 0, "{stdout}\n{log}");
    let received: std::collections::BTreeSet<String> = sink
        .transactions()
        .iter()
        .map(|t| t.rcpt_to[0].clone())
        .collect();
    for never in [
        "user3@example3.com",
        "user17@example3.com",
        "user18@example4.com",
    ] {
        assert!(!received.contains(never), "{never} was sent to");
    }
    assert_eq!(received.len(), 17, "everyone else: {received:?}");
    assert_eq!(crate::count(stdout, "suppressed"), Some(3), "{stdout}");
    let report = mailer(&["report", path.to_str().unwrap()], &[]);
    let suppressed_rows = report
        .stdout
        .lines()
        .filter(|l| l.contains(",suppressed,"))
        .count();
    assert_eq!(suppressed_rows, 3, "{}", report.stdout);
}

/// Verifies a DKIM signature with Python's dkimpy (an implementation independent of lettre),
/// answering the key lookup with `record`. Gives dkimpy's verdict and the signed header names.
fn dkimpy_verify(message: &[u8], record: &str) -> (bool, String) {
    use std::io::Write as _;
    const SCRIPT: &str = r#"
import sys, dkim
record = sys.argv[1].encode()
message = sys.stdin.buffer.read()
def dns(name, timeout=5):
    assert name == b"s2026._domainkey.example.com.", name
    return record
ok = dkim.verify(message, dnsfunc=dns)
signature = dkim.util.parse_tag_value(dkim.rfc822_parse(message)[0][0][1]) if False else None
headers = [v for k, v in dkim.rfc822_parse(message)[0] if k.lower() == b"dkim-signature"]
tags = dkim.util.parse_tag_value(b"".join(headers[0].split()))
print("ok" if ok else "bad", tags[b"h"].decode())
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT, record])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (scripts/test installs python3-dkim)");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "dkimpy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (verdict, headers) = stdout.trim().split_once(' ').unwrap();
    (verdict == "ok", headers.to_owned())
}

#[test]
fn dkim_signatures_verify_with_an_independent_implementation_for_rsa_and_ed25519() {
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/dkim");
    let rsa = std::fs::read_to_string(keys.join("rsa.pub.b64")).unwrap();
    let ed25519 = std::fs::read_to_string(keys.join("ed25519.pub.b64")).unwrap();
    for (key, record) in [
        ("rsa-pkcs1.pem", format!("v=DKIM1; k=rsa; p={}", rsa.trim())),
        ("rsa-pkcs8.pem", format!("v=DKIM1; k=rsa; p={}", rsa.trim())),
        (
            "ed25519.pem",
            format!("v=DKIM1; k=ed25519; p={}", ed25519.trim()),
        ),
    ] {
        let sink = Sink::start();
        let (campaign, path) = marketing(
            &sink,
            &["ann@example.com,Ann,fr,Pro", "bob@example.org,Bob,de,Team"],
        );
        std::fs::copy(keys.join(key), campaign.dir().join("dkim.pem")).unwrap();
        // With a return path per recipient too: the envelope changes, the signature does not.
        let toml = std::fs::read_to_string(&path).unwrap()
            + "\n[dkim]\nselector = \"s2026\"\ndomain = \"example.com\"\nkey_path = \"dkim.pem\"\n"
            + "\n[bounces]\nreturn_path = \"bounces@example.com\"\nsecret_env = \"TEST_BOUNCE_KEY\"\n";
        std::fs::write(&path, toml).unwrap();
        let run = mailer(
            &["send", path.to_str().unwrap()],
            &[
                ("TEST_UNSUBSCRIBE_KEY", KEY),
                ("TEST_BOUNCE_KEY", "bounce-key-of-the-dkim-test"),
            ],
        );
        assert_eq!(run.code, 0, "{key}: {run:?}");
        let transactions = sink.transactions();
        assert_eq!(transactions.len(), 2);
        assert_ne!(transactions[0].mail_from, transactions[1].mail_from);
        for t in &transactions {
            assert!(
                t.mail_from.starts_with("bounces+") && t.mail_from.ends_with("@example.com"),
                "{key}: {}",
                t.mail_from
            );
            let (ok, signed) = dkimpy_verify(&t.data, &record);
            assert!(
                ok,
                "{key}: the signature of the message to {} does not verify",
                t.rcpt_to[0]
            );
            for header in [
                "from",
                "to",
                "subject",
                "date",
                "message-id",
                "mime-version",
                "content-type",
                "list-unsubscribe",
                "list-unsubscribe-post",
            ] {
                assert!(
                    signed.split(':').any(|h| h == header),
                    "{key}: {header} not in h={signed}"
                );
            }
            // Tampering with a signed header breaks it: the check can fail.
            let tampered =
                String::from_utf8_lossy(&t.data).replacen("Subject: ", "Subject: Re: ", 1);
            assert!(
                !dkimpy_verify(tampered.as_bytes(), &record).0,
                "{key}: tampering went unnoticed"
            );
        }
    }
}

#[test]
fn check_warns_when_the_dkim_domain_does_not_align_with_the_from_domain() {
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/dkim");
    for (domain, aligned) in [("example.com", true), ("mail.example.net", false)] {
        let campaign = Campaign::example().rows(crate::campaign::people(2));
        let path = campaign.write();
        std::fs::copy(keys.join("ed25519.pem"), campaign.dir().join("dkim.pem")).unwrap();
        let toml = std::fs::read_to_string(&path).unwrap()
            + &format!(
                "\n[dkim]\nselector = \"s\"\ndomain = \"{domain}\"\nkey_path = \"dkim.pem\"\n"
            );
        std::fs::write(&path, toml).unwrap();
        let run = mailer(&["check", path.to_str().unwrap()], &[]);
        assert_eq!(run.code, 0, "a warning, not an error: {run:?}");
        assert_eq!(
            run.stdout
                .contains("does not align with the From domain `example.com`"),
            !aligned,
            "{domain}: {}",
            run.stdout
        );
    }
}

#[test]
fn non_ascii_subjects_are_encoded_and_a_non_ascii_mailbox_fails_without_smtputf8() {
    // A relay that offers 8BITMIME but not SMTPUTF8.
    let script: crate::sink::Script = std::sync::Arc::new(|phase, _| {
        (phase == crate::sink::Phase::Ehlo)
            .then(|| "250-sink.test\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES".to_owned())
    });
    let sink = Sink::scripted(script);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .row("ann@example.com,Ann,fr,Pro")
        .row("jörg@example.de,Jörg,de,Team");
    let path = campaign.write();
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 1, "one permanent failure: {run:?}");
    assert!(
        run.stdout
            .contains("the address has non-ASCII characters and the server lacks SMTPUTF8"),
        "{}",
        run.stdout
    );
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 1, "only Ann's message went");
    let raw = String::from_utf8_lossy(&transactions[0].data);
    let head = raw.split("\r\n\r\n").next().unwrap();
    assert!(head.is_ascii(), "headers are ASCII: {head}");
    let subject = head.lines().find(|l| l.starts_with("Subject: ")).unwrap();
    assert!(subject.contains("=?utf-8?"), "RFC 2047: {subject}");
    assert_eq!(
        crate::parse(&transactions[0].data).subject(),
        Some("Modification de nos conditions d’utilisation"),
        "and it decodes to the French subject"
    );
}

#[test]
fn inline_css_moves_style_rules_into_the_elements() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .row("ann@example.com,Ann,en,Pro")
        .file(
            "templates/html.hbs",
            "<html><head><style>p.note { color: #666666 }</style></head>\
             <body><p class=\"note\">{{t \"body\"}}</p></body></html>\n",
        );
    let path = campaign.write();
    for (inline, styled) in [(false, false), (true, true)] {
        let toml = std::fs::read_to_string(&path).unwrap();
        let toml = toml.replace("inline_css = true\n", "");
        let toml = if inline {
            toml.replacen(
                "default_locale = \"en\"",
                "default_locale = \"en\"\ninline_css = true",
                1,
            )
        } else {
            toml
        };
        std::fs::write(&path, toml).unwrap();
        let before = sink.transactions().len();
        // A fresh journal each time: the same recipient is sent to twice on purpose, so the
        // campaign's record of where its journal is goes too.
        let state = tempfile::tempdir().unwrap();
        let _ = std::fs::remove_file(mailer::journal::record_path(&path, "test-campaign"));
        let run = mailer(
            &[
                "send",
                path.to_str().unwrap(),
                "--state-dir",
                state.path().to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(run.code, 0, "{run:?}");
        let data = &sink.transactions()[before].data;
        let message = crate::parse(data);
        let html = message.body_html(0).unwrap();
        assert_eq!(
            html.contains("style=\"color: #666666"),
            styled,
            "inline_css = {inline}: {html}"
        );
        assert_eq!(
            html.contains("<style>"),
            !styled,
            "inline_css = {inline}: {html}"
        );
    }
}

#[test]
fn templates_get_the_recipients_own_unsubscribe_link() {
    let sink = Sink::start();
    let (campaign, path) = marketing(&sink, &["ann@example.com,Ann,en,Pro"]);
    std::fs::write(
        campaign.dir().join("templates/html.hbs"),
        "<p>{{t \"body\"}}</p><p><a href=\"{{unsubscribe_url}}\">Unsubscribe</a></p>\n",
    )
    .unwrap();
    let run = mailer(
        &["send", path.to_str().unwrap()],
        &[("TEST_UNSUBSCRIBE_KEY", KEY)],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let data = &sink.transactions()[0].data;
    let message = crate::parse(data);
    let header = message
        .header_raw("List-Unsubscribe")
        .unwrap()
        .replace("\r\n", "");
    let link = header.split(['<', '>']).nth(1).unwrap().to_owned();
    let html = message.body_html(0).unwrap();
    // The body's link is the header's (HTML-escaped in the attribute, as it should be).
    let decoded = html_escape::decode_html_entities(&html);
    assert!(
        decoded.contains(&format!("href=\"{link}\"")),
        "{link} in {html}"
    );
}

#[test]
fn check_warns_about_marketing_without_dkim_or_without_one_click() {
    let sink = Sink::start();
    let (_campaign, path) = marketing(&sink, &["ann@example.com,Ann,en,Pro"]);
    let env = [("TEST_UNSUBSCRIBE_KEY", KEY)];
    let run = mailer(&["check", path.to_str().unwrap()], &env);
    assert_eq!(run.code, 0, "warnings, not errors: {run:?}");
    assert!(
        run.stdout.contains("a marketing campaign without [dkim]"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("has no url"), "{}", run.stdout);
    // mailto only.
    let toml = std::fs::read_to_string(&path).unwrap();
    let toml = toml
        .replace("url = \"https://example.com/unsubscribe?list=news\"\n", "")
        .replace("secret_env = \"TEST_UNSUBSCRIBE_KEY\"\n", "");
    std::fs::write(&path, toml).unwrap();
    let run = mailer(&["check", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("[unsubscribe] has no url"),
        "{}",
        run.stdout
    );
}
