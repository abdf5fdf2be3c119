//! The scheduler: one task that decides which message goes next and when.
//!
//! It takes rendered messages into per-domain queues (at most [`POOL`] at a time, so memory
//! stays flat), hands one to a worker whenever a worker is idle and both the global and the
//! domain's rate allow it ([`Pacer`]), and reads every outcome back:
//!
//! - 4xx: the recipient is retried after an exponential backoff with jitter, within this run
//!   while attempts remain and the retry falls due before the run would end (plus
//!   `[retry] linger`); otherwise it stays `deferred`. A throttling reply also slows its domain.
//! - 5xx, sent, ambiguous: final, reported once.
//! - A relay-wide failure: the message goes back to its queue untouched, sending pauses with
//!   backoff, then resumes with one probe at a time; `relay_attempts` failures in a row end
//!   the run (exit 69, the rest still pending). A connection refused while the relay is
//!   answering on the others is the relay's connection limit: that worker retires instead.
//! - A worker that stops unexpectedly (a panic) reports its message `ambiguous` and retires.
//!
//! Each worker has its own job channel; idle workers are a stack, so the most recently used
//! connection (open, warm) is used first and idle ones are not reopened needlessly.
//!
//! Domains take turns, so a slow or throttled domain never holds up the others (as long as the
//! others' messages are in the pool).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Job, Outcome, Pacer, Queued, Recorder, RelayFailure, Settings, Suppressed, Verdict};

use crate::config::{Batch, Retry};
use crate::outcome::{Attempt, Delivery, Reply, State};

/// Messages held in the per-domain queues at most. A domain that is much slower than the
/// others can fill it; then everything waits for that domain (documented in the README).
pub const POOL: usize = 8192;
/// Recipients waiting for a retry at most (they hold their message); past it, a 4xx leaves the
/// recipient `deferred` for the next run at once.
pub const RETRY_CAP: usize = POOL / 2;

/// What the run saw, for the summary.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Attempts that got a 4xx and were tried again.
    pub retried: usize,
    /// Pauses after relay failures.
    pub relay_pauses: usize,
    /// Workers retired because the relay refused more connections.
    pub connections_retired: usize,
    /// Domains slowed down by a throttling reply, with the slowest pace they got (per second).
    pub throttled: BTreeMap<String, f64>,
}

pub struct Scheduler {
    pacer: Pacer,
    retry: Retry,
    journal: Option<Recorder>,
    suppressed: Option<Suppressed>,
    /// Jobs whose recipient was suppressed after the run started: reported, never sent.
    dropped: Vec<Job>,
    /// The permanent-failure breaker: `[safety] halt_failure_ratio` after `halt_min_sample`.
    halt_ratio: f64,
    halt_sample: usize,
    /// Recipients with a final answer (sent or failed) in this run, and those failed.
    answered: usize,
    failed: usize,
    batch: Option<Batch>,
    /// One job channel per worker; `None` once it retired.
    workers: Vec<Option<mpsc::UnboundedSender<Job>>>,
    /// Workers waiting for a job, most recently used last.
    idle: Vec<usize>,
    in_flight: usize,
    /// Jobs in the domain queues.
    parked: usize,
    /// A domain has a queue exactly while it is in `ready` or `blocked`: queues are made
    /// when a job arrives for a domain without one, and removed when they empty.
    domains: HashMap<Arc<str>, VecDeque<Job>>,
    /// Domains whose next job may go now, in turn.
    ready: VecDeque<Arc<str>>,
    /// Domains waiting for their limiter, by when.
    blocked: BTreeMap<(Instant, u64), Arc<str>>,
    /// 4xx recipients waiting for their backoff, by when.
    retries: BTreeMap<(Instant, u64), Job>,
    sequence: u64,
    /// A global slot taken while looking for a domain that may go.
    global_held: bool,
    /// Relay failures in a row.
    relay_failures: u32,
    /// Bumped at each relay pause; jobs carry the value they went out with.
    epoch: u64,
    /// Answers from the relay (any reply about a recipient) to jobs handed out in this epoch.
    answers_in_epoch: u64,
    paused_until: Option<Instant>,
    /// After a relay pause: one message at a time until one gets an answer.
    probing: bool,
    batch_sent: usize,
    tally: Tally,
}

