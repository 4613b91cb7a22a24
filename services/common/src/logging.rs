//! Tracing setup: human-readable logs on a terminal, JSON lines with `BULWARK_LOG_FORMAT=json`.
//! The filter comes from `BULWARK_LOG` (e.g. `info,bulwark_governance=debug`), default `info`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls are ignored (tests call it many times).
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("BULWARK_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("BULWARK_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
