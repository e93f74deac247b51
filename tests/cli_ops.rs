//! The real binary under operations (issue 5): SIGHUP reloads, a refused reload, the file watch,
//! shadow routes in the access log, and SIGTERM with calls still queued.
//!
//! Every test runs `target/.../cliqgate` as a child process (killed if the test fails) with its
//! config in a temp dir, parses its JSON logs, and bounds every wait on it.

mod support;

use support::*;

/// Upper bound on a reload (signal or file change) showing in `/metrics`: the signal is handled
/// at once, the watch debounces for 300 ms.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on exiting after SIGTERM: the test configs' drain deadline is shorter.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const CHAT_ROUTE: &str = "chats.post_message";
const CHANNEL: &str = "/api/v3/channelsbyname/{channel}/message";
const CHANNEL_ROUTE: &str = "channels.post_message";
/// Zoho's (and the routes') window: long, so no window ends during a test and every count is
/// exact.
const PER: Duration = Duration::from_secs(60);
const LOCK: Duration = Duration::from_secs(600);

/// Waits until `/metrics` counts `n` reloads with this `result`.
async fn wait_for_reloads(gate: &Gate, result: &str, n: f64) {
    let admin = gate.admin_addr;
    wait_for(
        &format!("{n} config reload(s) with result {result}"),
        RELOAD_TIMEOUT,
        || async move { reloads(&scrape(admin).await, result) >= n },
    )
    .await;
}

