//! The web console, as its people use it: a real nats-server with the repository's `nats.conf`,
//! bulwark's services in-process, the console on a free port, and headless Chromium driven
//! through WebDriver (Debian's `chromium` and `chromium-driver`; `scripts/setup --browser`
//! installs them). Without a browser the browser tests say so and pass, except under `CI`, where
//! they fail. The HTTP-level checks (cookies, CSRF, sign-out closing the NATS connection) need no
//! browser.

use std::time::Duration;

use bulwark_common::subjects;
use bulwark_tests::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How long a person waits at most for something to appear (generous: shared machines).
const PATIENCE: Duration = Duration::from_secs(60);

/// The stack behind the console.
struct Stack {
    server: NatsServer,
    _services: Vec<RunningService>,
    console_stop: CancellationToken,
    base: String,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.console_stop.cancel();
    }
}

/// Governance (with the shipped bound identities: the voters speak only as themselves),
/// clarity, the scheduler, one worker, the storm guard, the event policy engine and the
/// watchdog, and the console.
async fn stack() -> Stack {
    stack_with(|_| {}).await
}

async fn stack_with(adjust: impl FnOnce(&mut bulwark_common::BulwarkConfig)) -> Stack {
    init_logging();
    let server = NatsServer::start();
    let mut cfg = server.config();
    cfg.governance.bound_identities = vec!["architect".into(), "guardian".into(), "steward".into()];
    cfg.console.listen = "127.0.0.1:0".into();
    cfg.console.refresh_s = 0.3;
    cfg.console.chaos_reports = server_dir_reports();
    cfg.scheduler.min_workers = 1;
    adjust(&mut cfg);
    let services = vec![
        start_governance(cfg.clone()).await,
        start_clarity(cfg.clone()).await,
        start_scheduler(cfg.clone()).await,
        start_worker(cfg.clone(), "console-w1").await,
        start_storm_guard(cfg.clone()).await,
        start_event_policy(cfg.clone()).await,
        start_watchdog(cfg.clone()).await,
    ];
    let console = bulwark_console::Console::bind(cfg.clone())
        .await
        .expect("the console binds a free port");
    let addr = console.local_addr().expect("a bound address");
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { console.serve(token).await });
    Stack {
        server,
        _services: services,
        console_stop: stop,
        base: format!("http://{addr}"),
    }
}

fn server_dir_reports() -> String {
    repo_root().join("chaos/reports").display().to_string()
}

/// Submits an intent as an agent; returns governance's decision.
async fn submit(server: &NatsServer, body: Value) -> Value {
    let agent = server.client_as(AGENT_USER).await;
    let (reply, code) = request_json(&agent, subjects::INTENT_SUBMIT, body.to_string()).await;
    assert_eq!(code, None, "submission accepted: {reply}");
    reply
}

async fn intent_status(server: &NatsServer, id: &str) -> Value {
    let operator = server.client_as(OPERATOR_USER).await;
    request_json(
        &operator,
        subjects::INTENT_STATUS,
        json!({ "intent_id": id }).to_string(),
    )
    .await
    .0
}

// ---- the browser ----

/// Headless Chromium under chromedriver, or `None` (said on stderr) when it is not installed.
/// Under `CI` a missing browser fails the test.
struct Browser {
    driver: std::process::Child,
    client: Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn find_program(names: &[&str]) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([std::path::PathBuf::from("/usr/bin")]) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

async fn browser() -> Option<Browser> {
    let (Some(driver), Some(chromium)) = (
        find_program(&["chromedriver"]),
        find_program(&["chromium", "chromium-browser", "google-chrome"]),
    ) else {
        let msg = "BROWSER TESTS CANNOT RUN: chromium and chromedriver are not installed \
                   (run scripts/setup --browser, or apt-get install chromium chromium-driver)";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = std::process::Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--lang=en"],
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    let client = eventually(PATIENCE, "chromedriver answers", || {
        let caps = caps.clone();
        let url = url.clone();
        async move {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&url)
                .await
                .ok()
        }
    })
    .await;
    Some(Browser {
        driver: child,
        client,
    })
}

impl Browser {
    async fn sign_in(&self, base: &str, user: &str, password: &str) {
        let c = &self.client;
        c.goto(&format!("{base}/login")).await.expect("login page");
        c.find(Locator::Css("#user"))
            .await
            .expect("user field")
            .send_keys(user)
            .await
            .expect("types the user");
        c.find(Locator::Css("#password"))
            .await
            .expect("password field")
            .send_keys(password)
            .await
            .expect("types the password");
        c.find(Locator::Css("#signin"))
            .await
            .expect("sign-in button")
            .click()
            .await
            .expect("clicks sign in");
    }

