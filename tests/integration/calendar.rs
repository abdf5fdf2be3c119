//! Send windows, daily caps and warm-up, on a fixed clock (`MAILER_NOW`): the binary against
//! the sink. 2030-12-02 is a Monday; Paris is UTC+1 then.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::campaign::{Campaign, Run, mailer, people};
use crate::journal::{arg, state_count};
use crate::sink::{Phase, Script, Sink};

fn send_at(path: &std::path::Path, now: &str) -> Run {
    mailer(&["send", arg(path)], &[("MAILER_NOW", now)])
}

fn status_at(path: &std::path::Path, now: &str) -> serde_json::Value {
    let run = mailer(&["status", arg(path), "--json"], &[("MAILER_NOW", now)]);
    assert_eq!(run.code, 0, "{run:?}");
    serde_json::from_str(&run.stdout).expect("status JSON")
}

/// Each address the sink accepted, and that none was accepted twice.
fn accepted_once(sink: &Sink) -> usize {
    let accepted = sink.accepted();
    assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
    accepted.len()
}

const OFFICE_HOURS: &str =
    "[schedule]\ntimezone = \"Europe/Paris\"\nwindow = [\"Mon-Fri 09:00-17:00\"]\n";

#[test]
fn outside_a_window_send_starts_nothing_and_names_the_next_opening() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(3))
        .extra(OFFICE_HOURS);
    let path = campaign.write();
    // 08:59:59 in Paris: a second too early.
    let early = send_at(&path, "2030-12-02T07:59:59Z");
    assert_eq!(early.code, 75, "{early:?}");
    assert!(
        early.stderr.contains(
            "is waiting: outside the send window ([schedule] window); the next opens Mon 2030-12-02 09:00 Europe/Paris; nothing was sent"
        ),
        "{}",
        early.stderr
    );
    assert_eq!(sink.connections(), 0, "nothing sent, no connection");
    // Friday 17:00: closed until Monday.
    let friday = send_at(&path, "2030-12-06T16:00:00Z");
    assert_eq!(friday.code, 75, "{friday:?}");
    assert!(
        friday
            .stderr
            .contains("the next opens Mon 2030-12-09 09:00 Europe/Paris"),
        "{}",
        friday.stderr
    );
    // 09:00 sharp: open.
    let open = send_at(&path, "2030-12-02T08:00:00Z");
    assert_eq!(open.code, 0, "{open:?}");
    assert_eq!(accepted_once(&sink), 3);
    // A finished campaign is complete (0), not waiting (75), when the window is shut.
    let done = send_at(&path, "2030-12-06T16:00:00Z");
    assert_eq!(done.code, 0, "{done:?}");
    assert!(done.stdout.contains("nothing due"), "{}", done.stdout);
    assert_eq!(accepted_once(&sink), 3);
}

#[test]
fn a_window_closing_mid_run_lets_the_wire_finish_and_exits_75() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(40))
        .extra(OFFICE_HOURS)
        // Five a second: the window closes three seconds into the run, with most still to go.
        .extra("[rate]\nper_second = 5\n");
    let path = campaign.write();
    let run = send_at(&path, "2030-12-02T15:59:57Z");
    assert_eq!(run.code, 75, "{run:?}");
    let sent = accepted_once(&sink);
    assert!((1..40).contains(&sent), "some went, not all: {sent}");
    assert!(
        run.stdout.contains(
            "waiting: outside the send window ([schedule] window); the next opens Tue 2030-12-03 09:00 Europe/Paris"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("recipients left pending, nothing is halted"),
        "{}",
        run.stderr
    );
    // Every message started got its answer; the rest were never started.
    let after = status_at(&path, "2030-12-02T16:30:00Z");
    assert_eq!(state_count(&after, "sent"), sent as u64, "{after}");
    assert_eq!(state_count(&after, "pending"), 40 - sent as u64, "{after}");
    assert!(
        after["waiting"]
            .as_str()
            .is_some_and(|w| w.starts_with("outside the send window")),
        "{after}"
    );
    // The next morning the rest goes, everyone sent once.
    let next = send_at(&path, "2030-12-03T08:00:00Z");
    assert_eq!(next.code, 0, "{next:?}");
    assert_eq!(accepted_once(&sink), 40);
}

