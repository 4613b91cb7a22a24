//! The watchdog's I/O around [`crate::health`]: the `telemetry.>` subscription, the sweep
//! (`$SRV.PING`, `htm.readiness`, rules, alerts), the `watchdog.report` endpoint and the
//! announcements (`mesh.layer2.<severity>_alert`, narratives, `telemetry.layer2`).
//!
//! The state lives behind one mutex that is never held across an await. Replicas share the
//! `watchdog` lease (KV `bulwark_leases`): all of them sweep, only the holder announces, so two
//! watchdogs raise an alert once; a standby that takes over goes on from the same state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::BulwarkConfig;
use bulwark_common::envelope::MeshEvent;
use bulwark_common::lease::{self, Leadership};
use bulwark_common::mesh_publisher::{MeshPublisher, PublishError};
use bulwark_common::micro::{self, EndpointSpec};
use bulwark_common::narrative::Narrator;
use bulwark_common::replica::ReplicaBeat;
use bulwark_common::{streams, subjects, telemetry, time};

use crate::health::{Alert, AlertState, Rules, Watch};

/// Name under which the service registers (CONTRACT section 5).
pub const SERVICE_NAME: &str = "watchdog";
/// Requests handled at once.
const MAX_CONCURRENT_REQUESTS: usize = 64;
/// Time given to in-flight work at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a throttle advisory naming the watchdog holds.
const THROTTLE_FOR: Duration = Duration::from_secs(10);

/// Why the watchdog could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// The narrative or mesh stream could not be made ready.
    #[error("{0}")]
    Store(#[from] streams::StoreError),
    /// The mesh publisher could not follow throttle advisories.
    #[error("{0}")]
    Publisher(#[from] PublishError),
    /// Registration with NATS micro or a subscription failed.
    #[error("{0}")]
    Register(String),
}

struct Watchdog {
    client: Client,
    /// Where storage use is measured.
    js: async_nats::jetstream::Context,
    /// The durability in force, for the report.
    durability: &'static str,
    watch: Mutex<Watch>,
    narrator: Narrator,
    publisher: MeshPublisher,
    ping_timeout: Duration,
    /// Alerts that could not be stored on the mesh (logged with their content).
    alert_failures: std::sync::atomic::AtomicU64,
    /// The latest heartbeat of every service replica, by (service, replica id).
    replicas: Mutex<BTreeMap<(String, String), (ReplicaBeat, Instant)>>,
    /// A replica silent this long is reported `missing`.
    replica_timeout: Duration,
    /// This replica's part in the `watchdog` lease: every replica sweeps (so a standby's view
    /// is current when it takes over), only the holder announces alerts.
    leadership: Leadership,
    /// Alerts a standby computed and left to the leader.
    left_to_leader: std::sync::atomic::AtomicU64,
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every replica seen, by service: its latest heartbeat, `missing` when it went silent.
    /// A replica silent for ten heartbeat timeouts is forgotten (a respawn has a new id).
    fn replicas_report(&self, now: Instant) -> Value {
        let mut replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        replicas.retain(|_, (_, at)| now.duration_since(*at) < self.replica_timeout * 10);
        let mut by_service: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for ((service, _), (beat, at)) in replicas.iter() {
            let silent = now.duration_since(*at);
            let mut row = serde_json::to_value(beat).unwrap_or(Value::Null);
            if silent > self.replica_timeout && beat.status.as_str() != "quarantined" {
                row["status"] = json!("missing");
            }
            row["last_seen_s"] = json!((silent.as_secs_f64() * 10.0).round() / 10.0);
            by_service.entry(service.clone()).or_default().push(row);
        }
        json!(by_service)
    }
}

/// Keeps the latest heartbeat of every replica (`replica.heartbeat.<service>.<id>`).
async fn read_replica_beats(
    w: Arc<Watchdog>,
    mut sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            msg = sub.next() => match msg { Some(m) => m, None => break },
        };
        match serde_json::from_slice::<ReplicaBeat>(&msg.payload) {
            Ok(beat) => {
                let key = (beat.service.clone(), beat.replica_id.clone());
                w.replicas
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, (beat, Instant::now()));
            }
            Err(err) => {
                tracing::debug!(subject = %msg.subject, error = %err, "replica heartbeat that is not one ignored")
            }
        }
    }
}

/// The rules of `cfg`: the `[watchdog]` section, the telemetry interval and the scheduler's HTM
/// queue thresholds.
pub fn rules(cfg: &BulwarkConfig) -> Rules {
    let w = &cfg.watchdog;
    Rules {
        heartbeat_timeout: Duration::from_secs_f64(
            cfg.telemetry.interval_s.max(0.1) * w.heartbeat_timeout_multiple,
        ),
        realert_interval: Duration::from_secs_f64(w.realert_interval_s),
        htm_queue_warn: cfg.scheduler.htm_queue_warn,
        htm_queue_critical: cfg.scheduler.htm_queue_critical,
        min_dispatch_rate: w.min_dispatch_rate,
        required: w.required_services.clone(),
        hold_grace: Duration::from_secs_f64(cfg.telemetry.interval_s.max(0.1)),
        storage_alert_ratio: w.storage_alert_ratio,
        startup_grace: Duration::from_secs_f64(2.0 * w.check_interval_s),
    }
}

