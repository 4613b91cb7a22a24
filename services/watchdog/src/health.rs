//! The Layer 2 health model, pure: what the watchdog knows of each component (its last telemetry
//! and when it arrived, whether it answers `$SRV.PING`, the HTM readiness), the seed's rules as
//! conditions, one alert state machine per condition, and the report. Time is a parameter
//! (`now: Instant`), so the tests drive a fake clock.
//!
//! Alert lifecycle of one condition (keyed `<component>.<condition>`): when it starts it is
//! `raised`; while it holds it is `repeated` at most every `realert_interval` (a change of
//! severity is raised again at once); when it clears one `recovered` notice is sent. No alert is
//! sent during the first `heartbeat_timeout` after the watchdog starts, so a stack coming up in
//! any order is not reported as broken.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bulwark_common::mesh::ConsumerFigures;
use serde_json::{Value, json};

/// The HTM orchestrator (its telemetry is published by the scheduler).
pub const HTM: &str = "htm_orchestrator";
/// The scheduler.
pub const SCHEDULER: &str = "scheduler";
/// The storm guard, reported as the trigger mesh.
pub const STORM_GUARD: &str = "storm_guard";
/// The event policy engine.
pub const EVENT_POLICY: &str = "event_policy_engine";
/// The report's name of the trigger mesh (the storm guard's figures).
pub const TRIGGER_MESH: &str = "trigger_mesh";
/// Micro name shared by the HTM workers (counted, not alerted: zero workers is an HTM rule).
/// Workers live in an account of their own (`nats.conf`), so their micro registrations never
/// answer bulwark's `$SRV.PING`: they are counted by their heartbeats, the scheduler's
/// `htm.readiness` `healthy_workers`.
pub const WORKERS: &str = "htm_worker";
/// The watchdog itself (its own telemetry and ping are not watched).
pub const SELF: &str = "watchdog";
/// The component name of the watchdog's own telemetry.
pub const LAYER2: &str = "layer2";

/// Components that publish `telemetry.<component>`: for them a silent telemetry is a missing
/// heartbeat.
const PUBLISHES_TELEMETRY: [&str; 5] = [
    SCHEDULER,
    STORM_GUARD,
    EVENT_POLICY,
    "governance",
    "clarity",
];

/// How bad a condition is (CONTRACT section 1: `mesh.layer2.<severity>_alert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Something needs a look.
    Warning,
    /// A safeguard is holding work back.
    High,
    /// Layer 2 cannot do its job.
    Critical,
}

impl Severity {
    /// Lower-case name, as in the subject.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// The health a condition of this severity leaves its component in.
    pub fn health(self) -> Health {
        match self {
            Severity::Warning | Severity::High => Health::Degraded,
            Severity::Critical => Health::Critical,
        }
    }
}

/// Overall or per-component health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    /// No condition holds.
    Healthy,
    /// Only warning or high conditions hold.
    Degraded,
    /// A critical condition holds.
    Critical,
}

impl Health {
    /// Lower-case name, as in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Critical => "critical",
        }
    }
}

/// A rule that holds right now.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The report's component name (`htm_orchestrator`, `trigger_mesh`, `scheduler`, ...).
    pub component: String,
    /// The rule, snake_case (`heartbeat_missing`, `queue_depth`, `no_workers`, ...).
    pub name: &'static str,
    /// How bad.
    pub severity: Severity,
    /// Why, with the numbers.
    pub reason: String,
}

impl Condition {
    /// `<component>.<name>`: what the alert state machine is keyed by.
    pub fn key(&self) -> String {
        format!("{}.{}", self.component, self.name)
    }
}

/// Where an alert stands in its condition's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    /// The condition started (or changed severity).
    Raised,
    /// The condition still holds after `realert_interval`.
    Repeated,
    /// The condition cleared.
    Recovered,
}

impl AlertState {
    /// Lower-case name, as in the payload's `state`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Raised => "raised",
            AlertState::Repeated => "repeated",
            AlertState::Recovered => "recovered",
        }
    }
}

/// An alert to announce.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// The condition (for a recovery: the one that cleared, with its last severity and reason).
    pub condition: Condition,
    /// Raised, repeated or recovered.
    pub state: AlertState,
    /// Overall health after this sweep.
    pub health: Health,
    /// How long the condition has held (for a recovery: how long it held).
    pub held_for: Duration,
}

/// The watchdog's figures (from `[watchdog]`, `telemetry.interval_s` and the scheduler's HTM
/// queue thresholds).
#[derive(Debug, Clone)]
pub struct Rules {
    /// Telemetry older than this is a missing heartbeat; also the startup grace.
    pub heartbeat_timeout: Duration,
    /// Least time between two alerts of one condition that still holds.
    pub realert_interval: Duration,
    /// HTM queue depth above this is a warning.
    pub htm_queue_warn: u64,
    /// HTM queue depth above this is critical.
    pub htm_queue_critical: u64,
    /// Dispatch rate (tasks/s) below this while tasks wait is a warning.
    pub min_dispatch_rate: f64,
    /// Services that must answer `$SRV.PING` even if never seen.
    pub required: Vec<String>,
    /// A mesh consumer that has held events at least this long while the storm guard reported
    /// the breaker closed all that time is alerted (`held_while_breaker_closed`); shorter holds
    /// are a transition on its way to the consumers.
    pub hold_grace: Duration,
    /// Fraction of a storage limit that raises `storage_near_limit`.
    pub storage_alert_ratio: f64,
    /// For this long after the watchdog starts, a service that has never answered a ping is
    /// `starting`, not critical: a stack just brought up registers its services in any order.
    pub startup_grace: Duration,
}

