//! The HTTP side: routes, sign-in and sign-out, the CSRF check on every POST, security headers,
//! and the live regions (server-sent events a task feeds from the person's NATS requests and
//! subscriptions; the browser never polls).
//!
//! Requests made for a person (all through their own connection): `watchdog.report`,
//! `storm_guard.status`, `htm.readiness`, `governance.review.pending`,
//! `governance.review.decide[.<user>]`, `unified_logic.proposals`, `unified_logic.vote[.<user>]`,
//! `htm.intent.status`, `clarity.query`, `clarity.verify`, `playbook.list`, `playbook.run`
//! (dry runs only). Subscriptions: `clarity.narrative.>` (narratives page), `mesh.breaker.>` and
//! `mesh.layer2.>` (overview, to refresh at once).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use bulwark_common::BulwarkConfig;
use bulwark_common::subjects;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::person::{Person, Refusal};
use crate::session::{MAX_STREAMS, Session, Sessions, random_token};
use crate::views::{self, Chrome};

/// The session cookie.
const SESSION_COOKIE: &str = "bulwark_session";
/// The sign-in form's CSRF cookie (double submit: the form carries the same value).
const LOGIN_COOKIE: &str = "bulwark_login";
/// Results of an intent search at most.
const SEARCH_LIMIT: usize = 50;

/// What every handler shares.
pub struct Shared {
    /// The configuration (NATS url, bound identities, console settings).
    pub cfg: BulwarkConfig,
    /// Signed-in sessions.
    pub sessions: Sessions,
    /// Cancelled when the console stops: live streams end.
    pub shutdown: CancellationToken,
    /// Sign-ins tried at once; one more is answered 503 (each opens a NATS connection, so the
    /// form is no fast password oracle).
    pub sign_ins: tokio::sync::Semaphore,
}

/// Sign-ins tried at once.
pub const MAX_SIGN_INS: usize = 4;
/// How long a refused sign-in waits before its answer.
const REFUSAL_DELAY: Duration = Duration::from_millis(500);

type AppState = Arc<Shared>;

/// The console's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/reviews", get(reviews_page))
        .route("/reviews/decide", post(decide))
        .route("/proposals", get(proposals_page))
        .route("/proposals/vote", post(vote))
        .route("/intents", get(intents_page))
        .route("/intents/{id}", get(intent_page))
        .route("/narratives", get(narratives_page))
        .route("/playbooks", get(playbooks_page))
        .route("/playbooks/dry-run", post(dry_run))
        .route("/chaos", get(chaos_page))
        .route("/chaos/{run}/{file}", get(chaos_chart))
        .route("/live/{region}", get(live))
        .route("/static/console.js", get(script))
        .route("/static/console.css", get(style))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        );
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../static/console.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../static/console.css"),
    )
        .into_response()
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn session(state: &Shared, headers: &HeaderMap) -> Option<(String, Arc<Session>)> {
    let token = cookie(headers, SESSION_COOKIE)?;
    state.sessions.get(token).map(|s| (token.to_owned(), s))
}

/// Equal in constant time (no early exit on the first differing byte).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn chrome(title: &str, s: &Session, notice: &str) -> Chrome {
    Chrome {
        title: title.to_owned(),
        user: s.person.user.clone(),
        csrf: s.csrf.clone(),
        notice: notice.to_owned(),
    }
}

fn render<T: Template>(t: &T) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "console: a template failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed to render",
            )
                .into_response()
        }
    }
}

fn render_fragment<T: Template>(t: &T) -> String {
    t.render().unwrap_or_else(|err| {
        tracing::error!(error = %err, "console: a region failed to render");
        "<p class=\"refused\">this part failed to render</p>".to_owned()
    })
}

fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

fn message(status: StatusCode, chrome: Chrome, class: &str, text: String, back: &str) -> Response {
    let mut r = render(&views::Message {
        chrome,
        class: class.to_owned(),
        text,
        back: back.to_owned(),
    });
    *r.status_mut() = status;
    r
}

