//! The Layer 2 watchdog: is Layer 2 healthy right now, and if not, what is wrong.
//!
//! It reads every component's `telemetry.<component>`, pings every NATS micro service
//! (`$SRV.PING`) and asks the scheduler for `htm.readiness` every `watchdog.check_interval_s`.
//! The seed's rules turn these into conditions (HTM queue depth, zero workers, a missing
//! scheduler heartbeat, dispatch stalled while tasks wait, SLA breaches rising, a service not
//! answering, the mesh breaker open or a storm); each condition has its own alert state machine,
//! so an alert is raised when the condition starts, repeated at most every
//! `watchdog.realert_interval_s`, and a recovery is announced once when it clears: never one per
//! sweep. See `docs/watchdog.md`.
//!
//! # Subjects
//! Consumes:
//! - `telemetry.>` (core NATS): every component's figures (CONTRACT section 5).
//! - `$SRV.PING` answers (every micro service) and `htm.readiness` (scheduler), each sweep.
//! - `watchdog.report` (NATS micro service `watchdog`): `{}`, replied with
//!   `{overall_health, all_ready, components}`.
//!
//! Produces:
//! - `mesh.layer2.<severity>_alert` (JetStream, `BULWARK_MESH`): `{component, severity, reason,
//!   health, condition, state: raised|repeated|recovered, held_for_s}`.
//! - `mesh.event.incident` naming playbook `scheduler_recovery` while the scheduler's dispatch
//!   is stalled (raised and repeated alerts; the playbooks service counts repeats, not runs).
//! - `clarity.narrative.watchdog`: one narrative per alert.
//! - `telemetry.layer2`: overall health, conditions and alert counters.
//!
//! # Modules
//! - [`health`]: the component views, the rules and the alert state machines (pure).
//! - [`service`]: the subscription, the sweep, the report endpoint and the announcements.

pub mod health;
pub mod service;
pub mod storage;

pub use service::{SERVICE_NAME, WatchdogError, run};
