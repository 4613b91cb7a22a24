//! Playbooks end to end, against a real nats-server: each shipped playbook started by its real
//! incident with its effect observed (storm mitigation limits and throttles, load shedding
//! brings the queue under 1000 keeping every task of priority >= 5, worker recovery respawns a
//! hung worker, the circuit-breaker playbook leaves the breaker closed once the flood ends,
//! scheduler recovery resumes a stalled dispatch); rollback on a failed verification; every
//! sandbox limit and forbidden capability stopped with a clear error while the runner keeps
//! serving; bad parameters and unknown playbooks refused; repeated incidents not stacked.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::envelope::MeshEvent;
use bulwark_common::mesh::{BreakerRecord, BreakerState, RateLimit};
use bulwark_common::{BulwarkConfig, streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(90);

/// Fast timings: short heartbeats and sweeps, waits and intervals of the playbooks scaled down.
fn config(server: &NatsServer) -> BulwarkConfig {
    let mut cfg = server.config();
    cfg.playbooks.time_scale = 0.1;
    cfg.worker.heartbeat_interval_s = 0.2;
    cfg.worker.respawn_delay_s = 0.2;
    cfg.scheduler.heartbeat_timeout_s = 1.0;
    cfg.scheduler.check_interval_s = 0.2;
    cfg.scheduler.ack_wait_s = 3.0;
    cfg.scheduler.dispatch_timeout_ms = 1_000;
    cfg.telemetry.interval_s = 0.5;
    cfg
}

/// Follows `mesh.playbook.>`: every run event, by kind.
struct Runs {
    sub: async_nats::Subscriber,
    seen: Vec<(String, Value)>,
}

impl Runs {
    async fn follow(client: &async_nats::Client) -> Self {
        let sub = client
            .subscribe("mesh.playbook.>")
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        Runs {
            sub,
            seen: Vec::new(),
        }
    }

    /// Waits for the `kind` event (`started`, `step`, `completed`, `failed`) of `playbook`.
    async fn next(&mut self, playbook: &str, kind: &str) -> Value {
        let want = format!("playbook.{kind}");
        if let Some((_, p)) = self
            .seen
            .iter()
            .find(|(t, p)| *t == want && p["playbook"] == playbook)
        {
            return p.clone();
        }
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.sub.next())
                .await
                .unwrap_or_else(|_| panic!("no {want} of {playbook}; seen: {:#?}", self.seen))
                .expect("subscription open");
            let event: Value = serde_json::from_slice(&msg.payload).expect("JSON event");
            let kind_seen = event["event_type"].as_str().unwrap_or_default().to_owned();
            let payload = event["payload"].clone();
            self.seen.push((kind_seen.clone(), payload.clone()));
            if kind_seen == want && payload["playbook"] == playbook {
                return payload;
            }
        }
    }

    /// Reads events for `how_long`.
    async fn pump(&mut self, how_long: Duration) {
        let deadline = tokio::time::Instant::now() + how_long;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, self.sub.next()).await {
            let event: Value = serde_json::from_slice(&msg.payload).expect("JSON event");
            self.seen.push((
                event["event_type"].as_str().unwrap_or_default().to_owned(),
                event["payload"].clone(),
            ));
        }
    }

    /// Waits until `n` `kind` events of `playbook` were seen; returns their payloads.
    async fn at_least(&mut self, playbook: &str, kind: &str, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.count(playbook, kind) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} {kind} of {playbook}: {:#?}",
                self.seen
            );
            self.pump(Duration::from_millis(200)).await;
        }
        let want = format!("playbook.{kind}");
        self.seen
            .iter()
            .filter(|(t, p)| *t == want && p["playbook"] == playbook)
            .map(|(_, p)| p.clone())
            .collect()
    }

    fn count(&self, playbook: &str, kind: &str) -> usize {
        let want = format!("playbook.{kind}");
        self.seen
            .iter()
            .filter(|(t, p)| *t == want && p["playbook"] == playbook)
            .count()
    }

    fn steps(&self, run_id: &Value) -> Vec<Value> {
        self.seen
            .iter()
            .filter(|(t, p)| t == "playbook.step" && &p["run_id"] == run_id)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

/// Publishes an incident the way the safeguards do (JetStream, into `BULWARK_MESH`).
async fn incident(js: &jetstream::Context, event_type: &str, payload: Value) -> MeshEvent {
    let event = MeshEvent::root(event_type, "test", payload);
    js.publish(
        subjects::mesh(event_type),
        serde_json::to_vec(&event).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    event
}

async fn narratives(js: &jetstream::Context, who: &str) -> Vec<Value> {
    stored_narratives(js, who).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_mitigation_limits_the_stormed_type_and_throttles_its_source() {
    use bulwark_common::mesh_publisher::MeshPublisher;
    init_logging();
    let server = NatsServer::start();
    let mut cfg = config(&server);
    cfg.mesh.storm_threshold = 30;
    cfg.mesh.breaker_threshold = 10_000_000;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let _guard = start_storm_guard(cfg.clone()).await;
    let _playbooks = start_playbooks(cfg.clone()).await;
    let mut runs = Runs::follow(&client).await;

    // A well-behaved publisher floods test.spam until the playbook is done.
    let publisher = MeshPublisher::new(
        client.clone(),
        js.clone(),
        "flooder",
        Duration::from_secs(1),
    )
    .await
    .expect("publisher");
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let flood = {
        let (publisher, stop, published) = (publisher.clone(), stop.clone(), published.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let event = MeshEvent::root("test.spam", "flooder", json!({}));
                publisher.publish(&event).await.expect("stored");
                published.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let started = runs.next("trigger_storm_mitigation", "started").await;
    assert_eq!(started["params"]["event_type"], "test.spam", "{started}");
    let done = runs.next("trigger_storm_mitigation", "completed").await;
    stop.store(true, Ordering::Relaxed);
    flood.await.expect("flood ends");
    assert_eq!(done["verified"], true, "{done}");

    // The type is limited in every mesh consumer, and the source was throttled and slowed down.
    let limits = js
        .get_key_value(streams::LIMITS_BUCKET)
        .await
        .expect("limits bucket");
    let limit: RateLimit = serde_json::from_slice(
        &limits
            .get("test.spam")
            .await
            .expect("read")
            .expect("a limit"),
    )
    .expect("record");
    assert_eq!(limit.limit_per_second, 100);
    assert_eq!(limit.set_by, "playbooks");
    let steps = runs.steps(&started["run_id"]);
    let titles: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(
        titles,
        [
            "Rate-limit the stormed type",
            "Trace the flood source",
            "Throttle the source",
            "Verify (rate_fell)"
        ]
    );
    assert_eq!(
        steps[1]["result"]["flood_source"], "flooder",
        "{:#?}",
        steps[1]
    );
    let throttled_to = steps[2]["result"]["throttled_to"].as_i64().expect("a rate");
    assert!(throttled_to <= 50, "throttled to {throttled_to}/s");
    assert!(
        publisher.stats().delayed.load(Ordering::Relaxed) > 0,
        "the flooder held events back"
    );

    // Nothing was lost: every event the flooder published is stored.
    let mesh = js.get_stream(streams::MESH_STREAM).await.expect("stream");
    let info = mesh
        .info_with_subjects("mesh.test.spam")
        .await
        .expect("info");
    let counts: HashMap<String, usize> = info
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    assert_eq!(
        counts.get("mesh.test.spam").copied().unwrap_or(0) as u64,
        published.load(Ordering::Relaxed)
    );

    // Each step narrated with the values it saw, and the end of the storm.
    let told = narratives(&js, "playbooks").await;
    let whats: Vec<&str> = told.iter().filter_map(|n| n["what"].as_str()).collect();
    assert!(whats.contains(&"playbook_started"), "{whats:?}");
    assert_eq!(
        whats.iter().filter(|w| **w == "playbook_step").count(),
        3,
        "{whats:?}"
    );
    assert!(whats.contains(&"storm_mitigated"), "{whats:?}");
    assert!(whats.contains(&"playbook_completed"), "{whats:?}");
    let traced = told
        .iter()
        .find(|n| n["what"] == "playbook_step" && n["context"]["step"] == 2)
        .expect("step 2 narrated");
    assert!(
        traced["why"].to_string().contains("top_source"),
        "the narrative lists the calls with their values: {traced}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shedding_brings_the_queue_under_1000_and_keeps_every_high_priority_task() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = config(&server);
    cfg.scheduler.queue_warn = 500;
    cfg.scheduler.queue_critical = 1_200;
    cfg.playbooks.overrides.insert(
        "scheduler_load_shedding".into(),
        [("older_than_s".to_owned(), json!(0.0))]
            .into_iter()
            .collect(),
    );
    let client = server.client().await;
    let _gov = start_governance(cfg.clone()).await;
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _playbooks = start_playbooks(cfg.clone()).await;
    let mut runs = Runs::follow(&client).await;
    // No workers: the queue only grows until the playbook acts.
    let (paused, _) = request_json(&client, subjects::SCHEDULER_PAUSE, "{}").await;
    assert_eq!(paused["paused"], true);

    let low = 700;
    let high = 600;
    let mut submitted = Vec::new();
    for i in 0..(low + high) {
        let priority = if i % 13 < 7 && submitted.iter().filter(|(_, p)| *p < 5).count() < low {
            2
        } else if submitted.iter().filter(|(_, p)| *p >= 5).count() < high {
            7
        } else {
            2
        };
        submitted.push((format!("shed-{i}"), priority));
    }
    let requests = submitted.iter().map(|(id, priority)| {
        let client = client.clone();
        let body = json!({"intent_id": id, "intent_type": "query_knowledge", "actor": "tester",
                          "priority": priority, "payload": {}})
        .to_string();
        async move { request_json(&client, subjects::INTENT_SUBMIT, body).await }
    });
    let replies: Vec<_> = futures::stream::iter(requests)
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        replies.iter().all(|(_, code)| code.is_none()),
        "all accepted"
    );

    let started = runs.next("scheduler_load_shedding", "started").await;
    assert!(
        started["params"]["queue_depth"].as_u64().unwrap_or(0) >= 1_200,
        "{started}"
    );
    let done = runs.next("scheduler_load_shedding", "completed").await;
    assert_eq!(done["verified"], true, "{done}");
    let (ready, _) = request_json(&client, subjects::HTM_READINESS, "{}").await;
    let depth = ready["queue_depth"].as_u64().expect("depth");
    assert!(depth < 1_000, "queue depth {depth} is under 1000");

    // Every high-priority task is still queued; every shed task is parked, not deleted.
    let mut shed = 0;
    for (id, priority) in &submitted {
        let (status, _) = request_json(
            &client,
            subjects::INTENT_STATUS,
            json!({ "intent_id": id }).to_string(),
        )
        .await;
        let s = status["status"].as_str().unwrap_or_default().to_owned();
        if *priority >= 5 {
            assert_eq!(s, "queued", "{id} (priority {priority}) is kept: {status}");
        } else if s == "shed" {
            shed += 1;
        } else {
            assert_eq!(s, "queued", "{id}: {status}");
        }
    }
    assert!(shed >= 300, "{shed} shed");
    let js = jetstream::new(client.clone());
    let mut parked = js
        .get_stream(streams::TASKS_PARKED_STREAM)
        .await
        .expect("parked stream");
    let info = parked.info().await.expect("info");
    assert_eq!(
        info.state.messages, shed,
        "every shed task is parked, replayable"
    );
    let told = narratives(&js, "playbooks").await;
    assert!(
        told.iter().any(|n| n["what"] == "log_load_shedding"
            && n["why"]
                .to_string()
                .contains("Preserve critical operations")),
        "the decision is recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_recovery_respawns_a_hung_worker() {
    init_logging();
    let server = NatsServer::start();
    let cfg = config(&server);
    let client = server.client().await;
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _pool = start_pool(cfg.clone(), &["w-1", "w-2", "w-3"]).await;
    let _playbooks = start_playbooks(cfg.clone()).await;
    let mut runs = Runs::follow(&client).await;
    let healthy = |n: u64| {
        let client = client.clone();
        move || {
            let client = client.clone();
            async move {
                let (r, _) = request_json(&client, subjects::HTM_READINESS, "{}").await;
                (r["healthy_workers"] == n).then_some(())
            }
        }
    };
    eventually(PATIENCE, "3 healthy workers", healthy(3)).await;

    let (reply, code) = request_json(
        &client,
        subjects::POOL_KILL,
        r#"{"worker_id": "w-2", "mode": "hang"}"#,
    )
    .await;
    assert_eq!(code, None, "{reply}");
    let started = runs.next("htm_worker_recovery", "started").await;
    assert_eq!(started["params"]["worker_id"], "w-2");
    let done = runs.next("htm_worker_recovery", "completed").await;
    assert_eq!(done["verified"], true, "{done}");
    let steps = runs.steps(&started["run_id"]);
    assert_eq!(
        steps[0]["result"]["worker_state"], "hung",
        "{:#?}",
        steps[0]
    );
    assert_eq!(
        steps[1]["result"]["respawned"],
        json!(["w-2"]),
        "{:#?}",
        steps[1]
    );
    eventually(PATIENCE, "3 healthy workers again", healthy(3)).await;
    let (pool, _) = request_json(&client, subjects::POOL_STATUS, "{}").await;
    let w2 = pool["workers"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["worker_id"] == "w-2"))
        .cloned()
        .expect("w-2");
    assert_eq!(w2["state"], "running", "{pool}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_playbook_closes_the_breaker_once_the_flood_ends() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = config(&server);
    cfg.mesh.storm_threshold = 1_000_000;
    cfg.mesh.breaker_threshold = 200;
    cfg.mesh.breaker_window_s = 2.0;
    // Left alone, the breaker would stay open for 10 minutes.
    cfg.mesh.cooldown_s = 600.0;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let _guard = start_storm_guard(cfg.clone()).await;
    let _playbooks = start_playbooks(cfg.clone()).await;
    let mut runs = Runs::follow(&client).await;
    let mut closed = client
        .subscribe(subjects::MESH_BREAKER_CLOSED)
        .await
        .expect("subscribe");

    // A burst of 400 events from one source, then silence.
    for chunk in 0..4 {
        let mut acks = Vec::new();
        for i in 0..100 {
            let event = MeshEvent::root(
                "chaos.trigger.burst",
                "burster",
                json!({"n": chunk * 100 + i}),
            );
            acks.push(
                js.publish(
                    "mesh.chaos.trigger.burst",
                    serde_json::to_vec(&event).expect("json").into(),
                )
                .await
                .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    }
    let started = runs.next("trigger_mesh_circuit_breaker", "started").await;
    assert!(
        started["params"]["event_count"].as_u64().unwrap_or(0) > 200,
        "{started}"
    );
    let done = runs.next("trigger_mesh_circuit_breaker", "completed").await;
    assert_eq!(done["verified"], true, "{done}");
    let steps = runs.steps(&started["run_id"]);
    assert!(
        steps[0]["result"]["throttled"]
            .to_string()
            .contains("burster"),
        "the busiest source was throttled: {:#?}",
        steps[0]
    );
    let msg = tokio::time::timeout(PATIENCE, closed.next())
        .await
        .expect("a mesh.breaker.closed event")
        .expect("open");
    let event: Value = serde_json::from_slice(&msg.payload).expect("json");
    assert_eq!(event["payload"]["forced_by"], "playbooks", "{event}");
    let bucket = js
        .get_key_value(streams::BREAKER_BUCKET)
        .await
        .expect("bucket");
    let record: BreakerRecord = serde_json::from_slice(
        &bucket
            .get(streams::BREAKER_KEY)
            .await
            .expect("read")
            .expect("record"),
    )
    .expect("record");
    assert_eq!(record.state, BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_recovery_resumes_a_stalled_dispatch() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = config(&server);
    cfg.watchdog.check_interval_s = 0.5;
    cfg.playbooks.overrides.insert(
        "scheduler_recovery".into(),
        [("resume_paused".to_owned(), json!(true))]
            .into_iter()
            .collect(),
    );
    let client = server.client().await;
    let _gov = start_governance(cfg.clone()).await;
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _pool = start_pool(cfg.clone(), &["r-1", "r-2", "r-3"]).await;
    let _watchdog = start_watchdog(cfg.clone()).await;
    let _playbooks = start_playbooks(cfg.clone()).await;
    let mut runs = Runs::follow(&client).await;
    request_json(&client, subjects::SCHEDULER_PAUSE, "{}").await;
    for i in 0..20 {
        let body = json!({"intent_id": format!("stall-{i}"), "intent_type": "query_knowledge",
                          "actor": "tester", "payload": {}});
        let (reply, code) = request_json(&client, subjects::INTENT_SUBMIT, body.to_string()).await;
        assert_eq!(code, None, "{reply}");
    }
    let started = runs.next("scheduler_recovery", "started").await;
    let done = runs.next("scheduler_recovery", "completed").await;
    assert_eq!(done["verified"], true, "{done}");
    let steps = runs.steps(&started["run_id"]);
    assert_eq!(steps[0]["result"]["paused"], true, "{:#?}", steps[0]);
    assert_eq!(steps[2]["result"]["resumed"], true, "{:#?}", steps[2]);
    for i in 0..20 {
        let id = format!("stall-{i}");
        eventually(PATIENCE, "every stalled task completes", || {
            let client = client.clone();
            let id = id.clone();
            async move {
                let (s, _) = request_json(
                    &client,
                    subjects::INTENT_STATUS,
                    json!({ "intent_id": id }).to_string(),
                )
                .await;
                (s["status"] == "completed").then_some(())
            }
        })
        .await;
    }
}

/// Playbooks written for the tests, in a folder of their own.
fn test_playbooks() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    let write = |name: &str, body: &str| {
        std::fs::write(dir.path().join(format!("{name}.rhai")), body).expect("written")
    };
    let meta = |name: &str, extra: &str| {
        format!(
            "fn playbook() {{ #{{ name: \"{name}\", triggers: [\"event.incident\"], slo_s: 20, {extra} }} }}\n"
        )
    };
    write(
        "undo_on_failed_check",
        &(meta(
            "undo_on_failed_check",
            "params: #{ event_type: \"string\" }, forward: [\"event_type\"], steps: [\"act\"], verify: \"check\", rollback: \"undo\"",
        ) + r#"
fn act(p) { limit_event_type(p.event_type, 5, 60.0); #{ limited: true } }
fn check(p) { verify(2, 0.1, || false) }
fn undo(p) { narrate("undone", "lifting the limit on " + p.event_type + ": " + p.failure); limit_event_type(p.event_type, 1000000, 1.0); }
"#),
    );
    write(
        "forever",
        &(meta("forever", "steps: [\"spin\"]") + "fn spin(p) { loop {} }\n"),
    );
    write(
        "deep",
        &(meta("deep", "steps: [\"down\"]") + "fn down(p) { f(0) }\nfn f(n) { f(n + 1) }\n"),
    );
    write(
        "huge",
        &(meta("huge", "steps: [\"grow\"]") + "fn grow(p) { let s = \"x\"; loop { s += s; } }\n"),
    );
    write(
        "missing",
        &(meta("missing", "steps: [\"wipe\"]") + "fn wipe(p) { delete_everything(p) }\n"),
    );
    write(
        "files",
        &(meta("files", "steps: [\"read\"]") + "fn read(p) { open(\"/etc/passwd\") }\n"),
    );
    write(
        "slow",
        &(meta(
            "slow",
            "params: #{ target: \"string\" }, forward: [\"target\"], resource: \"target\", cooldown_s: 100, steps: [\"nap\"]",
        ) + "fn nap(p) { wait(10); #{ napped: true } }\n"),
    );
    write(
        "typed",
        &(meta(
            "typed",
            "params: #{ n: \"int\", name: \"string\" }, forward: [\"n\", \"name\"], steps: [\"s\"]",
        ) + "fn s(p) { #{ doubled: p.n * 2 } }\n"),
    );
    dir
}

async fn sandbox_stack() -> (NatsServer, BulwarkConfig, tempfile::TempDir, RunningService) {
    init_logging();
    let server = NatsServer::start();
    let dir = test_playbooks();
    let mut cfg = config(&server);
    cfg.playbooks.dir = dir.path().display().to_string();
    cfg.playbooks.max_operations = 200_000;
    let playbooks = start_playbooks(cfg.clone()).await;
    (server, cfg, dir, playbooks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_verification_runs_the_rollback() {
    let (server, cfg, _dir, _playbooks) = sandbox_stack().await;
    let _guard = start_storm_guard(cfg.clone()).await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let mut runs = Runs::follow(&client).await;
    incident(
        &js,
        "event.incident",
        json!({"playbook": "undo_on_failed_check", "event_type": "x.y"}),
    )
    .await;
    let failed = runs.next("undo_on_failed_check", "failed").await;
    assert_eq!(failed["verified"], false, "{failed}");
    assert_eq!(failed["rollback"], true, "{failed}");
    assert_eq!(failed["error_kind"], "verification", "{failed}");
    let steps = runs.steps(&failed["run_id"]);
    let phases: Vec<&str> = steps.iter().filter_map(|s| s["phase"].as_str()).collect();
    assert_eq!(phases, ["step", "verify", "rollback"]);
    // The rollback really acted: the limit it set replaced the step's.
    let limits = js
        .get_key_value(streams::LIMITS_BUCKET)
        .await
        .expect("bucket");
    let limit: RateLimit =
        serde_json::from_slice(&limits.get("x.y").await.expect("read").expect("limit"))
            .expect("record");
    assert_eq!(limit.limit_per_second, 1_000_000);
    let told = narratives(&js, "playbooks").await;
    assert!(
        told.iter().any(|n| n["what"] == "undone"),
        "the rollback narrated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sandbox_limit_stops_a_script_with_its_name_and_the_runner_keeps_serving() {
    let (server, _cfg, _dir, _playbooks) = sandbox_stack().await;
    let client = server.client().await;
    for (name, kind, says) in [
        ("forever", "operations", "operation limit of 200000"),
        ("deep", "call_depth", "call depth limit of 32"),
        ("huge", "data_size", "over the limit"),
        ("missing", "missing_function", "delete_everything"),
        ("files", "missing_function", "open"),
    ] {
        let (outcome, code) = request_json(
            &client,
            subjects::PLAYBOOK_RUN,
            json!({"playbook": name, "wait": true}).to_string(),
        )
        .await;
        assert_eq!(code, None, "{outcome}");
        assert_eq!(outcome["status"], "failed", "{name}: {outcome}");
        assert_eq!(outcome["error_kind"], kind, "{name}: {outcome}");
        assert!(
            outcome["error"].as_str().unwrap_or_default().contains(says),
            "{name}: {outcome}"
        );
    }
    // Still serving: a good run afterwards works.
    let (outcome, code) = request_json(
        &client,
        subjects::PLAYBOOK_RUN,
        json!({"playbook": "typed", "params": {"n": 21, "name": "x"}, "wait": true}).to_string(),
    )
    .await;
    assert_eq!(code, None, "{outcome}");
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(outcome["params"]["doubled"], 42, "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_and_import_never_load_and_check_names_the_file_and_position() {
    init_logging();
    let server = NatsServer::start();
    let dir = test_playbooks();
    std::fs::write(
        dir.path().join("evil.rhai"),
        "fn playbook() { #{ name: \"evil\", steps: [\"s\"] } }\nfn s(p) {\n    eval(\"1 + 1\")\n}\n",
    )
    .expect("written");
    std::fs::write(
        dir.path().join("importer.rhai"),
        "import \"os\" as os;\nfn playbook() { #{ name: \"importer\", steps: [\"s\"] } }\nfn s(p) { 1 }\n",
    )
    .expect("written");
    let mut cfg = config(&server);
    cfg.playbooks.dir = dir.path().display().to_string();
    let _playbooks = start_playbooks(cfg).await;
    let client = server.client().await;
    let (check, _) = request_json(&client, subjects::PLAYBOOK_CHECK, "{}").await;
    assert_eq!(check["ok"], false, "{check}");
    let errors = check["errors"].as_array().expect("errors");
    let evil = errors
        .iter()
        .find(|e| {
            e["file"]
                .as_str()
                .unwrap_or_default()
                .ends_with("evil.rhai")
        })
        .expect("evil.rhai refused");
    assert_eq!(
        evil["location"].as_str().map(|l| l.starts_with("3:")),
        Some(true),
        "{evil}"
    );
    assert!(evil["message"].to_string().contains("eval"), "{evil}");
    assert!(
        errors.iter().any(|e| e["file"]
            .as_str()
            .unwrap_or_default()
            .ends_with("importer.rhai")),
        "importer.rhai refused: {check}"
    );
    let (list, _) = request_json(&client, subjects::PLAYBOOK_LIST, "{}").await;
    let names: Vec<&str> = list["playbooks"]
        .as_array()
        .expect("playbooks")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        !names.contains(&"evil") && !names.contains(&"importer"),
        "{names:?}"
    );
    assert!(names.contains(&"typed"), "the good ones load: {names:?}");
    let (reply, code) = request_json(&client, subjects::PLAYBOOK_RELOAD, "{}").await;
    assert_eq!(
        code.as_deref(),
        Some("400"),
        "a reload with errors is refused: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_and_unknown_playbooks_are_refused_with_the_reason() {
    let (server, _cfg, _dir, _playbooks) = sandbox_stack().await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let mut runs = Runs::follow(&client).await;

    let (reply, code) = request_json(
        &client,
        subjects::PLAYBOOK_RUN,
        json!({"playbook": "typed", "params": {"n": "seven"}}).to_string(),
    )
    .await;
    assert_eq!(code.as_deref(), Some("400"), "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("n must be an int, got a string"),
        "{message}"
    );
    assert!(message.contains("name (string) is required"), "{message}");
    let (reply, code) = request_json(
        &client,
        subjects::PLAYBOOK_RUN,
        json!({"playbook": "nope"}).to_string(),
    )
    .await;
    assert_eq!(code.as_deref(), Some("404"), "{reply}");
    assert!(
        reply["error"]["message"].to_string().contains("typed"),
        "lists the known ones: {reply}"
    );

    let bad = incident(
        &js,
        "event.incident",
        json!({"playbook": "typed", "n": 1.5, "name": "x"}),
    )
    .await;
    let refused = runs.next("typed", "failed").await;
    assert_eq!(refused["stage"], "refused", "{refused}");
    assert_eq!(refused["incident_id"], bad.event_id.as_str());
    assert!(
        refused["error"].to_string().contains("n must be an int"),
        "{refused}"
    );

    incident(
        &js,
        "event.incident",
        json!({"playbook": "no_such_playbook"}),
    )
    .await;
    let unknown = runs.next("no_such_playbook", "failed").await;
    assert!(
        unknown["error"].to_string().contains("unknown playbook"),
        "{unknown}"
    );
    assert_eq!(runs.count("typed", "started"), 0, "nothing ran");
    let told = narratives(&js, "playbooks").await;
    assert!(
        told.iter()
            .filter(|n| n["what"] == "playbook_refused")
            .count()
            >= 2,
        "each refusal narrated"
    );
    let (list, _) = request_json(&client, subjects::PLAYBOOK_LIST, "{}").await;
    assert!(
        list["counters"]["refused"].as_u64().unwrap_or(0) >= 2,
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_incidents_during_a_run_or_its_cooldown_are_counted_not_stacked() {
    let (server, _cfg, _dir, _playbooks) = sandbox_stack().await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let mut runs = Runs::follow(&client).await;
    for _ in 0..5 {
        incident(
            &js,
            "event.incident",
            json!({"playbook": "slow", "target": "a"}),
        )
        .await;
    }
    // A different resource is a different run.
    incident(
        &js,
        "event.incident",
        json!({"playbook": "slow", "target": "b"}),
    )
    .await;
    let completed = runs.at_least("slow", "completed", 2).await;
    let by_target: HashMap<String, Value> = completed
        .into_iter()
        .map(|p| (p["resource"].as_str().unwrap_or_default().to_owned(), p))
        .collect();
    assert_eq!(by_target["a"]["repeats"], 4, "{:#?}", by_target["a"]);
    assert_eq!(by_target["b"]["repeats"], 0);
    // In the cooldown, another incident is counted too.
    incident(
        &js,
        "event.incident",
        json!({"playbook": "slow", "target": "a"}),
    )
    .await;
    runs.pump(Duration::from_secs(2)).await;
    assert_eq!(runs.count("slow", "started"), 2, "{:#?}", runs.seen);
    let (list, _) = request_json(&client, subjects::PLAYBOOK_LIST, "{}").await;
    assert_eq!(list["counters"]["suppressed"], 5, "{list}");
    let slow = list["playbooks"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "slow"))
        .cloned()
        .expect("slow");
    assert_eq!(slow["last_run"]["status"], "completed", "{slow}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_cascade_runs_the_cascade_breaker_and_rules_pass_their_event_as_parameters() {
    init_logging();
    let server = NatsServer::start();
    let policies = tempfile::tempdir().expect("tmp");
    std::fs::write(
        policies.path().join("test.toml"),
        r#"
[[rule]]
name = "self_trigger"
on = "mesh.cascade.>"
[rule.emit]
event_type = "cascade.l{depth}"

[[rule]]
name = "typed_by_rule"
on = "mesh.test.typed"
[rule.playbook]
name = "typed"
forward = ["name", "n"]
params = { n = 2 }
"#,
    )
    .expect("rules");
    let dir = test_playbooks();
    std::fs::copy(
        repo_root().join("playbooks/event_cascade_breaker.rhai"),
        dir.path().join("event_cascade_breaker.rhai"),
    )
    .expect("copied");
    let mut cfg = config(&server);
    cfg.mesh.policies_dir = policies.path().to_owned();
    cfg.playbooks.dir = dir.path().display().to_string();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let _guard = start_storm_guard(cfg.clone()).await;
    let _engine = start_event_policy(cfg.clone()).await;
    let _playbooks = start_playbooks(cfg.clone()).await;
    let mut runs = Runs::follow(&client).await;

    let root = incident(&js, "cascade.l0", json!({"chain": 0})).await;
    let started = runs.next("event_cascade_breaker", "started").await;
    assert_eq!(
        started["params"]["correlation_id"],
        root.correlation_id.as_str(),
        "{started}"
    );
    assert_eq!(started["params"]["depth"], 11, "{started}");
    let done = runs.next("event_cascade_breaker", "completed").await;
    assert_eq!(done["verified"], true, "{done}");
    let steps = runs.steps(&started["run_id"]);
    assert_eq!(steps[1]["result"]["damped"], true, "{:#?}", steps[1]);

    // A rule's playbook gets the keys of the triggering event the rule forwards, with the
    // rule's params over them.
    incident(
        &js,
        "test.typed",
        json!({"name": "from-the-event", "n": 99}),
    )
    .await;
    let done = runs.next("typed", "completed").await;
    assert_eq!(done["params"]["name"], "from-the-event", "{done}");
    assert_eq!(done["params"]["n"], 2, "the rule's params win: {done}");
}
