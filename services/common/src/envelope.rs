//! The trigger mesh envelope (CONTRACT section 1) and its normalisation: an event published by
//! hand with only `event_type`/`source`/`payload` gets ids, a time and depth 0; an event that
//! cannot be an envelope is refused with a reason, for the dead-letter subject.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Deepest causal depth an envelope may claim; anything above is treated as hostile.
pub const MAX_DEPTH: u64 = 10_000;

/// One mesh event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshEvent {
    /// Unique id (UUIDv7 unless the publisher chose one).
    pub event_id: String,
    /// Dot-separated type, e.g. `task.completed`; the subject is `mesh.<event_type>`.
    pub event_type: String,
    /// The publishing component.
    pub source: String,
    /// The agent or worker acting.
    #[serde(default)]
    pub actor: Option<String>,
    /// The resource concerned, e.g. `task/<id>`.
    #[serde(default)]
    pub resource: Option<String>,
    /// The subsystem, e.g. `htm`.
    #[serde(default)]
    pub subsystem: Option<String>,
    /// When it happened, RFC 3339 UTC.
    pub timestamp: String,
    /// Id of the flow's first event or intent.
    pub correlation_id: String,
    /// Id of the event that directly caused this one; `None` for a root.
    pub causation_id: Option<String>,
    /// Number of causal hops from the root (0 for a root).
    pub depth: u64,
    /// Event-specific data.
    pub payload: Value,
    /// `(event_type, source)` of every ancestor, root first (bulwark's addition: the event
    /// policy engine detects cycles with it). Empty for a root; absent from the JSON then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lineage: Vec<(String, String)>,
}

/// The id and time normalisation gives an event that has none.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    /// The `event_id` to use.
    pub event_id: String,
    /// The `timestamp` to use.
    pub timestamp: String,
}

impl Assigned {
    /// A fresh UUIDv7 and the current time (an event being published).
    pub fn fresh() -> Assigned {
        Assigned {
            event_id: crate::ids::new_id(),
            timestamp: crate::time::now(),
        }
    }

    /// The id and time of the event stored at `stream_seq` at `stored_ms` (milliseconds since
    /// the epoch): a UUIDv7 built from both, so every consumer of the stream assigns the same id
    /// to the same partial event.
    pub fn stored(stream_seq: u64, stored_ms: i64) -> Assigned {
        let mut tail = [0u8; 10];
        tail[2..].copy_from_slice(&stream_seq.to_be_bytes());
        let id =
            uuid::Builder::from_unix_timestamp_millis(stored_ms.max(0) as u64, &tail).into_uuid();
        Assigned {
            event_id: id.to_string(),
            timestamp: crate::time::format_ms(stored_ms),
        }
    }
}

impl MeshEvent {
    /// A root event published by `source`.
    pub fn root(event_type: &str, source: &str, payload: Value) -> MeshEvent {
        let event_id = crate::ids::new_id();
        MeshEvent {
            correlation_id: event_id.clone(),
            event_id,
            event_type: event_type.to_owned(),
            source: source.to_owned(),
            actor: None,
            resource: None,
            subsystem: None,
            timestamp: crate::time::now(),
            causation_id: None,
            depth: 0,
            payload,
            lineage: Vec::new(),
        }
    }

    /// An event caused by `self`: same correlation, causation = this event, depth + 1.
    pub fn child(&self, event_type: &str, source: &str, payload: Value) -> MeshEvent {
        let mut child = MeshEvent::root(event_type, source, payload);
        child.correlation_id = self.correlation_id.clone();
        child.causation_id = Some(self.event_id.clone());
        child.depth = self.depth + 1;
        child.lineage = self.lineage.clone();
        child
            .lineage
            .push((self.event_type.clone(), self.source.clone()));
        child
    }

    /// Parses and normalises a raw event received on `subject` (`mesh.<event_type>`).
    /// Missing ids, time and depth are filled in; a missing `event_type` is taken from the
    /// subject. Returns the reason when the body cannot be an envelope.
    pub fn normalise(subject: &str, body: &[u8], max_bytes: usize) -> Result<MeshEvent, String> {
        Self::normalise_assigning(subject, body, max_bytes, Assigned::fresh)
    }

