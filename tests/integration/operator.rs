//! What an operator does by accident never sends anyone twice nor loses anyone: an emptied or
//! deleted journal, another state folder, a lost write-ahead log, a read-only journal, a clock
//! set back, a full disk, a signal, and the permissions of what mailer writes. Each on the
//! real binary against the in-process sink; no timed assertions.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::campaign::{Campaign, Run, Running, approved, mailer, people, wait_until};
use crate::sink::{Sink, held_sink};

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The campaign's journal at its default place.
fn journal_of(campaign: &Campaign) -> PathBuf {
    campaign
        .dir()
        .join("mailer-state")
        .join("test-campaign.journal")
}

/// How many messages the sink accepted, all recipients together.
fn accepted(sink: &Sink) -> usize {
    sink.accepted().values().sum()
}

/// Every recipient of `people(n)` accepted exactly once.
fn each_once(sink: &Sink, n: usize) {
    let accepted = sink.accepted();
    assert_eq!(accepted.len(), n, "{accepted:?}");
    assert!(accepted.values().all(|&c| c == 1), "{accepted:?}");
}

/// `status --json` counts.
fn counts(path: &Path, extra: &[&str]) -> BTreeMap<String, u64> {
    let mut args = vec!["status", arg(path), "--json"];
    args.extend(extra);
    let run = mailer(&args, &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    json["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

#[test]
fn an_emptied_journal_is_refused_and_left_as_it_is() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 2).rows(people(5));
    let path = campaign.write();
    let first = mailer(&["send", arg(&path)], &[]);
    assert_eq!(first.code, 0, "{first:?}");
    each_once(&sink, 5);

    let journal = journal_of(&campaign);
    std::fs::write(&journal, b"").unwrap();
    for command in ["status", "report"] {
        let run = mailer(&[command, arg(&path)], &[]);
        assert_eq!(run.code, 74, "{command}: {run:?}");
        assert!(run.stderr.contains("is empty"), "{command}: {run:?}");
    }
    let again = mailer(&["send", arg(&path)], &[]);
    assert_eq!(again.code, 74, "{again:?}");
    assert!(
        again.stderr.contains(arg(&journal)) && again.stderr.contains("nothing was sent"),
        "{again:?}"
    );
    assert_eq!(accepted(&sink), 5, "nobody was sent again");
    assert_eq!(
        std::fs::metadata(&journal).unwrap().len(),
        0,
        "left as it is"
    );

    // Deleted instead of emptied: the record beside the campaign file still knows it.
    std::fs::remove_file(&journal).unwrap();
    let deleted = mailer(&["send", arg(&path)], &[]);
    assert_eq!(deleted.code, 74, "{deleted:?}");
    assert!(deleted.stderr.contains("is missing"), "{deleted:?}");
    assert!(!journal.exists(), "no new journal in its place");
    assert_eq!(accepted(&sink), 5);
}

#[test]
fn another_state_folder_is_refused_absolute_or_relative() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 2).rows(people(4));
    let path = campaign.write();
    let first = mailer(&["send", arg(&path)], &[]);
    assert_eq!(first.code, 0, "{first:?}");

    let elsewhere = tempfile::tempdir().unwrap();
    let again = mailer(
        &["send", arg(&path), "--state-dir", arg(elsewhere.path())],
        &[],
    );
    assert_eq!(again.code, 64, "{again:?}");
    assert!(
        again.stderr.contains(arg(&journal_of(&campaign)))
            && again.stderr.contains(arg(elsewhere.path())),
        "names both places: {again:?}"
    );
    // `plan` would record its plan in that other journal: refused too.
    let plan = mailer(
        &["plan", arg(&path), "--state-dir", arg(elsewhere.path())],
        &[],
    );
    assert_eq!(plan.code, 64, "{plan:?}");
    assert!(!elsewhere.path().join("test-campaign.journal").exists());

    // A relative --state-dir, run from another working directory.
    let run = Command::new(env!("CARGO_BIN_EXE_mailer"))
        .args(approved(&["send", arg(&path), "--state-dir", "state"]))
        .current_dir(elsewhere.path())
        .env_remove("MAILER_LOG")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(64), "{run:?}");
    assert!(!elsewhere.path().join("state").exists());
    assert_eq!(accepted(&sink), 4, "nobody was sent twice");

    // Without --state-dir the recorded journal is used (and it is complete), and status
    // finds it from anywhere.
    let status = counts(&path, &[]);
    assert_eq!(status["sent"], 4, "{status:?}");
}

