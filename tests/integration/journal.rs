//! The journal through the real binary: resume after a relay outage, the run lock, frozen
//! inputs, schedule slots at a fixed clock, `mailer stop` / `resume`, the failure breaker, a
//! damaged or foreign journal, deferred recipients across runs, and `mailer report`. Every
//! test proves what it claims from the sink's records, not only from what mailer says.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::campaign::{Campaign, Running, mailer, people, wait_until};
use crate::count;
use crate::sink::{Phase, Script, Sink, held_sink};

/// Where a test campaign's journal is by default (the builder's id is `test-campaign`).
fn journal_file(campaign: &Campaign) -> PathBuf {
    campaign
        .dir()
        .join("mailer-state")
        .join("test-campaign.journal")
}

pub(crate) fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `mailer status FILE --json`, parsed; checks that its counts add up to its total.
pub(crate) fn status(path: &Path) -> serde_json::Value {
    let run = mailer(&["status", arg(path), "--json"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let status: serde_json::Value = serde_json::from_str(&run.stdout).expect("status JSON");
    let counts = status["counts"].as_object().expect("counts");
    let sum: u64 = counts.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(
        Some(sum),
        status["total"].as_u64(),
        "the counts add up to the total: {status}"
    );
    status
}

/// The rows `sql` gives from the journal at `path`, opened read-only.
pub(crate) fn query<T>(
    path: &Path,
    sql: &str,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Vec<T> {
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut statement = db.prepare(sql).unwrap();
    statement
        .query_map([], row)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A state's count in a status.
pub(crate) fn state_count(status: &serde_json::Value, state: &str) -> u64 {
    status["counts"][state]
        .as_u64()
        .unwrap_or_else(|| panic!("no count for {state}: {status}"))
}

/// Every address of `people(n)`.
fn addresses(n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| format!("user{i}@example{}.com", i % 7))
        .collect()
}

/// How many times the sink accepted a message for each address: as `Sink::accepted`, but a
/// reply scripted as `SLEEP <ms> 250 …` counts as the 250 it is.
fn received(sink: &Sink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for t in sink.transactions() {
        let reply = match t.reply.strip_prefix("SLEEP ") {
            Some(rest) => rest.split_once(' ').map_or("", |(_, reply)| reply),
            None => &t.reply,
        };
        if reply.starts_with('2') {
            *counts.entry(t.rcpt_to[0].clone()).or_default() += 1;
        }
    }
    counts
}

/// How many RCPT TO the sink was sent for `address`, whatever it answered.
fn rcpts_for(sink: &Sink, address: &str) -> usize {
    sink.rcpts().iter().filter(|r| r.rcpt == address).count()
}

/// A relay that accepts `first` messages, then refuses the sender and every new connection
/// (421) until the limit it gives back is raised.
fn relay_that_takes(first: usize) -> (Sink, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(AtomicUsize::new(first));
    let script: Script = {
        let (accepted, limit) = (Arc::clone(&accepted), Arc::clone(&limit));
        Arc::new(move |phase, _| match phase {
            Phase::Greeting | Phase::Mail
                if accepted.load(Ordering::SeqCst) >= limit.load(Ordering::SeqCst) =>
            {
                Some("421 4.3.2 service not available".to_owned())
            }
            Phase::EndOfData => {
                accepted.fetch_add(1, Ordering::SeqCst);
                None
            }
            _ => None,
        })
    };
    (Sink::scripted(script), limit)
}

#[test]
fn after_a_relay_outage_the_next_run_sends_only_the_rest() {
    // The relay takes six messages, then refuses the sender and every new connection (421)
    // until `limit` is lifted.
    let (sink, limit) = relay_that_takes(6);
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(20));
    let path = campaign.write();

    let first = campaign.run("send", &[]);
    assert_eq!(first.code, 69, "{first:?}");
    assert!(
        first.stderr.contains("relay unavailable"),
        "{}",
        first.stderr
    );
    assert_eq!(received(&sink).len(), 6, "{:?}", received(&sink));
    let after_outage = status(&path);
    assert_eq!(state_count(&after_outage, "sent"), 6, "{after_outage}");
    assert_eq!(state_count(&after_outage, "pending"), 14, "{after_outage}");
    assert_eq!(after_outage["total"], 20);
    assert_eq!(after_outage["complete"], false);
    let before: BTreeSet<String> = received(&sink).into_keys().collect();

    limit.store(usize::MAX, Ordering::SeqCst);
    let second = campaign.run("send", &[]);
    assert_eq!(second.code, 0, "{second:?}");
    assert_eq!(
        count(&second.stdout, "sent in this run"),
        Some(14),
        "{}",
        second.stdout
    );
    let accepted = received(&sink);
    assert_eq!(
        accepted.keys().cloned().collect::<BTreeSet<_>>(),
        addresses(20)
    );
    assert!(
        accepted.values().all(|&n| n == 1),
        "each address received exactly once: {accepted:?}"
    );
    assert_eq!(sink.transactions().len(), 20, "no transaction beyond those");
    for address in &before {
        assert_eq!(
            rcpts_for(&sink, address),
            1,
            "{address} was sent before the outage and not tried again"
        );
    }
    let done = status(&path);
    assert_eq!(state_count(&done, "sent"), 20, "{done}");
    assert_eq!(done["complete"], true, "{done}");
}

#[test]
fn a_second_send_while_one_runs_exits_75_naming_the_first_process() {
    // The sink holds its reply to the first message: the first run cannot end before the
    // second has been refused.
    let (sink, held, _) = held_sink(1);
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(25));
    let path = campaign.write();
    let mut first = Running::send(&path, &[]);
    // The first run holds the lock from before it validates until it ends: once the sink
    // has a recipient from it, it holds it.
    wait_until("the first run sends", || !sink.rcpts().is_empty());

    let second = mailer(&["send", arg(&path)], &[]);
    assert_eq!(second.code, 75, "{second:?}");
    assert!(
        second.stderr.contains(&format!("process {}", first.id())),
        "names the first run's process {}: {}",
        first.id(),
        second.stderr
    );
    assert!(
        first.still_running(),
        "the refusal came while the first run went on"
    );

    held.store(false, Ordering::SeqCst);
    let first = first.finish();
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(count(&first.stdout, "sent"), Some(25), "{}", first.stdout);
    assert_eq!(
        sink.connections(),
        1,
        "the refused run never connected to the relay"
    );
    let accepted = received(&sink);
    assert_eq!(
        accepted.keys().cloned().collect::<BTreeSet<_>>(),
        addresses(25)
    );
    assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
    assert_eq!(sink.transactions().len(), 25);

    // Once the first run is over, the lock is free again (and there is nothing left to send).
    let third = mailer(&["send", arg(&path)], &[]);
    assert_eq!(third.code, 0, "{third:?}");
    assert_eq!(sink.transactions().len(), 25);
}

#[test]
fn a_run_that_handed_nothing_to_the_relay_does_not_freeze_the_inputs() {
    // The relay refuses every connection: the first run hands it nothing (exit 69).
    let (sink, limit) = relay_that_takes(0);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(5))
        .retry("relay_attempts = 1");
    let path = campaign.write();
    let first = campaign.run("send", &[]);
    assert_eq!(first.code, 69, "{first:?}");
    assert!(sink.transactions().is_empty());

    // The report lists the recipients still pending with their line and locale.
    let report = mailer(&["report", arg(&path), "--format", "csv"], &[]);
    assert_eq!(report.code, 0, "{report:?}");
    let rows: Vec<&str> = report.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 5, "{}", report.stdout);
    for row in rows {
        let cells: Vec<&str> = row.split(',').collect();
        assert!(cells[0].parse::<u64>().is_ok_and(|line| line >= 2), "{row}");
        assert!(!cells[2].is_empty(), "a locale for a pending row: {row}");
        assert_eq!(cells[3], "pending", "{row}");
    }

    // The operator fixes the campaign (two more rows, an edited template) and approves the
    // new plan: that is enough, no --accept-changed-inputs.
    let campaign = campaign.rows(people(7).into_iter().skip(5));
    let text = std::fs::read_to_string(campaign.dir().join("templates/text.hbs")).unwrap();
    let campaign = campaign.file("templates/text.hbs", &format!("{text}\nP.S. edited\n"));
    limit.store(usize::MAX, Ordering::SeqCst);
    let second = campaign.run("send", &[]);
    assert_eq!(second.code, 0, "{second:?}");
    let accepted = received(&sink);
    assert_eq!(
        accepted.keys().cloned().collect::<BTreeSet<_>>(),
        addresses(7)
    );
    assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
    for t in &sink.transactions() {
        assert!(String::from_utf8_lossy(&t.data).contains("P.S. edited"));
    }

    // Once messages went out, a change is frozen out again.
    let campaign = campaign.file(
        "templates/text.hbs",
        &format!("{text}\nP.S. edited twice\n"),
    );
    let refused = campaign.run("send", &[]);
    assert_eq!(refused.code, 65, "{refused:?}");
    assert!(
        refused.stderr.contains("--accept-changed-inputs"),
        "{}",
        refused.stderr
    );
}

