//! Bounded storage and visible durability, against a real nats-server running the repository's
//! `nats.conf`, the abuse performed by a foreign client (`tests/clients/storage_attacks.py`,
//! nats-py) as the anonymous agent:
//! - a megabyte event is refused at the server: never stored, never dead-lettered;
//! - the mesh stream at its limit drops its oldest events, and the watchdog alerts at 80%;
//! - a full task queue refuses intake with a 503 naming the limit (and the alert is raised);
//! - finished intent records expire after the retention while unfinished ones stay;
//! - the intake reply says which durability is in force.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use bulwark_common::config::{BulwarkConfig, Durability};
use bulwark_common::{mesh, streams, subjects};
use bulwark_tests::*;

/// Runs an attack of `tests/clients/storage_attacks.py` as the anonymous agent; its JSON line.
async fn attack(server: &NatsServer, args: &[&str]) -> Value {
    let url = server.url();
    let mut all = vec![args[0], url.as_str()];
    all.extend_from_slice(&args[1..]);
    python_client("storage_attacks.py", &all, &[]).await
}

/// A JetStream context of the services, with `cfg`'s limits in force in this process.
async fn services_js(server: &NatsServer, cfg: &BulwarkConfig) -> async_nats::jetstream::Context {
    streams::set_storage(&cfg.nats.storage);
    streams::context(server.client().await, Duration::from_secs(5))
}

/// Every stored payload of `stream`, oldest first.
async fn payloads(js: &async_nats::jetstream::Context, stream: &str) -> Vec<Value> {
    let mut s = js.get_stream(stream).await.expect("stream");
    let state = s.info().await.expect("info").state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(msg) = s.get_raw_message(seq).await {
            out.push(serde_json::from_slice(&msg.payload).unwrap_or(Value::Null));
        }
    }
    out
}

