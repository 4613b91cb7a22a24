//! What every bulwark service shares, and nothing else.
//!
//! # Layout
//! - [`action`]: operator-defined actions (`[actions.<intent_type>]`): validation, the
//!   payload check, URL and argument rendering.
//! - [`cron`]: cron expressions of `[schedules.<name>]`: parsing, next and previous times.
//! - [`schedule`]: `[schedules.<name>]`: intents submitted on a cron expression's times.
//! - [`subjects`]: every NATS subject bulwark consumes or produces, as constants and builders.
//! - [`streams`]: the JetStream streams and KV buckets that make accepted work durable.
//! - [`backup`]: backup and restore of those streams and buckets (JetStream snapshots, verified manifest).
//! - [`envelope`]: the trigger mesh event envelope (CONTRACT section 1) and its normalisation.
//! - [`htm`]: the worker protocol: heartbeats, assignments, task reports.
//! - [`identity`]: who sent a message, from the server-set `Nats-Request-Info` header.
//! - [`intent`]: intents, autonomy tiers, statuses and the durable intent record.
//! - [`mesh_publisher`]: publishing mesh events durably, honouring throttle advisories.
//! - [`mesh`]: the mesh consumer (normalise, dead-letter, obey the breaker, pace per type).
//! - [`narrative`]: 5W1H narratives and the publisher every service explains itself with.
//! - [`api`]: JSON replies and the NATS micro error convention.
//! - [`page`]: paged list replies (`limit`, `after`) and summarised payloads.
//! - [`nats_server`]: finding the nats-server binary (`bulwark up`, tests).
//! - [`micro`]: NATS micro versioning, readiness and discovery.
//! - [`connect`]: connecting with timeouts, reconnects and an event callback that surfaces errors.
//! - [`console_config`]: the `[console]` and `[notify]` sections (the web console, webhooks).
//! - [`config`]: `bulwark.toml`, overridable by `BULWARK_...` environment variables.
//! - [`kv`]: compare-and-set updates on KV entries.
//! - [`lease`]: leader leases with fencing tokens for single-actor duties among replicas.
//! - [`replica`]: the sandbox fallback: replica health, quarantine, heartbeats, the supervisor.
//! - [`telemetry`]: the periodic `telemetry.<component>` heartbeat.
//! - [`shutdown`]: turning Ctrl-C / SIGTERM into a cancellation token.
//! - [`time`], [`ids`]: RFC 3339 UTC timestamps and UUIDv7 ids.

pub mod action;
pub mod api;
pub mod backup;
pub mod config;
pub mod connect;
pub mod console_config;
pub mod cron;
pub mod envelope;
pub mod htm;
pub mod identity;
pub mod ids;
pub mod intent;
pub mod kv;
pub mod lease;
pub mod logging;
pub mod mesh;
pub mod mesh_publisher;
pub mod micro;
pub mod narrative;
pub mod nats_server;
pub mod page;
pub mod replica;
pub mod rollback;
pub mod schedule;
pub mod shutdown;
pub mod streams;
pub mod subjects;
pub mod telemetry;
pub mod time;

pub use config::BulwarkConfig;
pub use narrative::{Narrative, Narrator};
