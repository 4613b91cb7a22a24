//! The audit chain, pure: records, their hash, and verification. No I/O.
//!
//! Each narrative becomes one [`AuditRecord`] whose `seq` is its sequence in the `BULWARK_AUDIT`
//! stream (1, 2, 3, ...). Its `hash` is the SHA-256 of the [canonical](canonical_json) JSON of
//! every other field of the record as stored (so `seq`, `prev_hash`, the narrative as received,
//! `valid`, `invalid_reason`, `stored_at`, `subject` and `source_seq` are all covered), and its
//! `prev_hash` is the hash of the record before it ([`GENESIS_HASH`] for the first). Changing,
//! removing, moving or re-inserting a record therefore breaks the chain at that record, which
//! [`verify`] reports.
//!
//! Each record is also **signed**: `sig` is the HMAC-SHA256 of its `hash` under clarity's key
//! ([`crate::key`]), named by `key_id`. The SHA-256 chain alone resists only outsiders: whoever
//! holds the service credentials can rewrite the stream and recompute every hash; without the
//! key, which lives outside JetStream, they cannot sign what they wrote. Each record also names
//! its predecessor's `stored_at` (`prev_stored_at`, signed with it), so a gap at the front of the
//! chain is accepted only when the missing records are old enough to have expired.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::key::AuditKey;

/// Clock difference allowed between clarity's hosts and the server when judging whether a
/// missing record could have expired.
pub const CLOCK_SKEW_MS: u64 = 60_000;

/// The `prev_hash` of the first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One stored narrative, a link of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, equal to the record's sequence in the audit stream.
    pub seq: u64,
    /// `hash` of the record before this one, [`GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// SHA-256 (lowercase hex) of the canonical JSON of every other field.
    pub hash: String,
    /// The narrative exactly as received: its JSON, or its bytes as a string when not JSON.
    pub narrative: Value,
    /// False when the narrative is not JSON or misses a required 5W1H field.
    pub valid: bool,
    /// Why the narrative is not valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    /// When clarity stored it, RFC 3339 UTC.
    pub stored_at: String,
    /// The subject the narrative arrived on (`clarity.narrative.<who>`).
    pub subject: String,
    /// The narrative's sequence in the `BULWARK_NARRATIVES` stream.
    pub source_seq: u64,
    /// `stored_at` of the record before this one (absent for the first record, and on records
    /// written before signing): proves whether a gap at the front of the chain is expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_stored_at: Option<String>,
    /// Id of the key that signed the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// HMAC-SHA256 (hex) of `hash` under the key `key_id`; the one field `hash` does not cover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// The newest record of the chain: where the next one attaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Sequence of the newest record (0 before the first).
    pub seq: u64,
    /// Its hash ([`GENESIS_HASH`] before the first).
    pub hash: String,
    /// Its `stored_at`, when known: the next record names it as `prev_stored_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_at: Option<String>,
}

impl Head {
    /// The head of an empty chain.
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
            stored_at: None,
        }
    }
}

/// A narrative as it arrived, judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Examined {
    /// The narrative as received (a JSON string of the bytes when they are not JSON).
    pub narrative: Value,
    /// `None` when it is a complete 5W1H narrative, else what is wrong.
    pub invalid_reason: Option<String>,
}

/// Judges a narrative's bytes: JSON, an object, and the 5W1H fields with the right types
/// (`who`, `what`, `when`, `where`, `how` strings; `why` a list of strings). Never fails: bad
/// input is kept, flagged.
pub fn examine(payload: &[u8]) -> Examined {
    // Duplicate keys are refused: the chain must hash what every reader of the narrative sees.
    let narrative: Value = match bulwark_common::api::parse_json(payload) {
        Ok(value) => value,
        Err(err) => {
            return Examined {
                narrative: Value::String(String::from_utf8_lossy(payload).into_owned()),
                invalid_reason: Some(format!("not valid JSON: {err}")),
            };
        }
    };
    let invalid_reason = check_5w1h(&narrative).err();
    Examined {
        narrative,
        invalid_reason,
    }
}