fn refused(s: &Session, what: &str, refusal: &Refusal, back: &str) -> Response {
    let status = match refusal {
        Refusal::Permission { .. } => StatusCode::FORBIDDEN,
        Refusal::Service { code, .. } => match code.as_str() {
            "not_a_voter" | "self_vote" | "own_intent" | "identity_mismatch"
            | "identity_required" => StatusCode::FORBIDDEN,
            "unknown_intent" | "unknown_proposal" | "unknown_playbook" => StatusCode::NOT_FOUND,
            "no_pending_review" | "proposal_closed" | "duplicate_vote" | "already_running" => {
                StatusCode::CONFLICT
            }
            "unavailable" | "storage_full" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        },
        Refusal::NoAnswer { .. } => StatusCode::BAD_GATEWAY,
    };
    message(
        status,
        chrome(what, s, ""),
        "refused",
        format!("Refused: {refusal}"),
        back,
    )
}

fn forbidden_csrf(s: &Session) -> Response {
    message(
        StatusCode::FORBIDDEN,
        chrome("Refused", s, ""),
        "refused",
        "Refused: the form's CSRF token does not match this session (reload the page and try again)".into(),
        "/",
    )
}

/// Notices after a redirect: fixed texts chosen by a code, so a link cannot make the console
/// say anything else.
fn notice(done: Option<&str>) -> &'static str {
    match done {
        Some("approve") => "Approved.",
        Some("reject") => "Rejected.",
        Some("vote") => "Vote counted.",
        Some("signed_out") => "Signed out.",
        _ => "",
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Done {
    done: Option<String>,
}

// ---- sign-in and sign-out ----

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
    csrf: String,
}

