//! The governance endpoints and the vote-deadline sweeper: thin I/O around [`crate::routing`],
//! [`crate::review`] and [`crate::vote`].
//!
//! Each request runs in its own task (bounded by a semaphore), so slow JetStream acks of one
//! intent do not hold up the next. A failed request is answered with an error and counted; it
//! never ends the loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, kv, message::PublishMessage};
use async_nats::service::Request;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::{BulwarkConfig, Durability, GovernanceConfig, StorageConfig};
use bulwark_common::intent::{
    Decision, Intent, IntentRecord, IntentStatus, ReviewOutcome, StatusChange, StatusReply, Task,
    Tier,
};
use bulwark_common::kv::{self as kvx, Change, KvError};
use bulwark_common::narrative::Narrator;
use bulwark_common::page::{self, Page, PageRequest};
use bulwark_common::{ids, streams, subjects, telemetry, time};

use crate::identity::{self, Role, Sender};
use crate::review::{ReviewDecision, ReviewItem, ReviewKind, Verdict};
use crate::routing::{self, Route};
use crate::vote::{Proposal, ProposalState, Tally, VoteRequest};

mod stranded;

/// Name under which the service registers (CONTRACT section 5).
pub const SERVICE_NAME: &str = "governance";
/// Error code of refused submissions (CONTRACT section 2).
pub const INVALID_INTENT: &str = "invalid_intent";
/// How far in the past an intent's `not_before` may be (clock skew between a client and
/// bulwark, a resubmission shortly after the first), in milliseconds.
pub const NOT_BEFORE_SKEW_MS: i64 = 30_000;
/// Requests handled at once per instance.
const MAX_CONCURRENT_REQUESTS: usize = 1024;
/// Time given to in-flight requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum GovernanceError {
    /// A stream or bucket could not be made ready.
    #[error("{0}")]
    Store(#[from] streams::StoreError),
    /// Registration with NATS micro failed.
    #[error("{0}")]
    Register(String),
}

/// What the service counts; reported in telemetry and `$SRV.STATS`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Intents accepted, by tier.
    pub accepted_by_tier: [AtomicU64; 5],
    /// Resubmissions answered with the first decision.
    pub duplicates: AtomicU64,
    /// Submissions refused as invalid.
    pub invalid_intents: AtomicU64,
    /// Review and vote requests refused (invalid, unknown, forbidden, conflicting).
    pub refused_requests: AtomicU64,
    /// Submissions, review decisions and votes refused because the named actor, reviewer or
    /// voter is not the sending NATS identity (`identity_mismatch`, `identity_required`).
    pub identity_refusals: AtomicU64,
    /// Review decisions recorded.
    pub reviews_decided: AtomicU64,
    /// Votes counted.
    pub votes_cast: AtomicU64,
    /// Proposals escalated to human review for lack of quorum.
    pub votes_expired: AtomicU64,
    /// Requests that failed on bulwark's side (JetStream unavailable).
    pub internal_errors: AtomicU64,
    /// Requests refused because a stream or bucket reached its limit (`storage_full`).
    pub storage_full: AtomicU64,
    /// Finished intent records removed after their retention.
    pub expired_records: AtomicU64,
    /// Stranded intents whose missing task, review item or proposal the reconciler wrote.
    pub reconciled: AtomicU64,
    /// Stranded intents failed because their promise could not be kept within the window.
    pub stranded_failed: AtomicU64,
    /// Reconciler checks that failed (retried next pass).
    pub reconcile_errors: AtomicU64,
    /// Waiting records the reconciler tracks now (a gauge).
    pub reconcile_tracked: AtomicU64,
    /// Waiting records dropped untracked because the reconciler's ledger was full.
    pub reconcile_evicted: AtomicU64,
}

impl Counters {
    /// The counters as JSON.
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "intents_by_tier": self.accepted_by_tier.iter().map(get).collect::<Vec<_>>(),
            "duplicates": get(&self.duplicates),
            "invalid_intents": get(&self.invalid_intents),
            "refused_requests": get(&self.refused_requests),
            "identity_refusals": get(&self.identity_refusals),
            "reviews_decided": get(&self.reviews_decided),
            "votes_cast": get(&self.votes_cast),
            "votes_expired": get(&self.votes_expired),
            "internal_errors": get(&self.internal_errors),
            "storage_full": get(&self.storage_full),
            "expired_records": get(&self.expired_records),
            "reconciled": get(&self.reconciled),
            "stranded_failed": get(&self.stranded_failed),
            "reconcile_errors": get(&self.reconcile_errors),
            "reconcile_tracked": get(&self.reconcile_tracked),
            "reconcile_evicted": get(&self.reconcile_evicted),
        })
    }
}

