//! The trigger mesh safeguards end to end, against a real nats-server running the repository's
//! `nats.conf`: a flood trips the storm detection and the breaker, held events are all processed
//! after it closes (none lost, none twice) while emergencies pass; cascades stop at the depth
//! limit, cycles at their second occurrence, wide trees at the fan-out cap; the breaker survives
//! a storm guard restart; partial events are normalised and malformed ones dead-lettered; a
//! broken rule file stops the engine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::mesh::BreakerState;
use bulwark_common::{BulwarkConfig, streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(60);

struct Stack {
    server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    policies: tempfile::TempDir,
}

async fn stack(rules: &str) -> Stack {
    init_logging();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let policies = tempfile::tempdir().expect("tmp");
    std::fs::write(policies.path().join("test.toml"), rules).expect("rules written");
    Stack {
        server,
        client,
        js,
        policies,
    }
}

impl Stack {
    fn config(&self) -> BulwarkConfig {
        let mut cfg = self.server.config();
        cfg.mesh.policies_dir = self.policies.path().to_owned();
        cfg.mesh.max_event_bytes = 4096;
        cfg
    }

    /// Publishes mesh events through JetStream, acknowledgements awaited in chunks.
    async fn publish_all(&self, events: &[(String, Value)]) {
        for chunk in events.chunks(500) {
            let mut acks = Vec::new();
            for (subject, body) in chunk {
                acks.push(
                    self.js
                        .publish(subject.clone(), body.to_string().into())
                        .await
                        .expect("sent"),
                );
            }
            for ack in acks {
                ack.await.expect("stored");
            }
        }
    }

    /// Every event stored in `BULWARK_MESH`, with its subject.
    async fn stored(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let Ok(mut stream) = self.js.get_stream(streams::MESH_STREAM).await else {
            return out;
        };
        let state = stream.info().await.expect("info").state.clone();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(msg) = stream.get_raw_message(seq).await {
                let body = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
                out.push((msg.subject.to_string(), body));
            }
        }
        out
    }

    /// Stored events of one correlation, by subject.
    async fn flow(&self, correlation_id: &str) -> Vec<(String, Value)> {
        self.stored()
            .await
            .into_iter()
            .filter(|(_, e)| e["correlation_id"] == correlation_id)
            .collect()
    }

    /// Stored cascade incidents about `correlation_id`.
    async fn cascade_incidents(&self, correlation_id: &str) -> Vec<Value> {
        self.stored()
            .await
            .into_iter()
            .filter(|(s, e)| {
                s == subjects::MESH_INCIDENT
                    && e["payload"]["playbook"] == "event_cascade_breaker"
                    && e["payload"]["correlation_id"] == correlation_id
            })
            .map(|(_, e)| e)
            .collect()
    }

    async fn stats(&self, service: &str) -> Value {
        let (reply, _) = request_json(&self.client, &format!("$SRV.STATS.{service}"), "").await;
        reply["endpoints"][0]["data"].clone()
    }
}

fn event(event_type: &str, source: &str, correlation_id: &str, payload: Value) -> (String, Value) {
    let id = bulwark_common::ids::new_id();
    (
        subjects::mesh(event_type),
        json!({"event_id": id, "event_type": event_type, "source": source,
               "correlation_id": correlation_id, "timestamp": bulwark_common::time::now(),
               "depth": 0, "payload": payload}),
    )
}

