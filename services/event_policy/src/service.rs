//! The event policy engine's I/O: the mesh consumer feeding [`crate::rules`] and
//! [`crate::cascade`], and the actions (child events, intents, incidents) around them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::service::Request;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::BulwarkConfig;
use bulwark_common::envelope::MeshEvent;
use bulwark_common::mesh::{Delivery, MeshConsumer, MeshError};
use bulwark_common::narrative::Narrator;
use bulwark_common::{ids, streams, subjects, telemetry, time};

use crate::cascade::{CascadeGuard, Stop};
use crate::rules::{Action, PolicySet, Rule, to_json};

/// Name under which the service registers (CONTRACT section 5); also the `source` of every
/// event it produces and its mesh consumer's durable name.
pub const SERVICE_NAME: &str = "event_policy_engine";
/// Playbook named by cascade incidents (seed).
pub const CASCADE_PLAYBOOK: &str = "event_cascade_breaker";
/// Time given to in-flight work at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventPolicyError {
    /// A rule file has errors: every one, with file, line and reason.
    #[error("policy rules have errors, refusing to start:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Rules(Vec<crate::rules::RuleError>),
    /// A stream or bucket could not be made ready.
    #[error("{0}")]
    Store(#[from] streams::StoreError),
    /// The mesh consumer could not start.
    #[error("{0}")]
    Mesh(#[from] MeshError),
    /// Registration with NATS micro failed.
    #[error("{0}")]
    Register(String),
}

/// What the engine counts; reported in telemetry and `$SRV.STATS`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events evaluated.
    pub events: AtomicU64,
    /// Rule evaluations (events × rules).
    pub rules_evaluated: AtomicU64,
    /// Rules that matched.
    pub rules_fired: AtomicU64,
    /// Child events published.
    pub events_emitted: AtomicU64,
    /// Intents submitted and accepted.
    pub intents_submitted: AtomicU64,
    /// Intents governance refused.
    pub intents_refused: AtomicU64,
    /// Playbook incidents published.
    pub playbooks_run: AtomicU64,
    /// Children not produced: deeper than the limit.
    pub depth_stops: AtomicU64,
    /// Children not produced: a cycle.
    pub cycle_stops: AtomicU64,
    /// Children not produced: the correlation's fan-out limit.
    pub fanout_stops: AtomicU64,
    /// Cascade incidents published (one per correlation and kind).
    pub cascade_incidents: AtomicU64,
}

impl Counters {
    /// The counters as JSON.
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "events": get(&self.events),
            "rules_evaluated": get(&self.rules_evaluated),
            "rules_fired": get(&self.rules_fired),
            "events_emitted": get(&self.events_emitted),
            "intents_submitted": get(&self.intents_submitted),
            "intents_refused": get(&self.intents_refused),
            "playbooks_run": get(&self.playbooks_run),
            "depth_stops": get(&self.depth_stops),
            "cycle_stops": get(&self.cycle_stops),
            "fanout_stops": get(&self.fanout_stops),
            "cascade_incidents": get(&self.cascade_incidents),
        })
    }
}

struct Engine {
    client: Client,
    js: jetstream::Context,
    policies: PolicySet,
    guard: Mutex<CascadeGuard>,
    narrator: Narrator,
    counters: Arc<Counters>,
    timeout: Duration,
}