fn login_response(status: StatusCode, error: String, user: String, notice_text: &str) -> Response {
    let token = random_token();
    let mut r = render(&views::Login {
        chrome: Chrome {
            title: "Sign in".into(),
            notice: notice_text.to_owned(),
            ..Default::default()
        },
        error,
        csrf: token.clone(),
        user,
    });
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={token}; Path=/login; HttpOnly; SameSite=Strict"
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

async fn login_page(Query(done): Query<Done>) -> Response {
    login_response(
        StatusCode::OK,
        String::new(),
        String::new(),
        notice(done.done.as_deref()),
    )
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !same(expected, &form.csrf) {
        return login_response(
            StatusCode::FORBIDDEN,
            "The sign-in form expired or came from another site: try again.".into(),
            form.user,
            "",
        );
    }
    let user = form.user.trim().to_owned();
    if user.is_empty() || form.password.is_empty() {
        return login_response(
            StatusCode::BAD_REQUEST,
            "Give your NATS user and password.".into(),
            user,
            "",
        );
    }
    let Ok(_permit) = state.sign_ins.try_acquire() else {
        return login_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many sign-ins at once: try again in a moment.".into(),
            user,
            "",
        );
    };
    // Signing in again replaces the session this browser had.
    if let Some(old) = cookie(&headers, SESSION_COOKIE) {
        state.sessions.end(old);
    }
    let person = match Person::sign_in(&state.cfg.nats, &user, &form.password).await {
        Ok(p) => p,
        Err(err) => {
            tracing::info!(user = %user, error = %err, "console: sign-in refused");
            tokio::time::sleep(REFUSAL_DELAY).await;
            return login_response(
                StatusCode::UNAUTHORIZED,
                format!("Sign-in refused: {err}"),
                user,
                "",
            );
        }
    };
    let Some((token, _)) = state.sessions.open(person.clone()) else {
        person.close().await;
        return login_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "The console holds its maximum of {} sessions (console.max_sessions): try again later.",
                state.cfg.console.max_sessions
            ),
            user,
            "",
        );
    };
    tracing::info!(user = %user, "console: signed in");
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let Some((token, s)) = session(&state, &headers) else {
        return to_login();
    };
    if !same(&s.csrf, &form.csrf) {
        return forbidden_csrf(&s);
    }
    state.sessions.end(&token);
    let mut r = Redirect::to("/login?done=signed_out").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("bulwark_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

// ---- regions ----

/// The live regions a page can subscribe to.
#[derive(Debug, Clone)]
enum Region {
    Overview,
    Reviews,
    Proposals,
    Intent(String),
    Narratives(NarrativeFilter),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct NarrativeFilter {
    who: String,
    what: String,
    intent: String,
    since: String,
}

impl NarrativeFilter {
    fn keeps(&self, n: &Value) -> bool {
        (self.who.is_empty() || n["who"] == self.who.as_str())
            && (self.what.is_empty() || n["what"] == self.what.as_str())
            && (self.intent.is_empty() || n["intent_id"] == self.intent.as_str())
    }

    fn query(&self) -> String {
        let mut q = Vec::new();
        for (k, v) in [
            ("who", &self.who),
            ("what", &self.what),
            ("intent", &self.intent),
            ("since", &self.since),
        ] {
            if !v.is_empty() {
                q.push(format!("{k}={}", url_encode(v)));
            }
        }
        q.join("&")
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Who speaks and where: a name bound to its credentials (governance.bound_identities) speaks
/// on its own subject `<plain>.<user>`, where the server vouches for it; anyone else on the
/// plain subject, under their user name.
fn speaking_subject(cfg: &BulwarkConfig, plain: &str, user: &str) -> String {
    let bound = &cfg.governance.bound_identities;
    if bound.iter().any(|b| b == "*" || b == user) {
        subjects::as_identity(plain, user)
    } else {
        plain.to_owned()
    }
}

/// How often a live intent page checks the whole chain again (`clarity.verify` reads every
/// record: once when the stream opens, then at most this often, never per refresh).
const VERIFY_EVERY: Duration = Duration::from_secs(30);

/// The chain check an intent page shows, asked at most every [`VERIFY_EVERY`].
#[derive(Default)]
struct ChainCheck {
    /// False for the page's first rendering (its stream checks at once).
    enabled: bool,
    asked: Option<std::time::Instant>,
    last: Option<Result<Value, Refusal>>,
}

impl ChainCheck {
    fn live() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }

    fn due(&self) -> bool {
        self.enabled && self.asked.is_none_or(|t| t.elapsed() >= VERIFY_EVERY)
    }

    /// What to show: a person who may not verify sees the per-record check only.
    fn shown(&self) -> Option<Result<Value, Refusal>> {
        match &self.last {
            Some(Err(Refusal::Permission { .. })) | None => None,
            Some(other) => Some(other.clone()),
        }
    }
}

async fn render_region(
    state: &Shared,
    s: &Session,
    region: &Region,
    chain: &mut ChainCheck,
) -> String {
    let p = &s.person;
    match region {
        Region::Overview => {
            let empty = json!({});
            let (report, storm, ready) = tokio::join!(
                p.request(subjects::WATCHDOG_REPORT, &empty),
                p.request(subjects::STORM_GUARD_STATUS, &empty),
                p.request(subjects::HTM_READINESS, &empty),
            );
            render_fragment(&views::overview(report, storm, ready))
        }
        Region::Reviews => {
            let reply = p
                .request(subjects::REVIEW_PENDING, &json!({"limit": 100}))
                .await;
            render_fragment(&views::reviews(reply, &s.csrf))
        }
        Region::Proposals => {
            let reply = p
                .request(subjects::PROPOSALS_OPEN, &json!({"limit": 100}))
                .await;
            render_fragment(&views::proposals(reply, &s.csrf))
        }
        Region::Intent(id) => {
            let by_id = json!({"intent_id": id});
            let query =
                json!({"intent_id": id, "limit": state.cfg.clarity.query_max_limit.min(1000)});
            let empty = json!({});
            let ask = chain.due();
            let (status, narratives, verified) = tokio::join!(
                p.request(subjects::INTENT_STATUS, &by_id),
                p.request(subjects::CLARITY_QUERY, &query),
                async {
                    match ask {
                        true => Some(p.request(subjects::CLARITY_VERIFY, &empty).await),
                        false => None,
                    }
                },
            );
            if let Some(v) = verified {
                chain.asked = Some(std::time::Instant::now());
                chain.last = Some(v);
            }
            render_fragment(&views::intent(status, narratives, chain.shown()))
        }
        Region::Narratives(_) => String::new(),
    }
}

/// A digest of a rendering (this process only: it compares a page's first rendering with its
/// stream's).
fn digest(html: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    html.hash(&mut h);
    h.finish()
}

fn live_url(region: &Region) -> String {
    match region {
        Region::Overview => "/live/overview".into(),
        Region::Reviews => "/live/reviews".into(),
        Region::Proposals => "/live/proposals".into(),
        Region::Intent(id) => format!("/live/intent?id={}", url_encode(id)),
        Region::Narratives(f) => format!("/live/narratives?{}", f.query()),
    }
}

async fn live_page(
    state: &Shared,
    s: &Session,
    title: &str,
    intro: &str,
    before: String,
    region: Region,
    done: Option<&str>,
) -> Response {
    let live = match &region {
        Region::Narratives(_) => "<p>Connecting…</p>".to_owned(),
        r => render_region(state, s, r, &mut ChainCheck::default()).await,
    };
    render(&views::LivePage {
        chrome: chrome(title, s, notice(done)),
        intro: intro.to_owned(),
        before,
        live_url: match &region {
            // The stream skips a first rendering equal to this one, so the page is not redrawn
            // (and its buttons replaced) for nothing.
            Region::Narratives(_) => live_url(&region),
            r => {
                let sep = if live_url(r).contains('?') { '&' } else { '?' };
                format!("{}{sep}h={:x}", live_url(r), digest(&live))
            }
        },
        live,
    })
}

async fn overview(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    live_page(&state, &s, "Overview", "The watchdog's Layer 2 report, the circuit breaker and the work queue, as you may see them; this page updates itself.", String::new(), Region::Overview, None).await
}

async fn reviews_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(done): Query<Done>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    live_page(&state, &s, "Reviews", "Intents waiting for a person (tier 0, low alignment, votes that timed out) and review records. You decide as yourself.", String::new(), Region::Reviews, done.done.as_deref()).await
}

async fn proposals_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(done): Query<Done>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    live_page(
        &state,
        &s,
        "Proposals",
        "Tier 3 intents waiting for the unified logic vote. You vote as yourself.",
        String::new(),
        Region::Proposals,
        done.done.as_deref(),
    )
    .await
}

async fn intent_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(done): Query<Done>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    live_page(
        &state,
        &s,
        &format!("Intent {id}"),
        "Its decision, history, result and narratives, each with its place in the audit chain.",
        String::new(),
        Region::Intent(id),
        done.done.as_deref(),
    )
    .await
}

