//! The mesh consumer every service that reacts to trigger mesh events builds on, and the circuit
//! breaker record it obeys.
//!
//! A [`MeshConsumer`] reads the `BULWARK_MESH` stream (every `mesh.>` event) through two durable
//! pull consumers: `<name>` for everything and `<name>_critical` for the events that pass an
//! open breaker ([`subjects::MESH_CRITICAL`]: emergencies, breaker transitions, critical
//! alerts). For each event it:
//! - **normalises** it ([`MeshEvent::normalise_assigning`] with ids derived from the stream
//!   sequence, so every consumer sees the same `event_id` for a partial event);
//! - **dead-letters** a malformed one: a `mesh.deadletter` event with the reason, stored once
//!   however many consumers find it (`Nats-Msg-Id` = `deadletter:<stream_seq>`), counted and
//!   narrated;
//! - **honours the breaker** (KV bucket `bulwark_breaker`, watched): while it is open the main
//!   consumer fetches nothing, so non-critical events stay stored and are processed in stream
//!   order once it closes; half-open it processes at most `mesh.half_open_probe` of them;
//! - **paces each event type** to `mesh.storm_threshold` per second with GCRA ([`Pacer`]), or
//!   to the lower limit an operator or a playbook set for it (KV bucket `bulwark_mesh_limits`,
//!   watched, [`RateLimit`]): an event over the rate is not dropped but deferred (negatively
//!   acknowledged with the delay of its reserved slot) and processed when its slot comes;
//! - **holds a limited identity's events** ([`IdentityLimit`], key `identity=<identity>` in the
//!   same bucket, set by the storm guard when an identity of another account goes over its
//!   budget): an event whose ingress subject names that identity is negatively acknowledged
//!   with a delay until the limit is due, so it stays stored and comes again in stream order,
//!   while other identities' and the services' events flow;
//! - hands the event to the service's handler and acknowledges it only after the handler
//!   succeeded (a failure is negatively acknowledged and redelivered); a redelivery of an event
//!   it already handled (the acknowledgement was lost, e.g. with a crashed broker) is
//!   acknowledged again without handling it twice (the last 65,536 handled, in memory).
//!
//! # Subjects
//! Consumes `mesh.>` (stream `BULWARK_MESH`) and the `bulwark_breaker` and
//! `bulwark_mesh_limits` KV buckets. Produces
//! `mesh.deadletter` and `clarity.narrative.<who>` (`mesh_event_dead_lettered`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::MeshConfig;
use crate::envelope::{Assigned, MeshEvent};
use crate::narrative::Narrator;
use crate::{streams, subjects};

/// How long one pull request waits for events; also the longest a shutdown waits for it.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// Delay before a failed event is redelivered.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Bytes of a malformed body kept in its dead letter.
const DEADLETTER_EXCERPT: usize = 1024;

/// The state of the mesh circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Events flow.
    #[default]
    Closed,
    /// Non-critical events are held back.
    Open,
    /// A bounded probe of held events is let through.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// The breaker as stored in the `bulwark_breaker` bucket (key `mesh`): what every storm guard
/// replica and every mesh consumer agrees on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BreakerRecord {
    /// Current state.
    pub state: BreakerState,
    /// When the current state began, milliseconds since the epoch (0: never changed).
    pub since_ms: i64,
    /// Events counted in the window when the breaker last opened.
    pub event_count: u64,
    /// Times the breaker opened so far.
    pub opened_count: u64,
    /// The storm guard instance that made the last transition.
    #[serde(default)]
    pub updated_by: String,
    /// The fencing token of the storm guard lease under which the last automatic transition
    /// was written (0 for a forced one): a replica whose token is older may not overwrite it.
    #[serde(default)]
    pub leader_token: u64,
}

/// How the stored breaker entry read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EntryHealth {
    /// A record that decodes.
    #[default]
    Readable,
    /// No entry (never written, deleted or purged): read as closed.
    Missing,
    /// An entry that does not decode: read as open (see [`watch_breaker`]).
    Unreadable,
}

impl EntryHealth {
    /// `readable`, `missing` or `unreadable`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryHealth::Readable => "readable",
            EntryHealth::Missing => "missing",
            EntryHealth::Unreadable => "unreadable",
        }
    }
}

/// What a watcher of the breaker entry saw: the record to obey and how the entry read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BreakerView {
    /// The record mesh consumers obey: the stored one; closed for a missing entry; open for
    /// an unreadable one.
    pub record: BreakerRecord,
    /// How the entry read.
    pub entry: EntryHealth,
    /// The entry's revision (0: none seen).
    pub revision: u64,
    /// Why it did not decode, with its first bytes (unreadable only).
    pub problem: Option<String>,
}

/// Why a mesh consumer could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A stream or bucket could not be made ready.
    #[error("{0}")]
    Store(#[from] streams::StoreError),
    /// A durable consumer could not be created.
    #[error("could not create the mesh consumer {name}: {reason}")]
    Consumer {
        /// The consumer.
        name: String,
        /// The server's explanation.
        reason: String,
    },
}

/// What the handler learns about an event besides its envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Its sequence in `BULWARK_MESH`.
    pub stream_seq: u64,
    /// True when it came through the critical consumer (it passes an open breaker).
    pub critical: bool,
    /// The breaker state the consumer believed in when it handed the event over.
    pub breaker: BreakerState,
}

