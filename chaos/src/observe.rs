//! What the runner watches while a scenario runs: the safeguards' announcements (one
//! subscription per expectation), the timeline (published load, queue depth, breaker, every
//! second), and the checker's own reader of the trigger mesh, a
//! [`bulwark_common::mesh::MeshConsumer`] like every bulwark service's, which therefore sees the
//! breaker hold events back and the pacing defer them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bulwark_common::mesh::MeshConsumer;
use bulwark_common::narrative::Narrator;
use bulwark_common::{streams, time};
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::inject::Live;
use crate::scenario::Expectation;
use crate::target::Target;

/// One announcement of a safeguard.
#[derive(Debug, Clone, Serialize)]
pub struct Firing {
    /// Seconds after the method start (negative: before it).
    pub t_s: f64,
    /// The figure named by the expectation's `value`.
    pub value: Option<f64>,
    /// The subject it came on.
    pub subject: String,
}

/// The value at `path` (`payload.rate_per_second`) of `v`.
pub fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

/// True when every field of `matching` has its value in `v`.
pub fn matches(v: &Value, matching: &std::collections::BTreeMap<String, toml::Value>) -> bool {
    matching.iter().all(|(path, want)| {
        let want = serde_json::to_value(want).unwrap_or(Value::Null);
        match (field(v, path), &want) {
            (Some(Value::Number(a)), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (Some(got), want) => got == want,
            (None, _) => false,
        }
    })
}

/// Watches the expectations' subjects.
pub struct Watch {
    /// Firings per expectation, in the order of the scenario.
    pub firings: Arc<Mutex<Vec<Vec<Firing>>>>,
}

impl Watch {
    /// Watches every expectation's subject; firings are timed from `t0`. A subject kept in a
    /// stream (`clarity.narrative.>` in `BULWARK_NARRATIVES`, `mesh.>` in `BULWARK_MESH`) is
    /// read from the stream, from its next message on, with an ordered consumer that resumes
    /// after a nats-server outage: no announcement made while the runner's connection was down
    /// is missed, a narrative retried by its narrator counts once, and each firing is timed by
    /// the stream's own timestamp. Other subjects are subscribed to.
    pub async fn start(
        target: &Target,
        expectations: &[Expectation],
        t0: tokio::time::Instant,
        stop: &CancellationToken,
    ) -> anyhow::Result<Watch> {
        let firings = Arc::new(Mutex::new(vec![Vec::new(); expectations.len()]));
        // The wall-clock time of t0, to time stored messages by their stream timestamp.
        let t0_ms = time::now_ms() + (signed_since(t0) * -1000.0) as i64;
        for (i, e) in expectations.iter().enumerate() {
            let record = Recorder {
                firings: firings.clone(),
                index: i,
                expectation: e.clone(),
                t0,
                t0_ms,
            };
            let stream = stream_of(&e.subject);
            let opened = match stream {
                Some(name) => target.js.get_stream(name).await.ok(),
                None => None,
            };
            // The first reader is made here, so a stream this connection may not read (a
            // running bulwark with other permissions) falls back to a subscription.
            let mut first = None;
            if let Some(mut stream) = opened {
                let next = stream.info().await?.state.last_sequence + 1;
                if let Ok(reader) = ordered_reader(&stream, &e.subject, next).await {
                    first = Some((stream, next, reader));
                }
            }
            match first {
                Some((stream, next, reader)) => {
                    tokio::spawn(read_stored(stream, (next, reader), record, stop.clone()));
                }
                None => {
                    let sub = target.client.subscribe(e.subject.clone()).await?;
                    tokio::spawn(read_live(sub, record, stop.clone()));
                }
            }
        }
        target.client.flush().await?;
        Ok(Watch { firings })
    }
}

/// The stream keeping `subject`, when it is one of bulwark's announcement streams.
fn stream_of(subject: &str) -> Option<&'static str> {
    if subject.starts_with("clarity.narrative.") {
        Some(streams::NARRATIVES_STREAM)
    } else if subject.starts_with("mesh.") {
        Some(streams::MESH_STREAM)
    } else {
        None
    }
}

/// Records the matching announcements of one expectation.
struct Recorder {
    firings: Arc<Mutex<Vec<Vec<Firing>>>>,
    index: usize,
    expectation: Expectation,
    t0: tokio::time::Instant,
    t0_ms: i64,
}

impl Recorder {
    /// Records `payload` (on `subject`) when it matches; `stored_ms` is the stream's timestamp.
    async fn record(&self, subject: &str, payload: &[u8], stored_ms: Option<i64>) {
        let Ok(body) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        if !matches(&body, &self.expectation.matching) {
            return;
        }
        let value = self
            .expectation
            .value
            .as_deref()
            .and_then(|p| field(&body, p))
            .and_then(Value::as_f64);
        let t_s = match stored_ms {
            Some(ms) => (ms - self.t0_ms) as f64 / 1000.0,
            None => signed_since(self.t0),
        };
        self.firings.lock().await[self.index].push(Firing {
            t_s,
            value,
            subject: subject.to_owned(),
        });
    }
}

