//! Where a campaign's journal lives — and the record that keeps it in one place.
//!
//! One campaign has one journal. A second journal (another `--state-dir`, a deleted or emptied
//! file) would know nobody was sent to and send everyone again, so the first time a journal
//! is made for a campaign, a small record beside the campaign file, `.mailer-<id>.where`,
//! notes where it is. Later commands use that journal whatever `--state-dir` says, refuse a
//! `--state-dir` that names another one, and refuse to start over when the recorded journal is
//! missing. Moving a journal on purpose is `--move-journal`, once the file is in its new place.
//!
//! I/O: reads and writes the record; decides nothing about the journal's contents.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::exit::{Exit, Failure};

/// Where a campaign's journal and lock live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub journal: PathBuf,
    pub lock: PathBuf,
}

impl Place {
    /// `DIR/<campaign id>.journal` and `.lock`, where DIR is `state_dir` or, by default,
    /// `mailer-state` beside the campaign file. Pure: the record is not consulted (see
    /// [`locate`]).
    #[must_use]
    pub fn new(campaign_file: &Path, state_dir: Option<&Path>, campaign_id: &str) -> Place {
        let dir = state_dir.map_or_else(
            || {
                campaign_file
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join("mailer-state")
            },
            Path::to_path_buf,
        );
        Place::in_dir(&dir, campaign_id)
    }

    /// The journal and lock of `campaign_id` in the state folder `dir`.
    #[must_use]
    pub fn in_dir(dir: &Path, campaign_id: &str) -> Place {
        Place {
            journal: dir.join(format!("{campaign_id}.journal")),
            lock: dir.join(format!("{campaign_id}.lock")),
        }
    }

    /// The state folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.journal.parent().unwrap_or_else(|| Path::new("."))
    }
}

/// A campaign's journal place, as the record beside its campaign file has it.
#[derive(Debug)]
pub struct Located {
    pub place: Place,
    /// The record's path.
    pub record: PathBuf,
    /// Whether the record names this journal already (else it is written when the journal is
    /// opened for writing).
    pub recorded: bool,
    /// The campaign file, absolute: the record names it.
    campaign_file: PathBuf,
}

impl Located {
    /// Notes the journal's place in the record, if it is not there yet.
    pub fn record(&self) -> anyhow::Result<()> {
        if self.recorded {
            return Ok(());
        }
        let campaign = self
            .campaign_file
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = format!(
            "# mailer: campaign journal of this folder's campaign. Keep this file: without it mailer\n\
             # cannot tell a new campaign from this one with its journal lost, and would send again.\n\
             journal = {}\n\
             campaign = {campaign}\n",
            self.place.journal.display()
        );
        write_atomically(&self.record, &text).map_err(|e| {
            Failure::new(
                Exit::IoError,
                format!(
                    "cannot record where the journal of this campaign is, in `{}`: {e:#}; mailer needs that record to refuse a second journal for the same campaign",
                    self.record.display()
                ),
            )
            .into()
        })
    }
}

/// The record of campaign `campaign_id` beside `campaign_file`.
#[must_use]
pub fn record_path(campaign_file: &Path, campaign_id: &str) -> PathBuf {
    campaign_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!(".mailer-{campaign_id}.where"))
}

/// What a command means to do with the journal it locates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Only read it (`status`, `report`): a `--state-dir` is taken as given, so that a copy
    /// or a backup can be looked at.
    Read,
    /// Write it, or create it.
    Write,
    /// Write it where `--state-dir` says, the journal having been moved there on purpose.
    Move,
}

