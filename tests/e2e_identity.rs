//! End-to-end: `identity.mode: resolve` (who owns a token, asked of an identity endpoint and
//! cached) and the `header` mode's trust boundary, with the real proxy in front of the Zoho-like
//! stub. The stub also serves the identity endpoint `/api/v2/me` and, like Zoho, counts quota per
//! *user* across all of that user's tokens.
//!
//! Tokens are written `<owner>-<secret>`: the stub's identity endpoint says token `alice-2` belongs to
//! zuid `alice`, and the stub counts every call made with it against `alice`. A few owners answer
//! differently on purpose (see [`identity_answer`]).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use support::*;
use tokio::task::JoinSet;

/// The identity endpoint, served by the stub.
const ME: &str = "/api/v2/me";
/// A route with a small quota, for sharing tests.
const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const LIMIT: u32 = 5;
/// Long enough that a burst always falls inside one window.
const PER: Duration = Duration::from_secs(5);
/// The proxy's window is `per + safety_margin`; the stub's is exactly `per`, like Zoho's.
const MARGIN: Duration = Duration::from_millis(150);
/// Long enough that no lock ends during a test: a violation stays visible.
const LOCK: Duration = Duration::from_secs(60);
/// A route with a quota no test reaches, for counting lookups under load.
const CHANNELS: &str = "/api/v2/channels";
const BULK_LIMIT: u32 = 1000;

/// Zoho's quota for the identity endpoint (cliq-api.md): 20 per minute, lock 10 minutes. The stub
/// enforces it per user; cliqgate gives the lookups, all tokens together, a share of it (the owner
/// is what a lookup asks), and each user's own calls to it the rest.
const ME_LIMIT: u32 = 20;
const ME_PER: Duration = Duration::from_secs(60);
const ME_LOCK: Duration = Duration::from_secs(600);

/// Positive answers outlive every test.
const TTL: &str = "10m";
/// Short, so a test can watch a refusal expire.
const NEGATIVE_TTL: Duration = Duration::from_millis(800);
/// Calls that must all see one cached refusal are made within this much of the first one.
const WELL_WITHIN_NEGATIVE_TTL: Duration = Duration::from_millis(400);
const LOOKUP_TIMEOUT: &str = "2s";

/// Concurrent first calls with one new token (single-flight).
const CONCURRENT_FIRST_CALLS: usize = 200;
/// Calls made afterwards, within `ttl`.
const LATER_CALLS: usize = 10;

/// Owners the stub's identity endpoint refuses (401) or fails on (500).
const REVOKED: &str = "revoked";
const FLAKY: &str = "flaky";
/// Zoho's answer for a bad token, passed on to the caller byte for byte.
const INVALID_TOKEN_BODY: &str =
    r#"{"code":"oauthtoken_invalid","message":"Invalid OAuth access token."}"#;
const ZOHO_JSON: &str = "application/json;charset=UTF-8";

/// The user header in header mode.
const USER_HEADER: &str = "X-Cliq-User";

const LOOKUPS: &str = "cliqgate_identity_lookups_total";
const CACHE: &str = "cliqgate_identity_cache_total";

/// Whose token this is: `alice-2` is alice's.
fn owner(token: &str) -> &str {
    token.split_once('-').map_or(token, |(owner, _)| owner)
}

/// The stub's identity endpoint: `{"data":{"zuid":<owner>}}`, except for [`REVOKED`] (401 in
/// Zoho's envelope) and [`FLAKY`] (500).
fn identity_answer(token: &str) -> FixedResponse {
    match owner(token) {
        REVOKED => FixedResponse::new(StatusCode::UNAUTHORIZED, INVALID_TOKEN_BODY)
            .header("content-type", ZOHO_JSON),
        FLAKY => FixedResponse::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"code": "internal_error", "message": "Internal error"}),
        ),
        user => FixedResponse::json(
            StatusCode::OK,
            &serde_json::json!({"data": {"zuid": user, "name": user}}),
        ),
    }
}

/// A stub that answers `/api/v2/me` and counts quota per user across tokens, like Zoho.
async fn start_stub() -> ZohoStub {
    start_stub_with_me_window(ME_PER).await
}

/// [`start_stub`] with `/api/v2/me`'s window `me_per` long instead of Zoho's minute.
async fn start_stub_with_me_window(me_per: Duration) -> ZohoStub {
    let stub = ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK),
        StubRoute::new(Method::GET, CHANNELS, BULK_LIMIT, ME_PER, LOCK),
        StubRoute::new(Method::GET, ME, ME_LIMIT, me_per, ME_LOCK),
    ])
    .await;
    stub.set_user_key(UserKey::Custom(Arc::new(|headers, query| {
        credential(headers, query).map(|token| owner(&token).to_owned())
    })));
    stub.set_responder(Some(Arc::new(|arrival: &Arrival| {
        if arrival.path != ME {
            return None;
        }
        let token = credential(&arrival.headers, arrival.query.as_deref())?;
        Some(identity_answer(&token))
    })));
    stub
}

/// The routes every proxy here has, then `identity` (YAML, top level).
fn proxy_yaml(identity: &str) -> String {
    format!(
        "safety_margin: \"{}ms\"\nroutes:\n  - name: chats.post_message\n    method: POST\n    path: \"{CHAT}\"\n    limit: {LIMIT}\n    per: \"{}ms\"\n    lock: \"60s\"\n    on_limit: reject\n  - name: channels.list\n    method: GET\n    path: \"{CHANNELS}\"\n    limit: {BULK_LIMIT}\n    per: \"60s\"\n    lock: \"60s\"\n    on_limit: reject\n{identity}",
        MARGIN.as_millis(),
        PER.as_millis()
    )
}

