//! Connecting to NATS the same way everywhere: timeouts on connect and requests, unlimited
//! reconnects, credentials (user and password, or a token) and TLS from the configuration, and an
//! event callback so that server errors (permission violations) and slow consumer drops are
//! logged and counted instead of vanishing (async-nats reports both only there).
//!
//! Secrets never reach a message: URLs are shown through [`redact_url`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, ServerAddr};

use crate::config::NatsConfig;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A URL of the list does not parse.
    #[error("invalid NATS url {url:?}: {reason}")]
    BadUrl {
        /// The offending URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No server answered in time, or it refused us.
    #[error("cannot reach NATS at {url}: {reason}")]
    Unreachable {
        /// The URL list tried.
        url: String,
        /// The client's explanation.
        reason: String,
    },
}

/// Counters fed by the connection's event callback.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Messages dropped because a subscription's buffer was full.
    pub slow_consumer_drops: AtomicU64,
    /// Errors the server reported (e.g. permission violations).
    pub server_errors: AtomicU64,
    /// Times the connection was lost.
    pub disconnects: AtomicU64,
}

/// Every connection of this process with its counters, for the metrics endpoint.
static CONNECTIONS: std::sync::Mutex<Vec<(String, std::sync::Weak<ConnectionStats>)>> =
    std::sync::Mutex::new(Vec::new());

fn register(name: &str, stats: &Arc<ConnectionStats>) {
    let mut all = CONNECTIONS.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(_, weak)| weak.strong_count() > 0);
    all.push((name.to_owned(), Arc::downgrade(stats)));
}

/// The live connections of this process: `(client name, counters)`.
pub fn connections() -> Vec<(String, Arc<ConnectionStats>)> {
    let all = CONNECTIONS.lock().unwrap_or_else(|p| p.into_inner());
    all.iter()
        .filter_map(|(name, weak)| weak.upgrade().map(|s| (name.clone(), s)))
        .collect()
}

/// Who is connecting: decides the credentials and whether to wait for a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A long-running service: service credentials, keeps retrying until the server is up.
    Service,
    /// A CLI command: operator credentials, fails fast when no server answers.
    Cli,
    /// One of bulwark's own HTM workers: worker credentials, keeps retrying like a service.
    Worker,
    /// The connection a service answers requests on: `api_user`, which may publish only to
    /// inboxes; keeps retrying like a service.
    Api,
}

/// The inbox prefix of a client connecting as `user`: `_INBOX_<user>` outside bulwark's own
/// account (`nats.conf` lets each person and worker subscribe only to its own, so nobody reads
/// another's replies), the plain `_INBOX` for the services and for no user at all.
pub fn inbox_prefix(role: Role, user: &str) -> String {
    if matches!(role, Role::Service | Role::Api) || user.is_empty() {
        "_INBOX".to_owned()
    } else {
        format!("_INBOX_{user}")
    }
}

/// `urls` (one URL or a comma-separated list) with the password or token of each URL's
/// credentials replaced by `***`: `nats://u:pw@h:4222` -> `nats://u:***@h:4222`,
/// `nats://token@h` -> `nats://***@h`. For anything shown to a person or written to a log.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let (scheme, rest) = match url.find("://") {
                Some(i) => url.split_at(i + 3),
                None => ("", url),
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => {
                    let hidden = match rest[..at].split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None => "***".to_owned(),
                    };
                    format!("{scheme}{hidden}{}", &rest[at..])
                }
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Credentials found in a server URL.
enum UrlAuth {
    /// `nats://user:password@host`.
    UserPassword(String, String),
    /// `nats://token@host`.
    Token(String),
}

/// `addr` without the credentials in its URL, and those credentials.
fn strip_credentials(addr: ServerAddr) -> (ServerAddr, Option<UrlAuth>) {
    if !addr.has_user_pass() {
        return (addr, None);
    }
    let mut url = addr.clone().into_inner();
    let user = url.username().to_owned();
    let auth = match url.password() {
        Some(password) => UrlAuth::UserPassword(user, password.to_owned()),
        None => UrlAuth::Token(user),
    };
    let cleared = url.set_username("").is_ok() && url.set_password(None).is_ok();
    match ServerAddr::from_url(url) {
        Ok(stripped) if cleared => (stripped, Some(auth)),
        _ => (addr, None),
    }
}

