//! The pages and the live regions: askama templates (every value HTML-escaped by the template
//! engine; the only unescaped insertion is a region the engine rendered itself) and the shaping
//! of bulwark's JSON replies into what they show. No I/O here.

use askama::Template;
use serde_json::Value;

use crate::person::Refusal;

/// What every page shows around its content.
#[derive(Debug, Clone, Default)]
pub struct Chrome {
    /// The page title.
    pub title: String,
    /// The signed-in user ("" on the sign-in page).
    pub user: String,
    /// The session's CSRF token, for the sign-out form.
    pub csrf: String,
    /// A line of feedback after an action ("" for none).
    pub notice: String,
}

/// The sign-in page.
#[derive(Template)]
#[template(path = "login.html")]
pub struct Login {
    /// Around it.
    pub chrome: Chrome,
    /// Why the last attempt failed.
    pub error: String,
    /// The login form's CSRF token (also in a cookie).
    pub csrf: String,
    /// The user name tried.
    pub user: String,
}

/// A message (a refusal, an error).
#[derive(Template)]
#[template(path = "message.html")]
pub struct Message {
    /// Around it.
    pub chrome: Chrome,
    /// CSS class: `refused` or `notice`.
    pub class: String,
    /// The message.
    pub text: String,
    /// Where "Back" goes ("" for no link).
    pub back: String,
}

/// A page made of one live region (overview, reviews, proposals, an intent, narratives).
#[derive(Template)]
#[template(path = "page.html")]
pub struct LivePage {
    /// Around it.
    pub chrome: Chrome,
    /// A sentence under the title.
    pub intro: String,
    /// HTML the engine rendered, shown before the region (filters).
    pub before: String,
    /// The region's stream.
    pub live_url: String,
    /// The region's first rendering.
    pub live: String,
}

/// A component row of the overview.
#[derive(Debug, Clone)]
pub struct ComponentRow {
    /// Its name in the report.
    pub name: String,
    /// healthy, degraded, critical, unknown.
    pub health: String,
    /// ready or not.
    pub ready: String,
    /// `key=value` list.
    pub figures: String,
    /// Its conditions.
    pub conditions: String,
    /// Its last alert.
    pub last_alert: String,
}

/// The overview region.
#[derive(Template, Default)]
#[template(path = "overview_live.html")]
pub struct OverviewLive {
    /// healthy, degraded, critical.
    pub overall: String,
    /// Why the watchdog's report is missing.
    pub report_error: Option<String>,
    /// The components.
    pub components: Vec<ComponentRow>,
    /// The breaker's state.
    pub breaker_state: String,
    /// Its figures.
    pub breaker_detail: String,
    /// Why the storm guard's status is missing.
    pub storm_error: Option<String>,
    /// Storms: event type, peak count, top source.
    pub storms: Vec<(String, String, String)>,
    /// Queue and workers.
    pub readiness: String,
    /// Why readiness is missing.
    pub readiness_error: Option<String>,
}

/// A review item.
#[derive(Debug, Clone)]
pub struct ReviewRow {
    /// The intent.
    pub intent_id: String,
    /// approval, low_alignment, vote_timeout, post_execution, post_hoc.
    pub kind: String,
    /// Its type.
    pub intent_type: String,
    /// Its actor.
    pub actor: String,
    /// Its tier.
    pub tier: String,
    /// Its mission alignment.
    pub alignment: String,
    /// Its priority.
    pub priority: String,
    /// The payload, pretty JSON.
    pub payload: String,
    /// Governance's reasoning.
    pub reasoning: Vec<String>,
    /// When it was queued for review.
    pub created_at: String,
}

/// The review queue region.
#[derive(Template)]
#[template(path = "reviews_live.html")]
pub struct ReviewsLive {
    /// Why the queue is missing.
    pub error: Option<String>,
    /// Items in the queue.
    pub total: String,
    /// The items shown.
    pub items: Vec<ReviewRow>,
    /// For the forms.
    pub csrf: String,
}

