//! The worker pool: a supervisor that keeps `worker.count` in-process workers alive, and the
//! operations a person, a playbook or the chaos tool uses on it.
//!
//! Each worker runs on its own connection in its own task, so killing it is what a dead process
//! looks like to the rest of bulwark: heartbeats stop, its micro endpoint disappears, nothing is
//! reported. The pool's connection (`client`) is a service's (its operations `htm.pool.>`, its
//! narratives and telemetry are bulwark's); each worker's connection is a worker's
//! (`connect::Role::Worker`, the `WORKERS` account of `nats.conf`). A worker that ends by itself (an error, a panic, a `crash` kill) is respawned after
//! `worker.respawn_delay_s`. A `hang` kill leaves the slot dead without the supervisor noticing,
//! like a process stuck in a syscall: only the scheduler's heartbeat timeout sees it, and only
//! an explicit respawn (the `htm_worker_recovery` playbook, or a person) brings it back.
//!
//! # Subjects
//! Consumes (NATS micro service `htm_pool`):
//! - `htm.pool.status` `{}` -> `{"desired", "running", "workers": [{"worker_id", "state",
//!   "restarts", "since"}]}`; `state` is `running`, `respawning` (crashed, coming back), or
//!   `hung`.
//! - `htm.pool.kill` `{"worker_id", "mode": "crash"|"hang"}` -> `{"worker_id", "mode", "state"}`
//!   (fault injection; operators only in nats.conf).
//! - `htm.pool.respawn` `{"worker_id"?}` -> `{"respawned": [ids], "running", "desired"}`: the
//!   named worker (restarted even if running), or every worker that is not running.
//!
//! Produces: `clarity.narrative.htm_pool` for every kill and respawn;
//! `telemetry.htm_pool` with the pool's figures.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::Client;
use async_nats::service::Request;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::BulwarkConfig;
use bulwark_common::connect::{self, Role};
use bulwark_common::micro::{self, EndpointSpec};
use bulwark_common::narrative::Narrator;
use bulwark_common::{streams, subjects, telemetry, time};

use crate::handlers::Handlers;
use crate::service::WorkerError;

/// Name under which the pool registers with NATS micro.
pub const SERVICE_NAME: &str = "htm_pool";
/// Largest accepted request.
const MAX_BODY: usize = 4096;

/// The state of one worker slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// The worker runs.
    Running,
    /// It ended or was crashed; the supervisor brings it back after the respawn delay.
    Respawning,
    /// It was hung: dead, and the supervisor does not know.
    Hung,
}

impl SlotState {
    /// The state's name in replies.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Running => "running",
            SlotState::Respawning => "respawning",
            SlotState::Hung => "hung",
        }
    }
}

struct Slot {
    state: SlotState,
    restarts: u64,
    since: String,
    /// Bumped on every start, so a supervisor loop of an older incarnation stops.
    generation: u64,
    abort: Option<AbortHandle>,
}

