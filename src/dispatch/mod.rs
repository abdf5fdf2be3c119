//! Dispatch: hands each guarded message to a transport and reports what became of it.
//!
//! The only stage that talks SMTP or writes messages out. Messages arrive on a bounded channel
//! (rendering runs ahead, in parallel, and memory stays flat); `connections` workers take them
//! and send [`Delivery`] values back. Every transport — SMTP, the file outbox and the dry run —
//! is driven by the same workers, so a dry run takes the real path up to the wire.

mod file;
mod smtp;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config;
use crate::render::OutgoingMessage;
use crate::report::{Delivery, State};
pub use smtp::Settings as SmtpSettings;

/// Where messages go.
pub enum Transport {
    /// One `.eml` file per message.
    File(file::Outbox),
    /// Records and counts; connects to nothing, writes nothing.
    DryRun,
    Smtp(Arc<smtp::Settings>),
}

impl Transport {
    /// The transport a campaign asks for, or the dry run. Reads the SMTP password, if any.
    pub fn for_campaign(transport: &config::Transport, dry_run: bool) -> anyhow::Result<Transport> {
        if dry_run {
            return Ok(Transport::DryRun);
        }
        Ok(match transport {
            config::Transport::File { outbox } => {
                Transport::File(file::Outbox::new(outbox.clone()))
            }
            config::Transport::Smtp(smtp) => Transport::Smtp(Arc::new(smtp::Settings::new(smtp)?)),
        })
    }

    fn workers(&self) -> usize {
        match self {
            Transport::File(_) | Transport::DryRun => 1,
            Transport::Smtp(settings) => settings.connections(),
        }
    }
}

/// A failure of the relay as a whole (refused connection, TLS, AUTH, sender refused): it says
/// nothing about any recipient, so none changes state because of it.
#[derive(Debug, Clone)]
pub struct RelayFailure(pub String);

/// What one attempt to deliver one message gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub state: State,
    pub detail: String,
}

/// Pauses between attempts to reach the relay before the run gives up on it.
const RELAY_RETRIES: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// One worker's connection to its transport.
enum Worker {
    File(file::Outbox),
    DryRun,
    Smtp(Box<smtp::Connection>),
}

impl Worker {
    async fn deliver(&mut self, message: &OutgoingMessage) -> Result<Attempt, RelayFailure> {
        match self {
            Worker::File(outbox) => outbox.write(message).await,
            Worker::DryRun => Ok(Attempt {
                state: State::Sent,
                detail: "dry run".to_owned(),
            }),
            Worker::Smtp(connection) => connection.deliver(message).await,
        }
    }

    async fn close(&mut self) {
        if let Worker::Smtp(connection) = self {
            connection.quit().await;
        }
    }
}

/// Runs the workers until the message channel is drained and closed, or the relay fails.
/// Deliveries go to `results`; the relay failure, if any, is returned.
pub async fn run(
    transport: Transport,
    messages: async_channel::Receiver<OutgoingMessage>,
    results: mpsc::Sender<Delivery>,
) -> Option<RelayFailure> {
    let relay_down = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..transport.workers() {
        let worker = match &transport {
            Transport::File(outbox) => Worker::File(outbox.clone()),
            Transport::DryRun => Worker::DryRun,
            Transport::Smtp(settings) => {
                Worker::Smtp(Box::new(smtp::Connection::new(Arc::clone(settings))))
            }
        };
        tasks.spawn(work(
            worker,
            messages.clone(),
            results.clone(),
            Arc::clone(&relay_down),
        ));
    }
    drop(results);
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Some(relay)) => {
                // Stop the producer: nothing more will be taken.
                messages.close();
                failure.get_or_insert(relay);
            }
            Ok(None) => {}
            Err(panic) => {
                messages.close();
                failure.get_or_insert(RelayFailure(format!(
                    "a delivery worker stopped unexpectedly ({panic})"
                )));
            }
        }
    }
    failure
}

async fn work(
    mut worker: Worker,
    messages: async_channel::Receiver<OutgoingMessage>,
    results: mpsc::Sender<Delivery>,
    relay_down: Arc<AtomicBool>,
) -> Option<RelayFailure> {
    while !relay_down.load(Ordering::Acquire) {
        let Ok(message) = messages.recv().await else {
            break;
        };
        let mut retries = RELAY_RETRIES.iter();
        let attempt = loop {
            match worker.deliver(&message).await {
                Ok(attempt) => break Ok(attempt),
                Err(failure) => match retries.next() {
                    Some(pause) if !relay_down.load(Ordering::Acquire) => {
                        tracing::warn!(reason = %failure.0, "relay unavailable; retrying in {pause:?}");
                        tokio::time::sleep(*pause).await;
                    }
                    _ => break Err(failure),
                },
            }
        };
        let (attempt, failure) = match attempt {
            Ok(attempt) => (attempt, None),
            Err(failure) => {
                relay_down.store(true, Ordering::Release);
                (
                    Attempt {
                        state: State::Pending,
                        detail: format!("not attempted: {}", failure.0),
                    },
                    Some(failure),
                )
            }
        };
        let delivery = Delivery {
            line: message.line,
            recipient: message.envelope.rcpt_to.to_string(),
            locale: message.locale.clone(),
            state: attempt.state,
            detail: attempt.detail,
        };
        if results.send(delivery).await.is_err() || failure.is_some() {
            worker.close().await;
            return failure;
        }
    }
    worker.close().await;
    None
}
