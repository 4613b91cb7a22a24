//! NATS micro registration and discovery helpers: every service registers under its contract
//! name (CONTRACT section 5) so `nats micro ls` lists it, and readiness is the service answering
//! `$SRV.PING.<name>`.

use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;

/// Version every service registers with (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Metadata key under which a service announces how many endpoints it will add.
pub const ENDPOINTS_METADATA: &str = "endpoints";

/// The metadata a service registers with so that [`wait_ready`] can tell when all its
/// `endpoints` are subscribed (micro answers `$SRV.PING` before the first endpoint exists).
pub fn readiness_metadata(endpoints: usize) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([(ENDPOINTS_METADATA.to_owned(), endpoints.to_string())])
}

/// Asks `$SRV.INFO.<name>` until an instance reports every endpoint it announced, or `timeout`
/// passes; true when one did.
pub async fn wait_ready(client: &Client, name: &str, timeout: Duration) -> bool {
    let subject = format!("$SRV.INFO.{name}");
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            client.request(subject.clone(), "".into()),
        )
        .await;
        if let Ok(Ok(reply)) = attempt
            && let Ok(info) = serde_json::from_slice::<serde_json::Value>(&reply.payload)
        {
            let have = info["endpoints"].as_array().map_or(0, Vec::len);
            let want = info["metadata"][ENDPOINTS_METADATA]
                .as_str()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            if have >= want {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Names of the instances answering `$SRV.PING` (optionally of one service) within `window`.
pub async fn ping_all(
    client: &Client,
    name: Option<&str>,
    window: Duration,
) -> Vec<serde_json::Value> {
    let subject = match name {
        Some(n) => format!("$SRV.PING.{n}"),
        None => "$SRV.PING".to_owned(),
    };
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else {
        return Vec::new();
    };
    if client
        .publish_with_reply(subject, inbox, "".into())
        .await
        .is_err()
    {
        return Vec::new();
    }
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if let Ok(v) = serde_json::from_slice(&msg.payload) {
            found.push(v);
        }
    }
    found
}

/// The `$SRV.INFO.<name>` answers of every instance of service `name` within `window`.
pub async fn info_all(client: &Client, name: &str, window: Duration) -> Vec<serde_json::Value> {
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else {
        return Vec::new();
    };
    if client
        .publish_with_reply(format!("$SRV.INFO.{name}"), inbox, "".into())
        .await
        .is_err()
    {
        return Vec::new();
    }
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if let Ok(v) = serde_json::from_slice(&msg.payload) {
            found.push(v);
        }
    }
    found
}

/// Serves the requests of `endpoint` until `shutdown` or until the endpoint closes: each request
/// runs `handle` in its own task on `tracker`, at most as many at once as `permits` allows, so a
/// slow request does not hold up the next. A failing request is the handler's to answer; it
/// never ends this loop.
pub async fn serve_requests<F, Fut>(
    mut endpoint: async_nats::service::endpoint::Endpoint,
    tracker: tokio_util::task::TaskTracker,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    shutdown: tokio_util::sync::CancellationToken,
    handle: F,
) where
    F: Fn(async_nats::service::Request) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let request = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            request = endpoint.next() => match request {
                Some(request) => request,
                None => break,
            },
        };
        if let Some(reply) = request.message.reply.as_deref()
            && !is_inbox(reply)
        {
            refuse_aimed_reply(&request, reply).await;
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let work = handle(request);
        tracker.spawn(async move {
            work.await;
            drop(permit);
        });
    }
}

/// The connection service `name` answers requests on: a connection of its own as
/// `nats.api_user`, which `nats.conf` lets publish only to inboxes, so that no request can make
/// the service write where the requester aimed (the service's state writes use `fallback`, its
/// own connection). Without an `api_user` (a server without users), or when that connection
/// cannot be made, `fallback` answers (logged).
pub async fn serving_client(
    cfg: &crate::config::NatsConfig,
    fallback: &Client,
    name: &str,
) -> Client {
    // Refusals are narrated on the service's own connection (the serving one may not write).
    let _ = NARRATION_CLIENT.set(fallback.clone());
    if cfg.api_user.is_empty() || (cfg.user.is_empty() && cfg.token.is_empty()) {
        return fallback.clone();
    }
    let client_name = format!("{name}-api");
    let attempt = crate::connect::connect(cfg, &client_name, crate::connect::Role::Api);
    match tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), attempt).await {
        Ok(Ok((client, _))) => client,
        Ok(Err(err)) => {
            tracing::warn!(service = name, error = %err, "no connection as nats.api_user; answering on the service's own");
            fallback.clone()
        }
        Err(_) => {
            tracing::warn!(
                service = name,
                "connection as nats.api_user timed out; answering on the service's own"
            );
            fallback.clone()
        }
    }
}

