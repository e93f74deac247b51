//! Who is calling: the per-user half of every limiter key.
//!
//! The raw credential is hashed at once and never stored or logged; only the hash travels on.
//! The hash is deterministic (SHA-256, truncated), so every replica derives the same key.

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::IdentityConfig;
use crate::limit::UserKey;

/// Zoho's credential query parameter for webhook tokens.
const ZAPIKEY: &str = "zapikey";

/// Why a call cannot be attributed to a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    /// No `Authorization` header or `zapikey` (token mode), or no trusted header (header mode).
    MissingCredential,
}

/// Derives the user key of a call from its headers and raw query.
pub fn identify(
    mode: &IdentityConfig,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<UserKey, IdentityError> {
    match mode {
        // Resolve mode starts from the token too: its hash is the cache key of the lookup.
        IdentityConfig::Token | IdentityConfig::Resolve(_) => {
            let token = headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| bearer_token(v.as_bytes()))
                .or_else(|| query.and_then(zapikey));
            token
                .map(|t| hash(b"token", t))
                .ok_or(IdentityError::MissingCredential)
        }
        IdentityConfig::Header { name, .. } => headers
            .get(name)
            .map(|v| v.as_bytes().trim_ascii())
            .filter(|v| !v.is_empty())
            .map(|v| hash(b"header", v))
            .ok_or(IdentityError::MissingCredential),
    }
}

/// The token in `Zoho-oauthtoken X` or `Bearer X` (scheme case-insensitive); another scheme
/// counts as a credential as a whole, so it still gets a quota of its own.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return None;
    }
    for scheme in [&b"zoho-oauthtoken"[..], b"bearer"] {
        if value.eq_ignore_ascii_case(scheme) {
            return None; // a scheme without a token
        }
        if value.len() > scheme.len()
            && value[..scheme.len()].eq_ignore_ascii_case(scheme)
            && value[scheme.len()] == b' '
        {
            let token = value[scheme.len()..].trim_ascii();
            return (!token.is_empty()).then_some(token);
        }
    }
    Some(value)
}

/// The raw `zapikey` value in a query string (compared raw: the same bytes, the same user).
fn zapikey(query: &str) -> Option<&[u8]> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == ZAPIKEY && !value.is_empty()).then_some(value.as_bytes())
    })
}

/// The key of a user id an identity endpoint answered with (resolve mode).
pub fn user_key_for_id(id: &str) -> UserKey {
    hash(b"user", id.as_bytes())
}

/// The one key all identity lookups count under together (resolve mode): a lookup's owner is
/// unknown until it answers, so every lookup in a window could be one user's. Its own domain, so
/// no token or user id hashes to it.
pub fn lookup_pool_key() -> UserKey {
    hash(b"lookups", b"")
}

/// Names how users are keyed (`identity`'s mode and the settings that decide a key): keys made
/// under one scheme mean nothing under another. Kept in the state file, so a restart that
/// changes it can hold every key as a reload does.
pub fn scheme_id(identity: &crate::config::IdentityConfig) -> String {
    use crate::config::IdentityConfig;
    let what = match identity {
        IdentityConfig::Token => "token".to_string(),
        IdentityConfig::Header { name, .. } => format!("header\0{name}"),
        IdentityConfig::Resolve(r) => format!("resolve\0{}\0{}", r.url, r.user_field),
    };
    hash(b"scheme", what.as_bytes()).short()
}

/// Names an identity endpoint and user field among the answers shared in Redis: answers about
/// one cannot stand for the other's.
pub fn answers_scope(url: &http::Uri, user_field: &str) -> String {
    hash(b"answers", format!("{url}\0{user_field}").as_bytes()).short()
}

fn hash(domain: &[u8], credential: &[u8]) -> UserKey {
    let mut h = Sha256::new();
    h.update(b"cliqgate/");
    h.update(domain);
    h.update([0]);
    h.update(credential);
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    UserKey(key)
}

/// Removes the value of `zapikey` from a query string, for logs.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case(ZAPIKEY) => format!("{name}=REDACTED"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("valid"),
        );
        h
    }

    #[test]
    fn both_schemes_of_one_token_are_one_user() {
        let a = identify(
            &IdentityConfig::Token,
            &auth("Zoho-oauthtoken 1000.abc"),
            None,
        );
        let b = identify(&IdentityConfig::Token, &auth("bearer  1000.abc "), None);
        assert_eq!(a, b);
        assert!(a.is_ok());
    }

    #[test]
    fn different_tokens_are_different_users() {
        let a = identify(&IdentityConfig::Token, &auth("Zoho-oauthtoken a"), None);
        let b = identify(&IdentityConfig::Token, &auth("Zoho-oauthtoken b"), None);
        assert_ne!(a, b);
    }

    #[test]
    fn zapikey_query_parameter_is_a_credential() {
        let a = identify(
            &IdentityConfig::Token,
            &HeaderMap::new(),
            Some("x=1&zapikey=abc"),
        );
        let b = identify(&IdentityConfig::Token, &auth("Bearer abc"), None);
        assert_eq!(a, b, "one credential, however it is sent");
    }

    #[test]
    fn no_credential_is_refused() {
        for (headers, query) in [
            (HeaderMap::new(), None),
            (auth("Bearer "), Some("zapikey=")),
            (HeaderMap::new(), Some("a=1")),
        ] {
            assert_eq!(
                identify(&IdentityConfig::Token, &headers, query),
                Err(IdentityError::MissingCredential)
            );
        }
    }

    #[test]
    fn header_mode_keys_by_the_trusted_header() {
        let mode = IdentityConfig::Header {
            name: http::HeaderName::from_static("x-cliq-user"),
            trusted: crate::config::default_trusted_networks(),
        };
        let mut h = HeaderMap::new();
        h.insert("x-cliq-user", HeaderValue::from_static("alice"));
        let alice = identify(&mode, &h, None);
        assert!(alice.is_ok());
        assert_ne!(
            alice,
            identify(&IdentityConfig::Token, &auth("Bearer alice"), None)
        );
        assert_eq!(
            identify(&mode, &auth("Bearer x"), None),
            Err(IdentityError::MissingCredential)
        );
    }

    #[test]
    fn redaction_hides_only_the_key() {
        assert_eq!(
            redact_query("a=1&zapikey=secret&b=2"),
            "a=1&zapikey=REDACTED&b=2"
        );
    }
}
