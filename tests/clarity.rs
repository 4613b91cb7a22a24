//! Clarity end to end, against a real nats-server running the repository's `nats.conf`: the
//! chain of governance's narratives, queries and their filters, bad queries, malformed
//! narratives, tampering found by verification, two instances writing one chain, restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::{BulwarkConfig, streams, subjects};
use bulwark_tests::*;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(30);

struct Stack {
    server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
}

async fn stack() -> Stack {
    init_logging();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    Stack { server, client, js }
}

impl Stack {
    fn config(&self) -> BulwarkConfig {
        self.server.config()
    }

    /// Publishes a narrative through JetStream, as every component does.
    async fn narrate(&self, body: &Value) {
        let who = body["who"].as_str().unwrap_or("test");
        self.js
            .publish(subjects::narrative(who), body.to_string().into())
            .await
            .expect("narrative sent")
            .await
            .expect("narrative stored");
    }

    /// Every audit record currently stored, by stream sequence.
    async fn audit(&self) -> BTreeMap<u64, Value> {
        let mut out = BTreeMap::new();
        let Ok(mut stream) = self.js.get_stream(streams::AUDIT_STREAM).await else {
            return out;
        };
        let state = stream.info().await.expect("info").state.clone();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(msg) = stream.get_raw_message(seq).await {
                out.insert(
                    seq,
                    serde_json::from_slice(&msg.payload).unwrap_or(Value::Null),
                );
            }
        }
        out
    }

    /// Waits until the audit stream holds `n` records.
    async fn await_records(&self, n: usize) -> BTreeMap<u64, Value> {
        eventually(PATIENCE, &format!("{n} audit records"), || async {
            let records = self.audit().await;
            (records.len() >= n).then_some(records)
        })
        .await
    }

    async fn query(&self, body: Value) -> Vec<Value> {
        let (reply, code) =
            request_json(&self.client, subjects::CLARITY_QUERY, body.to_string()).await;
        assert_eq!(code, None, "query {body} failed: {reply}");
        reply["items"].as_array().cloned().expect("items")
    }

    async fn verify(&self) -> Value {
        let (reply, code) = request_json(&self.client, subjects::CLARITY_VERIFY, "{}").await;
        assert_eq!(code, None, "verify failed: {reply}");
        reply
    }
}

fn narrative(who: &str, what: &str, intent: &str, when: &str, n: u64) -> Value {
    json!({"who": who, "what": what, "when": when, "where": format!("{who}@test"),
           "why": [format!("reason {n}")], "how": "test", "context": {"n": n},
           "intent_id": intent, "correlation_id": format!("flow-{intent}")})
}

fn now() -> String {
    bulwark_common::time::now()
}

fn whats(items: &[Value]) -> Vec<&str> {
    items
        .iter()
        .map(|i| i["what"].as_str().unwrap_or("?"))
        .collect()
}

