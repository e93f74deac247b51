//! A stand-in for Zoho Cliq that enforces per-(route, user) quotas the way Zoho does, and records
//! every call that reaches it.
//!
//! End-to-end tests put the real proxy in front of it and then ask it what happened: how many
//! calls each user made, whether any crossed a threshold (a *violation*, which on real Zoho locks
//! the user out), and exactly what bytes arrived. It is the oracle for the promise "never trip a
//! lock", so its rules are the strict reading of Zoho's: a sliding window of exactly `per` (no
//! safety margin), and every arrival counts, even ones it refuses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use percent_encoding::percent_decode_str;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::window::{max_in_any_window, template_matches, Quota, Verdict};

/// Zoho answers JSON with this exact content type.
const ZOHO_JSON: &str = "application/json;charset=UTF-8";

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// How Zoho says "throttled". The four bodies are the ones seen in the wild (see
/// ../shared/cliq-api.md, "Throttle signals seen"); the proxy must recognise every one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThrottleShape {
    /// 429 `{"message":"Too many requests within a certain time frame."}`
    Http429Plain,
    /// 429 `{"error":{"code":"rate_limit_exceeded","message":...}}`
    Http429Error,
    /// 400 `{"code":"request_limit_exceeded","message":"You have exceeded the URL throttle limits."}`
    Http400RequestLimit,
    /// 400 `{"code":"URL_ROLLING_THROTTLES_LIMIT_EXCEEDED","message":...}`
    Http400UrlThrottle,
}

impl ThrottleShape {
    /// Every shape, for tests that must cover them all.
    pub const ALL: [ThrottleShape; 4] = [
        ThrottleShape::Http429Plain,
        ThrottleShape::Http429Error,
        ThrottleShape::Http400RequestLimit,
        ThrottleShape::Http400UrlThrottle,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            ThrottleShape::Http429Plain | ThrottleShape::Http429Error => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ThrottleShape::Http400RequestLimit | ThrottleShape::Http400UrlThrottle => {
                StatusCode::BAD_REQUEST
            }
        }
    }

    /// The exact body bytes, so tests can check the proxy passes the first one on unchanged.
    pub fn body(self) -> &'static str {
        match self {
            ThrottleShape::Http429Plain => {
                r#"{"message":"Too many requests within a certain time frame."}"#
            }
            ThrottleShape::Http429Error => {
                r#"{"error":{"code":"rate_limit_exceeded","message":"Too many requests within a certain time frame."}}"#
            }
            ThrottleShape::Http400RequestLimit => {
                r#"{"code":"request_limit_exceeded","message":"You have exceeded the URL throttle limits."}"#
            }
            ThrottleShape::Http400UrlThrottle => {
                r#"{"code":"URL_ROLLING_THROTTLES_LIMIT_EXCEEDED","message":"You have exceeded the URL throttle limits."}"#
            }
        }
    }
}

/// The stub's idea of one endpoint's quota (what Zoho enforces, not what the proxy is told).
#[derive(Clone, Debug)]
pub struct StubRoute {
    /// `None` matches any method.
    pub method: Option<Method>,
    /// e.g. `"/api/v3/chats/{chat_id}/message"`; `{x}` matches one non-empty segment.
    pub template: &'static str,
    pub limit: u32,
    pub per: Duration,
    pub lock: Duration,
    pub signal: ThrottleShape,
    /// Sent as `Retry-After: <secs>` on throttle answers. Zoho documents none, hence the default.
    pub retry_after: Option<u64>,
    /// Throttle answers are gzip-encoded for requests that accept gzip, as a server that
    /// compresses its JSON would send them.
    pub gzip: bool,
}

impl StubRoute {
    /// A route answering throttles with [`ThrottleShape::Http429Plain`] and no Retry-After.
    pub fn new(
        method: Method,
        template: &'static str,
        limit: u32,
        per: Duration,
        lock: Duration,
    ) -> Self {
        StubRoute {
            method: Some(method),
            template,
            limit,
            per,
            lock,
            signal: ThrottleShape::Http429Plain,
            retry_after: None,
            gzip: false,
        }
    }

