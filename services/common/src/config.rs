//! Configuration: built-in defaults, then a TOML file (`--config` / `BULWARK_CONFIG`, else
//! `./bulwark.toml` when present), then `BULWARK_<SECTION>__<KEY>` environment variables
//! (e.g. `BULWARK_GOVERNANCE__DEFAULT_TIER=1`, `BULWARK_NATS__URL=nats://host:4222`).
//!
//! The repository's `bulwark.toml` lists every key with its default; `docs/configuration.md`
//! explains them. Unknown keys are errors, so a typo is reported rather than ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// True for environment variables that address a config key: `BULWARK_<SECTION>__<KEY>`.
/// Variables without the double underscore (`BULWARK_NATS_URL`, `BULWARK_CONFIG`, `BULWARK_LOG`)
/// belong to the command line and tools, not to this file's keys.
fn is_config_env(key: &str) -> bool {
    key.strip_prefix("BULWARK_")
        .is_some_and(|rest| rest.contains("__"))
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` does not exist.
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    /// The layers could not be read or merged into [`BulwarkConfig`].
    #[error("invalid configuration: {0}")]
    Invalid(#[from] config::ConfigError),
    /// The values parse but contradict each other or are out of range.
    #[error("invalid configuration: {0}")]
    Inconsistent(String),
}

/// All of bulwark's configuration, one section per concern.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BulwarkConfig {
    /// How services and the CLI reach NATS.
    pub nats: NatsConfig,
    /// How `bulwark up` runs the local stack.
    pub up: UpConfig,
    /// Periodic telemetry.
    pub telemetry: TelemetryConfig,
    /// Intent governance: tiers, alignment, review and votes.
    pub governance: GovernanceConfig,
    /// Clarity: the hash-chained audit of narratives, its retention and queries.
    pub clarity: ClarityConfig,
    /// The trigger mesh: envelope limits, storm guard, circuit breaker, cascade limits, policies.
    pub mesh: MeshConfig,
    /// The scheduler: dispatch, worker watchdog, queue guards, shedding, SLA.
    pub scheduler: SchedulerConfig,
    /// The Layer 2 watchdog: sweeps, heartbeat timeout, re-alerting, dispatch rate.
    pub watchdog: WatchdogConfig,
    /// HTM workers.
    pub worker: WorkerConfig,
    /// The Prometheus `/metrics` endpoint of `bulwark up` and `bulwark serve`.
    pub metrics: MetricsConfig,
    /// Replicas of a service: leader leases, health, quarantine and respawn.
    pub replicas: ReplicasConfig,
    /// Playbooks: where the Rhai scripts live and the sandbox's limits.
    pub playbooks: PlaybooksConfig,
    /// Operator-defined actions by intent type (`[actions.<intent_type>]`, docs/actions.md): what
    /// an approved intent of that type really does. A type without one runs the built-in handler.
    pub actions: BTreeMap<String, crate::action::ActionConfig>,
    /// Schedules by name (`[schedules.<name>]`, docs/actions.md#schedules): an intent submitted
    /// on a cron expression's times, as a named actor, through the normal intake.
    pub schedules: BTreeMap<String, crate::schedule::ScheduleConfig>,
    /// The web console for the people in the loop.
    pub console: crate::console_config::ConsoleConfig,
    /// Webhook notifications for the people in the loop.
    pub notify: crate::console_config::NotifyConfig,
}

/// The playbooks service: the scripts' folder, the sandbox's limits, run pacing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlaybooksConfig {
    /// Folder of the `<name>.rhai` playbooks (relative to the working directory).
    pub dir: String,
    /// Rhai operations one run may perform (a loop that never ends stops here).
    pub max_operations: u64,
    /// Deepest nesting of function calls.
    pub max_call_levels: usize,
    /// Deepest expression nesting (at the top level; functions get half).
    pub max_expr_depth: usize,
    /// Longest string a script may build, bytes.
    pub max_string_size: usize,
    /// Largest array a script may build.
    pub max_array_size: usize,
    /// Largest map a script may build.
    pub max_map_size: usize,
    /// Longest a run may take, seconds: a run's deadline is `min(2 × slo_s, max_run_s)`.
    pub max_run_s: f64,
    /// Longest one `wait()` may sleep, seconds.
    pub max_wait_s: f64,
    /// Multiplies every wait and verification interval the scripts ask for, and every
    /// playbook's cooldown: 1.0 in production; tests and quick chaos runs shorten them.
    pub time_scale: f64,
    /// Incidents older than this, seconds, are not acted on (narrated as stale).
    pub max_incident_age_s: f64,
    /// How long one request of a host function to another service may take, milliseconds.
    pub host_timeout_ms: u64,
    /// Parameter values per playbook that replace its defaults and win over anything an
    /// incident forwards (an incident only supplies the keys the playbook's `forward` lists):
    /// `[playbooks.overrides.scheduler_load_shedding] older_than_s = 300.0`.
    pub overrides:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, serde_json::Value>>,
}

impl Default for PlaybooksConfig {
    fn default() -> Self {
        Self {
            dir: "playbooks".into(),
            max_operations: 1_000_000,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_string_size: 64 * 1024,
            max_array_size: 10_000,
            max_map_size: 10_000,
            max_run_s: 300.0,
            max_wait_s: 60.0,
            time_scale: 1.0,
            max_incident_age_s: 300.0,
            host_timeout_ms: 5_000,
            overrides: std::collections::BTreeMap::new(),
        }
    }
}

impl PlaybooksConfig {
    fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_nan() || v <= 0.0 {
                Err(format!("playbooks.{name} must be positive, got {v}"))
            } else {
                Ok(())
            }
        };
        positive("max_run_s", self.max_run_s)?;
        positive("max_wait_s", self.max_wait_s)?;
        positive("time_scale", self.time_scale)?;
        positive("max_incident_age_s", self.max_incident_age_s)?;
        if self.max_operations == 0
            || self.max_call_levels == 0
            || self.max_expr_depth == 0
            || self.max_string_size == 0
            || self.max_array_size == 0
            || self.max_map_size == 0
            || self.host_timeout_ms == 0
        {
            return Err(
                "playbooks limits must all be at least 1 (0 would mean unlimited in Rhai)".into(),
            );
        }
        Ok(())
    }
}

/// Replicas of a service (`bulwark serve <service>` run several times, or `up.replicas`): the
/// leases of single-actor duties, and the sandbox fallback (health, quarantine, respawn).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicasConfig {
    /// Seconds a leader's lease lasts without renewal (renewed every third of it). A standby
    /// takes over when it saw the lease unchanged for this long, so failover takes at most this
    /// plus one standby poll (a fifth of it).
    pub lease_ttl_s: f64,
    /// Seconds between two `replica.heartbeat.<service>.<replica_id>` of each replica.
    pub heartbeat_interval_s: f64,
    /// Errors within `error_window_s` that quarantine a replica (seed: 10): it stops taking
    /// work, its traffic shifts to the healthy replicas, and its supervisor respawns it.
    pub error_threshold: u64,
    /// Sliding window of the error count, in seconds.
    pub error_window_s: f64,
    /// Seconds the supervisor waits before respawning a quarantined or crashed replica.
    pub respawn_delay_s: f64,
    /// Seconds a respawned replica has to pass its readiness check before the supervisor
    /// quarantines it again.
    pub ready_timeout_s: f64,
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        Self {
            lease_ttl_s: 10.0,
            heartbeat_interval_s: 5.0,
            error_threshold: 10,
            error_window_s: 60.0,
            respawn_delay_s: 1.0,
            ready_timeout_s: 30.0,
        }
    }
}

impl ReplicasConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("lease_ttl_s", self.lease_ttl_s),
            ("heartbeat_interval_s", self.heartbeat_interval_s),
            ("error_window_s", self.error_window_s),
            ("ready_timeout_s", self.ready_timeout_s),
        ] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(format!(
                    "replicas.{key} must be a positive number, got {value}"
                ));
            }
        }
        if self.respawn_delay_s.is_nan() || self.respawn_delay_s < 0.0 {
            return Err(format!(
                "replicas.respawn_delay_s must be 0 or more, got {}",
                self.respawn_delay_s
            ));
        }
        if self.error_threshold == 0 {
            return Err("replicas.error_threshold must be at least 1".into());
        }
        Ok(())
    }
}

/// The Prometheus `/metrics` endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address to serve `/metrics` on (loopback by default); empty disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl BulwarkConfig {
    /// Loads the layers. `file` is the `--config` path; without one, `./bulwark.toml` is used
    /// when it exists.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: std::collections::HashMap<String, String> = std::env::vars()
            .filter(|(key, _)| is_config_env(key))
            .collect();
        Self::load_from(file, env)
    }

    /// Like [`load`](Self::load) with an explicit environment (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: std::collections::HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let defaults = config::Config::try_from(&BulwarkConfig::default())?;
        let mut builder = config::Config::builder().add_source(defaults);
        match file {
            Some(path) if !path.exists() => return Err(ConfigError::Missing(path.to_owned())),
            Some(path) => builder = builder.add_source(config::File::from(path).required(true)),
            None => {
                let local = Path::new("bulwark.toml");
                if local.exists() {
                    builder = builder.add_source(config::File::from(local).required(true));
                }
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("BULWARK")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("governance.voters.names")
                .with_list_parse_key("governance.bound_identities")
                .with_list_parse_key("watchdog.required_services")
                .source(Some(env)),
        );
        let cfg: BulwarkConfig = builder.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Inconsistent(msg));
        check_durations(self).map_err(ConfigError::Inconsistent)?;
        self.scheduler
            .validate()
            .map_err(ConfigError::Inconsistent)?;
        self.worker.validate().map_err(ConfigError::Inconsistent)?;
        self.nats
            .storage
            .validate()
            .map_err(ConfigError::Inconsistent)?;
        if self.mesh.max_event_bytes > i32::MAX as usize {
            return bad("mesh.max_event_bytes must fit a stream's max_msg_size (i32)".into());
        }
        let g = &self.governance;
        if g.default_tier > 4 {
            return bad(format!(
                "governance.default_tier must be 0-4, got {}",
                g.default_tier
            ));
        }
        for (name, t) in &g.intent_types {
            if t.tier > 4 {
                return bad(format!(
                    "governance.intent_types.{name}.tier must be 0-4, got {}",
                    t.tier
                ));
            }
            if !(0.0..=1.0).contains(&t.base_alignment) {
                return bad(format!(
                    "governance.intent_types.{name}.base_alignment must be 0-1"
                ));
            }
        }
        if !(0.0..=1.0).contains(&g.min_alignment) {
            return bad(format!(
                "governance.min_alignment must be 0-1, got {}",
                g.min_alignment
            ));
        }
        if g.voters.quorum == 0 || g.voters.quorum > g.voters.names.len() {
            return bad(format!(
                "governance.voters.quorum must be between 1 and the number of voters ({}), got {}",
                g.voters.names.len(),
                g.voters.quorum
            ));
        }
        for name in &g.bound_identities {
            let token_ok = !name.is_empty()
                && !name
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>'));
            if name != "*" && !token_ok {
                return bad(format!(
                    "governance.bound_identities: {name:?} is not a NATS subject token (no dots, spaces or wildcards; \"*\" alone binds every name)"
                ));
            }
        }
        g.reconcile.validate().map_err(ConfigError::Inconsistent)?;
        if g.default_priority > 9 {
            return bad(format!(
                "governance.default_priority must be 0-9, got {}",
                g.default_priority
            ));
        }
        if self.nats.request_timeout_ms == 0 || self.nats.connect_timeout_ms == 0 {
            return bad("nats timeouts must be positive".into());
        }
        if self.nats.tls_cert.is_empty() != self.nats.tls_key.is_empty() {
            return bad("nats.tls_cert and nats.tls_key go together: give both or neither".into());
        }
        self.clarity.validate().map_err(ConfigError::Inconsistent)?;
        self.mesh.validate().map_err(ConfigError::Inconsistent)?;
        self.watchdog
            .validate()
            .map_err(ConfigError::Inconsistent)?;
        self.replicas
            .validate()
            .map_err(ConfigError::Inconsistent)?;
        self.playbooks
            .validate()
            .map_err(ConfigError::Inconsistent)?;
        crate::action::validate_all(&self.actions).map_err(ConfigError::Inconsistent)?;
        crate::schedule::validate_all(&self.schedules).map_err(ConfigError::Inconsistent)?;
        self.console.validate().map_err(ConfigError::Inconsistent)?;
        self.notify.validate().map_err(ConfigError::Inconsistent)?;
        if self.up.replicas == 0 {
            return bad("up.replicas must be at least 1".into());
        }
        if self.nats.replicas > 5 {
            return bad(format!(
                "nats.replicas must be 0 (automatic) or 1-5, got {}",
                self.nats.replicas
            ));
        }
        Ok(())
    }
}

/// The longest duration any `*_s` key may hold: ten years, in seconds.
const MAX_DURATION_S: f64 = 10.0 * 365.0 * 86_400.0;

/// Every key that holds seconds (its name ends in `_s`), wherever it is in the configuration,
/// is a finite number from 0 to ten years: NaN, infinities, negative and absurd values are
/// refused with the key's name, before any `Duration::from_secs_f64` could panic on them.
fn check_durations(cfg: &BulwarkConfig) -> Result<(), String> {
    fn walk(path: &str, value: &serde_json::Value) -> Result<(), String> {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    let key_path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    if key.ends_with("_s") {
                        // serde_json writes NaN and the infinities as null.
                        match v.as_f64() {
                            Some(x) if (0.0..=MAX_DURATION_S).contains(&x) => {}
                            Some(x) => {
                                return Err(format!(
                                    "{key_path} must be a number of seconds from 0 to {MAX_DURATION_S} (ten years), got {x}"
                                ));
                            }
                            None if v.is_null() => {
                                return Err(format!(
                                    "{key_path} must be a finite number of seconds, got NaN or an infinity"
                                ));
                            }
                            None => {}
                        }
                    }
                    walk(&key_path, v)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    let value = serde_json::to_value(cfg).map_err(|e| format!("configuration: {e}"))?;
    walk("", &value)
}

/// How to reach NATS. Its `Debug` output hides the passwords, the tokens and any credentials in
/// the URL, so a logged or printed configuration leaks no secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or a comma-separated list of cluster seed URLs. The `--nats-url` flag and the
    /// `BULWARK_NATS_URL` variable override it.
    pub url: String,
    /// User the services connect as (see `nats.conf`). Empty for no credentials.
    pub user: String,
    /// Password of `user`.
    pub password: String,
    /// User the operator CLI (`bulwark intent|review|vote|status`) connects as.
    pub cli_user: String,
    /// Password of `cli_user`.
    pub cli_password: String,
    /// Token the services connect with instead of `user` and `password` (nats.conf
    /// `authorization { token: ... }`); empty for none.
    pub token: String,
    /// Token the CLI connects with instead of `cli_user` and `cli_password`; empty for none.
    pub cli_token: String,
    /// User the services answer requests as (a second connection per service, in the `BULWARK`
    /// account of `nats.conf`, that may publish only to inboxes): an answer cannot be aimed at
    /// stored state, and stored state is written on the service's own connection. Empty: answer
    /// on the service's connection (a server without users).
    pub api_user: String,
    /// Password of `api_user`.
    pub api_password: String,
    /// User bulwark's own HTM workers connect as (the `WORKERS` account of `nats.conf`): a
    /// worker identity, never the services' user.
    pub worker_user: String,
    /// Password of `worker_user`.
    pub worker_password: String,
    /// Token the workers connect with instead of `worker_user` and `worker_password`.
    pub worker_token: String,
    /// PEM file of the CA that signed the server's TLS certificate (else the system's roots).
    /// Setting it requires TLS (docs/security.md).
    pub tls_ca: String,
    /// PEM client certificate presented to a server that verifies clients (mutual TLS); needs
    /// `tls_key`.
    pub tls_cert: String,
    /// PEM private key of `tls_cert`.
    pub tls_key: String,
    /// Refuse a server that does not speak TLS, also when `tls_ca` is empty. A `tls://` URL
    /// requires TLS too.
    pub tls_required: bool,
    /// Time allowed for the first connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Time allowed for any request/reply and JetStream acknowledgement, in milliseconds.
    pub request_timeout_ms: u64,
    /// Replicas of bulwark's streams and KV buckets. 0 chooses: 1 on a single server, 3 (or
    /// the cluster's size when smaller) on a cluster. Applies to streams and buckets bulwark
    /// creates; existing streams are scaled to it.
    pub replicas: usize,
    /// What a JetStream acknowledgement promises: `fast` (the server's periodic fsync, every 2
    /// minutes by default: a power loss may lose the last minutes) or `synced` (`bulwark up`
    /// starts its server with `sync_interval: always`, or the streams have 3 replicas). The
    /// intake reply and `bulwark status` say which is in force.
    pub durability: Durability,
    /// Limits of every stream and bucket (docs/architecture.md, "Storage limits").
    pub storage: StorageConfig,
}

