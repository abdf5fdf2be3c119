//! Dispatch: hands each guarded message to a transport, at the configured pace, and reports
//! what finally became of it.
//!
//! The only stage that talks SMTP or writes messages out. Messages arrive on a bounded channel
//! (rendering runs ahead, in parallel, and memory stays flat). One scheduler task
//! ([`schedule`]) decides what goes next — rate limits ([`pace`]), per-domain queues, retries
//! of 4xx replies with backoff, pauses when the relay as a whole fails — and hands one message
//! at a time to an idle worker. Exactly `connections` workers each own one connection. Every
//! transport — SMTP, the file outbox and the dry run — is driven this way, so a dry run takes
//! the real path up to the wire.

mod file;
mod pace;
mod schedule;
mod smtp;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config;
use crate::outcome::{Attempt, Delivery, Reply, State};
use crate::render::OutgoingMessage;
pub use pace::Pacer;
pub use schedule::Tally;
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

    fn worker(&self) -> Worker {
        match self {
            Transport::File(outbox) => Worker::File(outbox.clone()),
            Transport::DryRun => Worker::DryRun,
            Transport::Smtp(settings) => {
                Worker::Smtp(Box::new(smtp::Connection::new(Arc::clone(settings))))
            }
        }
    }
}

/// A failure of the relay as a whole (refused connection, TLS, AUTH, sender refused): it says
/// nothing about any recipient, so none changes state because of it.
#[derive(Debug, Clone)]
pub struct RelayFailure {
    pub reason: String,
    /// The relay refused our credentials or TLS: waiting will not help, so this trips the
    /// breaker (the campaign halts) instead of pausing.
    pub rejected: bool,
}

impl RelayFailure {
    pub fn new(reason: impl Into<String>) -> RelayFailure {
        RelayFailure {
            reason: reason.into(),
            rejected: false,
        }
    }

    pub fn rejected(reason: impl Into<String>) -> RelayFailure {
        RelayFailure {
            reason: reason.into(),
            rejected: true,
        }
    }
}

/// Why a worker could not finish an attempt.
#[derive(Debug)]
pub enum Refusal {
    /// The relay as a whole failed; nothing is known about the recipient.
    Relay(RelayFailure),
    /// The journal could not record the message as in flight: it was not sent.
    Unrecorded(String),
}

impl From<RelayFailure> for Refusal {
    fn from(failure: RelayFailure) -> Refusal {
        Refusal::Relay(failure)
    }
}

/// A recipient due in this run: its journal row and the attempts earlier runs made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub attempts: u32,
}

/// Where a run records what happens to each message: the journal, in a real send. Dispatch
/// knows only this; the journal's writer implements it (the journal comes after dispatch in
/// the pipeline).
pub trait Record: Send + Sync {
    /// Records row `id` as `in_flight`. The gate opens when that is durable; an error there
    /// means the journal cannot be written and the message must not be sent.
    fn in_flight(&self, id: i64, locale: &str, message_id: &str, bytes: &[u8]) -> Gate;
    /// Records an outcome (not waited for: a crash before it commits leaves the row
    /// `in_flight`, which the next run reports as ambiguous).
    fn outcome(
        &self,
        id: i64,
        state: State,
        attempts: u32,
        reply: Option<Reply>,
        detail: String,
        next_attempt_at: Option<std::time::SystemTime>,
    );
    /// Records a halt (a breaker tripped) at once.
    fn halt(&self, reason: &str);
    /// Puts row `id` back to `pending`: it was not sent after all.
    fn requeued(&self, id: i64);
}

/// A shared handle on where outcomes are recorded.
pub type Recorder = Arc<dyn Record>;

/// The journal's "this recipient is in flight". The transport starts it (records the row
/// `in_flight`) right before `MAIL FROM`, and nothing the server could accept — the message
/// body — goes out before the journal says the record is durable.
pub struct Gate(GateState);

enum GateState {
    /// No journal (dry run), or already passed.
    Open,
    /// Not recorded yet: nothing has been sent for this message.
    Ready { journal: Recorder, id: i64 },
    /// Recorded; the answer comes when it is durable.
    Sent(tokio::sync::oneshot::Receiver<Result<(), String>>),
}

