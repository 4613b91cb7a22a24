//! The client commands: requests to the services, printed for a person (JSON where the reply is
//! the contract's JSON, a table for the review queue). A service's error reply becomes one line
//! on stderr and exit code 1.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_common::BulwarkConfig;
use bulwark_common::api::ErrorBody;
use bulwark_common::connect::{self, Role};
use bulwark_common::subjects;
use serde_json::{Value, json};

use crate::cli::{Choice, Command, Impact, IntentAction, ReviewAction, SchedulesAction};
use crate::up;

/// Runs `command`.
pub async fn dispatch(
    command: Command,
    cfg: BulwarkConfig,
    url_given: bool,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up { workers } => up::up(cfg, url_given, workers).await,
        Command::Serve { service } => up::serve(service, cfg).await,
        Command::Console => crate::console::run(cfg).await,
        Command::Notify {
            action:
                crate::cli::NotifyAction::Log {
                    limit,
                    kind,
                    outcome,
                    json,
                },
        } => crate::console::notify_log(&cfg, limit, kind, outcome, json).await,
        Command::Intent {
            action:
                IntentAction::Submit {
                    intent_type,
                    actor,
                    payload,
                    priority,
                    id,
                    impacts,
                },
        } => {
            let payload: Value =
                serde_json::from_str(&payload).context("--payload is not valid JSON")?;
            let mut body = json!({"intent_type": intent_type, "actor": actor, "payload": payload});
            if let Some(p) = priority {
                body["priority"] = json!(p);
            }
            if let Some(id) = id {
                body["intent_id"] = json!(id);
            }
            if !impacts.is_empty() {
                let ctx: serde_json::Map<String, Value> = impacts
                    .iter()
                    .map(|i| {
                        let key = match i {
                            Impact::Resilience => "resilience_impact",
                            Impact::Revenue => "revenue_impact",
                            Impact::Autonomy => "autonomy_impact",
                            Impact::Learning => "learning_impact",
                            Impact::Emergency => "emergency",
                        };
                        (key.to_owned(), Value::Bool(true))
                    })
                    .collect();
                body["mission_context"] = Value::Object(ctx);
            }
            print_json(&request(&cfg, subjects::INTENT_SUBMIT, &body).await?)
        }
        Command::Intent {
            action: IntentAction::Status { intent_id },
        } => print_json(
            &request(
                &cfg,
                subjects::INTENT_STATUS,
                &json!({ "intent_id": intent_id }),
            )
            .await?,
        ),
        Command::Intent {
            action: IntentAction::Cancel { intent_id, reason },
        } => print_json(
            &request(
                &cfg,
                subjects::INTENT_CANCEL,
                &json!({ "intent_id": intent_id, "reason": reason }),
            )
            .await?,
        ),
        Command::Review {
            action: ReviewAction::List { json },
        } => {
            let reply = request_all(&cfg, subjects::REVIEW_PENDING).await?;
            if json {
                return print_json(&reply);
            }
            print_reviews(&reply);
            Ok(ExitCode::SUCCESS)
        }
        Command::Review {
            action:
                ReviewAction::Approve {
                    intent_id,
                    reviewer,
                    reason,
                },
        } => decide(&cfg, intent_id, "approve", reviewer, reason).await,
        Command::Review {
            action:
                ReviewAction::Reject {
                    intent_id,
                    reviewer,
                    reason,
                },
        } => decide(&cfg, intent_id, "reject", reviewer, reason).await,
        Command::Vote {
            proposal_id,
            choice,
            voter,
            reason,
        } => {
            let vote = match choice {
                Choice::Approve => "approve",
                Choice::Reject => "reject",
            };
            let (voter, subject) = speaker(&cfg, voter, subjects::VOTE);
            let body =
                json!({"proposal_id": proposal_id, "voter": voter, "vote": vote, "reason": reason});
            print_json(&request(&cfg, &subject, &body).await?)
        }
        Command::Proposals => print_json(&request_all(&cfg, subjects::PROPOSALS_OPEN).await?),
        Command::Schedules {
            action: SchedulesAction::List { next, json },
        } => {
            let list = schedules(&cfg, next);
            if json {
                return print_json(&list);
            }
            for s in list.as_array().into_iter().flatten() {
                println!(
                    "{}  {}  {} as {}  missed={}  next: {}",
                    s["name"].as_str().unwrap_or_default(),
                    s["cron"].as_str().unwrap_or_default(),
                    s["intent_type"].as_str().unwrap_or_default(),
                    s["actor"].as_str().unwrap_or_default(),
                    s["missed"].as_str().unwrap_or_default(),
                    s["next"]
                        .as_array()
                        .map(|n| n
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                );
            }
            if list.as_array().is_none_or(Vec::is_empty) {
                println!("no schedules ([schedules.<name>] in bulwark.toml; docs/actions.md)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Narratives(args) => crate::narratives::narratives(&cfg, args).await,
        Command::Audit { action } => crate::narratives::audit(&cfg, action).await,
        Command::Status { json } => crate::status::status(&cfg, json).await,
        Command::Playbook { action } => crate::playbook::playbook(&cfg, action).await,
        Command::Chaos { action } => crate::chaos::chaos(action, cfg, url_given).await,
        Command::Backup(args) => crate::backup::run_backup(cfg, args).await,
        Command::Restore(args) => crate::backup::run_restore(cfg, args).await,
    }
}

async fn decide(
    cfg: &BulwarkConfig,
    intent_id: String,
    decision: &str,
    reviewer: Option<String>,
    reason: String,
) -> anyhow::Result<ExitCode> {
    let (reviewer, subject) = speaker(cfg, reviewer, subjects::REVIEW_DECIDE);
    let body = json!({"intent_id": intent_id, "decision": decision, "reviewer": reviewer, "reason": reason});
    print_json(&request(cfg, &subject, &body).await?)
}

/// Who speaks (the named reviewer or voter, else the CLI's own NATS user) and where: on the
/// per-identity subject when that is the CLI's own user, so the server vouches for the name; on
/// the plain subject when naming someone else (only users nats.conf lets publish it, and only
/// for names not in governance.bound_identities).
fn speaker(cfg: &BulwarkConfig, named: Option<String>, plain: &str) -> (String, String) {
    let me = &cfg.nats.cli_user;
    let name = named.unwrap_or_else(|| me.clone());
    let subject = if !me.is_empty() && name == *me {
        subjects::as_identity(plain, me)
    } else {
        plain.to_owned()
    };
    (name, subject)
}

/// Sends `body` to `subject` as the operator and returns the reply; an error reply is an error.
/// Every item of a paged list (`{"items", "next", "total"}`), page after page, as one
/// `{"items": [...], "total": N}`.
pub(crate) async fn request_all(cfg: &BulwarkConfig, subject: &str) -> anyhow::Result<Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let body = json!({"limit": bulwark_common::page::MAX_LIMIT, "after": after});
        let page = request(cfg, subject, &body).await?;
        if let Some(list) = page["items"].as_array() {
            items.extend(list.iter().cloned());
        }
        match page["next"].as_str() {
            Some(next) if Some(next) != after.as_deref() => after = Some(next.to_owned()),
            _ => return Ok(json!({"items": items, "total": page["total"]})),
        }
    }
}

pub(crate) async fn request(
    cfg: &BulwarkConfig,
    subject: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let (client, stats) = connect::connect(&cfg.nats, "bulwark-cli", Role::Cli).await?;
    let timeout = Duration::from_millis(cfg.nats.request_timeout_ms);
    let reply = match tokio::time::timeout(
        timeout,
        client.request(subject.to_owned(), body.to_string().into()),
    )
    .await
    {
        // The server reports a refused publish only asynchronously; the request then times out.
        Err(_) | Ok(Err(_)) if stats.server_errors.load(Ordering::Relaxed) > 0 => bail!(
            "the NATS server refused {subject} for user {:?}: a permissions violation (nats.conf; see docs/security.md)",
            cfg.nats.cli_user
        ),
        Err(_) => bail!(
            "no reply on {subject} within {} ms: is bulwark running (bulwark up)?",
            timeout.as_millis()
        ),
        Ok(Err(err)) => match err.kind() {
            async_nats::client::RequestErrorKind::NoResponders => {
                bail!("nothing serves {subject}: is bulwark running (bulwark up)?")
            }
            _ => bail!("request on {subject} failed: {err}"),
        },
        Ok(Ok(reply)) => reply,
    };
    let value: Value = serde_json::from_slice(&reply.payload)
        .with_context(|| format!("{subject} replied with something that is not JSON"))?;
    if let Ok(err) = serde_json::from_value::<ErrorBody>(value.clone()) {
        bail!("{}: {}", err.error.code, err.error.message);
    }
    Ok(value)
}

/// Every configured schedule with its next `count` runs.
fn schedules(cfg: &BulwarkConfig, count: usize) -> Value {
    let now = jiff::Timestamp::now();
    let list: Vec<Value> = cfg
        .schedules
        .iter()
        .map(|(name, s)| {
            let mut next = Vec::new();
            if let Ok(cron) = s.validate(name) {
                let mut after = now;
                while next.len() < count {
                    let Some(t) = cron.next_after(after) else {
                        break;
                    };
                    next.push(bulwark_common::time::format(t));
                    after = t;
                }
            }
            json!({"name": name, "cron": s.cron, "intent_type": s.intent_type, "actor": s.actor,
                   "missed": s.missed, "next": next})
        })
        .collect();
    Value::Array(list)
}

fn print_json(value: &Value) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(ExitCode::SUCCESS)
}

fn print_reviews(reply: &Value) {
    let items = reply["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("The review queue is empty.");
        return;
    }
    println!(
        "{:<38} {:<15} {:<9} {:<4} {:<20} {:<16} CREATED",
        "INTENT", "KIND", "DECIDE?", "TIER", "TYPE", "ACTOR"
    );
    for item in &items {
        let s = |k: &str| item[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<38} {:<15} {:<9} {:<4} {:<20} {:<16} {}",
            s("intent_id"),
            s("kind"),
            if item["requires_decision"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "record"
            },
            item["autonomy_tier"]
                .as_u64()
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            s("intent_type"),
            s("actor"),
            s("created_at"),
        );
    }
    println!(
        "{} item(s); decide with: bulwark review approve|reject <intent> --reviewer <name>",
        items.len()
    );
}