    /// The text of the first element matching `css`, once there is one.
    async fn text_of(&self, css: &str) -> String {
        let c = self.client.clone();
        eventually(PATIENCE, css, || {
            let c = c.clone();
            async move { c.find(Locator::Css(css)).await.ok()?.text().await.ok() }
        })
        .await
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let c = self.client.clone();
        eventually(PATIENCE, what, || {
            let c = c.clone();
            let ok = &ok;
            async move {
                let t = c.find(Locator::Css(css)).await.ok()?.text().await.ok()?;
                ok(&t).then_some(t)
            }
        })
        .await
    }

    /// Clicks the first element matching `css`, again if a live update replaced it meanwhile.
    async fn click(&self, css: &str) {
        let c = self.client.clone();
        eventually(PATIENCE, css, || {
            let c = c.clone();
            async move { c.find(Locator::Css(css)).await.ok()?.click().await.ok() }
        })
        .await
    }

    /// Types `text` into the first element matching `css` (again if it was replaced meanwhile).
    async fn type_into(&self, css: &str, text: &str) {
        let c = self.client.clone();
        eventually(PATIENCE, css, || {
            let c = c.clone();
            async move {
                let field = c.find(Locator::Css(css)).await.ok()?;
                field.clear().await.ok()?;
                field.send_keys(text).await.ok()
            }
        })
        .await
    }

