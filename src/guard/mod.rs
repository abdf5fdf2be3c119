//! The guard: checks every final message just before any transport takes it.
//!
//! Pure. It reads the bytes that will go on the wire, not the values they were made from, so a
//! mistake anywhere upstream (template, data, config, a library) is caught here. Today it checks
//! the message's shape (invariants 1 and 4 of the brief): one recipient, the `To` header equal
//! to the envelope, no copy headers, only the headers mailer writes, CRLF-only lines of at most
//! 998 octets. The cross-recipient scan (invariant 2) belongs here too and is not built yet.

use std::fmt;

use lettre::Address;

use crate::render::OutgoingMessage;

/// The only top-level headers mailer writes. Anything else means something upstream injected
/// a header, and `Cc`, `Bcc`, `Resent-*` and `Apparently-To` are among the "anything else".
const ALLOWED_HEADERS: [&str; 9] = [
    "from",
    "reply-to",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// The longest line SMTP allows, without its CRLF (RFC 5321 §4.5.3.1.6).
const MAX_LINE: usize = 998;

/// Why a message may not leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    BareLineBreak { offset: usize },
    LineTooLong { line: usize, octets: usize },
    NoHeaderEnd,
    UnexpectedHeader(String),
    HeaderCount { name: &'static str, count: usize },
    ToIsNotOneMailbox(usize),
    ToDiffersFromEnvelope { to: String, envelope: String },
    FromDiffersFromSender { from: String, sender: String },
    Unparseable(&'static str),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::BareLineBreak { offset } => write!(f, "a bare CR or LF at byte {offset}"),
            Violation::LineTooLong { line, octets } => write!(
                f,
                "line {line} is {octets} octets long, over SMTP's {MAX_LINE}"
            ),
            Violation::NoHeaderEnd => f.write_str("the headers are not followed by an empty line"),
            Violation::UnexpectedHeader(name) => {
                write!(f, "a `{name}` header, which mailer never writes")
            }
            Violation::HeaderCount { name, count } => {
                write!(f, "{count} `{name}` headers instead of one")
            }
            Violation::ToIsNotOneMailbox(count) => {
                write!(f, "the `To` header holds {count} addresses instead of one")
            }
            Violation::ToDiffersFromEnvelope { to, envelope } => {
                write!(
                    f,
                    "the `To` header names `{to}` but the envelope goes to `{envelope}`"
                )
            }
            Violation::FromDiffersFromSender { from, sender } => {
                write!(
                    f,
                    "the `From` header names `{from}` but the campaign sends as `{sender}`"
                )
            }
            Violation::Unparseable(what) => write!(f, "the {what} cannot be parsed"),
        }
    }
}

/// Checks one final message. `sender` is the campaign's configured From address.
pub fn check(message: &OutgoingMessage, sender: &Address) -> Result<(), Vec<Violation>> {
    let mut violations = Vec::new();
    check_lines(&message.bytes, &mut violations);
    check_headers(message, sender, &mut violations);
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

fn check_lines(bytes: &[u8], violations: &mut Vec<Violation>) {
    let mut line_start = 0;
    let mut line_number = 1;
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'\r' if bytes.get(index + 1) == Some(&b'\n') => {
                let octets = index - line_start;
                if octets > MAX_LINE {
                    violations.push(Violation::LineTooLong {
                        line: line_number,
                        octets,
                    });
                }
                index += 2;
                line_start = index;
                line_number += 1;
            }
            b'\r' | b'\n' => {
                violations.push(Violation::BareLineBreak { offset: index });
                return;
            }
            _ => index += 1,
        }
    }
    if bytes.len() - line_start > MAX_LINE {
        violations.push(Violation::LineTooLong {
            line: line_number,
            octets: bytes.len() - line_start,
        });
    }
}

fn check_headers(message: &OutgoingMessage, sender: &Address, violations: &mut Vec<Violation>) {
    let Some(end) = message.bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        violations.push(Violation::NoHeaderEnd);
        return;
    };
    let head = &message.bytes[..end + 2];
    let mut to_count = 0;
    let mut from_count = 0;
    for line in head.split(|&b| b == b'\n') {
        // Continuation lines of a folded header start with white space.
        if line.is_empty() || line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        let name = line
            .iter()
            .position(|&b| b == b':')
            .map_or(line, |colon| &line[..colon]);
        let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
        match name.as_str() {
            "to" => to_count += 1,
            "from" => from_count += 1,
            known if ALLOWED_HEADERS.contains(&known) => {}
            _ => violations.push(Violation::UnexpectedHeader(name)),
        }
    }
    for (name, count) in [("To", to_count), ("From", from_count)] {
        if count != 1 {
            violations.push(Violation::HeaderCount { name, count });
        }
    }
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(&message.bytes) else {
        violations.push(Violation::Unparseable("header block"));
        return;
    };
    let to: Vec<_> = parsed.to().map(|a| a.iter().collect()).unwrap_or_default();
    match to.as_slice() {
        [only] => {
            let written = only.address().unwrap_or_default();
            if !same_address(written, &message.envelope.rcpt_to) {
                violations.push(Violation::ToDiffersFromEnvelope {
                    to: written.to_owned(),
                    envelope: message.envelope.rcpt_to.to_string(),
                });
            }
        }
        many => violations.push(Violation::ToIsNotOneMailbox(many.len())),
    }
    let from = parsed
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .unwrap_or_default();
    if !same_address(from, sender) || message.envelope.mail_from != *sender {
        violations.push(Violation::FromDiffersFromSender {
            from: from.to_owned(),
            sender: sender.to_string(),
        });
    }
}