fn check_5w1h(narrative: &Value) -> Result<(), String> {
    let Value::Object(map) = narrative else {
        return Err(format!(
            "a narrative must be a JSON object, got {}",
            bulwark_common::api::json_kind(narrative)
        ));
    };
    let mut missing = Vec::new();
    for field in ["who", "what", "when", "where", "how"] {
        match map.get(field) {
            Some(Value::String(s)) if !s.trim().is_empty() => {}
            Some(Value::String(_)) => return Err(format!("field `{field}` is empty")),
            Some(other) => {
                return Err(format!(
                    "field `{field}` must be a string, got {}",
                    bulwark_common::api::json_kind(other)
                ));
            }
            None => missing.push(field),
        }
    }
    match map.get("why") {
        Some(Value::Array(lines)) if lines.iter().all(Value::is_string) => {}
        Some(_) => return Err("field `why` must be a list of strings".into()),
        None => missing.push("why"),
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing required 5W1H field(s): {}",
            missing.join(", ")
        ))
    }
}

/// JSON with object keys sorted (recursively) and no whitespace: the same value always encodes
/// to the same text, whatever order its keys arrived in.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The hash of a stored record's fields: every field except `hash` itself and `sig` (which
/// signs the hash).
pub fn hash_fields(fields: &Map<String, Value>) -> String {
    let mut covered = fields.clone();
    covered.remove("hash");
    covered.remove("sig");
    sha256_hex(canonical_json(&Value::Object(covered)).as_bytes())
}

impl AuditRecord {
    /// The record that follows `head`, with its hash computed and, with a key, signed.
    pub fn next(
        head: &Head,
        examined: Examined,
        stored_at: String,
        subject: String,
        source_seq: u64,
        key: Option<&AuditKey>,
    ) -> Self {
        let mut record = AuditRecord {
            seq: head.seq + 1,
            prev_hash: head.hash.clone(),
            hash: String::new(),
            narrative: examined.narrative,
            valid: examined.invalid_reason.is_none(),
            invalid_reason: examined.invalid_reason,
            stored_at,
            subject,
            source_seq,
            prev_stored_at: key.and(head.stored_at.clone()),
            key_id: key.map(|k| k.id().to_owned()),
            sig: None,
        };
        record.hash = record.computed_hash();
        record.sig = key.map(|k| k.sign(&record.hash));
        record
    }

    /// The hash this record's fields call for.
    pub fn computed_hash(&self) -> String {
        match serde_json::to_value(self) {
            Ok(Value::Object(fields)) => hash_fields(&fields),
            // Serialising a struct of JSON values cannot fail; an empty hash never verifies.
            _ => String::new(),
        }
    }

    /// The head this record makes.
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash.clone(),
            stored_at: Some(self.stored_at.clone()),
        }
    }
}

/// A message of the audit stream as read back: its stream sequence and body.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The message's sequence in the stream.
    pub stream_seq: u64,
    /// Its body, which should be an [`AuditRecord`].
    pub body: Vec<u8>,
}

/// What verification knows besides the records.
#[derive(Debug, Clone, Default)]
pub struct Bounds {
    /// The stream's last sequence: records up to it must be present.
    pub last_seq: u64,
    /// The stream's first sequence.
    pub first_seq: u64,
    /// The retention limit in milliseconds (`clarity.max_age_days`), 0 for none. With a limit
    /// the chain may start at the oldest record still stored, provided its predecessor is old
    /// enough to have expired (its signed `prev_stored_at` says when it was stored).
    pub max_age_ms: u64,
    /// Now, in milliseconds since the epoch: what "old enough" is measured from.
    pub now_ms: i64,
    /// The head clarity recorded separately (KV): the chain must reach it, with that hash.
    pub head: Option<Head>,
    /// The keys records may be signed with, the current one first. Without keys, only unsigned
    /// chains verify; with keys, unsigned records are accepted only before the first signed one
    /// (written before signing began), and a non-empty chain must hold a signed record.
    pub keys: Vec<AuditKey>,
}

