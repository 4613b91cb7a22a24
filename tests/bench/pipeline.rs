//! `scripts/bench pipeline`: tier 2 intents with the no-op handler, from submission to
//! completion on three workers, next to raw JetStream publish-to-consume on the same machine in
//! the same run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bulwark_common::subjects;
use bulwark_tests::{
    NatsCluster, NatsServer, RunningService, spawn_service, start_governance, start_scheduler,
    start_worker,
};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};

/// Runs the pipeline benchmark; `smoke` keeps it to a few seconds.
pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let (n, rate, seconds) = if smoke {
        (1_000u64, 200u64, 1.0)
    } else {
        (30_000, 5_000, 5.0)
    };
    let server = NatsServer::start();
    println!(
        "bench pipeline: nats-server {} (repository nats.conf, file-backed JetStream), 3 workers, no-op handler",
        server.url()
    );
    let client = server.client().await;

    // Raw JetStream: publish (acknowledged) into a work queue and consume with acks.
    let js = async_nats::jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_PIPE".into(),
            subjects: vec!["bench.pipe".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("bench".into()),
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let consume = tokio::spawn(async move {
        let mut done = 0u64;
        let mut messages = consumer.messages().await?;
        while done < n {
            match messages.next().await {
                Some(Ok(msg)) => {
                    msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    done += 1;
                }
                Some(Err(err)) => bail!("consume failed: {err}"),
                None => bail!("consumer ended"),
            }
        }
        anyhow::Ok(())
    });
    let permits = Arc::new(Semaphore::new(64));
    let body = json!({"task_id": "x", "payload": {}}).to_string();
    for _ in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let ack = js.publish("bench.pipe", body.clone().into()).await?;
        tokio::spawn(async move {
            let _ = ack.await;
            drop(permit);
        });
    }
    consume.await??;
    let raw = n as f64 / start.elapsed().as_secs_f64();

    // bulwark: governance, scheduler, three workers.
    let mut cfg = server.config();
    cfg.worker.capacity = 64;
    cfg.worker.heartbeat_interval_s = 1.0;
    let _gov = start_governance(cfg.clone()).await;
    let _sched = start_scheduler(cfg.clone()).await;
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start_worker(cfg.clone(), &format!("bench-w{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let completed = Completions::watch(&client).await?;

    let start = Instant::now();
    let permits = Arc::new(Semaphore::new(64));
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let client = client.clone();
        tokio::spawn(async move {
            let _ = client
                .request(subjects::INTENT_SUBMIT, intent(&format!("sat-{i}")))
                .await;
            drop(permit);
        });
    }
    completed
        .wait_for("sat-", n, Duration::from_secs(300))
        .await?;
    let bulwark = n as f64 / start.elapsed().as_secs_f64();

    println!();
    println!("saturation, {n} tasks, 64 submissions in flight:");
    println!(
        "  {:<48} {:>9.0} msg/s",
        "raw JetStream publish -> consume -> ack", raw
    );
    println!(
        "  {:<48} {:>9.0} intents/s",
        "bulwark submit -> decided -> dispatched -> completed", bulwark
    );
    println!(
        "  {:<48} {:>9.2}   (aim: >= 10k intents/s end to end)",
        "ratio bulwark / raw",
        bulwark / raw
    );

    // Latency at fixed offered rates (the aim's, then a fifth of it): submission to completion.
    for (round, rate) in [rate, rate / 5].into_iter().enumerate() {
        let total = (rate as f64 * seconds) as u64;
        let submitted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let per_tick = (rate / 1000).max(1);
        let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 * per_tick / rate));
        let mut sent = 0;
        let offered_start = Instant::now();
        while sent < total {
            ticker.tick().await;
            for _ in 0..per_tick.min(total - sent) {
                let id = format!("lat{round}-{sent}");
                submitted.lock().await.insert(id.clone(), Instant::now());
                let client = client.clone();
                tokio::spawn(async move {
                    let _ = client.request(subjects::INTENT_SUBMIT, intent(&id)).await;
                });
                sent += 1;
            }
        }
        let achieved = sent as f64 / offered_start.elapsed().as_secs_f64();
        completed
            .wait_for(&format!("lat{round}-"), total, Duration::from_secs(300))
            .await?;
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let done = completed.times.lock().await.clone();
        for (id, t0) in submitted.lock().await.iter() {
            if let Some(t1) = done.get(id) {
                hist.record(t1.saturating_duration_since(*t0).as_micros().max(1) as u64)?;
            }
        }
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        println!();
        println!(
            "latency submit -> completed at {rate}/s offered for {seconds:.0} s ({achieved:.0}/s achieved, {} completed):",
            hist.len()
        );
        println!(
            "  p50 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms   (aim: p99 <= 25 ms at 5k/s)",
            ms(0.5),
            ms(0.99),
            hist.max() as f64 / 1000.0
        );
    }
    Ok(())
}

