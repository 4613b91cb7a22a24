//! Leader leases with fencing tokens, for the duties that need one actor at a time among a
//! service's replicas (the scheduler's dispatch loop, the clarity chain writer, the storm guard's
//! breaker transitions).
//!
//! A lease is one entry of the KV bucket `bulwark_leases` (key: the duty), holding a
//! [`LeaseRecord`]. Every change is a compare-and-set on the entry's revision:
//!
//! - **Acquire.** A candidate that finds no lease, a released lease, or a lease whose entry has
//!   not changed for `ttl` (measured on the candidate's own monotonic clock, so clocks of
//!   different machines need not agree) writes itself as holder with the next **fencing
//!   token**: the previous token plus one, or above every revision the bucket ever had when
//!   there is no previous lease. Tokens only grow.
//! - **Renew.** The holder rewrites the entry every third of `ttl`. It considers itself leader
//!   until `ttl` (less a tenth) after it *sent* its last successful renewal: a standby starts
//!   its `ttl` only once it has seen that renewal, so the old holder has always stopped before a
//!   standby can take over (if the two clocks run at the same rate).
//! - **Lose.** A renewal refused because the revision changed means another replica took the
//!   lease; a renewal that keeps failing (no JetStream) ends leadership when the local validity
//!   runs out. Either way the replica steps down at once, narrated.
//! - **Release.** On shutdown the holder marks the lease released, so a standby takes over at
//!   its next poll instead of after `ttl`.
//!
//! The token travels with the leader's actions (the scheduler stamps it on the intent records it
//! writes and on the assignments it sends), so a resource that has seen a newer token refuses an
//! older one: a leader paused past its lease cannot act when it wakes up.
//!
//! # Subjects
//! Produces `clarity.narrative.<service>` (`lease_acquired` when a replica takes over from
//! another, `lease_lost`, `lease_released`) through the service's narrator; reads and writes
//! `$KV.bulwark_leases.<duty>`. The first acquisition of a lease nobody held is only logged.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::narrative::Narrator;
use crate::streams;

/// The value of a lease entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The replica holding (or last holding) the lease.
    pub holder: String,
    /// The fencing token of this holder's tenure.
    pub token: u64,
    /// When the holder acquired it.
    pub acquired_at: String,
    /// When the holder last renewed it (informational: expiry is judged on local clocks).
    pub renewed_at: String,
    /// The lease's time to live, in milliseconds.
    pub ttl_ms: u64,
    /// True once the holder gave it up (shutdown, quarantine).
    #[serde(default)]
    pub released: bool,
}

/// What a candidate decides about the entry it just read (pure; see [`Observer::decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it: acquire now.
    Acquire,
    /// Someone holds it and it changed less than `ttl` ago: wait.
    Wait,
}

/// A candidate's memory of the lease entry: which revision it saw, and since when (pure).
#[derive(Debug, Clone)]
pub struct Observer {
    ttl: Duration,
    seen: Option<(u64, Instant)>,
}

impl Observer {
    /// A candidate for a lease of `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, seen: None }
    }

    /// Decides from the entry read at `now`: `None` when there is no entry, else its revision
    /// and whether it is released. A held lease expires when the same revision has been seen
    /// for `ttl`.
    pub fn decide(&mut self, entry: Option<(u64, bool)>, now: Instant) -> Decision {
        let Some((revision, released)) = entry else {
            self.seen = None;
            return Decision::Acquire;
        };
        if released {
            return Decision::Acquire;
        }
        match self.seen {
            Some((seen, since)) if seen == revision => {
                if now.duration_since(since) >= self.ttl {
                    Decision::Acquire
                } else {
                    Decision::Wait
                }
            }
            _ => {
                self.seen = Some((revision, now));
                Decision::Wait
            }
        }
    }

    /// Time left until the lease seen would expire (for narration), if one is seen.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.seen
            .map(|(_, since)| self.ttl.saturating_sub(now.duration_since(since)))
    }
}

/// What this replica currently is for the duty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It holds the lease under `token`.
    Leader {
        /// The fencing token.
        token: u64,
    },
    /// Another replica (or nobody) holds it.
    Standby {
        /// The holder seen last, if any.
        leader: Option<String>,
        /// Its token.
        token: u64,
    },
}

#[derive(Debug)]
struct Shared {
    role: Role,
    /// Until when this replica may act as leader (local monotonic clock).
    valid_until: Option<Instant>,
}

/// A replica's view of one lease: whether it leads, under which token, and notification when
/// that changes. Cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    duty: String,
    holder: String,
    shared: Arc<Mutex<Shared>>,
    changes: watch::Receiver<Option<u64>>,
}

