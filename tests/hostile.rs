//! Hostile input, on every decoder bulwark runs over what arrives from the network or disk and
//! on the running services.
//!
//! Property tests (`prop_*`) throw generated bodies at the decoders: random bytes, JSON with the
//! decoders' own field names holding wrong types, invalid UTF-8, deep nesting, huge numbers,
//! duplicate keys, oversize bodies, and random mutations of valid bodies. The property is always
//! the same: no panic, and a refusal is an error that says what is wrong in a bounded message.
//! The event policy rule loader and the chaos scenario loader get damaged files.
//! The case count is `BULWARK_FUZZ_CASES` (default 256, the CI smoke); the long run is
//! `BULWARK_FUZZ_CASES=200000 cargo nextest run --release -p bulwark-tests --test hostile prop_`
//! (docs/security.md).
//!
//! The end-to-end test sends hostile bodies to each subject the services consume, over a real
//! nats-server, and checks the error replies and dead letters and that the services keep
//! serving.

use std::path::PathBuf;
use std::time::Duration;

use bulwark_common::api::{self, ApiError, MAX_MESSAGE_BYTES};
use bulwark_common::envelope::MeshEvent;
use bulwark_common::htm::{Assignment, Heartbeat, TaskReport};
use bulwark_common::subjects;
use bulwark_governance::identity::Sender;
use bulwark_governance::review::ReviewDecision;
use bulwark_governance::vote::VoteRequest;
use bulwark_tests::*;
use futures::StreamExt;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Cases per property: `BULWARK_FUZZ_CASES`, else 256.
fn cases() -> u32 {
    std::env::var("BULWARK_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // A failure is minimised and reported by the test; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Numbers no decoder expects: beyond f64, beyond u64/i64, tiny, negative zero, 400 digits.
const HUGE_NUMBERS: [&str; 9] = [
    "1e999",
    "-1e999",
    "18446744073709551616",
    "-9223372036854775809",
    "1e-400",
    "-0",
    "4.9e-324",
    "123456789012345678901234567890123456789012345678901234567890",
    "1.7976931348623157e308",
];

/// Plausible values for the decoders' fields, so that generated bodies get past the first check.
const PLAUSIBLE: [&str; 14] = [
    "\"approve\"",
    "\"reject\"",
    "\"guardian\"",
    "\"self_improve\"",
    "\"query_knowledge\"",
    "\"task.completed\"",
    "\"2026-11-26T10:00:00.123Z\"",
    "\"started\"",
    "\"completed\"",
    "\"w1\"",
    "{}",
    "[]",
    "5",
    "\"\"",
];

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A JSON text whose objects mostly use `fields` as keys, with values of every kind.
fn json_text(fields: &'static [&'static str]) -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        prop::sample::select(&HUGE_NUMBERS[..]).prop_map(str::to_owned),
        prop::sample::select(&PLAUSIBLE[..]).prop_map(str::to_owned),
        ".{0,40}".prop_map(|s| json_string(&s)),
        (1usize..5_000).prop_map(|n| json_string(&"x".repeat(n))),
    ];
    let key = prop_oneof![
        3 => prop::sample::select(fields).prop_map(str::to_owned),
        1 => "[a-z_]{0,12}",
    ];
    leaf.prop_recursive(6, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((key.clone(), inner), 0..8).prop_map(|kv| {
                let body: Vec<String> = kv
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", json_string(k)))
                    .collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

/// An object of `fields`, each with a generated value, some repeated (duplicate keys).
fn object_of(fields: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(
        (prop::sample::select(fields), json_text(fields)),
        0..(fields.len() + 3),
    )
    .prop_map(|kv| {
        let body: Vec<String> = kv
            .iter()
            .map(|(k, v)| format!("{}:{v}", json_string(k)))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

/// One byte-level damage: flip, invalid UTF-8, delete, duplicate, truncate.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    InvalidUtf8(usize),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        any::<usize>().prop_map(Damage::InvalidUtf8),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Damage::Delete(i, n)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Damage::Duplicate(i, n)),
        any::<usize>().prop_map(Damage::Truncate),
    ]
}

fn apply(mut body: Vec<u8>, damages: &[Damage]) -> Vec<u8> {
    for d in damages {
        if body.is_empty() {
            break;
        }
        let at = |i: usize| i % body.len();
        match *d {
            Damage::Flip(i, b) => {
                let i = at(i);
                body[i] ^= b | 1;
            }
            Damage::InvalidUtf8(i) => {
                let i = at(i);
                body.splice(i..i, [0xff, 0xfe, 0xc3]);
            }
            Damage::Delete(i, n) => {
                let i = at(i);
                let end = (i + n).min(body.len());
                body.drain(i..end);
            }
            Damage::Duplicate(i, n) => {
                let i = at(i);
                let end = (i + n).min(body.len());
                let copy = body[i..end].to_vec();
                body.splice(end..end, copy);
            }
            Damage::Truncate(i) => body.truncate(at(i)),
        }
    }
    body
}

/// Hostile bodies for a decoder of `fields` whose valid bodies include `valid`.
fn hostile(
    fields: &'static [&'static str],
    valid: &'static [&'static str],
    max_bytes: usize,
) -> impl Strategy<Value = Vec<u8>> {
    let valid_body = prop::sample::select(valid).prop_map(|v| v.as_bytes().to_vec());
    prop_oneof![
        // Garbage.
        prop::collection::vec(any::<u8>(), 0..512),
        // Generated JSON over the decoder's own fields.
        object_of(fields).prop_map(String::into_bytes),
        json_text(fields).prop_map(String::into_bytes),
        // Valid bodies, damaged.
        (valid_body.clone(), prop::collection::vec(damage(), 1..5))
            .prop_map(|(body, damages)| apply(body, &damages)),
        // Deep nesting, alone or as a field's value.
        (1usize..20_000, any::<bool>()).prop_map(|(depth, arrays)| {
            let (open, close) = if arrays { ("[", "]") } else { ("{\"a\":", "}") };
            format!("{}1{}", open.repeat(depth), close.repeat(depth)).into_bytes()
        }),
        (prop::sample::select(fields), 100usize..5_000).prop_map(|(field, depth)| {
            format!(
                "{{{}:{}0{}}}",
                json_string(field),
                "[".repeat(depth),
                "]".repeat(depth)
            )
            .into_bytes()
        }),
        // A valid body with a field repeated with another value (duplicate keys).
        (
            valid_body.clone(),
            prop::sample::select(fields),
            json_text(fields)
        )
            .prop_map(|(body, field, value)| {
                let mut text = String::from_utf8(body).unwrap_or_default();
                if let Some(close) = text.rfind('}') {
                    text.insert_str(close, &format!(",{}:{value}", json_string(field)));
                }
                text.into_bytes()
            }),
        // Just over the size limit, and far over it.
        (
            valid_body,
            prop::sample::select(vec![1usize, 4096, 1 << 20])
        )
            .prop_map(move |(mut body, over)| {
                body.resize(max_bytes + over, b' ');
                body
            }),
    ]
}

/// A refusal's message: present, and bounded however large the input was.
fn check_message(message: &str, body: &[u8]) {
    assert!(
        !message.trim().is_empty(),
        "empty error for {:?}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    assert!(
        message.len() <= MAX_MESSAGE_BYTES + 64,
        "unbounded error ({} bytes): {}...",
        message.len(),
        &message[..200.min(message.len())]
    );
}

fn check_api(result: Result<impl std::fmt::Debug, ApiError>, body: &[u8], codes: &[&str]) {
    if let Err(err) = result {
        check_message(&err.message, body);
        assert!(
            codes.contains(&err.code.as_str()),
            "unexpected code {} ({})",
            err.code,
            err.message
        );
        assert!((400..500).contains(&err.status), "{err:?}");
    }
}

const INTENT_FIELDS: &[&str] = &[
    "intent_id",
    "intent_type",
    "actor",
    "payload",
    "priority",
    "mission_context",
    "resilience_impact",
    "emergency",
    "correlation_id",
];
const INTENT_VALID: &[&str] = &[
    r#"{"intent_type":"self_improve","actor":"grace_architect","payload":{"feature":"x"},"priority":5,"mission_context":{"resilience_impact":true}}"#,
    r#"{"intent_id":"i-1","intent_type":"query_knowledge","actor":"a"}"#,
];

const ENVELOPE_FIELDS: &[&str] = &[
    "event_id",
    "event_type",
    "source",
    "actor",
    "resource",
    "subsystem",
    "timestamp",
    "correlation_id",
    "causation_id",
    "depth",
    "payload",
    "lineage",
];
const ENVELOPE_VALID: &[&str] = &[
    r#"{"event_type":"task.completed","source":"htm_worker","payload":{}}"#,
    r#"{"event_id":"e1","event_type":"a.b","source":"s","actor":"w","timestamp":"2026-11-26T10:00:00.123Z","correlation_id":"c","causation_id":"p","depth":3,"payload":{"k":[1,2]},"lineage":[["x","y"]]}"#,
];

const REVIEW_FIELDS: &[&str] = &["intent_id", "decision", "reviewer", "reason"];
const REVIEW_VALID: &[&str] =
    &[r#"{"intent_id":"i-1","decision":"approve","reviewer":"alice","reason":"fine"}"#];
const VOTE_FIELDS: &[&str] = &["proposal_id", "voter", "vote", "reason"];
const VOTE_VALID: &[&str] =
    &[r#"{"proposal_id":"p-1","voter":"guardian","vote":"reject","reason":"no"}"#];

const HEARTBEAT_FIELDS: &[&str] = &[
    "worker_id",
    "cpu_percent",
    "memory_mb",
    "in_flight",
    "capacity",
    "tasks_completed",
    "tasks_failed",
    "uptime_seconds",
    "timestamp",
];
const HEARTBEAT_VALID: &[&str] = &[
    r#"{"worker_id":"w1","cpu_percent":1.5,"memory_mb":20.0,"in_flight":0,"capacity":8,"tasks_completed":3,"tasks_failed":0,"uptime_seconds":9.5,"timestamp":"2026-11-26T10:00:00.123Z"}"#,
];
const REPORT_FIELDS: &[&str] = &[
    "task_id",
    "worker_id",
    "fence",
    "outcome",
    "result",
    "error",
    "retryable",
];
const REPORT_VALID: &[&str] = &[
    r#"{"task_id":"t1","worker_id":"w1","fence":1,"outcome":"completed","result":{"ok":true}}"#,
    r#"{"task_id":"t1","worker_id":"w1","fence":2,"outcome":"failed","error":"boom","retryable":false}"#,
];
const ASSIGNMENT_FIELDS: &[&str] = &["task", "worker_id", "fence", "attempt", "task_id"];
const ASSIGNMENT_VALID: &[&str] = &[r#"{"task":{},"worker_id":"w1","fence":1,"attempt":1}"#];

const NARRATIVE_FIELDS: &[&str] = &[
    "who",
    "what",
    "when",
    "where",
    "why",
    "how",
    "context",
    "correlation_id",
    "intent_id",
];
const NARRATIVE_VALID: &[&str] = &[
    r#"{"who":"governance","what":"intent_routed","when":"2026-11-26T10:00:00.123Z","where":"gov@h/1","why":["tier 2"],"how":"table","context":{}}"#,
];

const MAX: usize = 64 * 1024;

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_intent_submissions(body in hostile(INTENT_FIELDS, INTENT_VALID, MAX),
                               own in any::<bool>()) {
        let cfg = bulwark_common::BulwarkConfig::default().governance;
        let sender = if own { Sender::Identity("bot-7") } else { Sender::Unnamed };
        let result = bulwark_governance::service::decode_submission(&body, &cfg, sender);
        check_api(result, &body, &["invalid_intent", "identity_mismatch"]);
    }

    #[test]
    fn prop_review_decisions(body in hostile(REVIEW_FIELDS, REVIEW_VALID, MAX),
                             own in any::<bool>()) {
        let sender = if own { Sender::Identity("alice") } else { Sender::Unnamed };
        let bound = vec!["guardian".to_owned()];
        let result = ReviewDecision::parse(&body, MAX, sender, &bound);
        check_api(result, &body, &["invalid_review", "identity_mismatch", "identity_required"]);
    }

    #[test]
    fn prop_votes(body in hostile(VOTE_FIELDS, VOTE_VALID, MAX), own in any::<bool>()) {
        let sender = if own { Sender::Identity("guardian") } else { Sender::Unnamed };
        let result = VoteRequest::parse(&body, MAX, sender, &["*".to_owned()]);
        check_api(result, &body, &["invalid_vote", "identity_mismatch", "identity_required"]);
    }

    #[test]
    fn prop_mesh_envelopes(body in hostile(ENVELOPE_FIELDS, ENVELOPE_VALID, MAX),
                           subject in "mesh\\.[a-z0-9_.*>-]{0,20}") {
        match MeshEvent::normalise(&subject, &body, MAX) {
            Ok(event) => {
                // What is accepted survives a round trip and is within the limits.
                prop_assert!(event.depth <= bulwark_common::envelope::MAX_DEPTH);
                let text = serde_json::to_vec(&event).expect("an accepted event encodes");
                // (On its own subject: the subject decides the type.)
                let again = MeshEvent::normalise(&subject, &text, usize::MAX)
                    .expect("an accepted event normalises again");
                prop_assert_eq!(again, event);
            }
            Err(reason) => check_message(&reason, &body),
        }
    }

    #[test]
    fn prop_heartbeats_reports_and_assignments(
        heartbeat in hostile(HEARTBEAT_FIELDS, HEARTBEAT_VALID, 4096),
        report in hostile(REPORT_FIELDS, REPORT_VALID, 4096),
        assignment in hostile(ASSIGNMENT_FIELDS, ASSIGNMENT_VALID, 4096),
    ) {
        // The scheduler reads heartbeats with serde_json directly and dead-letters failures.
        // (its dead letters bound the message; the end-to-end test checks them).
        if let Err(err) = serde_json::from_slice::<Heartbeat>(&heartbeat) {
            prop_assert!(!err.to_string().is_empty());
        }
        check_api(api::decode::<Heartbeat>(&heartbeat, "invalid_heartbeat", 4096), &heartbeat,
                  &["invalid_heartbeat"]);
        check_api(api::decode::<TaskReport>(&report, "invalid_report", 4096), &report,
                  &["invalid_report"]);
        check_api(api::decode::<Assignment>(&assignment, "invalid_assignment", 4096),
                  &assignment, &["invalid_assignment"]);
    }

    #[test]
    fn prop_narratives(body in hostile(NARRATIVE_FIELDS, NARRATIVE_VALID, MAX)) {
        // Clarity never refuses a narrative: it keeps bad ones, flagged with the reason.
        let examined = bulwark_clarity::chain::examine(&body);
        if let Some(reason) = &examined.invalid_reason {
            check_message(reason, &body);
        }
        // Whatever is kept can be hashed into the chain.
        let _ = bulwark_clarity::chain::canonical_json(&examined.narrative);
    }

    #[test]
    fn prop_generic_json_requests(body in hostile(&["intent_id", "who", "limit", "since"],
                                                  &[r#"{"intent_id":"x"}"#], 4096)) {
        check_api(api::decode::<Value>(&body, "invalid_request", 4096), &body,
                  &["invalid_request"]);
        if let Ok(value) = api::parse_json(&body) {
            // What parses strictly has unique keys and re-encodes to the same value.
            let text = serde_json::to_vec(&value).expect("encodes");
            prop_assert_eq!(api::parse_json(&text).expect("parses again"), value);
        }
    }
}

// ---- the event policy rule loader -------------------------------------------------------------

const RULE_VALID: &[&str] = &[
    r#"[[rule]]
name = "urgent_task_failed_runs_worker_recovery"
description = "an urgent task failed"
on = "mesh.task.failed"
when = [{ field = "payload.priority", op = "gte", value = 8 }]
[rule.playbook]
name = "htm_worker_recovery"
severity = "high"
"#,
    r#"[[rule]]
name = "chain"
on = "mesh.a.>"
when = [{ field = "payload.k", op = "in", value = [1, "x", 2.5] }, { field = "source", op = "exists" }]
[rule.emit]
event_type = "b.c"
count = 3
payload = { copied = "$payload.k" }
"#,
];

fn rule_text() -> impl Strategy<Value = String> {
    let valid = prop::sample::select(RULE_VALID).prop_map(str::to_owned);
    prop_oneof![
        // Damaged valid files.
        (valid.clone(), prop::collection::vec(damage(), 1..5)).prop_map(|(text, damages)| {
            String::from_utf8_lossy(&apply(text.into_bytes(), &damages)).into_owned()
        }),
        // Keys of the format with values of every kind.
        (
            prop::sample::select(vec![
                "name",
                "on",
                "description",
                "when",
                "emit",
                "intent",
                "playbook",
                "count",
                "field",
                "op",
                "value",
                "event_type",
                "severity",
                "payload",
                "rule"
            ]),
            prop_oneof![
                prop::sample::select(&HUGE_NUMBERS[..]).prop_map(str::to_owned),
                ".{0,30}".prop_map(|s| format!("{s:?}")),
                Just("[]".to_owned()),
                Just("{}".to_owned()),
                Just("true".to_owned()),
                Just("1979-05-27T07:32:00Z".to_owned()),
                (1usize..3_000).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
                (1usize..3_000).prop_map(|d| format!("{}1{}", "{a=".repeat(d), "}".repeat(d))),
            ],
            valid,
        )
            .prop_map(|(key, value, base)| format!("{base}\n[[rule]]\n{key} = {value}\n")),
        // Duplicate keys and tables.
        Just(format!("{}{}", RULE_VALID[0], RULE_VALID[0])),
        Just("[[rule]]\nname = \"a\"\nname = \"b\"\n".to_owned()),
        // Arbitrary text.
        "\\PC{0,400}",
        // Deep table headers.
        (1usize..2_000).prop_map(|d| format!("[{}]\n", vec!["a"; d].join("."))),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_event_policy_rules(text in rule_text(), event in hostile(ENVELOPE_FIELDS,
                                                                       ENVELOPE_VALID, MAX)) {
        let files = vec![(PathBuf::from("hostile.toml"), text.clone())];
        match bulwark_event_policy::rules::PolicySet::parse(&files) {
            Ok(set) => {
                // Loaded rules evaluate any event without panicking.
                if let Ok(e) = MeshEvent::normalise("mesh.task.failed", &event, MAX) {
                    let value = serde_json::to_value(&e).expect("json");
                    for rule in &set.rules {
                        let _ = rule.matches("mesh.task.failed", &value);
                    }
                }
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                for err in errors {
                    prop_assert!(!err.reason.trim().is_empty(), "empty reason for {text:?}");
                    prop_assert!(err.reason.len() <= 4096, "unbounded reason: {}", err.reason);
                }
            }
        }
    }
}

// ---- the chaos scenario loader -----------------------------------------------------------------

/// The shipped scenario files, the valid bases the generator damages.
fn scenario_files() -> &'static [String] {
    static FILES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FILES.get_or_init(|| {
        let dir = repo_root().join("chaos/scenarios");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                    .filter_map(|p| std::fs::read_to_string(p).ok())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        assert!(!files.is_empty(), "no scenario files in {}", dir.display());
        files
    })
}

fn scenario_text() -> impl Strategy<Value = String> {
    let base = (0..scenario_files().len()).prop_map(|i| scenario_files()[i].clone());
    prop_oneof![
        // Damaged shipped scenarios.
        (base.clone(), prop::collection::vec(damage(), 1..6)).prop_map(|(text, damages)| {
            String::from_utf8_lossy(&apply(text.into_bytes(), &damages)).into_owned()
        }),
        // A shipped scenario with a key of the format given a value of another kind.
        (
            base.clone(),
            prop::sample::select(vec![
                "id",
                "category",
                "severity",
                "recovery_limit_s",
                "description",
                "kind",
                "rate_per_s",
                "duration_s",
                "at_s",
                "patterns",
                "checks",
                "safeguard",
                "value"
            ]),
            prop_oneof![
                prop::sample::select(&HUGE_NUMBERS[..]).prop_map(str::to_owned),
                Just("-1".to_owned()),
                Just("nan".to_owned()),
                Just("inf".to_owned()),
                Just("[]".to_owned()),
                Just("{}".to_owned()),
                ".{0,30}".prop_map(|s| format!("{s:?}")),
                (1usize..2_000).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
            ],
        )
            .prop_map(|(text, key, value)| {
                let mut out = String::new();
                let mut replaced = false;
                for line in text.lines() {
                    if !replaced && line.trim_start().starts_with(&format!("{key} =")) {
                        out.push_str(&format!("{key} = {value}\n"));
                        replaced = true;
                    } else {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                out
            }),
        // Arbitrary text and deep tables.
        "\\PC{0,400}",
        (1usize..2_000).prop_map(|d| format!("[{}]\n", vec!["a"; d].join("."))),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_chaos_scenarios(text in scenario_text()) {
        let file = std::path::Path::new("hostile.toml");
        if let Err(err) = bulwark_chaos::scenario::Scenario::parse(file, &text) {
            prop_assert!(!err.reason.trim().is_empty(), "empty reason for {text:?}");
            prop_assert!(err.reason.len() <= 4096, "unbounded reason: {}", err.reason);
        }
    }
}

// ---- end to end: hostile bodies on every consumed subject --------------------------------------

/// Bodies every endpoint must refuse with a reply; `field` is one the endpoint reads.
fn hostile_bodies(field: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("not JSON", b"{nope".to_vec()),
        ("invalid UTF-8", b"{\"intent_id\":\"\xff\xfe\"}".to_vec()),
        ("an array", b"[1,2,3]".to_vec()),
        (
            "deep nesting",
            format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        ),
        (
            "duplicate keys",
            format!(r#"{{"{field}":"a","{field}":"b"}}"#).into_bytes(),
        ),
        (
            "huge numbers",
            format!(r#"{{"{field}":1e999}}"#).into_bytes(),
        ),
        (
            "numbers past u64",
            format!(r#"{{"{field}":18446744073709551616}}"#).into_bytes(),
        ),
        (
            "wrong types",
            format!(r#"{{"{field}":{{"a":[true]}}}}"#).into_bytes(),
        ),
        (
            "oversize",
            format!(r#"{{"{field}":"{}"}}"#, "x".repeat(300 * 1024)).into_bytes(),
        ),
    ]
}

/// The request/reply subjects the services serve in this test, each with a field it reads and
/// whether an empty body is a valid request there (all fields optional: "use the defaults").
const ENDPOINTS: [(&str, &str, bool); 14] = [
    (subjects::INTENT_SUBMIT, "intent_type", false),
    ("htm.intent.submit.bot-7", "priority", false),
    (subjects::INTENT_STATUS, "intent_id", false),
    (subjects::INTENT_CANCEL, "intent_id", false),
    (subjects::REVIEW_DECIDE, "decision", false),
    ("governance.review.decide.alice", "intent_id", false),
    (subjects::VOTE, "vote", false),
    ("unified_logic.vote.guardian", "proposal_id", false),
    (subjects::CLARITY_QUERY, "limit", true),
    (subjects::TASK_RESULT, "fence", false),
    (subjects::SCHEDULER_SHED, "max", true),
    (subjects::SCHEDULER_REPLAY, "max", true),
    ("htm.worker.w1.task", "fence", false),
    ("htm.worker.w1.cancel", "fence", false),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_error_replies_and_dead_letters_and_services_keep_serving() {
    init_logging();
    let server = NatsServer::start();
    let cfg = server.config();
    let _gov = start_governance(cfg.clone()).await;
    let _clarity = start_clarity(cfg.clone()).await;
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _worker = start_worker(cfg.clone(), "w1").await;
    let _storm = start_storm_guard(cfg.clone()).await;
    let _policy = start_event_policy(cfg.clone()).await;
    let client = server.client().await;

    // Request/reply endpoints: every hostile body gets an error reply with a 4xx code.
    for (subject, field, empty_ok) in ENDPOINTS {
        for (what, body) in hostile_bodies(field) {
            if empty_ok && what == "empty" {
                continue;
            }
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                client.request(subject, body.clone().into()),
            )
            .await
            .unwrap_or_else(|_| panic!("{subject}: no reply to {what}"));
            let reply = match reply {
                Ok(reply) => reply,
                // The server refuses a message over max_payload before any service sees it.
                Err(err) if what == "oversize" && body.len() > 1024 * 1024 => {
                    panic!("{subject}: {what} not delivered: {err}")
                }
                Err(err) => panic!("{subject}: request with {what} failed: {err}"),
            };
            let code = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(api::SERVICE_ERROR_CODE))
                .map(|v| v.to_string());
            let value: Value = serde_json::from_slice(&reply.payload)
                .unwrap_or_else(|e| panic!("{subject}/{what}: reply is not JSON: {e}"));
            assert!(
                code.as_deref().is_some_and(|c| c.starts_with('4')),
                "{subject}/{what}: expected a 4xx error, got {code:?} {value}"
            );
            let message = value["error"]["message"].as_str().unwrap_or_default();
            assert!(
                !message.is_empty() && message.len() <= MAX_MESSAGE_BYTES + 64,
                "{subject}/{what}: {value}"
            );
        }
    }

    // Published subjects: hostile mesh events, heartbeats and narratives are dead-lettered or
    // flagged with the reason, never silently dropped.
    let mut dead = client
        .subscribe(subjects::MESH_DEADLETTER)
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let mesh_bodies: Vec<Vec<u8>> = hostile_bodies("depth")
        .into_iter()
        .filter(|(what, _)| *what != "oversize")
        .map(|(_, b)| b)
        // (A body over mesh.max_event_bytes is refused by the stream itself: never stored, so
        // never dead-lettered; tests/storage.rs.)
        .filter(|b| {
            b.len()
                <= bulwark_common::config::BulwarkConfig::default()
                    .mesh
                    .max_event_bytes
        })
        .collect();
    for (i, body) in mesh_bodies.iter().enumerate() {
        client
            .publish(format!("mesh.hostile.n{i}"), body.clone().into())
            .await
            .expect("published");
    }
    client.flush().await.expect("flush");
    let mut reasons = Vec::new();
    while reasons.len() < mesh_bodies.len() {
        let msg = tokio::time::timeout(Duration::from_secs(15), dead.next())
            .await
            .unwrap_or_else(|_| panic!("only {} dead letters: {reasons:?}", reasons.len()))
            .expect("dead letter");
        let letter: Value = serde_json::from_slice(&msg.payload).expect("dead letter is JSON");
        let subject = letter["payload"]["subject"].as_str().unwrap_or_default();
        if subject.starts_with("mesh.hostile.") && !reasons.iter().any(|(s, _)| s == subject) {
            reasons.push((
                subject.to_owned(),
                letter["payload"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ));
        }
    }
    for (subject, reason) in &reasons {
        assert!(
            !reason.is_empty() && reason.len() <= MAX_MESSAGE_BYTES + 64,
            "{subject}: {reason}"
        );
    }
    for (i, body) in mesh_bodies.iter().take(4).enumerate() {
        client
            .publish(
                subjects::worker_heartbeat(&format!("hostile{i}")),
                body.clone().into(),
            )
            .await
            .expect("published");
        client
            .publish(subjects::narrative("hostile"), body.clone().into())
            .await
            .expect("published");
    }
    client.flush().await.expect("flush");

    // And everything still serves.
    let (decision, code) = request_json(
        &client,
        subjects::INTENT_SUBMIT,
        json!({"intent_id": "after-hostile", "intent_type": "query_knowledge", "actor": "a"})
            .to_string(),
    )
    .await;
    assert_eq!((code, decision["status"].as_str()), (None, Some("queued")));
    let completed = eventually(Duration::from_secs(20), "the task to complete", || {
        let client = client.clone();
        async move {
            let (status, _) = request_json(
                &client,
                subjects::INTENT_STATUS,
                json!({"intent_id": "after-hostile"}).to_string(),
            )
            .await;
            (status["status"] == "completed").then_some(status)
        }
    })
    .await;
    assert_eq!(completed["worker_id"], "w1");
    // Hostile narratives are kept in the audit chain, flagged with a bounded reason.
    let js = async_nats::jetstream::new(client.clone());
    let flagged = eventually(Duration::from_secs(20), "the flagged narratives", || {
        let js = js.clone();
        async move {
            let mut audit = js
                .get_stream(bulwark_common::streams::AUDIT_STREAM)
                .await
                .ok()?;
            let state = audit.info().await.ok()?.state.clone();
            let mut found = Vec::new();
            for seq in state.first_sequence..=state.last_sequence {
                if let Ok(msg) = audit.get_raw_message(seq).await {
                    let record: Value = serde_json::from_slice(&msg.payload).ok()?;
                    if record["subject"] == "clarity.narrative.hostile" {
                        found.push(record);
                    }
                }
            }
            (found.len() >= 4).then_some(found)
        }
    })
    .await;
    for record in &flagged {
        let reason = record["invalid_reason"].as_str().unwrap_or_default();
        assert_eq!(record["valid"], false, "{record}");
        assert!(
            !reason.is_empty() && reason.len() <= MAX_MESSAGE_BYTES + 64,
            "{record}"
        );
    }
    let (verify, code) = request_json(&client, subjects::CLARITY_VERIFY, "{}").await;
    assert_eq!(
        (code, verify["ok"].as_bool()),
        (None, Some(true)),
        "{verify}"
    );
    let (status, code) = request_json(&client, subjects::STORM_GUARD_STATUS, "{}").await;
    assert_eq!(code, None, "{status}");
}
