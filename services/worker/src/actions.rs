//! Operator-defined actions (`[actions.<intent_type>]`, docs/actions.md): the handler that makes
//! an approved intent do real work, by one HTTP request (`runner = "http"`) or one program run
//! without a shell (`runner = "exec"`), under the action's timeout and retry policy.
//!
//! What runs is fixed by the operator; the intent only fills the listed params (governance has
//! refused any other payload at intake, and the payload is checked again here). Output is
//! bounded: at most `max_output_bytes` of a response body, or of stdout and of stderr each, is
//! kept; the rest is read and counted (a process's pipes are drained to the end, a response is
//! dropped), never buffered.
//!
//! # Subjects
//! Produces: `clarity.narrative.actions` (`action_retry` before each further attempt, with the
//! failure and the delay) when the worker runs inside bulwark (the worker pool passes its
//! service connection's narrator); a worker on its own logs the same line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use bulwark_common::action::{ActionConfig, Runner};
use bulwark_common::intent::Task;
use bulwark_common::narrative::Narrator;

use crate::handlers::{Handler, HandlerError};

/// The component name of action narratives (`clarity.narrative.actions`).
pub const NARRATOR_NAME: &str = "actions";
/// Longest excerpt of an attempt's failure kept in the error (each attempt's error is kept).
const ERROR_EXCERPT: usize = 300;
/// Time given to a process's pipes to close once its group is gone.
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// Why one attempt failed.
#[derive(Debug)]
struct AttemptError {
    message: String,
    /// Whether another attempt could succeed.
    retryable: bool,
}

impl AttemptError {
    fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }
    fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// The handler of one intent type that has an operator action.
pub struct OperatorAction {
    intent_type: String,
    cfg: ActionConfig,
    narrator: Option<Narrator>,
}

impl OperatorAction {
    /// The action `cfg` (validated at start) for `intent_type`; `narrator` narrates its retries.
    pub fn new(intent_type: &str, cfg: ActionConfig, narrator: Option<Narrator>) -> Self {
        Self {
            intent_type: intent_type.to_owned(),
            cfg,
            narrator,
        }
    }

