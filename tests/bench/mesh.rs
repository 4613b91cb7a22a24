//! `bulwark-bench mesh`: the trigger mesh safeguards next to raw NATS, in one run on one
//! nats-server: raw core NATS subscribe-and-parse of the same events, the storm guard's
//! sustained ingest, their ratio, the breaker trip latency (publish of the crossing event to
//! `mesh.breaker.opened` received) and the event policy engine's rule evaluations per second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_common::subjects;
use bulwark_tests::{NatsServer, request_json, start_event_policy, start_storm_guard};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Events published between two checks that the reader keeps up (keeps both readers below
/// their subscription buffer, so neither drops).
const CHUNK: u64 = 5_000;

fn sample(i: u64) -> bytes::Bytes {
    json!({"event_id": format!("bench-{i}"), "event_type": "bench.load", "source": "bench",
           "actor": "bench-agent", "timestamp": "2026-11-26T10:00:00.123Z",
           "correlation_id": format!("bench-{i}"), "causation_id": null, "depth": 0,
           "payload": {"n": i, "note": "a typical small mesh event"}})
    .to_string()
    .into()
}

/// Publishes `n` events on `subject` in chunks, waiting after each until `seen()` caught up
/// (within one chunk); returns events per second from first publish to last seen, and how many
/// were never seen (core NATS drops events for a subscriber that falls behind; a benchmark
/// reports that instead of failing on it).
async fn sustained<F, Fut>(
    client: &async_nats::Client,
    subject: &str,
    n: u64,
    seen: F,
) -> anyhow::Result<(f64, u64)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let start = Instant::now();
    let base = seen().await;
    let mut sent = 0;
    while sent < n {
        for _ in 0..CHUNK.min(n - sent) {
            client.publish(subject.to_owned(), sample(sent)).await?;
            sent += 1;
        }
        client.flush().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen().await - base + CHUNK < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = seen().await - base;
    let mut last_change = Instant::now();
    while last < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_micros(200)).await;
        let now_seen = seen().await - base;
        if now_seen != last {
            last = now_seen;
            last_change = Instant::now();
        }
    }
    let received = last.min(n);
    let end = if received < n {
        last_change
    } else {
        Instant::now()
    };
    if received == 0 {
        bail!("nothing of {n} events was seen on {subject}");
    }
    Ok((
        received as f64 / end.duration_since(start).as_secs_f64(),
        n - received,
    ))
}

async fn stat(client: &async_nats::Client, service: &str, key: &str) -> u64 {
    let (reply, _) = request_json(client, &format!("$SRV.STATS.{service}"), "").await;
    reply["endpoints"][0]["data"][key].as_u64().unwrap_or(0)
}

