//! The corpus of bad inputs: each case is a campaign with one thing wrong, run through the real
//! `send` against a sink. Every one must exit 65 having sent nothing, and its error — one
//! sentence per problem, naming the file and line — is pinned by a snapshot.

use std::path::Path;

use crate::campaign::Campaign;
use crate::sink::Sink;

fn ok() -> Campaign {
    Campaign::example().row("ann@example.com,Ann,en,Pro")
}

/// A change made after the builder wrote the campaign: (campaign folder, campaign file).
type Fixup = fn(&Path, &Path);

fn write_invalid_utf8(dir: &Path, _: &Path) {
    let csv = b"email,name,locale,plan\nann@example.com,Ann,en,Pro\nx@example.com,B\xff,en,x\n";
    std::fs::write(dir.join("recipients.csv"), csv).unwrap();
}

fn remove_subject(dir: &Path, _: &Path) {
    std::fs::remove_file(dir.join("templates/subject.hbs")).unwrap();
}

fn make_marketing(_: &Path, toml: &Path) {
    let text = std::fs::read_to_string(toml).unwrap();
    std::fs::write(
        toml,
        text.replace(
            "default_locale = \"en\"",
            "default_locale = \"en\"\nkind = \"marketing\"",
        ),
    )
    .unwrap();
}

/// (name, campaign, fix-up). The snapshot `integration__corpus__<name>.snap` holds the error.
fn cases() -> Vec<(&'static str, Campaign, Option<Fixup>)> {
    vec![
        ("invalid_address", ok().row("not-an-address,B,en,x"), None),
        (
            "address_without_a_dot",
            ok().row("root@localhost,B,en,x"),
            None,
        ),
        (
            "line_break_in_name",
            ok().row("x@example.com,\"B\r\nBcc: all@example.com\",en,x"),
            None,
        ),
        (
            "line_break_reaching_the_subject",
            ok().row("x@example.com,B,en,\"gold\r\nBcc: all@example.com\"")
                .file("templates/subject.hbs", "Your plan: {{r.plan}}\n"),
            None,
        ),
        ("wrong_field_count", ok().row("x@example.com,B,en"), None),
        ("invalid_utf8", ok(), Some(write_invalid_utf8)),
        (
            "no_email_column",
            Campaign::example().header("name,plan").row("A,x"),
            None,
        ),
        (
            "column_named_twice",
            Campaign::example()
                .header("email,name,Name,plan")
                .row("a@example.com,A,A,x"),
            None,
        ),
        (
            "unknown_column_in_template",
            ok().file("templates/text.hbs", "Hi\n{{r.missing}}\n"),
            None,
        ),
        (
            "fluent_id_missing_everywhere",
            ok().file("templates/text.hbs", "{{t \"no-such-id\"}}\n"),
            None,
        ),
        (
            "fluent_argument_missing",
            ok().file("templates/text.hbs", "{{t \"greeting\"}}\n"),
            None,
        ),
        (
            "template_syntax",
            ok().file("templates/html.hbs", "<p>{{#if r.name}}</p>\n"),
            None,
        ),
        (
            "fluent_syntax",
            ok().file("locales/fr/main.ftl", "ok = oui\nbroken = {\n"),
            None,
        ),
        ("no_subject_template", ok(), Some(remove_subject)),
        ("unknown_key", ok().transport("speed = 9"), None),
        (
            "bad_canary",
            ok().extra("[safety]\ncanary = [\"seed@example.com\", \"seed at example.com\"]\ncanary_rows = [\"nope\"]\n"),
            None,
        ),
        (
            "bad_schedule",
            ok().extra("[schedule]\nnot_before = \"2026-12-01T09:00:00\"\ncron = \"0 9 * * 8\"\n"),
            None,
        ),
        (
            "bad_rate",
            ok().extra(
                "[rate]\nper_second = 0\n[rate.per_domain]\n\"Example.com\" = \"5 per second\"\n",
            ),
            None,
        ),
        (
            "literal_password",
            ok().transport("password = \"hunter2\""),
            None,
        ),
        ("marketing_without_unsubscribe", ok(), Some(make_marketing)),
        (
            "another_recipients_address_in_the_data",
            ok().row("bob@example.com,Bob,en,\"shared with ann@example.com\""),
            None,
        ),
    ]
}

#[test]
fn every_bad_input_is_refused_with_its_place_and_nothing_is_sent() {
    for (name, campaign, fixup) in cases() {
        let sink = Sink::start();
        let campaign = campaign.smtp(&sink, 1);
        let path = campaign.write();
        if let Some(fixup) = fixup {
            fixup(campaign.dir(), &path);
        }
        let run = crate::campaign::mailer(&["send", path.to_str().unwrap()], &[]);
        assert_eq!(run.code, 65, "{name}: {run:?}");
        assert_eq!(sink.connections(), 0, "{name}: nothing may be sent");
        assert!(!run.stderr.contains("panicked"), "{name}: {}", run.stderr);
        assert!(!run.stderr.contains("hunter2"), "{name}: {}", run.stderr);
        let stderr = run
            .stderr
            .replace(&format!("{}/", campaign.dir().display()), "");
        insta::assert_snapshot!(name, stderr);
    }
}