/// Runs the engine until `shutdown` is cancelled. Refuses to start when a rule file has errors.
pub async fn run(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), EventPolicyError> {
    let policies = PolicySet::load_dir(&cfg.mesh.policies_dir).map_err(EventPolicyError::Rules)?;
    let timeout = Duration::from_millis(cfg.nats.request_timeout_ms);
    let js = streams::context(client.clone(), timeout);
    streams::narratives(&js).await?;
    let instance = format!(
        "{SERVICE_NAME}@{}/{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned()),
        std::process::id()
    );
    let narrator = Narrator::new(js.clone(), SERVICE_NAME, &instance);
    let consumer = MeshConsumer::start(
        js.clone(),
        &cfg.mesh,
        SERVICE_NAME,
        narrator.clone(),
        &shutdown,
    )
    .await?;
    let consumer_stats = consumer.stats();
    tracing::info!(
        rules = policies.rules.len(),
        dir = %cfg.mesh.policies_dir.display(),
        "event policy engine loaded its rules"
    );
    let engine = Arc::new(Engine {
        client: client.clone(),
        js,
        policies,
        guard: Mutex::new(CascadeGuard::new(
            cfg.mesh.cascade_depth_limit,
            cfg.mesh.fanout_limit,
        )),
        narrator,
        counters: Arc::new(Counters::default()),
        timeout,
    });
    let tracker = TaskTracker::new();
    let snapshot = {
        let counters = engine.counters.clone();
        let consumer_stats = consumer_stats.clone();
        let rules = engine.policies.rules.len();
        move || {
            let mut figures = counters.snapshot();
            figures["rules"] = json!(rules);
            figures["consumer"] = consumer_stats.snapshot();
            figures["health_status"] = json!("healthy");
            figures
        }
    };
    let endpoints: [bulwark_common::micro::EndpointSpec<()>; 1] =
        [("rules", subjects::EVENT_POLICY_RULES, ())];
    let state = engine.clone();
    let service = bulwark_common::micro::register(
        &bulwark_common::micro::serving_client(&cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark event policy engine: rules from policy files turn mesh events into events, intents and playbooks",
        snapshot.clone(),
        &endpoints,
        &tracker,
        &shutdown,
        16,
        move |(), request: Request| {
            let state = state.clone();
            async move {
                let rules: Result<Value, ApiError> = Ok(json!({"rules": state.policies.rules}));
                api::respond(&request, rules).await;
            }
        },
    )
    .await
    .map_err(EventPolicyError::Register)?;
    let handler_engine = engine.clone();
    tracker.spawn(consumer.run(shutdown.clone(), move |event, delivery| {
        let engine = handler_engine.clone();
        async move { engine.handle(event, delivery).await }
    }));
    telemetry::spawn(
        client.clone(),
        SERVICE_NAME,
        Duration::from_secs_f64(cfg.telemetry.interval_s.max(0.1)),
        shutdown.clone(),
        snapshot,
    );
    shutdown.cancelled().await;
    bulwark_common::micro::finish(SERVICE_NAME, service, tracker, SHUTDOWN_GRACE).await;
    Ok(())
}

impl Engine {
    /// Evaluates every rule on `event` and runs the actions of those that match. An `Err`
    /// (JetStream or governance unreachable) has the event redelivered; children already
    /// published are recognised by their message ids.
    async fn handle(&self, event: MeshEvent, _delivery: Delivery) -> Result<(), String> {
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        let subject = subjects::mesh(&event.event_type);
        let value = serde_json::to_value(&event).map_err(|e| e.to_string())?;
        self.counters
            .rules_evaluated
            .fetch_add(self.policies.rules.len() as u64, Ordering::Relaxed);
        for rule in &self.policies.rules {
            if !rule.matches(&subject, &value) {
                continue;
            }
            self.counters.rules_fired.fetch_add(1, Ordering::Relaxed);
            let count = match &rule.action {
                Action::Emit(emit) => emit.count,
                _ => 1,
            };
            let mut produced = 0;
            let mut stopped = None;
            for n in 0..count {
                match self.act(rule, &event, n).await? {
                    Ok(()) => produced += 1,
                    Err(stop) => {
                        stopped = Some(stop);
                        break;
                    }
                }
            }
            let n = self
                .narrator
                .narrative("rule_fired", "event policy rule from a policy file")
                .why(format!(
                    "{} ({}) matched {} {} from {} at depth {}",
                    rule.name, rule.origin, event.event_type, event.event_id, event.source, event.depth
                ))
                .why(match (&rule.action, &stopped) {
                    (_, Some(stop)) => format!(
                        "{produced} of {count} actions done, then stopped by the {} safeguard",
                        stop.kind()
                    ),
                    (Action::Emit(e), None) => format!("emitted {produced} {} event(s)", e.event_type),
                    (Action::Intent(i), None) => format!("submitted intent {}", i.intent_type),
                    (Action::Playbook(p), None) => format!("ran playbook {}", p.name),
                })
                .context(json!({"rule": rule.name, "event_id": event.event_id,
                                "event_type": event.event_type, "depth": event.depth,
                                "produced": produced, "stopped": stopped.as_ref().map(Stop::kind)}));
            let mut n = n;
            n.correlation_id = Some(event.correlation_id.clone());
            self.narrator.publish(n).await;
        }
        Ok(())
    }

    /// Runs the `n`-th action of `rule` for `parent`: `Ok(Err(stop))` when a safeguard stopped it.
    async fn act(
        &self,
        rule: &Rule,
        parent: &MeshEvent,
        n: u64,
    ) -> Result<Result<(), Stop>, String> {
        let child_type = match &rule.action {
            Action::Emit(emit) => emit
                .event_type
                .replace("{depth}", &(parent.depth + 1).to_string()),
            Action::Intent(intent) => format!("intent.{}", intent.intent_type),
            Action::Playbook(_) => "event.incident".to_owned(),
        };
        let admitted = self.guard.lock().unwrap_or_else(|p| p.into_inner()).admit(
            parent,
            &child_type,
            SERVICE_NAME,
            time::now_ms(),
        );
        if let Err(stop) = admitted {
            self.stopped(rule, parent, &child_type, &stop).await;
            return Ok(Err(stop));
        }
        let msg_id = format!("{}:{}:{n}", parent.event_id, rule.name);
        match &rule.action {
            Action::Emit(emit) => {
                let mut child = parent.child(&child_type, SERVICE_NAME, to_json(&emit.payload));
                child.actor = Some(rule.name.clone());
                self.publish(&child, msg_id).await?;
                self.counters.events_emitted.fetch_add(1, Ordering::Relaxed);
            }
            Action::Playbook(playbook) => {
                // The incident carries the keys of the triggering event the rule forwards (no
                // other), the rule's `params` over them, then the incident's own keys. The
                // playbook takes from it only the keys it forwards itself.
                let mut payload: serde_json::Map<String, serde_json::Value> = playbook
                    .forward
                    .iter()
                    .filter_map(|k| parent.payload.get(k).map(|v| (k.clone(), v.clone())))
                    .collect();
                if let serde_json::Value::Object(params) = to_json(&playbook.params) {
                    payload.extend(params);
                }
                payload.extend(
                    json!({"trigger_id": parent.event_id, "playbook": playbook.name,
                           "severity": playbook.severity.as_deref().unwrap_or("high"),
                           "rule": rule.name, "event_type": parent.event_type})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                );
                let mut child = parent.child(
                    "event.incident",
                    SERVICE_NAME,
                    serde_json::Value::Object(payload),
                );
                child.actor = Some(rule.name.clone());
                self.publish(&child, msg_id).await?;
                self.counters.playbooks_run.fetch_add(1, Ordering::Relaxed);
            }
            Action::Intent(intent) => {
                let mut intent_id = format!("{}-{}-{n}", rule.name, parent.event_id);
                intent_id.truncate(128);
                let mut body = json!({"intent_id": intent_id, "intent_type": intent.intent_type,
                                      "actor": intent.actor.as_deref().unwrap_or(SERVICE_NAME),
                                      "payload": to_json(&intent.payload),
                                      "correlation_id": parent.correlation_id});
                if let Some(p) = intent.priority {
                    body["priority"] = json!(p);
                }
                let reply = tokio::time::timeout(
                    self.timeout,
                    self.client
                        .request(subjects::INTENT_SUBMIT, api::to_bytes(&body)),
                )
                .await
                .map_err(|_| "governance did not answer the intent in time".to_owned())?
                .map_err(|e| format!("intent not submitted: {e}"))?;
                let refused = reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(api::SERVICE_ERROR_CODE))
                    .map(|v| v.to_string());
                match refused {
                    Some(code) if code.starts_with('5') => {
                        return Err(format!("governance failed ({code}); will retry"));
                    }
                    Some(code) => {
                        self.counters
                            .intents_refused
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(rule = %rule.name, %code, reply = %String::from_utf8_lossy(&reply.payload), "intent of a rule refused");
                    }
                    None => {
                        self.counters
                            .intents_submitted
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(Ok(()))
    }

    async fn publish(&self, event: &MeshEvent, msg_id: String) -> Result<(), String> {
        let publish = PublishMessage::build()
            .payload(api::to_bytes(event))
            .message_id(bulwark_common::mesh::private_id(&msg_id));
        self.js
            .send_publish(subjects::mesh(&event.event_type), publish)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Counts a stop; the first per correlation and kind gets an incident and a narrative.
    async fn stopped(&self, rule: &Rule, parent: &MeshEvent, child_type: &str, stop: &Stop) {
        let counter = match stop {
            Stop::Depth { .. } => &self.counters.depth_stops,
            Stop::Cycle { .. } => &self.counters.cycle_stops,
            Stop::Fanout { .. } => &self.counters.fanout_stops,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let (first, produced) = {
            let mut guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
            (
                guard.first_stop(stop, &parent.correlation_id),
                guard.produced(&parent.correlation_id),
            )
        };
        if !first {
            return;
        }
        let depth = match stop {
            Stop::Depth { depth } => *depth,
            _ => parent.depth + 1,
        };
        let reason = match stop {
            Stop::Depth { depth } => format!(
                "a {child_type} child would be at depth {depth}, beyond the cascade depth limit"
            ),
            Stop::Cycle { event_type, source } => format!(
                "({event_type}, {source}) already occurs in the causal chain: a cycle, stopped at its second occurrence"
            ),
            Stop::Fanout { count } => format!(
                "correlation {} already produced {count} events, the fan-out limit",
                parent.correlation_id
            ),
        };
        let trigger_id = ids::new_id();
        let incident = MeshEvent::root(
            "event.incident",
            SERVICE_NAME,
            json!({"trigger_id": trigger_id, "playbook": CASCADE_PLAYBOOK, "severity": "high",
                   "reason": stop.kind(), "cascade_events": produced, "depth": depth,
                   "correlation_id": parent.correlation_id, "event_id": parent.event_id,
                   "event_type": child_type, "rule": rule.name}),
        );
        let msg_id = format!("cascade:{}:{}", stop.kind(), parent.correlation_id);
        match self.publish(&incident, msg_id).await {
            Ok(()) => {
                self.counters
                    .cascade_incidents
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => tracing::warn!(error = %err, "cascade incident not stored"),
        }
        let mut n = self
            .narrator
            .narrative(
                "cascade_stopped",
                "cascade safeguards: depth limit, cycle detection, fan-out limit",
            )
            .why(reason)
            .why(format!(
                "rule {} on {} {} (depth {}); {produced} events produced in this correlation",
                rule.name, parent.event_type, parent.event_id, parent.depth
            ))
            .why(format!(
                "incident names playbook {CASCADE_PLAYBOOK}; reported once per correlation"
            ))
            .context(
                json!({"reason": stop.kind(), "depth": depth, "cascade_events": produced,
                            "rule": rule.name, "incident_id": incident.event_id}),
            );
        n.correlation_id = Some(parent.correlation_id.clone());
        self.narrator.publish(n).await;
    }
}