/// The newest signed record verified: where the signed part of the chain ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Its sequence.
    pub seq: u64,
    /// When it was stored.
    pub stored_at: String,
    /// The key that signed it.
    pub key_id: String,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VerifyReport {
    /// True when every record is intact and in place.
    pub ok: bool,
    /// Records examined.
    pub records: u64,
    /// The first sequence where the chain is broken (a missing, altered or misplaced record).
    pub first_bad_seq: Option<u64>,
    /// What is wrong at `first_bad_seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Id of the key clarity signs with now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Records whose signature verified.
    #[serde(default)]
    pub signed: u64,
    /// Records without a signature (written before signing began).
    #[serde(default)]
    pub unsigned: u64,
    /// The newest record whose signature verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_signed: Option<Checkpoint>,
}

/// Checks the chain: records must come with consecutive sequences from the start (1, or the
/// oldest surviving one when its predecessor can have expired), each must hash to its `hash`,
/// carry a valid signature (see [`Bounds::keys`]), name its own stream sequence as `seq`, and
/// name its predecessor's hash as `prev_hash`. The chain must reach the stream's last sequence
/// and the separately recorded head. The first break wins.
pub fn verify(records: impl IntoIterator<Item = Stored>, bounds: &Bounds) -> VerifyReport {
    let mut verifier = Verifier::new(bounds.clone());
    for stored in records {
        verifier.push(&stored);
    }
    verifier.finish()
}

/// [`verify`] one record at a time, for chains too long to hold in memory.
#[derive(Debug)]
pub struct Verifier {
    bounds: Bounds,
    count: u64,
    broken: Option<(u64, String)>,
    /// The next sequence expected and the hash it must name; unknown at the start when expiry
    /// is allowed (the oldest surviving record is then the anchor).
    expected: Option<(u64, String)>,
    last_seen: u64,
    first_seen: Option<u64>,
    signed: u64,
    unsigned: u64,
    last_signed: Option<Checkpoint>,
}

impl Verifier {
    /// A verifier of a chain with these bounds.
    pub fn new(bounds: Bounds) -> Self {
        let (expected, last_seen) = if bounds.max_age_ms > 0 {
            (None, bounds.first_seq.saturating_sub(1))
        } else {
            (Some((1, GENESIS_HASH.to_owned())), 0)
        };
        Self {
            bounds,
            count: 0,
            broken: None,
            expected,
            last_seen,
            first_seen: None,
            signed: 0,
            unsigned: 0,
            last_signed: None,
        }
    }

    /// Checks the next record, in stream order.
    pub fn push(&mut self, stored: &Stored) {
        self.count += 1;
        if self.broken.is_some() {
            return;
        }
        let anchor = self.expected.is_none();
        let checked = check_one(stored, self.expected.as_ref(), self.bounds.head.as_ref())
            .and_then(|record| {
                if anchor {
                    self.check_expired_before(&record)?;
                }
                self.check_signature(&record)?;
                Ok(record)
            });
        match checked {
            Ok(record) => {
                self.first_seen.get_or_insert(record.seq);
                self.last_seen = record.seq;
                self.expected = Some((record.seq + 1, record.hash));
            }
            Err(bad) => self.broken = Some(bad),
        }
    }

    /// The oldest surviving record of a chain with a retention limit: its predecessor must be
    /// old enough to have expired. Unsigned (older) records cannot tell, and are accepted.
    fn check_expired_before(&self, record: &AuditRecord) -> Result<(), (u64, String)> {
        if record.seq <= 1 || record.sig.is_none() {
            return Ok(());
        }
        let gone = record.seq - 1;
        let Some(prev) = record.prev_stored_at.as_deref() else {
            return Err((
                gone,
                format!(
                    "chain truncated: record {gone} is gone and record {} does not say when it \
                     was stored, so it cannot have expired",
                    record.seq
                ),
            ));
        };
        let age_ms = bulwark_common::time::parse_ms(prev)
            .map(|at| self.bounds.now_ms.saturating_sub(at).max(0) as u64);
        let limit = self.bounds.max_age_ms.saturating_sub(CLOCK_SKEW_MS);
        match age_ms {
            Some(age) if age >= limit => Ok(()),
            _ => Err((
                gone,
                format!(
                    "chain truncated: record {gone} (stored at {prev}) is gone, but the \
                     retention of {} day(s) cannot have expired it yet",
                    self.bounds.max_age_ms / 86_400_000
                ),
            )),
        }
    }