#[test]
fn a_journal_moved_on_purpose_is_followed() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(3));
    let path = campaign.write();
    assert_eq!(mailer(&["send", arg(&path), "--limit", "1"], &[]).code, 75);
    let moved = tempfile::tempdir().unwrap();
    let journal = journal_of(&campaign);
    // Refused until the journal is really there.
    let early = mailer(
        &[
            "send",
            arg(&path),
            "--state-dir",
            arg(moved.path()),
            "--move-journal",
        ],
        &[],
    );
    assert_eq!(early.code, 64, "{early:?}");
    std::fs::rename(&journal, moved.path().join("test-campaign.journal")).unwrap();
    let run = mailer(
        &[
            "send",
            arg(&path),
            "--state-dir",
            arg(moved.path()),
            "--move-journal",
        ],
        &[],
    );
    assert_eq!(run.code, 0, "{run:?}");
    each_once(&sink, 3);
    let status = counts(&path, &[]);
    assert_eq!(status["sent"], 3, "the record follows the move: {status:?}");
}

#[test]
fn a_lost_write_ahead_log_halts_instead_of_sending_again() {
    let (sink, held, ends) = held_sink(3);
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(6));
    let path = campaign.write();
    let journal = journal_of(&campaign);
    let running = Running::send(&path, &[]);
    wait_until("the third message is on the wire", || {
        ends.load(Ordering::SeqCst) >= 3
    });
    drop(running); // SIGKILL, with two messages sent and recorded in the write-ahead log only
    held.store(false, Ordering::SeqCst);
    // The sink still takes the third message in (its body was complete) once let go.
    wait_until("the sink has taken the third message", || {
        accepted(&sink) == 3
    });
    let before = accepted(&sink);
    for suffix in ["-wal", "-shm"] {
        let mut file = journal.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(file));
    }
    let again = mailer(&["send", arg(&path)], &[]);
    assert_eq!(again.code, 3, "{again:?}");
    assert!(again.stderr.contains("write-ahead log"), "{again:?}");
    assert_eq!(accepted(&sink), before, "nothing was sent again");
    // It holds: the operator looks, then resumes on purpose.
    assert_eq!(mailer(&["send", arg(&path)], &[]).code, 3);
    let resumed = mailer(&["resume", arg(&path)], &[]);
    assert!(resumed.stdout.contains("write-ahead log"), "{resumed:?}");
    let last = mailer(&["send", arg(&path)], &[]);
    assert_eq!(last.code, 0, "{last:?}");
}

#[test]
fn a_killed_run_whose_log_is_there_is_resumed_without_a_halt() {
    let (sink, held, ends) = held_sink(2);
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(4));
    let path = campaign.write();
    let running = Running::send(&path, &[]);
    wait_until("the second message is on the wire", || {
        ends.load(Ordering::SeqCst) >= 2
    });
    drop(running);
    held.store(false, Ordering::SeqCst);
    // Another command opens (and closes) the journal first: that merges the log into the
    // journal file, as any clean close does, and must not look like a lost log later.
    let stopped = mailer(&["stop", arg(&path)], &[]);
    assert_eq!(stopped.code, 0, "{stopped:?}");
    assert_eq!(mailer(&["resume", arg(&path)], &[]).code, 0);
    let again = mailer(&["send", arg(&path)], &[]);
    assert_eq!(again.code, 1, "one ambiguous recipient: {again:?}");
    let status = counts(&path, &[]);
    assert_eq!((status["sent"], status["ambiguous"]), (3, 1), "{status:?}");
}

/// Runs the binary as `nobody` when this is root (for whom permissions do not stop writes),
/// else as this user; everything it needs made readable.
fn as_unprivileged(dir: &Path, args: &[&str]) -> Run {
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    let binary = dir.join("mailer-copy");
    // Copied by `cp`, not here: a file this multi-threaded process holds open for writing
    // leaks into whatever another test thread spawns meanwhile, and executing it then fails
    // with "Text file busy".
    let copied = Command::new("cp")
        .arg(env!("CARGO_BIN_EXE_mailer"))
        .arg(&binary)
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&binary);
        c
    } else {
        Command::new(&binary)
    };
    Run::from(
        command
            .args(approved(args))
            .env_remove("MAILER_LOG")
            .output()
            .unwrap(),
    )
}

