//! A whole campaign from arbitrary bytes: the campaign file, the templates, two locales and a
//! recipient list go through the pure loaders, and when they load, every recipient's message is
//! rendered on the real path. No panic, no stack overflow, no hang, bounded memory (libFuzzer's
//! `-timeout` and `-rss_limit_mb`), no message over `[safety] max_message_size`, and every
//! problem names one of the campaign's files, with a line ≥ 1 when it has one.
//!
//! The input is cut at each 0xFF byte (never part of UTF-8, so no text is lost) into, in order:
//!
//! | part | file | empty or absent |
//! | --- | --- | --- |
//! | 0 | `campaign.toml` | the fixed campaign below |
//! | 1 | `templates/subject.hbs` | no such file |
//! | 2 | `templates/text.hbs` | no such file |
//! | 3 | `templates/html.hbs` | no such file |
//! | 4 | `templates/partials/a.hbs` | no such file |
//! | 5 | `templates/partials/b.hbs` | no such file |
//! | 6 | `locales/en/main.ftl` | `en` with no file (`en` is always loaded) |
//! | 7 | `locales/fr/main.ftl` | no `fr` locale |
//! | 8 | `recipients.csv` | the fixed list below |
//! | 9 | `locales/en/terms.ftl` | no such file |
//!
//! Each part is read as lossy UTF-8, as a file's text would be (the loaders refuse invalid
//! UTF-8 before this point).
//!
//! `config::parse` checks that the folders and files a campaign names exist (it reads none of
//! them), so the harness makes an empty campaign folder once, in the temporary directory, and
//! names `campaign.toml` inside it. Nothing else touches the file system: the templates and
//! locales go to `Templates::from_sources` and `Locales::from_sources`, the list to
//! `parse_reader`.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mailer::config::{self, Campaign};
use mailer::problem::Problem;
use mailer::recipients::parse_reader;
use mailer::render::template::{Limits, TemplateSources, Templates};
use mailer::render::{Locales, Renderer};
use unic_langid::LanguageIdentifier;

/// The campaign used when part 0 is empty or does not validate: a 64 KiB message limit, so
/// that the budget is reached often, and `bio` allowed raw in the HTML.
const FIXED_TOML: &str = r#"[campaign]
id = "fuzz"
from = "Fuzz <news@example.com>"
reply_to = "Support <support@example.com>"
template = "templates"
locales = "locales"
default_locale = "en"
kind = "announcement"

[recipients]
path = "recipients.csv"

[transport]
kind = "file"
outbox = "outbox"

[safety]
max_message_size = 65536
raw_html_columns = ["bio"]
"#;

/// The list used when part 8 is empty.
const FIXED_CSV: &str = "email,name,locale,bio,plan\n\
    ann@example.com,Ann Lee,en,<b>Ann</b>,Pro\n\
    zoe@example.fr,Zoé,fr-CA,<i>Zoé</i>,Free\n\
    ken@example.jp,Ken,ja,,Team\n";

/// Messages rendered per input, at most: the first rows of the list.
const MAX_RENDERED: usize = 4;

/// A fuzzed campaign may allow messages of up to 64 MiB; rendering several of those per input
/// only tests the allocator, and would pass the timeout under the sanitizer.
const MAX_FUZZED_MESSAGE_SIZE: usize = 1 << 20;

/// The empty campaign folder `config::parse` checks paths against.
fn folder() -> &'static Path {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    FOLDER.get_or_init(|| {
        let dir = std::env::temp_dir().join("mailer-fuzz-campaign-loader");
        for sub in ["templates/partials", "locales/en", "locales/fr", "outbox"] {
            std::fs::create_dir_all(dir.join(sub)).expect("cannot make the campaign folder");
        }
        std::fs::write(dir.join("recipients.csv"), "email\n").expect("cannot write the list");
        dir
    })
}

