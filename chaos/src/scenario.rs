//! The scenario file format (`chaos/scenarios/<id>.toml`, described in `docs/chaos.md`) and its
//! loader.
//!
//! A scenario states its steady state, the method (the injections), the safeguards that must
//! fire (with time limits and values), what the checker must find, the recovery limit, and a
//! negative control: the same workload at normal load, under which those safeguards must stay
//! silent. Every table refuses unknown fields; every error names the file, the line and the
//! reason, and a scenario with an error is never run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bulwark_common::BulwarkConfig;
use serde::{Deserialize, Serialize};

/// Why a scenario file could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}:{line}: {reason}", file.display())]
pub struct LoadError {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line the problem is on (1 when it concerns the whole file).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// The chaos categories of the seed (`--layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Layer 2 orchestration scenarios.
    Layer2,
    /// Disaster recovery testing.
    Dirt,
    /// Failure injection testing.
    Fit,
    /// Consistency under partitions, skew and conflicts.
    Jepsen,
}

impl Category {
    /// The name used by `--layer`.
    pub fn layer_name(self) -> &'static str {
        match self {
            Category::Layer2 => "l2",
            Category::Dirt => "dirt",
            Category::Fit => "fit",
            Category::Jepsen => "jepsen",
        }
    }
}

/// A severity on the seed's 1-5 scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Severity(pub u8);

impl TryFrom<i64> for Severity {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        if (1..=5).contains(&v) {
            Ok(Severity(v as u8))
        } else {
            Err(format!("severity must be 1-5, got {v}"))
        }
    }
}

impl From<Severity> for i64 {
    fn from(s: Severity) -> i64 {
        i64::from(s.0)
    }
}

/// A number of seconds, zero or more.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize, Default)]
#[serde(try_from = "f64", into = "f64")]
pub struct Seconds(pub f64);

impl TryFrom<f64> for Seconds {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v.is_finite() && v >= 0.0 {
            Ok(Seconds(v))
        } else {
            Err(format!("a duration in seconds must be 0 or more, got {v}"))
        }
    }
}

impl From<Seconds> for f64 {
    fn from(s: Seconds) -> f64 {
        s.0
    }
}

/// A share between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize, Default)]
#[serde(try_from = "f64", into = "f64")]
pub struct Share(pub f64);

impl TryFrom<f64> for Share {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if (0.0..=1.0).contains(&v) {
            Ok(Share(v))
        } else {
            Err(format!("a share must be between 0.0 and 1.0, got {v}"))
        }
    }
}

impl From<Share> for f64 {
    fn from(s: Share) -> f64 {
        s.0
    }
}

/// A count or rate that must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct AtLeastOne(pub u64);

impl TryFrom<i64> for AtLeastOne {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        if v >= 1 {
            Ok(AtLeastOne(v as u64))
        } else {
            Err(format!("must be 1 or more, got {v}"))
        }
    }
}

impl From<AtLeastOne> for i64 {
    fn from(n: AtLeastOne) -> i64 {
        n.0 as i64
    }
}

/// One chaos scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Unique id; the file is `<id>.toml`.
    pub id: String,
    /// The seed's category.
    pub category: Category,
    /// 1 (mild) to 5 (severe).
    pub severity: Severity,
    /// What the scenario does and why, for the report.
    pub description: String,
    /// Seconds after the last injection ends within which the steady state must hold again.
    pub recovery_limit_s: Seconds,
    /// bulwark configuration the runner's own stack uses (same keys as `bulwark.toml`); ignored
    /// against a running bulwark (`--nats-url`).
    #[serde(default)]
    pub system: toml::Table,
    /// How the runner's own stack is built.
    #[serde(default)]
    pub stack: StackSpec,
    /// What must hold before the method starts and again after it, within the recovery limit.
    pub steady_state: SteadyState,
    /// The injections, run concurrently from their `at_s`.
    #[serde(rename = "inject")]
    pub method: Vec<Injection>,
    /// The safeguards that must fire.
    #[serde(default, rename = "expect")]
    pub expectations: Vec<Expectation>,
    /// The stress the method must reach for some safeguards to be judged: when it is not
    /// reached, a missing safeguard makes the run INCONCLUSIVE (the test did not do what it
    /// meant to), not FAIL.
    #[serde(default, rename = "stress")]
    pub stresses: Vec<Stress>,
    /// What the checker and the measurements must show.
    pub verify: Verify,
    /// The negative control: the same workload at normal load.
    pub control: Control,
    /// How `--quick` shortens the scenario.
    #[serde(default)]
    pub quick: Quick,
}

/// How the runner's own stack is built (self-contained runs only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StackSpec {
    /// HTM workers in the pool.
    pub workers: usize,
}

impl Default for StackSpec {
    fn default() -> Self {
        Self { workers: 3 }
    }
}

/// A steady-state check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Every required service answers `$SRV.PING`.
    ServicesAnswer,
    /// `htm.readiness` says `htm_ready`.
    HtmReady,
    /// The mesh breaker is closed (`storm_guard.status`).
    BreakerClosed,
    /// No task waits or runs (`htm.readiness`: queue depth 0, nothing in flight).
    TaskQueueEmpty,
    /// Every worker of the pool runs (`htm.pool.status`).
    PoolFull,
    /// The event policy engine's mesh consumer has nothing pending or unacknowledged.
    MeshConsumersCaughtUp,
    /// The narrative log has no gap: clarity's consumer of `BULWARK_NARRATIVES` has appended
    /// every stored narrative (nothing pending or unacknowledged) and `clarity.verify` finds the
    /// audit chain intact with consecutive sequences.
    NarrativeLogComplete,
}

impl Check {
    /// The check's name in the file and the report.
    pub fn name(self) -> &'static str {
        match self {
            Check::ServicesAnswer => "services_answer",
            Check::HtmReady => "htm_ready",
            Check::BreakerClosed => "breaker_closed",
            Check::TaskQueueEmpty => "task_queue_empty",
            Check::PoolFull => "pool_full",
            Check::MeshConsumersCaughtUp => "mesh_consumers_caught_up",
            Check::NarrativeLogComplete => "narrative_log_complete",
        }
    }
}

/// The steady state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteadyState {
    /// Checks that must all pass.
    pub checks: Vec<Check>,
}

/// A subject pattern with `*` standing for generated type tokens.
pub type SubjectPattern = String;

