//! The guard: checks every final message just before any transport takes it.
//!
//! Pure. It reads the bytes that will go on the wire, not the values they were made from, so a
//! mistake anywhere upstream (template, data, config, a library) is caught here. It checks the
//! message's shape (invariants 1 and 4 of the brief): one recipient, the `To` header equal to
//! the envelope, no copy headers, only the headers mailer writes, CRLF-only lines of at most 998
//! octets; and its content (invariant 2): no address of another recipient anywhere in the
//! decoded headers, subject, text or HTML, in plain, percent- or entity-encoded form.

pub mod scan;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use lettre::Address;
use mail_parser::{Message, MessageParser, PartType};

use crate::render::OutgoingMessage;

/// A 64-bit fingerprint of a normalised, lower-cased address. The directory keeps these rather
/// than the strings: 16 bytes an entry for a million recipients, and a probe per token. Two
/// different addresses sharing a fingerprint would at worst stop a message that was fine.
fn fingerprint(address: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    address.hash(&mut hasher);
    hasher.finish()
}

/// The lower-cased form the scanner produces, for an address as normalised by `recipients`.
fn lower(key: &str) -> String {
    key.to_lowercase()
}

/// Fingerprints are already well mixed; hashing them again would only cost time.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type FingerprintMap<V> = HashMap<u64, V, BuildHasherDefault<Identity>>;

/// What the guard checks messages against: the sender, every recipient of the campaign (with
/// its CSV line, to name it), and the addresses any message may contain.
pub struct Rules {
    sender: Address,
    /// `[bounces] return_path`: `MAIL FROM` may be it with a token (`local+TOKEN@domain`).
    return_path: Option<Address>,
    recipients: FingerprintMap<u64>,
    allowed: HashSet<u64, BuildHasherDefault<Identity>>,
}

impl Rules {
    /// `recipients` are (normalised address, CSV line); `allowed` are addresses that may appear
    /// in any message (the sender, reply-to, `[safety] allow_addresses`).
    pub fn new<'a>(
        sender: Address,
        recipients: impl IntoIterator<Item = (&'a str, u64)>,
        allowed: impl IntoIterator<Item = &'a str>,
    ) -> Rules {
        let recipients = recipients.into_iter();
        let mut map = FingerprintMap::with_capacity_and_hasher(
            recipients.size_hint().0,
            BuildHasherDefault::default(),
        );
        for (address, line) in recipients {
            map.entry(fingerprint(&lower(address))).or_insert(line);
        }
        Rules {
            allowed: allowed
                .into_iter()
                .map(|a| fingerprint(&lower(a)))
                .collect(),
            sender,
            return_path: None,
            recipients: map,
        }
    }

    /// Allows `MAIL FROM` to be `return_path` with a recipient's token instead of the sender.
    #[must_use]
    pub fn with_return_path(mut self, return_path: Option<Address>) -> Rules {
        self.return_path = return_path;
        self
    }
}

/// The only top-level headers mailer writes. Anything else means something upstream injected
/// a header, and `Cc`, `Bcc`, `Resent-*` and `Apparently-To` are among the "anything else".
const ALLOWED_HEADERS: [&str; 13] = [
    "from",
    "reply-to",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-id",
    "dkim-signature",
];

/// The longest line SMTP allows, without its CRLF (RFC 5321 §4.5.3.1.6).
const MAX_LINE: usize = 998;

/// Why a message may not leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    BareLineBreak {
        offset: usize,
    },
    Nul {
        offset: usize,
    },
    LineTooLong {
        line: usize,
        octets: usize,
    },
    NoHeaderEnd,
    UnexpectedHeader(String),
    HeaderCount {
        name: &'static str,
        count: usize,
    },
    ToIsNotOneMailbox(usize),
    ToDiffersFromEnvelope {
        to: String,
        envelope: String,
    },
    FromDiffersFromSender {
        from: String,
        sender: String,
    },
    Unparseable(&'static str),
    /// The address of another recipient, and that recipient's CSV line.
    OtherRecipient {
        address: String,
        line: u64,
        place: &'static str,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::BareLineBreak { offset } => write!(f, "a bare CR or LF at byte {offset}"),
            Violation::Nul { offset } => write!(f, "a NUL byte at byte {offset}"),
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
            Violation::OtherRecipient {
                address,
                line,
                place,
            } => {
                write!(
                    f,
                    "the {place} contains `{address}`, the address of the recipient on line {line}"
                )
            }
        }
    }
}