    pub fn gzip(mut self) -> Self {
        self.gzip = true;
        self
    }

    pub fn any_method(mut self) -> Self {
        self.method = None;
        self
    }

    pub fn signal(mut self, signal: ThrottleShape) -> Self {
        self.signal = signal;
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

/// A canned answer, for fault and pass-through tests.
#[derive(Clone, Debug)]
pub struct FixedResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl FixedResponse {
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        FixedResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A JSON answer with Zoho's content type.
    pub fn json(status: StatusCode, value: &serde_json::Value) -> Self {
        FixedResponse::new(status, value.to_string()).header("content-type", ZOHO_JSON)
    }

    /// Adds a header (repeatable: names may repeat). Panics on an invalid name or value, which is
    /// a mistake in the test's set-up.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::try_from(name).expect("valid header name in test set-up");
        let value = HeaderValue::try_from(value).expect("valid header value in test set-up");
        self.headers.push((name, value));
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        for (name, value) in self.headers {
            response.headers_mut().append(name, value);
        }
        response
    }
}

/// What the stub made of an arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Matched a route, within quota.
    Allowed,
    /// Matched a route and crossed its threshold: on real Zoho, this locks the user out.
    Violation,
    /// Matched a route while the user was locked out.
    Locked,
    /// Matched a route but carried no credential (answered 401, not counted).
    NoCredential,
    /// Matched no route (answered 200, not counted).
    Unmatched,
    /// The request body did not arrive in full (the sender went away); not counted.
    Incomplete,
}

/// One request as the stub received it.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// Increases by one per arrival over the stub's life (not reset by `clear`); the normal 200
    /// answer carries it, so a response can be tied to its arrival.
    pub seq: u64,
    /// When the request had been read in full, which is when Zoho can count it.
    pub at: Instant,
    pub version: Version,
    pub method: Method,
    /// Raw, as received: percent escapes untouched.
    pub path: String,
    /// Raw, as received, without the `?`.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The matched route's template.
    pub route: Option<String>,
    /// The user key (see [`UserKey`]).
    pub user: Option<String>,
    pub outcome: Outcome,
}

/// A custom user key: given the request headers and raw query, name the user (or `None`).
pub type UserKeyFn = Arc<dyn Fn(&HeaderMap, Option<&str>) -> Option<String> + Send + Sync>;

/// Whose quota an arrival counts against.
#[derive(Clone, Default)]
pub enum UserKey {
    /// The credential itself, verbatim: the token from `Authorization: Zoho-oauthtoken X` or
    /// `Bearer X`, else the percent-decoded `zapikey` query parameter. So the user of a call made
    /// with token `"alice"` is `"alice"`.
    #[default]
    Credential,
    /// The value of this header (e.g. `X-Cliq-User`), for header-identity tests.
    Header(HeaderName),
    /// Anything else, e.g. several tokens belonging to one user for resolve-mode tests (compose
    /// with [`credential`]).
    Custom(UserKeyFn),
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserKey::Credential => f.write_str("Credential"),
            UserKey::Header(name) => write!(f, "Header({name})"),
            UserKey::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl UserKey {
    fn user(&self, headers: &HeaderMap, query: Option<&str>) -> Option<String> {
        match self {
            UserKey::Credential => credential(headers, query),
            UserKey::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
            UserKey::Custom(key) => key(headers, query),
        }
    }
}

/// The credential a call carries, as Zoho reads it: the Authorization header (`Zoho-oauthtoken`
/// or `Bearer`, scheme case-insensitive) first, else the `zapikey` query parameter (webhook
/// tokens, ../shared/cliq-api.md).
pub fn credential(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(char::is_whitespace))
        .filter(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("zoho-oauthtoken") || scheme.eq_ignore_ascii_case("bearer")
        })
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .map(str::to_owned);
    from_header.or_else(|| {
        query?
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| *name == "zapikey")
            .map(|(_, value)| percent_decode_str(value).decode_utf8_lossy().into_owned())
            .filter(|token| !token.is_empty())
    })
}