/// One injection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Injection {
    /// CPU and memory pressure on this machine (DIRT03): `cpu_threads` busy-loop threads and
    /// `memory_mb` allocated and touched, for `duration_s`; bounded and always released
    /// ([`crate::siege`]).
    ResourceSiege {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// How long the pressure lasts.
        duration_s: Seconds,
        /// Busy-loop threads (at most 64).
        #[serde(default = "one")]
        cpu_threads: AtLeastOne,
        /// MiB allocated and touched (at most half of what is available).
        #[serde(default)]
        memory_mb: u64,
    },
    /// Publish mesh events at a rate for a duration (JetStream, acknowledgements awaited).
    PublishEvents {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Events per second, all patterns together.
        rate_per_s: AtLeastOne,
        /// How long.
        duration_s: Seconds,
        /// Event type patterns (`test.spam.*`): each `*` becomes one of `types_per_pattern`
        /// tokens `t0`, `t1`, ...; events go round-robin over the types.
        patterns: Vec<SubjectPattern>,
        /// Distinct tokens per `*`.
        #[serde(default = "one")]
        types_per_pattern: AtLeastOne,
        /// Sender clock skew (JEPSEN02): each event's `timestamp` is the sender's now moved by
        /// `skew_s`, earlier and later in turn; 0 by default.
        #[serde(default)]
        skew_s: Seconds,
        /// Plus a uniform jitter of up to this many seconds either way (seeded).
        #[serde(default)]
        jitter_s: Seconds,
    },
    /// Submit intents on `htm.intent.submit`, a share of them invalid.
    SubmitIntents {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Intents in all (closed loop at `concurrency`); or give `rate_per_s` and `duration_s`.
        #[serde(default)]
        count: Option<AtLeastOne>,
        /// Intents per second (open loop) for `duration_s`.
        #[serde(default)]
        rate_per_s: Option<AtLeastOne>,
        /// How long the open loop runs.
        #[serde(default)]
        duration_s: Option<Seconds>,
        /// Requests in flight at most.
        #[serde(default = "one")]
        concurrency: AtLeastOne,
        /// Share of intents made invalid (each kind of defect in turn); they must get a 400.
        #[serde(default)]
        invalid_share: Share,
        /// The intent type of the valid intents (it must be queued at once: tier 1, 2 or 4).
        #[serde(default = "default_intent_type")]
        intent_type: String,
        /// Simulated work per task (`payload.work_ms`).
        #[serde(default)]
        work_ms: u64,
        /// Priorities cycle from 0 to 9 when absent.
        #[serde(default)]
        priority: Option<u8>,
    },
    /// Pause the scheduler (`scheduler.pause`) and resume it after `duration_s`.
    PauseScheduler {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// How long the scheduler stays paused.
        duration_s: Seconds,
    },
    /// Kill a share of the pool's workers (`htm.pool.kill`) at random times.
    KillWorkers {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Share of the pool to kill (rounded up, at least one).
        fraction: Share,
        /// The kills happen at random times within this many seconds.
        over_s: Seconds,
        /// `crash` (dies, the supervisor respawns it) or `hang` (stops silently).
        #[serde(default = "default_kill_mode")]
        mode: KillMode,
    },
    /// Start causal cascades: `roots` root events of one correlation on
    /// `test.cascade.<tag>.trigger`, which the rule `chaos_cascade_<tag>` answers with
    /// `fan_out` children each, level after level.
    Cascade {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Tag naming the rule and the event types (`[a-z0-9_]`).
        tag: String,
        /// Root events.
        #[serde(default = "one")]
        roots: AtLeastOne,
        /// Children per event and level.
        #[serde(default = "one")]
        fan_out: AtLeastOne,
        /// Depth the rule stops at by itself; absent: it triggers itself forever and only the
        /// cascade safeguard stops it.
        #[serde(default)]
        depth: Option<AtLeastOne>,
    },
    /// Crash a bulwark service and start it again (self-contained runs only).
    RestartService {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// The service (its micro name, e.g. `scheduler`).
        service: String,
        /// Seconds it stays down.
        #[serde(default)]
        down_s: Seconds,
    },
    /// Kill the nats-server and start it again on the same port and store (self-contained
    /// runs only).
    RestartNats {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Seconds it stays down.
        #[serde(default)]
        down_s: Seconds,
    },
    /// A disaster recovery drill: `backups` backups of bulwark's streams and buckets
    /// (`bulwark backup`), `interval_s` apart; the newest damaged as `damage` says; then, as
    /// `bulwark restore` does, onto a scratch nats-server: the newest restored (a damaged one
    /// must be refused naming the file), the newest that verifies restored (`--latest`), clarity
    /// started there and the audit chain verified. Narrated on `clarity.narrative.backup`.
    BackupDrill {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Backups taken.
        #[serde(default = "two")]
        backups: AtLeastOne,
        /// Seconds between two backups.
        #[serde(default)]
        interval_s: Seconds,
        /// What is done to the newest backup: `corrupt` (a byte flipped in the audit stream's
        /// snapshot), `truncate` (the intents bucket's snapshot cut in half) or `none`.
        #[serde(default = "default_damage")]
        damage: BackupDamage,
        /// JEPSEN03: then restore the oldest backup over the restored one with `--replace` (a
        /// rollback, which must be detected and refused when the system moved on in between).
        #[serde(default)]
        rollback: bool,
    },
    /// Concurrent writers on shared KV records (JEPSEN04): `writers` writers each apply
    /// `ops_per_writer` updates round-robin over `keys` records of the bucket
    /// `bulwark_chaos_cas`, with compare-and-set (`cas = true`, bulwark's `kv::update`) or blind
    /// read-modify-put (`cas = false`); then the history is checked (no lost update, no
    /// duplicate, real-time order) and narrated on `clarity.narrative.chaos_checker`.
    ConcurrentWrites {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Concurrent writers.
        writers: AtLeastOne,
        /// Shared records.
        #[serde(default = "one")]
        keys: AtLeastOne,
        /// Updates per writer.
        ops_per_writer: AtLeastOne,
        /// Compare-and-set (the safeguard); false writes blindly.
        #[serde(default = "yes")]
        cas: bool,
    },
    /// The narrative log audit (JEPSEN01): watches clarity's backlog for `duration_s`, waits up
    /// to `settle_s` for it to drain, then checks every stored narrative is in the audit chain
    /// exactly once and the chain verifies; narrated on `clarity.narrative.chaos_checker`.
    NarrativeLogAudit {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// How long the backlog is watched.
        duration_s: Seconds,
        /// How long the backlog may take to drain afterwards.
        settle_s: Seconds,
    },
    /// Intent status queries over the request API (FIT01): `htm.intent.status` at a rate for a
    /// duration, each for an intent this run submitted (picked at random, seeded); the answer
    /// must be the intent's status. Latency (first attempt to answer) and errors are measured
    /// ([`crate::fit`]).
    QueryStatus {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Queries per second.
        rate_per_s: AtLeastOne,
        /// How long.
        duration_s: Seconds,
        /// Queries in flight at most.
        #[serde(default = "default_query_concurrency")]
        concurrency: AtLeastOne,
    },
    /// Human reviews (FIT01): intents of a `human_review` tier type submitted at a rate, each
    /// then approved or rejected on `governance.review.decide` (a seeded `reject_share` of
    /// them); approved ones must complete once, rejected ones must end `rejected` and never run.
    ReviewIntents {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Intents per second.
        rate_per_s: AtLeastOne,
        /// How long.
        duration_s: Seconds,
        /// Submissions and decisions in flight at most.
        #[serde(default = "default_query_concurrency")]
        concurrency: AtLeastOne,
        /// Share of the reviews that reject.
        #[serde(default = "half")]
        reject_share: Share,
        /// The intent type (its tier must route to human review: tier 0).
        #[serde(default = "default_review_type")]
        intent_type: String,
        /// Simulated work of the approved ones (`payload.work_ms`).
        #[serde(default)]
        work_ms: u64,
        /// Priorities cycle from 0 to 9 when absent.
        #[serde(default)]
        priority: Option<u8>,
    },
    /// Random outages of bulwark's dependencies (FIT01, FIT02), seeded and replayable with
    /// `--seed`: `outages` outages one after the other within `over_s`, each of a target drawn
    /// from `targets` (every target once, in a random order, before any repeats) for a length
    /// drawn between `min_down_s` and `max_down_s` (self-contained runs only).
    RandomOutage {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// The outages happen within this many seconds.
        over_s: Seconds,
        /// How many.
        outages: AtLeastOne,
        /// What may go down: `nats` (the server killed and restarted on its port and store),
        /// `workers` (the whole worker pool crashed), or a service of [`RESTARTABLE`].
        targets: Vec<String>,
        /// Shortest outage.
        min_down_s: Seconds,
        /// Longest outage.
        max_down_s: Seconds,
    },
    /// An offered load that ramps linearly from `from_per_s` to `to_per_s` intents per second
    /// over `duration_s` (FIT03), open loop: an intent is offered on time whatever the system
    /// does; at most `max_in_flight` submissions wait at once, and an intent due while that
    /// many wait is counted as not sent (the generator's own limit, reported). Priorities cycle
    /// 0-9; each submission is tried `attempts` times with the same id, `timeout_ms` each.
    RampIntents {
        /// Name other sections refer to.
        #[serde(default)]
        name: Option<String>,
        /// Seconds after the method starts.
        #[serde(default)]
        at_s: Seconds,
        /// Offered rate at the start.
        from_per_s: AtLeastOne,
        /// Offered rate at the end.
        to_per_s: AtLeastOne,
        /// How long the ramp lasts.
        duration_s: Seconds,
        /// Submissions waiting at most.
        #[serde(default = "default_ramp_in_flight")]
        max_in_flight: AtLeastOne,
        /// The intent type (it must be queued at once: tier 1, 2 or 4).
        #[serde(default = "default_intent_type")]
        intent_type: String,
        /// Simulated work per task.
        #[serde(default)]
        work_ms: u64,
        /// Attempts per intent (503s and timeouts are retried with the same id).
        #[serde(default = "two")]
        attempts: AtLeastOne,
        /// How long one attempt waits for its answer, milliseconds.
        #[serde(default = "default_ramp_timeout_ms")]
        timeout_ms: AtLeastOne,
    },
}

