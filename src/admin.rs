//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the `/admin/` API.
//!
//! - `GET /admin/limits[?route=NAME][&user=SHORTHASH]`: per route and user, the quota as the
//!   limiter sees it now (calls in the window, remaining, next free slot, lock, queued).
//! - `GET /admin/config`: the effective config, secrets redacted.
//!
//! If `admin.token` is set, every `/admin/` path needs `Authorization: Bearer <token>`; the other
//! paths stay open (scrapers and probes). Nothing here ever shows a caller's credential: the
//! limiter never holds one (users are 128-bit hashes, shown as their first 64 bits).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::body::{full, ProxyBody};
use crate::config::{
    format_duration, redact_url_password, Algorithm, Config, IdentityConfig, LogFormat,
    OnIdentityError, OnLimit, OnStoreError, RouteMode, StoreConfig, Unmatched,
};
use crate::identity::lookup_pool_key;
use crate::limit::{Key, KeyStatus, Kind, Nanos, Policy, RouteId, Store};
use crate::proxy::Proxy;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";
/// How `/admin/limits` names the key all identity lookups count under (resolve mode).
const LOOKUPS_USER: &str = "lookups";

/// Users listed by one `/admin/limits` answer (all routes together); more are cut, marked
/// `"truncated": true`. Filter with `?route=` or `?user=` to see the rest.
pub const MAX_USERS_SHOWN: usize = 10_000;
/// Redis keys one `/admin/limits` answer looks at (a bounded SCAN).
pub const MAX_REDIS_KEYS: usize = 1_000;

