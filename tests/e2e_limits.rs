//! End-to-end: the window guarantee and queue behaviour, with the real proxy in front of a
//! Zoho-like stub that enforces the sliding window and locks on any violation.
//!
//! Windows are short so the suite runs in seconds. The proxy's window is `per + safety_margin`;
//! the stub's is exactly `per`, like Zoho's.

mod support;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
/// Zoho's window in these tests: short, so a test spans a few windows in a few seconds.
const PER: Duration = Duration::from_millis(800);
/// Absorbs loopback and scheduler jitter between the proxy's send and the stub's arrival.
const MARGIN: Duration = Duration::from_millis(150);
/// Long enough that no lock ends during a test: a violation stays visible.
const LOCK: Duration = Duration::from_secs(60);
const LIMIT: u32 = 5;

fn chat_url(running: &cliqgate::app::Running, chat: &str) -> String {
    format!("{}/api/v3/chats/{chat}/message", base_url(running))
}

fn route_yaml(on_limit: &str, max_wait: &str, algorithm: &str) -> String {
    format!(
        "safety_margin: \"{}ms\"\nroutes:\n  - name: chats.post_message\n    method: POST\n    path: \"{CHAT}\"\n    limit: {LIMIT}\n    per: \"{}ms\"\n    lock: \"60s\"\n    on_limit: {on_limit}\n{max_wait}{algorithm}",
        MARGIN.as_millis(),
        PER.as_millis()
    )
}

/// `max_wait` is `None` for reject routes (the config refuses it there).
async fn setup(
    on_limit: &str,
    max_wait: Option<&str>,
    algorithm: &str,
) -> (ZohoStub, cliqgate::app::Running) {
    let max_wait = max_wait
        .map(|w| format!("    max_wait: \"{w}\"\n"))
        .unwrap_or_default();
    let max_wait = max_wait.as_str();
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK)]).await;
    let running = start_proxy(&config_yaml(
        &stub.url(),
        &route_yaml(on_limit, max_wait, algorithm),
    ))
    .await;
    (stub, running)
}

fn decisions(metrics: &str, decision: &str) -> f64 {
    metric_value(
        metrics,
        "cliqgate_requests_total",
        &[("route", "chats.post_message"), ("decision", decision)],
    )
    .unwrap_or(0.0)
}

