//! The real binary: `cliqgate check`, `cliqgate --config FILE`, its logs and its signals
//! (SPEC "Running", promise 5 "leak nothing").
//!
//! Every test runs `target/.../cliqgate` as a child process (killed if the test fails) and bounds
//! every wait on it.

mod support;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::header::AUTHORIZATION;
use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// sysexits.h EX_USAGE: what the binary exits with on a bad config (SPEC "Running").
const EXIT_BAD_CONFIG: i32 = 64;

/// Upper bound on `cliqgate check` and on a start that must fail: they read one small file.
/// Generous for a loaded CI machine, far below a CI job's timeout.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The drain deadline written into the test config (`timeouts.shutdown`).
const DRAIN_DEADLINE: &str = "20s";
/// Upper bound on exiting after SIGTERM/SIGINT. Well under [`DRAIN_DEADLINE`]: a drain that only
/// ends by hitting its deadline (e.g. waiting on idle keep-alive connections) fails the test.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the stub sits on the call that is in flight when SIGTERM arrives: long enough that
/// the signal surely lands while it is in flight.
const SLOW_CALL: Duration = Duration::from_secs(1);
/// How soon after the signal the proxy must refuse new connections: it closes its listener as
/// soon as the signal is handled.
const STOP_ACCEPTING_WITHIN: Duration = Duration::from_secs(5);

/// Credentials that must never appear in any log line, stdout, or `/metrics`.
const SECRET_TOKEN: &str = "SECRET-TOKEN-123";
const SECRET_ZAPIKEY: &str = "SECRET-ZAPI-456";

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const CHAT_ROUTE: &str = "chats.post_message";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs the binary to completion with `args`, bounded by [`COMMAND_TIMEOUT`].
async fn run(args: &[&OsStr]) -> Finished {
    run_to_exit(args, COMMAND_TIMEOUT).await
}

// ---- cliqgate check ----

#[tokio::test]
async fn check_accepts_the_shipped_config_and_lists_every_route() {
    let path = repo_file("config/cliq.yaml");
    let output = run(&["check".as_ref(), "--config".as_ref(), path.as_os_str()]).await;
    let stdout = output.stdout.clone();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        output.stderr.clone()
    );
    // Route names read straight from the file, independently of the config loader.
    let file = std::fs::read_to_string(&path).expect("read config/cliq.yaml");
    let names: Vec<&str> = file
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("- name:"))
        .map(|name| {
            name.split('#')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
        })
        .collect();
    assert!(
        names.len() > 20,
        "too few routes found in the file: {names:?}"
    );
    for name in names {
        assert!(
            stdout
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name)),
            "route {name} missing from the table:\n{stdout}"
        );
    }
}

/// One unknown key (line 4), one bad duration (line 5) and a route without `limit` (line 7).
const INVALID_CONFIG: &str = r#"listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
upstream: "http://127.0.0.1:1"
colour: blue
safety_margin: "1 fortnight"
routes:
  - name: chats.post_message
    method: POST
    path: "/api/v3/chats/{chat_id}/message"
    per: "1m"
    lock: "10m"
"#;

fn assert_every_error_reported(output: &Finished) {
    let stderr = output.stderr.clone();
    assert_eq!(output.status.code(), Some(EXIT_BAD_CONFIG), "{stderr}");
    for (line, key) in [(4, "colour"), (5, "safety_margin"), (7, "routes[0].limit")] {
        let wanted = format!("line {line}: {key}:");
        assert!(
            stderr.lines().any(|l| l.starts_with(&wanted)),
            "no error {wanted:?} in:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn check_reports_every_error_with_its_key_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, INVALID_CONFIG);
    let output = run(&["check".as_ref(), "--config".as_ref(), path.as_os_str()]).await;
    assert_every_error_reported(&output);
    assert!(
        !output.stdout.clone().contains("OK"),
        "{}",
        output.stdout.clone()
    );
}

#[tokio::test]
async fn invalid_config_stops_the_proxy_from_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, INVALID_CONFIG);
    let output = run(&["--config".as_ref(), path.as_os_str()]).await;
    assert_every_error_reported(&output);
}

