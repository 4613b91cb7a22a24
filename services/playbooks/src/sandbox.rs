//! The Rhai sandbox every playbook runs in (pure: no NATS here).
//!
//! An engine starts from [`Engine::new_raw`] with only the packages scripts need (arithmetic,
//! logic, strings, arrays, maps, maths, iterators and the language core for closures), every
//! limit set explicitly from `[playbooks]`, `eval` disabled, strict variables, no module
//! resolver and `set_max_modules(0)` (so `import` fails), `print`/`debug` sent to tracing.
//! Scripts have no file, process or network access: Rhai has none built in, and the only powers
//! are the host functions a run registers ([`crate::host`]).
//!
//! One engine serves every run: its `on_progress` checks the deadline and cancellation of the
//! run on the current thread ([`enter_stop`]), and the host functions act for the run on the
//! current thread ([`crate::host::Host::enter`]); the script's AST is compiled once at load.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicIteratorPackage, BasicMapPackage, BasicMathPackage,
    BasicStringPackage, LanguageCorePackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, ParseError, Position, Shared};

type SharedModule = Shared<rhai::Module>;

use bulwark_common::config::PlaybooksConfig;

/// The limits a sandbox enforces (from `[playbooks]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Rhai operations per run.
    pub max_operations: u64,
    /// Function call depth.
    pub max_call_levels: usize,
    /// Expression depth at the top level (functions get half).
    pub max_expr_depth: usize,
    /// Longest string, bytes.
    pub max_string_size: usize,
    /// Largest array.
    pub max_array_size: usize,
    /// Largest map.
    pub max_map_size: usize,
}

impl From<&PlaybooksConfig> for Limits {
    fn from(c: &PlaybooksConfig) -> Self {
        Self {
            max_operations: c.max_operations,
            max_call_levels: c.max_call_levels,
            max_expr_depth: c.max_expr_depth,
            max_string_size: c.max_string_size,
            max_array_size: c.max_array_size,
            max_map_size: c.max_map_size,
        }
    }
}

/// Variables one script may declare at once.
const MAX_VARIABLES: usize = 256;
/// Functions one script may define.
const MAX_FUNCTIONS: usize = 64;

/// Why a script stopped: a limit, a deadline, a cancellation or an error in the script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ScriptError {
    /// What went wrong, naming the limit or the missing function.
    pub message: String,
    /// A stable kind: `operations`, `call_depth`, `data_size`, `deadline`, `cancelled`,
    /// `missing_function`, `forbidden`, `variables`, `thrown`, `runtime`, `parse` (an expression
    /// nested deeper than the limit is a `parse` error: Rhai checks it when compiling).
    pub kind: &'static str,
    /// Line in the script, when known.
    pub line: Option<usize>,
    /// Column in the script, when known.
    pub column: Option<usize>,
}

impl ScriptError {
    fn at(kind: &'static str, message: String, pos: Position) -> Self {
        Self {
            message,
            kind,
            line: pos.line(),
            column: pos.position(),
        }
    }

