//! `[bounces]`: the return path per recipient (VERP) and the key of its tokens.

use toml::Spanned;

use super::Validator;
use super::raw::RawBounces;

/// Where returned mail goes: `MAIL FROM` is `return_path` with a token per recipient
/// (`bounces+TOKEN@example.com`), the token an HMAC keyed by the variable `secret_env` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounces {
    pub return_path: lettre::Address,
    pub secret_env: String,
}

impl Bounces {
    /// Reads the key from the environment: at least 16 bytes.
    pub fn key(&self) -> Result<super::Secret, String> {
        let name = &self.secret_env;
        match std::env::var(name) {
            Ok(key) if key.len() >= 16 => Ok(super::Secret::new(key)),
            Ok(_) => Err(format!(
                "the environment variable `{name}` named by [bounces] secret_env holds fewer than 16 bytes: set a longer key (the same one for every send and `mailer bounces` of the campaign)"
            )),
            Err(_) => Err(format!(
                "the environment variable `{name}` named by [bounces] secret_env is not set: set it to the key of the return-path tokens"
            )),
        }
    }
}

impl Validator<'_> {
    pub(super) fn bounces(&mut self, raw: &Spanned<RawBounces>) -> Option<Bounces> {
        let section = raw.get_ref();
        let value = &section.return_path;
        let text = value.get_ref();
        let return_path = match crate::address::normalise(text) {
            // A plain local part without `+`: the token is added after a `+`.
            Ok(address)
                if address
                    .local()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
                    && address.local().len() <= 40 =>
            {
                Some(address.to_lettre())
            }
            Ok(_) => {
                self.error(
                    value,
                    format!("`return_path` = `{text}` must have a plain local part of at most 40 characters (letters, digits, `.`, `-`, `_`; no `+`: mailer adds `+TOKEN`)"),
                );
                None
            }
            Err(error) => {
                self.error(
                    value,
                    format!("`return_path` = `{text}` is not an address ({error})"),
                );
                None
            }
        }?;
        Some(Bounces {
            return_path,
            secret_env: section.secret_env.get_ref().clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    fn check(section: &str) -> Result<Option<super::Bounces>, String> {
        super::super::tests::check(section).map(|campaign| campaign.bounces)
    }

    #[test]
    fn a_bounces_section_needs_a_plain_return_path_and_a_key() {
        let ok =
            check("[bounces]\nreturn_path = \"bounces@Mail.Example.com\"\nsecret_env = \"K\"\n")
                .unwrap()
                .unwrap();
        assert_eq!(ok.return_path.to_string(), "bounces@mail.example.com");
        assert_eq!(ok.secret_env, "K");
        for (section, expected) in [
            (
                "[bounces]\nreturn_path = \"b+x@example.com\"\nsecret_env = \"K\"\n",
                "plain local part",
            ),
            (
                "[bounces]\nreturn_path = \"nope\"\nsecret_env = \"K\"\n",
                "is not an address",
            ),
            ("[bounces]\nreturn_path = \"b@example.com\"\n", "secret_env"),
            ("[bounces]\nsecret_env = \"K\"\n", "return_path"),
        ] {
            let error = check(section).unwrap_err();
            assert!(error.contains(expected), "{section}: {error}");
        }
    }
}
