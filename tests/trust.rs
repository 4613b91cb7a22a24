//! The trust boundary, items 3 and 7 of issue 16, against a real nats-server running the
//! repository's `nats.conf`, the attacks made by the foreign nats-py client
//! `tests/clients/hostile_service.py` holding the service credentials (after the move to
//! accounts only services can reach bulwark's KV and service-produced subjects):
//! - self-healing breaker state: junk written into `$KV.bulwark_breaker.mesh` is overwritten by
//!   the storm guard's leader at once, and every mesh event published before and during is
//!   handled once; `storm_guard.breaker.open|close` answer 503 when the store refuses the write
//!   (the bucket's stream limited to messages smaller than a record); the watchdog alerts when
//!   a mesh consumer holds events while the storm guard reports the breaker closed;
//! - playbook parameters are not the trigger's payload: an event carrying `resume_paused: true`
//!   and other safety parameters does not change a run's parameters, the operator's overrides
//!   win, and only the keys the trigger names are forwarded (the run record lists them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::mesh::{BreakerRecord, BreakerState, Delivery, MeshConsumer};
use bulwark_common::narrative::Narrator;
use bulwark_common::{BulwarkConfig, streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(60);
/// Largest message the breaker bucket's stream accepts while a test makes it refuse records:
/// the attacker's 4-byte junk fits, a breaker record (over 100 bytes) does not.
const TOO_SMALL_FOR_A_RECORD: i32 = 64;

/// Runs `tests/clients/hostile_service.py` against `server` and returns its JSON line.
async fn hostile(server: &NatsServer, args: &[&str]) -> Value {
    let url = server.url();
    let mut all = vec![url.as_str()];
    all.extend_from_slice(args);
    python_client("hostile_service.py", &all, &[]).await
}

/// Limits the breaker bucket's stream to messages of `max` bytes (-1: no limit), the real way
/// to make JetStream refuse the storm guard's writes.
async fn limit_breaker_messages(js: &jetstream::Context, max: i32) {
    let mut stream = js
        .get_stream(format!("KV_{}", streams::BREAKER_BUCKET))
        .await
        .expect("the breaker bucket's stream");
    let mut config = stream.info().await.expect("info").config.clone();
    config.max_message_size = max;
    js.update_stream(config).await.expect("stream updated");
}

/// The stored breaker entry: its revision and the record, if it decodes.
async fn stored_breaker(js: &jetstream::Context) -> (u64, Option<BreakerRecord>) {
    let bucket = js
        .get_key_value(streams::BREAKER_BUCKET)
        .await
        .expect("bucket");
    match bucket.entry(streams::BREAKER_KEY).await.expect("read") {
        Some(entry) => (entry.revision, serde_json::from_slice(&entry.value).ok()),
        None => (0, None),
    }
}

async fn storm_guard_stats(client: &async_nats::Client) -> Value {
    let (reply, _) = request_json(client, "$SRV.STATS.storm_guard", "").await;
    reply["endpoints"][0]["data"].clone()
}

async fn narratives(js: &jetstream::Context, who: &str) -> Vec<Value> {
    stored_narratives(js, who).await
}

/// Event ids a mesh consumer built on the project's `MeshConsumer` handled, in order.
type Seen = Arc<Mutex<Vec<(String, Delivery)>>>;

fn checker(js: jetstream::Context, cfg: &BulwarkConfig, token: &CancellationToken) -> Seen {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let cfg = cfg.mesh.clone();
    let token = token.clone();
    tokio::spawn(async move {
        let narrator = Narrator::new(js.clone(), "checker", "checker@test");
        let consumer = MeshConsumer::start(js, &cfg, "checker", narrator, &token)
            .await
            .expect("checker consumer starts");
        consumer
            .run(token, move |event, delivery| {
                let record = record.clone();
                async move {
                    record
                        .lock()
                        .expect("lock")
                        .push((event.event_id, delivery));
                    Ok(())
                }
            })
            .await;
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_breaker_entry_is_repaired_at_once_and_every_event_is_handled_once() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    // No periodic check after the first (at start): the repair must come from the leader's
    // watch, the first look at the junk.
    cfg.mesh.breaker_check_s = 3_600.0;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let _guard = start_storm_guard(cfg.clone()).await;
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let seen = checker(js.clone(), &cfg, &token);
    eventually(PATIENCE, "the storm guard checked once", || async {
        (storm_guard_stats(&client).await["breaker_checks"] == 1).then_some(())
    })
    .await;

    let attack = hostile(&server, &["junk-breaker", "20", "20"]).await;
    let junk_seq = attack["junk_seq"].as_u64().expect("junk stored");
    let ids: Vec<String> = attack["event_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 40);

    let (revision, record) = eventually(PATIENCE, "the breaker entry repaired", || async {
        let (revision, record) = stored_breaker(&js).await;
        (revision > junk_seq && record.is_some()).then_some((revision, record))
    })
    .await;
    let record = record.expect("decodes");
    assert_eq!(
        record.state,
        BreakerState::Closed,
        "{record:?} at {revision}"
    );
    assert!(record.leader_token > 0, "written by the leader: {record:?}");
    let stats = storm_guard_stats(&client).await;
    assert_eq!(stats["breaker_repairs"], 1, "{stats}");
    assert_eq!(
        stats["breaker_checks"], 1,
        "repaired without waiting for another check: {stats}"
    );

    let handled = eventually(PATIENCE, "all 40 events handled", || async {
        let seen = seen.lock().expect("lock").clone();
        let handled: HashMap<String, usize> = seen.iter().fold(HashMap::new(), |mut m, (id, _)| {
            *m.entry(id.clone()).or_default() += 1;
            m
        });
        ids.iter()
            .all(|id| handled.contains_key(id))
            .then_some(handled)
    })
    .await;
    for id in &ids {
        assert_eq!(handled[id], 1, "event {id} handled once");
    }
    let told = narratives(&js, "storm_guard").await;
    let repaired = told
        .iter()
        .find(|n| n["what"] == "breaker_entry_repaired")
        .expect("the repair is narrated");
    assert!(
        repaired["why"].to_string().contains("unreadable"),
        "{repaired}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_open_and_close_answer_503_when_the_store_refuses() {
    init_logging();
    let server = NatsServer::start();
    let cfg = server.config();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let _guard = start_storm_guard(cfg.clone()).await;
    let force = |subject: &'static str| {
        let client = client.clone();
        async move {
            request_json(
                &client,
                subject,
                json!({"reason": "trust test", "by": "tester"}).to_string(),
            )
            .await
        }
    };
    let state = |client: async_nats::Client| async move {
        let (status, _) = request_json(&client, subjects::STORM_GUARD_STATUS, "{}").await;
        status["breaker"]["state"].clone()
    };

    for (subject, from, to) in [
        (
            subjects::STORM_GUARD_BREAKER_OPEN,
            "closed",
            BreakerState::Open,
        ),
        (
            subjects::STORM_GUARD_BREAKER_CLOSE,
            "open",
            BreakerState::Closed,
        ),
    ] {
        limit_breaker_messages(&js, TOO_SMALL_FOR_A_RECORD).await;
        let (before_rev, before) = stored_breaker(&js).await;
        let (reply, code) = force(subject).await;
        assert_eq!(code.as_deref(), Some("503"), "{subject}: {reply}");
        assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
        assert_eq!(state(client.clone()).await, from, "{subject} undone");
        assert_eq!(
            stored_breaker(&js).await,
            (before_rev, before),
            "nothing stored"
        );

        limit_breaker_messages(&js, -1).await;
        let (reply, code) = force(subject).await;
        assert_eq!(code, None, "{reply}");
        assert_eq!(reply["changed"], true, "{reply}");
        let (_, stored) = stored_breaker(&js).await;
        assert_eq!(stored.map(|r| r.state), Some(to), "{subject} stored");
    }
    let stats = storm_guard_stats(&client).await;
    assert_eq!(stats["forced_not_stored"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_alerts_when_consumers_hold_while_the_storm_guard_says_closed() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.telemetry.interval_s = 0.5;
    cfg.watchdog.check_interval_s = 0.3;
    cfg.watchdog.ping_timeout_ms = 150;
    cfg.watchdog.required_services = vec!["storm_guard".into(), "event_policy_engine".into()];
    cfg.mesh.breaker_check_s = 0.5;
    let policies = tempfile::tempdir().expect("tmp");
    cfg.mesh.policies_dir = policies.path().to_owned();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let mut alerts = client
        .subscribe(format!("{}.>", subjects::LAYER2_ALERT_PREFIX))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let _guard = start_storm_guard(cfg.clone()).await;
    let _engine = start_event_policy(cfg.clone()).await;
    let _watchdog = start_watchdog(cfg.clone()).await;

    // The store refuses the storm guard's repairs; junk goes in (it is small enough).
    limit_breaker_messages(&js, TOO_SMALL_FOR_A_RECORD).await;
    hostile(&server, &["junk-breaker", "0", "5"]).await;
    let mut next_alert = async |state: &str| -> Value {
        loop {
            let msg = tokio::time::timeout(PATIENCE, alerts.next())
                .await
                .unwrap_or_else(|_| panic!("no held_while_breaker_closed {state}"))
                .expect("subscription open");
            let event: Value = serde_json::from_slice(&msg.payload).expect("alert");
            let p = &event["payload"];
            if p["condition"] == "held_while_breaker_closed" && p["state"] == state {
                return event;
            }
        }
    };
    let raised = next_alert("raised").await;
    assert_eq!(raised["event_type"], "layer2.critical_alert", "{raised}");
    assert_eq!(
        raised["payload"]["component"], "event_policy_engine",
        "{raised}"
    );
    let reason = raised["payload"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("unreadable"), "{reason}");
    let stats = storm_guard_stats(&client).await;
    assert!(
        stats["breaker_repair_failures"].as_u64() >= Some(1),
        "{stats}"
    );

    // The store takes writes again: the next check repairs the entry, the consumer flows and
    // the alert recovers.
    limit_breaker_messages(&js, -1).await;
    next_alert("recovered").await;
    let (_, record) = stored_breaker(&js).await;
    assert_eq!(record.map(|r| r.state), Some(BreakerState::Closed));
}

/// Every `mesh.playbook.*` event's payload, by kind.
#[derive(Clone, Default)]
struct RunEvents(Arc<Mutex<Vec<(String, Value)>>>);

impl RunEvents {
    async fn follow(client: &async_nats::Client) -> Self {
        let events = RunEvents::default();
        let mut sub = client
            .subscribe("mesh.playbook.>")
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let event: Value = serde_json::from_slice(&msg.payload).expect("JSON event");
                let kind = event["event_type"].as_str().unwrap_or_default().to_owned();
                sink.0
                    .lock()
                    .expect("lock")
                    .push((kind, event["payload"].clone()));
            }
        });
        events
    }

    /// Waits for the `kind` event of `playbook` whose parameter `component` is `component`.
    async fn wait(&self, kind: &str, playbook: &str, component: &str) -> Value {
        eventually(
            PATIENCE,
            &format!("{kind} of {playbook} for {component}"),
            || async {
                self.0
                    .lock()
                    .expect("lock")
                    .iter()
                    .find(|(k, p)| {
                        k == kind
                            && p["playbook"] == playbook
                            && p["params"]["component"] == component
                    })
                    .map(|(_, p)| p.clone())
            },
        )
        .await
    }
}

fn mesh_body(event_type: &str, source: &str, payload: Value) -> String {
    json!({"event_id": bulwark_common::ids::new_id(), "event_type": event_type,
           "source": source, "timestamp": bulwark_common::time::now(), "depth": 0,
           "payload": payload})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_parameters_in_a_trigger_payload_do_not_reach_the_playbook() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.playbooks.time_scale = 0.1;
    cfg.worker.heartbeat_interval_s = 0.2;
    cfg.scheduler.heartbeat_timeout_s = 1.0;
    cfg.scheduler.check_interval_s = 0.2;
    cfg.mesh.policies_dir = repo_root().join("policies");
    // The operator's choice: two verification tries. resume_paused keeps its default (false).
    cfg.playbooks.overrides.insert(
        "scheduler_recovery".into(),
        [("verify_retries".to_owned(), json!(2))]
            .into_iter()
            .collect(),
    );
    let client = server.client().await;
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _pool = start_pool(cfg.clone(), &["t-1", "t-2", "t-3"]).await;
    let _engine = start_event_policy(cfg.clone()).await;
    let _playbooks = start_playbooks(cfg.clone()).await;
    let runs = RunEvents::follow(&client).await;
    eventually(PATIENCE, "healthy workers", || async {
        let (r, _) = request_json(&client, subjects::HTM_READINESS, "{}").await;
        (r["healthy_workers"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    // An operator pauses dispatch on purpose.
    let (reply, code) = request_json(&client, subjects::SCHEDULER_PAUSE, "{}").await;
    assert_eq!(code, None, "{reply}");

    let widening = json!({"resume_paused": true, "verify_retries": 1000,
                          "verify_interval_s": 0.0, "hold_s": 1e9});
    // Through the rule's trigger: a critical alert about the scheduler.
    let mut alert = json!({"component": "scheduler", "severity": "critical",
                           "condition": "heartbeat_missing", "state": "raised"});
    alert
        .as_object_mut()
        .expect("object")
        .extend(widening.as_object().cloned().expect("object"));
    hostile(
        &server,
        &[
            "publish",
            "mesh.layer2.critical_alert",
            &mesh_body("layer2.critical_alert", "watchdog", alert),
        ],
    )
    .await;
    // Straight on the playbook's trigger: an incident naming it.
    let mut incident = json!({"playbook": "scheduler_recovery", "component": "hostile-scheduler",
                              "severity": "critical"});
    incident
        .as_object_mut()
        .expect("object")
        .extend(widening.as_object().cloned().expect("object"));
    hostile(
        &server,
        &[
            "publish",
            subjects::MESH_INCIDENT,
            &mesh_body("event.incident", "watchdog", incident),
        ],
    )
    .await;

    for component in ["scheduler", "hostile-scheduler"] {
        let started = runs
            .wait("playbook.started", "scheduler_recovery", component)
            .await;
        let params = &started["params"];
        assert_eq!(params["resume_paused"], false, "{started}");
        assert_eq!(params["verify_retries"], 2, "the override wins: {started}");
        assert_eq!(params["verify_interval_s"], 3.0, "the default: {started}");
        assert!(params.get("hold_s").is_none(), "{started}");
        assert_eq!(
            started["forwarded"],
            json!(["component"]),
            "the listed key is forwarded: {started}"
        );
        let failed = runs
            .wait("playbook.failed", "scheduler_recovery", component)
            .await;
        assert!(
            failed["error"]
                .to_string()
                .contains("resume_paused is false"),
            "{failed}"
        );
    }
    let direct = runs
        .wait(
            "playbook.started",
            "scheduler_recovery",
            "hostile-scheduler",
        )
        .await;
    let ignored = direct["ignored"].to_string();
    for key in [
        "resume_paused",
        "verify_retries",
        "verify_interval_s",
        "hold_s",
    ] {
        assert!(ignored.contains(key), "{key} ignored, visibly: {direct}");
    }
    let (readiness, _) = request_json(&client, subjects::HTM_READINESS, "{}").await;
    assert_eq!(
        readiness["paused"], true,
        "the operator's pause stands: {readiness}"
    );
}