/// The storm guard's breaker figures, as its telemetry publishes them.
#[derive(Debug, serde::Deserialize)]
struct GuardBreaker {
    breaker_state: bulwark_common::mesh::BreakerState,
    #[serde(default)]
    breaker_since_ms: i64,
}

/// The last telemetry of a component.
#[derive(Debug, Clone)]
struct Telemetry {
    figures: Value,
    at: Instant,
}

/// What the watchdog knows of one service or telemetry component.
#[derive(Debug, Clone, Default)]
struct View {
    telemetry: Option<Telemetry>,
    /// Instances that answered the last `$SRV.PING` (None before the first sweep).
    instances: Option<usize>,
    /// It answered a ping or published telemetry at least once.
    seen: bool,
    /// It answered a ping at least once.
    answered: bool,
}

/// A condition whose alert is out.
#[derive(Debug, Clone)]
struct Open {
    condition: Condition,
    since: Instant,
    last_sent: Instant,
}

/// The watchdog's state: views, alert state machines, counters.
#[derive(Debug)]
pub struct Watch {
    rules: Rules,
    started: Instant,
    views: BTreeMap<String, View>,
    readiness: Option<Value>,
    /// SLA breaches at the previous sweep, and whether they rose since the one before.
    sla_seen: Option<u64>,
    sla_rising: Option<(u64, u64)>,
    open: BTreeMap<String, Open>,
    last_alert: BTreeMap<String, Value>,
    sweeps: u64,
    /// Alerts sent, by state: raised, repeated, recovered.
    sent: [u64; 3],
    /// JetStream use against its limits, as last measured.
    storage: Vec<crate::storage::Usage>,
    /// The durability in force (`fast` or `synced`).
    durability: &'static str,
}

impl Watch {
    /// A watch with `rules`, started at `now`.
    pub fn new(rules: Rules, now: Instant) -> Self {
        Watch {
            rules,
            started: now,
            views: BTreeMap::new(),
            readiness: None,
            sla_seen: None,
            sla_rising: None,
            open: BTreeMap::new(),
            last_alert: BTreeMap::new(),
            sweeps: 0,
            sent: [0; 3],
            storage: Vec::new(),
            durability: "fast",
        }
    }

    /// Records the storage use measured for the next sweep, and the durability in force.
    pub fn set_storage(&mut self, usage: Vec<crate::storage::Usage>, durability: &'static str) {
        self.storage = usage;
        self.durability = durability;
    }

    /// Records `telemetry.<component>` received at `now`. The watchdog's own is ignored.
    pub fn observe_telemetry(&mut self, component: &str, figures: Value, now: Instant) {
        if component == LAYER2 || !figures.is_object() {
            return;
        }
        let view = self.views.entry(component.to_owned()).or_default();
        view.telemetry = Some(Telemetry { figures, at: now });
        view.seen = true;
    }

    /// One sweep at `now`: the instances that answered `$SRV.PING` by service name, the
    /// scheduler's `htm.readiness` reply (None when it did not answer). The workers' instances
    /// are the readiness's `healthy_workers` (see [`WORKERS`]). Returns the alerts to announce,
    /// in condition order.
    pub fn sweep(
        &mut self,
        answering: &BTreeMap<String, usize>,
        readiness: Option<Value>,
        now: Instant,
    ) -> Vec<Alert> {
        self.sweeps += 1;
        let mut answering = answering.clone();
        if let Some(workers) = readiness
            .as_ref()
            .and_then(|r| r["healthy_workers"].as_u64())
        {
            answering.insert(WORKERS.to_owned(), workers as usize);
        }
        for name in answering.keys() {
            self.views.entry(name.clone()).or_default();
        }
        for (name, view) in &mut self.views {
            let n = answering.get(name).copied().unwrap_or(0);
            view.instances = Some(n);
            view.seen |= n > 0;
            view.answered |= n > 0;
        }
        self.readiness = readiness;
        let sla = self
            .fresh(HTM, now)
            .and_then(|f| f["sla_breaches"].as_u64());
        self.sla_rising = match (self.sla_seen, sla) {
            (Some(before), Some(after)) if after > before => Some((before, after)),
            _ => None,
        };
        if sla.is_some() {
            self.sla_seen = sla;
        }

        let conditions = self.conditions(now);
        if now < self.started + self.rules.heartbeat_timeout {
            return Vec::new();
        }
        let health = overall(&conditions);
        let mut alerts = Vec::new();
        let mut holding = BTreeSet::new();
        for condition in conditions {
            let key = condition.key();
            holding.insert(key.clone());
            let state = match self.open.get_mut(&key) {
                None => {
                    self.open.insert(
                        key,
                        Open {
                            condition: condition.clone(),
                            since: now,
                            last_sent: now,
                        },
                    );
                    Some((AlertState::Raised, Duration::ZERO))
                }
                Some(open) => {
                    let changed = open.condition.severity != condition.severity;
                    let due = now.saturating_duration_since(open.last_sent)
                        >= self.rules.realert_interval;
                    open.condition = condition.clone();
                    if changed || due {
                        open.last_sent = now;
                    }
                    let held = now.saturating_duration_since(open.since);
                    if changed {
                        Some((AlertState::Raised, held))
                    } else if due {
                        Some((AlertState::Repeated, held))
                    } else {
                        None
                    }
                }
            };
            if let Some((state, held_for)) = state {
                alerts.push(Alert {
                    condition,
                    state,
                    health,
                    held_for,
                });
            }
        }
        let cleared: Vec<String> = self
            .open
            .keys()
            .filter(|k| !holding.contains(*k))
            .cloned()
            .collect();
        for key in cleared {
            if let Some(open) = self.open.remove(&key) {
                alerts.push(Alert {
                    condition: open.condition,
                    state: AlertState::Recovered,
                    health,
                    held_for: now.saturating_duration_since(open.since),
                });
            }
        }
        for alert in &alerts {
            let slot = match alert.state {
                AlertState::Raised => 0,
                AlertState::Repeated => 1,
                AlertState::Recovered => 2,
            };
            self.sent[slot] += 1;
        }
        alerts
    }

