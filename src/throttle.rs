//! Recognising Zoho's throttle signals (SPEC "Throttle signals from Zoho"; cliq-api.md "Facts").
//!
//! Zoho documents no rate-limit headers; it answers 429, or a 4xx whose JSON `code` (top level or
//! under `error`) says the user went over. Only a bounded prefix of an error body is ever read.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode};

/// How much of a 4xx body is read to find its code. Zoho's error bodies are a few hundred bytes.
pub const MAX_ERROR_PREFIX: usize = 8 * 1024;

const CODES: [&str; 2] = ["rate_limit_exceeded", "request_limit_exceeded"];

/// What the status alone says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusSignal {
    Throttled,
    /// A 4xx other than 429: the body decides.
    Inspect,
    NotThrottled,
}

pub fn classify_status(status: StatusCode) -> StatusSignal {
    if status == StatusCode::TOO_MANY_REQUESTS {
        StatusSignal::Throttled
    } else if status.is_client_error() {
        StatusSignal::Inspect
    } else {
        StatusSignal::NotThrottled
    }
}

fn is_throttle_code(code: &str) -> bool {
    CODES.contains(&code)
        || (code.starts_with("URL_") && code.ends_with("THROTTLES_LIMIT_EXCEEDED"))
}

/// Does this (prefix of a) 4xx body carry a throttle code? `complete` says whether the prefix is
/// the whole body; a truncated body is searched for a quoted code instead of parsed.
pub fn body_signals_throttle(prefix: &[u8], complete: bool) -> bool {
    if complete {
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(prefix) {
            let code = |v: &serde_json::Value| {
                v.get("code").and_then(|c| c.as_str()).map(is_throttle_code)
            };
            return code(&json)
                .or_else(|| json.get("error").and_then(code))
                .unwrap_or(false);
        }
        return false;
    }
    let text = String::from_utf8_lossy(prefix);
    text.split('"').any(is_throttle_code)
}

/// [`body_signals_throttle`] for a body sent with the answer's `Content-Encoding`: a gzip or
/// deflate body is decoded first (its first [`MAX_ERROR_PREFIX`] bytes at most, so a small
/// compressed answer cannot expand into a large allocation). Callers pass `Accept-Encoding`
/// through, and most HTTP clients ask for gzip. Other codings are searched as they are.
pub fn encoded_body_signals_throttle(
    content_encoding: Option<&HeaderValue>,
    prefix: &[u8],
    complete: bool,
) -> bool {
    let coding = content_encoding
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match coding.as_deref() {
        Some("gzip" | "x-gzip") => {
            let (decoded, whole) = decode(flate2::read::GzDecoder::new(prefix));
            body_signals_throttle(&decoded, complete && whole)
        }
        Some("deflate") => {
            // "deflate" is the zlib format (RFC 9110 8.4.1.2); some servers send raw deflate.
            let (decoded, whole) = decode(flate2::read::ZlibDecoder::new(prefix));
            if !decoded.is_empty() {
                return body_signals_throttle(&decoded, complete && whole);
            }
            let (decoded, whole) = decode(flate2::read::DeflateDecoder::new(prefix));
            body_signals_throttle(&decoded, complete && whole)
        }
        _ => body_signals_throttle(prefix, complete),
    }
}

/// Up to [`MAX_ERROR_PREFIX`] decoded bytes, and whether that is the whole decoded body (a
/// truncated or corrupt stream gives what decoded before the break).
fn decode(decoder: impl std::io::Read) -> (Vec<u8>, bool) {
    use std::io::Read;
    let mut out = Vec::new();
    let mut limited = decoder.take(MAX_ERROR_PREFIX as u64 + 1);
    let whole = limited.read_to_end(&mut out).is_ok() && out.len() <= MAX_ERROR_PREFIX;
    out.truncate(MAX_ERROR_PREFIX);
    (out, whole)
}