fn default_query_concurrency() -> AtLeastOne {
    AtLeastOne(16)
}

fn default_ramp_in_flight() -> AtLeastOne {
    AtLeastOne(2000)
}

fn default_ramp_timeout_ms() -> AtLeastOne {
    AtLeastOne(5000)
}

fn half() -> Share {
    Share(0.5)
}

fn default_review_type() -> String {
    "modify_governance".to_owned()
}

/// What `backup_drill` does to the newest backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupDamage {
    /// A byte flipped in the middle of `BULWARK_AUDIT.snap`.
    Corrupt,
    /// `KV_bulwark_intents.snap` cut to half its size.
    Truncate,
    /// Left intact.
    None,
}

fn yes() -> bool {
    true
}

fn two() -> AtLeastOne {
    AtLeastOne(2)
}

fn default_damage() -> BackupDamage {
    BackupDamage::Corrupt
}

/// How `kill_workers` kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KillMode {
    /// The worker dies abruptly; the pool respawns it after `worker.respawn_delay_s`.
    Crash,
    /// The worker stops heartbeating and taking work; only a respawn brings it back.
    Hang,
}

impl KillMode {
    /// The mode's name in `htm.pool.kill`.
    pub fn as_str(self) -> &'static str {
        match self {
            KillMode::Crash => "crash",
            KillMode::Hang => "hang",
        }
    }
}

fn one() -> AtLeastOne {
    AtLeastOne(1)
}

fn default_intent_type() -> String {
    "query_knowledge".to_owned()
}

fn default_kill_mode() -> KillMode {
    KillMode::Crash
}

/// What `random_outage` can take down besides the services of [`RESTARTABLE`]: the
/// nats-server, and the worker pool (`htm_pool`).
pub const OUTAGE_TARGETS: [&str; 2] = ["nats", "workers"];

/// The services `restart_service` can restart.
pub const RESTARTABLE: [&str; 8] = [
    "governance",
    "clarity",
    "storm_guard",
    "event_policy_engine",
    "scheduler",
    "watchdog",
    "htm_pool",
    "playbooks",
];