#[test]
fn changed_inputs_are_refused_unless_accepted_and_the_acceptance_is_recorded() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(5));
    let path = campaign.write();
    let first = campaign.run("send", &[]);
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(sink.transactions().len(), 5);

    // Two more rows, and an edited template.
    let campaign = campaign.rows(people(7).into_iter().skip(5));
    let text = std::fs::read_to_string(campaign.dir().join("templates/text.hbs")).unwrap();
    let campaign = campaign.file("templates/text.hbs", &format!("{text}\nP.S. edited\n"));
    let refused = campaign.run("send", &[]);
    assert_eq!(refused.code, 65, "{refused:?}");
    for named in ["recipients changed", "templates/text.hbs changed"] {
        assert!(
            refused.stderr.contains(named),
            "{named}: {}",
            refused.stderr
        );
    }
    assert!(
        !refused.stderr.contains("campaign file changed") && !refused.stderr.contains("locales/"),
        "only what changed is named: {}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("--accept-changed-inputs"),
        "{}",
        refused.stderr
    );
    assert_eq!(sink.transactions().len(), 5, "nothing sent");
    assert_eq!(sink.connections(), 1, "the refused run never connected");

    let accepted = campaign.run("send", &["--accept-changed-inputs"]);
    assert_eq!(accepted.code, 0, "{accepted:?}");
    assert_eq!(
        count(&accepted.stdout, "sent in this run"),
        Some(2),
        "{}",
        accepted.stdout
    );
    let received = received(&sink);
    assert_eq!(
        received.keys().cloned().collect::<BTreeSet<_>>(),
        addresses(7)
    );
    assert!(
        received.values().all(|&n| n == 1),
        "earlier recipients not sent again: {received:?}"
    );
    for t in &sink.transactions()[5..] {
        let body = String::from_utf8_lossy(&t.data);
        assert!(body.contains("P.S. edited"), "the new template: {body}");
    }

    // The journal records the acceptance, naming what changed.
    let events: Vec<String> = query(
        &journal_file(&campaign),
        "SELECT detail FROM events WHERE kind = 'inputs-accepted'",
        |r| r.get(0),
    );
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains("recipients changed") && events[0].contains("templates/text.hbs"),
        "{events:?}"
    );

    // The accepted inputs are the frozen ones now: a plain run goes through and sends nothing.
    let again = mailer(&["send", arg(&path)], &[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(sink.transactions().len(), 7);
}

#[test]
fn not_before_holds_a_campaign_back_until_its_time() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(3))
        .extra("[schedule]\nnot_before = \"2026-06-01T08:00:00Z\"\n");
    let path = campaign.write();
    let early = mailer(
        &["send", arg(&path)],
        &[("MAILER_NOW", "2026-06-01T07:59:00Z")],
    );
    assert_eq!(early.code, 75, "{early:?}");
    assert!(early.stderr.contains("not due yet"), "{}", early.stderr);
    assert_eq!(sink.connections(), 0, "nothing sent, no connection");

    let due = mailer(
        &["send", arg(&path)],
        &[("MAILER_NOW", "2026-06-01T08:00:00Z")],
    );
    assert_eq!(due.code, 0, "{due:?}");
    assert_eq!(received(&sink).len(), 3, "{:?}", received(&sink));
}

