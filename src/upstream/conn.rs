//! Connections to the upstream: dialing (TCP, then TLS for `https`), the idle keep-alive
//! connections each thread keeps, one call's exchange on a connection, and the response body
//! that streams from it.
//!
//! A call runs on its own task from start to end: it writes the request, reads the answer and,
//! when the body has been read to its end, puts the connection back for the next call of that
//! thread. There is no connection task, no channel between tasks and no lock, which is what a
//! general client (hyper-util's) pays for on every call. One request at a time per connection; a
//! connection whose state is in any doubt (an error, a body not read to its end, an answer
//! without a length) is closed, never reused.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{request, Method, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::wire::{self, BodyFraming, Chunk, ChunkedDecoder, RequestFraming, WireError};
use crate::body::{BoxError, ProxyBody};

/// Idle connections are closed before Zoho's front ends would close them under us.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections one thread keeps (per thread, all upstreams together); more are closed.
const MAX_IDLE_PER_THREAD: usize = 256;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Request bytes gathered before a write; a larger body frame is written as it is.
const WRITE_GATHER: usize = 16 * 1024;
/// Buffers above this are not kept with an idle connection.
const KEEP_BUFFER: usize = 16 * 1024;

/// Where calls go: scheme, host and port, and TLS for `https`.
pub(super) struct Origin {
    /// Tells idle connections apart: the upstream's generation and its scheme://authority.
    key: Arc<str>,
    /// What a request's `Host` field says: the authority as configured.
    authority: Arc<str>,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Origin {
    pub(super) fn new(
        generation: u64,
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Origin, String> {
        let https = scheme == &http::uri::Scheme::HTTPS;
        if !https && scheme != &http::uri::Scheme::HTTP {
            return Err(format!("unsupported scheme {scheme}"));
        }
        // An IPv6 literal comes in brackets.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            Some((TlsConnector::from(tls.clone()), name))
        } else {
            None
        };
        Ok(Origin {
            key: format!("{generation} {scheme}://{authority}").into(),
            authority: authority.as_str().into(),
            host,
            port,
            tls,
        })
    }
}

/// Why one exchange failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ExchangeError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    /// The caller's request body failed (went over `max_body_bytes`, or broke off).
    #[error("request body: {0}")]
    Body(BoxError),
    #[error("the upstream closed the connection before answering")]
    Closed,
    /// The exchange was polled again after its outcome.
    #[error("the exchange has already ended")]
    Finished,
    /// The upstream took no part of the request, or sent no answer head, within
    /// [`Limits::response`].
    #[error("the upstream did not {0} within the response timeout")]
    TimedOut(&'static str),
}

/// How long each stage of an exchange may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Each address's TCP connect, then the TLS handshake.
    pub connect: Duration,
    /// Each write of the request (an upstream that stops reading), then the answer's head,
    /// counted from when the request has been sent (`timeouts.response`), then each pause in the
    /// answer's body. The caller's own pauses while its body streams are bounded by the server
    /// (`timeouts.client_body`).
    pub response: Duration,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One keep-alive connection and its buffers (kept with it, so a call allocates none).
pub(super) struct Conn {
    stream: Stream,
    key: Arc<str>,
    /// The `Host` of every request on this connection (its origin's authority).
    authority: Arc<str>,
    /// The runtime whose event loop the socket is registered with: only that runtime's tasks
    /// are woken when it becomes readable, so only they may use it.
    runtime: tokio::runtime::Id,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The request being written.
    out: Vec<u8>,
    /// Bounds the wait for an answer's head ([`answer_within`]); made at the first call.
    answer_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    /// Opens a connection: the connect timeout bounds each address's TCP connect, then the TLS
    /// handshake (a peer that takes the connection and never speaks TLS is a timeout, 504).
    async fn open(origin: &Origin, connect_timeout: Duration) -> Result<Conn, ExchangeError> {
        let tcp = dial(&origin.host, origin.port, connect_timeout)
            .await
            .map_err(ExchangeError::Connect)?;
        tcp.set_nodelay(true).map_err(ExchangeError::Connect)?;
        let stream = match &origin.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => {
                let handshake = connector.connect(name.clone(), tcp);
                let tls = tokio::time::timeout(connect_timeout, handshake)
                    .await
                    .map_err(|_| {
                        let timed_out = "TLS handshake timed out";
                        ExchangeError::Connect(io::Error::new(io::ErrorKind::TimedOut, timed_out))
                    })?
                    .map_err(ExchangeError::Connect)?;
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(Conn {
            stream,
            key: origin.key.clone(),
            authority: origin.authority.clone(),
            runtime: tokio::runtime::Handle::current().id(),
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
            answer_timer: None,
        })
    }

    /// Still open and quiet: an idle connection that the upstream closed, or that has bytes
    /// nobody asked for, reads as ready and is not used again. Consumes nothing, never blocks.
    ///
    /// Readiness is what the event loop last saw (as for hyper's pooled connections, whose
    /// task is woken by the same loop): bytes that arrive after an answer are noticed on the
    /// loop's next turn, not by a system call on every call.
    fn is_quiet(&mut self) -> bool {
        if let Stream::Tls(tls) = &mut self.stream {
            // Plaintext that rustls decrypted but nobody has read.
            let mut byte = [0u8; 1];
            match std::io::Read::read(&mut tls.get_mut().1.reader(), &mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => return false,
            }
        }
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        self.stream
            .tcp()
            .poll_peek(&mut cx, &mut probe)
            .is_pending()
    }

    async fn write_out(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// Connects to the first address of `host` that answers, each address with its own connect
/// timeout (an unreachable first address must not use up the time of the others).
async fn dial(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    if let Ok(ip) = host.parse::<IpAddr>() {
        return tokio::time::timeout(timeout, TcpStream::connect((ip, port)))
            .await
            .map_err(|_| timed_out())?;
    }
    let addrs = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| timed_out())??;
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(timed_out()),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for host")))
}

thread_local! {
    /// This thread's idle connections, most recently used last. Per thread, so a connection is
    /// only ever used by the runtime that registered its socket, and taking one needs no lock.
    static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The most recently used idle connection to `origin` that is still good, if any.
fn checkout(origin: &Origin) -> Option<Conn> {
    let runtime = tokio::runtime::Handle::try_current().ok()?.id();
    IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        let mine = |i: &Idle| i.conn.key == origin.key && i.conn.runtime == runtime;
        while let Some(at) = idle.iter().rposition(mine) {
            let mut entry = idle.swap_remove(at);
            if entry.since.elapsed() < IDLE_TIMEOUT && entry.conn.is_quiet() {
                return Some(entry.conn);
            }
        }
        None
    })
    .ok()
    .flatten()
}

/// Keeps a connection whose last exchange ended cleanly for the next call on this thread.
fn checkin(mut conn: Conn) {
    if !conn.buf.is_empty() {
        return;
    }
    if conn.buf.capacity() > KEEP_BUFFER {
        conn.buf = BytesMut::with_capacity(READ_CHUNK);
    }
    if conn.out.capacity() > KEEP_BUFFER {
        conn.out = Vec::with_capacity(1024);
    }
    let now = Instant::now();
    // A thread that is ending has no pool any more: the connection just closes.
    let _ = IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        // The longest idle go first: past the idle timeout (closed by the other end, probably),
        // or of an upstream a reload replaced. Both are found at the front, so this is cheap.
        while idle
            .first()
            .is_some_and(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        if idle.len() >= MAX_IDLE_PER_THREAD {
            idle.remove(0);
        }
        idle.push(Idle { conn, since: now });
    });
}

/// Closes this thread's idle connections (a worker thread that is about to end).
pub(super) fn close_idle() {
    let _ = IDLE.try_with(|idle| idle.borrow_mut().clear());
}

/// Sends one request on a kept or new connection and reads the response head. `parts` holds no
/// hop-by-hop field; the head goes out with the origin's `Host` and this hop's own framing.
pub(super) async fn exchange(
    origin: &Origin,
    limits: Limits,
    parts: request::Parts,
    body: ProxyBody,
) -> Result<Response<UpstreamBody>, ExchangeError> {
    let conn = match checkout(origin) {
        Some(conn) => conn,
        None => Conn::open(origin, limits.connect).await?,
    };
    send_on(conn, parts, body, limits.response).await
}

type Answer = Result<Response<UpstreamBody>, ExchangeError>;

/// One exchange with an upstream, in two stages: it borrows the upstream's origin only while it
/// connects (a pooled connection skips that); from then on it owns everything it needs. Once
/// its request has started out, Zoho may act on it whether or not anyone waits for the answer,
/// and [`Exchange::into_started`] hands the rest of it over to be finished elsewhere.
pub(super) struct Exchange<'a> {
    stage: Stage<'a>,
}

