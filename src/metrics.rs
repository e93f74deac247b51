//! Metric families (SPEC "Metrics"): names are constants here and nowhere else.
//!
//! Labels are bounded: route name, decision, HTTP status, store operation. Never a user, a token
//! or a path. Per-route handles are created once, so the hot path only bumps atomics.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

// prometheus-client appends `_total` to counters; these are the exposed names without it.
pub const REQUESTS: &str = "cliqgate_requests";
pub const UPSTREAM_RESPONSES: &str = "cliqgate_upstream_responses";
pub const UPSTREAM_THROTTLED: &str = "cliqgate_upstream_throttled";
pub const UPSTREAM_DURATION: &str = "cliqgate_upstream_duration_seconds";
pub const QUEUE_DEPTH: &str = "cliqgate_queue_depth";
pub const QUEUE_WAIT: &str = "cliqgate_queue_wait_seconds";
pub const LOCKS_ACTIVE: &str = "cliqgate_locks_active";
pub const STORE_ERRORS: &str = "cliqgate_store_errors";
pub const CONFIG_RELOADS: &str = "cliqgate_config_reloads";
pub const LIMITER_KEYS: &str = "cliqgate_limiter_keys";
pub const IDENTITY_CACHE: &str = "cliqgate_identity_cache";
pub const IDENTITY_LOOKUPS: &str = "cliqgate_identity_lookups";
pub const CALLER_ERRORS: &str = "cliqgate_caller_errors";
pub const WORKER_CONNECTIONS: &str = "cliqgate_worker_connections";

/// The route label of calls that match no route.
pub const UNMATCHED_ROUTE: &str = "(none)";

/// What happened to a call (the `decision` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Forwarded,
    Delayed,
    Rejected,
    Locked,
    QueueTimeout,
    Cancelled,
    Unmatched,
    Invalid,
}

impl Decision {
    pub const ALL: [Decision; 8] = [
        Decision::Forwarded,
        Decision::Delayed,
        Decision::Rejected,
        Decision::Locked,
        Decision::QueueTimeout,
        Decision::Cancelled,
        Decision::Unmatched,
        Decision::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Forwarded => "forwarded",
            Decision::Delayed => "delayed",
            Decision::Rejected => "rejected",
            Decision::Locked => "locked",
            Decision::QueueTimeout => "queue_timeout",
            Decision::Cancelled => "cancelled",
            Decision::Unmatched => "unmatched",
            Decision::Invalid => "invalid",
        }
    }
}

/// Why cliqgate ended a call or a connection on account of what its caller sent, or did not
/// send in time (the `reason` label of `cliqgate_caller_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallerError {
    /// A request head that cannot be read (RFC 9112), or a missing, repeated or invalid `Host`:
    /// 400, and the connection closes.
    BadRequest,
    /// A request head over `http.max_header_bytes`: 431, and the connection closes.
    HeadersTooLarge,
    /// No whole request head within `timeouts.client_header` (slowloris): closed unanswered.
    HeadTimeout,
    /// A request body that paused longer than `timeouts.client_body`: 408.
    BodyTimeout,
}

