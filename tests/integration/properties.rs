//! Property tests of the guard on the real render path.
//!
//! Each case is a random campaign: a recipient list whose names and extra columns hold quotes,
//! commas, line breaks, Unicode, HTML, RFC 2047 lookalikes and — planted on purpose — other
//! recipients' addresses in several spellings; and random `subject.hbs`, `text.hbs` and
//! `html.hbs` from a small grammar that cannot itself name anyone. The campaign is written to a
//! temporary folder (from the example's templates and locales) and goes through the library's
//! own path, `mailer::load` then `mailer::prepare` for every recipient, as `check` and `send` do.
//!
//! The model below predicts, independently of the guard, where each planted address ends up:
//! a field reaches the message when a template renders it (or, for `name`, always: it is the
//! `To` header's display name). The properties compare the guard's verdicts with that model and
//! read every accepted message back with `mail-parser`.
//!
//! Every run explores: each property draws a fresh seed, in CI as on a developer's machine, and
//! prints it (to stderr, uncaptured, and again in the failure message) with the command that
//! replays it: `MAILER_PROPTEST_SEED=0x… cargo test --test integration <property>`. A failing
//! case is also saved, by proptest, in `regressions/<property>.txt` next to this file; commit
//! that line with the fix, and every later run replays it before drawing new cases.
//!
//! The tests at the end are regressions: gaps these properties found in the guard (addresses
//! next to punctuation, addresses escaped twice in HTML, the addresses of refused rows), closed,
//! each written out as the concrete campaign it guards.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::hash::{BuildHasher as _, RandomState};
use std::io::Write as _;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use mail_parser::{MessageParser, PartType};
use mailer::problem::Problem;
use mailer::render::OutgoingMessage;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestCaseError, TestRng, TestRunner,
};

use crate::campaign::Campaign;

/// Cases per property, in CI as elsewhere (`PROPTEST_CASES=256` for a quick run). Each case
/// writes a campaign folder and loads it: about 7 ms of CPU in a debug build. Measured on the
/// 2-core machine, `cargo test --test integration properties` (four properties, two at a time):
///
/// | cases | CPU (user + sys) | wall, machine lightly loaded | wall, beside others' builds |
/// |-------|------------------|------------------------------|-----------------------------|
/// | 48    | 2 s              | 1 s                          |                             |
/// | 1024  | 27 s             | 18 s                         |                             |
/// | 2048  | 57 s             | 36 s                         |                             |
/// | 3072  | 86 s             |                              | 130 s, 188 s                |
/// | 4096  | 112 s            |                              | 164 s, 219 s                |
///
/// On two free cores, as in CI, the wall time is the CPU time over 1.6. 1024 cases (about 20 s
/// of the suite, where the rest of it takes about 40 s) leave CI well inside its budget with
/// the build and the supply-chain checks; a fresh seed every run makes the cases add up across
/// runs. `PROPTEST_CASES=4096` explores more on purpose.
const CASES: u32 = 1024;

/// Replays a run: the seed a property printed (`0x` and 16 hex digits, or decimal).
const SEED_VAR: &str = "MAILER_PROPTEST_SEED";

/// The folder of the failing cases proptest saves, one file per property, each replayed first.
const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/integration/regressions");

/// Proptest shrinks a failure for at most this long (ms), so that a failing run in CI still ends
/// well within its budget: each shrinking step is a campaign written and loaded.
const SHRINK_TIME_MS: u32 = 60_000;

/// Every case renders on the same date, as one run does.
fn date() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000)
}

// ---------------------------------------------------------------------------------------------
// The recipient list
// ---------------------------------------------------------------------------------------------

/// The CSV header: the three columns with a meaning and two free ones a template may use.
const HEADER: &str = "email,name,locale,plan,note";

/// A domain as `recipients` normalises it (IDNA, lower case) and as a person may type it.
#[derive(Debug, Clone, Copy)]
struct Domain {
    ascii: &'static str,
    unicode: &'static str,
}

/// Four domains; one internationalised, so that the guard's IDNA normalisation is exercised.
const DOMAINS: [Domain; 4] = [
    Domain {
        ascii: "example.com",
        unicode: "example.com",
    },
    Domain {
        ascii: "example.org",
        unicode: "example.org",
    },
    Domain {
        ascii: "mail.example.net",
        unicode: "mail.example.net",
    },
    Domain {
        ascii: "xn--exmple-cua.de",
        unicode: "exämple.de",
    },
];

/// Local parts, before the row's index is appended: dots, plus, apostrophe, capitals,
/// non-ASCII (RFC 6531). Each ends in a letter and the index follows, so no recipient's
/// address is a substring of another's — the independent leak check below searches substrings.
const WORDS: [&str; 8] = [
    "ann",
    "Bob",
    "carl.diaz",
    "d+news",
    "o'hara",
    "Zoë",
    "élodie",
    "Юля",
];

/// Email cells `recipients` must refuse (`{}` is the local part); their rows are "refused".
const BAD_EMAILS: [&str; 3] = ["{}@localhost", "{} at example.com", "{}@"];

/// Locale cells: loaded ones, one resolved through its bare language, unknown ones (default).
const LOCALES: [&str; 8] = ["", "en", "fr", "fr-CA", "fr_CA", "de", "es", "zz"];

/// Text without any address: what real names and notes contain, and what breaks naive code —
/// quotes, commas, backslashes, HTML, encoded-word lookalikes, Unicode, and line breaks in three
/// spellings. Line breaks matter for property 3; `Bcc:` after one is a header-injection attempt.
const NOISE: [&str; 20] = [
    "Doe, John",
    "\"JE\" O'Hara",
    "Zoë",
    "Ольга",
    "日本語",
    "שלום",
    "🎉",
    "<b>&</b>",
    "<script>alert(1)</script>",
    "&amp; &lt;x&gt;",
    "a\\b",
    "50% off",
    "=?utf-8?b?SGVsbG8=?=",
    "=?iso-8859-1?q?caf=E9?=",
    "=?",
    "first\r\nsecond",
    "first\nsecond",
    "cr\ronly",
    "x\r\nBcc: evil",
    "\u{a0}non-breaking\u{a0}",
];

