//! The storm guard's I/O: the `mesh.>` subscription feeding [`crate::storm`] and
//! [`crate::breaker`], the breaker record in KV, and the announcements (incidents, advisories,
//! breaker events, narratives), thin around the pure modules.
//!
//! The subscription loop never waits for I/O: what it decides goes, in order, to one
//! announcer task. A breaker transition is announced only by the instance whose
//! compare-and-set on the `bulwark_breaker` entry succeeds; the others adopt the stored record
//! (they watch the entry), so replicas agree and each transition is announced once.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, kv, message::PublishMessage};
use async_nats::service::Request;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::{BulwarkConfig, MeshConfig};
use bulwark_common::envelope::MeshEvent;
use bulwark_common::kv::{self as kvx, Change};
use bulwark_common::mesh::{self, BreakerRecord, BreakerState, EntryHealth};
use bulwark_common::narrative::Narrator;
use bulwark_common::{ids, streams, subjects, telemetry, time};

use crate::breaker::{Breaker, BreakerConfig, Transition};
use crate::budget::{BudgetConfig, IdentityBudgets, LimitChange, LimitStart, Verdict};

mod budgets;
mod ops;
use crate::storm::{StormDetector, StormEnd, StormStart};

/// Name under which the service registers (CONTRACT section 5).
pub const SERVICE_NAME: &str = "storm_guard";
/// Playbook named by storm incidents (seed).
pub const STORM_PLAYBOOK: &str = "trigger_storm_mitigation";
/// Playbook named by the emergency of an opening breaker (seed).
pub const BREAKER_PLAYBOOK: &str = "trigger_mesh_circuit_breaker";
/// Subjects never counted towards storms or the breaker: the safeguards' own events (so
/// enforcement cannot feed itself), and bulwark's bookkeeping of work it already governs (task
/// lifecycle, playbook runs, Layer 2 alerts), whose rate follows the admitted work; counting it
/// would open the breaker under ordinary load (50 tasks/s make 100 task events/s, above the
/// seed's 500 events per 10 s).
const OWN_SUBJECTS: [&str; 8] = [
    "mesh.deadletter",
    "mesh.event.incident",
    "mesh.event.emergency",
    "mesh.breaker.>",
    "mesh.advisory.>",
    "mesh.task.>",
    "mesh.playbook.>",
    "mesh.layer2.>",
];
/// Time given to in-flight work at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StormGuardError {
    /// A stream or bucket could not be made ready.
    #[error("{0}")]
    Store(#[from] streams::StoreError),
    /// The breaker record could not be read or created.
    #[error("breaker record: {0}")]
    Breaker(#[from] kvx::KvError),
    /// The `mesh.>` subscription failed.
    #[error("cannot subscribe to mesh.>: {0}")]
    Subscribe(String),
    /// Registration with NATS micro failed.
    #[error("{0}")]
    Register(String),
}

/// What the service counts; reported in telemetry and `$SRV.STATS`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Every message received on `mesh.>`.
    pub events_seen: AtomicU64,
    /// Of those, the safeguards' own events (not counted towards rates).
    pub own_events: AtomicU64,
    /// Events whose body could not be read (counted, source `unknown`; consumers dead-letter them).
    pub malformed: AtomicU64,
    /// Storms detected.
    pub storms: AtomicU64,
    /// Breaker transitions this instance made and announced.
    pub transitions: AtomicU64,
    /// Times the breaker opened (announced by this instance).
    pub breaker_opened: AtomicU64,
    /// Transitions another replica made first (adopted, not announced).
    pub transitions_adopted: AtomicU64,
    /// Announcements JetStream did not acknowledge.
    pub publish_failures: AtomicU64,
    /// Checks of the stored breaker entry (periodic, every `mesh.breaker_check_s`).
    pub breaker_checks: AtomicU64,
    /// Unreadable or missing breaker entries overwritten with this instance's state.
    pub breaker_repairs: AtomicU64,
    /// Repairs the store refused (retried at the next check).
    pub breaker_repair_failures: AtomicU64,
    /// `storm_guard.breaker.open|close` requests answered 503 because the store refused.
    pub forced_not_stored: AtomicU64,
    /// Counted events the services published themselves (`mesh.>` in bulwark's account).
    pub service_events: AtomicU64,
    /// Counted events published by an identity of another account (`ingress.mesh.<identity>.>`).
    pub identity_events: AtomicU64,
    /// Of those, events of a limited identity: held by the consumers, not counted towards the
    /// breaker.
    pub identity_held: AtomicU64,
    /// Identity limits this instance set and announced.
    pub identity_limits: AtomicU64,
    /// Identity limits extended because the identity stayed over its budget.
    pub identity_limit_extensions: AtomicU64,
    /// Identity limits lifted.
    pub identity_limits_lifted: AtomicU64,
    /// Identity limit records the store refused (or an identity no key can name).
    pub identity_limit_failures: AtomicU64,
}

