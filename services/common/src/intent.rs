//! Intents and their life: the submission an agent sends, the autonomy tier it gets, the decision
//! it is answered with, the durable record of its status history, and the task that carries it to
//! a worker (CONTRACT section 2).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The five autonomy tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// A human must approve before anything runs.
    HumanRequired,
    /// Runs now; a human reviews afterwards.
    ReviewRequired,
    /// Runs now, no review.
    AutonomousLowRisk,
    /// Runs only after the unified logic voters reach quorum.
    AutonomousHighImpact,
    /// Runs at once at top priority; reviewed after the fact.
    Emergency,
}

impl Tier {
    /// All tiers, lowest number first.
    pub const ALL: [Tier; 5] = [
        Tier::HumanRequired,
        Tier::ReviewRequired,
        Tier::AutonomousLowRisk,
        Tier::AutonomousHighImpact,
        Tier::Emergency,
    ];

    /// The tier with this number, if 0-4.
    pub fn from_number(n: u8) -> Option<Tier> {
        Tier::ALL.get(usize::from(n)).copied()
    }
    /// The tier's number, 0-4.
    pub fn number(self) -> u8 {
        match self {
            Tier::HumanRequired => 0,
            Tier::ReviewRequired => 1,
            Tier::AutonomousLowRisk => 2,
            Tier::AutonomousHighImpact => 3,
            Tier::Emergency => 4,
        }
    }
    /// CONTRACT's `tier_name`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::HumanRequired => "TIER_0_HUMAN_REQUIRED",
            Tier::ReviewRequired => "TIER_1_REVIEW_REQUIRED",
            Tier::AutonomousLowRisk => "TIER_2_AUTONOMOUS_LOW_RISK",
            Tier::AutonomousHighImpact => "TIER_3_AUTONOMOUS_HIGH_IMPACT",
            Tier::Emergency => "TIER_4_EMERGENCY",
        }
    }
    /// CONTRACT's `routed_to`.
    pub fn routed_to(self) -> &'static str {
        match self {
            Tier::HumanRequired => "human_review_queue",
            Tier::ReviewRequired => "execute_with_review",
            Tier::AutonomousLowRisk => "direct_execution",
            Tier::AutonomousHighImpact => "unified_logic_hub",
            Tier::Emergency => "emergency_handler",
        }
    }
}

/// Where an intent is in its life (CONTRACT section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentStatus {
    /// Waiting for a human decision.
    PendingReview,
    /// Waiting for the unified logic vote.
    PendingVote,
    /// Refused by a human or by the voters; it never runs.
    Rejected,
    /// In the task queue, waiting for a worker.
    Queued,
    /// Handed to a worker.
    Dispatched,
    /// The worker started it.
    Running,
    /// Finished successfully.
    Completed,
    /// Finished with an error after its attempts.
    Failed,
    /// Parked by load shedding; replayable.
    Shed,
    /// Cancelled on `htm.intent.cancel` before it finished; it never runs (again).
    Cancelled,
}

impl IntentStatus {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            IntentStatus::PendingReview => "pending_review",
            IntentStatus::PendingVote => "pending_vote",
            IntentStatus::Rejected => "rejected",
            IntentStatus::Queued => "queued",
            IntentStatus::Dispatched => "dispatched",
            IntentStatus::Running => "running",
            IntentStatus::Completed => "completed",
            IntentStatus::Failed => "failed",
            IntentStatus::Shed => "shed",
            IntentStatus::Cancelled => "cancelled",
        }
    }
}

/// The mission pillars an intent claims to serve, and whether it is an emergency.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MissionContext {
    /// Serves the resilience pillar.
    #[serde(default)]
    pub resilience_impact: bool,
    /// Serves the revenue pillar.
    #[serde(default)]
    pub revenue_impact: bool,
    /// Serves the autonomy pillar.
    #[serde(default)]
    pub autonomy_impact: bool,
    /// Serves the learning pillar.
    #[serde(default)]
    pub learning_impact: bool,
    /// Declared an emergency: alignment 1.0.
    #[serde(default)]
    pub emergency: bool,
    /// Any further keys the agent sent, kept as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A validated intent, as governance stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    /// Client-supplied idempotency key, or a UUIDv7.
    pub intent_id: String,
    /// What kind of work (decides the tier).
    pub intent_type: String,
    /// The agent asking.
    pub actor: String,
    /// The work's parameters.
    pub payload: Value,
    /// 0-9, 9 most urgent.
    pub priority: u8,
    /// The pillars served.
    pub mission_context: MissionContext,
    /// Correlation id of the flow this intent belongs to (its own id for a root).
    pub correlation_id: String,
    /// Fields of the submission that bulwark does not know; accepted, ignored and reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_fields: Vec<String>,
    /// The task is not dispatched before this time (RFC 3339 UTC; docs/actions.md#delays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
}