/// Where the journal of `campaign_id` is: the recorded place, if there is a record; else
/// `state_dir`, or `mailer-state` beside the campaign file. To write, a `--state-dir` that
/// names another place than the record is refused (exit 64), unless the intent is
/// [`Intent::Move`] and the journal has been moved there. A relative `--state-dir` is
/// refused, since it would name another folder from another working directory.
pub fn locate(
    campaign_file: &Path,
    state_dir: Option<&Path>,
    campaign_id: &str,
    intent: Intent,
) -> anyhow::Result<Located> {
    if let Some(dir) = state_dir.filter(|d| d.is_relative()) {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "--state-dir `{}` is a relative path: give an absolute one, so that it names the same folder wherever mailer runs from",
                dir.display()
            ),
        )
        .into());
    }
    let campaign_file = std::path::absolute(campaign_file).with_context(|| {
        format!(
            "cannot tell where the campaign file `{}` is",
            campaign_file.display()
        )
    })?;
    let record = record_path(&campaign_file, campaign_id);
    let asked = Place::new(&campaign_file, state_dir, campaign_id);
    if intent == Intent::Read && state_dir.is_some() {
        return Ok(Located {
            place: asked,
            record,
            recorded: false,
            campaign_file: campaign_file.clone(),
        });
    }
    let Some(recorded) = read_record(&record)? else {
        if intent != Intent::Read {
            renamed_campaign(&campaign_file, campaign_id)?;
        }
        return Ok(Located {
            place: asked,
            record,
            recorded: false,
            campaign_file: campaign_file.clone(),
        });
    };
    let recorded = Place {
        lock: recorded.with_extension("lock"),
        journal: recorded,
    };
    if state_dir.is_none() || same_file(&recorded.journal, &asked.journal) {
        return Ok(Located {
            place: recorded,
            record,
            recorded: true,
            campaign_file: campaign_file.clone(),
        });
    }
    if intent != Intent::Move {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "campaign `{campaign_id}` keeps its journal at `{}` (recorded in `{}`), and this run would use `{}`: a second journal would send everyone again; nothing was sent — leave out --state-dir to use the recorded journal, or move the journal file (with its -wal and -shm files) to the new folder and run again with --move-journal",
                recorded.journal.display(),
                record.display(),
                asked.journal.display()
            ),
        )
        .into());
    }
    if !asked.journal.is_file() || recorded.journal.exists() {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "--move-journal: move `{}` (with its -wal and -shm files) to `{}` first; mailer moves the record, not the journal, and never starts a second one; nothing was sent",
                recorded.journal.display(),
                asked.dir().display()
            ),
        )
        .into());
    }
    tracing::warn!(from = %recorded.journal.display(), to = %asked.journal.display(), "the campaign's journal was moved: recorded");
    Ok(Located {
        place: asked,
        record,
        recorded: false,
        campaign_file,
    })
}

