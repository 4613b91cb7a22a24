//! Abuse resistance, against a real nats-server running the repository's `nats.conf`, the abuse
//! performed by a foreign client (`tests/clients/attacks.py`, nats-py) as the anonymous agent:
//! - lists always answer: a review queue filled with large intents is paged and summarised, and
//!   one actor cannot open more review items than `governance.max_open_per_actor`;
//! - emergencies and priority must be earned: an agent's emergency goes to a human, its priority
//!   is capped, its simulated work bounded; the operator's emergency runs at once;
//! - one identity holds at most its share of the worker slots: an agent's long tasks cannot
//!   keep another identity's task waiting;
//! - with the shipped `bulwark.toml` (voters bound to their credentials), one operator cannot
//!   reach a quorum alone under several names.

use std::time::Duration;

use serde_json::{Value, json};

use bulwark_common::{subjects, time};
use bulwark_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_queue_of_large_intents_still_answers_page_by_page() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.governance.max_open_per_actor = 20;
    let _governance = start_governance(cfg).await;

    // 18 tier-0 intents of 63 KB: over 1 MB together, more than one reply can carry.
    let result = attack(&server, None, &["flood-reviews", "18", "63000"]).await;
    let answers = result["answers"].as_array().expect("answers");
    assert_eq!(answers.len(), 18);
    assert!(answers.iter().all(|a| a == "pending_review"), "{result}");

    let operator = server.client_as(OPERATOR_USER).await;
    let mut seen = Vec::new();
    let mut after = Value::Null;
    loop {
        let (page, code) = request_json(
            &operator,
            subjects::REVIEW_PENDING,
            json!({"limit": 5, "after": after}).to_string(),
        )
        .await;
        assert_eq!(code, None, "{page}");
        assert_eq!(page["total"], 18);
        for item in page["items"].as_array().expect("items") {
            assert_eq!(
                item["payload"]["summarised"], true,
                "large payloads are summarised"
            );
            seen.push(item["intent_id"].as_str().expect("id").to_owned());
        }
        match &page["next"] {
            Value::String(next) => after = json!(next),
            _ => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 18, "every item once across the pages");
    // The default page answers too (an empty body).
    let (first, code) = request_json(&operator, subjects::REVIEW_PENDING, "").await;
    assert_eq!(code, None);
    assert_eq!(first["items"].as_array().map(Vec::len), Some(18));

    // Two more fit under the cap of 20; the next is refused with the reason.
    let more = attack(&server, None, &["flood-reviews", "21", "10"]).await;
    let answers: Vec<&str> = more["answers"]
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| a.as_str().unwrap_or(""))
        .collect();
    // big-0..17 exist already (resubmissions), big-18 and big-19 open, big-20 is refused.
    assert_eq!(
        answers[..20]
            .iter()
            .filter(|a| **a == "pending_review")
            .count(),
        20
    );
    assert_eq!(answers[20], "too_many_open", "{more}");
    let (bad, code) = request_json(&operator, subjects::REVIEW_PENDING, r#"{"limit": 0}"#).await;
    assert_eq!(code.as_deref(), Some("400"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_emergency_goes_to_a_human_and_its_priority_and_work_are_bounded() {
    init_logging();
    let server = NatsServer::start();
    let _governance = start_governance(server.config()).await;

    let result = attack(&server, None, &["claims"]).await;
    let a = &result["answers"];
    assert_eq!(a["tier4"]["status"], "pending_review", "{result}");
    assert_eq!(a["emergency"]["status"], "pending_review", "{result}");
    assert_eq!(a["priority9"]["error"], "privilege_required", "{result}");
    assert_eq!(a["priority9"]["code"], "403", "{result}");
    assert_eq!(a["long_work"]["error"], "invalid_intent", "{result}");
    assert_eq!(a["long_work"]["code"], "400", "{result}");

    // The operator is a privileged identity: its emergency runs at once at the top priority.
    let operator = server.client_as(OPERATOR_USER).await;
    let (decision, code) = request_json(
        &operator,
        subjects::INTENT_SUBMIT,
        json!({"intent_type": "critical_incident", "actor": "ops", "payload": {}}).to_string(),
    )
    .await;
    assert_eq!(code, None, "{decision}");
    assert_eq!(decision["status"], "queued");
    assert_eq!(decision["priority"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_cannot_reach_a_quorum_alone_with_the_shipped_configuration() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = bulwark_common::BulwarkConfig::load(Some(&repo_root().join("bulwark.toml")))
        .expect("the shipped bulwark.toml loads");
    cfg.nats = server.config().nats;
    let _governance = start_governance(cfg).await;

    let agent = server.client_as(AGENT_USER).await;
    let (decision, code) = request_json(
        &agent,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "quorum-1", "intent_type": "self_improve", "actor": "bot",
               "mission_context": {"resilience_impact": true}})
        .to_string(),
    )
    .await;
    assert_eq!(
        (code, decision["status"].as_str()),
        (None, Some("pending_vote"))
    );

    let operator = Some(OPERATOR_USER);
    let result = attack(
        &server,
        operator,
        &["vote-as", "quorum-1", "guardian", "steward", "architect"],
    )
    .await;
    for name in ["guardian", "steward", "architect"] {
        assert_eq!(result["answers"][name], "identity_required", "{result}");
    }
    // The voters themselves, each with its own credentials, decide.
    for (user, password) in [("guardian", "guardian-dev"), ("steward", "steward-dev")] {
        let voter = server.client_as((user, password)).await;
        let (tally, code) = request_json(
            &voter,
            &subjects::as_identity(subjects::VOTE, user),
            json!({"proposal_id": "quorum-1", "vote": "approve"}).to_string(),
        )
        .await;
        assert_eq!(code, None, "{tally}");
    }
    let (status, _) = request_json(
        &agent,
        subjects::INTENT_STATUS,
        json!({"intent_id": "quorum-1"}).to_string(),
    )
    .await;
    assert_eq!(status["status"], "queued", "{status}");
}

/// When the intent `status` reply's history first shows `state`, in Unix ms.
fn first_at(status: &Value, state: &str) -> i64 {
    status["history"]
        .as_array()
        .and_then(|h| h.iter().find(|c| c["status"] == state))
        .and_then(|c| c["at"].as_str())
        .and_then(time::parse_ms)
        .unwrap_or_else(|| panic!("no {state} in {status}"))
}

async fn completed(client: &async_nats::Client, id: &str) -> Value {
    eventually(Duration::from_secs(90), &format!("{id} completed"), || {
        let client = client.clone();
        async move {
            let (s, _) = request_json(
                &client,
                subjects::INTENT_STATUS,
                json!({"intent_id": id}).to_string(),
            )
            .await;
            (s["status"] == "completed").then_some(s)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_holds_at_most_its_share_of_the_worker_slots() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.worker.capacity = 4;
    cfg.scheduler.max_share_per_identity = 0.5;
    let _governance = start_governance(cfg.clone()).await;
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _worker = start_worker(cfg.clone(), "w1").await;

    // The anonymous agent queues six tasks of 3 s: enough to hold all four slots for 3 s.
    let result = attack(&server, None, &["hog-slots", "6", "3000"]).await;
    for i in 0..6 {
        assert_eq!(result["answers"][format!("hog-{i}")], "queued", "{result}");
    }
    // Another identity's task, submitted after them.
    let operator = server.client_as(OPERATOR_USER).await;
    let (decision, code) = request_json(
        &operator,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "honest", "intent_type": "query_knowledge", "actor": "ops",
               "payload": {"work_ms": 10}})
        .to_string(),
    )
    .await;
    assert_eq!(code, None, "{decision}");

    let client = server.client().await;
    let honest = completed(&client, "honest").await;
    let mut hogs = Vec::new();
    for i in 0..6 {
        hogs.push(completed(&client, &format!("hog-{i}")).await);
    }
    // Nothing was lost, and at no time did the agent's tasks hold more than half the slots.
    let spans: Vec<(i64, i64)> = hogs
        .iter()
        .map(|s| (first_at(s, "dispatched"), first_at(s, "completed")))
        .collect();
    let most = spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        most <= 2,
        "the agent held {most} of 4 slots at once: {spans:?}"
    );
    // The other identity's task did not wait for the agent's tasks to finish.
    let first_hog_done = spans.iter().map(|(_, e)| *e).min().unwrap_or(0);
    assert!(
        first_at(&honest, "dispatched") < first_hog_done,
        "the honest task was dispatched only after a hog finished: {honest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_types_own_work_bound_is_obeyed() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    if let Some(t) = cfg.governance.intent_types.get_mut("query_knowledge") {
        t.max_work_ms = Some(1_000);
    }
    let _governance = start_governance(cfg).await;
    let client = server.client().await;
    let submit = |id: &str, work_ms: u64| {
        json!({"intent_id": id, "intent_type": "query_knowledge", "actor": "a",
               "payload": {"work_ms": work_ms}})
        .to_string()
    };
    let (refused, code) =
        request_json(&client, subjects::INTENT_SUBMIT, submit("long", 5_000)).await;
    assert_eq!(code.as_deref(), Some("400"), "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("governance.intent_types.query_knowledge.max_work_ms = 1000"),
        "{refused}"
    );
    let (ok, code) = request_json(&client, subjects::INTENT_SUBMIT, submit("short", 500)).await;
    assert_eq!(code, None, "{ok}");
    // Another type keeps the global bound (60 s).
    let (other, code) = request_json(
        &client,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "summary", "intent_type": "generate_summary", "actor": "a",
               "payload": {"work_ms": 5_000}})
        .to_string(),
    )
    .await;
    assert_eq!(code, None, "{other}");
}
