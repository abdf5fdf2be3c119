//! The file transport: one `.eml` file per message in the outbox folder.
//!
//! Files are named by the message's stable id, so re-running a campaign rewrites the same files
//! instead of adding copies, and each is written to a temporary name and renamed, so a crash
//! never leaves half a message behind.

use std::path::PathBuf;

use super::RelayFailure;
use crate::outcome::{Attempt, State};
use crate::render::OutgoingMessage;

#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub fn new(dir: PathBuf) -> Outbox {
        Outbox { dir }
    }

    pub async fn write(&self, message: &OutgoingMessage) -> Result<Attempt, RelayFailure> {
        let fail = |what: &str, error: std::io::Error| {
            RelayFailure::local(format!(
                "cannot {what} the outbox `{}`: {error}",
                self.dir.display()
            ))
        };
        if !self.dir.exists() {
            // Private, whatever the umask: the messages hold addresses and unsubscribe links.
            let mut folder = tokio::fs::DirBuilder::new();
            folder.recursive(true).mode(0o700);
            folder
                .create(&self.dir)
                .await
                .map_err(|e| fail("create", e))?;
        }
        let name = message
            .message_id
            .split('@')
            .next()
            .unwrap_or(&message.message_id);
        let path = self.dir.join(format!("{name}.eml"));
        let partial = self.dir.join(format!(".{name}.eml.partial"));
        let written = write_private(&partial, &message.bytes).await;
        let renamed = match written {
            Ok(()) => tokio::fs::rename(&partial, &path).await,
            Err(e) => Err(e),
        };
        if let Err(e) = renamed {
            // A full or read-only folder leaves no half-written file behind.
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(fail("write into", e));
        }
        Ok(Attempt::without_reply(
            State::Sent,
            path.display().to_string(),
        ))
    }
}

/// Writes `bytes` to a new file at `path` readable by its owner only (0600), whatever the
/// umask.
async fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await?;
    file.write_all(bytes).await?;
    file.flush().await
}

#[cfg(test)]
mod tests {
    use super::super::tests::message;
    use super::*;

    #[tokio::test]
    async fn a_message_is_one_file_named_by_its_id_rewritten_on_a_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path().join("new").join("outbox"));
        let first = message(1, "a@x.example");
        let path = dir
            .path()
            .join("new/outbox")
            .join(format!("{:032x}.eml", 1));
        let attempt = outbox.write(&first).await.unwrap();
        assert_eq!(
            attempt,
            Attempt::without_reply(State::Sent, path.display().to_string())
        );
        assert_eq!(std::fs::read(&path).unwrap(), first.bytes);
        // The same message again (a re-run) replaces the file rather than adding one.
        let mut again = first.clone();
        again.bytes = b"Subject: again\r\n\r\nagain\r\n".to_vec();
        outbox.write(&again).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), again.bytes);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("new/outbox"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [format!("{:032x}.eml", 1)],
            "nothing half-written left"
        );
    }

    #[tokio::test]
    async fn an_outbox_that_cannot_be_made_is_a_relay_failure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let outbox = Outbox::new(file.join("outbox"));
        let failure = outbox
            .write(&message(1, "a@x.example"))
            .await
            .expect_err("a file is in the way");
        assert_eq!(failure.kind, super::super::FailureKind::Local);
        assert!(
            failure.reason.starts_with(&format!(
                "cannot create the outbox `{}`: ",
                file.join("outbox").display()
            )),
            "{}",
            failure.reason
        );
    }

    /// DESIGN.md: "The state folder is private (0700, files 0600), and so is the outbox."
    #[tokio::test]
    async fn the_outbox_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path().join("outbox"));
        outbox.write(&message(1, "a@x.example")).await.unwrap();
        let mode = |path: &std::path::Path| {
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            format!("{:o}", mode & 0o777)
        };
        let file = dir.path().join("outbox").join(format!("{:032x}.eml", 1));
        assert_eq!(
            (mode(&dir.path().join("outbox")), mode(&file)),
            ("700".to_owned(), "600".to_owned())
        );
    }
}