/// Largest length of an `intent_id` (it is a KV key and a subject token).
pub const MAX_ID_LEN: usize = 128;
/// Largest length of an `intent_type`.
pub const MAX_TYPE_LEN: usize = 128;
/// Largest length of an `actor`.
pub const MAX_ACTOR_LEN: usize = 256;

fn id_chars_ok(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Intent {
    /// Validates a submission; the error says exactly what is wrong. `new_id` makes the id when
    /// the client gave none, `default_priority` fills a missing priority.
    pub fn from_submission(
        value: Value,
        new_id: impl FnOnce() -> String,
        default_priority: u8,
    ) -> Result<Intent, String> {
        let Value::Object(mut obj) = value else {
            return Err(format!(
                "body must be a JSON object, got {}",
                crate::api::json_kind(&value)
            ));
        };
        let intent_type = required_string(&mut obj, "intent_type", MAX_TYPE_LEN)?;
        if !intent_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(format!(
                "intent_type {intent_type:?} may only hold letters, digits, '_', '-' and '.'"
            ));
        }
        let actor = required_string(&mut obj, "actor", MAX_ACTOR_LEN)?;
        let intent_id = match obj.remove("intent_id") {
            None | Some(Value::Null) => new_id(),
            Some(Value::String(id)) => {
                if id.is_empty() {
                    return Err("intent_id, when given, must not be empty".into());
                }
                if id.len() > MAX_ID_LEN || !id_chars_ok(&id) {
                    return Err(format!(
                        "intent_id must be 1-{MAX_ID_LEN} characters of letters, digits, '_' and '-', got {id:?}"
                    ));
                }
                id
            }
            Some(other) => {
                return Err(format!(
                    "intent_id must be a string, got {}",
                    crate::api::json_kind(&other)
                ));
            }
        };
        let priority = match obj.remove("priority") {
            None | Some(Value::Null) => default_priority,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(p) if p <= 9 => p as u8,
                _ => return Err(format!("priority must be an integer from 0 to 9, got {n}")),
            },
            Some(other) => {
                return Err(format!(
                    "priority must be an integer from 0 to 9, got {}",
                    crate::api::json_kind(&other)
                ));
            }
        };
        let payload = match obj.remove("payload") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => v,
            Some(other) => {
                return Err(format!(
                    "payload must be a JSON object, got {}",
                    crate::api::json_kind(&other)
                ));
            }
        };
        let mission_context = match obj.remove("mission_context") {
            None | Some(Value::Null) => MissionContext::default(),
            Some(Value::Object(ctx)) => {
                for key in [
                    "resilience_impact",
                    "revenue_impact",
                    "autonomy_impact",
                    "learning_impact",
                    "emergency",
                ] {
                    if let Some(v) = ctx.get(key)
                        && !v.is_boolean()
                        && !v.is_null()
                    {
                        return Err(format!(
                            "mission_context.{key} must be a boolean, got {}",
                            crate::api::json_kind(v)
                        ));
                    }
                }
                serde_json::from_value(Value::Object(ctx))
                    .map_err(|e| format!("mission_context: {e}"))?
            }
            Some(other) => {
                return Err(format!(
                    "mission_context must be a JSON object, got {}",
                    crate::api::json_kind(&other)
                ));
            }
        };
        let correlation_id = match obj.remove("correlation_id") {
            None | Some(Value::Null) => intent_id.clone(),
            Some(Value::String(c)) if !c.is_empty() && c.len() <= MAX_ID_LEN => c,
            Some(_) => {
                return Err(format!(
                    "correlation_id must be a string of 1-{MAX_ID_LEN} characters"
                ));
            }
        };
        let not_before = match obj.remove("not_before") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => match t.parse::<jiff::Timestamp>() {
                Ok(ts) => Some(crate::time::format(ts)),
                Err(e) => {
                    return Err(format!(
                        "not_before must be an RFC 3339 timestamp (e.g. 2026-11-26T10:00:00Z), got {}: {e}",
                        crate::api::excerpt(&t, 64)
                    ));
                }
            },
            Some(other) => {
                return Err(format!(
                    "not_before must be an RFC 3339 timestamp string, got {}",
                    crate::api::json_kind(&other)
                ));
            }
        };
        let ignored_fields = obj.keys().cloned().collect();
        Ok(Intent {
            not_before,
            intent_id,
            intent_type,
            actor,
            payload,
            priority,
            mission_context,
            correlation_id,
            ignored_fields,
        })
    }
}

