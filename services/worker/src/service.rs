//! The worker's I/O: the assignment endpoint, task execution with fenced reports, heartbeats.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::service::ServiceExt;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::{BulwarkConfig, WorkerConfig};
use bulwark_common::connect::{self, Role};
use bulwark_common::htm::{Assignment, Heartbeat, Outcome, TaskReport};
use bulwark_common::{ids, subjects};

use crate::handlers::Handlers;

/// Name under which workers register (CONTRACT section 5).
pub const SERVICE_NAME: &str = "htm_worker";
/// Time given to running tasks at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Largest accepted assignment.
const MAX_ASSIGNMENT: usize = 1024 * 1024;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Registration with NATS micro failed.
    #[error("could not register worker {worker_id}: {reason}")]
    Register {
        /// The worker.
        worker_id: String,
        /// Why.
        reason: String,
    },
}

/// A worker's counters.
#[derive(Debug, Default)]
struct Counters {
    in_flight: AtomicU32,
    completed: AtomicU64,
    failed: AtomicU64,
    dropped_stale: AtomicU64,
    refused: AtomicU64,
}

struct Worker {
    id: String,
    /// Tasks taken and not yet finished, by task id with their fence.
    running: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The cancellation of each running task, by task id with its fence
    /// (`htm.worker.<id>.cancel`).
    cancels: std::sync::Mutex<std::collections::HashMap<String, (u64, CancellationToken)>>,
    /// The last assignments finished, so one sent again is not run twice.
    finished: std::sync::Mutex<Recent>,
    cfg: WorkerConfig,
    client: Client,
    handlers: Handlers,
    counters: Counters,
    timeout: Duration,
    /// The highest scheduler leader token seen on an assignment: an assignment under a lower
    /// one comes from a leader that lost its lease and is refused.
    leader_floor: AtomicU64,
}

/// The most recent finished assignments (task id, fence), bounded.
#[derive(Default)]
struct Recent {
    order: std::collections::VecDeque<(String, u64)>,
    set: std::collections::HashSet<(String, u64)>,
}

impl Recent {
    const CAPACITY: usize = 4096;

    fn insert(&mut self, key: (String, u64)) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            while self.order.len() > Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, key: &(String, u64)) -> bool {
        self.set.contains(key)
    }
}

/// How a report ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reported {
    /// The scheduler recorded it.
    Accepted,
    /// The scheduler refused it (stale assignment, unknown task): the task is not ours.
    Refused,
    /// Nobody answered within `report_retry_s`.
    GaveUp,
}

/// What [`Worker::accept`] decided.
enum Taken {
    /// A new task: run it.
    New(Box<Assignment>),
    /// Already running (or finished) under this fence: nothing to start.
    AlreadyRunning,
}

/// Runs one worker with a generated id (`worker-<8 hex>`), the built-in handlers and the
/// configured actions (their retries logged, not narrated: a worker cannot narrate), on a
/// connection of its own as a worker (`[nats] worker_user`), not as a service.
pub async fn run(cfg: BulwarkConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let id = format!("worker-{}", &ids::new_id().replace('-', "")[24..]);
    let (client, _) = connect::connect(&cfg.nats, &id, Role::Worker)
        .await
        .map_err(|e| WorkerError::Register {
            worker_id: id.clone(),
            reason: e.to_string(),
        })?;
    let handlers = Handlers::for_config(&cfg, None);
    let ended = run_worker(cfg, client.clone(), shutdown, id, handlers).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    ended
}

