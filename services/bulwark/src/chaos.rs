//! `bulwark chaos list|run|loop`: the chaos tool (crate `bulwark-chaos`) from the command line.
//! Self-contained unless `--nats-url` is given: then it runs against that bulwark. Exit 0 only
//! when every scenario run passed; 1 when one FAILED; 3 when none failed but one was
//! INCONCLUSIVE (its method did not reach what it meant to: a defect of the test design, not a
//! finding about the system); 2 for a bad scenario file or an unknown id.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulwark_chaos::{Category, Options, Selection, Verdict, report, scenario};
use bulwark_common::BulwarkConfig;
use clap::{Args, Subcommand, ValueEnum};

/// `bulwark chaos` subcommands.
#[derive(Debug, Subcommand)]
pub enum ChaosAction {
    /// List the scenarios (a file with an error is reported and the command exits 2).
    List {
        /// Print the scenarios as JSON.
        #[arg(long)]
        json: bool,
        /// Print the event policy rules the cascade scenarios need (to add to a running
        /// bulwark's policies directory before `--nats-url` runs).
        #[arg(long)]
        rules: bool,
        /// Scenario directory [default: chaos/scenarios].
        #[arg(long)]
        scenarios: Option<PathBuf>,
    },
    /// Run scenarios by id, or by layer; exit 0 only when every one passed, 1 when one
    /// failed, 3 when none failed but one was INCONCLUSIVE (a defect of the test design).
    Run(RunArgs),
    /// The autonomous loop: at each slot of the schedule, run the scenarios the learning
    /// record scores highest, at their difficulty; record the outcome; write missing-safeguard
    /// reports with playbook skeletons (never enabled). Until Ctrl-C, or one slot with `--once`.
    Loop(LoopArgs),
}

/// What `chaos loop` runs and how.
#[derive(Debug, Args)]
pub struct LoopArgs {
    /// Run the next slot now, once, and exit (0 when every scenario passed).
    #[arg(long)]
    pub once: bool,
    /// Daily slots, local time, as HH:MM=SEVERITY[,...] [default: the seed's
    /// 02:00=2,08:00=3,12:00=4,18:00=5,23:00=5]. Also `BULWARK_CHAOS_SCHEDULE`.
    #[arg(long, env = "BULWARK_CHAOS_SCHEDULE", default_value = "")]
    pub schedule: String,
    /// Scenarios per slot (the seed's 3).
    #[arg(long, default_value_t = 3)]
    pub top: usize,
    /// Where the learning record lives [default: chaos/state/].
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Only these layers (repeatable; default all).
    #[arg(long, value_enum)]
    pub layer: Vec<Layer>,
    /// Shortened scenarios (the difficulty still applies).
    #[arg(long)]
    pub quick: bool,
    /// Seed of every random choice of the first slot (the next ones count up from it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Report directory root [default: chaos/reports/]; each slot writes `loop-<timestamp>/`.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Scenario directory [default: chaos/scenarios].
    #[arg(long)]
    pub scenarios: Option<PathBuf>,
}

/// What `chaos run` runs and how.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scenario ids.
    pub ids: Vec<String>,
    /// Every scenario of a layer (repeatable).
    #[arg(long, value_enum)]
    pub layer: Vec<Layer>,
    /// The same scenarios with shortened durations (CI).
    #[arg(long)]
    pub quick: bool,
    /// Seed of every random choice (printed by each run, for replay).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Report directory (default: `chaos/reports/<timestamp>/`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Scenario directory [default: chaos/scenarios].
    #[arg(long)]
    pub scenarios: Option<PathBuf>,
}

/// `--layer`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Layer {
    /// Layer 2 orchestration.
    L2,
    /// Disaster recovery.
    Dirt,
    /// Failure injection.
    Fit,
    /// Consistency.
    Jepsen,
    /// Every scenario.
    All,
}