fn resolve_yaml(url: &str, on_unreachable: &str) -> String {
    format!(
        "identity:\n  mode: resolve\n  url: \"{url}\"\n  user_field: \"/data/zuid\"\n  ttl: \"{TTL}\"\n  negative_ttl: \"{}ms\"\n  timeout: \"{LOOKUP_TIMEOUT}\"\n  cache_size: 1000\n  on_unreachable: {on_unreachable}\n",
        NEGATIVE_TTL.as_millis()
    )
}

/// A proxy in front of `stub` whose identity endpoint is the stub's `/api/v2/me`.
async fn resolve_proxy(stub: &ZohoStub, on_unreachable: &str) -> cliqgate::app::Running {
    let identity = resolve_yaml(&format!("{}{ME}", stub.url()), on_unreachable);
    start_proxy(&config_yaml(&stub.url(), &proxy_yaml(&identity))).await
}

/// An address nothing listens on: bound, then closed again.
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a throwaway port");
    let addr = listener.local_addr().expect("its address");
    drop(listener);
    addr
}

fn chat_url(running: &cliqgate::app::Running, chat: &str) -> String {
    format!("{}/api/v3/chats/{chat}/message", base_url(running))
}

fn channels_url(running: &cliqgate::app::Running) -> String {
    format!("{}{CHANNELS}", base_url(running))
}

/// Identity lookups that reached the stub.
fn me_arrivals(stub: &ZohoStub) -> usize {
    stub.arrivals().iter().filter(|a| a.path == ME).count()
}

/// Calls other than identity lookups that reached the stub.
fn forwarded_arrivals(stub: &ZohoStub) -> usize {
    stub.arrivals().iter().filter(|a| a.path != ME).count()
}

fn lookups(metrics: &str, outcome: &str) -> f64 {
    metric_value(metrics, LOOKUPS, &[("outcome", outcome)]).unwrap_or(0.0)
}

fn cache(metrics: &str, result: &str) -> f64 {
    metric_value(metrics, CACHE, &[("result", result)]).unwrap_or(0.0)
}

fn assert_no_token_in(metrics: &str, tokens: &[&str]) {
    for token in tokens {
        assert!(
            !metrics.contains(token),
            "the raw token {token:?} appears in /metrics:\n{metrics}"
        );
    }
}

/// Fires `calls` concurrent chat posts, call `i` with `tokens[i % tokens.len()]`; returns the
/// statuses.
async fn alternating_burst(
    running: &cliqgate::app::Running,
    tokens: &[&str],
    calls: usize,
) -> Vec<StatusCode> {
    let client = Client::new();
    let mut set = JoinSet::new();
    for i in 0..calls {
        let (client, url) = (client.clone(), chat_url(running, &format!("C{i}")));
        let token = tokens[i % tokens.len()].to_owned();
        set.spawn(async move {
            client
                .post(&url, &token, r#"{"text":"alert"}"#)
                .await
                .status
        });
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        out.push(done.expect("call task"));
    }
    out
}

fn count(statuses: &[StatusCode], status: StatusCode) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

// ---- 1. one user, two tokens, one quota ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tokens_of_one_user_share_one_quota() {
    let stub = start_stub().await;
    let running = resolve_proxy(&stub, "reject").await;
    let tokens = ["alice-1", "alice-2"];
    let calls = 3 * LIMIT as usize;

    let statuses = alternating_burst(&running, &tokens, calls).await;

    assert_eq!(
        count(&statuses, StatusCode::OK),
        LIMIT as usize,
        "one user's quota, whichever token spends it: {statuses:?}"
    );
    assert_eq!(
        count(&statuses, StatusCode::TOO_MANY_REQUESTS),
        calls - LIMIT as usize,
        "the rest refused by cliqgate: {statuses:?}"
    );
    assert_eq!(stub.violations(), 0, "Zoho saw alice's quota crossed");
    assert_eq!(stub.count_for(CHAT, "alice"), LIMIT as usize);
    assert_eq!(me_arrivals(&stub), tokens.len(), "one lookup per token");
    let mut asked_with: Vec<String> = stub
        .arrivals()
        .iter()
        .filter(|a| a.path == ME)
        .filter_map(|a| credential(&a.headers, a.query.as_deref()))
        .collect();
    asked_with.sort();
    assert_eq!(
        asked_with, tokens,
        "each lookup carries the caller's own token"
    );
    let m = scrape(running.admin_addr).await;
    assert_eq!(lookups(&m, "ok"), tokens.len() as f64);
    assert_eq!(cache(&m, "hit") + cache(&m, "miss"), calls as f64);
    assert_no_token_in(&m, &tokens);
    running.shutdown().await;
}

/// Why resolve mode exists: keyed by token, the same burst gives alice two quotas, and Zoho (which
/// counts per user) sees her cross hers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_by_token_the_same_burst_trips_zohos_per_user_quota() {
    let stub = start_stub().await;
    let running = start_proxy(&config_yaml(&stub.url(), &proxy_yaml(""))).await;

    alternating_burst(&running, &["alice-1", "alice-2"], 3 * LIMIT as usize).await;

    // Each token has a full quota at cliqgate; how many of the second quota reach Zoho before its
    // throttle answer locks the tokens depends on timing (the calls are concurrent), but more
    // than alice's one quota always does.
    let reached = stub.count_for(CHAT, "alice");
    assert!(
        reached > LIMIT as usize && reached <= 2 * LIMIT as usize,
        "token mode forwards up to a full quota per token: {reached}"
    );
    assert!(
        stub.violations() > 0,
        "token mode should have crossed alice's per-user quota"
    );
    assert_eq!(me_arrivals(&stub), 0, "token mode asks nobody");
    running.shutdown().await;
}

