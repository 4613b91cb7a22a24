//! The HTM scheduler: runs every approved intent exactly once on a healthy worker.
//!
//! It pulls the task queue (`BULWARK_TASKS`) highest priority first, FIFO within a priority (one
//! durable consumer per priority), hands each task to the least-loaded healthy worker with the
//! reasons in numbers, and acknowledges the queued task only when its worker reported the result.
//! A worker silent for `heartbeat_timeout_s` is declared dead and its tasks are reassigned under
//! a new fencing token, so a late result from the dead worker is refused and a task completes
//! once. After `max_attempts` a task fails for good and goes to `BULWARK_TASKS_DEAD` with its
//! history. Queue guards raise incidents; shedding parks low-priority old tasks in
//! `BULWARK_TASKS_PARKED` and replay brings them back; pause holds dispatch while tasks wait
//! durably.
//!
//! # Subjects
//! Consumes:
//! - `htm.task.queue.<priority>` (JetStream, durable consumers `scheduler-p<priority>`).
//! - `htm.heartbeat.*`: worker heartbeats (CONTRACT section 3 named them `htm.worker.heartbeat.*`);
//!   a worker id is bound to the NATS user that first heartbeats it ([`bindings`]).
//! - NATS micro service `scheduler`: `htm.task.result` (worker reports), `scheduler.pause`,
//!   `scheduler.resume`, `scheduler.shed`, `scheduler.replay`, `htm.readiness`.
//!
//! Produces:
//! - `htm.worker.<worker_id>.task`: assignments (request/reply; the worker accepts).
//! - `mesh.task.dispatched|completed|failed|reassigned|shed`, `mesh.event.incident`
//!   (`htm_worker_recovery`, `scheduler_load_shedding`), `mesh.deadletter` (malformed reports
//!   and heartbeats).
//! - `htm.task.parked.<priority>`, `htm.task.dead` (JetStream).
//! - KV `bulwark_intents` (task status, assignments and fences) and `bulwark_workers` (the
//!   worker registry).
//! - `clarity.narrative.scheduler`; `telemetry.scheduler` and `telemetry.htm_orchestrator`.
//!
//! # Modules
//! - [`pool`]: the workers, their load, and the least-loaded choice (pure).
//! - [`guards`]: queue thresholds with one alert per crossing (pure).
//! - [`sla`]: latency percentiles and SLA breaches (pure).
//! - [`bindings`]: worker ids bound to NATS users, and the bound on claimed capacity (pure).
//! - [`registry`]: the workers a leader has heard from (KV `bulwark_workers`) and their bindings.
//! - [`service`]: the dispatch loop, reports, watchdog and endpoints.

pub mod bindings;
pub mod guards;
pub mod pool;
pub mod registry;
pub mod service;
pub mod sla;

pub use service::{Fenced, SERVICE_NAME, SchedulerError, run, update_fenced};
