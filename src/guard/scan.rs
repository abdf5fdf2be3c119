//! Finds every address-like token in a piece of text, in the forms a leak can take.
//!
//! Pure and allocation-light: tokens are normalised into one reusable buffer (local part and
//! domain lower-cased, the domain IDNA-encoded) and handed to a callback. Besides the text as it
//! is, the text with HTML entities decoded (`bob&#64;example.com`, and again for what was escaped
//! twice, `bob&amp;#64;example.com`) and with percent-escapes decoded (`bob%40example.com`) is
//! scanned too.
//!
//! Around each `@` the scanner does not guess where an address starts and ends: characters
//! that may be in a local part (`?email=bob@…`, `'bob@…`) or that are not ASCII (`«bob@…»`,
//! `bob@example.com’s`) may as well be its surroundings, so every start after such a character
//! (but not after `.`, `+`, `-`, `_`, letters or digits, which ordinary addresses contain), and
//! both the ASCII-only and the international reading of the domain, are tried.
//! A caller probing a set of known addresses gets a hit if any reading matches.

use std::borrow::Cow;

/// Layers of HTML escaping undone, each scanned: templates escape data that was escaped already.
const ENTITY_LAYERS: usize = 3;

/// Calls `found` with each address-like token of `text` and of its decoded forms. A token may
/// be reported more than once, and in several readings.
pub fn each_address(text: &str, found: &mut dyn FnMut(&str)) {
    let mut buffer = String::new();
    let mut layer = Cow::Borrowed(text);
    for depth in 0..=ENTITY_LAYERS {
        scan(&layer, &mut buffer, found);
        if layer.contains('%') {
            let decoded = percent_encoding::percent_decode_str(&layer).decode_utf8_lossy();
            if let Cow::Owned(decoded) = decoded {
                scan(&decoded, &mut buffer, found);
            }
        }
        if depth == ENTITY_LAYERS || !layer.contains('&') {
            break;
        }
        match html_escape::decode_html_entities(&layer) {
            Cow::Owned(decoded) => layer = Cow::Owned(decoded),
            Cow::Borrowed(_) => break,
        }
    }
}

/// Characters of an unquoted local part: RFC 5322 `atext`, the dot, and any non-ASCII byte
/// (internationalised addresses, RFC 6531).
fn is_local(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b".!#$%&'*+/=?^_`{|}~-".contains(&byte) || !byte.is_ascii()
}

/// Characters of a domain: ASCII letters, digits, hyphens, dots, and any non-ASCII byte (IDN).
fn is_domain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.' || !byte.is_ascii()
}

