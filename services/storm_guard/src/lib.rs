//! The storm guard: measures the trigger mesh and trips its circuit breaker.
//!
//! Every `mesh.>` event is counted as it arrives (core NATS, so detection adds no storage
//! round trip): per event type over a sliding `mesh.storm_window_s`, per publishing identity
//! of another account (`ingress.mesh.<identity>.>`) against `mesh.identity_budget` per
//! `mesh.identity_window_s`, and all types together over `mesh.breaker_window_s`. An identity
//! over its budget is limited alone (a record `identity=<identity>` in `bulwark_mesh_limits`
//! that every mesh consumer obeys by holding its events, `mesh.advisory.identity_limited`, a
//! narrative) and its events are not counted towards the breaker, which thus counts the
//! services' events and what identities publish within their budgets. The event that takes a type above `mesh.storm_threshold` per
//! second starts a storm: one incident naming the playbook `trigger_storm_mitigation` with the
//! rate, one throttle advisory naming the flooding source, one narrative, however long the
//! storm lasts. The event that takes the total above `mesh.breaker_threshold` opens the breaker;
//! the breaker's state lives in the KV bucket `bulwark_breaker`, so mesh consumers hold events
//! back while it is open, replicas agree on it and a restart keeps it. The safeguards' own
//! events (incidents, emergencies, breaker transitions, advisories, dead letters) are not
//! counted, so enforcement cannot feed itself; nor is bulwark's bookkeeping of work it already
//! governs (`mesh.task.*`, `mesh.playbook.*`, `mesh.layer2.*`), whose rate follows admitted
//! work: counted, it would open the breaker under ordinary task load.
//!
//! # Subjects
//! Consumes:
//! - `mesh.>` (core NATS subscription, every event).
//! - `storm_guard.status` (NATS micro service `storm_guard`): `{}`, replied with the breaker
//!   record, the storms in progress and the counters.
//! - The operations an operator or a playbook uses (same micro service, see `service/ops.rs`):
//!   `storm_guard.rates` (event rates by type and source), `storm_guard.breaker.open|close`
//!   (move the breaker by hand, with a reason), `storm_guard.limit` (a per-type rate limit in
//!   KV bucket `bulwark_mesh_limits` that every mesh consumer obeys), `storm_guard.throttle`
//!   (a throttle advisory naming one publisher).
//!
//! Produces (through JetStream, into `BULWARK_MESH`):
//! - `mesh.event.incident`: storms, `{trigger_id, playbook: "trigger_storm_mitigation",
//!   severity, event_type, rate_per_second, source, threshold}`.
//! - `mesh.advisory.throttle`: `{source, event_type, rate_per_second, limit_per_second}`.
//! - `mesh.advisory.identity_limited|identity_lifted`: an identity limited, lifted; its record
//!   in KV bucket `bulwark_mesh_limits` (key `identity=<identity>`).
//! - `mesh.breaker.opened|half_open|closed`: `{scope, event_count, threshold, window_s,
//!   cooldown_s}`, and `mesh.event.emergency` on opening.
//! - `clarity.narrative.storm_guard`: every storm and transition, with its numbers.
//! - `telemetry.storm_guard`: counters every `telemetry.interval_s`.
//!
//! # Modules
//! - [`storm`]: per-type sliding windows (pure).
//! - [`breaker`]: the breaker state machine (pure).
//! - [`budget`]: per-identity budgets (pure).
//! - [`service`]: the subscription, the KV record and the announcements around them.

pub mod breaker;
pub mod budget;
pub mod service;
pub mod storm;

pub use service::{Counters, StormGuardError, run};
