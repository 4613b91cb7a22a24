//! The host API: the only powers a playbook has. Every function is registered on the shared
//! engine by [`register`] (each acts for the run on the evaluating thread, [`Host::enter`]),
//! every call is recorded (arguments, result, whether it acted) for the step's narrative and
//! event, and every action goes through the same request a person
//! would send (`scheduler.shed`, `storm_guard.limit`, `htm.pool.respawn`...). Scripts never
//! see the NATS client: they see these functions.
//!
//! | function | kind | does |
//! |---|---|---|
//! | `queue_depth()` | read | tasks waiting in the HTM queue (`htm.readiness`) |
//! | `worker_count()` | read | healthy workers (`htm.readiness`) |
//! | `readiness()` | read | the whole `htm.readiness` reply |
//! | `pool_status()` | read | the worker pool (`htm.pool.status`) |
//! | `event_rate(type)` | read | events/s of a type over the storm window (`storm_guard.rates`) |
//! | `total_event_rate()` | read | events/s of all types |
//! | `top_source(type)` | read | the busiest publisher of a type (`""` if none) |
//! | `rates()` | read | the whole `storm_guard.rates` reply |
//! | `breaker_state()` | read | `closed`, `open` or `half_open` |
//! | `limit_event_type(type, per_s, for_s)` | act | `storm_guard.limit` |
//! | `throttle_source(source, type, per_s, for_s)` | act | `storm_guard.throttle` |
//! | `open_breaker(reason)`, `close_breaker(reason)` | act | `storm_guard.breaker.open|close` |
//! | `shed_tasks(max, below_priority, older_than_s)` | act | `scheduler.shed` |
//! | `replay_tasks(max)` | act | `scheduler.replay` |
//! | `pause_scheduler()`, `resume_scheduler()` | act | `scheduler.pause|resume` |
//! | `respawn_worker(id)`, `respawn_workers()` | act | `htm.pool.respawn` |
//! | `run_action(name, params)` | act | submits an intent of type `name`, which must have an operator action (`[actions.<name>]`), with `params` as its payload, through governance (`htm.intent.submit`, actor `playbooks`): the action runs on a worker like any other (docs/actions.md#from-a-playbook); the decision |
//! | `intent_status(id)` | read | `htm.intent.status` of an intent (e.g. the one `run_action` submitted) |
//! | `narrate(what, why)` | narrate | a 5W1H narrative from the run |
//! | `wait(seconds)` | time | sleeps, at most `playbooks.max_wait_s`, scaled by `time_scale` |
//! | `verify(retries, interval_s, check)` | time | calls the closure `check` until it returns true, up to `retries` times |
//!
//! In a dry run, reads are real and actions are recorded, not sent: they return
//! `#{dry_run: true, subject}` (with `shed: 0`, `replayed: 0` or `respawned: []` for the
//! actions whose reply scripts read); `wait` does not sleep and `verify` returns true without
//! checking.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhai::{Dynamic, Engine, EvalAltResult, FnPtr, Map, NativeCallContext};
use serde::Serialize;
use serde_json::{Value, json};

use bulwark_common::subjects;

use crate::sandbox::Stop;

/// Longest `verify` retry count.
const MAX_RETRIES: i64 = 100;

thread_local! {
    /// The run evaluating on this thread: whom the host functions act for.
    static CURRENT: std::cell::RefCell<Option<Arc<Host>>> = const { std::cell::RefCell::new(None) };
}

/// Restores the previous host (usually none) when dropped.
pub struct HostGuard(Option<Arc<Host>>);

impl Drop for HostGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// Runs `f` with the host of the run on this thread; outside a run (e.g. in `playbook()` at
/// load) every host function fails with a clear error.
fn with_host<T>(function: &str, f: impl FnOnce(&Host) -> HostResult<T>) -> HostResult<T> {
    match CURRENT.with(|c| c.borrow().clone()) {
        Some(host) => f(&host),
        None => fail(format!(
            "{function}() is only available while a playbook runs (not at load)"
        )),
    }
}

