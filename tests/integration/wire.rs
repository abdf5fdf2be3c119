//! What reaches the wire, judged at the sink: rate limits over several connections and across
//! a restart (DESIGN.md invariant 7), and bodies that survive SMTP's transparency rules —
//! dot-stuffing, CRLF only, no line over 998 octets (invariant 4).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mail_parser::MimeHeaders as _;

use crate::campaign::{Campaign, Running, people, wait_until};
use crate::count;
use crate::delivery::busiest_second;
use crate::sink::{Phase, Sink, Transaction, Wire};

/// A sink whose `MAIL FROM` replies take 5 to 35 ms, varying from one message to the next, as
/// a real relay's do: the connections overlap and drift apart, so messages the limiter let go
/// a few ms apart can reach the sink out of step — the bunching the limits allow for.
fn uneven_sink() -> Sink {
    let next = Arc::new(AtomicUsize::new(0));
    Sink::scripted(Arc::new(move |phase, _| {
        (phase == Phase::Mail).then(|| {
            let k = next.fetch_add(1, Ordering::SeqCst);
            format!("SLEEP {} 250 2.1.0 ok", 5 + (k * 17) % 31)
        })
    }))
}

/// When each RCPT for an address ending in `suffix` reached the sink.
fn arrivals(sink: &Sink, suffix: &str) -> Vec<Instant> {
    sink.rcpts()
        .iter()
        .filter(|r| r.rcpt.ends_with(suffix))
        .map(|r| r.at)
        .collect()
}

/// The sink accepted each of `expected` exactly once, and nobody else.
fn each_accepted_once(sink: &Sink, expected: &BTreeSet<String>) {
    let accepted = sink.accepted();
    assert!(
        accepted.values().all(|&n| n == 1),
        "nobody accepted twice: {accepted:?}"
    );
    let got: BTreeSet<String> = accepted.into_keys().collect();
    assert_eq!(&got, expected);
}

/// The connections that carried at least one transaction.
fn connections_used(sink: &Sink) -> usize {
    sink.transactions()
        .iter()
        .map(|t| t.connection)
        .collect::<BTreeSet<_>>()
        .len()
}

// A limiter per worker instead of one for the run lets each of the N connections go at the
// full rate: N × rate. The bounds below are rate + burst + (connections − 1) per 1-second
// window at the sink — BENCHMARKS.md: "a window can in principle hold up to `connections − 1`
// more than the limiter let through (messages admitted a few ms apart can arrive together)".
// Each run holds enough messages for more than one full second at the configured rate, and
// more than the bound, so with 4 × (or even 2 ×) the rate all of them would land within one
// second and the busiest window would hold every message, far over the bound. Only counts
// per window are asserted, never an elapsed time: a slow machine only spreads messages out.

#[test]
fn the_global_rate_holds_over_four_connections() {
    const RATE: usize = 30;
    const BURST: usize = 3;
    const CONNECTIONS: usize = 4;
    // 60 messages: about 2 s at 30/s; at 4 × 30/s (120/s) all of them within half a second,
    // and at 2 × 30/s within one second: 60 in a window against a bound of 36.
    const MESSAGES: usize = 60;
    let sink = uneven_sink();
    let run = Campaign::example()
        .smtp(&sink, CONNECTIONS)
        .rows(people(MESSAGES))
        .extra(&format!("[rate]\nper_second = {RATE}\nburst = {BURST}\n"))
        .run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(count(&run.stdout, "sent"), Some(MESSAGES), "{}", run.stdout);
    let expected = (0..MESSAGES)
        .map(|i| format!("user{i}@example{}.com", i % 7))
        .collect();
    each_accepted_once(&sink, &expected);
    // The starting burst goes to three workers at once: the run did use several connections,
    // so the bound below is tested where a per-worker limiter would show.
    assert!(connections_used(&sink) >= 2, "{}", connections_used(&sink));

    let times = arrivals(&sink, "");
    assert_eq!(times.len(), MESSAGES, "one RCPT per message");
    let busiest = busiest_second(times);
    let bound = RATE + BURST + (CONNECTIONS - 1);
    assert!(
        busiest <= bound,
        "{busiest} RCPTs in one second at the sink, more than {RATE}/s + burst {BURST} + {} \
         connections' bunching",
        CONNECTIONS - 1
    );
    // And it did send at about the rate, not at a trickle: some second held at least half of
    // it (a count, which only a stalled run could miss, not a time limit).
    assert!(busiest >= RATE / 2, "only {busiest} in the busiest second");
}

