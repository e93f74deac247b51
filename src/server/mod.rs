//! cliqgate's own HTTP/1.1 server for the proxy listener (RFC 9112), with h2c connections
//! (recognised by their preface) handed to hyper's HTTP/2 server.
//!
//! Why not hyper's HTTP/1 server: a proxy call is small and the server's share of its cost was
//! large (benches/load/RESULTS.md): per request hyper builds a body channel, a header-read
//! timer and a dispatch task state, and keeps two buffers of at least 8 KiB per connection,
//! which made an HTTP/1.1 call waiting in a queue cost 20 KB. Here a connection is one task
//! that reads a head, runs the call and writes the answer: a head that arrives whole is parsed
//! from a per-thread buffer and copied once (fields and target share the copy), a body that
//! came with its head is handed over whole, anything else streams straight from the socket,
//! and the slowloris timer is one per connection, re-armed only when it fires.
//!
//! What it keeps of hyper's behaviour: keep-alive and pipelining, HTTP/1.0, `Expect:
//! 100-continue` (answered when the proxy first reads the body), chunked request bodies, a
//! call cancelled when its caller hangs up while it runs (a queued one gives its slot back; one
//! already sent is finished by the proxy for Zoho's throttle signals),
//! graceful drain (idle connections close, busy ones after their answer). What it adds: heads
//! that cannot be read get a Zoho-style JSON 400 or 431 instead of a bare status, and a request
//! body that pauses for longer than `timeouts.client_body` is answered 408, over HTTP/1.1 and
//! h2c alike.

mod reader;
pub mod spread;
mod wire;

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::body::{empty, full, ProxyBody};
use crate::error::ProxyError;
use crate::metrics::{CallerError, Metrics};
use crate::upstream::wire::{encode_chunk_size, encode_last_chunk};
use reader::{lock, Head, HeadFailure, PatientBody, Reader, SharedReader};
use spread::Placed;
use wire::{encode_response_head, ResponseFraming};

/// How long an idle keep-alive connection is kept (nginx's `keepalive_timeout` default). Apps'
/// connection pools keep theirs for about as long; closing much sooner races their next call.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(75);
/// Body bytes gathered into one write with the head (a small answer leaves in one system call).
const COALESCE: usize = 64 * 1024;
/// After an answer that leaves request bytes unread, the connection reads (and drops) them for
/// at most this long before it closes, so the caller sees the answer rather than a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// What the server needs of the config (read once per worker; a reload keeps the listener).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line and fields, buffered, beyond which a head is refused with 431.
    pub head_limit: usize,
    /// The limit reported in that 431.
    pub max_header_bytes: usize,
    /// How long a caller may take to send a head (slowloris guard).
    pub client_header: Duration,
    /// The longest a request body may wait for its next bytes; a longer pause is answered 408.
    pub client_body: Duration,
}

/// One call: the request, the caller's address; the answer.
pub trait Service: Clone + Send + Sync + 'static {
    type Future: Future<Output = Response<ProxyBody>> + Send + 'static;
    fn call(&self, req: Request<ProxyBody>, peer: SocketAddr) -> Self::Future;
}

impl<S, F> Service for S
where
    S: Fn(Request<ProxyBody>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    type Future = F;
    fn call(&self, req: Request<ProxyBody>, peer: SocketAddr) -> F {
        self(req, peer)
    }
}