#[tokio::test]
async fn check_on_a_missing_file_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no-such.yaml");
    let output = run(&["check".as_ref(), "--config".as_ref(), path.as_os_str()]).await;
    let stderr = output.stderr.clone();
    assert_eq!(output.status.code(), Some(EXIT_BAD_CONFIG), "{stderr}");
    assert!(stderr.contains("no-such.yaml"), "{stderr}");
}

#[tokio::test]
async fn check_refuses_a_zero_client_body_timeout_naming_key_and_line() {
    let path = repo_file("tests/fixtures/config/zero_client_body.yaml");
    let output = run(&["check".as_ref(), "--config".as_ref(), path.as_os_str()]).await;
    let stderr = output.stderr.clone();
    assert_eq!(output.status.code(), Some(EXIT_BAD_CONFIG), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("line 3: timeouts.client_body: must be greater than zero")),
        "{stderr}"
    );
}

// ---- the running proxy ----

/// A config with JSON logs at debug level (the most a troubleshooting operator would turn on),
/// ephemeral listeners, and one reject-mode route allowing two calls per minute.
fn gate_yaml(upstream: &str) -> String {
    let per = Duration::from_secs(60);
    let lock = Duration::from_secs(600);
    let chat = post_route(CHAT_ROUTE, CHAT, 2, per, lock, "    on_limit: reject\n");
    gate_config(
        upstream,
        "debug",
        DRAIN_DEADLINE,
        &format!("routes:\n{chat}"),
    )
}

