//! The test harness: a real nats-server per test, and bulwark services running in-process
//! against it. No mock of NATS anywhere.
//!
//! [`NatsServer::start`] runs the repository's own `nats.conf` (users and permissions included)
//! with three test overrides: a random client port, a random monitoring port and a temporary
//! JetStream store. [`NatsServer::restart`] brings it back on the same port with the same store.
//! Dropping it kills the process and deletes the store. [`NatsCluster::start`] runs several such
//! servers as one JetStream cluster (routes on free loopback ports), so tests can kill a broker
//! node while clients stay connected to the others.
//!
//! The nats-server binary is `$NATS_SERVER`, else `nats-server` on PATH, else the one
//! `scripts/setup` installs into `.tools/pip/bin`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bulwark_common::BulwarkConfig;
use bulwark_common::nats_server;
use tokio_util::sync::CancellationToken;

/// Service credentials of `nats.conf`.
pub const SERVICE_USER: (&str, &str) = ("bulwark", "bulwark-dev");
/// Operator credentials of `nats.conf`.
pub const OPERATOR_USER: (&str, &str) = ("operator", "operator-dev");
/// Agent credentials of `nats.conf`.
pub const AGENT_USER: (&str, &str) = ("agent", "agent-dev");

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Finds the nats-server binary (see [`bulwark_common::nats_server::find_binary`]).
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    bulwark_common::nats_server::find_binary("")
        .context("no nats-server found: run scripts/setup (it installs one into .tools/)")
}

/// A nats-server process for one test (the common launcher,
/// [`bulwark_common::nats_server`]).
pub struct NatsServer {
    child: Option<nats_server::NatsProcess>,
    dir: tempfile::TempDir,
    port: u16,
    monitor_port: u16,
    with_auth: bool,
    cluster: Option<ClusterNode>,
    /// Appended to the repository's `nats.conf` (e.g. a `tls { ... }` block).
    extra: String,
    /// `sync_interval: always` in the `jetstream` block (`nats.durability = "synced"`).
    synced: bool,
}

/// A server's place in a cluster: its name, its route port and every route port.
#[derive(Debug, Clone)]
struct ClusterNode {
    name: String,
    route_port: u16,
    routes: Vec<u16>,
}

impl NatsServer {
    /// Starts a server with the repository's `nats.conf` (authorization included).
    pub fn start() -> Self {
        Self::launch(true).expect("nats-server starts")
    }

    /// Starts a server with JetStream and no authorization.
    pub fn start_open() -> Self {
        Self::launch(false).expect("nats-server starts")
    }

