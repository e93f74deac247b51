//! The only module that knows YAML: the file schema is read into a validated runtime model.
//!
//! Every error in a file is reported at once, each naming its key and line, so an operator fixes a
//! config in one pass. The model types below cannot hold bad values (non-zero limits, parsed
//! durations, a checked upstream), so the rest of the proxy never re-validates.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, Method};
use saphyr::{LoadableYamlNode, MarkedYamlOwned, ScalarOwned, YamlDataOwned};

use crate::validate::{RuleSet, NO_VALIDATION, RULE_SETS};

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
/// nginx's `client_body_timeout` default: a pause this long mid-body is a stalled caller.
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
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
pub const DEFAULT_ROUTE_MODE: RouteMode = RouteMode::Enforce;
pub const DEFAULT_RELOAD_WATCH: bool = false;
/// `admin.token`: shorter tokens are refused; the token guards `/admin/` (limits, config).
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// The JSON Schema (draft 2020-12) of the config file, as `cliqgate schema` prints it.
pub const JSON_SCHEMA: &str = include_str!("schema.json");

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
    /// `store.state_file` (memory store only): limiter state survives a restart.
    pub state_file: Option<PathBuf>,
    pub admin: AdminConfig,
    pub reload: ReloadConfig,
    pub routes: Vec<RouteConfig>,
}

/// How often the memory store's state file is rewritten while running (and on shutdown).
pub const STATE_FILE_INTERVAL: Duration = Duration::from_secs(10);

/// The admin listener's `/admin/` paths.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    /// If set, `/admin/` requests need `Authorization: Bearer <token>`. Never printed.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = self.token.as_ref().map(|_| "REDACTED");
        f.debug_struct("AdminConfig")
            .field("token", &token)
            .finish()
    }
}

/// Config reloads: SIGHUP always; a file watch if asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadConfig {
    /// Reload when the config file changes (off by default: SIGHUP is explicit).
    pub watch: bool,
}

/// Whether a route's decisions are enforced or only observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RouteMode {
    /// Decisions are applied (default).
    #[default]
    Enforce,
    /// Decisions are computed, logged and counted, but every call is forwarded at once: a new
    /// limit can be rolled out and watched before it bites.
    Shadow,
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
    /// Key = hash of the value of this header, believed only from `trusted` source networks.
    Header {
        name: HeaderName,
        trusted: Vec<ipnet::IpNet>,
    },
    /// Key = the user id an identity endpoint gives for the caller's token (cached).
    Resolve(ResolveConfig),
}

/// Header mode without `trusted_networks`: only callers on this host (a sidecar's app).
pub const DEFAULT_TRUSTED_NETWORKS: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// Access tokens live one hour; answers are kept a little less.
pub const DEFAULT_RESOLVE_TTL: Duration = Duration::from_secs(50 * 60);
/// A refused token is not asked about again for this long (a bad token cannot flood the endpoint).
pub const DEFAULT_RESOLVE_NEGATIVE_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Distinct tokens remembered; each entry is a few dozen bytes.
pub const DEFAULT_RESOLVE_CACHE_SIZE: u64 = 100_000;
pub const DEFAULT_RESOLVE_ON_UNREACHABLE: OnIdentityError = OnIdentityError::Reject;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveConfig {
    /// Absolute `http(s)://` URL asked with the caller's own credential, e.g.
    /// `https://cliq.zoho.com/api/v2/me`.
    pub url: http::Uri,
    /// JSON pointer (RFC 6901) to the user id in the answer, e.g. `/data/zuid`.
    pub user_field: String,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub timeout: Duration,
    pub cache_size: u64,
    pub on_unreachable: OnIdentityError,
    /// `lookup_reserve`: calls per window of the identity endpoint's quota kept for lookups, all
    /// tokens together; the apps' own calls to that endpoint get the rest. `None`: half
    /// ([`Config::lookup_split`]).
    pub lookup_reserve: Option<NonZeroU32>,
}

/// How the identity endpoint's per-user quota is shared in resolve mode. Zoho counts a lookup
/// against the owner of the token it asks about, who is unknown until it answers: every lookup
/// in a window could be one user's. So lookups, all tokens together, get `lookups` a window, and
/// each user's own calls to the endpoint get `own`; `lookups + own` is the endpoint's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupSplit {
    pub lookups: NonZeroU32,
    pub own: NonZeroU32,
}

impl LookupSplit {
    /// Each share no larger than in `self` or in `other`.
    pub fn min(self, other: LookupSplit) -> LookupSplit {
        LookupSplit {
            lookups: self.lookups.min(other.lookups),
            own: self.own.min(other.own),
        }
    }
}

/// [`DEFAULT_TRUSTED_NETWORKS`], parsed.
pub fn default_trusted_networks() -> Vec<ipnet::IpNet> {
    DEFAULT_TRUSTED_NETWORKS
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// What to do when the identity endpoint cannot be reached (or answers nonsense).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIdentityError {
    /// Refuse the call with 503: no quota can be charged to an unknown user.
    Reject,
    /// Key the call by its token hash, as in `token` mode (a user with several live tokens then
    /// briefly has several quotas).
    Token,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded store: one process, state in memory.
    Memory,
    /// Shared state in Redis (or Valkey): several replicas, one quota.
    Redis(RedisStoreConfig),
}

pub const DEFAULT_REDIS_ON_ERROR: OnStoreError = OnStoreError::Reject;
pub const DEFAULT_REDIS_REPLICAS: u32 = 1;
/// One limiter decision is one short script on loopback or in the same zone: well under this.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);
pub const DEFAULT_REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port/db` or `rediss://...`. May hold a password: print it
    /// only through [`RedisStoreConfig::redacted_url`].
    pub url: String,
    pub on_error: OnStoreError,
    /// How many replicas share the quota; with `on_error: local` each gets `limit / replicas`.
    pub replicas: NonZeroU32,
    /// Per operation (one decision); slower counts as a store error.
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl RedisStoreConfig {
    /// The URL with any password replaced by `REDACTED`.
    pub fn redacted_url(&self) -> String {
        redact_url_password(&self.url)
    }
}

impl std::fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreConfig")
            .field("url", &self.redacted_url())
            .field("on_error", &self.on_error)
            .field("replicas", &self.replicas)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `scheme://user:password@host` -> `scheme://user:REDACTED@host`; `scheme://secret@host` ->
/// `scheme://REDACTED@host`; URLs without `@` unchanged.
///
/// Everything before the *last* `@` counts as credentials, so a malformed URL (a password holding
/// an unencoded `/`, `?` or `#`, or no `scheme://` at all) is redacted too: when in doubt, too much.
pub fn redact_url_password(url: &str) -> String {
    let (prefix, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    match rest.rfind('@') {
        Some(at) => {
            let (userinfo, host) = rest.split_at(at);
            let user = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:REDACTED"),
                None => "REDACTED".to_string(),
            };
            format!("{prefix}{user}{host}")
        }
        None => url.to_string(),
    }
}

/// What a replica does while Redis is unreachable or slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Refuse limited calls with 503 until Redis answers again.
    Reject,
    /// Decide locally, each replica with `limit / replicas` of every quota.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP + TLS connect to the upstream.
    pub connect: Duration,
    /// From sending the request to receiving the upstream's response head.
    pub response: Duration,
    /// How long a client may take to send a request head (slowloris guard).
    pub client_header: Duration,
    /// The longest a client may pause between two reads of its request body (else 408).
    pub client_body: Duration,
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
    pub mode: RouteMode,
    /// `validate`: the endpoint's documented input limits, checked before the limiter so a call
    /// Zoho would refuse costs no quota. `None` (the default): calls are not checked.
    pub validate: Option<&'static RuleSet>,
    /// Line of the route in the file, for messages.
    pub line: usize,
}

// ---- Errors: every problem in the file, each with its line and dotted key. ----

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line in the file; 0 when the problem is the file as a whole (cannot be read).
    pub line: usize,
    /// Dotted key, e.g. `routes[2].per`, `identity.header`; [`DOCUMENT_KEY`] for the document
    /// itself; the file's path when it cannot be read.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.key, self.message)
    }
}

/// Every problem found in one file, in line order.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The key reported for problems with the document as a whole (YAML syntax, its shape).
pub const DOCUMENT_KEY: &str = "(document)";

// ---- Loading ----

impl Config {
    /// Parses and validates a config held in memory. A relative `upstream_ca_file` is taken
    /// relative to the working directory.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigErrors> {
        Self::parse(text, None)
    }

    /// Reads, parses and validates a config file. A relative `upstream_ca_file` is taken relative
    /// to the file's directory, so `cliqgate check` gives the same answer from any directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                line: 0,
                key: path.display().to_string(),
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        Self::parse(&text, dir)
    }

    fn parse(text: &str, base_dir: Option<&Path>) -> Result<Config, ConfigErrors> {
        let mut cx = Ctx {
            errors: Vec::new(),
            base_dir,
        };
        // Unreadable YAML has no tree to walk: the syntax error is the one thing to report.
        let Ok(root) = load_document(text, &mut cx) else {
            return cx.finish(None);
        };
        if let Some(root) = &root {
            report_duplicate_keys(root, &text.chars().collect::<Vec<_>>(), "", &mut cx);
        }
        // An empty file is walked as an empty mapping, so it reports the missing `upstream`.
        let config = match Section::open(root.as_ref(), String::new(), 1, &TOP, &mut cx) {
            Some(top) => read_config(&top, &mut cx),
            None => None,
        };
        cx.finish(config)
    }
}

impl Config {
    /// In resolve mode, the route that covers the identity endpoint (`GET` on its path), if any.
    pub fn identity_route(&self) -> Option<usize> {
        match &self.identity {
            IdentityConfig::Resolve(resolve) => identity_route(resolve, &self.routes),
            _ => None,
        }
    }

    /// In resolve mode, how the identity endpoint's quota is shared between lookups and the
    /// apps' own calls (always `Some` for a resolve-mode config that was read without errors).
    pub fn lookup_split(&self) -> Option<LookupSplit> {
        let IdentityConfig::Resolve(resolve) = &self.identity else {
            return None;
        };
        let covering = identity_route(resolve, &self.routes);
        lookup_split(resolve, identity_limit(covering, &self.routes))
    }
}

fn identity_route(resolve: &ResolveConfig, routes: &[RouteConfig]) -> Option<usize> {
    crate::route::RouteTable::new(routes)
        .find(&http::Method::GET, resolve.url.path())
        .map(|id| id.0 as usize)
}

/// The identity endpoint's limit: that of the route `covering` it, or Zoho's published figure
/// for `/api/v2/me`.
fn identity_limit(covering: Option<usize>, routes: &[RouteConfig]) -> NonZeroU32 {
    covering.map_or(
        NonZeroU32::new(crate::resolve::IDENTITY_LIMIT).unwrap_or(NonZeroU32::MIN),
        |i| routes[i].limit,
    )
}

/// `lookup_reserve` (default: half of `limit`, at least 1) and the rest; `None` if either share
/// would be empty.
fn lookup_split(resolve: &ResolveConfig, limit: NonZeroU32) -> Option<LookupSplit> {
    let lookups = resolve
        .lookup_reserve
        .unwrap_or(NonZeroU32::new(limit.get() / 2).unwrap_or(NonZeroU32::MIN));
    let own = NonZeroU32::new(limit.get().checked_sub(lookups.get())?)?;
    Some(LookupSplit { lookups, own })
}

/// Resolve mode: `lookup_reserve` must leave the apps' own calls to the identity endpoint at
/// least one call a window.
fn check_lookup_split(
    top: &Section,
    identity: &IdentityConfig,
    routes: &[RouteConfig],
    cx: &mut Ctx,
) {
    let IdentityConfig::Resolve(resolve) = identity else {
        return;
    };
    let covering = identity_route(resolve, routes);
    let limit = identity_limit(covering, routes);
    if let Some(i) = covering.filter(|&i| routes[i].algorithm != Algorithm::Window) {
        // A GCRA state cannot be cut to a smaller share: its tolerance grows as its rate falls,
        // so the held shares of a reload would let more through, not less.
        let why = "the route covers the identity endpoint, whose quota resolve mode shares \
                   between lookups and the apps' own calls; shares need `algorithm: window`";
        cx.error(routes[i].line, &format!("routes[{i}].algorithm"), why);
        return;
    }
    if lookup_split(resolve, limit).is_some() {
        return;
    }
    // The sections were read (and their errors reported) already: they are opened again quietly.
    let mut quiet = Ctx {
        errors: Vec::new(),
        base_dir: None,
    };
    match (resolve.lookup_reserve, covering) {
        (Some(reserve), _) => {
            let line = top
                .child("identity", &IDENTITY, &mut quiet)
                .and_then(|sec| sec.field("lookup_reserve"))
                .map_or(top.line, |f| f.line());
            let why = format!(
                "{reserve} leaves nothing of the identity endpoint's {limit} calls a window for \
                 the apps' own calls to it; it must be less than {limit}"
            );
            cx.error(line, "identity.lookup_reserve", why);
        }
        (None, Some(i)) => {
            let limit_line = top
                .field("routes")
                .and_then(|f| match &f.node.data {
                    YamlDataOwned::Sequence(items) => items.get(i),
                    _ => None,
                })
                .and_then(|item| {
                    Section::open(Some(item), String::new(), line_of(item), &ROUTE, &mut quiet)
                })
                .and_then(|sec| sec.field("limit"))
                .map_or(routes[i].line, |f| f.line());
            let why = format!(
                "the route covers the identity endpoint ({}), whose quota resolve mode shares \
                 between lookups and the apps' own calls: it needs a limit of at least 2",
                resolve.url.path()
            );
            cx.error(limit_line, &format!("routes[{i}].limit"), why);
        }
        (None, None) => {}
    }
}

/// Collects errors while the whole tree is walked; nothing stops at the first one.
struct Ctx<'b> {
    errors: Vec<ConfigError>,
    /// Where relative file paths in the config are taken from (`None`: working directory).
    base_dir: Option<&'b Path>,
}

impl Ctx<'_> {
    fn error(&mut self, line: usize, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn finish(mut self, config: Option<Config>) -> Result<Config, ConfigErrors> {
        // Stable sort: errors on one line keep the order they were found in.
        self.errors.sort_by_key(|e| e.line);
        match config {
            Some(config) if self.errors.is_empty() => Ok(config),
            _ if !self.errors.is_empty() => Err(ConfigErrors(self.errors)),
            _ => Err(ConfigErrors(vec![ConfigError {
                line: 0,
                key: DOCUMENT_KEY.to_string(),
                message: "config could not be built (no specific error was recorded)".into(),
            }])),
        }
    }
}

/// Parses the YAML text into its single document (`None`: the file holds no document). `Err`:
/// a syntax error, already recorded.
fn load_document(text: &str, cx: &mut Ctx) -> Result<Option<MarkedYamlOwned>, ()> {
    let docs = match MarkedYamlOwned::load_from_str(text) {
        Ok(docs) => docs,
        Err(e) => {
            cx.error(
                e.marker().line(),
                DOCUMENT_KEY,
                format!("YAML syntax error: {}", e.info()),
            );
            return Err(());
        }
    };
    if let Some(second) = docs.get(1) {
        cx.error(
            line_of(second),
            DOCUMENT_KEY,
            "only one YAML document is allowed; another one (after `---`) starts here",
        );
    }
    Ok(docs
        .into_iter()
        .next()
        .filter(|doc| !doc.data.is_badvalue()))
}

fn line_of(node: &MarkedYamlOwned) -> usize {
    node.span.start.line()
}

// ---- Duplicate keys ----

/// Reports mapping keys given twice. saphyr keeps one entry per key (the first key's position,
/// the last value), so a duplicate shows as a key whose value does not directly follow it: the
/// text between them holds the first value and the repeated key, not just `:`, anchors, tags,
/// block-scalar indicators and comments.
fn report_duplicate_keys(node: &MarkedYamlOwned, src: &[char], path: &str, cx: &mut Ctx) {
    match &node.data {
        YamlDataOwned::Mapping(map) => {
            for (k, v) in map {
                let key = join(path, &key_text(k));
                let between = src
                    .get(k.span.end.index()..v.span.start.index())
                    .unwrap_or(&[]);
                if !only_syntax(between) {
                    cx.error(
                        line_of(v),
                        &key,
                        format!(
                            "duplicate key: it is also set at line {}; YAML would silently keep \
                             only the last value, so remove one",
                            line_of(k)
                        ),
                    );
                }
                report_duplicate_keys(v, src, &key, cx);
            }
        }
        YamlDataOwned::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                report_duplicate_keys(item, src, &format!("{path}[{i}]"), cx);
            }
        }
        _ => {}
    }
}

/// True if `text` (between a key and its value) holds nothing but YAML punctuation.
fn only_syntax(text: &[char]) -> bool {
    let text: String = text.iter().collect();
    text.lines().all(|line| {
        strip_comment(line).split_whitespace().all(|token| {
            token.starts_with(['&', '!'])
                || token
                    .chars()
                    .all(|c| ":?|>+-\"'".contains(c) || c.is_ascii_digit())
        })
    })
}

/// A `#` starts a comment at the start of a line or after whitespace (YAML 1.2, 6.6).
fn strip_comment(line: &str) -> &str {
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        if c == '#' && previous.is_whitespace() {
            return &line[..i];
        }
        previous = c;
    }
    line
}

// ---- Walking mappings: allowed keys, refused keys, typed values ----

/// The keys one mapping may hold. `refused` keys are part of the product (SPEC.md) but not built
/// yet: they get an explanation instead of "unknown key".
struct Schema {
    allowed: &'static [&'static str],
    refused: &'static [(&'static str, &'static str)],
}

const ROUTE_FIELDS: &[&str] = &[
    "method",
    "limit",
    "per",
    "lock",
    "on_limit",
    "max_wait",
    "algorithm",
    "burst",
    "mode",
];

const TOP: Schema = Schema {
    allowed: &[
        "listen",
        "admin_listen",
        "upstream",
        "upstream_ca_file",
        "safety_margin",
        "unmatched",
        "identity",
        "store",
        "timeouts",
        "http",
        "queue",
        "log",
        "defaults",
        "routes",
        "admin",
        "reload",
    ],
    refused: &[],
};

/// The `identity` keys that only `mode: header` reads.
const HEADER_KEYS: [&str; 2] = ["header", "trusted_networks"];
/// The `identity` keys that only `mode: resolve` reads.
const RESOLVE_KEYS: [&str; 8] = [
    "url",
    "user_field",
    "ttl",
    "negative_ttl",
    "timeout",
    "cache_size",
    "on_unreachable",
    "lookup_reserve",
];
const IDENTITY: Schema = Schema {
    allowed: &[
        "mode",
        "header",
        "trusted_networks",
        "url",
        "user_field",
        "ttl",
        "negative_ttl",
        "timeout",
        "cache_size",
        "on_unreachable",
        "lookup_reserve",
    ],
    refused: &[],
};
/// The `store` keys that only `kind: redis` reads.
const REDIS_KEYS: [&str; 5] = ["url", "on_error", "replicas", "timeout", "connect_timeout"];
const STORE: Schema = Schema {
    allowed: &[
        "kind",
        "url",
        "on_error",
        "replicas",
        "timeout",
        "connect_timeout",
        "state_file",
    ],
    refused: &[],
};
const TIMEOUTS: Schema = Schema {
    allowed: &[
        "connect",
        "response",
        "client_header",
        "client_body",
        "shutdown",
    ],
    refused: &[],
};
const HTTP: Schema = Schema {
    allowed: &["max_header_bytes", "max_body_bytes"],
    refused: &[],
};
const QUEUE: Schema = Schema {
    allowed: &["max_per_user", "max_total"],
    refused: &[],
};
const LOG: Schema = Schema {
    allowed: &["format", "level"],
    refused: &[],
};
/// Read by hand ([`read_admin`]): nothing found under `admin` is ever quoted in a message.
const ADMIN: Schema = Schema {
    allowed: &["token"],
    refused: &[],
};
const RELOAD: Schema = Schema {
    allowed: &["watch"],
    refused: &[],
};
const DEFAULTS: Schema = Schema {
    allowed: ROUTE_FIELDS,
    refused: &[
        (
            "name",
            "belongs to each route (names are unique), not to `defaults`",
        ),
        ("path", "belongs to each route, not to `defaults`"),
        (
            "validate",
            "belongs to the route of the endpoint whose rules it names, not to `defaults`",
        ),
    ],
};
const ROUTE: Schema = Schema {
    allowed: &[
        "name",
        "method",
        "path",
        "limit",
        "per",
        "lock",
        "on_limit",
        "max_wait",
        "algorithm",
        "burst",
        "mode",
        "validate",
    ],
    refused: &[],
};

