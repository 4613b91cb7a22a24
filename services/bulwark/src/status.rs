//! `bulwark status`: the watchdog's Layer 2 report (`watchdog.report`, CONTRACT section 5) as a
//! table read at a glance: one row per component with readiness, health, key figures and the
//! last alert, then the conditions that hold. Colour only when stdout is a terminal (and
//! `NO_COLOR` is unset); `--json` prints the raw report.
//!
//! Exit code: 0 when the overall health is `healthy`, 1 when it is `degraded` or `critical`, or
//! when the watchdog does not answer (the error is one line on stderr). `--json` exits the same.

use std::io::IsTerminal;
use std::process::ExitCode;

use bulwark_common::BulwarkConfig;
use bulwark_common::subjects;
use serde_json::{Value, json};

/// Requests the report and prints it; the exit code follows the overall health.
pub async fn status(cfg: &BulwarkConfig, as_json: bool) -> anyhow::Result<ExitCode> {
    let report = crate::commands::request(cfg, subjects::WATCHDOG_REPORT, &json!({})).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        print!("{}", render(&report, colour));
    }
    Ok(exit_code(&report))
}

/// 0 when healthy, 1 otherwise.
fn exit_code(report: &Value) -> ExitCode {
    if report["overall_health"] == "healthy" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The order of the rows: the four Layer 2 components first, then the others by name.
const FIRST: [&str; 4] = [
    "htm_orchestrator",
    "trigger_mesh",
    "scheduler",
    "event_policy_engine",
];

fn paint(text: &str, code: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

fn health_colour(health: &str) -> &'static str {
    match health {
        "healthy" => "32",
        "degraded" => "33",
        "critical" => "1;31",
        _ => "2",
    }
}

/// The report as text, one row per component.
fn render(report: &Value, colour: bool) -> String {
    let mut out = String::new();
    let overall = report["overall_health"].as_str().unwrap_or("unknown");
    let ready = report["all_ready"].as_bool().unwrap_or(false);
    out.push_str(&format!(
        "Layer 2: {}, {}\n\n",
        paint(&overall.to_uppercase(), health_colour(overall), colour),
        if ready { "all ready" } else { "NOT all ready" }
    ));
    let empty = serde_json::Map::new();
    let components = report["components"].as_object().unwrap_or(&empty);
    let mut names: Vec<&str> = FIRST
        .iter()
        .copied()
        .filter(|n| components.contains_key(*n))
        .collect();
    let mut others: Vec<&str> = components
        .keys()
        .map(String::as_str)
        .filter(|n| !FIRST.contains(n))
        .collect();
    others.sort_unstable();
    names.extend(others);

    out.push_str(&format!(
        "{:<20} {:<5} {:<9} {:<52} LAST ALERT\n",
        "COMPONENT", "READY", "HEALTH", "KEY FIGURES"
    ));
    let mut conditions = Vec::new();
    for name in names {
        let c = &components[name];
        let health = c["health"].as_str().unwrap_or("unknown");
        let ready = if c["ready"].as_bool().unwrap_or(false) {
            "yes"
        } else {
            "no"
        };
        let mut figures: Vec<String> = c["key_figures"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k}={}", plain(v))).collect())
            .unwrap_or_default();
        if let Some(n) = c["instances"].as_u64()
            && n != 1
        {
            figures.push(format!("instances={n}"));
        }
        if let Some(age) = c["telemetry_age_s"].as_f64()
            && c["health"] != "healthy"
        {
            figures.push(format!("telemetry {age:.1}s old"));
        }
        let last = &c["last_alert"];
        let last = if last.is_object() {
            format!(
                "{} {} {} at {}",
                plain(&last["severity"]),
                plain(&last["condition"]),
                plain(&last["state"]),
                plain(&last["at"])
            )
        } else {
            "-".to_owned()
        };
        // Pad before painting so the escape codes do not upset the columns.
        out.push_str(&format!(
            "{:<20} {} {} {:<52} {}\n",
            name,
            paint(
                &format!("{ready:<5}"),
                if ready == "yes" { "32" } else { "31" },
                colour
            ),
            paint(&format!("{health:<9}"), health_colour(health), colour),
            figures.join(" "),
            last
        ));
        for cond in c["conditions"].as_array().into_iter().flatten() {
            conditions.push((name, cond.clone()));
        }
    }
    if !conditions.is_empty() {
        out.push_str("\nConditions:\n");
        for (name, cond) in conditions {
            let severity = cond["severity"].as_str().unwrap_or("warning");
            let code = if severity == "critical" { "1;31" } else { "33" };
            out.push_str(&format!(
                "  {} {name} {}: {}\n",
                paint(&format!("[{severity}]"), code, colour),
                plain(&cond["condition"]),
                plain(&cond["reason"])
            ));
        }
    }
    out.push_str(&render_storage(report));
    out.push_str(&render_replicas(&report["replicas"], colour));
    out
}

/// The durability in force and each stream's use of its limits.
fn render_storage(report: &Value) -> String {
    let mut out = format!(
        "\nDurability: {} (nats.durability)\n",
        report["durability"].as_str().unwrap_or("unknown")
    );
    let Some(streams) = report["storage"].as_object().filter(|m| !m.is_empty()) else {
        return out;
    };
    out.push_str("Storage (used / limit):\n");
    for (name, u) in streams {
        let bytes = u["bytes"].as_u64().unwrap_or(0);
        let max = u["max_bytes"].as_i64().unwrap_or(-1);
        let share = if max > 0 {
            format!("{:.0}%", bytes as f64 * 100.0 / max as f64)
        } else {
            "no limit".to_owned()
        };
        out.push_str(&format!(
            "  {name:<28} {bytes:>12} / {max:>12} B  {share}\n"
        ));
    }
    for c in report["storage_conditions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push_str(&format!("  [warning] {}\n", plain(&c["reason"])));
    }
    out
}

/// The replicas section: one row per replica of each service (sandbox fallback).
fn render_replicas(replicas: &Value, colour: bool) -> String {
    let Some(services) = replicas.as_object().filter(|m| !m.is_empty()) else {
        return String::new();
    };
    let mut out = format!(
        "\nReplicas:\n  {:<20} {:<28} {:<12} {:<9} {:<10} DETAIL\n",
        "SERVICE", "REPLICA", "STATUS", "ERRORS", "SEEN"
    );
    for (service, rows) in services {
        for r in rows.as_array().into_iter().flatten() {
            let status = r["status"].as_str().unwrap_or("unknown");
            let code = match status {
                "serving" => "32",
                "starting" => "33",
                _ => "1;31",
            };
            let errors = format!("{}/{}", plain(&r["errors"]), plain(&r["error_threshold"]));
            let seen = format!("{}s ago", plain(&r["last_seen_s"]));
            let detail = match r["reason"].as_str() {
                Some(reason) => reason.to_owned(),
                None => format!("{} pid {}", plain(&r["host"]), plain(&r["pid"])),
            };
            out.push_str(&format!(
                "  {:<20} {:<28} {} {:<9} {:<10} {}\n",
                service,
                plain(&r["replica_id"]),
                paint(&format!("{status:<12}"), code, colour),
                errors,
                seen,
                detail
            ));
        }
    }
    out
}

/// A JSON value without quotes around strings.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Value {
        json!({"overall_health": "critical", "all_ready": false, "components": {
            "scheduler": {"ready": false, "health": "critical", "instances": 0, "telemetry_age_s": 7.5,
                          "key_figures": {"queue_depth": 4}, "conditions": [
                              {"condition": "heartbeat_missing", "severity": "critical", "reason": "scheduler heartbeat missing"}],
                          "last_alert": {"severity": "critical", "condition": "heartbeat_missing", "state": "raised", "at": "2026-01-01T00:00:00.000Z"}},
            "htm_orchestrator": {"ready": true, "health": "healthy", "key_figures": {"active_workers": 3}, "conditions": [], "last_alert": null},
            "clarity": {"ready": true, "health": "healthy", "instances": 1, "key_figures": {}, "conditions": [], "last_alert": null}
        }})
    }

    #[test]
    fn the_table_names_components_in_order_with_conditions() {
        let text = render(&report(), false);
        let htm = text.find("htm_orchestrator").expect("htm row");
        let sched = text.find("scheduler ").expect("scheduler row");
        let clarity = text.find("clarity").expect("clarity row");
        assert!(htm < sched && sched < clarity, "{text}");
        assert!(
            text.starts_with("Layer 2: CRITICAL, NOT all ready"),
            "{text}"
        );
        assert!(
            text.contains("queue_depth=4 instances=0 telemetry 7.5s old"),
            "{text}"
        );
        assert!(
            text.contains("critical heartbeat_missing raised at 2026-01-01T00:00:00.000Z"),
            "{text}"
        );
        assert!(
            text.contains("[critical] scheduler heartbeat_missing: scheduler heartbeat missing"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "no colour when not asked");
        assert!(render(&report(), true).contains("\x1b[1;31m"));
    }

    #[test]
    fn exit_code_follows_health() {
        assert_eq!(exit_code(&report()), ExitCode::FAILURE);
        assert_eq!(
            exit_code(&json!({"overall_health": "healthy"})),
            ExitCode::SUCCESS
        );
        assert_eq!(
            exit_code(&json!({"overall_health": "degraded"})),
            ExitCode::FAILURE
        );
    }
}
