//! Who sent a message, as the NATS server says it, never as the message says it.
//!
//! bulwark's services live in the `BULWARK` account of `nats.conf`; agents, people and workers
//! live in accounts of their own and reach bulwark only through service imports declared with
//! `share: true`. On every message that crosses such an import the server sets the header
//! `Nats-Request-Info` to the sender's account and user (a header the client wrote under that
//! name is replaced, not kept). So:
//! - a message **with** the header came from outside bulwark's account, and its `user` is the
//!   authenticated NATS user that published it;
//! - a message **without** it was published inside bulwark's account, by a service.
//!
//! `docs/security.md` describes the accounts; `tests/trust_boundary.rs` holds the code to it.

use async_nats::HeaderMap;
use serde::Deserialize;

/// The header the server sets on messages crossing a shared service import.
pub const REQUEST_INFO: &str = "Nats-Request-Info";

/// Who published a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// One of bulwark's services (published inside the bulwark account).
    Service,
    /// A client of another account: its account and user as the server authenticated them.
    Identity {
        /// The NATS account, e.g. `AGENTS`.
        account: String,
        /// The NATS user, e.g. `agent` or `worker`.
        user: String,
    },
}

impl Sender {
    /// True for bulwark's own services.
    pub fn is_service(&self) -> bool {
        matches!(self, Sender::Service)
    }

    /// The user name of an identity; `None` for a service.
    pub fn user(&self) -> Option<&str> {
        match self {
            Sender::Service => None,
            Sender::Identity { user, .. } => Some(user),
        }
    }

    /// A short name for logs, narratives and counters: `service`, or the user name.
    pub fn name(&self) -> &str {
        match self {
            Sender::Service => "service",
            Sender::Identity { user, .. } => user,
        }
    }
}

#[derive(Deserialize)]
struct RequestInfo {
    #[serde(default)]
    acc: String,
    #[serde(default)]
    user: String,
}

/// Name given to an identity whose header cannot be read (never a service).
pub const UNKNOWN: &str = "unknown";

/// The sender of a message with these headers (see the module documentation). A header that
/// is present but cannot be read is an identity named [`UNKNOWN`], never a service.
pub fn sender(headers: Option<&HeaderMap>) -> Sender {
    let Some(value) = headers.and_then(|h| h.get(REQUEST_INFO)) else {
        return Sender::Service;
    };
    match serde_json::from_str::<RequestInfo>(value.as_str()) {
        Ok(info) => Sender::Identity {
            account: non_empty(info.acc),
            user: non_empty(info.user),
        },
        Err(_) => Sender::Identity {
            account: UNKNOWN.to_owned(),
            user: UNKNOWN.to_owned(),
        },
    }
}

fn non_empty(text: String) -> String {
    if text.is_empty() {
        UNKNOWN.to_owned()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_header_is_a_service() {
        assert_eq!(sender(None), Sender::Service);
        assert_eq!(sender(Some(&HeaderMap::new())), Sender::Service);
    }

    #[test]
    fn the_header_names_the_identity() {
        let mut h = HeaderMap::new();
        h.insert(
            REQUEST_INFO,
            r#"{"start":"x","acc":"AGENTS","user":"agent","rtt":1}"#,
        );
        assert_eq!(
            sender(Some(&h)),
            Sender::Identity {
                account: "AGENTS".into(),
                user: "agent".into()
            }
        );
    }

    #[test]
    fn an_unreadable_header_is_never_a_service() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_INFO, "not json");
        let s = sender(Some(&h));
        assert!(!s.is_service());
        assert_eq!(s.name(), UNKNOWN);
        let mut h = HeaderMap::new();
        h.insert(REQUEST_INFO, "{}");
        assert_eq!(sender(Some(&h)).name(), UNKNOWN);
    }
}