impl Injection {
    /// The injection's kind as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Injection::ResourceSiege { .. } => "resource_siege",
            Injection::PublishEvents { .. } => "publish_events",
            Injection::SubmitIntents { .. } => "submit_intents",
            Injection::PauseScheduler { .. } => "pause_scheduler",
            Injection::KillWorkers { .. } => "kill_workers",
            Injection::Cascade { .. } => "cascade",
            Injection::RestartService { .. } => "restart_service",
            Injection::RestartNats { .. } => "restart_nats",
            Injection::BackupDrill { .. } => "backup_drill",
            Injection::ConcurrentWrites { .. } => "concurrent_writes",
            Injection::NarrativeLogAudit { .. } => "narrative_log_audit",
            Injection::QueryStatus { .. } => "query_status",
            Injection::ReviewIntents { .. } => "review_intents",
            Injection::RandomOutage { .. } => "random_outage",
            Injection::RampIntents { .. } => "ramp_intents",
        }
    }

    /// Its name, or `<kind>#<index>`.
    pub fn label(&self, index: usize) -> String {
        self.name()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}#{index}", self.kind()))
    }

    /// The name given in the file.
    pub fn name(&self) -> Option<&str> {
        match self {
            Injection::ResourceSiege { name, .. } => name.as_deref(),
            Injection::PublishEvents { name, .. }
            | Injection::SubmitIntents { name, .. }
            | Injection::PauseScheduler { name, .. }
            | Injection::KillWorkers { name, .. }
            | Injection::Cascade { name, .. }
            | Injection::RestartService { name, .. }
            | Injection::RestartNats { name, .. }
            | Injection::BackupDrill { name, .. }
            | Injection::ConcurrentWrites { name, .. }
            | Injection::NarrativeLogAudit { name, .. }
            | Injection::QueryStatus { name, .. }
            | Injection::ReviewIntents { name, .. }
            | Injection::RandomOutage { name, .. }
            | Injection::RampIntents { name, .. } => name.as_deref(),
        }
    }

    /// Seconds after the method start.
    pub fn at_s(&self) -> f64 {
        match self {
            Injection::ResourceSiege { at_s, .. } => at_s.0,
            Injection::PublishEvents { at_s, .. }
            | Injection::SubmitIntents { at_s, .. }
            | Injection::PauseScheduler { at_s, .. }
            | Injection::KillWorkers { at_s, .. }
            | Injection::Cascade { at_s, .. }
            | Injection::RestartService { at_s, .. }
            | Injection::RestartNats { at_s, .. }
            | Injection::BackupDrill { at_s, .. }
            | Injection::ConcurrentWrites { at_s, .. }
            | Injection::NarrativeLogAudit { at_s, .. }
            | Injection::QueryStatus { at_s, .. }
            | Injection::ReviewIntents { at_s, .. }
            | Injection::RandomOutage { at_s, .. }
            | Injection::RampIntents { at_s, .. } => at_s.0,
        }
    }

    /// How long it lasts as planned (0 for the instantaneous ones; a closed-loop submission
    /// lasts as long as it takes).
    pub fn planned_duration_s(&self) -> f64 {
        match self {
            Injection::ResourceSiege { duration_s, .. } => duration_s.0,
            Injection::PublishEvents { duration_s, .. }
            | Injection::PauseScheduler { duration_s, .. } => duration_s.0,
            Injection::SubmitIntents { duration_s, .. } => duration_s.map(|d| d.0).unwrap_or(0.0),
            Injection::KillWorkers { over_s, .. } => over_s.0,
            Injection::RestartService { down_s, .. } | Injection::RestartNats { down_s, .. } => {
                down_s.0
            }
            Injection::Cascade { .. } => 0.0,
            Injection::BackupDrill {
                backups,
                interval_s,
                ..
            } => interval_s.0 * backups.0.saturating_sub(1) as f64,
            Injection::ConcurrentWrites { .. } => 0.0,
            Injection::NarrativeLogAudit { duration_s, .. }
            | Injection::QueryStatus { duration_s, .. }
            | Injection::ReviewIntents { duration_s, .. }
            | Injection::RampIntents { duration_s, .. } => duration_s.0,
            Injection::RandomOutage { over_s, .. } => over_s.0,
        }
    }

    /// True when the injection needs the runner's own stack.
    pub fn needs_own_stack(&self) -> bool {
        matches!(
            self,
            Injection::RestartService { .. }
                | Injection::RestartNats { .. }
                | Injection::RandomOutage { .. }
        )
    }

    /// This injection with its times scaled by `time` and its counts by `count` (`--quick`).
    pub fn scaled(&self, time: f64, count: f64) -> Injection {
        let s = |x: Seconds| Seconds(x.0 * time);
        let n = |x: AtLeastOne| AtLeastOne(((x.0 as f64) * count).round().max(1.0) as u64);
        let mut out = self.clone();
        match &mut out {
            Injection::ResourceSiege {
                at_s, duration_s, ..
            } => {
                *at_s = s(*at_s);
                *duration_s = s(*duration_s);
            }
            Injection::PublishEvents {
                at_s, duration_s, ..
            } => {
                *at_s = s(*at_s);
                *duration_s = s(*duration_s);
            }
            Injection::SubmitIntents {
                at_s,
                count: c,
                duration_s,
                ..
            } => {
                *at_s = s(*at_s);
                *c = c.map(n);
                *duration_s = duration_s.map(s);
            }
            Injection::PauseScheduler {
                at_s, duration_s, ..
            } => {
                *at_s = s(*at_s);
                *duration_s = s(*duration_s);
            }
            Injection::KillWorkers { at_s, over_s, .. } => {
                *at_s = s(*at_s);
                *over_s = s(*over_s);
            }
            Injection::Cascade { at_s, .. } => *at_s = s(*at_s),
            Injection::BackupDrill {
                at_s, interval_s, ..
            } => {
                *at_s = s(*at_s);
                *interval_s = s(*interval_s);
            }
            Injection::ConcurrentWrites {
                at_s,
                ops_per_writer,
                ..
            } => {
                *at_s = s(*at_s);
                *ops_per_writer = n(*ops_per_writer);
            }
            Injection::NarrativeLogAudit {
                at_s,
                duration_s,
                settle_s,
                ..
            } => {
                *at_s = s(*at_s);
                *duration_s = s(*duration_s);
                *settle_s = s(*settle_s);
            }
            Injection::RestartService { at_s, down_s, .. }
            | Injection::RestartNats { at_s, down_s, .. } => {
                *at_s = s(*at_s);
                *down_s = s(*down_s);
            }
            Injection::QueryStatus {
                at_s, duration_s, ..
            }
            | Injection::ReviewIntents {
                at_s, duration_s, ..
            } => {
                *at_s = s(*at_s);
                *duration_s = s(*duration_s);
            }
            Injection::RandomOutage {
                at_s,
                over_s,
                min_down_s,
                max_down_s,
                ..
            } => {
                *at_s = s(*at_s);
                *over_s = s(*over_s);
                *min_down_s = s(*min_down_s);
                *max_down_s = s(*max_down_s);
            }
            Injection::RampIntents {
                at_s,
                duration_s,
                from_per_s,
                to_per_s,
                max_in_flight,
                ..
            } => {
                *at_s = s(*at_s);
                *duration_s = s(*duration_s);
                *from_per_s = n(*from_per_s);
                *to_per_s = n(*to_per_s);
                *max_in_flight = n(*max_in_flight);
            }
        }
        out
    }
}

/// A safeguard that must fire: events on `subject` whose fields equal `where`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// The safeguard's name (unique in the scenario; the control refers to it).
    pub safeguard: String,
    /// The NATS subject (pattern) it announces itself on.
    pub subject: String,
    /// Fields (`payload.playbook`, `what`, ...) and the values they must have.
    #[serde(default, rename = "where")]
    pub matching: BTreeMap<String, toml::Value>,
    /// The field holding the figure to report (and to hold against `min_value`/`max_value`).
    #[serde(default)]
    pub value: Option<String>,
    /// The first firing's figure must be at least this.
    #[serde(default)]
    pub min_value: Option<f64>,
    /// The first firing's figure must be at most this.
    #[serde(default)]
    pub max_value: Option<f64>,
    /// It must fire within this many seconds of the start of `after` (or of the method).
    #[serde(default)]
    pub within_s: Option<Seconds>,
    /// The injection (by name) the time limit counts from.
    #[serde(default)]
    pub after: Option<String>,
    /// It must fire at least this many times (counting every matching event).
    #[serde(default = "one_u64")]
    pub min_count: u64,
    /// It must fire at least once per act of this injection (by name): per worker
    /// `kill_workers` actually killed, per outage `random_outage` actually made, once per
    /// `restart_service`/`restart_nats`. Replaces `min_count` with what the injection did, so
    /// the count follows the injection rather than a constant timing can miss.
    #[serde(default)]
    pub min_count_from: Option<String>,
    /// It may fire at most this many times.
    #[serde(default)]
    pub max_count: Option<u64>,
}

fn one_u64() -> u64 {
    1
}

/// What a [`Stress`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// The peak of the task queue depth (`htm.readiness`, sampled every second by the
    /// timeline).
    QueueDepth,
}

