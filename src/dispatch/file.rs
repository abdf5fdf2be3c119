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
            RelayFailure::new(format!(
                "cannot {what} the outbox `{}`: {error}",
                self.dir.display()
            ))
        };
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| fail("create", e))?;
        let name = message
            .message_id
            .split('@')
            .next()
            .unwrap_or(&message.message_id);
        let path = self.dir.join(format!("{name}.eml"));
        let partial = self.dir.join(format!(".{name}.eml.partial"));
        tokio::fs::write(&partial, &message.bytes)
            .await
            .map_err(|e| fail("write into", e))?;
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(|e| fail("write into", e))?;
        Ok(Attempt::without_reply(
            State::Sent,
            path.display().to_string(),
        ))
    }
}
