//! The clarity service's I/O: the narrative consumer that appends to the audit chain, and the
//! `clarity.query` / `clarity.verify` endpoints, thin around [`crate::chain`] and
//! [`crate::query`].
//!
//! **One writer, however many instances.** Only the replica holding the `clarity` lease
//! ([`bulwark_common::lease`]) consumes narratives and appends; the others answer queries and
//! take over when the lease is released or runs out. The fence that makes a fork impossible even
//! for a writer that lost its lease without knowing it is the store's own: every append names
//! the sequence of the record it chains onto (`Nats-Expected-Last-Subject-Sequence`; the audit
//! stream has one subject). When another instance appended first, JetStream refuses the write;
//! the instance re-reads the tip of the chain and retries, so the chain never forks. Each append also carries the narrative's
//! own sequence as `Nats-Msg-Id`, so a narrative appended but not acknowledged before a crash is
//! recognised when redelivered and stored once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, AckKind, kv};
use async_nats::service::Request;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bulwark_common::api::{self, ApiError};
use bulwark_common::config::{BulwarkConfig, ClarityConfig};
use bulwark_common::kv::{self as kvx, Change};
use bulwark_common::lease::{self, Leadership};
use bulwark_common::{streams, subjects, telemetry, time};

use crate::chain::{self, AuditRecord, Bounds, Head, Stored, Verifier, VerifyReport};
use crate::key::{AuditKey, KeyError};
use crate::query::{Filter, INVALID_QUERY, Newest};

/// Name under which the service registers (CONTRACT section 5).
pub const SERVICE_NAME: &str = "clarity";
/// Durable consumer of `BULWARK_NARRATIVES` shared by every clarity instance.
pub const CONSUMER: &str = "clarity";
/// Key of the chain's head in the `bulwark_audit_head` bucket.
pub const HEAD_KEY: &str = "head";
/// Time given to in-flight work at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long one pull request waits for narratives; also the longest shutdown waits for it.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// Appends retried after losing the race to another instance before giving up (the narrative
/// is then redelivered).
const MAX_APPEND_ATTEMPTS: usize = 64;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClarityError {
    /// A stream or bucket could not be made ready.
    #[error("{0}")]
    Store(#[from] streams::StoreError),
    /// The durable narrative consumer could not be created.
    #[error("could not create the {CONSUMER} consumer on BULWARK_NARRATIVES: {0}")]
    Consumer(String),
    /// Registration with NATS micro failed.
    #[error("{0}")]
    Register(String),
    /// The signing key (`clarity.key_file`, `clarity.retired_key_files`) could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// What the service counts; reported in telemetry and `$SRV.STATS`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Narratives appended to the chain (valid or not).
    pub narratives_stored: AtomicU64,
    /// Of those, narratives stored flagged invalid (not JSON, missing 5W1H fields).
    pub invalid_narratives: AtomicU64,
    /// Redelivered narratives recognised as already stored.
    pub duplicates: AtomicU64,
    /// Appends refused because another instance appended first (each is retried).
    pub append_conflicts: AtomicU64,
    /// Appends that failed on JetStream (the narrative is redelivered later).
    pub store_failures: AtomicU64,
    /// Queries answered.
    pub queries: AtomicU64,
    /// Queries refused as invalid.
    pub invalid_queries: AtomicU64,
    /// Verifications run.
    pub verifications: AtomicU64,
    /// Verifications that found the chain broken.
    pub chain_breaks: AtomicU64,
    /// Requests that failed on bulwark's side.
    pub internal_errors: AtomicU64,
}

impl Counters {
    /// The counters as JSON.
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "narratives_stored": get(&self.narratives_stored),
            "invalid_narratives": get(&self.invalid_narratives),
            "duplicates": get(&self.duplicates),
            "append_conflicts": get(&self.append_conflicts),
            "store_failures": get(&self.store_failures),
            "queries": get(&self.queries),
            "invalid_queries": get(&self.invalid_queries),
            "verifications": get(&self.verifications),
            "chain_breaks": get(&self.chain_breaks),
            "internal_errors": get(&self.internal_errors),
        })
    }
}

