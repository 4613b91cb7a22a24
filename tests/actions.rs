//! Operator-defined actions end to end, against a real nats-server, a local HTTP receiver this
//! test starts, and real processes: an approved intent reaches the receiver once with exactly
//! its allowed params; a failing receiver is retried with growing delays; a hanging one times
//! out; the last failure dead-letters the task with every attempt's error; an exec action's
//! output and exit code land in the result; 100 MB of output stays bounded; a timed-out process
//! group is killed; a forbidden param is refused at intake (a foreign client's attack).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::BulwarkConfig;
use bulwark_common::action::{ActionConfig, RetryConfig, Runner};
use bulwark_common::config::IntentTypeConfig;
use bulwark_common::schedule::ScheduleConfig;
use bulwark_common::subjects;
use bulwark_tests::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---- a local HTTP receiver --------------------------------------------------------------------

/// What the receiver answers to one request.
#[derive(Clone)]
enum Reply {
    /// This status, with this body.
    Status(u16, &'static str),
    /// Never answers (the connection stays open until the client drops it).
    Hang,
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
struct Seen {
    at: tokio::time::Instant,
    method: String,
    path: String,
    body: Value,
}

/// A tiny HTTP/1.1 responder on a random loopback port: it answers requests in order from a
/// script (the last reply repeats) and records each request.
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(script: Vec<Reply>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, record, script).await;
                });
            }
        });
        Receiver { port, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    record: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
    record.lock().expect("lock").push(Seen {
        at: tokio::time::Instant::now(),
        method,
        path,
        body,
    });
    let reply = {
        let mut script = script.lock().expect("lock");
        if script.len() > 1 {
            script.pop_front()
        } else {
            script.front().cloned()
        }
    };
    match reply.unwrap_or(Reply::Status(200, "ok")) {
        Reply::Hang => {
            // Hold the connection until the client gives up.
            let _ = stream.read(&mut chunk).await;
        }
        Reply::Status(code, text) => {
            let response = format!(
                "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await?;
        }
    }
    Ok(())
}

// ---- the stack ------------------------------------------------------------------------------------

fn http_action(url: String, params: &[&str]) -> ActionConfig {
    ActionConfig {
        runner: Runner::Http,
        method: "POST".into(),
        url,
        headers: Default::default(),
        command: Vec::new(),
        params: params.iter().map(|s| (*s).to_owned()).collect(),
        flag_params: Vec::new(),
        timeout_ms: 5_000,
        retry: RetryConfig::default(),
        max_output_bytes: 1024,
    }
}

fn exec_action(command: &[&str], params: &[&str]) -> ActionConfig {
    ActionConfig {
        runner: Runner::Exec,
        url: String::new(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        ..http_action(String::new(), params)
    }
}

struct Stack {
    server: NatsServer,
    cfg: BulwarkConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    _services: Vec<RunningService>,
}

/// Governance, the scheduler and a worker pool of one worker, with `actions` (each an approved
/// tier 2 type).
async fn stack(actions: Vec<(&str, ActionConfig)>) -> Stack {
    stack_with(actions, |_| {}).await
}

/// [`stack`], with `edit` applied to the configuration last.
async fn stack_with(
    actions: Vec<(&str, ActionConfig)>,
    edit: impl FnOnce(&mut BulwarkConfig),
) -> Stack {
    init_logging();
    let server = NatsServer::start();
    let mut cfg: BulwarkConfig = server.config();
    cfg.worker.heartbeat_interval_s = 0.2;
    cfg.scheduler.heartbeat_timeout_s = 5.0;
    cfg.scheduler.check_interval_s = 0.2;
    cfg.scheduler.min_workers = 1;
    for (name, action) in actions {
        cfg.governance.intent_types.insert(
            name.to_owned(),
            IntentTypeConfig {
                tier: 2,
                base_alignment: 0.8,
                max_work_ms: None,
            },
        );
        cfg.actions.insert(name.to_owned(), action);
    }
    edit(&mut cfg);
    cfg.validate().expect("the test's actions are valid");
    let gov = start_governance(cfg.clone()).await;
    let sched = start_scheduler(cfg.clone()).await;
    let pool = start_pool(cfg.clone(), &["act-1"]).await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    Stack {
        server,
        cfg,
        client,
        js,
        _services: vec![gov, sched, pool],
    }
}

async fn submit(
    client: &async_nats::Client,
    id: &str,
    kind: &str,
    payload: Value,
) -> (Value, Option<String>) {
    let body = json!({"intent_id": id, "intent_type": kind, "actor": "tester", "payload": payload,
                      "mission_context": {"resilience_impact": true}});
    request_json(client, subjects::INTENT_SUBMIT, body.to_string()).await
}

/// Waits until intent `id` is completed or failed; its status reply.
async fn finished(client: &async_nats::Client, id: &str) -> Value {
    eventually(Duration::from_secs(60), "the intent to finish", || async {
        let (st, _) = request_json(
            client,
            subjects::INTENT_STATUS,
            json!({ "intent_id": id }).to_string(),
        )
        .await;
        matches!(st["status"].as_str(), Some("completed" | "failed")).then_some(st)
    })
    .await
}

// ---- http ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_approved_webhook_intent_reaches_the_receiver_once_with_exactly_its_params() {
    let receiver = Receiver::start(vec![Reply::Status(200, "received")]).await;
    let url = format!("http://127.0.0.1:{}/hook/{{channel}}", receiver.port);
    let s = stack(vec![(
        "notify_webhook",
        http_action(url, &["channel", "message", "severity"]),
    )])
    .await;
    let payload = json!({"channel": "ops", "message": "disk full on db-1", "severity": "high"});
    let (decision, code) = submit(&s.client, "hook-1", "notify_webhook", payload.clone()).await;
    assert_eq!(code, None, "{decision}");
    let st = finished(&s.client, "hook-1").await;
    assert_eq!(st["status"], "completed", "{st}");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "one request: {seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("POST", "/hook/ops")
    );
    assert_eq!(seen[0].body, payload, "exactly the allowed params, as JSON");
    let result = &st["result"];
    assert_eq!(
        (
            result["status"].as_u64(),
            result["body_excerpt"].as_str(),
            result["attempts"].as_u64()
        ),
        (Some(200), Some("received"), Some(1)),
        "{result}"
    );
}