async fn narratives_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(filter): Query<NarrativeFilter>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    let form = NarrativeForm { f: filter.clone() }
        .render()
        .unwrap_or_default();
    live_page(
        &state,
        &s,
        "Narratives",
        &format!(
            "The live 5W1H stream (clarity.narrative.>), newest first; the newest {} are kept.",
            state.cfg.console.live_narratives
        ),
        form,
        Region::Narratives(filter),
        None,
    )
    .await
}

#[derive(Template)]
#[template(
    source = "<form method=\"get\" action=\"/narratives\" class=\"search\"><label>Who <input name=\"who\" value=\"{{ f.who }}\"></label> <label>What <input name=\"what\" value=\"{{ f.what }}\"></label> <label>Intent <input name=\"intent\" value=\"{{ f.intent }}\"></label> <label>Since <input name=\"since\" value=\"{{ f.since }}\" placeholder=\"10m\"></label> <button type=\"submit\">Filter</button></form>",
    ext = "html"
)]
struct NarrativeForm {
    f: NarrativeFilter,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LiveQuery {
    id: String,
    who: String,
    what: String,
    intent: String,
    since: String,
    h: String,
}

async fn live(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(region): Path<String>,
    Query(q): Query<LiveQuery>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return (StatusCode::UNAUTHORIZED, "signed out").into_response();
    };
    let region = match region.as_str() {
        "overview" => Region::Overview,
        "reviews" => Region::Reviews,
        "proposals" => Region::Proposals,
        "intent" if !q.id.is_empty() => Region::Intent(q.id),
        "narratives" => Region::Narratives(NarrativeFilter {
            who: q.who,
            what: q.what,
            intent: q.intent,
            since: q.since,
        }),
        _ => return (StatusCode::NOT_FOUND, "no such live region").into_response(),
    };
    let Some(guard) = s.open_stream() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            format!("this session holds {MAX_STREAMS} live streams already: close a page"),
        )
            .into_response();
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(4);
    let task_state = state.clone();
    tokio::spawn(async move {
        let _guard = guard;
        match region {
            Region::Narratives(filter) => feed_narratives(task_state, s, filter, tx).await,
            other => feed_region(task_state, s, other, q.h, tx).await,
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Feeds a request-backed region: renders it every `console.refresh_s` (and at once when a
/// breaker or Layer 2 event arrives, for the overview) and sends it only when it changed (from
/// the page's own first rendering, whose digest is `shown`, too).
async fn feed_region(
    state: AppState,
    s: Arc<Session>,
    region: Region,
    shown: String,
    tx: tokio::sync::mpsc::Sender<Event>,
) {
    let every = Duration::from_secs_f64(state.cfg.console.refresh_s);
    let mut nudges = match region {
        Region::Overview => {
            let a = s.person.subscribe("mesh.breaker.>").await.ok();
            let b = s.person.subscribe("mesh.layer2.>").await.ok();
            match (a, b) {
                (Some(a), Some(b)) => Some(futures::stream::select(a, b).boxed()),
                (Some(a), None) => Some(a.boxed()),
                (None, Some(b)) => Some(b.boxed()),
                (None, None) => None,
            }
        }
        _ => None,
    };
    let mut last = String::new();
    let mut chain = ChainCheck::live();
    let mut shown = u64::from_str_radix(&shown, 16).ok();
    loop {
        let html = render_region(&state, &s, &region, &mut chain).await;
        if shown.take() == Some(digest(&html)) {
            last = html;
        } else if html != last {
            if tx.send(Event::default().data(html.clone())).await.is_err() {
                break;
            }
            last = html;
        }
        let nudge = async {
            match nudges.as_mut() {
                Some(n) => {
                    n.next().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = s.ended.cancelled() => {
                let _ = tx.send(Event::default().event("ended").data("signed out")).await;
                break;
            }
            _ = tx.closed() => break,
            _ = tokio::time::sleep(every) => {}
            _ = nudge => {}
        }
    }
}

/// Feeds the narratives region: the stored ones matching the filter first (`clarity.query`),
/// then every new one from `clarity.narrative.>`, keeping only the newest
/// `console.live_narratives` and counting the rest as skipped. Renders at most every
/// `console.refresh_s` / 4, so a flood costs one rendering per tick, never more memory.
async fn feed_narratives(
    state: AppState,
    s: Arc<Session>,
    filter: NarrativeFilter,
    tx: tokio::sync::mpsc::Sender<Event>,
) {
    let keep = state.cfg.console.live_narratives;
    let mut rows: VecDeque<views::NarrativeRow> = VecDeque::with_capacity(keep);
    let mut received: u64 = 0;
    let mut skipped: u64 = 0;
    let mut error = None;
    let mut sub = match s.person.subscribe(subjects::NARRATIVE_ALL).await {
        Ok(sub) => Some(sub),
        Err(e) => {
            error = Some(e.to_string());
            None
        }
    };
    let mut backlog = json!({"limit": keep.min(1000)});
    for (k, v) in [
        ("who", &filter.who),
        ("what", &filter.what),
        ("intent_id", &filter.intent),
        ("since", &filter.since),
    ] {
        if !v.is_empty() {
            backlog[k] = json!(v);
        }
    }
    match s.person.request(subjects::CLARITY_QUERY, &backlog).await {
        Ok(reply) => {
            for n in reply["items"].as_array().into_iter().flatten() {
                rows.push_front(views::narrative_row(n));
                rows.truncate(keep);
            }
        }
        Err(e) => error = Some(format!("clarity.query: {e}")),
    }
    let tick = Duration::from_secs_f64((state.cfg.console.refresh_s / 4.0).max(0.05));
    let mut dirty = true;
    let mut last = String::new();
    let mut ticker = tokio::time::interval(tick);
    loop {
        tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => break,
            _ = s.ended.cancelled() => {
                let _ = tx.send(Event::default().event("ended").data("signed out")).await;
                break;
            }
            _ = tx.closed() => break,
            msg = async {
                match sub.as_mut() {
                    Some(sub) => sub.next().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(msg) = msg else { sub = None; continue };
                let Ok(n) = serde_json::from_slice::<Value>(&msg.payload) else { continue };
                if !filter.keeps(&n) {
                    continue;
                }
                received += 1;
                rows.push_front(views::narrative_row(&n));
                if rows.len() > keep {
                    rows.pop_back();
                    skipped += 1;
                }
                dirty = true;
            }
            _ = ticker.tick() => {
                if let Some(reason) = s.person.subscription_refused(subjects::NARRATIVE_ALL) {
                    error = Some(format!("the NATS server refused {} for {}: {reason}", subjects::NARRATIVE_ALL, s.person.user));
                    sub = None;
                    dirty = true;
                }
                if !dirty {
                    continue;
                }
                dirty = false;
                let html = render_fragment(&views::NarrativesLive {
                    error: error.clone(),
                    received,
                    shown: rows.len(),
                    skipped,
                    rows: rows.iter().cloned().collect(),
                });
                if html != last {
                    if tx.send(Event::default().data(html.clone())).await.is_err() {
                        break;
                    }
                    last = html;
                }
            }
        }
    }
}

// ---- actions ----

#[derive(Deserialize)]
struct DecideForm {
    csrf: String,
    intent_id: String,
    decision: String,
    #[serde(default)]
    reason: String,
}

async fn decide(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<DecideForm>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    if !same(&s.csrf, &form.csrf) {
        return forbidden_csrf(&s);
    }
    let user = &s.person.user;
    let subject = speaking_subject(&state.cfg, subjects::REVIEW_DECIDE, user);
    let body = json!({"intent_id": form.intent_id, "decision": form.decision, "reviewer": user, "reason": form.reason});
    match s.person.request(&subject, &body).await {
        Ok(_) => {
            let done = if form.decision == "reject" {
                "reject"
            } else {
                "approve"
            };
            Redirect::to(&format!(
                "/intents/{}?done={done}",
                url_encode(&form.intent_id)
            ))
            .into_response()
        }
        Err(e) => refused(&s, "Review refused", &e, "/reviews"),
    }
}

#[derive(Deserialize)]
struct VoteForm {
    csrf: String,
    proposal_id: String,
    vote: String,
    #[serde(default)]
    reason: String,
}

async fn vote(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<VoteForm>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    if !same(&s.csrf, &form.csrf) {
        return forbidden_csrf(&s);
    }
    let user = &s.person.user;
    let subject = speaking_subject(&state.cfg, subjects::VOTE, user);
    let body = json!({"proposal_id": form.proposal_id, "voter": user, "vote": form.vote, "reason": form.reason});
    match s.person.request(&subject, &body).await {
        Ok(_) => Redirect::to("/proposals?done=vote").into_response(),
        Err(e) => refused(&s, "Vote refused", &e, "/proposals"),
    }
}

// ---- intents search ----

async fn intents_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<views::IntentQuery>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    let id = q.id.trim();
    if !id.is_empty() {
        return Redirect::to(&format!("/intents/{}", url_encode(id))).into_response();
    }
    let mut query = json!({"who": "governance", "what": "intent_routed", "limit": state.cfg.clarity.query_max_limit.min(1000)});
    if !q.since.trim().is_empty() {
        query["since"] = json!(q.since.trim());
    }
    let mut rows = Vec::new();
    let mut error = None;
    match s.person.request(subjects::CLARITY_QUERY, &query).await {
        Ok(reply) => {
            let items = reply["items"].as_array().cloned().unwrap_or_default();
            let want = |want: &str, have: &Value| {
                want.trim().is_empty() || views::text(have) == want.trim()
            };
            let candidates: Vec<&Value> = items
                .iter()
                .rev()
                .filter(|n| {
                    want(&q.actor, &n["context"]["actor"])
                        && want(&q.intent_type, &n["context"]["intent_type"])
                })
                .collect();
            // Current statuses, SEARCH_LIMIT requests at once, until the page is full.
            for chunk in candidates.chunks(SEARCH_LIMIT) {
                let person = &s.person;
                let statuses = futures::future::join_all(chunk.iter().map(|n| {
                    let body = json!({"intent_id": n["intent_id"]});
                    async move {
                        match person.request(subjects::INTENT_STATUS, &body).await {
                            Ok(st) => views::text(&st["status"]),
                            Err(e) => format!("({e})"),
                        }
                    }
                }))
                .await;
                for (n, status) in chunk.iter().zip(statuses) {
                    if !q.status.trim().is_empty() && status != q.status.trim() {
                        continue;
                    }
                    let c = &n["context"];
                    rows.push(views::IntentRow {
                        id: views::text(&n["intent_id"]),
                        intent_type: views::text(&c["intent_type"]),
                        actor: views::text(&c["actor"]),
                        tier: views::text(&c["autonomy_tier"]),
                        status,
                        when: views::text(&n["when"]),
                    });
                }
                if rows.len() >= SEARCH_LIMIT {
                    rows.truncate(SEARCH_LIMIT);
                    break;
                }
            }
        }
        Err(e) => error = Some(format!("clarity.query: {e}")),
    }
    render(&views::Intents {
        chrome: chrome("Intents", &s, ""),
        q,
        limit: SEARCH_LIMIT,
        error,
        rows,
    })
}

// ---- playbooks ----

async fn playbooks_view(
    state: &Shared,
    s: &Session,
    outcome: String,
    run_error: Option<String>,
) -> Response {
    let (rows, errors, error) = match s.person.request(subjects::PLAYBOOK_LIST, &json!({})).await {
        Ok(list) => {
            let (rows, errors) = views::playbooks(&list);
            (rows, errors, None)
        }
        Err(e) => (Vec::new(), Vec::new(), Some(format!("playbook.list: {e}"))),
    };
    let _ = state;
    render(&views::Playbooks {
        chrome: chrome("Playbooks", s, ""),
        error: run_error.or(error),
        outcome,
        rows,
        errors,
        csrf: s.csrf.clone(),
    })
}

async fn playbooks_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    playbooks_view(&state, &s, String::new(), None).await
}

#[derive(Deserialize)]
struct DryRunForm {
    csrf: String,
    playbook: String,
    #[serde(default)]
    params: String,
}

async fn dry_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<DryRunForm>,
) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    if !same(&s.csrf, &form.csrf) {
        return forbidden_csrf(&s);
    }
    let params: Value = if form.params.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str(&form.params) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return playbooks_view(
                    &state,
                    &s,
                    String::new(),
                    Some("params must be a JSON object".into()),
                )
                .await;
            }
        }
    };
    let body = json!({"playbook": form.playbook, "params": params, "dry_run": true});
    match s.person.request(subjects::PLAYBOOK_RUN, &body).await {
        Ok(outcome) => playbooks_view(&state, &s, views::pretty(&outcome), None).await,
        Err(e) => {
            playbooks_view(
                &state,
                &s,
                String::new(),
                Some(format!("playbook.run: {e}")),
            )
            .await
        }
    }
}