#[test]
fn per_domain_limits_hold_over_four_connections() {
    const CONNECTIONS: usize = 4;
    // The per-domain burst is 50 ms of the rate, at least one: 1 for all three.
    const BURST: usize = 1;
    // Three domains: two under the `default` pace (the keyed limiter, one key each) and one
    // named (a limiter of its own).
    // (domain, per second, messages): about two seconds' worth each, more than the bound, so
    // at 4 × (or 2 ×) its rate every message of a domain would land within one second.
    let domains: [(&str, usize, usize); 3] = [
        ("a.example", 10, 20),
        ("b.example", 15, 30),
        ("c.example", 10, 20),
    ];
    let mut rows = Vec::new();
    let mut expected = BTreeSet::new();
    for i in 0..30 {
        for (domain, _, messages) in domains {
            if i < messages {
                rows.push(format!("u{i}@{domain},U {i},en,Pro"));
                expected.insert(format!("u{i}@{domain}"));
            }
        }
    }
    let sink = uneven_sink();
    let run = Campaign::example()
        .smtp(&sink, CONNECTIONS)
        .rows(rows)
        .extra("[rate.per_domain]\ndefault = \"10/s\"\n\"b.example\" = \"15/s\"\n")
        .run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(count(&run.stdout, "sent"), Some(70), "{}", run.stdout);
    each_accepted_once(&sink, &expected);
    // Each domain's first message goes at once: three workers.
    assert!(connections_used(&sink) >= 2, "{}", connections_used(&sink));

    for (domain, rate, messages) in domains {
        let times = arrivals(&sink, &format!("@{domain}"));
        assert_eq!(times.len(), messages, "{domain}: one RCPT per message");
        let busiest = busiest_second(times);
        let bound = rate + BURST + (CONNECTIONS - 1);
        assert!(
            busiest <= bound,
            "{domain}: {busiest} RCPTs in one second at the sink, more than {rate}/s + burst \
             {BURST} + {} connections' bunching",
            CONNECTIONS - 1
        );
        assert!(
            busiest >= rate / 2,
            "{domain}: only {busiest} in the busiest second"
        );
    }
}

/// How many recipients the journal at `path` has `sent`; `None` while it cannot be read yet.
fn journaled_sent(path: &Path) -> Option<i64> {
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    db.busy_timeout(Duration::from_secs(5)).ok()?;
    db.query_row(
        "SELECT count(*) FROM recipients WHERE state = 'sent'",
        [],
        |r| r.get(0),
    )
    .ok()
}

