//! 5W1H narratives: every decision a service makes is explained on `clarity.narrative.<who>`
//! (CONTRACT section 4) with the numbers that drove it. Narratives go through JetStream (the
//! `BULWARK_NARRATIVES` stream) so none is lost before the clarity service reads it; the
//! acknowledgement is awaited off the caller's path, refusals are retried through elections and
//! restarts, and what still fails is counted and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::PublishAckFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::subjects;

/// One 5W1H record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Narrative {
    /// The component that acted (`governance`, `scheduler`, ...).
    pub who: String,
    /// What it did, as a short snake_case verb phrase (`intent_routed`).
    pub what: String,
    /// When, RFC 3339 UTC.
    pub when: String,
    /// Where: the component instance and subject or resource concerned.
    #[serde(rename = "where")]
    pub where_: String,
    /// Why: one line per reason, with numbers.
    pub why: Vec<String>,
    /// How: the mechanism that decided or acted.
    pub how: String,
    /// The figures and ids behind the decision.
    #[serde(default)]
    pub context: Value,
    /// The flow this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The intent concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent_id: Option<String>,
}

/// Publishes a component's narratives.
#[derive(Clone)]
pub struct Narrator {
    js: jetstream::Context,
    who: String,
    where_: String,
    subject: String,
    stats: Arc<NarratorStats>,
}

/// Counters of a narrator.
#[derive(Debug, Default)]
pub struct NarratorStats {
    /// Narratives the stream acknowledged.
    pub published: AtomicU64,
    /// Narratives that could not be stored (logged with their content).
    pub failed: AtomicU64,
}

impl Narrator {
    /// A narrator for component `who` running at `where_` (e.g. `governance@host`). Call
    /// [`crate::streams::narratives`] once before the first narrative.
    pub fn new(js: jetstream::Context, who: &str, where_: &str) -> Self {
        Self {
            js,
            who: who.to_owned(),
            where_: where_.to_owned(),
            subject: subjects::narrative(who),
            stats: Arc::new(NarratorStats::default()),
        }
    }

    /// Counters of this narrator.
    pub fn stats(&self) -> &Arc<NarratorStats> {
        &self.stats
    }

    /// Starts a narrative of this component: set `why`, `how`, `context` and ids, then
    /// [`publish`](Self::publish) it.
    pub fn narrative(&self, what: &str, how: &str) -> Narrative {
        Narrative {
            who: self.who.clone(),
            what: what.to_owned(),
            when: crate::time::now(),
            where_: self.where_.clone(),
            why: Vec::new(),
            how: how.to_owned(),
            context: Value::Object(Default::default()),
            correlation_id: None,
            intent_id: None,
        }
    }

    /// Publishes `narrative`. Sending waits only for the client's buffer; the stream's
    /// acknowledgement is awaited in the background. A refusal or a missing acknowledgement
    /// (the stream changing leader in a cluster, a broker restarting) is retried with backoff
    /// for up to [`RETRY_FOR`], under one `Nats-Msg-Id` so that a narrative stored whose
    /// acknowledgement was lost is not stored twice; only then is it counted failed and logged
    /// with its content, so it is never lost silently.
    pub async fn publish(&self, narrative: Narrative) {
        let body: bytes::Bytes = match serde_json::to_vec(&narrative) {
            Ok(body) => body.into(),
            Err(err) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, what = %narrative.what, "narrative could not be encoded");
                return;
            }
        };
        let msg_id = crate::ids::new_id();
        let first = self.send(&body, &msg_id).await;
        let (js, subject, stats) = (self.js.clone(), self.subject.clone(), self.stats.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut pause = Duration::from_millis(100);
            let mut outcome = match first {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let mut attempts = 1u32;
            while let Err(err) = &outcome {
                if started.elapsed() >= RETRY_FOR {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %err, attempts, narrative = ?narrative, "narrative not stored");
                    return;
                }
                tracing::debug!(error = %err, attempts, what = %narrative.what, "narrative not stored yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                attempts += 1;
                outcome = match send(&js, &subject, &body, &msg_id).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
            }
            stats.published.fetch_add(1, Ordering::Relaxed);
        });
    }

    async fn send(&self, body: &bytes::Bytes, msg_id: &str) -> Result<PublishAckFuture, String> {
        send(&self.js, &self.subject, body, msg_id).await
    }
}

/// How long a narrative the stream did not acknowledge is retried: longer than a JetStream
/// leader election, shorter than the narrative stream's two-minute duplicate window (so the
/// retries of one narrative are recognised as one).
pub const RETRY_FOR: Duration = Duration::from_secs(60);

async fn send(
    js: &jetstream::Context,
    subject: &str,
    body: &bytes::Bytes,
    msg_id: &str,
) -> Result<PublishAckFuture, String> {
    let publish = jetstream::message::PublishMessage::build()
        .payload(body.clone())
        .message_id(msg_id);
    js.send_publish(subject.to_owned(), publish)
        .await
        .map_err(|e| e.to_string())
}

impl Narrative {
    /// Adds a reason line.
    pub fn why(mut self, line: impl Into<String>) -> Self {
        self.why.push(line.into());
        self
    }
    /// Sets all reason lines.
    pub fn whys(mut self, lines: impl IntoIterator<Item = String>) -> Self {
        self.why.extend(lines);
        self
    }
    /// Sets the context figures.
    pub fn context(mut self, context: Value) -> Self {
        self.context = context;
        self
    }
    /// Names the intent (and its flow) concerned.
    pub fn intent(mut self, intent_id: &str, correlation_id: &str) -> Self {
        self.intent_id = Some(intent_id.to_owned());
        self.correlation_id = Some(correlation_id.to_owned());
        self
    }
}