/// Computes an answer for a call the stub served normally (allowed or unmatched); `None` falls
/// back to the default answer. Use it for endpoints with meaningful bodies, e.g. `/api/v2/me`.
pub type Responder = Arc<dyn Fn(&Arrival) -> Option<FixedResponse> + Send + Sync>;

/// Everything the stub knows; one lock, never held across an await.
struct State {
    routes: Vec<StubRoute>,
    user_key: UserKey,
    delay: Duration,
    fixed: Option<FixedResponse>,
    responder: Option<Responder>,
    echo: bool,
    quotas: HashMap<(String, String), Quota>,
    arrivals: Vec<Arrival>,
    next_seq: u64,
}

struct Shared {
    state: Mutex<State>,
    connections: AtomicUsize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere in a test must not turn every later stub call into a second panic;
        // the state is only ever updated whole, so it is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running stub. Dropping it stops the server.
pub struct ZohoStub {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl ZohoStub {
    /// Starts the stub on 127.0.0.1:0, serving HTTP/1.1 and h2c (prior knowledge).
    pub async fn start(routes: Vec<StubRoute>) -> ZohoStub {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stub on 127.0.0.1:0");
        let addr = listener.local_addr().expect("the stub's bound address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                routes,
                user_key: UserKey::default(),
                delay: Duration::ZERO,
                fixed: None,
                responder: None,
                echo: false,
                quotas: HashMap::new(),
                arrivals: Vec::new(),
                next_seq: 0,
            }),
            connections: AtomicUsize::new(0),
        });
        let server = tokio::spawn(serve(listener, Arc::clone(&shared)));
        ZohoStub {
            addr,
            shared,
            server: Mutex::new(Some(server)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for the proxy's `upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener and every open connection, so later calls are refused: the
    /// "upstream is down" case.
    pub async fn stop(&self) {
        let server = self
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(server) = server {
            server.abort();
            // Wait until the task is gone, so the port is really closed when this returns. The
            // only error possible is the cancellation just asked for.
            let _ = server.await;
        }
    }

    // ---- programming the stub ----

    pub fn set_routes(&self, routes: Vec<StubRoute>) {
        self.shared.state().routes = routes;
    }

    pub fn set_user_key(&self, user_key: UserKey) {
        self.shared.state().user_key = user_key;
    }

    /// Waits this long (after recording the arrival) before answering every call.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.state().delay = delay;
    }

    /// Answers every call with this, whatever the quota says (quotas are still counted, so
    /// violations are still seen). `None` restores normal answers.
    pub fn set_fixed_response(&self, fixed: Option<FixedResponse>) {
        self.shared.state().fixed = fixed;
    }

    /// See [`Responder`]. Consulted after the quota and before echo/default answers.
    pub fn set_responder(&self, responder: Option<Responder>) {
        self.shared.state().responder = responder;
    }

    /// Normal 200 answers echo the request as JSON (`seq`, `method`, `path`, `query`, `headers`
    /// as `[name, value]` pairs, `body_hex`) instead of `{"ok":true,"seq":N}`.
    pub fn set_echo(&self, echo: bool) {
        self.shared.state().echo = echo;
    }

    /// Forgets every arrival and every quota and lock: a fresh Zoho. Programming (routes, delay,
    /// fixed response, ...) is kept.
    pub fn clear(&self) {
        let mut state = self.shared.state();
        state.arrivals.clear();
        state.quotas.clear();
    }

    // ---- asking what happened ----

    /// Every arrival since start (or `clear`), in the order the stub judged them.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.state().arrivals.clone()
    }

    /// TCP connections accepted since start (to check connection reuse).
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Threshold crossings across all routes and users: must stay 0 behind the proxy.
    pub fn violations(&self) -> usize {
        self.count_where(|a| a.outcome == Outcome::Violation)
    }

    pub fn violations_for(&self, template: &str, user: &str) -> usize {
        self.count_where(|a| a.outcome == Outcome::Violation && is_for(a, template, user))
    }