/// Serves one caller connection until it closes, fails, or the server stops.
///
/// Not an `async fn`: that would keep its arguments twice, as arguments and as the locals they
/// are moved into, in a future every connection (and so every queued call) holds. The state is
/// built when this is called, on the accepting task (same runtime, same thread).
pub fn serve_connection<S: Service>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    stopped: watch::Receiver<bool>,
    limits: Limits,
    metrics: Arc<Metrics>,
    placed: Option<Placed>,
) -> impl Future<Output = ()> {
    let stream = Arc::new(stream);
    let mut reader = Reader::new(stream.clone(), limits.head_limit, limits.client_body);
    if placed.as_ref().is_some_and(Placed::handed_over) {
        reader.try_before_waiting();
    }
    let reader = Arc::new(std::sync::Mutex::new(reader));
    let stop = {
        let mut stopped = stopped.clone();
        Box::pin(async move { crate::app::until_stopped(&mut stopped).await })
    };
    let mut conn = Conn {
        stream,
        reader,
        stopped,
        stop: Some(stop),
        patience: Patience::new(limits.client_header),
        served: 0,
        metrics,
        _placed: placed,
    };
    async move {
        match conn.serve(&service, peer, &limits).await {
            // Bytes the caller sent that were never read would make closing reset the connection,
            // which can destroy the answer before the caller reads it: drain them first.
            Ok(Ending::Close) if lock(&conn.reader).has_buffered() => linger(&conn.stream).await,
            Ok(Ending::Close) => {}
            Ok(Ending::Linger) => linger(&conn.stream).await,
            Ok(Ending::H2) => {
                let Conn {
                    stream,
                    reader,
                    stopped,
                    _placed,
                    ..
                } = conn;
                drop(stream);
                let Ok(reader) = Arc::try_unwrap(reader) else {
                    return;
                };
                let (stream, preface) = reader
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .into_parts();
                let Ok(stream) = Arc::try_unwrap(stream) else {
                    return;
                };
                // Boxed: hyper's HTTP/2 state would otherwise size every HTTP/1.1 connection's future.
                Box::pin(serve_h2(stream, preface, peer, service, stopped, &limits)).await;
            }
            Err(e) => tracing::debug!(error = %e, "caller connection ended with an error"),
        }
    }
}

enum Ending {
    /// Close now.
    Close,
    /// Close once the caller's unread bytes have been drained (bounded).
    Linger,
    /// An h2c connection: hand it to the HTTP/2 server.
    H2,
}

type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Conn {
    stream: Arc<TcpStream>,
    reader: SharedReader,
    /// Handed to the HTTP/2 server for an h2c connection.
    stopped: watch::Receiver<bool>,
    /// Resolves when the server stops; `None` once it has. One registration for the whole
    /// connection rather than one per request.
    stop: Option<Stop>,
    patience: Patience,
    /// Requests answered on this connection.
    served: u64,
    /// Counts the connections this server ends for the caller's fault.
    metrics: Arc<Metrics>,
    /// This connection in its worker's count, while it lives (an h2c connection's too).
    _placed: Option<Placed>,
}

impl Conn {
    async fn serve<S: Service>(
        &mut self,
        service: &S,
        peer: SocketAddr,
        limits: &Limits,
    ) -> io::Result<Ending> {
        loop {
            let head = tokio::select! {
                biased;
                head = poll_fn(|cx| lock(&self.reader).poll_head(cx)) => head,
                gave_up = poll_fn(|cx| {
                    let partial = lock(&self.reader).has_buffered();
                    self.patience.poll_expired(cx, self.served, partial)
                }) => {
                    if gave_up == GaveUp::SlowHead {
                        tracing::debug!("caller sent no whole request head in time; closing");
                        self.metrics.caller_error(CallerError::HeadTimeout);
                    }
                    return Ok(Ending::Close);
                }
                () = poll_fn(|cx| poll_stop(&mut self.stop, cx)), if self.stop.is_some() => {
                    if lock(&self.reader).has_buffered() {
                        continue;
                    }
                    return Ok(Ending::Close);
                }
            };
            let parsed = match head {
                Ok(Head::Request(parsed)) => parsed,
                Ok(Head::Closed) => return Ok(Ending::Close),
                Ok(Head::H2) => return Ok(Ending::H2),
                Err(failure) => {
                    let (error, reason) = match failure {
                        HeadFailure::TooLarge => (
                            ProxyError::HeadersTooLarge {
                                limit: limits.max_header_bytes,
                            },
                            CallerError::HeadersTooLarge,
                        ),
                        HeadFailure::Bad(e) => {
                            (ProxyError::BadRequest(e.message()), CallerError::BadRequest)
                        }
                    };
                    self.metrics.caller_error(reason);
                    let response = error.to_response();
                    self.respond(response, &http::Method::GET, Version::HTTP_11, false)
                        .await?;
                    return Ok(Ending::Linger);
                }
            };
            let (method, version) = (parsed.parts.method.clone(), parsed.parts.version);
            let keep_alive = parsed.keep_alive;
            let response = tokio::select! {
                biased;
                // The request is built in a plain function and the call made right here: a
                // local moved into the call would keep its room in this future for as long as
                // the call waits, and this future is most of a queued call's memory.
                response = service.call(request(parsed, &self.reader), peer) => response,
                () = poll_fn(|cx| lock(&self.reader).poll_hangup(cx)) => {
                    // The caller left: the call is dropped (a queued one gives its slot back).
                    return Ok(Ending::Close);
                }
            };
            self.served += 1;
            let complete = lock(&self.reader).body_complete();
            // Whether the server has begun to stop: a look at the signal's version (a load),
            // not a poll of the stop future, which costs a few hundred instructions a call. The
            // only value ever sent on that channel is the stop (`Running::trigger_shutdown`), and
            // this receiver has marked nothing seen, so any change is the stop.
            let stopping = self.stop.is_none() || self.stopped.has_changed().unwrap_or(true);
            let keep_alive = keep_alive && complete && !stopping;
            let keep_alive = self.respond(response, &method, version, keep_alive).await?;
            if !keep_alive {
                return Ok(if complete {
                    Ending::Close
                } else {
                    Ending::Linger
                });
            }
        }
    }

