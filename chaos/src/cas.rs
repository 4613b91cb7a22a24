//! The `concurrent_writes` injection and its history checker (JEPSEN04): `writers` concurrent
//! writers append their operation ids to shared records of a KV bucket created like bulwark's
//! own (`bulwark_chaos_cas`: file storage, history 1, the configured replicas), with
//! [`bulwark_common::kv::update`] (compare-and-set on the revision read, retried on conflict),
//! the helper intent records, votes and the breaker state are written with. With `cas = false`
//! the writers read, modify and put blindly instead (the safeguard disabled).
//!
//! The check, per key, on the final record (its `ops` list is the order the writes took effect):
//! every acknowledged operation is in it exactly once (no lost update, no duplicate), the counter
//! equals the list's length, and the order respects real time (an operation that completed
//! before another began comes first): the history is linearizable. Narrated on
//! `clarity.narrative.chaos_checker`: `cas_conflicts` (when writers collided: `context.conflicts`)
//! and `kv_history_checked` (`context.linearizable`, `lost`, `duplicated`, `order_violations`,
//! `acked`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bulwark_common::kv::{self, Change};
use bulwark_common::{streams, subjects, time};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::target::Target;

/// The bucket the writers share.
pub const CAS_BUCKET: &str = "bulwark_chaos_cas";

/// What the writers do.
#[derive(Debug, Clone, Copy)]
pub struct WritePlan {
    /// Concurrent writers.
    pub writers: u64,
    /// Records they share.
    pub keys: u64,
    /// Updates per writer.
    pub ops_per_writer: u64,
    /// Compare-and-set (true) or blind read-modify-put (false).
    pub cas: bool,
}

/// One shared record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// Updates applied.
    pub counter: u64,
    /// Operation ids, in the order they took effect.
    pub ops: Vec<String>,
}

/// One operation as the writer saw it.
#[derive(Debug, Clone)]
pub struct Op {
    /// `w<writer>-<n>`.
    pub id: String,
    /// The record.
    pub key: String,
    /// When it was invoked.
    pub start: Instant,
    /// When it was acknowledged (None: failed or unknown).
    pub end: Option<Instant>,
}

/// The checker's verdict for all keys.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HistoryCheck {
    /// Operations acknowledged.
    pub acked: u64,
    /// Acknowledged and missing from the final record.
    pub lost: u64,
    /// Present more than once.
    pub duplicated: u64,
    /// In a record, never sent.
    pub unexpected: u64,
    /// Pairs where an operation that completed before another began comes after it.
    pub order_violations: u64,
    /// Records whose counter is not the length of their list.
    pub counter_mismatches: u64,
    /// Examples of what went wrong.
    pub examples: Vec<String>,
}

impl HistoryCheck {
    /// True when nothing is wrong.
    pub fn linearizable(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.order_violations == 0
            && self.counter_mismatches == 0
    }
}