/// Runs the clarity service until `shutdown` is cancelled.
pub async fn run(
    cfg: BulwarkConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), ClarityError> {
    let timeout = Duration::from_millis(cfg.nats.request_timeout_ms);
    let keys = load_keys(&cfg.clarity)?;
    let js = streams::context(client.clone(), timeout);
    let narratives = streams::narratives(&js).await?;
    let c = &cfg.clarity;
    streams::audit(
        &js,
        Duration::from_secs(c.max_age_days.saturating_mul(86_400)),
        Duration::from_secs_f64(c.duplicate_window_s),
    )
    .await?;
    let head_kv = streams::bucket(
        &js,
        streams::AUDIT_HEAD_BUCKET,
        "bulwark clarity: head {seq, hash} of the audit chain",
    )
    .await?;
    let consumer: PullConsumer = narratives
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.to_owned()),
                description: Some("clarity: appends every narrative to the audit chain".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs_f64(c.ack_wait_s),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ClarityError::Consumer(e.to_string()))?;

    let (_, leadership, elector) = lease::elect(
        &js,
        SERVICE_NAME,
        Duration::from_secs_f64(cfg.replicas.lease_ttl_s),
        shutdown.clone(),
    )
    .await?;
    let narrator = bulwark_common::Narrator::new(js.clone(), SERVICE_NAME, "clarity.verify");
    let clarity = Arc::new(Clarity {
        js,
        keys,
        narrator,
        head_kv,
        leadership,
        cfg: cfg.clarity.clone(),
        counters: Arc::new(Counters::default()),
        timeout,
    });
    let stats_counters = clarity.counters.clone();
    let endpoints: [bulwark_common::micro::EndpointSpec<Op>; 2] = [
        ("query", subjects::CLARITY_QUERY, Op::Query),
        ("verify", subjects::CLARITY_VERIFY, Op::Verify),
    ];
    let tracker = TaskTracker::new();
    let state = clarity.clone();
    // Separate permits: long query scans cannot hold up a verification, nor the reverse.
    let query_permits = Arc::new(tokio::sync::Semaphore::new(c.query_concurrency));
    let verify_permits = Arc::new(tokio::sync::Semaphore::new(c.verify_concurrency));
    let service = bulwark_common::micro::register_with_permits(
        &bulwark_common::micro::serving_client(&cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark clarity: signed, hash-chained audit of 5W1H narratives, query and verify",
        move || stats_counters.snapshot(),
        &endpoints,
        &tracker,
        &shutdown,
        move |op| match op {
            Op::Query => query_permits.clone(),
            Op::Verify => verify_permits.clone(),
        },
        move |op, request| {
            let state = state.clone();
            async move { state.handle(op, &request).await }
        },
    )
    .await
    .map_err(ClarityError::Register)?;
    tracker.spawn(write_while_leading(
        clarity.clone(),
        consumer,
        shutdown.clone(),
    ));
    let telemetry_counters = clarity.counters.clone();
    telemetry::spawn(
        client.clone(),
        SERVICE_NAME,
        Duration::from_secs_f64(cfg.telemetry.interval_s.max(0.1)),
        shutdown.clone(),
        move || telemetry_counters.snapshot(),
    );
    tracing::info!(
        key_id = clarity.keys[0].id(),
        "clarity storing {} into {}, signed",
        subjects::NARRATIVE_ALL,
        streams::AUDIT_STREAM
    );

    shutdown.cancelled().await;
    bulwark_common::micro::finish(SERVICE_NAME, service, tracker, SHUTDOWN_GRACE).await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, elector).await;
    Ok(())
}

/// The signing key (created when missing), then the retired keys: the current one first.
fn load_keys(cfg: &ClarityConfig) -> Result<Vec<AuditKey>, KeyError> {
    let path = std::path::Path::new(&cfg.key_file);
    let (key, created) = AuditKey::load_or_create(path)?;
    if created {
        tracing::info!(key_id = key.id(), file = %path.display(), "clarity: created a new audit signing key (mode 0600)");
    }
    let mut keys = vec![key];
    for retired in &cfg.retired_key_files {
        keys.push(AuditKey::load(std::path::Path::new(retired))?);
    }
    Ok(keys)
}

