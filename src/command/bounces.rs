//! `mailer bounces`: returned mail read, attributed, classified and recorded.
//!
//! I/O at the edges: reads a Maildir (`new` and `cur`), an mbox file or one message from
//! standard input, each message capped at [`bounce::MAX_MESSAGE`]; never writes to them (an
//! optional `--move-to` renames recorded Maildir files into another folder). The parsing and
//! classification are [`crate::bounce`]'s; the records are the journal's. A message is
//! recorded under the SHA-256 of its bytes, so a second pass over the same mail changes
//! nothing. An unattributed message is listed every time and recorded never: a later pass,
//! after a send that knows its recipient, may still attribute it.

use std::collections::HashMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::{Access, journal_for};
use crate::bounce::{self, Matched, Returned};
use crate::exit::{Exit, Failure};
use crate::journal::{self, Journal, bounces::Candidate};
use crate::printable::Shown;

/// Where the returned mail is.
pub enum Input<'a> {
    Maildir(&'a Path),
    Mbox(&'a Path),
    Stdin,
}

pub struct Options<'a> {
    pub input: Input<'a>,
    pub suppress: Option<&'a Path>,
    pub move_to: Option<&'a Path>,
}

/// One returned message as read: where it came from, and its bytes (`None`: too large).
struct Item {
    source: String,
    path: Option<PathBuf>,
    bytes: Option<Vec<u8>>,
}

/// What a pass did.
#[derive(Default)]
struct Tally {
    read: usize,
    attributed: usize,
    notices: usize,
    moved_rows: usize,
    ignored: usize,
    unattributed: usize,
    already: usize,
}

pub fn run(
    path: &Path,
    state_dir: Option<&Path>,
    options: &Options<'_>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<Exit> {
    let campaign = crate::config::load(path)?;
    let verp = match &campaign.bounces {
        None => None,
        Some(bounces) => Some((
            bounces.return_path.clone(),
            bounces
                .key()
                .map_err(|message| Failure::new(Exit::InvalidInput, message))?,
        )),
    };
    if let Some(dir) = options.move_to
        && !dir.is_dir()
    {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "`--move-to {}` is not a folder: create it (on the Maildir's file system) or leave the option out",
                Shown(dir.display())
            ),
        )
        .into());
    }
    let (_, journal) = journal_for(path, state_dir, Access::Write)?;
    let named = journal::named(journal.path());
    let candidates = journal.bounce_candidates().map_err(&named)?;
    let mut lookup = Lookup::new(
        &candidates,
        &campaign.id,
        verp.as_ref().map(|(_, key)| key.expose().as_bytes()),
    );
    lookup.return_path = verp.as_ref().map(|(path, _)| path.clone());
    lookup.from_domain = campaign.from.email.domain().to_ascii_lowercase();
    let mut tally = Tally::default();
    let mut each = |item: Item| -> anyhow::Result<()> {
        tally.read += 1;
        one(&journal, &lookup, item, options.move_to, &mut tally, out)
    };
    match options.input {
        Input::Maildir(dir) => maildir(dir, &mut each)?,
        Input::Mbox(file) => mbox(file, &mut each)?,
        Input::Stdin => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .lock()
                .take(bounce::MAX_MESSAGE as u64 + 1)
                .read_to_end(&mut bytes)
                .context("cannot read the message on standard input")?;
            each(Item {
                source: "-".to_owned(),
                path: None,
                bytes: (bytes.len() <= bounce::MAX_MESSAGE).then_some(bytes),
            })?;
        }
    }
    writeln!(
        out,
        "{} messages read: {} attributed ({} notices, {} recipients now bounced or complained), {} ignored (auto-replies, other feedback), {} unattributed, {} recorded before",
        tally.read,
        tally.attributed,
        tally.notices,
        tally.moved_rows,
        tally.ignored,
        tally.unattributed,
        tally.already
    )?;
    if let Some(file) = options.suppress {
        let addresses = journal.suppressible().map_err(&named)?;
        let added = append_suppressions(file, &addresses)?;
        writeln!(
            out,
            "{added} addresses added to the suppression file `{}` ({} hard bounces and complaints in the journal)",
            Shown(file.display()),
            addresses.len()
        )?;
    }
    Ok(Exit::Complete)
}