/// The upstream's `Retry-After`, in seconds or as an HTTP date (RFC 9110 10.2.3).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn encoded(coding: &str, body: &[u8]) -> (Option<HeaderValue>, Vec<u8>) {
        let mut out = Vec::new();
        match coding {
            "gzip" => {
                let mut e = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
                e.write_all(body).unwrap();
                e.finish().unwrap();
            }
            "deflate" => {
                let mut e = flate2::write::ZlibEncoder::new(&mut out, flate2::Compression::fast());
                e.write_all(body).unwrap();
                e.finish().unwrap();
            }
            "raw-deflate" => {
                let mut e =
                    flate2::write::DeflateEncoder::new(&mut out, flate2::Compression::fast());
                e.write_all(body).unwrap();
                e.finish().unwrap();
            }
            _ => unreachable!(),
        }
        let name = if coding == "raw-deflate" {
            "deflate"
        } else {
            coding
        };
        (Some(HeaderValue::from_str(name).unwrap()), out)
    }

    #[test]
    fn compressed_throttle_answers_are_recognised() {
        let throttle = br#"{"code":"request_limit_exceeded","message":"slow down"}"#;
        let other = br#"{"code":"invalid_oauthtoken"}"#;
        for coding in ["gzip", "deflate", "raw-deflate"] {
            let (headers, body) = encoded(coding, throttle);
            assert!(
                encoded_body_signals_throttle(headers.as_ref(), &body, true),
                "{coding}"
            );
            let (headers, body) = encoded(coding, other);
            assert!(
                !encoded_body_signals_throttle(headers.as_ref(), &body, true),
                "{coding}"
            );
            // Only the start of a longer compressed answer was read: the code is still found.
            let (headers, body) = encoded(coding, throttle);
            let cut = &body[..body.len() - 4];
            assert!(
                encoded_body_signals_throttle(headers.as_ref(), cut, false),
                "{coding} cut"
            );
        }
        assert!(encoded_body_signals_throttle(None, throttle, true));
    }

    #[test]
    fn a_compressed_answer_decodes_to_a_bounded_prefix() {
        // 1 MiB of zeros after the code compresses to about a kilobyte.
        let mut big = br#"{"code":"request_limit_exceeded","pad":""#.to_vec();
        big.extend(std::iter::repeat_n(b'0', 1 << 20));
        big.extend_from_slice(br#""}"#);
        let (headers, body) = encoded("gzip", &big);
        assert!(body.len() < 8 * 1024);
        let (decoded, whole) = decode(flate2::read::GzDecoder::new(&body[..]));
        assert_eq!(decoded.len(), MAX_ERROR_PREFIX);
        assert!(!whole);
        assert!(encoded_body_signals_throttle(headers.as_ref(), &body, true));
        // Garbage under a gzip label is searched as what it decodes to: nothing.
        let gzip = HeaderValue::from_static("gzip");
        assert!(!encoded_body_signals_throttle(
            Some(&gzip),
            b"not gzip at all",
            true
        ));
    }

    #[test]
    fn every_documented_shape_is_a_throttle() {
        assert_eq!(
            classify_status(StatusCode::TOO_MANY_REQUESTS),
            StatusSignal::Throttled
        );
        for body in [
            r#"{"code":"request_limit_exceeded","message":"You have exceeded the URL throttle limits."}"#,
            r#"{"error":{"code":"rate_limit_exceeded","message":"x"}}"#,
            r#"{"code":"URL_ROLLING_THROTTLES_LIMIT_EXCEEDED","message":"x"}"#,
            r#"{"code":"URL_THROTTLES_LIMIT_EXCEEDED"}"#,
        ] {
            assert!(body_signals_throttle(body.as_bytes(), true), "{body}");
        }
    }

    #[test]
    fn other_errors_are_not_throttles() {
        assert_eq!(classify_status(StatusCode::OK), StatusSignal::NotThrottled);
        assert_eq!(
            classify_status(StatusCode::BAD_REQUEST),
            StatusSignal::Inspect
        );
        for body in [
            r#"{"code":"invalid_parameters","message":"rate_limit_exceeded"}"#,
            r#"{"error":{"code":"invalid.inputs.submitted"}}"#,
            "not json",
            r#"{"code":42}"#,
        ] {
            assert!(!body_signals_throttle(body.as_bytes(), true), "{body}");
        }
    }

    #[test]
    fn truncated_body_is_searched() {
        let mut body = br#"{"code":"request_limit_exceeded","pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 100));
        assert!(body_signals_throttle(&body, false));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "120".parse().expect("valid"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(300));
        h.insert(http::header::RETRY_AFTER, later.parse().expect("valid"));
        let d = retry_after(&h).expect("date parses");
        assert!(d > Duration::from_secs(290) && d <= Duration::from_secs(300));
        h.insert(http::header::RETRY_AFTER, "soon".parse().expect("valid"));
        assert_eq!(retry_after(&h), None);
    }
}
