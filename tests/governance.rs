//! Governance end to end, against a real nats-server running the repository's `nats.conf`:
//! tiers and routing, persistence, idempotency, human review, the unified logic vote, bad input,
//! restarts, subject permissions and a foreign (Python) client.

use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::{streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};

fn intent(kind: &str) -> Value {
    json!({"intent_type": kind, "actor": "grace_architect", "payload": {"feature": "x"},
           "mission_context": {"resilience_impact": true}})
}

async fn submit(client: &async_nats::Client, body: &Value) -> Value {
    let (reply, code) = request_json(client, subjects::INTENT_SUBMIT, body.to_string()).await;
    assert_eq!(code, None, "submit of {body} failed: {reply}");
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

async fn task_count(js: &jetstream::Context) -> u64 {
    let mut stream = js
        .get_stream(streams::TASKS_STREAM)
        .await
        .expect("tasks stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// Every message currently stored in `stream`, decoded as JSON, with its subject.
async fn stored(js: &jetstream::Context, stream: &str) -> Vec<(String, Value)> {
    let mut handle = js.get_stream(stream).await.expect("stream exists");
    let state = handle.info().await.expect("info").state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        if let Ok(msg) = handle.get_raw_message(seq).await {
            out.push((
                msg.subject.to_string(),
                serde_json::from_slice(&msg.payload).unwrap_or(Value::Null),
            ));
        }
    }
    out
}

async fn narratives_named(js: &jetstream::Context, what: &str) -> Vec<Value> {
    stored(js, streams::NARRATIVES_STREAM)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v["what"] == what)
        .collect()
}

async fn pending_reviews(client: &async_nats::Client) -> Vec<Value> {
    let (reply, code) = request_json(client, subjects::REVIEW_PENDING, "{}").await;
    assert_eq!(code, None, "{reply}");
    reply["items"].as_array().cloned().unwrap_or_default()
}

async fn decide(
    client: &async_nats::Client,
    id: &str,
    decision: &str,
    reviewer: &str,
) -> (Value, Option<String>) {
    let body = json!({"intent_id": id, "decision": decision, "reviewer": reviewer, "reason": "looked at it"});
    request_json(client, subjects::REVIEW_DECIDE, body.to_string()).await
}

async fn vote(
    client: &async_nats::Client,
    id: &str,
    voter: &str,
    choice: &str,
) -> (Value, Option<String>) {
    let body = json!({"proposal_id": id, "voter": voter, "vote": choice, "reason": "because"});
    request_json(client, subjects::VOTE, body.to_string()).await
}

struct Stack {
    server: NatsServer,
    gov: Option<RunningService>,
    client: async_nats::Client,
    js: jetstream::Context,
}

async fn stack_with(edit: impl FnOnce(&mut bulwark_common::BulwarkConfig)) -> Stack {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    edit(&mut cfg);
    let gov = start_governance(cfg).await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    Stack {
        server,
        gov: Some(gov),
        client,
        js,
    }
}

async fn stack() -> Stack {
    stack_with(|_| {}).await
}

#[tokio::test]
async fn every_seed_intent_type_gets_its_tier_route_and_status() {
    let s = stack().await;
    let mut proposals = s
        .client
        .subscribe("unified_logic.proposal.>")
        .await
        .expect("sub");
    let table = [
        ("query_knowledge", 2, "direct_execution", "queued", true),
        ("generate_summary", 2, "direct_execution", "queued", true),
        ("schedule_task", 2, "direct_execution", "queued", true),
        ("execute_sandbox", 1, "execute_with_review", "queued", true),
        ("deploy_model", 1, "execute_with_review", "queued", true),
        ("modify_config", 1, "execute_with_review", "queued", true),
        (
            "self_improve",
            3,
            "unified_logic_hub",
            "pending_vote",
            false,
        ),
        (
            "extend_grace",
            3,
            "unified_logic_hub",
            "pending_vote",
            false,
        ),
        (
            "optimize_system",
            3,
            "unified_logic_hub",
            "pending_vote",
            false,
        ),
        (
            "modify_governance",
            0,
            "human_review_queue",
            "pending_review",
            false,
        ),
        (
            "change_charter",
            0,
            "human_review_queue",
            "pending_review",
            false,
        ),
        (
            "grant_permissions",
            0,
            "human_review_queue",
            "pending_review",
            false,
        ),
        ("emergency_recovery", 4, "emergency_handler", "queued", true),
        ("critical_incident", 4, "emergency_handler", "queued", true),
    ];
    let mut ids = Vec::new();
    for (kind, tier, routed_to, st, approved) in table {
        let reply = submit(&s.client, &intent(kind)).await;
        assert_eq!(reply["autonomy_tier"], tier, "{kind}: {reply}");
        assert_eq!(reply["routed_to"], routed_to, "{kind}");
        assert_eq!(reply["status"], st, "{kind}");
        assert_eq!(reply["approved"], approved, "{kind}");
        assert_eq!(reply["requires_vote"], tier == 3, "{kind}");
        assert!(
            reply["tier_name"]
                .as_str()
                .expect("tier_name")
                .starts_with(&format!("TIER_{tier}_"))
        );
        assert!(reply["reasoning"].as_array().expect("reasoning").len() >= 2);
        assert!(
            reply["intent_id"].as_str().expect("id").len() >= 32,
            "a UUIDv7 was assigned"
        );
        let id = reply["intent_id"].as_str().expect("id").to_owned();
        let st_reply = status(&s.client, &id).await;
        assert_eq!(st_reply["status"], st, "{kind}: status endpoint agrees");
        assert_eq!(st_reply["history"][0]["status"], st);
        ids.push((kind, tier, id));
    }
    // Tiers 1, 2 and 4 are in the task queue; tier 4 at priority 9.
    let tasks = stored(&s.js, streams::TASKS_STREAM).await;
    assert_eq!(tasks.len(), 8, "3 tier-2 + 3 tier-1 + 2 tier-4 tasks");
    for (subject, task) in &tasks {
        let id = task["intent_id"].as_str().expect("task intent id");
        let (kind, tier, _) = ids
            .iter()
            .find(|(_, _, i)| i == id)
            .expect("task belongs to a submitted intent");
        let expected_priority = if *tier == 4 { 9 } else { 5 };
        assert_eq!(subject, &subjects::task_queue(expected_priority), "{kind}");
        assert_eq!(task["intent_type"], *kind);
    }
    // Tier 0 waits for a human; tier 1 and 4 left review records that need no decision.
    let items = pending_reviews(&s.client).await;
    let kinds: Vec<(&str, bool)> = items
        .iter()
        .map(|i| {
            (
                i["kind"].as_str().expect("kind"),
                i["requires_decision"].as_bool().expect("bool"),
            )
        })
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == ("approval", true)).count(),
        3
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == ("post_execution", false))
            .count(),
        3
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == ("post_hoc", false)).count(),
        2
    );
    // Tier 3 proposals were announced.
    for _ in 0..3 {
        let msg = tokio::time::timeout(Duration::from_secs(5), proposals.next())
            .await
            .expect("announced")
            .expect("msg");
        let p: Value = serde_json::from_slice(&msg.payload).expect("json");
        assert_eq!(p["state"], "open");
        assert_eq!(p["quorum"], 2);
    }
    // Every decision was narrated with its reasoning.
    let routed = narratives_named(&s.js, "intent_routed").await;
    assert_eq!(routed.len(), 14);
    assert!(
        routed
            .iter()
            .all(|n| n["who"] == "governance" && !n["why"].as_array().expect("why").is_empty())
    );
}

