//! `scripts/bench console`: how long the console takes to render its pages with 10,000 intents
//! stored (p50 and p99 per page, one person signed in, requests one after another), next to the
//! raw NATS request behind the intent page (`htm.intent.status`) in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_common::{streams, subjects};
use bulwark_tests::{
    NatsServer, OPERATOR_USER, request_json, start_clarity, start_governance, start_scheduler,
    start_storm_guard, start_watchdog,
};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// One HTTP/1.0 GET (or POST of `form`): status, headers, body.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    cookie: &str,
    form: &str,
) -> anyhow::Result<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nCookie: {cookie}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_owned(), body.to_owned()))
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    text.split(start).nth(1)?.split(end).next()
}

/// Runs the console benchmark; `smoke` stores 300 intents and renders each page 10 times.
pub async fn run(smoke: bool) -> anyhow::Result<()> {
    let (n, renders): (usize, usize) = if smoke { (300, 10) } else { (10_000, 200) };
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.console.listen = "127.0.0.1:0".into();
    println!(
        "bench console: nats-server {} (file-backed JetStream), {n} intents stored, {renders} renders per page",
        server.url()
    );
    let _governance = start_governance(cfg.clone()).await;
    let _clarity = start_clarity(cfg.clone()).await;
    // What the overview asks (no worker: the intents stay queued).
    let _scheduler = start_scheduler(cfg.clone()).await;
    let _guard = start_storm_guard(cfg.clone()).await;
    let _watchdog = start_watchdog(cfg.clone()).await;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let agent = server.client_as(bulwark_tests::AGENT_USER).await;
    // Tier 2 intents (queued; no scheduler runs them) from 100 actors, 64 submissions in flight.
    let mut ids = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let agent = agent.clone();
        tasks.spawn(async move {
            let body = json!({"intent_type": "query_knowledge", "actor": format!("bench-{}", i % 100),
                              "payload": {"i": i}});
            agent
                .request(subjects::INTENT_SUBMIT, body.to_string().into())
                .await
                .ok()
                .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
                .and_then(|v| v["intent_id"].as_str().map(str::to_owned))
        });
        if tasks.len() >= 64
            && let Some(done) = tasks.join_next().await
        {
            ids.extend(done.ok().flatten());
        }
    }
    while let Some(done) = tasks.join_next().await {
        ids.extend(done.ok().flatten());
    }
    if ids.len() < n {
        bail!("only {} of {n} intents were accepted", ids.len());
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut audit = js.get_stream(streams::AUDIT_STREAM).await?;
        if audit.info().await?.state.messages >= n as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("clarity did not chain {n} narratives within 10 min");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let console = bulwark_console::Console::bind(cfg.clone()).await?;
    let addr = console
        .local_addr()
        .context("the console's address")?
        .to_string();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(console.serve(stop.clone()));
    let (_, head, page) = http(&addr, "GET", "/login", "", "").await?;
    let login_cookie = between(&head, "set-cookie: ", ";")
        .or_else(|| between(&head, "Set-Cookie: ", ";"))
        .context("a login cookie")?
        .to_owned();
    let csrf = between(&page, "name=\"csrf\" value=\"", "\"").context("a csrf field")?;
    let (user, password) = OPERATOR_USER;
    let form = format!("user={user}&password={password}&csrf={csrf}");
    let (status, head, _) = http(&addr, "POST", "/login", &login_cookie, &form).await?;
    if status != 303 {
        bail!("sign-in failed: {status}");
    }
    let cookie = between(&head, "bulwark_session=", ";")
        .map(|t| format!("bulwark_session={t}"))
        .context("a session cookie")?;

    let probe = &ids[n / 2];
    let pages = [
        ("overview /", "/".to_owned()),
        ("reviews /reviews", "/reviews".to_owned()),
        ("an intent /intents/<id>", format!("/intents/{probe}")),
        (
            "intent search by actor (50 results)",
            "/intents?actor=bench-7".to_owned(),
        ),
        ("proposals /proposals", "/proposals".to_owned()),
    ];
    println!();
    let operator = server.client_as(OPERATOR_USER).await;
    let mut raw = Histogram::<u64>::new(3)?;
    for _ in 0..renders {
        let start = Instant::now();
        let (reply, _) = request_json(
            &operator,
            subjects::INTENT_STATUS,
            json!({"intent_id": probe}).to_string(),
        )
        .await;
        if reply["intent_id"] != probe.as_str() {
            bail!("htm.intent.status: {reply}");
        }
        raw.record(start.elapsed().as_micros() as u64)?;
    }
    println!(
        "  {:<44} p50 {:>7.1} ms   p99 {:>7.1} ms",
        "raw htm.intent.status request (operator)",
        raw.value_at_quantile(0.5) as f64 / 1000.0,
        raw.value_at_quantile(0.99) as f64 / 1000.0
    );
    // The other request behind an intent's page and the search: the audit's narratives.
    let mut scan = Histogram::<u64>::new(3)?;
    for _ in 0..renders.min(50) {
        let start = Instant::now();
        let (reply, _) = request_json(
            &operator,
            subjects::CLARITY_QUERY,
            json!({"intent_id": probe, "limit": 1000}).to_string(),
        )
        .await;
        if reply["items"].as_array().is_none() {
            bail!("clarity.query: {reply}");
        }
        scan.record(start.elapsed().as_micros() as u64)?;
    }
    println!(
        "  {:<44} p50 {:>7.1} ms   p99 {:>7.1} ms",
        "raw clarity.query {intent_id} (operator)",
        scan.value_at_quantile(0.5) as f64 / 1000.0,
        scan.value_at_quantile(0.99) as f64 / 1000.0
    );
    for (name, path) in pages {
        let mut hist = Histogram::<u64>::new(3)?;
        for _ in 0..renders {
            let start = Instant::now();
            let (status, _, body) = http(&addr, "GET", &path, &cookie, "").await?;
            if status != 200 || body.contains("class=\"refused\"") {
                bail!(
                    "{path}: status {status}: {}",
                    body.chars().take(400).collect::<String>()
                );
            }
            hist.record(start.elapsed().as_micros() as u64)?;
        }
        println!(
            "  {:<44} p50 {:>7.1} ms   p99 {:>7.1} ms   (aim p99 < 100 ms)",
            name,
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0
        );
    }
    stop.cancel();
    let _ = serving.await;
    Ok(())
}
