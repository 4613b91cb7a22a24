//! The Jepsen-style checker: every id a scenario published or submitted is classified from what
//! the system reports about it, and the history is valid only when nothing was lost, nothing
//! processed twice and nothing unexpected happened.
//!
//! Pure: the runner feeds it the ledger (what was sent and what should become of it) and the
//! observations (task results and intent histories, the mesh consumer's deliveries, the refusals
//! received); [`Ledger::classify`] decides.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// What should become of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expected {
    /// Acknowledged by the system: it must be completed (or processed) exactly once.
    Delivered,
    /// Invalid on purpose: it must be refused, and never run.
    Refused,
    /// Rejected by a human review (FIT01): it must end `rejected`, and never run.
    Rejected,
}

/// What the system reported about an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Observation {
    /// Completed or processed once (each report counts).
    Completed,
    /// Refused at intake (a 400).
    Refused,
    /// Known to the system but not finished yet (queued, running, parked, held by the breaker).
    Held(String),
    /// Finished without success (failed for good).
    Failed(String),
    /// Rejected (by a review or a vote): finished, never to run.
    Rejected(String),
    /// Shed into the replayable park (`htm.task.parked.<priority>`): at rest, not lost, not
    /// finished; `scheduler.replay` brings it back.
    Parked(String),
}

/// The class of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// What should have happened, happened once.
    Ok,
    /// Acknowledged, and nothing reports it: gone.
    Lost,
    /// Completed more than once.
    Duplicated,
    /// Something happened that should not: an invalid id accepted or run, a valid one refused
    /// or failed, an id nobody sent.
    Unexpected,
    /// Still waiting in the system when the check ran.
    StillHeld,
    /// Acknowledged and shed into the replayable park: not lost, not done (FIT03).
    Parked,
}

impl Class {
    /// The class's name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::Lost => "lost",
            Class::Duplicated => "duplicated",
            Class::Unexpected => "unexpected",
            Class::StillHeld => "still_held",
            Class::Parked => "parked",
        }
    }
}

/// The ids sent and what was observed about them.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    expected: HashMap<String, Expected>,
    observed: HashMap<String, Vec<Observation>>,
}

/// Examples kept per class in a verdict.
const EXAMPLES: usize = 10;

/// The checker's verdict on a ledger.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CheckResult {
    /// Ids sent.
    pub sent: u64,
    /// Ids per class.
    pub ok: u64,
    /// Acknowledged and gone.
    pub lost: u64,
    /// Completed more than once.
    pub duplicated: u64,
    /// Something that should not have happened.
    pub unexpected: u64,
    /// Not finished yet.
    pub still_held: u64,
    /// Shed into the replayable park and still there: not lost, not done.
    pub parked: u64,
    /// Up to ten ids per class other than ok, with why.
    pub examples: BTreeMap<String, Vec<String>>,
}

impl CheckResult {
    /// Valid: nothing lost, nothing twice, nothing unexpected.
    pub fn valid(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0
    }

