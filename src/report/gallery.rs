//! The preview gallery: one self-contained HTML page showing a [`Preview`].
//!
//! Pure: [`page`] takes the preview and returns the page. The page loads nothing: one inline
//! `<style>`, no scripts, fonts or images, and a Content-Security-Policy that forbids any fetch
//! (srcdoc frames inherit it, so a message's own remote images stay unloaded too). Everything
//! that comes from a message or the recipient list is HTML-escaped; each HTML part is shown in
//! a sandboxed frame that may not run scripts.

use super::preview::{Counts, Preview, Sample, Section};

/// Forbids every fetch; only the inline style block and `data:` images are allowed.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:";

const STYLE: &str = "\
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #e9edf2; color: #1c2530; font: 15px/1.45 system-ui, -apple-system, \"Segoe UI\", Roboto, \"DejaVu Sans\", sans-serif; }
main { max-width: 70rem; margin: 0 auto; padding: 1.5rem 1rem 3rem; }
header { margin-bottom: 1rem; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; }
h2 { font-size: 1.3rem; margin: 0 0 .4rem; }
h3 { font-size: 1.05rem; margin: 0 0 .5rem; overflow-wrap: anywhere; }
h4 { font-size: .78rem; text-transform: uppercase; letter-spacing: .05em; color: #566373; margin: 1rem 0 .35rem; }
nav ul { list-style: none; margin: .6rem 0 0; padding: 0; display: flex; flex-wrap: wrap; gap: .4rem; }
nav a { display: inline-block; padding: .15rem .65rem; border-radius: 1rem; background: #d3deec; color: #1b3d6d; text-decoration: none; }
section { background: #fff; border: 1px solid #cfd7e1; border-radius: 8px; padding: 1rem 1.25rem 1.25rem; margin: 1.25rem 0; }
.note { color: #566373; margin: .2rem 0 .6rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(17rem, 1fr)); gap: 1rem 2rem; align-items: start; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: .22rem .5rem; border-bottom: 1px solid #e8ecf1; }
th { white-space: nowrap; color: #3f4b59; font-weight: 600; width: 1%; }
td { overflow-wrap: anywhere; }
td.n { text-align: right; font-variant-numeric: tabular-nums; width: 1%; white-space: nowrap; }
tr.total th, tr.total td { border-top: 2px solid #b8c3d0; }
article { border-top: 4px solid #3a6db5; margin-top: 1.4rem; padding-top: .8rem; }
article.asked { border-top-color: #d49a00; }
.badge { display: inline-block; background: #ffe9a8; color: #5c4300; border-radius: 1rem; padding: 0 .55rem; font-size: .8rem; font-weight: 600; vertical-align: middle; }
pre { margin: 0; padding: .6rem .8rem; background: #f4f6f9; border: 1px solid #dde3ea; border-radius: 6px; white-space: pre-wrap; overflow-wrap: anywhere; font: 13px/1.45 ui-monospace, \"DejaVu Sans Mono\", monospace; }
code { font-family: ui-monospace, \"DejaVu Sans Mono\", monospace; font-size: .92em; }
iframe { display: block; width: 100%; height: 30rem; border: 1px solid #c3ccd7; border-radius: 6px; background: #fff; }
a { color: #1b4f9c; }
";

/// The gallery page of `preview`.
#[must_use]
pub fn page(preview: &Preview) -> String {
    let mut page = Page::default();
    page.raw("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n")
        .raw("<meta http-equiv=\"Content-Security-Policy\" content=\"")
        .text(CONTENT_SECURITY_POLICY)
        .raw("\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n")
        .raw("<title>Preview of ")
        .text(&preview.campaign)
        .raw("</title>\n<style>\n")
        .raw(STYLE)
        .raw("</style>\n</head>\n<body>\n<main>\n<header>\n<h1>Preview of <code>")
        .text(&preview.campaign)
        .raw("</code></h1>\n<p class=\"note\">")
        .raw("Each message is shown as it is sent: headers and parts are read back from its final bytes.")
        .raw("</p>\n<nav><ul>\n<li><a href=\"#summary\">Summary</a></li>\n");
    for section in &preview.sections {
        page.raw("<li><a href=\"#")
            .text(&anchor(&section.locale))
            .raw("\">")
            .text(&section.locale)
            .raw(" (")
            .number(section.messages)
            .raw(")</a></li>\n");
    }
    page.raw("</ul></nav>\n</header>\n");
    summary(
        &mut page,
        &preview.counts,
        &preview.sections,
        &preview.locale_requests,
    );
    for section in &preview.sections {
        locale(&mut page, section);
    }
    page.raw("</main>\n</body>\n</html>\n");
    page.0
}

/// The id of a locale's section: `locale-fr-CA`.
#[must_use]
pub fn anchor(locale: &str) -> String {
    format!("locale-{locale}")
}

fn summary(page: &mut Page, counts: &Counts, sections: &[Section], locale_requests: &[String]) {
    page.raw("<section id=\"summary\">\n<h2>Summary</h2>\n<div class=\"grid\">\n<div>\n<h4>Rows</h4>\n<table class=\"counts\">\n");
    for (label, count) in [
        ("To send", counts.sendable),
        ("Suppressed", counts.suppressed),
        ("Invalid rows", counts.invalid),
        ("Duplicate rows", counts.duplicates),
    ] {
        row(page, label, count, "");
    }
    row(page, "Total rows", counts.total, " class=\"total\"");
    page.raw("</table>\n</div>\n<div>\n<h4>By locale</h4>\n<table class=\"counts\">\n");
    for (locale, count) in &counts.locales {
        let linked = sections.iter().any(|s| &s.locale == locale);
        page.raw("<tr><th>");
        if linked {
            page.raw("<a href=\"#")
                .text(&anchor(locale))
                .raw("\">")
                .text(locale)
                .raw("</a>");
        } else {
            page.text(locale);
        }
        page.raw("</th><td class=\"n\">")
            .number(*count)
            .raw("</td></tr>\n");
    }
    page.raw("</table>\n</div>\n<div>\n<h4>By domain</h4>\n<table class=\"counts\">\n");
    for (domain, count) in &counts.domains {
        row(page, domain, *count, "");
    }
    if counts.other_domains > 0 {
        let label = format!(
            "other ({} domain{})",
            counts.other_domains,
            if counts.other_domains == 1 { "" } else { "s" }
        );
        row(page, &label, counts.other_messages, "");
    }
    page.raw("</table>\n</div>\n</div>\n");
    if !locale_requests.is_empty() {
        page.raw("<h4>Locales not served as asked</h4>\n<ul class=\"requests\">\n");
        for line in locale_requests {
            page.raw("<li>").text(line).raw("</li>\n");
        }
        page.raw("</ul>\n");
    }
    page.raw("</section>\n");
}

fn row(page: &mut Page, label: &str, count: usize, attributes: &str) {
    page.raw("<tr")
        .raw(attributes)
        .raw("><th>")
        .text(label)
        .raw("</th><td class=\"n\">")
        .number(count)
        .raw("</td></tr>\n");
}

fn locale(page: &mut Page, section: &Section) {
    page.raw("<section class=\"locale\" id=\"")
        .text(&anchor(&section.locale))
        .raw("\">\n<h2>")
        .text(&section.locale)
        .raw("</h2>\n<p class=\"note\">")
        .number(section.messages)
        .raw(if section.messages == 1 {
            " message"
        } else {
            " messages"
        })
        .raw(" in this locale · fallback chain: ")
        .text(&section.chain)
        .raw("</p>\n");
    if section.fallbacks.is_empty() {
        page.raw(
            "<p class=\"note\">Every message id of the default locale is translated in <code>",
        )
        .text(&section.locale)
        .raw("</code>.</p>\n");
    } else {
        page.raw("<h4>Not translated in this locale</h4>\n<table>\n<tr><th>Message id</th><td><strong>shown in</strong></td></tr>\n");
        for (id, served) in &section.fallbacks {
            page.raw("<tr><th><code>")
                .text(id)
                .raw("</code></th><td>")
                .text(served)
                .raw("</td></tr>\n");
        }
        page.raw("</table>\n");
    }
    if section.samples.is_empty() {
        page.raw("<p class=\"note\">No recipient's message is in this locale.</p>\n");
    }
    for sample in &section.samples {
        message(page, &section.locale, sample);
    }
    page.raw("</section>\n");
}

fn message(page: &mut Page, locale: &str, sample: &Sample) {
    let file = format!("{locale}/{}", sample.file_name());
    page.raw("<article")
        .raw(if sample.asked { " class=\"asked\"" } else { "" })
        .raw(" id=\"line-")
        .number_u64(sample.line)
        .raw("\">\n<h3>Line ")
        .number_u64(sample.line)
        .raw(" · <code>")
        .text(&sample.rcpt_to)
        .raw("</code>");
    if sample.asked {
        page.raw(" <span class=\"badge\">asked for</span>");
    }
    page.raw("</h3>\n<p class=\"note\"><a href=\"")
        .text(&file)
        .raw("\">")
        .text(&file)
        .raw(
            "</a></p>\n<div class=\"grid\">\n<div>\n<h4>Headers</h4>\n<table class=\"headers\">\n",
        );
    for (name, value) in &sample.decoded.headers {
        page.raw("<tr><th>")
            .text(name)
            .raw("</th><td>")
            .text(value)
            .raw("</td></tr>\n");
    }
    page.raw("</table>\n</div>\n<div>\n<h4>Envelope</h4>\n<table class=\"envelope\">\n<tr><th>MAIL FROM</th><td>")
        .text(&sample.mail_from)
        .raw("</td></tr>\n<tr><th>RCPT TO</th><td>")
        .text(&sample.rcpt_to)
        .raw("</td></tr>\n</table>\n<h4>CSV line ")
        .number_u64(sample.line)
        .raw("</h4>\n<pre class=\"csv\">")
        .text(&sample.csv)
        .raw("</pre>\n</div>\n</div>\n");
    if let Some(text) = &sample.decoded.text {
        page.raw("<h4>Text part</h4>\n<pre class=\"text\">")
            .text(text)
            .raw("</pre>\n");
    }
    if let Some(html) = &sample.decoded.html {
        // `sandbox` with no permissions: no scripts, no forms, no navigation of this page.
        page.raw("<h4>HTML part</h4>\n<iframe sandbox referrerpolicy=\"no-referrer\" title=\"HTML part of line ")
            .number_u64(sample.line)
            .raw("\" srcdoc=\"")
            .text(html)
            .raw("\"></iframe>\n");
    }
    page.raw("</article>\n");
}

/// The page being written: markup as is, everything else escaped.
#[derive(Default)]
struct Page(String);

impl Page {
    /// Markup of this module's own.
    fn raw(&mut self, markup: &str) -> &mut Self {
        self.0.push_str(markup);
        self
    }

    /// Text from the campaign, escaped for an element's content or a double-quoted attribute.
    fn text(&mut self, text: &str) -> &mut Self {
        escape_into(&mut self.0, text);
        self
    }

    fn number(&mut self, number: usize) -> &mut Self {
        self.0.push_str(&number.to_string());
        self
    }

    fn number_u64(&mut self, number: u64) -> &mut Self {
        self.0.push_str(&number.to_string());
        self
    }
}

/// Escapes the five characters that mean something in HTML content and attribute values.
fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::preview::Decoded;

    const HOSTILE_NAME: &str = "Zoë <b>&</b> \"JE\" O'Hara";
    const HOSTILE_HTML: &str = "<html><body><p>Hello Zo&euml; &lt;b&gt;</p>\
        <img src=\"https://tracker.example/pixel.png\"><script>alert(1)</script>\
        <a href=\"https://example.com/\" onclick='x()'>link</a>\"></iframe><script>alert(2)</script></body></html>";

    fn sample(line: u64, asked: bool) -> Sample {
        Sample {
            line,
            asked,
            mail_from: "news@example.com".to_owned(),
            rcpt_to: "zoe@example.org".to_owned(),
            csv: format!(
                "email,name\nzoe@example.org,\"{}\"",
                HOSTILE_NAME.replace('"', "\"\"")
            ),
            bytes: Vec::new(),
            decoded: Decoded {
                headers: vec![
                    ("From", "Example <news@example.com>".to_owned()),
                    ("To", format!("\"{HOSTILE_NAME}\" <zoe@example.org>")),
                    ("Subject", "Tarif <script>".to_owned()),
                    (
                        "List-Unsubscribe",
                        "<https://example.com/u?a=1&b=2>".to_owned(),
                    ),
                ],
                text: Some(format!("Hello {HOSTILE_NAME},\nhttps://example.com/help\n")),
                html: Some(HOSTILE_HTML.to_owned()),
            },
        }
    }

    fn preview() -> Preview {
        let section = |locale: &str, samples: Vec<Sample>| Section {
            locale: locale.to_owned(),
            chain: format!("{locale} → en"),
            fallbacks: vec![("footer".to_owned(), "en".to_owned())],
            messages: samples.len(),
            samples,
        };
        Preview {
            campaign: "terms-<2026>".to_owned(),
            counts: Counts {
                total: 9,
                sendable: 3,
                suppressed: 2,
                invalid: 1,
                duplicates: 3,
                locales: vec![("de".to_owned(), 2), ("fr-CA".to_owned(), 1)],
                domains: vec![("example.org".to_owned(), 3)],
                other_domains: 4,
                other_messages: 7,
            },
            sections: vec![
                section("de", vec![sample(2, false), sample(5, true)]),
                section("en", vec![]),
                section("fr-CA", vec![sample(3, false)]),
            ],
            locale_requests: vec![
                "2 recipients asked for `pt-BR`; they get `pt-PT`, the nearest locale folder"
                    .to_owned(),
                "1 recipient asked for `<i>x</i>`; no locale folder serves it, so they get `en`"
                    .to_owned(),
            ],
        }
    }

    /// The page with every srcdoc attribute's value left out.
    fn outside_srcdoc(page: &str) -> String {
        let mut rest = page;
        let mut kept = String::new();
        while let Some(start) = rest.find("srcdoc=\"") {
            kept.push_str(&rest[..start]);
            let value = &rest[start + "srcdoc=\"".len()..];
            let end = value.find('"').expect("a closed srcdoc attribute");
            rest = &value[end + 1..];
        }
        kept.push_str(rest);
        kept
    }

    fn check(escaped: &str, expected: &str) {
        let mut out = String::new();
        escape_into(&mut out, escaped);
        assert_eq!(out, expected);
    }

    #[test]
    fn the_five_special_characters_are_escaped() {
        check(
            "<b>&</b> \"q\" 'a'",
            "&lt;b&gt;&amp;&lt;/b&gt; &quot;q&quot; &#39;a&#39;",
        );
        check("Zoë, Ольга", "Zoë, Ольга");
    }

    #[test]
    fn nothing_from_a_message_reaches_the_page_unescaped() {
        let page = page(&preview());
        assert!(!page.contains("<b>&</b>"), "{page}");
        assert!(!page.contains("Tarif <script>"), "{page}");
        assert!(page.contains("Zoë &lt;b&gt;&amp;&lt;/b&gt; &quot;JE&quot; O&#39;Hara"));
        assert!(page.contains("<title>Preview of terms-&lt;2026&gt;</title>"));
        // The only scripts and images are the message's own, inside the escaped srcdoc.
        let outside = outside_srcdoc(&page);
        for forbidden in [
            "<script",
            "<link",
            "<img",
            " src=",
            "url(",
            "@import",
            "href=\"http",
        ] {
            assert!(!outside.contains(forbidden), "{forbidden} in {outside}");
        }
        // The HTML part is there whole, escaped once, so the frame shows what the message holds.
        let mut escaped = String::new();
        escape_into(&mut escaped, HOSTILE_HTML);
        assert_eq!(page.matches(&format!("srcdoc=\"{escaped}\"")).count(), 3);
        assert!(!escaped.contains(['"', '<']));
    }

    #[test]
    fn the_page_fetches_nothing_and_frames_run_no_scripts() {
        let page = page(&preview());
        assert!(page.contains(
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src &#39;none&#39;; style-src &#39;unsafe-inline&#39;; img-src data:\">"
        ));
        assert!(page.contains("<meta name=\"viewport\""));
        assert_eq!(page.matches("<style>").count(), 1);
        assert_eq!(page.matches("<iframe sandbox ").count(), 3);
        assert!(!page.contains("allow-"), "no sandbox permission is granted");
    }

    #[test]
    fn one_section_per_locale_with_its_samples_and_fallbacks() {
        let page = page(&preview());
        assert_eq!(page.matches("<section class=\"locale\"").count(), 3);
        let de = page.find("id=\"locale-de\"").unwrap();
        let en = page.find("id=\"locale-en\"").unwrap();
        let fr_ca = page.find("id=\"locale-fr-CA\"").unwrap();
        assert!(de < en && en < fr_ca);
        assert_eq!(page[de..en].matches("<article").count(), 2);
        assert_eq!(page[de..en].matches("asked for").count(), 1);
        assert!(page[de..en].contains("<a href=\"de/line-000005.eml\">"));
        assert!(page[en..fr_ca].contains("No recipient's message is in this locale."));
        assert!(page[fr_ca..].contains("fallback chain: fr-CA → en"));
        assert!(page[fr_ca..].contains("<tr><th><code>footer</code></th><td>en</td></tr>"));
        assert!(
            page.contains("<tr class=\"total\"><th>Total rows</th><td class=\"n\">9</td></tr>")
        );
        assert!(page.contains("<tr><th>other (4 domains)</th><td class=\"n\">7</td></tr>"));
        let summary = &page[page.find("id=\"summary\"").unwrap()..de];
        assert!(summary.contains(
            "<h4>Locales not served as asked</h4>\n<ul class=\"requests\">\n<li>2 recipients asked for `pt-BR`; they get `pt-PT`, the nearest locale folder</li>\n<li>1 recipient asked for `&lt;i&gt;x&lt;/i&gt;`;"
        ), "{summary}");
        assert!(
            page.contains("<th><a href=\"#locale-fr-CA\">fr-CA</a></th><td class=\"n\">1</td>")
        );
    }
}
