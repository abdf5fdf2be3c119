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

pub mod daily;
mod ehlo;
mod file;
mod pace;
pub mod probe;
mod schedule;
mod smtp;

use std::sync::Arc;

use governor::clock::Clock;
use tokio::sync::mpsc;

use crate::config;
use crate::outcome::{Attempt, Delivery, Reply, State};
use crate::render::OutgoingMessage;
pub use daily::{Attempted, Daily, Waiting};
pub use pace::{Pacer, Suspension, Throttled};
pub use schedule::{SuspendedDomain, Tally};
pub use smtp::Settings as SmtpSettings;

/// Where messages go.
pub enum Transport {
    /// One `.eml` file per message.
    File(file::Outbox),
    /// Records and counts; connects to nothing, writes nothing.
    DryRun,
    Smtp(Arc<smtp::Settings>),
    /// Tests only: a transport whose every answer the test scripts (see `tests::Script`).
    #[cfg(test)]
    #[allow(private_interfaces)]
    Scripted(Arc<tests::Script>),
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
            #[cfg(test)]
            Transport::Scripted(script) => script.workers(),
        }
    }

    fn worker(&self) -> Worker {
        match self {
            Transport::File(outbox) => Worker::File(outbox.clone()),
            Transport::DryRun => Worker::DryRun,
            Transport::Smtp(settings) => {
                Worker::Smtp(Box::new(smtp::Connection::new(Arc::clone(settings))))
            }
            #[cfg(test)]
            Transport::Scripted(script) => Worker::Scripted(Arc::clone(script), script.hire()),
        }
    }
}

/// A failure of the relay as a whole (refused connection, TLS, AUTH, sender refused): it says
/// nothing about any recipient, so none changes state because of it.
#[derive(Debug, Clone)]
pub struct RelayFailure {
    /// One sentence: who failed or refused what, and what to change.
    pub reason: String,
    pub kind: FailureKind,
}

/// What a relay failure calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The relay is unreachable, busy or failing: waiting may mend it, so sending pauses and
    /// tries again.
    Outage,
    /// The settings and the relay do not fit, found on connecting: a certificate mailer
    /// refuses, a TLS handshake or a password the relay refuses, no common AUTH mechanism,
    /// STARTTLS required but not offered, the wrong scheme for the port. Waiting will not
    /// mend it: before any recipient got an answer the run ends at once (exit 65, nothing
    /// halted, so a fixed campaign sends again); later, the breaker halts the campaign.
    Config,
    /// Not the relay but this machine: the outbox cannot be written (full, read-only). Waiting
    /// will not help either; the run stops at once (exit 74) and nothing is halted.
    Local,
}

impl FailureKind {
    /// The exit code of a run that such a failure ended: a configuration the relay cannot be
    /// used with is invalid input (65), like any other mistake in the campaign's settings.
    #[must_use]
    pub fn exit(self) -> crate::exit::Exit {
        match self {
            FailureKind::Outage => crate::exit::Exit::RelayUnavailable,
            FailureKind::Config => crate::exit::Exit::InvalidInput,
            FailureKind::Local => crate::exit::Exit::IoError,
        }
    }
}

impl RelayFailure {
    /// An outage: waiting may mend it.
    pub fn new(reason: impl Into<String>) -> RelayFailure {
        RelayFailure {
            reason: reason.into(),
            kind: FailureKind::Outage,
        }
    }

    /// The settings and the relay do not fit: waiting will not mend it.
    pub fn config(reason: impl Into<String>) -> RelayFailure {
        RelayFailure {
            reason: reason.into(),
            kind: FailureKind::Config,
        }
    }

