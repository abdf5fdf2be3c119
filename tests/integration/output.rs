//! What mailer prints is safe to look at (invariant 12): a server's reply, an address or a
//! CSV cell never writes control characters to a terminal or a log, the CSV report never
//! holds a formula, and a reader that closes standard output early (`| head -1`) gets a quiet
//! exit, not an error — and a send whose output nobody reads still delivers everything.

use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::campaign::{Campaign, Run, approved, mailer, people};
use crate::sink::{Phase, Sink};

/// A reply that, printed raw, clears the screen, turns the text red, claims success and sets
/// the terminal's title.
const HOSTILE: &str = "550 \x1b[2J\x1b[31mFAKE: all sent OK\x1b]0;title\x07";
/// Its text as it is shown.
const HOSTILE_SHOWN: &str = "\\x1b[2J\\x1b[31mFAKE: all sent OK\\x1b]0;title\\x07";
/// C1 CSI and a right-to-left override, for the characters JSON does not escape.
const C1: &str = "550 5.1.1 \u{9b}31m\u{202e}exe.txt";
const C1_SHOWN: &str = "\\u{9b}31m\\u{202e}exe.txt";

/// A sink that refuses user1 with [`HOSTILE`] and user2 with [`C1`] at RCPT.
fn hostile_sink() -> Sink {
    Sink::scripted(Arc::new(|phase, rcpt| {
        if phase != Phase::Rcpt {
            None
        } else if rcpt.starts_with("user1@") {
            Some(HOSTILE.to_owned())
        } else if rcpt.starts_with("user2@") {
            Some(C1.to_owned())
        } else {
            None
        }
    }))
}

/// Asserts that `text` (what `what` printed) holds no control character but line ends.
fn assert_no_controls(what: &str, text: &str) {
    let raw: Vec<(usize, char)> = text
        .char_indices()
        .filter(|&(_, c)| c != '\n' && mailer::printable::is_control(c))
        .collect();
    assert!(raw.is_empty(), "{what} printed raw {raw:?}:\n{text}");
}

