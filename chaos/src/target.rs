//! The system under test: a connection to a running bulwark (`--nats-url`) or to the runner's
//! own [`Stack`], and the probes the runner asks it: readiness, the breaker, pings, the pool,
//! the mesh consumers; and the steady-state checks built from them.

use std::time::Duration;

use async_nats::jetstream;
use bulwark_common::connect::{self, Role};
use bulwark_common::{BulwarkConfig, streams, subjects};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::scenario::Check;
use crate::stack::Stack;

/// How long a probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Services the `services_answer` check pings.
pub const REQUIRED: [&str; 6] = [
    "governance",
    "clarity",
    "storm_guard",
    "event_policy_engine",
    "scheduler",
    "watchdog",
];

/// The system under test.
pub struct Target {
    /// Service-credential connection of the runner.
    pub client: async_nats::Client,
    /// JetStream on it.
    pub js: jetstream::Context,
    /// The configuration of the system (the stack's, or the one loaded for `--nats-url`).
    pub cfg: BulwarkConfig,
    /// The runner's own stack, when self-contained.
    pub stack: Option<Mutex<Stack>>,
}

impl Target {
    /// Connects to the running bulwark of `cfg` with the service credentials.
    pub async fn external(cfg: BulwarkConfig) -> anyhow::Result<Target> {
        let (client, _) = connect::connect(&cfg.nats, "bulwark-chaos", Role::Service).await?;
        Ok(Self::with_client(client, cfg, None))
    }

    /// Connects to `stack`.
    pub async fn own(stack: Stack) -> anyhow::Result<Target> {
        let cfg = stack.cfg.clone();
        let (client, _) = connect::connect(&cfg.nats, "bulwark-chaos", Role::Service).await?;
        Ok(Self::with_client(client, cfg, Some(Mutex::new(stack))))
    }

    fn with_client(
        client: async_nats::Client,
        cfg: BulwarkConfig,
        stack: Option<Mutex<Stack>>,
    ) -> Self {
        let js = streams::context(client.clone(), Duration::from_secs(10));
        Target {
            client,
            js,
            cfg,
            stack,
        }
    }

    /// A JSON request with a short timeout; `None` when nothing answered in time or the reply
    /// is not JSON.
    pub async fn ask(&self, subject: &str, body: &str) -> Option<Value> {
        let reply = tokio::time::timeout(
            PROBE_TIMEOUT,
            self.client
                .request(subject.to_owned(), body.to_owned().into()),
        )
        .await
        .ok()?
        .ok()?;
        serde_json::from_slice(&reply.payload).ok()
    }

    /// `htm.readiness`.
    pub async fn readiness(&self) -> Option<Value> {
        self.ask(subjects::HTM_READINESS, "{}").await
    }

    /// The breaker state from `storm_guard.status` (`closed`, `open`, `half_open`).
    pub async fn breaker(&self) -> Option<String> {
        self.ask(subjects::STORM_GUARD_STATUS, "{}")
            .await
            .and_then(|v| v["breaker"]["state"].as_str().map(str::to_owned))
    }

    /// `htm.pool.status`.
    pub async fn pool(&self) -> Option<Value> {
        self.ask(subjects::POOL_STATUS, "{}").await
    }

    /// Unprocessed events of the durable mesh consumer `name`: pending plus unacknowledged.
    pub async fn consumer_backlog(&self, name: &str) -> Option<u64> {
        let mut stream = self.js.get_stream(streams::MESH_STREAM).await.ok()?;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(name).await.ok()?;
        let _ = &mut stream;
        let info = consumer.info().await.ok()?;
        Some(info.num_pending + info.num_ack_pending as u64)
    }