    /// The record's signature, under the key it names; unsigned records only before the first
    /// signed one.
    fn check_signature(&mut self, record: &AuditRecord) -> Result<(), (u64, String)> {
        let seq = record.seq;
        let Some(sig) = record.sig.as_deref() else {
            if self.last_signed.is_some() {
                return Err((
                    seq,
                    format!(
                        "record {seq} is not signed but follows signed records: it was written \
                         without clarity's key"
                    ),
                ));
            }
            self.unsigned += 1;
            return Ok(());
        };
        let key_id = record.key_id.as_deref().unwrap_or("");
        let Some(key) = self.bounds.keys.iter().find(|k| k.id() == key_id) else {
            return Err((
                seq,
                format!(
                    "record {seq} is signed with key id {key_id:?}, which clarity does not hold \
                     (a retired key missing from clarity.retired_key_files, or a forgery)"
                ),
            ));
        };
        if !key.verifies(&record.hash, sig) {
            return Err((
                seq,
                format!(
                    "record {seq} has a bad signature: it was rewritten without clarity's key \
                     (key id {key_id})"
                ),
            ));
        }
        self.signed += 1;
        self.last_signed = Some(Checkpoint {
            seq,
            stored_at: record.stored_at.clone(),
            key_id: key_id.to_owned(),
        });
        Ok(())
    }

    /// A chain with a retention limit and no record left: the recorded head says when the
    /// newest record was stored, and it must be old enough to have expired.
    fn expired_too_soon(&self) -> Option<(u64, String)> {
        let head = self.bounds.head.as_ref()?;
        if self.count > 0 || self.bounds.max_age_ms == 0 || head.seq == 0 {
            return None;
        }
        let at = head.stored_at.as_deref()?;
        let age = bulwark_common::time::parse_ms(at)
            .map(|ms| self.bounds.now_ms.saturating_sub(ms).max(0) as u64);
        match age {
            Some(age) if age >= self.bounds.max_age_ms.saturating_sub(CLOCK_SKEW_MS) => None,
            _ => Some((
                head.seq,
                format!(
                    "chain truncated: every record is gone, but the newest ({}, stored at {at}) \
                     cannot have expired yet",
                    head.seq
                ),
            )),
        }
    }

    /// The report, once every record was pushed.
    pub fn finish(mut self) -> VerifyReport {
        let last_seen = self.last_seen;
        if self.broken.is_none() {
            if self.bounds.last_seq > last_seen {
                self.broken = Some((
                    last_seen + 1,
                    format!(
                        "record {} is missing: the stream's last sequence is {}",
                        last_seen + 1,
                        self.bounds.last_seq
                    ),
                ));
            } else if let Some(head) = self.bounds.head.as_ref().filter(|h| h.seq > last_seen) {
                self.broken = Some((
                    last_seen + 1,
                    format!(
                        "chain truncated: it ends at {last_seen} but its recorded head is {}",
                        head.seq
                    ),
                ));
            } else if let Some(bad) = self.expired_too_soon() {
                self.broken = Some(bad);
            } else if let Some(first) = self
                .first_seen
                .filter(|_| self.signed == 0 && !self.bounds.keys.is_empty())
            {
                self.broken = Some((
                    first,
                    "no record of the chain is signed: it was rewritten without clarity's key \
                     (or written before signing began and not appended to since)"
                        .into(),
                ));
            }
        }
        VerifyReport {
            ok: self.broken.is_none(),
            records: self.count,
            first_bad_seq: self.broken.as_ref().map(|(seq, _)| *seq),
            reason: self.broken.map(|(_, reason)| reason),
            key_id: self.bounds.keys.first().map(|k| k.id().to_owned()),
            signed: self.signed,
            unsigned: self.unsigned,
            last_signed: self.last_signed,
        }
    }
}

