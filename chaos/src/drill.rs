//! The `backup_drill` injection: backups of the running system, the newest damaged, restores
//! onto a scratch nats-server exactly as `bulwark restore` does ([`bulwark_common::backup`]),
//! and the audit chain verified there by a clarity started on the restored data.
//!
//! Narratives, on `clarity.narrative.backup` of the system under test (the expectations'
//! evidence): `backup_taken` (per backup: streams, audit records, last audit sequence),
//! `restore_refused` (the named backup did not verify: `context.file`, `context.reason`),
//! `backup_skipped` (`--latest` passed over a backup that does not verify) and
//! `restore_completed` (`context.from_newest`, `context.chain_ok`, `context.audit_records`,
//! `context.streams`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_common::backup::{self, BackupError};
use bulwark_common::connect::{self, Role};
use bulwark_common::{streams, subjects, time};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::scenario::BackupDamage;
use crate::stack::NatsProcess;
use crate::target::Target;

/// What the drill asks.
#[derive(Debug, Clone, Copy)]
pub struct DrillPlan {
    /// Backups taken.
    pub backups: u64,
    /// Seconds between two.
    pub interval_s: f64,
    /// What is done to the newest.
    pub damage: BackupDamage,
    /// Then restore the oldest over the restored one (a rollback when they differ).
    pub rollback: bool,
}

async fn narrate(target: &Target, what: &str, why: &str, context: Value) {
    let body = json!({
        "who": "backup", "what": what, "when": time::now(), "where": "bulwark-chaos",
        "why": [why], "how": "JetStream snapshot API, manifest with SHA-256 per file",
        "context": context,
    });
    if let Ok(ack) = target
        .js
        .publish(subjects::narrative("backup"), body.to_string().into())
        .await
    {
        let _ = ack.await;
    }
}

/// Damages the backup in `dir` as `damage` says; returns the file damaged.
pub fn damage(dir: &Path, damage: BackupDamage) -> anyhow::Result<Option<String>> {
    let (file, cut) = match damage {
        BackupDamage::None => return Ok(None),
        BackupDamage::Corrupt => (format!("{}.snap", streams::AUDIT_STREAM), false),
        BackupDamage::Truncate => ("KV_bulwark_intents.snap".to_owned(), true),
    };
    let path = dir.join(&file);
    let mut data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if data.is_empty() {
        bail!("{} is empty: nothing to damage", path.display());
    }
    if cut {
        data.truncate(data.len() / 2);
    } else {
        let mid = data.len() / 2;
        data[mid] ^= 0x55;
    }
    std::fs::write(&path, data)?;
    Ok(Some(file))
}

fn nats_binary_and_conf(target: &Target) -> anyhow::Result<(PathBuf, PathBuf)> {
    let binary = bulwark_common::nats_server::find_binary(&target.cfg.up.nats_server)
        .context("no nats-server for the scratch server: run scripts/setup")?;
    let conf = target.cfg.up.nats_conf.clone();
    let conf = if conf.exists() {
        conf
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(|p| p.join(&conf))
            .filter(|p| p.exists())
            .with_context(|| format!("nats-server config {} not found", conf.display()))?
    };
    Ok((binary, conf))
}

/// Starts clarity on the scratch server, asks `clarity.verify`, stops it.
async fn verify_chain(cfg: &bulwark_common::BulwarkConfig) -> anyhow::Result<Value> {
    let (client, _) = connect::connect(&cfg.nats, "chaos-drill-clarity", Role::Service).await?;
    let token = CancellationToken::new();
    let service = tokio::spawn(bulwark_clarity::run(cfg.clone(), client, token.clone()));
    let (probe, _) = connect::connect(&cfg.nats, "chaos-drill-probe", Role::Service).await?;
    let ready = bulwark_common::micro::wait_ready(&probe, "clarity", Duration::from_secs(30)).await;
    let result = async {
        if !ready {
            bail!("clarity did not become ready on the scratch server");
        }
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            probe.request(subjects::CLARITY_VERIFY, "{}".into()),
        )
        .await
        .context("clarity.verify did not answer within 30 s")??;
        Ok(serde_json::from_slice::<Value>(&reply.payload)?)
    }
    .await;
    token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), service).await;
    let _ = probe.drain().await;
    result
}