/// `nats.durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Acknowledged when in the server's memory and its page cache; fsync every 2 minutes.
    #[default]
    Fast,
    /// Acknowledged only once on disk (`sync_interval: always`) or on 3 replicas.
    Synced,
}

impl Durability {
    /// The name used in the configuration and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fast => "fast",
            Durability::Synced => "synced",
        }
    }
}

/// Limits of bulwark's streams and KV buckets (`[nats.storage]`). Sizes are bytes. Every stream
/// also refuses a message over its `max_msg_size` at the server; `BULWARK_MESH`'s is
/// `mesh.max_event_bytes`. The sum of the `*_max_bytes` (times the replicas) is reserved from
/// the account's JetStream limit of `nats.conf` and must fit in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `BULWARK_MESH` (agent-writable through ingress): discard old.
    pub mesh_max_bytes: i64,
    /// `BULWARK_NARRATIVES`: discard old (the audit keeps the durable copy).
    pub narratives_max_bytes: i64,
    /// `BULWARK_AUDIT`: discard new (never drops a record silently; clarity retries).
    pub audit_max_bytes: i64,
    /// `BULWARK_TASKS`: discard new, turned into a 503 naming the limit at intake.
    pub tasks_max_bytes: i64,
    /// `BULWARK_TASKS`: most queued tasks; discard new.
    pub tasks_max_msgs: i64,
    /// `BULWARK_TASKS_PARKED`: discard new.
    pub parked_max_bytes: i64,
    /// `BULWARK_TASKS_DEAD`: discard old.
    pub dead_max_bytes: i64,
    /// `bulwark_intents` bucket: discard new (intake answers 503).
    pub intents_max_bytes: i64,
    /// Every other bucket (reviews, proposals, leases, breaker, ...): discard new.
    pub bucket_max_bytes: i64,
    /// Largest record (task, narrative, audit record, KV value) any stream but the mesh stores.
    pub max_record_bytes: i32,
    /// Seconds a finished intent record (completed, failed, rejected) is kept after it finished;
    /// 0 keeps them for ever.
    pub finished_intent_retention_s: f64,
    /// Seconds between two sweeps of finished intent records.
    pub sweep_interval_s: f64,
}