fn reloads(metrics: &str, result: &str) -> f64 {
    metric_value(
        metrics,
        "cliqgate_config_reloads_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

/// A config with JSON logs (info: the access log), ephemeral listeners, `top` lines (e.g.
/// `reload:`) and a reject-mode chat route allowing `limit` calls per [`PER`], plus `more` routes.
fn gate_yaml(upstream: &str, top: &str, limit: u32, more: &str) -> String {
    let chat = post_route(CHAT_ROUTE, CHAT, limit, PER, LOCK, "    on_limit: reject\n");
    gate_config(
        upstream,
        "info",
        "5s",
        &format!("{top}routes:\n{chat}{more}"),
    )
}

/// `n` calls one after the other from `user`; their statuses in order.
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

async fn chat_stub() -> ZohoStub {
    ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, 10, PER, LOCK),
        StubRoute::new(Method::POST, CHANNEL, 10, PER, LOCK),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_file_and_refuses_a_bad_one_without_stopping() {
    const OLD: u32 = 2;
    const NEW: u32 = 4;
    let stub = chat_stub().await;
    let mut gate = Gate::start(&gate_yaml(&stub.url(), "", OLD, "")).await;
    let client = Client::new();
    let chat = gate.url("/api/v3/chats/C1/message");

    assert_eq!(
        statuses(&client, &chat, "alice", 3).await,
        ok_then_429(2, 1)
    );

    // A new limit in the file, then SIGHUP.
    gate.rewrite_config(&gate_yaml(&stub.url(), "", NEW, ""));
    gate.signal("HUP");
    wait_for_reloads(&gate, "success", 1.0).await;
    gate.wait_for_event("config reloaded", RELOAD_TIMEOUT, |e| {
        e["message"] == "config reloaded"
    })
    .await;
    // In effect for a fresh user, and for alice on top of the two calls she already made.
    assert_eq!(statuses(&client, &chat, "bob", 5).await, ok_then_429(4, 1));
    assert_eq!(
        statuses(&client, &chat, "alice", 3).await,
        ok_then_429(2, 1)
    );

    // A broken file: refused, logged, counted; the process keeps running on the old config.
    std::fs::write(&gate.config, "routes: [\n  - name: x\n").expect("break the config");
    gate.signal("HUP");
    wait_for_reloads(&gate, "failure", 1.0).await;
    gate.assert_running();
    gate.wait_for_event(
        "an ERROR log line for the refused reload",
        RELOAD_TIMEOUT,
        |e| {
            e["level"] == "ERROR"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("reload refused"))
        },
    )
    .await;
    assert_eq!(
        statuses(&client, &chat, "carol", 5).await,
        ok_then_429(NEW as usize, 1)
    );
    let metrics = scrape(gate.admin_addr).await;
    assert_eq!(reloads(&metrics, "success"), 1.0);
    assert_eq!(reloads(&metrics, "failure"), 1.0);
    assert_eq!(stub.violations(), 0);

    gate.signal("TERM");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_config_file_reloads_without_a_signal() {
    const OLD: u32 = 1;
    const NEW: u32 = 3;
    let stub = chat_stub().await;
    let watch = "reload:\n  watch: true\n";
    let mut gate = Gate::start(&gate_yaml(&stub.url(), watch, OLD, "")).await;
    // The watch is set up just after `cliqgate listening`; a change before it would be missed.
    gate.wait_for_event("the config watch to be set up", RELOAD_TIMEOUT, |e| {
        e["message"] == "watching the config file for changes"
    })
    .await;
    let client = Client::new();
    let chat = gate.url("/api/v3/chats/C1/message");
    assert_eq!(
        statuses(&client, &chat, "alice", 2).await,
        ok_then_429(1, 1)
    );

    gate.rewrite_config(&gate_yaml(&stub.url(), watch, NEW, ""));
    wait_for_reloads(&gate, "success", 1.0).await;
    assert_eq!(statuses(&client, &chat, "bob", 4).await, ok_then_429(3, 1));

    // A broken edit is refused like a broken SIGHUP reload.
    gate.rewrite_config("routes: [\n");
    wait_for_reloads(&gate, "failure", 1.0).await;
    gate.assert_running();
    assert_eq!(
        statuses(&client, &chat, "carol", 4).await,
        ok_then_429(3, 1)
    );

    gate.signal("TERM");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_route_forwards_and_logs_what_it_would_have_done() {
    let stub = chat_stub().await;
    let shadow = post_route(
        CHANNEL_ROUTE,
        CHANNEL,
        1,
        PER,
        LOCK,
        "    on_limit: reject\n    mode: shadow\n",
    );
    let mut gate = Gate::start(&gate_yaml(&stub.url(), "", 2, &shadow)).await;
    let client = Client::new();
    let channel = gate.url("/api/v3/channelsbyname/ops/message");
    let chat = gate.url("/api/v3/chats/C1/message");
    assert_eq!(
        statuses(&client, &channel, "dave", 3).await,
        ok_then_429(3, 0)
    );
    assert_eq!(stub.count_for(CHANNEL, "dave"), 3);
    // The enforcing route next to it is untouched.
    assert_eq!(statuses(&client, &chat, "dave", 3).await, ok_then_429(2, 1));

    gate.signal("TERM");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
    let shadowed = gate.access_log_for(CHANNEL_ROUTE);
    let seen: Vec<(&str, bool, u64)> = shadowed
        .iter()
        .map(|e| {
            (
                e["decision"].as_str().unwrap_or("?"),
                e["shadow"].as_bool().unwrap_or(false),
                e["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("forwarded", true, 200),
            ("rejected", true, 200),
            ("rejected", true, 200)
        ],
        "{shadowed:#?}"
    );
    let enforced = gate.access_log_for(CHAT_ROUTE);
    assert!(
        enforced.iter().all(|e| e["shadow"] == false),
        "{enforced:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_a_call_queued_beyond_the_drain_and_exits_zero() {
    // One call per minute: the second one's slot is a minute away, far past the 5 s drain.
    let stub = chat_stub().await;
    let queue = post_route(
        CHANNEL_ROUTE,
        CHANNEL,
        1,
        PER,
        LOCK,
        "    on_limit: queue\n    max_wait: \"120s\"\n",
    );
    let mut gate = Gate::start(&gate_yaml(&stub.url(), "", 2, &queue)).await;
    let client = Client::new();
    let channel = gate.url("/api/v3/channelsbyname/ops/message");
    assert_eq!(
        statuses(&client, &channel, "erin", 1).await,
        ok_then_429(1, 0)
    );
    let queued = tokio::spawn({
        let (client, channel) = (client.clone(), channel.clone());
        async move { client.post(&channel, "erin", "{}").await }
    });
    let admin = gate.admin_addr;
    wait_for(
        "the second call to be queued",
        RELOAD_TIMEOUT,
        || async move {
            metric_value(
                &scrape(admin).await,
                "cliqgate_queue_depth",
                &[("route", CHANNEL_ROUTE)],
            ) == Some(1.0)
        },
    )
    .await;

    let signalled = Instant::now();
    gate.signal("TERM");
    let answer = tokio::time::timeout(CLIENT_TIMEOUT, queued)
        .await
        .expect("the queued call is answered")
        .expect("queued call task");
    let answered_after = signalled.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.text()
    );
    assert_eq!(answer.json()["code"], "shutting_down");
    assert!(answer.header("retry-after").is_some());
    assert!(
        answered_after < Duration::from_secs(2),
        "the refusal took {answered_after:?}: it should come at once"
    );
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert_eq!(stub.count_for(CHANNEL, "erin"), 1);
    let logged: Vec<(String, u64)> = gate
        .access_log_for(CHANNEL_ROUTE)
        .iter()
        .map(|e| {
            (
                e["decision"].as_str().unwrap_or("?").to_owned(),
                e["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        logged,
        [("forwarded".to_owned(), 200), ("rejected".to_owned(), 503)]
    );
}
