//! Identity limits: stored in `bulwark_mesh_limits` (key `identity=<identity>`), announced on
//! `mesh.advisory.identity_limited` / `mesh.advisory.identity_lifted`, narrated and counted.
//! Only the lease holder writes and announces them (every replica counts).

use std::sync::atomic::Ordering;

use async_nats::jetstream::kv;
use futures::StreamExt;
use serde_json::json;

use bulwark_common::envelope::MeshEvent;
use bulwark_common::mesh::{self, IdentityLimit};
use bulwark_common::{api, time};

use super::{SERVICE_NAME, StormGuard};
use crate::budget::{IdentityBudgets, LimitChange, LimitStart};

/// Takes the identity limits stored before a restart (so they are lifted, and their keys
/// deleted, when due); an unreadable entry is skipped with a warning.
pub(super) async fn restore(bucket: &kv::Store, budgets: &mut IdentityBudgets) {
    let Ok(mut keys) = bucket.keys().await else {
        return;
    };
    while let Some(Ok(key)) = keys.next().await {
        if !key.starts_with(mesh::IDENTITY_LIMIT_PREFIX) {
            continue;
        }
        let Ok(Some(value)) = bucket.get(&key).await else {
            continue;
        };
        match serde_json::from_slice::<IdentityLimit>(&value) {
            Ok(limit) => budgets.restore(&limit.identity, limit.since_ms, limit.until_ms),
            Err(err) => {
                tracing::warn!(%key, error = %err, "storm guard: stored identity limit unreadable; skipped")
            }
        }
    }
}

impl StormGuard {
    fn identity_record(
        &self,
        identity: &str,
        since_ms: i64,
        until_ms: i64,
        count: u64,
    ) -> IdentityLimit {
        IdentityLimit {
            identity: identity.to_owned(),
            since_ms,
            until_ms,
            event_count: count,
            budget: self.cfg.identity_budget,
            window_s: self.cfg.identity_window_s,
            set_by: self.instance.clone(),
            reason: format!(
                "{count} events in {} s, above the budget of {} per identity",
                self.cfg.identity_window_s, self.cfg.identity_budget
            ),
        }
    }

    /// Stores `record` under its identity's key; false (counted, logged) when it is not stored.
    async fn store_identity_limit(&self, record: &IdentityLimit) -> bool {
        let Some(key) = mesh::identity_limit_key(&record.identity) else {
            self.counters
                .identity_limit_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(identity = %record.identity, "storm guard: no limit key can name this identity; its events are still kept from the breaker");
            return false;
        };
        match self.limits.put(&key, api::to_bytes(record)).await {
            Ok(_) => true,
            Err(err) => {
                self.counters
                    .identity_limit_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(identity = %record.identity, error = %err, "storm guard: identity limit not stored");
                false
            }
        }
    }

    /// Stores, announces (once) and narrates a new identity limit.
    pub(super) async fn announce_identity_limit(&self, start: LimitStart) {
        self.counters
            .identity_limits
            .fetch_add(1, Ordering::Relaxed);
        let record =
            self.identity_record(&start.identity, start.since_ms, start.until_ms, start.count);
        let stored = self.store_identity_limit(&record).await;
        let figures = json!({"identity": start.identity, "event_count": start.count,
                             "budget": self.cfg.identity_budget, "window_s": self.cfg.identity_window_s,
                             "cooldown_s": self.cfg.identity_cooldown_s,
                             "since": time::format_ms(start.since_ms), "until": time::format_ms(start.until_ms),
                             "reason": record.reason, "stored": stored});
        let advisory = MeshEvent::root("advisory.identity_limited", SERVICE_NAME, figures.clone());
        self.publish(
            &advisory,
            format!("identity_limited:{}:{}", start.identity, start.since_ms),
        )
        .await;
        let n = self
            .narrator
            .narrative(
                "identity_limited",
                "per-identity budget over a sliding window, checked on every event",
            )
            .why(format!(
                "{} published {} mesh events in the last {} s, above its budget of {}",
                start.identity, start.count, self.cfg.identity_window_s, self.cfg.identity_budget
            ))
            .why(format!(
                "its further events are held by every mesh consumer (stored, delivered in order once the limit lifts, at the earliest in {} s) and not counted towards the global breaker",
                self.cfg.identity_cooldown_s
            ))
            .why("other identities' and the services' events keep flowing")
            .context(figures);
        self.narrator.publish(n).await;
    }

    /// Stores an extension or lifts a limit (deletes its key), announcing and narrating a lift.
    pub(super) async fn announce_identity_change(&self, change: LimitChange) {
        match change {
            LimitChange::Extended {
                identity,
                since_ms,
                until_ms,
                held,
            } => {
                self.counters
                    .identity_limit_extensions
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(%identity, held, until = %time::format_ms(until_ms), "storm guard: identity still over its budget; limit extended");
                let record = self.identity_record(&identity, since_ms, until_ms, held);
                self.store_identity_limit(&record).await;
            }
            LimitChange::Lifted {
                identity,
                since_ms,
                at_ms,
                held,
            } => {
                self.lift_identity_limit(&identity, since_ms, at_ms, held)
                    .await
            }
        }
    }

    async fn lift_identity_limit(&self, identity: &str, since_ms: i64, at_ms: i64, held: u64) {
        self.counters
            .identity_limits_lifted
            .fetch_add(1, Ordering::Relaxed);
        if let Some(key) = mesh::identity_limit_key(identity)
            && let Err(err) = self.limits.delete(&key).await
        {
            // The record lapses by itself at its until_ms; consumers stop obeying it then.
            self.counters
                .identity_limit_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%identity, error = %err, "storm guard: identity limit not deleted; it lapses at its end");
        }
        let figures = json!({"identity": identity, "since": time::format_ms(since_ms),
                             "lifted": time::format_ms(at_ms), "held": held,
                             "budget": self.cfg.identity_budget, "window_s": self.cfg.identity_window_s});
        let advisory = MeshEvent::root("advisory.identity_lifted", SERVICE_NAME, figures.clone());
        self.publish(&advisory, format!("identity_lifted:{identity}:{since_ms}"))
            .await;
        let n = self
            .narrator
            .narrative("identity_limit_lifted", "per-identity budget over a sliding window")
            .why(format!(
                "{identity} stayed within its budget of {} events in {} s",
                self.cfg.identity_budget, self.cfg.identity_window_s
            ))
            .why(format!(
                "{held} of its events were held while the limit lasted; mesh consumers deliver them now, in order"
            ))
            .context(figures);
        self.narrator.publish(n).await;
    }
}