    /// Calls that arrived while their user was locked out (answered with the throttle shape).
    pub fn rejected_while_locked(&self) -> usize {
        self.count_where(|a| a.outcome == Outcome::Locked)
    }

    pub fn rejected_while_locked_for(&self, template: &str, user: &str) -> usize {
        self.count_where(|a| a.outcome == Outcome::Locked && is_for(a, template, user))
    }

    /// Every arrival for this (route, user), whatever its outcome.
    pub fn count_for(&self, template: &str, user: &str) -> usize {
        self.count_where(|a| is_for(a, template, user))
    }

    /// The most arrivals for this (route, user) in any half-open window of length `window`
    /// (see [`max_in_any_window`]). `<= limit` over `per` is "no lock was tripped".
    pub fn max_in_any_window(&self, template: &str, user: &str, window: Duration) -> usize {
        let times: Vec<Instant> = self
            .shared
            .state()
            .arrivals
            .iter()
            .filter(|a| is_for(a, template, user))
            .map(|a| a.at)
            .collect();
        max_in_any_window(&times, window)
    }

    /// Arrival times for this (route, user), oldest first, to check pacing.
    pub fn times_for(&self, template: &str, user: &str) -> Vec<Instant> {
        self.shared
            .state()
            .arrivals
            .iter()
            .filter(|a| is_for(a, template, user))
            .map(|a| a.at)
            .collect()
    }

    /// When this (route, user)'s lock ends, if it is locked now.
    pub fn locked_until(&self, template: &str, user: &str) -> Option<Instant> {
        self.shared
            .state()
            .quotas
            .get(&(template.to_owned(), user.to_owned()))
            .and_then(|quota| quota.locked_until(Instant::now()))
    }

    fn count_where(&self, keep: impl Fn(&Arrival) -> bool) -> usize {
        self.shared
            .state()
            .arrivals
            .iter()
            .filter(|a| keep(a))
            .count()
    }
}

impl Drop for ZohoStub {
    fn drop(&mut self) {
        let server = self
            .server
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(server) = server {
            server.abort();
        }
    }
}

fn is_for(arrival: &Arrival, template: &str, user: &str) -> bool {
    arrival.route.as_deref() == Some(template) && arrival.user.as_deref() == Some(user)
}

/// The accept loop. Connections live in a `JoinSet` owned by this task, so aborting the task
/// (stop or drop) closes them too.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    // Small answers must not wait on Nagle + delayed ACK (~40 ms), which would
                    // blur the timings the tests measure. Failure only costs latency.
                    let _ = stream.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        let service = service_fn(move |request| {
                            let shared = Arc::clone(&shared);
                            async move { Ok::<_, Infallible>(answer(&shared, request).await) }
                        });
                        // The peer going away mid-connection is normal in fault tests.
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
            },
            // Reap finished connections so the set does not grow over a long test.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// What to send back, decided under the state lock and sent after it is released.
struct Plan {
    arrival: Arrival,
    delay: Duration,
    fixed: Option<FixedResponse>,
    responder: Option<Responder>,
    echo: bool,
    throttle: Option<(ThrottleShape, Option<u64>, bool)>,
}

/// One call: read it whole, judge and record it, then answer.
async fn answer(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    // Zoho can only count a call it has received, so judge after the body is in. A body that
    // never completes is still recorded (a test may want to know it started) but not counted.
    let body = body.collect().await.map(|collected| collected.to_bytes());
    let plan = judge(shared, parts, body);
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    respond(plan)
}

