//! The one place that dials out: a pooled client to the configured upstream, and nowhere else.
//!
//! Whatever the request line or `Host` says, the URI is rebuilt from the configured scheme and
//! authority plus the caller's path and query (no open proxy). Requests are never retried: a
//! POST that may have reached Zoho must not be sent twice.
//!
//! Each proxy worker thread has its own connection pool (see `app`): hyper-util runs every
//! pooled connection as a task on the runtime that opened it, and a pool shared by threads would
//! move each call's response between them.

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{header, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::body::ProxyBody;
use crate::config::{Config, UpstreamTarget};
use crate::error::ProxyError;

/// Idle pooled connections are closed before Zoho's front ends would close them under us.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("upstream_ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
}

type PooledClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

thread_local! {
    /// The proxy worker this thread is, if it is one: picks its connection pool.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as proxy worker `index`, for its whole life.
pub(crate) fn enter_worker(index: usize) {
    WORKER.with(|worker| worker.set(Some(index)));
}

#[derive(Clone)]
pub struct Upstream {
    /// One pool per worker thread, then one for every other thread (tests, the admin runtime).
    clients: Arc<[PooledClient]>,
    target: UpstreamTarget,
    host: HeaderValue,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &Config, workers: NonZeroUsize) -> Result<Self, UpstreamSetupError> {
        let tls = tls_config(config)?;
        let clients = (0..=workers.get())
            .map(|_| Self::client(config, tls.clone()))
            .collect();
        let host = HeaderValue::from_str(config.upstream.authority.as_str())
            .map_err(|e| UpstreamSetupError::Tls(rustls::Error::General(e.to_string())))?;
        Ok(Upstream {
            clients,
            target: config.upstream.clone(),
            host,
            response_timeout: config.timeouts.response,
        })
    }

    fn client(config: &Config, tls: rustls::ClientConfig) -> PooledClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeouts.connect));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .retry_canceled_requests(false)
            .set_host(false)
            .build(connector)
    }

    /// The calling thread's pool.
    fn pool(&self) -> &PooledClient {
        let last = self.clients.len() - 1;
        let index = WORKER
            .with(Cell::get)
            .map_or(last, |worker| worker.min(last));
        &self.clients[index]
    }

    /// The absolute URI of a call: always the configured upstream.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
        Uri::builder()
            .scheme(self.target.scheme.clone())
            .authority(self.target.authority.clone())
            .path_and_query(path_and_query.map_or("/", |p| p.as_str()))
            .build()
            .map_err(|_| ProxyError::BadRequest("The request target is not a valid path."))
    }

    /// Sends a request cliqgate itself makes (an identity lookup) to its absolute URI, which the
    /// operator configured. The caller bounds the time.
    pub async fn fetch(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        *req.version_mut() = Version::HTTP_11;
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        self.pool().request(req).await.map_err(|e| {
            tracing::warn!(error = %error_chain(&e), "identity lookup failed");
            ProxyError::UpstreamUnavailable
        })
    }

    /// Sends one call and waits (bounded) for the response head; the body streams afterwards.
    /// The request is prepared before the returned future, which holds only the sending (it is
    /// part of every call's state).
    pub fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, ProxyError>> {
        // Requests that arrive over h2c go out as HTTP/1.1.
        *req.version_mut() = Version::HTTP_11;
        req.headers_mut().insert(header::HOST, self.host.clone());
        let timeout = self.response_timeout;
        let response = tokio::time::timeout(timeout, self.pool().request(req));
        async move {
            match response.await {
                Err(_) => Err(ProxyError::UpstreamTimeout(timeout)),
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) if is_timeout(&e) => Err(ProxyError::UpstreamTimeout(timeout)),
                // A streamed request body went over `max_body_bytes`: the caller's fault, not
                // Zoho's.
                Ok(Err(e)) if body_too_large(&e).is_some() => Err(ProxyError::BodyTooLarge {
                    limit: body_too_large(&e).unwrap_or_default(),
                }),
                Ok(Err(e)) => {
                    tracing::warn!(error = %error_chain(&e), "upstream call failed");
                    Err(ProxyError::UpstreamUnavailable)
                }
            }
        }
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// The limit, if the call failed because the caller's streamed body outgrew it ([`crate::body::Limited`]).
fn body_too_large(e: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(too_large) = err.downcast_ref::<crate::body::BodyTooLarge>() {
            return Some(too_large.0);
        }
        source = err.source();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        out.push_str(": ");
        out.push_str(&err.to_string());
        source = err.source();
    }
    out
}

/// Bundled web roots, plus the operator's extra roots (e.g. a TLS-inspecting firewall's CA).
fn tls_config(config: &Config) -> Result<rustls::ClientConfig, UpstreamSetupError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &config.upstream_ca_file {
        let shown = path.display().to_string();
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| UpstreamSetupError::CaFile {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| UpstreamSetupError::CaFile {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| UpstreamSetupError::CaFile {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(UpstreamSetupError::CaFile {
                path: shown,
                reason: "no PEM certificate in file".into(),
            });
        }
    }
    // The provider is chosen explicitly: rustls panics if two are compiled in and none is picked.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
