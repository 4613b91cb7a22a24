//! The sandbox fallback: each replica of a service tracks its own health, quarantines itself
//! when it keeps failing, and says so; its supervisor (`bulwark up`, or systemd/Kubernetes
//! around `bulwark serve`) respawns it.
//!
//! A [`Replica`] wraps one running instance of a service:
//!
//! - **Heartbeat.** Every `replicas.heartbeat_interval_s` it publishes a [`ReplicaBeat`] on
//!   `replica.heartbeat.<service>.<replica_id>`: status (`starting`, `serving`, `quarantined`),
//!   errors in the window and in total, the micro instance id once ready. The watchdog keeps the
//!   latest of each replica for `watchdog.report` and `bulwark status`.
//! - **Errors.** It counts its connection's server errors (permission violations, refused
//!   JetStream requests) and slow-consumer drops, what the service reports through
//!   [`Replica::error`], and faults injected on `replica.fault.<replica_id>` (chaos and tests:
//!   `{"errors": n, "reason": "..."}`).
//! - **Quarantine.** `replicas.error_threshold` errors (seed: 10) within
//!   `replicas.error_window_s` quarantine the replica: narrated (`replica_quarantined`), then its
//!   service is stopped through [`Replica::token`]: it deregisters from NATS micro (so the queue
//!   groups send its requests to the healthy replicas), stops pulling from shared consumers and
//!   releases its leases (a standby takes over at once). The run ends with
//!   [`Quarantined`], which tells the supervisor to respawn it.
//! - **Readiness.** A (re)spawned replica is `starting` until its micro instance answers
//!   `$SRV.INFO.<service>` with every endpoint it announced; then `serving`, and
//!   [`Replica::ready`] resolves (the supervisor narrates `replica_returned`).
//!
//! # Subjects
//! Produces `replica.heartbeat.<service>.<replica_id>` and `clarity.narrative.<service>`
//! (`replica_quarantined`); consumes `replica.fault.<replica_id>`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ReplicasConfig;
use crate::connect::ConnectionStats;
use crate::narrative::Narrator;
use crate::subjects;

/// A replica's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaStatus {
    /// Running, not yet through its readiness check.
    Starting,
    /// Ready and taking work.
    Serving,
    /// Failing: stopped taking work, waiting to be respawned.
    Quarantined,
}

impl ReplicaStatus {
    /// The status as written in heartbeats.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaStatus::Starting => "starting",
            ReplicaStatus::Serving => "serving",
            ReplicaStatus::Quarantined => "quarantined",
        }
    }
}

/// The heartbeat of one replica, on `replica.heartbeat.<service>.<replica_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaBeat {
    /// The service (its micro name).
    pub service: String,
    /// This replica.
    pub replica_id: String,
    /// Its state.
    pub status: ReplicaStatus,
    /// Errors within the window.
    pub errors: u64,
    /// The quarantine threshold.
    pub error_threshold: u64,
    /// The window, in seconds.
    pub error_window_s: f64,
    /// Errors since it started.
    pub errors_total: u64,
    /// Its NATS micro instance id, once ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_id: Option<String>,
    /// Why it was quarantined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Host and process.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_seconds: f64,
    /// When, RFC 3339 UTC.
    pub timestamp: String,
}

/// The error a replica's run ends with when it quarantined itself.
#[derive(Debug, Clone, thiserror::Error)]
#[error("replica {replica_id} of {service} quarantined: {reason}")]
pub struct Quarantined {
    /// The service.
    pub service: String,
    /// The replica.
    pub replica_id: String,
    /// Why.
    pub reason: String,
}

/// The sliding error window (pure).
#[derive(Debug, Clone)]
pub struct ErrorWindow {
    window: Duration,
    threshold: u64,
    at: VecDeque<Instant>,
}

impl ErrorWindow {
    /// A window of `window` that trips at `threshold` errors.
    pub fn new(window: Duration, threshold: u64) -> Self {
        Self {
            window,
            threshold,
            at: VecDeque::new(),
        }
    }

    /// Records `n` errors at `now`; true when the window holds `threshold` or more.
    pub fn record(&mut self, n: u64, now: Instant) -> bool {
        for _ in 0..n.min(self.threshold.max(1) * 2) {
            self.at.push_back(now);
        }
        self.count(now) >= self.threshold
    }

