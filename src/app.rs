//! Binds the listeners (port 0 works, for tests) and runs the proxy until shutdown.
//!
//! Threads: the proxy listener is served by `workers` threads, each with its own single-threaded
//! tokio runtime, its own `SO_REUSEPORT` listener on the same address (the kernel spreads new
//! connections over them, evened out by [`crate::server::spread`]) and its own idle upstream
//! connections, so a call never leaves the thread that serves its connection (nginx's worker
//! model; measured in benches/load/RESULTS.md: a third less CPU per call than one work-stealing
//! runtime, whose cross-thread wake-ups dominate a proxy's cost).
//! The limiter store, metrics and config are shared by all of them. The admin listener, the
//! sweeper, the Redis prober and signals run on the runtime that called [`start`].
//!
//! Shutdown: stop accepting, let in-flight calls finish (bounded by `timeouts.shutdown`: hyper's
//! graceful shutdown can wait forever on idle connections), then return.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{Config, ConfigErrors, IdentityConfig, LookupSplit, OnLimit, StoreConfig};
use crate::identity::scheme_id;
use crate::limit::{
    Limiter, MemoryStore, RedisOptions, RedisStore, RouteNames, Store, StoreError, TokioClock,
};
use crate::metrics::Metrics;
use crate::proxy::{Drain, Handover, Proxy};
use crate::resolve::Answers;
use crate::server::spread::{self, Placed, Share};
use crate::upstream::{Upstream, UpstreamSetupError};

/// How often idle limiter keys are swept: memory follows active users within this delay.
const EVICT_INTERVAL: Duration = Duration::from_secs(10);
/// Pending connections per worker listener (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 1024;
/// Room above `max_header_bytes` for the request line, so oversized fields get cliqgate's own
/// Zoho-style 431 rather than hyper's bare one.
const HEAD_BUFFER_SLACK: usize = 16 * 1024;

/// A running proxy: its bound addresses and a handle to reload or stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The proxy of the current config; a reload swaps it, calls in flight keep theirs.
    current: Arc<ArcSwap<Proxy>>,
    /// Reloads so far: one applied later (after Redis holds every key) checks it is the newest.
    reloads: Arc<AtomicU64>,
    /// Resolve mode, while a reload's change of shares is held back: the shares in force before
    /// it, and until when calls decided under them can share a window with new ones. Locked by a
    /// reload until its proxy is current, and by the task that ends a hold (which replaces only
    /// the held proxy).
    split_before: Arc<std::sync::Mutex<SplitBefore>>,
    /// What outlives a reload: limiter state (route ids by name), metrics, the drain signal.
    shared: Shared,
    stop: watch::Sender<bool>,
    /// One per worker thread: resolves when that worker has drained and stopped.
    workers: Vec<oneshot::Receiver<()>>,
    admin: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    prober: Option<JoinHandle<()>>,
    /// Restart safety (memory store with `state_file`): written periodically and on shutdown.
    state: Option<crate::state::StateKeeper>,
}

/// What a proxy is built from besides its config, kept across reloads.
#[derive(Clone)]
struct Shared {
    limiter: Arc<Store>,
    metrics: Arc<Metrics>,
    names: Arc<RouteNames>,
    drain: Arc<Drain>,
}