#[test]
fn a_daily_cap_holds_across_runs_on_the_same_day_and_resets_the_next_day() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 2)
        .rows(people(8))
        .extra("[schedule]\ntimezone = \"Europe/Paris\"\n[rate]\nper_day = 3\n");
    let path = campaign.write();
    let first = send_at(&path, "2030-12-02T09:00:00Z");
    assert_eq!(first.code, 75, "{first:?}");
    assert_eq!(accepted_once(&sink), 3);
    assert!(
        first.stdout.contains(
            "waiting: daily cap of 3 reached; next message after Tue 2030-12-03 00:00 Europe/Paris"
        ),
        "{}",
        first.stdout
    );
    // Later the same day: refused before anything is loaded.
    let again = send_at(&path, "2030-12-02T22:59:00Z");
    assert_eq!(again.code, 75, "{again:?}");
    assert!(
        again.stderr.contains("is waiting: daily cap of 3 reached")
            && again.stderr.contains("nothing was sent"),
        "{}",
        again.stderr
    );
    assert_eq!(accepted_once(&sink), 3);
    let waiting = status_at(&path, "2030-12-02T22:59:00Z");
    assert_eq!(
        waiting["waiting"],
        "daily cap of 3 reached; next message after Tue 2030-12-03 00:00 Europe/Paris",
        "{waiting}"
    );
    let text = mailer(
        &["status", arg(&path)],
        &[("MAILER_NOW", "2030-12-02T22:59:00Z")],
    );
    assert!(
        text.stdout.contains("waiting: daily cap of 3 reached"),
        "{}",
        text.stdout
    );
    // 00:30 in Paris (23:30 UTC) is the next day there: three more.
    let tuesday = send_at(&path, "2030-12-02T23:30:00Z");
    assert_eq!(tuesday.code, 75, "{tuesday:?}");
    assert_eq!(accepted_once(&sink), 6);
    let wednesday = send_at(&path, "2030-12-04T08:00:00Z");
    assert_eq!(wednesday.code, 0, "{wednesday:?}");
    assert_eq!(accepted_once(&sink), 8);
    let done = status_at(&path, "2030-12-04T09:00:00Z");
    assert_eq!(state_count(&done, "sent"), 8);
    assert!(done.get("waiting").is_none(), "complete: {done}");
}

#[test]
fn a_domain_cap_defers_that_domain_to_the_next_day_and_the_others_go_on() {
    let sink = Sink::start();
    // people(14): two addresses at each of example0.com … example6.com.
    let campaign = Campaign::example()
        .smtp(&sink, 2)
        .rows(people(14))
        .extra("[rate.per_domain_per_day]\n\"Example1.com\" = 1\n");
    let path = campaign.write();
    let first = send_at(&path, "2030-12-02T10:00:00Z");
    assert_eq!(first.code, 75, "{first:?}");
    assert_eq!(accepted_once(&sink), 13);
    assert!(
        first.stdout.contains(
            "capped: example1.com reached its daily cap ([rate.per_domain_per_day]): 1 recipients deferred until 2030-12-03T00:00:00Z"
        ),
        "{}",
        first.stdout
    );
    let report = mailer(&["report", arg(&path), "--format", "json"], &[]);
    assert!(
        report
            .stdout
            .contains("example1.com daily cap of 1 reached ([rate.per_domain_per_day]); its next message after Tue 2030-12-03 00:00 UTC"),
        "the journal says why: {}",
        report.stdout
    );
    let waiting = status_at(&path, "2030-12-02T11:00:00Z");
    assert_eq!(
        waiting["capped"][0],
        "example1.com daily cap of 1 reached; its next message after Tue 2030-12-03 00:00 UTC",
        "{waiting}"
    );
    // Later the same day nothing is due; the next day the deferred one goes.
    let again = send_at(&path, "2030-12-02T12:00:00Z");
    assert_eq!(again.code, 75, "{again:?}");
    assert_eq!(accepted_once(&sink), 13);
    let next = send_at(&path, "2030-12-03T00:00:00Z");
    assert_eq!(next.code, 0, "{next:?}");
    assert_eq!(accepted_once(&sink), 14);
}

