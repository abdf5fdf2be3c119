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
//!   the run (exit 69, the rest still pending).
//!
//! Domains take turns, so a slow or throttled domain never holds up the others (as long as the
//! others' messages are in the pool).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Job, Outcome, Pacer, RelayFailure};

use crate::config::{Batch, Rate, Retry};
use crate::render::OutgoingMessage;
use crate::report::{Delivery, State};

/// Messages held in the per-domain queues at most. A domain that is much slower than the
/// others can fill it; then everything waits for that domain (documented in the README).
pub const POOL: usize = 8192;

#[derive(Default)]
struct DomainQueue {
    jobs: VecDeque<Job>,
    /// In `ready` or `blocked` (exactly one of them).
    listed: bool,
}

/// What the run saw, for the summary.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Attempts that got a 4xx and were tried again.
    pub retried: usize,
    /// Pauses after relay failures.
    pub relay_pauses: usize,
    /// Domains slowed down by a throttling reply, with the slowest pace they got (per second).
    pub throttled: BTreeMap<String, f64>,
}

pub struct Scheduler {
    pacer: Pacer,
    retry: Retry,
    batch: Option<Batch>,
    workers: usize,
    in_flight: usize,
    /// Jobs in the domain queues.
    parked: usize,
    domains: HashMap<Box<str>, DomainQueue>,
    /// Domains whose next job may go now, in turn.
    ready: VecDeque<Box<str>>,
    /// Domains waiting for their limiter, by when.
    blocked: BTreeMap<(Instant, u64), Box<str>>,
    /// 4xx recipients waiting for their backoff, by when.
    retries: BTreeMap<(Instant, u64), Job>,
    sequence: u64,
    /// A global slot taken while looking for a domain that may go.
    global_held: bool,
    /// Relay failures in a row; also the epoch jobs are stamped with.
    relay_failures: u32,
    paused_until: Option<Instant>,
    /// After a relay pause: one message at a time until one gets an answer.
    probing: bool,
    batch_sent: usize,
    tally: Tally,
}

/// Why a run's dispatching ended early.
pub struct GaveUp(pub RelayFailure);

