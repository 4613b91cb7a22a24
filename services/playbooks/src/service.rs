//! The playbooks service: the incident consumer, the endpoints, run bookkeeping (one run per
//! playbook and resource, cooldowns, repeats counted), and the announcements of every run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, kv, message::PublishMessage};
use async_nats::service::Request;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::BulwarkConfig;
use bulwark_common::envelope::{Assigned, MeshEvent};
use bulwark_common::micro::{self, EndpointSpec};
use bulwark_common::narrative::Narrator;
use bulwark_common::{ids, mesh, streams, subjects, telemetry, time};

use crate::host::Requester;
use crate::playbook::{Forwarding, Library, Meta, Playbook};
use crate::runner::{self, Outcome, Phase, Plan, Progress, Settings, Status};
use crate::sandbox::{Limits, Packages};

/// Name under which the service registers (CONTRACT section 5).
pub const SERVICE_NAME: &str = "playbooks";
/// Durable consumer of incidents and emergencies on `BULWARK_MESH`.
const CONSUMER: &str = "playbooks";
/// Largest accepted request.
const MAX_BODY: usize = 64 * 1024;
/// Time given to running playbooks at shutdown before they are cancelled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlaybooksError {
    /// A stream or bucket is unavailable.
    #[error("{0}")]
    Store(#[from] streams::StoreError),
    /// The incident consumer could not be made.
    #[error("incident consumer: {0}")]
    Consumer(String),
    /// Registration with NATS micro failed.
    #[error("{0}")]
    Register(String),
}

/// What the service counts.
#[derive(Debug, Default)]
struct Counters {
    incidents: AtomicU64,
    started: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    suppressed: AtomicU64,
    refused: AtomicU64,
    stale: AtomicU64,
    malformed: AtomicU64,
    /// Incidents whose payload carried keys the playbook does not forward (ignored).
    keys_ignored: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({"incidents": get(&self.incidents), "runs_started": get(&self.started),
               "runs_completed": get(&self.completed), "runs_failed": get(&self.failed),
               "suppressed": get(&self.suppressed), "refused": get(&self.refused),
               "stale": get(&self.stale), "malformed": get(&self.malformed),
               "keys_ignored": get(&self.keys_ignored)})
    }
}

/// The last run of a playbook, kept in `bulwark_playbook_runs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRun {
    /// The run.
    pub run_id: String,
    /// `completed` or `failed`.
    pub status: String,
    /// The resource it acted on.
    pub resource: String,
    /// When it started.
    pub started: String,
    /// How long it took, milliseconds.
    pub duration_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether the rollback ran and succeeded.
    pub rollback: Option<bool>,
    /// What started it: `<event_type> <event_id>` of the incident (`event.incident ...`,
    /// `event.emergency ...`) or `manual`.
    pub trigger: String,
    /// Incidents for the same playbook and resource counted (not run) during it.
    pub repeats: u64,
    /// Keys of the incident's payload taken as parameters (the playbook's `forward` list);
    /// empty for a manual run.
    #[serde(default)]
    pub forwarded: Vec<String>,
    /// Keys of the incident's payload not taken (unlisted, or replaced by an override).
    #[serde(default)]
    pub ignored: Vec<String>,
}

struct ActiveRun {
    run_id: String,
    repeats: u64,
}

#[derive(Default)]
struct Runs {
    active: HashMap<(String, String), ActiveRun>,
    /// Until when repeated incidents are only counted, and how many were.
    cooldown: HashMap<(String, String), (Instant, u64)>,
}

/// What a run request refused.
enum Refusal {
    /// The same playbook runs on the same resource.
    Running(String),
    /// It ran recently.
    Cooldown(f64),
}

struct Service {
    cfg: BulwarkConfig,
    dir: PathBuf,
    packages: Packages,
    library: RwLock<Arc<Library>>,
    settings: Settings,
    js: jetstream::Context,
    runs_bucket: kv::Store,
    narrator: Narrator,
    runs: Mutex<Runs>,
    counters: Counters,
    requester: Arc<NatsRequester>,
    cancelled: Arc<AtomicBool>,
    tracker: TaskTracker,
}

/// Sends the host API's requests over NATS from the blocking thread a script runs on.
struct NatsRequester {
    client: Client,
    handle: tokio::runtime::Handle,
    timeout: Duration,
}

