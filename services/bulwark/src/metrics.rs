//! The Prometheus endpoint of `bulwark up` and `bulwark serve`: `GET /metrics` on
//! `metrics.listen` (loopback by default).
//!
//! The figures come from where bulwark already reports them: every `telemetry.<component>`
//! message (the latest of each component, flattened into gauges: `intents_by_tier` of governance
//! becomes `bulwark_governance_intents_by_tier{index="2"}`, nested counters become
//! `bulwark_scheduler_counters_completed`), the age of each component's telemetry, and this
//! process's NATS connection counters (`bulwark_nats_slow_consumer_drops{client="..."}`).
//!
//! # Subjects
//! Consumes `telemetry.>`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The latest telemetry of each component, with when it arrived.
type Latest = Arc<Mutex<BTreeMap<String, (Value, Instant)>>>;

/// Starts the endpoint when `listen` is set; returns the bound address.
pub async fn serve(
    listen: &str,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics endpoint cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let latest: Latest = Arc::default();
    let mut telemetry = client
        .subscribe("telemetry.>")
        .await
        .context("metrics: telemetry subscription")?;
    let sink = latest.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                msg = telemetry.next() => match msg { Some(m) => m, None => break },
            };
            let component = msg
                .subject
                .as_str()
                .strip_prefix("telemetry.")
                .unwrap_or("unknown")
                .to_owned();
            if let Ok(value) = serde_json::from_slice::<Value>(&msg.payload) {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(component, (value, Instant::now()));
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
            };
            let latest = latest.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 8192];
                let read =
                    tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await;
                let Ok(Ok(n)) = read else { return };
                let head = String::from_utf8_lossy(&request[..n]);
                let (status, body) = if head.starts_with("GET /metrics") {
                    ("200 OK", render(&latest))
                } else {
                    (
                        "404 Not Found",
                        "only GET /metrics is served here\n".to_owned(),
                    )
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(Some(addr))
}

/// The exposition text.
fn render(latest: &Latest) -> String {
    let mut out = String::new();
    let now = Instant::now();
    let latest = latest.lock().unwrap_or_else(|p| p.into_inner());
    let mut lines = BTreeMap::new();
    for (component, (value, at)) in latest.iter() {
        let prefix = format!("bulwark_{}", sanitise(component));
        flatten(&prefix, "", value, &mut lines);
        lines.insert(
            format!(
                "bulwark_telemetry_age_seconds{{component=\"{}\"}}",
                sanitise(component)
            ),
            now.saturating_duration_since(*at).as_secs_f64(),
        );
    }
    for (client, stats) in bulwark_common::connect::connections() {
        use std::sync::atomic::Ordering::Relaxed;
        let label = format!("{{client=\"{}\"}}", sanitise(&client));
        lines.insert(
            format!("bulwark_nats_slow_consumer_drops{label}"),
            stats.slow_consumer_drops.load(Relaxed) as f64,
        );
        lines.insert(
            format!("bulwark_nats_server_errors{label}"),
            stats.server_errors.load(Relaxed) as f64,
        );
        lines.insert(
            format!("bulwark_nats_disconnects{label}"),
            stats.disconnects.load(Relaxed) as f64,
        );
    }
    let mut typed = std::collections::BTreeSet::new();
    for (name, value) in lines {
        let family = name.split('{').next().unwrap_or(&name).to_owned();
        if typed.insert(family.clone()) {
            let _ = writeln!(out, "# TYPE {family} gauge");
        }
        let _ = writeln!(out, "{name} {value}");
    }
    out
}

/// Adds the numeric leaves of `value` under `name`; array elements get an `index` label.
fn flatten(name: &str, labels: &str, value: &Value, out: &mut BTreeMap<String, f64>) {
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.insert(format!("{name}{labels}"), v);
            }
        }
        Value::Bool(b) => {
            out.insert(format!("{name}{labels}"), if *b { 1.0 } else { 0.0 });
        }
        Value::String(s) if name.ends_with("health_status") => {
            // healthy 0, degraded 1, critical 2: alertable as a number.
            let level = match s.as_str() {
                "healthy" => 0.0,
                "degraded" => 1.0,
                _ => 2.0,
            };
            out.insert(format!("{name}{labels}"), level);
        }
        Value::Object(map) => {
            for (key, v) in map {
                flatten(&format!("{name}_{}", sanitise(key)), labels, v, out);
            }
        }
        Value::Array(items) if labels.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(name, &format!("{{index=\"{i}\"}}"), v, out);
            }
        }
        _ => {}
    }
}

fn sanitise(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn telemetry_flattens_into_gauges() {
        let latest: Latest = Arc::default();
        latest.lock().expect("lock").insert(
            "governance".into(),
            (
                json!({"intents_by_tier": [0, 1, 7], "duplicates": 2, "health_status": "degraded",
                    "component": "governance", "counters": {"shed": 3}}),
                Instant::now(),
            ),
        );
        let text = render(&latest);
        assert!(
            text.contains("# TYPE bulwark_governance_intents_by_tier gauge"),
            "{text}"
        );
        assert!(
            text.contains("bulwark_governance_intents_by_tier{index=\"2\"} 7"),
            "{text}"
        );
        assert!(text.contains("bulwark_governance_duplicates 2"), "{text}");
        assert!(
            text.contains("bulwark_governance_health_status 1"),
            "{text}"
        );
        assert!(
            text.contains("bulwark_governance_counters_shed 3"),
            "{text}"
        );
        assert!(
            text.contains("bulwark_telemetry_age_seconds{component=\"governance\"}"),
            "{text}"
        );
        assert!(
            !text.contains("component 0"),
            "strings other than health are skipped: {text}"
        );
    }
}
