//! Worker ids bound to NATS identities, pure: a worker id belongs to the NATS user that first
//! heartbeats it, and from then on only that user may heartbeat or report under it. A heartbeat
//! or report without identity (published inside bulwark's own account, by a service) is taken
//! as before. The binding outlives the worker: it is kept in the worker registry
//! (`bulwark_workers`) when the worker is declared dead, so nobody takes over the id of a
//! worker that died or hangs. Also the bound on the capacity a heartbeat may claim.

use std::collections::{HashMap, HashSet};

use bulwark_common::identity::Sender;

/// Refusals remembered for narration before the memory is cleared (bounds it under a flood).
const NARRATED_MAX: usize = 1024;

/// What a heartbeat's sender means for its worker id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// Published inside bulwark's account: taken as before, binds nothing.
    Service,
    /// From the user the id is bound to; `first` when this heartbeat bound it.
    Owner {
        /// The user.
        user: String,
        /// This heartbeat made the binding.
        first: bool,
    },
    /// From another user than the one the id is bound to: refused.
    Impostor {
        /// The sender.
        user: String,
        /// The user the id belongs to.
        owner: String,
    },
    /// A new id from a user that already owns `max` ids: refused, so no user can grow the
    /// scheduler's memory (pool, bindings, dead workers) with ever new ids.
    OverLimit {
        /// The sender.
        user: String,
        /// The most ids one user may own.
        max: usize,
    },
}

/// Why a report's sender may not report for its worker id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotYours {
    /// The id is bound to another user.
    Owner {
        /// The sender.
        user: String,
        /// The user the id belongs to.
        owner: String,
    },
    /// No user heartbeated under the id yet (a report before the first heartbeat, or after a
    /// scheduler restart that had not stored the binding): the worker's next heartbeat binds it.
    Unbound {
        /// The sender.
        user: String,
    },
}

/// Worker id -> owning NATS user.
#[derive(Debug)]
pub struct Bindings {
    owners: HashMap<String, String>,
    /// Ids bound per user.
    owned: HashMap<String, usize>,
    /// The most ids a heartbeat may bind to one user.
    max_per_user: usize,
    narrated: HashSet<(String, String)>,
}

impl Default for Bindings {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl Bindings {
    /// No bindings yet; a heartbeat binds at most `max_per_user` ids to one user.
    pub fn new(max_per_user: usize) -> Self {
        Self {
            owners: HashMap::new(),
            owned: HashMap::new(),
            max_per_user,
            narrated: HashSet::new(),
        }
    }

    /// Learns a binding from the registry (kept when the id is already bound in memory: the
    /// first binding wins). The registry's bindings are learned whatever their number.
    pub fn learn(&mut self, worker_id: &str, user: &str) {
        if !user.is_empty() && !self.owners.contains_key(worker_id) {
            self.owners.insert(worker_id.to_owned(), user.to_owned());
            *self.owned.entry(user.to_owned()).or_default() += 1;
        }
    }

    /// The user `worker_id` is bound to.
    pub fn owner(&self, worker_id: &str) -> Option<&str> {
        self.owners.get(worker_id).map(String::as_str)
    }

    /// Judges a heartbeat for `worker_id` from `sender`, binding an unbound id to its sender.
    pub fn heartbeat(&mut self, worker_id: &str, sender: &Sender) -> Heard {
        let Some(user) = sender.user() else {
            return Heard::Service;
        };
        match self.owners.get(worker_id) {
            Some(owner) if owner == user => Heard::Owner {
                user: user.to_owned(),
                first: false,
            },
            Some(owner) => Heard::Impostor {
                user: user.to_owned(),
                owner: owner.clone(),
            },
            None if self.owned.get(user).copied().unwrap_or(0) >= self.max_per_user => {
                Heard::OverLimit {
                    user: user.to_owned(),
                    max: self.max_per_user,
                }
            }
            None => {
                self.owners.insert(worker_id.to_owned(), user.to_owned());
                *self.owned.entry(user.to_owned()).or_default() += 1;
                Heard::Owner {
                    user: user.to_owned(),
                    first: true,
                }
            }
        }
    }

