//! The storm guard's operations: what an operator or a playbook may do to the mesh by request.
//!
//! - `storm_guard.rates` `{}` -> `{"window_s", "types": [{event_type, count, rate_per_second,
//!   in_storm, top_sources}], "total_per_second", "breaker"}`.
//! - `storm_guard.breaker.open` `{"reason", "by"?}` / `storm_guard.breaker.close` `{"reason",
//!   "by"?}` -> the breaker record after the change (`changed: false` when it was there
//!   already). A forced transition is stored, announced on `mesh.breaker.*` and narrated like
//!   any other, without an emergency (nothing needs remediating: someone chose it).
//! - `storm_guard.limit` `{"event_type", "limit_per_second", "for_s", "reason", "by"?}` -> the
//!   limit stored in `bulwark_mesh_limits`, which every mesh consumer obeys until it lapses.
//! - `storm_guard.throttle` `{"source", "event_type", "limit_per_second", "for_s"?, "reason",
//!   "by"?}` -> the advisory published on `mesh.advisory.throttle`, which publishers built on
//!   `MeshPublisher` honour.

use serde::Deserialize;
use serde_json::{Value, json};

use bulwark_common::api::{self, ApiError};
use bulwark_common::envelope::MeshEvent;
use bulwark_common::mesh::{BreakerState, RateLimit};
use bulwark_common::{ids, subjects, time};

use super::{Stored, StormGuard};

