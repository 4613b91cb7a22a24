//! Running a scenario: the negative control first, then the scenario itself, each on a fresh
//! stack (self-contained) or against the running bulwark (`--nats-url`). Each phase checks the
//! steady state, starts the watchers, runs the injections, waits for recovery, classifies every
//! id with the checker, judges the safeguards and returns a verdict with its evidence.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use bulwark_common::{BulwarkConfig, streams, time};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::checker::{CheckResult, Expected, Ledger, Observation};
use crate::inject::{self, Ctx, InjectionReport, Live, Rng, Sent};
use crate::observe::{Firing, MeshReader, ProgressInfo, Sample, Timeline, Watch};
use crate::scenario::{Expectation, Injection, Scenario};
use crate::stack::Stack;
use crate::target::Target;

/// How a run is made.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run against the bulwark at this configuration's URL instead of an own stack.
    pub external: bool,
    /// The shortened scenario.
    pub quick: bool,
    /// Seed of every random choice.
    pub seed: u64,
    /// The configuration loaded by the CLI (URL and credentials, and the base of the stack's).
    pub cfg: BulwarkConfig,
}

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Everything expected happened and nothing else.
    Pass,
    /// The run could not judge the system (the load was not reached, an injection was
    /// impossible here, the steady state did not hold before).
    Inconclusive,
    /// A safeguard did not fire (or fired under normal load), something was lost, duplicated or
    /// unexpected, a limit was broken, or the system did not recover in time.
    Fail,
}

impl Verdict {
    /// `PASS`, `FAIL`, `INCONCLUSIVE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Inconclusive => "INCONCLUSIVE",
        }
    }
}

/// How one safeguard did.
#[derive(Debug, Clone, Serialize)]
pub struct SafeguardResult {
    /// Its name.
    pub safeguard: String,
    /// The subject watched.
    pub subject: String,
    /// `must_fire` (scenario) or `must_not_fire` (control) or `observed` (control, not named).
    pub expectation: String,
    /// Times it fired.
    pub count: usize,
    /// Seconds after the method start of the first firing.
    pub first_t_s: Option<f64>,
    /// Seconds after the start of the injection the limit counts from.
    pub after_start_s: f64,
    /// Its figure at the first firing.
    pub first_value: Option<f64>,
    /// The time limit.
    pub within_s: Option<f64>,
    /// Whether the expectation held.
    pub ok: bool,
    /// In words.
    pub detail: String,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: u64,
    /// 90th percentile.
    pub p90_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
    /// Largest.
    pub max_ms: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        (!h.is_empty()).then(|| Percentiles {
            count: h.len(),
            p50_ms: h.value_at_quantile(0.5),
            p90_ms: h.value_at_quantile(0.9),
            p99_ms: h.value_at_quantile(0.99),
            max_ms: h.max(),
        })
    }
}

/// One phase (control or scenario) of a scenario run.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    /// `control` or `scenario`.
    pub phase: String,
    /// Its verdict.
    pub verdict: Verdict,
    /// Why it is not a pass (empty for a pass).
    pub reasons: Vec<String>,
    /// What was seen, in words.
    pub evidence: Vec<String>,
    /// The injections and what they achieved.
    pub injections: Vec<InjectionReport>,
    /// The safeguards.
    pub safeguards: Vec<SafeguardResult>,
    /// The checker's classification.
    pub check: CheckResult,
    /// Intake latency (intent submitted to decision).
    pub submit_latency: Option<Percentiles>,
    /// Completion latency (intent queued to completed; event published to processed).
    pub completion_latency: Option<Percentiles>,
    /// Status query latency (`query_status`: first attempt to answer).
    pub query_latency: Option<Percentiles>,
    /// API operations and failures after retries (submissions, status queries, review
    /// decisions), when the phase made FIT requests.
    pub api: Option<ApiSummary>,
    /// What became of the intents beyond their class (critical ones, the park, reviews).
    pub intent_fates: IntentFates,
    /// Seconds from the end of the method until the steady state held again.
    pub recovery_s: Option<f64>,
    /// The recovery limit.
    pub recovery_limit_s: f64,
    /// Cascades: events per depth, per cascade.
    pub cascade_levels: BTreeMap<String, BTreeMap<u64, u64>>,
    /// The stresses the method had to reach (scenario phase), and whether it did.
    pub stresses: Vec<StressResult>,
    /// Every second of the run.
    pub timeline: Vec<Sample>,
    /// The run id marking its events and intents.
    pub run_id: String,
    /// Seconds the phase took in all.
    pub duration_s: f64,
}

/// A whole scenario run.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// The scenario id.
    pub id: String,
    /// Its description.
    pub description: String,
    /// Category.
    pub category: String,
    /// Severity.
    pub severity: u8,
    /// Quick run.
    pub quick: bool,
    /// The seed (replay with `--seed`).
    pub seed: u64,
    /// `self-contained` or `nats-url`.
    pub mode: String,
    /// The overall verdict (the worse of the two phases).
    pub verdict: Verdict,
    /// When it started.
    pub started_at: String,
    /// The negative control.
    pub control: PhaseResult,
    /// The scenario.
    pub scenario: PhaseResult,
}

/// Runs `scenario` (control first, then the scenario) and returns the result.
pub async fn run_scenario(scenario: &Scenario, opts: &Options) -> ScenarioResult {
    let started_at = time::now();
    let s = if opts.quick {
        scenario.quick()
    } else {
        scenario.clone()
    };
    let mut rng = Rng::new(opts.seed ^ hash(&s.id));
    let control = run_phase(&s, Phase::Control, opts, rng.next_u64()).await;
    let main = run_phase(&s, Phase::Scenario, opts, rng.next_u64()).await;
    let verdict = control.verdict.max(main.verdict);
    ScenarioResult {
        id: s.id.clone(),
        description: s.description.clone(),
        category: s.category.layer_name().to_owned(),
        severity: s.severity.0,
        quick: opts.quick,
        seed: opts.seed,
        mode: if opts.external {
            "nats-url".into()
        } else {
            "self-contained".into()
        },
        verdict,
        started_at,
        control,
        scenario: main,
    }
}

fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Which phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The same workload at normal load: the safeguards stay silent.
    Control,
    /// The scenario: the safeguards fire.
    Scenario,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Control => "control",
            Phase::Scenario => "scenario",
        }
    }
}

/// Cascade rules both phases' injections need.
fn cascade_rules(s: &Scenario) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let mut text = String::new();
    for i in s.method.iter().chain(&s.control.method) {
        if let Injection::Cascade {
            tag,
            fan_out,
            depth,
            ..
        } = i
            && seen.insert(tag.clone())
        {
            text.push_str(&inject::cascade_rule(tag, fan_out.0, depth.map(|d| d.0)));
        }
    }
    text
}