    /// Starts a server with the repository's `nats.conf` whose JetStream syncs every write
    /// before acknowledging it (`sync_interval: always`, what `nats.durability = "synced"`
    /// makes `bulwark up` run).
    pub fn start_synced() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bulwark-nats-")
            .tempdir()
            .expect("temp dir");
        let mut server = NatsServer {
            child: None,
            dir,
            port: 0,
            monitor_port: 0,
            with_auth: true,
            cluster: None,
            extra: String::new(),
            synced: true,
        };
        server.spawn(None).expect("nats-server starts");
        server
    }

    /// Starts a server with the repository's `nats.conf` followed by `extra` (e.g. a `tls`
    /// block).
    pub fn start_with(extra: &str) -> Self {
        Self::launch_with(true, extra).expect("nats-server starts")
    }

    fn launch(with_auth: bool) -> anyhow::Result<Self> {
        Self::launch_with(with_auth, "")
    }

    fn launch_with(with_auth: bool, extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("bulwark-nats-").tempdir()?;
        let mut server = NatsServer {
            child: None,
            dir,
            port: 0,
            monitor_port: 0,
            with_auth,
            cluster: None,
            extra: extra.to_owned(),
            synced: false,
        };
        server.spawn(None)?;
        Ok(server)
    }

    fn launch_node(node: ClusterNode) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("bulwark-nats-{}-", node.name))
            .tempdir()?;
        let mut server = NatsServer {
            child: None,
            dir,
            port: 0,
            monitor_port: 0,
            with_auth: true,
            cluster: Some(node),
            extra: String::new(),
            synced: false,
        };
        server.spawn(None)?;
        Ok(server)
    }

    /// This server's configuration: the repository's `nats.conf` (or an open one) moved to
    /// `port` (random when `None`), a random monitoring port and the temporary store.
    fn config_text(&self, port: Option<u16>) -> anyhow::Result<String> {
        let store = self.dir.path().join("jetstream");
        let listen = match port {
            Some(p) => format!("127.0.0.1:{p}"),
            None => "127.0.0.1:-1".to_owned(),
        };
        if !self.with_auth {
            return Ok(format!(
                "listen: {listen}\nhttp: 127.0.0.1:-1\njetstream {{\n  store_dir: {:?}\n}}\n",
                store.display().to_string()
            ));
        }
        let original =
            std::fs::read_to_string(repo_root().join("nats.conf")).context("reading nats.conf")?;
        let mut how = nats_server::Adapt {
            listen: Some(listen),
            http: Some("127.0.0.1:-1".to_owned()),
            store_dir: Some(store),
            synced: self.synced,
            after: self.extra.clone(),
            ..Default::default()
        };
        if let Some(node) = &self.cluster {
            let routes: Vec<String> = node
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            how.drop_keys = vec!["server_name".to_owned()];
            how.before = format!("server_name: {}\n", node.name);
            how.after.push_str(&format!(
                "\ncluster {{\n  name: bulwark_test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                node.route_port,
                routes.join(", ")
            ));
        }
        Ok(nats_server::adapt(&original, &how)?)
    }

    fn spawn(&mut self, port: Option<u16>) -> anyhow::Result<()> {
        let text = self.config_text(port)?;
        let process =
            nats_server::NatsProcess::start_in(&nats_server_binary()?, self.dir.path(), &text)?;
        self.port = process.port();
        self.monitor_port = process.monitor_port();
        self.child = Some(process);
        Ok(())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `nats://127.0.0.1:<port>`, no credentials.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The monitoring port.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// Kills the server (SIGKILL: no goodbye, like a crash).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.child.take() {
            process.kill();
        }
    }

    /// Stops the server and starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(Some(port))
            .expect("nats-server restarts on the same port");
    }

    /// Bulwark configuration pointing at this server, with test-friendly timeouts.
    pub fn config(&self) -> BulwarkConfig {
        let mut cfg = BulwarkConfig::default();
        cfg.nats.url = self.url();
        if !self.with_auth {
            cfg.nats.user.clear();
            cfg.nats.cli_user.clear();
            cfg.nats.worker_user.clear();
            cfg.nats.api_user.clear();
        }
        cfg.nats.request_timeout_ms = 5_000;
        // Tests speak for voters and reviewers by name with one client; the shipped default
        // binds them (tests/abuse.rs runs the shipped file).
        cfg.governance.bound_identities.clear();
        cfg.telemetry.interval_s = 1.0;
        // Clarity's signing key lives next to this server's store, one per test.
        cfg.clarity.key_file = self.dir.path().join("clarity.key").display().to_string();
        // A replica that crashed holding a lease is replaced after 2 s, not 10.
        cfg.replicas.lease_ttl_s = 2.0;
        cfg
    }

    /// A client with the given credentials, and the inbox prefix `nats.conf` grants that user
    /// (`_INBOX` for the services, `_INBOX_<user>` for everyone else).
    pub async fn client_as(&self, (user, password): (&str, &str)) -> async_nats::Client {
        let role = if user == SERVICE_USER.0 {
            bulwark_common::connect::Role::Service
        } else {
            bulwark_common::connect::Role::Cli
        };
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
            .custom_inbox_prefix(bulwark_common::connect::inbox_prefix(role, user))
            .connect(self.url())
            .await
            .expect("client connects")
    }

    /// A client with service credentials.
    pub async fn client(&self) -> async_nats::Client {
        if self.with_auth {
            self.client_as(SERVICE_USER).await
        } else {
            async_nats::connect(self.url())
                .await
                .expect("client connects")
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A JetStream cluster of nats-servers on loopback, each with the repository's `nats.conf`
/// (users and permissions), a random client port and a temporary store. Streams and buckets
/// bulwark creates on it get three replicas.
pub struct NatsCluster {
    /// The nodes, in start order.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until JetStream answers on every one.
    pub async fn start(size: usize) -> Self {
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(i, &port)| {
                NatsServer::launch_node(ClusterNode {
                    name: format!("n{}", i + 1),
                    route_port: port,
                    routes: route_ports.clone(),
                })
                .expect("cluster node starts")
            })
            .collect();
        let cluster = NatsCluster { nodes };
        for i in 0..size {
            cluster.wait_jetstream(i).await;
        }
        cluster
    }

    /// Waits until node `i` answers JetStream requests (a metadata leader is elected).
    pub async fn wait_jetstream(&self, i: usize) {
        let client = self.nodes[i].client().await;
        let js = async_nats::jetstream::new(client);
        eventually(
            Duration::from_secs(30),
            "JetStream on the cluster node",
            || {
                let js = js.clone();
                async move { js.query_account().await.ok().map(|_| ()) }
            },
        )
        .await;
    }

    /// Every node's client URL, comma-separated (the seed list bulwark connects with).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.port != 0)
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Bulwark configuration with every seed URL and test-friendly timeouts.
    pub fn config(&self) -> BulwarkConfig {
        let mut cfg = self.nodes[0].config();
        cfg.nats.url = self.url();
        cfg
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its ports with its store, and waits for its JetStream.
    pub async fn restart(&mut self, i: usize) {
        let port = self.nodes[i].port;
        self.nodes[i]
            .spawn(Some(port))
            .expect("cluster node restarts");
        self.wait_jetstream(i).await;
    }

    /// A client with service credentials that knows every node.
    pub async fn client(&self) -> async_nats::Client {
        let (user, password) = SERVICE_USER;
        let urls: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url().parse().expect("url"))
            .collect();
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
            .retry_on_initial_connect()
            .connect(urls)
            .await
            .expect("client connects to the cluster")
    }
}

/// A free loopback TCP port (bound once, then released for the server to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A bulwark service running in-process on a runtime of its own, so that a crash can take
/// everything of it down at once: its tasks, its connection, its subscriptions.
pub struct RunningService {
    /// Cancels the service.
    pub token: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
    done: Option<tokio::sync::oneshot::Receiver<anyhow::Result<()>>>,
}

impl RunningService {
    /// Cancels the service and waits for it to finish; returns its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.token.cancel();
        let result = match self.done.take() {
            Some(done) => done
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the service's runtime ended first"))),
            None => Ok(()),
        };
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        result
    }

    /// Kills the service like a crashed process: its runtime is shut down, so no shutdown work
    /// runs and its connection closes (endpoints, `$SRV` discovery and subscriptions vanish).
    pub async fn crash(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        // Let the server notice the closed socket before the test goes on.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Connects as `name` and runs `service` with `cfg` on a runtime of its own; no readiness wait.
pub fn spawn_service<F, Fut, E>(name: &str, cfg: BulwarkConfig, service: F) -> RunningService
where
    F: FnOnce(BulwarkConfig, async_nats::Client, CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    spawn_as(name, bulwark_common::connect::Role::Service, cfg, service)
}

/// [`spawn_service`] connecting with the credentials of `role`.
pub fn spawn_as<F, Fut, E>(
    name: &str,
    role: bulwark_common::connect::Role,
    cfg: BulwarkConfig,
    service: F,
) -> RunningService
where
    F: FnOnce(BulwarkConfig, async_nats::Client, CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("svc-{name}"))
        .enable_all()
        .build()
        .expect("a runtime for the service");
    let token = CancellationToken::new();
    let (tx, done) = tokio::sync::oneshot::channel();
    let name = name.to_owned();
    let run_token = token.clone();
    runtime.spawn(async move {
        let result = async {
            let (client, _) = bulwark_common::connect::connect(&cfg.nats, &name, role).await?;
            service(cfg, client.clone(), run_token).await?;
            let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
            anyhow::Ok(())
        }
        .await;
        let _ = tx.send(result);
    });
    RunningService {
        token,
        runtime: Some(runtime),
        done: Some(done),
    }
}

/// Runs `service` as [`spawn_service`] does and waits until every endpoint it announced is
/// subscribed (`$SRV.INFO.<name>`).
pub async fn start_service<F, Fut, E>(name: &str, cfg: BulwarkConfig, service: F) -> RunningService
where
    F: FnOnce(BulwarkConfig, async_nats::Client, CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let probe = probe_client(&cfg).await;
    let running = spawn_service(name, cfg, service);
    assert!(
        bulwark_common::micro::wait_ready(&probe, name, Duration::from_secs(20)).await,
        "{name} answers $SRV.INFO with all its endpoints"
    );
    running
}

async fn probe_client(cfg: &BulwarkConfig) -> async_nats::Client {
    bulwark_common::connect::connect(
        &cfg.nats,
        "harness-probe",
        bulwark_common::connect::Role::Service,
    )
    .await
    .expect("probe connects")
    .0
}

/// Starts the governance service with `cfg` and waits until it answers `$SRV.PING`.
pub async fn start_governance(cfg: BulwarkConfig) -> RunningService {
    start_service("governance", cfg, bulwark_governance::run).await
}

/// Starts the clarity service with `cfg` and waits until it answers `$SRV.PING`.
pub async fn start_clarity(cfg: BulwarkConfig) -> RunningService {
    start_service("clarity", cfg, bulwark_clarity::run).await
}

/// Starts the storm guard with `cfg` and waits until it answers `$SRV.INFO`.
pub async fn start_storm_guard(cfg: BulwarkConfig) -> RunningService {
    start_service("storm_guard", cfg, bulwark_storm_guard::run).await
}

/// Starts the Layer 2 watchdog with `cfg` and waits until it answers `$SRV.INFO`.
pub async fn start_watchdog(cfg: BulwarkConfig) -> RunningService {
    start_service("watchdog", cfg, bulwark_watchdog::run).await
}

/// Starts the event policy engine with `cfg` and waits until it answers `$SRV.INFO`.
pub async fn start_event_policy(cfg: BulwarkConfig) -> RunningService {
    start_service("event_policy_engine", cfg, bulwark_event_policy::run).await
}

/// Starts the scheduler with `cfg` and waits until it answers `$SRV.INFO`.
pub async fn start_scheduler(cfg: BulwarkConfig) -> RunningService {
    start_service("scheduler", cfg, bulwark_scheduler::run).await
}

/// Starts worker `worker_id` with the built-in handlers and the configured actions, and waits until it serves its task
/// subject. Several workers share the micro name `htm_worker`, so readiness is checked on the
/// worker's own subject.
pub async fn start_worker(cfg: BulwarkConfig, worker_id: &str) -> RunningService {
    let handlers = bulwark_worker::Handlers::for_config(&cfg, None);
    start_worker_with(cfg, worker_id, handlers).await
}

/// Starts worker `worker_id` with `handlers`, as [`start_worker`] does. It connects as a
/// worker (`[nats] worker_user`), like bulwark's own workers.
pub async fn start_worker_with(
    cfg: BulwarkConfig,
    worker_id: &str,
    handlers: bulwark_worker::Handlers,
) -> RunningService {
    let probe = probe_client(&cfg).await;
    let id = worker_id.to_owned();
    let role = bulwark_common::connect::Role::Worker;
    let running = spawn_as(worker_id, role, cfg, move |cfg, client, token| {
        bulwark_worker::run_worker(cfg, client, token, id, handlers)
    });
    wait_for_task_endpoint(&probe, worker_id).await;
    running
}

/// Waits until worker `worker_id` serves its task subject: an empty body is refused as invalid,
/// so any reply proves the endpoint is subscribed.
async fn wait_for_task_endpoint(probe: &async_nats::Client, worker_id: &str) {
    let subject = bulwark_common::subjects::worker_task(worker_id);
    eventually(
        Duration::from_secs(20),
        "the worker's task endpoint",
        || {
            let probe = probe.clone();
            let subject = subject.clone();
            async move {
                let reply = tokio::time::timeout(
                    Duration::from_millis(500),
                    probe.request(subject, "".into()),
                )
                .await;
                matches!(reply, Ok(Ok(_))).then_some(())
            }
        },
    )
    .await;
}

/// Starts a worker pool (`htm_pool`) running the workers `ids`, and waits until the pool serves
/// its endpoints and every worker heartbeats at the scheduler (when one runs) or serves its task
/// subject.
pub async fn start_pool(cfg: BulwarkConfig, ids: &[&str]) -> RunningService {
    let probe = probe_client(&cfg).await;
    let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    let workers = ids.clone();
    let running = start_service("htm_pool", cfg, move |cfg, client, token| {
        bulwark_worker::pool::run_pool(cfg, client, token, ids)
    })
    .await;
    for worker_id in &workers {
        wait_for_task_endpoint(&probe, worker_id).await;
    }
    running
}

/// Starts the playbooks service with `cfg` (its `playbooks.dir` made absolute against the
/// repository when relative) and waits until it answers `$SRV.INFO`.
pub async fn start_playbooks(mut cfg: BulwarkConfig) -> RunningService {
    let dir = PathBuf::from(&cfg.playbooks.dir);
    if dir.is_relative() {
        cfg.playbooks.dir = repo_root().join(dir).display().to_string();
    }
    start_service("playbooks", cfg, bulwark_playbooks::run).await
}

/// Starts the notify service (webhooks, `notify.log`) with `cfg` and waits until it answers
/// `$SRV.INFO`.
pub async fn start_notify(cfg: BulwarkConfig) -> RunningService {
    start_service("notify", cfg, bulwark_console::notify::run).await
}

/// Sends a JSON request and returns the reply's JSON and its micro error code header, if any.
pub async fn request_json(
    client: &async_nats::Client,
    subject: &str,
    body: impl Into<bytes::Bytes>,
) -> (serde_json::Value, Option<String>) {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.to_owned(), body.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("{subject} answered within 10 s"))
    .unwrap_or_else(|e| panic!("{subject} request failed: {e}"));
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(bulwark_common::api::SERVICE_ERROR_CODE))
        .map(|v| v.to_string());
    let value = serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
        panic!(
            "{subject} replied with invalid JSON ({e}): {:?}",
            reply.payload
        )
    });
    (value, code)
}

