//! Tests of the Zoho stub itself. It is the oracle every end-to-end test trusts to say "a lock
//! would have been tripped", so its arithmetic is tested exactly (pure functions, hand-built
//! times) and its HTTP behaviour end to end with short real sleeps.

mod support;

use std::sync::Arc;

use http::header::RETRY_AFTER;
use http::HeaderName;
use proptest::prelude::*;
use support::*;

const CHAT: &str = "/api/v3/chats/{chat_id}/message";

/// Window and lock for the end-to-end lock test: short so the test is quick, and the lock a clear
/// multiple of the window so "after `per` but before `lock` ends" is a wide target.
const PER: Duration = Duration::from_millis(300);
const LOCK: Duration = Duration::from_millis(900);
/// Added to deadlines taken from the stub's own clock, so a call lands clearly past them.
const SLACK: Duration = Duration::from_millis(100);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn chat_route(limit: u32, per: Duration, lock: Duration) -> StubRoute {
    StubRoute::new(Method::POST, CHAT, limit, per, lock)
}

fn chat_url(stub: &ZohoStub) -> String {
    format!("{}/api/v3/chats/C1/message", stub.url())
}

// ---------------------------------------------------------------- pure window arithmetic

#[test]
fn max_in_any_window_counts_half_open_windows() {
    let times = [ms(0), ms(10), ms(20), ms(300), ms(310), ms(600)];
    // [0, 300) holds 0, 10, 20; 300 is exactly one window after 0, so never with it.
    assert_eq!(max_in_any_window(&times, ms(300)), 3);
    // [10, 311) holds 10, 20, 300, 310.
    assert_eq!(max_in_any_window(&times, ms(301)), 4);
    assert_eq!(max_in_any_window(&times, ms(601)), 6);
    assert_eq!(max_in_any_window(&times, ms(1)), 1);
}

#[test]
fn max_in_any_window_edge_cases() {
    assert_eq!(max_in_any_window::<Duration>(&[], ms(100)), 0);
    assert_eq!(max_in_any_window(&[ms(5)], Duration::ZERO), 0);
    assert_eq!(max_in_any_window(&[ms(5), ms(5), ms(5)], ms(1)), 3);
    // Order of input does not matter.
    assert_eq!(
        max_in_any_window(&[ms(600), ms(0), ms(310), ms(10)], ms(301)),
        2
    );
    assert_eq!(max_in_any_window(&[ms(0), ms(300)], ms(300)), 1);
}

#[test]
fn max_in_any_window_works_on_instants() {
    let base = Instant::now();
    let times = [base, base + ms(299), base + ms(300)];
    assert_eq!(max_in_any_window(&times, ms(300)), 2);
}

proptest! {
    /// The linear scan agrees with the definition: for every start point, count what is within
    /// `window` of it.
    #[test]
    fn max_in_any_window_matches_brute_force(
        offsets in proptest::collection::vec(0u64..2_000, 0..60),
        window in 0u64..700,
    ) {
        let times: Vec<Duration> = offsets.iter().copied().map(ms).collect();
        let window = ms(window);
        let brute = times
            .iter()
            .map(|&s| times.iter().filter(|&&t| t >= s && t - s < window).count())
            .max()
            .unwrap_or(0);
        prop_assert_eq!(max_in_any_window(&times, window), brute);
    }
}

/// Feeds arrivals at the given offsets (ms) to a fresh quota and returns the verdicts.
fn verdicts(limit: u32, per: Duration, lock: Duration, offsets: &[u64]) -> Vec<Verdict> {
    let base = Instant::now();
    let mut quota = Quota::default();
    offsets
        .iter()
        .map(|&at| quota.arrive(base + ms(at), limit, per, lock))
        .collect()
}

#[test]
fn window_slides_rather_than_resetting() {
    use Verdict::*;
    // Limit 2 per 300 ms. At 350 the window is (50, 350]: only 200 and 350 are in it.
    assert_eq!(
        verdicts(2, ms(300), ms(600), &[0, 200, 350]),
        [Allowed, Allowed, Allowed]
    );
    // At 250 the window is (-50, 250]: 0, 100 and 250, one too many.
    assert_eq!(
        verdicts(2, ms(300), ms(600), &[0, 100, 250]),
        [Allowed, Allowed, Violation]
    );
    // A fixed window [0, 300), [300, 600) would allow 290 + 310; a sliding one does not.
    assert_eq!(
        verdicts(2, ms(300), ms(600), &[290, 295, 305]),
        [Allowed, Allowed, Violation]
    );
}

