//! DKIM signing (RFC 6376, relaxed/relaxed; RSA-SHA256 and, RFC 8463, Ed25519-SHA256) over the
//! final bytes of a message.
//!
//! Pure apart from reading the key. Signing happens on the exact bytes that go on the wire:
//! lettre 0.11.23's signer hashes its message headers before the MIME part adds
//! `Content-Type`, so a signed `Content-Type` never verifies; the signature here is computed
//! after the message is formatted, and checked by an independent implementation (dkimpy) in
//! the tests. RSA signatures are ring's (five times as fast as the `rsa` crate's here, which
//! only reads the PEM); Ed25519 ones are `ed25519-dalek`'s.
//!
//! Keys: RSA in PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8 (`BEGIN PRIVATE KEY`) PEM, Ed25519
//! in PKCS#8 PEM (what `openssl genpkey -algorithm ed25519` writes).

use std::fmt;
use std::time::SystemTime;

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use rsa::pkcs1::{DecodeRsaPrivateKey as _, EncodeRsaPrivateKey as _};
use sha2::{Digest as _, Sha256};

use crate::config::{Campaign, Dkim};

enum Key {
    Rsa(Box<ring::rsa::KeyPair>),
    Ed25519(Box<ed25519_dalek::SigningKey>),
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
        let pem = std::fs::read_to_string(&dkim.key_path)
            .map_err(|e| format!("cannot read the DKIM key `{path}`: {e}"))?;
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
        let body_hash = base64(&Sha256::digest(relaxed_body(body)));
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
        let signature = match &self.key {
            // RSASSA-PKCS1-v1_5 with SHA-256 over the data (ring hashes it).
            Key::Rsa(key) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &ring::rand::SystemRandom::new(),
                    &signed_data,
                    &mut signature,
                )
                .expect("an RSA key ring accepted signs");
                signature
            }
            // RFC 8463: Ed25519 over the SHA-256 hash of the data.
            Key::Ed25519(key) => key.sign(&Sha256::digest(&signed_data)).to_bytes().to_vec(),
        };
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
    // The `rsa` crate reads the PEM (PKCS#1 or PKCS#8); ring signs.
    let rsa = |key: rsa::RsaPrivateKey| -> Result<Key, String> {
        let der = key
            .to_pkcs1_der()
            .map_err(|e| format!("cannot be read: {e}"))?;
        ring::rsa::KeyPair::from_der(der.as_bytes())
            .map(|key| Key::Rsa(Box::new(key)))
            .map_err(|e| format!("is not a usable RSA key ({e})"))
    };
    if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        return rsa::RsaPrivateKey::from_pkcs1_pem(pem)
            .map_err(|e| format!("cannot be read: {e}"))
            .and_then(rsa);
    }
    if !pem.contains("-----BEGIN PRIVATE KEY-----") {
        return Err("is not a PEM private key (RSA PKCS#1 or PKCS#8, Ed25519 PKCS#8)".to_owned());
    }
    if let Ok(key) = <rsa::RsaPrivateKey as rsa::pkcs8::DecodePrivateKey>::from_pkcs8_pem(pem) {
        return rsa(key);
    }
    ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
        .map(|key| Key::Ed25519(Box::new(key)))
        .map_err(|e| format!("is neither an RSA nor an Ed25519 key ({e})"))
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
