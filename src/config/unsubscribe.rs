//! `[unsubscribe]`: one-click unsubscribe (RFC 8058) and `mailto:` unsubscribe, and the
//! `List-Id` of `[campaign]` (RFC 2919).

use toml::Spanned;

use super::Validator;
use super::raw::RawUnsubscribe;

/// How a recipient unsubscribes: an https endpoint that takes a one-click POST (the link
/// carries the recipient's address and a token only the key's holder can make), a mailbox, or
/// both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The endpoint; each recipient's link adds `c`, `r` and `t` query parameters.
    pub url: Option<url::Url>,
    /// The environment variable holding the HMAC key of the tokens (with `url`).
    pub secret_env: Option<String>,
    /// An address that unsubscribes whoever writes to it.
    pub mailto: Option<lettre::Address>,
}

/// `Description <label.example.com>` on one line: what `List-Id` holds (RFC 2919).
#[must_use]
pub fn valid_list_id(text: &str) -> bool {
    let Some(open) = text.rfind('<') else {
        return false;
    };
    let Some(id) = text[open + 1..].strip_suffix('>') else {
        return false;
    };
    let description = &text[..open];
    text.chars().all(|c| c == ' ' || c.is_ascii_graphic())
        && description.is_ascii()
        && id.contains('.')
        && id.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl Validator<'_> {
    pub(super) fn unsubscribe(&mut self, raw: &Spanned<RawUnsubscribe>) -> Option<Unsubscribe> {
        let section = raw.get_ref();
        let before = self.problems.0.len();
        let url = section.url.as_ref().and_then(|value| {
            let text = value.get_ref();
            match url::Url::parse(text) {
                Ok(url)
                    if url.scheme() == "https"
                        && url.fragment().is_none()
                        && url.host().is_some()
                        && url.username().is_empty()
                        && url.password().is_none() =>
                {
                    Some(url)
                }
                Ok(_) => {
                    self.error(
                        value,
                        format!("`url` = `{text}` must be an https URL without credentials or a #fragment (RFC 8058 one-click unsubscribe is https only; the URL is in every message)"),
                    );
                    None
                }
                Err(error) => {
                    self.error(value, format!("`url` = `{text}` is not a URL ({error})"));
                    None
                }
            }
        });
        let mailto = section.mailto.as_ref().and_then(|value| {
            let text = value.get_ref();
            // Normalised (IDNA domain), with a plain ASCII local part: it goes into a mailto:
            // URI in a header, with nothing to escape.
            let plain = |address: &crate::address::NormalisedAddress| {
                address
                    .local()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".+-_".contains(c))
            };
            match crate::address::normalise(text) {
                Ok(address) if plain(&address) => Some(address.to_lettre()),
                Ok(_) => {
                    self.error(
                        value,
                        format!("`mailto` = `{text}` must have a plain local part (letters, digits, `.`, `+`, `-`, `_`)"),
                    );
                    None
                }
                Err(error) => {
                    self.error(
                        value,
                        format!("`mailto` = `{text}` is not an address ({error})"),
                    );
                    None
                }
            }
        });
        let secret_env = section.secret_env.as_ref().map(|v| v.get_ref().clone());
        match (&section.url, &section.secret_env) {
            (Some(url), None) => self.error(
                url,
                "`url` needs `secret_env`: the environment variable holding the key that signs each recipient's link",
            ),
            (None, Some(env)) => self.error(env, "`secret_env` is only used with `url`"),
            _ => {}
        }
        if section.url.is_none() && section.mailto.is_none() {
            self.error(
                raw,
                "`[unsubscribe]` needs `url` (one-click, https), `mailto`, or both",
            );
        }
        (self.problems.0.len() == before).then_some(Unsubscribe {
            url,
            secret_env,
            mailto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(section: &str) -> Result<Option<Unsubscribe>, String> {
        super::super::tests::check(section).map(|campaign| campaign.unsubscribe)
    }

    #[test]
    fn an_unsubscribe_section_is_checked_key_by_key() {
        let ok = check("[unsubscribe]\nurl = \"https://example.com/u\"\nsecret_env = \"K\"\nmailto = \"leave@example.com\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(ok.url.unwrap().as_str(), "https://example.com/u");
        assert_eq!(ok.secret_env.as_deref(), Some("K"));
        assert_eq!(ok.mailto.unwrap().to_string(), "leave@example.com");
        let errors = [
            (
                "[unsubscribe]\nurl = \"http://example.com/u\"\nsecret_env = \"K\"\n",
                "must be an https URL",
            ),
            (
                "[unsubscribe]\nurl = \"https://example.com/u\"\n",
                "`url` needs `secret_env`",
            ),
            (
                "[unsubscribe]\nmailto = \"leave@example.com\"\nsecret_env = \"K\"\n",
                "only used with `url`",
            ),
            (
                "[unsubscribe]\nmailto = \"not an address\"\n",
                "is not an address",
            ),
            ("[unsubscribe]\n", "needs `url`"),
            (
                "[unsubscribe]\nurl = \"https://u:p@example.com/u\"\nsecret_env = \"K\"\n",
                "without credentials",
            ),
            (
                "[unsubscribe]\nmailto = \"a?b@example.com\"\n",
                "plain local part",
            ),
            (
                "[unsubscribe]\nurl = \"https://example.com/u\"\nsecret_env = \"K\"\nsecret = \"x\"\n",
                "unknown field",
            ),
        ];
        for (section, expected) in errors {
            let error = check(section).unwrap_err();
            assert!(error.contains(expected), "{section}: {error}");
        }
    }

    #[test]
    fn list_ids_are_a_description_and_a_dotted_label_in_angle_brackets() {
        assert!(valid_list_id("Example news <news.example.com>"));
        assert!(valid_list_id("<news.example.com>"));
        assert!(!valid_list_id("news.example.com"));
        assert!(!valid_list_id("Example <news>"));
        assert!(!valid_list_id("Example <news..example.com>"));
        assert!(!valid_list_id("Example\r\nBcc: x <news.example.com>"));
        assert!(
            !valid_list_id("Example\u{b} <news.example.com>"),
            "no control characters"
        );
    }
}