async fn read_live(mut sub: async_nats::Subscriber, record: Recorder, stop: CancellationToken) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            msg = sub.next() => match msg { Some(m) => m, None => break },
        };
        record
            .record(msg.subject.as_str(), &msg.payload, None)
            .await;
    }
}

type OrderedReader = jetstream::consumer::Consumer<consumer::pull::OrderedConfig>;

/// An ordered consumer of `subject` on `stream` from sequence `next` on.
async fn ordered_reader(
    stream: &jetstream::stream::Stream,
    subject: &str,
    next: u64,
) -> anyhow::Result<OrderedReader> {
    Ok(stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: next,
            },
            ..Default::default()
        })
        .await?)
}

/// Reads the expectation's subject from `stream` with `first` (from its sequence on) until
/// `stop`; a reader lost to an outage is made again from the next unread sequence.
async fn read_stored(
    stream: jetstream::stream::Stream,
    first: (u64, OrderedReader),
    record: Recorder,
    stop: CancellationToken,
) {
    let (mut next, reader) = first;
    let mut reader = Some(reader);
    while !stop.is_cancelled() {
        let current = match reader.take() {
            Some(r) => Ok(r),
            None => ordered_reader(&stream, &record.expectation.subject, next).await,
        };
        let messages = match current {
            Ok(c) => c.messages().await.ok(),
            Err(_) => None,
        };
        if let Some(mut messages) = messages {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = messages.next() => match m { Some(Ok(m)) => m, _ => break },
                };
                let stored_ms = match msg.info() {
                    Ok(info) => {
                        next = info.stream_sequence + 1;
                        Some((info.published.unix_timestamp_nanos() / 1_000_000) as i64)
                    }
                    Err(_) => None,
                };
                record
                    .record(msg.subject.as_str(), &msg.payload, stored_ms)
                    .await;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Seconds from `t0` to now, negative before it.
pub fn signed_since(t0: tokio::time::Instant) -> f64 {
    let now = tokio::time::Instant::now();
    if now >= t0 {
        (now - t0).as_secs_f64()
    } else {
        -((t0 - now).as_secs_f64())
    }
}

/// One second of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds after the method start.
    pub t_s: f64,
    /// Mesh events acknowledged in the last second.
    pub events_per_s: f64,
    /// Intent submissions answered in the last second.
    pub intents_per_s: f64,
    /// Tasks waiting (`htm.readiness`), when it answered.
    pub queue_depth: Option<u64>,
    /// Tasks running.
    pub in_flight: Option<u64>,
    /// Healthy workers.
    pub healthy_workers: Option<u64>,
    /// The breaker state, when the storm guard answered.
    pub breaker: Option<String>,
    /// Events the checker's mesh reader processed in the last second.
    pub processed_per_s: f64,
}

/// Samples the timeline every second and prints the progress line.
pub struct Timeline {
    /// The samples so far.
    pub samples: Arc<Mutex<Vec<Sample>>>,
}

/// What the progress line shows besides the samples.
pub struct ProgressInfo {
    /// Scenario id (and `control`).
    pub label: String,
    /// Planned length of the method, seconds.
    pub planned_s: f64,
    /// Expectation names.
    pub safeguards: usize,
}

impl Timeline {
    /// Starts sampling; stops with `stop`.
    pub fn start(
        target: Arc<Target>,
        live: Arc<Live>,
        processed: Arc<std::sync::atomic::AtomicU64>,
        firings: Arc<Mutex<Vec<Vec<Firing>>>>,
        t0: tokio::time::Instant,
        info: ProgressInfo,
        stop: CancellationToken,
    ) -> Timeline {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        tokio::spawn(async move {
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut last_events, mut last_intents, mut last_processed) = (0u64, 0u64, 0u64);
            let mut last_at = tokio::time::Instant::now();
            let mut printed = 0u64;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let readiness = target.readiness().await;
                let breaker = target.breaker().await;
                let now = tokio::time::Instant::now();
                let dt = (now - last_at).as_secs_f64().max(0.001);
                last_at = now;
                let events = live.events_acked.load(Ordering::Relaxed);
                let intents = live.intents_sent.load(Ordering::Relaxed);
                let done = processed.load(Ordering::Relaxed);
                let get = |k: &str| readiness.as_ref().and_then(|r| r[k].as_u64());
                let sample = Sample {
                    t_s: (signed_since(t0) * 10.0).round() / 10.0,
                    events_per_s: ((events - last_events) as f64 / dt).round(),
                    intents_per_s: ((intents - last_intents) as f64 / dt).round(),
                    queue_depth: get("queue_depth"),
                    in_flight: get("in_flight"),
                    healthy_workers: get("healthy_workers"),
                    breaker,
                    processed_per_s: ((done.saturating_sub(last_processed)) as f64 / dt).round(),
                };
                (last_events, last_intents, last_processed) = (events, intents, done);
                let fired = firings
                    .lock()
                    .await
                    .iter()
                    .filter(|f| !f.is_empty())
                    .count();
                printed += 1;
                if tty || printed.is_multiple_of(5) {
                    let line = format!(
                        "  {:<36} {:>6.1}s/{:<5.0}s  events {:>7} ({:>5}/s)  intents {:>6} ({:>4}/s, {} refused)  queue {:>5}  breaker {:<9} safeguards fired {}/{}  kills {}",
                        info.label,
                        sample.t_s,
                        info.planned_s,
                        events,
                        sample.events_per_s,
                        intents,
                        sample.intents_per_s,
                        live.intents_refused.load(Ordering::Relaxed),
                        sample
                            .queue_depth
                            .map(|q| q.to_string())
                            .unwrap_or_else(|| "?".into()),
                        sample.breaker.clone().unwrap_or_else(|| "?".into()),
                        fired,
                        info.safeguards,
                        live.kills.load(Ordering::Relaxed),
                    );
                    if tty {
                        eprint!("\r\x1b[2K{line}");
                    } else {
                        eprintln!("{line}");
                    }
                }
                out.lock().await.push(sample);
            }
            if tty {
                eprint!("\r\x1b[2K");
            }
        });
        Timeline { samples }
    }
}

