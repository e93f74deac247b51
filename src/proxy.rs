//! The request pipeline, top to bottom:
//! route → user → validate → limit (forward / delay / refuse) → forward → learn from the
//! response → metrics and one access-log line.
//!
//! Each step is a function with the reason it sits where it does. Only this module and
//! [`crate::upstream`] see both the caller's and Zoho's side of a call.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::body::{read_prefix, read_whole, Limited, Prefixed, ProxyBody, ReadError};
use crate::config::{Config, IdentityConfig, LookupSplit, OnLimit, RouteMode, Unmatched};
use crate::error::ProxyError;
use crate::headers::{fields_size, prepare_upstream_request, remove_hop_by_hop};
use crate::identity::{identify, IdentityError};
use crate::limit::{
    Acquire, Key, Limiter, LockReason, Nanos, Policy, QueueRule, QuotaView, Refusal, RefusalReason,
    Reservation, RouteId, RouteNames, Store, StoreError, UserKey,
};
use crate::metrics::{Decision, Metrics, RouteMetrics, UNMATCHED_ROUTE};
use crate::resolve::{Answers, LookupQuota, ResolveError, Resolver};
use crate::route::RouteTable;
use crate::throttle::{self, StatusSignal};
use crate::upstream::{Sending, Upstream, UpstreamBody};
use crate::validate::{Invalid, RuleSet};

/// Body bytes a queued call may hold while it waits: enough for any Cliq message call, small
/// enough that a full queue stays small. Larger bodies wait in the socket.
const QUEUE_BODY_PEEK: usize = 64 * 1024;

/// A call as it moves through the pipeline: boxed once when it arrives, so each step, and each
/// future that waits on one, holds a pointer rather than its own copy of the 240-byte request
/// (every await point of an async block keeps room for the values it moved, so a request passed
/// by value down four steps took a kilobyte of every queued call's memory).
type Call = Box<Request<ProxyBody>>;

/// One route as the pipeline needs it, built once per config.
pub struct RouteRuntime {
    pub name: String,
    /// Its place in [`Proxy::routes`].
    index: usize,
    /// The route's id in the limiter: stable for its name across reloads.
    pub id: RouteId,
    pub mode: RouteMode,
    pub policy: Policy,
    pub queue: Option<QueueRule>,
    /// The endpoint's documented input limits, checked before the limiter (`None`: unchecked).
    pub validate: Option<&'static RuleSet>,
    pub metrics: RouteMetrics,
    /// `RateLimit-Policy` value (draft-ietf-httpapi-ratelimit-headers): quota and window.
    policy_header: HeaderValue,
    /// The fixed start of this route's `RateLimit` value: `"name";r=`.
    ratelimit_prefix: Box<[u8]>,
}

/// Everything a call needs, shared by all connections.
pub struct Proxy {
    pub config: Config,
    table: RouteTable,
    pub routes: Vec<RouteRuntime>,
    unmatched: RouteMetrics,
    pub limiter: Arc<Store>,
    upstream: Upstream,
    /// Set when a shutdown begins: queued calls that cannot be sent by then are refused.
    drain: Arc<Drain>,
    /// Resolve mode: who owns a token.
    resolver: Option<Resolver>,
    /// Resolve mode: how the identity endpoint's quota is shared, as applied here.
    pub lookup_split: Option<LookupSplit>,
    pub metrics: Arc<Metrics>,
}

/// What a new config's proxy takes over from the one it replaces.
#[derive(Default)]
pub struct Handover {
    /// What the identity endpoint answered so far, kept if still valid ([`Answers::serves`]).
    pub answers: Option<Answers>,
    /// Resolve mode: the shares to apply instead of the config's, while calls decided under
    /// the previous config's shares are still in the endpoint's window.
    pub lookup_split: Option<LookupSplit>,
}

impl Proxy {
    /// Resolve mode: where identity lookups are counted.
    pub fn lookup_quota(&self) -> Option<LookupQuota> {
        self.resolver.as_ref().map(Resolver::quota)
    }

    /// What the identity endpoint answered so far (resolve mode), for the next config's proxy.
    pub fn answers(&self) -> Option<Answers> {
        self.resolver.as_ref().map(Resolver::answers)
    }