/// Refuses a new campaign id for a campaign file that already has a journal under another id:
/// editing `[campaign] id` would otherwise make a new campaign, with a new journal that knows
/// nobody was sent to, and send the whole list again.
fn renamed_campaign(campaign_file: &Path, campaign_id: &str) -> anyhow::Result<()> {
    let (Some(dir), Some(name)) = (campaign_file.parent(), campaign_file.file_name()) else {
        return Ok(());
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let wanted = format!("campaign = {}", name.to_string_lossy());
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(other) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(".mailer-"))
            .and_then(|n| n.strip_suffix(".where"))
        else {
            continue;
        };
        if other == campaign_id {
            continue;
        }
        let Ok(text) = crate::files::read_text(&entry.path(), 64 << 10) else {
            continue;
        };
        if text.lines().any(|line| line == wanted) {
            let journal = text
                .lines()
                .find_map(|line| line.strip_prefix("journal = "))
                .unwrap_or("?");
            return Err(Failure::new(
                Exit::InvalidInput,
                format!(
                    "`{}` already ran as campaign `{other}` (journal `{journal}`, recorded in `{}`); with `[campaign] id = \"{campaign_id}\"` it would be a new campaign and send to everyone again; nothing was sent — put back `id = \"{other}\"` to go on with that campaign, or save the file under another name to start a new campaign from it on purpose",
                    campaign_file.display(),
                    entry.path().display()
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// The journal path the record names, if there is a record.
fn read_record(record: &Path) -> anyhow::Result<Option<PathBuf>> {
    let text = match std::fs::read_to_string(record) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Failure::new(
                Exit::IoError,
                format!(
                    "cannot read `{}`, the record of where this campaign's journal is: {e}",
                    record.display()
                ),
            )
            .into());
        }
    };
    let journal = text
        .lines()
        .filter_map(|line| line.strip_prefix("journal = "))
        .map(PathBuf::from)
        .find(|path| path.is_absolute());
    match journal {
        Some(journal) => Ok(Some(journal)),
        None => Err(Failure::new(
            Exit::IoError,
            format!(
                "`{}` does not say where this campaign's journal is (a line `journal = /absolute/path`); nothing was sent — restore it, or write that line",
                record.display()
            ),
        )
        .into()),
    }
}

/// Whether two journal paths are the same file: their folders resolved when they exist (a
/// link to the same folder is the same place), compared as written otherwise.
fn same_file(a: &Path, b: &Path) -> bool {
    let resolved = |path: &Path| {
        let dir = path.parent().and_then(|d| d.canonicalize().ok());
        match (dir, path.file_name()) {
            (Some(dir), Some(name)) => dir.join(name),
            _ => path.to_path_buf(),
        }
    };
    resolved(a) == resolved(b)
}

/// Writes `text` to `path` through a temporary file and a rename, so that a reader sees the
/// old record or the new one, never half of one.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let temporary = path.with_extension(format!("where.{}", std::process::id()));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_place_is_beside_the_campaign_unless_a_state_folder_is_given() {
        let place = Place::new(Path::new("/x/y/campaign.toml"), None, "c1");
        assert_eq!(place.journal, Path::new("/x/y/mailer-state/c1.journal"));
        assert_eq!(place.lock, Path::new("/x/y/mailer-state/c1.lock"));
        let place = Place::new(Path::new("campaign.toml"), Some(Path::new("/s")), "c1");
        assert_eq!(place.journal, Path::new("/s/c1.journal"));
    }

    #[test]
    fn the_record_keeps_one_journal_per_campaign() {
        let dir = tempfile::tempdir().unwrap();
        let campaign = dir.path().join("campaign.toml");
        let elsewhere = dir.path().join("elsewhere");
        let first = locate(&campaign, None, "c1", Intent::Write).unwrap();
        assert!(!first.recorded);
        assert_eq!(
            first.place.journal,
            dir.path().join("mailer-state/c1.journal")
        );
        first.record().unwrap();
        // Without --state-dir, and with the same folder given, the recorded journal.
        let again = locate(&campaign, None, "c1", Intent::Write).unwrap();
        assert!(again.recorded);
        assert_eq!(again.place, first.place);
        let same = locate(
            &campaign,
            Some(&dir.path().join("mailer-state")),
            "c1",
            Intent::Write,
        )
        .unwrap();
        assert_eq!(same.place, first.place);
        // Another folder: refused, naming both.
        let refused = locate(&campaign, Some(&elsewhere), "c1", Intent::Write).unwrap_err();
        assert_eq!(Exit::of_error(&refused), Exit::Usage);
        let text = format!("{refused:#}");
        assert!(
            text.contains("mailer-state/c1.journal") && text.contains("elsewhere/c1.journal"),
            "{text}"
        );
        // Moving needs the journal moved first.
        std::fs::create_dir_all(first.place.dir()).unwrap();
        std::fs::write(&first.place.journal, b"x").unwrap();
        assert!(locate(&campaign, Some(&elsewhere), "c1", Intent::Move).is_err());
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::rename(&first.place.journal, elsewhere.join("c1.journal")).unwrap();
        let moved = locate(&campaign, Some(&elsewhere), "c1", Intent::Move).unwrap();
        assert_eq!(moved.place.journal, elsewhere.join("c1.journal"));
        moved.record().unwrap();
        assert_eq!(
            locate(&campaign, None, "c1", Intent::Write).unwrap().place,
            moved.place
        );
        // Reading a copy elsewhere is fine.
        let copy = locate(
            &campaign,
            Some(&dir.path().join("copy")),
            "c1",
            Intent::Read,
        )
        .unwrap();
        assert_eq!(copy.place.journal, dir.path().join("copy/c1.journal"));
        // Another campaign in the same folder has its own record.
        assert!(
            !locate(
                &dir.path().join("other.toml"),
                Some(&elsewhere),
                "c2",
                Intent::Write
            )
            .unwrap()
            .recorded
        );
        // The same campaign file under a new id: refused, naming the old id, to write; read,
        // it is just another (empty) campaign.
        let renamed = locate(&campaign, None, "c3", Intent::Write).unwrap_err();
        assert_eq!(Exit::of_error(&renamed), Exit::InvalidInput);
        let text = format!("{renamed:#}");
        assert!(
            text.contains("already ran as campaign `c1`")
                && text.contains("put back `id = \"c1\"`"),
            "{text}"
        );
        assert!(locate(&campaign, None, "c3", Intent::Read).is_ok());
        // Another campaign file in the same folder may have any id.
        assert!(locate(&dir.path().join("other.toml"), None, "c3", Intent::Write).is_ok());
        // A relative --state-dir is refused.
        let relative = locate(&campaign, Some(Path::new("state")), "c1", Intent::Read).unwrap_err();
        assert_eq!(Exit::of_error(&relative), Exit::Usage);
    }
}