#[test]
fn a_hostile_reply_is_shown_escaped_everywhere_and_stored_exact() {
    for json in [false, true] {
        let sink = hostile_sink();
        let campaign = Campaign::example().smtp(&sink, 1).rows(people(4));
        let path = campaign.write();
        let path = path.to_str().unwrap();
        let format = if json { "json" } else { "text" };
        let send = mailer(&["--log-format", format, "send", path], &[]);
        assert_eq!(send.code, 1, "{send:?}");
        assert_no_controls("send (stdout)", &send.stdout);
        assert_no_controls(&format!("send (the {format} log)"), &send.stderr);
        assert!(send.stdout.contains(HOSTILE_SHOWN), "{}", send.stdout);
        assert!(send.stdout.contains(C1_SHOWN), "{}", send.stdout);
        if json {
            let replies: Vec<String> = send
                .stderr
                .lines()
                .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
                .filter_map(|entry| entry["fields"]["detail"].as_str().map(str::to_owned))
                .collect();
            assert!(
                replies.contains(&format!("550 {HOSTILE_SHOWN}")),
                "{replies:?}"
            );
            assert!(
                replies.contains(&format!("550 5.1.1 {C1_SHOWN}")),
                "{replies:?}"
            );
        } else {
            assert!(send.stderr.contains(HOSTILE_SHOWN), "{}", send.stderr);
            assert!(send.stderr.contains(C1_SHOWN), "{}", send.stderr);
        }

        let status = mailer(&["status", path], &[]);
        assert_eq!(status.code, 0, "{status:?}");
        assert_no_controls("status", &status.stdout);
        assert!(status.stdout.contains("failed 2"), "{}", status.stdout);

        let csv = mailer(&["report", path, "--format", "csv"], &[]);
        assert_eq!(csv.code, 0, "{csv:?}");
        assert_no_controls("report --format csv", &csv.stdout);
        assert!(csv.stdout.contains(HOSTILE_SHOWN), "{}", csv.stdout);
        assert!(csv.stdout.contains(C1_SHOWN), "{}", csv.stdout);

        // The JSON report is data, not a screen: the text as the server sent it (JSON
        // escapes what JSON must).
        let report = mailer(&["report", path, "--format", "json"], &[]);
        assert_eq!(report.code, 0, "{report:?}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&report.stdout).unwrap();
        let text = |address: &str| {
            rows.iter()
                .find(|row| row["address"].as_str().unwrap().starts_with(address))
                .map(|row| row["reply_text"].as_str().unwrap().to_owned())
        };
        assert_eq!(text("user1@").as_deref(), Some(HOSTILE));
        assert_eq!(text("user2@").as_deref(), Some(C1));
        assert!(!report.stdout.contains('\x1b'), "JSON escapes ESC");
    }
}

#[test]
fn cells_that_look_like_formulas_are_text_in_the_csv_report() {
    let sink = Sink::scripted(Arc::new(|phase, rcpt| {
        (phase == Phase::Rcpt && rcpt.starts_with("plain@")).then(|| "550 =1+1".to_owned())
    }));
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .row("=1+1@example.com,Eq,en,x")
        .row("+x@example.com,Plus,en,x")
        .row("-x@example.com,Minus,en,x")
        .row("plain@example.com,Plain,en,x");
    let path = campaign.write();
    let path = path.to_str().unwrap();
    let send = mailer(&["send", path], &[]);
    assert_eq!(send.code, 1, "{send:?}");
    assert_eq!(sink.transactions().len(), 3, "the odd addresses are mail");

    let csv = mailer(&["report", path, "--format", "csv"], &[]);
    assert_eq!(csv.code, 0, "{csv:?}");
    let mut reader = csv::Reader::from_reader(csv.stdout.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let addresses: Vec<&str> = rows.iter().map(|r| &r[column("address")]).collect();
    assert_eq!(
        addresses,
        [
            "'=1+1@example.com",
            "'+x@example.com",
            "'-x@example.com",
            "plain@example.com"
        ]
    );
    // A reply's cell starts with its code; no other column of the report can start with `@`
    // (report::status's unit tests show such a cell neutralised all the same).
    assert_eq!(&rows[3][column("reply_text")], "550 =1+1");
    // No other cell starts like a formula; our own columns (numbers, states, times) needed
    // nothing.
    for row in &rows {
        for (cell, name) in row.iter().zip(headers.iter()) {
            assert!(
                !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                "{name}: {cell}"
            );
        }
        assert!(row[column("line")].parse::<u64>().is_ok(), "{row:?}");
    }

    // The JSON report keeps the addresses as they are.
    let json = mailer(&["report", path, "--format", "json"], &[]);
    assert!(
        json.stdout.contains("\"=1+1@example.com\""),
        "{}",
        json.stdout
    );
}

#[test]
fn control_characters_in_a_csv_cell_are_echoed_escaped_by_check() {
    let campaign = Campaign::example()
        .rows(people(2))
        .row("\"ev\x1b[31mil@example.com\",Evil,en,x")
        .row("\"nu\0l@example.com\",Null,en,x")
        .row("\"bidi\u{202e}moc.elpmaxe@x\",Bidi,en,x");
    let check = campaign.run("check", &[]);
    assert_eq!(check.code, 65, "{check:?}");
    assert_no_controls("check", &check.stdout);
    for shown in [
        "recipients.csv:4: `ev\\x1b[31mil@example.com` is not a valid address",
        "recipients.csv:5: `nu\\x00l@example.com` is not a valid address",
        "recipients.csv:6: `bidi\\u{202e}moc.elpmaxe@x`",
    ] {
        assert!(check.stdout.contains(shown), "{shown}:\n{}", check.stdout);
    }
    // `send` refuses with the same lines, as an error.
    let send = campaign.run("send", &[]);
    assert_eq!(send.code, 65, "{send:?}");
    assert_no_controls("send", &send.stderr);
    assert!(
        send.stderr.contains("`ev\\x1b[31mil@example.com`"),
        "{}",
        send.stderr
    );
}

/// Runs the binary with `args` (a send approved) and a standard output nobody reads: a pipe
/// whose reading end is closed before it starts, so that its first write fails (as after
/// `| head -1` has read its line). Standard error too, when `close_stderr`.
fn unread(args: &[&str], close_stderr: bool) -> Run {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailer"));
    command
        .args(approved(args))
        .env_remove("MAILER_LOG")
        .stdout(writer);
    if close_stderr {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        command.stderr(writer);
    } else {
        command.stderr(Stdio::piped());
    }
    Run::from(command.output().unwrap())
}

#[test]
fn a_closed_standard_output_ends_a_command_quietly_with_its_own_code() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(30));
    let path = campaign.write();
    let path = path.to_str().unwrap();

    // Nobody reads the send's summary or its log: it delivers and records everyone all the
    // same, and exits with its own code.
    let send = unread(&["send", path], true);
    assert_eq!(send.code, 0, "{send:?}");
    assert_eq!(sink.transactions().len(), 30);
    let status = mailer(&["status", path, "--json"], &[]);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["counts"]["sent"], 30, "{status}");

    for args in [
        vec!["status", path],
        vec!["status", path, "--json"],
        vec!["report", path, "--format", "csv"],
        vec!["report", path, "--format", "json"],
        vec!["plan", path],
        vec!["plan", path, "--json"],
        vec!["check", path],
        vec!["send", path],
    ] {
        let run = unread(&args, false);
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert!(!run.stderr.contains("error"), "{args:?}: {}", run.stderr);
        assert!(
            !run.stderr.contains("Broken pipe"),
            "{args:?}: {}",
            run.stderr
        );
    }
    // A command that fails still says why, on standard error, with its code.
    let missing = unread(&["status", "/nonexistent/campaign.toml"], false);
    assert_eq!(missing.code, 65, "{missing:?}");
    assert!(missing.stderr.contains("error: "), "{}", missing.stderr);
    assert_eq!(sink.transactions().len(), 30, "nothing sent twice");
}
