//! Task handlers, chosen by `intent_type`. The built-in handler does documented simulated work,
//! so load and chaos tests can drive workers:
//!
//! | payload key | effect |
//! |---|---|
//! | `work_ms` | sleeps this long (0 by default; at most `worker.max_work_ms`) |
//! | `fail` | `true` or a message: the attempt fails and may be retried |
//! | `fail_permanently` | `true` or a message: fails, and no other attempt is made |
//! | `echo` | copied into the result |
//!
//! A task whose `intent_type` has no handler fails at once, not retried, with the reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use bulwark_common::intent::Task;

/// Why a handler failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// What went wrong.
    pub message: String,
    /// Whether another attempt could succeed.
    pub retryable: bool,
}

impl HandlerError {
    /// A failure another attempt might not repeat.
    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            retryable: true,
        }
    }
    /// A failure every attempt would repeat.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            retryable: false,
        }
    }
}

/// Runs tasks of some intent types.
pub trait Handler: Send + Sync {
    /// Runs `task` on `worker_id`; the result becomes the intent's `result`.
    fn handle<'a>(
        &'a self,
        worker_id: &'a str,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Value, HandlerError>>;

    /// Runs `task` until `cancel` fires (its intent was cancelled). By default the work is
    /// dropped at its next await point; a handler with something to clean up (a process group)
    /// overrides this.
    fn handle_cancellable<'a>(
        &'a self,
        worker_id: &'a str,
        task: &'a Task,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(async move {
            tokio::select! {
                _ = cancel.cancelled() => Err(HandlerError::permanent("cancelled")),
                done = self.handle(worker_id, task) => done,
            }
        })
    }
}

/// The handlers of a worker, by intent type.
#[derive(Clone, Default)]
pub struct Handlers {
    by_type: HashMap<String, Arc<dyn Handler>>,
}

impl Handlers {
    /// The simulated-work handler for each of the seed's 14 intent types.
    pub fn builtin(max_work_ms: u64) -> Self {
        let simulated: Arc<dyn Handler> = Arc::new(SimulatedWork { max_work_ms });
        let mut handlers = Handlers::default();
        for kind in [
            "query_knowledge",
            "generate_summary",
            "schedule_task",
            "execute_sandbox",
            "deploy_model",
            "modify_config",
            "self_improve",
            "extend_grace",
            "optimize_system",
            "modify_governance",
            "change_charter",
            "grant_permissions",
            "emergency_recovery",
            "critical_incident",
        ] {
            handlers.by_type.insert(kind.to_owned(), simulated.clone());
        }
        handlers
    }

    /// The built-in handlers, then one [`OperatorAction`](crate::actions::OperatorAction) per
    /// `[actions.<intent_type>]` of `cfg` (replacing the built-in handler of that type).
    /// `narrator` narrates the actions' retries (the worker pool passes its own; a worker
    /// running alone has none and logs them).
    pub fn for_config(
        cfg: &bulwark_common::BulwarkConfig,
        narrator: Option<bulwark_common::Narrator>,
    ) -> Self {
        let mut handlers = Self::builtin(cfg.worker.max_work_ms);
        for (intent_type, action) in &cfg.actions {
            let handler =
                crate::actions::OperatorAction::new(intent_type, action.clone(), narrator.clone());
            handlers = handlers.with(intent_type, Arc::new(handler));
        }
        handlers
    }

    /// Adds (or replaces) the handler of `intent_type`.
    pub fn with(mut self, intent_type: &str, handler: Arc<dyn Handler>) -> Self {
        self.by_type.insert(intent_type.to_owned(), handler);
        self
    }

    /// Runs `task` with its handler, or fails permanently when there is none.
    pub async fn run(&self, worker_id: &str, task: &Task) -> Result<Value, HandlerError> {
        self.run_cancellable(worker_id, task, &CancellationToken::new())
            .await
    }

