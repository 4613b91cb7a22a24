//! The scheduler's I/O around [`crate::pool`], [`crate::guards`] and [`crate::sla`]: the
//! dispatch loop, worker reports, the worker watchdog, queue guards, shedding and replay, pause
//! and resume, readiness and telemetry.
//!
//! State shared by the loops lives behind one mutex that is never held across an await. The
//! authority on a task is its intent record in `bulwark_intents`: every transition is a
//! compare-and-set that checks the status and the assignment's fence, so two schedulers, a
//! redelivered message or a late report can never move a task twice.
//!
//! **Replicas.** Several schedulers may run; one leads, under the `scheduler` lease of
//! [`bulwark_common::lease`]. Only the leader dispatches, watches workers, sheds and replays.
//! Every replica registers the micro endpoints (so requests reach any of them through the queue
//! group); a standby forwards each request to the leader on `scheduler.leader.<op>` and relays
//! its answer (503 when no leader answers: workers retry their reports). The leader stamps its
//! fencing token on every intent record it writes (`leader_token`) and on every assignment it
//! sends: a record or a worker that has seen a newer token refuses an older leader's late write
//! or assignment.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, kv, message::PublishMessage};
use async_nats::service::Request;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::{BulwarkConfig, SchedulerConfig};
use bulwark_common::envelope::MeshEvent;
use bulwark_common::htm::{Assignment, AssignmentRecord, Heartbeat, Outcome, TaskReport};
use bulwark_common::identity::{self, Sender};
use bulwark_common::intent::{IntentRecord, IntentStatus, Task};
use bulwark_common::kv::{self as kvx, Change, KvError};
use bulwark_common::lease::{self, Leadership};
use bulwark_common::micro::{self, EndpointSpec};
use bulwark_common::narrative::Narrator;
use bulwark_common::{ids, streams, subjects, telemetry, time};

use crate::bindings::{self, Bindings, Heard, NotYours};
use crate::guards::{Guard, Level};
use crate::pool::Pool;
use crate::registry::{Registry, Sighting};
use crate::sla::Latency;

/// Name under which the service registers (CONTRACT section 5).
pub const SERVICE_NAME: &str = "scheduler";
/// Requests handled at once.
const MAX_CONCURRENT_REQUESTS: usize = 1024;
/// Time given to in-flight work at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Most messages fetched from one priority at a time.
const FETCH_BATCH: usize = 256;
/// Longest the dispatch loop sleeps without a wake-up.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Delay before a task nobody could take is offered again.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Largest report or command body.
const MAX_BODY: usize = 1024 * 1024;

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A stream, consumer or bucket could not be made ready.
    #[error("{0}")]
    Store(#[from] streams::StoreError),
    /// A consumer could not be created.
    #[error("task queue consumer: {0}")]
    Consumer(String),
    /// Registration with NATS micro or a subscription failed.
    #[error("{0}")]
    Register(String),
}

/// What the scheduler counts.
#[derive(Debug, Default)]
struct Counters {
    dispatched: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    reassigned: AtomicU64,
    shed: AtomicU64,
    replayed: AtomicU64,
    stale_reports: AtomicU64,
    malformed: AtomicU64,
    dead_workers: AtomicU64,
    errors: AtomicU64,
    /// Writes and assignments refused because a newer leader holds the lease.
    fenced: AtomicU64,
    /// Requests this standby forwarded to the leader.
    forwarded: AtomicU64,
    /// Heartbeats and reports refused because their sender is not the user the worker id is
    /// bound to.
    impostors: AtomicU64,
    /// Heartbeats whose capacity claim was over `max_worker_capacity` and clamped.
    capacity_clamped: AtomicU64,
    /// Dispatches put back because their submitting identity held its share of the slots.
    identity_capped: AtomicU64,
    /// Heartbeats refused because their user owns `max_worker_ids_per_user` ids already.
    worker_ids_refused: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "dispatched": get(&self.dispatched), "completed": get(&self.completed), "failed": get(&self.failed),
            "reassigned": get(&self.reassigned), "shed": get(&self.shed), "replayed": get(&self.replayed),
            "stale_reports": get(&self.stale_reports), "malformed": get(&self.malformed),
            "dead_workers": get(&self.dead_workers), "errors": get(&self.errors),
            "fenced": get(&self.fenced), "forwarded": get(&self.forwarded),
            "impostors": get(&self.impostors), "capacity_clamped": get(&self.capacity_clamped),
            "identity_capped": get(&self.identity_capped),
            "worker_ids_refused": get(&self.worker_ids_refused),
        })
    }
}

/// A task handed to a worker and not yet reported finished.
struct InFlight {
    /// The queue message, acknowledged when the task finishes (absent for a task adopted from a
    /// report after a restart: its redelivery is acknowledged when it comes).
    msg: Option<jetstream::Message>,
    worker_id: String,
    /// Fence of the current assignment.
    fence: u64,
    /// Attempt of the current assignment.
    attempt: u32,
    /// When the current assignment was made.
    assigned_at: Instant,
    /// The NATS identity that submitted the intent (`None`: bulwark's own services).
    submitter: Option<String>,
    /// The worker accepted the assignment (or reported on it): the queue message is kept from
    /// redelivery with progress acknowledgements. Until then redelivery after `ack_wait_s`
    /// sends the assignment again.
    confirmed: bool,
    /// When the queue last heard from this replica about the message (delivery or progress).
    progress_at: Instant,
    /// When the queue last delivered the message: progress acknowledgements stop
    /// [`PROGRESS_SPAN`] `ack_wait_s` after it, so the assignment is still sent again now and
    /// then (a worker that gave up its report runs the task again and reports).
    delivered_at: Instant,
}

/// The slots one submitting identity may hold at once: `share` of the pool's `capacity`, at
/// least one.
pub fn share_cap(capacity: u32, share: f64) -> usize {
    ((f64::from(capacity) * share).floor() as usize).max(1)
}

/// A dispatch under way for an identity, counted against its share until the task is in
/// `in_flight` (or the dispatch gave up): released on drop, whatever path the dispatch took.
struct ShareClaim<'a> {
    scheduler: &'a Scheduler,
    who: Option<String>,
}

impl Drop for ShareClaim<'_> {
    fn drop(&mut self) {
        let Some(who) = self.who.take() else { return };
        let mut st = self.scheduler.lock();
        if let Some(n) = st.claiming.get_mut(&who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.claiming.remove(&who);
            }
        }
    }
}

/// For how many `ack_wait_s` after a delivery a confirmed task is kept from redelivery.
const PROGRESS_SPAN: f64 = 5.0;

struct State {
    pool: Pool,
    in_flight: HashMap<String, InFlight>,
    paused: bool,
    latency: Latency,
    scheduler_guard: Guard,
    htm_guard: Guard,
    queue_depth: u64,
    last_dispatched: u64,
    last_completed: u64,
    last_roll: Instant,
    /// When `telemetry.scheduler` last measured the dispatch rate.
    last_dispatch_roll: Instant,
    /// What this tenure wrote to the worker registry: worker id and run id.
    registered: HashMap<String, Option<String>>,
    /// Workers this tenure declared dead and has not heard from since: their tasks, when the
    /// queue brings them back, are reassigned at once.
    declared_dead: HashSet<String>,
    /// Worker ids bound to NATS users (kept across tenures: it is what the registry says).
    bindings: Bindings,
    /// The last over-large capacity claim narrated per worker (narrated again when it changes).
    clamped: HashMap<String, u32>,
    /// Dispatches under way per submitting identity, not yet in `in_flight` ([`ShareClaim`]).
    claiming: HashMap<String, usize>,
}

impl State {
    /// Forgets the tasks in flight (a tenure ends or begins) and the worker slots counted for
    /// them, so the pool counts only what this tenure hands out (the workers' heartbeats still
    /// report what they run); the tasks come back from the queue after `ack_wait` and are
    /// adopted under their current fence, taking a slot again.
    fn forget_in_flight(&mut self) {
        self.in_flight.clear();
        self.pool.forget_assignments();
        self.registered.clear();
        self.declared_dead.clear();
    }
}

struct Scheduler {
    cfg: SchedulerConfig,
    js: jetstream::Context,
    client: Client,
    intents: kv::Store,
    registry: Registry,
    narrator: Narrator,
    consumers: Vec<PullConsumer>,
    parked: PullConsumer,
    state: std::sync::Mutex<State>,
    counters: Counters,
    wake: Notify,
    timeout: Duration,
    /// The lease TTL, seconds: how long a request waits for a leader during an election.
    lease_ttl_s: f64,
    /// Serialises shedding and replay (they move tasks between streams in batches).
    maintenance: tokio::sync::Mutex<()>,
    /// This replica's part in the `scheduler` lease.
    leadership: Leadership,
}

/// A write the leader's fencing token did not allow, or the change's own refusal.
#[derive(Debug)]
pub enum Fenced<E> {
    /// This replica does not lead (any more), or the record carries a newer leader's token.
    Stale {
        /// The token on the record (0 when this replica simply does not lead).
        record_token: u64,
        /// This replica's token, if it still believes it leads.
        ours: Option<u64>,
    },
    /// The change function refused.
    Refused(E),
}

