//! Operator-defined actions: what an approved intent of a given type really does
//! (`[actions.<intent_type>]` in `bulwark.toml`, docs/actions.md).
//!
//! An operator fixes everything that runs (the HTTP method and URL, or the program and its
//! arguments); an intent may only fill the parameters the action lists. This module is the pure
//! part, shared by governance (which refuses a payload the action does not allow, at intake) and
//! the workers (which run the action): the configuration, its validation at start, the
//! parameter check, and the rendering of a URL or an argument vector from a payload. No I/O.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The 400 code of a payload an action does not allow (an unlisted key, a value that would
/// change a URL's host or path, a flag where none is allowed, a value that is not a scalar).
pub const PARAM_NOT_ALLOWED: &str = "param_not_allowed";

/// Longest value of one parameter, in bytes (the whole payload is bounded by
/// `governance.max_intent_bytes` as well).
pub const MAX_PARAM_BYTES: usize = 8 * 1024;

/// How an action runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    /// One HTTP request to a fixed URL, the params as a JSON body.
    Http,
    /// One program, without a shell, each templated argument exactly one argument.
    Exec,
}

/// One operator-defined action, `[actions.<intent_type>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// `http` or `exec`.
    pub runner: Runner,
    /// `http`: the method, `GET`, `POST`, `PUT`, `PATCH` or `DELETE` (default `POST`).
    #[serde(default = "default_method")]
    pub method: String,
    /// `http`: the URL, `http://` or `https://`. `{param}` may appear in the path or query only
    /// (never in the scheme, host or port); its value is percent-encoded.
    #[serde(default)]
    pub url: String,
    /// `http`: headers sent with every request (e.g. an authorisation token), fixed by the
    /// operator.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `exec`: the program and its arguments, no shell. The program (first element) is fixed;
    /// any other element may hold `{param}` placeholders and stays exactly one argument.
    #[serde(default)]
    pub command: Vec<String>,
    /// The payload keys an intent may set; any other key is refused at intake (400
    /// `param_not_allowed`). A param named in the URL or command must be present.
    #[serde(default)]
    pub params: Vec<String>,
    /// `exec`: params whose value may start with `-` (a command-line flag). Any other param's
    /// value starting with `-` is refused at intake when it begins an argument.
    #[serde(default)]
    pub flag_params: Vec<String>,
    /// Longest time one attempt may take, in milliseconds; then the request is dropped or the
    /// process group killed, and the attempt fails.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How many attempts and how long between them.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The most bytes of a response body, or of stdout and of stderr each, kept in the result;
    /// the rest is read and counted, never buffered.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
}

/// Attempts of one action: attempt *n* + 1 starts `min(backoff_ms × 2^(n-1), max_backoff_ms)`
/// after attempt *n* failed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, at least 1 (1: no retry).
    pub max_attempts: u32,
    /// Delay before the second attempt, in milliseconds; doubled before each further one.
    pub backoff_ms: u64,
    /// Longest delay between two attempts, in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff_ms: 200,
            max_backoff_ms: 5_000,
        }
    }
}

impl RetryConfig {
    /// The delay after failed attempt `attempt` (1-based) before the next one.
    pub fn delay_after(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(32);
        self.backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms)
    }
}

fn default_method() -> String {
    "POST".into()
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_output_bytes() -> usize {
    16 * 1024
}

/// Longest allowed `timeout_ms` (one hour).
const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Most attempts allowed.
const MAX_ATTEMPTS: u32 = 20;
/// Largest allowed `max_output_bytes` (a result, stdout and stderr both, is stored in the
/// intent record, itself at most `nats.storage.max_record_bytes`).
const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The parts of a URL an operator fixes: `scheme://authority`, then the templated rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// Path and query (starting with `/`, or empty), with `{param}` placeholders.
    pub rest: String,
}

