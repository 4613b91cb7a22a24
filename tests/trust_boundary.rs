//! The trust boundary, attacked by a foreign client (`tests/clients/attacks.py`, nats-py) holding
//! only the anonymous agent identity, against a real nats-server running the repository's
//! `nats.conf` (accounts BULWARK, AGENTS, PEOPLE, WORKERS; docs/security.md):
//! - a body claiming a safeguard's type is dead-lettered, and the safeguard's own subject refused;
//! - an event's source, depth, lineage and correlation come from where it arrived, and a
//!   replayed event is handled once;
//! - a reply aimed at a KV key, a stream subject or the JetStream API writes nothing (the import
//!   rewrites it; inside bulwark's account a service refuses it, counted and narrated);
//! - no identity reads another's inboxes or bulwark's deliveries;
//! - the storm guard's incidents cannot be silenced by pre-published `Nats-Msg-Id`s.
//!
//! Each test fails on the code before the trust boundary (one shared account, facts from the
//! body, answers to any reply subject, predictable ids).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::envelope::MeshEvent;
use bulwark_common::mesh::{Delivery, MeshConsumer};
use bulwark_common::narrative::Narrator;
use bulwark_common::{streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until every durable consumer of the mesh stream has handled everything stored.
async fn mesh_drained(js: &jetstream::Context) {
    eventually(PATIENCE, "every mesh consumer drained", || async {
        let mut stream = js.get_stream(streams::MESH_STREAM).await.ok()?;
        let names: Vec<String> = stream
            .consumer_names()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect();
        if names.is_empty() {
            return None;
        }
        for name in names {
            let mut consumer: jetstream::consumer::PullConsumer =
                stream.get_consumer(&name).await.ok()?;
            let info = consumer.info().await.ok()?;
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                return None;
            }
        }
        let _ = stream.info().await.ok()?;
        Some(())
    })
    .await;
}

/// Every stored `mesh.deadletter` event's payload.
async fn dead_letters(js: &jetstream::Context) -> Vec<Value> {
    stored(js, streams::MESH_STREAM, subjects::MESH_DEADLETTER)
        .await
        .into_iter()
        .map(|v| v["payload"].clone())
        .collect()
}

