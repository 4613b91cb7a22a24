//! The `notify` service: tells people that something waits or went wrong, through webhooks.
//!
//! Consumes (core NATS, queue group `notify`, so replicas share the work and each event is
//! delivered once): `clarity.narrative.governance` (`intent_routed` to `pending_review`:
//! *review_pending*; `vote_approved|rejected|expired`: *vote_decided*),
//! `unified_logic.proposal.*` (*proposal_opened*), `mesh.layer2.*` (*layer2_alert_raised*,
//! *layer2_alert_recovered*), `mesh.playbook.failed` (*playbook_failed*), `mesh.breaker.opened`
//! (*breaker_opened*). Produces: a POST per matching webhook (JSON with a Slack-compatible
//! `text`, signed with HMAC-SHA256), retried with exponential backoff, dead-lettered after
//! `notify.max_attempts` (narrated `notification_dead_lettered`); serves the delivery log on
//! `notify.log` (micro service `notify`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_common::api::{self, ApiError};
use bulwark_common::console_config::{NotifyConfig, WebhookConfig};
use bulwark_common::micro::{self, EndpointSpec};
use bulwark_common::{BulwarkConfig, Narrator, subjects};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::webhook;

/// The NATS micro name.
pub const SERVICE_NAME: &str = "notify";
/// Queue group of the event subscriptions.
const QUEUE: &str = "notify";
/// Proposal ids remembered, so a re-announced proposal is not notified twice.
const SEEN_PROPOSALS: usize = 4096;

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// A subscription or the micro registration failed.
    #[error("notify: {0}")]
    Register(String),
}

/// An event worth telling, before it is addressed to webhooks.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// One of `NOTIFY_KINDS`.
    pub kind: &'static str,
    /// The Slack-compatible one-line text.
    pub text: String,
    /// The details (documented per kind in docs/console.md).
    pub event: Value,
}

