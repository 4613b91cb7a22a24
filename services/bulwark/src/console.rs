//! `bulwark console`, the console `bulwark up` starts beside the services (console.listen),
//! and `bulwark notify log`.

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

/// `bulwark notify log`: the notify service's newest deliveries, one line each (oldest first).
pub async fn notify_log(
    cfg: &BulwarkConfig,
    limit: u64,
    kind: Option<String>,
    outcome: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let body = serde_json::json!({"limit": limit, "kind": kind, "outcome": outcome});
    let reply = crate::commands::request(cfg, bulwark_common::subjects::NOTIFY_LOG, &body).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(ExitCode::SUCCESS);
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    println!(
        "{:<24} {:<16} {:<22} {:<11} {:>8}  LAST ERROR",
        "AT", "WEBHOOK", "KIND", "OUTCOME", "ATTEMPTS"
    );
    let empty = Vec::new();
    for d in reply["deliveries"].as_array().unwrap_or(&empty) {
        let attempts = d["attempts"].as_array().map(Vec::len).unwrap_or(0);
        let last = d["attempts"]
            .as_array()
            .and_then(|a| a.last())
            .map(|a| text(&a["error"]))
            .unwrap_or_default();
        println!(
            "{:<24} {:<16} {:<22} {:<11} {:>8}  {}",
            text(&d["at"]),
            text(&d["webhook"]),
            text(&d["kind"]),
            text(&d["outcome"]),
            attempts,
            last
        );
    }
    println!(
        "{} pending; counters {}",
        text(&reply["pending"]),
        reply["counters"]
    );
    Ok(ExitCode::SUCCESS)
}
