//! Clarity from the shell: `bulwark narratives` (query, render, follow) and
//! `bulwark audit verify`.

use std::collections::HashSet;
use std::process::ExitCode;

use anyhow::Context;
use bulwark_common::BulwarkConfig;
use bulwark_common::connect::{self, Role};
use bulwark_common::subjects;
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::commands::request;

/// `bulwark narratives`: which narratives to show.
#[derive(Debug, Args)]
pub struct NarrativesArgs {
    /// Only narratives of this component (e.g. governance).
    #[arg(long)]
    pub who: Option<String>,
    /// Only narratives with this `what` (e.g. intent_routed).
    #[arg(long)]
    pub what: Option<String>,
    /// Only narratives about this intent.
    #[arg(long = "intent")]
    pub intent_id: Option<String>,
    /// Only narratives of this flow.
    #[arg(long = "correlation")]
    pub correlation_id: Option<String>,
    /// Only narratives since this time: RFC 3339, or a duration back from now (30s, 10m, 2h, 1d).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many, the newest [default: the service's, 100].
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print the raw JSON items.
    #[arg(long)]
    pub json: bool,
    /// Then print new narratives as they are published, until Ctrl-C.
    #[arg(long)]
    pub follow: bool,
}

/// `bulwark audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Verify the hash chain of stored narratives; exit 1 naming the first bad sequence.
    Verify,
}

impl NarrativesArgs {
    fn query(&self) -> Value {
        let mut body = json!({});
        let mut set = |key: &str, value: &Option<String>| {
            if let Some(v) = value {
                body[key] = json!(v);
            }
        };
        set("who", &self.who);
        set("what", &self.what);
        set("intent_id", &self.intent_id);
        set("correlation_id", &self.correlation_id);
        set("since", &self.since);
        if let Some(limit) = self.limit {
            body["limit"] = json!(limit);
        }
        body
    }

    /// True when a live narrative passes the filters (`since` is irrelevant for new ones).
    fn admits(&self, n: &Value) -> bool {
        let is = |key: &str, want: &Option<String>| {
            want.as_deref()
                .is_none_or(|w| n.get(key).and_then(Value::as_str) == Some(w))
        };
        is("who", &self.who)
            && is("what", &self.what)
            && is("intent_id", &self.intent_id)
            && is("correlation_id", &self.correlation_id)
    }
}

/// Runs `bulwark narratives`.
pub async fn narratives(cfg: &BulwarkConfig, args: NarrativesArgs) -> anyhow::Result<ExitCode> {
    // Subscribe before querying, so nothing published in between is missed.
    let live = if args.follow {
        let (client, _) = connect::connect(&cfg.nats, "bulwark-cli", Role::Cli).await?;
        let sub = client
            .subscribe(subjects::NARRATIVE_ALL)
            .await
            .context("cannot subscribe to narratives")?;
        Some((client, sub))
    } else {
        None
    };
    let reply = request(cfg, subjects::CLARITY_QUERY, &args.query()).await?;
    let items = reply["items"].as_array().cloned().unwrap_or_default();
    let mut shown = HashSet::new();
    for item in &items {
        print_item(item, args.json);
        shown.insert(fingerprint(item));
    }
    if items.is_empty() && !args.json && !args.follow {
        println!("No narratives match.");
    }
    let Some((_client, mut sub)) = live else {
        return Ok(ExitCode::SUCCESS);
    };
    if !args.json {
        println!("-- following {} (Ctrl-C stops) --", subjects::NARRATIVE_ALL);
    }
    let stop = bulwark_common::shutdown::on_signal();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let item = serde_json::from_slice::<Value>(&msg.payload).unwrap_or_else(
            |_| json!({"raw": String::from_utf8_lossy(&msg.payload), "audit": {"valid": false}}),
        );
        if !args.admits(&item) || shown.contains(&fingerprint(&item)) {
            continue;
        }
        print_item(&item, args.json);
    }
    Ok(ExitCode::SUCCESS)
}

/// Identifies a narrative whatever clarity added to it, to print each once when following.
fn fingerprint(item: &Value) -> String {
    let mut bare = item.clone();
    if let Some(map) = bare.as_object_mut() {
        map.remove("audit");
    }
    bare.to_string()
}

fn print_item(item: &Value, json: bool) {
    if json {
        println!("{item}");
    } else {
        println!("{}", render(item));
    }
}

/// One block per narrative: who did what, when, where, why (one bullet per reason), how.
pub fn render(item: &Value) -> String {
    let s = |key: &str| item.get(key).and_then(Value::as_str).unwrap_or("-");
    let audit = &item["audit"];
    let seq = audit["seq"]
        .as_u64()
        .map(|n| format!("#{n} "))
        .unwrap_or_default();
    let mut out = String::new();
    if let Some(raw) = item.get("raw") {
        let raw = raw
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| raw.to_string());
        out.push_str(&format!("{seq}INVALID narrative: {raw}\n"));
    } else {
        out.push_str(&format!("{seq}{} {} {}\n", s("when"), s("who"), s("what")));
        out.push_str(&format!("  where: {}\n", s("where")));
        out.push_str("  why:\n");
        match item.get("why").and_then(Value::as_array) {
            Some(lines) if !lines.is_empty() => {
                for line in lines {
                    let line = line
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| line.to_string());
                    out.push_str(&format!("    - {line}\n"));
                }
            }
            _ => out.push_str("    - (none given)\n"),
        }
        out.push_str(&format!("  how:   {}\n", s("how")));
        if let Some(id) = item.get("intent_id").and_then(Value::as_str) {
            out.push_str(&format!("  intent: {id}"));
            if let Some(c) = item.get("correlation_id").and_then(Value::as_str) {
                out.push_str(&format!(" (flow {c})"));
            }
            out.push('\n');
        }
    }
    if audit["valid"] == false {
        let reason = audit["invalid_reason"].as_str().unwrap_or("invalid");
        out.push_str(&format!("  ! stored flagged invalid: {reason}\n"));
    }
    out
}

