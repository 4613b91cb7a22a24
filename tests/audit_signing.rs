//! The signed audit chain against a holder of the SERVICE credentials, with a real nats-server
//! running the repository's `nats.conf`: a foreign client (nats-py, `tests/clients/audit_attack.py`)
//! logged in as `bulwark` can use JetStream, so it can try to delete, purge or rewrite the audit
//! records and recompute every SHA-256 and the recorded head. Deletes and purges are refused by
//! the stream (`deny_delete`, `deny_purge`); a rewrite is caught by verification because the
//! records are signed with a key kept in a file outside JetStream. A verification also answers
//! while many long queries wait for their permits.
//!
//! Each test fails on the code before signing: the delete and purge succeed there, the rewritten
//! chain verifies there (its hashes are consistent), and there verify shares one pool of permits
//! with the queries, waiting behind them.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::{streams, subjects};
use bulwark_tests::*;
use futures::StreamExt;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);

/// Runs an attack of `tests/clients/audit_attack.py` with the services' credentials.
async fn attack(server: &NatsServer, args: &[&str]) -> Value {
    let url = server.url();
    let mut all = vec![args[0], url.as_str()];
    all.extend_from_slice(&args[1..]);
    python_client(
        "audit_attack.py",
        &all,
        &[
            ("USER_NAME", SERVICE_USER.0),
            ("USER_PASSWORD", SERVICE_USER.1),
        ],
    )
    .await
}

fn narrative(n: u64) -> Value {
    json!({"who": "governance", "what": "intent_routed", "when": bulwark_common::time::now(),
           "where": "governance@test", "why": [format!("reason {n}")], "how": "test",
           "context": {"n": n}, "intent_id": format!("i-{n}")})
}

async fn narrate(js: &jetstream::Context, n: u64) {
    js.publish(
        subjects::narrative("governance"),
        narrative(n).to_string().into(),
    )
    .await
    .expect("narrative sent")
    .await
    .expect("narrative stored");
}

/// Every audit record stored, by sequence, once there are at least `n`.
async fn records(js: &jetstream::Context, n: u64) -> BTreeMap<u64, Value> {
    eventually(PATIENCE, &format!("{n} audit records"), || async {
        let mut stream = js.get_stream(streams::AUDIT_STREAM).await.ok()?;
        let state = stream.info().await.ok()?.state.clone();
        if state.messages < n {
            return None;
        }
        let mut out = BTreeMap::new();
        for seq in state.first_sequence..=state.last_sequence {
            let msg = stream.get_raw_message(seq).await.ok()?;
            out.insert(seq, serde_json::from_slice(&msg.payload).ok()?);
        }
        Some(out)
    })
    .await
}

/// Waits until the recorded head names record `seq`.
async fn head_at(js: &jetstream::Context, seq: u64) {
    let head = js
        .get_key_value(streams::AUDIT_HEAD_BUCKET)
        .await
        .expect("head bucket");
    eventually(PATIENCE, &format!("the head to reach {seq}"), || async {
        let entry = head.get("head").await.ok().flatten()?;
        let value: Value = serde_json::from_slice(&entry).ok()?;
        (value["seq"] == seq).then_some(())
    })
    .await;
}

