//! The JetStream streams and KV buckets bulwark keeps its durable state in, and the functions
//! that create them (idempotently) before a service uses them.
//!
//! | name | kind | holds |
//! |---|---|---|
//! | `bulwark_intents` | KV | one [`IntentRecord`](crate::intent::IntentRecord) per intent id: decision, status, history |
//! | `bulwark_reviews` | KV | the human review queue, one item per intent awaiting review |
//! | `bulwark_proposals` | KV | open unified logic proposals with their votes and deadline |
//! | `BULWARK_TASKS` | stream, work queue | approved tasks on `htm.task.queue.<priority>` |
//! | `BULWARK_NARRATIVES` | stream | every 5W1H narrative on `clarity.narrative.>` |
//! | `BULWARK_TASKS_PARKED` | stream, work queue | shed tasks on `htm.task.parked.<priority>`, replayable |
//! | `BULWARK_TASKS_DEAD` | stream | tasks failed after their last attempt, on `htm.task.dead` |
//! | `BULWARK_AUDIT` | stream | clarity's hash-chained audit records on `clarity.audit` |
//! | `bulwark_audit_head` | KV | the newest audit record's `{seq, hash}`, to detect truncation |
//! | `BULWARK_MESH` | stream | every trigger mesh event on `mesh.>` |
//! | `bulwark_breaker` | KV | the mesh circuit breaker's state, shared by storm guard replicas and mesh consumers |
//! | `bulwark_leases` | KV | leader leases of single-actor duties, with their fencing tokens ([`crate::lease`]) |
//!
//! **Limits.** Every stream and bucket has a `max_bytes` (reserved from the account's JetStream
//! limit), a `max_msg_size` and a discard policy, all from `[nats.storage]`
//! ([`crate::config::StorageConfig`]; table in docs/architecture.md): the mesh, narratives and
//! dead tasks drop their oldest messages, the task queues, the audit and the buckets refuse new
//! ones. Existing streams are conformed at start (logged). A configured size is the stream's
//! share of the account's JetStream space, which counts every replica: with R3, each copy's
//! `max_bytes` is a third of it.
//!
//! **Replication.** Every stream and bucket is created with [`replicas`] copies: the configured
//! `nats.replicas`, or when that is 0, 1 on a single server and 3 (at most the cluster's size) on
//! a NATS cluster. A stream found with another count is scaled to it.

use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::config::StorageConfig;
use crate::subjects;

/// The configured limits (`nats.storage`); [`crate::connect::connect`] sets them.
static STORAGE: RwLock<Option<StorageConfig>> = RwLock::new(None);

/// Sets the limits of the streams and buckets this process creates or conforms.
pub fn set_storage(storage: &StorageConfig) {
    *STORAGE.write().unwrap_or_else(|e| e.into_inner()) = Some(storage.clone());
}

/// The limits in force: the configured ones, else the defaults.
pub fn storage() -> StorageConfig {
    STORAGE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Size limits of one stream or bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Bytes (reserved from the account).
    pub max_bytes: i64,
    /// Messages; -1 for no count limit.
    pub max_msgs: i64,
    /// Largest message, headers included.
    pub max_msg_size: i32,
    /// What happens at the limit.
    pub discard: stream::DiscardPolicy,
}

impl Limits {
    /// The limits of one of `replicas` copies: the configured bytes are the stream's share of
    /// the account's JetStream space, which counts every replica.
    pub fn per_replica(self, replicas: usize) -> Limits {
        Limits {
            max_bytes: (self.max_bytes / replicas.max(1) as i64).max(1),
            ..self
        }
    }
}

/// The limits of the bucket `name`.
pub fn bucket_limits(name: &str) -> Limits {
    let s = storage();
    Limits {
        max_bytes: if name == INTENTS_BUCKET {
            s.intents_max_bytes
        } else {
            s.bucket_max_bytes
        },
        max_msgs: -1,
        max_msg_size: s.max_record_bytes,
        discard: stream::DiscardPolicy::New,
    }
}

