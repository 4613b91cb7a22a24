//! Workers bound to identities (issue 16, item 6), against a real nats-server running the
//! repository's `nats.conf`. A foreign client (`tests/clients/worker_attack.py`, nats-py) holding
//! the shared `worker` credential attacks; bulwark's own workers run as workers too:
//! - it cannot see the services' JetStream deliveries nor acknowledge or terminate them;
//! - an inflated capacity claim is clamped to `scheduler.max_worker_capacity`;
//! - it cannot heartbeat or report under a worker id bound to another user (`worker_b`): the real
//!   worker's task runs once, with its own result;
//! - a micro service it registers (`governance`) is not seen inside bulwark's account.
//! - a worker id stays bound across a scheduler restart (the registry keeps the binding).
//!
//! The legitimate Python worker is `tests/htm.rs` `a_worker_written_in_python_completes_tasks`.

use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::BulwarkConfig;
use bulwark_common::intent::IntentRecord;
use bulwark_common::{streams, subjects};
use bulwark_tests::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

const LIMIT: Duration = Duration::from_secs(30);

/// Test timings: fast heartbeats and sweeps, short redelivery.
fn config(server: &NatsServer) -> BulwarkConfig {
    let mut cfg = server.config();
    cfg.worker.heartbeat_interval_s = 0.2;
    cfg.worker.report_retry_s = 30.0;
    cfg.scheduler.heartbeat_timeout_s = 2.0;
    cfg.scheduler.check_interval_s = 0.2;
    cfg.scheduler.ack_wait_s = 3.0;
    cfg.scheduler.dispatch_timeout_ms = 1_000;
    cfg
}

/// A nats-server, governance and the scheduler, and a service client.
struct Stack {
    server: NatsServer,
    cfg: BulwarkConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    _services: Vec<RunningService>,
}

async fn stack(edit: impl FnOnce(&mut BulwarkConfig)) -> Stack {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = config(&server);
    edit(&mut cfg);
    let services = vec![
        start_governance(cfg.clone()).await,
        start_scheduler(cfg.clone()).await,
    ];
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    Stack {
        server,
        cfg,
        client,
        js,
        _services: services,
    }
}

impl Stack {
    async fn submit(&self, id: &str, payload: Value) {
        let body = json!({"intent_id": id, "intent_type": "query_knowledge", "actor": "tester",
                          "priority": 5, "payload": payload, "mission_context": {"learning_impact": true}});
        let (reply, code) =
            request_json(&self.client, subjects::INTENT_SUBMIT, body.to_string()).await;
        assert_eq!(code, None, "{reply}");
    }

    async fn record(&self, id: &str) -> Option<IntentRecord> {
        let kv = self
            .js
            .get_key_value(streams::INTENTS_BUCKET)
            .await
            .expect("bucket");
        let entry = kv.get(id).await.expect("read")?;
        Some(serde_json::from_slice(&entry).expect("record"))
    }

    async fn wait_status(&self, id: &str, want: &str) -> IntentRecord {
        eventually(LIMIT, &format!("{id} {want}"), || async {
            self.record(id).await.filter(|r| r.status.as_str() == want)
        })
        .await
    }

    async fn wait_workers(&self, n: u64) {
        eventually(LIMIT, &format!("{n} healthy worker(s)"), || async {
            let (r, _) = request_json(&self.client, subjects::HTM_READINESS, "{}").await;
            (r["healthy_workers"].as_u64() >= Some(n)).then_some(())
        })
        .await;
    }

    async fn scheduler_counters(&self) -> Value {
        let (stats, _) = request_json(&self.client, "$SRV.STATS.scheduler", "").await;
        stats["endpoints"][0]["data"].clone()
    }

