//! The run lock: one `send` per campaign at a time.
//!
//! A lock file beside the journal, locked with the operating system's advisory lock
//! (`File::try_lock`), so it is released whenever the process ends, however it ends. The
//! holder writes its process id into the file for the message a second run prints.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

use crate::exit::{Exit, Failure};

/// Held for the whole run; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Takes the lock at `path` or fails at once (exit 75) naming the process that holds it.
    pub fn acquire(path: &Path, campaign: &str) -> anyhow::Result<Lock> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            // Private whatever the umask, like the journal beside it.
            .mode(0o600)
            .open(path)
            .map_err(|e| io_error(path, "open the lock file", &e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("process {holder}")
                };
                return Err(Failure::new(
                    Exit::WorkRemaining,
                    format!(
                        "campaign `{campaign}` is being sent by {who} (lock `{}`); this run did nothing",
                        path.display()
                    ),
                )
                .into());
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(io_error(path, "lock", &error));
            }
        }
        let written = (|| {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            write!(file, "{}", std::process::id())?;
            file.flush()
        })();
        written.map_err(|e| io_error(path, "write the lock file", &e))?;
        Ok(Lock { _file: file })
    }
}

/// The lock file could not be used (exit 74).
fn io_error(path: &Path, what: &str, error: &std::io::Error) -> anyhow::Error {
    Failure::new(
        Exit::IoError,
        format!("cannot {what} `{}`: {error}", path.display()),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.lock");
        let first = Lock::acquire(&path, "c").unwrap();
        let refused = Lock::acquire(&path, "c").unwrap_err();
        assert_eq!(Exit::of_error(&refused), Exit::WorkRemaining);
        let text = format!("{refused:#}");
        assert!(
            text.contains(&format!("process {}", std::process::id())),
            "{text}"
        );
        drop(first);
        Lock::acquire(&path, "c").unwrap();
    }
}
