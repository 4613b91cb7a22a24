//! Policy rules: the file format, loading with errors that name the file and line, and
//! matching (pure).
//!
//! A rule file is TOML holding `[[rule]]` tables (see `docs/mesh.md`):
//!
//! ```toml
//! [[rule]]
//! name = "failed_urgent_task_escalates"      # [a-z0-9_-], unique across all files
//! description = "an urgent task failed"      # optional
//! on = "mesh.task.failed"                    # subject pattern: `*` one token, `>` the rest
//! when = [{ field = "payload.priority", op = "gte", value = 8 }]   # all must hold; optional
//! [rule.emit]                                # exactly one of emit / intent / playbook
//! event_type = "task.escalated"              # `{depth}` becomes the child's depth
//! payload = { reason = "urgent task failed" }
//! count = 1                                  # children per matching event, 1-1000
//! ```
//!
//! `[rule.intent]` takes `intent_type`, `actor` (default `event_policy_engine`), `priority`
//! (0-9, optional) and `payload`; `[rule.playbook]` takes `name`, `severity` (default `high`),
//! `forward` (the keys of the event's payload copied into the incident; nothing else of it is)
//! and `params`. Condition `op`s: `eq`, `ne`, `gt`, `gte`, `lt`, `lte`, `exists`, `in` (value
//! is an array), `prefix` (value is a string). `field` is an envelope field (`event_type`,
//! `source`, `actor`, `resource`, `subsystem`, `depth`, `correlation_id`, `causation_id`) or a
//! dotted path under `payload`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Children one rule may produce per event, at most.
pub const MAX_COUNT: u64 = 1_000;

/// A rule file that cannot be loaded: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {reason}", file.display())]
pub struct RuleError {
    /// The file.
    pub file: PathBuf,
    /// The line (1-based) the problem is on, or the rule starts on.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// How a field is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Equal to `value`.
    Eq,
    /// Not equal to `value` (true when the field is missing).
    Ne,
    /// A number greater than `value`.
    Gt,
    /// A number at least `value`.
    Gte,
    /// A number less than `value`.
    Lt,
    /// A number at most `value`.
    Lte,
    /// The field is present and not null.
    Exists,
    /// Equal to one of the array `value`.
    In,
    /// A string starting with `value`.
    Prefix,
}

/// One condition of a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Envelope field or `payload.` path.
    pub field: String,
    /// The comparison.
    pub op: Op,
    /// What to compare with (not for `exists`).
    #[serde(default)]
    pub value: Option<toml::Value>,
}

/// Emit child events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmitSpec {
    /// Type of the children; `{depth}` is replaced by their depth.
    pub event_type: String,
    /// Their payload.
    #[serde(default)]
    pub payload: BTreeMap<String, toml::Value>,
    /// Children per matching event.
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// Submit an intent to governance (`htm.intent.submit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentSpec {
    /// The intent type.
    pub intent_type: String,
    /// Who asks (default `event_policy_engine`).
    #[serde(default)]
    pub actor: Option<String>,
    /// Priority 0-9.
    #[serde(default)]
    pub priority: Option<u8>,
    /// Its payload.
    #[serde(default)]
    pub payload: BTreeMap<String, toml::Value>,
}

/// Run a playbook: a `mesh.event.incident` naming it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaybookSpec {
    /// The playbook.
    pub name: String,
    /// Incident severity (default `high`).
    #[serde(default)]
    pub severity: Option<String>,
    /// Keys of the triggering event's payload copied into the incident (nothing else of it
    /// is): the facts the playbook needs, e.g. `worker_id`. The playbook takes from the
    /// incident only the keys its own `forward` list names.
    #[serde(default)]
    pub forward: Vec<String>,
    /// Values put into the incident, over forwarded keys of the same name. Like forwarded keys
    /// they reach the playbook only if it forwards them; safety parameters (retries, intervals,
    /// limits, `resume_paused`) are set in `[playbooks.overrides]`, never here.
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
}

/// Keys of an incident a rule writes itself; not forwardable.
pub const INCIDENT_KEYS: [&str; 5] = ["trigger_id", "playbook", "severity", "rule", "event_type"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    #[serde(default)]
    description: String,
    on: String,
    #[serde(default)]
    when: Vec<Condition>,
    #[serde(default)]
    emit: Option<EmitSpec>,
    #[serde(default)]
    intent: Option<IntentSpec>,
    #[serde(default)]
    playbook: Option<PlaybookSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<toml::Spanned<RuleSpec>>,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Publish child events.
    Emit(EmitSpec),
    /// Submit an intent.
    Intent(IntentSpec),
    /// Publish an incident naming a playbook.
    Playbook(PlaybookSpec),
}