/// Counters of a mesh consumer.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Events handled successfully.
    pub processed: AtomicU64,
    /// Of those, critical events.
    pub critical_processed: AtomicU64,
    /// Malformed events dead-lettered by this consumer.
    pub dead_lettered: AtomicU64,
    /// Times an event was deferred by the per-type rate limit.
    pub deferred: AtomicU64,
    /// Times the consumer stopped fetching because the breaker was open (or the probe spent).
    pub holds: AtomicU64,
    /// Handler failures (each event is redelivered).
    pub failures: AtomicU64,
    /// Events offered under a rate limit from `bulwark_mesh_limits`.
    pub limited: AtomicU64,
    /// Times an event was held because its publishing identity was limited (each offer once).
    pub identity_held: AtomicU64,
    /// Redeliveries of events this consumer had already handled (their acknowledgement was
    /// lost, e.g. with a broker that crashed): acknowledged again, not handled twice.
    pub redelivered_skipped: AtomicU64,
    /// Events whose source had already published the same event id (a replay): acknowledged,
    /// not handled again.
    pub replays_skipped: AtomicU64,
    /// Unreadable breaker entries seen (each revision once): the consumer held events while
    /// they lasted.
    pub breaker_unreadable: AtomicU64,
    /// What the consumer obeys and whether it holds events right now.
    obeying: std::sync::Mutex<Obeying>,
}

/// The breaker as a consumer obeys it, for its telemetry.
#[derive(Debug, Clone, Copy, Default)]
struct Obeying {
    state: BreakerState,
    entry: EntryHealth,
    holding_since_ms: Option<i64>,
}

/// A mesh consumer's figures, published in its service's telemetry under `consumer` (the
/// watchdog reads them: a consumer holding events while the storm guard says closed is an
/// alert).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsumerFigures {
    /// Events handled successfully.
    pub processed: u64,
    /// Of those, critical events.
    pub critical_processed: u64,
    /// Malformed events dead-lettered by this consumer.
    pub dead_lettered: u64,
    /// Times an event was deferred by the per-type rate limit.
    pub deferred: u64,
    /// Times the consumer stopped fetching because of the breaker.
    pub holds: u64,
    /// Handler failures.
    pub failures: u64,
    /// Events offered under a rate limit.
    pub limited: u64,
    /// Times an event was held because its publishing identity was limited.
    #[serde(default)]
    pub identity_held: u64,
    /// Redeliveries acknowledged without handling them twice.
    pub redelivered_skipped: u64,
    /// Replays (same source and event id) acknowledged without handling them again.
    #[serde(default)]
    pub replays_skipped: u64,
    /// Unreadable breaker entries seen.
    #[serde(default)]
    pub breaker_unreadable: u64,
    /// The breaker state the consumer obeys.
    #[serde(default)]
    pub breaker_state: BreakerState,
    /// How the stored breaker entry read.
    #[serde(default)]
    pub breaker_entry: EntryHealth,
    /// True while the consumer fetches nothing because of the breaker (open, unreadable, or the
    /// half-open probe spent).
    #[serde(default)]
    pub holding: bool,
    /// Since when it holds, milliseconds since the epoch.
    #[serde(default)]
    pub holding_since_ms: Option<i64>,
    /// When these figures were taken, milliseconds since the epoch.
    #[serde(default)]
    pub reported_ms: i64,
}

impl ConsumerStats {
    /// The figures, typed.
    pub fn figures(&self) -> ConsumerFigures {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let obeying = *self.obeying.lock().unwrap_or_else(|p| p.into_inner());
        ConsumerFigures {
            processed: get(&self.processed),
            critical_processed: get(&self.critical_processed),
            dead_lettered: get(&self.dead_lettered),
            deferred: get(&self.deferred),
            holds: get(&self.holds),
            failures: get(&self.failures),
            limited: get(&self.limited),
            identity_held: get(&self.identity_held),
            redelivered_skipped: get(&self.redelivered_skipped),
            replays_skipped: get(&self.replays_skipped),
            breaker_unreadable: get(&self.breaker_unreadable),
            breaker_state: obeying.state,
            breaker_entry: obeying.entry,
            holding: obeying.holding_since_ms.is_some(),
            holding_since_ms: obeying.holding_since_ms,
            reported_ms: crate::time::now_ms(),
        }
    }

    /// The figures as JSON.
    pub fn snapshot(&self) -> Value {
        serde_json::to_value(self.figures()).unwrap_or(Value::Null)
    }

    /// Records what the consumer obeys and whether it holds.
    fn obey(&self, view: &BreakerView, holding: bool) {
        let mut o = self.obeying.lock().unwrap_or_else(|p| p.into_inner());
        o.state = view.record.state;
        o.entry = view.entry;
        o.holding_since_ms = match (holding, o.holding_since_ms) {
            (false, _) => None,
            (true, Some(since)) => Some(since),
            (true, None) => Some(crate::time::now_ms()),
        };
    }
}

/// True when `subject` is one of [`subjects::MESH_CRITICAL`].
pub fn is_critical(subject: &str) -> bool {
    subjects::MESH_CRITICAL
        .iter()
        .any(|pattern| subject_matches(pattern, subject))
}

/// True when the NATS subject `subject` matches `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

// ---- pacing -------------------------------------------------------------------------------------

/// What [`Pacer::offer`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Process it now.
    Now,
    /// Its slot is this many milliseconds away; offer it again then.
    Later(u64),
}

/// Per-key GCRA (the generic cell rate algorithm) with reservations: each key may pass `rate`
/// events per second with a burst of one second's worth; an event over the rate reserves the
/// next free slot and is told how long to wait, so deferred events keep their order and none
/// is dropped. Pure: the caller passes the time (milliseconds on any monotonic clock).
#[derive(Debug, Clone)]
pub struct Pacer {
    interval_ms: f64,
    tolerance_ms: f64,
    /// Theoretical arrival time per key.
    tat: HashMap<String, f64>,
    /// Slot reserved per deferred event (by stream sequence).
    reserved: HashMap<u64, f64>,
}

