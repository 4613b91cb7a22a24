//! Retention of finished intent records: a periodic sweep removes a record that has been
//! completed, failed, rejected or cancelled for longer than `nats.storage.finished_intent_retention_s`.
//!
//! The sweep reads the newest revision of every key of the intents bucket and purges that key's
//! messages up to that revision (a subject-filtered stream purge below the next sequence): no
//! delete marker is left, and a record rewritten meanwhile (a newer revision) is not touched. Records that are not
//! finished (pending review or vote, queued, running, shed) are never removed. Several
//! governance replicas may sweep at once: deleting an already deleted message is harmless.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;

use bulwark_common::intent::{IntentRecord, IntentStatus};
use bulwark_common::streams;

/// True for a status an intent never leaves.
pub fn finished(status: IntentStatus) -> bool {
    matches!(
        status,
        IntentStatus::Completed
            | IntentStatus::Failed
            | IntentStatus::Rejected
            | IntentStatus::Cancelled
    )
}

/// Removes the finished records last written more than `retention` ago; the number removed.
pub async fn sweep(
    js: &jetstream::Context,
    intents: &kv::Store,
    retention: Duration,
    timeout: Duration,
) -> Result<usize, String> {
    let name = format!("KV_{}", streams::INTENTS_BUCKET);
    let stream = js.get_stream(&name).await.map_err(|e| e.to_string())?;
    if stream.cached_info().state.messages == 0 {
        // An empty bucket's watch would deliver nothing at all.
        return Ok(0);
    }
    let mut watch = intents
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let mut removed = 0;
    loop {
        // An empty bucket delivers nothing: the timeout ends the pass.
        let entry = match tokio::time::timeout(timeout, watch.next()).await {
            Ok(Some(Ok(entry))) => entry,
            Ok(Some(Err(err))) => return Err(err.to_string()),
            Ok(None) | Err(_) => break,
        };
        let last = entry.delta == 0;
        let old = now_ns - entry.created.unix_timestamp_nanos() >= retention.as_nanos() as i128;
        if entry.operation == kv::Operation::Put && old {
            let done = serde_json::from_slice::<IntentRecord>(&entry.value)
                .is_ok_and(|record| finished(record.status));
            // Purge the key's messages up to this revision: a newer one (the record written
            // again meanwhile) survives, and nothing of this one is left (no marker).
            let purged = if done {
                stream
                    .purge()
                    .filter(format!("$KV.{}.{}", streams::INTENTS_BUCKET, entry.key))
                    .sequence(entry.revision + 1)
                    .await
                    .map(|r| r.purged)
                    .unwrap_or(0)
            } else {
                0
            };
            if purged > 0 {
                removed += 1;
                tracing::debug!(intent = entry.key, "finished intent record expired");
            }
        }
        if last {
            break;
        }
    }
    Ok(removed)
}
