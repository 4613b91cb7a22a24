//! 5W1H narratives: every decision a service makes is explained on `clarity.narrative.<who>`
//! (CONTRACT section 4) with the numbers that drove it. Narratives go through JetStream (the
//! `BULWARK_NARRATIVES` stream) so none is lost before the clarity service reads it; the
//! acknowledgement is awaited off the caller's path and failures are counted and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream;
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
    /// acknowledgement is awaited in the background, and a failure is counted and logged with
    /// the narrative so that it is never lost silently.
    pub async fn publish(&self, narrative: Narrative) {
        let body = match serde_json::to_vec(&narrative) {
            Ok(body) => body,
            Err(err) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, what = %narrative.what, "narrative could not be encoded");
                return;
            }
        };
        let stats = self.stats.clone();
        match self.js.publish(self.subject.clone(), body.into()).await {
            Ok(ack) => {
                tokio::spawn(async move {
                    match ack.await {
                        Ok(_) => {
                            stats.published.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %err, narrative = ?narrative, "narrative not stored");
                        }
                    }
                });
            }
            Err(err) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, narrative = ?narrative, "narrative not sent");
            }
        }
    }
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
