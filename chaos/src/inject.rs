//! The injections, all real: mesh events published through JetStream at a rate, intents
//! submitted (a share of them invalid) at a concurrency or a rate, the scheduler paused and
//! resumed, pool workers killed at random times, causal cascades started, services and the
//! nats-server restarted.
//!
//! Every id sent is recorded in [`Sent`] for the checker, and the live figures in [`Live`] for
//! the progress line and the timeline.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use bulwark_common::{subjects, time};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};

use crate::checker::Expected;
use crate::scenario::Injection;
use crate::target::Target;

/// Acknowledgements awaited at once while publishing.
const ACK_WINDOW: usize = 4096;
/// Attempts of one intent submission (503s and timeouts are retried with the same id).
const SUBMIT_ATTEMPTS: u32 = 5;

/// Live counters, read by the progress line and the timeline.
#[derive(Debug, Default)]
pub struct Live {
    /// Mesh events stored (acknowledged by JetStream).
    pub events_acked: AtomicU64,
    /// Mesh events JetStream did not acknowledge.
    pub events_failed: AtomicU64,
    /// Intents whose submission finished (any answer).
    pub intents_sent: AtomicU64,
    /// Intents accepted.
    pub intents_accepted: AtomicU64,
    /// Intents refused with a 400.
    pub intents_refused: AtomicU64,
    /// Submissions that got no decision after every attempt.
    pub intents_unanswered: AtomicU64,
    /// Workers killed.
    pub kills: AtomicU64,
}

impl Live {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One intent sent.
#[derive(Debug, Clone, Copy)]
pub struct SentIntent {
    /// What should become of it.
    pub expected: Expected,
    /// The submission was refused with a 400.
    pub refused: bool,
    /// The submission got no decision.
    pub unanswered: bool,
}

/// One cascade started.
#[derive(Debug, Clone, Serialize)]
pub struct SentCascade {
    /// The rule's tag.
    pub tag: String,
    /// The correlation of every root.
    pub correlation_id: String,
    /// The root events stored.
    pub roots: Vec<String>,
    /// Children per event per level.
    pub fan_out: u64,
}

/// Everything sent, for the checker.
pub struct Sent {
    /// Event id -> publish time (ms since the epoch), acknowledged events only.
    pub events: HashMap<String, i64>,
    /// Events whose publication JetStream did not acknowledge (not in the ledger).
    pub unacked_events: std::collections::HashSet<String>,
    /// Intent id -> what was sent.
    pub intents: HashMap<String, SentIntent>,
    /// Intake latency of accepted intents (request to decision), ms.
    pub submit_ms: Histogram<u64>,
    /// Cascades started.
    pub cascades: Vec<SentCascade>,
    /// Worker kills: (seconds after the method start, worker id).
    pub kills: Vec<(f64, String)>,
    /// Latency of the status queries (`query_status`: first attempt to answer), ms.
    pub query_ms: Histogram<u64>,
    /// API operations of the FIT injections and their failures after retries.
    pub api: crate::fit::ApiTally,
}

impl Default for Sent {
    fn default() -> Self {
        Sent {
            events: HashMap::new(),
            unacked_events: Default::default(),
            intents: HashMap::new(),
            submit_ms: new_histogram(),
            cascades: Vec::new(),
            kills: Vec::new(),
            query_ms: new_histogram(),
            api: Default::default(),
        }
    }
}

/// A histogram of milliseconds up to an hour.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable_histogram()))
}

#[allow(clippy::panic)]
fn unreachable_histogram() -> Histogram<u64> {
    panic!("hdrhistogram refuses 3 significant digits")
}