#[test]
fn per_domain_limits_hold_across_a_kill_and_an_immediate_restart() {
    // A per-domain burst is 50 ms of the rate, at least one message, and cannot be set. A
    // restart that forgot the domains' last attempts would start each domain with a full
    // bucket again: one burst more. With a rate of several per second, that extra burst is
    // 50 ms of sending, which the restart's own pause (spawning, loading, connecting) hides
    // inside any 1-second window. With paces slower than one a second, the burst of one is a
    // whole interval: `30/min` allows one message per 1-second window (0.5 + 1 = 1.5), and a
    // restart that forgot would send the domain's next message as soon as it has started,
    // well within a second of the last one. (On a machine so loaded that the restart itself
    // took over a second, that would go unnoticed; nothing here can fail for being slow.)
    //
    // One connection: a message reaches the sink only after the limiter let it go and the
    // previous one was answered, so no bunching is allowed for and the bound is rate + burst.
    let domains: [(&str, f64); 3] = [
        ("a.example", 0.5),
        ("b.example", 40.0 / 60.0),
        ("c.example", 0.5),
    ];
    let mut rows = Vec::new();
    let mut expected = BTreeSet::new();
    for i in 0..2 {
        for (domain, _) in domains {
            rows.push(format!("u{i}@{domain},U {i},en,Pro"));
            expected.insert(format!("u{i}@{domain}"));
        }
    }
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(rows)
        .extra("[rate.per_domain]\ndefault = \"30/min\"\n\"b.example\" = \"40/min\"\n");
    let path = campaign.write();
    let journal = campaign
        .dir()
        .join("mailer-state")
        .join("test-campaign.journal");

    // The first run spends every domain's burst (its first message each), then waits 1.5 to
    // 2 s for the next slot; it is killed while it waits, once the journal has all three.
    let first = Running::send(&path, &[]);
    wait_until("the first run sent one message per domain", || {
        journaled_sent(&journal) == Some(3)
    });
    let killed = first.kill();
    assert_eq!(killed.signal, Some(9), "killed, not finished: {killed:?}");
    let before: BTreeSet<String> = sink.accepted().into_keys().collect();
    for first in ["u0@a.example", "u0@b.example", "u0@c.example"] {
        assert!(before.contains(first), "{first} went first: {before:?}");
    }

    let second = campaign.run("send", &[]);
    assert_eq!(second.code, 0, "{second:?}");
    assert_eq!(
        count(&second.stdout, "sent in this run"),
        Some(expected.len() - before.len()),
        "{}",
        second.stdout
    );
    each_accepted_once(&sink, &expected);

    for (domain, rate) in domains {
        let times = arrivals(&sink, &format!("@{domain}"));
        assert_eq!(times.len(), 2, "{domain}: one RCPT per message");
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bound = (rate + 1.0).floor() as usize;
        let busiest = busiest_second(times);
        assert!(
            busiest <= bound,
            "{domain}: {busiest} RCPTs in one second across the restart, more than {rate:.2}/s \
             + burst 1"
        );
    }
}

/// The lines of the `text/plain` or `text/html` part of a received message, as they were on
/// the wire after un-stuffing: split on CRLF, the part's own transfer encoding left alone.
fn part_lines(t: &Transaction, subtype: &str) -> Vec<String> {
    let message = crate::parse(&t.data);
    let part = message
        .parts
        .iter()
        .find(|p| p.is_content_type("text", subtype))
        .unwrap_or_else(|| panic!("no text/{subtype} part"));
    let raw = &t.data[part.raw_body_offset() as usize..part.raw_end_offset() as usize];
    let text = String::from_utf8(raw.to_vec()).unwrap();
    text.trim_end_matches("\r\n")
        .split("\r\n")
        .map(str::to_owned)
        .collect()
}

/// CRLF only, and no line longer than 998 octets without its CRLF (RFC 5321 §4.5.3.1.6; the
/// dot added for transparency does not count, and the sink has already taken it away).
fn well_formed(at: &str, t: &Transaction) {
    let data = &t.data;
    for (i, &b) in data.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && data[i - 1] == b'\r', "{at}: bare LF at {i}"),
            b'\r' => assert!(data.get(i + 1) == Some(&b'\n'), "{at}: bare CR at {i}"),
            _ => {}
        }
    }
    for line in data.split(|&b| b == b'\n') {
        assert!(
            line.len() <= 998 + 1,
            "{at}: a line of {} octets",
            line.len() - 1
        );
    }
}

