//! Connecting to NATS the same way everywhere: timeouts on connect and requests, unlimited
//! reconnects, and an event callback so that server errors (permission violations) and slow
//! consumer drops are logged and counted instead of vanishing (async-nats reports both only
//! there).

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
}

/// Parses a comma-separated list of server URLs.
pub fn parse_urls(urls: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let addrs: Vec<ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>().map_err(|e| ConnectError::BadUrl {
                url: u.to_owned(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err(ConnectError::BadUrl {
            url: urls.to_owned(),
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
    let addrs = parse_urls(&cfg.url)?;
    crate::streams::set_replicas(cfg.replicas);
    let stats = Arc::new(ConnectionStats::default());
    register(name, &stats);
    let (user, password) = match role {
        Role::Service => (&cfg.user, &cfg.password),
        Role::Cli => (&cfg.cli_user, &cfg.cli_password),
    };
    // Credentials embedded in a URL win over the configured ones.
    let url_has_credentials = cfg.url.contains('@');
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)))
        .event_callback(event_logger(name.to_owned(), stats.clone()));
    if !user.is_empty() && !url_has_credentials {
        options = options.user_and_password(user.clone(), password.clone());
    }
    let client = match role {
        Role::Service => options.retry_on_initial_connect().connect(addrs).await,
        Role::Cli => {
            let attempt = options.max_reconnects(Some(3)).connect(addrs);
            match tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), attempt).await
            {
                Ok(result) => result,
                Err(_) => {
                    return Err(ConnectError::Unreachable {
                        url: cfg.url.clone(),
                        reason: format!("no answer within {} ms", cfg.connect_timeout_ms),
                    });
                }
            }
        }
    }
    .map_err(|e| ConnectError::Unreachable {
        url: cfg.url.clone(),
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
    fn url_lists() {
        assert_eq!(parse_urls("nats://a:1, nats://b:2").expect("two").len(), 2);
        assert!(parse_urls(" , ").is_err());
        assert!(parse_urls("nats://a:notaport").is_err());
    }
}