/// Addresses that are nobody's in the list (or allowed in every message: the example's
/// sender and reply-to): planting them must never stop a message.
const HARMLESS: [&str; 4] = [
    "stranger@example.net",
    "news@example.com",
    "support@example.com",
    "Support@EXAMPLE.com",
];

/// What sits right before and right after a planted address, inside the field. Always a
/// non-space character next to the address, so that the field's trimming cannot glue the
/// address to template text; all of them end an address for any reader (and for the guard).
/// A full stop is always followed by more text: at the end of a trimmed field it would join
/// the address to what the template writes next (`bob@example.com.Thanks` may be a domain).
const BEFORE: [&str; 9] = [
    "<",
    "(",
    "\"",
    "mailto:",
    "[",
    ": ",
    ", ",
    "\r\nCc: ",
    "write to ",
];
const AFTER: [&str; 8] = [">", ")", "\"", "]", ". Thanks", ", ", "; ", " and more"];

/// How an address is spelled where it is planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Plain,
    Upper,
    /// `bob%40example.com`, as in a `mailto:` or query string.
    Percent,
    /// `bob&#64;example.com`.
    Entity,
    /// `=?utf-8?b?…?=` of the address: only a leak if a mail reader decodes it, that is in a
    /// header, so the model predicts nothing for it; property 1 reads decoded headers.
    EncodedB,
    /// `=?utf-8?q?…?=`, likewise.
    EncodedQ,
}

impl Form {
    /// Forms in which a reader sees the address wherever the text lands.
    fn is_visible(self) -> bool {
        !matches!(self, Form::EncodedB | Form::EncodedQ)
    }

    fn spell(self, address: &str) -> String {
        match self {
            Form::Plain => address.to_owned(),
            Form::Upper => address.to_uppercase(),
            Form::Percent => address.replace('@', "%40"),
            Form::Entity => address.replace('@', "&#64;"),
            Form::EncodedB => format!(
                "=?utf-8?b?{}?=",
                base64::engine::general_purpose::STANDARD.encode(address)
            ),
            Form::EncodedQ => {
                let mut q = String::from("=?utf-8?q?");
                for byte in address.bytes() {
                    if byte.is_ascii_alphanumeric() || byte == b'.' {
                        q.push(char::from(byte));
                    } else {
                        let _ = write!(q, "={byte:02X}");
                    }
                }
                q.push_str("?=");
                q
            }
        }
    }
}

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![
        3 => Just(Form::Plain),
        2 => Just(Form::Upper),
        2 => Just(Form::Percent),
        2 => Just(Form::Entity),
        1 => Just(Form::EncodedB),
        1 => Just(Form::EncodedQ),
    ]
}

/// One piece of a field's text; a field is its pieces joined by spaces.
#[derive(Debug, Clone)]
enum Piece {
    Noise(&'static str),
    /// The address of the row `target` picks (possibly the row itself: its own address is fine).
    Plant {
        target: Index,
        form: Form,
        /// Write an internationalised domain in Unicode rather than in its `xn--` form.
        unicode: bool,
        before: &'static str,
        after: &'static str,
    },
    Harmless {
        address: &'static str,
        form: Form,
        before: &'static str,
        after: &'static str,
    },
}

fn piece(before: &'static [&'static str], after: &'static [&'static str]) -> BoxedStrategy<Piece> {
    prop_oneof![
        5 => select(&NOISE[..]).prop_map(Piece::Noise),
        4 => (any::<Index>(), form(), any::<bool>(), select(before), select(after)).prop_map(
            |(target, form, unicode, before, after)| Piece::Plant {
                target,
                form,
                unicode,
                before,
                after,
            }
        ),
        1 => (select(&HARMLESS[..]), form(), select(before), select(after)).prop_map(
            |(address, form, before, after)| Piece::Harmless {
                address,
                form,
                before,
                after,
            }
        ),
    ]
    .boxed()
}

/// How the email cell spells the domain: `recipients` must normalise all three the same.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    Ascii,
    Upper,
    Unicode,
}

/// One CSV row, before it knows its index.
#[derive(Debug, Clone)]
struct Row {
    word: &'static str,
    domain: usize,
    spelling: Spelling,
    /// Surrounding white space in the email cell, which `recipients` trims.
    padded: bool,
    /// A cell `recipients` refuses instead of the address.
    bad_email: Option<&'static str>,
    locale: &'static str,
    name: Vec<Piece>,
    plan: Vec<Piece>,
    note: Vec<Piece>,
}

