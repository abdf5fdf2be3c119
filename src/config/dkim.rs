//! `[dkim]`: which key signs the messages, under which selector and domain.

use std::path::PathBuf;

use toml::Spanned;

use super::Validator;
use super::raw::RawDkim;

/// DKIM signing (relaxed/relaxed). The key is read where messages are rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dkim {
    /// The `s=` tag: the key's name under `_domainkey.<domain>`.
    pub selector: String,
    /// The `d=` tag, lower-case and IDNA-encoded.
    pub domain: String,
    /// An RSA key (PKCS#1 or PKCS#8 PEM) or an Ed25519 key (PKCS#8 PEM).
    pub key_path: PathBuf,
}

/// Dot-separated labels of letters, digits and `-`.
fn labels(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl Validator<'_> {
    pub(super) fn dkim(&mut self, raw: &Spanned<RawDkim>) -> Option<Dkim> {
        let section = raw.get_ref();
        let before = self.problems.0.len();
        let selector = section.selector.get_ref().clone();
        if !labels(&selector) {
            self.error(
                &section.selector,
                format!("`selector` = `{selector}` must be DNS labels (letters, digits, `-`, dots between)"),
            );
        }
        let given = section.domain.get_ref();
        let domain = match idna::domain_to_ascii(given) {
            Ok(domain) if labels(&domain) && domain.contains('.') => Some(domain.to_lowercase()),
            _ => {
                self.error(
                    &section.domain,
                    format!("`domain` = `{given}` is not a domain name"),
                );
                None
            }
        };
        let key_path = self.relative(&section.key_path);
        (self.problems.0.len() == before).then(|| Dkim {
            selector,
            domain: domain.unwrap_or_default(),
            key_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(section: &str) -> Result<Option<Dkim>, String> {
        super::super::tests::check(section).map(|campaign| campaign.dkim)
    }

    #[test]
    fn a_dkim_section_is_checked_key_by_key() {
        let dkim = check(
            "[dkim]\nselector = \"mail2026\"\ndomain = \"Exämple.COM\"\nkey_path = \"dkim.pem\"\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(dkim.selector, "mail2026");
        assert_eq!(dkim.domain, "xn--exmple-cua.com");
        assert!(dkim.key_path.ends_with("dkim.pem"));
        for (section, expected) in [
            (
                "[dkim]\nselector = \"a b\"\ndomain = \"example.com\"\nkey_path = \"k\"\n",
                "`selector`",
            ),
            (
                "[dkim]\nselector = \"s\"\ndomain = \"localhost\"\nkey_path = \"k\"\n",
                "`domain`",
            ),
            (
                "[dkim]\nselector = \"s\"\ndomain = \"example.com\"\n",
                "key_path",
            ),
            (
                "[dkim]\nselector = \"s\"\ndomain = \"example.com\"\nkey_path = \"k\"\nkey = \"x\"\n",
                "unknown field",
            ),
        ] {
            let error = check(section).unwrap_err();
            assert!(error.contains(expected), "{section}: {error}");
        }
    }
}
