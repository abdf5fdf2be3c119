//! Bounce classes, modelled on `KumoMTA`'s, from a reply's code, enhanced status code and text.
//!
//! Pure. The enhanced code decides the family; the text refines within it (a `5.2.1` that says
//! "disabled" is an inactive mailbox). Three rules hold whatever the text says: a temporary
//! status (`4xx`, `4.x.x`) is never hard, a full mailbox is soft, and `5.7.x` (policy,
//! reputation, authentication) is never an address failure.

use std::fmt;

/// Why a message came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// The mailbox does not exist.
    InvalidRecipient,
    /// The domain does not exist or takes no mail.
    BadDomain,
    /// The mailbox exists but is disabled or closed.
    InactiveMailbox,
    /// The mailbox is full or over its quota.
    QuotaIssues,
    /// Refused for the sender's or its network's reputation (block lists).
    SpamBlock,
    /// Refused for what the message looks like.
    SpamContent,
    /// Refused by a policy of the receiver (rate, access, content rules).
    PolicyRelated,
    /// SPF, DKIM or DMARC failed.
    AuthenticationFailed,
    /// The message is too big, or its content was refused.
    ContentRelated,
    /// The receiver could not be reached.
    BadConnection,
    /// No route to the receiver, or a loop.
    RoutingErrors,
    /// The sending MTA gave up after retrying.
    MessageExpired,
    /// The SMTP conversation went wrong.
    ProtocolErrors,
    /// A temporary failure with no more precise reason.
    TransientFailure,
    /// The recipient reported the message as spam (an ARF report).
    Complaint,
    /// Nothing above fits.
    Uncategorized,
}

impl Class {
    pub const ALL: [Class; 16] = [
        Class::InvalidRecipient,
        Class::BadDomain,
        Class::InactiveMailbox,
        Class::QuotaIssues,
        Class::SpamBlock,
        Class::SpamContent,
        Class::PolicyRelated,
        Class::AuthenticationFailed,
        Class::ContentRelated,
        Class::BadConnection,
        Class::RoutingErrors,
        Class::MessageExpired,
        Class::ProtocolErrors,
        Class::TransientFailure,
        Class::Complaint,
        Class::Uncategorized,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Class::InvalidRecipient => "InvalidRecipient",
            Class::BadDomain => "BadDomain",
            Class::InactiveMailbox => "InactiveMailbox",
            Class::QuotaIssues => "QuotaIssues",
            Class::SpamBlock => "SpamBlock",
            Class::SpamContent => "SpamContent",
            Class::PolicyRelated => "PolicyRelated",
            Class::AuthenticationFailed => "AuthenticationFailed",
            Class::ContentRelated => "ContentRelated",
            Class::BadConnection => "BadConnection",
            Class::RoutingErrors => "RoutingErrors",
            Class::MessageExpired => "MessageExpired",
            Class::ProtocolErrors => "ProtocolErrors",
            Class::TransientFailure => "TransientFailure",
            Class::Complaint => "Complaint",
            Class::Uncategorized => "Uncategorized",
        }
    }

    #[must_use]
    pub fn parse(name: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a bounce means for the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The address is dead: suppress it.
    Hard,
    /// It may work later (full mailbox, temporary failure): not suppressed.
    Soft,
    /// The receiver refused the sender or the message, not the address: not suppressed (the
    /// fix is on the sending side).
    Policy,
    /// The recipient complained: suppress it.
    Complaint,
    /// A permanent failure of no known kind: not suppressed (when in doubt, keep the address
    /// and look at the diagnostic).
    Unknown,
}

impl Severity {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Severity::Hard => "hard",
            Severity::Soft => "soft",
            Severity::Policy => "policy",
            Severity::Complaint => "complaint",
            Severity::Unknown => "unknown",
        }
    }

    /// Whether `--suppress` writes the address.
    #[must_use]
    pub fn suppresses(self) -> bool {
        matches!(self, Severity::Hard | Severity::Complaint)
    }
}

