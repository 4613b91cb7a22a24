//! An HTM worker: takes assignments from the scheduler, runs them through its handlers, and
//! reports the outcome under the assignment's fencing token (the protocol is in
//! [`bulwark_common::htm`] and docs/htm.md (the worker protocol), so a worker in any language can join).
//!
//! # Subjects
//! Consumes: `htm.worker.<worker_id>.task` (NATS micro service `htm_worker`, endpoint `task`);
//! `htm.worker.<worker_id>.cancel` (endpoint `cancel`: stop a task whose intent was cancelled).
//! Produces: `htm.heartbeat.<worker_id>` every `worker.heartbeat_interval_s`;
//! `htm.task.result` reports (request/reply, retried until the scheduler answers).
//!
//! A worker connects as a worker (`connect::Role::Worker`, `[nats] worker_user`), in the
//! `WORKERS` account of `nats.conf`, never as the `bulwark` service user: it reaches bulwark only
//! through its heartbeats, its assignments and its reports; its micro registration is visible
//! only inside `WORKERS` (bulwark counts workers by their heartbeats, in `htm.readiness`).
//!
//! Everything a worker runs lives in the future [`run_worker`] returns: dropping it (a crash)
//! stops its heartbeats and its tasks at once, as a killed process would.
//!
//! # Modules
//! - [`handlers`]: the handler trait and the built-in simulated work for the seed's types.
//! - [`actions`]: operator-defined actions (`[actions.<intent_type>]`): the http and exec
//!   runners, their timeouts, bounded output and retries.
//! - [`service`]: the assignment endpoint, execution, reports and heartbeats.
//! - [`pool`]: the supervisor keeping `worker.count` workers alive (`htm_pool`: status, kill,
//!   respawn).

pub mod actions;
pub mod handlers;
pub mod pool;
pub mod service;

pub use handlers::{Handler, HandlerError, Handlers};
pub use service::{SERVICE_NAME, WorkerError, run, run_worker};
