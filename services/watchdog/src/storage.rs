//! JetStream use against its limits: every stream and bucket of bulwark (`BULWARK_*`,
//! `KV_bulwark_*`) and the account's storage, measured each sweep. One at or above
//! `watchdog.storage_alert_ratio` of its `max_bytes` or `max_msgs` (or the account's
//! `max_file`) is the condition `storage_near_limit`, with the stream as the component; it
//! recovers when the use falls back below the ratio.

use async_nats::jetstream;
use futures::TryStreamExt;
use serde_json::{Value, json};

use crate::health::{Condition, Severity};

/// Component name of the account's own use.
pub const ACCOUNT: &str = "jetstream_account";
/// The condition's name.
pub const NEAR_LIMIT: &str = "storage_near_limit";

/// One stream's (or the account's) use and limits; a limit <= 0 is none.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// The stream, or [`ACCOUNT`].
    pub name: String,
    /// Bytes stored.
    pub bytes: u64,
    /// Its byte limit.
    pub max_bytes: i64,
    /// Messages stored.
    pub msgs: u64,
    /// Its message limit.
    pub max_msgs: i64,
}

/// Measures bulwark's streams, buckets and account; what cannot be read is left out (and
/// logged at debug level: JetStream being unavailable is another condition's business).
pub async fn measure(js: &jetstream::Context) -> Vec<Usage> {
    let mut out = Vec::new();
    let names: Vec<String> = match js.stream_names().try_collect().await {
        Ok(names) => names,
        Err(err) => {
            tracing::debug!(error = %err, "stream names not listed; storage not measured");
            return out;
        }
    };
    for name in names {
        if !(name.starts_with("BULWARK_") || name.starts_with("KV_bulwark_")) {
            continue;
        }
        let Ok(mut stream) = js.get_stream(&name).await else {
            continue;
        };
        if let Ok(info) = stream.info().await {
            out.push(Usage {
                name,
                bytes: info.state.bytes,
                max_bytes: info.config.max_bytes,
                msgs: info.state.messages,
                max_msgs: info.config.max_messages,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    match js.query_account().await {
        Ok(account) => out.push(Usage {
            name: ACCOUNT.to_owned(),
            bytes: account.storage,
            max_bytes: account.limits.max_storage.unwrap_or(-1),
            msgs: 0,
            max_msgs: -1,
        }),
        Err(err) => tracing::debug!(error = %err, "account info not read"),
    }
    out
}

fn fraction(used: u64, limit: i64) -> Option<f64> {
    (limit > 0).then(|| used as f64 / limit as f64)
}

/// `storage_near_limit` for every use at or above `ratio` of a limit.
pub fn conditions(usage: &[Usage], ratio: f64) -> Vec<Condition> {
    let mut out = Vec::new();
    for u in usage {
        let mut why = Vec::new();
        if let Some(f) = fraction(u.bytes, u.max_bytes).filter(|f| *f >= ratio) {
            why.push(format!(
                "{} bytes of {} ({:.0}%)",
                u.bytes,
                u.max_bytes,
                f * 100.0
            ));
        }
        if let Some(f) = fraction(u.msgs, u.max_msgs).filter(|f| *f >= ratio) {
            why.push(format!(
                "{} messages of {} ({:.0}%)",
                u.msgs,
                u.max_msgs,
                f * 100.0
            ));
        }
        if why.is_empty() {
            continue;
        }
        out.push(Condition {
            component: u.name.clone(),
            name: NEAR_LIMIT,
            severity: Severity::Warning,
            reason: format!(
                "{} holds {} (alert at {:.0}% of a limit; nats.storage, docs/architecture.md)",
                u.name,
                why.join(" and "),
                ratio * 100.0
            ),
        });
    }
    out
}

/// The report's `storage` section: use and limits by stream.
pub fn report(usage: &[Usage]) -> Value {
    let rows: serde_json::Map<String, Value> = usage
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                json!({"bytes": u.bytes, "max_bytes": u.max_bytes, "msgs": u.msgs, "max_msgs": u.max_msgs}),
            )
        })
        .collect();
    Value::Object(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(bytes: u64, max_bytes: i64) -> Usage {
        Usage {
            name: "BULWARK_MESH".into(),
            bytes,
            max_bytes,
            msgs: 1,
            max_msgs: -1,
        }
    }

    #[test]
    fn alerts_at_the_ratio_and_not_below_or_without_a_limit() {
        assert!(conditions(&[usage(79, 100)], 0.8).is_empty());
        let c = conditions(&[usage(80, 100)], 0.8);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, NEAR_LIMIT);
        assert!(c[0].reason.contains("80 bytes of 100"), "{}", c[0].reason);
        assert!(conditions(&[usage(1_000, -1)], 0.8).is_empty());
    }
}