    /// `line:column` when known, for `file:line:column` reports.
    pub fn location(&self) -> String {
        match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{l}:{c}"),
            (Some(l), None) => format!("{l}"),
            _ => "?".to_owned(),
        }
    }

    /// A parse error, with its position.
    pub fn from_parse(err: &ParseError) -> Self {
        let message = err.err_type().to_string();
        let (kind, message) = if message.contains("eval") {
            (
                "forbidden",
                format!("{message} (eval is disabled in playbooks)"),
            )
        } else {
            ("parse", message)
        };
        Self::at(kind, message, err.position())
    }

    /// Maps a Rhai evaluation error to a message naming the limit or the problem.
    pub fn from_eval(err: &EvalAltResult, limits: &Limits) -> Self {
        use EvalAltResult as E;
        match err {
            E::ErrorInFunctionCall(name, _, inner, pos) => {
                let mut e = Self::from_eval(inner, limits);
                if e.line.is_none() {
                    e.line = pos.line();
                    e.column = pos.position();
                }
                if !e.message.contains(&format!("in {name}()")) && e.kind != "thrown" {
                    e.message = format!("{} (in {name}())", e.message);
                }
                e
            }
            E::ErrorTooManyOperations(pos) => Self::at(
                "operations",
                format!(
                    "stopped: the operation limit of {} was reached (a loop that never ends?)",
                    limits.max_operations
                ),
                *pos,
            ),
            E::ErrorStackOverflow(pos) => Self::at(
                "call_depth",
                format!(
                    "stopped: the call depth limit of {} was reached (recursion too deep)",
                    limits.max_call_levels
                ),
                *pos,
            ),
            E::ErrorDataTooLarge(what, pos) => Self::at(
                "data_size",
                format!(
                    "stopped: {what} over the limit (strings {} bytes, arrays {}, maps {} entries)",
                    limits.max_string_size, limits.max_array_size, limits.max_map_size
                ),
                *pos,
            ),
            E::ErrorTooManyVariables(pos) => Self::at(
                "variables",
                format!("stopped: more than {MAX_VARIABLES} variables"),
                *pos,
            ),
            E::ErrorTooManyModules(pos) | E::ErrorModuleNotFound(_, pos) => Self::at(
                "forbidden",
                "import is not allowed in playbooks".to_owned(),
                *pos,
            ),
            E::ErrorFunctionNotFound(sig, pos) => {
                let (kind, message) = if sig.starts_with("eval") {
                    ("forbidden", "eval is disabled in playbooks".to_owned())
                } else {
                    (
                        "missing_function",
                        format!("calls a function that does not exist: {sig}"),
                    )
                };
                Self::at(kind, message, *pos)
            }
            E::ErrorTerminated(reason, pos) => {
                let reason = reason.to_string();
                let kind = if reason.starts_with("cancelled") {
                    "cancelled"
                } else {
                    "deadline"
                };
                Self::at(kind, format!("stopped: {reason}"), *pos)
            }
            E::ErrorRuntime(value, pos) => {
                Self::at("thrown", format!("the script failed: {value}"), *pos)
            }
            E::ErrorParsing(kind, pos) => Self::at("parse", kind.to_string(), *pos),
            other => Self::at("runtime", other.to_string(), other.position()),
        }
    }
}

/// The packages every playbook engine shares, built once.
#[derive(Clone)]
pub struct Packages(Vec<SharedModule>);

impl Default for Packages {
    fn default() -> Self {
        Self::new()
    }
}

impl Packages {
    /// The packages scripts may use, and nothing else.
    pub fn new() -> Self {
        Self(vec![
            LanguageCorePackage::new().as_shared_module(),
            ArithmeticPackage::new().as_shared_module(),
            LogicPackage::new().as_shared_module(),
            BasicStringPackage::new().as_shared_module(),
            MoreStringPackage::new().as_shared_module(),
            BasicArrayPackage::new().as_shared_module(),
            BasicMapPackage::new().as_shared_module(),
            BasicMathPackage::new().as_shared_module(),
            BasicIteratorPackage::new().as_shared_module(),
        ])
    }
}

/// When a run must stop: its deadline and its cancellation flag.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Past this instant the run ends with a `deadline` error.
    pub deadline: Instant,
    /// Set to cancel the run.
    pub cancelled: Arc<AtomicBool>,
}

impl Stop {
    /// Why the run must stop now, if it must.
    pub fn reason(&self) -> Option<String> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Some("cancelled (the runner is stopping)".to_owned());
        }
        (Instant::now() >= self.deadline).then(|| "the run's deadline passed".to_owned())
    }
}

thread_local! {
    /// The deadline and cancellation of the run evaluating on this thread.
    static STOP: RefCell<Option<Stop>> = const { RefCell::new(None) };
}

/// Restores the previous run's stop (usually none) when dropped.
pub struct StopGuard(Option<Stop>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        STOP.with(|s| *s.borrow_mut() = previous);
    }
}

/// Makes `stop` the deadline and cancellation of what this thread evaluates until the guard
/// is dropped.
pub fn enter_stop(stop: Stop) -> StopGuard {
    StopGuard(STOP.with(|s| s.borrow_mut().replace(stop)))
}

/// Operations between two checks of the deadline.
const CHECK_EVERY: u64 = 128;

