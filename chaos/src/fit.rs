//! The FIT injections (failure injection under production load): status queries over the
//! request API, human reviews that approve or reject, seeded random outages of bulwark's
//! dependencies, and an open-loop ramp of offered intents.
//!
//! Every API operation is counted with its outcome after the client's retries in
//! [`ApiTally`] (the error rate of FIT01); query latencies go to
//! [`Sent::query_ms`](crate::inject::Sent::query_ms); intents sent are recorded in
//! [`Sent::intents`](crate::inject::Sent::intents) like those of `submit_intents`, so the checker
//! classifies them the same way (a rejected review must end `rejected` and never run).
//!
//! Subjects: `htm.intent.submit`, `htm.intent.status`, `governance.review.decide` (requests);
//! the outages act on the runner's own stack ([`crate::stack`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulwark_common::{api, subjects};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::checker::Expected;
use crate::inject::{Ctx, Rng, SentIntent};

/// What an injection achieved (figures, load share), or why it could not be made.
pub type Done = Result<(Value, Option<f64>), String>;

/// Examples of failed operations kept.
const EXAMPLES: usize = 10;

/// API operations by kind, and those that failed after the client's retries.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ApiTally {
    /// Operations made, by kind (`status_query`, `review_decide`).
    pub ops: BTreeMap<String, u64>,
    /// Operations that failed, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Up to ten failures, in words.
    pub examples: Vec<String>,
}

impl ApiTally {
    fn record(&mut self, kind: &str, failure: Option<String>) {
        *self.ops.entry(kind.to_owned()).or_default() += 1;
        if let Some(why) = failure {
            *self.errors.entry(kind.to_owned()).or_default() += 1;
            if self.examples.len() < EXAMPLES {
                self.examples.push(format!("{kind}: {why}"));
            }
        }
    }

    /// Operations in all.
    pub fn total_ops(&self) -> u64 {
        self.ops.values().sum()
    }

