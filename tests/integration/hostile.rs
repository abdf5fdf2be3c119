//! Hostile and oversized campaign files (invariant 12): each is refused by `check`, `plan` and
//! `send` with one sentence naming the file, quickly and without a crash, and nothing is sent.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::campaign::{Campaign, Run, mailer, people};

/// Runs `check`, `plan` and `send` on the campaign, each under a watchdog (a hang is a
/// failure, not a stuck test); each must exit 65 with `expected` in its error, and no
/// message may reach the outbox.
fn refused_everywhere(campaign: &Campaign, expected: &str) {
    let path = campaign.write();
    for command in ["check", "plan", "send"] {
        let run = watched(&[command, path.to_str().unwrap()]);
        assert_eq!(run.code, 65, "{command}: {run:?}");
        let said = format!("{}{}", run.stdout, run.stderr);
        assert!(said.contains(expected), "{command}: {said}");
        assert!(
            !said.contains("stack overflow") && !said.contains("panicked"),
            "{command}: {said}"
        );
    }
    let outbox = campaign.dir().join("outbox");
    let sent = std::fs::read_dir(&outbox).map_or(0, Iterator::count);
    assert_eq!(sent, 0, "nothing was sent");
}

/// `mailer args…`, killed after two minutes if it has not ended (a FIFO or `/dev/zero` used to
/// hang it for ever).
fn watched(args: &[&str]) -> Run {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mailer"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("mailer {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Run::from(child.wait_with_output().unwrap())
}

fn example() -> Campaign {
    Campaign::example().rows(people(3))
}

#[test]
fn partials_that_include_each_other_are_refused_with_the_chain() {
    let mutual = example()
        .file("templates/partials/a.hbs", "A {{> b}}")
        .file("templates/partials/b.hbs", "B {{> a}}")
        .file("templates/text.hbs", "{{> a}}\n");
    refused_everywhere(&mutual, "partials include each other in a loop: a → b → a");
    let itself = example()
        .file(
            "templates/partials/footer.hbs",
            "{{#if r.name}}{{> footer}}{{/if}}",
        )
        .file("templates/text.hbs", "hello\n{{> footer}}\n");
    refused_everywhere(
        &itself,
        "templates/partials/footer.hbs:1: partials include each other in a loop: footer → footer",
    );
    // Through the templates' own names too: a partial may not take a template's name.
    let named = example().file("templates/partials/text.hbs", "x");
    refused_everywhere(&named, "a partial cannot be named `text`");
}

#[test]
fn deep_nesting_is_refused_with_its_line_before_it_is_parsed() {
    for (depth, expected) in [
        (
            5_000,
            "templates/text.hbs:2: blocks nested more than 32 deep",
        ),
        (
            20_000,
            "templates/text.hbs: this template is larger than 256 KiB",
        ),
    ] {
        let text = format!(
            "{}x{}",
            "{{#if r.name}}".repeat(depth),
            "{{/if}}".repeat(depth)
        );
        let campaign = example().file("templates/text.hbs", &format!("\n{text}\n"));
        refused_everywhere(&campaign, expected);
    }
    // Compiling costs a template's size for each tag: their number is capped.
    let many = format!("{}\n", "{{r.name}} ".repeat(6_000));
    let campaign = example().file("templates/text.hbs", &many);
    refused_everywhere(
        &campaign,
        "the templates hold 6012 tags (`{{…}}`) in all, more than 5000",
    );
    let parentheses = format!(
        "{{{{t \"body\" x={}1{}}}}}",
        "(".repeat(5_000),
        ")".repeat(5_000)
    );
    let campaign = example().file("templates/text.hbs", &parentheses);
    refused_everywhere(&campaign, "parentheses nested more than 32 deep");
    // As deep as allowed is fine.
    let text = format!("{}x{}", "{{#if r.name}}".repeat(32), "{{/if}}".repeat(32));
    let run = example()
        .file("templates/text.hbs", &text)
        .run("check", &[]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn special_files_and_links_out_of_the_campaign_are_refused_by_name() {
    let zero = example();
    symlink("/dev/zero", zero.dir().join("templates/partials/z.hbs")).unwrap();
    refused_everywhere(
        &zero,
        "is a link to `/dev/zero`, outside the campaign's folders",
    );

    let fifo = example();
    let made = std::process::Command::new("mkfifo")
        .arg(fifo.dir().join("templates/partials/f.hbs"))
        .status()
        .unwrap();
    assert!(made.success());
    refused_everywhere(&fifo, "partials/f.hbs: this template is a FIFO");

    let fifo_ftl = example();
    let made = std::process::Command::new("mkfifo")
        .arg(fifo_ftl.dir().join("locales/fr/extra.ftl"))
        .status()
        .unwrap();
    assert!(made.success());
    refused_everywhere(&fifo_ftl, "fr/extra.ftl: this Fluent file is a FIFO");

    let looping = example();
    symlink(
        "loop.hbs",
        looping.dir().join("templates/partials/loop.hbs"),
    )
    .unwrap();
    refused_everywhere(
        &looping,
        "partials/loop.hbs: this template is a link that loops",
    );

    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("passwd");
    std::fs::write(&secret, "root:x:0:0:secret-line\n").unwrap();
    let linked = example().file("templates/text.hbs", "{{> x}}\n");
    symlink(&secret, linked.dir().join("templates/partials/x.hbs")).unwrap();
    refused_everywhere(&linked, "outside the campaign's folders");

    // A link that stays inside the campaign is followed.
    let inside = example().file("shared/footer.hbs", "{{t \"footer\"}} (shared)");
    std::fs::remove_file(inside.dir().join("templates/partials/footer.hbs")).unwrap();
    symlink(
        inside.dir().join("shared/footer.hbs"),
        inside.dir().join("templates/partials/footer.hbs"),
    )
    .unwrap();
    let run = inside.run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let outbox: Vec<_> = std::fs::read_dir(inside.dir().join("outbox"))
        .unwrap()
        .collect();
    assert_eq!(outbox.len(), 3);
}

#[test]
fn files_the_loaders_do_not_read_are_not_fingerprinted_or_followed() {
    // A FIFO, a link loop and a link to /dev/zero where no loader looks: `plan` ends, and
    // its fingerprint does not change when they do.
    let campaign = example();
    let templates = campaign.dir().join("templates");
    symlink(".", templates.join("loop")).unwrap();
    symlink("/dev/zero", templates.join("notes.txt")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(templates.join("pipe"))
        .status()
        .unwrap();
    assert!(made.success());
    let path = campaign.write();
    let plan = watched(&["plan", path.to_str().unwrap(), "--json"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    let inputs: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let names: Vec<&String> = inputs["inputs"].as_object().unwrap().keys().collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains("loop") && !n.contains("notes") && !n.contains("pipe")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| *n == "templates/partials/footer.hbs"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| *n == "locales/fr-CA/main.ftl"),
        "{names:?}"
    );
}

#[test]
fn oversized_files_are_refused_by_their_cap() {
    let mut huge = "x".repeat(50 << 20);
    huge.push('\n');
    let started = Instant::now();
    let campaign = example().file("templates/text.hbs", &huge);
    refused_everywhere(
        &campaign,
        "templates/text.hbs: this template is larger than 256 KiB, the most mailer reads from it",
    );
    eprintln!(
        "a 50 MB template refused three times in {:?}",
        started.elapsed()
    );
    let ftl = example().file("locales/de/big.ftl", &"# comment\n".repeat(200_000));
    refused_everywhere(&ftl, "big.ftl: this Fluent file is larger than 1 MiB");
    let campaign = example();
    let path = campaign.write();
    let toml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{toml}\n{}", "# padding\n".repeat(200_000))).unwrap();
    let run = watched(&["check", path.to_str().unwrap()]);
    assert_eq!(run.code, 65, "{run:?}");
    assert!(
        run.stderr.contains("campaign.toml` is larger than 1 MiB"),
        "{}",
        run.stderr
    );
    // A CSV row of more than 1 MiB stops the reading at that row.
    let campaign = example().row(&format!("big@example.com,{},en,x", "n".repeat(2 << 20)));
    refused_everywhere(&campaign, "recipients.csv:5: the row is longer than 1 MiB");
}

#[test]
fn partial_fan_out_is_refused_before_rendering_and_a_runaway_message_stops_at_the_limit() {
    // Seven small files, each including the next ten times: a million inclusions.
    let mut campaign = example().file("templates/text.hbs", "{{> p0}}\n");
    for level in 0..6 {
        let next = format!("{{{{> p{}}}}}", level + 1).repeat(10);
        campaign = campaign.file(&format!("templates/partials/p{level}.hbs"), &next);
    }
    campaign = campaign.file("templates/partials/p6.hbs", &"0123456789".repeat(7));
    refused_everywhere(&campaign, "partial inclusions per message, more than 10000");

    // Within the inclusion limit but past the size limit: stopped while rendering, the row
    // and the limit named.
    let kilobyte = "0123456789abcdef".repeat(64);
    let campaign = example()
        .file("templates/partials/k.hbs", &kilobyte)
        .file("templates/partials/m.hbs", &"{{> k}}".repeat(100))
        .file("templates/text.hbs", &format!("{}\n", "{{> m}}".repeat(20)));
    refused_everywhere(
        &campaign,
        "recipients.csv: lines 2, 3, 4 (3 rows): cannot render this row's message: the message grows past 1 MiB while `text.hbs` renders (`[safety] max_message_size`)",
    );
    // The operator may allow more.
    let run = campaign
        .extra("[safety]\nmax_message_size = 4_194_304\n")
        .run("check", &[]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn raw_output_of_a_column_in_the_html_is_refused_unless_allowed_by_name() {
    let html = "<p>{{{r.name}}}</p>\n<p>{{{t \"body\"}}}</p>\n<p>{{&r.plan}}</p>\n";
    let campaign = example().file("templates/html.hbs", html);
    refused_everywhere(
        &campaign,
        "templates/html.hbs:1: `{{{r.name}}}` writes the CSV column `name` into the HTML unescaped",
    );
    let run = campaign.run("check", &[]);
    assert!(
        run.stdout
            .contains("templates/html.hbs:3: `{{{r.plan}}}` writes the CSV column `plan`"),
        "{run:?}"
    );
    assert!(
        !run.stdout.contains("html.hbs:2"),
        "a translation may be raw: {run:?}"
    );
    // Through a partial, and inside a block over the data.
    let campaign = example()
        .file(
            "templates/partials/bio.hbs",
            "{{#with r}}{{{plan}}}{{/with}}",
        )
        .file("templates/html.hbs", "<p>{{> bio}}</p>\n");
    refused_everywhere(
        &campaign,
        "templates/partials/bio.hbs:1: `{{{plan}}}` writes recipient data into the HTML unescaped",
    );
    // Allowed by name, the column goes out as it is.
    let campaign = example()
        .row("eve@example.net,<b>Eve</b>,en,x")
        .file("templates/html.hbs", "<p>{{{r.name}}}</p>\n")
        .extra("[safety]\nraw_html_columns = [\"name\"]\n");
    let run = campaign.run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let eve = std::fs::read_dir(campaign.dir().join("outbox"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .find(|m| m.contains("eve@example.net"))
        .unwrap();
    assert!(eve.contains("<b>Eve</b>"), "{eve}");
    // The text part escapes nothing anyway: a triple-stash there is not refused.
    let run = example()
        .file("templates/text.hbs", "{{{r.name}}}\n")
        .run("check", &[]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn template_wide_problems_are_reported_once_naming_the_template() {
    let campaign = example().rows(people(40)).file(
        "templates/text.hbs",
        "{{t \"nope\"}}\n{{> missing}}\n{{r.nosuch}}\n{{#*inline \"x\"}}y{{/inline}}\n",
    );
    let path = campaign.write();
    let run = mailer(&["check", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, 65, "{run:?}");
    for expected in [
        "templates/text.hbs:1: `{{t \"nope\"}}`: there is no Fluent message `nope`: no locale defines it",
        "templates/text.hbs:2: includes the partial `missing`, but there is no `partials/missing.hbs`",
        "templates/text.hbs:3: `r.nosuch`: the recipient list has no column `nosuch`",
        "templates/text.hbs:4: decorators such as `{{#*inline}}` are not supported",
    ] {
        assert_eq!(
            run.stdout.matches(expected).count(),
            1,
            "{expected}: {}",
            run.stdout
        );
    }
    assert!(
        !run.stdout.contains("recipients.csv"),
        "no row is blamed: {}",
        run.stdout
    );

    // An id one locale lacks (with nothing to fall back on) names that locale.
    let campaign = example()
        .file("locales/fr/extra.ftl", "only-fr = Seulement\n")
        .file("templates/text.hbs", "{{t \"only-fr\"}}\n");
    let run = campaign.run("check", &[]);
    assert!(
        run.stdout
            .contains("missing for `de`, `en` (and along the fallback chain)"),
        "{run:?}"
    );
}

#[test]
fn an_empty_list_is_an_error_unless_expected() {
    let campaign = Campaign::example();
    let path = campaign.write();
    for command in ["check", "send"] {
        let run = mailer(&[command, path.to_str().unwrap()], &[]);
        assert_eq!(run.code, 65, "{command}: {run:?}");
        assert!(
            format!("{}{}", run.stdout, run.stderr)
                .contains("recipients.csv: the recipient list has no rows, only a header"),
            "{command}: {run:?}"
        );
    }
    let run = Campaign::example()
        .extra("[safety]\nexpect_count = 0\n")
        .run("send", &[]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn duplicate_rows_are_warned_about_a_few_at_a_time() {
    let rows = std::iter::repeat_n("ann@example.com,Ann,en,x".to_owned(), 5_000);
    let campaign = Campaign::example().rows(rows);
    let run = campaign.run("check", &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("1 of 1 messages rendered and checked"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("4989 more rows repeat an earlier row's address"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.lines().count() < 40, "{}", run.stdout);
}

#[test]
fn a_dangling_template_link_reads_as_missing() {
    let campaign = example();
    let subject = campaign.dir().join("templates/subject.hbs");
    std::fs::remove_file(&subject).unwrap();
    symlink(Path::new("nowhere.hbs"), &subject).unwrap();
    refused_everywhere(&campaign, "subject.hbs: this template cannot be read");
}

#[test]
fn html_nested_past_its_limit_is_refused_before_the_html_parsers_see_it() {
    let deep = format!(
        "<p>{}{{{{t \"body\"}}}}{}</p>\n",
        "<div>".repeat(20_000),
        "</div>".repeat(20_000)
    );
    for extra in ["", "[campaign]\ninline_css = true\n"] {
        let campaign = example().file("templates/html.hbs", &deep);
        std::fs::remove_file(campaign.dir().join("templates/text.hbs")).unwrap();
        let path = campaign.write();
        if !extra.is_empty() {
            let toml = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, toml.replace("[campaign]\n", extra)).unwrap();
        }
        let run = watched(&["check", path.to_str().unwrap()]);
        assert_eq!(run.code, 65, "{extra}: {run:?}");
        assert!(
            run.stdout
                .contains("the rendered HTML nests elements 257 deep, more than 256"),
            "{extra}: {}",
            run.stdout
        );
    }
}