// ---- chaos ----

fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

async fn chaos_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some((_, s)) = session(&state, &headers) else {
        return to_login();
    };
    let dir = std::path::PathBuf::from(&state.cfg.console.chaos_reports);
    let runs = tokio::task::spawn_blocking(move || chaos_runs(&dir))
        .await
        .unwrap_or_default();
    render(&views::Chaos {
        chrome: chrome("Chaos", &s, ""),
        dir: state.cfg.console.chaos_reports.clone(),
        runs,
    })
}

/// The newest 20 reports under `dir` (folders holding a `journal.json`).
fn chaos_runs(dir: &std::path::Path) -> Vec<views::ChaosRun> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().join("journal.json").is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| safe_name(n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.reverse();
    names.truncate(20);
    names
        .into_iter()
        .map(|name| {
            let journal: Value = std::fs::read(dir.join(&name).join("journal.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            let scenarios = journal["scenarios"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|sc| {
                            let id = views::text(&sc["id"]);
                            let chart = if safe_name(&id)
                                && dir.join(&name).join(format!("{id}.svg")).is_file()
                            {
                                format!("/chaos/{name}/{id}.svg")
                            } else {
                                String::new()
                            };
                            (id, views::text(&sc["verdict"]).to_lowercase(), chart)
                        })
                        .collect()
                })
                .unwrap_or_default();
            views::ChaosRun {
                verdict: if journal["all_passed"] == true {
                    "pass".into()
                } else {
                    "fail".into()
                },
                written_at: views::text(&journal["written_at"]),
                command: views::text(&journal["command"]),
                scenarios,
                name,
            }
        })
        .collect()
}

async fn chaos_chart(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((run, file)): Path<(String, String)>,
) -> Response {
    if session(&state, &headers).is_none() {
        return (StatusCode::UNAUTHORIZED, "signed out").into_response();
    }
    if !safe_name(&run) || !safe_name(&file) || !file.ends_with(".svg") {
        return (StatusCode::NOT_FOUND, "no such chart").into_response();
    }
    let path = std::path::Path::new(&state.cfg.console.chaos_reports)
        .join(&run)
        .join(&file);
    match tokio::fs::read(&path).await {
        Ok(svg) => (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                // A chart is shown as an image; should one be opened directly, nothing in it runs.
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'; sandbox",
                ),
            ],
            svg,
        )
            .into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such chart").into_response(),
    }
}
