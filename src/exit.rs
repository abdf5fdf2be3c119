//! Exit codes, in one place (sysexits spirit), and the error type that carries one.
//!
//! Pure: no I/O. `main.rs` maps whatever `run` returns to a process exit code through here.

use std::fmt;

/// How a command ended. The numbers are part of the public interface: cron jobs branch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every recipient reached a terminal state and none failed.
    Complete = 0,
    /// Complete, but some recipients failed permanently (5xx).
    PermanentFailures = 1,
    /// Halted by `mailer stop` or a safety breaker.
    Halted = 3,
    /// The command line was wrong.
    Usage = 64,
    /// Some input (campaign file, templates, locales, CSV) is invalid; nothing was sent.
    InvalidInput = 65,
    /// The relay could not be used; the work left is still pending.
    RelayUnavailable = 69,
    /// The journal, the state folder or the outbox could not be read or written (disk full,
    /// read-only, permissions): the run stopped at once, and the journal says where it stands.
    IoError = 74,
    /// Work remains (deferred or not yet due), or another run holds the campaign.
    WorkRemaining = 75,
}

impl Exit {
    /// The exit code for an error that reached `main`: the one it carries; an I/O error of
    /// the journal's database (disk full, read-only, cannot open) is an I/O error; anything
    /// else is invalid input, because every other untyped error comes from loading something
    /// the user gave us.
    #[must_use]
    pub fn of_error(error: &anyhow::Error) -> Exit {
        if let Some(failure) = error
            .chain()
            .find_map(|cause| cause.downcast_ref::<Failure>())
        {
            return failure.exit;
        }
        if error.chain().any(is_storage_error) {
            return Exit::IoError;
        }
        Exit::InvalidInput
    }

    /// The worse of two outcomes, for combining results: halts and relay trouble outrank
    /// remaining work, which outranks permanent failures, which outrank success.
    #[must_use]
    pub fn worst(self, other: Exit) -> Exit {
        fn rank(exit: Exit) -> u8 {
            match exit {
                Exit::Complete => 0,
                Exit::PermanentFailures => 1,
                Exit::WorkRemaining => 2,
                Exit::RelayUnavailable => 3,
                Exit::Halted => 4,
                Exit::IoError => 5,
                Exit::InvalidInput => 6,
                Exit::Usage => 7,
            }
        }
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        // The discriminants are all below 256 by construction.
        std::process::ExitCode::from(exit as u8)
    }
}

/// Whether `cause` is the database failing to read or write its files (only the journal is
/// a database), rather than something wrong with an input.
fn is_storage_error(cause: &(dyn std::error::Error + 'static)) -> bool {
    use rusqlite::ErrorCode;
    let Some(rusqlite::Error::SqliteFailure(failure, _)) = cause.downcast_ref::<rusqlite::Error>()
    else {
        return false;
    };
    matches!(
        failure.code,
        ErrorCode::DiskFull
            | ErrorCode::ReadOnly
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::PermissionDenied
            | ErrorCode::NoLargeFileSupport
    )
}

/// An error with a definite exit code, for the places where the cause decides it.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untyped_errors_are_invalid_input_and_typed_ones_keep_their_code() {
        let plain = anyhow::anyhow!("no such file");
        assert_eq!(Exit::of_error(&plain), Exit::InvalidInput);
        let typed =
            anyhow::Error::new(Failure::new(Exit::RelayUnavailable, "refused")).context("sending");
        assert_eq!(Exit::of_error(&typed), Exit::RelayUnavailable);
    }

    #[test]
    fn worst_prefers_the_more_serious_outcome() {
        assert_eq!(
            Exit::Complete.worst(Exit::PermanentFailures),
            Exit::PermanentFailures
        );
        assert_eq!(
            Exit::WorkRemaining.worst(Exit::PermanentFailures),
            Exit::WorkRemaining
        );
        assert_eq!(
            Exit::RelayUnavailable.worst(Exit::Complete),
            Exit::RelayUnavailable
        );
    }
}
