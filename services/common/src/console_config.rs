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
