//! Review before sending, through the real binary (issue 6): `mailer plan` and its
//! fingerprint, `send --approve` over SMTP (missing, unknown, stale, malformed, right), the
//! `[safety] canary` stage, `send --limit`, and `[safety] expect_count`. Every claim that
//! something was or was not sent is proved from the RCPT TO the in-process sink received.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::campaign::{Campaign, Run, mailer, people, unapproved};
use crate::journal::{arg, query, state_count, status};
use crate::sink::Sink;

const SEED1: &str = "seed1@canary.example";
const SEED2: &str = "seed2@canary.example";

/// Where a test campaign's journal is by default (the builder's id is `test-campaign`).
fn journal_file(dir: &Path) -> PathBuf {
    dir.join("mailer-state").join("test-campaign.journal")
}

/// Every address of `people(n)`.
fn addresses(n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| format!("user{i}@example{}.com", i % 7))
        .collect()
}

/// How many `RCPT TO` the sink was sent per address (whatever it answered), after checking
/// that every transaction that reached the end of DATA had exactly one.
fn rcpts(sink: &Sink) -> BTreeMap<String, usize> {
    for t in sink.transactions() {
        assert_eq!(t.rcpt_to.len(), 1, "one RCPT per transaction: {t:?}");
    }
    let mut counts = BTreeMap::new();
    for attempt in sink.rcpts() {
        *counts.entry(attempt.rcpt).or_default() += 1;
    }
    counts
}

/// Asserts that the sink got no `RCPT TO` and no message.
fn nothing_received(sink: &Sink, context: &str) {
    assert!(
        sink.rcpts().is_empty() && sink.transactions().is_empty(),
        "{context}: the sink received {:?}",
        rcpts(sink)
    );
}

/// The journal's recipient rows (`mailer report --format json`), or `None` when the binary
/// says the campaign has no journal at all. Where the binary finds the journal is checked
/// against [`journal_file`], which the tests that query it directly rely on.
fn recipient_rows(path: &Path) -> Option<Vec<serde_json::Value>> {
    let run = unapproved(&["report", arg(path), "--format", "json"], &[]);
    let expected = journal_file(path.parent().unwrap());
    if run.code != 0 {
        assert!(
            run.stderr.contains("no journal at") && run.stderr.contains(arg(&expected)),
            "the report failed for another reason than a missing journal: {run:?}"
        );
        assert!(!expected.exists(), "the journal is there: {run:?}");
        return None;
    }
    assert!(
        expected.exists(),
        "a report without a journal at {}",
        expected.display()
    );
    let rows: serde_json::Value = serde_json::from_str(&run.stdout).expect("report JSON");
    Some(rows.as_array().expect("a JSON array").clone())
}

/// `mailer plan FILE --json`: its exit code and the one JSON object it printed (the whole of
/// standard output must parse as one).
fn plan_json(path: &Path) -> (i32, serde_json::Value) {
    let run = unapproved(&["plan", arg(path), "--json"], &[]);
    let plan: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("plan --json prints one JSON object ({e}): {run:?}"));
    assert!(plan.is_object(), "{plan}");
    (run.code, plan)
}

/// The full fingerprint of a plan that can be sent.
fn fingerprint(path: &Path) -> String {
    let (code, plan) = plan_json(path);
    assert_eq!(code, 0, "{plan}");
    assert_eq!(plan["sendable"], true, "{plan}");
    let fingerprint = plan["fingerprint"]
        .as_str()
        .expect("a fingerprint")
        .to_owned();
    assert!(
        fingerprint.len() == 64
            && fingerprint
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "a SHA-256 in lower-case hex: {fingerprint}"
    );
    fingerprint
}

/// `mailer send FILE <args…>`, exactly as given (no approval added).
fn send(path: &Path, args: &[&str]) -> Run {
    unapproved(&[&["send", arg(path)], args].concat(), &[])
}

/// Adds `suppress = ["suppressed.txt"]` to the written campaign file, with these addresses.
fn suppress(path: &Path, addresses: &[&str]) {
    let dir = path.parent().unwrap();
    std::fs::write(dir.join("suppressed.txt"), addresses.join("\n") + "\n").unwrap();
    let toml = std::fs::read_to_string(path).unwrap().replacen(
        "path = \"recipients.csv\"",
        "path = \"recipients.csv\"\nsuppress = [\"suppressed.txt\"]",
        1,
    );
    std::fs::write(path, toml).unwrap();
}

