//! Returned mail: what a bounce, a complaint or an auto-reply says, which recipient it is
//! about, and how bad it is.
//!
//! Pure. [`parse`] reads one message with mail-parser (the MIME structure) and adds the field
//! parsing mail-parser lacks: the header blocks of `message/delivery-status` (RFC 3464) and
//! `message/feedback-report` (RFC 5965), and the codes and addresses of a bounce that carries
//! only text. [`attribute`] applies the attribution order (VERP token, original Message-ID,
//! Final-Recipient) over lookups the caller gives; [`classify`] names the class. Everything
//! read is bounded: the message, the recipients of one report, each field, the text scanned.

pub mod classify;
pub mod verp;

use mail_parser::{Message, MessageParser, MimeHeaders as _, PartType};

pub use classify::{Class, Enhanced, Severity};

/// The largest returned message read; a larger one is listed, not parsed.
pub const MAX_MESSAGE: usize = 8 << 20;
/// The most recipients taken from one report.
pub const MAX_NOTICES: usize = 100;
/// The most MIME parts looked at in one message.
const MAX_PARTS: usize = 64;
/// The most characters kept of one field (a diagnostic, an address).
const MAX_FIELD: usize = 1_000;
/// The most bytes of text scanned in a bounce that carries only text.
const MAX_TEXT: usize = 64 << 10;
/// The most addresses taken from such a text.
const MAX_CANDIDATES: usize = 20;

/// What a returned message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A delivery status notification (`multipart/report; report-type=delivery-status`).
    Dsn,
    /// A complaint (an ARF feedback report).
    Complaint,
    /// A bounce in text only, as some MTAs still send.
    Text,
    /// An auto-reply (out of office, vacation): ignored.
    AutoReply,
    /// A feedback report of another type than a complaint (`not-spam`, `auth-failure`):
    /// ignored.
    OtherFeedback,
    /// A DSN that reports successes only (`delivered`, `relayed`, `expanded`): ignored.
    Success,
    /// None of these: listed, never dropped.
    Unrecognised,
}

impl Kind {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Kind::Dsn => "dsn",
            Kind::Complaint => "complaint",
            Kind::Text => "text bounce",
            Kind::AutoReply => "auto-reply",
            Kind::OtherFeedback => "feedback (not a complaint)",
            Kind::Success => "delivery success",
            Kind::Unrecognised => "unrecognised",
        }
    }

    /// Whether it says nothing about recipients, by nature.
    #[must_use]
    pub fn ignored(self) -> bool {
        matches!(self, Kind::AutoReply | Kind::OtherFeedback | Kind::Success)
    }
}

/// What a notice says happened to its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Not delivered, and the MTA has given up.
    Failed,
    /// Not delivered yet: the MTA keeps trying. Never a failure.
    Delayed,
    /// The recipient complained.
    Complaint,
}

impl Action {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Complaint => "complaint",
        }
    }
}

/// One recipient's part of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `Final-Recipient` (the address, its type taken off), or the complained-about address.
    pub recipient: Option<String>,
    /// `Original-Recipient`.
    pub original: Option<String>,
    pub action: Action,
    /// The enhanced status code (`Status`, or found in the diagnostic).
    pub status: Option<String>,
    /// `Diagnostic-Code` (its type taken off), or the text line that says why.
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
    pub class: Class,
    pub severity: Severity,
}

/// What one returned message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returned {
    pub kind: Kind,
    /// Where it was delivered to (`Delivered-To`, `X-Original-To`, `To`): the VERP address.
    pub envelope: Vec<String>,
    /// The Message-IDs of the original message (without angle brackets).
    pub message_ids: Vec<String>,
    pub notices: Vec<Notice>,
    /// Addresses found in a text bounce: each may be the recipient.
    pub candidates: Vec<String>,
    /// `Subject`, for listing.
    pub subject: String,
    /// `From`, for listing.
    pub from: String,
}

