//! The playbook file format and the library of compiled playbooks (pure: no NATS here).
//!
//! A playbook is `playbooks/<name>.rhai`. It defines `fn playbook()` returning its metadata
//! map, one function per step, and optionally a verification and a rollback function:
//!
//! ```text
//! fn playbook() {
//!     #{
//!         name: "trigger_storm_mitigation",          // must equal the file name
//!         description: "Limit a stormed event type and throttle its source",
//!         triggers: ["event.incident"],              // event types that may start it
//!         params: #{ event_type: "string", rate_per_second: "float" },
//!         defaults: #{ limit_per_second: 100 },      // optional parameters
//!         resource: "event_type",                    // one run per (playbook, this value)
//!         slo_s: 60, cooldown_s: 120,
//!         steps: [ #{ run: "rate_limit", title: "Rate-limit the type to 100/s" }, ... ],
//!         verify: "verify_rate",                     // optional: final check, returns bool
//!         rollback: "undo",                          // optional: runs when a step or verify fails
//!     }
//! }
//! fn rate_limit(p) { limit_event_type(p.event_type, p.limit_per_second, 300.0); #{ limited_to: p.limit_per_second } }
//! ```
//!
//! A file holds functions; top-level code runs once at load, in the sandbox without host
//! functions (so `import` fails there), and never during runs.
//!
//! Each step function takes the parameters map `p`; a map it returns is merged into `p` for
//! the steps after it and shown in its narrative. Parameter types: `string`, `int`, `float`
//! (an int is accepted), `bool`, `map`, `array`, `any`. The full format, with the host
//! functions, is in docs/playbooks.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{AST, Dynamic, Map};
use serde::Serialize;
use serde_json::Value;

use crate::sandbox::{self, Limits, Packages, ScriptError};

/// A parameter's declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// A JSON string.
    String,
    /// A whole number.
    Int,
    /// Any number.
    Float,
    /// true or false.
    Bool,
    /// A JSON object.
    Map,
    /// A JSON array.
    Array,
    /// Anything.
    Any,
}

impl ParamType {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "string" => Self::String,
            "int" => Self::Int,
            "float" => Self::Float,
            "bool" => Self::Bool,
            "map" => Self::Map,
            "array" => Self::Array,
            "any" => Self::Any,
            _ => return None,
        })
    }

    fn accepts(self, value: &Value) -> bool {
        match self {
            Self::String => value.is_string(),
            Self::Int => value.is_i64() || value.is_u64(),
            Self::Float => value.is_number(),
            Self::Bool => value.is_boolean(),
            Self::Map => value.is_object(),
            Self::Array => value.is_array(),
            Self::Any => true,
        }
    }

    /// The name used in files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Int => "int",
            Self::Float => "float",
            Self::Bool => "bool",
            Self::Map => "map",
            Self::Array => "array",
            Self::Any => "any",
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Param {
    /// Its name (a key of `p`).
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// Its default; a parameter without one is required.
    pub default: Option<Value>,
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// The script function it runs.
    pub run: String,
    /// What it does, for narratives and listings.
    pub title: String,
}

/// A playbook's metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Meta {
    /// Its name, equal to its file name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Event types that may start it (`event.incident`, `event.emergency`).
    pub triggers: Vec<String>,
    /// The keys of a triggering event's payload that become parameters (each a declared
    /// parameter). Every other key of the payload is ignored: the rest of the parameters come
    /// from the defaults and the operator's `[playbooks.overrides]`, which also win over a
    /// forwarded key.
    pub forward: Vec<String>,
    /// Declared parameters.
    pub params: Vec<Param>,
    /// The parameter naming the resource; one run per (playbook, resource) at a time.
    pub resource: Option<String>,
    /// Time it should finish in, seconds.
    pub slo_s: f64,
    /// Time after a run during which repeated incidents are counted, not run, seconds.
    pub cooldown_s: f64,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The final verification function, if any.
    pub verify: Option<String>,
    /// The rollback function, if any.
    pub rollback: Option<String>,
}

