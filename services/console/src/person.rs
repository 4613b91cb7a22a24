//! A signed-in person's own NATS connection: every request the console makes for them goes
//! through it, so `nats.conf` (their permissions, their account's imports) and governance's
//! bound identities decide what they may do. A refusal comes back with the reason NATS or the
//! service gave.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use bulwark_common::config::NatsConfig;
use bulwark_common::connect;
use serde_json::Value;

/// Why a sign-in failed.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The server refused the user or password.
    #[error("the NATS server refused user {0:?}: wrong user name or password")]
    Refused(String),
    /// The server did not answer.
    #[error("the NATS server at {url} cannot be reached: {reason}")]
    Unreachable {
        /// Where.
        url: String,
        /// What the client said.
        reason: String,
    },
}

/// Why a request was not answered with a success.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// The NATS server refused the publish (nats.conf permissions).
    #[error("the NATS server refused {subject} for {user}: {reason}")]
    Permission {
        /// The subject.
        subject: String,
        /// Who asked.
        user: String,
        /// The server's words.
        reason: String,
    },
    /// The service answered with an error reply (`{"error": {code, message}}`).
    #[error("{code}: {message}")]
    Service {
        /// The error code (docs/subjects.md).
        code: String,
        /// What the service said.
        message: String,
    },
    /// Nothing answered.
    #[error("no answer on {subject}: {reason}")]
    NoAnswer {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
}

/// The server's asynchronous errors on one connection (the newest 16).
#[derive(Debug, Default)]
struct Violations {
    list: Mutex<Vec<String>>,
    arrived: tokio::sync::Notify,
}

/// One person's NATS connection.
#[derive(Debug, Clone)]
pub struct Person {
    /// The NATS user name they signed in as.
    pub user: String,
    /// Their connection.
    pub client: async_nats::Client,
    /// The last errors the server reported on this connection (asynchronously), and a signal
    /// when one arrives, so a refused request ends at once instead of at its timeout.
    violations: Arc<Violations>,
    timeout: Duration,
}