/// Runs the governance service until `shutdown` is cancelled.
pub async fn run(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), GovernanceError> {
    let timeout = Duration::from_millis(cfg.nats.request_timeout_ms);
    let js = streams::context(client.clone(), timeout);
    streams::tasks(&js).await?;
    streams::narratives(&js).await?;
    let js_for_durability = js.clone();
    let gov = Arc::new(Governance {
        intents: streams::bucket(&js, streams::INTENTS_BUCKET, "bulwark intent records").await?,
        reviews: streams::bucket(&js, streams::REVIEWS_BUCKET, "bulwark human review queue")
            .await?,
        proposals: streams::bucket(
            &js,
            streams::PROPOSALS_BUCKET,
            "bulwark open unified logic proposals",
        )
        .await?,
        narrator: Narrator::new(js.clone(), SERVICE_NAME, &instance_name()),
        js,
        client: client.clone(),
        cfg: cfg.governance.clone(),
        counters: Arc::new(Counters::default()),
        timeout,
        durability: streams::durability_in_force(&js_for_durability, cfg.nats.durability).await,
        storage: cfg.nats.storage.clone(),
        actions: cfg.actions.clone(),
    });

    let stats_counters = gov.counters.clone();
    let endpoints: [bulwark_common::micro::EndpointSpec<Op>; 10] = [
        ("submit", subjects::INTENT_SUBMIT, Op::Submit),
        ("submit_as", subjects::INTENT_SUBMIT_AS, Op::Submit),
        ("status", subjects::INTENT_STATUS, Op::Status),
        ("cancel", subjects::INTENT_CANCEL, Op::Cancel),
        (
            "review_pending",
            subjects::REVIEW_PENDING,
            Op::ReviewPending,
        ),
        ("review_decide", subjects::REVIEW_DECIDE, Op::ReviewDecide),
        (
            "review_decide_as",
            subjects::REVIEW_DECIDE_AS,
            Op::ReviewDecide,
        ),
        ("vote", subjects::VOTE, Op::Vote),
        ("vote_as", subjects::VOTE_AS, Op::Vote),
        ("proposals", subjects::PROPOSALS_OPEN, Op::Proposals),
    ];
    let tracker = TaskTracker::new();
    let state = gov.clone();
    let service = bulwark_common::micro::register(
        &bulwark_common::micro::serving_client(&cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark intent governance: autonomy tiers, human review, unified logic votes",
        move || stats_counters.snapshot(),
        &endpoints,
        &tracker,
        &shutdown,
        MAX_CONCURRENT_REQUESTS,
        move |op, request| {
            let state = state.clone();
            async move { state.handle(op, &request).await }
        },
    )
    .await
    .map_err(GovernanceError::Register)?;
    tracker.spawn(sweep_votes(gov.clone(), shutdown.clone()));
    tracker.spawn(sweep_finished(gov.clone(), shutdown.clone()));
    tracker.spawn(stranded::run(gov.clone(), shutdown.clone()));
    for (name, schedule) in &cfg.schedules {
        let (submit_gov, exists_gov) = (gov.clone(), gov.clone());
        tracker.spawn(crate::schedules::run(
            name.clone(),
            schedule.clone(),
            gov.narrator.clone(),
            move |body: Value| {
                let gov = submit_gov.clone();
                async move {
                    let bytes = api::to_bytes(&body);
                    let service = bulwark_common::identity::Sender::Service;
                    gov.submit(&bytes, Sender::Unnamed, &service).await
                }
            },
            move |id: String| {
                let gov = exists_gov.clone();
                async move {
                    matches!(
                        kvx::read::<IntentRecord>(&gov.intents, &id).await,
                        Ok(Some(_))
                    )
                }
            },
            Duration::from_secs_f64(cfg.nats.storage.finished_intent_retention_s),
            shutdown.clone(),
        ));
    }
    let telemetry_counters = gov.counters.clone();
    telemetry::spawn(
        client.clone(),
        SERVICE_NAME,
        Duration::from_secs_f64(cfg.telemetry.interval_s.max(0.1)),
        shutdown.clone(),
        {
            // Degraded while requests fail on bulwark's side (JetStream unavailable).
            let last_internal = AtomicU64::new(0);
            move || {
                let mut figures = telemetry_counters.snapshot();
                let internal = telemetry_counters.internal_errors.load(Ordering::Relaxed);
                let failing = internal > last_internal.swap(internal, Ordering::Relaxed);
                figures["health_status"] = json!(if failing { "degraded" } else { "healthy" });
                figures
            }
        },
    );
    tracing::info!("governance serving {}", subjects::INTENT_SUBMIT);

    shutdown.cancelled().await;
    bulwark_common::micro::finish(SERVICE_NAME, service, tracker, SHUTDOWN_GRACE).await;
    Ok(())
}

fn instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned());
    format!("{SERVICE_NAME}@{host}/{}", std::process::id())
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Submit,
    Status,
    Cancel,
    ReviewPending,
    ReviewDecide,
    Vote,
    Proposals,
}

/// The governance state shared by every request.
struct Governance {
    cfg: GovernanceConfig,
    js: jetstream::Context,
    client: Client,
    intents: kv::Store,
    reviews: kv::Store,
    proposals: kv::Store,
    narrator: Narrator,
    counters: Arc<Counters>,
    timeout: Duration,
    /// What an acknowledgement promises here ([`streams::durability_in_force`]).
    durability: Durability,
    /// Retention of finished intent records.
    storage: StorageConfig,
    /// Operator-defined actions: a payload the action of its type does not allow is refused.
    actions: std::collections::BTreeMap<String, bulwark_common::action::ActionConfig>,
}

/// The identity speaking: the NATS user the server named, else the per-identity subject's name;
/// `None` for bulwark's own services.
fn submitter(from: &bulwark_common::identity::Sender, sender: Sender<'_>) -> Option<String> {
    match (from.user(), sender) {
        (Some(user), _) => Some(user.to_owned()),
        (None, Sender::Identity(name)) => Some(name.to_owned()),
        (None, Sender::Unnamed) => None,
    }
}

/// Code of the 503 that names the stream or bucket limit a write reached.
pub const STORAGE_FULL: &str = "storage_full";

fn store_err(err: KvError) -> ApiError {
    if let Some(refusal) = streams::limit_refusal("a governance bucket", &err.to_string()) {
        return ApiError::new(503, STORAGE_FULL, refusal);
    }
    match err {
        KvError::Unavailable(reason) => {
            ApiError::unavailable(format!("intent store unavailable: {reason}"))
        }
        other => ApiError::internal(other.to_string()),
    }
}

impl Governance {
    async fn handle(&self, op: Op, request: &Request) {
        let body = &request.message.payload;
        let subject = request.message.subject.as_str();
        let sender = |plain| Sender::of(subject, plain);
        match op {
            Op::Submit => {
                let from = bulwark_common::identity::sender(request.message.headers.as_ref());
                let result = self
                    .submit(body, sender(subjects::INTENT_SUBMIT), &from)
                    .await;
                self.reply(request, result).await
            }
            Op::Status => self.reply(request, self.status(body).await).await,
            Op::Cancel => {
                let from = bulwark_common::identity::sender(request.message.headers.as_ref());
                self.reply(request, self.cancel(body, &from).await).await
            }
            Op::ReviewPending => self.reply(request, self.pending_reviews(body).await).await,
            Op::ReviewDecide => {
                let from = bulwark_common::identity::sender(request.message.headers.as_ref());
                let result = self
                    .decide(body, sender(subjects::REVIEW_DECIDE), &from)
                    .await;
                self.reply(request, result).await
            }
            Op::Vote => {
                let from = bulwark_common::identity::sender(request.message.headers.as_ref());
                let result = self.vote(body, sender(subjects::VOTE), &from).await;
                self.reply(request, result).await
            }
            Op::Proposals => self.reply(request, self.open_proposals(body).await).await,
        }
    }

    /// Counts a failed request and answers it.
    async fn reply<T: serde::Serialize>(&self, request: &Request, result: Result<T, ApiError>) {
        self.count_failure(&result);
        api::respond(request, result).await;
    }

