//! Per-identity budgets (pure: the caller passes the time, milliseconds since the epoch).
//!
//! Every identity that publishes into the mesh from another account (the ingress subject names
//! it) may publish `budget` events in any sliding `window_ms`. The event that takes its count
//! above the budget **limits** that identity: from then on its events are held by the mesh
//! consumers (they stay stored, and are delivered in order once the limit lifts) and are not
//! counted towards the global breaker, so one identity cannot open it for everyone. A limit
//! lasts `cooldown_ms`; when it is due, it is **extended** by another cooldown if the identity
//! is still over its budget in the last window, and **lifted** otherwise.
//!
//! Memory is bounded: an identity keeps at most `budget + 1` arrival times (enough to tell
//! whether it is over), and at most [`MAX_IDENTITIES`] identities are tracked (quiet, unlimited
//! ones are forgotten first; past that, an untracked identity's events are counted as they
//! come).

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

/// Identities tracked at most.
pub const MAX_IDENTITIES: usize = 10_000;

/// The budgets' figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Events an identity may publish in `window_ms` (0: budgets are off).
    pub budget: u64,
    /// The sliding window, milliseconds.
    pub window_ms: i64,
    /// How long a limit lasts before it is reconsidered, milliseconds.
    pub cooldown_ms: i64,
}

/// What became of one event of an identity.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Within the budget: it counts towards the global breaker.
    Counted,
    /// It took the identity over its budget: the identity is limited from now on (this event
    /// is the first one held).
    Limited(LimitStart),
    /// The identity is limited: the event is held, not counted towards the breaker.
    Held,
}

/// A limit that just began.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitStart {
    /// The identity.
    pub identity: String,
    /// Its events in the window at the crossing event.
    pub count: u64,
    /// When it began.
    pub since_ms: i64,
    /// When it is reconsidered.
    pub until_ms: i64,
}

/// A limit reconsidered once its cooldown passed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum LimitChange {
    /// Still over its budget: limited for another cooldown.
    Extended {
        /// The identity.
        identity: String,
        /// When it began.
        since_ms: i64,
        /// The new end.
        until_ms: i64,
        /// Events held so far.
        held: u64,
    },
    /// Back within its budget: its held events are released.
    Lifted {
        /// The identity.
        identity: String,
        /// When it began.
        since_ms: i64,
        /// When it was lifted.
        at_ms: i64,
        /// Events held while it lasted.
        held: u64,
    },
}

/// A limit in force, for status reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActiveLimit {
    /// The identity.
    pub identity: String,
    /// When it began.
    pub since_ms: i64,
    /// When it is reconsidered.
    pub until_ms: i64,
    /// Events held so far.
    pub held: u64,
}

#[derive(Debug, Clone, Copy)]
struct Limit {
    since_ms: i64,
    until_ms: i64,
    held: u64,
}

#[derive(Debug, Default)]
struct IdentityWindow {
    /// The latest arrivals, at most `budget + 1`.
    arrivals: VecDeque<i64>,
    limit: Option<Limit>,
}

/// The per-identity budgets.
#[derive(Debug)]
pub struct IdentityBudgets {
    cfg: BudgetConfig,
    identities: HashMap<String, IdentityWindow>,
}

impl IdentityBudgets {
    /// Budgets with these figures.
    pub fn new(cfg: BudgetConfig) -> Self {
        Self {
            cfg: BudgetConfig {
                window_ms: cfg.window_ms.max(1),
                cooldown_ms: cfg.cooldown_ms.max(1),
                ..cfg
            },
            identities: HashMap::new(),
        }
    }

    /// Its figures.
    pub fn config(&self) -> &BudgetConfig {
        &self.cfg
    }

    /// Records one event of `identity` at `now_ms`.
    pub fn observe(&mut self, identity: &str, now_ms: i64) -> Verdict {
        if self.cfg.budget == 0 {
            return Verdict::Counted;
        }
        if !self.identities.contains_key(identity) {
            if self.identities.len() >= MAX_IDENTITIES {
                self.forget_quiet(now_ms);
            }
            if self.identities.len() >= MAX_IDENTITIES {
                return Verdict::Counted;
            }
            self.identities
                .insert(identity.to_owned(), IdentityWindow::default());
        }
        let Some(w) = self.identities.get_mut(identity) else {
            return Verdict::Counted;
        };
        w.arrivals.push_back(now_ms);
        while w.arrivals.len() as u64 > self.cfg.budget + 1 {
            w.arrivals.pop_front();
        }
        if let Some(limit) = w.limit.as_mut() {
            limit.held += 1;
            return Verdict::Held;
        }
        let horizon = now_ms - self.cfg.window_ms;
        let count = w.arrivals.iter().filter(|t| **t > horizon).count() as u64;
        if count <= self.cfg.budget {
            return Verdict::Counted;
        }
        let limit = Limit {
            since_ms: now_ms,
            until_ms: now_ms + self.cfg.cooldown_ms,
            held: 1,
        };
        w.limit = Some(limit);
        Verdict::Limited(LimitStart {
            identity: identity.to_owned(),
            count,
            since_ms: limit.since_ms,
            until_ms: limit.until_ms,
        })
    }