    /// Runs one check; `Err` says why it does not hold.
    pub async fn check(&self, check: Check) -> Result<(), String> {
        match check {
            Check::ServicesAnswer => {
                let mut silent = Vec::new();
                for name in REQUIRED {
                    let ping = self.ask(&format!("$SRV.PING.{name}"), "").await;
                    if ping.is_none() {
                        silent.push(name);
                    }
                }
                if silent.is_empty() {
                    Ok(())
                } else {
                    Err(format!("no answer to $SRV.PING from {}", silent.join(", ")))
                }
            }
            Check::HtmReady => match self.readiness().await {
                Some(r) if r["htm_ready"] == true => Ok(()),
                Some(r) => Err(format!("htm not ready: {}", r["reasons"])),
                None => Err("htm.readiness did not answer".into()),
            },
            Check::BreakerClosed => match self.breaker().await.as_deref() {
                Some("closed") => Ok(()),
                Some(state) => Err(format!("the breaker is {state}")),
                None => Err("storm_guard.status did not answer".into()),
            },
            Check::TaskQueueEmpty => match self.readiness().await {
                Some(r) if r["queue_depth"] == 0 && r["in_flight"] == 0 => Ok(()),
                Some(r) => Err(format!(
                    "{} task(s) queued, {} in flight",
                    r["queue_depth"], r["in_flight"]
                )),
                None => Err("htm.readiness did not answer".into()),
            },
            Check::PoolFull => match self.pool().await {
                Some(p) => {
                    let workers = p["workers"].as_array().cloned().unwrap_or_default();
                    let down: Vec<String> = workers
                        .iter()
                        .filter(|w| w["state"] != "running")
                        .map(|w| {
                            format!(
                                "{} {}",
                                w["worker_id"].as_str().unwrap_or("?"),
                                w["state"].as_str().unwrap_or("?")
                            )
                        })
                        .collect();
                    if workers.is_empty() {
                        Err("the pool has no workers".into())
                    } else if down.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("workers not running: {}", down.join(", ")))
                    }
                }
                None => Err("htm.pool.status did not answer".into()),
            },
            Check::MeshConsumersCaughtUp => {
                match self
                    .consumer_backlog(bulwark_event_policy::service::SERVICE_NAME)
                    .await
                {
                    Some(0) => Ok(()),
                    Some(n) => Err(format!(
                        "the event policy engine has {n} mesh event(s) to process"
                    )),
                    None => Err("the event policy engine's mesh consumer is missing".into()),
                }
            }
            Check::NarrativeLogComplete => {
                let (backlog, stored, report) = self.narrative_log().await?;
                if backlog > 0 {
                    Err(format!(
                        "clarity has {backlog} of {stored} stored narrative(s) still to append"
                    ))
                } else if report["ok"] != true {
                    Err(format!(
                        "clarity.verify: the audit chain is broken at {} ({})",
                        report["first_bad_seq"], report["reason"]
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The narrative log: clarity's backlog on `BULWARK_NARRATIVES` (pending plus
    /// unacknowledged), the narratives stored, and the `clarity.verify` report.
    pub async fn narrative_log(&self) -> Result<(u64, u64, Value), String> {
        let mut stream = self
            .js
            .get_stream(streams::NARRATIVES_STREAM)
            .await
            .map_err(|e| format!("no {} stream: {e}", streams::NARRATIVES_STREAM))?;
        let stored = stream
            .info()
            .await
            .map(|i| i.state.messages)
            .map_err(|e| format!("{} info: {e}", streams::NARRATIVES_STREAM))?;
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(bulwark_clarity::service::CONSUMER)
            .await
            .map_err(|e| format!("clarity's narrative consumer is missing: {e}"))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| format!("clarity's narrative consumer: {e}"))?;
        let backlog = info.num_pending + info.num_ack_pending as u64;
        let report = self
            .ask(subjects::CLARITY_VERIFY, "{}")
            .await
            .ok_or_else(|| "clarity.verify did not answer".to_owned())?;
        Ok((backlog, stored, report))
    }

    /// Runs every check; the failures, each with its reason.
    pub async fn steady_state(&self, checks: &[Check]) -> Vec<(Check, String)> {
        let mut failures = Vec::new();
        for &c in checks {
            if let Err(why) = self.check(c).await {
                failures.push((c, why));
            }
        }
        failures
    }
}