#[test]
fn each_cron_slot_is_its_own_run_and_missed_slots_are_not_replayed() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 2)
        .rows(people(4))
        .extra("[schedule]\ncron = \"0 9 * * *\"\n");
    let path = campaign.write();
    let send_at = |now: &str, args: &[&str]| {
        mailer(
            &[&["send", arg(&path)], args].concat(),
            &[("MAILER_NOW", now)],
        )
    };
    let everyone_received = |times: usize, when: &str| {
        let accepted = received(&sink);
        assert_eq!(
            accepted.keys().cloned().collect::<BTreeSet<_>>(),
            addresses(4),
            "{when}"
        );
        assert!(
            accepted.values().all(|&n| n == times),
            "{when}: each address {times} time(s): {accepted:?}"
        );
        assert_eq!(sink.transactions().len(), 4 * times, "{when}");
    };

    let slot = send_at("2026-03-02T09:30:00Z", &[]);
    assert_eq!(slot.code, 0, "{slot:?}");
    everyone_received(1, "the 2026-03-02 slot");
    assert_eq!(
        status(&path)["slot"],
        "2026-03-02T09:00:00Z",
        "keyed by the slot"
    );

    let again = send_at("2026-03-02T23:59:00Z", &[]);
    assert_eq!(again.code, 0, "{again:?}");
    everyone_received(1, "again within the 2026-03-02 slot: nothing new");

    let next = send_at("2026-03-03T09:10:00Z", &[]);
    assert_eq!(next.code, 0, "{next:?}");
    everyone_received(2, "the 2026-03-03 slot");

    // Two days later: the 2026-03-04 slot was missed and is not replayed.
    let later = send_at("2026-03-05T09:10:00Z", &[]);
    assert_eq!(later.code, 0, "{later:?}");
    everyone_received(3, "the 2026-03-05 slot, not 03-04");
    let latest = status(&path);
    assert_eq!(latest["slot"], "2026-03-05T09:00:00Z", "{latest}");
    assert_eq!(state_count(&latest, "sent"), 4, "{latest}");

    // …unless asked for by name.
    let missed = send_at("2026-03-05T09:20:00Z", &["--slot", "2026-03-04T09:00:00Z"]);
    assert_eq!(missed.code, 0, "{missed:?}");
    everyone_received(4, "the missed 2026-03-04 slot, asked for");

    // Every slot's message is a new one: one Message-ID per address and slot.
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for t in sink.transactions() {
        let message = crate::parse(&t.data);
        ids.entry(t.rcpt_to[0].clone())
            .or_default()
            .insert(message.message_id().unwrap().to_owned());
    }
    assert!(ids.values().all(|ids| ids.len() == 4), "{ids:?}");
}

#[test]
fn a_cron_campaign_with_not_before_waits_for_its_first_slot() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(2))
        .extra("[schedule]\nnot_before = \"2026-03-02T00:00:00Z\"\ncron = \"0 9 * * *\"\n");
    let path = campaign.write();
    let early = mailer(
        &["send", arg(&path)],
        &[("MAILER_NOW", "2026-03-02T08:59:59Z")],
    );
    assert_eq!(early.code, 75, "{early:?}");
    assert!(early.stderr.contains("not due yet"), "{}", early.stderr);
    assert!(
        early.stderr.contains("2026-03-02T09:00:00Z"),
        "names the first slot: {}",
        early.stderr
    );
    assert_eq!(sink.connections(), 0);

    let first = mailer(
        &["send", arg(&path)],
        &[("MAILER_NOW", "2026-03-02T09:30:00Z")],
    );
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(sink.transactions().len(), 2);
}

