//! The campaign's files, read within bounds (invariant 12): only regular files, never more
//! than a cap, and — for the files found by listing a folder — only where a link stays inside
//! the campaign's folders.
//!
//! A FIFO or a device would hang a read or never end it, a link could bring `/etc/passwd`
//! into every message, and a 50 MB template costs more than a gigabyte to compile. So every
//! input goes through [`open`] (the file type is checked on the opened file, which is opened
//! without blocking, so a FIFO cannot hang it) and [`read_text`] (capped).

use std::fmt;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The most a campaign file or a `.ftl` file may hold.
pub const SOURCE_CAP: u64 = 1 << 20;
/// The most a template or a partial may hold: over twice what the largest webmail shows before
/// clipping a message (compiling costs the square of a template's size, see
/// `render::bounds::MAX_TAGS`).
pub const TEMPLATE_CAP: u64 = 256 << 10;
/// The most a suppression list may hold (read whole; about ten million addresses).
pub const SUPPRESSION_CAP: u64 = 256 << 20;
/// The most a secret (a password file, a DKIM key, a CA bundle) may hold.
pub const SECRET_CAP: u64 = 1 << 20;

/// Why a file was not read. Each says which file, in one sentence.
#[derive(Debug)]
pub enum FileError {
    /// A FIFO, a device, a socket or a folder where a file was expected.
    NotRegular { path: PathBuf, kind: &'static str },
    /// A link whose target is outside the campaign's folders.
    Outside { path: PathBuf, target: PathBuf },
    /// A link that loops, or a chain of links too long to follow.
    Loops { path: PathBuf },
    /// Larger than its cap.
    TooLarge { path: PathBuf, cap: u64 },
    /// Not UTF-8.
    NotText { path: PathBuf },
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl FileError {
    /// Whether the file does not exist (a missing file is often something the caller words
    /// better: "the template folder has no `subject.hbs`").
    #[must_use]
    pub fn is_missing(&self) -> bool {
        matches!(self, FileError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
    }

    /// The file the error is about.
    #[must_use]
    pub fn path(&self) -> &Path {
        match self {
            FileError::NotRegular { path, .. }
            | FileError::Outside { path, .. }
            | FileError::Loops { path }
            | FileError::TooLarge { path, .. }
            | FileError::NotText { path }
            | FileError::Io { path, .. } => path,
        }
    }

    /// The sentence without the file's name, for a problem that names the file itself.
    #[must_use]
    pub fn reason(&self) -> String {
        match self {
            FileError::NotRegular { kind, .. } => {
                format!("is {kind}, not a regular file; mailer reads only regular files")
            }
            FileError::Outside { target, .. } => format!(
                "is a link to `{}`, outside the campaign's folders; copy the file in instead",
                target.display()
            ),
            FileError::Loops { .. } => "is a link that loops".to_owned(),
            FileError::TooLarge { cap, .. } => {
                format!(
                    "is larger than {}, the most mailer reads from it",
                    size(*cap)
                )
            }
            FileError::NotText { .. } => "is not UTF-8 text; save it as UTF-8".to_owned(),
            FileError::Io { error, .. } => format!("cannot be read ({error})"),
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.path().display(), self.reason())
    }
}

impl std::error::Error for FileError {}

/// A byte count as people read it: `1 MiB`, `256 MiB`, `1500 bytes`.
#[must_use]
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

fn io(path: &Path, error: std::io::Error) -> FileError {
    // A link loop, or more links in a row than the system follows.
    if error.raw_os_error() == Some(libc::ELOOP) {
        return FileError::Loops {
            path: path.to_path_buf(),
        };
    }
    FileError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Opens `path` (following links) for reading if it is a regular file. Opened without
/// blocking, so a FIFO is refused rather than waited on; the type is read from the opened file.
pub fn open(path: &Path) -> Result<File, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| io(path, error))?;
    let kind = file
        .metadata()
        .map_err(|error| io(path, error))?
        .file_type();
    let name = if kind.is_file() {
        return Ok(file);
    } else if kind.is_dir() {
        "a folder"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(FileError::NotRegular {
        path: path.to_path_buf(),
        kind: name,
    })
}

/// The bytes of the regular file at `path`, if it holds at most `cap`.
pub fn read(path: &Path, cap: u64) -> Result<Vec<u8>, FileError> {
    let file = open(path)?;
    let mut bytes = Vec::new();
    // One byte more than the cap tells a file at the cap from a larger one, even if it grew
    // after it was opened.
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| io(path, error))?;
    if bytes.len() as u64 > cap {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            cap,
        });
    }
    Ok(bytes)
}

