//! The scheduler: one task that decides which message goes next and when.
//!
//! It takes rendered messages into per-domain queues (at most [`POOL`] at a time, so memory
//! stays flat), hands one to a worker whenever a worker is idle and both the global and the
//! domain's rate allow it ([`Pacer`]), and reads every outcome back:
//!
//! - 4xx: the recipient is retried after an exponential backoff with jitter, within this run
//!   while attempts remain and the retry falls due before the run would end (plus
//!   `[retry] linger`); otherwise it stays `deferred`. A throttling reply also slows its domain;
//!   one that would slow it below `[rate] throttle_floor` suspends it for `[retry] suspension`:
//!   its messages are set aside and reported `deferred` until then (recorded with the journal,
//!   which later runs read), and the other domains go on.
//! - 5xx, sent, ambiguous: final, reported once.
//! - A relay-wide failure: the message goes back to its queue untouched. While other messages
//!   are on the wire, their fate decides what it was: one of them answered after it (any
//!   reply but a 421), the relay is serving the others and this was its connection limit — the
//!   pool shrinks to the connections in use and tries one more after [`GROW_AGAIN_AFTER`]; they
//!   fail too, or none was on the wire, the relay is unavailable — sending pauses with backoff,
//!   then resumes on one connection (the probe) and grows back by one connection per answer
//!   up to `connections`. `relay_attempts` failures in a row end the run (exit 69, the rest
//!   still pending).
//! - A configuration failure (the relay and the transport's settings disagree: certificate,
//!   TLS, AUTH, scheme) is not waited for: the run ends at once, without a halt while the relay
//!   has answered about no recipient in this run (exit 65), with the breaker's halt after.
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

use governor::clock::{Clock, MonotonicClock};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::daily::{Check, Daily, Waiting};
use super::{
    FailureKind, Job, Outcome, Pacer, Queued, Recorder, RelayFailure, Settings, Suppressed,
    Throttled, Verdict,
};

use crate::config::{Batch, Retry};
use crate::outcome::{Attempt, Delivery, Reply, State};

/// Messages held in the per-domain queues at most. A domain that is much slower than the
/// others can fill it; then everything waits for that domain (documented in the README).
pub const POOL: usize = 8192;
/// After the relay refused one more connection while serving the others (its connection
/// limit), the pool stays at the connections in use this long before it tries one more.
pub const GROW_AGAIN_AFTER: Duration = Duration::from_secs(60);
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
    /// Connections the relay refused while it answered on the others (its connection limit).
    pub connections_refused: usize,
    /// Times the pool grew back to `connections` after an outage or a connection limit.
    pub regrown: usize,
    /// Domains slowed down by a throttling reply, with the slowest pace they got (per second).
    pub throttled: BTreeMap<String, f64>,
    /// Domains suspended (in this run, or still from an earlier one), with the recipients
    /// left deferred until then.
    pub suspended: BTreeMap<String, SuspendedDomain>,
    /// Domains whose daily cap was reached, with until when (the next day) and the
    /// recipients left deferred until then.
    pub capped: BTreeMap<String, SuspendedDomain>,
}

/// A suspended domain, for the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuspendedDomain {
    /// When it ends.
    pub until: std::time::SystemTime,
    /// Its recipients this run left deferred until then.
    pub deferred: usize,
}

/// A domain whose messages wait: it kept throttling below `[rate] throttle_floor`.
struct Suspended {
    until: Instant,
    /// The same moment on the wall clock, for the journal.
    due: std::time::SystemTime,
    detail: String,
    /// Held for its daily cap, not for throttling.
    capped: bool,
}

/// `C`: the pacer's clock (governor's monotonic clock; tests give one that follows tokio's).
pub struct Scheduler<C: Clock = MonotonicClock> {
    pacer: Pacer<C>,
    retry: Retry,
    journal: Option<Recorder>,
    suppressed: Option<Suppressed>,
    /// Jobs whose recipient was suppressed after the run started: reported, never sent.
    dropped: Vec<Job>,
    /// Suspended domains, from this run or an earlier one.
    suspended: HashMap<Arc<str>, Suspended>,
    /// Jobs of a suspended domain, to report deferred until the suspension ends.
    aside: Vec<Job>,
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
    /// Whether the relay has answered about any recipient in this run: until then, a
    /// configuration failure ends the run without a halt (see `settle_relay_failure`).
    relay_answered: bool,
    paused_until: Option<Instant>,
    /// Connections in use at most: `connections`, one after a relay pause (the probe), growing
    /// by one per answer; the connections in use after the relay's connection limit.
    cap: usize,
    /// After a connection limit: no growth before then.
    hold_until: Option<Instant>,
    /// Below `connections` since a pause or a connection limit: growing back is logged once.
    shrunk: bool,
    /// Relay failures (the first, and how many) while other messages were on the wire,
    /// waiting for their fate: an answer makes them the relay's connection limit; none left
    /// on the wire without an answer, an outage.
    suspect: Option<(RelayFailure, usize)>,
    batch_sent: usize,
    tally: Tally,
    /// Send windows and daily caps, and the moment of the run's start they count from.
    daily: Option<(Daily, Instant)>,
    /// Set when the window closed or the day's cap was reached: the run ends.
    waiting: Option<Waiting>,
}

/// Why a run's dispatching ends early.
pub enum GaveUp {
    /// The relay failed too often, or no worker is left (exit 69), the relay cannot be used
    /// as configured and has answered about no recipient yet (exit 65), or the outbox cannot
    /// be written (exit 74).
    Relay(RelayFailure),
    /// A stop or a breaker: hand out nothing more (exit 3).
    Halt(String),
    /// A signal: hand out nothing more in this run (exit 75); nothing is recorded.
    Interrupt(String),
    /// The journal cannot be written: hand out nothing more (exit 74). No halt is recorded
    /// (it could not be, and the next run may go on once the journal can be written).
    Unrecorded(String),
    /// The send window closed or the day's cap is reached: hand out nothing more in this run
    /// (exit 75); the rest stays pending.
    Wait(Waiting),
}

/// Why a run stopped handing out messages, when it was not the relay.
pub enum Stopped {
    /// A stop or a breaker, recorded in the journal.
    Halt(String),
    /// A signal, for this run only.
    Interrupt(String),
    /// The send window closed or the day's cap is reached.
    Wait(Waiting),
}

impl<C: Clock + Clone> Scheduler<C> {
    pub fn new(
        mut pacer: Pacer<C>,
        settings: &Settings<'_>,
        workers: Vec<mpsc::UnboundedSender<Job>>,
    ) -> Scheduler<C> {
        let connections = workers.len();
        let start = Instant::now();
        let suspended = pacer
            .take_suspensions()
            .into_iter()
            .map(|s| {
                let held = Suspended {
                    until: start + s.remaining,
                    due: s.until,
                    detail: s.detail,
                    capped: false,
                };
                (Arc::from(s.domain.as_str()), held)
            })
            .collect();
        Scheduler {
            pacer,
            retry: settings.retry.clone(),
            journal: settings.journal.clone(),
            suppressed: settings.suppressed.clone(),
            dropped: Vec::new(),
            suspended,
            aside: Vec::new(),
            halt_ratio: settings.safety.halt_failure_ratio,
            halt_sample: settings.safety.halt_min_sample.get(),
            answered: 0,
            failed: 0,
            relay_answered: false,
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
            paused_until: None,
            cap: connections,
            hold_until: None,
            shrunk: false,
            suspect: None,
            batch_sent: 0,
            tally: Tally::default(),
            daily: settings.daily.clone().map(|daily| (daily, start)),
            waiting: None,
        }
    }

    /// `now` on the calendar's clock: the run's start there, plus the time since.
    fn wall(&self, now: Instant) -> Option<chrono::DateTime<chrono::Utc>> {
        self.daily.as_ref().map(|(daily, start)| {
            daily.start()
                + chrono::TimeDelta::from_std(now.saturating_duration_since(*start))
                    .unwrap_or_default()
        })
    }

    /// `domain` reached its daily cap: its messages are set aside (reported deferred until
    /// `until`, the next day), and the other domains go on.
    fn cap_domain(
        &mut self,
        domain: &str,
        until: chrono::DateTime<chrono::Utc>,
        reason: String,
        now: Instant,
    ) {
        let wall = self.wall(now).unwrap_or(until);
        let wait = (until - wall).to_std().unwrap_or_default();
        tracing::info!(domain, reason = %reason, "daily cap reached for this domain; its messages are left deferred until the next day");
        self.tally.capped.insert(
            domain.to_owned(),
            SuspendedDomain {
                until: until.into(),
                deferred: 0,
            },
        );
        self.set_aside(domain);
        self.suspended.insert(
            domain.into(),
            Suspended {
                until: now + wait,
                due: until.into(),
                detail: reason,
                capped: true,
            },
        );
    }