impl Requester for NatsRequester {
    fn request(&self, subject: &str, body: Value) -> Result<Value, String> {
        let reply = self.handle.block_on(tokio::time::timeout(
            self.timeout,
            self.client
                .request(subject.to_owned(), api::to_bytes(&body)),
        ));
        let msg = match reply {
            Err(_) => return Err(format!("{subject}: no answer within {:?}", self.timeout)),
            Ok(Err(err)) => return Err(format!("{subject}: {err}")),
            Ok(Ok(msg)) => msg,
        };
        let value: Value = serde_json::from_slice(&msg.payload)
            .map_err(|e| format!("{subject}: the reply is not JSON: {e}"))?;
        let failed = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(api::SERVICE_ERROR_CODE))
            .map(|code| code.to_string());
        match failed {
            Some(code) => Err(format!(
                "{subject} refused ({code}): {}",
                value["error"]["message"]
                    .as_str()
                    .unwrap_or("no reason given")
            )),
            None => Ok(value),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    playbook: String,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    wait: bool,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Run,
    List,
    Check,
    Reload,
}

/// Runs the playbooks service until `shutdown`.
pub async fn run(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), PlaybooksError> {
    let timeout = Duration::from_millis(cfg.nats.request_timeout_ms);
    let js = streams::context(client.clone(), timeout);
    streams::narratives(&js).await?;
    let stream = mesh::mesh_stream(&js, &cfg.mesh).await?;
    let runs_bucket = streams::bucket(
        &js,
        streams::PLAYBOOK_RUNS_BUCKET,
        "bulwark playbooks: the last run of each playbook",
    )
    .await?;
    let packages = Packages::new();
    let limits = Limits::from(&cfg.playbooks);
    let dir = PathBuf::from(&cfg.playbooks.dir);
    let library = Library::load(&dir, &packages, &limits);
    for err in &library.errors {
        tracing::error!("playbook not loaded: {err}");
    }
    tracing::info!(
        "playbooks: {} loaded from {} ({})",
        library.playbooks.len(),
        dir.display(),
        library.names().join(", ")
    );
    let tracker = TaskTracker::new();
    let service = Arc::new(Service {
        settings: Settings::new(
            &packages,
            limits,
            cfg.playbooks.time_scale,
            cfg.playbooks.max_wait_s,
            cfg.playbooks.max_run_s,
        ),
        packages,
        requester: Arc::new(NatsRequester {
            client: client.clone(),
            handle: tokio::runtime::Handle::current(),
            timeout: Duration::from_millis(cfg.playbooks.host_timeout_ms),
        }),
        narrator: Narrator::new(js.clone(), SERVICE_NAME, "playbooks runner"),
        dir,
        library: RwLock::new(Arc::new(library)),
        js,
        runs_bucket,
        runs: Mutex::default(),
        counters: Counters::default(),
        cancelled: Arc::default(),
        tracker: tracker.clone(),
        cfg,
    });
    let consumer = stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.to_owned()),
                description: Some(
                    "playbooks: incidents and emergencies start playbooks (not held by the breaker)"
                        .to_owned(),
                ),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                deliver_policy: DeliverPolicy::New,
                filter_subjects: vec![
                    subjects::MESH_INCIDENT.to_owned(),
                    subjects::MESH_EMERGENCY.to_owned(),
                ],
                ..Default::default()
            },
        )
        .await
        .map_err(|e| PlaybooksError::Consumer(e.to_string()))?;
    tracker.spawn(consume(service.clone(), consumer, shutdown.clone()));

    let endpoints: [EndpointSpec<Op>; 4] = [
        ("run", subjects::PLAYBOOK_RUN, Op::Run),
        ("list", subjects::PLAYBOOK_LIST, Op::List),
        ("check", subjects::PLAYBOOK_CHECK, Op::Check),
        ("reload", subjects::PLAYBOOK_RELOAD, Op::Reload),
    ];
    let stats = service.clone();
    let state = service.clone();
    let registered = micro::register(
        &micro::serving_client(&service.cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark playbooks: incidents start sandboxed Rhai remediation; run, list, check, reload",
        move || stats.counters.snapshot(),
        &endpoints,
        &tracker,
        &shutdown,
        32,
        move |op, request| {
            let state = state.clone();
            async move { state.handle(op, &request).await }
        },
    )
    .await
    .map_err(PlaybooksError::Register)?;
    let figures = service.clone();
    telemetry::spawn(
        client.clone(),
        SERVICE_NAME,
        Duration::from_secs_f64(service.cfg.telemetry.interval_s.max(0.1)),
        shutdown.clone(),
        move || {
            let mut v = figures.counters.snapshot();
            v["component"] = json!(SERVICE_NAME);
            v["active_runs"] = json!(figures.lock_runs().active.len());
            v["health_status"] = json!("healthy");
            v
        },
    );

    shutdown.cancelled().await;
    // Running scripts get a moment, then are cancelled between two operations.
    let cancel = service.cancelled.clone();
    tokio::spawn(async move {
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        cancel.store(true, Ordering::Relaxed);
    });
    micro::finish(SERVICE_NAME, registered, tracker, SHUTDOWN_GRACE * 2).await;
    Ok(())
}