fn row(
    before: &'static [&'static str],
    after: &'static [&'static str],
) -> impl Strategy<Value = Row> {
    let spelling = prop_oneof![
        Just(Spelling::Ascii),
        Just(Spelling::Upper),
        Just(Spelling::Unicode)
    ];
    let field = move || prop::collection::vec(piece(before, after), 0..3);
    (
        (
            select(&WORDS[..]),
            0..DOMAINS.len(),
            spelling,
            any::<bool>(),
            prop::option::weighted(0.1, select(&BAD_EMAILS[..])),
            select(&LOCALES[..]),
        ),
        (field(), field(), field()),
    )
        .prop_map(
            |((word, domain, spelling, padded, bad_email, locale), (name, plan, note))| Row {
                word,
                domain,
                spelling,
                padded,
                bad_email,
                locale,
                name,
                plan,
                note,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// The templates
// ---------------------------------------------------------------------------------------------

/// The columns a template can read, as `r.<column>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Column {
    Email,
    Name,
    Locale,
    Plan,
    Note,
}

impl Column {
    fn name(self) -> &'static str {
        match self {
            Column::Email => "email",
            Column::Name => "name",
            Column::Locale => "locale",
            Column::Plan => "plan",
            Column::Note => "note",
        }
    }
}

fn column() -> impl Strategy<Value = Column> {
    prop_oneof![
        Just(Column::Email),
        Just(Column::Name),
        Just(Column::Locale),
        Just(Column::Plan),
        Just(Column::Note)
    ]
}

/// `{{t "…"}}` on ids every example locale has (directly or through its fallback). The two
/// messages with a variable take any column for it, so data reaches a part through Fluent too.
#[derive(Debug, Clone, Copy)]
enum Call {
    Subject,
    Body,
    Footer,
    GreetingAnonymous,
    Greeting(Column),
    PlanLine(Column),
}

/// The template grammar: nothing in it can produce an address by itself.
#[derive(Debug, Clone)]
enum Node {
    Text(&'static str),
    Var(Column),
    T(Call),
    /// The example's `footer` partial.
    Footer,
    If(Column, Vec<Node>),
}

/// Literal template text for the subject: one line, no `@`, no `{{`.
const SUBJECT_TEXT: [&str; 8] = [
    "News",
    " ",
    " — ",
    ": ",
    "Ünïcödé ",
    "<b>",
    " & ",
    "\"quoted\"",
];

/// Literal template text for the bodies: also line breaks and HTML.
const BODY_TEXT: [&str; 10] = [
    "Hello ",
    ", ",
    "\n",
    "\n\n",
    "— ",
    "«",
    "»",
    "<p>",
    "</p>\n",
    "<a href=\"mailto:",
];

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        Just(Call::Subject),
        Just(Call::Body),
        Just(Call::Footer),
        Just(Call::GreetingAnonymous),
        column().prop_map(Call::Greeting),
        column().prop_map(Call::PlanLine),
    ]
}

fn nodes(text: &'static [&'static str], partial: bool) -> impl Strategy<Value = Vec<Node>> {
    let leaf = prop_oneof![
        2 => select(text).prop_map(Node::Text),
        3 => column().prop_map(Node::Var),
        2 => call().prop_map(Node::T),
        u32::from(partial) => Just(Node::Footer),
    ];
    let node = leaf.prop_recursive(2, 12, 4, |inner| {
        (column(), prop::collection::vec(inner, 0..4)).prop_map(|(c, body)| Node::If(c, body))
    });
    prop::collection::vec(node, 0..6)
}

impl Node {
    fn source(&self, out: &mut String) {
        match self {
            Node::Text(text) => out.push_str(text),
            Node::Var(column) => {
                let _ = write!(out, "{{{{r.{}}}}}", column.name());
            }
            Node::T(call) => {
                let _ = match call {
                    Call::Subject => write!(out, "{{{{t \"subject\"}}}}"),
                    Call::Body => write!(out, "{{{{t \"body\"}}}}"),
                    Call::Footer => write!(out, "{{{{t \"footer\"}}}}"),
                    Call::GreetingAnonymous => write!(out, "{{{{t \"greeting-anonymous\"}}}}"),
                    Call::Greeting(c) => write!(out, "{{{{t \"greeting\" name=r.{}}}}}", c.name()),
                    Call::PlanLine(c) => write!(out, "{{{{t \"plan-line\" plan=r.{}}}}}", c.name()),
                };
            }
            Node::Footer => out.push_str("{{> footer}}"),
            Node::If(column, body) => {
                let _ = write!(out, "{{{{#if r.{}}}}}", column.name());
                for node in body {
                    node.source(out);
                }
                out.push_str("{{/if}}");
            }
        }
    }

    /// The columns whose value this node writes into the output for a row whose (trimmed)
    /// values are `value`: handlebars' `#if` is true for a non-empty string.
    fn rendered(&self, value: &dyn Fn(Column) -> String, out: &mut BTreeSet<Column>) {
        match self {
            Node::Var(column) | Node::T(Call::Greeting(column) | Call::PlanLine(column)) => {
                out.insert(*column);
            }
            // Template text and the other `t` messages hold no data.
            Node::Text(_) | Node::Footer | Node::T(_) => {}
            Node::If(column, body) => {
                if !value(*column).is_empty() {
                    for node in body {
                        node.rendered(value, out);
                    }
                }
            }
        }
    }
}

fn source(nodes: &[Node]) -> String {
    let mut out = String::new();
    for node in nodes {
        node.source(&mut out);
    }
    out
}

/// The three templates. The subject starts with something that always renders, so that an
/// empty subject is never the reason a message is refused.
#[derive(Debug, Clone)]
struct Templates {
    subject: Vec<Node>,
    text: Option<Vec<Node>>,
    html: Option<Vec<Node>>,
}

fn templates() -> impl Strategy<Value = Templates> {
    let first = prop_oneof![Just(Node::T(Call::Subject)), Just(Node::Text("News"))];
    let subject = (first, nodes(&SUBJECT_TEXT, false)).prop_map(|(first, mut rest)| {
        rest.insert(0, first);
        rest
    });
    let body = || nodes(&BODY_TEXT, true);
    // Both parts, or only one of them: the guard must read single-part messages too.
    let parts = prop_oneof![
        3 => (body(), body()).prop_map(|(t, h)| (Some(t), Some(h))),
        1 => body().prop_map(|t| (Some(t), None)),
        1 => body().prop_map(|h| (None, Some(h))),
    ];
    (subject, parts).prop_map(|(subject, (text, html))| Templates {
        subject,
        text,
        html,
    })
}

// ---------------------------------------------------------------------------------------------
// A case: build the campaign, run the library, and the model's predictions
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Case {
    rows: Vec<Row>,
    templates: Templates,
}

