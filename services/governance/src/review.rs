//! The human review queue: items, their kinds, and the validation of a reviewer's decision.
//!
//! Items that *require a decision* (tier 0, low alignment, vote timeout) hold the intent until a
//! reviewer approves (it is queued) or rejects (it ends). Review *records* (tier 1 after
//! execution, tier 4 after the fact) sit in the same queue so a human looks at what ran; deciding
//! them records the verdict without changing the intent.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use bulwark_common::api::ApiError;
use bulwark_common::intent::{Intent, IntentRecord};

use crate::identity::{self, Role, Sender};

/// Why an item is in the review queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewKind {
    /// Tier 0: a human must approve before it runs.
    Approval,
    /// A tier 1 or 2 intent below `min_alignment`.
    LowAlignment,
    /// A tier 3 proposal reached no quorum within `vote_timeout_s`.
    VoteTimeout,
    /// Tier 1: executes now, reviewed afterwards.
    PostExecution,
    /// Tier 4: an emergency, reviewed after the fact.
    PostHoc,
}

impl ReviewKind {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewKind::Approval => "approval",
            ReviewKind::LowAlignment => "low_alignment",
            ReviewKind::VoteTimeout => "vote_timeout",
            ReviewKind::PostExecution => "post_execution",
            ReviewKind::PostHoc => "post_hoc",
        }
    }

    /// True when the intent waits for this decision.
    pub fn requires_decision(self) -> bool {
        matches!(
            self,
            ReviewKind::Approval | ReviewKind::LowAlignment | ReviewKind::VoteTimeout
        )
    }
}

/// One item of the review queue, stored under the intent id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewItem {
    /// The intent to review.
    pub intent_id: String,
    /// Why it is here.
    pub kind: ReviewKind,
    /// True when the intent waits for this decision.
    pub requires_decision: bool,
    /// The intent's type.
    pub intent_type: String,
    /// Who asked.
    pub actor: String,
    /// Tier number.
    pub autonomy_tier: u8,
    /// Mission alignment.
    pub mission_alignment: f64,
    /// Priority.
    pub priority: u8,
    /// The work's parameters.
    pub payload: Value,
    /// The routing reasons.
    pub reasoning: Vec<String>,
    /// When it entered the queue.
    pub created_at: String,
}

impl ReviewItem {
    /// A review item of `kind` for `intent`.
    pub fn new(
        intent: &Intent,
        kind: ReviewKind,
        tier: u8,
        alignment: f64,
        priority: u8,
        reasoning: &[String],
    ) -> Self {
        ReviewItem {
            intent_id: intent.intent_id.clone(),
            kind,
            requires_decision: kind.requires_decision(),
            intent_type: intent.intent_type.clone(),
            actor: intent.actor.clone(),
            autonomy_tier: tier,
            mission_alignment: alignment,
            priority,
            payload: intent.payload.clone(),
            reasoning: reasoning.to_vec(),
            created_at: bulwark_common::time::now(),
        }
    }
}

impl ReviewItem {
    /// A review item of `kind` for an intent already recorded, from its first decision.
    pub fn for_record(record: &IntentRecord, kind: ReviewKind) -> Self {
        let d = &record.decision;
        ReviewItem::new(
            &record.intent,
            kind,
            d.autonomy_tier,
            d.mission_alignment,
            d.priority,
            &d.reasoning,
        )
    }
}

/// A reviewer's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Let it run (or: what ran was fine).
    Approve,
    /// Do not run it (or: what ran should not have).
    Reject,
}

/// A validated `governance.review.decide` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewDecision {
    /// The intent reviewed.
    pub intent_id: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Who decided.
    pub reviewer: String,
    /// Why (may be empty).
    pub reason: String,
}

/// The error code of bad review requests.
pub const INVALID_REVIEW: &str = "invalid_review";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDecision {
    intent_id: String,
    decision: String,
    #[serde(default)]
    reviewer: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

impl ReviewDecision {
    /// Validates a decision request body sent by `sender`; the reviewer is bound to it (see
    /// [`identity`]), `bound` being `governance.bound_identities`.
    pub fn parse(
        body: &[u8],
        max_bytes: usize,
        sender: Sender<'_>,
        bound: &[String],
    ) -> Result<Self, ApiError> {
        let raw: RawDecision = bulwark_common::api::decode(body, INVALID_REVIEW, max_bytes)?;
        let verdict = match raw.decision.as_str() {
            "approve" => Verdict::Approve,
            "reject" => Verdict::Reject,
            other => {
                return Err(ApiError::bad_request(
                    INVALID_REVIEW,
                    format!("decision must be \"approve\" or \"reject\", got {other:?}"),
                ));
            }
        };
        if raw.intent_id.trim().is_empty() {
            return Err(ApiError::bad_request(
                INVALID_REVIEW,
                "intent_id must not be empty",
            ));
        }
        let reviewer = identity::bind(Role::Reviewer, raw.reviewer.as_deref(), sender, bound)?;
        let reviewer = match reviewer {
            None if raw.reviewer.is_none() => {
                return Err(ApiError::bad_request(
                    INVALID_REVIEW,
                    "missing field `reviewer`",
                ));
            }
            Some(r) if !r.trim().is_empty() => r,
            _ => {
                return Err(ApiError::bad_request(
                    INVALID_REVIEW,
                    "reviewer must not be empty",
                ));
            }
        };
        Ok(ReviewDecision {
            intent_id: raw.intent_id,
            verdict,
            reviewer,
            reason: raw.reason.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_match_the_wire() {
        for kind in [
            ReviewKind::Approval,
            ReviewKind::LowAlignment,
            ReviewKind::VoteTimeout,
            ReviewKind::PostExecution,
            ReviewKind::PostHoc,
        ] {
            assert_eq!(serde_json::to_value(kind).expect("json"), kind.as_str());
        }
    }

    #[test]
    fn decisions_validate() {
        let ok = ReviewDecision::parse(
            br#"{"intent_id":"i","decision":"approve","reviewer":"r"}"#,
            1024,
            Sender::Unnamed,
            &[],
        )
        .expect("ok");
        assert_eq!((ok.verdict, ok.reason.as_str()), (Verdict::Approve, ""));
        for (body, needle) in [
            (
                &br#"{"intent_id":"i","decision":"maybe","reviewer":"r"}"#[..],
                "approve\" or \"reject",
            ),
            (
                br#"{"intent_id":"i","decision":"approve","reviewer":""}"#,
                "reviewer must not be empty",
            ),
            (
                br#"{"intent_id":"i","decision":"approve"}"#,
                "missing field `reviewer`",
            ),
            (
                br#"{"intent_id":"i","decision":"approve","reviewer":"r","extra":1}"#,
                "unknown field `extra`",
            ),
            (b"nope", "not valid JSON"),
        ] {
            let err = ReviewDecision::parse(body, 1024, Sender::Unnamed, &[]).expect_err("invalid");
            assert!(
                err.message.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(body),
                err.message
            );
        }
    }
}
