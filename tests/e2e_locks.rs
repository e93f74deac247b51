//! End to end: a lock that Zoho imposes anyway is honoured (SPEC promise 3, "Throttle signals
//! from Zoho").
//!
//! Zoho can lock a user out even when cliqgate is careful: another client outside cliqgate may
//! have used the user's quota. These tests make that happen for real: the stub (as Zoho) is given
//! a lower threshold than the proxy, and the "outside client" calls the stub directly. Then they
//! check what callers, the stub and `/metrics` see while the lock holds and after it ends.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::header::{self, HeaderValue};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The route that gets locked, as the stub and the proxy both name its path.
const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const CHAT_ROUTE: &str = "chats.post_message";
/// A second route for the same user, which a lock on [`CHAT`] must not touch.
const SEARCH: &str = "/api/v3/messages/search";
const SEARCH_ROUTE: &str = "messages.search";

/// The proxy's `lock` for [`CHAT`]: long enough for several local refusals and a scrape while it
/// holds, short enough to keep each test to a couple of seconds.
const LOCK: Duration = Duration::from_millis(1500);
/// The stub's (Zoho's) own window and lock: shorter than [`LOCK`], so Zoho would serve again
/// before cliqgate's lock ends. Calls refused meanwhile are refused by cliqgate, not by Zoho.
const STUB_PER: Duration = Duration::from_secs(1);
const STUB_LOCK: Duration = Duration::from_secs(1);
/// The stub's threshold: what the outside client used up before cliqgate's first call.
const STUB_LIMIT: u32 = 2;
/// The proxy's threshold and window: far above the stub's, so cliqgate's own limiter never
/// refuses anything in these tests and every refusal seen is a lock.
const PROXY_LIMIT: u32 = 10;
const PROXY_PER: &str = "10s";
/// Slack after a lock's computed end before a call is expected to flow again: scheduling jitter
/// on a loaded CI machine, not a property of the proxy.
const SETTLE: Duration = Duration::from_millis(250);
/// Calls made while a lock holds, each of which must be refused locally.
const CALLS_DURING_LOCK: usize = 3;

/// The proxy's config: [`CHAT`] and [`SEARCH`] with the given lock, reject mode (queue-mode
/// behaviour during a lock has its own test).
fn proxy_yaml(upstream: &str, lock: Duration) -> String {
    let lock_ms = lock.as_millis();
    config_yaml(
        upstream,
        &format!(
            "safety_margin: \"100ms\"
routes:
  - name: {CHAT_ROUTE}
    method: POST
    path: \"{CHAT}\"
    limit: {PROXY_LIMIT}
    per: \"{PROXY_PER}\"
    lock: \"{lock_ms}ms\"
    on_limit: reject
  - name: {SEARCH_ROUTE}
    method: GET
    path: \"{SEARCH}\"
    limit: {PROXY_LIMIT}
    per: \"{PROXY_PER}\"
    lock: \"{lock_ms}ms\"
    on_limit: reject
"
        ),
    )
}

fn chat_url(base: &str, chat: &str) -> String {
    format!("{base}/api/v3/chats/{chat}/message")
}

fn search_url(base: &str) -> String {
    format!("{base}/api/v3/messages/search?query=hello")
}

/// A sample that must be exported (a missing gauge or counter is itself a failure).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(text, name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in /metrics:\n{text}"))
}

/// Asserts `response` is cliqgate's own lock refusal: 429, Zoho's envelope with
/// `rate_limit_exceeded`, and a whole-second `Retry-After` (at least 1, at most `max_secs`)
/// matching `retry_after` in the body.
fn assert_local_refusal(response: &TestResponse, max_secs: u64) {
    assert_eq!(
        response.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        response.text()
    );
    let body = response.json();
    assert_eq!(body["code"], "rate_limit_exceeded", "{body}");
    let header: u64 = response
        .header("retry-after")
        .expect("a local refusal carries Retry-After")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!(
        (1..=max_secs).contains(&header),
        "Retry-After {header} not in 1..={max_secs}"
    );
    assert_eq!(body["retry_after"].as_u64(), Some(header), "{body}");
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{:?}",
        response.headers
    );
}

