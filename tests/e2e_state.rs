//! End-to-end: restart safety of the memory store (`store: {kind: memory, state_file: PATH}`).
//!
//! A proxy takes a burst, shuts down gracefully (writing its state), and a new proxy on the same
//! state file starts inside the same window: the Zoho-like stub must see no threshold crossed.
//! Stale and corrupt files are ignored (with a warning) and the proxy works as if started fresh.

mod support;

use std::path::{Path, PathBuf};

use support::*;
use tokio::task::JoinSet;

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
/// Zoho's window here: long enough that a restart fits well inside it.
const PER: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_millis(200);
const LOCK: Duration = Duration::from_secs(60);
const LIMIT: u32 = 5;

fn yaml(stub: &ZohoStub, on_limit: &str, state_file: Option<&Path>) -> String {
    let store = state_file
        .map(|p| {
            format!(
                "store:\n  kind: memory\n  state_file: \"{}\"\n",
                p.display()
            )
        })
        .unwrap_or_default();
    let max_wait = if on_limit == "queue" {
        "    max_wait: \"10s\"\n"
    } else {
        ""
    };
    config_yaml(
        &stub.url(),
        &format!(
            "safety_margin: \"{}ms\"\n{store}routes:\n  - name: chats.post_message\n    method: POST\n    path: \"{CHAT}\"\n    limit: {LIMIT}\n    per: \"{}ms\"\n    lock: \"60s\"\n    on_limit: {on_limit}\n{max_wait}",
            MARGIN.as_millis(),
            PER.as_millis()
        ),
    )
}

async fn stub() -> ZohoStub {
    ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK)]).await
}

