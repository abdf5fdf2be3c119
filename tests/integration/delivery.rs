//! The delivery engine against a sink that misbehaves: replies refused at every phase,
//! hang-ups, silent closes, delays, a throttling domain, and rate limits measured where the
//! messages arrive. Every test judges from the sink's records: nothing lost, nothing sent twice.
//! The faults at each command run over each wire a relay may offer ([`Wire::ALL`]): one
//! command at a time, PIPELINING, and CHUNKING (BDAT).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::campaign::{Campaign, Run, people};
use crate::count;
use crate::sink::{Faults, Phase, Script, Sink, Tls, Wire};

/// The recipients of `people(n)`, in order.
fn addresses(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("user{i}@example{}.com", i % 7))
        .collect()
}

/// A script that answers `reply` the first `times` times `phase` comes up for a recipient
/// `matching`, and normally afterwards.
fn first_times(times: usize, phase: Phase, matching: &'static str, reply: &'static str) -> Script {
    let seen = Arc::new(AtomicUsize::new(0));
    Arc::new(move |p, rcpt| {
        (p == phase && rcpt.contains(matching) && seen.fetch_add(1, Ordering::SeqCst) < times)
            .then(|| reply.to_owned())
    })
}

/// What the summary says, and the books: every recipient in exactly one state, the counts
/// adding up, and no recipient accepted twice by the sink (one that offers the default wire).
fn balanced(run: &Run, sink: &Sink, total: usize) -> BTreeMap<&'static str, usize> {
    balanced_at(&format!("{:?}", Wire::default()), run, sink, total)
}

/// [`balanced`], its failures prefixed with `at` (the wire and the fault).
fn balanced_at(at: &str, run: &Run, sink: &Sink, total: usize) -> BTreeMap<&'static str, usize> {
    let mut states = BTreeMap::new();
    for state in ["sent", "deferred", "failed", "ambiguous", "pending"] {
        states.insert(state, count(&run.stdout, state).unwrap_or(0));
    }
    assert_eq!(
        states.values().sum::<usize>(),
        total,
        "{at}: counts add up: {}",
        run.stdout
    );
    let accepted = sink.accepted();
    assert!(
        accepted.values().all(|&n| n == 1),
        "{at}: nobody accepted twice: {accepted:?}"
    );
    assert_eq!(
        accepted.len(),
        states["sent"],
        "{at}: the sink accepted exactly the recipients reported sent: {}",
        run.stdout
    );
    states
}

fn send(sink: &Sink, rows: usize, connections: usize, extra: impl Fn(Campaign) -> Campaign) -> Run {
    extra(
        Campaign::example()
            .smtp(sink, connections)
            .rows(people(rows)),
    )
    .run("send", &[])
}

/// [`send`], and then each recipient's state as the journal has it (`mailer report`).
fn send_and_report(
    sink: &Sink,
    rows: usize,
    connections: usize,
    extra: impl Fn(Campaign) -> Campaign,
) -> (Run, BTreeMap<String, String>) {
    let campaign = extra(
        Campaign::example()
            .smtp(sink, connections)
            .rows(people(rows)),
    );
    let run = campaign.run("send", &[]);
    let report = campaign.run("report", &["--format", "csv"]);
    assert_eq!(report.code, 0, "{report:?}");
    let mut csv = csv::Reader::from_reader(report.stdout.as_bytes());
    let headers = csv.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (address, state) = (column("address"), column("state"));
    let states = csv
        .records()
        .map(|record| {
            let record = record.unwrap();
            (record[address].to_owned(), record[state].to_owned())
        })
        .collect();
    (run, states)
}

/// The sink's side of the journal's word, recipient by recipient: accepted (answered 2xx) at
/// most once each; every `sent` recipient exactly once, an `ambiguous` one at most once,
/// anyone else never.
fn exactly_once(at: &str, sink: &Sink, states: &BTreeMap<String, String>) {
    let accepted = sink.accepted();
    assert!(
        accepted.values().all(|&n| n == 1),
        "{at}: nobody accepted twice: {accepted:?}"
    );
    for (address, state) in states {
        let n = accepted.get(address).copied().unwrap_or(0);
        match state.as_str() {
            "sent" => assert_eq!(n, 1, "{at}: {address} is sent, and was accepted {n} times"),
            "ambiguous" => assert!(n <= 1, "{at}: {address} (ambiguous) accepted {n} times"),
            _ => assert_eq!(n, 0, "{at}: {address} is {state}, yet was accepted"),
        }
    }
    for address in accepted.keys() {
        assert!(
            states.contains_key(address),
            "{at}: {address} is no recipient"
        );
    }
}

/// How many complete replies one write of the sink's holds (a reply's last line has a space
/// after its code).
fn replies_in(bytes: &[u8]) -> usize {
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| line.len() > 3 && line[3] == b' ')
        .count()
}