impl Shared {
    /// `answers`: the identity answers so far (the replaced proxy's, or those kept in a state
    /// file); `lookup_split`: resolve mode's shares to apply instead of the config's.
    fn proxy(
        &self,
        config: Config,
        upstream: Upstream,
        answers: Option<Answers>,
        lookup_split: Option<LookupSplit>,
    ) -> Proxy {
        let handover = Handover {
            answers,
            lookup_split,
        };
        Proxy::new(
            config,
            self.limiter.clone(),
            upstream,
            self.metrics.clone(),
            &self.names,
            self.drain.clone(),
            handover,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("invalid config:\n{0}")]
    Config(ConfigErrors),
    #[error(transparent)]
    Start(StartError),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error("cannot start a worker thread: {0}")]
    Worker(std::io::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What [`Running::split_before`] holds.
type SplitBefore = Option<(LookupSplit, tokio::time::Instant)>;

/// Resolve mode: the shares a reload to `config` applies for a while, and until when, if they
/// must be smaller than its own. A window holding calls decided under the shares in force until
/// now and under the new ones must not hold more than the endpoint's limit, so each side gets the
/// smaller of the two, until calls decided under the old shares (queued ones included, sent up
/// to `promised`, the longest `max_wait` of either config, later) have left the window. Within
/// such a hold, the shares before it still count. Not when users are rekeyed: every key is held
/// then anyway.
fn held_split(
    before: &mut SplitBefore,
    old: &Proxy,
    config: &Config,
    rekeyed: bool,
    promised: Duration,
) -> Option<(LookupSplit, tokio::time::Instant)> {
    let now = tokio::time::Instant::now();
    let name = |c: &Config| c.identity_route().map(|i| c.routes[i].name.clone());
    let (Some(new), Some(in_force), false, true) = (
        config.lookup_split(),
        old.lookup_split,
        rekeyed,
        name(config) == name(&old.config),
    ) else {
        *before = None;
        return None;
    };
    let (recent, earlier) = match *before {
        Some((split, until)) if until > now => (split, Some(until)),
        _ => (in_force, None),
    };
    let held = new.min(recent);
    if held == new {
        *before = None;
        return None;
    }
    let window = identity_window(config).max(identity_window(&old.config));
    // Never before an earlier hold would have ended: calls queued under the config before it
    // may wait longer than under the last two.
    let until = (now + promised + window).max(earlier.unwrap_or(now));
    *before = Some((recent, until));
    Some((held, until))
}

/// The identity endpoint's window (resolve mode): its route's `per`, or Zoho's published minute,
/// plus the safety margin.
fn identity_window(config: &Config) -> Duration {
    let per = config
        .identity_route()
        .map_or(crate::resolve::IDENTITY_PER, |i| config.routes[i].per);
    per + config.safety_margin
}

/// Key prefix of everything cliqgate keeps in Redis.
const REDIS_PREFIX: &str = "cliqgate:";

/// The configured limiter store. Redis is connected lazily: the proxy starts even if it is down.
fn open_store(
    config: &Config,
    metrics: &Arc<Metrics>,
    names: &Arc<RouteNames>,
) -> Result<Arc<Store>, StartError> {
    // Starting the clock a window in the past lets sends restored from a state file keep their
    // true age instead of being moved up to the process start.
    let max_window = config
        .routes
        .iter()
        .map(|r| r.per + config.safety_margin)
        .max()
        .unwrap_or_default();
    let clock = Arc::new(TokioClock::with_history(max_window));
    let max_wait = longest_queue_wait(config);
    let store = match &config.store {
        StoreConfig::Memory => Store::Memory(MemoryStore::new(clock, config.queue.max_total)),
        StoreConfig::Redis(redis) => {
            let options = RedisOptions {
                url: redis.url.clone(),
                timeout: redis.timeout,
                connect_timeout: redis.connect_timeout,
                on_error: redis.on_error,
                replicas: redis.replicas.get(),
                prefix: REDIS_PREFIX.to_string(),
                routes: names.clone(),
                max_window,
                max_wait,
                max_queued_total: config.queue.max_total,
                injected_time: false,
            };
            tracing::info!(url = %redis.redacted_url(), on_error = ?redis.on_error, "using the Redis store");
            Store::Redis(Arc::new(RedisStore::open(
                options,
                clock,
                Some(metrics.clone()),
            )?))
        }
    };
    Ok(Arc::new(store))
}

/// The longest `max_wait` of any route that queues: how far ahead a slot may be promised.
pub(crate) fn longest_queue_wait(config: &Config) -> Duration {
    config
        .routes
        .iter()
        .filter(|r| r.on_limit == OnLimit::Queue)
        .map(|r| r.max_wait)
        .max()
        .unwrap_or_default()
}

/// The number of proxy worker threads when none is given: one per CPU the process may use.
pub fn default_workers() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// Starts the proxy and admin listeners on the configured addresses, with
/// [`default_workers`] proxy threads.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with_workers(config, default_workers()).await
}

/// Starts the proxy and admin listeners, the proxy listener served by `workers` threads.
pub async fn start_with_workers(
    config: Config,
    workers: NonZeroUsize,
) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let names = RouteNames::new(config.routes.iter().map(|r| r.name.clone()));
    let limiter = open_store(&config, &metrics, &names)?;
    // Restart safety: load the state file (if configured) before the first call is decided.
    let state = crate::state::resume(&config, &limiter, &names);
    let shared = Shared {
        limiter: limiter.clone(),
        metrics,
        names,
        drain: Arc::new(Drain::default()),
    };
    let upstream = Upstream::new(&config)?;
    let (listen, admin_listen) = (config.listen, config.admin_listen);
    let answers = crate::state::restore_answers(&config).await;
    let proxy = Arc::new(shared.proxy(config, upstream, answers, None));
    let current = Arc::new(ArcSwap::new(proxy.clone()));
    if let Some(state) = &state {
        let current = current.clone();
        state.follow(move || {
            let proxy = current.load();
            (scheme_id(&proxy.config.identity), proxy.answers())
        });
    }