    /// Failed operations in all.
    pub fn total_errors(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One answered request: the micro error code (when it is an error) and the JSON body.
struct Answer {
    code: Option<String>,
    body: Value,
}

/// One request with a timeout; `None` when nothing answered in time.
async fn request(ctx: &Ctx, subject: &str, body: String, timeout: Duration) -> Option<Answer> {
    let reply = tokio::time::timeout(
        timeout,
        ctx.target.client.request(subject.to_owned(), body.into()),
    )
    .await
    .ok()?
    .ok()?;
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(api::SERVICE_ERROR_CODE))
        .map(|v| v.to_string());
    Some(Answer {
        code,
        body: serde_json::from_slice(&reply.payload).unwrap_or(Value::Null),
    })
}

/// How a submission ended after its attempts.
enum Submission {
    /// Accepted; the decision and the latency of the answered attempt.
    Accepted(Value, u64),
    /// Refused as invalid (400).
    Refused(String),
    /// Refused for overload (503 or 429) at the last attempt: not acknowledged.
    Overloaded(String),
    /// No answer at all.
    Unanswered,
}

/// Submits `body` up to `attempts` times with the same intent id (503s, 429s and timeouts are
/// retried, as the contract suggests).
async fn submit(ctx: &Ctx, body: &str, attempts: u64, timeout: Duration) -> Submission {
    let mut backoff = Duration::from_millis(100);
    let mut last = Submission::Unanswered;
    for attempt in 0..attempts {
        let started = Instant::now();
        match request(ctx, subjects::INTENT_SUBMIT, body.to_owned(), timeout).await {
            Some(Answer { code: None, body }) => {
                return Submission::Accepted(body, started.elapsed().as_millis() as u64);
            }
            Some(Answer {
                code: Some(code),
                body,
            }) => {
                let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
                if code == "400" {
                    return Submission::Refused(message);
                }
                last = Submission::Overloaded(format!("{code} {message}"));
            }
            None => last = Submission::Unanswered,
        }
        if attempt + 1 < attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    last
}

fn intent_body(id: &str, intent_type: &str, priority: u8, work_ms: u64) -> String {
    json!({"intent_id": id, "intent_type": intent_type, "actor": "chaos", "priority": priority,
           "payload": {"work_ms": work_ms}, "mission_context": {"resilience_impact": true}})
    .to_string()
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Accepted intents of this run, to query.
async fn known_ids(ctx: &Ctx) -> Vec<String> {
    let prefix = format!("chaos-{}-", ctx.run);
    let mut ids: Vec<String> = ctx
        .sent
        .lock()
        .await
        .intents
        .iter()
        .filter(|(id, i)| id.starts_with(&prefix) && !i.refused && !i.unanswered)
        .map(|(id, _)| id.clone())
        .collect();
    ids.sort();
    ids
}

/// `query_status`: `htm.intent.status` at `rate` for `duration_s`, each for an accepted intent
/// of this run picked at random; an answer that is not the intent's status is an error.
pub async fn query_status(ctx: &Ctx, rate: u64, duration_s: f64, concurrency: usize) -> Done {
    let total = (rate as f64 * duration_s).round() as u64;
    let mut rng = Rng::new(ctx.seed ^ 0x0051_A705);
    let limit = Arc::new(Semaphore::new(concurrency));
    let start = tokio::time::Instant::now();
    let mut ids: Vec<String> = Vec::new();
    let mut refreshed = start;
    let mut tasks = tokio::task::JoinSet::new();
    let mut skipped = 0u64;
    let ctx = Arc::new(ctx.clone());
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        if ids.is_empty() || refreshed.elapsed() > Duration::from_secs(1) {
            ids = known_ids(&ctx).await;
            refreshed = tokio::time::Instant::now();
        }
        if ids.is_empty() {
            // Nothing accepted yet to ask about.
            skipped += 1;
            continue;
        }
        let id = ids[rng.below(ids.len())].clone();
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let began = Instant::now();
            let body = json!({ "intent_id": id }).to_string();
            let mut failure = None;
            for attempt in 0..3 {
                match request(
                    &ctx,
                    subjects::INTENT_STATUS,
                    body.clone(),
                    Duration::from_secs(2),
                )
                .await
                {
                    Some(Answer { code: None, body })
                        if body["intent_id"] == id.as_str() && body["status"].is_string() =>
                    {
                        failure = None;
                        break;
                    }
                    Some(Answer { code, body }) => {
                        // A refusal (unknown intent, bad request): retrying changes nothing.
                        let refused = code.as_deref().is_some_and(|c| c.starts_with('4'));
                        failure = Some(format!(
                            "{id}: answered {} {}",
                            code.unwrap_or_default(),
                            body
                        ));
                        if refused {
                            break;
                        }
                    }
                    None => failure = Some(format!("{id}: no answer within 2 s")),
                }
                if attempt < 2 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            drop(permit);
            let ms = began.elapsed().as_millis() as u64;
            let mut s = ctx.sent.lock().await;
            if failure.is_none() {
                let _ = s.query_ms.record(ms.max(1));
            }
            s.api.record("status_query", failure);
        });
        while let Some(Some(_)) = futures::FutureExt::now_or_never(tasks.join_next()) {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let s = ctx.sent.lock().await;
    let made = s.api.ops.get("status_query").copied().unwrap_or(0);
    let failed = s.api.errors.get("status_query").copied().unwrap_or(0);
    Ok((
        json!({"asked": total, "made": made, "failed": failed, "skipped_nothing_to_ask": skipped,
               "asked_rate_per_s": rate, "elapsed_s": round1(elapsed),
               "achieved_rate_per_s": round1(made as f64 / elapsed.max(0.001))}),
        Some((made as f64 / total.max(1) as f64).min(1.0)),
    ))
}

/// What `review_intents` sends.
pub struct ReviewPlan {
    /// Intents per second.
    pub rate: u64,
    /// How long.
    pub duration_s: f64,
    /// In flight at most.
    pub concurrency: usize,
    /// Share rejected.
    pub reject_share: f64,
    /// Tier-0 intent type.
    pub intent_type: String,
    /// Work of the approved ones.
    pub work_ms: u64,
    /// Fixed priority, or cycling 0-9.
    pub priority: Option<u8>,
}

/// How one review went.
enum Reviewed {
    /// Decided as planned.
    Decided,
    /// Submitted, but not routed to review (a misconfigured type).
    NotForReview(String),
    /// Never acknowledged (no answer to the submission, the system does not know it).
    Unacknowledged,
    /// Acknowledged, and the decision never went through.
    Undecided(String),
}

/// `review_intents`: tier-0 intents submitted at a rate; each is then approved or rejected on
/// `governance.review.decide` as a reviewer would, retried until it goes through.
pub async fn review_intents(ctx: &Ctx, index: usize, plan: ReviewPlan) -> Done {
    let total = (plan.rate as f64 * plan.duration_s).round() as u64;
    let mut rng = Rng::new(ctx.seed ^ 0x004E_E1E3);
    let rejects = (plan.reject_share * total as f64).round() as usize;
    let mut order: Vec<usize> = (0..total as usize).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut reject = vec![false; total as usize];
    for &i in order.iter().take(rejects) {
        reject[i] = true;
    }
    let plan = Arc::new(plan);
    let limit = Arc::new(Semaphore::new(plan.concurrency));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let ctx = Arc::new(ctx.clone());
    let misrouted: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / plan.rate as f64);
        tokio::time::sleep_until(due).await;
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let misrouted = misrouted.clone();
        let id = format!("chaos-{}-{index}-{n}", ctx.run);
        let is_reject = reject[n as usize];
        let priority = plan.priority.unwrap_or((n % 10) as u8);
        let body = intent_body(&id, &plan.intent_type, priority, plan.work_ms);
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let outcome = review_one(&ctx, &id, &body, is_reject).await;
            drop(permit);
            bump(&ctx.live.intents_sent);
            let expected = if is_reject {
                Expected::Rejected
            } else {
                Expected::Delivered
            };
            let mut record = SentIntent {
                expected,
                refused: false,
                unanswered: false,
            };
            let mut s = ctx.sent.lock().await;
            match &outcome {
                Reviewed::Decided | Reviewed::Undecided(_) => {
                    bump(&ctx.live.intents_accepted);
                }
                Reviewed::NotForReview(why) => {
                    bump(&ctx.live.intents_accepted);
                    record.expected = Expected::Delivered;
                    if let Ok(mut first) = misrouted.lock() {
                        first.get_or_insert_with(|| why.clone());
                    }
                }
                Reviewed::Unacknowledged => {
                    bump(&ctx.live.intents_unanswered);
                    record.unanswered = true;
                }
            }
            let failure = match outcome {
                Reviewed::Undecided(why) => Some(format!("{id}: {why}")),
                _ => None,
            };
            if !record.unanswered {
                s.api.record("review_decide", failure);
            }
            s.intents.insert(id, record);
        });
        while let Some(Some(_)) = futures::FutureExt::now_or_never(tasks.join_next()) {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(why) = misrouted.lock().ok().and_then(|m| m.clone()) {
        return Err(format!(
            "review_intents: {} does not go to human review here: {why}",
            plan.intent_type
        ));
    }
    let s = ctx.sent.lock().await;
    let prefix = format!("chaos-{}-{index}-", ctx.run);
    let mine: Vec<&SentIntent> = s
        .intents
        .iter()
        .filter(|(id, _)| id.starts_with(&prefix))
        .map(|(_, v)| v)
        .collect();
    let unanswered = mine.iter().filter(|i| i.unanswered).count();
    let decided = s.api.ops.get("review_decide").copied().unwrap_or(0);
    let undecided = s.api.errors.get("review_decide").copied().unwrap_or(0);
    let answered = mine.len() - unanswered;
    Ok((
        json!({"asked": total, "to_reject": rejects, "intent_type": plan.intent_type,
               "acknowledged": answered, "unacknowledged": unanswered,
               "decisions": decided, "decisions_failed": undecided,
               "elapsed_s": round1(elapsed)}),
        Some((answered as f64 / total.max(1) as f64).min(1.0)),
    ))
}

async fn review_one(ctx: &Ctx, id: &str, body: &str, reject: bool) -> Reviewed {
    let submitted = submit(ctx, body, 8, Duration::from_secs(5)).await;
    match submitted {
        Submission::Accepted(decision, _) => {
            if decision["status"] != "pending_review" {
                return Reviewed::NotForReview(format!(
                    "{id} was routed to {} (status {}), not to human review",
                    decision["routed_to"], decision["status"]
                ));
            }
        }
        Submission::Refused(why) => {
            return Reviewed::NotForReview(format!("{id} refused: {why}"));
        }
        // The client does not know whether it was stored: it decides anyway, and the answer
        // (404 unknown intent) says it was never acknowledged.
        Submission::Overloaded(_) | Submission::Unanswered => {}
    }
    let verdict = if reject { "reject" } else { "approve" };
    let decide = json!({"intent_id": id, "decision": verdict, "reviewer": "chaos_reviewer",
                        "reason": "FIT01 production load"})
    .to_string();
    let mut backoff = Duration::from_millis(200);
    let mut last = String::from("never answered");
    for _ in 0..20 {
        match request(
            ctx,
            subjects::REVIEW_DECIDE,
            decide.clone(),
            Duration::from_secs(5),
        )
        .await
        {
            Some(Answer { code: None, body }) if body["status"].is_string() => {
                return Reviewed::Decided;
            }
            Some(Answer {
                code: Some(code),
                body,
            }) if code == "409" => {
                // Decided already (a reply lost to an outage): the status says which way.
                let status = request(
                    ctx,
                    subjects::INTENT_STATUS,
                    json!({ "intent_id": id }).to_string(),
                    Duration::from_secs(5),
                )
                .await;
                let now = status
                    .as_ref()
                    .and_then(|a| a.body["status"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let as_planned = if reject {
                    now == "rejected"
                } else {
                    !matches!(now.as_str(), "rejected" | "pending_review" | "")
                };
                if as_planned {
                    return Reviewed::Decided;
                }
                last = format!("409 {} (status {now})", body["error"]["message"]);
            }
            Some(Answer {
                code: Some(code), ..
            }) if code == "404" => {
                // Unknown intent: the submission was never acknowledged.
                return Reviewed::Unacknowledged;
            }
            Some(Answer { code, body }) => {
                last = format!("{} {}", code.unwrap_or_default(), body);
            }
            None => last = "no answer within 5 s".into(),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    Reviewed::Undecided(last)
}

/// One planned outage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutagePlan {
    /// What goes down.
    pub target: String,
    /// Seconds after the injection starts.
    pub at_s: f64,
    /// How long it stays down.
    pub down_s: f64,
}

/// The seeded plan of `random_outage`: `outages` outages one after the other within `over_s`,
/// each in its own slot of `over_s / outages` seconds, targets drawn from `targets` (every one
/// once in a random order before any repeats), lengths uniform in `[min_down_s, max_down_s]`
/// (at most the slot).
pub fn outage_plan(
    seed: u64,
    over_s: f64,
    outages: u64,
    targets: &[String],
    min_down_s: f64,
    max_down_s: f64,
) -> Vec<OutagePlan> {
    let mut rng = Rng::new(seed ^ 0x000D_7A6E);
    let mut order: Vec<String> = targets.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let slot = over_s / outages.max(1) as f64;
    (0..outages as usize)
        .map(|i| {
            let target = if i < order.len() {
                order[i].clone()
            } else {
                targets[rng.below(targets.len())].clone()
            };
            let down = (min_down_s + rng.unit() * (max_down_s - min_down_s)).min(slot);
            let at = slot * i as f64 + rng.unit() * (slot - down).max(0.0);
            OutagePlan {
                target,
                at_s: round1(at),
                down_s: round1(down),
            }
        })
        .collect()
}

/// `random_outage`: runs the seeded plan against the runner's own stack.
pub async fn random_outage(
    ctx: &Ctx,
    over_s: f64,
    outages: u64,
    targets: &[String],
    (min_down_s, max_down_s): (f64, f64),
) -> Done {
    let Some(stack) = &ctx.target.stack else {
        return Err(
            "random_outage needs the runner's own stack (run without --nats-url)".to_owned(),
        );
    };
    let plan = outage_plan(ctx.seed, over_s, outages, targets, min_down_s, max_down_s);
    let start = tokio::time::Instant::now();
    let mut done = Vec::new();
    for o in &plan {
        tokio::time::sleep_until(start + Duration::from_secs_f64(o.at_s)).await;
        let began = ctx.t0.elapsed().as_secs_f64();
        let down = Duration::from_secs_f64(o.down_s);
        let result = match o.target.as_str() {
            "nats" => stack.lock().await.restart_nats(down).await,
            target => {
                let service = if target == "workers" {
                    "htm_pool"
                } else {
                    target
                };
                let crashed = stack.lock().await.crash_service(service);
                match crashed {
                    Ok(()) => {
                        tokio::time::sleep(down).await;
                        stack.lock().await.start_again(service).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            return Err(format!(
                "outage of {} at {began:.1} s could not be healed: {e:#}",
                o.target
            ));
        }
        if o.target == "workers" {
            bump(&ctx.live.kills);
        }
        done.push(
            json!({"target": o.target, "at_s": round1(began), "down_s": o.down_s,
                         "back_at_s": round1(ctx.t0.elapsed().as_secs_f64())}),
        );
    }
    Ok((json!({"plan": plan, "outages": done}), None))
}

/// What `ramp_intents` offers.
pub struct RampPlan {
    /// Offered rate at the start.
    pub from: u64,
    /// Offered rate at the end.
    pub to: u64,
    /// Length of the ramp.
    pub duration_s: f64,
    /// Submissions waiting at most.
    pub max_in_flight: usize,
    /// Queued-at-once type.
    pub intent_type: String,
    /// Work per task.
    pub work_ms: u64,
    /// Attempts per intent.
    pub attempts: u64,
    /// Per attempt.
    pub timeout: Duration,
}

/// Intents offered by `t` seconds into a ramp from `from` to `to` per second over `d` seconds.
pub fn ramp_offered(from: f64, to: f64, d: f64, t: f64) -> f64 {
    let t = t.clamp(0.0, d);
    from * t + (to - from) * t * t / (2.0 * d.max(1e-9))
}

/// `ramp_intents`: the open-loop ramp of offered intents, priorities cycling 0-9.
pub async fn ramp_intents(ctx: &Ctx, index: usize, plan: RampPlan) -> Done {
    let (from, to, d) = (plan.from as f64, plan.to as f64, plan.duration_s);
    let total = ramp_offered(from, to, d, d).round() as u64;
    let in_flight = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(RampCounts::default());
    let plan = Arc::new(plan);
    let ctx = Arc::new(ctx.clone());
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut offered = 0u64;
    let mut not_sent = 0u64;
    let mut peak = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while offered < total {
        tick.tick().await;
        let due = (ramp_offered(from, to, d, start.elapsed().as_secs_f64()) as u64).min(total);
        while offered < due {
            let n = offered;
            offered += 1;
            let waiting = in_flight.load(Ordering::Relaxed);
            if waiting >= plan.max_in_flight as u64 {
                not_sent += 1;
                continue;
            }
            peak = peak.max(waiting + 1);
            in_flight.fetch_add(1, Ordering::Relaxed);
            let id = format!("chaos-{}-{index}-{n}", ctx.run);
            let priority = (n % 10) as u8;
            let body = intent_body(&id, &plan.intent_type, priority, plan.work_ms);
            let (ctx, plan, in_flight, counts) =
                (ctx.clone(), plan.clone(), in_flight.clone(), counts.clone());
            tasks.spawn(async move {
                let outcome = submit(&ctx, &body, plan.attempts, plan.timeout).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                bump(&ctx.live.intents_sent);
                let mut record = SentIntent {
                    expected: Expected::Delivered,
                    refused: false,
                    unanswered: false,
                };
                let mut s = ctx.sent.lock().await;
                match outcome {
                    Submission::Accepted(_, ms) => {
                        bump(&ctx.live.intents_accepted);
                        bump(&counts.accepted);
                        let _ = s.submit_ms.record(ms.max(1));
                    }
                    Submission::Refused(_) => {
                        bump(&ctx.live.intents_refused);
                        bump(&counts.refused_400);
                        record.refused = true;
                    }
                    Submission::Overloaded(why) => {
                        bump(&ctx.live.intents_unanswered);
                        bump(&counts.overloaded);
                        if let Ok(mut first) = counts.overload_example.lock() {
                            first.get_or_insert(why);
                        }
                        record.unanswered = true;
                    }
                    Submission::Unanswered => {
                        bump(&ctx.live.intents_unanswered);
                        bump(&counts.unanswered);
                        record.unanswered = true;
                    }
                }
                s.intents.insert(id, record);
            });
        }
        while let Some(Some(_)) = futures::FutureExt::now_or_never(tasks.join_next()) {}
    }
    let offer_s = start.elapsed().as_secs_f64();
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let sent = offered - not_sent;
    let accepted = get(&counts.accepted);
    Ok((
        json!({"from_per_s": plan.from, "to_per_s": plan.to, "duration_s": plan.duration_s,
               "offered": offered, "sent": sent, "not_sent_generator_limit": not_sent,
               "max_in_flight": plan.max_in_flight, "peak_in_flight": peak,
               "accepted": accepted, "refused_400": get(&counts.refused_400),
               "refused_overload_503_429": get(&counts.overloaded),
               "overload_example": counts.overload_example.lock().ok().and_then(|e| e.clone()),
               "unanswered": get(&counts.unanswered),
               "offer_s": round1(offer_s), "elapsed_s": round1(elapsed),
               "achieved_offer_per_s": round1(offered as f64 / offer_s.max(0.001)),
               "accepted_per_s": round1(accepted as f64 / elapsed.max(0.001))}),
        Some((sent as f64 / total.max(1) as f64).min(1.0)),
    ))
}

#[derive(Default)]
struct RampCounts {
    /// The first overload refusal, for the journal.
    overload_example: std::sync::Mutex<Option<String>>,
    accepted: AtomicU64,
    refused_400: AtomicU64,
    overloaded: AtomicU64,
    unanswered: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_outage_plan_replays_and_covers_every_target() {
        let t = targets(&["nats", "scheduler", "workers"]);
        let a = outage_plan(7, 240.0, 4, &t, 10.0, 60.0);
        assert_eq!(
            a,
            outage_plan(7, 240.0, 4, &t, 10.0, 60.0),
            "same seed, same plan"
        );
        assert_ne!(
            a,
            outage_plan(8, 240.0, 4, &t, 10.0, 60.0),
            "another seed differs"
        );
        let first: std::collections::BTreeSet<&str> =
            a.iter().take(3).map(|o| o.target.as_str()).collect();
        assert_eq!(first.len(), 3, "every target once first: {a:?}");
        let mut end = 0.0;
        for (i, o) in a.iter().enumerate() {
            assert!((10.0..=60.0).contains(&o.down_s), "{o:?}");
            assert!(o.at_s >= end - 0.1, "outages do not overlap: {a:?}");
            assert!(
                o.at_s >= 60.0 * i as f64 - 0.1 && o.at_s + o.down_s <= 60.0 * (i + 1) as f64 + 0.1
            );
            end = o.at_s + o.down_s;
        }
    }

    #[test]
    fn the_ramp_offers_the_area_under_its_rate() {
        assert_eq!(ramp_offered(1000.0, 10_000.0, 60.0, 60.0), 330_000.0);
        assert_eq!(ramp_offered(1000.0, 10_000.0, 60.0, 0.0), 0.0);
        assert_eq!(ramp_offered(100.0, 100.0, 10.0, 5.0), 500.0);
        // The first half of a rising ramp offers less than the second.
        let half = ramp_offered(1000.0, 10_000.0, 60.0, 30.0);
        assert!(half < 330_000.0 - half);
    }

    #[test]
    fn the_tally_counts_operations_and_failures() {
        let mut t = ApiTally::default();
        t.record("status_query", None);
        t.record("status_query", Some("x: no answer".into()));
        t.record("review_decide", None);
        assert_eq!((t.total_ops(), t.total_errors()), (3, 1));
        assert_eq!(t.examples, vec!["status_query: x: no answer".to_owned()]);
    }
}