/// Parses a comma-separated list of server URLs.
pub fn parse_urls(urls: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let addrs: Vec<ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>().map_err(|e| ConnectError::BadUrl {
                url: redact_url(u),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err(ConnectError::BadUrl {
            url: redact_url(urls),
            reason: "no URL given".into(),
        });
    }
    Ok(addrs)
}

/// Connects as `name` with the settings of `cfg` to `cfg.url`, for `role`.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
    role: Role,
) -> Result<(Client, Arc<ConnectionStats>), ConnectError> {
    // Credentials in a URL are taken out of it and given as options, so that no URL the client
    // library logs (its debug lines print server addresses) carries a password or token.
    let mut url_auth = None;
    let addrs: Vec<ServerAddr> = parse_urls(&cfg.url)?
        .into_iter()
        .map(|addr| {
            let (addr, auth) = strip_credentials(addr);
            url_auth = url_auth.take().or(auth);
            addr
        })
        .collect();
    crate::streams::set_replicas(cfg.replicas);
    crate::streams::set_storage(&cfg.storage);
    let stats = Arc::new(ConnectionStats::default());
    register(name, &stats);
    let (user, password, token) = match role {
        Role::Service => (&cfg.user, &cfg.password, &cfg.token),
        Role::Cli => (&cfg.cli_user, &cfg.cli_password, &cfg.cli_token),
        Role::Worker => (&cfg.worker_user, &cfg.worker_password, &cfg.worker_token),
        Role::Api => (&cfg.api_user, &cfg.api_password, &String::new()),
    };
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)))
        .event_callback(event_logger(name.to_owned(), stats.clone()));
    // Credentials embedded in a URL win over the configured ones.
    let user_name = match url_auth {
        Some(UrlAuth::UserPassword(user, password)) => {
            options = options.user_and_password(user.clone(), password);
            user
        }
        Some(UrlAuth::Token(token)) => {
            options = options.token(token);
            String::new()
        }
        None if !token.is_empty() => {
            options = options.token(token.clone());
            String::new()
        }
        None if !user.is_empty() => {
            options = options.user_and_password(user.clone(), password.clone());
            user.clone()
        }
        None => String::new(),
    };
    options = options.custom_inbox_prefix(inbox_prefix(role, &user_name));
    if !cfg.tls_ca.is_empty() {
        options = options.add_root_certificates(cfg.tls_ca.clone().into());
    }
    if !cfg.tls_cert.is_empty() {
        options =
            options.add_client_certificate(cfg.tls_cert.clone().into(), cfg.tls_key.clone().into());
    }
    if cfg.tls_required || !cfg.tls_ca.is_empty() {
        options = options.require_tls(true);
    }
    let client = match role {
        Role::Service | Role::Worker | Role::Api => {
            options.retry_on_initial_connect().connect(addrs).await
        }
        Role::Cli => {
            let attempt = options.max_reconnects(Some(3)).connect(addrs);
            match tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), attempt).await
            {
                Ok(result) => result,
                Err(_) => {
                    return Err(ConnectError::Unreachable {
                        url: redact_url(&cfg.url),
                        reason: format!("no answer within {} ms", cfg.connect_timeout_ms),
                    });
                }
            }
        }
    }
    .map_err(|e| ConnectError::Unreachable {
        url: redact_url(&cfg.url),
        reason: e.to_string(),
    })?;
    Ok((client, stats))
}

fn event_logger(
    name: String,
    stats: Arc<ConnectionStats>,
) -> impl Fn(Event) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>
+ Send
+ Sync
+ 'static {
    move |event| {
        let name = name.clone();
        let stats = stats.clone();
        Box::pin(async move {
            match event {
                Event::SlowConsumer(sid) => {
                    let drops = stats.slow_consumer_drops.fetch_add(1, Ordering::Relaxed) + 1;
                    // One line per power of two keeps a flood of drops from flooding the log.
                    if drops.is_power_of_two() {
                        tracing::warn!(client = %name, sid, drops, "slow consumer: messages dropped");
                    }
                }
                Event::ServerError(err) => {
                    stats.server_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client = %name, error = %err, "NATS server error");
                }
                Event::Disconnected => {
                    stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client = %name, "disconnected from NATS");
                }
                Event::Connected => tracing::info!(client = %name, "connected to NATS"),
                Event::ClientError(err) => {
                    tracing::debug!(client = %name, error = %err, "NATS client error")
                }
                other => tracing::info!(client = %name, event = %other, "NATS connection event"),
            }
        })
    }
}

/// Publishes and flushes within `timeout`, so that a dead connection is an error, not a hang
/// (async-nats `publish` only enqueues and `flush` can wait forever while disconnected).
pub async fn publish_flushed(
    client: &Client,
    subject: String,
    payload: bytes::Bytes,
    timeout: Duration,
) -> Result<(), String> {
    let send = async {
        client
            .publish(subject, payload)
            .await
            .map_err(|e| e.to_string())?;
        client.flush().await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, send).await.map_err(|_| {
        format!(
            "NATS did not accept the message within {} ms",
            timeout.as_millis()
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_hidden() {
        assert_eq!(
            redact_url("nats://bulwark:pw@127.0.0.1:4222"),
            "nats://bulwark:***@127.0.0.1:4222"
        );
        assert_eq!(redact_url("tls://tok@h:1/x@y"), "tls://***@h:1/x@y");
        assert_eq!(
            redact_url("nats://a:p@q@h:1, nats://h:2"),
            "nats://a:***@h:1, nats://h:2"
        );
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_url("u:p@h:1"), "u:***@h:1");
        let err = parse_urls("nats://u:s3cret@h:notaport").expect_err("bad port");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn credentials_leave_the_url_for_the_options() {
        let addr: ServerAddr = "nats://u:s3cret@h:1".parse().expect("url");
        let (addr, auth) = strip_credentials(addr);
        assert!(!format!("{addr:?}").contains("s3cret"), "{addr:?}");
        assert!(matches!(auth, Some(UrlAuth::UserPassword(u, p)) if u == "u" && p == "s3cret"));
        let (addr, auth) = strip_credentials("tls://t0ken@h:2".parse().expect("url"));
        assert!(!format!("{addr:?}").contains("t0ken") && addr.tls_required());
        assert!(matches!(auth, Some(UrlAuth::Token(t)) if t == "t0ken"));
        assert!(
            strip_credentials("nats://h:3".parse().expect("url"))
                .1
                .is_none()
        );
    }

    #[test]
    fn url_lists() {
        assert_eq!(parse_urls("nats://a:1, nats://b:2").expect("two").len(), 2);
        assert!(parse_urls(" , ").is_err());
        assert!(parse_urls("nats://a:notaport").is_err());
    }
}
