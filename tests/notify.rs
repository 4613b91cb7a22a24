//! Webhook notifications against a local HTTP receiver: the notify service beside governance,
//! clarity and the storm guard on a real nats-server; a receiver that fails twice then succeeds,
//! one that never does (dead letter), per-kind routing, the signature, and the delivery log on
//! `notify.log` (the operator's, not a voter's).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_common::console_config::WebhookConfig;
use bulwark_common::subjects;
use bulwark_tests::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATIENCE: Duration = Duration::from_secs(60);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: Vec<(String, String)>,
    raw_body: Vec<u8>,
    body: Value,
}

impl Hit {
    fn header(&self, name: &str) -> String {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

/// A local HTTP receiver answering the n-th request with `statuses[n]` (the last one repeats).
struct Receiver {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

async fn receiver(statuses: Vec<u16>) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let url = format!(
        "http://{}/hook?team=ops",
        listener.local_addr().expect("addr")
    );
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let seen = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut raw = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then the body by Content-Length.
            let (head_len, length) = loop {
                let Ok(n) = stream.read(&mut chunk).await else {
                    break (0, 0);
                };
                if n == 0 {
                    break (0, 0);
                }
                raw.extend_from_slice(&chunk[..n]);
                if let Some(pos) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&raw[..pos]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (pos + 4, length);
                }
            };
            while raw.len() < head_len + length {
                let Ok(n) = stream.read(&mut chunk).await else {
                    break;
                };
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&raw[..head_len]).to_string();
            let headers = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
                .collect();
            let raw_body = raw[head_len..].to_vec();
            let hit = Hit {
                headers,
                body: serde_json::from_slice(&raw_body).unwrap_or(Value::Null),
                raw_body,
            };
            let n = {
                let mut hits = seen.lock().expect("hits");
                hits.push(hit);
                hits.len()
            };
            let status = statuses[(n - 1).min(statuses.len() - 1)];
            let reply =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    Receiver { url, hits }
}

impl Receiver {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }
}

fn hook(name: &str, url: &str, events: &[&str]) -> WebhookConfig {
    WebhookConfig {
        name: name.into(),
        url: url.into(),
        events: events.iter().map(|e| (*e).to_owned()).collect(),
        secret: format!("{name}-secret"),
    }
}

async fn notify_log(server: &NatsServer, query: Value) -> Value {
    let operator = server.client_as(OPERATOR_USER).await;
    let (reply, code) = request_json(&operator, subjects::NOTIFY_LOG, query.to_string()).await;
    assert_eq!(code, None, "{reply}");
    reply
}

