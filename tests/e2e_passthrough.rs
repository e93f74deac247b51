//! End to end: what goes through cliqgate untouched, what it strips, and what it answers itself.
//!
//! The real proxy (`app::start`) runs on 127.0.0.1:0 in front of the Zoho stub on 127.0.0.1:0.
//! SPEC promise 5 ("bodies, query strings and end-to-end headers pass through byte for byte") is
//! checked against the stub's recorded arrivals; hop-by-hop hygiene against RFC 9110 section
//! 7.6.1; cliqgate's own answers against SPEC "What callers see".

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Version};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Long enough for a retry, if the proxy made one, to reach a loopback upstream; the test then
/// asserts that none did. Loopback round trips take well under a millisecond.
const RETRY_SETTLE: Duration = Duration::from_millis(500);

/// The stub's answer delay in the timeout test: far beyond the proxy's `timeouts.response` of
/// [`SHORT_RESPONSE_TIMEOUT`], so only the proxy's timeout can end the call.
const SLOW_UPSTREAM_DELAY: Duration = Duration::from_secs(5);
const SHORT_RESPONSE_TIMEOUT: &str = "300ms";

/// Route names, templates and thresholds shared by the proxy config and the stub.
const EDIT: &str = "/api/v2/chats/{chat_id}/messages/{message_id}";
const ME: &str = "/api/v2/me";
const POST_MESSAGE: &str = "/api/v3/chats/{chat_id}/message";
const LIMIT: u32 = 100;

/// Routes with thresholds far above what any test here sends, so the limiter never interferes.
fn routes_yaml() -> String {
    format!(
        "routes:
  - name: messages.edit
    method: PUT
    path: \"{EDIT}\"
    limit: {LIMIT}
    per: \"1m\"
    lock: \"5m\"
    on_limit: reject
  - name: users.me
    method: GET
    path: \"{ME}\"
    limit: {LIMIT}
    per: \"1m\"
    lock: \"5m\"
    on_limit: reject
  - name: chats.post_message
    method: POST
    path: \"{POST_MESSAGE}\"
    limit: {LIMIT}
    per: \"1m\"
    lock: \"5m\"
    on_limit: reject
"
    )
}

fn stub_routes() -> Vec<StubRoute> {
    let minute = Duration::from_secs(60);
    let lock = Duration::from_secs(300);
    vec![
        StubRoute::new(Method::PUT, EDIT, LIMIT, minute, lock),
        StubRoute::new(Method::GET, ME, LIMIT, minute, lock),
        StubRoute::new(Method::POST, POST_MESSAGE, LIMIT, minute, lock),
    ]
}

/// The stub with [`stub_routes`], and the proxy in front of it with [`routes_yaml`] plus `extra`
/// (top-level YAML keys).
async fn stub_and_proxy(extra: &str) -> (ZohoStub, cliqgate::app::Running) {
    let stub = ZohoStub::start(stub_routes()).await;
    let running = start_proxy(&config_yaml(
        &stub.url(),
        &format!("{extra}{}", routes_yaml()),
    ))
    .await;
    (stub, running)
}

/// The one arrival the stub has seen; fails the test if there is not exactly one.
fn only_arrival(stub: &ZohoStub) -> Arrival {
    let arrivals = stub.arrivals();
    assert_eq!(
        arrivals.len(),
        1,
        "expected exactly one call at the stub, got {:#?}",
        arrivals
    );
    arrivals.into_iter().next().expect("one arrival")
}

/// Every value of `name`, in order, as bytes.
fn all_values(headers: &HeaderMap, name: &str) -> Vec<Vec<u8>> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect()
}

/// Bytes that are not UTF-8 (every byte value, 0xff and lone continuation bytes included),
/// `len` long, in a pattern that makes a shifted or truncated copy unequal.
fn binary_body(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// Asserts cliqgate's own error answer: status, Zoho envelope with `code`, JSON content type.
fn assert_zoho_error(response: &TestResponse, status: StatusCode, code: &str) {
    assert_eq!(response.status, status, "body: {}", response.text());
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?}"
    );
    let body = response.json();
    assert_eq!(body["code"], code, "body: {body}");
    assert!(body["message"].is_string(), "body: {body}");
}

