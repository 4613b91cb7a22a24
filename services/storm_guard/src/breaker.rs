//! The mesh circuit breaker's state machine (pure: the caller passes the time, milliseconds
//! since the epoch, so the state can be stored and restored across restarts and replicas).
//!
//! - **closed -> open** on the event that takes the count of all counted events in the last
//!   `window_ms` above `threshold`;
//! - **open -> half-open** once `cooldown_ms` has passed since it opened (on the next event or
//!   tick);
//! - **half-open -> open** on the event that takes the count since it went half-open above the
//!   probe limit (`threshold` scaled to `half_open_ms`): the rate is still abnormal;
//! - **half-open -> closed** once `half_open_ms` passed without that: the rate is normal. The
//!   window starts empty again.

use std::collections::VecDeque;

use bulwark_common::mesh::{BreakerRecord, BreakerState};

/// The breaker's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Events in `window_ms` above which it opens.
    pub threshold: u64,
    /// The sliding window, milliseconds.
    pub window_ms: i64,
    /// Time open before half-open, milliseconds.
    pub cooldown_ms: i64,
    /// Time half-open before closing, milliseconds.
    pub half_open_ms: i64,
}

impl BreakerConfig {
    /// Events allowed while half-open before it reopens.
    pub fn probe_limit(&self) -> u64 {
        let scaled =
            self.threshold as f64 * self.half_open_ms as f64 / self.window_ms.max(1) as f64;
        (scaled.floor() as u64).max(1)
    }
}

/// A state change, to be stored, announced and narrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// When, milliseconds.
    pub at_ms: i64,
    /// Events counted in the window (closed), or since going half-open, at the transition.
    pub event_count: u64,
}

