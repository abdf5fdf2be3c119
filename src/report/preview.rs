//! Preview: a few messages per locale, picked, rendered and read back from their final bytes,
//! for a person to review before anything is sent.
//!
//! [`collect`] and [`show`] take the recipient list and the function that renders one
//! recipient (the same render-and-guard step a send takes) and are otherwise pure; [`decode`]
//! reads a message's final bytes the way a mail client does (mail-parser: RFC 2047 words,
//! quoted-printable, base64), so the review shows what is sent, not what the templates meant.
//! [`write`] is the edge: it writes the `.eml` files and the gallery page.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context as _;
use mail_parser::{Addr, MessageParser, PartType};

use crate::exit::{Exit, Failure};
use crate::problem::{Kind, Problem};
use crate::recipients::{Columns, Recipient, RecipientList, normalise, suppression_key};
use crate::render::{Locales, OutgoingMessage};
use crate::report::Summary;

/// Domains listed one by one in the counts; the others are added up together.
pub const TOP_DOMAINS: usize = 20;

/// Everything the gallery shows.
#[derive(Debug)]
pub struct Preview {
    /// `[campaign] id`.
    pub campaign: String,
    pub counts: Counts,
    /// One per loaded locale, in folder order.
    pub sections: Vec<Section>,
    /// The requested locales no folder serves as asked, one line each (as `check` says them).
    pub locale_requests: Vec<String>,
}

/// The campaign's rows, counted. Every row is in exactly one of `sendable`, `suppressed`,
/// `invalid` and `duplicates`; `total` is their sum.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub sendable: usize,
    pub suppressed: usize,
    pub invalid: usize,
    pub duplicates: usize,
    /// Messages per resolved locale, by tag.
    pub locales: Vec<(String, usize)>,
    /// The [`TOP_DOMAINS`] largest recipient domains, largest first.
    pub domains: Vec<(String, usize)>,
    /// The other domains: how many there are, and their messages together.
    pub other_domains: usize,
    pub other_messages: usize,
}

impl Counts {
    /// The counts of a validated campaign: `summary` holds the messages per locale and domain.
    #[must_use]
    pub fn new(summary: &Summary, suppressed: usize, invalid: usize, duplicates: usize) -> Counts {
        let sendable: usize = summary.locales.values().sum();
        let mut domains: Vec<(String, usize)> = summary
            .domains
            .iter()
            .map(|(domain, &count)| (domain.clone(), count))
            .collect();
        domains.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let others = domains.split_off(domains.len().min(TOP_DOMAINS));
        Counts {
            total: sendable + suppressed + invalid + duplicates,
            sendable,
            suppressed,
            invalid,
            duplicates,
            locales: summary
                .locales
                .iter()
                .map(|(locale, &count)| (locale.clone(), count))
                .collect(),
            domains,
            other_domains: others.len(),
            other_messages: others.iter().map(|(_, count)| count).sum(),
        }
    }

    /// Messages rendered in `locale`.
    #[must_use]
    pub fn in_locale(&self, locale: &str) -> usize {
        self.locales
            .iter()
            .find(|(tag, _)| tag == locale)
            .map_or(0, |(_, count)| *count)
    }
}

/// One loaded locale: how its messages are translated, and the samples rendered in it.
#[derive(Debug)]
pub struct Section {
    pub locale: String,
    /// The fallback chain, `fr-CA → fr → en`.
    pub chain: String,
    /// Message ids this locale does not translate itself, with the locale they are shown in.
    pub fallbacks: Vec<(String, String)>,
    /// Messages rendered in this locale, over the whole list.
    pub messages: usize,
    /// In file order.
    pub samples: Vec<Sample>,
}

/// One recipient's message, as sent and as read back.
#[derive(Debug)]
pub struct Sample {
    /// The CSV line the row starts on.
    pub line: u64,
    /// Included because `--recipient` named it.
    pub asked: bool,
    pub mail_from: String,
    pub rcpt_to: String,
    /// The header row and this row, CSV-encoded, with the fields as the templates see them
    /// (trimmed).
    pub csv: String,
    /// The final bytes, written as the `.eml` file.
    pub bytes: Vec<u8>,
    pub decoded: Decoded,
}

impl Sample {
    /// The `.eml` file's name, in its locale's folder.
    #[must_use]
    pub fn file_name(&self) -> String {
        format!("line-{:06}.eml", self.line)
    }
}