/// Runs a foreign client, `tests/clients/<script>` under python3 with nats-py (`.tools/py`),
/// with `args`, and `env` set (e.g. `USER_NAME`/`USER_PASSWORD` for the attack scripts); the JSON
/// of its last line on stdout. Panics, naming its output, when it fails or prints no JSON.
pub async fn python_client(script: &str, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let root = repo_root();
    let output = tokio::process::Command::new("python3")
        .arg(root.join("tests/clients").join(script))
        .args(args)
        .env("PYTHONPATH", root.join(".tools/py"))
        .envs(env.iter().copied())
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {stdout}"))
}

/// Runs an attack of `tests/clients/attacks.py` against `server`, as the anonymous agent or
/// with `creds`; its JSON line.
pub async fn attack(
    server: &NatsServer,
    creds: Option<(&str, &str)>,
    args: &[&str],
) -> serde_json::Value {
    let url = server.url();
    let mut all = vec![args[0], url.as_str()];
    all.extend_from_slice(&args[1..]);
    let env: Vec<(&str, &str)> = match creds {
        Some((user, password)) => vec![("USER_NAME", user), ("USER_PASSWORD", password)],
        None => Vec::new(),
    };
    python_client("attacks.py", &all, &env).await
}

/// Every stored narrative of `who` (`clarity.narrative.<who>`), read with an ordered consumer
/// until half a second passes without one.
pub async fn stored_narratives(
    js: &async_nats::jetstream::Context,
    who: &str,
) -> Vec<serde_json::Value> {
    use futures::StreamExt;
    let stream = js
        .get_stream(bulwark_common::streams::NARRATIVES_STREAM)
        .await
        .expect("narratives stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: bulwark_common::subjects::narrative(who),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut out = Vec::new();
    let mut messages = consumer.messages().await.expect("messages");
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        out.push(serde_json::from_slice(&msg.payload).expect("narrative"));
    }
    out
}

