//! End-to-end operations (issue 5): hot reload, graceful drain and shadow routes, with the real
//! proxy in front of the Zoho-like stub, which locks a user out on any threshold crossing.
//!
//! Windows are short so the suite runs in seconds. The proxy's window is `per + safety_margin`;
//! the stub's is exactly `per`, like Zoho's.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cliqgate::app::{ReloadError, Running};
use cliqgate::config::Config;
use support::*;
use tokio::task::JoinSet;

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const CHAT_ROUTE: &str = "chats.post_message";
/// A second route, for reloads that change something next to the route under load.
const CHANNEL: &str = "/api/v3/channelsbyname/{channel}/message";
const CHANNEL_ROUTE: &str = "channels.post_message";
/// Zoho's window in most tests: short, so a test spans a few windows in a few seconds.
const PER: Duration = Duration::from_millis(800);
/// Absorbs loopback and scheduler jitter between the proxy's send and the stub's arrival.
const MARGIN: Duration = Duration::from_millis(150);
/// Long enough that no lock ends during a test: a violation stays visible.
const LOCK: Duration = Duration::from_secs(60);
const LIMIT: u32 = 4;
/// Upper bound on waiting for a group of calls that the test expects to be answered: longer than
/// any queue in these tests takes to drain, far below a CI job's timeout.
const CALLS_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on a metric reaching an expected value (e.g. calls entering a queue).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

// ---- building configs ----

/// One POST route; `extra` lines (e.g. `on_limit: queue`) are added to its mapping.
fn route(name: &str, path: &str, limit: u32, per: Duration, extra: &[&str]) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    method: POST\n    path: \"{path}\"\n    limit: {limit}\n    per: \"{}ms\"\n    lock: \"{}s\"\n",
        per.as_millis(),
        LOCK.as_secs()
    );
    for line in extra {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

/// A whole config in front of `stub`: [`MARGIN`], the `top` lines (e.g. `timeouts:`), `routes`.
fn config(stub: &ZohoStub, top: &str, routes: &[String]) -> String {
    config_yaml(
        &stub.url(),
        &format!(
            "safety_margin: \"{}ms\"\n{top}routes:\n{}",
            MARGIN.as_millis(),
            routes.concat()
        ),
    )
}

fn parse(yaml: &str) -> Config {
    Config::from_yaml(yaml)
        .unwrap_or_else(|errors| panic!("invalid test config:\n{errors}\n---\n{yaml}"))
}

/// Writes `yaml` to `name` in `dir`, for `reload_from`.
fn write_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write the test config");
    path
}

// ---- calls and metrics ----

fn url(running: &Running, path: &str) -> String {
    format!("{}{path}", base_url(running))
}

fn chat_url(running: &Running) -> String {
    url(running, "/api/v3/chats/C1/message")
}

fn channel_url(running: &Running) -> String {
    url(running, "/api/v3/channelsbyname/ops/message")
}

/// `n` calls one after the other; their statuses in order.
async fn statuses(client: &Client, url: &str, user: &str, n: usize) -> Vec<StatusCode> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(client.post(url, user, r#"{"text":"hi"}"#).await.status);
    }
    out
}

/// `ok` times 200 then `refused` times 429.
fn ok_then_429(ok: usize, refused: usize) -> Vec<StatusCode> {
    let mut out = vec![StatusCode::OK; ok];
    out.extend(vec![StatusCode::TOO_MANY_REQUESTS; refused]);
    out
}

/// `n` concurrent calls from `user`; the answers, in completion order.
async fn burst(client: &Client, url: &str, user: &str, n: usize) -> Vec<TestResponse> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (client, url, user) = (client.clone(), url.to_owned(), user.to_owned());
        set.spawn(async move { client.post(&url, &user, r#"{"text":"hi"}"#).await });
    }
    join_all(set).await
}

/// Every task's result, bounded by [`CALLS_TIMEOUT`] in all.
async fn join_all<T: 'static>(mut set: JoinSet<T>) -> Vec<T> {
    let collect = async {
        let mut out = Vec::new();
        while let Some(done) = set.join_next().await {
            out.push(done.expect("call task"));
        }
        out
    };
    tokio::time::timeout(CALLS_TIMEOUT, collect)
        .await
        .unwrap_or_else(|_| panic!("calls still unanswered after {CALLS_TIMEOUT:?}"))
}