/// The checker's reader of the trigger mesh: which of this run's events were processed, how
/// often and when.
pub struct MeshReader {
    name: String,
    /// Event id -> processing times (ms since the epoch).
    pub seen: Arc<Mutex<HashMap<String, Vec<i64>>>>,
    /// Events of this run processed so far.
    pub processed: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MeshReader {
    /// Starts reading `BULWARK_MESH` from its next message on, as durable consumer
    /// `chaos_<run>`, recording the events whose payload carries `chaos_run = run`.
    pub async fn start(target: &Target, run: &str) -> anyhow::Result<MeshReader> {
        let name = format!("chaos_{run}");
        let mut cfg = target.cfg.mesh.clone();
        // Adopt the running stream's retention, so opening the reader (which makes sure the
        // stream exists) never changes a running system's stream.
        let mut stream = match target.js.get_stream(streams::MESH_STREAM).await {
            Ok(stream) => stream,
            Err(_) => bulwark_common::mesh::mesh_stream(&target.js, &cfg).await?,
        };
        let info = stream.info().await?;
        cfg.max_age_days = info.config.max_age.as_secs() / 86_400;
        cfg.duplicate_window_s = info.config.duplicate_window.as_secs_f64();
        let next = info.state.last_sequence + 1;
        for (durable, filters) in [
            (name.clone(), Vec::new()),
            (
                format!("{name}_critical"),
                bulwark_common::subjects::MESH_CRITICAL
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
        ] {
            stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(durable.clone()),
                    description: Some("bulwark chaos: the checker's mesh reader".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs_f64(cfg.ack_wait_s),
                    max_ack_pending: cfg.max_ack_pending,
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    filter_subjects: filters,
                    inactive_threshold: Duration::from_secs(600),
                    ..Default::default()
                })
                .await?;
        }
        let stop = CancellationToken::new();
        let narrator = Narrator::new(target.js.clone(), "chaos", &format!("bulwark-chaos/{run}"));
        let consumer = MeshConsumer::start(target.js.clone(), &cfg, &name, narrator, &stop).await?;
        let seen: Arc<Mutex<HashMap<String, Vec<i64>>>> = Arc::default();
        let processed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (record, count, run_id) = (seen.clone(), processed.clone(), run.to_owned());
        let token = stop.clone();
        let task = tokio::spawn(async move {
            consumer
                .run(token, move |event, _delivery| {
                    let record = record.clone();
                    let count = count.clone();
                    let mine = event.payload.get("chaos_run").and_then(Value::as_str)
                        == Some(run_id.as_str());
                    async move {
                        if mine {
                            count.fetch_add(1, Ordering::Relaxed);
                            record
                                .lock()
                                .await
                                .entry(event.event_id)
                                .or_default()
                                .push(time::now_ms());
                        }
                        Ok(())
                    }
                })
                .await;
        });
        Ok(MeshReader {
            name,
            seen,
            processed,
            stop,
            task: Some(task),
        })
    }

    /// Stops reading and deletes the reader's durable consumers.
    pub async fn finish(mut self, js: &jetstream::Context) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        if let Ok(stream) = js.get_stream(streams::MESH_STREAM).await {
            let _ = stream.delete_consumer(&self.name).await;
            let _ = stream
                .delete_consumer(&format!("{}_critical", self.name))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_and_matching() {
        let v = json!({"what": "worker_declared_dead", "payload": {"playbook": "x", "depth": 11}});
        assert_eq!(field(&v, "payload.depth"), Some(&json!(11)));
        let mut want = std::collections::BTreeMap::new();
        want.insert(
            "payload.playbook".to_owned(),
            toml::Value::String("x".into()),
        );
        want.insert("payload.depth".to_owned(), toml::Value::Float(11.0));
        assert!(matches(&v, &want));
        want.insert("what".to_owned(), toml::Value::String("other".into()));
        assert!(!matches(&v, &want));
    }
}
