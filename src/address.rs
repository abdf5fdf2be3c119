//! Address normalisation: one spelling per mailbox, used for dedup, suppression and the envelope.
//!
//! Pure. The local part keeps its case (RFC 5321 makes it case-sensitive); the domain is
//! IDNA-encoded and lower-cased, so `Ann@Exämple.COM` and `Ann@xn--exmple-cua.com` are the same.

use std::fmt;

use lettre::Address;

/// A checked address in its normal form. Compact (one allocation), because a campaign holds a
/// million of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormalisedAddress {
    /// `local@ascii-domain`: the key for dedup and suppression, and what goes on the wire.
    pub key: Box<str>,
    /// Where the `@` separating local part and domain is.
    at: u32,
}

impl NormalisedAddress {
    #[must_use]
    pub fn domain(&self) -> &str {
        &self.key[self.at as usize + 1..]
    }

    #[must_use]
    pub fn local(&self) -> &str {
        &self.key[..self.at as usize]
    }

    /// The same address as lettre's type, for the envelope and headers.
    ///
    /// # Panics
    ///
    /// Never: both halves were accepted by lettre when this value was made.
    #[must_use]
    pub fn to_lettre(&self) -> Address {
        // Both halves were accepted by `Address::new` when this value was made.
        Address::new(self.local(), self.domain()).expect("a normalised address stays valid")
    }
}

impl fmt::Display for NormalisedAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

/// Checks and normalises one address; the error is a short reason for the user.
pub fn normalise(raw: &str) -> Result<NormalisedAddress, String> {
    let raw = raw.trim();
    if raw.contains(['\r', '\n']) {
        return Err("it contains a line break".to_owned());
    }
    let parsed: Address = raw.parse().map_err(|error| format!("{error}"))?;
    // RFC 5321 allows quoted local parts (`"a b"@x`) and address literals (`a@[127.0.0.1]`);
    // a mailing list has no use for either, and both would hide from the guard's scanner.
    if !parsed
        .user()
        .chars()
        .all(|c| c.is_alphanumeric() || ".!#$%&'*+/=?^_`{|}~-".contains(c))
    {
        return Err(
            "quoted local parts and local parts with spaces or control characters are not accepted"
                .to_owned(),
        );
    }
    let domain = parsed.domain();
    if domain.starts_with('[') {
        return Err(format!(
            "the address literal `{domain}` is not accepted; give a domain name"
        ));
    }
    let ascii_domain = idna::domain_to_ascii(domain)
        .map_err(|_| format!("the domain `{domain}` is not a valid domain name"))?;
    if !ascii_domain.contains('.') || ascii_domain.ends_with('.') {
        return Err(format!(
            "the domain `{domain}` is not a fully qualified domain name"
        ));
    }
    let address = Address::new(parsed.user(), &ascii_domain).map_err(|error| format!("{error}"))?;
    let key: Box<str> = address.to_string().into();
    let at =
        u32::try_from(parsed.user().len()).map_err(|_| "the local part is too long".to_owned())?;
    Ok(NormalisedAddress { key, at })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<&str, &str>) {
        let got = normalise(raw);
        match expected {
            Ok(key) => {
                let address = got.expect(raw);
                assert_eq!(&*address.key, key, "{raw}");
                assert_eq!(address.to_lettre().to_string(), key);
                assert_eq!(format!("{}@{}", address.local(), address.domain()), key);
            }
            Err(part) => {
                let error = got.expect_err(raw);
                assert!(error.contains(part), "{raw}: {error}");
            }
        }
    }

    #[test]
    fn normalises_domains_and_keeps_local_parts() {
        check(" Ann@Example.COM ", Ok("Ann@example.com"));
        check("ann@EXÄMPLE.de", Ok("ann@xn--exmple-cua.de"));
        check("zoë@example.com", Ok("zoë@example.com"));
    }

    #[test]
    fn rejects_what_cannot_be_delivered() {
        check("ann@localhost", Err("not a fully qualified"));
        check("ann", Err(""));
        check("a\r\nb@example.com", Err("line break"));
        check("a b@example.com", Err(""));
        check("x@[127.0.0.1]", Err("address literal"));
        check("E@[E]", Err("address literal"));
        check("\" \"@e.co", Err("quoted local parts"));
        check("\"a@b\"@example.com", Err("quoted local parts"));
        check("\"a\tb\"@example.com", Err("quoted local parts"));
    }
}
