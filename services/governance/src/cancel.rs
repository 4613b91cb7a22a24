//! Cancellation of an intent (`htm.intent.cancel`, docs/actions.md#cancellation): who may
//! cancel which intent, and from which status. Pure decisions; the service applies them.

use bulwark_common::api::ApiError;
use bulwark_common::identity::Sender;
use bulwark_common::intent::{IntentRecord, IntentStatus};

/// 403: the sender neither submitted the intent nor is an operator.
pub const NOT_YOUR_INTENT: &str = "not_your_intent";
/// 409: the intent already finished (completed, failed, rejected or cancelled).
pub const ALREADY_FINISHED: &str = "already_finished";

/// A cancellation request.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The intent to cancel.
    pub intent_id: String,
    /// Why, recorded in the intent's history (optional, at most 256 bytes kept).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Whether `from` may cancel `record`: bulwark's own services and the `privileged` identities
/// (the operators) may cancel any intent; anyone else only an intent its own NATS user
/// submitted (`submitted_by`).
pub fn may_cancel(
    record: &IntentRecord,
    from: &Sender,
    privileged: &[String],
) -> Result<(), ApiError> {
    match from.user() {
        None => Ok(()),
        Some(user) if privileged.iter().any(|p| p == user) => Ok(()),
        Some(user) if record.submitted_by.as_deref() == Some(user) => Ok(()),
        Some(user) => Err(ApiError::forbidden(
            NOT_YOUR_INTENT,
            format!(
                "{user} did not submit intent {} and is not an operator: it may not cancel it",
                record.intent.intent_id
            ),
        )),
    }
}

/// Whether an intent in `status` can still be cancelled: `Err` is the 409.
pub fn cancellable(intent_id: &str, status: IntentStatus) -> Result<(), ApiError> {
    match status {
        IntentStatus::Completed
        | IntentStatus::Failed
        | IntentStatus::Rejected
        | IntentStatus::Cancelled => Err(ApiError::conflict(
            ALREADY_FINISHED,
            format!(
                "intent {intent_id} is {} already: nothing to cancel",
                status.as_str()
            ),
        )),
        IntentStatus::PendingReview
        | IntentStatus::PendingVote
        | IntentStatus::Queued
        | IntentStatus::Dispatched
        | IntentStatus::Running
        | IntentStatus::Shed => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_intents_are_not_cancellable() {
        for s in [
            IntentStatus::Completed,
            IntentStatus::Failed,
            IntentStatus::Rejected,
            IntentStatus::Cancelled,
        ] {
            assert_eq!(cancellable("i", s).map_err(|e| e.status), Err(409));
        }
        for s in [
            IntentStatus::Queued,
            IntentStatus::Running,
            IntentStatus::PendingReview,
        ] {
            assert!(cancellable("i", s).is_ok());
        }
    }
}
