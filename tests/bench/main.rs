//! `bulwark-bench`: the benchmarks behind `scripts/bench`. Each one measures bulwark and raw NATS
//! on the same machine in the same run, against its own nats-server, and prints both with their
//! ratio. Benchmarks, not tests: nothing here asserts a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_common::subjects;
use bulwark_tests::{NatsServer, start_governance};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Semaphore;

mod clarity;
mod console;
mod mesh;
mod pipeline;
mod playbooks;

#[derive(Debug, Parser)]
#[command(about = "bulwark benchmarks, each next to raw NATS in the same run")]
struct Args {
    /// Which benchmark.
    bench: Bench,
    /// Short run that only proves the benchmark works (CI).
    #[arg(long)]
    smoke: bool,
    /// `pipeline` only: single server next to a three-node cluster, and the scheduler failover.
    #[arg(long)]
    cluster: bool,
    /// The `bulwark` binary whose idle memory to measure (release build).
    #[arg(long, env = "BULWARK_BIN")]
    bulwark_bin: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Bench {
    /// Intent intake: raw request/reply vs decided-and-persisted intents.
    Governance,
    /// Trigger mesh: raw subscribe-and-parse vs storm guard ingest, breaker trip latency, rules/s.
    Mesh,
    /// HTM: submit to completed on three workers vs raw JetStream publish-to-consume.
    Pipeline,
    /// Clarity: narratives chained per second vs raw JetStream publish; verify time.
    Clarity,
    /// Playbooks: incident to first step vs a raw JetStream relay; sandboxed runs vs bare Rhai.
    Playbooks,
    /// Console: page render p50/p99 with 10,000 intents stored vs the raw request behind a page.
    Console,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    bulwark_tests::init_logging();
    let args = Args::parse();
    match args.bench {
        Bench::Governance => governance(&args).await,
        Bench::Mesh => mesh::run(args.smoke).await,
        Bench::Pipeline if args.cluster => pipeline::run_cluster(args.smoke).await,
        Bench::Pipeline => pipeline::run(args.smoke).await,
        Bench::Clarity => clarity::run(args.smoke).await,
        Bench::Playbooks => playbooks::run(args.smoke).await,
        Bench::Console => console::run(args.smoke).await,
    }
}

struct Sizes {
    throughput_requests: u64,
    in_flight: usize,
    offered_rate: u64,
    latency_seconds: f64,
}

async fn governance(args: &Args) -> anyhow::Result<()> {
    let sizes = if args.smoke {
        Sizes {
            throughput_requests: 2_000,
            in_flight: 64,
            offered_rate: 1_000,
            latency_seconds: 1.0,
        }
    } else {
        Sizes {
            throughput_requests: 100_000,
            in_flight: 64,
            offered_rate: 10_000,
            latency_seconds: 5.0,
        }
    };
    let server = NatsServer::start();
    println!(
        "bench governance: nats-server {} (repository nats.conf, file-backed JetStream in a temp dir)",
        server.url()
    );

    // Raw NATS: an echo responder in a queue group, like a micro endpoint, on its own connection.
    let responder = server.client().await;
    let mut echo = responder.queue_subscribe("bench.echo", "q".into()).await?;
    let echo_client = responder.clone();
    tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            if let Some(reply) = msg.reply {
                let _ = echo_client.publish(reply, msg.payload).await;
            }
        }
    });
    let client = server.client().await;
    let sample = json!({"intent_type": "query_knowledge", "actor": "bench", "payload": {"q": "x"},
                        "mission_context": {"learning_impact": true}})
    .to_string();
    let echo_body = sample.clone();
    let raw = closed_loop(
        "echo requests",
        sizes.throughput_requests,
        sizes.in_flight,
        request_op(&client, "bench.echo", move |_| echo_body.clone().into()),
    )
    .await?;

    // Raw JetStream: a publish acknowledged by a file-backed stream, the unit of bulwark's cost
    // (an accepted tier 2 intent is two such writes plus its narrative).
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw.>".into()],
        ..Default::default()
    })
    .await?;
    let raw_js = closed_loop(
        "JetStream publishes",
        sizes.throughput_requests,
        sizes.in_flight,
        |i| {
            let js = js.clone();
            let body = sample.clone();
            async move {
                match js
                    .publish(format!("bench.raw.{}", i % 10), body.into())
                    .await
                {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await?;

    let _gov = start_governance(server.config()).await;
    let intent = |i: u64| {
        json!({"intent_id": format!("bench-{i}"), "intent_type": "query_knowledge", "actor": "bench",
               "payload": {"q": "x"}, "mission_context": {"learning_impact": true}})
        .to_string()
        .into()
    };
    let gov = closed_loop(
        "intent submissions",
        sizes.throughput_requests,
        sizes.in_flight,
        request_op(&client, subjects::INTENT_SUBMIT, intent),
    )
    .await?;

    println!();
    println!(
        "throughput at {} in flight, {} requests each:",
        sizes.in_flight, sizes.throughput_requests
    );
    println!(
        "  {:<44} {:>10.0} req/s",
        "raw NATS request/reply (echo)", raw
    );
    println!(
        "  {:<44} {:>10.0} acks/s",
        "raw JetStream publish, acknowledged (file)", raw_js
    );
    println!(
        "  {:<44} {:>10.0} intents/s",
        "bulwark decided-and-persisted intents", gov
    );
    println!(
        "  {:<44} {:>10.2}   (aim >= 0.40)",
        "ratio bulwark / raw",
        gov / raw
    );
    let synced = synced_intents(&sizes, &sample).await?;
    println!(
        "  {:<44} {:>10.0} intents/s",
        "  durability = fast (the row above)", gov
    );
    println!(
        "  {:<44} {:>10.0} intents/s",
        "  durability = synced (sync_interval always)", synced
    );

    let mut offset = sizes.throughput_requests;
    for rate in [sizes.offered_rate, sizes.offered_rate / 2] {
        let base = offset;
        let intent_at = move |i: u64| intent(base + i);
        let (hist, sent, errors, achieved) = open_loop(
            &client,
            subjects::INTENT_SUBMIT,
            rate,
            sizes.latency_seconds,
            intent_at,
        )
        .await?;
        offset += sent;
        let raw_hist = open_loop(&client, "bench.echo", rate, sizes.latency_seconds, |_| {
            sample.clone().into()
        })
        .await?
        .0;
        println!();
        println!(
            "latency at {rate} intents/s offered for {:.0} s ({sent} sent, {errors} errors, {achieved:.0}/s achieved):",
            sizes.latency_seconds
        );
        print_latency("raw NATS request/reply", &raw_hist);
        print_latency("bulwark submit -> decision", &hist);
    }
    println!("  (aim: p99 <= 2 ms at 10k/s)");

    if let Some(bin) = &args.bulwark_bin {
        let rss = idle_rss(bin, &server).await?;
        println!();
        println!(
            "`bulwark up` idle resident memory: {:.1} MB  (aim <= 60 MB)",
            rss as f64 / 1024.0
        );
    }
    Ok(())
}

/// Intents decided per second by a governance whose server syncs every write before it
/// acknowledges (`nats.durability = "synced"`), on a server of its own.
async fn synced_intents(sizes: &Sizes, sample: &str) -> anyhow::Result<f64> {
    let server = NatsServer::start_synced();
    let mut cfg = server.config();
    cfg.nats.durability = bulwark_common::config::Durability::Synced;
    let _gov = start_governance(cfg).await;
    let client = server.client().await;
    let body = sample.to_owned();
    let intent = move |i: u64| {
        let mut v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["intent_id"] = json!(format!("synced-{i}"));
        v.to_string().into()
    };
    closed_loop(
        "intent submissions (synced)",
        sizes.throughput_requests,
        sizes.in_flight,
        request_op(&client, subjects::INTENT_SUBMIT, intent),
    )
    .await
}

fn print_latency(label: &str, hist: &Histogram<u64>) {
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "  {:<30} p50 {:>7.3} ms   p99 {:>7.3} ms   p99.9 {:>7.3} ms   max {:>7.3} ms",
        label,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        hist.max() as f64 / 1000.0
    );
}

/// Runs `n` operations keeping `in_flight` outstanding; returns completed operations per second.
/// `op(i)` is the i-th operation; it resolves to whether it succeeded.
async fn closed_loop<Fut>(
    what: &str,
    n: u64,
    in_flight: usize,
    op: impl Fn(u64) -> Fut,
) -> anyhow::Result<f64>
where
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(in_flight));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let work = op(i);
        tasks.spawn(async move {
            let ok = work.await;
            drop(permit);
            ok
        });
        while tasks.try_join_next().is_some() {}
    }
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        if !done.unwrap_or(false) {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {n} {what} failed");
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The i-th request of a closed loop: succeeds when answered without an error header.
fn request_op(
    client: &async_nats::Client,
    subject: &'static str,
    body: impl Fn(u64) -> bytes::Bytes,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
    let client = client.clone();
    move |i| {
        let client = client.clone();
        let payload = body(i);
        Box::pin(async move {
            matches!(client.request(subject, payload).await, Ok(r) if r.headers.is_none())
        })
    }
}

/// Offers `rate` requests per second for `seconds` whatever the replies do (open loop), and
/// records each request's latency. Returns the histogram (µs), sent, errors and achieved rate.
async fn open_loop(
    client: &async_nats::Client,
    subject: &'static str,
    rate: u64,
    seconds: f64,
    body: impl Fn(u64) -> bytes::Bytes,
) -> anyhow::Result<(Histogram<u64>, u64, u64, f64)> {
    let total = (rate as f64 * seconds) as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<u64>>();
    let start = Instant::now();
    // Sends in small batches every millisecond so the offered rate holds on a busy machine.
    let per_tick = (rate / 1000).max(1);
    let mut ticker = tokio::time::interval(
        Duration::from_millis(1).max(Duration::from_micros(1_000_000 * per_tick / rate)),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    while sent < total {
        ticker.tick().await;
        for _ in 0..per_tick.min(total - sent) {
            let client = client.clone();
            let payload = body(sent);
            let tx = tx.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let ok =
                    matches!(client.request(subject, payload).await, Ok(r) if r.headers.is_none());
                let _ = tx.send(ok.then(|| t0.elapsed().as_micros() as u64));
            });
            sent += 1;
        }
    }
    drop(tx);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let mut errors = 0;
    while let Some(result) = rx.recv().await {
        match result {
            Some(us) => hist.record(us.max(1)).context("record")?,
            None => errors += 1,
        }
    }
    Ok((
        hist,
        sent,
        errors,
        sent as f64 / start.elapsed().as_secs_f64(),
    ))
}

/// Starts `bulwark up` against `server`, waits until it is ready and idle, and reads its RSS (KiB).
async fn idle_rss(bin: &std::path::Path, server: &NatsServer) -> anyhow::Result<u64> {
    let mut child = tokio::process::Command::new(bin)
        .arg("up")
        .env("BULWARK_NATS_URL", server.url())
        .env("BULWARK_LOG", "warn")
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("bulwark: up on") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !ready {
        bail!("bulwark up did not report ready");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = child.id().context("pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    child.kill().await.ok();
    Ok(rss)
}