    /// Remembers `alert` as its component's last alert, stamped `at` (wall clock, RFC 3339).
    pub fn note_sent(&mut self, alert: &Alert, at: &str) {
        self.last_alert.insert(
            alert.condition.component.clone(),
            json!({"condition": alert.condition.name, "severity": alert.condition.severity.as_str(),
                   "state": alert.state.as_str(), "reason": alert.condition.reason, "at": at}),
        );
    }

    /// The figures of `component` when its telemetry is fresh.
    fn fresh(&self, component: &str, now: Instant) -> Option<&Value> {
        let t = self.views.get(component)?.telemetry.as_ref()?;
        (now.saturating_duration_since(t.at) <= self.rules.heartbeat_timeout).then_some(&t.figures)
    }

    /// Instances of `name` that answered the last ping; None before the first sweep. A service
    /// absent from the answers (never seen included) answered with 0.
    fn answering(&self, name: &str) -> Option<usize> {
        if self.sweeps == 0 {
            return None;
        }
        Some(self.views.get(name).and_then(|v| v.instances).unwrap_or(0))
    }

    /// True once every required service has answered a ping.
    pub fn all_required_answered(&self) -> bool {
        self.rules
            .required
            .iter()
            .all(|name| self.views.get(name).is_some_and(|v| v.answered))
    }

    /// True while `name` has never answered a ping and the watchdog is in its startup grace.
    fn starting(&self, name: &str, now: Instant) -> bool {
        now < self.started + self.rules.startup_grace
            && !self.views.get(name).is_some_and(|v| v.answered)
    }