/// A refusal by JetStream because a stream or bucket reached a limit, described with the limit
/// (for a 503 that names it); `None` for any other error.
pub fn limit_refusal(name: &str, err: &str) -> Option<String> {
    let lower = err.to_ascii_lowercase();
    let which = if lower.contains("maximum messages exceeded") {
        "max_msgs"
    } else if lower.contains("maximum bytes exceeded") || lower.contains("insufficient resources") {
        "max_bytes"
    } else if lower.contains("message size exceeds maximum") {
        "max_msg_size"
    } else {
        return None;
    };
    Some(format!(
        "{name} is full: it reached its {which} limit (nats.storage, discard new) and refuses new \
         messages until space is freed ({err})"
    ))
}

/// KV bucket of intent records.
pub const INTENTS_BUCKET: &str = "bulwark_intents";
/// KV bucket of the human review queue.
pub const REVIEWS_BUCKET: &str = "bulwark_reviews";
/// KV bucket of open unified logic proposals.
pub const PROPOSALS_BUCKET: &str = "bulwark_proposals";
/// Stream of the task queue.
pub const TASKS_STREAM: &str = "BULWARK_TASKS";
/// Stream of narratives.
pub const NARRATIVES_STREAM: &str = "BULWARK_NARRATIVES";

/// KV bucket of bulwark's own secrets (the key of [`crate::mesh::private_id`]): inside
/// bulwark's account, so no agent, person or worker can read it.
pub const SECRETS_BUCKET: &str = "bulwark_secrets";

/// KV bucket of leader leases.
pub const LEASES_BUCKET: &str = "bulwark_leases";

/// The configured replica count (`nats.replicas`); 0 chooses from the server.
static CONFIGURED_REPLICAS: AtomicUsize = AtomicUsize::new(0);

/// Sets the replica count of the streams and buckets this process creates (`nats.replicas`;
/// 0 chooses from the server the connection reached). [`crate::connect::connect`] calls it.
pub fn set_replicas(replicas: usize) {
    CONFIGURED_REPLICAS.store(replicas, Ordering::Relaxed);
}

/// Replicas for a stream or bucket: the configured count, else 1 on a single server and 3 (or
/// the cluster's size when smaller) on a cluster. The cluster's size is the number of client
/// URLs the server advertises. Waits for the connection when it is not established yet (a
/// service connects in the background).
pub async fn replicas(js: &jetstream::Context) -> usize {
    let configured = CONFIGURED_REPLICAS.load(Ordering::Relaxed);
    if configured > 0 {
        return configured;
    }
    let client = js.client();
    if client.server_info().server_id.is_empty() {
        // The server's INFO arrives with the connection: a round trip waits for it.
        let _ = tokio::time::timeout(Duration::from_secs(30), client.flush()).await;
    }
    let info = client.server_info();
    if info.cluster.is_none() {
        return 1;
    }
    info.connect_urls.len().clamp(1, 3)
}

/// The durability in force: `synced` with 3 replicas or more (a write is acknowledged once a
/// majority holds it), else `nats.durability` (`synced` meaning the server syncs every write
/// before acknowledging it, as `bulwark up` arranges).
pub async fn durability_in_force(
    js: &jetstream::Context,
    configured: crate::config::Durability,
) -> crate::config::Durability {
    if replicas(js).await >= 3 {
        crate::config::Durability::Synced
    } else {
        configured
    }
}

/// Why a stream or bucket could not be made ready.
#[derive(Debug, thiserror::Error)]
#[error("JetStream {name} is not available: {reason}")]
pub struct StoreError {
    /// The stream or bucket.
    pub name: String,
    /// The server's or client's explanation.
    pub reason: String,
}

fn store_error(name: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError {
        name: name.to_owned(),
        reason: err.to_string(),
    }
}

/// A JetStream context with the in-flight limits set explicitly (the library's documented and
/// actual defaults differ) and `timeout` for API calls and acks.
pub fn context(client: async_nats::Client, timeout: Duration) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(timeout)
        .ack_timeout(timeout)
        .max_ack_inflight(5_000)
        .backpressure_on_inflight(true)
        .build(client)
}