#[tokio::test]
async fn a_receiver_failing_twice_sees_three_attempts_with_growing_delays() {
    let receiver = Receiver::start(vec![
        Reply::Status(503, "busy"),
        Reply::Status(500, "broken"),
        Reply::Status(200, "ok"),
    ])
    .await;
    let mut action = http_action(
        format!("http://127.0.0.1:{}/hook", receiver.port),
        &["message"],
    );
    action.retry = RetryConfig {
        max_attempts: 3,
        backoff_ms: 200,
        max_backoff_ms: 5_000,
    };
    let s = stack(vec![("notify_webhook", action)]).await;
    submit(
        &s.client,
        "hook-2",
        "notify_webhook",
        json!({"message": "m"}),
    )
    .await;
    let st = finished(&s.client, "hook-2").await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["result"]["attempts"], 3, "{st}");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    // Each retry is narrated with its reason and the next delay; the delays grow.
    let retries: Vec<Value> = eventually(Duration::from_secs(10), "two retry narratives", || {
        let js = s.js.clone();
        async move {
            let n: Vec<Value> = stored_narratives(&js, "actions")
                .await
                .into_iter()
                .filter(|n| n["what"] == "action_retry" && n["intent_id"] == "hook-2")
                .collect();
            (n.len() == 2).then_some(n)
        }
    })
    .await;
    let delays: Vec<u64> = retries
        .iter()
        .map(|n| n["context"]["next_delay_ms"].as_u64().expect("delay"))
        .collect();
    assert_eq!(delays, vec![200, 400], "{retries:?}");
    assert!(
        retries[0]["why"][0]
            .as_str()
            .is_some_and(|w| w.contains("answered 503")),
        "{retries:?}"
    );
    // The receiver saw the attempts in order, each at least its delay after the previous one.
    for (i, delay) in delays.iter().enumerate() {
        let gap = seen[i + 1].at - seen[i].at;
        assert!(
            gap >= Duration::from_millis(*delay),
            "attempt {} came {gap:?} after attempt {}, before its {delay} ms delay",
            i + 2,
            i + 1
        );
    }
}