struct Pool {
    cfg: BulwarkConfig,
    slots: Mutex<BTreeMap<String, Slot>>,
    narrator: Narrator,
    /// Narrates the retries of operator actions its workers run (`clarity.narrative.actions`).
    actions_narrator: Narrator,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillRequest {
    worker_id: String,
    mode: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RespawnRequest {
    worker_id: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Status,
    Kill,
    Respawn,
}

/// Runs a pool of the workers `ids` until `shutdown`, each with the built-in handlers.
pub async fn run_pool(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
    ids: Vec<String>,
) -> Result<(), WorkerError> {
    let register_error = |reason: String| WorkerError::Register {
        worker_id: SERVICE_NAME.to_owned(),
        reason,
    };
    let js = streams::context(
        client.clone(),
        Duration::from_millis(cfg.nats.request_timeout_ms),
    );
    let tracker = TaskTracker::new();
    let pool = Arc::new(Pool {
        actions_narrator: Narrator::new(
            js.clone(),
            crate::actions::NARRATOR_NAME,
            "htm_pool workers",
        ),
        narrator: Narrator::new(js, SERVICE_NAME, "htm_pool supervisor"),
        slots: Mutex::new(BTreeMap::new()),
        cfg,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });
    for id in &ids {
        pool.start(id);
    }

    let endpoints: [EndpointSpec<Op>; 3] = [
        ("status", subjects::POOL_STATUS, Op::Status),
        ("kill", subjects::POOL_KILL, Op::Kill),
        ("respawn", subjects::POOL_RESPAWN, Op::Respawn),
    ];
    let stats = pool.clone();
    let state = pool.clone();
    let service = micro::register(
        &micro::serving_client(&pool.cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark HTM worker pool: keeps the workers alive; status, kill (fault injection), respawn",
        move || stats.status(),
        &endpoints,
        &tracker,
        &shutdown,
        16,
        move |op, request| {
            let state = state.clone();
            async move { state.handle(op, &request).await }
        },
    )
    .await
    .map_err(register_error)?;
    let figures = pool.clone();
    telemetry::spawn(
        client.clone(),
        SERVICE_NAME,
        Duration::from_secs_f64(pool.cfg.telemetry.interval_s.max(0.1)),
        shutdown.clone(),
        move || figures.status(),
    );

    shutdown.cancelled().await;
    // Workers stop with the token (each gets its own grace period); the tracker waits for them.
    micro::finish(SERVICE_NAME, service, tracker, Duration::from_secs(15)).await;
    Ok(())
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (or restarts) worker `id` in a fresh task with a fresh connection.
    fn start(self: &Arc<Self>, id: &str) {
        let generation = {
            let mut slots = self.lock();
            let slot = slots.entry(id.to_owned()).or_insert(Slot {
                state: SlotState::Running,
                restarts: 0,
                since: time::now(),
                generation: 0,
                abort: None,
            });
            if let Some(old) = slot.abort.take() {
                old.abort();
            }
            slot.generation += 1;
            slot.state = SlotState::Running;
            slot.since = time::now();
            slot.generation
        };
        let cfg = self.cfg.clone();
        let worker_id = id.to_owned();
        let token = self.shutdown.child_token();
        let actions_narrator = self.actions_narrator.clone();
        let worker = tokio::spawn(async move {
            // The worker's own connection, as a worker: the pool serves its operations and
            // narrates as a service, its workers speak only as workers.
            let (client, _) = connect::connect(&cfg.nats, &worker_id, Role::Worker)
                .await
                .map_err(|e| e.to_string())?;
            let handlers = Handlers::for_config(&cfg, Some(actions_narrator));
            let ended = crate::service::run_worker(cfg, client.clone(), token, worker_id, handlers)
                .await
                .map_err(|e| e.to_string());
            let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
            ended
        });
        if let Some(slot) = self.lock().get_mut(id) {
            slot.abort = Some(worker.abort_handle());
        }
        let pool = self.clone();
        let id = id.to_owned();
        self.tracker.spawn(async move {
            let ended = worker.await;
            pool.ended(&id, generation, ended).await;
        });
    }

    /// Worker `id` (incarnation `generation`) ended: respawn it unless it was hung, replaced or
    /// the pool is stopping.
    async fn ended(
        self: Arc<Self>,
        id: &str,
        generation: u64,
        ended: Result<Result<(), String>, tokio::task::JoinError>,
    ) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let restarts = {
            let mut slots = self.lock();
            let Some(slot) = slots.get_mut(id) else {
                return;
            };
            if slot.generation != generation || slot.state == SlotState::Hung {
                return;
            }
            slot.state = SlotState::Respawning;
            slot.since = time::now();
            slot.abort = None;
            slot.restarts += 1;
            slot.restarts
        };
        let why = match ended {
            Ok(Ok(())) => "it stopped by itself".to_owned(),
            Ok(Err(err)) => format!("it failed: {err}"),
            Err(err) if err.is_cancelled() => "it was killed (crash)".to_owned(),
            Err(err) => format!("it crashed: {err}"),
        };
        let delay = Duration::from_secs_f64(self.cfg.worker.respawn_delay_s.max(0.0));
        tracing::warn!(
            worker_id = id,
            "{id} ended ({why}); respawning in {delay:?}"
        );
        tokio::select! {
            _ = self.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        {
            let slots = self.lock();
            match slots.get(id) {
                Some(slot)
                    if slot.generation == generation && slot.state == SlotState::Respawning => {}
                // Respawned by request, or hung meanwhile.
                _ => return,
            }
        }
        self.start(id);
        let n = self
            .narrator
            .narrative("worker_respawned", "htm_pool supervisor")
            .why(format!("{id} ended: {why}"))
            .why(format!(
                "respawned after {:.1} s (restart {restarts})",
                delay.as_secs_f64()
            ))
            .context(json!({"worker_id": id, "restarts": restarts, "by": "supervisor"}));
        self.narrator.publish(n).await;
    }

    fn status(&self) -> Value {
        let slots = self.lock();
        let workers: Vec<Value> = slots
            .iter()
            .map(|(id, s)| {
                json!({"worker_id": id, "state": s.state.as_str(), "restarts": s.restarts,
                       "since": s.since})
            })
            .collect();
        let running = slots
            .values()
            .filter(|s| s.state == SlotState::Running)
            .count();
        json!({"component": SERVICE_NAME, "desired": slots.len(), "running": running,
               "workers": workers})
    }

    async fn handle(self: &Arc<Self>, op: Op, request: &Request) {
        let body = &request.message.payload;
        let result = match op {
            Op::Status => Ok(self.status()),
            Op::Kill => self.kill(body).await,
            Op::Respawn => self.respawn(body).await,
        };
        api::respond(request, result).await;
    }

    async fn kill(self: &Arc<Self>, body: &[u8]) -> Result<Value, ApiError> {
        let req: KillRequest = api::decode(body, "invalid_kill", MAX_BODY)?;
        let state = match req.mode.as_str() {
            "crash" => SlotState::Respawning,
            "hang" => SlotState::Hung,
            other => {
                return Err(ApiError::bad_request(
                    "invalid_kill",
                    format!("mode {other:?} is not one of \"crash\", \"hang\""),
                ));
            }
        };
        {
            let mut slots = self.lock();
            let known: Vec<String> = slots.keys().cloned().collect();
            let Some(slot) = slots.get_mut(&req.worker_id) else {
                return Err(ApiError::not_found(
                    "unknown_worker",
                    format!(
                        "worker {:?} is not in this pool (it has {})",
                        req.worker_id,
                        known.join(", ")
                    ),
                ));
            };
            if slot.state != SlotState::Running {
                return Err(ApiError::conflict(
                    "not_running",
                    format!(
                        "worker {} is {} already",
                        req.worker_id,
                        slot.state.as_str()
                    ),
                ));
            }
            if state == SlotState::Hung {
                // Mark first, so the supervisor loop sees a hang and leaves the slot dead.
                slot.state = SlotState::Hung;
                slot.since = time::now();
            }
            if let Some(abort) = slot.abort.take() {
                abort.abort();
            }
        }
        let n = self
            .narrator
            .narrative("worker_killed", "htm.pool.kill")
            .why(format!(
                "{} killed on request, mode {}",
                req.worker_id, req.mode
            ))
            .why(match state {
                SlotState::Hung => {
                    "hang: the supervisor will not notice; the scheduler's heartbeat timeout will"
                        .to_owned()
                }
                _ => format!(
                    "crash: the supervisor respawns it after {:.1} s",
                    self.cfg.worker.respawn_delay_s
                ),
            })
            .context(json!({"worker_id": req.worker_id, "mode": req.mode}));
        self.narrator.publish(n).await;
        Ok(json!({"worker_id": req.worker_id, "mode": req.mode, "state": state.as_str()}))
    }

    async fn respawn(self: &Arc<Self>, body: &[u8]) -> Result<Value, ApiError> {
        let req: RespawnRequest = if body.iter().all(u8::is_ascii_whitespace) {
            RespawnRequest::default()
        } else {
            api::decode(body, "invalid_respawn", MAX_BODY)?
        };
        let targets: Vec<(String, &'static str)> = {
            let slots = self.lock();
            match &req.worker_id {
                Some(id) => match slots.get(id) {
                    Some(slot) => vec![(id.clone(), slot.state.as_str())],
                    None => {
                        return Err(ApiError::not_found(
                            "unknown_worker",
                            format!("worker {id:?} is not in this pool"),
                        ));
                    }
                },
                None => slots
                    .iter()
                    .filter(|(_, s)| s.state != SlotState::Running)
                    .map(|(id, s)| (id.clone(), s.state.as_str()))
                    .collect(),
            }
        };
        for (id, was) in &targets {
            let restarts = {
                let mut slots = self.lock();
                slots.get_mut(id).map_or(0, |s| {
                    s.restarts += 1;
                    s.restarts
                })
            };
            self.start(id);
            let n = self
                .narrator
                .narrative("worker_respawned", "htm.pool.respawn")
                .why(format!("{id} was {was}; respawned on request"))
                .context(
                    json!({"worker_id": id, "was": was, "restarts": restarts, "by": "request"}),
                );
            self.narrator.publish(n).await;
        }
        let status = self.status();
        Ok(
            json!({"respawned": targets.iter().map(|(id, _)| id).collect::<Vec<_>>(),
                  "running": status["running"], "desired": status["desired"]}),
        )
    }
}
