//! Per-identity budgets, against a real nats-server running the repository's `nats.conf`, the
//! flood performed by a foreign client (`tests/clients/mesh_flood.py`, nats-py) as the anonymous
//! agent: 600 events over 50 subjects in 3 s limit the agent alone (its events held, then each
//! handled once after the limit lifts) while the operator's and the services' events flow and the
//! global breaker stays closed; with budgets off (the behaviour before them) the same flood opens
//! the breaker for everyone.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::mesh::IdentityLimit;
use bulwark_common::{BulwarkConfig, streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(90);
const FLOOD: usize = 600;

/// Runs `tests/clients/mesh_flood.py` as the anonymous agent; its JSON line.
async fn flood(server: &NatsServer, count: usize, subjects: usize, seconds: f64) -> Value {
    let (url, count, subjects, seconds) = (
        server.url(),
        count.to_string(),
        subjects.to_string(),
        seconds.to_string(),
    );
    python_client("mesh_flood.py", &[&url, &count, &subjects, &seconds], &[]).await
}

/// The seed's breaker (500 events in 10 s, 60 s cooldown) and the seed-like budget (200 events
/// per identity in 10 s); a shorter limit cooldown keeps the test short.
fn config(server: &NatsServer, identity_budget: u64) -> BulwarkConfig {
    let mut cfg = server.config();
    cfg.mesh.breaker_threshold = 500;
    cfg.mesh.breaker_window_s = 10.0;
    cfg.mesh.cooldown_s = 60.0;
    cfg.mesh.storm_threshold = 100;
    cfg.mesh.identity_budget = identity_budget;
    cfg.mesh.identity_window_s = 10.0;
    cfg.mesh.identity_cooldown_s = 5.0;
    cfg.validate().expect("a valid configuration");
    cfg
}

async fn status(client: &async_nats::Client) -> Value {
    request_json(client, subjects::STORM_GUARD_STATUS, "{}")
        .await
        .0
}

async fn next_json(sub: &mut async_nats::Subscriber, what: &str) -> Value {
    let msg = tokio::time::timeout(PATIENCE, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"))
        .expect("subscription open");
    serde_json::from_slice(&msg.payload).expect("json")
}

async fn wait_for_checker(js: &jetstream::Context) {
    eventually(PATIENCE, "the checker consumer", || async {
        let stream = js.get_stream(streams::MESH_STREAM).await.ok()?;
        stream
            .get_consumer::<jetstream::consumer::pull::Config>("checker")
            .await
            .ok()
    })
    .await;
}

fn is_flood(event_type: &str) -> bool {
    event_type.starts_with("flood.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_limited_alone_and_its_events_are_handled_once_afterwards() {
    init_logging();
    let server = NatsServer::start();
    let cfg = config(&server, 200);
    let service = server.client().await;
    let js = jetstream::new(service.clone());
    let mut breaker_events = service.subscribe("mesh.breaker.>").await.expect("sub");
    let mut limited = service
        .subscribe("mesh.advisory.identity_limited")
        .await
        .expect("sub");
    let mut lifted = service
        .subscribe("mesh.advisory.identity_lifted")
        .await
        .expect("sub");
    let mut narratives = service
        .subscribe(subjects::narrative("storm_guard"))
        .await
        .expect("sub");
    let _guard = start_storm_guard(cfg.clone()).await;
    let token = CancellationToken::new();
    let (seen, checker_task) = mesh_checker(js.clone(), &cfg, &token, |e| e.source.clone());
    wait_for_checker(&js).await;

    let result = flood(&server, FLOOD, 50, 3.0).await;
    assert_eq!(result["errors"], json!([]), "{result}");

    // The agent is limited, announced once with its figures.
    let advisory = next_json(&mut limited, "identity limit advisory").await;
    assert_eq!(advisory["payload"]["identity"], "agent", "{advisory}");
    assert_eq!(advisory["payload"]["budget"], 200);
    assert!(advisory["payload"]["event_count"].as_u64().expect("count") > 200);
    assert_eq!(advisory["payload"]["stored"], true, "{advisory}");
    let record = js
        .get_key_value(streams::LIMITS_BUCKET)
        .await
        .expect("bucket")
        .get("identity=agent")
        .await
        .expect("read")
        .expect("the agent's limit is stored");
    let record: IdentityLimit = serde_json::from_slice(&record).expect("an identity limit");
    assert_eq!(record.identity, "agent");

    // While it is limited, the operator's events (a second identity) and the services' flow.
    let operator = server.client_as(OPERATOR_USER).await;
    for i in 0..5 {
        let body = json!({"event_type": "ops.check", "payload": {"n": i}});
        operator
            .publish("mesh.ops.check", body.to_string().into())
            .await
            .expect("publish");
    }
    operator.flush().await.expect("flush");
    for i in 0..5 {
        let body = json!({"event_type": "svc.check", "source": "scheduler", "payload": {"n": i}});
        js.publish("mesh.svc.check", body.to_string().into())
            .await
            .expect("sent")
            .await
            .expect("stored");
    }
    let handled_then = eventually(
        PATIENCE,
        "the operator's and the services' events",
        || async {
            let seen = seen.lock().expect("lock");
            let ops = seen
                .iter()
                .filter(|(s, t, _)| s == "operator" && t == "ops.check")
                .count();
            let svc = seen.iter().filter(|(_, t, _)| t == "svc.check").count();
            (ops == 5 && svc == 5).then(|| seen.clone())
        },
    )
    .await;
    let agent_then = handled_then.iter().filter(|(_, t, _)| is_flood(t)).count();
    assert!(
        agent_then < FLOOD,
        "the agent's events were held while the others flowed ({agent_then} handled)"
    );
    let now = status(&service).await;
    assert_eq!(now["breaker"]["state"], "closed", "{now}");

    // The limit lifts; every one of the agent's events is then handled, once.
    let advisory = next_json(&mut lifted, "identity lift advisory").await;
    assert_eq!(advisory["payload"]["identity"], "agent", "{advisory}");
    let done = eventually(PATIENCE, "every flood event handled", || async {
        let seen = seen.lock().expect("lock");
        (seen.iter().filter(|(_, t, _)| is_flood(t)).count() >= FLOOD).then(|| seen.clone())
    })
    .await;
    let mut per_seq: HashMap<u64, usize> = HashMap::new();
    for (source, event_type, delivery) in &done {
        if is_flood(event_type) {
            assert_eq!(source, "agent");
            *per_seq.entry(delivery.stream_seq).or_default() += 1;
        }
    }
    assert_eq!(per_seq.len(), FLOOD, "every event of the agent handled");
    assert!(per_seq.values().all(|n| *n == 1), "none handled twice");
    let last_agent = done.iter().rposition(|(_, t, _)| is_flood(t));
    let last_operator = done.iter().rposition(|(_, t, _)| t == "ops.check");
    assert!(
        last_operator < last_agent,
        "the operator's events were handled before the agent's held ones"
    );

    // The global breaker never moved; the counts say why.
    let end = status(&service).await;
    assert_eq!(end["breaker"]["state"], "closed", "{end}");
    assert_eq!(end["breaker"]["opened_count"], 0, "{end}");
    assert!(
        futures::FutureExt::now_or_never(breaker_events.next()).is_none(),
        "no breaker transition was announced"
    );
    let counters = &end["counters"];
    assert_eq!(counters["identity_limits"], 1, "{end}");
    assert_eq!(counters["identity_limits_lifted"], 1, "{end}");
    let identity_total = counters["identity_events"].as_u64().unwrap_or(0)
        + counters["identity_held"].as_u64().unwrap_or(0);
    assert_eq!(identity_total, FLOOD as u64 + 5, "{end}");
    assert!(counters["identity_held"].as_u64().unwrap_or(0) > 0, "{end}");
    assert!(
        counters["service_events"].as_u64().unwrap_or(0) >= 5,
        "{end}"
    );
    assert_eq!(end["identities"]["limited"], json!([]), "{end}");
    let gone = js
        .get_key_value(streams::LIMITS_BUCKET)
        .await
        .expect("bucket")
        .get("identity=agent")
        .await
        .expect("read");
    assert_eq!(gone, None, "the lifted limit's key is deleted");
    // Narrated: the limit and its lift.
    let mut whats = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), narratives.next()).await
    {
        let n: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        whats.push(n["what"].as_str().unwrap_or("").to_owned());
    }
    assert!(whats.iter().any(|w| w == "identity_limited"), "{whats:?}");
    assert!(
        whats.iter().any(|w| w == "identity_limit_lifted"),
        "{whats:?}"
    );
    token.cancel();
    let stats = checker_task.await.expect("checker ends");
    assert!(
        stats
            .identity_held
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_budgets_the_same_flood_opens_the_breaker_for_everyone() {
    // What happened before budgets: the agent's flood alone opens the global breaker.
    init_logging();
    let server = NatsServer::start();
    let cfg = config(&server, 0);
    let service = server.client().await;
    let _guard = start_storm_guard(cfg.clone()).await;
    let result = flood(&server, FLOOD, 50, 3.0).await;
    assert_eq!(result["errors"], json!([]), "{result}");
    let opened = eventually(PATIENCE, "the breaker opened", || {
        let service = service.clone();
        async move {
            let s = status(&service).await;
            (s["breaker"]["state"] == "open").then_some(s)
        }
    })
    .await;
    assert_eq!(opened["counters"]["identity_limits"], 0, "{opened}");
    assert_eq!(
        opened["counters"]["storms"], 0,
        "no storm: the flood is spread over 50 types"
    );
}