    /// Adds another result's counts and examples.
    pub fn absorb(&mut self, other: &CheckResult) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.unexpected += other.unexpected;
        self.still_held += other.still_held;
        self.parked += other.parked;
        for (k, v) in &other.examples {
            let mine = self.examples.entry(k.clone()).or_default();
            for e in v {
                if mine.len() < EXAMPLES {
                    mine.push(e.clone());
                }
            }
        }
    }

    /// `ok 10, lost 0, duplicated 0, unexpected 0, still held 0 (of 10 sent)`; `, parked n`
    /// is added when some ids are in the park.
    pub fn summary(&self) -> String {
        let parked = if self.parked > 0 {
            format!(", parked {} (replayable, not lost)", self.parked)
        } else {
            String::new()
        };
        format!(
            "ok {}, lost {}, duplicated {}, unexpected {}, still held {}{parked} (of {} sent)",
            self.ok, self.lost, self.duplicated, self.unexpected, self.still_held, self.sent
        )
    }
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `id` was sent and what should become of it.
    pub fn expect(&mut self, id: impl Into<String>, expected: Expected) {
        self.expected.insert(id.into(), expected);
    }

    /// Records an observation about `id` (sent or not).
    pub fn observe(&mut self, id: impl Into<String>, observation: Observation) {
        self.observed
            .entry(id.into())
            .or_default()
            .push(observation);
    }

    /// Ids sent so far.
    pub fn sent(&self) -> usize {
        self.expected.len()
    }

    /// True when `id` was sent.
    pub fn knows(&self, id: &str) -> bool {
        self.expected.contains_key(id)
    }

    /// Classifies one id.
    pub fn class_of(&self, id: &str) -> (Class, String) {
        let none = Vec::new();
        let seen = self.observed.get(id).unwrap_or(&none);
        let completions = seen
            .iter()
            .filter(|o| **o == Observation::Completed)
            .count();
        let refused = seen.contains(&Observation::Refused);
        let failed = seen.iter().find_map(|o| match o {
            Observation::Failed(why) => Some(why.clone()),
            _ => None,
        });
        let rejected = seen.iter().find_map(|o| match o {
            Observation::Rejected(why) => Some(why.clone()),
            _ => None,
        });
        let held = seen.iter().find_map(|o| match o {
            Observation::Held(why) => Some(why.clone()),
            _ => None,
        });
        let parked = seen.iter().find_map(|o| match o {
            Observation::Parked(why) => Some(why.clone()),
            _ => None,
        });
        match self.expected.get(id) {
            None => (Class::Unexpected, "never sent, yet reported".into()),
            Some(Expected::Refused) => {
                if completions > 0 {
                    (
                        Class::Unexpected,
                        format!("invalid, yet ran {completions} time(s)"),
                    )
                } else if refused {
                    (Class::Ok, "refused".into())
                } else if let Some(why) = held.or(failed).or(rejected).or(parked) {
                    (Class::Unexpected, format!("invalid, yet accepted ({why})"))
                } else {
                    (Class::Unexpected, "invalid, and never refused".into())
                }
            }
            Some(Expected::Rejected) => {
                if completions > 0 {
                    (
                        Class::Unexpected,
                        format!("rejected by its review, yet ran {completions} time(s)"),
                    )
                } else if let Some(why) = rejected {
                    (Class::Ok, format!("rejected ({why})"))
                } else if let Some(why) = failed.or(parked) {
                    (
                        Class::Unexpected,
                        format!("rejected by its review, yet {why}"),
                    )
                } else if refused {
                    (Class::Unexpected, "valid, yet refused at intake".into())
                } else if let Some(why) = held {
                    (Class::StillHeld, why)
                } else {
                    (Class::Lost, "acknowledged, then nothing".into())
                }
            }
            Some(Expected::Delivered) => match completions {
                1 => (Class::Ok, "completed once".into()),
                n if n > 1 => (Class::Duplicated, format!("completed {n} times")),
                _ if refused => (Class::Unexpected, "valid, yet refused".into()),
                _ => match (
                    failed.or(rejected.map(|r| format!("rejected: {r}"))),
                    held,
                    parked,
                ) {
                    (Some(why), _, _) => (Class::Unexpected, format!("failed: {why}")),
                    (None, Some(why), _) => (Class::StillHeld, why),
                    (None, None, Some(why)) => (Class::Parked, why),
                    (None, None, None) => (Class::Lost, "acknowledged, then nothing".into()),
                },
            },
        }
    }

    /// Classifies every id sent and every id observed.
    pub fn classify(&self) -> CheckResult {
        let mut result = CheckResult {
            sent: self.expected.len() as u64,
            ..Default::default()
        };
        let mut ids: Vec<&String> = self.expected.keys().collect();
        ids.extend(
            self.observed
                .keys()
                .filter(|id| !self.expected.contains_key(*id)),
        );
        ids.sort();
        for id in ids {
            let (class, why) = self.class_of(id);
            match class {
                Class::Ok => result.ok += 1,
                Class::Lost => result.lost += 1,
                Class::Duplicated => result.duplicated += 1,
                Class::Unexpected => result.unexpected += 1,
                Class::StillHeld => result.still_held += 1,
                Class::Parked => result.parked += 1,
            }
            if class != Class::Ok {
                let examples = result
                    .examples
                    .entry(class.as_str().to_owned())
                    .or_default();
                if examples.len() < EXAMPLES {
                    examples.push(format!("{id}: {why}"));
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(n: usize) -> Ledger {
        let mut l = Ledger::new();
        for i in 0..n {
            l.expect(format!("ok-{i}"), Expected::Delivered);
            l.observe(format!("ok-{i}"), Observation::Completed);
        }
        l
    }

    #[test]
    fn a_clean_history_is_valid() {
        let mut l = history(100);
        l.expect("bad-1", Expected::Refused);
        l.observe("bad-1", Observation::Refused);
        let r = l.classify();
        assert_eq!((r.sent, r.ok), (101, 101));
        assert!(r.valid());
        assert!(r.examples.is_empty());
    }

    #[test]
    fn planted_losses_are_found() {
        let mut l = history(50);
        l.expect("gone-1", Expected::Delivered);
        l.expect("gone-2", Expected::Delivered);
        let r = l.classify();
        assert_eq!((r.ok, r.lost), (50, 2));
        assert!(!r.valid());
        assert_eq!(r.examples["lost"].len(), 2);
        assert!(r.examples["lost"][0].starts_with("gone-1"));
    }

    #[test]
    fn planted_duplicates_are_found() {
        let mut l = history(10);
        l.observe("ok-3", Observation::Completed);
        l.observe("ok-7", Observation::Completed);
        l.observe("ok-7", Observation::Completed);
        let r = l.classify();
        assert_eq!((r.ok, r.duplicated), (8, 2));
        assert!(!r.valid());
        assert!(
            r.examples["duplicated"]
                .iter()
                .any(|e| e == "ok-7: completed 3 times")
        );
    }

    #[test]
    fn planted_unexpected_ids_and_outcomes_are_found() {
        let mut l = history(5);
        // An id nobody sent shows up.
        l.observe("stranger", Observation::Completed);
        // An invalid intent is accepted and runs.
        l.expect("bad-run", Expected::Refused);
        l.observe("bad-run", Observation::Completed);
        // An invalid intent is accepted and queued.
        l.expect("bad-queued", Expected::Refused);
        l.observe("bad-queued", Observation::Held("queued".into()));
        // A valid intent is refused.
        l.expect("good-refused", Expected::Delivered);
        l.observe("good-refused", Observation::Refused);
        // A valid intent fails for good.
        l.expect("good-failed", Expected::Delivered);
        l.observe("good-failed", Observation::Failed("dead letter".into()));
        let r = l.classify();
        assert_eq!((r.ok, r.unexpected, r.lost, r.duplicated), (5, 5, 0, 0));
        assert!(!r.valid());
    }

    #[test]
    fn held_ids_are_neither_ok_nor_lost() {
        let mut l = history(3);
        l.expect("waiting", Expected::Delivered);
        l.observe("waiting", Observation::Held("queued".into()));
        let r = l.classify();
        assert_eq!((r.ok, r.still_held, r.lost), (3, 1, 0));
        assert!(
            r.valid(),
            "still held is reported, not a violation by itself"
        );
        assert_eq!(r.examples["still_held"], vec!["waiting: queued".to_owned()]);
    }

    #[test]
    fn reviews_and_the_park_are_told_apart() {
        let mut l = history(2);
        // A review rejected it: it must end rejected and never run.
        l.expect("rejected-ok", Expected::Rejected);
        l.observe("rejected-ok", Observation::Rejected("by chaos".into()));
        l.expect("rejected-ran", Expected::Rejected);
        l.observe("rejected-ran", Observation::Completed);
        l.expect("rejected-waiting", Expected::Rejected);
        l.observe(
            "rejected-waiting",
            Observation::Held("pending_review".into()),
        );
        // An approved one rejected is unexpected.
        l.expect("approved-rejected", Expected::Delivered);
        l.observe("approved-rejected", Observation::Rejected("by x".into()));
        // Shed into the park: neither lost nor held.
        l.expect("shed", Expected::Delivered);
        l.observe("shed", Observation::Parked("shed, in the park".into()));
        l.expect("shed-invalid", Expected::Refused);
        l.observe("shed-invalid", Observation::Parked("shed".into()));
        let r = l.classify();
        assert_eq!(
            (r.ok, r.unexpected, r.still_held, r.parked, r.lost),
            (3, 3, 1, 1, 0),
            "{r:?}"
        );
        assert_eq!(
            r.examples["parked"],
            vec!["shed: shed, in the park".to_owned()]
        );
        assert!(r.summary().contains("parked 1 (replayable, not lost)"));
        let mut only_parked = history(1);
        only_parked.expect("p", Expected::Delivered);
        only_parked.observe("p", Observation::Parked("shed".into()));
        assert!(
            only_parked.classify().valid(),
            "parked is not a violation by itself"
        );
    }

    #[test]
    fn results_add_up() {
        let mut a = history(2).classify();
        let mut l = Ledger::new();
        l.expect("x", Expected::Delivered);
        a.absorb(&l.classify());
        assert_eq!((a.sent, a.ok, a.lost), (3, 2, 1));
        assert_eq!(
            a.summary(),
            "ok 2, lost 1, duplicated 0, unexpected 0, still held 0 (of 3 sent)"
        );
    }
}