    /// Runs `task` with its handler until `cancel` fires, or fails permanently when there is
    /// none.
    pub async fn run_cancellable(
        &self,
        worker_id: &str,
        task: &Task,
        cancel: &CancellationToken,
    ) -> Result<Value, HandlerError> {
        match self.by_type.get(&task.intent_type) {
            Some(handler) => handler.handle_cancellable(worker_id, task, cancel).await,
            None => Err(HandlerError::permanent(format!(
                "no handler for intent_type {:?} on {worker_id}",
                task.intent_type
            ))),
        }
    }
}

/// The built-in handler: sleeps, fails or echoes as the payload says.
pub struct SimulatedWork {
    /// Longest sleep allowed.
    pub max_work_ms: u64,
}

impl SimulatedWork {
    fn plan(&self, payload: &Value) -> Result<u64, HandlerError> {
        let work_ms = match payload.get("work_ms") {
            None | Some(Value::Null) => 0,
            Some(v) => match v.as_u64() {
                Some(ms) if ms <= self.max_work_ms => ms,
                _ => {
                    return Err(HandlerError::permanent(format!(
                        "payload.work_ms must be an integer from 0 to {}, got {v}",
                        self.max_work_ms
                    )));
                }
            },
        };
        if let Some(message) = flag(payload, "fail_permanently") {
            return Err(HandlerError::permanent(message));
        }
        if let Some(message) = flag(payload, "fail") {
            return Err(HandlerError::transient(message));
        }
        Ok(work_ms)
    }
}

/// `Some(message)` when `payload[key]` is `true` or a string.
fn flag(payload: &Value, key: &str) -> Option<String> {
    match payload.get(key) {
        Some(Value::Bool(true)) => Some(format!("simulated failure (payload.{key})")),
        Some(Value::String(m)) => Some(m.clone()),
        _ => None,
    }
}

impl Handler for SimulatedWork {
    fn handle<'a>(
        &'a self,
        worker_id: &'a str,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(async move {
            let work_ms = self.plan(&task.payload)?;
            if work_ms > 0 {
                tokio::time::sleep(Duration::from_millis(work_ms)).await;
            }
            let mut result = json!({"handled_by": worker_id, "intent_type": task.intent_type, "work_ms": work_ms});
            if let Some(echo) = task.payload.get("echo") {
                result["echo"] = echo.clone();
            }
            Ok(result)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(kind: &str, payload: Value) -> Task {
        Task {
            task_id: "t".into(),
            intent_id: "t".into(),
            intent_type: kind.into(),
            actor: "a".into(),
            payload,
            priority: 5,
            autonomy_tier: 2,
            correlation_id: "t".into(),
            queued_at: String::new(),
        }
    }

    #[tokio::test]
    async fn simulated_work_follows_the_payload() {
        let h = Handlers::builtin(1_000);
        let ok = h
            .run(
                "w",
                &task("query_knowledge", json!({"echo": 7, "work_ms": 1})),
            )
            .await
            .expect("ok");
        assert_eq!(
            (ok["echo"].as_i64(), ok["handled_by"].as_str()),
            (Some(7), Some("w"))
        );
        let e = h
            .run("w", &task("query_knowledge", json!({"fail": true})))
            .await
            .expect_err("fails");
        assert!(e.retryable);
        let e = h
            .run(
                "w",
                &task("query_knowledge", json!({"fail_permanently": "broken"})),
            )
            .await
            .expect_err("fails");
        assert_eq!((e.retryable, e.message.as_str()), (false, "broken"));
        let e = h
            .run("w", &task("query_knowledge", json!({"work_ms": 5_000})))
            .await
            .expect_err("too long");
        assert!(!e.retryable && e.message.contains("from 0 to 1000"), "{e}");
        let e = h
            .run("w", &task("launch_rocket", json!({})))
            .await
            .expect_err("unknown");
        assert!(
            !e.retryable
                && e.message
                    .contains("no handler for intent_type \"launch_rocket\""),
            "{e}"
        );
    }
}
