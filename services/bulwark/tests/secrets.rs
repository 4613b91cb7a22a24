//! Secrets stay secret: the `bulwark` binary, given passwords in the environment and in the URL,
//! never prints them, logs them (even at debug level) or stores them in a narrative, whether it
//! succeeds or fails (docs/security.md).

use std::process::Stdio;
use std::time::Duration;

use bulwark_common::{streams, subjects};
use bulwark_tests::{NatsServer, request_json};
use serde_json::json;

/// The passwords of `nats.conf` that the tests hand to the binary.
const SERVICE_PASSWORD: &str = "bulwark-dev";
const OPERATOR_PASSWORD: &str = "operator-dev";
/// A wrong password: refused by the server, and not to be echoed either.
const WRONG_PASSWORD: &str = "wr0ng-s3cret-pw";

fn bulwark(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulwark"));
    cmd.args(args)
        .env_remove("BULWARK_CONFIG")
        .env_remove("BULWARK_NATS_URL")
        .env("BULWARK_LOG", "debug")
        .env("BULWARK_METRICS__LISTEN", "")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [SERVICE_PASSWORD, OPERATOR_PASSWORD, WRONG_PASSWORD] {
        assert!(
            !text.contains(secret),
            "{what} shows the secret {secret:?}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_no_password_even_at_debug_level() {
    let server = NatsServer::start();
    let url = format!(
        "nats://bulwark:{SERVICE_PASSWORD}@127.0.0.1:{}",
        server.port()
    );
    let mut serve = bulwark(&["serve", "governance", "--nats-url", &url])
        .env("BULWARK_NATS__PASSWORD", SERVICE_PASSWORD)
        .env("BULWARK_NATS__CLI_PASSWORD", OPERATOR_PASSWORD)
        .spawn()
        .expect("bulwark serve starts");
    let client = server.client().await;
    assert!(
        bulwark_common::micro::wait_ready(&client, "governance", Duration::from_secs(30)).await,
        "governance serves"
    );
    // Work that logs and narrates: an intent, a refusal.
    let (decision, code) = request_json(
        &client,
        subjects::INTENT_SUBMIT,
        json!({"intent_type": "query_knowledge", "actor": "a"}).to_string(),
    )
    .await;
    assert_eq!((code, decision["status"].as_str()), (None, Some("queued")));
    request_json(&client, subjects::INTENT_SUBMIT, "{nope").await;
    serve.start_kill().expect("stop");
    let output = serve.wait_with_output().await.expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("serving") || stdout.contains("serving"),
        "the log was captured: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("bulwark:***@") || stdout.contains("bulwark:***@"),
        "the URL is logged redacted: {stdout}\n{stderr}"
    );
    assert_no_secret("stdout of bulwark serve", &stdout);
    assert_no_secret("the log of bulwark serve", &stderr);

    // Nor is any secret in a stored narrative.
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(streams::NARRATIVES_STREAM)
        .await
        .expect("narratives stream");
    let state = stream.info().await.expect("info").state.clone();
    assert!(state.messages >= 2, "narratives were written");
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            assert_no_secret("a narrative", &String::from_utf8_lossy(&msg.payload));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_and_errors_show_no_password() {
    let server = NatsServer::start();
    let _gov = bulwark_tests::start_governance(server.config()).await;
    let plain = format!("nats://127.0.0.1:{}", server.port());

    // Right password from the environment, and in the URL: the command works, prints no secret.
    for (url, env) in [
        (plain.clone(), OPERATOR_PASSWORD),
        (
            format!(
                "nats://operator:{OPERATOR_PASSWORD}@127.0.0.1:{}",
                server.port()
            ),
            "",
        ),
    ] {
        let out = bulwark(&["intent", "submit", "query_knowledge", "--actor", "me"])
            .env("BULWARK_NATS_URL", &url)
            .env("BULWARK_NATS__CLI_PASSWORD", env)
            .output()
            .await
            .expect("runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert_no_secret("bulwark intent submit", &text);
    }

    // A wrong password, from the environment or in the URL: refused, and not echoed.
    for (url, env) in [
        (plain.clone(), WRONG_PASSWORD.to_owned()),
        (
            format!(
                "nats://operator:{WRONG_PASSWORD}@127.0.0.1:{}",
                server.port()
            ),
            OPERATOR_PASSWORD.to_owned(),
        ),
        (
            format!("nats://operator:{WRONG_PASSWORD}@127.0.0.1:notaport"),
            OPERATOR_PASSWORD.to_owned(),
        ),
    ] {
        for args in [
            &["status"][..],
            &["intent", "status", "x"],
            &["narratives", "--who", "governance"],
        ] {
            let out = bulwark(args)
                .env("BULWARK_NATS_URL", &url)
                .env("BULWARK_NATS__CLI_PASSWORD", &env)
                .output()
                .await
                .expect("runs");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{args:?} with {url}: {text}");
            assert!(!text.is_empty(), "{args:?}: an error is printed");
            assert_no_secret(&format!("bulwark {args:?}"), &text);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_votes_as_its_own_user_and_is_refused_as_another() {
    let server = NatsServer::start();
    let _gov = bulwark_tests::start_governance(server.config()).await;
    let client = server.client().await;
    request_json(
        &client,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "cli-own", "intent_type": "self_improve", "actor": "x"}).to_string(),
    )
    .await;
    let url = format!("nats://127.0.0.1:{}", server.port());
    let as_guardian = |args: &'static [&'static str]| {
        let mut cmd = bulwark(args);
        cmd.env("BULWARK_NATS_URL", &url)
            .env("BULWARK_NATS__CLI_USER", "guardian")
            .env("BULWARK_NATS__CLI_PASSWORD", "guardian-dev")
            .env("BULWARK_NATS__REQUEST_TIMEOUT_MS", "2000");
        cmd
    };
    // No --voter: the CLI's own user votes, on its own subject.
    let out = as_guardian(&["vote", "cli-own", "approve"])
        .output()
        .await
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tally: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(tally["votes"][0]["voter"], "guardian");
    // Naming another voter: the plain subject, which guardian may not use.
    let out = as_guardian(&["vote", "cli-own", "approve", "--voter", "architect"])
        .output()
        .await
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permissions violation"), "{stderr}");
    let (status, _) = request_json(&client, subjects::PROPOSALS_OPEN, "{}").await;
    assert_eq!(
        status["items"][0]["votes"].as_array().map(Vec::len),
        Some(1),
        "only guardian's own vote counted: {status}"
    );
}
