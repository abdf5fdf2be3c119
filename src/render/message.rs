//! The final message: MIME bytes plus the envelope it travels in.
//!
//! Pure. The envelope is built explicitly from the sender and the one recipient — never derived
//! from headers — and its type holds exactly one recipient address.

use std::time::SystemTime;

use lettre::Address;
use lettre::message::{Mailbox, MultiPart, SinglePart, header::ContentType};
use sha2::{Digest, Sha256};

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
}

/// The Message-ID of (campaign, recipient): stable across runs and retries, unique per
/// recipient, on the sender's domain.
#[must_use]
pub fn message_id(campaign_id: &str, recipient_key: &str, from_domain: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(campaign_id.as_bytes());
    hash.update([0]);
    hash.update(recipient_key.as_bytes());
    let digest = hash.finalize();
    format!("{}@{from_domain}", hex::encode(&digest[..16]))
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
    let boundary = format!(
        "=_{}",
        content.message_id.split('@').next().unwrap_or_default()
    );
    let message = match (content.text, content.html) {
        (Some(text), Some(html)) => builder.multipart(
            MultiPart::alternative()
                .boundary(boundary)
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_PLAIN)
                        .body(text.to_owned()),
                )
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(html.to_owned()),
                ),
        ),
        (Some(text), None) => builder.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .body(text.to_owned()),
        ),
        (None, Some(html)) => builder.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_HTML)
                .body(html.to_owned()),
        ),
        (None, None) => return Err("the message has neither a text nor an HTML part".to_owned()),
    };
    message
        .map(|m| m.formatted())
        .map_err(|error| format!("the message cannot be built: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_and_differ_per_recipient_and_campaign() {
        let a = message_id("c1", "ann@example.com", "example.org");
        assert_eq!(a, message_id("c1", "ann@example.com", "example.org"));
        assert_ne!(a, message_id("c1", "bob@example.com", "example.org"));
        assert_ne!(a, message_id("c2", "ann@example.com", "example.org"));
        assert!(a.ends_with("@example.org") && a.len() == 32 + 12, "{a}");
    }
}
