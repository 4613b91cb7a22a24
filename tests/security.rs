//! Security end to end, against a real nats-server running the repository's `nats.conf`:
//! least privilege (each identity is refused every action outside its role and can do every
//! action inside it) and identities bound to NATS credentials (the reviewer, voter and actor are
//! the sending user, not a JSON field). docs/security.md describes what is tested here.

use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::{streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

const WORKER_USER: (&str, &str) = ("worker", "worker-dev");
const ARCHITECT: (&str, &str) = ("architect", "architect-dev");
const GUARDIAN: (&str, &str) = ("guardian", "guardian-dev");
const STEWARD: (&str, &str) = ("steward", "steward-dev");

/// A client whose server errors (permission violations) arrive on the returned channel.
async fn watched(
    server: &NatsServer,
    creds: Option<(&str, &str)>,
) -> (async_nats::Client, UnboundedReceiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let options = match creds {
        // Each user outside bulwark's account may read only its own inbox prefix.
        Some((user, password)) => {
            let role = if user == SERVICE_USER.0 {
                bulwark_common::connect::Role::Service
            } else {
                bulwark_common::connect::Role::Cli
            };
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .custom_inbox_prefix(bulwark_common::connect::inbox_prefix(role, user))
        }
        None => async_nats::ConnectOptions::new(),
    };
    let client = options
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
        .expect("client connects");
    (client, rx)
}

/// Waits for the server's refusal naming `subject`.
async fn expect_violation(errors: &mut UnboundedReceiver<String>, who: &str, subject: &str) {
    let err = tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .unwrap_or_else(|_| panic!("{who}: the server did not refuse {subject}"))
        .expect("error channel open");
    assert!(
        err.to_lowercase().contains("permissions violation") && err.contains(subject),
        "{who}: expected a permissions violation naming {subject}, got {err}"
    );
}

/// Publishing each subject is refused for this identity.
async fn refused_publish(
    who: &str,
    client: &async_nats::Client,
    errors: &mut UnboundedReceiver<String>,
    forbidden: &[String],
) {
    for subject in forbidden {
        client
            .publish(subject.clone(), r#"{"forged":true}"#.into())
            .await
            .expect("enqueued");
        client.flush().await.expect("flushed");
        expect_violation(errors, who, subject).await;
    }
}

/// Subscribing to each subject is refused for this identity.
async fn refused_subscribe(
    who: &str,
    client: &async_nats::Client,
    errors: &mut UnboundedReceiver<String>,
    forbidden: &[&str],
) {
    for subject in forbidden {
        let _sub = client
            .subscribe(subject.to_string())
            .await
            .expect("subscribe sent");
        client.flush().await.expect("flushed");
        expect_violation(errors, who, subject).await;
    }
}

/// Answers every request on `subjects` with `{"echo": <subject>}` as the services user, so a
/// reply proves that the requester may publish there.
async fn echo(service: &async_nats::Client, subjects: &[&str]) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for subject in subjects {
        let mut sub = service
            .subscribe(subject.to_string())
            .await
            .expect("echo subscribes");
        let client = service.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Some(reply) = msg.reply {
                    let body = json!({ "echo": msg.subject.as_str() }).to_string();
                    let _ = client.publish(reply, body.into()).await;
                }
            }
        }));
    }
    service.flush().await.expect("flush");
    tasks
}

/// The reply to `body` on `subject`, asked again while nobody answers yet (a subscription made
/// on another connection becomes active on the server a moment after `subscribe` returns);
/// panics after 5 s.
async fn request_until(
    who: &str,
    client: &async_nats::Client,
    subject: &str,
    body: &'static str,
) -> async_nats::Message {
    eventually(
        Duration::from_secs(5),
        &format!("{who}: a reply on {subject}"),
        || async {
            match tokio::time::timeout(
                Duration::from_millis(500),
                client.request(subject.to_owned(), body.into()),
            )
            .await
            {
                Ok(Ok(reply)) => Some(reply),
                Ok(Err(err))
                    if err.kind() != async_nats::client::RequestErrorKind::NoResponders =>
                {
                    panic!("{who}: request on {subject} failed: {err}")
                }
                _ => None,
            }
        },
    )
    .await
}