    let (proxy_addr, listeners) = bind_workers(listen, workers)?;
    let admin_listener = bind("admin listener", admin_listen).await?;
    let admin_addr = local_addr(&admin_listener, admin_listen)?;
    if let Store::Redis(redis) = limiter.as_ref() {
        // A restart that changes how users are keyed holds every key fleet-wide, as a reload
        // does; decided once the listeners are bound (a start that fails records nothing) and
        // before any call is.
        let scheme = scheme_id(&proxy.config.identity);
        if redis.identity_scheme_may_differ(&scheme).await {
            tracing::warn!(
                "identity may have changed since the fleet last started: users' calls count under \
                 new keys; every key is held for a window, as if its quota had just been used"
            );
            redis.restart_epoch(longest_queue_wait(&proxy.config)).await;
        }
        redis.record_identity_scheme(&scheme).await;
    }
    let (stop, stopped) = watch::channel(false);

    let mut worker_done = Vec::with_capacity(listeners.len());
    let shares = spread::shares(
        (0..listeners.len())
            .map(|index| shared.metrics.worker_connections(index))
            .collect(),
    );
    for (index, (listener, share)) in listeners.into_iter().zip(shares).enumerate() {
        let limits = server_limits(&proxy.config);
        // The drain is bounded by the shutdown timeout of the config current when it begins (a
        // reload may have changed it): queued calls are promised a send before that deadline.
        let drain = {
            let current = current.clone();
            move || current.load().config.timeouts.shutdown
        };
        let current = current.clone();
        let service = move |req, peer| {
            // Each call runs on the config current when it arrived, to its end.
            current.load_full().handle(req, peer)
        };
        let stopped = stopped.clone();
        let metrics = shared.metrics.clone();
        let lingering = shared.drain.clone();
        // Everything that can fail happens here, before the thread starts: a worker that could
        // not start would silently leave its share of connections unserved.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Worker)?;
        let listener = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(listener).map_err(StartError::Worker)?
        };
        let (done, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("cliqgate-worker-{index}"))
            .spawn(move || {
                runtime.block_on(async {
                    let mut stop = stopped.clone();
                    let serving = crate::server::serve(
                        listener, share, service, stopped, limits, &drain, metrics,
                    );
                    let deadline = async {
                        until_stopped(&mut stop).await;
                        tokio::time::Instant::now() + drain()
                    };
                    let ((), deadline) = tokio::join!(serving, deadline);
                    settle(&lingering, deadline).await;
                });
                // This worker's idle upstream connections close before its runtime.
                crate::upstream::close_idle();
                drop(runtime);
                let _ = done.send(());
            })
            .map_err(StartError::Worker)?;
        worker_done.push(done_rx);
    }
    let admin = {
        let current = current.clone();
        let service = move |req, _peer| {
            let proxy = current.load_full();
            async move { Ok::<_, Infallible>(crate::admin::handle(proxy, req).await) }
        };
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::spawn(serve(
            admin_listener,
            builder,
            service,
            stopped.clone(),
            || Duration::from_secs(1),
        ))
    };
    let prober = match limiter.as_ref() {
        Store::Redis(redis) => {
            // Connect now rather than on the first call, so that call does not pay for the
            // connection (or find out that Redis is down).
            redis.probe().await;
            Some(tokio::spawn(redis.clone().probe_forever()))
        }
        Store::Memory(_) => None,
    };
    let sweeper = tokio::spawn(sweep(limiter, stopped));
    tracing::info!(%proxy_addr, %admin_addr, workers = workers.get(), "cliqgate listening");
    Ok(Running {
        prober,
        proxy_addr,
        admin_addr,
        current,
        reloads: Arc::new(AtomicU64::new(0)),
        split_before: Arc::default(),
        shared,
        stop,
        workers: worker_done,
        admin,
        sweeper,
        state,
    })
}

