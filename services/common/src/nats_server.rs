//! The one nats-server launcher, for `bulwark up`, the chaos tool's own stack and the test
//! harness alike:
//! - [`find_binary`]: the configured path, else `$NATS_SERVER`, else `nats-server` on PATH, else
//!   `.tools/pip/bin/nats-server` (where `scripts/setup` installs it) below the current directory
//!   or any ancestor of the running executable;
//! - [`adapt`]: a copy of a configuration (the repository's `nats.conf`, users and permissions
//!   included) with its listen address, monitoring port, store and sync policy replaced;
//! - [`NatsProcess`]: the server started with that copy, its ports read from the ports file it
//!   writes (so a random port `-1` works), stopped gently or killed like a crash.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server to run, or `None` when there is none (run `scripts/setup`).
pub fn find_binary(configured: &str) -> Option<PathBuf> {
    if !configured.is_empty() {
        return Some(PathBuf::from(configured));
    }
    if let Some(path) = std::env::var_os("NATS_SERVER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"));
    let mut roots = vec![std::env::current_dir().unwrap_or_default()];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(Path::to_path_buf));
    }
    let installed = roots
        .into_iter()
        .map(|root| root.join(".tools/pip/bin/nats-server"));
    on_path.chain(installed).find(|p| p.is_file())
}

/// Why a server could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The configuration cannot be adapted as asked.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written, or the process not started.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        cause: std::io::Error,
    },
    /// The process exited or did not write its ports file in time.
    #[error("nats-server {0}")]
    NotStarted(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |cause| LaunchError::Io { what, cause }
}

/// What [`adapt`] changes in a configuration. `None` keeps the file's line.
#[derive(Debug, Clone, Default)]
pub struct Adapt {
    /// The `listen:` address (`127.0.0.1:-1` for a random port); added when the file has none.
    pub listen: Option<String>,
    /// The `http:` monitoring address; added when the file has none.
    pub http: Option<String>,
    /// The JetStream `store_dir`; the file must have one.
    pub store_dir: Option<PathBuf>,
    /// `sync_interval: always` in the `jetstream` block (replacing any there): every
    /// acknowledged write is on disk first. The file must have a `jetstream {` block.
    pub synced: bool,
    /// Lines whose first word is one of these keys are dropped (e.g. `server_name:`).
    pub drop_keys: Vec<String>,
    /// Text put before the configuration.
    pub before: String,
    /// Text put after the configuration (e.g. a `tls` or `cluster` block).
    pub after: String,
}

/// `text` (a nats-server configuration) changed as `how` says.
pub fn adapt(text: &str, how: &Adapt) -> Result<String, LaunchError> {
    let (mut listen, mut http, mut store) = (false, false, false);
    let mut jetstream = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        let key = t.split([':', ' ', '=']).next().unwrap_or("");
        if how.drop_keys.iter().any(|k| k == key) || (how.synced && key == "sync_interval") {
            continue;
        }
        match (key, &how.listen, &how.http, &how.store_dir) {
            ("listen", Some(addr), _, _) => {
                listen = true;
                lines.push(format!("listen: {addr}"));
            }
            ("http", _, Some(addr), _) => {
                http = true;
                lines.push(format!("http: {addr}"));
            }
            ("store_dir", _, _, Some(dir)) => {
                store = true;
                lines.push(format!("  store_dir: {:?}", dir.display().to_string()));
            }
            _ => lines.push(line.to_owned()),
        }
        if how.synced && !jetstream && key == "jetstream" && t.ends_with('{') {
            jetstream = true;
            lines.push("  sync_interval: always".to_owned());
        }
    }
    if how.store_dir.is_some() && !store {
        return Err(LaunchError::Config(
            "the configuration has no store_dir line to move the JetStream store".into(),
        ));
    }
    if how.synced && !jetstream {
        return Err(LaunchError::Config(
            "the configuration has no `jetstream {` block to make synced (nats.durability = \"synced\")"
                .into(),
        ));
    }
    let mut head = how.before.clone();
    if let (Some(addr), false) = (&how.listen, listen) {
        head.push_str(&format!("listen: {addr}\n"));
    }
    if let (Some(addr), false) = (&how.http, http) {
        head.push_str(&format!("http: {addr}\n"));
    }
    Ok(format!("{head}{}\n{}\n", lines.join("\n"), how.after))
}