/// Runs `bulwark audit verify`: exit 0 when the chain is intact, 1 naming the first bad record.
pub async fn audit(cfg: &BulwarkConfig, action: AuditAction) -> anyhow::Result<ExitCode> {
    match action {
        AuditAction::Verify => {
            let report = request(cfg, subjects::CLARITY_VERIFY, &json!({})).await?;
            let records = report["records"].as_u64().unwrap_or(0);
            for line in signing_lines(&report) {
                println!("{line}");
            }
            if report["ok"] == true {
                println!("audit chain intact: {records} record(s) verified");
                return Ok(ExitCode::SUCCESS);
            }
            let seq = report["first_bad_seq"]
                .as_u64()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into());
            let reason = report["reason"].as_str().unwrap_or("chain broken");
            println!("audit chain BROKEN at sequence {seq} ({records} record(s) examined)");
            eprintln!("bulwark: audit chain broken at sequence {seq}: {reason}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What a verification report says about the signatures: the key, the last signed record, and
/// the records from before signing began.
fn signing_lines(report: &Value) -> Vec<String> {
    let mut lines = vec![format!(
        "signing key id: {}",
        report["key_id"].as_str().unwrap_or("(none reported)")
    )];
    let last = &report["last_signed"];
    lines.push(match last["seq"].as_u64() {
        Some(seq) => format!(
            "last signed checkpoint: sequence {seq}, stored at {}, key id {} ({} signed record(s))",
            last["stored_at"].as_str().unwrap_or("?"),
            last["key_id"].as_str().unwrap_or("?"),
            report["signed"].as_u64().unwrap_or(0)
        ),
        None => "last signed checkpoint: none".to_owned(),
    });
    let unsigned = report["unsigned"].as_u64().unwrap_or(0);
    if unsigned > 0 {
        lines.push(format!(
            "unsigned records (written before signing began): {unsigned}"
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_output_names_the_key_and_the_last_signed_checkpoint() {
        let report = json!({"ok": true, "records": 9, "key_id": "6aa1fc294082e4cb",
            "signed": 7, "unsigned": 2, "last_signed": {"seq": 9,
            "stored_at": "2026-11-26T10:00:00.130Z", "key_id": "6aa1fc294082e4cb"}});
        assert_eq!(
            signing_lines(&report),
            [
                "signing key id: 6aa1fc294082e4cb",
                "last signed checkpoint: sequence 9, stored at 2026-11-26T10:00:00.130Z, key id 6aa1fc294082e4cb (7 signed record(s))",
                "unsigned records (written before signing began): 2",
            ]
        );
        let none = signing_lines(&json!({"ok": false, "records": 0}));
        assert_eq!(none[1], "last signed checkpoint: none");
    }

    #[test]
    fn a_narrative_renders_as_a_5w1h_block() {
        let item = json!({"who": "governance", "what": "intent_routed", "when": "2026-11-26T10:00:00.000Z",
            "where": "governance@host/1", "why": ["Tier 2: low risk", "Mission alignment 0.60"],
            "how": "autonomy tier table", "intent_id": "i1", "correlation_id": "c1",
            "audit": {"seq": 7, "valid": true}});
        assert_eq!(
            render(&item),
            "#7 2026-11-26T10:00:00.000Z governance intent_routed\n  where: governance@host/1\n  why:\n    - Tier 2: low risk\n    - Mission alignment 0.60\n  how:   autonomy tier table\n  intent: i1 (flow c1)\n"
        );
    }

    #[test]
    fn invalid_narratives_say_so() {
        let item = json!({"raw": "not json", "audit": {"seq": 3, "valid": false, "invalid_reason": "not valid JSON"}});
        assert_eq!(
            render(&item),
            "#3 INVALID narrative: not json\n  ! stored flagged invalid: not valid JSON\n"
        );
        let half = json!({"who": "x", "what": "y", "audit": {"seq": 4, "valid": false,
                          "invalid_reason": "missing required 5W1H field(s): when"}});
        let text = render(&half);
        assert!(text.starts_with("#4 - x y\n"), "{text}");
        assert!(text.contains("(none given)"), "{text}");
        assert!(text.ends_with("! stored flagged invalid: missing required 5W1H field(s): when\n"));
    }

    #[test]
    fn live_narratives_are_filtered_like_the_query() {
        let args = NarrativesArgs {
            who: Some("governance".into()),
            what: None,
            intent_id: Some("i1".into()),
            correlation_id: None,
            since: Some("10m".into()),
            limit: Some(5),
            json: false,
            follow: true,
        };
        assert_eq!(
            args.query(),
            json!({"who": "governance", "intent_id": "i1", "since": "10m", "limit": 5})
        );
        assert!(args.admits(&json!({"who": "governance", "intent_id": "i1"})));
        assert!(!args.admits(&json!({"who": "scheduler", "intent_id": "i1"})));
        assert_eq!(
            fingerprint(&json!({"who": "a", "audit": {"seq": 1}})),
            fingerprint(&json!({"who": "a"}))
        );
    }
}