/// Appends narratives during each tenure of the `clarity` lease; stands by in between.
async fn write_while_leading(
    clarity: Arc<Clarity>,
    consumer: PullConsumer,
    shutdown: CancellationToken,
) {
    while let Some(token) = clarity.leadership.until_leader(&shutdown).await {
        tracing::info!(token, "clarity: writing the audit chain");
        let tenure = shutdown.child_token();
        let ended = tenure.clone();
        let leadership = clarity.leadership.clone();
        let watch_shutdown = shutdown.clone();
        let watcher = tokio::spawn(async move {
            leadership.until_not_leader(&watch_shutdown).await;
            ended.cancel();
        });
        consume(clarity.clone(), consumer.clone(), tenure).await;
        watcher.abort();
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Query,
    Verify,
}

/// Pulls narratives in batches and appends each to the chain, acknowledging it only once its
/// record is stored. A batch in progress is finished before shutdown; at most [`FETCH_WAIT`]
/// passes between two checks of `shutdown`.
async fn consume(clarity: Arc<Clarity>, consumer: PullConsumer, shutdown: CancellationToken) {
    let mut tip: Option<Tip> = None;
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let batch = consumer
            .batch()
            .max_messages(clarity.cfg.fetch_batch)
            .expires(FETCH_WAIT)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(error = %err, "clarity: cannot pull narratives; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut newest: Option<Head> = None;
        let mut failed = false;
        while let Some(msg) = batch.next().await {
            let msg = match msg {
                Ok(msg) => msg,
                Err(err) => {
                    tracing::debug!(error = %err, "clarity: pull batch ended");
                    break;
                }
            };
            if failed || !clarity.leadership.is_leader() {
                // Keep the chain in narrative order: what follows a failure waits for it. A
                // replica that lost its lease leaves the rest to the new writer.
                nak(&msg).await;
                continue;
            }
            match clarity.append(&msg, &mut tip).await {
                Ok(appended) => {
                    if let Err(err) = msg.ack().await {
                        tracing::debug!(error = %err, "clarity: ack not sent; the duplicate will be recognised");
                    }
                    if appended.is_some() {
                        newest = appended;
                    }
                }
                Err(err) => {
                    clarity
                        .counters
                        .store_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %err, subject = %msg.subject, "clarity: narrative not stored yet; it will be redelivered");
                    nak(&msg).await;
                    failed = true;
                    tip = None;
                }
            }
        }
        if let Some(head) = newest {
            clarity.record_head(&head).await;
        }
    }
}

async fn nak(msg: &jetstream::Message) {
    if let Err(err) = msg
        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
        .await
    {
        tracing::debug!(error = %err, "clarity: nak not sent; redelivery after ack_wait");
    }
}

/// Where the next record attaches: the head of the chain, and the audit subject's last
/// sequence that the append must find unchanged.
#[derive(Debug, Clone)]
struct Tip {
    head: Head,
    /// Sequence of the last message actually stored (lower than `head.seq` only when the last
    /// records were deleted or expired).
    subject_seq: u64,
}

/// Why a narrative could not be appended (it stays unacknowledged and is redelivered).
#[derive(Debug, thiserror::Error)]
enum AppendError {
    #[error("audit stream unavailable: {0}")]
    Unavailable(String),
    #[error("other instances kept appending first; gave up after {MAX_APPEND_ATTEMPTS} attempts")]
    Contended,
}

/// The clarity state shared by the consumer and every request.
struct Clarity {
    js: jetstream::Context,
    /// The signing key, then the retired ones (verification only).
    keys: Vec<AuditKey>,
    /// Narrates broken verifications.
    narrator: bulwark_common::Narrator,
    head_kv: kv::Store,
    /// This replica's part in the `clarity` (chain writer) lease.
    leadership: Leadership,
    cfg: ClarityConfig,
    counters: Arc<Counters>,
    timeout: Duration,
}

