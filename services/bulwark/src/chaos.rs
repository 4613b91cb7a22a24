//! `bulwark chaos list|run|loop`: the chaos tool (crate `bulwark-chaos`) from the command line.
//! Self-contained unless `--nats-url` is given: then it runs against that bulwark. Exit 0 only
//! when every scenario run passed; 2 for a bad scenario file or an unknown id.

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
    /// Run scenarios by id, or by layer; exit 0 only when every one passed.
    Run(RunArgs),
    /// Run a layer again and again (each run writes its report), until Ctrl-C.
    Loop {
        /// Seconds between the start of two runs.
        #[arg(long, default_value_t = 3600)]
        every: u64,
        /// How the runs are made.
        #[command(flatten)]
        run: RunArgs,
    },
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
    /// Report directory [default: chaos/reports/<timestamp>/].
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
        ChaosAction::Loop { every, run: args } => {
            let shutdown = bulwark_common::shutdown::on_signal();
            let mut worst = ExitCode::SUCCESS;
            loop {
                let started = tokio::time::Instant::now();
                let (code, passed) = run(&args, &cfg, url_given).await?;
                if !passed {
                    worst = code;
                }
                eprintln!("chaos loop: next run in {every} s (Ctrl-C stops)");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(started + Duration::from_secs(every)) => {}
                }
            }
            Ok(worst)
        }
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
                    println!("    {} FAIL/INCONCLUSIVE because: {reason}", phase.phase);
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
    Ok((
        if passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
        passed,
    ))
}
