//! The Layer 2 watchdog end to end, against a real nats-server: a healthy stack reports healthy
//! and ready; a stopped scheduler is alerted once and its return announced; zero workers is
//! critical; a queue over the HTM threshold raises the warning. Alerts are counted on
//! `mesh.layer2.>`, sweeps through the report's `sweeps` counter: no timing thresholds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_common::BulwarkConfig;
use bulwark_common::subjects;
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(30);

/// Short intervals: telemetry every second (heartbeat timeout 3 s), a sweep every 0.3 s.
fn watchdog_config(server: &NatsServer) -> BulwarkConfig {
    let mut cfg = server.config();
    cfg.worker.heartbeat_interval_s = 0.2;
    cfg.scheduler.heartbeat_timeout_s = 1.0;
    cfg.scheduler.check_interval_s = 0.2;
    cfg.scheduler.ack_wait_s = 3.0;
    cfg.scheduler.dispatch_timeout_ms = 1_000;
    cfg.watchdog.check_interval_s = 0.3;
    cfg.watchdog.ping_timeout_ms = 150;
    cfg
}

/// Every Layer 2 alert published, as its mesh event.
#[derive(Clone, Default)]
struct Alerts(Arc<Mutex<Vec<Value>>>);

impl Alerts {
    async fn collect(client: &async_nats::Client) -> Self {
        let alerts = Alerts::default();
        let mut sub = client
            .subscribe(format!("{}.>", subjects::LAYER2_ALERT_PREFIX))
            .await
            .expect("subscribe to alerts");
        client.flush().await.expect("flush");
        let sink = alerts.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let event: Value = serde_json::from_slice(&msg.payload).expect("alert is JSON");
                assert_eq!(
                    subjects::mesh(event["event_type"].as_str().unwrap_or("")),
                    msg.subject.as_str(),
                    "an alert's subject is its event type"
                );
                sink.0.lock().expect("lock").push(event);
            }
        });
        alerts
    }

    /// Alerts of `component`/`condition` in `state`.
    fn count(&self, component: &str, condition: &str, state: &str) -> usize {
        self.matching(component, condition, state).len()
    }

    fn matching(&self, component: &str, condition: &str, state: &str) -> Vec<Value> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| {
                e["payload"]["component"] == component
                    && e["payload"]["condition"] == condition
                    && e["payload"]["state"] == state
            })
            .cloned()
            .collect()
    }

    async fn wait(&self, component: &str, condition: &str, state: &str) -> Value {
        eventually(
            LIMIT,
            &format!("{component} {condition} {state}"),
            || async { self.matching(component, condition, state).pop() },
        )
        .await
    }
}

async fn report(client: &async_nats::Client) -> Value {
    let (report, code) = request_json(client, subjects::WATCHDOG_REPORT, "{}").await;
    assert_eq!(code, None, "{report}");
    report
}

async fn wait_report(
    client: &async_nats::Client,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually(LIMIT, what, || async {
        let r = report(client).await;
        check(&r).then_some(r)
    })
    .await
}

/// Waits until the watchdog has swept `n` more times.
async fn sweeps(client: &async_nats::Client, n: u64) {
    let now = report(client).await["sweeps"].as_u64().expect("sweeps");
    wait_report(client, &format!("{n} more sweeps"), |r| {
        r["sweeps"].as_u64() >= Some(now + n)
    })
    .await;
}

/// Governance, scheduler, storm guard, event policy engine, `workers` workers, the watchdog.
struct Stack {
    server: NatsServer,
    cfg: BulwarkConfig,
    client: async_nats::Client,
    alerts: Alerts,
    scheduler: Option<RunningService>,
    _others: Vec<RunningService>,
}