/// Reads incidents and emergencies until `shutdown`, re-subscribing after errors.
async fn consume(s: Arc<Service>, consumer: consumer::PullConsumer, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(error = %err, "playbooks: cannot read incidents; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                msg = messages.next() => msg,
            };
            match msg {
                Some(Ok(msg)) => {
                    let (seq, stored_ms) = match msg.info() {
                        Ok(info) => (
                            info.stream_sequence,
                            (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
                        ),
                        Err(_) => (0, time::now_ms()),
                    };
                    s.incident(&msg.subject, &msg.payload, seq, stored_ms).await;
                    if let Err(err) = msg.ack().await {
                        tracing::debug!(error = %err, "playbooks: incident ack failed");
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "playbooks: incident stream error");
                }
                None => break,
            }
        }
    }
}

impl Service {
    fn lock_runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What an incident's payload contributes to a run of `meta` (its `forward` keys, the
    /// operator's overrides over them).
    fn forwarding(&self, meta: &Meta, payload: &Value) -> Forwarding {
        meta.forwarding(payload, self.cfg.playbooks.overrides.get(&meta.name))
    }

    /// `given` (a manual run's parameters, the operator's own) over the configured overrides
    /// of `playbook` (`playbooks.overrides`).
    fn with_overrides(&self, playbook: &str, given: &Value) -> Value {
        let Some(overrides) = self.cfg.playbooks.overrides.get(playbook) else {
            return given.clone();
        };
        let given = match given {
            Value::Object(m) => m.clone(),
            Value::Null => serde_json::Map::new(),
            // Not an object: let binding refuse it with its own message.
            other => return other.clone(),
        };
        let mut merged: serde_json::Map<String, Value> = overrides
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        merged.extend(given);
        Value::Object(merged)
    }