#[test]
fn a_call_exactly_per_old_has_left_the_window() {
    use Verdict::*;
    assert_eq!(
        verdicts(2, ms(300), ms(600), &[0, 0, 300]),
        [Allowed, Allowed, Allowed]
    );
    assert_eq!(
        verdicts(2, ms(300), ms(600), &[0, 0, 299]),
        [Allowed, Allowed, Violation]
    );
}

#[test]
fn violation_locks_for_lock_and_calls_during_it_still_count() {
    use Verdict::*;
    // Violation at 250 locks until 850. 400 and 849 are refused (not extending the lock). At 850
    // the window (550, 850] holds 849 and 850: allowed; at 860 it holds three: a new violation.
    assert_eq!(
        verdicts(2, ms(300), ms(600), &[0, 100, 250, 400, 849, 850, 860]),
        [Allowed, Allowed, Violation, Locked, Locked, Allowed, Violation]
    );
}

#[test]
fn templates_match_whole_non_empty_segments() {
    assert!(template_matches(CHAT, "/api/v3/chats/C1/message"));
    assert!(template_matches(CHAT, "/api/v3/chats/a%20b/message"));
    assert!(!template_matches(CHAT, "/api/v3/chats//message"));
    assert!(!template_matches(CHAT, "/api/v3/chats/C1/message/"));
    assert!(!template_matches(CHAT, "/api/v3/chats/C1/messages"));
    assert!(!template_matches(CHAT, "/api/v3/chats/C1/C2/message"));
    assert!(template_matches("/api/v2/me", "/api/v2/me"));
}

#[test]
fn credential_is_the_token_then_the_zapikey() {
    let mut headers = http::HeaderMap::new();
    assert_eq!(
        credential(&headers, Some("a=1&zapikey=k%201")),
        Some("k 1".into())
    );
    assert_eq!(credential(&headers, Some("zapikey=")), None);
    assert_eq!(credential(&headers, None), None);
    headers.insert("authorization", "Zoho-oauthtoken tok1".parse().unwrap());
    assert_eq!(credential(&headers, Some("zapikey=k")), Some("tok1".into()));
    headers.insert("authorization", "bearer tok2".parse().unwrap());
    assert_eq!(credential(&headers, None), Some("tok2".into()));
    headers.insert("authorization", "Basic dXNlcg==".parse().unwrap());
    assert_eq!(credential(&headers, None), None);
}

// ---------------------------------------------------------------- metrics text

const METRICS: &str = r#"# HELP cliqgate_requests_total Calls by decision.
# TYPE cliqgate_requests_total counter
cliqgate_requests_total{route="chats.post_message",decision="forwarded"} 7
cliqgate_requests_total{route="chats.post_message",decision="rejected"} 2 1700000000000
cliqgate_requests_total{decision="forwarded",route="odd \"name\\"} 1
cliqgate_queue_depth 3
cliqgate_upstream_duration_seconds_bucket{route="r",le="+Inf"} 9 # {trace_id="x"} 0.1
# EOF
"#;

