//! Integration tests: the real binary against an in-process SMTP sink, the file outbox and the
//! dry run, plus snapshots of rendered messages through the library.

mod architecture;
mod calendar;
mod bounces;
mod campaign;
mod corpus;
mod crash;
mod deliverability;
mod delivery;
mod gallery;
mod hostile;
mod journal;
mod locales;
mod operator;
mod output;
mod probe;
mod properties;
mod relay;
mod review;
mod sink;
mod snapshots;
mod strict_sink;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use campaign::{Campaign, mailer, people};
use mail_parser::{Message, MessageParser};
use sink::{Phase, Sink};

pub(crate) fn parse(data: &[u8]) -> Message<'_> {
    MessageParser::default()
        .parse(data)
        .expect("a parseable message")
}

fn to_addresses(message: &Message<'_>) -> Vec<String> {
    message
        .to()
        .map(|to| {
            to.iter()
                .filter_map(|a| a.address())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The number on the summary line that starts with `label`.
pub(crate) fn count(stdout: &str, label: &str) -> Option<usize> {
    stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
}

/// Header names present in a message's top-level header block, lower-cased.
fn header_names(message: &Message<'_>) -> Vec<String> {
    message
        .headers()
        .iter()
        .map(|h| h.name().to_ascii_lowercase())
        .collect()
}

/// How loudly a run logs. Secrets must not show at any level: these are the two that show the
/// most, each in both formats.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Loud {
    pub level: &'static str,
    pub json: bool,
}

impl Loud {
    pub(crate) const ALL: [Loud; 4] = [
        Loud {
            level: "trace",
            json: false,
        },
        Loud {
            level: "trace",
            json: true,
        },
        Loud {
            level: "debug",
            json: false,
        },
        Loud {
            level: "debug",
            json: true,
        },
    ];

    /// `args` and the log format.
    pub(crate) fn args<'a>(self, args: &[&'a str]) -> Vec<&'a str> {
        let format = if self.json { "json" } else { "text" };
        [args, &["--log-format", format]].concat()
    }

    /// `env` and `MAILER_LOG` at the level.
    pub(crate) fn env<'a>(self, env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        [env, &[("MAILER_LOG", self.level)]].concat()
    }

    /// Asserts that `stderr` is a log in this format with lines at this level, not only at the
    /// levels above: what a run logs at it, a secret logged at it would have shown in. (TRACE
    /// lines come from the TLS library, so a run that checks this has to speak TLS.)
    pub(crate) fn assert_logged(self, stderr: &str) {
        let mut levels = std::collections::BTreeMap::<String, usize>::new();
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            let level = if self.json {
                let entry: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{self:?}: not a JSON log line ({e}): {line}"));
                entry["level"].as_str().expect("a level").to_owned()
            } else {
                // An entry's first line starts with its level; a long value goes on over
                // the next lines.
                match line.split_whitespace().next() {
                    Some(level @ ("TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR")) => {
                        level.to_owned()
                    }
                    _ => continue,
                }
            };
            *levels.entry(level).or_default() += 1;
        }
        assert!(
            levels.contains_key("DEBUG"),
            "{self:?}: no DEBUG line ({levels:?}):\n{stderr}"
        );
        assert_eq!(
            levels.contains_key("TRACE"),
            self.level == "trace",
            "{self:?}: TRACE lines ({levels:?}):\n{stderr}"
        );
    }
}

/// A file's path and its bytes as they were when copied.
type FileCopy = (std::path::PathBuf, Vec<u8>);

/// Copies of the files of a campaign's state folder (the journal, its -wal and -shm, the lock):
/// taken by the sink at the end of each message's data, while the send waits for the reply and
/// its journal's -wal is there (a clean end removes it), and by the test after the run.
#[derive(Clone, Default)]
pub(crate) struct StateCopies {
    dir: Arc<std::sync::Mutex<Option<std::path::PathBuf>>>,
    taken: Arc<std::sync::Mutex<Vec<FileCopy>>>,
}

impl StateCopies {
    /// The state folder to copy from now on.
    pub(crate) fn watch(&self, dir: std::path::PathBuf) {
        *self.dir.lock().unwrap() = Some(dir);
    }

