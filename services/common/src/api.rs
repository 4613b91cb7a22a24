//! Replies of request/reply endpoints.
//!
//! A success is the JSON body. An error is `{"error": {"code", "message"}}` together with the NATS
//! micro error headers `Nats-Service-Error-Code` (an HTTP-like status) and `Nats-Service-Error`
//! (the message), so both `nats req` users and micro-aware clients see it (CONTRACT section 2).

use async_nats::HeaderMap;
use async_nats::service::Request;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Header carrying the error message of a NATS micro reply.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// Header carrying the error status code of a NATS micro reply.
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// An error answered to a request: what went wrong, in words a client can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP-like status: 400 bad input, 403 forbidden, 404 unknown, 409 conflict, 500 internal.
    pub status: u16,
    /// Stable machine-readable code, e.g. `invalid_intent`.
    pub code: String,
    /// Human-readable explanation naming the problem.
    pub message: String,
}

impl ApiError {
    /// An error with the given status, code and message. A message longer than
    /// [`MAX_MESSAGE_BYTES`] is cut (hostile input echoed in it must not make replies, headers,
    /// logs or narratives huge).
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: bounded(message.into(), MAX_MESSAGE_BYTES),
        }
    }
    /// 400: the request itself is wrong.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }
    /// 403: the caller may not do this.
    pub fn forbidden(code: &str, message: impl Into<String>) -> Self {
        Self::new(403, code, message)
    }
    /// 404: the thing asked about does not exist.
    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(404, code, message)
    }
    /// 409: the request conflicts with the current state.
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(409, code, message)
    }
    /// 500: bulwark failed; the client may retry.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }
    /// 503: a dependency (JetStream) is unavailable; the client may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "unavailable", message)
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.clone(),
                message: self.message.clone(),
            },
        }
    }
}

/// `{"error": {...}}`, the body of every error reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an error reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Serialises `value` for a reply; serialisation of our own types cannot fail in practice, and if
/// it does the client gets an internal error rather than nothing.
pub fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(body) => Bytes::from(body),
        Err(err) => error_bytes(&ApiError::internal(format!(
            "could not encode reply: {err}"
        ))),
    }
}

fn error_bytes(err: &ApiError) -> Bytes {
    Bytes::from(serde_json::to_vec(&err.body()).unwrap_or_else(|_| b"{\"error\":{}}".to_vec()))
}

/// The headers of an error reply.
pub fn error_headers(err: &ApiError) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(SERVICE_ERROR_CODE, err.status.to_string().as_str());
    // Header values may not hold line breaks.
    headers.insert(
        SERVICE_ERROR,
        err.message.replace(['\r', '\n'], " ").as_str(),
    );
    headers
}

/// Largest reply the server carries (its `max_payload`, learnt when a service registers), less
/// room for headers; 0 until known.
static MAX_REPLY_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Records the server's `max_payload` (see [`respond`]).
pub fn set_max_payload(max_payload: usize) {
    MAX_REPLY_BYTES.store(
        max_payload.saturating_sub(4096),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Answers a micro request with `result`: the JSON value, or the error body with error headers.
/// A reply larger than the server carries is answered with 413 `reply_too_large` instead (the
/// requester would otherwise wait for an answer that never comes). A failed reply (client gone,
/// connection down) is logged; it never ends the caller's loop.
pub async fn respond<T: Serialize>(request: &Request, result: Result<T, ApiError>) {
    let outcome = match result {
        Ok(value) => {
            let body = to_bytes(&value);
            let max = MAX_REPLY_BYTES.load(std::sync::atomic::Ordering::Relaxed);
            if max > 0 && body.len() > max {
                let err = ApiError::new(
                    413,
                    "reply_too_large",
                    format!(
                        "the reply is {} bytes, over the {max} the server carries; ask for less (e.g. a smaller \"limit\")",
                        body.len()
                    ),
                );
                tracing::warn!(subject = %request.message.subject, bytes = body.len(), max, "reply too large; answered with an error");
                request
                    .respond_with_headers(Ok(error_bytes(&err)), error_headers(&err))
                    .await
            } else {
                request.respond(Ok(body)).await
            }
        }
        Err(err) => {
            request
                .respond_with_headers(Ok(error_bytes(&err)), error_headers(&err))
                .await
        }
    };
    if let Err(err) = outcome {
        tracing::warn!(error = %err, subject = %request.message.subject, "could not send reply");
    }
}

/// Longest error message kept, in bytes; the rest is replaced by a note of how much was cut.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes (on a character boundary) plus a note of the cut.
pub fn bounded(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("... ({total} bytes, cut)"));
    text
}

/// `value` quoted for an error message, at most `max` bytes of it: hostile input may be echoed,
/// never in full.
pub fn excerpt(value: &str, max: usize) -> String {
    if value.len() <= max {
        return format!("{value:?}");
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &value[..end], value.len())
}

/// Parses JSON like `serde_json::from_slice` (UTF-8 checked, nesting limited to 128 levels, so
/// deep input is an error, not a stack overflow), and also refuses an object with the same key
/// twice: readers that keep the first and readers that keep the last would see different
/// requests.
pub fn parse_json(payload: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_slice::<StrictValue>(payload).map(|v| v.0)
}

/// A JSON value whose objects have unique keys.
struct StrictValue(serde_json::Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .ok_or_else(|| E::custom(format!("number {v} is not finite")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {}",
                    excerpt(&key, 64)
                )));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// Decodes a JSON request body into `T`, or a 400 `code` error whose message says what is wrong.
pub fn decode<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    code: &str,
    max_bytes: usize,
) -> Result<T, ApiError> {
    if payload.len() > max_bytes {
        return Err(ApiError::bad_request(
            code,
            format!(
                "body is {} bytes, over the limit of {max_bytes} bytes",
                payload.len()
            ),
        ));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            code,
            "body is empty: expected a JSON object",
        ));
    }
    let value = parse_json(payload)
        .map_err(|err| ApiError::bad_request(code, format!("body is not valid JSON: {err}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            code,
            format!("body must be a JSON object, got {}", json_kind(&value)),
        ));
    }
    serde_json::from_value(value).map_err(|err| ApiError::bad_request(code, format!("{err}")))
}

