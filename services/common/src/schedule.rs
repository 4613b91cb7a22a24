//! Schedules, `[schedules.<name>]` (docs/actions.md#schedules): an intent submitted on a cron
//! expression's times, as a named actor, through the normal intake. This module is the
//! configuration, its validation and the submission each run makes; governance runs them.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::cron::Cron;

/// What a schedule does about the runs it missed while no governance ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Nothing: the next run is the next time after the start.
    #[default]
    Skip,
    /// The most recent missed time runs once, at start, then the schedule goes on.
    RunOnce,
}

/// One schedule, `[schedules.<name>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// When, in UTC: five cron fields (minute hour day month weekday) or six (second first).
    pub cron: String,
    /// The intent type submitted.
    pub intent_type: String,
    /// The actor the intent is submitted as.
    pub actor: String,
    /// The intent's payload (for a type with an action, only its params).
    #[serde(default)]
    pub payload: Map<String, Value>,
    /// The intent's priority (0-9); absent: `governance.default_priority`.
    #[serde(default)]
    pub priority: Option<u8>,
    /// The intent's mission context, e.g. `{ resilience_impact = true }`.
    #[serde(default)]
    pub mission_context: Map<String, Value>,
    /// `skip` (default) or `run_once`.
    #[serde(default)]
    pub missed: Missed,
}

/// Longest schedule name (its intent ids are `sched-<name>-<unix seconds>`).
const MAX_NAME: usize = 96;

impl ScheduleConfig {
    /// Checks `[schedules.<name>]`; the message names the key. The parsed expression.
    pub fn validate(&self, name: &str) -> Result<Cron, String> {
        let at = format!("schedules.{name}");
        if name.is_empty()
            || name.len() > MAX_NAME
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "{at}: the name must be 1-{MAX_NAME} letters, digits, '_' or '-'"
            ));
        }
        let cron = Cron::parse(&self.cron).map_err(|e| format!("{at}.cron: {e}"))?;
        if self.intent_type.trim().is_empty() || self.actor.trim().is_empty() {
            return Err(format!("{at}: intent_type and actor are required"));
        }
        if self.priority.is_some_and(|p| p > 9) {
            return Err(format!("{at}.priority must be 0-9"));
        }
        Ok(cron)
    }

    /// The intent id of the run at `slot`: the same on every governance replica, so a run is
    /// submitted once however many replicas fire it.
    pub fn intent_id(name: &str, slot: Timestamp) -> String {
        format!("sched-{name}-{}", slot.as_second())
    }

    /// The submission of the run at `slot`.
    pub fn submission(&self, name: &str, slot: Timestamp) -> Value {
        let mut body = json!({
            "intent_id": Self::intent_id(name, slot),
            "intent_type": self.intent_type,
            "actor": self.actor,
            "payload": self.payload,
            "mission_context": self.mission_context,
        });
        if let Some(p) = self.priority {
            body["priority"] = json!(p);
        }
        body
    }
}

/// Validates every schedule of `[schedules]`.
pub fn validate_all(schedules: &BTreeMap<String, ScheduleConfig>) -> Result<(), String> {
    for (name, s) in schedules {
        s.validate(name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_from_toml_and_refuses_a_bad_cron_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("bulwark-sched-{}", crate::ids::new_id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("b.toml");
        std::fs::write(
            &file,
            "[schedules.nightly]\ncron = \"0 3 * * *\"\nintent_type = \"rotate_logs\"\nactor = \"ops\"\npayload = { config = \"/etc/l.conf\", n = 2 }\nmissed = \"run_once\"\nmission_context = { resilience_impact = true }\n",
        )
        .expect("write");
        let cfg = crate::BulwarkConfig::load_from(Some(&file), Default::default()).expect("loads");
        let s = &cfg.schedules["nightly"];
        assert_eq!(s.missed, Missed::RunOnce);
        let slot: Timestamp = "2026-12-06T03:00:00Z".parse().expect("ts");
        let body = s.submission("nightly", slot);
        assert_eq!(body["intent_id"], "sched-nightly-1796526000");
        assert_eq!(body["payload"], json!({"config": "/etc/l.conf", "n": 2}));
        assert_eq!(body["mission_context"]["resilience_impact"], true);
        std::fs::write(
            &file,
            "[schedules.nightly]\ncron = \"0 25 * * *\"\nintent_type = \"x\"\nactor = \"a\"\n",
        )
        .expect("write");
        let err =
            crate::BulwarkConfig::load_from(Some(&file), Default::default()).expect_err("bad cron");
        assert!(
            err.to_string().contains("schedules.nightly.cron: hour"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
