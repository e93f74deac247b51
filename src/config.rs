//! The only module that knows YAML: the file schema is read into a validated runtime model.
//!
//! Every error in a file is reported at once, each naming its key and line, so an operator fixes a
//! config in one pass. The model types below cannot hold bad values (non-zero limits, parsed
//! durations, a checked upstream), so the rest of the proxy never re-validates.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, Method};

// ---- Defaults: every default lives here, each with a test in this module. ----

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_secs(1);
pub const DEFAULT_ON_LIMIT: OnLimit = OnLimit::Queue;
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);
pub const DEFAULT_UNMATCHED: Unmatched = Unmatched::Forward;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Zoho's own front ends refuse request heads far smaller than this.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// File shares are the largest Cliq bodies; Zoho caps a shared file well below this.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Per (route, user): more waiters than this cannot all fit inside any sane `max_wait`.
pub const DEFAULT_QUEUE_MAX_PER_USER: usize = 100;
/// All queues together: bounds the memory a caller storm can pin.
pub const DEFAULT_QUEUE_MAX_TOTAL: usize = 10_000;
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Pretty;
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// The validated configuration the proxy runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream: UpstreamTarget,
    pub upstream_ca_file: Option<PathBuf>,
    /// Added to every route's `per`: absorbs network jitter between cliqgate and Zoho.
    pub safety_margin: Duration,
    pub unmatched: Unmatched,
    pub identity: IdentityConfig,
    pub store: StoreConfig,
    pub timeouts: Timeouts,
    pub http: HttpLimits,
    pub queue: QueueLimits,
    pub log: LogConfig,
    pub routes: Vec<RouteConfig>,
}

/// The one host cliqgate ever connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `http` (tests, local stubs) or `https`.
    pub scheme: Scheme,
    /// host and optional port, exactly as configured.
    pub authority: Authority,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    Forward,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityConfig {
    /// Key = hash of the caller's credential.
    Token,
    /// Key = hash of the value of this trusted header.
    Header { name: HeaderName },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP + TLS connect to the upstream.
    pub connect: Duration,
    /// From sending the request to receiving the upstream's response head.
    pub response: Duration,
    /// How long a client may take to send a request head (slowloris guard).
    pub client_header: Duration,
    /// SIGTERM/SIGINT: how long in-flight calls may take to finish.
    pub shutdown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_per_user: usize,
    pub max_total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing-subscriber filter directive, e.g. `info` or `cliqgate=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    Queue,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Exact sliding log of the last `limit` send times (default).
    Window,
    /// governor's GCRA: `burst` at once, then smooth pacing sized to stay under `limit`.
    Gcra { burst: NonZeroU32 },
}

/// One rate-limited endpoint (or several paths sharing one quota).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub name: String,
    /// `None` matches every method.
    pub method: Option<Method>,
    /// Path templates; `{name}` matches one non-empty segment.
    pub paths: Vec<String>,
    pub limit: NonZeroU32,
    pub per: Duration,
    pub lock: Duration,
    pub on_limit: OnLimit,
    pub max_wait: Duration,
    pub algorithm: Algorithm,
    /// Line of the route in the file, for messages.
    pub line: usize,
}
