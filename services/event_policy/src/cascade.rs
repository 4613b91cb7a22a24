//! The cascade safeguards every child a rule would produce must pass (pure):
//! - **depth**: no child deeper than `cascade_depth_limit`;
//! - **cycle**: a child whose `(event_type, source)` already occurs in its parent's causal
//!   chain (the parent's lineage plus the parent itself) is the second occurrence of a loop and
//!   is not produced;
//! - **fan-out**: at most `fanout_limit` children per `correlation_id`.
//!
//! A stop is reported for an incident and a narrative only the first time per correlation and
//! kind ([`CascadeGuard::first_stop`]).

use std::collections::{HashMap, HashSet};

use bulwark_common::envelope::MeshEvent;

/// Why a child was not produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// It would be deeper than the limit.
    Depth {
        /// The depth it would have had.
        depth: u64,
    },
    /// Its `(event_type, source)` already occurs in the chain.
    Cycle {
        /// The repeated type.
        event_type: String,
        /// The repeated source.
        source: String,
    },
    /// The correlation already produced `fanout_limit` children.
    Fanout {
        /// Children produced so far.
        count: u64,
    },
}

impl Stop {
    /// `depth_limit`, `cycle` or `fanout_limit`.
    pub fn kind(&self) -> &'static str {
        match self {
            Stop::Depth { .. } => "depth_limit",
            Stop::Cycle { .. } => "cycle",
            Stop::Fanout { .. } => "fanout_limit",
        }
    }
}

/// Correlations tracked before quiet ones are forgotten.
const MAX_CORRELATIONS: usize = 100_000;
/// A correlation quiet this long may be forgotten, milliseconds.
const FORGET_AFTER_MS: i64 = 600_000;

/// The limits and what each correlation produced so far.
#[derive(Debug)]
pub struct CascadeGuard {
    depth_limit: u64,
    fanout_limit: u64,
    produced: HashMap<String, (u64, i64)>,
    reported: HashSet<(&'static str, String)>,
}

impl CascadeGuard {
    /// A guard with these limits.
    pub fn new(depth_limit: u64, fanout_limit: u64) -> Self {
        Self {
            depth_limit,
            fanout_limit,
            produced: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    /// Children produced so far in `correlation_id`.
    pub fn produced(&self, correlation_id: &str) -> u64 {
        self.produced.get(correlation_id).map_or(0, |(n, _)| *n)
    }

    /// Admits (and counts) one child of `parent` with this type and source at `now_ms`, or says
    /// why not.
    pub fn admit(
        &mut self,
        parent: &MeshEvent,
        child_type: &str,
        child_source: &str,
        now_ms: i64,
    ) -> Result<u64, Stop> {
        let depth = parent.depth + 1;
        if depth > self.depth_limit {
            return Err(Stop::Depth { depth });
        }
        let repeated = parent
            .lineage
            .iter()
            .map(|(t, s)| (t.as_str(), s.as_str()))
            .chain(std::iter::once((
                parent.event_type.as_str(),
                parent.source.as_str(),
            )))
            .any(|pair| pair == (child_type, child_source));
        if repeated {
            return Err(Stop::Cycle {
                event_type: child_type.to_owned(),
                source: child_source.to_owned(),
            });
        }
        if self.produced.len() >= MAX_CORRELATIONS {
            self.produced
                .retain(|_, (_, last)| now_ms - *last < FORGET_AFTER_MS);
            if self.reported.len() >= MAX_CORRELATIONS {
                self.reported.clear();
            }
        }
        let entry = self
            .produced
            .entry(parent.correlation_id.clone())
            .or_insert((0, now_ms));
        if entry.0 >= self.fanout_limit {
            return Err(Stop::Fanout { count: entry.0 });
        }
        entry.0 += 1;
        entry.1 = now_ms;
        Ok(depth)
    }

    /// True the first time `stop` is seen in `correlation_id`.
    pub fn first_stop(&mut self, stop: &Stop, correlation_id: &str) -> bool {
        self.reported
            .insert((stop.kind(), correlation_id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn depth_stops_at_the_limit() {
        let mut g = CascadeGuard::new(10, 1_000);
        let mut event = MeshEvent::root("cascade.l0", "agent", json!({}));
        for depth in 1..=10 {
            let ty = format!("cascade.l{depth}");
            assert_eq!(g.admit(&event, &ty, "engine", 0), Ok(depth));
            event = event.child(&ty, "engine", json!({}));
        }
        assert_eq!(event.depth, 10);
        let stop = g
            .admit(&event, "cascade.l11", "engine", 0)
            .expect_err("11 > 10");
        assert_eq!(stop, Stop::Depth { depth: 11 });
        assert!(g.first_stop(&stop, &event.correlation_id));
        assert!(
            !g.first_stop(&stop, &event.correlation_id),
            "once per correlation"
        );
    }

    #[test]
    fn a_two_rule_cycle_stops_at_the_second_occurrence() {
        let mut g = CascadeGuard::new(10, 1_000);
        let x = MeshEvent::root("x", "agent", json!({}));
        assert!(g.admit(&x, "y", "engine", 0).is_ok());
        let y = x.child("y", "engine", json!({}));
        assert!(
            g.admit(&y, "x", "engine", 0).is_ok(),
            "x from the engine is new"
        );
        let x2 = y.child("x", "engine", json!({}));
        let stop = g
            .admit(&x2, "y", "engine", 0)
            .expect_err("second (y, engine)");
        assert_eq!(stop.kind(), "cycle");
    }

    #[test]
    fn fanout_is_capped_per_correlation() {
        let mut g = CascadeGuard::new(10, 3);
        let a = MeshEvent::root("a", "agent", json!({}));
        let b = MeshEvent::root("a", "agent", json!({}));
        for _ in 0..3 {
            assert!(g.admit(&a, "c", "engine", 0).is_ok());
        }
        assert_eq!(
            g.admit(&a, "c", "engine", 0),
            Err(Stop::Fanout { count: 3 })
        );
        assert!(g.admit(&b, "c", "engine", 0).is_ok(), "another correlation");
    }

    proptest! {
        /// Whatever the chain, an admitted child is never deeper than the limit, never repeats
        /// a pair of its chain, and no correlation gets more than the fan-out limit.
        #[test]
        fn limits_always_hold(
            limit in 1u64..12,
            fanout in 1u64..40,
            picks in proptest::collection::vec((0usize..4, 0usize..3, 0usize..50), 1..300),
        ) {
            let mut g = CascadeGuard::new(limit, fanout);
            let mut events = vec![MeshEvent::root("t0", "agent", json!({}))];
            let mut admitted = 0u64;
            for (ty, src, parent) in picks {
                let parent = events[parent % events.len()].clone();
                let (ty, src) = (format!("t{ty}"), format!("s{src}"));
                if g.admit(&parent, &ty, &src, 0).is_ok() {
                    admitted += 1;
                    let child = parent.child(&ty, &src, json!({}));
                    prop_assert!(child.depth <= limit);
                    let mut pairs: Vec<_> = child.lineage.clone();
                    pairs.push((child.event_type.clone(), child.source.clone()));
                    let unique: HashSet<_> = pairs.iter().collect();
                    prop_assert_eq!(unique.len(), pairs.len());
                    events.push(child);
                }
            }
            prop_assert!(admitted <= fanout);
        }
    }
}