impl Running {
    /// The proxy of the current config.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    /// Applies a new config to calls that arrive from now on. Connections stay open, queued and
    /// in-flight calls finish on the config they started with, and limiter state of every route
    /// whose name is unchanged is kept (a route is its name). Listeners and the store cannot
    /// change without a restart: such changes are ignored with a warning.
    pub fn reload(&self, mut config: Config) -> Result<(), StartError> {
        let old = self.current.load_full();
        if (config.listen, config.admin_listen) != (old.config.listen, old.config.admin_listen) {
            tracing::warn!(
                "listen and admin_listen change only with a restart; keeping the current ones"
            );
            (config.listen, config.admin_listen) = (old.config.listen, old.config.admin_listen);
        }
        if config.log != old.config.log || config.reload != old.config.reload {
            tracing::warn!(
                "log and reload.watch change only with a restart; keeping the current ones"
            );
            config.log = old.config.log.clone();
            config.reload = old.config.reload;
        }
        if config.store != old.config.store || config.state_file != old.config.state_file {
            tracing::warn!("the store changes only with a restart; keeping the current one");
            config.store = old.config.store.clone();
            config.state_file = old.config.state_file.clone();
        }
        let same_upstream = config.upstream == old.config.upstream
            && config.upstream_ca_file == old.config.upstream_ca_file
            && config.timeouts == old.config.timeouts;
        let upstream = if same_upstream {
            old.upstream().clone()
        } else {
            Upstream::new(&config)?
        };
        let queue_wait = longest_queue_wait(&config);
        if let Store::Redis(redis) = self.shared.limiter.as_ref() {
            redis.queue_waits_up_to(queue_wait);
        }
        let rekeyed = scheme_id(&config.identity) != scheme_id(&old.config.identity);
        // Calls queued under the old keys still go at their slots, up to the longest wait ahead.
        let promised = longest_queue_wait(&old.config).max(queue_wait);
        let routes = config.routes.len();
        // Held from deciding the shares until the new proxy is current, and by the task that
        // ends a hold: neither can act on a proxy the other is replacing.
        let mut before = self.split_before.lock().unwrap_or_else(|e| e.into_inner());
        let hold = held_split(&mut before, &old, &config, rekeyed, promised);
        // One set of answers for the proxies of this config (held, then final).
        let answers = match (&config.identity, old.answers()) {
            (IdentityConfig::Resolve(resolve), Some(answers)) => Some(answers.carried_to(resolve)),
            _ => None,
        };
        let generation = self.reloads.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some((held, until)) = hold {
            // Resolve mode's shares change: calls decided under the old ones stay in the identity
            // endpoint's window until `until`, so until then each side gets the smaller of its
            // old and new shares; then the config applies as it is.
            let later = self
                .shared
                .proxy(config.clone(), upstream.clone(), answers.clone(), None);
            let held_proxy = Arc::new(self.shared.proxy(config, upstream, answers, Some(held)));
            self.current.store(held_proxy.clone());
            drop(before);
            tracing::info!(
                routes,
                lookups = held.lookups.get(),
                own = held.own.get(),
                "config reloaded; the identity endpoint's new shares apply once the old ones' calls have left its window"
            );
            let (current, split_before) = (self.current.clone(), self.split_before.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(until).await;
                let mut before = split_before.lock().unwrap_or_else(|e| e.into_inner());
                // Only if no later reload has replaced the held proxy meanwhile.
                let previous = current.compare_and_swap(&held_proxy, Arc::new(later));
                if Arc::ptr_eq(&previous, &held_proxy) {
                    *before = None;
                    tracing::info!("the identity endpoint's new shares apply");
                }
            });
            return Ok(());
        }
        let proxy = Arc::new(self.shared.proxy(config, upstream, answers, None));
        if rekeyed {
            // What users sent before is recorded under keys their calls no longer map to: without
            // a hold, each would get a second quota in the window around the reload.
            tracing::warn!(
                "identity changed: users' calls count under new keys; every key is held until a \
                 window after the last queued call's slot, as if its quota had just been used"
            );
            match self.shared.limiter.as_ref() {
                Store::Memory(memory) => memory.hold_every_key(promised),
                Store::Redis(redis) => {
                    // The new config takes calls once Redis holds every key, fleet-wide (or, if
                    // Redis cannot be told now, once the local fallback does; Redis is told
                    // before it decides again). A later reload meanwhile wins.
                    let (redis, current) = (redis.clone(), self.current.clone());
                    let reloads = self.reloads.clone();
                    let scheme = scheme_id(&proxy.config.identity);
                    tokio::spawn(async move {
                        redis.restart_epoch(promised).await;
                        redis.record_identity_scheme(&scheme).await;
                        if reloads.load(Ordering::Acquire) == generation {
                            current.store(proxy);
                            tracing::info!(routes, "config reloaded");
                        }
                    });
                    return Ok(());
                }
            }
        }
        self.current.store(proxy);
        drop(before);
        tracing::info!(routes, "config reloaded");
        Ok(())
    }

    /// Reads `path` and applies it; a bad file changes nothing. Counted in
    /// `cliqgate_config_reloads_total{result}`.
    pub fn reload_from(&self, path: &Path) -> Result<(), ReloadError> {
        let result = Config::load(path)
            .map_err(ReloadError::Config)
            .and_then(|config| self.reload(config).map_err(ReloadError::Start));
        match &result {
            Ok(()) => self.shared.metrics.config_reload("success"),
            Err(e) => {
                self.shared.metrics.config_reload("failure");
                tracing::error!(file = %path.display(), error = %e, "config reload refused; the current config stays");
            }
        }
        result
    }

    /// Stops accepting, lets in-flight calls finish and queued calls be sent or refused (bounded
    /// by `timeouts.shutdown`), then returns.
    pub async fn shutdown(self) {
        self.trigger_shutdown();
        self.wait().await;
    }

    /// Asks the servers to stop, without waiting.
    pub fn trigger_shutdown(&self) {
        let timeout = self.current.load().config.timeouts.shutdown;
        self.shared.drain.begin(timeout);
        let _ = self.stop.send(true);
    }

    /// Waits until the servers have stopped.
    pub async fn wait(self) {
        for worker in self.workers {
            // An error only means the worker thread is gone, which is what is waited for.
            let _ = worker.await;
        }
        let _ = self.admin.await;
        self.sweeper.abort();
        if let Some(prober) = self.prober {
            prober.abort();
        }
        // Restart safety: the final state, after every call has been answered.
        if let Some(state) = self.state {
            state.finish().await;
        }
    }
}