/// Two to six rows: enough for every row to have others to leak, few enough to stay fast.
fn case_with(
    before: &'static [&'static str],
    after: &'static [&'static str],
) -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(row(before, after), 2..=6),
        templates(),
    )
        .prop_map(|(rows, templates)| Case { rows, templates })
}

fn case() -> impl Strategy<Value = Case> {
    case_with(&BEFORE, &AFTER)
}

/// The parts of a message a field can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    /// The `To` header's display name.
    To,
    Subject,
    Text,
    Html,
}

/// A planted address, resolved: the row it names and where it was written.
#[derive(Debug, Clone)]
struct Planted {
    target: usize,
    form: Form,
    column: Column,
}

/// One row after the run, with what the model says about it.
#[derive(Debug)]
struct Outcome {
    /// The CSV line the row starts on.
    line: u64,
    /// The normalised address (`local@ascii-domain`) and its Unicode spelling.
    key: String,
    unicode: String,
    /// The trimmed cells of `name`, `plan`, `note`.
    name: String,
    plan: String,
    note: String,
    locale: String,
    planted: Vec<Planted>,
    /// Whether `recipients` should accept the row: a valid address, no line break in `name`.
    valid: bool,
    /// Whether the row's address is valid: then it is a person of the list whose address must
    /// not leak, even when the row itself is refused.
    address_valid: bool,
    /// `None` when the row is not in `loaded.list.recipients`; else what `prepare` returned.
    result: Option<Result<OutgoingMessage, Problem>>,
    /// Where each column's value lands in this row's message, by the model.
    places: Vec<(Column, Place)>,
}

impl Outcome {
    fn value(&self, column: Column) -> String {
        match column {
            Column::Email => self.key.clone(),
            Column::Name => self.name.clone(),
            Column::Locale => self.locale.clone(),
            Column::Plan => self.plan.clone(),
            Column::Note => self.note.clone(),
        }
    }

    fn reaches(&self, column: Column) -> impl Iterator<Item = Place> + '_ {
        self.places
            .iter()
            .filter(move |(c, _)| *c == column)
            .map(|(_, place)| *place)
    }

    fn has_line_break(&self, column: Column) -> bool {
        self.value(column).contains(['\r', '\n'])
    }

    fn ok(&self) -> Option<&OutgoingMessage> {
        self.result.as_ref().and_then(|r| r.as_ref().ok())
    }
}

/// RFC 4180 with every field quoted: commas, quotes and line breaks survive.
fn csv_line(fields: &[&str]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| format!("\"{}\"", f.replace('"', "\"\"")))
        .collect();
    quoted.join(",")
}

fn local_part(rows: &[Row], index: usize) -> String {
    format!("{}{index}", rows[index].word)
}

fn field_text(
    rows: &[Row],
    pieces: &[Piece],
    column: Column,
    planted: &mut Vec<Planted>,
) -> String {
    let mut parts = Vec::new();
    for piece in pieces {
        parts.push(match piece {
            Piece::Noise(text) => (*text).to_owned(),
            Piece::Plant {
                target,
                form,
                unicode,
                before,
                after,
            } => {
                let target = target.index(rows.len());
                let domain = DOMAINS[rows[target].domain];
                let domain = if *unicode {
                    domain.unicode
                } else {
                    domain.ascii
                };
                planted.push(Planted {
                    target,
                    form: *form,
                    column,
                });
                let address = format!("{}@{domain}", local_part(rows, target));
                format!("{before}{}{after}", form.spell(&address))
            }
            Piece::Harmless {
                address,
                form,
                before,
                after,
            } => format!("{before}{}{after}", form.spell(address)),
        });
    }
    parts.join(" ")
}

/// Writes the case as a campaign folder, loads it with `mailer::load` and prepares every
/// recipient with `mailer::prepare`.
fn run(case: &Case) -> Vec<Outcome> {
    let mut campaign = Campaign::example()
        .header(HEADER)
        .file("templates/subject.hbs", &source(&case.templates.subject));
    for (file, nodes) in [
        ("templates/text.hbs", &case.templates.text),
        ("templates/html.hbs", &case.templates.html),
    ] {
        campaign = match nodes {
            Some(nodes) => campaign.file(file, &source(nodes)),
            None => {
                std::fs::remove_file(campaign.dir().join(file)).unwrap();
                campaign
            }
        };
    }

    let rows = &case.rows;
    let mut outcomes = Vec::new();
    let mut line = 2;
    for (index, row) in rows.iter().enumerate() {
        let local = local_part(rows, index);
        let domain = DOMAINS[row.domain];
        let written = match row.spelling {
            Spelling::Ascii => domain.ascii.to_owned(),
            Spelling::Upper => domain.ascii.to_ascii_uppercase(),
            Spelling::Unicode => domain.unicode.to_owned(),
        };
        let email = match row.bad_email {
            Some(bad) => bad.replace("{}", &local),
            None if row.padded => format!("  {local}@{written} "),
            None => format!("{local}@{written}"),
        };
        let mut planted = Vec::new();
        let name = field_text(rows, &row.name, Column::Name, &mut planted);
        let plan = field_text(rows, &row.plan, Column::Plan, &mut planted);
        let note = field_text(rows, &row.note, Column::Note, &mut planted);
        let text = csv_line(&[&email, &name, row.locale, &plan, &note]);
        campaign = campaign.row(&text);
        outcomes.push(Outcome {
            line,
            key: format!("{local}@{}", domain.ascii),
            unicode: format!("{local}@{}", domain.unicode),
            valid: row.bad_email.is_none() && !name.trim().contains(['\r', '\n']),
            address_valid: row.bad_email.is_none(),
            name: name.trim().to_owned(),
            plan: plan.trim().to_owned(),
            note: note.trim().to_owned(),
            locale: row.locale.to_owned(),
            planted,
            result: None,
            places: vec![],
        });
        // The csv crate counts lines by LF only: a CR alone does not start one.
        // A row spans as many lines as it holds line breaks: CRLF, LF or a lone CR (mailer
        // counts a lone CR as a line end, as the classic Mac files that use it mean it).
        let breaks = text
            .replace("\r\n", "\n")
            .replace('\r', "\n")
            .matches('\n')
            .count();
        line += 1 + breaks as u64;
    }

    let path = campaign.write();
    let loaded = match mailer::pipeline::load(&path).expect("the campaign files can be read") {
        Ok(loaded) => loaded,
        Err(problems) => panic!("the campaign does not load: {problems:?}\n{case:#?}"),
    };
    for recipient in &loaded.list.recipients {
        let outcome = outcomes
            .iter_mut()
            .find(|o| o.line == recipient.line)
            .unwrap_or_else(|| panic!("no row starts on line {}", recipient.line));
        assert_eq!(
            &*recipient.address.key,
            outcome.key.as_str(),
            "line {}: normalised address",
            outcome.line
        );
        outcome.result = Some(mailer::pipeline::prepare(&loaded, recipient, date()));
    }

    for outcome in &mut outcomes {
        let value = |c: Column| outcome.value(c);
        let mut places = vec![(Column::Name, Place::To)];
        for (place, nodes) in [
            (Place::Subject, Some(&case.templates.subject)),
            (Place::Text, case.templates.text.as_ref()),
            (Place::Html, case.templates.html.as_ref()),
        ] {
            let mut columns = BTreeSet::new();
            for node in nodes.into_iter().flatten() {
                node.rendered(&value, &mut columns);
            }
            places.extend(columns.into_iter().map(|c| (c, place)));
        }
        // `name` is the display name only when it is not empty.
        if outcome.name.is_empty() {
            places.remove(0);
        }
        outcome.places = places;
    }
    outcomes
}