fn required_string(obj: &mut Map<String, Value>, key: &str, max: usize) -> Result<String, String> {
    match obj.remove(key) {
        None | Some(Value::Null) => Err(format!("{key} is required")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("{key} must not be empty")),
        Some(Value::String(s)) if s.len() > max => Err(format!(
            "{key} is {} bytes, over the limit of {max}",
            s.len()
        )),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "{key} must be a string, got {}",
            crate::api::json_kind(&other)
        )),
    }
}

/// The reply to a submission: the routing decision (CONTRACT section 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The intent.
    pub intent_id: String,
    /// Its type.
    pub intent_type: String,
    /// Who asked.
    pub actor: String,
    /// Status right after the decision.
    pub status: IntentStatus,
    /// Cleared to execute now.
    pub approved: bool,
    /// Autonomy tier number, 0-4.
    pub autonomy_tier: u8,
    /// `TIER_<n>_...`.
    pub tier_name: String,
    /// Waits for the unified logic vote.
    pub requires_vote: bool,
    /// Waits for (or will get) a human review.
    pub requires_human: bool,
    /// Where the intent went.
    pub routed_to: String,
    /// Mission alignment, 0-1.
    pub mission_alignment: f64,
    /// Priority it is queued with (tier 4 is raised to 9).
    pub priority: u8,
    /// Why, with the numbers.
    pub reasoning: Vec<String>,
    /// When the decision was made.
    pub timestamp: String,
    /// What the acknowledgement of this decision promises (`nats.durability`): `fast` (the
    /// server's periodic fsync) or `synced` (on disk, or on 3 replicas, before the ack).
    #[serde(default)]
    pub durability: String,
}

/// One step of an intent's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The status entered.
    pub status: IntentStatus,
    /// When.
    pub at: String,
    /// Who caused it (reviewer, voters, worker), when not governance itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why, when there is more to say than the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The durable record of one intent, the value of its key in the intents bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentRecord {
    /// The intent as accepted.
    pub intent: Intent,
    /// The first decision, returned again to a resubmission.
    pub decision: Decision,
    /// Current status.
    pub status: IntentStatus,
    /// Every status entered, oldest first.
    pub history: Vec<StatusChange>,
    /// The worker's result, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, once failed or rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The human review of this intent, once a reviewer decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewOutcome>,
    /// The task's current (or last) assignment to a worker, once dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<crate::htm::AssignmentRecord>,
    /// Fencing token of the scheduler leader that last changed this record (0: none yet). A
    /// scheduler holding an older token may not change it (see [`crate::lease`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leader_token: u64,
    /// The NATS identity that submitted the intent, as the server named it (or the name of its
    /// per-identity subject); `None` for bulwark's own services. It may not review or vote on
    /// its own intent, by any name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A reviewer's recorded decision on an intent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewOutcome {
    /// `approve` or `reject`.
    pub decision: String,
    /// Who decided.
    pub reviewer: String,
    /// Why.
    pub reason: String,
    /// Why the intent was in the queue (`approval`, `post_execution`, ...).
    pub kind: String,
    /// When.
    pub at: String,
}

impl IntentRecord {
    /// Moves to `status`, appending to the history.
    pub fn transition(&mut self, status: IntentStatus, by: Option<String>, reason: Option<String>) {
        self.status = status;
        self.history.push(StatusChange {
            status,
            at: crate::time::now(),
            by,
            reason,
        });
    }

    /// The `htm.intent.status` reply.
    pub fn status_reply(&self) -> StatusReply {
        StatusReply {
            intent_id: self.intent.intent_id.clone(),
            intent_type: self.intent.intent_type.clone(),
            status: self.status,
            autonomy_tier: self.decision.autonomy_tier,
            history: self.history.clone(),
            result: self.result.clone(),
            error: self.error.clone(),
            review: self.review.clone(),
            worker_id: self.assignment.as_ref().map(|a| a.worker_id.clone()),
            attempts: self.assignment.as_ref().map(|a| a.attempt),
        }
    }
}

/// The reply of `htm.intent.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The intent.
    pub intent_id: String,
    /// Its type.
    pub intent_type: String,
    /// Current status.
    pub status: IntentStatus,
    /// Tier number.
    pub autonomy_tier: u8,
    /// Every status entered, oldest first.
    pub history: Vec<StatusChange>,
    /// The result, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, once failed or rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The human review, once decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewOutcome>,
    /// The worker of the current or last attempt, once dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Attempts made so far, once dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
}

