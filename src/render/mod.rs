//! Render: one [`OutgoingMessage`] per [`Recipient`], from handlebars templates and Fluent.
//!
//! [`Renderer::load`] reads the templates and locales (the edge); after that, rendering is pure
//! and `Sync`: many threads render with one shared `Renderer`. The template context holds the
//! current recipient (`r.<column>`), its resolved `locale` and campaign-level values only —
//! never other recipients.

mod bounds;
mod dkim;
pub mod locale;
pub mod message;
pub mod template;
pub mod unsubscribe;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use lettre::message::Mailbox;
use serde_json::{Map, Value};

use crate::config::Campaign;
use crate::problem::{Problem, Problems};
use crate::recipients::{Columns, Recipient};
pub use locale::Locales;
pub use message::{Envelope, OutgoingMessage};
use template::{Part, Templates};

/// Everything needed to render any recipient's message.
pub struct Renderer {
    campaign_id: String,
    /// What Message-IDs are keyed by: the campaign id, and the schedule slot if any.
    message_key: String,
    unsubscribe: Option<Unsubscribing>,
    list_id: Option<String>,
    dkim: Option<dkim::Signer>,
    /// `[bounces]`: the return path and the key of its per-recipient tokens.
    verp: Option<(lettre::Address, crate::config::Secret)>,
    /// `[campaign] inline_css`: never loads anything (no remote stylesheets).
    inliner: Option<css_inline::CSSInliner<'static>>,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    templates: Templates,
    locales: Arc<Locales>,
    columns: Arc<Columns>,
}

impl Renderer {
    /// Keys Message-IDs to one schedule slot too: each slot of a recurring campaign is its
    /// own mailing, so its messages must not share ids with the last slot's.
    pub fn for_slot(&mut self, slot: &str) {
        if !slot.is_empty() {
            self.message_key = format!("{}/{slot}", self.campaign_id);
        }
    }

    /// Loads the campaign's templates and locales; problems are every error found in them.
    pub fn load(
        campaign: &Campaign,
        columns: Arc<Columns>,
    ) -> anyhow::Result<Result<Renderer, Problems>> {
        let locales = match Locales::load(
            &campaign.locales_dir,
            &campaign.locale_folders(),
            &campaign.default_locale,
        )? {
            Ok(locales) => Arc::new(locales),
            Err(problems) => return Ok(Err(problems)),
        };
        let names: BTreeSet<String> = (0..columns.names.len())
            .map(|index| columns.template_name(index).to_owned())
            .collect();
        let limits = template::Limits {
            // Without a readable header, the list's problems say so; every column would be missing.
            columns: (!names.is_empty()).then_some(&names),
            raw_columns: &campaign.safety.raw_html_columns,
            max_message_size: campaign.safety.max_message_size,
        };
        let templates = match Templates::load(
            &campaign.template_dir,
            &campaign.template_folders(),
            &locales,
            &limits,
        ) {
            Ok(templates) => templates,
            Err(problems) => return Ok(Err(problems)),
        };
        // The keys the campaign's features need: every one that cannot be had is listed.
        let mut missing = Vec::new();
        let file = campaign.file.as_path();
        let unsubscribe = campaign
            .unsubscribe
            .as_ref()
            .and_then(|config| needed(&mut missing, file, Unsubscribing::new(config)));
        let signer = campaign
            .dkim
            .as_ref()
            .and_then(|config| needed(&mut missing, file, dkim::Signer::load(campaign, config)));
        let verp = campaign.bounces.as_ref().and_then(|bounces| {
            let key = bounces.key().map(|key| (bounces.return_path.clone(), key));
            needed(&mut missing, file, key)
        });
        if !missing.is_empty() {
            return Ok(Err(Problems(missing)));
        }
        let mut renderer = Renderer::new(campaign, templates, locales, columns);
        renderer.unsubscribe = unsubscribe;
        renderer.verp = verp;
        renderer.dkim = signer;
        Ok(Ok(renderer))
    }

