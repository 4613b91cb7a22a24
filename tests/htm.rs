//! HTM end to end, against a real nats-server: governance queues approved intents, the scheduler
//! dispatches them to workers, workers execute and report. Priority order, least-loaded choice,
//! a worker killed mid-task, retries and dead letters, pause/resume, shedding and replay, a
//! scheduler restart under load, readiness, bad input, and a worker written in Python.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::BulwarkConfig;
use bulwark_common::intent::IntentRecord;
use bulwark_common::{streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};

/// Test timings: fast heartbeats and watchdog, short redelivery.
fn htm_config(server: &NatsServer) -> BulwarkConfig {
    let mut cfg = server.config();
    cfg.worker.heartbeat_interval_s = 0.2;
    cfg.worker.report_retry_s = 30.0;
    cfg.scheduler.heartbeat_timeout_s = 1.0;
    cfg.scheduler.check_interval_s = 0.2;
    cfg.scheduler.ack_wait_s = 3.0;
    cfg.scheduler.dispatch_timeout_ms = 1_000;
    cfg
}

struct Htm {
    server: NatsServer,
    cfg: BulwarkConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    _gov: RunningService,
}

async fn htm_with(edit: impl FnOnce(&mut BulwarkConfig)) -> Htm {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = htm_config(&server);
    edit(&mut cfg);
    let gov = start_governance(cfg.clone()).await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    Htm {
        server,
        cfg,
        client,
        js,
        _gov: gov,
    }
}

async fn submit(client: &async_nats::Client, id: &str, priority: u8, payload: Value) -> Value {
    let body = json!({"intent_id": id, "intent_type": "query_knowledge", "actor": "tester", "priority": priority,
                      "payload": payload, "mission_context": {"learning_impact": true}});
    let (reply, code) = request_json(client, subjects::INTENT_SUBMIT, body.to_string()).await;
    assert_eq!(code, None, "{reply}");
    reply
}

async fn status(client: &async_nats::Client, id: &str) -> Value {
    request_json(
        client,
        subjects::INTENT_STATUS,
        json!({ "intent_id": id }).to_string(),
    )
    .await
    .0
}

async fn record(js: &jetstream::Context, id: &str) -> IntentRecord {
    let kv = js
        .get_key_value(streams::INTENTS_BUCKET)
        .await
        .expect("bucket");
    serde_json::from_slice(&kv.get(id).await.expect("read").expect("exists")).expect("record")
}

async fn wait_status(client: &async_nats::Client, id: &str, want: &str, limit: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let st = status(client, id).await;
        if st["status"] == want {
            return st;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {id} to be {want}; last status: {st}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Collects every message on `subject` until dropped; read with `drain_json`.
async fn collect(client: &async_nats::Client, subject: &str) -> async_nats::Subscriber {
    let sub = client
        .subscribe(subject.to_owned())
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    sub
}

async fn drain_json(sub: &mut async_nats::Subscriber) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        out.push(serde_json::from_slice(&msg.payload).expect("JSON"));
    }
    out
}

async fn start_workers(cfg: &BulwarkConfig, prefix: &str, n: usize) -> Vec<RunningService> {
    let mut workers = Vec::new();
    for i in 0..n {
        workers.push(start_worker(cfg.clone(), &format!("{prefix}{i}")).await);
    }
    workers
}

/// Completed handler runs and stale (refused) reports, summed over every worker's `$SRV.STATS`
/// (asked inside the workers' account: their micro registrations are visible only there).
async fn worker_totals(cfg: &BulwarkConfig) -> (u64, u64) {
    let (client, _) = bulwark_common::connect::connect(
        &cfg.nats,
        "stats-probe",
        bulwark_common::connect::Role::Worker,
    )
    .await
    .expect("a worker connects");
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("sub");
    client
        .publish_with_reply("$SRV.STATS.htm_worker", inbox, "".into())
        .await
        .expect("pub");
    let (mut ran, mut stale) = (0, 0);
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), replies.next()).await
    {
        let stats: Value = serde_json::from_slice(&msg.payload).expect("stats");
        let data = &stats["endpoints"][0]["data"];
        ran += data["completed"].as_u64().unwrap_or(0);
        stale += data["dropped_stale"].as_u64().unwrap_or(0);
    }
    (ran, stale)
}