/// The mappings under the top level, each with its keys (`routes[]`: every route).
const SECTIONS: [(&str, &Schema); 10] = [
    ("identity", &IDENTITY),
    ("store", &STORE),
    ("timeouts", &TIMEOUTS),
    ("http", &HTTP),
    ("queue", &QUEUE),
    ("log", &LOG),
    ("admin", &ADMIN),
    ("reload", &RELOAD),
    ("defaults", &DEFAULTS),
    ("routes[]", &ROUTE),
];

/// Every key a config file may hold, as dotted paths: `listen`, `store.state_file`,
/// `routes[].mode`. A test holds the JSON Schema ([`JSON_SCHEMA`]) to exactly these keys.
pub fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = TOP.allowed.iter().map(|k| (*k).to_string()).collect();
    for (section, schema) in SECTIONS {
        keys.extend(schema.allowed.iter().map(|k| format!("{section}.{k}")));
    }
    keys
}

/// YAML 1.1's merge key; saphyr (YAML 1.2) reads it as an ordinary key named `<<`.
const MERGE_KEY: &str = "<<";
const MERGE_REFUSED: &str =
    "YAML merge keys (`<<`) are not supported; put shared route fields under `defaults`";

/// A mapping whose keys have been checked against its [`Schema`].
struct Section<'a> {
    /// Dotted path of the mapping itself (`""` for the top level).
    path: String,
    /// Line of the mapping, for "missing key" errors.
    line: usize,
    entries: Vec<(&'a str, &'a MarkedYamlOwned)>,
    /// Holds a `<<` merge key (reported): what it would have merged in is not reported as missing.
    merges: bool,
}

/// One value and the dotted key it was found under.
struct Field<'a> {
    key: String,
    node: &'a MarkedYamlOwned,
}

impl Field<'_> {
    fn line(&self) -> usize {
        line_of(self.node)
    }
}

impl<'a> Section<'a> {
    /// Opens `node` as a mapping. Absent or empty (`key:` with everything commented out) is an
    /// empty mapping; anything else that is not a mapping is reported and gives `None`.
    fn open(
        node: Option<&'a MarkedYamlOwned>,
        path: String,
        line: usize,
        schema: &Schema,
        cx: &mut Ctx,
    ) -> Option<Section<'a>> {
        let mut section = Section {
            path,
            line,
            entries: Vec::new(),
            merges: false,
        };
        let Some(node) = node.filter(|n| !n.data.is_null()) else {
            return Some(section);
        };
        let YamlDataOwned::Mapping(map) = &node.data else {
            let key = if section.path.is_empty() {
                DOCUMENT_KEY
            } else {
                &section.path
            };
            cx.error(
                line_of(node),
                key,
                format!("expected a mapping of keys, found {}", kind_of(node)),
            );
            return None;
        };
        section.line = line_of(node);
        section.merges = map.keys().any(|k| k.data.as_str() == Some(MERGE_KEY));
        for (k, v) in map {
            if let Some(name) = section.check_key(k, schema, cx) {
                section.entries.push((name, v));
            }
        }
        Some(section)
    }

    /// The key's name if the schema allows it; otherwise reports why not.
    fn check_key(&self, k: &'a MarkedYamlOwned, schema: &Schema, cx: &mut Ctx) -> Option<&'a str> {
        let key = self.key(&key_text(k));
        let Some(name) = k.data.as_str() else {
            cx.error(
                line_of(k),
                &key,
                format!("keys must be strings, found {}", kind_of(k)),
            );
            return None;
        };
        if schema.allowed.contains(&name) {
            return Some(name);
        }
        let message = match schema.refused.iter().find(|(refused, _)| *refused == name) {
            Some((_, why)) => (*why).to_string(),
            None if name == MERGE_KEY => MERGE_REFUSED.to_string(),
            None => unknown_key_message(name, schema.allowed),
        };
        cx.error(line_of(k), &key, message);
        None
    }

    fn key(&self, name: &str) -> String {
        join(&self.path, name)
    }

    fn field(&self, name: &str) -> Option<Field<'a>> {
        self.entries
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, node)| Field {
                key: self.key(name),
                node,
            })
    }

    /// Opens the nested mapping under `name`.
    fn child(&self, name: &str, schema: &Schema, cx: &mut Ctx) -> Option<Section<'a>> {
        let node = self.field(name).map(|f| f.node);
        Section::open(node, self.key(name), self.line, schema, cx)
    }

    /// Reports a required key that is absent, at the line of this mapping.
    fn missing(&self, name: &str, why: &str, cx: &mut Ctx) {
        if !self.merges {
            cx.error(self.line, &self.key(name), format!("missing: {why}"));
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn key_text(k: &MarkedYamlOwned) -> String {
    match &k.data {
        YamlDataOwned::Value(ScalarOwned::String(s)) => s.clone(),
        YamlDataOwned::Value(ScalarOwned::Integer(n)) => n.to_string(),
        YamlDataOwned::Value(ScalarOwned::Boolean(b)) => b.to_string(),
        _ => "?".to_string(),
    }
}

fn unknown_key_message(name: &str, allowed: &[&str]) -> String {
    let hint = allowed
        .iter()
        .find(|a| edit_distance(name, a) <= 2)
        .map(|a| format!("did you mean `{a}`? "))
        .unwrap_or_default();
    format!("unknown key; {hint}allowed here: {}", allowed.join(", "))
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// How a node reads in "expected X, found Y" messages.
fn kind_of(node: &MarkedYamlOwned) -> String {
    match &node.data {
        YamlDataOwned::Value(ScalarOwned::Null) => "an empty value".into(),
        YamlDataOwned::Value(ScalarOwned::Boolean(b)) => format!("the boolean {b}"),
        YamlDataOwned::Value(ScalarOwned::Integer(n)) => format!("the integer {n}"),
        YamlDataOwned::Value(ScalarOwned::FloatingPoint(x)) => format!("the number {x}"),
        YamlDataOwned::Value(ScalarOwned::String(s)) => format!("the string {s:?}"),
        YamlDataOwned::Sequence(_) => "a list".into(),
        YamlDataOwned::Mapping(_) => "a mapping".into(),
        YamlDataOwned::Tagged(tag, _) => {
            format!("a value tagged {tag} (YAML tags are not supported)")
        }
        YamlDataOwned::BadValue => "a value that does not match its YAML tag".into(),
        YamlDataOwned::Alias(_) => "an unresolved YAML alias".into(),
        YamlDataOwned::Representation(text, _, _) => format!("the unparsed value {text:?}"),
    }
}

// ---- Typed values. Each reports its own error and returns None, so the walk goes on. ----

fn string<'a>(f: &Field<'a>, what: &str, cx: &mut Ctx) -> Option<&'a str> {
    match f.node.data.as_str() {
        Some(s) if !s.trim().is_empty() => Some(s),
        Some(_) => {
            cx.error(
                f.line(),
                &f.key,
                format!("must not be empty; expected {what}"),
            );
            None
        }
        None => {
            cx.error(
                f.line(),
                &f.key,
                format!("expected {what}, found {}", kind_of(f.node)),
            );
            None
        }
    }
}

/// A whole number >= 1 that fits `T`.
fn positive<T: TryFrom<i64>>(f: &Field, cx: &mut Ctx) -> Option<T> {
    let n = match &f.node.data {
        YamlDataOwned::Value(ScalarOwned::Integer(n)) => *n,
        _ => {
            cx.error(
                f.line(),
                &f.key,
                format!("expected a whole number, found {}", kind_of(f.node)),
            );
            return None;
        }
    };
    if n < 1 {
        cx.error(f.line(), &f.key, format!("must be at least 1, found {n}"));
        return None;
    }
    let value = T::try_from(n).ok();
    if value.is_none() {
        cx.error(f.line(), &f.key, format!("{n} is too large"));
    }
    value
}

fn non_zero_u32(f: &Field, cx: &mut Ctx) -> Option<NonZeroU32> {
    positive::<u32>(f, cx).and_then(NonZeroU32::new)
}

/// A duration string (`"250ms"`, `"10m"`). `allow_zero` where zero has a meaning (no margin, no
/// waiting); elsewhere a zero would disable the thing being configured.
fn duration(f: &Field, allow_zero: bool, cx: &mut Ctx) -> Option<Duration> {
    let Some(text) = f.node.data.as_str() else {
        cx.error(
            f.line(),
            &f.key,
            format!(
                "expected a duration string with a unit (ms, s, m, h), e.g. \"30s\", found {}",
                kind_of(f.node)
            ),
        );
        return None;
    };
    match parse_duration(text) {
        Ok(d) if d.is_zero() && !allow_zero => {
            cx.error(f.line(), &f.key, "must be greater than zero");
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            cx.error(f.line(), &f.key, e);
            None
        }
    }
}

/// One of a fixed set of lowercase words.
fn choice<T: Copy>(f: &Field, options: &[(&str, T)], cx: &mut Ctx) -> Option<T> {
    let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
    let allowed = names.join(", ");
    let Some(text) = f.node.data.as_str() else {
        cx.error(
            f.line(),
            &f.key,
            format!("expected one of {allowed}, found {}", kind_of(f.node)),
        );
        return None;
    };
    let found = options
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, v)| *v);
    if found.is_none() {
        cx.error(
            f.line(),
            &f.key,
            format!("unknown value {text:?}; allowed: {allowed}"),
        );
    }
    found
}

fn socket_addr(f: &Field, cx: &mut Ctx) -> Option<SocketAddr> {
    let text = string(f, "an address like \"127.0.0.1:8080\"", cx)?;
    let addr = text.parse::<SocketAddr>().ok();
    if addr.is_none() {
        cx.error(
            f.line(),
            &f.key,
            format!(
                "{text:?} is not a socket address; write an IP and a port, e.g. \"0.0.0.0:8080\" \
                 or \"[::1]:8080\" (port 0 picks a free port)"
            ),
        );
    }
    addr
}

/// A byte size: a whole number of bytes, or a string with a unit (`"64KiB"`).
fn byte_size(f: &Field, cx: &mut Ctx) -> Option<u64> {
    match f.node.data.as_str() {
        Some(text) => match parse_size(text) {
            Ok(0) => {
                cx.error(f.line(), &f.key, "must be greater than zero");
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                cx.error(f.line(), &f.key, e);
                None
            }
        },
        None => positive::<u64>(f, cx),
    }
}

// ---- Durations and sizes ----

const DURATION_HELP: &str =
    "write a whole number and a unit (ms, s, m, h), e.g. \"250ms\", \"30s\", \"10m\", \"1h30m\"";

/// Parses `"250ms"`, `"2s"`, `"1m"`, `"10m"`, `"1h"` and combinations from the largest unit down
/// (`"1h30m"`). Zero (`"0s"`) parses; whether it is allowed is up to each key.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| Err(format!("{s:?} is not a duration: {why}; {DURATION_HELP}"));
    if s.is_empty() {
        return bad("it is empty");
    }
    if s.contains(char::is_whitespace) {
        return bad("spaces are not allowed");
    }
    if s.starts_with('-') {
        return bad("it is negative");
    }
    if s.contains(['.', ',']) {
        return bad("fractions are not allowed (write \"1500ms\", not \"1.5s\")");
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut previous_rank = usize::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (number, after) = rest.split_at(digits);
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, next) = after.split_at(letters);
        if number.is_empty() {
            return bad("expected a number");
        }
        let (rank, millis) = match unit {
            "ms" => (0, 1),
            "s" => (1, 1_000),
            "m" => (2, 60_000),
            "h" => (3, 3_600_000),
            "" => return bad(&format!("{number} has no unit")),
            other => return bad(&format!("unknown unit {other:?}")),
        };
        if rank >= previous_rank {
            return bad("units must go from largest to smallest, each at most once");
        }
        previous_rank = rank;
        let part = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(millis))
            .map(Duration::from_millis);
        match part.and_then(|p| total.checked_add(p)) {
            Some(sum) => total = sum,
            None => return bad("it is too large"),
        }
        rest = next;
    }
    Ok(total)
}

/// The shortest exact spelling that [`parse_duration`] reads back: `10m`, `1m1s`, `1m1500ms`.
pub fn format_duration(d: Duration) -> String {
    const WHOLE_SECONDS: [(&str, u128); 3] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000)];
    const SUB_SECOND: [(&str, u128); 3] = [("h", 3_600_000), ("m", 60_000), ("ms", 1)];
    let mut rest = d.as_millis();
    if rest == 0 {
        return "0s".to_string();
    }
    let units = if rest % 1_000 == 0 {
        WHOLE_SECONDS
    } else {
        SUB_SECOND
    };
    let mut out = String::new();
    for (unit, size) in units {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

/// Parses a size string with a unit: `"512B"`, `"64KiB"`, `"16MiB"`, `"1GiB"`.
fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    let multiplier: u64 = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?} is not a size: write a whole number of bytes (65536) or a number and a \
                 unit (B, KiB, MiB, GiB), e.g. \"64KiB\""
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("{s:?} is not a size: expected a whole number before the unit"))
}

// ---- The top level ----

fn read_config(top: &Section, cx: &mut Ctx) -> Option<Config> {
    let listen = address(top, "listen", DEFAULT_LISTEN, cx);
    let admin_listen = address(top, "admin_listen", DEFAULT_ADMIN_LISTEN, cx);
    check_distinct_listeners(top, listen, admin_listen, cx);
    let upstream = match top.field("upstream") {
        Some(f) => upstream(&f, cx),
        None => {
            top.missing(
                "upstream",
                "the Zoho Cliq base URL, e.g. \"https://cliq.zoho.com\"",
                cx,
            );
            None
        }
    };
    let upstream_ca_file = top.field("upstream_ca_file").and_then(|f| ca_file(&f, cx));
    let safety_margin = top
        .field("safety_margin")
        .and_then(|f| duration(&f, true, cx))
        .unwrap_or(DEFAULT_SAFETY_MARGIN);
    let unmatched = top
        .field("unmatched")
        .and_then(|f| {
            choice(
                &f,
                &[
                    ("forward", Unmatched::Forward),
                    ("reject", Unmatched::Reject),
                ],
                cx,
            )
        })
        .unwrap_or(DEFAULT_UNMATCHED);
    let identity = read_identity(top, cx);
    let (store, state_file) = read_store(top, cx);
    let timeouts = read_timeouts(top, cx);
    let http = read_http(top, cx);
    let queue = read_queue(top, cx);
    let log = read_log(top, cx);
    let admin = read_admin(top, cx);
    let reload = read_reload(top, cx);
    let routes = read_routes(top, cx);
    check_lookup_split(top, &identity, &routes, cx);
    Some(Config {
        listen,
        admin_listen,
        upstream: upstream?,
        upstream_ca_file,
        safety_margin,
        unmatched,
        identity,
        store,
        timeouts,
        http,
        queue,
        log,
        state_file,
        admin,
        reload,
        routes,
    })
}

fn address(top: &Section, name: &str, default: &'static str, cx: &mut Ctx) -> SocketAddr {
    top.field(name)
        .and_then(|f| socket_addr(&f, cx))
        .unwrap_or_else(|| {
            default
                .parse()
                .expect("DEFAULT_* addresses are valid literals (tested)")
        })
}

/// The proxy and admin listeners cannot share a port (port 0 picks two different free ports).
fn check_distinct_listeners(top: &Section, listen: SocketAddr, admin: SocketAddr, cx: &mut Ctx) {
    if listen == admin && listen.port() != 0 {
        let line = top.field("admin_listen").map_or(top.line, |f| f.line());
        let why = format!("{admin} is also `listen`; the admin endpoints need their own port");
        cx.error(line, "admin_listen", why);
    }
}

/// `upstream`: the one origin cliqgate dials. Only scheme and `host[:port]` are meaningful: a path,
/// query or credentials here would be silently dropped or leaked, so they are refused.
fn upstream(f: &Field, cx: &mut Ctx) -> Option<UpstreamTarget> {
    let text = string(f, "a URL like \"https://cliq.zoho.com\"", cx)?;
    let result = parse_upstream(text);
    if let Err(why) = &result {
        cx.error(
            f.line(),
            &f.key,
            format!("{text:?} is not a usable upstream: {why}"),
        );
    }
    result.ok()
}

fn parse_upstream(text: &str) -> Result<UpstreamTarget, String> {
    // http::Uri silently drops a fragment; refuse it before parsing.
    if text.contains('#') {
        return Err("a fragment (#...) is not allowed".into());
    }
    let uri = text
        .parse::<http::Uri>()
        .map_err(|e| format!("not a URL ({e})"))?;
    let scheme = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        Some(other) => {
            return Err(format!(
                "scheme {other:?} is not supported; use https:// (or http:// for tests)"
            ))
        }
        None => return Err("it needs a scheme: https://host (or http:// for tests)".into()),
    };
    let authority = uri.authority().ok_or("it needs a host")?.clone();
    if authority.as_str().contains('@') {
        return Err("credentials (user@) are not allowed; callers send their own tokens".into());
    }
    if authority.host().is_empty() {
        return Err("it needs a host".into());
    }
    check_port(&authority)?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        let why = "only scheme and host[:port] are allowed: no path or query, because callers' \
                   request paths are forwarded as they are";
        return Err(why.into());
    }
    Ok(UpstreamTarget { scheme, authority })
}

/// `http::Uri` accepts `host:` and `host:99999`; neither can be dialled.
fn check_port(authority: &Authority) -> Result<(), String> {
    let after_host = &authority.as_str()[authority.host().len()..];
    match after_host.strip_prefix(':') {
        None => Ok(()),
        Some(port) => match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(()),
            _ => Err(format!("port {port:?} is not a port number (1-65535)")),
        },
    }
}

/// `upstream_ca_file`: checked now so a typo fails `cliqgate check`, not the first TLS handshake.
fn ca_file(f: &Field, cx: &mut Ctx) -> Option<PathBuf> {
    let text = string(f, "a path to a PEM file", cx)?;
    let path = config_path(text, cx);
    if !path.is_file() {
        cx.error(
            f.line(),
            &f.key,
            format!("no such file: {}", path.display()),
        );
        return None;
    }
    Some(path)
}

/// A path from the config: a relative one is taken from the config file's directory (from the
/// working directory for a config held in memory).
fn config_path(text: &str, cx: &Ctx) -> PathBuf {
    match cx.base_dir {
        Some(dir) if Path::new(text).is_relative() => dir.join(text),
        _ => PathBuf::from(text),
    }
}

const HEADER_NEEDED: &str = "mode header needs `header`, the trusted request header that names \
                             the user, e.g. \"X-Cliq-User\"";
const URL_NEEDED: &str = "mode resolve needs `url`, the identity endpoint asked with the caller's \
                          own credential, e.g. \"https://cliq.zoho.com/api/v2/me\"";
const USER_FIELD_NEEDED: &str = "mode resolve needs `user_field`, a JSON pointer to the user id \
                                 in the endpoint's answer, e.g. \"/data/zuid\"";
/// Zoho access tokens live one hour: an answer kept longer outlives the token it is about.
const MAX_RESOLVE_TTL: Duration = Duration::from_secs(60 * 60);

fn read_identity(top: &Section, cx: &mut Ctx) -> IdentityConfig {
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Token,
        Header,
        Resolve,
    }
    let Some(sec) = top.child("identity", &IDENTITY, cx) else {
        return IdentityConfig::Token;
    };
    let modes = [
        ("token", Mode::Token),
        ("header", Mode::Header),
        ("resolve", Mode::Resolve),
    ];
    let mode_field = sec.field("mode");
    let mode = match &mode_field {
        None => Some(Mode::Token),
        Some(f) => choice(f, &modes, cx),
    };
    let this_mode = match (&mode_field, mode) {
        (None, _) => "`mode` is not set, so it is token".to_string(),
        (Some(_), Some(m)) => {
            let name = modes.iter().find(|(_, v)| *v == m).map_or("?", |(n, _)| n);
            format!("mode here is {name}")
        }
        (Some(_), None) => String::new(),
    };
    let refuse = |keys: &[&str], wanted: &str, cx: &mut Ctx| {
        for name in keys {
            if let Some(f) = sec.field(name) {
                let why = format!("only used with `mode: {wanted}` ({this_mode})");
                cx.error(f.line(), &f.key, why);
            }
        }
    };
    match mode {
        Some(Mode::Token) => {
            refuse(&HEADER_KEYS, "header", cx);
            refuse(&RESOLVE_KEYS, "resolve", cx);
            IdentityConfig::Token
        }
        Some(Mode::Header) => {
            refuse(&RESOLVE_KEYS, "resolve", cx);
            read_header_mode(&sec, true, cx).unwrap_or(IdentityConfig::Token)
        }
        Some(Mode::Resolve) => {
            refuse(&HEADER_KEYS, "header", cx);
            read_resolve(&sec, true, cx).map_or(IdentityConfig::Token, IdentityConfig::Resolve)
        }
        // A bad `mode` (reported): still check the values that are there, all errors at once.
        None => {
            let _ = read_header_mode(&sec, false, cx);
            let _ = read_resolve(&sec, false, cx);
            IdentityConfig::Token
        }
    }
}

