//! Every failure cliqgate answers itself, as one Zoho-style JSON response, in one exhaustive match.
//!
//! Zoho's envelope is `{"code": "...", "message": "..."}`; refusals add `retry_after` (seconds).
//! Some Zoho endpoints nest it under `error` instead ([`Envelope::Nested`]); a call refused by an
//! endpoint's own rules is answered in that endpoint's shape.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{full, ProxyBody};

/// The two shapes of Zoho's error bodies (../shared/cliq-api.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// `{"code": "...", "message": "..."}`: the v3 Messages API, and cliqgate's own answers.
    Flat,
    /// `{"error": {"code": "...", "message": "..."}}`: e.g. Search messages' bad input.
    Nested,
}

/// Who is at fault decides the status class (pingora's `ErrorSource`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    // --- the caller ---
    #[error("no OAuth token or zapikey on a rate-limited route")]
    MissingCredential { detail: &'static str },
    #[error("rate limit: retry after {retry_after:?}")]
    RateLimited {
        retry_after: Duration,
        why: &'static str,
    },
    #[error("no route matches and unmatched calls are refused")]
    Unmatched,
    #[error("invalid request: {0}")]
    BadRequest(&'static str),
    #[error("identity header from an untrusted network")]
    UntrustedSource,
    #[error("the identity endpoint refused the token ({status})")]
    IdentityRefused {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    #[error("request body over {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request header fields over {limit} bytes")]
    HeadersTooLarge { limit: usize },
    /// The caller paused its request body for longer than `timeouts.client_body`.
    #[error("request body paused for over {after:?}")]
    BodyTimeout { after: Duration },
    /// The call breaks a documented limit of its endpoint (src/validate.rs): Zoho would refuse it.
    #[error("invalid call: {0}")]
    Invalid(crate::validate::Invalid),
    // --- the upstream ---
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    // --- cliqgate itself ---
    #[error("limiter store unavailable")]
    StoreUnavailable,
    #[error("identity endpoint unavailable")]
    IdentityUnavailable,
    #[error("shutting down")]
    ShuttingDown,
}

impl ProxyError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            ProxyError::MissingCredential { detail } => (
                StatusCode::UNAUTHORIZED,
                "oauthtoken_missing",
                format!("No credential: {detail}."),
            ),
            ProxyError::RateLimited { why, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                (*why).to_string(),
            ),
            ProxyError::Unmatched => (
                StatusCode::FORBIDDEN,
                "route_not_allowed",
                "This proxy forwards only the configured Cliq endpoints.".into(),
            ),
            ProxyError::UntrustedSource => (
                StatusCode::FORBIDDEN,
                "untrusted_source",
                "The user header is accepted only from the configured trusted networks.".into(),
            ),
            // Passed on as Zoho sent it (see `to_response`); this is what logs and status see.
            ProxyError::IdentityRefused { status, .. } => (
                *status,
                "identity_refused",
                "The identity endpoint refused the token.".into(),
            ),
            ProxyError::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "This proxy is shutting down before the call's turn; send it again.".into(),
            ),
            ProxyError::IdentityUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "identity_unavailable",
                "The identity endpoint could not be reached; the call was not sent.".into(),
            ),
            ProxyError::BadRequest(why) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                (*why).to_string(),
            ),
            ProxyError::BodyTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("The request body is larger than {limit} bytes."),
            ),
            ProxyError::HeadersTooLarge { limit } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("The request header fields are larger than {limit} bytes."),
            ),
            // RFC 9110 15.5.9: the caller did not finish its request in time; the call was not
            // completed upstream, and the connection closes (the body's framing is lost).
            ProxyError::BodyTimeout { after } => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "The request body paused for longer than {} ms.",
                    after.as_millis()
                ),
            ),
            // Zoho's own code for the broken rule, as Zoho would answer the call.
            ProxyError::Invalid(invalid) => (
                StatusCode::BAD_REQUEST,
                invalid.code,
                invalid.message.clone(),
            ),
            ProxyError::UpstreamUnavailable => (
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "Zoho Cliq could not be reached.".into(),
            ),
            ProxyError::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "The rate limiter's shared store is unavailable; the call was not sent.".into(),
            ),
            ProxyError::UpstreamTimeout(after) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!("Zoho Cliq did not answer within {} ms.", after.as_millis()),
            ),
        }
    }

    /// Whole seconds for `Retry-After`, at least 1 (SPEC "What callers see").
    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ProxyError::RateLimited { retry_after, .. } => {
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0))
                    .map(|s| s.max(1))
            }
            // Outages of cliqgate's own dependencies are usually short: come back soon.
            ProxyError::StoreUnavailable
            | ProxyError::IdentityUnavailable
            | ProxyError::ShuttingDown => Some(1),
            ProxyError::MissingCredential { .. }
            | ProxyError::Unmatched
            | ProxyError::BadRequest(_)
            | ProxyError::UntrustedSource
            | ProxyError::IdentityRefused { .. }
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::HeadersTooLarge { .. }
            | ProxyError::BodyTimeout { .. }
            | ProxyError::Invalid(_)
            | ProxyError::UpstreamUnavailable
            | ProxyError::UpstreamTimeout(_) => None,
        }
    }

    /// The `cliqgate_caller_errors_total` reason of a refusal for what the caller sent, or did
    /// not send in time, on a call that reached the proxy (the server counts those it refuses
    /// before).
    pub fn caller_error(&self) -> Option<crate::metrics::CallerError> {
        use crate::metrics::CallerError;
        match self {
            ProxyError::HeadersTooLarge { .. } => Some(CallerError::HeadersTooLarge),
            ProxyError::BodyTimeout { .. } => Some(CallerError::BodyTimeout),
            _ => None,
        }
    }

    /// The body's shape: Zoho's for the endpoint when the answer stands in for Zoho's own.
    fn envelope(&self) -> Envelope {
        match self {
            ProxyError::Invalid(invalid) => invalid.envelope,
            ProxyError::MissingCredential { .. }
            | ProxyError::RateLimited { .. }
            | ProxyError::Unmatched
            | ProxyError::BadRequest(_)
            | ProxyError::UntrustedSource
            | ProxyError::IdentityRefused { .. }
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::HeadersTooLarge { .. }
            | ProxyError::BodyTimeout { .. }
            | ProxyError::UpstreamUnavailable
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::StoreUnavailable
            | ProxyError::IdentityUnavailable
            | ProxyError::ShuttingDown => Envelope::Flat,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub fn to_response(&self) -> Response<ProxyBody> {
        if let ProxyError::IdentityRefused {
            status,
            content_type,
            body,
        } = self
        {
            // Zoho's own answer about the token, already in Zoho's envelope.
            let mut response = Response::new(full(body.clone()));
            *response.status_mut() = *status;
            if let Some(content_type) = content_type {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, content_type.clone());
            }
            return response;
        }
        let (status, code, message) = self.parts();
        let retry_after = self.retry_after_secs();
        let mut body = serde_json::json!({ "code": code, "message": message });
        if let Some(secs) = retry_after {
            body["retry_after"] = secs.into();
        }
        if self.envelope() == Envelope::Nested {
            body = serde_json::json!({ "error": body });
        }
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        let e = |ms| ProxyError::RateLimited {
            retry_after: Duration::from_millis(ms),
            why: "x",
        };
        assert_eq!(e(0).retry_after_secs(), Some(1));
        assert_eq!(e(1).retry_after_secs(), Some(1));
        assert_eq!(e(1000).retry_after_secs(), Some(1));
        assert_eq!(e(1001).retry_after_secs(), Some(2));
        assert_eq!(ProxyError::UpstreamUnavailable.retry_after_secs(), None);
    }

    #[test]
    fn invalid_calls_are_400_in_their_endpoints_envelope() {
        let body = |e: ProxyError| {
            let r = e.to_response();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            assert!(r.headers().get(header::RETRY_AFTER).is_none());
            let bytes = body_bytes(r);
            serde_json::from_slice::<serde_json::Value>(&bytes).expect("JSON")
        };
        let invalid = |envelope| {
            ProxyError::Invalid(crate::validate::Invalid {
                code: "invalid.inputs.submitted",
                message: "m".into(),
                envelope,
            })
        };
        assert_eq!(
            body(invalid(Envelope::Nested)),
            serde_json::json!({"error": {"code": "invalid.inputs.submitted", "message": "m"}})
        );
        assert_eq!(
            body(invalid(Envelope::Flat)),
            serde_json::json!({"code": "invalid.inputs.submitted", "message": "m"})
        );
    }

    /// The bytes of a response built here (a `Full` body: ready at once).
    fn body_bytes(r: Response<ProxyBody>) -> Bytes {
        use http_body_util::BodyExt;
        let collected = r.into_body().collect();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(collected)
            .expect("a full body cannot fail")
            .to_bytes()
    }

    #[test]
    fn stalled_body_is_408_request_timeout_in_the_flat_envelope() {
        let r = ProxyError::BodyTimeout {
            after: Duration::from_secs(60),
        }
        .to_response();
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
        let body: serde_json::Value = serde_json::from_slice(&body_bytes(r)).expect("JSON");
        assert_eq!(body["code"], "request_timeout");
        assert_eq!(
            body["message"],
            "The request body paused for longer than 60000 ms."
        );
    }

    #[test]
    fn refusal_is_zoho_envelope_with_retry_after() {
        let r = ProxyError::RateLimited {
            retry_after: Duration::from_millis(2500),
            why: "full",
        }
        .to_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|v| v.starts_with("application/json")));
    }
}
