//! The HTM worker protocol (docs/htm.md (the worker protocol)): what the scheduler sends a worker, what a
//! worker reports back, and its heartbeat (CONTRACT section 3). Any process that speaks these
//! JSON messages on these subjects is a worker, whatever its language.
//!
//! 1. The worker publishes a [`Heartbeat`] on `htm.heartbeat.<worker_id>` every interval.
//! 2. The scheduler sends an [`Assignment`] as a request on `htm.worker.<worker_id>.task`; the
//!    worker answers `{"accepted": true}` at once (or an error reply when it is full).
//! 3. The worker reports on `htm.task.result` (request/reply, retried until answered): first
//!    `started`, then `completed` with a result or `failed` with an error. Every report carries
//!    the assignment's `fence`; a report with a stale fence (the task was reassigned) is refused
//!    with 409 `stale_assignment` and the worker drops the task.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::intent::Task;

/// A worker's periodic heartbeat (CONTRACT section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The worker.
    pub worker_id: String,
    /// CPU use of the worker process, percent of one core.
    pub cpu_percent: f64,
    /// Resident memory of the worker process, MiB.
    pub memory_mb: f64,
    /// Tasks running now.
    pub in_flight: u32,
    /// Tasks it runs at once at most.
    pub capacity: u32,
    /// Tasks completed since start.
    pub tasks_completed: u64,
    /// Tasks failed since start.
    pub tasks_failed: u64,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// When, RFC 3339 UTC.
    pub timestamp: String,
    /// Identifies this run of the worker (new at every start), so a worker back under the same
    /// id is told from one that kept running; optional (without it, a lower `uptime_seconds`
    /// tells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// A task handed to one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The task.
    pub task: Task,
    /// The worker it is for.
    pub worker_id: String,
    /// Fencing token: reports must carry it; a reassignment issues a higher one.
    pub fence: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Fencing token of the scheduler leader that sent it (0 from a scheduler without one). A
    /// worker that has seen a higher one refuses it with 409 `stale_leader`: it comes from a
    /// leader that lost its lease.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leader_token: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The current assignment as recorded in the intent record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// The worker.
    pub worker_id: String,
    /// Fencing token of this assignment.
    pub fence: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it was dispatched.
    pub dispatched_at: String,
}

/// What a worker reports about a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The handler started.
    Started,
    /// The handler finished with a result.
    Completed,
    /// The handler failed.
    Failed,
}

/// A worker's report on `htm.task.result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskReport {
    /// The task.
    pub task_id: String,
    /// The reporting worker.
    pub worker_id: String,
    /// The fence of the assignment it works under.
    pub fence: u64,
    /// What happened.
    pub outcome: Outcome,
    /// The result, when completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When failed: whether another attempt could succeed (false for an unknown handler).
    #[serde(default = "yes")]
    pub retryable: bool,
}

fn yes() -> bool {
    true
}