/// Appends `text` to a file of the campaign folder.
fn append(dir: &Path, relative: &str, text: &str) {
    let path = dir.join(relative);
    let mut content = std::fs::read_to_string(&path).unwrap();
    content.push_str(text);
    std::fs::write(path, content).unwrap();
}

#[test]
fn an_smtp_send_goes_out_only_with_the_fingerprint_of_the_inputs_as_they_are() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 2).rows(people(5));
    let path = campaign.write();
    let dir = campaign.dir();

    // (a) No approval: a usage error, before anything is sent or journaled.
    let missing = send(&path, &[]);
    assert_eq!(missing.code, 64, "{missing:?}");
    assert!(missing.stderr.contains("--approve"), "{missing:?}");
    assert!(missing.stderr.contains("mailer plan"), "{missing:?}");
    nothing_received(&sink, "send without --approve");
    assert_eq!(recipient_rows(&path), None, "no journal yet");

    // (b) A well-formed fingerprint that no plan ever gave.
    let unknown = send(&path, &["--approve", "000000"]);
    assert_eq!(unknown.code, 65, "{unknown:?}");
    assert!(
        unknown.stderr.contains("does not match") && unknown.stderr.contains("000000"),
        "{unknown:?}"
    );
    nothing_received(&sink, "send --approve 000000");

    // (c) Reviewed, then a template edited: the old approval is stale, and the refusal names
    // the one input that changed since the plan.
    let reviewed = fingerprint(&path);
    append(
        dir,
        "templates/text.hbs",
        "\nP.S. edited after the review\n",
    );
    let stale = send(&path, &["--approve", &reviewed[..12]]);
    assert_eq!(stale.code, 65, "{stale:?}");
    assert!(
        stale.stderr.contains("templates/text.hbs changed"),
        "{stale:?}"
    );
    for unchanged in ["recipients changed", "campaign file changed", "locales/"] {
        assert!(!stale.stderr.contains(unchanged), "{unchanged}: {stale:?}");
    }
    nothing_received(&sink, "send with a stale approval");

    // (d) Too short, or not hex: usage errors.
    for malformed in ["3f9a", "zzzzzz", ""] {
        let refused = send(&path, &["--approve", malformed]);
        assert_eq!(refused.code, 64, "--approve {malformed:?}: {refused:?}");
    }
    nothing_received(&sink, "send with a malformed approval");
    assert_eq!(
        recipient_rows(&path),
        Some(Vec::new()),
        "the plans made a journal; no refused send journaled a recipient in it"
    );

    // (e) Planned again: a new fingerprint, and its 6-digit prefix sends the edited inputs,
    // to everyone, once.
    let current = fingerprint(&path);
    assert_ne!(current, reviewed, "the edit changed the fingerprint");
    let sent = send(&path, &["--approve", &current[..6]]);
    assert_eq!(sent.code, 0, "{sent:?}");
    let received = rcpts(&sink);
    assert_eq!(
        received.keys().cloned().collect::<BTreeSet<_>>(),
        addresses(5)
    );
    assert!(received.values().all(|&n| n == 1), "{received:?}");
    for t in sink.transactions() {
        let message = crate::parse(&t.data);
        let text = message.body_text(0).unwrap();
        assert!(
            text.contains("P.S. edited after the review"),
            "what was approved is what went out: {text}"
        );
    }
    let rows = recipient_rows(&path).expect("a journal");
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.iter().all(|r| r["state"] == "sent"), "{rows:?}");
}