fn server_limits(config: &Config) -> crate::server::Limits {
    crate::server::Limits {
        head_limit: (config.http.max_header_bytes + HEAD_BUFFER_SLACK).max(8192),
        max_header_bytes: config.http.max_header_bytes,
        client_header: config.timeouts.client_header,
        client_body: config.timeouts.client_body,
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// The proxy listener, once per worker: the first on the configured address (port 0 picks one),
/// the others on the address the first got, all with `SO_REUSEPORT` so the kernel spreads new
/// connections over the workers. Created on the calling runtime, handed over as std listeners,
/// with the address they share.
fn bind_workers(
    addr: SocketAddr,
    workers: NonZeroUsize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), StartError> {
    let what = "proxy listener";
    // SO_REUSEPORT would also let a second cliqgate (same user) join this port and silently
    // take half its calls, each counting only its own: a plain bind first fails if anything
    // already listens there, as a proxy without SO_REUSEPORT would.
    if addr.port() != 0 {
        drop(
            std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind {
                what,
                addr,
                source,
            })?,
        );
    }
    let mut bound = addr;
    let mut listeners = Vec::with_capacity(workers.get());
    for _ in 0..workers.get() {
        let bind_one = || -> std::io::Result<std::net::TcpListener> {
            let socket = if bound.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(bound)?;
            socket.listen(LISTEN_BACKLOG)?.into_std()
        };
        let listener = bind_one().map_err(|source| StartError::Bind {
            what,
            addr: bound,
            source,
        })?;
        if listeners.is_empty() {
            bound =
                listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { what, addr, source })?;
        }
        listeners.push(listener);
    }
    Ok((bound, listeners))
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        what: "listener",
        addr,
        source,
    })
}

