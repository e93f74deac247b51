//! HTTP/1.1 on the wire from the callers (RFC 9112): request heads as cliqgate reads them and
//! response heads as it writes them. Pure: bytes in, bytes out, no sockets, so every edge is a
//! unit test.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Method, StatusCode, Uri, Version};

use crate::upstream::wire::{encode_content_length, encode_field};

/// Fields in one request head (hyper's default limit too); more is a 431.
const MAX_FIELDS: usize = 100;

/// Why a request head cannot be read. Each is answered (400 or 431) and the connection closed:
/// after a framing error nothing later on it can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("more than {MAX_FIELDS} header fields")]
    TooManyFields,
    #[error("{0}")]
    Malformed(&'static str),
}

impl HeadError {
    /// The message of the 400 or 431 answer.
    pub fn message(self) -> &'static str {
        match self {
            HeadError::TooManyFields => "Too many header fields.",
            HeadError::Malformed(why) => why,
        }
    }
}

/// How the body of a request is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body: neither `Content-Length` nor `Transfer-Encoding`, or a length of 0.
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed request head, and its body when the whole of it came with the head.
#[derive(Debug)]
pub struct ParsedRequest {
    pub parts: request::Parts,
    pub framing: RequestFraming,
    /// The body, when its declared length had fully arrived with the head (the common small
    /// call): no streaming is needed for it.
    pub body: Option<Bytes>,
    /// Bytes taken off the front of the buffer: the head, plus the body when `body` is `Some`.
    pub consumed: usize,
    /// Bytes of the head alone (request line, fields, blank line).
    pub head_len: usize,
    /// Whether the caller allows another request on this connection afterwards.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on HTTP/1.1: the caller waits for `100 Continue` before the body.
    pub expect_continue: bool,
}

/// Parses a request head from the front of `buf`. `Ok(None)`: more bytes are needed. The head
/// (and the body, when it is all there) is copied once into its own buffer, which the fields
/// and the target then share: the read buffer stays free for the next bytes.
pub fn parse_request(buf: &[u8]) -> Result<Option<ParsedRequest>, HeadError> {
    // Left uninitialised: the parser writes what it finds.
    let mut fields = [std::mem::MaybeUninit::<httparse::Header>::uninit(); MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyFields),
        Err(_) => return Err(HeadError::Malformed("The request head is malformed.")),
    };
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HeadError::Malformed("The request head is malformed."));
    };
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };

    // Framing and connection handling, from the fields as they are on the wire.
    let mut length: Option<u64> = None;
    let mut chunked = None::<bool>;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    let mut host = None::<&[u8]>;
    for field in parsed.headers.iter() {
        let (name, value) = (field.name, field.value);
        if name.eq_ignore_ascii_case("content-length") {
            for part in value.split(|&b| b == b',') {
                let n = parse_length(part.trim_ascii())
                    .ok_or(HeadError::Malformed("Invalid Content-Length."))?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(HeadError::Malformed("Conflicting Content-Length fields."));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // `chunked` once, and no other coding: cliqgate could neither decode another coding
            // (to check the body) nor tell Zoho about it (the field is hop-by-hop), and a coding
            // applied twice is invalid (RFC 9112 6.1). Fields add up to one list.
            for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if coding.is_empty() {
                    continue;
                }
                if !coding.eq_ignore_ascii_case(b"chunked") || chunked.is_some() {
                    return Err(HeadError::Malformed(
                        "The only transfer coding supported is chunked, once.",
                    ));
                }
                chunked = Some(true);
            }
            chunked.get_or_insert(false);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("host") && host.replace(value).is_some() {
            // RFC 9112 3.2: more than one Host field line is a 400, whatever the version.
            return Err(HeadError::Malformed(
                "The request has more than one Host field.",
            ));
        }
    }
    if host.is_none() && version == Version::HTTP_11 {
        // RFC 9112 3.2: an HTTP/1.1 request without Host is a 400 (HTTP/1.0 had no Host).
        return Err(HeadError::Malformed("The request has no Host field."));
    }
    let mut keep_alive = !close && (version == Version::HTTP_11 || keep_alive_token);
    let framing = match (chunked, length) {
        (Some(_), _) if version == Version::HTTP_10 => {
            // RFC 9112 6.1: faulty framing, whatever else the head says.
            return Err(HeadError::Malformed(
                "Transfer-Encoding is not allowed in an HTTP/1.0 request.",
            ));
        }
        (Some(false), _) => {
            return Err(HeadError::Malformed(
                "A request body's last transfer coding must be chunked.",
            ))
        }
        (Some(true), length) => {
            // Both framings: chunked wins, and the connection closes afterwards (RFC 9112 6.3).
            keep_alive &= length.is_none();
            RequestFraming::Chunked
        }
        (None, Some(0) | None) => RequestFraming::Empty,
        (None, Some(n)) => RequestFraming::Length(n),
    };

    // One copy of the head (and of a body that is all there), shared by the parts built below.
    let body_here = match framing {
        RequestFraming::Length(n) if (buf.len() - len) as u64 >= n => Some(n as usize),
        _ => None,
    };
    let consumed = len + body_here.unwrap_or(0);
    let all = Bytes::copy_from_slice(&buf[..consumed]);
    let slice = |part: &[u8]| {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        all.slice(start..start + part.len())
    };

    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| HeadError::Malformed("Invalid method."))?;
    let uri = Uri::from_maybe_shared(slice(target.as_bytes()))
        .map_err(|_| HeadError::Malformed("Invalid request target."))?;
    if host.is_some_and(|host| !valid_host(host, target)) {
        // RFC 9112 3.2: a Host field with an invalid value is a 400.
        return Err(HeadError::Malformed("Invalid Host field."));
    }
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed("Invalid header field name."))?;
        let value = HeaderValue::from_maybe_shared(slice(field.value))
            .map_err(|_| HeadError::Malformed("Invalid header field value."))?;
        headers.append(name, value);
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(ParsedRequest {
        parts,
        framing,
        body: body_here.map(|n| all.slice(len..len + n)),
        consumed,
        head_len: len,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
    }))
}

