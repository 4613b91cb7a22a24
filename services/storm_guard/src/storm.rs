//! Per-type storm detection over a sliding window (pure: the caller passes the time).
//!
//! Each event type keeps the arrival times (and sources) of its last window. A type is in a
//! storm from the event that takes its count above `threshold × window` (detection happens on
//! that crossing event, not on a timer) until it has stayed at or below the threshold for a
//! whole window; one [`StormStart`] is reported per storm, however long it lasts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde::Serialize;

/// A storm that just began.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StormStart {
    /// The stormed type.
    pub event_type: String,
    /// Its rate over the window at the crossing event, events per second.
    pub rate_per_second: f64,
    /// Events of the type in the window at the crossing event.
    pub count: u64,
    /// The source that published most of them.
    pub top_source: String,
    /// How many of them it published.
    pub top_source_count: u64,
    /// When the crossing event arrived, milliseconds.
    pub at_ms: i64,
}

/// A storm that ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StormEnd {
    /// The type.
    pub event_type: String,
    /// When it began, milliseconds.
    pub started_ms: i64,
    /// Highest count seen in one window during the storm.
    pub peak_count: u64,
}

/// A storm in progress, for status reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActiveStorm {
    /// The type.
    pub event_type: String,
    /// When it began, milliseconds.
    pub started_ms: i64,
    /// Highest count seen in one window so far.
    pub peak_count: u64,
    /// The source named in the throttle advisory.
    pub top_source: String,
}

/// One type's recent rate, for `storm_guard.rates`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeRate {
    /// The type.
    pub event_type: String,
    /// Events of it in the last window.
    pub count: u64,
    /// That count per second.
    pub rate_per_second: f64,
    /// Whether it is in a storm.
    pub in_storm: bool,
    /// Its busiest sources (at most five) with their counts.
    pub top_sources: Vec<(String, u64)>,
}

#[derive(Debug, Default)]
struct TypeWindow {
    arrivals: VecDeque<(i64, Arc<str>)>,
    storm: Option<ActiveStorm>,
    last_above_ms: i64,
}

/// Types tracked before quiet ones are forgotten.
const MAX_TYPES: usize = 10_000;
/// Interned source names kept before the table is reset.
const MAX_SOURCES: usize = 10_000;

/// The per-type windows.
#[derive(Debug)]
pub struct StormDetector {
    window_ms: i64,
    limit: u64,
    types: HashMap<String, TypeWindow>,
    sources: HashSet<Arc<str>>,
}

impl StormDetector {
    /// A detector of rates above `threshold` events per second over `window_ms`.
    pub fn new(threshold: u64, window_ms: i64) -> Self {
        let window_ms = window_ms.max(1);
        Self {
            window_ms,
            limit: ((threshold as f64) * (window_ms as f64) / 1000.0).floor() as u64,
            types: HashMap::new(),
            sources: HashSet::new(),
        }
    }

    /// Records one event of `event_type` from `source` at `now_ms`; returns the storm it starts.
    pub fn observe(&mut self, event_type: &str, source: &str, now_ms: i64) -> Option<StormStart> {
        let source = self.intern(source);
        if !self.types.contains_key(event_type) {
            if self.types.len() >= MAX_TYPES {
                self.forget_quiet(now_ms);
            }
            self.types
                .insert(event_type.to_owned(), TypeWindow::default());
        }
        let window = self.types.get_mut(event_type)?;
        let horizon = now_ms - self.window_ms;
        while window.arrivals.front().is_some_and(|(t, _)| *t <= horizon) {
            window.arrivals.pop_front();
        }
        window.arrivals.push_back((now_ms, source));
        let count = window.arrivals.len() as u64;
        if count <= self.limit {
            return None;
        }
        window.last_above_ms = now_ms;
        if let Some(storm) = window.storm.as_mut() {
            storm.peak_count = storm.peak_count.max(count);
            return None;
        }
        let mut by_source: HashMap<&str, u64> = HashMap::new();
        for (_, s) in &window.arrivals {
            *by_source.entry(s).or_default() += 1;
        }
        let (top_source, top_source_count) = by_source
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
            .map(|(s, n)| (s.to_owned(), n))
            .unwrap_or_default();
        window.storm = Some(ActiveStorm {
            event_type: event_type.to_owned(),
            started_ms: now_ms,
            peak_count: count,
            top_source: top_source.clone(),
        });
        Some(StormStart {
            event_type: event_type.to_owned(),
            rate_per_second: count as f64 * 1000.0 / self.window_ms as f64,
            count,
            top_source,
            top_source_count,
            at_ms: now_ms,
        })
    }

    /// Ends the storms that stayed at or below the threshold for a whole window by `now_ms`.
    pub fn sweep(&mut self, now_ms: i64) -> Vec<StormEnd> {
        let mut ended = Vec::new();
        for window in self.types.values_mut() {
            if now_ms - window.last_above_ms >= self.window_ms
                && let Some(storm) = window.storm.take()
            {
                ended.push(StormEnd {
                    event_type: storm.event_type,
                    started_ms: storm.started_ms,
                    peak_count: storm.peak_count,
                });
            }
        }
        ended
    }