/// Runs the scheduler until `shutdown` is cancelled.
pub async fn run(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    let timeout = Duration::from_millis(cfg.nats.request_timeout_ms);
    let sc = cfg.scheduler.clone();
    let js = streams::context(client.clone(), timeout);
    let tasks = streams::tasks(&js).await?;
    let parked_stream = streams::tasks_parked(&js).await?;
    streams::tasks_dead(&js).await?;
    streams::narratives(&js).await?;
    let intents = streams::bucket(&js, streams::INTENTS_BUCKET, "bulwark intent records").await?;
    let registry = Registry::open(&js).await?;
    let mut consumers = Vec::new();
    for priority in 0..=9u8 {
        let name = format!("scheduler-p{priority}");
        let consumer = tasks
            .get_or_create_consumer(
                &name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("bulwark scheduler, priority {priority}")),
                    filter_subject: subjects::task_queue(priority),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs_f64(sc.ack_wait_s),
                    max_ack_pending: i64::try_from(sc.max_in_flight).unwrap_or(i64::MAX),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| SchedulerError::Consumer(e.to_string()))?;
        consumers.push(consumer);
    }
    let parked = parked_stream
        .get_or_create_consumer(
            "scheduler-replay",
            jetstream::consumer::pull::Config {
                durable_name: Some("scheduler-replay".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| SchedulerError::Consumer(e.to_string()))?;

    let (holder, leadership, elector) = lease::elect(
        &js,
        SERVICE_NAME,
        Duration::from_secs_f64(cfg.replicas.lease_ttl_s),
        shutdown.clone(),
    )
    .await?;
    let narrator = Narrator::new(js.clone(), SERVICE_NAME, &holder);
    let scheduler = Arc::new(Scheduler {
        lease_ttl_s: cfg.replicas.lease_ttl_s,
        narrator,
        leadership,
        state: std::sync::Mutex::new(State {
            pool: Pool::default(),
            in_flight: HashMap::new(),
            paused: false,
            latency: Latency::new(sc.sla_ms),
            scheduler_guard: Guard::new(sc.queue_warn, sc.queue_critical),
            htm_guard: Guard::new(sc.htm_queue_warn, sc.htm_queue_critical),
            queue_depth: 0,
            last_dispatched: 0,
            last_completed: 0,
            last_roll: Instant::now(),
            last_dispatch_roll: Instant::now(),
            registered: HashMap::new(),
            declared_dead: HashSet::new(),
            bindings: Bindings::new(sc.max_worker_ids_per_user),
            clamped: HashMap::new(),
            claiming: HashMap::new(),
        }),
        cfg: sc,
        js,
        client: client.clone(),
        intents,
        registry,
        consumers,
        parked,
        counters: Counters::default(),
        wake: Notify::new(),
        timeout,
        maintenance: tokio::sync::Mutex::new(()),
    });

    // The bindings of worker ids to users, before the first heartbeat is judged.
    scheduler.learn_bindings().await;
    let tracker = TaskTracker::new();
    // Heartbeats feed the pool; new tasks wake the dispatch loop.
    let heartbeats = client
        .subscribe(subjects::WORKER_HEARTBEAT_ALL)
        .await
        .map_err(|e| SchedulerError::Register(format!("heartbeat subscription: {e}")))?;
    tracker.spawn(read_heartbeats(
        scheduler.clone(),
        heartbeats,
        shutdown.clone(),
    ));
    let arrivals = client
        .subscribe(subjects::TASK_QUEUE_ALL)
        .await
        .map_err(|e| SchedulerError::Register(format!("queue subscription: {e}")))?;
    tracker.spawn(wake_on_arrivals(
        scheduler.clone(),
        arrivals,
        shutdown.clone(),
    ));
    tracker.spawn(dispatch_loop(
        scheduler.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(watchdog(
        scheduler.clone(),
        tracker.clone(),
        tasks,
        shutdown.clone(),
    ));
    tracker.spawn(lead(scheduler.clone(), tracker.clone(), shutdown.clone()));

    let endpoints: [EndpointSpec<Op>; 6] = [
        ("result", subjects::TASK_RESULT, Op::Result),
        ("pause", subjects::SCHEDULER_PAUSE, Op::Pause),
        ("resume", subjects::SCHEDULER_RESUME, Op::Resume),
        ("shed", subjects::SCHEDULER_SHED, Op::Shed),
        ("replay", subjects::SCHEDULER_REPLAY, Op::Replay),
        ("readiness", subjects::HTM_READINESS, Op::Readiness),
    ];
    let stats = scheduler.clone();
    let state = scheduler.clone();
    let service = micro::register(
        &micro::serving_client(&cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark HTM scheduler: priority dispatch, worker watchdog, shedding, pause/resume",
        move || stats.counters.snapshot(),
        &endpoints,
        &tracker,
        &shutdown,
        MAX_CONCURRENT_REQUESTS,
        move |op, request| {
            let state = state.clone();
            async move { state.serve(op, &request).await }
        },
    )
    .await
    .map_err(SchedulerError::Register)?;

    let interval = Duration::from_secs_f64(cfg.telemetry.interval_s.max(0.1));
    let figures = scheduler.clone();
    telemetry::spawn(
        client.clone(),
        SERVICE_NAME,
        interval,
        shutdown.clone(),
        // Only the leader's figures describe the queue; a standby stays silent.
        move || {
            if figures.leadership.is_leader() {
                figures.scheduler_telemetry()
            } else {
                Value::Null
            }
        },
    );
    let figures = scheduler.clone();
    telemetry::spawn(
        client.clone(),
        "htm_orchestrator",
        interval,
        shutdown.clone(),
        move || {
            if figures.leadership.is_leader() {
                figures.htm_telemetry()
            } else {
                Value::Null
            }
        },
    );
    tracing::info!("scheduler dispatching from {}", subjects::TASK_QUEUE_ALL);

    shutdown.cancelled().await;
    micro::finish(SERVICE_NAME, service, tracker, SHUTDOWN_GRACE).await;
    // The lease is released last, once in-flight work is done.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, elector).await;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Result,
    Pause,
    Resume,
    Shed,
    Replay,
    Readiness,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::Result,
        Op::Pause,
        Op::Resume,
        Op::Shed,
        Op::Replay,
        Op::Readiness,
    ];

    /// The token of `scheduler.leader.<op>`.
    fn name(self) -> &'static str {
        match self {
            Op::Result => "result",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Shed => "shed",
            Op::Replay => "replay",
            Op::Readiness => "readiness",
        }
    }

    fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// While this replica leads: serves the requests standbys forward on `scheduler.leader.<op>`.
async fn lead(s: Arc<Scheduler>, tracker: TaskTracker, shutdown: CancellationToken) {
    loop {
        let Some(token) = s.leadership.until_leader(&shutdown).await else {
            break;
        };
        let mut sub = match s.client.subscribe(subjects::SCHEDULER_LEADER_ALL).await {
            Ok(sub) => sub,
            Err(err) => {
                tracing::warn!(error = %err, "scheduler: cannot serve forwarded requests; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Forget what a previous tenure left: tasks it dispatched come back from the queue
        // (after ack_wait) and are adopted under their current fence.
        s.lock().forget_in_flight();
        s.take_over_registry().await;
        tracing::info!(token, "scheduler: leading");
        s.wake.notify_one();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = s.leadership.until_not_leader(&shutdown) => break,
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    let op = msg
                        .subject
                        .as_str()
                        .rsplit('.')
                        .next()
                        .and_then(Op::from_name);
                    let (Some(op), Some(reply)) = (op, msg.reply.clone()) else { continue };
                    if !bulwark_common::micro::is_inbox(&reply) {
                        tracing::warn!(subject = %msg.subject, "forwarded request refused: its reply subject is not an inbox");
                        continue;
                    }
                    let s2 = s.clone();
                    tracker.spawn(async move {
                        // The standby passed the original sender on (inside bulwark's account).
                        let sender = identity::sender(msg.headers.as_ref());
                        let result = s2.handle(op, &msg.payload, &sender).await;
                        let sent = match result {
                            Ok(value) => s2.client.publish(reply, api::to_bytes(&value)).await,
                            Err(err) => s2.client.publish_with_headers(
                                reply,
                                api::error_headers(&err),
                                api::to_bytes(&err.body()),
                            ).await,
                        };
                        if let Err(err) = sent {
                            tracing::debug!(error = %err, "scheduler: forwarded reply not sent");
                        }
                    });
                }
            }
        }
        let _ = sub.unsubscribe().await;
        // Stepping down: the queue messages of the tasks in flight are left unacknowledged for
        // the next leader (redelivered after ack_wait).
        s.lock().forget_in_flight();
        if shutdown.is_cancelled() {
            break;
        }
    }
}

async fn read_heartbeats(
    s: Arc<Scheduler>,
    mut sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            msg = sub.next() => match msg { Some(m) => m, None => break },
        };
        s.heartbeat(&msg).await;
    }
}

async fn wake_on_arrivals(
    s: Arc<Scheduler>,
    mut sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            msg = sub.next() => if msg.is_none() { break },
        }
        s.wake.notify_one();
    }
}

/// Fetches tasks, highest priority first, as long as workers have free slots.
async fn dispatch_loop(s: Arc<Scheduler>, tracker: TaskTracker, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = s.wake.notified() => {}
            _ = tokio::time::sleep(IDLE_POLL) => {}
        }
        if s.lock().paused || !s.leadership.is_leader() {
            continue;
        }
        'priorities: for priority in (0..=9u8).rev() {
            loop {
                let free = s.lock().pool.free_slots() as usize;
                if free == 0 {
                    break 'priorities;
                }
                let want = free.min(FETCH_BATCH);
                let fetched = match s.consumers[usize::from(priority)]
                    .fetch()
                    .max_messages(want)
                    .messages()
                    .await
                {
                    Ok(batch) => batch,
                    Err(err) => {
                        tracing::warn!(priority, error = %err, "task queue fetch failed");
                        break 'priorities;
                    }
                };
                let messages = collect_batch(fetched, s.timeout).await;
                let got = messages.len();
                for msg in messages {
                    s.clone().accept_delivery(msg, &tracker);
                }
                if got < want {
                    break;
                }
            }
        }
    }
}

/// Declares silent workers dead, reassigns their tasks, and watches the queue depth.
async fn watchdog(
    s: Arc<Scheduler>,
    tracker: TaskTracker,
    mut tasks: jetstream::stream::Stream,
    shutdown: CancellationToken,
) {
    // Also often enough for the progress acknowledgements of tasks in flight.
    let interval = s.cfg.check_interval_s.min(s.cfg.ack_wait_s / 3.0);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(interval));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if !s.leadership.is_leader() {
            // A standby keeps its pool fresh from heartbeats but declares nobody dead: that
            // is the leader's call.
            continue;
        }
        let timeout = Duration::from_secs_f64(s.cfg.heartbeat_timeout_s);
        let (dead, orphans) = {
            let mut st = s.lock();
            let dead = st.pool.remove_dead(Instant::now(), timeout);
            let orphans: Vec<(String, String)> = st
                .in_flight
                .iter()
                .filter(|(_, f)| dead.contains(&f.worker_id))
                .map(|(id, f)| (id.clone(), f.worker_id.clone()))
                .collect();
            (dead, orphans)
        };
        if !dead.is_empty() {
            let mut st = s.lock();
            for worker in &dead {
                st.registered.remove(worker);
                st.declared_dead.insert(worker.clone());
            }
        }
        for worker in &dead {
            s.counters.dead_workers.fetch_add(1, Ordering::Relaxed);
            let registry = s.registry.clone();
            let gone = worker.clone();
            let owner = s.lock().bindings.owner(worker).map(str::to_owned);
            tracker.spawn(async move {
                if let Err(err) = registry.forget(&gone, owner.as_deref()).await {
                    tracing::warn!(worker_id = %gone, error = %err, "worker registry: dead worker not removed");
                }
            });
            let held: Vec<&String> = orphans
                .iter()
                .filter(|(_, w)| w == worker)
                .map(|(t, _)| t)
                .collect();
            s.incident(
                "htm_worker_recovery",
                "high",
                json!({"worker_id": worker, "in_flight": held.len(),
                "heartbeat_timeout_s": s.cfg.heartbeat_timeout_s}),
            )
            .await;
            let n = s
                .narrator
                .narrative("worker_declared_dead", "worker watchdog: heartbeat timeout")
                .why(format!(
                    "{worker} sent no heartbeat for over {:.1} s",
                    s.cfg.heartbeat_timeout_s
                ))
                .why(format!("{} task(s) it held are reassigned", held.len()))
                .context(json!({"worker_id": worker, "tasks": held}));
            s.narrator.publish(n).await;
        }
        for (task_id, worker) in orphans {
            let s2 = s.clone();
            tracker.spawn(async move {
                let why = format!("{worker} was declared dead");
                s2.reassign_and_deliver(&task_id, Some(&worker), true, &why)
                    .await;
            });
        }
        s.keep_confirmed_tasks().await;
        match tasks.info().await {
            Ok(info) => {
                let in_flight = s.lock().in_flight.len() as u64;
                let depth = info.state.messages.saturating_sub(in_flight);
                s.observe_depth(depth).await;
            }
            Err(err) => tracing::debug!(error = %err, "task stream info unavailable"),
        }
    }
}