impl CallerError {
    pub const ALL: [CallerError; 4] = [
        CallerError::BadRequest,
        CallerError::HeadersTooLarge,
        CallerError::HeadTimeout,
        CallerError::BodyTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CallerError::BadRequest => "bad_request",
            CallerError::HeadersTooLarge => "headers_too_large",
            CallerError::HeadTimeout => "head_timeout",
            CallerError::BodyTimeout => "body_timeout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteDecision {
    route: String,
    decision: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteCode {
    route: String,
    code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WorkerLabel {
    worker: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

fn upstream_histogram() -> Histogram {
    // 1 ms .. ~33 s: Zoho answers in tens to hundreds of ms; timeouts sit at tens of seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn queue_histogram() -> Histogram {
    // 1 ms .. ~65 s: a queued call waits at most `max_wait` (default 30 s).
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Handles for one route, created once at start.
#[derive(Clone)]
pub struct RouteMetrics {
    name: String,
    decisions: [Counter; 8],
    pub throttled: Counter,
    pub upstream_duration: Histogram,
    pub queue_depth: Gauge,
    pub queue_wait: Histogram,
    locks_active: Gauge,
    responses: Family<RouteCode, Counter>,
    /// Counters of the usual statuses, looked up once: the family lookup clones and hashes a
    /// label on every call. Created on first use, so only statuses Zoho sent are exposed.
    common_responses: Arc<[OnceLock<Counter>; COMMON_CODES.len()]>,
}

/// The store operations `cliqgate_store_errors_total{op}` counts (the Redis store's scripts,
/// its connection probe, the epoch it is told, and resolve mode's shared answers, which never
/// hand decisions over).
pub const STORE_OPS: [&str; 8] = [
    "acquire",
    "redeem",
    "cancel",
    "lock",
    "merge",
    "probe",
    "epoch",
    "identity_answers",
];

/// Statuses most upstream answers have.
const COMMON_CODES: [u16; 6] = [200, 201, 204, 400, 404, 429];

impl RouteMetrics {
    pub fn count(&self, decision: Decision) {
        let index = Decision::ALL
            .iter()
            .position(|d| *d == decision)
            .unwrap_or(0);
        self.decisions[index].inc();
    }

    pub fn response(&self, status: u16) {
        if let Some(index) = COMMON_CODES.iter().position(|&code| code == status) {
            self.common_responses[index]
                .get_or_init(|| self.response_counter(status))
                .inc();
            return;
        }
        self.response_counter(status).inc();
    }

    fn response_counter(&self, status: u16) -> Counter {
        self.responses.get_or_create_owned(&RouteCode {
            route: self.name.clone(),
            code: status,
        })
    }

    pub fn set_locks_active(&self, n: usize) {
        self.locks_active.set(n as i64);
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteDecision, Counter>,
    responses: Family<RouteCode, Counter>,
    throttled: Family<RouteLabel, Counter>,
    upstream_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    queue_depth: Family<RouteLabel, Gauge>,
    queue_wait: Family<RouteLabel, Histogram, fn() -> Histogram>,
    locks_active: Family<RouteLabel, Gauge>,
    store_errors: Family<OpLabel, Counter>,
    config_reloads: Family<ResultLabel, Counter>,
    identity_cache: Family<ResultLabel, Counter>,
    identity_lookups: Family<OutcomeLabel, Counter>,
    caller_errors: Family<ReasonLabel, Counter>,
    worker_connections: Family<WorkerLabel, Gauge>,
    pub limiter_keys: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            responses: Family::default(),
            throttled: Family::default(),
            upstream_duration: Family::new_with_constructor(
                upstream_histogram as fn() -> Histogram,
            ),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(queue_histogram as fn() -> Histogram),
            locks_active: Family::default(),
            store_errors: Family::default(),
            config_reloads: Family::default(),
            limiter_keys: Gauge::default(),
            identity_cache: Family::default(),
            identity_lookups: Family::default(),
            caller_errors: Family::default(),
            worker_connections: Family::default(),
            registry: Registry::default(),
        };
        registry.register(REQUESTS, "Calls by route and decision", m.requests.clone());
        registry.register(
            UPSTREAM_RESPONSES,
            "Upstream responses by route and HTTP status",
            m.responses.clone(),
        );
        registry.register(
            UPSTREAM_THROTTLED,
            "Throttle signals from Zoho (alert on any)",
            m.throttled.clone(),
        );
        registry.register(
            UPSTREAM_DURATION,
            "Time to the upstream's response head",
            m.upstream_duration.clone(),
        );
        registry.register(
            QUEUE_DEPTH,
            "Calls waiting for a slot",
            m.queue_depth.clone(),
        );
        registry.register(
            QUEUE_WAIT,
            "Time queued calls waited for their slot",
            m.queue_wait.clone(),
        );
        registry.register(
            LOCKS_ACTIVE,
            "Users currently locked out of a route",
            m.locks_active.clone(),
        );
        registry.register(
            STORE_ERRORS,
            "Limiter store failures by operation",
            m.store_errors.clone(),
        );
        registry.register(
            CONFIG_RELOADS,
            "Config reloads by result",
            m.config_reloads.clone(),
        );
        registry.register(
            LIMITER_KEYS,
            "(route, user) keys held by the limiter",
            m.limiter_keys.clone(),
        );
        registry.register(
            IDENTITY_CACHE,
            "Resolve mode: identity cache answers by result (hit, miss)",
            m.identity_cache.clone(),
        );
        registry.register(
            IDENTITY_LOOKUPS,
            "Resolve mode: identity endpoint lookups by outcome",
            m.identity_lookups.clone(),
        );
        registry.register(
            CALLER_ERRORS,
            "Calls and connections ended for what the caller sent or did not send in time, by reason",
            m.caller_errors.clone(),
        );
        registry.register(
            WORKER_CONNECTIONS,
            "Caller connections open on each proxy worker thread",
            m.worker_connections.clone(),
        );
        // Series that exist from the start, so `increase()` sees their first event (a series
        // born at 1 looks like no change to Prometheus).
        for result in ["success", "failure"] {
            m.config_reloads
                .get_or_create_owned(&ResultLabel { result });
        }
        for op in STORE_OPS {
            m.store_errors.get_or_create_owned(&OpLabel { op });
        }
        for reason in CallerError::ALL {
            m.caller_errors.get_or_create_owned(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        Metrics { registry, ..m }
    }

    /// Handles for a route; also makes every family show the route at zero from the start.
    pub fn route(&self, name: &str) -> RouteMetrics {
        let label = RouteLabel {
            route: name.to_string(),
        };
        let decisions = Decision::ALL.map(|d| {
            self.requests.get_or_create_owned(&RouteDecision {
                route: name.to_string(),
                decision: d.as_str(),
            })
        });
        RouteMetrics {
            name: name.to_string(),
            decisions,
            throttled: self.throttled.get_or_create_owned(&label),
            upstream_duration: self.upstream_duration.get_or_create_owned(&label),
            queue_depth: self.queue_depth.get_or_create_owned(&label),
            queue_wait: self.queue_wait.get_or_create_owned(&label),
            locks_active: self.locks_active.get_or_create_owned(&label),
            responses: self.responses.clone(),
            common_responses: Arc::new(std::array::from_fn(|_| OnceLock::new())),
        }
    }

    pub fn store_error(&self, op: &'static str) {
        debug_assert!(STORE_OPS.contains(&op), "{op} is missing from STORE_OPS");
        self.store_errors.get_or_create(&OpLabel { op }).inc();
    }

    pub fn identity_cache(&self, result: &'static str) {
        self.identity_cache
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn identity_lookup(&self, outcome: &'static str) {
        self.identity_lookups
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn caller_error(&self, reason: CallerError) {
        self.caller_errors
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The open-connection count of proxy worker `index`.
    pub fn worker_connections(&self, index: usize) -> Gauge {
        let worker = u32::try_from(index).unwrap_or(u32::MAX);
        self.worker_connections
            .get_or_create_owned(&WorkerLabel { worker })
    }

    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_are_exposed() {
        let m = Metrics::new();
        let r = m.route("chats.post_message");
        r.count(Decision::Forwarded);
        r.response(200);
        m.store_error("acquire");
        m.config_reload("success");
        let text = m.encode();
        for name in [
            "cliqgate_requests_total{route=\"chats.post_message\",decision=\"forwarded\"} 1",
            "cliqgate_requests_total{route=\"chats.post_message\",decision=\"queue_timeout\"} 0",
            "cliqgate_upstream_responses_total{route=\"chats.post_message\",code=\"200\"} 1",
            "cliqgate_upstream_throttled_total{route=\"chats.post_message\"} 0",
            "cliqgate_upstream_duration_seconds_bucket",
            "cliqgate_queue_depth{route=\"chats.post_message\"} 0",
            "cliqgate_queue_wait_seconds_count",
            "cliqgate_locks_active{route=\"chats.post_message\"} 0",
            "cliqgate_store_errors_total{op=\"acquire\"} 1",
            "cliqgate_store_errors_total{op=\"redeem\"} 0",
            "cliqgate_config_reloads_total{result=\"failure\"} 0",
            "cliqgate_config_reloads_total{result=\"success\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn upstream_statuses_are_counted_and_only_those_seen_are_exposed() {
        let m = Metrics::new();
        let r = m.route("messages.forward");
        r.response(200);
        r.response(200);
        r.clone().response(503);
        let text = m.encode();
        for line in [
            "cliqgate_upstream_responses_total{route=\"messages.forward\",code=\"200\"} 2",
            "cliqgate_upstream_responses_total{route=\"messages.forward\",code=\"503\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains("code=\"429\""),
            "a status never seen is exposed:\n{text}"
        );
    }
}
