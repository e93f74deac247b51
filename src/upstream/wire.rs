//! HTTP/1.1 on the wire to the upstream (RFC 9112): the request head as cliqgate writes it, the
//! response head as it reads it, and the framing of the response body. Pure: bytes in, bytes out,
//! no sockets, so every edge is a unit test.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

/// The largest response head (status line and fields) accepted from the upstream. Zoho's are
/// well under 4 KiB; hyper's client allowed about 400 KiB, which no real answer needs.
pub const MAX_HEAD: usize = 64 * 1024;
/// Fields in one response head (hyper's default limit too).
const MAX_FIELDS: usize = 100;
/// A chunk-size line (with extensions) or a trailer line.
const MAX_LINE: usize = 4 * 1024;

/// Why the upstream's bytes cannot be read as HTTP/1.1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed response head: {0}")]
    Head(&'static str),
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    #[error("the upstream switched protocols, which cliqgate does not forward")]
    Upgrade,
}

/// How the body of a request goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// `Content-Length`, declared by the caller or known from the body.
    Length(u64),
    Chunked,
    /// No body and no field: a GET and the like.
    Empty,
}

/// Writes the request line and fields: `host` first, then `headers` (which hold no hop-by-hop
/// field), less any `Host`, framing field or `Expect` among them, then this hop's framing.
pub fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    host: &[u8],
    headers: &HeaderMap,
    framing: RequestFraming,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // `Host` first (RFC 9110 7.2): the upstream's, whatever the caller's said. Then the rest in
    // the caller's order, less what this hop decides: the framing is cliqgate's to choose, and
    // `Expect` was answered on the caller's hop (100 Continue when the body is first read).
    // Left out here rather than removed from the map: no lookups, one pass.
    encode_field(out, b"host", host);
    for (name, value) in headers {
        if name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
        {
            continue;
        }
        encode_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        RequestFraming::Length(n) => encode_content_length(out, n),
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::Empty => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one chunk of a chunked request body (never an empty one: that would end the body).
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    encode_chunk_size(out, data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The size line of a chunk (RFC 9112 7.1): hexadecimal, then CRLF.
pub fn encode_chunk_size(out: &mut Vec<u8>, len: usize) {
    let mut size = [0u8; 16];
    let mut at = size.len();
    let mut n = len;
    loop {
        at -= 1;
        size[at] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&size[at..]);
    out.extend_from_slice(b"\r\n");
}

/// One field line: `name: value` and CRLF.
pub fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The `Content-Length` field line.
pub fn encode_content_length(out: &mut Vec<u8>, n: u64) {
    encode_field(
        out,
        b"content-length",
        itoa::Buffer::new().format(n).as_bytes(),
    );
}

/// Ends a chunked request body (without trailers: see `conn::send_body`).
pub fn encode_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

/// How the response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body: a HEAD request, a 204 or a 304.
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    pub framing: BodyFraming,
    /// Whether the connection may carry another call once this body has been read.
    pub reusable: bool,
}

/// What the start of an answer that arrived while the request was still being sent holds.
#[derive(Debug, PartialEq, Eq)]
pub enum EarlyAnswer {
    /// Only interim answers (`100 Continue`, `103 Early Hints`), now dropped from `buf`, and
    /// perhaps the start of another head: the upstream still expects the rest of the request.
    Interim,
    /// A final answer (or something that is not an answer): sending stops and it is read.
    Final,
}

/// Drops the complete interim answers at the start of `buf` ([`EarlyAnswer`]). A server may send
/// them at any time (RFC 9110 section 15.2), not only after `Expect: 100-continue`.
pub fn drop_interim_answers(buf: &mut BytesMut) -> EarlyAnswer {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut parsed = httparse::Response::new(&mut fields);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => match parsed.code {
                Some(code) if (100..200).contains(&code) && code != 101 => buf.advance(len),
                _ => return EarlyAnswer::Final,
            },
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return EarlyAnswer::Interim,
            _ => return EarlyAnswer::Final,
        }
    }
}

