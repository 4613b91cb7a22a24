//! Identifiers: UUIDv7 strings (time-ordered), used also as `Nats-Msg-Id` for JetStream dedup.

/// A new UUIDv7 as a string.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
