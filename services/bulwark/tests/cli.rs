//! The `bulwark` binary against a real nats-server: the commands a person types, their output
//! and their exit codes (0 ok, 1 failure, 2 usage error).

use std::process::Output;

use bulwark_tests::{NatsServer, start_governance};
use serde_json::Value;

fn bulwark(server: Option<&NatsServer>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"));
    cmd.args(args)
        .env_remove("BULWARK_CONFIG")
        .current_dir(std::env::temp_dir());
    match server {
        Some(s) => cmd.env("BULWARK_NATS_URL", s.url()),
        None => cmd.env("BULWARK_NATS_URL", "nats://127.0.0.1:1"),
    };
    cmd.output().expect("bulwark runs")
}

/// `bulwark` as another NATS user (the CLI's `nats.cli_user`), e.g. a reviewer or voter.
fn bulwark_as(
    server: Option<&NatsServer>,
    (user, password): (&str, &str),
    args: &[&str],
) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"));
    cmd.args(args)
        .env_remove("BULWARK_CONFIG")
        .env("BULWARK_NATS__CLI_USER", user)
        .env("BULWARK_NATS__CLI_PASSWORD", password)
        .current_dir(std::env::temp_dir());
    match server {
        Some(s) => cmd.env("BULWARK_NATS_URL", s.url()),
        None => cmd.env("BULWARK_NATS_URL", "nats://127.0.0.1:1"),
    };
    cmd.output().expect("bulwark runs")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_reviews_and_votes_from_the_shell() {
    let server = NatsServer::start();
    let _gov = start_governance(server.config()).await;
    let s = Some(&server);

    let out = bulwark(
        s,
        &[
            "intent",
            "submit",
            "query_knowledge",
            "--actor",
            "me",
            "--id",
            "cli-1",
            "--priority",
            "7",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision = stdout_json(&out);
    assert_eq!(
        (decision["status"].as_str(), decision["priority"].as_u64()),
        (Some("queued"), Some(7))
    );
    let out = bulwark(s, &["intent", "status", "cli-1"]);
    assert_eq!(stdout_json(&out)["status"], "queued");

    let out = bulwark(s, &["intent", "submit", "change_charter", "--id", "cli-2"]);
    assert_eq!(stdout_json(&out)["status"], "pending_review");
    let out = bulwark(s, &["review", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("cli-2") && table.contains("approval"),
        "{table}"
    );
    // The operator submitted cli-2: it may not review it, by any name.
    let out = bulwark(
        s,
        &[
            "review",
            "approve",
            "cli-2",
            "--reviewer",
            "alice",
            "--reason",
            "fine",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("own_intent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A reviewer with credentials of its own may.
    let out = bulwark_as(
        s,
        ("architect", "architect-dev"),
        &["review", "approve", "cli-2", "--reason", "fine"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_json(&out)["status"], "queued");

    let out = bulwark(
        s,
        &[
            "intent",
            "submit",
            "self_improve",
            "--actor",
            "bot",
            "--id",
            "cli-3",
            "--impact",
            "resilience",
        ],
    );
    assert_eq!(stdout_json(&out)["mission_alignment"], 0.9);
    // The operator submitted cli-3: it may not vote on it under any voter's name.
    let out = bulwark(s, &["vote", "cli-3", "approve", "--voter", "guardian"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("self_vote"));
    bulwark_as(
        s,
        ("guardian", "guardian-dev"),
        &["vote", "cli-3", "approve"],
    );
    let out = bulwark_as(s, ("steward", "steward-dev"), &["vote", "cli-3", "approve"]);
    assert_eq!(stdout_json(&out)["state"], "approved");
    assert_eq!(
        stdout_json(&bulwark(s, &["intent", "status", "cli-3"]))["status"],
        "queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_the_right_exit_code() {
    let server = NatsServer::start();
    let _gov = start_governance(server.config()).await;
    let s = Some(&server);
    let out = bulwark(
        s,
        &["intent", "submit", "query_knowledge", "--priority", "12"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "bulwark: invalid_intent: priority must be an integer from 0 to 9, got 12"
    );
    let out = bulwark(s, &["vote", "nope", "approve", "--voter", "guardian"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_proposal"));
    let out = bulwark(s, &["intent", "submit", "x", "--payload", "{not json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payload is not valid JSON"));
    // Usage errors exit 2.
    assert_eq!(bulwark(s, &["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        bulwark(s, &["vote", "x", "maybe", "--voter", "v"])
            .status
            .code(),
        Some(2)
    );
    // No server: one clear line, exit 1, no panic.
    let out = bulwark(None, &["intent", "status", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach NATS at nats://127.0.0.1:1"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn a_bad_config_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("b.toml");
    std::fs::write(&file, "[governance]\ndefault_tier = 9\n").expect("write");
    let out = bulwark(
        None,
        &[
            "--config",
            file.to_str().expect("utf8"),
            "intent",
            "status",
            "x",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("governance.default_tier must be 0-4"));
    let out = bulwark(
        None,
        &["--config", "/nonexistent.toml", "intent", "status", "x"],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_its_own_nats_server_serves_and_stops_cleanly() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("tmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // The repository's nats.conf with the store and monitoring port moved out of the way.
    let conf =
        std::fs::read_to_string(bulwark_tests::repo_root().join("nats.conf")).expect("nats.conf");
    let conf: String = conf
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("store_dir:") {
                format!(
                    "  store_dir: {:?}",
                    dir.path().join("js").display().to_string()
                )
            } else if t.starts_with("http:") {
                "http: 127.0.0.1:-1".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("nats.conf"), conf).expect("write conf");
    std::fs::write(
        dir.path().join("bulwark.toml"),
        "[up]\nnats_conf = \"nats.conf\"\n[console]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let url = format!("nats://127.0.0.1:{port}");
    let mut up = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["up", "--nats-url", &url])
        .env_remove("BULWARK_CONFIG")
        .env("BULWARK_LOG", "warn")
        .env("PATH", path_with_nats_server())
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bulwark up starts");
    let mut stderr = up.stderr.take().expect("stderr");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let mut lines = tokio::io::BufReader::new(up.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        seen.push(line.clone());
        if line.contains("bulwark: up on") {
            break;
        }
    }
    let transcript = seen.join("\n");
    assert!(
        transcript.contains("starting") && transcript.contains("nats-server"),
        "{transcript}"
    );
    assert!(transcript.contains("ready  governance"), "{transcript}");
    assert!(transcript.contains("ready  notify"), "{transcript}");
    assert!(
        transcript.contains("console  http://127.0.0.1:"),
        "the console's address is printed: {transcript}"
    );
    assert!(
        transcript.contains(&format!("bulwark: up on {url}")),
        "{transcript}"
    );

    // Right after `up`, nothing reports itself critical: a service the watchdog has not yet
    // seen answer is `starting`, and the watchdog sweeps every second until all have.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["status", "--json", "--nats-url", &url])
        .current_dir(dir.path())
        .output()
        .await
        .expect("status runs");
    let report = stdout_json(&out);
    let critical: Vec<&String> = report["components"]
        .as_object()
        .map(|c| {
            c.iter()
                .filter(|(_, v)| v["health"] == "critical")
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default();
    assert!(critical.is_empty(), "critical right after up: {report:#}");

    // It serves: an intent submitted from the shell is decided.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["intent", "submit", "schedule_task", "--nats-url", &url])
        .current_dir(dir.path())
        .output()
        .await
        .expect("submit runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_json(&out)["status"], "queued");

    // The notify service answers the operator's delivery log (no webhook configured: empty).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["notify", "log", "--json", "--nats-url", &url])
        .current_dir(dir.path())
        .output()
        .await
        .expect("notify log runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = stdout_json(&out);
    assert_eq!(log["deliveries"], serde_json::json!([]), "{log}");
    assert_eq!(log["counters"]["webhooks"], 0, "{log}");

    // SIGTERM: clean stop, exit 0, and the nats-server it started is gone.
    let pid = up.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), up.wait())
        .await
        .expect("stops")
        .expect("status");
    while let Ok(Some(line)) = lines.next_line().await {
        seen.push(line);
    }
    let errors = errors.await.unwrap_or_default();
    assert!(
        status.success(),
        "exit {status:?}: {}\nstderr:\n{errors}",
        seen.join("\n")
    );
    assert!(seen.iter().any(|l| l == "bulwark: stopped"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the nats-server it started was stopped"
    );
}

/// PATH with the directory of the nats-server the harness uses in front.
fn path_with_nats_server() -> String {
    let server = bulwark_tests::nats_server_binary().expect("nats-server");
    let dir = server
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    format!("{dir}:{}", std::env::var("PATH").unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_the_watchdog_report_and_exits_1_unless_healthy() {
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.watchdog.check_interval_s = 0.3;
    cfg.watchdog.ping_timeout_ms = 100;
    // The watchdog alone: the required services do not answer, so Layer 2 is critical once
    // the watchdog's startup grace (two check intervals, 0.6 s) is over; until then they are
    // `starting`.
    let _watchdog = bulwark_tests::start_watchdog(cfg).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let s = Some(&server);
    let out = bulwark(s, &["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = stdout_json(&out);
    assert_eq!(report["overall_health"], "critical", "{report:#}");
    assert_eq!(report["all_ready"], false);
    assert!(report["components"]["scheduler"].is_object(), "{report:#}");
    let out = bulwark(s, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("Layer 2: CRITICAL, NOT all ready"),
        "{table}"
    );
    assert!(table.contains("heartbeat_missing"), "{table}");
    assert!(!table.contains('\x1b'), "no colour off a terminal: {table}");
    // Nothing answers: one line on stderr, exit 1.
    let out = bulwark(None, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[test]
fn playbook_check_passes_on_the_shipped_ones_and_names_file_line_and_column_of_errors() {
    let dir = bulwark_tests::repo_root().join("playbooks");
    let out = bulwark(
        None,
        &["playbook", "check", "--dir", &dir.display().to_string()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("6 playbook(s) compile"), "{text}");
    assert!(text.contains("trigger_storm_mitigation"), "{text}");

    let bad = tempfile::tempdir().expect("tmp");
    std::fs::write(
        bad.path().join("broken.rhai"),
        "fn playbook() { #{ name: \"broken\", steps: [\"s\"] } }\nfn s(p) {\n    let = 3;\n}\n",
    )
    .expect("written");
    let out = bulwark(
        None,
        &[
            "playbook",
            "check",
            "--dir",
            &bad.path().display().to_string(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("broken.rhai:3:"), "file:line:column: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playbook_run_dry_run_prints_the_actions_and_list_shows_the_last_run() {
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.playbooks.time_scale = 0.05;
    let _scheduler = bulwark_tests::start_scheduler(cfg.clone()).await;
    let _playbooks = bulwark_tests::start_playbooks(cfg).await;
    let s = Some(&server);

    let out = bulwark(
        s,
        &[
            "playbook",
            "run",
            "scheduler_load_shedding",
            "--dry-run",
            "--param",
            "target_depth=0",
            "--param",
            "older_than_s=0",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("would call shed_tasks("), "{text}");
    assert!(text.contains("read queue_depth("), "{text}");
    assert!(text.contains("action(s) would be taken"), "{text}");

    // A real run, followed step by step; it fails (no pool answers) and says why.
    let out = bulwark(
        s,
        &[
            "playbook",
            "run",
            "htm_worker_recovery",
            "--param",
            "worker_id=w-9",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("step 1 Inspect the pool: FAILED"), "{text}");
    assert!(
        text.contains("htm.pool.status"),
        "the reason names the request: {text}"
    );

    let out = bulwark(s, &["playbook", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("htm_worker_recovery"))
        .unwrap_or_else(|| panic!("a row: {text}"));
    assert!(row.contains("failed"), "{row}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("trigger_storm_mitigation") && l.contains("never")),
        "{text}"
    );

    let out = bulwark(s, &["playbook", "run", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown playbook") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_an_intent_and_list_schedules_from_the_shell() {
    let server = NatsServer::start();
    let _gov = start_governance(server.config()).await;
    let s = Some(&server);
    let out = bulwark(s, &["intent", "submit", "query_knowledge", "--id", "cli-c"]);
    assert_eq!(stdout_json(&out)["status"], "queued");
    let out = bulwark(s, &["intent", "cancel", "cli-c", "--reason", "not needed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = stdout_json(&out);
    assert_eq!(
        (reply["status"].as_str(), reply["previous_status"].as_str()),
        (Some("cancelled"), Some("queued"))
    );
    let out = bulwark(s, &["intent", "cancel", "cli-c"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already_finished"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("bulwark.toml");
    std::fs::write(
        &file,
        "[schedules.nightly]\ncron = \"0 3 * * *\"\nintent_type = \"query_knowledge\"\nactor = \"ops\"\n",
    )
    .expect("write");
    let config = file.display().to_string();
    let out = bulwark(
        None,
        &[
            "--config",
            &config,
            "schedules",
            "list",
            "--json",
            "--next",
            "2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = stdout_json(&out);
    assert_eq!(list[0]["name"], "nightly", "{list}");
    let next = list[0]["next"].as_array().expect("next runs");
    assert_eq!(next.len(), 2, "{list}");
    assert!(
        next.iter()
            .all(|t| t.as_str().is_some_and(|t| t.ends_with("T03:00:00.000Z"))),
        "{list}"
    );
    std::fs::write(
        &file,
        "[schedules.nightly]\ncron = \"0 3 * *\"\nintent_type = \"x\"\nactor = \"ops\"\n",
    )
    .expect("write");
    let out = bulwark(None, &["--config", &config, "schedules", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("schedules.nightly.cron"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