    /// Every condition that holds at `now`.
    pub fn conditions(&self, now: Instant) -> Vec<Condition> {
        let mut out = Vec::new();
        let timeout = self.rules.heartbeat_timeout;
        let in_grace = now < self.started + timeout;

        // Liveness: required services and every service seen once.
        let mut watched: BTreeSet<&str> = self.rules.required.iter().map(String::as_str).collect();
        for (name, view) in &self.views {
            if view.seen {
                watched.insert(name);
            }
        }
        for name in watched {
            if matches!(name, HTM | WORKERS | SELF | LAYER2) {
                continue;
            }
            let mut why = Vec::new();
            if PUBLISHES_TELEMETRY.contains(&name) {
                match self.views.get(name).and_then(|v| v.telemetry.as_ref()) {
                    Some(t) if now.saturating_duration_since(t.at) > timeout => why.push(format!(
                        "{name} heartbeat missing: no telemetry.{name} for {:.1} s (timeout {:.1} s)",
                        now.saturating_duration_since(t.at).as_secs_f64(),
                        timeout.as_secs_f64()
                    )),
                    None if !in_grace => why.push(format!(
                        "{name} heartbeat missing: no telemetry.{name} since the watchdog started"
                    )),
                    _ => {}
                }
            }
            if self.answering(name) == Some(0) && !self.starting(name, now) {
                why.push(format!("{name} does not answer $SRV.PING.{name}"));
            }
            if why.is_empty() {
                continue;
            }
            if matches!(name, STORM_GUARD | EVENT_POLICY) {
                why.push("a mesh consumer is missing".into());
            }
            out.push(Condition {
                component: report_name(name).to_owned(),
                name: "heartbeat_missing",
                severity: Severity::Critical,
                reason: why.join("; "),
            });
        }

        // HTM (figures published by the scheduler; judged only while fresh).
        if let Some(htm) = self.fresh(HTM, now) {
            let depth = htm["queue_depth"].as_u64().unwrap_or(0);
            let (warn, critical) = (self.rules.htm_queue_warn, self.rules.htm_queue_critical);
            if depth > critical {
                out.push(cond(
                    HTM,
                    "queue_depth",
                    Severity::Critical,
                    format!("HTM queue depth {depth} is above the critical threshold {critical}"),
                ));
            } else if depth > warn {
                out.push(cond(
                    HTM,
                    "queue_depth",
                    Severity::Warning,
                    format!("HTM queue depth {depth} is above the warning threshold {warn}"),
                ));
            }
            // Workers not yet seen by the scheduler on a stack just started are starting.
            if htm["active_workers"].as_u64() == Some(0) && !self.starting(WORKERS, now) {
                out.push(cond(
                    HTM,
                    "no_workers",
                    Severity::Critical,
                    "0 active workers: no task can run".into(),
                ));
            }
            if let Some((before, after)) = self.sla_rising {
                out.push(cond(
                    HTM,
                    "sla_breaches_rising",
                    Severity::Warning,
                    format!("SLA breaches rose from {before} to {after} since the last sweep"),
                ));
            }
        }

        // Scheduler: dispatch stalled while work waits.
        if let Some(s) = self.fresh(SCHEDULER, now) {
            let depth = s["queue_depth"].as_u64().unwrap_or(0);
            let rate = s["dispatch_rate"].as_f64().unwrap_or(0.0);
            if depth > 0 && rate < self.rules.min_dispatch_rate {
                let paused = if s["paused"].as_bool() == Some(true) {
                    " (dispatch is paused)"
                } else {
                    ""
                };
                out.push(cond(
                    SCHEDULER,
                    "dispatch_stalled",
                    Severity::Warning,
                    format!(
                        "dispatching {rate:.2} task(s)/s, below {:.2}/s, while {depth} task(s) wait{paused}",
                        self.rules.min_dispatch_rate
                    ),
                ));
            }
        }

        // Trigger mesh: the breaker and storms.
        if let Some(m) = self.fresh(STORM_GUARD, now) {
            match m["breaker_state"].as_str() {
                Some("open") => out.push(cond(
                    TRIGGER_MESH,
                    "breaker_open",
                    Severity::High,
                    "the mesh circuit breaker is open: non-critical events are held back".into(),
                )),
                Some("half_open") => out.push(cond(
                    TRIGGER_MESH,
                    "breaker_open",
                    Severity::Warning,
                    "the mesh circuit breaker is half-open: a bounded probe is let through".into(),
                )),
                _ => {}
            }
            let storms = m["active_storms"].as_u64().unwrap_or(0);
            if storms > 0 {
                out.push(cond(
                    TRIGGER_MESH,
                    "storm",
                    Severity::Warning,
                    format!("{storms} event type(s) storming"),
                ));
            }
        }

        out.extend(self.held_while_closed(now));
        out.extend(crate::storage::conditions(
            &self.storage,
            self.rules.storage_alert_ratio,
        ));

        // Other components: what they say of themselves.
        for (name, view) in &self.views {
            if matches!(name.as_str(), HTM | SCHEDULER | STORM_GUARD | LAYER2) {
                continue;
            }
            let Some(figures) = self.fresh(name, now) else {
                continue;
            };
            let _ = view;
            let severity = match figures["health_status"].as_str() {
                Some("critical") => Severity::Critical,
                Some("degraded") => Severity::Warning,
                _ => continue,
            };
            out.push(Condition {
                component: report_name(name).to_owned(),
                name: "reported_unhealthy",
                severity,
                reason: format!(
                    "{name} reports itself {}",
                    figures["health_status"].as_str().unwrap_or("unhealthy")
                ),
            });
        }
        out
    }

    /// Mesh consumers (a `consumer` object in a component's telemetry) that have held events
    /// for at least `hold_grace` while the storm guard reported the breaker closed: they obey a
    /// stored entry that disagrees with the storm guard (unreadable, or a write that failed).
    fn held_while_closed(&self, now: Instant) -> Vec<Condition> {
        let Some(guard) = self
            .fresh(STORM_GUARD, now)
            .and_then(|m| serde_json::from_value::<GuardBreaker>(m.clone()).ok())
        else {
            return Vec::new();
        };
        if guard.breaker_state != bulwark_common::mesh::BreakerState::Closed {
            return Vec::new();
        }
        let grace_ms = self.rules.hold_grace.as_millis() as i64;
        let mut out = Vec::new();
        for name in self.views.keys() {
            let Some(consumer) = self
                .fresh(name, now)
                .and_then(|f| f.get("consumer"))
                .and_then(|c| serde_json::from_value::<ConsumerFigures>(c.clone()).ok())
            else {
                continue;
            };
            let Some(holding_since) = consumer.holding_since_ms.filter(|_| consumer.holding) else {
                continue;
            };
            let held_ms = consumer.reported_ms - holding_since.max(guard.breaker_since_ms);
            if held_ms < grace_ms {
                continue;
            }
            out.push(cond(
                report_name(name),
                "held_while_breaker_closed",
                Severity::Critical,
                format!(
                    "{name}'s mesh consumer has held non-critical events for {:.1} s while the storm guard reports the breaker closed: it obeys {} (stored entry {})",
                    held_ms as f64 / 1000.0,
                    consumer.breaker_state.as_str(),
                    consumer.breaker_entry.as_str()
                ),
            ));
        }
        out
    }