    pub fn new(
        config: Config,
        limiter: Arc<Store>,
        upstream: Upstream,
        metrics: Arc<Metrics>,
        names: &RouteNames,
        drain: Arc<Drain>,
        handover: Handover,
    ) -> Self {
        let lookup_split = handover.lookup_split.or(config.lookup_split());
        let identity_route = config.identity_route();
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, route)| {
                let mut policy = Policy::for_route(route, config.safety_margin);
                let mut quota = route.limit.get();
                if let (Some(split), true) = (lookup_split, identity_route == Some(index)) {
                    // The apps' own calls to the identity endpoint: what lookups leave them.
                    quota = split.own.get();
                    policy = policy.scaled(quota).unwrap_or(policy);
                }
                let window_secs = (route.per + config.safety_margin).as_secs_f64().ceil() as u64;
                let policy_header = HeaderValue::from_str(&format!(
                    "\"{}\";q={};w={}",
                    route.name,
                    quota,
                    window_secs.max(1)
                ))
                .unwrap_or_else(|_| HeaderValue::from_static("\"route\""));
                RouteRuntime {
                    name: route.name.clone(),
                    index,
                    id: names.id(&route.name),
                    mode: route.mode,
                    policy,
                    queue: (route.on_limit == OnLimit::Queue).then(|| QueueRule {
                        max_wait: crate::limit::nanos(route.max_wait),
                        max_per_user: config.queue.max_per_user,
                    }),
                    validate: route.validate,
                    metrics: metrics.route(&route.name),
                    policy_header,
                    ratelimit_prefix: format!("\"{}\";r=", route.name).into_bytes().into(),
                }
            })
            .collect::<Vec<_>>();
        let table = RouteTable::new(&config.routes);
        let resolver = match &config.identity {
            IdentityConfig::Resolve(resolve) => {
                // Lookups spend the identity endpoint's own quota: the route that covers its path,
                // or Zoho's published figure for /api/v2/me under a route id of its own.
                let (route, policy) = match identity_route {
                    Some(index) => (
                        routes[index].id,
                        Policy::for_route(&config.routes[index], config.safety_margin),
                    ),
                    None => (
                        names.id(crate::resolve::IDENTITY_ROUTE_NAME),
                        crate::resolve::identity_policy(config.safety_margin),
                    ),
                };
                let pool = lookup_split
                    .and_then(|split| policy.scaled(split.lookups.get()))
                    .unwrap_or(policy);
                let answers = handover
                    .answers
                    .filter(|answers| answers.serves(resolve))
                    .unwrap_or_else(|| Answers::new(resolve));
                let quota = LookupQuota {
                    route,
                    token_route: names.id(crate::resolve::IDENTITY_ROUTE_NAME),
                    policy,
                    pool,
                };
                Some(Resolver::new(
                    resolve.clone(),
                    answers,
                    upstream.clone(),
                    limiter.clone(),
                    quota,
                    metrics.clone(),
                ))
            }
            IdentityConfig::Token | IdentityConfig::Header { .. } => None,
        };
        Proxy {
            drain,
            table,
            resolver,
            lookup_split,
            routes,
            unmatched: metrics.route(UNMATCHED_ROUTE),
            limiter,
            upstream,
            metrics,
            config,
        }
    }

    /// Brings per-route gauges that are derived from limiter state up to date (before a scrape).
    pub fn refresh_gauges(&self) {
        for route in &self.routes {
            route
                .metrics
                .set_locks_active(self.limiter.locks_active(route.id));
        }
        self.metrics.limiter_keys.set(self.limiter.len() as i64);
    }

    /// Handles one call from an app. Never fails: every outcome is a response.
    ///
    /// This future is what every call in flight holds, queued ones included, so its size is
    /// memory per call. The request is boxed here (`Call`). Written as a function returning an
    /// `async move` block, here and in `pipeline` and `wait_for_slot`: an `async fn` keeps a
    /// second copy of each argument it moves into a local.
    #[allow(clippy::manual_async_fn)] // see `handle`: not an `async fn`, on purpose
    pub fn handle(
        self: Arc<Self>,
        req: Request<ProxyBody>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<ProxyBody>> {
        // Only the address is needed (the trust check of header identity), not the port.
        let peer = peer.ip();
        let req = Box::new(req);
        async move {
            let mut log = AccessLog::new(&req);
            let response = match self.pipeline(req, peer, &mut log).await {
                Ok(response) => response,
                Err(error) => {
                    if let Some(reason) = error.caller_error() {
                        self.metrics.caller_error(reason);
                    }
                    error.to_response()
                }
            };
            log.status = response.status().as_u16();
            log.finish();
            response
        }
    }

    #[allow(clippy::manual_async_fn)] // see `handle`: not an `async fn`, on purpose
    fn pipeline<'a>(
        self: &'a Arc<Self>,
        req: Call,
        peer: IpAddr,
        log: &'a mut AccessLog,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
        async move {
            // Malformed or oversized calls are refused before they can cost anyone quota.
            self.check_request(&req)?;

            // Route: which of Zoho's per-endpoint quotas this call spends.
            let Some(route_id) = self.table.find(req.method(), req.uri().path()) else {
                log.decision = Some(Decision::Unmatched);
                self.unmatched.count(Decision::Unmatched);
                return match self.config.unmatched {
                    Unmatched::Reject => Err(ProxyError::Unmatched),
                    Unmatched::Forward => self.forward(req, None, log).await,
                };
            };
            let route = &self.routes[route_id.0 as usize];
            log.set_route(&route.name);

            // User: whose quota. A call nobody can be charged for is refused, never forwarded.
            let user = match self.identify(&req, peer).await {
                Ok(user) => user,
                Err(IdentifyFailure::Refused(error)) => {
                    return Err(self.refuse(route, log, Decision::Invalid, error))
                }
                Err(IdentifyFailure::Limited(refusal)) => {
                    return Err(self.refusal(route, log, refusal))
                }
            };
            log.set_user(user);
            let key = Key {
                route: route.id,
                user,
            };

            // Validate: a call Zoho would refuse as malformed is answered here, before the
            // limiter, so it spends no quota (after the user: a call without credential keeps
            // its 401). Query rules decide at once; reading a body is boxed, like every step
            // only some routes take.
            let checked = match route.validate {
                None => Checked::Valid(req),
                Some(rules) if !rules.reads_body() => {
                    let verdict = rules.check(req.uri().query(), None);
                    Checked::new(req, verdict)
                }
                Some(rules) => Box::pin(self.validate_body(rules, route, req, log)).await?,
            };
            let req = match checked {
                Checked::Valid(req) => req,
                Checked::Invalid(req, invalid) => {
                    return Box::pin(self.invalid(req, route, key, invalid, log)).await
                }
            };

            // Shadow routes: decide and count as if enforced, but forward at once.
            if route.mode == RouteMode::Shadow {
                // Boxed: a rarely used path need not size every call's future.
                return Box::pin(self.shadow(req, route, key, log)).await;
            }

            // Limit: forward now, wait for a reserved slot, or refuse at once.
            let acquired = self.limiter.acquire(&route.policy, key, route.queue).await;
            let acquired = acquired.map_err(|e| self.store_failed(route, log, e))?;
            let (req, view, decision) = match acquired {
                Acquire::Now { view, .. } => (req, view, Decision::Forwarded),
                Acquire::Reserved { reservation, view } => {
                    let guard = QueueGuard::new(&self.limiter, route, reservation);
                    let req = self.wait_for_slot(route, guard, req, log).await?;
                    (req, view, Decision::Delayed)
                }
                Acquire::Refused(refusal) => return Err(self.refusal(route, log, refusal)),
            };
            log.decision = Some(decision);
            route.metrics.count(decision);

            // Forward, then learn: a throttle signal locks this (route, user) locally.
            let mut response = self.forward(req, Some((route, key)), log).await?;
            add_ratelimit_headers(&mut response, route, view);
            Ok(response)
        }
    }

    /// A shadow route: the decision enforcing would take is computed, logged and counted (the
    /// `decision` label), and the call is forwarded at once whatever it is. A slot that would have
    /// been waited for is given back at once, so the limiter keeps modelling enforcement.
    async fn shadow(
        self: &Arc<Self>,
        req: Call,
        route: &RouteRuntime,
        key: Key,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        log.shadow = true;
        let acquired = self.limiter.acquire(&route.policy, key, route.queue).await;
        let (decision, view) = match acquired {
            Ok(Acquire::Now { view, .. }) => (Decision::Forwarded, Some(view)),
            Ok(Acquire::Reserved { reservation, .. }) => {
                let _ = self.limiter.cancel(&route.policy, &reservation).await;
                (Decision::Delayed, None)
            }
            Ok(Acquire::Refused(refusal)) => (refusal_decision(refusal.reason), None),
            // The store failed: enforcing would have refused; shadow forwards anyway.
            Err(_) => (Decision::Rejected, None),
        };
        log.decision = Some(decision);
        route.metrics.count(decision);
        let mut response = self.forward(req, Some((route, key)), log).await?;
        if let Some(view) = view {
            add_ratelimit_headers(&mut response, route, view);
        }
        Ok(response)
    }

    /// Checks a call against a rule set that reads the body: the body is read first (bounded by
    /// `http.max_body_bytes`, trailers kept) and then the very same bytes are forwarded. Bodies
    /// on every other route stay streamed.
    async fn validate_body(
        &self,
        rules: &RuleSet,
        route: &RouteRuntime,
        mut req: Call,
        log: &mut AccessLog,
    ) -> Result<Checked, ProxyError> {
        let body = std::mem::replace(req.body_mut(), crate::body::empty());
        let (bytes, trailers) = match read_whole(body, self.config.http.max_body_bytes).await {
            Ok(read) => read,
            Err(ReadError::TooLarge(limit)) => {
                let error = ProxyError::BodyTooLarge { limit };
                return Err(self.refuse(route, log, Decision::Invalid, error));
            }
            Err(ReadError::Broken) => {
                let error = ProxyError::BadRequest("The request body ended early.");
                return Err(self.refuse(route, log, Decision::Cancelled, error));
            }
            Err(ReadError::Stalled(after)) => {
                let error = ProxyError::BodyTimeout { after };
                return Err(self.refuse(route, log, Decision::Cancelled, error));
            }
        };
        let verdict = rules.check(req.uri().query(), Some(&bytes));
        *req.body_mut() = Prefixed::<ProxyBody>::new(bytes, trailers, None).boxed();
        Ok(Checked::new(req, verdict))
    }

    /// A call that breaks its route's rules: answered with Zoho's own error, counted as
    /// `invalid`, never forwarded, no quota spent. A shadow route only logs and counts it and
    /// forwards it as if unchecked; its quota is left as enforcing would leave it.
    async fn invalid(
        self: &Arc<Self>,
        req: Call,
        route: &RouteRuntime,
        key: Key,
        invalid: Invalid,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        tracing::debug!(route = %route.name, code = invalid.code, why = %invalid.message,
            "call breaks a documented limit of its endpoint");
        let error = self.refuse(route, log, Decision::Invalid, ProxyError::Invalid(invalid));
        if route.mode == RouteMode::Enforce {
            return Err(error);
        }
        log.shadow = true;
        self.forward(req, Some((route, key)), log).await
    }

    /// The upstream client (kept across reloads that do not change it).
    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Sleeps until a queued call's slot, unless a shutdown begins whose deadline comes first:
    /// then the call is refused at once rather than left to be cut off.
    async fn sleep_until_slot(&self, wake: Instant) -> Result<(), ProxyError> {
        let mut drain = self.drain.subscribe();
        // One timer for the whole wait (this state is held by every queued call).
        let sleep = tokio::time::sleep_until(wake);
        tokio::pin!(sleep);
        loop {
            if let Some(deadline) = *drain.borrow_and_update() {
                if wake > deadline {
                    return Err(ProxyError::ShuttingDown);
                }
                break;
            }
            tokio::select! {
                () = &mut sleep => return Ok(()),
                changed = drain.changed() => if changed.is_err() {
                    break;
                },
            }
        }
        sleep.await;
        Ok(())
    }

    /// The user key of a call: a credential hash, a trusted header, or a resolved user id.
    async fn identify(
        &self,
        req: &Request<ProxyBody>,
        peer: IpAddr,
    ) -> Result<UserKey, IdentifyFailure> {
        if let IdentityConfig::Header { trusted, .. } = &self.config.identity {
            // Anyone can set a header: believe it only from the networks the operator trusts.
            let ip = peer.to_canonical();
            if !trusted.iter().any(|net| net.contains(&ip)) {
                return Err(IdentifyFailure::Refused(ProxyError::UntrustedSource));
            }
        }
        let key = identify(&self.config.identity, req.headers(), req.uri().query()).map_err(
            |IdentityError::MissingCredential| {
                IdentifyFailure::Refused(ProxyError::MissingCredential {
                    detail: "send Authorization: Zoho-oauthtoken <token> or the zapikey parameter",
                })
            },
        )?;
        let Some(resolver) = &self.resolver else {
            return Ok(key);
        };
        // Boxed: moka's lookup state is ~5 KB, which every call's future (and so every queued
        // call) would otherwise carry, in token and header mode too.
        Box::pin(resolver.resolve(key, req.headers()))
            .await
            .map_err(|e| match e {
                ResolveError::Refused {
                    status,
                    content_type,
                    body,
                } => IdentifyFailure::Refused(ProxyError::IdentityRefused {
                    status,
                    content_type,
                    body,
                }),
                ResolveError::Limited(refusal) => IdentifyFailure::Limited(refusal),
                ResolveError::Unavailable => {
                    IdentifyFailure::Refused(ProxyError::IdentityUnavailable)
                }
            })
    }

    /// Rejects what cliqgate must not forward whatever the route: tunnels, non-path targets and
    /// heads or bodies over the configured limits.
    fn check_request(&self, req: &Request<ProxyBody>) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported: cliqgate is not a forward proxy.",
            ));
        }
        if !req.uri().path().starts_with('/') {
            return Err(ProxyError::BadRequest("The request target must be a path."));
        }
        let limits = &self.config.http;
        if fields_size(req.headers()) > limits.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                limit: limits.max_header_bytes,
            });
        }
        // The framing the server read (`Content-Length: 9, 9` is one length of 9) or, for a
        // body without one, the field as sent.
        let declared = http_body::Body::size_hint(req.body()).exact().or_else(|| {
            req.headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        });
        if declared.is_some_and(|n| n > limits.max_body_bytes) {
            return Err(ProxyError::BodyTooLarge {
                limit: limits.max_body_bytes,
            });
        }
        Ok(())
    }

    /// Waits for a reserved slot. If the caller goes away meanwhile, the future is dropped (the
    /// server drops it with the connection) or the body read fails: either way the guard gives the slot
    /// back and the call is never sent.
    #[allow(clippy::manual_async_fn)] // see `handle`: not an `async fn`, on purpose
    fn wait_for_slot<'a>(
        &'a self,
        route: &'a RouteRuntime,
        guard: QueueGuard<'a>,
        mut req: Call,
        log: &'a mut AccessLog,
    ) -> impl Future<Output = Result<Call, ProxyError>> + 'a {
        async move {
            // Taken out while it is watched; what was read goes back in front of the rest.
            let mut body = std::mem::replace(req.body_mut(), crate::body::empty());
            let queued_at = Instant::now();
            let wake = self.limiter.clock().instant(guard.slot());
            // Reading the body while waiting is how a caller that hangs up mid-request is noticed
            // (the server notices one that hangs up after its request is complete). At most
            // QUEUE_BODY_PEEK bytes are held; a larger body waits in the socket and streams later.
            let mut held = BytesMut::new();
            // Boxed: rare, and this state is held by every queued call.
            let mut trailers: Option<Box<http::HeaderMap>> = None;
            let mut ended = http_body::Body::is_end_stream(&body);
            while !ended && held.len() < QUEUE_BODY_PEEK {
                tokio::select! {
                    slept = self.sleep_until_slot(wake) => match slept {
                        Ok(()) => break,
                        Err(e) => return Err(guard.refused(route, log, e)),
                    },
                    frame = body.frame() => match frame {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => held.extend_from_slice(&data),
                            Err(frame) => {
                                trailers = frame.into_trailers().ok().map(Box::new);
                                ended = true;
                            }
                        },
                        Some(Err(e)) => return Err(guard.cancelled(log, &*e)),
                        None => ended = true,
                    },
                }
            }
            if let Err(e) = self.sleep_until_slot(wake).await {
                return Err(guard.refused(route, log, e));
            }
            let waited = queued_at.elapsed();
            log.set_queue_wait(waited);
            route.metrics.queue_wait.observe(waited.as_secs_f64());
            match guard.redeem().await {
                Ok(Ok(())) => {}
                Ok(Err(refusal)) => return Err(self.refusal(route, log, refusal)),
                Err(e) => return Err(self.store_failed(route, log, e)),
            }
            let rest = (!ended).then_some(body);
            *req.body_mut() = Prefixed::new(held.freeze(), trailers.map(|t| *t), rest).boxed();
            Ok(req)
        }
    }

    /// Sends the call to Zoho and passes the answer back, streamed. A limited call (`limited`:
    /// its route and key) learns from the answer: a throttle signal locks the user out of the
    /// route here, also when the caller left before the answer came ([`InFlight`]).
    fn forward<'a>(
        self: &'a Arc<Self>,
        req: Call,
        limited: Option<(&'a RouteRuntime, Key)>,
        log: &'a mut AccessLog,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
        // The upstream request is built before the future, which then holds only the send.
        let mut in_flight = InFlight {
            sending: Some(self.upstream_send(req, limited.is_some())),
            reading: None,
            limited: limited.map(|(route, key)| (self, route.index, key)),
            started: Instant::now(),
        };
        async move {
            let metrics = limited.map_or(&self.unmatched, |(route, _)| &route.metrics);
            let response = in_flight.response().await;
            let upstream_time = in_flight.started.elapsed();
            log.set_upstream(upstream_time);
            metrics
                .upstream_duration
                .observe(upstream_time.as_secs_f64());
            let response = response?;
            metrics.response(response.status().as_u16());
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            let Some((route, key)) = limited else {
                // Unlimited calls cannot be locked: nothing to learn.
                return Ok(Response::from_parts(
                    parts,
                    body.map_err(Into::into).boxed(),
                ));
            };
            let (body, throttled) = match self.signal(&parts, body) {
                Signal::Known(body, throttled) => (body, throttled),
                Signal::ToRead(reading, retry_after) => {
                    // Held by `in_flight` while it is read: a caller that leaves now does not
                    // stop the reading (nor the learning).
                    in_flight.reading = Some((reading, retry_after));
                    prefix_signal(in_flight.read().await?, retry_after)
                }
            };
            if let Some(retry_after) = throttled {
                self.learn_lock(route, key, retry_after).await;
            }
            Ok(Response::from_parts(parts, body))
        }
    }

    /// Whether Zoho's answer to a limited call signals a throttle, and its Retry-After (if
    /// any): known from the status, or to be read from the start of the body for error answers
    /// that may carry the signal there. The body is passed on whole either way; success bodies
    /// are never read. The Retry-After is looked up only for throttle candidates.
    fn signal(&self, parts: &http::response::Parts, body: UpstreamBody) -> Signal {
        match throttle::classify_status(parts.status) {
            StatusSignal::Inspect => {
                let encoding = parts.headers.get(header::CONTENT_ENCODING).cloned();
                Signal::ToRead(
                    self.reading(body, encoding),
                    throttle::retry_after(&parts.headers),
                )
            }
            StatusSignal::Throttled => Signal::Known(
                body.map_err(Into::into).boxed(),
                Some(throttle::retry_after(&parts.headers)),
            ),
            StatusSignal::NotThrottled => Signal::Known(body.map_err(Into::into).boxed(), None),
        }
    }

    /// Reads the start of an error answer's body (bounded by the response timeout), where a
    /// throttle code would be, and looks for it (decoding the answer's `Content-Encoding`).
    /// Boxed: it is what a call holds while the caller may leave.
    fn reading(&self, body: UpstreamBody, encoding: Option<HeaderValue>) -> Reading {
        let timeout = self.config.timeouts.response;
        Box::pin(async move {
            let prefix =
                tokio::time::timeout(timeout, read_prefix(body, throttle::MAX_ERROR_PREFIX))
                    .await
                    .map_err(|_| ProxyError::UpstreamTimeout(timeout))?
                    .map_err(|_| ProxyError::UpstreamUnavailable)?;
            let complete = prefix.2.is_none();
            let throttled =
                throttle::encoded_body_signals_throttle(encoding.as_ref(), &prefix.0, complete);
            Ok(ErrorStart { prefix, throttled })
        })
    }

    /// A limited call whose caller left after its request started out: Zoho may have counted
    /// it, and its answer may lock the user out. The answer is read (within the response
    /// timeout) and a throttle signal in it learned, so the user's next call is refused here
    /// rather than sent into the lock. Nobody is left to take the answer.
    async fn finish_abandoned(
        self: Arc<Self>,
        route: usize,
        key: Key,
        started: Instant,
        rest: impl Future<Output = Result<Response<UpstreamBody>, ProxyError>>,
    ) {
        let Some(route) = self.routes.get(route) else {
            return;
        };
        let response = rest.await;
        let upstream_time = started.elapsed().as_secs_f64();
        route.metrics.upstream_duration.observe(upstream_time);
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(route = %route.name, user = %key.user.short(), %error,
                    "a call whose caller had left got no answer from Zoho");
                return;
            }
        };
        route.metrics.response(response.status().as_u16());
        let (parts, body) = response.into_parts();
        tracing::debug!(route = %route.name, user = %key.user.short(), status = parts.status.as_u16(),
            "Zoho answered a call whose caller had left");
        match self.signal(&parts, body) {
            Signal::Known(_, Some(retry_after)) => self.learn_lock(route, key, retry_after).await,
            Signal::Known(_, None) => {}
            Signal::ToRead(reading, retry_after) => {
                self.learn_from_prefix(route, key, reading, retry_after)
                    .await;
            }
        }
    }

    /// As [`Proxy::finish_abandoned`], for a caller that left while the start of an error
    /// answer's body was read for a throttle code.
    async fn finish_abandoned_read(
        self: Arc<Self>,
        route: usize,
        key: Key,
        reading: Reading,
        retry_after: Option<Duration>,
    ) {
        if let Some(route) = self.routes.get(route) {
            self.learn_from_prefix(route, key, reading, retry_after)
                .await;
        }
    }

    /// Reads the start of an error answer nobody waits for and learns a throttle code in it.
    async fn learn_from_prefix(
        &self,
        route: &RouteRuntime,
        key: Key,
        reading: Reading,
        retry_after: Option<Duration>,
    ) {
        if let Ok(prefix) = reading.await {
            if let (_, Some(retry_after)) = prefix_signal(prefix, retry_after) {
                self.learn_lock(route, key, retry_after).await;
            }
        }
    }

    /// Starts the call to Zoho: the configured upstream's URI, hop-by-hop fields removed, the
    /// body bounded while it streams. A limited call asks only for answers cliqgate can read
    /// a throttle code in.
    fn upstream_send(&self, req: Call, limited: bool) -> Sending<'_> {
        let (mut parts, body) = req.into_parts();
        prepare_upstream_request(&mut parts.headers, limited);
        let body = Limited::new(body, self.config.http.max_body_bytes).boxed();
        self.upstream.send(parts, body)
    }

    /// Zoho locked this user out of this route: stop sending for the lock period (or Zoho's
    /// Retry-After, if longer). The throttle response itself goes to the caller as it came.
    ///
    /// The response waits until the store has the lock, so the caller's next call (to any
    /// replica) is refused; the store write runs as its own task, so it completes even if this
    /// caller goes away meanwhile.
    async fn learn_lock(&self, route: &RouteRuntime, key: Key, retry_after: Option<Duration>) {
        route.metrics.throttled.inc();
        let lock = Duration::from_nanos(route.policy.lock).max(retry_after.unwrap_or_default());
        let until = self
            .limiter
            .clock()
            .now()
            .saturating_add(crate::limit::nanos(lock));
        // If the store fails here the throttle response still reaches the caller, and Zoho's own
        // lock answers the next call (counted as an error).
        let limiter = self.limiter.clone();
        let policy = route.policy;
        let metrics = self.metrics.clone();
        let recording = self
            .drain
            .spawn(&tokio::runtime::Handle::current(), async move {
                if let Err(e) = limiter
                    .lock(&policy, key, until, LockReason::UpstreamThrottle)
                    .await
                {
                    metrics.store_error("lock");
                    tracing::error!(error = %e, "could not record a lock learned from Zoho");
                }
            });
        tracing::warn!(route = %route.name, user = %key.user.short(), lock_secs = lock.as_secs(),
            "Zoho signalled a throttle; user locked out of this route");
        // A join error means the runtime is shutting down; the answer goes out regardless.
        let _ = recording.await;
    }

    fn refusal(&self, route: &RouteRuntime, log: &mut AccessLog, refusal: Refusal) -> ProxyError {
        let why = match refusal.reason {
            RefusalReason::Limited => "This user's rate limit for this endpoint is used up.",
            RefusalReason::QueueFull => "Too many calls are already waiting for this endpoint.",
            RefusalReason::TooFar => {
                "The next free slot for this user is further away than max_wait."
            }
            RefusalReason::Locked => {
                "Zoho locked this user out of this endpoint; wait for the lock to end."
            }
        };
        let decision = refusal_decision(refusal.reason);
        let now = self.limiter.clock().now();
        let retry_after = Duration::from_nanos(refusal.retry_at.saturating_sub(now));
        self.refuse(
            route,
            log,
            decision,
            ProxyError::RateLimited { retry_after, why },
        )
    }

    /// The store could not decide: refuse (the store already counted the error), never guess.
    fn store_failed(
        &self,
        route: &RouteRuntime,
        log: &mut AccessLog,
        error: StoreError,
    ) -> ProxyError {
        tracing::warn!(route = %route.name, error = %error, "limiter store failed; call refused");
        self.refuse(route, log, Decision::Rejected, ProxyError::StoreUnavailable)
    }

    fn refuse(
        &self,
        route: &RouteRuntime,
        log: &mut AccessLog,
        decision: Decision,
        error: ProxyError,
    ) -> ProxyError {
        route.metrics.count(decision);
        log.decision = Some(decision);
        error
    }
}