fn judge(shared: &Shared, parts: http::request::Parts, body: Result<Bytes, hyper::Error>) -> Plan {
    let mut state = shared.state();
    let at = Instant::now();
    let seq = state.next_seq;
    state.next_seq += 1;

    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let route = state
        .routes
        .iter()
        .find(|r| {
            r.method.as_ref().is_none_or(|m| *m == parts.method)
                && template_matches(r.template, &path)
        })
        .cloned();
    let user = state.user_key.user(&parts.headers, query.as_deref());

    let (outcome, body) = match (body, &route, &user) {
        (Err(_), _, _) => (Outcome::Incomplete, Bytes::new()),
        (Ok(body), None, _) => (Outcome::Unmatched, body),
        (Ok(body), Some(_), None) => (Outcome::NoCredential, body),
        (Ok(body), Some(route), Some(user)) => {
            let quota = state
                .quotas
                .entry((route.template.to_owned(), user.clone()))
                .or_default();
            let outcome = match quota.arrive(at, route.limit, route.per, route.lock) {
                Verdict::Allowed => Outcome::Allowed,
                Verdict::Violation => Outcome::Violation,
                Verdict::Locked => Outcome::Locked,
            };
            (outcome, body)
        }
    };

    let arrival = Arrival {
        seq,
        at,
        version: parts.version,
        method: parts.method,
        path,
        query,
        headers: parts.headers,
        body,
        route: route.as_ref().map(|r| r.template.to_owned()),
        user,
        outcome,
    };
    state.arrivals.push(arrival.clone());
    let throttle = match outcome {
        Outcome::Violation | Outcome::Locked => route.map(|r| {
            let gzip = r.gzip && accepts_gzip(&arrival.headers);
            (r.signal, r.retry_after, gzip)
        }),
        _ => None,
    };
    Plan {
        arrival,
        delay: state.delay,
        fixed: state.fixed.clone(),
        responder: state.responder.clone(),
        echo: state.echo,
        throttle,
    }
}

/// Precedence: fixed response (faults override everything), then Zoho's own refusals, then the
/// responder, then echo or the default `{"ok":true,"seq":N}`.
fn respond(plan: Plan) -> Response<Full<Bytes>> {
    if let Some(fixed) = plan.fixed {
        return fixed.into_response();
    }
    if let Some((shape, retry_after, gzip)) = plan.throttle {
        let mut fixed = if gzip {
            FixedResponse::new(shape.status(), gzipped(shape.body().as_bytes()))
                .header("content-encoding", "gzip")
        } else {
            FixedResponse::new(shape.status(), shape.body())
        }
        .header("content-type", ZOHO_JSON);
        if let Some(secs) = retry_after {
            fixed.headers.push((RETRY_AFTER, HeaderValue::from(secs)));
        }
        return fixed.into_response();
    }
    match plan.arrival.outcome {
        Outcome::NoCredential => {
            return FixedResponse::json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"code": "oauthtoken_missing", "message": "OAuth token missing"}),
            )
            .into_response();
        }
        Outcome::Incomplete => {
            // Nobody is left to read this; it only has to be a valid response.
            return FixedResponse::new(StatusCode::BAD_REQUEST, Bytes::new()).into_response();
        }
        Outcome::Allowed | Outcome::Unmatched | Outcome::Violation | Outcome::Locked => {}
    }
    if let Some(fixed) = plan
        .responder
        .and_then(|responder| responder(&plan.arrival))
    {
        return fixed.into_response();
    }
    let body = if plan.echo {
        echo_body(&plan.arrival)
    } else {
        serde_json::json!({"ok": true, "seq": plan.arrival.seq})
    };
    FixedResponse::json(StatusCode::OK, &body).into_response()
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("gzip"))
}

/// `body` gzip-encoded.
pub fn gzipped(body: &[u8]) -> Bytes {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).expect("gzip into memory");
    Bytes::from(encoder.finish().expect("gzip into memory"))
}

fn echo_body(arrival: &Arrival) -> serde_json::Value {
    let headers: Vec<[String; 2]> = arrival
        .headers
        .iter()
        .map(|(name, value)| {
            [
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ]
        })
        .collect();
    serde_json::json!({
        "seq": arrival.seq,
        "method": arrival.method.as_str(),
        "path": arrival.path,
        "query": arrival.query,
        "headers": headers,
        "body_hex": hex(&arrival.body),
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            // Writing to a String cannot fail.
            let _ = write!(out, "{b:02x}");
            out
        })
}