/// Every message of `stream` on `subject`, as JSON.
async fn stored(js: &jetstream::Context, stream: &str, subject: &str) -> Vec<Value> {
    let stream = js.get_stream(stream).await.expect("stream exists");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut out = Vec::new();
    let mut messages = consumer.messages().await.expect("messages");
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        out.push(serde_json::from_slice(&msg.payload).unwrap_or(Value::Null));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_safeguard_event_is_refused_and_starts_nothing() {
    init_logging();
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let cfg = server.config();
    let _policy = start_event_policy(cfg.clone()).await;
    let _playbooks = start_playbooks(cfg.clone()).await;

    let result = attack(&server, None, &["forge-safeguard"]).await;
    let errors = result["errors"].to_string().to_lowercase();
    assert!(
        errors.contains("permissions violation") && errors.contains("mesh.layer2.critical_alert"),
        "the real safeguard subject must be refused by the server: {result}"
    );

    mesh_drained(&js).await;
    let letters = dead_letters(&js).await;
    assert!(
        letters.iter().any(|l| l["reason"]
            .as_str()
            .is_some_and(|r| r.contains("disagrees with the subject"))
            && l["subject"] == "ingress.mesh.agent.custom.alert"),
        "the forged body must be dead-lettered naming the disagreement: {letters:?}"
    );
    let runs = js
        .get_key_value(streams::PLAYBOOK_RUNS_BUCKET)
        .await
        .expect("runs bucket");
    assert!(
        runs.get("scheduler_recovery")
            .await
            .expect("read")
            .is_none(),
        "no playbook may run on a forged alert"
    );
}

/// A mesh consumer of the test's own, recording what it was handed.
async fn recording_consumer(
    server: &NatsServer,
    token: &CancellationToken,
) -> (
    Arc<Mutex<Vec<(MeshEvent, Delivery)>>>,
    Arc<bulwark_common::mesh::ConsumerStats>,
) {
    let js = jetstream::new(server.client().await);
    let cfg = server.config();
    let narrator = Narrator::new(js.clone(), "checker", "checker@test");
    let consumer = MeshConsumer::start(js, &cfg.mesh, "checker", narrator, token)
        .await
        .expect("consumer starts");
    let stats = consumer.stats();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(consumer.run(token.clone(), move |event, delivery| {
        let record = record.clone();
        async move {
            record.lock().expect("lock").push((event, delivery));
            Ok(())
        }
    }));
    (seen, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_facts_come_from_where_it_arrived_and_a_replay_is_handled_once() {
    init_logging();
    let server = NatsServer::start();
    let token = CancellationToken::new();
    let (seen, stats) = recording_consumer(&server, &token).await;

    attack(
        &server,
        None,
        &["forge-facts", "agent.report", "evt-forged-1"],
    )
    .await;

    let event = eventually(PATIENCE, "the forged event handled", || async {
        let seen = seen.lock().expect("lock");
        seen.iter()
            .find(|(e, _)| e.event_id == "evt-forged-1")
            .map(|(e, _)| e.clone())
    })
    .await;
    assert_eq!(
        event.source, "agent",
        "the source is the publishing identity"
    );
    assert_eq!(event.event_type, "agent.report");
    assert_eq!(event.depth, 0, "an agent's event is a root");
    assert!(event.lineage.is_empty(), "no lineage from a body");
    assert_eq!(event.causation_id, None);
    assert_eq!(
        event.correlation_id, "agent:victim-flow",
        "a chosen correlation id is kept under the publisher's name"
    );
    eventually(PATIENCE, "the replay skipped", || async {
        (stats
            .replays_skipped
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1)
            .then_some(())
    })
    .await;
    let handled = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|(e, _)| e.event_id == "evt-forged-1")
        .count();
    assert_eq!(handled, 1, "a replayed event is handled once");
    token.cancel();
}

/// Messages of the task queue that are not tasks (a work queue: read by sequence, not consumed).
async fn junk_tasks(js: &jetstream::Context) -> usize {
    let mut stream = js
        .get_stream(streams::TASKS_STREAM)
        .await
        .expect("tasks stream");
    let info = stream.info().await.expect("info").state.clone();
    let mut junk = 0;
    for seq in info.first_sequence..=info.last_sequence {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            let value: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
            if value.get("task_id").is_none() {
                junk += 1;
            }
        }
    }
    junk
}

/// The state an aimed reply could have written: each value must stay as it was.
async fn aimed_state(js: &jetstream::Context) -> Value {
    let breaker = js
        .get_key_value(streams::BREAKER_BUCKET)
        .await
        .expect("bucket");
    let breaker = breaker
        .entry(streams::BREAKER_KEY)
        .await
        .expect("read")
        .map(|e| (e.revision, String::from_utf8_lossy(&e.value).into_owned()));
    let intents = js
        .get_key_value(streams::INTENTS_BUCKET)
        .await
        .expect("bucket");
    let victim = intents.get("aimed-victim").await.expect("read").is_some();
    let mut streams_seen = Vec::new();
    for name in [streams::MESH_STREAM, streams::TASKS_STREAM] {
        streams_seen.push(js.get_stream(name).await.is_ok());
    }
    let junk_tasks = junk_tasks(js).await;
    json!({"breaker": breaker.map(|(r, v)| json!([r, v])), "victim_record": victim,
           "streams_exist": streams_seen, "junk_tasks": junk_tasks})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aimed_replies_write_nothing_anywhere() {
    init_logging();
    let server = NatsServer::start();
    let service = server.client().await;
    let js = jetstream::new(service.clone());
    let cfg = server.config();
    let _governance = start_governance(cfg.clone()).await;
    let _guard = start_storm_guard(cfg.clone()).await;
    let _watchdog = start_watchdog(cfg.clone()).await;
    let _clarity = start_clarity(cfg.clone()).await;
    let before = aimed_state(&js).await;

    // From another account: the import rewrites every reply subject.
    let result = attack(&server, None, &["aim-replies"]).await;
    assert!(result["sent"].as_u64().unwrap_or(0) >= 28, "{result}");
    let after = aimed_state(&js).await;
    assert_eq!(
        before["breaker"], after["breaker"],
        "breaker entry untouched"
    );
    assert_eq!(
        after["victim_record"], false,
        "no intent record written by a reply"
    );
    assert_eq!(
        after["streams_exist"],
        json!([true, true]),
        "no stream deleted"
    );
    assert_eq!(after["junk_tasks"], 0, "no reply stored as a task");

    // Inside bulwark's account (a service's credentials): the service refuses to answer.
    let refused_before = narratives_named(&js, "aimed_reply_refused").await;
    attack(&server, Some(SERVICE_USER), &["aim-replies"]).await;
    let state = aimed_state(&js).await;
    assert_eq!(
        before["breaker"], state["breaker"],
        "breaker entry untouched"
    );
    assert_eq!(state["victim_record"], false);
    assert_eq!(state["streams_exist"], json!([true, true]));
    assert_eq!(state["junk_tasks"], 0);
    eventually(PATIENCE, "aimed replies narrated", || async {
        (narratives_named(&js, "aimed_reply_refused").await > refused_before).then_some(())
    })
    .await;
}

/// How many narratives named `what` are stored.
async fn narratives_named(js: &jetstream::Context, what: &str) -> usize {
    if js.get_stream(streams::NARRATIVES_STREAM).await.is_err() {
        return 0;
    }
    stored(js, streams::NARRATIVES_STREAM, subjects::NARRATIVE_ALL)
        .await
        .iter()
        .filter(|n| n["what"] == what)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_reads_another_identitys_replies_or_bulwarks_deliveries() {
    init_logging();
    let server = NatsServer::start();
    let cfg = server.config();
    let _governance = start_governance(cfg.clone()).await;
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _pool = start_pool(cfg.clone(), &["snoop-w1"]).await;
    let operator = server.client_as(OPERATOR_USER).await;

    // The snooper subscribes first and says "ready"; only then does the traffic start.
    let root = repo_root();
    let mut snooper = tokio::process::Command::new("python3")
        .arg(root.join("tests/clients/attacks.py"))
        .args(["snoop", &server.url(), "6"])
        .env("PYTHONPATH", root.join(".tools/py"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut lines = tokio::io::BufReader::new(snooper.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the snooper subscribes in time")
        .expect("stdout readable");
    assert_eq!(ready.as_deref(), Some("ready"));
    for i in 0..5 {
        let body = json!({"intent_id": format!("secret-{i}"), "intent_type": "query_knowledge",
                          "actor": "op", "payload": {"api_key": "sk-very-secret", "work_ms": 1}});
        let (reply, code) =
            request_json(&operator, subjects::INTENT_SUBMIT, body.to_string()).await;
        assert_eq!(code, None, "{reply}");
        request_json(
            &operator,
            subjects::INTENT_STATUS,
            json!({"intent_id": format!("secret-{i}")}).to_string(),
        )
        .await;
    }
    let last = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the snooper reports")
        .expect("stdout readable")
        .unwrap_or_default();
    let _ = snooper.wait().await;
    let result: Value = serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("snoop printed no JSON ({e}): {last}"));
    assert!(
        !result.to_string().contains("sk-very-secret") && !result.to_string().contains("secret-"),
        "an agent read another identity's traffic: {result}"
    );
    let errors = result["errors"].to_string().to_lowercase();
    for refused in ["_inbox_operator.>", "_inbox_worker.>", "$js.>", "$kv.>"] {
        assert!(
            errors.contains(refused),
            "subscribing {refused} must be refused: {result}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_published_incident_ids_do_not_silence_a_storm() {
    init_logging();
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let mut cfg = server.config();
    cfg.mesh.storm_threshold = 20;
    let _guard = start_storm_guard(cfg.clone()).await;

    let result = attack(&server, None, &["prepublish", "flood.x", "40"]).await;
    assert!(result["sent"].as_u64().unwrap_or(0) > 0, "{result}");

    let agent = server.client_as(AGENT_USER).await;
    let flood = async {
        for i in 0..400 {
            agent
                .publish(
                    "mesh.flood.x",
                    json!({"payload": {"n": i}}).to_string().into(),
                )
                .await
                .expect("enqueued");
            if i % 50 == 49 {
                agent.flush().await.expect("flushed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        agent.flush().await.expect("flushed");
    };
    flood.await;
    eventually(PATIENCE, "the storm's incident stored", || async {
        let incidents = stored(&js, streams::MESH_STREAM, subjects::MESH_INCIDENT).await;
        incidents
            .iter()
            .any(|i| i["payload"]["event_type"] == "flood.x")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_services_answer_on_may_publish_only_to_inboxes() {
    init_logging();
    let server = NatsServer::start();
    let cfg = server.config();
    let (tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let api = async_nats::ConnectOptions::with_user_and_password(
        cfg.nats.api_user.clone(),
        cfg.nats.api_password.clone(),
    )
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(err) = event {
                let _ = tx.send(err.to_string());
            }
        }
    })
    .connect(server.url())
    .await
    .expect("the serving user connects");
    for subject in [
        "$KV.bulwark_breaker.mesh",
        "htm.task.queue.5",
        "clarity.audit",
    ] {
        api.publish(subject, "junk".into()).await.expect("enqueued");
        api.flush().await.expect("flushed");
        let err = tokio::time::timeout(PATIENCE, errors.recv())
            .await
            .expect("the server refuses in time")
            .expect("channel open");
        assert!(
            err.to_lowercase().contains("permissions violation") && err.contains(subject),
            "{subject}: {err}"
        );
    }
    // Its answers to inboxes go through.
    let service = server.client().await;
    let mut inbox = service.subscribe("_INBOX.probe").await.expect("subscribed");
    service.flush().await.expect("flushed");
    // Sent again until it arrives: right after the refusals above, about one run in ten loses
    // the first answer (both connections stay connected and no error is reported; noted for a
    // later look). What is asserted is that answers to inboxes are not refused.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let got = loop {
        api.publish("_INBOX.probe", "answer".into())
            .await
            .expect("enqueued");
        api.flush().await.expect("flushed");
        match tokio::time::timeout(std::time::Duration::from_secs(1), inbox.next()).await {
            Ok(got) => break got.expect("subscription open"),
            Err(_) if tokio::time::Instant::now() < deadline => continue,
            Err(_) => panic!("no answer to an inbox within {PATIENCE:?}"),
        }
    };
    assert!(errors.try_recv().is_err(), "the answer was not refused");
    assert_eq!(&got.payload[..], b"answer");
}