fn decisions(metrics: &str, route: &str, decision: &str) -> f64 {
    metric_value(
        metrics,
        "cliqgate_requests_total",
        &[("route", route), ("decision", decision)],
    )
    .unwrap_or(0.0)
}

fn reloads(metrics: &str, result: &str) -> f64 {
    metric_value(
        metrics,
        "cliqgate_config_reloads_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

fn queue_depth(metrics: &str, route: &str) -> f64 {
    metric_value(metrics, "cliqgate_queue_depth", &[("route", route)]).unwrap_or(0.0)
}

// ---- hot reload ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_no_call_and_trips_no_lock() {
    const USERS: usize = 4;
    /// Per user, one every [`STAGGER`]: about 6.7 calls/s against a quota of about 4.2/s, so
    /// queues build up while the reloads happen.
    const CALLS: usize = 16;
    const STAGGER: Duration = Duration::from_millis(150);
    const RELOADS: usize = 6;
    const RELOAD_EVERY: Duration = Duration::from_millis(350);

    let stub = ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK),
        StubRoute::new(Method::POST, CHANNEL, LIMIT, PER, LOCK),
    ])
    .await;
    let chat = |max_wait: &str| {
        let max_wait = format!("max_wait: \"{max_wait}\"");
        route(
            CHAT_ROUTE,
            CHAT,
            LIMIT,
            PER,
            &["on_limit: queue", &max_wait],
        )
    };
    // The route under load keeps its name and limit; its position, its max_wait, the queue
    // limits and the route next to it change.
    let variants = [
        config(&stub, "", &[chat("20s")]),
        config(
            &stub,
            "",
            &[
                route(CHANNEL_ROUTE, CHANNEL, 2, PER, &["on_limit: reject"]),
                chat("25s"),
            ],
        ),
        config(
            &stub,
            "queue:\n  max_per_user: 50\n",
            &[
                chat("30s"),
                route(CHANNEL_ROUTE, CHANNEL, 3, PER, &["on_limit: reject"]),
            ],
        ),
    ];
    let running = start_proxy(&variants[0]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::new();

    let started = Instant::now();
    let mut calls = JoinSet::new();
    for u in 0..USERS {
        for c in 0..CALLS {
            let (client, url, user) = (client.clone(), chat_url(&running), format!("user{u}"));
            let at = started + STAGGER * c as u32;
            calls.spawn(async move {
                tokio::time::sleep_until(at).await;
                let answer = client.post(&url, &user, r#"{"text":"hi"}"#).await;
                (user, answer)
            });
        }
    }
    let mut deepest_queue = 0.0_f64;
    for i in 0..RELOADS {
        tokio::time::sleep(RELOAD_EVERY).await;
        deepest_queue =
            deepest_queue.max(queue_depth(&scrape(running.admin_addr).await, CHAT_ROUTE));
        let path = write_file(
            dir.path(),
            &format!("cliqgate-{i}.yaml"),
            &variants[(i + 1) % variants.len()],
        );
        running.reload_from(&path).expect("a valid config reloads");
    }
    let results = join_all(calls).await;

    let failed: Vec<_> = results
        .iter()
        .filter(|(_, answer)| answer.status != StatusCode::OK)
        .map(|(user, answer)| format!("{user}: {} {}", answer.status, answer.text()))
        .collect();
    assert!(
        failed.is_empty(),
        "calls failed across reloads ({} violations at the stub): {failed:#?}",
        stub.violations()
    );
    assert!(
        deepest_queue > 0.0,
        "no reload happened while calls were queued: the test did not test reload under load"
    );
    assert_eq!(stub.violations(), 0, "the stub saw a threshold crossed");
    for u in 0..USERS {
        let user = format!("user{u}");
        assert_eq!(stub.count_for(CHAT, &user), CALLS, "{user}");
        assert!(
            stub.max_in_any_window(CHAT, &user, PER) <= LIMIT as usize,
            "{user}: more than {LIMIT} calls in one window"
        );
    }
    let m = scrape(running.admin_addr).await;
    assert_eq!(reloads(&m, "success"), RELOADS as f64);
    assert_eq!(reloads(&m, "failure"), 0.0);
    assert_eq!(queue_depth(&m, CHAT_ROUTE), 0.0);
    assert_eq!(
        decisions(&m, CHAT_ROUTE, "forwarded") + decisions(&m, CHAT_ROUTE, "delayed"),
        (USERS * CALLS) as f64
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_the_quota_a_user_used_just_before_it() {
    // Long enough that the window surely outlasts the reload.
    const HELD_PER: Duration = Duration::from_millis(1500);
    let stub = ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, LIMIT, HELD_PER, LOCK),
        StubRoute::new(Method::POST, CHANNEL, LIMIT, HELD_PER, LOCK),
    ])
    .await;
    let chat = route(CHAT_ROUTE, CHAT, LIMIT, HELD_PER, &["on_limit: reject"]);
    let channel = route(
        CHANNEL_ROUTE,
        CHANNEL,
        LIMIT,
        HELD_PER,
        &["on_limit: queue", "max_wait: \"20s\""],
    );
    let before = config(&stub, "", &[chat.clone(), channel.clone()]);
    // Same routes in the other order (so each sits at another index), plus a new one first.
    let other = route(
        "users.me",
        "/api/v2/me-too",
        10,
        HELD_PER,
        &["on_limit: reject"],
    );
    let after = config(&stub, "", &[other, channel, chat]);
    let running = start_proxy(&before).await;
    let client = Client::new();

    // alice spends her whole quota (reject route), bob his (queue route), just before a reload.
    let first = statuses(&client, &chat_url(&running), "alice", LIMIT as usize).await;
    assert_eq!(first, ok_then_429(LIMIT as usize, 0));
    let bob_first = burst(&client, &channel_url(&running), "bob", LIMIT as usize).await;
    assert!(bob_first.iter().all(|a| a.status == StatusCode::OK));
    running.reload(parse(&after)).expect("reload");

    // No fresh quota after it: alice is refused at once, bob's next burst waits for the window.
    let refused = client.post(&chat_url(&running), "alice", "{}").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert_eq!(refused.json()["code"], "rate_limit_exceeded");
    assert!(refused.header("retry-after").is_some());
    let bob_second = burst(&client, &channel_url(&running), "bob", LIMIT as usize).await;
    assert!(bob_second.iter().all(|a| a.status == StatusCode::OK));

    assert_eq!(stub.violations(), 0);
    assert_eq!(stub.count_for(CHAT, "alice"), LIMIT as usize);
    assert_eq!(stub.count_for(CHANNEL, "bob"), 2 * LIMIT as usize);
    assert!(stub.max_in_any_window(CHANNEL, "bob", HELD_PER) <= LIMIT as usize);
    let m = scrape(running.admin_addr).await;
    assert_eq!(decisions(&m, CHANNEL_ROUTE, "delayed"), f64::from(LIMIT));
    assert_eq!(decisions(&m, CHAT_ROUTE, "rejected"), 1.0);
    running.shutdown().await;
}