// ---------------------------------------------------------------------------------------------
// What the guard is held to
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Reading a message back, independently of the guard
// ---------------------------------------------------------------------------------------------

/// Whether `address` stands in `text` as an address a reader would see: not glued to letters,
/// digits or address punctuation on either side (`serviceann@example.com` is someone else).
fn holds_address(text: &str, address: &str) -> bool {
    let glued = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || "._+-".contains(c));
    text.match_indices(address).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + address.len()..].chars().next();
        // A full stop after an address ends the sentence, not the domain.
        let glued_after = glued(after) && after != Some('.');
        !glued(before) && !glued_after
    })
}

/// `text` lower-cased, and every form it takes when percent-escapes and HTML entities are
/// decoded, in any mix of up to three layers (templates escape data that was escaped already).
fn readable_forms(text: &str) -> BTreeSet<String> {
    let entities = |s: &str| html_escape::decode_html_entities(s).to_lowercase();
    let percent = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .to_lowercase()
    };
    let text = text.to_lowercase();
    let mut forms = BTreeSet::from([text]);
    for _ in 0..3 {
        let decoded: Vec<String> = forms
            .iter()
            .flat_map(|form| [entities(form), percent(form)])
            .collect();
        forms.extend(decoded);
    }
    forms
}

/// Checks the recipient headers of a message against its envelope (property 1) and returns
/// the decoded texts a reader sees: the `To` display name, the subject, every text and HTML
/// part.
fn read_back(message: &OutgoingMessage) -> Result<Vec<(Place, String)>, TestCaseError> {
    let parsed = MessageParser::default()
        .parse(&message.bytes)
        .ok_or_else(|| TestCaseError::fail("mail-parser cannot parse the message"))?;
    let names: Vec<String> = parsed
        .headers()
        .iter()
        .map(|h| h.name().to_ascii_lowercase())
        .collect();
    prop_assert_eq!(
        names.iter().filter(|n| *n == "to").count(),
        1,
        "{:?}",
        names
    );
    for name in &names {
        prop_assert!(
            !["cc", "bcc", "apparently-to"].contains(&name.as_str())
                && !name.starts_with("resent-"),
            "a `{}` header",
            name
        );
    }
    let to = parsed.to();
    prop_assert!(to.and_then(|to| to.as_group()).is_none(), "To is a group");
    let to: Vec<_> = to.map(|to| to.iter().collect()).unwrap_or_default();
    prop_assert_eq!(to.len(), 1, "To holds {} addresses", to.len());
    let rcpt = message.envelope.rcpt_to.to_string();
    prop_assert_eq!(to[0].address(), Some(rcpt.as_str()));

    let mut texts = vec![
        (Place::To, to[0].name().unwrap_or_default().to_owned()),
        (
            Place::Subject,
            parsed.subject().unwrap_or_default().to_owned(),
        ),
    ];
    for part in &parsed.parts {
        match &part.body {
            PartType::Text(text) => texts.push((Place::Text, text.to_string())),
            PartType::Html(html) => texts.push((Place::Html, html.to_string())),
            _ => {}
        }
    }
    Ok(texts)
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

/// How often each property was exercised over a run, to show none is vacuous.
#[derive(Debug, Default)]
struct Tally {
    /// The new cases the run drew (saved regressions are replayed on top of them).
    cases: usize,
    messages: usize,
    refused: usize,
    leaks: usize,
    line_breaks: usize,
}

type Property = fn(&[Outcome], &mut Tally) -> Result<(), TestCaseError>;

/// `CASES`, unless `PROPTEST_CASES` sets another count for this run.
fn cases() -> u32 {
    match std::env::var("PROPTEST_CASES") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("PROPTEST_CASES=`{text}` is not a number of cases")),
        Err(_) => CASES,
    }
}