// ---- 2. single-flight ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_calls_with_one_token_cause_one_lookup() {
    let stub = start_stub().await;
    let running = resolve_proxy(&stub, "reject").await;
    let client = Client::new();
    let token = "carol-1";

    let mut set = JoinSet::new();
    for _ in 0..CONCURRENT_FIRST_CALLS {
        let (client, url) = (client.clone(), channels_url(&running));
        set.spawn(async move { client.get(&url, token).await.status });
    }
    while let Some(done) = set.join_next().await {
        assert_eq!(done.expect("call task"), StatusCode::OK);
    }
    assert_eq!(
        me_arrivals(&stub),
        1,
        "{CONCURRENT_FIRST_CALLS} concurrent first calls share one lookup"
    );

    for _ in 0..LATER_CALLS {
        assert_eq!(
            client.get(&channels_url(&running), token).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(me_arrivals(&stub), 1, "answers are cached for ttl");

    let total = CONCURRENT_FIRST_CALLS + LATER_CALLS;
    assert_eq!(stub.count_for(CHANNELS, "carol"), total);
    assert_eq!(stub.violations(), 0);
    let m = scrape(running.admin_addr).await;
    assert_eq!(lookups(&m, "ok"), 1.0);
    assert_eq!(
        metric_sum(&m, LOOKUPS, &[]),
        1.0,
        "no other lookup outcome: {m}"
    );
    let (hits, misses) = (cache(&m, "hit"), cache(&m, "miss"));
    assert_eq!(hits + misses, total as f64, "every call is a hit or a miss");
    assert!(misses >= 1.0, "the first call is a miss");
    assert!(
        hits >= LATER_CALLS as f64,
        "every later call is a hit (hits {hits}, misses {misses})"
    );
    assert_no_token_in(&m, &[token]);
    running.shutdown().await;
}

// ---- 3. negative caching ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_token_gets_zohos_answer_and_is_not_asked_about_again_until_negative_ttl() {
    let stub = start_stub().await;
    let running = resolve_proxy(&stub, "reject").await;
    let client = Client::new();
    let token = "revoked-1";
    let url = chat_url(&running, "C1");

    let first_asked = Instant::now();
    let first = client.post(&url, token, "{}").await;
    assert_eq!(first.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        first.text(),
        INVALID_TOKEN_BODY,
        "Zoho's answer, byte for byte"
    );
    assert_eq!(first.header("content-type"), Some(ZOHO_JSON));
    let mut repeats = 0;
    while first_asked.elapsed() < WELL_WITHIN_NEGATIVE_TTL && repeats < LIMIT {
        let again = client.post(&url, token, "{}").await;
        assert_eq!(again.status, StatusCode::UNAUTHORIZED);
        assert_eq!(again.text(), INVALID_TOKEN_BODY);
        repeats += 1;
    }
    assert!(
        repeats > 0,
        "no repeat fitted in {WELL_WITHIN_NEGATIVE_TTL:?}"
    );
    assert_eq!(
        me_arrivals(&stub),
        1,
        "a refusal is cached for negative_ttl ({repeats} repeats)"
    );
    let m = scrape(running.admin_addr).await;
    assert_eq!(lookups(&m, "refused"), 1.0);
    assert_eq!(cache(&m, "hit"), f64::from(repeats));

    tokio::time::sleep(NEGATIVE_TTL.saturating_sub(first_asked.elapsed()) + MARGIN).await;
    let after = client.post(&url, token, "{}").await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
    assert_eq!(after.text(), INVALID_TOKEN_BODY);
    assert_eq!(
        me_arrivals(&stub),
        2,
        "asked again once negative_ttl is over"
    );

    assert_eq!(
        forwarded_arrivals(&stub),
        0,
        "a refused token is never forwarded"
    );
    let m = scrape(running.admin_addr).await;
    assert_eq!(lookups(&m, "refused"), 2.0);
    assert_no_token_in(&m, &[token]);
    running.shutdown().await;
}

