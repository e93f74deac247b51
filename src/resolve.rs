//! `identity.mode: resolve`: who owns a token, asked of an identity endpoint and cached.
//!
//! Zoho counts quota per user across all of that user's tokens, and tokens rotate hourly; keyed
//! by token hash, a user with two live tokens would get two quotas. Here the caller's own
//! credential is shown to the identity endpoint (e.g. `GET /api/v2/me`), the user id found at
//! `user_field` becomes the key, and the answer is cached by token *hash* (never the token).
//!
//! - One lookup per token per `ttl`, however many calls arrive at once (moka's
//!   `or_try_insert_with` coalesces concurrent first calls into one lookup).
//! - A refusal (401/403) is cached for `negative_ttl` and passed to callers as Zoho sent it, so a
//!   bad token cannot flood the endpoint.
//! - Lookups spend the identity endpoint's own quota (20 per minute, lock 10 minutes), which Zoho
//!   charges to the token's owner, unknown until the answer. Any lookup could be any user's, so
//!   all lookups together get `lookup_reserve` calls a window, under one key, and each user's own
//!   calls to the endpoint get the rest ([`crate::config::LookupSplit`]): no user can reach the
//!   endpoint's limit, however many of their tokens are new. A lock Zoho reports for a lookup
//!   holds that token's lookups (a key per token).
//! - Answers leave the process only as hashes: shared in Redis with the Redis store (a token is
//!   asked about once for the fleet), kept beside the state file with the memory store
//!   ([`crate::state`]), so a restart does not ask about every live token again.
//! - Unreachable or nonsensical answers are not cached; `on_unreachable` decides. A lookup over
//!   the endpoint's quota is refused with 429 under `reject` and falls back under `token`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use moka::future::Cache;
use moka::Expiry;

use crate::body::{empty, read_prefix};
use crate::config::{OnIdentityError, ResolveConfig};
use crate::identity::{answers_scope, lookup_pool_key, user_key_for_id};
use crate::limit::{
    Acquire, Key, Limiter, LockReason, Policy, Refusal, RefusalReason, RouteId, Store, UserKey,
};
use crate::metrics::Metrics;
use crate::throttle::{self, StatusSignal};
use crate::upstream::Upstream;

/// An identity answer is a small JSON document; more than this is not an identity answer.
const MAX_IDENTITY_BODY: usize = 64 * 1024;

/// The identity endpoint's own quota when no configured route covers its path (cliq-api.md:
/// "Current user (v2) GET /api/v2/me: 20 / 10 min").
pub const IDENTITY_LIMIT: u32 = 20;
pub const IDENTITY_PER: Duration = Duration::from_secs(60);
pub const IDENTITY_LOCK: Duration = Duration::from_secs(600);

/// The route name each token's own lookup key counts under (it carries a lock Zoho reports for
/// a lookup), and the lookups' shared key too when no configured route covers the identity
/// endpoint (the Redis store keys by route name).
pub const IDENTITY_ROUTE_NAME: &str = "identity.lookup";

/// The identity endpoint's quota when no configured route covers it.
pub fn identity_policy(safety_margin: Duration) -> Policy {
    let limit = std::num::NonZeroU32::new(IDENTITY_LIMIT).unwrap_or(std::num::NonZeroU32::MIN);
    Policy::new(
        limit,
        IDENTITY_PER + safety_margin,
        IDENTITY_LOCK,
        crate::config::Algorithm::Window,
    )
}