/// The seed of one property's run: the one `MAILER_PROPTEST_SEED` pins, or else a fresh one —
/// in CI too, so that every run there explores cases no earlier run tried.
fn seed() -> u64 {
    let pinned = std::env::var_os(SEED_VAR).filter(|value| !value.is_empty());
    let Some(value) = pinned else {
        return RandomState::new().hash_one(std::thread::current().id());
    };
    let text = value.to_string_lossy();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    };
    parsed.unwrap_or_else(|| panic!("{SEED_VAR}=`{text}` is not a seed (`0x` and hex, or decimal)"))
}

/// The generator of a property's cases: `ChaCha` keyed by the seed and the property's name, so
/// that one seed pinned for the whole suite still gives each property cases of its own.
fn rng(seed: u64, name: &str) -> TestRng {
    // FNV-1a: any fixed, well-mixed hash of the name will do; it only has to stay the same.
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut key = [0; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&name_hash.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &key)
}

/// Runs `property` on random cases of `strategy`: first the cases saved in
/// `regressions/<name>.txt`, then `cases()` new ones drawn from a fresh (or pinned) seed, which
/// is printed. `name` is the test's, for the replay command. Returns what was exercised.
fn check(name: &'static str, strategy: impl Strategy<Value = Case>, property: Property) -> Tally {
    // The replay command filters by `name`: it must be the calling test's (libtest names each
    // test's thread after it, except when it runs tests on the main thread).
    if let Some(thread) = std::thread::current().name().filter(|t| t.contains("::")) {
        assert!(
            thread.ends_with(&format!("::{name}")),
            "check({name:?}) in {thread}"
        );
    }
    let seed = seed();
    let replay = format!("{SEED_VAR}={seed:#018x} cargo test --test integration {name}");
    // Straight to stderr, past libtest's capture: the seed shows even if the process dies (a
    // CI timeout, an abort) before a failure could be reported.
    let _ = writeln!(
        std::io::stderr(),
        "properties::{name}: seed {seed:#018x} (replay: {replay})"
    );
    let regressions: &'static str = Box::leak(format!("{REGRESSIONS}/{name}.txt").into_boxed_str());
    let config = Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
        max_shrink_time: SHRINK_TIME_MS,
        ..Config::default()
    };
    let cases = config.cases as usize;
    let mut runner = TestRunner::new_with_rng(config, rng(seed, name));
    let tally = RefCell::new(Tally {
        cases,
        ..Tally::default()
    });
    let result = runner.run(&strategy, |case| {
        let outcomes = run(&case);
        let mut tally = tally.borrow_mut();
        tally.messages += outcomes.iter().filter(|o| o.ok().is_some()).count();
        tally.refused += outcomes.iter().filter(|o| o.ok().is_none()).count();
        property(&outcomes, &mut tally)
    });
    if let Err(error) = result {
        panic!(
            "{error}\n\n{name}: seed {seed:#018x}; replay this run with\n    {replay}\n\
             a new failing case is also saved in {regressions} (commit it: every run replays \
             that file first)"
        );
    }
    tally.into_inner()
}

/// Property 1: every message `prepare` accepts goes to its row's address, names exactly that
/// one address in exactly one `To` header, has no copy header, and holds no other accepted
/// recipient's address anywhere a reader looks, in any spelling — read back with mail-parser
/// and searched for as a plain substring, without the guard's tokeniser.
fn one_recipient_and_no_one_else(outcomes: &[Outcome], _: &mut Tally) -> Result<(), TestCaseError> {
    for (index, outcome) in outcomes.iter().enumerate() {
        let Some(message) = outcome.ok() else {
            continue;
        };
        prop_assert_eq!(message.line, outcome.line);
        prop_assert_eq!(message.envelope.rcpt_to.to_string(), outcome.key.clone());
        for (place, text) in read_back(message)? {
            let forms = readable_forms(&text);
            for (other_index, other) in outcomes.iter().enumerate() {
                if other_index == index || !other.address_valid {
                    continue;
                }
                for address in [other.key.to_lowercase(), other.unicode.to_lowercase()] {
                    prop_assert!(
                        !forms.iter().any(|form| holds_address(form, &address)),
                        "line {}: the {:?} holds `{}` (line {}) yet the guard let it pass:\n{}",
                        outcome.line,
                        place,
                        address,
                        other.line,
                        text
                    );
                }
            }
        }
    }
    Ok(())
}

/// The planted leaks the model predicts for a row: another accepted row's address, in a form a
/// reader sees, in a column that reaches the message.
fn predicted_leaks<'a>(outcomes: &'a [Outcome], outcome: &'a Outcome) -> Vec<(&'a Planted, Place)> {
    outcome
        .planted
        .iter()
        .filter(|p| p.form.is_visible())
        .filter(|p| outcomes[p.target].address_valid && outcomes[p.target].key != outcome.key)
        .filter_map(|p| outcome.reaches(p.column).next().map(|place| (p, place)))
        .collect()
}