/// Answers for queued calls are written before the drain deadline by at least this much.
const DRAIN_ANSWER_ROOM: Duration = Duration::from_secs(1);

/// The shutdown signal queued calls watch: `Some(deadline)` once a drain has begun.
pub struct Drain {
    deadline: tokio::sync::watch::Sender<Option<Instant>>,
    /// Work that outlives its call and must finish before the process stops: calls finished
    /// for callers that left (Zoho's answer may lock the user) and learned locks being stored.
    tasks: tokio_util::task::TaskTracker,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            deadline: tokio::sync::watch::Sender::new(None),
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }
}

impl Drain {
    /// Starts draining: queued calls whose slot comes after `timeout` (less the room their
    /// answers need) are refused with 503 now; the others are sent when their slot comes.
    pub fn begin(&self, timeout: Duration) {
        let room = DRAIN_ANSWER_ROOM.min(timeout / 10);
        self.deadline
            .send_replace(Some(Instant::now() + timeout.saturating_sub(room)));
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<Instant>> {
        self.deadline.subscribe()
    }

    /// Runs `work` on the current runtime as work the shutdown waits for ([`Drain::settled`]).
    fn spawn<F>(&self, runtime: &tokio::runtime::Handle, work: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        runtime.spawn(self.tasks.track_future(work))
    }

    /// Resolves once the work started with `Drain::spawn` has finished, including work started
    /// after this is first awaited (a call in flight whose caller leaves during the drain).
    pub async fn settled(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The decision label of a refusal.
fn refusal_decision(reason: RefusalReason) -> Decision {
    match reason {
        RefusalReason::Limited | RefusalReason::QueueFull => Decision::Rejected,
        RefusalReason::TooFar => Decision::QueueTimeout,
        RefusalReason::Locked => Decision::Locked,
    }
}

/// A call after validation, its body ready to forward (streamed, or the bytes that were read).
enum Checked {
    Valid(Call),
    /// Breaks a rule: refused, or (shadow routes) counted and forwarded anyway.
    Invalid(Call, Invalid),
}

impl Checked {
    fn new(req: Call, verdict: Result<(), Invalid>) -> Self {
        match verdict {
            Ok(()) => Checked::Valid(req),
            Err(invalid) => Checked::Invalid(req, invalid),
        }
    }
}

/// Why a call has no user key.
enum IdentifyFailure {
    /// Answer the caller with this (counted as `invalid`).
    Refused(ProxyError),
    /// The identity lookup itself is over the identity endpoint's quota.
    Limited(Refusal),
}

/// Holds a queue place; dropping it before `redeem` gives the slot back (the caller went away).
struct QueueGuard<'a> {
    limiter: &'a Arc<Store>,
    route: &'a RouteRuntime,
    reservation: Option<Reservation>,
}

impl<'a> QueueGuard<'a> {
    fn new(limiter: &'a Arc<Store>, route: &'a RouteRuntime, reservation: Reservation) -> Self {
        route.metrics.queue_depth.inc();
        QueueGuard {
            limiter,
            route,
            reservation: Some(reservation),
        }
    }

    /// The reserved slot.
    fn slot(&self) -> Nanos {
        self.reservation.as_ref().map_or(0, |r| r.slot)
    }

    async fn redeem(mut self) -> Result<Result<(), Refusal>, StoreError> {
        self.route.metrics.queue_depth.dec();
        match self.reservation.take() {
            Some(r) => self.limiter.redeem(&self.route.policy, &r).await,
            None => Ok(Ok(())),
        }
    }

    /// The call will not be sent (shutdown): give the slot back, count the refusal.
    fn refused(
        mut self,
        route: &RouteRuntime,
        log: &mut AccessLog,
        error: ProxyError,
    ) -> ProxyError {
        if let Some(reservation) = self.reservation.take() {
            self.route.metrics.queue_depth.dec();
            self.limiter.cancel_detached(self.route.policy, reservation);
        }
        route.metrics.count(Decision::Rejected);
        log.decision = Some(Decision::Rejected);
        error
    }

    /// The body failed while queued (`body_error`): the slot goes back; a stalled body is
    /// answered 408, one that broke off 400.
    fn cancelled(
        self,
        log: &mut AccessLog,
        body_error: &(dyn std::error::Error + 'static),
    ) -> ProxyError {
        log.decision = Some(Decision::Cancelled);
        drop(self);
        crate::body::caller_fault(body_error)
            .unwrap_or(ProxyError::BadRequest("The request body ended early."))
    }
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.route.metrics.queue_depth.dec();
            self.route.metrics.count(Decision::Cancelled);
            // The call is never sent; the access log records it as cancelled.
            self.limiter.cancel_detached(self.route.policy, reservation);
        }
    }
}

// Names made once, not parsed from strings on every call.
const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

/// IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers): the route's quota and what is
/// left of it for this user, as of the decision.
fn add_ratelimit_headers(
    response: &mut Response<ProxyBody>,
    route: &RouteRuntime,
    view: QuotaView,
) {
    let reset_secs = Duration::from_nanos(view.reset_in).as_secs_f64().ceil() as u64;
    // Built once per call into one buffer of exactly its length (this runs on every forwarded
    // call; `concat` sizes it from the parts): `Bytes` takes over a full `Vec` as it is, where a
    // partly used one costs a second allocation.
    let (mut remaining, mut reset) = (itoa::Buffer::new(), itoa::Buffer::new());
    let value = [
        &route.ratelimit_prefix[..],
        remaining.format(view.remaining).as_bytes(),
        b";t=",
        reset.format(reset_secs).as_bytes(),
    ]
    .concat();
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_POLICY, route.policy_header.clone());
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
        headers.insert(RATELIMIT, value);
    }
}