pub async fn handle<B>(proxy: Arc<Proxy>, req: Request<B>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let path = req.uri().path();
    if path == "/admin" || path.starts_with("/admin/") {
        if let Some(token) = &proxy.config.admin.token {
            if !authorized(req.headers(), token) {
                let mut response = json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "unauthorized",
                            "message": "/admin/ needs Authorization: Bearer <admin token>"}),
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cliqgate admin\""),
                );
                return response;
            }
        }
        return match path {
            "/admin/limits" => {
                let filter = Filter::from_query(req.uri().query());
                json_response(StatusCode::OK, &limits(&proxy, &filter).await)
            }
            "/admin/config" => json_response(StatusCode::OK, &config_json(&proxy.config)),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "message": "try /admin/limits or /admin/config"}),
            ),
        };
    }
    match path {
        "/metrics" => {
            proxy.refresh_gauges();
            let mut response = Response::new(full(Bytes::from(proxy.metrics.encode())));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        // Alive: the process answers.
        "/healthz" => text(StatusCode::OK, "ok\n"),
        // Ready: a valid config is loaded and the store answers.
        "/readyz" if proxy.limiter.ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `Authorization: Bearer <token>`, compared in constant time (hashes of equal length, so
/// neither the token's content nor its length leaks through timing).
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (a, b) = (
        Sha256::digest(given.trim().as_bytes()),
        Sha256::digest(token.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

// ---- /admin/limits ----

#[derive(Debug, Default)]
struct Filter {
    route: Option<String>,
    user: Option<String>,
}

impl Filter {
    fn from_query(query: Option<&str>) -> Self {
        let mut filter = Filter::default();
        for pair in query.unwrap_or("").split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned();
            match name {
                "route" => filter.route = Some(value),
                "user" => filter.user = Some(value.to_ascii_lowercase()),
                _ => {}
            }
        }
        filter
    }
}

async fn limits(proxy: &Proxy, filter: &Filter) -> Value {
    let routes: Vec<_> = proxy
        .routes
        .iter()
        .filter(|r| filter.route.as_deref().is_none_or(|name| name == r.name))
        .collect();
    let policies: BTreeMap<RouteId, Policy> = routes.iter().map(|r| (r.id, r.policy)).collect();
    // The identity lookups' shared key counts under its own share of the identity route.
    let pool = proxy.lookup_quota().map(|q| (q.route, q.pool));
    let pool_key = lookup_pool_key();
    let policy = |key: &Key| match pool {
        Some((route, pool)) if key.route == route && key.user == pool_key => {
            policies.get(&key.route).map(|_| pool)
        }
        _ => policies.get(&key.route).copied(),
    };
    let mut answer = serde_json::Map::new();
    let keys: Vec<KeyStatus> = match proxy.limiter.as_ref() {
        Store::Memory(memory) => {
            answer.insert("store".into(), json!("memory"));
            answer.insert("partial".into(), json!(false));
            memory.status(policy)
        }
        Store::Redis(redis) => {
            let status = redis.status(policy, MAX_REDIS_KEYS).await;
            answer.insert("store".into(), json!("redis"));
            answer.insert("source".into(), json!(status.source));
            answer.insert("partial".into(), json!(status.partial));
            answer.insert("scanned_keys".into(), json!(status.scanned));
            if let Some(note) = status.note {
                answer.insert("note".into(), json!(note));
            }
            status.keys
        }
    };
    let mut by_route: BTreeMap<RouteId, Vec<(String, &KeyStatus)>> = BTreeMap::new();
    for status in &keys {
        let user = if status.key.user == pool_key {
            LOOKUPS_USER.to_string()
        } else {
            status.key.user.short()
        };
        if filter.user.as_deref().is_some_and(|u| u != user) {
            continue;
        }
        by_route
            .entry(status.key.route)
            .or_default()
            .push((user, status));
    }
    let mut shown = 0usize;
    let mut truncated = false;
    let generated_at = unix_ms();
    let routes: Vec<Value> = routes
        .iter()
        .map(|route| {
            let mut users = by_route.remove(&route.id).unwrap_or_default();
            users.sort_by(|a, b| a.0.cmp(&b.0));
            let room = MAX_USERS_SHOWN.saturating_sub(shown);
            if users.len() > room {
                truncated = true;
                users.truncate(room);
            }
            shown += users.len();
            let users: Vec<Value> = users
                .into_iter()
                .map(|(user, s)| {
                    json!({
                        "user": user,
                        "calls_in_window": s.calls_in_window,
                        "remaining": s.remaining,
                        "next_free_slot_ms": ceil_ms(s.next_free_in),
                        "locked_for_ms": ceil_ms(s.locked_for),
                        // SPEC's "lock until", on the wall clock (null when not locked).
                        "locked_until_unix_ms": (s.locked_for > 0)
                            .then(|| generated_at.saturating_add(ceil_ms(s.locked_for))),
                        // The only reason a key is ever locked: Zoho said it was throttled.
                        "lock_reason": (s.locked_for > 0).then_some("upstream_throttle"),
                        "queued": s.queued,
                    })
                })
                .collect();
            let policy = route.policy;
            let algorithm = match policy.kind {
                Kind::Window => json!({"kind": "window"}),
                Kind::Gcra { burst, period } => {
                    json!({"kind": "gcra", "burst": burst, "period_ms": ceil_ms(period)})
                }
            };
            json!({
                "route": route.name,
                "limit": policy.limit,
                "window_ms": ceil_ms(policy.window),
                "lock_ms": ceil_ms(policy.lock),
                "algorithm": algorithm,
                "mode": mode_name(route.mode),
                "users": users,
            })
        })
        .collect();
    answer.insert("generated_at_unix_ms".into(), json!(generated_at));
    answer.insert("truncated".into(), json!(truncated));
    answer.insert("routes".into(), Value::Array(routes));
    Value::Object(answer)
}

fn ceil_ms(ns: Nanos) -> u64 {
    ns.div_ceil(1_000_000)
}

fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

// ---- /admin/config ----

/// The effective config, secrets redacted: the Redis URL's password, any userinfo in the
/// upstream or identity URL, and the admin token itself.
pub fn config_json(c: &Config) -> Value {
    let d = |d: Duration| json!(format_duration(d));
    let identity = match &c.identity {
        IdentityConfig::Token => json!({"mode": "token"}),
        IdentityConfig::Header { name, trusted } => json!({
            "mode": "header",
            "header": name.as_str(),
            "trusted_networks": trusted.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
        IdentityConfig::Resolve(r) => json!({
            "mode": "resolve",
            "url": redact_url_password(&r.url.to_string()),
            "user_field": r.user_field,
            "ttl": d(r.ttl),
            "negative_ttl": d(r.negative_ttl),
            "timeout": d(r.timeout),
            "cache_size": r.cache_size,
            "on_unreachable": match r.on_unreachable {
                OnIdentityError::Reject => "reject",
                OnIdentityError::Token => "token",
            },
            "lookup_reserve": c.lookup_split().map(|s| s.lookups.get()),
        }),
    };
    let store = match &c.store {
        StoreConfig::Memory => json!({
            "kind": "memory",
            "state_file": c.state_file.as_ref().map(|p| p.display().to_string()),
        }),
        StoreConfig::Redis(r) => json!({
            "kind": "redis",
            "url": r.redacted_url(),
            "on_error": match r.on_error {
                OnStoreError::Reject => "reject",
                OnStoreError::Local => "local",
            },
            "replicas": r.replicas.get(),
            "timeout": d(r.timeout),
            "connect_timeout": d(r.connect_timeout),
        }),
    };
    let routes: Vec<Value> = c
        .routes
        .iter()
        .map(|r| {
            let (algorithm, burst) = match r.algorithm {
                Algorithm::Window => ("window", None),
                Algorithm::Gcra { burst } => ("gcra", Some(burst.get())),
            };
            json!({
                "name": r.name,
                "method": r.method.as_ref().map(Method::as_str),
                "paths": r.paths,
                "limit": r.limit.get(),
                "per": d(r.per),
                "window": d(r.per + c.safety_margin),
                "lock": d(r.lock),
                "on_limit": match r.on_limit {
                    OnLimit::Queue => "queue",
                    OnLimit::Reject => "reject",
                },
                "max_wait": d(r.max_wait),
                "algorithm": algorithm,
                "burst": burst,
                "mode": mode_name(r.mode),
                "validate": r.validate.map(|set| set.name),
            })
        })
        .collect();
    json!({
        "listen": c.listen.to_string(),
        "admin_listen": c.admin_listen.to_string(),
        "upstream": redact_url_password(&format!("{}://{}", c.upstream.scheme, c.upstream.authority)),
        "upstream_ca_file": c.upstream_ca_file.as_ref().map(|p| p.display().to_string()),
        "safety_margin": d(c.safety_margin),
        "unmatched": match c.unmatched {
            Unmatched::Forward => "forward",
            Unmatched::Reject => "reject",
        },
        "identity": identity,
        "store": store,
        "timeouts": {
            "connect": d(c.timeouts.connect),
            "response": d(c.timeouts.response),
            "client_header": d(c.timeouts.client_header),
            "client_body": d(c.timeouts.client_body),
            "shutdown": d(c.timeouts.shutdown),
        },
        "http": {
            "max_header_bytes": c.http.max_header_bytes,
            "max_body_bytes": c.http.max_body_bytes,
        },
        "queue": {
            "max_per_user": c.queue.max_per_user,
            "max_total": c.queue.max_total,
        },
        "log": {
            "format": match c.log.format {
                LogFormat::Pretty => "pretty",
                LogFormat::Json => "json",
            },
            "level": c.log.level,
        },
        "admin": {"token": c.admin.token.as_ref().map(|_| "REDACTED")},
        "reload": {"watch": c.reload.watch},
        "routes": routes,
    })
}

fn mode_name(mode: RouteMode) -> &'static str {
    match mode {
        RouteMode::Enforce => "enforce",
        RouteMode::Shadow => "shadow",
    }
}

// ---- responses ----

fn json_response(status: StatusCode, value: &Value) -> Response<ProxyBody> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(auth).expect("ascii"),
        );
        h
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let token = "s3cret-admin-token-0123";
        assert!(authorized(
            &headers("Bearer s3cret-admin-token-0123"),
            token
        ));
        assert!(authorized(
            &headers("bearer s3cret-admin-token-0123"),
            token
        ));
        assert!(!authorized(
            &headers("Bearer s3cret-admin-token-012"),
            token
        ));
        assert!(!authorized(
            &headers("Bearer s3cret-admin-token-01234"),
            token
        ));
        assert!(!authorized(
            &headers("Basic s3cret-admin-token-0123"),
            token
        ));
        assert!(!authorized(&headers("s3cret-admin-token-0123"), token));
        assert!(!authorized(&HeaderMap::new(), token));
    }

    #[test]
    fn config_json_redacts_secrets() {
        let yaml = "upstream: \"http://127.0.0.1:1\"\nstore:\n  kind: redis\n  url: \"redis://user:hunter2-pass@h:6379/0\"\nroutes:\n  - name: r\n    path: \"/a\"\n    limit: 5\n    per: \"1m\"\n    lock: \"5m\"\n";
        let mut config = Config::from_yaml(yaml).expect("valid");
        config.admin.token = Some("admin-token-abcdefghijkl".into());
        let text = config_json(&config).to_string();
        assert!(!text.contains("hunter2-pass"), "{text}");
        assert!(!text.contains("admin-token-abcdefghijkl"), "{text}");
        assert!(text.contains("redis://user:REDACTED@h:6379/0"), "{text}");
        assert!(text.contains(r#""token":"REDACTED""#), "{text}");
        assert!(text.contains(r#""limit":5"#), "{text}");
    }

    #[test]
    fn query_filter_is_decoded() {
        let f = Filter::from_query(Some("route=chats.post%5Fmessage&user=ABCD&x=1"));
        assert_eq!(f.route.as_deref(), Some("chats.post_message"));
        assert_eq!(f.user.as_deref(), Some("abcd"));
    }
}