#[test]
fn a_canary_comes_first_then_a_limited_run_then_the_rest_with_no_one_sent_twice() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 2)
        .rows(people(12))
        .extra(&format!("[safety]\ncanary = [\"{SEED1}\", \"{SEED2}\"]\n"));
    let path = campaign.write();
    let dir = campaign.dir();
    let everyone = addresses(12);

    let (code, plan) = plan_json(&path);
    assert_eq!(code, 0, "{plan}");
    // The first row of each locale, in turn: line 2 (en), line 3 (fr).
    assert_eq!(
        plan["canary"],
        serde_json::json!([
            {"address": SEED1, "line": 2, "locale": "en"},
            {"address": SEED2, "line": 3, "locale": "fr"},
        ]),
        "{plan}"
    );
    let approved = fingerprint(&path);
    let short = &approved[..12];

    // Not before the canary, and the canary stage needs an approval too.
    let early = send(&path, &["--approve", short]);
    assert_eq!(early.code, 64, "{early:?}");
    assert!(early.stderr.contains("--stage canary"), "{early:?}");
    let unapproved_canary = send(&path, &["--stage", "canary"]);
    assert_eq!(unapproved_canary.code, 64, "{unapproved_canary:?}");
    nothing_received(&sink, "full send before the canary");

    // The canary stage: one message per seed, nothing to any recipient.
    let canary = send(&path, &["--stage", "canary", "--approve", short]);
    assert_eq!(canary.code, 0, "{canary:?}");
    assert_eq!(
        rcpts(&sink),
        BTreeMap::from([(SEED1.to_owned(), 1), (SEED2.to_owned(), 1)])
    );
    let expected = [
        (
            SEED1,
            "Changes to our terms of service",
            "Your current plan: plan0.",
        ),
        (
            SEED2,
            "Modification de nos conditions d’utilisation",
            "Votre formule actuelle : plan1.",
        ),
    ];
    for (seed, subject, plan_line) in expected {
        let transactions: Vec<_> = sink
            .transactions()
            .into_iter()
            .filter(|t| t.rcpt_to == [seed])
            .collect();
        assert_eq!(transactions.len(), 1, "{seed}");
        let message = crate::parse(&transactions[0].data);
        assert_eq!(crate::to_addresses(&message), [seed], "To is the seed");
        assert_eq!(message.subject(), Some(subject), "{seed}");
        let text = message.body_text(0).unwrap();
        assert!(text.contains(plan_line), "{seed}, from a real row: {text}");
        for address in &everyone {
            assert!(!text.contains(address.as_str()), "{seed}: {text}");
        }
    }
    let journaled: Vec<(String, String, String)> = query(
        &journal_file(dir),
        "SELECT fingerprint, address, state FROM canary ORDER BY address",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    );
    assert_eq!(
        journaled,
        [
            (approved.clone(), SEED1.to_owned(), "sent".to_owned()),
            (approved.clone(), SEED2.to_owned(), "sent".to_owned())
        ]
    );
    assert_eq!(
        recipient_rows(&path),
        Some(Vec::new()),
        "the seeds are not recipients"
    );

    // Done once for these inputs: a second canary stage sends nothing.
    let again = send(&path, &["--stage", "canary", "--approve", short]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("already done"), "{again:?}");
    assert_eq!(sink.rcpts().len(), 2, "{:?}", rcpts(&sink));

    // A locale edited after the canary: the canary of the old inputs does not cover the new
    // ones, and the old approval is stale.
    let fr = dir.join("locales/fr/main.ftl");
    let original = std::fs::read(&fr).unwrap();
    append(dir, "locales/fr/main.ftl", "# edited after the canary\n");
    let edited = fingerprint(&path);
    assert_ne!(edited, approved);
    let uncanaried = send(&path, &["--approve", &edited[..12]]);
    assert_eq!(uncanaried.code, 64, "{uncanaried:?}");
    assert!(uncanaried.stderr.contains("canary"), "{uncanaried:?}");
    let stale = send(&path, &["--approve", short]);
    assert_eq!(stale.code, 65, "{stale:?}");
    assert!(
        stale.stderr.contains("locales/fr/main.ftl changed"),
        "{stale:?}"
    );
    assert_eq!(sink.rcpts().len(), 2, "{:?}", rcpts(&sink));
    // Put back as it was, the inputs are the canaried ones again.
    std::fs::write(&fr, original).unwrap();
    assert_eq!(fingerprint(&path), approved);

    // At most five, then the rest; seeds not again, no one twice.
    let limited = send(&path, &["--limit", "5", "--approve", short]);
    assert_eq!(limited.code, 75, "{limited:?}");
    let after_limit = rcpts(&sink);
    let first: BTreeSet<&String> = after_limit
        .keys()
        .filter(|a| everyone.contains(*a))
        .collect();
    assert_eq!(first.len(), 5, "{after_limit:?}");
    assert!(after_limit.values().all(|&n| n == 1), "{after_limit:?}");
    let partial = status(&path);
    assert_eq!(
        (
            partial["total"].as_u64(),
            state_count(&partial, "sent"),
            state_count(&partial, "pending")
        ),
        (Some(12), 5, 7),
        "{partial}"
    );

    let rest = send(&path, &["--approve", short]);
    assert_eq!(rest.code, 0, "{rest:?}");
    let mut expected_all: BTreeMap<String, usize> =
        everyone.iter().map(|a| (a.clone(), 1)).collect();
    expected_all.insert(SEED1.to_owned(), 1);
    expected_all.insert(SEED2.to_owned(), 1);
    assert_eq!(rcpts(&sink), expected_all);

    let done = status(&path);
    assert_eq!(
        (done["total"].as_u64(), state_count(&done, "sent")),
        (Some(12), 12),
        "the seeds are not counted: {done}"
    );
    let rows = recipient_rows(&path).expect("a journal");
    let reported: BTreeSet<String> = rows
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reported, everyone, "no seed in the report: {rows:?}");
    assert!(rows.iter().all(|r| r["state"] == "sent"), "{rows:?}");
}