/// The `mode: header` keys. `require`: report a missing `header` (not when `mode` itself is bad).
fn read_header_mode(sec: &Section, require: bool, cx: &mut Ctx) -> Option<IdentityConfig> {
    let name = match sec.field("header") {
        Some(f) => header_name(&f, cx),
        None => {
            if require {
                sec.missing("header", HEADER_NEEDED, cx);
            }
            None
        }
    };
    let trusted = match sec.field("trusted_networks") {
        Some(f) => trusted_networks(&f, cx),
        None => Some(default_trusted_networks()),
    };
    Some(IdentityConfig::Header {
        name: name?,
        trusted: trusted?,
    })
}

fn header_name(f: &Field, cx: &mut Ctx) -> Option<HeaderName> {
    let text = string(f, "an HTTP header name like \"X-Cliq-User\"", cx)?;
    let Ok(name) = HeaderName::from_bytes(text.as_bytes()) else {
        cx.error(
            f.line(),
            &f.key,
            format!("{text:?} is not a valid HTTP header name (RFC 9110, 5.1)"),
        );
        return None;
    };
    match unusable_identity_header(name.as_str()) {
        Some(why) => {
            cx.error(f.line(), &f.key, format!("{text:?} {why}"));
            None
        }
        None => Some(name),
    }
}

/// Why a header (lowercase name) cannot name the user in header mode, if it cannot.
fn unusable_identity_header(name: &str) -> Option<&'static str> {
    match name {
        "authorization" | "proxy-authorization" | "cookie" => Some(
            "carries the caller's credential, not a user name; to key by credential use \
             `mode: token`, to key by user use a header your app sets (e.g. \"X-Cliq-User\") or \
             `mode: resolve`",
        ),
        "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer"
        | "transfer-encoding" | "upgrade" => Some(
            "is a hop-by-hop header (RFC 9110, 7.6.1): it describes one connection, not the \
             user; use a header your app sets, e.g. \"X-Cliq-User\"",
        ),
        "host" | "content-length" | "content-type" => Some(
            "describes the request itself, not the user; use a header your app sets, e.g. \
             \"X-Cliq-User\"",
        ),
        _ => None,
    }
}

const EMPTY_TRUST: &str = "the list is empty, so no caller could ever be trusted and every call \
                           would be refused; list the networks your app calls from, or remove \
                           the key to trust only this host (127.0.0.0/8, ::1/128)";

/// `identity.trusted_networks`: the source networks whose header is believed. Each bad entry is
/// reported at its own line.
fn trusted_networks(f: &Field, cx: &mut Ctx) -> Option<Vec<ipnet::IpNet>> {
    let items = match &f.node.data {
        YamlDataOwned::Sequence(items) if items.is_empty() => {
            cx.error(f.line(), &f.key, EMPTY_TRUST);
            return None;
        }
        YamlDataOwned::Sequence(items) => items,
        _ => {
            let why = format!(
                "expected a list of networks like [\"10.0.0.0/8\", \"::1\"], found {}",
                kind_of(f.node)
            );
            cx.error(f.line(), &f.key, why);
            return None;
        }
    };
    let mut networks = Vec::new();
    let mut ok = true;
    for (i, node) in items.iter().enumerate() {
        let item = Field {
            key: format!("{}[{i}]", f.key),
            node,
        };
        let Some(text) = string(&item, "a network like \"10.0.0.0/8\"", cx) else {
            ok = false;
            continue;
        };
        match parse_network(text) {
            Ok(net) => networks.push(net),
            Err(why) => {
                cx.error(item.line(), &item.key, why);
                ok = false;
            }
        }
    }
    ok.then_some(networks)
}

const NETWORK_HELP: &str = "write a network like \"10.0.0.0/8\" or \"fd00::/8\", or one address \
                            (\"10.1.2.3\" means /32, \"::1\" means /128)";

/// A CIDR (`10.0.0.0/8`, `::1/128`) or a bare address (one host: /32 or /128).
fn parse_network(text: &str) -> Result<ipnet::IpNet, String> {
    use std::net::IpAddr;
    let Some((addr, prefix)) = text.split_once('/') else {
        return text
            .parse::<IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| format!("{text:?} is not an IP address or network; {NETWORK_HELP}"));
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return Err(format!(
            "{text:?}: {addr:?} is not an IP address; {NETWORK_HELP}"
        ));
    };
    let (family, max) = if addr.is_ipv4() {
        ("IPv4", 32)
    } else {
        ("IPv6", 128)
    };
    let prefix_len = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= max && prefix.bytes().all(|b| b.is_ascii_digit()));
    let Some(prefix_len) = prefix_len else {
        return Err(format!(
            "{text:?}: the prefix length /{prefix} is not a whole number from 0 to {max} \
             (an {family} address has {max} bits)"
        ));
    };
    let net = ipnet::IpNet::new(addr, prefix_len)
        .map_err(|e| format!("{text:?} is not a network: {e}; {NETWORK_HELP}"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has address bits set past the /{prefix_len} prefix; write the network \
             {:?} (or {:?} for that one host)",
            net.trunc().to_string(),
            ipnet::IpNet::from(addr).to_string()
        ));
    }
    Ok(net)
}

/// The `mode: resolve` keys. `require`: report a missing `url` or `user_field` (not when `mode`
/// itself is bad).
fn read_resolve(sec: &Section, require: bool, cx: &mut Ctx) -> Option<ResolveConfig> {
    let url = match sec.field("url") {
        Some(f) => resolve_url(&f, cx),
        None => {
            if require {
                sec.missing("url", URL_NEEDED, cx);
            }
            None
        }
    };
    let user_field = match sec.field("user_field") {
        Some(f) => json_pointer(&f, cx),
        None => {
            if require {
                sec.missing("user_field", USER_FIELD_NEEDED, cx);
            }
            None
        }
    };
    let ttl = sec
        .field("ttl")
        .and_then(|f| {
            let ttl = duration(&f, false, cx)?;
            if ttl > MAX_RESOLVE_TTL {
                let why = format!(
                    "{} is longer than 1h: Zoho access tokens live one hour, so an answer kept \
                     longer would outlive the token it is about; the default is {}",
                    format_duration(ttl),
                    format_duration(DEFAULT_RESOLVE_TTL)
                );
                cx.error(f.line(), &f.key, why);
                return None;
            }
            Some(ttl)
        })
        .unwrap_or(DEFAULT_RESOLVE_TTL);
    let mut positive_duration = |name: &str, default: Duration| {
        sec.field(name)
            .and_then(|f| duration(&f, false, cx))
            .unwrap_or(default)
    };
    let negative_ttl = positive_duration("negative_ttl", DEFAULT_RESOLVE_NEGATIVE_TTL);
    let timeout = positive_duration("timeout", DEFAULT_RESOLVE_TIMEOUT);
    let cache_size = sec
        .field("cache_size")
        .and_then(|f| positive::<u64>(&f, cx))
        .unwrap_or(DEFAULT_RESOLVE_CACHE_SIZE);
    let on_unreachable = sec
        .field("on_unreachable")
        .and_then(|f| {
            choice(
                &f,
                &[
                    ("reject", OnIdentityError::Reject),
                    ("token", OnIdentityError::Token),
                ],
                cx,
            )
        })
        .unwrap_or(DEFAULT_RESOLVE_ON_UNREACHABLE);
    let lookup_reserve = sec
        .field("lookup_reserve")
        .and_then(|f| non_zero_u32(&f, cx));
    Some(ResolveConfig {
        url: url?,
        user_field: user_field?,
        ttl,
        negative_ttl,
        timeout,
        cache_size,
        on_unreachable,
        lookup_reserve,
    })
}

/// `identity.url`: asked with each caller's own credential, so it carries none of its own.
fn resolve_url(f: &Field, cx: &mut Ctx) -> Option<http::Uri> {
    let text = string(f, "a URL like \"https://cliq.zoho.com/api/v2/me\"", cx)?;
    match parse_resolve_url(text) {
        Ok(uri) => Some(uri),
        Err(why) => {
            // Whatever sits before an '@' may be a password: never quote such a URL.
            let why = if text.contains('@') {
                format!("not a usable identity endpoint: {why}")
            } else {
                format!("{text:?} is not a usable identity endpoint: {why}")
            };
            cx.error(f.line(), &f.key, why);
            None
        }
    }
}

fn parse_resolve_url(text: &str) -> Result<http::Uri, String> {
    // http::Uri silently drops a fragment; refuse it before parsing.
    if text.contains('#') {
        return Err("a fragment (#...) is not allowed".into());
    }
    let uri = text
        .parse::<http::Uri>()
        .map_err(|e| format!("not a URL ({e})"))?;
    match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "scheme {other:?} is not supported; use https:// (or http:// for tests)"
            ))
        }
        None => {
            return Err("it must be an absolute URL with a scheme and a host, e.g. \
                        \"https://cliq.zoho.com/api/v2/me\""
                .into())
        }
    }
    let authority = uri.authority().ok_or("it needs a host")?;
    if authority.as_str().contains('@') {
        return Err(
            "credentials (user@) are not allowed; each lookup carries the caller's own token"
                .into(),
        );
    }
    if authority.host().is_empty() {
        return Err("it needs a host".into());
    }
    check_port(authority)?;
    Ok(uri)
}

/// `identity.user_field`: a JSON pointer (RFC 6901), checked the way the lookup will read it.
fn json_pointer(f: &Field, cx: &mut Ctx) -> Option<String> {
    let Some(text) = f.node.data.as_str() else {
        let why = format!(
            "expected a JSON pointer like \"/data/zuid\", found {}",
            kind_of(f.node)
        );
        cx.error(f.line(), &f.key, why);
        return None;
    };
    match check_json_pointer(text) {
        Ok(()) => Some(text.to_string()),
        Err(why) => {
            cx.error(f.line(), &f.key, why);
            None
        }
    }
}

/// RFC 6901: empty (the whole answer), or `/`-separated names in which `~` appears only as `~0`
/// (a `~`) or `~1` (a `/`).
fn check_json_pointer(p: &str) -> Result<(), String> {
    if !p.is_empty() && !p.starts_with('/') {
        let hint = format!("/{}", p.trim_start_matches(['.', '$']).replace('.', "/"));
        return Err(format!(
            "{p:?} is not a JSON pointer (RFC 6901): it must start with '/', e.g. {hint:?}"
        ));
    }
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "{p:?} is not a JSON pointer (RFC 6901): '~' may only appear as \"~0\" (a \
                 literal '~') or \"~1\" (a '/' inside a name)"
            ));
        }
    }
    Ok(())
}

/// `store`, and the memory store's `state_file`.
fn read_store(top: &Section, cx: &mut Ctx) -> (StoreConfig, Option<PathBuf>) {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Memory,
        Redis,
    }
    let Some(sec) = top.child("store", &STORE, cx) else {
        return (StoreConfig::Memory, None);
    };
    let kinds = [("memory", Kind::Memory), ("redis", Kind::Redis)];
    let kind_field = sec.field("kind");
    let state_file_field = sec.field("state_file");
    match kind_field.as_ref().map(|f| choice(f, &kinds, cx)) {
        None | Some(Some(Kind::Memory)) => {
            let why = match kind_field {
                Some(_) => "only used with `kind: redis` (this store is memory)",
                None => "only used with `kind: redis` (`kind` is not set, so the store is memory)",
            };
            for name in REDIS_KEYS {
                if let Some(f) = sec.field(name) {
                    cx.error(f.line(), &f.key, why);
                }
            }
            let state_file = state_file_field.and_then(|f| state_file(&f, cx));
            (StoreConfig::Memory, state_file)
        }
        Some(Some(Kind::Redis)) => {
            if let Some(f) = state_file_field {
                cx.error(f.line(), &f.key, STATE_FILE_UNDER_REDIS);
            }
            let store = read_redis(&sec, true, cx).map_or(StoreConfig::Memory, StoreConfig::Redis);
            (store, None)
        }
        // A bad `kind` (reported): still check the values that are there, all errors at once.
        Some(None) => {
            let _ = read_redis(&sec, false, cx);
            let _ = state_file_field.and_then(|f| state_file(&f, cx));
            (StoreConfig::Memory, None)
        }
    }
}

const STATE_FILE_UNDER_REDIS: &str = "only used with `kind: memory`: the Redis store keeps its \
                                      state in Redis, so a restart forgets nothing without a file";

/// `store.state_file`: cliqgate creates and rewrites the file, so its directory must exist now
/// (a typo fails `cliqgate check`, not the first write at shutdown).
fn state_file(f: &Field, cx: &mut Ctx) -> Option<PathBuf> {
    let text = string(f, "a file path like \"/var/lib/cliqgate/state.json\"", cx)?;
    let path = config_path(text, cx);
    if text.ends_with('/') || path.is_dir() {
        let why = format!(
            "{} is a directory; name a file in it, e.g. \"{}\"",
            path.display(),
            path.join("state.json").display()
        );
        cx.error(f.line(), &f.key, why);
        return None;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        let why = format!(
            "no such directory: {} (cliqgate creates the state file, not its directory)",
            dir.display()
        );
        cx.error(f.line(), &f.key, why);
        return None;
    }
    Some(path)
}

const REDIS_URL_NEEDED: &str = "`kind: redis` needs `url`, e.g. \"redis://127.0.0.1:6379/0\" \
                                (rediss:// for TLS)";

/// The `kind: redis` keys. `require_url`: report a missing `url` (not when `kind` itself is bad).
fn read_redis(sec: &Section, require_url: bool, cx: &mut Ctx) -> Option<RedisStoreConfig> {
    let url = match sec.field("url") {
        Some(f) => redis_url(&f, cx),
        None => {
            if require_url {
                sec.missing("url", REDIS_URL_NEEDED, cx);
            }
            None
        }
    };
    let on_error = sec
        .field("on_error")
        .and_then(|f| {
            choice(
                &f,
                &[
                    ("reject", OnStoreError::Reject),
                    ("local", OnStoreError::Local),
                ],
                cx,
            )
        })
        .unwrap_or(DEFAULT_REDIS_ON_ERROR);
    let replicas = sec
        .field("replicas")
        .and_then(|f| non_zero_u32(&f, cx))
        .or(NonZeroU32::new(DEFAULT_REDIS_REPLICAS));
    let mut positive_duration = |name: &str, default: Duration| {
        sec.field(name)
            .and_then(|f| duration(&f, false, cx))
            .unwrap_or(default)
    };
    let timeout = positive_duration("timeout", DEFAULT_REDIS_TIMEOUT);
    let connect_timeout = positive_duration("connect_timeout", DEFAULT_REDIS_CONNECT_TIMEOUT);
    Some(RedisStoreConfig {
        url: url?,
        on_error,
        replicas: replicas?,
        timeout,
        connect_timeout,
    })
}

/// `store.url`. It may hold a password: no message here ever quotes the URL or its user-info,
/// only the pieces that cannot be secret (scheme, host, port, database).
fn redis_url(f: &Field, cx: &mut Ctx) -> Option<String> {
    let text = match &f.node.data {
        YamlDataOwned::Value(ScalarOwned::String(s)) => s.as_str(),
        other => {
            let found = match other {
                YamlDataOwned::Value(ScalarOwned::Null) => "an empty value",
                YamlDataOwned::Value(ScalarOwned::Boolean(_)) => "a boolean",
                YamlDataOwned::Value(ScalarOwned::Integer(_) | ScalarOwned::FloatingPoint(_)) => {
                    "a number"
                }
                YamlDataOwned::Sequence(_) => "a list",
                YamlDataOwned::Mapping(_) => "a mapping",
                _ => "a value that is not a plain string (YAML tags are not supported)",
            };
            let why =
                format!("expected a Redis URL like \"redis://127.0.0.1:6379/0\", found {found}");
            cx.error(f.line(), &f.key, why);
            return None;
        }
    };
    match check_redis_url(text) {
        Ok(()) => Some(text.to_string()),
        Err(why) => {
            cx.error(f.line(), &f.key, format!("not a usable Redis URL: {why}"));
            None
        }
    }
}

const REDIS_URL_HELP: &str = "write redis://[user:password@]host[:port][/db], e.g. \
                              \"redis://127.0.0.1:6379/0\" (rediss:// for TLS)";