/// A call carrying both secrets: the OAuth token in `Authorization` and the webhook key in the
/// query.
fn secret_call(url: &str, with_token: bool) -> http::Request<http_body_util::Full<Bytes>> {
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}zapikey={SECRET_ZAPIKEY}");
    let mut req = request(Method::POST, &url, None, r#"{"text":"hi"}"#);
    if with_token {
        req.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Zoho-oauthtoken {SECRET_TOKEN}")).expect("valid"),
        );
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_proxy_serves_logs_each_call_and_never_shows_a_credential() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        100,
        Duration::from_secs(60),
        Duration::from_secs(600),
    )])
    .await;
    let mut gate = Gate::start(&gate_yaml(&stub.url())).await;
    let client = Client::new();

    for path in ["/healthz", "/readyz"] {
        let answer = client
            .send(request(
                Method::GET,
                &gate.admin_url(path),
                None,
                Bytes::new(),
            ))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
    }

    // Token user: forwarded, with both secrets reaching Zoho untouched.
    let chat = gate.url("/api/v3/chats/C1/message");
    let ok = client.send(secret_call(&chat, true)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let arrival = stub.arrivals().pop().expect("the call reached the stub");
    assert_eq!(
        arrival.query.as_deref(),
        Some(format!("zapikey={SECRET_ZAPIKEY}").as_str())
    );
    assert_eq!(
        arrival
            .headers
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        Some(format!("Zoho-oauthtoken {SECRET_TOKEN}").as_bytes())
    );
    // The line is written as the answer goes out; it reaches this side's reader a moment later.
    gate.wait_for_event(
        "the access-log line of the forwarded call",
        Duration::from_secs(5),
        |e| e["target"] == "cliqgate::access" && e["status"] == 200,
    )
    .await;
    let first = gate
        .access_log()
        .into_iter()
        .find(|e| e["status"] == 200)
        .expect("an access-log line for the forwarded call");
    assert_eq!(first["route"], CHAT_ROUTE, "{first}");
    assert_eq!(first["decision"], "forwarded", "{first}");
    assert!(first["queue_wait_ms"].is_number(), "{first}");
    let user = first["user"].as_str().expect("user in the access log");
    assert!(
        user.len() == 16 && user.bytes().all(|b| b.is_ascii_hexdigit()),
        "user is not a short hash: {first}"
    );

    // Zoho refuses the token (401): passed through. That is the token user's second call.
    stub.set_fixed_response(Some(FixedResponse::json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"code": "oauthtoken_invalid", "message": "Invalid OAuth token"}),
    )));
    let unauthorized = client.send(secret_call(&chat, true)).await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
    // Third call within the minute: refused by cliqgate (429, rejected).
    let rejected = client.send(secret_call(&chat, true)).await;
    assert_eq!(rejected.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(rejected.json()["code"], "rate_limit_exceeded");

    // Webhook-key user (no Authorization): Zoho throttles it, which locks it (and is logged).
    stub.set_fixed_response(Some(FixedResponse::json(
        StatusCode::TOO_MANY_REQUESTS,
        &serde_json::json!({"message": "Too many requests within a certain time frame."}),
    )));
    let throttled = client.send(secret_call(&chat, false)).await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    let locked = client.send(secret_call(&chat, false)).await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(locked.json()["code"], "rate_limit_exceeded");

    // Zoho unreachable: 502 from cliqgate, on an unmatched path (forwarded) with both secrets.
    stub.stop().await;
    let unavailable = client
        .send(secret_call(&gate.url("/api/v2/other/thing"), true))
        .await;
    assert_eq!(unavailable.status, StatusCode::BAD_GATEWAY);

    let metrics = scrape(gate.admin_addr).await;
    for secret in [SECRET_TOKEN, SECRET_ZAPIKEY] {
        assert!(!metrics.contains(secret), "{secret} in /metrics");
    }

    gate.signal("TERM");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");

    // One access-log line per call, each with the fields operators rely on.
    let access = gate.access_log();
    let statuses: Vec<u64> = access.iter().filter_map(|e| e["status"].as_u64()).collect();
    assert_eq!(statuses, [200, 401, 429, 429, 429, 502], "{access:#?}");
    for event in &access {
        for field in ["route", "user", "decision", "status", "queue_wait_ms"] {
            assert!(event.get(field).is_some(), "no {field} in {event}");
        }
    }
    let decisions: Vec<&str> = access
        .iter()
        .filter_map(|e| e["decision"].as_str())
        .collect();
    assert_eq!(
        decisions,
        [
            "forwarded",
            "forwarded",
            "rejected",
            "forwarded",
            "locked",
            "unmatched"
        ],
        "{access:#?}"
    );
    assert!(
        gate.events()
            .iter()
            .any(|e| e["level"] == "WARN" && e["route"] == CHAT_ROUTE),
        "the learned lock was not logged"
    );

    // Nothing anywhere in the output carries a credential.
    let output = [gate.process.stderr_lines(), gate.process.stdout_lines()].concat();
    for line in &output {
        for secret in [SECRET_TOKEN, SECRET_ZAPIKEY] {
            assert!(!line.contains(secret), "{secret} leaked: {line}");
        }
    }
}

/// Upper bound on one connection attempt while polling for the listener to close: a listener
/// that is open but no longer accepting fills its backlog, and connects then hang instead of
/// failing.
const CONNECT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether a TCP connection to `addr` is refused (nothing listening). A connect that neither
/// succeeds nor fails within [`CONNECT_PROBE_TIMEOUT`] counts as not refused.
async fn refuses_connections(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(CONNECT_PROBE_TIMEOUT, TcpStream::connect(addr)).await,
        Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_call_in_flight_refuses_new_ones_and_exits_zero() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        100,
        Duration::from_secs(60),
        Duration::from_secs(600),
    )])
    .await;
    stub.set_delay(SLOW_CALL);
    let mut gate = Gate::start(&gate_yaml(&stub.url())).await;
    let client = Client::new();

    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), gate.url("/api/v3/chats/C1/message"));
        async move { client.post(&url, "alice", "{}").await }
    });
    wait_for(
        "the slow call to reach the stub",
        CLIENT_TIMEOUT,
        || async { !stub.arrivals().is_empty() },
    )
    .await;

    gate.signal("TERM");
    let proxy_addr = gate.proxy_addr;
    wait_for(
        "the proxy to refuse new connections",
        STOP_ACCEPTING_WITHIN,
        || refuses_connections(proxy_addr),
    )
    .await;

    let answer = in_flight.await.expect("in-flight call task");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert_eq!(stub.arrivals().len(), 1);
    let messages: Vec<String> = gate
        .events()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("shutting down")),
        "{messages:?}"
    );
}