/// An open proposal.
#[derive(Debug, Clone)]
pub struct ProposalRow {
    /// Proposal id = intent id.
    pub id: String,
    /// Its type.
    pub intent_type: String,
    /// Its actor.
    pub actor: String,
    /// open, approved, rejected, expired.
    pub state: String,
    /// Approvals so far.
    pub approvals: usize,
    /// Rejections so far.
    pub rejections: usize,
    /// Approvals (or rejections) that decide.
    pub quorum: String,
    /// The deadline.
    pub deadline: String,
    /// Who may vote.
    pub voters: String,
    /// Who voted how.
    pub voted: String,
    /// Governance's reasoning.
    pub reasoning: Vec<String>,
    /// The payload, pretty JSON.
    pub payload: String,
}

/// The proposals region.
#[derive(Template)]
#[template(path = "proposals_live.html")]
pub struct ProposalsLive {
    /// Why the list is missing.
    pub error: Option<String>,
    /// Open proposals.
    pub total: String,
    /// The proposals shown.
    pub items: Vec<ProposalRow>,
    /// For the forms.
    pub csrf: String,
}

/// A narrative row of an intent's page.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// Its audit record's sequence number.
    pub seq: String,
    /// Whether its record verifies.
    pub valid: String,
    /// When.
    pub when: String,
    /// Who.
    pub who: String,
    /// What.
    pub what: String,
    /// Why.
    pub why: String,
}

/// An intent's region.
#[derive(Template, Default)]
#[template(path = "intent_live.html")]
pub struct IntentLive {
    /// Why the status is missing.
    pub error: Option<String>,
    /// Its status.
    pub status: String,
    /// Its tier.
    pub tier: String,
    /// Its type.
    pub intent_type: String,
    /// Its worker.
    pub worker: String,
    /// Task attempts.
    pub attempts: String,
    /// status, at, by, reason.
    pub history: Vec<(String, String, String, String)>,
    /// The review.
    pub review: String,
    /// The result, pretty JSON.
    pub result: String,
    /// The error.
    pub failure: String,
    /// Why the narratives are missing.
    pub narratives_error: Option<String>,
    /// Whether the stretch of the chain verifies.
    pub chain: String,
    /// Its narratives.
    pub narratives: Vec<AuditRow>,
}

/// A live narrative row.
#[derive(Debug, Clone)]
pub struct NarrativeRow {
    /// When.
    pub when: String,
    /// Who.
    pub who: String,
    /// What.
    pub what: String,
    /// Its intent.
    pub intent: String,
    /// Why.
    pub why: String,
}

/// The narratives region.
#[derive(Template)]
#[template(path = "narratives_live.html")]
pub struct NarrativesLive {
    /// Why the stream is missing.
    pub error: Option<String>,
    /// Received since the page opened.
    pub received: u64,
    /// Shown (the newest).
    pub shown: usize,
    /// Received but no longer shown (or dropped before shown).
    pub skipped: u64,
    /// Newest first.
    pub rows: Vec<NarrativeRow>,
}

/// Search fields of the intents page.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct IntentQuery {
    /// An intent id: go straight to it.
    pub id: String,
    /// Actor.
    pub actor: String,
    /// Intent type.
    pub intent_type: String,
    /// Current status.
    pub status: String,
    /// RFC 3339 or a duration back (`1h`).
    pub since: String,
}

/// A search result.
#[derive(Debug, Clone)]
pub struct IntentRow {
    /// Id.
    pub id: String,
    /// Type.
    pub intent_type: String,
    /// Actor.
    pub actor: String,
    /// Tier.
    pub tier: String,
    /// Current status.
    pub status: String,
    /// When routed.
    pub when: String,
}

/// The intents page.
#[derive(Template)]
#[template(path = "intents.html")]
pub struct Intents {
    /// Around it.
    pub chrome: Chrome,
    /// The search.
    pub q: IntentQuery,
    /// At most this many results.
    pub limit: usize,
    /// Why the search failed.
    pub error: Option<String>,
    /// Results.
    pub rows: Vec<IntentRow>,
}

/// A playbook row.
#[derive(Debug, Clone)]
pub struct PlaybookRow {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Triggers.
    pub triggers: String,
    /// Step titles.
    pub steps: String,
    /// Last run.
    pub last_run: String,
    /// Runs in progress.
    pub running: String,
}