/// Runs the watchdog until `shutdown` is cancelled.
pub async fn run(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), WatchdogError> {
    let timeout = Duration::from_millis(cfg.nats.request_timeout_ms);
    let js = streams::context(client.clone(), timeout);
    streams::narratives(&js).await?;
    bulwark_common::mesh::mesh_stream(&js, &cfg.mesh).await?;
    let publisher =
        MeshPublisher::new(client.clone(), js.clone(), SERVICE_NAME, THROTTLE_FOR).await?;
    let (_, leadership, elector) = lease::elect(
        &js,
        SERVICE_NAME,
        Duration::from_secs_f64(cfg.replicas.lease_ttl_s),
        shutdown.clone(),
    )
    .await?;
    let durability = streams::durability_in_force(&js, cfg.nats.durability)
        .await
        .as_str();
    let watchdog = Arc::new(Watchdog {
        js: js.clone(),
        durability,
        client: client.clone(),
        watch: Mutex::new(Watch::new(rules(&cfg), Instant::now())),
        narrator: Narrator::new(
            js.clone(),
            SERVICE_NAME,
            &format!("{SERVICE_NAME}/{}", std::process::id()),
        ),
        publisher,
        ping_timeout: Duration::from_millis(cfg.watchdog.ping_timeout_ms),
        alert_failures: Default::default(),
        replicas: Mutex::new(BTreeMap::new()),
        replica_timeout: Duration::from_secs_f64(cfg.replicas.heartbeat_interval_s * 3.0),
        leadership,
        left_to_leader: Default::default(),
    });

    let tracker = TaskTracker::new();
    let telemetry_sub = client
        .subscribe(subjects::TELEMETRY_ALL)
        .await
        .map_err(|e| WatchdogError::Register(format!("telemetry subscription: {e}")))?;
    tracker.spawn(read_telemetry(
        watchdog.clone(),
        telemetry_sub,
        shutdown.clone(),
    ));
    let replica_sub = client
        .subscribe(subjects::REPLICA_HEARTBEAT_ALL)
        .await
        .map_err(|e| WatchdogError::Register(format!("replica heartbeat subscription: {e}")))?;
    tracker.spawn(read_replica_beats(
        watchdog.clone(),
        replica_sub,
        shutdown.clone(),
    ));
    // One sweep before the report is served, so no report speaks before a ping went out; then
    // sweeps every second until every required service has answered (a stack just brought up
    // registers its services in any order), then every check_interval_s.
    sweep(&watchdog).await;
    let every = Duration::from_secs_f64(cfg.watchdog.check_interval_s);
    tracker.spawn(sweep_loop(
        watchdog.clone(),
        every,
        2 * every,
        shutdown.clone(),
    ));

    let endpoints: [EndpointSpec<()>; 1] = [("report", subjects::WATCHDOG_REPORT, ())];
    let stats = watchdog.clone();
    let state = watchdog.clone();
    let service = micro::register(
        &micro::serving_client(&cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark Layer 2 watchdog: telemetry, pings and readiness into alerts and watchdog.report",
        move || stats.lock().telemetry(Instant::now()),
        &endpoints,
        &tracker,
        &shutdown,
        MAX_CONCURRENT_REQUESTS,
        move |(), request| {
            let state = state.clone();
            async move {
                let mut report = state.lock().report(Instant::now());
                report["replicas"] = state.replicas_report(Instant::now());
                report["announcing"] = json!(state.leadership.is_leader());
                report["watchdog_replica"] = json!(state.leadership.holder());
                let report: Result<Value, ApiError> = Ok(report);
                api::respond(&request, report).await;
            }
        },
    )
    .await
    .map_err(WatchdogError::Register)?;

    let figures = watchdog.clone();
    telemetry::spawn(
        client.clone(),
        crate::health::LAYER2,
        Duration::from_secs_f64(cfg.telemetry.interval_s.max(0.1)),
        shutdown.clone(),
        move || {
            let mut t = figures.lock().telemetry(Instant::now());
            t["alert_failures"] = json!(
                figures
                    .alert_failures
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
            t["alerts_left_to_leader"] = json!(
                figures
                    .left_to_leader
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
            t
        },
    );
    tracing::info!(
        "watchdog sweeping every {} s; report on {}",
        cfg.watchdog.check_interval_s,
        subjects::WATCHDOG_REPORT
    );

    shutdown.cancelled().await;
    micro::finish(SERVICE_NAME, service, tracker, SHUTDOWN_GRACE).await;
    let _ = elector.await;
    Ok(())
}

async fn read_telemetry(
    w: Arc<Watchdog>,
    mut sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            msg = sub.next() => match msg { Some(m) => m, None => break },
        };
        let Some(component) = msg
            .subject
            .as_str()
            .strip_prefix(subjects::TELEMETRY_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
        else {
            continue;
        };
        match serde_json::from_slice::<Value>(&msg.payload) {
            Ok(figures) => w
                .lock()
                .observe_telemetry(component, figures, Instant::now()),
            Err(err) => {
                tracing::debug!(subject = %msg.subject, error = %err, "telemetry that is not JSON ignored")
            }
        }
    }
}

async fn sweep_loop(
    w: Arc<Watchdog>,
    every: Duration,
    startup: Duration,
    shutdown: CancellationToken,
) {
    let quick = Duration::from_secs(1).min(every);
    let until = tokio::time::Instant::now() + startup;
    while tokio::time::Instant::now() < until && !w.lock().all_required_answered() {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(quick) => {}
        }
        sweep(&w).await;
    }
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        sweep(&w).await;
    }
}