    /// Like [`normalise`](Self::normalise), with `assign` giving the id and time of an event
    /// that lacks them (see [`Assigned::stored`]).
    pub fn normalise_assigning(
        subject: &str,
        body: &[u8],
        max_bytes: usize,
        assign: impl FnOnce() -> Assigned,
    ) -> Result<MeshEvent, String> {
        if body.len() > max_bytes {
            return Err(format!(
                "event is {} bytes, over the limit of {max_bytes}",
                body.len()
            ));
        }
        let value = crate::api::parse_json(body).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(mut obj) = value else {
            return Err(format!(
                "event must be a JSON object, got {}",
                crate::api::json_kind(&value)
            ));
        };
        let subject_type = crate::subjects::mesh_subject(subject)
            .map(|m| m.event_type)
            .unwrap_or(subject)
            .to_owned();
        // The type is the subject's: a body that claims another is refused, not believed.
        let event_type = match opt_string(&mut obj, "event_type")? {
            Some(claimed) if claimed != subject_type => {
                return Err(format!(
                    "event_type {} disagrees with the subject {} (the subject decides the type)",
                    crate::api::excerpt(&claimed, 128),
                    crate::api::excerpt(subject, 128)
                ));
            }
            _ => subject_type,
        };
        if !crate::subjects::is_valid_event_type(&event_type) {
            return Err(format!(
                "event_type {} is not dot-separated tokens of [a-z0-9_-]",
                crate::api::excerpt(&event_type, 128)
            ));
        }
        let source = opt_string(&mut obj, "source")?.unwrap_or_else(|| "unknown".to_owned());
        let given_id = opt_string(&mut obj, "event_id")?;
        let given_time = opt_string(&mut obj, "timestamp")?;
        let assigned = (given_id.is_none() || given_time.is_none()).then(assign);
        let event_id = given_id
            .or_else(|| assigned.as_ref().map(|a| a.event_id.clone()))
            .unwrap_or_else(crate::ids::new_id);
        let timestamp = match given_time {
            Some(ts) if crate::time::parse_ms(&ts).is_none() => {
                return Err(format!(
                    "timestamp {} is not RFC 3339",
                    crate::api::excerpt(&ts, 64)
                ));
            }
            Some(ts) => ts,
            None => assigned
                .map(|a| a.timestamp)
                .unwrap_or_else(crate::time::now),
        };
        let depth = match obj.remove("depth") {
            None | Some(Value::Null) => 0,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(d) if d <= MAX_DEPTH => d,
                _ => {
                    return Err(format!(
                        "depth must be an integer from 0 to {MAX_DEPTH}, got {n}"
                    ));
                }
            },
            Some(other) => {
                return Err(format!(
                    "depth must be an integer, got {}",
                    crate::api::json_kind(&other)
                ));
            }
        };
        let correlation_id =
            opt_string(&mut obj, "correlation_id")?.unwrap_or_else(|| event_id.clone());
        let causation_id = opt_string(&mut obj, "causation_id")?;
        let payload = match obj.remove("payload") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => v,
            Some(other) => {
                return Err(format!(
                    "payload must be a JSON object, got {}",
                    crate::api::json_kind(&other)
                ));
            }
        };
        let lineage = match obj.remove("lineage") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => lineage(v)?,
        };
        Ok(MeshEvent {
            event_id,
            event_type,
            source,
            actor: opt_string(&mut obj, "actor")?,
            resource: opt_string(&mut obj, "resource")?,
            subsystem: opt_string(&mut obj, "subsystem")?,
            timestamp,
            correlation_id,
            causation_id,
            depth,
            payload,
            lineage,
        })
    }
}

impl MeshEvent {
    /// This event as published by `user`, a client of another account (it arrived on
    /// `ingress.mesh.<user>.<type>`): its source is the user, whatever the body said; it is a root
    /// (depth 0, no causation, no lineage), since only services' events may continue a causal
    /// chain; a correlation id it chose is kept under the user's name (`<user>:<id>`), so it
    /// cannot spend another flow's budget. The safeguards' own types
    /// ([`MESH_RESERVED`](crate::subjects::MESH_RESERVED)) are refused.
    pub fn from_identity(mut self, user: &str) -> Result<MeshEvent, String> {
        if let Some(reserved) = crate::subjects::MESH_RESERVED
            .iter()
            .find(|pattern| crate::mesh::subject_matches(pattern, &self.event_type))
        {
            return Err(format!(
                "event type {} is reserved for bulwark's services ({reserved}); {user} may not publish it",
                self.event_type
            ));
        }
        self.source = user.to_owned();
        self.depth = 0;
        self.causation_id = None;
        self.lineage.clear();
        self.correlation_id = if self.correlation_id == self.event_id {
            self.event_id.clone()
        } else {
            format!("{user}:{}", self.correlation_id)
        };
        Ok(self)
    }
}

fn lineage(value: Value) -> Result<Vec<(String, String)>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "lineage must be an array, got {}",
            crate::api::json_kind(&value)
        ));
    };
    if items.len() as u64 > MAX_DEPTH {
        return Err(format!("lineage has more than {MAX_DEPTH} entries"));
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::Array(pair) => match <[Value; 2]>::try_from(pair) {
                Ok([Value::String(t), Value::String(s)]) => Ok((t, s)),
                _ => Err("lineage entries must be [event_type, source] string pairs".to_owned()),
            },
            _ => Err("lineage entries must be [event_type, source] string pairs".to_owned()),
        })
        .collect()
}