/// Parses a response head from the front of `buf`, consuming it (and any interim 1xx answers
/// before it). `Ok(None)`: more bytes are needed.
pub fn parse_response_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, WireError> {
    loop {
        // Left uninitialised: the parser writes what it finds (a full array costs more to set up
        // than a small answer costs to parse).
        let mut fields = [std::mem::MaybeUninit::<httparse::Header>::uninit(); MAX_FIELDS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(WireError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(WireError::Head("too many fields")),
            Err(_) => return Err(WireError::Head("not an HTTP/1.1 response")),
        };
        if len > MAX_HEAD {
            return Err(WireError::HeadTooLarge);
        }
        let code = parsed.code.unwrap_or_default();
        let status =
            StatusCode::from_u16(code).map_err(|_| WireError::Head("invalid status code"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(WireError::Upgrade);
        }
        if status.is_informational() {
            // 100 Continue, 103 Early Hints: interim answers; the final one follows.
            buf.advance(len);
            continue;
        }
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        // Field positions in `buf`, so the values can share the head's bytes instead of copies.
        let base = buf.as_ptr() as usize;
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_FIELDS];
        let count = parsed.headers.len();
        for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
            let name = field.name.as_ptr() as usize - base;
            // An empty value need not point into `buf`.
            let value = if field.value.is_empty() {
                0
            } else {
                field.value.as_ptr() as usize - base
            };
            *span = (
                name as u32,
                (name + field.name.len()) as u32,
                value as u32,
                (value + field.value.len()) as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for &(name_start, name_end, value_start, value_end) in &spans[..count] {
            let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
                .map_err(|_| WireError::Head("invalid field name"))?;
            let value = HeaderValue::from_maybe_shared(
                head.slice(value_start as usize..value_end as usize),
            )
            .map_err(|_| WireError::Head("invalid field value"))?;
            headers.append(name, value);
        }
        let (framing, delimited) = framing(method, status, &headers)?;
        if framing == BodyFraming::Chunked {
            // Both fields: the length is wrong by definition and must not reach the caller
            // (RFC 9112 6.3, item 3).
            headers.remove(header::CONTENT_LENGTH);
        }
        let reusable = delimited && keeps_alive(version, &headers);
        let mut response = Response::new(());
        *response.status_mut() = status;
        // The caller's hop is HTTP/1.1 or HTTP/2 whatever the upstream spoke.
        *response.version_mut() = Version::HTTP_11;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            framing,
            reusable,
        }));
    }
}

/// The body's framing, and whether its end can be told without the connection closing.
fn framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<(BodyFraming, bool), WireError> {
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((BodyFraming::None, true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Only `chunked`, once: a body under another coding (gzip as a transfer coding) would
        // reach the caller undecoded with nothing saying so (the field is hop-by-hop).
        let mut codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty());
        let chunked = codings
            .next()
            .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        if !chunked || codings.next().is_some() {
            return Err(WireError::Head("a transfer coding other than chunked"));
        }
        // Both fields at once is how request smuggling starts: the body is read as chunked (RFC
        // 9112 6.3) and the connection is not used again.
        let both = headers.contains_key(header::CONTENT_LENGTH);
        return Ok((BodyFraming::Chunked, !both));
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(WireError::Head("invalid content-length"));
            }
            let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err(WireError::Head("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (BodyFraming::None, true),
        Some(n) => (BodyFraming::Length(n), true),
        None => (BodyFraming::UntilClose, false),
    })
}

fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &[u8]| {
        headers.get_all(header::CONNECTION).iter().any(|value| {
            value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    if version == Version::HTTP_10 {
        has(b"keep-alive")
    } else {
        !has(b"close")
    }
}

/// What one step of reading a chunked body gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    Data(Bytes),
    /// The buffer ends inside a size line, a chunk's end or the trailers.
    NeedMore,
    /// The last chunk and the trailers (which are dropped) have been read.
    End,
}

/// Reads a chunked body (RFC 9112 section 7.1) from a buffer that fills as bytes arrive.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl ChunkedDecoder {
    #[cfg(test)]
    fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Chunk, WireError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Chunk::NeedMore);
                    };
                    let end = line
                        .iter()
                        .position(|&b| b == b';' || b == b' ' || b == b'\t')
                        .unwrap_or(line.len());
                    let (digits, rest) = line.split_at(end);
                    // After the size: only whitespace, then extensions (ignored).
                    let rest = rest.trim_ascii_start();
                    if !rest.is_empty() && rest[0] != b';' {
                        return Err(WireError::Chunked("invalid chunk size"));
                    }
                    let significant = {
                        let zeros = digits.iter().take_while(|&&d| d == b'0').count();
                        &digits[zeros..]
                    };
                    if digits.is_empty() || significant.len() > 15 {
                        return Err(WireError::Chunked("invalid chunk size"));
                    }
                    let mut size = 0u64;
                    for &d in significant {
                        let v = (d as char)
                            .to_digit(16)
                            .ok_or(WireError::Chunked("invalid chunk size"))?;
                        size = size * 16 + u64::from(v);
                    }
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Chunk::NeedMore);
                    }
                    let take = left.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    self.state = if take == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - take)
                    };
                    return Ok(Chunk::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Chunk::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::Chunked("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Chunk::NeedMore);
                    };
                    self.trailer_bytes += line.len() + 2;
                    if self.trailer_bytes > MAX_HEAD {
                        return Err(WireError::Chunked("trailers too large"));
                    }
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(Chunk::End),
            }
        }
    }
}

