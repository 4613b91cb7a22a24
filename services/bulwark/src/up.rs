//! `bulwark up` and `bulwark serve`: run the services until Ctrl-C or SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_common::BulwarkConfig;
use bulwark_common::connect::{self, Role};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::ServiceName;
use crate::nats_server::{self, LocalServer};
use crate::services;

/// Time services get to finish in-flight work after the stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs every service in this process, starting a local nats-server when needed.
pub async fn up(
    mut cfg: BulwarkConfig,
    url_given: bool,
    workers: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let shutdown = bulwark_common::shutdown::on_signal();
    let local = local_server(&mut cfg, url_given).await?;

    // Every service, `up.replicas` times, each replica under a supervisor that respawns it when
    // it is quarantined, fails or crashes (bulwark_common::replica).
    let (supervisor_client, _) =
        connect::connect(&cfg.nats, "bulwark-supervisor", Role::Service).await?;
    let supervisor = bulwark_common::Narrator::new(
        bulwark_common::streams::context(
            supervisor_client,
            Duration::from_millis(cfg.nats.request_timeout_ms),
        ),
        "supervisor",
        &format!("bulwark-up/{}", std::process::id()),
    );
    let mut running = JoinSet::new();
    for &service in ServiceName::all() {
        for _ in 0..cfg.up.replicas {
            let cfg = cfg.clone();
            let token = shutdown.clone();
            let narrator = supervisor.clone();
            running.spawn(async move {
                let replicas = cfg.replicas.clone();
                let supervised = bulwark_common::replica::supervise(
                    service.micro_name(),
                    &replicas,
                    narrator,
                    token,
                    |replica| tokio::spawn(services::run_replica(service, cfg.clone(), replica)),
                )
                .await;
                (service, supervised.map_err(anyhow::Error::msg))
            });
        }
    }
    let (probe, _probe_stats) = connect::connect(&cfg.nats, "bulwark-up", Role::Service).await?;
    start_metrics(&cfg, probe.clone(), shutdown.clone()).await;
    let console = crate::console::start(&cfg, shutdown.clone()).await;
    let mut failed = false;
    let mut all_ready = true;
    wait_services(&probe, &mut running, &shutdown, &mut failed).await;
    all_ready &= !shutdown.is_cancelled();
    // Workers, in the pool that respawns them when they die (NATS micro service `htm_pool`).
    let worker_count = workers.unwrap_or(cfg.worker.count);
    let pool_ids: Vec<String> = (1..=worker_count).map(|i| format!("worker-{i}")).collect();
    let pool = {
        let (client, _) = connect::connect(&cfg.nats, "htm_pool", Role::Service).await?;
        let pool_cfg = cfg.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            bulwark_worker::pool::run_pool(pool_cfg, client, token, pool_ids).await
        })
    };
    if worker_count > 0 && !shutdown.is_cancelled() {
        let seen = wait_for_workers(&probe, worker_count).await;
        println!(
            "  ready  {:<20} {seen} of {worker_count} worker(s) heartbeating",
            "htm_worker"
        );
        all_ready &= seen >= worker_count;
    }
    if all_ready {
        println!(
            "bulwark: up on {}; Ctrl-C stops",
            connect::redact_url(&cfg.nats.url)
        );
    }

    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        Some(done) = running.join_next() => ended_early(done, &mut failed, &shutdown),
    }
    println!("bulwark: stopping");
    match pool.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => eprintln!("bulwark: worker pool: {err}"),
        Err(err) => eprintln!("bulwark: worker pool crashed: {err}"),
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(done) = running.join_next().await {
            report(done, &mut failed);
        }
    })
    .await;
    if drained.is_err() {
        eprintln!("bulwark: services did not stop within {SHUTDOWN_GRACE:?}");
        failed = true;
    }
    if let Some(console) = console {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, console).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), probe.drain()).await;
    if let Some(server) = local {
        server.stop(Duration::from_secs(10)).await;
    }
    println!("bulwark: stopped");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The NATS server to use: the one `cfg.nats.url` reaches, else a local nats-server started