/// How the host reaches the rest of bulwark: one blocking request/reply. The service's
/// implementation sends NATS requests; the reply is the JSON body, or the error message.
pub trait Requester: Send + Sync {
    /// Sends `body` to `subject` and waits for the reply.
    fn request(&self, subject: &str, body: Value) -> Result<Value, String>;
}

/// One host call, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Call {
    /// The function.
    pub function: String,
    /// Its arguments.
    pub args: Value,
    /// What it returned (or would have, in a dry run).
    pub result: Value,
    /// Whether it changes something (an action), rather than reading.
    pub action: bool,
    /// Set when the call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A narrative a script asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Narration {
    /// What happened.
    pub what: String,
    /// Why.
    pub why: String,
}

/// The powers of one run.
pub struct Host {
    requester: Arc<dyn Requester>,
    dry_run: bool,
    stop: Stop,
    time_scale: f64,
    max_wait_s: f64,
    calls: Mutex<Vec<Call>>,
    narrations: Mutex<Vec<Narration>>,
}

type HostResult<T> = Result<T, Box<EvalAltResult>>;

fn fail<T>(message: String) -> HostResult<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        message.into(),
        rhai::Position::NONE,
    )))
}

fn number(name: &str, v: &Dynamic) -> HostResult<f64> {
    if let Ok(f) = v.as_float() {
        return Ok(f);
    }
    if let Ok(i) = v.as_int() {
        return Ok(i as f64);
    }
    fail(format!("{name} must be a number, got {}", v.type_name()))
}

fn to_dynamic(v: &Value) -> Dynamic {
    rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT)
}

impl Host {
    /// The powers of a run that sends its requests through `requester`.
    pub fn new(
        requester: Arc<dyn Requester>,
        dry_run: bool,
        stop: Stop,
        time_scale: f64,
        max_wait_s: f64,
    ) -> Arc<Self> {
        Arc::new(Self {
            requester,
            dry_run,
            stop,
            time_scale,
            max_wait_s,
            calls: Mutex::default(),
            narrations: Mutex::default(),
        })
    }

    /// The calls recorded so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Calls recorded from index `from` on.
    pub fn calls_since(&self, from: usize) -> Vec<Call> {
        self.calls
            .lock()
            .map(|c| c.get(from..).map(<[Call]>::to_vec).unwrap_or_default())
            .unwrap_or_default()
    }

    /// How many calls were recorded.
    pub fn call_count(&self) -> usize {
        self.calls.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Takes the narratives the script asked for since the last take.
    pub fn take_narrations(&self) -> Vec<Narration> {
        self.narrations
            .lock()
            .map(|mut n| std::mem::take(&mut *n))
            .unwrap_or_default()
    }

    fn record(&self, call: Call) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }

    /// A read: always sent.
    fn read(&self, function: &str, subject: &str, body: Value) -> HostResult<Value> {
        let result = self.requester.request(subject, body.clone());
        self.record(Call {
            function: function.to_owned(),
            args: body,
            result: result.clone().unwrap_or(Value::Null),
            action: false,
            error: result.as_ref().err().cloned(),
        });
        result.or_else(|e| fail(format!("{function}() failed: {e}")))
    }

    /// An action: sent, or only recorded in a dry run (which answers `#{dry_run: true}` plus
    /// the fields a script reads of the real reply, zeroed).
    fn act(&self, function: &str, subject: &str, body: Value) -> HostResult<Value> {
        let result = if self.dry_run {
            let mut reply = json!({"dry_run": true, "subject": subject});
            match function {
                "shed_tasks" => {
                    reply["shed"] = json!(0);
                    reply["queue_depth"] = Value::Null;
                }
                "replay_tasks" => reply["replayed"] = json!(0),
                "respawn_worker" | "respawn_workers" => reply["respawned"] = json!([]),
                _ => {}
            }
            Ok(reply)
        } else {
            self.requester.request(subject, body.clone())
        };
        self.record(Call {
            function: function.to_owned(),
            args: body,
            result: result.clone().unwrap_or(Value::Null),
            action: true,
            error: result.as_ref().err().cloned(),
        });
        result.or_else(|e| fail(format!("{function}() failed: {e}")))
    }