/// A cached answer about one token.
#[derive(Debug, Clone)]
enum Answer {
    /// The owner's key, and when the answer stops holding: `ttl` after the endpoint gave it
    /// (an answer shared in Redis or kept in a state file holds for what is left of that).
    User(UserKey, Instant),
    /// The endpoint refused the token: its status, content type and body, passed on as they came.
    Refused {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
}

/// Why a token has no user key right now.
#[derive(Debug, Clone)]
pub enum ResolveError {
    /// The identity endpoint refused the token (cached): answer the caller with this.
    Refused {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// The lookup itself would exceed the identity endpoint's quota, or it is locked.
    Limited(Refusal),
    /// The endpoint could not be reached or answered nonsense, and `on_unreachable: reject`.
    Unavailable,
}

/// Lookup failures that are not cached.
#[derive(Debug, Clone)]
enum LookupError {
    Limited(Refusal),
    Unreachable(String),
}

struct AnswerExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<UserKey, Answer> for AnswerExpiry {
    fn expire_after_create(
        &self,
        _key: &UserKey,
        value: &Answer,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(match value {
            Answer::User(_, until) => until.saturating_duration_since(created_at).min(self.ttl),
            Answer::Refused { .. } => self.negative_ttl,
        })
    }
}

/// What the identity endpoint said about each token, kept across reloads that do not change
/// what its answers mean ([`Answers::serves`]): a reload must not send every live token to the
/// endpoint again (each lookup spends the owner's quota there).
#[derive(Clone)]
pub struct Answers {
    cache: Cache<UserKey, Answer>,
    /// The settings the cache was built for.
    config: ResolveConfig,
    /// Owners found so far (grows with each): whether the state file's copy is behind.
    found: Arc<AtomicU64>,
}

impl Answers {
    pub fn new(config: &ResolveConfig) -> Self {
        let cache = Cache::builder()
            .max_capacity(config.cache_size)
            // A user counts one; a refusal also counts its body, in 64-byte units, so the cache
            // holds `cache_size` users or far fewer large refusals, never `cache_size` of them.
            .weigher(|_token: &UserKey, answer: &Answer| match answer {
                Answer::User(..) => 1,
                Answer::Refused { body, .. } => {
                    1 + u32::try_from(body.len() / 64).unwrap_or(u32::MAX - 1)
                }
            })
            .expire_after(AnswerExpiry {
                ttl: config.ttl,
                negative_ttl: config.negative_ttl,
            })
            .build();
        Answers {
            cache,
            config: config.clone(),
            found: Arc::default(),
        }
    }

    /// Owners found (looked up, shared or taken back) so far in this cache, and which cache it
    /// is (a reload may build another): both unchanged, nothing new to keep.
    pub fn found(&self) -> (usize, u64) {
        (
            Arc::as_ptr(&self.found) as usize,
            self.found.load(Ordering::Relaxed),
        )
    }

    /// Whether these answers hold under `config`: the same endpoint, field and cache settings.
    pub fn serves(&self, config: &ResolveConfig) -> bool {
        let now = &self.config;
        (
            &now.url,
            &now.user_field,
            now.ttl,
            now.negative_ttl,
            now.cache_size,
        ) == (
            &config.url,
            &config.user_field,
            config.ttl,
            config.negative_ttl,
            config.cache_size,
        )
    }

    /// These answers for a reloaded config: themselves if they still hold ([`Answers::serves`]);
    /// if only the cache settings changed, a new cache that takes the owners found so far (in a
    /// task, shortly: a reload must not send every live token to the endpoint again); none
    /// otherwise (a new endpoint or field means new answers).
    pub fn carried_to(self, config: &ResolveConfig) -> Answers {
        if self.serves(config) {
            return self;
        }
        let fresh = Answers::new(config);
        if self.scope() == fresh.scope() {
            let (kept, to) = (self.kept(), fresh.clone());
            tokio::spawn(async move { to.restore(kept).await });
        }
        fresh
    }

    /// Names the endpoint and field these answers are about, for answers kept outside the
    /// process (Redis, the state file).
    pub fn scope(&self) -> String {
        answers_scope(&self.config.url, &self.config.user_field)
    }

    /// The owners found so far that still hold, with the time each has left (for the state
    /// file; refusals are not kept).
    pub fn kept(&self) -> Vec<KeptAnswer> {
        let now = Instant::now();
        self.cache
            .iter()
            .filter_map(|(token, answer)| match answer {
                Answer::User(user, until) if until > now => Some(KeptAnswer {
                    token: *token,
                    user,
                    left: until - now,
                }),
                _ => None,
            })
            .collect()
    }