impl Counters {
    /// The counters as JSON.
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "events_seen": get(&self.events_seen),
            "own_events": get(&self.own_events),
            "malformed": get(&self.malformed),
            "storms": get(&self.storms),
            "transitions": get(&self.transitions),
            "breaker_opened": get(&self.breaker_opened),
            "transitions_adopted": get(&self.transitions_adopted),
            "publish_failures": get(&self.publish_failures),
            "breaker_checks": get(&self.breaker_checks),
            "breaker_repairs": get(&self.breaker_repairs),
            "breaker_repair_failures": get(&self.breaker_repair_failures),
            "forced_not_stored": get(&self.forced_not_stored),
            "service_events": get(&self.service_events),
            "identity_events": get(&self.identity_events),
            "identity_held": get(&self.identity_held),
            "identity_limits": get(&self.identity_limits),
            "identity_limit_extensions": get(&self.identity_limit_extensions),
            "identity_limits_lifted": get(&self.identity_limits_lifted),
            "identity_limit_failures": get(&self.identity_limit_failures),
        })
    }
}

/// The pure state, shared by the subscription loop, the ticker and the status endpoint.
struct Guard {
    storms: StormDetector,
    breaker: Breaker,
    budgets: IdentityBudgets,
}

/// What the subscription loop and the ticker hand to the announcer.
enum Announcement {
    Storm(StormStart),
    StormEnded(StormEnd),
    Transition(Transition, BreakerRecord),
    IdentityLimited(LimitStart),
    IdentityChanged(LimitChange),
}

/// Milliseconds since the epoch from a monotonic clock (cheap enough for every event).
#[derive(Clone, Copy)]
struct Clock {
    base_ms: i64,
    start: tokio::time::Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            base_ms: time::now_ms(),
            start: tokio::time::Instant::now(),
        }
    }
    fn now_ms(&self) -> i64 {
        self.base_ms + self.start.elapsed().as_millis() as i64
    }
}

struct StormGuard {
    js: jetstream::Context,
    bucket: kv::Store,
    /// The rate-limit bucket, where identity limits are stored.
    limits: kv::Store,
    cfg: MeshConfig,
    narrator: Narrator,
    instance: String,
    counters: Arc<Counters>,
    guard: Arc<Mutex<Guard>>,
    clock: Clock,
    /// The `storm_guard` lease: only its holder announces storms and automatic breaker
    /// transitions (every replica counts; forced transitions come from one request and are a
    /// compare-and-set, so any replica may make them).
    leadership: bulwark_common::lease::Leadership,
    /// The breaker record last seen in KV.
    stored: Mutex<BreakerRecord>,
    /// How the stored entry last read.
    entry: Mutex<EntryHealth>,
}

/// The storm guard's endpoints.
#[derive(Debug, Clone, Copy)]
enum Op {
    Status,
    Rates,
    BreakerOpen,
    BreakerClose,
    Limit,
    Throttle,
}

