//! The guard's address scanner over arbitrary text with one address planted in it: every token
//! it reports looks like a normalised address, and the planted address is always found.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::guard::scan::each_address;

const PLANTED: &str = "bob@example.com";

fuzz_target!(|data: &[u8]| {
    // The bytes before the first NUL are the prefix, the rest the suffix (lossy UTF-8: the
    // scanner takes a `&str`), so a seed file is plain readable text.
    let (prefix, suffix) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let prefix = String::from_utf8_lossy(prefix);
    let suffix = String::from_utf8_lossy(suffix);
    let text = format!("{prefix} {PLANTED} {suffix}");

    let mut found_planted = false;
    each_address(&text, &mut |token| {
        let (local, domain) = token
            .split_once('@')
            .unwrap_or_else(|| panic!("token {token:?} has no '@' (text {text:?})"));
        assert!(
            !domain.contains('@'),
            "token {token:?} holds more than one '@' (text {text:?})"
        );
        assert!(!local.is_empty(), "token {token:?} has an empty local part (text {text:?})");
        assert!(domain.contains('.'), "token {token:?} has an undotted domain (text {text:?})");
        assert!(
            domain.is_ascii() && !domain.bytes().any(|b| b.is_ascii_uppercase()),
            "token {token:?} has a domain that is not ASCII lower-case (text {text:?})"
        );
        found_planted |= token == PLANTED;
    });
    assert!(found_planted, "{PLANTED:?} not found in {text:?}");
});
