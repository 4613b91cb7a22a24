//! `scripts/bench clarity`: narratives appended to the hash-chained audit log per second, next
//! to raw acknowledged JetStream publishes of the same narratives in the same run; and the time
//! `clarity.verify` takes over the chain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bulwark_common::{streams, subjects};
use bulwark_tests::{NatsServer, request_json, start_clarity};
use serde_json::json;
use tokio::sync::Semaphore;

/// Publishes `n` narratives on `subject` with 64 acknowledgements in flight.
async fn publish(js: &async_nats::jetstream::Context, subject: &str, n: u64) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let body = json!({"who": "bench", "what": "benchmarked", "when": "2026-11-26T10:00:00.000Z",
                          "where": "bench", "why": [format!("narrative {i}")], "how": "bench", "context": {"i": i}});
        let permit = permits.clone().acquire_owned().await?;
        let ack = js
            .publish(subject.to_owned(), body.to_string().into())
            .await?;
        tasks.spawn(async move {
            let ok = ack.await.is_ok();
            drop(permit);
            ok
        });
        while tasks.try_join_next().is_some() {}
    }
    while let Some(done) = tasks.join_next().await {
        if !done.unwrap_or(false) {
            bail!("a publish was not acknowledged");
        }
    }
    Ok(())
}

/// Runs the clarity benchmark; `smoke` keeps it to a few seconds.
pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let n: u64 = if smoke { 2_000 } else { 100_000 };
    let server = NatsServer::start();
    println!(
        "bench clarity: nats-server {} (file-backed JetStream), {n} narratives",
        server.url()
    );
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());

    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH_RAW_NARRATIVES".into(),
        subjects: vec!["bench.narrative".into()],
        ..Default::default()
    })
    .await?;
    let start = Instant::now();
    publish(&js, "bench.narrative", n).await?;
    let raw = n as f64 / start.elapsed().as_secs_f64();

    let _clarity = start_clarity(server.config()).await;
    let start = Instant::now();
    publish(&js, &subjects::narrative("bench"), n).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut audit = js.get_stream(streams::AUDIT_STREAM).await?;
        if audit.info().await?.state.messages >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("the chain did not reach {n} records within 10 min");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let chained = n as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let (report, _) = request_json(&client, subjects::CLARITY_VERIFY, "{}").await;
    let verify = start.elapsed();
    if report["ok"] != true {
        bail!("the chain did not verify: {report}");
    }
    let per_million =
        verify.as_secs_f64() * 1_000_000.0 / report["records"].as_f64().unwrap_or(n as f64);
    println!();
    println!(
        "  {:<52} {:>9.0} /s",
        "raw JetStream publish of the narratives, acknowledged", raw
    );
    println!(
        "  {:<52} {:>9.0} /s   (aim >= 50k/s)",
        "narratives appended to the hash chain (publish -> chained)", chained
    );
    println!("  {:<52} {:>9.2}", "ratio chained / raw", chained / raw);
    println!(
        "  {:<52} {:>9.2} s for {} records; {:.1} s per million, extrapolated (aim < 5 s)",
        "clarity.verify",
        verify.as_secs_f64(),
        report["records"],
        per_million
    );
    Ok(())
}
