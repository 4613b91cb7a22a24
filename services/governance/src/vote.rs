//! The unified logic vote on tier 3 intents: proposals, the rules of casting a vote, the tally.
//!
//! Rules: only configured voters vote; the intent's own actor may not; each voter counts once;
//! `quorum` approvals approve, `quorum` rejections reject; a proposal past its deadline takes no
//! more votes and is escalated to human review by the sweeper.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use bulwark_common::api::ApiError;

use crate::identity::{self, Role, Sender};

/// The error code of bad vote requests.
pub const INVALID_VOTE: &str = "invalid_vote";

/// Where a proposal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProposalState {
    /// Taking votes.
    Open,
    /// Reached the approving quorum.
    Approved,
    /// Reached the rejecting quorum.
    Rejected,
    /// Reached no quorum before its deadline.
    Expired,
}

/// One vote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ballot {
    /// The voter.
    pub voter: String,
    /// Approve or reject.
    pub vote: Choice,
    /// The voter's reason.
    pub reason: String,
    /// When it was cast.
    pub at: String,
}

/// A voter's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    /// For.
    Approve,
    /// Against.
    Reject,
}

/// A proposal: a tier 3 intent waiting for its quorum. Stored under the intent id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// Equal to the intent id.
    pub proposal_id: String,
    /// The intent voted on.
    pub intent_id: String,
    /// Its type.
    pub intent_type: String,
    /// Who asked (may not vote).
    pub actor: String,
    /// The work's parameters.
    pub payload: Value,
    /// Mission alignment.
    pub mission_alignment: f64,
    /// Priority it will be queued with.
    pub priority: u8,
    /// The routing reasons.
    pub reasoning: Vec<String>,
    /// Who may vote.
    pub voters: Vec<String>,
    /// Votes needed.
    pub quorum: usize,
    /// Votes cast.
    pub votes: Vec<Ballot>,
    /// Where it stands.
    pub state: ProposalState,
    /// When it opened.
    pub opened_at: String,
    /// Deadline, RFC 3339.
    pub deadline: String,
    /// Deadline in milliseconds since the epoch.
    pub deadline_ms: i64,
}

/// The reply of `unified_logic.vote`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// The proposal.
    pub proposal_id: String,
    /// The intent.
    pub intent_id: String,
    /// Where it stands after this vote.
    pub state: ProposalState,
    /// Approving votes.
    pub approvals: usize,
    /// Rejecting votes.
    pub rejections: usize,
    /// Votes needed.
    pub quorum: usize,
    /// Who may vote.
    pub voters: Vec<String>,
    /// Every vote cast.
    pub votes: Vec<Ballot>,
    /// Deadline, RFC 3339.
    pub deadline: String,
}

impl Proposal {
    /// Approving and rejecting votes.
    pub fn counts(&self) -> (usize, usize) {
        let approvals = self
            .votes
            .iter()
            .filter(|b| b.vote == Choice::Approve)
            .count();
        (approvals, self.votes.len() - approvals)
    }

    /// The tally as replied to voters.
    pub fn tally(&self) -> Tally {
        let (approvals, rejections) = self.counts();
        Tally {
            proposal_id: self.proposal_id.clone(),
            intent_id: self.intent_id.clone(),
            state: self.state,
            approvals,
            rejections,
            quorum: self.quorum,
            voters: self.voters.clone(),
            votes: self.votes.clone(),
            deadline: self.deadline.clone(),
        }
    }

    /// Casts `ballot` at `now_ms`, applying every rule; on success the state reflects the tally.
    pub fn cast(&mut self, ballot: Ballot, now_ms: i64) -> Result<ProposalState, ApiError> {
        if self.state != ProposalState::Open {
            return Err(ApiError::conflict(
                "proposal_closed",
                format!("proposal {} is closed ({:?})", self.proposal_id, self.state)
                    .to_lowercase(),
            ));
        }
        if now_ms >= self.deadline_ms {
            return Err(ApiError::conflict(
                "proposal_closed",
                format!(
                    "proposal {} passed its deadline {}",
                    self.proposal_id, self.deadline
                ),
            ));
        }
        if !self.voters.contains(&ballot.voter) {
            return Err(ApiError::forbidden(
                "not_a_voter",
                format!(
                    "{:?} is not a voter; voters are {}",
                    ballot.voter,
                    self.voters.join(", ")
                ),
            ));
        }
        if ballot.voter == self.actor {
            return Err(ApiError::forbidden(
                "self_vote",
                format!(
                    "{:?} submitted intent {} and cannot vote on it",
                    ballot.voter, self.intent_id
                ),
            ));
        }
        if self.votes.iter().any(|b| b.voter == ballot.voter) {
            return Err(ApiError::conflict(
                "duplicate_vote",
                format!(
                    "{:?} already voted on proposal {}",
                    ballot.voter, self.proposal_id
                ),
            ));
        }
        self.votes.push(ballot);
        let (approvals, rejections) = self.counts();
        if approvals >= self.quorum {
            self.state = ProposalState::Approved;
        } else if rejections >= self.quorum {
            self.state = ProposalState::Rejected;
        }
        Ok(self.state)
    }
}

