//! `clarity.query`, pure: parsing the request into a [`Filter`] and matching audit records
//! against it. No I/O.

use std::collections::VecDeque;

use bulwark_common::api::ApiError;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::chain::AuditRecord;

/// Error code of refused queries.
pub const INVALID_QUERY: &str = "invalid_query";
/// Largest `clarity.query` body accepted, in bytes.
const MAX_QUERY_BYTES: usize = 64 * 1024;

/// The request body of `clarity.query`; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    who: Option<String>,
    what: Option<String>,
    intent_id: Option<String>,
    correlation_id: Option<String>,
    since: Option<String>,
    limit: Option<u64>,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Only narratives of this component.
    pub who: Option<String>,
    /// Only narratives with this `what`.
    pub what: Option<String>,
    /// Only narratives about this intent.
    pub intent_id: Option<String>,
    /// Only narratives of this flow.
    pub correlation_id: Option<String>,
    /// Only narratives from this time on, milliseconds since the epoch.
    pub since_ms: Option<i64>,
    /// At most this many, the newest.
    pub limit: usize,
}

impl Filter {
    /// Parses a request body. An empty body means "no filter". `now_ms` resolves relative
    /// `since` durations (`10m` = ten minutes before now).
    pub fn parse(
        body: &[u8],
        now_ms: i64,
        default_limit: usize,
        max_limit: usize,
    ) -> Result<Self, ApiError> {
        // An empty body asks for everything; an oversize one is refused even when it is blank.
        let req: QueryRequest =
            if body.len() <= MAX_QUERY_BYTES && body.iter().all(u8::is_ascii_whitespace) {
                QueryRequest::default()
            } else {
                bulwark_common::api::decode(body, INVALID_QUERY, MAX_QUERY_BYTES)?
            };
        let limit = match req.limit {
            None => default_limit,
            Some(n) if n >= 1 && n <= max_limit as u64 => n as usize,
            Some(n) => {
                return Err(ApiError::bad_request(
                    INVALID_QUERY,
                    format!("limit must be between 1 and {max_limit}, got {n}"),
                ));
            }
        };
        let since_ms = match req.since.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(parse_since(text, now_ms).ok_or_else(|| {
                ApiError::bad_request(
                    INVALID_QUERY,
                    format!(
                        "since {text:?} is neither an RFC 3339 time (2026-11-26T10:00:00Z) nor a duration (30s, 10m, 2h, 1d, 1h30m)"
                    ),
                )
            })?),
        };
        Ok(Filter {
            who: req.who,
            what: req.what,
            intent_id: req.intent_id,
            correlation_id: req.correlation_id,
            since_ms,
            limit,
        })
    }

    /// True when `record`'s narrative passes every condition. Time is the narrative's `when`,
    /// or the record's `stored_at` when `when` is missing or not a time.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let n = &record.narrative;
        let field_is = |key: &str, want: &Option<String>| match want {
            None => true,
            Some(want) => n.get(key).and_then(Value::as_str) == Some(want.as_str()),
        };
        if !(field_is("who", &self.who)
            && field_is("what", &self.what)
            && field_is("intent_id", &self.intent_id)
            && field_is("correlation_id", &self.correlation_id))
        {
            return false;
        }
        match self.since_ms {
            None => true,
            Some(since) => {
                let at = n
                    .get("when")
                    .and_then(Value::as_str)
                    .and_then(bulwark_common::time::parse_ms)
                    .or_else(|| bulwark_common::time::parse_ms(&record.stored_at));
                at.is_some_and(|at| at >= since)
            }
        }
    }
}

/// Parses `since`: an RFC 3339 time, or a duration before `now_ms` made of `<number><unit>`
/// parts with units `ms`, `s`, `m`, `h`, `d` (`30s`, `10m`, `1h30m`).
pub fn parse_since(text: &str, now_ms: i64) -> Option<i64> {
    if let Some(ms) = bulwark_common::time::parse_ms(text) {
        return Some(ms);
    }
    parse_duration_ms(text).map(|d| now_ms.saturating_sub(d))
}

/// Parses a duration like `10m`, `2h`, `1h30m`, `500ms` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Option<i64> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: i64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: i64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(number.checked_mul(unit_ms)?)?;
    }
    Some(total)
}

/// Keeps the newest `limit` matches of a scan that goes oldest to newest.
#[derive(Debug)]
pub struct Newest {
    items: VecDeque<Value>,
    limit: usize,
}

impl Newest {
    /// An empty collection keeping at most `limit` items.
    pub fn new(limit: usize) -> Self {
        Self {
            items: VecDeque::with_capacity(limit.min(1024)),
            limit,
        }
    }

    /// Offers the next record; kept as an item when it matches `filter`.
    pub fn offer(&mut self, filter: &Filter, record: &AuditRecord) {
        if !filter.matches(record) {
            return;
        }
        self.items.push_back(item(record));
        if self.items.len() > self.limit {
            self.items.pop_front();
        }
    }

    /// The items, oldest first (newest last).
    pub fn into_items(self) -> Vec<Value> {
        self.items.into()
    }
}