const MIB: i64 = 1024 * 1024;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            mesh_max_bytes: 2048 * MIB,
            narratives_max_bytes: 1024 * MIB,
            audit_max_bytes: 3072 * MIB,
            tasks_max_bytes: 512 * MIB,
            tasks_max_msgs: 100_000,
            parked_max_bytes: 256 * MIB,
            dead_max_bytes: 256 * MIB,
            intents_max_bytes: 1024 * MIB,
            bucket_max_bytes: 64 * MIB,
            max_record_bytes: 512 * 1024,
            finished_intent_retention_s: 7.0 * 86_400.0,
            sweep_interval_s: 60.0,
        }
    }
}

impl StorageConfig {
    fn validate(&self) -> Result<(), String> {
        let sizes = [
            ("mesh_max_bytes", self.mesh_max_bytes),
            ("narratives_max_bytes", self.narratives_max_bytes),
            ("audit_max_bytes", self.audit_max_bytes),
            ("tasks_max_bytes", self.tasks_max_bytes),
            ("tasks_max_msgs", self.tasks_max_msgs),
            ("parked_max_bytes", self.parked_max_bytes),
            ("dead_max_bytes", self.dead_max_bytes),
            ("intents_max_bytes", self.intents_max_bytes),
            ("bucket_max_bytes", self.bucket_max_bytes),
            ("max_record_bytes", i64::from(self.max_record_bytes)),
        ];
        for (name, value) in sizes {
            if value <= 0 {
                return Err(format!(
                    "nats.storage.{name} must be positive (got {value})"
                ));
            }
        }
        if !(self.finished_intent_retention_s >= 0.0
            && self.finished_intent_retention_s.is_finite())
        {
            return Err("nats.storage.finished_intent_retention_s must be >= 0".into());
        }
        if !(self.sweep_interval_s > 0.0 && self.sweep_interval_s.is_finite()) {
            return Err("nats.storage.sweep_interval_s must be > 0".into());
        }
        Ok(())
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: "bulwark".into(),
            password: "bulwark-dev".into(),
            cli_user: "operator".into(),
            cli_password: "operator-dev".into(),
            token: String::new(),
            cli_token: String::new(),
            api_user: "bulwark_api".into(),
            api_password: "bulwark_api-dev".into(),
            worker_user: "worker".into(),
            worker_password: "worker-dev".into(),
            worker_token: String::new(),
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_required: false,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 5_000,
            replicas: 0,
            durability: Durability::Fast,
            storage: StorageConfig::default(),
        }
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured, so that a new field cannot be added without deciding how it prints.
        let NatsConfig {
            url,
            user,
            password,
            cli_user,
            cli_password,
            token,
            cli_token,
            api_user,
            api_password,
            worker_user,
            worker_password,
            worker_token,
            tls_ca,
            tls_cert,
            tls_key,
            tls_required,
            connect_timeout_ms,
            request_timeout_ms,
            replicas,
            durability,
            storage,
        } = self;
        let hidden = |secret: &String| if secret.is_empty() { "" } else { REDACTED };
        f.debug_struct("NatsConfig")
            .field("url", &crate::connect::redact_url(url))
            .field("user", user)
            .field("password", &hidden(password))
            .field("cli_user", cli_user)
            .field("cli_password", &hidden(cli_password))
            .field("token", &hidden(token))
            .field("cli_token", &hidden(cli_token))
            .field("api_user", api_user)
            .field("api_password", &hidden(api_password))
            .field("worker_user", worker_user)
            .field("worker_password", &hidden(worker_password))
            .field("worker_token", &hidden(worker_token))
            .field("tls_ca", tls_ca)
            .field("tls_cert", tls_cert)
            .field("tls_key", tls_key)
            .field("tls_required", tls_required)
            .field("connect_timeout_ms", connect_timeout_ms)
            .field("request_timeout_ms", request_timeout_ms)
            .field("replicas", replicas)
            .field("durability", durability)
            .field("storage", storage)
            .finish()
    }
}