/// What a mail client shows of a message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// (name, decoded value), in the order a reader looks at them; only those present.
    pub headers: Vec<(&'static str, String)>,
    /// The text part, LF line ends.
    pub text: Option<String>,
    /// The HTML part, LF line ends.
    pub html: Option<String>,
}

/// What to preview.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The first rows of each locale, in file order.
    pub per_locale: usize,
    /// Addresses whose messages are wanted too.
    pub recipients: &'a [String],
}

/// Picks the first `per_locale` rows of each locale and the rows `request.recipients` names,
/// renders them with `render` and reads them back. An asked-for address that is not on a
/// sendable row is an error naming it and the list (exit 65), as is any problem but a row
/// `[safety] max_invalid` lets the campaign skip.
pub fn collect(
    campaign: &str,
    list: &RecipientList,
    locales: &Locales,
    counts: Counts,
    request: &Request<'_>,
    render: impl Fn(&Recipient) -> Result<OutgoingMessage, Problem>,
) -> Result<Preview, Failure> {
    let asked = asked_rows(list, request.recipients)?;
    let mut chosen: BTreeMap<usize, (OutgoingMessage, bool)> = BTreeMap::new();
    let mut per_locale: BTreeMap<String, usize> = BTreeMap::new();
    // Once every locale that has messages at all has its share, stop rendering.
    let filled = |per_locale: &BTreeMap<String, usize>| {
        per_locale.len() >= counts.locales.len()
            && per_locale.values().all(|&n| n >= request.per_locale)
    };
    if request.per_locale > 0 {
        for (index, recipient) in list.recipients.iter().enumerate() {
            if filled(&per_locale) {
                break;
            }
            let message = match render(recipient) {
                Ok(message) => message,
                // A row `[safety] max_invalid` lets the campaign skip.
                Err(problem) if problem.kind == Kind::Row => continue,
                Err(problem) => return Err(Failure::new(Exit::InvalidInput, problem.to_string())),
            };
            let count = per_locale.entry(message.locale.clone()).or_default();
            if *count < request.per_locale {
                *count += 1;
                chosen.insert(index, (message, false));
            }
        }
    }
    for index in asked {
        if let Some((_, asked)) = chosen.get_mut(&index) {
            *asked = true;
            continue;
        }
        let recipient = &list.recipients[index];
        let message = render(recipient).map_err(|problem| {
            Failure::new(
                Exit::InvalidInput,
                format!(
                    "the message to `{}` cannot be previewed: {problem}",
                    recipient.address
                ),
            )
        })?;
        chosen.insert(index, (message, true));
    }
    let mut by_locale: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for (index, (message, asked)) in chosen {
        let recipient = &list.recipients[index];
        let decoded = decode(&message.bytes).map_err(|reason| {
            Failure::new(
                Exit::InvalidInput,
                format!(
                    "{}:{}: the message cannot be read back ({reason})",
                    list.path.display(),
                    recipient.line
                ),
            )
        })?;
        by_locale
            .entry(message.locale.clone())
            .or_default()
            .push(Sample {
                line: recipient.line,
                asked,
                mail_from: message.envelope.mail_from.to_string(),
                rcpt_to: message.envelope.rcpt_to.to_string(),
                csv: csv_lines(&list.columns, recipient),
                bytes: message.bytes,
                decoded,
            });
    }
    let sections = locales
        .tags()
        .enumerate()
        .map(|(index, tag)| Section {
            locale: tag.to_owned(),
            chain: locales.chain_description(index),
            fallbacks: locales
                .fallbacks(index)
                .into_iter()
                .map(|(id, served)| (id, served.to_owned()))
                .collect(),
            messages: counts.in_locale(tag),
            samples: by_locale.remove(tag).unwrap_or_default(),
        })
        .collect();
    Ok(Preview {
        campaign: campaign.to_owned(),
        counts,
        sections,
        locale_requests: Vec::new(),
    })
}