/// `calls` concurrent calls of `user`; the statuses, in no particular order.
async fn burst(running: &cliqgate::app::Running, user: &str, calls: usize) -> Vec<StatusCode> {
    let client = Client::new();
    let mut set = JoinSet::new();
    for c in 0..calls {
        let url = format!("{}/api/v3/chats/C{c}/message", base_url(running));
        let (client, user) = (client.clone(), user.to_string());
        set.spawn(async move { client.post(&url, &user, r#"{"text":"hi"}"#).await.status });
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        out.push(done.expect("call task"));
    }
    out
}

fn count(statuses: &[StatusCode], status: StatusCode) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

/// A proxy on `yaml` that takes alice's whole quota (all of it forwarded), then shuts down
/// gracefully, writing its state.
async fn spend_alices_quota_and_stop(yaml: &str) {
    let first = start_proxy(yaml).await;
    let answers = burst(&first, "alice", LIMIT as usize).await;
    assert_eq!(
        count(&answers, StatusCode::OK),
        LIMIT as usize,
        "{answers:?}"
    );
    first.shutdown().await;
}

fn state_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_inside_the_window_refuses_the_second_burst() {
    let stub = stub().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = state_path(&dir);

    spend_alices_quota_and_stop(&yaml(&stub, "reject", Some(&path))).await;
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("state file written"))
            .expect("state file is JSON");
    assert_eq!(saved["version"], 1);
    assert_eq!(saved["keys"].as_array().map(Vec::len), Some(1), "{saved}");

    let second = start_proxy(&yaml(&stub, "reject", Some(&path))).await;
    let answers = burst(&second, "alice", LIMIT as usize).await;
    assert_eq!(
        count(&answers, StatusCode::TOO_MANY_REQUESTS),
        LIMIT as usize,
        "the restarted proxy remembers the window: {answers:?}"
    );
    // Another user was never limited.
    let bob = burst(&second, "bob", LIMIT as usize).await;
    assert_eq!(count(&bob, StatusCode::OK), LIMIT as usize, "{bob:?}");
    assert_eq!(stub.violations(), 0, "the stub saw a threshold crossed");
    assert_eq!(stub.count_for(CHAT, "alice"), LIMIT as usize);

    // The restored state does not outlive its window.
    tokio::time::sleep(PER + MARGIN).await;
    let answers = burst(&second, "alice", LIMIT as usize).await;
    assert_eq!(
        count(&answers, StatusCode::OK),
        LIMIT as usize,
        "{answers:?}"
    );
    assert_eq!(stub.violations(), 0);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_inside_the_window_queues_the_second_burst_behind_the_first() {
    let stub = stub().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = state_path(&dir);

    spend_alices_quota_and_stop(&yaml(&stub, "queue", Some(&path))).await;

    let second = start_proxy(&yaml(&stub, "queue", Some(&path))).await;
    let answers = burst(&second, "alice", LIMIT as usize).await;
    assert_eq!(
        count(&answers, StatusCode::OK),
        LIMIT as usize,
        "{answers:?}"
    );
    assert_eq!(stub.violations(), 0, "the stub saw a threshold crossed");
    assert!(
        stub.max_in_any_window(CHAT, "alice", PER) <= LIMIT as usize,
        "at most {LIMIT} in any window"
    );
    second.shutdown().await;
}

/// What happens without a state file, for the record: the new process starts empty and its first
/// burst crosses the threshold at Zoho. (This is what the state file is for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_state_file_a_restart_forgets_the_window() {
    let stub = stub().await;
    let first = start_proxy(&yaml(&stub, "reject", None)).await;
    burst(&first, "alice", LIMIT as usize).await;
    first.shutdown().await;
    let second = start_proxy(&yaml(&stub, "reject", None)).await;
    let answers = burst(&second, "alice", LIMIT as usize).await;
    assert_eq!(
        count(&answers, StatusCode::OK),
        0,
        "Zoho refuses: {answers:?}"
    );
    assert!(
        stub.violations() > 0,
        "without a state file the stub sees a violation"
    );
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_state_file_is_ignored() {
    let stub = stub().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = state_path(&dir);
    let first = start_proxy(&yaml(&stub, "reject", Some(&path))).await;
    burst(&first, "alice", LIMIT as usize).await;
    first.shutdown().await;

    // The same file, as if written an hour ago: nothing in it is in force any more.
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("state file")).expect("json");
    let written = saved["written_at_unix_ms"].as_u64().expect("written_at");
    saved["written_at_unix_ms"] = serde_json::json!(written - 3_600_000);
    std::fs::write(&path, saved.to_string()).expect("rewrite");
    // A fresh stub: the old calls are long gone at "Zoho" too.
    let stub = self::stub().await;
    let second = start_proxy(&yaml(&stub, "reject", Some(&path))).await;
    let answers = burst(&second, "alice", LIMIT as usize).await;
    assert_eq!(
        count(&answers, StatusCode::OK),
        LIMIT as usize,
        "{answers:?}"
    );
    assert_eq!(stub.violations(), 0);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_is_ignored_and_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = state_path(&dir);
    for garbage in [
        &b"{\"version\": 1, \"written_at_unix_ms\": 12, \"keys\": [{\"rou"[..],
        b"\x00\x01binary",
        br#"{"version": 99, "written_at_unix_ms": 1, "keys": []}"#,
    ] {
        std::fs::write(&path, garbage).expect("write garbage");
        let stub = stub().await;
        let running = start_proxy(&yaml(&stub, "reject", Some(&path))).await;
        let answers = burst(&running, "alice", LIMIT as usize).await;
        assert_eq!(
            count(&answers, StatusCode::OK),
            LIMIT as usize,
            "{answers:?}"
        );
        assert_eq!(stub.violations(), 0);
        running.shutdown().await;
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("state file"))
                .expect("rewritten as valid JSON on shutdown");
        assert_eq!(saved["version"], 1);
        assert_eq!(saved["keys"].as_array().map(Vec::len), Some(1), "{saved}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_file_holds_no_credential() {
    let stub = stub().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = state_path(&dir);
    let token = "1000.secret-token-e2e-state.abcdef";
    let running = start_proxy(&yaml(&stub, "reject", Some(&path))).await;
    burst(&running, token, 2).await;
    running.shutdown().await;
    let text = std::fs::read_to_string(&path).expect("state file");
    assert!(!text.contains("secret-token"), "{text}");
    assert!(text.contains("chats.post_message"), "{text}");
}

/// A chat post in header mode (`X-Cliq-User: user`, with `user` as its token too); its status.
async fn post_as_header(
    running: &cliqgate::app::Running,
    chat: u32,
    user: &'static str,
) -> StatusCode {
    let url = format!("{}/api/v3/chats/C{chat}/message", base_url(running));
    let mut req = request(Method::POST, &url, Some(user), r#"{"text":"hi"}"#);
    req.headers_mut()
        .insert("x-cliq-user", http::HeaderValue::from_static(user));
    Client::new().send(req).await.status
}

/// A restart that changes how users are keyed (here token to header mode) finds the saved sends
/// under keys its users no longer map to: it holds every key for a window, as a reload does,
/// instead of giving each user a second quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_that_changes_the_identity_holds_every_key_for_a_window() {
    let stub = stub().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = state_path(&dir);
    spend_alices_quota_and_stop(&yaml(&stub, "reject", Some(&state))).await;

    let header_mode = yaml(&stub, "reject", Some(&state)).replacen(
        "routes:",
        "identity:\n  mode: header\n  header: \"X-Cliq-User\"\nroutes:",
        1,
    );
    let second = start_proxy(&header_mode).await;
    let mut statuses = Vec::new();
    for c in 0..LIMIT {
        statuses.push(post_as_header(&second, c, "alice").await);
    }
    assert_eq!(
        count(&statuses, StatusCode::TOO_MANY_REQUESTS),
        LIMIT as usize,
        "held for a window: {statuses:?}"
    );
    second.shutdown().await;

    // Restarted again inside the hold, now under the same identity: the hold is in the state
    // file and still holds.
    let third = start_proxy(&header_mode).await;
    assert_eq!(
        post_as_header(&third, 9, "alice").await,
        StatusCode::TOO_MANY_REQUESTS,
        "the hold outlives a restart"
    );
    third.shutdown().await;
    assert_eq!(stub.violations(), 0, "Zoho saw alice's quota crossed");
}