/// `bytes` without its `Date:` header line: the one line that differs between two runs that
/// render the same campaign.
fn dateless(bytes: &[u8]) -> Vec<u8> {
    let header_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < header_end {
        let end = at
            + bytes[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("CRLF")
            + 2;
        if !bytes[at..end].starts_with(b"Date: ") {
            out.extend_from_slice(&bytes[at..end]);
        }
        at = end;
    }
    out.extend_from_slice(&bytes[at..]);
    out
}

#[test]
fn lines_starting_with_a_dot_arrive_intact() {
    // The sink un-stuffs as RFC 5321 §4.5.2 says: the first character of any line that starts
    // with `.` is removed, and a line that is only `.` ends the message. So if mailer did not
    // stuff, `.starts with a dot` would arrive as `starts with a dot`, `..two dots` as
    // `.two dots`, and the lone `.` would end the message there: the rest would reach the sink
    // as commands (and the smuggled `MAIL FROM` below as a transaction of its own). The exact
    // lines compared below, and the list of recipients, catch every one of those. (A sink
    // that only un-stuffs `..` still sees the last two.) With CHUNKING nothing is stuffed and
    // the sink takes BDAT's octets as they come: a message stuffed there arrives with its
    // dots doubled, one cut short has fewer octets than BDAT announced.
    let text = "Hello {{r.name}}\n\
                .starts with a dot\n\
                .\n\
                ..two dots\n\
                {{r.note}}\n\
                . a dot and a space\n\
                end\n";
    let html = "<p>{{r.name}}</p>\n<pre>\n.dot-led html\n.\n{{r.note}}\n</pre>\n";
    // From the data, at a line start: a value that starts with a dot, and values whose own
    // line breaks (LF, CR, CRLF — spelled any way) put a dot, or a lone dot, at a line start,
    // with an SMTP-smuggling attempt behind the lone dot.
    let notes = [
        ("dot@example.com", "Dot", ".hidden"),
        (
            "lf@example.com",
            "Zoë",
            "one\n.\nMAIL FROM:<evil@example.net>\nRCPT TO:<victim@example.org>\nDATA\nsmuggled\n.\ntwo",
        ),
        ("cr@example.com", "Cr", "three\r.\r.four\rfive"),
        ("crlf@example.com", "Crlf", "six\r\n.\r\n.seven"),
        ("mixed@example.com", "Mixed", ".\n.eight\r\n..\rnine"),
    ];
    // The lines each note becomes: every line break a CRLF, every dot in place.
    let note_lines = |note: &str| -> Vec<String> {
        note.replace("\r\n", "\n")
            .replace('\r', "\n")
            .split('\n')
            .map(str::to_owned)
            .collect()
    };
    // A line just under the limit goes as it is; one just over it must be encoded, so that
    // no line on the wire is longer than 998 octets.
    let long = "x".repeat(998);
    let longer = "y".repeat(999);
    let campaign = || {
        let mut campaign = Campaign::example()
            .header("email,name,locale,plan,note")
            .file("templates/text.hbs", text)
            .file("templates/html.hbs", html);
        for (email, name, note) in notes {
            let quoted = note.replace('"', "\"\"");
            campaign = campaign.row(&format!("{email},{name},en,Pro,\"{quoted}\""));
        }
        campaign
            .row(&format!("long@example.com,Long,en,Pro,{long}"))
            .row(&format!("longer@example.com,Longer,en,Pro,{longer}"))
    };
    // What mailer means to send: the same campaign written to the file outbox, one `.eml`
    // per message, by Message-ID (the same in every run of the campaign).
    let outbox = campaign();
    let written = outbox.run("send", &[]);
    assert_eq!(written.code, 0, "{written:?}");
    let meant: std::collections::BTreeMap<String, Vec<u8>> =
        std::fs::read_dir(outbox.dir().join("outbox"))
            .unwrap()
            .map(|entry| {
                let bytes = std::fs::read(entry.unwrap().path()).unwrap();
                let id = crate::parse(&bytes).message_id().unwrap().to_owned();
                (id, bytes)
            })
            .collect();
    assert_eq!(meant.len(), 7, "{written:?}");

    for wire in Wire::ALL {
        let sink = Sink::on_wire(Arc::new(|_, _| None), wire);
        let run = campaign().smtp(&sink, 2).run("send", &[]);
        assert_eq!(run.code, 0, "{wire:?}: {run:?}");
        assert_eq!(
            count(&run.stdout, "sent"),
            Some(7),
            "{wire:?}: {}",
            run.stdout
        );
        let violations = sink.violations();
        assert!(violations.is_empty(), "{wire:?}: {violations:?}");

        let transactions = sink.transactions();
        // Nothing smuggled: one transaction per recipient, none for anyone else.
        let recipients: BTreeSet<String> = transactions
            .iter()
            .flat_map(|t| t.rcpt_to.clone())
            .collect();
        let expected: BTreeSet<String> = notes
            .iter()
            .map(|(email, _, _)| (*email).to_owned())
            .chain([
                "long@example.com".to_owned(),
                "longer@example.com".to_owned(),
            ])
            .collect();
        assert_eq!(recipients, expected, "{wire:?}");
        assert_eq!(transactions.len(), 7, "{wire:?}: no extra transaction");
        assert!(
            transactions
                .iter()
                .all(|t| t.mail_from == "news@example.com" && t.rcpt_to.len() == 1),
            "{wire:?}"
        );

        for t in &transactions {
            let rcpt = t.rcpt_to[0].as_str();
            let at = format!("{wire:?}, {rcpt}");
            // After DATA, or in BDAT chunks as CHUNKING allows.
            if wire == Wire::Chunking {
                assert!(t.chunks >= 1, "{at}: sent after DATA");
            } else {
                assert_eq!(t.chunks, 0, "{at}: sent in {} BDAT chunks", t.chunks);
            }
            let id = crate::parse(&t.data)
                .message_id()
                .unwrap_or_else(|| panic!("{at}: no Message-ID"))
                .to_owned();
            // Byte for byte what mailer meant, but the date it was rendered at: as it came
            // with BDAT; un-stuffed after DATA, where lettre ends every message with
            // CRLF.CRLF, so one that ends with a line end arrives with an empty line more.
            let mut exact = dateless(&meant[&id]);
            if wire != Wire::Chunking {
                exact.extend_from_slice(b"\r\n");
            }
            assert!(
                dateless(&t.data) == exact,
                "{at}: the message arrived changed:\n{}\n---- meant ----\n{}",
                String::from_utf8_lossy(&t.data),
                String::from_utf8_lossy(&exact)
            );
            well_formed(&at, t);
            let (name, note) = match notes.iter().find(|(email, _, _)| *email == rcpt) {
                Some((_, name, note)) => (*name, (*note).to_owned()),
                None if rcpt == "long@example.com" => ("Long", long.clone()),
                None => ("Longer", longer.clone()),
            };
            let mut expected_text = vec![
                format!("Hello {name}"),
                ".starts with a dot".to_owned(),
                ".".to_owned(),
                "..two dots".to_owned(),
            ];
            expected_text.extend(note_lines(&note));
            expected_text.extend([". a dot and a space".to_owned(), "end".to_owned()]);
            if rcpt == "longer@example.com" {
                // A line too long for the wire: the part is encoded, and decodes to the same
                // lines.
                let message = crate::parse(&t.data);
                let decoded = message.body_text(0).unwrap().replace("\r\n", "\n");
                let lines: Vec<&str> = decoded.trim_end_matches('\n').split('\n').collect();
                assert_eq!(lines, expected_text, "{at}: decoded text part");
                continue;
            }
            assert_eq!(part_lines(t, "plain"), expected_text, "{at}: text part");

            let escaped = |s: &str| s.replace('<', "&lt;").replace('>', "&gt;");
            let mut expected_html = vec![
                format!("<p>{name}</p>"),
                "<pre>".to_owned(),
                ".dot-led html".to_owned(),
                ".".to_owned(),
            ];
            expected_html.extend(note_lines(&note).iter().map(|l| escaped(l)));
            expected_html.push("</pre>".to_owned());
            assert_eq!(part_lines(t, "html"), expected_html, "{at}: HTML part");
        }
    }
}