    /// Sleeps `seconds` (scaled), in slices, stopping at the run's deadline or cancellation.
    fn sleep(&self, seconds: f64) -> HostResult<()> {
        let until = Instant::now() + Duration::from_secs_f64((seconds * self.time_scale).max(0.0));
        while Instant::now() < until {
            if let Some(reason) = self.stop.reason() {
                return Err(Box::new(EvalAltResult::ErrorTerminated(
                    reason.into(),
                    rhai::Position::NONE,
                )));
            }
            let left = until.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
        Ok(())
    }

    fn wait(&self, seconds: f64) -> HostResult<()> {
        if seconds.is_nan() || seconds < 0.0 || seconds > self.max_wait_s {
            return fail(format!(
                "wait({seconds}) is outside 0..={} seconds (playbooks.max_wait_s)",
                self.max_wait_s
            ));
        }
        self.record(Call {
            function: "wait".to_owned(),
            args: json!([seconds]),
            result: Value::Null,
            action: false,
            error: None,
        });
        if self.dry_run {
            return Ok(());
        }
        self.sleep(seconds)
    }

    fn verify(
        &self,
        ctx: &NativeCallContext,
        retries: i64,
        interval_s: f64,
        check: &FnPtr,
    ) -> HostResult<bool> {
        if !(1..=MAX_RETRIES).contains(&retries) {
            return fail(format!(
                "verify: retries must be 1..={MAX_RETRIES}, got {retries}"
            ));
        }
        if interval_s.is_nan() || interval_s < 0.0 || interval_s > self.max_wait_s {
            return fail(format!(
                "verify: interval_s must be 0..={} seconds, got {interval_s}",
                self.max_wait_s
            ));
        }
        if self.dry_run {
            self.record(Call {
                function: "verify".to_owned(),
                args: json!([retries, interval_s]),
                result: json!({"dry_run": true}),
                action: false,
                error: None,
            });
            return Ok(true);
        }
        let mut attempts = 0;
        let mut passed = false;
        for attempt in 1..=retries {
            attempts = attempt;
            let ok: bool = check.call_within_context(ctx, ())?;
            if ok {
                passed = true;
                break;
            }
            if attempt < retries {
                self.sleep(interval_s)?;
            }
        }
        self.record(Call {
            function: "verify".to_owned(),
            args: json!([retries, interval_s]),
            result: json!({"passed": passed, "attempts": attempts}),
            action: false,
            error: None,
        });
        Ok(passed)
    }

    /// Makes this the host of what the current thread evaluates, until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> HostGuard {
        HostGuard(CURRENT.with(|c| c.borrow_mut().replace(self.clone())))
    }

    fn rates(&self) -> HostResult<Value> {
        self.read("rates", subjects::STORM_GUARD_RATES, json!({}))
    }
}

/// A read for the run on this thread.
fn read(function: &str, subject: &str, body: Value) -> HostResult<Value> {
    with_host(function, |h| h.read(function, subject, body))
}

/// An action for the run on this thread.
fn act(function: &str, subject: &str, body: Value) -> HostResult<Value> {
    with_host(function, |h| h.act(function, subject, body))
}