/// A loaded rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    /// Unique name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Subject pattern.
    pub on: String,
    /// Conditions, all of which must hold.
    pub when: Vec<Condition>,
    /// The action.
    pub action: Action,
    /// File and line it was loaded from.
    pub origin: String,
    #[serde(skip)]
    pointers: Vec<(String, Option<Value>)>,
}

impl Rule {
    /// True when `event` (the envelope as JSON) on `subject` matches.
    pub fn matches(&self, subject: &str, event: &Value) -> bool {
        bulwark_common::mesh::subject_matches(&self.on, subject)
            && self
                .when
                .iter()
                .zip(&self.pointers)
                .all(|(c, (pointer, value))| holds(c.op, event.pointer(pointer), value.as_ref()))
    }
}

fn holds(op: Op, field: Option<&Value>, value: Option<&Value>) -> bool {
    let field = field.filter(|f| !f.is_null());
    let number = |v: Option<&Value>| v.and_then(Value::as_f64);
    let compare = |f: fn(f64, f64) -> bool| match (number(field), number(value)) {
        (Some(a), Some(b)) => f(a, b),
        _ => false,
    };
    match op {
        Op::Exists => field.is_some(),
        Op::Eq => field.is_some() && equal(field, value),
        Op::Ne => !equal(field, value),
        Op::Gt => compare(|a, b| a > b),
        Op::Gte => compare(|a, b| a >= b),
        Op::Lt => compare(|a, b| a < b),
        Op::Lte => compare(|a, b| a <= b),
        Op::In => value
            .and_then(Value::as_array)
            .is_some_and(|items| items.iter().any(|i| equal(field, Some(i)))),
        Op::Prefix => match (field.and_then(Value::as_str), value.and_then(Value::as_str)) {
            (Some(f), Some(p)) => f.starts_with(p),
            _ => false,
        },
    }
}

/// Equality where numbers compare by value (`1` equals `1.0`).
fn equal(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x.as_f64() == y.as_f64(),
        (Some(x), Some(y)) => x == y,
        (None, None) => true,
        _ => false,
    }
}

/// The loaded rules, in file-name then file order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicySet {
    /// The rules.
    pub rules: Vec<Rule>,
}