async fn submit_tier0(server: &NatsServer) -> String {
    let agent = server.client_as(AGENT_USER).await;
    let (reply, _) = request_json(
        &agent,
        subjects::INTENT_SUBMIT,
        json!({"intent_type": "change_charter", "actor": "bot-1", "payload": {"why": "<script>"}})
            .to_string(),
    )
    .await;
    assert_eq!(reply["status"], "pending_review", "{reply}");
    reply["intent_id"].as_str().expect("an id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_twice_gets_the_same_signed_delivery_the_third_time() {
    init_logging();
    let server = NatsServer::start();
    let flaky = receiver(vec![500, 500, 204]).await;
    let breaker_only = receiver(vec![200]).await;
    let mut cfg = server.config();
    cfg.notify.webhooks = vec![
        hook("flaky", &flaky.url, &["review_pending"]),
        hook("breaker-only", &breaker_only.url, &["breaker_opened"]),
    ];
    cfg.notify.backoff_initial_ms = 50;
    cfg.notify.backoff_max_ms = 200;
    cfg.console.listen = "127.0.0.1:8420".into();
    let _governance = start_governance(cfg.clone()).await;
    let _clarity = start_clarity(cfg.clone()).await;
    let _guard = start_storm_guard(cfg.clone()).await;
    let _notify = start_notify(cfg.clone()).await;

    let id = submit_tier0(&server).await;
    let hits = eventually(PATIENCE, "three attempts at the flaky receiver", || async {
        let hits = flaky.hits();
        (hits.len() >= 3).then_some(hits)
    })
    .await;
    let ids: Vec<String> = hits
        .iter()
        .map(|h| h.header("x-bulwark-delivery"))
        .collect();
    assert!(
        ids.iter().all(|d| !d.is_empty() && *d == ids[0]),
        "one delivery retried: {ids:?}"
    );
    let body = &hits[2].body;
    assert_eq!(body["kind"], "review_pending", "{body}");
    assert_eq!(body["event"]["intent_id"], id.as_str(), "{body}");
    let text = body["text"].as_str().expect("a Slack text field");
    assert!(text.contains("change_charter by bot-1"), "{text}");
    assert!(
        text.contains("http://127.0.0.1:8420/reviews"),
        "a link to the console: {text}"
    );
    assert_eq!(hits[2].header("x-bulwark-event"), "review_pending");
    assert_eq!(hits[2].header("content-type"), "application/json");
    assert_eq!(
        hits[2].header("x-bulwark-signature"),
        bulwark_console::webhook::signature("flaky-secret", &hits[2].raw_body),
        "the body is signed with the webhook's secret"
    );
    assert!(
        breaker_only.hits().is_empty(),
        "a review is not sent to a breaker-only hook"
    );

    let log = eventually(PATIENCE, "the delivery in the log", || async {
        let log = notify_log(&server, json!({"kind": "review_pending"})).await;
        (log["deliveries"].as_array().map(Vec::len) == Some(1)).then_some(log)
    })
    .await;
    let d = &log["deliveries"][0];
    assert_eq!(d["outcome"], "delivered", "{log}");
    assert_eq!(d["webhook"], "flaky", "{log}");
    let attempts = d["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{log}");
    assert_eq!(attempts[0]["error"], "HTTP 500", "{log}");
    assert_eq!(attempts[2]["status"], 204, "{log}");

    // The breaker opened by hand reaches the hook that asked for it.
    let operator = server.client_as(OPERATOR_USER).await;
    let (opened, code) = request_json(
        &operator,
        subjects::STORM_GUARD_BREAKER_OPEN,
        json!({"reason": "notify test"}).to_string(),
    )
    .await;
    assert_eq!(code, None, "{opened}");
    let hit = eventually(PATIENCE, "the breaker notice", || async {
        breaker_only.hits().first().cloned()
    })
    .await;
    assert_eq!(hit.body["kind"], "breaker_opened", "{:?}", hit.body);
    assert!(
        hit.body["text"]
            .as_str()
            .unwrap_or("")
            .contains("notify test"),
        "{:?}",
        hit.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_never_succeeds_is_dead_lettered_and_narrated() {
    init_logging();
    let server = NatsServer::start();
    let down = receiver(vec![503]).await;
    let mut cfg = server.config();
    cfg.notify.webhooks = vec![hook("down", &down.url, &[])];
    cfg.notify.max_attempts = 3;
    cfg.notify.backoff_initial_ms = 20;
    cfg.notify.backoff_max_ms = 40;
    let _governance = start_governance(cfg.clone()).await;
    let _clarity = start_clarity(cfg.clone()).await;
    let _notify = start_notify(cfg.clone()).await;

    submit_tier0(&server).await;
    let log = eventually(PATIENCE, "the dead letter", || async {
        let log = notify_log(&server, json!({"outcome": "dead_letter"})).await;
        (log["deliveries"].as_array().map(Vec::len) == Some(1)).then_some(log)
    })
    .await;
    let d = &log["deliveries"][0];
    assert_eq!(d["attempts"].as_array().map(Vec::len), Some(3), "{log}");
    assert_eq!(d["kind"], "review_pending", "{log}");
    assert!(
        d["body"].as_str().unwrap_or("").contains("review_pending"),
        "the undelivered body is kept: {log}"
    );
    assert_eq!(down.hits().len(), 3, "no attempt after the last");
    assert_eq!(log["counters"]["dead_lettered"], 1, "{log}");

    let js = async_nats::jetstream::new(server.client().await);
    let narrated = eventually(PATIENCE, "the dead letter narrated", || {
        let js = js.clone();
        async move {
            stored_narratives(&js, "notify")
                .await
                .into_iter()
                .find(|n| n["what"] == "notification_dead_lettered")
        }
    })
    .await;
    assert!(
        narrated["why"].to_string().contains("HTTP 503"),
        "{narrated}"
    );

    // The log is the operator's: a voter and an agent (foreign clients) are refused by the
    // server; the operator's same request is answered.
    for creds in [Some(("architect", "architect-dev")), None] {
        let seen = attack(&server, creds, &["read-notify-log"]).await;
        assert_eq!(seen["answered"], false, "{creds:?}: {seen}");
        assert!(
            seen["errors"]
                .to_string()
                .to_lowercase()
                .contains("permissions violation"),
            "{creds:?}: {seen}"
        );
    }
    let seen = attack(&server, Some(OPERATOR_USER), &["read-notify-log"]).await;
    assert_eq!(seen["answered"], true, "{seen}");
    assert_eq!(seen["reply"]["counters"]["dead_lettered"], 1, "{seen}");
}
