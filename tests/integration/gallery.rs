//! `mailer preview`: the gallery page opened in a real browser (Debian's chromium, headless,
//! on a local file), and the `--recipient` and `--show` flags.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::campaign::{Campaign, people};

const CHROMIUM: &str = "/usr/bin/chromium";

/// A browser that has not finished by then is hung: the test fails instead of blocking.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs headless chromium with `args` on `url` and a fresh profile; returns what it printed.
/// A missing chromium fails the test: it is part of the test environment.
fn chromium(args: &[&str], url: &str) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the gallery test opens the preview in a real browser; scripts/test installs Debian's chromium"
    );
    let scratch = tempfile::tempdir().unwrap();
    let profile = scratch.path().join("profile");
    // Files, not pipes: a helper process outliving the browser cannot keep the test waiting.
    let stdout_path = scratch.path().join("stdout");
    let stderr_path = scratch.path().join("stderr");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within {BROWSER_TIMEOUT:?} on {url}:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "chromium {args:?} on {url}: {status}\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    std::fs::read_to_string(&stdout_path).unwrap()
}

/// The value of message `id` in the repository's `locales/<tag>/*.ftl`, if that locale has it.
fn ftl(tag: &str, id: &str) -> Option<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("locales")
        .join(tag);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ftl"))
        .collect();
    files.sort();
    files.iter().find_map(|file| {
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once('=')?;
                (name.trim() == id).then(|| value.trim().to_owned())
            })
    })
}