    /// Errors within the window at `now`.
    pub fn count(&mut self, now: Instant) -> u64 {
        while let Some(first) = self.at.front() {
            if now.duration_since(*first) > self.window {
                self.at.pop_front();
            } else {
                break;
            }
        }
        self.at.len() as u64
    }
}

struct State {
    status: ReplicaStatus,
    window: ErrorWindow,
    reason: Option<String>,
    micro_id: Option<String>,
}

/// One running replica of a service: its health, its quarantine switch, its readiness.
pub struct Replica {
    service: String,
    id: String,
    cfg: ReplicasConfig,
    started: Instant,
    total: AtomicU64,
    state: Mutex<State>,
    /// Cancelled when the replica is quarantined or shut down: the service runs with it.
    token: CancellationToken,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Replica {
    /// A replica of `service` whose service stops when `shutdown` is cancelled or it is
    /// quarantined.
    pub fn new(service: &str, cfg: &ReplicasConfig, shutdown: &CancellationToken) -> Arc<Self> {
        let id = format!("{service}-{}", &crate::ids::new_id().replace('-', "")[20..]);
        Arc::new(Self {
            service: service.to_owned(),
            id,
            cfg: cfg.clone(),
            started: Instant::now(),
            total: AtomicU64::new(0),
            state: Mutex::new(State {
                status: ReplicaStatus::Starting,
                window: ErrorWindow::new(
                    Duration::from_secs_f64(cfg.error_window_s),
                    cfg.error_threshold,
                ),
                reason: None,
                micro_id: None,
            }),
            token: shutdown.child_token(),
            ready: tokio::sync::watch::channel(false).0,
        })
    }

    /// This replica's id (`<service>-<hex>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The token the service runs with: cancelled at shutdown and at quarantine.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The current status.
    pub fn status(&self) -> ReplicaStatus {
        self.lock().status
    }

    /// The quarantine, if this replica is quarantined.
    pub fn quarantined(&self) -> Option<Quarantined> {
        let state = self.lock();
        (state.status == ReplicaStatus::Quarantined).then(|| Quarantined {
            service: self.service.clone(),
            replica_id: self.id.clone(),
            reason: state.reason.clone().unwrap_or_default(),
        })
    }

    /// Resolves once the replica passed its readiness check (false if it never does before
    /// it stops).
    pub async fn ready(&self) -> bool {
        let mut rx = self.ready.subscribe();
        loop {
            if *rx.borrow_and_update() {
                return true;
            }
            tokio::select! {
                _ = self.token.cancelled() => return false,
                changed = rx.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// Counts `n` errors (`what` names them); returns true when this quarantined the replica.
    pub fn error(&self, n: u64, what: &str) -> bool {
        if n == 0 {
            return false;
        }
        self.total.fetch_add(n, Ordering::Relaxed);
        let mut state = self.lock();
        if state.status == ReplicaStatus::Quarantined {
            return false;
        }
        let now = Instant::now();
        if !state.window.record(n, now) {
            return false;
        }
        let count = state.window.count(now);
        state.status = ReplicaStatus::Quarantined;
        state.reason = Some(format!(
            "{count} errors within {:.0} s (threshold {}), the last: {what}",
            self.cfg.error_window_s, self.cfg.error_threshold
        ));
        true
    }

    /// The current heartbeat.
    pub fn beat(&self) -> ReplicaBeat {
        let mut state = self.lock();
        let now = Instant::now();
        ReplicaBeat {
            service: self.service.clone(),
            replica_id: self.id.clone(),
            status: state.status,
            errors: state.window.count(now),
            error_threshold: self.cfg.error_threshold,
            error_window_s: self.cfg.error_window_s,
            errors_total: self.total.load(Ordering::Relaxed),
            micro_id: state.micro_id.clone(),
            reason: state.reason.clone(),
            host: std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned()),
            pid: std::process::id(),
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            timestamp: crate::time::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_ready(&self, micro_id: String) {
        {
            let mut state = self.lock();
            if state.status == ReplicaStatus::Starting {
                state.status = ReplicaStatus::Serving;
            }
            state.micro_id = Some(micro_id);
        }
        self.ready.send_replace(true);
    }
}

/// The micro instance ids of `service` answering `$SRV.PING` now.
pub async fn instances(client: &async_nats::Client, service: &str) -> HashSet<String> {
    crate::micro::ping_all(client, Some(service), Duration::from_millis(300))
        .await
        .into_iter()
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect()
}

/// Watches `replica` until its token is cancelled: heartbeats, error sampling, fault
/// injection, readiness (an instance of the service not in `before` reporting every endpoint),
/// and the quarantine (narrated, then the token is cancelled).
pub async fn guard(
    replica: Arc<Replica>,
    client: async_nats::Client,
    stats: Arc<ConnectionStats>,
    narrator: Narrator,
    before: HashSet<String>,
) {
    let mut faults = client
        .subscribe(subjects::replica_fault(&replica.id))
        .await
        .ok();
    let interval = Duration::from_secs_f64(replica.cfg.heartbeat_interval_s);
    let mut beat = tokio::time::interval(interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut readiness = tokio::time::interval(Duration::from_millis(100));
    let mut seen_server_errors = stats.server_errors.load(Ordering::Relaxed);
    let mut seen_drops = stats.slow_consumer_drops.load(Ordering::Relaxed);
    let token = replica.token.clone();
    loop {
        let fault = async {
            match faults.as_mut() {
                Some(sub) => sub.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            msg = fault => {
                let Some(msg) = msg else { faults = None; continue };
                #[derive(Deserialize)]
                struct Fault {
                    #[serde(default = "one")]
                    errors: u64,
                    #[serde(default)]
                    reason: Option<String>,
                }
                fn one() -> u64 { 1 }
                let fault: Fault = serde_json::from_slice(&msg.payload)
                    .unwrap_or(Fault { errors: 1, reason: Some("malformed fault request".into()) });
                let what = format!(
                    "injected fault: {}",
                    fault.reason.as_deref().unwrap_or("unspecified")
                );
                let tripped = replica.error(fault.errors, &what);
                if let Some(reply) = msg.reply.filter(|r| crate::micro::is_inbox(r)) {
                    let _ = client
                        .publish(reply, crate::api::to_bytes(&replica.beat()))
                        .await;
                }
                if tripped {
                    quarantine(&replica, &client, &narrator).await;
                }
            }
            _ = readiness.tick(), if replica.status() == ReplicaStatus::Starting => {
                if let Some(id) = ready_instance(&client, &replica.service, &before).await {
                    replica.set_ready(id);
                }
            }
            _ = beat.tick() => {
                let server_errors = stats.server_errors.load(Ordering::Relaxed);
                let drops = stats.slow_consumer_drops.load(Ordering::Relaxed);
                let mut tripped = replica.error(
                    server_errors.saturating_sub(seen_server_errors),
                    "NATS server errors on its connection",
                );
                tripped |= replica.error(
                    drops.saturating_sub(seen_drops),
                    "messages dropped by a slow consumer",
                );
                seen_server_errors = server_errors;
                seen_drops = drops;
                publish_beat(&replica, &client).await;
                if tripped {
                    quarantine(&replica, &client, &narrator).await;
                }
            }
        }
    }
    // The last word: quarantined or stopping.
    publish_beat(&replica, &client).await;
}

async fn publish_beat(replica: &Replica, client: &async_nats::Client) {
    let beat = replica.beat();
    let sent = crate::connect::publish_flushed(
        client,
        subjects::replica_heartbeat(&replica.service, &replica.id),
        crate::api::to_bytes(&beat),
        Duration::from_secs(2),
    )
    .await;
    if let Err(err) = sent {
        tracing::debug!(replica = %replica.id, error = %err, "replica heartbeat not sent");
    }
}

/// Narrates the quarantine, announces it, and stops the replica's service.
async fn quarantine(replica: &Replica, client: &async_nats::Client, narrator: &Narrator) {
    let beat = replica.beat();
    tracing::warn!(replica = %replica.id, reason = ?beat.reason, "replica quarantined");
    let n = narrator
        .narrative("replica_quarantined", "sandbox fallback: error threshold over a sliding window")
        .why(format!(
            "{} is failing: {}",
            replica.id,
            beat.reason.clone().unwrap_or_default()
        ))
        .why("it stops taking work: it leaves the micro queue groups and shared consumers and releases its leases; the healthy replicas take its traffic")
        .why("its supervisor respawns it and returns it to service once it passes its readiness check")
        .context(json!({"service": replica.service, "replica_id": replica.id, "errors": beat.errors,
                        "errors_total": beat.errors_total, "threshold": beat.error_threshold,
                        "window_s": beat.error_window_s, "micro_id": beat.micro_id}));
    narrator.publish(n).await;
    publish_beat(replica, client).await;
    replica.token.cancel();
}

/// An instance of `service` not in `before` that reports every endpoint it announced.
async fn ready_instance(
    client: &async_nats::Client,
    service: &str,
    before: &HashSet<String>,
) -> Option<String> {
    let infos = crate::micro::info_all(client, service, Duration::from_millis(300)).await;
    infos.into_iter().find_map(|info| {
        let id = info["id"].as_str()?;
        if before.contains(id) {
            return None;
        }
        let have = info["endpoints"].as_array().map_or(0, Vec::len);
        let want = info["metadata"][crate::micro::ENDPOINTS_METADATA]
            .as_str()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        (have >= want).then(|| id.to_owned())
    })
}

/// How a replica's run ended, when not by shutdown.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplicaEnd {
    /// It quarantined itself.
    #[error(transparent)]
    Quarantined(#[from] Quarantined),
    /// The service failed (or panicked).
    #[error("{0}")]
    Failed(String),
    /// The service could not start or keep running because NATS or JetStream did not answer
    /// (a server still starting, a cluster without a JetStream leader yet): retried with
    /// backoff, also on the first run.
    #[error("{0}")]
    Unavailable(String),
}

/// Longest wait between two attempts at a replica that keeps finding JetStream unavailable.
const MAX_UNAVAILABLE_BACKOFF: Duration = Duration::from_secs(30);

/// True when `err` says that NATS or JetStream did not answer (a stream, bucket or consumer
/// could not be made ready), as opposed to a broken configuration: such a start is retried.
pub fn unavailable_cause(err: &(dyn std::error::Error + 'static)) -> bool {
    err.is::<crate::streams::StoreError>()
        || matches!(
            err.downcast_ref::<crate::mesh::MeshError>(),
            Some(crate::mesh::MeshError::Consumer { .. })
        )
}

/// Runs one replica of a service: the [`guard`] alongside `service(token)`, the service
/// stopping when the replica is quarantined or shut down. Returns
/// [`ReplicaEnd::Quarantined`] when it quarantined itself.
pub async fn run_guarded<F, Fut>(
    replica: Arc<Replica>,
    client: async_nats::Client,
    stats: Arc<ConnectionStats>,
    narrator: Narrator,
    service: F,
) -> Result<(), ReplicaEnd>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), ReplicaEnd>>,
{
    let before = instances(&client, &replica.service).await;
    let guard = tokio::spawn(guard(replica.clone(), client, stats, narrator, before));
    let result = service(replica.token()).await;
    // Ends the guard (the token is this replica's own; the parent shutdown is untouched).
    replica.token.cancel();
    let _ = guard.await;
    if let Some(q) = replica.quarantined() {
        return Err(ReplicaEnd::Quarantined(q));
    }
    result
}

/// Keeps one replica of `service` running until `shutdown`: `spawn(replica)` starts a run (a
/// task, so a panic is caught); when it ends by quarantine, failure or panic, the supervisor
/// narrates `replica_respawned`, waits `respawn_delay_s`, and spawns a new replica; once that
/// one passes its readiness check it narrates `replica_returned` (or, after `ready_timeout_s`
/// without, `replica_not_ready`, and the replica is quarantined and respawned again).
///
/// A first run that fails before it was ever ready is not respawned: that is a broken
/// configuration, not a failing replica; its error is returned. One that ends
/// [`ReplicaEnd::Unavailable`] (JetStream did not answer) is retried, first run included, after
/// a delay doubling from `respawn_delay_s` up to 30 s, and each retry says why.
pub async fn supervise<F>(
    service: &str,
    cfg: &ReplicasConfig,
    narrator: Narrator,
    shutdown: CancellationToken,
    mut spawn: F,
) -> Result<(), String>
where
    F: FnMut(Arc<Replica>) -> tokio::task::JoinHandle<Result<(), ReplicaEnd>>,
{
    let mut generation = 0u64;
    let mut why_respawned = String::new();
    let mut unavailable = 0u32;
    loop {
        let replica = Replica::new(service, cfg, &shutdown);
        let mut run = spawn(replica.clone());
        if generation > 0 {
            let ready = tokio::time::timeout(
                Duration::from_secs_f64(cfg.ready_timeout_s),
                replica.ready(),
            )
            .await;
            match ready {
                Ok(true) => {
                    let n = narrator
                        .narrative("replica_returned", "supervisor: respawn, then readiness check")
                        .why(format!(
                            "{} (respawned after: {why_respawned}) answers $SRV.INFO.{service} with every endpoint",
                            replica.id()
                        ))
                        .why("it takes work again alongside the other replicas")
                        .context(json!({"service": service, "replica_id": replica.id(),
                                        "respawns": generation, "micro_id": replica.beat().micro_id}));
                    narrator.publish(n).await;
                }
                Ok(false) => {}
                Err(_) => {
                    let n = narrator
                        .narrative("replica_not_ready", "supervisor: readiness check")
                        .why(format!(
                            "{} did not pass its readiness check within {:.0} s",
                            replica.id(),
                            cfg.ready_timeout_s
                        ))
                        .why("it is quarantined and respawned again")
                        .context(json!({"service": service, "replica_id": replica.id()}));
                    narrator.publish(n).await;
                    replica.error(cfg.error_threshold, "readiness check timed out");
                    replica.token.cancel();
                }
            }
        }
        let ended = tokio::select! {
            ended = &mut run => ended,
            _ = shutdown.cancelled() => run.await,
        };
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let was_ready = replica.lock().micro_id.is_some();
        let mut delay = Duration::from_secs_f64(cfg.respawn_delay_s);
        if let Ok(Err(ReplicaEnd::Unavailable(err))) = &ended {
            unavailable += 1;
            delay = (delay.max(Duration::from_millis(250)) * 2u32.saturating_pow(unavailable - 1))
                .min(MAX_UNAVAILABLE_BACKOFF);
            tracing::warn!(service, replica = %replica.id(), error = %err, retry_in_s = delay.as_secs_f64(), "cannot start yet: NATS or JetStream unavailable; retrying");
            let n = narrator
                .narrative(
                    "replica_waiting",
                    "supervisor: retry with backoff while JetStream is unavailable",
                )
                .why(format!("{} could not start: {err}", replica.id()))
                .why(format!(
                    "retried in {:.1} s (attempt {unavailable})",
                    delay.as_secs_f64()
                ))
                .context(
                    json!({"service": service, "replica_id": replica.id(), "attempt": unavailable}),
                );
            narrator.publish(n).await;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            continue;
        }
        unavailable = 0;
        let why = match ended {
            Ok(Ok(())) => "it stopped by itself".to_owned(),
            Ok(Err(ReplicaEnd::Quarantined(q))) => format!("it was quarantined ({})", q.reason),
            Ok(Err(ReplicaEnd::Failed(err))) if generation == 0 && !was_ready => {
                return Err(err);
            }
            Ok(Err(ReplicaEnd::Failed(err) | ReplicaEnd::Unavailable(err))) => {
                format!("it failed: {err}")
            }
            Err(err) => format!("it crashed: {err}"),
        };
        generation += 1;
        tracing::warn!(service, replica = %replica.id(), %why, "respawning replica");
        let n = narrator
            .narrative("replica_respawned", "supervisor: respawn a replica that ended")
            .why(format!("{} ended: {why}", replica.id()))
            .why(format!(
                "a new replica starts after {:.1} s and returns to service after its readiness check (respawn {generation})",
                cfg.respawn_delay_s
            ))
            .context(json!({"service": service, "replica_id": replica.id(), "respawns": generation}));
        narrator.publish(n).await;
        why_respawned = why;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs_f64(cfg.respawn_delay_s)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ten_errors_within_the_window_trip_older_ones_expire() {
        let mut w = ErrorWindow::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        assert!(!w.record(9, t0));
        assert!(
            !w.record(0, t0 + Duration::from_secs(61)),
            "the nine expired"
        );
        assert!(!w.record(9, t0 + Duration::from_secs(62)));
        assert!(w.record(1, t0 + Duration::from_secs(63)), "ten within 60 s");
    }
}
