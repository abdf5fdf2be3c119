//! DKIM signing (RFC 6376, relaxed/relaxed; RSA-SHA256 and, RFC 8463, Ed25519-SHA256) over the
//! final bytes of a message.
//!
//! Pure apart from reading the key. Signing happens on the exact bytes that go on the wire:
//! lettre 0.11.23's signer hashes its message headers before the MIME part adds
//! `Content-Type`, so a signed `Content-Type` never verifies; the signature here is computed
//! after the message is formatted, and checked by an independent implementation (dkimpy) in
//! the tests. The signatures and hashes are ring's, RSA and Ed25519 alike; `rustls-pki-types`
//! reads the PEM.
//!
//! Keys: RSA in PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8 (`BEGIN PRIVATE KEY`) PEM, Ed25519
//! in PKCS#8 PEM (what `openssl genpkey -algorithm ed25519` writes).

use std::fmt;
use std::time::SystemTime;

use base64::Engine as _;
use ring::digest::{SHA256, digest};
use ring::signature::{Ed25519KeyPair, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;

use crate::config::{Campaign, Dkim};

enum Key {
    Rsa(Box<RsaKeyPair>),
    Ed25519(Box<Ed25519KeyPair>),
}

impl Key {
    /// The `b=` signature of `data`.
    fn sign(&self, data: &[u8]) -> Vec<u8> {
        match self {
            // RSASSA-PKCS1-v1_5 with SHA-256 over the data (ring hashes it); deterministic.
            Key::Rsa(key) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &ring::rand::SystemRandom::new(),
                    data,
                    &mut signature,
                )
                .expect("an RSA key ring accepted signs");
                signature
            }
            // RFC 8463: Ed25519 over the SHA-256 hash of the data.
            Key::Ed25519(key) => key.sign(digest(&SHA256, data).as_ref()).as_ref().to_vec(),
        }
    }
}

/// A loaded DKIM key and what it signs. Its `Debug` shows nothing of the key.
pub struct Signer {
    key: Key,
    domain: String,
    selector: String,
    /// Header names to sign, lower-case, in `h=` order.
    headers: Vec<&'static str>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer(***)")
    }
}

impl Signer {
    /// Reads the key at `dkim.key_path`. The headers signed are those the campaign's messages
    /// have: From, To, Subject, Date, Message-ID, MIME-Version, Content-Type, and Reply-To,
    /// List-Unsubscribe, List-Unsubscribe-Post and List-Id when it writes them.
    pub fn load(campaign: &Campaign, dkim: &Dkim) -> Result<Signer, String> {
        let path = dkim.key_path.display();
        let pem = crate::files::read_text(&dkim.key_path, crate::files::SECRET_CAP)
            .map_err(|e| format!("the DKIM key {e}"))?;
        let key = read_key(&pem).map_err(|why| format!("the DKIM key `{path}` {why}"))?;
        let mut headers = vec![
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "mime-version",
            "content-type",
        ];
        if campaign.reply_to.is_some() {
            headers.push("reply-to");
        }
        if let Some(unsubscribe) = &campaign.unsubscribe {
            headers.push("list-unsubscribe");
            if unsubscribe.url.is_some() {
                headers.push("list-unsubscribe-post");
            }
        }
        if campaign.list_id.is_some() {
            headers.push("list-id");
        }
        Ok(Signer {
            key,
            domain: dkim.domain.clone(),
            selector: dkim.selector.clone(),
            headers,
        })
    }

    /// `message` (CRLF line ends, headers then a blank line then the body) with a
    /// `DKIM-Signature` header in front.
    #[must_use]
    pub fn sign(&self, message: &[u8], now: SystemTime) -> Vec<u8> {
        let split = find(message, b"\r\n\r\n").map_or(message.len(), |at| at + 2);
        let (head, body) = message.split_at(split);
        let body = body.strip_prefix(b"\r\n").unwrap_or(body);
        let body_hash = base64(digest(&SHA256, &relaxed_body(body)).as_ref());
        let algorithm = match self.key {
            Key::Rsa(_) => "rsa-sha256",
            Key::Ed25519(_) => "ed25519-sha256",
        };
        let time = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let tags = format!(
            "v=1; a={algorithm}; c=relaxed/relaxed; d={}; s={}; t={time}; h={}; bh={body_hash}; b=",
            self.domain,
            self.selector,
            self.headers.join(":")
        );
        let fields = fields(head);
        let mut signed_data = Vec::with_capacity(1024);
        for name in &self.headers {
            // The last instance of each (RFC 6376 §5.4.2); mailer writes each once.
            if let Some((field_name, value)) = fields
                .iter()
                .rev()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                signed_data.extend(relaxed_header(field_name, value));
                signed_data.extend_from_slice(b"\r\n");
            }
        }
        signed_data.extend(relaxed_header("dkim-signature", &tags));
        let signature = self.key.sign(&signed_data);
        let mut signed = Vec::with_capacity(message.len() + 600);
        signed.extend_from_slice(b"DKIM-Signature: ");
        // Folded at the tags' spaces and every 72 characters of the signature, so that no
        // line gets long; relaxed canonicalization ignores the folding.
        signed.extend_from_slice(tags.replace("; ", ";\r\n\t").as_bytes());
        for (index, chunk) in base64(&signature).as_bytes().chunks(72).enumerate() {
            if index > 0 {
                signed.extend_from_slice(b"\r\n\t");
            }
            signed.extend_from_slice(chunk);
        }
        signed.extend_from_slice(b"\r\n");
        signed.extend_from_slice(message);
        signed
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The header fields of a header block: (name, value with its folding), in order.
fn fields(head: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(head);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push_str("\r\n");
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.to_owned(), value.to_owned()));
        }
    }
    fields
}