    /// The report at `now` (CONTRACT section 5): `{overall_health, all_ready, components}`.
    pub fn report(&self, now: Instant) -> Value {
        let conditions = self.conditions(now);
        let readiness = self.readiness.as_ref();
        let responding = |name: &str| self.answering(name).map(|n| n > 0);
        // Ready means answering and publishing fresh telemetry, not merely registered.
        let htm_ready = readiness.and_then(|r| r["htm_ready"].as_bool()) == Some(true)
            && self.fresh(HTM, now).is_some();
        let scheduler_ready = readiness.and_then(|r| r["scheduler_ready"].as_bool()) == Some(true)
            && responding(SCHEDULER) == Some(true)
            && self.fresh(SCHEDULER, now).is_some();
        let mesh_ready = responding(STORM_GUARD) == Some(true)
            && self
                .fresh(STORM_GUARD, now)
                .is_some_and(|m| m["breaker_state"].as_str() != Some("open"));
        let policy_ready =
            responding(EVENT_POLICY) == Some(true) && self.fresh(EVENT_POLICY, now).is_some();
        let required_ready = self
            .rules
            .required
            .iter()
            .all(|name| responding(name) == Some(true));

        let mut components = serde_json::Map::new();
        let mut add = |key: &str, source: &str, ready: bool, extra: Value| {
            let mine: Vec<&Condition> = conditions.iter().filter(|c| c.component == key).collect();
            let health = mine
                .iter()
                .map(|c| c.severity.health())
                .max()
                .unwrap_or(Health::Healthy);
            let telemetry = self.views.get(source).and_then(|v| v.telemetry.as_ref());
            let mut entry = json!({
                "ready": ready,
                "health": if mine.is_empty() && self.starting(source, now) && !matches!(source, HTM | WORKERS) {
                    "starting"
                } else if telemetry.is_none() && self.answering(source).is_none_or(|n| n == 0) && mine.is_empty() {
                    "unknown"
                } else {
                    health.as_str()
                },
                "source": source,
                "responding": responding(source),
                "instances": self.answering(source),
                "telemetry_age_s": telemetry.map(|t| round2(now.saturating_duration_since(t.at).as_secs_f64())),
                "key_figures": telemetry.map(|t| key_figures(source, &t.figures)).unwrap_or(Value::Null),
                "conditions": mine.iter().map(|c| json!({"condition": c.name, "severity": c.severity.as_str(), "reason": c.reason})).collect::<Vec<_>>(),
                "last_alert": self.last_alert.get(key).cloned().unwrap_or(Value::Null),
            });
            if let (Value::Object(e), Value::Object(x)) = (&mut entry, extra) {
                e.extend(x);
            }
            components.insert(key.to_owned(), entry);
        };
        let htm_extra = match readiness {
            Some(r) => {
                json!({"healthy_workers": r["healthy_workers"], "min_workers": r["min_workers"],
                              "readiness_reasons": r["reasons"]})
            }
            None => json!({"readiness_reasons": ["htm.readiness did not answer"]}),
        };
        add(HTM, HTM, htm_ready, htm_extra);
        add(TRIGGER_MESH, STORM_GUARD, mesh_ready, json!({}));
        add(SCHEDULER, SCHEDULER, scheduler_ready, json!({}));
        add(EVENT_POLICY, EVENT_POLICY, policy_ready, json!({}));
        let core = [HTM, SCHEDULER, STORM_GUARD, EVENT_POLICY, SELF, LAYER2];
        let others: Vec<String> = self
            .views
            .iter()
            .filter(|(name, view)| {
                !core.contains(&name.as_str()) && (view.seen || self.rules.required.contains(name))
            })
            .map(|(name, _)| name.clone())
            .chain(
                self.rules
                    .required
                    .iter()
                    .filter(|n| !self.views.contains_key(*n) && !core.contains(&n.as_str()))
                    .cloned(),
            )
            .collect();
        for name in others {
            let ready = responding(&name) == Some(true);
            add(&name, &name, ready, json!({}));
        }
        json!({
            "overall_health": overall(&conditions).as_str(),
            "all_ready": htm_ready && scheduler_ready && mesh_ready && policy_ready && required_ready,
            "components": components,
            "sweeps": self.sweeps,
            "durability": self.durability,
            "storage": crate::storage::report(&self.storage),
            "storage_conditions": conditions.iter().filter(|c| c.name == crate::storage::NEAR_LIMIT)
                .map(|c| json!({"component": c.component, "condition": c.name, "severity": c.severity.as_str(), "reason": c.reason}))
                .collect::<Vec<_>>(),
        })
    }