/// Runs the mesh benchmark; `smoke` keeps it to a few seconds.
pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let (events, trips, policy_events) = if smoke {
        (20_000, 10, 2_000)
    } else {
        (300_000, 200, 50_000)
    };
    let server = NatsServer::start();
    println!(
        "bench mesh: nats-server {} (repository nats.conf, file-backed JetStream in a temp dir)",
        server.url()
    );
    let client = server.client().await;

    // 1. Raw core NATS: subscribe and parse each event (the mesh stream stores them meanwhile,
    // as it does for the storm guard).
    let js = bulwark_common::streams::context(client.clone(), Duration::from_secs(5));
    let cfg = server.config();
    bulwark_common::mesh::mesh_stream(&js, &cfg.mesh).await?;
    let raw_seen = Arc::new(AtomicU64::new(0));
    let reader = server.client().await;
    let mut sub = reader.subscribe("mesh.bench.load").await?;
    let counter = raw_seen.clone();
    let raw_task = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if serde_json::from_slice::<Value>(&msg.payload).is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let (raw, raw_lost) = sustained(&client, "mesh.bench.load", events, || {
        let c = raw_seen.clone();
        async move { c.load(Ordering::Relaxed) }
    })
    .await?;
    raw_task.abort();

    // 2. Storm guard ingest of the same events (thresholds out of reach: counting only).
    let mut ingest_cfg = server.config();
    ingest_cfg.mesh.storm_threshold = u64::MAX / 4;
    ingest_cfg.mesh.breaker_threshold = u64::MAX / 4;
    let guard = start_storm_guard(ingest_cfg).await;
    let (guard_rate, guard_lost) = sustained(&client, "mesh.bench.load", events, || {
        stat(&client, "storm_guard", "events_seen")
    })
    .await?;
    guard.stop().await?;

    // 3. Breaker trip latency: publish the threshold, then time the crossing event to
    // mesh.breaker.opened; short cooldown and probe so the breaker closes between trials.
    let mut trip_cfg = server.config();
    trip_cfg.mesh.storm_threshold = u64::MAX / 4;
    trip_cfg.mesh.breaker_threshold = 100;
    trip_cfg.mesh.breaker_window_s = 10.0;
    trip_cfg.mesh.cooldown_s = 0.05;
    trip_cfg.mesh.half_open_s = 0.05;
    let _guard = start_storm_guard(trip_cfg).await;
    let mut transitions = client.subscribe("mesh.breaker.>").await?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    for trial in 0..trips {
        let before = stat(&client, "storm_guard", "events_seen").await;
        for i in 0..100 {
            client
                .publish("mesh.bench.trip", sample(trial * 1000 + i))
                .await?;
        }
        client.flush().await?;
        while stat(&client, "storm_guard", "events_seen").await < before + 100 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let t0 = Instant::now();
        client
            .publish("mesh.bench.trip", sample(trial * 1000 + 999))
            .await?;
        client.flush().await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), transitions.next())
                .await
                .context("no breaker transition within 10 s")?
                .context("subscription ended")?;
            if msg.subject.as_str() == subjects::MESH_BREAKER_OPENED {
                hist.record((t0.elapsed().as_micros() as u64).max(1))?;
                break;
            }
        }
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), transitions.next())
                .await
                .context("breaker did not close within 10 s")?
                .context("subscription ended")?;
            if msg.subject.as_str() == subjects::MESH_BREAKER_CLOSED {
                break;
            }
        }
    }
    drop(_guard);

    // 4. Event policy engine: 20 rules per event (19 that do not match, 1 that does on
    // another type), events through the stream and the mesh consumer.
    let dir = tempfile::tempdir()?;
    let mut rules = String::new();
    for r in 0..20 {
        rules.push_str(&format!(
            "[[rule]]\nname = \"r{r}\"\non = \"mesh.bench.policy\"\nwhen = [{{ field = \"payload.n\", op = \"lt\", value = -{r} }}]\n[rule.emit]\nevent_type = \"bench.never\"\n\n"
        ));
    }
    std::fs::write(dir.path().join("bench.toml"), rules)?;
    let mut policy_cfg = server.config();
    policy_cfg.mesh.policies_dir = dir.path().to_owned();
    policy_cfg.mesh.storm_threshold = 10_000_000;
    policy_cfg.mesh.breaker_threshold = u64::MAX / 4;
    let _engine = start_event_policy(policy_cfg).await;
    let start = Instant::now();
    let mut acks = Vec::new();
    for i in 0..policy_events {
        acks.push(js.publish("mesh.bench.policy", sample(i)).await?);
        if acks.len() >= 1000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while stat(&client, "event_policy_engine", "events").await < policy_events {
        if Instant::now() > deadline {
            bail!("the engine did not evaluate every event");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let evaluated = stat(&client, "event_policy_engine", "rules_evaluated").await;

    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!();
    println!("mesh ingest, {events} events of ~250 bytes each:");
    println!(
        "  {:<48} {:>10.0} events/s   ({raw_lost} not seen)",
        "raw core NATS subscribe-and-parse", raw
    );
    println!(
        "  {:<48} {:>10.0} events/s   ({guard_lost} not seen)",
        "storm guard sustained ingest", guard_rate
    );
    println!(
        "  {:<48} {:>10.2}   (aim >= 0.6)",
        "ratio storm guard / raw",
        guard_rate / raw
    );
    println!();
    println!(
        "breaker trip latency, crossing event -> mesh.breaker.opened received ({trips} trips):"
    );
    println!(
        "  p50 {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms   (aim p99 <= 10 ms)",
        ms(0.5),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    println!();
    println!("event policy engine, {policy_events} events through BULWARK_MESH, 20 rules each:");
    println!(
        "  {:<48} {:>10.0} rules/s ({:.0} events/s)",
        "rules evaluated",
        evaluated as f64 / elapsed,
        policy_events as f64 / elapsed
    );
    Ok(())
}