fn fixed_campaign() -> &'static Campaign {
    static FIXED: OnceLock<Campaign> = OnceLock::new();
    FIXED.get_or_init(|| {
        config::parse(&folder().join("campaign.toml"), FIXED_TOML)
            .unwrap_or_else(|problems| panic!("the fixed campaign does not load: {problems:?}"))
    })
}

/// Every problem names one of `files` (the file or folder it is about), and its line, if any,
/// is 1-based; a syntax error always has one.
fn check_problems(stage: &str, problems: &[Problem], files: &[&Path]) {
    for problem in problems {
        assert!(
            files.contains(&problem.path.as_path()),
            "{stage}: the problem names `{}`, none of the campaign's files: {problem}",
            problem.path.display()
        );
        if let Some(line) = problem.line {
            assert!(line >= 1, "{stage}: problem on line {line}: {problem}");
        }
        // A syntax error, or an id defined twice, is about one line.
        if problem.message.contains("syntax error") || problem.message.contains("defined twice") {
            assert!(
                problem.line.is_some(),
                "{stage}: a syntax error without a line: {problem}"
            );
        }
    }
}

/// `MAILER_FUZZ_DEBUG=1` prints what each stage gave, to see what a seed reaches.
fn debug(what: impl FnOnce() -> String) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("MAILER_FUZZ_DEBUG").is_some()) {
        eprintln!("{}", what());
    }
}