/// One access-log line per call, written once whatever the outcome. Never the query (it may
/// carry `zapikey`) and never a credential: the user appears as a short hash.
///
/// Every call in flight (queued ones included) holds one of these, so it is small: what only a
/// written line needs is in `text`, which is `None` when the access log is filtered out
/// (`log.level` above `info`; decided once per call), and then nothing is copied or formatted.
struct AccessLog {
    text: Option<Box<LogText>>,
    decision: Option<Decision>,
    status: u16,
    /// A shadow route: `decision` is what enforcing would have done; the call was forwarded.
    shadow: bool,
    done: bool,
}

/// What only a written access-log line needs.
struct LogText {
    started: Instant,
    method: Method,
    path: String,
    route_name: Option<String>,
    user: Option<UserKey>,
    queue_wait: Option<Duration>,
    /// Time to the upstream's response head.
    upstream: Option<Duration>,
}

impl AccessLog {
    fn new<B>(req: &Request<B>) -> Self {
        let enabled = tracing::enabled!(target: "cliqgate::access", tracing::Level::INFO);
        AccessLog {
            text: enabled.then(|| {
                Box::new(LogText {
                    started: Instant::now(),
                    method: req.method().clone(),
                    path: req.uri().path().to_string(),
                    route_name: None,
                    user: None,
                    queue_wait: None,
                    upstream: None,
                })
            }),
            decision: None,
            status: 0,
            shadow: false,
            done: false,
        }
    }