/// A reload that changes how users are told apart moves every caller to a new key: what they
/// sent before is under the old one. Every key is then held for one window, so nobody gets a
/// second quota around the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_changes_the_identity_holds_every_key_for_a_window() {
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK)]).await;
    let chat = [route(CHAT_ROUTE, CHAT, LIMIT, PER, &["on_limit: reject"])];
    let running = start_proxy(&config(&stub, "", &chat)).await;
    let client = Client::new();
    let url = chat_url(&running);
    assert_eq!(
        statuses(&client, &url, "alice", LIMIT as usize).await,
        ok_then_429(LIMIT as usize, 0)
    );

    let by_header = "identity:\n  mode: header\n  header: \"X-Cliq-User\"\n";
    running
        .reload(parse(&config(&stub, by_header, &chat)))
        .expect("reload");
    let as_alice = || {
        let mut req = request(Method::POST, &url, Some("alice"), Bytes::from_static(b"{}"));
        req.headers_mut()
            .insert("x-cliq-user", http::HeaderValue::from_static("alice"));
        req
    };
    // Her calls before the reload count under her token's key, not her header's.
    let refused = client.send(as_alice()).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert_eq!(stub.count_for(CHAT, "alice"), LIMIT as usize);
    // A window later her new key has its quota.
    tokio::time::sleep(PER + MARGIN * 2).await;
    let later = client.send(as_alice()).await;
    assert_eq!(later.status, StatusCode::OK, "{}", later.text());
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_a_new_limit_applies_it_to_new_calls() {
    const HIGH: u32 = 5;
    const LOW: u32 = 2;
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, HIGH, PER, LOCK)]).await;
    let with_limit = |limit| {
        config(
            &stub,
            "",
            &[route(CHAT_ROUTE, CHAT, limit, PER, &["on_limit: reject"])],
        )
    };
    let running = start_proxy(&with_limit(HIGH)).await;
    let client = Client::new();
    let chat = chat_url(&running);

    assert_eq!(
        statuses(&client, &chat, "carol", 6).await,
        ok_then_429(5, 1)
    );

    running.reload(parse(&with_limit(LOW))).expect("reload");
    // A fresh user gets the new, lower quota, and is told so.
    let first = client.post(&chat, "dave", "{}").await;
    assert_eq!(first.status, StatusCode::OK);
    let policy = first
        .header("ratelimit-policy")
        .expect("RateLimit-Policy")
        .to_owned();
    assert!(policy.contains(&format!("q={LOW}")), "{policy}");
    assert_eq!(statuses(&client, &chat, "dave", 2).await, ok_then_429(1, 1));
    // carol's five calls are still in the window: over the new quota, she waits them out.
    assert_eq!(
        statuses(&client, &chat, "carol", 1).await,
        ok_then_429(0, 1)
    );
    tokio::time::sleep(PER + MARGIN * 2).await;
    assert_eq!(
        statuses(&client, &chat, "carol", 3).await,
        ok_then_429(2, 1)
    );

    // And back up.
    running.reload(parse(&with_limit(HIGH))).expect("reload");
    assert_eq!(statuses(&client, &chat, "erin", 6).await, ok_then_429(5, 1));

    assert_eq!(stub.violations(), 0);
    assert_eq!(stub.count_for(CHAT, "carol"), 7);
    assert_eq!(stub.count_for(CHAT, "dave"), 2);
    running.shutdown().await;
}