    /// Releases the ids bound to `user` whose workers are gone (`alive` says no): a user at its
    /// limit makes room with them, so a pool restarted under new ids keeps working while no user
    /// holds more than its limit. The released ids, for the caller to forget elsewhere.
    pub fn release_departed(&mut self, user: &str, alive: impl Fn(&str) -> bool) -> Vec<String> {
        let released: Vec<String> = self
            .owners
            .iter()
            .filter(|(id, owner)| owner.as_str() == user && !alive(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &released {
            self.owners.remove(id);
        }
        if let Some(n) = self.owned.get_mut(user) {
            *n = n.saturating_sub(released.len());
        }
        released
    }

    /// Whether `sender` may report for `worker_id`: a service always, an identity only for an
    /// id bound to it.
    pub fn report(&self, worker_id: &str, sender: &Sender) -> Result<(), NotYours> {
        let Some(user) = sender.user() else {
            return Ok(());
        };
        match self.owners.get(worker_id) {
            Some(owner) if owner == user => Ok(()),
            Some(owner) => Err(NotYours::Owner {
                user: user.to_owned(),
                owner: owner.clone(),
            }),
            None => Err(NotYours::Unbound {
                user: user.to_owned(),
            }),
        }
    }

    /// True the first time `user` is refused for `worker_id` (so a refusal repeated every
    /// heartbeat is narrated once, not every time); bounded.
    pub fn first_refusal(&mut self, worker_id: &str, user: &str) -> bool {
        if self.narrated.len() >= NARRATED_MAX {
            self.narrated.clear();
        }
        self.narrated
            .insert((worker_id.to_owned(), user.to_owned()))
    }
}

/// The capacity the scheduler uses for a heartbeat claiming `claimed`: `Err(max)` when the claim
/// is over `max` and clamped to it.
pub fn bounded_capacity(claimed: u32, max: u32) -> Result<u32, u32> {
    if claimed > max { Err(max) } else { Ok(claimed) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_user(user: &str) -> Sender {
        Sender::Identity {
            account: "WORKERS".into(),
            user: user.into(),
        }
    }

    #[test]
    fn the_first_user_to_heartbeat_an_id_owns_it() {
        let mut b = Bindings::default();
        assert_eq!(
            b.heartbeat("w1", &as_user("worker")),
            Heard::Owner {
                user: "worker".into(),
                first: true
            }
        );
        assert_eq!(
            b.heartbeat("w1", &as_user("worker")),
            Heard::Owner {
                user: "worker".into(),
                first: false
            }
        );
        assert_eq!(
            b.heartbeat("w1", &as_user("worker_b")),
            Heard::Impostor {
                user: "worker_b".into(),
                owner: "worker".into()
            }
        );
        assert_eq!(b.owner("w1"), Some("worker"), "a refusal changes nothing");
        // A service's heartbeat is taken and binds nothing.
        assert_eq!(b.heartbeat("w2", &Sender::Service), Heard::Service);
        assert_eq!(b.owner("w2"), None);
    }

    #[test]
    fn reports_come_from_the_owner_or_a_service() {
        let mut b = Bindings::default();
        b.learn("w1", "worker");
        b.learn("w1", "someone_else");
        assert_eq!(b.owner("w1"), Some("worker"), "the first binding wins");
        assert_eq!(b.report("w1", &as_user("worker")), Ok(()));
        assert_eq!(b.report("w1", &Sender::Service), Ok(()));
        assert_eq!(
            b.report("w1", &as_user("worker_b")),
            Err(NotYours::Owner {
                user: "worker_b".into(),
                owner: "worker".into()
            })
        );
        assert_eq!(
            b.report("w9", &as_user("worker")),
            Err(NotYours::Unbound {
                user: "worker".into()
            })
        );
        b.learn("w3", "");
        assert_eq!(b.owner("w3"), None, "an empty user binds nothing");
    }

    #[test]
    fn refusals_are_narrated_once_per_pair() {
        let mut b = Bindings::default();
        assert!(b.first_refusal("w1", "x"));
        assert!(!b.first_refusal("w1", "x"));
        assert!(b.first_refusal("w1", "y"));
        for i in 0..NARRATED_MAX * 2 {
            b.first_refusal(&format!("w{i}"), "flood");
        }
        assert!(b.narrated.len() <= NARRATED_MAX);
    }

    #[test]
    fn capacity_claims_are_bounded() {
        assert_eq!(bounded_capacity(4, 16), Ok(4));
        assert_eq!(bounded_capacity(16, 16), Ok(16));
        assert_eq!(bounded_capacity(4_000_000_000, 16), Err(16));
    }

    #[test]
    fn a_user_binds_at_most_its_limit_of_new_ids() {
        let mut b = Bindings::new(2);
        let w = as_user("worker");
        assert!(matches!(
            b.heartbeat("a", &w),
            Heard::Owner { first: true, .. }
        ));
        assert!(matches!(
            b.heartbeat("b", &w),
            Heard::Owner { first: true, .. }
        ));
        assert_eq!(
            b.heartbeat("c", &w),
            Heard::OverLimit {
                user: "worker".into(),
                max: 2
            }
        );
        // A departed id of its own makes room for a new one.
        assert_eq!(
            b.release_departed("worker", |id| id != "b"),
            vec!["b".to_owned()]
        );
        assert!(matches!(
            b.heartbeat("c", &w),
            Heard::Owner { first: true, .. }
        ));
        assert!(matches!(b.heartbeat("d", &w), Heard::OverLimit { .. }));
        // Its own ids still heartbeat; another user still binds.
        assert!(matches!(
            b.heartbeat("a", &w),
            Heard::Owner { first: false, .. }
        ));
        let other = as_user("worker_b");
        assert!(matches!(
            b.heartbeat("e", &other),
            Heard::Owner { first: true, .. }
        ));
    }
}