/// Whole seconds `d` rounds up to: the most a Retry-After during a lock of `d` may say.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The outside client uses alice's quota on the stub directly, then alice's next call through
/// cliqgate meets Zoho's throttle answer in `shape`.
async fn lock_is_honoured(shape: ThrottleShape) {
    let stub = ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, STUB_LIMIT, STUB_PER, STUB_LOCK).signal(shape),
        StubRoute::new(Method::GET, SEARCH, 100, STUB_PER, STUB_LOCK),
    ])
    .await;
    let running = start_proxy(&proxy_yaml(&stub.url(), LOCK)).await;
    let base = base_url(&running);
    let client = Client::new();

    // Another client, outside cliqgate, uses up alice's quota at Zoho.
    for _ in 0..STUB_LIMIT {
        let direct = client
            .post(&chat_url(&stub.url(), "C1"), "alice", "{}")
            .await;
        assert_eq!(direct.status, StatusCode::OK, "{}", direct.text());
    }

    // Alice's call through cliqgate is throttled by Zoho: passed on exactly as it came.
    let throttled = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    let locked_at = Instant::now();
    assert_eq!(throttled.status, shape.status(), "{shape:?}");
    assert_eq!(
        throttled.body,
        Bytes::from_static(shape.body().as_bytes()),
        "{shape:?}"
    );
    assert_eq!(
        throttled.header("content-type"),
        Some("application/json;charset=UTF-8")
    );
    assert_eq!(stub.violations_for(CHAT, "alice"), 1);
    let arrivals_at_lock = stub.count_for(CHAT, "alice");

    // While the lock holds, alice's calls to this route are answered locally, whatever the
    // chat id: Zoho locks the endpoint, not one path.
    for i in 0..CALLS_DURING_LOCK {
        let chat = if i % 2 == 0 { "C1" } else { "C2" };
        let refused = client.post(&chat_url(&base, chat), "alice", "{}").await;
        assert_local_refusal(&refused, ceil_secs(LOCK));
    }
    assert_eq!(
        stub.count_for(CHAT, "alice"),
        arrivals_at_lock,
        "a call for the locked (route, user) reached Zoho"
    );

    // Another user on the same route, and the same user on another route, are unaffected.
    let bob = client.post(&chat_url(&base, "C1"), "bob", "{}").await;
    assert_eq!(bob.status, StatusCode::OK, "{}", bob.text());
    let search = client.get(&search_url(&base), "alice").await;
    assert_eq!(search.status, StatusCode::OK, "{}", search.text());

    let during = scrape(running.admin_addr).await;
    let route = [("route", CHAT_ROUTE)];
    assert_eq!(
        sample(&during, "cliqgate_upstream_throttled_total", &route),
        1.0
    );
    assert_eq!(
        sample(
            &during,
            "cliqgate_requests_total",
            &[("route", CHAT_ROUTE), ("decision", "locked")]
        ),
        CALLS_DURING_LOCK as f64
    );
    assert_eq!(sample(&during, "cliqgate_locks_active", &route), 1.0);
    assert_eq!(
        sample(&during, "cliqgate_locks_active", &[("route", SEARCH_ROUTE)]),
        0.0
    );
    assert_eq!(
        sample(
            &during,
            "cliqgate_upstream_throttled_total",
            &[("route", SEARCH_ROUTE)]
        ),
        0.0
    );
    assert!(
        locked_at.elapsed() < LOCK,
        "the checks during the lock took longer than the lock; they prove nothing"
    );

    // The lock started before the throttle answer reached alice, so it has ended by now.
    tokio::time::sleep_until(locked_at + LOCK + SETTLE).await;
    let after = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.text());
    assert_eq!(stub.count_for(CHAT, "alice"), arrivals_at_lock + 1);

    let later = scrape(running.admin_addr).await;
    assert_eq!(sample(&later, "cliqgate_locks_active", &route), 0.0);
    assert_eq!(
        sample(&later, "cliqgate_upstream_throttled_total", &route),
        1.0
    );
    assert_eq!(
        sample(
            &later,
            "cliqgate_requests_total",
            &[("route", CHAT_ROUTE), ("decision", "locked")]
        ),
        CALLS_DURING_LOCK as f64
    );
    // Only the one call that met the outside client's lock was ever a violation at Zoho.
    assert_eq!(stub.violations(), 1);
    assert_eq!(stub.rejected_while_locked(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_429_locks_the_user_out_of_the_route() {
    lock_is_honoured(ThrottleShape::Http429Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_exceeded_429_locks_the_user_out_of_the_route() {
    lock_is_honoured(ThrottleShape::Http429Error).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limit_exceeded_400_locks_the_user_out_of_the_route() {
    lock_is_honoured(ThrottleShape::Http400RequestLimit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_throttles_limit_exceeded_400_locks_the_user_out_of_the_route() {
    lock_is_honoured(ThrottleShape::Http400UrlThrottle).await;
}

/// Clients ask for gzip by default (python-requests, Node's fetch), and a server that compresses
/// its JSON sends the throttle answer gzip-encoded: its code must still be found, and the answer
/// passed on as it came. Codings cliqgate cannot read (brotli) are not asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_encoded_throttle_answer_locks_the_user_out() {
    let shape = ThrottleShape::Http400RequestLimit;
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        STUB_LIMIT,
        STUB_PER,
        STUB_LOCK,
    )
    .signal(shape)
    .gzip()])
    .await;
    let running = start_proxy(&proxy_yaml(&stub.url(), LOCK)).await;
    let base = base_url(&running);
    let client = Client::new();
    let gzip_post = |url: String| {
        let mut req = request(Method::POST, &url, Some("alice"), Bytes::from_static(b"{}"));
        req.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip, deflate"),
        );
        req
    };
    for _ in 0..STUB_LIMIT {
        let direct = client.send(gzip_post(chat_url(&stub.url(), "C1"))).await;
        assert_eq!(direct.status, StatusCode::OK, "{}", direct.text());
    }

    let throttled = client.send(gzip_post(chat_url(&base, "C1"))).await;
    assert_eq!(throttled.status, shape.status());
    assert_eq!(throttled.header("content-encoding"), Some("gzip"));
    assert_eq!(
        throttled.body,
        gzipped(shape.body().as_bytes()),
        "passed on as it came"
    );
    let arrivals_at_lock = stub.count_for(CHAT, "alice");
    // Asked of Zoho only in codings whose start cliqgate can read (not brotli).
    let last = stub
        .arrivals()
        .pop()
        .expect("the throttled call reached the stub");
    assert_eq!(
        last.headers
            .get(header::ACCEPT_ENCODING)
            .map(|v| v.as_bytes()),
        Some(&b"gzip, deflate"[..])
    );

    let refused = client.send(gzip_post(chat_url(&base, "C2"))).await;
    assert_local_refusal(&refused, ceil_secs(LOCK));
    assert_eq!(
        stub.count_for(CHAT, "alice"),
        arrivals_at_lock,
        "sent into the lock"
    );
    assert_eq!(stub.rejected_while_locked(), 0);
    running.shutdown().await;
}

/// How long the stub (as Zoho) takes to answer in the hang-up tests: long enough for the caller
/// to leave after its call has reached Zoho and before the answer, on a loaded machine too.
const SLOW_ANSWER: Duration = Duration::from_secs(1);
/// The proxy's `lock` in the hang-up tests: long enough to hold through the wait for the
/// answer and the checks after it.
const HANGUP_LOCK: Duration = Duration::from_secs(6);

/// The caller leaves: half-closes its connection, then reads to its end. The end comes once
/// cliqgate has dropped the call (it takes the half-close for a hang-up), so no answer can reach
/// the caller after this returns.
async fn hang_up(stream: &mut tokio::net::TcpStream) {
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("cliqgate closes the connection of a caller that left")
        .expect("the connection ends cleanly");
    assert!(rest.is_empty(), "answered after the caller left");
}

/// A caller on its way out (see [`Leave`]).
enum Leaving {
    Connection(tokio::net::TcpStream),
    Stream(tokio::task::JoinHandle<()>),
}

/// How the caller of the hang-up tests leaves.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// HTTP/1.1: closes its connection.
    CloseConnection,
    /// HTTP/2: cancels its stream (RST_STREAM), the connection stays.
    ResetStream,
}

/// Alice's call reaches Zoho, which locks her out, but she leaves before the answer comes:
/// cliqgate still reads Zoho's answer and learns the lock, so her next call is refused here
/// instead of being sent into the lock.
/// The stub of the hang-up tests: Zoho's threshold of [`STUB_LIMIT`] on [`CHAT`], its lock
/// answered with a 429.
async fn hang_up_stub() -> ZohoStub {
    ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        STUB_LIMIT,
        STUB_PER,
        STUB_LOCK,
    )
    .signal(ThrottleShape::Http429Error)])
    .await
}