/// The `context.n` of every audit record, in chain order, leaving out clarity's own narratives
/// (its replicas narrate lease handovers into the chain they write).
fn numbers(records: &BTreeMap<u64, Value>) -> Vec<u64> {
    records
        .values()
        .filter(|r| r["narrative"]["who"] != "clarity")
        .map(|r| r["narrative"]["context"]["n"].as_u64().expect("n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_decisions_end_up_in_the_chain_and_verify() {
    let s = stack().await;
    let _gov = start_governance(s.config()).await;
    let _clarity = start_clarity(s.config()).await;
    let mut ids = Vec::new();
    for kind in ["query_knowledge", "self_improve", "modify_governance"] {
        let body = json!({"intent_type": kind, "actor": "grace_architect",
                          "mission_context": {"resilience_impact": true}});
        let (reply, code) =
            request_json(&s.client, subjects::INTENT_SUBMIT, body.to_string()).await;
        assert_eq!(code, None, "{reply}");
        ids.push(reply["intent_id"].as_str().expect("id").to_owned());
    }
    for id in &ids {
        let items = eventually(PATIENCE, "the routing narrative", || async {
            let items = s.query(json!({"intent_id": id})).await;
            (!items.is_empty()).then_some(items)
        })
        .await;
        assert_eq!(whats(&items), ["intent_routed"]);
        assert_eq!(items[0]["who"], "governance");
        assert_eq!(items[0]["audit"]["valid"], true);
    }
    let records = s.await_records(3).await;
    let mut prev = "0".repeat(64);
    for (seq, record) in &records {
        assert_eq!(record["seq"].as_u64(), Some(*seq));
        assert_eq!(record["prev_hash"].as_str(), Some(prev.as_str()), "linked");
        prev = record["hash"].as_str().expect("hash").to_owned();
    }
    let report = s.verify().await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["records"].as_u64(), Some(records.len() as u64));
    assert_eq!(report["first_bad_seq"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_filter_by_who_what_intent_flow_since_and_limit() {
    let s = stack().await;
    let _clarity = start_clarity(s.config()).await;
    let two_hours_ago = bulwark_common::time::format_ms(bulwark_common::time::now_ms() - 7_200_000);
    let sent = [
        narrative("governance", "intent_routed", "i1", &two_hours_ago, 1),
        narrative("scheduler", "task_dispatched", "i1", &now(), 2),
        narrative("governance", "vote_cast", "i2", &now(), 3),
        narrative("scheduler", "task_shed", "i2", &now(), 4),
        narrative("governance", "intent_routed", "i3", &now(), 5),
    ];
    for n in &sent {
        s.narrate(n).await;
    }
    s.await_records(sent.len()).await;

    let all = s.query(json!({})).await;
    assert_eq!(
        whats(&all),
        [
            "intent_routed",
            "task_dispatched",
            "vote_cast",
            "task_shed",
            "intent_routed"
        ],
        "everything, oldest first"
    );
    let governance = s.query(json!({"who": "governance"})).await;
    assert_eq!(
        whats(&governance),
        ["intent_routed", "vote_cast", "intent_routed"]
    );
    let routed = s.query(json!({"what": "intent_routed"})).await;
    assert_eq!(routed.len(), 2);
    let i2 = s.query(json!({"intent_id": "i2"})).await;
    assert_eq!(whats(&i2), ["vote_cast", "task_shed"]);
    let flow = s.query(json!({"correlation_id": "flow-i1"})).await;
    assert_eq!(whats(&flow), ["intent_routed", "task_dispatched"]);
    let combined = s
        .query(json!({"who": "scheduler", "intent_id": "i2"}))
        .await;
    assert_eq!(whats(&combined), ["task_shed"]);
    let recent = s.query(json!({"since": "10m"})).await;
    assert_eq!(recent.len(), 4, "the two-hour-old narrative is left out");
    let since_time = bulwark_common::time::format_ms(bulwark_common::time::now_ms() - 3_600_000);
    let recent = s
        .query(json!({"since": since_time, "who": "governance"}))
        .await;
    assert_eq!(whats(&recent), ["vote_cast", "intent_routed"]);
    let last_two = s.query(json!({"limit": 2})).await;
    assert_eq!(
        whats(&last_two),
        ["task_shed", "intent_routed"],
        "the newest, newest last"
    );
    assert_eq!(last_two[1]["context"]["n"], 5);
    let none = s.query(json!({"who": "nobody"})).await;
    assert!(none.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_parameters_get_a_400_naming_them() {
    let s = stack().await;
    let _clarity = start_clarity(s.config()).await;
    let cases = [
        (r#"{"since": "soon"}"#, "since \"soon\""),
        (r#"{"since": "10 parsecs"}"#, "is neither an RFC 3339 time"),
        (r#"{"limit": 0}"#, "limit must be between 1 and 1000"),
        (r#"{"limit": 100000}"#, "limit must be between 1 and 1000"),
        (r#"{"limit": "ten"}"#, "invalid type"),
        (r#"{"who": 3}"#, "invalid type"),
        (r#"{"whom": "x"}"#, "unknown field `whom`"),
        ("not json", "not valid JSON"),
        ("[1, 2]", "an array"),
    ];
    for (body, needle) in cases {
        let (reply, code) = request_json(&s.client, subjects::CLARITY_QUERY, body).await;
        assert_eq!(code.as_deref(), Some("400"), "{body}: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_query", "{body}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(needle), "{body}: {message}");
    }
    // The service is still there and answers good queries.
    assert!(
        s.query(json!({"since": "1h30m", "limit": 5}))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_narratives_are_stored_flagged_not_lost() {
    let s = stack().await;
    let _clarity = start_clarity(s.config()).await;
    // Raw publishes on the narrative subjects are captured by the stream like any other.
    let core = |subject: &str, body: &'static str| {
        let client = s.client.clone();
        let subject = subject.to_owned();
        async move {
            client
                .publish(subject, body.into())
                .await
                .expect("published");
            client.flush().await.expect("flushed");
        }
    };
    core("clarity.narrative.x", "this is not { json").await;
    core("clarity.narrative.y", r#"{"who": "y", "what": "half"}"#).await;
    s.narrate(&narrative("z", "fine", "i9", &now(), 9)).await;
    let records = s.await_records(3).await;
    let flagged: Vec<&Value> = records.values().filter(|r| r["valid"] == false).collect();
    assert_eq!(flagged.len(), 2, "{records:?}");
    assert_eq!(flagged[0]["narrative"], "this is not { json");
    assert!(
        flagged[0]["invalid_reason"]
            .as_str()
            .is_some_and(|r| r.contains("not valid JSON"))
    );
    assert_eq!(flagged[0]["subject"], "clarity.narrative.x");
    assert_eq!(
        flagged[1]["invalid_reason"],
        "missing required 5W1H field(s): when, where, how, why"
    );

    let items = s.query(json!({})).await;
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["raw"], "this is not { json");
    assert_eq!(items[0]["audit"]["valid"], false);
    assert_eq!(items[1]["what"], "half");
    assert_eq!(items[2]["audit"]["valid"], true);
    let (stats, _) = request_json(&s.client, "$SRV.STATS.clarity", "").await;
    let data = &stats["endpoints"][0]["data"];
    let data = if data.is_null() { &stats["data"] } else { data };
    assert_eq!(data["invalid_narratives"], 2, "{stats}");
    assert_eq!(s.verify().await["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_cannot_be_deleted_and_a_reinserted_copy_fails_verification() {
    let s = stack().await;
    let _clarity = start_clarity(s.config()).await;
    for n in 1..=5 {
        s.narrate(&narrative("governance", "intent_routed", "i", &now(), n))
            .await;
    }
    let records = s.await_records(5).await;
    assert_eq!(s.verify().await["ok"], true);

    // Tamper as the service user would: deleting record 3 is refused (deny_delete); an edited
    // copy appended to the stream is caught where it lands.
    let stream =
        s.js.get_stream(streams::AUDIT_STREAM)
            .await
            .expect("audit stream");
    assert!(
        stream.delete_message(3).await.is_err(),
        "deletes are denied"
    );
    let mut forged = records[&3].clone();
    forged["narrative"]["why"] = json!(["nothing happened here"]);
    let ack =
        s.js.publish(subjects::CLARITY_AUDIT, forged.to_string().into())
            .await
            .expect("sent")
            .await
            .expect("stored");
    let report = s.verify().await;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["first_bad_seq"], ack.sequence, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_copy_and_a_truncated_tail_fail_verification() {
    let s = stack().await;
    let _clarity = start_clarity(s.config()).await;
    for n in 1..=4 {
        s.narrate(&narrative("governance", "intent_routed", "i", &now(), n))
            .await;
    }
    let records = s.await_records(4).await;
    let last = *records.keys().last().expect("records");

    // The newest record dropped (deletes are denied, so the stream is rebuilt without it): the
    // recorded head still names it.
    let head = jetstream::new(s.client.clone())
        .get_key_value(streams::AUDIT_HEAD_BUCKET)
        .await
        .expect("head bucket");
    eventually(PATIENCE, "the head to reach the last record", || async {
        let entry = head.get("head").await.ok().flatten()?;
        let value: Value = serde_json::from_slice(&entry).ok()?;
        (value["seq"] == last).then_some(())
    })
    .await;
    s.js.delete_stream(streams::AUDIT_STREAM)
        .await
        .expect("stream deleted");
    s.js.create_stream(jetstream::stream::Config {
        name: streams::AUDIT_STREAM.into(),
        subjects: vec![subjects::CLARITY_AUDIT.into()],
        ..Default::default()
    })
    .await
    .expect("stream recreated");
    for record in records.range(..last).map(|(_, r)| r) {
        s.js.publish(subjects::CLARITY_AUDIT, record.to_string().into())
            .await
            .expect("sent")
            .await
            .expect("stored");
    }
    let report = s.verify().await;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["first_bad_seq"], last, "{report}");

    // An altered copy of record 2 appended at the end is caught where it lands.
    let mut altered = records[&2].clone();
    altered["narrative"]["what"] = json!("intent_rejected");
    let ack =
        s.js.publish(subjects::CLARITY_AUDIT, altered.to_string().into())
            .await
            .expect("sent")
            .await
            .expect("stored");
    assert_eq!(ack.sequence, last);
    let report = s.verify().await;
    assert_eq!(report["ok"], false);
    assert_eq!(
        report["first_bad_seq"], last,
        "the first break wins: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_write_one_unforked_chain_with_every_narrative_once() {
    let s = stack().await;
    let mut cfg = s.config();
    cfg.clarity.fetch_batch = 8;
    let _a = start_clarity(cfg.clone()).await;
    let _b = start_clarity(cfg).await;
    const N: u64 = 300;
    for n in 1..=N {
        s.narrate(&narrative("load", "burst", "i", &now(), n)).await;
    }
    let records = s.await_records(N as usize).await;
    let mut seen = numbers(&records);
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=N).collect::<Vec<_>>(),
        "each narrative exactly once"
    );
    let report = s.verify().await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["records"], N);

    // Both instances answer $SRV.STATS; together they stored each narrative once.
    let stats =
        bulwark_common::micro::ping_all(&s.client, Some("clarity"), Duration::from_secs(1)).await;
    assert_eq!(stats.len(), 2, "two instances registered: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clarity_stopped_or_crashed_mid_stream_loses_nothing() {
    let s = stack().await;
    let mut cfg = s.config();
    // A crashed instance's unacknowledged narratives come back after ack_wait.
    cfg.clarity.ack_wait_s = 1.0;
    cfg.clarity.duplicate_window_s = 30.0;
    let first = start_clarity(cfg.clone()).await;
    for n in 1..=40 {
        s.narrate(&narrative("flow", "step", "i", &now(), n)).await;
    }
    s.await_records(10).await;
    first.stop().await.expect("clean stop");
    for n in 41..=80 {
        s.narrate(&narrative("flow", "step", "i", &now(), n)).await;
    }
    let second = start_clarity(cfg.clone()).await;
    for n in 81..=160 {
        s.narrate(&narrative("flow", "step", "i", &now(), n)).await;
    }
    s.await_records(90).await;
    second.crash().await;
    for n in 161..=200 {
        s.narrate(&narrative("flow", "step", "i", &now(), n)).await;
    }
    let _third = start_clarity(cfg).await;
    let records = eventually(PATIENCE, "all 200 narratives in the chain", || async {
        let records = s.audit().await;
        let mut seen = numbers(&records);
        seen.sort_unstable();
        seen.dedup();
        (seen.len() == 200).then_some(records)
    })
    .await;
    assert_eq!(numbers(&records).len(), 200, "none twice");
    let report = s.verify().await;
    assert_eq!(report["ok"], true, "{report}");
    // The services' own narratives (a lease changing hands, ...) may still join the chain
    // between the read above and the verification: it covers at least what was read.
    assert!(
        report["records"].as_u64() >= Some(records.len() as u64),
        "{report} covers the {} records read",
        records.len()
    );
}
