//! Scale-out against real nats-servers: a three-node JetStream cluster losing a broker node while
//! intents flow, the scheduler leader dying under load (the standby takes over, the old leader's
//! late actions are refused), two clarity replicas writing one chain through a writer failover.
//!
//! The checker counts handler runs per intent in the test process itself (the workers run a
//! counting handler), so "executed twice" means the work really ran twice, not that a report
//! was recorded twice.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bulwark_common::BulwarkConfig;
use bulwark_common::htm::Assignment;
use bulwark_common::intent::{IntentRecord, IntentStatus, Task};
use bulwark_common::kv::Change;
use bulwark_common::lease::LeaseRecord;
use bulwark_common::{streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};

/// Long enough for anything these tests wait for on two shared cores; never a pass/fail figure.
const PATIENCE: Duration = Duration::from_secs(120);

/// Test timings that tolerate a broker failover: workers heartbeat often but are declared dead
/// only after 10 s (a reconnect is not a death), redelivery after 5 s, 2 s leases.
fn scale_config(mut cfg: BulwarkConfig) -> BulwarkConfig {
    cfg.worker.heartbeat_interval_s = 0.3;
    cfg.worker.report_retry_s = 60.0;
    cfg.scheduler.heartbeat_timeout_s = 10.0;
    cfg.scheduler.check_interval_s = 0.3;
    cfg.scheduler.ack_wait_s = 5.0;
    cfg.scheduler.dispatch_timeout_ms = 2_000;
    cfg.scheduler.min_workers = 1;
    cfg.replicas.lease_ttl_s = 2.0;
    cfg
}

/// Submits `id` until governance answers (the same id again after a lost reply: idempotent).
/// True when the submission was acknowledged with the task queued.
async fn submit_until_answered(client: &async_nats::Client, id: &str) -> bool {
    let body = json!({"intent_id": id, "intent_type": "query_knowledge", "actor": "tester",
                      "priority": 5, "payload": {}, "mission_context": {"learning_impact": true}})
    .to_string();
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(subjects::INTENT_SUBMIT, body.clone().into()),
        )
        .await;
        if let Ok(Ok(msg)) = reply {
            let code = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(bulwark_common::api::SERVICE_ERROR_CODE))
                .map(|v| v.to_string());
            if code.is_none() {
                let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
                assert_eq!(v["status"], "queued", "{v}");
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Submits `n` intents named `<prefix>-<i>` one after another; `on_progress(acknowledged)` runs
/// after each. Returns the acknowledged ids.
async fn submit_many(
    client: async_nats::Client,
    prefix: &str,
    n: usize,
    progress: tokio::sync::watch::Sender<usize>,
) -> Vec<String> {
    let mut acknowledged = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i:04}");
        if submit_until_answered(&client, &id).await {
            acknowledged.push(id);
        }
        let _ = progress.send(acknowledged.len());
    }
    acknowledged
}

async fn intents_bucket(client: &async_nats::Client) -> jetstream::kv::Store {
    jetstream::new(client.clone())
        .get_key_value(streams::INTENTS_BUCKET)
        .await
        .expect("intents bucket")
}

