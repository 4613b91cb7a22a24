//! The governance service: decides whether each intent may run.
//!
//! Every intent gets an autonomy tier from the configured table, a mission alignment from the
//! charter, and a route: human review (tier 0), execute with a review record (tier 1), direct
//! execution (tier 2), the unified logic vote (tier 3), or the emergency path (tier 4). Nothing is
//! answered before it is durable: the intent record is in the `bulwark_intents` bucket and its
//! task in the `BULWARK_TASKS` queue (or its review item / proposal in their buckets) before the
//! reply goes out. A resubmitted `intent_id` gets the first decision back and never runs twice.
//!
//! # Subjects
//! Consumes (NATS micro service `governance`, queue group `q`, so replicas share the load):
//! - `htm.intent.submit`: an intent, replied with the [`Decision`](bulwark_common::intent::Decision).
//! - `htm.intent.status`: `{"intent_id"}`, replied with the status and history.
//! - `governance.review.pending`, `governance.review.decide`: the human review queue.
//! - `unified_logic.vote`, `unified_logic.proposals`: votes on tier 3 intents, open proposals.
//! - `htm.intent.submit.<name>`, `governance.review.decide.<name>`, `unified_logic.vote.<name>`:
//!   the same requests from a named NATS identity, which the actor, reviewer or voter is bound
//!   to ([`identity`]).
//!
//! Produces:
//! - `htm.task.queue.<priority>`: the tasks of approved intents (JetStream, deduplicated by id).
//! - `unified_logic.proposal.<intent_id>`: the announcement of each tier 3 proposal.
//! - `clarity.narrative.governance`: a 5W1H narrative for every decision and refusal.
//! - `telemetry.governance`: counters every `telemetry.interval_s`.
//!
//! # Modules
//! - [`identity`]: binding the actor, reviewer and voter to the sending NATS identity.
//! - [`routing`]: the pure tier and alignment decision.
//! - [`review`]: review items and decisions.
//! - [`vote`]: proposals, the voting rules and the tally.
//! - [`reconcile`]: the ledger of intent records left waiting, for the stranded-intent
//!   reconciler (a record whose task, review item or proposal was never written is completed, or
//!   failed clearly, within `governance.reconcile.window_s`).
//! - [`retention`]: finished records expire after their retention.
//! - [`service`]: the endpoints and the vote-deadline sweeper around them.

pub mod identity;
pub mod reconcile;
pub mod retention;
pub mod review;
pub mod routing;
pub mod service;
pub mod vote;

pub use service::{Counters, GovernanceError, run};
