//! The stranded-intent ledger: which intent records must be checked for an unfinished
//! routing, and which could not be finished in time.
//!
//! An intent is accepted in two writes: its record, then what the record's status promises (the
//! task of a queued intent, the review item of one pending review, the proposal of one pending a
//! vote). A governance instance that dies between the two leaves a record that nothing will ever
//! move: a *stranded* intent. The reconciler reads every write of the intents bucket; this ledger
//! keeps the records whose newest write left them waiting (queued, pending review, pending vote)
//! and says when each is due for a check: once, `grace` after that write, so that the intake that
//! wrote it has had time to finish. A check re-performs the promised write idempotently (the task
//! is deduplicated by the intent id within the task queue's duplicate window, review items and
//! proposals are created only when missing). A record that still has not been checked
//! successfully when it leaves the `window` is reported as stranded, to be failed clearly.
//!
//! The ledger is plain data (no I/O), bounded by `max_tracked`, and property-tested below.

use std::collections::{BTreeSet, HashMap};

use bulwark_common::intent::IntentStatus;

/// One tracked record: its newest write that left it waiting.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Stream sequence (KV revision) of the write.
    pub revision: u64,
    /// The status it was written with.
    pub status: IntentStatus,
    /// When the server stored the write, in Unix milliseconds.
    pub written_ms: i64,
    /// A check found (or made) everything the status promises.
    pub checked: bool,
}

/// What [`Ledger::expire`] hands back.
#[derive(Debug, Default, PartialEq)]
pub struct Expired {
    /// Records never checked successfully within the window: stranded.
    pub stranded: Vec<(String, Entry)>,
    /// Checked records that merely aged out.
    pub aged_out: usize,
}

/// The records whose newest write left them waiting, by intent id.
#[derive(Debug)]
pub struct Ledger {
    entries: HashMap<String, Entry>,
    /// `(written_ms, key)` of every entry, oldest first.
    by_age: BTreeSet<(i64, String)>,
    max_tracked: usize,
    /// Entries dropped because the ledger was full (oldest first).
    pub evicted: u64,
}

/// True for the statuses whose promise a crash may have left unkept.
pub fn waiting(status: IntentStatus) -> bool {
    matches!(
        status,
        IntentStatus::Queued | IntentStatus::PendingReview | IntentStatus::PendingVote
    )
}

impl Ledger {
    /// An empty ledger holding at most `max_tracked` records (at least 1).
    pub fn new(max_tracked: usize) -> Self {
        Self {
            entries: HashMap::new(),
            by_age: BTreeSet::new(),
            max_tracked: max_tracked.max(1),
            evicted: 0,
        }
    }

    /// Records tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes one write of record `key`: `status` is `None` for a delete or purge. A waiting
    /// status is tracked (unchecked: this write's promise is new); any other forgets the key.
    /// An older write seen after a newer one is ignored.
    pub fn observe(
        &mut self,
        key: &str,
        revision: u64,
        status: Option<IntentStatus>,
        written_ms: i64,
    ) {
        if self
            .entries
            .get(key)
            .is_some_and(|e| e.revision >= revision)
        {
            return;
        }
        self.forget(key);
        let Some(status) = status.filter(|s| waiting(*s)) else {
            return;
        };
        while self.entries.len() >= self.max_tracked {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
            self.evicted += 1;
        }
        self.by_age.insert((written_ms, key.to_owned()));
        self.entries.insert(
            key.to_owned(),
            Entry {
                revision,
                status,
                written_ms,
                checked: false,
            },
        );
    }

    /// The unchecked records written at least `grace_ms` before `now_ms`, oldest first, with
    /// the revision a check must still find.
    pub fn due(&self, now_ms: i64, grace_ms: i64) -> Vec<(String, u64)> {
        self.by_age
            .iter()
            .take_while(|(at, _)| now_ms.saturating_sub(*at) >= grace_ms)
            .filter_map(|(_, key)| {
                let e = &self.entries[key];
                (!e.checked).then(|| (key.clone(), e.revision))
            })
            .collect()
    }

    /// Marks `key` checked, if its newest write is still `revision`.
    pub fn mark_checked(&mut self, key: &str, revision: u64) {
        if let Some(e) = self.entries.get_mut(key)
            && e.revision == revision
        {
            e.checked = true;
        }
    }

