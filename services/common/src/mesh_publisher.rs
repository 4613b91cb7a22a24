//! Publishing on the trigger mesh the way a well-behaved component does: every event is stored
//! in `BULWARK_MESH` with an acknowledgement (deduplicated by `event_id`), and throttle
//! advisories from the storm guard are honoured: when `mesh.advisory.throttle` names this
//! publisher's `source`, its events of that type are paced to `limit_per_second` for the
//! advisory's `for_s` (or `throttle_for` when it gives none), delayed rather than dropped.
//!
//! # Subjects
//! Consumes `mesh.advisory.throttle`. Produces `mesh.<event_type>` (JetStream).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use serde_json::Value;
use tokio::time::Instant;

use crate::envelope::MeshEvent;
use crate::subjects;

/// Why an event was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// JetStream refused or did not acknowledge it.
    #[error("mesh event {event_id} not stored: {reason}")]
    NotStored {
        /// The event.
        event_id: String,
        /// Why.
        reason: String,
    },
    /// The advisory subscription could not be made.
    #[error("cannot follow throttle advisories: {0}")]
    Subscribe(String),
}

/// A throttle in force for one event type.
#[derive(Debug, Clone, Copy)]
struct Throttle {
    interval: Duration,
    next_slot: Instant,
    until: Instant,
}

/// Counters of a publisher.
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Events stored.
    pub published: AtomicU64,
    /// Events that waited for their slot because of a throttle advisory.
    pub delayed: AtomicU64,
    /// Throttle advisories that named this publisher.
    pub advisories: AtomicU64,
}

/// A mesh publisher for one `source`.
#[derive(Clone)]
pub struct MeshPublisher {
    js: jetstream::Context,
    source: String,
    throttles: Arc<Mutex<HashMap<String, Throttle>>>,
    stats: Arc<PublisherStats>,
}

impl MeshPublisher {
    /// A publisher for `source` that follows throttle advisories until `client` closes; a
    /// throttle lasts `throttle_for` after the advisory (renewed by each new one).
    pub async fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        source: &str,
        throttle_for: Duration,
    ) -> Result<Self, PublishError> {
        let publisher = MeshPublisher {
            js,
            source: source.to_owned(),
            throttles: Arc::default(),
            stats: Arc::default(),
        };
        let mut advisories = client
            .subscribe(subjects::MESH_THROTTLE)
            .await
            .map_err(|e| PublishError::Subscribe(e.to_string()))?;
        let follower = publisher.clone();
        tokio::spawn(async move {
            while let Some(msg) = advisories.next().await {
                follower.advise(&msg.payload, throttle_for);
            }
        });
        Ok(publisher)
    }

    /// The publisher's counters.
    pub fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }

    /// The limit in force for `event_type`, if a throttle applies now.
    pub fn throttled(&self, event_type: &str) -> Option<f64> {
        let throttles = self.throttles.lock().unwrap_or_else(|p| p.into_inner());
        throttles
            .get(event_type)
            .filter(|t| t.until > Instant::now())
            .map(|t| 1.0 / t.interval.as_secs_f64())
    }

    fn advise(&self, body: &[u8], throttle_for: Duration) {
        let Ok(advisory) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let payload = &advisory["payload"];
        if payload["source"].as_str() != Some(self.source.as_str()) {
            return;
        }
        let (Some(event_type), Some(limit)) = (
            payload["event_type"].as_str(),
            payload["limit_per_second"].as_f64(),
        ) else {
            return;
        };
        if limit <= 0.0 {
            return;
        }
        self.stats.advisories.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut throttles = self.throttles.lock().unwrap_or_else(|p| p.into_inner());
        // Expired throttles are forgotten, so the map holds only the types throttled now.
        throttles.retain(|_, t| t.until > now);
        let entry = throttles.entry(event_type.to_owned()).or_insert(Throttle {
            interval: Duration::ZERO,
            next_slot: now,
            until: now,
        });
        entry.interval = Duration::from_secs_f64(1.0 / limit);
        // An advisory may say how long it lasts (`for_s`, e.g. from a playbook); else the
        // publisher's own default.
        let lasts = payload["for_s"]
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(throttle_for, Duration::from_secs_f64);
        entry.until = now + lasts;
        tracing::info!(source = %self.source, event_type, limit, "throttle advisory honoured");
    }

    /// Waits for the event's slot when its type is throttled, then stores it and waits for the
    /// acknowledgement.
    pub async fn publish(&self, event: &MeshEvent) -> Result<(), PublishError> {
        let slot = {
            let mut throttles = self.throttles.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match throttles.get_mut(&event.event_type) {
                Some(t) if t.until > now => {
                    let slot = t.next_slot.max(now);
                    t.next_slot = slot + t.interval;
                    (slot > now).then_some(slot)
                }
                _ => None,
            }
        };
        if let Some(slot) = slot {
            self.stats.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep_until(slot).await;
        }
        let not_stored = |reason: String| PublishError::NotStored {
            event_id: event.event_id.clone(),
            reason,
        };
        let body = serde_json::to_vec(event).map_err(|e| not_stored(e.to_string()))?;
        let message = PublishMessage::build()
            .payload(body.into())
            .message_id(&event.event_id);
        self.js
            .send_publish(subjects::mesh(&event.event_type), message)
            .await
            .map_err(|e| not_stored(e.to_string()))?
            .await
            .map_err(|e| not_stored(e.to_string()))?;
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