/// `scripts/bench pipeline --cluster`: the saturation throughput on one server and on a
/// three-node cluster (streams and buckets at three replicas) in the same run, then the
/// scheduler failover time: the leader killed under load to the first dispatch by the standby.
pub async fn run_cluster(smoke: bool) -> anyhow::Result<()> {
    let n = if smoke { 500u64 } else { 10_000 };
    println!(
        "bench pipeline --cluster: {n} tier 2 intents, no-op handler, 3 workers, 64 submissions in flight"
    );
    let single = {
        let server = NatsServer::start();
        let cfg = server.config();
        let client = server.client().await;
        saturation(cfg, &client, n).await?
    };
    let mut cluster = NatsCluster::start(3).await;
    let (clustered, failover, ttl) = {
        let mut cfg = cluster.config();
        // The default lease, as deployed.
        cfg.replicas.lease_ttl_s = bulwark_common::BulwarkConfig::default()
            .replicas
            .lease_ttl_s;
        let client = cluster.client().await;
        let clustered = saturation(cfg.clone(), &client, n).await?;
        let failover = failover(cfg.clone(), &client).await?;
        (clustered, failover, cfg.replicas.lease_ttl_s)
    };
    cluster.kill(0);
    println!();
    println!("saturation, submit -> completed:");
    println!(
        "  {:<52} {:>9.0} intents/s",
        "one nats-server (streams R1)", single
    );
    println!(
        "  {:<52} {:>9.0} intents/s",
        "three-node cluster (streams and buckets R3)", clustered
    );
    println!(
        "  {:<52} {:>9.2}",
        "ratio cluster / single",
        clustered / single
    );
    println!();
    println!(
        "failover: scheduler leader killed under load -> first dispatch by the standby: {:.2} s (lease_ttl_s {ttl})",
        failover.as_secs_f64()
    );
    Ok(())
}

/// Governance, a scheduler and three workers on `cfg`; `n` intents submitted 64 at a time;
/// intents per second from the first submission to the last completion.
async fn saturation(
    mut cfg: bulwark_common::BulwarkConfig,
    client: &async_nats::Client,
    n: u64,
) -> anyhow::Result<f64> {
    cfg.worker.capacity = 64;
    cfg.worker.heartbeat_interval_s = 1.0;
    let _gov = start_governance(cfg.clone()).await;
    let _sched = start_scheduler(cfg.clone()).await;
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start_worker(cfg.clone(), &format!("sat-w{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let completed = Completions::watch(client).await?;
    let start = Instant::now();
    let permits = Arc::new(Semaphore::new(64));
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let client = client.clone();
        tokio::spawn(async move {
            let _ = client
                .request(subjects::INTENT_SUBMIT, intent(&format!("csat-{i}")))
                .await;
            drop(permit);
        });
    }
    completed
        .wait_for("csat-", n, Duration::from_secs(600))
        .await?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Two schedulers; intents at 100/s; the leader is killed; the time until the first task is
/// dispatched after that (only the new leader can dispatch).
async fn failover(
    cfg: bulwark_common::BulwarkConfig,
    client: &async_nats::Client,
) -> anyhow::Result<Duration> {
    let _gov = start_governance(cfg.clone()).await;
    let leader: RunningService = start_scheduler(cfg.clone()).await;
    // The first one leads once the lease is taken; the second stands by.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _standby = spawn_service("scheduler", cfg.clone(), bulwark_scheduler::run);
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start_worker(cfg.clone(), &format!("fo-w{i}")).await);
    }
    let mut dispatched = client.subscribe("mesh.task.dispatched").await?;
    client.flush().await?;
    let submitter = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(10));
            for i in 0.. {
                ticker.tick().await;
                let client = client.clone();
                tokio::spawn(async move {
                    let _ = client
                        .request(subjects::INTENT_SUBMIT, intent(&format!("fo-{i}")))
                        .await;
                });
            }
        })
    };
    // Load flows; then the leader dies.
    let mut seen = 0;
    while seen < 50 {
        if dispatched.next().await.is_some() {
            seen += 1;
        }
    }
    leader.crash().await;
    let killed = Instant::now();
    // Dispatches already in flight when it died may still be announced: skip the first 500 ms.
    let first = loop {
        let Some(_) = tokio::time::timeout(Duration::from_secs(120), dispatched.next()).await?
        else {
            bail!("no dispatch after the leader was killed");
        };
        let at = killed.elapsed();
        if at > Duration::from_millis(500) {
            break at;
        }
    };
    submitter.abort();
    Ok(first)
}

fn intent(id: &str) -> bytes::Bytes {
    json!({"intent_id": id, "intent_type": "query_knowledge", "actor": "bench", "payload": {},
           "mission_context": {"learning_impact": true}})
    .to_string()
    .into()
}

/// Completion times of tasks, from `mesh.task.completed`.
struct Completions {
    times: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Completions {
    async fn watch(client: &async_nats::Client) -> anyhow::Result<Self> {
        let mut sub = client.subscribe("mesh.task.completed").await?;
        let times: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let sink = times.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload)
                    && let Some(id) = v["payload"]["task_id"].as_str()
                {
                    sink.lock().await.insert(id.to_owned(), Instant::now());
                }
            }
        });
        client.flush().await?;
        Ok(Completions { times })
    }

    async fn wait_for(&self, prefix: &str, n: u64, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self
                .times
                .lock()
                .await
                .keys()
                .filter(|k| k.starts_with(prefix))
                .count() as u64;
            if seen >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {seen} of {n} {prefix}* tasks completed within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
