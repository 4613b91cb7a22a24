//! `/metrics` of `bulwark up`: Prometheus text that moves with real traffic.

use std::io::{Read, Write};
use std::time::Duration;

use bulwark_tests::{NatsServer, eventually, repo_root, request_json};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

fn scrape(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.1 200").then_some(text)
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scrape_and_move_with_traffic() {
    let server = NatsServer::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut up = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args(["up", "--workers", "1", "--nats-url", &server.url()])
        .env_remove("BULWARK_CONFIG")
        .env("BULWARK_LOG", "warn")
        .env("BULWARK_METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .env("BULWARK_TELEMETRY__INTERVAL_S", "0.3")
        .env("BULWARK_WORKER__HEARTBEAT_INTERVAL_S", "0.3")
        .current_dir(repo_root())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bulwark up starts");
    let mut lines = tokio::io::BufReader::new(up.stdout.take().expect("stdout")).lines();
    let mut transcript = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        transcript.push(line.clone());
        if line.contains("bulwark: up on") {
            break;
        }
    }
    let metrics_line = format!("  metrics  http://127.0.0.1:{port}/metrics");
    assert!(transcript.contains(&metrics_line), "{transcript:?}");

    let before = eventually(
        Duration::from_secs(20),
        "a first scrape with governance telemetry",
        || async {
            let text = scrape(port)?;
            text.contains("bulwark_governance_intents_by_tier")
                .then_some(text)
        },
    )
    .await;
    assert!(before.contains("# TYPE bulwark_governance_intents_by_tier gauge"));
    assert!(
        value(
            &before,
            "bulwark_nats_slow_consumer_drops{client=\"governance\"}"
        )
        .is_some(),
        "{before}"
    );
    let tier2 =
        |t: &str| value(t, "bulwark_governance_intents_by_tier{index=\"2\"}").unwrap_or(0.0);
    let start = tier2(&before);

    let client = server.client().await;
    for i in 0..3 {
        let body = json!({"intent_id": format!("m-{i}"), "intent_type": "query_knowledge", "actor": "a",
                          "mission_context": {"learning_impact": true}});
        let (reply, code) = request_json(&client, "htm.intent.submit", body.to_string()).await;
        assert_eq!(code, None, "{reply}");
    }
    let after = eventually(
        Duration::from_secs(20),
        "counters moved by the traffic",
        || async {
            let text = scrape(port)?;
            let completed = value(&text, "bulwark_scheduler_counters_completed").unwrap_or(0.0);
            (tier2(&text) >= start + 3.0 && completed >= 3.0).then_some(text)
        },
    )
    .await;
    assert_eq!(tier2(&after), start + 3.0);
    let _ = up.start_kill();
}