/// A compiled playbook.
#[derive(Debug, Clone)]
pub struct Playbook {
    /// Its metadata.
    pub meta: Meta,
    /// The compiled script.
    pub ast: Arc<AST>,
    /// The file it came from.
    pub path: PathBuf,
}

/// Why a playbook did not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{location}: {message}")]
pub struct LoadError {
    /// The file.
    pub file: String,
    /// `line:column` or `?`.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

/// Why parameters were refused before a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

fn meta_error(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError {
        file: path.display().to_string(),
        location: "?".to_owned(),
        message: message.into(),
    }
}

fn get_str(map: &Map, key: &str) -> Option<String> {
    map.get(key).and_then(|v| v.clone().into_string().ok())
}

fn get_num(map: &Map, key: &str) -> Option<f64> {
    let v = map.get(key)?;
    v.as_float()
        .ok()
        .or_else(|| v.as_int().ok().map(|i| i as f64))
}

/// Compiles `source` (from `path`) and reads its metadata.
pub fn compile(
    path: &Path,
    source: &str,
    packages: &Packages,
    limits: &Limits,
) -> Result<Playbook, LoadError> {
    let engine = sandbox::engine(packages, limits);
    let ast = engine.compile(source).map_err(|err| {
        let e = ScriptError::from_parse(&err);
        LoadError {
            file: path.display().to_string(),
            location: e.location(),
            message: e.message,
        }
    })?;
    // Runs are function calls; top-level code would never run in them. Run it once here, in
    // the sandbox without host functions, so an `import` (or anything else forbidden) there is
    // refused at load rather than lying dormant.
    engine
        .run_ast(&ast.clone_statements_only())
        .map_err(|err| {
            let e = ScriptError::from_eval(&err, limits);
            LoadError {
                file: path.display().to_string(),
                location: e.location(),
                message: format!("top-level code: {}", e.message),
            }
        })?;
    let functions: BTreeMap<String, usize> = ast
        .iter_functions()
        .map(|f| (f.name.to_owned(), f.params.len()))
        .collect();
    if functions.get("playbook") != Some(&0) {
        return Err(meta_error(
            path,
            "defines no `fn playbook()` returning the metadata map",
        ));
    }
    let options = rhai::CallFnOptions::new().eval_ast(false);
    let raw: Dynamic = engine
        .call_fn_with_options(options, &mut rhai::Scope::new(), &ast, "playbook", ())
        .map_err(|err| {
            let e = ScriptError::from_eval(&err, limits);
            LoadError {
                file: path.display().to_string(),
                location: e.location(),
                message: format!("playbook() failed: {}", e.message),
            }
        })?;
    let Some(map) = raw.try_cast::<Map>() else {
        return Err(meta_error(path, "playbook() must return a map (#{...})"));
    };
    let meta = read_meta(path, &map, &functions)?;
    Ok(Playbook {
        meta,
        ast: Arc::new(ast),
        path: path.to_owned(),
    })
}

const META_KEYS: [&str; 12] = [
    "name",
    "description",
    "triggers",
    "forward",
    "params",
    "defaults",
    "resource",
    "slo_s",
    "cooldown_s",
    "steps",
    "verify",
    "rollback",
];

fn read_meta(
    path: &Path,
    map: &Map,
    functions: &BTreeMap<String, usize>,
) -> Result<Meta, LoadError> {
    let bad = |m: String| Err(meta_error(path, m));
    for key in map.keys() {
        if !META_KEYS.contains(&key.as_str()) {
            return bad(format!(
                "unknown metadata key {key:?} (known: {})",
                META_KEYS.join(", ")
            ));
        }
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned();
    let Some(name) = get_str(map, "name") else {
        return bad("metadata needs `name`, a string".into());
    };
    if name != stem {
        return bad(format!("name {name:?} differs from the file name {stem:?}"));
    }
    let description = get_str(map, "description").unwrap_or_default();
    let triggers = match map.get("triggers") {
        None => Vec::new(),
        Some(v) => match v.clone().try_cast::<rhai::Array>() {
            Some(items) => items
                .into_iter()
                .map(|t| t.into_string().map_err(|_| ()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|()| meta_error(path, "`triggers` must be an array of event types"))?,
            None => return bad("`triggers` must be an array of event types".into()),
        },
    };
    let defaults: Map = match map.get("defaults") {
        None => Map::new(),
        Some(v) => match v.clone().try_cast::<Map>() {
            Some(m) => m,
            None => return bad("`defaults` must be a map".into()),
        },
    };
    let mut params = Vec::new();
    if let Some(v) = map.get("params") {
        let Some(declared) = v.clone().try_cast::<Map>() else {
            return bad("`params` must be a map of name to type".into());
        };
        for (pname, ptype) in declared {
            let Some(kind) = ptype
                .clone()
                .into_string()
                .ok()
                .and_then(|t| ParamType::parse(&t))
            else {
                return bad(format!(
                    "parameter {pname}: type must be one of string, int, float, bool, map, array, any"
                ));
            };
            let default = match defaults.get(pname.as_str()) {
                Some(d) => Some(
                    rhai::serde::from_dynamic::<Value>(d)
                        .map_err(|e| meta_error(path, format!("default of {pname}: {e}")))?,
                ),
                None => None,
            };
            if let Some(d) = &default
                && !kind.accepts(d)
            {
                return bad(format!("default of {pname} is not a {}", kind.name()));
            }
            params.push(Param {
                name: pname.to_string(),
                kind,
                default,
            });
        }
    }
    for key in defaults.keys() {
        if !params.iter().any(|p| p.name == key.as_str()) {
            return bad(format!(
                "default for {key}, which is not a declared parameter"
            ));
        }
    }
    let forward = read_forward(path, map, &params)?;
    let resource = get_str(map, "resource");
    if let Some(r) = &resource
        && !params.iter().any(|p| &p.name == r)
    {
        return bad(format!("resource {r:?} is not a declared parameter"));
    }
    let slo_s = get_num(map, "slo_s").unwrap_or(60.0);
    let cooldown_s = get_num(map, "cooldown_s").unwrap_or(0.0);
    if slo_s.is_nan() || slo_s <= 0.0 || cooldown_s.is_nan() || cooldown_s < 0.0 {
        return bad("slo_s must be positive and cooldown_s 0 or more".into());
    }
    let Some(raw_steps) = map
        .get("steps")
        .and_then(|v| v.clone().try_cast::<rhai::Array>())
    else {
        return bad("metadata needs `steps`, an array".into());
    };
    let mut steps = Vec::new();
    for (i, raw) in raw_steps.into_iter().enumerate() {
        let step = if let Ok(run) = raw.clone().into_string() {
            Step {
                title: run.clone(),
                run,
            }
        } else if let Some(m) = raw.try_cast::<Map>() {
            let Some(run) = get_str(&m, "run") else {
                return bad(format!("step {} needs `run`, a function name", i + 1));
            };
            Step {
                title: get_str(&m, "title").unwrap_or_else(|| run.clone()),
                run,
            }
        } else {
            return bad(format!(
                "step {} must be a function name or #{{run, title}}",
                i + 1
            ));
        };
        steps.push(step);
    }
    if steps.is_empty() {
        return bad("a playbook needs at least one step".into());
    }
    let verify = get_str(map, "verify");
    let rollback = get_str(map, "rollback");
    let needed = steps
        .iter()
        .map(|s| s.run.clone())
        .chain(verify.clone())
        .chain(rollback.clone());
    for f in needed {
        match functions.get(&f) {
            Some(1) => {}
            Some(n) => {
                return bad(format!("fn {f} must take one parameter (p), it takes {n}"));
            }
            None => return bad(format!("names fn {f}, which the script does not define")),
        }
    }
    Ok(Meta {
        name,
        description,
        triggers,
        forward,
        params,
        resource,
        slo_s,
        cooldown_s,
        steps,
        verify,
        rollback,
    })
}

/// Reads `forward`: an array of declared parameter names, each once.
fn read_forward(path: &Path, map: &Map, params: &[Param]) -> Result<Vec<String>, LoadError> {
    let Some(v) = map.get("forward") else {
        return Ok(Vec::new());
    };
    let not_names = || meta_error(path, "`forward` must be an array of parameter names");
    let items = v.clone().try_cast::<rhai::Array>().ok_or_else(not_names)?;
    let mut forward: Vec<String> = Vec::new();
    for item in items {
        let key = item.into_string().map_err(|_| not_names())?;
        if !params.iter().any(|p| p.name == key) {
            return Err(meta_error(
                path,
                format!("forward names {key:?}, which is not a declared parameter"),
            ));
        }
        if forward.contains(&key) {
            return Err(meta_error(path, format!("forward names {key:?} twice")));
        }
        forward.push(key);
    }
    Ok(forward)
}

/// The parameters a triggering event contributes to a run, and what became of its keys.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Forwarding {
    /// The given parameters before defaults: the forwarded keys, then the operator's
    /// overrides over them.
    pub given: serde_json::Map<String, Value>,
    /// Payload keys taken as parameters (listed in `forward`, not overridden).
    pub forwarded: Vec<String>,
    /// Payload keys not taken: unlisted, or replaced by an operator's override (`playbook`,
    /// which only names the playbook, is not listed).
    pub ignored: Vec<String>,
}

impl Meta {
    /// What a triggering event's `payload` contributes, with the operator's `overrides` of this
    /// playbook over it: only the keys of `forward`; an override wins over a forwarded key.
    pub fn forwarding(
        &self,
        payload: &Value,
        overrides: Option<&BTreeMap<String, Value>>,
    ) -> Forwarding {
        let mut out = Forwarding::default();
        let overridden = |k: &str| overrides.is_some_and(|o| o.contains_key(k));
        if let Value::Object(payload) = payload {
            for (key, value) in payload {
                if self.forward.contains(key) && !overridden(key) {
                    out.given.insert(key.clone(), value.clone());
                    out.forwarded.push(key.clone());
                } else if key != "playbook" {
                    out.ignored.push(key.clone());
                }
            }
        }
        for (key, value) in overrides.into_iter().flatten() {
            out.given.insert(key.clone(), value.clone());
        }
        out.forwarded.sort();
        out.ignored.sort();
        out
    }

    /// Checks `given` against the declared parameters and fills in defaults; refuses missing
    /// required parameters and wrong types before anything runs. Undeclared keys are kept
    /// (an incident carries more than a playbook needs).
    pub fn bind(&self, given: &Value) -> Result<serde_json::Map<String, Value>, ParamError> {
        let mut p = match given {
            Value::Object(m) => m.clone(),
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(ParamError(format!(
                    "parameters must be a JSON object, got {}",
                    bulwark_common::api::json_kind(other)
                )));
            }
        };
        let mut problems = Vec::new();
        for param in &self.params {
            match p.get(&param.name) {
                Some(v) if param.kind.accepts(v) => {}
                Some(v) => problems.push(format!(
                    "{} must be {} {}, got {}",
                    param.name,
                    if param.kind == ParamType::Int {
                        "an"
                    } else {
                        "a"
                    },
                    param.kind.name(),
                    bulwark_common::api::json_kind(v)
                )),
                None => match &param.default {
                    Some(d) => {
                        p.insert(param.name.clone(), d.clone());
                    }
                    None => problems.push(format!(
                        "{} ({}) is required",
                        param.name,
                        param.kind.name()
                    )),
                },
            }
        }
        if problems.is_empty() {
            Ok(p)
        } else {
            Err(ParamError(format!(
                "parameters refused for {}: {}",
                self.name,
                problems.join("; ")
            )))
        }
    }

    /// The resource key of a run with parameters `p`.
    pub fn resource_of(&self, p: &serde_json::Map<String, Value>) -> String {
        match &self.resource {
            Some(r) => match p.get(r) {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "*".to_owned(),
            },
            None => "*".to_owned(),
        }
    }
}

/// Every playbook of a folder, compiled, and the files that failed.
#[derive(Debug, Clone, Default)]
pub struct Library {
    /// Loaded playbooks by name.
    pub playbooks: BTreeMap<String, Playbook>,
    /// Files that did not load.
    pub errors: Vec<LoadError>,
}

impl Library {
    /// Compiles every `*.rhai` file of `dir`, in name order.
    pub fn load(dir: &Path, packages: &Packages, limits: &Limits) -> Self {
        let mut library = Library::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) => {
                library.errors.push(LoadError {
                    file: dir.display().to_string(),
                    location: "?".to_owned(),
                    message: format!("cannot read the playbooks folder: {err}"),
                });
                return library;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
            .collect();
        paths.sort();
        for path in paths {
            let source = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(err) => {
                    library
                        .errors
                        .push(meta_error(&path, format!("cannot read: {err}")));
                    continue;
                }
            };
            match compile(&path, &source, packages, limits) {
                Ok(pb) => {
                    library.playbooks.insert(pb.meta.name.clone(), pb);
                }
                Err(err) => library.errors.push(err),
            }
        }
        library
    }

