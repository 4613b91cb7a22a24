//! The services this binary can run, in-process (`bulwark up`) or alone (`bulwark serve`).

use std::sync::Arc;

use bulwark_common::connect::{self, Role};
use bulwark_common::replica::{self, Replica, ReplicaEnd};
use bulwark_common::{BulwarkConfig, Narrator};
use tokio_util::sync::CancellationToken;

use crate::cli::ServiceName;

impl ServiceName {
    /// The NATS micro name the service registers under.
    pub fn micro_name(self) -> &'static str {
        match self {
            ServiceName::Governance => bulwark_governance::service::SERVICE_NAME,
            ServiceName::Clarity => bulwark_clarity::service::SERVICE_NAME,
            ServiceName::StormGuard => bulwark_storm_guard::service::SERVICE_NAME,
            ServiceName::EventPolicyEngine => bulwark_event_policy::service::SERVICE_NAME,
            ServiceName::Scheduler => bulwark_scheduler::SERVICE_NAME,
            ServiceName::HtmWorker => bulwark_worker::SERVICE_NAME,
            ServiceName::HtmPool => bulwark_worker::pool::SERVICE_NAME,
            ServiceName::Watchdog => bulwark_watchdog::SERVICE_NAME,
            ServiceName::Playbooks => bulwark_playbooks::SERVICE_NAME,
            ServiceName::Notify => bulwark_console::notify::SERVICE_NAME,
        }
    }

    /// What a user reaches it by, for the readiness line.
    pub fn summary(self) -> &'static str {
        match self {
            ServiceName::Governance => {
                "htm.intent.submit, htm.intent.status, htm.intent.cancel, governance.review.*, unified_logic.vote"
            }
            ServiceName::Clarity => "clarity.query, clarity.verify (stores clarity.narrative.>)",
            ServiceName::StormGuard => "storm_guard.status; watches mesh.>, trips mesh.breaker.*",
            ServiceName::EventPolicyEngine => {
                "event_policy.rules; policy rules over mesh.> (policies/*.toml)"
            }
            ServiceName::Scheduler => {
                "htm.task.queue.* -> workers; htm.task.result, scheduler.pause|resume|shed|replay, htm.readiness"
            }
            ServiceName::HtmWorker => {
                "htm.worker.<id>.task, heartbeats on htm.heartbeat.<id> (as [nats] worker_user)"
            }
            ServiceName::HtmPool => {
                "htm.pool.status|kill|respawn; keeps worker.count workers alive"
            }
            ServiceName::Watchdog => "watchdog.report; alerts on mesh.layer2.<severity>_alert",
            ServiceName::Playbooks => {
                "playbook.run|list|check|reload; incidents start playbooks/*.rhai"
            }
            ServiceName::Notify => "notify.log; webhooks of [notify] (reviews, votes, alerts)",
        }
    }

    /// Every service `bulwark up` starts, in start order (workers are started by count).
    pub fn all() -> &'static [ServiceName] {
        &[
            ServiceName::Governance,
            ServiceName::Clarity,
            ServiceName::StormGuard,
            ServiceName::EventPolicyEngine,
            ServiceName::Scheduler,
            ServiceName::Watchdog,
            ServiceName::Playbooks,
            ServiceName::Notify,
        ]
    }
}

/// Runs one replica of `service` until `shutdown` (`bulwark serve`). A replica that
/// quarantines itself ends with an error saying so: its process supervisor (systemd
/// `Restart=on-failure`, Kubernetes) respawns it.
pub async fn run(
    service: ServiceName,
    cfg: BulwarkConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let replica = Replica::new(service.micro_name(), &cfg.replicas, &shutdown);
    run_replica(service, cfg, replica).await?;
    Ok(())
}

/// Connects as `service` and runs it as `replica` (guarded: heartbeats, error counts,
/// quarantine) until the replica's token is cancelled.
pub async fn run_replica(
    service: ServiceName,
    cfg: BulwarkConfig,
    replica: Arc<Replica>,
) -> Result<(), ReplicaEnd> {
    let name = service.micro_name();
    let (client, stats) = connect::connect(&cfg.nats, name, Role::Service)
        .await
        .map_err(|e| ReplicaEnd::Unavailable(format!("{name} cannot connect: {e}")))?;
    let narrator = Narrator::new(
        bulwark_common::streams::context(
            client.clone(),
            std::time::Duration::from_millis(cfg.nats.request_timeout_ms),
        ),
        name,
        replica.id(),
    );
    let c = client.clone();
    let ended = replica::run_guarded(replica, client.clone(), stats, narrator, |token| async {
        run_service(service, cfg, c, token).await.map_err(|err| {
            // JetStream not answering yet is retried; anything else is a failure.
            let text = format!("{name} failed: {err}");
            if err.chain().any(replica::unavailable_cause) {
                ReplicaEnd::Unavailable(text)
            } else {
                ReplicaEnd::Failed(text)
            }
        })
    })
    .await;
    // Push out what is buffered (last narratives, replies) before the connection drops.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.flush()).await;
    ended
}

/// Runs `service` on `client` until `shutdown`.
async fn run_service(
    service: ServiceName,
    cfg: BulwarkConfig,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match service {
        ServiceName::Governance => bulwark_governance::run(cfg, client, shutdown).await?,
        ServiceName::Clarity => bulwark_clarity::run(cfg, client, shutdown).await?,
        ServiceName::StormGuard => bulwark_storm_guard::run(cfg, client, shutdown).await?,
        ServiceName::EventPolicyEngine => bulwark_event_policy::run(cfg, client, shutdown).await?,
        ServiceName::Scheduler => bulwark_scheduler::run(cfg, client, shutdown).await?,
        // The worker speaks on a connection of its own, as a worker; this one (a service's)
        // carries only the replica's heartbeats and narratives.
        ServiceName::HtmWorker => bulwark_worker::run(cfg, shutdown).await?,
        ServiceName::HtmPool => {
            // Ids unique per process, so pools on several machines do not collide.
            let prefix = &bulwark_common::ids::new_id().replace('-', "")[24..];
            let ids = (1..=cfg.worker.count)
                .map(|i| format!("pool-{prefix}-w{i}"))
                .collect();
            bulwark_worker::pool::run_pool(cfg, client, shutdown, ids).await?
        }
        ServiceName::Watchdog => bulwark_watchdog::run(cfg, client, shutdown).await?,
        ServiceName::Playbooks => bulwark_playbooks::run(cfg, client, shutdown).await?,
        ServiceName::Notify => bulwark_console::notify::run(cfg, client, shutdown).await?,
    }
    Ok(())
}