#[tokio::test]
async fn a_hanging_receiver_times_out_and_the_last_failure_dead_letters_every_attempt() {
    let receiver = Receiver::start(vec![Reply::Hang]).await;
    let mut action = http_action(
        format!("http://127.0.0.1:{}/hook", receiver.port),
        &["message"],
    );
    action.timeout_ms = 300;
    action.retry = RetryConfig {
        max_attempts: 2,
        backoff_ms: 50,
        max_backoff_ms: 50,
    };
    let s = stack(vec![("notify_webhook", action)]).await;
    submit(
        &s.client,
        "hook-3",
        "notify_webhook",
        json!({"message": "m"}),
    )
    .await;
    let st = finished(&s.client, "hook-3").await;
    assert_eq!(st["status"], "failed", "{st}");
    let error = st["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("attempt 1: no complete response within timeout_ms = 300")
            && error.contains("attempt 2: no complete response within timeout_ms = 300"),
        "{error}"
    );
    assert_eq!(receiver.seen().len(), 2);
    // The dead-letter record keeps the error of every attempt.
    let dead =
        s.js.get_stream(bulwark_common::streams::TASKS_DEAD_STREAM)
            .await
            .expect("dead stream")
            .get_last_raw_message_by_subject(subjects::TASK_DEAD)
            .await
            .expect("a dead letter");
    let dead: Value = serde_json::from_slice(&dead.payload).expect("json");
    assert_eq!(dead["task"]["task_id"], "hook-3");
    assert!(
        dead["error"]
            .as_str()
            .is_some_and(|e| e.contains("attempt 2:")),
        "{dead}"
    );
}

// ---- exec ---------------------------------------------------------------------------------------

#[tokio::test]
async fn exec_output_and_exit_code_land_in_the_result_and_output_is_bounded() {
    let s = stack(vec![
        (
            "say",
            exec_action(
                &[
                    "/bin/sh",
                    "-c",
                    "echo \"out:$1\"; echo \"err:$1\" >&2",
                    "sh",
                    "{word}",
                ],
                &["word"],
            ),
        ),
        (
            "exit_three",
            exec_action(&["/bin/sh", "-c", "echo broken >&2; exit 3"], &[]),
        ),
        (
            "flood",
            exec_action(&["/bin/sh", "-c", "yes | head -c 104857600"], &[]),
        ),
        ("missing", exec_action(&["/nonexistent/program"], &[])),
        (
            "binary",
            exec_action(&["/bin/sh", "-c", "printf 'a\\377\\376b'"], &[]),
        ),
    ])
    .await;
    // One argument, whatever it holds: no shell ever parses it.
    let word = "a b; rm -rf / $(id) `id`";
    submit(&s.client, "say-1", "say", json!({ "word": word })).await;
    submit(&s.client, "exit-1", "exit_three", json!({})).await;
    submit(&s.client, "flood-1", "flood", json!({})).await;
    submit(&s.client, "missing-1", "missing", json!({})).await;
    submit(&s.client, "binary-1", "binary", json!({})).await;

    let st = finished(&s.client, "say-1").await;
    assert_eq!(st["status"], "completed", "{st}");
    let r = &st["result"];
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(r["stdout"], format!("out:{word}\n"), "{r}");
    assert_eq!(r["stderr"], format!("err:{word}\n"), "{r}");

    let st = finished(&s.client, "exit-1").await;
    assert_eq!(st["status"], "failed", "{st}");
    let error = st["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("exited with 3") && error.contains("broken"),
        "{error}"
    );

    let st = finished(&s.client, "flood-1").await;
    assert_eq!(st["status"], "completed", "{st}");
    let r = &st["result"];
    assert_eq!(r["stdout_bytes"], 104_857_600u64, "every byte counted");
    assert_eq!(
        r["stdout"].as_str().map(str::len),
        Some(1024),
        "only max_output_bytes kept"
    );
    assert_eq!(r["truncated"], true);

    // Output that is not UTF-8 is kept with replacement characters, its bytes counted.
    let st = finished(&s.client, "binary-1").await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["result"]["stdout"], "a\u{fffd}\u{fffd}b", "{st}");
    assert_eq!(st["result"]["stdout_bytes"], 4, "{st}");

    let st = finished(&s.client, "missing-1").await;
    assert_eq!(st["status"], "failed", "{st}");
    let error = st["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("could not start \"/nonexistent/program\""),
        "{error}"
    );
}