#[test]
fn stop_halts_a_running_send_and_every_later_one_until_resume() {
    // The sink holds its reply to the third message until the run says it has halted: the
    // stop comes while that message is on the wire, and after it no new message may start.
    let (sink, held, ends) = held_sink(3);
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(30));
    let path = campaign.write();
    let mut running = Running::send(&path, &[]);
    let log = running.log();
    wait_until("the third message is on the wire", || {
        ends.load(Ordering::SeqCst) >= 3
    });

    let stop = mailer(&["stop", arg(&path), "--reason", "wrong attachment"], &[]);
    assert_eq!(stop.code, 0, "{stop:?}");
    wait_until("the run says it halted", || {
        log.contains("halted: no new message starts")
    });
    held.store(false, Ordering::SeqCst);
    let stopped = running.finish();
    let log = log.finish();
    assert_eq!(stopped.code, 3, "{stopped:?}\n{log}");
    let sent_before_stop = sink.transactions().len();
    assert_eq!(
        sent_before_stop, 3,
        "the message on the wire got its reply, and no new one started: {log}"
    );
    let accepted = received(&sink);
    assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
    let halted = status(&path);
    assert_eq!(halted["halt"]["reason"], "wrong attachment", "{halted}");

    let refused = mailer(&["send", arg(&path)], &[]);
    assert_eq!(refused.code, 3, "{refused:?}");
    assert!(
        refused.stderr.contains("is halted since"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("wrong attachment"),
        "{}",
        refused.stderr
    );
    assert_eq!(sink.transactions().len(), sent_before_stop, "nothing sent");

    let resume = mailer(&["resume", arg(&path)], &[]);
    assert_eq!(resume.code, 0, "{resume:?}");
    assert!(status(&path)["halt"].is_null());
    let rest = mailer(&["send", arg(&path)], &[]);
    assert_eq!(rest.code, 0, "{rest:?}");
    let accepted = received(&sink);
    assert_eq!(
        accepted.keys().cloned().collect::<BTreeSet<_>>(),
        addresses(30)
    );
    assert!(
        accepted.values().all(|&n| n == 1),
        "each address exactly once overall: {accepted:?}"
    );
    assert_eq!(sink.transactions().len(), 30);
    let done = status(&path);
    assert_eq!(state_count(&done, "sent"), 30, "{done}");
}

#[test]
fn the_failure_ratio_breaker_halts_the_run_and_sticks() {
    // Three recipients in four are refused for good.
    let script: Script = Arc::new(|phase, rcpt| {
        let i: usize = rcpt
            .trim_start_matches("user")
            .split('@')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (phase == Phase::Rcpt && !i.is_multiple_of(4)).then(|| "550 5.1.1 no such user".to_owned())
    });
    let sink = Sink::scripted(script);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(40))
        .extra("[safety]\nhalt_min_sample = 10\nhalt_failure_ratio = 0.5\n");
    let path = campaign.write();
    let run = campaign.run("send", &[]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("halt_failure_ratio"), "{}", run.stderr);
    let attempted = sink.rcpts().len();
    assert!(
        (10..40).contains(&attempted),
        "stopped after the sample, before the end: {attempted}"
    );

    let halted = status(&path);
    let halt = &halted["halt"];
    assert!(
        halt["reason"]
            .as_str()
            .is_some_and(|r| r.contains("halt_failure_ratio")),
        "{halted}"
    );
    assert_eq!(halt["by"], "breaker", "{halted}");
    assert!(state_count(&halted, "pending") > 0, "{halted}");
    assert_eq!(
        state_count(&halted, "failed") + state_count(&halted, "sent"),
        u64::try_from(attempted).unwrap(),
        "{halted}"
    );

    let again = mailer(&["send", arg(&path)], &[]);
    assert_eq!(again.code, 3, "{again:?}");
    assert!(again.stderr.contains("is halted since"), "{}", again.stderr);
    assert_eq!(sink.rcpts().len(), attempted, "nothing more attempted");
}

/// A campaign sent once to the sink, with its journal closed: (campaign, path, journal).
fn sent_once(sink: &Sink) -> (Campaign, PathBuf, PathBuf) {
    let campaign = Campaign::example().smtp(sink, 1).rows(people(5));
    let path = campaign.write();
    let run = campaign.run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let journal = journal_file(&campaign);
    assert!(journal.is_file(), "{}", journal.display());
    // The last connection checkpointed the WAL into the file and removed it.
    assert!(
        !journal.with_extension("journal-wal").exists(),
        "the WAL is checkpointed when the run ends"
    );
    (campaign, path, journal)
}

#[test]
fn a_damaged_journal_is_an_error_that_sends_nothing_and_leaves_the_file_as_it_is() {
    let page = 4096;
    // Garbage over the header, then over the first table's page.
    for (start, end) in [(0, 100), (page, 2 * page)] {
        let sink = Sink::start();
        let (_campaign, path, journal) = sent_once(&sink);
        let mut bytes = std::fs::read(&journal).unwrap();
        assert!(bytes.len() >= end, "{} bytes", bytes.len());
        for (i, byte) in bytes[start..end].iter_mut().enumerate() {
            *byte = u8::try_from(i * 37 % 251).unwrap();
        }
        std::fs::write(&journal, &bytes).unwrap();

        let run = mailer(&["send", arg(&path)], &[]);
        assert_ne!(run.code, 0, "bytes {start}..{end}: {run:?}");
        assert!(
            run.stderr.contains("damaged or not a mailer journal"),
            "bytes {start}..{end}: {}",
            run.stderr
        );
        assert_eq!(sink.transactions().len(), 5, "nothing more sent");
        assert_eq!(sink.connections(), 1, "no connection opened");
        assert!(
            std::fs::read(&journal).unwrap() == bytes,
            "bytes {start}..{end}: the damaged file is left as it was"
        );

        let status = mailer(&["status", arg(&path)], &[]);
        assert_ne!(status.code, 0, "{status:?}");
        assert!(
            status.stderr.contains("damaged or not a mailer journal"),
            "{}",
            status.stderr
        );
    }
}