/// A hardened engine with `limits` and the host functions; the deadline and cancellation of
/// the run on the evaluating thread ([`enter_stop`]) are checked as it goes.
pub fn engine(packages: &Packages, limits: &Limits) -> Engine {
    let mut engine = Engine::new_raw();
    for package in &packages.0 {
        engine.register_global_module(package.clone());
    }
    engine
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_expr_depths(limits.max_expr_depth, (limits.max_expr_depth / 2).max(1))
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_max_variables(MAX_VARIABLES)
        .set_max_functions(MAX_FUNCTIONS)
        .set_max_modules(0)
        .set_strict_variables(true)
        .set_fail_on_invalid_map_property(true)
        .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.disable_symbol("eval");
    engine.on_print(|text| tracing::info!(target: "playbook", "{text}"));
    engine.on_debug(|text, source, pos| {
        tracing::debug!(target: "playbook", source = source.unwrap_or(""), %pos, "{text}")
    });
    engine.on_progress(|ops| {
        if ops % CHECK_EVERY != 0 {
            return None;
        }
        STOP.with(|s| s.borrow().as_ref().and_then(Stop::reason))
            .map(Dynamic::from)
    });
    crate::host::register(&mut engine);
    engine
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits::from(&PlaybooksConfig::default())
    }

    fn run(script: &str) -> Result<Dynamic, ScriptError> {
        let limits = limits();
        let e = engine(&Packages::new(), &limits);
        let ast = e
            .compile(script)
            .map_err(|err| ScriptError::from_parse(&err))?;
        e.eval_ast::<Dynamic>(&ast)
            .map_err(|err| ScriptError::from_eval(&err, &limits))
    }

    #[test]
    fn ordinary_scripts_work() {
        let v =
            run("let m = #{a: 1}; m.b = [1, 2, 3].len(); m.a + m.b + \"x\".len()").expect("runs");
        assert_eq!(v.as_int().ok(), Some(5));
        let v = run("let f = |x| x * 2; f.call(21)").expect("closures");
        assert_eq!(v.as_int().ok(), Some(42));
    }

    #[test]
    fn each_limit_names_itself() {
        let e = run("loop {}").expect_err("endless");
        assert_eq!(e.kind, "operations", "{e}");
        assert!(e.message.contains("operation limit of 1000000"), "{e}");

        let e = run("fn f(x) { f(x + 1) } f(0)").expect_err("deep");
        assert_eq!(e.kind, "call_depth", "{e}");
        assert!(e.message.contains("call depth limit of 32"), "{e}");

        let e = run("let s = \"x\"; loop { s += s; }").expect_err("huge");
        assert_eq!(e.kind, "data_size", "{e}");

        let e = run("let a = []; loop { a.push(1); }").expect_err("huge array");
        assert_eq!(e.kind, "data_size", "{e}");

        let e = run("no_such_function(1)").expect_err("missing");
        assert_eq!(e.kind, "missing_function", "{e}");
        assert!(e.message.contains("no_such_function"), "{e}");
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn forbidden_capabilities_fail() {
        let e = run("eval(\"40 + 2\")").expect_err("eval");
        assert_eq!(e.kind, "forbidden", "{e}");
        let e = run("import \"os\" as os; 1").expect_err("import");
        assert!(
            e.kind == "forbidden" || e.message.contains("import"),
            "import refused: {e:?}"
        );
        // Rhai has no file, process or network functions; with no packages for them they do
        // not exist at all.
        for call in [
            "open_file(\"/etc/passwd\")",
            "read_file(\"/etc/passwd\")",
            "File::open(\"/etc/passwd\")",
            "system(\"ls\")",
            "connect(\"127.0.0.1:4222\")",
            "timestamp()",
        ] {
            let e = run(call).expect_err(call);
            assert!(
                matches!(e.kind, "missing_function" | "parse" | "forbidden"),
                "{call}: {e:?}"
            );
        }
    }

    #[test]
    fn a_deadline_or_a_cancellation_stops_a_run() {
        let limits = Limits {
            max_operations: u64::MAX,
            ..limits()
        };
        let stop = Stop {
            deadline: Instant::now() + Duration::from_millis(50),
            cancelled: Arc::default(),
        };
        let e = engine(&Packages::new(), &limits);
        let guard = enter_stop(stop);
        let err = e.run("loop {}").expect_err("deadline");
        drop(guard);
        let err = ScriptError::from_eval(&err, &limits);
        assert_eq!(err.kind, "deadline", "{err}");

        let cancelled = Arc::new(AtomicBool::new(true));
        let stop = Stop {
            deadline: Instant::now() + Duration::from_secs(60),
            cancelled,
        };
        let _guard = enter_stop(stop);
        let err = e.run("loop {}").expect_err("cancelled");
        assert_eq!(ScriptError::from_eval(&err, &limits).kind, "cancelled");
    }
}