/// A unit of work in the task queue: one approved intent on its way to a worker.
///
/// Published with `Nats-Msg-Id` = intent id, so a republish within the stream's duplicate window
/// is dropped. A task can still arrive twice (a republish after the window, when an interrupted
/// acceptance is re-driven); the scheduler executes it only if it moves the intent from `queued`
/// to `dispatched`, so it never runs twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The task (equal to the intent id: one task per intent).
    pub task_id: String,
    /// The intent it executes.
    pub intent_id: String,
    /// Selects the worker's handler.
    pub intent_type: String,
    /// Who asked for it.
    pub actor: String,
    /// The handler's input.
    pub payload: Value,
    /// 0-9, 9 most urgent.
    pub priority: u8,
    /// Tier it was approved under.
    pub autonomy_tier: u8,
    /// The flow it belongs to.
    pub correlation_id: String,
    /// When it entered the queue.
    pub queued_at: String,
}

impl Task {
    /// The task for an approved intent.
    pub fn for_intent(intent: &Intent, priority: u8, tier: Tier) -> Task {
        Task {
            task_id: intent.intent_id.clone(),
            intent_id: intent.intent_id.clone(),
            intent_type: intent.intent_type.clone(),
            actor: intent.actor.clone(),
            payload: intent.payload.clone(),
            priority,
            autonomy_tier: tier.number(),
            correlation_id: intent.correlation_id.clone(),
            queued_at: crate::time::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Intent, String> {
        Intent::from_submission(v, || "generated".into(), 5)
    }

    #[test]
    fn minimal_submission_gets_defaults() {
        let i = parse(json!({"intent_type": "query_knowledge", "actor": "a"})).expect("valid");
        assert_eq!(i.intent_id, "generated");
        assert_eq!(i.correlation_id, "generated");
        assert_eq!(i.priority, 5);
        assert_eq!(i.payload, json!({}));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (json!({"actor": "a"}), "intent_type is required"),
            (
                json!({"intent_type": "", "actor": "a"}),
                "intent_type must not be empty",
            ),
            (json!({"intent_type": "x"}), "actor is required"),
            (
                json!({"intent_type": "x", "actor": "  "}),
                "actor must not be empty",
            ),
            (
                json!({"intent_type": 3, "actor": "a"}),
                "intent_type must be a string, got a number",
            ),
            (
                json!({"intent_type": "x", "actor": "a", "priority": 10}),
                "priority must be an integer from 0 to 9",
            ),
            (
                json!({"intent_type": "x", "actor": "a", "priority": -1}),
                "priority must be an integer from 0 to 9",
            ),
            (
                json!({"intent_type": "x", "actor": "a", "priority": "high"}),
                "got a string",
            ),
            (
                json!({"intent_type": "x", "actor": "a", "priority": 2.5}),
                "priority must be an integer",
            ),
            (
                json!({"intent_type": "x", "actor": "a", "payload": [1]}),
                "payload must be a JSON object",
            ),
            (
                json!({"intent_type": "x", "actor": "a", "mission_context": {"revenue_impact": "yes"}}),
                "mission_context.revenue_impact must be a boolean",
            ),
            (
                json!({"intent_type": "x", "actor": "a", "intent_id": "a.b"}),
                "intent_id must be",
            ),
            (
                json!({"intent_type": "x", "actor": "a", "intent_id": 7}),
                "intent_id must be a string",
            ),
            (
                json!({"intent_type": "a b", "actor": "a"}),
                "intent_type \"a b\" may only hold",
            ),
            (json!([1, 2]), "body must be a JSON object, got an array"),
        ];
        for (body, expected) in cases {
            let err = parse(body.clone()).expect_err("invalid");
            assert!(
                err.contains(expected),
                "{body}: got {err:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_reported_not_fatal() {
        let i = parse(json!({"intent_type": "x", "actor": "a", "prority": 9})).expect("valid");
        assert_eq!(i.ignored_fields, vec!["prority".to_owned()]);
        assert_eq!(i.priority, 5);
    }

    #[test]
    fn tiers_round_trip() {
        for tier in Tier::ALL {
            assert_eq!(Tier::from_number(tier.number()), Some(tier));
        }
        assert_eq!(Tier::from_number(5), None);
        assert_eq!(
            Tier::AutonomousHighImpact.name(),
            "TIER_3_AUTONOMOUS_HIGH_IMPACT"
        );
    }
}