    /// Reconsiders the limits due at `now_ms`: extended while still over the budget, lifted
    /// otherwise.
    pub fn sweep(&mut self, now_ms: i64) -> Vec<LimitChange> {
        let horizon = now_ms - self.cfg.window_ms;
        let mut changes = Vec::new();
        for (identity, w) in &mut self.identities {
            let Some(limit) = w.limit.as_mut() else {
                continue;
            };
            if now_ms < limit.until_ms {
                continue;
            }
            let count = w.arrivals.iter().filter(|t| **t > horizon).count() as u64;
            if count > self.cfg.budget {
                limit.until_ms = now_ms + self.cfg.cooldown_ms;
                changes.push(LimitChange::Extended {
                    identity: identity.clone(),
                    since_ms: limit.since_ms,
                    until_ms: limit.until_ms,
                    held: limit.held,
                });
            } else {
                changes.push(LimitChange::Lifted {
                    identity: identity.clone(),
                    since_ms: limit.since_ms,
                    at_ms: now_ms,
                    held: limit.held,
                });
                w.limit = None;
            }
        }
        changes
    }

    /// Takes a stored limit as it is (after a restart, or the leader's decision seen by a
    /// standby): the identity is limited from `since_ms` until at least `until_ms`.
    pub fn restore(&mut self, identity: &str, since_ms: i64, until_ms: i64) {
        if self.cfg.budget == 0 {
            return;
        }
        let w = self.identities.entry(identity.to_owned()).or_default();
        let held = w.limit.map(|l| l.held).unwrap_or(0);
        w.limit = Some(Limit {
            since_ms,
            until_ms,
            held,
        });
    }

    /// True while `identity` is limited.
    pub fn is_limited(&self, identity: &str) -> bool {
        self.identities
            .get(identity)
            .is_some_and(|w| w.limit.is_some())
    }

