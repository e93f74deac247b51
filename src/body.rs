//! Body types: one boxed body for every response, and the wrappers that keep bodies streamed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

use crate::error::ProxyError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// No body. Boxing it allocates nothing (the body and its error mapping take no space), which
/// matters for the many bodiless calls.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The request body exceeded `max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body over {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// The caller's request body could not be read to its end. Either way its framing is lost, so
/// the connection closes after the answer ([`caller_fault`] chooses the answer).
#[derive(Debug, thiserror::Error)]
pub enum CallerBodyError {
    /// Malformed chunked framing, or the caller hung up before the end: 400 if anyone is still
    /// there to read it.
    #[error("request body broke off: {0}")]
    Broken(String),
    /// The caller sent nothing for longer than `timeouts.client_body` while the body was being
    /// read: 408 (nginx's `client_body_timeout`).
    #[error("request body paused for over {0:?} (timeouts.client_body)")]
    Stalled(Duration),
}

/// The caller's fault, if a call failed on its streamed request body: over the limit
/// ([`Limited`]), or malformed, cut off or stalled ([`CallerBodyError`]). `None`: someone
/// else's failure (the upstream's, when the body was being forwarded). Walks the error's
/// sources, as the body's error may come wrapped.
pub fn caller_fault(e: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(too_large) = err.downcast_ref::<BodyTooLarge>() {
            return Some(ProxyError::BodyTooLarge { limit: too_large.0 });
        }
        if let Some(caller) = err.downcast_ref::<CallerBodyError>() {
            return Some(match caller {
                CallerBodyError::Broken(_) => {
                    ProxyError::BadRequest("The request body is malformed or ended early.")
                }
                CallerBodyError::Stalled(after) => ProxyError::BodyTimeout { after: *after },
            });
        }
        source = err.source();
    }
    None
}

/// Streams a body through, failing once more than `limit` bytes have passed. Used for request
/// bodies of unknown length; a declared `Content-Length` over the limit is refused before this.
pub struct Limited<B> {
    inner: B,
    remaining: u64,
    limit: u64,
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        Limited {
            inner,
            remaining: limit,
            limit,
        }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose first bytes were already read (to inspect an error code, or to notice a caller
/// leaving while queued): replays them, then streams the rest unchanged.
pub struct Prefixed<B> {
    prefix: Option<Bytes>,
    /// A trailers frame met while reading the prefix, replayed after it.
    trailers: Option<http::HeaderMap>,
    rest: Option<B>,
}

impl<B> Prefixed<B> {
    pub fn new(prefix: Bytes, trailers: Option<http::HeaderMap>, rest: Option<B>) -> Self {
        Prefixed {
            prefix: (!prefix.is_empty()).then_some(prefix),
            trailers,
            rest,
        }
    }
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + extra);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

/// Why a whole request body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// More than this many bytes.
    TooLarge(u64),
    /// The body broke off (the caller went away, or sent a malformed chunk).
    Broken,
    /// The caller paused for longer than this (`timeouts.client_body`).
    Stalled(Duration),
}

impl ReadError {
    /// The body's own error: a stall told apart from a body that broke off.
    fn of(e: BoxError) -> ReadError {
        match caller_fault(e.as_ref()) {
            Some(ProxyError::BodyTimeout { after }) => ReadError::Stalled(after),
            _ => ReadError::Broken,
        }
    }
}

/// Reads a whole request body of at most `limit` bytes, and its trailers: for a call that must be
/// inspected before it is forwarded. [`Prefixed`] replays both unchanged.
pub async fn read_whole<B>(
    mut body: B,
    limit: u64,
) -> Result<(Bytes, Option<http::HeaderMap>), ReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    // Frame by frame rather than through `Limited` and `collect`: no bound on the error type
    // is held across an await, which keeps the calling future `Send` for boxed bodies.
    let mut bytes = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::of(e.into()))?;
        match frame.into_data() {
            Ok(data) => {
                if (bytes.len() + data.len()) as u64 > limit {
                    return Err(ReadError::TooLarge(limit));
                }
                bytes.extend_from_slice(&data);
            }
            Err(frame) => trailers = frame.into_trailers().ok().or(trailers),
        }
    }
    Ok((bytes.freeze(), trailers))
}

/// Reads frames of `body` until at least `want` bytes, the end, or a trailers frame.
/// Returns the bytes read, trailers if met, and the rest of the body if it did not end.
pub async fn read_prefix<B>(
    mut body: B,
    want: usize,
) -> Result<(Bytes, Option<http::HeaderMap>, Option<B>), B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buf = bytes::BytesMut::new();
    loop {
        if buf.len() >= want {
            return Ok((buf.freeze(), None, Some(body)));
        }
        match body.frame().await {
            None => return Ok((buf.freeze(), None, None)),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => buf.extend_from_slice(&data),
                Err(frame) => return Ok((buf.freeze(), frame.into_trailers().ok(), Some(body))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that carries another as its source, as a client's error wraps the body's.
    #[derive(Debug, thiserror::Error)]
    #[error("request body: {0}")]
    struct Wrapped(#[source] BoxError);

    fn fault_of(e: BoxError) -> Option<ProxyError> {
        caller_fault(&Wrapped(e))
    }

    #[test]
    fn a_stalled_body_is_the_callers_408() {
        let after = Duration::from_millis(1500);
        let error = fault_of(Box::new(CallerBodyError::Stalled(after)));
        assert_eq!(error, Some(ProxyError::BodyTimeout { after }));
        assert_eq!(
            error.map(|e| e.status()),
            Some(http::StatusCode::REQUEST_TIMEOUT)
        );
    }

    #[test]
    fn a_broken_or_oversized_body_is_the_callers_400_or_413() {
        let broken = fault_of(Box::new(CallerBodyError::Broken("eof".into())));
        assert_eq!(broken.map(|e| e.status().as_u16()), Some(400));
        let too_large = fault_of(Box::new(BodyTooLarge(7)));
        assert_eq!(too_large, Some(ProxyError::BodyTooLarge { limit: 7 }));
    }

    /// A body whose first frame is `error`.
    struct Failing(Option<BoxError>);

    impl Body for Failing {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.take().map(Err))
        }
    }

    #[tokio::test]
    async fn reading_a_whole_body_tells_a_stall_from_a_break() {
        let after = Duration::from_secs(60);
        let stalled = Failing(Some(Box::new(CallerBodyError::Stalled(after))));
        assert_eq!(
            read_whole(stalled, 10).await,
            Err(ReadError::Stalled(after))
        );
        let broken = Failing(Some(Box::new(CallerBodyError::Broken("eof".into()))));
        assert_eq!(read_whole(broken, 10).await, Err(ReadError::Broken));
    }

    #[test]
    fn any_other_failure_is_not_the_callers() {
        let io: BoxError = Box::new(std::io::Error::other("connection reset by the upstream"));
        assert_eq!(fault_of(io), None);
    }
}
