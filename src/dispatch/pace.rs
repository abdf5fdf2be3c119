//! Pace: the rate limits of `[rate]`, and the slow-down of a domain that says "too fast".
//!
//! Built on governor: one direct limiter for the global rate, a keyed limiter for the
//! `per_domain` default, one direct limiter per domain named in `per_domain`, and, for a
//! domain that answered with a throttling reply, a temporary slower limiter (halved on each
//! signal, raised by half every quiet [`RECOVER_AFTER`] until it is back at its normal pace).
//! A halving that would go below `[rate] throttle_floor` is not made: the domain is to be
//! suspended instead ([`Throttled::Suspend`]), and a later run starts it again at the pace it
//! had ([`Pacer::carry_throttle`]).
//!
//! Only the scheduler task calls it, one message at a time, so no two tasks ever wait on the
//! same key (governor's waiters are not FIFO). Nothing here sleeps: every check answers now,
//! with how long to wait when the answer is no. The clock is a parameter, so tests drive it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::{Pace, Rate};

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Keyed<C> =
    RateLimiter<Arc<str>, HashMapStateStore<Arc<str>>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A throttled domain goes back up by half after this long without a new throttling reply.
pub const RECOVER_AFTER: Duration = Duration::from_secs(30);
/// The slowest any limiter here goes, whatever the configuration says: one message an hour.
const SLOWEST_PER_SECOND: f64 = 1.0 / 3600.0;
/// Admissions between two prunings of per-domain state.
const PRUNE_EVERY: u32 = 4096;
/// How long a domain's observed rate is measured over.
const OBSERVE: Duration = Duration::from_secs(1);

fn quota(pace: &Pace) -> Option<Quota> {
    Quota::with_period(pace.interval()).map(|q| q.allow_burst(pace.burst))
}

/// A domain slowed down after a throttling reply.
struct Throttle<C: Clock> {
    limiter: Direct<C>,
    per_second: f64,
    /// The domain's normal pace (its limit, or the rate it was getting); reaching it again
    /// ends the throttle.
    ceiling: f64,
    changed: C::Instant,
}

/// How fast a domain has been getting messages lately (the base to halve when a domain
/// without a limit of its own throttles).
struct Observed<I> {
    start: I,
    count: u32,
    per_second: f64,
}

/// What a throttling reply did to its domain's pace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Throttled {
    /// Slowed down to this many messages per second.
    Slowed(f64),
    /// Halving again would go below the floor: suspend the domain. `per_second` is the pace it
    /// has (to start from after the suspension), `ceiling` its normal pace.
    Suspend { per_second: f64, ceiling: f64 },
}

/// A domain an earlier run suspended, still suspended when this one starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspension {
    pub domain: String,
    /// When it ends (the wall clock, as the journal has it).
    pub until: std::time::SystemTime,
    /// How long from the start of this run.
    pub remaining: Duration,
    /// What the journal says about it (the domain, until when, why).
    pub detail: String,
}

pub struct Pacer<C: Clock = MonotonicClock> {
    clock: C,
    /// `[rate] throttle_floor`, per second.
    floor: f64,
    /// Suspensions from earlier runs still in force, for the scheduler.
    suspensions: Vec<Suspension>,
    global: Option<(Direct<C>, Pace)>,
    default: Option<(Keyed<C>, f64, Pace)>,
    named: HashMap<Box<str>, (Direct<C>, f64, Pace)>,
    throttled: HashMap<Box<str>, Throttle<C>>,
    observed: HashMap<Box<str>, Observed<C::Instant>>,
    since_prune: u32,
}

impl Pacer<MonotonicClock> {
    #[must_use]
    pub fn new(rate: &Rate) -> Pacer {
        Pacer::with_clock(rate, MonotonicClock)
    }
}