    /// The outbox (a local folder) could not be written.
    pub fn local(reason: impl Into<String>) -> RelayFailure {
        RelayFailure {
            reason: reason.into(),
            kind: FailureKind::Local,
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
    /// Records that `domain` is suspended until `until` (it kept throttling below the floor),
    /// with the pace it had (`per_second`) and its normal one (`ceiling`), for later runs; its
    /// deferred recipients wait until then too.
    fn suspended(
        &self,
        domain: &str,
        until: std::time::SystemTime,
        per_second: f64,
        ceiling: f64,
        detail: &str,
    );
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
    /// calls pass at once). The gate opens only once the answer is in: a wait that is
    /// cancelled leaves it shut, so no later call can pass without a durable record.
    pub async fn pass(&mut self, message: &OutgoingMessage) -> Result<(), Refusal> {
        self.start(message);
        let GateState::Sent(answer) = &mut self.0 else {
            // Open (no journal), or passed before.
            return Ok(());
        };
        let answer = answer
            .await
            .unwrap_or_else(|_| Err("the journal writer has stopped".to_owned()));
        self.0 = GateState::Open;
        answer.map_err(Refusal::Unrecorded)
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
    /// Becomes `Some(signal)` when a signal asks this run, and only this run, to stop: no new
    /// message starts, and no halt is recorded.
    pub interrupt: tokio::sync::watch::Receiver<Option<String>>,
    /// The suppression lists as they are now (read again when a file changes), checked just
    /// before each message goes; `None` when nothing watches them (a dry run).
    pub suppressed: Option<Suppressed>,
    /// Send windows and daily caps, with what the journal counts today; `None` when there are
    /// none (or in a dry run).
    pub daily: Option<Daily>,
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
    /// When it took its place in the day's cap (with daily caps): a place given back counts
    /// only on the day it was taken.
    taken_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// How a dispatch run ended.
pub struct Ended {
    /// The relay failure that ended it early, if any: recipients not reported are pending.
    pub failure: Option<RelayFailure>,
    /// Why it was halted (stop, breaker), if it was: recipients not reported are pending.
    pub halted: Option<String>,
    /// The signal that stopped this run, if one did: recipients not reported are pending.
    pub interrupted: Option<String>,
    /// The send window closed, or the day's cap was reached: recipients not reported are
    /// pending, and may go on then.
    pub waiting: Option<Waiting>,
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
    /// Tests only: the scripted transport, and which worker this is.
    #[cfg(test)]
    Scripted(Arc<tests::Script>, usize),
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
            #[cfg(test)]
            Worker::Scripted(script, worker) => script.deliver(*worker, message, gate).await,
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
pub async fn run<C: Clock + Clone>(
    transport: Transport,
    settings: Settings<'_>,
    pacer: Pacer<C>,
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
    let (mut failure, stopped, tally) = scheduler
        .run(
            messages.clone(),
            outcomes_out,
            (settings.halt, settings.interrupt),
            results,
        )
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
    let (mut halted, mut interrupted, mut waiting) = (None, None, None);
    match stopped {
        Some(schedule::Stopped::Halt(reason)) => halted = Some(reason),
        Some(schedule::Stopped::Interrupt(signal)) => interrupted = Some(signal),
        Some(schedule::Stopped::Wait(until)) => waiting = Some(until),
        None => {}
    }
    Ended {
        failure,
        halted,
        interrupted,
        waiting,
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

#[cfg(test)]
pub(crate) mod tests {
    //! The fakes every dispatch test shares — a scripted transport, a journal that keeps what
    //! it is told, a pacer clock that follows tokio's — and the tests of `run`'s own parts:
    //! the workers, the gate, a worker that panics, the dry run and the file outbox.

    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::{oneshot, watch};
    use tokio::time::Instant;

    use super::*;
    use crate::render::Envelope;

    /// A governor clock that reads tokio's: under paused time the pacer's limits move with
    /// the scheduler's timers (governor's own clocks ignore tokio's).
    #[derive(Debug, Clone)]
    pub(crate) struct TokioClock {
        start: Instant,
    }

    impl TokioClock {
        pub(crate) fn new() -> TokioClock {
            TokioClock {
                start: Instant::now(),
            }
        }
    }

    impl Clock for TokioClock {
        type Instant = Duration;

        fn now(&self) -> Duration {
            self.start.elapsed()
        }
    }

    /// Runs a scheduler test on a current-thread runtime whose clock is tokio's paused one (the
    /// limiters read it too, through `TokioClock`): a fake clock, so nothing depends on how
    /// fast the machine is.
    pub(crate) fn on_tokio_time<F: Future>(test: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Tokio's clock paused: it jumps to the next timer whenever every task waits, so
            // backoffs and pauses take no real time and their lengths are exact.
            .start_paused(true)
            .build()
            .expect("a test runtime")
            .block_on(test)
    }

    /// A message for `to`, from CSV line `line`: plain ASCII, CRLF, ending in CRLF.
    pub(crate) fn message(line: u64, to: &str) -> OutgoingMessage {
        OutgoingMessage {
            line,
            envelope: Envelope {
                mail_from: "news@sender.example".parse().expect("a sender"),
                rcpt_to: to.parse().expect("a recipient"),
            },
            message_id: format!("{line:032x}@sender.example"),
            locale: "en".to_owned(),
            bytes: format!(
                "From: news@sender.example\r\nTo: {to}\r\nSubject: Hello\r\n\r\nHello {to}.\r\n"
            )
            .into_bytes(),
        }
    }

    /// `message(line, to)` queued with journal row `line` and no earlier attempts.
    pub(crate) fn queued(line: u64, to: &str) -> Queued {
        Queued {
            message: message(line, to),
            entry: Some(Entry {
                id: i64::try_from(line).expect("a small line number"),
                attempts: 0,
            }),
        }
    }

    /// What the journal was told, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Event {
        InFlight(i64),
        Outcome {
            id: i64,
            state: State,
            attempts: u32,
            code: Option<u16>,
            /// Whether a next attempt time was given.
            retry: bool,
        },
        Halt(String),
        Requeued(i64),
        Suspended(String),
    }

    /// How the fake journal answers an `in_flight` record.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Durable {
        /// At once.
        Yes,
        /// Not at all: the record cannot be written.
        Never,
        /// When the test calls `release`.
        Held,
    }

    /// A journal that keeps what it is told.
    pub(crate) struct Journal {
        durable: Durable,
        events: Mutex<Vec<Event>>,
        held: Mutex<Vec<oneshot::Sender<Result<(), String>>>>,
    }

    impl Journal {
        pub(crate) fn new(durable: Durable) -> Arc<Journal> {
            Arc::new(Journal {
                durable,
                events: Mutex::new(Vec::new()),
                held: Mutex::new(Vec::new()),
            })
        }

        pub(crate) fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap().clone()
        }

        /// The outcomes recorded for row `id`, in order.
        pub(crate) fn outcomes(&self, id: i64) -> Vec<Event> {
            self.events()
                .into_iter()
                .filter(|e| matches!(e, Event::Outcome { id: i, .. } if *i == id))
                .collect()
        }

        /// Answers the held `in_flight` records: durable, or not.
        pub(crate) fn release(&self, answer: &Result<(), String>) {
            for sender in self.held.lock().unwrap().drain(..) {
                let _ = sender.send(answer.clone());
            }
        }

        fn push(&self, event: Event) {
            self.events.lock().unwrap().push(event);
        }
    }

    impl Record for Journal {
        fn in_flight(&self, id: i64, _locale: &str, _message_id: &str, _bytes: &[u8]) -> Gate {
            self.push(Event::InFlight(id));
            let (answer, answered) = oneshot::channel();
            match self.durable {
                Durable::Yes => {
                    let _ = answer.send(Ok(()));
                }
                Durable::Never => {
                    let _ = answer.send(Err("disk I/O error".to_owned()));
                }
                Durable::Held => self.held.lock().unwrap().push(answer),
            }
            Gate::sent(answered)
        }

        fn outcome(
            &self,
            id: i64,
            state: State,
            attempts: u32,
            reply: Option<Reply>,
            _detail: String,
            next_attempt_at: Option<std::time::SystemTime>,
        ) {
            self.push(Event::Outcome {
                id,
                state,
                attempts,
                code: reply.map(|r| r.code),
                retry: next_attempt_at.is_some(),
            });
        }

        fn halt(&self, reason: &str) {
            self.push(Event::Halt(reason.to_owned()));
        }

        fn suspended(
            &self,
            domain: &str,
            _until: std::time::SystemTime,
            _per_second: f64,
            _ceiling: f64,
            _detail: &str,
        ) {
            self.push(Event::Suspended(domain.to_owned()));
        }

        fn requeued(&self, id: i64) {
            self.push(Event::Requeued(id));
        }
    }

    /// What the scripted transport does with one attempt.
    pub(crate) enum Act {
        /// The server answered: the gate is passed (the body went), then this is the attempt.
        Answer(Attempt),
        /// The relay failed after `MAIL FROM` (the gate started, the body did not go).
        Relay(RelayFailure),
        /// The worker panics.
        Panic,
        /// This act, after this long instead of the script's `took`.
        After(Duration, Box<Act>),
    }

    /// An answer with this SMTP reply: 2xx sent, 4xx deferred, 5xx failed.
    pub(crate) fn reply(code: u16, text: &str) -> Act {
        let reply = Reply::new(code, text);
        let state = match code {
            200..=299 => State::Sent,
            400..=499 => State::Deferred,
            _ => State::Failed,
        };
        Act::Answer(Attempt {
            state,
            detail: reply.exact(),
            reply: Some(reply),
        })
    }

    pub(crate) fn accepted() -> Act {
        reply(250, "2.0.0 queued")
    }

    /// One attempt the scripted transport was given.
    #[derive(Debug, Clone)]
    pub(crate) struct Call {
        pub line: u64,
        pub recipient: String,
        /// Which attempt at this recipient in this run, from 1.
        pub nth: u32,
        pub at: Instant,
        /// Other attempts in progress when this one started.
        pub alongside: usize,
        /// The worker making it, from 0.
        pub worker: usize,
    }

    type Decide = Box<dyn Fn(&Call) -> Act + Send + Sync>;

    /// A transport whose answers the test scripts, recording every attempt. Each attempt
    /// takes `took`; what it does is decided when it starts.
    pub(crate) struct Script {
        workers: usize,
        /// How long each attempt takes.
        took: Duration,
        decide: Decide,
        calls: Mutex<Vec<Call>>,
        /// Attempts per recipient so far.
        tries: Mutex<std::collections::HashMap<String, u32>>,
        /// Lines whose body went (the gate passed).
        bodies: Mutex<Vec<u64>>,
        busy: AtomicUsize,
        hired: AtomicUsize,
    }

    /// Counts down the attempts in progress when one ends, however it ends.
    struct Done<'a>(&'a AtomicUsize);

    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Script {
        pub(crate) fn new(
            workers: usize,
            took: Duration,
            decide: impl Fn(&Call) -> Act + Send + Sync + 'static,
        ) -> Arc<Script> {
            Arc::new(Script {
                workers,
                took,
                decide: Box::new(decide),
                calls: Mutex::new(Vec::new()),
                tries: Mutex::default(),
                bodies: Mutex::new(Vec::new()),
                busy: AtomicUsize::new(0),
                hired: AtomicUsize::new(0),
            })
        }

        /// A new worker's number.
        pub(crate) fn hire(&self) -> usize {
            self.hired.fetch_add(1, Ordering::SeqCst)
        }

        pub(crate) fn workers(&self) -> usize {
            self.workers
        }

        pub(crate) fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        /// The lines of the calls, in order.
        pub(crate) fn lines(&self) -> Vec<u64> {
            self.calls().iter().map(|c| c.line).collect()
        }

        pub(crate) fn bodies(&self) -> Vec<u64> {
            self.bodies.lock().unwrap().clone()
        }

        pub(crate) async fn deliver(
            &self,
            worker: usize,
            message: &OutgoingMessage,
            gate: &mut Gate,
        ) -> Result<Attempt, Refusal> {
            let recipient = message.envelope.rcpt_to.to_string();
            let call = {
                let mut calls = self.calls.lock().unwrap();
                let nth = {
                    let mut tries = self.tries.lock().unwrap();
                    let tries = tries.entry(recipient.clone()).or_default();
                    *tries += 1;
                    *tries
                };
                let call = Call {
                    line: message.line,
                    recipient,
                    nth,
                    at: Instant::now(),
                    alongside: self.busy.fetch_add(1, Ordering::SeqCst),
                    worker,
                };
                calls.push(call.clone());
                call
            };
            let _done = Done(&self.busy);
            // Decided as the attempt starts (a halt it raises is raised while it is on the
            // wire), carried out when it ends.
            let (took, act) = match (self.decide)(&call) {
                Act::After(took, act) => (took, *act),
                act => (self.took, act),
            };
            if !took.is_zero() {
                tokio::time::sleep(took).await;
            }
            match act {
                Act::Answer(attempt) => {
                    gate.pass(message).await?;
                    self.bodies.lock().unwrap().push(message.line);
                    Ok(attempt)
                }
                Act::Relay(failure) => {
                    gate.start(message);
                    Err(failure.into())
                }
                Act::Panic => panic!("the scripted worker panics on line {}", message.line),
                Act::After(..) => unreachable!("unwrapped above"),
            }
        }
    }

    /// A run's settings, journal, halt switch and suppression list, held by the test.
    pub(crate) struct Setup {
        pub rate: config::Rate,
        pub retry: config::Retry,
        pub safety: config::Safety,
        pub journal: Arc<Journal>,
        pub halt: Arc<watch::Sender<Option<String>>>,
        pub suppressed: Suppressed,
        /// Suspensions an earlier run left in force.
        pub carried: Vec<Suspension>,
        /// Send windows and daily caps.
        pub daily: Option<Daily>,
    }

    /// What a run reported.
    pub(crate) struct Finished {
        pub deliveries: Vec<Delivery>,
        pub ended: Ended,
    }

    impl Finished {
        /// The reports by line; fails if a line was reported twice.
        pub(crate) fn by_line(&self) -> BTreeMap<u64, &Delivery> {
            let mut lines = BTreeMap::new();
            for delivery in &self.deliveries {
                let earlier = lines.insert(delivery.line, delivery);
                assert!(earlier.is_none(), "line {} reported twice", delivery.line);
            }
            lines
        }

        pub(crate) fn state(&self, line: u64) -> Option<(State, u32)> {
            self.by_line().get(&line).map(|d| (d.state, d.attempts))
        }
    }

    impl Setup {
        /// No limits, quick retries (milliseconds), a breaker that never trips.
        pub(crate) fn new() -> Setup {
            Setup {
                rate: config::Rate::default(),
                retry: config::Retry {
                    max_attempts: 4.try_into().unwrap(),
                    backoff: Duration::from_millis(2),
                    max_backoff: Duration::from_millis(8),
                    linger: Duration::from_secs(60),
                    relay_attempts: 5.try_into().unwrap(),
                    relay_backoff: Duration::from_millis(2),
                    suspension: Duration::from_secs(1800),
                    on_ambiguous: config::OnAmbiguous::Report,
                },
                safety: config::Safety {
                    halt_failure_ratio: 1.0,
                    ..config::Safety::default()
                },
                journal: Journal::new(Durable::Yes),
                halt: Arc::new(watch::channel(None).0),
                suppressed: Suppressed::default(),
                carried: Vec::new(),
                daily: None,
            }
        }

        /// Runs `transport` over `messages` (all queued before the start) to the end.
        pub(crate) async fn run(&self, transport: Transport, messages: Vec<Queued>) -> Finished {
            let settings = Settings {
                rate: &self.rate,
                retry: &self.retry,
                safety: &self.safety,
                journal: Some(Arc::clone(&self.journal) as Recorder),
                halt: self.halt.subscribe(),
                interrupt: watch::channel(None).1,
                suppressed: Some(Arc::clone(&self.suppressed)),
                daily: self.daily.clone(),
            };
            let mut pacer = Pacer::with_clock(&self.rate, TokioClock::new());
            for suspension in &self.carried {
                pacer.carry_suspension(suspension.clone());
            }
            run_with(transport, settings, pacer, messages).await
        }
    }

    /// Runs `dispatch::run` over `messages`, queued before the start, and collects every
    /// report.
    pub(crate) async fn run_with<C: Clock + Clone>(
        transport: Transport,
        settings: Settings<'_>,
        pacer: Pacer<C>,
        messages: Vec<Queued>,
    ) -> Finished {
        let (queue, taken) = async_channel::bounded(messages.len().max(1));
        for queued in messages {
            queue.try_send(queued).expect("room for every message");
        }
        drop(queue);
        let (results, mut reports) = mpsc::channel(8);
        let collect = async {
            let mut deliveries = Vec::new();
            while let Some(delivery) = reports.recv().await {
                deliveries.push(delivery);
            }
            deliveries
        };
        // A run that never ends (a message lost between the scheduler and a worker) fails
        // the test instead of hanging it.
        let (ended, deliveries) = tokio::time::timeout(Duration::from_secs(3600), async {
            tokio::join!(run(transport, settings, pacer, taken, results), collect)
        })
        .await
        .expect("the run ends");
        Finished { deliveries, ended }
    }

    fn lines(deliveries: &[Delivery]) -> Vec<u64> {
        let mut lines: Vec<u64> = deliveries.iter().map(|d| d.line).collect();
        lines.sort_unstable();
        lines
    }

    #[tokio::test]
    async fn a_dry_run_reports_every_message_once_as_sent() {
        let rate = config::Rate::default();
        let retry = config::Retry::default();
        let safety = config::Safety::default();
        let settings = Settings {
            rate: &rate,
            retry: &retry,
            safety: &safety,
            journal: None,
            halt: watch::channel(None).1,
            interrupt: watch::channel(None).1,
            suppressed: None,
            daily: None,
        };
        let messages = (1..=40)
            .map(|line| Queued {
                message: message(line, &format!("r{line}@d{}.example", line % 3)),
                entry: None,
            })
            .collect();
        let finished = run_with(Transport::DryRun, settings, Pacer::new(&rate), messages).await;
        assert_eq!(lines(&finished.deliveries), (1..=40).collect::<Vec<_>>());
        for delivery in &finished.deliveries {
            assert_eq!(
                (delivery.state, delivery.attempts, delivery.detail.as_str()),
                (State::Sent, 1, "dry run")
            );
            assert_eq!(
                delivery.recipient,
                format!("r{}@d{}.example", delivery.line, delivery.line % 3)
            );
        }
        assert!(finished.ended.failure.is_none() && finished.ended.halted.is_none());
    }

    #[tokio::test]
    async fn the_file_transport_writes_each_message_after_its_record_is_durable() {
        let outbox = tempfile::tempdir().unwrap();
        let setup = Setup::new();
        let transport = Transport::File(file::Outbox::new(outbox.path().join("out")));
        let finished = setup
            .run(
                transport,
                vec![queued(1, "a@x.example"), queued(2, "b@y.example")],
            )
            .await;
        for line in [1, 2] {
            let name = format!("{line:032x}.eml");
            let path = outbox.path().join("out").join(&name);
            let delivery = finished.by_line()[&line].clone();
            assert_eq!((delivery.state, delivery.attempts), (State::Sent, 1));
            assert_eq!(delivery.detail, path.display().to_string());
            let written = std::fs::read(&path).unwrap();
            let to = if line == 1 {
                "a@x.example"
            } else {
                "b@y.example"
            };
            assert_eq!(written, message(line, to).bytes);
            let id = i64::try_from(line).unwrap();
            let events: Vec<Event> = setup
                .journal
                .events()
                .into_iter()
                .filter(|e| {
                    matches!(e, Event::InFlight(i) if *i == id)
                        || matches!(e, Event::Outcome { id: i, .. } if *i == id)
                })
                .collect();
            assert_eq!(
                events,
                [
                    Event::InFlight(id),
                    Event::Outcome {
                        id,
                        state: State::Sent,
                        attempts: 1,
                        code: None,
                        retry: false
                    }
                ]
            );
        }
        // Nothing half-written is left behind.
        let mut names: Vec<String> = std::fs::read_dir(outbox.path().join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [format!("{:032x}.eml", 1), format!("{:032x}.eml", 2)]
        );
    }

    #[tokio::test]
    async fn a_gate_records_once_and_passes_only_when_the_record_is_durable() {
        let message = message(7, "a@x.example");
        // No journal: open at once.
        let mut open = Gate::open();
        assert!(open.pass(&message).await.is_ok());

        let journal = Journal::new(Durable::Held);
        let mut gate = Gate::journal(Arc::clone(&journal) as Recorder, 7);
        // Started twice (before MAIL FROM, then by `pass`): recorded once.
        gate.start(&message);
        gate.start(&message);
        assert_eq!(journal.events(), [Event::InFlight(7)]);
        {
            let passing = gate.pass(&message);
            tokio::pin!(passing);
            // Not durable yet: `pass` waits.
            assert!(
                tokio::time::timeout(Duration::from_millis(5), &mut passing)
                    .await
                    .is_err(),
                "passed before the record was durable"
            );
            journal.release(&Ok(()));
            assert!(passing.await.is_ok());
        }
        // Once passed, it stays passed, and records nothing more.
        assert!(gate.pass(&message).await.is_ok());
        assert_eq!(journal.events(), [Event::InFlight(7)]);
        // `pass` alone records, then waits.
        let mut gate = Gate::journal(Arc::clone(&journal) as Recorder, 8);
        let (passed, ()) = tokio::join!(gate.pass(&message), async {
            tokio::task::yield_now().await;
            journal.release(&Ok(()));
        });
        assert!(passed.is_ok());
        assert_eq!(journal.events(), [Event::InFlight(7), Event::InFlight(8)]);

        // A record that cannot be written, and a writer that has gone: not sent.
        let refused = Journal::new(Durable::Never);
        let mut gate = Gate::journal(refused as Recorder, 9);
        assert!(
            matches!(gate.pass(&message).await, Err(Refusal::Unrecorded(e)) if e == "disk I/O error")
        );
        let (gone, answer) = oneshot::channel::<Result<(), String>>();
        drop(gone);
        let mut gate = Gate::sent(answer);
        assert!(
            matches!(gate.pass(&message).await, Err(Refusal::Unrecorded(e)) if e == "the journal writer has stopped")
        );
    }

    #[test]
    fn a_record_that_cannot_be_made_durable_sends_nothing_and_stops_without_a_halt() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.journal = Journal::new(Durable::Never);
            let script = Script::new(1, Duration::ZERO, |_| accepted());
            let finished = setup
                .run(
                    Transport::Scripted(Arc::clone(&script)),
                    vec![queued(1, "a@x.example"), queued(2, "b@x.example")],
                )
                .await;
            // The first message was tried, its body never went, and nothing more was tried.
            assert_eq!(script.lines(), [1]);
            assert!(script.bodies().is_empty());
            // Neither is reported: both are still pending.
            assert!(finished.deliveries.is_empty());
            let halted = finished.ended.halted.expect("a halt");
            assert!(
                halted.starts_with("the journal cannot be written"),
                "{halted}"
            );
            // No halt is recorded: the journal cannot take it, and once it can be written
            // the next run goes on (exit 74, not the sticky 3).
            assert_eq!(setup.journal.events(), [Event::InFlight(1)]);
            assert!(finished.ended.failure.is_none());
        });
    }