/// A nats-server child process started from an adapted configuration.
#[derive(Debug)]
pub struct NatsProcess {
    child: Option<Child>,
    log: PathBuf,
    port: u16,
    monitor_port: u16,
}

impl NatsProcess {
    /// Writes `conf_text` to `conf` and starts `binary -c conf` with `args`, its output appended
    /// to `log`; waits up to `wait` until the server wrote its ports file (in a `ports` folder
    /// next to `conf`), which names its client and monitoring ports.
    pub fn start(
        binary: &Path,
        conf: &Path,
        conf_text: &str,
        args: &[String],
        log: &Path,
        wait: Duration,
    ) -> Result<Self, LaunchError> {
        if let Some(parent) = conf.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        std::fs::write(conf, conf_text).map_err(io(format!("writing {}", conf.display())))?;
        let ports_dir = conf.with_file_name("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)
            .map_err(io(format!("creating {}", ports_dir.display())))?;
        if let Some(parent) = log.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("opening {}", log.display())))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(conf)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
        let mut server = NatsProcess {
            child: Some(child),
            log: log.to_owned(),
            port: 0,
            monitor_port: 0,
        };
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(port) = port_of(&ports["nats"])
            {
                server.port = port;
                server.monitor_port = port_of(&ports["monitoring"]).unwrap_or(0);
                return Ok(server);
            }
            if !server.running() {
                return Err(LaunchError::NotStarted(format!(
                    "exited: {}",
                    server.log_tail(5)
                )));
            }
            if Instant::now() > deadline {
                server.kill();
                return Err(LaunchError::NotStarted(format!(
                    "did not write its ports file within {wait:?}: {}",
                    server.log_tail(5)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The monitoring port (0 without one).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server (SIGKILL, like a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server gently (SIGTERM: it finishes its writes), killing it after `grace`.
    /// Blocks the calling thread while it waits.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// The last `n` lines of its log, on one line.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The port of the first URL in a ports file entry (`["nats://127.0.0.1:4222"]`).
fn port_of(urls: &serde_json::Value) -> Option<u16> {
    urls.get(0)?
        .as_str()?
        .trim_end_matches('/')
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_conf() -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats.conf"))
            .expect("nats.conf")
    }

    #[test]
    fn the_repository_config_is_moved_to_a_random_port_and_a_store_of_its_own() {
        let how = Adapt {
            listen: Some("127.0.0.1:-1".into()),
            http: Some("127.0.0.1:-1".into()),
            store_dir: Some("/tmp/x y/js".into()),
            ..Adapt::default()
        };
        let text = adapt(&repo_conf(), &how).expect("adapted");
        assert_eq!(text.matches("listen: 127.0.0.1:-1").count(), 1, "{text}");
        assert_eq!(text.matches("http: 127.0.0.1:-1").count(), 1);
        assert!(text.contains("store_dir: \"/tmp/x y/js\""));
        assert!(text.contains("accounts"), "the accounts stay");
    }

    #[test]
    fn synced_adds_one_sync_interval_to_the_jetstream_block() {
        let how = Adapt {
            synced: true,
            ..Adapt::default()
        };
        let text = adapt(&repo_conf(), &how).expect("adapted");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with("jetstream") && l.ends_with('{'))
            .expect("jetstream block");
        assert_eq!(lines[at + 1], "sync_interval: always");
        assert_eq!(text.matches("sync_interval").count(), 1);
        let none = adapt("listen: 127.0.0.1:4222\n", &how);
        assert!(
            matches!(none, Err(LaunchError::Config(_))),
            "no jetstream block"
        );
    }

    #[test]
    fn missing_lines_are_added_or_refused_and_keys_dropped() {
        let how = Adapt {
            listen: Some("127.0.0.1:5000".into()),
            drop_keys: vec!["server_name".into()],
            after: "cluster { name: c }".into(),
            ..Adapt::default()
        };
        let text = adapt("server_name: a\nport: 1\n", &how).expect("adapted");
        assert!(text.starts_with("listen: 127.0.0.1:5000\n"), "{text}");
        assert!(!text.contains("server_name"));
        assert!(text.trim_end().ends_with("cluster { name: c }"));
        let store = Adapt {
            store_dir: Some("/x".into()),
            ..Adapt::default()
        };
        assert!(adapt("port: 1\n", &store).is_err(), "no store_dir to move");
    }
}