/// Keys and reservations kept before idle ones are pruned.
const PACER_PRUNE_AT: usize = 10_000;

impl Pacer {
    /// A pacer letting `rate` events per second through per key (at least 1).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let interval_ms = 1000.0 / rate;
        Self {
            interval_ms,
            tolerance_ms: interval_ms * (rate - 1.0),
            tat: HashMap::new(),
            reserved: HashMap::new(),
        }
    }

    /// Offers event `seq` of `key` at `now_ms`.
    pub fn offer(&mut self, key: &str, seq: u64, now_ms: u64) -> Pace {
        self.offer_at_rate(key, seq, now_ms, None)
    }

    /// Offers event `seq` of `key` at `now_ms`, paced to `rate` per second instead of the
    /// pacer's own rate when one is given (a limit set for this key).
    pub fn offer_at_rate(&mut self, key: &str, seq: u64, now_ms: u64, rate: Option<u64>) -> Pace {
        let (interval_ms, tolerance_ms) = match rate {
            Some(rate) => {
                let rate = rate.max(1) as f64;
                (1000.0 / rate, 1000.0 / rate * (rate - 1.0))
            }
            None => (self.interval_ms, self.tolerance_ms),
        };
        let now = now_ms as f64;
        if let Some(&due) = self.reserved.get(&seq) {
            if now >= due {
                self.reserved.remove(&seq);
                return Pace::Now;
            }
            return Pace::Later((due - now).ceil() as u64);
        }
        if self.tat.len() > PACER_PRUNE_AT {
            self.tat.retain(|_, tat| *tat > now);
        }
        if self.reserved.len() > PACER_PRUNE_AT {
            // Reservations of events another instance processed are never claimed.
            let stale = now - 600_000.0;
            self.reserved.retain(|_, due| *due > stale);
        }
        let tat = self.tat.get(key).copied().unwrap_or(now).max(now);
        self.tat.insert(key.to_owned(), tat + interval_ms);
        if tat - now <= tolerance_ms {
            return Pace::Now;
        }
        let due = tat - tolerance_ms;
        self.reserved.insert(seq, due);
        Pace::Later((due - now).ceil() as u64)
    }
}

// ---- the consumer -------------------------------------------------------------------------------

/// A service's reader of the trigger mesh (see the module documentation).
pub struct MeshConsumer {
    name: String,
    js: jetstream::Context,
    cfg: MeshConfig,
    narrator: Narrator,
    stats: Arc<ConsumerStats>,
    main: PullConsumer,
    critical: PullConsumer,
    breaker: watch::Receiver<BreakerView>,
    limits: watch::Receiver<Arc<Limits>>,
    handled: std::sync::Mutex<Handled>,
}

/// How many handled stream sequences a consumer remembers.
const HANDLED_MEMORY: usize = 65_536;

/// The stream sequences a consumer handled most recently, so an event redelivered because its
/// acknowledgement was lost (the broker crashed after the handler ran) is acknowledged again
/// instead of handled twice. In memory: a restarted service does not remember, and an event
/// whose acknowledgement was lost just before a restart is handled again.
#[derive(Default)]
struct Handled {
    order: std::collections::VecDeque<u64>,
    set: std::collections::HashSet<u64>,
    /// `source NUL event_id` of the events handled most recently (a replay is recognised by
    /// its source and id, whatever its stream sequence).
    event_order: std::collections::VecDeque<String>,
    events: std::collections::HashSet<String>,
}

impl Handled {
    fn seen_event(&self, key: &str) -> bool {
        self.events.contains(key)
    }

    fn insert_event(&mut self, key: String) {
        if self.events.insert(key.clone()) {
            self.event_order.push_back(key);
            while self.event_order.len() > HANDLED_MEMORY {
                if let Some(old) = self.event_order.pop_front() {
                    self.events.remove(&old);
                }
            }
        }
    }