/// Pings, asks for readiness, applies the rules and announces the alerts (the lease holder
/// only; a standby keeps the same state and notes what it left to the leader).
async fn sweep(w: &Watchdog) {
    let (answering, readiness, usage) =
        tokio::join!(ping(w), readiness(w), crate::storage::measure(&w.js));
    let alerts = {
        let mut watch = w.lock();
        watch.set_storage(usage, w.durability);
        watch.sweep(&answering, readiness, Instant::now())
    };
    let leader = w.leadership.is_leader();
    for alert in alerts {
        if leader {
            announce(w, &alert).await;
        } else {
            w.lock().note_sent(&alert, &time::now());
            w.left_to_leader
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Instances answering `$SRV.PING`, by service name.
async fn ping(w: &Watchdog) -> BTreeMap<String, usize> {
    let mut answering = BTreeMap::new();
    for info in micro::ping_all(&w.client, None, w.ping_timeout).await {
        if let Some(name) = info["name"].as_str() {
            *answering.entry(name.to_owned()).or_insert(0) += 1;
        }
    }
    answering
}

/// The scheduler's `htm.readiness` reply, if it answers in time.
async fn readiness(w: &Watchdog) -> Option<Value> {
    let reply = tokio::time::timeout(
        w.ping_timeout,
        w.client
            .request(subjects::HTM_READINESS, "{}".as_bytes().to_vec().into()),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice::<Value>(&reply.payload)
        .ok()
        .filter(|v| v.get("error").is_none())
}

/// The playbook a stalled dispatch names in its incident.
pub const RECOVERY_PLAYBOOK: &str = "scheduler_recovery";

/// Publishes `alert` on `mesh.layer2.<severity>_alert` and narrates it. A recovery goes out on
/// the subject of the alert it ends (with `state: "recovered"`), so a consumer of one severity
/// sees the whole lifecycle.
async fn announce(w: &Watchdog, alert: &Alert) {
    let c = &alert.condition;
    let severity = c.severity.as_str();
    let event_type = subjects::layer2_alert_type(severity);
    let payload = json!({
        "component": c.component, "severity": severity, "reason": c.reason,
        "health": alert.health.as_str(), "condition": c.name, "state": alert.state.as_str(),
        "held_for_s": (alert.held_for.as_secs_f64() * 10.0).round() / 10.0,
    });
    let mut event = MeshEvent::root(&event_type, SERVICE_NAME, payload.clone());
    event.subsystem = Some("layer2".into());
    event.resource = Some(format!("component/{}", c.component));
    let at = time::now();
    w.lock().note_sent(alert, &at);
    match alert.state {
        AlertState::Recovered => {
            tracing::info!(component = %c.component, condition = c.name, "layer 2 recovered")
        }
        _ => {
            tracing::warn!(component = %c.component, condition = c.name, severity, reason = %c.reason, "layer 2 alert")
        }
    }
    if let Err(err) = w.publisher.publish(&event).await {
        w.alert_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(error = %err, payload = %payload, "layer 2 alert not stored");
    }
    // A stalled dispatch is remediable: name the playbook that does it.
    if c.component == "scheduler"
        && c.name == "dispatch_stalled"
        && alert.state != AlertState::Recovered
    {
        let incident = event.child(
            "event.incident",
            SERVICE_NAME,
            json!({"trigger_id": event.event_id, "playbook": RECOVERY_PLAYBOOK, "severity": severity,
                   "component": c.component, "condition": c.name, "reason": c.reason}),
        );
        if let Err(err) = w.publisher.publish(&incident).await {
            w.alert_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = %err, "scheduler_recovery incident not stored");
        }
    }
    let what = match alert.state {
        AlertState::Raised => "layer2_alert_raised",
        AlertState::Repeated => "layer2_alert_repeated",
        AlertState::Recovered => "layer2_alert_recovered",
    };
    let why = match alert.state {
        AlertState::Recovered => format!(
            "{} {} cleared after {:.1} s (was {severity}: {})",
            c.component,
            c.name,
            alert.held_for.as_secs_f64(),
            c.reason
        ),
        _ => format!("{} {}: {}", c.component, c.name, c.reason),
    };
    let n = w
        .narrator
        .narrative(what, "layer 2 watchdog sweep: telemetry, $SRV.PING and htm.readiness against the seed thresholds")
        .why(why)
        .why(format!("overall health is now {}", alert.health.as_str()))
        .context(json!({"event_id": event.event_id, "alert": payload}));
    w.narrator.publish(n).await;
}