/// What a hidden secret prints as.
pub const REDACTED: &str = "<redacted>";

/// How `bulwark up` runs the local stack.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpConfig {
    /// The nats-server config used when `bulwark up` must start its own server.
    pub nats_conf: PathBuf,
    /// The nats-server binary; empty means `nats-server` on PATH, then `.tools/pip/bin/nats-server`.
    pub nats_server: String,
    /// How long to wait for the started nats-server to accept connections, in milliseconds.
    pub server_start_timeout_ms: u64,
    /// Replicas of each service `bulwark up` runs (at least 1), each under the supervisor.
    pub replicas: usize,
}

impl Default for UpConfig {
    fn default() -> Self {
        Self {
            nats_conf: PathBuf::from("nats.conf"),
            nats_server: String::new(),
            server_start_timeout_ms: 10_000,
            replicas: 1,
        }
    }
}

/// Periodic telemetry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Seconds between two `telemetry.<component>` messages (seed: 15).
    pub interval_s: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { interval_s: 15.0 }
    }
}

/// Intent governance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GovernanceConfig {
    /// Tier of an intent type missing from `intent_types` (0: a human must approve it).
    pub default_tier: u8,
    /// Base alignment of an intent type missing from `intent_types`.
    pub default_base_alignment: f64,
    /// Tier 1 and 2 intents whose mission alignment is below this go to human review instead.
    pub min_alignment: f64,
    /// Charter weight used when an intent's `mission_context` names no pillar.
    pub unstated_pillar_weight: f64,
    /// Priority of an intent that gives none (0-9, 9 most urgent).
    pub default_priority: u8,
    /// Largest accepted request body, in bytes.
    pub max_intent_bytes: usize,
    /// The charter: weight of each mission pillar.
    pub charter: Charter,
    /// The unified logic voters of tier 3 intents.
    pub voters: VotersConfig,
    /// Tier and base alignment per intent type.
    pub intent_types: BTreeMap<String, IntentTypeConfig>,
    /// Reviewer, voter and actor names bound to their NATS identity: a review decision, vote or
    /// intent naming one of them is accepted only on that name's own subject
    /// (`governance.review.decide.<name>`, `unified_logic.vote.<name>`,
    /// `htm.intent.submit.<name>`, which `nats.conf` lets only user `<name>` publish) and refused
    /// with 403 `identity_required` on the plain subject. `"*"` binds every name. On a
    /// per-identity subject the name always is the sender (docs/security.md).
    pub bound_identities: Vec<String>,
    /// Open review items and open proposals one actor may have at once; a submission that would
    /// open one more is refused with 429 `too_many_open` (0: no cap).
    pub max_open_per_actor: usize,
    /// NATS users (of other accounts) that may declare emergencies (tier 4 types and
    /// `mission_context.emergency`) and use priorities above `max_unprivileged_priority`.
    /// bulwark's own services always may. Anyone else's emergency goes to human review, and a
    /// higher priority is refused with 403 `privilege_required`.
    pub privileged_identities: Vec<String>,
    /// The highest priority an unprivileged identity may ask for (0-9).
    pub max_unprivileged_priority: u8,
    /// The longest simulated work (`payload.work_ms`) an intent may ask for, in milliseconds; a
    /// longer one is refused with 400 `invalid_intent` (it would hold a worker slot that long).
    pub max_work_ms: u64,
    /// The furthest in the future an intent's `not_before` may be, in seconds; a later one is
    /// refused with 400 `invalid_intent`, as is one more than 30 s in the past.
    pub max_delay_s: f64,
    /// The reconciler of stranded intents: records whose task, review item or proposal was
    /// never written (governance died between the two writes).
    pub reconcile: ReconcileConfig,
}

/// `[governance.reconcile]`: when the reconciler checks an intent record left waiting, and when
/// it gives one up as stranded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Seconds between two passes over the records written since the last one.
    pub interval_s: f64,
    /// Seconds after a waiting record's write before it is checked: the intake that wrote it
    /// finishes first.
    pub grace_s: f64,
    /// Seconds after its write within which a record's promise is kept or the intent is failed
    /// as stranded. At most 110: a task is re-queued under its intent id within the task queue's
    /// 120 s duplicate window, so it is never queued twice.
    pub window_s: f64,
    /// Waiting records tracked at once; beyond it the oldest are dropped (counted).
    pub max_tracked: usize,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            interval_s: 2.0,
            grace_s: 10.0,
            window_s: 100.0,
            max_tracked: 100_000,
        }
    }
}

