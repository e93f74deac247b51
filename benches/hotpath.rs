//! The pure steps of every call before the limiter decides: route matching on the full shipped
//! `config/cliq.yaml`, and identity extraction (hashing the credential). Also the three steps
//! together (route, user, decision) as the proxy runs them for one call.
//!
//! ```sh
//! cargo bench --bench hotpath              # everything
//! cargo bench --bench hotpath -- route     # route matching only
//! cargo bench --bench hotpath -- identity  # identity extraction only
//! ```
//!
//! Allocations are counted by divan's `AllocProfiler` (the `alloc`/`dealloc` rows under each
//! benchmark): the hot path should allocate nothing per call.
//!
//! - `route_find`: `RouteTable::find` on the table built from `config/cliq.yaml` (every shipped
//!   route, in file order), for the first route, the last one (every entry is tried before it),
//!   a `%`-encoded placeholder segment (`%20`, `%40` in an e-mail address: never decoded), a
//!   `%`-encoded literal segment (a spelling variant: decoded to compare), and a path no route
//!   takes (every entry tried, none matches).
//! - `identity`: `identify` in token mode with `Authorization: Zoho-oauthtoken <64 chars>`, and
//!   with the credential in a `zapikey` query parameter instead.
//! - `call_pure`: route + identity + in-memory decision for one call, 10k users cycling, each at
//!   80% of the quota of `chats.post_message` (so every decision is "send now").
//!
//! Under `cargo test --all-targets` (no `--bench`), divan runs every benchmark once as a test.

mod common;

use std::path::Path;
use std::sync::Arc;

use cliqgate::config::{Config, IdentityConfig};
use cliqgate::identity::identify;
use cliqgate::limit::{Acquire, Key, Kind, ManualClock, MemoryStore, Policy, RouteId};
use cliqgate::route::RouteTable;
use divan::counter::ItemsCount;
use divan::{black_box, AllocProfiler, Bencher};
use http::{HeaderMap, HeaderValue, Method};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

fn shipped() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cliq.yaml");
    match Config::load(&path) {
        Ok(config) => config,
        Err(errors) => panic!("{} is invalid:\n{errors}", path.display()),
    }
}

fn route_index(config: &Config, name: &str) -> RouteId {
    let i = config
        .routes
        .iter()
        .position(|r| r.name == name)
        .unwrap_or_else(|| panic!("route {name} is in config/cliq.yaml"));
    RouteId(i as u32)
}

/// (case, method, path, the route it must match) on the shipped table.
fn cases(config: &Config) -> Vec<(&'static str, Method, &'static str, Option<RouteId>)> {
    let last = config.routes.last().expect("routes").name.clone();
    vec![
        (
            "first_route",
            Method::POST,
            "/api/v3/chats/CT_2242140193914181289_64396981/message",
            Some(RouteId(0)),
        ),
        (
            "last_route",
            Method::GET,
            "/api/v2/me",
            Some(route_index(config, &last)),
        ),
        (
            "pct_in_placeholder",
            Method::POST,
            "/api/v2/buddies/jane%20doe%40example.com/message",
            Some(route_index(config, "buddies.post_message_v2")),
        ),
        (
            "pct_in_literal",
            Method::POST,
            "/api/v2/buddies/jane/m%65ssage",
            Some(route_index(config, "buddies.post_message_v2")),
        ),
        (
            "unmatched",
            Method::GET,
            "/api/v2/departments/D1/members",
            None,
        ),
    ]
}

/// `RouteTable::find` on the full shipped table.
#[divan::bench(
    args = ["first_route", "last_route", "pct_in_placeholder", "pct_in_literal", "unmatched"],
    sample_count = 1000,
    sample_size = 1000
)]
fn route_find(bencher: Bencher, case: &str) {
    let config = shipped();
    let table = RouteTable::new(&config.routes);
    let (_, method, path, expected) = cases(&config)
        .into_iter()
        .find(|c| c.0 == case)
        .expect("a known case");
    assert_eq!(table.find(&method, path), expected, "{case}: {path}");
    bencher
        .counter(ItemsCount::new(1usize))
        .bench_local(|| table.find(black_box(&method), black_box(path)));
}

/// A 64-character credential, shaped like a Zoho OAuth token.
fn token(n: u64) -> String {
    let t = format!(
        "1000.{n:027x}{:032x}",
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    );
    assert_eq!(t.len(), 64);
    t
}

fn auth_headers(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Zoho-oauthtoken {token}")).expect("valid");
    headers.insert(http::header::AUTHORIZATION, value);
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers
}

/// `identify` in token mode (SHA-256 of the credential, truncated to 128 bits).
#[divan::bench(args = ["authorization", "zapikey_query"], sample_count = 1000, sample_size = 1000)]
fn identity(bencher: Bencher, case: &str) {
    let mode = IdentityConfig::Token;
    let token = token(42);
    let (headers, query) = match case {
        "authorization" => (auth_headers(&token), None),
        _ => {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            (headers, Some(format!("name=alerts&zapikey={token}")))
        }
    };
    let expected = identify(&mode, &auth_headers(&token), None).expect("a credential");
    assert_eq!(identify(&mode, &headers, query.as_deref()), Ok(expected));
    bencher
        .counter(ItemsCount::new(1usize))
        .bench_local(|| identify(black_box(&mode), black_box(&headers), query.as_deref()));
}

/// Route, user and decision of one call, as `Proxy::pipeline` runs them (without HTTP): `n`
/// users cycling, each at 80% of `chats.post_message`'s quota on a fake clock.
#[divan::bench(args = [10_000], sample_count = 1000, sample_size = 1000)]
fn call_pure(bencher: Bencher, users: usize) {
    let users = if common::bench_mode() {
        users
    } else {
        users.min(100)
    };
    let config = shipped();
    let table = RouteTable::new(&config.routes);
    let post = &config.routes[0];
    assert_eq!(post.name, "chats.post_message");
    let policy = Policy::for_route(post, config.safety_margin);
    assert_eq!(policy.kind, Kind::Window);
    let clock = Arc::new(ManualClock::new());
    let store = MemoryStore::new(clock.clone(), config.queue.max_total);
    let calls: Vec<HeaderMap> = (0..users as u64).map(|n| auth_headers(&token(n))).collect();
    let path = "/api/v3/chats/CT_2242140193914181289_64396981/message";
    let spacing = policy.window / u64::from(policy.limit);
    let step = ((spacing + spacing / 4) / users as u64).max(1);
    let mut now = 0;
    let mut next = 0;
    let mut call = || {
        now += step;
        clock.set(now);
        let headers = &calls[next];
        next = (next + 1) % calls.len();
        let route = table.find(&Method::POST, black_box(path))?;
        let user = identify(&config.identity, headers, None).ok()?;
        let key = Key {
            route: RouteId(route.0),
            user,
        };
        Some(store.acquire_now(&policy, key, None))
    };
    // Fill every user's log first: the steady state of a busy proxy.
    for _ in 0..users * policy.limit as usize {
        assert!(matches!(call(), Some(Acquire::Now { .. })));
    }
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let answer = call();
        assert!(matches!(answer, Some(Acquire::Now { .. })));
        answer
    });
}