impl Gate {
    #[must_use]
    pub fn open() -> Gate {
        Gate(GateState::Open)
    }

    /// A gate for the journal row `id`.
    #[must_use]
    pub fn journal(journal: Recorder, id: i64) -> Gate {
        Gate(GateState::Ready { journal, id })
    }

    /// A gate already recorded, waiting for `answer`.
    #[must_use]
    pub fn sent(answer: tokio::sync::oneshot::Receiver<Result<(), String>>) -> Gate {
        Gate(GateState::Sent(answer))
    }

    /// Records the message as in flight (once): called right before `MAIL FROM`, so that a
    /// message that never got that far (the relay was down) is not left `in_flight`.
    pub fn start(&mut self, message: &OutgoingMessage) {
        if let GateState::Ready { journal, id } = &self.0 {
            let sent = journal.in_flight(*id, &message.locale, &message.message_id, &message.bytes);
            *self = sent;
        }
    }

    /// Records the message if not yet done, and waits until that is durable (once; later
    /// calls pass at once).
    pub async fn pass(&mut self, message: &OutgoingMessage) -> Result<(), Refusal> {
        self.start(message);
        match std::mem::replace(&mut self.0, GateState::Open) {
            GateState::Open | GateState::Ready { .. } => Ok(()),
            GateState::Sent(answer) => answer
                .await
                .unwrap_or_else(|_| Err("the journal writer has stopped".to_owned()))
                .map_err(Refusal::Unrecorded),
        }
    }
}

/// A message to deliver, with its journal row when the run keeps a journal.
pub struct Queued {
    pub message: OutgoingMessage,
    pub entry: Option<Entry>,
}

/// What a run needs besides the transport and the messages.
pub struct Settings<'a> {
    pub rate: &'a config::Rate,
    pub retry: &'a config::Retry,
    pub safety: &'a config::Safety,
    /// Where outcomes are recorded; `None` for the dry run.
    pub journal: Option<Recorder>,
    /// Becomes `Some(reason)` when the run must stop handing out messages (`mailer stop`,
    /// a guard violation found while rendering).
    pub halt: tokio::sync::watch::Receiver<Option<String>>,
    /// The suppression lists as they are now (read again when a file changes), checked just
    /// before each message goes; `None` when nothing watches them (a dry run).
    pub suppressed: Option<Suppressed>,
}

/// The live set of suppressed keys (see `recipients::suppression_key`).
pub type Suppressed = Arc<std::sync::RwLock<std::collections::HashSet<String>>>;

/// A message on its way, with what the run knows about it so far.
pub struct Job {
    pub message: OutgoingMessage,
    /// The recipient's journal row.
    id: Option<i64>,
    /// Attempts made by earlier runs (from the journal).
    prior: u32,
    /// Attempts that got an answer (4xx) so far in this run.
    pub attempts: u32,
    /// The relay-pause epoch when it was handed out (see `schedule`).
    epoch: u64,
    /// The last 4xx reply, for the report when it stays deferred.
    last_reply: String,
    /// The last reply, for the journal.
    last_answer: Option<Reply>,
}

/// How a dispatch run ended.
pub struct Ended {
    /// The relay failure that ended it early, if any: recipients not reported are pending.
    pub failure: Option<RelayFailure>,
    /// Why it was halted (stop, breaker), if it was: recipients not reported are pending.
    pub halted: Option<String>,
    pub tally: schedule::Tally,
}

/// What a worker gives back: the job, and how the attempt went.
struct Outcome {
    worker: usize,
    job: Job,
    verdict: Verdict,
}

enum Verdict {
    /// The relay answered about this recipient (or the file was written).
    Answered(Attempt),
    /// The relay as a whole failed; nothing is known about the recipient.
    Relay(RelayFailure),
    /// The worker stopped unexpectedly (a panic) while it had this message.
    Crashed,
    /// The journal could not record the message as in flight: it was not sent.
    Unrecorded(String),
}