    /// Eight messages on two workers; the one on line 3 makes its worker panic.
    async fn run_with_a_panic() -> (Setup, Arc<Script>, Finished) {
        let setup = Setup::new();
        let script = Script::new(2, Duration::from_millis(1), |call| {
            if call.line == 3 {
                Act::Panic
            } else {
                accepted()
            }
        });
        let messages = (1..=8)
            .map(|line| queued(line, &format!("r{line}@x.example")))
            .collect();
        let finished = setup
            .run(Transport::Scripted(Arc::clone(&script)), messages)
            .await;
        (setup, script, finished)
    }

    #[test]
    fn a_worker_that_panics_reports_its_message_ambiguous_and_the_others_go_on() {
        on_tokio_time(async {
            let (setup, script, finished) = run_with_a_panic().await;
            let by_line = finished.by_line();
            assert_eq!(by_line.len(), 8);
            for (line, delivery) in by_line {
                let expected = if line == 3 {
                    State::Ambiguous
                } else {
                    State::Sent
                };
                assert_eq!(delivery.state, expected, "line {line}");
                if line != 3 {
                    assert_eq!(delivery.attempts, 1, "line {line}");
                }
            }
            // Tried once: a message that may have gone is never tried again.
            assert_eq!(script.lines().iter().filter(|&&l| l == 3).count(), 1);
            assert!(matches!(
                setup.journal.outcomes(3).as_slice(),
                [Event::Outcome {
                    id: 3,
                    state: State::Ambiguous,
                    code: None,
                    retry: false,
                    ..
                }]
            ));
            // The worker that panicked took no more work: the other one did the rest.
            assert_eq!(script.calls().len(), 8);
            // The panic is not hidden: the run says a worker stopped.
            let failure = finished.ended.failure.expect("the panic is reported");
            assert!(
                failure
                    .reason
                    .starts_with("a delivery worker stopped unexpectedly"),
                "{}",
                failure.reason
            );
        });
    }