// ---- 4. unreachable identity endpoint ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_identity_endpoint_with_reject_refuses_with_503() {
    let stub = start_stub().await;
    let dead = closed_port().await;
    let identity = resolve_yaml(&format!("http://{dead}{ME}"), "reject");
    let running = start_proxy(&config_yaml(&stub.url(), &proxy_yaml(&identity))).await;
    let client = Client::new();

    for attempt in 1..=2 {
        let answer = client.post(&chat_url(&running, "C1"), "dave-1", "{}").await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.text()
        );
        assert_eq!(answer.json()["code"], "identity_unavailable");
        assert!(answer.header("retry-after").is_some(), "come back soon");
        let m = scrape(running.admin_addr).await;
        assert_eq!(
            lookups(&m, "unreachable"),
            f64::from(attempt),
            "a failed lookup is not cached: each call asks again"
        );
        assert_eq!(lookups(&m, "fallback"), 0.0);
    }
    assert!(stub.arrivals().is_empty(), "nothing forwarded");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_identity_endpoint_with_token_falls_back_to_the_token_key() {
    let stub = start_stub().await;
    let dead = closed_port().await;
    let identity = resolve_yaml(&format!("http://{dead}{ME}"), "token");
    let running = start_proxy(&config_yaml(&stub.url(), &proxy_yaml(&identity))).await;
    let client = Client::new();
    let token = "dave-1";

    let answer = client.post(&chat_url(&running, "C1"), token, "{}").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(stub.count_for(CHAT, "dave"), 1, "forwarded");
    let m = scrape(running.admin_addr).await;
    assert_eq!(lookups(&m, "fallback"), 1.0);
    assert_eq!(lookups(&m, "unreachable"), 1.0);

    // Keyed by the token: it has a quota of its own, and it is enforced.
    let statuses: Vec<StatusCode> = {
        let mut out = Vec::new();
        for _ in 0..LIMIT {
            out.push(
                client
                    .post(&chat_url(&running, "C1"), token, "{}")
                    .await
                    .status,
            );
        }
        out
    };
    assert_eq!(count(&statuses, StatusCode::OK), LIMIT as usize - 1);
    assert_eq!(count(&statuses, StatusCode::TOO_MANY_REQUESTS), 1);
    assert_eq!(stub.count_for(CHAT, "dave"), LIMIT as usize);
    assert_eq!(stub.violations(), 0);
    let m = scrape(running.admin_addr).await;
    assert_eq!(
        lookups(&m, "fallback"),
        f64::from(LIMIT + 1),
        "every call that could not be resolved is counted"
    );
    assert_no_token_in(&m, &[token]);
    running.shutdown().await;
}

// ---- 5. lookups spend the identity endpoint's own quota ----

/// The lookups' share of the identity endpoint's quota by default: half of it. Zoho counts a
/// lookup against the token's owner, whom only its answer names, so all lookups together get this
/// many a window and each user's own calls to the endpoint get the rest.
const RESERVE: u32 = ME_LIMIT / 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_lookups_share_one_reserve_of_the_endpoints_quota() {
    let stub = start_stub().await;
    let running = resolve_proxy(&stub, "reject").await;
    let client = Client::new();
    let token = "flaky-1";
    let url = chat_url(&running, "C1");

    // A 500 is not cached, so every call asks again, until the lookups' share is spent.
    for i in 0..RESERVE {
        let answer = client.post(&url, token, "{}").await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "call {i}: {}",
            answer.text()
        );
        assert_eq!(answer.json()["code"], "identity_unavailable");
    }
    assert_eq!(me_arrivals(&stub), RESERVE as usize);

    // Over the share, for this token and for any other: none of them may be the same user's.
    for token in [token, "erin-1"] {
        let over = client.post(&url, token, "{}").await;
        assert_eq!(
            over.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{token}: {}",
            over.text()
        );
        assert_eq!(over.json()["code"], "rate_limit_exceeded");
        let retry_after: u64 = over
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("whole seconds");
        assert!(
            retry_after > 0 && retry_after <= (ME_PER + MARGIN).as_secs() + 2,
            "the oldest lookup leaves the minute's window within it, said {retry_after}"
        );
    }
    assert_eq!(
        me_arrivals(&stub),
        RESERVE as usize,
        "the refused calls made no lookup"
    );
    assert_eq!(stub.violations(), 0, "Zoho saw /api/v2/me's quota crossed");
    assert_eq!(forwarded_arrivals(&stub), 0);

    let m = scrape(running.admin_addr).await;
    assert_eq!(lookups(&m, "unreachable"), f64::from(RESERVE));
    assert_eq!(lookups(&m, "rate_limited"), 2.0);
    assert_eq!(lookups(&m, "ok"), 0.0);
    assert_no_token_in(&m, &[token, "erin-1"]);
    running.shutdown().await;
}

/// Under `on_unreachable: token`, a failing endpoint's share running out still falls back: the
/// lookups stop (the endpoint's quota is kept) and the calls go on, keyed by token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_over_quota_fall_back_to_the_token_key_under_token_policy() {
    let stub = start_stub().await;
    let running = resolve_proxy(&stub, "token").await;
    let client = Client::new();
    let token = "flaky-1";
    let calls = RESERVE as usize + 2;

    for i in 0..calls {
        let answer = client.get(&channels_url(&running), token).await;
        assert_eq!(answer.status, StatusCode::OK, "call {i}: {}", answer.text());
    }
    assert_eq!(
        stub.count_for(CHANNELS, FLAKY),
        calls,
        "every call forwarded"
    );
    assert_eq!(
        me_arrivals(&stub),
        RESERVE as usize,
        "lookups stop at their share"
    );
    assert_eq!(stub.violations(), 0);
    let m = scrape(running.admin_addr).await;
    assert_eq!(lookups(&m, "unreachable"), f64::from(RESERVE));
    assert_eq!(
        lookups(&m, "rate_limited"),
        (calls - RESERVE as usize) as f64
    );
    assert_eq!(lookups(&m, "fallback"), calls as f64);
    running.shutdown().await;
}

/// Resolve mode with a `users.me` route (as in config/cliq.yaml) of `limit` per minute on the
/// identity endpoint's path; `identity_extra`: more keys under `identity`.
async fn proxy_with_me_route(
    stub: &ZohoStub,
    limit: u32,
    identity_extra: &str,
) -> cliqgate::app::Running {
    start_proxy(&me_route_yaml(stub, limit, ME_PER, identity_extra)).await
}