/// The transport used the wire the sink offered: without PIPELINING one reply per write of
/// the sink's and no violation (the sink flags commands sent before their turn); with it,
/// some replies to a batch went together; every message after DATA, or with CHUNKING in
/// BDAT chunks and never after DATA.
pub(crate) fn on_the_wire(at: &str, wire: Wire, sink: &Sink) {
    let violations = sink.violations();
    assert!(
        violations.is_empty(),
        "{at}: the client sent what a real SMTP server refuses: {violations:?}"
    );
    let transactions = sink.transactions();
    let chunks: Vec<usize> = transactions.iter().map(|t| t.chunks).collect();
    let verbs: BTreeSet<String> = sink.commands().into_iter().map(|(_, verb)| verb).collect();
    if wire == Wire::Chunking {
        assert!(
            chunks.iter().all(|&n| n >= 1),
            "{at}: every message in BDAT chunks: {chunks:?}"
        );
        assert!(!verbs.contains("DATA"), "{at}: DATA sent: {verbs:?}");
    } else {
        assert!(
            chunks.iter().all(|&n| n == 0),
            "{at}: every message after DATA: {chunks:?}"
        );
        assert!(!verbs.contains("BDAT"), "{at}: BDAT sent: {verbs:?}");
    }
    let batched = sink
        .writes()
        .iter()
        .filter(|w| replies_in(&w.bytes) >= 2)
        .count();
    if wire == Wire::Serial {
        assert_eq!(batched, 0, "{at}: replies went together, so commands did");
    } else if !transactions.is_empty() {
        assert!(
            batched >= 1,
            "{at}: no batch of commands was answered together"
        );
    }
}

/// The phases of a transaction whose reply a script can refuse over `wire`. With CHUNKING
/// there is no DATA: the message goes with `BDAT … LAST`, whose reply is
/// [`Phase::EndOfData`], so that phase is the refusal of BDAT.
fn refusable(wire: Wire) -> &'static [Phase] {
    match wire {
        Wire::Chunking => &[Phase::Rcpt, Phase::EndOfData],
        Wire::Serial | Wire::Pipelining => &[Phase::Rcpt, Phase::Data, Phase::EndOfData],
    }
}

/// How many RCPTs the sink had for `address`.
fn tries(sink: &Sink, address: &str) -> usize {
    sink.rcpts().iter().filter(|r| r.rcpt == address).count()
}

/// The messages the sink recorded for `address`, whatever it answered.
fn received(sink: &Sink, address: &str) -> usize {
    sink.transactions()
        .iter()
        .filter(|t| t.rcpt_to[0] == address)
        .count()
}

#[test]
fn four_hundred_replies_at_each_phase_are_retried_until_sent_once() {
    for wire in Wire::ALL {
        for &phase in refusable(wire) {
            let at = format!("{wire:?}, 451 at {phase:?}");
            // user3's first two attempts are refused for now, at this phase.
            let sink = Sink::on_wire(
                first_times(2, phase, "user3@", "451 4.3.0 temporary problem"),
                wire,
            );
            let (run, states) = send_and_report(&sink, 8, 2, |c| c);
            assert_eq!(run.code, 0, "{at}: {run:?}");
            assert_eq!(balanced_at(&at, &run, &sink, 8)["sent"], 8, "{at}");
            exactly_once(&at, &sink, &states);
            on_the_wire(&at, wire, &sink);
            assert_eq!(
                count(&run.stdout, "retries after 4xx"),
                Some(2),
                "{at}: {}",
                run.stdout
            );
            assert_eq!(
                tries(&sink, "user3@example3.com"),
                3,
                "{at}: two refusals, then the one that went through"
            );
            for other in addresses(8).iter().filter(|a| !a.starts_with("user3@")) {
                assert_eq!(tries(&sink, other), 1, "{at}: {other} was tried once");
            }
        }
    }
}

#[test]
fn five_hundred_replies_at_each_phase_fail_exactly_once() {
    for wire in Wire::ALL {
        for &phase in refusable(wire) {
            let at = format!("{wire:?}, 550 at {phase:?}");
            let refuse: Script = Arc::new(move |p, rcpt| {
                (p == phase && rcpt.starts_with("user2@"))
                    .then(|| "550 5.1.1 no such user".to_owned())
            });
            let sink = Sink::on_wire(refuse, wire);
            let (run, states) = send_and_report(&sink, 6, 2, |c| c);
            assert_eq!(run.code, 1, "{at}: {run:?}");
            let counted = balanced_at(&at, &run, &sink, 6);
            assert_eq!((counted["sent"], counted["failed"]), (5, 1), "{at}");
            exactly_once(&at, &sink, &states);
            on_the_wire(&at, wire, &sink);
            assert_eq!(
                tries(&sink, "user2@example2.com"),
                1,
                "{at}: a 5xx is never retried"
            );
            assert!(
                run.stdout
                    .contains("user2@example2.com failed: 550 5.1.1 no such user"),
                "{at}: {}",
                run.stdout
            );
        }
    }
}

#[test]
fn a_421_mid_batch_defers_and_the_message_goes_once_on_a_new_connection() {
    // The relay answers one command of user3's transaction with 421 and closes the
    // connection: with PIPELINING or CHUNKING, in the middle of the batch's replies (at RCPT
    // the replies to DATA or BDAT never come). Deferred, not ambiguous (the relay said no),
    // and sent once on a later connection.
    for wire in Wire::ALL {
        for &phase in refusable(wire) {
            let at = format!("{wire:?}, 421 at {phase:?}");
            let sink = Sink::on_wire(
                first_times(1, phase, "user3@", "421 4.3.2 shutting down"),
                wire,
            );
            let (run, states) = send_and_report(&sink, 8, 2, |c| c);
            assert_eq!(run.code, 0, "{at}: {run:?}");
            assert_eq!(balanced_at(&at, &run, &sink, 8)["sent"], 8, "{at}");
            exactly_once(&at, &sink, &states);
            on_the_wire(&at, wire, &sink);
            assert_eq!(
                count(&run.stdout, "retries after 4xx"),
                Some(1),
                "{at}: {}",
                run.stdout
            );
            assert_eq!(tries(&sink, "user3@example3.com"), 2, "{at}");
            assert!(sink.connections() >= 3, "{at}: {}", sink.connections());
        }
    }
}

