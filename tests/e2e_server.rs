//! End to end at the socket: cliqgate's own HTTP/1.1 server (src/server/) driven with raw bytes.
//!
//! Ordinary clients (the other e2e files) cannot send what this file sends: several requests in
//! one write, a head that stops half way, a body in pieces with pauses, `Expect: 100-continue`
//! followed to the letter, heads no client would build. Each exchange runs on a raw `TcpStream`
//! to the real proxy on 127.0.0.1:0 in front of the Zoho stub, and every wait for the proxy is
//! bounded by [`READ_TIMEOUT`], so a server that fails to answer (or to close) fails its test
//! instead of hanging it. Answers are read with their framing (RFC 9112 section 6.3): a byte too
//! many or too few in one answer breaks the parse of the next.

mod support;

use std::net::SocketAddr;

use cliqgate::app::Running;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on any one wait for the proxy (an answer, a close). Answers from a loopback stub take
/// milliseconds; this only ends a test whose server never answers or never closes.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Pause between the pieces of a request written in several writes: long enough that each
/// piece arrives in a read of its own (loopback delivers in microseconds), short enough that a
/// test with a few pieces stays well under a second.
const PIECE_PAUSE: Duration = Duration::from_millis(40);

/// `timeouts.client_header` in the slowloris tests: short, so the guard fires within the test.
const CLIENT_HEADER: Duration = Duration::from_millis(300);

/// `http.max_header_bytes` in the oversized-head test: the configured minimum. The server
/// buffers this plus 16 KiB (src/app.rs `HEAD_BUFFER_SLACK`) before a head must be whole.
const SMALL_MAX_HEADER_BYTES: usize = 1024;
const HEAD_BUFFER: usize = SMALL_MAX_HEADER_BYTES + 16 * 1024;

/// Fields in one head the server accepts (src/server/wire.rs `MAX_FIELDS`, hyper's default).
const MAX_FIELDS: usize = 100;

/// The queue test's window: long enough for the test to see the second call queued and hang
/// up well before its slot, short enough to wait out.
const QUEUE_PER: Duration = Duration::from_millis(1500);
const QUEUE_MARGIN: Duration = Duration::from_millis(100);
/// Time for a call sent at the end of the window to reach the stub, were it wrongly sent.
const SEND_SETTLE: Duration = Duration::from_millis(400);

/// The stub's answer delay in the shutdown test: the call is in flight while shutdown begins.
const IN_FLIGHT_DELAY: Duration = Duration::from_millis(800);
/// `timeouts.shutdown` in that test: ample for the in-flight call, bounds `Running::wait`.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

const ME: &str = "/api/v2/me";
const POST_MESSAGE: &str = "/api/v3/chats/{chat_id}/message";
/// Far above what any test here sends (except the queue test), so the limiter never interferes.
const LIMIT: u32 = 100;

fn routes_yaml() -> String {
    format!(
        "routes:
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
    let (minute, lock) = (Duration::from_secs(60), Duration::from_secs(300));
    vec![
        StubRoute::new(Method::GET, ME, LIMIT, minute, lock),
        StubRoute::new(Method::POST, POST_MESSAGE, LIMIT, minute, lock),
    ]
}

/// The stub with [`stub_routes`] and the proxy in front of it, with [`routes_yaml`] plus
/// `extra` (top-level YAML keys).
async fn stub_and_proxy(extra: &str) -> (ZohoStub, Running) {
    let stub = ZohoStub::start(stub_routes()).await;
    let running = start_proxy(&config_yaml(
        &stub.url(),
        &format!("{extra}{}", routes_yaml()),
    ))
    .await;
    (stub, running)
}

// ---- requests as bytes ----

/// `GET /api/v2/me` from alice, with `fields` (each ending in CRLF) added to the head.
fn get_me(query: &str, fields: &str) -> String {
    format!(
        "GET {ME}{query} HTTP/1.1\r\nHost: cliq\r\nAuthorization: Zoho-oauthtoken alice\r\n{fields}\r\n"
    )
}

/// The head of `POST /api/v3/chats/C1/message` from alice, with `fields` added; no body.
fn post_head(version: &str, fields: &str) -> String {
    format!(
        "POST /api/v3/chats/C1/message {version}\r\nHost: cliq\r\nAuthorization: Zoho-oauthtoken alice\r\nContent-Type: application/json\r\n{fields}\r\n"
    )
}

/// One chunk of a chunked body (RFC 9112 section 7.1).
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

// ---- answers as bytes ----

/// One answer as it came off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Names lowercased, in wire order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a `Connection` field lists `token` (RFC 9110 section 7.6.1).
    fn connection_has(&self, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == "connection")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", lossy(&self.body)))
    }

    /// The stub's echo of the request (`ZohoStub::set_echo`): what reached Zoho.
    fn echoed_body(&self) -> Vec<u8> {
        let echo = self.json();
        let hex = echo["body_hex"].as_str().expect("an echo with body_hex");
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }
}