/// Checks the shape `redis[s]://[user:password@]host[:port][/db]`, then asks the redis client
/// itself, so a URL that passes `cliqgate check` is one the store can dial. The `Err` text never
/// holds anything from the user-info.
fn check_redis_url(text: &str) -> Result<(), String> {
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(format!("it needs a scheme; {REDIS_URL_HELP}"));
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "redis" && scheme != "rediss" {
        let printable = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        return Err(if printable {
            format!("scheme {scheme:?} is not supported; use redis:// or rediss:// (TLS)")
        } else {
            format!("it needs a scheme; {REDIS_URL_HELP}")
        });
    }
    // Everything up to the last '@' is user-info, as the URL parser reads it.
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    if userinfo.is_some_and(|u| u.contains(['/', '?', '#'])) {
        return Err(
            "the user or password holds a '/', '?' or '#', which ends the host part of a \
                    URL; percent-encode them (%2F, %3F, %23)"
                .into(),
        );
    }
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (host_port, tail) = after.split_at(end);
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    let (path, extra) = tail.split_at(path_end);
    if !extra.is_empty() {
        return Err(
            "query parameters and fragments (?... or #...) are not supported; \
                    write redis[s]://[user:password@]host[:port][/db]"
                .into(),
        );
    }
    check_redis_host_port(host_port)?;
    let db = path.strip_prefix('/').unwrap_or(path);
    if !db.is_empty() && (!db.bytes().all(|b| b.is_ascii_digit()) || db.parse::<i64>().is_err()) {
        return Err(format!(
            "the database {db:?} is not a database number; write a whole number, 0 or more, \
             after the host, e.g. \"redis://127.0.0.1:6379/0\" (no /db: database 0)"
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(text)
        .map(|_| ())
        .map_err(|e| {
            let message = e.to_string();
            let secret = userinfo.map(|u| u.split_once(':').map_or(u, |(_, password)| password));
            match secret {
                Some(secret) if !secret.is_empty() && message.contains(secret) => {
                    "the Redis client refuses it".to_string()
                }
                _ => format!("the Redis client refuses it: {message}"),
            }
        })
}

/// `host[:port]` of a Redis URL: a host name, an IPv4 address or a bracketed IPv6 address, and
/// a port 1-65535. A wildcard (listen) address cannot be dialled.
fn check_redis_host_port(host_port: &str) -> Result<(), String> {
    if host_port.is_empty() {
        return Err(format!("it needs a host; {REDIS_URL_HELP}"));
    }
    let port = if host_port.starts_with('[') {
        let Some(close) = host_port.find(']') else {
            return Err(format!(
                "{host_port:?}: the IPv6 address has no closing ']'"
            ));
        };
        let (host, after) = host_port.split_at(close + 1);
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(format!("{host_port:?}: expected :port after ']'")),
            },
        };
        let ip = host[1..host.len() - 1].parse::<std::net::Ipv6Addr>();
        match ip {
            Ok(ip) if ip.is_unspecified() => return Err(wildcard_host(host)),
            Ok(_) => {}
            Err(_) => return Err(format!("host {host:?} is not an IPv6 address")),
        }
        port
    } else {
        let (host, port) = match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        };
        if host.is_empty() {
            return Err(format!("it needs a host; {REDIS_URL_HELP}"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(format!(
                "host {host:?} is not a host name or IP address (IPv6 goes in brackets: [::1])"
            ));
        }
        if host == "0.0.0.0" {
            return Err(wildcard_host(host));
        }
        port
    };
    match port {
        None => Ok(()),
        Some(port) => match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
            _ => Err(format!("port {port:?} is not a port number (1-65535)")),
        },
    }
}

fn wildcard_host(host: &str) -> String {
    format!("host {host} is a wildcard (listen) address; give the Redis server's address")
}

fn read_timeouts(top: &Section, cx: &mut Ctx) -> Timeouts {
    let sec = top.child("timeouts", &TIMEOUTS, cx);
    let mut get = |name: &str, default: Duration| {
        sec.as_ref()
            .and_then(|s| s.field(name))
            .and_then(|f| duration(&f, false, cx))
            .unwrap_or(default)
    };
    Timeouts {
        connect: get("connect", DEFAULT_CONNECT_TIMEOUT),
        response: get("response", DEFAULT_RESPONSE_TIMEOUT),
        client_header: get("client_header", DEFAULT_CLIENT_HEADER_TIMEOUT),
        client_body: get("client_body", DEFAULT_CLIENT_BODY_TIMEOUT),
        shutdown: get("shutdown", DEFAULT_SHUTDOWN_TIMEOUT),
    }
}

/// Below this a request head with a long OAuth token and a few ordinary headers does not fit.
const MIN_HEADER_BYTES: u64 = 1024;

fn read_http(top: &Section, cx: &mut Ctx) -> HttpLimits {
    let sec = top.child("http", &HTTP, cx);
    let field = |name: &str| sec.as_ref().and_then(|s| s.field(name));
    let max_header_bytes = field("max_header_bytes")
        .and_then(|f| {
            let n = byte_size(&f, cx)?;
            if n < MIN_HEADER_BYTES {
                cx.error(
                    f.line(),
                    &f.key,
                    format!("must be at least {MIN_HEADER_BYTES} bytes, found {n}"),
                );
                return None;
            }
            usize::try_from(n).ok()
        })
        .unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    let max_body_bytes = field("max_body_bytes")
        .and_then(|f| byte_size(&f, cx))
        .unwrap_or(DEFAULT_MAX_BODY_BYTES);
    HttpLimits {
        max_header_bytes,
        max_body_bytes,
    }
}

fn read_queue(top: &Section, cx: &mut Ctx) -> QueueLimits {
    let sec = top.child("queue", &QUEUE, cx);
    let field = |name: &str| sec.as_ref().and_then(|s| s.field(name));
    let per_user_field = field("max_per_user");
    let max_per_user = per_user_field
        .as_ref()
        .and_then(|f| positive::<usize>(f, cx));
    let max_total = field("max_total").and_then(|f| positive::<usize>(&f, cx));
    let limits = QueueLimits {
        max_per_user: max_per_user.unwrap_or(DEFAULT_QUEUE_MAX_PER_USER),
        max_total: max_total.unwrap_or(DEFAULT_QUEUE_MAX_TOTAL),
    };
    if limits.max_per_user > limits.max_total && max_per_user.is_some() {
        if let Some(f) = per_user_field {
            cx.error(
                f.line(),
                &f.key,
                format!(
                    "{} is more than queue.max_total ({})",
                    limits.max_per_user, limits.max_total
                ),
            );
        }
    }
    limits
}

fn read_log(top: &Section, cx: &mut Ctx) -> LogConfig {
    let sec = top.child("log", &LOG, cx);
    let field = |name: &str| sec.as_ref().and_then(|s| s.field(name));
    let format = field("format")
        .and_then(|f| {
            choice(
                &f,
                &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
                cx,
            )
        })
        .unwrap_or(DEFAULT_LOG_FORMAT);
    let level = field("level")
        .and_then(|f| {
            let text = string(
                &f,
                "a log filter like \"info\" or \"cliqgate=debug,info\"",
                cx,
            )?;
            check_log_filter(text)
                .map_err(|e| cx.error(f.line(), &f.key, e))
                .ok()?;
            Some(text.to_string())
        })
        .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
    LogConfig { format, level }
}

/// Checked here so a typo fails `cliqgate check` instead of start-up. tracing's syntax takes a
/// bare word as a target name (`verbose` = "target verbose at trace"), which is almost always a
/// misspelt level, so bare words must be level names.
fn check_log_filter(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare_word = !directive.contains(['=', '[', ':']);
        if bare_word && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level ({}); for a target write \"{directive}=debug\"",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map(|_| ())
        .map_err(|e| format!("{text:?} is not a log filter: {e}"))
}

// ---- Operations: admin API, reload ----

/// `admin`. Nothing found here is ever quoted in a message (not a value, not an unknown key): a
/// token written in the wrong place must not end up in a log or a CI transcript.
fn read_admin(top: &Section, cx: &mut Ctx) -> AdminConfig {
    let Some(node) = top.field("admin").map(|f| f.node) else {
        return AdminConfig::default();
    };
    let map = match &node.data {
        YamlDataOwned::Value(ScalarOwned::Null) => return AdminConfig::default(),
        YamlDataOwned::Mapping(map) => map,
        _ => {
            let why = format!(
                "expected a mapping like `admin: {{token: \"...\"}}`, found {} (not quoted: it may \
                 be a secret)",
                type_of(node)
            );
            cx.error(line_of(node), "admin", why);
            return AdminConfig::default();
        }
    };
    let mut token = None;
    for (k, v) in map {
        if k.data.as_str() == Some("token") {
            let f = Field {
                key: "admin.token".to_string(),
                node: v,
            };
            token = admin_token(&f, cx);
        } else {
            let why = format!(
                "unknown key (not quoted: it may be a secret written in the wrong place); allowed \
                 here: {}",
                ADMIN.allowed.join(", ")
            );
            cx.error(line_of(k), "admin", why);
        }
    }
    AdminConfig { token }
}

const ADMIN_TOKEN_WHY: &str = "it guards the admin API (/admin/limits, /admin/config): use a \
                               long random value, e.g. the output of `openssl rand -hex 32`";

/// `admin.token`: checked without ever quoting it.
fn admin_token(f: &Field, cx: &mut Ctx) -> Option<String> {
    let YamlDataOwned::Value(ScalarOwned::String(token)) = &f.node.data else {
        let why = format!(
            "expected a string, found {} (not quoted: it may be a secret); write the token in \
             quotes; {ADMIN_TOKEN_WHY}",
            type_of(f.node)
        );
        cx.error(f.line(), &f.key, why);
        return None;
    };
    let why = if token.is_empty() {
        format!("must not be empty; {ADMIN_TOKEN_WHY}")
    } else if !token.chars().all(|c| c.is_ascii_graphic()) {
        format!(
            "may hold only printable ASCII characters, no spaces: callers send it as \
             `Authorization: Bearer <token>`; {ADMIN_TOKEN_WHY}"
        )
    } else if token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
        format!("is shorter than {MIN_ADMIN_TOKEN_CHARS} characters; {ADMIN_TOKEN_WHY}")
    } else {
        return Some(token.clone());
    };
    cx.error(f.line(), &f.key, why);
    None
}

/// What kind of value a node holds, never the value itself (for secrets).
fn type_of(node: &MarkedYamlOwned) -> &'static str {
    match &node.data {
        YamlDataOwned::Value(ScalarOwned::Null) => "an empty value",
        YamlDataOwned::Value(ScalarOwned::Boolean(_)) => "a boolean",
        YamlDataOwned::Value(ScalarOwned::Integer(_) | ScalarOwned::FloatingPoint(_)) => "a number",
        YamlDataOwned::Value(ScalarOwned::String(_)) => "a string",
        YamlDataOwned::Sequence(_) => "a list",
        YamlDataOwned::Mapping(_) => "a mapping",
        _ => "a value that is not a plain string (YAML tags are not supported)",
    }
}

fn read_reload(top: &Section, cx: &mut Ctx) -> ReloadConfig {
    let sec = top.child("reload", &RELOAD, cx);
    let watch = sec
        .as_ref()
        .and_then(|s| s.field("watch"))
        .and_then(|f| boolean(&f, cx))
        .unwrap_or(DEFAULT_RELOAD_WATCH);
    ReloadConfig { watch }
}

fn boolean(f: &Field, cx: &mut Ctx) -> Option<bool> {
    match &f.node.data {
        YamlDataOwned::Value(ScalarOwned::Boolean(b)) => Some(*b),
        _ => {
            let why = format!("expected true or false, found {}", kind_of(f.node));
            cx.error(f.line(), &f.key, why);
            None
        }
    }
}

// ---- Routes ----

/// A value and where it was written, so errors about a merged route can point at `defaults`.
#[derive(Clone)]
struct Spotted<T> {
    value: T,
    line: usize,
    key: String,
}

#[derive(Clone, Copy, PartialEq)]
enum AlgorithmKind {
    Window,
    Gcra,
}

/// The route fields that `defaults` may also hold; a route's own value wins.
#[derive(Clone, Default)]
struct RouteFields {
    /// `Some(None)`: `method: "*"`, every method (overrides a method from `defaults`).
    method: Option<Spotted<Option<Method>>>,
    limit: Option<Spotted<NonZeroU32>>,
    per: Option<Spotted<Duration>>,
    lock: Option<Spotted<Duration>>,
    on_limit: Option<Spotted<OnLimit>>,
    max_wait: Option<Spotted<Duration>>,
    algorithm: Option<Spotted<AlgorithmKind>>,
    burst: Option<Spotted<NonZeroU32>>,
    mode: Option<Spotted<RouteMode>>,
    /// Keys present in the file, valid or not: a bad value is reported once, not also as missing.
    written: Vec<&'static str>,
}

impl RouteFields {
    fn read(sec: &Section, cx: &mut Ctx) -> RouteFields {
        fn spot<T>(f: Field, read: impl FnOnce(&Field) -> Option<T>) -> Option<Spotted<T>> {
            let value = read(&f)?;
            Some(Spotted {
                value,
                line: f.line(),
                key: f.key,
            })
        }
        let on_limit = [("queue", OnLimit::Queue), ("reject", OnLimit::Reject)];
        let algorithms = [
            ("window", AlgorithmKind::Window),
            ("gcra", AlgorithmKind::Gcra),
        ];
        let modes = [
            ("enforce", RouteMode::Enforce),
            ("shadow", RouteMode::Shadow),
        ];
        RouteFields {
            method: sec.field("method").and_then(|f| spot(f, |f| method(f, cx))),
            limit: sec
                .field("limit")
                .and_then(|f| spot(f, |f| non_zero_u32(f, cx))),
            per: sec
                .field("per")
                .and_then(|f| spot(f, |f| duration(f, false, cx))),
            lock: sec
                .field("lock")
                .and_then(|f| spot(f, |f| duration(f, false, cx))),
            on_limit: sec
                .field("on_limit")
                .and_then(|f| spot(f, |f| choice(f, &on_limit, cx))),
            max_wait: sec
                .field("max_wait")
                .and_then(|f| spot(f, |f| duration(f, true, cx))),
            algorithm: sec
                .field("algorithm")
                .and_then(|f| spot(f, |f| choice(f, &algorithms, cx))),
            burst: sec
                .field("burst")
                .and_then(|f| spot(f, |f| non_zero_u32(f, cx))),
            mode: sec
                .field("mode")
                .and_then(|f| spot(f, |f| choice(f, &modes, cx))),
            written: ROUTE_FIELDS
                .iter()
                .copied()
                .filter(|k| sec.field(k).is_some())
                .collect(),
        }
    }

    /// Fills what the route left out from `defaults`.
    fn or(self, defaults: &RouteFields) -> RouteFields {
        RouteFields {
            method: self.method.or_else(|| defaults.method.clone()),
            limit: self.limit.or_else(|| defaults.limit.clone()),
            per: self.per.or_else(|| defaults.per.clone()),
            lock: self.lock.or_else(|| defaults.lock.clone()),
            on_limit: self.on_limit.or_else(|| defaults.on_limit.clone()),
            max_wait: self.max_wait.or_else(|| defaults.max_wait.clone()),
            algorithm: self.algorithm.or_else(|| defaults.algorithm.clone()),
            burst: self.burst.or_else(|| defaults.burst.clone()),
            mode: self.mode.or_else(|| defaults.mode.clone()),
            written: [self.written, defaults.written.clone()].concat(),
        }
    }
}

/// `method`: a standard method in any case, or `"*"` for all of them.
fn method(f: &Field, cx: &mut Ctx) -> Option<Option<Method>> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
    ];
    let text = string(f, "an HTTP method like \"POST\"", cx)?;
    if text == "*" {
        return Some(None);
    }
    let upper = text.to_ascii_uppercase();
    if !STANDARD.contains(&upper.as_str()) {
        cx.error(
            f.line(),
            &f.key,
            format!(
                "unknown method {text:?}; allowed: {} (or \"*\" for every method)",
                STANDARD.join(", ")
            ),
        );
        return None;
    }
    Method::from_bytes(upper.as_bytes()).ok().map(Some)
}

fn read_routes(top: &Section, cx: &mut Ctx) -> Vec<RouteConfig> {
    let defaults = top
        .child("defaults", &DEFAULTS, cx)
        .map(|sec| RouteFields::read(&sec, cx))
        .unwrap_or_default();
    let Some(f) = top.field("routes") else {
        return Vec::new();
    };
    let items: &[MarkedYamlOwned] = match &f.node.data {
        YamlDataOwned::Sequence(items) => items,
        YamlDataOwned::Value(ScalarOwned::Null) => &[],
        _ => {
            cx.error(
                f.line(),
                &f.key,
                format!("expected a list of routes, found {}", kind_of(f.node)),
            );
            return Vec::new();
        }
    };
    let mut names: Vec<(String, usize, usize)> = Vec::new(); // name, index, line
    let mut built = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let path = format!("routes[{index}]");
        let Some(sec) = Section::open(Some(item), path, line_of(item), &ROUTE, cx) else {
            continue;
        };
        let name = route_name(&sec, &mut names, index, cx);
        let paths = route_paths(&sec, cx);
        let fields = RouteFields::read(&sec, cx).or(&defaults);
        if let Some(route) = build_route(&sec, name, paths, fields, cx) {
            built.push(route);
        }
    }
    report_shadowed_paths(&built, cx);
    built.into_iter().map(|b| b.route).collect()
}

/// `name`: required, unique (it is the metric label and the admin API's key).
fn route_name(
    sec: &Section,
    seen: &mut Vec<(String, usize, usize)>,
    index: usize,
    cx: &mut Ctx,
) -> Option<String> {
    let Some(f) = sec.field("name") else {
        sec.missing(
            "name",
            "every route needs a unique `name` (it labels the route's metrics)",
            cx,
        );
        return None;
    };
    let name = string(&f, "a route name like \"chats.post_message\"", cx)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        cx.error(
            f.line(),
            &f.key,
            format!("{name:?}: use only letters, digits, '_', '.' and '-' (it is a metric label)"),
        );
        return None;
    }
    if let Some((_, first, line)) = seen.iter().find(|(seen_name, _, _)| seen_name == name) {
        cx.error(
            f.line(),
            &f.key,
            format!(
                "duplicate route name {name:?}: already used by routes[{first}] at line {line}"
            ),
        );
        return None;
    }
    seen.push((name.to_string(), index, f.line()));
    Some(name.to_string())
}

/// `path`: one template or a non-empty list of templates sharing one quota.
fn route_paths(sec: &Section, cx: &mut Ctx) -> Option<Vec<Spotted<String>>> {
    let Some(f) = sec.field("path") else {
        sec.missing(
            "path",
            "every route needs a `path` template (or a list of them)",
            cx,
        );
        return None;
    };
    let fields: Vec<Field> = match &f.node.data {
        YamlDataOwned::Sequence(items) if items.is_empty() => {
            cx.error(
                f.line(),
                &f.key,
                "the list is empty; give at least one path template",
            );
            return None;
        }
        YamlDataOwned::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, node)| Field {
                key: format!("{}[{i}]", f.key),
                node,
            })
            .collect(),
        _ => vec![Field {
            key: f.key.clone(),
            node: f.node,
        }],
    };
    let mut paths: Vec<Spotted<String>> = Vec::new();
    let mut ok = true;
    for item in fields {
        match template(&item, cx) {
            Some(t) if paths.iter().any(|p| p.value == t) => {
                cx.error(item.line(), &item.key, format!("{t:?} is listed twice"));
                ok = false;
            }
            Some(value) => paths.push(Spotted {
                value,
                line: item.line(),
                key: item.key,
            }),
            None => ok = false,
        }
    }
    ok.then_some(paths)
}

fn template(f: &Field, cx: &mut Ctx) -> Option<String> {
    let text = string(
        f,
        "a path template like \"/api/v3/chats/{chat_id}/message\"",
        cx,
    )?;
    match crate::route::validate_template(text) {
        Ok(()) => Some(text.to_string()),
        Err(e) => {
            cx.error(f.line(), &f.key, e);
            None
        }
    }
}

/// Checks the merged fields of one route and builds it. `None` when anything is missing or wrong
/// (already reported).
fn build_route(
    sec: &Section,
    name: Option<String>,
    paths: Option<Vec<Spotted<String>>>,
    fields: RouteFields,
    cx: &mut Ctx,
) -> Option<Built> {
    for (key, what) in [
        ("limit", "the calls allowed per `per`"),
        ("per", "the window the limit counts over"),
        ("lock", "Zoho's lock period for the endpoint"),
    ] {
        if !fields.written.contains(&key) {
            let why =
                format!("every route needs `{key}`, {what} (on the route or under `defaults`)");
            sec.missing(key, &why, cx);
        }
    }
    let on_limit = fields
        .on_limit
        .as_ref()
        .map_or(DEFAULT_ON_LIMIT, |s| s.value);
    check_max_wait(sec, &fields, on_limit, cx);
    let algorithm = route_algorithm(sec, &fields, cx);
    let validate = route_validate(sec, &fields, cx);
    let paths = paths?;
    let route = RouteConfig {
        name: name?,
        method: fields.method.and_then(|m| m.value),
        paths: paths.iter().map(|p| p.value.clone()).collect(),
        limit: fields.limit?.value,
        per: fields.per?.value,
        lock: fields.lock?.value,
        on_limit,
        max_wait: fields.max_wait.map_or(DEFAULT_MAX_WAIT, |s| s.value),
        algorithm: algorithm?,
        mode: fields.mode.map_or(DEFAULT_ROUTE_MODE, |s| s.value),
        validate,
        line: sec.line,
    };
    Some(Built { route, paths })
}

/// A route that passed every check, with where each of its paths was written.
struct Built {
    route: RouteConfig,
    paths: Vec<Spotted<String>>,
}

/// `max_wait` written on a route that rejects at once is a misunderstanding worth flagging; one
/// inherited from `defaults` is not (defaults serve many routes).
fn check_max_wait(sec: &Section, fields: &RouteFields, on_limit: OnLimit, cx: &mut Ctx) {
    if let Some(max_wait) = &fields.max_wait {
        if on_limit == OnLimit::Reject && max_wait.key == sec.key("max_wait") {
            cx.error(
                max_wait.line,
                &max_wait.key,
                "only used with `on_limit: queue` (this route rejects at once)",
            );
        }
    }
}

/// `algorithm` and `burst`: gcra needs a burst of 1..=limit; window takes none.
fn route_algorithm(sec: &Section, fields: &RouteFields, cx: &mut Ctx) -> Option<Algorithm> {
    let kind = fields
        .algorithm
        .as_ref()
        .map_or(AlgorithmKind::Window, |s| s.value);
    let own_burst = fields.burst.as_ref().filter(|b| b.key == sec.key("burst"));
    match (kind, &fields.burst) {
        (AlgorithmKind::Window, _) => {
            if let Some(burst) = own_burst {
                cx.error(
                    burst.line,
                    &burst.key,
                    "only used with `algorithm: gcra` (this route uses window)",
                );
                return None;
            }
            Some(Algorithm::Window)
        }
        (AlgorithmKind::Gcra, None) if fields.written.contains(&"burst") => None,
        (AlgorithmKind::Gcra, None) => {
            sec.missing(
                "burst",
                "`algorithm: gcra` needs `burst`, the calls allowed at once (1..=limit)",
                cx,
            );
            None
        }
        (AlgorithmKind::Gcra, Some(burst)) => {
            let limit = fields.limit.as_ref()?.value;
            if burst.value > limit {
                let (line, key, origin) = if own_burst.is_some() {
                    (burst.line, burst.key.clone(), String::new())
                } else {
                    (
                        sec.line,
                        sec.key("burst"),
                        format!(" (from {}, line {})", burst.key, burst.line),
                    )
                };
                cx.error(
                    line,
                    &key,
                    format!(
                        "burst {}{origin} must be at most limit {limit}",
                        burst.value
                    ),
                );
                return None;
            }
            Some(Algorithm::Gcra { burst: burst.value })
        }
    }
}