async fn readiness(client: &async_nats::Client) -> Value {
    request_json(client, subjects::HTM_READINESS, "{}").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_highest_priority_first_fifo_within_and_complete_once() {
    let h = htm_with(|c| c.worker.capacity = 1).await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let mut dispatched = collect(&h.client, "mesh.task.dispatched").await;
    let mut completed = collect(&h.client, "mesh.task.completed").await;
    // Queued before any worker exists, so the order is the scheduler's choice alone.
    let plan: Vec<(String, u8)> = (0..24)
        .map(|i| (format!("order-{i:02}"), [1u8, 9, 5, 9, 1, 5][i % 6]))
        .collect();
    for (id, p) in &plan {
        submit(&h.client, id, *p, json!({})).await;
    }
    let _worker = start_worker(h.cfg.clone(), "solo").await;
    for (id, _) in &plan {
        let st = wait_status(&h.client, id, "completed", Duration::from_secs(30)).await;
        assert_eq!(st["result"]["handled_by"], "solo");
    }
    let order: Vec<String> = drain_json(&mut dispatched)
        .await
        .iter()
        .map(|e| {
            e["payload"]["task_id"]
                .as_str()
                .expect("task_id")
                .to_owned()
        })
        .collect();
    let mut expected: Vec<(String, u8)> = plan.clone();
    // Stable sort: highest priority first, submission order within a priority.
    expected.sort_by_key(|e| std::cmp::Reverse(e.1));
    let expected: Vec<String> = expected.into_iter().map(|(id, _)| id).collect();
    assert_eq!(order, expected, "dispatch order");
    let done = drain_json(&mut completed).await;
    assert_eq!(done.len(), plan.len(), "each task completed exactly once");
    let st = status(&h.client, "order-03").await;
    let statuses: Vec<&str> = st["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["status"].as_str().expect("s"))
        .collect();
    assert_eq!(statuses, ["queued", "dispatched", "running", "completed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_loaded_worker_is_chosen_and_the_narrative_says_why() {
    let h = htm_with(|c| c.worker.capacity = 2).await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let _a = start_worker(h.cfg.clone(), "wa").await;
    let _b = start_worker(h.cfg.clone(), "wb").await;
    eventually(Duration::from_secs(10), "both workers seen", || async {
        (readiness(&h.client).await["healthy_workers"] == 2).then_some(())
    })
    .await;
    submit(&h.client, "long-1", 5, json!({"work_ms": 2_000})).await;
    let first = eventually(Duration::from_secs(10), "long-1 running", || async {
        let st = status(&h.client, "long-1").await;
        (st["status"] == "running")
            .then_some(st["worker_id"].as_str().map(str::to_owned))
            .flatten()
    })
    .await;
    submit(&h.client, "long-2", 5, json!({"work_ms": 10})).await;
    let st = wait_status(&h.client, "long-2", "completed", Duration::from_secs(10)).await;
    let second = st["worker_id"].as_str().expect("worker").to_owned();
    assert_ne!(first, second, "the idle worker took the second task");
    let narratives = stored_narratives(&h.js).await;
    let dispatch = narratives
        .iter()
        .find(|n| n["what"] == "task_dispatched" && n["intent_id"] == "long-2")
        .expect("dispatch narrative");
    let why: Vec<&str> = dispatch["why"]
        .as_array()
        .expect("why")
        .iter()
        .map(|w| w.as_str().expect("line"))
        .collect();
    let chose = format!("chose {second}: 0/2 in flight, CPU ");
    assert!(why[0].starts_with(&chose), "{why:?}");
    assert!(
        why[1].starts_with(&format!("over {first}: 1/2 in flight")),
        "{why:?}"
    );
    assert!(why.iter().any(|l| l.contains("queue depth")), "{why:?}");
}

async fn stored_narratives(js: &jetstream::Context) -> Vec<Value> {
    let mut stream = js
        .get_stream(streams::NARRATIVES_STREAM)
        .await
        .expect("stream");
    let state = stream.info().await.expect("info").state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            out.push(serde_json::from_slice(&msg.payload).unwrap_or(Value::Null));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_loses_it_to_another_and_its_late_result_is_refused() {
    let h = htm_with(|_| {}).await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let mut incidents = collect(&h.client, subjects::MESH_INCIDENT).await;
    let mut completed = collect(&h.client, "mesh.task.completed").await;
    let victim = start_worker(h.cfg.clone(), "victim").await;
    submit(&h.client, "survivor", 7, json!({"work_ms": 1_500})).await;
    wait_status(&h.client, "survivor", "running", Duration::from_secs(10)).await;
    let before = record(&h.js, "survivor")
        .await
        .assignment
        .expect("assigned");
    assert_eq!((before.worker_id.as_str(), before.fence), ("victim", 1));
    victim.crash().await;
    let _rescuer = start_worker(h.cfg.clone(), "rescuer").await;
    let st = wait_status(&h.client, "survivor", "completed", Duration::from_secs(20)).await;
    assert_eq!(st["result"]["handled_by"], "rescuer");
    assert_eq!(st["attempts"], 2);
    assert!(
        st["history"]
            .to_string()
            .contains("reassigned: victim was declared dead"),
        "{st}"
    );
    // The dead worker's late report, under its old fence, is refused.
    let late = json!({"task_id": "survivor", "worker_id": "victim", "fence": before.fence, "outcome": "completed",
                      "result": {"handled_by": "victim"}});
    let (reply, code) = request_json(&h.client, subjects::TASK_RESULT, late.to_string()).await;
    assert_eq!(
        (code.as_deref(), reply["error"]["code"].as_str()),
        (Some("409"), Some("stale_assignment"))
    );
    assert_eq!(
        status(&h.client, "survivor").await["result"]["handled_by"],
        "rescuer",
        "the late result changed nothing"
    );
    let done = drain_json(&mut completed).await;
    assert_eq!(
        done.iter()
            .filter(|e| e["payload"]["task_id"] == "survivor")
            .count(),
        1,
        "completed once"
    );
    let incident = drain_json(&mut incidents)
        .await
        .into_iter()
        .find(|i| i["payload"]["playbook"] == "htm_worker_recovery");
    let incident = incident.expect("worker recovery incident");
    assert_eq!(incident["payload"]["worker_id"], "victim");
    assert_eq!(incident["payload"]["in_flight"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_retried_then_dead_lettered_and_an_unknown_handler_is_not_retried() {
    let h = htm_with(|_| {}).await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let _w1 = start_worker(h.cfg.clone(), "w1").await;
    let _w2 = start_worker(h.cfg.clone(), "w2").await;
    submit(&h.client, "doomed", 5, json!({"fail": "disk on fire"})).await;
    let st = wait_status(&h.client, "doomed", "failed", Duration::from_secs(20)).await;
    assert_eq!(st["attempts"], 3, "max_attempts");
    assert!(
        st["error"]
            .as_str()
            .expect("error")
            .contains("disk on fire")
    );
    // An unknown intent type is tier 0: approve it, then no worker has a handler for it.
    let body = json!({"intent_id": "alien", "intent_type": "launch_rocket", "actor": "a"});
    request_json(&h.client, subjects::INTENT_SUBMIT, body.to_string()).await;
    let decide =
        json!({"intent_id": "alien", "decision": "approve", "reviewer": "ops", "reason": "try it"});
    request_json(&h.client, subjects::REVIEW_DECIDE, decide.to_string()).await;
    let st = wait_status(&h.client, "alien", "failed", Duration::from_secs(20)).await;
    assert_eq!(st["attempts"], 1, "not retried");
    assert!(
        st["error"]
            .as_str()
            .expect("error")
            .contains("no handler for intent_type \"launch_rocket\"")
    );
    // Both are in the dead-letter stream with their history.
    let mut dead =
        h.js.get_stream(streams::TASKS_DEAD_STREAM)
            .await
            .expect("dead stream");
    assert_eq!(dead.info().await.expect("info").state.messages, 2);
    let first: Value =
        serde_json::from_slice(&dead.get_raw_message(1).await.expect("msg").payload).expect("json");
    assert!(first["history"].as_array().expect("history").len() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_with_a_thousand_tasks_then_resumed_every_one_completes() {
    let h = htm_with(|c| c.worker.capacity = 16).await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let (paused, code) = request_json(&h.client, subjects::SCHEDULER_PAUSE, "{}").await;
    assert_eq!((code, paused["paused"].as_bool()), (None, Some(true)));
    let _w: Vec<RunningService> = start_workers(&h.cfg, "p", 3).await;
    let mut handles = Vec::new();
    for chunk in 0..10 {
        let client = h.client.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..100 {
                submit(
                    &client,
                    &format!("pause-{chunk}-{i}"),
                    (i % 10) as u8,
                    json!({}),
                )
                .await;
            }
        }));
    }
    for handle in handles {
        handle.await.expect("submitter");
    }
    let depth = eventually(
        Duration::from_secs(10),
        "queue depth 1000 while paused",
        || async {
            let r = readiness(&h.client).await;
            (r["queue_depth"] == 1000).then_some(r)
        },
    )
    .await;
    assert_eq!(
        (depth["in_flight"].as_u64(), depth["paused"].as_bool()),
        (Some(0), Some(true)),
        "nothing dispatched while paused"
    );
    request_json(&h.client, subjects::SCHEDULER_RESUME, "{}").await;
    for chunk in 0..10 {
        for i in 0..100 {
            wait_status(
                &h.client,
                &format!("pause-{chunk}-{i}"),
                "completed",
                Duration::from_secs(120),
            )
            .await;
        }
    }
    let (stats, _) = request_json(&h.client, "$SRV.STATS.scheduler", "").await;
    assert_eq!(stats["endpoints"][0]["data"]["completed"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_parks_only_eligible_tasks_and_replay_brings_them_back() {
    let h = htm_with(|_| {}).await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    request_json(&h.client, subjects::SCHEDULER_PAUSE, "{}").await;
    let mut ids = Vec::new();
    for (count, priority) in [(10, 2u8), (5, 4), (5, 7), (5, 9)] {
        for i in 0..count {
            let id = format!("shed-p{priority}-{i}");
            submit(&h.client, &id, priority, json!({})).await;
            ids.push((id, priority));
        }
    }
    // Refused: shedding priority 5 and up would touch high-priority work.
    let (bad, code) = request_json(
        &h.client,
        subjects::SCHEDULER_SHED,
        r#"{"below_priority": 8}"#,
    )
    .await;
    assert_eq!(
        (code.as_deref(), bad["error"]["code"].as_str()),
        (Some("400"), Some("invalid_shed"))
    );
    // Too young: nothing is older than an hour.
    let (none, _) = request_json(
        &h.client,
        subjects::SCHEDULER_SHED,
        r#"{"older_than_s": 3600}"#,
    )
    .await;
    assert_eq!(none["shed"], 0);
    let (shed, code) = request_json(
        &h.client,
        subjects::SCHEDULER_SHED,
        r#"{"older_than_s": 0, "max": 12}"#,
    )
    .await;
    assert_eq!(code, None, "{shed}");
    assert_eq!(shed["shed"], 12);
    let shed_ids: Vec<String> = shed["task_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_owned())
        .collect();
    for (id, priority) in &ids {
        let st = status(&h.client, id).await;
        let expect = if shed_ids.contains(id) {
            "shed"
        } else {
            "queued"
        };
        assert_eq!(st["status"], expect, "{id}");
        if *priority >= 5 {
            assert_eq!(st["status"], "queued", "priority {priority} is never shed");
        }
    }
    assert_eq!(
        shed_ids
            .iter()
            .filter(|id| id.starts_with("shed-p2-"))
            .count(),
        10,
        "lowest priority first"
    );
    let mut parked =
        h.js.get_stream(streams::TASKS_PARKED_STREAM)
            .await
            .expect("park");
    assert_eq!(
        parked.info().await.expect("info").state.messages,
        12,
        "parked, not deleted"
    );
    let (replayed, _) = request_json(&h.client, subjects::SCHEDULER_REPLAY, "{}").await;
    assert_eq!(replayed["replayed"], 12);
    assert_eq!(parked.info().await.expect("info").state.messages, 0);
    request_json(&h.client, subjects::SCHEDULER_RESUME, "{}").await;
    let _w = start_worker(h.cfg.clone(), "after").await;
    for (id, _) in &ids {
        wait_status(&h.client, id, "completed", Duration::from_secs(30)).await;
    }
    let narratives = stored_narratives(&h.js).await;
    let n = narratives
        .iter()
        .find(|n| n["what"] == "tasks_shed" && n["context"]["shed"] == 12)
        .expect("shed narrative");
    assert!(
        n["why"][0]
            .as_str()
            .expect("why")
            .contains("shed 12 task(s) of priority < 5")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_restarted_under_load_loses_and_duplicates_nothing() {
    // A worker is declared dead only after 5 s of silence: on two busy cores a 1 s timeout can
    // suspect a live worker, whose task then (correctly) runs again elsewhere; that is the
    // watchdog's trade-off, tested on its own, not what this test is about.
    let h = htm_with(|c| c.scheduler.heartbeat_timeout_s = 5.0).await;
    let mut completed = collect(&h.client, "mesh.task.completed").await;
    let sched = start_scheduler(h.cfg.clone()).await;
    let _w: Vec<RunningService> = start_workers(&h.cfg, "r", 3).await;
    let total = 300;
    let submitter = {
        let client = h.client.clone();
        tokio::spawn(async move {
            for i in 0..total {
                submit(
                    &client,
                    &format!("load-{i}"),
                    (i % 10) as u8,
                    json!({"work_ms": 20}),
                )
                .await;
            }
        })
    };
    eventually(Duration::from_secs(30), "some completions", || async {
        (status(&h.client, "load-40").await["status"] == "completed").then_some(())
    })
    .await;
    sched.crash().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _sched2 = start_scheduler(h.cfg.clone()).await;
    submitter.await.expect("submitter");
    for i in 0..total {
        wait_status(
            &h.client,
            &format!("load-{i}"),
            "completed",
            Duration::from_secs(90),
        )
        .await;
    }
    // The ledger, from durable state: every task completed, each exactly once in its history.
    for i in 0..total {
        let r = record(&h.js, &format!("load-{i}")).await;
        let completions = r
            .history
            .iter()
            .filter(|c| c.status == bulwark_common::intent::IntentStatus::Completed)
            .count();
        assert_eq!(completions, 1, "load-{i}: {:?}", r.history);
    }
    // And from the workers: 300 handler runs reported, none refused as stale (nothing ran twice).
    let (ran, stale) = worker_totals(&h.cfg).await;
    let mut moved = Vec::new();
    for i in 0..total {
        let r = record(&h.js, &format!("load-{i}")).await;
        if r.history
            .iter()
            .filter(|c| c.status == bulwark_common::intent::IntentStatus::Dispatched)
            .count()
            > 1
        {
            moved.push(r.history);
        }
    }
    assert_eq!(
        (ran, stale),
        (total as u64, 0),
        "handler runs completed and stale reports; moved: {moved:?}"
    );
    // Mesh events are published after the durable change: a crash may lose one, never double it.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for e in drain_json(&mut completed).await {
        *seen
            .entry(e["payload"]["task_id"].as_str().expect("id").to_owned())
            .or_default() += 1;
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "no task announced twice: {seen:?}"
    );
    // The queue ends empty: every message was acknowledged once its task finished.
    eventually(Duration::from_secs(30), "empty task queue", || async {
        let mut tasks = h.js.get_stream(streams::TASKS_STREAM).await.ok()?;
        (tasks.info().await.ok()?.state.messages == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_three_healthy_workers() {
    let h = htm_with(|_| {}).await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let mut workers: Vec<RunningService> = start_workers(&h.cfg, "ready-", 3).await;
    eventually(Duration::from_secs(10), "htm ready", || async {
        (readiness(&h.client).await["htm_ready"] == true).then_some(())
    })
    .await;
    workers.pop().expect("one").stop().await.expect("stops");
    let r = eventually(Duration::from_secs(10), "htm not ready", || async {
        let r = readiness(&h.client).await;
        (r["htm_ready"] == false).then_some(r)
    })
    .await;
    assert_eq!(r["healthy_workers"], 2);
    assert_eq!(r["reasons"][0], "2 healthy worker(s), at least 3 required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_reports_and_heartbeats_are_dead_lettered_and_the_scheduler_keeps_going() {
    let h = htm_with(|c| {
        c.scheduler.queue_warn = 3;
        c.scheduler.queue_critical = 5;
    })
    .await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let mut dead = collect(&h.client, subjects::MESH_DEADLETTER).await;
    let mut incidents = collect(&h.client, subjects::MESH_INCIDENT).await;
    let (reply, code) = request_json(&h.client, subjects::TASK_RESULT, "{not json").await;
    assert_eq!(
        (code.as_deref(), reply["error"]["code"].as_str()),
        (Some("400"), Some("invalid_report"))
    );
    let (reply, code) = request_json(
        &h.client,
        subjects::TASK_RESULT,
        r#"{"task_id": "x", "worker_id": "w", "fence": "one", "outcome": "completed"}"#,
    )
    .await;
    assert_eq!(code.as_deref(), Some("400"), "{reply}");
    h.client
        .publish(subjects::worker_heartbeat("w9"), "garbage".into())
        .await
        .expect("pub");
    h.client
        .publish(
            subjects::worker_heartbeat("w9"),
            json!({"worker_id": "other"}).to_string().into(),
        )
        .await
        .expect("pub");
    let letters = drain_json(&mut dead).await;
    assert_eq!(letters.len(), 4, "{letters:?}");
    assert!(letters.iter().any(|l| {
        l["payload"]["reason"]
            .as_str()
            .expect("reason")
            .contains("malformed heartbeat")
    }));
    assert!(
        letters
            .iter()
            .all(|l| !l["payload"]["reason"].as_str().expect("reason").is_empty())
    );
    // Still serving; and the queue guard raises one incident when the depth crosses critical.
    request_json(&h.client, subjects::SCHEDULER_PAUSE, "{}").await;
    for i in 0..7 {
        submit(&h.client, &format!("guard-{i}"), 3, json!({})).await;
    }
    let incident = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = incidents.next().await {
            let v: Value = serde_json::from_slice(&msg.payload).expect("JSON");
            if v["payload"]["playbook"] == "scheduler_load_shedding" {
                return v;
            }
        }
        panic!("incident subscription ended");
    })
    .await
    .expect("a load shedding incident within 10 s");
    assert_eq!(incident["payload"]["threshold"], 5);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again: Vec<Value> = drain_json(&mut incidents)
        .await
        .into_iter()
        .filter(|i| i["payload"]["playbook"] == "scheduler_load_shedding")
        .collect();
    assert!(
        again.len() <= 1,
        "one incident per crossing (the HTM guard may add its own), not one per check: {again:?}"
    );
    let (stats, _) = request_json(&h.client, "$SRV.STATS.scheduler", "").await;
    assert_eq!(stats["endpoints"][0]["data"]["malformed"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_written_in_python_completes_tasks() {
    let h = htm_with(|_| {}).await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let root = repo_root();
    let mut python = tokio::process::Command::new("python3")
        .arg(root.join("tests/clients/worker.py"))
        .arg(h.server.url())
        .arg("py-worker")
        .arg("5")
        .env("PYTHONPATH", root.join(".tools/py"))
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    for i in 0..5 {
        submit(&h.client, &format!("py-{i}"), 5, json!({"echo": i})).await;
    }
    for i in 0..5 {
        let st = wait_status(
            &h.client,
            &format!("py-{i}"),
            "completed",
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(st["result"]["handled_by"], "py-worker");
        assert_eq!(st["result"]["echo"], i);
        assert_eq!(st["worker_id"], "py-worker");
    }
    let exit = tokio::time::timeout(Duration::from_secs(20), python.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(exit.success(), "python worker exited with {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tasks_count_as_sla_breaches_in_htm_telemetry() {
    let h = htm_with(|c| c.scheduler.sla_ms = 100).await;
    let mut telemetry = collect(&h.client, "telemetry.htm_orchestrator").await;
    let _sched = start_scheduler(h.cfg.clone()).await;
    let _w = start_worker(h.cfg.clone(), "slow").await;
    submit(&h.client, "quick", 5, json!({})).await;
    submit(&h.client, "sluggish", 5, json!({"work_ms": 300})).await;
    wait_status(&h.client, "quick", "completed", Duration::from_secs(10)).await;
    wait_status(&h.client, "sluggish", "completed", Duration::from_secs(10)).await;
    let figures = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = telemetry.next().await {
            let v: Value = serde_json::from_slice(&msg.payload).expect("JSON");
            if v["sla_breaches"].as_u64() >= Some(1) {
                return v;
            }
        }
        panic!("telemetry ended");
    })
    .await
    .expect("telemetry counting the slow task's SLA breach");
    assert_eq!(figures["component"], "htm_orchestrator");
    assert_eq!(figures["active_workers"], 1);
    assert_eq!(
        figures["health_status"], "degraded",
        "1 worker of the 3 required"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_respawns_a_crashed_worker_but_a_hung_one_waits_for_a_respawn_request() {
    let htm = htm_with(|cfg| cfg.worker.respawn_delay_s = 0.2).await;
    let _scheduler = start_scheduler(htm.cfg.clone()).await;
    let _pool = start_pool(htm.cfg.clone(), &["p-1", "p-2", "p-3"]).await;
    let healthy = |n: u64| {
        let client = htm.client.clone();
        move || {
            let client = client.clone();
            async move { (readiness(&client).await["healthy_workers"] == n).then_some(()) }
        }
    };
    eventually(Duration::from_secs(20), "3 healthy workers", healthy(3)).await;

    // Bad requests are answered, not ignored.
    let (reply, code) = request_json(
        &htm.client,
        subjects::POOL_KILL,
        r#"{"worker_id": "p-1", "mode": "explode"}"#,
    )
    .await;
    assert_eq!(code.as_deref(), Some("400"), "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("explode"),
        "{reply}"
    );
    let (reply, code) = request_json(
        &htm.client,
        subjects::POOL_KILL,
        r#"{"worker_id": "nobody", "mode": "crash"}"#,
    )
    .await;
    assert_eq!(code.as_deref(), Some("404"), "{reply}");

    // A crash: the supervisor brings the worker back by itself.
    let (reply, code) = request_json(
        &htm.client,
        subjects::POOL_KILL,
        r#"{"worker_id": "p-1", "mode": "crash"}"#,
    )
    .await;
    assert_eq!(code, None, "{reply}");
    eventually(
        Duration::from_secs(20),
        "p-1 respawned by the supervisor",
        || {
            let client = htm.client.clone();
            async move {
                let (status, _) = request_json(&client, subjects::POOL_STATUS, "{}").await;
                let p1 = status["workers"]
                    .as_array()?
                    .iter()
                    .find(|w| w["worker_id"] == "p-1")?
                    .clone();
                (p1["state"] == "running" && p1["restarts"] == 1).then_some(())
            }
        },
    )
    .await;

    // A hang: the scheduler declares it dead, the pool leaves it dead.
    let (reply, code) = request_json(
        &htm.client,
        subjects::POOL_KILL,
        r#"{"worker_id": "p-2", "mode": "hang"}"#,
    )
    .await;
    assert_eq!(code, None, "{reply}");
    eventually(Duration::from_secs(20), "p-2 declared dead", healthy(2)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, _) = request_json(&htm.client, subjects::POOL_STATUS, "{}").await;
    assert_eq!(status["running"], 2, "{status}");
    assert_eq!(readiness(&htm.client).await["healthy_workers"], 2);

    // A respawn request brings every dead worker back.
    let (reply, code) = request_json(&htm.client, subjects::POOL_RESPAWN, "{}").await;
    assert_eq!(code, None, "{reply}");
    assert_eq!(reply["respawned"], json!(["p-2"]), "{reply}");
    eventually(
        Duration::from_secs(20),
        "3 healthy workers again",
        healthy(3),
    )
    .await;

    // And the pool's work really runs on them.
    submit(&htm.client, "pool-task", 5, json!({})).await;
    wait_status(
        &htm.client,
        "pool-task",
        "completed",
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_under_the_same_id_loses_its_old_tasks_to_a_reassignment_at_once() {
    // Redelivery would take two minutes: only the restart detection can finish in time.
    let htm = htm_with(|cfg| {
        cfg.worker.respawn_delay_s = 0.2;
        cfg.scheduler.ack_wait_s = 120.0;
        cfg.scheduler.heartbeat_timeout_s = 5.0;
    })
    .await;
    let _scheduler = start_scheduler(htm.cfg.clone()).await;
    let _pool = start_pool(htm.cfg.clone(), &["q-1", "q-2"]).await;
    eventually(Duration::from_secs(20), "2 healthy workers", || {
        let client = htm.client.clone();
        async move { (readiness(&client).await["healthy_workers"] == 2).then_some(()) }
    })
    .await;
    for i in 0..4 {
        submit(
            &htm.client,
            &format!("long-{i}"),
            5,
            json!({"work_ms": 3000}),
        )
        .await;
    }
    // Wait until q-1 holds at least one of them, then crash it.
    let held = eventually(Duration::from_secs(20), "q-1 runs a task", || {
        let client = htm.client.clone();
        async move {
            let mut held = Vec::new();
            for i in 0..4 {
                let id = format!("long-{i}");
                let s = status(&client, &id).await;
                if s["worker_id"] == "q-1" && s["status"] == "running" {
                    held.push(id);
                }
            }
            (!held.is_empty()).then_some(held)
        }
    })
    .await;
    let (reply, code) = request_json(
        &htm.client,
        subjects::POOL_KILL,
        r#"{"worker_id": "q-1", "mode": "crash"}"#,
    )
    .await;
    assert_eq!(code, None, "{reply}");
    for id in &held {
        let done = wait_status(&htm.client, id, "completed", Duration::from_secs(60)).await;
        let history = done["history"].to_string();
        assert!(history.contains("restarted and lost it"), "{id}: {done}");
    }
    for i in 0..4 {
        wait_status(
            &htm.client,
            &format!("long-{i}"),
            "completed",
            Duration::from_secs(60),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_died_while_no_scheduler_watched_is_declared_dead_by_the_next_one() {
    let h = htm_with(|c| {
        c.scheduler.ack_wait_s = 4.0;
        c.replicas.lease_ttl_s = 2.0;
    })
    .await;
    let sched = start_scheduler(h.cfg.clone()).await;
    let victim = start_worker(h.cfg.clone(), "victim").await;
    submit(&h.client, "orphan", 6, json!({"work_ms": 3_000})).await;
    wait_status(&h.client, "orphan", "running", Duration::from_secs(10)).await;
    // The registry knows the victim before anything dies.
    let registry =
        h.js.get_key_value(bulwark_scheduler::registry::WORKERS_BUCKET)
            .await
            .expect("worker registry bucket");
    eventually(Duration::from_secs(10), "victim registered", || async {
        registry.get("victim").await.ok().flatten().map(|_| ())
    })
    .await;
    // The scheduler and the worker die together: nobody sees the worker go.
    sched.crash().await;
    victim.crash().await;
    let _next = start_scheduler(h.cfg.clone()).await;
    let _rescuer = start_worker(h.cfg.clone(), "rescuer").await;

    let st = wait_status(&h.client, "orphan", "completed", Duration::from_secs(60)).await;
    assert_eq!(st["result"]["handled_by"], "rescuer");
    assert!(
        st["history"]
            .to_string()
            .contains("reassigned: victim was declared dead"),
        "{st}"
    );
    let narratives = stored_narratives(&h.js).await;
    let position = |what: &str, worker: &str| {
        narratives.iter().position(|n| {
            n["what"] == what
                && (n["context"]["worker_id"] == worker
                    || n["context"]["workers"]
                        .as_array()
                        .is_some_and(|w| w.iter().any(|x| x == worker)))
        })
    };
    let expected = position("workers_expected", "victim").expect("the takeover names the victim");
    let dead = position("worker_declared_dead", "victim").expect("the victim is declared dead");
    assert!(
        expected < dead,
        "expected from the registry, then declared dead"
    );
    assert_eq!(
        narratives[dead]["context"]["tasks"],
        json!([]),
        "declared dead from the registry, before its task came back from the queue"
    );
    // A dead worker is no longer expected, but its id stays bound to its NATS user.
    let departed: bulwark_scheduler::registry::Sighting = eventually(
        Duration::from_secs(10),
        "the victim marked departed",
        || async {
            let entry = registry.get("victim").await.ok().flatten()?;
            let sighting: bulwark_scheduler::registry::Sighting =
                serde_json::from_slice(&entry).ok()?;
            sighting.departed.then_some(sighting)
        },
    )
    .await;
    assert_eq!(departed.user.as_deref(), Some("worker"), "{departed:?}");
    let r = record(&h.js, "orphan").await;
    let completions = r
        .history
        .iter()
        .filter(|c| c.status == bulwark_common::intent::IntentStatus::Completed)
        .count();
    assert_eq!(completions, 1, "{:?}", r.history);
}