/// Makes `dir` and everything below readable (and folders enterable) by everyone.
fn readable_by_all(dir: &Path) {
    let mode = std::fs::metadata(dir).unwrap().permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o555)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            readable_by_all(&path);
        } else {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o444)).unwrap();
        }
    }
}

#[test]
fn a_read_only_journal_is_read_and_never_written() {
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(3));
    let path = campaign.write();
    assert_eq!(mailer(&["send", arg(&path), "--limit", "2"], &[]).code, 75);
    readable_by_all(campaign.dir());
    let journal = journal_of(&campaign);
    let state = journal.parent().unwrap();
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o555)).unwrap();
    let dir = campaign.dir();

    let status = as_unprivileged(dir, &["status", arg(&path), "--json"]);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stdout.contains("\"sent\":2"), "{status:?}");
    let report = as_unprivileged(dir, &["report", arg(&path), "--format", "csv"]);
    assert_eq!(report.code, 0, "{report:?}");
    assert_eq!(
        report.stdout.lines().count(),
        4,
        "a header and three rows: {report:?}"
    );
    let send = as_unprivileged(dir, &["send", arg(&path)]);
    assert_eq!(send.code, 74, "{send:?}");
    assert!(send.stderr.contains(arg(state)), "names the path: {send:?}");
    assert!(!send.stderr.contains("damaged"), "{send:?}");
    assert_eq!(accepted(&sink), 2, "nothing more was sent");
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_clock_set_back_never_starts_an_older_slot_and_every_command_says_it_is_set() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(3))
        .extra("[schedule]\ncron = \"0 9 * * 1\"\n");
    let path = campaign.write();
    // Monday 14 December, 10:00: the slot of 09:00 that day.
    let later = [("MAILER_NOW", "2026-12-14T10:00:00Z")];
    let first = mailer(&["send", arg(&path)], &later);
    assert_eq!(first.code, 0, "{first:?}");
    assert!(
        first
            .stderr
            .contains("MAILER_NOW=2026-12-14T10:00:00Z replaces the clock"),
        "{first:?}"
    );
    each_once(&sink, 3);
    // The clock one week back: the slot of 7 December would mail everyone again.
    let earlier = [("MAILER_NOW", "2026-12-08T10:00:00Z")];
    let again = mailer(&["send", arg(&path)], &earlier);
    assert_eq!(again.code, 75, "{again:?}");
    assert!(
        again.stderr.contains("2026-12-07T09:00:00Z")
            && again.stderr.contains("2026-12-14T09:00:00Z"),
        "{again:?}"
    );
    assert_eq!(accepted(&sink), 3, "nobody was sent again");
    // Even a command that only reads says the clock is not the real one.
    let status = mailer(&["status", arg(&path)], &earlier);
    assert!(
        status.stderr.contains("behind the real clock")
            || status.stderr.contains("ahead of the real clock"),
        "{status:?}"
    );
    let plain = mailer(&["status", arg(&path)], &[]);
    assert!(!plain.stderr.contains("MAILER_NOW"), "{plain:?}");
}

#[test]
fn what_mailer_writes_is_private_whatever_the_umask() {
    let campaign = Campaign::example().rows(people(2));
    let path = campaign.write();
    let run = Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_mailer"))
        .args(["send", arg(&path)])
        .env_remove("MAILER_LOG")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let state = campaign.dir().join("mailer-state");
    assert_eq!(mode(&state), 0o700, "the state folder");
    assert_eq!(
        mode(&state.join("test-campaign.journal")),
        0o600,
        "the journal"
    );
    assert_eq!(mode(&state.join("test-campaign.lock")), 0o600, "the lock");
    let outbox = campaign.dir().join("outbox");
    assert_eq!(mode(&outbox), 0o700, "the outbox");
    let mut messages = 0;
    for entry in std::fs::read_dir(&outbox).unwrap() {
        let file = entry.unwrap().path();
        assert_eq!(mode(&file), 0o600, "{file:?}");
        messages += 1;
    }
    assert_eq!(messages, 2);
}