    fn library(&self) -> Arc<Library> {
        self.library
            .read()
            .map(|l| l.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    async fn handle(self: &Arc<Self>, op: Op, request: &Request) {
        let body = &request.message.payload;
        match op {
            Op::Run => api::respond(request, self.run_request(body).await).await,
            Op::List => api::respond(request, Ok::<_, ApiError>(self.list().await)).await,
            Op::Check => api::respond(request, Ok::<_, ApiError>(self.check())).await,
            Op::Reload => api::respond(request, self.reload().await).await,
        }
    }

    // ---- incidents ------------------------------------------------------------------------------

    async fn incident(self: &Arc<Self>, subject: &str, body: &[u8], seq: u64, stored_ms: i64) {
        self.counters.incidents.fetch_add(1, Ordering::Relaxed);
        let event = match MeshEvent::normalise_assigning(
            subject,
            body,
            self.cfg.mesh.max_event_bytes,
            || Assigned::stored(seq, stored_ms),
        ) {
            Ok(event) => event,
            Err(reason) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                self.dead_letter(subject, body, seq, &reason).await;
                return;
            }
        };
        let age_s = (time::now_ms() - stored_ms) as f64 / 1000.0;
        let name = event.payload["playbook"].as_str().map(str::to_owned);
        if age_s > self.cfg.playbooks.max_incident_age_s {
            self.counters.stale.fetch_add(1, Ordering::Relaxed);
            let n = self
                .narrator
                .narrative("incident_stale", "playbooks incident consumer")
                .why(format!(
                    "incident {} is {age_s:.0} s old, over playbooks.max_incident_age_s = {}: not acted on",
                    event.event_id, self.cfg.playbooks.max_incident_age_s
                ))
                .context(json!({"incident_id": event.event_id, "playbook": name, "age_s": age_s}));
            self.narrator.publish(n).await;
            return;
        }
        let Some(name) = name else {
            self.refuse(
                &event,
                "",
                format!(
                    "the {} payload names no playbook (a string field \"playbook\" is required)",
                    event.event_type
                ),
            )
            .await;
            return;
        };
        let library = self.library();
        let Some(playbook) = library.playbooks.get(&name).cloned() else {
            self.refuse(
                &event,
                &name,
                format!(
                    "unknown playbook {name:?}; loaded: {}",
                    library.names().join(", ")
                ),
            )
            .await;
            return;
        };
        if !playbook.meta.triggers.contains(&event.event_type) {
            self.refuse(
                &event,
                &name,
                format!(
                    "{name} is not started by {} (its triggers: {})",
                    event.event_type,
                    playbook.meta.triggers.join(", ")
                ),
            )
            .await;
            return;
        }
        // The parameters are the playbook's, not the event's: only the keys it forwards are
        // taken, and the operator's overrides win over them.
        let forwarding = self.forwarding(&playbook.meta, &event.payload);
        if !forwarding.ignored.is_empty() {
            self.counters.keys_ignored.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(playbook = %name, ignored = ?forwarding.ignored, "incident keys not forwarded");
        }
        let params = match playbook.meta.bind(&Value::Object(forwarding.given)) {
            Ok(p) => p,
            Err(err) => {
                self.refuse(&event, &name, err.0).await;
                return;
            }
        };
        match self.start(playbook, params, Some(event), false, false) {
            Ok(_) => {}
            Err(Refusal::Running(run_id)) => {
                self.counters.suppressed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(playbook = %name, %run_id, "incident counted: the playbook runs already");
            }
            Err(Refusal::Cooldown(left)) => {
                self.counters.suppressed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(playbook = %name, left_s = left, "incident counted: the playbook is cooling down");
            }
        }
    }

    /// An incident that cannot start a run: a `mesh.playbook.failed` event, a narrative, a count.
    async fn refuse(&self, incident: &MeshEvent, playbook: &str, reason: String) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        let run_id = ids::new_id();
        tracing::warn!(incident = %incident.event_id, "playbook not started: {reason}");
        let payload = json!({"playbook": playbook, "run_id": run_id, "params": incident.payload,
                             "stage": "refused", "error": reason, "incident_id": incident.event_id});
        self.announce(
            Some(incident),
            "playbook.failed",
            &run_id,
            playbook,
            payload,
        )
        .await;
        let n = self
            .narrator
            .narrative("playbook_refused", "playbooks incident consumer")
            .why(format!(
                "{} {} could not start a playbook: {reason}",
                incident.event_type, incident.event_id
            ))
            .context(
                json!({"incident_id": incident.event_id, "playbook": playbook, "run_id": run_id,
                            "correlation_id": incident.correlation_id}),
            );
        self.narrator.publish(n).await;
    }

    async fn dead_letter(&self, subject: &str, body: &[u8], seq: u64, reason: &str) {
        let stored = mesh::dead_letter_event(SERVICE_NAME, subject, body, seq, reason);
        let publish = PublishMessage::build()
            .payload(api::to_bytes(&stored))
            .message_id(bulwark_common::mesh::private_id(&format!(
                "deadletter:{seq}"
            )));
        match self
            .js
            .send_publish(subjects::MESH_DEADLETTER, publish)
            .await
        {
            Ok(ack) => {
                let _ = ack.await;
            }
            Err(err) => tracing::warn!(error = %err, "playbooks: dead letter not stored"),
        }
        let n = self
            .narrator
            .narrative("incident_dead_lettered", "playbooks incident consumer")
            .why(format!(
                "{subject} (stream sequence {seq}) is malformed: {reason}"
            ))
            .why(format!(
                "written to {} with the reason",
                subjects::MESH_DEADLETTER
            ))
            .context(json!({"subject": subject, "stream_seq": seq, "reason": reason}));
        self.narrator.publish(n).await;
    }

