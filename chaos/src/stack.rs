//! The runner's own bulwark, for self-contained runs: a nats-server with the repository's
//! `nats.conf` (users and permissions included) on random ports with a temporary store, and
//! every bulwark service in this process, each on a tokio runtime of its own so that one can be
//! crashed (its runtime shut down: tasks, connection and subscriptions gone at once) and started
//! again. The server itself can be killed and restarted on the same port and store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_common::BulwarkConfig;
use bulwark_common::connect::{self, Role};
use bulwark_common::nats_server;
use tokio_util::sync::CancellationToken;

/// A nats-server with a directory of its own (the common launcher,
/// [`bulwark_common::nats_server`]): the given configuration on a random port with a temporary
/// store; it can be killed and started again on the same port and store.
pub struct NatsProcess {
    process: Option<nats_server::NatsProcess>,
    dir: tempfile::TempDir,
    conf_source: PathBuf,
    binary: PathBuf,
    port: u16,
}

impl NatsProcess {
    /// Starts `binary` with `conf` (its `listen`, `http` and `store_dir` lines replaced).
    pub fn start(binary: &Path, conf: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bulwark-chaos-")
            .tempdir()?;
        let mut p = NatsProcess {
            process: None,
            dir,
            conf_source: conf.to_owned(),
            binary: binary.to_owned(),
            port: 0,
        };
        p.spawn(None)?;
        Ok(p)
    }

    fn spawn(&mut self, port: Option<u16>) -> anyhow::Result<()> {
        let original = std::fs::read_to_string(&self.conf_source)
            .with_context(|| format!("reading {}", self.conf_source.display()))?;
        let how = nats_server::Adapt {
            listen: Some(match port {
                Some(p) => format!("127.0.0.1:{p}"),
                None => "127.0.0.1:-1".to_owned(),
            }),
            http: Some("127.0.0.1:-1".to_owned()),
            store_dir: Some(self.dir.path().join("jetstream")),
            ..Default::default()
        };
        let text = nats_server::adapt(&original, &how)
            .with_context(|| format!("adapting {}", self.conf_source.display()))?;
        let process = nats_server::NatsProcess::start(
            &self.binary,
            &self.dir.path().join("nats.conf"),
            &text,
            &[],
            &self.dir.path().join("server.log"),
            Duration::from_secs(20),
        )?;
        self.port = process.port();
        self.process = Some(process);
        Ok(())
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.kill();
        let port = self.port;
        self.spawn(Some(port))
    }
}