#[test]
fn a_hang_up_after_a_batch_is_retried_unless_the_message_went_with_it() {
    // The relay hangs up without a word on reading MAIL (the first of the run) or user3's
    // RCPT. With DATA nothing was sent that it could accept: the message goes again, on a new
    // connection, once. With CHUNKING the message was in the same write: the relay may have
    // it, so it is ambiguous by design and never sent again (here the sink had not read it).
    for wire in Wire::ALL {
        for phase in [Phase::Mail, Phase::Rcpt] {
            let at = format!("{wire:?}, hang-up at {phase:?}");
            let matching = if phase == Phase::Mail { "" } else { "user3@" };
            let sink = Sink::on_wire(first_times(1, phase, matching, "DROP"), wire);
            let (run, states) = send_and_report(&sink, 8, 2, |c| c);
            let counted = balanced_at(&at, &run, &sink, 8);
            exactly_once(&at, &sink, &states);
            on_the_wire(&at, wire, &sink);
            if wire == Wire::Chunking {
                assert_eq!(run.code, 1, "{at}: {run:?}");
                assert_eq!(
                    (counted["sent"], counted["ambiguous"]),
                    (7, 1),
                    "{at}: {}",
                    run.stdout
                );
                let ambiguous: Vec<&String> = states
                    .iter()
                    .filter(|(_, state)| *state == "ambiguous")
                    .map(|(address, _)| address)
                    .collect();
                let address = ambiguous[0];
                if phase == Phase::Rcpt {
                    assert_eq!(address, "user3@example3.com", "{at}");
                }
                assert_eq!(
                    received(&sink, address),
                    0,
                    "{at}: the sink read no message"
                );
                assert!(
                    tries(&sink, address) <= 1,
                    "{at}: {address} was not sent again"
                );
            } else {
                assert_eq!(run.code, 0, "{at}: {run:?}");
                assert_eq!(counted["sent"], 8, "{at}: {}", run.stdout);
                if phase == Phase::Rcpt {
                    assert_eq!(tries(&sink, "user3@example3.com"), 2, "{at}");
                }
            }
        }
    }
}