    /// Runs the action for `task` with its retries; `cancel` aborts the attempt running (the
    /// request dropped, the process group killed) and any further one.
    pub async fn run(
        &self,
        worker_id: &str,
        task: &Task,
        cancel: &CancellationToken,
    ) -> Result<Value, HandlerError> {
        if let Err(why) = self.cfg.check_payload(&task.payload) {
            return Err(HandlerError::permanent(format!(
                "action {}: {why}",
                self.intent_type
            )));
        }
        let retry = self.cfg.retry;
        let mut errors = Vec::new();
        for attempt in 1..=retry.max_attempts {
            let started = Instant::now();
            let outcome = match self.cfg.runner {
                Runner::Http => self.http(&task.payload, cancel).await,
                Runner::Exec => self.exec(&task.payload, cancel).await,
            };
            let mut failure = match outcome {
                Ok(mut result) => {
                    result["attempts"] = json!(attempt);
                    result["duration_ms"] = json!(started.elapsed().as_millis() as u64);
                    return Ok(result);
                }
                Err(err) => err,
            };
            if cancel.is_cancelled() {
                failure = AttemptError::permanent(format!("cancelled: {}", failure.message));
            }
            let message = bulwark_common::api::bounded(failure.message, ERROR_EXCERPT);
            errors.push(format!("attempt {attempt}: {message}"));
            if !failure.retryable || attempt == retry.max_attempts {
                break;
            }
            let delay = retry.delay_after(attempt);
            self.narrate_retry(worker_id, task, attempt, &message, delay)
                .await;
            tokio::select! {
                _ = cancel.cancelled() => {
                    errors.push("cancelled before the next attempt".into());
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            }
        }
        Err(HandlerError::permanent(format!(
            "action {} failed after {} attempt(s): {}",
            self.intent_type,
            errors.iter().filter(|e| e.starts_with("attempt")).count(),
            errors.join("; ")
        )))
    }

    async fn narrate_retry(
        &self,
        worker_id: &str,
        task: &Task,
        attempt: u32,
        error: &str,
        delay_ms: u64,
    ) {
        let max = self.cfg.retry.max_attempts;
        tracing::info!(worker = worker_id, task_id = %task.task_id, action = %self.intent_type,
            attempt, max, delay_ms, error, "action attempt failed; retrying");
        let Some(narrator) = &self.narrator else {
            return;
        };
        let n = narrator
            .narrative(
                "action_retry",
                "operator action retry policy: exponential backoff, capped",
            )
            .why(format!("attempt {attempt} of {max} failed: {error}"))
            .why(format!("next attempt in {delay_ms} ms"))
            .intent(&task.intent_id, &task.correlation_id)
            .context(json!({"task_id": task.task_id, "action": self.intent_type, "runner": self.cfg.runner,
                            "worker_id": worker_id, "attempt": attempt, "max_attempts": max,
                            "next_delay_ms": delay_ms, "error": error}));
        narrator.publish(n).await;
    }

    // ---- http ---------------------------------------------------------------------------------

    async fn http(
        &self,
        payload: &Value,
        cancel: &CancellationToken,
    ) -> Result<Value, AttemptError> {
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        tokio::select! {
            _ = cancel.cancelled() => Err(AttemptError::permanent("the request was aborted")),
            done = tokio::time::timeout(timeout, self.http_once(payload)) => match done {
                Ok(result) => result,
                Err(_) => Err(AttemptError::transient(format!(
                    "no complete response within timeout_ms = {}", self.cfg.timeout_ms))),
            },
        }
    }

    async fn http_once(&self, payload: &Value) -> Result<Value, AttemptError> {
        let url = self
            .cfg
            .render_url(payload)
            .map_err(AttemptError::permanent)?;
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| AttemptError::permanent(format!("url {url:?}: {e}")))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        let body = if self.cfg.method == "GET" {
            Bytes::new()
        } else {
            Bytes::from(serde_json::to_vec(payload).unwrap_or_default())
        };
        let mut request = hyper::Request::builder()
            .method(self.cfg.method.as_str())
            .uri(path)
            .header(
                hyper::header::HOST,
                uri.authority().map_or(host.as_str(), |a| a.as_str()),
            )
            .header(hyper::header::USER_AGENT, "bulwark-action/1")
            .header(hyper::header::CONNECTION, "close");
        if self.cfg.method != "GET" {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in &self.cfg.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| AttemptError::permanent(format!("request: {e}")))?;

        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| AttemptError::transient(format!("connect to {host}:{port}: {e}")))?;
        let max = self.cfg.max_output_bytes;
        let (status, kept, read, truncated) = if https {
            let tls = tls_connector().map_err(AttemptError::permanent)?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| AttemptError::permanent(format!("tls name {host:?}: {e}")))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| AttemptError::transient(format!("tls with {host}:{port}: {e}")))?;
            exchange(hyper_util::rt::TokioIo::new(stream), request, max).await?
        } else {
            exchange(hyper_util::rt::TokioIo::new(tcp), request, max).await?
        };
        let excerpt = String::from_utf8_lossy(&kept).into_owned();
        if !status.is_success() {
            let code = status.as_u16();
            let message = format!(
                "{} {url} answered {code}: {}",
                self.cfg.method,
                bulwark_common::api::excerpt(&excerpt, 120)
            );
            // A client error other than a timeout or a rate limit repeats on every attempt, and
            // so does a redirect (it is not followed).
            let retryable = !(status.is_client_error() || status.is_redirection())
                || code == 408
                || code == 429;
            return Err(AttemptError { message, retryable });
        }
        Ok(
            json!({"runner": "http", "method": self.cfg.method, "url": url, "status": status.as_u16(),
                  "body_excerpt": excerpt, "body_bytes_read": read, "truncated": truncated}),
        )
    }

    // ---- exec ---------------------------------------------------------------------------------

    async fn exec(
        &self,
        payload: &Value,
        cancel: &CancellationToken,
    ) -> Result<Value, AttemptError> {
        let argv = self.cfg.render_argv(payload);
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| AttemptError::permanent(format!("could not start {:?}: {e}", argv[0])))?;
        let pgid = child.id();
        let max = self.cfg.max_output_bytes;
        let stdout = tokio::spawn(capture(child.stdout.take(), max));
        let stderr = tokio::spawn(capture(child.stderr.take(), max));
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let ended = tokio::select! {
            status = child.wait() => Ok(status),
            _ = tokio::time::sleep(timeout) => Err(AttemptError::transient(format!(
                "{:?} still running after timeout_ms = {}: process group killed",
                argv[0], self.cfg.timeout_ms))),
            _ = cancel.cancelled() => Err(AttemptError::permanent(format!(
                "{:?} cancelled: process group killed", argv[0]))),
        };
        // The group does not outlive the action: whatever the program left behind goes too.
        kill_group(pgid);
        let _ = child.wait().await;
        let out = finish(stdout).await;
        let err = finish(stderr).await;
        let status = ended?.map_err(|e| AttemptError::transient(format!("waiting: {e}")))?;
        let code = status.code();
        let result = json!({"runner": "exec", "exit_code": code,
            "stdout": out.text(), "stderr": err.text(), "stdout_bytes": out.total, "stderr_bytes": err.total,
            "truncated": out.total > out.kept.len() as u64 || err.total > err.kept.len() as u64});
        if status.success() {
            return Ok(result);
        }
        let how = match code {
            Some(code) => format!("exited with {code}"),
            None => "was killed by a signal".to_owned(),
        };
        Err(AttemptError::transient(format!(
            "{:?} {how}; stderr {}",
            argv[0],
            bulwark_common::api::excerpt(&err.text(), 160)
        )))
    }
}