    #[must_use]
    pub fn new(
        campaign: &Campaign,
        templates: Templates,
        locales: Arc<Locales>,
        columns: Arc<Columns>,
    ) -> Renderer {
        Renderer {
            campaign_id: campaign.id.clone(),
            message_key: campaign.id.clone(),
            unsubscribe: None,
            list_id: campaign.list_id.clone(),
            dkim: None,
            verp: None,
            inliner: campaign.inline_css.then(|| {
                css_inline::CSSInliner::options()
                    .load_remote_stylesheets(false)
                    // @media rules cannot be inlined; keep them in <style> for clients that
                    // honour them (mobile layouts).
                    .keep_at_rules(true)
                    .build()
            }),
            from: campaign.from.clone(),
            reply_to: campaign.reply_to.clone(),
            templates,
            locales,
            columns,
        }
    }

    #[must_use]
    pub fn locales(&self) -> &Locales {
        &self.locales
    }

    /// The template context of one recipient.
    fn context(&self, recipient: &Recipient, locale: &str, link: Option<&str>) -> Value {
        let mut r = Map::new();
        for (index, value) in recipient.fields().enumerate() {
            r.insert(
                self.columns.template_name(index).to_owned(),
                Value::String(value.trim().to_owned()),
            );
        }
        // The normalised address is the one the message goes to; show templates the same.
        r.insert(
            "email".to_owned(),
            Value::String(recipient.address.key.to_string()),
        );
        let mut campaign = Map::new();
        campaign.insert("id".to_owned(), Value::String(self.campaign_id.clone()));
        let mut root = Map::new();
        root.insert("r".to_owned(), Value::Object(r));
        root.insert("locale".to_owned(), Value::String(locale.to_owned()));
        root.insert("campaign".to_owned(), Value::Object(campaign));
        // `{{unsubscribe_url}}`: the recipient's own one-click link, for a visible
        // "unsubscribe" in the body (empty without `[unsubscribe] url`).
        root.insert(
            "unsubscribe_url".to_owned(),
            Value::String(link.unwrap_or_default().to_owned()),
        );
        Value::Object(root)
    }

    /// Renders one recipient's message; the error says which template and why.
    pub fn render(
        &self,
        recipient: &Recipient,
        date: SystemTime,
    ) -> Result<OutgoingMessage, String> {
        self.render_keyed(recipient, date, &self.message_key)
    }

    /// The canary message to `canary`: the row's message as its recipient would get it, but
    /// addressed to the canary (envelope, `To`, `{{r.email}}`, unsubscribe link), with a
    /// Message-ID of its own.
    pub fn render_canary(
        &self,
        row: &Recipient,
        canary: &crate::recipients::NormalisedAddress,
        date: SystemTime,
    ) -> Result<OutgoingMessage, String> {
        let key = format!("{}\0canary", self.message_key);
        self.render_keyed(&row.with_address(canary.clone()), date, &key)
    }

