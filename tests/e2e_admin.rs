//! End-to-end: the admin API (`/admin/limits`, `/admin/config`) behind its bearer token, and the
//! promise that no admin output ever holds a caller's credential or the admin token.

mod support;

use std::net::SocketAddr;

use cliqgate::config::IdentityConfig;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use support::*;
use tokio::task::JoinSet;

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const CHANNEL: &str = "/api/v3/channelsbyname/{name}/message";
const PER: Duration = Duration::from_secs(5);
const LOCK: Duration = Duration::from_secs(60);
const LIMIT: u32 = 5;
const ADMIN_TOKEN: &str = "admin-token-e2e-0123456789abcdef";
/// Callers' credentials: none may ever appear in admin output.
const ALICE: &str = "1000.ALICE-SECRET-oauth-token-7f3a9c";
const ZAPIKEY: &str = "ZAPIKEY-SECRET-b0b-4d2e8f";
const CAROL: &str = "1000.CAROL-SECRET-oauth-token-55aa";
const DAVE: &str = "1000.DAVE-SECRET-oauth-token-9e9e";

fn routes_yaml() -> String {
    format!(
        "safety_margin: \"100ms\"\nroutes:\n  - name: chats.post_message\n    method: POST\n    path: \"{CHAT}\"\n    limit: {LIMIT}\n    per: \"5s\"\n    lock: \"60s\"\n    on_limit: reject\n  - name: channels.post_message\n    method: POST\n    path: \"{CHANNEL}\"\n    limit: {LIMIT}\n    per: \"5s\"\n    lock: \"60s\"\n    on_limit: queue\n    max_wait: \"20s\"\n"
    )
}

async fn setup(store_yaml: &str) -> (ZohoStub, cliqgate::app::Running) {
    let stub = ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK),
        StubRoute::new(Method::POST, CHANNEL, LIMIT, PER, LOCK),
    ])
    .await;
    let yaml = config_yaml(
        &stub.url(),
        &format!(
            "admin:\n  token: \"{ADMIN_TOKEN}\"\n{store_yaml}{}",
            routes_yaml()
        ),
    );
    let running = start_proxy(&yaml).await;
    (stub, running)
}

async fn admin_get(admin: SocketAddr, path: &str, bearer: Option<&str>) -> TestResponse {
    let mut req = request(
        Method::GET,
        &format!("http://{admin}{path}"),
        None,
        Bytes::new(),
    );
    if let Some(token) = bearer {
        req.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii"),
        );
    }
    Client::new().send(req).await
}

/// The short user hash the admin API shows for a token.
fn short_hash(token: &str) -> String {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Zoho-oauthtoken {token}")).expect("ascii"),
    );
    cliqgate::identity::identify(&IdentityConfig::Token, &headers, None)
        .expect("a token identifies a user")
        .short()
}

fn zapikey_hash(key: &str) -> String {
    cliqgate::identity::identify(
        &IdentityConfig::Token,
        &HeaderMap::new(),
        Some(&format!("zapikey={key}")),
    )
    .expect("a zapikey identifies a user")
    .short()
}

fn route<'a>(limits: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    limits["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["route"] == name)
        .unwrap_or_else(|| panic!("route {name} in {limits:#}"))
}

fn user<'a>(route: &'a serde_json::Value, hash: &str) -> &'a serde_json::Value {
    route["users"]
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["user"] == hash)
        .unwrap_or_else(|| panic!("user {hash} in {route:#}"))
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [ALICE, ZAPIKEY, CAROL, DAVE, ADMIN_TOKEN] {
        assert!(
            !text.contains(secret),
            "{what} contains {secret:?}:\n{text}"
        );
    }
    for fragment in ["SECRET", "admin-token-e2e"] {
        assert!(
            !text.contains(fragment),
            "{what} contains {fragment:?}:\n{text}"
        );
    }
}