    fn contains(&self, seq: u64) -> bool {
        self.set.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        if self.set.insert(seq) {
            self.order.push_back(seq);
            while self.order.len() > HANDLED_MEMORY {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

impl MeshConsumer {
    /// Makes the mesh stream, the breaker bucket and the durable consumers `name` and
    /// `<name>_critical` ready, and starts watching the breaker (until `shutdown`).
    pub async fn start(
        js: jetstream::Context,
        cfg: &MeshConfig,
        name: &str,
        narrator: Narrator,
        shutdown: &CancellationToken,
    ) -> Result<Self, MeshError> {
        let stream = mesh_stream(&js, cfg).await?;
        let bucket = breaker_bucket(&js).await?;
        let limits = limits_bucket(&js).await?;
        let durable = |durable: String, description: String, filters: Vec<String>| {
            let stream = stream.clone();
            let cfg = cfg.clone();
            async move {
                stream
                    .get_or_create_consumer(
                        &durable,
                        consumer::pull::Config {
                            durable_name: Some(durable.clone()),
                            description: Some(description),
                            ack_policy: AckPolicy::Explicit,
                            ack_wait: Duration::from_secs_f64(cfg.ack_wait_s),
                            max_ack_pending: cfg.max_ack_pending,
                            deliver_policy: DeliverPolicy::All,
                            filter_subjects: filters,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| MeshError::Consumer {
                        name: durable,
                        reason: e.to_string(),
                    })
            }
        };
        let main = durable(
            name.to_owned(),
            format!("{name}: every mesh event, held while the breaker is open"),
            Vec::new(),
        )
        .await?;
        let critical = durable(
            format!("{name}_critical"),
            format!("{name}: mesh events that pass an open breaker"),
            subjects::MESH_CRITICAL
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
        .await?;
        Ok(Self {
            name: name.to_owned(),
            js,
            cfg: cfg.clone(),
            narrator,
            stats: Arc::new(ConsumerStats::default()),
            main,
            critical,
            breaker: watch_breaker(bucket, shutdown.clone()),
            limits: watch_limits(limits, shutdown.clone()),
            handled: Default::default(),
        })
    }

    /// Counters of this consumer.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// The breaker as this consumer currently sees it.
    pub fn breaker(&self) -> watch::Receiver<BreakerView> {
        self.breaker.clone()
    }

    /// Hands every event to `handler` until `shutdown`; the event is acknowledged when the
    /// handler returns `Ok`, redelivered after an `Err` (the reason is logged and counted).
    pub async fn run<F, Fut>(self, shutdown: CancellationToken, handler: F)
    where
        F: Fn(MeshEvent, Delivery) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let this = Arc::new(self);
        let critical = tokio::spawn(
            this.clone()
                .critical_loop(shutdown.clone(), handler.clone()),
        );
        this.main_loop(shutdown, handler).await;
        let _ = critical.await;
    }

    async fn critical_loop<F, Fut>(self: Arc<Self>, shutdown: CancellationToken, handler: F)
    where
        F: Fn(MeshEvent, Delivery) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let Some(mut batch) = self
                .fetch(
                    &self.critical,
                    self.cfg.fetch_batch,
                    &mut backoff,
                    &shutdown,
                )
                .await
            else {
                continue;
            };
            while let Some(Ok(msg)) = batch.next().await {
                let breaker = self.breaker.borrow().record.state;
                self.deliver(&msg, true, breaker, &handler).await;
            }
        }
    }

    async fn main_loop<F, Fut>(&self, shutdown: CancellationToken, handler: F)
    where
        F: Fn(MeshEvent, Delivery) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut breaker = self.breaker.clone();
        let mut pacer = Pacer::new(self.cfg.storm_threshold);
        let clock = tokio::time::Instant::now();
        let mut probe = Probe::default();
        let mut backoff = Duration::from_millis(100);
        let mut unreadable_seen = 0;
        while !shutdown.is_cancelled() {
            // Wait while the breaker holds events back.
            let view = breaker.borrow_and_update().clone();
            if view.entry == EntryHealth::Unreadable && view.revision != unreadable_seen {
                unreadable_seen = view.revision;
                self.unreadable_breaker(&view).await;
            }
            let record = view.record.clone();
            let allowed = probe.allowance(&record, self.cfg.half_open_probe, self.cfg.fetch_batch);
            self.stats.obey(&view, allowed == 0);
            if allowed == 0 {
                self.stats.holds.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(consumer = %self.name, state = record.state.as_str(), entry = view.entry.as_str(), "mesh consumer holding events");
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    changed = breaker.changed() => if changed.is_err() { break },
                }
                continue;
            }
            let Some(mut batch) = self
                .fetch(&self.main, allowed, &mut backoff, &shutdown)
                .await
            else {
                continue;
            };
            while let Some(Ok(msg)) = batch.next().await {
                if is_critical(&msg.subject) {
                    // The critical consumer handles it, whatever the breaker.
                    ack(&msg).await;
                    continue;
                }
                let record = breaker.borrow().record.clone();
                if probe.allowance(&record, self.cfg.half_open_probe, 1) == 0 {
                    // The breaker opened mid-batch: give it back, to come again in order.
                    nak(&msg, None).await;
                    continue;
                }
                if let Some(wait) = self.identity_hold(&msg.subject) {
                    // Its identity is over its budget: held for it alone, offered again when
                    // the limit is due (in stream order), never dropped.
                    self.stats.identity_held.fetch_add(1, Ordering::Relaxed);
                    nak(&msg, Some(wait)).await;
                    continue;
                }
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                let key = subjects::mesh_subject(&msg.subject)
                    .map(|m| m.event_type)
                    .unwrap_or(&msg.subject)
                    .to_owned();
                let now = clock.elapsed().as_millis() as u64;
                let limit = self
                    .limits
                    .borrow()
                    .types
                    .get(&key)
                    .filter(|l| l.until_ms > crate::time::now_ms())
                    .map(|l| l.limit_per_second.min(self.cfg.storm_threshold));
                if limit.is_some() {
                    self.stats.limited.fetch_add(1, Ordering::Relaxed);
                }
                if let Pace::Later(ms) = pacer.offer_at_rate(&key, seq, now, limit) {
                    self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                    nak(&msg, Some(Duration::from_millis(ms.max(1)))).await;
                    continue;
                }
                if record.state == BreakerState::HalfOpen {
                    probe.spend();
                }
                self.deliver(&msg, false, record.state, &handler).await;
            }
        }
    }

    /// How long to hold an event whose publishing identity is limited (until its limit is due,
    /// at least a millisecond); `None` when it may go on.
    fn identity_hold(&self, subject: &str) -> Option<Duration> {
        let identity = subjects::mesh_subject(subject)?.identity?;
        let now = crate::time::now_ms();
        let limits = self.limits.borrow();
        let limit = limits.identity(identity, now)?;
        Some(Duration::from_millis((limit.until_ms - now).max(1) as u64))
    }

    /// Counts, logs and narrates an unreadable breaker entry: the consumer holds non-critical
    /// events until the entry reads again (the storm guard's leader overwrites it).
    async fn unreadable_breaker(&self, view: &BreakerView) {
        self.stats
            .breaker_unreadable
            .fetch_add(1, Ordering::Relaxed);
        let problem = view.problem.clone().unwrap_or_default();
        tracing::warn!(consumer = %self.name, revision = view.revision, %problem, "breaker entry unreadable: holding non-critical events until it is repaired");
        let n = self
            .narrator
            .narrative("breaker_entry_unreadable", "mesh consumer, KV bucket bulwark_breaker")
            .why(format!(
                "the stored breaker entry (revision {}) does not decode: {problem}",
                view.revision
            ))
            .why("non-critical events are held (stored, processed in order once it reads again); critical events still pass")
            .why("the storm guard's leader overwrites an unreadable entry with its state")
            .context(json!({"consumer": self.name, "revision": view.revision, "problem": problem}));
        self.narrator.publish(n).await;
    }

    async fn fetch(
        &self,
        consumer: &PullConsumer,
        max: usize,
        backoff: &mut Duration,
        shutdown: &CancellationToken,
    ) -> Option<consumer::pull::Batch> {
        let batch = consumer
            .batch()
            .max_messages(max)
            .expires(FETCH_WAIT)
            .messages()
            .await;
        match batch {
            Ok(batch) => {
                *backoff = Duration::from_millis(100);
                Some(batch)
            }
            Err(err) => {
                tracing::warn!(consumer = %self.name, error = %err, "cannot pull mesh events; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(*backoff) => {}
                }
                *backoff = (*backoff * 2).min(Duration::from_secs(5));
                None
            }
        }
    }

    fn remembered(&self, seq: u64) -> bool {
        self.handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(seq)
    }

    /// Normalises `msg` and hands it to `handler` (or dead-letters it), then acknowledges. A
    /// redelivery of an event this consumer already handled is only acknowledged again.
    async fn deliver<F, Fut>(
        &self,
        msg: &jetstream::Message,
        critical: bool,
        breaker: BreakerState,
        handler: &F,
    ) where
        F: Fn(MeshEvent, Delivery) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let (seq, stored_ms) = match msg.info() {
            Ok(info) => (
                info.stream_sequence,
                (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
            ),
            Err(_) => (0, crate::time::now_ms()),
        };
        // Not only when the delivery count says "redelivered": a broker restarted from its disk
        // may have lost the consumer's last acknowledgements and delivery counts with them.
        if seq != 0 && self.remembered(seq) {
            self.stats
                .redelivered_skipped
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(consumer = %self.name, seq, "redelivered event already handled; acknowledged again");
            ack(msg).await;
            return;
        }
        let event = MeshEvent::normalise_assigning(
            &msg.subject,
            &msg.payload,
            self.cfg.max_event_bytes,
            || Assigned::stored(seq, stored_ms),
        )
        .and_then(|event| stamp_sender(event, &msg.subject));
        let event = match event {
            Ok(event) => event,
            Err(reason) => {
                match self
                    .dead_letter(&msg.subject, &msg.payload, seq, &reason)
                    .await
                {
                    Ok(()) => ack(msg).await,
                    Err(err) => {
                        tracing::warn!(consumer = %self.name, error = %err, "dead letter not stored; the event will be redelivered");
                        nak(msg, Some(RETRY_DELAY)).await;
                    }
                }
                return;
            }
        };
        let delivery = Delivery {
            stream_seq: seq,
            critical,
            breaker,
        };
        let event_id = event.event_id.clone();
        let replay_key = format!("{}\u{0}{}", event.source, event.event_id);
        if self
            .handled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen_event(&replay_key)
        {
            // The same source published the same event id again: a replay, not a new event.
            self.stats.replays_skipped.fetch_add(1, Ordering::Relaxed);
            tracing::info!(consumer = %self.name, %event_id, seq, "replayed mesh event (same source and event id) not handled again");
            ack(msg).await;
            return;
        }
        match handler(event, delivery).await {
            Ok(()) => {
                {
                    let mut handled = self.handled.lock().unwrap_or_else(|p| p.into_inner());
                    if seq != 0 {
                        handled.insert(seq);
                    }
                    handled.insert_event(replay_key);
                }
                self.stats.processed.fetch_add(1, Ordering::Relaxed);
                if critical {
                    self.stats
                        .critical_processed
                        .fetch_add(1, Ordering::Relaxed);
                }
                ack(msg).await;
            }
            Err(reason) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(consumer = %self.name, event_id = %event_id, %reason, "mesh event not handled; it will be redelivered");
                nak(msg, Some(RETRY_DELAY)).await;
            }
        }
    }