/// `log` and `reload.watch` are set up once, at start: a reload keeps the ones in force (and says
/// so), so `/admin/config` shows what the process does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_log_and_watch_settings() {
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, 5, PER, LOCK)]).await;
    let routes = [route(CHAT_ROUTE, CHAT, 5, PER, &[])];
    let running = start_proxy(&config(&stub, "", &routes)).await;
    let changed = config(
        &stub,
        "log:\n  level: \"debug\"\n  format: json\nreload:\n  watch: true\n",
        &routes,
    );
    // config_yaml already sets `log`; the later one is the one to apply.
    let changed = changed.replacen("log:\n  level: \"warn\"\n", "", 1);
    running.reload(parse(&changed)).expect("reload");
    let shown = Client::new()
        .get(
            &format!("http://{}/admin/config", running.admin_addr),
            "unused",
        )
        .await
        .json();
    assert_eq!(shown["log"]["level"], "warn", "{shown}");
    assert_eq!(shown["reload"]["watch"], false, "{shown}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_keeps_the_old_config_and_is_counted() {
    const OLD: u32 = 2;
    const NEW: u32 = 3;
    // Long enough that no window ends within the test.
    const LONG_PER: Duration = Duration::from_secs(30);
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, 10, LONG_PER, LOCK)]).await;
    let with_limit = |limit| {
        config(
            &stub,
            "",
            &[route(
                CHAT_ROUTE,
                CHAT,
                limit,
                LONG_PER,
                &["on_limit: reject"],
            )],
        )
    };
    let running = start_proxy(&with_limit(OLD)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::new();
    let chat = chat_url(&running);
    let before = running.proxy();

    let broken_yaml = write_file(dir.path(), "broken-syntax.yaml", "routes: [\n  - name: x\n");
    let invalid = with_limit(NEW)
        .replace(&format!("limit: {NEW}"), "limit: 0")
        .replace("safety_margin:", "colour: blue\nsafety_margin:");
    let invalid = write_file(dir.path(), "invalid.yaml", &invalid);
    let missing = dir.path().join("no-such.yaml");
    for (i, path) in [broken_yaml, invalid, missing].iter().enumerate() {
        match running.reload_from(path) {
            Err(ReloadError::Config(_)) => {}
            other => panic!("{}: expected a config error, got {other:?}", path.display()),
        }
        let m = scrape(running.admin_addr).await;
        assert_eq!(reloads(&m, "failure"), (i + 1) as f64, "{}", path.display());
        assert_eq!(reloads(&m, "success"), 0.0);
        assert!(
            Arc::ptr_eq(&before, &running.proxy()),
            "{}: a refused reload replaced the proxy",
            path.display()
        );
    }

    // The old limit still applies, and is still what the proxy announces.
    let first = client.post(&chat, "frank", "{}").await;
    assert_eq!(first.status, StatusCode::OK);
    let policy = first
        .header("ratelimit-policy")
        .expect("RateLimit-Policy")
        .to_owned();
    assert!(policy.contains(&format!("q={OLD}")), "{policy}");
    assert_eq!(
        statuses(&client, &chat, "frank", 2).await,
        ok_then_429(1, 1)
    );

    // A good file afterwards is taken, and counted as such.
    let good = write_file(dir.path(), "good.yaml", &with_limit(NEW));
    running.reload_from(&good).expect("a valid config reloads");
    let m = scrape(running.admin_addr).await;
    assert_eq!(reloads(&m, "success"), 1.0);
    assert_eq!(reloads(&m, "failure"), 3.0);
    assert_eq!(statuses(&client, &chat, "gina", 4).await, ok_then_429(3, 1));
    // frank keeps his two calls: one more under the new limit.
    assert_eq!(
        statuses(&client, &chat, "frank", 2).await,
        ok_then_429(1, 1)
    );
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

// ---- graceful drain ----

/// The drain tests: Zoho's window and the proxy's shutdown timeout. A queued call's slot comes
/// every `DRAIN_PER + DRAIN_MARGIN` (1.6 s); the drain sends what comes before the shutdown
/// deadline (2 s less a tenth of it for the answers) and refuses the rest at once.
const DRAIN_PER: Duration = Duration::from_millis(1500);
const DRAIN_MARGIN: Duration = Duration::from_millis(100);
const SHUTDOWN: Duration = Duration::from_secs(2);
const DRAIN_LIMIT: u32 = 3;
/// Refusals for calls that cannot go before the deadline must come "at once": well before the
/// next slot (1.6 s away), with room for a loaded machine.
const REFUSE_WITHIN: Duration = Duration::from_millis(800);

fn drain_config(stub: &ZohoStub, shutdown: Duration) -> String {
    config_yaml(
        &stub.url(),
        &format!(
            "safety_margin: \"{}ms\"\ntimeouts:\n  shutdown: \"{}ms\"\nroutes:\n{}",
            DRAIN_MARGIN.as_millis(),
            shutdown.as_millis(),
            route(
                CHAT_ROUTE,
                CHAT,
                DRAIN_LIMIT,
                DRAIN_PER,
                &["on_limit: queue", "max_wait: \"30s\""]
            )
        ),
    )
}

/// An answer, or why there was none, and when it came.
type Answered = (String, Result<TestResponse, String>, Instant);

/// `calls` concurrent calls for each of `users` users, answers collected as they come.
fn spawn_calls(running: &Running, users: usize, calls: usize) -> JoinSet<Answered> {
    let client = Client::new();
    let mut set = JoinSet::new();
    for u in 0..users {
        for _ in 0..calls {
            let (client, url, user) = (client.clone(), chat_url(running), format!("user{u}"));
            set.spawn(async move {
                let req = request(Method::POST, &url, Some(&user), r#"{"text":"hi"}"#);
                let answer = client.try_send(req).await.map_err(|e| format!("{e:?}"));
                (user, answer, Instant::now())
            });
        }
    }
    set
}

/// How long after `shutdown()` returns an answer may still be on its way to the client (it was
/// written before; the client task only has to be scheduled to read it).
const ANSWER_DELIVERY: Duration = Duration::from_millis(300);

/// A drain is over when every accepted call has had its answer: in the binary, the process exits
/// right after and whatever is still running dies with it.
fn assert_answered_by(results: &[Answered], stopped: Instant) {
    for (user, answer, at) in results {
        assert!(
            *at <= stopped + ANSWER_DELIVERY,
            "{user}: answered {:?} after shutdown returned: {answer:?}",
            at.duration_since(stopped)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_answers_every_call_and_trips_no_lock() {
    const USERS: usize = 3;
    /// Four windows' worth each: batch 1 now, 2 at 1.6 s (before the deadline), 3 and 4 after.
    const CALLS: usize = 4 * DRAIN_LIMIT as usize;
    const SENT: usize = 2 * DRAIN_LIMIT as usize;
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        DRAIN_LIMIT,
        DRAIN_PER,
        LOCK,
    )])
    .await;
    let running = start_proxy(&drain_config(&stub, SHUTDOWN)).await;
    let started = Instant::now();
    let calls = spawn_calls(&running, USERS, CALLS);
    let queued = (USERS * (CALLS - DRAIN_LIMIT as usize)) as f64;
    let admin = running.admin_addr;
    wait_for("the calls to be queued", SETTLE_TIMEOUT, || async move {
        queue_depth(&scrape(admin).await, CHAT_ROUTE) >= queued
    })
    .await;
    let triggered = Instant::now();
    assert!(
        triggered - started < Duration::from_secs(1),
        "queueing took {:?}: batch 3's slot may now fall before the deadline",
        triggered - started
    );

    let proxy = running.proxy();
    tokio::time::timeout(SHUTDOWN + Duration::from_secs(1), running.shutdown())
        .await
        .expect("shutdown returns within its timeout");
    let stopped = Instant::now();
    let stopped_after = stopped - triggered;
    let results = join_all(calls).await;
    assert_answered_by(&results, stopped);

    let mut problems = Vec::new();
    for u in 0..USERS {
        let user = format!("user{u}");
        let mine: Vec<_> = results.iter().filter(|(who, _, _)| *who == user).collect();
        let mut sent = 0;
        let mut refused = 0;
        for (_, answer, at) in &mine {
            match answer {
                Ok(a) if a.status == StatusCode::OK => sent += 1,
                Ok(a) if a.status == StatusCode::SERVICE_UNAVAILABLE => {
                    refused += 1;
                    assert_eq!(a.json()["code"], "shutting_down", "{}", a.text());
                    let retry: u64 = a
                        .header("retry-after")
                        .expect("Retry-After on a drain refusal")
                        .parse()
                        .expect("whole seconds");
                    assert!(retry >= 1);
                    assert!(
                        at.duration_since(triggered) < REFUSE_WITHIN,
                        "a drain refusal took {:?}",
                        at.duration_since(triggered)
                    );
                }
                other => problems.push(format!("{user}: {other:?}")),
            }
        }
        assert_eq!(
            (sent, refused),
            (SENT, CALLS - SENT),
            "{user}: {problems:#?}"
        );
        assert_eq!(stub.count_for(CHAT, &user), SENT, "{user}");
        assert!(stub.max_in_any_window(CHAT, &user, DRAIN_PER) <= DRAIN_LIMIT as usize);
    }
    assert!(
        problems.is_empty(),
        "calls without a proper answer: {problems:#?}"
    );
    assert_eq!(stub.violations(), 0);
    // The last sent batch goes at 1.6 s; the drain then ends with the connections.
    assert!(
        stopped_after < SHUTDOWN + Duration::from_millis(500),
        "shutdown took {stopped_after:?}"
    );

    let m = proxy.metrics.encode();
    assert_eq!(
        decisions(&m, CHAT_ROUTE, "forwarded"),
        (USERS * DRAIN_LIMIT as usize) as f64
    );
    assert_eq!(
        decisions(&m, CHAT_ROUTE, "delayed"),
        (USERS * DRAIN_LIMIT as usize) as f64
    );
    assert_eq!(
        decisions(&m, CHAT_ROUTE, "rejected"),
        (USERS * (CALLS - SENT)) as f64
    );
    assert_eq!(queue_depth(&m, CHAT_ROUTE), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_shutdown_timeout_governs_the_drain() {
    // Started with a drain too short for the next slot (1.6 s away), reloaded with one long
    // enough: the queued calls must be sent, not cut off at the old deadline.
    const SHORT: Duration = Duration::from_secs(1);
    const LONG: Duration = Duration::from_secs(3);
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        DRAIN_LIMIT,
        DRAIN_PER,
        LOCK,
    )])
    .await;
    let running = start_proxy(&drain_config(&stub, SHORT)).await;
    running
        .reload(parse(&drain_config(&stub, LONG)))
        .expect("reload");
    let calls = spawn_calls(&running, 1, 2 * DRAIN_LIMIT as usize);
    let admin = running.admin_addr;
    wait_for("the calls to be queued", SETTLE_TIMEOUT, || async move {
        queue_depth(&scrape(admin).await, CHAT_ROUTE) >= f64::from(DRAIN_LIMIT)
    })
    .await;
    tokio::time::timeout(LONG + Duration::from_secs(1), running.shutdown())
        .await
        .expect("shutdown returns within its timeout");
    let stopped = Instant::now();
    let results = join_all(calls).await;
    assert_answered_by(&results, stopped);
    let bad: Vec<_> = results
        .iter()
        .filter(|(_, answer, _)| !matches!(answer, Ok(a) if a.status == StatusCode::OK))
        .collect();
    assert!(bad.is_empty(), "queued calls not sent: {bad:#?}");
    assert_eq!(stub.count_for(CHAT, "user0"), 2 * DRAIN_LIMIT as usize);
    assert_eq!(stub.violations(), 0);
}

// ---- shadow mode ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_route_forwards_everything_and_counts_what_it_would_refuse() {
    const SHADOW_LIMIT: u32 = 2;
    const CALLS: usize = 6;
    // Zoho's real quota is higher than the limit being tried out.
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, 100, PER, LOCK)]).await;
    let yaml = config(
        &stub,
        "",
        &[route(
            CHAT_ROUTE,
            CHAT,
            SHADOW_LIMIT,
            PER,
            &["on_limit: reject", "mode: shadow"],
        )],
    );
    let running = start_proxy(&yaml).await;
    let client = Client::new();
    let answers = burst(&client, &chat_url(&running), "alice", CALLS).await;
    assert!(
        answers.iter().all(|a| a.status == StatusCode::OK),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(stub.count_for(CHAT, "alice"), CALLS);
    assert_eq!(stub.violations(), 0);
    let m = scrape(running.admin_addr).await;
    assert_eq!(
        decisions(&m, CHAT_ROUTE, "forwarded"),
        f64::from(SHADOW_LIMIT)
    );
    assert_eq!(
        decisions(&m, CHAT_ROUTE, "rejected"),
        (CALLS - SHADOW_LIMIT as usize) as f64
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_route_in_queue_mode_counts_delays_without_waiting() {
    const SHADOW_LIMIT: u32 = 2;
    const CALLS: usize = 6;
    // Enforced, this burst would take two more windows (4 s); in shadow it must not wait at all.
    const SHADOW_PER: Duration = Duration::from_secs(2);
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        100,
        SHADOW_PER,
        LOCK,
    )])
    .await;
    let yaml = config(
        &stub,
        "",
        &[route(
            CHAT_ROUTE,
            CHAT,
            SHADOW_LIMIT,
            SHADOW_PER,
            &["on_limit: queue", "max_wait: \"20s\"", "mode: shadow"],
        )],
    );
    let running = start_proxy(&yaml).await;
    let client = Client::new();
    let asked = Instant::now();
    let answers = burst(&client, &chat_url(&running), "alice", CALLS).await;
    let took = asked.elapsed();
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert!(
        took < SHADOW_PER / 2,
        "the shadow burst took {took:?}: it waited"
    );
    assert_eq!(stub.count_for(CHAT, "alice"), CALLS);
    let m = scrape(running.admin_addr).await;
    assert_eq!(
        decisions(&m, CHAT_ROUTE, "forwarded"),
        f64::from(SHADOW_LIMIT)
    );
    assert_eq!(
        decisions(&m, CHAT_ROUTE, "delayed"),
        (CALLS - SHADOW_LIMIT as usize) as f64
    );
    assert_eq!(queue_depth(&m, CHAT_ROUTE), 0.0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforcing_a_shadow_route_by_reload_starts_from_what_shadow_counted() {
    // The rollout: watch a new limit in shadow, then enforce it with a reload. The calls shadow
    // forwarded within the limit are already counted, so enforcement does not grant a fresh quota.
    const SHADOW_LIMIT: u32 = 2;
    const LONG_PER: Duration = Duration::from_secs(30);
    let stub = ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        100,
        LONG_PER,
        LOCK,
    )])
    .await;
    let with_mode = |mode: &str| {
        let mode = format!("mode: {mode}");
        config(
            &stub,
            "",
            &[route(
                CHAT_ROUTE,
                CHAT,
                SHADOW_LIMIT,
                LONG_PER,
                &["on_limit: reject", &mode],
            )],
        )
    };
    let running = start_proxy(&with_mode("shadow")).await;
    let client = Client::new();
    let chat = chat_url(&running);
    assert_eq!(
        statuses(&client, &chat, "alice", 3).await,
        ok_then_429(3, 0)
    );
    running
        .reload(parse(&with_mode("enforce")))
        .expect("reload");
    assert_eq!(
        statuses(&client, &chat, "alice", 1).await,
        ok_then_429(0, 1)
    );
    assert_eq!(statuses(&client, &chat, "bob", 3).await, ok_then_429(2, 1));
    assert_eq!(stub.count_for(CHAT, "alice"), 3);
    let m = scrape(running.admin_addr).await;
    // Shadow: forwarded 2 + rejected 1 (but sent); enforced: 2 + 2 rejected.
    assert_eq!(decisions(&m, CHAT_ROUTE, "forwarded"), 4.0);
    assert_eq!(decisions(&m, CHAT_ROUTE, "rejected"), 3.0);
    running.shutdown().await;
}