/// Largest accepted operation request.
const MAX_BODY: usize = 8 * 1024;
/// Longest a limit or a throttle may be set for, seconds (a day).
const MAX_FOR_S: f64 = 86_400.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerRequest {
    reason: String,
    #[serde(default)]
    by: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitRequest {
    event_type: String,
    limit_per_second: u64,
    for_s: f64,
    reason: String,
    #[serde(default)]
    by: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleRequest {
    source: String,
    event_type: String,
    limit_per_second: u64,
    #[serde(default)]
    for_s: Option<f64>,
    reason: String,
    #[serde(default)]
    by: Option<String>,
}

fn check_for_s(code: &str, for_s: f64) -> Result<(), ApiError> {
    if for_s.is_nan() || for_s <= 0.0 || for_s > MAX_FOR_S {
        return Err(ApiError::bad_request(
            code,
            format!("for_s must be above 0 and at most {MAX_FOR_S} seconds, got {for_s}"),
        ));
    }
    Ok(())
}

fn check_reason(code: &str, reason: &str) -> Result<(), ApiError> {
    if reason.trim().is_empty() {
        return Err(ApiError::bad_request(
            code,
            "reason must say why (it goes into the narrative)",
        ));
    }
    Ok(())
}

impl StormGuard {
    /// Event rates by type over the storm window, and the breaker's count.
    pub(super) fn rates(&self, now_ms: i64) -> Value {
        let guard = self.lock();
        let types = guard.storms.rates(now_ms);
        let total: u64 = types.iter().map(|t| t.count).sum();
        json!({
            "window_s": self.cfg.storm_window_s,
            "types": types,
            "total_per_second": total as f64 / self.cfg.storm_window_s.max(0.001),
            "storm_threshold": self.cfg.storm_threshold,
            "breaker": {
                "state": guard.breaker.state(),
                "event_count": guard.breaker.current_count(now_ms),
                "threshold": self.cfg.breaker_threshold,
                "window_s": self.cfg.breaker_window_s,
            },
        })
    }

    /// Opens or closes the breaker by hand.
    pub(super) async fn force_breaker(
        &self,
        to: BreakerState,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Value, ApiError> {
        let code = "invalid_breaker_request";
        let req: BreakerRequest = api::decode(body, code, MAX_BODY)?;
        check_reason(code, &req.reason)?;
        let by = req.by.unwrap_or_else(|| "operator".to_owned());
        let transition = {
            let mut guard = self.lock();
            let before = guard.breaker.clone();
            guard
                .breaker
                .force(to, now_ms)
                .map(|t| (t, guard.breaker.record(&self.instance), before))
        };
        let Some((t, record, before)) = transition else {
            let guard = self.lock();
            return Ok(json!({"changed": false, "state": guard.breaker.state(),
                             "since": time::format_ms(guard.breaker.since_ms())}));
        };
        match self
            .announce_transition(t, record.clone(), Some((&by, &req.reason)))
            .await
        {
            Stored::Yes => {}
            Stored::Adopted(stored) => {
                return Err(ApiError::conflict(
                    "breaker_changed",
                    format!(
                        "the breaker changed meanwhile (now {} since {}, by {}); nothing stored, ask again",
                        stored.state.as_str(),
                        time::format_ms(stored.since_ms),
                        stored.updated_by
                    ),
                ));
            }
            Stored::Failed(err) => {
                // Nothing stored: undo the change here, so this replica does not claim a state
                // the mesh consumers never saw.
                self.lock().breaker = before;
                self.counters
                    .forced_not_stored
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(ApiError::unavailable(format!(
                    "the breaker state was not stored ({err}); it stays {}, ask again",
                    t.from.as_str()
                )));
            }
        }
        Ok(json!({"changed": true, "from": t.from, "state": t.to,
                  "since": time::format_ms(record.since_ms), "by": by, "reason": req.reason}))
    }

    /// Stores a rate limit for one event type.
    pub(super) async fn limit(&self, body: &[u8]) -> Result<Value, ApiError> {
        let code = "invalid_limit";
        let req: LimitRequest = api::decode(body, code, MAX_BODY)?;
        check_reason(code, &req.reason)?;
        check_for_s(code, req.for_s)?;
        if !subjects::is_valid_event_type(&req.event_type) {
            return Err(ApiError::bad_request(
                code,
                format!(
                    "event_type {:?} is not dot-separated tokens of [a-z0-9_-]",
                    req.event_type
                ),
            ));
        }
        if req.limit_per_second == 0 {
            return Err(ApiError::bad_request(
                code,
                "limit_per_second must be at least 1 (events are deferred, never dropped)",
            ));
        }
        let by = req.by.unwrap_or_else(|| "operator".to_owned());
        let limit = RateLimit {
            event_type: req.event_type.clone(),
            limit_per_second: req.limit_per_second,
            until_ms: time::now_ms() + (req.for_s * 1000.0) as i64,
            set_by: by.clone(),
            reason: req.reason.clone(),
        };
        let bucket = bulwark_common::mesh::limits_bucket(&self.js)
            .await
            .map_err(|e| ApiError::unavailable(format!("rate limit bucket: {e}")))?;
        bucket
            .put(&req.event_type, api::to_bytes(&limit))
            .await
            .map_err(|e| ApiError::unavailable(format!("rate limit not stored: {e}")))?;
        let n = self
            .narrator
            .narrative(
                "event_type_rate_limited",
                "storm_guard.limit, KV bucket bulwark_mesh_limits",
            )
            .why(format!(
                "{} limited to {}/s for {} s by {by}: {}",
                req.event_type, req.limit_per_second, req.for_s, req.reason
            ))
            .why("mesh consumers defer the excess (stored, delivered later, never dropped)")
            .context(
                json!({"event_type": req.event_type, "limit_per_second": req.limit_per_second,
                            "for_s": req.for_s, "by": by, "reason": req.reason}),
            );
        self.narrator.publish(n).await;
        Ok(
            json!({"event_type": limit.event_type, "limit_per_second": limit.limit_per_second,
                  "until": time::format_ms(limit.until_ms), "set_by": limit.set_by}),
        )
    }

    /// Publishes a throttle advisory naming one publisher.
    pub(super) async fn throttle(&self, body: &[u8]) -> Result<Value, ApiError> {
        let code = "invalid_throttle";
        let req: ThrottleRequest = api::decode(body, code, MAX_BODY)?;
        check_reason(code, &req.reason)?;
        if let Some(for_s) = req.for_s {
            check_for_s(code, for_s)?;
        }
        if req.source.trim().is_empty() || !subjects::is_valid_event_type(&req.event_type) {
            return Err(ApiError::bad_request(
                code,
                "source must be non-empty and event_type dot-separated tokens of [a-z0-9_-]",
            ));
        }
        if req.limit_per_second == 0 {
            return Err(ApiError::bad_request(
                code,
                "limit_per_second must be at least 1",
            ));
        }
        let by = req.by.unwrap_or_else(|| "operator".to_owned());
        let trigger_id = ids::new_id();
        let advisory = MeshEvent::root(
            "advisory.throttle",
            super::SERVICE_NAME,
            json!({"trigger_id": trigger_id, "source": req.source, "event_type": req.event_type,
                   "limit_per_second": req.limit_per_second, "for_s": req.for_s,
                   "by": by, "reason": req.reason}),
        );
        if !self
            .publish(&advisory, format!("throttle:{trigger_id}"))
            .await
        {
            return Err(ApiError::unavailable("throttle advisory not stored"));
        }
        let n = self
            .narrator
            .narrative(
                "source_throttled",
                "storm_guard.throttle, mesh.advisory.throttle",
            )
            .why(format!(
                "{} asked to publish {} at most {}/s, by {by}: {}",
                req.source, req.event_type, req.limit_per_second, req.reason
            ))
            .context(json!({"source": req.source, "event_type": req.event_type,
                            "limit_per_second": req.limit_per_second, "by": by,
                            "advisory_id": advisory.event_id}));
        self.narrator.publish(n).await;
        Ok(json!({"source": req.source, "event_type": req.event_type,
                  "limit_per_second": req.limit_per_second, "advisory_id": advisory.event_id}))
    }
}