/// The indexes in `list.recipients` of the rows the addresses name, in the order given.
fn asked_rows(list: &RecipientList, addresses: &[String]) -> Result<BTreeSet<usize>, Failure> {
    let file = list.path.display();
    let mut rows = BTreeSet::new();
    let mut errors = Vec::new();
    for raw in addresses {
        let address = match normalise(raw) {
            Ok(address) => address,
            Err(reason) => {
                errors.push(format!(
                    "`{raw}` is not a valid address ({reason}), so it is not in the recipient list `{file}`"
                ));
                continue;
            }
        };
        if let Some(index) = list.recipients.iter().position(|r| r.address == address) {
            rows.insert(index);
        } else if list.suppression.contains(&suppression_key(&address.key))
            || list.suppressed.iter().any(|r| r.address == address)
        {
            errors.push(format!(
                "`{raw}` is suppressed, so the recipient list `{file}` sends it nothing to preview"
            ));
        } else if let Some((_, line)) = list.refused.iter().find(|(a, _)| *a == address) {
            errors.push(format!(
                "`{raw}` is on line {line} of the recipient list `{file}`, which cannot be sent; see `mailer check`"
            ));
        } else if let Some(near) = list
            .recipients
            .iter()
            .find(|r| suppression_key(&r.address.key) == suppression_key(&address.key))
        {
            // Local parts are case-sensitive (RFC 5321), and the list keeps them as written.
            errors.push(format!(
                "`{raw}` is not in the recipient list `{file}`, which has `{}` (the part before the @ is compared with its case)",
                near.address
            ));
        } else {
            errors.push(format!(
                "`{raw}` is not in the recipient list `{file}`; give an address of the list"
            ));
        }
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(Failure::new(Exit::InvalidInput, errors.join("\n")))
    }
}

/// The message of the row on CSV line `line`: its headers as a mail client shows them, a blank
/// line, then its text part. A line that is not a sendable row is an error naming the file and
/// the line (exit 65).
pub fn show(
    list: &RecipientList,
    line: u64,
    render: impl Fn(&Recipient) -> Result<OutgoingMessage, Problem>,
) -> Result<String, Failure> {
    let refuse = |why: &str| {
        Failure::new(
            Exit::InvalidInput,
            format!(
                "line `{line}` of `{}` is not a sendable row: {why}",
                list.path.display()
            ),
        )
    };
    let Ok(index) = list.recipients.binary_search_by_key(&line, |r| r.line) else {
        let why = if line <= 1 {
            "it is not a recipient's row (line 1 is the header)".to_owned()
        } else if list.suppressed.iter().any(|r| r.line == line) {
            "its address is suppressed".to_owned()
        } else if let Some((_, first)) = list.duplicates.iter().find(|(l, _)| *l == line) {
            format!("it repeats the address of line {first}, which is sent once")
        } else if let Some(problem) = list.problems.0.iter().find(|p| p.line == Some(line)) {
            problem.message.clone()
        } else {
            "no row starts on that line".to_owned()
        };
        return Err(refuse(&why));
    };
    let message = render(&list.recipients[index]).map_err(|problem| refuse(&problem.message))?;
    let decoded = decode(&message.bytes)
        .map_err(|reason| refuse(&format!("its message cannot be read back ({reason})")))?;
    Ok(shown(&decoded))
}

/// Headers, a blank line, the text part: what `--show` prints.
#[must_use]
pub fn shown(decoded: &Decoded) -> String {
    let mut out = String::new();
    for (name, value) in &decoded.headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push('\n');
    }
    out.push('\n');
    match &decoded.text {
        Some(text) => {
            out.push_str(text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
        None => out.push_str("(this message has no text part)\n"),
    }
    out
}

/// Reads a message's final bytes as a mail client does.
pub fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let parsed = MessageParser::default()
        .parse(bytes)
        .ok_or_else(|| "mail-parser cannot parse it".to_owned())?;
    let mut headers = Vec::new();
    let addresses = [
        ("From", parsed.from()),
        ("To", parsed.to()),
        ("Reply-To", parsed.reply_to()),
    ];
    for (name, address) in addresses {
        if let Some(address) = address {
            let shown: Vec<String> = address.iter().map(mailbox).collect();
            headers.push((name, shown.join(", ")));
        }
    }
    if let Some(subject) = parsed.subject() {
        headers.push(("Subject", subject.to_owned()));
    }
    if let Some(date) = parsed.date() {
        headers.push(("Date", date.to_rfc822()));
    }
    if let Some(id) = parsed.message_id() {
        headers.push(("Message-ID", format!("<{id}>")));
    }
    // mailer writes these itself, in ASCII; shown as written (unfolded), as clients do.
    for name in ["List-Unsubscribe", "List-Unsubscribe-Post", "List-Id"] {
        if let Some(raw) = parsed.header_raw(name) {
            headers.push((name, unfold(raw)));
        }
    }
    let mut text = None;
    let mut html = None;
    for part in &parsed.parts {
        match &part.body {
            PartType::Text(body) if text.is_none() => text = Some(lf(body)),
            PartType::Html(body) if html.is_none() => html = Some(lf(body)),
            _ => {}
        }
    }
    Ok(Decoded {
        headers,
        text,
        html,
    })
}