/// A request head and the first part of its body; the rest is sent when the test says so.
const BODY_START: &[u8] = br#"{"text":"#;
const BODY_REST: &[u8] = br#""hi"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_listener_while_a_call_is_still_in_flight() {
    // The call stays in flight for as long as the test holds back the end of its body (the stub
    // answers only whole requests), so the order of events does not depend on timing.
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        100,
        Duration::from_secs(60),
        Duration::from_secs(600),
    )])
    .await;
    let mut gate = Gate::start(&gate_yaml(&stub.url())).await;
    let mut call = TcpStream::connect(gate.proxy_addr)
        .await
        .expect("connect to the proxy");
    let head = format!(
        "POST /api/v3/chats/C1/message HTTP/1.1\r\nHost: cliq\r\nAuthorization: Zoho-oauthtoken alice\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        BODY_START.len() + BODY_REST.len()
    );
    call.write_all(head.as_bytes()).await.expect("send head");
    call.write_all(BODY_START).await.expect("send body start");
    // The proxy dials Zoho only once it has read the head and decided to forward.
    wait_for("the proxy to dial the stub", CLIENT_TIMEOUT, || async {
        stub.connections_accepted() > 0
    })
    .await;

    gate.signal("TERM");
    let proxy_addr = gate.proxy_addr;
    wait_for(
        "the proxy to refuse new connections",
        STOP_ACCEPTING_WITHIN,
        || refuses_connections(proxy_addr),
    )
    .await;
    assert!(stub.arrivals().is_empty(), "the call completed too early");

    // The call in flight still completes.
    call.write_all(BODY_REST).await.expect("send body rest");
    let mut answer = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, call.read_to_end(&mut answer))
        .await
        .expect("the answer within the client timeout")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let arrival = stub.arrivals().pop().expect("the call reached the stub");
    assert_eq!(&arrival.body[..], [BODY_START, BODY_REST].concat());

    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_the_proxy_with_exit_zero() {
    let stub = ZohoStub::start(vec![]).await;
    let mut gate = Gate::start(&gate_yaml(&stub.url())).await;
    // One call first, so a pooled keep-alive connection is open when the signal comes.
    let client = Client::new();
    let answer = client
        .send(request(
            Method::GET,
            &gate.url("/api/v2/anything"),
            None,
            Bytes::new(),
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());

    gate.signal("INT");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(refuses_connections(gate.proxy_addr).await);
    assert!(refuses_connections(gate.admin_addr).await);
}

// ---- worker threads ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_flag_sets_the_proxy_threads_and_zero_is_refused() {
    let stub = ZohoStub::start(vec![]).await;
    let mut gate = Gate::start_with_args(&gate_yaml(&stub.url()), &["--workers", "3"]).await;
    assert_eq!(gate.listening["workers"], 3, "{}", gate.listening);
    // Separate connections, so they land on different workers' sockets; all are served.
    for n in 0..12 {
        let answer = Client::new()
            .send(request(
                Method::GET,
                &gate.url(&format!("/api/v2/anything/{n}")),
                None,
                Bytes::new(),
            ))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    gate.signal("TERM");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(refuses_connections(gate.proxy_addr).await);

    let path = repo_file("config/cliq.yaml");
    let zero = run(&[
        "--workers".as_ref(),
        "0".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ])
    .await;
    assert_eq!(zero.status.code(), Some(2), "{}", zero.stderr);
    assert!(zero.stderr.contains("--workers"), "{}", zero.stderr);
}