impl Leadership {
    /// The fencing token when this replica leads and its lease is valid by its own clock now;
    /// `None` otherwise. Check it right before every leader action.
    pub fn token(&self) -> Option<u64> {
        let shared = self.lock();
        match (&shared.role, shared.valid_until) {
            (Role::Leader { token }, Some(until)) if Instant::now() < until => Some(*token),
            _ => None,
        }
    }

    /// True when [`token`](Self::token) is `Some`.
    pub fn is_leader(&self) -> bool {
        self.token().is_some()
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.lock().role.clone()
    }

    /// The duty this lease is for.
    pub fn duty(&self) -> &str {
        &self.duty
    }

    /// This replica's holder name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// A receiver that changes whenever leadership is gained (`Some(token)`) or lost (`None`).
    pub fn watch(&self) -> watch::Receiver<Option<u64>> {
        self.changes.clone()
    }

    /// Waits until this replica leads (or `shutdown`); returns the token.
    pub async fn until_leader(&self, shutdown: &CancellationToken) -> Option<u64> {
        let mut changes = self.watch();
        loop {
            if let Some(token) = *changes.borrow_and_update() {
                return Some(token);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                changed = changes.changed() => if changed.is_err() { return None },
            }
        }
    }

    /// Waits until this replica stops leading (or `shutdown`).
    pub async fn until_not_leader(&self, shutdown: &CancellationToken) {
        let mut changes = self.watch();
        loop {
            if changes.borrow_and_update().is_none() {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens the lease bucket (created with the configured replica count when missing).
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store, streams::StoreError> {
    streams::bucket(
        js,
        streams::LEASES_BUCKET,
        "bulwark leader leases: holder and fencing token per single-actor duty",
    )
    .await
}

/// This process's name as a holder of `service`'s lease: `<service>@<host>/<pid>/<random>`
/// (the random part tells two runs of one process id apart).
pub fn holder_name(service: &str) -> String {
    format!(
        "{service}@{}/{}/{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned()),
        std::process::id(),
        &crate::ids::new_id()[28..]
    )
}

/// The usual election of a service's replicas: opens the lease bucket and takes part in the
/// election for the duty `service` under [`holder_name`], transitions narrated by a narrator
/// of `service` at that holder. Returns the holder name with [`spawn`]'s result.
pub async fn elect(
    js: &jetstream::Context,
    service: &str,
    ttl: Duration,
    shutdown: CancellationToken,
) -> Result<(String, Leadership, tokio::task::JoinHandle<()>), streams::StoreError> {
    let holder = holder_name(service);
    let store = bucket(js).await?;
    let narrator = Narrator::new(js.clone(), service, &holder);
    let (leadership, elector) = spawn(store, js.clone(), service, &holder, ttl, narrator, shutdown);
    Ok((holder, leadership, elector))
}

/// Takes part in the election for `duty` as `holder` until `shutdown` (then releases the lease
/// if held). Transitions are narrated with `narrator`. Returns at once; the returned
/// [`Leadership`] follows the election.
pub fn spawn(
    store: kv::Store,
    js: jetstream::Context,
    duty: &str,
    holder: &str,
    ttl: Duration,
    narrator: Narrator,
    shutdown: CancellationToken,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let leadership = Leadership {
        duty: duty.to_owned(),
        holder: holder.to_owned(),
        shared: Arc::new(Mutex::new(Shared {
            role: Role::Standby {
                leader: None,
                token: 0,
            },
            valid_until: None,
        })),
        changes: rx,
    };
    let elector = Elector {
        store,
        js,
        duty: duty.to_owned(),
        holder: holder.to_owned(),
        ttl,
        narrator,
        leadership: leadership.clone(),
        tx,
    };
    let handle = tokio::spawn(elector.run(shutdown));
    (leadership, handle)
}

struct Elector {
    store: kv::Store,
    js: jetstream::Context,
    duty: String,
    holder: String,
    ttl: Duration,
    narrator: Narrator,
    leadership: Leadership,
    tx: watch::Sender<Option<u64>>,
}

/// The lease as this replica holds it.
struct Held {
    token: u64,
    revision: u64,
    acquired_at: String,
}

impl Elector {
    async fn run(self, shutdown: CancellationToken) {
        let renew_every = self.ttl / 3;
        let poll_every = (self.ttl / 5).max(Duration::from_millis(50));
        let mut observer = Observer::new(self.ttl);
        let mut held: Option<Held> = None;
        let mut waiting_narrated: Option<String> = None;
        let mut first = true;
        loop {
            let pause = if held.is_some() {
                renew_every
            } else {
                poll_every
            };
            if !first {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            first = false;
            match held.take() {
                Some(h) => held = self.renew(h).await,
                None => {
                    held = self.try_acquire(&mut observer, &mut waiting_narrated).await;
                }
            }
        }
        if let Some(h) = held {
            self.release(h).await;
        }
        self.set_role(
            Role::Standby {
                leader: None,
                token: 0,
            },
            None,
        );
    }

    fn set_role(&self, role: Role, valid_until: Option<Instant>) {
        let token = match role {
            Role::Leader { token } => Some(token),
            Role::Standby { .. } => None,
        };
        {
            let mut shared = self.leadership.lock();
            shared.role = role;
            shared.valid_until = valid_until;
        }
        self.tx.send_if_modified(|current| {
            let changed = *current != token;
            *current = token;
            changed
        });
    }

    fn record(&self, token: u64, acquired_at: &str, released: bool) -> bytes::Bytes {
        crate::api::to_bytes(&LeaseRecord {
            holder: self.holder.clone(),
            token,
            acquired_at: acquired_at.to_owned(),
            renewed_at: crate::time::now(),
            ttl_ms: self.ttl.as_millis() as u64,
            released,
        })
    }

    /// One standby step: read the entry, and acquire when the observer says so.
    async fn try_acquire(
        &self,
        observer: &mut Observer,
        waiting_narrated: &mut Option<String>,
    ) -> Option<Held> {
        let entry = match self.store.entry(&self.duty).await {
            Ok(entry) => entry,
            Err(err) => {
                tracing::debug!(duty = %self.duty, error = %err, "lease: cannot read");
                return None;
            }
        };
        let current = entry.as_ref().and_then(|e| {
            if e.operation != kv::Operation::Put {
                return None;
            }
            Some((
                e.revision,
                serde_json::from_slice::<LeaseRecord>(&e.value).ok(),
            ))
        });
        let now = Instant::now();
        let decision = observer.decide(
            current
                .as_ref()
                .map(|(rev, rec)| (*rev, rec.as_ref().is_none_or(|r| r.released))),
            now,
        );
        let previous = current.as_ref().and_then(|(_, r)| r.clone());
        if decision == Decision::Wait {
            if let Some(prev) = &previous {
                self.set_role(
                    Role::Standby {
                        leader: Some(prev.holder.clone()),
                        token: prev.token,
                    },
                    None,
                );
                if waiting_narrated.as_deref() != Some(prev.holder.as_str()) {
                    *waiting_narrated = Some(prev.holder.clone());
                    tracing::info!(duty = %self.duty, holder = %self.holder, leader = %prev.holder,
                        token = prev.token, "lease held by another replica; standing by");
                }
            }
            return None;
        }
        let acquired_at = crate::time::now();
        let sent = Instant::now();
        let (written, token) = match &current {
            Some((revision, record)) => {
                let token = record.as_ref().map_or(*revision, |r| r.token) + 1;
                let body = self.record(token, &acquired_at, false);
                (
                    self.store.update(&self.duty, body, *revision).await.ok(),
                    token,
                )
            }
            None => {
                let token = match self.highest_revision().await {
                    Some(rev) => rev + 1,
                    None => return None,
                };
                let body = self.record(token, &acquired_at, false);
                (self.store.create(&self.duty, body).await.ok(), token)
            }
        };
        let revision = written?;
        self.set_role(Role::Leader { token }, Some(sent + self.validity()));
        *waiting_narrated = None;
        tracing::info!(duty = %self.duty, holder = %self.holder, token, "lease acquired");
        if previous.is_none() {
            // Nobody held it (a fresh system): no failover to explain.
            return Some(Held {
                token,
                revision,
                acquired_at,
            });
        }
        let mut n = self
            .narrator
            .narrative(
                "lease_acquired",
                "leader lease in KV bucket bulwark_leases (compare-and-set)",
            )
            .why(format!(
                "{} now leads {} under fencing token {token}",
                self.holder, self.duty
            ));
        n = match &previous {
            Some(prev) if prev.released => n.why(format!(
                "{} released the lease (token {})",
                prev.holder, prev.token
            )),
            Some(prev) => n.why(format!(
                "{} did not renew it for {:.1} s (the lease's ttl): presumed dead or paused",
                prev.holder,
                self.ttl.as_secs_f64()
            )),
            None => n.why("nobody held it".to_owned()),
        };
        n = n
            .why(format!(
                "actions under older tokens are refused from now on; renewed every {:.1} s",
                (self.ttl / 3).as_secs_f64()
            ))
            .context(
                json!({"duty": self.duty, "holder": self.holder, "token": token,
                            "previous_holder": previous.as_ref().map(|p| p.holder.clone()),
                            "previous_token": previous.as_ref().map(|p| p.token),
                            "previous_released": previous.as_ref().map(|p| p.released),
                            "ttl_s": self.ttl.as_secs_f64()}),
            );
        self.narrator.publish(n).await;
        Some(Held {
            token,
            revision,
            acquired_at,
        })
    }

    /// How long a renewal keeps this replica leader: the ttl less a tenth.
    fn validity(&self) -> Duration {
        self.ttl - self.ttl / 10
    }

    /// The highest revision the lease bucket ever had (fresh from the server).
    async fn highest_revision(&self) -> Option<u64> {
        let name = format!("KV_{}", streams::LEASES_BUCKET);
        let mut stream = self.js.get_stream(&name).await.ok()?;
        stream.info().await.ok().map(|i| i.state.last_sequence)
    }

    /// One leader step: renew, or step down.
    async fn renew(&self, held: Held) -> Option<Held> {
        let sent = Instant::now();
        let body = self.record(held.token, &held.acquired_at, false);
        match self.store.update(&self.duty, body, held.revision).await {
            Ok(revision) => {
                self.set_role(
                    Role::Leader { token: held.token },
                    Some(sent + self.validity()),
                );
                Some(Held { revision, ..held })
            }
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                let taken_by = self
                    .store
                    .entry(&self.duty)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|e| serde_json::from_slice::<LeaseRecord>(&e.value).ok());
                self.step_down(
                    &held,
                    format!(
                        "the lease changed under it: {}",
                        match &taken_by {
                            Some(r) => format!("{} holds it under token {}", r.holder, r.token),
                            None => "it was removed".to_owned(),
                        }
                    ),
                    taken_by,
                )
                .await;
                None
            }
            Err(err) => {
                let still_valid = self.leadership.token().is_some();
                if still_valid {
                    tracing::warn!(duty = %self.duty, error = %err, "lease renewal failed; retrying while the lease is valid");
                    return Some(held);
                }
                self.step_down(
                    &held,
                    format!("it could not renew the lease before it ran out ({err})"),
                    None,
                )
                .await;
                None
            }
        }
    }

    async fn step_down(&self, held: &Held, why: String, taken_by: Option<LeaseRecord>) {
        self.set_role(
            Role::Standby {
                leader: taken_by.as_ref().map(|r| r.holder.clone()),
                token: taken_by.as_ref().map_or(held.token, |r| r.token),
            },
            None,
        );
        tracing::warn!(duty = %self.duty, holder = %self.holder, token = held.token, %why, "lease lost");
        let n = self
            .narrator
            .narrative("lease_lost", "leader lease in KV bucket bulwark_leases")
            .why(format!(
                "{} stops leading {} (token {}): {why}",
                self.holder, self.duty, held.token
            ))
            .why("it takes no leader action from now on; a late one under this token is refused")
            .context(
                json!({"duty": self.duty, "holder": self.holder, "token": held.token,
                            "new_holder": taken_by.as_ref().map(|r| r.holder.clone()),
                            "new_token": taken_by.as_ref().map(|r| r.token)}),
            );
        self.narrator.publish(n).await;
    }

    async fn release(&self, held: Held) {
        self.set_role(
            Role::Standby {
                leader: None,
                token: held.token,
            },
            None,
        );
        let body = self.record(held.token, &held.acquired_at, true);
        let released = tokio::time::timeout(
            Duration::from_secs(2),
            self.store.update(&self.duty, body, held.revision),
        )
        .await;
        if !matches!(released, Ok(Ok(_))) {
            tracing::debug!(duty = %self.duty, "lease not released; a standby waits for its ttl");
            return;
        }
        let n = self
            .narrator
            .narrative("lease_released", "leader lease in KV bucket bulwark_leases")
            .why(format!(
                "{} gives up the {} lease (token {}): it is stopping",
                self.holder, self.duty, held.token
            ))
            .why("a standby takes over at its next poll, without waiting for the ttl")
            .context(json!({"duty": self.duty, "holder": self.holder, "token": held.token}));
        self.narrator.publish(n).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_expires_only_after_ttl_of_the_same_revision() {
        let ttl = Duration::from_secs(10);
        let mut o = Observer::new(ttl);
        let t0 = Instant::now();
        assert_eq!(o.decide(None, t0), Decision::Acquire, "no entry");
        assert_eq!(
            o.decide(Some((5, false)), t0),
            Decision::Wait,
            "first sight"
        );
        assert_eq!(
            o.decide(Some((5, false)), t0 + Duration::from_secs(9)),
            Decision::Wait
        );
        // A renewal resets the clock.
        assert_eq!(
            o.decide(Some((6, false)), t0 + Duration::from_secs(9)),
            Decision::Wait
        );
        assert_eq!(
            o.decide(Some((6, false)), t0 + Duration::from_secs(18)),
            Decision::Wait
        );
        assert_eq!(
            o.decide(Some((6, false)), t0 + Duration::from_secs(19)),
            Decision::Acquire
        );
        assert_eq!(
            o.decide(Some((7, true)), t0 + Duration::from_secs(19)),
            Decision::Acquire,
            "released"
        );
    }
}