/// Whether a `Host` value is `uri-host [ ":" port ]` (RFC 9110 section 7.2, RFC 3986 3.2.2): a
/// host that is not empty, either a reg-name (letters, digits, `-._~`, sub-delims, `%XX`), which
/// takes in IPv4 addresses, or an IP literal in brackets; then a port of digits or nothing. No
/// userinfo, path, query or fragment. Empty is what a client sends for a target without
/// authority (RFC 9110 7.2), so it is valid with an origin-form or asterisk-form target only.
/// One pass over the bytes: this runs on every call.
fn valid_host(value: &[u8], target: &str) -> bool {
    let value = value.trim_ascii();
    if value.is_empty() {
        return target.starts_with('/') || target == "*";
    }
    let rest = if let Some(literal) = value.strip_prefix(b"[") {
        let Some(end) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let address = &literal[..end];
        // IPv6 (hex digits, colons, an IPv4 tail); the rarer IPvFuture is refused.
        if address.is_empty()
            || !address
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        &literal[end + 1..]
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        if end == 0 || !is_reg_name(&value[..end]) {
            return false;
        }
        &value[end..]
    };
    match rest.split_first() {
        None => true,
        Some((b':', port)) => port.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// RFC 3986 `reg-name`: unreserved characters, sub-delims and percent-encoded octets.
fn is_reg_name(host: &[u8]) -> bool {
    let mut i = 0;
    while i < host.len() {
        if host[i] == b'%' {
            let encoded = host.get(i + 1..i + 3);
            if !encoded.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
        } else if REG_NAME[host[i] as usize] {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// The bytes a reg-name may hold as they are: ALPHA, DIGIT, `-._~` and the sub-delims.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// A `Content-Length` value: digits only (no sign, no spaces inside), at most 2^63.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// How a response body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// Nothing follows the head: an answer to HEAD, a 1xx, 204 or 304. Fields are written as
    /// they are (a HEAD answer keeps the length a GET would have had).
    NoBody,
    Length(u64),
    Chunked,
    /// An HTTP/1.0 caller and a body of unknown length: the body ends when the connection does.
    UntilClose,
}

impl ResponseFraming {
    /// The framing for a response, given what the body says of its length.
    pub fn choose(
        method: &Method,
        status: StatusCode,
        version: Version,
        exact: Option<u64>,
    ) -> ResponseFraming {
        if *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return ResponseFraming::NoBody;
        }
        match exact {
            Some(n) => ResponseFraming::Length(n),
            None if version == Version::HTTP_11 => ResponseFraming::Chunked,
            None => ResponseFraming::UntilClose,
        }
    }
}

/// Writes the status line and fields. The framing fields (`Content-Length`,
/// `Transfer-Encoding`) and `Connection` are cliqgate's own and written from `framing` and
/// `keep_alive`; whatever the response carries of them is left out (except `Content-Length` on
/// a response without body, see [`ResponseFraming::NoBody`]). Always HTTP/1.1 (RFC 9110 6.2).
pub fn encode_response_head(
    out: &mut Vec<u8>,
    parts: &response::Parts,
    framing: ResponseFraming,
    request_version: Version,
    keep_alive: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or_default()
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let keep_length = framing == ResponseFraming::NoBody
        && !parts.status.is_informational()
        && parts.status != StatusCode::NO_CONTENT;
    for (name, value) in &parts.headers {
        if *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION
            || (*name == header::CONTENT_LENGTH && !keep_length)
        {
            continue;
        }
        encode_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        ResponseFraming::Length(n) => encode_content_length(out, n),
        ResponseFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ResponseFraming::NoBody | ResponseFraming::UntilClose => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if request_version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The interim answer to `Expect: 100-continue`, sent when the body is first read.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The HTTP/2 connection preface (RFC 9113 3.4): an h2c caller with prior knowledge.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<ParsedRequest>, HeadError> {
        parse_request(raw.as_bytes())
    }

    fn complete(raw: &str) -> ParsedRequest {
        parse(raw).expect("valid").expect("complete")
    }

    #[test]
    fn a_simple_get_has_its_parts_and_no_body() {
        let raw = "GET /api/v2/chats?limit=5 HTTP/1.1\r\nHost: cliq\r\nAuthorization: Zoho-oauthtoken t\r\n\r\n";
        let req = complete(raw);
        assert_eq!(req.parts.method, Method::GET);
        assert_eq!(req.parts.uri.path(), "/api/v2/chats");
        assert_eq!(req.parts.uri.query(), Some("limit=5"));
        assert_eq!(req.parts.version, Version::HTTP_11);
        assert_eq!(req.parts.headers["authorization"], "Zoho-oauthtoken t");
        assert_eq!(req.framing, RequestFraming::Empty);
        assert_eq!(req.consumed, raw.len());
        assert!(req.keep_alive);
        assert!(!req.expect_continue);
        assert!(req.body.is_none());
    }

    #[test]
    fn an_incomplete_head_asks_for_more_bytes() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(parse("").unwrap().is_none());
    }

    #[test]
    fn a_body_that_came_with_its_head_is_taken_whole_and_the_rest_left() {
        let raw = "POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n";
        let req = complete(raw);
        assert_eq!(req.framing, RequestFraming::Length(5));
        assert_eq!(req.body.as_deref(), Some(&b"hello"[..]));
        assert_eq!(&raw[req.consumed..], "GET / HTTP/1.1\r\n");
    }

    #[test]
    fn a_body_still_on_its_way_is_left_to_stream() {
        let raw = "POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello";
        let req = complete(raw);
        assert_eq!(req.framing, RequestFraming::Length(10));
        assert!(req.body.is_none());
        assert_eq!(&raw[req.consumed..], "hello");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |fields: &str| {
            parse(&format!("POST / HTTP/1.1\r\nHost: x\r\n{fields}\r\n")).map(|r| {
                let r = r.expect("complete");
                (r.framing, r.keep_alive)
            })
        };
        let malformed = |why| Err(HeadError::Malformed(why));
        use RequestFraming::*;
        assert_eq!(framing(""), Ok((Empty, true)));
        assert_eq!(framing("Content-Length: 0\r\n"), Ok((Empty, true)));
        assert_eq!(framing("Content-Length: 42\r\n"), Ok((Length(42), true)));
        assert_eq!(
            framing("Content-Length: 42, 42\r\n"),
            Ok((Length(42), true))
        );
        assert_eq!(
            framing("Content-Length: 42\r\nContent-Length: 42\r\n"),
            Ok((Length(42), true))
        );
        let conflicting = malformed("Conflicting Content-Length fields.");
        assert_eq!(framing("Content-Length: 42, 43\r\n"), conflicting);
        assert_eq!(
            framing("Content-Length: 1\r\nContent-Length: 2\r\n"),
            conflicting
        );
        for bad in ["-1", "+1", "1 2", "0x10", "", "99999999999999999999"] {
            assert_eq!(
                framing(&format!("Content-Length: {bad}\r\n")),
                malformed("Invalid Content-Length."),
                "{bad:?}"
            );
        }
        assert_eq!(
            framing("Transfer-Encoding: chunked\r\n"),
            Ok((Chunked, true))
        );
        assert_eq!(
            framing("Transfer-Encoding: Chunked\r\n"),
            Ok((Chunked, true))
        );
        // Both framings: chunked wins and the connection closes afterwards.
        assert_eq!(
            framing("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
            Ok((Chunked, false))
        );
        // Any other coding: its body could not be checked, nor Zoho told of it.
        let unsupported = malformed("The only transfer coding supported is chunked, once.");
        for codings in [
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: identity\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
        ] {
            assert_eq!(framing(codings), unsupported, "{codings:?}");
        }
        assert_eq!(
            framing("Transfer-Encoding: \r\n"),
            malformed("A request body's last transfer coding must be chunked.")
        );
        assert_eq!(
            parse("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").map(|r| r.is_some()),
            Err(HeadError::Malformed(
                "Transfer-Encoding is not allowed in an HTTP/1.0 request."
            ))
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let keep = |raw: &str| complete(raw).keep_alive;
        assert!(keep("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!keep(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ));
        assert!(!keep(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, CLOSE\r\n\r\n"
        ));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert_eq!(
            complete("GET / HTTP/1.0\r\n\r\n").parts.version,
            Version::HTTP_10
        );
    }

    #[test]
    fn expect_continue_only_on_http_1_1() {
        let raw = "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n";
        assert!(complete(raw).expect_continue);
        let raw = "POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert!(!complete(raw).expect_continue);
    }

    #[test]
    fn malformed_heads_are_refused() {
        let head_error = Err(HeadError::Malformed("The request head is malformed."));
        for raw in [
            "GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nName: a\x01b\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse(raw).map(|r| r.is_some()), head_error, "{raw:?}");
        }
        let many: String = (0..=MAX_FIELDS).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse(&raw).map(|r| r.is_some()),
            Err(HeadError::TooManyFields)
        );
    }

    #[test]
    fn host_follows_rfc_9112_section_3_2() {
        let missing = Err(HeadError::Malformed("The request has no Host field."));
        let twice = Err(HeadError::Malformed(
            "The request has more than one Host field.",
        ));
        let invalid = Err(HeadError::Malformed("Invalid Host field."));
        let rows: [(&str, &str, Result<(), HeadError>); 35] = [
            // (request line, fields, outcome)
            ("GET / HTTP/1.1", "", missing),
            ("GET / HTTP/1.1", "X-Host: cliq\r\n", missing),
            // HTTP/1.0 had no Host field: its absence is no fault.
            ("GET / HTTP/1.0", "", Ok(())),
            ("GET / HTTP/1.1", "Host: cliq.zoho.com\r\n", Ok(())),
            ("GET / HTTP/1.1", "host: cliq.zoho.com:443\r\n", Ok(())),
            ("GET / HTTP/1.1", "Host: 127.0.0.1:8080\r\n", Ok(())),
            ("GET / HTTP/1.1", "Host: [::1]:8080\r\n", Ok(())),
            ("GET / HTTP/1.1", "Host: [2001:db8::1]\r\n", Ok(())),
            ("GET / HTTP/1.1", "Host:  cliq \r\n", Ok(())),
            // Empty: what a client sends for a target without authority (RFC 9110 7.2).
            ("GET / HTTP/1.1", "Host:\r\n", Ok(())),
            ("OPTIONS * HTTP/1.1", "Host:\r\n", Ok(())),
            ("GET http://cliq.zoho.com/ HTTP/1.1", "Host:\r\n", invalid),
            ("GET / HTTP/1.1", "Host: cliq\r\nHost: cliq\r\n", twice),
            ("GET / HTTP/1.1", "Host: a\r\nX-A: 1\r\nhOST: b\r\n", twice),
            ("GET / HTTP/1.1", "Host: cliq\r\nHost:\r\n", twice),
            ("GET / HTTP/1.0", "Host: a\r\nHost: b\r\n", twice),
            ("GET / HTTP/1.1", "Host: cliq zoho\r\n", invalid),
            ("GET / HTTP/1.1", "Host: cliq\tzoho\r\n", invalid),
            ("GET / HTTP/1.1", "Host: cliq/api\r\n", invalid),
            ("GET / HTTP/1.1", "Host: cliq?x=1\r\n", invalid),
            ("GET / HTTP/1.1", "Host: cliq#x\r\n", invalid),
            ("GET / HTTP/1.1", "Host: alice@cliq\r\n", invalid),
            ("GET / HTTP/1.1", "Host: cliq:80:81\r\n", invalid),
            ("GET / HTTP/1.1", "Host: [::1\r\n", invalid),
            // Percent-encoded octets are part of a reg-name (RFC 3986 3.2.2); a lone `%` is not.
            ("GET / HTTP/1.1", "Host: cli%41q\r\n", Ok(())),
            ("GET / HTTP/1.1", "Host: cli%4q\r\n", invalid),
            ("GET / HTTP/1.1", "Host: cliq%\r\n", invalid),
            ("GET / HTTP/1.1", "Host: [v1.x]\r\n", invalid),
            ("GET / HTTP/1.1", "Host: [::1]x\r\n", invalid),
            ("GET / HTTP/1.1", "Host: []\r\n", invalid),
            ("GET / HTTP/1.1", "Host: cliq:\r\n", Ok(())),
            ("GET / HTTP/1.1", "Host: cliq:http\r\n", invalid),
            ("GET / HTTP/1.1", "Host: :443\r\n", invalid),
            ("GET / HTTP/1.1", "Host: caf\u{e9}\r\n", invalid),
            ("GET / HTTP/1.0", "Host: cliq zoho\r\n", invalid),
        ];
        for (line, fields, outcome) in rows {
            let raw = format!("{line}\r\n{fields}\r\n");
            let parsed = parse(&raw).map(|r| assert!(r.is_some(), "{raw:?} is incomplete"));
            assert_eq!(parsed, outcome, "{raw:?}");
        }
    }

    #[test]
    fn absolute_form_targets_keep_their_path() {
        let req = complete(
            "GET http://elsewhere.example/api/v2/x?q=1 HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n",
        );
        assert_eq!(req.parts.uri.path(), "/api/v2/x");
        assert_eq!(req.parts.uri.query(), Some("q=1"));
    }

    #[test]
    fn repeated_fields_keep_their_order() {
        let req = complete("GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nX-B: 3\r\n\r\n");
        let values: Vec<_> = req.parts.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
    }

    fn head(status: u16, fields: &[(&str, &str)]) -> response::Parts {
        let mut response = http::Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in fields {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        response.into_parts().0
    }

    fn encode(parts: &response::Parts, framing: ResponseFraming, v: Version, keep: bool) -> String {
        let mut out = Vec::new();
        encode_response_head(&mut out, parts, framing, v, keep);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn response_heads_carry_cliqgates_own_framing() {
        let parts = head(
            200,
            &[
                ("content-type", "application/json"),
                ("content-length", "999"),
                ("transfer-encoding", "chunked"),
                ("connection", "keep-alive"),
            ],
        );
        assert_eq!(
            encode(&parts, ResponseFraming::Length(2), Version::HTTP_11, true),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!(
            encode(&parts, ResponseFraming::Chunked, Version::HTTP_11, false),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            encode(&parts, ResponseFraming::UntilClose, Version::HTTP_10, false),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            encode(
                &head(429, &[]),
                ResponseFraming::Length(0),
                Version::HTTP_10,
                true
            ),
            "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn responses_without_body_keep_a_heads_length_but_not_a_204s() {
        let parts = head(200, &[("content-length", "12")]);
        assert_eq!(
            encode(&parts, ResponseFraming::NoBody, Version::HTTP_11, true),
            "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"
        );
        let parts = head(204, &[("content-length", "0")]);
        assert_eq!(
            encode(&parts, ResponseFraming::NoBody, Version::HTTP_11, true),
            "HTTP/1.1 204 No Content\r\n\r\n"
        );
        assert_eq!(
            encode(
                &head(599, &[]),
                ResponseFraming::Length(0),
                Version::HTTP_11,
                true
            ),
            "HTTP/1.1 599 \r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn framing_is_chosen_from_method_status_version_and_length() {
        use ResponseFraming::*;
        let choose = |m: Method, s: u16, v, n| {
            ResponseFraming::choose(&m, StatusCode::from_u16(s).unwrap(), v, n)
        };
        assert_eq!(choose(Method::HEAD, 200, Version::HTTP_11, Some(5)), NoBody);
        assert_eq!(choose(Method::GET, 204, Version::HTTP_11, None), NoBody);
        assert_eq!(choose(Method::GET, 304, Version::HTTP_11, None), NoBody);
        assert_eq!(
            choose(Method::GET, 200, Version::HTTP_11, Some(5)),
            Length(5)
        );
        assert_eq!(choose(Method::GET, 200, Version::HTTP_11, None), Chunked);
        assert_eq!(choose(Method::GET, 200, Version::HTTP_10, None), UntilClose);
        assert_eq!(
            choose(Method::GET, 200, Version::HTTP_10, Some(0)),
            Length(0)
        );
    }
}