/// Runs worker `worker_id` with `handlers` on `client` until `shutdown`; running tasks get a
/// grace period. `client` is the worker's own connection, as a worker
/// (`connect::Role::Worker`): heartbeats, the assignment endpoint and reports all use it.
pub async fn run_worker(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
    worker_id: String,
    handlers: Handlers,
) -> Result<(), WorkerError> {
    let worker = Arc::new(Worker {
        id: worker_id.clone(),
        running: std::sync::Mutex::new(std::collections::HashMap::new()),
        cancels: std::sync::Mutex::new(std::collections::HashMap::new()),
        finished: std::sync::Mutex::new(Recent::default()),
        cfg: cfg.worker.clone(),
        client: client.clone(),
        handlers,
        counters: Counters::default(),
        timeout: Duration::from_millis(cfg.nats.request_timeout_ms),
        leader_floor: AtomicU64::new(0),
    });
    let register_error = |e: &dyn std::fmt::Display| WorkerError::Register {
        worker_id: worker_id.clone(),
        reason: e.to_string(),
    };
    let stats = worker.clone();
    let service = client
        .service_builder()
        .description("bulwark HTM worker: executes tasks by intent_type and reports under the assignment's fence")
        .stats_handler(move |_, _| stats.figures())
        .metadata(bulwark_common::micro::readiness_metadata(1))
        .start(SERVICE_NAME, bulwark_common::micro::VERSION)
        .await
        .map_err(|e| register_error(&e))?;
    let mut endpoint = service
        .endpoint_builder()
        .name("task")
        .add(subjects::worker_task(&worker_id))
        .await
        .map_err(|e| register_error(&e))?;
    let mut cancel_endpoint = service
        .endpoint_builder()
        .name("cancel")
        .add(subjects::worker_cancel(&worker_id))
        .await
        .map_err(|e| register_error(&e))?;

    // Everything runs inside this future: dropping it (a crash) ends all of it.
    let mut work = JoinSet::new();
    work.spawn(heartbeats(worker.clone(), shutdown.clone()));
    loop {
        let request = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = work.join_next(), if !work.is_empty() => continue,
            Some(cancel) = cancel_endpoint.next() => {
                let answer = worker.cancel(&cancel.message.payload);
                api::respond(&cancel, answer).await;
                continue;
            }
            request = endpoint.next() => match request { Some(r) => r, None => break },
        };
        match worker.accept(&request.message.payload) {
            Ok(Taken::New(assignment)) => {
                let accepted = json!({"accepted": true, "worker_id": worker.id});
                api::respond(&request, Ok::<_, ApiError>(accepted)).await;
                work.spawn(worker.clone().execute(*assignment));
            }
            Ok(Taken::AlreadyRunning) => {
                let accepted =
                    json!({"accepted": true, "worker_id": worker.id, "already_running": true});
                api::respond(&request, Ok::<_, ApiError>(accepted)).await;
            }
            Err(err) => {
                worker.counters.refused.fetch_add(1, Ordering::Relaxed);
                api::respond(&request, Err::<Value, _>(err)).await;
            }
        }
    }
    drop(endpoint);
    drop(cancel_endpoint);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        // Heartbeats end with the token; tasks finish and report.
        while work.join_next().await.is_some() {}
    })
    .await;
    let _ = service.stop().await;
    Ok(())
}

impl Worker {
    fn figures(&self) -> Value {
        json!({"worker_id": self.id, "in_flight": self.counters.in_flight.load(Ordering::Relaxed),
               "capacity": self.cfg.capacity, "completed": self.counters.completed.load(Ordering::Relaxed),
               "failed": self.counters.failed.load(Ordering::Relaxed),
               "dropped_stale": self.counters.dropped_stale.load(Ordering::Relaxed),
               "refused": self.counters.refused.load(Ordering::Relaxed)})
    }