/// The playbooks page.
#[derive(Template)]
#[template(path = "playbooks.html")]
pub struct Playbooks {
    /// Around it.
    pub chrome: Chrome,
    /// Why the list is missing.
    pub error: Option<String>,
    /// A dry run's outcome.
    pub outcome: String,
    /// Playbooks.
    pub rows: Vec<PlaybookRow>,
    /// Files that do not compile.
    pub errors: Vec<String>,
    /// For the forms.
    pub csrf: String,
}

/// A chaos report.
#[derive(Debug, Clone)]
pub struct ChaosRun {
    /// Its folder.
    pub name: String,
    /// pass or fail.
    pub verdict: String,
    /// When written.
    pub written_at: String,
    /// The command that ran it.
    pub command: String,
    /// id, verdict, chart URL.
    pub scenarios: Vec<(String, String, String)>,
}

/// The chaos page.
#[derive(Template)]
#[template(path = "chaos.html")]
pub struct Chaos {
    /// Around it.
    pub chrome: Chrome,
    /// The reports folder.
    pub dir: String,
    /// Reports, newest first.
    pub runs: Vec<ChaosRun>,
}

/// A JSON value as one line of text (strings without quotes).
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A JSON value, pretty.
pub fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default()
}

fn figures(v: &Value) -> String {
    match v.as_object() {
        Some(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect::<Vec<_>>()
            .join(", "),
        None => text(v),
    }
}

/// The overview region from the watchdog's report, the storm guard's status and readiness.
pub fn overview(
    report: Result<Value, Refusal>,
    storm: Result<Value, Refusal>,
    readiness: Result<Value, Refusal>,
) -> OverviewLive {
    let mut view = OverviewLive {
        overall: "unknown".into(),
        breaker_state: "unknown".into(),
        ..Default::default()
    };
    match report {
        Ok(r) => {
            view.overall = text(&r["overall_health"]);
            if let Some(components) = r["components"].as_object() {
                for (name, c) in components {
                    let conditions = c["conditions"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|x| {
                                    format!(
                                        "{} ({}): {}",
                                        text(&x["condition"]),
                                        text(&x["severity"]),
                                        text(&x["reason"])
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                        .unwrap_or_default();
                    let alert = &c["last_alert"];
                    let last_alert = if alert.is_null() {
                        String::new()
                    } else {
                        format!(
                            "{} {} {}",
                            text(&alert["severity"]),
                            text(&alert["state"]),
                            text(&alert["reason"])
                        )
                        .trim()
                        .to_owned()
                    };
                    view.components.push(ComponentRow {
                        name: name.clone(),
                        health: text(&c["health"]),
                        ready: text(&c["ready"]),
                        figures: figures(&c["key_figures"]),
                        conditions,
                        last_alert: if last_alert.is_empty() && !alert.is_null() {
                            text(alert)
                        } else {
                            last_alert
                        },
                    });
                }
            }
        }
        Err(e) => view.report_error = Some(format!("watchdog.report: {e}")),
    }
    match storm {
        Ok(s) => {
            let b = &s["breaker"];
            view.breaker_state = text(&b["state"]);
            // A breaker never moved reports the epoch as its start.
            let since = match text(&b["since"]) {
                t if t.starts_with("1970-01-01") => "never moved".to_owned(),
                t => format!("since {t}"),
            };
            view.breaker_detail = format!(
                "{since}; {} events in the window (threshold {} per {} s); opened {} time(s)",
                text(&b["event_count"]),
                text(&b["threshold"]),
                text(&b["window_s"]),
                text(&b["opened_count"])
            );
            view.storms = s["storms"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            (
                                text(&x["event_type"]),
                                text(&x["peak_count"]),
                                text(&x["top_source"]),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
        }
        Err(e) => view.storm_error = Some(format!("storm_guard.status: {e}")),
    }
    match readiness {
        Ok(r) => view.readiness = figures(&r),
        Err(e) => view.readiness_error = Some(format!("htm.readiness: {e}")),
    }
    view
}

/// The review queue region from `governance.review.pending`.
pub fn reviews(reply: Result<Value, Refusal>, csrf: &str) -> ReviewsLive {
    match reply {
        Ok(r) => ReviewsLive {
            error: None,
            total: text(&r["total"]),
            items: r["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| ReviewRow {
                            intent_id: text(&i["intent_id"]),
                            kind: text(&i["kind"]),
                            intent_type: text(&i["intent_type"]),
                            actor: text(&i["actor"]),
                            tier: text(&i["autonomy_tier"]),
                            alignment: text(&i["mission_alignment"]),
                            priority: text(&i["priority"]),
                            payload: pretty(&i["payload"]),
                            reasoning: strings(&i["reasoning"]),
                            created_at: text(&i["created_at"]),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            csrf: csrf.to_owned(),
        },
        Err(e) => ReviewsLive {
            error: Some(format!("governance.review.pending: {e}")),
            total: "?".into(),
            items: Vec::new(),
            csrf: csrf.to_owned(),
        },
    }
}

/// The proposals region from `unified_logic.proposals`.
pub fn proposals(reply: Result<Value, Refusal>, csrf: &str) -> ProposalsLive {
    match reply {
        Ok(r) => ProposalsLive {
            error: None,
            total: text(&r["total"]),
            items: r["items"]
                .as_array()
                .map(|a| a.iter().map(proposal).collect())
                .unwrap_or_default(),
            csrf: csrf.to_owned(),
        },
        Err(e) => ProposalsLive {
            error: Some(format!("unified_logic.proposals: {e}")),
            total: "?".into(),
            items: Vec::new(),
            csrf: csrf.to_owned(),
        },
    }
}

fn proposal(p: &Value) -> ProposalRow {
    let votes = p["votes"].as_array().cloned().unwrap_or_default();
    let count = |which: &str| votes.iter().filter(|v| v["vote"] == which).count();
    ProposalRow {
        id: text(&p["proposal_id"]),
        intent_type: text(&p["intent_type"]),
        actor: text(&p["actor"]),
        state: text(&p["state"]),
        approvals: count("approve"),
        rejections: count("reject"),
        quorum: text(&p["quorum"]),
        deadline: text(&p["deadline"]),
        voters: strings(&p["voters"]).join(", "),
        voted: votes
            .iter()
            .map(|v| format!("{} {}", text(&v["voter"]), text(&v["vote"])))
            .collect::<Vec<_>>()
            .join(", "),
        reasoning: strings(&p["reasoning"]),
        payload: pretty(&p["payload"]),
    }
}

/// An intent's region from `htm.intent.status`, `clarity.query` (its narratives) and
/// `clarity.verify` (the chain).
pub fn intent(
    status: Result<Value, Refusal>,
    narratives: Result<Value, Refusal>,
    verify: Option<Result<Value, Refusal>>,
) -> IntentLive {
    let mut view = IntentLive::default();
    match status {
        Ok(s) => {
            view.status = text(&s["status"]);
            view.tier = text(&s["autonomy_tier"]);
            view.intent_type = text(&s["intent_type"]);
            view.worker = text(&s["worker_id"]);
            view.attempts = text(&s["attempts"]);
            view.history = s["history"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|h| {
                            (
                                text(&h["status"]),
                                text(&h["at"]),
                                text(&h["by"]),
                                text(&h["reason"]),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let r = &s["review"];
            if !r.is_null() {
                view.review = format!(
                    "{} by {} at {}: {}",
                    text(&r["decision"]),
                    text(&r["reviewer"]),
                    text(&r["at"]),
                    text(&r["reason"])
                );
            }
            if !s["result"].is_null() {
                view.result = pretty(&s["result"]);
            }
            view.failure = text(&s["error"]);
        }
        Err(e) => view.error = Some(format!("htm.intent.status: {e}")),
    }
    match narratives {
        Ok(n) => {
            let items = n["items"].as_array().cloned().unwrap_or_default();
            let seqs: Vec<u64> = items
                .iter()
                .filter_map(|i| i["audit"]["seq"].as_u64())
                .collect();
            let all_valid = items.iter().all(|i| i["audit"]["valid"] == true);
            let stretch = match (seqs.iter().min(), seqs.iter().max()) {
                (Some(a), Some(b)) => format!("audit records {a} to {b}"),
                _ => "no audit records yet".to_owned(),
            };
            let chain = match verify {
                Some(Ok(v)) if v["ok"] == true => format!(
                    "the whole chain verifies ({} records, signed by key {})",
                    text(&v["records"]),
                    text(&v["key_id"])
                ),
                Some(Ok(v)) => format!(
                    "the chain does NOT verify: first bad record {} ({})",
                    text(&v["first_bad_seq"]),
                    text(&v["reason"])
                ),
                Some(Err(e)) => format!("clarity.verify: {e}"),
                None => String::new(),
            };
            view.chain = format!(
                "{stretch}: {}. {chain}",
                if all_valid {
                    "every record's hash and signature verify"
                } else {
                    "some records do NOT verify"
                }
            );
            view.narratives = items
                .iter()
                .map(|i| AuditRow {
                    seq: text(&i["audit"]["seq"]),
                    valid: text(&i["audit"]["valid"]),
                    when: text(&i["when"]),
                    who: text(&i["who"]),
                    what: text(&i["what"]),
                    why: strings(&i["why"]).join("; "),
                })
                .collect();
        }
        Err(e) => view.narratives_error = Some(format!("clarity.query: {e}")),
    }
    view
}

/// A live narrative row from a stored or received narrative.
pub fn narrative_row(n: &Value) -> NarrativeRow {
    NarrativeRow {
        when: text(&n["when"]),
        who: text(&n["who"]),
        what: text(&n["what"]),
        intent: text(&n["intent_id"]),
        why: strings(&n["why"]).join("; "),
    }
}

/// Playbook rows from `playbook.list`.
pub fn playbooks(list: &Value) -> (Vec<PlaybookRow>, Vec<String>) {
    let rows = list["playbooks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let last = &p["last_run"];
                    PlaybookRow {
                        name: text(&p["name"]),
                        description: text(&p["description"]),
                        triggers: strings(&p["triggers"]).join(", "),
                        steps: p["steps"]
                            .as_array()
                            .map(|s| {
                                s.iter()
                                    .map(|x| text(&x["title"]))
                                    .collect::<Vec<_>>()
                                    .join(" → ")
                            })
                            .unwrap_or_default(),
                        last_run: if last.is_null() {
                            "never".into()
                        } else {
                            format!(
                                "{} at {} in {} ms{}",
                                text(&last["status"]),
                                text(&last["started"]),
                                text(&last["duration_ms"]),
                                match text(&last["error"]) {
                                    e if e.is_empty() => String::new(),
                                    e => format!(": {e}"),
                                }
                            )
                        },
                        running: strings(&p["running"]).join(", "),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    (rows, strings(&list["errors"]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_value_of_a_reply_is_escaped() {
        let reply = json!({"total": 1, "items": [{
            "intent_id": "x\"><script>alert(1)</script>", "kind": "approval",
            "intent_type": "<b>t</b>", "actor": "<img src=x onerror=alert(2)>",
            "payload": {"note": "<script>alert(3)</script>"},
            "reasoning": ["</li><script>alert(4)</script>"]}]});
        let html = reviews(Ok(reply), "tok").render().expect("renders");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<b>t"), "{html}");
        assert!(
            !html.contains("x\"><"),
            "no attribute is broken out of: {html}"
        );
        assert!(
            html.contains("&#60;script&#62;alert(3)&#60;/script&#62;"),
            "{html}"
        );
    }

    #[test]
    fn a_refusal_is_shown_with_its_reason() {
        let refusal = Refusal::Permission {
            subject: "playbook.list".into(),
            user: "architect".into(),
            reason: "Permissions Violation for Publish to \"playbook.list\"".into(),
        };
        let html = reviews(Err(refusal), "tok").render().expect("renders");
        assert!(
            html.contains("the NATS server refused playbook.list for architect"),
            "{html}"
        );
        assert!(html.contains("Permissions Violation"), "{html}");
    }

    #[test]
    fn a_proposal_tally_counts_each_side() {
        let p = json!({"proposal_id": "p1", "quorum": 2, "state": "open",
            "voters": ["architect", "guardian", "steward"],
            "votes": [{"voter": "architect", "vote": "approve"}, {"voter": "steward", "vote": "reject"}]});
        let row = proposal(&p);
        assert_eq!((row.approvals, row.rejections), (1, 1));
        assert_eq!(row.voted, "architect approve, steward reject");
    }
}