/// Registers every host function on `engine`; each acts for the run on the evaluating thread
/// ([`Host::enter`]).
pub fn register(engine: &mut Engine) {
    engine.register_fn("readiness", move || -> HostResult<Dynamic> {
        Ok(to_dynamic(&read(
            "readiness",
            subjects::HTM_READINESS,
            json!({}),
        )?))
    });
    engine.register_fn("queue_depth", move || -> HostResult<i64> {
        let r = read("queue_depth", subjects::HTM_READINESS, json!({}))?;
        Ok(r["queue_depth"].as_i64().unwrap_or(0))
    });
    engine.register_fn("worker_count", move || -> HostResult<i64> {
        let r = read("worker_count", subjects::HTM_READINESS, json!({}))?;
        Ok(r["healthy_workers"].as_i64().unwrap_or(0))
    });
    engine.register_fn("pool_status", move || -> HostResult<Dynamic> {
        Ok(to_dynamic(&read(
            "pool_status",
            subjects::POOL_STATUS,
            json!({}),
        )?))
    });
    engine.register_fn("rates", move || -> HostResult<Dynamic> {
        Ok(to_dynamic(&with_host("rates", Host::rates)?))
    });
    engine.register_fn("event_rate", move |event_type: &str| -> HostResult<f64> {
        let r = read(
            "event_rate",
            subjects::STORM_GUARD_RATES,
            json!({"event_type": event_type}),
        )?;
        Ok(r["types"]
            .as_array()
            .and_then(|types| types.iter().find(|t| t["event_type"] == event_type))
            .and_then(|t| t["rate_per_second"].as_f64())
            .unwrap_or(0.0))
    });
    engine.register_fn("total_event_rate", move || -> HostResult<f64> {
        let r = read("total_event_rate", subjects::STORM_GUARD_RATES, json!({}))?;
        Ok(r["total_per_second"].as_f64().unwrap_or(0.0))
    });
    engine.register_fn(
        "top_source",
        move |event_type: &str| -> HostResult<String> {
            let r = read(
                "top_source",
                subjects::STORM_GUARD_RATES,
                json!({"event_type": event_type}),
            )?;
            Ok(r["types"]
                .as_array()
                .and_then(|types| types.iter().find(|t| t["event_type"] == event_type))
                .and_then(|t| t["top_sources"][0][0].as_str())
                .unwrap_or("")
                .to_owned())
        },
    );
    engine.register_fn("breaker_state", move || -> HostResult<String> {
        let r = read("breaker_state", subjects::STORM_GUARD_RATES, json!({}))?;
        Ok(r["breaker"]["state"]
            .as_str()
            .unwrap_or("unknown")
            .to_owned())
    });

    engine.register_fn(
        "limit_event_type",
        move |event_type: &str, per_second: Dynamic, for_s: Dynamic| -> HostResult<Dynamic> {
            let per_second = number("per_second", &per_second)?.round().max(0.0) as u64;
            let for_s = number("for_s", &for_s)?;
            let body = json!({"event_type": event_type, "limit_per_second": per_second,
                                  "for_s": for_s, "reason": "playbook step", "by": "playbooks"});
            Ok(to_dynamic(&act(
                "limit_event_type",
                subjects::STORM_GUARD_LIMIT,
                body,
            )?))
        },
    );
    engine.register_fn(
        "throttle_source",
        move |source: &str,
              event_type: &str,
              per_second: Dynamic,
              for_s: Dynamic|
              -> HostResult<Dynamic> {
            let per_second = number("per_second", &per_second)?.round().max(0.0) as u64;
            let for_s = number("for_s", &for_s)?;
            let body = json!({"source": source, "event_type": event_type,
                                  "limit_per_second": per_second, "for_s": for_s,
                                  "reason": "playbook step", "by": "playbooks"});
            Ok(to_dynamic(&act(
                "throttle_source",
                subjects::STORM_GUARD_THROTTLE,
                body,
            )?))
        },
    );
    engine.register_fn("open_breaker", move |reason: &str| -> HostResult<Dynamic> {
        let body = json!({"reason": reason, "by": "playbooks"});
        Ok(to_dynamic(&act(
            "open_breaker",
            subjects::STORM_GUARD_BREAKER_OPEN,
            body,
        )?))
    });
    engine.register_fn(
        "close_breaker",
        move |reason: &str| -> HostResult<Dynamic> {
            let body = json!({"reason": reason, "by": "playbooks"});
            Ok(to_dynamic(&act(
                "close_breaker",
                subjects::STORM_GUARD_BREAKER_CLOSE,
                body,
            )?))
        },
    );
    engine.register_fn(
        "shed_tasks",
        move |max: i64, below_priority: i64, older_than_s: Dynamic| -> HostResult<Dynamic> {
            let older_than_s = number("older_than_s", &older_than_s)?;
            let body = json!({"max": max.max(0), "below_priority": below_priority.clamp(0, 9),
                                  "older_than_s": older_than_s});
            Ok(to_dynamic(&act(
                "shed_tasks",
                subjects::SCHEDULER_SHED,
                body,
            )?))
        },
    );
    engine.register_fn("replay_tasks", move |max: i64| -> HostResult<Dynamic> {
        let body = json!({"max": max.max(0)});
        Ok(to_dynamic(&act(
            "replay_tasks",
            subjects::SCHEDULER_REPLAY,
            body,
        )?))
    });
    engine.register_fn("pause_scheduler", move || -> HostResult<Dynamic> {
        Ok(to_dynamic(&act(
            "pause_scheduler",
            subjects::SCHEDULER_PAUSE,
            json!({}),
        )?))
    });
    engine.register_fn("resume_scheduler", move || -> HostResult<Dynamic> {
        Ok(to_dynamic(&act(
            "resume_scheduler",
            subjects::SCHEDULER_RESUME,
            json!({}),
        )?))
    });
    engine.register_fn(
        "respawn_worker",
        move |worker_id: &str| -> HostResult<Dynamic> {
            let body = json!({"worker_id": worker_id});
            Ok(to_dynamic(&act(
                "respawn_worker",
                subjects::POOL_RESPAWN,
                body,
            )?))
        },
    );
    engine.register_fn("respawn_workers", move || -> HostResult<Dynamic> {
        Ok(to_dynamic(&act(
            "respawn_workers",
            subjects::POOL_RESPAWN,
            json!({}),
        )?))
    });

    engine.register_fn(
        "run_action",
        move |name: &str, params: Map| -> HostResult<Dynamic> {
            let payload: Value = rhai::serde::from_dynamic(&Dynamic::from_map(params))
                .map_err(|e| format!("run_action: params: {e}"))
                .or_else(fail)?;
            let body = json!({"intent_type": name, "actor": "playbooks", "payload": payload,
                              "mission_context": {"resilience_impact": true}});
            Ok(to_dynamic(&act(
                "run_action",
                subjects::INTENT_SUBMIT,
                body,
            )?))
        },
    );
    engine.register_fn("intent_status", move |id: &str| -> HostResult<Dynamic> {
        Ok(to_dynamic(&read(
            "intent_status",
            subjects::INTENT_STATUS,
            json!({ "intent_id": id }),
        )?))
    });
    engine.register_fn("narrate", move |what: &str, why: &str| -> HostResult<()> {
        with_host("narrate", |h| {
            if let Ok(mut n) = h.narrations.lock() {
                n.push(Narration {
                    what: what.to_owned(),
                    why: why.to_owned(),
                });
            }
            Ok(())
        })
    });
    engine.register_fn("wait", move |seconds: Dynamic| -> HostResult<()> {
        let seconds = number("seconds", &seconds)?;
        with_host("wait", |h| h.wait(seconds))
    });
    engine.register_fn(
        "verify",
        move |ctx: NativeCallContext,
              retries: i64,
              interval_s: Dynamic,
              check: FnPtr|
              -> HostResult<bool> {
            let interval_s = number("interval_s", &interval_s)?;
            with_host("verify", |h| h.verify(&ctx, retries, interval_s, &check))
        },
    );
}

/// Converts a step's parameters to the map scripts see as `p`.
pub fn params_to_map(params: &serde_json::Map<String, Value>) -> Map {
    to_dynamic(&Value::Object(params.clone()))
        .try_cast::<Map>()
        .unwrap_or_default()
}