/// Runs the storm guard until `shutdown` is cancelled.
pub async fn run(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), StormGuardError> {
    let timeout = Duration::from_millis(cfg.nats.request_timeout_ms);
    let js = streams::context(client.clone(), timeout);
    streams::narratives(&js).await?;
    mesh::mesh_stream(&js, &cfg.mesh).await?;
    let bucket = mesh::breaker_bucket(&js).await?;
    let m = &cfg.mesh;
    let mut breaker = Breaker::new(BreakerConfig {
        threshold: m.breaker_threshold,
        window_ms: (m.breaker_window_s * 1000.0) as i64,
        cooldown_ms: (m.cooldown_s * 1000.0) as i64,
        half_open_ms: (m.half_open_s * 1000.0) as i64,
    });
    let stored = match kvx::create_or_get(&bucket, streams::BREAKER_KEY, &BreakerRecord::default())
        .await
    {
        Ok(Some(existing)) => existing.value,
        Ok(None) => BreakerRecord::default(),
        Err(kvx::KvError::Corrupt { reason, .. }) => {
            // Not a reason to stay down: the leader overwrites it at its first check.
            tracing::warn!(%reason, "storm guard: the stored breaker entry is unreadable; starting closed");
            BreakerRecord::default()
        }
        Err(err) => return Err(err.into()),
    };
    if breaker.restore(&stored) {
        tracing::info!(state = stored.state.as_str(), since = %time::format_ms(stored.since_ms), "storm guard: breaker state restored");
    }
    let instance = format!(
        "{SERVICE_NAME}@{}/{}/{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned()),
        std::process::id(),
        &ids::new_id()[32..]
    );
    let limits = mesh::limits_bucket(&js).await?;
    let mut budgets = IdentityBudgets::new(BudgetConfig {
        budget: m.identity_budget,
        window_ms: (m.identity_window_s * 1000.0) as i64,
        cooldown_ms: (m.identity_cooldown_s * 1000.0) as i64,
    });
    budgets::restore(&limits, &mut budgets).await;
    let guard = Arc::new(Mutex::new(Guard {
        storms: StormDetector::new(m.storm_threshold, (m.storm_window_s * 1000.0) as i64),
        breaker,
        budgets,
    }));
    let (leadership, elector) = bulwark_common::lease::spawn(
        bulwark_common::lease::bucket(&js).await?,
        js.clone(),
        SERVICE_NAME,
        &instance,
        Duration::from_secs_f64(cfg.replicas.lease_ttl_s),
        Narrator::new(js.clone(), SERVICE_NAME, &instance),
        shutdown.clone(),
    );
    // A lone instance takes the empty lease at once; a standby goes on after a moment.
    let _ = tokio::time::timeout(Duration::from_secs(2), leadership.until_leader(&shutdown)).await;
    let sg = Arc::new(StormGuard {
        leadership,
        stored: Mutex::new(stored.clone()),
        entry: Mutex::new(EntryHealth::Readable),
        narrator: Narrator::new(js.clone(), SERVICE_NAME, &instance),
        js,
        bucket: bucket.clone(),
        limits,
        cfg: cfg.mesh.clone(),
        instance,
        counters: Arc::new(Counters::default()),
        guard,
        clock: Clock::new(),
    });
    // The services' own events and those of other accounts (agents, people), as one stream.
    let own = client
        .subscribe(subjects::MESH_ALL)
        .await
        .map_err(|e| StormGuardError::Subscribe(e.to_string()))?;
    let ingress = client
        .subscribe(subjects::MESH_INGRESS_ALL)
        .await
        .map_err(|e| StormGuardError::Subscribe(e.to_string()))?;
    let subscription = futures::stream::select(own, ingress);

    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::unbounded_channel();
    let clock = sg.clock;
    tracker.spawn(ingest(
        sg.clone(),
        subscription,
        tx.clone(),
        clock,
        shutdown.clone(),
    ));
    tracker.spawn(tick(sg.clone(), tx, clock, shutdown.clone()));
    tracker.spawn(announce(sg.clone(), rx));
    tracker.spawn(adopt(
        sg.clone(),
        mesh::watch_breaker(bucket, shutdown.clone()),
        shutdown.clone(),
    ));
    tracker.spawn(check(sg.clone(), shutdown.clone()));

    let stats = sg.clone();
    let endpoints: [bulwark_common::micro::EndpointSpec<Op>; 6] = [
        ("status", subjects::STORM_GUARD_STATUS, Op::Status),
        ("rates", subjects::STORM_GUARD_RATES, Op::Rates),
        (
            "breaker_open",
            subjects::STORM_GUARD_BREAKER_OPEN,
            Op::BreakerOpen,
        ),
        (
            "breaker_close",
            subjects::STORM_GUARD_BREAKER_CLOSE,
            Op::BreakerClose,
        ),
        ("limit", subjects::STORM_GUARD_LIMIT, Op::Limit),
        ("throttle", subjects::STORM_GUARD_THROTTLE, Op::Throttle),
    ];
    let state = sg.clone();
    let service = bulwark_common::micro::register(
        &bulwark_common::micro::serving_client(&cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark storm guard: per-type storm detection, the mesh circuit breaker, rate limits and throttles",
        move || stats.snapshot(),
        &endpoints,
        &tracker,
        &shutdown,
        16,
        move |op, request: Request| {
            let state = state.clone();
            async move {
                let body = &request.message.payload;
                let now = state.clock.now_ms();
                let result: Result<Value, ApiError> = match op {
                    Op::Status => Ok(state.status()),
                    Op::Rates => Ok(state.rates(now)),
                    Op::BreakerOpen => state.force_breaker(BreakerState::Open, body, now).await,
                    Op::BreakerClose => state.force_breaker(BreakerState::Closed, body, now).await,
                    Op::Limit => state.limit(body).await,
                    Op::Throttle => state.throttle(body).await,
                };
                api::respond(&request, result).await;
            }
        },
    )
    .await
    .map_err(StormGuardError::Register)?;
    let telemetry_state = sg.clone();
    telemetry::spawn(
        client.clone(),
        SERVICE_NAME,
        Duration::from_secs_f64(cfg.telemetry.interval_s.max(0.1)),
        shutdown.clone(),
        move || telemetry_state.snapshot(),
    );
    tracing::info!("storm guard watching {}", subjects::MESH_ALL);

    shutdown.cancelled().await;
    bulwark_common::micro::finish(SERVICE_NAME, service, tracker, SHUTDOWN_GRACE).await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, elector).await;
    Ok(())
}