/// A raw HTTP/1.1 response, as read by [`raw_exchange`].
struct RawResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl RawResponse {
    /// Parses a status line, fields and a Content-Length or chunked body. Panics (failing the
    /// test) on anything else: cliqgate's answers are always one of those.
    fn parse(raw: &[u8]) -> RawResponse {
        let text = String::from_utf8_lossy(raw);
        let head_end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {text:?}"));
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, Vec<u8>)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()))
            .collect();
        let rest = &raw[head_end + 4..];
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case(b"chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            let length = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<usize>().ok())
                .unwrap_or(rest.len());
            rest[..length.min(rest.len())].to_vec()
        };
        RawResponse {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

// ---- 1. byte-exact pass-through ----

const ESCAPED_PATH: &str = "/api/v2/chats/C1/messages/a%20b%2Fc";
const RAW_QUERY: &str = "message_ids=a%20b,c&x=%2B&empty=&dup=1&dup=2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_raw_path_raw_query_body_and_headers_reach_zoho_byte_for_byte() {
    let (stub, running) = stub_and_proxy("").await;
    // A few MiB of non-UTF-8 bytes: more than any one read or frame, so it streams in pieces.
    let body = binary_body(3 * 1024 * 1024 + 17);
    let url = format!("{}{ESCAPED_PATH}?{RAW_QUERY}", base_url(&running));
    let mut req = request(Method::PUT, &url, Some("alice"), body.clone());
    let headers = req.headers_mut();
    headers.insert("x-foo", HeaderValue::from_static("bar baz"));
    for value in ["one", "two", "three"] {
        headers.append("x-multi", HeaderValue::from_static(value));
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let response = Client::new().send(req).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());

    let arrival = only_arrival(&stub);
    assert_eq!(arrival.method, Method::PUT);
    assert_eq!(arrival.path, ESCAPED_PATH);
    assert_eq!(arrival.query.as_deref(), Some(RAW_QUERY));
    assert_eq!(arrival.body.len(), body.len());
    assert!(arrival.body == body, "body bytes differ");
    assert_eq!(
        all_values(&arrival.headers, "x-foo"),
        vec![b"bar baz".to_vec()]
    );
    assert_eq!(
        all_values(&arrival.headers, "x-multi"),
        vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
    );
    assert_eq!(
        all_values(&arrival.headers, "authorization"),
        vec![b"Zoho-oauthtoken alice".to_vec()]
    );
    assert_eq!(
        all_values(&arrival.headers, "content-type"),
        vec![b"application/octet-stream".to_vec()]
    );
    assert_eq!(arrival.outcome, Outcome::Allowed);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_are_case_insensitive_and_repeated_fields_keep_their_order() {
    let (stub, running) = stub_and_proxy("").await;
    // Raw bytes, so the mixed-case names and the obs-text value really are on the wire.
    let mut raw = Vec::new();
    raw.extend_from_slice(
        b"GET /api/v2/me HTTP/1.1\r\n\
          Host: cliq.zoho.com\r\n\
          Authorization: Zoho-oauthtoken alice\r\n\
          X-MiXeD-CaSe: first\r\n\
          X-Other: between\r\n\
          x-mixed-case: second\r\n\
          X-MIXED-CASE: third\r\n\
          X-Opaque: caf",
    );
    raw.extend_from_slice(b"\xe9 \xff\r\nConnection: close\r\n\r\n");
    let answer = RawResponse::parse(&raw_exchange(running.proxy_addr, &raw).await);
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );

    let arrival = only_arrival(&stub);
    assert_eq!(
        all_values(&arrival.headers, "x-mixed-case"),
        vec![b"first".to_vec(), b"second".to_vec(), b"third".to_vec()]
    );
    assert_eq!(
        all_values(&arrival.headers, "x-other"),
        vec![b"between".to_vec()]
    );
    assert_eq!(
        all_values(&arrival.headers, "x-opaque"),
        vec![b"caf\xe9 \xff".to_vec()]
    );
    running.shutdown().await;
}