    /// Takes `domain`'s queued and retrying jobs out, to be reported deferred.
    fn set_aside(&mut self, domain: &str) {
        if let Some(queue) = self.domains.remove(domain) {
            self.parked -= queue.len();
            self.aside.extend(queue);
        }
        self.ready.retain(|d| &**d != domain);
        self.blocked.retain(|_, d| &**d != domain);
        let waiting: Vec<(Instant, u64)> = self
            .retries
            .iter()
            .filter(|(_, job)| job.message.envelope.rcpt_to.domain() == domain)
            .map(|(key, _)| *key)
            .collect();
        for key in waiting {
            if let Some(job) = self.retries.remove(&key) {
                self.aside.push(job);
            }
        }
    }

    /// A message of `domain` was not taken by the relay after all: its place in the day's
    /// cap is free again.
    fn give_back(&mut self, job: &Job) {
        if let (Some((daily, _)), Some(taken_at)) = (&mut self.daily, job.taken_at) {
            daily.give_back(job.message.envelope.rcpt_to.domain(), taken_at);
        }
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    fn enqueue(&mut self, job: Job, front: bool) {
        if self.held_back(job.message.envelope.rcpt_to.domain()) {
            self.aside.push(job);
            return;
        }
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

    /// Whether `domain` is suspended now; a suspension that is over is lifted.
    fn held_back(&mut self, domain: &str) -> bool {
        let Some(suspension) = self.suspended.get(domain) else {
            return false;
        };
        if suspension.until > Instant::now() {
            return true;
        }
        tracing::info!(domain, "suspension over; sending to this domain again");
        self.suspended.remove(domain);
        false
    }

    /// `domain` kept throttling below the floor: it is suspended for `[retry] suspension`,
    /// recorded with its pace for later runs, and its messages here are set aside (reported
    /// deferred until then).
    fn suspend(&mut self, domain: &str, per_second: f64, ceiling: f64, reply: &str, now: Instant) {
        if self.suspended.contains_key(domain) {
            return;
        }
        let due = crate::clock::due_now_or_now() + self.retry.suspension;
        let until = humantime::format_rfc3339_seconds(due);
        let detail = format!(
            "{domain} suspended until {until}: it kept answering with throttling replies ({reply}) below `[rate] throttle_floor`"
        );
        tracing::warn!(
            domain,
            until = %until,
            per_second,
            reply,
            "domain suspended: it keeps throttling below `[rate] throttle_floor`; its messages are left deferred for a run after then"
        );
        if let Some(journal) = &self.journal {
            journal.suspended(domain, due, per_second, ceiling, &detail);
        }
        self.tally.suspended.insert(
            domain.to_owned(),
            SuspendedDomain {
                until: due,
                deferred: 0,
            },
        );
        self.set_aside(domain);
        self.suspended.insert(
            domain.into(),
            Suspended {
                until: now + self.retry.suspension,
                due,
                detail,
                capped: false,
            },
        );
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
            // While a relay failure waits for a verdict, nothing new goes: the verdict must
            // come from connections that were on the wire when it failed.
            if self.idle.is_empty() || self.in_flight >= self.cap || self.suspect.is_some() {
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
            let wall = self.wall(now);
            if let (Some((daily, _)), Some(wall)) = (&mut self.daily, wall)
                && let Some(waiting) = daily.blocked(wall)
            {
                self.waiting = Some(waiting);
                return None;
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
            if let (Some((daily, _)), Some(wall)) = (&mut self.daily, wall) {
                match daily.check(wall, &domain) {
                    Check::Go => {}
                    Check::Stop(waiting) => {
                        self.ready.push_front(domain);
                        self.waiting = Some(waiting);
                        return None;
                    }
                    Check::Capped { until, reason } => {
                        self.cap_domain(&domain, until, reason, now);
                        continue;
                    }
                }
            }
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
            job.taken_at = wall.filter(|_| self.daily.is_some());
            let taken_domain: Option<Arc<str>> = self
                .daily
                .is_some()
                .then(|| job.message.envelope.rcpt_to.domain().into());
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
            if let (Some((daily, _)), Some(wall), Some(taken)) =
                (&mut self.daily, wall, taken_domain)
            {
                daily.take(wall, &taken);
            }
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

    /// One more connection, after an answer, while under `connections` and not holding
    /// after a connection limit.
    fn grow(&mut self, now: Instant) {
        let connections = self.alive();
        if self.cap >= connections || self.hold_until.is_some_and(|until| now < until) {
            return;
        }
        if self.shrunk {
            self.shrunk = false;
            tracing::info!(
                connections,
                "relay answers again; growing back to {connections} connections"
            );
        }
        self.cap += 1;
        if self.cap == connections {
            self.tally.regrown += 1;
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
        let ended = match verdict {
            Verdict::Answered(attempt) => {
                self.relay_answered = true;
                self.idle.push(worker);
                self.settle_answer(job, attempt, now, results).await
            }
            Verdict::Crashed => self.settle_crash(worker, job, results).await,
            Verdict::Unrecorded(error) => {
                self.give_back(&job);
                Some(self.settle_unrecorded(worker, job, &error))
            }
            Verdict::Relay(failure) => {
                self.give_back(&job);
                self.settle_relay_failure(worker, job, failure, now)
            }
        };
        if ended.is_none()
            && self.in_flight == 0
            && let Some((failure, _)) = self.suspect.take()
        {
            // Nothing on the wire answered after the failure: the relay is unavailable.
            return self.relay_pause(failure, now);
        }
        ended
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
        self.note_answer(&job, &attempt, now);
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

    /// What any answer says about the relay: that it answers now (a failure waiting for a
    /// verdict was its connection limit), that it works again (when the job went out since
    /// the last pause: the pool grows by one connection), and whether it throttles the
    /// recipient's domain.
    fn note_answer(&mut self, job: &Job, attempt: &Attempt, now: Instant) {
        let answering = answering(attempt);
        if answering && let Some((failure, refused)) = self.suspect.take() {
            // The relay answered on another connection after refusing one: it serves the
            // others, so that was its connection limit. Go on with those in use (this one's
            // worker goes on too), and try one more after a while.
            self.cap = (self.in_flight + 1).clamp(1, self.alive().max(1));
            self.hold_until = Some(now + GROW_AGAIN_AFTER);
            self.shrunk = true;
            self.tally.connections_refused += refused;
            tracing::warn!(
                reason = %failure.reason,
                refused,
                connections = self.cap,
                again_in = %humantime::format_duration(GROW_AGAIN_AFTER),
                "the relay refused one more connection while answering on the others; going on with fewer"
            );
        }
        // An answer about a recipient handed out since the last pause: the relay is
        // working again. (An answer to an older one says nothing about now.)
        if job.epoch == self.epoch {
            self.relay_failures = 0;
            if answering {
                self.grow(now);
            }
        }
        let throttling = attempt.reply.as_ref().is_some_and(Reply::is_throttling);
        let domain = job.message.envelope.rcpt_to.domain();
        match throttling.then(|| self.pacer.throttle(domain)).flatten() {
            Some(Throttled::Slowed(per_second)) => {
                tracing::warn!(domain, per_second, reply = %attempt.detail, "throttled by the server; slowing this domain down");
                let slowest = self
                    .tally
                    .throttled
                    .entry(domain.to_owned())
                    .or_insert(per_second);
                *slowest = slowest.min(per_second);
            }
            Some(Throttled::Suspend {
                per_second,
                ceiling,
            }) => {
                // The reply's codes only: its text may be about this recipient, and the
                // detail goes on every row of the domain.
                let codes = attempt.reply.as_ref().map_or_else(String::new, |reply| {
                    match &reply.enhanced {
                        Some(enhanced) => format!("{} {enhanced}", reply.code),
                        None => reply.code.to_string(),
                    }
                });
                self.suspend(domain, per_second, ceiling, &codes, now);
            }
            None => {}
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
        if self.held_back(job.message.envelope.rcpt_to.domain()) {
            // Its domain is suspended: it waits with the others.
            job.last_reply = attempt.detail;
            job.last_answer = attempt.reply;
            self.aside.push(job);
            return;
        }
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
                Some(crate::clock::due_now_or_now() + wait),
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
        job: Job,
        results: &mpsc::Sender<Delivery>,
    ) -> Option<GaveUp> {
        self.workers[worker] = None;
        tracing::error!(
            line = job.message.line,
            "a delivery worker stopped unexpectedly"
        );
        // `report` counts this attempt (ambiguous is final).
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
        GaveUp::Unrecorded(format!(
            "the journal cannot be written, so nothing more is sent: {error}"
        ))
    }

    /// A relay-wide failure: the message goes back to its queue untouched. A configuration
    /// failure ends the run at once: without a halt while the relay has answered about no
    /// recipient in this run (the campaign is fixed and sent again), with the breaker's halt
    /// once it has (something changed mid-run, and a person should look). With other messages
    /// on the wire, what they get decides between the relay's connection limit and an outage
    /// (see `suspect`); otherwise sending pauses (`relay_pause`).
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
        if failure.kind == FailureKind::Local {
            // This machine, not the relay: no pause mends a full or read-only outbox.
            self.idle.push(worker);
            return Some(GaveUp::Relay(failure));
        }
        if failure.kind == FailureKind::Config {
            self.idle.push(worker);
            if !self.relay_answered {
                return Some(GaveUp::Relay(failure));
            }
            return Some(GaveUp::Halt(format!(
                "a new connection to the relay failed after messages had gone out: {}",
                failure.reason
            )));
        }
        // This worker has no connection now: the others (open, warm) are used first.
        self.idle.insert(0, worker);
        if stale {
            // A connection that was already on its way when the relay failed.
            return None;
        }
        if self.in_flight > 0 {
            // Others are on the wire: no new message until their fate says whether the relay
            // is serving them (its connection limit) or unavailable (they fail too: the
            // pause comes when none is left, in `settle`).
            tracing::debug!(reason = %failure.reason, on_the_wire = self.in_flight, "relay failure; waiting for the connections in use");
            match &mut self.suspect {
                Some((_, refused)) => *refused += 1,
                None => self.suspect = Some((failure, 1)),
            }
            return None;
        }
        let failure = self.suspect.take().map_or(failure, |(first, _)| first);
        self.relay_pause(failure, now)
    }

    /// The relay is down: a new epoch begins, and sending pauses with backoff, then resumes
    /// on one connection (the probe), one more per answer (`grow`); `relay_attempts` failures
    /// in a row give up.
    fn relay_pause(&mut self, failure: RelayFailure, now: Instant) -> Option<GaveUp> {
        self.relay_failures += 1;
        self.epoch += 1;
        self.cap = 1;
        self.hold_until = None;
        self.shrunk = true;
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
                retry_in.map(|wait| crate::clock::due_now_or_now() + wait),
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
        (mut halt, mut interrupt): (
            watch::Receiver<Option<String>>,
            watch::Receiver<Option<String>>,
        ),
        results: mpsc::Sender<Delivery>,
    ) -> (Option<RelayFailure>, Option<Stopped>, Tally) {
        let mut input_open = true;
        let mut gave_up: Option<GaveUp> = None;
        let mut halt_open = true;
        let mut interrupt_open = true;
        let mut linger_until: Option<Instant> = None;
        loop {
            if gave_up.is_none()
                && let Some(reason) = halt.borrow_and_update().clone()
            {
                let end = GaveUp::Halt(reason);
                self.give_up(&end);
                gave_up = Some(end);
            }
            if gave_up.is_none()
                && let Some(signal) = interrupt.borrow_and_update().clone()
            {
                let end = GaveUp::Interrupt(signal);
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
            if gave_up.is_none()
                && let Some(waiting) = self.waiting.take()
            {
                let end = GaveUp::Wait(waiting);
                self.give_up(&end);
                gave_up = Some(end);
            }
            self.report_dropped(&results).await;
            self.report_aside(&results).await;
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
                changed = interrupt.changed(), if interrupt_open && gave_up.is_none() => {
                    if changed.is_err() {
                        interrupt_open = false;
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
        self.report_retried_parked(&results).await;
        self.report_aside(&results).await;
        let (failure, halted) = match gave_up {
            Some(GaveUp::Relay(failure)) => (Some(failure), None),
            Some(GaveUp::Halt(reason) | GaveUp::Unrecorded(reason)) => {
                (None, Some(Stopped::Halt(reason)))
            }
            Some(GaveUp::Interrupt(signal)) => (None, Some(Stopped::Interrupt(signal))),
            Some(GaveUp::Wait(waiting)) => (None, Some(Stopped::Wait(waiting))),
            None => (None, None),
        };
        (failure, halted, self.tally)
    }

    /// Says why the run gives up, and records a halt in the journal.
    fn give_up(&self, end: &GaveUp) {
        match end {
            GaveUp::Relay(failure) if failure.kind == FailureKind::Config => {
                tracing::error!(reason = %failure.reason, "the relay cannot be used as configured; nothing more is sent in this run");
            }
            GaveUp::Relay(failure) => {
                tracing::error!(reason = %failure.reason, "relay unavailable; giving up for this run");
            }
            GaveUp::Halt(reason) => {
                tracing::error!(reason = %reason, "halted: no new message starts");
                self.record_halt(reason);
            }
            GaveUp::Unrecorded(reason) => {
                tracing::error!(reason = %reason, "stopped: no new message starts");
            }
            GaveUp::Interrupt(signal) => {
                tracing::warn!(signal = %signal, "stopped by a signal: no new message starts in this run");
            }
            GaveUp::Wait(waiting) => {
                tracing::warn!(reason = %waiting.reason, "no new message starts in this run");
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

    /// Reports the jobs of suspended domains deferred, due when the suspension ends.
    async fn report_aside(&mut self, results: &mpsc::Sender<Delivery>) {
        for job in std::mem::take(&mut self.aside) {
            let domain = job.message.envelope.rcpt_to.domain();
            let Some(suspension) = self.suspended.get(domain) else {
                // Lifted meanwhile (cannot happen within one loop turn): it goes after all.
                self.enqueue(job, false);
                continue;
            };
            let detail = suspension.detail.clone();
            let due = suspension.due;
            let tally = if suspension.capped {
                &mut self.tally.capped
            } else {
                &mut self.tally.suspended
            };
            tally
                .entry(domain.to_owned())
                .or_insert(SuspendedDomain {
                    until: due,
                    deferred: 0,
                })
                .deferred += 1;
            tracing::debug!(line = job.message.line, recipient = %job.message.envelope.rcpt_to, "deferred: its domain is suspended");
            // `report` writes the due time back as the due clock's now plus the wait.
            let wait = due
                .duration_since(crate::clock::due_now_or_now())
                .unwrap_or(Duration::ZERO);
            self.report(results, &job, State::Deferred, detail, Some(wait))
                .await;
        }
    }

    /// Recipients whose retry fell due but did not go before the run ended early stay
    /// deferred, as their last answer left them (the others in the queues stay pending).
    async fn report_retried_parked(&mut self, results: &mpsc::Sender<Delivery>) {
        let mut retried = Vec::new();
        for queue in self.domains.values_mut() {
            let (tried, untried): (VecDeque<Job>, VecDeque<Job>) =
                queue.drain(..).partition(|job| job.attempts > 0);
            *queue = untried;
            retried.extend(tried);
        }
        for job in retried {
            self.parked -= 1;
            let detail = format!("{} (left for the next run)", job.last_reply);
            self.report(results, &job, State::Deferred, detail, Some(Duration::ZERO))
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

/// Whether an attempt shows the relay answering: a reply about the recipient, other than a 421
/// (which closes the connection: a relay going down says it too).
fn answering(attempt: &Attempt) -> bool {
    attempt
        .reply
        .as_ref()
        .is_some_and(|reply| reply.code != 421)
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
        taken_at: None,
    }
}

#[cfg(test)]
mod tests {
    //! The scheduler through `dispatch::run`, with the scripted transport (see
    //! `dispatch::tests`), on tokio's clock; limits on a pacer whose clock follows tokio's.
    //! Durations are milliseconds and timing checks lower bounds, so the tests hold on the
    //! real clock and on paused time alike.

    use std::num::{NonZeroU32, NonZeroUsize};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::tests::{
        Act, Call, Durable, Event, Journal, Script, Setup, accepted, on_tokio_time, queued, reply,
    };
    use super::super::{Entry, Transport};
    use super::*;
    use crate::config::Pace;

    fn scripted(script: &Arc<Script>) -> Transport {
        Transport::Scripted(Arc::clone(script))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn id(line: u64) -> i64 {
        i64::try_from(line).unwrap()
    }

    /// The journal's outcomes for `line` as (state, attempts, reply code, next attempt set).
    fn recorded(journal: &Journal, line: u64) -> Vec<(State, u32, Option<u16>, bool)> {
        journal
            .outcomes(id(line))
            .into_iter()
            .map(|event| match event {
                Event::Outcome {
                    state,
                    attempts,
                    code,
                    retry,
                    ..
                } => (state, attempts, code, retry),
                _ => unreachable!("outcomes() gives outcomes"),
            })
            .collect()
    }

    fn pace(count: u32, per: Duration) -> Pace {
        Pace {
            count: NonZeroU32::new(count).unwrap(),
            per,
            burst: NonZeroU32::MIN,
        }
    }

    #[test]
    fn every_queued_message_is_reported_exactly_once_whatever_its_fate() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.retry.relay_attempts = NonZeroU32::new(1000).unwrap();
            // By line % 6: sent; failed (5xx); deferred once, then sent; deferred every time;
            // ambiguous; a relay failure, then sent.
            let script = Script::new(4, Duration::ZERO, |call| match (call.line % 6, call.nth) {
                (1, _) => reply(550, "5.1.1 no such user"),
                (2, 1) | (3, _) => reply(451, "4.3.0 try again later"),
                (4, _) => Act::Answer(Attempt::without_reply(
                    State::Ambiguous,
                    "no reply after the message body",
                )),
                (5, 1) => Act::Relay(RelayFailure::new("connection reset")),
                _ => accepted(),
            });
            let messages = (1..=120)
                .map(|line| queued(line, &format!("r{line}@d{}.example", line % 5)))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;

            let by_line = finished.by_line();
            assert_eq!(by_line.len(), 120, "every message is reported");
            let calls = script.lines();
            let bodies = script.bodies();
            for line in 1..=120 {
                let (state, attempts, tries, sent_bodies) = match line % 6 {
                    0 => (State::Sent, 1, 1, 1),
                    1 => (State::Failed, 1, 1, 1),
                    2 => (State::Sent, 2, 2, 2),
                    3 => (State::Deferred, 4, 4, 4),
                    4 => (State::Ambiguous, 1, 1, 1),
                    _ => (State::Sent, 1, 2, 1),
                };
                let delivery = by_line[&line];
                assert_eq!(
                    (delivery.state, delivery.attempts),
                    (state, attempts),
                    "line {line}: {}",
                    delivery.detail
                );
                assert_eq!(delivery.recipient, format!("r{line}@d{}.example", line % 5));
                assert_eq!(
                    calls.iter().filter(|&&l| l == line).count(),
                    tries,
                    "line {line}"
                );
                assert_eq!(
                    bodies.iter().filter(|&&l| l == line).count(),
                    sent_bodies,
                    "line {line}"
                );
                // The journal's last word on the row is the reported one.
                let journal = recorded(&setup.journal, line);
                let last = journal.last().expect("an outcome");
                assert_eq!((last.0, last.1), (state, attempts), "line {line}");
                // A relay failure left no outcome of its own: the row went back to pending.
                let requeued = setup.journal.events().contains(&Event::Requeued(id(line)));
                assert_eq!(requeued, line % 6 == 5, "line {line}");
                let outcomes = match line % 6 {
                    2 => 2,
                    3 => 4,
                    _ => 1,
                };
                assert_eq!(journal.len(), outcomes, "line {line}: {journal:?}");
            }
            assert_eq!(finished.ended.tally.retried, 20 + 20 * 3);
            assert!(finished.ended.failure.is_none());
            assert!(finished.ended.halted.is_none());
        });
    }

    #[test]
    fn a_4xx_is_retried_with_a_growing_backoff_then_left_deferred() {
        on_tokio_time(async {
            let setup = Setup::new();
            let script = Script::new(1, Duration::ZERO, |_| reply(451, "4.2.1 mailbox busy"));
            // Line 2's recipient had two attempts in earlier runs: its backoff starts further up.
            let mut earlier = queued(2, "earlier@b.example");
            earlier.entry = Some(Entry { id: 2, attempts: 2 });
            let finished = setup
                .run(scripted(&script), vec![queued(1, "now@a.example"), earlier])
                .await;

            for (line, prior) in [(1, 0), (2, 2)] {
                let delivery = finished.by_line()[&line].clone();
                assert_eq!((delivery.state, delivery.attempts), (State::Deferred, 4));
                assert_eq!(
                    delivery.detail,
                    "451 4.2.1 mailbox busy (left for the next run)"
                );
                let times: Vec<Instant> = script
                    .calls()
                    .iter()
                    .filter(|c| c.line == line)
                    .map(|c| c.at)
                    .collect();
                assert_eq!(times.len(), 4, "max_attempts, no more");
                // Each wait is at least half the exponential backoff (2, 4, 8 ms; capped at 8).
                for (n, pair) in times.windows(2).enumerate() {
                    let attempt = prior + u32::try_from(n).unwrap() + 1;
                    let floor = setup.retry.backoff_after(setup.retry.backoff, attempt) / 2;
                    assert!(
                        pair[1] - pair[0] >= floor,
                        "line {line}, attempt {attempt}: waited {:?}, at least {floor:?}",
                        pair[1] - pair[0]
                    );
                }
                // Each 4xx is recorded deferred with its next attempt; attempts count on from
                // the earlier runs'.
                let expected: Vec<_> = (1..=4)
                    .map(|n| (State::Deferred, prior + n, Some(451), true))
                    .collect();
                assert_eq!(recorded(&setup.journal, line), expected, "line {line}");
            }
            assert_eq!(finished.ended.tally.retried, 6);
        });
    }

    #[test]
    fn a_4xx_then_an_answer_is_final_and_a_5xx_is_never_retried() {
        on_tokio_time(async {
            let setup = Setup::new();
            let script = Script::new(1, Duration::ZERO, |call| match (call.line, call.nth) {
                (1, _) => reply(550, "5.1.1 no such user"),
                (2 | 3, 1) => reply(450, "4.2.0 greylisted"),
                (2, _) => reply(554, "5.7.1 refused"),
                _ => accepted(),
            });
            let finished = setup
                .run(
                    scripted(&script),
                    vec![
                        queued(1, "gone@a.example"),
                        queued(2, "refused@a.example"),
                        queued(3, "grey@a.example"),
                    ],
                )
                .await;
            assert_eq!(finished.state(1), Some((State::Failed, 1)));
            assert_eq!(finished.state(2), Some((State::Failed, 2)));
            assert_eq!(finished.state(3), Some((State::Sent, 2)));
            let tries = |line| script.lines().iter().filter(|&&l| l == line).count();
            assert_eq!((tries(1), tries(2), tries(3)), (1, 2, 2));
            assert_eq!(
                recorded(&setup.journal, 1),
                [(State::Failed, 1, Some(550), false)]
            );
            assert_eq!(
                recorded(&setup.journal, 2),
                [
                    (State::Deferred, 1, Some(450), true),
                    (State::Failed, 2, Some(554), false)
                ]
            );
            assert_eq!(finished.by_line()[&2].detail, "554 5.7.1 refused");
            assert_eq!(finished.ended.tally.retried, 2);
        });
    }

    #[test]
    fn a_retry_due_after_the_linger_is_left_for_the_next_run_at_once() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.retry.backoff = Duration::from_secs(10);
            setup.retry.max_backoff = Duration::from_secs(600);
            setup.retry.linger = Duration::from_secs(1);
            let script = Script::new(1, Duration::ZERO, |_| reply(451, "4.3.0 later"));
            let start = Instant::now();
            let finished = setup
                .run(scripted(&script), vec![queued(1, "a@a.example")])
                .await;
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "it waited for the retry"
            );
            assert_eq!(script.calls().len(), 1);
            assert_eq!(finished.state(1), Some((State::Deferred, 1)));
            assert_eq!(
                finished.by_line()[&1].detail,
                "451 4.3.0 later (left for the next run)"
            );
            let journal = recorded(&setup.journal, 1);
            assert_eq!(journal.last(), Some(&(State::Deferred, 1, Some(451), true)));
        });
    }

    #[test]
    fn past_the_retry_cap_a_4xx_is_left_for_the_next_run_at_once() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.retry.backoff = Duration::from_secs(10);
            setup.retry.linger = Duration::ZERO;
            let script = Script::new(1, Duration::ZERO, |_| reply(451, "4.3.0 later"));
            let total = u64::try_from(RETRY_CAP).unwrap() + 3;
            let messages = (1..=total)
                .map(|line| queued(line, &format!("r{line}@d{}.example", line % 7)))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(finished.by_line().len(), RETRY_CAP + 3);
            assert_eq!(script.calls().len(), RETRY_CAP + 3, "tried once each");
            let (held, turned_away): (Vec<_>, Vec<_>) = finished
                .deliveries
                .iter()
                .partition(|d| d.detail == "451 4.3.0 later (left for the next run)");
            assert_eq!(held.len(), RETRY_CAP);
            assert_eq!(turned_away.len(), 3);
            assert!(turned_away.iter().all(|d| d.detail
                == "451 4.3.0 later (left for the next run: too many recipients waiting for a retry)"));
            assert!(
                finished
                    .deliveries
                    .iter()
                    .all(|d| (d.state, d.attempts) == (State::Deferred, 1))
            );
        });
    }

    #[test]
    fn a_relay_failure_changes_no_state_pauses_then_resumes_with_one_probe() {
        on_tokio_time(async {
            let setup = Setup::new();
            let count = AtomicUsize::new(0);
            // The first two attempts (both workers, at once) meet a dead relay.
            let script = Script::new(2, ms(1), move |_| {
                if count.fetch_add(1, Ordering::SeqCst) < 2 {
                    Act::Relay(RelayFailure::new("connection refused"))
                } else {
                    accepted()
                }
            });
            let messages = (1..=6)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;

            // Everyone is sent, once, in one attempt: a relay failure is no attempt.
            for line in 1..=6 {
                assert_eq!(finished.state(line), Some((State::Sent, 1)), "line {line}");
                assert_eq!(
                    recorded(&setup.journal, line),
                    [(State::Sent, 1, Some(250), false)],
                    "line {line}"
                );
            }
            // The two that met the failure went back to pending, and were tried again.
            let calls = script.calls();
            let failed: Vec<u64> = calls[..2].iter().map(|c| c.line).collect();
            for line in &failed {
                let events: Vec<Event> = setup
                    .journal
                    .events()
                    .into_iter()
                    .filter(
                        |e| matches!(e, Event::InFlight(i) | Event::Requeued(i) if *i == id(*line)),
                    )
                    .collect();
                assert_eq!(
                    events,
                    [
                        Event::InFlight(id(*line)),
                        Event::Requeued(id(*line)),
                        Event::InFlight(id(*line))
                    ]
                );
            }
            // One pause (the second failure was of the same outage), at least half the relay
            // backoff long; then one probe alone; then both workers again.
            assert_eq!(finished.ended.tally.relay_pauses, 1);
            let probe = &calls[2];
            assert!(
                failed.contains(&probe.line),
                "the message put back goes first"
            );
            assert_eq!(probe.alongside, 0);
            assert!(probe.at - calls[0].at >= ms(1) + setup.retry.relay_backoff / 2);
            assert!(calls[3].at >= probe.at + ms(1), "nothing beside the probe");
            let after: std::collections::BTreeSet<usize> =
                calls[3..].iter().map(|c| c.worker).collect();
            assert_eq!(after.len(), 2, "both workers again");
            assert!(finished.ended.failure.is_none());
        });
    }

    #[test]
    fn a_relay_down_for_good_ends_the_run_with_every_recipient_pending() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.retry.relay_attempts = NonZeroU32::new(3).unwrap();
            let script = Script::new(2, ms(1), |_| {
                Act::Relay(RelayFailure::new("connection refused"))
            });
            let messages = (1..=4)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;

            assert!(
                finished.deliveries.is_empty(),
                "nobody is reported: all pending"
            );
            let failure = finished.ended.failure.expect("the relay failure");
            assert_eq!(failure.reason, "connection refused");
            assert!(finished.ended.halted.is_none());
            // Both workers at first, then one probe per pause: 1 + 2 pauses, growing.
            let calls = script.calls();
            assert_eq!(calls.len(), 4);
            assert_eq!(finished.ended.tally.relay_pauses, 2);
            assert!(calls[2].at - calls[0].at >= ms(1) + ms(1));
            assert!(calls[3].at - calls[2].at >= ms(1) + ms(2));
            // No row changed for good: each in-flight record was put back to pending.
            let events = setup.journal.events();
            assert!(
                events
                    .iter()
                    .all(|e| matches!(e, Event::InFlight(_) | Event::Requeued(_)))
            );
            for line in 1..=4 {
                let count = |wanted: &Event| events.iter().filter(|e| *e == wanted).count();
                assert_eq!(
                    count(&Event::InFlight(id(line))),
                    count(&Event::Requeued(id(line))),
                    "line {line}"
                );
            }
        });
    }

    #[test]
    fn a_configuration_failure_before_any_answer_ends_the_run_without_a_halt() {
        on_tokio_time(async {
            let setup = Setup::new();
            let script = Script::new(1, Duration::ZERO, |_| {
                Act::Relay(RelayFailure::config("535 5.7.8 authentication failed"))
            });
            let finished = setup
                .run(
                    scripted(&script),
                    vec![queued(1, "a@a.example"), queued(2, "b@a.example")],
                )
                .await;
            assert!(finished.deliveries.is_empty());
            // No retry, no pause: one attempt, and the run is over.
            assert_eq!(script.calls().len(), 1);
            assert!(finished.ended.halted.is_none());
            let failure = finished.ended.failure.expect("the run ends on the failure");
            assert_eq!(failure.kind, FailureKind::Config);
            assert_eq!(failure.reason, "535 5.7.8 authentication failed");
            assert_eq!(finished.ended.tally.relay_pauses, 0);
            assert_eq!(
                setup.journal.events(),
                [Event::InFlight(1), Event::Requeued(1)]
            );
        });
    }

    #[test]
    fn a_configuration_failure_after_an_answer_halts_the_run() {
        on_tokio_time(async {
            let setup = Setup::new();
            let script = Script::new(1, Duration::ZERO, |call| {
                if call.line == 1 {
                    reply(250, "2.0.0 ok")
                } else {
                    Act::Relay(RelayFailure::config("535 5.7.8 authentication failed"))
                }
            });
            let finished = setup
                .run(
                    scripted(&script),
                    vec![queued(1, "a@a.example"), queued(2, "b@a.example")],
                )
                .await;
            assert_eq!(finished.deliveries.len(), 1);
            assert_eq!(script.calls().len(), 2);
            let reason = "a new connection to the relay failed after messages had gone out: \
                          535 5.7.8 authentication failed";
            assert_eq!(finished.ended.halted.as_deref(), Some(reason));
            assert!(finished.ended.failure.is_none());
            assert_eq!(
                setup.journal.events().last(),
                Some(&Event::Halt(reason.to_owned()))
            );
        });
    }

    #[test]
    fn a_connection_refused_while_the_relay_answers_the_others_shrinks_the_pool_for_a_while() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.retry.relay_attempts = NonZeroU32::new(1000).unwrap();
            let count = AtomicUsize::new(0);
            // Each attempt takes a second; the fifth is refused at once, while the two others
            // are on the wire and then answer.
            let script = Script::new(3, Duration::from_secs(1), move |_| {
                if count.fetch_add(1, Ordering::SeqCst) == 4 {
                    Act::After(
                        ms(1),
                        Box::new(Act::Relay(RelayFailure::new("too many connections"))),
                    )
                } else {
                    accepted()
                }
            });
            let messages = (1..=240)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(finished.deliveries.len(), 240);
            assert!(finished.deliveries.iter().all(|d| d.state == State::Sent));
            assert_eq!(finished.ended.tally.connections_refused, 1);
            assert_eq!(finished.ended.tally.relay_pauses, 0);
            assert_eq!(finished.ended.tally.regrown, 1);
            let calls = script.calls();
            let refused = &calls[4];
            // Two connections until the hold is over; then three again.
            let held: Vec<&Call> = calls[5..]
                .iter()
                .filter(|c| c.at > refused.at && c.at < refused.at + GROW_AGAIN_AFTER)
                .collect();
            assert!(held.len() > 10);
            assert!(held.iter().all(|c| c.alongside <= 1), "two at a time");
            assert!(
                calls
                    .iter()
                    .any(|c| c.at >= refused.at + GROW_AGAIN_AFTER && c.alongside == 2),
                "three at a time again"
            );
            assert!(finished.ended.failure.is_none());
        });
    }

    #[test]
    fn an_outage_after_answers_pauses_then_grows_back_to_every_connection() {
        on_tokio_time(async {
            let setup = Setup::new();
            let count = AtomicUsize::new(0);
            // Six answers, then the relay goes down under all three connections at once,
            // then it is back.
            let script = Script::new(3, ms(1), move |_| {
                if (6..9).contains(&count.fetch_add(1, Ordering::SeqCst)) {
                    Act::Relay(RelayFailure::new("connection reset by peer"))
                } else {
                    accepted()
                }
            });
            let messages = (1..=30)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            for line in 1..=30 {
                assert_eq!(finished.state(line), Some((State::Sent, 1)), "line {line}");
            }
            // Not a connection limit: the others failed too.
            assert_eq!(finished.ended.tally.connections_refused, 0);
            assert_eq!(finished.ended.tally.relay_pauses, 1);
            assert_eq!(finished.ended.tally.regrown, 1);
            let calls = script.calls();
            assert_eq!(calls.len(), 33);
            // One probe alone, then one more connection per answer, up to three.
            let probe = &calls[9];
            assert_eq!(probe.alongside, 0);
            assert!(calls[10].at >= probe.at + ms(1), "nothing beside the probe");
            assert!(calls[10..].iter().any(|c| c.alongside == 2), "three again");
            let workers: std::collections::BTreeSet<usize> =
                calls[10..].iter().map(|c| c.worker).collect();
            assert_eq!(workers.len(), 3);
        });
    }

    #[test]
    fn a_failure_beside_connections_that_only_get_421_is_an_outage() {
        on_tokio_time(async {
            let setup = Setup::new();
            let count = AtomicUsize::new(0);
            // The first attempt fails at once; the other, on the wire, gets a 421 (the relay
            // closing its connections), not an answer.
            let script = Script::new(2, ms(2), move |_| {
                match count.fetch_add(1, Ordering::SeqCst) {
                    0 => Act::After(
                        ms(1),
                        Box::new(Act::Relay(RelayFailure::new("connection refused"))),
                    ),
                    1 => reply(421, "4.3.2 shutting down"),
                    _ => accepted(),
                }
            });
            let messages = (1..=4)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(finished.ended.tally.connections_refused, 0);
            assert_eq!(finished.ended.tally.relay_pauses, 1);
            assert_eq!(finished.deliveries.len(), 4);
        });
    }

    #[test]
    fn domains_take_turns() {
        on_tokio_time(async {
            let setup = Setup::new();
            let script = Script::new(1, Duration::ZERO, |_| accepted());
            let mut messages: Vec<Queued> = (1..=5)
                .map(|line| queued(line, &format!("r{line}@big.example")))
                .collect();
            messages.push(queued(6, "r6@small.example"));
            messages.push(queued(7, "r7@other.example"));
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(finished.deliveries.len(), 7);
            // The big domain queued first does not go first in full.
            assert_eq!(script.lines(), [1, 6, 7, 2, 3, 4, 5]);
        });
    }

    #[test]
    fn a_slow_domain_does_not_hold_up_the_others() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            // One message every ten seconds for the slow domain; the others are free.
            setup
                .rate
                .domains
                .insert("slow.example".to_owned(), pace(1, Duration::from_secs(10)));
            let halt = Arc::clone(&setup.halt);
            let fast = AtomicUsize::new(0);
            let script = Script::new(2, Duration::ZERO, move |call| {
                if !call.recipient.ends_with("@slow.example")
                    && fast.fetch_add(1, Ordering::SeqCst) + 1 == 10
                {
                    // The others are all out: stop rather than wait for the slow domain.
                    let _ = halt.send(Some("enough".to_owned()));
                }
                accepted()
            });
            let mut messages: Vec<Queued> = (1..=3)
                .map(|line| queued(line, &format!("r{line}@slow.example")))
                .collect();
            messages.extend(
                (4..=13).map(|line| queued(line, &format!("r{line}@fast{}.example", line % 2))),
            );
            let start = Instant::now();
            let finished = setup.run(scripted(&script), messages).await;
            assert!(start.elapsed() < Duration::from_secs(10));
            // Slow's first message, then every other domain's, while slow waits its turn.
            let mut lines = script.lines();
            lines.sort_unstable();
            assert_eq!(lines, [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
            assert_eq!(finished.deliveries.len(), 11);
            assert!(finished.deliveries.iter().all(|d| d.state == State::Sent));
            // The slow domain's other two are still pending: not reported, not recorded.
            assert!(finished.state(2).is_none() && finished.state(3).is_none());
            assert!(
                setup.journal.events().iter().all(|e| !matches!(
                    e,
                    Event::InFlight(2 | 3) | Event::Outcome { id: 2 | 3, .. }
                ))
            );
            assert_eq!(finished.ended.halted.as_deref(), Some("enough"));
        });
    }