#[derive(Deserialize)]
struct SourceOnly<'a> {
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
}

/// Counts every mesh event as it arrives; decisions go to the announcer.
async fn ingest(
    sg: Arc<StormGuard>,
    mut subscription: impl futures::Stream<Item = async_nats::Message> + Unpin,
    tx: mpsc::UnboundedSender<Announcement>,
    clock: Clock,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            msg = subscription.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        sg.counters.events_seen.fetch_add(1, Ordering::Relaxed);
        let subject = msg.subject.as_str();
        if OWN_SUBJECTS
            .iter()
            .any(|own| mesh::subject_matches(own, subject))
        {
            sg.counters.own_events.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (event_type, identity) = subjects::mesh_subject(subject)
            .map(|m| (m.event_type, m.identity))
            .unwrap_or((subject, None));
        let parsed = serde_json::from_slice::<SourceOnly>(&msg.payload);
        // An event from another account is counted against the identity its subject names (the
        // server's import put it there); only the services' own events name their source in the
        // body.
        let source = match (&parsed, identity) {
            (_, Some(identity)) => identity,
            (Ok(SourceOnly { source: Some(s) }), None) if !s.is_empty() => s.as_ref(),
            (_, None) => "unknown",
        };
        if parsed.is_err() {
            sg.counters.malformed.fetch_add(1, Ordering::Relaxed);
        }
        let now = clock.now_ms();
        let (storm, verdict, transition) = {
            let mut guard = sg.lock();
            let storm = guard.storms.observe(event_type, source, now);
            // An identity's events are measured against its budget first; only what it may
            // publish reaches the breaker. The services' own events go to the breaker as they are.
            let verdict = identity.map(|identity| guard.budgets.observe(identity, now));
            let transition = match verdict {
                Some(Verdict::Limited(_) | Verdict::Held) => None,
                Some(Verdict::Counted) | None => guard
                    .breaker
                    .observe(now)
                    .map(|t| (t, guard.breaker.record(&sg.instance))),
            };
            (storm, verdict, transition)
        };
        match verdict {
            None => sg.counters.service_events.fetch_add(1, Ordering::Relaxed),
            Some(Verdict::Counted) => sg.counters.identity_events.fetch_add(1, Ordering::Relaxed),
            Some(Verdict::Held) => sg.counters.identity_held.fetch_add(1, Ordering::Relaxed),
            Some(Verdict::Limited(start)) => {
                let _ = tx.send(Announcement::IdentityLimited(start));
                sg.counters.identity_held.fetch_add(1, Ordering::Relaxed)
            }
        };
        if let Some(storm) = storm {
            let _ = tx.send(Announcement::Storm(storm));
        }
        if let Some((t, record)) = transition {
            let _ = tx.send(Announcement::Transition(t, record));
        }
    }
    // Dropping the subscriptions unsubscribes them.
    drop(subscription);
}

/// Applies the time-based changes: breaker cooldown and probe, storms that ended.
async fn tick(
    sg: Arc<StormGuard>,
    tx: mpsc::UnboundedSender<Announcement>,
    clock: Clock,
    shutdown: CancellationToken,
) {
    let shortest = sg
        .cfg
        .cooldown_s
        .min(sg.cfg.half_open_s)
        .min(sg.cfg.storm_window_s)
        .min(sg.cfg.identity_cooldown_s);
    let period = Duration::from_secs_f64((shortest / 10.0).clamp(0.01, 0.1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = clock.now_ms();
        let (ended, changes, transition) = {
            let mut guard = sg.lock();
            let ended = guard.storms.sweep(now);
            let changes = guard.budgets.sweep(now);
            let transition = guard
                .breaker
                .tick(now)
                .map(|t| (t, guard.breaker.record(&sg.instance)));
            (ended, changes, transition)
        };
        for end in ended {
            let _ = tx.send(Announcement::StormEnded(end));
        }
        for change in changes {
            let _ = tx.send(Announcement::IdentityChanged(change));
        }
        if let Some((t, record)) = transition {
            let _ = tx.send(Announcement::Transition(t, record));
        }
    }
}

/// Adopts the breaker record when another replica (or an operator) changed it. An unreadable
/// or missing entry is never adopted: the leader overwrites it with its state at once.
async fn adopt(
    sg: Arc<StormGuard>,
    mut breaker: tokio::sync::watch::Receiver<mesh::BreakerView>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            changed = breaker.changed() => if changed.is_err() { break },
        }
        let view = breaker.borrow_and_update().clone();
        *sg.entry.lock().unwrap_or_else(|p| p.into_inner()) = view.entry;
        if view.entry != EntryHealth::Readable {
            tracing::warn!(entry = view.entry.as_str(), revision = view.revision, problem = ?view.problem, "storm guard: the stored breaker entry does not read");
            sg.repair("its watch saw it").await;
            continue;
        }
        let record = view.record;
        *sg.stored.lock().unwrap_or_else(|p| p.into_inner()) = record.clone();
        if !sg.leadership.is_leader() {
            // A standby mirrors the leader's record exactly.
            sg.lock().breaker.replace(&record);
        } else if sg.lock().breaker.restore(&record) {
            tracing::info!(state = record.state.as_str(), by = %record.updated_by, "storm guard: adopted the stored breaker state");
        }
    }
}