/// A job a worker holds. If the worker unwinds (a panic), dropping this gives the job back
/// to the scheduler as `Crashed`, so the run neither hangs waiting for it nor loses it.
struct Holding<'a> {
    worker: usize,
    job: Option<Job>,
    outcomes: &'a mpsc::UnboundedSender<Outcome>,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            let _ = self.outcomes.send(Outcome {
                worker: self.worker,
                job,
                verdict: Verdict::Crashed,
            });
        }
    }
}

/// One worker's connection to its transport.
enum Worker {
    File(file::Outbox),
    DryRun,
    Smtp(Box<smtp::Connection>),
}

impl Worker {
    async fn deliver(
        &mut self,
        message: &OutgoingMessage,
        gate: &mut Gate,
    ) -> Result<Attempt, Refusal> {
        match self {
            Worker::File(outbox) => {
                gate.pass(message).await?;
                Ok(outbox.write(message).await?)
            }
            Worker::DryRun => Ok(Attempt::without_reply(State::Sent, "dry run")),
            Worker::Smtp(connection) => connection.deliver(message, gate).await,
        }
    }

    async fn close(&mut self) {
        if let Worker::Smtp(connection) = self {
            connection.quit().await;
        }
    }
}

/// Runs the scheduler and the workers until every message has a final outcome, or the relay
/// has failed `[retry] relay_attempts` times in a row. Final outcomes go to `results`; the
/// relay failure that ended the run, if any, is returned (the messages not reported on are
/// still pending).
pub async fn run(
    transport: Transport,
    settings: Settings<'_>,
    pacer: Pacer,
    messages: async_channel::Receiver<Queued>,
    results: mpsc::Sender<Delivery>,
) -> Ended {
    let (outcomes_in, outcomes_out) = mpsc::unbounded_channel::<Outcome>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut senders = Vec::new();
    for id in 0..transport.workers() {
        let (jobs_in, jobs_out) = mpsc::unbounded_channel::<Job>();
        senders.push(jobs_in);
        tasks.spawn(work(
            id,
            transport.worker(),
            settings.journal.clone(),
            jobs_out,
            outcomes_in.clone(),
        ));
    }
    drop(outcomes_in);
    let scheduler = schedule::Scheduler::new(pacer, &settings, senders);
    let (mut failure, halted, tally) = scheduler
        .run(messages.clone(), outcomes_out, settings.halt, results)
        .await;
    // Nothing more will be taken: let the producer stop.
    messages.close();
    while let Some(joined) = tasks.join_next().await {
        if let Err(panic) = joined {
            failure.get_or_insert(RelayFailure::new(format!(
                "a delivery worker stopped unexpectedly ({panic})"
            )));
        }
    }
    Ended {
        failure,
        halted,
        tally,
    }
}

/// One worker: takes a job, delivers it, gives it back with the outcome. Stops when the
/// scheduler drops its job channel.
async fn work(
    id: usize,
    mut worker: Worker,
    journal: Option<Recorder>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    while let Some(job) = jobs.recv().await {
        let mut holding = Holding {
            worker: id,
            job: Some(job),
            outcomes: &outcomes,
        };
        let Some(job) = holding.job.as_ref() else {
            continue;
        };
        let message = &job.message;
        // The transport records the message `in_flight` right before MAIL FROM and waits for
        // that to be durable before the body (see `Gate`).
        let mut gate = match (&journal, job.id) {
            (Some(journal), Some(row)) => Gate::journal(journal.clone(), row),
            _ => Gate::open(),
        };
        let verdict = match worker.deliver(message, &mut gate).await {
            Ok(attempt) => Verdict::Answered(attempt),
            Err(Refusal::Relay(failure)) => Verdict::Relay(failure),
            Err(Refusal::Unrecorded(error)) => Verdict::Unrecorded(error),
        };
        let Some(job) = holding.job.take() else {
            continue;
        };
        let outcome = Outcome {
            worker: id,
            job,
            verdict,
        };
        if outcomes.send(outcome).is_err() {
            break;
        }
    }
    worker.close().await;
}
