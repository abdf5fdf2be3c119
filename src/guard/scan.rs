//! Finds every address-like token in a piece of text, in the forms a leak can take.
//!
//! Pure and allocation-light: tokens are normalised into one reusable buffer (local part and
//! domain lower-cased, the domain IDNA-encoded) and handed to a callback. Besides the text as it
//! is, the text with percent-escapes decoded (`mailto:bob%40example.com`) and the text with HTML
//! entities decoded (`bob&#64;example.com`, `bob&commat;example.com`) are scanned too.

use std::borrow::Cow;

/// Calls `found` with each address-like token of `text` and of its decoded forms. A token may
/// be reported more than once.
pub fn each_address(text: &str, found: &mut dyn FnMut(&str)) {
    let mut buffer = String::new();
    scan(text, &mut buffer, found);
    let entities = if text.contains('&') {
        html_escape::decode_html_entities(text)
    } else {
        Cow::Borrowed(text)
    };
    if let Cow::Owned(decoded) = &entities {
        scan(decoded, &mut buffer, found);
    }
    if entities.contains('%') {
        let decoded = percent_encoding::percent_decode_str(&entities).decode_utf8_lossy();
        if let Cow::Owned(decoded) = decoded {
            scan(&decoded, &mut buffer, found);
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
        // Sentence punctuation around an address is not part of it.
        let local = text[start..at].trim_start_matches('.');
        let Some(domain) = text.get(at + 1..end) else {
            continue;
        };
        let domain = domain.trim_end_matches(['.', '-']);
        if local.is_empty() || !domain.contains('.') {
            continue;
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
            continue;
        }
        found(buffer);
    }
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