#[test]
fn a_secret_file_others_can_read_is_warned_about() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .transport("username = \"u\"\npassword_file = \"secret.txt\"\n")
        .rows(people(1))
        .file("secret.txt", "s3cret\n");
    let path = campaign.write();
    let secret = campaign.dir().join("secret.txt");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    for command in ["check", "plan"] {
        let run = mailer(&[command, arg(&path)], &[]);
        assert!(
            run.stdout.contains("can be read by other users") && run.stdout.contains("0644"),
            "{command}: {run:?}"
        );
    }
    let send = mailer(&["send", arg(&path)], &[]);
    assert!(
        send.stderr.contains("can be read by other users"),
        "{send:?}"
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let quiet = mailer(&["check", arg(&path)], &[]);
    assert!(
        !quiet.stdout.contains("can be read by other users"),
        "{quiet:?}"
    );
}

#[test]
fn a_signal_stops_the_run_gracefully_and_the_next_run_goes_on() {
    for signal in ["TERM", "INT", "HUP"] {
        let (sink, held, ends) = held_sink(2);
        let campaign = Campaign::example().smtp(&sink, 1).rows(people(20));
        let path = campaign.write();
        let running = Running::send(&path, &[]);
        wait_until("the second message is on the wire", || {
            ends.load(Ordering::SeqCst) >= 2
        });
        running.signal(signal);
        // Not a timed assertion: a moment for the signal to arrive before the reply does.
        std::thread::sleep(Duration::from_millis(300));
        held.store(false, Ordering::SeqCst);
        let run = running.finish();
        assert_eq!(run.code, 75, "SIG{signal}: {run:?}");
        assert!(run.stdout.contains("20 recipients"), "the summary: {run:?}");
        assert!(
            run.stderr.contains(&format!("stopped by SIG{signal}")),
            "{run:?}"
        );
        let status = counts(&path, &[]);
        assert_eq!(
            (status["in_flight"], status["ambiguous"]),
            (0, 0),
            "SIG{signal}: the message on the wire got its reply: {status:?}"
        );
        assert!(status["pending"] >= 1, "SIG{signal}: {status:?}");
        assert_eq!(status["sent"], 2, "SIG{signal}: {status:?}");
        // Not sticky: the next run sends the rest, everyone exactly once.
        let next = mailer(&["send", arg(&path)], &[]);
        assert_eq!(next.code, 0, "SIG{signal}: {next:?}");
        each_once(&sink, 20);
    }
}

#[test]
fn a_second_signal_ends_at_once_leaving_at_most_one_ambiguous_per_connection() {
    let (sink, held, ends) = held_sink(2);
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(10));
    let path = campaign.write();
    let running = Running::send(&path, &[]);
    wait_until("the second message is on the wire", || {
        ends.load(Ordering::SeqCst) >= 2
    });
    running.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    running.signal("TERM");
    let run = running.finish();
    held.store(false, Ordering::SeqCst);
    assert_eq!(run.signal, Some(15), "ended by the second signal: {run:?}");
    let next = mailer(&["send", arg(&path)], &[]);
    assert_eq!(next.code, 1, "one ambiguous recipient: {next:?}");
    let counts = counts(&path, &[]);
    assert_eq!(counts["ambiguous"], 1, "{counts:?}");
    assert_eq!(counts["sent"], 9, "{counts:?}");
    let accepted = sink.accepted();
    assert!(
        accepted.values().all(|&c| c == 1),
        "nobody twice: {accepted:?}"
    );
}

#[test]
fn an_outbox_that_cannot_be_written_stops_with_exit_74_and_leaves_no_partial_file() {
    let campaign = Campaign::example().rows(people(3));
    let path = campaign.write();
    let outbox = campaign.dir().join("outbox");
    std::fs::create_dir(&outbox).unwrap();
    readable_by_all(campaign.dir());
    // The state folder writable by the unprivileged user, the outbox not.
    let state = campaign.dir().join("mailer-state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(campaign.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&outbox, std::fs::Permissions::from_mode(0o555)).unwrap();
    let run = as_unprivileged(campaign.dir(), &["send", arg(&path)]);
    assert_eq!(run.code, 74, "{run:?}");
    assert!(
        run.stderr.contains(arg(&outbox)),
        "names the outbox: {run:?}"
    );
    assert_eq!(
        std::fs::read_dir(&outbox).unwrap().count(),
        0,
        "no file, partial or whole"
    );
    std::fs::set_permissions(&outbox, std::fs::Permissions::from_mode(0o777)).unwrap();
    let again = as_unprivileged(campaign.dir(), &["send", arg(&path)]);
    assert_eq!(again.code, 0, "resumes once it can write: {again:?}");
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 3);
}