/// `validate`: a rule set by name, or `none`. A rule set describes one endpoint, so the route must
/// take that endpoint's method only: a call of another method would be judged by rules that are
/// not its own (and refused when Zoho would serve it).
fn route_validate(sec: &Section, fields: &RouteFields, cx: &mut Ctx) -> Option<&'static RuleSet> {
    let f = sec.field("validate")?;
    let mut options: Vec<(&str, Option<&'static RuleSet>)> =
        RULE_SETS.iter().map(|set| (set.name, Some(*set))).collect();
    options.push((NO_VALIDATION, None));
    let rules = choice(&f, &options, cx).flatten()?;
    let method = fields.method.as_ref().and_then(|m| m.value.as_ref());
    if method != Some(&rules.method) {
        let takes = match method {
            Some(method) => format!("takes {method}"),
            None => "takes every method".to_string(),
        };
        let why = format!(
            "{} checks {} {} calls, but this route {takes}; set `method: {}` on the route",
            rules.name, rules.method, rules.endpoint, rules.method
        );
        cx.error(f.line(), &f.key, why);
        return None;
    }
    Some(rules)
}

/// The router takes the first route whose method and path match, so a path that an earlier route
/// fully covers can never match: its limit would silently never apply.
fn report_shadowed_paths(routes: &[Built], cx: &mut Ctx) {
    for (j, later) in routes.iter().enumerate() {
        for path in &later.paths {
            let earlier = routes[..j].iter().map(|b| &b.route).find(|r| {
                method_covers(r.method.as_ref(), later.route.method.as_ref())
                    && r.paths.iter().any(|p| template_covers(p, &path.value))
            });
            if let Some(r) = earlier {
                cx.error(
                    path.line,
                    &path.key,
                    format!(
                        "{:?} can never match: route {:?} (line {}) comes first and matches \
                         every such request; move the more specific route up",
                        path.value, r.name, r.line
                    ),
                );
            }
        }
    }
}

fn method_covers(earlier: Option<&Method>, later: Option<&Method>) -> bool {
    match (earlier, later) {
        (None, _) => true,
        (Some(a), Some(b)) => a == b,
        (Some(_), None) => false,
    }
}

/// True if every path `later` matches is also matched by `earlier`, by the router's rules
/// (src/route.rs): `{x}` is any one segment, empty segments are skipped, literals ignore case.
fn template_covers(earlier: &str, later: &str) -> bool {
    let is_param = |s: &str| s.starts_with('{');
    let a: Vec<&str> = earlier.split('/').filter(|s| !s.is_empty()).collect();
    let b: Vec<&str> = later.split('/').filter(|s| !s.is_empty()).collect();
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(x, y)| is_param(x) || (!is_param(y) && x.eq_ignore_ascii_case(y)))
}

// ---- The route table for `cliqgate check` ----

impl Config {
    /// Human-readable summary for `cliqgate check`: a header line (upstream, identity, store, ...)
    /// then one line per route, in match order.
    pub fn describe(&self) -> String {
        let identity = match &self.identity {
            IdentityConfig::Token => "token".to_string(),
            IdentityConfig::Header { name, trusted } => {
                let trusted: Vec<String> = trusted.iter().map(ToString::to_string).collect();
                format!("header {name} from {}", trusted.join(", "))
            }
            IdentityConfig::Resolve(r) => {
                let split = self.lookup_split().map_or(String::new(), |s| {
                    format!(
                        ", lookups {} of {} a window",
                        s.lookups,
                        s.lookups.get() + s.own.get()
                    )
                });
                format!("resolve {} (ttl {}{split})", r.url, format_duration(r.ttl))
            }
        };
        let store = match (&self.store, &self.state_file) {
            (StoreConfig::Memory, None) => "memory".to_string(),
            (StoreConfig::Memory, Some(path)) => format!("memory (state file {})", path.display()),
            (StoreConfig::Redis(redis), _) => {
                let on_error = match redis.on_error {
                    OnStoreError::Reject => "reject",
                    OnStoreError::Local => "local",
                };
                format!(
                    "redis {} (on_error {on_error}, replicas {})",
                    redis.redacted_url(),
                    redis.replicas
                )
            }
        };
        let unmatched = match self.unmatched {
            Unmatched::Forward => "forward",
            Unmatched::Reject => "reject",
        };
        let mut settings = vec![
            (
                "upstream",
                format!("{}://{}", self.upstream.scheme, self.upstream.authority),
            ),
            ("identity", identity),
            ("store", store),
            ("safety_margin", format_duration(self.safety_margin)),
            ("unmatched", unmatched.to_string()),
            ("listen", self.listen.to_string()),
            ("admin", self.admin_listen.to_string()),
        ];
        // Whether a token is set, never the token.
        if self.admin.token.is_some() {
            settings.push(("admin", "token set".to_string()));
        }
        if self.reload.watch {
            settings.push(("reload", "on SIGHUP and file change".to_string()));
        }
        let settings: Vec<String> = settings.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let mut out = settings.join("  ") + "\n";
        let header = [
            "ROUTE",
            "METHOD",
            "LIMIT",
            "LOCK",
            "WINDOW",
            "ON_LIMIT",
            "ALGORITHM",
            "MODE",
            "VALIDATE",
            "PATHS",
        ];
        let mut rows = vec![header.map(String::from).to_vec()];
        rows.extend(self.routes.iter().map(|r| self.route_row(r)));
        out.push_str(&align(&rows));
        if self.routes.is_empty() {
            out.push_str("(no routes: every call is unmatched)\n");
        }
        out
    }

    fn route_row(&self, r: &RouteConfig) -> Vec<String> {
        let on_limit = match r.on_limit {
            OnLimit::Queue => format!("queue max_wait {}", format_duration(r.max_wait)),
            OnLimit::Reject => "reject".to_string(),
        };
        let algorithm = match r.algorithm {
            Algorithm::Window => "window".to_string(),
            Algorithm::Gcra { burst } => format!("gcra burst {burst}"),
        };
        vec![
            r.name.clone(),
            r.method.as_ref().map_or("*", Method::as_str).to_string(),
            format!("{}/{}", r.limit, format_duration(r.per)),
            format_duration(r.lock),
            format_duration(r.per + self.safety_margin),
            on_limit,
            algorithm,
            match r.mode {
                RouteMode::Enforce => "enforce",
                RouteMode::Shadow => "shadow",
            }
            .to_string(),
            r.validate.map_or(NO_VALIDATION, |set| set.name).to_string(),
            r.paths.join(" "),
        ]
    }
}