/// The config of [`proxy_with_me_route`], the route's window `per` long.
fn me_route_yaml(stub: &ZohoStub, limit: u32, per: Duration, identity_extra: &str) -> String {
    let me_route = format!(
        "  - name: users.me\n    method: GET\n    path: \"{ME}\"\n    limit: {limit}\n    per: \"{}ms\"\n    lock: \"10m\"\n    on_limit: reject\n",
        per.as_millis()
    );
    let identity = resolve_yaml(&format!("{}{ME}", stub.url()), "reject");
    config_yaml(
        &stub.url(),
        &proxy_yaml(&format!("{me_route}{identity}{identity_extra}")),
    )
}

/// A configured route that covers the identity endpoint's path sets the quota the lookups get
/// half of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_covering_the_identity_path_sets_the_lookup_quota() {
    const ROUTE_LIMIT: u32 = 3;
    const ITS_RESERVE: u32 = ROUTE_LIMIT / 2;
    let stub = start_stub().await;
    let running = proxy_with_me_route(&stub, ROUTE_LIMIT, "").await;
    let client = Client::new();
    let url = chat_url(&running, "C1");

    for _ in 0..ITS_RESERVE {
        let answer = client.post(&url, "flaky-1", "{}").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let over = client.post(&url, "flaky-1", "{}").await;
    assert_eq!(
        over.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        over.text()
    );
    assert_eq!(over.json()["code"], "rate_limit_exceeded");
    assert_eq!(me_arrivals(&stub), ITS_RESERVE as usize);
    running.shutdown().await;
}

/// `tokens` first calls to `/api/v2/channels`, one after another, each with a new token of
/// `user`; the statuses.
async fn first_calls(
    running: &cliqgate::app::Running,
    user: &str,
    tokens: std::ops::Range<u32>,
) -> Vec<StatusCode> {
    let client = Client::new();
    let mut statuses = Vec::new();
    for i in tokens {
        let token = format!("{user}-{i}");
        statuses.push(client.get(&channels_url(running), &token).await.status);
    }
    statuses
}

/// `calls` calls to `/api/v2/me` itself with `token`, one after another; the statuses.
async fn own_me_calls(
    running: &cliqgate::app::Running,
    token: &str,
    calls: u32,
) -> Vec<StatusCode> {
    let client = Client::new();
    let url = format!("{}{ME}", base_url(running));
    let mut statuses = Vec::new();
    for _ in 0..calls {
        statuses.push(client.get(&url, token).await.status);
    }
    statuses
}

/// A bot user whose token many services hold, each its own, all new at once (a restart, or the
/// hourly rotation): every first call asks who owns its token, and Zoho counts every one of
/// those lookups against the bot. With the bot's own calls to `/api/v2/me` as well, it never
/// gets more than the endpoint's 20 a minute there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_with_many_new_tokens_never_reaches_the_identity_endpoints_limit() {
    const NEW_TOKENS: u32 = 25;
    let stub = start_stub().await;
    let running = proxy_with_me_route(&stub, ME_LIMIT, "").await;

    // The bot's own calls to the endpoint get what the lookups leave (one lookup for this token).
    let own = own_me_calls(&running, "bot-0", ME_LIMIT).await;
    assert_eq!(
        count(&own, StatusCode::OK),
        (ME_LIMIT - RESERVE) as usize,
        "{own:?}"
    );
    assert_eq!(
        count(&own, StatusCode::TOO_MANY_REQUESTS),
        RESERVE as usize,
        "{own:?}"
    );

    let first = first_calls(&running, "bot", 1..1 + NEW_TOKENS).await;
    assert_eq!(
        count(&first, StatusCode::OK),
        RESERVE as usize - 1,
        "the lookups' share, less the first token's: {first:?}"
    );
    assert_eq!(
        count(&first, StatusCode::TOO_MANY_REQUESTS),
        (NEW_TOKENS - RESERVE + 1) as usize,
        "{first:?}"
    );
    assert_eq!(stub.count_for(ME, "bot"), ME_LIMIT as usize);
    assert_eq!(
        stub.violations(),
        0,
        "Zoho saw the bot's /api/v2/me quota crossed"
    );
    let m = scrape(running.admin_addr).await;
    assert_eq!(lookups(&m, "ok"), f64::from(RESERVE));
    assert_eq!(
        lookups(&m, "rate_limited"),
        f64::from(NEW_TOKENS - RESERVE + 1)
    );

    // /admin/limits names the lookups' key and counts it against their share.
    let url = format!("http://{}/admin/limits?route=users.me", running.admin_addr);
    let limits = Client::new().get(&url, "unused").await.json();
    let users = limits["routes"][0]["users"].as_array().expect("users");
    let row = |name: &str| users.iter().find(|u| u["user"] == name).cloned();
    let pool = row("lookups").unwrap_or_else(|| panic!("no lookups row: {limits}"));
    assert_eq!(pool["calls_in_window"], RESERVE, "{pool}");
    assert_eq!(pool["remaining"], 0, "{pool}");
    // The bot and the lookups: each token's own key (which carries a lock Zoho reports for a
    // lookup) is not a user of the route.
    assert_eq!(users.len(), 2, "{limits}");
    assert_eq!(
        limits["routes"][0]["limit"],
        ME_LIMIT - RESERVE,
        "the apps' own share"
    );
    running.shutdown().await;
}