    /// Narratives of the scheduler whose `what` is `what`.
    async fn narratives(&self, what: &str) -> Vec<Value> {
        let stream = self
            .js
            .get_stream(streams::NARRATIVES_STREAM)
            .await
            .expect("narratives");
        let last = stream.get_info().await.expect("info").state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(raw) = stream.get_raw_message(seq).await
                && let Ok(n) = serde_json::from_slice::<Value>(&raw.payload)
                && n["what"] == what
            {
                out.push(n);
            }
        }
        out
    }
}

/// The Python attacker: started, set up (its `ready` line read), stopped (a line on stdin), and
/// its final report read.
struct Attacker {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Attacker {
    async fn start(server: &NatsServer, args: &[&str]) -> Self {
        let root = repo_root();
        let mut child = tokio::process::Command::new("python3")
            .arg(root.join("tests/clients/worker_attack.py"))
            .arg(server.url())
            .args(args)
            .env("PYTHONPATH", root.join(".tools/py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().expect("stdout");
        let mut attacker = Attacker {
            child,
            lines: BufReader::new(stdout).lines(),
        };
        let ready = attacker.line().await;
        assert_eq!(ready["ready"], true, "{ready}");
        attacker
    }

    async fn line(&mut self) -> Value {
        let line = tokio::time::timeout(LIMIT, self.lines.next_line())
            .await
            .expect("the attacker speaks in time")
            .expect("stdout readable")
            .expect("a line before the attacker exits");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("attacker line {line:?}: {e}"))
    }

    /// Tells it to stop (modes that wait for stdin) and returns its report.
    async fn finish(mut self) -> Value {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"stop\n").await;
        }
        let report = self.line().await;
        let status = tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .expect("the attacker exits")
            .expect("status");
        assert!(status.success(), "attacker exited with {status}: {report}");
        report
    }
}

fn worker_of(r: &IntentRecord) -> Option<&str> {
    r.assignment.as_ref().map(|a| a.worker_id.as_str())
}