/// Flipped bytes inside the rows, where the file's structure still holds: the journal opens
/// and passes its check, and only reading a row fails (`SQLite` says "invalid utf-8 sequence"
/// or "no such column" without naming a file). Every command names the journal in one
/// sentence, exits 74 and sends nothing. (`stop` reads no row, and still works.)
#[test]
fn a_journal_damaged_inside_its_rows_is_named_by_every_command() {
    let campaign = Campaign::example().rows(people(5));
    let path = campaign.write();
    let first = mailer(&["send", arg(&path), "--limit", "2"], &[]);
    assert_eq!(first.code, 75, "{first:?}");
    let outbox = campaign.dir().join("outbox");
    let written = || std::fs::read_dir(&outbox).unwrap().count();
    assert_eq!(written(), 2);

    // The state of each sent row follows its content hash (32 hex digits): make it invalid
    // UTF-8 there, and nowhere else.
    let journal = journal_file(&campaign);
    let mut bytes = std::fs::read(&journal).unwrap();
    let mut flipped = 0;
    for at in 32..bytes.len() - 4 {
        if &bytes[at..at + 4] == b"sent" && bytes[at - 32..at].iter().all(u8::is_ascii_hexdigit) {
            bytes[at + 1] = 0xff;
            flipped += 1;
        }
    }
    assert!(flipped >= 2, "found {flipped} sent rows");
    std::fs::write(&journal, &bytes).unwrap();

    let named = format!("the journal `{}` is damaged", journal.display());
    for args in [
        vec!["status", arg(&path)],
        vec!["status", arg(&path), "--json"],
        vec!["report", arg(&path), "--format", "csv"],
        vec!["report", arg(&path), "--format", "json"],
        vec!["send", arg(&path)],
    ] {
        let run = mailer(&args, &[]);
        assert_eq!(run.code, 74, "{args:?}: {run:?}");
        assert!(run.stderr.contains(&named), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("invalid utf-8"),
            "{args:?}: the cause is given: {}",
            run.stderr
        );
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {}", run.stderr);
        assert_eq!(written(), 2, "{args:?}: nothing more sent");
        assert!(
            std::fs::read(&journal).unwrap() == bytes,
            "{args:?}: the damaged file is left as it was"
        );
    }
}

#[test]
fn another_campaigns_journal_is_refused_and_left_as_it_is() {
    let sink = Sink::start();
    let (campaign, path, journal) = sent_once(&sink);
    // Another campaign file in the same folder, campaign `other-campaign`, and test-campaign's
    // journal copied where other-campaign's would be. (The same file under a new id is
    // refused before its journal is even looked at: see operator.rs.)
    let toml = std::fs::read_to_string(&path).unwrap();
    assert!(toml.contains("id = \"test-campaign\""), "{toml}");
    let path = campaign.dir().join("other.toml");
    std::fs::write(
        &path,
        toml.replace("id = \"test-campaign\"", "id = \"other-campaign\""),
    )
    .unwrap();
    let foreign = campaign
        .dir()
        .join("mailer-state")
        .join("other-campaign.journal");
    std::fs::copy(&journal, &foreign).unwrap();
    let bytes = std::fs::read(&foreign).unwrap();

    let run = mailer(&["send", arg(&path)], &[]);
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("belongs to campaign `test-campaign`"),
        "{}",
        run.stderr
    );
    assert_eq!(sink.transactions().len(), 5, "nothing sent");
    assert_eq!(sink.connections(), 1, "no connection opened");
    assert!(std::fs::read(&foreign).unwrap() == bytes, "left as it was");
}

#[test]
fn a_deferred_recipient_keeps_its_attempts_and_waits_for_its_backoff_across_runs() {
    let script: Script = Arc::new(|phase, rcpt| {
        (phase == Phase::Rcpt && rcpt == "user2@example2.com")
            .then(|| "451 4.3.0 try again later".to_owned())
    });
    let sink = Sink::scripted(script);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(5))
        .retry("max_attempts = 1\nbackoff = \"1h\"\nmax_backoff = \"2h\"");
    let path = campaign.write();

    let first = campaign.run("send", &[]);
    assert_eq!(first.code, 75, "{first:?}");
    assert_eq!(
        count(&first.stdout, "deferred"),
        Some(1),
        "{}",
        first.stdout
    );
    assert_eq!(rcpts_for(&sink, "user2@example2.com"), 1);
    assert_eq!(received(&sink).len(), 4);

    let second = campaign.run("send", &[]);
    assert_eq!(second.code, 75, "{second:?}");
    assert_eq!(
        rcpts_for(&sink, "user2@example2.com"),
        1,
        "not tried again before its backoff is over"
    );
    assert_eq!(sink.rcpts().len(), 5, "nobody else tried either");
    assert!(received(&sink).values().all(|&n| n == 1));

    let report = mailer(&["report", arg(&path), "--format", "csv"], &[]);
    assert_eq!(report.code, 0, "{report:?}");
    let mut reader = csv::Reader::from_reader(report.stdout.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let deferred: Vec<_> = rows
        .iter()
        .filter(|r| &r[column("address")] == "user2@example2.com")
        .collect();
    assert_eq!(deferred.len(), 1, "{}", report.stdout);
    assert_eq!(
        &deferred[0][column("state")],
        "deferred",
        "{}",
        report.stdout
    );
    assert_eq!(&deferred[0][column("attempts")], "1", "{}", report.stdout);
    assert_eq!(
        &deferred[0][column("reply_code")],
        "451",
        "{}",
        report.stdout
    );

    let waiting = status(&path);
    assert_eq!(state_count(&waiting, "deferred"), 1, "{waiting}");
    assert_eq!(state_count(&waiting, "sent"), 4, "{waiting}");
    assert_eq!(waiting["complete"], false, "{waiting}");
    assert!(waiting["next_retry_at"].is_string(), "{waiting}");
}