/// The severity of `class` in a permanent (`temporary` false) or temporary failure.
#[must_use]
pub fn severity(class: Class, temporary: bool) -> Severity {
    match class {
        Class::Complaint => Severity::Complaint,
        _ if temporary => Severity::Soft,
        Class::InvalidRecipient | Class::BadDomain | Class::InactiveMailbox => Severity::Hard,
        Class::QuotaIssues
        | Class::BadConnection
        | Class::RoutingErrors
        | Class::MessageExpired
        | Class::TransientFailure => Severity::Soft,
        Class::SpamBlock
        | Class::SpamContent
        | Class::PolicyRelated
        | Class::AuthenticationFailed
        | Class::ContentRelated
        | Class::ProtocolErrors => Severity::Policy,
        Class::Uncategorized => Severity::Unknown,
    }
}

/// An enhanced status code `class.subject.detail` (RFC 3463), as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl Enhanced {
    /// `2.0.0`, `5.1.1`, `4.7.26`, … (only classes 2, 4 and 5).
    #[must_use]
    pub fn parse(text: &str) -> Option<Enhanced> {
        let mut parts = text.trim().split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        let number = |s: &str, most: usize| {
            (!s.is_empty() && s.len() <= most && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u16>().ok())
                .flatten()
        };
        let class = u8::try_from(number(class, 1)?).ok()?;
        (parts.next().is_none() && matches!(class, 2 | 4 | 5)).then_some(())?;
        Some(Enhanced {
            class,
            subject: number(subject, 3)?,
            detail: number(detail, 3)?,
        })
    }

    /// The first enhanced code in `text` standing alone (`550 5.1.1 <x>: …`).
    #[must_use]
    pub fn find(text: &str) -> Option<Enhanced> {
        text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .map(|word| word.trim_end_matches('.'))
            .find_map(Enhanced::parse)
    }
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// The first basic reply code in `text` (`550`, `421`, …) standing alone.
#[must_use]
pub fn find_code(text: &str) -> Option<u16> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|word| word.len() == 3)
        .filter_map(|word| word.parse::<u16>().ok())
        .find(|code| (400..600).contains(code))
}

/// Whether `text` (lower case) contains any of `words`.
fn says(text: &str, words: &[&str]) -> bool {
    words.iter().any(|w| text.contains(w))
}

const QUOTA: &[&str] = &[
    "mailbox full",
    "mailbox is full",
    "over quota",
    "quota exceeded",
    "exceeded storage",
    "exceeds the quota",
    "insufficient storage",
    "out of storage",
    "mailbox size limit",
    "user is over",
];
const INACTIVE: &[&str] = &[
    "disabled",
    "deactivated",
    "inactive",
    "suspended",
    "account closed",
    "no longer active",
    "expired account",
];
const UNKNOWN_USER: &[&str] = &[
    "user unknown",
    "unknown user",
    "no such user",
    "no such recipient",
    "no such mailbox",
    "does not exist",
    "doesn't exist",
    "doesn't have a",
    "recipient not found",
    "recipientnotfound",
    "unknown recipient",
    "invalid recipient",
    "invalid mailbox",
    "address rejected",
    "not a valid mailbox",
    "mailbox not found",
    "unrouteable address",
];
const BAD_DOMAIN: &[&str] = &[
    "host or domain name not found",
    "domain not found",
    "no such domain",
    "domain does not exist",
    "null mx",
    "no mx",
    "name service error",
];
const AUTHENTICATION: &[&str] = &["dmarc", "spf", "dkim", "unauthenticated", "authentication"];
const SPAM_CONTENT: &[&str] = &[
    "content",
    "looks like spam",
    "spam message",
    "message rejected as spam",
    "detected as spam",
    "phish",
];
const SPAM_BLOCK: &[&str] = &[
    "blocked",
    "block list",
    "blocklist",
    "blacklist",
    "spamhaus",
    "spamcop",
    "reputation",
    "rbl",
    "listed",
    "spam",
];
const TOO_BIG: &[&str] = &["too large", "too big", "size exceeds", "message size"];
const EXPIRED: &[&str] = &[
    "expired",
    "too long in queue",
    "retry timeout exceeded",
    "delivery time expired",
    "could not be delivered for",
];
const CONNECTION: &[&str] = &[
    "connection refused",
    "connection timed out",
    "connection reset",
    "lost connection",
    "timed out",
];