/// Opens the KV bucket `name`, creating it when missing.
pub async fn bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
) -> Result<kv::Store, StoreError> {
    let replicas = replicas(js).await;
    let limits = bucket_limits(name).per_replica(replicas);
    let store = match js.get_key_value(name).await {
        Ok(store) => store,
        Err(_) => {
            let created = js
                .create_key_value(kv::Config {
                    bucket: name.to_owned(),
                    description: description.to_owned(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    max_bytes: limits.max_bytes,
                    max_value_size: limits.max_msg_size,
                    ..Default::default()
                })
                .await
                .map_err(|create_err| store_error(name, create_err));
            match created {
                Ok(store) => store,
                // Another service may have created it between our get and create.
                Err(err) => js.get_key_value(name).await.map_err(|_| err)?,
            }
        }
    };
    if conform(js, &format!("KV_{name}"), replicas, Some(limits)).await? {
        // The store caches its stream's settings (how it reads): open it again.
        return js
            .get_key_value(name)
            .await
            .map_err(|e| store_error(name, e));
    }
    Ok(store)
}

/// Brings stream `name` (a bucket's stream `KV_<bucket>` included) to `replicas` copies, and,
/// when replicated, turns off direct gets: with them any replica answers a read, and a follower
/// that has not applied the latest write yet answers with the value before it, or "not found"
/// for a key just created (nats-server issues 4162 and 4171). Bulwark decides on what it reads
/// (an intent's status and fence, a lease's holder), so every read goes to the stream leader.
/// With `limits`, also brings its size limits to them. True when the stream was changed.
async fn conform(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    limits: Option<Limits>,
) -> Result<bool, StoreError> {
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|e| store_error(name, e))?;
    let info = stream.info().await.map_err(|e| store_error(name, e))?;
    let direct = replicas == 1;
    let mut config = info.config.clone();
    let limited = limits.is_some_and(|l| apply_limits(name, &mut config, l));
    if info.config.num_replicas == replicas && info.config.allow_direct == direct && !limited {
        return Ok(false);
    }
    tracing::info!(
        stream = name,
        from = config.num_replicas,
        to = replicas,
        direct_gets = direct,
        "scaling stream replicas and read path"
    );
    config.num_replicas = replicas;
    config.allow_direct = direct;
    js.update_stream(config)
        .await
        .map_err(|e| store_error(name, e))?;
    Ok(true)
}

/// Sets the size limits of `config` to `limits`, logging what changes. True when any changed.
fn apply_limits(name: &str, config: &mut stream::Config, limits: Limits) -> bool {
    let same = config.max_bytes == limits.max_bytes
        && config.max_messages == limits.max_msgs
        && config.max_message_size == limits.max_msg_size
        && config.discard == limits.discard;
    if same {
        return false;
    }
    tracing::info!(
        stream = name,
        from_max_bytes = config.max_bytes,
        to_max_bytes = limits.max_bytes,
        from_max_msgs = config.max_messages,
        to_max_msgs = limits.max_msgs,
        from_max_msg_size = config.max_message_size,
        to_max_msg_size = limits.max_msg_size,
        discard = ?limits.discard,
        "conforming stream limits to nats.storage"
    );
    config.max_bytes = limits.max_bytes;
    config.max_messages = limits.max_msgs;
    config.max_message_size = limits.max_msg_size;
    config.discard = limits.discard;
    true
}

/// What distinguishes one of bulwark's streams; everything else (file storage, the replica
/// count of [`replicas`]) is the same for all of them.
struct Spec {
    name: &'static str,
    description: &'static str,
    subjects: &'static [&'static str],
    retention: stream::RetentionPolicy,
    /// Zero keeps messages until retention removes them otherwise.
    max_age: Duration,
    duplicate_window: Duration,
    limits: Limits,
}