fn marker(event: &Value) -> &str {
    event["payload"]["marker"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_event_is_refused_at_the_server_and_never_dead_lettered() {
    init_logging();
    let server = NatsServer::start();
    let cfg = server.config();
    let js = services_js(&server, &cfg).await;
    mesh::mesh_stream(&js, &cfg.mesh)
        .await
        .expect("mesh stream");
    let _policy = start_event_policy(cfg.clone()).await;

    let result = attack(&server, &["big-event", "custom.big", "1000000"]).await;
    let reply = result["reply"].as_str().unwrap_or("");
    assert!(
        reply.contains("message size exceeds maximum"),
        "the publisher sees the server's refusal: {result}"
    );
    // The small event published after it is stored: the big one had its chance.
    let stored = eventually(Duration::from_secs(20), "the event after it", || {
        let js = js.clone();
        async move {
            let all = payloads(&js, streams::MESH_STREAM).await;
            all.iter().any(|e| marker(e) == "after").then_some(all)
        }
    })
    .await;
    assert!(
        stored.iter().all(|e| marker(e) != "big"),
        "no megabyte event is stored"
    );
    let info = js
        .get_stream(streams::MESH_STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(
        info.config.max_message_size as usize, cfg.mesh.max_event_bytes,
        "the mesh stream refuses what the consumers would refuse"
    );
    assert!(
        info.state.bytes < 1_000_000,
        "neither the event nor a dead letter of it holds the megabyte: {} bytes",
        info.state.bytes
    );
}

/// The `storage_conditions` of the watchdog's report naming `stream`.
async fn storage_alert(client: &async_nats::Client, stream: &str) -> Option<Value> {
    let (report, _) = request_json(client, subjects::WATCHDOG_REPORT, "{}").await;
    report["storage_conditions"]
        .as_array()?
        .iter()
        .find(|c| c["component"] == stream)
        .cloned()
}

fn watched(mut cfg: BulwarkConfig) -> BulwarkConfig {
    cfg.watchdog.check_interval_s = 0.5;
    cfg.watchdog.ping_timeout_ms = 200;
    cfg.watchdog.required_services.clear();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_stream_at_its_limit_drops_the_oldest_and_raises_the_alert() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = watched(server.config());
    cfg.nats.storage.mesh_max_bytes = 256 * 1024;
    let js = services_js(&server, &cfg).await;
    mesh::mesh_stream(&js, &cfg.mesh)
        .await
        .expect("mesh stream");
    let service = server.client().await;
    let mut alerts = service.subscribe("mesh.layer2.>").await.expect("sub");
    let _watchdog = start_watchdog(cfg.clone()).await;

    // 40 events of 16 KB: 640 KB into a stream of 256 KB.
    attack(&server, &["flood-events", "custom.flood", "40", "16000"]).await;
    let stored = eventually(Duration::from_secs(20), "the last event stored", || {
        let js = js.clone();
        async move {
            let all = payloads(&js, streams::MESH_STREAM).await;
            all.iter().any(|e| marker(e) == "last").then_some(all)
        }
    })
    .await;
    let info = js
        .get_stream(streams::MESH_STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .clone();
    assert!(info.state.bytes <= 256 * 1024, "{} bytes", info.state.bytes);
    assert!(
        stored.iter().all(|e| marker(e) != "n0"),
        "the oldest events were dropped (discard old)"
    );

    let alert = eventually(Duration::from_secs(20), "the storage alert", || {
        let service = service.clone();
        async move { storage_alert(&service, streams::MESH_STREAM).await }
    })
    .await;
    assert_eq!(alert["condition"], "storage_near_limit", "{alert}");
    let raised = next_alert(&mut alerts, "raised").await;
    assert_eq!(raised["component"], streams::MESH_STREAM, "{raised}");

    // Space freed: the alert recovers.
    js.get_stream(streams::MESH_STREAM)
        .await
        .expect("stream")
        .purge()
        .await
        .expect("purge");
    let recovered = next_alert(&mut alerts, "recovered").await;
    assert_eq!(recovered["condition"], "storage_near_limit", "{recovered}");
}

/// The next `storage_near_limit` alert in `state` on the mesh.
async fn next_alert(alerts: &mut async_nats::Subscriber, state: &str) -> Value {
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(msg) = alerts.next().await {
            let event: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
            let p = &event["payload"];
            if p["condition"] == "storage_near_limit" && p["state"] == state {
                return Some(p.clone());
            }
        }
        None
    })
    .await;
    found
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no {state} storage alert"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_task_queue_refuses_intake_with_a_503_naming_the_limit() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = watched(server.config());
    cfg.nats.storage.tasks_max_msgs = 3;
    let _governance = start_governance(cfg.clone()).await;
    let _watchdog = start_watchdog(cfg.clone()).await;

    let result = attack(&server, &["submit", "5", "fill"]).await;
    let answers = result["answers"].as_array().expect("answers");
    for queued in &answers[..3] {
        assert_eq!(queued["status"], "queued", "{queued}");
        assert_eq!(
            queued["durability"], "fast",
            "the reply says what the ack promises"
        );
    }
    for refused in &answers[3..] {
        assert_eq!(refused["error"]["code"], "storage_full", "{refused}");
        let message = refused["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains(streams::TASKS_STREAM) && message.contains("max_msgs"),
            "the refusal names the stream and the limit: {message}"
        );
    }
    let service = server.client().await;
    let alert = eventually(Duration::from_secs(20), "the task queue alert", || {
        let service = service.clone();
        async move { storage_alert(&service, streams::TASKS_STREAM).await }
    })
    .await;
    assert!(
        alert["reason"]
            .as_str()
            .unwrap_or("")
            .contains("3 messages of 3"),
        "{alert}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_says_synced_when_synced_durability_is_configured() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.nats.durability = Durability::Synced;
    let _governance = start_governance(cfg).await;
    let result = attack(&server, &["submit", "1", "synced"]).await;
    assert_eq!(result["answers"][0]["durability"], "synced", "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_intent_records_expire_after_the_retention_and_unfinished_ones_stay() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.nats.storage.finished_intent_retention_s = 1.0;
    cfg.nats.storage.sweep_interval_s = 0.2;
    let _governance = start_governance(cfg).await;
    let operator = server.client_as(OPERATOR_USER).await;

    // One queued (unfinished), two awaiting review: one rejected (finished), one left pending.
    attack(&server, &["submit", "1", "open"]).await;
    for id in ["to-reject", "to-keep"] {
        let body = json!({"intent_id": id, "intent_type": "change_charter", "actor": "operator", "payload": {}});
        let (reply, code) =
            request_json(&operator, subjects::INTENT_SUBMIT, body.to_string()).await;
        assert_eq!(code, None, "{reply}");
        assert_eq!(reply["status"], "pending_review", "{reply}");
    }
    // Reviewed by someone else (nobody reviews an intent they submitted).
    let reviewer = server.client_as(("architect", "architect-dev")).await;
    let body = json!({"intent_id": "to-reject", "decision": "reject", "reason": "no"});
    let (reply, code) = request_json(
        &reviewer,
        &subjects::as_identity(subjects::REVIEW_DECIDE, "architect"),
        body.to_string(),
    )
    .await;
    assert_eq!(code, None, "{reply}");

    let status = |id: &'static str| {
        let operator = operator.clone();
        async move {
            request_json(
                &operator,
                subjects::INTENT_STATUS,
                json!({"intent_id": id}).to_string(),
            )
            .await
        }
    };
    eventually(
        Duration::from_secs(20),
        "the rejected record expired",
        || async {
            let (_, code) = status("to-reject").await;
            (code.as_deref() == Some("404")).then_some(())
        },
    )
    .await;
    for (id, expected) in [("open-0", "queued"), ("to-keep", "pending_review")] {
        let (reply, code) = status(id).await;
        assert_eq!(code, None, "{id} is still there: {reply}");
        assert_eq!(reply["status"], expected, "{reply}");
    }
}