/// Splits an action's URL; `Err` says what is wrong.
pub fn split_url(url: &str) -> Result<UrlParts, String> {
    let (scheme, after) = url
        .split_once("://")
        .ok_or_else(|| format!("url {url:?} has no scheme (http:// or https://)"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("url scheme must be http or https, got {scheme:?}"));
    }
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(end);
    if authority.is_empty() {
        return Err(format!("url {url:?} has no host"));
    }
    if authority.contains(['{', '}', '@']) || authority.chars().any(char::is_whitespace) {
        return Err(format!(
            "url {url:?}: the host and port are fixed (no {{param}}, no user info)"
        ));
    }
    if rest.contains('#') {
        return Err(format!("url {url:?}: no fragment"));
    }
    Ok(UrlParts {
        scheme: scheme.to_owned(),
        authority: authority.to_owned(),
        rest: rest.to_owned(),
    })
}

/// The `{name}` placeholders of a template, in order; `Err` for an unbalanced brace.
pub fn placeholders(template: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(format!("{template:?}: '}}' without '{{'"));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{template:?}: '{{' without '}}'"))?;
        let name = &after[..close];
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("{template:?}: bad placeholder {{{name}}}"));
        }
        names.push(name.to_owned());
        rest = &after[close + 1..];
    }
    Ok(names)
}

