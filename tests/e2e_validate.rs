//! End-to-end: validation. Calls that break an endpoint's documented input limits are answered by
//! the proxy in Zoho's words, never reach the Zoho-like stub, and leave the user's quota whole;
//! valid calls at the edge of every limit go through byte for byte; a route without validation
//! forwards the same calls.
//!
//! Windows are long (a minute) so that nothing leaves a window during a test: every count below
//! is exact, and nothing depends on timing.

mod support;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use support::*;

const DELETE: &str = "/api/v3/chats/{chat_id}/messages";
const FORWARD: &str = "/api/v3/messages";
const SEARCH: &str = "/api/v3/messages/search";
/// Each route's quota in these tests: small, so "the whole quota is still there" is quick to show.
const LIMIT: u32 = 3;
/// Zoho's window here: no send leaves it during a test, so quotas never refill mid-test.
const PER: Duration = Duration::from_secs(60);
/// Long enough that no lock ends during a test.
const LOCK: Duration = Duration::from_secs(600);

/// The three validated endpoints, as the stub enforces them.
fn stub_routes() -> Vec<StubRoute> {
    vec![
        StubRoute::new(Method::DELETE, DELETE, LIMIT, PER, LOCK),
        StubRoute::new(Method::POST, FORWARD, LIMIT, PER, LOCK),
        StubRoute::new(Method::GET, SEARCH, LIMIT, PER, LOCK),
    ]
}

/// Routes for the three endpoints with `validate` set to each rule set, or to `none`; `extra`
/// (route fields, indented) is added to every route, `top` (top-level keys) to the file.
fn routes_yaml(validate: bool, extra: &str, top: &str) -> String {
    let route = |name: &str, method: &str, path: &str, rules: &str| {
        let rules = if validate { rules } else { "none" };
        format!(
            "  - name: {name}\n    method: {method}\n    path: \"{path}\"\n    limit: {LIMIT}\n    \
             per: \"60s\"\n    lock: \"10m\"\n    validate: {rules}\n{extra}"
        )
    };
    format!(
        "{top}routes:\n{}{}{}",
        route(
            "chats.delete_messages",
            "DELETE",
            DELETE,
            "cliq.delete_messages"
        ),
        route("messages.forward", "POST", FORWARD, "cliq.forward_messages"),
        route("messages.search", "GET", SEARCH, "cliq.search_messages"),
    )
}

/// A stub and a proxy in reject mode (a call over the quota is refused at once: no waiting).
async fn setup(validate: bool) -> (ZohoStub, cliqgate::app::Running) {
    setup_with(validate, "    on_limit: reject\n", "").await
}

async fn setup_with(validate: bool, extra: &str, top: &str) -> (ZohoStub, cliqgate::app::Running) {
    let stub = ZohoStub::start(stub_routes()).await;
    let yaml = config_yaml(&stub.url(), &routes_yaml(validate, extra, top));
    let running = start_proxy(&yaml).await;
    (stub, running)
}