async fn stack(workers: usize, edit: impl FnOnce(&mut BulwarkConfig)) -> Stack {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = watchdog_config(&server);
    edit(&mut cfg);
    let client = server.client().await;
    let alerts = Alerts::collect(&client).await;
    let mut others = vec![
        start_governance(cfg.clone()).await,
        start_storm_guard(cfg.clone()).await,
        start_event_policy(cfg.clone()).await,
    ];
    let scheduler = start_scheduler(cfg.clone()).await;
    for i in 0..workers {
        others.push(start_worker(cfg.clone(), &format!("wd-worker-{i}")).await);
    }
    others.push(start_watchdog(cfg.clone()).await);
    Stack {
        server,
        cfg,
        client,
        alerts,
        scheduler: Some(scheduler),
        _others: others,
    }
}

fn healthy_and_ready(r: &Value) -> bool {
    r["overall_health"] == "healthy" && r["all_ready"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_stack_reports_healthy_and_all_ready() {
    let s = stack(3, |_| {}).await;
    let r = wait_report(&s.client, "a healthy, ready report", healthy_and_ready).await;
    for key in [
        "htm_orchestrator",
        "trigger_mesh",
        "scheduler",
        "event_policy_engine",
        "governance",
    ] {
        let c = &r["components"][key];
        assert_eq!(c["ready"], true, "{key}: {r:#}");
        assert_eq!(c["health"], "healthy", "{key}: {r:#}");
    }
    assert_eq!(
        r["components"]["htm_orchestrator"]["key_figures"]["active_workers"],
        3
    );
    assert_eq!(r["components"]["htm_worker"]["instances"], 3, "{r:#}");
    // telemetry.layer2 says the same.
    let mut layer2 = s
        .client
        .subscribe(subjects::TELEMETRY_LAYER2)
        .await
        .expect("sub");
    let msg = tokio::time::timeout(LIMIT, layer2.next())
        .await
        .expect("telemetry.layer2 arrives")
        .expect("message");
    let t: Value = serde_json::from_slice(&msg.payload).expect("json");
    assert_eq!(t["component"], "layer2");
    assert_eq!(t["overall_health"], "healthy", "{t}");
    let _ = (&s.server, &s.cfg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_scheduler_is_alerted_once_and_its_return_announced() {
    let mut s = stack(3, |_| {}).await;
    wait_report(&s.client, "healthy first", healthy_and_ready).await;

    s.scheduler
        .take()
        .expect("scheduler")
        .stop()
        .await
        .expect("scheduler stops cleanly");
    let alert = s
        .alerts
        .wait("scheduler", "heartbeat_missing", "raised")
        .await;
    assert_eq!(alert["event_type"], "layer2.critical_alert");
    assert_eq!(alert["source"], "watchdog");
    let p = &alert["payload"];
    assert_eq!(p["severity"], "critical");
    assert_eq!(p["health"], "critical");
    assert!(
        p["reason"].as_str().unwrap_or("").contains("scheduler"),
        "{p}"
    );
    let r = report(&s.client).await;
    assert_eq!(r["overall_health"], "critical");
    assert_eq!(r["all_ready"], false);
    assert_eq!(
        r["components"]["scheduler"]["last_alert"]["condition"],
        "heartbeat_missing"
    );

    // Once: several more sweeps (past the heartbeat timeout too) send nothing more.
    sweeps(&s.client, 15).await;
    assert_eq!(
        s.alerts.count("scheduler", "heartbeat_missing", "raised"),
        1
    );
    assert_eq!(
        s.alerts.count("scheduler", "heartbeat_missing", "repeated"),
        0
    );
    assert_eq!(
        s.alerts
            .count("scheduler", "heartbeat_missing", "recovered"),
        0
    );

    // The scheduler comes back: one recovery notice, and the report is healthy again.
    let _scheduler = start_scheduler(s.cfg.clone()).await;
    let recovered = s
        .alerts
        .wait("scheduler", "heartbeat_missing", "recovered")
        .await;
    assert_eq!(recovered["payload"]["severity"], "critical");
    wait_report(&s.client, "healthy again", healthy_and_ready).await;
    sweeps(&s.client, 5).await;
    assert_eq!(
        s.alerts
            .count("scheduler", "heartbeat_missing", "recovered"),
        1
    );
    assert_eq!(
        s.alerts.count("scheduler", "heartbeat_missing", "raised"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_workers_is_critical() {
    let s = stack(0, |_| {}).await;
    let alert = s
        .alerts
        .wait("htm_orchestrator", "no_workers", "raised")
        .await;
    assert_eq!(alert["event_type"], "layer2.critical_alert");
    let r = report(&s.client).await;
    assert_eq!(r["overall_health"], "critical", "{r:#}");
    assert_eq!(r["all_ready"], false);
    assert_eq!(r["components"]["htm_orchestrator"]["health"], "critical");
    assert_eq!(r["components"]["htm_orchestrator"]["ready"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_over_the_htm_threshold_raises_the_warning() {
    let s = stack(3, |cfg| cfg.scheduler.htm_queue_warn = 3).await;
    wait_report(&s.client, "healthy first", healthy_and_ready).await;
    let (reply, code) = request_json(&s.client, subjects::SCHEDULER_PAUSE, "{}").await;
    assert_eq!(code, None, "{reply}");
    for i in 0..5 {
        let body = json!({"intent_id": format!("wd-{i}"), "intent_type": "query_knowledge", "actor": "tester",
                          "mission_context": {"learning_impact": true}});
        let (reply, code) =
            request_json(&s.client, subjects::INTENT_SUBMIT, body.to_string()).await;
        assert_eq!((code, reply["status"].as_str()), (None, Some("queued")));
    }
    let alert = s
        .alerts
        .wait("htm_orchestrator", "queue_depth", "raised")
        .await;
    assert_eq!(alert["event_type"], "layer2.warning_alert");
    assert!(
        alert["payload"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("above the warning threshold 3"),
        "{alert}"
    );
    let r = report(&s.client).await;
    assert_eq!(r["overall_health"], "degraded", "{r:#}");

    // Dispatch again: the queue drains and the warning is withdrawn once.
    let (reply, code) = request_json(&s.client, subjects::SCHEDULER_RESUME, "{}").await;
    assert_eq!(code, None, "{reply}");
    s.alerts
        .wait("htm_orchestrator", "queue_depth", "recovered")
        .await;
    assert_eq!(
        s.alerts.count("htm_orchestrator", "queue_depth", "raised"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_watchdog_replicas_alert_once_and_recover_once() {
    let mut s = stack(3, |_| {}).await;
    let _second = start_watchdog(s.cfg.clone()).await;
    wait_report(&s.client, "healthy first", healthy_and_ready).await;
    // Both replicas answer reports (one queue group); exactly one of them announces.
    let mut seen = std::collections::BTreeMap::new();
    let deadline = std::time::Instant::now() + LIMIT;
    while seen.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "both replicas answer reports: {seen:?}"
        );
        let r = report(&s.client).await;
        if let Some(replica) = r["watchdog_replica"].as_str() {
            seen.insert(replica.to_owned(), r["announcing"].as_bool());
        }
    }
    assert_eq!(
        seen.values().filter(|a| **a == Some(true)).count(),
        1,
        "one announcing replica: {seen:?}"
    );

    s.scheduler
        .take()
        .expect("scheduler")
        .stop()
        .await
        .expect("scheduler stops cleanly");
    s.alerts
        .wait("scheduler", "heartbeat_missing", "raised")
        .await;
    sweeps(&s.client, 15).await;
    assert_eq!(
        s.alerts.count("scheduler", "heartbeat_missing", "raised"),
        1,
        "two replicas, one alert"
    );
    let _scheduler = start_scheduler(s.cfg.clone()).await;
    s.alerts
        .wait("scheduler", "heartbeat_missing", "recovered")
        .await;
    sweeps(&s.client, 5).await;
    assert_eq!(
        s.alerts
            .count("scheduler", "heartbeat_missing", "recovered"),
        1
    );
}