    /// A message whose worker panicked was attempted once, and is reported and recorded so.
    #[test]
    fn a_message_whose_worker_panicked_counts_one_attempt() {
        on_tokio_time(async {
            let (setup, _, finished) = run_with_a_panic().await;
            assert_eq!(finished.state(3), Some((State::Ambiguous, 1)));
            assert!(matches!(
                setup.journal.outcomes(3).as_slice(),
                [Event::Outcome { attempts: 1, .. }]
            ));
        });
    }

    #[test]
    fn when_every_worker_has_panicked_the_run_ends_and_the_rest_stays_pending() {
        on_tokio_time(async {
            let setup = Setup::new();
            let script = Script::new(2, Duration::from_millis(1), |_| Act::Panic);
            let messages = (1..=5)
                .map(|line| queued(line, &format!("r{line}@x.example")))
                .collect();
            let finished = setup
                .run(Transport::Scripted(Arc::clone(&script)), messages)
                .await;
            assert_eq!(script.calls().len(), 2);
            let ambiguous: Vec<u64> = finished.deliveries.iter().map(|d| d.line).collect();
            assert_eq!(
                lines(&finished.deliveries),
                script
                    .lines()
                    .into_iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
            );
            assert!(
                finished
                    .deliveries
                    .iter()
                    .all(|d| d.state == State::Ambiguous),
                "{ambiguous:?}"
            );
            let failure = finished.ended.failure.expect("no worker left");
            assert_eq!(failure.reason, "every delivery worker stopped unexpectedly");
        });
    }
}
