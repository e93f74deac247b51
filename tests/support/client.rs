//! An HTTP client for tests: every call is bounded in time, and answers come back whole.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on one call, response body included. Longer than anything an end-to-end test
/// legitimately waits for (queue `max_wait` and stub delays of a few seconds), far shorter than a
/// CI job's timeout: a hung proxy fails the test with a message instead of hanging the build.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`wait_for`] re-checks its condition: fine enough not to slow tests down, coarse
/// enough not to busy-loop.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A whole response.
#[derive(Clone, Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    /// Reads a response whole (any client's: the pooled one here, or a test's own connection).
    pub async fn read<B: http_body::Body>(
        response: http::Response<B>,
    ) -> Result<TestResponse, B::Error> {
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(TestResponse {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    /// A header's value as text (`None` if absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics (failing the test) if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a call produced no response.
#[derive(Debug)]
pub enum ClientError {
    /// No complete response within [`CLIENT_TIMEOUT`] (or the caller's own bound).
    Timeout,
    /// Connecting or sending failed (e.g. nothing listening).
    Request(hyper_util::client::legacy::Error),
    /// The response body broke off.
    Body(hyper::Error),
}

/// A pooled hyper client, HTTP/1.1 by default or h2c (HTTP/2 with prior knowledge).
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    /// HTTP/1.1, keep-alive pooled.
    pub fn new() -> Self {
        Client {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .build_http(),
        }
    }

    /// HTTP/2 over cleartext with prior knowledge (no upgrade dance).
    pub fn h2c() -> Self {
        Client {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .http2_only(true)
                .build_http(),
        }
    }

    /// Sends and reads the whole answer; panics (failing the test) on a transport error or
    /// after [`CLIENT_TIMEOUT`].
    pub async fn send(&self, request: Request<Full<Bytes>>) -> TestResponse {
        let what = format!("{} {}", request.method(), request.uri());
        match self.try_send(request).await {
            Ok(response) => response,
            Err(e) => panic!("{what}: no response: {e:?}"),
        }
    }

    /// As [`Client::send`], but returns transport failures, for tests that expect one.
    pub async fn try_send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<TestResponse, ClientError> {
        let exchange = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(ClientError::Request)?;
            TestResponse::read(response)
                .await
                .map_err(ClientError::Body)
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    /// `GET url` with `Authorization: Zoho-oauthtoken <token>`.
    pub async fn get(&self, url: &str, token: &str) -> TestResponse {
        self.send(request(Method::GET, url, Some(token), Bytes::new()))
            .await
    }

    /// `POST url` with `Authorization: Zoho-oauthtoken <token>` and a JSON body.
    pub async fn post(&self, url: &str, token: &str, body: impl Into<Bytes>) -> TestResponse {
        let mut req = request(Method::POST, url, Some(token), body);
        req.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        self.send(req).await
    }
}

/// Builds a request (for tests that add headers before sending). The URL is used as written, so
/// percent escapes in the path and query reach the wire unchanged. Panics on a malformed URL or
/// token, which are mistakes in the test.
pub fn request(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Zoho-oauthtoken {token}"));
    }
    builder
        .body(Full::new(body.into()))
        .expect("a well-formed request in test set-up")
}

/// GET `/metrics` on the admin listener and return the exposition text.
pub async fn scrape(admin_addr: SocketAddr) -> String {
    let response = Client::new()
        .send(request(
            Method::GET,
            &format!("http://{admin_addr}/metrics"),
            None,
            Bytes::new(),
        ))
        .await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "GET /metrics: {}",
        response.text()
    );
    response.text()
}

/// Writes raw bytes to `addr` and reads until the peer closes, for requests no well-behaved
/// client would send (malformed heads, oversized headers). Send `Connection: close` or the read
/// waits for the proxy's idle timeout. Panics on I/O failure or after [`CLIENT_TIMEOUT`].
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        // A reset after the answer (the peer closing with unread input) still leaves the answer.
        match stream.read_to_end(&mut answer).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty() => {}
            Err(e) => return Err(e),
        }
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => panic!("raw exchange with {addr}: {e}"),
        Err(_) => panic!("raw exchange with {addr}: no close within {CLIENT_TIMEOUT:?}"),
    }
}

/// Polls `condition` every [`POLL_INTERVAL`] until it holds; panics naming `what` if it does not
/// within `deadline`. For state that settles asynchronously (a gauge, a queued call arriving).
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= give_up {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