    // ---- runs -----------------------------------------------------------------------------------

    /// Starts a run unless the same playbook runs on the same resource (or, for incidents,
    /// cools down); returns the run id and a receiver of its outcome.
    fn start(
        self: &Arc<Self>,
        playbook: Playbook,
        params: serde_json::Map<String, Value>,
        trigger: Option<MeshEvent>,
        dry_run: bool,
        manual: bool,
    ) -> Result<(String, oneshot::Receiver<Outcome>), Refusal> {
        let resource = playbook.meta.resource_of(&params);
        let key = (playbook.meta.name.clone(), resource.clone());
        let run_id = ids::new_id();
        if !dry_run {
            let mut runs = self.lock_runs();
            if let Some(active) = runs.active.get_mut(&key) {
                active.repeats += 1;
                return Err(Refusal::Running(active.run_id.clone()));
            }
            if !manual && let Some((until, repeats)) = runs.cooldown.get_mut(&key) {
                let now = Instant::now();
                if *until > now {
                    *repeats += 1;
                    return Err(Refusal::Cooldown((*until - now).as_secs_f64()));
                }
            }
            runs.cooldown.remove(&key);
            runs.active.insert(
                key.clone(),
                ActiveRun {
                    run_id: run_id.clone(),
                    repeats: 0,
                },
            );
        }
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        let (done, outcome) = oneshot::channel();
        let s = self.clone();
        let plan = Plan {
            playbook,
            params,
            run_id: run_id.clone(),
            dry_run,
        };
        self.tracker.spawn(async move {
            let outcome = s.execute(plan, trigger, key, resource).await;
            let _ = done.send(outcome);
        });
        Ok((run_id, outcome))
    }