#[test]
fn metric_value_finds_samples_by_name_and_label_subset() {
    let forwarded = [("route", "chats.post_message"), ("decision", "forwarded")];
    assert_eq!(
        metric_value(METRICS, "cliqgate_requests_total", &forwarded),
        Some(7.0)
    );
    assert_eq!(
        metric_value(
            METRICS,
            "cliqgate_requests_total",
            &[("decision", "rejected")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            METRICS,
            "cliqgate_requests_total",
            &[("route", r#"odd "name\"#)]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(METRICS, "cliqgate_queue_depth", &[]),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            METRICS,
            "cliqgate_upstream_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        Some(9.0)
    );
    assert_eq!(metric_value(METRICS, "cliqgate_requests", &[]), None);
    assert_eq!(
        metric_value(
            METRICS,
            "cliqgate_requests_total",
            &[("decision", "locked")]
        ),
        None
    );
    assert_eq!(
        metric_sum(
            METRICS,
            "cliqgate_requests_total",
            &[("route", "chats.post_message")]
        ),
        9.0
    );
}

// ---------------------------------------------------------------- the stub over HTTP

#[tokio::test]
async fn burst_of_limit_passes_then_one_more_locks_the_user_for_lock() {
    let stub = ZohoStub::start(vec![chat_route(3, PER, LOCK)]).await;
    let client = Client::new();
    let url = chat_url(&stub);

    for _ in 0..3 {
        let answer = client.post(&url, "alice", "{}").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.json()["ok"], true);
    }
    let over = client.post(&url, "alice", "{}").await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(stub.violations_for(CHAT, "alice"), 1);
    let violation_at = stub.arrivals()[3].at;
    let locked_until = stub
        .locked_until(CHAT, "alice")
        .expect("alice is locked after the violation");
    assert_eq!(locked_until, violation_at + LOCK);

    // Past `per` the window is empty again, but the lock still holds.
    tokio::time::sleep_until(violation_at + PER + SLACK).await;
    let during_lock = client.post(&url, "alice", "{}").await;
    assert_eq!(during_lock.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(stub.rejected_while_locked_for(CHAT, "alice"), 1);
    assert_eq!(
        stub.violations(),
        1,
        "a call during a lock is no new violation"
    );

    // Another user's quota is untouched.
    for _ in 0..3 {
        assert_eq!(client.post(&url, "bob", "{}").await.status, StatusCode::OK);
    }
    assert_eq!(stub.violations_for(CHAT, "bob"), 0);

    tokio::time::sleep_until(locked_until + SLACK).await;
    assert_eq!(
        client.post(&url, "alice", "{}").await.status,
        StatusCode::OK
    );
    assert_eq!(stub.count_for(CHAT, "alice"), 6);
    assert_eq!(stub.max_in_any_window(CHAT, "alice", PER), 4);
    assert_eq!(stub.max_in_any_window(CHAT, "bob", PER), 3);
}

/// Offsets for the sliding-window test over HTTP. The window is longer than in the pure test so
/// that scheduling jitter (tens of ms on a loaded CI box) cannot move a call across its edge.
const SLIDE_PER: Duration = Duration::from_millis(600);

#[tokio::test]
async fn stub_window_slides_over_http() {
    let stub = ZohoStub::start(vec![chat_route(2, SLIDE_PER, LOCK)]).await;
    let client = Client::new();
    let url = chat_url(&stub);
    let start = Instant::now();

    // carol at 0, 400, 700: the third's window (100, 700] holds two calls.
    // dave at 0, 200, 400: the third's window (-200, 400] holds three.
    let carol = async {
        let mut statuses = Vec::new();
        for at in [0, 400, 700] {
            tokio::time::sleep_until(start + ms(at)).await;
            statuses.push(client.post(&url, "carol", "{}").await.status);
        }
        statuses
    };
    let dave = async {
        let mut statuses = Vec::new();
        for at in [0, 200, 400] {
            tokio::time::sleep_until(start + ms(at)).await;
            statuses.push(client.post(&url, "dave", "{}").await.status);
        }
        statuses
    };
    let (carol, dave) = tokio::join!(carol, dave);
    assert_eq!(carol, [StatusCode::OK; 3]);
    assert_eq!(
        dave,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(stub.violations(), 1);
    assert_eq!(stub.violations_for(CHAT, "dave"), 1);
}

#[tokio::test]
async fn each_throttle_shape_is_answered_exactly() {
    for shape in ThrottleShape::ALL {
        for retry_after in [None, Some(7)] {
            let mut route = chat_route(1, PER, LOCK).signal(shape);
            route.retry_after = retry_after;
            let stub = ZohoStub::start(vec![route]).await;
            let client = Client::new();
            assert_eq!(
                client.post(&chat_url(&stub), "u", "{}").await.status,
                StatusCode::OK
            );
            let throttled = client.post(&chat_url(&stub), "u", "{}").await;
            assert_eq!(throttled.status, shape.status(), "{shape:?}");
            assert_eq!(throttled.text(), shape.body(), "{shape:?}");
            assert_eq!(
                throttled.header("content-type"),
                Some("application/json;charset=UTF-8")
            );
            assert_eq!(
                throttled.header(RETRY_AFTER.as_str()),
                retry_after.map(|s| s.to_string()).as_deref(),
                "{shape:?}"
            );
        }
    }
    assert_eq!(
        ThrottleShape::Http429Plain.body(),
        r#"{"message":"Too many requests within a certain time frame."}"#
    );
    assert_eq!(
        ThrottleShape::Http400RequestLimit.body(),
        r#"{"code":"request_limit_exceeded","message":"You have exceeded the URL throttle limits."}"#
    );
    assert_eq!(
        ThrottleShape::Http400UrlThrottle.status(),
        StatusCode::BAD_REQUEST
    );
    let error: serde_json::Value =
        serde_json::from_str(ThrottleShape::Http429Error.body()).unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn arrivals_are_recorded_raw() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::DELETE,
        "/api/v2/chats/{chat_id}/messages/{message_id}",
        20,
        PER,
        LOCK,
    )])
    .await;
    let client = Client::new();
    let url = format!(
        "{}/api/v2/chats/C1/messages/a%20b?reason=others&ids=1%2C2",
        stub.url()
    );
    let mut req = request(Method::DELETE, &url, Some("tok"), "raw \x00 body");
    req.headers_mut().insert("x-custom", "v1".parse().unwrap());
    let answer = client.send(req).await;
    assert_eq!(answer.status, StatusCode::OK);

    let arrivals = stub.arrivals();
    let arrival = &arrivals[0];
    assert_eq!(answer.json()["seq"], arrival.seq);
    assert_eq!(arrival.method, Method::DELETE);
    assert_eq!(arrival.path, "/api/v2/chats/C1/messages/a%20b");
    assert_eq!(arrival.query.as_deref(), Some("reason=others&ids=1%2C2"));
    assert_eq!(arrival.headers["x-custom"], "v1");
    assert_eq!(arrival.body, Bytes::from_static(b"raw \x00 body"));
    assert_eq!(
        arrival.route.as_deref(),
        Some("/api/v2/chats/{chat_id}/messages/{message_id}")
    );
    assert_eq!(arrival.user.as_deref(), Some("tok"));
    assert_eq!(arrival.outcome, Outcome::Allowed);
}

#[tokio::test]
async fn unmatched_and_uncredentialled_calls_are_recorded_but_not_counted() {
    let stub = ZohoStub::start(vec![chat_route(1, PER, LOCK)]).await;
    let client = Client::new();

    // Unmatched: any path, any number, always 200.
    for _ in 0..3 {
        let answer = client
            .get(&format!("{}/api/v2/elsewhere", stub.url()), "u")
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    // Wrong method on a known path is unmatched too.
    assert_eq!(
        client.get(&chat_url(&stub), "u").await.status,
        StatusCode::OK
    );
    // Matched but anonymous: Zoho's 401.
    let anonymous = client
        .send(request(Method::POST, &chat_url(&stub), None, "{}"))
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.json()["code"], "oauthtoken_missing");

    let outcomes: Vec<Outcome> = stub.arrivals().iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Unmatched,
            Outcome::Unmatched,
            Outcome::Unmatched,
            Outcome::Unmatched,
            Outcome::NoCredential
        ]
    );
    assert_eq!(stub.violations(), 0);
    // The quota is still whole.
    assert_eq!(
        client.post(&chat_url(&stub), "u", "{}").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn zapikey_and_custom_user_keys() {
    let stub = ZohoStub::start(vec![chat_route(1, PER, LOCK).any_method()]).await;
    let client = Client::new();

    let by_key = format!("{}?zapikey=hook%201", chat_url(&stub));
    let answer = client
        .send(request(Method::POST, &by_key, None, "{}"))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(stub.count_for(CHAT, "hook 1"), 1);

    // Header identity: two tokens, one user, one quota.
    stub.clear();
    stub.set_user_key(UserKey::Header(HeaderName::from_static("x-cliq-user")));
    let mut statuses = Vec::new();
    for token in ["t1", "t2"] {
        let mut req = request(Method::POST, &chat_url(&stub), Some(token), "{}");
        req.headers_mut()
            .insert("x-cliq-user", "zuid-7".parse().unwrap());
        statuses.push(client.send(req).await.status);
    }
    assert_eq!(statuses, [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
    assert_eq!(stub.violations_for(CHAT, "zuid-7"), 1);

    // Custom: tokens mapped to their owner, as Zoho sees them.
    stub.clear();
    stub.set_user_key(UserKey::Custom(Arc::new(|headers, query| {
        credential(headers, query).map(|token| token.trim_end_matches(char::is_numeric).to_owned())
    })));
    assert_eq!(
        client.post(&chat_url(&stub), "erin1", "{}").await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.post(&chat_url(&stub), "erin2", "{}").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(stub.violations_for(CHAT, "erin"), 1);
}

#[tokio::test]
async fn clear_forgets_calls_and_locks() {
    let stub = ZohoStub::start(vec![chat_route(1, PER, LOCK)]).await;
    let client = Client::new();
    client.post(&chat_url(&stub), "u", "{}").await;
    client.post(&chat_url(&stub), "u", "{}").await;
    assert!(stub.locked_until(CHAT, "u").is_some());
    stub.clear();
    assert!(stub.arrivals().is_empty());
    assert_eq!(stub.violations(), 0);
    assert_eq!(
        client.post(&chat_url(&stub), "u", "{}").await.status,
        StatusCode::OK
    );
    // Sequence numbers keep growing across a clear, so answers stay unambiguous.
    assert_eq!(stub.arrivals()[0].seq, 2);
}

/// Long enough to measure, short enough to keep the test quick.
const STUB_DELAY: Duration = Duration::from_millis(200);

#[tokio::test]
async fn fixed_response_delay_echo_and_responder() {
    let stub = ZohoStub::start(vec![chat_route(1, PER, LOCK)]).await;
    let client = Client::new();

    // A fixed answer overrides even a throttle, but the violation is still seen.
    let big = Bytes::from(vec![b'x'; 5 * 1024 * 1024]);
    stub.set_fixed_response(Some(
        FixedResponse::new(StatusCode::BAD_GATEWAY, big.clone())
            .header("x-a", "1")
            .header("x-a", "2"),
    ));
    stub.set_delay(STUB_DELAY);
    let began = Instant::now();
    client.post(&chat_url(&stub), "u", "{}").await;
    let answer = client.post(&chat_url(&stub), "u", "{}").await;
    assert!(began.elapsed() >= STUB_DELAY * 2);
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.body, big);
    let values: Vec<_> = answer.headers.get_all("x-a").iter().collect();
    assert_eq!(values, ["1", "2"]);
    assert_eq!(stub.violations(), 1);

    stub.set_fixed_response(None);
    stub.set_delay(Duration::ZERO);
    stub.set_echo(true);
    let url = format!("{}/api/v2/other?q=a%20b", stub.url());
    let echoed = client.post(&url, "u", "hi").await.json();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["path"], "/api/v2/other");
    assert_eq!(echoed["query"], "q=a%20b");
    assert_eq!(echoed["body_hex"], "6869");
    assert!(echoed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|pair| pair[0] == "authorization" && pair[1] == "Zoho-oauthtoken u"));

    stub.set_responder(Some(Arc::new(|arrival: &Arrival| {
        (arrival.path == "/api/v2/me").then(|| {
            FixedResponse::json(
                StatusCode::OK,
                &serde_json::json!({"data": {"zuid": arrival.user.clone()}}),
            )
        })
    })));
    let me = client
        .get(&format!("{}/api/v2/me", stub.url()), "tok9")
        .await;
    assert_eq!(me.json()["data"]["zuid"], "tok9");
    // Other paths fall through to echo.
    assert_eq!(
        client.post(&url, "u", "").await.json()["path"],
        "/api/v2/other"
    );
}

#[tokio::test]
async fn h2c_is_served() {
    let stub = ZohoStub::start(vec![chat_route(5, PER, LOCK)]).await;
    let answer = Client::h2c().post(&chat_url(&stub), "u", "{}").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.version, http::Version::HTTP_2);
    assert_eq!(stub.arrivals()[0].version, http::Version::HTTP_2);
}

#[tokio::test]
async fn stopped_stub_refuses_connections() {
    let stub = ZohoStub::start(vec![]).await;
    let client = Client::new();
    assert_eq!(
        client.get(&format!("{}/x", stub.url()), "u").await.status,
        StatusCode::OK
    );
    stub.stop().await;
    // A fresh client, so no pooled connection hides the closed listener.
    let failed = Client::new()
        .try_send(request(
            Method::GET,
            &format!("{}/x", stub.url()),
            None,
            Bytes::new(),
        ))
        .await;
    assert!(matches!(failed, Err(ClientError::Request(_))), "{failed:?}");
    // The pooled connection was closed too.
    let pooled = client
        .try_send(request(
            Method::GET,
            &format!("{}/x", stub.url()),
            None,
            Bytes::new(),
        ))
        .await;
    assert!(pooled.is_err(), "{pooled:?}");
}

#[tokio::test]
async fn raw_exchange_reads_the_whole_answer() {
    let stub = ZohoStub::start(vec![]).await;
    let answer = raw_exchange(
        stub.addr(),
        b"GET /raw%20path HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with(r#"{"ok":true,"seq":0}"#), "{text}");
    assert_eq!(stub.arrivals()[0].path, "/raw%20path");
}