impl Clarity {
    async fn handle(&self, op: Op, request: &Request) {
        match op {
            Op::Query => {
                let result = self.query(&request.message.payload).await;
                let counter = match &result {
                    Ok(_) => &self.counters.queries,
                    Err(err) if err.code == INVALID_QUERY => &self.counters.invalid_queries,
                    Err(_) => &self.counters.internal_errors,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                api::respond(request, result).await;
            }
            Op::Verify => {
                let result = self.verify().await;
                match &result {
                    Ok(report) => {
                        self.counters.verifications.fetch_add(1, Ordering::Relaxed);
                        if !report.ok {
                            self.counters.chain_breaks.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(first_bad_seq = ?report.first_bad_seq, reason = ?report.reason, "clarity: audit chain broken");
                            self.narrate_break(report).await;
                        }
                    }
                    Err(_) => {
                        self.counters
                            .internal_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                api::respond(request, result).await;
            }
        }
    }

    /// Narrates a broken chain: where, why, and what the signatures still vouch for.
    async fn narrate_break(&self, report: &VerifyReport) {
        let at = report
            .first_bad_seq
            .map_or_else(|| "?".to_owned(), |s| s.to_string());
        let narrative = self
            .narrator
            .narrative("audit_chain_broken", "verification of every record")
            .why(format!("the audit chain is broken at sequence {at}"))
            .why(report.reason.clone().unwrap_or_default())
            .context(json!({
                "first_bad_seq": report.first_bad_seq,
                "records": report.records,
                "key_id": report.key_id,
                "last_signed": report.last_signed,
                "chain_breaks": self.counters.chain_breaks.load(Ordering::Relaxed),
            }));
        self.narrator.publish(narrative).await;
    }

    // ---- appending ----------------------------------------------------------------------------

    /// Appends the narrative `msg` to the chain; `Some(head)` when this call stored it, `None`
    /// when it was already stored (a redelivery).
    async fn append(
        &self,
        msg: &jetstream::Message,
        tip: &mut Option<Tip>,
    ) -> Result<Option<Head>, AppendError> {
        let source_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let examined = chain::examine(&msg.payload);
        let valid = examined.invalid_reason.is_none();
        let stored_at = time::now();
        let msg_id = format!("{}:{source_seq}", streams::NARRATIVES_STREAM);
        for attempt in 0..MAX_APPEND_ATTEMPTS {
            let current = match tip.take() {
                Some(tip) => tip,
                None => self.read_tip().await?,
            };
            let record = AuditRecord::next(
                &current.head,
                examined.clone(),
                stored_at.clone(),
                msg.subject.to_string(),
                source_seq,
                self.keys.first(),
            );
            let body = api::to_bytes(&record);
            let publish = PublishMessage::build()
                .payload(body)
                .message_id(&msg_id)
                .expected_last_subject_sequence(current.subject_seq);
            let ack = self
                .js
                .send_publish(subjects::CLARITY_AUDIT, publish)
                .await
                .map_err(|e| AppendError::Unavailable(e.to_string()))?
                .await;
            match ack {
                Ok(ack) if ack.duplicate => {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                Ok(ack) => {
                    self.counters
                        .narratives_stored
                        .fetch_add(1, Ordering::Relaxed);
                    if !valid {
                        self.counters
                            .invalid_narratives
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if ack.sequence == record.seq {
                        *tip = Some(Tip {
                            head: record.head(),
                            subject_seq: ack.sequence,
                        });
                    } else {
                        // Something else wrote into the stream; verify reports it.
                        tracing::warn!(
                            expected = record.seq,
                            stored = ack.sequence,
                            "clarity: audit record stored at an unexpected sequence"
                        );
                    }
                    return Ok(Some(record.head()));
                }
                Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                    self.counters
                        .append_conflicts
                        .fetch_add(1, Ordering::Relaxed);
                    if attempt >= 2 {
                        // Several instances keep colliding: step aside for a moment.
                        let pause = 1 + (source_seq.wrapping_mul(7919) + attempt as u64) % 20;
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
                Err(err) => return Err(AppendError::Unavailable(err.to_string())),
            }
        }
        Err(AppendError::Contended)
    }

    /// Reads the tip of the chain from the stream (and the recorded head when the newest
    /// records are gone).
    async fn read_tip(&self) -> Result<Tip, AppendError> {
        let unavailable = |e: String| AppendError::Unavailable(e);
        for _ in 0..MAX_APPEND_ATTEMPTS {
            let stream = self
                .js
                .get_stream(streams::AUDIT_STREAM)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let last_seq = stream.cached_info().state.last_sequence;
            let (subject_seq, last_hash) = match stream
                .get_last_raw_message_by_subject(subjects::CLARITY_AUDIT)
                .await
            {
                Ok(msg) => (msg.sequence, record_head_fields(&msg.payload)),
                Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => (0, None),
                Err(err) => return Err(unavailable(err.to_string())),
            };
            if subject_seq > last_seq {
                // Another instance appended between the two reads.
                continue;
            }
            let known = if last_seq == 0 {
                Some((chain::GENESIS_HASH.to_owned(), None))
            } else if subject_seq == last_seq {
                last_hash
            } else {
                // The newest records expired or were removed: the recorded head knows the hash.
                kvx::read::<Head>(&self.head_kv, HEAD_KEY)
                    .await
                    .ok()
                    .flatten()
                    .map(|v| v.value)
                    .filter(|h| h.seq == last_seq)
                    .map(|h| (h.hash, h.stored_at))
            };
            let (hash, stored_at) = known.unwrap_or_else(|| {
                tracing::warn!(
                    seq = last_seq,
                    "clarity: the newest audit record is unreadable; the chain is broken there"
                );
                (chain::GENESIS_HASH.to_owned(), None)
            });
            return Ok(Tip {
                head: Head {
                    seq: last_seq,
                    hash,
                    stored_at,
                },
                subject_seq,
            });
        }
        Err(AppendError::Contended)
    }

    /// Records `head` in the head bucket unless a newer one is there already.
    async fn record_head(&self, head: &Head) {
        let result = match kvx::create_or_get(&self.head_kv, HEAD_KEY, head).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => kvx::update(&self.head_kv, HEAD_KEY, |stored: &mut Head| {
                if stored.seq >= head.seq {
                    return Ok::<_, std::convert::Infallible>(Change::Keep(()));
                }
                *stored = head.clone();
                Ok(Change::Write(()))
            })
            .await
            .map(|_| ()),
            Err(err) => Err(err),
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, seq = head.seq, "clarity: chain head not recorded; the next batch records it");
        }
    }

    // ---- reading ------------------------------------------------------------------------------

    /// Reads the audit stream from `start` to its current end with an ordered consumer.
    /// Returns the stream's bounds as they were when the scan began.
    async fn scan(
        &self,
        start: Option<u64>,
        mut each: impl FnMut(Stored),
    ) -> Result<Bounds, ApiError> {
        let unavailable = |e: String| ApiError::unavailable(format!("audit stream: {e}"));
        let stream = self
            .js
            .get_stream(streams::AUDIT_STREAM)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let state = stream.cached_info().state.clone();
        let bounds = Bounds {
            last_seq: state.last_sequence,
            first_seq: state.first_sequence,
            ..Bounds::default()
        };
        let start = start
            .unwrap_or(state.first_sequence)
            .max(state.first_sequence);
        if state.messages == 0 || start > state.last_sequence {
            return Ok(bounds);
        }
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut messages = reader
            .messages()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        loop {
            let msg = match tokio::time::timeout(self.timeout, messages.next()).await {
                Err(_) => {
                    return Err(unavailable(format!(
                        "reading stalled for {} ms",
                        self.timeout.as_millis()
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(err))) => return Err(unavailable(err.to_string())),
                Ok(Some(Ok(msg))) => msg,
            };
            let Ok(info) = msg.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            each(Stored {
                stream_seq: seq,
                body: msg.payload.to_vec(),
            });
            if pending == 0 || seq >= state.last_sequence {
                break;
            }
        }
        Ok(bounds)
    }

    async fn query(&self, body: &[u8]) -> Result<Value, ApiError> {
        let filter = Filter::parse(
            body,
            time::now_ms(),
            self.cfg.query_default_limit,
            self.cfg.query_max_limit,
        )?;
        let stream = self
            .js
            .get_stream(streams::AUDIT_STREAM)
            .await
            .map_err(|e| ApiError::unavailable(format!("audit stream: {e}")))?;
        let last = stream.cached_info().state.last_sequence;
        let start = last.saturating_sub(self.cfg.query_max_scan.saturating_sub(1));
        let mut newest = Newest::new(filter.limit);
        self.scan(Some(start.max(1)), |stored| {
            if let Ok(record) = serde_json::from_slice::<AuditRecord>(&stored.body) {
                newest.offer(&filter, &record);
            }
        })
        .await?;
        Ok(json!({ "items": newest.into_items() }))
    }

    async fn verify(&self) -> Result<VerifyReport, ApiError> {
        // The head is read before the stream, so it never names a record the scan cannot see.
        let head = kvx::read::<Head>(&self.head_kv, HEAD_KEY)
            .await
            .map_err(|e| ApiError::unavailable(format!("chain head: {e}")))?
            .map(|v| v.value);
        let stream = self
            .js
            .get_stream(streams::AUDIT_STREAM)
            .await
            .map_err(|e| ApiError::unavailable(format!("audit stream: {e}")))?;
        let state = stream.cached_info().state.clone();
        let mut verifier = Verifier::new(Bounds {
            last_seq: state.last_sequence,
            first_seq: state.first_sequence,
            max_age_ms: self.cfg.max_age_days.saturating_mul(86_400_000),
            now_ms: time::now_ms(),
            head,
            keys: self.keys.clone(),
        });
        let scanned = self.scan(None, |stored| verifier.push(&stored)).await?;
        if scanned.last_seq != state.last_sequence {
            // Records appended since we looked are outside this report's bounds; fine. Records
            // removed since (first_seq moved) show up as missing, as they should.
            tracing::debug!(
                before = state.last_sequence,
                after = scanned.last_seq,
                "clarity: chain grew during verification"
            );
        }
        Ok(verifier.finish())
    }
}

/// The `hash` and `stored_at` fields of a stored record, if it has a hash.
fn record_head_fields(payload: &[u8]) -> Option<(String, Option<String>)> {
    let record = serde_json::from_slice::<Value>(payload).ok()?;
    let hash = record.get("hash")?.as_str()?.to_owned();
    let stored_at = record
        .get("stored_at")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Some((hash, stored_at))
}