    /// Writes the dead letter of the malformed event at `seq` (once, whoever finds it first),
    /// counts and narrates it.
    async fn dead_letter(
        &self,
        subject: &str,
        body: &[u8],
        seq: u64,
        reason: &str,
    ) -> Result<(), String> {
        let stored = dead_letter_event(&self.name, subject, body, seq, reason);
        let publish = PublishMessage::build()
            .payload(crate::api::to_bytes(&stored))
            .message_id(private_id(&format!("deadletter:{seq}")));
        let ack = self
            .js
            .send_publish(subjects::MESH_DEADLETTER, publish)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if ack.duplicate {
            return Ok(());
        }
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::info!(consumer = %self.name, %subject, seq, %reason, "mesh event dead-lettered");
        let narrative = self
            .narrator
            .narrative("mesh_event_dead_lettered", "mesh envelope normalisation")
            .why(format!(
                "event on {subject} (stream sequence {seq}) is malformed: {reason}"
            ))
            .why(format!(
                "written to {} with the reason",
                subjects::MESH_DEADLETTER
            ))
            .context(
                json!({"subject": subject, "stream_seq": seq, "reason": reason,
                            "bytes": body.len(), "dead_letter_id": stored.event_id}),
            );
        self.narrator.publish(narrative).await;
        Ok(())
    }
}

