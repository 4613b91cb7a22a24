//! One playbook run, start to end, on the calling (blocking) thread: its steps in order, the
//! final verification, and the rollback when a step or the verification fails. The service
//! calls [`execute`] inside `spawn_blocking`, so a script never holds an async thread.
//!
//! Each step's result map is merged into the parameters `p` of the steps after it; each step
//! is reported through `progress` as it ends, with the host calls it made.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rhai::{CallFnOptions, Dynamic, Map, Scope};
use serde::Serialize;
use serde_json::Value;

use crate::host::{self, Call, Host, Narration, Requester};
use crate::playbook::Playbook;
use crate::sandbox::{self, Limits, Packages, ScriptError, Stop};

impl Settings {
    /// Settings with one hardened engine built from `packages` and `limits`.
    pub fn new(
        packages: &Packages,
        limits: Limits,
        time_scale: f64,
        max_wait_s: f64,
        max_run_s: f64,
    ) -> Self {
        Self {
            engine: Arc::new(sandbox::engine(packages, &limits)),
            limits,
            time_scale,
            max_wait_s,
            max_run_s,
        }
    }
}

/// The settings every run shares.
#[derive(Clone)]
pub struct Settings {
    /// The hardened engine every run evaluates on (host functions registered).
    pub engine: Arc<rhai::Engine>,
    /// The sandbox's limits.
    pub limits: Limits,
    /// Multiplier of every wait.
    pub time_scale: f64,
    /// Longest single wait, seconds.
    pub max_wait_s: f64,
    /// Longest run, seconds.
    pub max_run_s: f64,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The playbook.
    pub playbook: Playbook,
    /// Its bound parameters.
    pub params: serde_json::Map<String, Value>,
    /// The run's id.
    pub run_id: String,
    /// Record actions instead of sending them.
    pub dry_run: bool,
}

/// Which part of the run a step record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One of the playbook's steps.
    Step,
    /// The final verification.
    Verify,
    /// The rollback.
    Rollback,
}

/// One finished step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRecord {
    /// 1-based position among the steps (verify and rollback follow them).
    pub index: usize,
    /// Step, verification or rollback.
    pub phase: Phase,
    /// The function.
    pub run: String,
    /// Its title.
    pub title: String,
    /// Whether it succeeded (for verify: passed).
    pub ok: bool,
    /// What it returned.
    pub result: Value,
    /// The host calls it made.
    pub calls: Vec<Call>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it took, milliseconds.
    pub duration_ms: u64,
}

/// What a run reports while it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A step (or the verification, or the rollback) ended.
    Step(StepRecord),
    /// The script asked for a narrative.
    Narration(Narration),
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every step ran and the verification passed.
    Completed,
    /// A step or the verification failed (the rollback, if any, ran).
    Failed,
}

/// A finished run.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The run.
    pub run_id: String,
    /// The playbook.
    pub playbook: String,
    /// Completed or failed.
    pub status: Status,
    /// Whether actions were only recorded.
    pub dry_run: bool,
    /// The parameters, after the steps' results were merged in.
    pub params: Value,
    /// Every step record, in order.
    pub steps: Vec<StepRecord>,
    /// The final verification's result, when it ran.
    pub verified: Option<bool>,
    /// Whether a rollback ran, and whether it succeeded.
    pub rollback: Option<bool>,
    /// Why it failed.
    pub error: Option<String>,
    /// The kind of failure (`verification`, or a [`ScriptError`] kind).
    pub error_kind: Option<String>,
    /// Every action the run took (or would take, in a dry run).
    pub actions: Vec<Call>,
    /// How long it took, milliseconds.
    pub duration_ms: u64,
}