/// RFC 6376 §3.4.2: name lower-case, value unfolded, runs of whitespace one space, trimmed.
fn relaxed_header(name: &str, value: &str) -> Vec<u8> {
    let unfolded = value.replace("\r\n", "");
    let value = unfolded
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    format!("{}:{value}", name.trim().to_lowercase()).into_bytes()
}

/// RFC 6376 §3.4.4: runs of whitespace one space, none at line ends, no empty lines at the end,
/// CRLF after the last line of a non-empty body.
fn relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut out = Vec::with_capacity(line.len());
        let mut space = false;
        for &byte in line {
            if byte == b' ' || byte == b'\t' {
                space = true;
            } else {
                if space {
                    out.push(b' ');
                    space = false;
                }
                out.push(byte);
            }
        }
        lines.push(out);
    }
    while lines.last().is_some_and(Vec::is_empty) {
        lines.pop();
    }
    let mut canonical = Vec::with_capacity(body.len());
    for line in lines {
        canonical.extend_from_slice(&line);
        canonical.extend_from_slice(b"\r\n");
    }
    canonical
}

/// The key; the error completes "the DKIM key `…` …".
fn read_key(pem: &str) -> Result<Key, String> {
    const NOT_A_KEY: &str = "is not a PEM private key (RSA PKCS#1 or PKCS#8, Ed25519 PKCS#8)";
    if !pem.contains("-----BEGIN RSA PRIVATE KEY-----")
        && !pem.contains("-----BEGIN PRIVATE KEY-----")
    {
        return Err(NOT_A_KEY.to_owned());
    }
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("cannot be read: {e}"))?;
    let rsa = |key: RsaKeyPair| Key::Rsa(Box::new(key));
    match der {
        PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der())
            .map(rsa)
            .map_err(|e| format!("is not a usable RSA key ({e})")),
        PrivateKeyDer::Pkcs8(der) => {
            let der = der.secret_pkcs8_der();
            let rsa_error = match RsaKeyPair::from_pkcs8(der) {
                Ok(key) => return Ok(rsa(key)),
                Err(e) => e,
            };
            // Ed25519 PKCS#8 v1 (no public key, what OpenSSL writes) as well as v2.
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map(|key| Key::Ed25519(Box::new(key)))
                .map_err(|e| {
                    // An RSA key ring will not sign with (too small, say) says so.
                    let wrong = |e: &ring::error::KeyRejected| e.to_string() == "WrongAlgorithm";
                    if wrong(&e) && !wrong(&rsa_error) {
                        format!("is not a usable RSA key ({rsa_error})")
                    } else {
                        format!("is neither an RSA nor an Ed25519 key ({e})")
                    }
                })
        }
        // An `EC PRIVATE KEY` section ahead of the key.
        _ => Err(NOT_A_KEY.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_key_and_says_so() {
        assert!(
            read_key("hello")
                .err()
                .unwrap()
                .contains("not a PEM private key")
        );
        let bad = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(
            read_key(bad)
                .err()
                .unwrap()
                .contains("neither an RSA nor an Ed25519 key")
        );
    }

    /// The test suite's keys (their public halves are in `tests/integration/dkim`).
    const RSA_PKCS1: &str = include_str!("../../tests/integration/dkim/rsa-pkcs1.pem");
    const RSA_PKCS8: &str = include_str!("../../tests/integration/dkim/rsa-pkcs8.pem");
    /// PKCS#8 v1, without the public key: what `openssl genpkey -algorithm ed25519` writes.
    const ED25519: &str = include_str!("../../tests/integration/dkim/ed25519.pem");

    #[test]
    fn keys_sign_as_openssl_does() {
        // `openssl dgst -sha256 -sign rsa-pkcs1.pem`, and `openssl pkeyutl -sign -rawin` over
        // the SHA-256 of the data for Ed25519 (RFC 8463), OpenSSL 3.0.19.
        let data = b"from:a@example.com\r\nsubject:hi";
        let rsa = "POUQK5lADabe8DgFrkSqdo0PIhGoLb20PgzOHKLzt7a1YMVH5GtJ8qxRILv3lQBnVLyfHjkY7g41hxkcHK\
                   NROsLzSaLf7Qh00i+hlfA1UT+SabC81zw+4M0UgIUOn1LfdyxNb2GrzVT1pVgX+sh/cY5kQbvMDYhA0x\
                   5weIfJ0UCQDPd6s8RqOj4st7Mw8wNs6B8VKNbyZOAJSqdRnoNTRighi9CP47upssmheVvVgdqJH1dU6o\
                   DFtR6aDdUHPe4kWFSCeD4HKnd6sS+eivue20IbO8JCE0hrZGQPEzbD1UMmcN2f3O+sImb5cKSCRDRt7Q\
                   vYz5eBRKlCJzu1xKkMtw==";
        let ed25519 = "/xXMSPndhwvqqxqL/mVAjW9IYsyR4z1Cwf7vVHBdER3sEmkTosRnXbEfuSe3FbWqQi8RrDEb7EYniCJFpQqDAA==";
        for (pem, expected) in [(RSA_PKCS1, rsa), (RSA_PKCS8, rsa), (ED25519, ed25519)] {
            let key = read_key(pem).unwrap_or_else(|why| panic!("{why}"));
            assert_eq!(base64(&key.sign(data)), expected);
        }
        assert!(matches!(read_key(RSA_PKCS8), Ok(Key::Rsa(_))));
        assert!(matches!(read_key(ED25519), Ok(Key::Ed25519(_))));
    }

    #[test]
    fn an_rsa_key_ring_refuses_is_named_as_one() {
        // 1024 bits: ring signs with 2048 to 4096.
        let small = "\
-----BEGIN PRIVATE KEY-----
MIICeAIBADANBgkqhkiG9w0BAQEFAASCAmIwggJeAgEAAoGBAOSU+oEXzAn5VUgS
x985JyS/+UiLLg/1sAZxdk8RV6V3SsJjU4Fno98dVJAHVFJa9q5TgP2r5Vybps43
PWzPAX2PPQqlIVPWA4tAuJsJPEOMmAsAnXuzL6u2jbS7Nseuc0aVgj0Vu+veH6uT
As2KxdB/9H+ZOMcNN6IIZM5svqpfAgMBAAECgYEApnMh011r1Bt/EYOzjgZFTcqJ
kVzgRvjmnFqFB2CejTxH8TN4/HNm7jKigFsF+Q6KMTlXZeGFnKEvn1y0WwaGkvJK
O5UPODs12EugS4S1jeUJkPZ2zzbrvDgchCk40pFptgAUIx25xeo13GjJzsGiPRdA
8Qp9xP2+7NaT2ojtACkCQQD9cak22QOF3H9+PyCZXCLvERBruyVLDgGCTRoveDw/
sHZyZd4cDXmbad+9ALKXG//4k4GlIeM0uVeuqexPKwrtAkEA5uMhBSuXfVMl/m7y
iF+ynK6+i1ZANfWmbbBxO0TytGdw3PYVw6RlRLOVM9r1ifRlUMPOVnSV4jl+4rry
cLRE+wJBAIsJfKwzN4SLJ4IpvYeEjUGbmeeP/nCDWX6TL8dU7bB+7SvrCINZPRpu
Zai5JkBRwwYqXdgqlAuLljeizpnL4i0CQFuzR9ES4CbxWDy2efM59umN6bXTessz
lncoRcChgLewAb5wqnI6n9HqdU7UHwM8ouSx8AicY08nQMLyNwoWPvMCQQDEz7lW
H8QD5IbdPNTRC3raj2loRq+rBd0k9GEg1OgJeA9OrShqFq2d+e7SWAW9IUkF2zfx
qQRGWihTOcAOB4KC
-----END PRIVATE KEY-----
";
        let why = read_key(small).err().unwrap();
        assert!(why.contains("is not a usable RSA key (TooSmall)"), "{why}");
        let garbage = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        let why = read_key(garbage).err().unwrap();
        assert!(
            why.contains("is not a usable RSA key (InvalidEncoding)"),
            "{why}"
        );
    }

    #[test]
    fn relaxed_canonicalization_follows_the_rfc_examples() {
        // RFC 6376 §3.4.5.
        assert_eq!(relaxed_header("A", " X\r\n"), b"a:X");
        assert_eq!(relaxed_header("B ", " Y\t\r\n\tZ  "), b"b:Y Z");
        assert_eq!(relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n"), b" C\r\nD E\r\n");
        assert_eq!(relaxed_body(b""), b"");
        let fields = fields(b"A: X\r\nB : Y\t\r\n\tZ  \r\n");
        assert_eq!(fields[1], ("B ".to_owned(), " Y\t\r\n\tZ  ".to_owned()));
    }
}