/// A reload that moves the split between lookups and the apps' own calls: calls decided under the
/// old shares are still in the endpoint's window, so until they have left it (one window here,
/// no call being queued) each side gets the smaller of its old and new shares; then the new
/// shares apply. Both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_moves_the_lookups_share_holds_both_sides_for_a_window() {
    // Short windows (stub and route alike), so the test can see the new shares apply.
    const WINDOW_PER: Duration = Duration::from_millis(1500);
    let stub = start_stub_with_me_window(WINDOW_PER).await;
    let yaml = |reserve: u32| {
        let extra = format!("  lookup_reserve: {reserve}\n");
        me_route_yaml(&stub, ME_LIMIT, WINDOW_PER, &extra)
    };
    let reload = |running: &cliqgate::app::Running, reserve: u32| {
        let config = cliqgate::config::Config::from_yaml(&yaml(reserve)).expect("a valid config");
        running.reload(config).expect("reload");
    };
    let running = start_proxy(&yaml(5)).await;

    // Lookups get more: 5 lookups, then the share goes to 10, but the 15 own calls made under
    // the old share stay in the window.
    let own = own_me_calls(&running, "dana-0", 15).await;
    assert_eq!(count(&own, StatusCode::OK), 15, "{own:?}");
    let first = first_calls(&running, "dana", 1..5).await;
    assert_eq!(count(&first, StatusCode::OK), 4, "{first:?}");
    // /admin/limits counts the lookups' key against their share of 5, not the apps' 15.
    let url = format!(
        "http://{}/admin/limits?route=users.me&user=lookups",
        running.admin_addr
    );
    let limits = Client::new().get(&url, "unused").await.json();
    let pool = &limits["routes"][0]["users"][0];
    assert_eq!(
        (&pool["calls_in_window"], &pool["remaining"]),
        (&5.into(), &0.into()),
        "{limits}"
    );
    reload(&running, 10);
    let first = first_calls(&running, "dana", 5..15).await;
    assert_eq!(
        count(&first, StatusCode::OK),
        0,
        "the old share of 5 holds for a window: {first:?}"
    );
    assert_eq!(stub.count_for(ME, "dana"), ME_LIMIT as usize);
    assert_eq!(
        stub.violations(),
        0,
        "Zoho saw dana's /api/v2/me quota crossed"
    );

    // A window later the new share applies.
    tokio::time::sleep(WINDOW_PER + MARGIN + Duration::from_millis(200)).await;
    let first = first_calls(&running, "dana", 15..26).await;
    assert_eq!(count(&first, StatusCode::OK), 10, "{first:?}");
    assert_eq!(stub.violations(), 0);

    // The apps' own calls get more: their share of 10 goes to 15, but the 10 lookups just made
    // stay in the window.
    let own = own_me_calls(&running, "erin-0", 1).await;
    assert_eq!(
        own,
        [StatusCode::TOO_MANY_REQUESTS],
        "no lookup left for a new token"
    );
    let own = own_me_calls(&running, "dana-0", 10).await;
    assert_eq!(count(&own, StatusCode::OK), 10, "{own:?}");
    reload(&running, 5);
    let own = own_me_calls(&running, "dana-0", 5).await;
    assert_eq!(
        count(&own, StatusCode::OK),
        0,
        "the old share of 10 holds for a window: {own:?}"
    );
    assert_eq!(
        stub.violations(),
        0,
        "Zoho saw dana's /api/v2/me quota crossed"
    );
    tokio::time::sleep(WINDOW_PER + MARGIN + Duration::from_millis(200)).await;
    let own = own_me_calls(&running, "dana-0", 16).await;
    assert_eq!(count(&own, StatusCode::OK), 15, "{own:?}");
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

/// Own calls queued under the old shares are sent after the reload, up to `max_wait` later: the
/// hold lasts until they have left the window, not just one window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloads_hold_outlasts_own_calls_queued_under_the_old_shares() {
    const WINDOW_PER: Duration = Duration::from_millis(1500);
    let stub = start_stub_with_me_window(WINDOW_PER).await;
    let yaml = |reserve: u32| {
        me_route_yaml(
            &stub,
            ME_LIMIT,
            WINDOW_PER,
            &format!("  lookup_reserve: {reserve}\n"),
        )
        .replacen(
            "lock: \"10m\"\n    on_limit: reject\n",
            "lock: \"10m\"\n    on_limit: queue\n    max_wait: \"3s\"\n",
            1,
        )
    };
    let running = start_proxy(&yaml(10)).await;
    let own = own_me_calls(&running, "dana-0", 10).await;
    assert_eq!(count(&own, StatusCode::OK), 10, "{own:?}");
    // Ten more wait for the next window, under the old own share of 10.
    let client = Client::new();
    let url = format!("{}{ME}", base_url(&running));
    let mut queued = JoinSet::new();
    for _ in 0..10 {
        let (client, url) = (client.clone(), url.clone());
        queued.spawn(async move { client.get(&url, "dana-0").await.status });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reloaded_at = tokio::time::Instant::now();
    let config = cliqgate::config::Config::from_yaml(&yaml(15)).expect("a valid config");
    running.reload(config).expect("reload");
    while let Some(done) = queued.join_next().await {
        assert_eq!(done.expect("call task"), StatusCode::OK);
    }
    // A window after the reload the queued calls are still in Zoho's window: lookups keep the
    // old share of 10.
    tokio::time::sleep_until(reloaded_at + WINDOW_PER + MARGIN + Duration::from_millis(100)).await;
    let first = first_calls(&running, "dana", 1..16).await;
    assert!(count(&first, StatusCode::OK) <= 10, "{first:?}");
    assert_eq!(
        stub.violations(),
        0,
        "Zoho saw dana's /api/v2/me quota crossed"
    );
    running.shutdown().await;
}