async fn next_json(sub: &mut async_nats::Subscriber, what: &str) -> (String, Value) {
    let msg = tokio::time::timeout(PATIENCE, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"))
        .expect("subscription open");
    (
        msg.subject.to_string(),
        serde_json::from_slice(&msg.payload).expect("json"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_trips_storm_and_breaker_and_every_held_event_is_processed_once() {
    let s = stack("").await;
    let mut cfg = s.config();
    cfg.mesh.storm_threshold = 200;
    cfg.mesh.breaker_threshold = 500;
    cfg.mesh.breaker_window_s = 2.0;
    cfg.mesh.cooldown_s = 2.0;
    cfg.mesh.half_open_s = 1.0;
    cfg.mesh.half_open_probe = 20;
    let mut breaker_events = s.client.subscribe("mesh.breaker.>").await.expect("sub");
    let mut incidents = s
        .client
        .subscribe(subjects::MESH_INCIDENT)
        .await
        .expect("sub");
    let mut advisories = s
        .client
        .subscribe(subjects::MESH_THROTTLE)
        .await
        .expect("sub");
    let _guard = start_storm_guard(cfg.clone()).await;
    let token = CancellationToken::new();
    let (seen, checker_task) = mesh_checker(s.js.clone(), &cfg, &token, |e| e.event_id.clone());
    // The checker's consumer exists before the flood (it then reads from the start).
    eventually(PATIENCE, "the checker consumer", || async {
        let stream = s.js.get_stream(streams::MESH_STREAM).await.ok()?;
        stream
            .get_consumer::<jetstream::consumer::pull::Config>("checker")
            .await
            .ok()
    })
    .await;

    let flood: Vec<(String, Value)> = (0..3000)
        .map(|i| {
            event(
                "load.flood",
                "flooder",
                &format!("flood-{i}"),
                json!({"n": i}),
            )
        })
        .collect();
    let published: HashSet<String> = flood
        .iter()
        .map(|(_, e)| e["event_id"].as_str().expect("id").to_owned())
        .collect();
    s.publish_all(&flood).await;

    let (subject, opened) = next_json(&mut breaker_events, "breaker transition").await;
    assert_eq!(subject, subjects::MESH_BREAKER_OPENED);
    assert_eq!(opened["payload"]["scope"], "mesh");
    assert_eq!(opened["payload"]["threshold"], 500);
    assert!(opened["payload"]["event_count"].as_u64().expect("count") > 500);
    let (_, storm) = next_json(&mut incidents, "storm incident").await;
    assert_eq!(storm["payload"]["playbook"], "trigger_storm_mitigation");
    assert_eq!(storm["payload"]["event_type"], "load.flood");
    assert!(storm["payload"]["rate_per_second"].as_f64().expect("rate") > 200.0);
    let (_, advisory) = next_json(&mut advisories, "throttle advisory").await;
    assert_eq!(advisory["payload"]["source"], "flooder");

    // While open: an emergency passes, nothing else is processed.
    let (subject, body) = event(
        "event.emergency",
        "operator",
        "emergency-1",
        json!({"severity": "critical"}),
    );
    let emergency_id = body["event_id"].as_str().expect("id").to_owned();
    s.publish_all(&[(subject, body)]).await;
    let (subject, next) = next_json(&mut breaker_events, "half-open").await;
    assert_eq!(subject, subjects::MESH_BREAKER_HALF_OPEN, "{next}");
    {
        let seen = seen.lock().expect("lock");
        let emergency = seen
            .iter()
            .find(|(id, _, _)| *id == emergency_id)
            .expect("the emergency was processed while the breaker was open");
        assert!(emergency.2.critical);
        assert_eq!(emergency.2.breaker, BreakerState::Open);
    }
    let (subject, closed) = next_json(&mut breaker_events, "closed").await;
    assert_eq!(subject, subjects::MESH_BREAKER_CLOSED, "{closed}");

    // Every flood event is processed after all, exactly once, and none while open.
    let done = eventually(PATIENCE, "every flood event processed", || async {
        let seen = seen.lock().expect("lock");
        let flood_seen = seen.iter().filter(|(_, t, _)| t == "load.flood").count();
        (flood_seen >= published.len()).then(|| seen.clone())
    })
    .await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (id, ty, delivery) in &done {
        if ty == "load.flood" {
            *counts.entry(id.as_str()).or_default() += 1;
            assert_ne!(
                delivery.breaker,
                BreakerState::Open,
                "a held event was processed while open"
            );
        }
    }
    let lost = published
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .count();
    let duplicates = counts.values().filter(|n| **n > 1).count();
    assert_eq!((lost, duplicates), (0, 0), "lost, processed twice");
    let processed_in_probe = done
        .iter()
        .filter(|(_, ty, d)| ty == "load.flood" && d.breaker == BreakerState::HalfOpen)
        .count();
    assert!(
        processed_in_probe <= 20,
        "the half-open probe is bounded: {processed_in_probe}"
    );
    token.cancel();
    let stats = checker_task.await.expect("checker ends");
    assert!(
        stats.deferred.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the stormed type was paced"
    );
    let guard_stats = s.stats("storm_guard").await;
    assert_eq!(guard_stats["storms"], 1, "{guard_stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_survives_a_storm_guard_restart() {
    let s = stack("").await;
    let mut cfg = s.config();
    cfg.mesh.cooldown_s = 300.0;
    let mut breaker_events = s.client.subscribe("mesh.breaker.>").await.expect("sub");
    let guard = start_storm_guard(cfg.clone()).await;
    let flood: Vec<_> = (0..600)
        .map(|i| event("load.burst", "agent", &format!("b-{i}"), json!({})))
        .collect();
    s.publish_all(&flood).await;
    let (subject, _) = next_json(&mut breaker_events, "opened").await;
    assert_eq!(subject, subjects::MESH_BREAKER_OPENED);
    guard.stop().await.expect("stops cleanly");
    let _guard = start_storm_guard(cfg).await;
    let (status, code) = request_json(&s.client, subjects::STORM_GUARD_STATUS, "{}").await;
    assert_eq!(code, None);
    assert_eq!(status["breaker"]["state"], "open", "{status}");
    assert!(status["breaker"]["event_count"].as_u64().expect("n") > 500);
    let bucket =
        s.js.get_key_value(streams::BREAKER_BUCKET)
            .await
            .expect("bucket");
    let stored: Value = serde_json::from_slice(
        &bucket
            .get(streams::BREAKER_KEY)
            .await
            .expect("get")
            .expect("entry"),
    )
    .expect("json");
    assert_eq!(stored["state"], "open");
}

const CASCADE_RULE: &str = r#"
[[rule]]
name = "self_trigger"
on = "mesh.cascade.>"
[rule.emit]
event_type = "cascade.l{depth}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_triggering_rule_stops_at_depth_ten_with_one_incident() {
    let s = stack(CASCADE_RULE).await;
    let _engine = start_event_policy(s.config()).await;
    let correlation = format!("cascade-{}", bulwark_common::ids::new_id());
    let roots: Vec<_> = (0..5)
        .map(|i| event("cascade.l0", "agent", &correlation, json!({"chain": i})))
        .collect();
    s.publish_all(&roots).await;
    eventually(PATIENCE, "five depth stops", || async {
        let stats = s.stats("event_policy_engine").await;
        (stats["depth_stops"] == 5).then_some(())
    })
    .await;
    let flow = s.flow(&correlation).await;
    let mut by_depth: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, e) in &flow {
        *by_depth
            .entry(e["depth"].as_u64().expect("depth"))
            .or_default() += 1;
    }
    let expected: BTreeMap<u64, usize> = (0..=10).map(|d| (d, 5)).collect();
    assert_eq!(
        by_depth, expected,
        "5 events per level, none beyond depth 10"
    );
    for (subject, e) in &flow {
        let depth = e["depth"].as_u64().expect("depth");
        assert_eq!(subject, &format!("mesh.cascade.l{depth}"));
        if depth > 0 {
            assert_eq!(e["source"], "event_policy_engine");
            assert!(e["causation_id"].is_string());
        }
    }
    let incidents = s.cascade_incidents(&correlation).await;
    assert_eq!(
        incidents.len(),
        1,
        "one incident per correlation: {incidents:?}"
    );
    assert_eq!(incidents[0]["payload"]["reason"], "depth_limit");
    assert_eq!(incidents[0]["payload"]["depth"], 11);
    // The incident is raised at the first chain's stop and counts what the cascade had produced
    // by then: that chain's ten, and whatever the four others had reached (all 50 on a quiet
    // machine, fewer when the chains interleave under load).
    let counted = incidents[0]["payload"]["cascade_events"]
        .as_u64()
        .expect("cascade_events");
    assert!((10..=50).contains(&counted), "{counted} cascade events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_rule_cycle_is_stopped_at_its_second_occurrence() {
    let rules = r#"
[[rule]]
name = "ping_to_pong"
on = "mesh.ping"
[rule.emit]
event_type = "pong"

[[rule]]
name = "pong_to_ping"
on = "mesh.pong"
[rule.emit]
event_type = "ping"
"#;
    let s = stack(rules).await;
    let _engine = start_event_policy(s.config()).await;
    let correlation = format!("cycle-{}", bulwark_common::ids::new_id());
    s.publish_all(&[event("ping", "agent", &correlation, json!({}))])
        .await;
    let incident = eventually(PATIENCE, "the cycle incident", || async {
        s.cascade_incidents(&correlation).await.into_iter().next()
    })
    .await;
    assert_eq!(incident["payload"]["reason"], "cycle");
    let flow: Vec<(String, String, u64)> = s
        .flow(&correlation)
        .await
        .into_iter()
        .map(|(subject, e)| {
            (
                subject,
                e["source"].as_str().unwrap_or("").to_owned(),
                e["depth"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        flow,
        vec![
            ("mesh.ping".to_owned(), "agent".to_owned(), 0),
            ("mesh.pong".to_owned(), "event_policy_engine".to_owned(), 1),
            ("mesh.ping".to_owned(), "event_policy_engine".to_owned(), 2),
        ],
        "the second (pong, event_policy_engine) is never produced"
    );
    assert_eq!(s.stats("event_policy_engine").await["cycle_stops"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_is_capped_per_correlation() {
    let rules = r#"
[[rule]]
name = "root_fans_out"
on = "mesh.fan.root"
[rule.emit]
event_type = "fan.a"
count = 10

[[rule]]
name = "a_fans_out"
on = "mesh.fan.a"
[rule.emit]
event_type = "fan.b"
count = 10
"#;
    let s = stack(rules).await;
    let mut cfg = s.config();
    cfg.mesh.fanout_limit = 30;
    let _engine = start_event_policy(cfg).await;
    let correlation = format!("fan-{}", bulwark_common::ids::new_id());
    s.publish_all(&[event("fan.root", "agent", &correlation, json!({}))])
        .await;
    eventually(PATIENCE, "every fan.a event handled", || async {
        let stats = s.stats("event_policy_engine").await;
        (stats["events"].as_u64()? >= 11 && stats["fanout_stops"].as_u64()? >= 1).then_some(())
    })
    .await;
    // Let the engine finish the remaining fan.a events (each is stopped at once).
    eventually(PATIENCE, "all 31 events of the flow handled", || async {
        let stats = s.stats("event_policy_engine").await;
        (stats["events"].as_u64()? >= 31).then_some(())
    })
    .await;
    let flow = s.flow(&correlation).await;
    assert_eq!(flow.len(), 31, "the root and 30 children, the cap");
    let incidents = s.cascade_incidents(&correlation).await;
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0]["payload"]["reason"], "fanout_limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_events_are_normalised_and_malformed_ones_dead_lettered() {
    let rules = r#"
[[rule]]
name = "partial_seen"
on = "mesh.partial.x"
[rule.emit]
event_type = "partial.seen"
"#;
    let s = stack(rules).await;
    let _engine = start_event_policy(s.config()).await;
    let mut dead = s
        .client
        .subscribe(subjects::MESH_DEADLETTER)
        .await
        .expect("sub");
    let agent = s.server.client_as(AGENT_USER).await;
    agent
        .publish("mesh.partial.x", r#"{"source":"me","payload":{}}"#.into())
        .await
        .expect("published");
    // An event over mesh.max_event_bytes is refused by the stream itself (its max_msg_size):
    // never stored, so never dead-lettered (tests/storage.rs).
    agent
        .publish("mesh.bad.size", vec![b' '; 5000].into())
        .await
        .expect("published");
    let malformed: [(&str, Vec<u8>, &str); 4] = [
        ("mesh.bad.json", b"{nope".to_vec(), "not valid JSON"),
        ("mesh.bad.array", b"[1]".to_vec(), "must be a JSON object"),
        (
            "mesh.bad.depth",
            br#"{"depth": -1}"#.to_vec(),
            "depth must be an integer from 0",
        ),
        (
            "mesh.bad.type",
            br#"{"source": 5}"#.to_vec(),
            "source must be a string",
        ),
    ];
    for (subject, body, _) in &malformed {
        agent
            .publish(*subject, body.clone().into())
            .await
            .expect("published");
    }
    agent.flush().await.expect("flush");
    let child = eventually(PATIENCE, "the child of the partial event", || async {
        s.stored()
            .await
            .into_iter()
            .find(|(subject, _)| subject == "mesh.partial.seen")
            .map(|(_, e)| e)
    })
    .await;
    let parent_id = child["causation_id"].as_str().expect("causation");
    assert_eq!(
        uuid::Uuid::parse_str(parent_id)
            .expect("uuid")
            .get_version_num(),
        7,
        "the partial event got a UUIDv7"
    );
    assert_eq!(
        child["correlation_id"], parent_id,
        "a root's correlation is its own id"
    );
    assert_eq!(child["depth"], 1, "the partial event was depth 0");
    // The source is the identity the event came from (the anonymous agent), not the body's claim.
    assert_eq!(child["lineage"], json!([["partial.x", "agent"]]));

    let mut reasons = BTreeMap::new();
    for _ in 0..malformed.len() {
        let (_, letter) = next_json(&mut dead, "dead letter").await;
        reasons.insert(
            // The agent's mesh.<type> arrived as ingress.mesh.agent.<type>.
            letter["payload"]["subject"]
                .as_str()
                .expect("subject")
                .replace("ingress.mesh.agent.", "mesh."),
            letter["payload"]["reason"]
                .as_str()
                .expect("reason")
                .to_owned(),
        );
    }
    for (subject, _, reason) in &malformed {
        assert!(
            reasons[*subject].contains(reason),
            "{subject}: {}",
            reasons[*subject]
        );
    }
    let stats = s.stats("event_policy_engine").await;
    assert_eq!(stats["consumer"]["dead_lettered"], 4, "{stats}");
    assert!(
        s.stored()
            .await
            .iter()
            .all(|(subject, _)| !subject.ends_with("bad.size")),
        "the oversize event was refused at the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_file_with_errors_stops_the_engine() {
    let s = stack("[[rule]]\nname = \"a\"\non = \"mesh.x\"\nwhen = [{ field = \"nowhere\", op = \"eq\", value = 1 }]\n[rule.emit]\nevent_type = \"y\"\n").await;
    let client = s.server.client().await;
    let result = bulwark_event_policy::run(s.config(), client, CancellationToken::new()).await;
    let err = result.expect_err("refuses to start").to_string();
    let file = Path::new(s.policies.path()).join("test.toml");
    assert!(err.contains(&format!("{}:1:", file.display())), "{err}");
    assert!(err.contains("field \"nowhere\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_named_by_a_throttle_advisory_slows_down_and_loses_nothing() {
    use bulwark_common::envelope::MeshEvent;
    use bulwark_common::mesh_publisher::MeshPublisher;
    let s = stack("").await;
    let mut cfg = s.config();
    cfg.mesh.storm_threshold = 50;
    cfg.mesh.breaker_threshold = 1_000_000;
    let _guard = start_storm_guard(cfg).await;
    let publisher = MeshPublisher::new(
        s.client.clone(),
        s.js.clone(),
        "flooder",
        Duration::from_secs(2),
    )
    .await
    .expect("publisher");
    let total = 300;
    for i in 0..total {
        let event = MeshEvent::root("test.spam", "flooder", json!({"n": i}));
        publisher.publish(&event).await.expect("stored");
    }
    let stats = publisher.stats();
    let advisories = stats.advisories.load(std::sync::atomic::Ordering::Relaxed);
    let delayed = stats.delayed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        advisories >= 1,
        "the storm guard's advisory named the flooder"
    );
    assert!(
        delayed >= 1,
        "the publisher held events back after the advisory ({delayed} delayed)"
    );
    // Nothing was dropped: every event is stored in the mesh stream.
    let mesh =
        s.js.get_stream(bulwark_common::streams::MESH_STREAM)
            .await
            .expect("mesh stream");
    let info = mesh
        .info_with_subjects("mesh.test.spam")
        .await
        .expect("info");
    let subjects: std::collections::HashMap<String, usize> = info
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    assert_eq!(subjects.get("mesh.test.spam").copied(), Some(total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_bookkeeping_does_not_open_the_breaker_but_the_same_count_of_foreign_events_does() {
    let s = stack("").await;
    let mut cfg = s.config();
    // The seed's figures: more than 500 events in 10 s open it.
    cfg.mesh.breaker_threshold = 500;
    cfg.mesh.breaker_window_s = 10.0;
    cfg.mesh.storm_threshold = 1_000_000;
    let _guard = start_storm_guard(cfg).await;
    let status = |client: async_nats::Client| async move {
        request_json(&client, subjects::STORM_GUARD_STATUS, "{}")
            .await
            .0
    };
    // What 350 tasks make: dispatched and completed, 700 events.
    for i in 0..350 {
        for kind in ["task.dispatched", "task.completed"] {
            let body =
                json!({"event_type": kind, "source": "scheduler", "payload": {"task_id": i}});
            s.client
                .publish(subjects::mesh(kind), body.to_string().into())
                .await
                .expect("publish");
        }
    }
    s.client.flush().await.expect("flush");
    let counted = eventually(PATIENCE, "the guard saw the 700 task events", || {
        let client = s.client.clone();
        async move {
            let v = status(client).await;
            (v["counters"]["own_events"].as_u64().unwrap_or(0) >= 700).then_some(v)
        }
    })
    .await;
    assert_eq!(counted["breaker"]["state"], "closed", "{counted}");
    // The same number of events of a foreign type opens it.
    for i in 0..700 {
        let body = json!({"event_type": "test.flood", "source": "flooder", "payload": {"n": i}});
        s.client
            .publish("mesh.test.flood", body.to_string().into())
            .await
            .expect("publish");
    }
    s.client.flush().await.expect("flush");
    eventually(PATIENCE, "the breaker opened", || {
        let client = s.client.clone();
        async move { (status(client).await["breaker"]["state"] == "open").then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_storm_guards_announce_once_and_the_standby_takes_over_from_a_crashed_leader() {
    let s = stack("").await;
    let mut cfg = s.config();
    cfg.replicas.lease_ttl_s = 1.0;
    cfg.mesh.storm_threshold = 1_000_000;
    cfg.mesh.breaker_threshold = 100;
    cfg.mesh.breaker_window_s = 2.0;
    cfg.mesh.cooldown_s = 1.0;
    cfg.mesh.half_open_s = 1.0;
    let leader = start_storm_guard(cfg.clone()).await;
    let _standby = start_storm_guard(cfg.clone()).await;
    let mut opened = s
        .client
        .subscribe(subjects::MESH_BREAKER_OPENED)
        .await
        .expect("subscribe");
    s.client.flush().await.expect("flush");
    let flood = |tag: &'static str| {
        let client = s.client.clone();
        async move {
            for i in 0..300 {
                let body = json!({"event_type": "test.flood", "source": tag, "payload": {"n": i}});
                client
                    .publish("mesh.test.flood", body.to_string().into())
                    .await
                    .expect("publish");
            }
            client.flush().await.expect("flush");
        }
    };
    flood("first").await;
    let first = next_json(&mut opened, "the breaker opened").await;
    // One announcement, however many replicas saw it.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), opened.next())
            .await
            .is_err(),
        "a second opening was announced: {first:?}"
    );
    let bucket =
        s.js.get_key_value(streams::BREAKER_BUCKET)
            .await
            .expect("bucket");
    let stored: bulwark_common::mesh::BreakerRecord = serde_json::from_slice(
        &bucket
            .get(streams::BREAKER_KEY)
            .await
            .expect("read")
            .expect("record"),
    )
    .expect("record");
    let first_token = stored.leader_token;
    assert!(first_token > 0, "written under the lease: {stored:?}");

    // The leader dies; once the breaker closed again, the next flood is announced by the other.
    leader.crash().await;
    eventually(PATIENCE, "the breaker closed again", || {
        let bucket = bucket.clone();
        async move {
            let r: bulwark_common::mesh::BreakerRecord =
                serde_json::from_slice(&bucket.get(streams::BREAKER_KEY).await.ok()??).ok()?;
            (r.state == BreakerState::Closed).then_some(())
        }
    })
    .await;
    flood("second").await;
    next_json(&mut opened, "the standby opened the breaker").await;
    let stored: bulwark_common::mesh::BreakerRecord = serde_json::from_slice(
        &bucket
            .get(streams::BREAKER_KEY)
            .await
            .expect("read")
            .expect("record"),
    )
    .expect("record");
    assert!(
        stored.leader_token > first_token,
        "the new leader writes under a newer token: {stored:?} (first {first_token})"
    );
}