enum Stage<'a> {
    Connecting(Pin<Box<dyn Future<Output = Result<Sendable, ExchangeError>> + Send + 'a>>),
    /// `polled`: the request has started out (its first poll writes the head).
    Sending {
        exchange: Pin<Box<dyn Future<Output = Answer> + Send + 'static>>,
        polled: bool,
    },
    Answered,
}

/// A connection, the request to send on it and the response limit.
type Sendable = (Conn, request::Parts, ProxyBody, Duration);

impl<'a> Exchange<'a> {
    pub(super) fn start(
        origin: &'a Origin,
        limits: Limits,
        parts: request::Parts,
        body: ProxyBody,
    ) -> Self {
        let stage = match checkout(origin) {
            Some(conn) => Stage::Sending {
                exchange: Box::pin(send_on(conn, parts, body, limits.response)),
                polled: false,
            },
            None => Stage::Connecting(Box::pin(async move {
                let conn = Conn::open(origin, limits.connect).await?;
                Ok((conn, parts, body, limits.response))
            })),
        };
        Exchange { stage }
    }

    /// The rest of the exchange, owned, if its request has started out; `None` if nothing has
    /// been sent yet (or the answer is already in).
    pub(super) fn into_started(self) -> Option<Pin<Box<dyn Future<Output = Answer> + Send>>> {
        match self.stage {
            Stage::Sending {
                exchange,
                polled: true,
            } => Some(exchange),
            Stage::Sending { .. } | Stage::Connecting(_) | Stage::Answered => None,
        }
    }
}