impl ReconcileConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f64, min: f64| {
            if v.is_finite() && v >= min {
                Ok(())
            } else {
                Err(format!(
                    "governance.reconcile.{name} must be a number >= {min}, got {v}"
                ))
            }
        };
        finite("interval_s", self.interval_s, 0.05)?;
        finite("grace_s", self.grace_s, 0.0)?;
        finite("window_s", self.window_s, 0.0)?;
        if self.window_s > 110.0 {
            return Err(format!(
                "governance.reconcile.window_s must be at most 110 (the task queue's 120 s duplicate window keeps a re-queued task single), got {}",
                self.window_s
            ));
        }
        if self.window_s < self.grace_s + self.interval_s {
            return Err(format!(
                "governance.reconcile.window_s ({}) must be at least grace_s + interval_s ({})",
                self.window_s,
                self.grace_s + self.interval_s
            ));
        }
        if self.max_tracked == 0 {
            return Err("governance.reconcile.max_tracked must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        let types: [(&str, u8, f64); 14] = [
            ("query_knowledge", 2, 0.6),
            ("generate_summary", 2, 0.6),
            ("schedule_task", 2, 0.7),
            ("execute_sandbox", 1, 0.5),
            ("deploy_model", 1, 0.8),
            ("modify_config", 1, 0.4),
            ("self_improve", 3, 0.9),
            ("extend_grace", 3, 0.7),
            ("optimize_system", 3, 0.8),
            ("modify_governance", 0, 0.5),
            ("change_charter", 0, 0.5),
            ("grant_permissions", 0, 0.3),
            ("emergency_recovery", 4, 1.0),
            ("critical_incident", 4, 1.0),
        ];
        Self {
            default_tier: 0,
            default_base_alignment: 0.5,
            min_alignment: 0.25,
            unstated_pillar_weight: 0.5,
            default_priority: 5,
            max_intent_bytes: 64 * 1024,
            charter: Charter::default(),
            voters: VotersConfig::default(),
            intent_types: types
                .into_iter()
                .map(|(name, tier, base)| {
                    (
                        name.to_owned(),
                        IntentTypeConfig {
                            tier,
                            base_alignment: base,
                            max_work_ms: None,
                        },
                    )
                })
                .collect(),
            bound_identities: vec!["architect".into(), "guardian".into(), "steward".into()],
            max_open_per_actor: 20,
            privileged_identities: vec!["operator".to_owned()],
            max_unprivileged_priority: 5,
            max_work_ms: 60_000,
            max_delay_s: 30.0 * 86_400.0,
            reconcile: ReconcileConfig::default(),
        }
    }
}

/// Tier and base alignment of one intent type.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IntentTypeConfig {
    /// Autonomy tier, 0-4.
    pub tier: u8,
    /// How well this type of work serves the mission on its own, 0-1.
    pub base_alignment: f64,
    /// The longest simulated work (`payload.work_ms`) an intent of this type may ask for, in
    /// milliseconds; `governance.max_work_ms` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_work_ms: Option<u64>,
}

/// The charter's pillar weights (seed: resilience 1.0, revenue 0.8, autonomy 0.7, learning 0.6).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Charter {
    /// Weight of `resilience_impact`.
    pub resilience: f64,
    /// Weight of `revenue_impact`.
    pub revenue: f64,
    /// Weight of `autonomy_impact`.
    pub autonomy: f64,
    /// Weight of `learning_impact`.
    pub learning: f64,
}

impl Default for Charter {
    fn default() -> Self {
        Self {
            resilience: 1.0,
            revenue: 0.8,
            autonomy: 0.7,
            learning: 0.6,
        }
    }
}

/// Who votes on tier 3 intents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VotersConfig {
    /// Names of the voters.
    pub names: Vec<String>,
    /// Approvals (or rejections) needed to decide.
    pub quorum: usize,
    /// Seconds a proposal waits for its quorum before it escalates to human review.
    pub vote_timeout_s: f64,
    /// Seconds between two sweeps for proposals past their deadline.
    pub sweep_interval_s: f64,
}

impl Default for VotersConfig {
    fn default() -> Self {
        Self {
            names: vec!["architect".into(), "guardian".into(), "steward".into()],
            quorum: 2,
            vote_timeout_s: 300.0,
            sweep_interval_s: 1.0,
        }
    }
}

/// Clarity: the hash-chained audit of narratives (`BULWARK_AUDIT`), its retention and queries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClarityConfig {
    /// Days an audit record is kept; 0 keeps records forever. With a limit, verification starts
    /// at the oldest record still stored, provided its predecessor is old enough to have expired
    /// (a signed record names when its predecessor was stored); a younger gap is a truncation.
    pub max_age_days: u64,
    /// File holding clarity's signing key (HMAC-SHA256, hex), outside JetStream; created with
    /// mode 0600 on the first start when missing. Every clarity replica needs the same key.
    pub key_file: String,
    /// Keys clarity signed with before a rotation, kept so the records they signed still verify.
    pub retired_key_files: Vec<String>,
    /// `clarity.query` requests handled at once per instance (verify has its own permits).
    pub query_concurrency: usize,
    /// `clarity.verify` requests handled at once per instance.
    pub verify_concurrency: usize,
    /// Narratives fetched from `BULWARK_NARRATIVES` per pull request.
    pub fetch_batch: usize,
    /// Seconds a fetched narrative may stay unacknowledged before JetStream redelivers it (a
    /// clarity instance that crashed mid-append is retried by another after this long).
    pub ack_wait_s: f64,
    /// Seconds within which a narrative appended twice (after a crash, or by two instances) is
    /// recognised by its id and stored once. Must exceed `ack_wait_s`.
    pub duplicate_window_s: f64,
    /// Items a `clarity.query` returns when the request gives no `limit`.
    pub query_default_limit: usize,
    /// Largest `limit` a `clarity.query` accepts.
    pub query_max_limit: usize,
    /// Newest audit records a `clarity.query` scans at most; older narratives are not found.
    pub query_max_scan: u64,
}

impl Default for ClarityConfig {
    fn default() -> Self {
        Self {
            max_age_days: 0,
            key_file: "data/clarity.key".into(),
            retired_key_files: Vec::new(),
            query_concurrency: 16,
            verify_concurrency: 2,
            fetch_batch: 64,
            ack_wait_s: 30.0,
            duplicate_window_s: 120.0,
            query_default_limit: 100,
            query_max_limit: 1_000,
            query_max_scan: 10_000,
        }
    }
}