/// The class of a failure: its basic code (`550`), enhanced code (`5.1.1`) and text, any of
/// which may be missing.
#[must_use]
pub fn classify(code: Option<u16>, enhanced: Option<Enhanced>, text: &str) -> Class {
    let text = text.to_lowercase();
    let text = text.as_str();
    let temporary = enhanced.map_or(code.is_some_and(|c| c / 100 == 4), |e| e.class == 4);
    if says(text, QUOTA) {
        return Class::QuotaIssues;
    }
    if let Some(e) = enhanced {
        match (e.subject, e.detail) {
            // Policy, reputation, authentication: never the address.
            (7, 23..=27) => return Class::AuthenticationFailed,
            (7, _) => return policy(text),
            (1, 2) => return Class::BadDomain,
            (1, 10) if says(text, &["null mx"]) => return Class::BadDomain,
            (1, 0 | 1 | 3 | 4 | 6 | 10) => {
                return if says(text, INACTIVE) {
                    Class::InactiveMailbox
                } else {
                    Class::InvalidRecipient
                };
            }
            (1, 7 | 8) => return Class::PolicyRelated,
            (2, 1) => return Class::InactiveMailbox,
            (2, 2) => return Class::QuotaIssues,
            (2, 3) | (3, 4) | (6, _) => return Class::ContentRelated,
            (2, 0) if says(text, INACTIVE) => return Class::InactiveMailbox,
            (2, 0) if says(text, UNKNOWN_USER) => return Class::InvalidRecipient,
            (4, 7) => return Class::MessageExpired,
            (4, 4) if says(text, BAD_DOMAIN) => return Class::BadDomain,
            (4, 1 | 2) => return Class::BadConnection,
            (4, _) => return Class::RoutingErrors,
            (5, _) => return Class::ProtocolErrors,
            _ => {}
        }
    }
    // No enhanced code, or one of no particular meaning (`x.0.0`): the text decides.
    if says(text, AUTHENTICATION) {
        Class::AuthenticationFailed
    } else if says(text, UNKNOWN_USER) && !says(text, &["blocked", "policy"]) {
        Class::InvalidRecipient
    } else if says(text, BAD_DOMAIN) {
        Class::BadDomain
    } else if says(text, INACTIVE) && !says(text, &["blocked", "spam"]) {
        Class::InactiveMailbox
    } else if says(text, SPAM_BLOCK) || says(text, &["policy", "rejected by", "denied"]) {
        policy(text)
    } else if says(text, TOO_BIG) {
        Class::ContentRelated
    } else if says(text, EXPIRED) {
        Class::MessageExpired
    } else if says(text, CONNECTION) {
        Class::BadConnection
    } else if temporary {
        Class::TransientFailure
    } else {
        Class::Uncategorized
    }
}