struct Prepared {
    target: Arc<Target>,
}

async fn prepare(s: &Scenario, opts: &Options) -> Result<Prepared, String> {
    if opts.external {
        if let Some(i) = s
            .method
            .iter()
            .chain(&s.control.method)
            .find(|i| i.needs_own_stack())
        {
            return Err(format!(
                "{} needs the runner's own stack: run without --nats-url",
                i.kind()
            ));
        }
        let target = Target::external(opts.cfg.clone())
            .await
            .map_err(|e| format!("cannot reach bulwark: {e:#}"))?;
        return Ok(Prepared {
            target: Arc::new(target),
        });
    }
    let cfg = s
        .system_config(opts.cfg.clone(), opts.quick)
        .map_err(|e| format!("the scenario's [system] does not apply: {e}"))?;
    let stack = Stack::start(cfg, s.stack.workers, &cascade_rules(s))
        .await
        .map_err(|e| format!("the runner's own stack did not start: {e:#}"))?;
    let target = Target::own(stack)
        .await
        .map_err(|e| format!("cannot connect to the runner's own stack: {e:#}"))?;
    Ok(Prepared {
        target: Arc::new(target),
    })
}

/// Polls the steady state every second for up to `limit`; returns the seconds it took, or the
/// failures of the last attempt.
async fn await_steady(target: &Target, s: &Scenario, limit: Duration) -> Result<f64, Vec<String>> {
    let start = tokio::time::Instant::now();
    loop {
        let failures = target.steady_state(&s.steady_state.checks).await;
        if failures.is_empty() {
            return Ok(start.elapsed().as_secs_f64());
        }
        if start.elapsed() >= limit {
            return Err(failures
                .into_iter()
                .map(|(c, why)| format!("{}: {why}", c.name()))
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn empty_phase(phase: Phase, s: &Scenario, verdict: Verdict, reason: String) -> PhaseResult {
    PhaseResult {
        phase: phase.name().to_owned(),
        verdict,
        reasons: vec![reason],
        evidence: Vec::new(),
        injections: Vec::new(),
        safeguards: Vec::new(),
        check: CheckResult::default(),
        submit_latency: None,
        completion_latency: None,
        query_latency: None,
        api: None,
        intent_fates: IntentFates::default(),
        recovery_s: None,
        recovery_limit_s: s.recovery_limit_s.0,
        cascade_levels: BTreeMap::new(),
        stresses: Vec::new(),
        timeline: Vec::new(),
        run_id: String::new(),
        duration_s: 0.0,
    }
}

/// Runs one phase.
pub async fn run_phase(s: &Scenario, phase: Phase, opts: &Options, seed: u64) -> PhaseResult {
    let began = tokio::time::Instant::now();
    let label = format!("{} [{}]", s.id, phase.name());
    eprintln!(
        "chaos: {label}: preparing ({})",
        if opts.external {
            "against the running bulwark"
        } else {
            "own nats-server and services"
        }
    );
    let prepared = match prepare(s, opts).await {
        Ok(p) => p,
        Err(why) => return empty_phase(phase, s, Verdict::Inconclusive, why),
    };
    let target = prepared.target;
    let mut result = execute(s, phase, seed, target.clone(), &label).await;
    result.duration_s = round1(began.elapsed().as_secs_f64());
    // The watchers hold the target until they notice the stop; then the stack goes down.
    let mut target = target;
    for _ in 0..40 {
        match Arc::try_unwrap(target) {
            Ok(t) => {
                if let Some(stack) = t.stack {
                    stack.into_inner().stop().await;
                }
                break;
            }
            Err(still_shared) => {
                target = still_shared;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!(
        "chaos: {label}: {} {}",
        result.verdict.as_str(),
        result.reasons.first().map(String::as_str).unwrap_or("")
    );
    result
}

/// Fails a phase whose `what` latency p99 is above `limit` (a `[verify]` key), saying both.
fn p99_limit(out: &mut PhaseResult, what: &str, p99_ms: u64, limit: Option<f64>) {
    if let Some(max) = limit
        && p99_ms as f64 > max
    {
        out.verdict = out.verdict.max(Verdict::Fail);
        out.reasons.push(format!(
            "{what} p99 {p99_ms} ms is above the limit of {max:.0} ms"
        ));
    }
}

async fn execute(
    s: &Scenario,
    phase: Phase,
    seed: u64,
    target: Arc<Target>,
    label: &str,
) -> PhaseResult {
    let method = match phase {
        Phase::Control => &s.control.method,
        Phase::Scenario => &s.method,
    };
    let mut rng = Rng::new(seed);
    let run_id = format!("{:010x}", rng.next_u64() >> 24);
    let mut out = empty_phase(phase, s, Verdict::Pass, String::new());
    out.reasons.clear();
    out.run_id = run_id.clone();

    // 1. The steady state must hold before anything is injected.
    if let Err(failures) = await_steady(&target, s, Duration::from_secs(60)).await {
        out.verdict = Verdict::Inconclusive;
        out.reasons.push(format!(
            "the steady state did not hold before the method: {}",
            failures.join("; ")
        ));
        return out;
    }

    // 2. Watchers.
    let stop = CancellationToken::new();
    let t0 = tokio::time::Instant::now() + Duration::from_millis(500);
    let watch = match Watch::start(&target, &s.expectations, t0, &stop).await {
        Ok(w) => w,
        Err(e) => {
            out.verdict = Verdict::Inconclusive;
            out.reasons
                .push(format!("cannot watch the safeguards: {e:#}"));
            return out;
        }
    };
    let needs_reader = method
        .iter()
        .any(|i| matches!(i, Injection::PublishEvents { .. }));
    let reader = if needs_reader {
        match MeshReader::start(&target, &run_id).await {
            Ok(r) => Some(r),
            Err(e) => {
                out.verdict = Verdict::Inconclusive;
                out.reasons
                    .push(format!("cannot read the trigger mesh: {e:#}"));
                return out;
            }
        }
    } else {
        None
    };
    let mesh_start_seq = match target.js.get_stream(streams::MESH_STREAM).await {
        Ok(mut stream) => stream
            .info()
            .await
            .map(|i| i.state.last_sequence + 1)
            .unwrap_or(1),
        Err(_) => 1,
    };
    let completions = watch_completions(&target, &run_id, &stop).await;
    let live = Arc::new(Live::default());
    let processed = reader
        .as_ref()
        .map(|r| r.processed.clone())
        .unwrap_or_default();
    let planned = method
        .iter()
        .map(|i| i.at_s() + i.planned_duration_s())
        .fold(0.0, f64::max);
    let timeline = Timeline::start(
        target.clone(),
        live.clone(),
        processed,
        watch.firings.clone(),
        t0,
        ProgressInfo {
            label: label.to_owned(),
            planned_s: planned,
            safeguards: s.expectations.len(),
        },
        stop.clone(),
    );

    // 3. The method.
    let sent = Arc::new(Mutex::new(Sent::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, injection) in method.iter().enumerate() {
        let ctx = Ctx {
            target: target.clone(),
            run: run_id.clone(),
            live: live.clone(),
            sent: sent.clone(),
            t0,
            seed: rng.next_u64(),
        };
        tasks.spawn(inject::run(ctx, index, injection.clone()));
    }
    let mut reports = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(r) => reports.push(r),
            Err(e) => {
                out.verdict = Verdict::Inconclusive;
                out.reasons.push(format!("an injection panicked: {e}"));
            }
        }
    }
    reports.sort_by(|a, b| a.started_s.total_cmp(&b.started_s));
    let method_end = reports.iter().map(|r| r.ended_s).fold(0.0, f64::max);

    // 4. Recovery: the steady state again within the limit; then the ledger settles (up to the
    // limit once more, so a slow recovery is measured rather than cut short).
    let limit = Duration::from_secs_f64(s.recovery_limit_s.0);
    let recovered = await_steady(&target, s, limit).await;
    let settle_deadline = tokio::time::Instant::now() + limit;
    let recovery_s = match &recovered {
        Ok(secs) => Some(round1(*secs)),
        Err(_) => None,
    };
    loop {
        let pending_reader = match &reader {
            Some(_) => target
                .consumer_backlog(&format!("chaos_{run_id}"))
                .await
                .unwrap_or(0),
            None => 0,
        };
        let pending_intents = intents_pending(&target, &sent).await;
        if (pending_reader == 0 && pending_intents == 0)
            || tokio::time::Instant::now() > settle_deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // 4b. The park replayed (FIT03): in batches the queue can take, until it is empty; then
    // the replayed intents must complete like the others. The watchers and the timeline keep
    // running meanwhile (a playbook may still be narrating its decision).
    let replay = if s.verify.replay_park {
        let r = replay_park(&target, &sent, settle_deadline + limit).await;
        Some(r)
    } else {
        None
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let timeline = timeline.samples.lock().await.clone();
    let firings = watch.firings.lock().await.clone();

    // 5. The checker.
    let mut fates = IntentFates::default();
    let mut check = CheckResult::default();
    let mut completion_ms = inject::new_histogram();
    let sent = sent.lock().await;
    if !sent.events.is_empty() || reader.is_some() {
        let seen = match &reader {
            Some(r) => r.seen.lock().await.clone(),
            None => HashMap::new(),
        };
        let backlog = match &reader {
            Some(_) => target
                .consumer_backlog(&format!("chaos_{run_id}"))
                .await
                .unwrap_or(0),
            None => 0,
        };
        check.absorb(&check_events(&sent, &seen, backlog, &mut completion_ms));
        // When an event was processed twice, when (seconds after the method start): the
        // evidence that ties a redelivery to a fault.
        let t0_ms = time::now_ms() - t0.elapsed().as_millis() as i64;
        let mut twice: Vec<(&String, &Vec<i64>)> =
            seen.iter().filter(|(_, times)| times.len() > 1).collect();
        twice.sort_by_key(|(_, times)| times.iter().min().copied());
        for (id, times) in twice.into_iter().take(5) {
            let at = |ms: i64| format!("{:.1} s", (ms - t0_ms) as f64 / 1000.0);
            let published = sent.events.get(id.as_str()).map(|ms| at(*ms));
            out.evidence.push(format!(
                "event {id} published at {}, processed at {}",
                published.unwrap_or_else(|| "?".into()),
                times
                    .iter()
                    .map(|ms| at(*ms))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
        }
    }
    if !sent.intents.is_empty() {
        let observed = completions.lock().await.clone();
        check.absorb(
            &check_intents(
                &target,
                &sent,
                &observed,
                &mut completion_ms,
                s.verify.critical_priority,
                &mut fates,
            )
            .await,
        );
    }
    for cascade in &sent.cascades {
        let (result, levels) = check_cascade(&target, s, method, cascade, mesh_start_seq).await;
        check.absorb(&result);
        out.cascade_levels.insert(cascade.tag.clone(), levels);
    }
    if let Some(r) = reader {
        r.finish(&target.js).await;
    }
    out.submit_latency = Percentiles::of(&sent.submit_ms);
    out.completion_latency = Percentiles::of(&completion_ms);
    out.query_latency = Percentiles::of(&sent.query_ms);
    out.api = ApiSummary::of(&sent);
    out.intent_fates = fates.clone();
    out.check = check;
    out.timeline = timeline;
    out.recovery_s = recovery_s;
    drop(sent);

    // 6. Judgement.
    for r in &reports {
        if let Some(why) = &r.inconclusive {
            out.verdict = out.verdict.max(Verdict::Inconclusive);
            out.reasons.push(format!("{}: {why}", r.label));
        }
        if let Some(share) = r.load_share
            && share < s.verify.min_load_share.0
        {
            out.verdict = out.verdict.max(Verdict::Inconclusive);
            out.reasons.push(format!(
                "{}: the load reached {:.0}% of what was asked (at least {:.0}% needed): {}",
                r.label,
                share * 100.0,
                s.verify.min_load_share.0 * 100.0,
                r.figures
            ));
        }
    }
    out.injections = reports;
    let starts: HashMap<String, f64> = out
        .injections
        .iter()
        .map(|r| (r.label.clone(), r.started_s))
        .collect();
    if phase == Phase::Scenario {
        out.stresses = s
            .stresses
            .iter()
            .map(|st| StressResult::measure(st, &out.timeline))
            .collect();
        out.evidence
            .extend(out.stresses.iter().map(StressResult::describe));
        if let Some(slots) = slots_of(&target, s).await {
            out.evidence
                .extend(load_vs_capacity(method, &out.injections, slots));
        }
    }
    let acts: HashMap<String, u64> = out
        .injections
        .iter()
        .filter_map(|r| r.acts.map(|n| (r.label.clone(), n)))
        .collect();
    for (i, e) in s.expectations.iter().enumerate() {
        let (e, note) = counted_from_injection(e, &acts);
        let mut result = judge(&e, &firings[i], phase, &s.control.absent, &starts);
        result.detail.push_str(&note);
        if !result.ok {
            let unreached = out
                .stresses
                .iter()
                .find(|st| !st.reached && st.safeguards.contains(&e.safeguard));
            match unreached {
                Some(st) => {
                    out.verdict = out.verdict.max(Verdict::Inconclusive);
                    out.reasons.push(format!(
                        "INCONCLUSIVE, a defect of the test design (the method did not reach its stress): {}; so {:?} cannot be judged: {}",
                        st.describe(),
                        e.safeguard,
                        result.detail
                    ));
                }
                None => {
                    out.verdict = out.verdict.max(Verdict::Fail);
                    out.reasons.push(result.detail.clone());
                }
            }
        }
        out.evidence.push(result.detail.clone());
        out.safeguards.push(result);
    }
    out.evidence
        .push(format!("checker: {}", out.check.summary()));
    if !out.check.valid() {
        out.verdict = out.verdict.max(Verdict::Fail);
        out.reasons.push(format!(
            "the checker found a violation: {} {:?}",
            out.check.summary(),
            out.check.examples
        ));
    }
    if out.check.parked > s.verify.parked_max {
        out.verdict = out.verdict.max(Verdict::Fail);
        out.reasons.push(format!(
            "{} acknowledged intent(s) left in the park (not lost; at most {} allowed{}): {:?}",
            out.check.parked,
            s.verify.parked_max,
            if s.verify.replay_park {
                ", and the park was replayed"
            } else {
                ""
            },
            out.check.examples.get("parked")
        ));
    }
    if let Some(r) = &replay {
        out.evidence.push(format!(
            "park replayed after the recovery: {} task(s) in {} batch(es){}",
            r.replayed,
            r.batches,
            r.error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ));
        if let Some(e) = &r.error {
            out.verdict = out.verdict.max(Verdict::Fail);
            out.reasons
                .push(format!("the park could not be replayed: {e}"));
        }
    }
    if fates.ever_parked > 0 || s.verify.replay_park {
        out.evidence.push(format!(
            "park: {} intent(s) shed into it during the run; {} completed after the replay, {} still parked (replayable, not lost)",
            fates.ever_parked, fates.replayed_completed, fates.parked_now
        ));
    }
    if fates.rejected > 0 {
        out.evidence.push(format!(
            "reviews: {} intent(s) rejected and never run",
            fates.rejected
        ));
    }
    if let Some(c) = s.verify.critical_priority {
        out.evidence.push(format!(
            "critical intents (priority >= {c}): {} acknowledged, {} completed",
            fates.critical, fates.critical_completed
        ));
        if fates.critical_completed < fates.critical {
            out.verdict = out.verdict.max(Verdict::Fail);
            out.reasons.push(format!(
                "critical intents not all served: {} of {} acknowledged completed",
                fates.critical_completed, fates.critical
            ));
        }
    }
    if out.check.still_held > s.verify.still_held_max {
        out.verdict = out.verdict.max(Verdict::Fail);
        out.reasons.push(format!(
            "{} id(s) still held after the recovery wait (at most {} allowed): {:?}",
            out.check.still_held,
            s.verify.still_held_max,
            out.check.examples.get("still_held")
        ));
    }
    match &recovered {
        Ok(secs) => out.evidence.push(format!(
            "steady state restored {:.1} s after the method ended at {:.1} s (limit {:.0} s)",
            secs, method_end, s.recovery_limit_s.0
        )),
        Err(failures) => {
            out.verdict = out.verdict.max(Verdict::Fail);
            out.reasons.push(format!(
                "the steady state was not restored within {:.0} s: {}",
                s.recovery_limit_s.0,
                failures.join("; ")
            ));
        }
    }
    if let Some(p) = &out.submit_latency {
        out.evidence.push(format!(
            "intake latency over {} intents: p50 {} ms, p99 {} ms, max {} ms",
            p.count, p.p50_ms, p.p99_ms, p.max_ms
        ));
        let p99 = p.p99_ms;
        if phase == Phase::Scenario {
            p99_limit(&mut out, "intake", p99, s.verify.submit_p99_ms_max);
        }
    }
    if let Some(p) = &out.completion_latency {
        out.evidence.push(format!(
            "completion latency over {}: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
        ));
        let p99 = p.p99_ms;
        if phase == Phase::Scenario {
            p99_limit(&mut out, "completion", p99, s.verify.completion_p99_ms_max);
        }
    }
    if let Some(p) = &out.query_latency {
        out.evidence.push(format!(
            "status query latency over {} queries: p50 {} ms, p99 {} ms, max {} ms",
            p.count, p.p50_ms, p.p99_ms, p.max_ms
        ));
        let p99 = p.p99_ms;
        if phase == Phase::Scenario {
            p99_limit(&mut out, "status query", p99, s.verify.query_p99_ms_max);
        }
    }
    if let Some(api) = &out.api {
        out.evidence.push(format!(
            "API operations: {} made, {} failed after the client's retries ({:.2} %); by kind {:?}, failed {:?}",
            api.ops,
            api.errors,
            api.error_rate * 100.0,
            api.by_kind,
            api.errors_by_kind
        ));
        if phase == Phase::Scenario
            && let Some(max) = s.verify.error_rate_max
            && api.error_rate > max.0
        {
            out.verdict = out.verdict.max(Verdict::Fail);
            out.reasons.push(format!(
                "API error rate {:.2} % is above the limit of {:.2} %: {:?}",
                api.error_rate * 100.0,
                max.0 * 100.0,
                api.examples
            ));
        }
    }
    if phase == Phase::Scenario {
        for (tag, levels) in &out.cascade_levels {
            let deepest = levels.keys().max().copied().unwrap_or(0);
            out.evidence.push(format!(
                "cascade {tag}: events per depth {levels:?}, deepest {deepest}"
            ));
            if let Some(max) = s.verify.max_event_depth
                && deepest != max
            {
                out.verdict = out.verdict.max(Verdict::Fail);
                out.reasons.push(format!(
                    "cascade {tag}: deepest event at depth {deepest}, expected the chain stopped at exactly {max}"
                ));
            }
            if let Some(per) = s.verify.events_per_level
                && let Some((depth, n)) = levels.iter().find(|(_, n)| **n != per)
            {
                out.verdict = out.verdict.max(Verdict::Fail);
                out.reasons.push(format!(
                    "cascade {tag}: {n} event(s) at depth {depth}, expected {per} per level"
                ));
            }
        }
    }
    out
}

/// What a stress of the scenario reached during the method.
#[derive(Debug, Clone, Serialize)]
pub struct StressResult {
    /// Its name.
    pub name: String,
    /// What was measured.
    pub measure: String,
    /// The figure it had to reach.
    pub at_least: f64,
    /// The peak seen during the method (none when nothing could be measured).
    pub peak: Option<f64>,
    /// Seconds after the method start of the peak.
    pub peak_at_s: Option<f64>,
    /// Seconds after the method start it first reached `at_least`.
    pub reached_at_s: Option<f64>,
    /// Intent submissions answered per second at that moment (the offered load that got it
    /// there).
    pub intents_per_s_then: Option<f64>,
    /// Whether it was reached.
    pub reached: bool,
    /// The safeguards it gates.
    pub safeguards: Vec<String>,
}

impl StressResult {
    /// Measures `st` on the timeline (the samples from the method start on).
    fn measure(st: &crate::scenario::Stress, timeline: &[Sample]) -> StressResult {
        let value = |x: &Sample| match st.measure {
            crate::scenario::Measure::QueueDepth => x.queue_depth.map(|q| q as f64),
        };
        let during: Vec<(&Sample, f64)> = timeline
            .iter()
            .filter(|x| x.t_s >= 0.0)
            .filter_map(|x| value(x).map(|v| (x, v)))
            .collect();
        let peak = during.iter().max_by(|a, b| a.1.total_cmp(&b.1));
        let first = during.iter().find(|(_, v)| *v >= st.at_least);
        StressResult {
            name: st.name.clone(),
            measure: st.measure.name().to_owned(),
            at_least: st.at_least,
            peak: peak.map(|(_, v)| *v),
            peak_at_s: peak.map(|(x, _)| x.t_s),
            reached_at_s: first.map(|(x, _)| x.t_s),
            intents_per_s_then: first.map(|(x, _)| x.intents_per_s),
            reached: first.is_some(),
            safeguards: st.safeguards.clone(),
        }
    }

    /// In words, with the numbers.
    fn describe(&self) -> String {
        let peak = match (self.peak, self.peak_at_s) {
            (Some(p), Some(t)) => format!("peak {} {p} at {t:.1} s", self.measure),
            _ => format!("{} never measured", self.measure),
        };
        match self.reached_at_s {
            Some(t) => format!(
                "stress {:?} reached: {} at least {} from {t:.1} s ({} intents/s answered then); {peak}",
                self.name,
                self.measure,
                self.at_least,
                self.intents_per_s_then.unwrap_or(0.0)
            ),
            None => format!(
                "stress {:?} NOT reached: {peak}, at least {} needed",
                self.name, self.at_least
            ),
        }
    }
}

/// `e` with its `min_count` taken from the acts of the injection its `min_count_from` names
/// (at least one), and the note saying so for the evidence.
fn counted_from_injection(e: &Expectation, acts: &HashMap<String, u64>) -> (Expectation, String) {
    let mut e = e.clone();
    let Some(from) = e.min_count_from.clone() else {
        return (e, String::new());
    };
    match acts.get(&from) {
        Some(&n) => {
            e.min_count = n.max(1);
            let note = format!(
                " [{from} did {n} act(s): at least {} firing(s) expected]",
                e.min_count
            );
            (e, note)
        }
        None => {
            let note = format!(" [{from} reported no acts: min_count {} kept]", e.min_count);
            (e, note)
        }
    }
}

/// Task slots of the system under test: the stack's workers times `worker.capacity`, or the
/// running pool's size times it.
async fn slots_of(target: &Target, s: &Scenario) -> Option<u64> {
    let per_worker = u64::from(target.cfg.worker.capacity);
    if target.stack.is_some() {
        return Some(s.stack.workers as u64 * per_worker);
    }
    let pool = target.pool().await?;
    pool["desired"].as_u64().map(|w| w * per_worker)
}

/// The load of each intent injection with a fixed work time against what the slots can run
/// (`slots × 1000 / work_ms` tasks per second at best): offered and accepted, as ratios.
fn load_vs_capacity(method: &[Injection], reports: &[InjectionReport], slots: u64) -> Vec<String> {
    let mut lines = Vec::new();
    // Slots the answered intents keep busy: rate x work time, summed over the injections.
    let mut busy_slots = 0.0;
    for (index, injection) in method.iter().enumerate() {
        let (offered, work_ms) = match injection {
            Injection::SubmitIntents {
                rate_per_s: Some(r),
                work_ms,
                count: None,
                ..
            } => (format!("{}", r.0), *work_ms),
            Injection::SubmitIntents {
                work_ms,
                concurrency,
                ..
            } => (format!("closed loop of {}", concurrency.0), *work_ms),
            Injection::ReviewIntents {
                rate_per_s,
                work_ms,
                ..
            } => (format!("{}", rate_per_s.0), *work_ms),
            Injection::RampIntents {
                from_per_s,
                to_per_s,
                work_ms,
                ..
            } => (format!("{} -> {}", from_per_s.0, to_per_s.0), *work_ms),
            _ => continue,
        };
        if work_ms == 0 {
            continue;
        }
        let capacity = slots as f64 * 1000.0 / work_ms as f64;
        let label = injection.label(index);
        let ratio = |x: f64| {
            let r = x / capacity;
            if r < 0.1 {
                format!("{r:.2}x")
            } else {
                format!("{r:.1}x")
            }
        };
        let offered_ratio = offered
            .split(" -> ")
            .filter_map(|r| r.parse::<f64>().ok())
            .map(ratio)
            .collect::<Vec<_>>()
            .join(" -> ");
        let figures = reports
            .iter()
            .find(|r| r.label == label)
            .map(|r| r.figures.clone())
            .unwrap_or_default();
        let achieved = figures["accepted_per_s"]
            .as_f64()
            .or(figures["achieved_rate_per_s"].as_f64());
        lines.push(format!(
            "load vs capacity, {label}: {slots} task slots at {work_ms} ms a task run at most {capacity:.1} tasks/s; offered {offered}{}{}",
            if offered_ratio.is_empty() {
                " submitters".to_owned()
            } else {
                format!(" per s ({offered_ratio} capacity)")
            },
            achieved
                .map(|a| format!(", answered {a:.1} per s ({} capacity)", ratio(a)))
                .unwrap_or_default()
        ));
        if let Some(a) = achieved {
            busy_slots += a * work_ms as f64 / 1000.0;
        }
    }
    if lines.len() > 1 {
        lines.push(format!(
            "load vs capacity, together: the answered intents ask {busy_slots:.1} of the {slots} slots ({:.2}x capacity)",
            busy_slots / slots as f64
        ));
    }
    lines
}

/// Judges one expectation against its firings.
fn judge(
    e: &Expectation,
    firings: &[Firing],
    phase: Phase,
    absent: &[String],
    starts: &HashMap<String, f64>,
) -> SafeguardResult {
    let during: Vec<&Firing> = firings.iter().filter(|f| f.t_s >= 0.0).collect();
    let after_start = e
        .after
        .as_ref()
        .and_then(|a| starts.get(a).copied())
        .unwrap_or(0.0);
    let first = during.first();
    let mut r = SafeguardResult {
        safeguard: e.safeguard.clone(),
        subject: e.subject.clone(),
        expectation: String::new(),
        count: during.len(),
        first_t_s: first.map(|f| round1(f.t_s)),
        after_start_s: round1(after_start),
        first_value: first.and_then(|f| f.value),
        within_s: e.within_s.map(|w| w.0),
        ok: true,
        detail: String::new(),
    };
    let fired_text = |f: &Firing| {
        let value = match (f.value, &e.value) {
            (Some(v), Some(path)) => format!(" with {path} = {v}"),
            _ => String::new(),
        };
        format!(
            "at {:.1} s ({:.1} s after {}){value}",
            f.t_s,
            f.t_s - after_start,
            e.after.as_deref().unwrap_or("the method start")
        )
    };
    match phase {
        Phase::Control => {
            let must_not = absent.contains(&e.safeguard);
            r.expectation = if must_not {
                "must_not_fire"
            } else {
                "observed"
            }
            .into();
            match first {
                None => {
                    r.detail = format!(
                        "{}: silent under normal load (as it should be)",
                        e.safeguard
                    )
                }
                Some(f) => {
                    r.ok = !must_not;
                    r.detail = format!(
                        "{}: fired {} time(s) under normal load, first {} on {}",
                        e.safeguard,
                        during.len(),
                        fired_text(f),
                        f.subject
                    );
                }
            }
        }
        Phase::Scenario => {
            r.expectation = if e.min_count == 0 {
                "must_stay_silent".into()
            } else {
                "must_fire".into()
            };
            let Some(f) = first else {
                if e.min_count == 0 {
                    r.expectation = "must_stay_silent".into();
                    r.detail = format!("{}: did not fire (as it should not)", e.safeguard);
                    return r;
                }
                r.ok = false;
                r.detail = format!(
                    "{}: never fired (no matching event on {} {})",
                    e.safeguard,
                    e.subject,
                    if e.matching.is_empty() {
                        String::new()
                    } else {
                        format!("with {:?}", e.matching)
                    }
                );
                return r;
            };
            let mut problems = Vec::new();
            if let Some(w) = e.within_s
                && f.t_s - after_start > w.0
            {
                problems.push(format!("later than the limit of {:.1} s", w.0));
            }
            if let Some(min) = e.min_value {
                match f.value {
                    Some(v) if v >= min => {}
                    Some(v) => problems.push(format!("value {v} below {min}")),
                    None => problems.push("no value".into()),
                }
            }
            if let Some(max) = e.max_value {
                match f.value {
                    Some(v) if v <= max => {}
                    Some(v) => problems.push(format!("value {v} above {max}")),
                    None => problems.push("no value".into()),
                }
            }
            if (during.len() as u64) < e.min_count {
                problems.push(format!(
                    "fired {} time(s), at least {} expected",
                    during.len(),
                    e.min_count
                ));
            }
            if let Some(max) = e.max_count
                && during.len() as u64 > max
            {
                problems.push(format!(
                    "fired {} time(s), at most {max} allowed",
                    during.len()
                ));
            }
            r.ok = problems.is_empty();
            r.detail = format!(
                "{}: fired {} time(s), first {} on {}{}",
                e.safeguard,
                during.len(),
                fired_text(f),
                f.subject,
                if problems.is_empty() {
                    String::new()
                } else {
                    format!(": {}", problems.join(", "))
                }
            );
        }
    }
    r
}

/// Intent ids of this run seen on `mesh.task.completed`, with counts.
async fn watch_completions(
    target: &Target,
    run_id: &str,
    stop: &CancellationToken,
) -> Arc<Mutex<HashMap<String, u64>>> {
    let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let prefix = format!("chaos-{run_id}-");
    if let Ok(mut sub) = target.client.subscribe("mesh.task.completed").await {
        let record = seen.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = sub.next() => match m { Some(m) => m, None => break },
                };
                if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload)
                    && let Some(id) = v["payload"]["intent_id"].as_str()
                    && id.starts_with(&prefix)
                {
                    *record.lock().await.entry(id.to_owned()).or_default() += 1;
                }
            }
        });
    }
    seen
}

/// API operations of a phase, after the client's retries.
#[derive(Debug, Clone, Serialize)]
pub struct ApiSummary {
    /// Operations made: submissions, status queries, review decisions.
    pub ops: u64,
    /// Of those, failed after the client's retries (no answer, or an error that is not the
    /// planned refusal of an invalid intent).
    pub errors: u64,
    /// `errors / ops`.
    pub error_rate: f64,
    /// Operations by kind.
    pub by_kind: BTreeMap<String, u64>,
    /// Failures by kind.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Up to ten failures.
    pub examples: Vec<String>,
}

impl ApiSummary {
    /// The summary when the phase made status queries or review decisions (FIT01); the
    /// submissions count too (one failed when it got no decision after its retries).
    fn of(sent: &Sent) -> Option<ApiSummary> {
        if sent.api.total_ops() == 0 {
            return None;
        }
        let mut by_kind = sent.api.ops.clone();
        let mut errors_by_kind = sent.api.errors.clone();
        let submissions = sent.intents.len() as u64;
        let unanswered = sent.intents.values().filter(|i| i.unanswered).count() as u64;
        by_kind.insert("submit".into(), submissions);
        errors_by_kind.insert("submit".into(), unanswered);
        let ops: u64 = by_kind.values().sum();
        let errors: u64 = errors_by_kind.values().sum();
        let mut examples = sent.api.examples.clone();
        let mut unanswered_ids: Vec<&String> = sent
            .intents
            .iter()
            .filter(|(_, i)| i.unanswered)
            .map(|(id, _)| id)
            .collect();
        unanswered_ids.sort();
        for id in unanswered_ids.into_iter().take(3) {
            examples.push(format!("submit: {id}: no decision after the retries"));
        }
        Some(ApiSummary {
            ops,
            errors,
            error_rate: errors as f64 / ops.max(1) as f64,
            by_kind,
            errors_by_kind,
            examples,
        })
    }
}

/// What replaying the park did.
struct ReplayReport {
    replayed: u64,
    batches: u64,
    error: Option<String>,
}

/// Replays the park with `scheduler.replay` in batches of half the queue's warning depth (and
/// of half the shedding playbook's `target_depth` override), so the replayed tasks do not trip
/// the queue guard and get shed again, waiting for the queue to drain between batches, until a batch comes back empty; then waits for every
/// acknowledged intent to be at rest again. Gives up at `deadline`.
async fn replay_park(
    target: &Target,
    sent: &Arc<Mutex<Sent>>,
    deadline: tokio::time::Instant,
) -> ReplayReport {
    // Half the queue's warning depth, and half the shedding playbook's target depth when it is
    // configured: a replayed batch then neither trips the guard nor keeps a shedding run going.
    let target_depth = target
        .cfg
        .playbooks
        .overrides
        .get("scheduler_load_shedding")
        .and_then(|o| o.get("target_depth"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let batch = (target.cfg.scheduler.queue_warn / 2)
        .min(target_depth / 2)
        .clamp(10, 500);
    let mut report = ReplayReport {
        replayed: 0,
        batches: 0,
        error: None,
    };
    loop {
        if tokio::time::Instant::now() > deadline {
            report.error = Some("the park was not empty before the deadline".into());
            return report;
        }
        let body = json!({ "max": batch }).to_string();
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            target
                .client
                .request(bulwark_common::subjects::SCHEDULER_REPLAY, body.into()),
        )
        .await;
        let answer = match reply {
            Ok(Ok(msg)) => serde_json::from_slice::<Value>(&msg.payload).unwrap_or(Value::Null),
            _ => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(n) = answer["replayed"].as_u64() else {
            report.error = Some(format!("scheduler.replay answered {answer}"));
            return report;
        };
        if n == 0 {
            break;
        }
        report.replayed += n;
        report.batches += 1;
        // Let the queue drain below half a batch before the next one.
        while tokio::time::Instant::now() < deadline {
            let depth = target
                .readiness()
                .await
                .and_then(|r| r["queue_depth"].as_u64())
                .unwrap_or(u64::MAX);
            if depth <= batch / 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    while tokio::time::Instant::now() < deadline && intents_pending(target, sent).await > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    report
}

/// Accepted intents not yet at rest: neither finished nor parked (sampled: stops counting at the
/// first 50).
async fn intents_pending(target: &Target, sent: &Arc<Mutex<Sent>>) -> usize {
    let ids: Vec<String> = sent
        .lock()
        .await
        .intents
        .iter()
        .filter(|(_, i)| !i.refused && !i.unanswered)
        .map(|(id, _)| id.clone())
        .collect();
    if ids.is_empty() {
        return 0;
    }
    let Ok(kv) = target.js.get_key_value(streams::INTENTS_BUCKET).await else {
        return ids.len();
    };
    let mut pending = 0;
    let mut reads = futures::stream::iter(ids)
        .map(|id| {
            let kv = kv.clone();
            async move { kv.get(&id).await.ok().flatten() }
        })
        .buffer_unordered(64);
    while let Some(entry) = reads.next().await {
        let done = entry
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["status"].as_str().map(str::to_owned))
            .is_some_and(|s| matches!(s.as_str(), "completed" | "failed" | "rejected" | "shed"));
        if !done {
            pending += 1;
            if pending >= 50 {
                break;
            }
        }
    }
    pending
}

fn check_events(
    sent: &Sent,
    seen: &HashMap<String, Vec<i64>>,
    backlog: u64,
    latency: &mut Histogram<u64>,
) -> CheckResult {
    let mut ledger = Ledger::new();
    for (id, sent_ms) in &sent.events {
        ledger.expect(id.clone(), Expected::Delivered);
        match seen.get(id) {
            Some(times) => {
                for _ in times {
                    ledger.observe(id.clone(), Observation::Completed);
                }
                if let Some(first) = times.iter().min() {
                    let _ = latency.record((first - sent_ms).max(1) as u64);
                }
            }
            None if backlog > 0 => ledger.observe(
                id.clone(),
                Observation::Held(format!(
                    "not processed yet ({backlog} event(s) still pending in the mesh)"
                )),
            ),
            None => {}
        }
    }
    for (id, times) in seen {
        if !sent.events.contains_key(id) && !sent.unacked_events.contains(id) {
            for _ in times {
                ledger.observe(id.clone(), Observation::Completed);
            }
        }
    }
    ledger.classify()
}

/// What became of the intents beyond their class: the critical ones, the park.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IntentFates {
    /// Intents at or above `verify.critical_priority` acknowledged.
    pub critical: u64,
    /// Of those, completed.
    pub critical_completed: u64,
    /// Intents whose history shows they were shed into the park at some point.
    pub ever_parked: u64,
    /// Of those, completed after a replay.
    pub replayed_completed: u64,
    /// Intents in the park at the check.
    pub parked_now: u64,
    /// Intents rejected by a review.
    pub rejected: u64,
}

async fn check_intents(
    target: &Target,
    sent: &Sent,
    observed: &HashMap<String, u64>,
    latency: &mut Histogram<u64>,
    critical: Option<u8>,
    fates: &mut IntentFates,
) -> CheckResult {
    let mut ledger = Ledger::new();
    let kv = target.js.get_key_value(streams::INTENTS_BUCKET).await.ok();
    let ids: Vec<(String, inject::SentIntent)> =
        sent.intents.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let records: Vec<(String, inject::SentIntent, Option<Value>)> = futures::stream::iter(ids)
        .map(|(id, info)| {
            let kv = kv.clone();
            async move {
                let record = match &kv {
                    Some(kv) => kv
                        .get(&id)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok()),
                    None => None,
                };
                (id, info, record)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (id, info, record) in records {
        if info.unanswered && record.is_none() {
            // Never acknowledged and unknown to the system: not in the ledger.
            continue;
        }
        ledger.expect(id.clone(), info.expected);
        if info.refused {
            ledger.observe(id.clone(), Observation::Refused);
        }
        let Some(record) = record else { continue };
        let status = record["status"].as_str().unwrap_or("?").to_owned();
        let history = record["history"].as_array().cloned().unwrap_or_default();
        let priority = record["intent"]["priority"].as_u64().unwrap_or(0);
        let is_critical = critical.is_some_and(|c| priority >= u64::from(c));
        let ever_parked = history.iter().any(|h| h["status"] == "shed");
        if is_critical {
            fates.critical += 1;
            fates.critical_completed += u64::from(status == "completed");
        }
        if ever_parked {
            fates.ever_parked += 1;
            fates.replayed_completed += u64::from(status == "completed");
        }
        let completions = history
            .iter()
            .filter(|h| h["status"] == "completed")
            .count();
        match status.as_str() {
            "completed" => {
                for _ in 0..completions.max(1) {
                    ledger.observe(id.clone(), Observation::Completed);
                }
                let queued = history
                    .iter()
                    .find(|h| h["status"] == "queued")
                    .and_then(|h| h["at"].as_str())
                    .and_then(time::parse_ms);
                let done = history
                    .iter()
                    .rev()
                    .find(|h| h["status"] == "completed")
                    .and_then(|h| h["at"].as_str())
                    .and_then(time::parse_ms);
                if let (Some(q), Some(d)) = (queued, done) {
                    let _ = latency.record((d - q).max(1) as u64);
                }
            }
            "failed" => ledger.observe(
                id.clone(),
                Observation::Failed(format!(
                    "{status}: {}",
                    record["error"].as_str().unwrap_or("")
                )),
            ),
            "rejected" => {
                fates.rejected += 1;
                ledger.observe(
                    id.clone(),
                    Observation::Rejected(record["error"].as_str().unwrap_or("").to_owned()),
                )
            }
            "shed" if is_critical => ledger.observe(
                id.clone(),
                Observation::Failed(format!(
                    "critical (priority {priority}) yet shed into the park"
                )),
            ),
            "shed" => {
                fates.parked_now += 1;
                ledger.observe(
                    id.clone(),
                    Observation::Parked(format!(
                        "priority {priority}, shed into {} (replayable)",
                        streams::TASKS_PARKED_STREAM
                    )),
                )
            }
            other => {
                // The last transition's reason says how it got there (e.g. "replayed from the
                // park"), which is the evidence when it stays there.
                let why = history
                    .last()
                    .and_then(|h| h["reason"].as_str())
                    .map(|r| format!("{other} ({r})"))
                    .unwrap_or_else(|| other.to_owned());
                ledger.observe(id.clone(), Observation::Held(why))
            }
        }
    }
    // Completions announced for intents of this run that were never sent.
    for (id, n) in observed {
        if !sent.intents.contains_key(id) {
            for _ in 0..*n {
                ledger.observe(id.clone(), Observation::Completed);
            }
        }
    }
    ledger.classify()
}

/// Reads the cascade's events from the mesh stream and checks its shape: every stored event
/// above the expected depth has exactly `fan_out` children, nothing goes deeper.
async fn check_cascade(
    target: &Target,
    s: &Scenario,
    method: &[Injection],
    cascade: &inject::SentCascade,
    start_seq: u64,
) -> (CheckResult, BTreeMap<u64, u64>) {
    let rule_depth = method.iter().find_map(|i| match i {
        Injection::Cascade { tag, depth, .. } if *tag == cascade.tag => Some(depth.map(|d| d.0)),
        _ => None,
    });
    let _ = s;
    let limit = target.cfg.mesh.cascade_depth_limit;
    let expected_depth = rule_depth.flatten().map_or(limit, |d| d.min(limit));
    let events = read_flow(target, &cascade.tag, &cascade.correlation_id, start_seq).await;
    let mut ledger = Ledger::new();
    let mut levels: BTreeMap<u64, u64> = BTreeMap::new();
    let mut children: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for root in &cascade.roots {
        ledger.expect(root.clone(), Expected::Delivered);
    }
    for e in &events {
        let id = e["event_id"].as_str().unwrap_or("?").to_owned();
        let depth = e["depth"].as_u64().unwrap_or(0);
        *levels.entry(depth).or_default() += 1;
        if depth == 0 {
            ledger.observe(id.clone(), Observation::Completed);
        } else if let Some(parent) = e["causation_id"].as_str() {
            children
                .entry(parent.to_owned())
                .or_default()
                .push((id.clone(), depth));
        }
        if depth < expected_depth {
            for k in 0..cascade.fan_out {
                ledger.expect(format!("{id}/child-{k}"), Expected::Delivered);
            }
        }
    }
    for (parent, mut kids) in children {
        kids.sort();
        for (k, _) in kids.iter().enumerate() {
            ledger.observe(format!("{parent}/child-{k}"), Observation::Completed);
        }
    }
    (ledger.classify(), levels)
}

async fn read_flow(target: &Target, tag: &str, correlation: &str, start_seq: u64) -> Vec<Value> {
    let mut out = Vec::new();
    let Ok(stream) = target.js.get_stream(streams::MESH_STREAM).await else {
        return out;
    };
    let Ok(reader) = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: format!("mesh.test.cascade.{tag}.>"),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_seq.max(1),
            },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
    else {
        return out;
    };
    loop {
        let Ok(mut batch) = reader
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_millis(500))
            .messages()
            .await
        else {
            break;
        };
        let mut got = 0;
        while let Some(Ok(msg)) = batch.next().await {
            got += 1;
            if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload)
                && v["correlation_id"] == correlation
            {
                out.push(v);
            }
        }
        if got == 0 {
            break;
        }
    }
    out
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The JSON of a result, for the journal.
pub fn to_json(results: &[ScenarioResult]) -> Value {
    json!(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Measure, Stress};

    fn sample(t_s: f64, queue: Option<u64>, intents: f64) -> Sample {
        Sample {
            t_s,
            events_per_s: 0.0,
            intents_per_s: intents,
            queue_depth: queue,
            in_flight: None,
            healthy_workers: None,
            breaker: None,
            processed_per_s: 0.0,
        }
    }

    fn stress(at_least: f64) -> Stress {
        Stress {
            name: "deep".into(),
            measure: Measure::QueueDepth,
            at_least,
            safeguards: vec!["guard".into()],
        }
    }

    #[test]
    fn a_stress_is_measured_from_the_method_start_with_its_numbers() {
        // Before the method start (t < 0) does not count; the peak and the first crossing do.
        let timeline = [
            sample(-1.0, Some(5000), 0.0),
            sample(0.5, Some(10), 300.0),
            sample(1.5, Some(450), 420.0),
            sample(2.5, None, 0.0),
            sample(3.5, Some(900), 500.0),
        ];
        let r = StressResult::measure(&stress(400.0), &timeline);
        assert!(r.reached);
        assert_eq!(
            (r.peak, r.peak_at_s, r.reached_at_s, r.intents_per_s_then),
            (Some(900.0), Some(3.5), Some(1.5), Some(420.0))
        );
        assert!(r.describe().contains("reached"), "{}", r.describe());
        let r = StressResult::measure(&stress(1000.0), &timeline);
        assert!(!r.reached);
        let words = r.describe();
        assert!(
            words.contains("NOT reached") && words.contains("peak queue_depth 900 at 3.5 s"),
            "{words}"
        );
    }

    #[test]
    fn a_count_from_an_injection_follows_its_acts() {
        let e: Expectation = toml::from_str(
            "safeguard = \"respawn\"\nsubject = \"x\"\nmin_count = 3\nmin_count_from = \"dropout\"\n",
        )
        .expect("expectation");
        let acts = HashMap::from([("dropout".to_owned(), 2u64)]);
        let (counted, note) = counted_from_injection(&e, &acts);
        assert_eq!(counted.min_count, 2, "two workers killed, two respawns");
        assert!(note.contains("dropout did 2 act(s)"), "{note}");
        let none = HashMap::from([("dropout".to_owned(), 0u64)]);
        assert_eq!(
            counted_from_injection(&e, &none).0.min_count,
            1,
            "never 0 (that would mean: must stay silent)"
        );
        let (kept, note) = counted_from_injection(&e, &HashMap::new());
        assert_eq!(kept.min_count, 3);
        assert!(note.contains("reported no acts"), "{note}");
    }
}
