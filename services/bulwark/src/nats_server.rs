//! The local nats-server `bulwark up` starts when none is reachable: found on PATH (2.10 or
//! newer) or in `.tools/pip/bin` (where `scripts/setup` installs it), run with a copy of
//! `nats.conf` (`data/nats-server.conf`, made synced when `nats.durability = "synced"`), stopped
//! with SIGTERM when bulwark stops. The launcher is the one the chaos tool and the tests use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_common::nats_server;

/// A nats-server child process (the common launcher, [`bulwark_common::nats_server`]).
pub struct LocalServer {
    process: nats_server::NatsProcess,
}

/// The nats-server binary to use (see [`bulwark_common::nats_server::find_binary`]).
pub fn find_binary(configured: &str) -> anyhow::Result<PathBuf> {
    nats_server::find_binary(configured).context(
        "no nats-server found on PATH or in .tools/pip/bin: run scripts/setup, or pass --nats-url",
    )
}

impl LocalServer {
    /// Starts `binary -c conf`, listening on `host:port`, logging to `log`, and waits until it
    /// has written its ports file. With `synced`, runs a copy of `conf` whose `jetstream` block
    /// has `sync_interval: always` (written next to `log`): every acknowledged write is on disk
    /// first.
    pub async fn start(
        binary: &Path,
        conf: &Path,
        host: &str,
        port: u16,
        log: &Path,
        synced: bool,
    ) -> anyhow::Result<Self> {
        if !conf.is_file() {
            bail!(
                "nats-server config {} not found (set up.nats_conf, or run from the repository root)",
                conf.display()
            );
        }
        let text =
            std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
        let how = nats_server::Adapt {
            synced,
            ..Default::default()
        };
        let text = nats_server::adapt(&text, &how)
            .with_context(|| format!("adapting {}", conf.display()))?;
        let run_conf = log.with_file_name("nats-server.conf");
        let mut args = Vec::new();
        if (host, port) != ("127.0.0.1", 4222) {
            args = vec!["-a".into(), host.into(), "-p".into(), port.to_string()];
        }
        let (binary, log) = (binary.to_owned(), log.to_owned());
        let process = tokio::task::spawn_blocking(move || {
            nats_server::NatsProcess::start(
                &binary,
                &run_conf,
                &text,
                &args,
                &log,
                Duration::from_secs(20),
            )
        })
        .await
        .context("starting nats-server")??;
        Ok(LocalServer { process })
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.process.running()
    }

    /// Stops the server gracefully (SIGTERM), killing it after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let _ = tokio::task::spawn_blocking(move || self.process.terminate(grace)).await;
    }
}