#[test]
fn a_recipient_refused_for_now_every_time_stays_deferred_after_max_attempts() {
    let always: Script = Arc::new(|p, rcpt| {
        (p == Phase::Rcpt && rcpt.starts_with("user1@"))
            .then(|| "452 4.2.2 mailbox full".to_owned())
    });
    let sink = Sink::scripted(always);
    let run = send(&sink, 4, 1, |c| c.retry("max_attempts = 3"));
    assert_eq!(run.code, 75, "work remains: {run:?}");
    let states = balanced(&run, &sink, 4);
    assert_eq!((states["sent"], states["deferred"]), (3, 1));
    assert_eq!(
        sink.rcpts()
            .iter()
            .filter(|r| r.rcpt.starts_with("user1@"))
            .count(),
        3
    );
    assert!(
        run.stdout
            .contains("452 4.2.2 mailbox full (left for the next run)"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_retry_not_due_before_the_linger_ends_is_left_for_the_next_run() {
    let sink = Sink::scripted(first_times(1, Phase::Rcpt, "user0@", "421 4.4.2 timeout"));
    // The backoff (at least 30 s) is far beyond the linger (50 ms): the run does not wait.
    let run = send(&sink, 3, 1, |c| {
        c.retry("backoff = \"60s\"\nmax_backoff = \"60s\"\nlinger = \"50ms\"")
    });
    assert_eq!(run.code, 75, "{run:?}");
    let states = balanced(&run, &sink, 3);
    assert_eq!((states["sent"], states["deferred"]), (2, 1));
}

#[test]
fn relay_failures_pause_sending_and_change_no_recipients_state() {
    // 421 at the greeting for the first two connections, then a normal relay. One
    // connection, so each refusal is news: two pauses, then everything goes.
    let greetings = Arc::new(AtomicUsize::new(0));
    let script: Script = Arc::new(move |phase, _| {
        (phase == Phase::Greeting && greetings.fetch_add(1, Ordering::SeqCst) < 2)
            .then(|| "421 4.3.2 service not available".to_owned())
    });
    let sink = Sink::scripted(script);
    let run = send(&sink, 10, 1, |c| c);
    assert_eq!(run.code, 0, "{run:?}");
    let states = balanced(&run, &sink, 10);
    assert_eq!(states["sent"], 10);
    assert_eq!(
        count(&run.stdout, "relay pauses"),
        Some(2),
        "{}",
        run.stdout
    );
    assert_eq!(sink.connections(), 3);
    assert!(
        run.stderr.contains("relay unavailable; pausing"),
        "{}",
        run.stderr
    );

    // MAIL FROM refused, once, for now or for good: a relay-wide problem, not the
    // recipient's. With PIPELINING or CHUNKING, RCPT and DATA or BDAT (with the message) went
    // with it and were refused too.
    for wire in Wire::ALL {
        for refusal in ["451 4.3.0 queue full", "553 5.7.1 sender not allowed"] {
            let at = format!("{wire:?}, {refusal} at MAIL");
            let sink = Sink::on_wire(first_times(1, Phase::Mail, "", refusal), wire);
            let (run, states) = send_and_report(&sink, 5, 1, |c| c);
            assert_eq!(run.code, 0, "{at}: {run:?}");
            assert_eq!(balanced_at(&at, &run, &sink, 5)["sent"], 5, "{at}");
            exactly_once(&at, &sink, &states);
            on_the_wire(&at, wire, &sink);
            assert_eq!(
                count(&run.stdout, "relay pauses"),
                Some(1),
                "{at}: {}",
                run.stdout
            );
            assert_eq!(
                count(&run.stdout, "retries after 4xx"),
                None,
                "{at}: {}",
                run.stdout
            );
            assert!(
                run.stderr.contains(&format!(
                    "the relay refused the sender `news@example.com`: {refusal}"
                )),
                "{at}: {}",
                run.stderr
            );
        }
    }

    // A relay that never recovers: `relay_attempts` pauses, then exit 69, everyone pending.
    let refusing: Script = Arc::new(|phase, _| {
        (phase == Phase::Greeting).then(|| "554 5.3.2 not accepting mail".to_owned())
    });
    let sink = Sink::scripted(refusing);
    let run = send(&sink, 5, 2, |c| c.retry("relay_attempts = 3"));
    assert_eq!(run.code, 69, "{run:?}");
    assert_eq!(balanced(&run, &sink, 5)["pending"], 5);
    // Two pauses, then the third failure in a row ends the run. The second worker may or may
    // not have tried before the first failure came back; after a pause, one probe at a time.
    assert_eq!(
        count(&run.stdout, "relay pauses"),
        Some(2),
        "{}",
        run.stdout
    );
    assert!(
        (3..=4).contains(&sink.connections()),
        "{}",
        sink.connections()
    );
    assert!(
        run.stderr
            .contains("relay unavailable, 5 recipients left pending"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_relay_that_takes_fewer_connections_than_configured_gets_fewer() {
    // The relay takes two connections; every later one is refused at the greeting. A refusal
    // while the others are answered is its connection limit: the pool goes on with the two
    // (a refusal before any answer may count as an outage first); nobody's state changes;
    // everything goes over the two.
    let greetings = Arc::new(AtomicUsize::new(0));
    let script: Script = Arc::new(move |phase, _| {
        (phase == Phase::Greeting && greetings.fetch_add(1, Ordering::SeqCst) >= 2)
            .then(|| "421 4.7.0 too many connections from your host".to_owned())
    });
    let sink = Sink::scripted(script);
    let run = send(&sink, 30, 4, |c| c);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(balanced(&run, &sink, 30)["sent"], 30);
    assert!(
        count(&run.stdout, "connections refused").is_some_and(|n| (1..=2).contains(&n)),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr
            .contains("the relay refused one more connection while answering on the others"),
        "{}",
        run.stderr
    );
    let served: std::collections::BTreeSet<usize> =
        sink.transactions().iter().map(|t| t.connection).collect();
    assert_eq!(served.len(), 2, "{served:?}");
}

/// A relay that answers `answered` recipients, then goes down: every reply is a 421 (which
/// closes the connection) until it has refused `greetings` new connections (forever with
/// `usize::MAX`).
fn outage(answered: usize, greetings: usize) -> Script {
    let rcpts = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    Arc::new(move |phase, _| {
        if phase == Phase::Rcpt {
            rcpts.fetch_add(1, Ordering::SeqCst);
        }
        let down = rcpts.load(Ordering::SeqCst) > answered
            && refused.load(Ordering::SeqCst) < greetings
            && phase != Phase::Ehlo;
        if down && phase == Phase::Greeting {
            refused.fetch_add(1, Ordering::SeqCst);
        }
        down.then(|| "421 4.3.2 service shutting down".to_owned())
    })
}

#[test]
fn after_an_outage_the_pool_grows_back_to_every_connection() {
    // Three connections; after 20 recipients the relay goes down under all of them, until it
    // has refused four new connections (at most three can try before mailer holds back, so
    // the last is a probe after a pause, when no connection is left from before). Then one
    // connection (the probe), and one more per answer, back to three at once.
    let sink = Sink::scripted(outage(20, 4));
    let run = send(&sink, 60, 3, |c| c.retry("relay_attempts = 10"));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(balanced(&run, &sink, 60)["sent"], 60);
    assert!(
        count(&run.stdout, "relay pauses").is_some_and(|n| n >= 1),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("relay unavailable; pausing"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("relay answers again; growing back to 3 connections"),
        "{}",
        run.stderr
    );
    assert!(
        count(&run.stdout, "pool grown back").is_some_and(|n| n >= 1),
        "{}",
        run.stdout
    );
    let back = sink.last_421_close().expect("the outage");
    assert_eq!(
        sink.max_concurrent_after(back),
        3,
        "three sessions at once after the outage"
    );
}

#[test]
fn a_relay_down_after_answering_is_an_outage_not_a_connection_limit() {
    // The relay answers ten recipients on three connections, then every reply is a 421: the
    // connections refused after those answers are not its connection limit.
    let sink = Sink::scripted(outage(10, usize::MAX));
    let run = send(&sink, 30, 3, |c| c.retry("relay_attempts = 3"));
    assert_eq!(run.code, 69, "{run:?}");
    let states = balanced(&run, &sink, 30);
    assert!((1..=10).contains(&states["sent"]), "{}", run.stdout);
    assert_eq!(
        count(&run.stdout, "connections refused"),
        None,
        "{}",
        run.stdout
    );
    assert!(
        !run.stderr.contains("refused one more connection"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("relay unavailable; pausing"),
        "{}",
        run.stderr
    );
}

#[test]
fn hang_ups_and_silent_closes_lose_nothing_and_send_nothing_twice() {
    for wire in Wire::ALL {
        // The server closes every connection after 3 messages without a word: the next
        // command finds it gone, and the message goes on a new connection.
        let at = format!("{wire:?}, closed after 3 messages");
        let sink = Sink::faulty(
            Arc::new(|_, _| None),
            Tls::None,
            Faults {
                close_after: Some(3),
                wire,
                ..Faults::default()
            },
        );
        let (run, states) = send_and_report(&sink, 20, 2, |c| c);
        let counted = balanced_at(&at, &run, &sink, 20);
        exactly_once(&at, &sink, &states);
        on_the_wire(&at, wire, &sink);
        // At most one recipient of a connection is left unknown (invariant 5).
        assert!(
            counted["ambiguous"] <= sink.connections(),
            "{at}: {} ambiguous over {} connections",
            counted["ambiguous"],
            sink.connections()
        );
        if wire == Wire::Chunking {
            // The transport looks for the close before it writes MAIL, RCPT, BDAT and the
            // message at once; a close that lands between the look and the write races it,
            // and a batch written to a closed connection is ambiguous by design (no reply:
            // the relay may have read it). So here: nobody lost (each sent or ambiguous), and
            // an ambiguous message is one the sink never read.
            assert_eq!(
                counted["sent"] + counted["ambiguous"],
                20,
                "{at}: {}",
                run.stdout
            );
            assert_eq!(
                run.code,
                i32::from(counted["ambiguous"] > 0),
                "{at}: {run:?}"
            );
            for (address, state) in &states {
                if state == "ambiguous" {
                    assert_eq!(received(&sink, address), 0, "{at}: {address} arrived");
                    assert_eq!(tries(&sink, address), 0, "{at}: {address} was read");
                }
            }
        } else {
            assert_eq!(run.code, 0, "{at}: {run:?}");
            assert_eq!(counted["sent"], 20, "{at}: {}", run.stdout);
            // The closed connection was seen before anything went on it: each recipient's
            // RCPT reached the sink once.
            for address in states.keys() {
                assert_eq!(tries(&sink, address), 1, "{at}: {address}");
            }
        }

        // A hang-up in the middle of one body (after DATA, before the final dot; with BDAT,
        // halfway through the chunk): the server has no message, but mailer cannot know how
        // far it got, so the recipient is ambiguous — reported, never re-sent.
        let at = format!("{wire:?}, hang-up mid-body");
        let script: Script = Arc::new(|phase, rcpt| {
            (phase == Phase::Body && rcpt.starts_with("user4@")).then(|| "DROP".to_owned())
        });
        let sink = Sink::on_wire(script, wire);
        let (run, states) = send_and_report(&sink, 8, 2, |c| c);
        assert_eq!(run.code, 1, "{at}: {run:?}");
        let counted = balanced_at(&at, &run, &sink, 8);
        assert_eq!((counted["sent"], counted["ambiguous"]), (7, 1), "{at}");
        exactly_once(&at, &sink, &states);
        on_the_wire(&at, wire, &sink);
        assert_eq!(states["user4@example4.com"], "ambiguous", "{at}");
        assert_eq!(tries(&sink, "user4@example4.com"), 1, "{at}");
        assert_eq!(
            received(&sink, "user4@example4.com"),
            0,
            "{at}: no message arrived"
        );

        // A hang-up after the final dot, or after `BDAT … LAST` and its chunk, without a
        // reply: the sink has the message; mailer reports it ambiguous and does not send it
        // again.
        let at = format!("{wire:?}, hang-up after the message");
        let script: Script = Arc::new(|phase, rcpt| {
            (phase == Phase::EndOfData && rcpt.starts_with("user5@")).then(|| "DROP".to_owned())
        });
        let sink = Sink::on_wire(script, wire);
        let (run, states) = send_and_report(&sink, 8, 2, |c| c);
        assert_eq!(run.code, 1, "{at}: {run:?}");
        let counted = balanced_at(&at, &run, &sink, 8);
        assert_eq!((counted["sent"], counted["ambiguous"]), (7, 1), "{at}");
        exactly_once(&at, &sink, &states);
        on_the_wire(&at, wire, &sink);
        assert_eq!(states["user5@example5.com"], "ambiguous", "{at}");
        assert_eq!(
            received(&sink, "user5@example5.com"),
            1,
            "{at}: received once, never again"
        );
        assert_eq!(tries(&sink, "user5@example5.com"), 1, "{at}");
    }
}

#[test]
fn each_phase_has_its_own_timeout_and_a_late_final_reply_is_ambiguous() {
    for wire in Wire::ALL {
        // A slow but timely MAIL reply is fine; a final reply later than data_timeout leaves
        // the outcome unknown: ambiguous, and not sent again even though the sink kept it.
        // With CHUNKING, the replies to MAIL and RCPT may wait for the message (the sink
        // holds them until it answers BDAT), so they have data_timeout too.
        let at = format!("{wire:?}, a late final reply");
        let script: Script = Arc::new(|phase, rcpt| match phase {
            Phase::Mail => Some("SLEEP 50 250 2.1.0 ok".to_owned()),
            Phase::EndOfData if rcpt.starts_with("user1@") => {
                Some("SLEEP 4000 250 2.0.0 too late".to_owned())
            }
            _ => None,
        });
        let sink = Sink::on_wire(script, wire);
        let (run, states) = send_and_report(&sink, 3, 1, |c| {
            c.transport("command_timeout = \"5s\"\ndata_timeout = \"1s\"")
        });
        assert_eq!(run.code, 1, "{at}: {run:?}");
        exactly_once(&at, &sink, &states);
        on_the_wire(&at, wire, &sink);
        // user1's outcome is unknown. A slow machine may leave another final reply later
        // than data_timeout too: so at least one, and user1's among them.
        assert!(
            count(&run.stdout, "ambiguous").is_some_and(|n| n >= 1),
            "{at}: {}",
            run.stdout
        );
        let line = run
            .stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("line 3 user1@example1.com ambiguous: "))
            .unwrap_or_else(|| panic!("{at}: {}", run.stdout));
        if wire == Wire::Chunking {
            // Whichever reply of the batch was the first missing (the sink holds MAIL's and
            // RCPT's while it waits to answer BDAT).
            assert!(
                line.starts_with("line 3 user1@example1.com ambiguous: no reply after the message went with BDAT: ")
                    && line.ends_with(": no reply in time"),
                "{at}: {line}"
            );
        } else {
            assert_eq!(
                line,
                "line 3 user1@example1.com ambiguous: no reply after the message body within 1s",
                "{at}"
            );
        }
        assert_eq!(received(&sink, "user1@example1.com"), 1, "{at}");

        // A command reply slower than command_timeout: the connection is abandoned before
        // the body, so the message goes again on a fresh one; a relay that always stalls is a
        // relay failure, and nobody's state changes.
        let at = format!("{wire:?}, a stalled RCPT reply");
        let stalls = Arc::new(AtomicUsize::new(0));
        let script: Script = Arc::new(move |phase, _| {
            (phase == Phase::Rcpt && stalls.fetch_add(1, Ordering::SeqCst) == 0)
                .then(|| "SLEEP 2000 250 2.1.5 ok".to_owned())
        });
        let sink = Sink::on_wire(script, wire);
        let (run, states) =
            send_and_report(&sink, 3, 1, |c| c.transport("command_timeout = \"1s\""));
        assert_eq!(run.code, 0, "{at}: {run:?}");
        assert_eq!(balanced_at(&at, &run, &sink, 3)["sent"], 3, "{at}");
        exactly_once(&at, &sink, &states);
        on_the_wire(&at, wire, &sink);
        let stalled = sink.rcpts()[0].rcpt.clone();
        let transactions = sink.transactions();
        let served: Vec<(usize, &Vec<String>)> = transactions
            .iter()
            .map(|t| (t.connection, &t.rcpt_to))
            .collect();
        if wire == Wire::Chunking {
            // The message went with MAIL and RCPT: their replies have data_timeout (600 s
            // here), the stall is waited out, and everything goes on the first connection.
            assert!(
                transactions.iter().all(|t| t.connection == 1),
                "{at}: one connection: {served:?}"
            );
            assert_eq!(sink.connections(), 1, "{at}");
        } else {
            // In order, not by count (a slow machine may time out more): the stalled first
            // connection carried no message, and the stalled recipient's went on a later one.
            assert!(
                transactions.iter().all(|t| t.connection > 1),
                "{at}: the first connection was abandoned before the body: {served:?}"
            );
            assert!(sink.connections() >= 2, "{at}");
        }
        assert_eq!(
            transactions
                .iter()
                .filter(|t| t.rcpt_to == [stalled.clone()])
                .count(),
            1,
            "{at}: {stalled} once"
        );
    }
}

#[test]
fn a_throttled_domain_slows_down_without_holding_up_the_others() {
    // slow.example's rows come first; its first three RCPTs get 421 4.7.0. If the throttled
    // domain held up the queue, the others would wait behind it.
    let script = first_times(
        3,
        Phase::Rcpt,
        "@slow.example",
        "421 4.7.0 Too many messages, slow down",
    );
    let sink = Sink::scripted(script);
    let slow: Vec<String> = (0..8)
        .map(|i| format!("s{i}@slow.example,Slow {i},en,Pro"))
        .collect();
    let campaign = Campaign::example()
        .smtp(&sink, 2)
        .rows(slow)
        .rows(people(30))
        .extra("[rate.per_domain]\n\"slow.example\" = \"10/s\"\n");
    let run = campaign.run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let states = balanced(&run, &sink, 38);
    assert_eq!(states["sent"], 38);
    assert!(
        run.stdout.contains("throttled: slow.example slowed to"),
        "{}",
        run.stdout
    );
    let rcpts = sink.rcpts();
    // Every other recipient was tried once, and others went while slow.example waited for
    // its slowed pace: at least one of them after the first throttling reply and before the
    // last of slow.example's rows was first tried. Behind a throttled domain in one queue,
    // every slow.example row (they come first) would be tried before any other. An order,
    // not a race: a slow machine fits fewer others into each wait, but an idle connection
    // takes one whenever slow.example must wait.
    let others: Vec<_> = rcpts
        .iter()
        .filter(|r| !r.rcpt.ends_with("@slow.example"))
        .collect();
    assert_eq!(others.len(), 30);
    let throttled_at = rcpts
        .iter()
        .find(|r| r.reply.starts_with("421"))
        .unwrap()
        .at;
    let mut first_tries: BTreeMap<&str, Instant> = BTreeMap::new();
    for r in rcpts.iter().filter(|r| r.rcpt.ends_with("@slow.example")) {
        first_tries.entry(r.rcpt.as_str()).or_insert(r.at);
    }
    assert_eq!(first_tries.len(), 8, "{first_tries:?}");
    let last_first_try = *first_tries.values().max().unwrap();
    assert!(
        others
            .iter()
            .any(|r| r.at > throttled_at && r.at < last_first_try),
        "every slow.example row was tried before any other recipient: {:?}",
        rcpts.iter().map(|r| &r.rcpt).collect::<Vec<_>>()
    );
    // After the first throttling reply, slow.example went at most at its halved pace
    // (5/s): measured as a lower bound on elapsed time, which a slow machine only lengthens.
    let first_throttle = rcpts
        .iter()
        .find(|r| r.reply.starts_with("421"))
        .unwrap()
        .at;
    let after: Vec<Instant> = rcpts
        .iter()
        .filter(|r| r.rcpt.ends_with("@slow.example") && r.at > first_throttle)
        .map(|r| r.at)
        .collect();
    let span = after.last().unwrap().duration_since(first_throttle);
    // At 5/s, n more messages take at least (n − 1) × 200 ms; allow transport jitter by
    // asserting only the 10/s bound (100 ms each).
    assert!(
        span >= Duration::from_millis(100) * u32::try_from(after.len() - 1).unwrap(),
        "{} messages in {span:?}",
        after.len()
    );
}

#[test]
fn a_domain_that_keeps_throttling_is_suspended_and_a_later_run_finishes_it() {
    // slow.example answers every RCPT with Gmail's rate complaint until the test says
    // otherwise. At 40/s, halved to 20 and 10 (the floor), then suspended; the others finish.
    let throttling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let script: Script = {
        let throttling = Arc::clone(&throttling);
        Arc::new(move |phase, rcpt| {
            (phase == Phase::Rcpt
                && rcpt.ends_with("@slow.example")
                && throttling.load(Ordering::SeqCst))
            .then(|| "421 4.7.28 Our system has detected an unusual rate of mail".to_owned())
        })
    };
    let sink = Sink::scripted(script);
    let slow: Vec<String> = (0..20)
        .map(|i| format!("s{i}@slow.example,Slow {i},en,Pro"))
        .collect();
    let campaign = Campaign::example()
        .smtp(&sink, 2)
        .rows(slow)
        .rows(people(40))
        .retry("max_attempts = 50")
        .extra(
            "[rate]\nthrottle_floor = \"10/s\"\n[rate.per_domain]\n\"slow.example\" = \"40/s\"\n",
        );
    let started = Instant::now();
    let first = campaign.run("send", &[]);
    assert!(started.elapsed() < Duration::from_secs(120), "not trickled");
    assert_eq!(first.code, 75, "work remains: {first:?}");
    let states = balanced(&first, &sink, 60);
    assert_eq!(
        (states["sent"], states["deferred"]),
        (40, 20),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains("suspended: slow.example until ")
            && first
                .stdout
                .contains("(it kept throttling below `[rate] throttle_floor`)"),
        "{}",
        first.stdout
    );
    assert!(
        first
            .stderr
            .contains("domain suspended: it keeps throttling")
            && first.stderr.contains("slow.example"),
        "{}",
        first.stderr
    );
    let report = campaign.run("report", &["--format", "csv"]);
    assert!(
        report.stdout.contains("slow.example suspended until "),
        "{}",
        report.stdout
    );

    // A run before the suspension ends sends nothing to it; status says until when.
    let tried = sink.rcpts().len();
    let second = campaign.run("send", &[]);
    assert_eq!(second.code, 75, "{second:?}");
    assert_eq!(
        sink.rcpts().len(),
        tried,
        "nothing before the suspension ends"
    );
    assert!(
        second.stdout.contains("suspended: slow.example until "),
        "{}",
        second.stdout
    );
    let status = campaign.run("status", &[]);
    assert!(
        status.stdout.contains("slow.example suspended until "),
        "{}",
        status.stdout
    );

    // A run just after it (a fixed clock) sends the rest, starting the domain at the pace it
    // had.
    throttling.store(false, Ordering::SeqCst);
    let until = first
        .stdout
        .split("suspended: slow.example until ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    let later = (chrono::DateTime::parse_from_rfc3339(until).unwrap()
        + chrono::Duration::seconds(1))
    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let path = campaign.write();
    let third = crate::campaign::mailer(
        &["send", path.to_str().unwrap()],
        &[("MAILER_NOW", later.as_str())],
    );
    assert_eq!(third.code, 0, "{third:?}");
    assert_eq!(balanced(&third, &sink, 60)["sent"], 60);
    // The pace it had when suspended (10/s here, unless the rate it was getting was lower).
    let pace = |log: &str, line: &str| -> String {
        let line = log.lines().find(|l| l.contains(line)).unwrap_or_default();
        line.split_whitespace()
            .find(|word| word.starts_with("per_second="))
            .unwrap_or_default()
            .to_owned()
    };
    let suspended_at = pace(&first.stderr, "domain suspended: it keeps throttling");
    assert!(!suspended_at.is_empty(), "{}", first.stderr);
    assert_eq!(
        pace(
            &third.stderr,
            "domain suspended by an earlier run for throttling: it starts at the pace it had"
        ),
        suspended_at,
        "{}",
        third.stderr
    );
}

/// The most RCPTs in any half-open window `[t, t + 1 s)`.
pub(crate) fn busiest_second(mut times: Vec<Instant>) -> usize {
    times.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= Duration::from_secs(1) {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[test]
fn limits_hold_globally_and_per_domain_where_the_messages_arrive() {
    // One connection: the sink sees a message only after mailer let it go, and mailer lets
    // the next go only after the sink answered, so no delay on either side can bunch them.
    // (With N connections a window could hold N − 1 more at the sink than at the limiter.)
    let sink = Sink::start();
    let run = send(&sink, 60, 1, |c| {
        c.extra("[rate]\nper_second = 30\nburst = 3\n")
    });
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(balanced(&run, &sink, 60)["sent"], 60);
    let all: Vec<Instant> = sink.rcpts().iter().map(|r| r.at).collect();
    assert!(
        busiest_second(all.clone()) <= 30 + 3,
        "{}",
        busiest_second(all)
    );

    // Per domain: the default pace, and a domain with its own.
    let sink = Sink::start();
    let rows = (0..10)
        .map(|i| format!("a{i}@a.example,A {i},en,Pro"))
        .chain((0..6).map(|i| format!("b{i}@b.example,B {i},en,Pro")));
    let run = Campaign::example()
        .smtp(&sink, 1)
        .rows(rows)
        .extra("[rate.per_domain]\ndefault = \"6/s\"\n\"B.example\" = \"3/s\"\n")
        .run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(balanced(&run, &sink, 16)["sent"], 16);
    for (suffix, limit) in [("@a.example", 6), ("@b.example", 3)] {
        let times: Vec<Instant> = sink
            .rcpts()
            .iter()
            .filter(|r| r.rcpt.ends_with(suffix))
            .map(|r| r.at)
            .collect();
        // Their bursts are one message.
        assert!(
            busiest_second(times.clone()) <= limit + 1,
            "{suffix}: {}",
            busiest_second(times)
        );
    }
}

#[test]
fn batches_pause_between_them() {
    let sink = Sink::start();
    let started = Instant::now();
    let run = send(&sink, 9, 2, |c| {
        c.extra("[rate]\nbatch_size = 3\nbatch_pause = \"400ms\"\n")
    });
    // A lower bound, which a slow machine only lengthens: two pauses between three batches
    // (nine messages alone take a few milliseconds).
    let elapsed = started.elapsed();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(balanced(&run, &sink, 9)["sent"], 9);
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    // After the first and second batch; not after the last, with nothing left to send.
    assert_eq!(
        run.stderr.matches("batch handed out; pausing").count(),
        2,
        "{}",
        run.stderr
    );
}

#[test]
fn cron_gets_json_log_lines_that_name_each_deferral() {
    let sink = Sink::scripted(first_times(1, Phase::Rcpt, "user1@", "450 4.2.1 try later"));
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(3));
    let path = campaign.write();
    let run = crate::campaign::mailer(
        &["--log-format", "json", "send", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let events: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let deferred = events
        .iter()
        .find(|e| e["fields"]["message"] == "deferred")
        .unwrap_or_else(|| panic!("{}", run.stderr));
    assert_eq!(deferred["level"], "INFO");
    assert_eq!(deferred["fields"]["recipient"], "user1@example1.com");
    assert_eq!(deferred["fields"]["attempt"], 1);
    assert_eq!(deferred["fields"]["reply"], "450 4.2.1 try later");
    assert!(events.iter().any(|e| e["fields"]["message"] == "sending"));
}

#[test]
fn a_go_ahead_after_every_recipient_was_refused_gets_a_lone_dot_and_the_refusal_stands() {
    // RFC 2920 §3.1: a relay may answer DATA with 354 though it refused the transaction's only
    // RCPT. The pipelining client must end that empty message with a lone dot (the sink flags
    // anything sent before it) and keep the RCPT's refusal as the outcome.
    let refused = addresses(3)[1].clone();
    let script: Script = {
        let refused = refused.clone();
        Arc::new(move |phase, rcpt| {
            (phase == Phase::Rcpt && rcpt == refused).then(|| "550 5.1.1 no such user".to_owned())
        })
    };
    let sink = Sink::faulty(
        script,
        Tls::None,
        Faults {
            go_ahead_without_recipients: true,
            ..Faults::default()
        },
    );
    let (run, states) = send_and_report(&sink, 3, 1, |c| c);
    let at = "a 354 after a refused RCPT";
    let counted = balanced_at(at, &run, &sink, 3);
    assert_eq!(
        (counted["sent"], counted["failed"]),
        (2, 1),
        "{}",
        run.stdout
    );
    assert_eq!(states[&refused], "failed", "{states:?}");
    exactly_once(at, &sink, &states);
    on_the_wire(at, Wire::Pipelining, &sink);
    // The refused recipient's transaction got DATA (then only the dot), and RSET after it.
    let verbs: Vec<String> = sink.commands().into_iter().map(|(_, verb)| verb).collect();
    assert_eq!(
        verbs.iter().filter(|v| *v == "DATA").count(),
        3,
        "{verbs:?}"
    );
    assert_eq!(
        verbs.iter().filter(|v| *v == "RSET").count(),
        1,
        "{verbs:?}"
    );
}