/// The text of the regular file at `path`: UTF-8, at most `cap` bytes.
pub fn read_text(path: &Path, cap: u64) -> Result<String, FileError> {
    String::from_utf8(read(path, cap)?).map_err(|_| FileError::NotText {
        path: path.to_path_buf(),
    })
}

/// The folders a campaign's listed files may live in: its template or locales folder and the
/// folder of the campaign file, as the system resolves them.
#[derive(Debug, Clone)]
pub struct Folders(Vec<PathBuf>);

impl Folders {
    /// `folders` that do not exist are left out (the loaders say they are missing).
    #[must_use]
    pub fn new<'a>(folders: impl IntoIterator<Item = &'a Path>) -> Folders {
        Folders(
            folders
                .into_iter()
                .filter_map(|folder| std::fs::canonicalize(folder).ok())
                .collect(),
        )
    }

    /// Checks that `path`, with every link on the way resolved, is inside one of the folders.
    /// A link that loops is an error naming it.
    pub fn contain(&self, path: &Path) -> Result<(), FileError> {
        let target = std::fs::canonicalize(path).map_err(|error| io(path, error))?;
        if self.0.iter().any(|folder| target.starts_with(folder)) {
            Ok(())
        } else {
            Err(FileError::Outside {
                path: path.to_path_buf(),
                target,
            })
        }
    }

    /// [`read_text`] for a file found by listing a folder: it must stay inside the folders.
    pub fn read_text(&self, path: &Path, cap: u64) -> Result<String, FileError> {
        self.contain(path)?;
        read_text(path, cap)
    }
}

/// The entries of `dir` whose name ends in `.extension`, sorted so that loading order is
/// stable. Links are listed as they are; [`Folders::read_text`] decides about them.
pub fn listed(dir: &Path, extension: &str) -> Result<Vec<PathBuf>, FileError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|error| io(dir, error))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == extension))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn only_regular_files_within_the_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.hbs");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read_text(&file, 5).unwrap(), "hello");
        let error = read_text(&file, 4).unwrap_err();
        assert!(
            matches!(error, FileError::TooLarge { cap: 4, .. }),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .ends_with("is larger than 4 bytes, the most mailer reads from it"),
            "{error}"
        );
        let error = read_text(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(
            error.to_string(),
            "`/dev/zero` is a device, not a regular file; mailer reads only regular files"
        );
        let error = read_text(dir.path(), 10).unwrap_err();
        assert!(error.to_string().contains("is a folder"), "{error}");
        std::fs::write(dir.path().join("latin1"), b"caf\xe9").unwrap();
        let error = read_text(&dir.path().join("latin1"), 10).unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("is not UTF-8 text; save it as UTF-8")
        );
        assert!(
            read_text(&dir.path().join("none"), 10)
                .unwrap_err()
                .is_missing()
        );
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.hbs");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let error = read_text(&fifo, 10).unwrap_err();
        assert!(error.to_string().contains("is a FIFO"), "{error}");
    }

    #[test]
    fn links_must_stay_inside_the_folders_and_loops_are_named() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("passwd");
        std::fs::write(&secret, "root:x:0:0").unwrap();
        let campaign = tempfile::tempdir().unwrap();
        let partials = campaign.path().join("templates/partials");
        std::fs::create_dir_all(&partials).unwrap();
        std::fs::write(partials.join("footer.hbs"), "bye").unwrap();
        symlink("footer.hbs", partials.join("inside.hbs")).unwrap();
        symlink(&secret, partials.join("x.hbs")).unwrap();
        symlink("loop.hbs", partials.join("loop.hbs")).unwrap();
        let folders = Folders::new([campaign.path().join("templates").as_path()]);
        assert_eq!(
            folders.read_text(&partials.join("inside.hbs"), 10).unwrap(),
            "bye"
        );
        let error = folders.read_text(&partials.join("x.hbs"), 10).unwrap_err();
        assert!(matches!(error, FileError::Outside { .. }), "{error}");
        let text = error.to_string();
        assert!(
            text.contains("x.hbs` is a link to `") && text.contains("passwd`"),
            "{text}"
        );
        let error = folders
            .read_text(&partials.join("loop.hbs"), 10)
            .unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("loop.hbs` is a link that loops"),
            "{error}"
        );
        assert_eq!(listed(&partials, "hbs").unwrap().len(), 4);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(SOURCE_CAP), "1 MiB");
        assert_eq!(size(SUPPRESSION_CAP), "256 MiB");
        assert_eq!(size(64 << 10), "64 KiB");
        assert_eq!(size(1500), "1500 bytes");
    }
}