/// Waits until every id in `ids` is completed; reads tolerate a store that is electing.
async fn wait_completed(kv: &jetstream::kv::Store, ids: &[String]) {
    let deadline = Instant::now() + PATIENCE;
    let mut pending: HashSet<String> = ids.iter().cloned().collect();
    while !pending.is_empty() {
        if Instant::now() >= deadline {
            let mut states = Vec::new();
            for id in &pending {
                let state = match kv.get(id).await {
                    Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                    other => format!("{other:?}"),
                };
                states.push(format!("{id}: {state}"));
            }
            panic!("not completed after {PATIENCE:?}:\n{}", states.join("\n"));
        }
        let ids: Vec<String> = pending.iter().cloned().collect();
        for id in ids {
            if let Ok(Some(bytes)) = kv.get(&id).await
                && let Ok(r) = serde_json::from_slice::<IntentRecord>(&bytes)
                && r.status == IntentStatus::Completed
            {
                pending.remove(&id);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every acknowledged intent ran exactly once; nothing ran twice.
fn check_exactly_once(runs: &Runs, acknowledged: &[String]) {
    let runs = runs.snapshot();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !runs.contains_key(*id))
        .collect();
    let twice: BTreeMap<&String, &u32> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "acknowledged but never run: {lost:?}");
    assert!(twice.is_empty(), "run more than once: {twice:?}");
}

/// The narratives of `who` with `what`, read from the narrative stream.
async fn narratives(client: &async_nats::Client, who: &str, what: &str) -> Vec<Value> {
    let js = jetstream::new(client.clone());
    let Ok(stream) = js.get_stream(streams::NARRATIVES_STREAM).await else {
        return Vec::new();
    };
    let Ok(consumer) = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::narrative(who),
            ..Default::default()
        })
        .await
    else {
        return Vec::new();
    };
    let Ok(mut messages) = consumer.messages().await else {
        return Vec::new();
    };
    let mut found = Vec::new();
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload)
            && v["what"] == what
        {
            found.push(v);
        }
        if msg.info().map(|i| i.pending).unwrap_or(0) == 0 {
            break;
        }
    }
    found
}

