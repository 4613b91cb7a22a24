//! `bulwark backup` and `bulwark restore`: the thin CLI over [`bulwark_common::backup`].
//!
//! Both connect with the service credentials (`nats.user`/`nats.password`): the operator user
//! may not take or restore JetStream snapshots (nats.conf).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use bulwark_common::BulwarkConfig;
use bulwark_common::backup;
use bulwark_common::connect::{self, Role};
use clap::Args;

/// Where backups go when `--dir` is not given.
pub const DEFAULT_DIR: &str = "data/backups";

/// `bulwark backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The directory backups are written under (one timestamped directory each).
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
}

/// `bulwark restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup directory to restore (as printed by `bulwark backup`).
    #[arg(conflicts_with = "latest", required_unless_present = "latest")]
    pub backup: Option<PathBuf>,
    /// Restore the newest backup under --dir that verifies, skipping (and naming) corrupt ones.
    #[arg(long)]
    pub latest: bool,
    /// The directory --latest looks in.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Delete bulwark's streams that exist on the server before restoring them (stop bulwark's
    /// services first). Without it an existing stream is refused.
    #[arg(long)]
    pub replace: bool,
    /// With --replace: accept a backup older than the server's streams (a rollback: whatever
    /// happened after the backup is lost, and tasks completed since may run again). Without it,
    /// a rollback is refused naming each stream and both sequences.
    #[arg(long, requires = "replace")]
    pub allow_rollback: bool,
    /// Only verify the backup; touch nothing.
    #[arg(long)]
    pub verify_only: bool,
}

async fn client(cfg: &BulwarkConfig) -> anyhow::Result<async_nats::Client> {
    let mut nats = cfg.nats.clone();
    nats.cli_user = nats.user.clone();
    nats.cli_password = nats.password.clone();
    nats.cli_token = nats.token.clone();
    let (client, _) = connect::connect(&nats, "bulwark-backup", Role::Cli).await?;
    Ok(client)
}

/// `bulwark backup`: prints the new backup's directory and a line per stream.
pub async fn run_backup(cfg: BulwarkConfig, args: BackupArgs) -> anyhow::Result<ExitCode> {
    let client = client(&cfg).await?;
    let (dir, manifest) = backup::backup(&client, &args.dir).await?;
    for s in &manifest.streams {
        println!(
            "{:<28} {:>9} messages  last seq {:>9}  {:>10} bytes  sha256 {}",
            s.stream,
            s.messages,
            s.last_seq,
            s.bytes,
            &s.sha256[..16]
        );
    }
    println!("{}", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn pick(args: &RestoreArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.backup {
        backup::verify(dir)?;
        return Ok(dir.clone());
    }
    let (dir, _, skipped) = backup::latest_good(Path::new(&args.dir))?;
    for err in skipped {
        eprintln!("bulwark: skipped: {err}");
    }
    Ok(dir)
}

/// `bulwark restore`: verifies, then restores; exit 1 naming the file when the backup does not
/// verify.
pub async fn run_restore(cfg: BulwarkConfig, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let dir = pick(&args)?;
    if args.verify_only {
        println!("{} verifies", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let client = client(&cfg).await?;
    let outcome = backup::restore_with(&client, &dir, args.replace, args.allow_rollback).await?;
    let restored = &outcome.streams;
    if restored.is_empty() {
        bail!("{} holds no streams", dir.display());
    }
    for r in restored {
        println!(
            "{:<28} {:>9} messages  last seq {:>9}{}",
            r.stream,
            r.messages,
            r.last_seq,
            if r.replaced { "  (replaced)" } else { "" }
        );
        if (r.messages, r.last_seq) != (r.manifest_messages, r.manifest_last_seq) {
            println!(
                "{:<28} note: the manifest says {} messages up to {} (the stream changed while the backup was taken)",
                "", r.manifest_messages, r.manifest_last_seq
            );
        }
    }
    for regression in &outcome.regressions {
        println!("rolled back: {regression} (accepted with --allow-rollback)");
    }
    if let Some(r) = &outcome.reconciliation {
        println!(
            "reconciled: {} intent records read before the rollback; {} carried forward ({} finished, not run again; {} queued again)",
            r.examined, r.carried_forward, r.finished_kept, r.requeued
        );
    }
    println!("restored {}", dir.display());
    Ok(ExitCode::SUCCESS)
}