/// Pads every column but the last to its widest cell.
fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = "upstream: \"http://127.0.0.1:1\"\n";

    fn parse(extra: &str) -> Config {
        match Config::from_yaml(&format!("{UPSTREAM}{extra}")) {
            Ok(config) => config,
            Err(e) => panic!("config should parse:\n{e}"),
        }
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match Config::from_yaml(text) {
            Ok(_) => panic!("config should be refused:\n{text}"),
            Err(ConfigErrors(errors)) => errors,
        }
    }

    fn one_route(fields: &str) -> RouteConfig {
        let config = parse(&format!("routes:\n  - name: r\n    path: \"/a\"\n{fields}"));
        config.routes.into_iter().next().expect("one route")
    }

    const FULL_ROUTE: &str = "    limit: 5\n    per: \"1m\"\n    lock: \"5m\"\n";

    /// Multi-line YAML written indented in the test: drops the first newline and the common
    /// indentation, so line numbers count from the first YAML line.
    fn dedent(text: &str) -> String {
        let text = text.strip_prefix('\n').unwrap_or(text);
        let indent = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.get(indent..).unwrap_or(""))
            .collect();
        lines.join("\n") + "\n"
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    // ---- Defaults ----

    #[test]
    fn default_addresses_are_valid() {
        assert_eq!(
            parse("").listen,
            DEFAULT_LISTEN.parse::<SocketAddr>().expect("valid")
        );
        assert_eq!(
            parse("").admin_listen,
            DEFAULT_ADMIN_LISTEN.parse::<SocketAddr>().expect("valid")
        );
    }

    #[test]
    fn safety_margin_defaults_to_one_second() {
        assert_eq!(parse("").safety_margin, Duration::from_secs(1));
    }

    #[test]
    fn unmatched_defaults_to_forward() {
        assert_eq!(parse("").unmatched, Unmatched::Forward);
    }

    #[test]
    fn identity_defaults_to_token() {
        assert_eq!(parse("").identity, IdentityConfig::Token);
        assert_eq!(parse("identity:\n").identity, IdentityConfig::Token);
    }

    fn resolve(extra: &str) -> ResolveConfig {
        let text = format!(
            "identity:\n  mode: resolve\n  url: \"https://cliq.zoho.com/api/v2/me\"\n  \
             user_field: \"/data/zuid\"\n{extra}"
        );
        match parse(&text).identity {
            IdentityConfig::Resolve(r) => r,
            other => panic!("expected resolve, got {other:?}"),
        }
    }

    #[test]
    fn default_trusted_networks_all_parse() {
        let parsed = default_trusted_networks();
        assert_eq!(parsed.len(), DEFAULT_TRUSTED_NETWORKS.len());
        let shown: Vec<String> = parsed.iter().map(ToString::to_string).collect();
        assert_eq!(shown, DEFAULT_TRUSTED_NETWORKS);
    }

    #[test]
    fn header_trusted_networks_default_to_loopback() {
        let c = parse("identity:\n  mode: header\n  header: \"X-Cliq-User\"\n");
        let IdentityConfig::Header { trusted, .. } = c.identity else {
            panic!("expected header mode");
        };
        assert_eq!(trusted, default_trusted_networks());
        assert!(trusted
            .iter()
            .any(|n| n.contains(&"127.0.0.1".parse::<std::net::IpAddr>().expect("ip"))));
        assert!(trusted
            .iter()
            .any(|n| n.contains(&"::1".parse::<std::net::IpAddr>().expect("ip"))));
        assert!(!trusted
            .iter()
            .any(|n| n.contains(&"10.0.0.1".parse::<std::net::IpAddr>().expect("ip"))));
    }

    #[test]
    fn resolve_ttl_defaults_to_50_minutes() {
        assert_eq!(resolve("").ttl, DEFAULT_RESOLVE_TTL);
        assert_eq!(DEFAULT_RESOLVE_TTL, secs(50 * 60));
    }

    #[test]
    fn resolve_negative_ttl_defaults_to_one_minute() {
        assert_eq!(resolve("").negative_ttl, DEFAULT_RESOLVE_NEGATIVE_TTL);
        assert_eq!(DEFAULT_RESOLVE_NEGATIVE_TTL, secs(60));
    }

    #[test]
    fn resolve_timeout_defaults_to_5_seconds() {
        assert_eq!(resolve("").timeout, DEFAULT_RESOLVE_TIMEOUT);
        assert_eq!(DEFAULT_RESOLVE_TIMEOUT, secs(5));
    }

    #[test]
    fn resolve_cache_size_defaults_to_100_000() {
        assert_eq!(resolve("").cache_size, DEFAULT_RESOLVE_CACHE_SIZE);
        assert_eq!(DEFAULT_RESOLVE_CACHE_SIZE, 100_000);
    }

    #[test]
    fn resolve_on_unreachable_defaults_to_reject() {
        assert_eq!(resolve("").on_unreachable, DEFAULT_RESOLVE_ON_UNREACHABLE);
        assert_eq!(DEFAULT_RESOLVE_ON_UNREACHABLE, OnIdentityError::Reject);
    }

    #[test]
    fn store_defaults_to_memory() {
        assert_eq!(parse("").store, StoreConfig::Memory);
    }

    /// A redis store with only the required `url`.
    fn redis_defaults() -> RedisStoreConfig {
        match parse("store:\n  kind: redis\n  url: \"redis://127.0.0.1:6379/0\"\n").store {
            StoreConfig::Redis(redis) => redis,
            other => panic!("expected a redis store, got {other:?}"),
        }
    }

    #[test]
    fn store_kind_defaults_to_memory_with_an_empty_block() {
        assert_eq!(parse("store:\n").store, StoreConfig::Memory);
        assert_eq!(parse("store:\n  kind: memory\n").store, StoreConfig::Memory);
    }

    #[test]
    fn redis_on_error_defaults_to_reject() {
        assert_eq!(redis_defaults().on_error, OnStoreError::Reject);
        assert_eq!(redis_defaults().on_error, DEFAULT_REDIS_ON_ERROR);
    }

    #[test]
    fn redis_replicas_default_to_one() {
        assert_eq!(redis_defaults().replicas.get(), 1);
        assert_eq!(redis_defaults().replicas.get(), DEFAULT_REDIS_REPLICAS);
    }

    #[test]
    fn redis_timeout_defaults_to_250ms() {
        assert_eq!(redis_defaults().timeout, Duration::from_millis(250));
        assert_eq!(redis_defaults().timeout, DEFAULT_REDIS_TIMEOUT);
    }

    #[test]
    fn redis_connect_timeout_defaults_to_one_second() {
        assert_eq!(redis_defaults().connect_timeout, secs(1));
        assert_eq!(
            redis_defaults().connect_timeout,
            DEFAULT_REDIS_CONNECT_TIMEOUT
        );
    }

    #[test]
    fn timeouts_default_to_the_named_constants() {
        let t = parse("").timeouts;
        assert_eq!(t.connect, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(t.response, DEFAULT_RESPONSE_TIMEOUT);
        assert_eq!(t.client_header, DEFAULT_CLIENT_HEADER_TIMEOUT);
        assert_eq!(t.client_body, DEFAULT_CLIENT_BODY_TIMEOUT);
        assert_eq!(t.shutdown, DEFAULT_SHUTDOWN_TIMEOUT);
    }

    #[test]
    fn client_body_timeout_defaults_to_60s() {
        assert_eq!(DEFAULT_CLIENT_BODY_TIMEOUT, secs(60));
        let t = parse("timeouts:\n  client_body: \"250ms\"\n").timeouts;
        assert_eq!(t.client_body, Duration::from_millis(250));
    }

    #[test]
    fn zero_client_body_timeout_is_refused_with_key_and_line() {
        let errs = errors(&format!("{UPSTREAM}timeouts:\n  client_body: \"0s\"\n"));
        let found: Vec<(&str, usize, &str)> = errs
            .iter()
            .map(|e| (e.key.as_str(), e.line, e.message.as_str()))
            .collect();
        assert_eq!(
            found,
            [("timeouts.client_body", 3, "must be greater than zero")]
        );
    }

    #[test]
    fn http_limits_default_to_64k_headers_and_64m_bodies() {
        let h = parse("").http;
        assert_eq!(h.max_header_bytes, 64 * 1024);
        assert_eq!(h.max_body_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn queue_limits_default_to_the_named_constants() {
        let q = parse("").queue;
        assert_eq!(
            (q.max_per_user, q.max_total),
            (DEFAULT_QUEUE_MAX_PER_USER, DEFAULT_QUEUE_MAX_TOTAL)
        );
    }

    #[test]
    fn log_defaults_to_pretty_info() {
        assert_eq!(
            parse("").log,
            LogConfig {
                format: LogFormat::Pretty,
                level: "info".into()
            }
        );
    }

    #[test]
    fn routes_default_to_none() {
        assert!(parse("").routes.is_empty());
        assert!(parse("routes: []").routes.is_empty());
    }

    #[test]
    fn route_fields_default_to_queue_30s_window_every_method() {
        let r = one_route(FULL_ROUTE);
        assert_eq!(r.on_limit, OnLimit::Queue);
        assert_eq!(r.on_limit, DEFAULT_ON_LIMIT);
        assert_eq!(r.max_wait, Duration::from_secs(30));
        assert_eq!(r.algorithm, Algorithm::Window);
        assert_eq!(r.method, None);
    }

    #[test]
    fn validation_defaults_to_off() {
        assert_eq!(one_route(FULL_ROUTE).validate, None);
        let off = one_route(&format!(
            "    method: DELETE\n    validate: none\n{FULL_ROUTE}"
        ));
        assert_eq!(off.validate, None);
    }

    // ---- Values ----

    #[test]
    fn durations_take_a_whole_number_and_a_unit() {
        let ok = [
            ("250ms", Duration::from_millis(250)),
            ("2s", Duration::from_secs(2)),
            ("1m", Duration::from_secs(60)),
            ("10m", Duration::from_secs(600)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("1m500ms", Duration::from_millis(60_500)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn durations_without_unit_or_with_junk_are_refused() {
        let bad = [
            ("", "empty"),
            ("10", "has no unit"),
            ("1 minute", "spaces"),
            ("-1s", "negative"),
            ("5x", "unknown unit \"x\""),
            ("1.5s", "fractions"),
            ("s", "expected a number"),
            ("30m1h", "largest to smallest"),
            ("1m1m", "largest to smallest"),
            ("99999999999999999999s", "too large"),
            ("1d", "unknown unit \"d\""),
        ];
        for (text, why) in bad {
            let error = parse_duration(text).expect_err(text);
            assert!(error.contains(why), "{text}: {error}");
            assert!(
                error.contains("e.g. \"250ms\""),
                "{text}: message shows the format: {error}"
            );
        }
    }

    #[test]
    fn formatted_durations_read_back() {
        for ms in [
            0, 1, 999, 1_000, 1_500, 60_000, 61_000, 61_500, 600_000, 5_400_000, 3_600_001,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(
                parse_duration(&format_duration(d)),
                Ok(d),
                "{}",
                format_duration(d)
            );
        }
        assert_eq!(format_duration(Duration::from_secs(61)), "1m1s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
    }

    #[test]
    fn sizes_take_bytes_or_a_binary_unit() {
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        for bad in ["64KB", "64", "KiB", "1.5MiB", "64 KiB", "-1B"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let h = parse("http:\n  max_header_bytes: 2048\n  max_body_bytes: \"1MiB\"\n").http;
        assert_eq!((h.max_header_bytes, h.max_body_bytes), (2048, 1 << 20));
    }

    #[test]
    fn port_zero_is_accepted_for_tests() {
        let c = parse("listen: \"127.0.0.1:0\"\nadmin_listen: \"[::1]:0\"\n");
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.admin_listen.port(), 0);
    }

    #[test]
    fn proxy_and_admin_cannot_share_a_port() {
        let errs = errors(&format!("{UPSTREAM}listen: \"127.0.0.1:9090\"\n"));
        assert_eq!((errs[0].key.as_str(), errs[0].line), ("admin_listen", 1));
        parse("listen: \"127.0.0.1:0\"\nadmin_listen: \"127.0.0.1:0\"\n");
    }

    #[test]
    fn upstream_keeps_scheme_and_authority() {
        let c = Config::from_yaml("upstream: \"https://cliq.zoho.eu/\"").expect("valid");
        assert_eq!(c.upstream.scheme, Scheme::HTTPS);
        assert_eq!(c.upstream.authority.as_str(), "cliq.zoho.eu");
        assert_eq!(parse("").upstream.authority.as_str(), "127.0.0.1:1");
    }

    #[test]
    fn upstream_with_path_query_credentials_or_bad_port_is_refused() {
        for (url, why) in [
            ("https://cliq.zoho.com/api", "no path"),
            ("https://cliq.zoho.com?x=1", "no path or query"),
            ("https://u:p@cliq.zoho.com", "credentials"),
            ("ftp://cliq.zoho.com", "scheme \"ftp\""),
            ("cliq.zoho.com", "needs a scheme"),
            ("http://h:99999", "port"),
            ("http://h:", "port"),
            ("http://:80", "needs a host"),
            ("https://cliq.zoho.com/#x", "fragment"),
        ] {
            let errs = errors(&format!("upstream: \"{url}\""));
            assert_eq!(errs.len(), 1, "{url}: {errs:?}");
            assert_eq!(errs[0].key, "upstream");
            assert!(errs[0].message.contains(why), "{url}: {}", errs[0].message);
        }
    }

    #[test]
    fn header_identity_takes_a_header_name() {
        let c = parse("identity:\n  mode: header\n  header: \"X-Cliq-User\"\n");
        assert_eq!(
            c.identity,
            IdentityConfig::Header {
                name: HeaderName::from_static("x-cliq-user"),
                trusted: default_trusted_networks(),
            }
        );
        let errs = errors(&format!("{UPSTREAM}identity:\n  mode: header\n"));
        assert_eq!((errs[0].key.as_str(), errs[0].line), ("identity.header", 3));
        let errs = errors(&format!("{UPSTREAM}identity:\n  header: \"X-User\"\n"));
        assert_eq!(errs[0].key, "identity.header");
        assert!(errs[0].message.contains("only used with `mode: header`"));
    }

    #[test]
    fn a_resolve_identity_takes_every_key() {
        let c = parse(&dedent(
            r#"
            identity:
              mode: resolve
              url: "http://127.0.0.1:8081/api/v2/me?fields=zuid"
              user_field: "/data/zuid"
              ttl: "1h"
              negative_ttl: "30s"
              timeout: "2s"
              cache_size: 500
              on_unreachable: token
              lookup_reserve: 4
            "#,
        ));
        assert_eq!(
            c.identity,
            IdentityConfig::Resolve(ResolveConfig {
                url: "http://127.0.0.1:8081/api/v2/me?fields=zuid"
                    .parse()
                    .expect("uri"),
                user_field: "/data/zuid".into(),
                ttl: secs(3600),
                negative_ttl: secs(30),
                timeout: secs(2),
                cache_size: 500,
                on_unreachable: OnIdentityError::Token,
                lookup_reserve: NonZeroU32::new(4),
            })
        );
        assert_eq!(
            resolve("  on_unreachable: reject\n").on_unreachable,
            OnIdentityError::Reject
        );
    }

    #[test]
    fn resolve_needs_url_and_user_field() {
        let errs = errors(&format!("{UPSTREAM}identity:\n  mode: resolve\n"));
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [("identity.url", 3), ("identity.user_field", 3)],
            "{errs:?}"
        );
        assert!(errs[0].message.contains("api/v2/me"), "{}", errs[0].message);
        assert!(
            errs[1].message.contains("/data/zuid"),
            "{}",
            errs[1].message
        );
    }

    fn resolve_errors(extra: &str) -> Vec<ConfigError> {
        errors(&format!(
            "{UPSTREAM}identity:\n  mode: resolve\n  url: \"https://h/me\"\n  user_field: \"/id\"\n{extra}"
        ))
    }

    #[test]
    fn resolve_urls_must_be_absolute_http_with_a_host() {
        for url in [
            "https://cliq.zoho.com/api/v2/me",
            "http://127.0.0.1:9/me",
            "http://[::1]:8081/me",
            "HTTPS://cliq.zoho.eu/",
        ] {
            let text = format!(
                "identity:\n  mode: resolve\n  url: \"{url}\"\n  user_field: \"/data/zuid\"\n"
            );
            let IdentityConfig::Resolve(r) = parse(&text).identity else {
                panic!("{url}: expected resolve");
            };
            assert_eq!(
                r.url.to_string().to_lowercase(),
                url.to_lowercase(),
                "{url}"
            );
        }
        for (url, why) in [
            ("ftp://h/me", "scheme \"ftp\" is not supported"),
            ("/api/v2/me", "must be an absolute URL"),
            ("cliq.zoho.com/api/v2/me", "not a URL"),
            ("https://h:0/me", "not a port number"),
            ("https://h:99999/me", "not a port number"),
            ("https://h/me#x", "fragment"),
            (
                "https://user:s3cret@h/me",
                "credentials (user@) are not allowed",
            ),
            ("", "must not be empty"),
        ] {
            let errs = errors(&format!(
                "{UPSTREAM}identity:\n  mode: resolve\n  url: \"{url}\"\n  user_field: \"/id\"\n"
            ));
            assert_eq!(errs.len(), 1, "{url}: {errs:?}");
            assert_eq!((errs[0].key.as_str(), errs[0].line), ("identity.url", 4));
            assert!(errs[0].message.contains(why), "{url}: {}", errs[0].message);
            assert!(!errs[0].message.contains("s3cret"), "{}", errs[0].message);
        }
    }

    #[test]
    fn user_field_must_be_a_json_pointer() {
        for ok in ["", "/data/zuid", "/0", "/a~0b/c~1d", "/"] {
            assert_eq!(check_json_pointer(ok), Ok(()), "{ok:?}");
        }
        for (bad, why) in [
            ("data/zuid", "must start with '/', e.g. \"/data/zuid\""),
            ("data.zuid", "e.g. \"/data/zuid\""),
            ("$.data.zuid", "e.g. \"/data/zuid\""),
            ("/a~2", "'~' may only appear as \"~0\""),
            ("/a~", "'~' may only appear as \"~0\""),
        ] {
            let err = check_json_pointer(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
        let errs = resolve_errors("  user_field: 7\n");
        // The duplicate key and the integer are both reported.
        assert!(
            errs.iter().any(
                |e| e.key == "identity.user_field" && e.message.contains("found the integer 7")
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn resolve_ttl_is_at_most_one_hour() {
        assert_eq!(resolve("  ttl: \"1h\"\n").ttl, secs(3600));
        let errs = errors(&format!(
            "{UPSTREAM}identity:\n  mode: resolve\n  url: \"https://h/me\"\n  user_field: \"/id\"\n  ttl: \"1h1s\"\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!((errs[0].key.as_str(), errs[0].line), ("identity.ttl", 6));
        assert!(
            errs[0].message.contains("Zoho access tokens live one hour"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn resolve_durations_and_cache_size_must_be_positive() {
        let errs = errors(&format!(
            "{UPSTREAM}identity:\n  mode: resolve\n  url: \"https://h/me\"\n  user_field: \"/id\"\n  \
             ttl: \"0s\"\n  negative_ttl: \"0s\"\n  timeout: \"0ms\"\n  cache_size: 0\n  \
             on_unreachable: fallback\n"
        ));
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [
                ("identity.ttl", 6),
                ("identity.negative_ttl", 7),
                ("identity.timeout", 8),
                ("identity.cache_size", 9),
                ("identity.on_unreachable", 10),
            ],
            "{errs:?}"
        );
        assert!(errs[3].message.contains("must be at least 1"));
        assert!(errs[4].message.contains("allowed: reject, token"));
    }

    /// Resolve mode with a `users.me` route of `limit` on the identity endpoint (`limit` on line
    /// 6), then `extra` under `identity` (from line 13).
    fn resolve_with_me_route(limit: u32, extra: &str) -> String {
        format!(
            "{UPSTREAM}routes:\n  - name: users.me\n    method: GET\n    path: \"/api/v2/me\"\n    \
             limit: {limit}\n    per: \"1m\"\n    lock: \"10m\"\nidentity:\n  mode: resolve\n  \
             url: \"https://cliq.zoho.com/api/v2/me\"\n  user_field: \"/data/zuid\"\n{extra}"
        )
    }

    fn split(lookups: u32, own: u32) -> Option<LookupSplit> {
        Some(LookupSplit {
            lookups: NonZeroU32::new(lookups)?,
            own: NonZeroU32::new(own)?,
        })
    }

    #[test]
    fn lookups_get_half_the_identity_endpoints_quota_by_default() {
        let without_route = resolve("");
        assert_eq!(without_route.lookup_reserve, None);
        let c = parse(
            "identity:\n  mode: resolve\n  url: \"https://cliq.zoho.com/api/v2/me\"\n  \
             user_field: \"/data/zuid\"\n",
        );
        // No route covers the endpoint: Zoho's published 20 a minute.
        assert_eq!(c.identity_route(), None);
        assert_eq!(c.lookup_split(), split(10, 10));
        let c = Config::from_yaml(&resolve_with_me_route(3, "")).expect("valid");
        assert_eq!(c.identity_route(), Some(0));
        assert_eq!(c.lookup_split(), split(1, 2));
        let c =
            Config::from_yaml(&resolve_with_me_route(20, "  lookup_reserve: 4\n")).expect("valid");
        assert_eq!(c.lookup_split(), split(4, 16));
        // Other modes share nothing.
        assert_eq!(parse("").lookup_split(), None);
    }

    #[test]
    fn lookup_reserve_must_leave_the_apps_own_calls_a_share() {
        let errs = errors(&resolve_with_me_route(20, "  lookup_reserve: 20\n"));
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(found, [("identity.lookup_reserve", 13)], "{errs:?}");
        assert!(errs[0].message.contains("must be less than 20"), "{errs:?}");

        let errs = errors(&resolve_with_me_route(20, "  lookup_reserve: 0\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].message.contains("must be at least 1"), "{errs:?}");

        // With the default, a limit of 1 cannot be shared: the route's limit is named.
        let errs = errors(&resolve_with_me_route(1, ""));
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(found, [("routes[0].limit", 6)], "{errs:?}");
        assert!(errs[0].message.contains("at least 2"), "{errs:?}");

        // GCRA cannot hold a smaller share: the route (line 3) is named.
        let gcra = resolve_with_me_route(20, "").replacen(
            "identity:",
            "    algorithm: gcra\n    burst: 5\nidentity:",
            1,
        );
        let errs = errors(&gcra);
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(found, [("routes[0].algorithm", 3)], "{errs:?}");
        assert!(errs[0].message.contains("algorithm: window"), "{errs:?}");
        // Without a route over the endpoint, the reserve is checked against Zoho's 20.
        let errs = errors(&format!(
            "{UPSTREAM}identity:\n  mode: resolve\n  url: \"https://h/api/v2/me\"\n  \
             user_field: \"/id\"\n  lookup_reserve: 25\n"
        ));
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(found, [("identity.lookup_reserve", 6)], "{errs:?}");
    }

    #[test]
    fn a_split_held_back_takes_the_smaller_share_of_each_side() {
        let (a, b) = (split(5, 15).expect("a"), split(10, 10).expect("b"));
        assert_eq!(Some(a.min(b)), split(5, 10));
        assert_eq!(b.min(a), a.min(b));
    }

    #[test]
    fn header_trusted_networks_take_cidrs_bare_ips_and_ipv6() {
        let c = parse(&dedent(
            r#"
            identity:
              mode: header
              header: "X-Cliq-User"
              trusted_networks: ["10.0.0.0/8", "192.168.1.7", "fd00::/8", "::1", "0.0.0.0/0"]
            "#,
        ));
        let net = |s: &str| s.parse::<ipnet::IpNet>().expect("net");
        assert_eq!(
            c.identity,
            IdentityConfig::Header {
                name: HeaderName::from_static("x-cliq-user"),
                trusted: vec![
                    net("10.0.0.0/8"),
                    net("192.168.1.7/32"),
                    net("fd00::/8"),
                    net("::1/128"),
                    net("0.0.0.0/0"),
                ],
            }
        );
    }

    #[test]
    fn bad_networks_say_what_is_wrong() {
        for (bad, why) in [
            ("10.0.0.0/33", "/33 is not a whole number from 0 to 32"),
            ("::/129", "from 0 to 128"),
            ("10.0.0.0/+8", "/+8 is not a whole number"),
            ("10.0.0.0/", "is not a whole number"),
            ("not-an-ip", "\"not-an-ip\" is not an IP address or network"),
            ("10.0.0/8", "\"10.0.0\" is not an IP address"),
            (
                "10.1.2.3/8",
                "write the network \"10.0.0.0/8\" (or \"10.1.2.3/32\"",
            ),
        ] {
            let err = parse_network(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
        let errs = errors(&dedent(
            r#"
            upstream: "http://127.0.0.1:1"
            identity:
              mode: header
              header: "X-Cliq-User"
              trusted_networks:
                - "10.0.0.0/8"
                - "10.0.0.0/33"
                - 7
                - "not-an-ip"
            "#,
        ));
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [
                ("identity.trusted_networks[1]", 7),
                ("identity.trusted_networks[2]", 8),
                ("identity.trusted_networks[3]", 9),
            ],
            "{errs:?}"
        );
    }

    #[test]
    fn trusted_networks_must_be_a_non_empty_list() {
        let errs = errors(&format!(
            "{UPSTREAM}identity:\n  mode: header\n  header: \"X-U\"\n  trusted_networks: []\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line),
            ("identity.trusted_networks", 5)
        );
        assert!(errs[0].message.contains("no caller could ever be trusted"));
        let errs = errors(&format!(
            "{UPSTREAM}identity:\n  mode: header\n  header: \"X-U\"\n  trusted_networks: \"10.0.0.0/8\"\n"
        ));
        assert!(
            errs[0].message.contains("expected a list of networks"),
            "{errs:?}"
        );
    }

    #[test]
    fn credential_and_hop_by_hop_headers_cannot_name_the_user() {
        for (name, why) in [
            ("Authorization", "carries the caller's credential"),
            ("proxy-authorization", "carries the caller's credential"),
            ("Cookie", "carries the caller's credential"),
            ("Connection", "hop-by-hop"),
            ("transfer-encoding", "hop-by-hop"),
            ("Host", "describes the request itself"),
        ] {
            let errs = errors(&format!(
                "{UPSTREAM}identity:\n  mode: header\n  header: \"{name}\"\n"
            ));
            assert_eq!(errs.len(), 1, "{name}: {errs:?}");
            assert_eq!((errs[0].key.as_str(), errs[0].line), ("identity.header", 4));
            assert!(errs[0].message.contains(why), "{name}: {}", errs[0].message);
        }
    }

    #[test]
    fn each_mode_refuses_the_keys_of_the_others() {
        let errs = errors(&dedent(
            r#"
            upstream: "http://127.0.0.1:1"
            identity:
              mode: token
              header: "X-U"
              trusted_networks: ["10.0.0.0/8"]
              url: "https://h/me"
              on_unreachable: token
            "#,
        ));
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [
                ("identity.header", 4),
                ("identity.trusted_networks", 5),
                ("identity.url", 6),
                ("identity.on_unreachable", 7),
            ],
            "{errs:?}"
        );
        assert!(errs[1]
            .message
            .contains("only used with `mode: header` (mode here is token)"));
        assert!(errs[2]
            .message
            .contains("only used with `mode: resolve` (mode here is token)"));

        let errs = errors(&format!("{UPSTREAM}identity:\n  ttl: \"50m\"\n"));
        assert!(
            errs[0]
                .message
                .contains("`mode` is not set, so it is token"),
            "{errs:?}"
        );

        let errs = resolve_errors("  header: \"X-U\"\n  trusted_networks: [\"::1\"]\n");
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [("identity.header", 6), ("identity.trusted_networks", 7)],
            "{errs:?}"
        );
        assert!(errs[0]
            .message
            .contains("only used with `mode: header` (mode here is resolve)"));

        let errs = errors(&format!(
            "{UPSTREAM}identity:\n  mode: header\n  header: \"X-U\"\n  user_field: \"/id\"\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0]
            .message
            .contains("only used with `mode: resolve` (mode here is header)"));
    }

    #[test]
    fn a_bad_identity_mode_still_checks_the_other_values_but_nothing_more() {
        let errs = errors(&format!(
            "{UPSTREAM}identity:\n  mode: ldap\n  trusted_networks: []\n  ttl: \"2h\"\n"
        ));
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["identity.mode", "identity.trusted_networks", "identity.ttl"],
            "no missing header/url, no `only used with`: {errs:?}"
        );
        assert!(errs[0].message.contains("allowed: token, header, resolve"));
    }

    #[test]
    fn describe_shows_the_identity_settings() {
        let header = parse("identity:\n  mode: header\n  header: \"X-Cliq-User\"\n").describe();
        assert!(
            header.contains("identity header x-cliq-user from 127.0.0.0/8, ::1/128  store"),
            "{header}"
        );
        let c = Config {
            identity: IdentityConfig::Resolve(resolve("")),
            ..parse("")
        };
        let text = c.describe();
        assert!(
            text.contains(
                "identity resolve https://cliq.zoho.com/api/v2/me (ttl 50m, lookups 10 of 20 a window)  store"
            ),
            "{text}"
        );
    }

    #[test]
    fn log_level_is_checked_as_a_tracing_filter() {
        assert_eq!(
            parse("log:\n  level: \"cliqgate=debug,info\"\n").log.level,
            "cliqgate=debug,info"
        );
        for bad in ["verbose", "cliqgate=lots", "[bad"] {
            let errs = errors(&format!("{UPSTREAM}log:\n  level: \"{bad}\"\n"));
            assert_eq!(errs[0].key, "log.level", "{bad}");
        }
    }

    #[test]
    fn queue_per_user_cannot_exceed_total() {
        let errs = errors(&format!(
            "{UPSTREAM}queue:\n  max_per_user: 50\n  max_total: 10\n"
        ));
        assert_eq!(errs[0].key, "queue.max_per_user");
    }

    // ---- Store ----

    fn redis_store(extra: &str) -> RedisStoreConfig {
        match parse(&format!("store:\n  kind: redis\n{extra}")).store {
            StoreConfig::Redis(redis) => redis,
            other => panic!("expected a redis store, got {other:?}"),
        }
    }

    /// The errors of a redis store whose `url` is `url` (and nothing else wrong).
    fn url_errors(url: &str) -> Vec<ConfigError> {
        let yaml = format!("{UPSTREAM}store:\n  kind: redis\n  url: {url:?}\n");
        errors(&yaml)
    }

    #[test]
    fn a_redis_store_takes_every_key() {
        let r = redis_store(concat!(
            "  url: \"rediss://cliq:pw@redis.internal:6380/2\"\n",
            "  on_error: local\n",
            "  replicas: 3\n",
            "  timeout: \"100ms\"\n",
            "  connect_timeout: \"2s\"\n",
        ));
        assert_eq!(
            r,
            RedisStoreConfig {
                url: "rediss://cliq:pw@redis.internal:6380/2".into(),
                on_error: OnStoreError::Local,
                replicas: nz(3),
                timeout: Duration::from_millis(100),
                connect_timeout: secs(2),
            }
        );
    }

    #[test]
    fn several_replicas_with_on_error_reject_are_allowed() {
        let r = redis_store("  url: \"redis://h\"\n  on_error: reject\n  replicas: 4\n");
        assert_eq!((r.on_error, r.replicas), (OnStoreError::Reject, nz(4)));
    }

    #[test]
    fn redis_urls_in_every_documented_shape_are_accepted() {
        for url in [
            "redis://h",
            "redis://h/",
            "redis://127.0.0.1:6379/0",
            "rediss://redis.example.com:6380/15",
            "redis://user:pw@h:6379/1",
            "redis://:pw@h",
            "redis://:p%2Fw%40rd@h/0",
            "redis://[::1]:6379/0",
            "redis://[::1]",
            "REDIS://my_redis-1.internal",
        ] {
            assert_eq!(redis_store(&format!("  url: {url:?}\n")).url, url);
        }
    }

    #[test]
    fn malformed_redis_urls_are_refused_with_the_reason() {
        for (url, why) in [
            ("127.0.0.1:6379", "it needs a scheme"),
            ("http://h:6379", "scheme \"http\" is not supported"),
            ("valkey://h", "scheme \"valkey\" is not supported"),
            ("redis://", "it needs a host"),
            ("redis://:6379/0", "it needs a host"),
            ("redis://pw@/0", "it needs a host"),
            ("redis://h:0", "port \"0\" is not a port number"),
            ("redis://h:+80", "port \"+80\" is not a port number"),
            ("redis://h:", "port \"\" is not a port number"),
            ("redis://h:6379:1", "port \"6379:1\""),
            ("redis://0.0.0.0:6379", "wildcard"),
            ("redis://[::]:6379", "wildcard"),
            ("redis://[::1:6379", "no closing ']'"),
            ("redis://[::1]6379", "expected :port after ']'"),
            ("redis://[nope]", "not an IPv6 address"),
            ("redis://my host", "not a host name or IP address"),
            (
                "redis://h/-1",
                "the database \"-1\" is not a database number",
            ),
            ("redis://h/0/1", "the database \"0/1\""),
            ("redis://h/+1", "the database \"+1\""),
            ("redis://h/99999999999999999999", "is not a database number"),
            (
                "redis://h/0?protocol=resp3",
                "query parameters and fragments",
            ),
            ("rediss://h#insecure", "query parameters and fragments"),
            ("redis://:p/w@h", "percent-encode them"),
        ] {
            let errs = url_errors(url);
            assert_eq!(errs.len(), 1, "{url}: {errs:?}");
            assert_eq!(
                (errs[0].key.as_str(), errs[0].line),
                ("store.url", 4),
                "{url}"
            );
            assert!(
                errs[0].message.starts_with("not a usable Redis URL: "),
                "{url}: {}",
                errs[0].message
            );
            assert!(errs[0].message.contains(why), "{url}: {}", errs[0].message);
        }
    }

    #[test]
    fn a_redis_url_that_is_not_a_string_is_refused() {
        let errs = errors(&format!("{UPSTREAM}store:\n  kind: redis\n  url: 6379\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].message.contains("expected a Redis URL"), "{errs:?}");
    }

    /// Every way a URL with a password can be refused: the password is in no message.
    #[test]
    fn a_redis_password_never_appears_in_an_error() {
        const PW: &str = "Sup3rS3cret";
        for url in [
            "http://:Sup3rS3cret@h:6379/0",
            "Sup3rS3cret@h",
            ":Sup3rS3cret@h:6379",
            "redis//:Sup3rS3cret@h",
            "redis://:Sup3rS3cret@",
            "redis://:Sup3rS3cret@h:0",
            "redis://u:Sup3rS3cret@h:99999/0",
            "redis://:Sup3rS3cret@0.0.0.0",
            "redis://:Sup3rS3cret@h/x",
            "redis://:Sup3rS3cret@h/0?a=b",
            "redis://:Sup3rS3cret@h/0#insecure",
            "redis://:Sup3/rS3cret@h/0",
            "redis://:Sup3?rS3cret@h/0",
            "redis://:Sup3#rS3cret@h/0",
            "redis://u:Sup3rS3cret@my host",
            "redis://Sup3rS3cret@[::1",
            "redis://:Sup3rS3cret:more@h:6379:1",
            "redis://:%ff%feSup3rS3cret@h",
            "redis://:Sup3rS3cret@h h",
        ] {
            let yaml = format!("{UPSTREAM}store:\n  kind: redis\n  url: {url:?}\n");
            let Err(all) = Config::from_yaml(&yaml) else {
                panic!("{url} should be refused");
            };
            for shown in [all.to_string(), format!("{all:?}")] {
                for piece in [PW, "Sup3", "rS3cret"] {
                    assert!(!shown.contains(piece), "{url}: {piece} leaks in:\n{shown}");
                }
            }
        }
    }

    #[test]
    fn a_redis_password_never_appears_in_describe_or_debug() {
        let c = parse("store:\n  kind: redis\n  url: \"redis://cliq:Sup3rS3cret@h:6379/0\"\n");
        for shown in [c.describe(), format!("{c:?}"), format!("{c:#?}")] {
            assert!(!shown.contains("Sup3rS3cret"), "{shown}");
            assert!(shown.contains("redis://cliq:REDACTED@h:6379/0"), "{shown}");
        }
        let header = c.describe().lines().next().unwrap_or_default().to_string();
        assert!(
            header.contains(
                "store redis redis://cliq:REDACTED@h:6379/0 (on_error reject, replicas 1)"
            ),
            "{header}"
        );
    }

    #[test]
    fn redact_url_password_hides_only_the_password() {
        for (url, redacted) in [
            ("redis://:pw@h:6379/0", "redis://:REDACTED@h:6379/0"),
            ("redis://user:pw@h", "redis://user:REDACTED@h"),
            ("rediss://h:6380", "rediss://h:6380"),
            ("redis://h", "redis://h"),
            // A lone user-info may be a password (Redis < 6 has no users): hidden whole.
            ("redis://pw@h/0", "redis://REDACTED@h/0"),
            // Malformed: when in doubt, everything before the last '@'.
            ("redis://:p@w@h", "redis://:REDACTED@h"),
            ("redis://:p/w@h/0", "redis://:REDACTED@h/0"),
            ("user:pw@h", "user:REDACTED@h"),
            ("pw@h", "REDACTED@h"),
        ] {
            assert_eq!(redact_url_password(url), redacted, "{url}");
        }
    }

    #[test]
    fn redis_keys_need_kind_redis() {
        let errs = errors(&format!(
            "{UPSTREAM}store:\n  url: \"redis://h\"\n  replicas: 2\n"
        ));
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(found, [("store.url", 3), ("store.replicas", 4)], "{errs:?}");
        assert!(
            errs[0]
                .message
                .contains("`kind` is not set, so the store is memory"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn a_bad_store_kind_still_checks_the_other_values_but_nothing_more() {
        let errs = errors(&format!(
            "{UPSTREAM}store:\n  kind: mongo\n  replicas: 0\n  timeout: \"5\"\n"
        ));
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["store.kind", "store.replicas", "store.timeout"],
            "no missing url, no `only with kind: redis`: {errs:?}"
        );
    }

    // ---- Routes ----

    #[test]
    fn path_may_be_one_template_or_a_list() {
        assert_eq!(one_route(FULL_ROUTE).paths, ["/a"]);
        let c = parse(&dedent(
            r#"
            routes:
              - name: r
                path: ["/a", "/b/{id}"]
                limit: 5
                per: "1m"
                lock: "5m"
            "#,
        ));
        assert_eq!(c.routes[0].paths, ["/a", "/b/{id}"]);
    }

    #[test]
    fn empty_path_list_and_repeated_template_are_refused() {
        for (path, key) in [
            ("[]", "routes[0].path"),
            (r#"["/a", "/a"]"#, "routes[0].path[1]"),
        ] {
            let text = format!("{UPSTREAM}routes:\n  - name: r\n    path: {path}\n{FULL_ROUTE}");
            let errs = errors(&text);
            assert_eq!((errs.len(), errs[0].key.as_str()), (1, key), "{errs:?}");
        }
    }

    #[test]
    fn method_is_case_insensitive_and_star_means_every_method() {
        let post = one_route(&format!("    method: post\n{FULL_ROUTE}"));
        assert_eq!(post.method, Some(Method::POST));
        let c = parse(&dedent(
            r#"
            defaults:
              method: GET
            routes:
              - name: r
                path: "/a"
                method: "*"
                limit: 5
                per: "1m"
                lock: "5m"
            "#,
        ));
        assert_eq!(
            c.routes[0].method, None,
            "a route's \"*\" overrides a default method"
        );
    }

    #[test]
    fn defaults_fill_what_a_route_leaves_out_and_a_route_value_wins() {
        let c = parse(&dedent(
            r#"
            defaults:
              limit: 7
              per: "2m"
              lock: "10m"
              on_limit: reject
              algorithm: gcra
              burst: 3
            routes:
              - name: a
                path: "/a"
              - name: b
                path: "/b"
                limit: 9
                on_limit: queue
                max_wait: "5s"
                algorithm: window
            "#,
        ));
        let (a, b) = (&c.routes[0], &c.routes[1]);
        assert_eq!((a.limit.get(), a.per, a.lock), (7, secs(120), secs(600)));
        assert_eq!(a.on_limit, OnLimit::Reject);
        assert_eq!(a.algorithm, Algorithm::Gcra { burst: nz(3) });
        assert_eq!((b.limit.get(), b.per), (9, secs(120)));
        assert_eq!((b.on_limit, b.max_wait), (OnLimit::Queue, secs(5)));
        assert_eq!(
            b.algorithm,
            Algorithm::Window,
            "a burst from defaults does not bind window"
        );
    }

    #[test]
    fn gcra_takes_a_burst() {
        let r = one_route(&format!("    algorithm: gcra\n    burst: 5\n{FULL_ROUTE}"));
        assert_eq!(r.algorithm, Algorithm::Gcra { burst: nz(5) });
    }

    #[test]
    fn gcra_without_burst_and_window_with_burst_are_refused() {
        let missing = errors(&format!(
            "{UPSTREAM}routes:\n  - name: r\n    path: \"/a\"\n    algorithm: gcra\n{FULL_ROUTE}"
        ));
        assert_eq!(
            (missing[0].key.as_str(), missing[0].line),
            ("routes[0].burst", 3)
        );
        let window = errors(&format!(
            "{UPSTREAM}routes:\n  - name: r\n    path: \"/a\"\n    burst: 2\n{FULL_ROUTE}"
        ));
        assert!(window[0]
            .message
            .contains("only used with `algorithm: gcra`"));
    }

    #[test]
    fn a_default_burst_over_a_route_limit_names_both() {
        let errs = errors(&dedent(
            r#"
            upstream: "http://127.0.0.1:1"
            defaults:
              burst: 9
            routes:
              - name: r
                path: "/a"
                algorithm: gcra
                limit: 5
                per: "1m"
                lock: "5m"
            "#,
        ));
        assert_eq!((errs[0].key.as_str(), errs[0].line), ("routes[0].burst", 5));
        assert!(errs[0]
            .message
            .contains("burst 9 (from defaults.burst, line 3) must be at most limit 5"));
    }

    #[test]
    fn validate_names_a_rule_set_for_the_routes_method() {
        for set in RULE_SETS {
            let r = one_route(&format!(
                "    method: {}\n    validate: {}\n{FULL_ROUTE}",
                set.method.as_str().to_lowercase(),
                set.name
            ));
            assert_eq!(r.validate, Some(set));
        }
        let inherited = parse(&format!(
            "defaults:\n  method: POST\nroutes:\n  - name: r\n    path: \"/a\"\n    \
             validate: cliq.forward_messages\n{FULL_ROUTE}"
        ));
        assert_eq!(
            inherited.routes[0].validate,
            Some(&crate::validate::FORWARD_MESSAGES),
            "the method may come from `defaults`"
        );
    }

    #[test]
    fn unknown_rule_sets_list_the_known_ones() {
        let errs = errors(&format!(
            "{UPSTREAM}routes:\n  - name: r\n    path: \"/a\"\n    method: DELETE\n    \
             validate: cliq.delete_message\n{FULL_ROUTE}"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line),
            ("routes[0].validate", 6)
        );
        assert_eq!(
            errs[0].message,
            "unknown value \"cliq.delete_message\"; allowed: cliq.delete_messages, \
             cliq.forward_messages, cliq.search_messages, none"
        );
        let errs = errors(&format!(
            "{UPSTREAM}routes:\n  - name: r\n    path: \"/a\"\n    validate: true\n{FULL_ROUTE}"
        ));
        assert!(
            errs[0].message.contains("found the boolean true"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_rule_set_on_a_route_of_another_method_is_refused() {
        for (method, takes) in [
            ("    method: GET\n", "this route takes GET"),
            ("", "this route takes every method"),
            ("    method: \"*\"\n", "this route takes every method"),
        ] {
            let errs = errors(&format!(
                "{UPSTREAM}routes:\n  - name: r\n    path: \"/a\"\n{method}    \
                 validate: cliq.delete_messages\n{FULL_ROUTE}"
            ));
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].key, "routes[0].validate");
            assert_eq!(
                errs[0].message,
                format!(
                    "cliq.delete_messages checks DELETE /api/v3/chats/{{chat_id}}/messages \
                     calls, but {takes}; set `method: DELETE` on the route"
                )
            );
        }
    }

    #[test]
    fn validate_under_defaults_is_refused() {
        let errs = errors(&format!(
            "{UPSTREAM}defaults:\n  validate: cliq.search_messages\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line),
            ("defaults.validate", 3)
        );
        assert!(errs[0].message.contains("not to `defaults`"), "{errs:?}");
    }

    #[test]
    fn max_wait_on_a_rejecting_route_is_refused() {
        let errs = errors(&format!(
            "{UPSTREAM}routes:\n  - name: r\n    path: \"/a\"\n    on_limit: reject\n    max_wait: \"5s\"\n{FULL_ROUTE}"
        ));
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line),
            ("routes[0].max_wait", 6)
        );
    }

    #[test]
    fn a_route_hidden_by_an_earlier_one_is_refused() {
        let errs = errors(&dedent(
            r#"
            upstream: "http://127.0.0.1:1"
            routes:
              - name: any
                path: "/a/{x}"
                limit: 5
                per: "1m"
                lock: "5m"
              - name: get
                method: GET
                path: "/A/b"
                limit: 5
                per: "1m"
                lock: "5m"
            "#,
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!((errs[0].key.as_str(), errs[0].line), ("routes[1].path", 10));
        assert!(
            errs[0]
                .message
                .contains("route \"any\" (line 3) comes first"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn a_specific_route_before_a_general_one_is_fine() {
        let c = parse(&dedent(
            r#"
            routes:
              - name: get
                method: GET
                path: "/a/b"
                limit: 5
                per: "1m"
                lock: "5m"
              - name: any
                path: "/a/{x}"
                limit: 5
                per: "1m"
                lock: "5m"
            "#,
        ));
        assert_eq!(c.routes.len(), 2);
    }

    #[test]
    fn a_bad_value_is_not_also_reported_as_missing() {
        let errs = errors(&dedent(
            r#"
            upstream: "http://127.0.0.1:1"
            routes:
              - name: r
                path: "/a"
                limit: 0
                per: "0s"
                lock: "5m"
                algorithm: gcra
                burst: -1
            "#,
        ));
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["routes[0].limit", "routes[0].per", "routes[0].burst"],
            "{errs:?}"
        );
    }

    #[test]
    fn route_line_is_the_line_of_its_mapping() {
        let c = parse(&dedent(
            r#"
            routes:
              - name: a
                path: "/a"
                limit: 5
                per: "1m"
                lock: "5m"

              - path: "/b"
                name: b
                limit: 5
                per: "1m"
                lock: "5m"
            "#,
        ));
        assert_eq!((c.routes[0].line, c.routes[1].line), (3, 9));
    }

    // ---- YAML itself ----

    #[test]
    fn duplicate_keys_are_reported_with_both_lines() {
        let errs = errors(&format!(
            "{UPSTREAM}safety_margin: \"1s\"\nunmatched: forward\nsafety_margin: \"2s\"\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!((errs[0].key.as_str(), errs[0].line), ("safety_margin", 4));
        assert!(
            errs[0].message.contains("also set at line 2"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn anchors_tags_comments_and_block_scalars_are_not_mistaken_for_duplicates() {
        let c = parse(&dedent(
            r#"
            log:
              level: &lvl   # a comment: with a colon
                "info"
              format: !!str pretty
            defaults: {max_wait: "5s", on_limit: queue}
            routes:
              - name: r
                path: &p "/a"
                limit: 5
                per: |-
                  1m
                lock: >-
                  5m
            "#,
        ));
        assert_eq!(c.routes[0].per, secs(60));
        assert_eq!(c.routes[0].max_wait, secs(5));
    }

    #[test]
    fn aliases_are_resolved() {
        let c = parse(&dedent(
            r#"
            routes:
              - name: a
                method: POST
                path: &shared ["/a", "/b"]
                limit: 5
                per: "1m"
                lock: "5m"
              - name: b
                method: GET
                path: *shared
                limit: 5
                per: "1m"
                lock: "5m"
            "#,
        ));
        assert_eq!(c.routes[1].paths, c.routes[0].paths);
    }

    #[test]
    fn an_empty_file_only_lacks_upstream() {
        let errs = errors("# nothing here\n");
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].key.as_str(), errs[0].line), ("upstream", 1));
    }

    #[test]
    fn a_second_document_is_refused() {
        let errs = errors(&format!("{UPSTREAM}---\nlisten: \"127.0.0.1:0\"\n"));
        assert_eq!((errs[0].key.as_str(), errs[0].line), (DOCUMENT_KEY, 3));
    }

    #[test]
    fn error_display_names_line_and_key() {
        let e = ConfigError {
            line: 4,
            key: "routes[2].per".into(),
            message: "must be greater than zero".into(),
        };
        assert_eq!(
            e.to_string(),
            "line 4: routes[2].per: must be greater than zero"
        );
        let all = ConfigErrors(vec![e.clone(), e]);
        assert_eq!(all.to_string().lines().count(), 2);
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        let errs = errors(&format!("{UPSTREAM}safety_margn: \"1s\"\n"));
        assert!(
            errs[0].message.contains("did you mean `safety_margin`?"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn odd_documents_are_reported_not_panicked_on() {
        for text in [
            "~",
            "[]",
            "42",
            "{}",
            "routes: {a: 1}",
            "routes:\n  - ~\n",
            "? [a]\n: 1\n",
            "identity: !custom {mode: token}",
            "limit: !!int x",
            "upstream: *a",
            "\u{0}",
            "routes:\n  - name: r\n    path: [[\"/a\"]]\n",
        ] {
            assert!(Config::from_yaml(text).is_err(), "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_gives_a_config_or_errors_never_a_panic(
            text in "[a-z_:\\-\\[\\]{}\"'&*!#|>,.0-9 \n]{0,300}"
        ) {
            let _ = Config::from_yaml(&format!("{UPSTREAM}{text}"));
            let _ = Config::from_yaml(&text);
        }
    }

    // ---- Operations: route mode, state file, admin token, reload ----

    #[test]
    fn operations_keys_default_to_enforce_no_state_file_no_token_no_watch() {
        let c = parse("");
        assert_eq!(c.state_file, None);
        assert_eq!(c.admin, AdminConfig { token: None });
        assert_eq!(c.reload, ReloadConfig { watch: false });
        assert_eq!(c.reload.watch, DEFAULT_RELOAD_WATCH);
        assert_eq!(one_route(FULL_ROUTE).mode, RouteMode::Enforce);
        assert_eq!(DEFAULT_ROUTE_MODE, RouteMode::Enforce);
        let empty = parse("admin:\nreload:\nstore:\n  kind: memory\n");
        assert_eq!(
            (empty.admin, empty.reload, empty.state_file),
            (AdminConfig::default(), ReloadConfig::default(), None)
        );
    }

    #[test]
    fn route_mode_comes_from_the_route_or_defaults() {
        assert_eq!(
            one_route(&format!("    mode: shadow\n{FULL_ROUTE}")).mode,
            RouteMode::Shadow
        );
        assert_eq!(
            one_route(&format!("    mode: enforce\n{FULL_ROUTE}")).mode,
            RouteMode::Enforce
        );
        let c = parse(&dedent(
            r#"
            defaults:
              mode: shadow
            routes:
              - name: a
                path: "/a"
                limit: 1
                per: "1m"
                lock: "1m"
              - name: b
                path: "/b"
                limit: 1
                per: "1m"
                lock: "1m"
                mode: enforce
            "#,
        ));
        let modes: Vec<RouteMode> = c.routes.iter().map(|r| r.mode).collect();
        assert_eq!(modes, [RouteMode::Shadow, RouteMode::Enforce]);
    }

    #[test]
    fn bad_route_modes_are_refused() {
        for (value, found) in [
            ("dry-run", "unknown value \"dry-run\""),
            ("true", "the boolean true"),
        ] {
            let errs = errors(&format!(
                "{UPSTREAM}routes:\n  - name: r\n    path: \"/a\"\n{FULL_ROUTE}    mode: {value}\n"
            ));
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!((errs[0].key.as_str(), errs[0].line), ("routes[0].mode", 8));
            assert!(errs[0].message.contains(found), "{}", errs[0].message);
            assert!(
                errs[0].message.contains("enforce, shadow"),
                "{}",
                errs[0].message
            );
        }
    }

    fn store_errors(store: &str) -> Vec<ConfigError> {
        errors(&format!("{UPSTREAM}store:\n{store}"))
    }

    #[test]
    fn state_file_is_read_with_the_memory_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("state.json");
        let text = format!("store:\n  state_file: \"{}\"\n", file.display());
        assert_eq!(parse(&text).state_file, Some(file.clone()));
        let text = format!(
            "store:\n  kind: memory\n  state_file: \"{}\"\n",
            file.display()
        );
        let c = parse(&text);
        assert_eq!((c.store, c.state_file), (StoreConfig::Memory, Some(file)));
        // Held in memory (no file): a relative path is taken from the working directory.
        assert_eq!(
            parse("store:\n  state_file: \"state.json\"\n").state_file,
            Some(PathBuf::from("state.json"))
        );
    }

    #[test]
    fn state_file_is_taken_from_the_config_files_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("var")).expect("mkdir");
        let path = dir.path().join("cliqgate.yaml");
        let text = format!("{UPSTREAM}store:\n  state_file: \"var/state.json\"\n");
        std::fs::write(&path, text).expect("write");
        let c = Config::load(&path).expect("loads");
        assert_eq!(c.state_file, Some(dir.path().join("var/state.json")));
    }

    #[test]
    fn state_file_needs_an_existing_directory_and_a_file_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope").join("state.json");
        let errs = store_errors(&format!("  state_file: \"{}\"\n", missing.display()));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line),
            ("store.state_file", 3)
        );
        let expected = format!("no such directory: {}", dir.path().join("nope").display());
        assert!(errs[0].message.contains(&expected), "{}", errs[0].message);
        for path in [
            dir.path().display().to_string(),
            format!("{}/new/", dir.path().display()),
        ] {
            let errs = store_errors(&format!("  state_file: \"{path}\"\n"));
            assert_eq!(errs.len(), 1, "{path}: {errs:?}");
            assert!(
                errs[0]
                    .message
                    .contains("is a directory; name a file in it"),
                "{}",
                errs[0].message
            );
        }
        for (value, why) in [("\"\"", "must not be empty"), ("7", "found the integer 7")] {
            let errs = store_errors(&format!("  state_file: {value}\n"));
            assert_eq!(errs.len(), 1, "{value}: {errs:?}");
            assert!(errs[0].message.contains(why), "{}", errs[0].message);
        }
    }

    #[test]
    fn state_file_is_refused_under_redis_and_checked_under_a_bad_kind() {
        let errs = store_errors(
            "  kind: redis\n  url: \"redis://127.0.0.1:6379/0\"\n  state_file: \"s.json\"\n",
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].key.as_str(), errs[0].line),
            ("store.state_file", 5)
        );
        assert!(
            errs[0]
                .message
                .contains("the Redis store keeps its state in Redis"),
            "{}",
            errs[0].message
        );
        let errs = store_errors("  kind: disk\n  state_file: \"/no/such/dir/s.json\"\n");
        let found: Vec<(&str, usize)> = errs.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [("store.kind", 3), ("store.state_file", 4)],
            "{errs:?}"
        );
    }

    const TOKEN: &str = "0123456789abcdef";

    #[test]
    fn admin_token_of_16_printable_characters_is_kept() {
        let c = parse(&format!("admin:\n  token: \"{TOKEN}\"\n"));
        assert_eq!(c.admin.token.as_deref(), Some(TOKEN));
        assert_eq!(TOKEN.len(), MIN_ADMIN_TOKEN_CHARS);
        let shown = format!("{:?}\n{}", c, c.describe());
        assert!(!shown.contains(TOKEN), "{shown}");
        assert!(shown.contains("admin token set"), "{shown}");
        assert!(!parse("").describe().contains("token set"));
    }

    #[test]
    fn bad_admin_tokens_are_refused_without_being_quoted() {
        for (value, secret, why) in [
            (
                "\"0123456789abcde\"",
                "0123456789abcde",
                "is shorter than 16 characters",
            ),
            ("\"\"", "", "must not be empty"),
            (
                "\"0123456789 abcdef\"",
                "0123456789 abcdef",
                "printable ASCII characters, no spaces",
            ),
            (
                "\"0123456789abcdé-x\"",
                "0123456789abcdé",
                "printable ASCII",
            ),
            (
                "123456789012345678",
                "123456789012345678",
                "expected a string, found a number",
            ),
            ("", "", "expected a string, found an empty value"),
            (
                "[\"0123456789abcdef0\"]",
                "0123456789abcdef0",
                "found a list",
            ),
        ] {
            let errs = errors(&format!("{UPSTREAM}admin:\n  token: {value}\n"));
            assert_eq!(errs.len(), 1, "{value}: {errs:?}");
            assert_eq!((errs[0].key.as_str(), errs[0].line), ("admin.token", 3));
            assert!(
                errs[0].message.contains(why),
                "{value}: {}",
                errs[0].message
            );
            assert!(
                errs[0].message.contains("it guards the admin API"),
                "{}",
                errs[0].message
            );
            if !secret.is_empty() {
                assert!(!format!("{errs:?}").contains(secret), "{errs:?}");
            }
        }
    }

    #[test]
    fn anything_misplaced_under_admin_is_reported_without_being_quoted() {
        let secret = "Sup3r-Secret-Admin-Token";
        for text in [
            format!("admin: \"{secret}\"\n"),
            format!("admin:\n  {secret}: 1\n"),
            format!("admin:\n  - \"{secret}\"\n"),
            format!("admin: {{{secret}}}\n"),
        ] {
            let errs = errors(&format!("{UPSTREAM}{text}"));
            assert_eq!(errs.len(), 1, "{text}: {errs:?}");
            assert_eq!(errs[0].key, "admin", "{text}");
            assert!(!format!("{errs:?}").contains(secret), "{text}: {errs:?}");
        }
    }

    #[test]
    fn reload_watch_takes_a_boolean() {
        assert!(parse("reload:\n  watch: true\n").reload.watch);
        assert!(!parse("reload:\n  watch: false\n").reload.watch);
        for (value, found) in [
            ("\"yes\"", "found the string \"yes\""),
            ("yes", "found the string \"yes\""),
            ("1", "found the integer 1"),
            ("", "found an empty value"),
        ] {
            let errs = errors(&format!("{UPSTREAM}reload:\n  watch: {value}\n"));
            assert_eq!(errs.len(), 1, "{value}: {errs:?}");
            assert_eq!((errs[0].key.as_str(), errs[0].line), ("reload.watch", 3));
            assert!(
                errs[0].message.contains("expected true or false"),
                "{}",
                errs[0].message
            );
            assert!(errs[0].message.contains(found), "{}", errs[0].message);
        }
        let errs = errors(&format!("{UPSTREAM}reload:\n  wach: true\n"));
        assert!(
            errs[0].message.contains("did you mean `watch`?"),
            "{errs:?}"
        );
    }

    #[test]
    fn describe_shows_the_operations_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("state.json");
        let c = parse(&format!(
            "store:\n  state_file: \"{}\"\nreload:\n  watch: true\nroutes:\n  - name: r\n    \
             path: \"/a\"\n    mode: shadow\n{FULL_ROUTE}",
            file.display()
        ));
        let text = c.describe();
        let first = text.lines().next().expect("header line");
        assert!(
            first.contains(&format!("store memory (state file {})", file.display())),
            "{text}"
        );
        assert!(first.contains("reload on SIGHUP and file change"), "{text}");
        let mut lines = text.lines().skip(1);
        let columns = lines.next().expect("column names");
        let columns: Vec<&str> = columns.split_whitespace().collect();
        assert_eq!(
            columns[columns.len() - 4..],
            ["ALGORITHM", "MODE", "VALIDATE", "PATHS"]
        );
        let route = lines.next().expect("route line");
        assert!(route.contains(" shadow "), "{route}");
        assert!(parse("")
            .describe()
            .lines()
            .next()
            .is_some_and(|l| !l.contains("reload")));
    }

    #[test]
    fn known_keys_list_every_section_key_once() {
        let keys = known_keys();
        for key in [
            "upstream",
            "admin",
            "reload",
            "identity.trusted_networks",
            "store.state_file",
            "timeouts.shutdown",
            "admin.token",
            "reload.watch",
            "defaults.mode",
            "routes[].mode",
            "routes[].path",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        assert!(!keys
            .iter()
            .any(|k| k == "defaults.name" || k == "defaults.path"));
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        // Every top-level key holding a mapping has its section listed.
        for (section, _) in SECTIONS {
            let name = section.trim_end_matches("[]");
            assert!(TOP.allowed.contains(&name), "{section}");
        }
    }

    #[test]
    fn the_json_schema_is_json() {
        let schema: serde_json::Value = serde_json::from_str(JSON_SCHEMA).expect("valid JSON");
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
    }

    // ---- Shipped files ----

    fn shipped() -> Config {
        match Config::from_yaml(include_str!("../config/cliq.yaml")) {
            Ok(c) => c,
            Err(e) => panic!("config/cliq.yaml must parse:\n{e}"),
        }
    }

    fn shipped_route(name: &str) -> RouteConfig {
        shipped()
            .routes
            .into_iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("route {name}"))
    }

    #[test]
    fn shipped_config_parses_with_the_spec_settings() {
        let c = shipped();
        assert_eq!(
            c.listen,
            "0.0.0.0:8080".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(
            c.admin_listen,
            "127.0.0.1:9090".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(
            (c.upstream.scheme.as_str(), c.upstream.authority.as_str()),
            ("https", "cliq.zoho.com")
        );
        assert_eq!(c.safety_margin, Duration::from_secs(1));
        assert_eq!(
            (c.identity, c.store),
            (IdentityConfig::Token, StoreConfig::Memory)
        );
        assert!(c
            .routes
            .iter()
            .all(|r| r.on_limit == OnLimit::Queue && r.max_wait == Duration::from_secs(30)));
    }

    #[test]
    fn shipped_config_validates_the_endpoints_with_documented_input_limits() {
        let c = shipped();
        let validated: Vec<(&str, &str)> = c
            .routes
            .iter()
            .filter_map(|r| r.validate.map(|set| (r.name.as_str(), set.name)))
            .collect();
        assert_eq!(
            validated,
            [
                ("chats.delete_messages", "cliq.delete_messages"),
                ("messages.forward", "cliq.forward_messages"),
                ("messages.search", "cliq.search_messages"),
            ]
        );
    }

    #[test]
    fn shipped_extension_values_are_the_defaults() {
        // cliq.yaml says "the values shown are the defaults": keep that true.
        let c = shipped();
        let d = parse("");
        assert_eq!(
            (c.timeouts, c.http, c.queue, c.log),
            (d.timeouts, d.http, d.queue, d.log)
        );
    }

    /// Every endpoint of ../shared/cliq-api.md: method, a real request path, the route that must
    /// take it, and its figures (limit per `per`, lock), stricter figure where sources disagree.
    const ENDPOINTS: &[(&str, &str, &str, u32, u64, u64)] = &[
        (
            "DELETE",
            "/api/v3/chats/C1/messages",
            "chats.delete_messages",
            20,
            60,
            300,
        ),
        (
            "DELETE",
            "/api/v3/chats/C1/messagess",
            "chats.delete_messages",
            20,
            60,
            300,
        ),
        (
            "POST",
            "/api/v3/channelsbyname/ops/message",
            "channels.post_message_by_name",
            20,
            60,
            600,
        ),
        (
            "POST",
            "/api/v3/channelsbyname/ops/messages",
            "channels.post_message_by_name",
            20,
            60,
            600,
        ),
        (
            "POST",
            "/api/v3/chats/C1/message",
            "chats.post_message",
            20,
            60,
            600,
        ),
        (
            "POST",
            "/api/v3/chats/C1/messages",
            "chats.post_message",
            20,
            60,
            600,
        ),
        ("POST", "/api/v3/messages", "messages.forward", 50, 60, 600),
        (
            "GET",
            "/api/v3/messages/search",
            "messages.search",
            50,
            60,
            600,
        ),
        (
            "POST",
            "/api/v3/channels/CH1/messages",
            "channels.post_message",
            50,
            60,
            600,
        ),
        (
            "POST",
            "/api/v3/bots/helper/messages",
            "bots.post_message",
            50,
            60,
            600,
        ),
        (
            "POST",
            "/api/v3/bots/helper/incoming",
            "bots.incoming",
            50,
            60,
            600,
        ),
        (
            "POST",
            "/api/v3/bots/helper/calls",
            "bots.calls",
            10,
            300,
            1800,
        ),
        (
            "GET",
            "/api/v2/chats/C1/messages",
            "chats.get_messages",
            15,
            60,
            600,
        ),
        (
            "GET",
            "/api/v2/chats/C1/messages/M%201",
            "messages.get",
            30,
            60,
            300,
        ),
        (
            "POST",
            "/api/v2/chats/C1/message",
            "chats.post_message_v2",
            50,
            60,
            600,
        ),
        (
            "POST",
            "/api/v2/channelsbyname/ops/message",
            "channels.post_message_by_name_v2",
            50,
            60,
            600,
        ),
        (
            "POST",
            "/api/v2/bots/helper/message",
            "bots.post_message_v2",
            50,
            60,
            600,
        ),
        (
            "POST",
            "/api/v2/buddies/a@b.c/message",
            "buddies.post_message_v2",
            50,
            60,
            600,
        ),
        (
            "PUT",
            "/api/v2/chats/C1/messages/M1",
            "messages.edit",
            50,
            60,
            600,
        ),
        (
            "DELETE",
            "/api/v2/chats/C1/messages/M1",
            "messages.delete",
            20,
            60,
            300,
        ),
        (
            "GET",
            "/api/v2/chats/C1/messages/M1/reactions",
            "reactions.list",
            50,
            60,
            600,
        ),
        (
            "POST",
            "/api/v2/chats/C1/messages/M1/reactions",
            "reactions.add",
            20,
            60,
            300,
        ),
        (
            "DELETE",
            "/api/v2/chats/C1/messages/M1/reactions",
            "reactions.remove",
            20,
            60,
            300,
        ),
        (
            "POST",
            "/api/v2/chats/C1/files",
            "chats.share_file",
            20,
            60,
            600,
        ),
        (
            "POST",
            "/api/v2/channelsbyname/ops/files",
            "channels.share_file_by_name",
            20,
            60,
            600,
        ),
        (
            "POST",
            "/api/v2/bots/helper/files",
            "bots.share_file",
            20,
            60,
            600,
        ),
        (
            "POST",
            "/api/v2/buddies/a@b.c/files",
            "buddies.share_file",
            20,
            60,
            600,
        ),
        ("GET", "/api/v2/me", "users.me", 20, 60, 600),
    ];

    #[test]
    fn shipped_config_routes_every_endpoint_to_its_own_route_with_the_stricter_figures() {
        let c = shipped();
        let table = crate::route::RouteTable::new(&c.routes);
        for &(method, path, name, limit, per, lock) in ENDPOINTS {
            let method = Method::from_bytes(method.as_bytes()).expect("method");
            let id = table
                .find(&method, path)
                .unwrap_or_else(|| panic!("{method} {path} matches no route"));
            let route = &c.routes[id.0 as usize];
            assert_eq!(route.name, name, "{method} {path}");
            assert_eq!(
                (route.limit.get(), route.per, route.lock),
                (limit, Duration::from_secs(per), Duration::from_secs(lock)),
                "{name}"
            );
        }
        let mut names: Vec<&str> = ENDPOINTS.iter().map(|e| e.2).collect();
        names.dedup();
        assert_eq!(
            c.routes.len(),
            names.len(),
            "one route per endpoint, no extras"
        );
    }

    #[test]
    fn shipped_chats_post_message_is_20_per_minute_with_a_10_minute_lock() {
        let r = shipped_route("chats.post_message");
        assert_eq!(r.method, Some(Method::POST));
        assert_eq!(
            (r.limit.get(), r.per, r.lock),
            (20, Duration::from_secs(60), Duration::from_secs(600))
        );
        assert_eq!(
            r.paths,
            [
                "/api/v3/chats/{chat_id}/message",
                "/api/v3/chats/{chat_id}/messages"
            ]
        );
    }

    #[test]
    fn shipped_bot_calls_count_over_five_minutes() {
        let r = shipped_route("bots.calls");
        assert_eq!(
            (r.limit.get(), r.per, r.lock),
            (10, Duration::from_secs(300), Duration::from_secs(1800))
        );
    }

    #[test]
    fn shipped_egress_config_shares_a_redis_and_the_cliq_routes() {
        let egress = match Config::from_yaml(include_str!("../config/egress.yaml")) {
            Ok(c) => c,
            Err(e) => panic!("config/egress.yaml must parse:\n{e}"),
        };
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            (egress.listen, egress.admin_listen),
            (addr("0.0.0.0:8080"), addr("0.0.0.0:9090"))
        );
        assert_eq!(
            egress.store,
            StoreConfig::Redis(RedisStoreConfig {
                url: "redis://redis:6379/0".into(),
                on_error: OnStoreError::Local,
                replicas: nz(3),
                timeout: DEFAULT_REDIS_TIMEOUT,
                connect_timeout: DEFAULT_REDIS_CONNECT_TIMEOUT,
            })
        );
        // Same routes in the same order, field for field; only the line numbers differ.
        let without_lines = |c: Config| -> Vec<RouteConfig> {
            c.routes
                .into_iter()
                .map(|r| RouteConfig { line: 0, ..r })
                .collect()
        };
        let cliq = shipped();
        assert_eq!(
            (
                egress.upstream.clone(),
                egress.safety_margin,
                egress.unmatched
            ),
            (cliq.upstream.clone(), cliq.safety_margin, cliq.unmatched)
        );
        assert_eq!(
            (egress.timeouts, egress.http, egress.queue, &egress.log),
            (cliq.timeouts, cliq.http, cliq.queue, &cliq.log)
        );
        assert_eq!(egress.identity, cliq.identity);
        let (egress_routes, cliq_routes) = (without_lines(egress), without_lines(cliq));
        assert_eq!(egress_routes.len(), cliq_routes.len());
        for (e, c) in egress_routes.iter().zip(&cliq_routes) {
            assert_eq!(e, c, "route {}", c.name);
        }
    }

    /// The commented-out `identity` keys of a shipped file, switched on for `mode`: every line
    /// `  # key: value` of the block whose key that mode reads.
    fn shipped_identity_block(text: &str, mode: &str, keys: &[&str]) -> String {
        let mut block = format!("identity:\n  mode: {mode}\n");
        let lines = text
            .lines()
            .skip_while(|l| !l.starts_with("identity:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "));
        for line in lines {
            if let Some(rest) = line.strip_prefix("  # ") {
                if keys.iter().any(|k| rest.starts_with(&format!("{k}:"))) {
                    block.push_str(&format!("  {rest}\n"));
                }
            }
        }
        block
    }

    #[test]
    fn shipped_identity_comments_parse_in_each_mode() {
        for (file, text) in [
            ("cliq.yaml", include_str!("../config/cliq.yaml")),
            ("egress.yaml", include_str!("../config/egress.yaml")),
        ] {
            let block = shipped_identity_block(text, "resolve", &RESOLVE_KEYS);
            assert_eq!(
                block.lines().count(),
                2 + RESOLVE_KEYS.len(),
                "{file}:\n{block}"
            );
            let IdentityConfig::Resolve(r) = parse(&block).identity else {
                panic!("{file}: expected resolve");
            };
            assert_eq!(
                (r.url.to_string().as_str(), r.user_field.as_str()),
                ("https://cliq.zoho.com/api/v2/me", "/data/zuid"),
                "{file}"
            );
            // The values shown are the defaults.
            assert_eq!(
                r,
                ResolveConfig {
                    url: r.url.clone(),
                    user_field: r.user_field.clone(),
                    lookup_reserve: r.lookup_reserve,
                    ..resolve("")
                },
                "{file}"
            );
            let block = shipped_identity_block(text, "header", &HEADER_KEYS);
            assert_eq!(
                block.lines().count(),
                2 + HEADER_KEYS.len(),
                "{file}:\n{block}"
            );
            let IdentityConfig::Header { name, .. } = parse(&block).identity else {
                panic!("{file}: expected header");
            };
            assert_eq!(name.as_str(), "x-cliq-user", "{file}");
        }
        let cliq =
            shipped_identity_block(include_str!("../config/cliq.yaml"), "header", &HEADER_KEYS);
        let IdentityConfig::Header { trusted, .. } = parse(&cliq).identity else {
            panic!("expected header");
        };
        assert_eq!(
            trusted,
            default_trusted_networks(),
            "cliq.yaml shows the default"
        );
    }

    #[test]
    fn shipped_state_file_comment_names_the_interval() {
        let every = format!("every {}", format_duration(STATE_FILE_INTERVAL));
        assert!(
            include_str!("../config/cliq.yaml").contains(&every),
            "{every}"
        );
    }

    #[test]
    fn minimal_config_parses() {
        let c =
            Config::from_yaml(include_str!("../config/minimal.yaml")).expect("minimal.yaml parses");
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn describe_prints_a_header_and_one_line_per_route() {
        let c = shipped();
        let text = c.describe();
        assert!(
            text.starts_with("upstream https://cliq.zoho.com  identity token  store memory"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 2 + c.routes.len(), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("chats.post_message "))
            .expect("route line");
        for part in [
            "POST",
            "20/1m",
            "10m",
            "1m1s",
            "queue max_wait 30s",
            "window",
            "/api/v3/chats/{chat_id}/message",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
        let gcra = one_route(&format!(
            "    algorithm: gcra\n    burst: 2\n    on_limit: reject\n{FULL_ROUTE}"
        ));
        let c = Config {
            routes: vec![gcra],
            ..parse("")
        };
        let line = c.describe().lines().nth(2).expect("route line").to_string();
        assert!(
            line.contains("gcra burst 2") && line.contains("reject") && line.contains(" * "),
            "{line}"
        );
        assert!(!line.contains("max_wait"), "{line}");
    }
}