/// Runs the drill; returns its figures.
pub async fn run(target: &Target, plan: DrillPlan) -> anyhow::Result<Value> {
    let root = tempfile::Builder::new()
        .prefix("bulwark-chaos-backups-")
        .tempdir()?;
    let mut taken = Vec::new();
    for i in 0..plan.backups {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs_f64(plan.interval_s)).await;
        }
        let (dir, manifest) = backup::backup(&target.client, root.path()).await?;
        let audit = manifest.stream(streams::AUDIT_STREAM);
        let context = json!({
            "n": i + 1,
            "dir": dir.file_name().map(|f| f.to_string_lossy().into_owned()),
            "streams": manifest.streams.len(),
            "audit_records": audit.map(|a| a.messages).unwrap_or(0),
            "audit_last_seq": audit.map(|a| a.last_seq).unwrap_or(0),
            "bytes": manifest.streams.iter().map(|s| s.bytes).sum::<u64>(),
        });
        narrate(target, "backup_taken", "scheduled backup", context.clone()).await;
        taken.push((dir, context));
    }
    let newest = taken
        .last()
        .map(|(d, _)| d.clone())
        .context("no backup taken")?;
    let damaged = tokio::task::block_in_place(|| damage(&newest, plan.damage))?;

    let (binary, conf) = nats_binary_and_conf(target)?;
    let scratch = tokio::task::block_in_place(|| NatsProcess::start(&binary, &conf))?;
    let mut cfg = target.cfg.clone();
    cfg.nats.url = scratch.url();
    let (client, _) = connect::connect(&cfg.nats, "chaos-drill-restore", Role::Service).await?;

    // 1. `bulwark restore <newest>`.
    let mut refused = None;
    let mut restored_newest = false;
    match backup::restore(&client, &newest, false).await {
        Ok(_) => restored_newest = true,
        Err(BackupError::Corrupt { file, reason, .. }) => {
            narrate(
                target,
                "restore_refused",
                "the backup does not verify against its manifest",
                json!({"backup": newest.file_name().map(|f| f.to_string_lossy().into_owned()),
                       "file": file, "reason": reason}),
            )
            .await;
            refused = Some(json!({"file": file, "reason": reason}));
        }
        Err(other) => return Err(other.into()),
    }
    // 2. `bulwark restore --latest --replace`.
    let (picked, manifest, skipped) = backup::latest_good(root.path())?;
    for err in &skipped {
        let file = match err {
            BackupError::Corrupt { file, .. } => file.clone(),
            _ => String::new(),
        };
        narrate(
            target,
            "backup_skipped",
            "--latest passes over a backup that does not verify",
            json!({"file": file, "reason": err.to_string()}),
        )
        .await;
    }
    let from_newest = picked == newest;
    if !(restored_newest && from_newest) {
        backup::restore(&client, &picked, true).await?;
    }
    let _ = client.drain().await;
    // 3. The audit chain on the restored data.
    let report = verify_chain(&cfg).await?;
    let audit = manifest.stream(streams::AUDIT_STREAM);
    let chain_ok = report["ok"] == true
        && report["records"].as_u64() == Some(audit.map(|a| a.messages).unwrap_or(0));
    let context = json!({
        "backup": picked.file_name().map(|f| f.to_string_lossy().into_owned()),
        "from_newest": from_newest,
        "skipped": skipped.len(),
        "streams": manifest.streams.len(),
        "audit_records": report["records"],
        "audit_records_in_backup": audit.map(|a| a.messages).unwrap_or(0),
        "chain_ok": chain_ok,
        "first_bad_seq": report["first_bad_seq"],
    });
    narrate(
        target,
        "restore_completed",
        "restored onto a scratch server and verified the audit chain",
        context.clone(),
    )
    .await;
    // 4. JEPSEN03: the oldest backup restored over the newer state.
    let mut rollback = Value::Null;
    if plan.rollback
        && let Some((oldest, _)) = taken.first()
    {
        let (client, _) =
            connect::connect(&cfg.nats, "chaos-drill-rollback", Role::Service).await?;
        match backup::restore(&client, oldest, true).await {
            Err(BackupError::Rollback(streams)) => {
                narrate(
                    target,
                    "restore_rollback_refused",
                    "the backup is older than the server's streams: restoring it would roll them back",
                    json!({"backup": oldest.file_name().map(|f| f.to_string_lossy().into_owned()),
                           "streams": streams.len(), "regressions": streams}),
                )
                .await;
                // The operator accepts the loss (`--allow-rollback`): the intent records are
                // reconciled; none may end up knowing less than before the rollback.
                let before = bulwark_common::rollback::read_ledger(&js_of(&client)).await?;
                let outcome = backup::restore_with(&client, oldest, true, true).await?;
                let after = bulwark_common::rollback::read_ledger(&js_of(&client)).await?;
                let now = after.progress();
                let regressed = before
                    .progress()
                    .iter()
                    .filter(|(id, len)| now.get(*id).is_none_or(|n| n < *len))
                    .count();
                let r = outcome.reconciliation.unwrap_or_default();
                narrate(
                    target,
                    "restore_rollback_reconciled",
                    "rollback accepted (--allow-rollback); intent records read before, carried forward after",
                    json!({"examined": r.examined, "carried_forward": r.carried_forward,
                           "finished_kept": r.finished_kept, "requeued": r.requeued,
                           "regressed": regressed, "streams": outcome.regressions.len()}),
                )
                .await;
                rollback = json!({"refused": true, "regressions": streams,
                                  "reconciled": {"examined": r.examined, "carried_forward": r.carried_forward,
                                                 "finished_kept": r.finished_kept, "requeued": r.requeued,
                                                 "regressed": regressed}});
            }
            Ok(restored) => {
                narrate(
                    target,
                    "restore_replaced",
                    "the backup replaced streams no further on than it",
                    json!({"streams": restored.len()}),
                )
                .await;
                rollback = json!({"refused": false, "streams": restored.len()});
            }
            Err(other) => return Err(other.into()),
        }
        let _ = client.drain().await;
    }
    drop(scratch);
    Ok(json!({
        "rollback": rollback,
        "backups": taken.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>(),
        "damage": format!("{:?}", plan.damage).to_lowercase(),
        "damaged_file": damaged,
        "refused": refused,
        "restore": context,
        "verify": report,
    }))
}

fn js_of(client: &async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(client.clone())
}