    fn set_route(&mut self, name: &str) {
        if let Some(text) = &mut self.text {
            text.route_name = Some(name.to_string());
        }
    }

    fn set_user(&mut self, user: UserKey) {
        if let Some(text) = &mut self.text {
            text.user = Some(user);
        }
    }

    fn set_queue_wait(&mut self, waited: Duration) {
        if let Some(text) = &mut self.text {
            text.queue_wait = Some(waited);
        }
    }

    fn set_upstream(&mut self, took: Duration) {
        if let Some(text) = &mut self.text {
            text.upstream = Some(took);
        }
    }

    fn finish(&mut self) {
        self.done = true;
        let Some(text) = &self.text else {
            return;
        };
        let route = text.route_name.as_deref().unwrap_or(UNMATCHED_ROUTE);
        let user = text.user.map(|u| u.short()).unwrap_or_default();
        let decision = self.decision.map_or("error", Decision::as_str);
        let queue_wait_ms = text.queue_wait.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let upstream_ms = text.upstream.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        tracing::info!(target: "cliqgate::access", method = %text.method, path = %text.path, route,
            user, decision, shadow = self.shadow, status = self.status, queue_wait_ms, upstream_ms,
            total_ms = text.started.elapsed().as_secs_f64() * 1e3, "call");
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if !self.done {
            // The caller went away before an answer (the server dropped the call).
            self.status = 499;
            if self.decision.is_none() || self.decision == Some(Decision::Delayed) {
                self.decision = Some(Decision::Cancelled);
            }
            self.finish();
        }
    }
}

