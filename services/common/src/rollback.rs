//! Reconciling an accepted rollback (`bulwark restore --allow-rollback`): the intent records
//! are read before the streams go back, and afterwards every intent the backup knows less about
//! than the system did gets its newer record back, so nothing that ran after the backup runs
//! again, and nothing acknowledged after it is lost.
//!
//! - An intent whose newer record has a longer history than the restored one (or that the
//!   backup does not have at all) gets the newer record back (`carried_forward`). The scheduler
//!   checks an intent's status before dispatching a task: a task the restored queue still holds
//!   for an intent that completed, failed or was rejected is acknowledged and dropped, never run.
//! - Such an intent that was still waiting to run or running (queued, dispatched, running) also
//!   has its task put in the queue again (`requeued`, `Nats-Msg-Id` `<intent_id>:reconciled`):
//!   the restored queue may not have it. Dispatched and running ones are adopted by the
//!   scheduler under their assignment, so a worker that has the task does not start it again.
//! - Everything else (review items, votes, proposals, the breaker, the audit chain, the park of
//!   shed tasks) is restored as the backup has it: the rollback's loss there is accepted.

use async_nats::jetstream::{self, kv, message::PublishMessage};
use bytes::Bytes;
use serde::Serialize;

use crate::backup::BackupError;
use crate::intent::{IntentRecord, IntentStatus, Task, Tier};
use crate::{kv as kvx, streams, subjects};

/// The intent records as the system had them before the rollback.
pub struct Ledger {
    records: Vec<(String, Bytes, IntentRecord)>,
    /// Entries that could not be parsed (kept out of the reconciliation, counted).
    pub unreadable: usize,
}

impl Ledger {
    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Each intent's history length: how far the system knew it (a record's history only
    /// grows).
    pub fn progress(&self) -> std::collections::HashMap<String, usize> {
        self.records
            .iter()
            .map(|(key, _, r)| (key.clone(), r.history.len()))
            .collect()
    }
}

/// What reconciling did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reconciliation {
    /// Intent records read before the rollback.
    pub examined: usize,
    /// Records put back because the backup knew less about them.
    pub carried_forward: usize,
    /// Of those, the ones whose task was queued again (not finished before the rollback).
    pub requeued: usize,
    /// The intents carried forward that had finished (they are not run again).
    pub finished_kept: usize,
    /// Up to 20 intent ids carried forward, for the report.
    pub sample: Vec<String>,
}

/// Reads every intent record (the bucket must exist).
pub async fn read_ledger(js: &jetstream::Context) -> Result<Ledger, BackupError> {
    let name = format!("KV_{}", streams::INTENTS_BUCKET);
    let err = |e: &dyn std::fmt::Display| BackupError::Server {
        stream: name.clone(),
        reason: format!("reading the intent records before the rollback: {e}"),
    };
    let store = js
        .get_key_value(streams::INTENTS_BUCKET)
        .await
        .map_err(|e| err(&e))?;
    let mut ledger = Ledger {
        records: Vec::new(),
        unreadable: 0,
    };
    for key in kvx::keys(&store).await.map_err(|e| err(&e))? {
        let Some(bytes) = store.get(&key).await.map_err(|e| err(&e))? else {
            continue;
        };
        match serde_json::from_slice::<IntentRecord>(&bytes) {
            Ok(record) => ledger.records.push((key, bytes, record)),
            Err(_) => ledger.unreadable += 1,
        }
    }
    Ok(ledger)
}

/// Puts back what the restored intent records lost against `ledger`, and queues again the tasks
/// of intents that had not finished.
pub async fn reconcile(
    js: &jetstream::Context,
    ledger: Ledger,
) -> Result<Reconciliation, BackupError> {
    let name = format!("KV_{}", streams::INTENTS_BUCKET);
    let err = |e: &dyn std::fmt::Display| BackupError::Server {
        stream: name.clone(),
        reason: format!("reconciling after the rollback: {e}"),
    };
    let store: kv::Store = js
        .get_key_value(streams::INTENTS_BUCKET)
        .await
        .map_err(|e| err(&e))?;
    let mut done = Reconciliation {
        examined: ledger.records.len(),
        ..Default::default()
    };
    for (key, bytes, newer) in ledger.records {
        let restored = match store.get(&key).await.map_err(|e| err(&e))? {
            Some(b) => serde_json::from_slice::<IntentRecord>(&b).ok(),
            None => None,
        };
        if !knows_less(restored.as_ref(), &newer) {
            continue;
        }
        store.put(&key, bytes).await.map_err(|e| err(&e))?;
        done.carried_forward += 1;
        if done.sample.len() < 20 {
            done.sample.push(key.clone());
        }
        if matches!(
            newer.status,
            IntentStatus::Queued | IntentStatus::Dispatched | IntentStatus::Running
        ) {
            let priority = newer.decision.priority;
            let tier =
                Tier::from_number(newer.decision.autonomy_tier).unwrap_or(Tier::HumanRequired);
            let task = Task::for_intent(&newer.intent, priority, tier);
            let payload = serde_json::to_vec(&task).map_err(|e| err(&e))?;
            let publish = PublishMessage::build()
                .payload(payload.into())
                .message_id(format!("{key}:reconciled"));
            js.send_publish(subjects::task_queue(priority), publish)
                .await
                .map_err(|e| err(&e))?
                .await
                .map_err(|e| err(&e))?;
            done.requeued += 1;
        } else {
            done.finished_kept += 1;
        }
    }
    Ok(done)
}

/// True when the restored record (absent, or with a shorter history) knows less than `newer`.
/// A record's history only grows, so its length orders two versions of it.
pub fn knows_less(restored: Option<&IntentRecord>, newer: &IntentRecord) -> bool {
    restored.is_none_or(|r| r.history.len() < newer.history.len())
}
