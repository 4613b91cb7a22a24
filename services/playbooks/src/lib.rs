//! Playbooks: incidents on the trigger mesh start sandboxed Rhai remediation scripts that act
//! through a narrow, audited host API, each step explained.
//!
//! # Subjects
//! Consumes:
//! - `mesh.event.incident` and `mesh.event.emergency` (durable consumer `playbooks` on
//!   `BULWARK_MESH`, not held by the breaker: remediation must run during a storm). The
//!   payload's `playbook` names the playbook. Only the payload keys the playbook's `forward`
//!   list names become parameters; the operator's `[playbooks.overrides]` win over them.
//! - NATS micro service `playbooks`: `playbook.run` `{"playbook", "params"?, "dry_run"?,
//!   "wait"?}`, `playbook.list` `{}`, `playbook.check` `{}`, `playbook.reload` `{}`.
//!
//! Produces:
//! - `mesh.playbook.started|step|completed|failed` `{playbook, run_id, step?, params, ...}`
//!   (JetStream, into `BULWARK_MESH`), with the incident as their cause.
//! - `clarity.narrative.playbooks`: every run's start, each step with the values it saw, the
//!   end; refused and suppressed incidents.
//! - KV bucket `bulwark_playbook_runs`: the last run of each playbook.
//! - Through the host API only: `storm_guard.*`, `scheduler.*`, `htm.pool.*` and
//!   `htm.readiness` requests.
//!
//! # Modules
//! - [`sandbox`]: the hardened Rhai engine and its errors (pure).
//! - [`playbook`]: the file format, metadata, parameter binding and the library (pure).
//! - [`host`]: the host functions, the scripts' only powers.
//! - [`runner`]: one run: steps, verification, rollback (blocking).
//! - [`service`]: the incident consumer, the endpoints, run bookkeeping and announcements.

pub mod host;
pub mod playbook;
pub mod runner;
pub mod sandbox;
pub mod service;

pub use service::{PlaybooksError, SERVICE_NAME, run};