    fn count_failure<T>(&self, result: &Result<T, ApiError>) {
        if let Err(err) = result {
            let counter = match err.status {
                503 if err.code == STORAGE_FULL => &self.counters.storage_full,
                500.. => &self.counters.internal_errors,
                _ if err.code == identity::IDENTITY_MISMATCH
                    || err.code == identity::IDENTITY_REQUIRED =>
                {
                    &self.counters.identity_refusals
                }
                _ if err.code == INVALID_INTENT => &self.counters.invalid_intents,
                _ => &self.counters.refused_requests,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    // ---- submission -------------------------------------------------------------------------

    async fn submit(
        &self,
        body: &[u8],
        sender: Sender<'_>,
        from: &bulwark_common::identity::Sender,
    ) -> Result<Decision, ApiError> {
        let parsed = self
            .parse_intent(body, sender)
            .and_then(|intent| self.check_work(intent))
            .and_then(|intent| self.check_action(intent))
            .and_then(|intent| self.check_not_before(intent));
        let intent = match parsed {
            Ok(intent) => intent,
            Err(err) => {
                self.narrate_refusal("intent_refused", &err, body).await;
                return Err(err);
            }
        };
        let mut route = routing::route(&intent, &self.cfg);
        let privilege = match from.user() {
            Some(user) if !self.cfg.privileged_identities.iter().any(|p| p == user) => {
                routing::Privilege::Unprivileged
            }
            _ => routing::Privilege::Privileged,
        };
        if let Err(reason) = routing::earn(&mut route, &intent, privilege, from.name(), &self.cfg) {
            let err = ApiError::forbidden("privilege_required", reason);
            self.narrate_refusal("intent_refused", &err, body).await;
            return Err(err);
        }
        if route.review.is_some_and(|k| k == ReviewKind::Approval) || route.requires_vote {
            let exists = kvx::read::<IntentRecord>(&self.intents, &intent.intent_id)
                .await
                .map_err(store_err)?
                .is_some();
            // A resubmission of an existing intent opens nothing new.
            if !exists && let Err(err) = self.check_open_cap(&intent.actor).await {
                self.narrate_refusal("intent_refused", &err, body).await;
                return Err(err);
            }
        }
        let decision = decision(&intent, &route, self.durability);
        let record = IntentRecord {
            intent: intent.clone(),
            decision: decision.clone(),
            status: route.status,
            history: vec![StatusChange {
                status: route.status,
                at: decision.timestamp.clone(),
                by: None,
                reason: Some(match &intent.not_before {
                    Some(at) => format!("routed to {}; not before {at}", route.routed_to),
                    None => format!("routed to {}", route.routed_to),
                }),
            }],
            result: None,
            error: None,
            review: None,
            assignment: None,
            leader_token: 0,
            submitted_by: submitter(from, sender),
        };
        if let Some(existing) = kvx::create_or_get(&self.intents, &intent.intent_id, &record)
            .await
            .map_err(store_err)?
        {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            // A resubmission also completes an acceptance interrupted by a crash.
            self.redrive(&existing.value).await?;
            return Ok(existing.value.decision);
        }
        self.apply_route(&record, &route).await?;
        self.counters.accepted_by_tier[usize::from(route.tier.number())]
            .fetch_add(1, Ordering::Relaxed);
        let n = self
            .narrator
            .narrative("intent_routed", "autonomy tier table and charter-weighted mission alignment")
            .whys(route.reasoning.iter().cloned())
            .intent(&intent.intent_id, &intent.correlation_id)
            .context(json!({
                "intent_type": intent.intent_type, "actor": intent.actor, "autonomy_tier": route.tier.number(),
                "tier_name": route.tier.name(), "routed_to": route.routed_to, "status": route.status,
                "approved": route.approved, "mission_alignment": route.alignment, "priority": route.priority,
            }));
        self.narrator.publish(n).await;
        Ok(decision)
    }

    fn parse_intent(&self, body: &[u8], sender: Sender<'_>) -> Result<Intent, ApiError> {
        decode_submission(body, &self.cfg, sender)
    }

    /// Refuses simulated work longer than the intent type's `max_work_ms`, else
    /// `governance.max_work_ms` (it would hold a worker slot that long).
    fn check_work(&self, intent: Intent) -> Result<Intent, ApiError> {
        let (max, key) = match self
            .cfg
            .intent_types
            .get(&intent.intent_type)
            .and_then(|t| t.max_work_ms)
        {
            Some(max) => (
                max,
                format!("governance.intent_types.{}.max_work_ms", intent.intent_type),
            ),
            None => (self.cfg.max_work_ms, "governance.max_work_ms".to_owned()),
        };
        match intent.payload.get("work_ms").and_then(Value::as_f64) {
            Some(ms) if ms > max as f64 => Err(ApiError::bad_request(
                INVALID_INTENT,
                format!("payload.work_ms {ms} is above {key} = {max}"),
            )),
            _ => Ok(intent),
        }
    }

    /// Refuses a `not_before` more than [`NOT_BEFORE_SKEW_MS`] in the past or more than
    /// `governance.max_delay_s` ahead (docs/actions.md#delays).
    fn check_not_before(&self, intent: Intent) -> Result<Intent, ApiError> {
        let Some(at) = intent.not_before.as_deref().and_then(time::parse_ms) else {
            return Ok(intent);
        };
        let now = time::now_ms();
        let max_ms = (self.cfg.max_delay_s * 1000.0) as i64;
        if at < now - NOT_BEFORE_SKEW_MS {
            return Err(ApiError::bad_request(
                INVALID_INTENT,
                format!(
                    "not_before {} is in the past (now {}; {} s of clock skew allowed)",
                    time::format_ms(at),
                    time::format_ms(now),
                    NOT_BEFORE_SKEW_MS / 1000
                ),
            ));
        }
        if at > now.saturating_add(max_ms) {
            return Err(ApiError::bad_request(
                INVALID_INTENT,
                format!(
                    "not_before {} is more than governance.max_delay_s = {} s ahead",
                    time::format_ms(at),
                    self.cfg.max_delay_s
                ),
            ));
        }
        Ok(intent)
    }

    /// Refuses a payload the operator's action for its type does not allow (an unlisted key, a
    /// value that would change the URL beyond its value or add a command-line flag): 400
    /// `param_not_allowed` (docs/actions.md).
    fn check_action(&self, intent: Intent) -> Result<Intent, ApiError> {
        match self.actions.get(&intent.intent_type) {
            Some(action) => match action.check_payload(&intent.payload) {
                Ok(()) => Ok(intent),
                Err(why) => Err(ApiError::bad_request(
                    bulwark_common::action::PARAM_NOT_ALLOWED,
                    format!("action {}: {why}", intent.intent_type),
                )),
            },
            None => Ok(intent),
        }
    }

    /// Performs what `route` requires after the record exists: queue, review item, proposal.
    async fn apply_route(&self, record: &IntentRecord, route: &Route) -> Result<(), ApiError> {
        let intent = &record.intent;
        if let Some(kind) = route.review {
            self.ensure_review(ReviewItem::for_record(record, kind))
                .await?;
        }
        if route.enqueues() {
            self.enqueue(intent, route.priority, route.tier).await?;
        }
        if route.requires_vote {
            self.open_proposal(record).await?;
        }
        Ok(())
    }

    fn incomplete(&self, intent: &Intent, err: impl std::fmt::Display) -> ApiError {
        ApiError::unavailable(format!(
            "intent {} was recorded but its routing could not be completed ({err}); resubmit it with the same intent_id to finish",
            intent.intent_id
        ))
    }

    /// Re-performs the side effects an existing record's status implies; all are idempotent. The
    /// names of those that were missing and are now written ("task", "review item", "proposal").
    pub(crate) async fn redrive(
        &self,
        record: &IntentRecord,
    ) -> Result<Vec<&'static str>, ApiError> {
        let intent = &record.intent;
        let tier = Tier::from_number(record.decision.autonomy_tier).unwrap_or(Tier::HumanRequired);
        let mut repaired = Vec::new();
        let mut note = |made: bool, what: &'static str| {
            if made {
                repaired.push(what);
            }
        };
        match record.status {
            IntentStatus::Queued => {
                if let Some(kind) = review_record_kind(tier)
                    && record.review.is_none()
                {
                    note(
                        self.ensure_review(ReviewItem::for_record(record, kind))
                            .await?,
                        "review item",
                    );
                }
                note(
                    self.enqueue(intent, record.decision.priority, tier).await?,
                    "task",
                );
            }
            IntentStatus::PendingReview => {
                let kind = if record.decision.status == IntentStatus::PendingVote {
                    ReviewKind::VoteTimeout
                } else if tier == Tier::HumanRequired {
                    ReviewKind::Approval
                } else {
                    ReviewKind::LowAlignment
                };
                note(
                    self.ensure_review(ReviewItem::for_record(record, kind))
                        .await?,
                    "review item",
                );
            }
            IntentStatus::PendingVote => note(self.open_proposal(record).await?, "proposal"),
            _ => {}
        }
        Ok(repaired)
    }

    /// Puts `item` into the review queue unless an item for its intent is already there.
    /// True when it was missing and is now stored.
    async fn ensure_review(&self, item: ReviewItem) -> Result<bool, ApiError> {
        match kvx::create_or_get(&self.reviews, &item.intent_id, &item).await {
            Ok(existing) => Ok(existing.is_none()),
            Err(err) => Err(ApiError::unavailable(format!(
                "intent {} was recorded but its review item could not be stored ({err}); resubmit it with the same intent_id to finish",
                item.intent_id
            ))),
        }
    }

    /// Puts the task of `intent` into the queue and waits for JetStream's acknowledgement; false
    /// when the queue already had it (the same intent id within its duplicate window).
    async fn enqueue(&self, intent: &Intent, priority: u8, tier: Tier) -> Result<bool, ApiError> {
        let task = Task::for_intent(intent, priority, tier);
        let publish = PublishMessage::build()
            .payload(api::to_bytes(&task))
            .message_id(&intent.intent_id);
        let ack = async {
            self.js
                .send_publish(subjects::task_queue(priority), publish)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.timeout, ack).await {
            Ok(Ok(ack)) => Ok(!ack.duplicate),
            Ok(Err(e)) => match streams::limit_refusal(streams::TASKS_STREAM, &e) {
                Some(refusal) => Err(ApiError::new(
                    503,
                    STORAGE_FULL,
                    format!(
                        "intent {} was recorded but not queued: {refusal}; resubmit it with the same intent_id later",
                        intent.intent_id
                    ),
                )),
                None => Err(self.incomplete(intent, format!("task queue: {e}"))),
            },
            Err(_) => Err(self.incomplete(intent, "task queue did not acknowledge in time")),
        }
    }

    // ---- status -------------------------------------------------------------------------------

    async fn status(&self, body: &[u8]) -> Result<StatusReply, ApiError> {
        #[derive(serde::Deserialize)]
        struct StatusRequest {
            intent_id: String,
        }
        let req: StatusRequest = api::decode(body, "invalid_request", self.cfg.max_intent_bytes)?;
        let record = self.record(&req.intent_id).await?;
        Ok(record.status_reply())
    }

    /// Cancels an intent that has not finished (docs/actions.md#cancellation): its record
    /// becomes `cancelled` (so a queued task never runs, a review or vote can no longer approve
    /// it, and the scheduler drops its task), and the worker running it is told to abort.
    async fn cancel(
        &self,
        body: &[u8],
        from: &bulwark_common::identity::Sender,
    ) -> Result<Value, ApiError> {
        let req: crate::cancel::CancelRequest =
            api::decode(body, "invalid_request", self.cfg.max_intent_bytes)?;
        let record = self.record(&req.intent_id).await?;
        crate::cancel::may_cancel(&record, from, &self.cfg.privileged_identities)?;
        let by = from.name().to_owned();
        let reason = match req.reason.as_deref().map(str::trim) {
            Some(r) if !r.is_empty() => {
                format!("cancelled by {by}: {}", api::bounded(r.to_owned(), 256))
            }
            _ => format!("cancelled by {by}"),
        };
        let id = req.intent_id.clone();
        let updated = kvx::update(&self.intents, &id, |r: &mut IntentRecord| {
            crate::cancel::cancellable(&id, r.status)?;
            let before = (r.status, r.assignment.clone());
            r.transition(
                IntentStatus::Cancelled,
                Some(by.clone()),
                Some(reason.clone()),
            );
            Ok::<_, ApiError>(Change::Write(before))
        })
        .await
        .map_err(store_err)?;
        let ((previous, assignment), record) = match updated {
            Ok(done) => done,
            Err(err) => return Err(err),
        };
        if previous == IntentStatus::PendingReview {
            self.delete_review(&id).await;
        }
        // A task a worker holds is aborted there; one still queued (or parked) is dropped by
        // the scheduler when it comes to it.
        let mut worker_told = None;
        if matches!(previous, IntentStatus::Dispatched | IntentStatus::Running)
            && let Some(a) = &assignment
        {
            let body = json!({"task_id": id, "fence": a.fence});
            let told = tokio::time::timeout(
                self.timeout,
                self.client
                    .request(subjects::worker_cancel(&a.worker_id), api::to_bytes(&body)),
            )
            .await;
            // Told means the worker stopped it: it answers `cancelled: false` when the task or
            // fence is not one it holds.
            worker_told = Some(matches!(told, Ok(Ok(ref m))
                if m.headers.as_ref().and_then(|h| h.get(api::SERVICE_ERROR_CODE)).is_none()
                    && serde_json::from_slice::<Value>(&m.payload)
                        .is_ok_and(|v| v["cancelled"] == true)));
        }
        let n = self
            .narrator
            .narrative(
                "intent_cancelled",
                "htm.intent.cancel: the submitter or an operator",
            )
            .why(reason.clone())
            .why(format!("it was {}", previous.as_str()))
            .intent(&id, &record.intent.correlation_id)
            .context(
                json!({"intent_type": record.intent.intent_type, "previous_status": previous,
                            "by": by, "worker_id": assignment.as_ref().map(|a| &a.worker_id),
                            "worker_told": worker_told}),
            );
        self.narrator.publish(n).await;
        Ok(json!({"intent_id": id, "status": IntentStatus::Cancelled,
                  "previous_status": previous, "worker_id": assignment.map(|a| a.worker_id),
                  "worker_told": worker_told}))
    }

    async fn record(&self, intent_id: &str) -> Result<IntentRecord, ApiError> {
        if intent_id.is_empty() || !kv_key_ok(intent_id) {
            return Err(ApiError::not_found(
                "unknown_intent",
                format!("no intent {intent_id:?}"),
            ));
        }
        match kvx::read::<IntentRecord>(&self.intents, intent_id)
            .await
            .map_err(store_err)?
        {
            Some(v) => Ok(v.value),
            None => Err(ApiError::not_found(
                "unknown_intent",
                format!("no intent {intent_id:?}"),
            )),
        }
    }

    /// Moves the intent from `from` to `to`; `Ok(false)` when it was not in `from` any more.
    async fn transition(
        &self,
        intent_id: &str,
        from: IntentStatus,
        to: IntentStatus,
        by: Option<String>,
        reason: Option<String>,
        edit: impl Fn(&mut IntentRecord),
    ) -> Result<(bool, IntentRecord), ApiError> {
        kvx::update(&self.intents, intent_id, |record: &mut IntentRecord| {
            if record.status != from {
                return Ok::<_, ApiError>(Change::Keep(false));
            }
            record.transition(to, by.clone(), reason.clone());
            edit(record);
            Ok(Change::Write(true))
        })
        .await
        .map_err(store_err)?
    }

    /// Refuses a review or vote on intent `id` by the identity that submitted it, under any
    /// name: the name given (`who`) is its actor, or the NATS identity speaking (`speaker`) is
    /// the one that submitted it. 403 with `code`. An unknown intent passes (the caller says
    /// so in its own words).
    async fn not_own(
        &self,
        id: &str,
        who: Option<&str>,
        speaker: Option<&str>,
        code: &str,
        act: &str,
    ) -> Result<(), ApiError> {
        if !kv_key_ok(id) {
            return Ok(());
        }
        let Some(record) = kvx::read::<IntentRecord>(&self.intents, id)
            .await
            .map_err(store_err)?
            .map(|v| v.value)
        else {
            return Ok(());
        };
        let own_name = who.is_some_and(|w| w == record.intent.actor);
        let own_identity = speaker.is_some() && speaker == record.submitted_by.as_deref();
        if own_name || own_identity {
            let by = if own_name { who } else { speaker }.unwrap_or_default();
            return Err(ApiError::forbidden(
                code,
                format!("{by} submitted intent {id} and may not {act} it, by any name"),
            ));
        }
        Ok(())
    }

    // ---- human review -------------------------------------------------------------------------

    /// One page of the review queue, oldest first, payloads summarised.
    async fn pending_reviews(&self, body: &[u8]) -> Result<Page<ReviewItem>, ApiError> {
        self.list_page(&self.reviews, body, |item: &mut ReviewItem| {
            item.payload = page::summarise(&item.payload);
            format!("{}|{}", item.created_at, item.intent_id)
        })
        .await
    }

    /// One page of `bucket`'s values, in the order of the cursor `prepare` gives each value
    /// (after summarising it).
    async fn list_page<T: serde::de::DeserializeOwned>(
        &self,
        bucket: &kv::Store,
        body: &[u8],
        prepare: impl Fn(&mut T) -> String,
    ) -> Result<Page<T>, ApiError> {
        let request = PageRequest::parse(body)?;
        let mut items: Vec<(String, T)> = self
            .read_all::<T>(bucket)
            .await?
            .into_iter()
            .map(|mut value| (prepare(&mut value), value))
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(page::page(items, &request))
    }

    /// Every value of `bucket` that reads as a `T`.
    async fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        bucket: &kv::Store,
    ) -> Result<Vec<T>, ApiError> {
        let mut values = Vec::new();
        for key in kvx::keys(bucket).await.map_err(store_err)? {
            if let Some(entry) = kvx::read::<T>(bucket, &key).await.map_err(store_err)? {
                values.push(entry.value);
            }
        }
        Ok(values)
    }