    /// Copies every file in the state folder as it is now.
    pub(crate) fn copy(&self) {
        let Some(dir) = self.dir.lock().unwrap().clone() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            // A file SQLite removes meanwhile is simply not copied this time.
            if let Ok(bytes) = std::fs::read(&path) {
                self.taken.lock().unwrap().push((path, bytes));
            }
        }
    }

    /// A sink script with the normal replies that copies the state folder before it answers
    /// the end of each message's data.
    pub(crate) fn script(&self) -> sink::Script {
        let copies = self.clone();
        Arc::new(move |phase, _| {
            if phase == Phase::EndOfData {
                copies.copy();
            }
            None
        })
    }

    /// Every copy taken, of the files whose name ends with `suffix`.
    fn of(&self, suffix: &str) -> Vec<FileCopy> {
        self.taken
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _)| path.to_str().unwrap().ends_with(suffix))
            .cloned()
            .collect()
    }
}

/// Whether `needle` is in `bytes`.
pub(crate) fn holds(bytes: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(bytes, needle).is_some()
}

/// Asserts that no secret in `secrets` (each a name and the bytes to look for) shows where a
/// send of the campaign at `path` leaves traces: in what `run` printed; in its state folder's
/// files, as copied during the send (the -wal included) and after it; and in what
/// `mailer status`, `status --json`, `report --format csv` and `report --format json` print,
/// run as loudly with `env`. First, `recipient` (an address the send delivered to, one of
/// `sent`) must show in the journal, its -wal and both reports: the search looks where the
/// data is.
pub(crate) fn assert_never_shows(
    secrets: &[(&str, Vec<u8>)],
    path: &std::path::Path,
    run: &campaign::Run,
    loud: Loud,
    env: &[(&str, &str)],
    copies: &StateCopies,
    (recipient, sent): (&str, usize),
) {
    let printed = |what: &str, run: &campaign::Run| {
        for (name, secret) in secrets {
            let shown: Vec<&str> = [&run.stdout, &run.stderr]
                .into_iter()
                .flat_map(|text| text.lines())
                .filter(|line| holds(line.as_bytes(), secret))
                .collect();
            assert!(
                shown.is_empty(),
                "{loud:?}: {name} shows in what {what} printed (exit {}): {shown:#?}",
                run.code
            );
        }
    };
    printed("send", run);

    copies.copy();
    for (suffix, what) in [(".journal", "the journal"), (".journal-wal", "its -wal")] {
        let taken = copies.of(suffix);
        assert!(
            taken
                .iter()
                .any(|(_, bytes)| holds(bytes, recipient.as_bytes())),
            "{loud:?}: {recipient} is in no copy of {what} ({} copies)",
            taken.len()
        );
    }
    let all = copies.of("");
    for (file, bytes) in &all {
        for (name, secret) in secrets {
            assert!(
                !holds(bytes, secret),
                "{loud:?}: {name} is in {}",
                file.display()
            );
        }
    }

    let path = path.to_str().unwrap();
    let env = loud.env(env);
    let status = mailer(&loud.args(&["status", path]), &env);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(
        status.stdout.contains(&format!("sent {sent}")),
        "{status:?}"
    );
    printed("status", &status);
    let json = mailer(&loud.args(&["status", path, "--json"]), &env);
    assert_eq!(json.code, 0, "{json:?}");
    let counts: serde_json::Value = serde_json::from_str(&json.stdout).expect("status JSON");
    assert_eq!(counts["counts"]["sent"], sent, "{json:?}");
    printed("status --json", &json);
    for format in ["csv", "json"] {
        let report = mailer(&loud.args(&["report", path, "--format", format]), &env);
        assert_eq!(report.code, 0, "{report:?}");
        assert!(report.stdout.contains(recipient), "{report:?}");
        printed(&format!("report --format {format}"), &report);
    }
}

/// A campaign's transport set to STARTTLS on `sink` (which offers it with the certificate of
/// `pem`), verified against `pem`: the way credentials go in real life, and the way the TLS
/// library logs at TRACE.
pub(crate) fn over_starttls(campaign: Campaign, sink: &Sink, pem: &str) -> Campaign {
    campaign
        .transport_kind(&format!(
            "kind = \"smtp\"\nurl = \"smtp://localhost:{}\"\nconnections = 1\nrequire_starttls = true",
            sink.port()
        ))
        .file("relay-ca.pem", pem)
        .transport("ca_file = \"relay-ca.pem\"")
}