fn part(parts: &[&[u8]], index: usize) -> Option<String> {
    parts
        .get(index)
        .filter(|bytes| !bytes.is_empty())
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
}

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.split(|&b| b == 0xFF).collect();
    let file = folder().join("campaign.toml");

    // The campaign file: a fuzzed one when it validates, else the fixed one.
    let mut campaign = fixed_campaign().clone();
    if let Some(toml) = part(&parts, 0) {
        match config::parse(&file, &toml) {
            Ok(fuzzed) => {
                campaign = fuzzed;
                campaign.safety.max_message_size =
                    campaign.safety.max_message_size.min(MAX_FUZZED_MESSAGE_SIZE);
            }
            Err(problems) => {
                debug(|| format!("campaign.toml: {problems:#?}"));
                assert!(problems.errors() > 0, "refused without an error: {problems:?}");
                check_problems("campaign.toml", &problems.0, &[&file]);
            }
        }
    }

    // The recipient list (its own target checks it further).
    let csv_path = folder().join("recipients.csv");
    let csv = part(&parts, 8).unwrap_or_else(|| FIXED_CSV.to_owned());
    let list = parse_reader(&csv_path, csv.as_bytes(), &Default::default());

    // The locales: `en` always, `fr` when part 7 is there.
    let locales_dir = campaign.locales_dir.clone();
    let en_main = locales_dir.join("en/main.ftl");
    let en_terms = locales_dir.join("en/terms.ftl");
    let fr_main = locales_dir.join("fr/main.ftl");
    let en: LanguageIdentifier = "en".parse().expect("`en` is a language tag");
    let fr: LanguageIdentifier = "fr".parse().expect("`fr` is a language tag");
    let mut en_files = Vec::new();
    if let Some(text) = part(&parts, 6) {
        en_files.push((en_main.clone(), text));
    }
    if let Some(text) = part(&parts, 9) {
        en_files.push((en_terms.clone(), text));
    }
    let mut sources = vec![(en, en_files)];
    if let Some(text) = part(&parts, 7) {
        sources.push((fr, vec![(fr_main.clone(), text)]));
    }
    let locale_files: [&Path; 4] = [&locales_dir, &en_main, &en_terms, &fr_main];
    let locales = match Locales::from_sources(&locales_dir, sources, &campaign.default_locale) {
        Ok(locales) => Arc::new(locales),
        Err(problems) => {
            debug(|| format!("locales: {problems:#?}"));
            assert!(problems.errors() > 0, "refused without an error: {problems:?}");
            check_problems("locales", &problems.0, &locale_files);
            return;
        }
    };

    // The templates.
    let dir = campaign.template_dir.clone();
    let top = |index: usize, name: &str| part(&parts, index).map(|text| (dir.join(name), text));
    let mut template_sources = TemplateSources {
        subject: top(1, "subject.hbs"),
        text: top(2, "text.hbs"),
        html: top(3, "html.hbs"),
        partials: Vec::new(),
    };
    let partial_a = dir.join("partials/a.hbs");
    let partial_b = dir.join("partials/b.hbs");
    for (index, name, path) in [(4, "a", &partial_a), (5, "b", &partial_b)] {
        if let Some(text) = part(&parts, index) {
            template_sources
                .partials
                .push((name.to_owned(), path.clone(), text));
        }
    }
    let names: std::collections::BTreeSet<String> = (0..list.columns.names.len())
        .map(|index| list.columns.template_name(index).to_owned())
        .collect();
    let limits = Limits {
        columns: (!names.is_empty()).then_some(&names),
        raw_columns: &campaign.safety.raw_html_columns,
        max_message_size: campaign.safety.max_message_size,
    };
    let template_files: [&Path; 6] = [
        &dir,
        &dir.join("subject.hbs"),
        &dir.join("text.hbs"),
        &dir.join("html.hbs"),
        &partial_a,
        &partial_b,
    ];
    let templates = match Templates::from_sources(&dir, &template_sources, &locales, &limits) {
        Ok(templates) => templates,
        Err(problems) => {
            debug(|| format!("templates: {problems:#?}"));
            assert!(problems.errors() > 0, "refused without an error: {problems:?}");
            check_problems("templates", &problems.0, &template_files);
            return;
        }
    };

    // Every recipient's message, on the real path.
    let limit = campaign.safety.max_message_size;
    let renderer = Renderer::new(&campaign, templates, locales, Arc::clone(&list.columns));
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    for recipient in list.recipients.iter().take(MAX_RENDERED) {
        let rendered = renderer.render(recipient, date);
        debug(|| match &rendered {
            Ok(message) => format!("line {}: {} bytes", recipient.line, message.bytes.len()),
            Err(error) => format!("line {}: {error}", recipient.line),
        });
        match rendered {
            Ok(message) => {
                assert!(
                    message.bytes.len() <= limit,
                    "line {}: a message of {} bytes, over max_message_size = {limit}",
                    recipient.line,
                    message.bytes.len()
                );
                assert_eq!(
                    message.envelope.rcpt_to.to_string(),
                    &*recipient.address.key,
                    "line {}: the envelope is not the recipient's",
                    recipient.line
                );
            }
            Err(error) => check_render_error(&error, &template_files),
        }
    }
});

/// A render error names the template file (and a line ≥ 1 when it gives one), or is about the
/// message as a whole.
fn check_render_error(error: &str, files: &[&Path]) {
    const WHOLE_MESSAGE: [&str; 8] = [
        "the rendered subject contains a line break",
        "the rendered HTML nests elements ",
        "the rendered subject is empty",
        "the rendered message contains a NUL character",
        "the message is ",
        "the message has neither",
        "the message cannot be built",
        "cannot make the text part",
    ];
    if WHOLE_MESSAGE.iter().any(|start| error.starts_with(start))
        || error.starts_with("cannot inline the HTML's CSS")
    {
        return;
    }
    if error.starts_with("the message grows past ") {
        assert!(error.contains(".hbs` renders"), "no template named: {error}");
        return;
    }
    let named = files
        .iter()
        .skip(1)
        .find(|path| error.starts_with(&*path.to_string_lossy()));
    let Some(path) = named else {
        panic!("a render error that names no template file: {error}");
    };
    let rest = &error[path.to_string_lossy().len()..];
    if let Some(line) = rest.strip_prefix(':').and_then(|r| r.split(':').next()) {
        if let Ok(line) = line.parse::<u64>() {
            assert!(line >= 1, "a render error on line {line}: {error}");
        }
    }
}