    /// Takes back answers kept by [`Answers::kept`] (at start), each for what it has left, at
    /// most `ttl`.
    pub async fn restore(&self, kept: Vec<KeptAnswer>) {
        let now = Instant::now();
        for answer in kept {
            let until = now + answer.left.min(self.config.ttl);
            self.cache
                .insert(answer.token, Answer::User(answer.user, until))
                .await;
            self.found.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A token's owner as kept outside the process: both as hashes, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptAnswer {
    pub token: UserKey,
    pub user: UserKey,
    /// How much longer the answer holds.
    pub left: Duration,
}

pub struct Resolver {
    config: ResolveConfig,
    /// Its cache holds what the endpoint answered; its settings are this config's (`serves`).
    answers: Answers,
    upstream: Upstream,
    limiter: Arc<Store>,
    quota: LookupQuota,
    /// Names this endpoint and field among the answers shared in Redis.
    scope: String,
    metrics: Arc<Metrics>,
}

/// Where lookups are counted.
#[derive(Debug, Clone, Copy)]
pub struct LookupQuota {
    /// The route id of the identity endpoint: the lookups' shared key counts under it, beside
    /// the apps' own calls to the endpoint.
    pub route: RouteId,
    /// Each token's own key counts under this one ([`IDENTITY_ROUTE_NAME`]), apart from users'
    /// keys: it carries a lock Zoho reports for a lookup.
    pub token_route: RouteId,
    /// The endpoint's quota (its lock period), for the tokens' keys.
    pub policy: Policy,
    /// The lookups' share of it, under one key for all of them.
    pub pool: Policy,
}

impl Resolver {
    pub fn new(
        config: ResolveConfig,
        answers: Answers,
        upstream: Upstream,
        limiter: Arc<Store>,
        quota: LookupQuota,
        metrics: Arc<Metrics>,
    ) -> Self {
        Resolver {
            scope: answers.scope(),
            answers,
            config,
            upstream,
            limiter,
            quota,
            metrics,
        }
    }

    pub fn quota(&self) -> LookupQuota {
        self.quota
    }

    /// The answers so far, for the resolver of a reloaded config ([`Answers::serves`]).
    pub fn answers(&self) -> Answers {
        self.answers.clone()
    }

    /// The user key of a call whose credential hashes to `token`. `headers` carry the caller's
    /// `Authorization`, shown to the identity endpoint and to nobody else.
    pub async fn resolve(
        &self,
        token: UserKey,
        headers: &HeaderMap,
    ) -> Result<UserKey, ResolveError> {
        let Some(authorization) = headers.get(header::AUTHORIZATION).cloned() else {
            // A `zapikey` webhook token cannot ask who it is: it keys by itself, as in token mode.
            return Ok(token);
        };
        let answer = match self.answers.cache.get(&token).await {
            Some(answer) => {
                self.metrics.identity_cache("hit");
                Ok(answer)
            }
            None => {
                self.metrics.identity_cache("miss");
                let entry = self
                    .answers
                    .cache
                    .entry(token)
                    .or_try_insert_with(self.lookup(token, authorization))
                    .await;
                entry.map(|entry| {
                    // Counted once it is in the cache, for the state file's writer.
                    if entry.is_fresh() && matches!(entry.value(), Answer::User(..)) {
                        self.answers.found.fetch_add(1, Ordering::Relaxed);
                    }
                    entry.into_value()
                })
            }
        };
        match answer {
            Ok(Answer::User(user, _)) => Ok(user),
            Ok(Answer::Refused {
                status,
                content_type,
                body,
            }) => Err(ResolveError::Refused {
                status,
                content_type,
                body,
            }),
            Err(e) => match (e.as_ref(), self.config.on_unreachable) {
                (LookupError::Limited(refusal), OnIdentityError::Reject) => {
                    Err(ResolveError::Limited(*refusal))
                }
                (LookupError::Unreachable(why), OnIdentityError::Reject) => {
                    tracing::warn!(error = %why, "identity endpoint unavailable; call refused");
                    Err(ResolveError::Unavailable)
                }
                // The owner cannot be learnt now, whether the endpoint failed or the lookups are
                // over its quota (repeated failures use it up): key by token, as promised,
                // rather than refuse a call whose own route has quota left.
                (error, OnIdentityError::Token) => {
                    let why = match error {
                        LookupError::Limited(_) => "identity lookups over quota",
                        LookupError::Unreachable(why) => why.as_str(),
                    };
                    tracing::warn!(error = %why, "identity endpoint unavailable; keyed by token hash");
                    self.metrics.identity_lookup("fallback");
                    Ok(token)
                }
            },
        }
    }

    /// One lookup (run once per token however many callers wait on it).
    async fn lookup(
        &self,
        token: UserKey,
        authorization: HeaderValue,
    ) -> Result<Answer, LookupError> {
        let key = Key {
            route: self.quota.token_route,
            user: token,
        };
        let pool = Key {
            route: self.quota.route,
            user: lookup_pool_key(),
        };
        // Another replica may have asked already (or this one, before a restart).
        if let Store::Redis(redis) = self.limiter.as_ref() {
            if let Some((user, left)) = redis.shared_answer(&self.scope, &token).await {
                self.metrics.identity_lookup("shared");
                return Ok(Answer::User(user, Instant::now() + left));
            }
        }
        // The token's own key first: it carries a lock Zoho reported for this token's owner.
        self.admit(&self.quota.policy, key).await?;
        self.admit(&self.quota.pool, pool).await?;
        let result = self.ask(authorization).await;
        if let (Ok(Answer::User(user, _)), Store::Redis(redis)) = (&result, self.limiter.as_ref()) {
            redis
                .share_answer(&self.scope, &token, user, self.config.ttl)
                .await;
        }
        let outcome = match &result {
            Ok(Answer::User(..)) => "ok",
            Ok(Answer::Refused { .. }) => "refused",
            Err(LookupError::Limited(_)) => "throttled",
            Err(LookupError::Unreachable(_)) => "unreachable",
        };
        self.metrics.identity_lookup(outcome);
        if let Err(LookupError::Limited(refusal)) = &result {
            // Zoho throttled the identity endpoint itself: honour it like any lock.
            let wait_ms = self.limiter.clock().now().abs_diff(refusal.retry_at) / 1_000_000;
            tracing::warn!(token = %token.short(), wait_ms,
                "the identity endpoint throttled a lookup; that token's lookups wait for the lock");
            let _ = self
                .limiter
                .lock(
                    &self.quota.policy,
                    key,
                    refusal.retry_at,
                    LockReason::UpstreamThrottle,
                )
                .await;
        }
        result
    }

    /// Counts a lookup under `key`, or says why it cannot be sent now.
    async fn admit(&self, policy: &Policy, key: Key) -> Result<(), LookupError> {
        match self.limiter.acquire(policy, key, None).await {
            Ok(Acquire::Now { .. }) => Ok(()),
            Ok(Acquire::Refused(refusal)) => {
                self.metrics.identity_lookup("rate_limited");
                Err(LookupError::Limited(refusal))
            }
            // Reject mode never reserves; if a store did, give the slot back and wait like a refusal.
            Ok(Acquire::Reserved { reservation, .. }) => {
                let _ = self.limiter.cancel(policy, &reservation).await;
                self.metrics.identity_lookup("rate_limited");
                let refusal = Refusal {
                    reason: RefusalReason::Limited,
                    retry_at: reservation.slot,
                };
                Err(LookupError::Limited(refusal))
            }
            Err(e) => {
                self.metrics.identity_lookup("unreachable");
                Err(LookupError::Unreachable(format!("limiter store: {e}")))
            }
        }
    }

    async fn ask(&self, authorization: HeaderValue) -> Result<Answer, LookupError> {
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(self.config.url.clone())
            .body(empty())
            .map_err(|e| LookupError::Unreachable(e.to_string()))?;
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, authorization);
        request
            .headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let response = tokio::time::timeout(self.config.timeout, self.upstream.fetch(request))
            .await
            .map_err(|_| LookupError::Unreachable("timed out".into()))?
            .map_err(|e| LookupError::Unreachable(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let read =
            tokio::time::timeout(self.config.timeout, read_prefix(body, MAX_IDENTITY_BODY)).await;
        let (bytes, _, rest) = read
            .map_err(|_| LookupError::Unreachable("answer timed out".into()))?
            .map_err(|e| LookupError::Unreachable(e.to_string()))?;
        let complete = rest.is_none();
        let throttled = match throttle::classify_status(parts.status) {
            StatusSignal::Throttled => true,
            StatusSignal::Inspect => throttle::encoded_body_signals_throttle(
                parts.headers.get(header::CONTENT_ENCODING),
                &bytes,
                complete,
            ),
            StatusSignal::NotThrottled => false,
        };
        if throttled {
            let wait = self
                .policy_lock()
                .max(throttle::retry_after(&parts.headers).unwrap_or_default());
            let retry_at = self
                .limiter
                .clock()
                .now()
                .saturating_add(crate::limit::nanos(wait));
            let refusal = Refusal {
                reason: RefusalReason::Locked,
                retry_at,
            };
            return Err(LookupError::Limited(refusal));
        }
        if parts.status == StatusCode::UNAUTHORIZED || parts.status == StatusCode::FORBIDDEN {
            let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
            return Ok(Answer::Refused {
                status: parts.status,
                content_type,
                body: bytes,
            });
        }
        if !parts.status.is_success() {
            return Err(LookupError::Unreachable(format!(
                "identity endpoint answered {}",
                parts.status
            )));
        }
        if !complete {
            return Err(LookupError::Unreachable("identity answer too large".into()));
        }
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|_| LookupError::Unreachable("identity answer is not JSON".into()))?;
        let id = match json.pointer(&self.config.user_field) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => {
                return Err(LookupError::Unreachable(format!(
                    "no user id at {} in the identity answer",
                    self.config.user_field
                )))
            }
        };
        Ok(Answer::User(
            user_key_for_id(&id),
            Instant::now() + self.config.ttl,
        ))
    }

    fn policy_lock(&self) -> Duration {
        Duration::from_nanos(self.quota.policy.lock)
    }

    /// Distinct tokens currently cached (for tests and the admin API).
    pub async fn cached(&self) -> u64 {
        self.answers.cache.run_pending_tasks().await;
        self.answers.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        OnIdentityError, DEFAULT_RESOLVE_NEGATIVE_TTL, DEFAULT_RESOLVE_TIMEOUT, DEFAULT_RESOLVE_TTL,
    };

    fn settings(cache_size: u64) -> ResolveConfig {
        ResolveConfig {
            url: http::Uri::from_static("https://cliq.zoho.com/api/v2/me"),
            user_field: "/data/zuid".into(),
            ttl: DEFAULT_RESOLVE_TTL,
            negative_ttl: DEFAULT_RESOLVE_NEGATIVE_TTL,
            timeout: DEFAULT_RESOLVE_TIMEOUT,
            cache_size,
            on_unreachable: OnIdentityError::Reject,
            lookup_reserve: None,
        }
    }

    /// Answers taken back from outside the process hold for what they have left, never longer
    /// than this config's `ttl`.
    #[tokio::test]
    async fn answers_taken_back_hold_at_most_ttl() {
        let config = ResolveConfig {
            ttl: Duration::from_secs(5),
            ..settings(10)
        };
        let answers = Answers::new(&config);
        let kept = |n: u8, left: Duration| KeptAnswer {
            token: UserKey([n; 16]),
            user: UserKey([n + 100; 16]),
            left,
        };
        answers
            .restore(vec![
                kept(1, Duration::from_secs(3600)),
                kept(2, Duration::from_secs(2)),
            ])
            .await;
        assert_eq!(answers.found().1, 2);
        let mut back = answers.kept();
        back.sort_by_key(|a| a.token.0);
        assert_eq!(back.len(), 2, "{back:?}");
        assert!(back[0].left <= Duration::from_secs(5), "{back:?}");
        assert!(back[0].left > Duration::from_secs(4), "{back:?}");
        assert!(back[1].left <= Duration::from_secs(2), "{back:?}");
    }

    /// Refusals weigh their bodies: a flood of bad tokens with large 401 bodies cannot fill
    /// `cache_size` entries of them (100,000 x 64 KiB would be 6.4 GB).
    #[tokio::test]
    async fn large_refusals_fill_the_cache_by_their_size() {
        let answers = Answers::new(&settings(1_000));
        let refusal = Answer::Refused {
            status: StatusCode::UNAUTHORIZED,
            content_type: None,
            body: Bytes::from(vec![b'x'; 6_400]),
        };
        for n in 0..50u8 {
            answers
                .cache
                .insert(UserKey([n; 16]), refusal.clone())
                .await;
        }
        answers.cache.run_pending_tasks().await;
        assert!(
            answers.cache.entry_count() <= 9,
            "{}",
            answers.cache.entry_count()
        );
        assert!(answers.cache.weighted_size() <= 1_000);
        for n in 100..200u8 {
            answers
                .cache
                .insert(
                    UserKey([n; 16]),
                    Answer::User(UserKey([n; 16]), Instant::now() + DEFAULT_RESOLVE_TTL),
                )
                .await;
        }
        answers.cache.run_pending_tasks().await;
        assert!(answers.cache.weighted_size() <= 1_000);
    }

    #[test]
    fn answers_are_kept_only_for_the_same_endpoint_and_cache_settings() {
        let answers = Answers::new(&settings(1_000));
        assert!(answers.serves(&settings(1_000)));
        let mut other = settings(1_000);
        other.timeout = Duration::from_secs(1);
        other.on_unreachable = OnIdentityError::Token;
        assert!(answers.serves(&other), "how lookups fail changes no answer");
        other.user_field = "/data/id".into();
        assert!(!answers.serves(&other));
        assert!(!answers.serves(&settings(2_000)));
    }
}