/// One service on its own runtime.
struct Running {
    token: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Running {
    fn crash(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The services of a stack, in start order.
pub const SERVICES: [&str; 8] = [
    "governance",
    "clarity",
    "storm_guard",
    "event_policy_engine",
    "scheduler",
    "watchdog",
    "htm_pool",
    "playbooks",
];

/// A whole bulwark run by the chaos tool.
pub struct Stack {
    /// The server.
    pub nats: NatsProcess,
    /// The configuration every service runs with.
    pub cfg: BulwarkConfig,
    services: BTreeMap<&'static str, Running>,
    workers: usize,
    _policies: tempfile::TempDir,
}

impl Stack {
    /// Starts a server and every service with `cfg` (its URL replaced), `workers` workers in
    /// the pool, and the rule files of `cfg.mesh.policies_dir` plus `extra_rules`.
    pub async fn start(
        mut cfg: BulwarkConfig,
        workers: usize,
        extra_rules: &str,
    ) -> anyhow::Result<Stack> {
        let binary = bulwark_common::nats_server::find_binary(&cfg.up.nats_server).context(
            "no nats-server found on PATH or in .tools/pip/bin: run scripts/setup, or pass --nats-url",
        )?;
        let conf = locate(&cfg.up.nats_conf).with_context(|| {
            format!(
                "nats-server config {} not found (run from the repository root, or set up.nats_conf)",
                cfg.up.nats_conf.display()
            )
        })?;
        let nats = tokio::task::block_in_place(|| NatsProcess::start(&binary, &conf))?;
        cfg.nats.url = nats.url();
        cfg.metrics.listen.clear();
        let policies = tempfile::Builder::new()
            .prefix("bulwark-chaos-policies-")
            .tempdir()?;
        if let Some(dir) = locate(&cfg.mesh.policies_dir)
            && let Ok(entries) = std::fs::read_dir(&dir)
        {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|x| x == "toml") {
                    std::fs::copy(&path, policies.path().join(entry.file_name()))?;
                }
            }
        }
        if !extra_rules.is_empty() {
            std::fs::write(policies.path().join("chaos.toml"), extra_rules)?;
        }
        cfg.mesh.policies_dir = policies.path().to_owned();
        // The remediation runs as in `bulwark up`: the repository's playbooks.
        if let Some(dir) = locate(std::path::Path::new(&cfg.playbooks.dir)) {
            cfg.playbooks.dir = dir.display().to_string();
        }
        let mut stack = Stack {
            nats,
            cfg,
            services: BTreeMap::new(),
            workers,
            _policies: policies,
        };
        for name in SERVICES {
            stack.start_service(name).await?;
        }
        Ok(stack)
    }

    /// Starts `name` and waits until it answers `$SRV.INFO` with all its endpoints.
    pub async fn start_service(&mut self, name: &'static str) -> anyhow::Result<()> {
        let running = spawn(name, self.cfg.clone(), self.workers)?;
        self.services.insert(name, running);
        let (probe, _) = connect::connect(&self.cfg.nats, "chaos-probe", Role::Service).await?;
        let ready = bulwark_common::micro::wait_ready(&probe, name, Duration::from_secs(30)).await;
        let _ = probe.drain().await;
        if !ready {
            bail!("{name} did not become ready within 30 s");
        }
        Ok(())
    }

    /// Crashes `name` (no shutdown work runs).
    pub fn crash_service(&mut self, name: &str) -> anyhow::Result<()> {
        let key = SERVICES
            .iter()
            .find(|s| **s == name)
            .with_context(|| format!("no service {name} in the stack"))?;
        if let Some(running) = self.services.remove(key) {
            running.crash();
        }
        Ok(())
    }

    /// Crashes `name`, waits `down`, starts it again.
    pub async fn restart_service(&mut self, name: &str, down: Duration) -> anyhow::Result<()> {
        self.crash_service(name)?;
        tokio::time::sleep(down).await;
        let key = SERVICES
            .iter()
            .find(|s| **s == name)
            .copied()
            .with_context(|| format!("no service {name} in the stack"))?;
        self.start_service(key).await
    }

    /// Starts `name` again after [`Stack::crash_service`].
    pub async fn start_again(&mut self, name: &str) -> anyhow::Result<()> {
        let key = SERVICES
            .iter()
            .find(|s| **s == name)
            .copied()
            .with_context(|| format!("no service {name} in the stack"))?;
        self.start_service(key).await
    }

    /// Kills the nats-server, waits `down`, starts it on the same port and store.
    pub async fn restart_nats(&mut self, down: Duration) -> anyhow::Result<()> {
        tokio::task::block_in_place(|| self.nats.kill());
        tokio::time::sleep(down).await;
        tokio::task::block_in_place(|| self.nats.start_again())
    }

    /// Stops every service (cancel, then a short grace) and the server.
    pub async fn stop(mut self) {
        for running in self.services.values() {
            running.token.cancel();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.services.clear();
    }
}

/// `path` as given, else below the current directory's ancestors, else the repository root
/// this crate was built from.
fn locate(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_owned());
    }
    if path.is_relative() {
        let cwd = std::env::current_dir().ok()?;
        for dir in cwd.ancestors() {
            let p = dir.join(path);
            if p.exists() {
                return Some(p);
            }
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.join(path);
        if repo.exists() {
            return Some(repo);
        }
    }
    None
}

fn spawn(name: &'static str, cfg: BulwarkConfig, workers: usize) -> anyhow::Result<Running> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("chaos-{name}"))
        .enable_all()
        .build()
        .context("a runtime for the service")?;
    let token = CancellationToken::new();
    let run_token = token.clone();
    runtime.spawn(async move {
        let result = async {
            let (client, _) = connect::connect(&cfg.nats, name, Role::Service).await?;
            let token = run_token;
            match name {
                "governance" => bulwark_governance::run(cfg, client.clone(), token).await?,
                "clarity" => bulwark_clarity::run(cfg, client.clone(), token).await?,
                "storm_guard" => bulwark_storm_guard::run(cfg, client.clone(), token).await?,
                "event_policy_engine" => {
                    bulwark_event_policy::run(cfg, client.clone(), token).await?
                }
                "scheduler" => bulwark_scheduler::run(cfg, client.clone(), token).await?,
                "watchdog" => bulwark_watchdog::run(cfg, client.clone(), token).await?,
                "htm_pool" => {
                    let ids = (1..=workers).map(|i| format!("worker-{i}")).collect();
                    bulwark_worker::pool::run_pool(cfg, client.clone(), token, ids).await?
                }
                "playbooks" => bulwark_playbooks::run(cfg, client.clone(), token).await?,
                other => anyhow::bail!("unknown service {other}"),
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
            anyhow::Ok(())
        }
        .await;
        if let Err(err) = result {
            tracing::error!(service = name, "chaos stack: {err:#}");
        }
    });
    Ok(Running {
        token,
        runtime: Some(runtime),
    })
}