/// The repository's locale folders.
fn repository_locales() -> BTreeSet<String> {
    std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("locales"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The locale a requested one resolves to: itself, its language, else the default `en`.
fn resolved(requested: &str, loaded: &BTreeSet<String>) -> String {
    let language = requested.split('-').next().unwrap();
    [requested, language]
        .into_iter()
        .find(|tag| loaded.contains(*tag))
        .unwrap_or("en")
        .to_owned()
}

/// Message `id` as locale `tag` shows it: its own, else its language's, else English.
fn translated(tag: &str, id: &str) -> String {
    let language = tag.split('-').next().unwrap();
    [tag, language, "en"]
        .into_iter()
        .find_map(|t| ftl(t, id))
        .unwrap_or_else(|| panic!("no `{id}` for {tag}"))
}

/// The text of some HTML: tags dropped, white space collapsed.
fn text_of(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The element that starts with `start` in `html`, up to the first `end` after it.
fn element<'a>(html: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = html.find(start)?;
    let length = html[from..].find(end)?;
    Some(&html[from..from + length])
}

/// A campaign of 20 people over every locale and a fallback, plus a duplicate row, an invalid
/// row (allowed by `max_invalid`) and a suppressed address.
fn campaign() -> (Campaign, PathBuf) {
    let campaign = Campaign::example()
        .rows(people(20))
        .row("user0@example0.com,Again,en,plan0")
        .row("not-an-address,Invalid,en,plan")
        .extra("[safety]\nmax_invalid = 1\n");
    let path = campaign.write();
    std::fs::write(
        campaign.dir().join("suppressed.txt"),
        "user3@example3.com\n",
    )
    .unwrap();
    let toml = std::fs::read_to_string(&path).unwrap().replacen(
        "path = \"recipients.csv\"",
        "path = \"recipients.csv\"\nsuppress = [\"suppressed.txt\"]",
        1,
    );
    std::fs::write(&path, toml).unwrap();
    (campaign, path)
}

fn preview(path: &Path, args: &[&str]) -> crate::campaign::Run {
    crate::campaign::mailer(&[&["preview", path.to_str().unwrap()], args].concat(), &[])
}

#[test]
fn the_gallery_opens_in_a_browser_with_every_locale_and_the_counts() {
    let (campaign, path) = campaign();
    let out = campaign.dir().join("preview");
    let run = preview(&path, &["--out", out.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    let index = out.join("index.html");
    assert!(
        run.stdout.lines().last() == Some(index.to_str().unwrap()),
        "{}",
        run.stdout
    );
    let url = format!("file://{}", index.display());

    // What the rows should give, worked out here from the rows themselves.
    let loaded = repository_locales();
    let mut locales: BTreeMap<String, usize> = BTreeMap::new();
    let mut domains: BTreeMap<String, usize> = BTreeMap::new();
    // Requested locales no folder serves (here, whose language has none), by tag.
    let mut unserved: BTreeMap<String, usize> = BTreeMap::new();
    for row in people(20) {
        let fields: Vec<&str> = row.split(',').collect();
        let (email, requested) = (fields[0], fields[fields.len() - 2]);
        if email == "user3@example3.com" {
            continue; // suppressed
        }
        *locales.entry(resolved(requested, &loaded)).or_default() += 1;
        if !loaded.contains(requested.split('-').next().unwrap()) {
            *unserved.entry(requested.to_owned()).or_default() += 1;
        }
        *domains
            .entry(email.split('@').nth(1).unwrap().to_owned())
            .or_default() += 1;
    }
    assert!(locales.len() >= 4, "{locales:?}");

    let dom = chromium(&["--dump-dom"], &url);
    assert!(dom.contains("</html>"), "{dom}");

    let summary = text_of(element(&dom, "<section id=\"summary\"", "</section>").unwrap());
    let rows = "Rows To send 19 Suppressed 1 Invalid rows 1 Duplicate rows 1 Total rows 22";
    assert!(summary.contains(rows), "{summary}");
    let by_locale: Vec<String> = locales.iter().map(|(l, n)| format!("{l} {n}")).collect();
    let by_locale = format!("By locale {} By domain", by_locale.join(" "));
    assert!(summary.contains(&by_locale), "{by_locale} in {summary}");
    let mut by_domain: Vec<(&String, &usize)> = domains.iter().collect();
    by_domain.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let by_domain: Vec<String> = by_domain.iter().map(|(d, n)| format!("{d} {n}")).collect();
    assert!(
        !unserved.is_empty(),
        "the rows ask for a locale without a folder"
    );
    let unserved: Vec<String> = unserved
        .iter()
        .map(|(tag, n)| {
            format!(
                "{n} recipients asked for `{tag}`; no locale folder serves it, so they get `en`"
            )
        })
        .collect();
    assert!(
        summary.ends_with(&format!(
            "By domain {} Locales not served as asked {}",
            by_domain.join(" "),
            unserved.join(" ")
        )),
        "{by_domain:?} {unserved:?} in {summary}"
    );

    for locale in locales.keys() {
        let section = element(
            &dom,
            &format!("<section class=\"locale\" id=\"locale-{locale}\""),
            "</section>",
        )
        .unwrap_or_else(|| panic!("no section for {locale} in {dom}"));
        // Three samples, each showing the locale's own greeting and the subject it resolves to.
        assert_eq!(
            section.matches("<article").count(),
            3,
            "{locale}: {section}"
        );
        let greeting = translated(locale, "greeting");
        let greeting = greeting.split('{').next().unwrap().trim();
        assert_eq!(
            section
                .matches(&format!("<pre class=\"text\">{greeting} "))
                .count(),
            3,
            "{locale}: {greeting} in {section}"
        );
        let subject = translated(locale, "subject");
        assert_eq!(
            section
                .matches(&format!("<th>Subject</th><td>{subject}</td>"))
                .count(),
            3,
            "{locale}: {subject} in {section}"
        );
        assert!(
            section.contains("<iframe sandbox=\"\" ") || section.contains("<iframe sandbox "),
            "{section}"
        );
    }
    // German has no footer of its own: the section says where it comes from.
    let german = element(&dom, "id=\"locale-de\"", "</section>").unwrap();
    assert!(
        german.contains("<tr><th><code>footer</code></th><td>en</td></tr>"),
        "{german}"
    );

    let scratch = tempfile::tempdir().unwrap();
    let png = scratch.path().join("gallery.png");
    chromium(
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,1600",
        ],
        &url,
    );
    let decoder = png::Decoder::new(std::io::Cursor::new(std::fs::read(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (1280, 1600));
    assert_eq!(frame.bit_depth, png::BitDepth::Eight);
    let channels = frame.color_type.samples();
    assert!(channels >= 3, "{:?}", frame.color_type);
    let mut colours: BTreeMap<[u8; 3], usize> = BTreeMap::new();
    for pixel in pixels[..frame.buffer_size()].chunks_exact(channels) {
        *colours.entry([pixel[0], pixel[1], pixel[2]]).or_default() += 1;
    }
    let total = (frame.width * frame.height) as usize;
    let background = colours.values().max().copied().unwrap();
    let drawn = total - background;
    assert!(
        drawn * 10 > total,
        "only {drawn} of {total} pixels differ from the background"
    );
    assert!(colours.len() >= 32, "{} colours", colours.len());
}

#[test]
fn an_asked_for_recipient_is_added_and_an_unknown_one_refused() {
    let (campaign, path) = campaign();
    let out = campaign.dir().join("preview");
    // user7 is on line 9, in fr-CA, whose first row (line 4) is the one sample per locale.
    let run = preview(
        &path,
        &[
            "--out",
            out.to_str().unwrap(),
            "--per-locale",
            "1",
            "--recipient",
            "user7@EXAMPLE0.com",
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let mut files: Vec<String> = std::fs::read_dir(out.join("fr-CA"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["line-000004.eml", "line-000009.eml"]);
    let eml = std::fs::read(out.join("fr-CA/line-000009.eml")).unwrap();
    let message = crate::parse(&eml);
    assert_eq!(
        message.to().unwrap().first().unwrap().address(),
        Some("user7@example0.com")
    );
    let page = std::fs::read_to_string(out.join("index.html")).unwrap();
    let section = element(&page, "id=\"locale-fr-CA\"", "</section>").unwrap();
    assert!(
        section.contains("<article class=\"asked\" id=\"line-9\">"),
        "{section}"
    );
    assert_eq!(page.matches("asked for</span>").count(), 1);

    for (address, why) in [
        ("nobody@example.org", "is not in the recipient list"),
        ("user3@example3.com", "is suppressed"),
    ] {
        let elsewhere = campaign.dir().join(format!("refused-{why}"));
        let run = preview(
            &path,
            &["--out", elsewhere.to_str().unwrap(), "--recipient", address],
        );
        assert_eq!(run.code, 65, "{run:?}");
        assert!(
            run.stderr.contains(&format!("`{address}` {why}")),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("recipients.csv"), "{}", run.stderr);
        assert!(!elsewhere.exists(), "nothing is written");
        assert!(run.stdout.is_empty(), "{}", run.stdout);
    }
}

#[test]
fn show_prints_one_rows_decoded_headers_and_text() {
    let (_campaign, path) = campaign();
    // Line 4 is user2: fr-CA, whose subject comes from fr. The subject is not ASCII, so it is
    // an encoded word in the message: what is printed is decoded.
    let run = preview(&path, &["--show", "4"]);
    assert_eq!(run.code, 0, "{run:?}");
    let subject = translated("fr-CA", "subject");
    assert!(!subject.is_ascii());
    let (headers, text) = run.stdout.split_once("\n\n").unwrap();
    let headers: Vec<&str> = headers.lines().collect();
    assert_eq!(headers[0], "From: Example <news@example.com>");
    assert_eq!(headers[1], "To: Ольга 2 <user2@example2.com>");
    assert!(
        headers.contains(&format!("Subject: {subject}").as_str()),
        "{headers:?}"
    );
    assert!(headers.iter().any(|h| h.starts_with("Message-ID: <")));
    assert!(!run.stdout.contains("=?"), "{}", run.stdout);
    assert!(text.starts_with("Allô Ольга 2,\n"), "{text}");
    assert!(text.contains("Votre forfait actuel : plan2."), "{text}");

    // A name that needs quoting is shown quoted, as a mail client shows it.
    let run = preview(&path, &["--show", "2"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("\nTo: \"Zoë <b>&</b> Co 0\" <user0@example0.com>\n"),
        "{}",
        run.stdout
    );

    for (line, why) in [
        ("1", "line 1 is the header"),
        ("5", "suppressed"),
        ("22", "repeats the address of line 2"),
        ("23", "not a valid address"),
        ("99", "no row starts on that line"),
    ] {
        let run = preview(&path, &["--show", line]);
        assert_eq!(run.code, 65, "{run:?}");
        assert!(
            run.stderr.contains(&format!("line `{line}` of `"))
                && run.stderr.contains("recipients.csv` is not a sendable row"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains(why), "{why}: {}", run.stderr);
    }

    // Neither `--out` nor `--show`: a usage error.
    assert_eq!(preview(&path, &[]).code, 64);
}
