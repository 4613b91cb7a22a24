//! The worker registry: KV bucket `bulwark_workers`, one entry per worker the leading scheduler
//! has heard from, with the run id of its heartbeats. The pool itself lives in memory and is fed
//! by heartbeats; the registry is what a scheduler that takes over (a restart, a failover)
//! learns from about workers it never heard: one that died while no scheduler watched is still
//! declared dead after `heartbeat_timeout_s` (and its tasks reassigned), and one that came back
//! under the same id is recognised as a new run. Written only when membership changes (a new
//! worker or run, a new binding, a worker declared dead), never per heartbeat.
//!
//! Each entry also holds the NATS user the worker id is bound to ([`crate::bindings`]). A worker
//! declared dead keeps its entry, marked `departed`, when its id is bound: the binding outlives
//! the worker, so nobody takes over the id of a dead or hung worker (delete the key with
//! `nats kv del bulwark_workers <id>` to release an id for good).

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

use bulwark_common::kv::{self as kvx, KvError};
use bulwark_common::streams::{self, StoreError};

/// Name of the registry bucket.
pub const WORKERS_BUCKET: &str = "bulwark_workers";

/// One worker as last recorded by a leading scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sighting {
    /// The worker.
    pub worker_id: String,
    /// The run id of its heartbeats (absent for workers that do not send one).
    #[serde(default)]
    pub run_id: Option<String>,
    /// When this run was first heard from, RFC 3339 UTC.
    pub since: String,
    /// The NATS user the worker id is bound to (absent for a worker heard only from inside
    /// bulwark's account, and in entries written before bindings existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Declared dead: kept only for its binding, not expected back at a takeover.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub departed: bool,
}

/// The registry bucket.
#[derive(Clone)]
pub struct Registry {
    store: kv::Store,
}

impl Registry {
    /// Opens the bucket, creating it when missing.
    pub async fn open(js: &jetstream::Context) -> Result<Self, StoreError> {
        let store = streams::bucket(
            js,
            WORKERS_BUCKET,
            "bulwark worker registry: the workers a leading scheduler has heard from",
        )
        .await?;
        Ok(Self { store })
    }

    /// Records `sighting` (a new worker, or a new run of a known one).
    pub async fn record(&self, sighting: &Sighting) -> Result<(), KvError> {
        let bytes = serde_json::to_vec(sighting).map_err(|e| KvError::Corrupt {
            key: sighting.worker_id.clone(),
            reason: e.to_string(),
        })?;
        self.store
            .put(&sighting.worker_id, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| KvError::Unavailable(e.to_string()))
    }

    /// A worker declared dead: its entry is kept, `departed`, when its id is bound to `owner`
    /// (the binding outlives it), removed otherwise.
    pub async fn forget(&self, worker_id: &str, owner: Option<&str>) -> Result<(), KvError> {
        match owner {
            Some(user) => {
                self.record(&Sighting {
                    worker_id: worker_id.to_owned(),
                    run_id: None,
                    since: bulwark_common::time::now(),
                    user: Some(user.to_owned()),
                    departed: true,
                })
                .await
            }
            None => self
                .store
                .delete(worker_id)
                .await
                .map_err(|e| KvError::Unavailable(e.to_string())),
        }
    }

    /// Every recorded worker. An entry that cannot be read is skipped with a warning (it is
    /// rewritten at the worker's next heartbeat).
    pub async fn load(&self) -> Result<Vec<Sighting>, KvError> {
        let mut out = Vec::new();
        for key in kvx::keys(&self.store).await? {
            match kvx::read::<Sighting>(&self.store, &key).await {
                Ok(Some(v)) => out.push(v.value),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(worker_id = %key, error = %err, "worker registry entry unreadable; skipped")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_before_bindings_still_read() {
        let old: Sighting = serde_json::from_str(
            r#"{"worker_id":"w1","run_id":"r","since":"2026-01-01T00:00:00Z"}"#,
        )
        .expect("an old entry reads");
        assert_eq!(old.user, None);
        assert!(!old.departed);
        let new = Sighting {
            user: Some("worker".into()),
            departed: true,
            ..old
        };
        let text = serde_json::to_string(&new).expect("json");
        assert!(text.contains(r#""user":"worker""#) && text.contains(r#""departed":true"#));
        let back: Sighting = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, new);
    }
}