/// Six distinct addresses, one of them suppressed, one of them twice (the domain's case
/// differs): seven rows, five messages. `[safety] expect_count` set by [`with_count`].
fn six_addresses(sink: &Sink, safety: &str) -> Campaign {
    let campaign = Campaign::example()
        .smtp(sink, 1)
        .rows(people(6))
        .row("user1@EXAMPLE1.com,Twice,en,planX")
        .extra(&format!("[safety]\nexpect_count = 0\n{safety}"));
    suppress(&campaign.write(), &["user3@example3.com"]);
    campaign
}

/// Sets `[safety] expect_count` in the written campaign file.
fn with_count(path: &Path, n: usize) {
    let toml = std::fs::read_to_string(path).unwrap();
    let at = toml.find("expect_count = ").unwrap();
    let end = at + toml[at..].find('\n').unwrap();
    let toml = format!("{}expect_count = {n}{}", &toml[..at], &toml[end..]);
    std::fs::write(path, toml).unwrap();
}

/// Asserts that a refusal names `expect_count`, its value and the real count.
fn names_the_count(run: &Run, wrong: usize) {
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains(&format!("expect_count` is {wrong}"))
            && said.contains("holds 6 distinct addresses"),
        "{run:?}"
    );
}

#[test]
fn a_list_of_another_size_than_expect_count_is_neither_planned_nor_sent() {
    let sink = Sink::start();
    let campaign = six_addresses(&sink, "");
    let path = campaign.dir().join("campaign.toml");

    // Neither the count without the suppressed address nor the count of rows.
    for wrong in [5, 7] {
        with_count(&path, wrong);
        let plan = unapproved(&["plan", arg(&path)], &[]);
        assert_eq!(plan.code, 65, "expect_count {wrong}: {plan:?}");
        names_the_count(&plan, wrong);
        let refused = mailer(&["send", arg(&path)], &[]);
        assert_eq!(refused.code, 65, "expect_count {wrong}: {refused:?}");
        names_the_count(&refused, wrong);
        assert!(refused.stderr.contains("nothing was sent"), "{refused:?}");
        nothing_received(&sink, &format!("expect_count = {wrong}"));
    }

    with_count(&path, 6);
    let plan = unapproved(&["plan", arg(&path)], &[]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let sent = mailer(&["send", arg(&path)], &[]);
    assert_eq!(sent.code, 0, "{sent:?}");
    let expected: BTreeMap<String, usize> = addresses(6)
        .into_iter()
        .filter(|a| a != "user3@example3.com")
        .map(|a| (a, 1))
        .collect();
    assert_eq!(rcpts(&sink), expected);
}

#[test]
fn the_canary_stage_of_a_list_of_another_size_than_expect_count_is_refused() {
    let sink = Sink::start();
    let campaign = six_addresses(&sink, "canary = [\"seed@canary.example\"]\n");
    let path = campaign.dir().join("campaign.toml");
    for wrong in [5, 7] {
        with_count(&path, wrong);
        let refused = mailer(&["send", arg(&path), "--stage", "canary"], &[]);
        assert_eq!(refused.code, 65, "expect_count {wrong}: {refused:?}");
        names_the_count(&refused, wrong);
        nothing_received(&sink, &format!("canary, expect_count = {wrong}"));
    }
    with_count(&path, 6);
    let canary = mailer(&["send", arg(&path), "--stage", "canary"], &[]);
    assert_eq!(canary.code, 0, "{canary:?}");
    assert_eq!(
        rcpts(&sink),
        BTreeMap::from([("seed@canary.example".to_owned(), 1)])
    );
}

#[test]
fn a_plan_counts_the_list_and_fingerprints_every_input() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(8))
        .row("user2@Example2.COM,Twice,fr,planX")
        .extra("[rate]\nper_second = 2\nburst = 1\nbatch_size = 4\nbatch_pause = \"10s\"\n");
    let path = campaign.write();
    let dir = campaign.dir();
    suppress(&path, &["user5@example5.com", "user6@example6.com"]);

    let (code, plan) = plan_json(&path);
    assert_eq!(code, 0, "{plan}");
    let first = fingerprint(&path);
    assert_eq!(plan["fingerprint"], first.as_str(), "unchanged inputs");
    for (key, value) in [
        ("recipients", 8),
        ("messages", 6),
        ("suppressed", 2),
        ("invalid", 0),
        ("duplicates", 1),
        ("batches", 2),
    ] {
        assert_eq!(plan[key], value, "{key}: {plan}");
    }
    assert_eq!(
        plan["locales"],
        serde_json::json!({"de": 1, "en": 2, "fr": 1, "fr-CA": 2}),
        "es falls back to en: {plan}"
    );
    let domains: u64 = plan["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    assert_eq!(domains, 6, "{plan}");
    // 5 messages after the burst at 2/s, and one 10 s pause between the two batches.
    let eta = plan["eta_seconds"].as_f64().expect("an ETA");
    assert!((eta - 12.5).abs() < 0.01, "{plan}");
    assert_eq!(plan["canary"], serde_json::json!([]), "{plan}");

    // The text plan shows the short fingerprint and the command that approves it.
    let text = unapproved(&["plan", arg(&path)], &[]);
    assert_eq!(text.code, 0, "{text:?}");
    let short = &first[..12];
    assert!(
        text.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("fingerprint") && l.trim_end().ends_with(short)),
        "{text:?}"
    );
    assert!(
        text.stdout
            .contains(&format!("mailer send {} --approve {short}", arg(&path))),
        "{text:?}"
    );
    assert!(
        !text.stdout.contains(&first),
        "only the short form: {text:?}"
    );

    // Recorded in the journal, so that a stale approval can say what changed.
    let planned: Vec<String> = query(&journal_file(dir), "SELECT fingerprint FROM plans", |r| {
        r.get(0)
    });
    assert_eq!(planned, [first.as_str()]);

    // Every kind of input is covered: each edit gives a fingerprint never seen before.
    let mut seen = BTreeSet::from([first]);
    let edits = [
        ("campaign.toml", "# reviewed\n"),
        ("templates/html.hbs", "<!-- reviewed -->\n"),
        ("templates/partials/footer.hbs", "{{!-- reviewed --}}\n"),
        ("locales/de/main.ftl", "# reviewed\n"),
        ("recipients.csv", "late@example.org,Late,en,planL\n"),
        ("suppressed.txt", "user4@example4.com\n"),
    ];
    for (file, text) in edits {
        append(dir, file, text);
        let changed = fingerprint(&path);
        assert!(seen.insert(changed), "{file} is not in the fingerprint");
    }
    let (_, last) = plan_json(&path);
    assert_eq!(
        (&last["recipients"], &last["messages"], &last["suppressed"]),
        (
            &serde_json::json!(9),
            &serde_json::json!(6),
            &serde_json::json!(3)
        ),
        "{last}"
    );
    assert_eq!(sink.connections(), 0, "planning talks to no relay");
}

#[test]
fn the_file_transport_and_a_dry_run_need_no_approval() {
    let campaign = Campaign::example().rows(people(4));
    let path = campaign.write();
    let run = send(&path, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let written = std::fs::read_dir(campaign.dir().join("outbox"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "eml")
        })
        .count();
    assert_eq!(written, 4);

    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 2).rows(people(4));
    let path = campaign.write();
    let dry = send(&path, &["--dry-run"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(
        crate::count(&dry.stdout, "would be sent"),
        Some(4),
        "{dry:?}"
    );
    assert_eq!(sink.connections(), 0, "a dry run connects to nothing");
    nothing_received(&sink, "dry run");
    assert_eq!(recipient_rows(&path), None, "a dry run journals nothing");
}
