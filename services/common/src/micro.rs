//! NATS micro registration and discovery helpers: every service registers under its contract
//! name (CONTRACT section 5) so `nats micro ls` lists it, and readiness is the service answering
//! `$SRV.PING.<name>`.

use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;

/// Version every service registers with (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Pings `$SRV.PING.<name>` until an instance answers or `timeout` passes; true when one did.
pub async fn wait_ready(client: &Client, name: &str, timeout: Duration) -> bool {
    let subject = format!("$SRV.PING.{name}");
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            client.request(subject.clone(), "".into()),
        )
        .await;
        if let Ok(Ok(_)) = attempt {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Names of the instances answering `$SRV.PING` (optionally of one service) within `window`.
pub async fn ping_all(
    client: &Client,
    name: Option<&str>,
    window: Duration,
) -> Vec<serde_json::Value> {
    let subject = match name {
        Some(n) => format!("$SRV.PING.{n}"),
        None => "$SRV.PING".to_owned(),
    };
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else {
        return Vec::new();
    };
    if client
        .publish_with_reply(subject, inbox, "".into())
        .await
        .is_err()
    {
        return Vec::new();
    }
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if let Ok(v) = serde_json::from_slice(&msg.payload) {
            found.push(v);
        }
    }
    found
}
