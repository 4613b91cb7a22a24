//! Backup and restore against real nats-servers running the repository's `nats.conf`: a round
//! trip into a fresh server (intents, narratives, the audit chain verifies), corrupted and
//! truncated backups refused naming the file with nothing touched, `--latest` falling back to the
//! newest backup that verifies.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::backup::{self, BackupError};
use bulwark_common::{streams, subjects};
use bulwark_tests::*;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(30);

async fn verify_chain(client: &async_nats::Client) -> Value {
    let (reply, code) = request_json(client, subjects::CLARITY_VERIFY, "{}").await;
    assert_eq!(code, None, "verify failed: {reply}");
    reply
}

async fn stream_state(js: &jetstream::Context, name: &str) -> (u64, u64) {
    let mut stream = js.get_stream(name).await.expect("stream exists");
    let info = stream.info().await.expect("info");
    (info.state.messages, info.state.last_sequence)
}

/// A server with governance and clarity that took `n` intents and `n` narratives; returns it,
/// the intent ids and the number of audit records.
async fn loaded_server(n: usize) -> (NatsServer, Vec<String>, u64) {
    init_logging();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let gov = start_governance(server.config()).await;
    let clarity = start_clarity(server.config()).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let body = json!({"intent_type": "query_knowledge", "actor": "backup_test",
                          "intent_id": format!("backup-{i}"), "payload": {"i": i}});
        let (reply, code) = request_json(&client, subjects::INTENT_SUBMIT, body.to_string()).await;
        assert_eq!(code, None, "{reply}");
        ids.push(reply["intent_id"].as_str().expect("id").to_owned());
        let narrative = json!({"who": "backup_test", "what": "loaded", "when": bulwark_common::time::now(),
            "where": "test", "why": ["load"], "how": "test", "context": {"i": i}});
        js.publish(
            subjects::narrative("backup_test"),
            narrative.to_string().into(),
        )
        .await
        .expect("sent")
        .await
        .expect("stored");
    }
    // Every narrative (ours and governance's) is in the chain before the backup.
    let records = eventually(PATIENCE, "the chain to catch up", || async {
        let (narratives, _) = stream_state(&js, streams::NARRATIVES_STREAM).await;
        let report = verify_chain(&client).await;
        let records = report["records"].as_u64().unwrap_or(0);
        (report["ok"] == true && records >= narratives && records >= 2 * n as u64)
            .then_some(records)
    })
    .await;
    gov.stop().await.expect("governance stops");
    clarity.stop().await.expect("clarity stops");
    (server, ids, records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_into_a_fresh_server_keeps_intents_narratives_and_the_chain() {
    let (source, ids, records) = loaded_server(20).await;
    let source_js = jetstream::new(source.client().await);
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, manifest) = backup::backup(&source.client().await, root.path())
        .await
        .expect("backup");
    for name in [
        streams::AUDIT_STREAM,
        streams::NARRATIVES_STREAM,
        "KV_bulwark_intents",
        "KV_bulwark_audit_head",
    ] {
        let entry = manifest
            .stream(name)
            .unwrap_or_else(|| panic!("{name} backed up"));
        assert_eq!(
            (entry.messages, entry.last_seq),
            stream_state(&source_js, name).await,
            "{name} manifest figures"
        );
    }
    assert_eq!(
        manifest.stream(streams::AUDIT_STREAM).map(|e| e.messages),
        Some(records)
    );
    backup::verify(&dir).expect("fresh backup verifies");

    let target = NatsServer::start();
    let client = target.client().await;
    let restored = backup::restore(&client, &dir, false)
        .await
        .expect("restore");
    assert_eq!(restored.len(), manifest.streams.len());
    // Taken from a quiet system, the restored figures are exactly the manifest's.
    for r in &restored {
        assert_eq!(
            (r.messages, r.last_seq),
            (r.manifest_messages, r.manifest_last_seq),
            "{}",
            r.stream
        );
    }
    let js = jetstream::new(client.clone());
    for entry in &manifest.streams {
        assert_eq!(
            stream_state(&js, &entry.stream).await,
            (entry.messages, entry.last_seq),
            "{} restored",
            entry.stream
        );
    }
    // Services on the restored server see the same state: the chain verifies whole, and
    // every intent is known with its decision.
    // The clarity key lives outside JetStream (a backup does not carry it): the restored
    // chain verifies with the key that signed it (docs/backup.md).
    let mut restored_cfg = target.config();
    restored_cfg.clarity.key_file = source.config().clarity.key_file;
    let _clarity = start_clarity(restored_cfg).await;
    let _gov = start_governance(target.config()).await;
    let report = verify_chain(&client).await;
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["records"].as_u64().unwrap_or(0) >= records,
        "{report}"
    );
    for id in &ids {
        let (reply, code) = request_json(
            &client,
            subjects::INTENT_STATUS,
            json!({ "intent_id": id }).to_string(),
        )
        .await;
        assert_eq!(code, None, "{id}: {reply}");
        assert_eq!(reply["intent_id"], id.as_str());
    }
    // Restoring over existing streams is refused without replace, and works with it.
    let err = backup::restore(&client, &dir, false)
        .await
        .expect_err("existing streams refused");
    assert!(err.to_string().contains("--replace"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

fn corrupt_byte(path: &Path) {
    let mut data = std::fs::read(path).expect("read");
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(path, data).expect("write");
}

fn truncate(path: &Path) {
    let data = std::fs::read(path).expect("read");
    std::fs::write(path, &data[..data.len() / 2]).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_and_truncated_backups_are_refused_naming_the_file() {
    let (source, _, _) = loaded_server(5).await;
    let root = tempfile::tempdir().expect("tempdir");
    let (good, _) = backup::backup(&source.client().await, root.path())
        .await
        .expect("backup");
    let audit_file = format!("{}.snap", streams::AUDIT_STREAM);
    let corrupted = root.path().join("corrupted");
    copy_dir(&good, &corrupted);
    corrupt_byte(&corrupted.join(&audit_file));
    let truncated = root.path().join("truncated");
    copy_dir(&good, &truncated);
    truncate(&truncated.join("KV_bulwark_intents.snap"));
    let no_manifest = root.path().join("no_manifest");
    copy_dir(&good, &no_manifest);
    std::fs::remove_file(no_manifest.join(backup::MANIFEST_FILE)).expect("rm");

    let target = NatsServer::start();
    let client = target.client().await;
    let js = jetstream::new(client.clone());
    for (dir, file, why) in [
        (&corrupted, audit_file.as_str(), "SHA-256"),
        (&truncated, "KV_bulwark_intents.snap", "truncated"),
        (&no_manifest, backup::MANIFEST_FILE, "cannot read"),
    ] {
        let err = backup::restore(&client, dir, false)
            .await
            .expect_err("a bad backup is refused");
        match &err {
            BackupError::Corrupt {
                file: f, reason, ..
            } => {
                assert_eq!(f, file, "{err}");
                assert!(reason.contains(why), "{err}");
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        // Nothing was touched.
        assert!(
            backup::bulwark_streams(&js)
                .await
                .expect("names")
                .is_empty(),
            "a refused restore created streams"
        );
    }
    // The intact one restores.
    backup::restore(&client, &good, false)
        .await
        .expect("the good backup restores");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_falls_back_to_the_newest_backup_that_verifies() {
    let (source, _, _) = loaded_server(3).await;
    let client = source.client().await;
    let root = tempfile::tempdir().expect("tempdir");
    let (oldest, _) = backup::backup(&client, root.path())
        .await
        .expect("backup 1");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (good, _) = backup::backup(&client, root.path())
        .await
        .expect("backup 2");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (bad, _) = backup::backup(&client, root.path())
        .await
        .expect("backup 3");
    assert_eq!(
        backup::list(root.path()).expect("list"),
        vec![bad.clone(), good.clone(), oldest]
    );
    let (picked, _, skipped) = backup::latest_good(root.path()).expect("all good");
    assert_eq!(picked, bad);
    assert!(skipped.is_empty());

    truncate(&bad.join(format!("{}.snap", streams::NARRATIVES_STREAM)));
    let (picked, _, skipped) = backup::latest_good(root.path()).expect("one good left");
    assert_eq!(picked, good, "fell back past the truncated one");
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0].to_string().contains("BULWARK_NARRATIVES.snap"),
        "{}",
        skipped[0]
    );

    let target = NatsServer::start();
    backup::restore(&target.client().await, &picked, false)
        .await
        .expect("the fallback restores");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_an_older_backup_is_detected_as_a_rollback_and_refused() {
    let (server, _, _) = loaded_server(3).await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let root = tempfile::tempdir().expect("tempdir");
    let (older, manifest) = backup::backup(&client, root.path()).await.expect("backup");
    // The system moves on after the backup.
    for i in 0..5 {
        js.publish(
            subjects::narrative("backup_test"),
            json!({"who": "backup_test", "what": "later", "n": i})
                .to_string()
                .into(),
        )
        .await
        .expect("sent")
        .await
        .expect("stored");
    }
    let (_, now_last) = stream_state(&js, streams::NARRATIVES_STREAM).await;
    let then_last = manifest
        .stream(streams::NARRATIVES_STREAM)
        .expect("in the backup")
        .last_seq;
    assert!(now_last > then_last);
    let err = backup::restore(&client, &older, true)
        .await
        .expect_err("a rollback is refused");
    match &err {
        BackupError::Rollback(streams) => {
            let expected = format!(
                "{} from sequence {now_last} to {then_last}",
                streams::NARRATIVES_STREAM
            );
            assert!(streams.contains(&expected), "{err}");
        }
        other => panic!("expected Rollback, got {other}"),
    }
    // Nothing was touched.
    assert_eq!(
        stream_state(&js, streams::NARRATIVES_STREAM).await.1,
        now_last
    );
    // Accepted explicitly, the streams go back to the backup's sequences.
    backup::restore_with(&client, &older, true, true)
        .await
        .expect("an accepted rollback restores");
    assert_eq!(
        stream_state(&js, streams::NARRATIVES_STREAM).await.1,
        then_last
    );
}

/// Submits `id` (a low-risk query that governance queues at once) and checks it was queued.
async fn submit_queued(client: &async_nats::Client, id: &str) {
    let body = json!({"intent_id": id, "intent_type": "query_knowledge", "actor": "rollback_test",
                      "priority": 5, "payload": {}, "mission_context": {"learning_impact": true}});
    let (reply, code) = request_json(client, subjects::INTENT_SUBMIT, body.to_string()).await;
    assert_eq!(
        (code, reply["status"].as_str()),
        (None, Some("queued")),
        "{reply}"
    );
}

async fn intent_status(kv: &jetstream::kv::Store, id: &str) -> Option<String> {
    let bytes = kv.get(id).await.ok().flatten()?;
    let record: Value = serde_json::from_slice(&bytes).ok()?;
    record["status"].as_str().map(str::to_owned)
}

async fn wait_all_completed(kv: &jetstream::kv::Store, ids: &[String]) {
    for id in ids {
        eventually(PATIENCE, &format!("{id} completed"), || async {
            (intent_status(kv, id).await.as_deref() == Some("completed")).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_rollback_is_reconciled_no_intent_runs_twice_and_none_is_lost() {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.worker.heartbeat_interval_s = 0.2;
    cfg.scheduler.heartbeat_timeout_s = 3.0;
    cfg.scheduler.check_interval_s = 0.2;
    cfg.scheduler.ack_wait_s = 3.0;
    cfg.scheduler.min_workers = 1;
    cfg.replicas.lease_ttl_s = 2.0;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let runs = Runs::default();
    let gov = start_governance(cfg.clone()).await;
    let sched = start_scheduler(cfg.clone()).await;
    let _worker = start_counting_worker(&cfg, "rw-1", &runs, 5).await;
    let ids = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}-{i}")).collect::<Vec<_>>();
    let (before, after, waiting) = (ids("before", 10), ids("after", 10), ids("waiting", 5));

    // "before": queued (the scheduler paused) when the backup is taken, run afterwards.
    request_json(&client, subjects::SCHEDULER_PAUSE, "{}").await;
    for id in &before {
        submit_queued(&client, id).await;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let (old, _) = backup::backup(&client, root.path()).await.expect("backup");
    request_json(&client, subjects::SCHEDULER_RESUME, "{}").await;
    let kv = js
        .get_key_value(streams::INTENTS_BUCKET)
        .await
        .expect("intents");
    wait_all_completed(&kv, &before).await;
    // "after": submitted and run after the backup; "waiting": acknowledged, not run yet.
    for id in &after {
        submit_queued(&client, id).await;
    }
    wait_all_completed(&kv, &after).await;
    request_json(&client, subjects::SCHEDULER_PAUSE, "{}").await;
    for id in &waiting {
        submit_queued(&client, id).await;
    }

    // The operator stops bulwark and restores the old backup, accepting the rollback.
    sched.stop().await.expect("scheduler stops");
    gov.stop().await.expect("governance stops");
    let refused = backup::restore(&client, &old, true)
        .await
        .expect_err("a rollback is refused by default");
    assert!(matches!(refused, BackupError::Rollback(_)), "{refused}");
    let outcome = backup::restore_with(&client, &old, true, true)
        .await
        .expect("rollback accepted");
    assert!(
        outcome
            .regressions
            .iter()
            .any(|r| r.starts_with("KV_bulwark_intents")),
        "{:?}",
        outcome.regressions
    );
    let r = outcome
        .reconciliation
        .expect("the intent records were reconciled");
    assert_eq!(
        (r.examined, r.carried_forward, r.finished_kept, r.requeued),
        (25, 25, 20, 5),
        "{r:?}"
    );

    // Bulwark comes back: everything acknowledged completes, and nothing ran twice.
    let kv = js
        .get_key_value(streams::INTENTS_BUCKET)
        .await
        .expect("intents");
    let _gov = start_governance(cfg.clone()).await;
    let _sched = start_scheduler(cfg.clone()).await;
    let all: Vec<String> = [&before[..], &after[..], &waiting[..]].concat();
    wait_all_completed(&kv, &all).await;
    // The restored queue still held the "before" tasks: give the scheduler time to take them
    // (they are dropped, their intents having completed) before counting.
    eventually(PATIENCE, "the task queue to drain", || async {
        let (messages, _) = stream_state(&js, streams::TASKS_STREAM).await;
        (messages == 0).then_some(())
    })
    .await;
    let counted = runs.snapshot();
    for id in &all {
        assert_eq!(
            counted.get(id),
            Some(&1),
            "{id} ran exactly once: {counted:?}"
        );
    }
}