/// `n` comma-separated message ids.
fn ids(n: usize) -> String {
    (1..=n)
        .map(|i| format!("17420000000{i:05}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` percent-encoded for a query string.
fn encoded(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A Forward messages body: `message_ids` ids from one chat, `recipients` as given (JSON members).
fn forward_body(message_ids: usize, recipients: &str) -> String {
    let ids: Vec<String> = (1..=message_ids)
        .map(|i| format!("\"17420000000{i:05}\""))
        .collect();
    format!(
        "{{\"source\": {{\"chat_id\": \"C_987654321\", \"message_ids\": [{}]}},\n \"recipients\": {{{recipients}}}}}",
        ids.join(", ")
    )
}

/// One call as a test sends it.
struct Call {
    method: Method,
    /// Path and query.
    target: String,
    body: String,
}

impl Call {
    fn delete(query: &str) -> Call {
        Call {
            method: Method::DELETE,
            target: format!("/api/v3/chats/C1/messages?{query}"),
            body: String::new(),
        }
    }

    fn forward(body: String) -> Call {
        Call {
            method: Method::POST,
            target: FORWARD.to_string(),
            body,
        }
    }

    fn search(query: &str) -> Call {
        Call {
            method: Method::GET,
            target: format!("{SEARCH}?{query}"),
            body: String::new(),
        }
    }

    /// The route's name in metrics and its template at the stub.
    fn route(&self) -> (&'static str, &'static str) {
        match self.method.as_str() {
            "DELETE" => ("chats.delete_messages", DELETE),
            "POST" => ("messages.forward", FORWARD),
            _ => ("messages.search", SEARCH),
        }
    }

    async fn send(&self, running: &cliqgate::app::Running, token: Option<&str>) -> TestResponse {
        let url = format!("{}{}", base_url(running), self.target);
        let mut req = request(self.method.clone(), &url, token, self.body.clone());
        if !self.body.is_empty() {
            req.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        Client::new().send(req).await
    }
}

/// Calls that break one rule each, with the code Zoho answers them with.
fn invalid_calls() -> Vec<(Call, &'static str)> {
    let recipients = |members: &str| forward_body(1, members);
    vec![
        (Call::delete(""), "invalid_parameters"),
        (Call::delete("message_ids="), "invalid_parameters"),
        (
            Call::delete(&format!("message_ids={}", ids(26))),
            "message_delete_limit_exceeded",
        ),
        (
            Call::delete("message_ids=1&reason=spam"),
            "invalid_delete_reason",
        ),
        (
            Call::delete(&format!(
                "message_ids=1&comment={}",
                encoded(&"é".repeat(251))
            )),
            "invalid_parameters",
        ),
        (Call::forward("source=C_1".into()), "invalid_parameters"),
        (
            Call::forward(r#"{"recipients": {"chat_ids": "C_1"}}"#.into()),
            "invalid_parameters",
        ),
        (
            Call::forward(forward_body(0, r#""chat_ids": "C_1""#)),
            "invalid_parameters",
        ),
        (
            Call::forward(forward_body(26, r#""chat_ids": "C_1""#)),
            "invalid_parameters",
        ),
        (
            Call::forward(recipients(&format!(r#""chat_ids": "{}""#, ids(101)))),
            "invalid_parameters",
        ),
        (
            Call::forward(recipients(&format!(r#""user_ids": "{}""#, ids(101)))),
            "invalid_parameters",
        ),
        (
            Call::forward(recipients(&format!(r#""title": "{}""#, "t".repeat(256)))),
            "invalid_parameters",
        ),
        (
            Call::search(&format!("query={}", "q".repeat(1001))),
            "invalid.inputs.submitted",
        ),
        (
            Call::search(&format!("chat_ids={}", ids(6))),
            "invalid.inputs.submitted",
        ),
        (Call::search("chat_type=dm"), "invalid.inputs.submitted"),
        (
            Call::search("channel_type=public"),
            "invalid.inputs.submitted",
        ),
        (
            Call::search("message_type=video"),
            "invalid.inputs.submitted",
        ),
        (
            Call::search("star_types=important,to_do,note,manager,idea,other"),
            "invalid.inputs.submitted",
        ),
        (
            Call::search(&format!("file_name={}", ids(11))),
            "invalid.inputs.submitted",
        ),
        (
            Call::search(&format!("file_type={}", "f".repeat(501))),
            "invalid.inputs.submitted",
        ),
        (Call::search("next_token=abc"), "invalid.inputs.submitted"),
    ]
}

/// Valid calls at the edge of every limit; `i` varies the ids so no two calls are alike.
fn edge_calls(i: usize) -> Vec<Call> {
    // 255 characters (1017 bytes of UTF-8).
    let title = format!("{}{i}", "🚀".repeat(254));
    vec![
        Call::delete(&format!(
            "message_ids={}&reason=others&comment={}&n={i}",
            ids(25),
            encoded(&"é".repeat(250))
        )),
        Call::forward(forward_body(
            25,
            &format!(
                "\"chat_ids\": \"{0}\", \"user_ids\": \"{0}\",\n  \"forward_as_group\": true, \"title\": \"{title}\"",
                ids(100)
            ),
        )),
        Call::search(&format!(
            "query={}&chat_ids={}&chat_type=direct_message,CHANNEL&star_types=important,to_do,note,manager,idea&file_name={}&next_token={}",
            "q".repeat(1000),
            ids(5),
            ids(10),
            i64::MAX - i as i64
        )),
    ]
}

/// A 400 in Zoho's envelope for the endpoint: flat for the v3 Messages API, nested under `error`
/// for Search messages. No `RateLimit` fields: the limiter was never asked.
fn assert_refused(response: &TestResponse, call: &Call, code: &str) {
    let what = format!(
        "{} {}",
        call.method,
        call.target.chars().take(80).collect::<String>()
    );
    assert_eq!(
        response.status,
        StatusCode::BAD_REQUEST,
        "{what}: {}",
        response.text()
    );
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{what}"
    );
    let body = response.json();
    let error = if call.method == Method::GET {
        assert!(body.get("code").is_none(), "{what}: nested only: {body}");
        &body["error"]
    } else {
        &body
    };
    assert_eq!(error["code"], code, "{what}: {body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert!(response.header("ratelimit").is_none(), "{what}");
    assert!(response.header("retry-after").is_none(), "{what}");
}

fn decisions(metrics: &str, route: &str, decision: &str) -> f64 {
    metric_value(
        metrics,
        "cliqgate_requests_total",
        &[("route", route), ("decision", decision)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_never_reach_zoho_and_leave_the_quota_whole() {
    let (stub, running) = setup(true).await;
    let invalid = invalid_calls();
    // Several times the quota of every route: were they counted, the valid calls below would fail.
    for _ in 0..2 {
        for (call, code) in &invalid {
            let response = call.send(&running, Some("alice")).await;
            assert_refused(&response, call, code);
        }
    }
    assert!(stub.arrivals().is_empty(), "{:?}", stub.arrivals());

    // The whole quota is still there: `LIMIT` valid calls per route go at once, counting down
    // from a full quota, and the next one is the first refused.
    for i in 0..LIMIT as usize {
        for call in edge_calls(i) {
            let response = call.send(&running, Some("alice")).await;
            let (route, _) = call.route();
            assert_eq!(
                response.status,
                StatusCode::OK,
                "{route}: {}",
                response.text()
            );
            let remaining = format!("\"{route}\";r={};", LIMIT as usize - 1 - i);
            assert!(
                response
                    .header("ratelimit")
                    .is_some_and(|v| v.starts_with(&remaining)),
                "{route}: call {i}: {:?}",
                response.header("ratelimit")
            );
        }
    }
    for call in edge_calls(LIMIT as usize) {
        let response = call.send(&running, Some("alice")).await;
        assert_eq!(
            response.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{:?}",
            call.route()
        );
    }

    assert_eq!(stub.violations(), 0);
    let metrics = scrape(running.admin_addr).await;
    for (route, template) in [
        ("chats.delete_messages", DELETE),
        ("messages.forward", FORWARD),
        ("messages.search", SEARCH),
    ] {
        assert_eq!(stub.count_for(template, "alice"), LIMIT as usize, "{route}");
        let refused = invalid.iter().filter(|(c, _)| c.route().0 == route).count();
        assert_eq!(
            decisions(&metrics, route, "invalid"),
            2.0 * refused as f64,
            "{route}"
        );
        assert_eq!(
            decisions(&metrics, route, "forwarded"),
            f64::from(LIMIT),
            "{route}"
        );
        assert_eq!(decisions(&metrics, route, "rejected"), 1.0, "{route}");
        assert_eq!(decisions(&metrics, route, "delayed"), 0.0, "{route}");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_calls_reach_zoho_byte_for_byte() {
    let (stub, running) = setup(true).await;
    let calls = edge_calls(0);
    for call in &calls {
        let response = call.send(&running, Some("alice")).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    }
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), calls.len());
    for (call, arrival) in calls.iter().zip(&arrivals) {
        let sent = format!(
            "{}{}",
            arrival.path,
            arrival
                .query
                .as_ref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        );
        assert_eq!(sent, call.target, "path and query untouched");
        assert_eq!(arrival.body, call.body.as_bytes(), "{sent}");
    }
    // The forward body was read to be checked: the same bytes went on, with a right length.
    let forward = &arrivals[1];
    assert_eq!(
        forward
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        Some(calls[1].body.len().to_string().as_str())
    );
    assert_eq!(forward.headers["content-type"], "application/json");
    running.shutdown().await;
}

/// The status code and body of a raw HTTP/1.1 answer (cliqgate's and the stub's answers carry a
/// Content-Length).
fn raw_status_and_body(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A chunked `POST /api/v3/messages` carrying `body` in `pieces` chunks.
fn chunked_forward(body: &[u8], pieces: usize) -> Vec<u8> {
    let mut raw = b"POST /api/v3/messages HTTP/1.1\r\n\
        Host: cliq.zoho.com\r\n\
        Authorization: Zoho-oauthtoken alice\r\n\
        Content-Type: application/json\r\n\
        Transfer-Encoding: chunked\r\n\
        Connection: close\r\n\
        \r\n"
        .to_vec();
    for chunk in body.chunks(body.len().div_ceil(pieces).max(1)) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_checked_whole_and_sent_with_its_length() {
    let (stub, running) = setup(true).await;
    let body = forward_body(2, r#""chat_ids": "C_111,C_222", "title": "Größe ✓""#);
    let raw = raw_exchange(running.proxy_addr, &chunked_forward(body.as_bytes(), 5)).await;
    let (status, answer) = raw_status_and_body(&raw);
    assert_eq!(status, 200, "{answer}");
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(arrivals[0].body, body.as_bytes());
    assert_eq!(
        arrivals[0]
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        Some(body.len().to_string().as_str()),
        "a body read whole goes on with its length"
    );
    assert!(arrivals[0].headers.get(TRANSFER_ENCODING).is_none());

    // Broken into chunks or not, a body that breaks a rule is refused.
    let bad = forward_body(26, r#""chat_ids": "C_1""#);
    let raw = raw_exchange(running.proxy_addr, &chunked_forward(bad.as_bytes(), 3)).await;
    let (status, answer) = raw_status_and_body(&raw);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("invalid_parameters"), "{answer}");
    assert_eq!(stub.arrivals().len(), 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_body_bytes_on_a_checked_route_never_leaves() {
    let (stub, running) = setup_with(
        true,
        "    on_limit: reject\n",
        "http:\n  max_body_bytes: 1024\n",
    )
    .await;
    // A valid body of 1024 bytes (padded with spaces) goes; one byte more is refused whole.
    let mut body = forward_body(1, r#""chat_ids": "C_1""#);
    body.push_str(&" ".repeat(1024 - body.len()));
    let raw = raw_exchange(running.proxy_addr, &chunked_forward(body.as_bytes(), 4)).await;
    assert_eq!(raw_status_and_body(&raw).0, 200);
    body.push(' ');
    let raw = raw_exchange(running.proxy_addr, &chunked_forward(body.as_bytes(), 4)).await;
    let (status, answer) = raw_status_and_body(&raw);
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    // Read before the call is judged, so Zoho sees none of it (not even an incomplete start).
    assert_eq!(stub.arrivals().len(), 1);
    let metrics = scrape(running.admin_addr).await;
    assert_eq!(decisions(&metrics, "messages.forward", "invalid"), 1.0);
    assert_eq!(decisions(&metrics, "messages.forward", "forwarded"), 1.0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_validation_switched_off_the_same_calls_are_forwarded() {
    let (stub, running) = setup(false).await;
    let invalid = invalid_calls();
    // One per route: the stub does not check, it only counts.
    let mut sent = Vec::new();
    for route in [
        "chats.delete_messages",
        "messages.forward",
        "messages.search",
    ] {
        let (call, _) = invalid
            .iter()
            .find(|(c, _)| c.route().0 == route)
            .expect("an invalid call per route");
        let response = call.send(&running, Some("alice")).await;
        assert_eq!(
            response.status,
            StatusCode::OK,
            "{route}: {}",
            response.text()
        );
        sent.push(call);
    }
    let arrivals = stub.arrivals();
    assert_eq!(arrivals.len(), sent.len());
    for (call, arrival) in sent.iter().zip(&arrivals) {
        assert_eq!(arrival.body, call.body.as_bytes());
    }
    let metrics = scrape(running.admin_addr).await;
    for route in [
        "chats.delete_messages",
        "messages.forward",
        "messages.search",
    ] {
        assert_eq!(decisions(&metrics, route, "invalid"), 0.0, "{route}");
        assert_eq!(decisions(&metrics, route, "forwarded"), 1.0, "{route}");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_credential_keeps_its_401() {
    let (stub, running) = setup(true).await;
    for (call, _) in &invalid_calls() {
        let response = call.send(&running, None).await;
        assert_eq!(response.status, StatusCode::UNAUTHORIZED);
        assert_eq!(response.json()["code"], "oauthtoken_missing");
    }
    assert!(stub.arrivals().is_empty());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_route_counts_invalid_calls_and_forwards_them_outside_the_limiter() {
    let (stub, running) = setup_with(true, "    on_limit: reject\n    mode: shadow\n", "").await;
    // Forwarded, so they do cost Zoho's quota (the stub's): stay under it.
    let bad = Call::delete("message_ids=1&reason=spam");
    for _ in 0..LIMIT - 1 {
        let response = bad.send(&running, Some("alice")).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    }
    // Enforcing would have spent nothing on them: the model still has the whole quota.
    let good = Call::delete("message_ids=1&reason=others");
    let response = good.send(&running, Some("alice")).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(stub.count_for(DELETE, "alice"), LIMIT as usize);
    assert_eq!(stub.violations(), 0);
    let full = format!("\"chats.delete_messages\";r={};", LIMIT - 1);
    assert!(
        response
            .header("ratelimit")
            .is_some_and(|v| v.starts_with(&full)),
        "{:?}",
        response.header("ratelimit")
    );
    let metrics = scrape(running.admin_addr).await;
    assert_eq!(
        decisions(&metrics, "chats.delete_messages", "invalid"),
        f64::from(LIMIT - 1)
    );
    assert_eq!(
        decisions(&metrics, "chats.delete_messages", "forwarded"),
        1.0
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_forward_call_sends_the_bytes_it_was_checked_with() {
    // One call per 300 ms window (plus margin): the second call waits for a slot, holding the
    // body that was read to check it.
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        FORWARD,
        1,
        Duration::from_millis(300),
        LOCK,
    )])
    .await;
    let yaml = config_yaml(
        &stub.url(),
        &format!(
            "safety_margin: \"150ms\"\nroutes:\n  - name: messages.forward\n    method: POST\n    \
             path: \"{FORWARD}\"\n    limit: 1\n    per: \"300ms\"\n    lock: \"10m\"\n    \
             max_wait: \"10s\"\n    validate: cliq.forward_messages\n"
        ),
    );
    let running = start_proxy(&yaml).await;
    let bodies = [
        forward_body(3, r#""chat_ids": "C_1", "title": "first""#),
        forward_body(4, r#""user_ids": "60025012345", "title": "second ✓""#),
    ];
    for body in &bodies {
        let response = Call::forward(body.clone())
            .send(&running, Some("alice"))
            .await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    }
    let arrivals = stub.arrivals();
    let received: Vec<&[u8]> = arrivals.iter().map(|a| a.body.as_ref()).collect();
    assert_eq!(received, [bodies[0].as_bytes(), bodies[1].as_bytes()]);
    assert_eq!(stub.violations(), 0);
    let metrics = scrape(running.admin_addr).await;
    assert_eq!(decisions(&metrics, "messages.forward", "delayed"), 1.0);
    running.shutdown().await;
}