    async fn screenshot(&self, name: &str) {
        // Taken on every run; copied into the repository only when asked
        // (BULWARK_CONSOLE_SCREENSHOTS=docs/img).
        let Ok(dir) = std::env::var("BULWARK_CONSOLE_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = repo_root().join(dir);
        std::fs::create_dir_all(&dir).expect("screenshot folder");
        std::fs::write(dir.join(name), png).expect("screenshot written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_sees_a_pending_intent_appear_and_approves_it_until_it_completes() {
    let stack = stack().await;
    let Some(browser) = browser().await else {
        return;
    };
    browser
        .sign_in(&stack.base, "architect", "architect-dev")
        .await;
    let who = browser.text_of("#whoami").await;
    assert!(who.contains("architect"), "{who}");

    browser
        .client
        .goto(&format!("{}/reviews", stack.base))
        .await
        .expect("reviews page");
    browser
        .wait_text("#review-count", "an empty queue", |t| {
            t.starts_with("0 item")
        })
        .await;
    // The page is open; now an agent asks for something only a person may allow, with a payload
    // that would run a script if the console did not escape it.
    let decision = submit(
        &stack.server,
        json!({"intent_type": "modify_governance", "actor": "bot-7",
               "payload": {"note": "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned=2\">"}}),
    )
    .await;
    assert_eq!(decision["status"], "pending_review", "{decision}");
    let id = decision["intent_id"].as_str().expect("an id").to_owned();
    let item = format!("#review-{id}");
    // It appears without a reload: the live region is fed by server-sent events.
    let payload = browser
        .wait_text(&format!("{item} pre.payload"), "the pending item", |t| {
            !t.is_empty()
        })
        .await;
    assert!(
        payload.contains("<script>window.pwned = 1</script>"),
        "the payload shows as text: {payload}"
    );
    let pwned = browser
        .client
        .execute("return window.pwned === undefined;", vec![])
        .await
        .expect("script runs");
    assert_eq!(pwned, json!(true), "no script of the payload ran");

    browser
        .type_into(&format!("{item} input.reason"), "reviewed in the console")
        .await;
    browser.click(&format!("{item} button.approve")).await;
    // The intent's page: queued, then completed, live.
    browser
        .wait_text("#notice", "the notice", |t| t == "Approved.")
        .await;
    browser
        .wait_text("#status", "the intent completes", |t| t == "completed")
        .await;
    let history = browser.text_of("#history").await;
    assert!(history.contains("queued"), "{history}");
    assert!(
        history.contains("architect"),
        "decided as architect: {history}"
    );
    let status = intent_status(&stack.server, &id).await;
    assert_eq!(status["review"]["reviewer"], "architect", "{status}");
    assert_eq!(
        status["review"]["reason"], "reviewed in the console",
        "{status}"
    );
    // A reviewer may not query the audit: the page says why, with NATS's words.
    let narratives = browser.text_of("#live").await;
    assert!(
        narratives.contains("clarity.query") && narratives.to_lowercase().contains("permission"),
        "{narratives}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_the_intent_page_with_its_audit_and_the_overview() {
    let stack = stack().await;
    let Some(browser) = browser().await else {
        return;
    };
    let decision = submit(
        &stack.server,
        json!({"intent_type": "query_knowledge", "actor": "bot-3",
               "payload": {"question": "<b>bold?</b>"}}),
    )
    .await;
    let id = decision["intent_id"].as_str().expect("an id").to_owned();
    browser
        .sign_in(&stack.base, "operator", "operator-dev")
        .await;
    browser
        .wait_text("#overall", "the Layer 2 report", |t| {
            matches!(t, "healthy" | "degraded" | "critical")
        })
        .await;
    browser
        .wait_text("#breaker", "the breaker state", |t| t == "closed")
        .await;
    browser.screenshot("console-overview.png").await;
    browser
        .client
        .goto(&format!("{}/intents/{id}", stack.base))
        .await
        .expect("intent page");
    browser
        .wait_text("#status", "the intent completes", |t| t == "completed")
        .await;
    let chain = browser
        .wait_text("#chain", "its audit records and the chain checked", |t| {
            t.contains("audit records") && t.contains("the whole chain verifies")
        })
        .await;
    assert!(
        chain.contains("every record's hash and signature verify"),
        "{chain}"
    );
    let rows = browser
        .wait_text("#narratives", "the routing narrative", |t| {
            t.contains("intent_routed")
        })
        .await;
    assert!(rows.contains("governance"), "{rows}");
    browser.screenshot("console-intent.png").await;
    // Search by actor finds it.
    browser
        .client
        .goto(&format!("{}/intents?actor=bot-3", stack.base))
        .await
        .expect("search");
    let results = browser.text_of("#results").await;
    assert!(results.contains(&id), "{results}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bound_voters_vote_a_tier_3_intent_to_quorum() {
    let stack = stack().await;
    let Some(browser) = browser().await else {
        return;
    };
    let decision = submit(
        &stack.server,
        json!({"intent_type": "self_improve", "actor": "bot-9", "payload": {"feature": "cache"},
               "mission_context": {"resilience_impact": true}}),
    )
    .await;
    assert_eq!(decision["status"], "pending_vote", "{decision}");
    let id = decision["intent_id"].as_str().expect("an id").to_owned();
    let card = format!("#proposal-{id}");
    for (i, voter) in ["architect", "guardian"].into_iter().enumerate() {
        browser
            .sign_in(&stack.base, voter, &format!("{voter}-dev"))
            .await;
        browser.text_of("#whoami").await;
        browser
            .client
            .goto(&format!("{}/proposals", stack.base))
            .await
            .expect("proposals page");
        let tally = browser.text_of(&format!("{card} .tally")).await;
        assert!(tally.starts_with(&format!("{i} for")), "{tally}");
        browser.click(&format!("{card} button.approve")).await;
        browser
            .wait_text("#notice", "the notice", |t| t == "Vote counted.")
            .await;
        // Sign out: the next voter signs in on the same browser.
        browser
            .client
            .find(Locator::Css(".signout button"))
            .await
            .expect("sign-out button")
            .click()
            .await
            .expect("signs out");
        browser
            .wait_text("#notice", "the notice", |t| t == "Signed out.")
            .await;
    }
    let status = eventually(PATIENCE, "the approved intent runs", || async {
        let s = intent_status(&stack.server, &id).await;
        (s["status"] == "completed").then_some(s)
    })
    .await;
    let history = status["history"].to_string();
    assert!(history.contains("queued"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_in_the_browser() {
    let stack = stack().await;
    let Some(browser) = browser().await else {
        return;
    };
    browser
        .sign_in(&stack.base, "operator", "not-the-password")
        .await;
    let error = browser.text_of("#login-error").await;
    assert!(error.contains("wrong user name or password"), "{error}");
    let cookies = browser.client.get_all_cookies().await.expect("cookies");
    assert!(
        cookies.iter().all(|c| c.name() != "bulwark_session"),
        "no session: {cookies:?}"
    );
}

// ---- HTTP level, no browser ----

/// One HTTP/1.0 exchange (no chunked bodies to decode): status, headers (lower-case names), body.
async fn http(
    base: &str,
    method: &str,
    path: &str,
    cookie: &str,
    form: &str,
) -> (u16, Vec<(String, String)>, String) {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the console accepts");
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nCookie: {cookie}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("the console answers")
        .expect("response read");
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Signs in over HTTP; returns the session cookie (`bulwark_session=...`) or the refusal page.
async fn http_sign_in(base: &str, user: &str, password: &str) -> Result<String, (u16, String)> {
    let (_, headers, body) = http(base, "GET", "/login", "", "").await;
    let login_cookie = header(&headers, "set-cookie")
        .first()
        .and_then(|c| c.split(';').next())
        .expect("a login cookie")
        .to_owned();
    let csrf = body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a csrf field")
        .to_owned();
    let form = format!("user={user}&password={password}&csrf={csrf}");
    let (status, headers, body) = http(base, "POST", "/login", &login_cookie, &form).await;
    let cookie = header(&headers, "set-cookie")
        .into_iter()
        .find(|c| c.starts_with("bulwark_session="))
        .map(str::to_owned);
    match cookie {
        Some(c) if status == 303 => Ok(c),
        _ => Err((status, body)),
    }
}

fn csrf_of(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a csrf field")
        .to_owned()
}

/// The names of the server's client connections (its monitoring endpoint).
async fn connection_names(server: &NatsServer) -> Vec<String> {
    let base = format!("http://127.0.0.1:{}", server.monitor_port());
    let (_, _, body) = http(&base, "GET", "/connz?limit=1000", "", "").await;
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["connections"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_strict_cookies_posts_need_the_token_and_sign_out_closes_the_connection() {
    let stack = stack().await;
    let base = &stack.base;
    // A wrong password: refused, no session.
    let (status, body) = http_sign_in(base, "operator", "wrong")
        .await
        .expect_err("refused");
    assert_eq!(status, 401);
    assert!(body.contains("wrong user name or password"), "{body}");

    let set_cookie = http_sign_in(base, "operator", "operator-dev")
        .await
        .expect("signed in");
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().expect("a cookie").to_owned();
    eventually(PATIENCE, "the operator's own NATS connection", || async {
        connection_names(&stack.server)
            .await
            .contains(&"bulwark-console/operator".to_owned())
            .then_some(())
    })
    .await;

    let (status, headers, page) = http(base, "GET", "/", &cookie, "").await;
    assert_eq!(status, 200);
    let csp = header(&headers, "content-security-policy").join("");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let csrf = csrf_of(&page);

    // A POST without the session's token is refused, whatever it carries.
    let (status, _, body) = http(
        base,
        "POST",
        "/reviews/decide",
        &cookie,
        "csrf=forged&intent_id=x&decision=approve&reason=r",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");

    // A refusal comes back with the reason: no such intent.
    let (status, _, body) = http(
        base,
        "POST",
        "/reviews/decide",
        &cookie,
        &format!("csrf={csrf}&intent_id=nope&decision=approve&reason=r"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_intent"), "{body}");

    // A reviewer without the permission sees the page, and the reason NATS gave.
    let architect = http_sign_in(base, "architect", "architect-dev")
        .await
        .expect("architect signs in");
    let architect = architect.split(';').next().expect("a cookie").to_owned();
    let (status, _, body) = http(base, "GET", "/playbooks", &architect, "").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("playbook.list") && body.to_lowercase().contains("permission"),
        "{body}"
    );

    // Sign out: the session is gone and its NATS connection closed.
    let (status, _, _) = http(base, "POST", "/logout", &cookie, &format!("csrf={csrf}")).await;
    assert_eq!(status, 303);
    let (status, headers, _) = http(base, "GET", "/", &cookie, "").await;
    assert_eq!(status, 303);
    assert_eq!(header(&headers, "location"), vec!["/login"]);
    eventually(PATIENCE, "the operator's connection closed", || async {
        let names = connection_names(&stack.server).await;
        (!names.contains(&"bulwark-console/operator".to_owned())).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_bounded_and_an_idle_one_ends_with_its_connection() {
    let stack = stack_with(|cfg| {
        cfg.console.max_sessions = 1;
        cfg.console.session_idle_s = 1.0;
    })
    .await;
    let base = &stack.base;
    let cookie = http_sign_in(base, "operator", "operator-dev")
        .await
        .expect("signed in");
    let cookie = cookie.split(';').next().expect("a cookie").to_owned();
    let (status, body) = http_sign_in(base, "architect", "architect-dev")
        .await
        .expect_err("the console is full");
    assert_eq!(status, 503);
    assert!(body.contains("console.max_sessions"), "{body}");
    // Left alone, the session ends and its NATS connection closes.
    eventually(PATIENCE, "the idle session's connection closed", || async {
        (!connection_names(&stack.server)
            .await
            .contains(&"bulwark-console/operator".to_owned()))
        .then_some(())
    })
    .await;
    let (status, _, _) = http(base, "GET", "/", &cookie, "").await;
    assert_eq!(status, 303, "an expired session signs in again");
    http_sign_in(base, "architect", "architect-dev")
        .await
        .expect("room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_the_breaker_open_live_during_a_flood() {
    let stack = stack_with(|cfg| {
        cfg.mesh.storm_threshold = 1_000_000;
        cfg.mesh.breaker_threshold = 100;
        cfg.mesh.breaker_window_s = 5.0;
    })
    .await;
    let Some(browser) = browser().await else {
        return;
    };
    browser
        .sign_in(&stack.base, "operator", "operator-dev")
        .await;
    browser
        .wait_text("#breaker", "the breaker closed", |t| t == "closed")
        .await;
    let url_before = browser.client.current_url().await.expect("url");
    // A flood on the mesh, while the page stays open.
    let client = stack.server.client().await;
    for i in 0..300 {
        let body = json!({"event_type": "console.flood", "payload": {"n": i}});
        client
            .publish("mesh.console.flood", body.to_string().into())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
    browser
        .wait_text("#breaker", "the breaker open, without a reload", |t| {
            t == "open"
        })
        .await;
    assert_eq!(
        browser.client.current_url().await.expect("url"),
        url_before,
        "the same page, updated in place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_narratives_page_streams_the_newest_and_counts_what_it_skipped() {
    let stack = stack_with(|cfg| cfg.console.live_narratives = 3).await;
    let Some(browser) = browser().await else {
        return;
    };
    browser
        .sign_in(&stack.base, "operator", "operator-dev")
        .await;
    browser.text_of("#whoami").await;
    browser
        .client
        .goto(&format!(
            "{}/narratives?who=governance&what=intent_routed",
            stack.base
        ))
        .await
        .expect("narratives page");
    browser
        .wait_text("#narrative-counts", "the stream open", |t| {
            t.starts_with("0 received")
        })
        .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let d = submit(
            &stack.server,
            json!({"intent_type": "query_knowledge", "actor": format!("<i>bot-{i}</i>")}),
        )
        .await;
        ids.push(d["intent_id"].as_str().expect("an id").to_owned());
    }
    browser
        .wait_text("#narrative-counts", "five received, two skipped", |t| {
            t == "5 received since you opened this page; showing the newest 3, 2 skipped."
        })
        .await;
    let rows = browser.text_of("#narratives").await;
    assert!(rows.contains(&ids[4]), "the newest is shown: {rows}");
    assert!(!rows.contains(&ids[0]), "the oldest was skipped: {rows}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_dry_runs_a_playbook_from_its_page() {
    let stack = stack().await;
    let _playbooks = start_playbooks(stack.server.config()).await;
    let base = &stack.base;
    let cookie = http_sign_in(base, "operator", "operator-dev")
        .await
        .expect("signed in");
    let cookie = cookie.split(';').next().expect("a cookie").to_owned();
    let (status, _, page) = http(base, "GET", "/playbooks", &cookie, "").await;
    assert_eq!(status, 200);
    assert!(page.contains("trigger_mesh_circuit_breaker"), "{page}");
    let csrf = csrf_of(&page);
    let (status, _, page) = http(
        base,
        "POST",
        "/playbooks/dry-run",
        &cookie,
        &format!("csrf={csrf}&playbook=trigger_mesh_circuit_breaker&params=%7B%7D"),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let outcome = page
        .split("<pre id=\"dry-run\">")
        .nth(1)
        .and_then(|r| r.split("</pre>").next())
        .unwrap_or_else(|| panic!("a dry run outcome: {page}"));
    assert!(outcome.contains("&#34;dry_run&#34;: true"), "{outcome}");
    assert!(outcome.contains("&#34;steps&#34;"), "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chaos_page_lists_reports_and_serves_their_charts_sandboxed() {
    // The reports folder inside a temporary root that also holds charts outside it, so that a
    // path escaping the folder would find a real file.
    let root = tempfile::tempdir().expect("a temp dir");
    let reports = root.path().join("reports");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&outside).expect("outside folder");
    std::fs::write(outside.join("secret.svg"), "<svg>outside</svg>").expect("outside chart");
    std::fs::write(root.path().join("x.svg"), "<svg>above</svg>").expect("chart above");
    let run = reports.join("2026-12-06T04-00-00");
    std::fs::create_dir_all(&run).expect("run folder");
    std::fs::write(
        run.join("journal.json"),
        json!({"command": "bulwark chaos run L2-01 --quick", "written_at": "2026-12-06T04:00:00.000Z",
               "all_passed": true, "scenarios": [{"id": "L2-01", "verdict": "Pass"}]})
        .to_string(),
    )
    .expect("journal");
    std::fs::write(
        run.join("L2-01.svg"),
        "<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>",
    )
    .expect("chart");
    let dir = reports.display().to_string();
    let stack = stack_with(move |cfg| cfg.console.chaos_reports = dir).await;
    let base = &stack.base;
    let cookie = http_sign_in(base, "architect", "architect-dev")
        .await
        .expect("signed in");
    let cookie = cookie.split(';').next().expect("a cookie").to_owned();
    let (status, _, page) = http(base, "GET", "/chaos", &cookie, "").await;
    assert_eq!(status, 200);
    assert!(page.contains("bulwark chaos run L2-01 --quick"), "{page}");
    assert!(
        page.contains("src=\"/chaos/2026-12-06T04-00-00/L2-01.svg\""),
        "{page}"
    );
    let (status, headers, svg) = http(
        base,
        "GET",
        "/chaos/2026-12-06T04-00-00/L2-01.svg",
        &cookie,
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert!(svg.contains("<svg"), "{svg}");
    assert_eq!(header(&headers, "content-type"), vec!["image/svg+xml"]);
    assert!(
        header(&headers, "content-security-policy")
            .join("")
            .contains("sandbox"),
        "{headers:?}"
    );
    for path in [
        "/chaos/..%2F..%2Fetc/passwd.svg",
        "/chaos/..%2Foutside/secret.svg",
        "/chaos/2026-12-06T04-00-00/journal.json",
        "/chaos/../x.svg",
    ] {
        let (status, _, _) = http(base, "GET", path, &cookie, "").await;
        assert_eq!(status, 404, "{path}");
    }
    let (status, _, _) = http(base, "GET", "/chaos/2026-12-06T04-00-00/L2-01.svg", "", "").await;
    assert_eq!(status, 401, "charts are for signed-in people");
}

/// Opens `GET /live/overview` with `cookie` and reads only the status line; the stream stays
/// open while the returned connection lives.
async fn open_live(base: &str, cookie: &str) -> (u16, tokio::net::TcpStream) {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the console accepts");
    let request =
        format!("GET /live/overview HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("the console answers")
            .expect("read");
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_password_cannot_hold_every_session_nor_a_session_every_stream() {
    let stack = stack().await;
    let base = &stack.base;
    // The anonymous agent's password is public: signing in again and again keeps at most
    // MAX_PER_USER (4) of its sessions, so it cannot lock the people out.
    let mut cookies = Vec::new();
    for _ in 0..6 {
        let cookie = http_sign_in(base, "agent", "agent-dev")
            .await
            .expect("the agent signs in");
        cookies.push(cookie.split(';').next().expect("a cookie").to_owned());
    }
    eventually(PATIENCE, "at most four agent sessions", || async {
        let agents = connection_names(&stack.server)
            .await
            .into_iter()
            .filter(|n| n == "bulwark-console/agent")
            .count();
        (agents == 4).then_some(())
    })
    .await;
    let (status, _, _) = http(base, "GET", "/", &cookies[0], "").await;
    assert_eq!(status, 303, "the most idle agent session was ended");
    // One session holds at most eight live streams, each costing requests every refresh.
    let cookie = cookies.last().expect("a cookie");
    let mut open = Vec::new();
    for _ in 0..8 {
        let (status, stream) = open_live(base, cookie).await;
        assert_eq!(status, 200, "a live stream opens");
        open.push(stream);
    }
    let (status, _) = open_live(base, cookie).await;
    assert_eq!(status, 429, "a ninth stream is refused");
    drop(open);
    eventually(
        PATIENCE,
        "a stream again once the others closed",
        || async {
            let (status, _stream) = open_live(base, cookie).await;
            (status == 200).then_some(())
        },
    )
    .await;
}
