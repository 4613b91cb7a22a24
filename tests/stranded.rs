//! Stranded intents (issue 17, item 7), against a real nats-server running the repository's
//! `nats.conf`: governance accepts an intent in two writes, its record and then what the record
//! promises (the task, the review item, the proposal). A governance that dies between the two
//! leaves exactly this in JetStream: the record, and nothing else. These tests leave that state
//! (a record written with the services' credentials, its promise missing) and show the
//! reconciler finishing it, once, without a resubmission; and failing clearly one whose promise
//! cannot be kept within the window.

use std::time::Duration;

use serde_json::{Value, json};

use bulwark_common::config::BulwarkConfig;
use bulwark_common::intent::IntentRecord;
use bulwark_common::{streams, subjects};
use bulwark_tests::*;

/// A configuration whose reconciler acts within seconds.
fn quick(mut cfg: BulwarkConfig) -> BulwarkConfig {
    cfg.governance.reconcile.grace_s = 1.0;
    cfg.governance.reconcile.interval_s = 0.2;
    cfg.governance.reconcile.window_s = 6.0;
    cfg
}

async fn submit(client: &async_nats::Client, id: &str, intent_type: &str) -> Value {
    let body = json!({
        "intent_id": id, "actor": "agent-7", "intent_type": intent_type,
        "payload": {"q": id}, "mission_context": {"resilience_impact": true},
    });
    let (reply, code) = request_json(
        client,
        subjects::INTENT_SUBMIT,
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(code, None, "{id} accepted: {reply}");
    reply
}

async fn status(client: &async_nats::Client, id: &str) -> Value {
    request_json(
        client,
        subjects::INTENT_STATUS,
        json!({"intent_id": id}).to_string().into_bytes(),
    )
    .await
    .0
}

/// Leaves the state a governance crash between the two writes leaves: a copy of `template`'s
/// record under `id`, written like governance writes it, with no task, review item or proposal.
async fn strand(js: &async_nats::jetstream::Context, template: &str, id: &str) {
    let intents = js
        .get_key_value(streams::INTENTS_BUCKET)
        .await
        .expect("intents bucket");
    let entry = intents
        .get(template)
        .await
        .expect("read")
        .expect("template record");
    let mut record: IntentRecord = serde_json::from_slice(&entry).expect("record");
    record.intent.intent_id = id.to_owned();
    record.decision.intent_id = id.to_owned();
    intents
        .create(id, serde_json::to_vec(&record).expect("json").into())
        .await
        .expect("stranded record written");
}

async fn review_ids(client: &async_nats::Client) -> Vec<String> {
    let (page, _) = request_json(client, subjects::REVIEW_PENDING, "{}".as_bytes().to_vec()).await;
    page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["intent_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_intent_whose_task_was_never_written_runs_once_without_a_resubmission() {
    init_logging();
    let server = NatsServer::start();
    let cfg = quick(server.config());
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let _governance = start_governance(cfg.clone()).await;
    let _clarity = start_clarity(cfg.clone()).await;

    // A template record from governance itself: a tier 2 intent, queued.
    let reply = submit(&client, "template-q", "query_knowledge").await;
    assert_eq!(reply["status"], "queued", "{reply}");
    strand(&js, "template-q", "stranded-q").await;
    assert_eq!(status(&client, "stranded-q").await["status"], "queued");

    // Only now do workers exist: what runs is what the queue holds.
    let runs = Runs::default();
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _worker = start_counting_worker(&cfg, "w1", &runs, 10).await;
    for id in ["template-q", "stranded-q"] {
        eventually(Duration::from_secs(60), &format!("{id} completed"), || {
            let client = client.clone();
            async move { (status(&client, id).await["status"] == "completed").then_some(()) }
        })
        .await;
    }
    // Past the window: nothing runs again.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let counted = runs.snapshot();
    assert_eq!(counted.get("stranded-q"), Some(&1), "{counted:?}");
    assert_eq!(
        counted.get("template-q"),
        Some(&1),
        "the template ran once: {counted:?}"
    );

    let narratives = eventually(
        Duration::from_secs(20),
        "the reconciliation narrated",
        || {
            let js = js.clone();
            async move {
                let all = stored_narratives(&js, "governance").await;
                let found: Vec<Value> = all
                    .into_iter()
                    .filter(|n| n["what"] == "intent_reconciled")
                    .collect();
                (!found.is_empty()).then_some(found)
            }
        },
    )
    .await;
    assert_eq!(narratives.len(), 1, "only the stranded one: {narratives:?}");
    assert_eq!(narratives[0]["context"]["intent_id"], "stranded-q");
    assert_eq!(narratives[0]["context"]["repaired"], json!(["task"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_review_whose_item_was_never_written_reaches_the_reviewers() {
    init_logging();
    let server = NatsServer::start();
    let cfg = quick(server.config());
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let _governance = start_governance(cfg.clone()).await;

    let reply = submit(&client, "template-r", "grant_permissions").await;
    assert_eq!(reply["status"], "pending_review", "{reply}");
    strand(&js, "template-r", "stranded-r").await;
    assert!(!review_ids(&client).await.contains(&"stranded-r".to_owned()));
    eventually(Duration::from_secs(30), "the stranded review item", || {
        let client = client.clone();
        async move {
            review_ids(&client)
                .await
                .contains(&"stranded-r".to_owned())
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        status(&client, "stranded-r").await["status"],
        "pending_review"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_that_cannot_be_queued_within_the_window_is_failed_with_the_reason() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = quick(server.config());
    // The task queue holds one task: with the template's task in it, the stranded one's task
    // is refused (storage_full) at every check, for the whole window.
    cfg.nats.storage.tasks_max_msgs = 1;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let _governance = start_governance(cfg.clone()).await;

    submit(&client, "template-f", "query_knowledge").await;
    strand(&js, "template-f", "stranded-f").await;
    let failed = eventually(
        Duration::from_secs(60),
        "the stranded intent failed",
        || {
            let client = client.clone();
            async move {
                let s = status(&client, "stranded-f").await;
                (s["status"] == "failed").then_some(s)
            }
        },
    )
    .await;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("stranded") && error.contains("task"),
        "the reason is given: {failed}"
    );
    // The template, whose task is in the queue, is untouched.
    assert_eq!(status(&client, "template-f").await["status"], "queued");
}