    /// Removes every record written more than `window_ms` before `now_ms`.
    pub fn expire(&mut self, now_ms: i64, window_ms: i64) -> Expired {
        let mut out = Expired::default();
        while let Some((at, _)) = self.by_age.first() {
            if now_ms.saturating_sub(*at) <= window_ms {
                break;
            }
            let Some((_, key)) = self.by_age.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&key) {
                if entry.checked {
                    out.aged_out += 1;
                } else {
                    out.stranded.push((key, entry));
                }
            }
        }
        out
    }

    fn forget(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            self.by_age.remove(&(old.written_ms, key.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GRACE: i64 = 10_000;
    const WINDOW: i64 = 100_000;

    #[test]
    fn a_waiting_record_is_due_once_after_its_grace() {
        let mut l = Ledger::new(10);
        l.observe("a", 1, Some(IntentStatus::Queued), 0);
        assert!(l.due(GRACE - 1, GRACE).is_empty(), "not before the grace");
        assert_eq!(l.due(GRACE, GRACE), vec![("a".to_owned(), 1)]);
        l.mark_checked("a", 1);
        assert!(l.due(GRACE * 2, GRACE).is_empty(), "checked: never again");
        let expired = l.expire(WINDOW + 1, WINDOW);
        assert_eq!(expired.aged_out, 1);
        assert!(expired.stranded.is_empty());
        assert!(l.is_empty());
    }

    #[test]
    fn a_record_that_moves_on_is_forgotten_and_one_never_checked_is_stranded() {
        let mut l = Ledger::new(10);
        l.observe("moved", 1, Some(IntentStatus::Queued), 0);
        l.observe("moved", 2, Some(IntentStatus::Dispatched), 5);
        l.observe("stuck", 3, Some(IntentStatus::PendingReview), 0);
        let expired = l.expire(WINDOW + 1, WINDOW);
        assert_eq!(expired.stranded.len(), 1);
        assert_eq!(expired.stranded[0].0, "stuck");
    }

    #[test]
    fn a_check_of_an_older_revision_does_not_count() {
        let mut l = Ledger::new(10);
        l.observe("a", 1, Some(IntentStatus::PendingVote), 0);
        l.observe("a", 4, Some(IntentStatus::Queued), 1);
        l.mark_checked("a", 1);
        assert_eq!(l.due(GRACE + 1, GRACE), vec![("a".to_owned(), 4)]);
        // A late copy of the first write changes nothing.
        l.observe("a", 1, Some(IntentStatus::PendingVote), 0);
        assert_eq!(l.due(GRACE + 1, GRACE), vec![("a".to_owned(), 4)]);
    }

    proptest! {
        /// Whatever the writes, the ledger stays within its bound, its two indexes agree, a
        /// record is due only when unchecked and past its grace, and every tracked record
        /// leaves by `expire` exactly once (aged out or stranded).
        #[test]
        fn bounded_consistent_and_every_record_leaves_once(
            writes in prop::collection::vec((0u8..20, 0u8..9, 0i64..200_000), 0..200),
            checks in prop::collection::vec(0u8..20, 0..50),
            max in 1usize..30,
        ) {
            let statuses = [
                IntentStatus::PendingReview, IntentStatus::PendingVote, IntentStatus::Rejected,
                IntentStatus::Queued, IntentStatus::Dispatched, IntentStatus::Running,
                IntentStatus::Completed, IntentStatus::Failed, IntentStatus::Shed,
            ];
            let mut l = Ledger::new(max);
            for (rev, (key, status, at)) in writes.iter().enumerate() {
                l.observe(&format!("k{key}"), rev as u64 + 1, Some(statuses[*status as usize]), *at);
                prop_assert!(l.len() <= max);
                prop_assert_eq!(l.entries.len(), l.by_age.len());
            }
            for key in checks {
                let key = format!("k{key}");
                if let Some(rev) = l.entries.get(&key).map(|e| e.revision) {
                    l.mark_checked(&key, rev);
                }
            }
            let now = 150_000;
            for (key, rev) in l.due(now, GRACE) {
                let e = &l.entries[&key];
                prop_assert!(!e.checked && e.revision == rev && now - e.written_ms >= GRACE);
                prop_assert!(waiting(e.status));
            }
            let tracked = l.len();
            let first = l.expire(now, WINDOW);
            let second = l.expire(i64::MAX, WINDOW);
            prop_assert_eq!(
                first.aged_out + first.stranded.len() + second.aged_out + second.stranded.len(),
                tracked
            );
            prop_assert!(l.is_empty());
        }
    }
}