/// `text` as Slack shows it literally: `&`, `<` and `>` escaped (mentions and links are made of
/// them).
pub fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Turns a message into a notice, or `None` when it is nothing to tell. `console` is the
/// console's base URL for links ("" for none). Pure: unit-tested.
pub fn notice_of(subject: &str, body: &Value, console: &str) -> Option<Notice> {
    let link = |path: String| {
        if console.is_empty() {
            String::new()
        } else {
            format!(" <{console}{path}>")
        }
    };
    // Values put into `text` come from intents (an anonymous agent names the actor): Slack's
    // control characters are escaped, so `<!channel>` or a `<url|label>` link stays text.
    let s = |v: &Value| {
        let raw = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        slack_escape(&raw)
    };
    if subject == format!("{}.governance", subjects::NARRATIVE_PREFIX) {
        let id = s(&body["intent_id"]);
        let c = &body["context"];
        return match body["what"].as_str()? {
            "intent_routed" if c["status"] == "pending_review" => Some(Notice {
                kind: "review_pending",
                text: format!(
                    "bulwark: review pending: {} by {} (tier {}, intent {id}){}",
                    s(&c["intent_type"]),
                    s(&c["actor"]),
                    s(&c["autonomy_tier"]),
                    link("/reviews".into())
                ),
                event: json!({"intent_id": id, "intent_type": c["intent_type"], "actor": c["actor"],
                              "autonomy_tier": c["autonomy_tier"], "mission_alignment": c["mission_alignment"],
                              "reasoning": body["why"]}),
            }),
            what @ ("vote_approved" | "vote_rejected" | "vote_expired") => {
                let outcome = what.trim_start_matches("vote_");
                let why = body["why"]
                    .as_array()
                    .map(|a| a.iter().map(&s).collect::<Vec<_>>().join("; "))
                    .unwrap_or_default();
                Some(Notice {
                    kind: "vote_decided",
                    text: format!(
                        "bulwark: vote {outcome} on intent {id}: {why}{}",
                        link(format!("/intents/{id}"))
                    ),
                    event: json!({"intent_id": id, "outcome": outcome, "reason": why}),
                })
            }
            _ => None,
        };
    }
    if subject.starts_with(subjects::PROPOSAL_PREFIX) {
        let id = s(&body["proposal_id"]);
        return Some(Notice {
            kind: "proposal_opened",
            text: format!(
                "bulwark: vote open: {} by {} needs {} of {} ({}) before {}{}",
                s(&body["intent_type"]),
                s(&body["actor"]),
                s(&body["quorum"]),
                body["voters"].as_array().map(Vec::len).unwrap_or(0),
                body["voters"]
                    .as_array()
                    .map(|a| a.iter().map(&s).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default(),
                s(&body["deadline"]),
                link("/proposals".into())
            ),
            event: json!({"proposal_id": id, "intent_type": body["intent_type"], "actor": body["actor"],
                          "voters": body["voters"], "quorum": body["quorum"], "deadline": body["deadline"]}),
        });
    }
    let payload = &body["payload"];
    if subject.starts_with(subjects::LAYER2_ALERT_PREFIX) {
        let (kind, verb) = match payload["state"].as_str()? {
            "raised" => ("layer2_alert_raised", "raised"),
            "recovered" => ("layer2_alert_recovered", "recovered"),
            _ => return None,
        };
        return Some(Notice {
            kind,
            text: format!(
                "bulwark: Layer 2 {} alert {verb}: {} {}: {}{}",
                s(&payload["severity"]),
                s(&payload["component"]),
                s(&payload["condition"]),
                s(&payload["reason"]),
                link("/".into())
            ),
            event: payload.clone(),
        });
    }
    if subject == format!("{}.playbook.failed", subjects::MESH_PREFIX) {
        return Some(Notice {
            kind: "playbook_failed",
            text: format!(
                "bulwark: playbook {} failed (run {}): {}{}",
                s(&payload["playbook"]),
                s(&payload["run_id"]),
                s(&payload["error"]),
                link("/playbooks".into())
            ),
            event: payload.clone(),
        });
    }
    if subject == subjects::MESH_BREAKER_OPENED {
        return Some(Notice {
            kind: "breaker_opened",
            text: format!(
                "bulwark: the mesh circuit breaker opened: {} events in {} s (threshold {}){}{}",
                s(&payload["event_count"]),
                s(&payload["window_s"]),
                s(&payload["threshold"]),
                match s(&payload["reason"]) {
                    r if r.is_empty() => String::new(),
                    r => format!(", by hand: {r}"),
                },
                link("/".into())
            ),
            event: payload.clone(),
        });
    }
    None
}

/// The wait before attempt `n + 1` (n >= 1): `initial * 2^(n-1)`, at most `max`.
pub fn backoff(cfg: &NotifyConfig, attempt: u32) -> Duration {
    let factor = 2u64.saturating_pow(attempt.saturating_sub(1));
    Duration::from_millis(
        cfg.backoff_initial_ms
            .saturating_mul(factor)
            .min(cfg.backoff_max_ms),
    )
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    deliveries: AtomicU64,
    delivered: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    pending: AtomicU64,
}

struct Notifier {
    cfg: NotifyConfig,
    console: String,
    log: Mutex<VecDeque<Value>>,
    counters: Counters,
    narrator: Narrator,
    seen: Mutex<VecDeque<String>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Notifier {
    fn counters(&self) -> Value {
        let c = &self.counters;
        json!({"events": c.events.load(Ordering::Relaxed), "deliveries": c.deliveries.load(Ordering::Relaxed),
               "delivered": c.delivered.load(Ordering::Relaxed), "retries": c.retries.load(Ordering::Relaxed),
               "dead_lettered": c.dead_lettered.load(Ordering::Relaxed), "pending": c.pending.load(Ordering::Relaxed),
               "webhooks": self.cfg.webhooks.len()})
    }

    fn record(&self, entry: Value) {
        if let Ok(mut log) = self.log.lock() {
            if log.len() >= self.cfg.log_size {
                log.pop_front();
            }
            log.push_back(entry);
        }
    }

    /// True the first time a proposal id is seen (announcements repeat on resubmission).
    fn first_sight(&self, id: &str) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return true;
        };
        if seen.iter().any(|s| s == id) {
            return false;
        }
        if seen.len() >= SEEN_PROPOSALS {
            seen.pop_front();
        }
        seen.push_back(id.to_owned());
        true
    }
}