/// Why a run's dispatching ends early.
pub enum GaveUp {
    /// The relay failed too often, or no worker is left (exit 69).
    Relay(RelayFailure),
    /// A stop or a breaker: hand out nothing more (exit 3).
    Halt(String),
}

impl Scheduler {
    pub fn new(
        pacer: Pacer,
        settings: &Settings<'_>,
        workers: Vec<mpsc::UnboundedSender<Job>>,
    ) -> Scheduler {
        Scheduler {
            pacer,
            retry: settings.retry.clone(),
            journal: settings.journal.clone(),
            suppressed: settings.suppressed.clone(),
            dropped: Vec::new(),
            halt_ratio: settings.safety.halt_failure_ratio,
            halt_sample: settings.safety.halt_min_sample.get(),
            answered: 0,
            failed: 0,
            batch: settings.rate.batch,
            idle: (0..workers.len()).rev().collect(),
            workers: workers.into_iter().map(Some).collect(),
            in_flight: 0,
            parked: 0,
            domains: HashMap::new(),
            ready: VecDeque::new(),
            blocked: BTreeMap::new(),
            retries: BTreeMap::new(),
            sequence: 0,
            global_held: false,
            relay_failures: 0,
            epoch: 0,
            answers_in_epoch: 0,
            paused_until: None,
            probing: false,
            batch_sent: 0,
            tally: Tally::default(),
        }
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    fn enqueue(&mut self, job: Job, front: bool) {
        let domain = job.message.envelope.rcpt_to.domain();
        let queue = if let Some(queue) = self.domains.get_mut(domain) {
            queue
        } else {
            let key: Arc<str> = domain.into();
            self.ready.push_back(Arc::clone(&key));
            self.domains.entry(key).or_default()
        };
        if front {
            queue.push_front(job);
        } else {
            queue.push_back(job);
        }
        self.parked += 1;
    }

    /// Moves retries that are due into their queues, and domains whose wait is over back
    /// into turn.
    fn release_due(&mut self, now: Instant) {
        while let Some(entry) = self.retries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let job = entry.remove();
            self.enqueue(job, false);
        }
        while let Some(entry) = self.blocked.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let domain = entry.remove();
            self.ready.push_back(domain);
        }
    }

    /// Hands out jobs while a worker is idle and the limits allow. Gives the moment worth
    /// waking up for, when something is waiting on time rather than on an outcome.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        loop {
            if self.idle.is_empty() || (self.probing && self.in_flight > 0) {
                return None;
            }
            if let Some(until) = self.paused_until {
                if now < until {
                    return Some(until);
                }
                self.paused_until = None;
            }
            if self.ready.is_empty() {
                let blocked = self.blocked.first_key_value().map(|((at, _), _)| *at);
                let retry = self.retries.first_key_value().map(|((at, _), _)| *at);
                return blocked.into_iter().chain(retry).min();
            }
            if !self.global_held {
                match self.pacer.reserve_global() {
                    Ok(()) => self.global_held = true,
                    Err(wait) => return Some(now + wait),
                }
            }
            let domain = self
                .ready
                .pop_front()
                .expect("`ready` is not empty: checked above");
            if let Err(wait) = self.pacer.admit(&domain) {
                let key = (now + wait, self.next_sequence());
                self.blocked.insert(key, domain);
                continue;
            }
            // A domain in turn has a queue, and queues are removed when they empty.
            let queue = self
                .domains
                .get_mut(&domain)
                .expect("a domain in turn has a queue");
            let mut job = queue
                .pop_front()
                .expect("a domain's queue is removed when it empties");
            if queue.is_empty() {
                self.domains.remove(&domain);
            } else {
                self.ready.push_back(domain);
            }
            self.parked -= 1;
            self.global_held = false;
            if self.is_suppressed(&job) {
                self.dropped.push(job);
                continue;
            }
            job.epoch = self.epoch;
            let worker = self.idle.pop().expect("a worker is idle: checked above");
            let Some(Some(sender)) = self.workers.get(worker) else {
                // Retired workers are never idle; put the job back rather than lose it.
                self.enqueue(job, true);
                continue;
            };
            if let Err(returned) = sender.send(job) {
                // The worker is gone: retire it, keep the job.
                self.workers[worker] = None;
                self.enqueue(returned.0, true);
                continue;
            }
            self.in_flight += 1;
            if let Some(batch) = self.batch {
                self.batch_sent += 1;
                let nothing_left = self.parked == 0 && self.retries.is_empty();
                if self.batch_sent >= batch.size.get() && !nothing_left {
                    self.batch_sent = 0;
                    tracing::info!(
                        size = batch.size.get(),
                        pause = %humantime::format_duration(batch.pause),
                        "batch handed out; pausing"
                    );
                    self.pause_until(now + batch.pause);
                }
            }
        }
    }

    /// Whether the job's recipient is on a suppression list now (it may have been added since
    /// the run started: the last check before the message goes).
    fn is_suppressed(&self, job: &Job) -> bool {
        self.suppressed.as_ref().is_some_and(|set| {
            let key = crate::recipients::suppression_key(job.message.envelope.rcpt_to.as_ref());
            set.read().map_or(true, |set| set.contains(&key))
        })
    }

    /// Pauses sending until `until`, or longer if a longer pause is on.
    fn pause_until(&mut self, until: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
    }

    fn alive(&self) -> usize {
        self.workers.iter().filter(|w| w.is_some()).count()
    }

    /// The wait before trying again after `attempt` answers in a row, with jitter: a random
    /// point in the upper half of the exponential backoff, so that recipients deferred
    /// together do not come back together.
    fn backoff(&self, first: Duration, attempt: u32) -> Duration {
        let full = self.retry.backoff_after(first, attempt);
        let half = full / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(..=nanos))
    }

    /// Takes in one outcome. Gives the reason the run ends early, when the relay has failed
    /// too often, no worker is left, or a breaker trips.
    async fn settle(
        &mut self,
        outcome: Outcome,
        now: Instant,
        results: &mpsc::Sender<Delivery>,
    ) -> Option<GaveUp> {
        self.in_flight -= 1;
        let Outcome {
            worker,
            job,
            verdict,
        } = outcome;
        match verdict {
            Verdict::Answered(attempt) => {
                self.idle.push(worker);
                self.settle_answer(job, attempt, now, results).await
            }
            Verdict::Crashed => self.settle_crash(worker, job, results).await,
            Verdict::Unrecorded(error) => Some(self.settle_unrecorded(worker, job, &error)),
            Verdict::Relay(failure) => self.settle_relay_failure(worker, job, failure, now),
        }
    }

    /// The relay answered about the recipient (or the file was written): a 4xx is retried or
    /// left deferred; sent, 5xx and ambiguous are final, and sent and 5xx count toward the
    /// permanent-failure breaker.
    async fn settle_answer(
        &mut self,
        mut job: Job,
        attempt: Attempt,
        now: Instant,
        results: &mpsc::Sender<Delivery>,
    ) -> Option<GaveUp> {
        self.note_answer(&job, &attempt);
        if attempt.state == State::Deferred {
            self.defer(job, attempt, now, results).await;
            return None;
        }
        job.last_answer = attempt.reply;
        self.report(results, &job, attempt.state, attempt.detail, None)
            .await;
        if matches!(attempt.state, State::Sent | State::Failed) {
            return self.count_answer(attempt.state == State::Failed);
        }
        None
    }

    /// What any answer says about the relay: that it works (when the job went out in this
    /// epoch), and whether it throttles the recipient's domain.
    fn note_answer(&mut self, job: &Job, attempt: &Attempt) {
        // An answer about a recipient handed out since the last pause: the relay is
        // working again. (An answer to an older one says nothing about now.)
        if job.epoch == self.epoch {
            self.answers_in_epoch += 1;
            self.relay_failures = 0;
            self.probing = false;
        }
        let throttling = attempt.reply.as_ref().is_some_and(Reply::is_throttling);
        let domain = job.message.envelope.rcpt_to.domain();
        if let Some(per_second) = throttling.then(|| self.pacer.throttle(domain)).flatten() {
            tracing::warn!(domain, per_second, reply = %attempt.detail, "throttled by the server; slowing this domain down");
            let slowest = self
                .tally
                .throttled
                .entry(domain.to_owned())
                .or_insert(per_second);
            *slowest = slowest.min(per_second);
        }
    }

    /// A 4xx: retried after a backoff while attempts remain and there is room among the
    /// retries; otherwise reported `deferred`, for the next run.
    async fn defer(
        &mut self,
        mut job: Job,
        attempt: Attempt,
        now: Instant,
        results: &mpsc::Sender<Delivery>,
    ) {
        job.attempts += 1;
        let more = job.attempts < self.retry.max_attempts.get();
        let wait = self.backoff(self.retry.backoff, job.prior + job.attempts);
        if more && self.retries.len() < RETRY_CAP {
            self.retry_later(job, attempt, now, wait);
            return;
        }
        let why = if more {
            "left for the next run: too many recipients waiting for a retry"
        } else {
            "left for the next run"
        };
        let detail = format!("{} ({why})", attempt.detail);
        job.last_answer = attempt.reply;
        self.report(results, &job, State::Deferred, detail, Some(wait))
            .await;
    }

    /// Holds a deferred recipient until `wait` has passed, and records it deferred meanwhile.
    fn retry_later(&mut self, mut job: Job, attempt: Attempt, now: Instant, wait: Duration) {
        tracing::info!(
            line = job.message.line,
            recipient = %job.message.envelope.rcpt_to,
            attempt = job.attempts,
            retry_in = %humantime::format_duration(Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))),
            reply = %attempt.detail,
            "deferred"
        );
        self.tally.retried += 1;
        if let (Some(journal), Some(id)) = (&self.journal, job.id) {
            journal.outcome(
                id,
                State::Deferred,
                job.prior + job.attempts,
                attempt.reply.clone(),
                attempt.detail.clone(),
                Some(crate::clock::now() + wait),
            );
        }
        job.last_reply = attempt.detail;
        job.last_answer = attempt.reply;
        let key = (now + wait, self.next_sequence());
        self.retries.insert(key, job);
    }

    /// Counts a final answer (sent, or `failed` permanently) for the permanent-failure
    /// breaker; gives the halt when it trips.
    fn count_answer(&mut self, failed: bool) -> Option<GaveUp> {
        self.answered += 1;
        self.failed += usize::from(failed);
        #[allow(clippy::cast_precision_loss)]
        let ratio = self.failed as f64 / self.answered as f64;
        if self.answered >= self.halt_sample && ratio > self.halt_ratio {
            return Some(GaveUp::Halt(format!(
                "{} of the last {} answered recipients failed permanently, over `[safety] halt_failure_ratio` {}",
                self.failed, self.answered, self.halt_ratio
            )));
        }
        None
    }

    /// The worker stopped unexpectedly (a panic): it retires, and its message is reported
    /// `ambiguous`, since it may have been sent.
    async fn settle_crash(
        &mut self,
        worker: usize,
        mut job: Job,
        results: &mpsc::Sender<Delivery>,
    ) -> Option<GaveUp> {
        self.workers[worker] = None;
        tracing::error!(
            line = job.message.line,
            "a delivery worker stopped unexpectedly"
        );
        job.attempts += 1;
        self.report(
            results,
            &job,
            State::Ambiguous,
            "the delivery worker stopped unexpectedly while sending this message".to_owned(),
            None,
        )
        .await;
        (self.alive() == 0).then(|| {
            GaveUp::Relay(RelayFailure::new(
                "every delivery worker stopped unexpectedly",
            ))
        })
    }

    /// The journal could not record the message as in flight: it goes back to its queue, and
    /// the run halts.
    fn settle_unrecorded(&mut self, worker: usize, job: Job, error: &str) -> GaveUp {
        // Its body was not sent. Its row stays as the journal has it: `pending`, or
        // `in_flight` if the record was committed but could not be synced (then the
        // next run reports it ambiguous, which errs on the side of not sending).
        self.idle.push(worker);
        self.enqueue(job, true);
        GaveUp::Halt(format!(
            "the journal cannot be written, so nothing more is sent: {error}"
        ))
    }

    /// A relay-wide failure: the message goes back to its queue untouched. A rejection halts
    /// the run; a refused connection while the relay serves the others retires the worker;
    /// otherwise sending pauses (`relay_pause`).
    fn settle_relay_failure(
        &mut self,
        worker: usize,
        job: Job,
        failure: RelayFailure,
        now: Instant,
    ) -> Option<GaveUp> {
        if let (Some(journal), Some(id)) = (&self.journal, job.id) {
            journal.requeued(id);
        }
        let stale = job.epoch != self.epoch;
        self.enqueue(job, true);
        if failure.rejected {
            self.idle.push(worker);
            return Some(GaveUp::Halt(format!(
                "the relay rejected the connection: {}",
                failure.reason
            )));
        }
        if stale {
            // A connection that was already on its way when the relay failed.
            self.idle.push(worker);
            return None;
        }
        if self.answers_in_epoch > 0 && self.alive() > 1 {
            // The relay answers on other connections since the last pause: this is its
            // connection limit, not an outage.
            self.workers[worker] = None;
            tracing::warn!(
                reason = %failure.reason,
                connections = self.alive(),
                "the relay refused one more connection while serving the others; going on with fewer"
            );
            self.tally.connections_retired += 1;
            return None;
        }
        self.idle.push(worker);
        self.relay_pause(failure, now)
    }

    /// The relay is down: a new epoch begins, and sending pauses with backoff, then resumes
    /// with one probe at a time; `relay_attempts` failures in a row give up.
    fn relay_pause(&mut self, failure: RelayFailure, now: Instant) -> Option<GaveUp> {
        self.relay_failures += 1;
        self.epoch += 1;
        self.answers_in_epoch = 0;
        if self.relay_failures >= self.retry.relay_attempts.get() {
            return Some(GaveUp::Relay(failure));
        }
        let pause = self.backoff(self.retry.relay_backoff, self.relay_failures);
        tracing::warn!(
            reason = %failure.reason,
            failures = self.relay_failures,
            pause = %humantime::format_duration(Duration::from_millis(u64::try_from(pause.as_millis()).unwrap_or(u64::MAX))),
            "relay unavailable; pausing"
        );
        self.tally.relay_pauses += 1;
        self.pause_until(now + pause);
        self.probing = true;
        None
    }

    /// Records a halt in the journal as soon as it happens, so that it holds even if this
    /// process dies while the messages on the wire finish (a `mailer stop` is there already).
    fn record_halt(&self, reason: &str) {
        if let Some(journal) = &self.journal {
            journal.halt(reason);
        }
    }

    /// Reports a final outcome for this run, and records it in the journal. `retry_in`: for
    /// a recipient left deferred, when a later run may try it again.
    async fn report(
        &self,
        results: &mpsc::Sender<Delivery>,
        job: &Job,
        state: State,
        detail: String,
        retry_in: Option<Duration>,
    ) {
        let message = &job.message;
        let attempts = job.attempts
            + u32::from(matches!(
                state,
                State::Sent | State::Failed | State::Ambiguous
            ));
        if let (Some(journal), Some(id)) = (&self.journal, job.id) {
            journal.outcome(
                id,
                state,
                job.prior + attempts,
                job.last_answer.clone(),
                detail.clone(),
                retry_in.map(|wait| crate::clock::now() + wait),
            );
        }
        let _ = results
            .send(Delivery {
                line: message.line,
                recipient: message.envelope.rcpt_to.to_string(),
                locale: message.locale.clone(),
                state,
                attempts,
                detail,
            })
            .await;
    }

    /// Runs until every message taken has a final outcome, the relay has failed for good, a
    /// halt arrives, or nobody listens for results any more. Messages never taken, and those
    /// put back after a relay failure, are not reported: they are still pending.
    pub async fn run(
        mut self,
        input: async_channel::Receiver<Queued>,
        mut outcomes: mpsc::UnboundedReceiver<Outcome>,
        mut halt: watch::Receiver<Option<String>>,
        results: mpsc::Sender<Delivery>,
    ) -> (Option<RelayFailure>, Option<String>, Tally) {
        let mut input_open = true;
        let mut gave_up: Option<GaveUp> = None;
        let mut halt_open = true;
        let mut linger_until: Option<Instant> = None;
        loop {
            if gave_up.is_none()
                && let Some(reason) = halt.borrow_and_update().clone()
            {
                let end = GaveUp::Halt(reason);
                self.give_up(&end);
                gave_up = Some(end);
            }
            let now = Instant::now();
            while input_open && gave_up.is_none() && self.parked < POOL {
                match input.try_recv() {
                    Ok(queued) => self.enqueue(new_job(queued), false),
                    Err(async_channel::TryRecvError::Empty) => break,
                    Err(async_channel::TryRecvError::Closed) => input_open = false,
                }
            }
            self.release_due(now);
            let wake = if gave_up.is_none() {
                self.dispatch(now)
            } else {
                None
            };
            self.report_dropped(&results).await;
            if self.in_flight == 0 {
                if gave_up.is_some() {
                    break;
                }
                if !input_open && self.parked == 0 {
                    // Only retries are left: wait for those due within the linger (and any
                    // pause that would hold them back).
                    let deadline = *linger_until.get_or_insert(now + self.retry.linger);
                    match self.retries.first_key_value() {
                        Some(((due, _), _))
                            if (*due).max(self.paused_until.unwrap_or(*due)) <= deadline => {}
                        _ => break,
                    }
                }
            }
            let take_input = input_open && gave_up.is_none() && self.parked < POOL;
            tokio::select! {
                biased;
                changed = halt.changed(), if halt_open && gave_up.is_none() => {
                    if changed.is_err() {
                        halt_open = false;
                    }
                }
                outcome = outcomes.recv() => {
                    let Some(outcome) = outcome else { break };
                    if let Some(end) = self.settle(outcome, Instant::now(), &results).await
                        && gave_up.is_none()
                    {
                        self.give_up(&end);
                        gave_up = Some(end);
                    }
                }
                message = input.recv(), if take_input => match message {
                    Ok(queued) => self.enqueue(new_job(queued), false),
                    Err(_) => input_open = false,
                },
                () = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
            if results.is_closed() {
                break;
            }
        }
        // Dropping the job channels stops the workers.
        self.workers.clear();
        self.report_retries_left(&results).await;
        let (failure, halted) = match gave_up {
            Some(GaveUp::Relay(failure)) => (Some(failure), None),
            Some(GaveUp::Halt(reason)) => (None, Some(reason)),
            None => (None, None),
        };
        (failure, halted, self.tally)
    }

    /// Says why the run gives up, and records a halt in the journal.
    fn give_up(&self, end: &GaveUp) {
        match end {
            GaveUp::Relay(failure) => {
                tracing::error!(reason = %failure.reason, "relay unavailable; giving up for this run");
            }
            GaveUp::Halt(reason) => {
                tracing::error!(reason = %reason, "halted: no new message starts");
                self.record_halt(reason);
            }
        }
    }

    /// Reports the jobs whose recipient was suppressed after the run started: never sent.
    async fn report_dropped(&mut self, results: &mpsc::Sender<Delivery>) {
        for job in std::mem::take(&mut self.dropped) {
            tracing::info!(line = job.message.line, recipient = %job.message.envelope.rcpt_to, "suppressed while the campaign was sending; not sent");
            self.report(
                results,
                &job,
                State::Suppressed,
                "added to a suppression list while the campaign was sending".to_owned(),
                None,
            )
            .await;
        }
    }

    /// Recipients still waiting for a retry when the run ends stay deferred, for the next run.
    async fn report_retries_left(&mut self, results: &mpsc::Sender<Delivery>) {
        for ((due, _), job) in std::mem::take(&mut self.retries) {
            let detail = format!("{} (left for the next run)", job.last_reply);
            let wait = due.saturating_duration_since(Instant::now());
            self.report(results, &job, State::Deferred, detail, Some(wait))
                .await;
        }
    }
}

fn new_job(queued: Queued) -> Job {
    Job {
        message: queued.message,
        id: queued.entry.map(|e| e.id),
        prior: queued.entry.map_or(0, |e| e.attempts),
        attempts: 0,
        epoch: 0,
        last_reply: String::new(),
        last_answer: None,
    }
}