/// What one injection did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct InjectionReport {
    /// Name or `<kind>#<index>`.
    pub label: String,
    /// The kind.
    pub kind: String,
    /// Seconds after the method start it began.
    pub started_s: f64,
    /// Seconds after the method start it ended.
    pub ended_s: f64,
    /// What it was asked to do and what it achieved.
    pub figures: Value,
    /// Achieved share of the asked load (rates and counts), when it has one.
    pub load_share: Option<f64>,
    /// What it actually did, counted (workers killed, outages made, restarts), for the
    /// expectations whose `min_count_from` names it.
    pub acts: Option<u64>,
    /// Why the run cannot judge the system (the injection was impossible here).
    pub inconclusive: Option<String>,
}

/// Context of one run's injections.
#[derive(Clone)]
pub struct Ctx {
    /// The system.
    pub target: Arc<Target>,
    /// Run id (marks every event payload and every intent id).
    pub run: String,
    /// Live counters.
    pub live: Arc<Live>,
    /// Ids sent.
    pub sent: Arc<Mutex<Sent>>,
    /// When the method started.
    pub t0: tokio::time::Instant,
    /// Seed of this injection's random choices.
    pub seed: u64,
}

impl Ctx {
    fn now_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

/// A small deterministic generator (splitmix64), so `--seed` replays the same choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Runs `injection` (index `index`), starting at its `at_s`.
pub async fn run(ctx: Ctx, index: usize, injection: Injection) -> InjectionReport {
    let at = Duration::from_secs_f64(injection.at_s());
    tokio::time::sleep_until(ctx.t0 + at).await;
    let mut report = InjectionReport {
        label: injection.label(index),
        kind: injection.kind().to_owned(),
        started_s: ctx.now_s(),
        ..Default::default()
    };
    let outcome = match &injection {
        Injection::ResourceSiege {
            duration_s,
            cpu_threads,
            memory_mb,
            ..
        } => {
            // The guard releases everything even when this future is dropped mid-siege.
            let siege = crate::siege::Siege::start(cpu_threads.0, *memory_mb);
            tokio::time::sleep(Duration::from_secs_f64(duration_s.0)).await;
            let applied = tokio::task::block_in_place(|| siege.end());
            Ok((serde_json::to_value(applied).unwrap_or_default(), None))
        }
        Injection::PublishEvents {
            rate_per_s,
            duration_s,
            patterns,
            types_per_pattern,
            skew_s,
            jitter_s,
            ..
        } => {
            publish_events(
                &ctx,
                rate_per_s.0,
                duration_s.0,
                patterns,
                types_per_pattern.0,
                index,
                (skew_s.0, jitter_s.0),
            )
            .await
        }
        Injection::SubmitIntents {
            count,
            rate_per_s,
            duration_s,
            concurrency,
            invalid_share,
            intent_type,
            work_ms,
            priority,
            ..
        } => {
            let plan = SubmitPlan {
                count: count.map(|c| c.0),
                rate: rate_per_s.map(|r| r.0),
                duration_s: duration_s.map(|d| d.0),
                concurrency: concurrency.0 as usize,
                invalid_share: invalid_share.0,
                intent_type: intent_type.clone(),
                work_ms: *work_ms,
                priority: *priority,
            };
            submit_intents(&ctx, index, plan).await
        }
        Injection::PauseScheduler { duration_s, .. } => pause(&ctx, duration_s.0).await,
        Injection::KillWorkers {
            fraction,
            over_s,
            mode,
            ..
        } => kill_workers(&ctx, fraction.0, over_s.0, mode.as_str()).await,
        Injection::Cascade {
            tag,
            roots,
            fan_out,
            ..
        } => cascade(&ctx, tag, roots.0, fan_out.0).await,
        Injection::RestartService {
            service, down_s, ..
        } => match &ctx.target.stack {
            None => Err(Outcome::Inconclusive(
                "restart_service needs the runner's own stack (run without --nats-url)".into(),
            )),
            // The stack is locked to crash and to start, not while the service is down, so
            // several services can be down together (DIRT01).
            Some(stack) => {
                let crashed = stack.lock().await.crash_service(service);
                match crashed {
                    Err(e) => Err(Outcome::Inconclusive(format!(
                        "restart of {service} failed: {e:#}"
                    ))),
                    Ok(()) => {
                        tokio::time::sleep(Duration::from_secs_f64(down_s.0)).await;
                        let started = stack.lock().await.start_again(service).await;
                        started
                            .map(|()| (json!({"service": service, "down_s": down_s.0}), None))
                            .map_err(|e| {
                                Outcome::Inconclusive(format!("restart of {service} failed: {e:#}"))
                            })
                    }
                }
            }
        },
        Injection::RestartNats { down_s, .. } => match &ctx.target.stack {
            None => Err(Outcome::Inconclusive(
                "restart_nats needs the runner's own stack (run without --nats-url)".into(),
            )),
            Some(stack) => stack
                .lock()
                .await
                .restart_nats(Duration::from_secs_f64(down_s.0))
                .await
                .map(|()| (json!({"down_s": down_s.0}), None))
                .map_err(|e| Outcome::Inconclusive(format!("nats-server restart failed: {e:#}"))),
        },
        Injection::BackupDrill {
            backups,
            interval_s,
            damage,
            rollback,
            ..
        } => {
            let plan = crate::drill::DrillPlan {
                backups: backups.0,
                interval_s: interval_s.0,
                damage: *damage,
                rollback: *rollback,
            };
            crate::drill::run(&ctx.target, plan)
                .await
                .map(|figures| (figures, None))
                .map_err(|e| Outcome::Inconclusive(format!("backup drill failed: {e:#}")))
        }
        Injection::ConcurrentWrites {
            writers,
            keys,
            ops_per_writer,
            cas,
            ..
        } => {
            let plan = crate::cas::WritePlan {
                writers: writers.0,
                keys: keys.0,
                ops_per_writer: ops_per_writer.0,
                cas: *cas,
            };
            crate::cas::run(&ctx.target, &ctx.run, plan)
                .await
                .map(|figures| (figures, None))
                .map_err(|e| Outcome::Inconclusive(format!("concurrent writes failed: {e:#}")))
        }
        Injection::NarrativeLogAudit {
            duration_s,
            settle_s,
            ..
        } => crate::narlog::run(&ctx.target, duration_s.0, settle_s.0)
            .await
            .map(|figures| (figures, None))
            .map_err(|e| Outcome::Inconclusive(format!("narrative log audit failed: {e:#}"))),
        // The FIT injections (crate::fit).
        Injection::QueryStatus {
            rate_per_s,
            duration_s,
            concurrency,
            ..
        } => crate::fit::query_status(&ctx, rate_per_s.0, duration_s.0, concurrency.0 as usize)
            .await
            .map_err(Outcome::Inconclusive),
        Injection::ReviewIntents {
            rate_per_s,
            duration_s,
            concurrency,
            reject_share,
            intent_type,
            work_ms,
            priority,
            ..
        } => {
            let plan = crate::fit::ReviewPlan {
                rate: rate_per_s.0,
                duration_s: duration_s.0,
                concurrency: concurrency.0 as usize,
                reject_share: reject_share.0,
                intent_type: intent_type.clone(),
                work_ms: *work_ms,
                priority: *priority,
            };
            crate::fit::review_intents(&ctx, index, plan)
                .await
                .map_err(Outcome::Inconclusive)
        }
        Injection::RandomOutage {
            over_s,
            outages,
            targets,
            min_down_s,
            max_down_s,
            ..
        } => crate::fit::random_outage(
            &ctx,
            over_s.0,
            outages.0,
            targets,
            (min_down_s.0, max_down_s.0),
        )
        .await
        .map_err(Outcome::Inconclusive),
        Injection::RampIntents {
            from_per_s,
            to_per_s,
            duration_s,
            max_in_flight,
            intent_type,
            work_ms,
            attempts,
            timeout_ms,
            ..
        } => {
            let plan = crate::fit::RampPlan {
                from: from_per_s.0,
                to: to_per_s.0,
                duration_s: duration_s.0,
                max_in_flight: max_in_flight.0 as usize,
                intent_type: intent_type.clone(),
                work_ms: *work_ms,
                attempts: attempts.0,
                timeout: Duration::from_millis(timeout_ms.0),
            };
            crate::fit::ramp_intents(&ctx, index, plan)
                .await
                .map_err(Outcome::Inconclusive)
        }
    };
    match outcome {
        Ok((figures, share)) => {
            report.acts = acts_of(&injection, &figures);
            report.figures = figures;
            report.load_share = share;
        }
        Err(Outcome::Inconclusive(why)) => report.inconclusive = Some(why),
    }
    report.ended_s = ctx.now_s();
    report
}

/// How many acts an injection that succeeded made: workers killed (`kill_workers`), outages
/// made (`random_outage`), one restart (`restart_service`, `restart_nats`).
fn acts_of(injection: &Injection, figures: &Value) -> Option<u64> {
    let listed = |key: &str| figures[key].as_array().map(|a| a.len() as u64);
    match injection {
        Injection::KillWorkers { .. } => listed("killed"),
        Injection::RandomOutage { .. } => listed("outages"),
        Injection::RestartService { .. } | Injection::RestartNats { .. } => Some(1),
        _ => None,
    }
}

/// Why an injection could not be made.
enum Outcome {
    Inconclusive(String),
}

type Done = Result<(Value, Option<f64>), Outcome>;

/// The event types a pattern list expands to.
pub fn expand_patterns(patterns: &[String], types_per_pattern: u64) -> Vec<String> {
    let mut out = Vec::new();
    for p in patterns {
        if p.contains('*') {
            for t in 0..types_per_pattern {
                out.push(p.replace('*', &format!("t{t}")));
            }
        } else {
            out.push(p.clone());
        }
    }
    out
}

async fn publish_events(
    ctx: &Ctx,
    rate: u64,
    duration_s: f64,
    patterns: &[String],
    types_per_pattern: u64,
    index: usize,
    (skew_s, jitter_s): (f64, f64),
) -> Done {
    let types = expand_patterns(patterns, types_per_pattern);
    let mut skew_rng = Rng::new(ctx.seed ^ 0x5EED_C10C);
    let total = (rate as f64 * duration_s).round() as u64;
    let start = tokio::time::Instant::now();
    let mut pending: FuturesUnordered<AckWait> = FuturesUnordered::new();
    let mut published = 0u64;
    let mut acked = 0u64;
    let mut failed = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while published < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while published < due {
            while pending.len() >= ACK_WINDOW {
                if let Some(done) = pending.next().await {
                    settle(ctx, done, &mut acked, &mut failed).await;
                }
            }
            let event_type = &types[(published as usize) % types.len()];
            let id = bulwark_common::ids::new_id();
            // The sender's clock, skewed (JEPSEN02): earlier and later in turn, plus jitter.
            let timestamp = if skew_s > 0.0 || jitter_s > 0.0 {
                let sign = if published.is_multiple_of(2) {
                    -1.0
                } else {
                    1.0
                };
                let jitter = (skew_rng.unit() * 2.0 - 1.0) * jitter_s;
                let offset_ms = ((sign * skew_s + jitter) * 1000.0) as i64;
                time::format_ms(time::now_ms() + offset_ms)
            } else {
                time::now()
            };
            let body = json!({
                "event_id": id, "event_type": event_type, "source": "chaos",
                "actor": format!("chaos/{}", ctx.run), "timestamp": timestamp,
                "correlation_id": id, "depth": 0,
                "payload": {"chaos_run": ctx.run, "injection": index, "n": published},
            });
            let msg = PublishMessage::build()
                .payload(body.to_string().into())
                .message_id(id.clone());
            let sent_ms = time::now_ms();
            match ctx
                .target
                .js
                .send_publish(subjects::mesh(event_type), msg)
                .await
            {
                Ok(ack) => pending.push(AckWait::new(id, sent_ms, ack)),
                Err(_) => {
                    failed += 1;
                    Live::bump(&ctx.live.events_failed);
                }
            }
            published += 1;
        }
        // Settle what is already acknowledged without waiting.
        while let Some(Some(done)) = futures::FutureExt::now_or_never(pending.next()) {
            settle(ctx, done, &mut acked, &mut failed).await;
        }
    }
    let publish_s = start.elapsed().as_secs_f64();
    while let Some(done) = pending.next().await {
        settle(ctx, done, &mut acked, &mut failed).await;
    }
    let achieved = if publish_s > 0.0 {
        published as f64 / publish_s
    } else {
        0.0
    };
    let share = (achieved / rate as f64).min(acked as f64 / total.max(1) as f64);
    Ok((
        json!({"asked_rate_per_s": rate, "asked_events": total, "duration_s": duration_s,
               "types": types.len(), "published": published, "acknowledged": acked,
               "not_acknowledged": failed, "achieved_rate_per_s": round1(achieved)}),
        Some(share.min(1.0)),
    ))
}