/// A reload keeps what the identity endpoint answered (its settings unchanged): live tokens are
/// not all asked about again, which the lookups' share would not allow within a window (and
/// which would spend their owners' quota there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_identity_answers() {
    const TOKENS: u32 = RESERVE;
    let stub = start_stub().await;
    let running = resolve_proxy(&stub, "reject").await;
    let client = Client::new();
    let url = format!("{}{CHANNELS}", base_url(&running));
    for i in 0..TOKENS {
        let answer = client.get(&url, &format!("bob-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    assert_eq!(me_arrivals(&stub), TOKENS as usize);
    let identity = resolve_yaml(&format!("{}{ME}", stub.url()), "reject");
    let yaml = config_yaml(&stub.url(), &proxy_yaml(&identity));
    let config = cliqgate::config::Config::from_yaml(&yaml).expect("a valid config");
    running.reload(config).expect("reload");
    for i in 0..TOKENS {
        let answer = client.get(&url, &format!("bob-{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    assert_eq!(
        me_arrivals(&stub),
        TOKENS as usize,
        "no token asked about again"
    );
    assert_eq!(stub.violations(), 0);
    running.shutdown().await;
}

/// A reload that changes only the cache settings (here `ttl`) builds a new cache, which takes the
/// owners found so far: live tokens are not asked about again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_cache_settings_keeps_the_owners_found() {
    const TOKENS: u32 = 4;
    let stub = start_stub().await;
    let running = resolve_proxy(&stub, "reject").await;
    let calls = first_calls(&running, "bob", 0..TOKENS).await;
    assert_eq!(count(&calls, StatusCode::OK), TOKENS as usize, "{calls:?}");
    let identity = resolve_yaml(&format!("{}{ME}", stub.url()), "reject").replace(TTL, "9m");
    assert_ne!(
        identity,
        resolve_yaml(&format!("{}{ME}", stub.url()), "reject")
    );
    let config =
        cliqgate::config::Config::from_yaml(&config_yaml(&stub.url(), &proxy_yaml(&identity)))
            .expect("a valid config");
    running.reload(config).expect("reload");
    // The owners go over in a task: let it run.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = first_calls(&running, "bob", 0..TOKENS).await;
    assert_eq!(count(&calls, StatusCode::OK), TOKENS as usize, "{calls:?}");
    assert_eq!(
        me_arrivals(&stub),
        TOKENS as usize,
        "no token asked about again"
    );
    running.shutdown().await;
}

// ---- 5b. answers kept across restarts and shared by replicas ----

/// With the memory store's `state_file`, the identity answers are kept beside it: a restarted
/// proxy does not ask about live tokens again (the lookups' share would make it slow), and the
/// file holds hashes, never a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_state_file_keeps_the_identity_answers() {
    const TOKENS: u32 = 5;
    let stub = start_stub().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = dir.path().join("state.json");
    let identity = resolve_yaml(&format!("{}{ME}", stub.url()), "reject");
    let store = format!(
        "store:\n  kind: memory\n  state_file: \"{}\"\n",
        state.display()
    );
    let yaml = config_yaml(&stub.url(), &proxy_yaml(&format!("{identity}{store}")));

    let first = start_proxy(&yaml).await;
    let calls = first_calls(&first, "bob", 0..TOKENS).await;
    assert_eq!(count(&calls, StatusCode::OK), TOKENS as usize, "{calls:?}");
    assert_eq!(me_arrivals(&stub), TOKENS as usize);
    first.shutdown().await;

    let kept = std::fs::read_to_string(dir.path().join("state.identity.json"))
        .expect("the answers are written beside the state file");
    for i in 0..TOKENS {
        assert!(!kept.contains(&format!("bob-{i}")), "a raw token in {kept}");
    }

    let second = start_proxy(&yaml).await;
    let calls = first_calls(&second, "bob", 0..TOKENS).await;
    assert_eq!(count(&calls, StatusCode::OK), TOKENS as usize, "{calls:?}");
    assert_eq!(
        me_arrivals(&stub),
        TOKENS as usize,
        "no token asked about again after the restart"
    );
    assert_eq!(stub.count_for(CHANNELS, "bob"), 2 * TOKENS as usize);
    // A new token is still asked about.
    let calls = first_calls(&second, "bob", TOKENS..TOKENS + 1).await;
    assert_eq!(calls, [StatusCode::OK]);
    assert_eq!(me_arrivals(&stub), TOKENS as usize + 1);
    second.shutdown().await;
}

/// With the Redis store, one replica's answer serves the others: a token is asked about once
/// for the fleet, not once per replica. Redis holds hashes, never a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_identity_answers_through_redis() {
    let stub = start_stub().await;
    let redis = RedisServer::start().await;
    // A long-running Redis: no conservative first window.
    assert_eq!(redis.command(&["SET", "cliqgate:epoch", "1"]).await, "OK");
    let identity = resolve_yaml(&format!("{}{ME}", stub.url()), "reject");
    let store = format!("store:\n  kind: redis\n  url: \"{}\"\n", redis.url());
    let yaml = config_yaml(&stub.url(), &proxy_yaml(&format!("{identity}{store}")));
    let (a, b) = (start_proxy(&yaml).await, start_proxy(&yaml).await);

    assert_eq!(first_calls(&a, "carol", 1..2).await, [StatusCode::OK]);
    assert_eq!(me_arrivals(&stub), 1);
    assert_eq!(first_calls(&b, "carol", 1..2).await, [StatusCode::OK]);
    assert_eq!(
        me_arrivals(&stub),
        1,
        "the second replica used the first one's answer"
    );
    assert_eq!(stub.count_for(CHANNELS, "carol"), 2);
    let m = scrape(b.admin_addr).await;
    assert_eq!(lookups(&m, "shared"), 1.0);
    assert_eq!(lookups(&m, "ok"), 0.0);

    // One hash for the hour's answers (not a key per token): token hash -> user hash:expiry.
    let keys = redis.command(&["KEYS", "cliqgate:identity:*"]).await;
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let fields = redis.command(&["HGETALL", keys[0]]).await;
    let fields: Vec<&str> = fields.lines().filter(|k| !k.is_empty()).collect();
    assert_eq!(fields.len(), 2, "{fields:?}");
    assert_eq!(fields[0].len(), 32, "a token hash: {fields:?}");
    assert!(
        fields[1]
            .split_once(':')
            .is_some_and(|(user, _)| user.len() == 32),
        "{fields:?}"
    );
    for text in [keys[0], fields[0], fields[1]] {
        assert!(
            !text.contains("carol"),
            "a raw token or user id in Redis: {text}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

// ---- 6. header mode's trust boundary ----

fn header_yaml(trusted: Option<&str>) -> String {
    let trusted = trusted
        .map(|t| format!("  trusted_networks: [\"{t}\"]\n"))
        .unwrap_or_default();
    format!("identity:\n  mode: header\n  header: {USER_HEADER}\n{trusted}")
}

async fn header_stub() -> ZohoStub {
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK)]).await;
    stub.set_user_key(UserKey::Header(http::HeaderName::from_static(
        "x-cliq-user",
    )));
    stub
}

/// Chat posts with `token`, naming `user` in the user header.
async fn post_as(
    client: &Client,
    running: &cliqgate::app::Running,
    user: &str,
    token: &str,
) -> TestResponse {
    let mut req = request(Method::POST, &chat_url(running, "C1"), Some(token), "{}");
    req.headers_mut().insert(
        USER_HEADER,
        http::HeaderValue::from_str(user).expect("a valid header value"),
    );
    client.send(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_from_an_untrusted_network_is_refused() {
    let stub = header_stub().await;
    let running = start_proxy(&config_yaml(
        &stub.url(),
        &proxy_yaml(&header_yaml(Some("10.0.0.0/8"))),
    ))
    .await;
    let answer = post_as(&Client::new(), &running, "mallory", "mallory-1").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text());
    assert_eq!(answer.json()["code"], "untrusted_source");
    assert!(stub.arrivals().is_empty(), "nothing forwarded");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_from_a_trusted_network_keys_the_quota() {
    for trusted in [Some("127.0.0.0/8"), None] {
        let stub = header_stub().await;
        let running = start_proxy(&config_yaml(
            &stub.url(),
            &proxy_yaml(&header_yaml(trusted)),
        ))
        .await;
        let client = Client::new();
        let calls = 2 * LIMIT;

        // Two users, each alternating two tokens: the header, not the token, names the quota.
        let mut set = JoinSet::new();
        for i in 0..calls {
            for user in ["frank", "grace"] {
                let (client, url) = (client.clone(), chat_url(&running, "C1"));
                let token = format!("{user}-{}", i % 2);
                set.spawn(async move {
                    let mut req = request(Method::POST, &url, Some(&token), "{}");
                    req.headers_mut()
                        .insert(USER_HEADER, http::HeaderValue::from_static(user));
                    (user, client.send(req).await.status)
                });
            }
        }
        let mut results = Vec::new();
        while let Some(done) = set.join_next().await {
            results.push(done.expect("call task"));
        }
        for user in ["frank", "grace"] {
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
                "{user} ({trusted:?}): a quota of one's own"
            );
            assert_eq!(refused, (calls - LIMIT) as usize, "{user} ({trusted:?})");
            assert_eq!(stub.count_for(CHAT, user), LIMIT as usize);
        }
        assert_eq!(stub.violations(), 0, "trusted {trusted:?}");
        running.shutdown().await;
    }
}

// ---- 7. tokens stay out of /metrics ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tokens_never_appear_in_metrics() {
    let stub = start_stub().await;
    let running = resolve_proxy(&stub, "token").await;
    let client = Client::new();
    // Zoho-shaped tokens, one per lookup outcome: resolved, refused, failed (fallback).
    let tokens = [
        "ivan-1000.5f2c9a7e1b3d4c6f8a0e2b4d6f8a1c3e.2b4d6f8a0c1e3a5c7e9b1d3f5a7c9e1b",
        "revoked-1000.9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b.0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d",
        "flaky-1000.1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d.7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b",
    ];
    for token in tokens {
        client.post(&chat_url(&running, "C1"), token, "{}").await;
        client.get(&channels_url(&running), token).await;
    }
    let m = scrape(running.admin_addr).await;
    assert!(lookups(&m, "ok") >= 1.0, "{m}");
    assert!(lookups(&m, "refused") >= 1.0, "{m}");
    assert!(lookups(&m, "fallback") >= 1.0, "{m}");
    assert_no_token_in(&m, &tokens);
    // Nor any recognisable piece of one.
    for token in tokens {
        for part in token.split(['.', '-']).filter(|p| p.len() >= 16) {
            assert!(!m.contains(part), "a piece of a token appears in /metrics");
        }
    }
    running.shutdown().await;
}