    /// Validates an assignment and takes a slot for it; an assignment it already runs (sent
    /// again by a restarted scheduler) is accepted without running twice.
    fn accept(&self, body: &[u8]) -> Result<Taken, ApiError> {
        let assignment: Assignment = api::decode(body, "invalid_assignment", MAX_ASSIGNMENT)?;
        if assignment.worker_id != self.id {
            return Err(ApiError::bad_request(
                "invalid_assignment",
                format!(
                    "assignment is for {:?}, this is {}",
                    assignment.worker_id, self.id
                ),
            ));
        }
        if assignment.leader_token > 0 {
            let floor = self
                .leader_floor
                .fetch_max(assignment.leader_token, Ordering::AcqRel);
            if assignment.leader_token < floor {
                return Err(ApiError::conflict(
                    "stale_leader",
                    format!(
                        "assignment from a scheduler under leader token {}, but token {floor} leads now",
                        assignment.leader_token
                    ),
                ));
            }
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let key = (assignment.task.task_id.clone(), assignment.fence);
        if running.get(&key.0) == Some(&key.1)
            || self
                .finished
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&key)
        {
            return Ok(Taken::AlreadyRunning);
        }
        let taken =
            self.counters
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.cfg.capacity).then_some(n + 1)
                });
        if taken.is_err() {
            return Err(ApiError::unavailable(format!(
                "{} is full ({} tasks running)",
                self.id, self.cfg.capacity
            )));
        }
        running.insert(assignment.task.task_id.clone(), assignment.fence);
        Ok(Taken::New(Box::new(assignment)))
    }

    /// Cancels a running task (`{"task_id", "fence"}`): its handler is told to stop (an action's
    /// request is dropped, its process group killed); the worker then reports it failed, which
    /// the scheduler answers 409 (the intent is cancelled).
    fn cancel(&self, body: &[u8]) -> Result<Value, ApiError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Cancel {
            task_id: String,
            fence: u64,
        }
        let req: Cancel = api::decode(body, "invalid_cancel", MAX_ASSIGNMENT)?;
        let cancels = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
        match cancels.get(&req.task_id) {
            Some((fence, token)) if *fence == req.fence => {
                token.cancel();
                Ok(json!({"cancelled": true, "task_id": req.task_id, "worker_id": self.id}))
            }
            _ => Ok(
                json!({"cancelled": false, "task_id": req.task_id, "worker_id": self.id,
                       "reason": "not running here under this fence"}),
            ),
        }
    }

    async fn execute(self: Arc<Self>, assignment: Assignment) {
        let Assignment { task, fence, .. } = assignment;
        let cancel = CancellationToken::new();
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(task.task_id.clone(), (fence, cancel.clone()));
        let mut last = self
            .report(&task.task_id, fence, Outcome::Started, None, None, true)
            .await;
        if last == Reported::Accepted {
            let ran = self
                .handlers
                .run_cancellable(&self.id, &task, &cancel)
                .await;
            let (outcome, result, error, retryable) = match ran {
                Ok(result) => (Outcome::Completed, Some(result), None, true),
                Err(err) => (Outcome::Failed, None, Some(err.message), err.retryable),
            };
            // The work is done: free the slot before reporting, so the scheduler (which frees
            // its count when it records the report) never finds this worker still full.
            self.counters.in_flight.fetch_sub(1, Ordering::AcqRel);
            last = self
                .report(&task.task_id, fence, outcome, result, error, retryable)
                .await;
            if last == Reported::Accepted {
                let counter = if outcome == Outcome::Completed {
                    &self.counters.completed
                } else {
                    &self.counters.failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.counters.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&task.task_id);
        {
            let mut cancels = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
            if cancels.get(&task.task_id).is_some_and(|(f, _)| *f == fence) {
                cancels.remove(&task.task_id);
            }
        }
        // Remembered as finished unless the scheduler never heard of it: then the assignment,
        // sent again when the queue redelivers the task, runs again and reports.
        if last != Reported::GaveUp {
            self.finished
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((task.task_id.clone(), fence));
        }
    }

    /// Sends a report until the scheduler answers or `report_retry_s` passes.
    async fn report(
        &self,
        task_id: &str,
        fence: u64,
        outcome: Outcome,
        result: Option<Value>,
        error: Option<String>,
        retryable: bool,
    ) -> Reported {
        let report = TaskReport {
            task_id: task_id.to_owned(),
            worker_id: self.id.clone(),
            fence,
            outcome,
            result,
            error,
            retryable,
        };
        let body = api::to_bytes(&report);
        let deadline = Instant::now() + Duration::from_secs_f64(self.cfg.report_retry_s);
        let mut backoff = Duration::from_millis(50);
        loop {
            let reply = tokio::time::timeout(
                self.timeout,
                self.client.request(subjects::TASK_RESULT, body.clone()),
            )
            .await;
            if let Ok(Ok(reply)) = reply {
                let code = reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(api::SERVICE_ERROR_CODE))
                    .map(|v| v.to_string());
                match code.as_deref() {
                    None => return Reported::Accepted,
                    Some("409") | Some("404") | Some("400") => {
                        self.counters.dropped_stale.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(worker = %self.id, task_id, fence, "report refused ({}); task dropped",
                            String::from_utf8_lossy(&reply.payload));
                        return Reported::Refused;
                    }
                    Some(_) => {}
                }
            }
            if Instant::now() > deadline {
                tracing::warn!(worker = %self.id, task_id, ?outcome, "scheduler did not take the report; the task runs again when its assignment is resent");
                return Reported::GaveUp;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Publishes the heartbeat every interval, with this process's real CPU and memory.
async fn heartbeats(worker: Arc<Worker>, shutdown: CancellationToken) {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let pid = Pid::from_u32(std::process::id());
    let mut system = System::new();
    let started = Instant::now();
    let run_id = ids::new_id();
    let subject = subjects::worker_heartbeat(&worker.id);
    let mut ticker =
        tokio::time::interval(Duration::from_secs_f64(worker.cfg.heartbeat_interval_s));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let (cpu_percent, memory_mb) = system
            .process(pid)
            .map(|p| {
                (
                    f64::from(p.cpu_usage()),
                    p.memory() as f64 / (1024.0 * 1024.0),
                )
            })
            .unwrap_or((0.0, 0.0));
        let hb = Heartbeat {
            worker_id: worker.id.clone(),
            cpu_percent,
            memory_mb,
            in_flight: worker.counters.in_flight.load(Ordering::Relaxed),
            capacity: worker.cfg.capacity,
            tasks_completed: worker.counters.completed.load(Ordering::Relaxed),
            tasks_failed: worker.counters.failed.load(Ordering::Relaxed),
            uptime_seconds: started.elapsed().as_secs_f64(),
            timestamp: bulwark_common::time::now(),
            run_id: Some(run_id.clone()),
        };
        let sent = bulwark_common::connect::publish_flushed(
            &worker.client,
            subject.clone(),
            api::to_bytes(&hb),
            worker.timeout,
        )
        .await;
        if let Err(err) = sent {
            tracing::debug!(worker = %worker.id, error = %err, "heartbeat not sent");
        }
    }
}