/// A validated `unified_logic.vote` request.
#[derive(Debug, Clone, PartialEq)]
pub struct VoteRequest {
    /// The proposal voted on.
    pub proposal_id: String,
    /// The ballot.
    pub ballot: Ballot,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVote {
    proposal_id: String,
    #[serde(default)]
    voter: Option<String>,
    vote: String,
    #[serde(default)]
    reason: Option<String>,
}

impl VoteRequest {
    /// Validates a vote request body sent by `sender`; the voter is bound to it (see
    /// [`identity`]), `bound` being `governance.bound_identities`.
    pub fn parse(
        body: &[u8],
        max_bytes: usize,
        sender: Sender<'_>,
        bound: &[String],
    ) -> Result<Self, ApiError> {
        let raw: RawVote = bulwark_common::api::decode(body, INVALID_VOTE, max_bytes)?;
        let vote = match raw.vote.as_str() {
            "approve" => Choice::Approve,
            "reject" => Choice::Reject,
            other => {
                return Err(ApiError::bad_request(
                    INVALID_VOTE,
                    format!("vote must be \"approve\" or \"reject\", got {other:?}"),
                ));
            }
        };
        if raw.proposal_id.trim().is_empty() {
            return Err(ApiError::bad_request(
                INVALID_VOTE,
                "proposal_id must not be empty",
            ));
        }
        let voter = match identity::bind(Role::Voter, raw.voter.as_deref(), sender, bound)? {
            None if raw.voter.is_none() => {
                return Err(ApiError::bad_request(INVALID_VOTE, "missing field `voter`"));
            }
            Some(v) if !v.trim().is_empty() => v,
            _ => {
                return Err(ApiError::bad_request(
                    INVALID_VOTE,
                    "voter must not be empty",
                ));
            }
        };
        Ok(VoteRequest {
            proposal_id: raw.proposal_id,
            ballot: Ballot {
                voter,
                vote,
                reason: raw.reason.unwrap_or_default(),
                at: bulwark_common::time::now(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal() -> Proposal {
        Proposal {
            proposal_id: "p".into(),
            intent_id: "p".into(),
            intent_type: "self_improve".into(),
            actor: "architect".into(),
            payload: Value::Null,
            mission_alignment: 0.9,
            priority: 5,
            reasoning: vec![],
            voters: vec![
                "architect".into(),
                "guardian".into(),
                "steward".into(),
                "sage".into(),
            ],
            quorum: 2,
            votes: vec![],
            state: ProposalState::Open,
            opened_at: String::new(),
            deadline: "later".into(),
            deadline_ms: 1_000,
        }
    }

    fn ballot(voter: &str, vote: Choice) -> Ballot {
        Ballot {
            voter: voter.into(),
            vote,
            reason: String::new(),
            at: String::new(),
        }
    }

    #[test]
    fn quorum_of_approvals_approves() {
        let mut p = proposal();
        assert_eq!(
            p.cast(ballot("guardian", Choice::Approve), 0).expect("ok"),
            ProposalState::Open
        );
        assert_eq!(
            p.cast(ballot("steward", Choice::Approve), 0).expect("ok"),
            ProposalState::Approved
        );
        assert_eq!(
            p.cast(ballot("sage", Choice::Approve), 0)
                .expect_err("closed")
                .code,
            "proposal_closed"
        );
    }

    #[test]
    fn quorum_of_rejections_rejects() {
        let mut p = proposal();
        p.cast(ballot("guardian", Choice::Reject), 0).expect("ok");
        p.cast(ballot("steward", Choice::Approve), 0).expect("ok");
        assert_eq!(
            p.cast(ballot("sage", Choice::Reject), 0).expect("ok"),
            ProposalState::Rejected
        );
        assert_eq!(p.tally().approvals, 1);
        assert_eq!(p.tally().rejections, 2);
    }

    #[test]
    fn rules_are_enforced() {
        let mut p = proposal();
        assert_eq!(
            p.cast(ballot("architect", Choice::Approve), 0)
                .expect_err("self")
                .code,
            "self_vote"
        );
        assert_eq!(
            p.cast(ballot("mallory", Choice::Approve), 0)
                .expect_err("outsider")
                .code,
            "not_a_voter"
        );
        p.cast(ballot("guardian", Choice::Approve), 0).expect("ok");
        assert_eq!(
            p.cast(ballot("guardian", Choice::Approve), 0)
                .expect_err("twice")
                .code,
            "duplicate_vote"
        );
        assert_eq!(
            p.cast(ballot("steward", Choice::Approve), 1_000)
                .expect_err("late")
                .code,
            "proposal_closed"
        );
        assert_eq!(p.votes.len(), 1, "refused votes are not counted");
    }

    #[test]
    fn requests_validate() {
        let ok = VoteRequest::parse(
            br#"{"proposal_id":"p","voter":"v","vote":"reject","reason":"no"}"#,
            1024,
            Sender::Unnamed,
            &[],
        )
        .expect("ok");
        assert_eq!(ok.ballot.vote, Choice::Reject);
        let err = VoteRequest::parse(
            br#"{"proposal_id":"p","voter":"v","vote":"yes"}"#,
            1024,
            Sender::Unnamed,
            &[],
        )
        .expect_err("bad");
        assert_eq!(err.code, INVALID_VOTE);
        let err = VoteRequest::parse(
            br#"{"proposal_id":"p","vote":"approve"}"#,
            1024,
            Sender::Unnamed,
            &[],
        )
        .expect_err("bad");
        assert!(err.message.contains("voter"), "{}", err.message);
    }
}