    /// The watchdog's own figures for `telemetry.layer2`.
    pub fn telemetry(&self, now: Instant) -> Value {
        let conditions = self.conditions(now);
        json!({
            "overall_health": overall(&conditions).as_str(),
            "health_status": overall(&conditions).as_str(),
            "conditions": conditions.len(),
            "alerts_open": self.open.len(),
            "alerts_raised": self.sent[0],
            "alerts_repeated": self.sent[1],
            "recoveries": self.sent[2],
            "sweeps": self.sweeps,
        })
    }
}

fn cond(component: &str, name: &'static str, severity: Severity, reason: String) -> Condition {
    Condition {
        component: component.to_owned(),
        name,
        severity,
        reason,
    }
}

/// Overall health of a set of conditions: the worst of them.
pub fn overall(conditions: &[Condition]) -> Health {
    conditions
        .iter()
        .map(|c| c.severity.health())
        .max()
        .unwrap_or(Health::Healthy)
}

/// The report's name of a service (`storm_guard` is the trigger mesh).
pub fn report_name(service: &str) -> &str {
    if service == STORM_GUARD {
        TRIGGER_MESH
    } else {
        service
    }
}

/// The figures an operator looks at first, per component.
fn key_figures(component: &str, figures: &Value) -> Value {
    let keys: &[&str] = match component {
        HTM => &[
            "queue_depth",
            "active_workers",
            "tasks_per_second",
            "sla_breaches",
            "p99_ms",
        ],
        SCHEDULER => &["queue_depth", "dispatch_rate", "in_flight", "paused"],
        STORM_GUARD => &["breaker_state", "active_storms", "events_seen"],
        EVENT_POLICY => &["rules"],
        "clarity" => &["narratives_stored", "chain_breaks"],
        _ => &[],
    };
    let mut out = serde_json::Map::new();
    for key in keys {
        let value = match &figures[*key] {
            Value::Number(n) if n.is_f64() => json!(round2(n.as_f64().unwrap_or(0.0))),
            v if v.is_null() => continue,
            v => v.clone(),
        };
        out.insert((*key).to_owned(), value);
    }
    Value::Object(out)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rules() -> Rules {
        Rules {
            heartbeat_timeout: 3 * S,
            realert_interval: 60 * S,
            htm_queue_warn: 1_000,
            htm_queue_critical: 5_000,
            min_dispatch_rate: 1.0,
            required: ["governance", SCHEDULER, STORM_GUARD, EVENT_POLICY]
                .map(String::from)
                .to_vec(),
            hold_grace: S,
            storage_alert_ratio: 0.8,
            startup_grace: 10 * S,
        }
    }

    /// A fake clock and a healthy stack publishing telemetry every second.
    struct Stack {
        watch: Watch,
        t0: Instant,
        now: Instant,
        htm: Value,
        scheduler: Value,
        mesh: Value,
        scheduler_up: bool,
    }

    impl Stack {
        fn new() -> Self {
            let t0 = Instant::now();
            Stack {
                watch: Watch::new(rules(), t0),
                t0,
                now: t0,
                htm: json!({"queue_depth": 0, "active_workers": 3, "tasks_per_second": 0.0, "sla_breaches": 0, "health_status": "healthy"}),
                scheduler: json!({"queue_depth": 0, "dispatch_rate": 0.0, "paused": false, "health_status": "healthy"}),
                mesh: json!({"breaker_state": "closed", "active_storms": 0, "health_status": "healthy"}),
                scheduler_up: true,
            }
        }

        /// Advances the clock by one second with telemetry, and sweeps.
        fn tick(&mut self) -> Vec<Alert> {
            self.now += S;
            let now = self.now;
            if self.scheduler_up {
                self.watch
                    .observe_telemetry(SCHEDULER, self.scheduler.clone(), now);
                self.watch.observe_telemetry(HTM, self.htm.clone(), now);
            }
            self.watch
                .observe_telemetry(STORM_GUARD, self.mesh.clone(), now);
            self.watch
                .observe_telemetry(EVENT_POLICY, json!({"health_status": "healthy"}), now);
            self.watch
                .observe_telemetry("governance", json!({"health_status": "healthy"}), now);
            let mut answering: BTreeMap<String, usize> =
                ["governance", STORM_GUARD, EVENT_POLICY, WORKERS]
                    .into_iter()
                    .map(|n| (n.to_owned(), 1))
                    .collect();
            if self.scheduler_up {
                answering.insert(SCHEDULER.into(), 1);
            }
            let readiness = self.scheduler_up.then(|| {
                json!({"htm_ready": self.htm["active_workers"].as_u64() >= Some(3), "scheduler_ready": true,
                       "healthy_workers": self.htm["active_workers"], "min_workers": 3, "reasons": []})
            });
            self.watch.sweep(&answering, readiness, now)
        }

        fn run(&mut self, ticks: usize) -> Vec<Alert> {
            (0..ticks).flat_map(|_| self.tick()).collect()
        }
    }

    fn summary(alerts: &[Alert]) -> Vec<(String, &'static str, &'static str)> {
        alerts
            .iter()
            .map(|a| {
                (
                    a.condition.key(),
                    a.condition.severity.as_str(),
                    a.state.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn a_healthy_stack_is_healthy_and_ready_and_silent() {
        let mut s = Stack::new();
        assert!(s.run(20).is_empty());
        let report = s.watch.report(s.now);
        assert_eq!(report["overall_health"], "healthy", "{report:#}");
        assert_eq!(report["all_ready"], true, "{report:#}");
        for key in [HTM, TRIGGER_MESH, SCHEDULER, EVENT_POLICY, "governance"] {
            assert_eq!(report["components"][key]["health"], "healthy", "{key}");
            assert_eq!(report["components"][key]["ready"], true, "{key}");
        }
        assert_eq!(
            report["components"][HTM]["key_figures"]["active_workers"],
            3
        );
        // Workers are counted by the scheduler's heartbeats, not by pings.
        assert_eq!(report["components"][WORKERS]["instances"], 3, "{report:#}");
    }

    #[test]
    fn a_missing_scheduler_is_alerted_once_and_its_return_announced() {
        let mut s = Stack::new();
        s.run(5);
        s.scheduler_up = false;
        let alerts = s.run(30);
        assert_eq!(
            summary(&alerts),
            vec![(
                "scheduler.heartbeat_missing".to_owned(),
                "critical",
                "raised"
            )],
            "one alert however many sweeps, the HTM figures going stale raise nothing more"
        );
        assert!(
            alerts[0]
                .condition
                .reason
                .contains("does not answer $SRV.PING")
        );
        assert_eq!(alerts[0].health, Health::Critical);
        let report = s.watch.report(s.now);
        assert_eq!(report["overall_health"], "critical");
        assert_eq!(report["all_ready"], false);
        // Repeated after realert_interval (60 s), not before.
        let later = s.run(40);
        assert_eq!(
            summary(&later),
            vec![(
                "scheduler.heartbeat_missing".to_owned(),
                "critical",
                "repeated"
            )]
        );
        s.scheduler_up = true;
        let back = s.run(5);
        assert_eq!(
            summary(&back),
            vec![(
                "scheduler.heartbeat_missing".to_owned(),
                "critical",
                "recovered"
            )]
        );
        assert_eq!(back[0].health, Health::Healthy);
        assert!(s.run(10).is_empty());
    }

    #[test]
    fn silent_telemetry_alone_is_a_missing_heartbeat() {
        let mut w = Watch::new(rules(), Instant::now());
        let t0 = w.started;
        w.observe_telemetry(SCHEDULER, json!({"queue_depth": 0}), t0);
        let answering = BTreeMap::from([(SCHEDULER.to_owned(), 1)]);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(
            !w.conditions(at(3))
                .iter()
                .any(|c| c.key() == "scheduler.heartbeat_missing")
        );
        w.sweep(&answering, None, at(4));
        let c = w.conditions(at(4));
        let hb = c
            .iter()
            .find(|c| c.key() == "scheduler.heartbeat_missing")
            .expect("heartbeat missing after 3 s");
        assert!(
            hb.reason.starts_with("scheduler heartbeat missing"),
            "{}",
            hb.reason
        );
    }

    #[test]
    fn zero_workers_is_critical() {
        let mut s = Stack::new();
        s.htm["active_workers"] = json!(0);
        // Workers never seen are `starting` during the startup grace (10 s here), then critical.
        assert!(s.run(6).is_empty());
        let alerts = s.run(6);
        assert_eq!(
            summary(&alerts),
            vec![(
                "htm_orchestrator.no_workers".to_owned(),
                "critical",
                "raised"
            )]
        );
        let report = s.watch.report(s.now);
        assert_eq!(report["overall_health"], "critical");
        assert_eq!(report["all_ready"], false);
        assert_eq!(report["components"][HTM]["health"], "critical");
    }

    #[test]
    fn queue_thresholds_escalate_and_recover() {
        let mut s = Stack::new();
        s.run(4);
        s.htm["queue_depth"] = json!(1_000);
        assert!(
            s.run(2).is_empty(),
            "1000 is not above the warning threshold"
        );
        s.htm["queue_depth"] = json!(1_001);
        assert_eq!(
            summary(&s.run(3)),
            vec![(
                "htm_orchestrator.queue_depth".to_owned(),
                "warning",
                "raised"
            )]
        );
        s.htm["queue_depth"] = json!(6_000);
        assert_eq!(
            summary(&s.run(3)),
            vec![(
                "htm_orchestrator.queue_depth".to_owned(),
                "critical",
                "raised"
            )],
            "a change of severity is raised at once"
        );
        s.htm["queue_depth"] = json!(3);
        assert_eq!(
            summary(&s.run(3)),
            vec![(
                "htm_orchestrator.queue_depth".to_owned(),
                "critical",
                "recovered"
            )]
        );
    }

    #[test]
    fn dispatch_stalled_only_while_work_waits() {
        let mut s = Stack::new();
        s.run(4);
        s.scheduler["queue_depth"] = json!(5);
        s.scheduler["dispatch_rate"] = json!(0.2);
        let alerts = s.run(2);
        assert_eq!(
            summary(&alerts),
            vec![("scheduler.dispatch_stalled".to_owned(), "warning", "raised")]
        );
        assert_eq!(s.watch.report(s.now)["overall_health"], "degraded");
        s.scheduler["dispatch_rate"] = json!(4.0);
        assert_eq!(
            summary(&s.run(1)),
            vec![(
                "scheduler.dispatch_stalled".to_owned(),
                "warning",
                "recovered"
            )]
        );
        s.scheduler["queue_depth"] = json!(0);
        s.scheduler["dispatch_rate"] = json!(0.0);
        assert!(s.run(3).is_empty(), "an idle scheduler dispatches nothing");
    }

    #[test]
    fn rising_sla_breaches_warn() {
        let mut s = Stack::new();
        s.run(4);
        s.htm["sla_breaches"] = json!(2);
        assert_eq!(
            summary(&s.run(1)),
            vec![(
                "htm_orchestrator.sla_breaches_rising".to_owned(),
                "warning",
                "raised"
            )]
        );
        assert_eq!(
            summary(&s.run(1)),
            vec![(
                "htm_orchestrator.sla_breaches_rising".to_owned(),
                "warning",
                "recovered"
            )],
            "no new breach: it cleared"
        );
    }

    #[test]
    fn breaker_and_storms_on_the_trigger_mesh() {
        let mut s = Stack::new();
        s.run(4);
        s.mesh["breaker_state"] = json!("open");
        s.mesh["active_storms"] = json!(2);
        let alerts = s.run(2);
        assert_eq!(
            summary(&alerts),
            vec![
                ("trigger_mesh.breaker_open".to_owned(), "high", "raised"),
                ("trigger_mesh.storm".to_owned(), "warning", "raised"),
            ]
        );
        let report = s.watch.report(s.now);
        assert_eq!(report["components"][TRIGGER_MESH]["ready"], false);
        assert_eq!(report["overall_health"], "degraded");
    }

    #[test]
    fn nothing_is_alerted_during_the_startup_grace() {
        let t0 = Instant::now();
        let mut w = Watch::new(rules(), t0);
        let none = BTreeMap::new();
        assert!(w.sweep(&none, None, t0 + S).is_empty());
        assert!(w.sweep(&none, None, t0 + 2 * S).is_empty());
        let alerts = w.sweep(&none, None, t0 + 4 * S);
        let keys: Vec<String> = alerts.iter().map(|a| a.condition.key()).collect();
        assert_eq!(
            keys,
            vec![
                "event_policy_engine.heartbeat_missing",
                "governance.heartbeat_missing",
                "scheduler.heartbeat_missing",
                "trigger_mesh.heartbeat_missing",
            ],
            "required services that never showed up"
        );
        assert!(alerts[3].condition.reason.contains("mesh consumer"));
    }

    #[test]
    fn a_required_service_never_seen_is_starting_then_not_answering() {
        let t0 = Instant::now();
        let mut w = Watch::new(rules(), t0);
        assert_eq!(w.report(t0)["all_ready"], false);
        // Within the startup grace: starting, not critical (a fresh stack registers in any
        // order).
        let alerts = w.sweep(&BTreeMap::new(), None, t0 + S);
        assert!(alerts.is_empty(), "{alerts:?}");
        let report = w.report(t0 + S);
        assert_ne!(report["overall_health"], "critical", "{report:#}");
        assert_eq!(
            report["components"][SCHEDULER]["health"], "starting",
            "{report:#}"
        );
        assert_eq!(report["components"][SCHEDULER]["ready"], false);
        // After it: critical.
        w.sweep(&BTreeMap::new(), None, t0 + 11 * S);
        let report = w.report(t0 + 11 * S);
        assert_eq!(report["overall_health"], "critical", "{report:#}");
        assert_eq!(report["components"][SCHEDULER]["responding"], false);
    }

    #[test]
    fn a_service_that_answered_once_is_never_starting_again() {
        let t0 = Instant::now();
        let mut w = Watch::new(rules(), t0);
        let all: BTreeMap<String, usize> = ["governance", SCHEDULER, STORM_GUARD, EVENT_POLICY]
            .iter()
            .map(|n| (n.to_string(), 1))
            .collect();
        w.sweep(&all, None, t0 + S);
        assert!(w.all_required_answered());
        let mut gone = all.clone();
        gone.insert(SCHEDULER.to_owned(), 0);
        w.sweep(&gone, None, t0 + 2 * S);
        let report = w.report(t0 + 2 * S);
        assert_eq!(
            report["components"][SCHEDULER]["health"], "critical",
            "{report:#}"
        );
    }

    #[test]
    fn a_service_seen_once_is_watched_after() {
        let mut s = Stack::new();
        s.watch
            .observe_telemetry("clarity", json!({"health_status": "healthy"}), s.now);
        let alerts = s.run(6);
        assert_eq!(
            summary(&alerts),
            vec![("clarity.heartbeat_missing".to_owned(), "critical", "raised")]
        );
        let report = s.watch.report(s.now);
        assert_eq!(report["components"]["clarity"]["ready"], false);
        let _ = s.t0;
    }
}