impl ClarityConfig {
    /// Checks ranges and consistency; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.fetch_batch == 0 {
            return Err("clarity.fetch_batch must be at least 1".into());
        }
        if self.ack_wait_s <= 0.0 {
            return Err(format!(
                "clarity.ack_wait_s must be positive, got {}",
                self.ack_wait_s
            ));
        }
        if self.duplicate_window_s <= self.ack_wait_s {
            return Err(format!(
                "clarity.duplicate_window_s ({}) must exceed clarity.ack_wait_s ({})",
                self.duplicate_window_s, self.ack_wait_s
            ));
        }
        if self.max_age_days > 0 && self.duplicate_window_s > self.max_age_days as f64 * 86_400.0 {
            return Err("clarity.duplicate_window_s must not exceed clarity.max_age_days".into());
        }
        if self.query_default_limit == 0 || self.query_default_limit > self.query_max_limit {
            return Err(format!(
                "clarity.query_default_limit must be between 1 and clarity.query_max_limit ({}), got {}",
                self.query_max_limit, self.query_default_limit
            ));
        }
        if self.query_max_scan == 0 {
            return Err("clarity.query_max_scan must be at least 1".into());
        }
        if self.key_file.trim().is_empty() {
            return Err("clarity.key_file must name a file".into());
        }
        if self.query_concurrency == 0 || self.verify_concurrency == 0 {
            return Err(
                "clarity.query_concurrency and clarity.verify_concurrency must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The scheduler (seed figures in the comments).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// HTM is ready with at least this many healthy workers (seed: 3).
    pub min_workers: usize,
    /// A worker silent this long is declared dead and its tasks reassigned (seed: 30 s).
    pub heartbeat_timeout_s: f64,
    /// Attempts of a task before it fails for good and goes to the dead-letter stream.
    pub max_attempts: u32,
    /// How long a dispatched task may stay unacknowledged in the queue before JetStream
    /// redelivers it (the scheduler then re-checks it; it never runs twice). The leader keeps
    /// the tasks its workers confirmed from redelivery with progress acknowledgements, so this
    /// is how soon an unconfirmed assignment is sent again and how soon a scheduler taking
    /// over sees the tasks its predecessor left.
    pub ack_wait_s: f64,
    /// Time a worker has to confirm an assignment. A refusal or an absent worker moves the task
    /// on; no answer in time keeps it with the worker (it may have taken it) until the queue
    /// redelivers it after `ack_wait_s` and the assignment is sent again.
    pub dispatch_timeout_ms: u64,
    /// Tasks dispatched and not yet reported, at most, per priority (JetStream
    /// `max_ack_pending` of each of the ten priority consumers).
    pub max_in_flight: usize,
    /// Scheduler queue depth that raises a warning (seed: 500).
    pub queue_warn: u64,
    /// Scheduler queue depth that raises a critical incident naming
    /// `scheduler_load_shedding` (seed: 2000).
    pub queue_critical: u64,
    /// HTM queue depth warning (seed: 1000).
    pub htm_queue_warn: u64,
    /// HTM queue depth critical (seed: 5000).
    pub htm_queue_critical: u64,
    /// Queued-to-completed latency above this is an SLA breach (seed: 1000 ms).
    pub sla_ms: u64,
    /// Shedding takes only tasks below this priority (seed: 5); at most 5.
    pub shed_below_priority: u8,
    /// Shedding takes only tasks older than this (seed: 10 min).
    pub shed_older_than_s: f64,
    /// Shedding takes at most this many tasks per run (seed: 100).
    pub shed_max: usize,
    /// Seconds between two watchdog sweeps (dead workers, queue guards).
    pub check_interval_s: f64,
    /// The most tasks the scheduler hands one worker at once, whatever capacity its heartbeat
    /// claims: a larger claim is clamped to this, counted and narrated (at least 1).
    pub max_worker_capacity: u32,
    /// The share (0-1] of the pool's slots the tasks of one submitting NATS identity may hold at
    /// once (at least one slot); its further tasks wait in the queue while other identities'
    /// run. bulwark's own services are not capped. 1 turns the cap off.
    pub max_share_per_identity: f64,
    /// The most worker ids one NATS user may bind by heartbeating (a binding outlives its
    /// worker); a heartbeat for one more is refused, counted and narrated (at least 1).
    pub max_worker_ids_per_user: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            min_workers: 3,
            heartbeat_timeout_s: 30.0,
            max_attempts: 3,
            ack_wait_s: 20.0,
            dispatch_timeout_ms: 2_000,
            max_in_flight: 10_000,
            queue_warn: 500,
            queue_critical: 2_000,
            htm_queue_warn: 1_000,
            htm_queue_critical: 5_000,
            sla_ms: 1_000,
            shed_below_priority: 5,
            shed_older_than_s: 600.0,
            shed_max: 100,
            check_interval_s: 1.0,
            max_worker_capacity: 16,
            max_share_per_identity: 0.5,
            max_worker_ids_per_user: 256,
        }
    }
}

impl SchedulerConfig {
    fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("scheduler.max_attempts must be at least 1".into());
        }
        if self.shed_below_priority > 5 {
            return Err(format!(
                "scheduler.shed_below_priority must be 0-5 (high-priority tasks are never shed), got {}",
                self.shed_below_priority
            ));
        }
        if self.queue_warn > self.queue_critical || self.htm_queue_warn > self.htm_queue_critical {
            return Err("scheduler queue warn thresholds must not exceed the critical ones".into());
        }
        for (name, v) in [
            ("heartbeat_timeout_s", self.heartbeat_timeout_s),
            ("ack_wait_s", self.ack_wait_s),
            ("check_interval_s", self.check_interval_s),
        ] {
            if v.is_nan() || v <= 0.0 {
                return Err(format!("scheduler.{name} must be positive, got {v}"));
            }
        }
        if self.max_in_flight == 0 || self.dispatch_timeout_ms == 0 {
            return Err("scheduler.max_in_flight and dispatch_timeout_ms must be positive".into());
        }
        if !(self.max_share_per_identity > 0.0 && self.max_share_per_identity <= 1.0) {
            return Err(format!(
                "scheduler.max_share_per_identity must be in (0, 1], got {}",
                self.max_share_per_identity
            ));
        }
        if self.max_worker_ids_per_user == 0 {
            return Err("scheduler.max_worker_ids_per_user must be at least 1".into());
        }
        if self.max_worker_capacity == 0 {
            return Err("scheduler.max_worker_capacity must be at least 1".into());
        }
        Ok(())
    }
}

/// HTM workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Workers `bulwark up` starts (`--workers` overrides).
    pub count: usize,
    /// Tasks one worker runs at once.
    pub capacity: u32,
    /// Seconds between two heartbeats (must be well below `scheduler.heartbeat_timeout_s`).
    pub heartbeat_interval_s: f64,
    /// Longest simulated work a task may ask for with `payload.work_ms`.
    pub max_work_ms: u64,
    /// How long a worker keeps retrying a report the scheduler does not answer.
    pub report_retry_s: f64,
    /// Seconds the pool waits before respawning a worker that ended.
    pub respawn_delay_s: f64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            count: 3,
            capacity: 8,
            heartbeat_interval_s: 10.0,
            max_work_ms: 600_000,
            report_retry_s: 120.0,
            respawn_delay_s: 1.0,
        }
    }
}

impl WorkerConfig {
    fn validate(&self) -> Result<(), String> {
        if self.capacity == 0 {
            return Err("worker.capacity must be at least 1".into());
        }
        if self.heartbeat_interval_s.is_nan()
            || self.heartbeat_interval_s <= 0.0
            || self.report_retry_s.is_nan()
            || self.report_retry_s <= 0.0
        {
            return Err("worker.heartbeat_interval_s and report_retry_s must be positive".into());
        }
        if self.respawn_delay_s.is_nan() || self.respawn_delay_s < 0.0 {
            return Err("worker.respawn_delay_s must be 0 or more".into());
        }
        Ok(())
    }
}

