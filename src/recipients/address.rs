//! Address normalisation: one spelling per mailbox, used for dedup, suppression and the envelope.
//!
//! Pure. The local part keeps its case (RFC 5321 makes it case-sensitive); the domain is
//! IDNA-encoded and lower-cased, so `Ann@Exämple.COM` and `Ann@xn--exmple-cua.com` are the same.

use std::fmt;

use lettre::Address;

/// A checked address in its normal form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormalisedAddress {
    /// `local@ascii-domain`: the key for dedup and suppression, and what goes on the wire.
    pub key: String,
    /// The same, as lettre's type for the envelope and headers.
    pub address: Address,
}

impl NormalisedAddress {
    #[must_use]
    pub fn domain(&self) -> &str {
        self.address.domain()
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
    let domain = parsed.domain();
    let ascii_domain = if domain.starts_with('[') {
        domain.to_owned()
    } else {
        let ascii = idna::domain_to_ascii(domain)
            .map_err(|_| format!("the domain `{domain}` is not a valid domain name"))?;
        if !ascii.contains('.') || ascii.ends_with('.') {
            return Err(format!(
                "the domain `{domain}` is not a fully qualified domain name"
            ));
        }
        ascii
    };
    let address = Address::new(parsed.user(), &ascii_domain).map_err(|error| format!("{error}"))?;
    Ok(NormalisedAddress {
        key: address.to_string(),
        address,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<&str, &str>) {
        let got = normalise(raw);
        match expected {
            Ok(key) => assert_eq!(got.map(|a| a.key), Ok(key.to_owned()), "{raw}"),
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
        check("x@[127.0.0.1]", Ok("x@[127.0.0.1]"));
    }

    #[test]
    fn rejects_what_cannot_be_delivered() {
        check("ann@localhost", Err("not a fully qualified"));
        check("ann", Err(""));
        check("a\r\nb@example.com", Err("line break"));
        check("a b@example.com", Err(""));
    }
}