/// Runs the notify service on `client` (the service connection) until `shutdown`.
pub async fn run(
    cfg: BulwarkConfig,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> Result<(), NotifyError> {
    let console = if !cfg.notify.console_url.is_empty() {
        cfg.notify.console_url.trim_end_matches('/').to_owned()
    } else if !cfg.console.listen.is_empty() {
        format!("http://{}", cfg.console.listen)
    } else {
        String::new()
    };
    let narrator = Narrator::new(
        bulwark_common::streams::context(
            client.clone(),
            Duration::from_millis(cfg.nats.request_timeout_ms),
        ),
        SERVICE_NAME,
        &format!("{SERVICE_NAME}/{}", std::process::id()),
    );
    let notifier = Arc::new(Notifier {
        console,
        log: Mutex::new(VecDeque::new()),
        counters: Counters::default(),
        narrator,
        seen: Mutex::new(VecDeque::new()),
        permits: Arc::new(tokio::sync::Semaphore::new(8)),
        cfg: cfg.notify.clone(),
    });
    let tracker = TaskTracker::new();
    let sources = [
        format!("{}.governance", subjects::NARRATIVE_PREFIX),
        format!("{}.*", subjects::PROPOSAL_PREFIX),
        format!("{}.*", subjects::LAYER2_ALERT_PREFIX),
        format!("{}.playbook.failed", subjects::MESH_PREFIX),
        subjects::MESH_BREAKER_OPENED.to_owned(),
    ];
    let mut subs = Vec::new();
    for subject in sources {
        let sub = client
            .queue_subscribe(subject.clone(), QUEUE.to_owned())
            .await
            .map_err(|e| NotifyError::Register(format!("subscribing {subject}: {e}")))?;
        subs.push(sub);
    }
    let mut events = futures::stream::select_all(subs);
    let endpoints: [EndpointSpec<()>; 1] = [("log", subjects::NOTIFY_LOG, ())];
    let stats = notifier.clone();
    let state = notifier.clone();
    let service = micro::register(
        &micro::serving_client(&cfg.nats, &client, SERVICE_NAME).await,
        SERVICE_NAME,
        "bulwark notifications: webhooks for reviews, votes, alerts, playbooks and the breaker",
        move || stats.counters(),
        &endpoints,
        &tracker,
        &shutdown,
        16,
        move |(), request| {
            let state = state.clone();
            async move {
                let reply = log_reply(&state, &request.message.payload);
                api::respond(&request, reply).await;
            }
        },
    )
    .await
    .map_err(NotifyError::Register)?;
    tracing::info!(
        webhooks = cfg.notify.webhooks.len(),
        "notify: delivering to {} webhook(s); log on {}",
        cfg.notify.webhooks.len(),
        subjects::NOTIFY_LOG
    );
    loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            msg = events.next() => match msg { Some(m) => m, None => break },
        };
        let Ok(body) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        let Some(notice) = notice_of(msg.subject.as_str(), &body, &notifier.console) else {
            continue;
        };
        if notice.kind == "proposal_opened"
            && !notifier.first_sight(body["proposal_id"].as_str().unwrap_or(""))
        {
            continue;
        }
        notifier.counters.events.fetch_add(1, Ordering::Relaxed);
        for hook in &notifier.cfg.webhooks {
            if !hook.events.is_empty() && !hook.events.iter().any(|k| k == notice.kind) {
                continue;
            }
            let pending = notifier.counters.pending.load(Ordering::Relaxed);
            let delivery = Delivery::new(hook.clone(), &notice);
            notifier.counters.deliveries.fetch_add(1, Ordering::Relaxed);
            if pending >= notifier.cfg.max_pending as u64 {
                dead_letter(
                    &notifier,
                    &delivery,
                    Vec::new(),
                    "too many deliveries pending (notify.max_pending)",
                )
                .await;
                continue;
            }
            notifier.counters.pending.fetch_add(1, Ordering::Relaxed);
            let n = notifier.clone();
            let token = shutdown.clone();
            tracker.spawn(async move {
                deliver(&n, delivery, token).await;
                n.counters.pending.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    micro::finish(SERVICE_NAME, service, tracker, Duration::from_secs(5)).await;
    Ok(())
}

/// One notice for one webhook.
struct Delivery {
    id: String,
    hook: WebhookConfig,
    kind: &'static str,
    body: Vec<u8>,
}

impl Delivery {
    fn new(hook: WebhookConfig, notice: &Notice) -> Self {
        let id = bulwark_common::ids::new_id();
        let body = json!({"delivery_id": id, "kind": notice.kind, "at": bulwark_common::time::now(),
                          "text": notice.text, "event": notice.event});
        Self {
            id,
            hook,
            kind: notice.kind,
            body: body.to_string().into_bytes(),
        }
    }
}

async fn deliver(n: &Notifier, d: Delivery, shutdown: CancellationToken) {
    let mut attempts = Vec::new();
    let mut headers = vec![
        ("X-Bulwark-Event", d.kind.to_owned()),
        ("X-Bulwark-Delivery", d.id.clone()),
    ];
    if !d.hook.secret.is_empty() {
        headers.push((
            webhook::SIGNATURE_HEADER,
            webhook::signature(&d.hook.secret, &d.body),
        ));
    }
    let timeout = Duration::from_millis(n.cfg.timeout_ms);
    for attempt in 1..=n.cfg.max_attempts {
        let outcome = {
            let _permit = n.permits.acquire().await;
            webhook::post(&d.hook.url, &headers, &d.body, timeout).await
        };
        let at = bulwark_common::time::now();
        match outcome {
            Ok(status) if (200..300).contains(&status) => {
                attempts.push(json!({"attempt": attempt, "at": at, "status": status}));
                n.counters.delivered.fetch_add(1, Ordering::Relaxed);
                n.record(
                    json!({"delivery_id": d.id, "webhook": d.hook.name, "kind": d.kind,
                                "outcome": "delivered", "attempts": attempts, "at": at}),
                );
                return;
            }
            Ok(status) => attempts.push(json!({"attempt": attempt, "at": at, "status": status,
                                               "error": format!("HTTP {status}")})),
            Err(err) => attempts.push(json!({"attempt": attempt, "at": at, "error": err})),
        }
        if attempt == n.cfg.max_attempts {
            break;
        }
        n.counters.retries.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = shutdown.cancelled() => {
                dead_letter(n, &d, attempts, "bulwark stopped before the next attempt").await;
                return;
            }
            _ = tokio::time::sleep(backoff(&n.cfg, attempt)) => {}
        }
    }
    dead_letter(
        n,
        &d,
        attempts,
        "every attempt failed (notify.max_attempts)",
    )
    .await;
}

async fn dead_letter(n: &Notifier, d: &Delivery, attempts: Vec<Value>, reason: &str) {
    n.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
    let last = attempts
        .last()
        .map(|a| a["error"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    tracing::warn!(webhook = %d.hook.name, kind = d.kind, reason, last_error = %last, "notify: delivery dead-lettered");
    let entry = json!({"delivery_id": d.id, "webhook": d.hook.name, "kind": d.kind,
                       "outcome": "dead_letter", "reason": reason, "attempts": attempts,
                       "at": bulwark_common::time::now(),
                       "body": String::from_utf8_lossy(&d.body)});
    let narrative = n
        .narrator
        .narrative(
            "notification_dead_lettered",
            "webhook delivery with exponential backoff",
        )
        .why(format!("{} to webhook {}: {reason}", d.kind, d.hook.name))
        .why(format!("last error: {last}"))
        .context(
            json!({"delivery_id": d.id, "webhook": d.hook.name, "kind": d.kind,
                        "attempts": entry["attempts"]}),
        );
    n.narrator.publish(narrative).await;
    n.record(entry);
}

fn log_reply(n: &Notifier, payload: &[u8]) -> Result<Value, ApiError> {
    let q: Value = if payload.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(payload)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_request",
                    "the request must be a JSON object {limit?, kind?, outcome?}",
                )
            })?
    };
    let limit = match &q["limit"] {
        Value::Null => 100,
        v => v
            .as_u64()
            .filter(|l| (1..=10_000).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_request",
                    "limit must be an integer from 1 to 10000",
                )
            })? as usize,
    };
    let kind = q["kind"].as_str().unwrap_or("");
    let outcome = q["outcome"].as_str().unwrap_or("");
    let log = n
        .log
        .lock()
        .map_err(|_| ApiError::internal("the log lock is poisoned"))?;
    let mut items: Vec<Value> = log
        .iter()
        .rev()
        .filter(|e| kind.is_empty() || e["kind"] == kind)
        .filter(|e| outcome.is_empty() || e["outcome"] == outcome)
        .take(limit)
        .cloned()
        .collect();
    items.reverse();
    Ok(
        json!({"deliveries": items, "pending": n.counters.pending.load(Ordering::Relaxed),
              "counters": n.counters()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_markup_stays_text_in_the_message() {
        let body = json!({"what": "intent_routed", "intent_id": "i1",
            "context": {"status": "pending_review", "intent_type": "grant_permissions",
                        "actor": "<!channel> <https://evil.example|Open the console>", "autonomy_tier": 0}});
        let n = notice_of(
            &format!("{}.governance", subjects::NARRATIVE_PREFIX),
            &body,
            "http://127.0.0.1:8420",
        )
        .expect("a notice");
        assert!(!n.text.contains("<!channel>"), "{}", n.text);
        assert!(!n.text.contains("<https://evil"), "{}", n.text);
        assert!(n.text.contains("&lt;!channel&gt;"), "{}", n.text);
        assert!(
            n.text.ends_with("<http://127.0.0.1:8420/reviews>"),
            "the console's own link stays a link: {}",
            n.text
        );
        // The event keeps the raw value.
        assert_eq!(n.event["actor"], body["context"]["actor"]);
    }

    #[test]
    fn events_become_notices_of_their_kind() {
        let routed = json!({"what": "intent_routed", "intent_id": "i1",
            "context": {"status": "pending_review", "intent_type": "change_charter", "actor": "bot", "autonomy_tier": 0}});
        let n = notice_of("clarity.narrative.governance", &routed, "http://c").expect("a notice");
        assert_eq!(n.kind, "review_pending");
        assert!(n.text.contains("change_charter by bot"), "{}", n.text);
        assert!(n.text.contains("<http://c/reviews>"), "{}", n.text);
        let queued = json!({"what": "intent_routed", "context": {"status": "queued"}});
        assert_eq!(notice_of("clarity.narrative.governance", &queued, ""), None);
        let vote = json!({"what": "vote_approved", "intent_id": "i2", "why": ["approved by vote: 2 approve"]});
        assert_eq!(
            notice_of("clarity.narrative.governance", &vote, "")
                .expect("vote")
                .kind,
            "vote_decided"
        );
        let proposal = json!({"proposal_id": "p", "voters": ["a", "b"], "quorum": 2});
        assert_eq!(
            notice_of("unified_logic.proposal.p", &proposal, "")
                .expect("p")
                .kind,
            "proposal_opened"
        );
        let alert = |state: &str| json!({"payload": {"state": state, "severity": "high", "component": "htm"}});
        assert_eq!(
            notice_of("mesh.layer2.high_alert", &alert("raised"), "")
                .expect("a")
                .kind,
            "layer2_alert_raised"
        );
        assert_eq!(
            notice_of("mesh.layer2.high_alert", &alert("recovered"), "")
                .expect("r")
                .kind,
            "layer2_alert_recovered"
        );
        assert_eq!(
            notice_of("mesh.layer2.high_alert", &alert("repeated"), ""),
            None
        );
        let failed = json!({"payload": {"playbook": "p", "error": "boom"}});
        assert_eq!(
            notice_of("mesh.playbook.failed", &failed, "")
                .expect("f")
                .kind,
            "playbook_failed"
        );
        let opened = json!({"payload": {"event_count": 900, "threshold": 500}});
        assert_eq!(
            notice_of("mesh.breaker.opened", &opened, "")
                .expect("b")
                .kind,
            "breaker_opened"
        );
        assert_eq!(notice_of("mesh.breaker.closed", &opened, ""), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cfg = NotifyConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 350,
            ..NotifyConfig::default()
        };
        let waits: Vec<u128> = (1..=4).map(|a| backoff(&cfg, a).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 350, 350]);
    }
}
