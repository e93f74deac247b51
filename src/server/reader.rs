//! The read side of one caller connection: request heads, request bodies streamed to the
//! proxy, and watching for the caller hanging up while its call waits.
//!
//! One [`Reader`] per connection, shared (behind a mutex that is never contended: everything
//! runs on the connection's task) by the connection and the body of its current request. The
//! body reads the socket only while it is unfinished; the connection only once it is finished,
//! so the bytes of a pipelined request are never taken for a body.
//!
//! A body that waits on the socket for longer than `timeouts.client_body` since bytes last came
//! fails ([`BodyPatience`]), so a caller that stalls its body cannot hold its call and
//! connection for ever. An h2c stream's body (hyper's) is held to the same guard by
//! [`PatientBody`].

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::wire::{self, HeadError, ParsedRequest, RequestFraming};
use crate::body::{BoxError, CallerBodyError};
use crate::upstream::wire::{Chunk, ChunkedDecoder};

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;
/// Bytes of pipelined requests the hang-up watch reads while a call runs; beyond that it stops
/// watching (a caller pipelining behind queued calls must not make each hold a head's worth).
const WATCH_HOLD: usize = 4 * 1024;

thread_local! {
    /// Where a worker thread reads the next head of any of its connections: a head that
    /// arrives whole (nearly all of them) never needs a buffer of its connection's own, so an
    /// idle or waiting connection holds none.
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// What reading the next head gave.
#[derive(Debug)]
pub enum Head {
    Request(Box<ParsedRequest>),
    /// An HTTP/2 connection preface: the caller speaks h2c with prior knowledge.
    H2,
    /// The caller closed the connection (or reset it) between requests.
    Closed,
}

/// What one read towards a head gave.
enum Read {
    Eof,
    /// Bytes were added to the connection's buffer, without a whole head yet.
    Buffered,
    Parsed(Result<Head, HeadFailure>),
}

/// Why a head cannot be read: answered with 431 or 400, then the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadFailure {
    TooLarge,
    Bad(HeadError),
}

/// The state of the current request's body.
#[derive(Debug)]
enum BodyState {
    /// Read whole (or there was none): the connection may read the socket.
    Complete,
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Broke off: the caller hung up or sent malformed chunks. The connection closes.
    Failed,
}

pub struct Reader {
    stream: Arc<TcpStream>,
    /// Bytes read and not yet taken: the rest of a head, a body, the next pipelined request.
    buf: BytesMut,
    body: BodyState,
    /// `Expect: 100-continue` to be answered on the body's first read.
    send_continue: bool,
    /// Counts requests, so a body handed to an earlier request cannot read a later one's bytes.
    seq: u64,
    /// The most bytes buffered before a head must be complete (431 beyond).
    head_limit: usize,
    /// Whether a short read may mark the socket drained (see [`read_drained`]): only on a
    /// single-threaded runtime, as the proxy's worker threads are.
    mark_drained: bool,
    /// Bounds the pauses of the current request's body (`timeouts.client_body`).
    body_patience: BodyPatience,
    /// This event loop knows nothing yet of the socket's readiness (a connection handed over
    /// from another worker): the next read for a head is tried before waiting for an event.
    unready: bool,
}

pub type SharedReader = Arc<Mutex<Reader>>;

