//! `bulwark playbook list|check|run`: the playbooks from the shell.
//!
//! - `list` asks the playbooks service (`playbook.list`): name, triggers, last run and outcome.
//! - `check` compiles every file of `playbooks.dir` here, without NATS, and prints each error
//!   as `file:line:column: message`; exit 1 on any.
//! - `run <name> --param k=v ...` asks the service to run it and follows its
//!   `mesh.playbook.*` events, a line per step; exit 0 when it completed, 1 when it failed.
//!   `--dry-run` prints the actions it would take (reads are real, nothing is changed).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_common::BulwarkConfig;
use bulwark_common::connect::{self, Role};
use bulwark_common::subjects;
use bulwark_playbooks::playbook::Library;
use bulwark_playbooks::sandbox::{Limits, Packages};
use clap::Subcommand;
use futures::StreamExt;
use serde_json::{Value, json};

/// Playbook subcommands.
#[derive(Debug, Subcommand)]
pub enum PlaybookAction {
    /// Every loaded playbook: triggers, last run and its outcome.
    List {
        /// Print the raw reply.
        #[arg(long)]
        json: bool,
    },
    /// Compile every playbook file; errors as file:line:column; exit 1 on any.
    Check {
        /// The folder (default: `playbooks.dir` from the config).
        #[arg(long)]
        dir: Option<String>,
    },
    /// Run a playbook now and follow its steps.
    Run {
        /// The playbook.
        name: String,
        /// A parameter, `key=value`; the value is read as JSON when it parses (numbers, true,
        /// objects), else as a string. Repeatable.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Print the actions it would take instead of taking them.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs `action`.
pub async fn playbook(cfg: &BulwarkConfig, action: PlaybookAction) -> anyhow::Result<ExitCode> {
    match action {
        PlaybookAction::Check { dir } => Ok(check(cfg, dir)),
        PlaybookAction::List { json } => list(cfg, json).await,
        PlaybookAction::Run {
            name,
            params,
            dry_run,
        } => run(cfg, &name, &params, dry_run).await,
    }
}

fn check(cfg: &BulwarkConfig, dir: Option<String>) -> ExitCode {
    let dir = dir.unwrap_or_else(|| cfg.playbooks.dir.clone());
    let library = Library::load(
        std::path::Path::new(&dir),
        &Packages::new(),
        &Limits::from(&cfg.playbooks),
    );
    for (name, pb) in &library.playbooks {
        println!(
            "ok     {name:<30} {} step(s){}{}",
            pb.meta.steps.len(),
            if pb.meta.verify.is_some() {
                ", verify"
            } else {
                ""
            },
            if pb.meta.rollback.is_some() {
                ", rollback"
            } else {
                ""
            }
        );
    }
    for err in &library.errors {
        eprintln!("{err}");
    }
    if library.errors.is_empty() {
        println!("{} playbook(s) compile in {dir}", library.playbooks.len());
        ExitCode::SUCCESS
    } else {
        eprintln!("{} file(s) with errors in {dir}", library.errors.len());
        ExitCode::FAILURE
    }
}

async fn list(cfg: &BulwarkConfig, as_json: bool) -> anyhow::Result<ExitCode> {
    let reply = crate::commands::request(cfg, subjects::PLAYBOOK_LIST, &json!({})).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<30} {:<32} {:<10} {:<26} DETAIL",
        "PLAYBOOK", "TRIGGERS", "LAST RUN", "WHEN"
    );
    for p in reply["playbooks"].as_array().into_iter().flatten() {
        let triggers = p["triggers"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let last = &p["last_run"];
        let (status, when, detail) = if last.is_null() {
            ("never".to_owned(), "-".to_owned(), String::new())
        } else {
            (
                last["status"].as_str().unwrap_or("?").to_owned(),
                last["started"].as_str().unwrap_or("?").to_owned(),
                match last["error"].as_str() {
                    Some(e) => e.to_owned(),
                    None => format!(
                        "{} ms, {}",
                        last["duration_ms"],
                        last["trigger"].as_str().unwrap_or("")
                    ),
                },
            )
        };
        let running = p["running"].as_array().map_or(0, Vec::len);
        println!(
            "{:<30} {:<32} {:<10} {:<26} {}{}",
            p["name"].as_str().unwrap_or("?"),
            triggers,
            status,
            when,
            detail,
            if running > 0 {
                format!(" [running: {running}]")
            } else {
                String::new()
            }
        );
    }
    let errors = reply["errors"].as_array().map_or(0, Vec::len);
    for e in reply["errors"].as_array().into_iter().flatten() {
        eprintln!("not loaded: {}", e.as_str().unwrap_or("?"));
    }
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `key=value` pairs as a JSON object.
fn parse_params(pairs: &[String]) -> anyhow::Result<Value> {
    let mut params = serde_json::Map::new();
    for pair in pairs {
        let Some((key, raw)) = pair.split_once('=') else {
            bail!("--param {pair:?} must be key=value");
        };
        if key.is_empty() {
            bail!("--param {pair:?} has an empty key");
        }
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        params.insert(key.to_owned(), value);
    }
    Ok(Value::Object(params))
}

async fn run(
    cfg: &BulwarkConfig,
    name: &str,
    params: &[String],
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let params = parse_params(params)?;
    if dry_run {
        let outcome = crate::commands::request(
            cfg,
            subjects::PLAYBOOK_RUN,
            &json!({"playbook": name, "params": params, "dry_run": true}),
        )
        .await?;
        println!("dry run of {name}: reads are real, actions are not taken");
        for step in outcome["steps"].as_array().into_iter().flatten() {
            println!(
                "  step {} {}: {}",
                step["index"],
                step["title"].as_str().unwrap_or("?"),
                if step["ok"] == true { "ok" } else { "FAILED" }
            );
            for call in step["calls"].as_array().into_iter().flatten() {
                let verb = if call["action"] == true {
                    "would call"
                } else {
                    "read"
                };
                println!(
                    "    {verb} {}({}) -> {}",
                    call["function"].as_str().unwrap_or("?"),
                    call["args"],
                    call["result"]
                );
            }
            if let Some(e) = step["error"].as_str() {
                println!("    error: {e}");
            }
        }
        let actions = outcome["actions"].as_array().map_or(0, Vec::len);
        println!("{actions} action(s) would be taken");
        return Ok(if outcome["status"] == "completed" {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }

    let (client, _) = connect::connect(&cfg.nats, "bulwark-cli", Role::Cli).await?;
    let mut events = client
        .subscribe(format!(
            "{}.{}.>",
            subjects::MESH_PREFIX,
            subjects::PLAYBOOK_EVENT_PREFIX
        ))
        .await
        .context("cannot follow mesh.playbook.>")?;
    let started = crate::commands::request(
        cfg,
        subjects::PLAYBOOK_RUN,
        &json!({"playbook": name, "params": params}),
    )
    .await?;
    let run_id = started["run_id"].as_str().unwrap_or_default().to_owned();
    println!("{name}: run {run_id} started on {}", started["resource"]);
    let limit = Duration::from_secs_f64(cfg.playbooks.max_run_s * 2.0 + 10.0);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => bail!("the connection closed before {name} ended"),
            Err(_) => bail!("{name} did not end within {limit:?}"),
        };
        let Ok(event) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        let p = &event["payload"];
        if p["run_id"] != run_id.as_str() {
            continue;
        }
        match event["event_type"].as_str().unwrap_or_default() {
            "playbook.step" => {
                println!(
                    "  step {} {}: {}",
                    p["index"],
                    p["step"].as_str().unwrap_or("?"),
                    if p["ok"] == true { "ok" } else { "FAILED" }
                );
                for call in p["calls"].as_array().into_iter().flatten() {
                    println!(
                        "    {}({}) -> {}",
                        call["function"].as_str().unwrap_or("?"),
                        call["args"],
                        call.get("error").unwrap_or(&call["result"])
                    );
                }
            }
            "playbook.completed" => {
                println!("{name}: completed in {} ms", p["duration_ms"]);
                return Ok(ExitCode::SUCCESS);
            }
            "playbook.failed" => {
                println!(
                    "{name}: FAILED: {}{}",
                    p["error"].as_str().unwrap_or("?"),
                    match p["rollback"].as_bool() {
                        Some(true) => " (rolled back)",
                        Some(false) => " (the rollback failed too)",
                        None => "",
                    }
                );
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_read_json_values_and_fall_back_to_strings() {
        let p = parse_params(&[
            "n=3".into(),
            "rate=2.5".into(),
            "flag=true".into(),
            "name=mesh.x".into(),
            "quoted=\"7\"".into(),
        ])
        .expect("parses");
        assert_eq!(
            p,
            json!({"n": 3, "rate": 2.5, "flag": true, "name": "mesh.x", "quoted": "7"})
        );
        assert!(parse_params(&["novalue".into()]).is_err());
        assert!(parse_params(&["=3".into()]).is_err());
    }
}