impl<C: Clock + Clone> Pacer<C> {
    pub fn with_clock(rate: &Rate, clock: C) -> Pacer<C> {
        let direct =
            |pace: &Pace| quota(pace).map(|q| RateLimiter::direct_with_clock(q, clock.clone()));
        Pacer {
            global: rate
                .global
                .as_ref()
                .and_then(|pace| direct(pace).map(|l| (l, *pace))),
            default: rate.domain_default.as_ref().and_then(|pace| {
                quota(pace).map(|q| {
                    (
                        RateLimiter::new(q, HashMapStateStore::default(), clock.clone()),
                        pace.per_second(),
                        *pace,
                    )
                })
            }),
            named: rate
                .domains
                .iter()
                .filter_map(|(domain, pace)| {
                    direct(pace).map(|l| (domain.as_str().into(), (l, pace.per_second(), *pace)))
                })
                .collect(),
            throttled: HashMap::new(),
            observed: HashMap::new(),
            since_prune: 0,
            floor: rate.throttle_floor_per_second(),
            suspensions: Vec::new(),
            clock,
        }
    }

    /// A suspension an earlier run recorded, still in force: the scheduler holds the domain's
    /// messages until it ends.
    pub fn carry_suspension(&mut self, suspension: Suspension) {
        self.suspensions.push(suspension);
    }

    /// The suspensions carried over, handed to the scheduler (once).
    pub fn take_suspensions(&mut self) -> Vec<Suspension> {
        std::mem::take(&mut self.suspensions)
    }

    /// Starts `domain` at the pace an earlier run's throttle left it at (it suspended the
    /// domain there), easing back up to `ceiling` as usual while it does not throttle again.
    pub fn carry_throttle(&mut self, domain: &str, per_second: f64, ceiling: f64) {
        if !(per_second > 0.0 && per_second < ceiling) {
            return;
        }
        self.throttled.insert(
            domain.into(),
            Throttle {
                limiter: slow_limiter(per_second, self.clock.clone()),
                per_second,
                ceiling,
                changed: self.clock.now(),
            },
        );
    }

    /// Makes the limits hold across a restart. An earlier run's limiter state is gone, but its
    /// last attempts are in the journal: wherever (globally, or for a domain) the last
    /// attempt was more recently than a full burst's worth of the rate, start as if a full
    /// burst had just gone. Whatever the earlier run's bucket held then, this one holds at
    /// least as much, so together they never exceed rate plus burst in any window.
    /// `ago`: how long ago the last attempt was, globally and per domain.
    pub fn carry_over(&self, global_ago: Option<Duration>, domains: &[(String, Duration)]) {
        let recent = |pace: &Pace, ago: Duration| ago < pace.interval() * (pace.burst.get() + 1);
        if let (Some((limiter, pace)), Some(ago)) = (&self.global, global_ago)
            && recent(pace, ago)
        {
            let _ = limiter.check_n(pace.burst);
        }
        for (domain, ago) in domains {
            if let Some((limiter, _, pace)) = self.named.get(domain.as_str()) {
                if recent(pace, *ago) {
                    let _ = limiter.check_n(pace.burst);
                }
            } else if let Some((keyed, _, pace)) = &self.default
                && recent(pace, *ago)
            {
                let _ = keyed.check_key_n(&Arc::from(domain.as_str()), pace.burst);
            }
        }
    }

    fn wait(&self, until: &governor::NotUntil<C::Instant>) -> Duration {
        until.wait_time_from(self.clock.now())
    }

    /// Takes the next slot of the global rate, or says how long until there is one.
    pub fn reserve_global(&self) -> Result<(), Duration> {
        match &self.global {
            Some((limiter, _)) => limiter.check().map_err(|until| self.wait(&until)),
            None => Ok(()),
        }
    }

    /// Takes the next slot of `domain`'s rate (lower-case, IDNA-encoded), or says how long
    /// until there is one.
    pub fn admit(&mut self, key: &Arc<str>) -> Result<(), Duration> {
        let domain: &str = key;
        self.since_prune += 1;
        if self.since_prune >= PRUNE_EVERY {
            self.prune();
        }
        let now = self.clock.now();
        if let Some(throttle) = self.throttled.get_mut(domain) {
            let quiet: Duration = now.duration_since(throttle.changed).into();
            if quiet >= RECOVER_AFTER {
                let raised = throttle.per_second * 1.5;
                if raised >= throttle.ceiling {
                    tracing::info!(domain, "throttle lifted: back to its normal pace");
                    self.throttled.remove(domain);
                } else {
                    tracing::info!(domain, per_second = raised, "throttle easing");
                    throttle.per_second = raised;
                    throttle.limiter = slow_limiter(raised, self.clock.clone());
                    throttle.changed = now;
                }
            }
        }
        let result = if let Some(throttle) = self.throttled.get(domain) {
            throttle.limiter.check().map_err(|until| self.wait(&until))
        } else if let Some((limiter, _, _)) = self.named.get(domain) {
            limiter.check().map_err(|until| self.wait(&until))
        } else if let Some((keyed, _, _)) = &self.default {
            keyed.check_key(key).map_err(|until| self.wait(&until))
        } else {
            Ok(())
        };
        if result.is_ok() {
            self.observe(domain, now);
        }
        result
    }