/// Zoho-ish headers a caller may depend on, names repeated on purpose.
fn custom_response(status: StatusCode, body: Vec<u8>) -> FixedResponse {
    FixedResponse::new(status, body)
        .header("content-type", "application/x-cliq; charset=binary")
        .header("x-zoho-request-id", "req-42")
        .header("set-cookie", "a=1; Path=/")
        .header("set-cookie", "b=2; Path=/; HttpOnly")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("cache-control", "no-store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zoho_status_body_and_headers_reach_the_caller_unchanged_plus_ratelimit_fields() {
    let (stub, running) = stub_and_proxy("").await;
    // 201 streams straight through; 404 and 500 are error answers whose body prefix cliqgate
    // reads to look for a throttle signal, and must still replay whole.
    for status in [
        StatusCode::CREATED,
        StatusCode::NOT_FOUND,
        StatusCode::INTERNAL_SERVER_ERROR,
    ] {
        let body = binary_body(10_000 + usize::from(status.as_u16()));
        let fixed = custom_response(status, body.clone());
        stub.set_fixed_response(Some(fixed.clone()));
        let url = format!("{}/api/v2/me", base_url(&running));
        let response = Client::new().get(&url, "alice").await;

        assert_eq!(response.status, status);
        assert!(response.body == body, "{status}: body bytes differ");
        for (name, _) in &fixed.headers {
            let sent: Vec<&HeaderValue> = fixed
                .headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v)
                .collect();
            let got: Vec<&HeaderValue> = response.headers.get_all(name).iter().collect();
            assert_eq!(got, sent, "{status}: header {name}");
        }
        assert_eq!(
            response.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        let ratelimit = response.header("ratelimit").unwrap_or_default();
        assert!(ratelimit.starts_with("\"users.me\";r="), "{ratelimit:?}");
        assert!(
            response
                .header("ratelimit-policy")
                .is_some_and(|p| p.starts_with("\"users.me\";q=100;w=")),
            "{:?}",
            response.headers
        );
    }
    assert_eq!(stub.arrivals().len(), 3);
    running.shutdown().await;
}

// ---- 2. hop-by-hop fields stay on their hop (RFC 9110 section 7.6.1) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_fields_never_reach_zoho() {
    let (stub, running) = stub_and_proxy("").await;
    let raw = b"GET /api/v2/me HTTP/1.1\r\n\
        Host: cliq.zoho.com\r\n\
        Authorization: Zoho-oauthtoken alice\r\n\
        Connection: close, X-Hop\r\n\
        X-Hop: secret\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Upgrade: websocket\r\n\
        Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
        Proxy-Connection: keep-alive\r\n\
        X-End-To-End: kept\r\n\
        \r\n";
    let answer = RawResponse::parse(&raw_exchange(running.proxy_addr, raw).await);
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );

    let arrival = only_arrival(&stub);
    for name in [
        "x-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !arrival.headers.contains_key(name),
            "{name} reached Zoho: {:?}",
            arrival.headers
        );
    }
    // The caller's Connection field belongs to the caller's hop; the proxy may only send its own.
    for value in all_values(&arrival.headers, "connection") {
        let value = String::from_utf8_lossy(&value).to_ascii_lowercase();
        assert!(!value.contains("x-hop"), "connection: {value}");
    }
    assert_eq!(
        all_values(&arrival.headers, "x-end-to-end"),
        vec![b"kept".to_vec()]
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_fields_never_reach_the_caller() {
    let (stub, running) = stub_and_proxy("").await;
    stub.set_fixed_response(Some(
        FixedResponse::new(StatusCode::OK, "{\"ok\":true}")
            .header("content-type", "application/json")
            .header("connection", "X-Resp-Hop")
            .header("x-resp-hop", "secret")
            .header("keep-alive", "timeout=5, max=100")
            .header("proxy-authenticate", "Basic realm=\"zoho\"")
            .header("x-end-to-end", "kept"),
    ));
    // Asked directly, the stub really does send them (so their absence below is the proxy's doing).
    let direct = Client::new()
        .get(&format!("{}/api/v2/me", stub.url()), "alice")
        .await;
    for name in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            direct.headers.contains_key(name),
            "stub did not send {name}"
        );
    }
    let url = format!("{}/api/v2/me", base_url(&running));
    let response = Client::new().get(&url, "alice").await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.text(), "{\"ok\":true}");
    for name in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            !response.headers.contains_key(name),
            "{name} reached the caller: {:?}",
            response.headers
        );
    }
    for value in response.headers.get_all("connection") {
        let value = value.to_str().unwrap_or_default().to_ascii_lowercase();
        assert!(!value.contains("x-resp-hop"), "connection: {value}");
    }
    assert_eq!(response.header("x-end-to-end"), Some("kept"));
    running.shutdown().await;
}