/// Checks one final message against the campaign's rules.
pub fn check(message: &OutgoingMessage, rules: &Rules) -> Result<(), Vec<Violation>> {
    let mut violations = Vec::new();
    check_lines(&message.bytes, &mut violations);
    let Some(head_end) = memchr::memmem::find(&message.bytes, b"\r\n\r\n") else {
        violations.push(Violation::NoHeaderEnd);
        return Err(violations);
    };
    // One parse serves every check below.
    let Some(parsed) = MessageParser::default().parse(&message.bytes) else {
        violations.push(Violation::Unparseable("message"));
        return Err(violations);
    };
    check_headers(
        message,
        &message.bytes[..head_end + 2],
        &parsed,
        (&rules.sender, rules.return_path.as_ref()),
        &mut violations,
    );
    check_content(
        message,
        &message.bytes[..head_end],
        &parsed,
        rules,
        &mut violations,
    );
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Looks every address-like token of the decoded message up among the other recipients.
fn check_content(
    message: &OutgoingMessage,
    head: &[u8],
    parsed: &Message<'_>,
    rules: &Rules,
    violations: &mut Vec<Violation>,
) {
    let own = fingerprint(&lower(message.envelope.rcpt_to.as_ref()));
    let mut probe = |place: &'static str, text: &str| {
        scan::each_address(text, &mut |token| {
            let print = fingerprint(token);
            if print == own || rules.allowed.contains(&print) {
                return;
            }
            if let Some(&line) = rules.recipients.get(&print) {
                let seen = violations.iter().any(|v| matches!(v, Violation::OtherRecipient { address, place: p, .. } if address == token && *p == place));
                if !seen {
                    violations.push(Violation::OtherRecipient {
                        address: token.to_owned(),
                        line,
                        place,
                    });
                }
            }
        });
    };
    // The raw header block, then the decoded forms of what can be encoded in it.
    // mailer writes ASCII headers; anything else is still scanned, lossily.
    match std::str::from_utf8(head) {
        Ok(text) => probe("header block", text),
        Err(_) => probe("header block", &String::from_utf8_lossy(head)),
    }
    probe("subject", parsed.subject().unwrap_or_default());
    for list in [parsed.from(), parsed.to(), parsed.reply_to()]
        .into_iter()
        .flatten()
    {
        for address in list.iter() {
            probe("header block", address.name().unwrap_or_default());
        }
    }
    for part in &parsed.parts {
        match &part.body {
            PartType::Text(text) => probe("text part", text),
            PartType::Html(html) => probe("HTML part", html),
            _ => {}
        }
    }
}

fn check_lines(bytes: &[u8], violations: &mut Vec<Violation>) {
    let mut line_start = 0;
    let mut line_number = 1;
    for index in memchr::memchr3_iter(b'\r', b'\n', 0, bytes) {
        match bytes[index] {
            b'\r' if bytes.get(index + 1) == Some(&b'\n') => {
                let octets = index - line_start;
                if octets > MAX_LINE {
                    violations.push(Violation::LineTooLong {
                        line: line_number,
                        octets,
                    });
                }
                line_start = index + 2;
                line_number += 1;
            }
            // The LF of a CRLF, already counted at its CR.
            b'\n' if index > 0 && bytes[index - 1] == b'\r' => {}
            0 => {
                violations.push(Violation::Nul { offset: index });
                return;
            }
            _ => {
                violations.push(Violation::BareLineBreak { offset: index });
                return;
            }
        }
    }
    if bytes.len() - line_start > MAX_LINE {
        violations.push(Violation::LineTooLong {
            line: line_number,
            octets: bytes.len() - line_start,
        });
    }
}

