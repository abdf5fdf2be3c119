//! The final message: MIME bytes plus the envelope it travels in.
//!
//! Pure. The envelope is built explicitly from the sender and the one recipient — never derived
//! from headers — and its type holds exactly one recipient address.

use std::borrow::Cow;
use std::time::SystemTime;

use lettre::Address;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox, MultiPart, SinglePart};

/// MAIL FROM and the single RCPT TO of one SMTP transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub mail_from: Address,
    pub rcpt_to: Address,
}

/// One rendered message for one recipient, ready for the guard and a transport.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// The recipient's CSV line, for reports.
    pub line: u64,
    pub envelope: Envelope,
    /// Without angle brackets: `hex@from-domain`.
    pub message_id: String,
    /// The loaded locale the message was rendered in.
    pub locale: String,
    /// RFC 5322 bytes, CRLF line endings, not dot-stuffed.
    pub bytes: Vec<u8>,
}

/// What a message is made of, before MIME.
pub struct Content<'a> {
    pub from: &'a Mailbox,
    pub reply_to: Option<&'a Mailbox>,
    pub to: Mailbox,
    pub subject: &'a str,
    pub text: Option<&'a str>,
    pub html: Option<&'a str>,
    pub message_id: &'a str,
    pub date: SystemTime,
    /// `List-Unsubscribe` (the value), and whether it offers one-click (`List-Unsubscribe-Post`).
    pub list_unsubscribe: Option<(String, bool)>,
    /// `List-Id`.
    pub list_id: Option<&'a str>,
    /// Signs the message, last, when the campaign has `[dkim]`.
    pub dkim: Option<&'a super::dkim::Signer>,
}

/// A header mailer writes whose value it has made itself (ASCII, one line, checked).
macro_rules! list_header {
    ($type:ident, $name:literal) => {
        #[derive(Clone)]
        struct $type(String);

        impl lettre::message::header::Header for $type {
            fn name() -> lettre::message::header::HeaderName {
                lettre::message::header::HeaderName::new_from_ascii_str($name)
            }

            fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
                Ok($type(s.to_owned()))
            }

            fn display(&self) -> lettre::message::header::HeaderValue {
                lettre::message::header::HeaderValue::new(Self::name(), self.0.clone())
            }
        }
    };
}

list_header!(ListUnsubscribe, "List-Unsubscribe");
list_header!(ListUnsubscribePost, "List-Unsubscribe-Post");
list_header!(ListId, "List-Id");

/// The Message-ID of (campaign, recipient): stable across runs and retries, unique per
/// recipient, on the sender's domain.
#[must_use]
pub fn message_id(campaign_id: &str, recipient_key: &str, from_domain: &str) -> String {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    hash.update(campaign_id.as_bytes());
    hash.update(&[0]);
    hash.update(recipient_key.as_bytes());
    let digest = hash.finish();
    format!("{}@{from_domain}", hex::encode(&digest.as_ref()[..16]))
}

/// The longest line SMTP carries, without its CRLF (RFC 5321 §4.5.3.1.6).
const MAX_LINE: usize = 998;

/// One text part, its line breaks made CRLF whatever they were. 7bit when it is ASCII, 8bit
/// (RFC 6152) when it is not, as long as no line is over 998 octets; quoted-printable
/// otherwise. lettre would choose quoted-printable for any line over 76 characters — most
/// paragraphs — and the guard would then decode it again: 8bit keeps the text as written, a
/// third the size of quoted-printable for non-Latin scripts. The guard checks the final bytes
/// (CRLF only, line lengths), and the SMTP transport refuses to hand an 8-bit message to a relay
/// without 8BITMIME.
fn part(content_type: ContentType, text: &str) -> SinglePart {
    // A line break from the data is a line break, whatever its spelling: lettre would turn LF
    // into CRLF but leave a lone CR, which the guard would (rightly) refuse.
    let lf = if text.contains('\r') {
        Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        Cow::Borrowed(text)
    };
    let crlf = lf.replace('\n', "\r\n");
    let fits = crlf.split("\r\n").all(|line| line.len() <= MAX_LINE);
    let body = if fits {
        let encoding = if crlf.is_ascii() {
            ContentTransferEncoding::SevenBit
        } else {
            ContentTransferEncoding::EightBit
        };
        Body::dangerous_pre_encoded(crlf.into_bytes(), encoding)
    } else {
        Body::new(lf.into_owned())
    };
    SinglePart::builder().header(content_type).body(body)
}