#[test]
fn two_hundred_recipients_in_four_locales_over_four_connections() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 4).rows(people(200));
    let run = campaign.run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(count(&run.stdout, "sent"), Some(200), "{}", run.stdout);

    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 200);
    let used: HashSet<usize> = transactions.iter().map(|t| t.connection).collect();
    assert!(
        used.len() > 1 && sink.connections() <= 4,
        "used {used:?} of {} connections",
        sink.connections()
    );

    let mut message_ids = HashMap::new();
    for t in &transactions {
        assert_eq!(t.rcpt_to.len(), 1, "one RCPT per transaction");
        assert_eq!(t.mail_from, "news@example.com");
        let message = parse(&t.data);
        assert_eq!(to_addresses(&message), t.rcpt_to, "To equals the envelope");
        let names = header_names(&message);
        for forbidden in ["cc", "bcc", "resent-to", "apparently-to"] {
            assert!(
                !names.contains(&forbidden.to_owned()),
                "{forbidden} in {names:?}"
            );
        }
        let i: usize = t.rcpt_to[0]
            .trim_start_matches("user")
            .split('@')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let text = message.body_text(0).unwrap().into_owned();
        let html = message.body_html(0).unwrap().into_owned();
        let subject = message.subject().unwrap();
        let (greeting, subject_start, plan) = match i % 5 {
            0 | 4 => ("Hello", "Changes to our terms", "Your current plan"), // en, and es falling back to en
            1 => (
                "Bonjour",
                "Modification de nos conditions",
                "Votre formule actuelle",
            ),
            2 => (
                "Allô",
                "Modification de nos conditions",
                "Votre forfait actuel",
            ), // fr-CA, subject from fr
            _ => ("Hallo", "Änderungen unserer", "Ihr aktueller Tarif"),
        };
        assert!(text.starts_with(greeting), "line {i}: {text}");
        assert!(subject.starts_with(subject_start), "line {i}: {subject}");
        assert!(text.contains(plan), "line {i}: {text}");
        if i % 5 == 3 {
            assert!(
                text.contains("You receive this message"),
                "de falls back to the English footer: {text}"
            );
        }
        if i.is_multiple_of(4) {
            assert!(
                text.contains(&format!("Zoë <b>&</b> Co {i}")),
                "text keeps the name intact: {text}"
            );
            assert!(
                html.contains(&format!("Zoë &lt;b&gt;&amp;&lt;/b&gt; Co {i}")),
                "HTML escapes it: {html}"
            );
            assert!(!html.contains("<b>&</b>"), "{html}");
        }
        let id = message.message_id().unwrap().to_owned();
        assert!(id.ends_with("@example.com"), "{id}");
        message_ids.insert(t.rcpt_to[0].clone(), id);
    }
    let unique: HashSet<&String> = message_ids.values().collect();
    assert_eq!(unique.len(), 200, "Message-IDs are unique");

    // Rendered again, by another run (another campaign folder, so another journal: everyone
    // is due again), each recipient's Message-ID is the same.
    let again = Sink::start();
    let rerun = Campaign::example()
        .smtp(&again, 2)
        .rows(people(200))
        .run("send", &[]);
    assert_eq!(rerun.code, 0, "{rerun:?}");
    assert_eq!(count(&rerun.stdout, "sent"), Some(200), "{}", rerun.stdout);
    let resent = again.transactions();
    assert_eq!(resent.len(), 200, "the rerun sent to everyone again");
    let mut compared = HashSet::new();
    for t in &resent {
        assert_eq!(t.rcpt_to.len(), 1, "one RCPT per transaction");
        let message = parse(&t.data);
        assert_eq!(
            Some(message.message_id().unwrap()),
            message_ids.get(&t.rcpt_to[0]).map(String::as_str),
            "{}",
            t.rcpt_to[0]
        );
        compared.insert(t.rcpt_to[0].clone());
    }
    assert_eq!(
        compared,
        message_ids.keys().cloned().collect::<HashSet<_>>(),
        "every recipient's Message-ID was compared"
    );
}