/// The JSON kind of `value`, for error messages ("an array", "a string").
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        name: String,
    }

    #[test]
    fn decode_names_the_problem() {
        let err = decode::<Probe>(b"not json", "bad", 100).expect_err("invalid");
        assert!(err.message.contains("not valid JSON"), "{err}");
        let err = decode::<Probe>(b"[1]", "bad", 100).expect_err("array");
        assert!(err.message.contains("an array"), "{err}");
        let err = decode::<Probe>(b"{\"name\": 3}", "bad", 100).expect_err("wrong type");
        assert!(err.message.contains("invalid type"), "{err}");
        let err = decode::<Probe>(b"{\"name\": \"x\"}", "bad", 5).expect_err("too big");
        assert!(err.message.contains("over the limit"), "{err}");
        let err = decode::<Probe>(b"  ", "bad", 100).expect_err("empty");
        assert!(err.message.contains("empty"), "{err}");
        assert_eq!(
            decode::<Probe>(b"{\"name\":\"x\"}", "bad", 100)
                .expect("ok")
                .name,
            "x"
        );
    }

    #[test]
    fn duplicate_keys_deep_nesting_and_long_echoes_are_refused_or_cut() {
        let err = decode::<Probe>(br#"{"name":"a","name":"b"}"#, "bad", 100).expect_err("dup");
        assert!(err.message.contains("duplicate key \"name\""), "{err}");
        let nested = parse_json(br#"{"a":{"b":1,"b":2}}"#).expect_err("nested dup");
        assert!(nested.to_string().contains("duplicate key"), "{nested}");
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = parse_json(deep.as_bytes()).expect_err("deep");
        assert!(err.to_string().contains("recursion limit"), "{err}");
        assert_eq!(
            parse_json(br#"{"a":[1,-2,3.5,null,true,"x"]}"#).expect("ok"),
            serde_json::json!({"a":[1,-2,3.5,null,true,"x"]})
        );
        let long = ApiError::bad_request("x", "é".repeat(5000));
        assert!(
            long.message.len() < MAX_MESSAGE_BYTES + 40,
            "{}",
            long.message.len()
        );
        assert!(
            long.message.ends_with("(10000 bytes, cut)"),
            "{}",
            long.message
        );
        assert_eq!(excerpt("abc", 2), "\"ab\"... (3 bytes)");
    }

    #[test]
    fn error_headers_are_single_line() {
        let headers = error_headers(&ApiError::bad_request("x", "line one\nline two"));
        assert_eq!(
            headers.get(SERVICE_ERROR_CODE).map(|v| v.as_str()),
            Some("400")
        );
        assert_eq!(
            headers.get(SERVICE_ERROR).map(|v| v.as_str()),
            Some("line one line two")
        );
    }
}