/// with a copy of `up.nats_conf` (then `cfg.nats.url` is set to it).
async fn local_server(
    cfg: &mut BulwarkConfig,
    url_given: bool,
) -> anyhow::Result<Option<LocalServer>> {
    if reachable(cfg).await {
        println!(
            "bulwark: using the NATS server at {}",
            connect::redact_url(&cfg.nats.url)
        );
        return Ok(None);
    }
    connect::parse_urls(&cfg.nats.url)?;
    let url: &str = &cfg.nats.url;
    let (host, port) = host_port(url.split(',').next().unwrap_or(url))?;
    if url_given && !matches!(host.as_str(), "127.0.0.1" | "localhost") {
        bail!(
            "no NATS server answers at {}; start it, or omit --nats-url to run a local one",
            connect::redact_url(&cfg.nats.url)
        );
    }
    let binary = nats_server::find_binary(&cfg.up.nats_server)?;
    let log = std::path::Path::new("data").join("nats-server.log");
    let synced = cfg.nats.durability == bulwark_common::config::Durability::Synced;
    println!(
        "bulwark: starting {} -c {} (a copy of {}) on {host}:{port} (log: {}; durability {}{})",
        binary.display(),
        log.with_file_name("nats-server.conf").display(),
        cfg.up.nats_conf.display(),
        log.display(),
        cfg.nats.durability.as_str(),
        if synced { ": sync_interval always" } else { "" }
    );
    let mut server =
        LocalServer::start(&binary, &cfg.up.nats_conf, &host, port, &log, synced).await?;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(cfg.up.server_start_timeout_ms);
    cfg.nats.url = format!("nats://{host}:{port}");
    while !reachable(cfg).await {
        if !server.running() || tokio::time::Instant::now() > deadline {
            bail!(
                "the local nats-server did not come up; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Some(server))
}

/// Prints each service ready as it answers; a service still waiting for JetStream (a slow
/// broker, a cluster electing its leader) is retried by its supervisor, and named here every
/// 15 s. Returns when all are ready, at the stop signal, or when a supervisor ended.
async fn wait_services(
    probe: &async_nats::Client,
    running: &mut JoinSet<(ServiceName, anyhow::Result<()>)>,
    shutdown: &CancellationToken,
    failed: &mut bool,
) {
    let mut pending: Vec<ServiceName> = ServiceName::all().to_vec();
    let mut last_note = tokio::time::Instant::now();
    while !pending.is_empty() && !shutdown.is_cancelled() {
        let mut still = Vec::new();
        for service in pending {
            let name = service.micro_name();
            if bulwark_common::micro::wait_ready(probe, name, Duration::from_millis(500)).await {
                println!("  ready  {name:<20} {}", service.summary());
            } else {
                still.push(service);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if last_note.elapsed() >= Duration::from_secs(15) {
            let names: Vec<&str> = pending.iter().map(|s| s.micro_name()).collect();
            println!(
                "  waiting  {} (not answering $SRV.INFO yet; retried while JetStream is unavailable, see the log)",
                names.join(", ")
            );
            last_note = tokio::time::Instant::now();
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {}
            Some(done) = running.join_next() => ended_early(done, failed, shutdown),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Waits up to 30 s for `count` workers to heartbeat; returns how many did.
async fn wait_for_workers(client: &async_nats::Client, count: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while tokio::time::Instant::now() < deadline {
        let reply = tokio::time::timeout(
            Duration::from_secs(1),
            client.request(bulwark_common::subjects::HTM_READINESS, "{}".into()),
        )
        .await;
        if let Ok(Ok(msg)) = reply
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload)
        {
            seen = v["healthy_workers"].as_u64().unwrap_or(0) as usize;
            if seen >= count {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

/// A service's supervisor ended before the stop: a failure unless the stop signal came
/// meanwhile; the others are stopped.
fn ended_early(
    done: Result<(ServiceName, anyhow::Result<()>), tokio::task::JoinError>,
    failed: &mut bool,
    shutdown: &CancellationToken,
) {
    report(done, failed);
    *failed |= !shutdown.is_cancelled();
    shutdown.cancel();
}

fn report(
    done: Result<(ServiceName, anyhow::Result<()>), tokio::task::JoinError>,
    failed: &mut bool,
) {
    match done {
        Ok((_, Ok(()))) => {}
        Ok((service, Err(err))) => {
            *failed = true;
            eprintln!("bulwark: {} failed: {err:#}", service.micro_name());
        }
        Err(err) => {
            *failed = true;
            eprintln!("bulwark: a service panicked: {err}");
        }
    }
}

/// Runs one service until Ctrl-C or SIGTERM.
pub async fn serve(service: ServiceName, cfg: BulwarkConfig) -> anyhow::Result<ExitCode> {
    let shutdown = bulwark_common::shutdown::on_signal();
    tracing::info!(service = service.micro_name(), url = %connect::redact_url(&cfg.nats.url), "serving");
    if !cfg.metrics.listen.is_empty() {
        let (client, _) = connect::connect(&cfg.nats, "bulwark-metrics", Role::Service).await?;
        start_metrics(&cfg, client, shutdown.clone()).await;
    }
    services::run(service, cfg, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Starts the `/metrics` endpoint; a port already taken (say, by another `bulwark serve` on this
/// machine) is reported and skipped, not fatal.
async fn start_metrics(
    cfg: &BulwarkConfig,
    client: async_nats::Client,
    shutdown: CancellationToken,
) {
    match crate::metrics::serve(&cfg.metrics.listen, client, shutdown).await {
        Ok(Some(addr)) => println!("  metrics  http://{addr}/metrics"),
        Ok(None) => {}
        Err(err) => eprintln!("bulwark: {err:#}; continuing without /metrics (set metrics.listen)"),
    }
}

async fn reachable(cfg: &BulwarkConfig) -> bool {
    let mut quick = cfg.nats.clone();
    quick.connect_timeout_ms = quick.connect_timeout_ms.min(1_500);
    connect::connect(&quick, "bulwark-probe", Role::Cli)
        .await
        .is_ok()
}

fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.trim().split("://").nth(1).unwrap_or(url.trim());
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let rest = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .with_context(|| format!("bad port in {url}"))?,
        ),
        None => (rest, 4222),
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_and_port_from_urls() {
        assert_eq!(
            host_port("nats://127.0.0.1:4222").expect("ok"),
            ("127.0.0.1".into(), 4222)
        );
        assert_eq!(
            host_port("nats://u:p@localhost:5000").expect("ok"),
            ("localhost".into(), 5000)
        );
        assert_eq!(
            host_port("localhost").expect("ok"),
            ("localhost".into(), 4222)
        );
        assert!(host_port("nats://h:x").is_err());
    }
}