#[test]
fn a_dry_run_takes_the_whole_pipeline_and_opens_no_connection() {
    let sink = Sink::start();
    let run = Campaign::example()
        .smtp(&sink, 3)
        .rows(people(25))
        .run("send", &["--dry-run"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        count(&run.stdout, "would be sent (dry run)"),
        Some(25),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("by locale: de 5, en 10, fr 5, fr-CA 5"),
        "{}",
        run.stdout
    );
    assert_eq!(sink.connections(), 0);
}

#[test]
fn the_file_transport_writes_one_parseable_eml_per_recipient_and_rewrites_them_on_rerun() {
    let campaign = Campaign::example()
        .rows(people(30))
        .row("user0@EXAMPLE0.com,dup,en,x");
    let path = campaign.write();
    let outbox = campaign.dir().join("outbox");
    let expected: HashSet<String> = (0..30)
        .map(|i| format!("user{i}@example{}.com", i % 7))
        .collect();
    // The outbox's files by name, each checked to be one message to one recipient.
    let written = || -> HashMap<String, String> {
        let mut by_name = HashMap::new();
        for entry in std::fs::read_dir(&outbox).unwrap() {
            let file = entry.unwrap().path();
            assert_eq!(file.extension().unwrap(), "eml", "{file:?}");
            let bytes = std::fs::read(&file).unwrap();
            let to = to_addresses(&parse(&bytes));
            assert_eq!(to.len(), 1, "{file:?}");
            let name = file.file_name().unwrap().to_str().unwrap().to_owned();
            by_name.insert(name, to[0].clone());
        }
        let recipients: HashSet<String> = by_name.values().cloned().collect();
        assert_eq!(recipients, expected);
        assert_eq!(by_name.len(), 30, "{by_name:?}");
        by_name
    };

    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(count(&run.stdout, "sent"), Some(30), "{}", run.stdout);
    let first = written();

    // Every file spoiled, then the campaign sent again from a fresh journal (its own would
    // say that nothing is due): the same 30 files, written anew, and no copies beside them.
    let marker = b"spoiled before the rerun\r\n";
    for name in first.keys() {
        std::fs::write(outbox.join(name), marker).unwrap();
    }
    let fresh = tempfile::tempdir().unwrap();
    // Sending the whole campaign again on purpose: its record of where its journal is goes
    // too, or mailer refuses the second journal.
    std::fs::remove_file(mailer::journal::record_path(&path, "test-campaign")).unwrap();
    let rerun = mailer(
        &[
            "send",
            path.to_str().unwrap(),
            "--state-dir",
            fresh.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(rerun.code, 0, "{rerun:?}");
    // The summary tells what this run did apart only when it differs from the total.
    assert_eq!(count(&rerun.stdout, "sent"), Some(30), "{}", rerun.stdout);
    assert!(
        !rerun.stdout.contains("in this run"),
        "all 30 in this run: {}",
        rerun.stdout
    );
    assert_eq!(written(), first, "the same names for the same recipients");
    for name in first.keys() {
        assert_ne!(
            std::fs::read(outbox.join(name)).unwrap(),
            marker,
            "{name} was not rewritten"
        );
    }
}

#[test]
fn check_reports_every_problem_at_once_and_the_fallbacks() {
    let campaign = Campaign::example()
        .row("ok@example.com,A,de,x")
        .row("bad@,B,en,x")
        .row("ok@example.com,A again,en,x")
        .row("also bad,C,en,x");
    let run = campaign.run("check", &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stdout.contains(
            "1 of 1 messages rendered and checked\n2 invalid rows, 1 duplicate rows, 0 suppressed"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("recipients.csv:3: `bad@` is not a valid address"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("recipients.csv:5: `also bad` is not a valid address"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("recipients.csv:4: warning: repeats the address of line 2"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(
            "locales/de: warning: `footer` not translated in `de`; shown in `en` (de → en)"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(
            "2 errors (0 in the campaign files, 2 in rows, 0 stopped by the guard), 3 warnings"
        ),
        "{}",
        run.stdout
    );
}

#[test]
fn refusals_are_recorded_per_recipient_and_set_the_exit_code() {
    let script: sink::Script = Arc::new(|phase, rcpt| match (phase, rcpt) {
        (Phase::Rcpt, "user3@example3.com") => Some("550 5.1.1 no such user".to_owned()),
        (Phase::EndOfData, "user4@example4.com") => Some("554 5.7.1 rejected as spam".to_owned()),
        (Phase::Rcpt, "user5@example5.com") => Some("451 4.3.0 try again later".to_owned()),
        _ => None,
    });
    let sink = Sink::scripted(script);
    let run = Campaign::example()
        .smtp(&sink, 2)
        .rows(people(12))
        .run("send", &[]);
    assert_eq!(
        run.code, 75,
        "a deferred recipient means work remains: {run:?}"
    );
    assert_eq!(count(&run.stdout, "sent"), Some(9), "{}", run.stdout);
    assert_eq!(count(&run.stdout, "deferred"), Some(1), "{}", run.stdout);
    assert_eq!(count(&run.stdout, "failed"), Some(2), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("user3@example3.com failed: 550 5.1.1 no such user"),
        "{}",
        run.stdout
    );
    let delivered: Vec<String> = sink
        .transactions()
        .iter()
        .filter(|t| t.reply.starts_with('2'))
        .map(|t| t.rcpt_to[0].clone())
        .collect();
    assert_eq!(delivered.len(), 9);
    assert!(!delivered.iter().any(|r| {
        [
            "user3@example3.com",
            "user4@example4.com",
            "user5@example5.com",
        ]
        .contains(&r.as_str())
    }));

    let only_permanent: sink::Script = Arc::new(|phase, rcpt| {
        (phase == Phase::Rcpt && rcpt == "user1@example1.com").then(|| "550 5.1.1 gone".to_owned())
    });
    let sink = Sink::scripted(only_permanent);
    let run = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(4))
        .run("send", &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(sink.transactions().len(), 3);
}

#[test]
fn a_hang_up_after_the_body_is_ambiguous_and_never_sent_again() {
    let script: sink::Script = Arc::new(|phase, rcpt| {
        (phase == Phase::EndOfData && rcpt == "user2@example2.com").then(|| "DROP".to_owned())
    });
    let sink = Sink::scripted(script);
    let run = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(6))
        .run("send", &[]);
    assert_eq!(
        run.code, 1,
        "an ambiguous outcome is not a clean completion: {run:?}"
    );
    assert_eq!(count(&run.stdout, "ambiguous"), Some(1), "{}", run.stdout);
    assert_eq!(count(&run.stdout, "sent"), Some(5), "{}", run.stdout);
    let received: Vec<String> = sink
        .transactions()
        .iter()
        .map(|t| t.rcpt_to[0].clone())
        .collect();
    assert_eq!(
        received
            .iter()
            .filter(|r| *r == "user2@example2.com")
            .count(),
        1,
        "received once, not re-sent"
    );
    assert_eq!(received.len(), 6, "{received:?}");
    assert_eq!(
        sink.connections(),
        2,
        "a new connection after the broken one"
    );
}

#[test]
fn a_relay_without_8bitmime_is_a_relay_failure_for_8bit_messages() {
    let plain_ehlo: sink::Script = Arc::new(|phase, _| {
        (phase == Phase::Ehlo).then(|| "250-sink.test\r\n250 ENHANCEDSTATUSCODES".to_owned())
    });
    // people() has accented names: the text parts are 8bit.
    let sink = Sink::scripted(Arc::clone(&plain_ehlo));
    let run = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(3))
        .run("send", &[]);
    assert_eq!(run.code, 69, "{run:?}");
    assert!(
        run.stderr.contains("the relay does not offer 8BITMIME"),
        "{}",
        run.stderr
    );
    assert_eq!(count(&run.stdout, "pending"), Some(3), "{}", run.stdout);
    assert!(sink.transactions().is_empty());

    // ASCII-only messages are 7bit and go through.
    let sink = Sink::scripted(plain_ehlo);
    let run = Campaign::example()
        .smtp(&sink, 1)
        .row("ann@example.com,Ann,en,Pro")
        .run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sink.transactions().len(), 1);
}

#[test]
fn connections_are_reused_up_to_messages_per_connection() {
    let sink = Sink::start();
    let run = Campaign::example()
        .smtp(&sink, 1)
        .transport("messages_per_connection = 3")
        .rows(people(10))
        .run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sink.transactions().len(), 10);
    assert_eq!(sink.connections(), 4);
}

#[test]
fn an_unreachable_relay_exits_69_with_everyone_still_pending() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let campaign = Campaign::example().rows(people(5)).transport_kind(&format!(
        "kind = \"smtp\"\nurl = \"smtp://127.0.0.1:{port}\""
    ));
    let path = campaign.write();
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 69, "{run:?}");
    assert_eq!(count(&run.stdout, "pending"), Some(5), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("relay unavailable, 5 recipients left pending"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_password_comes_from_the_environment_or_a_file_and_never_shows() {
    use base64::Engine as _;
    let secret = "s3cret-Value-42";
    let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    // As typed, and as AUTH PLAIN and AUTH LOGIN put it on the wire.
    let secrets = [
        ("the password", secret.as_bytes().to_vec()),
        (
            "the AUTH PLAIN credentials",
            base64(format!("\0mailer-user\0{secret}").as_bytes()).into_bytes(),
        ),
        (
            "the AUTH LOGIN password",
            base64(secret.as_bytes()).into_bytes(),
        ),
    ];
    let (acceptor, pem) = sink::localhost_certificate();
    for from_file in [false, true] {
        for loud in Loud::ALL {
            let context = format!("{loud:?}, from a file: {from_file}");
            let copies = StateCopies::default();
            let sink = Sink::with(copies.script(), sink::Tls::Starttls(acceptor.clone()));
            let keys = if from_file {
                "username = \"mailer-user\"\npassword_file = \"smtp-password\""
            } else {
                "username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\""
            };
            let campaign = over_starttls(Campaign::example(), &sink, &pem)
                .transport(keys)
                .file("smtp-password", &format!("{secret}\n"))
                .rows(people(3));
            let path = campaign.write();
            copies.watch(campaign.dir().join("mailer-state"));
            let env: &[(&str, &str)] = if from_file {
                &[]
            } else {
                &[("TEST_SMTP_PASSWORD", secret)]
            };
            let run = mailer(
                &loud.args(&["send", path.to_str().unwrap()]),
                &loud.env(env),
            );
            assert_eq!(run.code, 0, "{context}: {run:?}");
            assert_eq!(count(&run.stdout, "sent"), Some(3), "{context}: {run:?}");
            // The password went where it belongs, and only there.
            assert_eq!(
                sink.logins(),
                vec![format!("mailer-user:{secret}")],
                "{context}"
            );
            let transactions = sink.transactions();
            assert!(
                transactions.len() == 3 && transactions.iter().all(|t| t.encrypted),
                "{context}: over TLS"
            );
            loud.assert_logged(&run.stderr);
            assert_never_shows(
                &secrets,
                &path,
                &run,
                loud,
                env,
                &copies,
                ("user0@example0.com", 3),
            );
        }
    }

    // Without the variable, nothing is sent.
    let sink = Sink::start();
    let fresh = Campaign::example()
        .smtp(&sink, 1)
        .transport("username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"")
        .rows(people(3));
    let path = fresh.write();
    let missing = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(missing.code, 65, "{missing:?}");
    assert!(
        missing
            .stderr
            .contains("`TEST_SMTP_PASSWORD` named by password_env is not set"),
        "{}",
        missing.stderr
    );
    assert_eq!(sink.connections(), 0);

    // Review finds it too: `check` and `plan` do not pass a campaign the send would refuse,
    // nor an empty password file or a `ca_file` that is not there.
    for command in ["check", "plan"] {
        let run = mailer(&[command, path.to_str().unwrap()], &[]);
        assert_eq!(run.code, 65, "{command}: {run:?}");
        assert!(
            run.stdout
                .contains("`TEST_SMTP_PASSWORD` named by password_env is not set")
                || run
                    .stderr
                    .contains("`TEST_SMTP_PASSWORD` named by password_env is not set"),
            "{command}: {run:?}"
        );
        let set = mailer(
            &[command, path.to_str().unwrap()],
            &[("TEST_SMTP_PASSWORD", "pw")],
        );
        assert_eq!(set.code, 0, "{command}: {set:?}");
    }
    let empty = Campaign::example()
        .smtp(&sink, 1)
        .transport(
            "username = \"mailer-user\"\npassword_file = \"pw.txt\"\nca_file = \"no-such-ca.pem\"",
        )
        .file("pw.txt", "\n")
        .rows(people(3));
    let path = empty.write();
    let run = mailer(&["check", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(run.stdout.contains("pw.txt` is empty"), "{}", run.stdout);
    assert!(run.stdout.contains("ca_file"), "{}", run.stdout);
    assert_eq!(sink.connections(), 0);
}

#[test]
fn init_scaffolds_a_campaign_that_checks_and_sends() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("announce");
    let run = mailer(&["init", target.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let campaign = target.join("campaign.toml");
    let check = mailer(&["check", campaign.to_str().unwrap()], &[]);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(
        check
            .stdout
            .contains("19 of 19 messages rendered and checked"),
        "{}",
        check.stdout
    );
    let send = mailer(&["send", campaign.to_str().unwrap()], &[]);
    assert_eq!(send.code, 0, "{send:?}");
    assert_eq!(
        std::fs::read_dir(target.join("outbox")).unwrap().count(),
        19
    );
    let again = mailer(&["init", target.to_str().unwrap()], &[]);
    assert_eq!(again.code, 65, "{again:?}");
    assert!(again.stderr.contains("is not empty"), "{}", again.stderr);
}

#[test]
fn preview_writes_the_first_messages_of_each_locale() {
    let campaign = Campaign::example().rows(people(40));
    let out = campaign.dir().join("preview");
    let run = campaign.run(
        "preview",
        &["--out", out.to_str().unwrap(), "--per-locale", "2"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    for locale in ["en", "fr", "fr-CA", "de"] {
        let files: Vec<_> = std::fs::read_dir(out.join(locale)).unwrap().collect();
        assert_eq!(files.len(), 2, "{locale}");
    }
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    assert_eq!(mailer(&["send"], &[]).code, 64);
    assert_eq!(mailer(&["frobnicate"], &[]).code, 64);
    let help = mailer(&["send", "--help"], &[]);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("--dry-run"), "{}", help.stdout);
}

/// The campaign file of a campaign sending to `url` on the sink, with extra transport keys.
fn tls_campaign(url: &str, keys: &str, pem: Option<&str>) -> (Campaign, std::path::PathBuf) {
    let mut campaign = Campaign::example()
        .rows(people(6))
        .transport_kind(&format!("kind = \"smtp\"\nurl = \"{url}\"\n{keys}"));
    if let Some(pem) = pem {
        campaign = campaign
            .file("relay-ca.pem", pem)
            .transport("ca_file = \"relay-ca.pem\"");
    }
    let path = campaign.write();
    (campaign, path)
}

#[test]
fn starttls_is_used_and_the_certificate_verified() {
    let (acceptor, pem) = sink::localhost_certificate();
    let sink = Sink::tls(sink::Tls::Starttls(acceptor.clone()));
    let url = format!("smtp://localhost:{}", sink.port());
    let (_trusted, path) = tls_campaign(&url, "require_starttls = true", Some(&pem));
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 6);
    assert!(
        transactions.iter().all(|t| t.encrypted),
        "every message went over TLS"
    );

    // The same relay with a certificate nobody vouches for: nothing is sent. Waiting would
    // not help, and nothing went yet: the run ends (exit 65) saying what to change.
    let (_untrusted, path) = tls_campaign(&url, "require_starttls = true", None);
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "mailer refused the certificate of the relay at `localhost:{}`: no trusted CA signed it; give the CA that signed it in `ca_file`",
            sink.port()
        )),
        "{}",
        run.stderr
    );
    assert_eq!(sink.transactions().len(), 6, "no new transaction");

    // Unless the operator says so, loudly.
    let (_dangerous, path) = tls_campaign(
        &url,
        "require_starttls = true\ndangerous_accept_invalid_certs = true",
        None,
    );
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(sink.transactions().len(), 12);
}

#[test]
fn a_relay_without_starttls_is_refused_when_tls_is_required() {
    let sink = Sink::start();
    let (_campaign, path) = tls_campaign(
        &format!("smtp://localhost:{}", sink.port()),
        "require_starttls = true",
        None,
    );
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "the relay at `localhost:{}` does not offer STARTTLS, which mailer requires",
            sink.port()
        )),
        "{}",
        run.stderr
    );
    assert!(sink.transactions().is_empty());
    // Nothing was sent, so nothing is halted: the next send tries again (and says the same).
    let before = sink.connections();
    let again = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(again.code, 65, "{again:?}");
    assert!(!again.stderr.contains("halted"), "{}", again.stderr);
    // At most one connection per worker (four), none tried again.
    let opened = sink.connections() - before;
    assert!((1..=4).contains(&opened), "{opened} connections");
}

#[test]
fn smtps_speaks_tls_from_the_first_byte() {
    let (acceptor, pem) = sink::localhost_certificate();
    let sink = Sink::tls(sink::Tls::Implicit(acceptor));
    let (_campaign, path) = tls_campaign(
        &format!("smtps://localhost:{}", sink.port()),
        "",
        Some(&pem),
    );
    let run = mailer(&["send", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 6);
    assert!(transactions.iter().all(|t| t.encrypted));
}

#[test]
fn a_leak_in_one_rows_data_sends_nothing_and_names_both_rows() {
    let sink = Sink::start();
    // people(10) fills lines 2 to 11; user3 is on line 5. Line 12 quotes user3's address.
    let run = Campaign::example()
        .smtp(&sink, 2)
        .rows(people(10))
        .row("eve@example.net,\"Eve (cc User3@Example3.com)\",en,x")
        .run("send", &[]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr
            .contains("recipients.csv:12: the guard stopped the message to this row"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("contains `user3@example3.com`, the address of the recipient on line 5"),
        "{}",
        run.stderr
    );
    assert_eq!(sink.connections(), 0, "zero messages");
}

/// November 2019: a last-minute change put ~1,000 addresses in the To field of each message.
/// Every way of getting two recipients into one message — config, template, data — is either
/// impossible to express or refused before anything is sent.
#[test]
fn the_2019_incident_cannot_happen() {
    // Config: there is no key that names recipients.
    for key in [
        "to = \"all@example.com\"",
        "cc = [\"a@example.com\"]",
        "bcc = \"b@example.com\"",
        "batch_recipients = 1000",
    ] {
        let sink = Sink::start();
        let campaign = Campaign::example().smtp(&sink, 1).rows(people(3));
        let path = campaign.write();
        let toml = std::fs::read_to_string(&path)
            .unwrap()
            .replace("[campaign]\n", &format!("[campaign]\n{key}\n"));
        std::fs::write(&path, toml).unwrap();
        let run = mailer(&["send", path.to_str().unwrap()], &[]);
        assert_eq!(run.code, 65, "{key}: {run:?}");
        assert!(
            run.stderr.contains("campaign.toml:2: unknown field"),
            "{key}: {}",
            run.stderr
        );
        assert_eq!(sink.connections(), 0, "{key}");
    }

    // Templates: a recipient list pasted into a template, or a header smuggled into the subject.
    let templates = [
        (
            "templates/text.hbs",
            "Hello all: user0@example0.com, user1@example1.com, user2@example2.com\n",
        ),
        (
            "templates/html.hbs",
            "<a href=\"mailto:user1%40example1.com\">write</a>\n",
        ),
        (
            "templates/subject.hbs",
            "News{{#if r.name}}\r\nBcc: user0@example0.com{{/if}}\n",
        ),
    ];
    for (file, text) in templates {
        let sink = Sink::start();
        let run = Campaign::example()
            .smtp(&sink, 1)
            .rows(people(3))
            .file(file, text)
            .run("send", &[]);
        assert_eq!(run.code, 65, "{file}: {run:?}");
        assert_eq!(sink.connections(), 0, "{file}");
    }

    // Data: several addresses in one cell is an invalid row, never a list.
    for cell in [
        "user0@example0.com, user1@example1.com",
        "user0@example0.com;user1@example1.com",
        "<user0@example0.com>,<x@example.net>",
    ] {
        let sink = Sink::start();
        let run = Campaign::example()
            .smtp(&sink, 1)
            .rows(people(3))
            .row(&format!("\"{cell}\",Many,en,x"))
            .run("send", &[]);
        assert_eq!(run.code, 65, "{cell}: {run:?}");
        assert_eq!(sink.connections(), 0, "{cell}");
    }

    // Even when the operator lets invalid rows be skipped, the bad row goes nowhere and every
    // other message has exactly one recipient.
    let sink = Sink::start();
    let run = Campaign::example()
        .smtp(&sink, 2)
        .rows(people(5))
        .row("\"user0@example0.com, user1@example1.com\",Many,en,x")
        .extra("[safety]\nmax_invalid = 1\n")
        .run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(count(&run.stdout, "invalid"), Some(1), "{}", run.stdout);
    let transactions = sink.transactions();
    assert_eq!(transactions.len(), 5);
    for t in transactions {
        assert_eq!(t.rcpt_to.len(), 1);
        assert_eq!(to_addresses(&parse(&t.data)), t.rcpt_to);
    }
}