/// An outside client uses up alice's quota at Zoho, Zoho's answers slow down, and alice's call
/// goes through the proxy; returns when, once the call has reached Zoho (which counted it and
/// locked alice) and before Zoho answers, its caller has left as `leave` says.
async fn leave_before_zoho_answers(
    stub: &ZohoStub,
    running: &cliqgate::app::Running,
    h2: &Client,
    leave: Leave,
) -> Instant {
    let base = base_url(running);
    let client = Client::new();
    for _ in 0..STUB_LIMIT {
        let direct = client
            .post(&chat_url(&stub.url(), "C1"), "alice", "{}")
            .await;
        assert_eq!(direct.status, StatusCode::OK, "{}", direct.text());
    }
    stub.set_delay(SLOW_ANSWER);

    let body = "{}";
    let mut leaving = match leave {
        Leave::CloseConnection => {
            let raw = format!(
                "POST /api/v3/chats/C1/message HTTP/1.1\r\nHost: cliq\r\n\
                 Authorization: Zoho-oauthtoken alice\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let mut stream = tokio::net::TcpStream::connect(running.proxy_addr)
                .await
                .unwrap();
            stream.write_all(raw.as_bytes()).await.unwrap();
            Leaving::Connection(stream)
        }
        Leave::ResetStream => {
            // The client (its connection) stays; only the call's future is dropped.
            let url = chat_url(&base, "C1");
            let caller = h2.clone();
            Leaving::Stream(tokio::spawn(async move {
                caller.post(&url, "alice", body).await;
            }))
        }
    };
    // The call has reached Zoho (which counted it and locked alice); its answer is on the way.
    wait_for("alice's call to reach Zoho", Duration::from_secs(5), || {
        let arrived = stub.count_for(CHAT, "alice") == STUB_LIMIT as usize + 1;
        async move { arrived }
    })
    .await;
    let left_at = Instant::now();
    match &mut leaving {
        Leaving::Connection(stream) => hang_up(stream).await,
        Leaving::Stream(call) => call.abort(),
    }
    assert_eq!(stub.violations_for(CHAT, "alice"), 1);
    let reached_zoho = *stub
        .times_for(CHAT, "alice")
        .last()
        .expect("alice's call at the stub");
    assert!(
        left_at < reached_zoho + SLOW_ANSWER,
        "the caller left only after Zoho had answered: this run proves nothing"
    );

    left_at
}

async fn lock_is_learned_after_the_caller_left(leave: Leave) {
    let stub = hang_up_stub().await;
    let running = start_proxy(&proxy_yaml(&stub.url(), HANGUP_LOCK)).await;
    let base = base_url(&running);
    let client = Client::new();
    let h2 = Client::h2c();
    let left_at = leave_before_zoho_answers(&stub, &running, &h2, leave).await;

    // Zoho's answer comes after the caller left; cliqgate learns the lock from it all the same.
    let metrics = running.admin_addr;
    wait_for("the lock to be learned", SLOW_ANSWER * 4, || async move {
        metric_value(
            &scrape(metrics).await,
            "cliqgate_upstream_throttled_total",
            &[("route", CHAT_ROUTE)],
        ) == Some(1.0)
    })
    .await;
    assert!(
        left_at.elapsed() < HANGUP_LOCK - SETTLE,
        "the lock was learned too late for the check below to mean anything"
    );
    stub.set_delay(Duration::ZERO);
    let refused = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_local_refusal(&refused, ceil_secs(HANGUP_LOCK));
    assert_eq!(
        stub.count_for(CHAT, "alice"),
        STUB_LIMIT as usize + 1,
        "a call for the locked (route, user) reached Zoho"
    );
    assert_eq!(stub.rejected_while_locked(), 0);
    let text = scrape(running.admin_addr).await;
    assert_eq!(
        sample(
            &text,
            "cliqgate_upstream_responses_total",
            &[("route", CHAT_ROUTE), ("code", "429")]
        ),
        1.0
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_learned_when_the_caller_closes_its_connection_before_the_answer() {
    lock_is_learned_after_the_caller_left(Leave::CloseConnection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_learned_when_the_caller_resets_its_http2_stream_before_the_answer() {
    lock_is_learned_after_the_caller_left(Leave::ResetStream).await;
}

/// A rolling restart right after a caller left: the process stops only once the call that
/// went out has its answer (within the shutdown timeout), so the lock Zoho imposed is in the
/// state file and the next process refuses alice's next call instead of sending it into the
/// lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_learned_after_the_caller_left_survives_a_restart_at_once() {
    let stub = hang_up_stub().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = dir.path().join("cliqgate.state");
    let yaml = format!(
        "{}store:\n  kind: memory\n  state_file: \"{}\"\n",
        proxy_yaml(&stub.url(), HANGUP_LOCK),
        state.display()
    );
    let running = start_proxy(&yaml).await;
    let h2 = Client::h2c();
    leave_before_zoho_answers(&stub, &running, &h2, Leave::CloseConnection).await;
    running.shutdown().await;

    stub.set_delay(Duration::ZERO);
    let restarted = start_proxy(&yaml).await;
    let refused = Client::new()
        .post(&chat_url(&base_url(&restarted), "C1"), "alice", "{}")
        .await;
    assert_local_refusal(&refused, ceil_secs(HANGUP_LOCK));
    assert_eq!(
        stub.count_for(CHAT, "alice"),
        STUB_LIMIT as usize + 1,
        "a call for the locked (route, user) reached Zoho after the restart"
    );
    assert_eq!(stub.rejected_while_locked(), 0);
    restarted.shutdown().await;
}

/// A raw "Zoho" for the test below: answers every call with a 400 whose head goes out at once
/// and whose body, which holds the throttle code, only when `release` is notified. Counts the
/// calls it received; notifies `head_sent` after each head.
async fn zoho_with_a_slow_error_body(
    calls: Arc<AtomicUsize>,
    head_sent: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (calls, head_sent, release) = (calls.clone(), head_sent.clone(), release.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The test's calls carry a two-byte body: the head's end plus two bytes.
                while request
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .is_none_or(|end| request.len() < end + 4 + 2)
                {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                calls.fetch_add(1, Ordering::SeqCst);
                let body = r#"{"code":"rate_limit_exceeded","message":"Too many requests"}"#;
                let head = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                head_sent.notify_one();
                release.notified().await;
                let _ = stream.write_all(body.as_bytes()).await;
                // Held open: the test ends it.
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    addr
}

/// Zoho's answer head (a 400) is in, and its body, which holds the throttle code, is still on
/// its way when the caller leaves: the body is still read and the lock learned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_learned_when_the_caller_leaves_while_the_error_body_is_read() {
    let calls = Arc::new(AtomicUsize::new(0));
    let head_sent = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let zoho = zoho_with_a_slow_error_body(calls.clone(), head_sent.clone(), release.clone()).await;
    let running = start_proxy(&proxy_yaml(&format!("http://{zoho}"), HANGUP_LOCK)).await;

    let raw = "POST /api/v3/chats/C1/message HTTP/1.1\r\nHost: cliq\r\n\
               Authorization: Zoho-oauthtoken alice\r\nContent-Length: 2\r\n\r\n{}";
    let mut caller = tokio::net::TcpStream::connect(running.proxy_addr)
        .await
        .unwrap();
    caller.write_all(raw.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), head_sent.notified())
        .await
        .expect("the call reached Zoho");
    // cliqgate has the answer's head (it counts the status when the head is in) and now reads
    // the body for a throttle code: that is when the caller leaves.
    let admin = running.admin_addr;
    let code_400 = [("route", CHAT_ROUTE), ("code", "400")];
    wait_for(
        "the answer's head at cliqgate",
        Duration::from_secs(5),
        || async move {
            metric_value(
                &scrape(admin).await,
                "cliqgate_upstream_responses_total",
                &code_400,
            ) == Some(1.0)
        },
    )
    .await;
    // From here on the body can only be read by the work handed over.
    hang_up(&mut caller).await;
    release.notify_one();

    wait_for(
        "the lock to be learned",
        Duration::from_secs(5),
        || async move {
            metric_value(
                &scrape(admin).await,
                "cliqgate_upstream_throttled_total",
                &[("route", CHAT_ROUTE)],
            ) == Some(1.0)
        },
    )
    .await;
    let refused = Client::new()
        .post(&chat_url(&base_url(&running), "C1"), "alice", "{}")
        .await;
    assert_local_refusal(&refused, ceil_secs(HANGUP_LOCK));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a call reached the locked Zoho"
    );
    running.shutdown().await;
}

/// Which test above covers each shape. Exhaustive on purpose: a shape added to the stub fails to
/// compile here until it has a test.
fn test_covering(shape: ThrottleShape) -> &'static str {
    match shape {
        ThrottleShape::Http429Plain => "plain_429_locks_the_user_out_of_the_route",
        ThrottleShape::Http429Error => "rate_limit_exceeded_429_locks_the_user_out_of_the_route",
        ThrottleShape::Http400RequestLimit => {
            "request_limit_exceeded_400_locks_the_user_out_of_the_route"
        }
        ThrottleShape::Http400UrlThrottle => {
            "url_throttles_limit_exceeded_400_locks_the_user_out_of_the_route"
        }
    }
}

#[test]
fn every_throttle_shape_has_a_test() {
    let covered: std::collections::HashSet<_> =
        ThrottleShape::ALL.into_iter().map(test_covering).collect();
    assert_eq!(covered.len(), ThrottleShape::ALL.len());
}

/// Zoho's Retry-After, in whole seconds on the stub's throttle answers: longer than the route's
/// `lock` ([`SHORT_LOCK`]), so it decides how long cliqgate holds off.
const UPSTREAM_RETRY_AFTER_SECS: u64 = 2;
/// The route's own lock, shorter than Zoho's Retry-After.
const SHORT_LOCK: Duration = Duration::from_millis(500);
/// A moment past [`SHORT_LOCK`] and before Zoho's Retry-After runs out.
const PAST_SHORT_LOCK: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_retry_after_longer_than_lock_extends_the_lock() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        1,
        SHORT_LOCK,
        SHORT_LOCK,
    )
    .retry_after(UPSTREAM_RETRY_AFTER_SECS)])
    .await;
    let running = start_proxy(&proxy_yaml(&stub.url(), SHORT_LOCK)).await;
    let base = base_url(&running);
    let client = Client::new();

    let direct = client
        .post(&chat_url(&stub.url(), "C1"), "alice", "{}")
        .await;
    assert_eq!(direct.status, StatusCode::OK);
    let throttled = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    let locked_at = Instant::now();
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        throttled.body,
        Bytes::from_static(ThrottleShape::Http429Plain.body().as_bytes())
    );
    // Zoho's own Retry-After reaches the caller with the rest of its answer.
    assert_eq!(
        throttled.header("retry-after"),
        Some(UPSTREAM_RETRY_AFTER_SECS.to_string().as_str())
    );
    let arrivals_at_lock = stub.count_for(CHAT, "alice");

    // Past the route's lock, Zoho's Retry-After still holds.
    tokio::time::sleep_until(locked_at + PAST_SHORT_LOCK).await;
    let refused = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_local_refusal(&refused, UPSTREAM_RETRY_AFTER_SECS);
    assert_eq!(stub.count_for(CHAT, "alice"), arrivals_at_lock);
    let during = scrape(running.admin_addr).await;
    assert_eq!(
        sample(&during, "cliqgate_locks_active", &[("route", CHAT_ROUTE)]),
        1.0
    );

    tokio::time::sleep_until(locked_at + Duration::from_secs(UPSTREAM_RETRY_AFTER_SECS) + SETTLE)
        .await;
    let after = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.text());
    assert_eq!(stub.count_for(CHAT, "alice"), arrivals_at_lock + 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_that_are_not_throttles_do_not_lock() {
    // Zoho's ordinary refusals, including one that mentions a throttle code only in its message
    // and one whose body is not JSON.
    let answers: Vec<(StatusCode, &'static str)> = vec![
        (
            StatusCode::BAD_REQUEST,
            r#"{"code":"invalid_parameters","message":"rate_limit_exceeded is not a parameter"}"#,
        ),
        (
            StatusCode::BAD_REQUEST,
            r#"{"error":{"code":"invalid.inputs.submitted","message":"Invalid inputs"}}"#,
        ),
        (
            StatusCode::UNAUTHORIZED,
            r#"{"code":"oauthtoken_invalid","message":"Invalid OAuth token"}"#,
        ),
        (
            StatusCode::FORBIDDEN,
            r#"{"code":"access_denied","message":"No access"}"#,
        ),
        (
            StatusCode::NOT_FOUND,
            r#"{"code":"chat_not_found","message":"No such chat"}"#,
        ),
        (
            StatusCode::BAD_REQUEST,
            "request_limit_exceeded, but not JSON",
        ),
    ];
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        100,
        STUB_PER,
        STUB_LOCK,
    )])
    .await;
    let running = start_proxy(&proxy_yaml(&stub.url(), LOCK)).await;
    let base = base_url(&running);
    let client = Client::new();

    for (i, (status, body)) in answers.iter().enumerate() {
        stub.set_fixed_response(Some(
            FixedResponse::new(*status, *body).header("content-type", "application/json"),
        ));
        let answer = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
        assert_eq!(answer.status, *status, "{body}");
        assert_eq!(answer.body, Bytes::from_static(body.as_bytes()));
        assert_eq!(stub.count_for(CHAT, "alice"), i + 1, "{body}: not sent");
    }
    // The next call still goes to Zoho: nothing was locked.
    stub.set_fixed_response(None);
    let ok = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(stub.count_for(CHAT, "alice"), answers.len() + 1);

    let metrics = scrape(running.admin_addr).await;
    let route = [("route", CHAT_ROUTE)];
    assert_eq!(
        sample(&metrics, "cliqgate_upstream_throttled_total", &route),
        0.0
    );
    assert_eq!(sample(&metrics, "cliqgate_locks_active", &route), 0.0);
    assert_eq!(
        sample(
            &metrics,
            "cliqgate_requests_total",
            &[("route", CHAT_ROUTE), ("decision", "locked")]
        ),
        0.0
    );
    running.shutdown().await;
}