/// Which refusal a policy one is (text in lower case).
fn policy(text: &str) -> Class {
    if says(text, AUTHENTICATION) {
        Class::AuthenticationFailed
    } else if says(text, SPAM_CONTENT) && says(text, &["spam", "phish", "content"]) {
        Class::SpamContent
    } else if says(text, SPAM_BLOCK) {
        Class::SpamBlock
    } else {
        Class::PolicyRelated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(code: Option<u16>, enhanced: &str, text: &str, class: Class, severity: Severity) {
        let enhanced = Enhanced::parse(enhanced);
        let got = classify(code, enhanced, text);
        assert_eq!(got, class, "{code:?} {enhanced:?} {text}");
        let temporary = enhanced.map_or(code.is_some_and(|c| c / 100 == 4), |e| e.class == 4);
        assert_eq!(super::severity(got, temporary), severity, "{text}");
    }

    #[test]
    fn classes_come_from_the_codes_refined_by_the_text() {
        use Class::*;
        use Severity::*;
        check(
            Some(550),
            "5.1.1",
            "<a@x>: Recipient address rejected: User unknown",
            InvalidRecipient,
            Hard,
        );
        check(
            Some(550),
            "5.1.2",
            "Host or domain name not found",
            BadDomain,
            Hard,
        );
        check(
            Some(550),
            "5.1.10",
            "RESOLVER.ADR.RecipientNotFound; Recipient not found",
            InvalidRecipient,
            Hard,
        );
        check(
            Some(550),
            "5.2.1",
            "The email account that you tried to reach is disabled",
            InactiveMailbox,
            Hard,
        );
        check(
            Some(552),
            "5.2.2",
            "The email account that you tried to reach is over quota",
            QuotaIssues,
            Soft,
        );
        check(Some(452), "4.2.2", "Mailbox full", QuotaIssues, Soft);
        check(Some(554), "5.0.0", "Mailbox full", QuotaIssues, Soft);
        check(
            Some(550),
            "5.7.1",
            "Service unavailable; client host blocked using Spamhaus",
            SpamBlock,
            Policy,
        );
        check(
            Some(550),
            "5.7.1",
            "Message rejected as spam by Content Filtering",
            SpamContent,
            Policy,
        );
        check(
            Some(550),
            "5.7.26",
            "Unauthenticated email is not accepted",
            AuthenticationFailed,
            Policy,
        );
        check(
            Some(550),
            "5.7.1",
            "Recipient address rejected: Access denied, user unknown",
            PolicyRelated,
            Policy,
        );
        check(
            Some(421),
            "4.7.0",
            "Try again later, closing connection",
            PolicyRelated,
            Soft,
        );
        check(
            Some(451),
            "4.4.1",
            "Connection timed out",
            BadConnection,
            Soft,
        );
        check(None, "4.4.7", "delivery time expired", MessageExpired, Soft);
        check(
            Some(554),
            "5.4.7",
            "delivery time expired",
            MessageExpired,
            Soft,
        );
        check(
            Some(552),
            "5.3.4",
            "Message size exceeds fixed limit",
            ContentRelated,
            Policy,
        );
        check(
            Some(554),
            "",
            "delivery error: dd This user doesn't have a yahoo.com account",
            InvalidRecipient,
            Hard,
        );
        check(Some(550), "", "no such user here", InvalidRecipient, Hard);
        check(Some(450), "", "please try again", TransientFailure, Soft);
        check(Some(450), "", "user unknown", InvalidRecipient, Soft);
        check(
            Some(554),
            "",
            "something odd happened",
            Uncategorized,
            Unknown,
        );
        check(
            None,
            "5.5.1",
            "Command unrecognized",
            ProtocolErrors,
            Policy,
        );
    }

    #[test]
    fn codes_are_found_standing_alone_only() {
        assert_eq!(
            Enhanced::find("550 5.1.1 <a@b>: no"),
            Enhanced::parse("5.1.1")
        );
        assert_eq!(
            Enhanced::find("smtp; 550-5.1.1 The email"),
            Enhanced::parse("5.1.1")
        );
        assert_eq!(Enhanced::find("version 10.2.3.4 only"), None);
        assert_eq!(Enhanced::find("1.2.3"), None);
        assert_eq!(Enhanced::parse("5.1.1").unwrap().to_string(), "5.1.1");
        assert_eq!(find_code("smtp; 550-5.1.1 x"), Some(550));
        assert_eq!(find_code("port 2525 and 250 ok"), None);
        assert_eq!(Class::parse("QuotaIssues"), Some(Class::QuotaIssues));
        assert!(
            Class::ALL
                .iter()
                .all(|c| Class::parse(c.name()) == Some(*c))
        );
    }
}