/// Runs `plan` to the end. `cancelled` stops it between operations (the runner shutting down).
pub fn execute(
    plan: &Plan,
    settings: &Settings,
    requester: Arc<dyn Requester>,
    cancelled: Arc<AtomicBool>,
    progress: &dyn Fn(Progress),
) -> Outcome {
    let started = Instant::now();
    let meta = &plan.playbook.meta;
    let run_s = (meta.slo_s * 2.0).min(settings.max_run_s).max(0.001);
    let stop = Stop {
        deadline: Instant::now() + Duration::from_secs_f64(run_s),
        cancelled: cancelled.clone(),
    };
    let host = Host::new(
        requester.clone(),
        plan.dry_run,
        stop.clone(),
        settings.time_scale,
        settings.max_wait_s,
    );
    let engine = &*settings.engine;
    let stop_guard = sandbox::enter_stop(stop);
    let host_guard = host.enter();
    let mut p = host::params_to_map(&plan.params);
    let mut steps = Vec::new();
    let mut failure: Option<(String, String)> = None;
    let mut verified = None;

    let call = |engine: &rhai::Engine, function: &str, p: &Map| -> Result<Dynamic, ScriptError> {
        let options = CallFnOptions::new().eval_ast(false);
        engine
            .call_fn_with_options::<Dynamic>(
                options,
                &mut Scope::new(),
                &plan.playbook.ast,
                function,
                (Dynamic::from_map(p.clone()),),
            )
            .map_err(|err| ScriptError::from_eval(&err, &settings.limits))
    };
    let report = |record: StepRecord, steps: &mut Vec<StepRecord>| {
        for n in host.take_narrations() {
            progress(Progress::Narration(n));
        }
        progress(Progress::Step(record.clone()));
        steps.push(record);
    };

    for (i, step) in meta.steps.iter().enumerate() {
        let step_started = Instant::now();
        let first_call = host.call_count();
        let result = call(engine, &step.run, &p);
        let (ok, value, error) = match result {
            Ok(value) => {
                let json = dynamic_to_json(&value);
                if let Some(map) = value.try_cast::<Map>() {
                    for (k, v) in map {
                        p.insert(k, v);
                    }
                }
                (true, json, None)
            }
            Err(err) => {
                let message = format!(
                    "step {} ({}) failed at {}: {}",
                    i + 1,
                    step.run,
                    err.location(),
                    err.message
                );
                failure = Some((message.clone(), err.kind.to_owned()));
                (false, Value::Null, Some(message))
            }
        };
        report(
            StepRecord {
                index: i + 1,
                phase: Phase::Step,
                run: step.run.clone(),
                title: step.title.clone(),
                ok,
                result: value,
                calls: host.calls_since(first_call),
                error,
                duration_ms: step_started.elapsed().as_millis() as u64,
            },
            &mut steps,
        );
        if failure.is_some() {
            break;
        }
    }

    if failure.is_none()
        && let Some(verify) = &meta.verify
    {
        let step_started = Instant::now();
        let first_call = host.call_count();
        let (ok, error) = match call(engine, verify, &p) {
            Ok(v) => match v.as_bool() {
                Ok(true) => (true, None),
                Ok(false) if plan.dry_run => (true, None),
                Ok(false) => {
                    let message = format!(
                        "verification {verify} failed: the system is not in the expected state"
                    );
                    failure = Some((message.clone(), "verification".to_owned()));
                    (false, Some(message))
                }
                Err(kind) => {
                    let message =
                        format!("verification {verify} must return true or false, returned {kind}");
                    failure = Some((message.clone(), "verification".to_owned()));
                    (false, Some(message))
                }
            },
            Err(err) => {
                let message = format!(
                    "verification {verify} failed at {}: {}",
                    err.location(),
                    err.message
                );
                failure = Some((message.clone(), err.kind.to_owned()));
                (false, Some(message))
            }
        };
        verified = Some(ok);
        report(
            StepRecord {
                index: meta.steps.len() + 1,
                phase: Phase::Verify,
                run: verify.clone(),
                title: format!("Verify ({verify})"),
                ok,
                result: Value::Bool(ok),
                calls: host.calls_since(first_call),
                error,
                duration_ms: step_started.elapsed().as_millis() as u64,
            },
            &mut steps,
        );
    }

    drop(host_guard);
    drop(stop_guard);
    let mut rollback = None;
    if let (Some((message, _)), Some(undo)) = (&failure, &meta.rollback) {
        // The rollback gets a deadline of its own: the run's may be what failed.
        let stop = Stop {
            deadline: Instant::now() + Duration::from_secs_f64(meta.slo_s.min(settings.max_run_s)),
            cancelled,
        };
        let rollback_host = Host::new(
            requester,
            plan.dry_run,
            stop.clone(),
            settings.time_scale,
            settings.max_wait_s,
        );
        let _stop = sandbox::enter_stop(stop);
        let _host = rollback_host.enter();
        let mut p = p.clone();
        p.insert("failure".into(), Dynamic::from(message.clone()));
        let step_started = Instant::now();
        let result = call(engine, undo, &p);
        let (ok, error) = match result {
            Ok(_) => (true, None),
            Err(err) => (
                false,
                Some(format!(
                    "rollback {undo} failed at {}: {}",
                    err.location(),
                    err.message
                )),
            ),
        };
        rollback = Some(ok);
        for n in rollback_host.take_narrations() {
            progress(Progress::Narration(n));
        }
        let calls = rollback_host.calls();
        let record = StepRecord {
            index: steps.len() + 1,
            phase: Phase::Rollback,
            run: undo.clone(),
            title: format!("Roll back ({undo})"),
            ok,
            result: Value::Bool(ok),
            calls: calls.clone(),
            error,
            duration_ms: step_started.elapsed().as_millis() as u64,
        };
        progress(Progress::Step(record.clone()));
        steps.push(record);
    }

    let actions: Vec<Call> = steps
        .iter()
        .flat_map(|s| s.calls.iter().filter(|c| c.action).cloned())
        .collect();
    Outcome {
        run_id: plan.run_id.clone(),
        playbook: meta.name.clone(),
        status: if failure.is_some() {
            Status::Failed
        } else {
            Status::Completed
        },
        dry_run: plan.dry_run,
        params: dynamic_to_json(&Dynamic::from_map(p)),
        steps,
        verified,
        rollback,
        error: failure.as_ref().map(|(m, _)| m.clone()),
        error_kind: failure.map(|(_, k)| k),
        actions,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

/// A script value as JSON (`null` for what JSON cannot hold).
pub fn dynamic_to_json(value: &Dynamic) -> Value {
    if value.is_unit() {
        return Value::Null;
    }
    rhai::serde::from_dynamic::<Value>(value).unwrap_or_else(|_| Value::String(value.to_string()))
}