#[test]
fn retries_count_toward_the_daily_cap() {
    // user0 is refused once at RCPT with a 4xx, then accepted.
    let seen = Arc::new(AtomicUsize::new(0));
    let script: Script = Arc::new(move |phase, rcpt| {
        (phase == Phase::Rcpt
            && rcpt.starts_with("user0@")
            && seen.fetch_add(1, Ordering::SeqCst) == 0)
            .then(|| "451 4.3.0 try again later".to_owned())
    });
    let sink = Sink::scripted(script);
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(5))
        .extra("[rate]\nper_day = 3\n");
    let path = campaign.write();
    let run = send_at(&path, "2030-12-02T10:00:00Z");
    assert_eq!(run.code, 75, "{run:?}");
    // Three attempts reached the relay, the refused one among them: two accepted.
    assert_eq!(sink.rcpts().len(), 3, "{:?}", sink.rcpts());
    assert_eq!(accepted_once(&sink), 2);
    assert!(
        run.stdout.contains("waiting: daily cap of 3 reached"),
        "{}",
        run.stdout
    );
}

#[test]
fn warm_up_days_count_from_the_first_message_and_the_plan_spans_them() {
    let sink = Sink::start();
    let campaign = Campaign::example()
        .smtp(&sink, 1)
        .rows(people(10))
        .extra("[schedule]\ntimezone = \"Europe/Paris\"\n[rate]\nwarmup = [2, 3]\n");
    let path = campaign.write();
    let plan = mailer(
        &["plan", arg(&path)],
        &[("MAILER_NOW", "2030-12-02T10:00:00Z")],
    );
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stdout
            .contains("calendar        3 days: ends Wed 2030-12-04 00:00 Europe/Paris"),
        "{}",
        plan.stdout
    );
    let monday = send_at(&path, "2030-12-02T10:00:00Z");
    assert_eq!(monday.code, 75, "{monday:?}");
    assert_eq!(accepted_once(&sink), 2);
    assert!(
        monday.stdout.contains(
            "waiting: warm-up day 1 cap of 2 reached; next message after Tue 2030-12-03 00:00 Europe/Paris"
        ),
        "{}",
        monday.stdout
    );
    let tuesday = send_at(&path, "2030-12-03T10:00:00Z");
    assert_eq!(tuesday.code, 75, "{tuesday:?}");
    assert_eq!(accepted_once(&sink), 5);
    // Day 3: past the warm-up, and no per_day: the rest.
    let wednesday = send_at(&path, "2030-12-04T10:00:00Z");
    assert_eq!(wednesday.code, 0, "{wednesday:?}");
    assert_eq!(accepted_once(&sink), 10);
}

#[test]
fn canary_messages_are_not_counted_toward_the_daily_cap() {
    // Two canary messages, then a cap of 3: the full send still gets 3 recipients out today.
    let sink = Sink::start();
    let campaign = Campaign::example().smtp(&sink, 1).rows(people(5)).extra(
        "[rate]\nper_day = 3\n[safety]\ncanary = [\"seed1@example.org\", \"seed2@example.org\"]\n",
    );
    let path = campaign.write();
    let now = [("MAILER_NOW", "2030-12-02T09:00:00Z")];
    let canary = mailer(&["send", arg(&path), "--stage", "canary"], &now);
    assert_eq!(canary.code, 0, "{canary:?}");
    assert_eq!(accepted_once(&sink), 2);
    let full = mailer(&["send", arg(&path)], &now);
    assert_eq!(full.code, 75, "{full:?}");
    assert_eq!(
        accepted_once(&sink),
        2 + 3,
        "the two seeds and three recipients"
    );
}