/// Replaces each `{name}` of `template` with `value(name)`.
fn fill(template: &str, mut value: impl FnMut(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                out.push_str(&value(&after[..close]));
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

impl ActionConfig {
    /// Checks the action `[actions.<key>]`; the message names the key.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        let at = format!("actions.{key}");
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "{at}: the key is an intent_type (letters, digits, '_' and '-')"
            ));
        }
        let mut seen = BTreeSet::new();
        for p in &self.params {
            if p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!(
                    "{at}.params: {p:?} is not a name (letters, digits, '_' and '-')"
                ));
            }
            if !seen.insert(p.as_str()) {
                return Err(format!("{at}.params: {p:?} is listed twice"));
            }
        }
        for p in &self.flag_params {
            if !seen.contains(p.as_str()) {
                return Err(format!(
                    "{at}.flag_params: {p:?} is not one of params {:?}",
                    self.params
                ));
            }
        }
        let unlisted = |field: &str, template: &str| -> Result<(), String> {
            for name in placeholders(template).map_err(|e| format!("{at}.{field}: {e}"))? {
                if !seen.contains(name.as_str()) {
                    return Err(format!(
                        "{at}.{field}: {{{name}}} is not one of params {:?}",
                        self.params
                    ));
                }
            }
            Ok(())
        };
        match self.runner {
            Runner::Http => {
                if self.url.is_empty() {
                    return Err(format!("{at}: runner \"http\" needs a url"));
                }
                if !self.command.is_empty() || !self.flag_params.is_empty() {
                    return Err(format!(
                        "{at}: command and flag_params belong to runner \"exec\""
                    ));
                }
                if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&self.method.as_str()) {
                    return Err(format!(
                        "{at}.method must be GET, POST, PUT, PATCH or DELETE, got {:?}",
                        self.method
                    ));
                }
                let parts = split_url(&self.url).map_err(|e| format!("{at}.url: {e}"))?;
                unlisted("url", &parts.rest)?;
                for (name, value) in &self.headers {
                    let bad = |s: &str| s.bytes().any(|b| b.is_ascii_control());
                    if name.is_empty() || bad(name) || bad(value) || name.contains(':') {
                        return Err(format!("{at}.headers.{name}: not a valid header"));
                    }
                }
            }
            Runner::Exec => {
                let Some(program) = self.command.first() else {
                    return Err(format!(
                        "{at}: runner \"exec\" needs a command (an array: program, then arguments)"
                    ));
                };
                if !self.url.is_empty() || !self.headers.is_empty() {
                    return Err(format!("{at}: url and headers belong to runner \"http\""));
                }
                if program.is_empty() || program.contains(['{', '}']) {
                    return Err(format!(
                        "{at}.command: the program {program:?} is fixed (no {{param}})"
                    ));
                }
                for arg in &self.command[1..] {
                    if arg.contains('\0') {
                        return Err(format!("{at}.command: an argument holds a NUL byte"));
                    }
                    unlisted("command", arg)?;
                }
            }
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "{at}.timeout_ms must be 1-{MAX_TIMEOUT_MS}, got {}",
                self.timeout_ms
            ));
        }
        let r = &self.retry;
        if r.max_attempts == 0 || r.max_attempts > MAX_ATTEMPTS {
            return Err(format!(
                "{at}.retry.max_attempts must be 1-{MAX_ATTEMPTS}, got {}",
                r.max_attempts
            ));
        }
        if r.max_backoff_ms < r.backoff_ms || r.max_backoff_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "{at}.retry: max_backoff_ms ({}) must be at least backoff_ms ({}) and at most {MAX_TIMEOUT_MS}",
                r.max_backoff_ms, r.backoff_ms
            ));
        }
        if self.max_output_bytes == 0 || self.max_output_bytes > MAX_OUTPUT_BYTES {
            return Err(format!(
                "{at}.max_output_bytes must be 1-{MAX_OUTPUT_BYTES}, got {}",
                self.max_output_bytes
            ));
        }
        Ok(())
    }

    /// The params named in the URL (http) or in an argument (exec).
    fn templated(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        match self.runner {
            Runner::Http => {
                if let Ok(parts) = split_url(&self.url) {
                    names.extend(placeholders(&parts.rest).unwrap_or_default());
                }
            }
            Runner::Exec => {
                for arg in self.command.iter().skip(1) {
                    names.extend(placeholders(arg).unwrap_or_default());
                }
            }
        }
        names
    }

    /// Params whose value begins an argument (`{name}` at the start of one).
    fn leading(&self) -> BTreeSet<String> {
        self.command
            .iter()
            .skip(1)
            .filter(|arg| arg.starts_with('{'))
            .filter_map(|arg| placeholders(arg).ok()?.into_iter().next())
            .collect()
    }

    /// Whether `payload` is one this action allows; `Err` names the first problem (the
    /// message of a 400 `param_not_allowed`).
    pub fn check_payload(&self, payload: &Value) -> Result<(), String> {
        let empty = Map::new();
        let object = match payload {
            Value::Object(map) => map,
            Value::Null => &empty,
            other => {
                return Err(format!(
                    "payload must be an object of the action's params {:?}, got {}",
                    self.params,
                    crate::api::json_kind(other)
                ));
            }
        };
        for key in object.keys() {
            if !self.params.iter().any(|p| p == key) {
                return Err(format!(
                    "payload.{key} is not a param of this action (allowed: {:?})",
                    self.params
                ));
            }
        }
        let templated = self.templated();
        let leading = self.leading();
        for name in &templated {
            let Some(value) = object.get(name) else {
                return Err(format!(
                    "payload.{name} is required: the action's {} uses it",
                    if self.runner == Runner::Http {
                        "url"
                    } else {
                        "command"
                    }
                ));
            };
            let text = scalar_text(value).ok_or_else(|| {
                format!(
                    "payload.{name} must be a string, number or boolean, got {}",
                    crate::api::json_kind(value)
                )
            })?;
            if text.len() > MAX_PARAM_BYTES {
                return Err(format!(
                    "payload.{name} is longer than {MAX_PARAM_BYTES} bytes"
                ));
            }
            match self.runner {
                Runner::Http => {
                    if text.is_empty()
                        || text == "."
                        || text == ".."
                        || text.contains(['/', '\\', '?', '#', '@', ':', '%'])
                        || text.chars().any(char::is_control)
                    {
                        return Err(format!(
                            "payload.{name} {text:?} would change the url beyond its value \
                             (no '/', '\\\\', '?', '#', '@', ':', '%', control characters, '.' or '..')"
                        ));
                    }
                }
                Runner::Exec => {
                    if text.contains('\0') {
                        return Err(format!("payload.{name} holds a NUL byte"));
                    }
                    if text.starts_with('-')
                        && leading.contains(name)
                        && !self.flag_params.iter().any(|p| p == name)
                    {
                        return Err(format!(
                            "payload.{name} {text:?} starts with '-': a command-line flag is not allowed here"
                        ));
                    }
                }
            }
        }
        // What runs is the rendered argument: one that would begin with '-' only because of its
        // values (say `{a}{b}` with `a` empty and `b` "-rf") is a flag, whichever param put it
        // there, unless every param in it may be one.
        if self.runner == Runner::Exec {
            for (template, arg) in self.command.iter().zip(self.render_argv(payload)).skip(1) {
                let names = placeholders(template).unwrap_or_default();
                if !template.starts_with('-')
                    && arg.starts_with('-')
                    && !names.iter().all(|n| self.flag_params.contains(n))
                {
                    return Err(format!(
                        "argument {template:?} would start with '-' ({arg:?}): a command-line flag is not allowed here"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The URL of an `http` action for `payload` (checked with [`check_payload`]): the fixed
    /// scheme and authority, the path and query with each value percent-encoded.
    ///
    /// [`check_payload`]: Self::check_payload
    pub fn render_url(&self, payload: &Value) -> Result<String, String> {
        let parts = split_url(&self.url)?;
        let rest = fill(&parts.rest, |name| {
            payload
                .get(name)
                .and_then(scalar_text)
                .map(|t| percent_encode(&t))
                .unwrap_or_default()
        });
        Ok(format!("{}://{}{}", parts.scheme, parts.authority, rest))
    }

    /// The argument vector of an `exec` action for `payload` (checked with
    /// [`check_payload`]): one element per element of `command`.
    ///
    /// [`check_payload`]: Self::check_payload
    pub fn render_argv(&self, payload: &Value) -> Vec<String> {
        self.command
            .iter()
            .enumerate()
            .map(|(i, arg)| {
                if i == 0 {
                    arg.clone()
                } else {
                    fill(arg, |name| {
                        payload.get(name).and_then(scalar_text).unwrap_or_default()
                    })
                }
            })
            .collect()
    }
}

/// The text of a string, number or boolean; `None` for anything else.
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Percent-encodes every byte outside the unreserved set (`A-Z a-z 0-9 - . _ ~`).
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Validates every action of `[actions]`.
pub fn validate_all(actions: &BTreeMap<String, ActionConfig>) -> Result<(), String> {
    for (key, action) in actions {
        action.validate(key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn http(url: &str, params: &[&str]) -> ActionConfig {
        ActionConfig {
            runner: Runner::Http,
            method: "POST".into(),
            url: url.into(),
            headers: BTreeMap::new(),
            command: Vec::new(),
            params: params.iter().map(|s| (*s).to_owned()).collect(),
            flag_params: Vec::new(),
            timeout_ms: 1000,
            retry: RetryConfig::default(),
            max_output_bytes: 1024,
        }
    }

    fn exec(command: &[&str], params: &[&str]) -> ActionConfig {
        ActionConfig {
            runner: Runner::Exec,
            url: String::new(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            ..http("", params)
        }
    }

    #[test]
    fn validation_names_the_key() {
        let err = |a: ActionConfig| a.validate("k").expect_err("invalid");
        assert!(err(http("", &[])).contains("actions.k: runner \"http\" needs a url"));
        assert!(err(exec(&[], &[])).contains("actions.k: runner \"exec\" needs a command"));
        assert!(err(http("ftp://h/x", &[])).contains("actions.k.url"));
        assert!(err(http("http://{host}/x", &["host"])).contains("host and port are fixed"));
        assert!(err(http("http://h/{who}", &["m"])).contains("{who} is not one of params"));
        assert!(err(exec(&["/bin/echo", "{who}"], &["m"])).contains("actions.k.command"));
        assert!(err(exec(&["{prog}"], &["prog"])).contains("is fixed"));
        let mut a = http("http://h/x", &[]);
        a.retry.max_attempts = 0;
        assert!(err(a).contains("actions.k.retry.max_attempts"));
        let mut a = http("http://h/x", &[]);
        a.method = "TRACE".into();
        assert!(err(a).contains("actions.k.method"));
        assert!(
            http("http://h:9/x/{id}?q={m}", &["id", "m"])
                .validate("k")
                .is_ok()
        );
        assert!(
            exec(&["/bin/echo", "--x={m}"], &["m"])
                .validate("k")
                .is_ok()
        );
        let unknown: Result<ActionConfig, _> =
            serde_json::from_value(json!({"runner": "ssh", "url": "x"}));
        assert!(unknown.is_err());
    }

    #[test]
    fn payload_checks() {
        let a = http("http://h/hook/{id}", &["id", "message"]);
        assert!(
            a.check_payload(&json!({"id": "a1", "message": "x/y@z"}))
                .is_ok()
        );
        let e = a
            .check_payload(&json!({"id": "a", "url": "http://evil"}))
            .expect_err("unlisted");
        assert!(e.contains("payload.url is not a param"), "{e}");
        for bad in ["evil.com/x", "..", "a@b", "x:1", "%2F", "a?b", ""] {
            assert!(a.check_payload(&json!({ "id": bad })).is_err(), "{bad}");
        }
        assert!(
            a.check_payload(&json!({"message": "m"})).is_err(),
            "id required"
        );
        assert!(a.check_payload(&json!({"id": {"x": 1}})).is_err());
        let e = exec(&["/bin/ls", "{path}"], &["path"]);
        assert!(e.check_payload(&json!({"path": "-rf"})).is_err());
        assert!(e.check_payload(&json!({"path": "a -b; rm"})).is_ok());
        let mut f = e.clone();
        f.flag_params = vec!["path".into()];
        assert!(f.check_payload(&json!({"path": "-l"})).is_ok());
        let h = exec(&["/bin/ls", "{a}{b}"], &["a", "b"]);
        assert!(
            h.check_payload(&json!({"a": "", "b": "-rf"})).is_err(),
            "a flag made of two values is still a flag"
        );
        assert!(h.check_payload(&json!({"a": "x", "b": "-rf"})).is_ok());
        let g = exec(&["/bin/ls", "--dir={path}"], &["path"]);
        assert!(
            g.check_payload(&json!({"path": "-x"})).is_ok(),
            "not leading"
        );
    }

    #[test]
    fn rendering_keeps_host_and_arguments() {
        let a = http("https://h:8443/a/{id}?m={m}", &["id", "m"]);
        let url = a
            .render_url(&json!({"id": "x y", "m": "a&b=c"}))
            .expect("url");
        assert_eq!(url, "https://h:8443/a/x%20y?m=a%26b%3Dc");
        let e = exec(&["/bin/echo", "{a}", "k={b}"], &["a", "b"]);
        assert_eq!(
            e.render_argv(&json!({"a": "x; rm -rf /", "b": 3})),
            vec!["/bin/echo", "x; rm -rf /", "k=3"]
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let r = RetryConfig {
            max_attempts: 5,
            backoff_ms: 100,
            max_backoff_ms: 350,
        };
        assert_eq!(
            (1..=4).map(|n| r.delay_after(n)).collect::<Vec<_>>(),
            vec![100, 200, 350, 350]
        );
    }

    #[test]
    fn loads_from_toml_and_refuses_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("bulwark-act-{}", crate::ids::new_id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("b.toml");
        let good = "[actions.notify_webhook]\nrunner = \"http\"\nurl = \"http://127.0.0.1:9/hook\"\nparams = [\"message\", \"severity\"]\nretry = { max_attempts = 3, backoff_ms = 200, max_backoff_ms = 5000 }\n\n[actions.rotate_logs]\nrunner = \"exec\"\ncommand = [\"/usr/sbin/logrotate\", \"--force\", \"{config}\"]\nparams = [\"config\"]\ntimeout_ms = 30000\n";
        std::fs::write(&file, good).expect("write");
        let cfg = crate::BulwarkConfig::load_from(Some(&file), Default::default()).expect("loads");
        assert_eq!(cfg.actions["notify_webhook"].retry.max_attempts, 3);
        assert_eq!(cfg.actions["notify_webhook"].method, "POST");
        assert_eq!(cfg.actions["rotate_logs"].command.len(), 3);
        std::fs::write(
            &file,
            "[actions.x]\nrunner = \"exec\"\ncommand = [\"/bin/true\", \"{nope}\"]\n",
        )
        .expect("write");
        let err =
            crate::BulwarkConfig::load_from(Some(&file), Default::default()).expect_err("unlisted");
        assert!(err.to_string().contains("actions.x.command"), "{err}");
        std::fs::write(&file, "[actions.x]\nrunner = \"shell\"\n").expect("write");
        let err = crate::BulwarkConfig::load_from(Some(&file), Default::default())
            .expect_err("unknown runner");
        assert!(err.to_string().contains("shell"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