    /// Writes an answer; returns whether the connection stays open.
    async fn respond(
        // `&mut`: a shared borrow held across the write would need `Conn: Sync`, which its stop
        // future is not.
        &mut self,
        response: Response<ProxyBody>,
        method: &http::Method,
        version: Version,
        mut keep_alive: bool,
    ) -> io::Result<bool> {
        let (mut parts, mut body) = response.into_parts();
        if !parts.headers.contains_key(http::header::DATE) {
            // RFC 9110 6.6.1: an origin with a clock sends one (Zoho's answers carry theirs).
            parts.headers.insert(http::header::DATE, date_now());
        }
        let framing =
            ResponseFraming::choose(method, parts.status, version, body.size_hint().exact());
        keep_alive &= framing != ResponseFraming::UntilClose;
        let mut out = take_out_buffer();
        encode_response_head(&mut out, &parts, framing, version, keep_alive);
        let written = write_body(&self.stream, &mut out, &mut body, framing).await;
        give_out_buffer(out);
        written?;
        Ok(keep_alive)
    }
}

/// Reads and drops what the caller still sends (a body not read, a request after a refused
/// head) for a bounded time after the last answer, so closing does not reset the connection
/// before the caller has read that answer.
async fn linger(stream: &TcpStream) {
    let drain = async {
        let _ = shutdown_write(stream);
        let mut dropped = 0usize;
        // On the heap: a buffer here would size every connection's future.
        let mut sink = vec![0u8; 4096];
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut sink) {
                Ok(0) => return,
                Ok(n) => {
                    dropped += n;
                    if dropped > LINGER_BYTES {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The request handed to the proxy: its body whole if it came with the head, else streamed
/// from the connection.
fn request(parsed: Box<wire::ParsedRequest>, reader: &SharedReader) -> Request<ProxyBody> {
    let wire::ParsedRequest {
        parts,
        framing,
        body,
        ..
    } = *parsed;
    let body = match (body, framing) {
        (Some(bytes), _) => full(bytes),
        (None, wire::RequestFraming::Empty) => empty(),
        (None, wire::RequestFraming::Length(_) | wire::RequestFraming::Chunked) => {
            Reader::body(reader).boxed()
        }
    };
    Request::from_parts(parts, body)
}

/// Whether the server is stopping (and it stays so once seen).
fn poll_stop(stop: &mut Option<Stop>, cx: &mut Context<'_>) -> Poll<()> {
    match stop {
        None => Poll::Ready(()),
        Some(signal) => {
            ready!(signal.as_mut().poll(cx));
            *stop = None;
            Poll::Ready(())
        }
    }
}

/// Half-closes the connection: the caller reads the end of the answer, then its own end.
fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write)
}

/// Writes the head in `out` and the body after it: small bodies with the head in one write,
/// large frames straight from their buffers. An error (the caller gone, the body broken, a
/// body longer or shorter than its declared length) ends the connection.
async fn write_body(
    stream: &TcpStream,
    out: &mut Vec<u8>,
    body: &mut ProxyBody,
    framing: ResponseFraming,
) -> io::Result<()> {
    let mut sent: u64 = 0;
    if framing != ResponseFraming::NoBody {
        loop {
            // Gather what is ready now; write before waiting for more.
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    write_all(stream, out).await?;
                    out.clear();
                    body.frame().await
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(io::Error::other(e)),
                // Trailers are not forwarded (README, Limits).
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            sent += data.len() as u64;
            if let ResponseFraming::Length(n) = framing {
                if sent > n {
                    return Err(io::Error::other("response body longer than its length"));
                }
            }
            let chunked = framing == ResponseFraming::Chunked;
            if chunked {
                encode_chunk_size(out, data.len());
            }
            if out.len() + data.len() <= COALESCE {
                out.extend_from_slice(&data);
            } else {
                write_all(stream, out).await?;
                out.clear();
                write_all(stream, &data).await?;
            }
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
        }
        match framing {
            ResponseFraming::Length(n) if sent != n => {
                return Err(io::Error::other("response body shorter than its length"));
            }
            ResponseFraming::Chunked => encode_last_chunk(out),
            _ => {}
        }
    }
    write_all(stream, out).await
}

/// Writes all of `bytes`, trying first and waiting for the socket only when it is full.
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The current `Date` value, formatted once a second per thread.
fn date_now() -> http::HeaderValue {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, http::HeaderValue)> =
            const { std::cell::RefCell::new((u64::MAX, http::HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if let Ok(value) = http::HeaderValue::from_str(&text) {
                *cached = (secs, value);
            }
        }
        cached.1.clone()
    })
}

thread_local! {
    /// Each worker thread encodes its answers in one buffer, taken for the time of a write:
    /// a connection holds no write buffer between answers.
    static OUT: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

fn take_out_buffer() -> Vec<u8> {
    OUT.try_with(|out| out.take()).unwrap_or_default()
}

fn give_out_buffer(mut out: Vec<u8>) {
    if out.capacity() <= 2 * COALESCE {
        out.clear();
        let _ = OUT.try_with(|slot| slot.set(out));
    }
}

/// The slowloris guard, one timer per connection: it is re-armed when it fires, not on every
/// request, so a busy connection costs no timer work. When it fires: if a head was completed
/// since it was armed, it re-arms (noting whether another is under way); a head that was
/// already partial at the previous firing (so has taken between one and two `client_header`
/// periods) closes the connection, as does a new connection that has sent nothing for as long;
/// a connection idle between requests closes once it has been idle for [`KEEP_ALIVE_IDLE`],
/// counted in whole periods from the first firing after its last answer.
struct Patience {
    period: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    served_at_arm: u64,
    partial_before: bool,
    idle_periods: u32,
}

impl Patience {
    fn new(period: Duration) -> Patience {
        Patience {
            period: period.max(Duration::from_millis(1)),
            timer: None,
            served_at_arm: 0,
            partial_before: false,
            idle_periods: 0,
        }
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>, served: u64, partial: bool) -> Poll<GaveUp> {
        let period = self.period;
        let timer = self.timer.get_or_insert_with(|| {
            // Boxed: created on a connection's first wait for a head, then kept.
            Box::pin(tokio::time::sleep(period))
        });
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if served != self.served_at_arm {
                // What is buffered now is a newer head, begun within the last period: noted, so
                // that it too is given up at the next firing.
                self.served_at_arm = served;
                self.partial_before = partial;
                self.idle_periods = 0;
            } else if partial || served == 0 {
                // A head under way, or a new connection that has sent nothing yet.
                if self.partial_before {
                    return Poll::Ready(GaveUp::SlowHead);
                }
                self.partial_before = true;
            } else {
                self.partial_before = false;
                self.idle_periods += 1;
                if period * self.idle_periods >= KEEP_ALIVE_IDLE {
                    return Poll::Ready(GaveUp::Idle);
                }
            }
            timer.as_mut().reset(Instant::now() + period);
        }
    }
}

/// Why [`Patience`] gave up on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GaveUp {
    /// A head begun and not finished in time, or a new connection that sent none: the caller's
    /// fault (slowloris), counted.
    SlowHead,
    /// A keep-alive connection idle for [`KEEP_ALIVE_IDLE`]: an ordinary end.
    Idle,
}