/// What a checker built on the project's mesh consumer handled, in order:
/// (the field it keeps of each event, the event type, the delivery).
pub type SeenEvents =
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, bulwark_common::mesh::Delivery)>>>;

/// A consumer of the mesh built on the project's `MeshConsumer` (so it obeys the breaker and the
/// limits like bulwark's own), recording `keep(event)`, the type and the delivery of every
/// event it handles, until `token`; its stats at the end.
pub fn mesh_checker(
    js: async_nats::jetstream::Context,
    cfg: &BulwarkConfig,
    token: &CancellationToken,
    keep: fn(&bulwark_common::envelope::MeshEvent) -> String,
) -> (
    SeenEvents,
    tokio::task::JoinHandle<std::sync::Arc<bulwark_common::mesh::ConsumerStats>>,
) {
    let seen: SeenEvents = std::sync::Arc::default();
    let record = seen.clone();
    let cfg = cfg.mesh.clone();
    let token = token.clone();
    let handle = tokio::spawn(async move {
        let narrator = bulwark_common::Narrator::new(js.clone(), "checker", "checker@test");
        let consumer =
            bulwark_common::mesh::MeshConsumer::start(js, &cfg, "checker", narrator, &token)
                .await
                .expect("checker consumer starts");
        let stats = consumer.stats();
        consumer
            .run(token, move |event, delivery| {
                let record = record.clone();
                async move {
                    record
                        .lock()
                        .expect("lock")
                        .push((keep(&event), event.event_type, delivery));
                    Ok(())
                }
            })
            .await;
        stats
    });
    (seen, handle)
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Installs test logging once (`BULWARK_LOG=debug` for more).
pub fn init_logging() {
    bulwark_common::logging::init("warn");
}

/// Runs per intent id, counted where the work happens (handlers in the test process), so "ran
/// twice" means the work really ran twice, not that a report was recorded twice.
#[derive(Clone, Default)]
pub struct Runs(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>);

impl Runs {
    /// Runs so far, per intent id.
    pub fn snapshot(&self) -> std::collections::HashMap<String, u32> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A handler that counts each run and takes `work_ms`.
pub struct Counting {
    /// Where runs are counted.
    pub runs: Runs,
    /// How long each run takes.
    pub work_ms: u64,
}

impl bulwark_worker::handlers::Handler for Counting {
    fn handle<'a>(
        &'a self,
        worker_id: &'a str,
        task: &'a bulwark_common::intent::Task,
    ) -> futures::future::BoxFuture<
        'a,
        Result<serde_json::Value, bulwark_worker::handlers::HandlerError>,
    > {
        Box::pin(async move {
            *self
                .runs
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(task.intent_id.clone())
                .or_default() += 1;
            tokio::time::sleep(Duration::from_millis(self.work_ms)).await;
            Ok(serde_json::json!({"worker": worker_id}))
        })
    }
}

/// A worker `id` whose `query_knowledge` handler counts its runs in `runs`.
pub async fn start_counting_worker(
    cfg: &BulwarkConfig,
    id: &str,
    runs: &Runs,
    work_ms: u64,
) -> RunningService {
    let handler: std::sync::Arc<dyn bulwark_worker::handlers::Handler> =
        std::sync::Arc::new(Counting {
            runs: runs.clone(),
            work_ms,
        });
    let handlers = bulwark_worker::handlers::Handlers::default().with("query_knowledge", handler);
    start_worker_with(cfg.clone(), id, handlers).await
}