    /// Every type seen in the last window at `now_ms`, busiest first: its count, rate and
    /// busiest sources.
    pub fn rates(&self, now_ms: i64) -> Vec<TypeRate> {
        let horizon = now_ms - self.window_ms;
        let mut rates: Vec<TypeRate> = self
            .types
            .iter()
            .filter_map(|(event_type, window)| {
                let mut by_source: HashMap<&str, u64> = HashMap::new();
                let mut count = 0u64;
                for (t, source) in &window.arrivals {
                    if *t > horizon {
                        count += 1;
                        *by_source.entry(source).or_default() += 1;
                    }
                }
                if count == 0 {
                    return None;
                }
                let mut sources: Vec<(String, u64)> = by_source
                    .into_iter()
                    .map(|(s, n)| (s.to_owned(), n))
                    .collect();
                sources.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                sources.truncate(5);
                Some(TypeRate {
                    event_type: event_type.clone(),
                    count,
                    rate_per_second: count as f64 * 1000.0 / self.window_ms as f64,
                    in_storm: window.storm.is_some(),
                    top_sources: sources,
                })
            })
            .collect();
        rates.sort_by(|a, b| b.count.cmp(&a.count).then(a.event_type.cmp(&b.event_type)));
        rates
    }

    /// The storms in progress.
    pub fn active(&self) -> Vec<ActiveStorm> {
        let mut storms: Vec<ActiveStorm> = self
            .types
            .values()
            .filter_map(|w| w.storm.clone())
            .collect();
        storms.sort_by(|a, b| a.event_type.cmp(&b.event_type));
        storms
    }

    fn intern(&mut self, source: &str) -> Arc<str> {
        if let Some(s) = self.sources.get(source) {
            return s.clone();
        }
        if self.sources.len() >= MAX_SOURCES {
            self.sources.clear();
        }
        let s: Arc<str> = Arc::from(source);
        self.sources.insert(s.clone());
        s
    }

    fn forget_quiet(&mut self, now_ms: i64) {
        let horizon = now_ms - self.window_ms;
        self.types.retain(|_, w| {
            w.storm.is_some() || w.arrivals.back().is_some_and(|(t, _)| *t > horizon)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_crossing_event_starts_one_storm() {
        let mut d = StormDetector::new(100, 1000);
        for i in 0..100 {
            assert_eq!(
                d.observe("flood", "agent-7", i),
                None,
                "event {i} is within the threshold"
            );
        }
        let storm = d
            .observe("flood", "agent-7", 100)
            .expect("the 101st event in 1 s crosses");
        assert_eq!(storm.count, 101);
        assert_eq!(storm.rate_per_second, 101.0);
        assert_eq!(storm.top_source, "agent-7");
        for i in 101..5000 {
            assert_eq!(
                d.observe("flood", "agent-7", i / 5),
                None,
                "one report per storm"
            );
        }
        assert_eq!(d.active().len(), 1);
        assert!(
            d.sweep(999).is_empty(),
            "still above within the last window"
        );
        let ended = d.sweep(999 + 1000);
        assert_eq!(ended.len(), 1);
        assert!(d.active().is_empty());
        for i in 0..101 {
            let again = d.observe("flood", "other", 10_000 + i);
            assert_eq!(again.is_some(), i == 100, "a new storm is reported again");
        }
    }

    #[test]
    fn types_are_separate_and_old_events_leave_the_window() {
        let mut d = StormDetector::new(10, 1000);
        for i in 0..10 {
            assert!(
                d.observe("a", "s", i * 200).is_none(),
                "10 events over 2 s: 5/s"
            );
            assert!(d.observe("b", "s", i * 200).is_none());
        }
        assert!(d.active().is_empty());
    }

    proptest! {
        /// A storm starts exactly on the events where the count over the last window first
        /// exceeds the threshold, and reports that count.
        #[test]
        fn detection_matches_a_brute_force_count(
            threshold in 1u64..20,
            gaps in proptest::collection::vec(0i64..100, 1..400),
        ) {
            let mut d = StormDetector::new(threshold, 1000);
            let mut times = Vec::new();
            let mut now = 0;
            let mut in_storm = false;
            let mut last_above = i64::MIN;
            for gap in gaps {
                now += gap;
                let ended = d.sweep(now);
                if in_storm && now - last_above >= 1000 {
                    prop_assert_eq!(ended.len(), 1);
                    in_storm = false;
                }
                times.push(now);
                let count = times.iter().filter(|t| **t > now - 1000).count() as u64;
                let started = d.observe("t", "s", now);
                if count > threshold {
                    last_above = now;
                    prop_assert_eq!(started.is_some(), !in_storm);
                    if let Some(s) = started {
                        prop_assert_eq!(s.count, count);
                    }
                    in_storm = true;
                } else {
                    prop_assert!(started.is_none());
                }
            }
        }
    }
}