impl Measure {
    /// The measure's name in the file and the report.
    pub fn name(self) -> &'static str {
        match self {
            Measure::QueueDepth => "queue_depth",
        }
    }
}

/// A stress the method must reach (a precondition of some safeguards): `measure` must reach
/// `at_least` during the method. When it does not, the safeguards of `safeguards` that did not
/// fire (or fired wrongly) cannot be judged and the run is INCONCLUSIVE with the numbers; when
/// it does, they are judged as usual (a missing one FAILs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stress {
    /// Its name (unique; `[quick.stress."<name>"]` refers to it).
    pub name: String,
    /// What is measured.
    pub measure: Measure,
    /// The peak must reach at least this.
    pub at_least: f64,
    /// The safeguards (by name) that need this stress to fire.
    pub safeguards: Vec<String>,
}

/// What `--quick` may change in a stress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StressOverride {
    /// Replaces `at_least`.
    #[serde(default)]
    pub at_least: Option<f64>,
}

/// What the checker and the measurements must show.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// Ids still held (not yet processed) after the recovery wait, at most (lost, duplicated and
    /// unexpected ids must always be 0).
    #[serde(default)]
    pub still_held_max: u64,
    /// The 99th percentile of the intake latency (intent submitted to its decision), at most,
    /// in milliseconds.
    #[serde(default)]
    pub submit_p99_ms_max: Option<f64>,
    /// The 99th percentile of the completion latency (intents: queued to completed; events:
    /// published to processed by the checker's mesh reader), at most, in milliseconds.
    #[serde(default)]
    pub completion_p99_ms_max: Option<f64>,
    /// Cascades: no produced event deeper than this.
    #[serde(default)]
    pub max_event_depth: Option<u64>,
    /// Cascades: exactly this many events at each level from 0 to `max_event_depth`.
    #[serde(default)]
    pub events_per_level: Option<u64>,
    /// The load reached at least this share of what was asked (else the run is inconclusive).
    #[serde(default = "default_load_share")]
    pub min_load_share: Share,
    /// The 99th percentile of the status queries (`query_status`: first attempt to answer), at
    /// most, in milliseconds.
    #[serde(default)]
    pub query_p99_ms_max: Option<f64>,
    /// Share of the API operations (submissions, status queries, review decisions) that failed
    /// after the client's retries, at most.
    #[serde(default)]
    pub error_rate_max: Option<Share>,
    /// Intents of this priority or more are critical: every one acknowledged must complete,
    /// none may be parked.
    #[serde(default)]
    pub critical_priority: Option<u8>,
    /// After the recovery, replay the park (`scheduler.replay`, in batches the queue can take)
    /// and wait for the replayed intents to complete; without it, parked intents are counted as
    /// parked (not lost) and must not exceed `parked_max`.
    #[serde(default)]
    pub replay_park: bool,
    /// Intents left in the park at the check, at most.
    #[serde(default)]
    pub parked_max: u64,
}

fn default_load_share() -> Share {
    Share(0.8)
}

/// The negative control.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// What the control does.
    pub description: String,
    /// Its injections (the same workload at normal load).
    #[serde(rename = "inject")]
    pub method: Vec<Injection>,
    /// Safeguards (by name) that must not fire under it.
    pub absent: Vec<String>,
}

/// How `--quick` shortens the scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quick {
    /// Factor on every injection's times (`at_s`, `duration_s`, `over_s`, `down_s`).
    pub time_scale: f64,
    /// Factor on closed-loop intent counts, the writers' operations and the ramp's rates.
    pub count_scale: f64,
    /// Replaces `recovery_limit_s`.
    pub recovery_limit_s: Option<Seconds>,
    /// Configuration layered over `[system]`.
    pub system: toml::Table,
    /// Replaces parts of expectations, by safeguard name (`[quick.expect."circuit breaker"]`).
    pub expect: BTreeMap<String, ExpectOverride>,
    /// Replaces parts of stresses, by name (`[quick.stress."queue over the guard"]`).
    pub stress: BTreeMap<String, StressOverride>,
}

/// What `--quick` may change in an expectation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectOverride {
    /// Replaces `within_s`.
    #[serde(default)]
    pub within_s: Option<Seconds>,
    /// Replaces `min_value`.
    #[serde(default)]
    pub min_value: Option<f64>,
    /// Replaces `max_value`.
    #[serde(default)]
    pub max_value: Option<f64>,
    /// Replaces `min_count`.
    #[serde(default)]
    pub min_count: Option<u64>,
    /// Replaces `max_count`.
    #[serde(default)]
    pub max_count: Option<u64>,
}

impl Default for Quick {
    fn default() -> Self {
        Self {
            time_scale: 1.0,
            count_scale: 1.0,
            recovery_limit_s: None,
            system: toml::Table::new(),
            expect: BTreeMap::new(),
            stress: BTreeMap::new(),
        }
    }
}

/// A scenario read from a file.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The scenario.
    pub scenario: Scenario,
    /// Where it came from.
    pub file: PathBuf,
}