/// How a notice was tied to its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    Verp,
    MessageId,
    FinalRecipient,
    /// An address in a text bounce.
    Text,
}

impl Matched {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Matched::Verp => "verp",
            Matched::MessageId => "message-id",
            Matched::FinalRecipient => "final-recipient",
            Matched::Text => "text",
        }
    }
}

/// Cuts `text` to [`MAX_FIELD`] characters.
fn capped(text: &str) -> String {
    match text.char_indices().nth(MAX_FIELD) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

/// A header value unfolded onto one line, trimmed, capped.
fn unfold(raw: &str) -> String {
    capped(
        &raw.split(['\r', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// `rfc822; ann@example.com` → `ann@example.com` (an address type, then the address).
fn typed_address(value: &str) -> Option<String> {
    let address = value.split_once(';').map_or(value, |(_, a)| a).trim();
    let address = address.trim_start_matches('<').trim_end_matches('>').trim();
    (address.contains('@') && !address.contains(char::is_whitespace)).then(|| capped(address))
}

/// `smtp; 550 5.1.1 …` → `550 5.1.1 …`.
fn typed_text(value: &str) -> String {
    match value.split_once(';') {
        Some((kind, text)) if !kind.contains(' ') && kind.len() < 20 => text.trim().to_owned(),
        _ => value.trim().to_owned(),
    }
}

/// The fields of the header blocks in `body` (blank lines between blocks), names in lower
/// case, values unfolded. mail-parser reads each block as a header section.
fn blocks(body: &[u8]) -> Vec<Vec<(String, String)>> {
    let body = &body[..body.len().min(1 << 20)];
    let text = String::from_utf8_lossy(body);
    // Blocks are separated by lines that are empty or only white space.
    let mut chunks: Vec<String> = vec![String::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            if !chunks.last().is_some_and(String::is_empty) {
                if chunks.len() > MAX_NOTICES {
                    break;
                }
                chunks.push(String::new());
            }
        } else if let Some(chunk) = chunks.last_mut() {
            chunk.push_str(line);
            chunk.push('\n');
        }
    }
    let parser = MessageParser::new();
    chunks
        .into_iter()
        .filter(|chunk| !chunk.is_empty())
        .map(|mut block| {
            block.push('\n');
            parser
                .parse_headers(block.as_bytes())
                .map(|m| {
                    m.headers_raw()
                        .map(|(name, value)| (name.to_ascii_lowercase(), unfold(value)))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// The value of field `name` (lower case) in `block`.
fn field<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
    block
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The notices of a `message/delivery-status` body, and how many recipients it reports as
/// successes (`delivered`, `relayed`, `expanded`), which are left out.
fn delivery_status(body: &[u8]) -> (Vec<Notice>, usize) {
    let blocks = blocks(body);
    // The first block is about the message; a report without one starts with a recipient.
    let recipients = blocks
        .iter()
        .filter(|b| field(b, "final-recipient").is_some() || field(b, "action").is_some());
    let mut successes = 0;
    let notices = recipients
        .take(MAX_NOTICES)
        .filter_map(|block| {
            let action = field(block, "action")
                .unwrap_or("failed")
                .to_ascii_lowercase();
            let action = match action.split_whitespace().next().unwrap_or("") {
                "failed" => Action::Failed,
                "delayed" => Action::Delayed,
                _ => {
                    successes += 1;
                    return None;
                }
            };
            let diagnostic = field(block, "diagnostic-code").map(typed_text);
            let status = field(block, "status")
                .and_then(Enhanced::find)
                .or_else(|| diagnostic.as_deref().and_then(Enhanced::find));
            Some(notice(
                field(block, "final-recipient").and_then(typed_address),
                field(block, "original-recipient").and_then(typed_address),
                action,
                status,
                diagnostic,
                field(block, "remote-mta").map(typed_text),
            ))
        })
        .collect();
    (notices, successes)
}

/// A failure or delay notice, classified.
fn notice(
    recipient: Option<String>,
    original: Option<String>,
    action: Action,
    status: Option<Enhanced>,
    diagnostic: Option<String>,
    remote_mta: Option<String>,
) -> Notice {
    let text = diagnostic.as_deref().unwrap_or("");
    let code = classify::find_code(text);
    let class = classify::classify(code, status, text);
    let temporary = action == Action::Delayed
        || status.map_or(code.is_some_and(|c| c / 100 == 4), |s| s.class == 4);
    Notice {
        recipient,
        original,
        action,
        status: status.map(|s| s.to_string()),
        diagnostic: diagnostic.map(|d| capped(&d)),
        remote_mta: remote_mta.map(|m| capped(&m)),
        class,
        severity: classify::severity(class, temporary),
    }
}

/// The addresses of header `name` of `message`.
fn addresses(message: &Message<'_>, name: &str) -> Vec<String> {
    message
        .header_values(name)
        .flat_map(|value| match value {
            mail_parser::HeaderValue::Address(address) => address
                .iter()
                .filter_map(|a| a.address().map(capped))
                .collect::<Vec<_>>(),
            mail_parser::HeaderValue::Text(text) => typed_address(text).into_iter().collect(),
            _ => Vec::new(),
        })
        .take(MAX_CANDIDATES)
        .collect()
}

/// Whether the headers say the message was sent automatically as a reply.
fn auto_reply(message: &Message<'_>) -> bool {
    let header = |name: &str| {
        message
            .header_raw(name)
            .map(|v| v.trim().to_ascii_lowercase())
    };
    let subject = message.subject().unwrap_or("").to_lowercase();
    header("auto-submitted").is_some_and(|v| v != "no")
        || header("x-autoreply").is_some()
        || header("x-autorespond").is_some()
        || header("precedence").is_some_and(|v| v == "auto_reply")
        || [
            "out of office",
            "automatic reply",
            "auto:",
            "autoreply",
            "auto-reply",
            "vacation",
        ]
        .iter()
        .any(|s| subject.starts_with(s))
}

/// Whether a message without a report looks like a bounce (who sent it, what it is called).
fn looks_like_bounce(message: &Message<'_>) -> bool {
    let from = message
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .unwrap_or("")
        .to_ascii_lowercase();
    let subject = message.subject().unwrap_or("").to_lowercase();
    from.starts_with("mailer-daemon@")
        || from.starts_with("postmaster@")
        || message
            .header_raw("return-path")
            .is_some_and(|v| v.trim() == "<>")
        || [
            "undeliver",
            "delivery status notification",
            "mail delivery failed",
            "delivery failure",
            "returned mail",
            "failure notice",
            "non remis",
            "delivery has failed",
        ]
        .iter()
        .any(|s| subject.contains(s))
}

/// The Message-ID of the original message quoted in text (`Message-ID: <…>` on a line).
fn quoted_message_ids(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.trim_start_matches(['>', ' ']).split_once(':')?;
            name.trim().eq_ignore_ascii_case("message-id").then(|| {
                value
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .trim()
                    .to_owned()
            })
        })
        .filter(|id| id.contains('@') && id.len() <= MAX_FIELD)
        .take(4)
        .collect()
}

/// The address-like tokens of `text`, at most [`MAX_CANDIDATES`].
fn address_tokens(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for word in text.split(|c: char| c.is_whitespace() || "<>\"'(),;:[]".contains(c)) {
        let word = word.trim_matches('.');
        if let Some((local, domain)) = word.split_once('@')
            && !local.is_empty()
            && domain.contains('.')
            && word.len() <= 254
            && !found.iter().any(|f| f.eq_ignore_ascii_case(word))
        {
            found.push(word.to_owned());
            if found.len() == MAX_CANDIDATES {
                break;
            }
        }
    }
    found
}

/// A text bounce: the codes and the line that says why, the addresses, the quoted Message-ID.
fn text_bounce(text: &str, returned: &mut Returned) {
    let text = match text.char_indices().nth(MAX_TEXT) {
        Some((end, _)) => &text[..end],
        None => text,
    };
    let why = text
        .lines()
        .map(str::trim)
        .find(|line| {
            classify::find_code(line).is_some_and(|c| c >= 400) || Enhanced::find(line).is_some()
        })
        .or_else(|| {
            text.lines().map(str::trim).find(|line| {
                let line = line.to_lowercase();
                [
                    "unknown",
                    "does not exist",
                    "no such",
                    "full",
                    "quota",
                    "rejected",
                    "disabled",
                ]
                .iter()
                .any(|w| line.contains(w))
            })
        })
        .map(capped);
    let status = why.as_deref().and_then(Enhanced::find);
    let temporary = status.is_some_and(|s| s.class == 4)
        || text.to_lowercase().contains("will retry")
        || text.to_lowercase().contains("still trying");
    let action = if temporary {
        Action::Delayed
    } else {
        Action::Failed
    };
    returned
        .notices
        .push(notice(None, None, action, status, why, None));
    returned.candidates = address_tokens(text);
    returned.message_ids.extend(quoted_message_ids(text));
}

/// Reads one returned message. Never fails: what it cannot read is `Unrecognised`.
#[must_use]
pub fn parse(bytes: &[u8]) -> Returned {
    let mut returned = Returned {
        kind: Kind::Unrecognised,
        envelope: Vec::new(),
        message_ids: Vec::new(),
        notices: Vec::new(),
        candidates: Vec::new(),
        subject: String::new(),
        from: String::new(),
    };
    if bytes.len() > MAX_MESSAGE {
        return returned;
    }
    let Some(message) = MessageParser::default().parse(bytes) else {
        return returned;
    };
    returned.subject = capped(message.subject().unwrap_or(""));
    returned.from = message
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map(capped)
        .unwrap_or_default();
    for name in ["delivered-to", "x-original-to", "to"] {
        for address in addresses(&message, name) {
            if !returned.envelope.contains(&address) {
                returned.envelope.push(address);
            }
        }
    }
    let report_type = message
        .content_type()
        .filter(|t| t.ctype().eq_ignore_ascii_case("multipart"))
        .filter(|t| {
            t.subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report"))
        })
        .and_then(|t| t.attribute("report-type"))
        .map(str::to_ascii_lowercase);
    let mut feedback: Option<Vec<(String, String)>> = None;
    let mut original_to: Vec<String> = Vec::new();
    let mut saw_status = false;
    let mut successes = 0;
    for part in message.parts.iter().skip(1).take(MAX_PARTS) {
        let Some(kind) = part.content_type() else {
            continue;
        };
        let ctype = kind.ctype().to_ascii_lowercase();
        let subtype = kind.subtype().unwrap_or("").to_ascii_lowercase();
        match (ctype.as_str(), subtype.as_str()) {
            ("message", "delivery-status" | "global-delivery-status") => {
                saw_status = true;
                let room = MAX_NOTICES - returned.notices.len().min(MAX_NOTICES);
                let (notices, succeeded) = delivery_status(part.contents());
                successes += succeeded;
                returned.notices.extend(notices.into_iter().take(room));
            }
            ("message", "feedback-report") => {
                feedback = blocks(part.contents()).into_iter().next();
            }
            ("text", "rfc822-headers" | "global-headers") => {
                if let Some(headers) = MessageParser::new().parse_headers(part.contents()) {
                    returned
                        .message_ids
                        .extend(headers.message_id().map(capped));
                    original_to.extend(addresses(&headers, "to"));
                }
            }
            _ => {
                if let PartType::Message(original) = &part.body {
                    returned
                        .message_ids
                        .extend(original.message_id().map(capped));
                    original_to.extend(addresses(original, "to"));
                }
            }
        }
    }
    returned.message_ids.dedup();
    if let Some(report) = feedback.filter(|_| report_type.as_deref() == Some("feedback-report")) {
        let kind = field(&report, "feedback-type")
            .unwrap_or("")
            .to_ascii_lowercase();
        if matches!(kind.as_str(), "abuse" | "fraud" | "virus" | "other") {
            returned.kind = Kind::Complaint;
            let recipients: Vec<String> = report
                .iter()
                .filter(|(n, _)| n == "original-rcpt-to")
                .filter_map(|(_, v)| typed_address(v))
                .chain(original_to.iter().cloned())
                .take(MAX_NOTICES)
                .collect();
            let mut first = recipients.into_iter();
            let recipient = first.next();
            returned.notices.push(Notice {
                recipient,
                original: None,
                action: Action::Complaint,
                status: None,
                diagnostic: Some(format!("feedback-type: {}", capped(&kind))),
                remote_mta: field(&report, "reported-domain").map(capped),
                class: Class::Complaint,
                severity: Severity::Complaint,
            });
        } else {
            returned.kind = Kind::OtherFeedback;
        }
        return returned;
    }
    if saw_status || report_type.as_deref() == Some("delivery-status") {
        returned.kind = if returned.notices.is_empty() && successes > 0 {
            Kind::Success
        } else {
            Kind::Dsn
        };
        return returned;
    }
    if looks_like_bounce(&message) {
        returned.kind = Kind::Text;
        let text = message
            .body_text(0)
            .map(std::borrow::Cow::into_owned)
            .unwrap_or_default();
        text_bounce(&text, &mut returned);
        returned
            .candidates
            .retain(|c| !returned.envelope.iter().any(|e| e.eq_ignore_ascii_case(c)));
        return returned;
    }
    if auto_reply(&message) {
        returned.kind = Kind::AutoReply;
    }
    returned
}

/// The recipients `returned` is about, each with its notice and how it was matched. The
/// lookups give a recipient (of the caller's type) for a VERP token, an original
/// Message-ID, and an address; `token` gives the VERP token of an envelope address.
pub fn attribute<R: Clone + PartialEq>(
    returned: &Returned,
    token: impl Fn(&str) -> Option<String>,
    by_token: impl Fn(&str) -> Option<R>,
    by_message_id: impl Fn(&str) -> Option<R>,
    by_address: impl Fn(&str) -> Option<R>,
) -> Vec<(R, &Notice, Matched)> {
    let verp = returned
        .envelope
        .iter()
        .filter_map(|address| token(address))
        .find_map(|t| by_token(&t));
    let by_id = returned.message_ids.iter().find_map(|id| by_message_id(id));
    let mut found: Vec<(R, &Notice, Matched)> = Vec::new();
    let single = returned.notices.len() == 1;
    for notice in &returned.notices {
        let named = notice
            .recipient
            .iter()
            .chain(notice.original.iter())
            .find_map(|a| by_address(a));
        // The envelope and the Message-ID are one recipient's: they decide a notice that is
        // alone, or one that names that recipient.
        let attributed = match (&verp, &by_id, named) {
            (Some(v), _, named) if single || named.as_ref() == Some(v) => {
                Some((v.clone(), Matched::Verp))
            }
            (_, Some(m), named) if single || named.as_ref() == Some(m) => {
                Some((m.clone(), Matched::MessageId))
            }
            // A message of mailer's has one recipient: once its token or Message-ID says
            // whose it is, another address the report names (a forward, say) is not charged.
            (None, None, Some(named)) => Some((named, Matched::FinalRecipient)),
            (None, None, None) if single && returned.kind == Kind::Text => returned
                .candidates
                .iter()
                .find_map(|a| by_address(a))
                .map(|r| (r, Matched::Text)),
            _ => None,
        };
        if let Some((recipient, matched)) = attributed
            && !found.iter().any(|(r, _, _)| *r == recipient)
        {
            found.push((recipient, notice, matched));
        }
    }
    found
}

#[cfg(test)]
mod tests;