    fn render_keyed(
        &self,
        recipient: &Recipient,
        date: SystemTime,
        message_key: &str,
    ) -> Result<OutgoingMessage, String> {
        let locale_index = self.locales.resolve(recipient.locale(&self.columns));
        let locale = self.locales.tag(locale_index);
        let link = self.unsubscribe.as_ref().and_then(|u| {
            u.url.as_ref().map(|url| {
                unsubscribe::link(
                    url,
                    u.key.expose().as_bytes(),
                    &self.campaign_id,
                    &recipient.address.key,
                )
            })
        });
        // One context for the three templates: `Handlebars::render` would copy the data each time.
        let data = handlebars::Context::from(self.context(recipient, locale, link.as_deref()));
        // What is left of `[safety] max_message_size` as the parts render.
        let mut budget = self.templates.max_message_size();
        let subject = self.templates.render(Part::Subject, &data, &mut budget)?;
        if subject.contains(['\r', '\n']) {
            return Err(
                "the rendered subject contains a line break, which would let data write headers"
                    .to_owned(),
            );
        }
        let subject = subject.trim();
        if subject.is_empty() {
            return Err("the rendered subject is empty".to_owned());
        }
        let mut html = self
            .templates
            .has_html()
            .then(|| self.templates.render(Part::Html, &data, &mut budget))
            .transpose()?;
        if let Some(depth) = html.as_deref().and_then(too_deep) {
            return Err(format!(
                "the rendered HTML nests elements {depth} deep, more than {MAX_HTML_DEPTH}: the HTML parsers that inline its CSS and make its text part take the square of that time"
            ));
        }
        if let (Some(inliner), Some(rendered)) = (&self.inliner, html.as_mut()) {
            *rendered = inliner
                .inline(rendered)
                .map_err(|e| format!("cannot inline the HTML's CSS: {e}"))?;
        }
        let text = if self.templates.has_text() {
            Some(self.templates.render(Part::Text, &data, &mut budget)?)
        } else {
            // HTML only: the text part is made from it, so that every client (and every spam
            // filter) gets one. Same words, same translation.
            html.as_deref().map(text_from_html).transpose()?
        };
        if [text.as_deref(), html.as_deref()]
            .into_iter()
            .flatten()
            .any(|part| part.contains('\0'))
        {
            return Err(
                "the rendered message contains a NUL character, which mail cannot carry".to_owned(),
            );
        }
        let message_id = message::message_id(
            message_key,
            &recipient.address.key,
            self.from.email.domain(),
        );
        let list_unsubscribe = self.unsubscribe.as_ref().map(|u| {
            (
                unsubscribe::header(link.as_deref(), u.mailto.as_ref()),
                link.is_some(),
            )
        });
        let rcpt_to = recipient.address.to_lettre();
        let to = Mailbox::new(
            recipient.name(&self.columns).map(str::to_owned),
            rcpt_to.clone(),
        );
        let bytes = message::build(&message::Content {
            from: &self.from,
            reply_to: self.reply_to.as_ref(),
            to,
            subject,
            text: text.as_deref(),
            html: html.as_deref(),
            message_id: &message_id,
            date,
            list_unsubscribe,
            list_id: self.list_id.as_deref(),
            dkim: self.dkim.as_ref(),
        })?;
        let limit = self.templates.max_message_size();
        if bytes.len() > limit {
            return Err(format!(
                "the message is {} bytes, more than `[safety] max_message_size` ({limit})",
                bytes.len()
            ));
        }
        Ok(OutgoingMessage {
            line: recipient.line,
            envelope: Envelope {
                mail_from: self.mail_from(&recipient.address.key),
                rcpt_to,
            },
            message_id,
            locale: locale.to_owned(),
            bytes,
        })
    }
}

impl Renderer {
    /// `MAIL FROM` for `address`: the sender, or with `[bounces]` the return path carrying
    /// the recipient's token (keyed by the campaign, not the slot: one token per recipient).
    fn mail_from(&self, address: &str) -> lettre::Address {
        match &self.verp {
            None => self.from.email.clone(),
            Some((return_path, key)) => crate::bounce::verp::return_path(
                return_path,
                &crate::bounce::verp::token(key.expose().as_bytes(), &self.campaign_id, address),
            ),
        }
    }
}

/// `[unsubscribe]` with its key read.
struct Unsubscribing {
    url: Option<url::Url>,
    key: crate::config::Secret,
    mailto: Option<lettre::Address>,
}

impl Unsubscribing {
    /// Reads the key from the environment variable `secret_env` names.
    fn new(config: &crate::config::Unsubscribe) -> Result<Unsubscribing, String> {
        let key = match &config.secret_env {
            Some(name) => match std::env::var(name) {
                Ok(key) if key.len() >= 16 => crate::config::Secret::new(key),
                Ok(_) => {
                    return Err(format!(
                        "the environment variable `{name}` named by [unsubscribe] secret_env holds fewer than 16 bytes: too short a key for the unsubscribe links"
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "the environment variable `{name}` named by [unsubscribe] secret_env is not set"
                    ));
                }
            },
            None => crate::config::Secret::new(String::new()),
        };
        Ok(Unsubscribing {
            url: config.url.clone(),
            key,
            mailto: config.mailto.clone(),
        })
    }
}

/// `result`'s value, or `None` with its error added to `missing` (naming `file`).
fn needed<T>(missing: &mut Vec<Problem>, file: &Path, result: Result<T, String>) -> Option<T> {
    result
        .map_err(|message| missing.push(Problem::error(file, None, message)))
        .ok()
}