/// Creates the stream of `spec` when missing, and brings its age limit, size limits and
/// duplicate window up to date when the configuration changed them.
async fn ensure(js: &jetstream::Context, spec: Spec) -> Result<stream::Stream, StoreError> {
    let mut config = stream::Config {
        name: spec.name.to_owned(),
        description: Some(spec.description.to_owned()),
        subjects: spec.subjects.iter().map(|s| s.to_string()).collect(),
        retention: spec.retention,
        storage: stream::StorageType::File,
        max_age: spec.max_age,
        duplicate_window: spec.duplicate_window,
        num_replicas: replicas(js).await,
        ..Default::default()
    };
    let limits = spec.limits.per_replica(config.num_replicas);
    config.max_bytes = limits.max_bytes;
    config.max_messages = limits.max_msgs;
    config.max_message_size = limits.max_msg_size;
    config.discard = limits.discard;
    let stream = js
        .get_or_create_stream(config.clone())
        .await
        .map_err(|e| store_error(spec.name, e))?;
    let mut current = stream.cached_info().config.clone();
    let limited = apply_limits(spec.name, &mut current, limits);
    // Deletes and purges once denied stay denied (the server refuses to clear them).
    config.deny_delete |= current.deny_delete;
    config.deny_purge |= current.deny_purge;
    if limited
        || current.max_age != spec.max_age
        || current.duplicate_window != spec.duplicate_window
        || current.num_replicas != config.num_replicas
        || current.subjects != config.subjects
    {
        js.update_stream(config)
            .await
            .map_err(|e| store_error(spec.name, e))?;
    }
    Ok(stream)
}

/// Limits of a stream of bulwark's own records (`max_record_bytes` each).
fn record_limits(
    bytes: impl Fn(&StorageConfig) -> i64,
    msgs: impl Fn(&StorageConfig) -> i64,
    discard: stream::DiscardPolicy,
) -> Limits {
    let s = storage();
    Limits {
        max_bytes: bytes(&s),
        max_msgs: msgs(&s),
        max_msg_size: s.max_record_bytes,
        discard,
    }
}

/// Creates the task queue stream when missing.
pub async fn tasks(js: &jetstream::Context) -> Result<stream::Stream, StoreError> {
    ensure(
        js,
        Spec {
            name: TASKS_STREAM,
            description: "bulwark task queue: approved intents waiting for a worker",
            subjects: &[subjects::TASK_QUEUE_ALL],
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            limits: record_limits(
                |s| s.tasks_max_bytes,
                |s| s.tasks_max_msgs,
                stream::DiscardPolicy::New,
            ),
        },
    )
    .await
}

/// Creates the narrative stream when missing.
pub async fn narratives(js: &jetstream::Context) -> Result<stream::Stream, StoreError> {
    ensure(
        js,
        Spec {
            name: NARRATIVES_STREAM,
            description: "bulwark 5W1H narratives, in order",
            subjects: &[subjects::NARRATIVE_ALL],
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            limits: record_limits(
                |s| s.narratives_max_bytes,
                |_| -1,
                stream::DiscardPolicy::Old,
            ),
        },
    )
    .await
}

/// Stream of clarity's hash-chained audit records.
pub const AUDIT_STREAM: &str = "BULWARK_AUDIT";
/// KV bucket holding the head (`{seq, hash}`) of the audit chain.
pub const AUDIT_HEAD_BUCKET: &str = "bulwark_audit_head";

/// Creates the audit stream when missing, brings its retention (`max_age`, zero for forever)
/// and duplicate window up to date when they changed, and denies deleting or purging its records
/// (`deny_delete`, `deny_purge`; an existing stream is conformed, logged). Records then leave
/// only by expiry.
pub async fn audit(
    js: &jetstream::Context,
    max_age: Duration,
    duplicate_window: Duration,
) -> Result<stream::Stream, StoreError> {
    let stream = ensure(
        js,
        Spec {
            name: AUDIT_STREAM,
            description: "bulwark clarity audit: every narrative, hash-chained, in order",
            subjects: &[subjects::CLARITY_AUDIT],
            retention: stream::RetentionPolicy::Limits,
            max_age,
            duplicate_window,
            limits: record_limits(|s| s.audit_max_bytes, |_| -1, stream::DiscardPolicy::New),
        },
    )
    .await?;
    let config = &stream.cached_info().config;
    if config.deny_delete && config.deny_purge {
        return Ok(stream);
    }
    let mut config = config.clone();
    tracing::info!(
        stream = AUDIT_STREAM,
        deny_delete = config.deny_delete,
        deny_purge = config.deny_purge,
        "denying deletes and purges of audit records"
    );
    config.deny_delete = true;
    config.deny_purge = true;
    js.update_stream(config)
        .await
        .map_err(|e| store_error(AUDIT_STREAM, e))?;
    js.get_stream(AUDIT_STREAM)
        .await
        .map_err(|e| store_error(AUDIT_STREAM, e))
}