/// The pids a shell wrote to `file`, one a line.
fn pids(file: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether process `pid` still runs (a zombie waiting for its reaper does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_timed_out_exec_action_has_its_process_group_killed() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("pids");
    let mut action = exec_action(
        &[
            "/bin/sh",
            "-c",
            "echo $$ > \"$1\"; sleep 300 & echo $! >> \"$1\"; wait",
            "sh",
            "{pidfile}",
        ],
        &["pidfile"],
    );
    action.timeout_ms = 3_000;
    let s = stack(vec![("long_job", action)]).await;
    submit(
        &s.client,
        "long-1",
        "long_job",
        json!({"pidfile": file.display().to_string()}),
    )
    .await;
    let st = finished(&s.client, "long-1").await;
    assert_eq!(st["status"], "failed", "{st}");
    assert!(
        st["error"]
            .as_str()
            .is_some_and(|e| e.contains("process group killed")),
        "{st}"
    );
    let pids = pids(&file);
    assert_eq!(pids.len(), 2, "the shell and its sleep: {pids:?}");
    eventually(Duration::from_secs(10), "the whole group gone", || async {
        pids.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;
}

// ---- the attack ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_forbidden_param_is_refused_at_intake() {
    let receiver = Receiver::start(vec![Reply::Status(200, "ok")]).await;
    let s = stack(vec![
        (
            "notify_webhook",
            http_action(
                format!("http://127.0.0.1:{}/hook/{{channel}}", receiver.port),
                &["channel", "message"],
            ),
        ),
        ("list_dir", exec_action(&["/bin/ls", "{path}"], &["path"])),
    ])
    .await;
    let url = s.server.url();
    let out = python_client("action_attack.py", &[&url], &[]).await;
    for case in [
        "unlisted_param",
        "host_change",
        "path_escape",
        "exec_flag",
        "not_a_scalar",
    ] {
        assert_eq!(
            (out[case]["code"].as_str(), out[case]["header"].as_str()),
            (Some("param_not_allowed"), Some("400")),
            "{case}: {out}"
        );
    }
    // No refused intent was recorded; the same agent's allowed intent runs, and it is the only
    // request the receiver ever sees.
    let (st, code) = request_json(
        &s.client,
        subjects::INTENT_STATUS,
        json!({"intent_id": "attack-unlisted_param"}).to_string(),
    )
    .await;
    assert_eq!(code.as_deref(), Some("404"), "{st}");
    assert_eq!(out["allowed"]["approved"], true, "{out}");
    let st = finished(&s.client, "attack-allowed").await;
    assert_eq!(st["status"], "completed", "{st}");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].body, json!({"channel": "ops", "message": "fine"}));
}

// ---- cancellation -------------------------------------------------------------------------------

async fn cancel(client: &async_nats::Client, id: &str) -> (Value, Option<String>) {
    request_json(
        client,
        subjects::INTENT_CANCEL,
        json!({"intent_id": id, "reason": "test"}).to_string(),
    )
    .await
}

async fn status_of(client: &async_nats::Client, id: &str) -> Value {
    request_json(
        client,
        subjects::INTENT_STATUS,
        json!({ "intent_id": id }).to_string(),
    )
    .await
    .0
}

#[tokio::test]
async fn a_running_exec_action_is_cancelled_and_its_processes_are_gone() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("pids");
    let mut action = exec_action(
        &[
            "/bin/sh",
            "-c",
            "echo $$ > \"$1\"; sleep 300 & echo $! >> \"$1\"; wait",
            "sh",
            "{pidfile}",
        ],
        &["pidfile"],
    );
    action.timeout_ms = 600_000;
    let s = stack(vec![("long_job", action)]).await;
    let operator = s.server.client_as(OPERATOR_USER).await;
    submit(
        &s.client,
        "long-2",
        "long_job",
        json!({"pidfile": file.display().to_string()}),
    )
    .await;
    let started = eventually(Duration::from_secs(30), "the job running", || async {
        let st = status_of(&s.client, "long-2").await;
        (st["status"] == "running" && pids(&file).len() == 2).then_some(pids(&file))
    })
    .await;
    let (reply, code) = cancel(&operator, "long-2").await;
    assert_eq!(code, None, "{reply}");
    assert_eq!(
        (
            reply["status"].as_str(),
            reply["previous_status"].as_str(),
            reply["worker_told"].as_bool()
        ),
        (Some("cancelled"), Some("running"), Some(true)),
        "{reply}"
    );
    eventually(Duration::from_secs(10), "the whole group gone", || async {
        started.iter().all(|p| !alive(*p)).then_some(())
    })
    .await;
    let st = status_of(&s.client, "long-2").await;
    assert_eq!(st["status"], "cancelled", "{st}");
    let last = st["history"]
        .as_array()
        .and_then(|h| h.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (last["status"].as_str(), last["reason"].as_str()),
        (Some("cancelled"), Some("cancelled by operator: test")),
        "{st}"
    );
    // Cancelling it again: it is finished.
    let (reply, code) = cancel(&operator, "long-2").await;
    assert_eq!(
        (code.as_deref(), reply["error"]["code"].as_str()),
        (Some("409"), Some("already_finished")),
        "{reply}"
    );
}