impl Future for Exchange<'_> {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        loop {
            match &mut self.stage {
                Stage::Connecting(connecting) => match ready!(connecting.as_mut().poll(cx)) {
                    Ok((conn, parts, body, limit)) => {
                        self.stage = Stage::Sending {
                            exchange: Box::pin(send_on(conn, parts, body, limit)),
                            polled: false,
                        };
                    }
                    Err(e) => {
                        self.stage = Stage::Answered;
                        return Poll::Ready(Err(e));
                    }
                },
                Stage::Sending { exchange, polled } => {
                    *polled = true;
                    let answer = ready!(exchange.as_mut().poll(cx));
                    self.stage = Stage::Answered;
                    return Poll::Ready(answer);
                }
                // Polled again after its outcome: a caller's mistake, told rather than hung.
                Stage::Answered => return Poll::Ready(Err(ExchangeError::Finished)),
            }
        }
    }
}

/// Writes a request on a connection and reads the answer's head; the body streams afterwards.
/// `limit` bounds each write and then the wait for the head ([`Limits::response`]).
async fn send_on(
    mut conn: Conn,
    parts: request::Parts,
    body: ProxyBody,
    limit: Duration,
) -> Result<Response<UpstreamBody>, ExchangeError> {
    let framing = request_framing(&parts.method, &body);
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    wire::encode_request_head(
        &mut conn.out,
        &parts.method,
        target,
        conn.authority.as_bytes(),
        &parts.headers,
        framing,
    );
    // The upstream may answer before it has the whole body (RFC 9112 9.5): an error, a throttle,
    // and then perhaps close. Its answer is what the caller gets, and the connection is not
    // used again (the request was cut short).
    let (sent_whole, mut write_error) = match send_body(&mut conn, body, framing, limit).await {
        Ok(Sent::Whole) => (true, None),
        Ok(Sent::AnsweredEarly) => (false, None),
        Err(ExchangeError::Io(e)) => (false, Some(e)),
        Err(e) => return Err(e),
    };
    // The response timeout runs from here: the request is sent (or the answer has begun).
    let deadline = tokio::time::Instant::now() + limit;
    let mut timer = conn.answer_timer.take();
    let reading = async {
        loop {
            if !conn.buf.is_empty() {
                if let Some(head) = wire::parse_response_head(&mut conn.buf, &parts.method)? {
                    return Ok(head);
                }
            }
            conn.buf.reserve(READ_CHUNK);
            let read = conn.stream.read_buf(&mut conn.buf).await;
            match (read, write_error.take()) {
                (Ok(0), None) => return Err(ExchangeError::Closed),
                (Ok(0) | Err(_), Some(e)) => return Err(ExchangeError::Io(e)),
                (Err(e), None) => return Err(e.into()),
                (Ok(_), error) => write_error = error,
            }
        }
    };
    let head = answer_within(&mut timer, deadline, reading).await;
    conn.answer_timer = timer;
    let head = head.ok_or(ExchangeError::TimedOut("answer"))??;
    let reusable = head.reusable && sent_whole;
    let body = UpstreamBody::new(conn, head.framing, reusable, limit);
    Ok(head.response.map(|()| body))
}

/// `work`'s outcome, or `None` if `deadline` comes first. `timer` is the connection's one timer
/// for this: made at its first call and re-armed only when it fires. A connection's calls come
/// one after another, so each deadline is later than the one the timer was set for: when the
/// timer fires, the current deadline is checked and the timer set for it if it has not come. A
/// call thus costs a clock read, not a timer registered and removed in the runtime's timer
/// wheel. A deadline earlier than the timer's resets it; nothing makes one today (a reload that
/// changes the timeout makes a new upstream, whose connections are new), it is a safeguard.
///
/// While its connection sits idle, the timer keeps the waker of the last task that waited on
/// it until it fires (within a response timeout): that task's memory is kept that long, at
/// most one task per idle connection, and a task still running gets one spurious wake-up.
async fn answer_within<T>(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    deadline: tokio::time::Instant,
    work: impl Future<Output = T>,
) -> Option<T> {
    let sleep = match timer {
        Some(sleep) => {
            if sleep.deadline() > deadline {
                sleep.as_mut().reset(deadline);
            }
            sleep
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        loop {
            ready!(sleep.as_mut().poll(cx));
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(None);
            }
            sleep.as_mut().reset(deadline);
        }
    })
    .await
}

/// `work`'s outcome, or [`ExchangeError::TimedOut`] (`what` the upstream failed to do) if it
/// takes longer than `limit`. Tried once before a timer is armed: a write that goes through at
/// once, as nearly every one does, costs no timer.
async fn within<T>(
    limit: Duration,
    what: &'static str,
    work: impl Future<Output = T>,
) -> Result<T, ExchangeError> {
    let mut work = std::pin::pin!(work);
    let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    if let Poll::Ready(done) = first {
        return Ok(done);
    }
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| ExchangeError::TimedOut(what))
}

/// How the sending of a request ended.
enum Sent {
    Whole,
    /// The upstream began to answer while the body was still streaming; the rest was not sent.
    AnsweredEarly,
}