#[tokio::test]
async fn unknown_type_and_low_alignment_go_to_a_human() {
    let s = stack().await;
    let reply = submit(
        &s.client,
        &json!({"intent_type": "launch_rocket", "actor": "a"}),
    )
    .await;
    assert_eq!(
        (reply["autonomy_tier"].as_u64(), reply["status"].as_str()),
        (Some(0), Some("pending_review"))
    );
    assert!(
        reply["reasoning"][0]
            .as_str()
            .expect("line")
            .contains("Unknown intent type")
    );
    // modify_config with no stated pillar: 0.4 × 0.5 = 0.20 < min_alignment 0.25.
    let reply = submit(
        &s.client,
        &json!({"intent_type": "modify_config", "actor": "a"}),
    )
    .await;
    assert_eq!(reply["mission_alignment"], 0.2);
    assert_eq!(reply["status"], "pending_review");
    assert_eq!(reply["approved"], false);
    assert_eq!(reply["routed_to"], "human_review_queue");
    assert!(
        reply["reasoning"]
            .to_string()
            .contains("below min_alignment")
    );
    assert_eq!(task_count(&s.js).await, 0, "nothing escalated was queued");
    let items = pending_reviews(&s.client).await;
    assert!(items.iter().any(|i| i["kind"] == "low_alignment"));
    assert!(items.iter().any(|i| i["kind"] == "approval"));
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_a_counter_and_a_narrative() {
    let s = stack().await;
    let big = json!({"intent_type": "query_knowledge", "actor": "a", "payload": {"blob": "x".repeat(70_000)}}).to_string();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not valid JSON"),
        (b"[1,2,3]".to_vec(), "must be a JSON object, got an array"),
        (b"\"text\"".to_vec(), "must be a JSON object, got a string"),
        (br#"{"actor": "a"}"#.to_vec(), "intent_type is required"),
        (br#"{"intent_type": "", "actor": "a"}"#.to_vec(), "intent_type must not be empty"),
        (br#"{"intent_type": "query_knowledge"}"#.to_vec(), "actor is required"),
        (br#"{"intent_type": "query_knowledge", "actor": ""}"#.to_vec(), "actor must not be empty"),
        (br#"{"intent_type": 42, "actor": "a"}"#.to_vec(), "intent_type must be a string"),
        (br#"{"intent_type": "query_knowledge", "actor": ["a"]}"#.to_vec(), "actor must be a string"),
        (br#"{"intent_type": "query_knowledge", "actor": "a", "priority": 10}"#.to_vec(), "priority must be an integer from 0 to 9"),
        (br#"{"intent_type": "query_knowledge", "actor": "a", "priority": "urgent"}"#.to_vec(), "priority must be an integer"),
        (br#"{"intent_type": "query_knowledge", "actor": "a", "payload": 5}"#.to_vec(), "payload must be a JSON object"),
        (br#"{"intent_type": "query_knowledge", "actor": "a", "mission_context": {"emergency": "yes"}}"#.to_vec(), "mission_context.emergency must be a boolean"),
        (big.into_bytes(), "over the limit of 65536 bytes"),
    ];
    let n = cases.len();
    for (body, expected) in cases {
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            s.client
                .request(subjects::INTENT_SUBMIT, body.clone().into()),
        )
        .await
        .expect("answered, not silence")
        .expect("reply");
        let headers = reply.headers.as_ref().expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
            Some("400")
        );
        let message = headers
            .get("Nats-Service-Error")
            .expect("error message header")
            .to_string();
        assert!(
            message.contains(expected),
            "header {message:?} should contain {expected:?}"
        );
        let v: Value = serde_json::from_slice(&reply.payload).expect("JSON error body");
        assert_eq!(v["error"]["code"], "invalid_intent");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("message")
                .contains(expected)
        );
    }
    // The service kept serving.
    let ok = submit(&s.client, &intent("query_knowledge")).await;
    assert_eq!(ok["status"], "queued");
    // Counted (visible through NATS micro stats) and narrated.
    let (stats, _) = request_json(&s.client, "$SRV.STATS.governance", "").await;
    let data = &stats["endpoints"][0]["data"];
    assert_eq!(data["invalid_intents"], n as u64, "{stats}");
    let refused = eventually(Duration::from_secs(5), "refusal narratives", || async {
        let found = narratives_named(&s.js, "intent_refused").await;
        (found.len() == n).then_some(found)
    })
    .await;
    assert!(refused.iter().any(|r| {
        r["why"][0]
            .as_str()
            .expect("why")
            .contains("priority must be")
    }));
    assert_eq!(
        task_count(&s.js).await,
        1,
        "only the valid intent was queued"
    );
}

#[tokio::test]
async fn a_resubmitted_intent_id_returns_the_first_decision_and_queues_once() {
    let s = stack().await;
    let body = json!({"intent_id": "job-42", "intent_type": "query_knowledge", "actor": "a", "payload": {"q": 1}});
    let first = submit(&s.client, &body).await;
    let mut handles = Vec::new();
    for _ in 0..20 {
        let client = s.client.clone();
        let body = body.clone();
        handles.push(tokio::spawn(async move { submit(&client, &body).await }));
    }
    for h in handles {
        let again = h.await.expect("task");
        assert_eq!(again, first, "the first decision, byte for byte");
    }
    // Even a resubmission with a different type returns the first decision.
    let changed = submit(
        &s.client,
        &json!({"intent_id": "job-42", "intent_type": "change_charter", "actor": "b"}),
    )
    .await;
    assert_eq!(changed, first);
    assert_eq!(
        task_count(&s.js).await,
        1,
        "one task, however often it was submitted"
    );
    let (stats, _) = request_json(&s.client, "$SRV.STATS.governance", "").await;
    assert_eq!(stats["endpoints"][0]["data"]["duplicates"], 21);
}

#[tokio::test]
async fn concurrent_distinct_intents_are_all_persisted() {
    let s = stack().await;
    let mut handles = Vec::new();
    for i in 0..200 {
        let client = s.client.clone();
        handles.push(tokio::spawn(async move {
            submit(&client, &json!({"intent_id": format!("bulk-{i}"), "intent_type": "generate_summary", "actor": "a",
                                    "priority": i % 10})).await
        }));
    }
    for h in handles {
        assert_eq!(h.await.expect("task")["status"], "queued");
    }
    assert_eq!(task_count(&s.js).await, 200);
    let tasks = stored(&s.js, streams::TASKS_STREAM).await;
    for (subject, task) in tasks {
        assert_eq!(
            subject,
            subjects::task_queue(task["priority"].as_u64().expect("prio") as u8)
        );
    }
}

#[tokio::test]
async fn human_review_approves_or_rejects_and_records_the_reviewer() {
    let s = stack().await;
    let a = submit(
        &s.client,
        &json!({"intent_id": "gov-a", "intent_type": "modify_governance", "actor": "x"}),
    )
    .await;
    let b = submit(
        &s.client,
        &json!({"intent_id": "gov-b", "intent_type": "grant_permissions", "actor": "x"}),
    )
    .await;
    assert_eq!(
        (a["status"].as_str(), b["status"].as_str()),
        (Some("pending_review"), Some("pending_review"))
    );
    assert_eq!(task_count(&s.js).await, 0, "tier 0 waits");

    let (approved, code) = decide(&s.client, "gov-a", "approve", "ops-alice").await;
    assert_eq!(code, None, "{approved}");
    assert_eq!(approved["status"], "queued");
    assert_eq!(approved["review"]["reviewer"], "ops-alice");
    assert_eq!(approved["history"][1]["by"], "ops-alice");
    assert_eq!(task_count(&s.js).await, 1, "approval queued the task");

    let (rejected, _) = decide(&s.client, "gov-b", "reject", "ops-bob").await;
    assert_eq!(rejected["status"], "rejected");
    assert!(
        rejected["error"]
            .as_str()
            .expect("error")
            .contains("rejected by ops-bob: looked at it")
    );
    assert_eq!(task_count(&s.js).await, 1, "rejection queued nothing");

    // Deciding again, deciding the unknown, deciding nonsense: clear errors.
    let (again, code) = decide(&s.client, "gov-a", "reject", "ops-carol").await;
    assert_eq!(code.as_deref(), Some("409"));
    assert_eq!(again["error"]["code"], "no_pending_review");
    let (unknown, code) = decide(&s.client, "nope", "approve", "ops-carol").await;
    assert_eq!(
        (code.as_deref(), unknown["error"]["code"].as_str()),
        (Some("404"), Some("unknown_intent"))
    );
    let (bad, code) = request_json(
        &s.client,
        subjects::REVIEW_DECIDE,
        r#"{"intent_id":"gov-a","decision":"maybe","reviewer":"r"}"#,
    )
    .await;
    assert_eq!(
        (code.as_deref(), bad["error"]["code"].as_str()),
        (Some("400"), Some("invalid_review"))
    );
    assert_eq!(
        status(&s.client, "gov-a").await["status"],
        "queued",
        "refused decisions changed nothing"
    );
    assert!(pending_reviews(&s.client).await.is_empty());
    assert_eq!(narratives_named(&s.js, "review_approved").await.len(), 1);
    assert_eq!(narratives_named(&s.js, "review_refused").await.len(), 3);
}

#[tokio::test]
async fn tier_1_runs_now_and_leaves_a_review_record() {
    let s = stack().await;
    let reply = submit(
        &s.client,
        &json!({"intent_id": "dep-1", "intent_type": "deploy_model", "actor": "x"}),
    )
    .await;
    assert_eq!(
        (reply["status"].as_str(), reply["approved"].as_bool()),
        (Some("queued"), Some(true))
    );
    assert_eq!(task_count(&s.js).await, 1);
    let items = pending_reviews(&s.client).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        (
            items[0]["kind"].as_str(),
            items[0]["requires_decision"].as_bool()
        ),
        (Some("post_execution"), Some(false))
    );
    let (after, code) = decide(&s.client, "dep-1", "approve", "auditor").await;
    assert_eq!(code, None);
    assert_eq!(
        after["status"], "queued",
        "a review record does not change the intent"
    );
    assert_eq!(after["review"]["kind"], "post_execution");
    assert!(pending_reviews(&s.client).await.is_empty());
}

#[tokio::test]
async fn votes_follow_the_rules_and_a_quorum_decides() {
    let s = stack().await;
    // The actor is one of the voters, so it must not vote on its own intent.
    let body = |id: &str| {
        json!({"intent_id": id, "intent_type": "self_improve", "actor": "architect",
                                 "mission_context": {"resilience_impact": true}})
    };
    submit(&s.client, &body("imp-1")).await;
    submit(&s.client, &body("imp-2")).await;

    let (selfv, code) = vote(&s.client, "imp-1", "architect", "approve").await;
    assert_eq!(
        (code.as_deref(), selfv["error"]["code"].as_str()),
        (Some("403"), Some("self_vote"))
    );
    let (outsider, code) = vote(&s.client, "imp-1", "mallory", "approve").await;
    assert_eq!(
        (code.as_deref(), outsider["error"]["code"].as_str()),
        (Some("403"), Some("not_a_voter"))
    );
    let (first, code) = vote(&s.client, "imp-1", "guardian", "approve").await;
    assert_eq!(code, None, "{first}");
    assert_eq!(
        (first["approvals"].as_u64(), first["state"].as_str()),
        (Some(1), Some("open"))
    );
    let (twice, code) = vote(&s.client, "imp-1", "guardian", "approve").await;
    assert_eq!(
        (code.as_deref(), twice["error"]["code"].as_str()),
        (Some("409"), Some("duplicate_vote"))
    );
    assert_eq!(status(&s.client, "imp-1").await["status"], "pending_vote");
    assert_eq!(task_count(&s.js).await, 0, "no task before quorum");

    let (decided, _) = vote(&s.client, "imp-1", "steward", "approve").await;
    assert_eq!(
        (decided["approvals"].as_u64(), decided["state"].as_str()),
        (Some(2), Some("approved"))
    );
    let st = status(&s.client, "imp-1").await;
    assert_eq!(st["status"], "queued");
    assert_eq!(st["history"][1]["by"], "guardian,steward");
    assert_eq!(task_count(&s.js).await, 1, "quorum queued the task");
    let (late, code) = vote(&s.client, "imp-1", "architect", "reject").await;
    assert_eq!(
        (code.as_deref(), late["error"]["code"].as_str()),
        (Some("409"), Some("proposal_closed"))
    );

    vote(&s.client, "imp-2", "guardian", "reject").await;
    let (rejected, _) = vote(&s.client, "imp-2", "steward", "reject").await;
    assert_eq!(rejected["state"], "rejected");
    assert_eq!(status(&s.client, "imp-2").await["status"], "rejected");
    assert_eq!(
        task_count(&s.js).await,
        1,
        "a rejecting quorum queues nothing"
    );

    let (unknown, code) = vote(&s.client, "no-such", "guardian", "approve").await;
    assert_eq!(
        (code.as_deref(), unknown["error"]["code"].as_str()),
        (Some("404"), Some("unknown_proposal"))
    );
    let (bad, code) = request_json(
        &s.client,
        subjects::VOTE,
        r#"{"proposal_id":"imp-1","voter":"g","vote":"yes"}"#,
    )
    .await;
    assert_eq!(
        (code.as_deref(), bad["error"]["code"].as_str()),
        (Some("400"), Some("invalid_vote"))
    );
    assert_eq!(narratives_named(&s.js, "vote_approved").await.len(), 1);
    assert_eq!(narratives_named(&s.js, "vote_rejected").await.len(), 1);
}

#[tokio::test]
async fn a_vote_without_quorum_in_time_escalates_to_human_review() {
    let s = stack_with(|cfg| {
        cfg.governance.voters.vote_timeout_s = 1.0;
        cfg.governance.voters.sweep_interval_s = 0.1;
    })
    .await;
    submit(
        &s.client,
        &json!({"intent_id": "slow-1", "intent_type": "optimize_system", "actor": "bot"}),
    )
    .await;
    vote(&s.client, "slow-1", "guardian", "approve").await;
    let st = eventually(
        Duration::from_secs(10),
        "escalation to human review",
        || async {
            let st = status(&s.client, "slow-1").await;
            (st["status"] == "pending_review").then_some(st)
        },
    )
    .await;
    assert!(
        st["history"][1]["reason"]
            .as_str()
            .expect("reason")
            .contains("no quorum within 1s")
    );
    let items = pending_reviews(&s.client).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        (
            items[0]["kind"].as_str(),
            items[0]["requires_decision"].as_bool()
        ),
        (Some("vote_timeout"), Some(true))
    );
    let (late, code) = vote(&s.client, "slow-1", "steward", "approve").await;
    assert_eq!(
        (code.as_deref(), late["error"]["code"].as_str()),
        (Some("409"), Some("proposal_closed"))
    );
    let (approved, _) = decide(&s.client, "slow-1", "approve", "ops").await;
    assert_eq!(approved["status"], "queued");
    assert_eq!(task_count(&s.js).await, 1);
    assert_eq!(
        narratives_named(&s.js, "vote_expired").await.len(),
        1,
        "escalated once, not per sweep"
    );
}

#[tokio::test]
async fn a_governance_restart_keeps_reviews_votes_and_idempotency() {
    let mut s = stack().await;
    let review = submit(
        &s.client,
        &json!({"intent_id": "keep-review", "intent_type": "change_charter", "actor": "x"}),
    )
    .await;
    submit(
        &s.client,
        &json!({"intent_id": "keep-vote", "intent_type": "extend_grace", "actor": "x"}),
    )
    .await;
    vote(&s.client, "keep-vote", "guardian", "approve").await;
    let queued = submit(
        &s.client,
        &json!({"intent_id": "keep-task", "intent_type": "schedule_task", "actor": "x"}),
    )
    .await;

    s.gov.take().expect("running").crash().await;
    // Also restart the broker: what was acknowledged must be on disk.
    s.server.restart();
    let gov = start_governance(s.server.config()).await;
    let client = s.server.client().await;
    let js = jetstream::new(client.clone());

    assert_eq!(
        submit(
            &client,
            &json!({"intent_id": "keep-review", "intent_type": "query_knowledge", "actor": "y"})
        )
        .await,
        review
    );
    assert_eq!(
        submit(
            &client,
            &json!({"intent_id": "keep-task", "intent_type": "schedule_task", "actor": "x"})
        )
        .await,
        queued
    );
    assert_eq!(
        task_count(&js).await,
        1,
        "the resubmission did not queue a second task"
    );
    let items = pending_reviews(&client).await;
    assert!(items.iter().any(|i| i["intent_id"] == "keep-review"));
    let (twice, code) = vote(&client, "keep-vote", "guardian", "approve").await;
    assert_eq!(
        (code.as_deref(), twice["error"]["code"].as_str()),
        (Some("409"), Some("duplicate_vote")),
        "the vote survived"
    );
    let (done, _) = vote(&client, "keep-vote", "steward", "approve").await;
    assert_eq!(done["state"], "approved");
    assert_eq!(status(&client, "keep-vote").await["status"], "queued");
    assert_eq!(task_count(&js).await, 2);
    gov.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_agent_may_submit_but_not_publish_tasks_votes_or_reviews() {
    let s = stack().await;
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let agent = async_nats::ConnectOptions::with_user_and_password(
        AGENT_USER.0.into(),
        AGENT_USER.1.into(),
    )
    .event_callback(move |event| {
        let tx = errors_tx.clone();
        async move {
            if let async_nats::Event::ServerError(err) = event {
                let _ = tx.send(err.to_string());
            }
        }
    })
    .connect(s.server.url())
    .await
    .expect("agent connects");
    // Allowed: submit and read status.
    let reply = submit(
        &agent,
        &json!({"intent_id": "agent-1", "intent_type": "self_improve", "actor": "bot"}),
    )
    .await;
    assert_eq!(reply["status"], "pending_vote");
    assert_eq!(status(&agent, "agent-1").await["status"], "pending_vote");
    // Forbidden: forge a task, a vote, a review decision, a narrative, a KV write.
    let forbidden = [
        subjects::task_queue(9),
        subjects::VOTE.to_owned(),
        subjects::REVIEW_DECIDE.to_owned(),
        subjects::narrative("governance"),
        format!("$KV.{}.agent-1", streams::INTENTS_BUCKET),
    ];
    for subject in &forbidden {
        agent
            .publish(
                subject.clone(),
                json!({"proposal_id": "agent-1", "voter": "guardian", "vote": "approve"})
                    .to_string()
                    .into(),
            )
            .await
            .expect("enqueued");
        agent.flush().await.expect("flushed");
        let err = tokio::time::timeout(Duration::from_secs(5), errors.recv())
            .await
            .expect("server refused")
            .expect("error");
        assert!(
            err.to_lowercase().contains("permissions violation"),
            "{subject}: {err}"
        );
        assert!(err.contains(subject.as_str()), "{err} names {subject}");
    }
    assert_eq!(
        task_count(&s.js).await,
        0,
        "no forged task reached the queue"
    );
    assert_eq!(
        status(&s.client, "agent-1").await["status"],
        "pending_vote",
        "no forged vote counted"
    );
    // An anonymous client is an agent too.
    let anonymous = async_nats::connect(s.server.url())
        .await
        .expect("anonymous connects");
    assert_eq!(
        status(&anonymous, "agent-1").await["status"],
        "pending_vote"
    );
    let mut probe = s
        .client
        .subscribe(subjects::task_queue(1))
        .await
        .expect("sub");
    anonymous
        .publish(subjects::task_queue(1), "{}".into())
        .await
        .expect("enqueued");
    anonymous.flush().await.expect("flush");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), probe.next())
            .await
            .is_err(),
        "anonymous task never delivered"
    );
}

#[tokio::test]
async fn a_foreign_python_client_submits_and_reads_status() {
    let s = stack().await;
    let result = python_client("submit_intent.py", &[&s.server.url()], &[]).await;
    assert_eq!(result["decision"]["status"], "queued");
    assert_eq!(result["status"]["status"], "queued");
    assert_eq!(result["error"]["error"]["code"], "invalid_intent");
    assert_eq!(result["error_header"], "400");
    assert_eq!(task_count(&s.js).await, 1);
}

#[tokio::test]
async fn telemetry_reports_the_counters() {
    let s = stack().await;
    let mut telemetry = s
        .client
        .subscribe("telemetry.governance")
        .await
        .expect("sub");
    submit(&s.client, &intent("query_knowledge")).await;
    submit(&s.client, &intent("self_improve")).await;
    // Telemetry is published every second in tests; read until a message counts both intents.
    let figures = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = telemetry.next().await {
            let v: Value = serde_json::from_slice(&msg.payload).expect("telemetry is JSON");
            if v["intents_by_tier"][2] == 1 && v["intents_by_tier"][3] == 1 {
                return v;
            }
        }
        panic!("telemetry subscription ended");
    })
    .await
    .expect("telemetry with both intents within 10 s");
    assert_eq!(figures["component"], "governance");
    assert_eq!(figures["health_status"], "healthy");
    assert!(
        figures["timestamp"]
            .as_str()
            .expect("timestamp")
            .ends_with('Z')
    );
}