impl Scheduler {
    /// Claims one slot of `who`'s share (`scheduler.max_share_per_identity` of the pool) for a
    /// dispatch under way; `None` when `who` holds its share already. bulwark's own services
    /// (`who` = `None`) are not capped.
    fn claim_share(&self, who: Option<&str>) -> Option<ShareClaim<'_>> {
        let Some(who) = who else {
            return Some(ShareClaim {
                scheduler: self,
                who: None,
            });
        };
        let mut st = self.lock();
        let cap = share_cap(st.pool.capacity(), self.cfg.max_share_per_identity);
        let held = st
            .in_flight
            .values()
            .filter(|f| f.submitter.as_deref() == Some(who))
            .count()
            + st.claiming.get(who).copied().unwrap_or(0);
        if held >= cap {
            return None;
        }
        *st.claiming.entry(who.to_owned()).or_default() += 1;
        Some(ShareClaim {
            scheduler: self,
            who: Some(who.to_owned()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the state is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A worker came back under the same id (its uptime went down): the tasks its previous run
    /// held are reassigned now, not after the queue's redelivery (`ack_wait_s`); tasks handed to
    /// the new run stay with it.
    async fn worker_restarted(self: Arc<Self>, worker: &str, now: Instant, uptime: Duration) {
        let started = now.checked_sub(uptime).unwrap_or(now);
        let orphans: Vec<String> = self
            .lock()
            .in_flight
            .iter()
            .filter(|(_, f)| f.worker_id == worker && f.assigned_at < started)
            .map(|(id, _)| id.clone())
            .collect();
        tracing::info!(
            worker,
            tasks = orphans.len(),
            "worker restarted: reassigning the tasks of its previous run"
        );
        let n = self
            .narrator
            .narrative("worker_restarted", "worker heartbeat: uptime went down")
            .why(format!(
                "{worker} restarted ({:.1} s ago): its previous run's tasks are lost with it",
                uptime.as_secs_f64()
            ))
            .why(format!(
                "{} task(s) it held are reassigned now",
                orphans.len()
            ))
            .context(
                json!({"worker_id": worker, "uptime_s": uptime.as_secs_f64(), "tasks": orphans}),
            );
        self.narrator.publish(n).await;
        for task_id in orphans {
            let s = self.clone();
            let worker = worker.to_owned();
            tokio::spawn(async move {
                let why = format!("{worker} restarted and lost it");
                s.reassign_and_deliver(&task_id, Some(&worker), true, &why)
                    .await;
            });
        }
    }

    /// The worker has the task under `fence`: from now on its queue message is kept from
    /// redelivery (see [`keep_confirmed_tasks`](Self::keep_confirmed_tasks)).
    fn confirm(&self, task_id: &str, fence: u64) {
        if let Some(flight) = self.lock().in_flight.get_mut(task_id)
            && flight.fence == fence
        {
            flight.confirmed = true;
        }
    }

    /// Tells the queue that confirmed tasks are still being worked on (JetStream progress
    /// acknowledgements, at least every third of `ack_wait_s`, for [`PROGRESS_SPAN`] times
    /// `ack_wait_s` after each delivery), so a long task is redelivered (and its assignment
    /// sent again) seldom and `ack_wait_s` can stay short: it is how soon a scheduler taking
    /// over sees the tasks its predecessor left.
    async fn keep_confirmed_tasks(&self) {
        let every = Duration::from_secs_f64(self.cfg.ack_wait_s / 3.0);
        let span = Duration::from_secs_f64(self.cfg.ack_wait_s * PROGRESS_SPAN);
        let now = Instant::now();
        let replies: Vec<async_nats::Subject> = {
            let mut st = self.lock();
            st.in_flight
                .values_mut()
                .filter(|f| {
                    f.confirmed
                        && now.saturating_duration_since(f.progress_at) >= every
                        && now.saturating_duration_since(f.delivered_at) < span
                })
                .filter_map(|f| {
                    let reply = f.msg.as_ref()?.reply.clone()?;
                    f.progress_at = now;
                    Some(reply)
                })
                .collect()
        };
        for reply in replies {
            if let Err(err) = self
                .client
                .publish(reply, bytes::Bytes::from_static(b"+WPI"))
                .await
            {
                tracing::debug!(error = %err, "progress acknowledgement not sent; the task may be redelivered (it never runs twice)");
            }
        }
    }

    /// Takes one heartbeat: refused (dead-lettered) when it does not parse, names another
    /// worker than its subject, claims no capacity, or comes from another user than the one its
    /// worker id is bound to; its capacity claim bounded by `max_worker_capacity`; then it feeds
    /// the pool, and the registry when the worker, its run or its binding is new.
    async fn heartbeat(self: &Arc<Self>, msg: &async_nats::Message) {
        let mut hb = match serde_json::from_slice::<Heartbeat>(&msg.payload) {
            Ok(hb) => hb,
            Err(err) => {
                let reason = format!("malformed heartbeat: {err}");
                return self.dead_letter(&msg.subject, &msg.payload, &reason).await;
            }
        };
        if subjects::worker_heartbeat(&hb.worker_id) != msg.subject.as_str() || hb.capacity == 0 {
            let reason = format!(
                "heartbeat of {:?} on {} names another worker or has capacity 0",
                hb.worker_id, msg.subject
            );
            return self.dead_letter(&msg.subject, &msg.payload, &reason).await;
        }
        let sender = identity::sender(msg.headers.as_ref());
        let heard = self.bind(&hb.worker_id, &sender);
        let (user, first_binding) = match heard {
            Heard::Service => (None, false),
            Heard::Owner { user, first } => (Some(user), first),
            Heard::Impostor { user, owner } => {
                let what = format!("heartbeat of {}", hb.worker_id);
                self.refuse_impostor(&what, &hb.worker_id, &user, &owner)
                    .await;
                let reason = format!(
                    "heartbeat of {:?} from NATS user {user:?}, but worker id {:?} is bound to user {owner:?}",
                    hb.worker_id, hb.worker_id
                );
                return self
                    .send_dead_letter(&msg.subject, &msg.payload, &reason)
                    .await;
            }
            Heard::OverLimit { user, max } => {
                let reason = format!(
                    "heartbeat of {:?} from NATS user {user:?}, which already owns {max} worker ids (scheduler.max_worker_ids_per_user)",
                    hb.worker_id
                );
                self.refuse_new_id(&hb.worker_id, &user, &reason).await;
                return self
                    .send_dead_letter(&msg.subject, &msg.payload, &reason)
                    .await;
            }
        };
        if let Err(max) = bindings::bounded_capacity(hb.capacity, self.cfg.max_worker_capacity) {
            self.clamp_capacity(&hb, max, &sender).await;
            hb.capacity = max;
        }
        let now = Instant::now();
        let leader = self.leadership.is_leader();
        let (restarted, register) = {
            let mut st = self.lock();
            let restarted = st.pool.heartbeat(&hb, now);
            st.declared_dead.remove(&hb.worker_id);
            let register =
                leader && (first_binding || st.registered.get(&hb.worker_id) != Some(&hb.run_id));
            if register {
                st.registered
                    .insert(hb.worker_id.clone(), hb.run_id.clone());
            }
            (restarted, register)
        };
        if register {
            self.register(&hb, user);
        }
        if let Some(uptime) = restarted
            && leader
        {
            self.clone()
                .worker_restarted(&hb.worker_id, now, uptime)
                .await;
        }
        self.wake.notify_one();
    }

    /// Counts, logs and (the first time per worker id and user) narrates a heartbeat or report
    /// `what` for `worker_id` from `user`, refused because the id is bound to `owner`.
    async fn refuse_impostor(&self, what: &str, worker_id: &str, user: &str, owner: &str) {
        self.counters.impostors.fetch_add(1, Ordering::Relaxed);
        if !self.lock().bindings.first_refusal(worker_id, user) {
            tracing::debug!(
                worker_id,
                user,
                owner,
                "{what} refused again: the id is bound to another user"
            );
            return;
        }
        tracing::warn!(
            worker_id,
            user,
            owner,
            "{what} refused: the worker id is bound to another NATS user"
        );
        let n = self
            .narrator
            .narrative("worker_impostor_refused", "worker id bound to a NATS user")
            .why(format!(
                "{what} came from NATS user {user}, but worker id {worker_id} belongs to user {owner} (the first to heartbeat it)"
            ))
            .why("refused: a worker cannot heartbeat or report under another credential's worker id")
            .context(json!({"worker_id": worker_id, "user": user, "owner": owner, "what": what}));
        self.narrator.publish(n).await;
    }

    /// Judges the sender of a heartbeat for `worker_id`; a user at its limit of ids first
    /// releases those of its workers that are gone (forgotten here and in the registry).
    fn bind(&self, worker_id: &str, sender: &Sender) -> Heard {
        let mut st = self.lock();
        let heard = st.bindings.heartbeat(worker_id, sender);
        let Heard::OverLimit { user, .. } = &heard else {
            return heard;
        };
        let State { bindings, pool, .. } = &mut *st;
        let released = bindings.release_departed(user, |id| pool.contains(id));
        if released.is_empty() {
            return heard;
        }
        for id in &released {
            st.declared_dead.remove(id);
            st.clamped.remove(id);
            st.registered.remove(id);
        }
        let heard = st.bindings.heartbeat(worker_id, sender);
        drop(st);
        tracing::info!(
            ?released,
            "worker ids of departed workers released to make room"
        );
        let registry = self.registry.clone();
        tokio::spawn(async move {
            for id in released {
                if let Err(err) = registry.forget(&id, None).await {
                    tracing::warn!(worker_id = %id, error = %err, "worker registry: released id not removed");
                }
            }
        });
        heard
    }

    /// Counts a heartbeat refused because its user owns as many worker ids as it may; narrates
    /// the first refusal of each user.
    async fn refuse_new_id(&self, worker_id: &str, user: &str, reason: &str) {
        self.counters
            .worker_ids_refused
            .fetch_add(1, Ordering::Relaxed);
        if !self.lock().bindings.first_refusal("", user) {
            return;
        }
        tracing::warn!(worker_id, user, "{reason}: refused");
        let n = self
            .narrator
            .narrative("worker_id_refused", "scheduler.max_worker_ids_per_user")
            .why(reason.to_owned())
            .why("refused: one NATS user may not grow the pool, the bindings and the dead-worker memory with ever new ids")
            .context(json!({"worker_id": worker_id, "user": user}));
        self.narrator.publish(n).await;
    }

    /// Counts a heartbeat claiming more than `max` task slots; logs and narrates it when the
    /// claim is new for its worker.
    async fn clamp_capacity(&self, hb: &Heartbeat, max: u32, sender: &Sender) {
        self.counters
            .capacity_clamped
            .fetch_add(1, Ordering::Relaxed);
        let new_claim = self
            .lock()
            .clamped
            .insert(hb.worker_id.clone(), hb.capacity)
            != Some(hb.capacity);
        if !new_claim {
            return;
        }
        let (worker, claimed, user) = (&hb.worker_id, hb.capacity, sender.name());
        tracing::warn!(worker_id = %worker, claimed, max, user, "worker capacity claim clamped");
        let n = self
            .narrator
            .narrative("capacity_clamped", "scheduler.max_worker_capacity")
            .why(format!(
                "{worker} (NATS user {user}) claims a capacity of {claimed} task(s), over the bound of {max}"
            ))
            .why(format!("it is handed at most {max} task(s) at once"))
            .context(json!({"worker_id": worker, "claimed": claimed, "max_worker_capacity": max,
                            "user": user}));
        self.narrator.publish(n).await;
    }

    /// Learns the bindings of worker ids to users the registry holds (at start and at a
    /// takeover); the registry unreadable leaves the ones in memory.
    async fn learn_bindings(&self) -> Vec<Sighting> {
        let sightings = match self.registry.load().await {
            Ok(v) => v,
            Err(err) => {
                tracing::warn!(error = %err, "worker registry unavailable: worker ids are bound again by their next heartbeat");
                return Vec::new();
            }
        };
        let mut st = self.lock();
        for sighting in &sightings {
            if let Some(user) = &sighting.user {
                st.bindings.learn(&sighting.worker_id, user);
            }
        }
        sightings
    }

    /// Records a worker heard from for the first time in this tenure, or under a new run, or
    /// newly bound to `user`, in the registry (in the background: the heartbeat loop does not
    /// wait for the store).
    fn register(self: &Arc<Self>, hb: &Heartbeat, user: Option<String>) {
        let user = user.or_else(|| self.lock().bindings.owner(&hb.worker_id).map(str::to_owned));
        let sighting = Sighting {
            worker_id: hb.worker_id.clone(),
            run_id: hb.run_id.clone(),
            since: time::now(),
            user,
            departed: false,
        };
        let s = self.clone();
        tokio::spawn(async move {
            if let Err(err) = s.registry.record(&sighting).await {
                tracing::warn!(worker_id = %sighting.worker_id, error = %err, "worker registry: not recorded; retried at the next heartbeat");
                s.lock().registered.remove(&sighting.worker_id);
            }
        });
    }

    /// At the start of a tenure: the workers the registry lists and this replica has not heard
    /// from are expected (unconfirmed, taking no work); those that stay silent for
    /// `heartbeat_timeout_s` are declared dead by the watchdog like any other.
    async fn take_over_registry(&self) {
        let sightings: Vec<Sighting> = self
            .learn_bindings()
            .await
            .into_iter()
            .filter(|s| !s.departed)
            .collect();
        let now = Instant::now();
        let mut expected = Vec::new();
        {
            let mut st = self.lock();
            for sighting in &sightings {
                if !st.pool.contains(&sighting.worker_id) {
                    st.pool
                        .expect(&sighting.worker_id, sighting.run_id.clone(), now);
                    expected.push(sighting.worker_id.clone());
                }
                // An entry without the binding this replica knows is written again at the
                // worker's next heartbeat.
                if st.bindings.owner(&sighting.worker_id) == sighting.user.as_deref() {
                    st.registered
                        .insert(sighting.worker_id.clone(), sighting.run_id.clone());
                }
            }
        }
        if expected.is_empty() {
            return;
        }
        let n = self
            .narrator
            .narrative("workers_expected", "worker registry read at takeover")
            .why(format!(
                "{} worker(s) recorded by an earlier leader have not been heard from by this one: {}",
                expected.len(),
                expected.join(", ")
            ))
            .why(format!(
                "each is declared dead unless it sends a heartbeat within {:.1} s",
                self.cfg.heartbeat_timeout_s
            ))
            .context(json!({"workers": expected, "registered": sightings.len()}));
        self.narrator.publish(n).await;
    }

    /// Answers a micro request: here when this replica leads, else through the leader.
    async fn serve(&self, op: Op, request: &Request) {
        // During an election (at start, or a failover) nobody may lead for up to a lease TTL:
        // keep trying for that long before answering 503.
        let patience = Duration::from_secs_f64(self.lease_ttl_s).max(self.timeout);
        let deadline = tokio::time::Instant::now() + patience;
        let sender = identity::sender(request.message.headers.as_ref());
        // Forwarded with the sender the server stamped, so the leader judges the same identity.
        let mut forward_headers = async_nats::HeaderMap::new();
        if let Some(info) = request
            .message
            .headers
            .as_ref()
            .and_then(|h| h.get(identity::REQUEST_INFO))
        {
            forward_headers.insert(identity::REQUEST_INFO, info.clone());
        }
        loop {
            if self.leadership.is_leader() {
                let result = self.handle(op, &request.message.payload, &sender).await;
                api::respond(request, result).await;
                return;
            }
            self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
            let forwarded = tokio::time::timeout(
                self.timeout,
                self.client.request_with_headers(
                    subjects::scheduler_leader(op.name()),
                    forward_headers.clone(),
                    request.message.payload.clone(),
                ),
            )
            .await;
            if let Ok(Ok(reply)) = forwarded {
                let outcome = match reply.headers {
                    Some(headers) => {
                        request
                            .respond_with_headers(Ok(reply.payload), headers)
                            .await
                    }
                    None => request.respond(Ok(reply.payload)).await,
                };
                if let Err(err) = outcome {
                    tracing::debug!(error = %err, "scheduler: relayed reply not sent");
                }
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let leader = match self.leadership.role() {
                    lease::Role::Standby {
                        leader: Some(l), ..
                    } => format!("the leader {l} did not answer"),
                    _ => "no scheduler leads at the moment (failover in progress)".to_owned(),
                };
                api::respond(
                    request,
                    Err::<Value, _>(ApiError::unavailable(format!("{leader}; retry shortly"))),
                )
                .await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn handle(&self, op: Op, body: &[u8], sender: &Sender) -> Result<Value, ApiError> {
        match op {
            Op::Result => self.report(body, sender).await,
            Op::Pause => self.set_paused(true).await,
            Op::Resume => self.set_paused(false).await,
            Op::Shed => self.shed(body).await,
            Op::Replay => self.replay(body).await,
            Op::Readiness => Ok(self.readiness()),
        }
    }

    /// A compare-and-set of an intent record under this replica's fencing token: refused when
    /// it does not lead, or when the record carries a newer leader's token (narrated and
    /// counted). A written record gets this replica's token.
    async fn update_intent<R, E>(
        &self,
        key: &str,
        mut change: impl FnMut(&mut IntentRecord) -> Result<Change<R>, E>,
    ) -> Result<Result<(R, IntentRecord), Fenced<E>>, KvError> {
        let Some(token) = self.leadership.token() else {
            self.counters.fenced.fetch_add(1, Ordering::Relaxed);
            return Ok(Err(Fenced::Stale {
                record_token: 0,
                ours: None,
            }));
        };
        let result = update_fenced(&self.intents, key, token, &mut change).await;
        if let Ok(Err(Fenced::Stale { record_token, ours })) = &result {
            self.counters.fenced.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                key,
                record_token,
                ours,
                "scheduler: write refused, a newer leader changed the record"
            );
            let n = self
                .narrator
                .narrative("stale_leader_refused", "fencing token on the intent record")
                .why(format!(
                    "{} holds token {ours:?}, the record {key} was written under token {record_token} by a newer leader",
                    self.leadership.holder()
                ))
                .why("the write is refused: a leader that lost its lease may not act")
                .context(json!({"intent_id": key, "record_token": record_token, "token": ours,
                                "holder": self.leadership.holder()}));
            self.narrator.publish(n).await;
        }
        result
    }

    // ---- dispatch -----------------------------------------------------------------------------

    /// Takes a delivered queue message: reserves a worker slot and hands the rest to a task.
    fn accept_delivery(self: Arc<Self>, msg: jetstream::Message, tracker: &TaskTracker) {
        let task: Task = match serde_json::from_slice(&msg.payload) {
            Ok(task) => task,
            Err(err) => {
                let s = self.clone();
                tracker.spawn(async move {
                    s.dead_letter(
                        &msg.subject,
                        &msg.payload,
                        &format!("malformed task: {err}"),
                    )
                    .await;
                    ack(&msg).await;
                });
                return;
            }
        };
        let choice = {
            let mut st = self.lock();
            if let Some(flight) = st.in_flight.get_mut(&task.task_id) {
                // Redelivered after ack_wait while its worker still has it: keep the newer
                // handle and send the assignment again, in case the first one never arrived
                // (a worker that has it accepts without running it twice).
                flight.msg = Some(msg);
                flight.delivered_at = Instant::now();
                flight.progress_at = Instant::now();
                let handover = Handover {
                    task,
                    worker_id: flight.worker_id.clone(),
                    fence: flight.fence,
                    attempt: flight.attempt,
                };
                drop(st);
                let s = self.clone();
                tracker.spawn(async move { s.deliver(handover).await });
                return;
            }
            st.pool.choose(None)
        };
        let s = self.clone();
        tracker.spawn(async move {
            match choice {
                Some(choice) => {
                    s.dispatch(task, msg, choice.worker_id, choice.reasons)
                        .await
                }
                None => nak(&msg, RETRY_DELAY).await,
            }
        });
    }

    async fn dispatch(
        &self,
        task: Task,
        msg: jetstream::Message,
        worker_id: String,
        reasons: Vec<String>,
    ) {
        let record = match kvx::read::<IntentRecord>(&self.intents, &task.intent_id).await {
            Ok(Some(record)) => record.value,
            Ok(None) => {
                self.lock().pool.release(&worker_id, None);
                self.dead_letter(
                    &msg.subject,
                    &msg.payload,
                    "task names an intent that does not exist",
                )
                .await;
                ack(&msg).await;
                return;
            }
            Err(err) => {
                self.lock().pool.release(&worker_id, None);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(task_id = %task.task_id, error = %err, "intent store unavailable; task retried");
                nak(&msg, RETRY_DELAY).await;
                return;
            }
        };
        match record.status {
            IntentStatus::Queued => {}
            IntentStatus::Dispatched | IntentStatus::Running => {
                // Redelivered after a scheduler restart: its worker may still be running it.
                self.lock().pool.release(&worker_id, None);
                self.adopt(task, msg, record).await;
                return;
            }
            IntentStatus::PendingReview | IntentStatus::PendingVote => {
                self.lock().pool.release(&worker_id, None);
                self.dead_letter(
                    &msg.subject,
                    &msg.payload,
                    "task for an intent that is not approved",
                )
                .await;
                ack(&msg).await;
                return;
            }
            // Finished, rejected or shed: this copy is a duplicate; it never runs twice.
            _ => {
                self.lock().pool.release(&worker_id, None);
                ack(&msg).await;
                return;
            }
        }
        // One identity holds at most its share of the slots: the rest of its tasks wait their
        // turn in the queue while other identities' tasks run.
        let Some(_claim) = self.claim_share(record.submitted_by.as_deref()) else {
            self.lock().pool.release(&worker_id, None);
            self.counters
                .identity_capped
                .fetch_add(1, Ordering::Relaxed);
            nak(&msg, RETRY_DELAY).await;
            return;
        };
        let now = time::now();
        let assigned = worker_id.clone();
        let moved = self
            .update_intent(&task.intent_id, |r: &mut IntentRecord| {
                if r.status != IntentStatus::Queued {
                    return Ok::<_, ()>(Change::Keep(None));
                }
                let fence = r.assignment.as_ref().map_or(0, |a| a.fence) + 1;
                let attempt = r.assignment.as_ref().map_or(0, |a| a.attempt) + 1;
                r.assignment = Some(AssignmentRecord {
                    worker_id: assigned.clone(),
                    fence,
                    attempt,
                    dispatched_at: now.clone(),
                });
                r.transition(IntentStatus::Dispatched, Some(assigned.clone()), None);
                Ok(Change::Write(Some((fence, attempt))))
            })
            .await;
        let (fence, attempt) = match moved {
            Ok(Ok((Some(fa), _))) => fa,
            Ok(Err(Fenced::Stale { .. })) => {
                // A newer leader runs the queue: leave this copy to it.
                self.lock().pool.release(&worker_id, None);
                nak(&msg, Duration::ZERO).await;
                return;
            }
            Ok(_) | Err(KvError::NotFound(_)) => {
                // Someone else moved it first; this copy is not ours to run.
                self.lock().pool.release(&worker_id, None);
                ack(&msg).await;
                return;
            }
            Err(err) => {
                self.lock().pool.release(&worker_id, None);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(task_id = %task.task_id, error = %err, "dispatch not recorded; task retried");
                nak(&msg, RETRY_DELAY).await;
                return;
            }
        };
        let depth = {
            let mut st = self.lock();
            st.in_flight.insert(
                task.task_id.clone(),
                InFlight {
                    msg: Some(msg),
                    worker_id: worker_id.clone(),
                    fence,
                    attempt,
                    assigned_at: Instant::now(),
                    submitter: record.submitted_by.clone(),
                    confirmed: false,
                    progress_at: Instant::now(),
                    delivered_at: Instant::now(),
                },
            );
            st.queue_depth
        };
        self.counters.dispatched.fetch_add(1, Ordering::Relaxed);
        self.mesh_task(
            "task.dispatched",
            &task,
            Some(&worker_id),
            json!({"attempt": attempt, "fence": fence}),
        )
        .await;
        let n = self
            .narrator
            .narrative("task_dispatched", "least-loaded healthy worker (slots in use, CPU, recent failures)")
            .whys(reasons)
            .why(format!("priority {} task, queue depth {depth}", task.priority))
            .intent(&task.intent_id, &task.correlation_id)
            .context(json!({"task_id": task.task_id, "worker_id": worker_id, "attempt": attempt, "fence": fence,
                            "priority": task.priority, "queue_depth": depth}));
        self.narrator.publish(n).await;
        self.deliver(Handover {
            task,
            worker_id,
            fence,
            attempt,
        })
        .await;
    }

    /// Takes back a dispatched task seen again after a restart: it stays with its worker under
    /// its current fence, and the assignment is sent again.
    async fn adopt(&self, task: Task, msg: jetstream::Message, record: IntentRecord) {
        let Some(a) = record.assignment else {
            ack(&msg).await;
            return;
        };
        let dead = {
            let mut st = self.lock();
            if let Some(flight) = st.in_flight.get_mut(&task.task_id) {
                flight.msg = Some(msg);
                flight.delivered_at = Instant::now();
                flight.progress_at = Instant::now();
                return;
            }
            let dead = st.declared_dead.contains(&a.worker_id) && !st.pool.contains(&a.worker_id);
            if !dead {
                st.pool.adopt(&a.worker_id, Instant::now());
            }
            st.in_flight.insert(
                task.task_id.clone(),
                InFlight {
                    msg: Some(msg),
                    worker_id: a.worker_id.clone(),
                    fence: a.fence,
                    attempt: a.attempt,
                    assigned_at: Instant::now(),
                    submitter: record.submitted_by.clone(),
                    confirmed: false,
                    progress_at: Instant::now(),
                    delivered_at: Instant::now(),
                },
            );
            dead
        };
        if dead {
            // Its worker died while no scheduler watched it (declared dead at takeover): a new
            // attempt elsewhere, now.
            let why = format!("{} was declared dead", a.worker_id);
            self.reassign_and_deliver(&task.task_id, Some(&a.worker_id), true, &why)
                .await;
            return;
        }
        // The previous scheduler may have died before the assignment reached the worker: send
        // it again under the same fence. A worker already running it accepts without starting
        // it twice; a dead worker does not answer and the task moves on.
        self.deliver(Handover {
            task,
            worker_id: a.worker_id,
            fence: a.fence,
            attempt: a.attempt,
        })
        .await;
    }

    /// Hands an assignment over. A worker that refuses it (full) or does not listen is
    /// suspended (no new work until its next heartbeat) and the task moves on to another worker,
    /// until one accepts or none is left (then it goes back to the queue).
    async fn deliver(&self, mut handover: Handover) {
        loop {
            let Handover {
                task,
                worker_id,
                fence,
                attempt,
            } = handover;
            let task_id = task.task_id.clone();
            let Some(leader_token) = self.leadership.token() else {
                // No longer the leader: the record stays as written; the next leader adopts the
                // task when the queue redelivers it.
                self.counters.fenced.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let assignment = Assignment {
                task,
                worker_id: worker_id.clone(),
                fence,
                attempt,
                leader_token,
            };
            let request = self.client.request(
                subjects::worker_task(&worker_id),
                api::to_bytes(&assignment),
            );
            let refused = match tokio::time::timeout(
                Duration::from_millis(self.cfg.dispatch_timeout_ms),
                request,
            )
            .await
            {
                // Accepted: a reply that is not a micro error (a worker may send headers back,
                // e.g. nats-py echoes the request's `Nats-Request-Info`).
                Ok(Ok(reply))
                    if reply
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(api::SERVICE_ERROR_CODE))
                        .is_none() =>
                {
                    self.confirm(&task_id, fence);
                    return;
                }
                Ok(Ok(reply)) if error_code(&reply.payload).as_deref() == Some("stale_leader") => {
                    // The worker has seen a newer leader: this replica lost its lease.
                    self.counters.fenced.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        task_id,
                        worker_id,
                        leader_token,
                        "assignment refused: a newer scheduler leads"
                    );
                    return;
                }
                Ok(Ok(reply)) => format!(
                    "{worker_id} refused it: {}",
                    String::from_utf8_lossy(&reply.payload)
                ),
                Ok(Err(err))
                    if err.kind() == async_nats::client::RequestErrorKind::NoResponders =>
                {
                    format!("{worker_id} is not listening for tasks")
                }
                // No answer in time: the worker may have taken it. Reassigning now could run it
                // twice, so it stays; a dead worker is caught by the heartbeat watchdog, and a lost
                // assignment is sent again when the queue redelivers the task after ack_wait.
                Ok(Err(_)) | Err(_) => {
                    tracing::info!(
                        task_id,
                        worker_id,
                        "assignment not confirmed in time; kept with the worker"
                    );
                    return;
                }
            };
            self.lock().pool.suspend(&worker_id);
            match self
                .reassign(&task_id, Some(&worker_id), false, &refused)
                .await
            {
                Some(next) => handover = next,
                None => return,
            }
        }
    }

    /// Reassigns and hands the task over.
    async fn reassign_and_deliver(
        &self,
        task_id: &str,
        from: Option<&str>,
        count_attempt: bool,
        why: &str,
    ) {
        if let Some(handover) = self.reassign(task_id, from, count_attempt, why).await {
            self.deliver(handover).await;
        }
    }

    /// Moves a dispatched task to another worker under a new fence. `count_attempt`: the old
    /// worker may have run it (it died or failed), so this is a new attempt.
    async fn reassign(
        &self,
        task_id: &str,
        from: Option<&str>,
        count_attempt: bool,
        why: &str,
    ) -> Option<Handover> {
        let choice = {
            let mut st = self.lock();
            if let Some(from) = from
                && let Some(flight) = st.in_flight.get(task_id)
                && flight.worker_id == from
            {
                st.pool.release(from, None);
            }
            st.pool.choose(from)
        };
        let max = self.cfg.max_attempts;
        let target = choice.as_ref().map(|c| c.worker_id.clone());
        let now = time::now();
        let updated = self
            .update_intent(task_id, |r: &mut IntentRecord| {
                if !matches!(r.status, IntentStatus::Dispatched | IntentStatus::Running) {
                    return Ok::<_, ()>(Change::Keep(Reassigned::Gone));
                }
                let Some(prev) = r.assignment.clone() else {
                    return Ok(Change::Keep(Reassigned::Gone));
                };
                if from.is_some_and(|f| f != prev.worker_id) {
                    return Ok(Change::Keep(Reassigned::Gone));
                }
                let attempt = prev.attempt + u32::from(count_attempt);
                if attempt > max {
                    return Ok(Change::Keep(Reassigned::Exhausted));
                }
                match &target {
                    Some(worker) => {
                        let fence = prev.fence + 1;
                        r.assignment = Some(AssignmentRecord {
                            worker_id: worker.clone(),
                            fence,
                            attempt,
                            dispatched_at: now.clone(),
                        });
                        r.transition(
                            IntentStatus::Dispatched,
                            Some(worker.clone()),
                            Some(format!("reassigned: {why}")),
                        );
                        Ok(Change::Write(Reassigned::To { fence, attempt }))
                    }
                    None => {
                        // The next dispatch counts one attempt more than this record says: leave
                        // the count where the next attempt should start (a refusal used none).
                        if let Some(a) = r.assignment.as_mut() {
                            a.attempt = attempt - 1;
                        }
                        r.transition(
                            IntentStatus::Queued,
                            None,
                            Some(format!("{why}; no worker free, back to the queue")),
                        );
                        Ok(Change::Write(Reassigned::Requeued))
                    }
                }
            })
            .await;
        let (outcome, record) = match updated {
            Ok(Ok((outcome, record))) => (outcome, Some(record)),
            Ok(Err(_)) | Err(KvError::NotFound(_)) => (Reassigned::Gone, None),
            Err(err) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(task_id, error = %err, "reassignment not recorded; the watchdog retries");
                if let Some(c) = &choice {
                    self.lock().pool.release(&c.worker_id, None);
                }
                return None;
            }
        };
        let Some(record) = record else {
            if let Some(c) = &choice {
                self.lock().pool.release(&c.worker_id, None);
            }
            return None;
        };
        let task = Task::for_intent(&record.intent, record.decision.priority, tier_of(&record));
        match outcome {
            Reassigned::Gone => {
                if let Some(c) = &choice {
                    self.lock().pool.release(&c.worker_id, None);
                }
                None
            }
            Reassigned::Exhausted => {
                if let Some(c) = &choice {
                    self.lock().pool.release(&c.worker_id, None);
                }
                self.fail_for_good(task_id, &format!("{why}; no attempts left ({max} allowed)"))
                    .await;
                None
            }
            Reassigned::Requeued => {
                let msg = self.lock().in_flight.remove(task_id).and_then(|f| f.msg);
                if let Some(msg) = msg {
                    nak(&msg, RETRY_DELAY).await;
                }
                None
            }
            Reassigned::To { fence, attempt } => {
                let worker = target.unwrap_or_default();
                if let Some(flight) = self.lock().in_flight.get_mut(task_id) {
                    flight.assigned_at = Instant::now();
                    flight.worker_id = worker.clone();
                    flight.fence = fence;
                    flight.attempt = attempt;
                    // Unconfirmed until the new worker accepts: if the assignment is lost, the
                    // queue's redelivery sends it again.
                    flight.confirmed = false;
                }
                self.counters.reassigned.fetch_add(1, Ordering::Relaxed);
                self.mesh_task(
                    "task.reassigned",
                    &task,
                    Some(&worker),
                    json!({"from": from, "attempt": attempt, "fence": fence, "reason": why}),
                )
                .await;
                let n = self
                    .narrator
                    .narrative("task_reassigned", "fenced reassignment to the least-loaded healthy worker")
                    .why(why.to_owned())
                    .whys(choice.map(|c| c.reasons).unwrap_or_default())
                    .why(format!("attempt {attempt} of {max}, fence {fence}: reports under older fences are refused"))
                    .intent(&task.intent_id, &task.correlation_id)
                    .context(json!({"task_id": task_id, "from": from, "to": worker, "attempt": attempt, "fence": fence}));
                self.narrator.publish(n).await;
                Some(Handover {
                    task,
                    worker_id: worker,
                    fence,
                    attempt,
                })
            }
        }
    }

    /// Fails a task after its last attempt: status failed, dead-letter record, queue message
    /// acknowledged.
    async fn fail_for_good(&self, task_id: &str, error: &str) {
        let failed = self
            .update_intent(task_id, |r: &mut IntentRecord| {
                if !matches!(
                    r.status,
                    IntentStatus::Dispatched | IntentStatus::Running | IntentStatus::Queued
                ) {
                    return Ok::<_, ()>(Change::Keep(false));
                }
                r.transition(IntentStatus::Failed, None, Some(error.to_owned()));
                r.error = Some(error.to_owned());
                Ok(Change::Write(true))
            })
            .await;
        let Ok(Ok((true, record))) = failed else {
            return;
        };
        let flight = self.lock().in_flight.remove(task_id);
        let task = Task::for_intent(&record.intent, record.decision.priority, tier_of(&record));
        let dead = json!({"task": task, "error": error, "history": record.history, "assignment": record.assignment,
                          "failed_at": time::now()});
        let stored = self
            .js
            .send_publish(
                subjects::TASK_DEAD,
                PublishMessage::build()
                    .payload(api::to_bytes(&dead))
                    .message_id(format!("{task_id}:dead")),
            )
            .await;
        match stored {
            Ok(ack_future) => {
                if let Err(err) = ack_future.await {
                    tracing::error!(task_id, error = %err, record = %dead, "dead-letter record not stored");
                }
            }
            Err(err) => {
                tracing::error!(task_id, error = %err, record = %dead, "dead-letter record not sent")
            }
        }
        if let Some(msg) = flight.and_then(|f| f.msg) {
            ack(&msg).await;
        }
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        self.mesh_task(
            "task.failed",
            &task,
            None,
            json!({"error": error, "dead_letter": subjects::TASK_DEAD}),
        )
        .await;
        let n = self
            .narrator
            .narrative("task_failed", "attempt limit, then dead-letter stream")
            .why(error.to_owned())
            .why(format!(
                "kept with its history in {}",
                streams::TASKS_DEAD_STREAM
            ))
            .intent(&task.intent_id, &task.correlation_id)
            .context(json!({"task_id": task_id, "attempts": record.assignment.map(|a| a.attempt)}));
        self.narrator.publish(n).await;
    }

    // ---- worker reports -----------------------------------------------------------------------

    async fn report(&self, body: &[u8], sender: &Sender) -> Result<Value, ApiError> {
        let report: TaskReport = match api::decode(body, "invalid_report", MAX_BODY) {
            Ok(r) => r,
            Err(err) => {
                self.dead_letter(subjects::TASK_RESULT, body, &err.message)
                    .await;
                return Err(err);
            }
        };
        self.check_reporter(&report, body, sender).await?;
        let fence = report.fence;
        let worker = report.worker_id.clone();
        let outcome = report.outcome;
        let applied = self
            .update_intent(&report.task_id, |r: &mut IntentRecord| {
                let current = r
                    .assignment
                    .as_ref()
                    .is_some_and(|a| a.fence == fence && a.worker_id == worker);
                if !current {
                    return Err(r.status);
                }
                match (outcome, r.status) {
                    (Outcome::Started, IntentStatus::Dispatched) => {
                        r.transition(IntentStatus::Running, Some(worker.clone()), None);
                        Ok(Change::Write(Report::Fresh))
                    }
                    (Outcome::Completed, IntentStatus::Dispatched | IntentStatus::Running) => {
                        r.transition(IntentStatus::Completed, Some(worker.clone()), None);
                        r.result = report.result.clone();
                        Ok(Change::Write(Report::Fresh))
                    }
                    // A failure is decided below (retry or fail for good); the record moves there.
                    (Outcome::Failed, IntentStatus::Dispatched | IntentStatus::Running) => {
                        Ok(Change::Keep(Report::Fresh))
                    }
                    // The same report again, because its answer was lost (a scheduler died after
                    // recording it): acknowledged, nothing done twice.
                    (Outcome::Started, IntentStatus::Running | IntentStatus::Completed)
                    | (Outcome::Completed, IntentStatus::Completed) => {
                        Ok(Change::Keep(Report::Repeated))
                    }
                    (_, status) => Err(status),
                }
            })
            .await;
        if let Ok(Ok((Report::Repeated, record))) = &applied {
            if record.status == IntentStatus::Completed {
                // Its first copy was recorded but the answer lost (a store or leader change in
                // between): finish the bookkeeping that answer would have done, once.
                let flight = {
                    let mut st = self.lock();
                    let flight = st.in_flight.remove(&report.task_id);
                    if let Some(f) = &flight
                        && !f.worker_id.is_empty()
                    {
                        st.pool.release(&f.worker_id, Some(true));
                    }
                    flight
                };
                if let Some(msg) = flight.and_then(|f| f.msg) {
                    ack(&msg).await;
                }
            }
            return Ok(json!({"accepted": true, "task_id": report.task_id, "repeated": true}));
        }
        let record = match applied {
            Ok(Ok((_, record))) => record,
            Ok(Err(Fenced::Stale { .. })) => {
                return Err(ApiError::unavailable(
                    "this scheduler no longer leads; retry the report (the new leader takes it)",
                ));
            }
            Ok(Err(Fenced::Refused(status))) => {
                self.counters.stale_reports.fetch_add(1, Ordering::Relaxed);
                let n = self
                    .narrator
                    .narrative("report_refused", "fencing token check")
                    .why(format!(
                        "{worker} reported {outcome:?} under fence {fence}, which is not the task's current assignment (status {})",
                        status.as_str()
                    ).to_lowercase())
                    .context(json!({"task_id": report.task_id, "worker_id": worker, "fence": fence}));
                self.narrator.publish(n).await;
                return Err(ApiError::conflict(
                    "stale_assignment",
                    format!(
                        "task {} is no longer assigned to {worker} under fence {fence}; drop it",
                        report.task_id
                    ),
                ));
            }
            Err(KvError::NotFound(_)) => {
                return Err(ApiError::not_found(
                    "unknown_task",
                    format!("no task {:?}", report.task_id),
                ));
            }
            Err(err) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::unavailable(format!(
                    "intent store unavailable: {err}; retry the report"
                )));
            }
        };
        let task = Task::for_intent(&record.intent, record.decision.priority, tier_of(&record));
        match outcome {
            Outcome::Started => self.confirm(&report.task_id, fence),
            Outcome::Completed => {
                let queued_ms = record
                    .history
                    .iter()
                    .rev()
                    .find(|h| h.status == IntentStatus::Queued)
                    .and_then(|h| time::parse_ms(&h.at));
                let latency_ms = queued_ms.map(|q| (time::now_ms() - q).max(0) as u64);
                let flight = {
                    let mut st = self.lock();
                    if let Some(ms) = latency_ms {
                        st.latency.record(ms);
                    }
                    let flight = st.in_flight.remove(&report.task_id);
                    // The slot is this tenure's only if it handed the task out (or adopted it).
                    if flight.as_ref().is_some_and(|f| !f.worker_id.is_empty()) {
                        st.pool.release(&worker, Some(true));
                    }
                    flight
                };
                if let Some(msg) = flight.and_then(|f| f.msg) {
                    ack(&msg).await;
                }
                self.counters.completed.fetch_add(1, Ordering::Relaxed);
                self.wake.notify_one();
                self.mesh_task(
                    "task.completed",
                    &task,
                    Some(&worker),
                    json!({"latency_ms": latency_ms}),
                )
                .await;
            }
            Outcome::Failed => {
                let error = report
                    .error
                    .clone()
                    .unwrap_or_else(|| "the handler failed without a message".into());
                {
                    // The slot is released here (with the failure remembered) if this tenure
                    // holds it; the in-flight entry stops naming the worker, so neither
                    // `reassign` nor `fail_for_good` releases it again.
                    let mut guard = self.lock();
                    let st = &mut *guard;
                    if let Some(flight) = st.in_flight.get_mut(&report.task_id)
                        && !flight.worker_id.is_empty()
                    {
                        flight.worker_id.clear();
                        st.pool.release(&worker, Some(false));
                    }
                }
                let attempt = record.assignment.as_ref().map_or(1, |a| a.attempt);
                if report.retryable && attempt < self.cfg.max_attempts {
                    let why = format!("{worker} failed attempt {attempt}: {error}");
                    self.reassign_and_deliver(&report.task_id, Some(&worker), true, &why)
                        .await;
                } else {
                    let why = if report.retryable {
                        format!(
                            "{worker} failed attempt {attempt} of {}: {error}",
                            self.cfg.max_attempts
                        )
                    } else {
                        format!("{worker} failed it and another attempt cannot succeed: {error}")
                    };
                    self.fail_for_good(&report.task_id, &why).await;
                }
                self.wake.notify_one();
            }
        }
        Ok(json!({"accepted": true, "task_id": report.task_id}))
    }

    /// A report under a worker id comes from the user the id is bound to (or a service): from
    /// another user it is refused with 403 (counted, narrated, dead-lettered); from a user
    /// before any heartbeat bound the id, with 503 (the worker retries; its next heartbeat binds
    /// the id).
    async fn check_reporter(
        &self,
        report: &TaskReport,
        body: &[u8],
        sender: &Sender,
    ) -> Result<(), ApiError> {
        let verdict = self.lock().bindings.report(&report.worker_id, sender);
        match verdict {
            Ok(()) => Ok(()),
            Err(NotYours::Owner { user, owner }) => {
                let what = format!("report {:?} on task {}", report.outcome, report.task_id)
                    .to_lowercase();
                self.refuse_impostor(&what, &report.worker_id, &user, &owner)
                    .await;
                let reason = format!(
                    "report for worker {:?} from NATS user {user:?}, but the id is bound to user {owner:?}",
                    report.worker_id
                );
                self.send_dead_letter(subjects::TASK_RESULT, body, &reason)
                    .await;
                Err(ApiError::forbidden("not_your_worker", reason))
            }
            Err(NotYours::Unbound { user }) => {
                tracing::debug!(worker_id = %report.worker_id, user, "report before a heartbeat bound the worker id");
                Err(ApiError::unavailable(format!(
                    "worker {:?} has not heartbeated as NATS user {user:?} yet; heartbeat, then retry the report",
                    report.worker_id
                )))
            }
        }
    }

    // ---- pause, shed, replay ------------------------------------------------------------------

    async fn set_paused(&self, paused: bool) -> Result<Value, ApiError> {
        let (changed, depth) = {
            let mut st = self.lock();
            let changed = st.paused != paused;
            st.paused = paused;
            (changed, st.queue_depth)
        };
        if changed {
            let (what, why) = if paused {
                (
                    "scheduler_paused",
                    "an operator or a playbook paused dispatch; tasks wait durably in the queue",
                )
            } else {
                (
                    "scheduler_resumed",
                    "dispatch resumed; every waiting task will be processed",
                )
            };
            let n = self
                .narrator
                .narrative(what, "scheduler.pause / scheduler.resume")
                .why(why)
                .why(format!("queue depth {depth}"));
            self.narrator.publish(n).await;
            self.wake.notify_one();
        }
        Ok(json!({"paused": paused, "changed": changed, "queue_depth": depth}))
    }

    async fn shed(&self, body: &[u8]) -> Result<Value, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ShedRequest {
            max: Option<usize>,
            below_priority: Option<u8>,
            older_than_s: Option<f64>,
        }
        let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            body
        };
        let req: ShedRequest = api::decode(body, "invalid_shed", MAX_BODY)?;
        let below = req.below_priority.unwrap_or(self.cfg.shed_below_priority);
        if below > self.cfg.shed_below_priority {
            return Err(ApiError::bad_request(
                "invalid_shed",
                format!(
                    "below_priority {below} would shed tasks of priority {} or more; the limit is {} (high-priority tasks are never shed)",
                    self.cfg.shed_below_priority, self.cfg.shed_below_priority
                ),
            ));
        }
        let max = req.max.unwrap_or(self.cfg.shed_max);
        let older_than_s = req.older_than_s.unwrap_or(self.cfg.shed_older_than_s);
        if older_than_s.is_nan() || older_than_s < 0.0 {
            return Err(ApiError::bad_request(
                "invalid_shed",
                "older_than_s must be 0 or more",
            ));
        }
        let _busy = self.maintenance.lock().await;
        let min_age_ms = (older_than_s * 1000.0) as i64;
        let now_ms = time::now_ms();
        let mut shed = Vec::new();
        let mut examined = 0;
        'priorities: for priority in 0..below {
            loop {
                if shed.len() >= max {
                    break 'priorities;
                }
                let batch = match self.consumers[usize::from(priority)]
                    .fetch()
                    .max_messages(64)
                    .messages()
                    .await
                {
                    Ok(b) => b,
                    Err(err) => {
                        return Err(ApiError::unavailable(format!(
                            "task queue fetch failed: {err}"
                        )));
                    }
                };
                let messages = collect_batch(batch, self.timeout).await;
                if messages.is_empty() {
                    break;
                }
                let mut younger_seen = false;
                for msg in messages {
                    examined += 1;
                    let task: Option<Task> = serde_json::from_slice(&msg.payload).ok();
                    let eligible = task.as_ref().is_some_and(|t| {
                        time::parse_ms(&t.queued_at).is_some_and(|q| now_ms - q >= min_age_ms)
                            && t.priority < below
                    });
                    let in_flight = task
                        .as_ref()
                        .is_some_and(|t| self.lock().in_flight.contains_key(&t.task_id));
                    match task {
                        Some(task) if eligible && !in_flight && shed.len() < max => {
                            if self.park(&task, &msg).await {
                                shed.push(task.task_id.clone());
                            } else {
                                nak(&msg, Duration::ZERO).await;
                            }
                        }
                        _ => {
                            younger_seen |= !eligible;
                            nak(&msg, Duration::ZERO).await;
                        }
                    }
                }
                if younger_seen {
                    // FIFO within a priority: everything after a too-young task is younger.
                    break;
                }
            }
        }
        self.counters
            .shed
            .fetch_add(shed.len() as u64, Ordering::Relaxed);
        let depth = self.lock().queue_depth;
        let n = self
            .narrator
            .narrative("tasks_shed", "load shedding: priority below the limit and older than the age, into the replayable park")
            .why(format!("shed {} task(s) of priority < {below} older than {older_than_s:.0} s (at most {max})", shed.len()))
            .why(format!("examined {examined}; queue depth {depth}; critical and high-priority work is kept"))
            .why(format!("parked in {}; scheduler.replay brings them back", streams::TASKS_PARKED_STREAM))
            .context(json!({"shed": shed.len(), "examined": examined, "below_priority": below,
                            "older_than_s": older_than_s, "max": max, "task_ids": shed}));
        self.narrator.publish(n).await;
        self.wake.notify_one();
        // The depth right after shedding, read from the stream (not the last sweep's figure),
        // so a caller shedding in batches knows when to stop.
        let in_flight = self.lock().in_flight.len() as u64;
        let queue_depth = match self.js.get_stream(streams::TASKS_STREAM).await {
            Ok(mut tasks) => match tasks.info().await {
                Ok(info) => Some(info.state.messages.saturating_sub(in_flight)),
                Err(_) => None,
            },
            Err(_) => None,
        };
        Ok(
            json!({"shed": shed.len(), "examined": examined, "below_priority": below, "older_than_s": older_than_s,
                  "max": max, "task_ids": shed, "queue_depth": queue_depth}),
        )
    }

    /// Moves one queued task into the park: stored there first, then its intent marked shed,
    /// then its queue message acknowledged. False when it was not queued any more.
    async fn park(&self, task: &Task, msg: &jetstream::Message) -> bool {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let stored = self
            .js
            .send_publish(
                subjects::task_parked(task.priority),
                PublishMessage::build()
                    .payload(msg.payload.clone())
                    .message_id(format!("{}:park:{seq}", task.task_id)),
            )
            .await;
        let stored = match stored {
            Ok(ack_future) => ack_future.await.is_ok(),
            Err(_) => false,
        };
        if !stored {
            return false;
        }
        let moved = self
            .update_intent(&task.intent_id, |r: &mut IntentRecord| {
                if r.status != IntentStatus::Queued {
                    return Ok::<_, ()>(Change::Keep(false));
                }
                r.transition(
                    IntentStatus::Shed,
                    None,
                    Some("queue_overflow_protection".into()),
                );
                Ok(Change::Write(true))
            })
            .await;
        ack(msg).await;
        if !matches!(moved, Ok(Ok((true, _)))) {
            // Not queued any more (dispatched elsewhere, finished): the parked copy is inert;
            // replay will find it is not shed and drop it.
            return false;
        }
        self.mesh_task(
            "task.shed",
            task,
            None,
            json!({"reason": "queue_overflow_protection", "parked": streams::TASKS_PARKED_STREAM}),
        )
        .await;
        true
    }

    async fn replay(&self, body: &[u8]) -> Result<Value, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ReplayRequest {
            max: Option<usize>,
        }
        let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            body
        };
        let req: ReplayRequest = api::decode(body, "invalid_replay", MAX_BODY)?;
        let max = req.max.unwrap_or(usize::MAX);
        let _busy = self.maintenance.lock().await;
        let mut replayed = Vec::new();
        while replayed.len() < max {
            let want = (max - replayed.len()).min(64);
            let batch = match self.parked.fetch().max_messages(want).messages().await {
                Ok(b) => b,
                Err(err) => return Err(ApiError::unavailable(format!("park fetch failed: {err}"))),
            };
            let messages = collect_batch(batch, self.timeout).await;
            if messages.is_empty() {
                break;
            }
            for msg in messages {
                let Ok(task) = serde_json::from_slice::<Task>(&msg.payload) else {
                    self.dead_letter(&msg.subject, &msg.payload, "malformed parked task")
                        .await;
                    ack(&msg).await;
                    continue;
                };
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                // The intent moves first: dispatch drops a task whose intent says `shed` (an old
                // copy), so a copy fetched before the intent said `queued` would be lost.
                let requeued = self
                    .update_intent(&task.intent_id, |r: &mut IntentRecord| {
                        if r.status != IntentStatus::Shed {
                            return Ok::<_, ()>(Change::Keep(false));
                        }
                        r.transition(
                            IntentStatus::Queued,
                            None,
                            Some("replayed from the park".into()),
                        );
                        Ok(Change::Write(true))
                    })
                    .await;
                let moved = match requeued {
                    Ok(Ok((moved, _))) => moved,
                    Ok(Err(_)) | Err(KvError::NotFound(_)) => false,
                    Err(err) => {
                        nak(&msg, RETRY_DELAY).await;
                        return Err(ApiError::unavailable(format!(
                            "intent store unavailable during replay: {err}; retry"
                        )));
                    }
                };
                let back = self
                    .js
                    .send_publish(
                        subjects::task_queue(task.priority),
                        PublishMessage::build()
                            .payload(msg.payload.clone())
                            .message_id(format!("{}:replay:{seq}", task.task_id)),
                    )
                    .await;
                let stored = match back {
                    Ok(ack_future) => ack_future.await.is_ok(),
                    Err(_) => false,
                };
                if !stored {
                    if moved {
                        // Back to the park's status, so the intent does not wait as `queued`
                        // for a task that is not in the queue (the parked copy stays).
                        let _ = self
                            .update_intent(&task.intent_id, |r: &mut IntentRecord| {
                                if r.status != IntentStatus::Queued {
                                    return Ok::<_, ()>(Change::Keep(()));
                                }
                                r.transition(
                                    IntentStatus::Shed,
                                    None,
                                    Some("replay not stored; still parked".into()),
                                );
                                Ok(Change::Write(()))
                            })
                            .await;
                    }
                    nak(&msg, RETRY_DELAY).await;
                    return Err(ApiError::unavailable(
                        "task queue did not take a replayed task; retry",
                    ));
                }
                ack(&msg).await;
                replayed.push(task.task_id);
            }
        }
        self.counters
            .replayed
            .fetch_add(replayed.len() as u64, Ordering::Relaxed);
        let n = self
            .narrator
            .narrative("tasks_replayed", "replay from the park into the task queue")
            .why(format!(
                "{} parked task(s) returned to the queue",
                replayed.len()
            ))
            .context(json!({"replayed": replayed.len(), "task_ids": replayed}));
        self.narrator.publish(n).await;
        self.wake.notify_one();
        Ok(json!({"replayed": replayed.len(), "task_ids": replayed}))
    }

    // ---- readiness, guards, telemetry ---------------------------------------------------------

    fn readiness(&self) -> Value {
        let st = self.lock();
        let healthy = st.pool.healthy();
        let mut reasons = Vec::new();
        if healthy < self.cfg.min_workers {
            reasons.push(format!(
                "{healthy} healthy worker(s), at least {} required",
                self.cfg.min_workers
            ));
        }
        let critical = st.htm_guard.level() == Level::Critical;
        if critical {
            reasons.push(format!("queue depth {} is critical", st.queue_depth));
        }
        json!({
            "htm_ready": reasons.is_empty(),
            "scheduler_ready": true,
            "healthy_workers": healthy,
            "min_workers": self.cfg.min_workers,
            "queue_bound": true,
            "queue_depth": st.queue_depth,
            "in_flight": st.in_flight.len(),
            "paused": st.paused,
            "leader": self.leadership.holder(),
            "leader_token": self.leadership.token(),
            "workers": st.pool.describe_all(),
            "reasons": reasons,
        })
    }

    async fn observe_depth(&self, depth: u64) {
        let (sched, htm) = {
            let mut st = self.lock();
            st.queue_depth = depth;
            (
                st.scheduler_guard.observe(depth),
                st.htm_guard.observe(depth),
            )
        };
        if let Some(level) = sched {
            let threshold = self.lock().scheduler_guard.threshold(level);
            if level == Level::Critical {
                self.incident(
                    "scheduler_load_shedding",
                    "critical",
                    json!({"queue_depth": depth, "threshold": threshold}),
                )
                .await;
            }
            let n = self
                .narrator
                .narrative("queue_guard", "scheduler queue depth thresholds")
                .why(format!("queue depth {depth} is now {} (threshold {threshold})", level.as_str()))
                .context(json!({"queue_depth": depth, "level": level.as_str(), "warn": self.cfg.queue_warn,
                                "critical": self.cfg.queue_critical}));
            self.narrator.publish(n).await;
        }
        if let Some(level) = htm
            && level == Level::Critical
        {
            self.incident("scheduler_load_shedding", "critical", json!({"queue_depth": depth, "threshold": self.cfg.htm_queue_critical, "component": "htm_orchestrator"}))
                .await;
        }
    }

    fn scheduler_telemetry(&self) -> Value {
        let mut st = self.lock();
        let dispatched = self.counters.dispatched.load(Ordering::Relaxed);
        let elapsed = st.last_dispatch_roll.elapsed().as_secs_f64().max(0.001);
        st.last_dispatch_roll = Instant::now();
        let rate = (dispatched - st.last_dispatched) as f64 / elapsed;
        st.last_dispatched = dispatched;
        let health = match st.scheduler_guard.level() {
            Level::Critical => "critical",
            Level::Warning => "degraded",
            Level::Normal => "healthy",
        };
        json!({"queue_depth": st.queue_depth, "dispatch_rate": rate, "task_backlog": st.queue_depth + st.in_flight.len() as u64,
               "in_flight": st.in_flight.len(), "paused": st.paused, "health_status": health, "counters": self.counters.snapshot()})
    }

    fn htm_telemetry(&self) -> Value {
        let mut st = self.lock();
        let completed = self.counters.completed.load(Ordering::Relaxed);
        let elapsed = st.last_roll.elapsed().as_secs_f64().max(0.001);
        let tps = (completed - st.last_completed) as f64 / elapsed;
        st.last_completed = completed;
        st.last_roll = Instant::now();
        let (p50, p99, _) = st.latency.roll();
        let healthy = st.pool.healthy();
        let health = if healthy == 0 || st.htm_guard.level() == Level::Critical {
            "critical"
        } else if healthy < self.cfg.min_workers || st.htm_guard.level() == Level::Warning {
            "degraded"
        } else {
            "healthy"
        };
        json!({"queue_depth": st.queue_depth, "active_workers": healthy, "tasks_per_second": tps,
               "sla_breaches": st.latency.breaches, "p50_ms": p50, "p99_ms": p99, "health_status": health})
    }

    // ---- outputs ------------------------------------------------------------------------------

    async fn mesh_task(
        &self,
        event_type: &str,
        task: &Task,
        worker_id: Option<&str>,
        extra: Value,
    ) {
        let mut payload = json!({"task_id": task.task_id, "intent_id": task.intent_id, "intent_type": task.intent_type,
                                 "priority": task.priority});
        if let Some(w) = worker_id {
            payload["worker_id"] = json!(w);
        }
        if let (Value::Object(p), Value::Object(e)) = (&mut payload, extra) {
            p.extend(e);
        }
        let mut event = MeshEvent::root(event_type, SERVICE_NAME, payload);
        event.correlation_id = task.correlation_id.clone();
        event.resource = Some(format!("task/{}", task.task_id));
        event.subsystem = Some("htm".into());
        event.actor = worker_id.map(str::to_owned);
        self.publish(subjects::mesh(event_type), api::to_bytes(&event))
            .await;
    }

    async fn incident(&self, playbook: &str, severity: &str, extra: Value) {
        let mut payload =
            json!({"trigger_id": ids::new_id(), "playbook": playbook, "severity": severity});
        if let (Value::Object(p), Value::Object(e)) = (&mut payload, extra) {
            p.extend(e);
        }
        let event = MeshEvent::root("event.incident", SERVICE_NAME, payload);
        self.publish(subjects::MESH_INCIDENT.to_owned(), api::to_bytes(&event))
            .await;
    }

    /// Records bad input on `mesh.deadletter` with the reason, and counts it.
    async fn dead_letter(&self, subject: &str, body: &[u8], reason: &str) {
        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        self.send_dead_letter(subject, body, reason).await;
    }

    /// Records refused input on `mesh.deadletter` with the reason (counted by the caller).
    async fn send_dead_letter(&self, subject: &str, body: &[u8], reason: &str) {
        // Hostile input echoed in a decoder's message must not make the log or the letter huge.
        let reason = &api::bounded(reason.to_owned(), api::MAX_MESSAGE_BYTES);
        tracing::warn!(subject, reason, "dead-lettered");
        let excerpt = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        let event = MeshEvent::root(
            "deadletter",
            SERVICE_NAME,
            json!({"reason": reason, "subject": subject, "body_bytes": body.len(), "body_excerpt": excerpt}),
        );
        self.publish(subjects::MESH_DEADLETTER.to_owned(), api::to_bytes(&event))
            .await;
    }

    async fn publish(&self, subject: String, body: bytes::Bytes) {
        if let Err(err) =
            tokio::time::timeout(self.timeout, self.client.publish(subject.clone(), body))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::debug!(subject, error = %err, "not published");
        }
    }
}