    /// Refuses a submission of `actor` that would open one more review item or proposal than
    /// `governance.max_open_per_actor` allows.
    async fn check_open_cap(&self, actor: &str) -> Result<(), ApiError> {
        let cap = self.cfg.max_open_per_actor;
        if cap == 0 {
            return Ok(());
        }
        let reviews = self.read_all::<ReviewItem>(&self.reviews).await?;
        let proposals = self.read_all::<Proposal>(&self.proposals).await?;
        let open = reviews
            .iter()
            .filter(|r| r.actor == actor && r.requires_decision)
            .count()
            + proposals
                .iter()
                .filter(|p| p.actor == actor && p.state == ProposalState::Open)
                .count();
        if open >= cap {
            self.counters
                .refused_requests
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                429,
                "too_many_open",
                format!(
                    "actor {actor:?} already has {open} open review items and proposals, the cap (governance.max_open_per_actor = {cap}); wait for decisions"
                ),
            ));
        }
        Ok(())
    }

    async fn decide(
        &self,
        body: &[u8],
        sender: Sender<'_>,
        from: &bulwark_common::identity::Sender,
    ) -> Result<StatusReply, ApiError> {
        let speaker = submitter(from, sender);
        let parsed = ReviewDecision::parse(
            body,
            self.cfg.max_intent_bytes,
            sender,
            &self.cfg.bound_identities,
        );
        let decision = match parsed {
            Ok(d) => d,
            Err(err) => {
                self.narrate_refusal("review_refused", &err, body).await;
                return Err(err);
            }
        };
        let own = self.not_own(
            &decision.intent_id,
            Some(&decision.reviewer),
            speaker.as_deref(),
            "own_intent",
            "review",
        );
        let result = match own.await {
            Ok(()) => self.apply_decision(&decision).await,
            Err(err) => Err(err),
        };
        if let Err(err) = &result
            && err.status < 500
        {
            self.narrate_refusal("review_refused", err, body).await;
        }
        result
    }

    async fn apply_decision(&self, d: &ReviewDecision) -> Result<StatusReply, ApiError> {
        let id = &d.intent_id;
        let item = if kv_key_ok(id) {
            kvx::read::<ReviewItem>(&self.reviews, id)
                .await
                .map_err(store_err)?
        } else {
            None
        };
        let Some(item) = item.map(|v| v.value) else {
            let record = self.record(id).await?;
            return Err(ApiError::conflict(
                "no_pending_review",
                format!(
                    "intent {id} has no pending review (status {})",
                    record.status.as_str()
                ),
            ));
        };
        let verdict_word = match d.verdict {
            Verdict::Approve => "approve",
            Verdict::Reject => "reject",
        };
        let outcome = ReviewOutcome {
            decision: verdict_word.to_owned(),
            reviewer: d.reviewer.clone(),
            reason: d.reason.clone(),
            kind: item.kind.as_str().to_owned(),
            at: time::now(),
        };
        let reason = if d.reason.is_empty() {
            None
        } else {
            Some(d.reason.clone())
        };
        let record = if item.kind.requires_decision() {
            let to = match d.verdict {
                Verdict::Approve => IntentStatus::Queued,
                Verdict::Reject => IntentStatus::Rejected,
            };
            let error = format!(
                "rejected by {}{}",
                d.reviewer,
                reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
            let (moved, record) = self
                .transition(
                    id,
                    IntentStatus::PendingReview,
                    to,
                    Some(d.reviewer.clone()),
                    reason.clone(),
                    |r| {
                        r.review = Some(outcome.clone());
                        if to == IntentStatus::Rejected {
                            r.error = Some(error.clone());
                        }
                    },
                )
                .await?;
            if !moved {
                // A decision that landed before a crash: finish its effects, then refuse this one.
                if record.status == IntentStatus::Queued {
                    let tier = Tier::from_number(record.decision.autonomy_tier)
                        .unwrap_or(Tier::HumanRequired);
                    self.enqueue(&record.intent, item.priority, tier).await?;
                }
                self.delete_review(id).await;
                return Err(ApiError::conflict(
                    "no_pending_review",
                    format!(
                        "intent {id} was already decided (status {})",
                        record.status.as_str()
                    ),
                ));
            }
            if to == IntentStatus::Queued {
                let tier =
                    Tier::from_number(record.decision.autonomy_tier).unwrap_or(Tier::HumanRequired);
                self.enqueue(&record.intent, item.priority, tier).await?;
            }
            record
        } else {
            let recorded = kvx::update(&self.intents, id, |r: &mut IntentRecord| {
                if r.review.is_some() {
                    return Ok::<_, ApiError>(Change::Keep(false));
                }
                r.review = Some(outcome.clone());
                Ok(Change::Write(true))
            })
            .await
            .map_err(store_err)??;
            if !recorded.0 {
                self.delete_review(id).await;
                return Err(ApiError::conflict(
                    "no_pending_review",
                    format!("intent {id} was already reviewed"),
                ));
            }
            recorded.1
        };
        self.delete_review(id).await;
        self.counters
            .reviews_decided
            .fetch_add(1, Ordering::Relaxed);
        let what = match (item.kind.requires_decision(), d.verdict) {
            (true, Verdict::Approve) => "review_approved",
            (true, Verdict::Reject) => "review_rejected",
            (false, _) => "review_recorded",
        };
        let n = self
            .narrator
            .narrative(what, "human review queue decision")
            .why(
                format!(
                    "{} decided {verdict_word} on a {:?} review",
                    d.reviewer, item.kind
                )
                .to_lowercase(),
            )
            .whys(reason.clone().map(|r| format!("reviewer's reason: {r}")))
            .why(format!("intent is now {}", record.status.as_str()))
            .intent(id, &record.intent.correlation_id)
            .context(
                json!({"reviewer": d.reviewer, "decision": verdict_word, "kind": item.kind,
                            "status": record.status, "intent_type": record.intent.intent_type}),
            );
        self.narrator.publish(n).await;
        Ok(record.status_reply())
    }

    async fn delete_review(&self, id: &str) {
        if let Err(err) = self.reviews.delete(id).await {
            tracing::warn!(intent_id = id, error = %err, "review item not deleted; it will be refused as decided");
        }
    }

    // ---- unified logic vote -------------------------------------------------------------------

    /// Opens (and announces) the proposal of `record`; true when it was not open yet.
    async fn open_proposal(&self, record: &IntentRecord) -> Result<bool, ApiError> {
        let intent = &record.intent;
        let voters = &self.cfg.voters;
        let opened_ms = time::parse_ms(&record.decision.timestamp).unwrap_or_else(time::now_ms);
        let deadline_ms = opened_ms + (voters.vote_timeout_s * 1000.0) as i64;
        let proposal = Proposal {
            proposal_id: intent.intent_id.clone(),
            intent_id: intent.intent_id.clone(),
            intent_type: intent.intent_type.clone(),
            actor: intent.actor.clone(),
            payload: intent.payload.clone(),
            mission_alignment: record.decision.mission_alignment,
            priority: record.decision.priority,
            reasoning: record.decision.reasoning.clone(),
            voters: voters.names.clone(),
            quorum: voters.quorum,
            votes: Vec::new(),
            state: ProposalState::Open,
            opened_at: record.decision.timestamp.clone(),
            deadline: time::format_ms(deadline_ms),
            deadline_ms,
        };
        let existing = kvx::create_or_get(&self.proposals, &intent.intent_id, &proposal)
            .await
            .map_err(|e| self.incomplete(intent, e))?;
        if existing.is_some() {
            // Announced when it was opened; voters can also list open proposals, so a lost
            // announcement is not a lost proposal.
            return Ok(false);
        }
        let sent = bulwark_common::connect::publish_flushed(
            &self.client,
            subjects::proposal(&intent.intent_id),
            api::to_bytes(&proposal),
            self.timeout,
        )
        .await;
        if let Err(err) = sent {
            tracing::warn!(intent_id = %intent.intent_id, error = %err, "proposal announcement not sent");
        }
        Ok(true)
    }

    /// One page of the proposals, oldest first, payloads summarised.
    async fn open_proposals(&self, body: &[u8]) -> Result<Page<Proposal>, ApiError> {
        self.list_page(&self.proposals, body, |p: &mut Proposal| {
            p.payload = page::summarise(&p.payload);
            format!("{}|{}", p.opened_at, p.proposal_id)
        })
        .await
    }

    async fn vote(
        &self,
        body: &[u8],
        sender: Sender<'_>,
        from: &bulwark_common::identity::Sender,
    ) -> Result<Tally, ApiError> {
        let result = self.cast(body, sender, submitter(from, sender)).await;
        if let Err(err) = &result
            && err.status < 500
        {
            self.narrate_refusal("vote_refused", err, body).await;
        }
        result
    }

    async fn cast(
        &self,
        body: &[u8],
        sender: Sender<'_>,
        speaker: Option<String>,
    ) -> Result<Tally, ApiError> {
        let req = VoteRequest::parse(
            body,
            self.cfg.max_intent_bytes,
            sender,
            &self.cfg.bound_identities,
        )?;
        let id = req.proposal_id.clone();
        // (A voter named like the actor is refused by the proposal itself, `self_vote`.)
        self.not_own(&id, None, speaker.as_deref(), "self_vote", "vote on")
            .await?;
        let unknown = || async {
            match self.record(&id).await {
                Ok(record) => ApiError::conflict(
                    "proposal_closed",
                    format!(
                        "proposal {id} is closed: intent is {}",
                        record.status.as_str()
                    ),
                ),
                Err(err) if err.status == 404 => {
                    ApiError::not_found("unknown_proposal", format!("no proposal {id:?}"))
                }
                Err(err) => err,
            }
        };
        if !kv_key_ok(&id) {
            return Err(unknown().await);
        }
        let now = time::now_ms();
        let ballot = req.ballot.clone();
        let cast = match kvx::update(&self.proposals, &id, |p: &mut Proposal| {
            p.cast(ballot.clone(), now).map(Change::Write)
        })
        .await
        {
            Err(KvError::NotFound(_)) => return Err(unknown().await),
            Err(err) => return Err(store_err(err)),
            Ok(result) => result?,
        };
        let (state, proposal) = cast;
        self.counters.votes_cast.fetch_add(1, Ordering::Relaxed);
        let (approvals, rejections) = proposal.counts();
        let n = self
            .narrator
            .narrative("vote_cast", "unified logic vote")
            .why(
                format!("{} voted {:?} on proposal {id}", ballot.voter, ballot.vote).to_lowercase(),
            )
            .why(format!(
                "tally {approvals} approve / {rejections} reject, quorum {}",
                proposal.quorum
            ))
            .whys((!ballot.reason.is_empty()).then(|| format!("voter's reason: {}", ballot.reason)))
            .intent(&id, &id)
            .context(
                json!({"voter": ballot.voter, "vote": ballot.vote, "approvals": approvals,
                            "rejections": rejections, "quorum": proposal.quorum, "state": state}),
            );
        self.narrator.publish(n).await;
        if state != ProposalState::Open {
            self.finalize(&proposal).await?;
        }
        Ok(proposal.tally())
    }

    /// Applies a closed proposal to its intent (idempotently) and removes it.
    async fn finalize(&self, p: &Proposal) -> Result<(), ApiError> {
        let (approvals, rejections) = p.counts();
        let tally = format!(
            "{approvals} approve / {rejections} reject of {} voters, quorum {}",
            p.voters.len(),
            p.quorum
        );
        let (to, what, reason) = match p.state {
            ProposalState::Open => return Ok(()),
            ProposalState::Approved => (
                IntentStatus::Queued,
                "vote_approved",
                format!("approved by vote: {tally}"),
            ),
            ProposalState::Rejected => (
                IntentStatus::Rejected,
                "vote_rejected",
                format!("rejected by vote: {tally}"),
            ),
            ProposalState::Expired => (
                IntentStatus::PendingReview,
                "vote_expired",
                format!(
                    "no quorum within {}s ({tally}): escalated to human review",
                    self.cfg.voters.vote_timeout_s
                ),
            ),
        };
        let voters: Vec<&str> = p.votes.iter().map(|b| b.voter.as_str()).collect();
        let by = Some(if voters.is_empty() {
            "unified_logic_hub".to_owned()
        } else {
            voters.join(",")
        });
        let error = (to == IntentStatus::Rejected).then(|| reason.clone());
        let (moved, record) = self
            .transition(
                &p.intent_id,
                IntentStatus::PendingVote,
                to,
                by,
                Some(reason.clone()),
                |r| {
                    if let Some(e) = &error {
                        r.error = Some(e.clone());
                    }
                },
            )
            .await?;
        // Effects run when we moved it, or when an earlier attempt moved it and stopped short.
        if moved || record.status == to {
            match to {
                IntentStatus::Queued => {
                    self.enqueue(&record.intent, p.priority, Tier::AutonomousHighImpact)
                        .await?;
                }
                IntentStatus::PendingReview => {
                    let item = ReviewItem::new(
                        &record.intent,
                        ReviewKind::VoteTimeout,
                        Tier::AutonomousHighImpact.number(),
                        p.mission_alignment,
                        p.priority,
                        &[p.reasoning.clone(), vec![reason.clone()]].concat(),
                    );
                    self.ensure_review(item).await?;
                }
                _ => {}
            }
        }
        if let Err(err) = self.proposals.delete(&p.proposal_id).await {
            tracing::warn!(proposal_id = %p.proposal_id, error = %err, "closed proposal not removed; the sweeper retries");
        }
        if moved {
            if p.state == ProposalState::Expired {
                self.counters.votes_expired.fetch_add(1, Ordering::Relaxed);
            }
            let n = self
                .narrator
                .narrative(what, "unified logic vote tally")
                .why(reason)
                .why(format!("intent is now {}", to.as_str()))
                .intent(&p.intent_id, &record.intent.correlation_id)
                .context(
                    json!({"approvals": approvals, "rejections": rejections, "quorum": p.quorum,
                                "voters": p.voters, "votes": p.votes, "status": to}),
                );
            self.narrator.publish(n).await;
        }
        Ok(())
    }

    /// Expires open proposals past their deadline and finishes closed ones left by a crash.
    async fn sweep_once(&self) -> Result<(), ApiError> {
        let now = time::now_ms();
        for key in kvx::keys(&self.proposals).await.map_err(store_err)? {
            let Some(p) = kvx::read::<Proposal>(&self.proposals, &key)
                .await
                .map_err(store_err)?
            else {
                continue;
            };
            let p = p.value;
            if p.state == ProposalState::Open && now < p.deadline_ms {
                continue;
            }
            let closed = if p.state == ProposalState::Open {
                let expired = kvx::update(&self.proposals, &key, |p: &mut Proposal| {
                    if p.state != ProposalState::Open {
                        return Ok::<_, ApiError>(Change::Keep(()));
                    }
                    p.state = ProposalState::Expired;
                    Ok(Change::Write(()))
                })
                .await;
                match expired {
                    Ok(Ok(((), p))) => p,
                    Err(KvError::NotFound(_)) => continue,
                    Err(err) => return Err(store_err(err)),
                    Ok(Err(err)) => return Err(err),
                }
            } else {
                p
            };
            self.finalize(&closed).await?;
        }
        Ok(())
    }

    // ---- narratives of refusals ---------------------------------------------------------------

    async fn narrate_refusal(&self, what: &str, err: &ApiError, body: &[u8]) {
        let excerpt: String = String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned();
        let n = self
            .narrator
            .narrative(what, "request validation")
            .why(err.message.clone())
            .context(json!({"code": err.code, "status": err.status, "body_bytes": body.len(), "body_excerpt": excerpt}));
        self.narrator.publish(n).await;
    }
}