    fn observe(&mut self, domain: &str, now: C::Instant) {
        match self.observed.get_mut(domain) {
            Some(seen) => {
                seen.count += 1;
                let elapsed: Duration = now.duration_since(seen.start).into();
                if elapsed >= OBSERVE {
                    seen.per_second = f64::from(seen.count) / elapsed.as_secs_f64();
                    seen.start = now;
                    seen.count = 0;
                }
            }
            None => {
                self.observed.insert(
                    domain.into(),
                    Observed {
                        start: now,
                        count: 1,
                        per_second: 0.0,
                    },
                );
            }
        }
    }

    /// The pace `domain` normally gets: its limit, or what it has been getting lately.
    fn normal_pace(&self, domain: &str, now: C::Instant) -> f64 {
        let limit = self
            .named
            .get(domain)
            .map(|(_, rate, _)| *rate)
            .or(self.default.as_ref().map(|(_, rate, _)| *rate));
        // The last full second's rate; failing that, the current window's, once it is long
        // enough to mean something (a few messages in a few milliseconds say nothing).
        let observed = self.observed.get(domain).map(|seen| {
            let elapsed: Duration = now.duration_since(seen.start).into();
            if seen.per_second > 0.0 {
                seen.per_second
            } else if elapsed >= OBSERVE / 4 && seen.count > 1 {
                f64::from(seen.count - 1) / elapsed.as_secs_f64()
            } else {
                0.0
            }
        });
        match (limit, observed) {
            (Some(limit), Some(seen)) if seen > 0.0 => limit.min(seen),
            (Some(limit), _) => limit,
            (None, Some(seen)) if seen > 0.0 => seen,
            // Nothing known: start from one a second.
            (None, _) => 1.0,
        }
    }

    /// A throttling reply from `domain`: halve its pace (not more than once per couple of
    /// intervals, since every connection in flight may bring the same news). Gives the new
    /// messages-per-second when it changed, or [`Throttled::Suspend`] when the halved pace
    /// would be below the floor.
    pub fn throttle(&mut self, domain: &str) -> Option<Throttled> {
        let now = self.clock.now();
        let (current, ceiling) = match self.throttled.get(domain) {
            Some(throttle) => {
                let since: Duration = now.duration_since(throttle.changed).into();
                let settle =
                    Duration::from_secs_f64(2.0 / throttle.per_second).max(Duration::from_secs(1));
                if since < settle {
                    return None;
                }
                (throttle.per_second, throttle.ceiling)
            }
            None => {
                let normal = self.normal_pace(domain, now);
                (normal, normal)
            }
        };
        let halved = current / 2.0;
        if halved < self.floor {
            return Some(Throttled::Suspend {
                per_second: current,
                ceiling,
            });
        }
        let limiter = slow_limiter(halved, self.clock.clone());
        // The slot just used: the next message waits a whole interval at the new pace.
        let _ = limiter.check();
        self.throttled.insert(
            domain.into(),
            Throttle {
                limiter,
                per_second: halved,
                ceiling,
                changed: now,
            },
        );
        Some(Throttled::Slowed(halved))
    }