#[tokio::test]
async fn a_cancelled_queued_task_never_runs_and_only_its_submitter_or_an_operator_may_cancel() {
    let receiver = Receiver::start(vec![Reply::Status(200, "ok")]).await;
    let s = stack(vec![(
        "notify_webhook",
        http_action(
            format!("http://127.0.0.1:{}/hook", receiver.port),
            &["message"],
        ),
    )])
    .await;
    let operator = s.server.client_as(OPERATOR_USER).await;
    let agent = s.server.client_as(AGENT_USER).await;
    let (paused, code) = request_json(&operator, subjects::SCHEDULER_PAUSE, "{}").await;
    assert_eq!(code, None, "{paused}");
    // One intent of bulwark's own (no submitter identity), one of the agent's.
    submit(
        &s.client,
        "mine",
        "notify_webhook",
        json!({"message": "service"}),
    )
    .await;
    let (decision, code) = submit(
        &agent,
        "theirs",
        "notify_webhook",
        json!({"message": "agent"}),
    )
    .await;
    assert_eq!(
        (code, decision["status"].as_str()),
        (None, Some("queued")),
        "{decision}"
    );

    let (reply, code) = cancel(&agent, "mine").await;
    assert_eq!(
        (code.as_deref(), reply["error"]["code"].as_str()),
        (Some("403"), Some("not_your_intent")),
        "an agent cancels only its own: {reply}"
    );
    let (reply, code) = cancel(&agent, "theirs").await;
    assert_eq!(
        (code, reply["previous_status"].as_str()),
        (None, Some("queued")),
        "{reply}"
    );
    let (reply, code) = cancel(&operator, "mine").await;
    assert_eq!(
        (code, reply["status"].as_str()),
        (None, Some("cancelled")),
        "{reply}"
    );
    let (reply, code) = cancel(&agent, "nobody").await;
    assert_eq!(code.as_deref(), Some("404"), "{reply}");
    // An intent waiting for a person: cancelled, its review item gone, a late approval refused.
    let (decision, _) = submit(&s.client, "waiting", "modify_governance", json!({})).await;
    assert_eq!(decision["status"], "pending_review", "{decision}");
    let (reply, code) = cancel(&operator, "waiting").await;
    assert_eq!(
        (code, reply["previous_status"].as_str()),
        (None, Some("pending_review")),
        "{reply}"
    );
    let (pending, _) = request_json(&operator, subjects::REVIEW_PENDING, "{}").await;
    assert!(
        !pending.to_string().contains("\"waiting\""),
        "the review item is gone: {pending}"
    );
    let (reply, code) = request_json(
        &operator,
        subjects::REVIEW_DECIDE,
        json!({"intent_id": "waiting", "decision": "approve", "reviewer": "operator", "reason": "late"})
            .to_string(),
    )
    .await;
    assert!(code.is_some(), "a late approval is refused: {reply}");
    assert_eq!(status_of(&s.client, "waiting").await["status"], "cancelled");

    // Resumed, the queue is taken in order: the cancelled tasks come first and are dropped; the
    // next intent is the only one the receiver ever sees.
    request_json(&operator, subjects::SCHEDULER_RESUME, "{}").await;
    submit(
        &s.client,
        "after",
        "notify_webhook",
        json!({"message": "after"}),
    )
    .await;
    let st = finished(&s.client, "after").await;
    assert_eq!(st["status"], "completed", "{st}");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].body, json!({"message": "after"}));
    for id in ["mine", "theirs"] {
        assert_eq!(status_of(&s.client, id).await["status"], "cancelled");
    }
    let (reply, code) = cancel(&operator, "after").await;
    assert_eq!(
        (code.as_deref(), reply["error"]["code"].as_str()),
        (Some("409"), Some("already_finished")),
        "{reply}"
    );
}