/// A length when the body knows it (a caller's `Content-Length`, a body read whole), else
/// chunked. No field at all for an empty body on a method without one.
fn request_framing(method: &Method, body: &ProxyBody) -> RequestFraming {
    match body.size_hint().exact() {
        Some(0) if !matches!(*method, Method::POST | Method::PUT | Method::PATCH) => {
            RequestFraming::Empty
        }
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}

/// Writes the request head (already in `conn.out`) and the body. Frames that are ready at once
/// go out with the head in one write; the rest streams as it arrives, while the connection is
/// watched for an early answer. Trailers of a chunked body are not forwarded: they would arrive
/// after every check (identity, limits) was made on the head.
async fn send_body(
    conn: &mut Conn,
    mut body: ProxyBody,
    framing: RequestFraming,
    limit: Duration,
) -> Result<Sent, ExchangeError> {
    let mut left = match framing {
        RequestFraming::Length(n) => n,
        RequestFraming::Chunked | RequestFraming::Empty => 0,
    };
    let chunked = framing == RequestFraming::Chunked;
    loop {
        let frame = if conn.out.is_empty() {
            let Conn { stream, buf, .. } = &mut *conn;
            buf.reserve(READ_CHUNK);
            tokio::select! {
                biased;
                frame = body.frame() => frame,
                read = stream.read_buf(buf) => match read? {
                    0 => return Err(ExchangeError::Closed),
                    // `100 Continue` and the like: the upstream still wants the body.
                    _ if wire::drop_interim_answers(buf) == wire::EarlyAnswer::Interim => continue,
                    _ => return Ok(Sent::AnsweredEarly),
                },
            }
        } else {
            match poll_now(&mut body).await {
                Some(frame) => frame,
                None => {
                    // Nothing more right now: send what there is, then wait.
                    within(limit, "take the request", conn.write_out()).await??;
                    within(limit, "take the request", conn.stream.flush()).await??;
                    continue;
                }
            }
        };
        let frame = match frame {
            None => break,
            Some(Err(e)) => return Err(ExchangeError::Body(e)),
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: see above
        };
        if chunked {
            wire::encode_chunk(&mut conn.out, &data);
        } else {
            let n = data.len() as u64;
            if n > left {
                return Err(ExchangeError::Body(
                    "request body longer than its length".into(),
                ));
            }
            left -= n;
            if data.len() >= WRITE_GATHER {
                within(limit, "take the request", conn.write_out()).await??;
                within(limit, "take the request", conn.stream.write_all(&data)).await??;
                continue;
            }
            conn.out.extend_from_slice(&data);
        }
        if conn.out.len() >= WRITE_GATHER {
            within(limit, "take the request", conn.write_out()).await??;
        }
    }
    if chunked {
        wire::encode_last_chunk(&mut conn.out);
    } else if left > 0 {
        return Err(ExchangeError::Body(
            "request body shorter than its length".into(),
        ));
    }
    within(limit, "take the request", conn.write_out()).await??;
    within(limit, "take the request", conn.stream.flush()).await??;
    Ok(Sent::Whole)
}

/// The body's next frame if it is there now; `None` if it is not (yet).
async fn poll_now(body: &mut ProxyBody) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// A response body from the upstream. A small body that came with the head is handed over at
/// once and its connection goes back for the next call before the caller has even been
/// answered; a larger one streams from the connection, which is kept only if the body is read
/// to its end.
pub struct UpstreamBody {
    kind: Kind,
}

enum Kind {
    Done,
    Whole(Bytes),
    Streaming(Box<Streaming>),
}

struct Streaming {
    conn: Conn,
    framing: Framing,
    reusable: bool,
    /// The longest the upstream may pause in its body (`timeouts.response`).
    idle: Duration,
    /// While waiting for more of the body: when that wait runs out.
    pause_ends: Option<tokio::time::Instant>,
}

enum Framing {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl UpstreamBody {
    fn new(mut conn: Conn, framing: BodyFraming, reusable: bool, idle: Duration) -> UpstreamBody {
        let framing = match framing {
            BodyFraming::None => {
                if reusable {
                    checkin(conn);
                }
                return UpstreamBody { kind: Kind::Done };
            }
            BodyFraming::Length(n) if conn.buf.len() as u64 >= n => {
                let whole = conn.buf.split_to(n as usize).freeze();
                if reusable {
                    checkin(conn);
                }
                return UpstreamBody {
                    kind: Kind::Whole(whole),
                };
            }
            BodyFraming::Length(n) => Framing::Length(n),
            BodyFraming::Chunked => Framing::Chunked(ChunkedDecoder::default()),
            BodyFraming::UntilClose => Framing::UntilClose,
        };
        UpstreamBody {
            kind: Kind::Streaming(Box::new(Streaming {
                conn,
                framing,
                reusable,
                idle,
                pause_ends: None,
            })),
        }
    }

    /// The body ended cleanly: its connection may serve the next call.
    fn finish(&mut self) {
        if let Kind::Streaming(streaming) = std::mem::replace(&mut self.kind, Kind::Done) {
            if streaming.reusable {
                checkin(streaming.conn);
            }
        }
    }

    fn fail(&mut self, error: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.kind = Kind::Done;
        Poll::Ready(Some(Err(error)))
    }
}

impl Streaming {
    /// Whether the upstream, which has nothing more to read now, has paused its body longer
    /// than `idle` since this wait began. The connection's answer timer serves (its calls come
    /// one after another, and the body is the last stage of one). Time the caller takes to take
    /// what was read does not count: a wait begins only when a read finds nothing.
    fn paused_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let ends = *self
            .pause_ends
            .get_or_insert_with(|| tokio::time::Instant::now() + self.idle);
        let timer = match &mut self.conn.answer_timer {
            Some(timer) => {
                if timer.deadline() != ends {
                    timer.as_mut().reset(ends);
                }
                timer
            }
            None => self
                .conn
                .answer_timer
                .insert(Box::pin(tokio::time::sleep_until(ends))),
        };
        timer.as_mut().poll(cx).is_ready()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let streaming = match &mut this.kind {
                Kind::Done => return Poll::Ready(None),
                Kind::Whole(_) => {
                    let Kind::Whole(whole) = std::mem::replace(&mut this.kind, Kind::Done) else {
                        return Poll::Ready(None);
                    };
                    return Poll::Ready(Some(Ok(Frame::data(whole))));
                }
                Kind::Streaming(streaming) => streaming,
            };
            let buf = &mut streaming.conn.buf;
            match &mut streaming.framing {
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !buf.is_empty() {
                        let take = (*left).min(buf.len() as u64);
                        *left -= take;
                        let data = buf.split_to(take as usize).freeze();
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(decoder) => match decoder.decode(buf) {
                    Ok(Chunk::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Chunk::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Chunk::NeedMore) => {}
                    Err(e) => return this.fail(e.into()),
                },
                Framing::UntilClose => {
                    if !buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                    }
                }
            }
            buf.reserve(READ_CHUNK);
            let stream = Pin::new(&mut streaming.conn.stream);
            match tokio_util::io::poll_read_buf(stream, cx, buf) {
                Poll::Pending => {
                    if streaming.paused_too_long(cx) {
                        return this.fail("the upstream paused its answer's body too long".into());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return this.fail(e.into()),
                Poll::Ready(Ok(0)) => {
                    if matches!(streaming.framing, Framing::UntilClose) {
                        this.kind = Kind::Done;
                        return Poll::Ready(None);
                    }
                    return this.fail("the upstream closed the connection mid-body".into());
                }
                Poll::Ready(Ok(_)) => streaming.pause_ends = None,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Done => true,
            Kind::Whole(_) => false,
            Kind::Streaming(streaming) => matches!(streaming.framing, Framing::Length(0)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Done => SizeHint::with_exact(0),
            Kind::Whole(whole) => SizeHint::with_exact(whole.len() as u64),
            Kind::Streaming(streaming) => match streaming.framing {
                Framing::Length(left) => SizeHint::with_exact(left),
                Framing::Chunked(_) | Framing::UntilClose => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_LIMITS: Limits = Limits {
        connect: Duration::from_secs(1),
        response: Duration::from_secs(5),
    };
    use crate::body::{empty, full};
    use http::Request;
    use tokio::net::TcpListener;

    /// A raw upstream on 127.0.0.1:0: each accepted connection is served by `serve`, which
    /// reads requests and writes whatever bytes the test wants.
    async fn raw_upstream<F, Fut>(serve: F) -> (Origin, Arc<std::sync::atomic::AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (origin_at(addr, &http::uri::Scheme::HTTP), accepted)
    }

    /// The origin of a test upstream at `addr` (no trusted roots: only `http` gets anywhere).
    fn origin_at(addr: std::net::SocketAddr, scheme: &http::uri::Scheme) -> Origin {
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        );
        let authority: http::uri::Authority = addr.to_string().parse().unwrap();
        Origin::new(u64::MAX, scheme, &authority, &tls).unwrap()
    }

    /// Reads one request head and its body (by content-length, or chunked to the last chunk);
    /// returns the raw bytes, or `None` once the client closed.
    async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            raw.push(byte[0]);
            let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = &text[..end];
                if let Some(line) = head.lines().find(|l| l.starts_with("content-length:")) {
                    let n: usize = line["content-length:".len()..].trim().parse().unwrap();
                    if raw.len() == end + 4 + n {
                        return Some(raw);
                    }
                } else if head.contains("transfer-encoding: chunked") {
                    if text[end + 4..].contains("0\r\n")
                        && text.ends_with("\r\n\r\n")
                        && text.len() > end + 4
                    {
                        return Some(raw);
                    }
                } else {
                    return Some(raw);
                }
            }
        }
    }

    fn get(path: &str) -> request::Parts {
        let (parts, ()) = Request::get(path).body(()).unwrap().into_parts();
        parts
    }

    fn post(path: &str) -> request::Parts {
        let (parts, ()) = Request::post(path).body(()).unwrap().into_parts();
        parts
    }

    async fn body_of(response: Response<UpstreamBody>) -> Result<Bytes, BoxError> {
        Ok(response.into_body().collect().await?.to_bytes())
    }

    /// One GET through `exchange`: its whole answer.
    async fn get_body(origin: &Origin, path: &str) -> Bytes {
        let response = exchange(origin, TEST_LIMITS, get(path), empty())
            .await
            .unwrap();
        body_of(response).await.unwrap()
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

    #[tokio::test]
    async fn a_connection_is_kept_and_reused_for_the_next_call() {
        let (origin, accepted) = raw_upstream(|mut stream| async move {
            while read_request(&mut stream).await.is_some() {
                stream.write_all(OK).await.unwrap();
            }
        })
        .await;
        for _ in 0..3 {
            assert_eq!(get_body(&origin, "/a").await, "{\"ok\":true}");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_used() {
        let (origin, accepted) = raw_upstream(|mut stream| async move {
            // Answers one call, then closes without saying so in the answer.
            if read_request(&mut stream).await.is_some() {
                stream.write_all(OK).await.unwrap();
            }
        })
        .await;
        for _ in 0..3 {
            assert_eq!(get_body(&origin, "/a").await, "{\"ok\":true}");
            // Long enough for the close to reach this side's event loop.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn connection_close_and_bodies_without_length_are_not_reused() {
        let (origin, accepted) = raw_upstream(|mut stream| async move {
            let Some(request) = read_request(&mut stream).await else {
                return;
            };
            let request = String::from_utf8(request).unwrap();
            if request.starts_with("GET /close") {
                let answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi";
                stream.write_all(answer).await.unwrap();
            } else {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
                    .await
                    .unwrap();
                stream.shutdown().await.unwrap();
            }
            // Keeps the connection open: only the answer may tell the client not to reuse it.
            let _ = read_request(&mut stream).await;
        })
        .await;
        assert_eq!(get_body(&origin, "/close").await, "hi");
        let response = exchange(&origin, TEST_LIMITS, get("/eof"), empty())
            .await
            .unwrap();
        assert_eq!(response.body().size_hint().exact(), None);
        assert_eq!(body_of(response).await.unwrap(), "until the end");
        assert_eq!(get_body(&origin, "/close").await, "hi");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn chunked_answers_stream_through_and_keep_the_connection() {
        let (origin, accepted) = raw_upstream(|mut stream| async move {
            while read_request(&mut stream).await.is_some() {
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n",
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                stream.write_all(b"3\r\nefg\r\n0\r\n\r\n").await.unwrap();
            }
        })
        .await;
        for _ in 0..2 {
            assert_eq!(get_body(&origin, "/").await, "abcdefg");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_longer_than_one_read_streams_with_its_length() {
        let big = vec![b'x'; 100_000];
        let answer = {
            let mut a =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", big.len()).into_bytes();
            a.extend_from_slice(&big);
            a
        };
        let (origin, accepted) = raw_upstream(move |mut stream| {
            let answer = answer.clone();
            async move {
                while read_request(&mut stream).await.is_some() {
                    stream.write_all(&answer).await.unwrap();
                }
            }
        })
        .await;
        for _ in 0..2 {
            let response = exchange(&origin, TEST_LIMITS, get("/"), empty())
                .await
                .unwrap();
            assert_eq!(response.body().size_hint().exact(), Some(100_000));
            assert_eq!(body_of(response).await.unwrap(), big);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn request_bodies_go_out_with_a_length_or_chunked() {
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
        let (origin, _) = raw_upstream(move |mut stream| {
            let seen_tx = seen_tx.clone();
            async move {
                while let Some(request) = read_request(&mut stream).await {
                    seen_tx.send(String::from_utf8(request).unwrap()).unwrap();
                    stream.write_all(OK).await.unwrap();
                }
            }
        })
        .await;
        // The caller's Host, Expect and length are this hop's business: replaced or left out.
        let mut parts = post("/m");
        parts
            .headers
            .insert(http::header::HOST, "caller.example".parse().unwrap());
        parts
            .headers
            .insert(http::header::EXPECT, "100-continue".parse().unwrap());
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, "999".parse().unwrap());
        let host = format!("host: {}\r\n", origin.authority);
        let response = exchange(
            &origin,
            TEST_LIMITS,
            parts,
            full("{\"text\":\"hi\"}".into()),
        )
        .await
        .unwrap();
        body_of(response).await.unwrap();
        assert_eq!(
            seen.recv().await.unwrap(),
            format!("POST /m HTTP/1.1\r\n{host}content-length: 13\r\n\r\n{{\"text\":\"hi\"}}")
        );

        let frames = futures_frames(vec![
            Frame::data(Bytes::from("ab")),
            Frame::data(Bytes::from("cde")),
        ]);
        let response = exchange(&origin, TEST_LIMITS, post("/c"), frames)
            .await
            .unwrap();
        body_of(response).await.unwrap();
        assert_eq!(
            seen.recv().await.unwrap(),
            format!("POST /c HTTP/1.1\r\n{host}transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
        );

        let response = exchange(&origin, TEST_LIMITS, get("/g?q=1"), empty())
            .await
            .unwrap();
        body_of(response).await.unwrap();
        assert_eq!(
            seen.recv().await.unwrap(),
            format!("GET /g?q=1 HTTP/1.1\r\n{host}\r\n")
        );
    }

    /// A body of unknown length made of these frames, each ready at once.
    fn futures_frames(frames: Vec<Frame<Bytes>>) -> ProxyBody {
        let frames = frames.into_iter().map(Ok::<_, BoxError>);
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn an_early_answer_is_passed_on_and_the_connection_not_reused() {
        let (origin, accepted) = raw_upstream(|mut stream| async move {
            // Answers as soon as the head is in, without waiting for the body, and closes.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let answer = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\nno";
            stream.write_all(answer).await.unwrap();
            let _ = read_request(&mut stream).await;
        })
        .await;
        // A body that sends one frame, then never ends.
        struct Stalls(bool);
        impl Body for Stalls {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                if std::mem::replace(&mut self.0, true) {
                    Poll::Pending
                } else {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from("{\"te")))))
                }
            }
        }
        let body = Stalls(false).boxed();
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(&origin, TEST_LIMITS, post("/m"), body),
        )
        .await
        .expect("the early answer ends the exchange")
        .unwrap();
        assert_eq!(response.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body_of(response).await.unwrap(), "no");
        // The request was cut short: the next call needs a new connection.
        let _ = exchange(&origin, TEST_LIMITS, get("/"), empty()).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn bytes_after_an_answer_keep_the_connection_from_being_reused() {
        let (origin, accepted) = raw_upstream(|mut stream| async move {
            while read_request(&mut stream).await.is_some() {
                stream.write_all(OK).await.unwrap();
                // A second, unasked-for answer: it must never reach the next caller.
                tokio::time::sleep(Duration::from_millis(20)).await;
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
                    .await
                    .unwrap();
            }
        })
        .await;
        for _ in 0..2 {
            assert_eq!(get_body(&origin, "/").await, "{\"ok\":true}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_connection_is_only_reused_by_the_runtime_it_was_opened_on() {
        let upstream_rt = tokio::runtime::Runtime::new().unwrap();
        let (origin, accepted) = upstream_rt.block_on(raw_upstream(|mut stream| async move {
            while read_request(&mut stream).await.is_some() {
                stream.write_all(OK).await.unwrap();
            }
        }));
        let call = |rt: &tokio::runtime::Runtime| {
            rt.block_on(async {
                let exchange = exchange(&origin, TEST_LIMITS, get("/"), empty());
                let response = tokio::time::timeout(Duration::from_secs(5), exchange)
                    .await
                    .expect("no hang on another runtime's connection")
                    .unwrap();
                body_of(response).await.unwrap()
            })
        };
        let current = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let (a, b) = (current(), current());
        assert_eq!(call(&a), "{\"ok\":true}");
        assert_eq!(call(&b), "{\"ok\":true}");
        assert_eq!(call(&a), "{\"ok\":true}");
        // One connection each: a's is kept for a, b does not take it.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn broken_answers_are_errors_and_the_connection_is_dropped() {
        for (answer, expected) in [
            (&b"garbage\r\n\r\n"[..], "malformed"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                "mid-body",
            ),
            (b"", "before answering"),
        ] {
            let (origin, _) = raw_upstream(move |mut stream| async move {
                if read_request(&mut stream).await.is_some() {
                    stream.write_all(answer).await.unwrap();
                }
            })
            .await;
            let error = match exchange(&origin, TEST_LIMITS, get("/"), empty()).await {
                Err(e) => e.to_string(),
                Ok(response) => body_of(response).await.unwrap_err().to_string(),
            };
            assert!(error.contains(expected), "{error}");
        }
    }

    /// A request body that comes in `pieces`, `gap` apart (a slow caller).
    struct Trickle {
        pieces: std::collections::VecDeque<Bytes>,
        gap: Duration,
        next: Pin<Box<tokio::time::Sleep>>,
    }

    impl Trickle {
        fn new(pieces: usize, gap: Duration) -> Trickle {
            Trickle {
                pieces: (0..pieces).map(|_| Bytes::from_static(b"x")).collect(),
                gap,
                next: Box::pin(tokio::time::sleep(gap)),
            }
        }
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.pieces.is_empty() {
                return Poll::Ready(None);
            }
            std::task::ready!(self.next.as_mut().poll(cx));
            let deadline = tokio::time::Instant::now() + self.gap;
            self.next.as_mut().reset(deadline);
            Poll::Ready(self.pieces.pop_front().map(|piece| Ok(Frame::data(piece))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.pieces.len() as u64)
        }
    }

    #[tokio::test]
    async fn the_response_timeout_runs_from_the_request_sent_not_while_the_caller_sends_it() {
        let (origin, _) = raw_upstream(|mut stream| async move {
            if read_request(&mut stream).await.is_some() {
                stream.write_all(OK).await.unwrap();
            }
        })
        .await;
        let limits = Limits {
            connect: Duration::from_secs(1),
            response: Duration::from_millis(200),
        };
        // The body takes 600 ms, three response timeouts, each piece well within one.
        let body = Trickle::new(6, Duration::from_millis(100)).boxed();
        let started = tokio::time::Instant::now();
        let response = exchange(&origin, limits, post("/m"), body).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert_eq!(body_of(response).await.unwrap(), "{\"ok\":true}");
    }

    /// An upstream whose connections answer their n-th request after `delays[n]` (ms), and
    /// any later one never (it holds the connection open).
    async fn upstream_answering_after(
        delays: &'static [u64],
    ) -> (Origin, Arc<std::sync::atomic::AtomicUsize>) {
        raw_upstream(move |mut stream| async move {
            let mut calls = 0;
            while read_request(&mut stream).await.is_some() {
                let Some(&delay) = delays.get(calls) else {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                };
                calls += 1;
                tokio::time::sleep(Duration::from_millis(delay)).await;
                stream.write_all(OK).await.unwrap();
            }
        })
        .await
    }

    /// An answer whose body stops coming ends in an error once the pause outlasts
    /// `limits.response`, instead of holding the caller and the connection for ever; pauses
    /// shorter than that, one after another, do not add up.
    #[tokio::test]
    async fn a_body_that_pauses_longer_than_the_response_timeout_fails() {
        let (origin, _) = raw_upstream(|mut stream| async move {
            if read_request(&mut stream).await.is_none() {
                return;
            }
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n";
            stream.write_all(head).await.unwrap();
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                stream.write_all(b"2\r\ncd\r\n").await.unwrap();
            }
            // Then nothing: the connection stays open.
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let limits = Limits {
            connect: Duration::from_secs(1),
            response: Duration::from_millis(250),
        };
        let response = exchange(&origin, limits, get("/"), empty()).await.unwrap();
        let mut body = response.into_body();
        let started = tokio::time::Instant::now();
        let mut got = Vec::new();
        let error = loop {
            match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
                Err(_) => panic!("the body hung after {got:?}"),
                Ok(Some(Ok(frame))) => got.extend_from_slice(&frame.into_data().unwrap()),
                Ok(Some(Err(error))) => break error,
                Ok(None) => panic!("the body ended cleanly after {got:?}"),
            }
        };
        assert_eq!(got, b"abcdcdcd", "pauses of 100 ms are within 250 ms each");
        assert!(error.to_string().contains("paused"), "{error}");
        assert!(started.elapsed() >= Duration::from_millis(300 + 250));
    }

    /// A call that gets no answer ends in the answer timeout, after `limits.response`.
    async fn assert_answer_times_out(origin: &Origin, limits: Limits) {
        let started = tokio::time::Instant::now();
        let Err(error) = exchange(origin, limits, get("/"), empty()).await else {
            panic!("an answer from an upstream that sent none");
        };
        let waited = started.elapsed();
        assert!(
            matches!(error, ExchangeError::TimedOut("answer")),
            "{error}"
        );
        assert!(waited >= limits.response, "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[tokio::test]
    async fn an_upstream_that_sends_no_answer_head_times_out_after_the_response_timeout() {
        let (origin, _) = upstream_answering_after(&[]).await;
        let limits = Limits {
            connect: Duration::from_secs(1),
            response: Duration::from_millis(150),
        };
        assert_answer_times_out(&origin, limits).await;
    }

    /// One connection, three calls: answered at once; answered late but in time, after the
    /// connection's timer had fired while it sat idle; never answered.
    #[tokio::test]
    async fn each_call_on_a_reused_connection_gets_the_whole_response_timeout() {
        let (origin, accepted) = upstream_answering_after(&[0, 200]).await;
        let limits = Limits {
            connect: Duration::from_secs(1),
            response: Duration::from_millis(300),
        };
        let first = exchange(&origin, limits, get("/"), empty()).await.unwrap();
        assert_eq!(body_of(first).await.unwrap(), "{\"ok\":true}");
        // Idle past the first call's deadline: the connection's timer fires unobserved.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let started = tokio::time::Instant::now();
        let second = exchange(&origin, limits, get("/"), empty()).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(body_of(second).await.unwrap(), "{\"ok\":true}");
        assert_answer_times_out(&origin, limits).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_shorter_response_timeout_is_kept_on_a_connection_set_for_a_longer_one() {
        let (origin, accepted) = upstream_answering_after(&[0]).await;
        let long = Limits {
            connect: Duration::from_secs(1),
            response: Duration::from_secs(20),
        };
        let first = exchange(&origin, long, get("/"), empty()).await.unwrap();
        assert_eq!(body_of(first).await.unwrap(), "{\"ok\":true}");
        // A shorter timeout on the same connection (a safeguard: a reload that changes the
        // timeout makes new connections): the timer, set 20 s out, is brought forward.
        let short = Limits {
            response: Duration::from_millis(150),
            ..long
        };
        assert_answer_times_out(&origin, short).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_tls_handshake_that_never_comes_times_out_after_the_connect_timeout() {
        // Takes the connection and says nothing: no ServerHello, ever.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let origin = origin_at(addr, &http::uri::Scheme::HTTPS);
        let limits = Limits {
            connect: Duration::from_millis(150),
            response: Duration::from_secs(30),
        };
        let started = tokio::time::Instant::now();
        let exchange = exchange(&origin, limits, get("/"), empty());
        let outcome = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("the exchange ended on its own");
        let Err(error) = outcome else {
            panic!("an answer without a TLS handshake");
        };
        let waited = started.elapsed();
        assert!(
            matches!(&error, ExchangeError::Connect(e) if e.kind() == io::ErrorKind::TimedOut),
            "{error}"
        );
        assert!(waited >= limits.connect, "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
}