async fn lease(client: &async_nats::Client, duty: &str) -> Option<LeaseRecord> {
    let kv = jetstream::new(client.clone())
        .get_key_value(streams::LEASES_BUCKET)
        .await
        .ok()?;
    let bytes = kv.get(duty).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_node_dies_while_intents_flow_and_no_acknowledged_intent_is_lost_or_run_twice() {
    init_logging();
    let mut cluster = NatsCluster::start(3).await;
    let cfg = scale_config(cluster.config());
    let runs = Runs::default();
    let _gov = start_governance(cfg.clone()).await;
    let _sched = start_scheduler(cfg.clone()).await;
    let _w1 = start_counting_worker(&cfg, "cw-1", &runs, 20).await;
    let _w2 = start_counting_worker(&cfg, "cw-2", &runs, 20).await;
    let client = cluster.client().await;
    let js = jetstream::new(client.clone());

    // Clustered: the queue and the intent records have three replicas.
    for name in [
        streams::TASKS_STREAM.to_owned(),
        format!("KV_{}", streams::INTENTS_BUCKET),
    ] {
        let info = js
            .get_stream(&name)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{name} is replicated");
    }

    // The node to kill: the one leading the intent records' stream (every decision writes it).
    let intents_info = js
        .get_stream(format!("KV_{}", streams::INTENTS_BUCKET))
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .clone();
    let leader = intents_info
        .cluster
        .and_then(|c| c.leader)
        .expect("a stream leader");
    let victim = leader
        .trim_start_matches('n')
        .parse::<usize>()
        .expect("node name n<i>")
        - 1;

    const N: usize = 90;
    let (progress, mut seen) = tokio::sync::watch::channel(0);
    let submitter = tokio::spawn(submit_many(client.clone(), "broker", N, progress));
    seen.wait_for(|n| *n >= N / 3).await.expect("progress");
    cluster.kill(victim);
    let acknowledged = submitter.await.expect("submitter");
    assert_eq!(
        acknowledged.len(),
        N,
        "every submission was eventually answered"
    );

    let kv = intents_bucket(&client).await;
    wait_completed(&kv, &acknowledged).await;
    check_exactly_once(&runs, &acknowledged);

    // The node comes back and catches up; nothing changes for the intents.
    cluster.restart(victim).await;
    for id in acknowledged.iter().step_by(15) {
        let bytes = kv.get(id).await.expect("read").expect("exists");
        let r: IntentRecord = serde_json::from_slice(&bytes).expect("record");
        assert_eq!(r.status, IntentStatus::Completed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_leader_dies_under_load_the_standby_takes_over_and_the_old_leader_is_fenced()
{
    init_logging();
    let server = NatsServer::start();
    let cfg = scale_config(server.config());
    let runs = Runs::default();
    let client = server.client().await;
    let _gov = start_governance(cfg.clone()).await;
    let first = start_scheduler(cfg.clone()).await;
    let old = eventually(PATIENCE, "the first scheduler leads", || async {
        lease(&client, "scheduler").await.filter(|l| !l.released)
    })
    .await;
    let _second = spawn_service("scheduler", cfg.clone(), bulwark_scheduler::run);
    eventually(PATIENCE, "the second scheduler registered", || async {
        let found =
            bulwark_common::micro::ping_all(&client, Some("scheduler"), Duration::from_millis(300))
                .await;
        (found.len() == 2).then_some(())
    })
    .await;
    let _w1 = start_counting_worker(&cfg, "lw-1", &runs, 20).await;
    let _w2 = start_counting_worker(&cfg, "lw-2", &runs, 20).await;

    const N: usize = 60;
    let (progress, mut seen) = tokio::sync::watch::channel(0);
    let submitter = tokio::spawn(submit_many(client.clone(), "leader", N, progress));
    seen.wait_for(|n| *n >= N / 3).await.expect("progress");
    let killed_at = Instant::now();
    first.crash().await;
    let acknowledged = submitter.await.expect("submitter");
    assert_eq!(acknowledged.len(), N);

    let new = eventually(PATIENCE, "the standby takes the lease", || async {
        lease(&client, "scheduler")
            .await
            .filter(|l| l.holder != old.holder)
    })
    .await;
    let kv = intents_bucket(&client).await;
    wait_completed(&kv, &acknowledged).await;
    check_exactly_once(&runs, &acknowledged);

    // The takeover: the next token, narrated with the reason (the old lease was not renewed).
    assert_eq!(new.token, old.token + 1, "{new:?} after {old:?}");
    let acquired = narratives(&client, "scheduler", "lease_acquired").await;
    let takeover = acquired
        .iter()
        .find(|n| n["context"]["token"] == new.token)
        .unwrap_or_else(|| panic!("takeover narrated: {acquired:?}"));
    assert_eq!(takeover["context"]["previous_holder"], old.holder.as_str());
    assert_eq!(takeover["context"]["previous_released"], false);
    let first_dispatch = narratives(&client, "scheduler", "task_dispatched")
        .await
        .into_iter()
        .find(|n| n["where"] == new.holder.as_str());
    assert!(first_dispatch.is_some(), "the new leader dispatched");
    eprintln!(
        "failover: standby took the lease {:.2} s after the leader was killed (lease ttl {} s)",
        killed_at.elapsed().as_secs_f64(),
        cfg.replicas.lease_ttl_s
    );

    // The old leader's late actions, as it would send them after waking from a pause, under
    // its old token: a record the new leader wrote refuses the write...
    let mut touched = None;
    for id in acknowledged.iter().rev() {
        let bytes = kv.get(id).await.expect("read").expect("exists");
        let r: IntentRecord = serde_json::from_slice(&bytes).expect("record");
        if r.leader_token == new.token {
            touched = Some(id.clone());
            break;
        }
    }
    let id = touched.expect("a record written by the new leader");
    let late = bulwark_scheduler::update_fenced(&kv, &id, old.token, |r: &mut IntentRecord| {
        r.transition(
            IntentStatus::Queued,
            None,
            Some("late action of the old leader".into()),
        );
        Ok::<_, ()>(Change::Write(()))
    })
    .await
    .expect("store answers");
    match late {
        Err(bulwark_scheduler::Fenced::Stale { record_token, .. }) => {
            assert_eq!(record_token, new.token)
        }
        other => panic!("the old leader's write was not refused: {other:?}"),
    }
    let r: IntentRecord =
        serde_json::from_slice(&kv.get(&id).await.expect("read").expect("exists")).expect("json");
    assert_eq!(r.status, IntentStatus::Completed, "the record is unchanged");

    // ...and a worker that took the new leader's assignments refuses the old leader's.
    let record: IntentRecord =
        serde_json::from_slice(&kv.get(&id).await.expect("read").expect("exists")).expect("json");
    let worker = record.assignment.expect("assigned").worker_id;
    let mut assignment = Assignment {
        task: Task::for_intent(
            &record.intent,
            record.decision.priority,
            bulwark_common::intent::Tier::AutonomousLowRisk,
        ),
        worker_id: worker.clone(),
        fence: 999,
        attempt: 1,
        leader_token: old.token,
    };
    assignment.task.task_id = format!("{id}-late");
    let (reply, code) = request_json(
        &client,
        &subjects::worker_task(&worker),
        serde_json::to_vec(&assignment).expect("json"),
    )
    .await;
    assert_eq!(code.as_deref(), Some("409"), "{reply}");
    assert_eq!(reply["error"]["code"], "stale_leader", "{reply}");
    assert!(
        !runs.snapshot().contains_key(&format!("{id}-late")),
        "nothing ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clarity_replicas_never_fork_the_chain_through_a_writer_and_a_broker_failover() {
    init_logging();
    let mut cluster = NatsCluster::start(3).await;
    let mut cfg = cluster.config();
    cfg.clarity.fetch_batch = 16;
    cfg.clarity.ack_wait_s = 2.0;
    cfg.clarity.duplicate_window_s = 60.0;
    let client = cluster.client().await;
    let first = start_clarity(cfg.clone()).await;
    let writer = eventually(PATIENCE, "a chain writer", || async {
        lease(&client, "clarity").await.filter(|l| !l.released)
    })
    .await;
    let _second = spawn_service("clarity", cfg.clone(), bulwark_clarity::run);
    let js = jetstream::new(client.clone());
    streams::narratives(&js).await.expect("narrative stream");

    const N: u64 = 240;
    let narrate = |n: u64| {
        let js = js.clone();
        async move {
            let body = json!({"who": "load", "what": "step", "when": bulwark_common::time::now(),
                              "where": "test", "why": ["cluster"], "how": "test",
                              "context": {"n": n}});
            loop {
                let sent = js
                    .send_publish(
                        subjects::narrative("load"),
                        jetstream::message::PublishMessage::build()
                            .payload(body.to_string().into())
                            .message_id(format!("load-{n}")),
                    )
                    .await;
                if let Ok(ack) = sent
                    && ack.await.is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for n in 1..=N / 3 {
        narrate(n).await;
    }
    // The writer dies mid-stream; then a broker node dies too.
    first.crash().await;
    for n in N / 3 + 1..=2 * N / 3 {
        narrate(n).await;
    }
    cluster.kill(2);
    for n in 2 * N / 3 + 1..=N {
        narrate(n).await;
    }

    let verify = || async {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subjects::CLARITY_VERIFY, "{}".into()),
        )
        .await
        .ok()?
        .ok()?;
        serde_json::from_slice::<Value>(&reply.payload).ok()
    };
    let report = eventually(PATIENCE, "every narrative in the chain", || async {
        let report = verify().await?;
        // The "load" narratives plus the lease narratives of the two replicas.
        (report["records"].as_u64()? >= N && report["ok"] == true).then_some(report)
    })
    .await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["first_bad_seq"], Value::Null, "{report}");

    // Every "load" narrative exactly once, in a chain with no gap.
    let audit = js
        .get_stream(streams::AUDIT_STREAM)
        .await
        .expect("audit stream");
    let consumer = audit
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("reader");
    let mut messages = consumer.messages().await.expect("messages");
    let mut loads = Vec::new();
    let mut seqs = Vec::new();
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_secs(5), messages.next()).await
    {
        let record: Value = serde_json::from_slice(&msg.payload).expect("record");
        seqs.push(record["seq"].as_u64().expect("seq"));
        if record["narrative"]["who"] == "load" {
            loads.push(record["narrative"]["context"]["n"].as_u64().expect("n"));
        }
        if msg.info().map(|i| i.pending).unwrap_or(0) == 0 {
            break;
        }
    }
    loads.sort_unstable();
    assert_eq!(
        loads,
        (1..=N).collect::<Vec<_>>(),
        "each narrative exactly once"
    );
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "one chain, no fork"
    );
    let now_writer = lease(&client, "clarity").await.expect("lease");
    assert!(now_writer.token > writer.token, "the writer changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_is_quarantined_its_traffic_shifts_and_it_is_respawned() {
    use bulwark_common::replica::{self, ReplicaEnd};
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.replicas.heartbeat_interval_s = 0.3;
    cfg.replicas.respawn_delay_s = 0.2;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    streams::narratives(&js).await.expect("narrative stream");
    let _watchdog = start_watchdog(cfg.clone()).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let supervisor = bulwark_common::Narrator::new(js.clone(), "supervisor", "test");
    for _ in 0..2 {
        let cfg = cfg.clone();
        let replicas = cfg.replicas.clone();
        let narrator = supervisor.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            replica::supervise("governance", &replicas, narrator, token, |r| {
                let cfg = cfg.clone();
                tokio::spawn(async move {
                    let (c, stats) = bulwark_common::connect::connect(
                        &cfg.nats,
                        "governance",
                        bulwark_common::connect::Role::Service,
                    )
                    .await
                    .map_err(|e| ReplicaEnd::Failed(e.to_string()))?;
                    let narrator = bulwark_common::Narrator::new(
                        jetstream::new(c.clone()),
                        "governance",
                        r.id(),
                    );
                    let service_client = c.clone();
                    replica::run_guarded(r, c, stats, narrator, |token| async {
                        bulwark_governance::run(cfg, service_client, token)
                            .await
                            .map_err(|e| ReplicaEnd::Failed(e.to_string()))
                    })
                    .await
                })
            })
            .await
        });
    }
    let replicas_of = |report: &Value| -> Vec<Value> {
        report["replicas"]["governance"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let report = |client: async_nats::Client| async move {
        request_json(&client, subjects::WATCHDOG_REPORT, "{}")
            .await
            .0
    };
    let serving = eventually(PATIENCE, "two governance replicas serving", || async {
        let rows = replicas_of(&report(client.clone()).await);
        let ids: Vec<String> = rows
            .iter()
            .filter(|r| r["status"] == "serving")
            .filter_map(|r| r["replica_id"].as_str().map(str::to_owned))
            .collect();
        (ids.len() == 2).then_some(ids)
    })
    .await;
    let victim = serving[0].clone();

    // Intents keep coming while the victim fails; every one is answered.
    let (progress, _) = tokio::sync::watch::channel(0);
    let submitter = tokio::spawn(submit_many(client.clone(), "sandbox", 60, progress));
    let (beat, _) = request_json(
        &client,
        &subjects::replica_fault(&victim),
        json!({"errors": 10, "reason": "test: a failing dependency"}).to_string(),
    )
    .await;
    assert_eq!(beat["status"], "quarantined", "{beat}");
    let acknowledged = submitter.await.expect("submitter");
    assert_eq!(
        acknowledged.len(),
        60,
        "the healthy replica took the traffic"
    );

    // Quarantine, respawn and return, each narrated.
    let quarantined = eventually(PATIENCE, "the quarantine narrated", || async {
        narratives(&client, "governance", "replica_quarantined")
            .await
            .into_iter()
            .find(|n| n["context"]["replica_id"] == victim.as_str())
    })
    .await;
    assert!(
        quarantined["why"][0]
            .as_str()
            .is_some_and(|w| w.contains("threshold 10")),
        "{quarantined}"
    );
    let respawned = eventually(PATIENCE, "the respawn narrated", || async {
        narratives(&client, "supervisor", "replica_respawned")
            .await
            .into_iter()
            .find(|n| n["context"]["replica_id"] == victim.as_str())
    })
    .await;
    assert!(
        respawned["why"][0]
            .as_str()
            .is_some_and(|w| w.contains("quarantined")),
        "{respawned}"
    );
    let returned = eventually(PATIENCE, "the return to service narrated", || async {
        narratives(&client, "supervisor", "replica_returned")
            .await
            .into_iter()
            .next()
    })
    .await;
    let newcomer = returned["context"]["replica_id"]
        .as_str()
        .expect("replica id")
        .to_owned();
    assert_ne!(newcomer, victim);

    // The report (and bulwark status) shows it: two serving, the victim quarantined.
    eventually(PATIENCE, "the report shows the replicas", || async {
        let rows = replicas_of(&report(client.clone()).await);
        let status_of = |id: &str| {
            rows.iter()
                .find(|r| r["replica_id"] == id)
                .map(|r| r["status"].clone())
        };
        let serving = rows.iter().filter(|r| r["status"] == "serving").count();
        (serving == 2
            && status_of(&newcomer) == Some(json!("serving"))
            && status_of(&victim) == Some(json!("quarantined")))
        .then_some(())
    })
    .await;
    shutdown.cancel();
}