/// The trigger mesh (stream `BULWARK_MESH`): envelope limits, the storm guard, the circuit
/// breaker, the event policy engine's cascade limits and its rule files, and the mesh consumer
/// every service builds on. Seed figures in the comments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Largest mesh event accepted, in bytes; a bigger one is dead-lettered.
    pub max_event_bytes: usize,
    /// Days a mesh event is kept in `BULWARK_MESH`; 0 keeps events forever.
    pub max_age_days: u64,
    /// A type whose rate over `storm_window_s` exceeds this many events per second is a storm
    /// (seed: 100). Mesh consumers also pace each type to this rate (GCRA), deferring the excess.
    pub storm_threshold: u64,
    /// Length of the sliding window a type's rate is measured over, in seconds (seed: 1).
    pub storm_window_s: f64,
    /// The breaker opens when all types together exceed this many events in `breaker_window_s`
    /// (seed: 500).
    pub breaker_threshold: u64,
    /// The breaker's sliding window, in seconds (seed: 10).
    pub breaker_window_s: f64,
    /// Seconds an open breaker waits before it lets a probe through (half-open) (seed: 60).
    pub cooldown_s: f64,
    /// Seconds the breaker stays half-open: it closes after this long if the rate stayed normal,
    /// and reopens at once when the rate crosses the threshold again.
    pub half_open_s: f64,
    /// Held events each mesh consumer may process while the breaker is half-open (the bounded
    /// probe); the rest waits for the breaker to close.
    pub half_open_probe: u64,
    /// Events one publishing identity of another account (an agent, an operator) may publish in
    /// `identity_window_s` before it is limited: its further events are held for it alone
    /// (stored, delivered in order once the limit lifts) and not counted towards the breaker
    /// (seed-like: 200; 0 turns budgets off). Must stay below `breaker_threshold`, so that one
    /// identity is limited before it alone could open the breaker.
    pub identity_budget: u64,
    /// The sliding window of `identity_budget`, in seconds (seed-like: 10).
    pub identity_window_s: f64,
    /// Seconds an identity stays limited before the limit is reconsidered: lifted when the
    /// identity is back within its budget, extended by another cooldown otherwise (seed-like: 30).
    pub identity_cooldown_s: f64,
    /// Seconds between two checks of the stored breaker entry by the storm guard's leader: an
    /// unreadable or missing entry is overwritten with the leader's state at the next check (it
    /// is also repaired as soon as the leader's watch sees it).
    pub breaker_check_s: f64,
    /// No event deeper than this is ever produced by a rule (seed: 10).
    pub cascade_depth_limit: u64,
    /// Events (and intents) rules may produce per `correlation_id` (seed: 1000).
    pub fanout_limit: u64,
    /// Directory of the event policy engine's rule files (`*.toml`), relative to the working
    /// directory. A missing directory means no rules; a file with errors stops the engine.
    pub policies_dir: std::path::PathBuf,
    /// Events fetched from `BULWARK_MESH` per pull request by a mesh consumer.
    pub fetch_batch: usize,
    /// Seconds a fetched event may stay unacknowledged before JetStream redelivers it.
    pub ack_wait_s: f64,
    /// Events a mesh consumer may hold unacknowledged (fetched, deferred by the rate limit or
    /// in processing) before JetStream stops delivering more.
    pub max_ack_pending: i64,
    /// Seconds within which an event published twice with the same id (a redelivered parent's
    /// children, a dead letter written by two consumers) is stored once.
    pub duplicate_window_s: f64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: 64 * 1024,
            max_age_days: 7,
            storm_threshold: 100,
            storm_window_s: 1.0,
            breaker_threshold: 500,
            breaker_window_s: 10.0,
            cooldown_s: 60.0,
            half_open_s: 10.0,
            half_open_probe: 50,
            identity_budget: 200,
            identity_window_s: 10.0,
            identity_cooldown_s: 30.0,
            breaker_check_s: 5.0,
            cascade_depth_limit: 10,
            fanout_limit: 1_000,
            policies_dir: std::path::PathBuf::from("policies"),
            fetch_batch: 256,
            ack_wait_s: 30.0,
            max_ack_pending: 10_000,
            duplicate_window_s: 120.0,
        }
    }
}

impl MeshConfig {
    /// Checks ranges and consistency; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("storm_window_s", self.storm_window_s),
            ("breaker_window_s", self.breaker_window_s),
            ("cooldown_s", self.cooldown_s),
            ("half_open_s", self.half_open_s),
            ("breaker_check_s", self.breaker_check_s),
            ("identity_window_s", self.identity_window_s),
            ("identity_cooldown_s", self.identity_cooldown_s),
            ("ack_wait_s", self.ack_wait_s),
            ("duplicate_window_s", self.duplicate_window_s),
        ];
        for (key, value) in positive {
            if !(value > 0.0 && value.is_finite()) {
                return Err(format!("mesh.{key} must be a positive number, got {value}"));
            }
        }
        let at_least_one = [
            ("max_event_bytes", self.max_event_bytes as u64),
            ("storm_threshold", self.storm_threshold),
            ("breaker_threshold", self.breaker_threshold),
            ("cascade_depth_limit", self.cascade_depth_limit),
            ("fanout_limit", self.fanout_limit),
            ("fetch_batch", self.fetch_batch as u64),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(format!("mesh.{key} must be at least 1"));
            }
        }
        if self.identity_budget >= self.breaker_threshold {
            return Err(format!(
                "mesh.identity_budget ({}) must be below mesh.breaker_threshold ({}), so that one identity is limited before it alone can open the breaker (0 turns budgets off)",
                self.identity_budget, self.breaker_threshold
            ));
        }
        if self.cascade_depth_limit > crate::envelope::MAX_DEPTH {
            return Err(format!(
                "mesh.cascade_depth_limit must be at most {}, got {}",
                crate::envelope::MAX_DEPTH,
                self.cascade_depth_limit
            ));
        }
        if self.max_ack_pending < 1 {
            return Err("mesh.max_ack_pending must be at least 1".into());
        }
        if self.duplicate_window_s <= self.ack_wait_s {
            return Err(format!(
                "mesh.duplicate_window_s ({}) must exceed mesh.ack_wait_s ({})",
                self.duplicate_window_s, self.ack_wait_s
            ));
        }
        Ok(())
    }
}

/// The Layer 2 watchdog (seed: a sweep every 15 s). The HTM queue thresholds it alerts on are
/// the scheduler's `htm_queue_warn` / `htm_queue_critical` (one figure, one place).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// Seconds between two sweeps: pings, readiness, conditions, alerts (seed: 15).
    pub check_interval_s: f64,
    /// A component whose `telemetry.<component>` is older than this many telemetry intervals
    /// (`telemetry.interval_s`) is presumed dead: its heartbeat is missing (seed: 3).
    pub heartbeat_timeout_multiple: f64,
    /// Seconds before an alert whose condition still holds is sent again (never more often).
    pub realert_interval_s: f64,
    /// Milliseconds a sweep waits for `$SRV.PING` answers and the `htm.readiness` reply; must be
    /// shorter than `check_interval_s`.
    pub ping_timeout_ms: u64,
    /// Tasks per second the scheduler must at least dispatch while tasks wait (seed: 1).
    pub min_dispatch_rate: f64,
    /// Services that must answer `$SRV.PING` (alerted when they do not, even if never seen).
    /// Any other service is watched once it has been seen.
    pub required_services: Vec<String>,
    /// Fraction of a stream's, bucket's or the account's JetStream limit (bytes or messages)
    /// at which the `storage_near_limit` alert is raised (seed: 0.8).
    pub storage_alert_ratio: f64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            check_interval_s: 15.0,
            heartbeat_timeout_multiple: 3.0,
            realert_interval_s: 300.0,
            ping_timeout_ms: 1_000,
            min_dispatch_rate: 1.0,
            required_services: vec![
                "governance".into(),
                "scheduler".into(),
                "storm_guard".into(),
                "event_policy_engine".into(),
            ],
            storage_alert_ratio: 0.8,
        }
    }
}