/// `event` with the facts that come from where it arrived: an event on
/// `ingress.mesh.<identity>.<type>` was published by a client of another account, and
/// `nats.conf`'s import put the identity in the subject; [`MeshEvent::from_identity`] makes it
/// that identity's root event. An event on `mesh.<type>` was published inside bulwark's account
/// by a service, and its body's causal facts stand.
pub fn stamp_sender(event: MeshEvent, subject: &str) -> Result<MeshEvent, String> {
    match subjects::mesh_subject(subject).and_then(|m| m.identity) {
        Some(identity) => event.from_identity(identity),
        None => Ok(event),
    }
}

/// The `mesh.deadletter` event for a malformed body: a root envelope whose payload holds the
/// reason, the original subject and stream sequence, and the start of the body.
pub fn dead_letter_event(
    who: &str,
    subject: &str,
    body: &[u8],
    seq: u64,
    reason: &str,
) -> MeshEvent {
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(DEADLETTER_EXCERPT)]).into_owned();
    let reason = crate::api::bounded(reason.to_owned(), crate::api::MAX_MESSAGE_BYTES);
    MeshEvent::root(
        "deadletter",
        who,
        json!({"reason": reason, "subject": subject, "stream_seq": seq, "bytes": body.len(),
               "body": excerpt}),
    )
}

/// Probe accounting of one consumer during one half-open episode.
#[derive(Debug, Default)]
struct Probe {
    episode: i64,
    used: u64,
}

impl Probe {
    /// Events the consumer may fetch now under `record` (0: hold).
    fn allowance(&mut self, record: &BreakerRecord, probe: u64, batch: usize) -> usize {
        match record.state {
            BreakerState::Closed => batch,
            BreakerState::Open => 0,
            BreakerState::HalfOpen => {
                if self.episode != record.since_ms {
                    self.episode = record.since_ms;
                    self.used = 0;
                }
                (probe.saturating_sub(self.used) as usize).min(batch)
            }
        }
    }

    fn spend(&mut self) {
        self.used += 1;
    }
}

async fn ack(msg: &jetstream::Message) {
    if let Err(err) = msg.ack().await {
        tracing::debug!(error = %err, "mesh ack not sent; the event may be redelivered");
    }
}

async fn nak(msg: &jetstream::Message, delay: Option<Duration>) {
    if let Err(err) = msg.ack_with(AckKind::Nak(delay)).await {
        tracing::debug!(error = %err, "mesh nak not sent; redelivery after ack_wait");
    }
}

/// Creates (or updates) the mesh stream with the retention of `cfg`, and loads the key of
/// [`private_id`] (created once per deployment).
pub async fn mesh_stream(
    js: &jetstream::Context,
    cfg: &MeshConfig,
) -> Result<jetstream::stream::Stream, streams::StoreError> {
    let stream = streams::mesh(
        js,
        Duration::from_secs(cfg.max_age_days.saturating_mul(86_400)),
        Duration::from_secs_f64(cfg.duplicate_window_s),
        i32::try_from(cfg.max_event_bytes).unwrap_or(i32::MAX),
    )
    .await?;
    load_id_key(js).await?;
    Ok(stream)
}

// ---- private deduplication ids ------------------------------------------------------------------

/// The deployment's key for [`private_id`], loaded by [`mesh_stream`].
static ID_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Key of the deduplication id key in [`streams::SECRETS_BUCKET`].
const ID_KEY_NAME: &str = "mesh_msg_id";

async fn load_id_key(js: &jetstream::Context) -> Result<(), streams::StoreError> {
    if ID_KEY.get().is_some() {
        return Ok(());
    }
    let bucket = streams::bucket(
        js,
        streams::SECRETS_BUCKET,
        "bulwark's own secrets (e.g. the key of the mesh's deduplication ids); readable only inside bulwark's account",
    )
    .await?;
    let fresh = format!(
        "{}{}",
        uuid::Uuid::now_v7().simple(),
        uuid::Uuid::now_v7().simple()
    );
    // The first service to get here creates it; everyone else reads that one.
    let _ = bucket.create(ID_KEY_NAME, fresh.clone().into()).await;
    let key = match bucket.get(ID_KEY_NAME).await {
        Ok(Some(value)) => String::from_utf8_lossy(&value).into_owned(),
        Ok(None) | Err(_) => {
            return Err(streams::StoreError {
                name: streams::SECRETS_BUCKET.to_owned(),
                reason: "the deduplication id key could not be read".to_owned(),
            });
        }
    };
    let _ = ID_KEY.set(key);
    Ok(())
}

/// The `Nats-Msg-Id` under which a service stores an event whose natural id (`raw`, e.g.
/// `storm:<type>:<second>`) anyone could predict: a keyed hash of it. Replicas of a service
/// agree on it (they share the key), so their duplicates still collapse; a client of another
/// account, whose events share the mesh stream, cannot compute it, so it cannot pre-publish an
/// id to make a real incident vanish as a "duplicate".
pub fn private_id(raw: &str) -> String {
    use sha2::{Digest, Sha256};
    let key = ID_KEY.get().map(String::as_str).unwrap_or_default();
    let mut hash = Sha256::new();
    hash.update(key.as_bytes());
    hash.update([0u8]);
    hash.update(raw.as_bytes());
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("p:{hex}")
}

/// Opens the breaker bucket, creating it when missing.
pub async fn breaker_bucket(js: &jetstream::Context) -> Result<kv::Store, streams::StoreError> {
    streams::bucket(
        js,
        streams::BREAKER_BUCKET,
        "bulwark mesh circuit breaker state",
    )
    .await
}

/// A limit on one event type's delivery rate, set by `storm_guard.limit` (an operator or a
/// playbook) and obeyed by every mesh consumer until `until_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    /// The limited type.
    pub event_type: String,
    /// Events of the type delivered per second, at most.
    pub limit_per_second: u64,
    /// When the limit lapses, milliseconds since the epoch.
    pub until_ms: i64,
    /// Who set it (a playbook run, an operator).
    pub set_by: String,
    /// Why.
    pub reason: String,
}

