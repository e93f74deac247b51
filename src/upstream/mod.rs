//! The one place that dials out: calls to the configured upstream, and nowhere else.
//!
//! Whatever the request line or `Host` says, a call goes to the configured scheme and authority
//! with the caller's path and query (no open proxy). Requests are never retried: a POST that may
//! have reached Zoho must not be sent twice.
//!
//! HTTP/1.1 to the upstream is cliqgate's own (`wire`, `conn`): Zoho's API is plain
//! request/response over keep-alive connections, and a call that writes its request and reads
//! its answer on its own task, with connections kept per thread, costs a fraction of a general
//! client's channels, connection tasks and pool locks (benches/load/RESULTS.md).

mod conn;
pub(crate) mod wire;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::body::ProxyBody;
use crate::config::Config;
use crate::error::ProxyError;
pub use conn::UpstreamBody;
use conn::{Exchange, ExchangeError, Limits, Origin};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("upstream_ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("upstream: {0}")]
    Target(String),
}

/// Tells apart the connections of successive upstreams (a reload may change the CA file or the
/// timeouts of the same address): a connection is only reused by the upstream that opened it.
static GENERATION: AtomicU64 = AtomicU64::new(0);

#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    generation: u64,
    origin: Origin,
    tls: Arc<rustls::ClientConfig>,
    limits: Limits,
}

/// Closes the calling thread's idle upstream connections (a worker thread that is ending).
pub(crate) fn close_idle() {
    conn::close_idle();
}

impl Upstream {
    pub fn new(config: &Config) -> Result<Self, UpstreamSetupError> {
        let tls = Arc::new(tls_config(config)?);
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let target = &config.upstream;
        let origin = Origin::new(generation, &target.scheme, &target.authority, &tls)
            .map_err(UpstreamSetupError::Target)?;
        Ok(Upstream {
            inner: Arc::new(Inner {
                generation,
                origin,
                tls,
                limits: Limits {
                    connect: config.timeouts.connect,
                    response: config.timeouts.response,
                },
            }),
        })
    }

    /// Sends a request cliqgate itself makes (an identity lookup) to its absolute URI, which the
    /// operator configured. The caller bounds the time.
    pub async fn fetch(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let inner = &self.inner;
        let (parts, body) = req.into_parts();
        let (Some(scheme), Some(authority)) = (parts.uri.scheme(), parts.uri.authority()) else {
            tracing::warn!("identity lookup URL is not absolute");
            return Err(ProxyError::UpstreamUnavailable);
        };
        let origin = Origin::new(inner.generation, scheme, authority, &inner.tls).map_err(|e| {
            tracing::warn!(error = %e, "identity lookup URL");
            ProxyError::UpstreamUnavailable
        })?;
        conn::exchange(&origin, inner.limits, parts, body)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "identity lookup failed");
                ProxyError::UpstreamUnavailable
            })
    }

    /// Starts one call; [`Sending::response`] waits (bounded) for the response head, and the
    /// body streams afterwards. Only the path and query of the request's URI are used.
    pub fn send(&self, parts: http::request::Parts, body: ProxyBody) -> Sending<'_> {
        let inner = &*self.inner;
        Sending {
            exchange: Exchange::start(&inner.origin, inner.limits, parts, body),
            timeout: inner.limits.response,
        }
    }
}

/// One call on its way to the upstream. It is part of every call's state: a box and the
/// response timeout (the exchange keeps to it, `conn::Limits`).
pub struct Sending<'a> {
    exchange: Exchange<'a>,
    timeout: Duration,
}

impl Sending<'_> {
    /// The response head, or cliqgate's error for the caller.
    pub async fn response(&mut self) -> Result<Response<UpstreamBody>, ProxyError> {
        let answer = (&mut self.exchange).await;
        answer_or_error(answer, self.timeout)
    }

    /// The rest of the call, owning all it needs, if its request has started out: Zoho may
    /// act on it (count it, lock the user) whether or not the caller still waits, so a caller
    /// that leaves can have it finished on a task of its own. `None` if nothing was sent yet.
    pub fn into_started(
        self,
    ) -> Option<impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'static>
    {
        let Sending { exchange, timeout } = self;
        let rest = exchange.into_started()?;
        Some(async move { answer_or_error(rest.await, timeout) })
    }
}

fn answer_or_error(
    answer: Result<Response<UpstreamBody>, ExchangeError>,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, ProxyError> {
    answer.map_err(|e| upstream_error(e, timeout))
}

/// Who is at fault for a failed exchange, as the caller will be told.
fn upstream_error(e: ExchangeError, timeout: Duration) -> ProxyError {
    match &e {
        ExchangeError::Connect(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            return ProxyError::UpstreamTimeout(timeout)
        }
        ExchangeError::TimedOut(_) => {
            tracing::warn!(error = %e, "upstream call timed out");
            return ProxyError::UpstreamTimeout(timeout);
        }
        ExchangeError::Body(body) => {
            // The caller's streamed body went over `max_body_bytes`, broke off or stalled: its
            // fault (413, 400 or 408), not the upstream's.
            if let Some(error) = crate::body::caller_fault(body.as_ref()) {
                tracing::debug!(error = %error_chain(body.as_ref()), "request body refused");
                return error;
            }
        }
        _ => {}
    }
    tracing::warn!(error = %error_chain(&e), "upstream call failed");
    ProxyError::UpstreamUnavailable
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
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/1.1 is what cliqgate speaks to the upstream.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