fn scan(text: &str, buffer: &mut String, found: &mut dyn FnMut(&str)) {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(offset) = memchr::memchr(b'@', &bytes[from..]) {
        let at = from + offset;
        from = at + 1;
        let mut start = at;
        while start > 0 && is_local(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = at + 1;
        while end < bytes.len() && is_domain(bytes[end]) {
            end += 1;
        }
        // The span is bounded by ASCII bytes, so both ends are character boundaries.
        let (Some(span_local), Some(span_domain)) = (text.get(start..at), text.get(at + 1..end))
        else {
            continue;
        };
        // Domain readings: up to the first non-ASCII character, and up to the first character
        // that is neither a letter or digit (in any script) nor `.` or `-` (IDN).
        let ascii_end = span_domain
            .bytes()
            .position(|b| !b.is_ascii())
            .unwrap_or(span_domain.len());
        let ascii_domain = span_domain[..ascii_end].trim_end_matches(['.', '-']);
        let word_end = span_domain
            .char_indices()
            .find(|&(_, c)| !(c.is_alphanumeric() || c == '.' || c == '-'))
            .map_or(span_domain.len(), |(i, _)| i);
        let full_domain = span_domain[..word_end].trim_end_matches(['.', '-']);
        // Local readings: the whole span, and the rest after each character that cannot be
        // part of an ordinary address (`.`, `+`, `-`, `_`, letters and digits can).
        let starts = std::iter::once(0).chain(
            span_local
                .char_indices()
                .filter(|&(_, c)| !(c.is_alphanumeric() || "._+-".contains(c)))
                .map(|(i, c)| i + c.len_utf8()),
        );
        for local_start in starts {
            let local = span_local[local_start..].trim_start_matches('.');
            if local.is_empty() {
                continue;
            }
            emit(local, ascii_domain, buffer, found);
            if full_domain != ascii_domain {
                emit(local, full_domain, buffer, found);
            }
        }
    }
}

/// Normalises one reading into `buffer` and reports it, if it looks like an address.
fn emit(local: &str, domain: &str, buffer: &mut String, found: &mut dyn FnMut(&str)) {
    if !domain.contains('.') {
        return;
    }
    buffer.clear();
    if local.is_ascii() {
        buffer.push_str(local);
        buffer.make_ascii_lowercase();
    } else {
        buffer.push_str(&local.to_lowercase());
    }
    buffer.push('@');
    if domain.is_ascii() {
        let at = buffer.len();
        buffer.push_str(domain);
        buffer[at..].make_ascii_lowercase();
    } else if let Ok(ascii) = idna::domain_to_ascii(domain) {
        buffer.push_str(&ascii);
    } else {
        return;
    }
    found(buffer);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: &[&str]) {
        let mut tokens = Vec::new();
        each_address(text, &mut |token| tokens.push(token.to_owned()));
        tokens.dedup();
        let mut unique: Vec<String> = Vec::new();
        for token in tokens {
            if !unique.contains(&token) {
                unique.push(token);
            }
        }
        assert_eq!(unique, expected, "{text}");
    }

    #[test]
    fn finds_plain_addresses_in_running_text() {
        check(
            "Write to Bob.Smith+x@Example.COM. Or ann@example.org!",
            &["bob.smith+x@example.com", "ann@example.org"],
        );
        check(
            "<a href=\"mailto:bob@example.com\">bob</a>",
            &["bob@example.com"],
        );
        check(
            "(bob@example.com), \"bob@example.com\"",
            &["bob@example.com"],
        );
    }

    #[test]
    fn finds_encoded_forms() {
        check("mailto:bob%40example.com", &["bob@example.com"]);
        check(
            "bob&#64;example.com and ann&commat;example.org",
            &["bob@example.com", "ann@example.org"],
        );
        check("x&#x40;example.com", &["x@example.com"]);
        check("https://t.example/?u=bob%2540example.com", &[]);
    }

    #[test]
    fn normalises_international_domains() {
        check("zoe@Exämple.de", &["zoe@xn--exmple-cua.de"]);
        check("Zoë@Exämple.de", &["zoë@xn--exmple-cua.de"]);
    }

    /// Whether `address` is among the readings of `text`.
    fn finds(text: &str, address: &str) -> bool {
        let mut hit = false;
        each_address(text, &mut |token| hit |= token == address);
        hit
    }

    #[test]
    fn finds_addresses_whatever_surrounds_them() {
        for text in [
            "?email=bob@example.com",
            "'bob@example.com'",
            "/bob@example.com|",
            "{bob@example.com}",
            "«bob@example.com»",
            "“bob@example.com”",
            "\u{a0}bob@example.com\u{a0}:",
            "bob@example.com’s",
            "bob@example.com…",
            "bob@example.com—yes",
            "bob@example.com。",
            "bob&amp;#64;example.com",
            "mailto:bob%40example.com?subject=x",
        ] {
            assert!(finds(text, "bob@example.com"), "{text}");
        }
        assert!(finds("«zoë@exämple.de»", "zoë@xn--exmple-cua.de"));
    }

    #[test]
    fn ordinary_addresses_are_not_read_as_shorter_ones() {
        // Otherwise John's own address would look like a leak of smith@'s.
        assert!(!finds("john.smith@example.com", "smith@example.com"));
        assert!(!finds("bob.smith+x@example.com", "x@example.com"));
        assert!(!finds("josé_smith@example.com", "smith@example.com"));
        assert!(!finds("bob@mail.example.com", "bob@example.com"));
    }

    #[test]
    fn ignores_what_is_not_an_address() {
        check(
            "@ alone, a@b, twitter @handle, 50% @ 3 o'clock, x@localhost",
            &[],
        );
        check("", &[]);
        check("@@@...@", &[]);
    }
}
