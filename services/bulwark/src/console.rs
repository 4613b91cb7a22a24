//! `bulwark console`, and the console `bulwark up` starts beside the services (console.listen).

use std::process::ExitCode;

use bulwark_common::BulwarkConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Binds `console.listen` and serves the console in the background until `shutdown`; prints
/// its address. `None` when it is off (`listen = ""`) or cannot bind (said on stderr: the rest
/// of `bulwark up` runs on).
pub async fn start(cfg: &BulwarkConfig, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    if cfg.console.listen.is_empty() {
        return None;
    }
    match bulwark_console::Console::bind(cfg.clone()).await {
        Ok(console) => {
            if let Some(addr) = console.local_addr() {
                println!(
                    "  console  http://{addr}/ (sign in with a NATS user of nats.conf's PEOPLE)"
                );
            }
            Some(tokio::spawn(async move {
                if let Err(err) = console.serve(shutdown).await {
                    eprintln!("bulwark: {err}");
                }
            }))
        }
        Err(err) => {
            eprintln!("bulwark: {err}; continuing without the console");
            None
        }
    }
}

/// `bulwark console`: the console alone, against a running bulwark, until Ctrl-C.
pub async fn run(cfg: BulwarkConfig) -> anyhow::Result<ExitCode> {
    if cfg.console.listen.is_empty() {
        anyhow::bail!("console.listen is empty: nothing to serve");
    }
    let shutdown = bulwark_common::shutdown::on_signal();
    let console = bulwark_console::Console::bind(cfg.clone()).await?;
    if let Some(addr) = console.local_addr() {
        println!(
            "bulwark: console on http://{addr}/ for the NATS server at {}; Ctrl-C stops",
            bulwark_common::connect::redact_url(&cfg.nats.url)
        );
    }
    console.serve(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
