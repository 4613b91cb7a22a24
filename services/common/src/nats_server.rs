//! Finding the nats-server binary, for `bulwark up` and the test harness alike: the configured
//! path, else `$NATS_SERVER`, else `nats-server` on PATH, else `.tools/pip/bin/nats-server`
//! (where `scripts/setup` installs it) below the current directory or any ancestor of the
//! running executable.

use std::path::{Path, PathBuf};

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