/// Runs `action`.
pub async fn chaos(
    action: ChaosAction,
    cfg: BulwarkConfig,
    url_given: bool,
) -> anyhow::Result<ExitCode> {
    match action {
        ChaosAction::List {
            json,
            rules,
            scenarios,
        } => list(scenarios, json, rules),
        ChaosAction::Run(args) => {
            let (code, _) = run(&args, &cfg, url_given).await?;
            Ok(code)
        }
        ChaosAction::Loop(args) => chaos_loop(&args, &cfg, url_given).await,
    }
}

fn load(dir: Option<PathBuf>) -> Result<Vec<scenario::Loaded>, ExitCode> {
    let dir = dir.unwrap_or_else(bulwark_chaos::scenarios_dir);
    scenario::load_dir(&dir).map_err(|errors| {
        for e in errors {
            eprintln!("bulwark: {e}");
        }
        ExitCode::from(2)
    })
}

fn list(dir: Option<PathBuf>, json: bool, rules: bool) -> anyhow::Result<ExitCode> {
    let all = match load(dir) {
        Ok(all) => all,
        Err(code) => return Ok(code),
    };
    if rules {
        for l in &all {
            for i in l.scenario.method.iter().chain(&l.scenario.control.method) {
                if let scenario::Injection::Cascade {
                    tag,
                    fan_out,
                    depth,
                    ..
                } = i
                {
                    print!(
                        "# {}\n{}",
                        l.scenario.id,
                        bulwark_chaos::inject::cascade_rule(tag, fan_out.0, depth.map(|d| d.0))
                    );
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        let items: Vec<_> = all.iter().map(|l| &l.scenario).collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<34} {:<7} {:<4} {:>8}  SAFEGUARDS",
        "SCENARIO", "LAYER", "SEV", "MAX"
    );
    for l in &all {
        let s = &l.scenario;
        let safeguards: Vec<&str> = s
            .expectations
            .iter()
            .map(|e| e.safeguard.as_str())
            .collect();
        println!(
            "{:<34} {:<7} {:<4} {:>7.0}s  {}",
            s.id,
            s.category.layer_name(),
            s.severity.0,
            s.recovery_limit_s.0,
            safeguards.join(", ")
        );
    }
    println!(
        "{} scenario(s); run with: bulwark chaos run <id>... | --layer l2|dirt|fit|jepsen|all [--quick]",
        all.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn run(
    args: &RunArgs,
    cfg: &BulwarkConfig,
    url_given: bool,
) -> anyhow::Result<(ExitCode, bool)> {
    let all = match load(args.scenarios.clone()) {
        Ok(all) => all,
        Err(code) => return Ok((code, false)),
    };
    let selection = if !args.ids.is_empty() {
        Selection::Ids(args.ids.clone())
    } else if args.layer.is_empty() {
        eprintln!("bulwark: name scenario ids or a --layer (bulwark chaos list shows them)");
        return Ok((ExitCode::from(2), false));
    } else if args.layer.contains(&Layer::All) {
        Selection::Layers(Vec::new())
    } else {
        Selection::Layers(
            args.layer
                .iter()
                .map(|l| match l {
                    Layer::L2 | Layer::All => Category::Layer2,
                    Layer::Dirt => Category::Dirt,
                    Layer::Fit => Category::Fit,
                    Layer::Jepsen => Category::Jepsen,
                })
                .collect(),
        )
    };
    let chosen = match bulwark_chaos::select(&all, &selection) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulwark: {e}");
            return Ok((ExitCode::from(2), false));
        }
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let opts = Options {
        external: url_given,
        quick: args.quick,
        seed,
        cfg: cfg.clone(),
    };
    let mut command = String::from("bulwark chaos run");
    for l in &chosen {
        command.push(' ');
        command.push_str(&l.scenario.id);
    }
    if args.quick {
        command.push_str(" --quick");
    }
    command.push_str(&format!(" --seed {seed}"));
    if url_given {
        // Credentials in the URL stay out of the report (give them again to reproduce).
        command.push_str(&format!(
            " --nats-url {}",
            bulwark_common::connect::redact_url(&cfg.nats.url)
        ));
    }
    eprintln!(
        "chaos: {} scenario(s), {}{}, seed {seed}",
        chosen.len(),
        if url_given {
            format!(
                "against {}",
                bulwark_common::connect::redact_url(&cfg.nats.url)
            )
        } else {
            "self-contained".to_owned()
        },
        if args.quick { ", quick" } else { "" }
    );
    let results = bulwark_chaos::run_all(&chosen, &opts).await;
    let dir = args.report.clone().unwrap_or_else(|| {
        let stamp = bulwark_common::time::now().replace(':', "-");
        bulwark_chaos::scenarios_dir()
            .parent()
            .map(|p| p.join("reports"))
            .unwrap_or_else(|| PathBuf::from("chaos/reports"))
            .join(stamp)
    });
    let written = report::write(&dir, &results, &command)?;
    println!();
    for r in &results {
        println!("{:<34} {}", r.id, r.verdict.as_str());
        for phase in [&r.scenario, &r.control] {
            if phase.verdict != Verdict::Pass {
                for reason in &phase.reasons {
                    println!(
                        "    {} {} because: {reason}",
                        phase.phase,
                        phase.verdict.as_str()
                    );
                }
            }
        }
        for line in &r.scenario.evidence {
            println!("    {line}");
        }
    }
    let passed = results.iter().all(|r| r.verdict == Verdict::Pass);
    println!(
        "\n{} of {} passed; report {} (journal {})",
        results
            .iter()
            .filter(|r| r.verdict == Verdict::Pass)
            .count(),
        results.len(),
        written.report.display(),
        written.journal.display()
    );
    Ok((run_exit_code(&results), passed))
}

/// The exit code of `chaos run`: 0 when every scenario passed, 1 when one FAILED, 3 when none
/// failed but one was INCONCLUSIVE, named as a defect of the test design.
fn run_exit_code(results: &[bulwark_chaos::ScenarioResult]) -> ExitCode {
    if results.iter().any(|r| r.verdict == Verdict::Fail) {
        return ExitCode::FAILURE;
    }
    let inconclusive: Vec<&str> = results
        .iter()
        .filter(|r| r.verdict == Verdict::Inconclusive)
        .map(|r| r.id.as_str())
        .collect();
    if inconclusive.is_empty() {
        return ExitCode::SUCCESS;
    }
    println!(
        "INCONCLUSIVE (exit 3): {}: the method did not reach what it meant to (its stress, its load, or an injection was impossible here), so the safeguards were not judged; this is a defect of the test design, not a finding about the system",
        inconclusive.join(", ")
    );
    ExitCode::from(3)
}

/// `bulwark chaos loop`: waits for each slot (or runs the next one now with `--once`), picks
/// the scenarios by the learning record's scores, runs them at their difficulty, records the
/// outcome (atomically) and writes missing-safeguard reports. Nothing is enabled on its own.
async fn chaos_loop(
    args: &LoopArgs,
    cfg: &BulwarkConfig,
    url_given: bool,
) -> anyhow::Result<ExitCode> {
    use bulwark_chaos::autoloop::{self, Change, Learning, Schedule};
    let schedule = match Schedule::parse(&args.schedule) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bulwark: --schedule: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let all = match load(args.scenarios.clone()) {
        Ok(all) => all,
        Err(code) => return Ok(code),
    };
    let layers: Vec<Category> = args
        .layer
        .iter()
        .filter(|l| **l != Layer::All)
        .map(|l| match l {
            Layer::L2 | Layer::All => Category::Layer2,
            Layer::Dirt => Category::Dirt,
            Layer::Fit => Category::Fit,
            Layer::Jepsen => Category::Jepsen,
        })
        .collect();
    let candidates: Vec<&scenario::Loaded> = all
        .iter()
        .filter(|l| layers.is_empty() || layers.contains(&l.scenario.category))
        .collect();
    if candidates.is_empty() {
        eprintln!("bulwark: no scenario in the chosen layers");
        return Ok(ExitCode::from(2));
    }
    let chaos_dir = bulwark_chaos::scenarios_dir()
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("chaos"));
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| chaos_dir.join("state"));
    let reports = args
        .report
        .clone()
        .unwrap_or_else(|| chaos_dir.join("reports"));
    let shutdown = bulwark_common::shutdown::on_signal();
    let mut seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut worst = ExitCode::SUCCESS;
    loop {
        let Some(next) = schedule.next(jiff::ZonedDateTime::now().time()) else {
            eprintln!("bulwark: the schedule has no slot");
            return Ok(ExitCode::from(2));
        };
        if !args.once {
            eprintln!(
                "chaos loop: next slot {} in {} s (Ctrl-C stops)",
                next.slot, next.wait_s
            );
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(next.wait_s)) => {}
            }
        }
        let mut learning = Learning::load(&state)?;
        let ids: Vec<&str> = candidates.iter().map(|l| l.scenario.id.as_str()).collect();
        let picked = autoloop::pick(
            &ids,
            &learning,
            next.slot.severity,
            jiff::Timestamp::now(),
            args.top,
        );
        eprintln!(
            "chaos loop: slot {} (severity {}), state {}",
            next.slot,
            next.slot.severity,
            state.display()
        );
        let mut chosen = Vec::new();
        for p in &picked {
            let Some(l) = candidates.iter().find(|l| l.scenario.id == p.id) else {
                continue;
            };
            let d = learning.get(&p.id).difficulty;
            eprintln!(
                "  {:<34} score {:>2} ({}), difficulty {d} (x{:.2})",
                p.id,
                p.score,
                p.why.join(", "),
                autoloop::intensity(d)
            );
            chosen.push(((*l).clone(), d));
        }
        let opts = Options {
            external: url_given,
            quick: args.quick,
            seed,
            cfg: cfg.clone(),
        };
        let stamp = bulwark_common::time::now().replace(':', "-");
        let dir = reports.join(format!("loop-{stamp}"));
        let mut results = Vec::new();
        for (l, d) in &chosen {
            let plan = autoloop::at_difficulty(&l.scenario, *d);
            let r = bulwark_chaos::runner::run_scenario(&plan, &opts).await;
            let command = format!(
                "bulwark chaos run {} --seed {seed}{}",
                l.scenario.id,
                if args.quick { " --quick" } else { "" },
            );
            let at = jiff::Timestamp::now().to_string();
            let change = learning.record(&r, &at);
            learning.save(&state)?;
            for f in autoloop::write_missing(&dir, &r, *d, &command)? {
                println!(
                    "  missing safeguard: {} (for review; not enabled)",
                    f.display()
                );
            }
            println!(
                "{:<34} {} at difficulty {d}{}",
                r.id,
                r.verdict.as_str(),
                match change {
                    Some(Change::Escalated { to, .. }) => format!(", difficulty up to {to}"),
                    Some(Change::Lowered { to, .. }) => format!(", difficulty down to {to}"),
                    None => String::new(),
                }
            );
            for phase in [&r.scenario, &r.control] {
                for reason in &phase.reasons {
                    println!(
                        "    {} {} because: {reason}",
                        phase.phase,
                        phase.verdict.as_str()
                    );
                }
            }
            results.push(r);
        }
        let written = report::write(
            &dir,
            &results,
            &format!("bulwark chaos loop --once --seed {seed}"),
        )?;
        println!(
            "slot {}: {} of {} passed; report {}; learning record {}",
            next.slot,
            results
                .iter()
                .filter(|r| r.verdict == Verdict::Pass)
                .count(),
            results.len(),
            written.report.display(),
            Learning::path(&state).display()
        );
        if results.iter().any(|r| r.verdict != Verdict::Pass) {
            worst = ExitCode::FAILURE;
        }
        if args.once {
            break;
        }
        seed = seed.wrapping_add(1);
        // Past the slot's minute before looking for the next one.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(61)) => {}
        }
    }
    Ok(worst)
}