    /// Announces the start, runs the script on a blocking thread while announcing its steps,
    /// then announces the end and records it.
    async fn execute(
        self: Arc<Self>,
        plan: Plan,
        trigger: Option<MeshEvent>,
        key: (String, String),
        resource: String,
    ) -> Outcome {
        if plan.dry_run {
            return self.dry_run(plan).await;
        }
        let meta = plan.playbook.meta.clone();
        let name = meta.name.clone();
        let run_id = plan.run_id.clone();
        let started_at = time::now();
        let trigger_text = trigger.as_ref().map_or_else(
            || "manual".to_owned(),
            |t| format!("{} {}", t.event_type, t.event_id),
        );
        let params = Value::Object(plan.params.clone());
        let forwarding = trigger
            .as_ref()
            .map(|t| self.forwarding(&meta, &t.payload))
            .unwrap_or_default();
        self.announce(
            trigger.as_ref(),
            "playbook.started",
            &run_id,
            &name,
            json!({"playbook": name, "run_id": run_id, "params": params, "resource": resource,
                   "forwarded": forwarding.forwarded, "ignored": forwarding.ignored,
                   "dry_run": plan.dry_run, "trigger": trigger_text,
                   "steps": meta.steps.iter().map(|s| s.title.clone()).collect::<Vec<_>>(),
                   "slo_s": meta.slo_s}),
        )
        .await;
        let n = self
            .narrator
            .narrative(
                "playbook_started",
                &format!("playbook {name} ({})", plan.playbook.path.display()),
            )
            .why(format!("started by {trigger_text} for resource {resource}"))
            .why(if trigger.is_none() {
                "parameters given by hand, over the operator's overrides".to_owned()
            } else {
                format!(
                    "parameters: the defaults, the incident's {} (the keys it forwards), the operator's overrides over them; ignored from the incident: {}",
                    list_or_none(&forwarding.forwarded),
                    list_or_none(&forwarding.ignored)
                )
            })
            .why(format!(
                "{} step(s): {}",
                meta.steps.len(),
                meta.steps
                    .iter()
                    .map(|s| s.title.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
            .context(json!({"playbook": name, "run_id": run_id, "params": params,
                            "forwarded": forwarding.forwarded, "ignored": forwarding.ignored}));
        self.narrator.publish(n).await;

        let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
        let settings = self.settings.clone();
        let requester: Arc<dyn Requester> = self.requester.clone();
        let cancelled = self.cancelled.clone();
        let blocking_plan = plan.clone();
        let mut work = tokio::task::spawn_blocking(move || {
            runner::execute(&blocking_plan, &settings, requester, cancelled, &|p| {
                let _ = tx.send(p);
            })
        });
        let outcome = loop {
            tokio::select! {
                progress = rx.recv() => {
                    if let Some(progress) = progress {
                        self.progress(trigger.as_ref(), &plan, &params, progress).await;
                    }
                }
                done = &mut work => {
                    while let Ok(progress) = rx.try_recv() {
                        self.progress(trigger.as_ref(), &plan, &params, progress).await;
                    }
                    break match done {
                        Ok(outcome) => outcome,
                        Err(err) => failed_outcome(&plan, format!("the run crashed: {err}")),
                    };
                }
            }
        };

        // (A dry run never gets here: it holds no slot, see `dry_run`.)
        let repeats = {
            let mut runs = self.lock_runs();
            let repeats = runs.active.remove(&key).map_or(0, |a| a.repeats);
            let cooldown = meta.cooldown_s * self.settings.time_scale;
            let now = Instant::now();
            // Cooldowns that ended are forgotten: the map holds only those running now.
            runs.cooldown.retain(|_, (until, _)| *until > now);
            runs.cooldown
                .insert(key, (now + Duration::from_secs_f64(cooldown), 0));
            repeats
        };
        let (kind, what, counter) = match outcome.status {
            Status::Completed => (
                "playbook.completed",
                "playbook_completed",
                &self.counters.completed,
            ),
            Status::Failed => ("playbook.failed", "playbook_failed", &self.counters.failed),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.announce(
            trigger.as_ref(),
            kind,
            &run_id,
            &name,
            json!({"playbook": name, "run_id": run_id, "params": params, "resource": resource,
                   "forwarded": forwarding.forwarded, "ignored": forwarding.ignored,
                   "status": outcome.status, "error": outcome.error, "error_kind": outcome.error_kind,
                   "verified": outcome.verified, "rollback": outcome.rollback,
                   "duration_ms": outcome.duration_ms, "slo_s": meta.slo_s,
                   "slo_met": (outcome.duration_ms as f64) <= meta.slo_s * 1000.0,
                   "actions": outcome.actions.len(), "repeats": repeats,
                   "dry_run": plan.dry_run}),
        )
        .await;
        let mut n = self
            .narrator
            .narrative(what, &format!("playbook {name}"))
            .why(match &outcome.error {
                None => format!(
                    "all {} step(s) done{} in {} ms (SLO {} s)",
                    meta.steps.len(),
                    if outcome.verified == Some(true) {
                        " and verified"
                    } else {
                        ""
                    },
                    outcome.duration_ms,
                    meta.slo_s
                ),
                Some(e) => e.clone(),
            })
            .why(format!("{} action(s) taken", outcome.actions.len()));
        if let Some(ok) = outcome.rollback {
            n = n.why(if ok {
                "rolled back".to_owned()
            } else {
                "the rollback failed too".to_owned()
            });
        }
        if repeats > 0 {
            n = n.why(format!(
                "{repeats} repeated incident(s) during the run were counted, not run"
            ));
        }
        let n = n.context(
            json!({"playbook": name, "run_id": run_id, "status": outcome.status,
                                 "duration_ms": outcome.duration_ms, "repeats": repeats}),
        );
        self.narrator.publish(n).await;
        let last = LastRun {
            run_id: run_id.clone(),
            status: match outcome.status {
                Status::Completed => "completed".into(),
                Status::Failed => "failed".into(),
            },
            resource,
            started: started_at,
            duration_ms: outcome.duration_ms,
            error: outcome.error.clone(),
            rollback: outcome.rollback,
            trigger: trigger_text,
            repeats,
            forwarded: forwarding.forwarded,
            ignored: forwarding.ignored,
        };
        if let Err(err) = self.runs_bucket.put(&name, api::to_bytes(&last)).await {
            tracing::warn!(error = %err, playbook = %name, "last run not stored");
        }
        outcome
    }

    /// A dry run: no mesh events and no narratives of its steps (nothing happened); one
    /// `playbook_dry_run` narrative records who tried what and the actions it would take.
    async fn dry_run(self: Arc<Self>, plan: Plan) -> Outcome {
        let settings = self.settings.clone();
        let requester: Arc<dyn Requester> = self.requester.clone();
        let cancelled = self.cancelled.clone();
        let blocking_plan = plan.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            runner::execute(&blocking_plan, &settings, requester, cancelled, &|_| {})
        })
        .await
        .unwrap_or_else(|err| failed_outcome(&plan, format!("the run crashed: {err}")));
        let name = &plan.playbook.meta.name;
        let mut n = self
            .narrator
            .narrative("playbook_dry_run", &format!("playbook {name}, dry run"))
            .why(format!(
                "dry run of {name}: reads were real, {} action(s) would be taken, none was",
                outcome.actions.len()
            ));
        for call in &outcome.actions {
            n = n.why(format!("would call {}({})", call.function, call.args));
        }
        let n = n.context(json!({"playbook": name, "run_id": plan.run_id,
                                 "params": Value::Object(plan.params.clone()),
                                 "status": outcome.status}));
        self.narrator.publish(n).await;
        outcome
    }

    async fn progress(
        &self,
        trigger: Option<&MeshEvent>,
        plan: &Plan,
        params: &Value,
        progress: Progress,
    ) {
        let name = &plan.playbook.meta.name;
        match progress {
            Progress::Narration(n) => {
                let narrative = self
                    .narrator
                    .narrative(&n.what, &format!("playbook {name}, narrate()"))
                    .why(n.why)
                    .context(json!({"playbook": name, "run_id": plan.run_id}));
                self.narrator.publish(narrative).await;
            }
            Progress::Step(step) => {
                self.announce(
                    trigger,
                    "playbook.step",
                    &plan.run_id,
                    name,
                    json!({"playbook": name, "run_id": plan.run_id, "step": step.title,
                           "index": step.index, "phase": step.phase, "fn": step.run, "ok": step.ok,
                           "result": step.result, "error": step.error, "calls": step.calls,
                           "duration_ms": step.duration_ms, "params": params,
                           "dry_run": plan.dry_run}),
                )
                .await;
                let what = match step.phase {
                    Phase::Step => "playbook_step",
                    Phase::Verify => "playbook_verification",
                    Phase::Rollback => "playbook_rollback",
                };
                let mut n = self
                    .narrator
                    .narrative(what, &format!("playbook {name}, fn {}", step.run))
                    .why(format!(
                        "step {}: {} {}",
                        step.index,
                        step.title,
                        if step.ok { "done" } else { "FAILED" }
                    ));
                for call in &step.calls {
                    n = n.why(format!(
                        "{}({}) -> {}",
                        call.function,
                        call.args,
                        call.error
                            .clone()
                            .unwrap_or_else(|| call.result.to_string())
                    ));
                }
                if let Some(e) = &step.error {
                    n = n.why(e.clone());
                }
                let n = n.context(
                    json!({"playbook": name, "run_id": plan.run_id, "step": step.index,
                                         "result": step.result, "calls": step.calls}),
                );
                self.narrator.publish(n).await;
            }
        }
    }

    /// Publishes a `mesh.<kind>` event of a run (caused by `trigger` when there is one).
    async fn announce(
        &self,
        trigger: Option<&MeshEvent>,
        kind: &str,
        run_id: &str,
        playbook: &str,
        payload: Value,
    ) {
        let mut event = match trigger {
            Some(t) => t.child(kind, SERVICE_NAME, payload),
            None => MeshEvent::root(kind, SERVICE_NAME, payload),
        };
        event.resource = Some(format!("playbook/{playbook}"));
        event.subsystem = Some("playbooks".to_owned());
        let publish = PublishMessage::build()
            .payload(api::to_bytes(&event))
            .message_id(bulwark_common::mesh::private_id(&format!(
                "{kind}:{run_id}:{}",
                event.event_id
            )));
        let stored = match self.js.send_publish(subjects::mesh(kind), publish).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = stored {
            tracing::warn!(error = %err, %kind, %run_id, "playbook event not stored");
        }
    }

    // ---- endpoints ------------------------------------------------------------------------------

    async fn run_request(self: &Arc<Self>, body: &[u8]) -> Result<Value, ApiError> {
        let req: RunRequest = api::decode(body, "invalid_run", MAX_BODY)?;
        let library = self.library();
        let Some(playbook) = library.playbooks.get(&req.playbook).cloned() else {
            return Err(ApiError::not_found(
                "unknown_playbook",
                format!(
                    "unknown playbook {:?}; loaded: {}",
                    req.playbook,
                    library.names().join(", ")
                ),
            ));
        };
        let params = playbook
            .meta
            .bind(&self.with_overrides(&req.playbook, &req.params.unwrap_or(Value::Null)))
            .map_err(|e| ApiError::bad_request("invalid_params", e.0))?;
        let resource = playbook.meta.resource_of(&params);
        let (run_id, outcome) = match self.start(playbook, params, None, req.dry_run, true) {
            Ok(started) => started,
            Err(Refusal::Running(run_id)) => {
                return Err(ApiError::conflict(
                    "already_running",
                    format!("{} runs on {resource} already (run {run_id})", req.playbook),
                ));
            }
            Err(Refusal::Cooldown(_)) => {
                return Err(ApiError::internal("manual runs have no cooldown"));
            }
        };
        if req.dry_run || req.wait {
            let outcome = outcome
                .await
                .map_err(|_| ApiError::internal("the run ended without an outcome"))?;
            return serde_json::to_value(outcome).map_err(|e| ApiError::internal(e.to_string()));
        }
        Ok(
            json!({"run_id": run_id, "playbook": req.playbook, "resource": resource, "started": true}),
        )
    }

    async fn list(&self) -> Value {
        let library = self.library();
        let mut items = Vec::new();
        for (name, pb) in &library.playbooks {
            let last: Option<LastRun> = match self.runs_bucket.get(name).await {
                Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
                _ => None,
            };
            let running: Vec<String> = self
                .lock_runs()
                .active
                .iter()
                .filter(|((n, _), _)| n == name)
                .map(|((_, r), a)| format!("{r} ({})", a.run_id))
                .collect();
            items.push(json!({"name": name, "description": pb.meta.description,
                              "file": pb.path.display().to_string(),
                              "triggers": pb.meta.triggers, "params": pb.meta.params,
                              "resource": pb.meta.resource, "slo_s": pb.meta.slo_s,
                              "cooldown_s": pb.meta.cooldown_s,
                              "steps": pb.meta.steps, "verify": pb.meta.verify,
                              "rollback": pb.meta.rollback, "last_run": last, "running": running}));
        }
        json!({"playbooks": items, "errors": library.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
               "counters": self.counters.snapshot()})
    }

    fn check(&self) -> Value {
        let fresh = Library::load(&self.dir, &self.packages, &self.settings.limits);
        json!({"ok": fresh.errors.is_empty(), "playbooks": fresh.names(),
               "errors": fresh.errors.iter().map(|e| json!({"file": e.file, "location": e.location,
                                                            "message": e.message})).collect::<Vec<_>>()})
    }

    async fn reload(&self) -> Result<Value, ApiError> {
        let fresh = Library::load(&self.dir, &self.packages, &self.settings.limits);
        if !fresh.errors.is_empty() {
            return Err(ApiError::bad_request(
                "playbooks_invalid",
                format!(
                    "not reloaded, the loaded playbooks stay: {}",
                    fresh
                        .errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ));
        }
        let names = fresh.names();
        if let Ok(mut library) = self.library.write() {
            *library = Arc::new(fresh);
        }
        let n = self
            .narrator
            .narrative("playbooks_reloaded", "playbook.reload")
            .why(format!(
                "{} playbook(s) compiled: {}",
                names.len(),
                names.join(", ")
            ));
        self.narrator.publish(n).await;
        Ok(json!({"reloaded": true, "playbooks": names}))
    }
}

fn list_or_none(keys: &[String]) -> String {
    if keys.is_empty() {
        "none".to_owned()
    } else {
        keys.join(", ")
    }
}

fn failed_outcome(plan: &Plan, error: String) -> Outcome {
    Outcome {
        run_id: plan.run_id.clone(),
        playbook: plan.playbook.meta.name.clone(),
        status: Status::Failed,
        dry_run: plan.dry_run,
        params: Value::Object(plan.params.clone()),
        steps: Vec::new(),
        verified: None,
        rollback: None,
        error: Some(error),
        error_kind: Some("crash".to_owned()),
        actions: Vec::new(),
        duration_ms: 0,
    }
}