impl Scheduler {
    pub fn new(pacer: Pacer, rate: &Rate, retry: &Retry, workers: usize) -> Scheduler {
        Scheduler {
            pacer,
            retry: retry.clone(),
            batch: rate.batch,
            workers,
            in_flight: 0,
            parked: 0,
            domains: HashMap::new(),
            ready: VecDeque::new(),
            blocked: BTreeMap::new(),
            retries: BTreeMap::new(),
            sequence: 0,
            global_held: false,
            relay_failures: 0,
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
        let listed = match self.domains.get_mut(domain) {
            Some(queue) => std::mem::replace(&mut queue.listed, true),
            None => {
                self.domains.insert(
                    domain.into(),
                    DomainQueue {
                        jobs: VecDeque::new(),
                        listed: true,
                    },
                );
                false
            }
        };
        if !listed {
            self.ready.push_back(domain.into());
        }
        let Some(queue) = self.domains.get_mut(domain) else {
            return;
        };
        if front {
            queue.jobs.push_front(job);
        } else {
            queue.jobs.push_back(job);
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
    fn dispatch(&mut self, now: Instant, jobs: &async_channel::Sender<Job>) -> Option<Instant> {
        loop {
            if self.in_flight >= self.workers || (self.probing && self.in_flight > 0) {
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
            let Some(domain) = self.ready.pop_front() else {
                continue;
            };
            if self.domains.get(&domain).is_none_or(|q| q.jobs.is_empty()) {
                self.domains.remove(&domain);
                continue;
            }
            if let Err(wait) = self.pacer.admit(&domain) {
                let key = (now + wait, self.next_sequence());
                self.blocked.insert(key, domain);
                continue;
            }
            let Some(queue) = self.domains.get_mut(&domain) else {
                continue;
            };
            let Some(mut job) = queue.jobs.pop_front() else {
                continue;
            };
            if queue.jobs.is_empty() {
                self.domains.remove(&domain);
            } else {
                self.ready.push_back(domain);
            }
            self.parked -= 1;
            self.global_held = false;
            self.in_flight += 1;
            job.epoch = self.relay_failures;
            // Unbounded, and never holding more than `workers` jobs: sending cannot wait.
            if jobs.try_send(job).is_err() {
                self.in_flight -= 1;
                return None;
            }
            if let Some(batch) = self.batch {
                self.batch_sent += 1;
                if self.batch_sent >= batch.size.get() {
                    self.batch_sent = 0;
                    tracing::info!(
                        size = batch.size.get(),
                        pause = %humantime::format_duration(batch.pause),
                        "batch handed out; pausing"
                    );
                    self.paused_until = Some(now + batch.pause);
                }
            }
        }
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

    /// Takes in one outcome. Gives the failure that ends the run, when the relay has failed
    /// too often.
    async fn settle(
        &mut self,
        outcome: Outcome,
        now: Instant,
        results: &mpsc::Sender<Delivery>,
    ) -> Option<GaveUp> {
        self.in_flight -= 1;
        match outcome {
            Outcome::Done(mut job, attempt) => {
                // An answer about a recipient: the relay is working.
                self.relay_failures = 0;
                self.probing = false;
                let throttling = attempt
                    .reply
                    .as_ref()
                    .is_some_and(super::Reply::is_throttling);
                let domain = job.message.envelope.rcpt_to.domain();
                if let Some(per_second) = throttling.then(|| self.pacer.throttle(domain)).flatten()
                {
                    tracing::warn!(domain, per_second, reply = %attempt.detail, "throttled by the server; slowing this domain down");
                    let slowest = self
                        .tally
                        .throttled
                        .entry(domain.to_owned())
                        .or_insert(per_second);
                    *slowest = slowest.min(per_second);
                }
                if attempt.state == State::Deferred {
                    job.attempts += 1;
                    if job.attempts < self.retry.max_attempts.get() {
                        let wait = self.backoff(self.retry.backoff, job.attempts);
                        tracing::info!(
                            line = job.message.line,
                            recipient = %job.message.envelope.rcpt_to,
                            attempt = job.attempts,
                            retry_in = %humantime::format_duration(Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))),
                            reply = %attempt.detail,
                            "deferred"
                        );
                        self.tally.retried += 1;
                        job.last_reply = attempt.detail;
                        let key = (now + wait, self.next_sequence());
                        self.retries.insert(key, job);
                        return None;
                    }
                }
                let detail = if attempt.state == State::Deferred {
                    format!("{} (left for the next run)", attempt.detail)
                } else {
                    attempt.detail
                };
                report(results, &job, attempt.state, detail).await;
                None
            }
            Outcome::Relay(job, failure) => {
                let news = job.epoch == self.relay_failures;
                self.enqueue(job, true);
                if !news {
                    // A connection that was already on its way when the relay failed.
                    return None;
                }
                self.relay_failures += 1;
                if self.relay_failures >= self.retry.relay_attempts.get() {
                    return Some(GaveUp(failure));
                }
                let pause = self.backoff(self.retry.relay_backoff, self.relay_failures);
                tracing::warn!(
                    reason = %failure.0,
                    failures = self.relay_failures,
                    pause = %humantime::format_duration(Duration::from_millis(u64::try_from(pause.as_millis()).unwrap_or(u64::MAX))),
                    "relay unavailable; pausing"
                );
                self.tally.relay_pauses += 1;
                self.paused_until = Some(now + pause);
                self.probing = true;
                None
            }
        }
    }

    /// Runs until every message taken has a final outcome, the relay has failed for good, or
    /// nobody listens for results any more. Messages never taken, and those put back after
    /// a relay failure, are not reported: they are still pending.
    pub async fn run(
        mut self,
        input: async_channel::Receiver<OutgoingMessage>,
        jobs: async_channel::Sender<Job>,
        mut outcomes: mpsc::UnboundedReceiver<Outcome>,
        results: mpsc::Sender<Delivery>,
    ) -> (Option<RelayFailure>, Tally) {
        let mut input_open = true;
        let mut gave_up: Option<RelayFailure> = None;
        let mut linger_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            while input_open && gave_up.is_none() && self.parked < POOL {
                match input.try_recv() {
                    Ok(message) => self.enqueue(new_job(message), false),
                    Err(async_channel::TryRecvError::Empty) => break,
                    Err(async_channel::TryRecvError::Closed) => input_open = false,
                }
            }
            self.release_due(now);
            let wake = if gave_up.is_none() {
                self.dispatch(now, &jobs)
            } else {
                None
            };
            if self.in_flight == 0 {
                if gave_up.is_some() {
                    break;
                }
                if !input_open && self.parked == 0 {
                    // Only retries are left: wait for those due within the linger.
                    let deadline = *linger_until.get_or_insert(now + self.retry.linger);
                    match self.retries.first_key_value() {
                        Some(((due, _), _)) if *due <= deadline => {}
                        _ => break,
                    }
                }
            }
            let take_input = input_open && gave_up.is_none() && self.parked < POOL;
            tokio::select! {
                biased;
                outcome = outcomes.recv() => {
                    let Some(outcome) = outcome else { break };
                    if let Some(GaveUp(failure)) = self.settle(outcome, Instant::now(), &results).await {
                        tracing::error!(reason = %failure.0, "relay unavailable; giving up for this run");
                        gave_up = Some(failure);
                    }
                }
                message = input.recv(), if take_input => match message {
                    Ok(message) => self.enqueue(new_job(message), false),
                    Err(_) => input_open = false,
                },
                () = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
            if results.is_closed() {
                break;
            }
        }
        jobs.close();
        // Recipients still waiting for a retry stay deferred, for the next run.
        for (_, job) in std::mem::take(&mut self.retries) {
            let detail = format!("{} (left for the next run)", job.last_reply);
            report(&results, &job, State::Deferred, detail).await;
        }
        (gave_up, self.tally)
    }
}

fn new_job(message: OutgoingMessage) -> Job {
    Job {
        message,
        attempts: 0,
        epoch: 0,
        last_reply: String::new(),
    }
}

async fn report(results: &mpsc::Sender<Delivery>, job: &Job, state: State, detail: String) {
    let message = &job.message;
    let attempts = job.attempts + u32::from(state != State::Deferred);
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