/// Publishes on `subject` until `sub` receives it (see [`request_until`]); panics after 5 s.
async fn publish_until_seen(
    client: &async_nats::Client,
    subject: &str,
    body: &'static str,
    sub: &mut async_nats::Subscriber,
) -> async_nats::Message {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        client
            .publish(subject.to_owned(), body.into())
            .await
            .expect("published");
        if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            return msg;
        }
    }
    panic!("{subject} never arrived");
}

/// Each subject answers this identity's request (the echo, or the real service).
async fn allowed_requests(who: &str, client: &async_nats::Client, allowed: &[&str]) {
    for subject in allowed {
        let reply = request_until(who, client, subject, "{}").await;
        let value: Value = serde_json::from_slice(&reply.payload).expect("reply is JSON");
        assert!(value.is_object(), "{who}: {subject} answered {value}");
    }
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// What no identity but the services may publish: tasks, assignments and reports' forgeries,
/// narratives and audit records, safeguard events, stored state, telemetry.
fn service_only() -> Vec<String> {
    vec![
        subjects::task_queue(9),
        subjects::task_parked(1),
        subjects::TASK_DEAD.to_owned(),
        subjects::narrative("governance"),
        subjects::CLARITY_AUDIT.to_owned(),
        subjects::MESH_BREAKER_OPENED.to_owned(),
        "mesh.layer2.critical_alert".to_owned(),
        "mesh.task.completed".to_owned(),
        "mesh.playbook.started".to_owned(),
        subjects::MESH_DEADLETTER.to_owned(),
        subjects::MESH_INCIDENT.to_owned(),
        subjects::MESH_EMERGENCY.to_owned(),
        subjects::MESH_THROTTLE.to_owned(),
        subjects::telemetry("governance"),
        format!("$KV.{}.forged", streams::INTENTS_BUCKET),
        format!("$KV.{}.forged", streams::BREAKER_BUCKET),
        format!("$JS.API.STREAM.DELETE.{}", streams::TASKS_STREAM),
        format!("$JS.API.STREAM.PURGE.{}", streams::MESH_STREAM),
        format!("$JS.API.CONSUMER.CREATE.{}", streams::TASKS_STREAM),
        "_INBOX.forged".to_owned(),
    ]
}

/// Speaking for someone else: another identity's review, vote or intent subject.
fn impersonation() -> Vec<String> {
    vec![
        subjects::as_identity(subjects::REVIEW_DECIDE, "someone"),
        subjects::as_identity(subjects::VOTE, "someone"),
        subjects::as_identity(subjects::INTENT_SUBMIT, "someone"),
    ]
}

/// Serving a bulwark subject (and so answering in its place) or taking work: services only.
const SERVICE_SUBSCRIPTIONS: [&str; 6] = [
    "htm.intent.submit",
    "governance.review.decide",
    "unified_logic.vote",
    "htm.task.queue.>",
    "htm.task.result",
    "scheduler.pause",
];

const OPS_REQUESTS: [&str; 15] = [
    "scheduler.pause",
    "scheduler.resume",
    "scheduler.shed",
    "scheduler.replay",
    "storm_guard.breaker.open",
    "storm_guard.breaker.close",
    "storm_guard.limit",
    "storm_guard.throttle",
    "playbook.run",
    "playbook.list",
    "playbook.check",
    "htm.pool.status",
    "htm.pool.respawn",
    "htm.pool.kill",
    "clarity.verify",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_submit_read_and_use_the_mesh_and_nothing_else() {
    init_logging();
    let server = NatsServer::start();
    let _gov = start_governance(server.config()).await;
    let service = server.client().await;
    for creds in [Some(AGENT_USER), None] {
        let who = if creds.is_some() {
            "agent"
        } else {
            "anonymous"
        };
        let (agent, mut errors) = watched(&server, creds).await;
        // Allowed: submit, read status, read proposals, publish and read mesh events.
        let id = format!("{who}-intent");
        let (reply, code) = request_json(
            &agent,
            subjects::INTENT_SUBMIT,
            json!({"intent_id": id, "intent_type": "self_improve", "actor": who}).to_string(),
        )
        .await;
        assert_eq!(
            (code, reply["status"].as_str()),
            (None, Some("pending_vote"))
        );
        let (status, _) = request_json(
            &agent,
            subjects::INTENT_STATUS,
            json!({ "intent_id": id }).to_string(),
        )
        .await;
        assert_eq!(status["status"], "pending_vote");
        let (open, _) = request_json(&agent, subjects::PROPOSALS_OPEN, "{}").await;
        assert!(open["items"].as_array().is_some_and(|i| !i.is_empty()));
        let mut mesh = agent.subscribe("mesh.agent.>").await.expect("sub");
        let seen = publish_until_seen(
            &agent,
            "mesh.agent.note",
            r#"{"source":"agent","payload":{}}"#,
            &mut mesh,
        )
        .await;
        assert_eq!(seen.subject.as_str(), "mesh.agent.note");

        // Forbidden: everything a service, an operator, a voter or a worker does.
        let mut forbidden = service_only();
        forbidden.extend(impersonation());
        forbidden.extend(strings(&[
            subjects::REVIEW_DECIDE,
            subjects::VOTE,
            subjects::TASK_RESULT,
            "htm.heartbeat.w1",
            "htm.worker.w1.task",
            "clarity.verify",
        ]));
        forbidden.extend(strings(&OPS_REQUESTS));
        refused_publish(who, &agent, &mut errors, &forbidden).await;
        let mut no_sub = SERVICE_SUBSCRIPTIONS.to_vec();
        no_sub.extend(["htm.worker.*.task", "clarity.narrative.>", "$KV.>"]);
        refused_subscribe(who, &agent, &mut errors, &no_sub).await;
    }
    let js = jetstream::new(service);
    let mut tasks = js
        .get_stream(streams::TASKS_STREAM)
        .await
        .expect("tasks stream");
    assert_eq!(
        tasks.info().await.expect("info").state.messages,
        0,
        "no forged task reached the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_review_vote_and_run_ops_but_forge_nothing() {
    init_logging();
    let server = NatsServer::start();
    let _gov = start_governance(server.config()).await;
    let service = server.client().await;
    let (operator, mut errors) = watched(&server, Some(OPERATOR_USER)).await;

    // Allowed: intents, the review queue and votes on the plain subjects (on intents someone
    // else submitted: nobody reviews or votes on their own, by any name).
    let (reply, _) = request_json(
        &service,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "op-review", "intent_type": "change_charter", "actor": "ops"})
            .to_string(),
    )
    .await;
    assert_eq!(reply["status"], "pending_review");
    let (pending, code) = request_json(&operator, subjects::REVIEW_PENDING, "{}").await;
    assert_eq!(code, None);
    assert_eq!(pending["items"][0]["intent_id"], "op-review");
    let (decided, code) = request_json(
        &operator,
        subjects::REVIEW_DECIDE,
        json!({"intent_id": "op-review", "decision": "approve", "reviewer": "ops-alice"})
            .to_string(),
    )
    .await;
    assert_eq!((code, decided["status"].as_str()), (None, Some("queued")));
    request_json(
        &service,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "op-vote", "intent_type": "self_improve", "actor": "ops"}).to_string(),
    )
    .await;
    // ... and not on its own.
    request_json(
        &operator,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "op-own", "intent_type": "self_improve", "actor": "ops"}).to_string(),
    )
    .await;
    let (own, code) = request_json(
        &operator,
        subjects::VOTE,
        json!({"proposal_id": "op-own", "voter": "guardian", "vote": "approve"}).to_string(),
    )
    .await;
    assert_eq!(
        (code.as_deref(), own["error"]["code"].as_str()),
        (Some("403"), Some("self_vote"))
    );
    let (tally, code) = request_json(
        &operator,
        subjects::VOTE,
        json!({"proposal_id": "op-vote", "voter": "guardian", "vote": "approve"}).to_string(),
    )
    .await;
    assert_eq!((code, tally["approvals"].as_u64()), (None, Some(1)));
    // Allowed: the ops requests of the other services, queries. (No JetStream: bulwark's streams
    // live in its own account, which the operator's cannot see into.)
    let mut answered = OPS_REQUESTS.to_vec();
    answered.extend([
        "clarity.query",
        "storm_guard.status",
        "watchdog.report",
        "event_policy.rules",
        "htm.readiness",
    ]);
    let _echo = echo(&service, &answered).await;
    allowed_requests("operator", &operator, &answered).await;
    let mut narratives = operator
        .subscribe(subjects::NARRATIVE_ALL)
        .await
        .expect("operators read narratives");
    // Submitting until one of the narratives arrives (the subscription becomes active a moment
    // after subscribe returns).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut read = false;
    while !read && tokio::time::Instant::now() < deadline {
        request_json(
            &operator,
            subjects::INTENT_SUBMIT,
            json!({"intent_type": "query_knowledge", "actor": "ops"}).to_string(),
        )
        .await;
        read = tokio::time::timeout(Duration::from_millis(200), narratives.next())
            .await
            .is_ok_and(|m| m.is_some());
    }
    assert!(read, "the operator reads narratives");

    // Forbidden: forging, impersonating a named reviewer or voter, serving bulwark subjects.
    let mut forbidden = service_only();
    forbidden.extend(impersonation());
    forbidden.extend(strings(&[
        subjects::TASK_RESULT,
        "htm.heartbeat.w1",
        "htm.worker.w1.task",
        &subjects::as_identity(subjects::VOTE, "guardian"),
        &subjects::as_identity(subjects::REVIEW_DECIDE, "architect"),
        &format!("$JS.API.STREAM.INFO.{}", streams::TASKS_STREAM),
        "$JS.API.INFO",
    ]));
    refused_publish("operator", &operator, &mut errors, &forbidden).await;
    let mut no_sub = SERVICE_SUBSCRIPTIONS.to_vec();
    no_sub.extend(["htm.worker.*.task", "$KV.>", "$JS.API.>"]);
    refused_subscribe("operator", &operator, &mut errors, &no_sub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_heartbeat_take_their_tasks_and_report_and_nothing_else() {
    init_logging();
    let server = NatsServer::start();
    let service = server.client().await;
    let (worker, mut errors) = watched(&server, Some(WORKER_USER)).await;

    // Allowed: heartbeats reach the scheduler's subscription.
    let mut beats = service
        .subscribe(subjects::WORKER_HEARTBEAT_ALL)
        .await
        .expect("sub");
    let beat =
        publish_until_seen(&worker, &subjects::worker_heartbeat("w1"), "{}", &mut beats).await;
    assert_eq!(beat.subject.as_str(), "htm.heartbeat.w1");
    // Allowed: take an assignment and answer it (allow_responses), report a result.
    let mut tasks = worker
        .subscribe(subjects::worker_task("w1"))
        .await
        .expect("sub");
    let taker = worker.clone();
    let answer = tokio::spawn(async move {
        while let Some(msg) = tasks.next().await {
            let reply = msg.reply.expect("a request");
            taker
                .publish(reply, r#"{"accepted":true}"#.into())
                .await
                .expect("answered");
        }
    });
    let accepted = request_until("service", &service, &subjects::worker_task("w1"), "{}").await;
    assert_eq!(accepted.payload.as_ref(), br#"{"accepted":true}"#);
    answer.abort();
    let _echo = echo(&service, &[subjects::TASK_RESULT]).await;
    allowed_requests("worker", &worker, &[subjects::TASK_RESULT]).await;

    // Forbidden: intake, governance, the mesh, forging anything a service publishes.
    let mut forbidden = service_only();
    forbidden.extend(impersonation());
    forbidden.extend(strings(&[
        subjects::INTENT_SUBMIT,
        subjects::REVIEW_DECIDE,
        subjects::VOTE,
        "mesh.agent.note",
        "scheduler.pause",
        "playbook.run",
        "htm.pool.kill",
    ]));
    refused_publish("worker", &worker, &mut errors, &forbidden).await;
    refused_subscribe(
        "worker",
        &worker,
        &mut errors,
        &["htm.intent.submit", "htm.task.queue.>", "mesh.>", "$KV.>"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_voter_votes_and_reviews_only_as_itself() {
    init_logging();
    let server = NatsServer::start();
    let _gov = start_governance(server.config()).await;
    let service = server.client().await;
    for (id, kind) in [("nv-vote", "self_improve"), ("nv-review", "change_charter")] {
        request_json(
            &service,
            subjects::INTENT_SUBMIT,
            json!({"intent_id": id, "intent_type": kind, "actor": "bot"}).to_string(),
        )
        .await;
    }
    let (guardian, mut errors) = watched(&server, Some(GUARDIAN)).await;

    // Its own subject, no voter field: the vote is the sender's.
    let (tally, code) = request_json(
        &guardian,
        &subjects::as_identity(subjects::VOTE, "guardian"),
        json!({"proposal_id": "nv-vote", "vote": "approve", "reason": "mine"}).to_string(),
    )
    .await;
    assert_eq!(code, None, "{tally}");
    assert_eq!(tally["votes"][0]["voter"], "guardian");
    // Its own subject, another voter named: refused, not counted.
    let (refusal, code) = request_json(
        &guardian,
        &subjects::as_identity(subjects::VOTE, "guardian"),
        json!({"proposal_id": "nv-vote", "voter": "architect", "vote": "approve"}).to_string(),
    )
    .await;
    assert_eq!(code.as_deref(), Some("403"));
    assert_eq!(refusal["error"]["code"], "identity_mismatch");
    let message = refusal["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("\"architect\"") && message.contains("\"guardian\""),
        "{message}"
    );
    // It reviews as itself too.
    let (decided, code) = request_json(
        &guardian,
        &subjects::as_identity(subjects::REVIEW_DECIDE, "guardian"),
        json!({"intent_id": "nv-review", "decision": "reject", "reason": "no"}).to_string(),
    )
    .await;
    assert_eq!((code, decided["status"].as_str()), (None, Some("rejected")));
    let (record, _) = request_json(
        &guardian,
        subjects::INTENT_STATUS,
        json!({"intent_id": "nv-review"}).to_string(),
    )
    .await;
    let last = record["history"]
        .as_array()
        .and_then(|h| h.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["by"], "guardian", "{record}");

    // Another voter's subject, the plain subjects, anything else: refused by the server.
    let mut forbidden = service_only();
    forbidden.extend(strings(&[
        &subjects::as_identity(subjects::VOTE, "architect"),
        &subjects::as_identity(subjects::REVIEW_DECIDE, "steward"),
        subjects::VOTE,
        subjects::REVIEW_DECIDE,
        subjects::INTENT_SUBMIT,
        "mesh.agent.note",
        "scheduler.pause",
    ]));
    refused_publish("guardian", &guardian, &mut errors, &forbidden).await;
    refused_subscribe(
        "guardian",
        &guardian,
        &mut errors,
        &["mesh.>", "htm.worker.*.task", "unified_logic.vote.>"],
    )
    .await;
    let (tally, _) = request_json(&service, subjects::PROPOSALS_OPEN, "{}").await;
    let votes = tally["items"][0]["votes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        votes.len(),
        1,
        "only the guardian's own vote counted: {tally}"
    );

    // The other voters reach quorum on their own subjects.
    for creds in [ARCHITECT, STEWARD] {
        let client = server.client_as(creds).await;
        let (tally, code) = request_json(
            &client,
            &subjects::as_identity(subjects::VOTE, creds.0),
            json!({"proposal_id": "nv-vote", "voter": creds.0, "vote": "approve"}).to_string(),
        )
        .await;
        assert_eq!(code, None, "{}: {tally}", creds.0);
        if tally["state"] == "approved" {
            break;
        }
    }
    let (status, _) = request_json(
        &service,
        subjects::INTENT_STATUS,
        json!({"intent_id": "nv-vote"}).to_string(),
    )
    .await;
    assert_eq!(status["status"], "queued");
}

async fn governance_counter(client: &async_nats::Client, name: &str) -> u64 {
    let reply = client
        .request("$SRV.STATS.governance", "".into())
        .await
        .expect("stats");
    let stats: Value = serde_json::from_slice(&reply.payload).expect("json");
    stats["endpoints"]
        .as_array()
        .and_then(|e| e.first())
        .and_then(|e| e["data"][name].as_u64())
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

async fn narratives(js: &jetstream::Context, what: &str) -> Vec<Value> {
    let mut stream = js
        .get_stream(streams::NARRATIVES_STREAM)
        .await
        .expect("narratives stream");
    let state = stream.info().await.expect("info").state.clone();
    let mut found = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
            if v["what"] == what {
                found.push(v);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_names_speak_only_on_their_own_subject() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.governance.bound_identities = strings(&["guardian", "bot-7"]);
    let _gov = start_governance(cfg).await;
    let service = server.client().await;
    let js = jetstream::new(service.clone());
    let operator = server.client_as(OPERATOR_USER).await;
    request_json(
        &service,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "bound-vote", "intent_type": "self_improve", "actor": "x"}).to_string(),
    )
    .await;

    // The operator's console may no longer speak for the bound guardian on the plain subject...
    let (refusal, code) = request_json(
        &operator,
        subjects::VOTE,
        json!({"proposal_id": "bound-vote", "voter": "guardian", "vote": "approve"}).to_string(),
    )
    .await;
    assert_eq!(code.as_deref(), Some("403"));
    assert_eq!(refusal["error"]["code"], "identity_required");
    assert!(
        refusal["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unified_logic.vote.guardian")),
        "{refusal}"
    );
    // ... but still for an unbound voter.
    let (tally, code) = request_json(
        &operator,
        subjects::VOTE,
        json!({"proposal_id": "bound-vote", "voter": "steward", "vote": "approve"}).to_string(),
    )
    .await;
    assert_eq!((code, tally["approvals"].as_u64()), (None, Some(1)));

    // Actors: a bound agent submits on its own subject; its name elsewhere is refused.
    let (refusal, code) = request_json(
        &service,
        subjects::INTENT_SUBMIT,
        json!({"intent_type": "query_knowledge", "actor": "bot-7"}).to_string(),
    )
    .await;
    assert_eq!(
        (code.as_deref(), refusal["error"]["code"].as_str()),
        (Some("403"), Some("identity_required"))
    );
    let own = subjects::as_identity(subjects::INTENT_SUBMIT, "bot-7");
    let (accepted, code) = request_json(
        &service,
        &own,
        json!({"intent_id": "bot-7-own", "intent_type": "query_knowledge"}).to_string(),
    )
    .await;
    assert_eq!(
        (code, accepted["actor"].as_str()),
        (None, Some("bot-7")),
        "the actor is the sender"
    );
    let (refusal, code) = request_json(
        &service,
        &own,
        json!({"intent_type": "query_knowledge", "actor": "grace_architect"}).to_string(),
    )
    .await;
    assert_eq!(
        (code.as_deref(), refusal["error"]["code"].as_str()),
        (Some("403"), Some("identity_mismatch"))
    );

    // Every refusal is counted and narrated with its code.
    assert_eq!(governance_counter(&service, "identity_refusals").await, 3);
    let refused_votes = eventually(
        Duration::from_secs(10),
        "the vote refusal narrative",
        || {
            let js = js.clone();
            async move {
                let found = narratives(&js, "vote_refused").await;
                (!found.is_empty()).then_some(found)
            }
        },
    )
    .await;
    assert_eq!(refused_votes[0]["context"]["code"], "identity_required");
    let refused_intents = eventually(Duration::from_secs(10), "the intent refusals", || {
        let js = js.clone();
        async move {
            let found = narratives(&js, "intent_refused").await;
            (found.len() >= 2).then_some(found)
        }
    })
    .await;
    let codes: Vec<&str> = refused_intents
        .iter()
        .filter_map(|n| n["context"]["code"].as_str())
        .collect();
    assert!(
        codes.contains(&"identity_required") && codes.contains(&"identity_mismatch"),
        "{codes:?}"
    );
}