/// Stream of parked (shed) tasks, replayable into the queue.
pub const TASKS_PARKED_STREAM: &str = "BULWARK_TASKS_PARKED";
/// Stream of tasks that failed after their last attempt.
pub const TASKS_DEAD_STREAM: &str = "BULWARK_TASKS_DEAD";

/// Creates the parked-task stream (a work queue: replay removes what it brings back).
pub async fn tasks_parked(js: &jetstream::Context) -> Result<stream::Stream, StoreError> {
    ensure(
        js,
        Spec {
            name: TASKS_PARKED_STREAM,
            description: "bulwark shed tasks, parked until replayed",
            subjects: &[subjects::TASK_PARKED_ALL],
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            limits: record_limits(|s| s.parked_max_bytes, |_| -1, stream::DiscardPolicy::New),
        },
    )
    .await
}

/// Creates the dead-task stream (kept until an operator removes them).
pub async fn tasks_dead(js: &jetstream::Context) -> Result<stream::Stream, StoreError> {
    ensure(
        js,
        Spec {
            name: TASKS_DEAD_STREAM,
            description: "bulwark tasks that failed after their last attempt, with history",
            subjects: &[subjects::TASK_DEAD],
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            limits: record_limits(|s| s.dead_max_bytes, |_| -1, stream::DiscardPolicy::Old),
        },
    )
    .await
}

/// Stream capturing every trigger mesh event: the services' own on `mesh.>`, and those of
/// agents, people and workers on `ingress.mesh.>` (where the accounts' imports put them).
pub const MESH_STREAM: &str = "BULWARK_MESH";
/// KV bucket holding the mesh circuit breaker's state (key [`BREAKER_KEY`]).
pub const BREAKER_BUCKET: &str = "bulwark_breaker";
/// Key of the mesh-wide breaker in [`BREAKER_BUCKET`].
pub const BREAKER_KEY: &str = "mesh";
/// KV bucket of the last run of each playbook (key: the playbook's name).
pub const PLAYBOOK_RUNS_BUCKET: &str = "bulwark_playbook_runs";
/// KV bucket of per-event-type rate limits the mesh consumers obey (key: the event type).
pub const LIMITS_BUCKET: &str = "bulwark_mesh_limits";

/// Creates the mesh stream when missing, and brings its retention (`max_age`, zero for
/// forever) and duplicate window up to date when they changed.
///
/// `max_msg_size` is `mesh.max_event_bytes`: the server refuses a larger event, so no consumer
/// is ever handed (and no dead letter ever stores) more than it accepts.
pub async fn mesh(
    js: &jetstream::Context,
    max_age: Duration,
    duplicate_window: Duration,
    max_msg_size: i32,
) -> Result<stream::Stream, StoreError> {
    ensure(
        js,
        Spec {
            name: MESH_STREAM,
            description: "bulwark trigger mesh: every mesh.> event of the services and ingress.mesh.> event of other accounts, in order",
            subjects: &[subjects::MESH_ALL, subjects::MESH_INGRESS_ALL],
            retention: stream::RetentionPolicy::Limits,
            max_age,
            duplicate_window,
            limits: Limits {
                max_bytes: storage().mesh_max_bytes,
                max_msgs: -1,
                max_msg_size,
                discard: stream::DiscardPolicy::Old,
            },
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_at_a_limit_names_the_stream_and_the_limit() {
        let full = limit_refusal(TASKS_STREAM, "maximum messages exceeded").expect("a limit");
        assert!(
            full.contains(TASKS_STREAM) && full.contains("max_msgs"),
            "{full}"
        );
        let bytes = limit_refusal("x", "nats: maximum bytes exceeded").expect("a limit");
        assert!(bytes.contains("max_bytes"), "{bytes}");
        assert_eq!(limit_refusal("x", "timed out"), None);
    }

    #[test]
    fn a_replicated_stream_gets_its_share_per_copy() {
        let limits = Limits {
            max_bytes: 300,
            max_msgs: -1,
            max_msg_size: 10,
            discard: stream::DiscardPolicy::Old,
        };
        assert_eq!(limits.per_replica(3).max_bytes, 100);
        assert_eq!(limits.per_replica(0).max_bytes, 300);
    }
}