/// Never poisoned in practice (nothing in here panics); if it were, the state is still usable.
pub fn lock(reader: &SharedReader) -> MutexGuard<'_, Reader> {
    reader
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Reader {
    /// `client_body`: the longest a request body may wait on the socket for its next bytes.
    pub fn new(stream: Arc<TcpStream>, head_limit: usize, client_body: Duration) -> Reader {
        Reader {
            stream,
            buf: BytesMut::new(),
            body: BodyState::Complete,
            send_continue: false,
            seq: 0,
            head_limit,
            mark_drained: tokio::runtime::Handle::try_current().is_ok_and(|handle| {
                handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
            }),
            body_patience: BodyPatience::new(client_body),
            unready: false,
        }
    }

    /// For a socket registered with this event loop after it was accepted elsewhere (handed
    /// over from another worker): tokio marks only the sockets it accepted itself as ready, so
    /// the caller's first request, usually already waiting, would otherwise be read only after
    /// a turn of the event loop, and its wait would arm the head timer for the connection's
    /// life.
    pub fn try_before_waiting(&mut self) {
        self.unready = true;
    }

    /// Bytes of an unfinished head (or a pipelined request) are buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The bytes read but not yet used, handed over with the socket to the HTTP/2 server.
    pub fn into_parts(self) -> (Arc<TcpStream>, Bytes) {
        (self.stream, self.buf.freeze())
    }

    /// Reads until a whole head is buffered, and parses it.
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, HeadFailure>> {
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = self.parse_buffered()? {
                    return Poll::Ready(Ok(head));
                }
                if self.buf.len() > self.head_limit {
                    return Poll::Ready(Err(HeadFailure::TooLarge));
                }
            }
            match ready!(self.poll_read_head(cx)) {
                // A caller that leaves (or resets) between requests, or within a head: closed.
                Err(_) | Ok(Read::Eof) => return Poll::Ready(Ok(Head::Closed)),
                Ok(Read::Parsed(head)) => return Poll::Ready(head),
                Ok(Read::Buffered) => {}
            }
        }
    }

    /// Parses what `buf` holds: `Ok(None)` if more is needed.
    fn parse_buffered(&mut self) -> Result<Option<Head>, HeadFailure> {
        let parsed = match classify(&self.buf, self.seq, self.head_limit)? {
            Some(Head::Request(parsed)) => parsed,
            other => return Ok(other),
        };
        self.buf.advance(parsed.consumed);
        if self.buf.is_empty() {
            // Nothing pipelined: give the memory back while the call runs.
            self.buf = BytesMut::new();
        }
        Ok(Some(self.start(parsed)))
    }

    /// One read towards a head.
    fn poll_read_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Read>> {
        loop {
            if !self.unready {
                ready!(self.stream.poll_read_ready(cx))?;
            }
            let read = if self.buf.is_empty() {
                SCRATCH.with(|scratch| self.read_into_scratch(&mut scratch.borrow_mut()))
            } else {
                self.buf.reserve(READ_SIZE);
                let read = read_head_bytes(
                    &self.stream,
                    &mut self.unready,
                    self.mark_drained,
                    &mut self.buf,
                );
                read.map(|n| if n == 0 { Read::Eof } else { Read::Buffered })
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                read => return Poll::Ready(read),
            }
        }
    }

    /// Reads into the thread's scratch buffer, and parses a head that arrived whole straight
    /// from there: only what is left over (a partial head, the next pipelined request, the
    /// start of a body) is kept by the connection.
    fn read_into_scratch(&mut self, scratch: &mut BytesMut) -> io::Result<Read> {
        scratch.clear();
        scratch.reserve(READ_SIZE);
        if read_head_bytes(&self.stream, &mut self.unready, self.mark_drained, scratch)? == 0 {
            return Ok(Read::Eof);
        }
        Ok(match classify(scratch, self.seq, self.head_limit) {
            Ok(Some(Head::Request(parsed))) => {
                self.buf.extend_from_slice(&scratch[parsed.consumed..]);
                Read::Parsed(Ok(self.start(parsed)))
            }
            Ok(Some(other)) => {
                // The HTTP/2 preface: its bytes go with the socket to the HTTP/2 server.
                self.buf.extend_from_slice(scratch);
                Read::Parsed(Ok(other))
            }
            Ok(None) => {
                self.buf.extend_from_slice(scratch);
                Read::Buffered
            }
            Err(failure) => Read::Parsed(Err(failure)),
        })
    }

    /// Begins a request: its body (if it did not come whole) now streams from this reader.
    fn start(&mut self, parsed: Box<ParsedRequest>) -> Head {
        self.seq += 1;
        self.body = match (parsed.body.is_some(), parsed.framing) {
            (true, _) | (false, RequestFraming::Empty) => BodyState::Complete,
            (false, RequestFraming::Length(n)) => BodyState::Length(n),
            (false, RequestFraming::Chunked) => BodyState::Chunked(ChunkedDecoder::default()),
        };
        self.send_continue = parsed.expect_continue && !matches!(self.body, BodyState::Complete);
        // A new body: its first wait starts its own clock.
        self.body_patience.progressed();
        Head::Request(parsed)
    }

    /// The body of the current request, streamed from the socket.
    pub fn body(reader: &SharedReader) -> CallerBody {
        let this = lock(reader);
        let exact = match this.body {
            BodyState::Length(n) => Some(n),
            _ => None,
        };
        CallerBody {
            reader: reader.clone(),
            seq: this.seq,
            exact,
            ended: false,
        }
    }

    /// Whether the current request's body has been read to its end (so the connection can
    /// carry another request).
    pub fn body_complete(&self) -> bool {
        matches!(self.body, BodyState::Complete)
    }

    /// Resolves when the caller hangs up (or resets) while its call runs. Watches only once
    /// the body has been read: until then the body's own reads notice it. Bytes of a pipelined
    /// request are kept (up to `WATCH_HOLD`, then the socket is left alone).
    pub fn poll_hangup(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.body_complete() || self.buf.len() >= WATCH_HOLD {
            return Poll::Pending;
        }
        loop {
            if ready!(self.stream.poll_read_ready(cx)).is_err() {
                return Poll::Ready(());
            }
            self.buf.reserve(1024);
            match read_drained(&self.stream, &mut self.buf, self.mark_drained) {
                Ok(0) => return Poll::Ready(()),
                Ok(_) if self.buf.len() >= WATCH_HOLD => return Poll::Pending,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(()),
            }
        }
    }

    /// The body's next bytes, failing it if it has waited longer than `client_body` for them.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let polled = self.poll_body_bytes(cx);
        if polled.is_pending() && self.body_patience.poll_expired(cx).is_ready() {
            // The rest of the body may still come, so its framing is lost: the connection
            // closes after the answer (the body is not complete).
            self.body = BodyState::Failed;
            return Poll::Ready(Some(Err(self.body_patience.stalled())));
        }
        polled
    }

    fn poll_body_bytes(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        if self.send_continue {
            ready!(self.poll_send_continue(cx))?;
        }
        loop {
            match &mut self.body {
                BodyState::Complete => return Poll::Ready(None),
                BodyState::Failed => return Poll::Ready(Some(Err(broken()))),
                BodyState::Length(0) => {
                    self.body = BodyState::Complete;
                    return Poll::Ready(None);
                }
                BodyState::Length(left) => {
                    if !self.buf.is_empty() {
                        let take = (*left).min(self.buf.len() as u64);
                        *left -= take;
                        let data = self.buf.split_to(take as usize).freeze();
                        if *left == 0 {
                            self.body = BodyState::Complete;
                        }
                        self.release_if_empty();
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut self.buf) {
                    Ok(Chunk::Data(data)) => {
                        self.release_if_empty();
                        return Poll::Ready(Some(Ok(data)));
                    }
                    Ok(Chunk::End) => {
                        self.body = BodyState::Complete;
                        return Poll::Ready(None);
                    }
                    Ok(Chunk::NeedMore) => {}
                    Err(e) => {
                        self.body = BodyState::Failed;
                        return Poll::Ready(Some(Err(caller_error(e))));
                    }
                },
            }
            if let Err(e) = ready!(self.poll_fill_for_body(cx)) {
                self.body = BodyState::Failed;
                return Poll::Ready(Some(Err(caller_error(e))));
            }
        }
    }

    /// Drops the buffer once everything in it was handed out: the bytes handed out share its
    /// allocation, which a queued call would otherwise keep whole.
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    fn poll_fill_for_body(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let want = match self.body {
            BodyState::Length(left) => (left as usize).clamp(1, READ_SIZE),
            _ => READ_SIZE,
        };
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            self.buf.reserve(want);
            match read_drained(&self.stream, &mut self.buf, self.mark_drained) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {
                    // Any bytes count, a piece of a chunk-size line too: the limit is on pauses.
                    self.body_patience.progressed();
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `100 Continue` (25 bytes on a connection with nothing else in flight: one write).
    fn poll_send_continue(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match self.stream.try_write(wire::CONTINUE) {
                Ok(n) if n == wire::CONTINUE.len() => {
                    self.send_continue = false;
                    return Poll::Ready(Ok(()));
                }
                // A partial interim answer cannot be finished cleanly: give up on the body.
                Ok(_) => {
                    self.body = BodyState::Failed;
                    return Poll::Ready(Err(broken()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = ready!(self.stream.poll_write_ready(cx)) {
                        self.body = BodyState::Failed;
                        return Poll::Ready(Err(caller_error(e)));
                    }
                }
                Err(e) => {
                    self.body = BodyState::Failed;
                    return Poll::Ready(Err(caller_error(e)));
                }
            }
        }
    }
}

/// Reads what the socket holds into `buf`. A read that did not fill the room it was given
/// emptied the socket, so the socket is marked not readable at once: the next wait goes
/// straight to the event loop instead of first trying a read that can only fail (nginx does
/// the same). This cannot lose a wake-up: the worker runtimes are single-threaded, so no
/// readiness event is taken from the kernel between this read and the marking, and bytes that
/// arrive after the read raise a new event. On any other runtime (`mark`: false) it is not done.
fn read_drained(stream: &TcpStream, buf: &mut BytesMut, mark: bool) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let n = stream.try_read_buf(buf)?;
    if mark && n > 0 && n < room {
        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
    Ok(n)
}

/// One read towards a head, into `buf`: straight from the socket if its readiness is unknown
/// (`unready`, then cleared), else as [`read_drained`].
fn read_head_bytes(
    stream: &TcpStream,
    unready: &mut bool,
    mark: bool,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    if std::mem::take(unready) {
        return read_unready(stream, buf);
    }
    read_drained(stream, buf, mark)
}

/// One read that does not ask the event loop first, for a socket it has reported no readiness
/// for yet ([`Reader::try_before_waiting`]): `WouldBlock` if nothing is waiting. Done through
/// the socket itself, as tokio's reads refuse to try a socket not known to be ready. The read
/// needs initialised bytes, so `buf`'s spare room is zeroed first (once per such connection).
fn read_unready(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    use std::io::Read;
    let start = buf.len();
    buf.resize(buf.capacity(), 0);
    let read = (&*socket2::SockRef::from(stream)).read(&mut buf[start..]);
    buf.truncate(start + read.as_ref().map_or(0, |n| *n));
    read
}

/// The head (or preface, or failure) at the front of `buf`, without consuming anything.
/// A head longer than `head_limit` is refused even when it arrived whole in one read.
fn classify(buf: &[u8], seq: u64, head_limit: usize) -> Result<Option<Head>, HeadFailure> {
    if seq == 0 && buf.first() == Some(&b'P') {
        let n = buf.len().min(wire::H2_PREFACE.len());
        if buf[..n] == wire::H2_PREFACE[..n] {
            return Ok((n == wire::H2_PREFACE.len()).then_some(Head::H2));
        }
    }
    match wire::parse_request(buf) {
        Ok(Some(parsed)) if parsed.head_len > head_limit => Err(HeadFailure::TooLarge),
        Ok(Some(parsed)) => Ok(Some(Head::Request(Box::new(parsed)))),
        Ok(None) => Ok(None),
        Err(HeadError::TooManyFields) => Err(HeadFailure::TooLarge),
        Err(e) => Err(HeadFailure::Bad(e)),
    }
}

fn broken() -> BoxError {
    Box::new(CallerBodyError::Broken(
        "the connection failed earlier".into(),
    ))
}

fn caller_error(e: impl std::fmt::Display) -> BoxError {
    Box::new(CallerBodyError::Broken(e.to_string()))
}

/// The slow-body guard (nginx's `client_body_timeout`): the longest a request body may wait on
/// the socket (or its HTTP/2 stream) for its next bytes. Not a bound on the whole body: a body
/// that keeps arriving, however slowly, is never cut off.
///
/// The clock starts at the first wait since bytes last came (or since the body began), not
/// when they came: while the proxy is not asking for the body (a slow upstream connection, a
/// queue that holds enough of it) the caller's bytes wait in the socket, and that time is not
/// held against it. A body read without waiting (bytes that came with the head) never touches
/// the timer; there is one timer per connection (per stream body for HTTP/2), made at its
/// first wait and reset, not remade, at later ones.
struct BodyPatience {
    period: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer runs for the current wait: set at the first wait, cleared when bytes come.
    armed: bool,
}

impl BodyPatience {
    fn new(period: Duration) -> BodyPatience {
        BodyPatience {
            period,
            timer: None,
            armed: false,
        }
    }

    /// Bytes came (or a new body begins): the next wait starts a new period.
    fn progressed(&mut self) {
        self.armed = false;
    }

    /// The body waits for bytes: ready once a whole period has passed since the first wait
    /// after bytes last came.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.armed {
            self.armed = true;
            let deadline = Instant::now() + self.period;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                // Boxed: made at the connection's first wait for body bytes, then kept.
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match &mut self.timer {
            Some(timer) => timer.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// What a body fails with once a pause has expired: the proxy answers it 408.
    fn stalled(&self) -> BoxError {
        Box::new(CallerBodyError::Stalled(self.period))
    }
}

/// An HTTP/2 request body (hyper's, for an h2c stream) under the slow-body guard of an
/// HTTP/1.1 one: any frame that comes counts as progress, and a wait longer than `client_body`
/// since the last one fails the body with [`CallerBodyError::Stalled`] (answered 408). Frames,
/// the size hint and the end of the stream are the inner body's own; a body that never waits
/// (none at all, or one that came whole) never makes a timer.
///
/// Once stalled it fails every later poll the same way and reads no more of the inner body: a
/// body that broke off must not end as if it were whole (a consumer that polled again and got
/// `None` would take a truncated body for a complete one, and with no declared length the
/// upstream request could not tell either), which is also what hyper's own body does after a
/// stream error. For the same reason its end of stream stays the inner body's (not ended).
pub struct PatientBody<B> {
    inner: B,
    patience: BodyPatience,
    stalled: bool,
}

impl<B> PatientBody<B> {
    /// `client_body`: the longest the body may wait for its next frame.
    pub fn new(inner: B, client_body: Duration) -> PatientBody<B> {
        PatientBody {
            inner,
            patience: BodyPatience::new(client_body),
            stalled: false,
        }
    }
}

impl<B> Body for PatientBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = &mut *self;
        if this.stalled {
            return Poll::Ready(Some(Err(this.patience.stalled())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Data or trailers: the caller is still sending.
                this.patience.progressed();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                ready!(this.patience.poll_expired(cx));
                this.stalled = true;
                Poll::Ready(Some(Err(this.patience.stalled())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body streamed from the caller's connection.
pub struct CallerBody {
    reader: SharedReader,
    seq: u64,
    /// Bytes still to come, for a body of declared length: its size hint shrinks as it is read
    /// (a body read in part, then forwarded, must declare only what is left).
    exact: Option<u64>,
    ended: bool,
}

impl Body for CallerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut reader = lock(&self.reader);
        if reader.seq != self.seq {
            // The connection moved on, which it does only once this body was read whole.
            drop(reader);
            self.ended = true;
            return Poll::Ready(None);
        }
        let polled = reader.poll_body(cx);
        drop(reader);
        match polled {
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(data))) => {
                if let Some(left) = &mut self.exact {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::task::Waker;
    use tokio::io::AsyncWriteExt;

    /// `timeouts.client_body` in these tests (on tokio's paused clock: nothing sleeps for real).
    const PERIOD: Duration = Duration::from_secs(60);
    const MS: Duration = Duration::from_millis(1);

    fn poll(patience: &mut BodyPatience) -> Poll<()> {
        patience.poll_expired(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_each_shorter_than_the_period_never_expire_however_long_the_body_takes() {
        let mut patience = BodyPatience::new(PERIOD);
        assert!(poll(&mut patience).is_pending());
        let timer = patience.timer.as_deref().map(std::ptr::from_ref);
        for _ in 0..3 {
            tokio::time::advance(PERIOD - MS).await;
            assert!(poll(&mut patience).is_pending());
            patience.progressed();
            assert!(poll(&mut patience).is_pending());
        }
        // Reset, never remade.
        assert_eq!(patience.timer.as_deref().map(std::ptr::from_ref), timer);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_expires_a_whole_period_after_the_wait_began() {
        let mut patience = BodyPatience::new(PERIOD);
        assert!(poll(&mut patience).is_pending());
        tokio::time::advance(PERIOD / 2).await;
        // Waiting again is the same pause: the period is not restarted.
        assert!(poll(&mut patience).is_pending());
        tokio::time::advance(PERIOD / 2 - MS).await;
        assert!(poll(&mut patience).is_pending());
        tokio::time::advance(MS).await;
        assert!(poll(&mut patience).is_ready());
    }

    #[test]
    fn no_timer_until_the_first_wait() {
        let mut patience = BodyPatience::new(PERIOD);
        patience.progressed();
        assert!(patience.timer.is_none());
    }

    /// A reader on the accepting end of a loopback connection, and the caller's end.
    async fn connected() -> (SharedReader, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let caller = tokio::net::TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let reader = Reader::new(Arc::new(accepted), 16 * 1024, PERIOD);
        (Arc::new(Mutex::new(reader)), caller)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_as_stalled_after_the_period_and_stays_incomplete() {
        let (reader, mut caller) = connected().await;
        caller
            .write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .expect("write");
        let head = std::future::poll_fn(|cx| lock(&reader).poll_head(cx)).await;
        assert!(matches!(head, Ok(Head::Request(_))), "{head:?}");
        let mut body = Reader::body(&reader);

        // The bytes that came with the head are handed out without a timer.
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"0123456789"[..]));
        assert!(lock(&reader).body_patience.timer.is_none());

        // Then nothing comes: the clock jumps to the body's deadline.
        let waited = Instant::now();
        let error = body.frame().await.expect("a frame").expect_err("stalled");
        assert!(waited.elapsed() >= PERIOD, "{:?}", waited.elapsed());
        assert!(
            matches!(
                error.downcast_ref::<CallerBodyError>(),
                Some(CallerBodyError::Stalled(after)) if *after == PERIOD
            ),
            "{error}"
        );
        assert!(body.is_end_stream());
        // The rest of the body may still come: nothing after it can be read as a request.
        assert!(!lock(&reader).body_complete());
    }

    /// A request body the test feeds a frame at a time, as an h2c stream's body is fed by the
    /// caller; it ends when the sender is dropped.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(Frame::data(d))))
        }
    }

    fn fed() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, PatientBody<Fed>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, PatientBody::new(Fed(rx), PERIOD))
    }

    fn is_stalled(error: &BoxError) -> bool {
        matches!(
            error.downcast_ref::<CallerBodyError>(),
            Some(CallerBodyError::Stalled(after)) if *after == PERIOD
        )
    }

    #[tokio::test(start_paused = true)]
    async fn h2_body_that_stalls_fails_as_stalled_after_the_period_and_keeps_failing() {
        let (tx, mut body) = fed();
        tx.send(Bytes::from_static(b"0123456789")).expect("send");
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"0123456789"[..]));
        // A frame that was there when asked for: no wait, no timer.
        assert!(body.patience.timer.is_none());

        let waited = Instant::now();
        let error = body.frame().await.expect("a frame").expect_err("stalled");
        assert!(waited.elapsed() >= PERIOD, "{:?}", waited.elapsed());
        assert!(is_stalled(&error), "{error}");

        // Bytes that come after the stall are not handed out: the body broke off, and never
        // ends as if it were whole.
        tx.send(Bytes::from_static(b"late")).expect("send");
        for _ in 0..2 {
            let again = body
                .frame()
                .await
                .expect("a frame")
                .expect_err("still stalled");
            assert!(is_stalled(&again), "{again}");
        }
        assert!(!body.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn h2_body_whose_frames_each_come_within_the_period_is_never_cut_off() {
        const FRAMES: u32 = 5;
        let (tx, mut body) = fed();
        let started = Instant::now();
        let caller = tokio::spawn(async move {
            for _ in 0..FRAMES {
                tokio::time::sleep(PERIOD - MS).await;
                tx.send(Bytes::from_static(b"x")).expect("send");
            }
        });
        let mut frames = 0;
        let mut timer = None;
        while let Some(frame) = body.frame().await {
            frame.expect("no stall");
            frames += 1;
            let this = body.patience.timer.as_deref().map(std::ptr::from_ref);
            // One timer for the body, reset at each wait, never remade.
            assert!(this.is_some() && (timer.is_none() || timer == this));
            timer = this;
        }
        caller.await.expect("the caller task");
        assert_eq!(frames, FRAMES);
        assert!(started.elapsed() > PERIOD, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn h2_body_keeps_its_size_and_end_and_one_that_never_waits_makes_no_timer() {
        // No body at all (a GET): nothing to wait for.
        let mut empty = PatientBody::new(http_body_util::Empty::<Bytes>::new(), PERIOD);
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(empty.frame().await.is_none());
        assert!(empty.patience.timer.is_none());

        // A body that came whole.
        let mut whole = PatientBody::new(http_body_util::Full::new(Bytes::from("{}")), PERIOD);
        assert!(!whole.is_end_stream());
        assert_eq!(whole.size_hint().exact(), Some(2));
        let data = whole.frame().await.expect("a frame").expect("data");
        assert_eq!(data.into_data().ok().as_deref(), Some(&b"{}"[..]));
        assert!(whole.is_end_stream());
        assert_eq!(whole.size_hint().exact(), Some(0));
        assert!(whole.frame().await.is_none());
        assert!(whole.patience.timer.is_none());
    }

    /// A socket accepted on this event loop, with `request` already waiting in it, taken out
    /// and registered again, as a worker takes a connection another worker accepted.
    async fn handed_over(request: &[u8]) -> (Reader, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut caller = tokio::net::TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        caller.write_all(request).await.expect("write");
        let moved = accepted.into_std().expect("out of the event loop");
        // Until the request is in the socket (on loopback it is once the write returns).
        for _ in 0..1000 {
            if request.is_empty() || moved.peek(&mut [0]).is_ok_and(|n| n == 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let again = TcpStream::from_std(moved).expect("registered again");
        (Reader::new(Arc::new(again), 16 * 1024, PERIOD), caller)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_handed_over_socket_is_read_before_its_first_event() {
        let request = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut cx = Context::from_waker(Waker::noop());

        // As tokio registers it, the socket is not known to be readable: a head read that
        // asks the event loop first waits a turn (and would arm the connection's head timer).
        let (mut waits, _caller) = handed_over(request).await;
        assert!(waits.poll_head(&mut cx).is_pending());

        // Tried first, the request is read at once.
        let (mut reader, _caller) = handed_over(request).await;
        reader.try_before_waiting();
        match reader.poll_head(&mut cx) {
            Poll::Ready(Ok(Head::Request(parsed))) => assert_eq!(parsed.head_len, request.len()),
            other => panic!("expected the request at once, got {other:?}"),
        }

        // Nothing waiting: the try finds nothing, and the read waits for the event loop.
        let (mut idle, _caller) = handed_over(b"").await;
        idle.try_before_waiting();
        assert!(idle.poll_head(&mut cx).is_pending());
        assert!(!idle.unready);
    }

    #[test]
    fn h2_body_can_be_moved_between_threads_and_polled_unpinned() {
        fn send_sync_unpin<T: Send + Sync + Unpin>() {}
        send_sync_unpin::<PatientBody<hyper::body::Incoming>>();
    }
}