/// Same mailbox: the local part exactly, the domain without regard to case.
fn same_address(written: &str, address: &Address) -> bool {
    match written.rsplit_once('@') {
        Some((user, domain)) => {
            user == address.user() && domain.eq_ignore_ascii_case(address.domain())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::Envelope;

    fn message(bytes: &str, rcpt: &str) -> OutgoingMessage {
        OutgoingMessage {
            line: 2,
            envelope: Envelope {
                mail_from: "ops@example.org".parse().unwrap(),
                rcpt_to: rcpt.parse().unwrap(),
            },
            message_id: "x@example.org".into(),
            locale: "en".into(),
            bytes: bytes.as_bytes().to_vec(),
        }
    }

    fn check_message(bytes: &str, rcpt: &str) -> Vec<String> {
        let sender: Address = "ops@example.org".parse().unwrap();
        match check(&message(bytes, rcpt), &sender) {
            Ok(()) => vec![],
            Err(violations) => violations.iter().map(ToString::to_string).collect(),
        }
    }

    const GOOD: &str = "From: Ops <ops@example.org>\r\nTo: \"Ann, A.\" <ann@example.com>\r\nSubject: hi\r\n\r\nbody\r\n";

    #[test]
    fn a_well_formed_message_passes() {
        assert_eq!(check_message(GOOD, "ann@example.com"), Vec::<String>::new());
        assert_eq!(check_message(GOOD, "ann@EXAMPLE.com"), Vec::<String>::new());
    }

    #[test]
    fn a_second_recipient_in_any_form_is_caught() {
        let two = GOOD.replace(
            "To: \"Ann, A.\" <ann@example.com>",
            "To: ann@example.com, bob@example.com",
        );
        assert_eq!(
            check_message(&two, "ann@example.com"),
            vec!["the `To` header holds 2 addresses instead of one"]
        );
        let cc = GOOD.replace("Subject", "Cc: bob@example.com\r\nSubject");
        assert_eq!(
            check_message(&cc, "ann@example.com"),
            vec!["a `cc` header, which mailer never writes"]
        );
        let bcc = GOOD.replace("Subject", "bcc: bob@example.com\r\nSubject");
        assert_eq!(
            check_message(&bcc, "ann@example.com"),
            vec!["a `bcc` header, which mailer never writes"]
        );
        let resent = GOOD.replace("Subject", "Resent-To: bob@example.com\r\nSubject");
        assert_eq!(
            check_message(&resent, "ann@example.com"),
            vec!["a `resent-to` header, which mailer never writes"]
        );
        let group = GOOD.replace(
            "To: \"Ann, A.\" <ann@example.com>",
            "To: friends: ann@example.com, bob@example.com;",
        );
        assert_eq!(
            check_message(&group, "ann@example.com"),
            vec!["the `To` header holds 2 addresses instead of one"]
        );
        let twice = GOOD.replace("Subject", "To: bob@example.com\r\nSubject");
        assert!(
            check_message(&twice, "ann@example.com")
                .contains(&"2 `To` headers instead of one".to_owned())
        );
    }

    #[test]
    fn to_must_match_the_envelope_and_from_the_sender() {
        assert_eq!(
            check_message(GOOD, "bob@example.com"),
            vec![
                "the `To` header names `ann@example.com` but the envelope goes to `bob@example.com`"
            ]
        );
        let spoofed = GOOD.replace("ops@example.org", "ceo@example.org");
        assert_eq!(
            check_message(&spoofed, "ann@example.com"),
            vec![
                "the `From` header names `ceo@example.org` but the campaign sends as `ops@example.org`"
            ]
        );
    }

    #[test]
    fn bare_line_breaks_and_long_lines_are_caught() {
        let bare_lf = GOOD.replace("body\r\n", "body\n.\r\nMAIL FROM:<x@evil.example>\r\n");
        assert_eq!(
            check_message(&bare_lf, "ann@example.com"),
            vec![format!("a bare CR or LF at byte {}", GOOD.len() - 2)]
        );
        let bare_cr = GOOD.replace("body", "bo\rdy");
        assert_eq!(check_message(&bare_cr, "ann@example.com").len(), 1);
        let long = GOOD.replace("body", &"x".repeat(999));
        assert_eq!(
            check_message(&long, "ann@example.com"),
            vec!["line 5 is 999 octets long, over SMTP's 998"]
        );
        let fine = GOOD.replace("body", &"x".repeat(998));
        assert_eq!(
            check_message(&fine, "ann@example.com"),
            Vec::<String>::new()
        );
    }
}