impl Handler for OperatorAction {
    fn handle<'a>(
        &'a self,
        worker_id: &'a str,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(async move {
            let never = CancellationToken::new();
            self.run(worker_id, task, &never).await
        })
    }

    fn handle_cancellable<'a>(
        &'a self,
        worker_id: &'a str,
        task: &'a Task,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(self.run(worker_id, task, cancel))
    }
}

/// Sends `request` on a fresh HTTP/1.1 connection over `io` and reads the response body,
/// keeping its first `max` bytes: the status, the kept bytes, the bytes read and whether the
/// body went on past them (then it is not read further). The connection task is aborted when
/// this ends or is dropped (a timeout or a cancel drops the request).
async fn exchange<I>(
    io: I,
    request: hyper::Request<Full<Bytes>>,
    max: usize,
) -> Result<(hyper::StatusCode, Vec<u8>, usize, bool), AttemptError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| AttemptError::transient(format!("http handshake: {e}")))?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| AttemptError::transient(format!("http request: {e}")))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut kept = Vec::with_capacity(max.min(8192));
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| AttemptError::transient(format!("reading the response: {e}")))?;
        if let Ok(data) = frame.into_data() {
            read += data.len();
            let room = max - kept.len();
            kept.extend_from_slice(&data[..data.len().min(room)]);
            if data.len() > room {
                return Ok((status, kept, read, true));
            }
        }
    }
    Ok((status, kept, read, false))
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The TLS configuration of https actions: the system's root certificates.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    use std::sync::OnceLock;
    use tokio_rustls::rustls;
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| format!("tls: {e}"))
    });
    config.clone().map(tokio_rustls::TlsConnector::from)
}

/// What was read from one pipe: the first bytes, and how many there were in all.
#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    total: u64,
}

impl Captured {
    /// The kept bytes as text (invalid UTF-8 replaced).
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}

/// Reads `pipe` to its end, keeping its first `max` bytes and counting the rest.
async fn capture<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>, max: usize) -> Captured {
    let mut captured = Captured::default();
    let Some(mut pipe) = pipe else {
        return captured;
    };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                captured.total += n as u64;
                let room = max.saturating_sub(captured.kept.len());
                captured.kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    captured
}

/// The capture of a pipe, given a moment to reach the end once the process group is gone.
async fn finish(reader: tokio::task::JoinHandle<Captured>) -> Captured {
    let abort = reader.abort_handle();
    match tokio::time::timeout(PIPE_GRACE, reader).await {
        Ok(Ok(captured)) => captured,
        _ => {
            abort.abort();
            Captured::default()
        }
    }
}

/// Kills process group `pgid` (the action's program and everything it started).
fn kill_group(pgid: Option<u32>) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        // ESRCH (the group is already gone) is the normal case after a clean exit.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}