/// cliqgate's own refusal: the status, Zoho's flat envelope with `code`, a JSON content type,
/// and the connection announced as closing (a refused head leaves nothing to trust after it).
fn assert_zoho_refusal(answer: &RawResponse, status: u16, code: &str) {
    assert_eq!(answer.status, status, "body: {}", lossy(&answer.body));
    let content_type = answer.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?}"
    );
    let body = answer.json();
    assert_eq!(body["code"], code, "body: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "body: {body}"
    );
    assert!(answer.connection_has("close"), "{answer:?}");
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A raw connection to the proxy that reads answers one at a time, each exactly as framed:
/// bytes after an answer stay buffered for the next one.
struct Wire {
    stream: TcpStream,
    /// Read and not yet taken: the rest of the answer being read, or the next answers.
    buf: Vec<u8>,
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Wire {
        let stream = tokio::time::timeout(READ_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect within the read timeout")
            .expect("connect to the proxy");
        // Each write leaves at once, so "separate writes" really are separate segments.
        stream.set_nodelay(true).expect("TCP_NODELAY");
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        tokio::time::timeout(READ_TIMEOUT, self.stream.write_all(bytes.as_ref()))
            .await
            .expect("the proxy takes the bytes within the read timeout")
            .expect("write to the proxy");
    }

    /// Reads what the proxy sent next; `false` once it has closed.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(READ_TIMEOUT, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "nothing from the proxy within {READ_TIMEOUT:?}; buffered so far: {:?}",
                lossy(&self.buf)
            ),
            Ok(Err(e)) => panic!("read from the proxy: {e}; buffered: {:?}", lossy(&self.buf)),
            Ok(Ok(0)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads until at least `n` bytes are buffered.
    async fn need(&mut self, n: usize) {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "the proxy closed after {} of {n} bytes: {:?}",
                self.buf.len(),
                lossy(&self.buf)
            );
        }
    }

    /// Takes one CRLF-ended line (without the CRLF).
    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..end].to_vec();
                self.buf.drain(..end + 2);
                return line;
            }
            assert!(
                self.fill().await,
                "the proxy closed inside a line: {:?}",
                lossy(&self.buf)
            );
        }
    }

    /// The next answer, to a request with `method` (a HEAD answer has no body).
    async fn answer(&mut self, method: &str) -> RawResponse {
        let (mut answer, head_len) = loop {
            if let Some(head) = parse_head(&self.buf) {
                break head;
            }
            assert!(
                self.fill().await,
                "the proxy closed before a whole answer head: {:?}",
                lossy(&self.buf)
            );
        };
        self.buf.drain(..head_len);
        let status = answer.status;
        // RFC 9112 section 6.3: which answers have a body, and how it is delimited.
        if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
            return answer;
        }
        let chunked = answer
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        if chunked {
            answer.body = self.chunked_body().await;
        } else if let Some(length) = answer.header("content-length") {
            let length: usize = length.parse().expect("a numeric content-length");
            self.need(length).await;
            answer.body = self.buf.drain(..length).collect();
        } else {
            // Delimited by the close.
            while self.fill().await {}
            answer.body = std::mem::take(&mut self.buf);
        }
        answer
    }

    async fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = lossy(&self.line().await);
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
            if size == 0 {
                // Trailer fields, up to the empty line.
                while !self.line().await.is_empty() {}
                return body;
            }
            self.need(size + 2).await;
            body.extend(self.buf.drain(..size));
            assert_eq!(self.buf.drain(..2).as_slice(), b"\r\n", "chunk not ended");
        }
    }

    /// Reads until the proxy closes, then closes this end too (so the proxy's linger after a
    /// refusal ends at once); returns what came before the close (a reset counts as a close).
    /// Panics if the proxy does not close within [`READ_TIMEOUT`].
    async fn until_closed(mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.buf);
        let drain = async {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => rest.extend_from_slice(&chunk[..n]),
                }
            }
        };
        if tokio::time::timeout(READ_TIMEOUT, drain).await.is_err() {
            panic!("the proxy did not close the connection within {READ_TIMEOUT:?}");
        }
        rest
    }

    /// The proxy closes the connection without sending anything more.
    async fn closes_silently(self) {
        let rest = self.until_closed().await;
        assert!(
            rest.is_empty(),
            "bytes before the close: {:?}",
            lossy(&rest)
        );
    }
}

/// A whole response head at the front of `buf` (as an answer without its body yet) and its
/// length. `None` if more is needed; panics on bytes that are not an HTTP/1.1 response head.
fn parse_head(buf: &[u8]) -> Option<(RawResponse, usize)> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Response::new(&mut fields);
    match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            assert_eq!(head.version, Some(1), "answers are HTTP/1.1 (RFC 9110 6.2)");
            let headers = head
                .headers
                .iter()
                .map(|f| (f.name.to_ascii_lowercase(), lossy(f.value)))
                .collect();
            let answer = RawResponse {
                status: head.code.expect("a status"),
                headers,
                body: Vec::new(),
            };
            Some((answer, len))
        }
        Ok(httparse::Status::Partial) => None,
        Err(e) => panic!("not an HTTP response head ({e}): {:?}", lossy(buf)),
    }
}

async fn queue_depth(admin: SocketAddr, route: &str) -> f64 {
    metric_value(
        &scrape(admin).await,
        "cliqgate_queue_depth",
        &[("route", route)],
    )
    .unwrap_or(0.0)
}

async fn decisions(admin: SocketAddr, route: &str, decision: &str) -> f64 {
    metric_value(
        &scrape(admin).await,
        "cliqgate_requests_total",
        &[("route", route), ("decision", decision)],
    )
    .unwrap_or(0.0)
}

/// `cliqgate_caller_errors_total{reason}`: a series that must exist (at zero from the start).
async fn caller_errors(admin: SocketAddr, reason: &str) -> f64 {
    let text = scrape(admin).await;
    metric_value(&text, "cliqgate_caller_errors_total", &[("reason", reason)])
        .unwrap_or_else(|| panic!("no caller_errors series for {reason}:\n{text}"))
}

/// Every reason of `cliqgate_caller_errors_total` and its count, in one scrape.
async fn all_caller_errors(admin: SocketAddr) -> Vec<(String, f64)> {
    let mut counts = Vec::new();
    for reason in [
        "bad_request",
        "headers_too_large",
        "head_timeout",
        "body_timeout",
    ] {
        counts.push((reason.to_owned(), caller_errors(admin, reason).await));
    }
    counts
}

/// Asserts the caller-error counts: `reason` at `n`, every other reason still at zero.
async fn assert_caller_errors(admin: SocketAddr, reason: &str, n: f64) {
    for (each, count) in all_caller_errors(admin).await {
        let expected = if each == reason { n } else { 0.0 };
        assert_eq!(
            count, expected,
            "cliqgate_caller_errors_total{{reason={each}}}"
        );
    }
}