/// How deep a message's HTML elements may nest. Table layouts nest a few dozen deep; the HTML
/// parsers behind `inline_css` and the text part made from HTML take the square of the depth
/// (20,000 levels: a second per message).
pub const MAX_HTML_DEPTH: usize = 256;

/// The depth `html` reaches, if more than [`MAX_HTML_DEPTH`]. An estimate from the tags alone:
/// elements that are empty (`<br>`) or whose end tag may be left out (`<p>`, `<li>`, `<td>`, …)
/// are not counted, so that sloppy but ordinary HTML is not taken for deep HTML.
fn too_deep(html: &str) -> Option<usize> {
    const FLAT: [&str; 30] = [
        "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
        "source", "track", "wbr", "p", "li", "dt", "dd", "tr", "td", "th", "option", "optgroup",
        "thead", "tbody", "tfoot", "colgroup", "caption", "rt", "rp",
    ];
    let bytes = html.as_bytes();
    let mut depth = 0usize;
    for at in memchr::memchr_iter(b'<', bytes) {
        let rest = &bytes[at + 1..];
        let (closing, rest) = match rest.first() {
            Some(b'/') => (true, &rest[1..]),
            _ => (false, rest),
        };
        let name_len = rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        if name_len == 0 || !rest[0].is_ascii_alphabetic() {
            continue;
        }
        let name = std::str::from_utf8(&rest[..name_len]).unwrap_or_default();
        if FLAT.iter().any(|flat| flat.eq_ignore_ascii_case(name)) {
            continue;
        }
        if closing {
            depth = depth.saturating_sub(1);
        } else {
            let end = memchr::memchr(b'>', rest).unwrap_or(rest.len());
            if end == 0 || rest[end - 1] != b'/' {
                depth += 1;
                if depth > MAX_HTML_DEPTH {
                    return Some(depth);
                }
            }
        }
    }
    None
}

/// Line width of a text part made from HTML: short enough to read anywhere.
const TEXT_WIDTH: usize = 76;

/// The text part of an HTML-only campaign (html2text: paragraphs, lists, links as footnotes).
/// Raw mode: layout tables become text, not box drawings; deep nesting overflows the width
/// instead of failing the recipient.
fn text_from_html(html: &str) -> Result<String, String> {
    html2text::config::plain()
        .raw_mode(true)
        .allow_width_overflow()
        .string_from_read(html.as_bytes(), TEXT_WIDTH)
        .map_err(|e| format!("cannot make the text part from the HTML: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_nested_too_deep_is_found_and_ordinary_html_is_not() {
        let nested = |n: usize| format!("{}x{}", "<div>".repeat(n), "</div>".repeat(n));
        assert_eq!(too_deep(&nested(MAX_HTML_DEPTH)), None);
        assert_eq!(
            too_deep(&nested(MAX_HTML_DEPTH + 1)),
            Some(MAX_HTML_DEPTH + 1)
        );
        // Siblings, empty elements, self-closed ones, end tags left out, comments and text.
        let flat = format!(
            "{}{}{}{}<!-- <div> --> a < b",
            "<div>x</div>".repeat(1000),
            "<br><img src=x>".repeat(1000),
            "<span/>".repeat(1000),
            "<ul><li>one<li>two</ul><p>a<p>b<table><tr><td>1<td>2</table>".repeat(1000),
        );
        assert_eq!(too_deep(&flat), None);
    }

    #[test]
    fn the_text_part_of_html_keeps_the_words_and_drops_the_markup() {
        let html = "<html><head><title>T</title><style>p { color: red }</style></head><body>\
                    <p>Bonjour <strong>Zoé</strong>,</p><p>Votre formule : Pro.</p>\
                    <p><a href=\"https://example.com/aide\">Aide</a></p></body></html>";
        let text = text_from_html(html).unwrap();
        assert!(text.contains("Bonjour"), "{text}");
        assert!(text.contains("Zoé"), "{text}");
        assert!(text.contains("Votre formule : Pro."), "{text}");
        assert!(
            text.contains("https://example.com/aide"),
            "the link survives: {text}"
        );
        assert!(!text.contains('<') && !text.contains("color"), "{text}");
        assert!(
            text.lines().all(|l| l.chars().count() <= TEXT_WIDTH),
            "{text}"
        );
    }
}