/// A compare-and-set of the intent record `key` by a scheduler leader holding fencing `token`:
/// refused with [`Fenced::Stale`] when the record was written under a newer token, otherwise
/// `change` decides, and a written record carries `token`. Every write the scheduler makes to an
/// intent record goes through here.
pub async fn update_fenced<R, E>(
    intents: &kv::Store,
    key: &str,
    token: u64,
    mut change: impl FnMut(&mut IntentRecord) -> Result<Change<R>, E>,
) -> Result<Result<(R, IntentRecord), Fenced<E>>, KvError> {
    kvx::update(intents, key, |r: &mut IntentRecord| {
        if r.leader_token > token {
            return Err(Fenced::Stale {
                record_token: r.leader_token,
                ours: Some(token),
            });
        }
        match change(r) {
            Ok(Change::Write(out)) => {
                r.leader_token = token;
                Ok(Change::Write(out))
            }
            Ok(Change::Keep(out)) => Ok(Change::Keep(out)),
            Err(e) => Err(Fenced::Refused(e)),
        }
    })
    .await
}

/// Whether a worker report is new or a repeat of one already recorded.
enum Report {
    /// First time: apply its effects.
    Fresh,
    /// Already recorded: acknowledge only.
    Repeated,
}

/// An assignment ready to be handed to its worker.
struct Handover {
    task: Task,
    worker_id: String,
    fence: u64,
    attempt: u32,
}

