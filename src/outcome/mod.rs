//! The outcome vocabulary: where a recipient stands ([`State`]), what one attempt gave
//! ([`Attempt`], with the server's [`Reply`]), and what a run reports per recipient
//! ([`Delivery`]). Dispatch produces these, the journal stores them, the report counts them;
//! none of those depends on another for them. Pure.

mod reply;

use std::fmt;

pub use reply::Reply;

/// Where a recipient ended up in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// Accepted by the server (250 after the final dot), written to the outbox, or, in a dry
    /// run, handed to the recording transport.
    Sent,
    /// A temporary (4xx) refusal: to be tried again later.
    Deferred,
    /// A permanent (5xx) refusal: never retried.
    Failed,
    /// The connection broke after the message body was sent and before the server answered:
    /// it may or may not have been delivered, so it is reported and not re-sent.
    Ambiguous,
    /// Not attempted in this run (the relay went away, or the run was halted).
    Pending,
    /// On a suppression list.
    Suppressed,
    /// Rejected by validation.
    Invalid,
    /// Sent, then returned as undeliverable (`mailer bounces`): terminal.
    Bounced,
    /// Sent, then reported as spam by its recipient (`mailer bounces`): terminal.
    Complained,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Sent,
        State::Deferred,
        State::Failed,
        State::Ambiguous,
        State::Pending,
        State::Suppressed,
        State::Invalid,
        State::Bounced,
        State::Complained,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            State::Sent => "sent",
            State::Deferred => "deferred",
            State::Failed => "failed",
            State::Ambiguous => "ambiguous",
            State::Pending => "pending",
            State::Suppressed => "suppressed",
            State::Invalid => "invalid",
            State::Bounced => "bounced",
            State::Complained => "complained",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of one recipient's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub line: u64,
    pub recipient: String,
    pub locale: String,
    pub state: State,
    /// Attempts that reached the server in this run (1 unless 4xx replies were retried).
    pub attempts: u32,
    /// The server's last reply, the file written, or why it was not attempted.
    pub detail: String,
}

/// What one attempt to deliver one message gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub state: State,
    /// The reply as text, the file written, or what went wrong.
    pub detail: String,
    /// The server's reply, when there was one.
    pub reply: Option<Reply>,
}

impl Attempt {
    #[must_use]
    pub fn without_reply(state: State, detail: impl Into<String>) -> Attempt {
        Attempt {
            state,
            detail: detail.into(),
            reply: None,
        }
    }
}