/// Accepts connections until told to stop, then drains them for at most `drain()` (read when
/// the drain begins).
async fn serve<S, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    mut stopped: watch::Receiver<bool>,
    drain: impl Fn() -> Duration,
) where
    S: Fn(hyper::Request<hyper::body::Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<hyper::Response<crate::body::ProxyBody>, Infallible>>
        + Send
        + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let accepting = Accepting {
        listener,
        share: None,
    };
    // No share: the admin listener has one thread, and nothing counts its connections.
    accept_until_stopped(
        accepting,
        &mut stopped,
        &mut connections,
        |stream, peer, _| {
            let service = service.clone();
            let service = service_fn(move |req| service(req, peer));
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
        },
    )
    .await;
    close_within(drain(), connections, graceful.shutdown()).await;
}

/// Where connections come from: a listener, and for the proxy's workers their share of the
/// connections (a worker with more open than another hands new ones over, and takes those
/// handed to it).
pub(crate) struct Accepting {
    pub listener: TcpListener,
    pub share: Option<Share>,
}

impl Accepting {
    /// Stops taking connections from other workers; those already handed to this one, to be
    /// served like the rest as the worker stops.
    async fn close(&mut self) -> Vec<(TcpStream, SocketAddr, Placed)> {
        match self.share.as_mut() {
            Some(share) => share.close().await,
            None => Vec::new(),
        }
    }

    /// The next connection to serve here, with its place in the worker's count.
    async fn next(&mut self) -> std::io::Result<(TcpStream, SocketAddr, Option<Placed>)> {
        let Some(share) = self.share.as_mut() else {
            let (stream, peer) = self.listener.accept().await?;
            let _ = stream.set_nodelay(true);
            return Ok((stream, peer, None));
        };
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (stream, peer) = accepted?;
                    // Before a hand-over: the option goes with the socket.
                    let _ = stream.set_nodelay(true);
                    if let Some((stream, placed)) = share.place(stream, peer) {
                        return Ok((stream, peer, Some(placed)));
                    }
                }
                (stream, peer, placed) = share.handed() => return Ok((stream, peer, Some(placed))),
            }
        }
    }
}