/// The journal's rows by VERP token, Message-ID and address. An address in several slots is
/// the row of its latest attempt.
struct Lookup<'a> {
    candidates: &'a [Candidate],
    by_token: HashMap<String, usize>,
    by_message_id: HashMap<&'a str, usize>,
    by_address: HashMap<String, usize>,
    /// `[bounces] return_path`, when the campaign has one.
    return_path: Option<lettre::Address>,
    /// The sender's domain, which every Message-ID of the campaign is on.
    from_domain: String,
}

impl<'a> Lookup<'a> {
    fn new(candidates: &'a [Candidate], campaign: &str, key: Option<&[u8]>) -> Lookup<'a> {
        let mut by_address: HashMap<String, usize> = HashMap::new();
        for (index, candidate) in candidates.iter().enumerate() {
            let key = crate::recipients::suppression_key(&candidate.address);
            let later = |other: usize| {
                let other = &candidates[other];
                (candidate.last_attempt_at, candidate.id) > (other.last_attempt_at, other.id)
            };
            if by_address.get(&key).is_none_or(|&other| later(other)) {
                by_address.insert(key, index);
            }
        }
        let by_token = key
            .map(|key| {
                by_address
                    .values()
                    .map(|&index| {
                        (
                            bounce::verp::token(key, campaign, &candidates[index].address),
                            index,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let by_message_id = candidates
            .iter()
            .enumerate()
            .filter_map(|(index, c)| c.message_id.as_deref().map(|id| (id, index)))
            .collect();
        Lookup {
            candidates,
            by_token,
            by_message_id,
            by_address,
            return_path: None,
            from_domain: String::new(),
        }
    }
}

/// Reads, attributes and records one message; lists it when it cannot be attributed.
fn one(
    journal: &Journal,
    lookup: &Lookup<'_>,
    item: Item,
    move_to: Option<&Path>,
    tally: &mut Tally,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let named = journal::named(journal.path());
    let Some(bytes) = item.bytes else {
        tally.unattributed += 1;
        writeln!(
            out,
            "unattributed {}: larger than {} MiB, not read",
            Shown(&item.source),
            bounce::MAX_MESSAGE >> 20
        )?;
        return Ok(());
    };
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
    if journal.processed(&digest).map_err(&named)? {
        tally.already += 1;
        return move_file(item.path.as_deref(), move_to);
    }
    let returned = bounce::parse(&bytes);
    if returned.kind.ignored() {
        tally.ignored += 1;
        journal
            .record_returned(
                &digest,
                &item.source,
                returned.kind.name(),
                &[],
                crate::clock::now_millis(),
            )
            .map_err(&named)?;
        writeln!(
            out,
            "ignored {}: {}",
            Shown(&item.source),
            returned.kind.name()
        )?;
        return move_file(item.path.as_deref(), move_to);
    }
    if let Some(why) = elsewhere(&returned, lookup) {
        tally.unattributed += 1;
        writeln!(
            out,
            "unattributed {}: {} from {} \"{}\": {why}",
            Shown(&item.source),
            returned.kind.name(),
            Shown(&returned.from),
            Shown(&returned.subject)
        )?;
        return Ok(());
    }
    let found = attribute(&returned, lookup);
    if found.is_empty() {
        tally.unattributed += 1;
        unattributed(&item.source, &returned, out)?;
        return Ok(());
    }
    let notices: Vec<journal::bounces::Notice<'_>> = found
        .iter()
        .map(|(index, notice, matched)| {
            let candidate = &lookup.candidates[*index];
            journal::bounces::Notice {
                row: candidate.id,
                address: &candidate.address,
                action: notice.action,
                class: notice.class,
                severity: notice.severity,
                status: notice.status.as_deref(),
                diagnostic: notice.diagnostic.as_deref(),
                remote_mta: notice.remote_mta.as_deref(),
                matched_by: matched.name(),
            }
        })
        .collect();
    let moved = journal
        .record_returned(
            &digest,
            &item.source,
            "attributed",
            &notices,
            crate::clock::now_millis(),
        )
        .map_err(&named)?;
    let Some(moved) = moved else {
        tally.already += 1;
        return move_file(item.path.as_deref(), move_to);
    };
    tally.attributed += 1;
    tally.notices += notices.len();
    tally.moved_rows += moved.len();
    for notice in &notices {
        let state = moved
            .iter()
            .find(|(row, _)| *row == notice.row)
            .map_or("state unchanged", |(_, state)| state.name());
        writeln!(
            out,
            "{} {}: {} {} ({}{}) by {}, {}",
            Shown(&item.source),
            Shown(notice.address),
            notice.action.name(),
            notice.class,
            notice.severity.name(),
            notice
                .status
                .map(|s| format!(", {}", Shown(s)))
                .unwrap_or_default(),
            notice.matched_by,
            state
        )?;
    }
    move_file(item.path.as_deref(), move_to)
}

/// Why `returned` is about another campaign's (or schedule slot's) message, if it is: it was
/// returned to a token of ours that is no recipient's here (tokens are per campaign), or it
/// quotes a Message-ID on the sender's domain that this journal never gave. Its
/// Final-Recipient may well be on this campaign's list too, and must not decide then.
fn elsewhere(returned: &Returned, lookup: &Lookup<'_>) -> Option<&'static str> {
    let return_path = lookup.return_path.as_ref();
    let from_domain = lookup.from_domain.as_str();
    let tokens: Vec<String> = returned
        .envelope
        .iter()
        .filter_map(|a| return_path.and_then(|path| bounce::verp::token_in(path, a)))
        .collect();
    if !tokens.is_empty() && !tokens.iter().any(|t| lookup.by_token.contains_key(t)) {
        return Some(
            "its return path's token is no recipient's of this campaign (another campaign's, or another key)",
        );
    }
    let ours = |id: &&String| {
        id.rsplit_once('@')
            .is_some_and(|(_, domain)| domain.eq_ignore_ascii_case(from_domain))
    };
    let quoted: Vec<&String> = returned.message_ids.iter().filter(ours).collect();
    if tokens.is_empty()
        && !quoted.is_empty()
        && !quoted
            .iter()
            .any(|id| lookup.by_message_id.contains_key(id.as_str()))
    {
        return Some(
            "its original Message-ID is on the sender's domain but not in this campaign's journal (another campaign's or a canary's)",
        );
    }
    None
}

/// The rows `returned` is about (indexes into the candidates), in the attribution order.
fn attribute<'r>(
    returned: &'r Returned,
    lookup: &Lookup<'_>,
) -> Vec<(usize, &'r bounce::Notice, Matched)> {
    let return_path = lookup.return_path.as_ref();
    bounce::attribute(
        returned,
        |address| return_path.and_then(|path| bounce::verp::token_in(path, address)),
        |token| lookup.by_token.get(token).copied(),
        |id| lookup.by_message_id.get(id).copied(),
        |address| {
            lookup
                .by_address
                .get(&crate::recipients::suppression_key(address))
                .copied()
        },
    )
}

/// Lists a message no recipient could be found for: what it is and what it names.
fn unattributed(
    source: &str,
    returned: &Returned,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let named: Vec<String> = returned
        .notices
        .iter()
        .filter_map(|n| n.recipient.as_deref())
        .chain(returned.candidates.iter().map(String::as_str))
        .take(5)
        .map(|a| Shown(a).to_string())
        .collect();
    writeln!(
        out,
        "unattributed {}: {} from {} \"{}\"{}",
        Shown(source),
        returned.kind.name(),
        Shown(&returned.from),
        Shown(&returned.subject),
        if named.is_empty() {
            String::new()
        } else {
            format!(
                ", naming {} (not recipients of this campaign)",
                named.join(", ")
            )
        }
    )
}

/// Moves a recorded Maildir file into `into`, keeping its name; never over another file.
fn move_file(file: Option<&Path>, into: Option<&Path>) -> anyhow::Result<()> {
    let (Some(file), Some(into)) = (file, into) else {
        return Ok(());
    };
    let Some(name) = file.file_name() else {
        return Ok(());
    };
    let target = into.join(name);
    if target.exists() {
        tracing::warn!(file = %file.display(), "not moved: `{}` exists already", target.display());
        return Ok(());
    }
    std::fs::rename(file, &target).with_context(|| {
        format!(
            "cannot move `{}` to `{}` (`--move-to` must be on the Maildir's file system)",
            file.display(),
            into.display()
        )
    })
}

/// Reads at most [`bounce::MAX_MESSAGE`] bytes of a regular file; `None` when larger.
fn read_capped(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let mut bytes = Vec::new();
    file.take(bounce::MAX_MESSAGE as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    Ok((bytes.len() <= bounce::MAX_MESSAGE).then_some(bytes))
}

/// The messages of a Maildir's `new` and `cur` folders, in name order; `tmp` is being
/// written by the delivery agent and is left alone.
fn maildir(dir: &Path, each: &mut impl FnMut(Item) -> anyhow::Result<()>) -> anyhow::Result<()> {
    if !dir.join("new").is_dir() && !dir.join("cur").is_dir() {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "`--maildir {}` is not a Maildir (no `new` or `cur` folder): give the Maildir's own folder",
                Shown(dir.display())
            ),
        )
        .into());
    }
    for folder in ["new", "cur"] {
        let folder_path = dir.join(folder);
        let Ok(entries) = std::fs::read_dir(&folder_path) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            each(Item {
                source: format!("{folder}/{name}"),
                bytes: read_capped(&file)?,
                path: Some(file),
            })?;
        }
    }
    Ok(())
}

/// The messages of an mbox file (a `From ` line at the start or after a blank line starts
/// one; `>From ` lines lose one `>`), read line by line within bounds.
fn mbox(file: &Path, each: &mut impl FnMut(Item) -> anyhow::Result<()>) -> anyhow::Result<()> {
    const MAX_LINE: u64 = 64 << 10;
    let opened =
        std::fs::File::open(file).with_context(|| format!("cannot open `{}`", file.display()))?;
    let mut reader = std::io::BufReader::new(opened);
    let label = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut message: Option<(Vec<u8>, bool)> = None;
    let mut count = 0;
    let mut previous_blank = true;
    let mut whole_line = true;
    let mut line = Vec::new();
    let mut flush = |message: Option<(Vec<u8>, bool)>, count: usize| -> anyhow::Result<()> {
        if let Some((bytes, fits)) = message {
            each(Item {
                source: format!("{label}#{count}"),
                path: None,
                bytes: fits.then_some(bytes),
            })?;
        }
        Ok(())
    };
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read `{}`", file.display()))?;
        if read == 0 {
            break;
        }
        let starts_line = whole_line;
        whole_line = line.ends_with(b"\n");
        if starts_line && previous_blank && line.starts_with(b"From ") {
            flush(message.take(), count)?;
            count += 1;
            message = Some((Vec::new(), true));
            previous_blank = false;
            continue;
        }
        previous_blank = starts_line && whole_line && (line == b"\n" || line == b"\r\n");
        if let Some((bytes, fits)) = message.as_mut().filter(|(_, fits)| *fits) {
            let unescaped = if starts_line
                && line.starts_with(b">")
                && line
                    .iter()
                    .skip_while(|&&b| b == b'>')
                    .take(5)
                    .eq(b"From ".iter())
            {
                &line[1..]
            } else {
                &line[..]
            };
            if bytes.len() + unescaped.len() > bounce::MAX_MESSAGE {
                *fits = false;
                bytes.clear();
            } else {
                bytes.extend_from_slice(unescaped);
            }
        }
    }
    flush(message, count)
}

/// Appends `addresses` not yet in the suppression file `file` (one address per line), and gives
/// how many were added. The file is opened for appending (made 0600 if new, its mode kept
/// otherwise) and locked while it is read and the new lines go on its end in one write: lines
/// an unsubscribe endpoint appends meanwhile are not lost, and a writer that keeps the file
/// open goes on writing to the same file.
fn append_suppressions(file: &Path, addresses: &[String]) -> anyhow::Result<usize> {
    use std::io::Seek as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let failed = |what: &str, error: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot {what} the suppression file `{}`: {error}",
            file.display()
        )
    };
    let mut handle = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(file)
        .map_err(|e| failed("open", &e))?;
    let metadata = handle.metadata().map_err(|e| failed("read", &e))?;
    if !metadata.is_file() {
        return Err(failed("write", &"it is not a regular file"));
    }
    // Released when `handle` closes.
    handle.lock().map_err(|e| failed("lock", &e))?;
    let mut bytes = Vec::new();
    handle.rewind().map_err(|e| failed("read", &e))?;
    (&mut handle)
        .take(crate::files::SUPPRESSION_CAP + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| failed("read", &e))?;
    if bytes.len() as u64 > crate::files::SUPPRESSION_CAP {
        return Err(failed(
            "read",
            &format!("it is larger than {} bytes", crate::files::SUPPRESSION_CAP),
        ));
    }
    let text = String::from_utf8_lossy(&bytes);
    if text.lines().next().is_some_and(|first| first.contains(',')) {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "`--suppress {}` is a CSV file: give a suppression file of one address per line (a new file is fine)",
                Shown(file.display())
            ),
        )
        .into());
    }
    let mut known = std::collections::HashSet::new();
    let _ = crate::recipients::parse_suppressions(file, &text, &mut known);
    let new: Vec<&String> = addresses
        .iter()
        .filter(|a| known.insert(crate::recipients::suppression_key(a)))
        .collect();
    if new.is_empty() {
        return Ok(0);
    }
    let mut lines = String::new();
    if text.is_empty() {
        lines.push_str("# hard bounces and complaints added by `mailer bounces`\n");
    } else if !text.ends_with('\n') {
        lines.push('\n');
    }
    for address in &new {
        lines.push_str(address);
        lines.push('\n');
    }
    handle
        .write_all(lines.as_bytes())
        .and_then(|()| handle.sync_all())
        .map_err(|e| failed("write", &e))?;
    Ok(new.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(mbox_text: &str) -> Vec<(String, Option<Vec<u8>>)> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("box");
        std::fs::write(&file, mbox_text).unwrap();
        let mut found = Vec::new();
        mbox(&file, &mut |item: Item| {
            found.push((item.source, item.bytes));
            Ok(())
        })
        .unwrap();
        found
    }

    #[test]
    fn an_mbox_is_split_on_from_lines_and_unescaped() {
        let found = items(
            "From MAILER-DAEMON Tue Dec  1 10:00:00 2026\nSubject: one\n\n>From the start\nbody\n\nFrom x Tue Dec  1 10:00:01 2026\nSubject: two\n\nFrom inside, not after a blank line? yes it is\n",
        );
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0].0, "box#1");
        assert_eq!(
            found[0].1.as_deref(),
            Some(&b"Subject: one\n\nFrom the start\nbody\n\n"[..])
        );
        assert_eq!(found[1].1.as_deref(), Some(&b"Subject: two\n\n"[..]));
        assert!(items("").is_empty());
    }

    #[test]
    fn the_suppression_file_grows_once_per_address_and_stays_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bounced.txt");
        std::fs::write(&file, "# mine\nAnn@Example.com").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        // An unsubscribe endpoint that keeps the file open for appending.
        let mut endpoint = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        let addresses = vec!["ann@example.com".to_owned(), "bob@example.com".to_owned()];
        assert_eq!(append_suppressions(&file, &addresses).unwrap(), 1);
        endpoint.write_all(b"carol@example.com\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "# mine\nAnn@Example.com\nbob@example.com\ncarol@example.com\n",
            "appended, and the endpoint's line lands in the same file"
        );
        assert_eq!(
            append_suppressions(&file, &addresses).unwrap(),
            0,
            "nothing twice"
        );
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o640,
            "an existing file keeps its mode"
        );
        let csv = dir.path().join("list.csv");
        std::fs::write(&csv, "email,name\n").unwrap();
        assert!(append_suppressions(&csv, &addresses).is_err());
        let new = dir.path().join("new.txt");
        assert_eq!(append_suppressions(&new, &addresses).unwrap(), 2);
        assert_eq!(
            std::fs::metadata(&new).unwrap().permissions().mode() & 0o777,
            0o600,
            "a new file is private"
        );
        let mut known = std::collections::HashSet::new();
        let problems = crate::recipients::parse_suppressions(
            &new,
            &std::fs::read_to_string(&new).unwrap(),
            &mut known,
        );
        assert!(problems.is_empty());
        assert_eq!(known.len(), 2, "the format `[recipients] suppress` reads");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            3,
            "no other file made"
        );
    }
}