// ---- 1. keep-alive and pipelining ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_requests_on_one_connection_are_both_answered_and_forwarded() {
    let (stub, running) = stub_and_proxy("").await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    let mut seqs = Vec::new();
    for _ in 0..2 {
        wire.send(get_me("", "")).await;
        let answer = wire.answer("GET").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(!answer.connection_has("close"), "{answer:?}");
        seqs.push(answer.json()["seq"].clone());
    }
    assert_eq!(seqs, [0, 1], "each answer is its own arrival's");
    assert_eq!(stub.arrivals().len(), 2);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_in_one_write_are_answered_in_order_each_framed_exactly() {
    let (stub, running) = stub_and_proxy("").await;
    stub.set_echo(true);
    let mut wire = Wire::connect(running.proxy_addr).await;
    // A GET, a POST whose body came with its head, a chunked POST, a GET: one write.
    let mut burst = get_me("?n=1", "").into_bytes();
    burst.extend_from_slice(post_head("HTTP/1.1", "Content-Length: 7\r\n").as_bytes());
    burst.extend_from_slice(b"{\"n\":2}");
    burst.extend_from_slice(post_head("HTTP/1.1", "Transfer-Encoding: chunked\r\n").as_bytes());
    burst.extend(chunk(b"{\"n\":"));
    burst.extend(chunk(b"3}"));
    burst.extend_from_slice(b"0\r\n\r\n");
    burst.extend_from_slice(get_me("?n=4", "").as_bytes());
    wire.send(&burst).await;

    let first = wire.answer("GET").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json()["query"], "n=1");
    for (n, body) in [(2, &b"{\"n\":2}"[..]), (3, b"{\"n\":3}")] {
        let answer = wire.answer("POST").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json()["method"], "POST", "answer {n}");
        assert_eq!(answer.echoed_body(), body, "answer {n}");
    }
    let last = wire.answer("GET").await;
    assert_eq!(last.status, 200, "{last:?}");
    assert_eq!(last.json()["query"], "n=4");
    assert!(wire.buf.is_empty(), "bytes after the last answer");

    // The connection is still good for another request.
    wire.send(get_me("?n=5", "")).await;
    assert_eq!(wire.answer("GET").await.json()["query"], "n=5");
    let arrivals = stub.arrivals();
    let bodies: Vec<&[u8]> = arrivals.iter().map(|a| &a.body[..]).collect();
    assert_eq!(
        bodies,
        [&b""[..], b"{\"n\":2}", b"{\"n\":3}", b"", b""],
        "what Zoho received, in order"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answer_has_no_body_so_the_next_pipelined_answer_parses() {
    let (stub, running) = stub_and_proxy("").await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    let head =
        format!("HEAD {ME} HTTP/1.1\r\nHost: cliq\r\nAuthorization: Zoho-oauthtoken alice\r\n\r\n");
    wire.send(format!("{head}{}", get_me("", ""))).await;
    let to_head = wire.answer("HEAD").await;
    assert_eq!(to_head.status, 200, "{to_head:?}");
    // What follows the HEAD answer's head must be the next answer, not a body.
    assert!(
        wire.buf.is_empty() || wire.buf.starts_with(b"HTTP/1.1 "),
        "a body after the HEAD answer: {:?}",
        lossy(&wire.buf)
    );
    let to_get = wire.answer("GET").await;
    assert_eq!(to_get.status, 200, "{to_get:?}");
    assert_eq!(to_get.json()["seq"], 1);
    // A HEAD answer keeps the length a GET would have had (RFC 9110 section 9.3.2).
    assert_eq!(
        to_head.header("content-length"),
        Some(to_get.body.len().to_string().as_str()),
        "{to_head:?}"
    );
    let methods: Vec<Method> = stub.arrivals().into_iter().map(|a| a.method).collect();
    assert_eq!(methods, [Method::HEAD, Method::GET]);
    running.shutdown().await;
}

// ---- 2. HTTP/1.0 ----

/// An HTTP/1.0 GET from alice with `fields` (before her Authorization) is forwarded once and
/// answered 200, and the connection then closes (RFC 9112 section 9.3: an HTTP/1.0 connection
/// without keep-alive closes after the answer).
async fn http_1_0_get_is_answered_then_closed(fields: &str) -> RawResponse {
    let (stub, running) = stub_and_proxy("").await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    wire.send(format!(
        "GET {ME} HTTP/1.0\r\n{fields}Authorization: Zoho-oauthtoken alice\r\n\r\n"
    ))
    .await;
    let answer = wire.answer("GET").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    wire.closes_silently().await;
    assert_eq!(stub.arrivals().len(), 1);
    running.shutdown().await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_without_keep_alive_is_answered_then_closed() {
    let answer = http_1_0_get_is_answered_then_closed("Host: cliq\r\n").await;
    assert_eq!(answer.json()["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_with_keep_alive_stays_open_for_another_request() {
    let (stub, running) = stub_and_proxy("").await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    let request = format!(
        "GET {ME} HTTP/1.0\r\nHost: cliq\r\nConnection: keep-alive\r\nAuthorization: Zoho-oauthtoken alice\r\n\r\n"
    );
    for seq in 0..2 {
        wire.send(&request).await;
        let answer = wire.answer("GET").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        // An HTTP/1.0 caller keeps the connection only if the answer says so (RFC 9112 C.2.2).
        assert!(answer.connection_has("keep-alive"), "{answer:?}");
        assert!(
            answer.header("content-length").is_some(),
            "a 1.0 keep-alive answer needs a length: {answer:?}"
        );
        assert_eq!(answer.json()["seq"], seq);
    }
    assert_eq!(stub.arrivals().len(), 2);
    running.shutdown().await;
}

// ---- 3. request bodies: Expect, chunked, streamed ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_gets_100_before_the_body_and_the_body_arrives_whole() {
    let (stub, running) = stub_and_proxy("").await;
    let body = br#"{"text":"sent only after 100 Continue"}"#;
    let mut wire = Wire::connect(running.proxy_addr).await;
    wire.send(post_head(
        "HTTP/1.1",
        &format!("Content-Length: {}\r\nExpect: 100-continue\r\n", body.len()),
    ))
    .await;
    // RFC 9110 section 10.1.1: the caller waits for 100 before it sends the body.
    let interim = wire.answer("POST").await;
    assert_eq!(interim.status, 100, "{interim:?}");
    assert!(wire.buf.is_empty(), "more than 100 before the body");
    wire.send(body).await;
    let answer = wire.answer("POST").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(&arrivals[0].body[..], body);
    // The connection carries on.
    wire.send(get_me("", "")).await;
    assert_eq!(wire.answer("GET").await.status, 200);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_refused_before_the_body_gets_the_final_answer_and_a_close() {
    let (stub, running) = stub_and_proxy("").await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    // No credential: refused before the body is needed.
    wire.send(
        "POST /api/v3/chats/C1/message HTTP/1.1\r\nHost: cliq\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    // No 100 (the body is never read), the final answer at once, and since the body that may
    // still come would be read as a request, the connection closes (RFC 9110 section 10.1.1).
    let answer = wire.answer("POST").await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(answer.json()["code"], "oauthtoken_missing");
    assert!(answer.connection_has("close"), "{answer:?}");
    wire.closes_silently().await;
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_in_separate_writes_reaches_zoho_dechunked() {
    let (stub, running) = stub_and_proxy("").await;
    stub.set_echo(true);
    let mut wire = Wire::connect(running.proxy_addr).await;
    wire.send(post_head("HTTP/1.1", "Transfer-Encoding: chunked\r\n"))
        .await;
    // Chunks in their own writes; one split inside its size line and one inside its data; an
    // extension, which a recipient ignores (RFC 9112 section 7.1.1); a trailer section.
    let pieces: [&[u8]; 7] = [
        b"7\r\n{\"text\"\r\n",
        b"1",
        b"0;name=value\r\n:\"0123",
        b"456789abc\"\r\n",
        b"1\r\n}\r\n",
        b"0\r\n",
        b"X-Trailer: t\r\n\r\n",
    ];
    for piece in pieces {
        wire.send(piece).await;
        tokio::time::sleep(PIECE_PAUSE).await;
    }
    let answer = wire.answer("POST").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let expected = br#"{"text":"0123456789abc"}"#;
    assert_eq!(lossy(&answer.echoed_body()), lossy(expected));
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(&arrivals[0].body[..], expected);
    // The connection carries on after the last chunk and trailers.
    wire.send(get_me("", "")).await;
    assert_eq!(wire.answer("GET").await.status, 200);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_streamed_after_its_head_stops_at_its_length_and_the_next_request_is_answered() {
    let (stub, running) = stub_and_proxy("").await;
    stub.set_echo(true);
    let mut wire = Wire::connect(running.proxy_addr).await;
    let body = br#"{"text":"in two pieces"}"#;
    wire.send(post_head(
        "HTTP/1.1",
        &format!("Content-Length: {}\r\n", body.len()),
    ))
    .await;
    tokio::time::sleep(PIECE_PAUSE).await;
    wire.send(&body[..5]).await;
    tokio::time::sleep(PIECE_PAUSE).await;
    // The rest of the body and the next request in one write: the body must end at its length.
    let mut rest = body[5..].to_vec();
    rest.extend_from_slice(get_me("?next=1", "").as_bytes());
    wire.send(&rest).await;

    let answer = wire.answer("POST").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(lossy(&answer.echoed_body()), lossy(body));
    let next = wire.answer("GET").await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.json()["query"], "next=1");
    assert_eq!(stub.arrivals().len(), 2);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_body_is_the_callers_fault_not_zohos() {
    let (stub, running) = stub_and_proxy("").await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    let mut request = post_head("HTTP/1.1", "Transfer-Encoding: chunked\r\n").into_bytes();
    // A chunk size that is not hex.
    request.extend_from_slice(b"2\r\n{}\r\nzz\r\n");
    wire.send(&request).await;
    // RFC 9110 section 15.5.1: malformed request syntax is a 400. A 502 would tell the caller
    // that Zoho failed, and count as an upstream failure in logs and alerts.
    let answer = wire.answer("POST").await;
    assert_zoho_refusal(&answer, 400, "invalid_request");
    wire.closes_silently().await;
    let complete: Vec<_> = stub
        .arrivals()
        .into_iter()
        .filter(|a| a.outcome != Outcome::Incomplete)
        .collect();
    assert!(complete.is_empty(), "{complete:?}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_with_a_content_length_too_is_read_chunked_and_the_connection_closes() {
    let (stub, running) = stub_and_proxy("").await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    let mut request = post_head(
        "HTTP/1.1",
        "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
    )
    .into_bytes();
    request.extend(chunk(b"{\"a\":1}"));
    request.extend_from_slice(b"0\r\n\r\n");
    wire.send(&request).await;
    // RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, and the server closes
    // the connection after answering.
    let answer = wire.answer("POST").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.connection_has("close"), "{answer:?}");
    wire.closes_silently().await;
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(&arrivals[0].body[..], b"{\"a\":1}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_body_over_the_limit_is_413_which_the_caller_reads_while_still_sending() {
    let (stub, running) = stub_and_proxy("http:\n  max_body_bytes: \"1KiB\"\n").await;
    let body = vec![b'x'; 512 * 1024];
    let mut wire = Wire::connect(running.proxy_addr).await;
    wire.send(post_head(
        "HTTP/1.1",
        &format!("Content-Length: {}\r\n", body.len()),
    ))
    .await;
    // The body keeps coming while the answer is read: closing without reading it would reset
    // the connection and could destroy the answer before the caller has read it.
    let (mut read_half, mut write_half) = wire.stream.into_split();
    let writer = tokio::spawn(async move {
        // The proxy may stop reading; the write then fails, which is fine.
        let _ = write_half.write_all(&body).await;
        write_half
    });
    let mut wire_read = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match read_half.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => wire_read.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .expect("the proxy answers and closes within the read timeout");
    let (mut answer, head_len) = parse_head(&wire_read)
        .unwrap_or_else(|| panic!("no whole answer before the close: {:?}", lossy(&wire_read)));
    answer.body = wire_read[head_len..].to_vec();
    assert_zoho_refusal(&answer, 413, "payload_too_large");
    assert_eq!(
        answer.header("content-length"),
        Some(answer.body.len().to_string().as_str()),
        "the whole answer, then the close"
    );
    let _ = tokio::time::timeout(READ_TIMEOUT, writer).await;
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

// ---- 4. heads that cannot be read ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_heads_are_400_in_zoho_format_then_closed_and_never_forwarded() {
    let (stub, running) = stub_and_proxy("").await;
    let post = "POST /api/v3/chats/C1/message";
    let auth = "Host: cliq\r\nAuthorization: Zoho-oauthtoken alice\r\n";
    let heads = [
        format!("GET {ME} HTTP/1.1\r\n{auth}Bad Header\r\n\r\n"),
        format!("{post} HTTP/1.1\r\n{auth}Content-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        format!("{post} HTTP/1.1\r\n{auth}Content-Length: 2, 3\r\n\r\nabc"),
        format!("{post} HTTP/1.1\r\n{auth}Content-Length: -1\r\n\r\n"),
        // RFC 9112 section 6.1: a 1.0 request with Transfer-Encoding has faulty framing.
        format!("{post} HTTP/1.0\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        // RFC 9112 section 6.3: chunked must be the last coding of a request body.
        format!("{post} HTTP/1.1\r\n{auth}Transfer-Encoding: chunked, gzip\r\n\r\n"),
    ];
    assert_caller_errors(running.admin_addr, "bad_request", 0.0).await;
    for head in &heads {
        let mut wire = Wire::connect(running.proxy_addr).await;
        // A valid request right behind it must not be answered: after a framing error nothing
        // later on the connection can be trusted.
        wire.send(format!("{head}{}", get_me("", ""))).await;
        let answer = wire.answer("GET").await;
        assert_zoho_refusal(&answer, 400, "invalid_request");
        let rest = wire.until_closed().await;
        assert!(
            rest.is_empty(),
            "{head:?}: more after the 400: {:?}",
            lossy(&rest)
        );
    }
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    assert_caller_errors(running.admin_addr, "bad_request", heads.len() as f64).await;
    running.shutdown().await;
}

/// The refusal of a head for its Host field: a 400 whose message names the field, the
/// connection closed with nothing more on it (not even for the valid request sent behind).
async fn assert_host_refused(mut wire: Wire, head: &str) {
    wire.send(format!("{head}{}", get_me("", ""))).await;
    let answer = wire.answer("GET").await;
    assert_zoho_refusal(&answer, 400, "invalid_request");
    let body = answer.json();
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("Host")),
        "{head:?}: {body}"
    );
    let rest = wire.until_closed().await;
    assert!(
        rest.is_empty(),
        "{head:?}: more after the 400: {:?}",
        lossy(&rest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_1_request_without_host_is_400_and_never_forwarded() {
    let (stub, running) = stub_and_proxy("").await;
    // RFC 9112 section 3.2: an HTTP/1.1 request without Host is answered 400.
    let head = format!("GET {ME} HTTP/1.1\r\nAuthorization: Zoho-oauthtoken alice\r\n\r\n");
    assert_host_refused(Wire::connect(running.proxy_addr).await, &head).await;
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_request_without_host_is_still_forwarded() {
    // HTTP/1.0 had no Host field: RFC 9112 section 3.2 requires it of HTTP/1.1 only.
    http_1_0_get_is_answered_then_closed("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_with_two_host_fields_is_400_and_never_forwarded() {
    let (stub, running) = stub_and_proxy("").await;
    let auth = "Authorization: Zoho-oauthtoken alice\r\n";
    // RFC 9112 section 3.2: more than one Host field line is a 400, whatever the version.
    let heads = [
        format!("GET {ME} HTTP/1.1\r\nHost: cliq\r\n{auth}Host: cliq\r\n\r\n"),
        format!("GET {ME} HTTP/1.1\r\nHost: cliq\r\nhost: evil.example\r\n{auth}\r\n"),
        format!("GET {ME} HTTP/1.0\r\nHost: cliq\r\nHost: cliq\r\n{auth}\r\n"),
    ];
    for head in &heads {
        assert_host_refused(Wire::connect(running.proxy_addr).await, head).await;
    }
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_over_the_head_buffer_is_431_and_never_forwarded() {
    let (stub, running) = stub_and_proxy(&format!(
        "http:\n  max_header_bytes: {SMALL_MAX_HEADER_BYTES}\n"
    ))
    .await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    // Several times the buffer, so it fills while the head is still incomplete.
    let big = "a".repeat(4 * HEAD_BUFFER);
    wire.send(get_me("", &format!("X-Big: {big}\r\n"))).await;
    let answer = wire.answer("GET").await;
    assert_zoho_refusal(&answer, 431, "headers_too_large");
    let message = answer.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains(&SMALL_MAX_HEADER_BYTES.to_string()),
        "names the configured limit: {message}"
    );
    wire.closes_silently().await;
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    assert_caller_errors(running.admin_addr, "headers_too_large", 1.0).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_line_over_the_head_buffer_is_431_and_never_forwarded() {
    let (stub, running) = stub_and_proxy(&format!(
        "http:\n  max_header_bytes: {SMALL_MAX_HEADER_BYTES}\n"
    ))
    .await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    // Fields well under max_header_bytes, a request line just over the head buffer: only the
    // server's buffer limit can refuse it.
    let query = format!("?q={}", "a".repeat(HEAD_BUFFER + 1024));
    wire.send(get_me(&query, "")).await;
    let answer = wire.answer("GET").await;
    assert_zoho_refusal(&answer, 431, "headers_too_large");
    wire.closes_silently().await;
    assert!(
        stub.arrivals().is_empty(),
        "{} arrivals",
        stub.arrivals().len()
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_100_header_fields_is_431_and_never_forwarded() {
    let (stub, running) = stub_and_proxy("").await;
    // get_me has two fields (Host, Authorization): these make MAX_FIELDS + 1.
    let fields: String = (0..MAX_FIELDS - 1)
        .map(|i| format!("X-F{i}: v\r\n"))
        .collect();
    let mut wire = Wire::connect(running.proxy_addr).await;
    wire.send(get_me("", &fields)).await;
    let answer = wire.answer("GET").await;
    assert_zoho_refusal(&answer, 431, "headers_too_large");
    wire.closes_silently().await;
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

// ---- 5. slowloris and idle connections ----

/// The stub and a proxy whose `timeouts.client_header` is [`CLIENT_HEADER`].
async fn stub_and_impatient_proxy() -> (ZohoStub, Running) {
    stub_and_proxy(&format!(
        "timeouts:\n  client_header: \"{}ms\"\n",
        CLIENT_HEADER.as_millis()
    ))
    .await
}

/// Waits for the server to close `wire` and asserts it did so without answering, not before
/// `client_header` had passed since `since`, and without forwarding anything.
async fn assert_closed_unanswered(wire: Wire, since: Instant, stub: &ZohoStub) {
    // The guard closes after one to two `client_header` periods (src/server/mod.rs
    // `Patience`); READ_TIMEOUT is ten of them.
    let rest = wire.until_closed().await;
    let took = since.elapsed();
    assert!(rest.is_empty(), "answered with {:?}", lossy(&rest));
    assert!(
        took >= CLIENT_HEADER,
        "closed after {took:?}, before client_header ({CLIENT_HEADER:?})"
    );
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_head_then_silence_is_closed_after_client_header_without_an_answer() {
    let (stub, running) = stub_and_impatient_proxy().await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    let sent = Instant::now();
    wire.send(format!("GET {ME} HTTP/1.1\r\nHost: cliq\r\nAuthor"))
        .await;
    assert_closed_unanswered(wire, sent, &stub).await;
    assert_caller_errors(running.admin_addr, "head_timeout", 1.0).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connection_that_sends_nothing_is_closed_after_client_header() {
    let (stub, running) = stub_and_impatient_proxy().await;
    let wire = Wire::connect(running.proxy_addr).await;
    // Nothing is sent: a connection that never starts a head holds a socket for nothing.
    assert_closed_unanswered(wire, Instant::now(), &stub).await;
    assert_caller_errors(running.admin_addr, "head_timeout", 1.0).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_outlives_client_header() {
    let (stub, running) = stub_and_impatient_proxy().await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    wire.send(get_me("", "")).await;
    assert_eq!(wire.answer("GET").await.status, 200);
    // Idle between requests is not a slow head: the slowloris guard must not close it.
    tokio::time::sleep(CLIENT_HEADER * 3).await;
    wire.send(get_me("", "")).await;
    assert_eq!(wire.answer("GET").await.status, 200);
    assert_eq!(stub.arrivals().len(), 2);
    assert_caller_errors(running.admin_addr, "head_timeout", 0.0).await;
    running.shutdown().await;
}

// ---- 6. a caller that hangs up while queued ----

/// The stub (threshold 1 per `per` on `template`) and a proxy whose one route `name` queues
/// (limit 1 per `per`, `max_wait: 10s`), with `extra` top-level YAML.
async fn stub_and_queueing_proxy(
    method: Method,
    name: &str,
    template: &'static str,
    per: Duration,
    extra: &str,
) -> (ZohoStub, Running) {
    let stub = ZohoStub::start(vec![StubRoute::new(
        method.clone(),
        template,
        1,
        per,
        Duration::from_secs(60),
    )])
    .await;
    let yaml = format!(
        "{extra}safety_margin: \"{}ms\"\nroutes:\n  - name: {name}\n    method: {method}\n    path: \"{template}\"\n    limit: 1\n    per: \"{}ms\"\n    lock: \"60s\"\n    on_limit: queue\n    max_wait: \"10s\"\n",
        QUEUE_MARGIN.as_millis(),
        per.as_millis()
    );
    let running = start_proxy(&config_yaml(&stub.url(), &yaml)).await;
    (stub, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_that_hangs_up_while_queued_is_never_sent_and_its_slot_is_given_back() {
    let (stub, running) = stub_and_queueing_proxy(Method::GET, "users.me", ME, QUEUE_PER, "").await;
    let admin = running.admin_addr;

    let mut first = Wire::connect(running.proxy_addr).await;
    first.send(get_me("", "")).await;
    assert_eq!(first.answer("GET").await.status, 200);
    let quota_used = Instant::now();

    let mut second = Wire::connect(running.proxy_addr).await;
    second.send(get_me("?second=1", "")).await;
    wait_for(
        "the second call to be queued",
        QUEUE_PER / 2,
        || async move { queue_depth(admin, "users.me").await == 1.0 },
    )
    .await;
    drop(second);
    // Noticed while queued, long before its slot: counted as cancelled, the queue emptied.
    wait_for(
        "the departed caller to leave the queue",
        QUEUE_PER / 2,
        || async move {
            queue_depth(admin, "users.me").await == 0.0
                && decisions(admin, "users.me", "cancelled").await == 1.0
        },
    )
    .await;

    // Wait past the slot it held: nothing may arrive for it.
    tokio::time::sleep_until(quota_used + QUEUE_PER + QUEUE_MARGIN + SEND_SETTLE).await;
    let queries: Vec<Option<String>> = stub.arrivals().into_iter().map(|a| a.query).collect();
    assert_eq!(queries, [None], "the departed caller's call was sent");
    running.shutdown().await;
}

// ---- 7. graceful shutdown ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_and_answers_calls_in_flight_with_connection_close() {
    let (stub, running) = stub_and_proxy(&format!(
        "timeouts:\n  shutdown: \"{}s\"\n",
        SHUTDOWN_TIMEOUT.as_secs()
    ))
    .await;
    let proxy_addr = running.proxy_addr;
    let mut idle = Wire::connect(proxy_addr).await;
    idle.send(get_me("", "")).await;
    assert_eq!(idle.answer("GET").await.status, 200);

    stub.set_delay(IN_FLIGHT_DELAY);
    let mut busy = Wire::connect(proxy_addr).await;
    busy.send(get_me("?busy=1", "")).await;
    let stub_ref = &stub;
    wait_for(
        "the busy call to reach the stub",
        READ_TIMEOUT,
        || async move { stub_ref.arrivals().len() == 2 },
    )
    .await;

    running.trigger_shutdown();
    // The idle connection closes at once, with nothing sent on it.
    idle.closes_silently().await;
    // The call in flight is answered, and told that the connection ends with it.
    let answer = busy.answer("GET").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.connection_has("close"), "{answer:?}");
    busy.closes_silently().await;

    tokio::time::timeout(SHUTDOWN_TIMEOUT, running.wait())
        .await
        .expect("the proxy stops within timeouts.shutdown");
    assert!(
        TcpStream::connect(proxy_addr).await.is_err(),
        "still accepting after shutdown"
    );
}

// ---- 8. h2c on the same port ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_served_on_the_same_port() {
    let (stub, running) = stub_and_proxy("").await;
    let url = format!("{}{ME}", base_url(&running));
    let client = Client::h2c();
    // Two streams at once on one connection, next to an HTTP/1.1 connection on the same port.
    let mut h1 = Wire::connect(running.proxy_addr).await;
    let (a, b) = tokio::join!(client.get(&url, "alice"), client.get(&url, "alice"));
    for answer in [&a, &b] {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.version, http::Version::HTTP_2);
    }
    h1.send(get_me("", "")).await;
    assert_eq!(h1.answer("GET").await.status, 200);
    assert_eq!(stub.arrivals().len(), 3);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_preface_split_across_writes_is_still_recognised() {
    let (_stub, running) = stub_and_proxy("").await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    // RFC 9113 section 3.4: the preface, then a SETTINGS frame (empty: 9 bytes of frame head).
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    wire.send(&preface[..10]).await;
    tokio::time::sleep(PIECE_PAUSE).await;
    wire.send(&preface[10..]).await;
    wire.send([0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await;
    // The server's first frame is its own SETTINGS, on stream 0, not an HTTP/1.1 answer.
    wire.need(9).await;
    let frame = &wire.buf[..9];
    assert_eq!(frame[3], 0x4, "not a SETTINGS frame: {frame:?}");
    assert_eq!(
        frame[4] & 0x1,
        0,
        "SETTINGS ACK before the server's own: {frame:?}"
    );
    assert_eq!(&frame[5..9], &[0, 0, 0, 0], "not on stream 0: {frame:?}");
    // Gone before the shutdown: an HTTP/2 drain waits for a PING answer this client never sends.
    drop(wire);
    running.shutdown().await;
}

// ---- a queued call whose body streams after its head ----

/// Larger than what a waiting call reads of its body (64 KiB, `QUEUE_BODY_PEEK`): part of it is
/// read while queued, the rest streams once the slot comes.
const QUEUED_BODY: usize = 100 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_call_whose_body_follows_its_head_reaches_zoho_whole_with_its_true_length() {
    let (stub, running) = stub_and_queueing_proxy(
        Method::POST,
        "chats.post_message",
        POST_MESSAGE,
        QUEUE_PER,
        "",
    )
    .await;

    let mut first = Wire::connect(running.proxy_addr).await;
    first
        .send(format!(
            "{}{{}}",
            post_head("HTTP/1.1", "Content-Length: 2\r\n")
        ))
        .await;
    assert_eq!(first.answer("POST").await.status, 200);

    // The head first, the body after a pause: the call is queued with its body still coming.
    let body: Vec<u8> = (0..QUEUED_BODY).map(|i| b'a' + (i % 26) as u8).collect();
    let mut second = Wire::connect(running.proxy_addr).await;
    second
        .send(post_head(
            "HTTP/1.1",
            &format!("Content-Length: {QUEUED_BODY}\r\n"),
        ))
        .await;
    tokio::time::sleep(PIECE_PAUSE).await;
    second.send(&body).await;
    let answer = second.answer("POST").await;
    assert_eq!(answer.status, 200, "{:?}", lossy(&answer.body));

    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 2);
    let last = &arrivals[1];
    assert_eq!(last.body.len(), QUEUED_BODY);
    assert!(last.body[..] == body[..], "the body reached Zoho changed");
    assert_eq!(
        last.headers["content-length"],
        QUEUED_BODY.to_string().as_str()
    );
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

// ---- a caller that stalls its request body (`timeouts.client_body`) ----

/// `timeouts.client_body` in the slow-body tests: short, so the guard fires within the test, and
/// ten times the pauses of a body that keeps arriving, so a loaded machine cannot make one of
/// those pauses look like a stall.
const CLIENT_BODY: Duration = Duration::from_secs(1);
/// The declared length of a body in those tests, and how much of it is sent before a stall.
const DECLARED_BODY: usize = 100;
const SENT_BEFORE_STALL: usize = 10;
/// Pause between the pieces of a body that keeps arriving: a tenth of [`CLIENT_BODY`], so each
/// pause is far inside it; [`SLOW_BODY_PIECES`] of them make the whole body take twice as long.
const SLOW_PIECE_PAUSE: Duration = Duration::from_millis(100);
const SLOW_BODY_PIECES: usize = 20;

/// `timeouts.client_body: CLIENT_BODY` as top-level YAML.
fn client_body_yaml() -> String {
    format!(
        "timeouts:\n  client_body: \"{}ms\"\n",
        CLIENT_BODY.as_millis()
    )
}

/// Sends the head of `POST {path}` declaring [`DECLARED_BODY`] bytes and the first
/// [`SENT_BEFORE_STALL`] of them, then nothing; returns when they were sent.
async fn send_then_stall(wire: &mut Wire, path: &str) -> Instant {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: cliq\r\nAuthorization: Zoho-oauthtoken alice\r\nContent-Type: application/json\r\nContent-Length: {DECLARED_BODY}\r\n\r\n"
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&[b'x'; SENT_BEFORE_STALL]);
    let sent = Instant::now();
    wire.send(bytes).await;
    sent
}

/// The stalled call was answered 408 in Zoho's envelope, not before `client_body` had passed
/// since `sent`, and the connection closed after it (the rest of the body may still come, so
/// nothing after it can be read as a request).
async fn assert_timed_out_and_closed(mut wire: Wire, sent: Instant) {
    let answer = wire.answer("POST").await;
    let took = sent.elapsed();
    assert_zoho_refusal(&answer, 408, "request_timeout");
    assert!(
        took >= CLIENT_BODY,
        "answered after {took:?}, before client_body ({CLIENT_BODY:?})"
    );
    // READ_TIMEOUT is three client_body periods.
    assert!(took < READ_TIMEOUT, "answered after {took:?}");
    wire.closes_silently().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_while_forwarding_is_408_after_client_body_and_closes_the_connection() {
    let (stub, running) = stub_and_proxy(&client_body_yaml()).await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    let sent = send_then_stall(&mut wire, "/api/v3/chats/C1/message").await;
    assert_timed_out_and_closed(wire, sent).await;
    // The upstream request was cut short: Zoho cannot act on a call whose body never ended.
    let outcomes: Vec<Outcome> = stub.arrivals().iter().map(|a| a.outcome).collect();
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Incomplete),
        "{outcomes:?}"
    );
    assert_caller_errors(running.admin_addr, "body_timeout", 1.0).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_on_a_route_that_reads_it_first_is_408_and_never_forwarded() {
    let stub = ZohoStub::start(stub_routes()).await;
    // `cliq.forward_messages` reads the whole body before the call is judged.
    let yaml = format!(
        "{}{}  - name: messages.forward\n    method: POST\n    path: \"/api/v3/messages\"\n    limit: {LIMIT}\n    per: \"1m\"\n    lock: \"5m\"\n    on_limit: reject\n    validate: cliq.forward_messages\n",
        client_body_yaml(),
        routes_yaml()
    );
    let running = start_proxy(&config_yaml(&stub.url(), &yaml)).await;
    let mut wire = Wire::connect(running.proxy_addr).await;
    let sent = send_then_stall(&mut wire, "/api/v3/messages").await;
    assert_timed_out_and_closed(wire, sent).await;
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_while_queued_is_408_and_gives_its_slot_back() {
    // The slot comes well after the stall is noticed: three client_body periods away.
    let per = CLIENT_BODY * 3;
    let (stub, running) = stub_and_queueing_proxy(
        Method::POST,
        "chats.post_message",
        POST_MESSAGE,
        per,
        &client_body_yaml(),
    )
    .await;
    let admin = running.admin_addr;

    let mut first = Wire::connect(running.proxy_addr).await;
    first
        .send(format!(
            "{}{{}}",
            post_head("HTTP/1.1", "Content-Length: 2\r\n")
        ))
        .await;
    assert_eq!(first.answer("POST").await.status, 200);

    // Queued behind the first call's window, its body read while it waits: the stall is
    // noticed long before its slot.
    let mut second = Wire::connect(running.proxy_addr).await;
    let sent = send_then_stall(&mut second, "/api/v3/chats/C1/message").await;
    assert_timed_out_and_closed(second, sent).await;
    wait_for(
        "the stalled call to leave the queue, cancelled",
        QUEUE_PER,
        || async move {
            queue_depth(admin, "chats.post_message").await == 0.0
                && decisions(admin, "chats.post_message", "cancelled").await == 1.0
        },
    )
    .await;
    assert_eq!(stub.arrivals().len(), 1, "{:?}", stub.arrivals());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_that_keeps_arriving_in_pieces_outlasts_client_body_and_reaches_zoho_whole() {
    let (stub, running) = stub_and_proxy(&client_body_yaml()).await;
    let body: Vec<u8> = (0..DECLARED_BODY).map(|i| b'a' + (i % 26) as u8).collect();
    let mut wire = Wire::connect(running.proxy_addr).await;
    let started = Instant::now();
    wire.send(post_head(
        "HTTP/1.1",
        &format!("Content-Length: {DECLARED_BODY}\r\n"),
    ))
    .await;
    for piece in body.chunks(DECLARED_BODY / SLOW_BODY_PIECES) {
        tokio::time::sleep(SLOW_PIECE_PAUSE).await;
        wire.send(piece).await;
    }
    let answer = wire.answer("POST").await;
    // The premise: the body as a whole took longer than client_body.
    assert!(started.elapsed() > CLIENT_BODY, "{:?}", started.elapsed());
    assert_eq!(answer.status, 200, "{:?}", lossy(&answer.body));
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(arrivals[0].outcome, Outcome::Allowed);
    assert!(
        arrivals[0].body[..] == body[..],
        "the body reached Zoho changed"
    );
    // Still usable: the body was read to its end.
    wire.send(get_me("", "")).await;
    assert_eq!(wire.answer("GET").await.status, 200);
    running.shutdown().await;
}

// ---- an h2c stream that stalls its request body (`timeouts.client_body` over HTTP/2) ----

/// A request body the test sends piece by piece over an h2c stream (each piece one DATA
/// frame), ended by dropping its sender. `None`: no body at all (HEADERS with END_STREAM).
struct Trickle(Option<tokio::sync::mpsc::UnboundedReceiver<Bytes>>);

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match &mut self.0 {
            None => std::task::Poll::Ready(None),
            Some(pieces) => pieces
                .poll_recv(cx)
                .map(|piece| piece.map(|p| Ok(http_body::Frame::data(p)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

fn trickle() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, Trickle) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (tx, Trickle(Some(rx)))
}

/// A body that has [`SENT_BEFORE_STALL`] bytes ready and then nothing more (while the sender
/// is kept).
fn stalled_trickle() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, Trickle) {
    let (pieces, body) = trickle();
    pieces
        .send(Bytes::from(vec![b'x'; SENT_BEFORE_STALL]))
        .expect("the body is open");
    (pieces, body)
}

type H2Sender = hyper::client::conn::http2::SendRequest<Trickle>;

/// A new h2c connection (prior knowledge) to the proxy, whose streams are opened through the
/// returned sender (and its clones); it closes once they are all dropped.
async fn h2c_connection(addr: SocketAddr) -> H2Sender {
    let stream = tokio::time::timeout(READ_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect within the read timeout")
        .expect("connect to the proxy");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let handshake = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    );
    let (sender, connection) = tokio::time::timeout(READ_TIMEOUT, handshake)
        .await
        .expect("an HTTP/2 handshake within the read timeout")
        .expect("an HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

/// `POST /api/v3/chats/C1/message` from alice, declaring [`DECLARED_BODY`] bytes.
fn h2_post(addr: SocketAddr, body: Trickle) -> http::Request<Trickle> {
    http::Request::post(format!("http://{addr}/api/v3/chats/C1/message"))
        .header("authorization", "Zoho-oauthtoken alice")
        .header("content-type", "application/json")
        .header("content-length", DECLARED_BODY)
        .body(body)
        .expect("a well-formed request")
}

/// `GET /api/v2/me` from alice, without a body.
fn h2_get_me(addr: SocketAddr) -> http::Request<Trickle> {
    http::Request::get(format!("http://{addr}{ME}"))
        .header("authorization", "Zoho-oauthtoken alice")
        .body(Trickle(None))
        .expect("a well-formed request")
}

/// Opens a stream for `request` and reads its whole answer, within [`READ_TIMEOUT`].
async fn h2_exchange(sender: &mut H2Sender, request: http::Request<Trickle>) -> TestResponse {
    let exchange = async {
        sender
            .ready()
            .await
            .expect("the connection takes a new stream");
        let response = sender.send_request(request).await.expect("an answer");
        TestResponse::read(response)
            .await
            .expect("the whole answer body")
    };
    tokio::time::timeout(READ_TIMEOUT, exchange)
        .await
        .expect("answered within the read timeout")
}

/// The stalled stream was answered 408 in Zoho's envelope, not before `client_body` had passed
/// since `sent` (HTTP/2 has no `Connection: close`: only the stream ends).
fn assert_h2_timed_out(answer: &TestResponse, sent: Instant) {
    let took = sent.elapsed();
    assert_eq!(answer.version, http::Version::HTTP_2);
    assert_eq!(
        answer.status,
        StatusCode::REQUEST_TIMEOUT,
        "{}",
        answer.text()
    );
    let content_type = answer.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?}"
    );
    let body = answer.json();
    assert_eq!(body["code"], "request_timeout", "body: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "body: {body}"
    );
    assert!(
        took >= CLIENT_BODY,
        "answered after {took:?}, before client_body ({CLIENT_BODY:?})"
    );
    // READ_TIMEOUT is three client_body periods.
    assert!(took < READ_TIMEOUT, "answered after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_h2_body_is_408_after_client_body_and_zoho_never_gets_a_whole_call() {
    let (stub, running) = stub_and_proxy(&client_body_yaml()).await;
    let addr = running.proxy_addr;
    let mut h2 = h2c_connection(addr).await;
    let (pieces, body) = stalled_trickle();
    let sent = Instant::now();
    let answer = h2_exchange(&mut h2, h2_post(addr, body)).await;
    assert_h2_timed_out(&answer, sent);
    // The call went out with its body streaming and was cut short: Zoho cannot act on it.
    wait_for(
        "the cut-short call to end at the stub",
        READ_TIMEOUT,
        || {
            let stub = &stub;
            async move { !stub.arrivals().is_empty() }
        },
    )
    .await;
    let outcomes: Vec<Outcome> = stub.arrivals().iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, [Outcome::Incomplete]);
    assert_caller_errors(running.admin_addr, "body_timeout", 1.0).await;
    drop((pieces, h2));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_connection_serves_other_streams_while_and_after_one_stalls_its_body() {
    let (stub, running) = stub_and_proxy(&client_body_yaml()).await;
    let addr = running.proxy_addr;
    let mut h2 = h2c_connection(addr).await;
    let (pieces, body) = stalled_trickle();
    let sent = Instant::now();
    let mut stalled_stream = h2.clone();
    let stalled =
        tokio::spawn(async move { h2_exchange(&mut stalled_stream, h2_post(addr, body)).await });
    wait_for(
        "the stalled call to go out (the stub accepts its connection)",
        READ_TIMEOUT,
        || {
            let stub = &stub;
            async move { stub.connections_accepted() >= 1 }
        },
    )
    .await;

    // While one stream's body is stalled, another stream on the connection is served.
    let during = h2_exchange(&mut h2, h2_get_me(addr)).await;
    assert_eq!(during.status, StatusCode::OK, "{}", during.text());
    assert!(
        !stalled.is_finished(),
        "the stalled call was answered early"
    );

    let answer = stalled.await.expect("the stalled stream's task");
    assert_h2_timed_out(&answer, sent);
    // What the caller's client sees after the 408: the whole answer, then its stream ended by
    // the proxy (RST_STREAM NO_ERROR, RFC 9113 section 8.1), so it stops sending the body.
    wait_for(
        "the client to stop sending the stalled body",
        READ_TIMEOUT,
        || {
            let pieces = &pieces;
            async move { pieces.is_closed() }
        },
    )
    .await;

    // And the connection still carries new streams.
    let after = h2_exchange(&mut h2, h2_get_me(addr)).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.text());
    assert_eq!(after.version, http::Version::HTTP_2);
    let gets = stub
        .arrivals()
        .iter()
        .filter(|a| a.method == Method::GET && a.outcome == Outcome::Allowed)
        .count();
    assert_eq!(gets, 2, "{:?}", stub.arrivals());
    drop(h2);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_body_that_keeps_arriving_in_pieces_outlasts_client_body_and_reaches_zoho_whole() {
    let (stub, running) = stub_and_proxy(&client_body_yaml()).await;
    let addr = running.proxy_addr;
    let body: Vec<u8> = (0..DECLARED_BODY).map(|i| b'a' + (i % 26) as u8).collect();
    let mut h2 = h2c_connection(addr).await;
    let (pieces, trickled) = trickle();
    let started = Instant::now();
    let caller = {
        let body = body.clone();
        tokio::spawn(async move {
            for piece in body.chunks(DECLARED_BODY / SLOW_BODY_PIECES) {
                tokio::time::sleep(SLOW_PIECE_PAUSE).await;
                pieces
                    .send(Bytes::copy_from_slice(piece))
                    .expect("the body is still read");
            }
            // Dropping the sender ends the body (END_STREAM).
        })
    };
    let answer = h2_exchange(&mut h2, h2_post(addr, trickled)).await;
    caller.await.expect("the caller task");
    // The premise: the body as a whole took longer than client_body.
    assert!(started.elapsed() > CLIENT_BODY, "{:?}", started.elapsed());
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(arrivals[0].outcome, Outcome::Allowed);
    assert!(
        arrivals[0].body[..] == body[..],
        "the body reached Zoho changed"
    );
    drop(h2);
    running.shutdown().await;
}