/// An h2c connection, with the bytes already read from it, served by hyper's HTTP/2 server
/// until it closes; a graceful shutdown (GOAWAY) when the server stops.
async fn serve_h2<S: Service>(
    stream: TcpStream,
    preface: Bytes,
    peer: SocketAddr,
    service: S,
    mut stopped: watch::Receiver<bool>,
    limits: &Limits,
) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.head_limit).unwrap_or(u32::MAX));
    let client_body = limits.client_body;
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let req = req.map(|body| box_incoming(body, client_body));
        // `map`, not an `async` block: a block would keep the call future twice (as what it
        // captured and as what it awaits), and every HTTP/2 call in flight holds this.
        futures_util::FutureExt::map(service.call(req, peer), answered)
    });
    let io = TokioIo::new(Rewind {
        preface,
        inner: stream,
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = crate::app::until_stopped(&mut stopped) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "h2c connection ended with an error");
    }
}

fn answered(response: Response<ProxyBody>) -> Result<Response<ProxyBody>, Infallible> {
    Ok(response)
}

/// An h2c stream's request body, held to `timeouts.client_body` as an HTTP/1.1 body is.
fn box_incoming(body: hyper::body::Incoming, client_body: Duration) -> ProxyBody {
    PatientBody::new(body, client_body).boxed()
}