fn check_one(
    stored: &Stored,
    expected: Option<&(u64, String)>,
    head: Option<&Head>,
) -> Result<AuditRecord, (u64, String)> {
    let seq = stored.stream_seq;
    if let Some((want, _)) = expected
        && seq != *want
    {
        let at = seq.min(*want);
        return Err((
            at,
            format!("record {at} is missing or out of order (next stored is {seq})"),
        ));
    }
    let bad = |reason: String| Err((seq, reason));
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&stored.body) else {
        return bad(format!("record {seq} is not a JSON object"));
    };
    let Some(Value::String(hash)) = fields.get("hash") else {
        return bad(format!("record {seq} has no hash"));
    };
    if hash_fields(&fields) != *hash {
        return bad(format!("record {seq} was altered: its hash does not match"));
    }
    let record: AuditRecord = match serde_json::from_value(Value::Object(fields.clone())) {
        Ok(record) => record,
        Err(err) => return bad(format!("record {seq} is not an audit record: {err}")),
    };
    if record.seq != seq {
        return bad(format!(
            "record stored at {seq} claims sequence {}: it was moved or copied",
            record.seq
        ));
    }
    if let Some((_, prev)) = expected
        && record.prev_hash != *prev
    {
        return bad(format!(
            "record {seq} does not follow record {}: prev_hash mismatch",
            seq - 1
        ));
    }
    if let Some(head) = head
        && head.seq == seq
        && head.hash != record.hash
    {
        return bad(format!(
            "record {seq} differs from the recorded head of the chain"
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn narrative(i: u64) -> Value {
        json!({"who": "governance", "what": "intent_routed", "when": "2026-11-26T10:00:00.000Z",
               "where": "governance@test", "why": [format!("reason {i}")], "how": "table",
               "context": {"b": i, "a": [1, {"z": 1, "y": 2}]}, "intent_id": format!("id-{i}")})
    }

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut head = Head::genesis();
        (1..=n)
            .map(|i| {
                let body = serde_json::to_vec(&narrative(i)).expect("json");
                let r = AuditRecord::next(
                    &head,
                    examine(&body),
                    "2026-11-26T10:00:01.000Z".into(),
                    "clarity.narrative.governance".into(),
                    i,
                    None,
                );
                head = r.head();
                r
            })
            .collect()
    }

    fn stored(records: &[AuditRecord]) -> Vec<Stored> {
        records
            .iter()
            .map(|r| Stored {
                stream_seq: r.seq,
                body: serde_json::to_vec(r).expect("json"),
            })
            .collect()
    }

    fn bounds(records: &[Stored], last_seq: u64) -> Bounds {
        Bounds {
            last_seq,
            first_seq: records
                .first()
                .map(|s| s.stream_seq)
                .unwrap_or(last_seq + 1),
            max_age_ms: 0,
            now_ms: 0,
            keys: Vec::new(),
            head: None,
        }
    }

    #[test]
    fn canonical_json_sorts_keys_recursively() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[{"y":1,"x":2}],"c":null}}"#).expect("json");
        let b: Value =
            serde_json::from_str(r#"{"a":{"c":null,"d":[{"x":2,"y":1}]},"b":1}"#).expect("json");
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"c":null,"d":[{"x":2,"y":1}]},"b":1}"#
        );
        assert_eq!(canonical_json(&json!("a\"b")), r#""a\"b""#);
    }

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn examine_flags_bad_input_and_keeps_it() {
        let ok = examine(&serde_json::to_vec(&narrative(1)).expect("json"));
        assert_eq!(ok.invalid_reason, None);
        let not_json = examine(b"hello {");
        assert_eq!(not_json.narrative, json!("hello {"));
        assert!(
            not_json
                .invalid_reason
                .as_deref()
                .is_some_and(|r| r.contains("not valid JSON"))
        );
        let missing = examine(br#"{"who":"x","what":"y"}"#);
        assert_eq!(
            missing.invalid_reason.as_deref(),
            Some("missing required 5W1H field(s): when, where, how, why")
        );
        let wrong =
            examine(br#"{"who":"x","what":"y","when":"t","where":"w","how":"h","why":"one"}"#);
        assert_eq!(
            wrong.invalid_reason.as_deref(),
            Some("field `why` must be a list of strings")
        );
        let array = examine(b"[1]");
        assert!(
            array
                .invalid_reason
                .as_deref()
                .is_some_and(|r| r.contains("an array"))
        );
    }

    #[test]
    fn an_intact_chain_verifies() {
        let records = stored(&chain(5));
        let b = bounds(&records, 5);
        let report = verify(records, &b);
        assert_eq!(
            report,
            VerifyReport {
                ok: true,
                records: 5,
                first_bad_seq: None,
                reason: None,
                unsigned: 5,
                ..VerifyReport::default()
            }
        );
        let empty = verify(Vec::new(), &Bounds::default());
        assert!(empty.ok && empty.records == 0);
    }

    #[test]
    fn an_altered_record_breaks_the_chain_at_it() {
        let mut records = chain(5);
        records[2].narrative["why"] = json!(["a different reason"]);
        let s = stored(&records);
        let b = bounds(&s, 5);
        let report = verify(s, &b);
        assert_eq!(report.first_bad_seq, Some(3));
        assert!(!report.ok);
        assert!(
            report
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("altered"))
        );
        // Flipping the validity flag is an alteration too.
        let mut records = chain(3);
        records[1].valid = false;
        let s = stored(&records);
        let b = bounds(&s, 3);
        assert_eq!(verify(s, &b).first_bad_seq, Some(2));
    }

    #[test]
    fn a_rehashed_forgery_breaks_at_the_next_link() {
        let mut records = chain(5);
        records[2].narrative["what"] = json!("forged");
        records[2].hash = records[2].computed_hash();
        let s = stored(&records);
        let b = bounds(&s, 5);
        assert_eq!(verify(s, &b).first_bad_seq, Some(4));
    }

    #[test]
    fn deleted_reordered_and_copied_records_are_found() {
        let records = chain(5);
        let mut s = stored(&records);
        s.remove(1);
        let b = bounds(&s, 5);
        assert_eq!(verify(s, &b).first_bad_seq, Some(2), "deleted record 2");

        let mut s = stored(&records);
        s.swap(1, 2);
        let b = bounds(&s, 5);
        assert_eq!(verify(s, &b).first_bad_seq, Some(2), "reordered");

        // A copy of record 2 republished at the end of the stream (sequence 6).
        let mut s = stored(&records);
        s.push(Stored {
            stream_seq: 6,
            body: s[1].body.clone(),
        });
        let b = bounds(&s, 6);
        assert_eq!(verify(s, &b).first_bad_seq, Some(6), "copy");

        let mut s = stored(&records);
        s[3].stream_seq = 4;
        s[3].body = b"garbage".to_vec();
        let b = bounds(&s, 5);
        assert_eq!(verify(s, &b).first_bad_seq, Some(4), "garbage");
    }

    #[test]
    fn truncation_is_found_with_the_stream_bounds_or_the_head() {
        let records = chain(5);
        let mut s = stored(&records);
        s.truncate(3);
        let b = bounds(&s, 5);
        assert_eq!(verify(s.clone(), &b).first_bad_seq, Some(4), "tail deleted");
        let b = Bounds {
            last_seq: 3,
            first_seq: 1,
            max_age_ms: 0,
            now_ms: 0,
            keys: Vec::new(),
            head: Some(records[4].head()),
        };
        assert_eq!(verify(s, &b).first_bad_seq, Some(4), "head beyond the end");
        let all_gone = Bounds {
            last_seq: 5,
            first_seq: 6,
            max_age_ms: 0,
            now_ms: 0,
            keys: Vec::new(),
            head: None,
        };
        assert_eq!(verify(Vec::new(), &all_gone).first_bad_seq, Some(1));
    }

    #[test]
    fn expiry_starts_the_chain_at_the_oldest_survivor() {
        let records = chain(6);
        let s: Vec<Stored> = stored(&records).into_iter().skip(2).collect();
        let strict = bounds(&s, 6);
        assert_eq!(verify(s.clone(), &strict).first_bad_seq, Some(1));
        let lenient = Bounds {
            max_age_ms: 1,
            ..strict
        };
        let report = verify(s, &lenient);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records, 4);
        let all_expired = Bounds {
            last_seq: 6,
            first_seq: 7,
            max_age_ms: 1,
            head: Some(records[5].head()),
            ..Bounds::default()
        };
        assert!(verify(Vec::new(), &all_expired).ok);
    }

    /// A signed chain of `n` records stored one hour apart, from `start_ms`.
    fn signed_chain(n: u64, key: &AuditKey, start_ms: i64) -> Vec<AuditRecord> {
        let mut head = Head::genesis();
        (1..=n)
            .map(|i| {
                let body = serde_json::to_vec(&narrative(i)).expect("json");
                let at = start_ms + (i as i64 - 1) * 3_600_000;
                let stored_at = jiff::Timestamp::from_millisecond(at)
                    .expect("time")
                    .to_string();
                let r =
                    AuditRecord::next(&head, examine(&body), stored_at, "s".into(), i, Some(key));
                head = r.head();
                r
            })
            .collect()
    }

    fn keyed(records: &[Stored], last_seq: u64, keys: Vec<AuditKey>) -> Bounds {
        Bounds {
            keys,
            ..bounds(records, last_seq)
        }
    }

    #[test]
    fn a_signed_chain_reports_its_key_and_last_checkpoint() {
        let key = AuditKey::from_secret(vec![1; 32]);
        let records = signed_chain(4, &key, 0);
        let s = stored(&records);
        let report = verify(s.clone(), &keyed(&s, 4, vec![key.clone()]));
        assert!(report.ok, "{report:?}");
        assert_eq!(report.key_id.as_deref(), Some(key.id()));
        assert_eq!((report.signed, report.unsigned), (4, 0));
        let last = report.last_signed.expect("checkpoint");
        assert_eq!(
            (last.seq, last.stored_at.as_str()),
            (4, records[3].stored_at.as_str())
        );
        // A rotated key: the old one kept as retired still verifies what it signed.
        let new = AuditKey::from_secret(vec![2; 32]);
        assert!(verify(s.clone(), &keyed(&s, 4, vec![new.clone(), key])).ok);
        let report = verify(s.clone(), &keyed(&s, 4, vec![new]));
        assert_eq!(report.first_bad_seq, Some(1), "{report:?}");
        assert!(report.reason.is_some_and(|r| r.contains("does not hold")));
    }

    #[test]
    fn a_chain_rewritten_without_the_key_fails_on_its_signature() {
        let key = AuditKey::from_secret(vec![1; 32]);
        let mut records = signed_chain(5, &key, 0);
        // Rewritten from record 3 on, every hash recomputed: only the signatures can tell.
        records[2].narrative["what"] = json!("forged");
        for i in 2..5 {
            if i > 2 {
                records[i].prev_hash = records[i - 1].hash.clone();
            }
            records[i].hash = records[i].computed_hash();
        }
        let s = stored(&records);
        assert!(verify(s.clone(), &bounds(&s, 5)).first_bad_seq.is_some());
        let report = verify(s.clone(), &keyed(&s, 5, vec![key.clone()]));
        assert_eq!(report.first_bad_seq, Some(3), "{report:?}");
        assert!(report.reason.is_some_and(|r| r.contains("bad signature")));
        assert_eq!(report.last_signed.map(|c| c.seq), Some(2));

        // Stripped of signatures and rehashed: unsigned after signed, or nothing signed at all.
        let mut stripped = signed_chain(3, &key, 0);
        stripped[2].sig = None;
        let s = stored(&stripped);
        let report = verify(s.clone(), &keyed(&s, 3, vec![key.clone()]));
        assert_eq!(report.first_bad_seq, Some(3), "{report:?}");
        let unsigned = chain(3);
        let s = stored(&unsigned);
        let report = verify(s.clone(), &keyed(&s, 3, vec![key.clone()]));
        assert_eq!(report.first_bad_seq, Some(1), "{report:?}");
        assert!(
            report
                .reason
                .is_some_and(|r| r.contains("no record of the chain is signed"))
        );
    }

    #[test]
    fn records_before_signing_began_are_accepted_and_counted() {
        let key = AuditKey::from_secret(vec![1; 32]);
        let mut records = chain(2);
        let mut head = records[1].head();
        let body = serde_json::to_vec(&narrative(3)).expect("json");
        let r = AuditRecord::next(&head, examine(&body), "t".into(), "s".into(), 3, Some(&key));
        head = r.head();
        records.push(r);
        let s = stored(&records);
        let report = verify(
            s.clone(),
            &Bounds {
                head: Some(head),
                ..keyed(&s, 3, vec![key])
            },
        );
        assert!(report.ok, "{report:?}");
        assert_eq!((report.signed, report.unsigned), (1, 2));
    }

    #[test]
    fn a_gap_at_the_front_is_expiry_only_when_old_enough() {
        let key = AuditKey::from_secret(vec![1; 32]);
        let day = 86_400_000i64;
        // Records 1..=6 stored an hour apart from t0; 1 and 2 are gone.
        let records = signed_chain(6, &key, 0);
        let s: Vec<Stored> = stored(&records).into_iter().skip(2).collect();
        let at = |now_ms: i64| Bounds {
            max_age_ms: day as u64,
            now_ms,
            ..keyed(&s, 6, vec![key.clone()])
        };
        // Record 2 was stored at 1 h; a day later it may have expired.
        let report = verify(s.clone(), &at(day + 3_600_000));
        assert!(report.ok, "{report:?}");
        // Two hours after t0, with one day of retention, nothing can have expired: truncated.
        let report = verify(s.clone(), &at(2 * 3_600_000));
        assert_eq!(report.first_bad_seq, Some(2), "{report:?}");
        assert!(report.reason.is_some_and(|r| r.contains("truncated")));
        // Every record gone: the recorded head says when the newest was stored.
        let gone = |now_ms: i64| Bounds {
            head: Some(records[5].head()),
            first_seq: 7,
            ..at(now_ms)
        };
        assert!(verify(Vec::new(), &gone(2 * day)).ok);
        let report = verify(Vec::new(), &gone(6 * 3_600_000));
        assert_eq!(report.first_bad_seq, Some(6), "{report:?}");
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[a-z\"\\\\ é]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-z]{1,4}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn canonical_json_survives_a_round_trip_and_key_order(value in json_value()) {
            let text = serde_json::to_string(&value).expect("json");
            let back: Value = serde_json::from_str(&text).expect("parses");
            prop_assert_eq!(canonical_json(&back), canonical_json(&value));
            let reparsed: Value = serde_json::from_str(&canonical_json(&value)).expect("canonical is JSON");
            prop_assert_eq!(reparsed, value);
        }

        #[test]
        fn any_chain_verifies_and_any_single_change_is_caught(
            contexts in prop::collection::vec(json_value(), 1..8),
            victim in any::<prop::sample::Index>(),
            change in 0u8..3,
        ) {
            let mut head = Head::genesis();
            let mut records = Vec::new();
            for (i, ctx) in contexts.iter().enumerate() {
                let mut n = narrative(i as u64);
                n["context"] = ctx.clone();
                let body = serde_json::to_vec(&n).expect("json");
                let r = AuditRecord::next(&head, examine(&body), "t".into(), "s".into(), i as u64, None);
                head = r.head();
                records.push(r);
            }
            let n = records.len() as u64;
            let s = stored(&records);
            let b = bounds(&s, n);
            prop_assert!(verify(s, &b).ok);

            let at = victim.index(records.len());
            let mut s = stored(&records);
            match change {
                0 => { s.remove(at); }
                1 => {
                    let mut r = records[at].clone();
                    r.narrative["what"] = json!("tampered");
                    s[at].body = serde_json::to_vec(&r).expect("json");
                }
                _ => {
                    let mut r = records[at].clone();
                    r.stored_at = "later".into();
                    r.hash = r.computed_hash();
                    s[at].body = serde_json::to_vec(&r).expect("json");
                }
            }
            // The head is recorded separately, so even a rehashed last record is caught.
            let b = Bounds { head: Some(head.clone()), ..bounds(&s, n) };
            let report = verify(s, &b);
            prop_assert!(!report.ok);
            let seq = at as u64 + 1;
            // A rehashed record passes its own check and breaks the link to its successor.
            let expected = if change == 2 && seq < n { seq + 1 } else { seq };
            prop_assert_eq!(report.first_bad_seq, Some(expected));
        }
    }
}