async fn verify(client: &async_nats::Client) -> Value {
    let (reply, code) = request_json(client, subjects::CLARITY_VERIFY, "{}").await;
    assert_eq!(code, None, "verify failed: {reply}");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_or_purging_audit_records_is_refused_even_to_the_services() {
    init_logging();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let _clarity = start_clarity(server.config()).await;
    for n in 1..=3 {
        narrate(&js, n).await;
    }
    let before = records(&js, 3).await.len() as u64;

    let seen = attack(&server, &["delete", "2"]).await;
    assert!(
        seen["delete_error"].is_string() && seen["deleted"].is_null(),
        "the delete was refused: {seen}"
    );
    assert!(
        seen["purge_error"].is_string() && seen["purged"].is_null(),
        "the purge was refused: {seen}"
    );
    assert_eq!(
        seen["messages"], before,
        "every record still stored: {seen}"
    );
    let info = js
        .get_stream(streams::AUDIT_STREAM)
        .await
        .expect("audit stream")
        .info()
        .await
        .expect("info")
        .config
        .clone();
    assert!(info.deny_delete && info.deny_purge, "{info:?}");
    let report = verify(&client).await;
    assert_eq!(report["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_rewritten_with_the_service_credentials_fails_on_its_signature() {
    init_logging();
    let server = NatsServer::start();
    let cfg = server.config();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let clarity = start_clarity(cfg.clone()).await;
    for n in 1..=5 {
        narrate(&js, n).await;
    }
    let stored = records(&js, 5).await;
    let last = *stored.keys().last().expect("records");
    head_at(&js, last).await;
    let key = bulwark_clarity::key::AuditKey::load(std::path::Path::new(&cfg.clarity.key_file))
        .expect("clarity created its key file");
    let intact = verify(&client).await;
    assert_eq!(intact["ok"], true, "{intact}");
    assert_eq!(intact["key_id"], key.id(), "{intact}");
    assert_eq!(intact["last_signed"]["seq"], last, "{intact}");
    assert_eq!(
        intact["last_signed"]["stored_at"], stored[&last]["stored_at"],
        "{intact}"
    );
    clarity.stop().await.expect("clean stop");

    // The victim: the governance narrative with n = 3, wherever it landed.
    let victim = *stored
        .iter()
        .find(|(_, r)| r["narrative"]["context"]["n"] == 3)
        .expect("narrative 3 stored")
        .0;
    let seen = attack(&server, &["rewrite", &victim.to_string()]).await;
    assert_eq!(seen["rewritten"], stored.len(), "{seen}");

    // The rewrite is consistent as far as SHA-256 goes: every hash and the head recomputed.
    let _clarity = start_clarity(cfg).await;
    let report = verify(&client).await;
    assert_eq!(report["ok"], false, "the rewrite is caught: {report}");
    assert_eq!(report["first_bad_seq"], victim, "{report}");
    assert!(
        report["reason"]
            .as_str()
            .is_some_and(|r| r.contains("bad signature")),
        "{report}"
    );
    assert_eq!(report["last_signed"]["seq"], victim - 1, "{report}");
    assert_eq!(report["key_id"], key.id(), "{report}");

    // Counted, and narrated into the chain.
    let narrated = eventually(PATIENCE, "the break narrated", || async {
        let all = records(&js, 1).await;
        all.into_values()
            .find(|r| r["narrative"]["what"] == "audit_chain_broken")
    })
    .await;
    assert_eq!(
        narrated["narrative"]["context"]["first_bad_seq"], victim,
        "{narrated}"
    );
    let (stats, _) = request_json(&client, "$SRV.STATS.clarity", "").await;
    let data = &stats["endpoints"][0]["data"];
    let data = if data.is_null() { &stats["data"] } else { data };
    let breaks = data["chain_breaks"].as_u64().unwrap_or(0);
    assert!(breaks >= 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_removed_by_a_shortened_retention_are_reported_truncated_not_expired() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    // Clarity keeps records for a day; the attacker makes the server drop them within a second.
    cfg.clarity.max_age_days = 1;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let _clarity = start_clarity(cfg).await;
    for n in 1..=3 {
        narrate(&js, n).await;
    }
    let before = records(&js, 3).await;
    let last = *before.keys().last().expect("records");
    head_at(&js, last).await;
    assert_eq!(verify(&client).await["ok"], true);

    attack(&server, &["shorten", "1"]).await;
    eventually(PATIENCE, "the server to drop the records", || async {
        let mut stream = js.get_stream(streams::AUDIT_STREAM).await.ok()?;
        let state = stream.info().await.ok()?.state.clone();
        (state.messages == 0 && state.last_sequence >= last).then_some(())
    })
    .await;
    // The day of retention put back, so what clarity appends next stays; the oldest survivor
    // names when its predecessor was stored.
    attack(&server, &["shorten", "86400"]).await;
    narrate(&js, 4).await;
    let after = records(&js, 1).await;
    let first = *after.keys().next().expect("a survivor");
    assert!(first > last, "{after:?}");
    let report = verify(&client).await;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["first_bad_seq"], first - 1, "{report}");
    assert!(
        report["reason"]
            .as_str()
            .is_some_and(|r| r.contains("truncated")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_answers_while_long_queries_wait_for_their_permits() {
    init_logging();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let mut cfg = server.config();
    // One query at a time: the other 199 wait for that permit, and the verification must not.
    cfg.clarity.query_concurrency = 1;
    let _clarity = start_clarity(cfg).await;
    const RECORDS: u64 = 400;
    const QUERIES: usize = 200;
    for n in 1..=RECORDS {
        narrate(&js, n).await;
    }
    records(&js, RECORDS).await;

    // Every reply on one subscription, so they are seen in the order they arrived.
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(format!("{inbox}.>"))
        .await
        .expect("subscribe");
    let scan_everything = json!({"who": "nobody", "limit": 1}).to_string();
    for i in 0..QUERIES {
        client
            .publish_with_reply(
                subjects::CLARITY_QUERY,
                format!("{inbox}.q.{i}"),
                scan_everything.clone().into(),
            )
            .await
            .expect("query sent");
    }
    client
        .publish_with_reply(
            subjects::CLARITY_VERIFY,
            format!("{inbox}.verify"),
            "{}".into(),
        )
        .await
        .expect("verify sent");
    client.flush().await.expect("flush");

    let mut queries_answered = 0usize;
    let verdict = tokio::time::timeout(PATIENCE * 4, async {
        while let Some(msg) = replies.next().await {
            if msg.subject.ends_with(".verify") {
                return serde_json::from_slice::<Value>(&msg.payload).expect("report");
            }
            queries_answered += 1;
        }
        panic!("reply subscription ended");
    })
    .await
    .expect("the verification answered");
    assert_eq!(verdict["ok"], true, "{verdict}");
    // With one pool of permits (64 shared, the old code) the verification waits behind the
    // queries holding them: 26 to 103 queries answered first in five runs. With its own
    // permits it runs beside the one query at work.
    assert!(
        queries_answered < QUERIES / 20,
        "{queries_answered} of {QUERIES} queries answered before the verification"
    );
}