impl Person {
    /// Connects to `cfg.url` as `user` with `password` and the inbox prefix `nats.conf` grants
    /// them (`_INBOX_<user>`). TLS settings are `cfg`'s.
    pub async fn sign_in(
        cfg: &NatsConfig,
        user: &str,
        password: &str,
    ) -> Result<Self, SignInError> {
        let violations: Arc<Violations> = Arc::default();
        let seen = violations.clone();
        let url = connect::redact_url(&cfg.url);
        let addrs = connect::parse_urls(&cfg.url).map_err(|e| SignInError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        // Only the server's address is taken from the URL: credentials in it are not this
        // person's.
        let addrs: Vec<async_nats::ServerAddr> = addrs
            .into_iter()
            .map(|a| {
                let mut u = a.into_inner();
                let _ = u.set_username("");
                let _ = u.set_password(None);
                async_nats::ServerAddr::from_url(u)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| SignInError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let mut options =
            ConnectOptions::with_user_and_password(user.to_owned(), password.to_owned())
                .name(format!("bulwark-console/{user}"))
                .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
                .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)))
                .custom_inbox_prefix(connect::inbox_prefix(connect::Role::Cli, user))
                .max_reconnects(Some(10))
                // A live page that falls behind loses messages (counted by the server as a slow
                // consumer) rather than holding an unbounded backlog.
                .subscription_capacity(4096)
                .event_callback(move |event| {
                    let seen = seen.clone();
                    async move {
                        if let Event::ServerError(err) = event {
                            let text = err.to_string();
                            if let Ok(mut list) = seen.list.lock() {
                                if list.len() >= 16 {
                                    list.remove(0);
                                }
                                list.push(text);
                            }
                            seen.arrived.notify_waiters();
                        }
                    }
                });
        if !cfg.tls_ca.is_empty() {
            options = options.add_root_certificates(cfg.tls_ca.clone().into());
        }
        if !cfg.tls_cert.is_empty() {
            options = options
                .add_client_certificate(cfg.tls_cert.clone().into(), cfg.tls_key.clone().into());
        }
        if cfg.tls_required || !cfg.tls_ca.is_empty() {
            options = options.require_tls(true);
        }
        let attempt = options.connect(addrs);
        let client = match tokio::time::timeout(
            Duration::from_millis(cfg.connect_timeout_ms),
            attempt,
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                return Err(match err.kind() {
                    async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication => {
                        SignInError::Refused(user.to_owned())
                    }
                    _ => SignInError::Unreachable {
                        url,
                        reason: err.to_string(),
                    },
                });
            }
            Err(_) => {
                return Err(SignInError::Unreachable {
                    url,
                    reason: format!("no answer within {} ms", cfg.connect_timeout_ms),
                });
            }
        };
        Ok(Person {
            user: user.to_owned(),
            client,
            violations,
            timeout: Duration::from_millis(cfg.request_timeout_ms),
        })
    }

    /// Sends `body` on `subject` and returns the reply; an error reply, a refused publish or
    /// silence is a [`Refusal`] saying why.
    pub async fn request(&self, subject: &str, body: &Value) -> Result<Value, Refusal> {
        let request = self
            .client
            .request(subject.to_owned(), body.to_string().into());
        // A refused publish is reported only asynchronously: end as soon as the server says so.
        let refused = async {
            loop {
                self.violations.arrived.notified().await;
                if let Some(reason) = self.violation_for(subject) {
                    return reason;
                }
            }
        };
        let answer = tokio::select! {
            answer = tokio::time::timeout(self.timeout, request) => answer,
            reason = refused => return Err(self.permission(subject, reason)),
        };
        let reply = match answer {
            Ok(Ok(msg)) => msg,
            Ok(Err(err)) => {
                let reason = match err.kind() {
                    async_nats::client::RequestErrorKind::NoResponders => {
                        "nothing serves it (is bulwark running?)".to_owned()
                    }
                    async_nats::client::RequestErrorKind::TimedOut => self.timeout_reason(),
                    _ => err.to_string(),
                };
                if let Some(reason) = self.violation_for(subject) {
                    return Err(self.permission(subject, reason));
                }
                return Err(Refusal::NoAnswer {
                    subject: subject.to_owned(),
                    reason,
                });
            }
            Err(_) => {
                let reason = self.timeout_reason();
                if let Some(reason) = self.violation_for(subject) {
                    return Err(self.permission(subject, reason));
                }
                return Err(Refusal::NoAnswer {
                    subject: subject.to_owned(),
                    reason,
                });
            }
        };
        let value: Value =
            serde_json::from_slice(&reply.payload).map_err(|e| Refusal::Service {
                code: "unreadable_reply".into(),
                message: format!("the reply on {subject} is not JSON: {e}"),
            })?;
        if let Some(err) = value.get("error").filter(|e| e.is_object()) {
            return Err(Refusal::Service {
                code: err["code"].as_str().unwrap_or("error").to_owned(),
                message: err["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(value)
    }

    fn permission(&self, subject: &str, reason: String) -> Refusal {
        Refusal::Permission {
            subject: subject.to_owned(),
            user: self.user.clone(),
            reason,
        }
    }

    fn timeout_reason(&self) -> String {
        format!("no reply within {} ms", self.timeout.as_millis())
    }

    /// A permission violation the server reported on this connection that names `subject`
    /// (the server reports a refused publish only asynchronously; the request then times out).
    fn violation_for(&self, subject: &str) -> Option<String> {
        let list = self.violations.list.lock().ok()?;
        list.iter()
            .rev()
            .find(|v| v.contains(subject) && v.to_lowercase().contains("publish"))
            .cloned()
    }

    /// Subscribes to `subject` (refusals come back as an error the next time a request is
    /// made; a subscription the server refuses simply stays silent).
    pub async fn subscribe(&self, subject: &str) -> Result<async_nats::Subscriber, Refusal> {
        self.client
            .subscribe(subject.to_owned())
            .await
            .map_err(|e| Refusal::NoAnswer {
                subject: subject.to_owned(),
                reason: e.to_string(),
            })
    }

    /// True when the server refused a subscription to `subject` on this connection.
    pub fn subscription_refused(&self, subject: &str) -> Option<String> {
        let list = self.violations.list.lock().ok()?;
        list.iter()
            .rev()
            .find(|v| v.contains(subject) && v.to_lowercase().contains("subscription"))
            .cloned()
    }

    /// Closes the connection (sign-out, expiry).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.drain()).await;
    }
}