#[test]
fn the_report_has_one_row_per_recipient_with_its_message_id() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 2).rows(people(6));
    let path = campaign.write();
    let state = tempfile::tempdir().unwrap();
    let state_dir = arg(state.path());
    let run = mailer(&["send", arg(&path), "--state-dir", state_dir], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        state.path().join("test-campaign.journal").is_file(),
        "the journal is in --state-dir"
    );
    assert!(!campaign.dir().join("mailer-state").exists());

    let ids: BTreeMap<String, String> = sink
        .transactions()
        .iter()
        .map(|t| {
            let message = crate::parse(&t.data);
            (
                t.rcpt_to[0].clone(),
                message.message_id().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(ids.len(), 6);

    let csv_run = mailer(
        &[
            "report",
            arg(&path),
            "--format",
            "csv",
            "--state-dir",
            state_dir,
        ],
        &[],
    );
    assert_eq!(csv_run.code, 0, "{csv_run:?}");
    let mut reader = csv::Reader::from_reader(csv_run.stdout.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name}: {headers:?}"))
    };
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 6, "{}", csv_run.stdout);
    let mut seen = BTreeSet::new();
    for row in &rows {
        let address = row[column("address")].to_owned();
        assert_eq!(&row[column("state")], "sent", "{row:?}");
        assert_eq!(&row[column("attempts")], "1", "{row:?}");
        assert_eq!(&row[column("reply_code")], "250", "{row:?}");
        assert_eq!(
            row[column("message_id")].trim_matches(['<', '>']),
            ids[&address],
            "the Message-ID the sink received: {row:?}"
        );
        assert!(!row[column("last_attempt_at")].is_empty(), "{row:?}");
        seen.insert(address);
    }
    assert_eq!(seen, addresses(6));

    let json_run = mailer(
        &[
            "report",
            arg(&path),
            "--format",
            "json",
            "--state-dir",
            state_dir,
        ],
        &[],
    );
    assert_eq!(json_run.code, 0, "{json_run:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json_run.stdout).unwrap();
    assert_eq!(rows.len(), 6, "{}", json_run.stdout);
    for row in &rows {
        let address = row["address"].as_str().unwrap();
        assert_eq!(row["state"], "sent", "{row}");
        assert_eq!(
            row["message_id"].as_str().unwrap().trim_matches(['<', '>']),
            ids[address],
            "{row}"
        );
    }
}

#[test]
fn an_unfinished_slot_is_finished_before_the_next_one_starts() {
    // The relay takes three messages of the 2026-03-02 slot, then goes away.
    let (sink, limit) = relay_that_takes(3);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(8))
        .extra("[schedule]\ncron = \"0 9 * * *\"\n");
    let path = campaign.write();
    let send_at = |now: &str| mailer(&["send", arg(&path)], &[("MAILER_NOW", now)]);

    let first = send_at("2026-03-02T09:30:00Z");
    assert_eq!(first.code, 69, "{first:?}");
    assert_eq!(received(&sink).len(), 3);

    // The next day's run comes while 5 of the first slot's recipients are pending: it
    // finishes that slot rather than leave them behind, and says so.
    limit.store(usize::MAX, Ordering::SeqCst);
    let next_day = send_at("2026-03-03T09:10:00Z");
    assert_eq!(next_day.code, 0, "{next_day:?}");
    assert!(
        next_day.stderr.contains("2026-03-02T09:00:00Z"),
        "names the unfinished slot: {}",
        next_day.stderr
    );
    let accepted_now = received(&sink);
    assert_eq!(accepted_now.len(), 8, "{accepted_now:?}");
    assert!(accepted_now.values().all(|&n| n == 1), "{accepted_now:?}");
    let finished = status(&path);
    assert_eq!(finished["slot"], "2026-03-02T09:00:00Z", "{finished}");
    assert_eq!(state_count(&finished, "sent"), 8, "{finished}");

    // Then the current slot runs: everyone once more.
    let current = send_at("2026-03-03T09:20:00Z");
    assert_eq!(current.code, 0, "{current:?}");
    let twice = received(&sink);
    assert!(twice.values().all(|&n| n == 2), "{twice:?}");
    assert_eq!(twice.len(), 8);
    assert_eq!(status(&path)["slot"], "2026-03-03T09:00:00Z");
}

#[test]
fn on_ambiguous_retry_sends_an_ambiguous_recipient_again_once_and_no_more() {
    // The relay hangs up after every body for one address: its outcome is never known.
    let script: Script = Arc::new(|phase, rcpt| {
        (phase == Phase::EndOfData && rcpt == "user2@example2.com").then(|| "DROP".to_owned())
    });
    let sink = Sink::scripted(script);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(4))
        .retry("on_ambiguous = \"retry\"");
    let path = campaign.write();
    let first = campaign.run("send", &[]);
    assert_eq!(first.code, 1, "{first:?}");
    assert_eq!(rcpts_for(&sink, "user2@example2.com"), 1);

    // The next run sends it again, once; it is ambiguous again, and the runs after that
    // leave it alone: "retry" means one more try, not a copy per cron call.
    let second = campaign.run("send", &[]);
    assert_eq!(second.code, 1, "{second:?}");
    assert_eq!(rcpts_for(&sink, "user2@example2.com"), 2);
    for _ in 0..2 {
        let again = campaign.run("send", &[]);
        assert_eq!(again.code, 1, "{again:?}");
    }
    assert_eq!(rcpts_for(&sink, "user2@example2.com"), 2, "no third copy");
    let done = status(&path);
    assert_eq!(state_count(&done, "ambiguous"), 1, "{done}");
    assert_eq!(state_count(&done, "sent"), 3, "{done}");
    for address in [
        "user0@example0.com",
        "user1@example1.com",
        "user3@example3.com",
    ] {
        assert_eq!(rcpts_for(&sink, address), 1, "{address}");
    }
}