/// The queue test's route: two calls per [`QUEUE_PER`] (+ 100ms safety margin), so a third call
/// is queued for about that long.
const QUEUE_PER: Duration = Duration::from_secs(1);
/// Its lock: long enough to cover the queued call's slot (about [`QUEUE_PER`] away) with room.
const QUEUE_LOCK: Duration = Duration::from_secs(3);
/// How long the stub sits on the throttled call: the third call is queued meanwhile, before
/// cliqgate learns of the lock. Shorter than [`QUEUE_PER`], so the lock is learned before the
/// queued call's slot comes.
const THROTTLE_ANSWER_DELAY: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_call_whose_slot_comes_during_a_lock_is_refused_and_never_sent() {
    // Zoho allows one call where cliqgate allows two: the second is throttled.
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        1,
        Duration::from_secs(10),
        Duration::from_secs(10),
    )])
    .await;
    let yaml = config_yaml(
        &stub.url(),
        &format!(
            "safety_margin: \"100ms\"
routes:
  - name: {CHAT_ROUTE}
    method: POST
    path: \"{CHAT}\"
    limit: 2
    per: \"{}ms\"
    lock: \"{}ms\"
    on_limit: queue
    max_wait: \"5s\"
",
            QUEUE_PER.as_millis(),
            QUEUE_LOCK.as_millis()
        ),
    );
    let running = start_proxy(&yaml).await;
    let base = base_url(&running);
    let client = Client::new();
    let admin = running.admin_addr;
    let queue_depth = move || async move {
        let text = scrape(admin).await;
        sample(&text, "cliqgate_queue_depth", &[("route", CHAT_ROUTE)])
    };

    let first = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());

    // The second call is throttled by Zoho, slowly.
    stub.set_delay(THROTTLE_ANSWER_DELAY);
    let second = tokio::spawn({
        let (client, url) = (client.clone(), chat_url(&base, "C1"));
        async move { client.post(&url, "alice", "{}").await }
    });
    wait_for("the second call at the stub", CLIENT_TIMEOUT, || async {
        stub.count_for(CHAT, "alice") == 2
    })
    .await;
    stub.set_delay(Duration::ZERO);

    // The third is queued (the window holds two sends) before the lock is known.
    let third = tokio::spawn({
        let (client, url) = (client.clone(), chat_url(&base, "C1"));
        async move { client.post(&url, "alice", "{}").await }
    });
    wait_for(
        "the third call to be queued",
        THROTTLE_ANSWER_DELAY,
        || async { queue_depth().await == 1.0 },
    )
    .await;

    let second = second.await.expect("second call task");
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        second.body,
        Bytes::from_static(ThrottleShape::Http429Plain.body().as_bytes())
    );

    // Its slot comes during the lock: refused locally, never sent.
    let third = third.await.expect("third call task");
    assert_local_refusal(&third, ceil_secs(QUEUE_LOCK));
    assert_eq!(stub.count_for(CHAT, "alice"), 2, "the queued call was sent");
    assert_eq!(queue_depth().await, 0.0);

    let metrics = scrape(running.admin_addr).await;
    let decision = |d: &str| {
        sample(
            &metrics,
            "cliqgate_requests_total",
            &[("route", CHAT_ROUTE), ("decision", d)],
        )
    };
    assert_eq!(decision("locked"), 1.0);
    assert_eq!(decision("forwarded"), 2.0);
    assert_eq!(decision("delayed"), 0.0);
    assert_eq!(
        sample(
            &metrics,
            "cliqgate_upstream_throttled_total",
            &[("route", CHAT_ROUTE)]
        ),
        1.0
    );
    running.shutdown().await;
}