/// A record as a query item: the narrative as received, with an `audit` object added (`seq`,
/// `valid`, `invalid_reason` when invalid, `stored_at`). A narrative that is not a JSON object is
/// given as `raw`.
pub fn item(record: &AuditRecord) -> Value {
    let mut audit =
        json!({"seq": record.seq, "valid": record.valid, "stored_at": record.stored_at});
    if let Some(reason) = &record.invalid_reason {
        audit["invalid_reason"] = json!(reason);
    }
    match &record.narrative {
        Value::Object(map) => {
            let mut map = map.clone();
            map.insert("audit".into(), audit);
            Value::Object(map)
        }
        other => json!({"raw": other, "audit": audit}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{AuditRecord, Head, examine};

    const NOW: i64 = 1_795_687_200_000; // 2026-11-26T10:00:00Z

    fn record(seq: u64, body: Value) -> AuditRecord {
        AuditRecord::next(
            &Head {
                seq: seq - 1,
                hash: String::new(),
                stored_at: None,
            },
            examine(&serde_json::to_vec(&body).expect("json")),
            "2026-11-26T10:00:00.000Z".into(),
            "clarity.narrative.x".into(),
            seq,
            None,
        )
    }

    fn parse(body: &str) -> Result<Filter, ApiError> {
        Filter::parse(body.as_bytes(), NOW, 100, 1000)
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("10m"), Some(600_000));
        assert_eq!(parse_duration_ms("2h"), Some(7_200_000));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        for bad in [
            "",
            "10",
            "m",
            "10x",
            "-5m",
            "1.5h",
            "10m5",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
        assert_eq!(parse_since("10m", NOW), Some(NOW - 600_000));
        assert_eq!(
            parse_since("2026-11-26T09:00:00Z", NOW),
            Some(NOW - 3_600_000)
        );
        assert_eq!(parse_since("yesterday", NOW), None);
    }

    #[test]
    fn requests_parse_with_defaults_and_bad_ones_name_the_problem() {
        let f = parse("").expect("empty body");
        assert_eq!(f.limit, 100);
        assert_eq!(f.since_ms, None);
        let f = parse(r#"{"who":"governance","since":"1h","limit":5}"#).expect("ok");
        assert_eq!(f.who.as_deref(), Some("governance"));
        assert_eq!(f.since_ms, Some(NOW - 3_600_000));
        assert_eq!(f.limit, 5);
        let cases = [
            (r#"{"since":"soon"}"#, "since \"soon\""),
            (r#"{"limit":0}"#, "between 1 and 1000"),
            (r#"{"limit":5000}"#, "between 1 and 1000"),
            (r#"{"limit":"ten"}"#, "invalid type"),
            (r#"{"whom":"x"}"#, "unknown field"),
            ("not json", "not valid JSON"),
            ("[]", "an array"),
        ];
        for (body, needle) in cases {
            let err = parse(body).expect_err(body);
            assert_eq!(err.status, 400);
            assert_eq!(err.code, INVALID_QUERY);
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
    }

    #[test]
    fn filters_match_fields_and_time() {
        let n = |who: &str, what: &str, when: &str| {
            json!({"who": who, "what": what, "when": when, "where": "w", "why": [], "how": "h",
                   "intent_id": "i1", "correlation_id": "c1"})
        };
        let old = record(1, n("governance", "intent_routed", "2026-11-26T08:00:00Z"));
        let new = record(2, n("scheduler", "task_dispatched", "2026-11-26T09:59:00Z"));
        let f = parse(r#"{"who":"governance"}"#).expect("ok");
        assert!(f.matches(&old) && !f.matches(&new));
        let f = parse(r#"{"what":"task_dispatched","intent_id":"i1","correlation_id":"c1"}"#)
            .expect("ok");
        assert!(!f.matches(&old) && f.matches(&new));
        let f = parse(r#"{"intent_id":"other"}"#).expect("ok");
        assert!(!f.matches(&old) && !f.matches(&new));
        let f = parse(r#"{"since":"10m"}"#).expect("ok");
        assert!(!f.matches(&old) && f.matches(&new));
        // A narrative without a usable `when` is dated by its storage time.
        let bad = record(3, json!("not an object"));
        let f = parse(r#"{"since":"2026-11-26T09:00:00Z"}"#).expect("ok");
        assert!(f.matches(&bad));
    }

    #[test]
    fn newest_keeps_the_last_matches_in_order() {
        let f = parse(r#"{"limit":2}"#).expect("ok");
        let mut newest = Newest::new(f.limit);
        for seq in 1..=5 {
            newest.offer(&f, &record(seq, json!({"who": "x"})));
        }
        let seqs: Vec<u64> = newest
            .into_items()
            .iter()
            .map(|i| i["audit"]["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(seqs, vec![4, 5]);
        let raw = item(&record(1, json!([1])));
        assert_eq!(raw["raw"], json!([1]));
        assert_eq!(raw["audit"]["valid"], json!(false));
    }
}