    /// Drops state that no longer limits anything, so memory stays flat over many domains.
    fn prune(&mut self) {
        self.since_prune = 0;
        if let Some((keyed, _, _)) = &self.default {
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
        let now = self.clock.now();
        self.observed
            .retain(|_, seen| Duration::from(now.duration_since(seen.start)) < OBSERVE * 10);
    }

    #[cfg(test)]
    fn keyed_len(&self) -> usize {
        self.default.as_ref().map_or(0, |(keyed, _, _)| keyed.len())
    }
}

/// A limiter of `per_second` (at least one an hour, so the interval is never zero), burst 1.
fn slow_limiter<C: Clock>(per_second: f64, clock: C) -> Direct<C> {
    let interval = Duration::from_secs_f64(1.0 / per_second.max(SLOWEST_PER_SECOND));
    let quota = Quota::with_period(interval)
        .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MIN));
    RateLimiter::direct_with_clock(quota, clock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::num::NonZeroU32;

    fn key(domain: &str) -> Arc<str> {
        domain.into()
    }

    fn pace(count: u32, burst: u32) -> Pace {
        Pace {
            count: NonZeroU32::new(count).unwrap(),
            per: Duration::from_secs(1),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    /// Drives the pacer like the scheduler does, on a fake clock, for `seconds`: whenever a
    /// slot is refused, the clock moves on by the wait it names plus `late` (a timer that
    /// wakes late). Gives the admission times, in nanoseconds, per domain.
    fn drive(
        pacer: &mut Pacer<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        domains: &[&str],
        seconds: u64,
        late: Duration,
    ) -> HashMap<String, Vec<u64>> {
        let mut times: HashMap<String, Vec<u64>> = HashMap::new();
        let end = Duration::from_secs(seconds);
        let mut next = 0;
        let mut global_held = false;
        while Duration::from(clock.now()) < end {
            if !global_held {
                match pacer.reserve_global() {
                    Ok(()) => global_held = true,
                    Err(wait) => {
                        clock.advance(wait + late);
                        continue;
                    }
                }
            }
            // Round robin over the domains; the first one ready goes.
            let mut shortest = None::<Duration>;
            let mut sent = false;
            for offset in 0..domains.len() {
                let domain = domains[(next + offset) % domains.len()];
                match pacer.admit(&key(domain)) {
                    Ok(()) => {
                        let now: u64 = Duration::from(clock.now()).as_nanos().try_into().unwrap();
                        times.entry(domain.to_owned()).or_default().push(now);
                        next = (next + offset + 1) % domains.len();
                        sent = true;
                        break;
                    }
                    Err(wait) => shortest = Some(shortest.map_or(wait, |s| s.min(wait))),
                }
            }
            if sent {
                global_held = false;
            } else {
                clock.advance(shortest.unwrap().max(Duration::from_nanos(1)) + late);
            }
        }
        times
    }

    /// The most admissions in any half-open window `[t, t + 1 s)`.
    fn busiest_second(times: &[u64]) -> usize {
        let mut best = 0;
        let mut start = 0;
        for (end, &t) in times.iter().enumerate() {
            while times[start] + 1_000_000_000 <= t {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    #[test]
    fn a_restart_right_after_sending_starts_with_an_empty_bucket() {
        let rate = Rate {
            global: Some(pace(10, 5)),
            domain_default: Some(pace(4, 2)),
            ..Rate::default()
        };
        // A fresh run lets the whole burst go at once.
        let fresh = Pacer::with_clock(&rate, FakeRelativeClock::default());
        assert!((0..5).all(|_| fresh.reserve_global().is_ok()));
        // One that follows a run whose last attempt was 100 ms ago waits a full interval
        // before its first message, globally and for that domain; other domains are free.
        let clock = FakeRelativeClock::default();
        let mut resumed = Pacer::with_clock(&rate, clock.clone());
        resumed.carry_over(
            Some(Duration::from_millis(100)),
            &[("a.example".to_owned(), Duration::from_millis(100))],
        );
        assert_eq!(resumed.reserve_global(), Err(Duration::from_millis(100)));
        assert_eq!(
            resumed.admit(&key("a.example")),
            Err(Duration::from_millis(250))
        );
        assert!(resumed.admit(&key("b.example")).is_ok());
        clock.advance(Duration::from_millis(100));
        assert!(resumed.reserve_global().is_ok());
        // A last attempt longer ago than a burst's worth of the rate changes nothing.
        let late = Pacer::with_clock(&rate, FakeRelativeClock::default());
        late.carry_over(Some(Duration::from_secs(1)), &[]);
        assert!((0..5).all(|_| late.reserve_global().is_ok()));
    }

    #[test]
    fn the_global_rate_is_exact_and_no_second_exceeds_rate_plus_burst() {
        let clock = FakeRelativeClock::default();
        let rate = Rate {
            global: Some(pace(200, 10)),
            ..Rate::default()
        };
        let mut pacer = Pacer::with_clock(&rate, clock.clone());
        let times = drive(&mut pacer, &clock, &["a.example"], 30, Duration::ZERO);
        let all = &times["a.example"];
        // 30 s at 200/s, plus the burst the bucket starts with.
        assert_eq!(all.len(), 200 * 30 + 10 - 1);
        assert!(busiest_second(all) <= 200 + 10, "{}", busiest_second(all));
        // After the first burst, exactly one every 5 ms.
        assert!(all[10..].windows(2).all(|w| w[1] - w[0] == 5_000_000));
    }

    #[test]
    fn late_wake_ups_within_the_burst_do_not_lose_rate() {
        // Every timer wakes 1 ms late. With a burst, the slack absorbs it and 200/s stays
        // 200/s; with a burst of one, every late wake-up is lost for good (one per 6 ms):
        // the reason the default burst is 50 ms worth of the rate.
        let achieved = |burst| {
            let clock = FakeRelativeClock::default();
            let rate = Rate {
                global: Some(pace(200, burst)),
                ..Rate::default()
            };
            let mut pacer = Pacer::with_clock(&rate, clock.clone());
            let times = drive(
                &mut pacer,
                &clock,
                &["a.example"],
                10,
                Duration::from_millis(1),
            );
            times["a.example"].len()
        };
        let with_burst = achieved(10);
        assert!((2000..=2010).contains(&with_burst), "{with_burst}");
        let without = achieved(1);
        assert!((1660..=1670).contains(&without), "{without}");
    }

    #[test]
    fn domains_have_their_own_limits_and_do_not_hold_each_other_up() {
        let clock = FakeRelativeClock::default();
        let mut rate = Rate {
            domain_default: Some(pace(50, 1)),
            ..Rate::default()
        };
        rate.domains.insert("slow.example".into(), pace(5, 1));
        let mut pacer = Pacer::with_clock(&rate, clock.clone());
        let times = drive(
            &mut pacer,
            &clock,
            &["slow.example", "a.example", "b.example"],
            10,
            Duration::ZERO,
        );
        assert_eq!(times["slow.example"].len(), 50);
        assert_eq!(times["a.example"].len(), 500);
        assert_eq!(times["b.example"].len(), 500);
        for (domain, all) in &times {
            let limit = if domain == "slow.example" { 5 } else { 50 };
            assert!(busiest_second(all) <= limit + 1, "{domain}");
        }
    }

    #[test]
    fn a_throttled_domain_halves_then_recovers_gradually_alone() {
        let clock = FakeRelativeClock::default();
        let rate = Rate {
            domain_default: Some(pace(40, 1)),
            ..Rate::default()
        };
        let mut pacer = Pacer::with_clock(&rate, clock.clone());
        assert_eq!(
            pacer.throttle("busy.example"),
            Some(Throttled::Slowed(20.0))
        );
        // The same news from other connections at once: no further halving.
        assert_eq!(pacer.throttle("busy.example"), None);
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            pacer.throttle("busy.example"),
            Some(Throttled::Slowed(10.0))
        );

        let count = |pacer: &mut Pacer<FakeRelativeClock>, domain: &str| {
            let start = Duration::from(clock.now());
            let mut n = 0;
            while Duration::from(clock.now()) < start + Duration::from_secs(10) {
                match pacer.admit(&key(domain)) {
                    Ok(()) => n += 1,
                    Err(wait) => clock.advance(wait),
                }
            }
            n
        };
        // Ten seconds: the throttled domain gets ~10/s, another domain its full 40/s.
        let busy = count(&mut pacer, "busy.example");
        assert!((99..=101).contains(&busy), "{busy}");
        let calm = count(&mut pacer, "calm.example");
        assert!((399..=401).contains(&calm), "{calm}");
        // 30 s after the last signal it goes up by half, then again, until back to normal.
        clock.advance(RECOVER_AFTER);
        let eased = count(&mut pacer, "busy.example");
        assert!((149..=151).contains(&eased), "{eased}");
        for _ in 0..3 {
            clock.advance(RECOVER_AFTER);
            let _ = pacer.admit(&key("busy.example"));
        }
        assert!(pacer.throttled.is_empty());
        let back = count(&mut pacer, "busy.example");
        assert!((399..=401).contains(&back), "{back}");
    }

    #[test]
    fn an_unlimited_domain_is_throttled_from_the_rate_it_was_getting() {
        let clock = FakeRelativeClock::default();
        let mut pacer = Pacer::with_clock(&Rate::default(), clock.clone());
        for _ in 0..300 {
            pacer.admit(&key("big.example")).unwrap();
            clock.advance(Duration::from_millis(10));
        }
        let Some(Throttled::Slowed(halved)) = pacer.throttle("big.example") else {
            panic!("slowed down");
        };
        assert!((49.0..=51.0).contains(&halved), "{halved}");
        assert!(pacer.admit(&key("big.example")).is_err());
        assert!(pacer.admit(&key("other.example")).is_ok());
    }

    #[test]
    fn a_domain_that_keeps_throttling_is_to_be_suspended_at_the_floor() {
        let clock = FakeRelativeClock::default();
        let mut rate = Rate {
            throttle_floor: Some(Pace::new(
                NonZeroU32::new(6).unwrap(),
                Duration::from_secs(60),
                None,
            )),
            ..Rate::default()
        };
        rate.domains.insert("busy.example".into(), pace(1, 1));
        let mut pacer = Pacer::with_clock(&rate, clock.clone());
        // 1/s: halved to 0.5, 0.25 and 0.125 (each once the last one has settled), then the
        // next halving would go below six a minute.
        let mut paces = Vec::new();
        let outcome = loop {
            match pacer.throttle("busy.example") {
                Some(Throttled::Slowed(per_second)) => paces.push(per_second),
                Some(suspend) => break suspend,
                None => {}
            }
            clock.advance(Duration::from_secs(1));
        };
        assert_eq!(paces, [0.5, 0.25, 0.125]);
        assert_eq!(
            outcome,
            Throttled::Suspend {
                per_second: 0.125,
                ceiling: 1.0
            }
        );
        // Still at 0.125/s: one message, then eight seconds.
        assert!(pacer.admit(&key("busy.example")).is_ok());
        let wait = pacer.admit(&key("busy.example")).unwrap_err();
        assert!(wait > Duration::from_secs(7), "{wait:?}");
    }

    #[test]
    fn a_carried_throttle_starts_the_domain_slow_and_eases_back_up() {
        let clock = FakeRelativeClock::default();
        let mut rate = Rate::default();
        rate.domains.insert("busy.example".into(), pace(4, 1));
        let mut pacer = Pacer::with_clock(&rate, clock.clone());
        pacer.carry_throttle("busy.example", 0.5, 4.0);
        assert!(pacer.admit(&key("busy.example")).is_ok());
        let wait = pacer.admit(&key("busy.example")).unwrap_err();
        assert!(wait > Duration::from_millis(1900), "{wait:?}");
        // Quiet: it eases by half every RECOVER_AFTER, and is lifted at its normal pace.
        for _ in 0..6 {
            clock.advance(RECOVER_AFTER);
            let _ = pacer.admit(&key("busy.example"));
        }
        assert!(pacer.throttled.is_empty());
        // Nothing to carry: a pace at or above the normal one, or none.
        pacer.carry_throttle("busy.example", 4.0, 4.0);
        pacer.carry_throttle("busy.example", 0.0, 4.0);
        assert!(pacer.throttled.is_empty());
    }

    #[test]
    fn keyed_state_is_pruned() {
        let clock = FakeRelativeClock::default();
        let rate = Rate {
            domain_default: Some(pace(10, 1)),
            ..Rate::default()
        };
        let mut pacer = Pacer::with_clock(&rate, clock.clone());
        for i in 0..PRUNE_EVERY - 1 {
            pacer.admit(&key(&format!("d{i}.example"))).unwrap();
        }
        assert_eq!(pacer.keyed_len(), PRUNE_EVERY as usize - 1);
        clock.advance(Duration::from_secs(60));
        pacer.admit(&key("last.example")).unwrap();
        assert!(pacer.keyed_len() <= 1, "{}", pacer.keyed_len());
        assert!(pacer.observed.len() <= 1);
    }
}