async fn sweep_votes(gov: Arc<Governance>, shutdown: CancellationToken) {
    let every = Duration::from_secs_f64(gov.cfg.voters.sweep_interval_s.max(0.05));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if let Err(err) = gov.sweep_once().await {
            tracing::warn!(error = %err, "vote sweep failed; retrying next tick");
        }
    }
}

/// Expires finished intent records after `nats.storage.finished_intent_retention_s` (0: never).
async fn sweep_finished(gov: Arc<Governance>, shutdown: CancellationToken) {
    let retention = gov.storage.finished_intent_retention_s;
    if retention <= 0.0 {
        return;
    }
    let retention = Duration::from_secs_f64(retention);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(
        gov.storage.sweep_interval_s.max(0.05),
    ));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match crate::retention::sweep(&gov.js, &gov.intents, retention, gov.timeout).await {
            Ok(0) => {}
            Ok(removed) => {
                gov.counters
                    .expired_records
                    .fetch_add(removed as u64, Ordering::Relaxed);
                tracing::info!(removed, "finished intent records expired");
            }
            Err(err) => {
                tracing::warn!(error = %err, "finished-record sweep failed; retrying next tick")
            }
        }
    }
}

/// Validates an intent submission sent by `sender` (size, JSON, the actor bound to the sender,
/// the fields): the intent, or the `invalid_intent` / identity error naming the problem.
pub fn decode_submission(
    body: &[u8],
    cfg: &GovernanceConfig,
    sender: Sender<'_>,
) -> Result<Intent, ApiError> {
    let max = cfg.max_intent_bytes;
    if body.len() > max {
        return Err(ApiError::bad_request(
            INVALID_INTENT,
            format!(
                "body is {} bytes, over the limit of {max} bytes",
                body.len()
            ),
        ));
    }
    let mut value: Value = api::parse_json(body).map_err(|e| {
        ApiError::bad_request(INVALID_INTENT, format!("body is not valid JSON: {e}"))
    })?;
    // The actor is bound to the sender; an actor of the wrong type is left to the validation
    // below, which names the problem.
    if let Value::Object(obj) = &mut value {
        let claimed = match obj.get("actor") {
            None | Some(Value::Null) => Some(None),
            Some(Value::String(actor)) => Some(Some(actor.as_str())),
            Some(_) => None,
        };
        if let Some(claimed) = claimed
            && let Some(actor) =
                identity::bind(Role::Actor, claimed, sender, &cfg.bound_identities)?
        {
            obj.insert("actor".to_owned(), Value::String(actor));
        }
    }
    Intent::from_submission(value, ids::new_id, cfg.default_priority)
        .map_err(|msg| ApiError::bad_request(INVALID_INTENT, msg))
}

fn review_record_kind(tier: Tier) -> Option<ReviewKind> {
    match tier {
        Tier::ReviewRequired => Some(ReviewKind::PostExecution),
        Tier::Emergency => Some(ReviewKind::PostHoc),
        _ => None,
    }
}

/// Intent ids we accept are valid KV keys; anything else cannot be stored, so it is unknown.
fn kv_key_ok(id: &str) -> bool {
    id.len() <= bulwark_common::intent::MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn decision(intent: &Intent, route: &Route, durability: Durability) -> Decision {
    Decision {
        intent_id: intent.intent_id.clone(),
        intent_type: intent.intent_type.clone(),
        actor: intent.actor.clone(),
        status: route.status,
        approved: route.approved,
        autonomy_tier: route.tier.number(),
        tier_name: route.tier.name().to_owned(),
        requires_vote: route.requires_vote,
        requires_human: route.requires_human,
        routed_to: route.routed_to.to_owned(),
        mission_alignment: route.alignment,
        priority: route.priority,
        reasoning: route.reasoning.clone(),
        timestamp: time::now(),
        durability: durability.as_str().to_owned(),
    }
}