fn opt_string(obj: &mut Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!(
            "{key} must be a string, got {}",
            crate::api::json_kind(&other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_events_are_normalised() {
        let e = MeshEvent::normalise("mesh.x.y", br#"{"source":"me","payload":{"a":1}}"#, 1024)
            .expect("ok");
        assert_eq!(e.event_type, "x.y");
        assert_eq!(e.depth, 0);
        assert_eq!(e.correlation_id, e.event_id);
        assert!(e.causation_id.is_none());
        let child = e.child("z", "rule", Value::Object(Map::new()));
        assert_eq!(
            (child.depth, child.causation_id.as_deref()),
            (1, Some(e.event_id.as_str()))
        );
        assert_eq!(child.correlation_id, e.correlation_id);
        assert_eq!(child.lineage, vec![("x.y".to_owned(), "me".to_owned())]);
        let text = serde_json::to_vec(&child).expect("json");
        assert_eq!(
            MeshEvent::normalise("mesh.z", &text, 4096).expect("round trip"),
            child
        );
    }

    #[test]
    fn stored_partial_events_get_the_same_id_everywhere() {
        let body = br#"{"source":"me"}"#;
        let a = MeshEvent::normalise_assigning("mesh.a", body, 1024, || {
            Assigned::stored(42, 1_795_687_500_123)
        })
        .expect("ok");
        let b = MeshEvent::normalise_assigning("mesh.a", body, 1024, || {
            Assigned::stored(42, 1_795_687_500_123)
        })
        .expect("ok");
        assert_eq!(a, b);
        assert_eq!(a.timestamp, "2026-11-26T10:05:00.123Z");
        assert_eq!(
            uuid::Uuid::parse_str(&a.event_id)
                .expect("uuid")
                .get_version_num(),
            7
        );
        assert_ne!(a.event_id, Assigned::stored(43, 1_795_687_500_123).event_id);
    }

    #[test]
    fn malformed_events_have_reasons() {
        for (body, reason) in [
            (&b"{nope"[..], "not valid JSON"),
            (b"[1]", "must be a JSON object"),
            (br#"{"depth": -1}"#, "depth must be an integer from 0"),
            (br#"{"depth": 1e9}"#, "depth must be an integer"),
            (br#"{"source": 5}"#, "source must be a string"),
            (
                br#"{"event_type": "Bad Type"}"#,
                "disagrees with the subject",
            ),
            (
                br#"{"event_type": "layer2.critical_alert"}"#,
                "disagrees with the subject",
            ),
            (br#"{"payload": "x"}"#, "payload must be a JSON object"),
            (br#"{"lineage": [["a", 1]]}"#, "lineage entries"),
            (
                br#"{"source": "a", "source": "b"}"#,
                "duplicate key \"source\"",
            ),
        ] {
            let err = MeshEvent::normalise("mesh.a", body, 1024).expect_err("malformed");
            assert!(err.contains(reason), "{err} lacks {reason}");
        }
        assert!(
            MeshEvent::normalise("mesh.a", &[b' '; 2000], 1024)
                .expect_err("big")
                .contains("over the limit")
        );
        assert!(
            MeshEvent::normalise("mesh.Bad", b"{}", 1024)
                .expect_err("bad subject type")
                .contains("is not dot-separated")
        );
    }

    #[test]
    fn the_subject_decides_the_type_on_both_subject_spaces() {
        let own = MeshEvent::normalise("mesh.x.y", br#"{"event_type":"x.y"}"#, 1024).expect("ok");
        assert_eq!(own.event_type, "x.y");
        let ingress = MeshEvent::normalise("ingress.mesh.agent.x.y", b"{}", 1024).expect("ok");
        assert_eq!(ingress.event_type, "x.y");
    }

    #[test]
    fn an_identitys_event_is_its_own_root() {
        let body = br#"{"event_id":"e1","source":"watchdog","depth":9,"causation_id":"c",
                        "correlation_id":"victim","lineage":[["a","b"]]}"#;
        let e = MeshEvent::normalise("ingress.mesh.agent.agent.x", body, 1024)
            .expect("ok")
            .from_identity("agent")
            .expect("allowed type");
        assert_eq!(e.source, "agent");
        assert_eq!(e.depth, 0);
        assert_eq!(e.causation_id, None);
        assert!(e.lineage.is_empty());
        assert_eq!(e.correlation_id, "agent:victim");
        let plain =
            MeshEvent::normalise("ingress.mesh.agent.agent.x", br#"{"event_id":"e2"}"#, 1024)
                .expect("ok")
                .from_identity("agent")
                .expect("allowed");
        assert_eq!(
            plain.correlation_id, "e2",
            "a root's correlation is its own id"
        );
        for reserved in [
            "layer2.critical_alert",
            "event.incident",
            "task.failed",
            "deadletter",
        ] {
            let err = MeshEvent::normalise(&format!("ingress.mesh.agent.{reserved}"), b"{}", 1024)
                .expect("ok")
                .from_identity("agent")
                .expect_err("reserved");
            assert!(err.contains("reserved for bulwark's services"), "{err}");
        }
    }
}