/// `Name <address>`, the name quoted when it holds characters that need it, as clients show it.
fn mailbox(addr: &Addr<'_>) -> String {
    let address = addr.address().unwrap_or_default();
    match addr.name().filter(|n| !n.is_empty()) {
        None => address.to_owned(),
        Some(name)
            if name.contains([
                '(', ')', '<', '>', '[', ']', ':', ';', '@', '\\', ',', '.', '"',
            ]) =>
        {
            let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
            format!("\"{escaped}\" <{address}>")
        }
        Some(name) => format!("{name} <{address}>"),
    }
}

/// A raw header value on one line: folding removed, surrounding space trimmed.
fn unfold(raw: &str) -> String {
    raw.split(['\r', '\n'])
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn lf(text: &str) -> String {
    text.replace("\r\n", "\n")
}

/// The header row and `recipient`'s row, CSV-encoded.
fn csv_lines(columns: &Columns, recipient: &Recipient) -> String {
    let header: Vec<&str> = columns.names.iter().map(String::as_str).collect();
    let row: Vec<&str> = recipient.fields().collect();
    format!("{}\n{}", csv_line(&header), csv_line(&row))
}

fn csv_line(fields: &[&str]) -> String {
    fields
        .iter()
        .map(|field| {
            if field.contains([',', '"', '\r', '\n']) {
                format!("\"{}\"", field.replace('"', "\"\""))
            } else {
                (*field).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes each sample as `<out>/<locale>/line-NNNNNN.eml` and the gallery as
/// `<out>/index.html`. Returns a line per file written, in that order, for the user: its path,
/// and for a message, two spaces and its recipient.
pub fn write(out: &Path, preview: &Preview, gallery: &str) -> anyhow::Result<Vec<String>> {
    let mut written = Vec::new();
    for section in &preview.sections {
        if section.samples.is_empty() {
            continue;
        }
        let dir = out.join(&section.locale);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the folder `{}`", dir.display()))?;
        for sample in &section.samples {
            let file = dir.join(sample.file_name());
            std::fs::write(&file, &sample.bytes)
                .with_context(|| format!("cannot write `{}`", file.display()))?;
            written.push(format!("{}  {}", file.display(), sample.rcpt_to));
        }
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the folder `{}`", out.display()))?;
    let index = out.join("index.html");
    std::fs::write(&index, gallery)
        .with_context(|| format!("cannot write `{}`", index.display()))?;
    written.push(index.display().to_string());
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::render::Envelope;
    use crate::render::locale::Locales;

    const MESSAGE: &str = "From: Example <news@example.com>\r\n\
        To: =?utf-8?b?Wm/DqyA8Yj4mPC9iPiBDbw==?= <zoe@example.org>\r\n\
        Reply-To: support@example.com\r\n\
        Subject: =?utf-8?q?Modification_de_nos_conditions_d=E2=80=99utilisation?=\r\n\
        Date: Tue, 03 Nov 2026 10:00:00 +0000\r\n\
        Message-ID: <abc@example.com>\r\n\
        List-Unsubscribe: <https://example.com/u?t=1>,\r\n <mailto:unsubscribe@example.com>\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: multipart/alternative; boundary=\"b\"\r\n\
        \r\n\
        --b\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: quoted-printable\r\n\
        \r\n\
        Bonjour Zo=C3=AB,\r\n\
        \r\n\
        fin.\r\n\
        --b\r\n\
        Content-Type: text/html; charset=utf-8\r\n\
        Content-Transfer-Encoding: base64\r\n\
        \r\n\
        PHA+Qm9uam91ciBab8OrLDwvcD4=\r\n\
        --b--\r\n";

    #[test]
    fn decoding_undoes_every_transfer_encoding() {
        let decoded = decode(MESSAGE.as_bytes()).unwrap();
        let headers: Vec<(&str, &str)> = decoded
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .collect();
        assert_eq!(
            headers,
            [
                ("From", "Example <news@example.com>"),
                ("To", "\"Zoë <b>&</b> Co\" <zoe@example.org>"),
                ("Reply-To", "support@example.com"),
                ("Subject", "Modification de nos conditions d’utilisation"),
                ("Date", "Tue, 3 Nov 2026 10:00:00 +0000"),
                ("Message-ID", "<abc@example.com>"),
                (
                    "List-Unsubscribe",
                    "<https://example.com/u?t=1>, <mailto:unsubscribe@example.com>"
                ),
            ]
        );
        assert_eq!(decoded.text.as_deref(), Some("Bonjour Zoë,\n\nfin."));
        assert_eq!(decoded.html.as_deref(), Some("<p>Bonjour Zoë,</p>"));
    }

    #[test]
    fn show_prints_the_headers_a_blank_line_and_the_text() {
        let shown = shown(&decode(MESSAGE.as_bytes()).unwrap());
        assert!(
            shown.starts_with("From: Example <news@example.com>\nTo: "),
            "{shown}"
        );
        assert!(
            shown.ends_with("<mailto:unsubscribe@example.com>\n\nBonjour Zoë,\n\nfin.\n"),
            "{shown}"
        );
    }

    fn list(csv: &str, suppressed: &[&str]) -> RecipientList {
        let suppressed: HashSet<String> = suppressed.iter().map(|s| (*s).to_owned()).collect();
        let mut list =
            crate::recipients::parse_reader(Path::new("people.csv"), csv.as_bytes(), &suppressed);
        list.suppression = suppressed;
        list
    }

    fn locales() -> Locales {
        let sources = [("en", "hi = Hi\nbye = Bye\n"), ("fr", "hi = Salut\n")]
            .iter()
            .map(|(tag, text)| {
                (
                    tag.parse().unwrap(),
                    vec![(
                        std::path::PathBuf::from(format!("{tag}/main.ftl")),
                        (*text).to_owned(),
                    )],
                )
            })
            .collect();
        Locales::from_sources(Path::new("locales"), sources, &"en".parse().unwrap()).unwrap()
    }

    /// A stand-in for the renderer: a minimal message in the row's `locale` column.
    fn render(list: &RecipientList) -> impl Fn(&Recipient) -> Result<OutgoingMessage, Problem> {
        let columns = std::sync::Arc::clone(&list.columns);
        move |r: &Recipient| {
            let locale = r.locale(&columns).unwrap_or("en").to_owned();
            if locale == "xx" {
                return Err(Problem::row(Path::new("people.csv"), r.line, "no xx"));
            }
            let bytes = format!(
                "From: news@example.com\r\nTo: {}\r\nSubject: line {}\r\n\r\nbody\r\n",
                r.address, r.line
            );
            Ok(OutgoingMessage {
                line: r.line,
                envelope: Envelope {
                    mail_from: "news@example.com".parse().unwrap(),
                    rcpt_to: r.address.to_lettre(),
                },
                message_id: format!("{}@example.com", r.line),
                locale,
                bytes: bytes.into_bytes(),
            })
        }
    }

    const PEOPLE: &str = "email,name,locale\n\
        a@example.com,A,en\n\
        b@example.com,\"B, \"\"the\"\" second\",fr\n\
        c@example.com,C,en\n\
        d@example.com,D,en\n\
        e@example.com,E,xx\n\
        f@example.com,F,en\n";

    fn counts(list: &RecipientList) -> Counts {
        let mut summary = Summary::default();
        for r in &list.recipients {
            let locale = r.locale(&list.columns).unwrap_or("en");
            if locale != "xx" {
                summary.count_message(locale, r.address.domain());
            }
        }
        Counts::new(&summary, list.suppressed.len(), 1, list.duplicates.len())
    }

    /// Lines of the samples of each section.
    fn lines(preview: &Preview) -> Vec<(String, Vec<(u64, bool)>)> {
        preview
            .sections
            .iter()
            .map(|s| {
                let lines = s.samples.iter().map(|x| (x.line, x.asked)).collect();
                (s.locale.clone(), lines)
            })
            .collect()
    }

    #[test]
    fn the_first_rows_of_each_locale_and_the_asked_ones_are_picked() {
        let list = list(PEOPLE, &["c@example.com"]);
        let asked = ["F@EXAMPLE.COM".to_owned()];
        let request = Request {
            per_locale: 2,
            recipients: &["a@Example.com".to_owned(), "f@example.com".to_owned()],
        };
        let preview = collect(
            "c",
            &list,
            &locales(),
            counts(&list),
            &request,
            render(&list),
        )
        .unwrap();
        // c is suppressed, e fails to render (skipped), f is only there because it was asked for.
        assert_eq!(
            lines(&preview),
            [
                ("en".to_owned(), vec![(2, true), (5, false), (7, true)]),
                ("fr".to_owned(), vec![(3, false)]),
            ]
        );
        let en = &preview.sections[0];
        assert_eq!((en.messages, en.fallbacks.len()), (3, 0));
        let fr = &preview.sections[1];
        assert_eq!(fr.fallbacks, [("bye".to_owned(), "en".to_owned())]);
        assert_eq!(fr.chain, "fr → en");
        assert_eq!(
            fr.samples[0].csv,
            "email,name,locale\nb@example.com,\"B, \"\"the\"\" second\",fr"
        );
        assert_eq!(
            fr.samples[0].decoded.headers[2],
            ("Subject", "line 3".to_owned())
        );
        let counts = &preview.counts;
        assert_eq!(
            (
                counts.total,
                counts.sendable,
                counts.suppressed,
                counts.invalid
            ),
            (6, 4, 1, 1)
        );

        // The local part keeps its case: `F@…` is not `f@…`.
        let request = Request {
            per_locale: 1,
            recipients: &asked,
        };
        let error = collect(
            "c",
            &list,
            &locales(),
            counts.clone(),
            &request,
            render(&list),
        )
        .unwrap_err();
        assert_eq!(error.exit, Exit::InvalidInput);
        assert_eq!(
            error.message,
            "`F@EXAMPLE.COM` is not in the recipient list `people.csv`, which has `f@example.com` (the part before the @ is compared with its case)"
        );
    }

    #[test]
    fn suppressed_and_unsendable_addresses_are_refused_by_name() {
        let list = list(PEOPLE, &["c@example.com"]);
        for (address, expected) in [
            ("c@example.com", "`c@example.com` is suppressed"),
            (
                "e@example.com",
                "the message to `e@example.com` cannot be previewed",
            ),
            ("nobody", "`nobody` is not a valid address"),
            (
                "zed@example.com",
                "`zed@example.com` is not in the recipient list `people.csv`; give an address",
            ),
        ] {
            let request = Request {
                per_locale: 1,
                recipients: &[address.to_owned()],
            };
            let error = collect(
                "c",
                &list,
                &locales(),
                counts(&list),
                &request,
                render(&list),
            )
            .unwrap_err();
            assert!(error.message.starts_with(expected), "{}", error.message);
            assert!(error.message.contains("people.csv"), "{}", error.message);
        }
    }

    #[test]
    fn show_names_the_file_and_line_of_a_row_it_cannot_show() {
        let list = list(
            &format!("{PEOPLE}a@example.com,A again,en\n"),
            &["c@example.com"],
        );
        let shown = show(&list, 3, render(&list)).unwrap();
        assert!(shown.contains("Subject: line 3\n\nbody\n"), "{shown}");
        for (line, why) in [
            (1, "line 1 is the header"),
            (4, "suppressed"),
            (6, "no xx"),
            (8, "repeats the address of line 2"),
            (99, "no row starts on that line"),
        ] {
            let error = show(&list, line, render(&list)).unwrap_err();
            assert!(
                error.message.starts_with(&format!(
                    "line `{line}` of `people.csv` is not a sendable row: "
                )),
                "{}",
                error.message
            );
            assert!(error.message.contains(why), "{}", error.message);
        }
    }

    #[test]
    fn the_largest_domains_are_listed_and_the_rest_added_up() {
        let mut summary = Summary::default();
        for domain in 0..25 {
            for _ in 0..=domain {
                summary.count_message("en", &format!("d{domain}.example"));
            }
        }
        let counts = Counts::new(&summary, 2, 3, 4);
        assert_eq!(counts.domains.len(), TOP_DOMAINS);
        assert_eq!(counts.domains[0], ("d24.example".to_owned(), 25));
        assert_eq!((counts.other_domains, counts.other_messages), (5, 15));
        assert_eq!(counts.sendable, 325);
        assert_eq!(counts.total, 325 + 2 + 3 + 4);
    }
}