impl PolicySet {
    /// Loads every `*.toml` file of `dir` (sorted by name). A missing directory is an empty set;
    /// any error in any file fails the whole load, with every error found.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<RuleError>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(PolicySet::default());
            }
            Err(err) => {
                return Err(vec![RuleError {
                    file: dir.to_owned(),
                    line: 0,
                    reason: format!("cannot read the policies directory: {err}"),
                }]);
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => sources.push((file, text)),
                Err(err) => errors.push(RuleError {
                    file,
                    line: 0,
                    reason: format!("cannot read: {err}"),
                }),
            }
        }
        match PolicySet::parse(&sources) {
            Ok(set) if errors.is_empty() => Ok(set),
            Ok(_) => Err(errors),
            Err(more) => {
                errors.extend(more);
                Err(errors)
            }
        }
    }

    /// Parses rule files given as `(name, text)`.
    pub fn parse(files: &[(PathBuf, String)]) -> Result<PolicySet, Vec<RuleError>> {
        let mut rules: Vec<Rule> = Vec::new();
        let mut errors = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (file, text) in files {
            let parsed: RuleFile = match toml::from_str(text) {
                Ok(parsed) => parsed,
                Err(err) => {
                    errors.push(RuleError {
                        file: file.clone(),
                        line: err.span().map_or(0, |s| line_of(text, s.start)),
                        reason: err.message().trim().to_owned(),
                    });
                    continue;
                }
            };
            for spanned in parsed.rule {
                let line = line_of(text, spanned.span().start);
                let spec = spanned.into_inner();
                let origin = format!("{}:{line}", file.display());
                match build(spec, origin.clone()) {
                    Ok(rule) => {
                        if let Some(first) = seen.get(&rule.name) {
                            errors.push(RuleError {
                                file: file.clone(),
                                line,
                                reason: format!(
                                    "rule name {:?} is already used at {first}",
                                    rule.name
                                ),
                            });
                        } else {
                            seen.insert(rule.name.clone(), origin);
                            rules.push(rule);
                        }
                    }
                    Err(reason) => errors.push(RuleError {
                        file: file.clone(),
                        line,
                        reason,
                    }),
                }
            }
        }
        if errors.is_empty() {
            Ok(PolicySet { rules })
        } else {
            Err(errors)
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_pattern(pattern: &str) -> bool {
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens.first() == Some(&"mesh")
        && tokens.len() >= 2
        && tokens.iter().enumerate().all(|(i, t)| {
            !t.is_empty()
                && (*t != ">" || i == tokens.len() - 1)
                && (t.len() == 1 || !t.contains(['*', '>']))
                && !t.contains(char::is_whitespace)
        })
}

const ENVELOPE_FIELDS: [&str; 9] = [
    "event_id",
    "event_type",
    "source",
    "actor",
    "resource",
    "subsystem",
    "depth",
    "correlation_id",
    "causation_id",
];

fn pointer_of(field: &str) -> Option<String> {
    if ENVELOPE_FIELDS.contains(&field) {
        return Some(format!("/{field}"));
    }
    let path = field.strip_prefix("payload.")?;
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return None;
    }
    Some(format!(
        "/payload/{}",
        path.split('.')
            .map(|t| t.replace('~', "~0").replace('/', "~1"))
            .collect::<Vec<_>>()
            .join("/")
    ))
}

fn build(spec: RuleSpec, origin: String) -> Result<Rule, String> {
    if !valid_name(&spec.name) {
        return Err(format!(
            "rule name {:?} must be 1-64 characters of [a-z0-9_-]",
            spec.name
        ));
    }
    let name = &spec.name;
    if !valid_pattern(&spec.on) {
        return Err(format!(
            "rule {name}: `on` = {:?} is not a mesh subject pattern (mesh.<tokens>, `*` for one token, `>` last)",
            spec.on
        ));
    }
    let mut pointers = Vec::new();
    for c in &spec.when {
        let pointer = pointer_of(&c.field).ok_or_else(|| {
            format!(
                "rule {name}: field {:?} is neither an envelope field ({}) nor a payload.<path>",
                c.field,
                ENVELOPE_FIELDS.join(", ")
            )
        })?;
        let value = match (&c.value, c.op) {
            (None, Op::Exists) => None,
            (Some(_), Op::Exists) => {
                return Err(format!(
                    "rule {name}: op exists on {} takes no value",
                    c.field
                ));
            }
            (None, op) => {
                return Err(format!(
                    "rule {name}: op {op:?} on {} needs a value",
                    c.field
                ));
            }
            (Some(v), op) => {
                let json = serde_json::to_value(v).map_err(|e| format!("rule {name}: {e}"))?;
                let fits = match op {
                    Op::Gt | Op::Gte | Op::Lt | Op::Lte => json.is_number(),
                    Op::In => json.is_array(),
                    Op::Prefix => json.is_string(),
                    _ => true,
                };
                if !fits {
                    return Err(format!(
                        "rule {name}: op {op:?} on {} needs a {} value",
                        c.field,
                        match op {
                            Op::In => "array",
                            Op::Prefix => "string",
                            _ => "number",
                        }
                    ));
                }
                Some(json)
            }
        };
        pointers.push((pointer, value));
    }
    let action = match (spec.emit, spec.intent, spec.playbook) {
        (Some(emit), None, None) => {
            let sample = emit.event_type.replace("{depth}", "0");
            if !bulwark_common::subjects::is_valid_event_type(&sample) {
                return Err(format!(
                    "rule {name}: emit.event_type {:?} is not dot-separated tokens of [a-z0-9_-] (`{{depth}}` allowed)",
                    emit.event_type
                ));
            }
            if emit.count == 0 || emit.count > MAX_COUNT {
                return Err(format!(
                    "rule {name}: emit.count must be 1-{MAX_COUNT}, got {}",
                    emit.count
                ));
            }
            Action::Emit(emit)
        }
        (None, Some(intent), None) => {
            if intent.intent_type.trim().is_empty() {
                return Err(format!("rule {name}: intent.intent_type is empty"));
            }
            if intent.priority.is_some_and(|p| p > 9) {
                return Err(format!("rule {name}: intent.priority must be 0-9"));
            }
            Action::Intent(intent)
        }
        (None, None, Some(playbook)) => {
            if !valid_name(&playbook.name) {
                return Err(format!(
                    "rule {name}: playbook.name {:?} must be 1-64 characters of [a-z0-9_-]",
                    playbook.name
                ));
            }
            for key in &playbook.forward {
                if !valid_name(key) || INCIDENT_KEYS.contains(&key.as_str()) {
                    return Err(format!(
                        "rule {name}: playbook.forward names {key:?}: keys are 1-64 characters of [a-z0-9_-], not one the incident sets itself ({})",
                        INCIDENT_KEYS.join(", ")
                    ));
                }
            }
            Action::Playbook(playbook)
        }
        (None, None, None) => {
            return Err(format!(
                "rule {name} has no action: give one of [rule.emit], [rule.intent], [rule.playbook]"
            ));
        }
        _ => {
            return Err(format!(
                "rule {name} has more than one action: give exactly one of [rule.emit], [rule.intent], [rule.playbook]"
            ));
        }
    };
    Ok(Rule {
        name: spec.name,
        description: spec.description,
        on: spec.on,
        when: spec.when,
        action,
        origin,
        pointers,
    })
}

/// A TOML table as JSON.
pub fn to_json(table: &BTreeMap<String, toml::Value>) -> Value {
    serde_json::to_value(table).unwrap_or(Value::Object(Default::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<PolicySet, Vec<RuleError>> {
        PolicySet::parse(&[(PathBuf::from("p.toml"), text.to_owned())])
    }

    #[test]
    fn rules_match_subjects_and_conditions() {
        let set = parse(
            r#"
[[rule]]
name = "urgent"
on = "mesh.task.*"
when = [{ field = "payload.priority", op = "gte", value = 8 },
        { field = "source", op = "in", value = ["htm_worker", "scheduler"] }]
[rule.emit]
event_type = "task.escalated.l{depth}"
count = 2
"#,
        )
        .expect("valid");
        let rule = &set.rules[0];
        assert_eq!(rule.origin, "p.toml:2");
        let event = |p: u64, source: &str| json!({"source": source, "payload": {"priority": p}});
        assert!(rule.matches("mesh.task.failed", &event(9, "htm_worker")));
        assert!(!rule.matches("mesh.task.failed", &event(7, "htm_worker")));
        assert!(!rule.matches("mesh.task.failed", &event(9, "agent")));
        assert!(!rule.matches("mesh.task.failed.x", &event(9, "htm_worker")));
        assert!(!rule.matches("mesh.task.failed", &json!({"source": "scheduler"})));
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let cases: [(&str, usize, &str); 7] = [
            (
                "[[rule]]\nname = \"a\"\non = \"mesh.x\"\n",
                1,
                "has no action",
            ),
            (
                "[[rule]]\nname = \"a\"\non = \"mesh.x\"\n[rule.emit]\nevent_type = \"y\"\n[rule.playbook]\nname = \"p\"\n",
                1,
                "more than one action",
            ),
            (
                "\n\n[[rule]]\nname = \"a\"\non = \"task.x\"\n[rule.emit]\nevent_type = \"y\"\n",
                3,
                "not a mesh subject pattern",
            ),
            (
                "[[rule]]\nname = \"a\"\non = \"mesh.x\"\nwhen = [{ field = \"payload.n\", op = \"bigger\", value = 1 }]\n[rule.emit]\nevent_type = \"y\"\n",
                4,
                "bigger",
            ),
            (
                "[[rule]]\nname = \"a\"\non = \"mesh.x\"\n[rule.emit]\nevent_type = \"Bad Type\"\n",
                1,
                "emit.event_type",
            ),
            (
                "[[rule]]\nname = \"a\"\non = \"mesh.x\"\nunknown = 1\n[rule.emit]\nevent_type = \"y\"\n",
                4,
                "unknown",
            ),
            ("[[rule]\n", 1, ""),
        ];
        for (text, line, reason) in cases {
            let errors = parse(text).expect_err(text);
            assert_eq!(errors[0].line, line, "{text}: {:?}", errors);
            assert!(
                errors[0].reason.contains(reason),
                "{:?} lacks {reason}",
                errors[0]
            );
            assert!(
                errors[0]
                    .to_string()
                    .starts_with(&format!("p.toml:{line}: "))
            );
        }
        let twice = "[[rule]]\nname = \"a\"\non = \"mesh.x\"\n[rule.emit]\nevent_type = \"y\"\n[[rule]]\nname = \"a\"\non = \"mesh.z\"\n[rule.emit]\nevent_type = \"y\"\n";
        let errors = parse(twice).expect_err("duplicate");
        assert_eq!(errors[0].line, 6);
        assert!(errors[0].reason.contains("already used at p.toml:1"));
    }

    #[test]
    fn the_repository_policies_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let set = PolicySet::load_dir(&dir).expect("policies/*.toml are valid");
        assert!(!set.rules.is_empty());
        assert!(
            PolicySet::load_dir(Path::new("/nonexistent"))
                .expect("empty")
                .rules
                .is_empty()
        );
    }
}