/// Opens the rate-limit bucket, creating it when missing.
pub async fn limits_bucket(js: &jetstream::Context) -> Result<kv::Store, streams::StoreError> {
    streams::bucket(
        js,
        streams::LIMITS_BUCKET,
        "bulwark per-event-type rate limits the mesh consumers obey",
    )
    .await
}

/// Which entries [`follow_kv`] watches.
enum Watched {
    /// One key, from its latest value.
    Key(&'static str),
    /// Every key, from the start of the bucket.
    All,
}

/// Hands every entry of `watched` to `on_entry` until `shutdown`, re-establishing the watch
/// after an error (`what` names it in the logs).
fn follow_kv(
    bucket: kv::Store,
    watched: Watched,
    what: &'static str,
    shutdown: CancellationToken,
    mut on_entry: impl FnMut(kv::Entry) + Send + 'static,
) {
    tokio::spawn(async move {
        while !shutdown.is_cancelled() {
            let watch = match watched {
                Watched::Key(key) => bucket.watch_with_history(key).await,
                Watched::All => bucket.watch_all_from_revision(1).await,
            };
            let mut entries = match watch {
                Ok(entries) => entries,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot watch {what}; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let entry = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    entry = entries.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => on_entry(entry),
                    Some(Err(err)) => tracing::debug!(error = %err, "{what} watch error"),
                    None => break,
                }
            }
        }
    });
}

/// Prefix of an identity's key in the rate-limit bucket, `identity=<identity>` (event types,
/// dot-separated tokens of `[a-z0-9_-]`, never contain `=`).
pub const IDENTITY_LIMIT_PREFIX: &str = "identity=";

/// The key of `identity`'s limit in the rate-limit bucket; `None` when the identity has
/// characters a KV key cannot hold.
pub fn identity_limit_key(identity: &str) -> Option<String> {
    let valid = !identity.is_empty()
        && identity
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    valid.then(|| format!("{IDENTITY_LIMIT_PREFIX}{identity}"))
}

/// A publishing identity over its budget, set by the storm guard (key
/// [`identity_limit_key`] in the rate-limit bucket): every mesh consumer holds that identity's
/// events until `until_ms` (they stay stored and are delivered in order afterwards), while
/// other identities' and the services' events flow. The storm guard extends it while the
/// identity stays over its budget and deletes it when it lifts; a record whose `until_ms` has
/// passed is not obeyed (a limit never outlives a stopped storm guard by more than its cooldown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityLimit {
    /// The limited identity.
    pub identity: String,
    /// When it began, milliseconds since the epoch.
    pub since_ms: i64,
    /// When it is reconsidered, milliseconds since the epoch.
    pub until_ms: i64,
    /// Its events in the window at the crossing event.
    pub event_count: u64,
    /// Its budget: events per `window_s`.
    pub budget: u64,
    /// The budget's window, seconds.
    pub window_s: f64,
    /// Who set it (the storm guard instance).
    pub set_by: String,
    /// Why.
    pub reason: String,
}

/// Every limit in the rate-limit bucket: per event type and per identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Per-type rate limits, by event type.
    pub types: HashMap<String, RateLimit>,
    /// Identity limits, by identity.
    pub identities: HashMap<String, IdentityLimit>,
}

impl Limits {
    /// The limit `identity` is under at `now_ms`, if any.
    pub fn identity(&self, identity: &str, now_ms: i64) -> Option<&IdentityLimit> {
        self.identities
            .get(identity)
            .filter(|l| l.until_ms > now_ms)
    }

    fn apply(&mut self, entry: &kv::Entry) {
        let put = entry.operation == kv::Operation::Put;
        if let Some(identity) = entry.key.strip_prefix(IDENTITY_LIMIT_PREFIX) {
            if !put {
                self.identities.remove(identity);
                return;
            }
            match serde_json::from_slice::<IdentityLimit>(&entry.value) {
                Ok(limit) => {
                    self.identities.insert(identity.to_owned(), limit);
                }
                Err(err) => {
                    tracing::warn!(key = %entry.key, error = %err, "identity limit entry unreadable; ignored");
                }
            }
            return;
        }
        if !put {
            self.types.remove(&entry.key);
            return;
        }
        match serde_json::from_slice::<RateLimit>(&entry.value) {
            Ok(limit) => {
                self.types.insert(entry.key.clone(), limit);
            }
            Err(err) => {
                tracing::warn!(key = %entry.key, error = %err, "rate limit entry unreadable; ignored");
            }
        }
    }
}

