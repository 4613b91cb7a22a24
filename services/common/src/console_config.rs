//! The `[console]` and `[notify]` sections of `bulwark.toml`: the web console for the people in
//! the loop and the webhooks that tell them something waits (docs/console.md).

use serde::{Deserialize, Serialize};

/// The web console (`bulwark console`, also started by `bulwark up`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Address the console listens on (loopback by default); empty: no console.
    pub listen: String,
    /// Signed-in sessions held at once (each is one NATS connection); a sign-in beyond it is
    /// refused until one ends.
    pub max_sessions: usize,
    /// Seconds without a request after which a session ends and its NATS connection closes.
    pub session_idle_s: f64,
    /// Narratives the live narratives page keeps per viewer (the newest); older ones are counted
    /// as skipped.
    pub live_narratives: usize,
    /// Seconds between two refreshes of a live region fed by requests (overview, review queue,
    /// proposals, an intent's status); regions fed by subscriptions update on each message.
    pub refresh_s: f64,
    /// Where `bulwark chaos` writes its reports (the Chaos page lists its subfolders).
    pub chaos_reports: String,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8420".into(),
            max_sessions: 64,
            session_idle_s: 1800.0,
            live_narratives: 200,
            refresh_s: 1.0,
            chaos_reports: "chaos/reports".into(),
        }
    }
}

impl ConsoleConfig {
    /// Ranges serde cannot check.
    pub fn validate(&self) -> Result<(), String> {
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "console.listen must be host:port (an IP address) or empty, got {:?}",
                self.listen
            ));
        }
        if self.max_sessions == 0 {
            return Err("console.max_sessions must be at least 1".into());
        }
        if self.session_idle_s.is_nan() || self.session_idle_s < 1.0 {
            return Err(format!(
                "console.session_idle_s must be at least 1, got {}",
                self.session_idle_s
            ));
        }
        if !(1..=10_000).contains(&self.live_narratives) {
            return Err(format!(
                "console.live_narratives must be 1-10000, got {}",
                self.live_narratives
            ));
        }
        if self.refresh_s.is_nan() || self.refresh_s < 0.05 {
            return Err(format!(
                "console.refresh_s must be at least 0.05, got {}",
                self.refresh_s
            ));
        }
        Ok(())
    }
}

/// The event kinds a webhook can ask for (docs/console.md, "Notifications").
pub const NOTIFY_KINDS: [&str; 7] = [
    "review_pending",
    "proposal_opened",
    "vote_decided",
    "layer2_alert_raised",
    "layer2_alert_recovered",
    "playbook_failed",
    "breaker_opened",
];

/// Webhook notifications (the `notify` service).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// The receivers (`[[notify.webhooks]]`); none: the service runs and delivers nothing.
    pub webhooks: Vec<WebhookConfig>,
    /// Attempts per delivery, the first included; after the last failed one the delivery is
    /// dead-lettered.
    pub max_attempts: u32,
    /// Wait before the second attempt (ms); doubled before each next one.
    pub backoff_initial_ms: u64,
    /// The longest wait between two attempts (ms).
    pub backoff_max_ms: u64,
    /// One attempt's time limit: connect, send, read the status line (ms).
    pub timeout_ms: u64,
    /// Finished deliveries the log keeps (the newest), served on `notify.log`.
    pub log_size: usize,
    /// Deliveries waiting or retrying at once; one more is dead-lettered at once.
    pub max_pending: usize,
    /// The console's address for links in messages (e.g. `http://bulwark.example:8420`);
    /// empty: `http://<console.listen>` when the console is on, else no link.
    pub console_url: String,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            max_attempts: 5,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            timeout_ms: 5_000,
            log_size: 1_000,
            max_pending: 1_000,
            console_url: String::new(),
        }
    }
}

/// One webhook receiver.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Its name in the delivery log.
    pub name: String,
    /// `http://` or `https://` URL the JSON body is POSTed to.
    pub url: String,
    /// The event kinds it receives (`NOTIFY_KINDS`); empty: all of them.
    pub events: Vec<String>,
    /// Key of the `X-Bulwark-Signature` HMAC-SHA256 of the body; empty: no signature header.
    pub secret: String,
}

impl NotifyConfig {
    /// Ranges and names serde cannot check.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("notify.max_attempts must be at least 1".into());
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err("notify.backoff_max_ms must be at least notify.backoff_initial_ms".into());
        }
        if self.timeout_ms == 0 || self.log_size == 0 || self.max_pending == 0 {
            return Err(
                "notify.timeout_ms, notify.log_size and notify.max_pending must be at least 1"
                    .into(),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            if w.name.trim().is_empty() {
                return Err(format!("notify.webhooks[{i}].name is empty"));
            }
            if !names.insert(w.name.as_str()) {
                return Err(format!(
                    "notify.webhooks: two webhooks are named {:?}",
                    w.name
                ));
            }
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(format!(
                    "notify.webhooks[{i}].url must start with http:// or https://, got {:?}",
                    w.url
                ));
            }
            for kind in &w.events {
                if !NOTIFY_KINDS.contains(&kind.as_str()) {
                    return Err(format!(
                        "notify.webhooks[{i}].events: unknown kind {kind:?} (one of {})",
                        NOTIFY_KINDS.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_named() {
        let ok = ConsoleConfig::default();
        assert!(ok.validate().is_ok());
        let off = ConsoleConfig {
            listen: String::new(),
            ..ConsoleConfig::default()
        };
        assert!(off.validate().is_ok(), "empty listen turns the console off");
        for (bad, key) in [
            (
                ConsoleConfig {
                    listen: "localhost:8420".into(),
                    ..ConsoleConfig::default()
                },
                "console.listen",
            ),
            (
                ConsoleConfig {
                    max_sessions: 0,
                    ..ConsoleConfig::default()
                },
                "console.max_sessions",
            ),
            (
                ConsoleConfig {
                    session_idle_s: 0.5,
                    ..ConsoleConfig::default()
                },
                "console.session_idle_s",
            ),
            (
                ConsoleConfig {
                    live_narratives: 0,
                    ..ConsoleConfig::default()
                },
                "console.live_narratives",
            ),
            (
                ConsoleConfig {
                    refresh_s: f64::NAN,
                    ..ConsoleConfig::default()
                },
                "console.refresh_s",
            ),
        ] {
            let err = bad.validate().expect_err(key);
            assert!(err.contains(key), "{err}");
        }
    }
}
