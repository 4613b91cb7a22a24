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
    assert!(out.status.success());
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
    bulwark(s, &["vote", "cli-3", "approve", "--voter", "guardian"]);
    let out = bulwark(s, &["vote", "cli-3", "approve", "--voter", "steward"]);
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