/// Follows every limit in the bucket (per type and per identity) until `shutdown`
/// (re-established after an error); an unreadable entry is ignored with a warning.
pub fn watch_limits(
    bucket: kv::Store,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<Limits>> {
    let (tx, rx) = watch::channel(Arc::new(Limits::default()));
    // The limits are built in place and published once caught up with the bucket (`delta` 0):
    // the replay at start is linear in the bucket's history, not a copy of the map per entry.
    let mut limits = Limits::default();
    follow_kv(
        bucket,
        Watched::All,
        "the rate limits",
        shutdown,
        move |entry| {
            limits.apply(&entry);
            if entry.delta == 0 {
                tx.send_replace(Arc::new(limits.clone()));
            }
        },
    );
    rx
}

/// Follows the breaker's KV entry until `shutdown` (re-established after an error).
///
/// A missing entry reads as closed (nothing was ever decided). An **unreadable** entry reads as
/// **open**, deliberately: a consumer cannot tell whether the breaker opened, and holding loses
/// nothing (non-critical events stay stored and are processed in order once the entry reads
/// again; critical events pass regardless). The storm guard's leader overwrites an unreadable
/// entry with its state as soon as it sees it, and the watchdog alerts when consumers hold while
/// the storm guard reports closed.
pub fn watch_breaker(
    bucket: kv::Store,
    shutdown: CancellationToken,
) -> watch::Receiver<BreakerView> {
    let (tx, rx) = watch::channel(BreakerView::default());
    follow_kv(
        bucket,
        Watched::Key(streams::BREAKER_KEY),
        "the breaker",
        shutdown,
        move |entry| {
            tx.send_replace(view_of(&entry));
        },
    );
    rx
}

/// The view of one breaker entry (see [`watch_breaker`]).
pub fn view_of(entry: &kv::Entry) -> BreakerView {
    if entry.operation != kv::Operation::Put {
        return BreakerView {
            entry: EntryHealth::Missing,
            revision: entry.revision,
            ..Default::default()
        };
    }
    match serde_json::from_slice::<BreakerRecord>(&entry.value) {
        Ok(record) => BreakerView {
            record,
            entry: EntryHealth::Readable,
            revision: entry.revision,
            problem: None,
        },
        Err(err) => BreakerView {
            record: BreakerRecord {
                state: BreakerState::Open,
                ..Default::default()
            },
            entry: EntryHealth::Unreadable,
            revision: entry.revision,
            problem: Some(format!(
                "{err}; it starts {}",
                crate::api::excerpt(&String::from_utf8_lossy(&entry.value), 64)
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn handled_sequences_are_remembered_up_to_the_bound() {
        let mut h = Handled::default();
        for seq in 1..=(HANDLED_MEMORY as u64 + 10) {
            h.insert(seq);
        }
        h.insert(HANDLED_MEMORY as u64 + 10);
        assert!(!h.contains(10), "the oldest are forgotten");
        assert!(h.contains(11));
        assert!(h.contains(HANDLED_MEMORY as u64 + 10));
        assert_eq!(h.order.len(), HANDLED_MEMORY);
        assert_eq!(h.set.len(), HANDLED_MEMORY);
    }

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("mesh.>", "mesh.a.b"));
        assert!(!subject_matches("mesh.>", "mesh"));
        assert!(subject_matches("mesh.*.x", "mesh.a.x"));
        assert!(!subject_matches("mesh.*.x", "mesh.a.b.x"));
        assert!(subject_matches("mesh.a", "mesh.a"));
        assert!(!subject_matches("mesh.a", "mesh.a.b"));
        assert!(is_critical("mesh.event.emergency"));
        assert!(is_critical("mesh.breaker.opened"));
        assert!(!is_critical("mesh.event.incident"));
    }

    #[test]
    fn pacer_defers_the_excess_in_order() {
        let mut pacer = Pacer::new(10);
        let mut later = Vec::new();
        for seq in 0..25 {
            match pacer.offer("flood", seq, 0) {
                Pace::Now => assert!(seq < 10, "burst of one second"),
                Pace::Later(ms) => later.push((seq, ms)),
            }
        }
        assert_eq!(later.len(), 15);
        assert!(
            later.windows(2).all(|w| w[0].1 <= w[1].1),
            "slots keep order"
        );
        assert_eq!(
            pacer.offer("other", 100, 0),
            Pace::Now,
            "keys are independent"
        );
        let (seq, ms) = later[0];
        assert_eq!(pacer.offer("flood", seq, ms - 1), Pace::Later(1));
        assert_eq!(pacer.offer("flood", seq, ms), Pace::Now);
    }

    #[test]
    fn half_open_probe_is_bounded_per_episode() {
        let mut probe = Probe::default();
        let open = BreakerRecord {
            state: BreakerState::Open,
            ..Default::default()
        };
        assert_eq!(probe.allowance(&open, 5, 64), 0);
        let half = BreakerRecord {
            state: BreakerState::HalfOpen,
            since_ms: 7,
            ..Default::default()
        };
        assert_eq!(probe.allowance(&half, 5, 64), 5);
        for _ in 0..5 {
            probe.spend();
        }
        assert_eq!(probe.allowance(&half, 5, 64), 0);
        let again = BreakerRecord {
            since_ms: 9,
            ..half
        };
        assert_eq!(
            probe.allowance(&again, 5, 64),
            5,
            "a new episode has a new probe"
        );
        assert_eq!(probe.allowance(&BreakerRecord::default(), 5, 64), 64);
    }

    proptest! {
        /// Whatever the arrivals, no key passes more than its burst plus its rate over any
        /// stretch of time, and every deferred event passes when offered at its slot.
        #[test]
        fn pacer_never_exceeds_the_rate_and_loses_nothing(
            rate in 1u64..50,
            gaps in proptest::collection::vec(0u64..40, 1..300),
        ) {
            let mut pacer = Pacer::new(rate);
            let mut now = 0;
            let mut passed = Vec::new();
            let mut pending = Vec::new();
            for (seq, gap) in gaps.iter().enumerate() {
                now += gap;
                match pacer.offer("k", seq as u64, now) {
                    Pace::Now => passed.push(now),
                    Pace::Later(ms) => pending.push((seq as u64, now + ms)),
                }
            }
            for (seq, due) in &pending {
                prop_assert_eq!(pacer.offer("k", *seq, *due), Pace::Now);
                passed.push(*due);
            }
            passed.sort_unstable();
            prop_assert_eq!(passed.len(), gaps.len());
            for (i, start) in passed.iter().enumerate() {
                let within = passed[i..].iter().take_while(|t| **t < start + 1000).count() as u64;
                prop_assert!(within <= 2 * rate, "{} events within one second at rate {}", within, rate);
            }
        }
    }
}