    /// The limits in force, by identity.
    pub fn active(&self) -> Vec<ActiveLimit> {
        let mut out: Vec<ActiveLimit> = self
            .identities
            .iter()
            .filter_map(|(identity, w)| {
                w.limit.map(|l| ActiveLimit {
                    identity: identity.clone(),
                    since_ms: l.since_ms,
                    until_ms: l.until_ms,
                    held: l.held,
                })
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Forgets unlimited identities with nothing in their window.
    fn forget_quiet(&mut self, now_ms: i64) {
        let horizon = now_ms - self.cfg.window_ms;
        self.identities
            .retain(|_, w| w.limit.is_some() || w.arrivals.back().is_some_and(|t| *t > horizon));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> BudgetConfig {
        BudgetConfig {
            budget: 100,
            window_ms: 10_000,
            cooldown_ms: 30_000,
        }
    }

    #[test]
    fn the_crossing_event_limits_one_identity_and_not_the_others() {
        let mut b = IdentityBudgets::new(cfg());
        for i in 0..100 {
            assert_eq!(b.observe("agent", i), Verdict::Counted);
        }
        let Verdict::Limited(start) = b.observe("agent", 100) else {
            panic!("the 101st event limits it");
        };
        assert_eq!((start.count, start.until_ms), (101, 30_100));
        assert_eq!(b.observe("agent", 101), Verdict::Held);
        assert_eq!(b.observe("operator", 101), Verdict::Counted);
        assert!(b.is_limited("agent") && !b.is_limited("operator"));
        assert_eq!(b.active()[0].held, 2);
    }

    #[test]
    fn a_limit_is_extended_while_the_flood_goes_on_and_lifted_after() {
        let mut b = IdentityBudgets::new(cfg());
        for i in 0..=100 {
            b.observe("agent", i);
        }
        assert!(b.sweep(30_099).is_empty(), "not due yet");
        // Still flooding when it is due: another cooldown.
        for i in 0..200 {
            assert_eq!(b.observe("agent", 25_000 + i), Verdict::Held);
        }
        match b.sweep(30_100).as_slice() {
            [LimitChange::Extended { until_ms, held, .. }] => {
                assert_eq!((*until_ms, *held), (60_100, 201));
            }
            other => panic!("extended, got {other:?}"),
        }
        match b.sweep(60_100).as_slice() {
            [LimitChange::Lifted { held, .. }] => assert_eq!(*held, 201),
            other => panic!("lifted, got {other:?}"),
        }
        assert_eq!(b.observe("agent", 60_101), Verdict::Counted);
    }

    #[test]
    fn a_zero_budget_turns_budgets_off() {
        let mut b = IdentityBudgets::new(BudgetConfig { budget: 0, ..cfg() });
        for i in 0..1_000 {
            assert_eq!(b.observe("agent", i), Verdict::Counted);
        }
        b.restore("agent", 0, 10);
        assert!(!b.is_limited("agent"));
    }

    #[test]
    fn a_restored_limit_is_lifted_by_the_sweep() {
        let mut b = IdentityBudgets::new(cfg());
        b.restore("agent", 1_000, 31_000);
        assert_eq!(b.observe("agent", 2_000), Verdict::Held);
        assert!(matches!(
            b.sweep(31_000).as_slice(),
            [LimitChange::Lifted { .. }]
        ));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Event(u8, i64),
        Sweep(i64),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(
            prop_oneof![
                4 => (0u8..3, 0i64..40).prop_map(|(who, gap)| Step::Event(who, gap)),
                1 => (0i64..800).prop_map(Step::Sweep),
            ],
            1..600,
        )
    }

    proptest! {
        /// Whatever the arrivals: no identity has more than `budget` events counted in any
        /// window (so one identity alone never brings more than its budget to the breaker); an
        /// identity is limited exactly from the event that takes its brute-force window count
        /// above the budget; a held event only while limited; a limit lifts no earlier than its
        /// cooldown, and only when the identity is back within its budget; identities are
        /// independent.
        #[test]
        fn budgets_hold(budget in 1u64..20, steps in steps()) {
            let c = BudgetConfig { budget, window_ms: 1_000, cooldown_ms: 1_500 };
            let mut b = IdentityBudgets::new(c);
            let mut now = 0;
            let mut arrivals: HashMap<u8, Vec<i64>> = HashMap::new();
            let mut counted: HashMap<u8, Vec<i64>> = HashMap::new();
            let mut limited_since: HashMap<u8, i64> = HashMap::new();
            for step in steps {
                match step {
                    Step::Event(who, gap) => {
                        now += gap;
                        let name = format!("id{who}");
                        let all = arrivals.entry(who).or_default();
                        all.push(now);
                        let in_window = all.iter().filter(|t| **t > now - c.window_ms).count() as u64;
                        let was_limited = limited_since.contains_key(&who);
                        match b.observe(&name, now) {
                            Verdict::Counted => {
                                prop_assert!(!was_limited);
                                prop_assert!(in_window <= budget);
                                let mine = counted.entry(who).or_default();
                                mine.push(now);
                                let recent = mine.iter().filter(|t| **t > now - c.window_ms).count() as u64;
                                prop_assert!(recent <= budget, "{} counted in one window", recent);
                            }
                            Verdict::Limited(start) => {
                                prop_assert!(!was_limited);
                                prop_assert_eq!(start.count, in_window);
                                prop_assert!(in_window > budget);
                                limited_since.insert(who, now);
                            }
                            Verdict::Held => prop_assert!(was_limited),
                        }
                    }
                    Step::Sweep(gap) => {
                        now += gap;
                        for change in b.sweep(now) {
                            if let LimitChange::Lifted { identity, since_ms, .. } = change {
                                let who: u8 = identity[2..].parse().unwrap_or(u8::MAX);
                                prop_assert_eq!(limited_since.remove(&who), Some(since_ms));
                                prop_assert!(now - since_ms >= c.cooldown_ms);
                                let all = &arrivals[&who];
                                let in_window = all.iter().filter(|t| **t > now - c.window_ms).count() as u64;
                                prop_assert!(in_window <= budget);
                            }
                        }
                    }
                }
                for who in 0u8..3 {
                    prop_assert_eq!(b.is_limited(&format!("id{who}")), limited_since.contains_key(&who));
                }
            }
        }
    }
}