/// Checks the stored breaker entry every `mesh.breaker_check_s` (the leader repairs an
/// unreadable or missing one; this also covers an entry that went bad while another replica led).
async fn check(sg: Arc<StormGuard>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(sg.cfg.breaker_check_s));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        sg.counters.breaker_checks.fetch_add(1, Ordering::Relaxed);
        sg.repair("the periodic check found it").await;
    }
}

/// Announces storms and transitions, in the order they were decided.
async fn announce(sg: Arc<StormGuard>, mut rx: mpsc::UnboundedReceiver<Announcement>) {
    while let Some(announcement) = rx.recv().await {
        match announcement {
            Announcement::Storm(storm) if !sg.leadership.is_leader() => {
                tracing::debug!(event_type = %storm.event_type, "storm seen by a standby: the leader announces it");
            }
            Announcement::Storm(storm) => sg.announce_storm(storm).await,
            Announcement::StormEnded(_) if !sg.leadership.is_leader() => {}
            Announcement::StormEnded(end) => sg.announce_storm_end(end).await,
            Announcement::Transition(t, record) => {
                sg.announce_transition(t, record, None).await;
            }
            Announcement::IdentityLimited(_) | Announcement::IdentityChanged(_)
                if !sg.leadership.is_leader() =>
            {
                tracing::debug!(
                    "identity limit seen by a standby: the leader stores and announces it"
                );
            }
            Announcement::IdentityLimited(start) => sg.announce_identity_limit(start).await,
            Announcement::IdentityChanged(change) => sg.announce_identity_change(change).await,
        }
    }
}

impl StormGuard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Guard> {
        self.guard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn snapshot(&self) -> Value {
        let mut figures = self.counters.snapshot();
        let guard = self.lock();
        figures["breaker_state"] = json!(guard.breaker.state().as_str());
        figures["breaker_since_ms"] = json!(guard.breaker.since_ms());
        figures["breaker_entry"] = json!(
            self.entry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_str()
        );
        figures["active_storms"] = json!(guard.storms.active().len());
        figures["limited_identities"] = json!(guard.budgets.active().len());
        figures["health_status"] = json!(match guard.breaker.state() {
            BreakerState::Closed => "healthy",
            BreakerState::HalfOpen => "degraded",
            BreakerState::Open => "critical",
        });
        figures
    }

    fn status(&self) -> Value {
        let guard = self.lock();
        let record = guard.breaker.record(&self.instance);
        json!({
            "breaker": {
                "state": record.state,
                "since": time::format_ms(record.since_ms),
                "event_count": record.event_count,
                "opened_count": record.opened_count,
                "threshold": self.cfg.breaker_threshold,
                "window_s": self.cfg.breaker_window_s,
                "cooldown_s": self.cfg.cooldown_s,
                "half_open_s": self.cfg.half_open_s,
            },
            "storms": guard.storms.active(),
            "storm_threshold": self.cfg.storm_threshold,
            "identities": {
                "budget": self.cfg.identity_budget,
                "window_s": self.cfg.identity_window_s,
                "cooldown_s": self.cfg.identity_cooldown_s,
                "limited": guard.budgets.active(),
            },
            "counters": self.counters.snapshot(),
        })
    }

