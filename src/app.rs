//! Binds the listeners (port 0 works, for tests) and runs the proxy until shutdown.
//!
//! Shutdown: stop accepting, let in-flight calls finish (bounded by `timeouts.shutdown`: hyper's
//! graceful shutdown can wait forever on idle connections), then return.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, StoreConfig};
use crate::limit::{Limiter, MemoryStore, RedisOptions, RedisStore, Store, StoreError, TokioClock};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::upstream::{Upstream, UpstreamSetupError};

/// How often idle limiter keys are swept: memory follows active users within this delay.
const EVICT_INTERVAL: Duration = Duration::from_secs(10);
/// Room above `max_header_bytes` for the request line, so oversized fields get cliqgate's own
/// Zoho-style 431 rather than hyper's bare one.
const HEAD_BUFFER_SLACK: usize = 16 * 1024;

/// A running proxy: its bound addresses and a handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    admin: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    prober: Option<JoinHandle<()>>,
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
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Key prefix of everything cliqgate keeps in Redis.
const REDIS_PREFIX: &str = "cliqgate:";

/// The configured limiter store. Redis is connected lazily: the proxy starts even if it is down.
fn open_store(config: &Config, metrics: &Arc<Metrics>) -> Result<Arc<Store>, StartError> {
    let clock = Arc::new(TokioClock::new());
    let store = match &config.store {
        StoreConfig::Memory => Store::Memory(MemoryStore::new(clock, config.queue.max_total)),
        StoreConfig::Redis(redis) => {
            let max_window = config
                .routes
                .iter()
                .map(|r| r.per + config.safety_margin)
                .max()
                .unwrap_or_default();
            let options = RedisOptions {
                url: redis.url.clone(),
                timeout: redis.timeout,
                connect_timeout: redis.connect_timeout,
                on_error: redis.on_error,
                replicas: redis.replicas.get(),
                prefix: REDIS_PREFIX.to_string(),
                routes: config
                    .routes
                    .iter()
                    .map(|r| r.name.clone())
                    .chain([crate::resolve::IDENTITY_ROUTE_NAME.to_string()])
                    .collect(),
                max_window,
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

/// Starts the proxy and admin listeners on the configured addresses.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let limiter = open_store(&config, &metrics)?;
    let upstream = Upstream::new(&config)?;
    let (listen, admin_listen) = (config.listen, config.admin_listen);
    let proxy = Arc::new(Proxy::new(config, limiter.clone(), upstream, metrics));

    let listener = bind("proxy listener", listen).await?;
    let admin_listener = bind("admin listener", admin_listen).await?;
    let proxy_addr = local_addr(&listener, listen)?;
    let admin_addr = local_addr(&admin_listener, admin_listen)?;
    let (stop, stopped) = watch::channel(false);

    let server = {
        let (builder, drain) = (builder(&proxy.config), proxy.config.timeouts.shutdown);
        let proxy = proxy.clone();
        let service = move |req, peer| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
        };
        tokio::spawn(serve(listener, builder, service, stopped.clone(), drain))
    };
    let admin = {
        let proxy = proxy.clone();
        let service = move |req, _peer| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(crate::admin::handle(proxy, req).await) }
        };
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::spawn(serve(
            admin_listener,
            builder,
            service,
            stopped.clone(),
            Duration::from_secs(1),
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
    tracing::info!(%proxy_addr, %admin_addr, "cliqgate listening");
    Ok(Running {
        prober,
        proxy_addr,
        admin_addr,
        proxy,
        stop,
        server,
        admin,
        sweeper,
    })
}

impl Running {
    /// Stops accepting, lets in-flight calls finish (bounded by `timeouts.shutdown`), then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.wait().await;
    }

    /// Asks the servers to stop, without waiting.
    pub fn trigger_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the servers have stopped.
    pub async fn wait(self) {
        let _ = self.server.await;
        let _ = self.admin.await;
        self.sweeper.abort();
        if let Some(prober) = self.prober {
            prober.abort();
        }
    }
}

fn builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let head_limit = (config.http.max_header_bytes + HEAD_BUFFER_SLACK).max(8192);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.client_header)
        .max_buf_size(head_limit);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_limit).unwrap_or(u32::MAX));
    builder
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        what: "listener",
        addr,
        source,
    })
}

/// Accepts connections until told to stop, then drains them for at most `drain`.
async fn serve<S, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    mut stopped: watch::Receiver<bool>,
    drain: Duration,
) where
    S: Fn(hyper::Request<hyper::body::Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<hyper::Response<crate::body::ProxyBody>, Infallible>>
        + Send
        + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = service.clone();
                let service = service_fn(move |req| service(req, peer));
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = until_stopped(&mut stopped) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "connections still open after the shutdown timeout; closing them"
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
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    loop {
        let stop = *stopped.borrow_and_update();
        if stop || stopped.changed().await.is_err() {
            return;
        }
    }
}