/// Checks the history `ops` against the final `records`.
pub fn check(ops: &[Op], records: &HashMap<String, Record>) -> HistoryCheck {
    let mut out = HistoryCheck::default();
    let by_id: HashMap<&str, &Op> = ops.iter().map(|o| (o.id.as_str(), o)).collect();
    let note = |out: &mut HistoryCheck, s: String| {
        if out.examples.len() < 10 {
            out.examples.push(s);
        }
    };
    for (key, record) in records {
        if record.counter != record.ops.len() as u64 {
            out.counter_mismatches += 1;
            note(
                &mut out,
                format!(
                    "{key}: counter {} but {} ops",
                    record.counter,
                    record.ops.len()
                ),
            );
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for id in &record.ops {
            *seen.entry(id.as_str()).or_default() += 1;
            if !by_id.contains_key(id.as_str()) {
                out.unexpected += 1;
                note(&mut out, format!("{key}: {id} was never sent"));
            }
        }
        for (id, n) in &seen {
            if *n > 1 {
                out.duplicated += 1;
                note(&mut out, format!("{key}: {id} applied {n} times"));
            }
        }
        // Real-time order: for i < j, ops[j] must not have completed before ops[i] began.
        let placed: Vec<&Op> = record
            .ops
            .iter()
            .filter_map(|id| by_id.get(id.as_str()).copied())
            .collect();
        for (i, a) in placed.iter().enumerate() {
            for b in &placed[i + 1..] {
                if let Some(b_end) = b.end
                    && b_end < a.start
                {
                    out.order_violations += 1;
                    note(
                        &mut out,
                        format!(
                            "{key}: {} took effect after {}, which completed before it began",
                            a.id, b.id
                        ),
                    );
                }
            }
        }
    }
    for op in ops.iter().filter(|o| o.end.is_some()) {
        out.acked += 1;
        let present = records.get(&op.key).is_some_and(|r| r.ops.contains(&op.id));
        if !present {
            out.lost += 1;
            note(
                &mut out,
                format!("{}: {} acknowledged, not in the record", op.key, op.id),
            );
        }
    }
    out
}

async fn narrate(target: &Target, what: &str, why: &str, context: Value) {
    let body = json!({
        "who": "chaos_checker", "what": what, "when": time::now(), "where": "bulwark-chaos",
        "why": [why], "how": "final records against the writers' history", "context": context,
    });
    if let Ok(ack) = target
        .js
        .publish(
            subjects::narrative("chaos_checker"),
            body.to_string().into(),
        )
        .await
    {
        let _ = ack.await;
    }
}

/// Runs the writers, then the checker; returns the figures.
pub async fn run(target: &Target, run_id: &str, plan: WritePlan) -> anyhow::Result<Value> {
    let store = streams::bucket(&target.js, CAS_BUCKET, "chaos: JEPSEN04 shared records")
        .await
        .context("the shared bucket")?;
    let keys: Vec<String> = (0..plan.keys)
        .map(|k| format!("{}.rec{k}", run_id.replace(['.', '*', '>', ' '], "_")))
        .collect();
    for key in &keys {
        let body = serde_json::to_vec(&Record::default())?;
        store
            .put(key, body.into())
            .await
            .context("creating a record")?;
    }
    let history = Arc::new(Mutex::new(Vec::<Op>::new()));
    let conflicts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let contended = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..plan.writers {
        let store = store.clone();
        let keys = keys.clone();
        let history = history.clone();
        let conflicts = conflicts.clone();
        let errors = errors.clone();
        let contended = contended.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..plan.ops_per_writer {
                let key = keys[((w + n) % keys.len() as u64) as usize].clone();
                let id = format!("w{w}-{n}");
                let start = Instant::now();
                let ok = if plan.cas {
                    // A client retries an update the helper gave up on (`Contended`: every
                    // attempt was refused, so nothing was written) after a short pause.
                    let mut ok = false;
                    for retry in 0..20u64 {
                        let mut attempts = 0u64;
                        let result = kv::update(&store, &key, |r: &mut Record| {
                            attempts += 1;
                            r.counter += 1;
                            r.ops.push(id.clone());
                            Ok::<_, std::convert::Infallible>(Change::Write(()))
                        })
                        .await;
                        conflicts.fetch_add(
                            attempts.saturating_sub(1),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        match result {
                            Ok(Ok(_)) => {
                                ok = true;
                                break;
                            }
                            Err(kv::KvError::Contended(_)) => {
                                contended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let jitter = (w * 7 + n * 13 + retry * 5) % 10 + 1;
                                tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
                            }
                            _ => break,
                        }
                    }
                    ok
                } else {
                    blind_update(&store, &key, &id).await
                };
                if !ok {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let end = ok.then(Instant::now);
                history.lock().await.push(Op {
                    id,
                    key,
                    start,
                    end,
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut records = HashMap::new();
    for key in &keys {
        let value = kv::read::<Record>(&store, key)
            .await?
            .map(|v| v.value)
            .unwrap_or_default();
        records.insert(key.clone(), value);
    }
    let ops = history.lock().await.clone();
    let result = check(&ops, &records);
    let conflicts = conflicts.load(std::sync::atomic::Ordering::Relaxed);
    let contended = contended.load(std::sync::atomic::Ordering::Relaxed);
    if conflicts > 0 {
        narrate(
            target,
            "cas_conflicts",
            "writers collided; compare-and-set refused the stale writes and they retried",
            json!({"conflicts": conflicts, "contended": contended,
                   "writers": plan.writers, "keys": plan.keys}),
        )
        .await;
    }
    let lin = result.linearizable();
    narrate(
        target,
        "kv_history_checked",
        "every acknowledged update once, in an order that respects real time",
        json!({"linearizable": lin, "acked": result.acked, "lost": result.lost,
               "duplicated": result.duplicated, "unexpected": result.unexpected,
               "order_violations": result.order_violations,
               "counter_mismatches": result.counter_mismatches,
               "examples": result.examples, "cas": plan.cas}),
    )
    .await;
    for key in &keys {
        let _ = store.purge(key).await;
    }
    Ok(json!({
        "writers": plan.writers, "keys": plan.keys, "ops_per_writer": plan.ops_per_writer,
        "cas": plan.cas, "conflicts": conflicts, "contended": contended,
        "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
        "updates_per_s": (ops.len() as f64 / elapsed.max(1e-9)).round(),
        "check": result, "linearizable": lin,
    }))
}

/// Read, modify, put without naming the revision: the lost-update bug CAS prevents.
async fn blind_update(store: &async_nats::jetstream::kv::Store, key: &str, id: &str) -> bool {
    let Ok(Some(mut current)) = kv::read::<Record>(store, key)
        .await
        .map(|v| v.map(|v| v.value))
    else {
        return false;
    };
    current.counter += 1;
    current.ops.push(id.to_owned());
    let Ok(body) = serde_json::to_vec(&current) else {
        return false;
    };
    store.put(key, body.into()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn op(id: &str, key: &str, t0: Instant, start_ms: u64, end_ms: Option<u64>) -> Op {
        Op {
            id: id.into(),
            key: key.into(),
            start: t0 + Duration::from_millis(start_ms),
            end: end_ms.map(|e| t0 + Duration::from_millis(e)),
        }
    }

    fn rec(ops: &[&str]) -> Record {
        Record {
            counter: ops.len() as u64,
            ops: ops.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_clean_concurrent_history_is_linearizable() {
        let t0 = Instant::now();
        // a and b overlap: either order is fine.
        let ops = [op("a", "k", t0, 0, Some(10)), op("b", "k", t0, 5, Some(12))];
        let records = HashMap::from([("k".to_owned(), rec(&["b", "a"]))]);
        let c = check(&ops, &records);
        assert!(c.linearizable(), "{c:?}");
        assert_eq!(c.acked, 2);
    }

    #[test]
    fn lost_duplicated_unexpected_and_reordered_are_found() {
        let t0 = Instant::now();
        let ops = [
            op("a", "k", t0, 0, Some(1)),
            op("b", "k", t0, 2, Some(3)),
            op("c", "k", t0, 4, Some(5)),
            op("d", "k", t0, 6, None),
        ];
        // c lost; a twice; x never sent; b (done at 3) placed after... a's second copy is fine,
        // but "b" before "a" is a real-time violation (a completed at 1 before b began at 2).
        let mut r = rec(&["b", "a", "a", "x"]);
        r.counter = 7;
        let records = HashMap::from([("k".to_owned(), r)]);
        let c = check(&ops, &records);
        assert_eq!(c.lost, 1, "{c:?}");
        assert_eq!(c.duplicated, 1, "{c:?}");
        assert_eq!(c.unexpected, 1, "{c:?}");
        assert!(c.order_violations >= 1, "{c:?}");
        assert_eq!(c.counter_mismatches, 1, "{c:?}");
        assert!(!c.linearizable());
    }
}