/// Builds the MIME message. The boundary derives from the Message-ID so output is reproducible.
pub fn build(content: &Content<'_>) -> Result<Vec<u8>, String> {
    let mut builder = lettre::Message::builder()
        .from(content.from.clone())
        .to(content.to.clone())
        .subject(content.subject)
        .date(content.date)
        .message_id(Some(format!("<{}>", content.message_id)));
    if let Some(reply_to) = content.reply_to {
        builder = builder.reply_to(reply_to.clone());
    }
    if let Some((value, one_click)) = &content.list_unsubscribe {
        builder = builder.header(ListUnsubscribe(value.clone()));
        if *one_click {
            // RFC 8058: the link takes a POST with this body; no confirmation page.
            builder = builder.header(ListUnsubscribePost("List-Unsubscribe=One-Click".to_owned()));
        }
    }
    if let Some(list_id) = content.list_id {
        builder = builder.header(ListId(list_id.to_owned()));
    }
    let boundary = format!(
        "=_{}",
        content.message_id.split('@').next().unwrap_or_default()
    );
    let message = match (content.text, content.html) {
        (Some(text), Some(html)) => builder.multipart(
            MultiPart::alternative()
                .boundary(boundary)
                .singlepart(part(ContentType::TEXT_PLAIN, text))
                .singlepart(part(ContentType::TEXT_HTML, html)),
        ),
        (Some(text), None) => builder.singlepart(part(ContentType::TEXT_PLAIN, text)),
        (None, Some(html)) => builder.singlepart(part(ContentType::TEXT_HTML, html)),
        (None, None) => return Err("the message has neither a text nor an HTML part".to_owned()),
    };
    let message = message
        .map_err(|error| format!("the message cannot be built: {error}"))?
        .formatted();
    Ok(match content.dkim {
        Some(signer) => signer.sign(&message, content.date),
        None => message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(text: &str) -> String {
        String::from_utf8(part(ContentType::TEXT_PLAIN, text).formatted()).unwrap()
    }

    #[test]
    fn parts_are_7bit_or_8bit_with_crlf_unless_a_line_is_too_long() {
        let ascii = encoded("Hello,\nworld\r\n");
        assert!(
            ascii.contains("Content-Transfer-Encoding: 7bit\r\n\r\nHello,\r\nworld\r\n"),
            "{ascii:?}"
        );
        let utf8 = encoded("Allô\rZoë");
        assert!(
            utf8.contains("Content-Transfer-Encoding: 8bit\r\n\r\nAllô\r\nZoë"),
            "{utf8:?}"
        );
        let long = encoded(&"x".repeat(999));
        assert!(
            long.contains("Content-Transfer-Encoding: quoted-printable"),
            "{long:?}"
        );
    }

    #[test]
    fn message_ids_are_stable_and_differ_per_recipient_and_campaign() {
        let a = message_id("c1", "ann@example.com", "example.org");
        assert_eq!(a, message_id("c1", "ann@example.com", "example.org"));
        assert_ne!(a, message_id("c1", "bob@example.com", "example.org"));
        assert_ne!(a, message_id("c2", "ann@example.com", "example.org"));
        assert!(a.ends_with("@example.org") && a.len() == 32 + 12, "{a}");
        // Python: hashlib.sha256(b"c1\x00ann@example.com").hexdigest()[:32]. Journals of
        // earlier runs hold these: they must not change.
        assert_eq!(a, "fbef660850cf1715bdf067f7b0c403cd@example.org");
    }
}