fn chat_url(running: &cliqgate::app::Running, chat: &str) -> String {
    format!("{}/api/v3/chats/{chat}/message", base_url(running))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_need_the_bearer_token_and_the_others_stay_open() {
    let (_stub, running) = setup("").await;
    let admin = running.admin_addr;
    for path in ["/admin/limits", "/admin/config", "/admin/nothing"] {
        let missing = admin_get(admin, path, None).await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(missing.json()["error"], "unauthorized");
        assert!(missing.header("www-authenticate").is_some());
        let wrong = admin_get(admin, path, Some("admin-token-e2e-0123456789abcdeX")).await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_no_secret(path, &wrong.text());
    }
    let ok = admin_get(admin, "/admin/limits", Some(ADMIN_TOKEN)).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.header("content-type"), Some("application/json"));
    let ok = admin_get(admin, "/admin/config", Some(ADMIN_TOKEN)).await;
    assert_eq!(ok.status, StatusCode::OK);
    let unknown = admin_get(admin, "/admin/nothing", Some(ADMIN_TOKEN)).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    for open in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            admin_get(admin, open, None).await.status,
            StatusCode::OK,
            "{open} needs no token"
        );
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_show_what_was_sent_and_no_output_holds_a_token() {
    let (stub, running) = setup("").await;
    let client = Client::new();
    for c in 0..3 {
        let r = client
            .post(&chat_url(&running, &format!("C{c}")), ALICE, "{}")
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let zapi = format!("{}?zapikey={ZAPIKEY}", chat_url(&running, "Z"));
    let r = client
        .send(request(
            Method::POST,
            &zapi,
            None,
            Bytes::from_static(b"{}"),
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // Carol: Zoho says she is throttled; the proxy learns a lock.
    stub.set_fixed_response(Some(
        FixedResponse::new(
            ThrottleShape::Http429Plain.status(),
            ThrottleShape::Http429Plain.body(),
        )
        .header("content-type", "application/json;charset=UTF-8"),
    ));
    client.post(&chat_url(&running, "K"), CAROL, "{}").await;
    stub.set_fixed_response(None);

    // Dave: a full window plus one queued call on the queue route.
    let channel = format!("{}/api/v3/channelsbyname/ops/message", base_url(&running));
    for _ in 0..LIMIT {
        assert_eq!(
            client.post(&channel, DAVE, "{}").await.status,
            StatusCode::OK
        );
    }
    let mut waiting = JoinSet::new();
    {
        let (client, channel) = (client.clone(), channel.clone());
        waiting.spawn(async move { client.post(&channel, DAVE, "{}").await });
    }
    let admin = running.admin_addr;
    let dave = short_hash(DAVE);
    wait_for("dave's call queued", Duration::from_secs(5), || {
        let dave = dave.clone();
        async move {
            let limits = admin_get(admin, "/admin/limits", Some(ADMIN_TOKEN))
                .await
                .json();
            route(&limits, "channels.post_message")["users"]
                .as_array()
                .is_some_and(|users| users.iter().any(|u| u["user"] == dave && u["queued"] == 1))
        }
    })
    .await;

    let limits_response = admin_get(admin, "/admin/limits", Some(ADMIN_TOKEN)).await;
    let limits = limits_response.json();
    assert_eq!(limits["store"], "memory");
    assert_eq!(limits["partial"], false);
    let chats = route(&limits, "chats.post_message");
    assert_eq!(chats["limit"], LIMIT);
    assert_eq!(chats["window_ms"], 5_100);
    assert_eq!(chats["lock_ms"], 60_000);

    let alice = user(chats, &short_hash(ALICE));
    assert_eq!(alice["calls_in_window"], 3, "{alice}");
    assert_eq!(alice["remaining"], 2, "{alice}");
    assert_eq!(alice["next_free_slot_ms"], 0, "{alice}");
    assert_eq!(alice["locked_for_ms"], 0, "{alice}");
    assert_eq!(
        alice["locked_until_unix_ms"],
        serde_json::Value::Null,
        "{alice}"
    );
    assert_eq!(alice["lock_reason"], serde_json::Value::Null, "{alice}");
    assert_eq!(alice["queued"], 0, "{alice}");
    assert_eq!(
        alice["user"].as_str().map(str::len),
        Some(16),
        "a short hash"
    );

    let bob = user(chats, &zapikey_hash(ZAPIKEY));
    assert_eq!(
        (bob["calls_in_window"].as_u64(), bob["remaining"].as_u64()),
        (Some(1), Some(4))
    );

    let carol = user(chats, &short_hash(CAROL));
    assert_eq!(carol["lock_reason"], "upstream_throttle", "{carol}");
    let locked_for = carol["locked_for_ms"].as_u64().expect("locked_for_ms");
    assert!(locked_for > 50_000 && locked_for <= 60_000, "{carol}");
    let generated_at = limits["generated_at_unix_ms"]
        .as_u64()
        .expect("generated_at");
    assert_eq!(
        carol["locked_until_unix_ms"].as_u64(),
        Some(generated_at + locked_for),
        "{carol}"
    );
    assert_eq!(carol["remaining"], 0, "{carol}");
    assert!(
        carol["next_free_slot_ms"].as_u64() >= Some(locked_for),
        "{carol}"
    );

    let channels = route(&limits, "channels.post_message");
    let dave = user(channels, &dave);
    assert_eq!(
        (
            dave["calls_in_window"].as_u64(),
            dave["remaining"].as_u64(),
            dave["queued"].as_u64()
        ),
        (Some(u64::from(LIMIT)), Some(0), Some(1)),
        "{dave}"
    );
    assert!(dave["next_free_slot_ms"].as_u64() > Some(0), "{dave}");

    // Filters.
    let only = admin_get(
        admin,
        "/admin/limits?route=chats.post_message",
        Some(ADMIN_TOKEN),
    )
    .await
    .json();
    assert_eq!(only["routes"].as_array().map(Vec::len), Some(1));
    let one = admin_get(
        admin,
        &format!("/admin/limits?user={}", short_hash(ALICE)),
        Some(ADMIN_TOKEN),
    )
    .await
    .json();
    assert_eq!(
        route(&one, "chats.post_message")["users"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let config = admin_get(admin, "/admin/config", Some(ADMIN_TOKEN)).await;
    let config_json = config.json();
    assert_eq!(config_json["admin"]["token"], "REDACTED");
    assert_eq!(config_json["store"]["kind"], "memory");
    assert_eq!(config_json["routes"][0]["name"], "chats.post_message");
    assert_eq!(config_json["routes"][0]["limit"], LIMIT);
    assert_eq!(config_json["routes"][1]["on_limit"], "queue");
    let metrics = scrape(admin).await;

    assert_no_secret("/admin/limits", &limits_response.text());
    assert_no_secret("/admin/config", &config.text());
    assert_no_secret("/metrics", &metrics);

    waiting.abort_all();
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_from_the_redis_store() {
    let redis = RedisServer::start().await;
    // A Redis that has been running for long: no data-loss guard in the first window.
    assert_eq!(redis.command(&["SET", "cliqgate:epoch", "1"]).await, "OK");
    let store = format!("store:\n  kind: redis\n  url: \"{}\"\n", redis.url());
    let (stub, running) = setup(&store).await;
    let client = Client::new();
    for c in 0..3 {
        let r = client
            .post(&chat_url(&running, &format!("C{c}")), ALICE, "{}")
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let channel = format!("{}/api/v3/channelsbyname/ops/message", base_url(&running));
    for _ in 0..LIMIT {
        assert_eq!(
            client.post(&channel, DAVE, "{}").await.status,
            StatusCode::OK
        );
    }
    stub.set_fixed_response(Some(FixedResponse::new(
        ThrottleShape::Http429Plain.status(),
        ThrottleShape::Http429Plain.body(),
    )));
    client.post(&chat_url(&running, "K"), CAROL, "{}").await;
    stub.set_fixed_response(None);
    // The throttle answer goes out only once the lock is in Redis: it is there at once.
    let response = admin_get(running.admin_addr, "/admin/limits", Some(ADMIN_TOKEN)).await;
    let limits = response.json();
    assert_eq!(limits["store"], "redis", "{limits:#}");
    let carol = user(route(&limits, "chats.post_message"), &short_hash(CAROL));
    assert_eq!(carol["lock_reason"], "upstream_throttle", "{carol}");
    let locked_for = carol["locked_for_ms"].as_u64().expect("locked_for_ms");
    assert!(locked_for > 50_000 && locked_for <= 60_000, "{carol}");
    assert_eq!(limits["source"], "redis", "{limits:#}");
    assert_eq!(limits["partial"], false, "{limits:#}");
    let alice = user(route(&limits, "chats.post_message"), &short_hash(ALICE));
    assert_eq!(
        (
            alice["calls_in_window"].as_u64(),
            alice["remaining"].as_u64()
        ),
        (Some(3), Some(2)),
        "{alice}"
    );
    assert_eq!(alice["next_free_slot_ms"], 0);
    let dave = user(route(&limits, "channels.post_message"), &short_hash(DAVE));
    assert_eq!(
        (dave["calls_in_window"].as_u64(), dave["remaining"].as_u64()),
        (Some(u64::from(LIMIT)), Some(0)),
        "{dave}"
    );
    let next = dave["next_free_slot_ms"]
        .as_u64()
        .expect("next_free_slot_ms");
    assert!(next > 4_000 && next <= 5_100, "{dave}");
    assert_no_secret("/admin/limits", &response.text());
    let config = admin_get(running.admin_addr, "/admin/config", Some(ADMIN_TOKEN)).await;
    assert_eq!(config.json()["store"]["kind"], "redis");
    assert_no_secret("/admin/config", &config.text());
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}