// ---- the Python worker SDK ----------------------------------------------------------------------

#[tokio::test]
async fn the_python_sdk_worker_completes_fails_and_is_cancelled_under_the_protocol() {
    use tokio::io::AsyncBufReadExt;
    init_logging();
    let server = NatsServer::start();
    let mut cfg: BulwarkConfig = server.config();
    cfg.scheduler.heartbeat_timeout_s = 5.0;
    cfg.scheduler.check_interval_s = 0.2;
    cfg.scheduler.min_workers = 1;
    let _gov = start_governance(cfg.clone()).await;
    let _sched = start_scheduler(cfg.clone()).await;
    let client = server.client().await;
    let operator = server.client_as(OPERATOR_USER).await;

    let root = repo_root();
    let python_path = format!(
        "{}:{}",
        root.join(".tools/py").display(),
        root.join("clients/python").display()
    );
    let mut child = tokio::process::Command::new("python3")
        .arg(root.join("tests/clients/sdk_worker.py"))
        .args([server.url().as_str(), "py-sdk-1"])
        .env("PYTHONPATH", python_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the worker starts")
        .expect("read");
    assert_eq!(first.as_deref(), Some(r#"{"ready": "py-sdk-1"}"#));

    submit(&client, "py-echo", "query_knowledge", json!({"echo": "hi"})).await;
    submit(&client, "py-fail", "deploy_model", json!({})).await;
    submit(
        &client,
        "py-long",
        "execute_sandbox",
        json!({"sleep_s": 300}),
    )
    .await;

    let st = finished(&client, "py-echo").await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(
        (
            st["result"]["handled_by"].as_str(),
            st["result"]["echo"].as_str()
        ),
        (Some("py-sdk-1"), Some("hi")),
        "{st}"
    );
    let st = finished(&client, "py-fail").await;
    assert_eq!(st["status"], "failed", "{st}");
    assert!(
        st["error"]
            .as_str()
            .is_some_and(|e| e.contains("models are not deployed from here")),
        "{st}"
    );
    assert_eq!(
        st["attempts"], 1,
        "a permanent failure is not retried: {st}"
    );

    eventually(Duration::from_secs(30), "the long job running", || async {
        (status_of(&client, "py-long").await["status"] == "running").then_some(())
    })
    .await;
    let (reply, code) = cancel(&operator, "py-long").await;
    assert_eq!(code, None, "{reply}");
    assert_eq!(reply["worker_told"], true, "{reply}");
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the handler is cancelled")
        .expect("read");
    assert_eq!(line.as_deref(), Some(r#"{"cancelled": "py-long"}"#));

    drop(child.stdin.take());
    let last = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the worker stops")
        .expect("read")
        .unwrap_or_default();
    let counts: Value = serde_json::from_str(&last).expect("counts");
    assert_eq!(
        counts,
        json!({"completed": 1, "failed": 1, "cancelled": ["py-long"]}),
        "the cancelled task's report was refused, not counted"
    );
    assert_eq!(status_of(&client, "py-long").await["status"], "cancelled");
}

// ---- delays -------------------------------------------------------------------------------------

#[tokio::test]
async fn a_delayed_intent_does_not_run_early_and_bad_delays_are_refused() {
    let receiver = Receiver::start(vec![Reply::Status(200, "ok")]).await;
    let s = stack(vec![(
        "notify_webhook",
        http_action(
            format!("http://127.0.0.1:{}/hook", receiver.port),
            &["message"],
        ),
    )])
    .await;
    let at = |offset_ms: i64| {
        bulwark_common::time::format_ms(bulwark_common::time::now_ms() + offset_ms)
    };
    let submit_at = |id: &'static str, not_before: Value| {
        let client = s.client.clone();
        async move {
            let body = json!({"intent_id": id, "intent_type": "notify_webhook", "actor": "tester",
                              "payload": {"message": id}, "not_before": not_before,
                              "mission_context": {"resilience_impact": true}});
            request_json(&client, subjects::INTENT_SUBMIT, body.to_string()).await
        }
    };
    for (id, bad) in [
        ("past", json!(at(-3_600_000))),
        ("far", json!(at(400 * 86_400_000))),
        ("garbage", json!("tomorrow")),
        ("number", json!(12)),
    ] {
        let (reply, code) = submit_at(id, bad).await;
        assert_eq!(
            (code.as_deref(), reply["error"]["code"].as_str()),
            (Some("400"), Some("invalid_intent")),
            "{id}: {reply}"
        );
    }
    let not_before = at(2_000);
    let (decision, code) = submit_at("later", json!(not_before)).await;
    assert_eq!(code, None, "{decision}");
    let (decision, code) = submit_at("now", Value::Null).await;
    assert_eq!(code, None, "{decision}");
    let st = finished(&s.client, "now").await;
    assert_eq!(st["status"], "completed", "{st}");
    let st = finished(&s.client, "later").await;
    assert_eq!(st["status"], "completed", "{st}");
    let dispatched = st["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["status"] == "dispatched"))
        .and_then(|e| e["at"].as_str())
        .and_then(bulwark_common::time::parse_ms)
        .expect("a dispatch in the history");
    let due = bulwark_common::time::parse_ms(&not_before).expect("time");
    assert!(
        dispatched >= due,
        "dispatched at {dispatched}, before its not_before {due}: {st}"
    );
    let mut seen: Vec<String> = receiver
        .seen()
        .into_iter()
        .map(|r| r.body["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, vec!["later", "now"], "each ran once");
}

// ---- schedules ----------------------------------------------------------------------------------

fn schedule(cron: &str, intent_type: &str, payload: Value, missed: &str) -> ScheduleConfig {
    serde_json::from_value(
        json!({"cron": cron, "intent_type": intent_type, "actor": "ops_schedule",
        "payload": payload, "missed": missed, "mission_context": {"resilience_impact": true}}),
    )
    .expect("schedule")
}

#[tokio::test]
async fn a_schedule_fires_on_its_times_through_the_intake_and_a_missed_run_runs_once() {
    let receiver = Receiver::start(vec![Reply::Status(200, "ok")]).await;
    let s = stack_with(
        vec![(
            "notify_webhook",
            http_action(
                format!("http://127.0.0.1:{}/hook", receiver.port),
                &["message"],
            ),
        )],
        |cfg| {
            let tick = schedule(
                "*/2 * * * * *",
                "notify_webhook",
                json!({"message": "tick"}),
                "skip",
            );
            let yearly = schedule(
                "0 0 1 1 *",
                "notify_webhook",
                json!({"message": "yearly"}),
                "run_once",
            );
            let yearly_skip = schedule(
                "0 0 1 1 *",
                "notify_webhook",
                json!({"message": "skipped"}),
                "skip",
            );
            // A run the intake refuses (a param the action does not list) is narrated, not lost.
            let refused = schedule(
                "*/2 * * * * *",
                "notify_webhook",
                json!({"url": "http://evil"}),
                "skip",
            );
            // Finished records kept for ever: a missed run of last new year's day is provably
            // missed (with a 7-day retention its record could have expired: no catch-up then).
            cfg.nats.storage.finished_intent_retention_s = 0.0;
            cfg.schedules.insert("tick".into(), tick);
            cfg.schedules.insert("yearly".into(), yearly);
            cfg.schedules.insert("yearly_skip".into(), yearly_skip);
            cfg.schedules.insert("refused".into(), refused);
        },
    )
    .await;
    // The missed yearly run ran once at start, under the id of its time.
    let last_new_year = bulwark_common::cron::Cron::parse("0 0 1 1 *")
        .expect("cron")
        .prev_at_or_before(jiff::Timestamp::now())
        .expect("a new year");
    let yearly_id = ScheduleConfig::intent_id("yearly", last_new_year);
    let st = finished(&s.client, &yearly_id).await;
    assert_eq!(st["status"], "completed", "{st}");
    // Two ticks, each submitted at or after its time, as its actor, through the intake.
    let ticks: Vec<Value> = eventually(Duration::from_secs(30), "two ticks", || {
        let js = s.js.clone();
        async move {
            let fired: Vec<Value> = stored_narratives(&js, "governance")
                .await
                .into_iter()
                .filter(|n| n["what"] == "schedule_fired" && n["context"]["schedule"] == "tick")
                .collect();
            (fired.len() >= 2).then_some(fired)
        }
    })
    .await;
    for n in &ticks[..2] {
        let id = n["intent_id"].as_str().expect("intent id");
        let slot_s: i64 = id
            .rsplit('-')
            .next()
            .and_then(|t| t.parse().ok())
            .expect("slot");
        assert_eq!(slot_s % 2, 0, "{id}");
        let st = finished(&s.client, id).await;
        assert_eq!(st["status"], "completed", "{st}");
        let submitted = st["history"][0]["at"]
            .as_str()
            .and_then(bulwark_common::time::parse_ms)
            .expect("submitted at");
        assert!(
            submitted >= slot_s * 1000,
            "{id} submitted before its time: {st}"
        );
        let (record, _) = request_json(
            &s.client,
            subjects::INTENT_STATUS,
            json!({"intent_id": id}).to_string(),
        )
        .await;
        assert_eq!(record["intent_type"], "notify_webhook");
    }
    let refused = eventually(Duration::from_secs(30), "a refused run narrated", || {
        let js = s.js.clone();
        async move {
            stored_narratives(&js, "governance")
                .await
                .into_iter()
                .find(|n| n["what"] == "schedule_failed" && n["context"]["schedule"] == "refused")
        }
    })
    .await;
    assert_eq!(refused["context"]["code"], "param_not_allowed", "{refused}");
    // The skipped yearly run never ran: only ticks and the yearly run reached the receiver.
    let bodies: Vec<String> = receiver
        .seen()
        .into_iter()
        .map(|r| r.body["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        bodies.iter().all(|m| m == "tick" || m == "yearly"),
        "{bodies:?}"
    );
    assert_eq!(
        bodies.iter().filter(|m| *m == "yearly").count(),
        1,
        "{bodies:?}"
    );
    let (_, code) = request_json(
        &s.client,
        subjects::INTENT_STATUS,
        json!({"intent_id": ScheduleConfig::intent_id("yearly_skip", last_new_year)}).to_string(),
    )
    .await;
    assert_eq!(code.as_deref(), Some("404"));
}

// ---- playbooks ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_playbook_runs_a_named_operator_action_and_nothing_else() {
    let receiver = Receiver::start(vec![Reply::Status(200, "paged")]).await;
    let dir = tempfile::tempdir().expect("tmp");
    let meta = |name: &str| {
        format!(
            "fn playbook() {{ #{{ name: \"{name}\", triggers: [\"event.incident\"], slo_s: 30, steps: [\"act\"] }} }}\n"
        )
    };
    std::fs::write(
        dir.path().join("page_oncall.rhai"),
        meta("page_oncall")
            + r#"
fn act(p) {
    let d = run_action("notify_webhook", #{ message: "db-1 is down" });
    let done = verify(100, 0.1, || { let s = intent_status(d.intent_id); s.status == "completed" });
    #{ intent_id: d.intent_id, done: done }
}
"#,
    )
    .expect("write");
    std::fs::write(
        dir.path().join("sneaky.rhai"),
        meta("sneaky") + "fn act(p) { run_action(\"query_knowledge\", #{ echo: 1 }) }\n",
    )
    .expect("write");
    let s = stack_with(
        vec![(
            "notify_webhook",
            http_action(
                format!("http://127.0.0.1:{}/hook", receiver.port),
                &["message"],
            ),
        )],
        |cfg| cfg.playbooks.dir = dir.path().display().to_string(),
    )
    .await;
    let _playbooks = start_playbooks(s.cfg.clone()).await;
    let (outcome, code) = request_json(
        &s.client,
        subjects::PLAYBOOK_RUN,
        json!({"playbook": "page_oncall", "wait": true}).to_string(),
    )
    .await;
    assert_eq!(code, None, "{outcome}");
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(outcome["params"]["done"], true, "{outcome}");
    let id = outcome["params"]["intent_id"].as_str().expect("intent id");
    let st = status_of(&s.client, id).await;
    assert_eq!(st["result"]["body_excerpt"], "paged", "{st}");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].body, json!({"message": "db-1 is down"}));
    // The run's audit lists the action it took.
    assert!(
        outcome["actions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["function"] == "run_action")),
        "{outcome}"
    );

    let (outcome, code) = request_json(
        &s.client,
        subjects::PLAYBOOK_RUN,
        json!({"playbook": "sneaky", "wait": true}).to_string(),
    )
    .await;
    assert_eq!(code, None, "{outcome}");
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert!(
        outcome["error"]
            .as_str()
            .is_some_and(|e| e.contains("no operator action named \"query_knowledge\"")),
        "{outcome}"
    );
}