impl WatchdogConfig {
    /// Checks ranges and consistency; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.storage_alert_ratio > 0.0 && self.storage_alert_ratio <= 1.0) {
            return Err(format!(
                "watchdog.storage_alert_ratio must be in (0, 1], got {}",
                self.storage_alert_ratio
            ));
        }
        for (key, value) in [
            ("check_interval_s", self.check_interval_s),
            ("realert_interval_s", self.realert_interval_s),
        ] {
            if value.is_nan() || value <= 0.0 || value.is_infinite() {
                return Err(format!(
                    "watchdog.{key} must be a positive number, got {value}"
                ));
            }
        }
        if self.heartbeat_timeout_multiple.is_nan() || self.heartbeat_timeout_multiple < 1.0 {
            return Err(format!(
                "watchdog.heartbeat_timeout_multiple must be at least 1, got {}",
                self.heartbeat_timeout_multiple
            ));
        }
        if self.ping_timeout_ms == 0
            || self.ping_timeout_ms as f64 >= self.check_interval_s * 1000.0
        {
            return Err(format!(
                "watchdog.ping_timeout_ms must be positive and below watchdog.check_interval_s, got {}",
                self.ping_timeout_ms
            ));
        }
        if self.min_dispatch_rate.is_nan() || self.min_dispatch_rate < 0.0 {
            return Err(format!(
                "watchdog.min_dispatch_rate must be 0 or more, got {}",
                self.min_dispatch_rate
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_nan_negative_or_absurd_duration_is_refused_with_its_key() {
        let load = |key: &str, value: &str| {
            BulwarkConfig::load_from(None, HashMap::from([(key.to_owned(), value.to_owned())]))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let nan = load("BULWARK_CLARITY__ACK_WAIT_S", "nan").expect_err("NaN refused");
        assert!(nan.contains("clarity.ack_wait_s"), "{nan}");
        let negative =
            load("BULWARK_NATS__STORAGE__SWEEP_INTERVAL_S", "-1").expect_err("negative refused");
        assert!(
            negative.contains("nats.storage.sweep_interval_s"),
            "{negative}"
        );
        let absurd =
            load("BULWARK_WATCHDOG__CHECK_INTERVAL_S", "1e12").expect_err("absurd refused");
        assert!(absurd.contains("watchdog.check_interval_s"), "{absurd}");
        let inf = load("BULWARK_REPLICAS__LEASE_TTL_S", "inf").expect_err("infinity refused");
        assert!(inf.contains("replicas.lease_ttl_s"), "{inf}");
        load("BULWARK_WATCHDOG__CHECK_INTERVAL_S", "2.5").expect("a sane value loads");
    }

    #[test]
    fn defaults_are_the_seed() {
        let cfg = BulwarkConfig::load_from(None, HashMap::new()).expect("defaults load");
        assert_eq!(cfg.governance.intent_types.len(), 14);
        assert_eq!(cfg.governance.intent_types["self_improve"].tier, 3);
        assert_eq!(cfg.governance.default_tier, 0);
        assert_eq!(cfg.governance.charter.revenue, 0.8);
    }

    #[test]
    fn env_overrides_and_file_merges() {
        let dir = std::env::temp_dir().join(format!("bulwark-cfg-{}", crate::ids::new_id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("b.toml");
        std::fs::write(
            &file,
            "[governance.intent_types.train_model]\ntier = 3\nbase_alignment = 0.7\n[governance.voters]\nnames=[\"a\",\"b\"]\nquorum=1\n",
        )
        .expect("write");
        let env = HashMap::from([
            (
                "BULWARK_GOVERNANCE__DEFAULT_TIER".to_owned(),
                "2".to_owned(),
            ),
            ("BULWARK_NATS__URL".to_owned(), "nats://h:1".to_owned()),
        ]);
        let cfg = BulwarkConfig::load_from(Some(&file), env).expect("loads");
        assert_eq!(cfg.governance.default_tier, 2);
        assert_eq!(cfg.nats.url, "nats://h:1");
        assert_eq!(
            cfg.governance.intent_types.len(),
            15,
            "file adds a type, keeps the defaults"
        );
        assert_eq!(cfg.governance.voters.names, vec!["a", "b"]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn only_sectioned_variables_are_config() {
        assert!(is_config_env("BULWARK_NATS__URL"));
        assert!(!is_config_env("BULWARK_NATS_URL"));
        assert!(!is_config_env("BULWARK_BIN"));
        assert!(!is_config_env("OTHER__X"));
    }

    #[test]
    fn the_repository_bulwark_toml_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bulwark.toml");
        let from_file =
            BulwarkConfig::load_from(Some(&path), HashMap::new()).expect("bulwark.toml loads");
        let defaults = BulwarkConfig::default();
        assert_eq!(
            serde_json::to_value(&from_file).expect("json"),
            serde_json::to_value(&defaults).expect("json"),
            "bulwark.toml documents exactly the built-in defaults"
        );
    }

    #[test]
    fn debug_output_hides_every_secret() {
        let env = HashMap::from([
            (
                "BULWARK_NATS__PASSWORD".to_owned(),
                "pw-s3cret-1".to_owned(),
            ),
            (
                "BULWARK_NATS__CLI_PASSWORD".to_owned(),
                "pw-s3cret-2".to_owned(),
            ),
            ("BULWARK_NATS__TOKEN".to_owned(), "tok-s3cret-3".to_owned()),
            (
                "BULWARK_NATS__URL".to_owned(),
                "nats://u:pw-s3cret-4@h:1,nats://tok-s3cret-5@h:2".to_owned(),
            ),
        ]);
        let cfg = BulwarkConfig::load_from(None, env).expect("loads");
        assert_eq!(
            cfg.nats.password, "pw-s3cret-1",
            "the secret is still usable"
        );
        for text in [
            format!("{cfg:?}"),
            format!("{cfg:#?}"),
            format!("{:?}", cfg.nats),
        ] {
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains(REDACTED), "{text}");
            assert!(text.contains("nats://u:***@h:1,nats://***@h:2"), "{text}");
        }
        let env = HashMap::from([("BULWARK_NATS__TLS_CERT".to_owned(), "c.pem".to_owned())]);
        let err = BulwarkConfig::load_from(None, env).expect_err("cert without key");
        assert!(err.to_string().contains("tls_key"), "{err}");
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        let env = HashMap::from([("BULWARK_GOVERNANCE__DEFALT_TIER".to_owned(), "2".to_owned())]);
        let err = BulwarkConfig::load_from(None, env).expect_err("unknown key");
        assert!(err.to_string().contains("defalt_tier"), "{err}");
        let env = HashMap::from([(
            "BULWARK_GOVERNANCE__DEFAULT_TIER".to_owned(),
            "7".to_owned(),
        )]);
        let err = BulwarkConfig::load_from(None, env).expect_err("range");
        assert!(err.to_string().contains("0-4"), "{err}");
        let env = HashMap::from([(
            "BULWARK_CLARITY__QUERY_DEFAULT_LIMIT".to_owned(),
            "5000".to_owned(),
        )]);
        let err = BulwarkConfig::load_from(None, env).expect_err("limit over max");
        assert!(
            err.to_string().contains("clarity.query_default_limit"),
            "{err}"
        );
        let missing =
            BulwarkConfig::load_from(Some(Path::new("/nonexistent/b.toml")), HashMap::new());
        assert!(matches!(missing, Err(ConfigError::Missing(_))));
    }
}