/// Accepts connections until told to stop, each served by `serve` on a task of its own in
/// `connections` (which forgets them as they end). `serve` keeps the connection's place in its
/// worker's count ([`Placed`], with a share) as long as it serves it. The listener is closed on
/// return; connections already handed to this worker are in `connections` by then.
pub(crate) async fn accept_until_stopped<F>(
    mut accepting: Accepting,
    stopped: &mut watch::Receiver<bool>,
    connections: &mut JoinSet<()>,
    mut serve: impl FnMut(TcpStream, SocketAddr, Option<Placed>) -> F,
) where
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            // Forget connections as they end, so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accepting.next() => {
                let (stream, peer, open) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                connections.spawn(serve(stream, peer, open));
            }
            () = until_stopped(stopped) => {
                for (stream, peer, placed) in accepting.close().await {
                    connections.spawn(serve(stream, peer, Some(placed)));
                }
                return;
            }
        }
    }
}

/// Gives the open connections `drain` to end (after `closing`, which asks them to), then
/// closes whatever is still open, also when cliqgate runs inside another program.
pub(crate) async fn close_within(
    drain: Duration,
    mut connections: JoinSet<()>,
    closing: impl Future<Output = ()>,
) {
    let all_closed = async {
        closing.await;
        while connections.join_next().await.is_some() {}
    };
    if tokio::time::timeout(drain, all_closed).await.is_err() {
        tracing::warn!(
            ?drain,
            "connections still open after the shutdown timeout; closing them"
        );
    }
    connections.abort_all();
}

/// After a worker's connections are closed: waits, until the shutdown deadline, for the work
/// that outlives its calls ([`Drain::spawn`]: a call whose caller left, finished to read Zoho's
/// answer for a throttle signal; a learned lock being stored), which dropping the worker's
/// runtime would cancel. Tasks that are not cliqgate's (a client library's connection task)
/// are not waited for.
async fn settle(drain: &Drain, deadline: tokio::time::Instant) {
    if tokio::time::timeout_at(deadline, drain.settled())
        .await
        .is_err()
    {
        tracing::warn!(
            "calls whose callers had left, or locks being stored, were still running at the \
             shutdown deadline"
        );
    }
}

async fn sweep(limiter: Arc<Store>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EVICT_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let removed = limiter.evict_idle();
                tracing::debug!(removed, kept = limiter.len(), "idle limiter keys evicted");
            }
            () = until_stopped(&mut stopped) => return,
        }
    }
}

/// Resolves once shutdown is asked for (or the handle is gone).
pub(crate) async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    loop {
        let stop = *stopped.borrow_and_update();
        if stop || stopped.changed().await.is_err() {
            return;
        }
    }
}

/// Settle time after a file change before reloading: editors and ConfigMap updates write in
/// several steps.
const WATCH_DEBOUNCE: Duration = Duration::from_millis(300);

/// The signals cliqgate acts on. Install them before [`start`], so a signal that arrives while
/// the proxy starts is acted on rather than killing the process.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Runs until SIGTERM or SIGINT, then drains and returns. SIGHUP reloads the config from
/// `config_path`; so does a change to that file when `reload.watch` is on.
pub async fn run_until_signalled(running: Running, signals: Signals, config_path: PathBuf) {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    let (changed_tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    let _watcher = if running.proxy().config.reload.watch {
        watch_file(&config_path, changed_tx)
    } else {
        None
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                let _ = running.reload_from(&config_path);
            }
            Some(()) = changed.recv() => {
                tokio::time::sleep(WATCH_DEBOUNCE).await;
                while changed.try_recv().is_ok() {}
                tracing::info!("config file changed: reloading");
                let _ = running.reload_from(&config_path);
            }
        }
    }
    tracing::info!("shutting down: no new connections; finishing calls in flight and in queues");
    running.shutdown().await;
}

/// Watches the config file's directory (editors and Kubernetes ConfigMaps replace files by
/// rename, which a watch on the file itself would miss). Only creations, changes and removals
/// count: reading the file emits access events, which would otherwise loop.
fn watch_file(
    path: &Path,
    changed: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let name = path.file_name()?.to_os_string();
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) && event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|f| f == name.as_os_str() || f.to_string_lossy().starts_with("..data"))
        });
        if relevant {
            let _ = changed.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the config file; reload with SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::error!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload with SIGHUP");
        return None;
    }
    tracing::info!(file = %path.display(), "watching the config file for changes");
    Some(watcher)
}
