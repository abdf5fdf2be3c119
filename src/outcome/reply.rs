//! A server's reply, split the way the summary (and later the journal) keeps it: the code,
//! the RFC 3463 enhanced code and the text. Pure.
//!
//! The text is the server's, kept exact; shown (`Display`), its control characters are
//! escaped, so that a reply cannot write to the operator's terminal.

use std::fmt;

use crate::printable::Shown;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// `4.7.28`, when the text starts with one.
    pub enhanced: Option<String>,
    /// The text after the enhanced code, lines joined with spaces.
    pub text: String,
}

/// What providers write when they refuse because of volume rather than the recipient
/// (Gmail's "unusual rate", Yahoo's "unexpected volume", Microsoft's "server busy", …).
const THROTTLING_PHRASES: [&str; 8] = [
    "rate limit",
    "ratelimit",
    "unusual rate",
    "too many",
    "throttl",
    "unexpected volume",
    "server busy",
    "slow down",
];

impl Reply {
    #[must_use]
    pub fn new(code: u16, text: &str) -> Reply {
        let text = text.trim();
        let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
        if is_enhanced_code(first) {
            Reply {
                code,
                enhanced: Some(first.to_owned()),
                text: rest.trim().to_owned(),
            }
        } else {
            Reply {
                code,
                enhanced: None,
                text: text.to_owned(),
            }
        }
    }

    /// A temporary refusal that says "you are sending too fast": a 421 or 451 with a 4.7.x
    /// enhanced code, or with the words providers use for it. Greylisting (also 451 4.7.1)
    /// is about one sender-recipient pair, not the pace: it is not throttling.
    #[must_use]
    pub fn is_throttling(&self) -> bool {
        if !matches!(self.code, 421 | 451) {
            return false;
        }
        let text = self.text.to_ascii_lowercase();
        if text.contains("greylist") || text.contains("graylist") {
            return false;
        }
        if self
            .enhanced
            .as_deref()
            .is_some_and(|code| code.starts_with("4.7."))
        {
            return true;
        }
        THROTTLING_PHRASES
            .iter()
            .any(|phrase| text.contains(phrase))
    }
}

/// `class.subject.detail`, class 2, 4 or 5 (RFC 3463).
fn is_enhanced_code(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    matches!(parts.as_slice(), [class, subject, detail]
        if matches!(*class, "2" | "4" | "5")
            && [subject, detail]
                .iter()
                .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())))
}

impl Reply {
    /// `550 5.1.1 text` exactly as the server sent it, for what is stored (the journal's
    /// `reply_text`, a delivery's detail); what is shown goes through `Display` instead.
    #[must_use]
    pub fn exact(&self) -> String {
        let mut line = self.code.to_string();
        for part in [self.enhanced.as_deref(), Some(self.text.as_str())]
            .into_iter()
            .flatten()
            .filter(|p| !p.is_empty())
        {
            line.push(' ');
            line.push_str(part);
        }
        line
    }
}

/// The reply as [`Reply::exact`] has it, its control characters escaped.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Shown(self.exact()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(code: u16, text: &str, enhanced: Option<&str>, throttling: bool) {
        let reply = Reply::new(code, text);
        assert_eq!(reply.enhanced.as_deref(), enhanced, "{text}");
        assert_eq!(reply.is_throttling(), throttling, "{text}");
        assert_eq!(reply.to_string(), format!("{code} {}", text.trim()));
        assert_eq!(reply.exact(), reply.to_string());
    }

    #[test]
    fn replies_split_and_throttling_is_recognised() {
        check(250, "2.0.0 queued as 1A2B", Some("2.0.0"), false);
        check(
            421,
            "4.7.28 Our system has detected an unusual rate of unsolicited mail",
            Some("4.7.28"),
            true,
        );
        check(
            421,
            "4.7.0 [TSS04] Messages temporarily deferred due to unexpected volume",
            Some("4.7.0"),
            true,
        );
        check(
            451,
            "4.7.500 Server busy. Please try again later",
            Some("4.7.500"),
            true,
        );
        check(421, "Too many connections, slow down", None, true);
        check(
            450,
            "4.2.1 too many messages for this mailbox",
            Some("4.2.1"),
            false,
        );
        check(
            451,
            "4.7.1 Greylisted, please try again in 300 seconds",
            Some("4.7.1"),
            false,
        );
        check(550, "5.7.1 rate limit exceeded", Some("5.7.1"), false);
        check(421, "service shutting down", None, false);
        check(451, "4.3.0 temporary failure", Some("4.3.0"), false);
        check(554, "5.7.1.2 not a code", None, false);
    }

    #[test]
    fn a_reply_keeps_its_text_exact_and_shows_it_escaped() {
        let reply = Reply::new(
            550,
            "5.7.1 \x1b[2J\x1b[31mFAKE: all sent OK\x1b]0;title\x07",
        );
        assert_eq!(
            reply.text,
            "\x1b[2J\x1b[31mFAKE: all sent OK\x1b]0;title\x07"
        );
        assert_eq!(
            reply.to_string(),
            "550 5.7.1 \\x1b[2J\\x1b[31mFAKE: all sent OK\\x1b]0;title\\x07"
        );
        assert_eq!(
            reply.exact(),
            "550 5.7.1 \x1b[2J\x1b[31mFAKE: all sent OK\x1b]0;title\x07"
        );
    }
}