/// A publish acknowledgement to await, with its event.
struct AckWait {
    inner: std::pin::Pin<Box<dyn std::future::Future<Output = (String, i64, bool)> + Send>>,
}

impl AckWait {
    fn new(id: String, sent_ms: i64, ack: PublishAckFuture) -> Self {
        AckWait {
            inner: Box::pin(async move {
                let ok = ack.await.is_ok();
                (id, sent_ms, ok)
            }),
        }
    }
}

impl std::future::Future for AckWait {
    type Output = (String, i64, bool);
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

async fn settle(
    ctx: &Ctx,
    (id, sent_ms, ok): (String, i64, bool),
    acked: &mut u64,
    failed: &mut u64,
) {
    if ok {
        *acked += 1;
        Live::bump(&ctx.live.events_acked);
        ctx.sent.lock().await.events.insert(id, sent_ms);
    } else {
        *failed += 1;
        Live::bump(&ctx.live.events_failed);
        ctx.sent.lock().await.unacked_events.insert(id);
    }
}

/// What `submit_intents` sends.
struct SubmitPlan {
    count: Option<u64>,
    rate: Option<u64>,
    duration_s: Option<f64>,
    concurrency: usize,
    invalid_share: f64,
    intent_type: String,
    work_ms: u64,
    priority: Option<u8>,
}

/// The body of intent `n`; invalid ones rotate through the defects the contract refuses.
fn intent_body(id: &str, n: u64, invalid: bool, plan: &SubmitPlan) -> String {
    let priority = plan.priority.unwrap_or((n % 10) as u8);
    let good = json!({"intent_id": id, "intent_type": plan.intent_type, "actor": "chaos",
                      "priority": priority, "payload": {"work_ms": plan.work_ms},
                      "mission_context": {"resilience_impact": true}});
    if !invalid {
        return good.to_string();
    }
    let mut bad = good;
    match n % 4 {
        0 => bad["actor"] = json!(""),
        1 => bad["priority"] = json!(42),
        2 => bad["intent_type"] = json!(17),
        _ => return format!("{{\"intent_id\": \"{id}\", \"intent_type\": "),
    }
    bad.to_string()
}

async fn submit_intents(ctx: &Ctx, index: usize, plan: SubmitPlan) -> Done {
    let total = match (plan.count, plan.rate, plan.duration_s) {
        (Some(c), _, _) => c,
        (None, Some(r), Some(d)) => (r as f64 * d).round() as u64,
        _ => 0,
    };
    let mut rng = Rng::new(ctx.seed);
    // Exactly round(share × total) invalid intents, at random positions.
    let invalid_count = (plan.invalid_share * total as f64).round() as u64;
    let mut invalid = vec![false; total as usize];
    let mut order: Vec<usize> = (0..total as usize).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for &i in order.iter().take(invalid_count as usize) {
        invalid[i] = true;
    }
    let plan = Arc::new(plan);
    let limit = Arc::new(Semaphore::new(plan.concurrency));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        if let (Some(rate), None) = (plan.rate, plan.count) {
            let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let id = format!("chaos-{}-{index}-{n}", ctx.run);
        let is_invalid = invalid[n as usize];
        let body = intent_body(&id, n, is_invalid, &plan);
        let target = ctx.target.clone();
        let live = ctx.live.clone();
        let sent = ctx.sent.clone();
        tasks.spawn(async move {
            let outcome = submit_one(&target, body).await;
            drop(permit);
            Live::bump(&live.intents_sent);
            let expected = if is_invalid {
                Expected::Refused
            } else {
                Expected::Delivered
            };
            let mut record = SentIntent {
                expected,
                refused: false,
                unanswered: false,
            };
            match outcome {
                Submitted::Accepted(ms) => {
                    Live::bump(&live.intents_accepted);
                    let mut s = sent.lock().await;
                    let _ = s.submit_ms.record(ms.max(1));
                    s.intents.insert(id, record);
                    return;
                }
                Submitted::Refused => {
                    Live::bump(&live.intents_refused);
                    record.refused = true;
                }
                Submitted::Unanswered => {
                    Live::bump(&live.intents_unanswered);
                    record.unanswered = true;
                }
            }
            sent.lock().await.intents.insert(id, record);
        });
        // Keep the join set from growing without bound.
        while let Some(Some(_)) = futures::FutureExt::now_or_never(tasks.join_next()) {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let s = ctx.sent.lock().await;
    let prefix = format!("chaos-{}-{index}-", ctx.run);
    let mine: Vec<&SentIntent> = s
        .intents
        .iter()
        .filter(|(id, _)| id.starts_with(&prefix))
        .map(|(_, v)| v)
        .collect();
    let refused = mine.iter().filter(|i| i.refused).count();
    let unanswered = mine.iter().filter(|i| i.unanswered).count();
    let answered = mine.len() - unanswered;
    let achieved = if elapsed > 0.0 {
        mine.len() as f64 / elapsed
    } else {
        0.0
    };
    let mut share = answered as f64 / total.max(1) as f64;
    if let Some(rate) = plan.rate {
        share = share.min(achieved / rate as f64);
    }
    Ok((
        json!({"asked": total, "invalid": invalid_count, "concurrency": plan.concurrency,
               "asked_rate_per_s": plan.rate, "answered": answered, "refused_400": refused,
               "unanswered": unanswered, "elapsed_s": round1(elapsed),
               "achieved_rate_per_s": round1(achieved)}),
        Some(share.min(1.0)),
    ))
}

enum Submitted {
    Accepted(u64),
    Refused,
    Unanswered,
}

async fn submit_one(target: &Target, body: String) -> Submitted {
    let mut backoff = Duration::from_millis(100);
    for _ in 0..SUBMIT_ATTEMPTS {
        let started = std::time::Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            target
                .client
                .request(subjects::INTENT_SUBMIT, body.clone().into()),
        )
        .await;
        if let Ok(Ok(msg)) = reply {
            let code = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(bulwark_common::api::SERVICE_ERROR_CODE))
                .map(|v| v.to_string());
            match code.as_deref() {
                None => return Submitted::Accepted(started.elapsed().as_millis() as u64),
                Some("400") => return Submitted::Refused,
                Some(_) => {}
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    Submitted::Unanswered
}

async fn pause(ctx: &Ctx, duration_s: f64) -> Done {
    let paused = ctx.target.ask(subjects::SCHEDULER_PAUSE, "{}").await;
    let Some(paused) = paused.filter(|p| p["paused"] == true) else {
        return Err(Outcome::Inconclusive(
            "scheduler.pause was not answered with paused: true".into(),
        ));
    };
    let paused_at = ctx.now_s();
    tokio::time::sleep(Duration::from_secs_f64(duration_s)).await;
    let mut resumed = None;
    for _ in 0..10 {
        if let Some(r) = ctx.target.ask(subjects::SCHEDULER_RESUME, "{}").await {
            resumed = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Some(resumed) = resumed else {
        return Err(Outcome::Inconclusive(
            "scheduler.resume was never answered".into(),
        ));
    };
    Ok((
        json!({"paused_at_s": round1(paused_at), "paused_for_s": duration_s,
               "queue_depth_at_pause": paused["queue_depth"],
               "queue_depth_at_resume": resumed["queue_depth"]}),
        None,
    ))
}

async fn kill_workers(ctx: &Ctx, fraction: f64, over_s: f64, mode: &str) -> Done {
    let Some(pool) = ctx.target.pool().await else {
        return Err(Outcome::Inconclusive(
            "htm.pool.status did not answer: no worker pool to kill workers of".into(),
        ));
    };
    let mut ids: Vec<String> = pool["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|w| w["state"] == "running")
        .filter_map(|w| w["worker_id"].as_str().map(str::to_owned))
        .collect();
    if ids.is_empty() {
        return Err(Outcome::Inconclusive(
            "the pool has no running worker".into(),
        ));
    }
    let n = ((fraction * ids.len() as f64).ceil() as usize).clamp(1, ids.len());
    let mut rng = Rng::new(ctx.seed);
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut plan: Vec<(f64, String)> = ids
        .into_iter()
        .take(n)
        .map(|id| (rng.unit() * over_s, id))
        .collect();
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    let start = tokio::time::Instant::now();
    let mut killed = Vec::new();
    let mut refused = Vec::new();
    for (at, id) in plan {
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        let body = json!({"worker_id": id, "mode": mode}).to_string();
        // Retried when nobody answers (the server may be down for a moment: FIT01).
        let mut reply = None;
        for _ in 0..10 {
            reply = ctx.target.ask(subjects::POOL_KILL, &body).await;
            if reply.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match reply {
            Some(r) if r.get("error").is_none() => {
                Live::bump(&ctx.live.kills);
                let t = ctx.now_s();
                ctx.sent.lock().await.kills.push((t, id.clone()));
                killed.push(json!({"worker_id": id, "at_s": round1(t)}));
            }
            other => refused.push(json!({"worker_id": id, "reply": other})),
        }
    }
    if killed.is_empty() {
        return Err(Outcome::Inconclusive(format!(
            "htm.pool.kill killed nobody: {}",
            Value::Array(refused)
        )));
    }
    let share = killed.len() as f64 / n as f64;
    Ok((
        json!({"mode": mode, "asked": n, "killed": killed, "refused": refused, "over_s": over_s}),
        Some(share),
    ))
}

/// Name of the rule answering cascades of `tag`.
pub fn cascade_rule_name(tag: &str) -> String {
    format!("chaos_cascade_{tag}")
}

/// Event type of the roots of cascades of `tag`.
pub fn cascade_root_type(tag: &str) -> String {
    format!("test.cascade.{tag}.trigger")
}

/// The rule file text the runner's own stack loads for a cascade injection.
pub fn cascade_rule(tag: &str, fan_out: u64, depth: Option<u64>) -> String {
    let when = depth
        .map(|d| format!("when = [{{ field = \"depth\", op = \"lt\", value = {d} }}]\n"))
        .unwrap_or_default();
    format!(
        "[[rule]]\nname = \"{name}\"\ndescription = \"chaos: every test.cascade.{tag} event triggers {fan_out} more, one level deeper\"\non = \"mesh.test.cascade.{tag}.>\"\n{when}[rule.emit]\nevent_type = \"test.cascade.{tag}.l{{depth}}\"\ncount = {fan_out}\n\n",
        name = cascade_rule_name(tag)
    )
}

async fn cascade(ctx: &Ctx, tag: &str, roots: u64, fan_out: u64) -> Done {
    let rule = cascade_rule_name(tag);
    let rules = ctx.target.ask(subjects::EVENT_POLICY_RULES, "{}").await;
    let loaded = rules
        .as_ref()
        .and_then(|r| r["rules"].as_array())
        .is_some_and(|rules| rules.iter().any(|r| r["name"] == rule.as_str()));
    if !loaded {
        return Err(Outcome::Inconclusive(format!(
            "the event policy engine has no rule {rule}: add it (bulwark chaos prints it with `chaos list --rules`) or run self-contained"
        )));
    }
    let correlation = format!("chaos-{}-cascade-{tag}", ctx.run);
    let event_type = cascade_root_type(tag);
    let mut stored = Vec::new();
    for i in 0..roots {
        let id = bulwark_common::ids::new_id();
        let body = json!({"event_id": id, "event_type": event_type, "source": "chaos",
                          "timestamp": time::now(), "correlation_id": correlation, "depth": 0,
                          "payload": {"chaos_run": ctx.run, "chain": i}});
        let msg = PublishMessage::build()
            .payload(body.to_string().into())
            .message_id(id.clone());
        let ok = match ctx
            .target
            .js
            .send_publish(subjects::mesh(&event_type), msg)
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if ok {
            Live::bump(&ctx.live.events_acked);
            stored.push(id);
        } else {
            Live::bump(&ctx.live.events_failed);
        }
    }
    let share = stored.len() as f64 / roots as f64;
    let figures = json!({"rule": rule, "roots": roots, "stored": stored.len(), "fan_out": fan_out,
                         "correlation_id": correlation});
    ctx.sent.lock().await.cascades.push(SentCascade {
        tag: tag.to_owned(),
        correlation_id: correlation,
        roots: stored,
        fan_out,
    });
    Ok((figures, Some(share)))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_expand_to_types() {
        let types = expand_patterns(&["test.spam.*".into(), "chaos.trigger".into()], 3);
        assert_eq!(
            types,
            vec![
                "test.spam.t0",
                "test.spam.t1",
                "test.spam.t2",
                "chaos.trigger"
            ]
        );
    }

    #[test]
    fn the_generator_replays() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..5).map(|_| r.next_u64()).collect()
        };
        let mut r = Rng::new(7);
        assert_eq!(a, (0..5).map(|_| r.next_u64()).collect::<Vec<_>>());
        assert!((0..1000).all(|_| (0.0..1.0).contains(&r.unit())));
    }

    #[test]
    fn invalid_intents_rotate_through_defects() {
        let plan = SubmitPlan {
            count: Some(4),
            rate: None,
            duration_s: None,
            concurrency: 1,
            invalid_share: 1.0,
            intent_type: "query_knowledge".into(),
            work_ms: 0,
            priority: None,
        };
        let bodies: Vec<String> = (0..4).map(|n| intent_body("x", n, true, &plan)).collect();
        assert!(bodies[0].contains("\"actor\":\"\""));
        assert!(bodies[1].contains("\"priority\":42"));
        assert!(bodies[2].contains("\"intent_type\":17"));
        assert!(serde_json::from_str::<Value>(&bodies[3]).is_err());
        let good: Value = serde_json::from_str(&intent_body("y", 5, false, &plan)).expect("json");
        assert_eq!(good["priority"], 5);
    }

    #[test]
    fn cascade_rules_parse_as_policy_files() {
        let text = cascade_rule("deep", 1, None) + cascade_rule("short", 2, Some(3)).as_str();
        let set = bulwark_event_policy::rules::PolicySet::parse(&[(
            std::path::PathBuf::from("chaos.toml"),
            text,
        )])
        .expect("rules parse");
        assert_eq!(set.rules.len(), 2);
    }
}