/// Takes one CRLF-terminated line (without the CRLF) off the front of `buf`. A bare LF is an
/// error: lenient line endings are where request smuggling lives.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
    match buf.iter().take(MAX_LINE + 2).position(|&b| b == b'\n') {
        Some(0) => Err(WireError::Chunked("bare LF")),
        Some(end) if buf[end - 1] != b'\r' => Err(WireError::Chunked("bare LF")),
        Some(end) => {
            let line = buf.split_to(end + 1).freeze();
            Ok(Some(line.slice(..end - 1)))
        }
        None if buf.len() > MAX_LINE => Err(WireError::Chunked("line too long")),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn interim_answers_before_the_request_is_sent_are_dropped() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 10"[..]);
        assert_eq!(drop_interim_answers(&mut buf), EarlyAnswer::Interim);
        assert_eq!(
            &buf[..],
            b"HTTP/1.1 10",
            "the start of the next head is kept"
        );
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Too Large\r\n\r\n"[..]);
        assert_eq!(drop_interim_answers(&mut buf), EarlyAnswer::Final);
        assert!(
            buf.starts_with(b"HTTP/1.1 413"),
            "the final answer stays to be read"
        );
        for early in [
            &b"HTTP/1.1 101 Switching\r\n\r\n"[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(early);
            assert_eq!(
                drop_interim_answers(&mut buf),
                EarlyAnswer::Final,
                "{early:?}"
            );
            assert_eq!(&buf[..], early, "left to be read as the answer");
        }
    }

    use super::*;

    fn parse(bytes: &[u8]) -> Result<Option<Head>, WireError> {
        parse_response_head(&mut BytesMut::from(bytes), &Method::POST)
    }

    #[test]
    fn request_head_carries_the_fields_and_the_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Zoho-oauthtoken t"),
        );
        // What the caller said of the host, the framing and Expect is left out.
        headers.insert(header::HOST, HeaderValue::from_static("caller.example"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let mut out = Vec::new();
        let target = "/api/v3/chats/C1/message?x=1";
        encode_request_head(
            &mut out,
            &Method::POST,
            target,
            b"cliq.zoho.com",
            &headers,
            RequestFraming::Length(20),
        );
        assert_eq!(
            out,
            b"POST /api/v3/chats/C1/message?x=1 HTTP/1.1\r\nhost: cliq.zoho.com\r\n\
              authorization: Zoho-oauthtoken t\r\naccept: */*\r\ncontent-length: 20\r\n\r\n"
        );
        out.clear();
        encode_request_head(
            &mut out,
            &Method::GET,
            "/",
            b"h",
            &HeaderMap::new(),
            RequestFraming::Empty,
        );
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n");
        out.clear();
        encode_request_head(
            &mut out,
            &Method::PUT,
            "/",
            b"h",
            &HeaderMap::new(),
            RequestFraming::Chunked,
        );
        assert_eq!(
            out,
            b"PUT / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn chunks_are_encoded_in_hex_and_read_back() {
        let mut out = Vec::new();
        encode_chunk(&mut out, &[b'a'; 26]);
        encode_chunk(&mut out, b"");
        encode_last_chunk(&mut out);
        let mut expected = b"1a\r\n".to_vec();
        expected.extend_from_slice(&[b'a'; 26]);
        expected.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(out, expected);
        // What cliqgate writes, it reads back.
        let mut buf = BytesMut::from(&out[..]);
        let mut decoder = ChunkedDecoder::default();
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Chunk::Data(Bytes::from(vec![b'a'; 26])))
        );
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::End));
        assert!(buf.is_empty());
    }

    #[test]
    fn response_head_is_parsed_with_its_framing() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"[..],
        );
        let head = parse_response_head(&mut buf, &Method::POST)
            .unwrap()
            .unwrap();
        assert_eq!(head.response.status(), StatusCode::OK);
        assert_eq!(head.framing, BodyFraming::Length(11));
        assert!(head.reusable);
        assert_eq!(head.response.headers()["content-type"], "application/json");
        assert_eq!(&buf[..], b"{\"ok\":true}");
    }

    #[test]
    fn a_partial_head_asks_for_more_and_an_endless_one_is_refused() {
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        // A complete head over the limit (a few long fields), and one with too many fields.
        let mut long = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..5 {
            long.extend_from_slice(b"x-filler: ");
            long.extend_from_slice(&[b'a'; MAX_HEAD / 4]);
            long.extend_from_slice(b"\r\n");
        }
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long).unwrap_err(), WireError::HeadTooLarge);
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_FIELDS {
            many.extend_from_slice(format!("x-f{i}: a\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse(&many).unwrap_err(),
            WireError::Head("too many fields")
        );
        let mut huge = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse(&huge).unwrap_err(), WireError::HeadTooLarge);
    }

    #[test]
    fn interim_answers_are_skipped_and_upgrades_refused() {
        let head = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.response.status(), StatusCode::CREATED);
        assert!(!head.response.headers().contains_key("link"));
        assert_eq!(head.framing, BodyFraming::None);
        assert_eq!(
            parse(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n").unwrap_err(),
            WireError::Upgrade
        );
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let framing_of = |raw: &[u8], method: Method| {
            let head = parse_response_head(&mut BytesMut::from(raw), &method)
                .unwrap()
                .unwrap();
            (head.framing, head.reusable)
        };
        let cl = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(framing_of(cl, Method::HEAD), (BodyFraming::None, true));
        assert_eq!(framing_of(cl, Method::GET), (BodyFraming::Length(5), true));
        assert_eq!(
            framing_of(
                b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                Method::GET
            ),
            (BodyFraming::None, true)
        );
        assert_eq!(
            framing_of(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n",
                Method::GET
            ),
            (BodyFraming::Chunked, true)
        );
        assert_eq!(
            framing_of(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                Method::GET
            ),
            (BodyFraming::Chunked, false)
        );
        assert_eq!(
            framing_of(b"HTTP/1.1 200 OK\r\n\r\n", Method::GET),
            (BodyFraming::UntilClose, false)
        );
        assert_eq!(
            framing_of(
                b"HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n",
                Method::GET
            ),
            (BodyFraming::Length(7), true)
        );
        assert_eq!(
            framing_of(
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                Method::GET
            ),
            (BodyFraming::Length(1), false)
        );
        assert_eq!(
            framing_of(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", Method::GET),
            (BodyFraming::Length(1), false)
        );
        assert_eq!(
            framing_of(
                b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n",
                Method::GET
            ),
            (BodyFraming::Length(1), true)
        );
        for bad in [
            // Transfer codings other than chunked once: the body could not be passed on.
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_body_is_read_byte_by_byte_as_it_arrives() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for &byte in wire {
            buf.extend_from_slice(&[byte]);
            loop {
                match decoder.decode(&mut buf).unwrap() {
                    Chunk::Data(data) => body.extend_from_slice(&data),
                    Chunk::NeedMore => break,
                    Chunk::End => break,
                }
            }
        }
        assert!(decoder.is_done());
        assert_eq!(body, b"hello world");
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_chunks_are_errors_not_guesses() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"1000000000000000\r\n",
            b"5 junk\r\nhello\r\n",
            b"5\nhello\r\n",
            b"0\r\nx-trailer: t\n\r\n",
        ] {
            let mut decoder = ChunkedDecoder::default();
            let mut buf = BytesMut::from(bad);
            let result = loop {
                match decoder.decode(&mut buf) {
                    Ok(Chunk::Data(_)) => continue,
                    other => break other,
                }
            };
            assert!(result.is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut decoder = ChunkedDecoder::default();
        let mut endless = BytesMut::from(&[b'1'; MAX_LINE + 10][..]);
        assert!(decoder.decode(&mut endless).is_err());
        // Leading zeros are not digits that count; whitespace before an extension is allowed.
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"00000000000000000003 ;x=y\r\nabc\r\n0\r\n\r\n"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Chunk::Data(Bytes::from("abc")))
        );
        assert_eq!(decoder.decode(&mut buf), Ok(Chunk::End));
    }

    #[test]
    fn a_length_next_to_chunked_does_not_reach_the_caller() {
        let head =
            parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(head.framing, BodyFraming::Chunked);
        assert!(!head.reusable);
        assert!(!head.response.headers().contains_key("content-length"));
    }
}