/// Runs `send` with the file size limited to `blocks` of 512 bytes (`ulimit -f`): writes
/// past it fail, as on a full disk.
fn send_with_file_limit(path: &Path, blocks: u64) -> Run {
    let output = Command::new("sh")
        .args(["-c", &format!("ulimit -f {blocks}; exec \"$0\" \"$@\"")])
        .arg(env!("CARGO_BIN_EXE_mailer"))
        .args(approved(&["send", arg(path)]))
        .env_remove("MAILER_LOG")
        .output()
        .unwrap();
    Run::from(output)
}

#[test]
fn a_full_disk_stops_with_exit_74_and_the_journal_s_own_counts_then_resumes_exactly() {
    // At the start: the journal cannot even be made.
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(300));
    let path = campaign.write();
    let start = send_with_file_limit(&path, 0);
    assert_eq!(start.code, 74, "{start:?}");
    assert!(
        start.stderr.contains("mailer-state"),
        "names the journal: {start:?}"
    );
    assert_eq!(accepted(&sink), 0);

    // Mid-send: the journal grows past the limit after some messages.
    let mid = send_with_file_limit(&path, 256);
    assert_eq!(mid.code, 74, "{mid:?}");
    assert!(mid.stderr.contains("test-campaign.journal"), "{mid:?}");
    let journal = counts(&path, &[]);
    let sent_then = journal["sent"];
    assert!(
        sent_then > 0 && sent_then < 300,
        "stopped mid-send: {journal:?}"
    );
    // The summary printed is the journal's.
    assert_eq!(
        crate::count(&mid.stdout, "sent"),
        Some(usize::try_from(sent_then).unwrap()),
        "{mid:?}"
    );
    // With room again, the rest: everyone exactly once, but the one whose outcome the full
    // journal could not take (reported ambiguous, not sent again).
    let rest = mailer(&["send", arg(&path)], &[]);
    assert!(rest.code == 0 || rest.code == 1, "{rest:?}");
    let after = counts(&path, &[]);
    assert_eq!(after["sent"] + after["ambiguous"], 300, "{after:?}");
    assert!(after["ambiguous"] <= 1, "{after:?}");
    let accepted = sink.accepted();
    assert!(
        accepted.values().all(|&c| c == 1),
        "nobody twice: {accepted:?}"
    );
}

/// Editing `[campaign] id` after a send would make a new campaign with a new journal, which
/// would send the whole list again: refused, naming the old id, until the id is put back.
#[test]
fn a_campaign_file_sent_under_one_id_is_not_sent_again_under_another() {
    let campaign = Campaign::example().rows(people(4));
    let path = campaign.write();
    let path_text = path.to_str().unwrap();
    let first = mailer(&["send", path_text], &[]);
    assert_eq!(first.code, 0, "{first:?}");
    let outbox = campaign.dir().join("outbox");
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 4);

    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        original.replace("id = \"test-campaign\"", "id = \"renamed\""),
    )
    .unwrap();
    for command in ["send", "plan"] {
        let run = mailer(&[command, path_text], &[]);
        assert_eq!(run.code, 65, "{command}: {run:?}");
        assert!(
            run.stderr
                .contains("already ran as campaign `test-campaign`")
                && run.stderr.contains("put back `id = \"test-campaign\"`"),
            "{command}: {}",
            run.stderr
        );
    }
    assert_eq!(
        std::fs::read_dir(&outbox).unwrap().count(),
        4,
        "nobody was sent twice"
    );
    assert!(!campaign.dir().join("mailer-state/renamed.journal").exists());

    // The id put back, the campaign goes on: nothing left to send.
    std::fs::write(&path, &original).unwrap();
    let again = mailer(&["send", path_text], &[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 4);
}