fn check_headers(
    message: &OutgoingMessage,
    head: &[u8],
    parsed: &Message<'_>,
    (sender, return_path): (&Address, Option<&Address>),
    violations: &mut Vec<Violation>,
) {
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
        let name = name.trim_ascii();
        if name.eq_ignore_ascii_case(b"to") {
            to_count += 1;
        } else if name.eq_ignore_ascii_case(b"from") {
            from_count += 1;
        } else if !ALLOWED_HEADERS
            .iter()
            .any(|known| name.eq_ignore_ascii_case(known.as_bytes()))
        {
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            violations.push(Violation::UnexpectedHeader(name));
        }
    }
    for (name, count) in [("To", to_count), ("From", from_count)] {
        if count != 1 {
            violations.push(Violation::HeaderCount { name, count });
        }
    }
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
    // The return path is never in the headers (the receiving MTA writes `Return-Path`), and
    // its token is hex: nothing of it reaches the address scan.
    let envelope_ok = message.envelope.mail_from == *sender
        || return_path.is_some_and(|path| {
            crate::bounce::verp::token_in(path, message.envelope.mail_from.as_ref()).is_some()
        });
    if !same_address(from, sender) || !envelope_ok {
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

    /// Checks against a campaign of `recipients` (address, line), support@ allowed.
    fn check_with(bytes: &str, rcpt: &str, recipients: &[(&str, u64)]) -> Vec<String> {
        let sender: Address = "ops@example.org".parse().unwrap();
        let rules = Rules::new(sender, recipients.iter().copied(), ["support@example.org"]);
        match check(&message(bytes, rcpt), &rules) {
            Ok(()) => vec![],
            Err(violations) => violations.iter().map(ToString::to_string).collect(),
        }
    }

    fn check_message(bytes: &str, rcpt: &str) -> Vec<String> {
        check_with(bytes, rcpt, &[("ann@example.com", 2)])
    }

    const GOOD: &str = "From: Ops <ops@example.org>\r\nTo: \"Ann, A.\" <ann@example.com>\r\nSubject: hi\r\n\r\nbody\r\n";

    const CAMPAIGN: [(&str, u64); 3] = [
        ("ann@example.com", 2),
        ("Bob@example.com", 3),
        ("zoë@xn--exmple-cua.de", 4),
    ];

    fn leaks(body: &str) -> Vec<String> {
        check_with(&GOOD.replace("body", body), "ann@example.com", &CAMPAIGN)
    }

    #[test]
    fn another_recipients_address_in_any_form_is_a_violation() {
        let found =
            "the text part contains `bob@example.com`, the address of the recipient on line 3";
        assert_eq!(leaks("write to bob@example.com"), vec![found]);
        assert_eq!(leaks("write to BOB@Example.COM."), vec![found]);
        assert_eq!(leaks("mailto:bob%40example.com"), vec![found]);
        assert_eq!(leaks("bob&#64;example.com"), vec![found]);
        assert_eq!(
            leaks("Zoë@Exämple.de"),
            vec![
                "the text part contains `zoë@xn--exmple-cua.de`, the address of the recipient on line 4"
            ]
        );
    }

    #[test]
    fn own_allowed_and_unknown_addresses_pass() {
        assert_eq!(
            leaks("you are ann@example.com; ask support@example.org or ops@example.org"),
            Vec::<String>::new()
        );
        assert_eq!(leaks("stranger@example.net"), Vec::<String>::new());
    }

    #[test]
    fn leaks_in_encoded_headers_and_html_parts_are_found() {
        let subject = GOOD.replace("Subject: hi", "Subject: =?utf-8?b?Qm9iQGV4YW1wbGUuY29t?=");
        assert_eq!(
            check_with(&subject, "ann@example.com", &CAMPAIGN),
            vec!["the subject contains `bob@example.com`, the address of the recipient on line 3"]
        );
        let html = "From: ops@example.org\r\nTo: ann@example.com\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<a href=3D\"mailto:bob&#x40;example.com\">x</a>\r\n";
        assert_eq!(
            check_with(html, "ann@example.com", &CAMPAIGN),
            vec![
                "the HTML part contains `bob@example.com`, the address of the recipient on line 3"
            ]
        );
    }

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
                "the `To` header names `ann@example.com` but the envelope goes to `bob@example.com`",
                "the header block contains `ann@example.com`, the address of the recipient on line 2"
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
    fn the_envelope_sender_may_be_the_return_path_with_a_token_only() {
        let sender: Address = "ops@example.org".parse().unwrap();
        let return_path: Address = "bounces@mail.example.org".parse().unwrap();
        let rules = Rules::new(
            sender.clone(),
            [("ann@example.com", 2)],
            ["support@example.org"],
        );
        let with_path = Rules::new(sender, [("ann@example.com", 2)], ["support@example.org"])
            .with_return_path(Some(return_path));
        let mut verp = message(GOOD, "ann@example.com");
        verp.envelope.mail_from = "bounces+0123456789abcdef@mail.example.org".parse().unwrap();
        assert!(check(&verp, &with_path).is_ok());
        assert!(
            check(&verp, &rules).is_err(),
            "without [bounces], only the sender"
        );
        let mut other = message(GOOD, "ann@example.com");
        other.envelope.mail_from = "bounces+ann@mail.example.org".parse().unwrap();
        assert!(check(&other, &with_path).is_err(), "not a token");
        assert!(
            check(&message(GOOD, "ann@example.com"), &with_path).is_ok(),
            "the sender still"
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
        assert_eq!(
            check_message(&GOOD.replace("body", "a\0b"), "ann@example.com"),
            vec![format!("a NUL byte at byte {}", GOOD.len() - 5)]
        );
        let fine = GOOD.replace("body", &"x".repeat(998));
        assert_eq!(
            check_message(&fine, "ann@example.com"),
            Vec::<String>::new()
        );
    }
}
