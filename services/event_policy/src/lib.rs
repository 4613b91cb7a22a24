//! The event policy engine: turns trigger mesh events into actions by rules kept in files under
//! version control (`policies/*.toml`, see [`rules`]), and stops the cascades rules can start.
//!
//! Each event is read through the project's mesh consumer
//! ([`bulwark_common::mesh::MeshConsumer`], durable name `event_policy_engine`): normalised,
//! dead-lettered when malformed, held while the breaker is open, paced per type. Every rule
//! whose subject pattern and conditions match runs its action: emit child events, submit an
//! intent, or run a playbook (an incident naming it). Every child carries the parent's
//! `correlation_id`, `causation_id` = the parent's `event_id` and `depth` + 1, and first passes
//! the [`cascade`] limits (depth, cycle, fan-out); a stopped chain gets one
//! `event_cascade_breaker` incident per correlation, narrated. The event is acknowledged only
//! after its actions are done; children are published with `Nats-Msg-Id` =
//! `<parent event_id>:<rule>:<n>`, so a redelivered parent does not produce them twice.
//!
//! A rule file with errors stops the engine before it starts, with every error's file, line
//! and reason.
//!
//! # Subjects
//! Consumes:
//! - `mesh.>` (stream `BULWARK_MESH`, durable consumers `event_policy_engine` and
//!   `event_policy_engine_critical`), and the breaker in KV bucket `bulwark_breaker`.
//! - `event_policy.rules` (NATS micro service `event_policy_engine`): `{}`, replied with the
//!   loaded rules.
//!
//! Produces:
//! - `mesh.<event_type>`: children of `emit` rules; `mesh.event.incident`: playbook runs and
//!   cascade stops; `mesh.deadletter`: malformed events.
//! - `htm.intent.submit` requests of `intent` rules.
//! - `clarity.narrative.event_policy_engine`; `telemetry.event_policy_engine`.
//!
//! # Modules
//! - [`rules`]: the rule file format, loading and matching (pure).
//! - [`cascade`]: depth, cycle and fan-out limits (pure).
//! - [`service`]: the consumer and the actions around them.

pub mod cascade;
pub mod rules;
pub mod service;

pub use service::{Counters, EventPolicyError, run};