    /// Publishes `event` into the mesh stream, deduplicated by `msg_id`; false when not stored.
    async fn publish(&self, event: &MeshEvent, msg_id: String) -> bool {
        let publish = PublishMessage::build()
            .payload(api::to_bytes(event))
            .message_id(mesh::private_id(&msg_id));
        let stored = match self
            .js
            .send_publish(subjects::mesh(&event.event_type), publish)
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = &stored {
            self.counters
                .publish_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, event_type = %event.event_type, "storm guard: announcement not stored");
        }
        stored.is_ok()
    }

    async fn announce_storm(&self, storm: StormStart) {
        self.counters.storms.fetch_add(1, Ordering::Relaxed);
        let window_ms = (self.cfg.storm_window_s * 1000.0).max(1.0) as i64;
        let bucket = storm.at_ms / window_ms;
        let trigger_id = ids::new_id();
        let incident = MeshEvent::root(
            "event.incident",
            SERVICE_NAME,
            json!({"trigger_id": trigger_id, "playbook": STORM_PLAYBOOK, "severity": "high",
                   "event_type": storm.event_type, "rate_per_second": storm.rate_per_second,
                   "threshold": self.cfg.storm_threshold, "window_s": self.cfg.storm_window_s,
                   "source": storm.top_source, "source_count": storm.top_source_count}),
        );
        self.publish(&incident, format!("storm:{}:{bucket}", storm.event_type))
            .await;
        let advisory = MeshEvent::root(
            "advisory.throttle",
            SERVICE_NAME,
            json!({"trigger_id": trigger_id, "source": storm.top_source, "event_type": storm.event_type,
                   "rate_per_second": storm.rate_per_second,
                   "limit_per_second": self.cfg.storm_threshold}),
        );
        self.publish(&advisory, format!("throttle:{}:{bucket}", storm.event_type))
            .await;
        let n = self
            .narrator
            .narrative(
                "storm_detected",
                "sliding per-type rate window, checked on every event",
            )
            .why(format!(
                "{} events of {} in the last {} s: {:.0}/s, above the threshold of {}/s",
                storm.count,
                storm.event_type,
                self.cfg.storm_window_s,
                storm.rate_per_second,
                self.cfg.storm_threshold
            ))
            .why(format!(
                "{} published {} of them; throttle advisory sent, consumers pace {} to {}/s",
                storm.top_source,
                storm.top_source_count,
                storm.event_type,
                self.cfg.storm_threshold
            ))
            .why(format!("incident names playbook {STORM_PLAYBOOK}"))
            .context(
                json!({"event_type": storm.event_type, "rate_per_second": storm.rate_per_second,
                            "count": storm.count, "threshold": self.cfg.storm_threshold,
                            "source": storm.top_source, "trigger_id": trigger_id,
                            "incident_id": incident.event_id}),
            );
        self.narrator.publish(n).await;
    }

    async fn announce_storm_end(&self, end: StormEnd) {
        let n = self
            .narrator
            .narrative("storm_ended", "sliding per-type rate window")
            .why(format!(
                "{} stayed at or below {}/s for {} s; peak {} events in one window",
                end.event_type, self.cfg.storm_threshold, self.cfg.storm_window_s, end.peak_count
            ))
            .context(
                json!({"event_type": end.event_type, "started": time::format_ms(end.started_ms),
                            "peak_count": end.peak_count}),
            );
        self.narrator.publish(n).await;
    }

    /// Stores a transition's record: a compare-and-set over the stored record when it reads,
    /// an overwrite when it is unreadable or missing (an automatic transition by the lease
    /// holder under its fencing token; a forced one by any replica).
    async fn store_transition(
        &self,
        t: Transition,
        record: &BreakerRecord,
        token: u64,
        forced: bool,
    ) -> Stored {
        let written = kvx::update(
            &self.bucket,
            streams::BREAKER_KEY,
            |stored: &mut BreakerRecord| {
                if stored.state != t.from
                    || stored.since_ms >= record.since_ms
                    || (!forced && stored.leader_token > token)
                {
                    return Ok::<_, std::convert::Infallible>(Change::Keep(false));
                }
                *stored = record.clone();
                stored.leader_token = token;
                Ok(Change::Write(true))
            },
        )
        .await;
        match written {
            Ok(Ok((true, _))) => Stored::Yes,
            Ok(Ok((false, stored))) => Stored::Adopted(stored),
            Ok(Err(never)) => match never {},
            Err(kvx::KvError::Corrupt { .. } | kvx::KvError::NotFound(_)) => {
                let mut record = record.clone();
                record.leader_token = token;
                match self.overwrite_unreadable(&record).await {
                    Ok(Some(found)) => {
                        self.counters
                            .breaker_repairs
                            .fetch_add(1, Ordering::Relaxed);
                        self.narrate_repair(&found, &record, "a transition found it")
                            .await;
                        Stored::Yes
                    }
                    Ok(None) => Stored::Failed("the entry changed while it was repaired".into()),
                    Err(err) => Stored::Failed(err.to_string()),
                }
            }
            Err(err) => Stored::Failed(err.to_string()),
        }
    }

    /// Writes `record` over the breaker entry if it is unreadable or missing; `Some(what was
    /// found)` when it did, `None` when the entry reads (or changed meanwhile).
    async fn overwrite_unreadable(
        &self,
        record: &BreakerRecord,
    ) -> Result<Option<String>, kvx::KvError> {
        let (revision, found) =
            match kvx::read_raw::<BreakerRecord>(&self.bucket, streams::BREAKER_KEY).await? {
                kvx::Raw::Readable(_) => return Ok(None),
                kvx::Raw::Missing { revision } => (revision, "missing".to_owned()),
                kvx::Raw::Unreadable {
                    revision,
                    reason,
                    excerpt,
                } => (
                    revision,
                    format!("unreadable at revision {revision} ({reason}; it starts {excerpt})"),
                ),
            };
        if !kvx::overwrite(&self.bucket, streams::BREAKER_KEY, record, revision).await? {
            return Ok(None);
        }
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = record.clone();
        Ok(Some(found))
    }

    /// One check of the stored breaker entry (`found_by`: the periodic check or the watch): the
    /// lease holder overwrites an unreadable or missing entry with its own state; a standby
    /// leaves it to the leader.
    async fn repair(&self, found_by: &str) {
        let Some(token) = self.leadership.token() else {
            return;
        };
        let mut record = self.lock().breaker.record(&self.instance);
        record.leader_token = token;
        match self.overwrite_unreadable(&record).await {
            Ok(None) => {}
            Ok(Some(found)) => {
                self.counters
                    .breaker_repairs
                    .fetch_add(1, Ordering::Relaxed);
                self.narrate_repair(&found, &record, found_by).await;
            }
            Err(err) => {
                self.counters
                    .breaker_repair_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "storm guard: the breaker entry cannot be repaired; the next check tries again");
            }
        }
    }

    async fn narrate_repair(&self, found: &str, record: &BreakerRecord, found_by: &str) {
        tracing::warn!(%found, state = record.state.as_str(), %found_by, "storm guard: breaker entry repaired");
        let n = self
            .narrator
            .narrative(
                "breaker_entry_repaired",
                "storm guard leader's check of KV bucket bulwark_breaker",
            )
            .why(format!("the stored breaker entry was {found} ({found_by})"))
            .why(format!(
                "overwritten with the storm guard's state: {} since {}",
                record.state.as_str(),
                time::format_ms(record.since_ms)
            ))
            .why("mesh consumers held non-critical events while it was unreadable; they obey the repaired entry now")
            .context(json!({"found": found, "state": record.state, "since_ms": record.since_ms,
                            "found_by": found_by, "leader_token": record.leader_token}));
        self.narrator.publish(n).await;
    }

    /// Stores, announces and narrates a transition; `forced` names who moved the breaker by
    /// hand and why (no emergency is raised for a forced opening). A forced transition that is
    /// not stored is not announced: the caller undoes it and answers 503.
    async fn announce_transition(
        &self,
        t: Transition,
        record: BreakerRecord,
        forced: Option<(&str, &str)>,
    ) -> Stored {
        // An automatic transition is the lease holder's to write, under its fencing token; a
        // forced one (a request) may come to any replica.
        let token = match forced {
            Some(_) => 0,
            None => match self.leadership.token() {
                Some(token) => token,
                None => {
                    tracing::debug!(
                        to = t.to.as_str(),
                        "breaker transition seen by a standby: the leader writes it"
                    );
                    // Back to the leader's record: a standby's own decisions do not count.
                    let stored = self
                        .stored
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    self.lock().breaker.replace(&stored);
                    return Stored::Failed("a standby does not write transitions".into());
                }
            },
        };
        // Only the instance that moves the stored record announces the transition.
        match self
            .store_transition(t, &record, token, forced.is_some())
            .await
        {
            Stored::Yes => {}
            Stored::Adopted(stored) => {
                self.counters
                    .transitions_adopted
                    .fetch_add(1, Ordering::Relaxed);
                self.lock().breaker.restore(&stored);
                return Stored::Adopted(stored);
            }
            Stored::Failed(err) if forced.is_some() => {
                tracing::warn!(error = %err, "storm guard: forced breaker state not stored");
                return Stored::Failed(err);
            }
            Stored::Failed(err) => {
                // Announce anyway: holding events back must not depend on KV being up, and the
                // next transition will store the state (the watchdog alerts meanwhile if mesh
                // consumers hold while this guard reports closed).
                tracing::warn!(error = %err, "storm guard: breaker state not stored");
            }
        }
        self.counters.transitions.fetch_add(1, Ordering::Relaxed);
        let (subject_type, what) = match t.to {
            BreakerState::Open => ("breaker.opened", "breaker_opened"),
            BreakerState::HalfOpen => ("breaker.half_open", "breaker_half_open"),
            BreakerState::Closed => ("breaker.closed", "breaker_closed"),
        };
        let figures = json!({"scope": "mesh", "event_count": t.event_count,
                             "threshold": self.cfg.breaker_threshold,
                             "window_s": self.cfg.breaker_window_s, "cooldown_s": self.cfg.cooldown_s,
                             "half_open_s": self.cfg.half_open_s, "from": t.from, "to": t.to,
                             "opened_count": record.opened_count,
                             "forced_by": forced.map(|(by, _)| by),
                             "reason": forced.map(|(_, reason)| reason)});
        let event = MeshEvent::root(subject_type, SERVICE_NAME, figures.clone());
        self.publish(&event, format!("{subject_type}:{}", t.at_ms))
            .await;
        let mut why = Vec::new();
        if let Some((by, reason)) = forced {
            why.push(format!(
                "moved by hand from {} to {} by {by}: {reason}",
                t.from.as_str(),
                t.to.as_str()
            ));
        }
        match (t.from, t.to) {
            (BreakerState::Closed, BreakerState::Open) if forced.is_some() => {
                self.counters.breaker_opened.fetch_add(1, Ordering::Relaxed);
                why.push(format!(
                    "{} events of all types in the last {} s (threshold {})",
                    t.event_count, self.cfg.breaker_window_s, self.cfg.breaker_threshold
                ));
            }
            (_, BreakerState::Closed) if forced.is_some() => why.push(format!(
                "the window starts empty: it opens again above {} events in {} s",
                self.cfg.breaker_threshold, self.cfg.breaker_window_s
            )),
            (BreakerState::Closed, BreakerState::Open) => {
                self.counters.breaker_opened.fetch_add(1, Ordering::Relaxed);
                why.push(format!(
                    "{} events of all types in the last {} s, above the threshold of {}",
                    t.event_count, self.cfg.breaker_window_s, self.cfg.breaker_threshold
                ));
            }
            (BreakerState::HalfOpen, BreakerState::Open) => {
                self.counters.breaker_opened.fetch_add(1, Ordering::Relaxed);
                why.push(format!(
                    "{} events while half-open, above the probe limit: the rate is still abnormal",
                    t.event_count
                ));
            }
            (_, BreakerState::HalfOpen) => why.push(format!(
                "open for the cooldown of {} s; mesh consumers may process a probe of {} held events each",
                self.cfg.cooldown_s, self.cfg.half_open_probe
            )),
            _ => why.push(format!(
                "{} events in the {} s half-open probe, within the limit: the rate is normal",
                t.event_count, self.cfg.half_open_s
            )),
        }
        if t.to == BreakerState::Open && forced.is_some() {
            why.push(format!(
                "non-critical mesh events are held (stored, processed in order after closing) for at least {} s",
                self.cfg.cooldown_s
            ));
        } else if t.to == BreakerState::Open {
            why.push(format!(
                "non-critical mesh events are held (stored, processed in order after closing) for at least {} s",
                self.cfg.cooldown_s
            ));
            let emergency = MeshEvent::root(
                "event.emergency",
                SERVICE_NAME,
                json!({"trigger_id": event.event_id, "playbook": BREAKER_PLAYBOOK,
                       "severity": "critical", "event_count": t.event_count, "circuit_open": true,
                       "threshold": self.cfg.breaker_threshold, "window_s": self.cfg.breaker_window_s}),
            );
            self.publish(&emergency, format!("emergency:{}", t.at_ms))
                .await;
        } else if t.to == BreakerState::Closed {
            why.push("held mesh events are released, in order".to_owned());
        }
        let n = self
            .narrator
            .narrative(
                what,
                "mesh circuit breaker state machine, state in KV bucket bulwark_breaker",
            )
            .whys(why)
            .context(figures);
        self.narrator.publish(n).await;
        Stored::Yes
    }
}

/// What became of a transition's record.
pub(crate) enum Stored {
    /// Stored (or, for an automatic transition, announced though the store failed).
    Yes,
    /// Another replica or an operator changed the record first: this one, adopted instead.
    Adopted(BreakerRecord),
    /// Not stored: why.
    Failed(String),
}
