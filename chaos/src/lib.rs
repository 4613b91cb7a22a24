//! bulwark's chaos tool, behind `bulwark chaos`: scenario files that state their steady state,
//! inject real load and faults, name the safeguards that must fire (when, at what value), and a
//! Jepsen-style checker that proves nothing acknowledged was lost, duplicated or unexpected.
//! Every scenario also runs a negative control: the same workload at normal load, under which
//! its safeguards must stay silent.
//!
//! The format is documented in `docs/chaos.md`; the scenarios are in `chaos/scenarios/`.
//!
//! # Modules
//! - [`scenario`]: the file format and its loader (unknown fields, bad values and missing
//!   sections are refused with file, line and reason).
//! - [`checker`]: the pure classification of every id (ok, lost, duplicated, unexpected, still
//!   held).
//! - [`inject`]: the injections (events at a rate, intents with a share invalid, scheduler
//!   pause, worker kills, cascades, service and nats-server restarts).
//! - [`observe`]: the safeguard watchers, the timeline and progress line, the checker's mesh
//!   reader.
//! - [`target`]: the system under test and its steady-state checks.
//! - [`stack`]: the runner's own nats-server and in-process services.
//! - [`cas`]: the `concurrent_writes` injection and its linearizability checker (JEPSEN04).
//! - [`narlog`]: the `narrative_log_audit` injection: clarity's backlog, gaps and duplicates (JEPSEN01).
//! - [`drill`]: the `backup_drill` injection (backups, damage, restores onto a scratch server).
//! - [`fit`]: the FIT injections: `query_status`, `review_intents`, `random_outage`,
//!   `ramp_intents`, and the API tally behind the error rate.
//! - [`runner`]: control, then scenario; verdicts with evidence.
//! - [`report`]: the JSON journal, the Markdown report and its SVG charts.
//! - [`siege`]: the `resource_siege` injection (bounded CPU and memory pressure).
//! - [`autoloop`]: the chaos loop's schedule, scoring, learning record, difficulty and
//!   missing-safeguard reports.
//!
//! # Subjects
//! Produces `mesh.test.*`, `mesh.chaos.*` (the events of `publish_events` and `cascade`),
//! `htm.intent.submit`, `htm.intent.status`, `governance.review.decide`, `scheduler.pause|resume`,
//! `scheduler.replay`, `htm.pool.kill`; reads `htm.readiness`,
//! `storm_guard.status`, `htm.pool.status`, `event_policy.rules`, `$SRV.PING`, the subjects of
//! the expectations (`mesh.event.incident`, `mesh.breaker.*`, `mesh.layer2.*`,
//! `clarity.narrative.*`, ...), `mesh.task.completed`, the `bulwark_intents` bucket and the
//! `BULWARK_MESH` stream (through its own durable consumer `chaos_<run>`, deleted afterwards).

pub mod autoloop;
pub mod cas;
pub mod checker;
pub mod drill;
pub mod fit;
pub mod inject;
pub mod narlog;
pub mod observe;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod siege;
pub mod stack;
pub mod target;

use std::path::{Path, PathBuf};

pub use runner::{Options, ScenarioResult, Verdict};
pub use scenario::{Category, LoadError, Loaded, Scenario};

/// The scenario directory: `chaos/scenarios` below the current directory or one of its
/// ancestors, else the one of the repository this was built from.
pub fn scenarios_dir() -> PathBuf {
    let rel = Path::new("chaos").join("scenarios");
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let p = dir.join(&rel);
            if p.is_dir() {
                return p;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// What to run.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These ids, in this order.
    Ids(Vec<String>),
    /// Every scenario of these categories (all when empty).
    Layers(Vec<Category>),
}

/// Why a selection cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// Some ids do not exist.
    #[error("unknown scenario(s): {unknown}; known: {known}")]
    Unknown {
        /// The unknown ids.
        unknown: String,
        /// Every known id.
        known: String,
    },
    /// Nothing matches.
    #[error("no scenario in {0}")]
    Empty(String),
}

/// The scenarios of `selection` among `all`.
pub fn select(all: &[Loaded], selection: &Selection) -> Result<Vec<Loaded>, SelectError> {
    match selection {
        Selection::Ids(ids) => {
            let unknown: Vec<&str> = ids
                .iter()
                .filter(|id| !all.iter().any(|l| &l.scenario.id == *id))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                return Err(SelectError::Unknown {
                    unknown: unknown.join(", "),
                    known: all
                        .iter()
                        .map(|l| l.scenario.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            Ok(ids
                .iter()
                .filter_map(|id| all.iter().find(|l| &l.scenario.id == id).cloned())
                .collect())
        }
        Selection::Layers(layers) => {
            let chosen: Vec<Loaded> = all
                .iter()
                .filter(|l| layers.is_empty() || layers.contains(&l.scenario.category))
                .cloned()
                .collect();
            if chosen.is_empty() {
                let names: Vec<&str> = layers.iter().map(|c| c.layer_name()).collect();
                return Err(SelectError::Empty(format!("layer {}", names.join(", "))));
            }
            Ok(chosen)
        }
    }
}

/// Runs `scenarios` one after the other.
pub async fn run_all(scenarios: &[Loaded], opts: &Options) -> Vec<ScenarioResult> {
    let mut results = Vec::new();
    for l in scenarios {
        results.push(runner::run_scenario(&l.scenario, opts).await);
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_id_lists_the_known_ones() {
        let all = scenario::load_dir(&scenarios_dir()).expect("scenarios load");
        let err = select(&all, &Selection::Ids(vec!["L2_nope".into()])).expect_err("unknown");
        let text = err.to_string();
        assert!(text.contains("L2_nope"), "{text}");
        assert!(text.contains("L2_trigger_mesh_storm"), "{text}");
        let l2 = select(&all, &Selection::Layers(vec![Category::Layer2])).expect("l2");
        assert_eq!(l2.len(), 5);
    }
}