/// Fires `calls` concurrent calls for each of `users` users; returns (user, status) per call.
async fn burst(
    running: &cliqgate::app::Running,
    users: usize,
    calls: usize,
) -> Vec<(String, StatusCode)> {
    let client = Client::new();
    let mut set = JoinSet::new();
    for u in 0..users {
        for c in 0..calls {
            let (client, url, user) = (
                client.clone(),
                chat_url(running, &format!("C{c}")),
                format!("user{u}"),
            );
            set.spawn(async move {
                let r = client.post(&url, &user, r#"{"text":"alert"}"#).await;
                (user, r.status)
            });
        }
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        out.push(done.expect("call task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bursts_in_reject_mode_never_violate() {
    let (stub, running) = setup("reject", None, "").await;
    let users = 12;
    let results = burst(&running, users, 3 * LIMIT as usize).await;
    assert_eq!(stub.violations(), 0, "the stub saw a threshold crossed");
    for u in 0..users {
        let user = format!("user{u}");
        let ok = results
            .iter()
            .filter(|(who, s)| *who == user && *s == StatusCode::OK)
            .count();
        let refused = results
            .iter()
            .filter(|(who, s)| *who == user && *s == StatusCode::TOO_MANY_REQUESTS)
            .count();
        assert_eq!(
            ok, LIMIT as usize,
            "{user}: a burst from idle gets its whole quota"
        );
        assert_eq!(
            ok + refused,
            3 * LIMIT as usize,
            "{user}: every call answered 200 or 429"
        );
        assert_eq!(stub.count_for(CHAT, &user), LIMIT as usize);
    }
    let m = scrape(running.admin_addr).await;
    assert_eq!(decisions(&m, "forwarded"), f64::from(LIMIT) * users as f64);
    assert_eq!(
        decisions(&m, "rejected"),
        f64::from(2 * LIMIT) * users as f64
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bursts_in_queue_mode_are_all_sent_without_violation() {
    let (stub, running) = setup("queue", Some("10s"), "").await;
    let users = 8;
    let calls = 2 * LIMIT as usize + 2; // three windows' worth
    let results = burst(&running, users, calls).await;
    assert!(
        results.iter().all(|(_, s)| *s == StatusCode::OK),
        "queued calls all go out eventually"
    );
    assert_eq!(stub.violations(), 0);
    for u in 0..users {
        let user = format!("user{u}");
        assert_eq!(stub.count_for(CHAT, &user), calls);
        assert!(stub.max_in_any_window(CHAT, &user, PER) <= LIMIT as usize);
    }
    let m = scrape(running.admin_addr).await;
    assert_eq!(
        decisions(&m, "forwarded"),
        f64::from(LIMIT) * users as f64,
        "the first window goes at once"
    );
    assert_eq!(
        decisions(&m, "delayed"),
        (calls - LIMIT as usize) as f64 * users as f64
    );
    assert_eq!(
        metric_value(
            &m,
            "cliqgate_queue_depth",
            &[("route", "chats.post_message")]
        ),
        Some(0.0)
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_algorithm_never_violates_either() {
    let (stub, running) = setup("queue", Some("10s"), "    algorithm: gcra\n    burst: 3\n").await;
    let results = burst(&running, 4, 8).await;
    assert!(results.iter().all(|(_, s)| *s == StatusCode::OK));
    assert_eq!(stub.violations(), 0);
    for u in 0..4 {
        assert!(stub.max_in_any_window(CHAT, &format!("user{u}"), PER) <= LIMIT as usize);
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_from_idle_is_forwarded_at_once() {
    let (stub, running) = setup("queue", Some("10s"), "").await;
    burst(&running, 1, LIMIT as usize).await;
    let m = scrape(running.admin_addr).await;
    assert_eq!(
        decisions(&m, "forwarded"),
        f64::from(LIMIT),
        "no call of the burst was queued"
    );
    assert_eq!(decisions(&m, "delayed"), 0.0);
    assert_eq!(stub.count_for(CHAT, "user0"), LIMIT as usize);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_drains_at_window_speed() {
    let (stub, running) = setup("queue", Some("10s"), "").await;
    let calls = 3 * LIMIT as usize;
    burst(&running, 1, calls).await;
    let mut times = stub.times_for(CHAT, "user0");
    times.sort();
    assert_eq!(times.len(), calls);
    let window = PER + MARGIN;
    for (i, t) in times.iter().enumerate() {
        let batch = (i / LIMIT as usize) as u32;
        let since_first = t.duration_since(times[0]);
        // Never early: batch n goes no sooner than n windows after the first.
        assert!(
            since_first + Duration::from_millis(5) >= window * batch,
            "call {i} at {since_first:?}"
        );
        // And not idling either: each batch goes within a window of its slot.
        assert!(
            since_first < window * (batch + 1),
            "call {i} at {since_first:?} waited a window too long"
        );
    }
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_beyond_max_wait_is_refused_without_waiting() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        1,
        Duration::from_secs(30),
        LOCK,
    )])
    .await;
    let yaml = format!(
        "routes:\n  - name: chats.post_message\n    method: POST\n    path: \"{CHAT}\"\n    limit: 1\n    per: \"30s\"\n    lock: \"60s\"\n    on_limit: queue\n    max_wait: \"5s\"\n"
    );
    let running = start_proxy(&config_yaml(&stub.url(), &yaml)).await;
    let client = Client::new();
    assert_eq!(
        client
            .post(&chat_url(&running, "C1"), "alice", "{}")
            .await
            .status,
        StatusCode::OK
    );
    let asked = Instant::now();
    let refused = client.post(&chat_url(&running, "C1"), "alice", "{}").await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "refused at once, not after max_wait"
    );
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let body = refused.json();
    assert_eq!(body["code"], "rate_limit_exceeded");
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("whole seconds");
    assert!(
        (29..=31).contains(&retry_after),
        "the slot is ~31 s away, said {retry_after}"
    );
    assert_eq!(body["retry_after"], retry_after);
    let m = scrape(running.admin_addr).await;
    assert_eq!(decisions(&m, "queue_timeout"), 1.0);
    assert_eq!(stub.count_for(CHAT, "alice"), 1);
    running.shutdown().await;
}

/// Sends a request over a raw connection and hangs up after `give_up`, before any answer.
async fn call_and_hang_up(addr: std::net::SocketAddr, request: String, give_up: Duration) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    tokio::time::sleep(give_up).await;
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_that_gives_up_while_queued_is_never_sent() {
    let stub = ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, 1, PER, LOCK),
        StubRoute::new(Method::GET, "/api/v2/me", 1, PER, LOCK),
    ])
    .await;
    let yaml = format!(
        "safety_margin: \"{}ms\"\ndefaults:\n  limit: 1\n  per: \"{}ms\"\n  lock: \"60s\"\n  on_limit: queue\n  max_wait: \"10s\"\nroutes:\n  - name: chats.post_message\n    method: POST\n    path: \"{CHAT}\"\n  - name: users.me\n    method: GET\n    path: /api/v2/me\n",
        MARGIN.as_millis(),
        PER.as_millis()
    );
    let running = start_proxy(&config_yaml(&stub.url(), &yaml)).await;
    let client = Client::new();
    let url = chat_url(&running, "C1");
    assert_eq!(
        client.post(&url, "alice", "{}").await.status,
        StatusCode::OK
    );
    assert_eq!(
        client
            .get(&format!("{}/api/v2/me", base_url(&running)), "alice")
            .await
            .status,
        StatusCode::OK
    );

    // Both give up well before their slot (one window away): a POST with a body, a GET without.
    let give_up = PER / 4;
    let head = "POST /api/v3/chats/C1/message HTTP/1.1\r\nhost: x\r\nauthorization: Zoho-oauthtoken alice\r\n";
    let post = format!("{head}content-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}");
    // This one hangs up in the middle of its body.
    let partial =
        format!("{head}content-type: application/json\r\ncontent-length: 10\r\n\r\n{{\"a\"");
    let get = "GET /api/v2/me HTTP/1.1\r\nhost: x\r\nauthorization: Zoho-oauthtoken alice\r\n\r\n"
        .to_string();
    tokio::join!(
        call_and_hang_up(running.proxy_addr, post, give_up),
        call_and_hang_up(running.proxy_addr, partial, give_up),
        call_and_hang_up(running.proxy_addr, get, give_up)
    );
    // Wait past the slot they held: nothing may arrive for them.
    tokio::time::sleep(PER + MARGIN * 2).await;
    assert_eq!(
        stub.count_for(CHAT, "alice"),
        1,
        "the POST of a departed caller was sent"
    );
    assert_eq!(
        stub.count_for("/api/v2/me", "alice"),
        1,
        "the GET of a departed caller was sent"
    );
    let m = scrape(running.admin_addr).await;
    assert_eq!(decisions(&m, "cancelled"), 2.0);
    assert_eq!(
        metric_value(
            &m,
            "cliqgate_requests_total",
            &[("route", "users.me"), ("decision", "cancelled")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "cliqgate_queue_depth",
            &[("route", "chats.post_message")]
        ),
        Some(0.0)
    );

    // The slot was given back: the next caller goes at once instead of a window later.
    let next = client.post(&url, "alice", "{}").await;
    assert_eq!(next.status, StatusCode::OK);
    let m = scrape(running.admin_addr).await;
    assert_eq!(
        decisions(&m, "forwarded"),
        2.0,
        "the freed slots were used at once"
    );
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_backlog_never_delays_another() {
    let (stub, running) = setup("queue", Some("10s"), "").await;
    let backlog = {
        let running_url = chat_url(&running, "C1");
        let client = Client::new();
        let mut set = JoinSet::new();
        for _ in 0..3 * LIMIT {
            let (client, url) = (client.clone(), running_url.clone());
            set.spawn(async move { client.post(&url, "busy", "{}").await.status });
        }
        set
    };
    // Let the backlog queue up, then a quiet user calls.
    wait_for(
        "the busy user's backlog to queue",
        Duration::from_secs(5),
        || async {
            let m = scrape(running.admin_addr).await;
            metric_value(
                &m,
                "cliqgate_queue_depth",
                &[("route", "chats.post_message")],
            ) >= Some(f64::from(2 * LIMIT))
        },
    )
    .await;
    let asked = Instant::now();
    let quiet = Client::new()
        .post(&chat_url(&running, "C1"), "quiet", "{}")
        .await;
    let waited = asked.elapsed();
    assert_eq!(quiet.status, StatusCode::OK);
    assert!(
        waited < PER,
        "the quiet user waited {waited:?} behind another user's queue"
    );
    assert_eq!(stub.count_for(CHAT, "quiet"), 1);
    let statuses = backlog.join_all().await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_in_one_route_share_one_quota() {
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        "/api/v3/chats/{chat_id}/{kind}",
        2,
        PER,
        LOCK,
    )])
    .await;
    let yaml = format!(
        "routes:\n  - name: chats.post_message\n    method: POST\n    path: [\"/api/v3/chats/{{chat_id}}/message\", \"/api/v3/chats/{{chat_id}}/messages\"]\n    limit: 2\n    per: \"{}ms\"\n    lock: \"60s\"\n    on_limit: reject\n",
        PER.as_millis()
    );
    let running = start_proxy(&config_yaml(&stub.url(), &yaml)).await;
    let client = Client::new();
    let base = base_url(&running);
    let a = client
        .post(&format!("{base}/api/v3/chats/C1/message"), "alice", "{}")
        .await;
    let b = client
        .post(&format!("{base}/api/v3/chats/C1/messages"), "alice", "{}")
        .await;
    let c = client
        .post(&format!("{base}/api/v3/chats/C1/messages"), "alice", "{}")
        .await;
    assert_eq!(
        (a.status, b.status, c.status),
        (
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        )
    );
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_what_the_stub_saw() {
    let (stub, running) = setup("queue", Some("1s"), "").await;
    // Some go at once, some wait, some are refused for max_wait: a mix.
    let results = burst(&running, 3, 3 * LIMIT as usize).await;
    let m = scrape(running.admin_addr).await;
    let sent = decisions(&m, "forwarded") + decisions(&m, "delayed");
    let arrivals = stub.arrivals().len() as f64;
    assert_eq!(sent, arrivals, "forwarded + delayed = calls Zoho received");
    let ok = results.iter().filter(|(_, s)| *s == StatusCode::OK).count() as f64;
    assert_eq!(
        metric_value(
            &m,
            "cliqgate_upstream_responses_total",
            &[("route", "chats.post_message"), ("code", "200")]
        ),
        Some(ok)
    );
    let refused = results
        .iter()
        .filter(|(_, s)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count() as f64;
    assert_eq!(
        decisions(&m, "queue_timeout") + decisions(&m, "rejected"),
        refused
    );
    assert!(
        refused > 0.0 && decisions(&m, "delayed") > 0.0,
        "the scenario exercised both paths"
    );
    assert_eq!(
        metric_value(
            &m,
            "cliqgate_upstream_duration_seconds_count",
            &[("route", "chats.post_message")]
        ),
        Some(arrivals)
    );
    assert_eq!(
        metric_value(
            &m,
            "cliqgate_upstream_throttled_total",
            &[("route", "chats.post_message")]
        ),
        Some(0.0)
    );
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}
