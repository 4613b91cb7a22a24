//! The web console for the people in the loop (docs/console.md).
//!
//! A person signs in with their NATS user and password; the console opens a NATS connection as
//! them ([`person`]) and makes every request of every page through it, so `nats.conf`
//! permissions and governance's bound identities decide what they may see and do. There is no
//! second user database. Sessions live in memory, bounded ([`session`]); pages are rendered on
//! the server with compile-checked, escaping templates ([`views`]); live parts are server-sent
//! events fed from the person's NATS requests and subscriptions ([`web`]).
//!
//! # Layout
//! - [`person`]: a person's NATS connection; refusals with the reason NATS or the service gave.
//! - [`session`]: the bounded in-memory sessions, their CSRF tokens and idle expiry.
//! - [`views`]: templates and the shaping of bulwark's replies into them.
//! - [`web`]: routes, sign-in, CSRF checks, security headers, live regions.
//! - [`notify`]: the `notify` service: webhooks for the events people must hear about.
//! - [`webhook`]: one signed webhook POST over HTTP or HTTPS.

pub mod notify;
pub mod person;
pub mod session;
pub mod views;
pub mod web;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulwark_common::BulwarkConfig;
use tokio_util::sync::CancellationToken;

/// Why the console could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// `console.listen` could not be bound.
    #[error("the console cannot listen on {addr} (console.listen): {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("the console stopped serving: {0}")]
    Serve(std::io::Error),
}

/// A console bound to its address, not yet serving.
pub struct Console {
    listener: tokio::net::TcpListener,
    cfg: BulwarkConfig,
}

impl Console {
    /// Binds `cfg.console.listen` (port 0 picks a free port: see [`Console::local_addr`]).
    pub async fn bind(cfg: BulwarkConfig) -> Result<Self, ConsoleError> {
        let addr = cfg.console.listen.clone();
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ConsoleError::Bind { addr, source })?;
        Ok(Self { listener, cfg })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown`; then ends every session (closing their NATS connections).
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ConsoleError> {
        let idle = Duration::from_secs_f64(self.cfg.console.session_idle_s);
        let state = Arc::new(web::Shared {
            sessions: session::Sessions::new(self.cfg.console.max_sessions, idle),
            cfg: self.cfg,
            shutdown: shutdown.clone(),
            sign_ins: tokio::sync::Semaphore::new(web::MAX_SIGN_INS),
        });
        let sweeper = {
            let state = state.clone();
            let token = shutdown.clone();
            let every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(every) => {
                            let ended = state.sessions.sweep();
                            if ended > 0 {
                                tracing::info!(ended, "console: idle sessions ended");
                            }
                        }
                    }
                }
            })
        };
        let app = web::router(state.clone());
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await;
        shutdown.cancel();
        let _ = sweeper.await;
        state.sessions.end_all();
        served.map_err(ConsoleError::Serve)
    }
}

/// Runs the console of `cfg` until `shutdown`; does nothing when `console.listen` is empty.
pub async fn run(cfg: BulwarkConfig, shutdown: CancellationToken) -> Result<(), ConsoleError> {
    if cfg.console.listen.is_empty() {
        return Ok(());
    }
    Console::bind(cfg).await?.serve(shutdown).await
}
