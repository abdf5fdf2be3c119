//! Values from outside (server replies, CSV cells, file names, addresses, suppression entries)
//! made safe to show on a terminal or write to a log. Pure.
//!
//! Control characters are written visibly instead of as themselves: C0 and DEL as `\t`, `\n`,
//! `\r` or `\x1b`, C1 and the bidi controls (which reorder what follows them on screen) as
//! `\u{9b}` or `\u{202e}`. Printable text, non-ASCII included (`é`, `中`), stays as it is. A
//! backslash is not escaped, so escaping twice gives what escaping once gave: a value that
//! passes through two layers (a reply in a log line) shows the same in both.
//!
//! What is stored (the journal, the JSON report) keeps values exact; what is shown goes through
//! [`Shown`] or [`escape`].

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// Whether `c` is shown as an escape rather than as itself.
#[must_use]
pub fn is_control(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every control character written visibly (see the module docs); borrowed when
/// there is none.
#[must_use]
pub fn escape(text: &str) -> Cow<'_, str> {
    if text.chars().any(is_control) {
        Cow::Owned(Shown(text).to_string())
    } else {
        Cow::Borrowed(text)
    }
}

/// Like [`escape`], but line breaks (`\n`) stay: for a text of our own that lists values one
/// per line (the error `main` prints), whose values were escaped when it was made.
#[must_use]
pub fn escape_keeping_lines(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && is_control(c)) {
        return Cow::Borrowed(text);
    }
    let lines: Vec<Cow<'_, str>> = text.split('\n').map(escape).collect();
    Cow::Owned(lines.join("\n"))
}

/// Displays a value with its control characters escaped, without building a string first:
/// `Shown(&reply.text)`, `Shown(path.display())`.
#[derive(Debug, Clone, Copy)]
pub struct Shown<T>(pub T);

impl<T: fmt::Display> fmt::Display for Shown<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(Escaping(f), "{}", self.0)
    }
}

/// Writes what it is given with control characters escaped.
struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.find(is_control) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\t' => self.0.write_str("\\t")?,
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\u{0}'..='\u{1f}' | '\u{7f}' => write!(self.0, "\\x{:02x}", u32::from(c))?,
                _ => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        assert_eq!(escape(input), expected, "{input:?}");
        assert_eq!(Shown(input).to_string(), expected, "{input:?}");
        assert_eq!(escape(expected), expected, "escaping twice: {input:?}");
    }

    #[test]
    fn control_characters_are_written_visibly() {
        check(
            "550 \x1b[2J\x1b[31mFAKE\x1b]0;title\x07",
            "550 \\x1b[2J\\x1b[31mFAKE\\x1b]0;title\\x07",
        );
        check("a\0b\x7fc", "a\\x00b\\x7fc");
        check("tab\there\r\nnext", "tab\\there\\r\\nnext");
        check("\u{9b}31m \u{85}", "\\u{9b}31m \\u{85}");
        check("abc\u{202e}fdp.exe", "abc\\u{202e}fdp.exe");
        check("\u{2066}x\u{2069}", "\\u{2066}x\\u{2069}");
    }

    #[test]
    fn printable_text_stays_as_it_is_and_is_not_copied() {
        for text in [
            "",
            "Zoë <b>&</b> Co",
            "中文 ✓ \\x1b",
            "user@example.com",
            "\u{a0}",
        ] {
            assert!(
                matches!(escape(text), Cow::Borrowed(t) if t == text),
                "{text:?}"
            );
        }
        // The characters around the escaped ranges are printable.
        for c in [
            '\u{20}', '\u{7e}', '\u{a0}', '\u{2029}', '\u{202f}', '\u{206a}',
        ] {
            assert!(!is_control(c), "{c:?}");
        }
    }

    #[test]
    fn line_breaks_can_be_kept_for_our_own_lists() {
        assert_eq!(escape_keeping_lines("a\n  b"), "a\n  b");
        assert_eq!(
            escape_keeping_lines("2 problems:\n  r.csv:3: `\x1b[2J`\r"),
            "2 problems:\n  r.csv:3: `\\x1b[2J`\\r"
        );
    }

    #[test]
    fn any_display_can_be_shown() {
        let path = std::path::Path::new("dir/evil\x1b[2J.csv");
        assert_eq!(Shown(path.display()).to_string(), "dir/evil\\x1b[2J.csv");
        assert_eq!(format!("[{}]", Shown(42)), "[42]");
    }
}
