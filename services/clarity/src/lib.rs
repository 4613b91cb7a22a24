//! The clarity service: stores every 5W1H narrative durably, in order, hash-chained, and
//! answers questions about them (CONTRACT section 4).
//!
//! Each narrative read from the `BULWARK_NARRATIVES` stream becomes one audit record in the
//! `BULWARK_AUDIT` stream: its sequence, the hash of the record before it, the narrative as
//! received, its own SHA-256 hash and that hash's HMAC under clarity's key, kept in a file
//! outside JetStream (see [`chain`] and [`key`]). A narrative is acknowledged only once its
//! record is stored, so none is lost when clarity stops or crashes. A narrative that is not JSON
//! or misses a 5W1H field is stored all the same, flagged `valid: false` with the reason, and
//! counted. Several instances may run at once: they share one durable consumer and append with
//! an expected-last-sequence check, so the chain never forks and holds every narrative once.
//!
//! # Subjects
//! Consumes:
//! - `clarity.narrative.>`, through the durable pull consumer `clarity` of `BULWARK_NARRATIVES`.
//! - `clarity.query` (NATS micro service `clarity`, queue group `q`): `{who?, what?, intent_id?,
//!   correlation_id?, since?, limit?}`, replied with `{"items": [...]}`, newest last. The query
//!   scans the newest `clarity.query_max_scan` records of the audit stream; there is no index
//!   yet, so older narratives are not found by a query (they stay in the chain).
//! - `clarity.verify` (same service, permits of its own): `{}`, replied with `{"ok", "records",
//!   "first_bad_seq", "key_id", "signed", "unsigned", "last_signed"}` (and `reason` when
//!   broken). Reads the whole chain and checks every record's signature.
//!
//! Produces:
//! - `clarity.audit`: the audit records (JetStream stream `BULWARK_AUDIT`, retention
//!   `clarity.max_age_days`), and the chain's head `{seq, hash}` in KV bucket `bulwark_audit_head`.
//! - `telemetry.clarity`: counters every `telemetry.interval_s`.
//!
//! # Modules
//! - [`chain`]: audit records, the canonical hash and verification (pure).
//! - [`key`]: the signing key (HMAC-SHA256), kept in a file outside JetStream.
//! - [`query`]: query parsing and matching (pure).
//! - [`service`]: the consumer and the endpoints around them.

pub mod chain;
pub mod key;
pub mod query;
pub mod service;

pub use service::{ClarityError, Counters, run};
