//! The local nats-server `bulwark up` starts when none is reachable: found on PATH (2.10 or
//! newer) or in `.tools/pip/bin` (where `scripts/setup` installs it), run with `nats.conf`,
//! stopped with SIGTERM when bulwark stops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A nats-server child process.
pub struct LocalServer {
    child: Child,
}

/// The nats-server binary to use (see [`bulwark_common::nats_server::find_binary`]).
pub fn find_binary(configured: &str) -> anyhow::Result<PathBuf> {
    bulwark_common::nats_server::find_binary(configured).context(
        "no nats-server found on PATH or in .tools/pip/bin: run scripts/setup, or pass --nats-url",
    )
}

impl LocalServer {
    /// Starts `binary -c conf`, listening on `host:port`, logging to `log`. With
    /// `synced`, runs a copy of `conf` whose `jetstream` block has `sync_interval: always`
    /// (written next to `log`): every acknowledged write is on disk first.
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
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let synced_conf;
        let conf = if synced {
            synced_conf = log.with_file_name("nats-synced.conf");
            write_synced(conf, &synced_conf)?;
            synced_conf.as_path()
        } else {
            conf
        };
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(binary);
        command.arg("-c").arg(conf);
        if (host, port) != ("127.0.0.1", 4222) {
            command.arg("-a").arg(host).arg("-p").arg(port.to_string());
        }
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(LocalServer { child })
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the server gracefully (SIGTERM), killing it after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Writes `conf` to `out` with `sync_interval: always` as the first line of its `jetstream`
/// block (replacing any `sync_interval` there).
pub fn write_synced(conf: &Path, out: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
    let mut lines = Vec::new();
    let mut found = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("sync_interval") {
            continue;
        }
        lines.push(line.to_owned());
        if !found && trimmed.starts_with("jetstream") && trimmed.ends_with('{') {
            lines.push("  sync_interval: always".to_owned());
            found = true;
        }
    }
    if !found {
        bail!(
            "{} has no `jetstream {{` block to make synced (nats.durability = \"synced\")",
            conf.display()
        );
    }
    std::fs::write(out, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synced_copy_of_nats_conf_syncs_every_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats.conf");
        let out = dir.path().join("nats-synced.conf");
        write_synced(&conf, &out).expect("written");
        let text = std::fs::read_to_string(&out).expect("read");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with("jetstream") && l.ends_with('{'))
            .expect("jetstream block");
        assert_eq!(lines[at + 1], "sync_interval: always");
        assert_eq!(text.matches("sync_interval").count(), 1);
        let none = dir.path().join("none.conf");
        std::fs::write(&none, "listen: 127.0.0.1:4222\n").expect("write");
        assert!(write_synced(&none, &out).is_err(), "no jetstream block");
    }
}
