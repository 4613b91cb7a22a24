//! Lists that always answer: every list endpoint pages (`limit`, `after`), summarises large
//! payloads, and [`crate::api::respond`] refuses, with an error, a reply the server would not
//! carry. A list that grows past `max_payload` must never turn into a silent timeout (an agent
//! filling the review queue with large intents once made `governance.review.pending` go blind).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::ApiError;

/// Items per page when the request does not say.
pub const DEFAULT_LIMIT: usize = 50;
/// Most items a page may hold.
pub const MAX_LIMIT: usize = 500;
/// Largest encoded payload shown whole in a list item; a larger one is summarised.
pub const MAX_LISTED_PAYLOAD_BYTES: usize = 1024;
/// How much of a summarised payload is shown.
const EXCERPT_BYTES: usize = 256;

/// Which page a client asks for: `{"limit": 50, "after": "<next of the previous page>"}`. An
/// empty body (or `{}`) asks for the first page of [`DEFAULT_LIMIT`] items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Items wanted, 1 to [`MAX_LIMIT`].
    pub limit: usize,
    /// The cursor after which to start (the previous page's `next`).
    pub after: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    limit: Option<Value>,
    #[serde(default)]
    after: Option<String>,
}

impl PageRequest {
    /// Parses a list request; a bad `limit` or an unknown field is a 400 `invalid_page`.
    pub fn parse(body: &[u8]) -> Result<PageRequest, ApiError> {
        let bad = |msg: String| ApiError::bad_request("invalid_page", msg);
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(PageRequest {
                limit: DEFAULT_LIMIT,
                after: None,
            });
        }
        let value =
            crate::api::parse_json(body).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let raw: Raw = serde_json::from_value(value).map_err(|e| {
            bad(format!(
                "a list request is {{\"limit\": 1..{MAX_LIMIT}, \"after\": \"<next>\"}}: {e}"
            ))
        })?;
        let limit = match raw.limit {
            None | Some(Value::Null) => DEFAULT_LIMIT,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(l) if (1..=MAX_LIMIT as u64).contains(&l) => l as usize,
                _ => {
                    return Err(bad(format!(
                        "limit must be an integer from 1 to {MAX_LIMIT}, got {n}"
                    )));
                }
            },
            Some(other) => {
                return Err(bad(format!(
                    "limit must be an integer, got {}",
                    crate::api::json_kind(&other)
                )));
            }
        };
        Ok(PageRequest {
            limit,
            after: raw.after.filter(|a| !a.is_empty()),
        })
    }
}

/// One page of a list: `{"items": [...], "next": "<cursor>" | null, "total": N}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    /// The items of this page, in the list's order.
    pub items: Vec<T>,
    /// Give this as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
    /// Items in the whole list.
    pub total: usize,
}

/// The page of `items` (sorted by their cursor, ascending) that `request` asks for.
pub fn page<T>(items: Vec<(String, T)>, request: &PageRequest) -> Page<T> {
    let total = items.len();
    let mut rest: Vec<(String, T)> = items
        .into_iter()
        .filter(|(cursor, _)| request.after.as_ref().is_none_or(|a| cursor > a))
        .collect();
    let more = rest.len() > request.limit;
    rest.truncate(request.limit);
    let next = if more {
        rest.last().map(|(cursor, _)| cursor.clone())
    } else {
        None
    };
    Page {
        items: rest.into_iter().map(|(_, item)| item).collect(),
        next,
        total,
    }
}

/// `payload` itself when its JSON is at most [`MAX_LISTED_PAYLOAD_BYTES`], else a summary:
/// `{"summarised": true, "bytes": N, "keys": [...], "excerpt": "..."}` (the whole payload is in
/// `htm.intent.status`).
pub fn summarise(payload: &Value) -> Value {
    let encoded = serde_json::to_string(payload).unwrap_or_default();
    if encoded.len() <= MAX_LISTED_PAYLOAD_BYTES {
        return payload.clone();
    }
    let mut end = EXCERPT_BYTES;
    while !encoded.is_char_boundary(end) {
        end -= 1;
    }
    let keys: Vec<&str> = payload
        .as_object()
        .map(|m| m.keys().take(32).map(String::as_str).collect())
        .unwrap_or_default();
    json!({"summarised": true, "bytes": encoded.len(), "keys": keys,
           "excerpt": &encoded[..end],
           "whole": "the whole payload is in htm.intent.status"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<(String, usize)> {
        (0..n).map(|i| (format!("k{i:03}"), i)).collect()
    }

    #[test]
    fn pages_walk_the_whole_list_once() {
        let mut request = PageRequest::parse(br#"{"limit": 3}"#).expect("ok");
        let mut seen = Vec::new();
        loop {
            let p = page(items(10), &request);
            assert_eq!(p.total, 10);
            seen.extend(p.items);
            match p.next {
                Some(next) => request.after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn bad_requests_are_refused_with_reasons() {
        assert_eq!(PageRequest::parse(b"").expect("empty").limit, DEFAULT_LIMIT);
        assert_eq!(PageRequest::parse(b"{}").expect("{}").limit, DEFAULT_LIMIT);
        for (body, reason) in [
            (&br#"{"limit": 0}"#[..], "from 1 to"),
            (br#"{"limit": 100000}"#, "from 1 to"),
            (br#"{"limit": "5"}"#, "must be an integer"),
            (br#"{"lmit": 5}"#, "unknown field"),
            (b"[", "not valid JSON"),
        ] {
            let err = PageRequest::parse(body).expect_err("refused");
            assert_eq!(err.status, 400);
            assert!(err.message.contains(reason), "{}", err.message);
        }
    }

    #[test]
    fn large_payloads_are_summarised() {
        let small = json!({"a": 1});
        assert_eq!(summarise(&small), small);
        let big = json!({"blob": "x".repeat(60_000)});
        let s = summarise(&big);
        assert_eq!(s["summarised"], true);
        assert!(serde_json::to_string(&s).expect("json").len() < 1024);
    }
}
