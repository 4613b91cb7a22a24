//! `bulwark`: one binary for running bulwark (`up`, `serve`) and for talking to it (intents,
//! reviews, votes). Exit codes: 0 ok, 1 failure, 2 usage or configuration error. Errors are one
//! line on stderr.

mod backup;
mod chaos;
mod cli;
mod commands;
mod console;
mod metrics;
mod narratives;
mod nats_server;
mod playbook;
mod services;
mod status;
mod up;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let mut cfg = match bulwark_common::BulwarkConfig::load(args.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(err) => {
            eprintln!("bulwark: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(url) = &args.nats_url {
        cfg.nats.url = url.clone();
    }
    let default_log = if args.command.is_service() {
        "info,async_nats=warn"
    } else if matches!(args.command, cli::Command::Chaos { .. }) {
        // The chaos tool's own stack complains by design; its report says what happened.
        "error"
    } else {
        "warn"
    };
    bulwark_common::logging::init(default_log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("bulwark: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::dispatch(
        args.command,
        cfg,
        args.nats_url.is_some(),
    )) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("bulwark: {err:#}");
            ExitCode::FAILURE
        }
    }
}