/// The attacker's server errors, one per line, lower case (nats-py lower-cases them).
fn errors_of(report: &Value) -> String {
    report["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
        .to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_can_neither_see_nor_ack_or_terminate_the_services_deliveries() {
    let s = stack(|_| {}).await;
    let _honest = start_worker(s.cfg.clone(), "honest").await;
    s.wait_workers(1).await;
    let attacker = Attacker::start(&s.server, &["term"]).await;
    for i in 0..3 {
        s.submit(&format!("kept-{i}"), json!({"work_ms": 300}))
            .await;
    }
    for i in 0..3 {
        let r = s.wait_status(&format!("kept-{i}"), "completed").await;
        assert_eq!(worker_of(&r), Some("honest"));
    }
    let report = attacker.finish().await;
    assert_eq!(
        report["deliveries"], 0,
        "the worker saw no delivery: {report}"
    );
    assert_eq!(report["terminated"], 0, "{report}");
    let errors = errors_of(&report);
    assert!(
        errors.contains("permissions violation for subscription to \"_inbox.>\""),
        "subscribing to the services' inboxes is refused: {report}"
    );
    assert!(
        errors.contains("permissions violation for publish to \"$js.ack."),
        "an acknowledgement is refused: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inflated_capacity_claim_is_clamped_and_does_not_draw_every_task() {
    // Bound 2: the liar claiming 4e9 slots is handed at most 2 tasks at once.
    let s = stack(|c| {
        c.scheduler.max_worker_capacity = 2;
        c.worker.capacity = 2;
    })
    .await;
    let _honest = start_worker(s.cfg.clone(), "honest").await;
    let liar = Attacker::start(&s.server, &["liar", "liar", "4000000000"]).await;
    s.wait_workers(2).await;
    let total = 8;
    for i in 0..total {
        s.submit(&format!("load-{i}"), json!({"work_ms": 100}))
            .await;
    }
    // The liar hoards what it gets (it never reports): everything else completes on the
    // honest worker.
    let mut hoarded = Vec::new();
    for i in 0..total {
        let id = format!("load-{i}");
        let r = eventually(
            LIMIT,
            &format!("{id} completed or held by the liar"),
            || async {
                let r = s.record(&id).await?;
                let held = worker_of(&r) == Some("liar") && r.status.as_str() != "queued";
                (r.status.as_str() == "completed" || held).then_some(r)
            },
        )
        .await;
        if r.status.as_str() == "completed" {
            assert_eq!(worker_of(&r), Some("honest"), "{id}");
        } else {
            hoarded.push(id);
        }
    }
    assert!(
        hoarded.len() <= 2,
        "the liar holds at most its clamped capacity: {hoarded:?}"
    );
    let counters = s.scheduler_counters().await;
    assert!(
        counters["capacity_clamped"].as_u64() >= Some(1),
        "{counters}"
    );
    let narrated = s.narratives("capacity_clamped").await;
    assert!(
        narrated
            .iter()
            .any(|n| n["context"]["worker_id"] == "liar"
                && n["context"]["claimed"] == 4_000_000_000u64),
        "{narrated:?}"
    );
    let report = liar.finish().await;
    assert!(
        report["assignments"]
            .as_array()
            .is_some_and(|a| a.len() <= 2),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_worker_id_is_refused_and_the_real_workers_task_runs_once() {
    let s = stack(|_| {}).await;
    // The real worker_b, with a credential of its own.
    let mut cfg_b = s.cfg.clone();
    cfg_b.nats.worker_user = "worker_b".into();
    cfg_b.nats.worker_password = "worker_b-dev".into();
    let runs = Runs::default();
    let _real = start_counting_worker(&cfg_b, "worker_b", &runs, 1_500).await;
    s.wait_workers(1).await;
    s.submit("guarded", json!({})).await;
    s.wait_status("guarded", "running").await;

    // The shared `worker` user heartbeats as worker_b under a new run (a "restart" that would
    // have the task reassigned and run again) and reports it completed with a forged result.
    let thief = Attacker::start(&s.server, &["steal", "worker_b", "guarded", "10"]).await;
    let report = thief.finish().await;
    assert_eq!(
        report["report_code"], "403",
        "the forged report is refused: {report}"
    );
    assert!(
        report["report"].to_string().contains("not_your_worker"),
        "{report}"
    );

    let done = s.wait_status("guarded", "completed").await;
    assert_eq!(
        done.result,
        Some(json!({"worker": "worker_b"})),
        "the real result"
    );
    assert_eq!(
        done.assignment.as_ref().map(|a| a.fence),
        Some(1),
        "never reassigned"
    );
    assert_eq!(runs.snapshot().get("guarded"), Some(&1), "ran once");
    // Ten heartbeats and one report refused.
    eventually(LIMIT, "11 impostor refusals counted", || async {
        let counters = s.scheduler_counters().await;
        (counters["impostors"].as_u64() >= Some(11)).then_some(())
    })
    .await;
    let narrated = s.narratives("worker_impostor_refused").await;
    assert!(
        narrated
            .iter()
            .any(|n| n["context"]["worker_id"] == "worker_b"
                && n["context"]["user"] == "worker"
                && n["context"]["owner"] == "worker_b"),
        "{narrated:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_micro_service_registered_by_a_worker_is_not_seen_inside_bulwark() {
    let s = stack(|_| {}).await;
    let impostor = Attacker::start(&s.server, &["srv", "governance"]).await;
    // The impostor is live where workers are: a worker's ping finds it.
    let (worker, _) = bulwark_common::connect::connect(
        &s.cfg.nats,
        "ping-as-worker",
        bulwark_common::connect::Role::Worker,
    )
    .await
    .expect("a worker connects");
    let window = Duration::from_millis(500);
    let seen = eventually(LIMIT, "the impostor answers inside WORKERS", || async {
        let answers = bulwark_common::micro::ping_all(&worker, Some("governance"), window).await;
        answers
            .iter()
            .any(|a| a["id"] == "IMPOSTOR")
            .then_some(answers)
    })
    .await;
    assert!(!seen.is_empty());
    // Inside bulwark's account (where the watchdog pings) only the real governance answers.
    let answers = bulwark_common::micro::ping_all(&s.client, Some("governance"), window).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers.iter().all(|a| a["id"] != "IMPOSTOR"), "{answers:?}");
    let all = bulwark_common::micro::ping_all(&s.client, None, window).await;
    assert!(all.iter().all(|a| a["id"] != "IMPOSTOR"), "{all:?}");
    let report = impostor.finish().await;
    assert!(report["pings_answered"].as_u64() >= Some(1), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_survives_a_scheduler_restart() {
    init_logging();
    let server = NatsServer::start();
    let cfg = config(&server);
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let first = start_scheduler(cfg.clone()).await;
    let mut cfg_b = cfg.clone();
    cfg_b.nats.worker_user = "worker_b".into();
    cfg_b.nats.worker_password = "worker_b-dev".into();
    let real = start_worker(cfg_b, "worker_b").await;
    let registry = js
        .get_key_value(bulwark_scheduler::registry::WORKERS_BUCKET)
        .await
        .expect("worker registry");
    eventually(LIMIT, "worker_b bound in the registry", || async {
        let entry = registry.get("worker_b").await.ok().flatten()?;
        let s: bulwark_scheduler::registry::Sighting = serde_json::from_slice(&entry).ok()?;
        (s.user.as_deref() == Some("worker_b")).then_some(())
    })
    .await;
    // Nobody heartbeats as worker_b while the next scheduler starts: only the registry knows.
    real.stop().await.expect("worker stops");
    first.stop().await.expect("scheduler stops");
    let _second = start_scheduler(cfg.clone()).await;
    let thief = Attacker::start(&server, &["steal", "worker_b", "nothing", "5"]).await;
    let report = thief.finish().await;
    assert_eq!(report["report_code"], "403", "{report}");
    eventually(LIMIT, "the thief's heartbeats refused", || async {
        let (stats, _) = request_json(&client, "$SRV.STATS.scheduler", "").await;
        (stats["endpoints"][0]["data"]["impostors"].as_u64() >= Some(6)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_grow_the_pool_with_ever_new_worker_ids() {
    let stack = stack(|cfg| cfg.scheduler.max_worker_ids_per_user = 5).await;
    let attacker = Attacker::start(&stack.server, &["many-ids", "ghost", "40"]).await;
    let report = attacker.finish().await;
    assert_eq!(report["sent"], 40, "{report}");

    let counters = eventually(LIMIT, "the new ids refused", || async {
        let c = stack.scheduler_counters().await;
        (c["worker_ids_refused"].as_u64() >= Some(35)).then_some(c)
    })
    .await;
    assert_eq!(counters["worker_ids_refused"], 35, "{counters}");
    // The pool took five of them; a refusal is narrated once for the user.
    let (readiness, _) = request_json(&stack.client, subjects::HTM_READINESS, "{}").await;
    assert!(
        readiness["healthy_workers"].as_u64() <= Some(5),
        "{readiness}"
    );
    let refused = stack.narratives("worker_id_refused").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["context"]["user"], "worker");
    // Once its five workers are gone (heartbeat timeout), their ids make room: a pool restarted
    // under new ids keeps working, and the user still holds at most five.
    eventually(LIMIT, "the five declared dead", || async {
        let c = stack.scheduler_counters().await;
        (c["dead_workers"].as_u64() >= Some(5)).then_some(())
    })
    .await;
    let again = Attacker::start(&stack.server, &["many-ids", "restarted", "5"]).await;
    again.finish().await;
    stack.wait_workers(5).await;
    assert_eq!(
        stack.scheduler_counters().await["worker_ids_refused"],
        35,
        "the new ids of a restarted pool are taken once the old ones are gone"
    );
}