// ---- 3. no open proxy: Host, absolute form, CONNECT, no forwarding fields ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_becomes_the_upstream_authority_and_no_forwarding_fields_are_added() {
    let (stub, running) = stub_and_proxy("").await;
    let url = format!("{}/api/v2/me", base_url(&running));
    let mut req = request(Method::GET, &url, Some("alice"), Bytes::new());
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("evil.example:8443"));
    let response = Client::new().send(req).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());

    let arrival = only_arrival(&stub);
    assert_eq!(
        all_values(&arrival.headers, "host"),
        vec![stub.addr().to_string().into_bytes()]
    );
    for name in [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "via",
        "forwarded",
    ] {
        assert!(
            !arrival.headers.contains_key(name),
            "{name} was added: {:?}",
            arrival.headers
        );
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_request_still_goes_to_the_configured_upstream() {
    let (stub, running) = stub_and_proxy("").await;
    let raw = b"GET http://evil.example/api/v2/me?x=1 HTTP/1.1\r\n\
        Host: evil.example\r\n\
        Authorization: Zoho-oauthtoken alice\r\n\
        Connection: close\r\n\
        \r\n";
    let answer = RawResponse::parse(&raw_exchange(running.proxy_addr, raw).await);
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );

    let arrival = only_arrival(&stub);
    assert_eq!(arrival.path, "/api/v2/me");
    assert_eq!(arrival.query.as_deref(), Some("x=1"));
    assert_eq!(
        all_values(&arrival.headers, "host"),
        vec![stub.addr().to_string().into_bytes()]
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_with_400_in_zoho_format() {
    let (stub, running) = stub_and_proxy("").await;
    let raw = b"CONNECT evil.example:443 HTTP/1.1\r\n\
        Host: evil.example:443\r\n\
        Authorization: Zoho-oauthtoken alice\r\n\
        Connection: close\r\n\
        \r\n";
    let answer = RawResponse::parse(&raw_exchange(running.proxy_addr, raw).await);
    assert_eq!(answer.status, 400);
    assert!(answer
        .header("content-type")
        .is_some_and(|v| v.starts_with("application/json")));
    assert_eq!(answer.json()["code"], "invalid_request");
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

// ---- 4. upstream failures ----

/// A loopback port with nothing listening: bound, then released.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    listener.local_addr().expect("bound address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502_upstream_unavailable() {
    let addr = closed_port().await;
    let running = start_proxy(&config_yaml(&format!("http://{addr}"), &routes_yaml())).await;
    let client = Client::new();
    // A limited route and an unmatched (forwarded) path: both fail the same way.
    let limited = client
        .get(&format!("{}/api/v2/me", base_url(&running)), "alice")
        .await;
    assert_zoho_error(&limited, StatusCode::BAD_GATEWAY, "upstream_unavailable");
    let unmatched = client
        .get(&format!("{}/api/v2/elsewhere", base_url(&running)), "alice")
        .await;
    assert_zoho_error(&unmatched, StatusCode::BAD_GATEWAY, "upstream_unavailable");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_upstream_timeout() {
    let (stub, running) = stub_and_proxy(&format!(
        "timeouts:\n  response: \"{SHORT_RESPONSE_TIMEOUT}\"\n"
    ))
    .await;
    stub.set_delay(SLOW_UPSTREAM_DELAY);
    let response = Client::new()
        .get(&format!("{}/api/v2/me", base_url(&running)), "alice")
        .await;
    assert_zoho_error(&response, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
    assert_eq!(stub.arrivals().len(), 1);
    running.shutdown().await;
}

/// Everything the proxy sends on `stream` until it closes it, as text.
async fn answer_until_close(stream: &mut tokio::net::TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

/// `timeouts.response` is the upstream's time to answer once it has the request: a caller that
/// takes longer than that to send its body (pausing less than `client_body` each time) is not
/// cut off with a 504 that would blame Zoho.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_slower_than_the_response_timeout_still_gets_its_answer() {
    let (stub, running) = stub_and_proxy(&format!(
        "timeouts:\n  response: \"{SHORT_RESPONSE_TIMEOUT}\"\n  client_body: \"5s\"\n"
    ))
    .await;
    let pieces = 8;
    let gap = Duration::from_millis(100);
    let head = format!(
        "POST /api/v3/chats/C1/message HTTP/1.1\r\nHost: cliq.zoho.com\r\n\
         Authorization: Zoho-oauthtoken alice\r\nContent-Length: {pieces}\r\n\
         Connection: close\r\n\r\n"
    );
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(running.proxy_addr)
        .await
        .expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    for _ in 0..pieces {
        tokio::time::sleep(gap).await;
        stream.write_all(b"x").await.expect("a piece of the body");
    }
    let answer = answer_until_close(&mut stream).await;
    // The body took longer than the response timeout (800 ms against 300 ms).
    assert!(started.elapsed() >= gap * pieces);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(only_arrival(&stub).body.len(), pieces as usize);
    running.shutdown().await;
}

/// An upstream that answers `100 Continue` as soon as it has a request's head (servers may,
/// without `Expect`), then reads the whole body and answers with the number of body bytes.
async fn continue_early_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let Some(len) = read_request(&mut stream, &mut buf).await else {
                    return;
                };
                let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
                let body = format!("{}", len - head_end - 4);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A `100 Continue` that comes while the body is still on its way is an interim answer: the
/// rest of the body is sent, and the final answer is the one the caller gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_answer_during_the_body_does_not_cut_the_body_off() {
    let addr = continue_early_upstream().await;
    let running = start_proxy(&config_yaml(&format!("http://{addr}"), &routes_yaml())).await;
    let head = "POST /api/v3/chats/C1/message HTTP/1.1\r\nHost: cliq.zoho.com\r\n\
         Authorization: Zoho-oauthtoken alice\r\nContent-Length: 100\r\n\
         Connection: close\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(running.proxy_addr)
        .await
        .expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&[b'x'; 10]).await.expect("the first part");
    // The upstream's 100 Continue arrives while the rest of the body is still with the caller.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(&[b'x'; 90]).await.expect("the rest");
    let answer = answer_until_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n100"),
        "the upstream got the whole body: {answer}"
    );
    running.shutdown().await;
}

// ---- 5. size limits ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_body_over_max_body_bytes_is_413_and_never_forwarded() {
    let (stub, running) = stub_and_proxy("http:\n  max_body_bytes: 1024\n").await;
    let url = format!("{}/api/v3/chats/C1/message", base_url(&running));
    let response = Client::new().post(&url, "alice", vec![b'x'; 2000]).await;
    assert_zoho_error(
        &response,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    // Just under the limit still goes.
    let response = Client::new().post(&url, "alice", vec![b'x'; 1024]).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let arrival = only_arrival(&stub);
    assert_eq!(arrival.body.len(), 1024);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_max_body_bytes_is_413_and_zoho_never_gets_it_whole() {
    let (stub, running) = stub_and_proxy("http:\n  max_body_bytes: 1024\n").await;
    let mut raw = b"POST /api/v3/chats/C1/message HTTP/1.1\r\n\
        Host: cliq.zoho.com\r\n\
        Authorization: Zoho-oauthtoken alice\r\n\
        Transfer-Encoding: chunked\r\n\
        Connection: close\r\n\
        \r\n"
        .to_vec();
    for _ in 0..4 {
        raw.extend_from_slice(b"200\r\n");
        raw.extend_from_slice(&[b'y'; 0x200]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let answer = RawResponse::parse(&raw_exchange(running.proxy_addr, &raw).await);
    assert_eq!(
        answer.status,
        413,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["code"], "payload_too_large");
    // The body streams, so Zoho may have seen its start; it must never have seen it complete
    // (an incomplete request is one Zoho cannot act on or count).
    for arrival in stub.arrivals() {
        assert_eq!(arrival.outcome, Outcome::Incomplete, "{arrival:?}");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_fields_over_max_header_bytes_are_431_and_never_forwarded() {
    let (stub, running) = stub_and_proxy("http:\n  max_header_bytes: 2048\n").await;
    let url = format!("{}/api/v2/me", base_url(&running));
    let mut req = request(Method::GET, &url, Some("alice"), Bytes::new());
    let big = "a".repeat(4096);
    req.headers_mut()
        .insert("x-big", HeaderValue::from_str(&big).expect("ASCII"));
    let response = Client::new().send(req).await;
    assert_zoho_error(
        &response,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
    );
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    // A caller error, as when the head is too large for the server to read at all.
    let metrics = scrape(running.admin_addr).await;
    let reason = [("reason", "headers_too_large")];
    assert_eq!(
        metric_value(&metrics, "cliqgate_caller_errors_total", &reason),
        Some(1.0)
    );
    running.shutdown().await;
}

// ---- 6. credentials ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_route_without_credential_is_401_and_never_forwarded() {
    let (stub, running) = stub_and_proxy("").await;
    let url = format!("{}/api/v2/me", base_url(&running));
    let response = Client::new()
        .send(request(Method::GET, &url, None, Bytes::new()))
        .await;
    assert_zoho_error(&response, StatusCode::UNAUTHORIZED, "oauthtoken_missing");
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zapikey_in_the_query_is_a_credential_and_passes_through_untouched() {
    let (stub, running) = stub_and_proxy("").await;
    let query = "x=1&zapikey=1001.abc%2Bdef%3D&y=%20";
    let url = format!("{}/api/v2/me?{query}", base_url(&running));
    let response = Client::new()
        .send(request(Method::GET, &url, None, Bytes::new()))
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert!(response.header("ratelimit").is_some());

    let arrival = only_arrival(&stub);
    assert_eq!(arrival.query.as_deref(), Some(query));
    assert_eq!(arrival.user.as_deref(), Some("1001.abc+def="));
    assert!(!arrival.headers.contains_key(header::AUTHORIZATION));
    running.shutdown().await;
}

// ---- 7. unmatched calls ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_forward_passes_unknown_paths_without_limit_or_ratelimit_fields() {
    let (stub, running) = stub_and_proxy("unmatched: forward\n").await;
    let url = format!("{}/api/v2/not/a/route?q=%41", base_url(&running));
    // No credential either: an unlimited call is not charged to anyone.
    let response = Client::new()
        .send(request(Method::DELETE, &url, None, Bytes::new()))
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert!(!response.headers.contains_key("ratelimit"));
    assert!(!response.headers.contains_key("ratelimit-policy"));

    let arrival = only_arrival(&stub);
    assert_eq!(arrival.method, Method::DELETE);
    assert_eq!(arrival.path, "/api/v2/not/a/route");
    assert_eq!(arrival.query.as_deref(), Some("q=%41"));
    assert_eq!(arrival.outcome, Outcome::Unmatched);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_reject_answers_403_and_never_forwards() {
    let (stub, running) = stub_and_proxy("unmatched: reject\n").await;
    let url = format!("{}/api/v2/not/a/route", base_url(&running));
    let response = Client::new().get(&url, "alice").await;
    assert_zoho_error(&response, StatusCode::FORBIDDEN, "route_not_allowed");
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

// ---- 8. h2c ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_caller_gets_the_same_answer_and_zoho_sees_http_1_1() {
    let (stub, running) = stub_and_proxy("").await;
    stub.set_echo(true);
    let url = format!("{}{ESCAPED_PATH}?{RAW_QUERY}", base_url(&running));
    let body = binary_body(100_000);
    let mut answers = Vec::new();
    for client in [Client::new(), Client::h2c()] {
        let mut req = request(Method::PUT, &url, Some("alice"), body.clone());
        req.headers_mut()
            .insert("x-foo", HeaderValue::from_static("bar"));
        answers.push(client.send(req).await);
    }
    let (h1, h2) = (&answers[0], &answers[1]);
    assert_eq!(h1.version, Version::HTTP_11);
    assert_eq!(h2.version, Version::HTTP_2);
    assert_eq!((h1.status, h2.status), (StatusCode::OK, StatusCode::OK));
    let (mut e1, mut e2) = (h1.json(), h2.json());
    // Everything but the arrival's sequence number and the hop's own fields is the same.
    for echo in [&mut e1, &mut e2] {
        echo["seq"] = serde_json::Value::Null;
        echo["headers"] = serde_json::Value::Null;
    }
    assert_eq!(e1, e2);
    assert_eq!(
        h1.header("content-type"),
        h2.header("content-type"),
        "content-type"
    );
    assert!(h2
        .header("ratelimit")
        .is_some_and(|v| v.starts_with("\"messages.edit\";r=")));

    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 2);
    for arrival in &arrivals {
        assert_eq!(arrival.version, Version::HTTP_11);
        assert_eq!(arrival.path, ESCAPED_PATH);
        assert_eq!(arrival.query.as_deref(), Some(RAW_QUERY));
        assert!(arrival.body == body, "body bytes differ");
        assert_eq!(
            all_values(&arrival.headers, "host"),
            vec![stub.addr().to_string().into_bytes()]
        );
        assert_eq!(all_values(&arrival.headers, "x-foo"), vec![b"bar".to_vec()]);
    }
    running.shutdown().await;
}

// ---- 9. no retries ----

/// An upstream that answers its first request properly (keep-alive), then reads every later
/// request whole and closes the connection without answering. Counts requests it read.
async fn answer_once_then_hang_up() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("bound address");
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(len) = read_request(&mut stream, &mut buf).await else {
                        return;
                    };
                    buf.drain(..len);
                    if counter.fetch_add(1, Ordering::SeqCst) > 0 {
                        return; // drop: close without a response
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, requests)
}

/// Reads until `buf` holds one whole request (head plus Content-Length body); returns its length.
async fn read_request(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let total = head_end + 4 + body_len;
            if buf.len() >= total {
                return Some(total);
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_whose_connection_closes_unanswered_is_502_and_never_retried() {
    let (addr, requests) = answer_once_then_hang_up().await;
    let running = start_proxy(&config_yaml(&format!("http://{addr}"), &routes_yaml())).await;
    let url = format!("{}/api/v3/chats/C1/message", base_url(&running));
    let client = Client::new();
    // The first call leaves a pooled keep-alive connection: reuse is where retries hide.
    let first = client.post(&url, "alice", "{\"text\":\"one\"}").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let second = client.post(&url, "alice", "{\"text\":\"two\"}").await;
    assert_zoho_error(&second, StatusCode::BAD_GATEWAY, "upstream_unavailable");
    tokio::time::sleep(RETRY_SETTLE).await;
    assert_eq!(
        requests.load(Ordering::SeqCst),
        2,
        "the POST was sent again"
    );
    running.shutdown().await;
}

// ---- 10. RateLimit fields ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_fields_count_down_the_users_quota() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        POST_MESSAGE,
        5,
        Duration::from_secs(10),
        Duration::from_secs(60),
    )])
    .await;
    let running = start_proxy(&config_yaml(
        &stub.url(),
        &format!(
            "safety_margin: \"500ms\"
routes:
  - name: chats.post_message
    method: POST
    path: \"{POST_MESSAGE}\"
    limit: 5
    per: \"10s\"
    lock: \"1m\"
    on_limit: reject
"
        ),
    ))
    .await;
    let url = format!("{}/api/v3/chats/C1/message", base_url(&running));
    let client = Client::new();
    // per + safety_margin = 10.5 s, rounded up to whole seconds.
    let window_secs = 11;
    for remaining in (0..5).rev() {
        let response = client.post(&url, "alice", "{}").await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        assert_eq!(
            response.header("ratelimit-policy"),
            Some(format!("\"chats.post_message\";q=5;w={window_secs}").as_str())
        );
        let value = response.header("ratelimit").unwrap_or_default().to_owned();
        let prefix = format!("\"chats.post_message\";r={remaining};t=");
        let reset: u64 = value
            .strip_prefix(&prefix)
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("RateLimit {value:?}, want {prefix}<seconds>"));
        assert!(reset <= window_secs, "{value}");
        if remaining == 0 {
            assert!(reset >= 1, "no quota left, yet reset is now: {value}");
        }
    }
    // Another user has a quota of their own.
    let other = client.post(&url, "bob", "{}").await;
    assert_eq!(
        other.header("ratelimit"),
        Some("\"chats.post_message\";r=4;t=0")
    );
    let refused = client.post(&url, "alice", "{}").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

// ---- 11. large responses ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_body_arrives_intact() {
    let (stub, running) = stub_and_proxy("").await;
    let body = binary_body(5 * 1024 * 1024);
    stub.set_fixed_response(Some(
        FixedResponse::new(StatusCode::OK, body.clone())
            .header("content-type", "application/octet-stream"),
    ));
    let url = format!("{}/api/v2/me", base_url(&running));
    for client in [Client::new(), Client::h2c()] {
        let response = client.get(&url, "alice").await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.body.len(), body.len());
        assert!(
            response.body == body,
            "{:?}: body bytes differ",
            response.version
        );
    }
    // An error status makes cliqgate read the body's start; the rest must still stream whole.
    stub.set_fixed_response(Some(FixedResponse::new(
        StatusCode::BAD_REQUEST,
        body.clone(),
    )));
    let response = Client::new().get(&url, "alice").await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert!(response.body == body, "error body bytes differ");
    running.shutdown().await;
}