/// Requests refused because their reply subject was not an inbox, in this process.
pub static AIMED_REPLIES_REFUSED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// True when `reply` is an inbox a service may answer to: the services' own `_INBOX.`, a
/// person's or worker's `_INBOX_<user>.`, or `_R_.`, the reply subject the server gives a request
/// that crossed an account import. Anything else (`$KV.…`, `$JS.API.…`, a stream's subject)
/// would make the service write where the requester aimed it: a confused deputy.
pub fn is_inbox(reply: &str) -> bool {
    reply.starts_with("_INBOX.") || reply.starts_with("_INBOX_") || reply.starts_with("_R_.")
}

/// Refuses a request whose reply subject is not an inbox: it is not handled and not answered
/// (an answer would go where the requester aimed it); counted, logged and narrated.
async fn refuse_aimed_reply(request: &async_nats::service::Request, reply: &str) {
    let total = AIMED_REPLIES_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let subject = request.message.subject.to_string();
    let reply = crate::api::excerpt(reply, 128);
    tracing::warn!(%subject, %reply, total, "request refused: its reply subject is not an inbox");
    let Some(client) = NARRATION_CLIENT.get() else {
        return;
    };
    let narrator = crate::Narrator::new(
        async_nats::jetstream::new(client.clone()),
        "trust_boundary",
        "micro",
    );
    let narrative = narrator
        .narrative("aimed_reply_refused", "reply subject check")
        .why(format!(
            "a request on {subject} asked for its answer on {reply}, which is not an inbox"
        ))
        .why("answering would write where the requester aimed it; the request was not handled")
        .context(serde_json::json!({"subject": subject, "reply": reply, "refused_total": total}));
    narrator.publish(narrative).await;
}

/// The connection refusals are narrated on (the first service registered in this process).
static NARRATION_CLIENT: std::sync::OnceLock<Client> = std::sync::OnceLock::new();

/// Ends a service after its shutdown signal: deregisters the micro service (it stops taking
/// work), then gives the tasks on `tracker` `grace` to finish.
pub async fn finish(
    name: &str,
    service: async_nats::service::Service,
    tracker: tokio_util::task::TaskTracker,
    grace: Duration,
) {
    // Leave the queue groups first, so new requests go to the other replicas at once; the
    // requests in flight still answer (replies do not need the subscription).
    if let Err(err) = service.stop().await {
        tracing::debug!(error = %err, "{name}: micro service stop");
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("{name}: work still running after {grace:?}; stopping anyway");
    }
}

/// One endpoint of a service: its micro name, its subject, and what the service calls it.
pub type EndpointSpec<Op> = (&'static str, &'static str, Op);

/// Registers service `name` with NATS micro (with `snapshot` as its `$SRV.STATS` data and the
/// readiness metadata), adds every endpoint in the default queue group, and serves each with
/// `handle(op, request)` on `tracker` (at most `max_concurrent` requests at once) until
/// `shutdown`. Returns the service, to be passed to [`finish`].
#[allow(clippy::too_many_arguments)]
pub async fn register<Op, F, Fut>(
    client: &Client,
    name: &str,
    description: &str,
    snapshot: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    endpoints: &[EndpointSpec<Op>],
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &tokio_util::sync::CancellationToken,
    max_concurrent: usize,
    handle: F,
) -> Result<async_nats::service::Service, String>
where
    Op: Copy + Send + 'static,
    F: Fn(Op, async_nats::service::Request) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(max_concurrent));
    register_with_permits(
        client,
        name,
        description,
        snapshot,
        endpoints,
        tracker,
        shutdown,
        move |_| permits.clone(),
        handle,
    )
    .await
}

/// [`register`], with the permits of each endpoint given by `permits(op)`: endpoints given
/// different semaphores cannot starve one another (clarity's long queries and its verify).
#[allow(clippy::too_many_arguments)]
pub async fn register_with_permits<Op, F, Fut>(
    client: &Client,
    name: &str,
    description: &str,
    snapshot: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    endpoints: &[EndpointSpec<Op>],
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &tokio_util::sync::CancellationToken,
    permits: impl Fn(Op) -> std::sync::Arc<tokio::sync::Semaphore>,
    handle: F,
) -> Result<async_nats::service::Service, String>
where
    Op: Copy + Send + 'static,
    F: Fn(Op, async_nats::service::Request) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use async_nats::service::ServiceExt;
    let _ = NARRATION_CLIENT.set(client.clone());
    crate::api::set_max_payload(client.server_info().max_payload);
    let service = client
        .service_builder()
        .description(description)
        .stats_handler(move |_, _| snapshot())
        .metadata(readiness_metadata(endpoints.len()))
        .start(name, VERSION)
        .await
        .map_err(|e| format!("could not register NATS micro service {name}: {e}"))?;
    for &(endpoint_name, subject, op) in endpoints {
        let endpoint = service
            .endpoint_builder()
            .name(endpoint_name)
            .add(subject)
            .await
            .map_err(|e| format!("could not add endpoint {subject} to {name}: {e}"))?;
        let handle = handle.clone();
        tracker.spawn(serve_requests(
            endpoint,
            tracker.clone(),
            permits(op),
            shutdown.clone(),
            move |request| handle(op, request),
        ));
    }
    Ok(service)
}