#[test]
fn credentials_refused_for_good_end_the_run_at_once_but_a_temporary_refusal_is_waited_for() {
    // 535: the credentials are wrong. Waiting does not help: the run ends at once (65) with
    // nothing sent; nothing is halted, since nothing went (a fixed password simply sends).
    let refused: Script =
        Arc::new(|phase, _| (phase == Phase::Auth).then(|| "535 5.7.8 bad credentials".into()));
    let sink = Sink::scripted(refused);
    let campaign = Campaign::example()
        .smtp(&sink, 2)
        .transport("username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"")
        .rows(people(4));
    let path = campaign.write();
    let env = [("TEST_SMTP_PASSWORD", "wrong")];
    let run = mailer(&["send", arg(&path)], &env);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr.contains(
            "refused mailer's login: 535 5.7.8 bad credentials; check `username` and the password"
        ),
        "{}",
        run.stderr
    );
    assert!(sink.transactions().is_empty());
    let after = status(&path);
    assert_eq!(after["halt"], serde_json::Value::Null, "{after}");
    assert_eq!(
        state_count(&after, "pending"),
        4,
        "nobody's state changed: {after}"
    );
    // At most one connection per worker, none tried again after a pause.
    assert!(sink.connections() <= 2, "{}", sink.connections());
    let again = mailer(&["send", arg(&path)], &env);
    assert_eq!(again.code, 65, "{again:?}");

    // 454: a temporary refusal is the relay's trouble: pauses, then exit 69; no halt.
    let busy: Script =
        Arc::new(|phase, _| (phase == Phase::Auth).then(|| "454 4.7.0 try again later".into()));
    let sink = Sink::scripted(busy);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .transport("username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"")
        .rows(people(2));
    let path = campaign.write();
    let run = mailer(&["send", arg(&path)], &env);
    assert_eq!(run.code, 69, "{run:?}");
    assert_eq!(status(&path)["halt"], serde_json::Value::Null);
    assert!(sink.connections() > 1, "tried again after a pause");
}

#[test]
fn limits_hold_across_a_restart() {
    // 4/s with a burst of 10. The first run spends its burst on 10 messages, then the relay
    // goes away and the run ends (69). A second run started right away must not spend a
    // second burst: at the sink, no second holds more than 4 + 10. One connection, so that
    // the sink sees each message only after mailer let it go.
    let (sink, limit) = relay_that_takes(10);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(20))
        // The first run ends at the first refusal, so that the second starts at once.
        .retry("relay_attempts = 1")
        .extra("[rate]\nper_second = 4\nburst = 10\n");
    let first = campaign.run("send", &[]);
    assert_eq!(first.code, 69, "{first:?}");
    assert_eq!(received(&sink).len(), 10);
    limit.store(usize::MAX, Ordering::SeqCst);
    let second = campaign.run("send", &[]);
    assert_eq!(second.code, 0, "{second:?}");
    let accepted_all = received(&sink);
    assert_eq!(accepted_all.len(), 20);
    assert!(accepted_all.values().all(|&n| n == 1), "{accepted_all:?}");
    let arrivals: Vec<Instant> = sink.rcpts().iter().map(|r| r.at).collect();
    assert_eq!(arrivals.len(), 20, "one RCPT per recipient");
    let busiest = crate::delivery::busiest_second(arrivals);
    assert!(
        busiest <= 4 + 10,
        "{busiest} in one second across the restart"
    );
}

#[test]
fn an_accepted_change_whose_run_died_before_listing_is_listed_by_the_next_run() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .transport("username = \"mailer-user\"\npassword_env = \"TEST_SMTP_PASSWORD\"")
        .rows(people(5));
    let path = campaign.write();
    let env = [("TEST_SMTP_PASSWORD", "pw")];
    let first = mailer(&["send", arg(&path)], &env);
    assert_eq!(first.code, 0, "{first:?}");
    // Two more rows, accepted; that run fails after the inputs are frozen and before the
    // recipients are listed (no password in its environment).
    let campaign = campaign.rows(people(7).into_iter().skip(5));
    let path = campaign.write();
    let failed = mailer(&["send", arg(&path), "--accept-changed-inputs"], &[]);
    assert_eq!(failed.code, 65, "{failed:?}");
    // The next call has the password and unchanged inputs: it must still send the two.
    let next = mailer(&["send", arg(&path)], &env);
    assert_eq!(next.code, 0, "{next:?}");
    let accepted = received(&sink);
    assert_eq!(accepted.len(), 7, "{accepted:?}");
    assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
}

#[test]
fn an_unfinished_slot_is_not_finished_with_the_next_editions_inputs() {
    let (sink, limit) = relay_that_takes(3);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(8))
        .extra("[schedule]\ncron = \"0 9 * * *\"\n");
    let path = campaign.write();
    let send_at = |now: &str, args: &[&str]| {
        mailer(
            &[&["send", arg(&path)], args].concat(),
            &[("MAILER_NOW", now)],
        )
    };
    let first = send_at("2026-03-02T09:30:00Z", &[]);
    assert_eq!(first.code, 69, "{first:?}");
    limit.store(usize::MAX, Ordering::SeqCst);

    // The next edition has a new template. The next day's call sends that edition to
    // everyone, once, and names the unfinished slot instead of finishing it with the new text.
    let text = std::fs::read_to_string(campaign.dir().join("templates/text.hbs")).unwrap();
    let campaign = campaign.file(
        "templates/text.hbs",
        &format!("{text}\nP.S. the next edition\n"),
    );
    campaign.write();
    let next_day = send_at("2026-03-03T09:10:00Z", &[]);
    assert_eq!(next_day.code, 0, "{next_day:?}");
    assert!(
        next_day.stderr.contains("2026-03-02T09:00:00Z") && next_day.stderr.contains("--slot"),
        "names the unfinished slot: {}",
        next_day.stderr
    );
    let transactions = sink.transactions();
    assert_eq!(
        transactions.len(),
        3 + 8,
        "three of the old slot, eight of the new"
    );
    let new_edition = transactions
        .iter()
        .filter(|t| String::from_utf8_lossy(&t.data).contains("the next edition"))
        .count();
    assert_eq!(
        new_edition, 8,
        "only the new slot's messages have the new text"
    );
    assert_eq!(status(&path)["slot"], "2026-03-03T09:00:00Z");
}