/// Property 2: every predicted leak stops the row's message, and the reason names the CSV line
/// of the row whose address leaked (unless rendering already failed: a line break bound for a
/// header stops the row before the guard runs). Conversely, a valid row with no predicted leak,
/// no encoded word of another's address in a header and no line break in a header-bound field
/// is never refused: the guard must not stop what it should let through.
fn leaks_are_stopped(outcomes: &[Outcome], tally: &mut Tally) -> Result<(), TestCaseError> {
    for outcome in outcomes {
        let Some(result) = &outcome.result else {
            continue;
        };
        let header_bound = |c: Column| {
            outcome
                .reaches(c)
                .any(|p| matches!(p, Place::To | Place::Subject))
        };
        let broken_header = [Column::Name, Column::Locale, Column::Plan, Column::Note]
            .into_iter()
            .any(|c| header_bound(c) && outcome.has_line_break(c));
        let leaks = predicted_leaks(outcomes, outcome);
        for (planted, place) in &leaks {
            tally.leaks += 1;
            let other = &outcomes[planted.target];
            match result {
                Ok(_) => prop_assert!(
                    false,
                    "line {}: `{}` of line {} planted ({:?}) in `{}`, which reaches the {:?}, yet the message passed",
                    outcome.line,
                    other.key,
                    other.line,
                    planted.form,
                    planted.column.name(),
                    place
                ),
                Err(problem) if !broken_header => {
                    let named = format!("the address of the recipient on line {}", other.line);
                    prop_assert!(
                        problem.message.contains(&named),
                        "line {}: the refusal does not name line {}: {}",
                        outcome.line,
                        other.line,
                        problem
                    );
                }
                Err(_) => {}
            }
        }
        let encoded_in_header = outcome.planted.iter().any(|p| {
            !p.form.is_visible()
                && outcomes[p.target].address_valid
                && outcomes[p.target].key != outcome.key
                && header_bound(p.column)
        });
        // A lone CR in a body used to be refused as a bare CR; render now makes it a line break.
        if leaks.is_empty() && !encoded_in_header && !broken_header {
            prop_assert!(
                result.is_ok(),
                "line {}: refused with nothing to refuse: {}",
                outcome.line,
                result
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Property 3: a line break in `name` (the `To` header) or in a column the subject renders
/// never yields a message: `recipients` refuses the row, or `prepare` does. Also checks that
/// `recipients` accepts exactly the rows it should (valid address, no line break in `name`).
fn line_breaks_never_reach_a_header(
    outcomes: &[Outcome],
    tally: &mut Tally,
) -> Result<(), TestCaseError> {
    for outcome in outcomes {
        prop_assert_eq!(
            outcome.result.is_some(),
            outcome.valid,
            "line {}: accepted by `recipients`",
            outcome.line
        );
        let in_name = outcome.has_line_break(Column::Name);
        let in_subject = outcome
            .places
            .iter()
            .any(|(c, p)| *p == Place::Subject && outcome.has_line_break(*c));
        if in_name || in_subject {
            tally.line_breaks += 1;
            prop_assert!(
                outcome.ok().is_none(),
                "line {}: a line break in {} yet a message was made",
                outcome.line,
                if in_name { "the name" } else { "the subject" }
            );
        }
    }
    Ok(())
}

// A case gives about 1.9 messages, 2.1 refused rows, 1.4 planted leaks and 0.66 line breaks
// bound for a header (4096 cases: 7,800 messages, 8,500 refused rows, 5,800 leaks, 2,700 line
// breaks; with the surroundings below, 8,200 messages). The bounds below are far under that:
// they only catch a generator that stopped exercising its property.

#[test]
fn every_message_has_one_recipient_and_no_other_recipients_address() {
    let tally = check(
        "every_message_has_one_recipient_and_no_other_recipients_address",
        case(),
        one_recipient_and_no_one_else,
    );
    assert!(tally.messages >= tally.cases, "{tally:?}");
}

#[test]
fn every_planted_leak_is_stopped_naming_the_other_rows_line() {
    let tally = check(
        "every_planted_leak_is_stopped_naming_the_other_rows_line",
        case(),
        leaks_are_stopped,
    );
    assert!(tally.leaks >= tally.cases / 2, "{tally:?}");
    assert!(tally.messages >= tally.cases / 2, "{tally:?}");
}

#[test]
fn a_line_break_bound_for_a_header_never_yields_a_message() {
    let tally = check(
        "a_line_break_bound_for_a_header_never_yields_a_message",
        case(),
        line_breaks_never_reach_a_header,
    );
    assert!(tally.line_breaks >= tally.cases / 8, "{tally:?}");
}

/// An address is cut out of running text by characters that cannot belong to it; these can,
/// for the guard's tokeniser (RFC 5322 `atext` before the `@`, any non-ASCII byte on either
/// side), yet no reader takes them as part of the address: `?email=bob@example.com`,
/// `'bob@example.com'`, `«bob@example.com»`, `bob@example.com’s`, a no-break space (French
/// typography puts one before `:`), an ellipsis or a full stop in CJK text.
const SURROUNDINGS_BEFORE: [&str; 8] = ["?email=", "'", "/", "{", "|", "«", "“", "\u{a0}"];
const SURROUNDINGS_AFTER: [&str; 7] = ["’s", "»", "”", "\u{a0}:", "…", "—", "。"];

/// Property 1 with those surroundings, in every spelling and place the generator has (the gap
/// it found is pinned down, surrounding by surrounding, in the regression below).
#[test]
fn an_address_next_to_atext_or_unicode_punctuation_is_found() {
    let tally = check(
        "an_address_next_to_atext_or_unicode_punctuation_is_found",
        case_with(&SURROUNDINGS_BEFORE, &SURROUNDINGS_AFTER),
        one_recipient_and_no_one_else,
    );
    assert!(tally.messages >= tally.cases, "{tally:?}");
}

// ---------------------------------------------------------------------------------------------
// Regressions: gaps these properties found in the guard, now closed, each as the concrete
// campaign that shows it.
// ---------------------------------------------------------------------------------------------

/// Loads a campaign built for one regression; it must load.
fn load(campaign: &Campaign) -> mailer::pipeline::Loaded {
    match mailer::pipeline::load(&campaign.write()).expect("the campaign files can be read") {
        Ok(loaded) => loaded,
        Err(problems) => panic!("the campaign does not load: {problems:?}"),
    }
}

/// The HTML part of an accepted message, as its bytes carry it (entities not decoded).
fn html_part(message: &OutgoingMessage) -> String {
    let parsed = MessageParser::default()
        .parse(&message.bytes)
        .expect("a parseable message");
    parsed
        .parts
        .iter()
        .find_map(|part| match &part.body {
            PartType::Html(html) => Some(html.to_string()),
            _ => None,
        })
        .expect("an HTML part")
}

/// Every pair of those surroundings around Ann's address, in a column the text part renders and
/// in one only the HTML part renders (where `'`, `“` and the rest come out escaped): each such
/// message is stopped, naming Ann's line and the part. The same text around an address that is
/// nobody's in the list passes: the surroundings alone are no reason to refuse.
#[test]
fn an_address_in_each_atext_or_unicode_surrounding_is_found() {
    let mut campaign = Campaign::example()
        .header(HEADER)
        .file("templates/text.hbs", "{{t \"body\"}}\n{{r.note}}\n")
        .file(
            "templates/html.hbs",
            "<p>{{t \"body\"}}</p>\n<p>{{r.plan}}</p>\n",
        )
        .row(&csv_line(&["ann@example.com", "Ann", "en", "", ""]));
    // (line, place, whether it holds Ann's address, the planted text)
    let mut expected = Vec::new();
    let mut line = 3;
    for before in SURROUNDINGS_BEFORE {
        for after in SURROUNDINGS_AFTER {
            for (address, leaks) in [("ann@example.com", true), ("stranger@example.net", false)] {
                let text = format!("{before}{address}{after}");
                for (place, plan, note) in [
                    ("text part", "", text.as_str()),
                    ("HTML part", text.as_str(), ""),
                ] {
                    let email = format!("r{line}@example.org");
                    campaign = campaign.row(&csv_line(&[&email, "", "en", plan, note]));
                    expected.push((line, place, leaks, text.clone()));
                    line += 1;
                }
            }
        }
    }
    let loaded = load(&campaign);
    assert_eq!(loaded.list.recipients.len(), expected.len() + 1);
    let ann = &loaded.list.recipients[0];
    assert!(mailer::pipeline::prepare(&loaded, ann, date()).is_ok());
    for (recipient, (line, place, leaks, text)) in loaded.list.recipients[1..].iter().zip(&expected)
    {
        assert_eq!(recipient.line, *line);
        let result = mailer::pipeline::prepare(&loaded, recipient, date());
        if *leaks {
            let problem =
                result.expect_err(&format!("line {line}: `{text}` in the {place} passed"));
            let named = format!(
                "the {place} contains `ann@example.com`, the address of the recipient on line 2"
            );
            assert!(
                problem.message.contains(&named),
                "line {line}: `{text}`: {problem}"
            );
        } else if let Err(problem) = result {
            panic!("line {line}: `{text}` in the {place} was refused: {problem}");
        }
    }
}

/// An address already escaped as an HTML entity in the data (`ann&#64;example.com`, and once
/// more, `ann&amp;#64;example.com`) comes out of the HTML template escaped again
/// (`ann&amp;#64;…`, `ann&amp;amp;#64;…`); a mail reader shows it decoded, as Ann's address.
/// The guard undoes up to three layers. The harmless row shows the premise: the template does
/// escape the entity once more, and an address that is nobody's passes.
#[test]
fn an_address_escaped_twice_in_the_html_part_is_found() {
    let campaign = Campaign::example()
        .header(HEADER)
        .file("templates/text.hbs", "{{t \"body\"}}\n")
        .file(
            "templates/html.hbs",
            "<p>{{t \"body\"}}</p>\n<p>{{r.note}}</p>\n",
        )
        .row(&csv_line(&["ann@example.com", "Ann", "en", "", ""]))
        .row(&csv_line(&[
            "bob@example.com",
            "Bob",
            "en",
            "",
            "write to ann&#64;example.com",
        ]))
        .row(&csv_line(&[
            "carl@example.com",
            "Carl",
            "en",
            "",
            "(ann&amp;#64;example.com)",
        ]))
        .row(&csv_line(&[
            "dan@example.com",
            "Dan",
            "en",
            "",
            "write to stranger&#64;example.net",
        ]));
    let loaded = load(&campaign);
    let [ann, bob, carl, dan] = &loaded.list.recipients[..] else {
        panic!("four recipients: {:?}", loaded.list.recipients.len());
    };

    let dan = mailer::pipeline::prepare(&loaded, dan, date()).expect("Dan's message passes");
    let html = html_part(&dan);
    assert!(
        html.contains("write to stranger&amp;#64;example.net"),
        "{html}"
    );
    assert!(mailer::pipeline::prepare(&loaded, ann, date()).is_ok());

    for (recipient, name) in [(bob, "Bob"), (carl, "Carl")] {
        let result = mailer::pipeline::prepare(&loaded, recipient, date());
        let problem = match result {
            Ok(message) => panic!("{name}'s message passed:\n{}", html_part(&message)),
            Err(problem) => problem,
        };
        assert!(
            problem.message.contains(
                "the HTML part contains `ann@example.com`, the address of the recipient on line 2"
            ),
            "{name}: {problem}"
        );
    }
}

/// A row `recipients` refuses (here for a line break in its name) still names a person of the
/// list: with `[safety] max_invalid` set, the others' messages must not carry that address.
#[test]
fn the_address_of_a_refused_row_is_guarded() {
    let campaign = Campaign::example()
        .header(HEADER)
        .row(&csv_line(&[
            "ann@example.com",
            "Ann\nSmith",
            "en",
            "gold",
            "",
        ]))
        .row(&csv_line(&[
            "bob@example.com",
            "Bob",
            "en",
            "shared with ann@example.com",
            "",
        ]))
        .extra("[safety]\nmax_invalid = 1\n");
    let loaded = mailer::pipeline::load(&campaign.write()).unwrap().unwrap();
    assert_eq!(loaded.list.recipients.len(), 1, "Ann's row is refused");
    let bob = &loaded.list.recipients[0];
    let result = mailer::pipeline::prepare(&loaded, bob, date());
    assert!(
        result.is_err(),
        "Bob's message carries Ann's address:\n{}",
        String::from_utf8_lossy(&result.unwrap().bytes)
    );
}