/// A socket whose first bytes were already read: they are read again first.
struct Rewind {
    preface: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.preface.is_empty() {
            let n = self.preface.len().min(buf.remaining());
            let head = self.preface.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts caller connections until told to stop, then lets them drain for at most `drain()`
/// (read when the drain begins): idle ones close at once, busy ones after their answer.
/// Connections are spread over the workers by `share` (see [`spread`]).
pub async fn serve<S: Service>(
    listener: tokio::net::TcpListener,
    share: spread::Share,
    service: S,
    mut stopped: watch::Receiver<bool>,
    limits: Limits,
    drain: impl Fn() -> Duration,
    metrics: Arc<Metrics>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let each = stopped.clone();
    let accepting = crate::app::Accepting {
        listener,
        share: Some(share),
    };
    crate::app::accept_until_stopped(
        accepting,
        &mut stopped,
        &mut connections,
        |stream, peer, placed| {
            serve_connection(
                stream,
                peer,
                service.clone(),
                each.clone(),
                limits,
                metrics.clone(),
                placed,
            )
        },
    )
    .await;
    // Idle connections close as they see the stop; busy ones after their answer.
    crate::app::close_within(drain(), connections, std::future::ready(())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `timeouts.client_header` here: whole milliseconds (tokio's timer resolution), and not a
    /// divisor of [`KEEP_ALIVE_IDLE`], so rounding the idle time up to periods shows.
    const PERIOD: Duration = Duration::from_secs(10);
    /// The smallest step of tokio's timer: "just before" and "just after" a firing.
    const MS: Duration = Duration::from_millis(1);
    /// Whether bytes of a head are buffered when the guard is polled.
    const PARTIAL: bool = true;
    const NOTHING: bool = false;

    /// One connection's [`Patience`] on tokio's paused clock, polled the way the connection
    /// task polls it: at every firing of its timer and whenever bytes arrive.
    struct Guard {
        patience: Patience,
        /// When the connection was accepted.
        start: Instant,
        /// Requests answered so far.
        served: u64,
    }

    impl Guard {
        /// A new connection, its guard armed by its first wait for a head.
        async fn new(period: Duration) -> Guard {
            let mut guard = Guard {
                patience: Patience::new(period),
                start: Instant::now(),
                served: 0,
            };
            assert!(
                guard.patience.timer.is_none(),
                "armed before the first wait"
            );
            assert!(!guard.closes_at(Duration::ZERO, NOTHING).await);
            guard
        }

        /// A new connection whose first request is answered at 1 ms; the first firing (one
        /// period in) sees that answer and only re-arms.
        async fn after_one_answer(period: Duration) -> Guard {
            let mut guard = Guard::new(period).await;
            guard.answered_at(MS).await;
            assert!(!guard.closes_at(period, NOTHING).await);
            guard
        }

        /// A request is answered at `at`; the connection waits for the next head.
        async fn answered_at(&mut self, at: Duration) {
            self.served += 1;
            assert!(!self.closes_at(at, NOTHING).await, "closed when answered");
        }

        /// Moves the clock to `at` after the connection began and polls the guard once, with
        /// or without head bytes buffered: whether it gives up on the connection.
        async fn closes_at(&mut self, at: Duration, partial: bool) -> bool {
            self.gives_up_at(at, partial).await.is_some()
        }

        /// As [`Guard::closes_at`], with the reason it gives up, if it does.
        async fn gives_up_at(&mut self, at: Duration, partial: bool) -> Option<GaveUp> {
            let now = Instant::now();
            let then = self.start + at;
            assert!(then >= now, "{at:?} is in the past");
            tokio::time::advance(then - now).await;
            let served = self.served;
            match poll_fn(|cx| Poll::Ready(self.patience.poll_expired(cx, served, partial))).await {
                Poll::Ready(why) => Some(why),
                Poll::Pending => None,
            }
        }

        /// The connection's one timer (its address: the same `Sleep`, or a new one).
        fn timer(&self) -> *const Sleep {
            &**self.patience.timer.as_ref().expect("armed")
        }

        /// When the timer fires next, after the connection began.
        fn next_firing(&self) -> Duration {
            let timer = self.patience.timer.as_ref().expect("armed");
            timer.deadline() - self.start
        }
    }

    #[tokio::test(start_paused = true)]
    async fn partial_head_is_given_up_after_one_to_two_periods_never_before_one() {
        // Begun just before a firing: noted at it, given up at the next, so after one period
        // and a millisecond.
        let mut guard = Guard::after_one_answer(PERIOD).await;
        let began = 2 * PERIOD - MS;
        assert!(!guard.closes_at(began, PARTIAL).await);
        assert!(!guard.closes_at(2 * PERIOD, PARTIAL).await);
        assert!(
            !guard.closes_at(began + PERIOD, PARTIAL).await,
            "one period"
        );
        let why = guard.gives_up_at(3 * PERIOD, PARTIAL).await;
        assert_eq!(why, Some(GaveUp::SlowHead));

        // Begun at the very firing that sees it: one period exactly.
        let mut guard = Guard::after_one_answer(PERIOD).await;
        assert!(!guard.closes_at(2 * PERIOD, PARTIAL).await);
        assert!(!guard.closes_at(3 * PERIOD - MS, PARTIAL).await);
        assert!(guard.closes_at(3 * PERIOD, PARTIAL).await);

        // Begun just after a firing: noted at the next, given up at the one after, so after
        // two periods less a millisecond.
        let mut guard = Guard::after_one_answer(PERIOD).await;
        assert!(!guard.closes_at(2 * PERIOD, NOTHING).await);
        let began = 2 * PERIOD + MS;
        assert!(!guard.closes_at(began, PARTIAL).await);
        assert!(!guard.closes_at(3 * PERIOD, PARTIAL).await);
        assert!(!guard.closes_at(4 * PERIOD - MS, PARTIAL).await);
        assert!(guard.closes_at(4 * PERIOD, PARTIAL).await);

        // Begun in the period its connection's previous answer went out: that answer does not
        // buy the new head a third period.
        let mut guard = Guard::new(PERIOD).await;
        guard.answered_at(MS).await;
        let began = 2 * MS;
        assert!(!guard.closes_at(began, PARTIAL).await);
        assert!(!guard.closes_at(PERIOD, PARTIAL).await);
        assert!(!guard.closes_at(2 * PERIOD - MS, PARTIAL).await);
        assert!(
            guard.closes_at(2 * PERIOD, PARTIAL).await,
            "a head {:?} old is still waited for",
            2 * PERIOD - began
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_new_connection_is_given_up_at_its_second_firing() {
        let mut guard = Guard::new(PERIOD).await;
        assert!(!guard.closes_at(PERIOD - MS, NOTHING).await);
        assert!(!guard.closes_at(PERIOD, NOTHING).await, "one period");
        assert!(!guard.closes_at(2 * PERIOD - MS, NOTHING).await);
        assert!(guard.closes_at(2 * PERIOD, NOTHING).await);

        // A first head begun late gets no more time: a new connection's clock starts at accept.
        let mut guard = Guard::new(PERIOD).await;
        assert!(!guard.closes_at(PERIOD, NOTHING).await);
        assert!(!guard.closes_at(PERIOD + MS, PARTIAL).await);
        assert!(!guard.closes_at(2 * PERIOD - MS, PARTIAL).await);
        assert!(guard.closes_at(2 * PERIOD, PARTIAL).await);
    }

    #[tokio::test(start_paused = true)]
    async fn head_completed_before_the_second_firing_keeps_the_connection() {
        let mut guard = Guard::new(PERIOD).await;
        assert!(!guard.closes_at(MS, PARTIAL).await);
        assert!(!guard.closes_at(PERIOD, PARTIAL).await);
        // Whole (and answered) before the firing that would have given it up.
        guard.answered_at(2 * PERIOD - MS).await;
        assert!(!guard.closes_at(2 * PERIOD, NOTHING).await);
        assert!(!guard.closes_at(3 * PERIOD, NOTHING).await);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keep_alive_connection_outlives_client_header_and_closes_after_keep_alive_idle() {
        // 75 s rounded up to whole periods: 8 of 10 s, and 3 of 25 s exactly.
        for period in [PERIOD, Duration::from_secs(25)] {
            let periods = KEEP_ALIVE_IDLE.as_millis().div_ceil(period.as_millis()) as u32;
            // Answered at 1 ms; the first firing sees the answer, idle firings count from there.
            let mut guard = Guard::after_one_answer(period).await;
            // Two firings and more without a head: a new connection or a head would be gone.
            for idle in 1..periods {
                let at = (idle + 1) * period;
                assert!(
                    !guard.closes_at(at, NOTHING).await,
                    "{period:?}: idle at {at:?}"
                );
            }
            let closes = (periods + 1) * period;
            assert!(!guard.closes_at(closes - MS, NOTHING).await, "{period:?}");
            // An ordinary end, not the caller's fault (not counted as a slow head).
            let why = guard.gives_up_at(closes, NOTHING).await;
            assert_eq!(why, Some(GaveUp::Idle), "{period:?}");
            // Idle from the answer to the close: the rounded time, plus what was left of the
            // period the answer went out in.
            let (idle, rounded) = (closes - MS, period * periods);
            assert!(rounded >= KEEP_ALIVE_IDLE);
            assert!(
                idle >= rounded && idle < rounded + period,
                "{period:?}: closed after {idle:?} idle"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timer_is_armed_once_and_re_armed_only_when_it_fires() {
        let mut guard = Guard::new(PERIOD).await;
        assert_eq!(guard.next_firing(), PERIOD);
        let timer = guard.timer();
        // Requests answered between firings leave the timer as it is: no timer work per call.
        for n in 1..=5 {
            guard.answered_at(n * PERIOD / 10).await;
            assert_eq!(guard.next_firing(), PERIOD, "after answer {n}");
        }
        assert!(!guard.closes_at(PERIOD - MS, NOTHING).await);
        assert_eq!(guard.next_firing(), PERIOD);
        // Each firing re-arms the same timer one period on.
        for n in 1..=3 {
            assert!(!guard.closes_at(n * PERIOD, NOTHING).await);
            assert_eq!(guard.next_firing(), (n + 1) * PERIOD);
            assert_eq!(guard.timer(), timer, "a new timer at firing {n}");
        }
    }
}