/// The outcome of a reassignment attempt on the intent record.
enum Reassigned {
    /// The task is no longer dispatched to the worker it was taken from.
    Gone,
    /// No attempts left.
    Exhausted,
    /// No worker free: back to the queue.
    Requeued,
    /// Moved to another worker.
    To { fence: u64, attempt: u32 },
}

fn tier_of(record: &IntentRecord) -> bulwark_common::intent::Tier {
    bulwark_common::intent::Tier::from_number(record.decision.autonomy_tier)
        .unwrap_or(bulwark_common::intent::Tier::HumanRequired)
}

/// The messages of a fetched batch, collected for at most `limit`: a pull request whose answer
/// never comes (its consumer's leader moved to another broker node) must not stall the loop.
/// Messages received but not collected are redelivered after `ack_wait`.
async fn collect_batch(
    batch: jetstream::consumer::pull::Batch,
    limit: Duration,
) -> Vec<jetstream::Message> {
    let mut messages = Vec::new();
    let mut batch = std::pin::pin!(batch);
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(next)) = tokio::time::timeout_at(deadline, batch.next()).await {
        match next {
            Ok(msg) => messages.push(msg),
            Err(err) => tracing::debug!(error = %err, "task queue batch: error"),
        }
    }
    messages
}

/// The `error.code` of an error reply body, if it has one.
fn error_code(payload: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(payload).ok()?;
    body["error"]["code"].as_str().map(str::to_owned)
}

async fn ack(msg: &jetstream::Message) {
    if let Err(err) = msg.ack().await {
        tracing::debug!(error = %err, "queue acknowledgement failed; the message will be redelivered and dropped");
    }
}

async fn nak(msg: &jetstream::Message, delay: Duration) {
    let kind = if delay.is_zero() {
        AckKind::Nak(None)
    } else {
        AckKind::Nak(Some(delay))
    };
    if let Err(err) = msg.ack_with(kind).await {
        tracing::debug!(error = %err, "negative acknowledgement failed; the message will be redelivered");
    }
}