impl Scenario {
    /// Parses `text` (the contents of `file`) and checks what serde cannot.
    pub fn parse(file: &Path, text: &str) -> Result<Scenario, LoadError> {
        let err = |line: usize, reason: String| LoadError {
            file: file.to_owned(),
            line,
            reason,
        };
        let scenario: Scenario = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_at(text, span.start)).unwrap_or(1);
            err(line, e.message().trim().to_owned())
        })?;
        let find = |needle: &str| line_of(text, needle);
        if scenario.id.is_empty()
            || !scenario
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(err(
                find("id"),
                format!(
                    "id must be letters, digits, `_` and `-`, got {:?}",
                    scenario.id
                ),
            ));
        }
        if let Some(stem) = file.file_stem().and_then(|s| s.to_str())
            && stem != scenario.id
        {
            return Err(err(
                find("id"),
                format!(
                    "id {:?} does not match the file name {stem}.toml",
                    scenario.id
                ),
            ));
        }
        if scenario.method.is_empty() {
            return Err(err(find("[steady_state]"), "no [[inject]] given".into()));
        }
        if scenario.steady_state.checks.is_empty() {
            return Err(err(
                find("checks"),
                "steady_state.checks must name at least one check".into(),
            ));
        }
        for (section, method) in [
            ("inject", &scenario.method),
            ("control.inject", &scenario.control.method),
        ] {
            validate_method(method).map_err(|(needle, reason)| {
                err(find(&needle), format!("[[{section}]]: {reason}"))
            })?;
        }
        let mut names = std::collections::BTreeSet::new();
        let injection_names: Vec<&str> = scenario.method.iter().filter_map(|i| i.name()).collect();
        for e in &scenario.expectations {
            let at = || find(&format!("{:?}", e.safeguard));
            if !names.insert(e.safeguard.as_str()) {
                return Err(err(
                    at(),
                    format!("safeguard {:?} is expected twice", e.safeguard),
                ));
            }
            if e.subject.is_empty() || e.subject.contains(' ') {
                return Err(err(
                    at(),
                    format!("expectation {:?}: bad subject {:?}", e.safeguard, e.subject),
                ));
            }
            if let Some(after) = &e.after
                && !injection_names.contains(&after.as_str())
            {
                return Err(err(
                    find(&format!("after = {after:?}")),
                    format!(
                        "expectation {:?}: after names no injection: {after:?} (named: {})",
                        e.safeguard,
                        injection_names.join(", ")
                    ),
                ));
            }
            if (e.min_value.is_some() || e.max_value.is_some()) && e.value.is_none() {
                return Err(err(
                    at(),
                    format!(
                        "expectation {:?}: min_value/max_value need `value` (the field to read)",
                        e.safeguard
                    ),
                ));
            }
            if e.max_count.is_some_and(|max| max < e.min_count) {
                return Err(err(
                    at(),
                    format!(
                        "expectation {:?}: max_count is below min_count",
                        e.safeguard
                    ),
                ));
            }
        }
        validate_counts_and_stresses(&scenario, &names)
            .map_err(|(needle, reason)| err(find(&needle), reason))?;
        for absent in &scenario.control.absent {
            if !names.contains(absent.as_str()) {
                return Err(err(
                    find("absent"),
                    format!(
                        "control.absent names an unknown safeguard {absent:?} (expected: {})",
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        for name in scenario.quick.expect.keys() {
            if !names.contains(name.as_str()) {
                return Err(err(
                    find("[quick.expect"),
                    format!("quick.expect names an unknown safeguard {name:?}"),
                ));
            }
        }
        for (what, factor) in [
            ("time_scale", scenario.quick.time_scale),
            ("count_scale", scenario.quick.count_scale),
        ] {
            if !(factor > 0.0 && factor <= 1.0) {
                return Err(err(
                    find(what),
                    format!("quick.{what} must be above 0 and at most 1, got {factor}"),
                ));
            }
        }
        if let Some(p) = scenario.verify.critical_priority
            && p > 9
        {
            return Err(err(
                find("critical_priority"),
                format!("verify.critical_priority must be 0-9, got {p}"),
            ));
        }
        for (section, table) in [
            ("[system]", &scenario.system),
            ("[quick.system]", &scenario.quick.system),
        ] {
            if let Err(reason) = apply_system(BulwarkConfig::default(), &[table]) {
                let line = find(section).max(find(section.trim_end_matches(']')));
                return Err(err(line, format!("{section}: {reason}")));
            }
        }
        Ok(scenario)
    }

    /// This scenario as `--quick` runs it.
    pub fn quick(&self) -> Scenario {
        let q = &self.quick;
        let mut s = self.clone();
        s.method = self
            .method
            .iter()
            .map(|i| i.scaled(q.time_scale, q.count_scale))
            .collect();
        s.control.method = self
            .control
            .method
            .iter()
            .map(|i| i.scaled(q.time_scale, q.count_scale))
            .collect();
        if let Some(limit) = q.recovery_limit_s {
            s.recovery_limit_s = limit;
        }
        for e in &mut s.expectations {
            if let Some(o) = q.expect.get(&e.safeguard) {
                e.within_s = o.within_s.or(e.within_s);
                e.min_value = o.min_value.or(e.min_value);
                e.max_value = o.max_value.or(e.max_value);
                e.min_count = o.min_count.unwrap_or(e.min_count);
                e.max_count = o.max_count.or(e.max_count);
            }
        }
        for st in &mut s.stresses {
            if let Some(o) = q.stress.get(&st.name) {
                st.at_least = o.at_least.unwrap_or(st.at_least);
            }
        }
        s
    }

    /// The configuration the runner's own stack uses: `base` with `[system]` and, when quick,
    /// `[quick.system]` layered over it.
    pub fn system_config(&self, base: BulwarkConfig, quick: bool) -> Result<BulwarkConfig, String> {
        let mut layers = vec![&self.system];
        if quick {
            layers.push(&self.quick.system);
        }
        apply_system(base, &layers)
    }
}

/// `min_count_from` names an injection that counts its acts; every stress is named once,
/// reaches a positive figure and gates known safeguards; `[quick.stress]` names stresses.
fn validate_counts_and_stresses(
    s: &Scenario,
    safeguards: &std::collections::BTreeSet<&str>,
) -> Result<(), (String, String)> {
    for e in &s.expectations {
        let Some(from) = &e.min_count_from else {
            continue;
        };
        let counts = s.method.iter().any(|i| {
            i.name() == Some(from.as_str())
                && matches!(
                    i,
                    Injection::KillWorkers { .. }
                        | Injection::RandomOutage { .. }
                        | Injection::RestartService { .. }
                        | Injection::RestartNats { .. }
                )
        });
        if !counts {
            return Err((
                format!("min_count_from = {from:?}"),
                format!(
                    "expectation {:?}: min_count_from names no kill_workers, random_outage, restart_service or restart_nats injection: {from:?}",
                    e.safeguard
                ),
            ));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for st in &s.stresses {
        let at = format!("{:?}", st.name);
        if !names.insert(st.name.as_str()) {
            return Err((at, format!("stress {:?} is given twice", st.name)));
        }
        if !(st.at_least.is_finite() && st.at_least > 0.0) {
            return Err((
                at,
                format!("stress {:?}: at_least must be above 0", st.name),
            ));
        }
        if st.safeguards.is_empty() {
            return Err((
                at,
                format!("stress {:?}: name the safeguards it gates", st.name),
            ));
        }
        if let Some(unknown) = st
            .safeguards
            .iter()
            .find(|g| !safeguards.contains(g.as_str()))
        {
            return Err((
                at,
                format!(
                    "stress {:?} gates an unknown safeguard {unknown:?}",
                    st.name
                ),
            ));
        }
    }
    if let Some(unknown) = s.quick.stress.keys().find(|k| !names.contains(k.as_str())) {
        return Err((
            "[quick.stress".into(),
            format!("quick.stress names an unknown stress {unknown:?}"),
        ));
    }
    Ok(())
}

fn validate_method(method: &[Injection]) -> Result<(), (String, String)> {
    if method.is_empty() {
        return Err(("inject".into(), "at least one injection is needed".into()));
    }
    let mut names = std::collections::BTreeSet::new();
    for i in method {
        if let Some(name) = i.name()
            && !names.insert(name.to_owned())
        {
            return Err((
                format!("{name:?}"),
                format!("the name {name:?} is used twice"),
            ));
        }
        match i {
            Injection::PublishEvents { patterns, .. } => {
                if patterns.is_empty() {
                    return Err(("patterns".into(), "patterns is empty".into()));
                }
                for p in patterns {
                    let probe = p.replace('*', "t0");
                    if !bulwark_common::subjects::is_valid_event_type(&probe) {
                        return Err((
                            format!("{p:?}"),
                            format!(
                                "pattern {p:?} is not an event type (tokens of [a-z0-9_-], `*` for generated ones)"
                            ),
                        ));
                    }
                }
            }
            Injection::SubmitIntents {
                count,
                rate_per_s,
                duration_s,
                priority,
                intent_type,
                ..
            } => {
                match (count, rate_per_s, duration_s) {
                    (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                    _ => {
                        return Err((
                            "submit_intents".into(),
                            "submit_intents needs either `count` or both `rate_per_s` and `duration_s`"
                                .into(),
                        ));
                    }
                }
                if priority.is_some_and(|p| p > 9) {
                    return Err(("priority".into(), "priority must be 0-9".into()));
                }
                if intent_type.is_empty() {
                    return Err(("intent_type".into(), "intent_type is empty".into()));
                }
            }
            Injection::Cascade { tag, .. } => {
                if tag.is_empty()
                    || !tag
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    return Err((
                        format!("{tag:?}"),
                        format!("cascade tag must be [a-z0-9_], got {tag:?}"),
                    ));
                }
            }
            Injection::RestartService { service, .. } => {
                if !RESTARTABLE.contains(&service.as_str()) {
                    return Err((
                        format!("{service:?}"),
                        format!(
                            "restart_service: unknown service {service:?} (one of {})",
                            RESTARTABLE.join(", ")
                        ),
                    ));
                }
            }
            Injection::ResourceSiege { .. } => {}
            Injection::ReviewIntents {
                intent_type,
                priority,
                ..
            } => {
                if priority.is_some_and(|p| p > 9) {
                    return Err(("priority".into(), "priority must be 0-9".into()));
                }
                if intent_type.is_empty() {
                    return Err(("intent_type".into(), "intent_type is empty".into()));
                }
            }
            Injection::RampIntents {
                intent_type,
                from_per_s,
                to_per_s,
                ..
            } => {
                if intent_type.is_empty() {
                    return Err(("intent_type".into(), "intent_type is empty".into()));
                }
                if from_per_s.0 > 100_000 || to_per_s.0 > 100_000 {
                    return Err((
                        "ramp_intents".into(),
                        "ramp_intents: rates above 100,000 per second are refused".into(),
                    ));
                }
            }
            Injection::RandomOutage {
                targets,
                min_down_s,
                max_down_s,
                ..
            } => {
                if targets.is_empty() {
                    return Err(("targets".into(), "random_outage: targets is empty".into()));
                }
                for t in targets {
                    if !OUTAGE_TARGETS.contains(&t.as_str()) && !RESTARTABLE.contains(&t.as_str()) {
                        return Err((
                            format!("{t:?}"),
                            format!(
                                "random_outage: unknown target {t:?} (one of nats, workers, {})",
                                RESTARTABLE.join(", ")
                            ),
                        ));
                    }
                }
                if min_down_s > max_down_s {
                    return Err((
                        "min_down_s".into(),
                        "random_outage: min_down_s is above max_down_s".into(),
                    ));
                }
            }
            Injection::QueryStatus { .. } => {}
            Injection::PauseScheduler { .. }
            | Injection::KillWorkers { .. }
            | Injection::RestartNats { .. }
            | Injection::BackupDrill { .. }
            | Injection::ConcurrentWrites { .. }
            | Injection::NarrativeLogAudit { .. } => {}
        }
    }
    Ok(())
}

/// Layers `tables` (each shaped like `bulwark.toml`) over `base`; unknown keys and bad values
/// are errors naming the key.
pub fn apply_system(base: BulwarkConfig, tables: &[&toml::Table]) -> Result<BulwarkConfig, String> {
    if tables.iter().all(|t| t.is_empty()) {
        return Ok(base);
    }
    let mut value = toml::Value::try_from(&base).map_err(|e| e.to_string())?;
    for table in tables {
        merge(&mut value, &toml::Value::Table((*table).clone()));
    }
    let cfg: BulwarkConfig = value
        .try_into()
        .map_err(|e: toml::de::Error| e.message().trim().to_owned())?;
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn merge(into: &mut toml::Value, over: &toml::Value) {
    match (into, over) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map(|t| t.matches('\n').count() + 1)
        .unwrap_or(1)
}

/// The 1-based line of the first line containing `needle` (1 when none does).
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or(1)
}

/// Loads every `*.toml` of `dir`, sorted by id; every error of every file is returned.
pub fn load_dir(dir: &Path) -> Result<Vec<Loaded>, Vec<LoadError>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return Err(vec![LoadError {
                file: dir.to_owned(),
                line: 1,
                reason: format!("cannot read the scenario directory: {e}"),
            }]);
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match load_file(&file) {
            Ok(l) => loaded.push(l),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        loaded.sort_by(|a, b| a.scenario.id.cmp(&b.scenario.id));
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// Loads one scenario file.
pub fn load_file(file: &Path) -> Result<Loaded, LoadError> {
    let text = std::fs::read_to_string(file).map_err(|e| LoadError {
        file: file.to_owned(),
        line: 1,
        reason: format!("cannot read: {e}"),
    })?;
    Ok(Loaded {
        scenario: Scenario::parse(file, &text)?,
        file: file.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "demo"
category = "layer2"
severity = 3
description = "a demo"
recovery_limit_s = 30.0

[system.mesh]
cooldown_s = 5.0

[steady_state]
checks = ["services_answer", "breaker_closed"]

[[inject]]
kind = "publish_events"
name = "flood"
rate_per_s = 100
duration_s = 2.0
patterns = ["test.spam.*"]
types_per_pattern = 4

[[expect]]
safeguard = "breaker"
subject = "mesh.breaker.opened"
value = "payload.event_count"
min_value = 500.0
within_s = 10.0
after = "flood"

[verify]
still_held_max = 0

[control]
description = "calm"
absent = ["breaker"]
[[control.inject]]
kind = "publish_events"
rate_per_s = 10
duration_s = 2.0
patterns = ["test.spam.*"]

[quick]
time_scale = 0.5
"#;

    fn parse(text: &str) -> Result<Scenario, LoadError> {
        Scenario::parse(Path::new("chaos/scenarios/demo.toml"), text)
    }

    #[test]
    fn a_good_file_loads() {
        let s = parse(GOOD).expect("loads");
        assert_eq!(s.id, "demo");
        assert_eq!(s.method.len(), 1);
        assert_eq!(s.expectations[0].after.as_deref(), Some("flood"));
        let cfg = s
            .system_config(BulwarkConfig::default(), false)
            .expect("config");
        assert_eq!(cfg.mesh.cooldown_s, 5.0);
        let q = s.quick();
        assert_eq!(q.method[0].planned_duration_s(), 1.0);
    }

    #[test]
    fn an_unknown_field_names_file_line_and_field() {
        let text = GOOD.replace("types_per_pattern = 4", "types_per_pattern = 4\nspeed = 9");
        let e = parse(&text).expect_err("refused");
        assert_eq!(e.file, Path::new("chaos/scenarios/demo.toml"));
        assert!(e.reason.contains("speed"), "{e}");
        let line = text
            .lines()
            .position(|l| l.contains("speed"))
            .expect("line")
            + 1;
        // The error points into the [[inject]] table holding the unknown key.
        assert!(
            e.line <= line && e.line >= line - 7,
            "{e} (speed on {line})"
        );
    }

    #[test]
    fn a_bad_value_is_refused_at_its_line() {
        let text = GOOD.replace("severity = 3", "severity = 7");
        let e = parse(&text).expect_err("refused");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.reason.contains("severity must be 1-5"), "{e}");
        let text = GOOD.replace("duration_s = 2.0\npatterns", "duration_s = -2.0\npatterns");
        let e = parse(&text).expect_err("refused");
        assert!(e.reason.contains("0 or more"), "{e}");
        let text = GOOD.replace("\"test.spam.*\"]\ntypes", "\"Test Spam\"]\ntypes");
        let e = parse(&text).expect_err("refused");
        assert!(e.reason.contains("not an event type"), "{e}");
    }

    #[test]
    fn a_missing_section_is_named() {
        let text = GOOD.replace("[verify]\nstill_held_max = 0\n", "");
        let e = parse(&text).expect_err("refused");
        assert!(e.reason.contains("verify"), "{e}");
        let text = GOOD.replace(
            "[steady_state]\nchecks = [\"services_answer\", \"breaker_closed\"]\n",
            "",
        );
        let e = parse(&text).expect_err("refused");
        assert!(e.reason.contains("steady_state"), "{e}");
    }

    #[test]
    fn cross_references_and_system_keys_are_checked() {
        let text = GOOD.replace("after = \"flood\"", "after = \"flod\"");
        let e = parse(&text).expect_err("no");
        assert!(e.reason.contains("after names no injection"), "{e}");
        let line = text.lines().position(|l| l.contains("flod")).expect("line") + 1;
        assert_eq!(e.line, line, "{e}");
        let e = parse(&GOOD.replace("absent = [\"breaker\"]", "absent = [\"breakr\"]"))
            .expect_err("no");
        assert!(e.reason.contains("unknown safeguard"), "{e}");
        let e = parse(&GOOD.replace("cooldown_s = 5.0", "cooldwn_s = 5.0")).expect_err("no");
        assert!(e.reason.contains("cooldwn_s"), "{e}");
        assert_eq!(e.line, 8, "{e}");
        let e = parse(&GOOD.replace("check\"", "x")).err();
        assert!(e.is_none());
        let e = parse(&GOOD.replace("\"breaker_closed\"", "\"breaker_shut\"")).expect_err("no");
        assert!(e.reason.contains("breaker_shut"), "{e}");
        let e = Scenario::parse(Path::new("other.toml"), GOOD).expect_err("no");
        assert!(e.reason.contains("does not match the file name"), "{e}");
    }

    #[test]
    fn stresses_and_counts_from_injections_are_checked_and_scaled() {
        let stress = "[[stress]]\nname = \"deep\"\nmeasure = \"queue_depth\"\nat_least = 1000.0\nsafeguards = [\"breaker\"]\n\n[verify]";
        let text = GOOD.replace("[verify]", stress) + "[quick.stress.\"deep\"]\nat_least = 400.0\n";
        let s = parse(&text).expect("loads");
        assert_eq!(s.stresses[0].measure, Measure::QueueDepth);
        assert_eq!(s.stresses[0].at_least, 1000.0);
        assert_eq!(s.quick().stresses[0].at_least, 400.0, "--quick replaces it");
        let e = parse(&text.replace("safeguards = [\"breaker\"]", "safeguards = [\"brake\"]"))
            .expect_err("no");
        assert!(e.reason.contains("unknown safeguard \"brake\""), "{e}");
        let e = parse(&text.replace("[quick.stress.\"deep\"]", "[quick.stress.\"shallow\"]"))
            .expect_err("no");
        assert!(e.reason.contains("unknown stress \"shallow\""), "{e}");
        let e = parse(&text.replace("measure = \"queue_depth\"", "measure = \"speed\""))
            .expect_err("no");
        assert!(e.reason.contains("speed"), "{e}");
        // min_count_from must name an injection that counts what it did.
        let counted = GOOD.replace(
            "after = \"flood\"",
            "after = \"flood\"\nmin_count_from = \"flood\"",
        );
        let e = parse(&counted).expect_err("publish_events counts no acts");
        assert!(
            e.reason.contains("min_count_from names no kill_workers"),
            "{e}"
        );
        let killing = counted.replace(
            "[[expect]]",
            "[[inject]]\nkind = \"kill_workers\"\nname = \"dropout\"\nfraction = 0.5\nover_s = 1.0\n\n[[expect]]",
        );
        let s =
            parse(&killing.replace("min_count_from = \"flood\"", "min_count_from = \"dropout\""))
                .expect("kill_workers counts its kills");
        assert_eq!(s.expectations[0].min_count_from.as_deref(), Some("dropout"));
    }

    #[test]
    fn fit_injections_are_checked_and_scaled() {
        let outage = GOOD.replace(
            "[[expect]]",
            "[[inject]]\nkind = \"random_outage\"\nover_s = 60.0\noutages = 2\ntargets = [\"nats\", \"scheduler\"]\nmin_down_s = 10.0\nmax_down_s = 20.0\n\n[[expect]]",
        );
        let s = parse(&outage).expect("loads");
        assert!(s.method[1].needs_own_stack());
        let q = s.quick();
        match &q.method[1] {
            Injection::RandomOutage {
                over_s,
                min_down_s,
                max_down_s,
                ..
            } => assert_eq!((over_s.0, min_down_s.0, max_down_s.0), (30.0, 5.0, 10.0)),
            other => panic!("{other:?}"),
        }
        let e = parse(&outage.replace("\"scheduler\"]", "\"databse\"]")).expect_err("no");
        assert!(e.reason.contains("unknown target \"databse\""), "{e}");
        let e = parse(&outage.replace("min_down_s = 10.0", "min_down_s = 30.0")).expect_err("no");
        assert!(e.reason.contains("min_down_s is above max_down_s"), "{e}");
        let ramp = GOOD.replace(
            "[[expect]]",
            "[[inject]]\nkind = \"ramp_intents\"\nfrom_per_s = 1000\nto_per_s = 10000\nduration_s = 60.0\n\n[[expect]]",
        )
        .replace("time_scale = 0.5", "time_scale = 0.5\ncount_scale = 0.1");
        let q = parse(&ramp).expect("loads").quick();
        match &q.method[1] {
            Injection::RampIntents {
                from_per_s,
                to_per_s,
                duration_s,
                max_in_flight,
                ..
            } => assert_eq!(
                (from_per_s.0, to_per_s.0, duration_s.0, max_in_flight.0),
                (100, 1000, 30.0, 200)
            ),
            other => panic!("{other:?}"),
        }
        let e = parse(&GOOD.replace("[verify]\n", "[verify]\ncritical_priority = 12\n"))
            .expect_err("no");
        assert!(e.reason.contains("critical_priority must be 0-9"), "{e}");
    }

    #[test]
    fn the_repository_scenarios_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let loaded = load_dir(&dir).unwrap_or_else(|errors| {
            panic!(
                "{}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert!(loaded.len() >= 5);
    }
}