    /// Names of the loaded playbooks.
    pub fn names(&self) -> Vec<String> {
        self.playbooks.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_common::config::PlaybooksConfig;
    use serde_json::json;

    fn load(name: &str, source: &str) -> Result<Playbook, LoadError> {
        let path = PathBuf::from(format!("playbooks/{name}.rhai"));
        compile(
            &path,
            source,
            &Packages::new(),
            &Limits::from(&PlaybooksConfig::default()),
        )
    }

    const GOOD: &str = r#"
fn playbook() {
    #{ name: "demo", triggers: ["event.incident"], params: #{ event_type: "string", rate: "float", n: "int" },
       defaults: #{ n: 3 }, resource: "event_type", slo_s: 30, cooldown_s: 10,
       steps: [ #{ run: "one", title: "Step one" }, "two" ], verify: "check", rollback: "undo" }
}
fn one(p) { #{ seen: p.rate } }
fn two(p) { () }
fn check(p) { true }
fn undo(p) { () }
"#;

    #[test]
    fn a_good_playbook_loads_with_its_metadata() {
        let pb = load("demo", GOOD).expect("loads");
        let m = &pb.meta;
        assert_eq!(m.triggers, vec!["event.incident"]);
        assert_eq!(m.steps.len(), 2);
        assert_eq!(m.steps[0].title, "Step one");
        assert_eq!(m.steps[1].title, "two");
        assert_eq!(m.verify.as_deref(), Some("check"));
        assert_eq!(m.resource.as_deref(), Some("event_type"));
        let n = m.params.iter().find(|p| p.name == "n").expect("n");
        assert_eq!(n.default, Some(json!(3)));
    }

    #[test]
    fn only_forwarded_keys_come_from_the_event_and_overrides_win() {
        let src = r#"fn playbook() { #{ name: "fw", triggers: ["event.incident"],
            params: #{ worker_id: "string", resume_paused: "bool", retries: "int" },
            defaults: #{ resume_paused: false, retries: 3 }, forward: ["worker_id", "retries"],
            steps: ["s"] } }
fn s(p) { () }"#;
        let meta = load("fw", src).expect("loads").meta;
        assert_eq!(meta.forward, vec!["worker_id", "retries"]);
        let event = json!({"playbook": "fw", "worker_id": "w-9", "resume_paused": true,
                           "retries": 99, "extra": 1});
        let overrides: BTreeMap<String, Value> = [("retries".to_owned(), json!(1))].into();
        let f = meta.forwarding(&event, Some(&overrides));
        assert_eq!(f.forwarded, vec!["worker_id"]);
        assert_eq!(f.ignored, vec!["extra", "resume_paused", "retries"]);
        let p = meta.bind(&Value::Object(f.given)).expect("binds");
        assert_eq!(p["worker_id"], "w-9");
        assert_eq!(p["resume_paused"], false, "not forwarded: the default");
        assert_eq!(p["retries"], 1, "the override wins over a forwarded key");
        assert!(!p.contains_key("extra"));
        let bad = src.replace("\"retries\"]", "\"nope\"]");
        let err = load("fw", &bad).expect_err("unknown forward key");
        assert!(err.message.contains("not a declared parameter"), "{err}");
    }

    #[test]
    fn parameters_are_checked_before_a_run() {
        let m = load("demo", GOOD).expect("loads").meta;
        let p = m
            .bind(&json!({"event_type": "x.y", "rate": 5, "extra": true}))
            .expect("an int is a float; extra keys stay");
        assert_eq!(p["n"], json!(3), "default filled");
        assert_eq!(m.resource_of(&p), "x.y");
        let err = m
            .bind(&json!({"event_type": 7, "rate": "fast"}))
            .expect_err("wrong types");
        assert!(
            err.0.contains("event_type must be a string, got a number"),
            "{err}"
        );
        assert!(
            err.0.contains("rate must be a float, got a string"),
            "{err}"
        );
        let err = m.bind(&json!({"rate": 1.0})).expect_err("missing");
        assert!(err.0.contains("event_type (string) is required"), "{err}");
        let err = m.bind(&json!([1])).expect_err("not an object");
        assert!(err.0.contains("an array"), "{err}");
    }

    #[test]
    fn bad_files_are_refused_with_a_position_or_a_reason() {
        let err = load(
            "demo",
            "fn playbook() { #{ name: \"demo\", steps: [\"a\"] }\nfn a(p) {",
        )
        .expect_err("parse");
        assert_ne!(err.location, "?", "{err}");
        let err = load("other", GOOD).expect_err("name");
        assert!(err.message.contains("differs from the file name"), "{err}");
        let err = load(
            "demo",
            "fn playbook() { #{ name: \"demo\", steps: [\"missing\"] } }",
        )
        .expect_err("missing step fn");
        assert!(err.message.contains("missing"), "{err}");
        let err =
            load("demo", "fn playbook() { #{ name: \"demo\", stepz: [] } }").expect_err("typo");
        assert!(
            err.message.contains("unknown metadata key \"stepz\""),
            "{err}"
        );
        let err = load(
            "demo",
            "fn playbook() { #{ name: \"demo\", params: #{ a: \"number\" }, steps: [\"s\"] } }\nfn s(p) {}",
        )
        .expect_err("bad type");
        assert!(err.message.contains("type must be one of"), "{err}");
        let err = load("demo", "import \"os\" as os;\nfn playbook() { #{ name: \"demo\", steps: [\"s\"] } }\nfn s(p) {}")
            .expect_err("import");
        assert!(err.message.contains("import is not allowed"), "{err}");
        assert_eq!(err.location, "1:1", "{err}");
        let err = load("demo", "fn other() {}").expect_err("no metadata");
        assert!(err.message.contains("fn playbook()"), "{err}");
        let err = load("demo", "fn playbook() { loop {} }").expect_err("endless metadata");
        assert!(err.message.contains("operation limit"), "{err}");
    }

    #[test]
    fn the_shipped_playbooks_all_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../playbooks");
        let lib = Library::load(
            &dir,
            &Packages::new(),
            &Limits::from(&PlaybooksConfig::default()),
        );
        assert!(lib.errors.is_empty(), "{:?}", lib.errors);
        for name in [
            "trigger_storm_mitigation",
            "event_cascade_breaker",
            "trigger_mesh_circuit_breaker",
            "scheduler_load_shedding",
            "htm_worker_recovery",
            "scheduler_recovery",
        ] {
            assert!(lib.playbooks.contains_key(name), "{name} ships");
        }
    }
}