/// The breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
    since_ms: i64,
    /// Arrival times in the window (closed only).
    window: VecDeque<i64>,
    /// Events since going half-open.
    probe_count: u64,
    /// Count when it last opened.
    opened_with: u64,
    opened_count: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: BreakerState::Closed,
            since_ms: 0,
            window: VecDeque::new(),
            probe_count: 0,
            opened_with: 0,
            opened_count: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// When the current state began.
    pub fn since_ms(&self) -> i64 {
        self.since_ms
    }

    /// Its figures.
    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// Counts one event at `now_ms`.
    pub fn observe(&mut self, now_ms: i64) -> Option<Transition> {
        if let Some(t) = self.tick(now_ms) {
            // A due time-based change comes first; the event then counts in the new state.
            let _ = self.count(now_ms);
            return Some(t);
        }
        self.count(now_ms)
    }

    fn count(&mut self, now_ms: i64) -> Option<Transition> {
        match self.state {
            BreakerState::Closed => {
                let horizon = now_ms - self.cfg.window_ms;
                while self.window.front().is_some_and(|t| *t <= horizon) {
                    self.window.pop_front();
                }
                self.window.push_back(now_ms);
                let count = self.window.len() as u64;
                (count > self.cfg.threshold).then(|| self.enter(BreakerState::Open, now_ms, count))
            }
            BreakerState::Open => None,
            BreakerState::HalfOpen => {
                self.probe_count += 1;
                (self.probe_count > self.cfg.probe_limit())
                    .then(|| self.enter(BreakerState::Open, now_ms, self.probe_count))
            }
        }
    }

    /// Applies the time-based changes due at `now_ms`.
    pub fn tick(&mut self, now_ms: i64) -> Option<Transition> {
        match self.state {
            BreakerState::Open if now_ms - self.since_ms >= self.cfg.cooldown_ms => {
                Some(self.enter(BreakerState::HalfOpen, now_ms, self.opened_with))
            }
            BreakerState::HalfOpen if now_ms - self.since_ms >= self.cfg.half_open_ms => {
                Some(self.enter(BreakerState::Closed, now_ms, self.probe_count))
            }
            _ => None,
        }
    }

    /// Moves the breaker to `to` by hand (an operator or a playbook) at `now_ms`; `None` when
    /// it is there already or `to` is half-open (only time leads there). The normal rules
    /// apply from the new state on: a forced open still cools down, a forced close counts anew.
    pub fn force(&mut self, to: BreakerState, now_ms: i64) -> Option<Transition> {
        if to == self.state || to == BreakerState::HalfOpen {
            return None;
        }
        let count = match self.state {
            BreakerState::Closed => {
                let horizon = now_ms - self.cfg.window_ms;
                self.window.iter().filter(|t| **t > horizon).count() as u64
            }
            BreakerState::Open => self.opened_with,
            BreakerState::HalfOpen => self.probe_count,
        };
        Some(self.enter(to, now_ms, count))
    }

    /// Events counted in the current window (closed), or since going half-open.
    pub fn current_count(&self, now_ms: i64) -> u64 {
        match self.state {
            BreakerState::Closed => {
                let horizon = now_ms - self.cfg.window_ms;
                self.window.iter().filter(|t| **t > horizon).count() as u64
            }
            BreakerState::Open => 0,
            BreakerState::HalfOpen => self.probe_count,
        }
    }

    fn enter(&mut self, to: BreakerState, at_ms: i64, event_count: u64) -> Transition {
        let from = self.state;
        self.state = to;
        self.since_ms = at_ms;
        self.window.clear();
        self.probe_count = 0;
        if to == BreakerState::Open {
            self.opened_with = event_count;
            self.opened_count += 1;
        }
        Transition {
            from,
            to,
            at_ms,
            event_count,
        }
    }

    /// The record to store after the latest transition.
    pub fn record(&self, updated_by: &str) -> BreakerRecord {
        BreakerRecord {
            state: self.state,
            since_ms: self.since_ms,
            event_count: self.opened_with,
            opened_count: self.opened_count,
            updated_by: updated_by.to_owned(),
            leader_token: 0,
        }
    }

    /// Takes the stored record as it is, newer or not: what a standby replica does, since the
    /// stored record is the leader's and the standby's own decisions are not.
    pub fn replace(&mut self, record: &BreakerRecord) {
        self.state = record.state;
        self.since_ms = record.since_ms;
        self.opened_with = record.event_count;
        self.opened_count = self.opened_count.max(record.opened_count);
        self.window.clear();
        self.probe_count = 0;
    }

    /// Adopts a stored record (after a restart, or another replica's transition) when it is
    /// newer than what this breaker knows.
    pub fn restore(&mut self, record: &BreakerRecord) -> bool {
        if record.since_ms <= self.since_ms && record.state == self.state {
            return false;
        }
        if record.since_ms < self.since_ms {
            return false;
        }
        self.state = record.state;
        self.since_ms = record.since_ms;
        self.opened_with = record.event_count;
        self.opened_count = self.opened_count.max(record.opened_count);
        self.window.clear();
        self.probe_count = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forced_transitions_follow_the_normal_rules_afterwards() {
        let mut b = Breaker::new(cfg());
        assert_eq!(b.force(BreakerState::Closed, 0), None, "closed already");
        assert_eq!(
            b.force(BreakerState::HalfOpen, 0),
            None,
            "only time leads to half-open"
        );
        let t = b.force(BreakerState::Open, 1_000).expect("opens");
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        // A forced open cools down like any other.
        assert_eq!(b.tick(1_000 + 59_999), None);
        assert_eq!(b.tick(61_000).map(|t| t.to), Some(BreakerState::HalfOpen));
        let t = b.force(BreakerState::Closed, 62_000).expect("closes");
        assert_eq!(t.from, BreakerState::HalfOpen);
        assert_eq!(b.current_count(62_000), 0, "a forced close counts anew");
    }

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            threshold: 500,
            window_ms: 10_000,
            cooldown_ms: 60_000,
            half_open_ms: 10_000,
        }
    }

    #[test]
    fn opens_on_the_crossing_event_and_recovers() {
        let mut b = Breaker::new(cfg());
        for i in 0..500 {
            assert_eq!(b.observe(1_000 + i), None, "500 events in 10 s are allowed");
        }
        let opened = b.observe(1_500).expect("the 501st opens it");
        assert_eq!(
            (opened.from, opened.to, opened.event_count),
            (BreakerState::Closed, BreakerState::Open, 501)
        );
        assert_eq!(b.tick(1_500 + 59_999), None, "cooldown not over");
        let half = b
            .tick(1_500 + 60_000)
            .expect("half-open after the cooldown");
        assert_eq!(half.to, BreakerState::HalfOpen);
        for i in 0..500 {
            assert_eq!(
                b.observe(61_600 + i),
                None,
                "the probe stays within its limit"
            );
        }
        assert_eq!(b.tick(61_500 + 9_999), None);
        let closed = b
            .tick(61_500 + 10_000)
            .expect("closes after a normal probe");
        assert_eq!((closed.to, closed.event_count), (BreakerState::Closed, 500));
        assert_eq!(b.observe(71_501), None, "the window starts empty");
    }

    #[test]
    fn a_flood_during_the_probe_reopens() {
        let mut b = Breaker::new(cfg());
        for i in 0..501 {
            b.observe(i);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let half = b
            .observe(60_500)
            .expect("an event after the cooldown moves it to half-open");
        assert_eq!(half.to, BreakerState::HalfOpen);
        let mut reopened = None;
        for i in 0..600 {
            if let Some(t) = b.observe(60_501 + i) {
                reopened = Some((i, t));
                break;
            }
        }
        let (i, t) = reopened.expect("reopens");
        assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
        assert_eq!(
            i, 499,
            "the event past the probe limit (500, one counted on entry) reopens it"
        );
    }

    #[test]
    fn restore_keeps_state_across_restarts() {
        let mut b = Breaker::new(cfg());
        for i in 0..501 {
            b.observe(i);
        }
        let stored = b.record("a");
        let mut fresh = Breaker::new(cfg());
        assert!(fresh.restore(&stored));
        assert_eq!(fresh.state(), BreakerState::Open);
        assert_eq!(fresh.tick(stored.since_ms + 59_999), None);
        assert!(fresh.tick(stored.since_ms + 60_000).is_some());
        assert!(!fresh.restore(&stored), "an older record is ignored");
    }

    #[derive(Debug, Clone)]
    enum Step {
        Event(i64),
        Tick(i64),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(
            prop_oneof![
                (0i64..50).prop_map(Step::Event),
                (0i64..3_000).prop_map(Step::Tick),
            ],
            1..600,
        )
    }

    proptest! {
        /// Only the four edges of the state machine are taken; it opens from closed exactly
        /// when the brute-force window count exceeds the threshold; open lasts at least the
        /// cooldown and half-open at most its length.
        #[test]
        fn the_state_machine_holds(threshold in 1u64..30, steps in steps()) {
            let c = BreakerConfig { threshold, window_ms: 1_000, cooldown_ms: 2_000, half_open_ms: 500 };
            let mut b = Breaker::new(c);
            let mut now = 0;
            let mut closed_events: Vec<i64> = Vec::new();
            for step in steps {
                let (t, is_event) = match step {
                    Step::Event(gap) => { now += gap; (now, true) }
                    Step::Tick(gap) => { now += gap; (now, false) }
                };
                let before = (b.state(), b.since_ms());
                let transition = if is_event { b.observe(t) } else { b.tick(t) };
                if let Some(tr) = transition {
                    let edge = (tr.from, tr.to);
                    prop_assert!(matches!(edge,
                        (BreakerState::Closed, BreakerState::Open)
                        | (BreakerState::Open, BreakerState::HalfOpen)
                        | (BreakerState::HalfOpen, BreakerState::Open)
                        | (BreakerState::HalfOpen, BreakerState::Closed)), "edge {:?}", edge);
                    prop_assert_eq!(tr.from, before.0);
                    if tr.from == BreakerState::Open {
                        prop_assert!(t - before.1 >= c.cooldown_ms);
                    }
                    if edge == (BreakerState::HalfOpen, BreakerState::Closed) {
                        prop_assert!(t - before.1 >= c.half_open_ms);
                    }
                }
                if before.0 == BreakerState::Closed && is_event {
                    closed_events.push(t);
                    let count = closed_events.iter().filter(|e| **e > t - c.window_ms).count() as u64;
                    let opened = b.state() == BreakerState::Open;
                    prop_assert_eq!(opened, count > threshold, "count {} threshold {}", count, threshold);
                }
                if b.state() != BreakerState::Closed {
                    closed_events.clear();
                }
                if before.0 != BreakerState::Closed && b.state() == BreakerState::Closed {
                    // The event that found the probe over counts in the new window.
                    closed_events.clear();
                    if is_event {
                        closed_events.push(t);
                    }
                }
            }
        }
    }
}