/// The start of an error answer's body (bounded), its trailers if it ended there, and the rest.
type Prefix = (Bytes, Option<http::HeaderMap>, Option<UpstreamBody>);
/// The start of an error answer, read, and whether it holds a throttle code.
struct ErrorStart {
    prefix: Prefix,
    throttled: bool,
}

/// The reading of an [`ErrorStart`], boxed so that a call whose caller leaves can hand it over.
type Reading = Pin<Box<dyn Future<Output = Result<ErrorStart, ProxyError>> + Send>>;

/// The answer's body and, if its start holds a throttle code, the Retry-After to lock for.
fn prefix_signal(
    read: ErrorStart,
    retry_after: Option<Duration>,
) -> (ProxyBody, Option<Option<Duration>>) {
    let (prefix, trailers, rest) = read.prefix;
    let body = Prefixed::new(prefix, trailers, rest).boxed();
    (body, read.throttled.then_some(retry_after))
}

/// What an answer to a limited call says about a throttle ([`Proxy::signal`]).
enum Signal {
    /// Known from the status: the body, untouched, and the Retry-After to lock for if throttled.
    Known(ProxyBody, Option<Option<Duration>>),
    /// To be read from the start of the body, and the answer's Retry-After.
    ToRead(Reading, Option<Duration>),
}