#[test]
fn a_slot_that_sent_nothing_is_not_refrozen_with_a_later_slots_inputs() {
    // Slot A finds the relay down and hands it nothing; the next edition goes out in slot B
    // to everyone. `--slot A` then must not take B's inputs as A's without a word: that would
    // send B's edition to the whole list a second time.
    let (sink, limit) = relay_that_takes(0);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(8))
        .retry("relay_attempts = 1")
        .extra("[schedule]\ncron = \"0 9 * * *\"\n");
    let path = campaign.write();
    let send_at = |now: &str, args: &[&str]| {
        mailer(
            &[&["send", arg(&path)], args].concat(),
            &[("MAILER_NOW", now)],
        )
    };
    let first = send_at("2026-03-02T09:30:00Z", &[]);
    assert_eq!(first.code, 69, "{first:?}");
    assert!(sink.transactions().is_empty());
    limit.store(usize::MAX, Ordering::SeqCst);
    let text = std::fs::read_to_string(campaign.dir().join("templates/text.hbs")).unwrap();
    let campaign = campaign.file(
        "templates/text.hbs",
        &format!("{text}\nP.S. the next edition\n"),
    );
    campaign.write();
    let next_day = send_at("2026-03-03T09:10:00Z", &[]);
    assert_eq!(next_day.code, 0, "{next_day:?}");
    assert_eq!(sink.transactions().len(), 8);

    let missed = send_at("2026-03-03T10:00:00Z", &["--slot", "2026-03-02T09:00:00Z"]);
    assert_eq!(missed.code, 65, "{missed:?}");
    assert!(
        missed.stderr.contains("--accept-changed-inputs"),
        "{}",
        missed.stderr
    );
    assert_eq!(sink.transactions().len(), 8, "nobody got the edition twice");
}

#[test]
fn a_suppression_list_that_grew_between_runs_is_taken_and_honoured() {
    let (sink, limit) = relay_that_takes(2);
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(6));
    let path = campaign.write();
    let suppress = campaign.dir().join("suppressed.txt");
    std::fs::write(&suppress, "# none yet\n").unwrap();
    let toml = std::fs::read_to_string(&path).unwrap().replacen(
        "path = \"recipients.csv\"",
        "path = \"recipients.csv\"\nsuppress = [\"suppressed.txt\"]",
        1,
    );
    std::fs::write(&path, toml).unwrap();
    let first = mailer(&["send", arg(&path)], &[]);
    assert_eq!(first.code, 69, "{first:?}");
    assert_eq!(received(&sink).len(), 2);

    // Someone unsubscribes meanwhile. The next run goes on without --accept-changed-inputs,
    // and does not send to them.
    std::fs::write(&suppress, "user4@example4.com\n").unwrap();
    limit.store(usize::MAX, Ordering::SeqCst);
    let second = mailer(&["send", arg(&path)], &[]);
    assert_eq!(second.code, 0, "{second:?}");
    let accepted = received(&sink);
    assert_eq!(accepted.len(), 5, "{accepted:?}");
    assert!(!accepted.contains_key("user4@example4.com"));
    assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
    let done = status(&path);
    assert_eq!(state_count(&done, "suppressed"), 1, "{done}");
    // A template change is still refused.
    std::fs::write(
        campaign.dir().join("templates/subject.hbs"),
        "New subject\n",
    )
    .unwrap();
    let changed = mailer(&["send", arg(&path)], &[]);
    assert_eq!(changed.code, 65, "{changed:?}");
}

/// An approval pins the reviewed inputs, but unsubscribes keep arriving while a reviewed
/// campaign waits: a suppression list that only gained addresses since the plan (even
/// rewritten in another order) is taken; one that lost an address the plan saw is refused.
#[test]
fn an_approval_takes_suppression_lists_that_only_grew_since_the_plan() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(6));
    let path = campaign.write();
    let suppress = campaign.dir().join("suppressed.txt");
    std::fs::write(&suppress, "user1@example1.com\n").unwrap();
    let toml = std::fs::read_to_string(&path).unwrap().replacen(
        "path = \"recipients.csv\"",
        "path = \"recipients.csv\"\nsuppress = [\"suppressed.txt\"]",
        1,
    );
    std::fs::write(&path, toml).unwrap();
    let plan = crate::campaign::unapproved(&["plan", arg(&path), "--json"], &[]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let plan: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let approval = plan["fingerprint"].as_str().unwrap()[..8].to_owned();
    let send = || crate::campaign::unapproved(&["send", arg(&path), "--approve", &approval], &[]);

    // user1 was suppressed when the plan was reviewed: a list without them is not the
    // reviewed one, whatever else it holds.
    std::fs::write(&suppress, "user2@example2.com\n").unwrap();
    let shrunk = send();
    assert_eq!(shrunk.code, 65, "{shrunk:?}");
    assert!(
        shrunk.stderr.contains("suppress[0] changed"),
        "{}",
        shrunk.stderr
    );
    assert!(received(&sink).is_empty());

    std::fs::write(&suppress, "user2@example2.com\nUSER1@example1.com\n").unwrap();
    let grown = send();
    assert_eq!(grown.code, 0, "{grown:?}");
    let accepted = received(&sink);
    assert_eq!(accepted.len(), 4, "{accepted:?}");
    assert!(!accepted.contains_key("user1@example1.com"));
    assert!(!accepted.contains_key("user2@example2.com"));
    assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
}
