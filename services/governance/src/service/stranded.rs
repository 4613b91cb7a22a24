//! The reconciler of stranded intents: follows every write of the intents bucket (an ordered
//! consumer on its stream, from `window_s` ago at start), keeps the waiting ones in a
//! [`Ledger`], and on every tick checks those past their grace: their task, review item or
//! proposal is written again when missing ([`Governance::redrive`], idempotent). One still
//! unchecked at the end of the window is failed with the reason, counted and narrated.
//!
//! Only records governance wrote last are its business: a queued record the scheduler wrote
//! (a requeue, a replay: `leader_token > 0`) has its task already, under the scheduler's care.
//! Several governance replicas may reconcile at once; every repair is idempotent.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use bulwark_common::intent::{IntentRecord, IntentStatus};
use bulwark_common::kv::{self as kvx, Change};
use bulwark_common::{streams, time};

use super::Governance;
use crate::reconcile::{Entry, Ledger};

/// The fields of a record the ledger needs.
#[derive(Deserialize)]
struct Head {
    status: IntentStatus,
    #[serde(default)]
    leader_token: u64,
}

/// What a check found.
enum Check {
    /// Everything the status promises exists (or was just written: the names).
    Kept(Vec<&'static str>),
    /// The record changed since: its newer write is on its way through the stream.
    Moved,
}

/// Runs the reconciler until `shutdown`.
pub(super) async fn run(gov: Arc<Governance>, shutdown: CancellationToken) {
    let rc = gov.cfg.reconcile.clone();
    let mut ledger = Ledger::new(rc.max_tracked);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(rc.interval_s));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let window_ms = (rc.window_s * 1000.0) as i64;
    let mut start = DeliverPolicy::ByStartTime {
        start_time: time_ago(rc.window_s),
    };
    loop {
        let reader = match open(&gov, start).await {
            Ok(reader) => reader,
            Err(err) => {
                tracing::warn!(error = %err, "reconciler: the intents bucket cannot be read; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs_f64(rc.interval_s)) => continue,
                }
            }
        };
        let mut messages = reader;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => gov.reconcile_pass(&mut ledger, window_ms).await,
                next = messages.next() => match next {
                    Some(Ok(msg)) => {
                        if let Some(seq) = observe(&mut ledger, &msg) {
                            start = DeliverPolicy::ByStartSequence { start_sequence: seq + 1 };
                        }
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "reconciler: reading the intents bucket failed; reopening");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

type Messages = consumer::pull::Ordered;

async fn open(gov: &Governance, start: DeliverPolicy) -> Result<Messages, String> {
    let stream = gov
        .js
        .get_stream(format!("KV_{}", streams::INTENTS_BUCKET))
        .await
        .map_err(|e| e.to_string())?;
    stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("$KV.{}.>", streams::INTENTS_BUCKET),
            deliver_policy: start,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// Feeds one write of the bucket to the ledger; its stream sequence.
fn observe(ledger: &mut Ledger, msg: &async_nats::jetstream::Message) -> Option<u64> {
    let info = msg.info().ok()?;
    let (seq, published) = (info.stream_sequence, info.published);
    let key = msg
        .subject
        .strip_prefix(&format!("$KV.{}.", streams::INTENTS_BUCKET))?;
    let removed = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("KV-Operation"))
        .is_some_and(|op| op.as_str() != "PUT");
    // A queued record the scheduler wrote last has its task under the scheduler's care.
    let status = (!removed)
        .then(|| serde_json::from_slice::<Head>(&msg.payload).ok())
        .flatten()
        .filter(|h| !(h.status == IntentStatus::Queued && h.leader_token > 0))
        .map(|h| h.status);
    let written_ms = (published.unix_timestamp_nanos() / 1_000_000) as i64;
    ledger.observe(key, seq, status, written_ms);
    Some(seq)
}

fn time_ago(seconds: f64) -> async_nats::datetime::DateTime {
    let nanos = i128::from(time::now_ms() - (seconds * 1000.0) as i64) * 1_000_000;
    async_nats::datetime::from_nanos(nanos).unwrap_or_else(|_| async_nats::datetime::now())
}

impl Governance {
    /// Checks every record due, then fails those that left the window unchecked.
    async fn reconcile_pass(&self, ledger: &mut Ledger, window_ms: i64) {
        let now = time::now_ms();
        let grace_ms = (self.cfg.reconcile.grace_s * 1000.0) as i64;
        for (key, revision) in ledger.due(now, grace_ms) {
            match self.check(&key, revision).await {
                Ok(Check::Kept(repaired)) => {
                    ledger.mark_checked(&key, revision);
                    if !repaired.is_empty() {
                        self.narrate_reconciled(&key, &repaired).await;
                    }
                }
                Ok(Check::Moved) => {}
                Err(err) => {
                    self.counters
                        .reconcile_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(intent_id = %key, error = %err, "reconciler: check failed; retried next pass");
                }
            }
        }
        let expired = ledger.expire(now, window_ms);
        for (key, entry) in expired.stranded {
            self.fail_stranded(&key, &entry).await;
        }
        self.counters
            .reconcile_tracked
            .store(ledger.len() as u64, Ordering::Relaxed);
        self.counters
            .reconcile_evicted
            .store(ledger.evicted, Ordering::Relaxed);
    }

    async fn check(&self, key: &str, revision: u64) -> Result<Check, String> {
        let Some(stored) = kvx::read::<IntentRecord>(&self.intents, key)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(Check::Moved);
        };
        if stored.revision != revision {
            return Ok(Check::Moved);
        }
        let repaired = self.redrive(&stored.value).await.map_err(|e| e.message)?;
        Ok(Check::Kept(repaired))
    }

    async fn narrate_reconciled(&self, key: &str, repaired: &[&'static str]) {
        self.counters.reconciled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(intent_id = key, ?repaired, "stranded intent reconciled");
        let n = self
            .narrator
            .narrative("intent_reconciled", "stranded-intent reconciler over the intents bucket")
            .why(format!(
                "the record was written but its {} was missing {} s later: the intake that wrote it did not finish",
                repaired.join(" and "),
                self.cfg.reconcile.grace_s
            ))
            .why("written again now, idempotently (the task under the intent id, within the queue's duplicate window)")
            .intent(key, "")
            .context(json!({"intent_id": key, "repaired": repaired}));
        self.narrator.publish(n).await;
    }

    /// Fails a record whose promise could not be kept within the window.
    async fn fail_stranded(&self, key: &str, entry: &Entry) {
        let reason = format!(
            "stranded: its {} could not be written within governance.reconcile.window_s = {} s of the record; resubmit it",
            promise(entry.status),
            self.cfg.reconcile.window_s
        );
        let failed = kvx::update(&self.intents, key, |r: &mut IntentRecord| {
            if r.status != entry.status || r.leader_token > 0 {
                return Ok::<_, ()>(Change::Keep(false));
            }
            r.transition(
                IntentStatus::Failed,
                Some("governance".into()),
                Some(reason.clone()),
            );
            r.error = Some(reason.clone());
            Ok(Change::Write(true))
        })
        .await;
        match failed {
            Ok(Ok((true, record))) => {
                self.counters
                    .stranded_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(intent_id = key, "stranded intent failed");
                let n = self
                    .narrator
                    .narrative(
                        "intent_stranded",
                        "stranded-intent reconciler over the intents bucket",
                    )
                    .why(reason.clone())
                    .intent(key, &record.intent.correlation_id)
                    .context(json!({"intent_id": key, "was": entry.status, "status": "failed"}));
                self.narrator.publish(n).await;
            }
            Ok(_) | Err(kvx::KvError::NotFound(_)) => {}
            Err(err) => {
                self.counters
                    .reconcile_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(intent_id = key, error = %err, "reconciler: a stranded intent could not be failed");
            }
        }
    }
}

fn promise(status: IntentStatus) -> &'static str {
    match status {
        IntentStatus::PendingReview => "review item",
        IntentStatus::PendingVote => "proposal",
        _ => "task",
    }
}
