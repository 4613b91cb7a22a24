//! The command line (CONTRACT section 6).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// bulwark: the safety and orchestration layer for a fleet of autonomous agents.
#[derive(Debug, Parser)]
#[command(name = "bulwark", version, about)]
pub struct Cli {
    /// NATS server URL, or a comma-separated list of cluster seed URLs
    /// [default: the config's nats.url, nats://127.0.0.1:4222].
    #[arg(long, global = true, env = "BULWARK_NATS_URL")]
    pub nats_url: Option<String>,
    /// Configuration file [default: ./bulwark.toml when present].
    #[arg(long, global = true, env = "BULWARK_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a local nats-server (unless --nats-url reaches one) and every service; Ctrl-C stops.
    Up {
        /// HTM workers to run in this process [default: the config's worker.count, 3].
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Run one service (for several processes or machines).
    Serve {
        /// The service to run.
        service: ServiceName,
    },
    /// Serve the web console (console.listen) for a running bulwark; Ctrl-C stops.
    Console,
    /// Webhook notifications: the delivery log.
    Notify {
        /// What to do.
        #[command(subcommand)]
        action: NotifyAction,
    },
    /// Submit intents and read their status.
    Intent {
        /// What to do with intents.
        #[command(subcommand)]
        action: IntentAction,
    },
    /// The human review queue.
    Review {
        /// What to do with the queue.
        #[command(subcommand)]
        action: ReviewAction,
    },
    /// Vote on a unified logic proposal (a tier 3 intent).
    Vote {
        /// The proposal (the intent id).
        proposal_id: String,
        /// Approve or reject.
        choice: Choice,
        /// The voter's name (one of governance.voters.names); default: the NATS user the CLI
        /// connects as (nats.cli_user). Voting as that user goes through
        /// `unified_logic.vote.<user>`, so the server vouches for the voter (docs/security.md).
        #[arg(long)]
        voter: Option<String>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the open unified logic proposals.
    Proposals,
    /// The schedules of the configuration (`[schedules.<name>]`) and their next runs.
    Schedules {
        /// What to do with the schedules.
        #[command(subcommand)]
        action: SchedulesAction,
    },
    /// Show stored 5W1H narratives (newest last), optionally following new ones.
    Narratives(crate::narratives::NarrativesArgs),
    /// The audit chain of narratives.
    Audit {
        /// What to do with the chain.
        #[command(subcommand)]
        action: crate::narratives::AuditAction,
    },
    /// The watchdog's Layer 2 report as a table; exit 0 when healthy, 1 when degraded, critical
    /// or the watchdog does not answer.
    Status {
        /// Print the raw report (CONTRACT section 5).
        #[arg(long)]
        json: bool,
    },
    /// Playbooks: list them with their last run, check they compile, run one.
    Playbook {
        /// What to do.
        #[command(subcommand)]
        action: crate::playbook::PlaybookAction,
    },
    /// Chaos scenarios: real load and faults, the safeguards that must fire, nothing lost.
    Chaos {
        /// What to do.
        #[command(subcommand)]
        action: crate::chaos::ChaosAction,
    },
    /// Back up bulwark's streams and KV buckets (JetStream snapshots and a verified manifest).
    Backup(crate::backup::BackupArgs),
    /// Restore a backup (verified first; a corrupt or truncated one is refused).
    Restore(crate::backup::RestoreArgs),
}

impl Command {
    /// True for the long-running commands (they log at info by default).
    pub fn is_service(&self) -> bool {
        matches!(
            self,
            Command::Up { .. } | Command::Serve { .. } | Command::Console
        )
    }
}

/// The services `bulwark serve` can run.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ServiceName {
    /// Intent governance: tiers, review queue, votes.
    Governance,
    /// Clarity: the hash-chained audit of narratives, query and verify.
    Clarity,
    /// Storm guard: per-type storm detection and the mesh circuit breaker.
    #[value(name = "storm_guard")]
    StormGuard,
    /// The event policy engine: policy rules over mesh events, cascade limits.
    #[value(name = "event_policy_engine")]
    EventPolicyEngine,
    /// The HTM scheduler: dispatch, worker watchdog, shedding, pause/resume.
    Scheduler,
    /// One HTM worker with a generated id (run several for more capacity).
    #[value(name = "htm_worker")]
    HtmWorker,
    /// A pool of `worker.count` HTM workers under a supervisor that respawns them.
    #[value(name = "htm_pool")]
    HtmPool,
    /// The Layer 2 watchdog: health report and alerts from telemetry, pings and readiness.
    Watchdog,
    /// Playbooks: incidents start sandboxed Rhai remediation scripts.
    Playbooks,
    /// Notifications: webhooks for reviews, votes, Layer 2 alerts, playbooks and the breaker.
    Notify,
}

/// Schedule subcommands.
#[derive(Debug, Subcommand)]
pub enum SchedulesAction {
    /// Every schedule of the configuration with its next runs (UTC), computed from the
    /// configuration this command loads (no NATS needed).
    List {
        /// How many next runs to show per schedule.
        #[arg(long, default_value_t = 3)]
        next: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Intent subcommands.
#[derive(Debug, Subcommand)]
pub enum IntentAction {
    /// Submit an intent; prints the decision.
    Submit {
        /// The intent type (e.g. query_knowledge, self_improve).
        intent_type: String,
        /// Who is asking.
        #[arg(long, default_value = "cli")]
        actor: String,
        /// The payload, a JSON object.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Priority 0-9 (9 most urgent).
        #[arg(long)]
        priority: Option<u8>,
        /// Idempotency key; resubmitting it returns the first decision.
        #[arg(long)]
        id: Option<String>,
        /// Mission context flags, e.g. --impact resilience --impact learning (or emergency).
        #[arg(long = "impact", value_enum)]
        impacts: Vec<Impact>,
    },
    /// Show an intent's status and history.
    Status {
        /// The intent id.
        intent_id: String,
    },
    /// Cancel an intent that has not finished: a queued task never runs, a running action is
    /// aborted (docs/actions.md#cancellation).
    Cancel {
        /// The intent id.
        intent_id: String,
        /// Why, recorded in the intent's history.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Mission pillars (and emergency) for `--impact`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Impact {
    /// resilience_impact
    Resilience,
    /// revenue_impact
    Revenue,
    /// autonomy_impact
    Autonomy,
    /// learning_impact
    Learning,
    /// emergency
    Emergency,
}

/// Review subcommands.
#[derive(Debug, Subcommand)]
pub enum ReviewAction {
    /// List the review queue.
    List {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending intent (it is queued) or acknowledge a review record.
    Approve {
        /// The intent id.
        intent_id: String,
        /// Who decides; default: the NATS user the CLI connects as (nats.cli_user). Deciding as
        /// that user goes through `governance.review.decide.<user>` (docs/security.md).
        #[arg(long)]
        reviewer: Option<String>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Reject a pending intent (it never runs) or flag a review record.
    Reject {
        /// The intent id.
        intent_id: String,
        /// Who decides; default: the NATS user the CLI connects as (nats.cli_user). Deciding as
        /// that user goes through `governance.review.decide.<user>` (docs/security.md).
        #[arg(long)]
        reviewer: Option<String>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Notify subcommands.
#[derive(Debug, Subcommand)]
pub enum NotifyAction {
    /// The newest deliveries (oldest first): webhook, kind, outcome, attempts, last error.
    Log {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Only this kind (review_pending, breaker_opened, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Only this outcome (delivered, dead_letter).
        #[arg(long)]
        outcome: Option<String>,
        /// Print the raw reply.
        #[arg(long)]
        json: bool,
    },
}

/// A vote.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Choice {
    /// For.
    Approve,
    /// Against.
    Reject,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
