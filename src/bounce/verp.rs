//! The return path per recipient (VERP): `MAIL FROM` is `local+TOKEN@domain` of the configured
//! `[bounces] return_path`, the token an opaque HMAC of (campaign, recipient).
//!
//! Pure. The token is the first 8 bytes of `HMAC-SHA256(key, "verp" ‖ 0x00 ‖ campaign ‖ 0x00 ‖
//! address)` in lower-case hex: 16 characters, 64 bits. It names no address (a local part that
//! looks like an address gets recipient domains listed by URI block lists), and only the key's
//! holder can make one. `mailer bounces` finds the recipient of a token by computing the tokens
//! of the campaign's recipients, whose addresses the journal has: nothing else needs storing.

use ring::hmac;

/// Hex digits in a token.
pub const TOKEN_LEN: usize = 16;

/// What the MAC covers. The `verp` label keeps these tokens apart from the unsubscribe tokens
/// even when both sections name the same key.
fn message(campaign: &str, address: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(6 + campaign.len() + address.len());
    message.extend_from_slice(b"verp\0");
    message.extend_from_slice(campaign.as_bytes());
    message.push(0);
    message.extend_from_slice(address.as_bytes());
    message
}

/// The token of `address` (normalised) in `campaign`.
#[must_use]
pub fn token(key: &[u8], campaign: &str, address: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hex::encode(&hmac::sign(&key, &message(campaign, address)).as_ref()[..TOKEN_LEN / 2])
}

/// The recipient's return path: `local+token@domain` of `return_path`.
#[must_use]
pub fn return_path(return_path: &lettre::Address, token: &str) -> lettre::Address {
    let built = format!("{}+{token}@{}", return_path.user(), return_path.domain());
    // A plain local part (checked by the configuration), `+` and hex digits: still an address.
    built
        .parse()
        .unwrap_or_else(|_| unreachable!("`{built}` is made of a valid address and hex digits"))
}

/// The token in `address`, when it is `return_path` with a token (`local+token@domain`, the
/// local part without regard to case, as some relays change it).
#[must_use]
pub fn token_in(return_path: &lettre::Address, address: &str) -> Option<String> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let (local, domain) = address.rsplit_once('@')?;
    if !domain.eq_ignore_ascii_case(return_path.domain()) {
        return None;
    }
    let (base, token) = local.rsplit_once('+')?;
    (base.eq_ignore_ascii_case(return_path.user())
        && token.len() == TOKEN_LEN
        && token.bytes().all(|b| b.is_ascii_hexdigit()))
    .then(|| token.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"bounce-key-0123456789";

    #[test]
    fn a_token_is_short_opaque_and_differs_per_recipient_campaign_and_key() {
        let ann = token(KEY, "spring", "ann@example.com");
        assert_eq!(ann.len(), TOKEN_LEN);
        assert!(
            ann.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(!ann.contains("ann"));
        assert_eq!(ann, token(KEY, "spring", "ann@example.com"), "stable");
        assert_ne!(ann, token(KEY, "spring", "bob@example.com"));
        assert_ne!(ann, token(KEY, "autumn", "ann@example.com"));
        assert_ne!(
            ann,
            token(b"another key 0123456", "spring", "ann@example.com")
        );
        assert_ne!(token(KEY, "ab", "c@d.e"), token(KEY, "a", "bc@d.e"));
    }

    #[test]
    fn the_return_path_carries_the_token_and_gives_it_back() {
        let base: lettre::Address = "bounces@mail.example.com".parse().unwrap();
        let token = token(KEY, "spring", "ann@example.com");
        let path = return_path(&base, &token);
        assert_eq!(
            path.to_string(),
            format!("bounces+{token}@mail.example.com")
        );
        assert_eq!(token_in(&base, path.as_ref()), Some(token.clone()));
        assert_eq!(
            token_in(
                &base,
                &format!("<BOUNCES+{}@Mail.Example.com>", token.to_uppercase())
            ),
            Some(token.clone())
        );
        assert_eq!(token_in(&base, "bounces@mail.example.com"), None);
        assert_eq!(
            token_in(&base, &format!("other+{token}@mail.example.com")),
            None
        );
        assert_eq!(
            token_in(&base, &format!("bounces+{token}@elsewhere.example")),
            None
        );
        assert_eq!(
            token_in(&base, "bounces+nothex0123456789@mail.example.com"),
            None
        );
        assert_eq!(token_in(&base, "bounces+abc@mail.example.com"), None);
    }
}