/// A call on its way to Zoho. If its future is dropped before the answer (the caller hung up,
/// or reset its HTTP/2 stream) after the request started out, a limited call's exchange is
/// finished on a task of its own ([`Proxy::finish_abandoned`]): Zoho counts a call it received
/// whether or not anyone waits for the answer, and a lock it imposes must be learned all the
/// same. A call that had not started out is simply dropped: Zoho never saw it.
struct InFlight<'a> {
    /// `None` once the answer's head is in.
    sending: Option<Sending<'a>>,
    /// An error answer's body being read for a throttle code, and the answer's Retry-After.
    reading: Option<(Reading, Option<Duration>)>,
    /// A limited call: the proxy, its route's index and its key.
    limited: Option<(&'a Arc<Proxy>, usize, Key)>,
    /// When the call was sent (the upstream duration is measured from here).
    started: Instant,
}

impl InFlight<'_> {
    async fn response(&mut self) -> Result<Response<UpstreamBody>, ProxyError> {
        let Some(sending) = self.sending.as_mut() else {
            // Asked twice: the first answer was taken already.
            return Err(ProxyError::UpstreamUnavailable);
        };
        let response = sending.response().await;
        self.sending = None;
        response
    }

    async fn read(&mut self) -> Result<ErrorStart, ProxyError> {
        let Some((reading, _)) = self.reading.as_mut() else {
            return Err(ProxyError::UpstreamUnavailable);
        };
        let read = reading.await;
        self.reading = None;
        read
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let Some((proxy, route, key)) = self.limited else {
            return;
        };
        let started = self.sending.take().and_then(Sending::into_started);
        let reading = self.reading.take();
        if started.is_none() && reading.is_none() {
            return; // answered, or never sent: nothing to finish
        }
        // A runtime that is shutting down drops the task: nothing can be learned then anyway.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some(rest) = started {
            let finishing = proxy
                .clone()
                .finish_abandoned(route, key, self.started, rest);
            proxy.drain.spawn(&runtime, finishing);
        } else if let Some((reading, retry_after)) = reading {
            let finishing = proxy
                .clone()
                .finish_abandoned_read(route, key, reading, retry_after);
            proxy.drain.spawn(&runtime, finishing);
        }
    }
}
