//! The fingerprint of a campaign's inputs: the campaign file, every file in the template and
//! locale folders, the recipient list and the suppression lists. A SHA-256 per file, and one
//! over all of them. The journal freezes them at a run's start (invariant 8): a later run
//! with different inputs is refused unless the operator accepts the change.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use ring::digest::{Context, SHA256};

use crate::config::Campaign;

/// Input name → SHA-256 (hex) of its bytes. Names are stable across runs: the campaign file,
/// `templates/<path>`, `locales/<path>`, `recipients`, `suppress[<n>]`.
pub type Inputs = BTreeMap<String, String>;

/// Hashes every input of `campaign`.
pub fn inputs(campaign: &Campaign) -> anyhow::Result<Inputs> {
    let mut inputs = Inputs::new();
    inputs.insert("campaign file".to_owned(), hash_file(&campaign.file)?);
    // Exactly the files the loaders read, links checked as they check them.
    for (name, dir, files, folders) in [
        (
            "templates",
            &campaign.template_dir,
            crate::render::template::files(&campaign.template_dir),
            campaign.template_folders(),
        ),
        (
            "locales",
            &campaign.locales_dir,
            crate::render::locale::files(&campaign.locales_dir),
            campaign.locale_folders(),
        ),
    ] {
        for path in files {
            // A file that cannot be read (a dangling link, a FIFO, a link out of the campaign)
            // fails loading, which names it in the list of every problem.
            let hash = match folders.contain(&path).map(|()| crate::files::open(&path)) {
                Ok(Ok(file)) => hash_open(file, &path)?,
                Err(error) | Ok(Err(error)) if error.is_missing() => "missing".to_owned(),
                Err(_) | Ok(Err(_)) => "unreadable".to_owned(),
            };
            inputs.insert(format!("{name}/{}", relative(dir, &path)), hash);
        }
    }
    inputs.insert("recipients".to_owned(), hash_file(&campaign.recipients)?);
    for (n, path) in campaign.suppress.iter().enumerate() {
        inputs.insert(format!("suppress[{n}]"), hash_file(path)?);
    }
    Ok(inputs)
}

/// One hash over every input's name and hash (hex).
#[must_use]
pub fn combine(inputs: &Inputs) -> String {
    let mut hash = Context::new(&SHA256);
    for (name, digest) in inputs {
        hash.update(name.as_bytes());
        hash.update(&[0]);
        hash.update(digest.as_bytes());
        hash.update(b"\n");
    }
    hex::encode(hash.finish())
}

/// What differs between two sets of inputs, one phrase per input: `templates/text.hbs
/// changed`, `suppress[1] added`, ….
#[must_use]
pub fn changes(before: &Inputs, now: &Inputs) -> Vec<String> {
    let mut found = Vec::new();
    for (name, digest) in now {
        match before.get(name) {
            None => found.push(format!("{name} added")),
            Some(old) if old != digest => found.push(format!("{name} changed")),
            Some(_) => {}
        }
    }
    for name in before.keys().filter(|name| !now.contains_key(*name)) {
        found.push(format!("{name} removed"));
    }
    found
}

/// A missing file hashes as `missing`: loading the campaign reports it properly, with its line.
fn hash_file(path: &Path) -> anyhow::Result<String> {
    match crate::files::open(path) {
        Err(error) if error.is_missing() => Ok("missing".to_owned()),
        opened => hash_open(opened?, path),
    }
}

/// The SHA-256 (hex) of what is left to read of `file`, opened from `path`.
fn hash_open(mut file: std::fs::File, path: &Path) -> anyhow::Result<String> {
    let mut hash = Hasher(Context::new(&SHA256));
    std::io::copy(&mut file, &mut hash)
        .with_context(|| format!("cannot read `{}` to fingerprint it", path.display()))?;
    Ok(hex::encode(hash.0.finish()))
}

/// A SHA-256 that `std::io::copy` streams a file into.
struct Hasher(Context);

impl std::io::Write for Hasher {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `path` relative to `dir`, with `/` between its parts.
fn relative(dir: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(dir).unwrap_or(path);
    let mut name = String::new();
    for (i, part) in relative.components().enumerate() {
        if i > 0 {
            name.push('/');
        }
        let _ = write!(name, "{}", part.as_os_str().to_string_lossy());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(pairs: &[(&str, &str)]) -> Inputs {
        pairs
            .iter()
            .map(|(n, h)| ((*n).to_owned(), (*h).to_owned()))
            .collect()
    }

    #[test]
    fn changes_name_each_input_added_changed_or_removed() {
        let before = inputs(&[
            ("campaign file", "1"),
            ("templates/a.hbs", "2"),
            ("recipients", "3"),
        ]);
        let now = inputs(&[
            ("campaign file", "1"),
            ("templates/b.hbs", "2"),
            ("recipients", "4"),
        ]);
        assert_eq!(
            changes(&before, &now),
            [
                "recipients changed",
                "templates/b.hbs added",
                "templates/a.hbs removed"
            ]
        );
        assert!(changes(&now, &now).is_empty());
        assert_eq!(combine(&now), combine(&now.clone()));
        assert_ne!(combine(&before), combine(&now));
    }

    #[test]
    fn hashes_are_sha256_in_hex_as_journals_recorded_them() {
        // Python: hashlib.sha256(b"abc") and hashlib.sha256(b"a\x001\nb\x002\n").
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            hash_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_file(&dir.path().join("none")).unwrap(), "missing");
        assert_eq!(
            combine(&inputs(&[("a", "1"), ("b", "2")])),
            "1a04f75bd0704a1e3a5609aa6cef325ce65e2ccde2c36252d0e2fc2ddcb5762d"
        );
    }
}