    #[test]
    fn the_global_and_domain_limits_space_the_messages() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.rate.global = Some(pace(1, ms(4)));
            setup
                .rate
                .domains
                .insert("paced.example".to_owned(), pace(1, ms(25)));
            let script = Script::new(2, Duration::ZERO, |_| accepted());
            let messages = vec![
                queued(1, "a@free.example"),
                queued(2, "b@free.example"),
                queued(3, "c@free.example"),
                queued(4, "a@paced.example"),
                queued(5, "b@paced.example"),
                queued(6, "c@paced.example"),
            ];
            let start = Instant::now();
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(finished.deliveries.len(), 6);
            let calls = script.calls();
            // Globally one every 4 ms: the n-th no sooner than 4 (n - 1) ms in.
            for (n, call) in (0u32..).zip(&calls) {
                assert!(
                    call.at - start >= ms(4) * n,
                    "call {n}: {:?}",
                    call.at - start
                );
            }
            // The paced domain one every 25 ms, slower than the global rate alone would let.
            let paced: Vec<Instant> = calls
                .iter()
                .filter(|c| c.recipient.ends_with("@paced.example"))
                .map(|c| c.at)
                .collect();
            assert_eq!(paced.len(), 3);
            assert!(paced[2] - start >= ms(50), "{:?}", paced[2] - start);
            // Meanwhile the free domain is not held up: all of it goes before that.
            let free_last = calls
                .iter()
                .filter(|c| c.recipient.ends_with("@free.example"))
                .map(|c| c.at)
                .max();
            assert!(free_last < Some(paced[2]));
        });
    }

    #[test]
    fn a_throttling_reply_slows_down_only_its_domain() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.retry.max_attempts = NonZeroU32::MIN;
            let halt = Arc::clone(&setup.halt);
            let calm = AtomicUsize::new(0);
            let script = Script::new(1, Duration::ZERO, move |call| {
                if call.recipient.ends_with("@busy.example") {
                    return reply(421, "4.7.0 Try again later, closing connection");
                }
                if calm.fetch_add(1, Ordering::SeqCst) + 1 == 6 {
                    let _ = halt.send(Some("enough".to_owned()));
                }
                accepted()
            });
            let mut messages = vec![queued(1, "a@busy.example"), queued(2, "b@busy.example")];
            messages.extend((3..=8).map(|line| queued(line, &format!("r{line}@calm.example"))));
            let finished = setup.run(scripted(&script), messages).await;
            // Nothing is known of the busy domain's pace: one a second, halved.
            assert_eq!(
                finished.ended.tally.throttled,
                BTreeMap::from([("busy.example".to_owned(), 0.5)])
            );
            assert_eq!(finished.state(1), Some((State::Deferred, 1)));
            // The calm domain goes on at once; the busy one waits two seconds for its next.
            let mut lines = script.lines();
            lines.sort_unstable();
            assert_eq!(lines, [1, 3, 4, 5, 6, 7, 8]);
            assert!(finished.state(2).is_none());
        });
    }

    #[test]
    fn a_domain_that_keeps_throttling_is_suspended_while_the_others_complete() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.retry.max_attempts = NonZeroU32::new(50).unwrap();
            setup.rate.throttle_floor = Some(pace(5, Duration::from_secs(1)));
            setup
                .rate
                .domains
                .insert("busy.example".to_owned(), pace(20, Duration::from_secs(1)));
            // The busy domain throttles every message; the calm one takes its time (each of
            // its messages takes 100 ms, one connection for it at a time at most).
            let script = Script::new(2, Duration::ZERO, |call| {
                if call.recipient.ends_with("@busy.example") {
                    reply(421, "4.7.28 Our system has detected an unusual rate")
                } else {
                    Act::After(ms(100), Box::new(accepted()))
                }
            });
            let mut messages: Vec<Queued> = (1..=20)
                .map(|line| queued(line, &format!("r{line}@busy.example")))
                .collect();
            messages.extend((21..=80).map(|line| queued(line, &format!("r{line}@calm.example"))));
            let finished = setup.run(scripted(&script), messages).await;
            let by_line = finished.by_line();
            assert_eq!(by_line.len(), 80, "every message is reported");
            for line in 21..=80 {
                assert_eq!(by_line[&line].state, State::Sent, "line {line}");
            }
            // 20/s halved to 10, then 5; the next would be below the floor: suspended.
            assert_eq!(
                finished.ended.tally.throttled,
                BTreeMap::from([("busy.example".to_owned(), 5.0)])
            );
            let suspended = &finished.ended.tally.suspended["busy.example"];
            assert!(suspended.deferred > 0);
            let mut aside = 0;
            for line in 1..=20 {
                let delivery = by_line[&line];
                assert_eq!(delivery.state, State::Deferred, "line {line}");
                if delivery.detail.starts_with("busy.example suspended until ") {
                    assert!(
                        delivery.detail.ends_with(
                            "it kept answering with throttling replies (421 4.7.28) below `[rate] throttle_floor`"
                        ),
                        "{}",
                        delivery.detail
                    );
                    aside += 1;
                }
                // Recorded deferred with when it is due.
                assert!(matches!(
                    recorded(&setup.journal, line).last(),
                    Some((State::Deferred, _, _, true))
                ));
            }
            assert_eq!(aside, suspended.deferred);
            assert!(
                setup
                    .journal
                    .events()
                    .contains(&Event::Suspended("busy.example".to_owned()))
            );
            // Nothing went to it after the suspension: far fewer attempts than allowed.
            let busy = script
                .calls()
                .iter()
                .filter(|c| c.recipient.ends_with("@busy.example"))
                .count();
            assert!(busy < 100, "{busy}");
            assert!(finished.ended.failure.is_none() && finished.ended.halted.is_none());
        });
    }

    #[test]
    fn a_domain_still_suspended_by_an_earlier_run_gets_nothing() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            let until = crate::clock::now() + Duration::from_secs(600);
            setup.carried.push(crate::dispatch::Suspension {
                domain: "busy.example".to_owned(),
                until,
                remaining: Duration::from_secs(600),
                detail: "busy.example suspended until later".to_owned(),
            });
            let script = Script::new(1, Duration::ZERO, |_| accepted());
            let finished = setup
                .run(
                    scripted(&script),
                    vec![
                        queued(1, "a@busy.example"),
                        queued(2, "b@calm.example"),
                        queued(3, "c@busy.example"),
                    ],
                )
                .await;
            assert_eq!(script.lines(), [2]);
            assert_eq!(finished.state(1), Some((State::Deferred, 0)));
            assert_eq!(finished.state(3), Some((State::Deferred, 0)));
            assert_eq!(
                finished.by_line()[&1].detail,
                "busy.example suspended until later"
            );
            assert_eq!(
                recorded(&setup.journal, 1),
                [(State::Deferred, 0, None, true)]
            );
            assert_eq!(finished.ended.tally.suspended["busy.example"].deferred, 2);
        });
    }

    #[test]
    fn a_halt_stops_handing_out_messages_and_leaves_the_rest_pending() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            // Long enough that line 2's retry is still waiting when the halt comes.
            setup.retry.backoff = Duration::from_secs(10);
            let halt = Arc::clone(&setup.halt);
            let script = Script::new(1, Duration::ZERO, move |call| match call.line {
                2 => reply(451, "4.3.0 later"),
                4 => {
                    let _ = halt.send(Some("mailer stop".to_owned()));
                    accepted()
                }
                _ => accepted(),
            });
            let mut messages = vec![queued(2, "r2@other.example")];
            messages.extend(
                [1, 3, 4, 5, 6, 7, 8].map(|line| queued(line, &format!("r{line}@a.example"))),
            );
            let finished = setup.run(scripted(&script), messages).await;
            // The message on the wire when the halt came got its answer; nothing more went.
            assert_eq!(script.lines(), [2, 1, 3, 4]);
            assert_eq!(finished.state(1), Some((State::Sent, 1)));
            assert_eq!(finished.state(3), Some((State::Sent, 1)));
            assert_eq!(finished.state(4), Some((State::Sent, 1)));
            // The one waiting for its retry stays deferred, for the next run.
            assert_eq!(finished.state(2), Some((State::Deferred, 1)));
            assert_eq!(
                finished.by_line()[&2].detail,
                "451 4.3.0 later (left for the next run)"
            );
            // The rest are pending: not reported, nothing recorded.
            assert_eq!(finished.deliveries.len(), 4);
            for line in 5..=8 {
                assert!(!setup.journal.events().iter().any(|e| matches!(
                    e,
                    Event::InFlight(i) | Event::Outcome { id: i, .. } if *i == id(line)
                )));
            }
            assert_eq!(finished.ended.halted.as_deref(), Some("mailer stop"));
            assert!(finished.ended.failure.is_none());
            let halts: Vec<Event> = setup
                .journal
                .events()
                .into_iter()
                .filter(|e| matches!(e, Event::Halt(_)))
                .collect();
            assert_eq!(halts, [Event::Halt("mailer stop".to_owned())]);
        });
    }

    #[test]
    fn a_halt_lets_the_messages_on_the_wire_finish() {
        on_tokio_time(async {
            let setup = Setup::new();
            let halt = Arc::clone(&setup.halt);
            let script = Script::new(3, ms(5), move |call| {
                if call.line == 1 {
                    let _ = halt.send(Some("stop".to_owned()));
                }
                accepted()
            });
            let messages = (1..=9)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            // Three were on the wire; all three are reported, and nothing else went.
            assert_eq!(script.lines(), [1, 2, 3]);
            assert_eq!(script.bodies().len(), 3);
            let mut reported: Vec<u64> = finished.deliveries.iter().map(|d| d.line).collect();
            reported.sort_unstable();
            assert_eq!(reported, [1, 2, 3]);
            assert_eq!(finished.ended.halted.as_deref(), Some("stop"));
        });
    }

    #[test]
    fn a_halt_before_the_start_sends_nothing() {
        on_tokio_time(async {
            let setup = Setup::new();
            setup.halt.send_replace(Some("stopped before".to_owned()));
            let script = Script::new(2, Duration::ZERO, |_| accepted());
            let finished = setup
                .run(scripted(&script), vec![queued(1, "a@a.example")])
                .await;
            assert!(script.calls().is_empty());
            assert!(finished.deliveries.is_empty());
            assert_eq!(finished.ended.halted.as_deref(), Some("stopped before"));
            assert_eq!(
                setup.journal.events(),
                [Event::Halt("stopped before".to_owned())]
            );
        });
    }

    #[test]
    fn batches_pause_between_them() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.rate.batch = Some(Batch {
                size: NonZeroUsize::new(3).unwrap(),
                pause: ms(10),
            });
            let script = Script::new(2, Duration::ZERO, |_| accepted());
            let messages = (1..=8)
                .map(|line| queued(line, &format!("r{line}@d{}.example", line % 3)))
                .collect();
            let start = Instant::now();
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(finished.deliveries.len(), 8);
            let calls = script.calls();
            assert!(calls[3].at - start >= ms(10), "the second batch waits");
            assert!(calls[6].at - start >= ms(20), "the third batch waits again");
        });
    }

    #[test]
    fn the_last_batch_does_not_pause() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.rate.batch = Some(Batch {
                size: NonZeroUsize::new(3).unwrap(),
                pause: Duration::from_secs(30),
            });
            let script = Script::new(1, Duration::ZERO, |_| accepted());
            let messages = (1..=3)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let start = Instant::now();
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(finished.deliveries.len(), 3);
            assert!(start.elapsed() < Duration::from_secs(15));
        });
    }

    #[test]
    fn a_recipient_suppressed_during_the_run_is_not_sent() {
        on_tokio_time(async {
            let setup = Setup::new();
            let suppressed = Arc::clone(&setup.suppressed);
            let script = Script::new(1, Duration::ZERO, move |call| {
                let suppress = |key: &str| {
                    suppressed.write().unwrap().insert(key.to_owned());
                };
                match call.line {
                    // While line 1 is on the wire, line 2's recipient unsubscribes (any case).
                    1 => {
                        suppress("later@b.example");
                        accepted()
                    }
                    // Line 4's recipient unsubscribes while waiting for a retry.
                    4 => {
                        suppress("retry@c.example");
                        reply(451, "4.3.0 later")
                    }
                    _ => accepted(),
                }
            });
            let finished = setup
                .run(
                    scripted(&script),
                    vec![
                        queued(1, "a@a.example"),
                        queued(2, "Later@B.example"),
                        queued(3, "c@a.example"),
                        queued(4, "retry@c.example"),
                    ],
                )
                .await;
            assert_eq!(script.lines(), [1, 4, 3]);
            assert_eq!(finished.state(2), Some((State::Suppressed, 0)));
            assert_eq!(finished.state(4), Some((State::Suppressed, 1)));
            assert_eq!(
                finished.by_line()[&2].detail,
                "added to a suppression list while the campaign was sending"
            );
            assert!(!setup.journal.events().contains(&Event::InFlight(2)));
            assert_eq!(
                recorded(&setup.journal, 2),
                [(State::Suppressed, 0, None, false)]
            );
            assert_eq!(
                recorded(&setup.journal, 4).last(),
                Some(&(State::Suppressed, 1, Some(451), false))
            );
            assert_eq!(finished.state(1), Some((State::Sent, 1)));
            assert_eq!(finished.state(3), Some((State::Sent, 1)));
        });
    }

    #[test]
    fn the_permanent_failure_breaker_halts_the_run() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.safety.halt_failure_ratio = 0.5;
            setup.safety.halt_min_sample = NonZeroUsize::new(4).unwrap();
            let script = Script::new(1, Duration::ZERO, |call| {
                if call.line == 1 {
                    accepted()
                } else {
                    reply(550, "5.1.1 no such user")
                }
            });
            let messages = (1..=10)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            // Three failed of four answered (over a half): nothing more goes.
            assert_eq!(script.lines(), [1, 2, 3, 4]);
            assert_eq!(finished.deliveries.len(), 4);
            let halted = finished.ended.halted.expect("the breaker");
            assert!(
                halted.starts_with("3 of the last 4 answered recipients failed permanently"),
                "{halted}"
            );
            assert!(setup.journal.events().contains(&Event::Halt(halted)));
        });
    }

    #[test]
    fn nothing_is_sent_without_a_durable_record_even_on_many_workers() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.journal = Journal::new(Durable::Never);
            let script = Script::new(3, ms(1), |_| accepted());
            let messages = (1..=6)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            assert!(script.bodies().is_empty());
            assert!(finished.deliveries.is_empty());
            assert!(finished.ended.halted.is_some());
            assert_eq!(script.calls().len(), 3, "only those already handed out");
        });
    }

    /// Windows and caps for a run starting at `start` (UTC, the calendar's clock), with what
    /// the journal counts today.
    fn daily(windows: &[&str], caps: crate::config::DailyCaps, start: &str, used: u32) -> Daily {
        let start = chrono::DateTime::parse_from_rfc3339(start)
            .unwrap()
            .to_utc();
        Daily::new(
            crate::config::Calendar {
                timezone: chrono_tz::Tz::UTC,
                windows: windows.iter().map(|w| w.parse().unwrap()).collect(),
            },
            caps,
            start,
            Some(start),
            super::super::Attempted {
                total: used,
                ..Default::default()
            },
        )
    }

    fn per_day(cap: u32) -> crate::config::DailyCaps {
        crate::config::DailyCaps {
            per_day: NonZeroU32::new(cap),
            ..Default::default()
        }
    }

    #[test]
    fn a_window_closing_mid_run_lets_the_wire_finish_and_leaves_the_rest_pending() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            // One message every 100 ms; the window (Monday 2026-12-07) closes 1 s in.
            setup.rate.global = Some(pace(1, ms(100)));
            setup.daily = Some(daily(
                &["Mon-Fri 09:00-17:00"],
                crate::config::DailyCaps::default(),
                "2026-12-07T16:59:59Z",
                0,
            ));
            // Each attempt takes 150 ms: the last ones are on the wire when the window closes.
            let script = Script::new(2, ms(150), |_| accepted());
            let messages = (1..=30)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            // Handed out at 0, 100, …, 900 ms (two on the wire at a time lets them all go);
            // every one started finished, and nothing started at or after 17:00.
            assert_eq!(script.lines(), (1..=10).collect::<Vec<_>>());
            assert_eq!(finished.deliveries.len(), 10);
            assert!(finished.deliveries.iter().all(|d| d.state == State::Sent));
            let waiting = finished.ended.waiting.expect("the window closed");
            assert_eq!(
                waiting.reason,
                "outside the send window ([schedule] window); the next opens Tue 2026-12-08 09:00 UTC"
            );
            assert!(finished.ended.halted.is_none() && finished.ended.failure.is_none());
            // The rest were never started: still pending (no record of them at all).
            assert!(
                setup
                    .journal
                    .events()
                    .iter()
                    .all(|e| !matches!(e, Event::InFlight(11..) | Event::Outcome { id: 11.., .. }))
            );
        });
    }

    #[test]
    fn the_daily_cap_is_reserved_before_a_message_goes_whatever_the_connections() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            // Seven sent earlier today, a cap of ten: three more, on four connections.
            setup.daily = Some(daily(&[], per_day(10), "2026-12-07T10:00:00Z", 7));
            let script = Script::new(4, ms(100), |_| accepted());
            let messages = (1..=20)
                .map(|line| queued(line, &format!("r{line}@d{}.example", line % 3)))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(script.calls().len(), 3);
            assert_eq!(finished.deliveries.len(), 3);
            let waiting = finished.ended.waiting.expect("the cap");
            assert_eq!(
                waiting.reason,
                "daily cap of 10 reached; next message after Tue 2026-12-08 00:00 UTC"
            );
        });
    }

    #[test]
    fn retries_count_toward_the_daily_cap() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.daily = Some(daily(&[], per_day(3), "2026-12-07T10:00:00Z", 0));
            // Line 1 gets a 4xx on its first attempt and is accepted after.
            let script = Script::new(1, ms(10), |call| {
                if call.line == 1 && call.nth == 1 {
                    reply(451, "4.3.0 try later")
                } else {
                    accepted()
                }
            });
            let messages = (1..=5)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            // Line 1, line 2, line 3: three attempts, the cap; line 1's retry does not go.
            let lines: Vec<u64> = script.calls().iter().map(|c| c.line).collect();
            assert_eq!(lines, [1, 2, 3]);
            assert_eq!(finished.state(1).map(|(s, _)| s), Some(State::Deferred));
            assert_eq!(finished.state(2).map(|(s, _)| s), Some(State::Sent));
            assert_eq!(finished.state(4), None, "never started: pending");
            assert!(finished.ended.waiting.is_some());
        });
    }

    #[test]
    fn a_domain_cap_defers_that_domain_until_the_next_day_and_the_others_go_on() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            let caps = crate::config::DailyCaps {
                domains: [("capped.example".to_owned(), NonZeroU32::new(2).unwrap())].into(),
                ..Default::default()
            };
            setup.daily = Some(daily(&[], caps, "2026-12-07T10:00:00Z", 0));
            let script = Script::new(2, ms(10), |_| accepted());
            let messages = (1..=10)
                .map(|line| {
                    let domain = if line % 2 == 0 { "capped" } else { "free" };
                    queued(line, &format!("r{line}@{domain}.example"))
                })
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            let capped_sent = script
                .calls()
                .iter()
                .filter(|c| c.recipient.ends_with("@capped.example"))
                .count();
            assert_eq!(capped_sent, 2);
            assert_eq!(finished.deliveries.len(), 10);
            for line in [1, 3, 5, 7, 9] {
                assert_eq!(finished.state(line).map(|(s, _)| s), Some(State::Sent));
            }
            let deferred: Vec<&Delivery> = finished
                .deliveries
                .iter()
                .filter(|d| d.state == State::Deferred)
                .collect();
            assert_eq!(deferred.len(), 3);
            assert!(deferred.iter().all(|d| d.detail.starts_with(
                "capped.example daily cap of 2 reached ([rate.per_domain_per_day]); its next message after Tue 2026-12-08 00:00 UTC"
            )));
            let capped = &finished.ended.tally.capped["capped.example"];
            assert_eq!(capped.deferred, 3);
            assert!(finished.ended.waiting.is_none());
            assert!(finished.ended.tally.suspended.is_empty());
        });
    }

    #[test]
    fn a_message_the_relay_did_not_take_frees_its_place_in_the_cap() {
        on_tokio_time(async {
            let mut setup = Setup::new();
            setup.daily = Some(daily(&[], per_day(2), "2026-12-07T10:00:00Z", 0));
            // The first attempt meets a relay failure before the body; everything after goes.
            let script = Script::new(1, ms(10), |call| {
                if call.line == 1 && call.nth == 1 {
                    Act::Relay(RelayFailure::new("connection refused"))
                } else {
                    accepted()
                }
            });
            let messages = (1..=4)
                .map(|line| queued(line, &format!("r{line}@a.example")))
                .collect();
            let finished = setup.run(scripted(&script), messages).await;
            assert_eq!(finished.state(1).map(|(s, _)| s), Some(State::Sent));
            assert_eq!(finished.state(2).map(|(s, _)| s), Some(State::Sent));
            assert_eq!(finished.deliveries.len(), 2);
            assert!(finished.ended.waiting.is_some());
        });
    }
}