/// Larger than anything cliqgate reads from an error body ([`cliqgate::throttle::MAX_ERROR_PREFIX`])
/// by orders of magnitude: a buffered or truncated body would show.
const LARGE_BODY: usize = 5 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_pass_through_whole() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        100,
        STUB_PER,
        STUB_LOCK,
    )])
    .await;
    let running = start_proxy(&proxy_yaml(&stub.url(), LOCK)).await;
    let base = base_url(&running);
    let client = Client::new();
    let body: Bytes = (0..LARGE_BODY).map(|i| (i % 251) as u8).collect();

    // A success body is streamed, never read for a throttle code.
    stub.set_fixed_response(Some(FixedResponse::new(StatusCode::OK, body.clone())));
    let ok = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.body.len(), LARGE_BODY);
    assert!(ok.body == body, "the 2xx body changed on the way");

    // A client error's body is read only up to its prefix, and the rest still streams through.
    stub.set_fixed_response(Some(FixedResponse::new(
        StatusCode::BAD_REQUEST,
        body.clone(),
    )));
    let bad = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body.len(), LARGE_BODY);
    assert!(bad.body == body, "the 4xx body changed on the way");

    let metrics = scrape(running.admin_addr).await;
    assert_eq!(
        sample(
            &metrics,
            "cliqgate_upstream_throttled_total",
            &[("route", CHAT_ROUTE)]
        ),
        0.0
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_code_at_the_start_of_a_large_body_is_recognised_and_the_body_passed_whole() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        100,
        STUB_PER,
        STUB_LOCK,
    )])
    .await;
    let running = start_proxy(&proxy_yaml(&stub.url(), LOCK)).await;
    let base = base_url(&running);
    let client = Client::new();
    // Only the start of the body is read, so this cannot be parsed as JSON: the code is found by
    // searching the prefix.
    let mut body = br#"{"code":"request_limit_exceeded","message":"You have exceeded the URL throttle limits.","pad":""#.to_vec();
    body.resize(LARGE_BODY - 2, b'x');
    body.extend_from_slice(br#""}"#);
    let body = Bytes::from(body);
    stub.set_fixed_response(Some(FixedResponse::new(
        StatusCode::BAD_REQUEST,
        body.clone(),
    )));

    let throttled = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_eq!(throttled.status, StatusCode::BAD_REQUEST);
    assert!(
        throttled.body == body,
        "the throttle body changed on the way"
    );
    let refused = client.post(&chat_url(&base, "C1"), "alice", "{}").await;
    assert_local_refusal(&refused, ceil_secs(LOCK));
    assert_eq!(stub.count_for(CHAT, "alice"), 1);
    let metrics = scrape(running.admin_addr).await;
    assert_eq!(
        sample(
            &metrics,
            "cliqgate_upstream_throttled_total",
            &[("route", CHAT_ROUTE)]
        ),
        1.0
    );
    running.shutdown().await;
}
