//! Header hygiene between a caller and Zoho: hop-by-hop fields stay on their own hop.

use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop fields (RFC 9110 section 7.6.1, plus the legacy ones proxies still meet). A
/// `static`, not a `const`: a `const` array is built and dropped again at every use, twice a
/// call.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop fields, including every field named in `Connection` (RFC 9110 7.6.1),
/// and `Upgrade`: cliqgate forwards plain request/response calls only.
///
/// Runs twice on every call, so it first looks (one pass over the names, no hashing) and removes
/// only what is there: most requests carry none of these, most answers only `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let _ = strip_hop_by_hop(headers);
}

/// [`remove_hop_by_hop`] for a request on its way to Zoho; on a limited call, `Accept-Encoding`
/// also keeps only codings whose error answers can be read (looked for in the same pass).
pub fn prepare_upstream_request(headers: &mut HeaderMap, limited: bool) {
    let accept_encoding = strip_hop_by_hop(headers);
    if limited && accept_encoding {
        keep_readable_encodings(headers);
    }
}

/// [`remove_hop_by_hop`]; tells whether the fields include `Accept-Encoding`.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    let mut present = [false; 8];
    let mut upgrade = false;
    let mut accept_encoding = false;
    for name in headers.keys() {
        match hop_by_hop(name) {
            Some(Hop::Listed(index)) => present[index] = true,
            Some(Hop::Upgrade) => upgrade = true,
            Some(Hop::AcceptEncoding) => accept_encoding = true,
            None => {}
        }
    }
    // Fields that `Connection` names are hop-by-hop too (its index is 0). Only a `Connection`
    // that names more than `keep-alive` or `close` (which name nothing else) costs a copy of
    // its values; the answers of most servers say just `keep-alive`.
    if present[0] && connection_names_fields(headers) {
        if let header::Entry::Occupied(connection) = headers.entry(header::CONNECTION) {
            let (_, values) = connection.remove_entry_mult();
            let values: Vec<_> = values.collect();
            for token in values.iter().flat_map(connection_tokens) {
                if let Ok(name) = HeaderName::from_bytes(token) {
                    headers.remove(name);
                }
            }
        }
        present[0] = false;
    }
    for (hop, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, there)| *there) {
        headers.remove(hop);
    }
    if upgrade {
        headers.remove(header::UPGRADE);
    }
    accept_encoding
}

#[derive(Debug, PartialEq)]
enum Hop {
    /// Its index in [`HOP_BY_HOP`].
    Listed(usize),
    Upgrade,
    /// Not hop-by-hop: `Accept-Encoding`, noted in the same pass ([`prepare_upstream_request`]).
    AcceptEncoding,
}

/// Whether a field is hop-by-hop. Names are lowercase; a match on the text is a length check and
/// at most one compare, where comparing with each [`HOP_BY_HOP`] name costs eight.
fn hop_by_hop(name: &HeaderName) -> Option<Hop> {
    let index = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => return Some(Hop::Upgrade),
        "accept-encoding" => return Some(Hop::AcceptEncoding),
        _ => return None,
    };
    Some(Hop::Listed(index))
}

/// The tokens of one `Connection` value that name a field: all but `keep-alive` and `close`.
fn connection_tokens(value: &http::HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close"))
}

fn connection_names_fields(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|value| connection_tokens(value).next().is_some())
}

/// Bytes a request head's fields take, as the size limit counts them.
pub fn fields_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

/// Content codings whose start cliqgate can decode to find a throttle code in an error answer
/// ([`crate::throttle::encoded_body_signals_throttle`]).
const READABLE_CODINGS: [&str; 4] = ["gzip", "x-gzip", "deflate", "identity"];

/// Narrows a limited call's `Accept-Encoding` to codings cliqgate can read, so that Zoho's answer
/// to it is never in one (`br`, `zstd`, or whatever `*` would let Zoho pick) that would hide a
/// throttle code. Costs a caller that asked for brotli a gzip answer instead. Untouched when it
/// names nothing else (most calls).
fn keep_readable_encodings(headers: &mut HeaderMap) {
    let readable = |item: &str| {
        let coding = item.split(';').next().unwrap_or_default().trim();
        READABLE_CODINGS
            .iter()
            .any(|known| known.eq_ignore_ascii_case(coding))
    };
    let mut kept = Vec::new();
    let mut narrowed = false;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(list) = value.to_str() else {
            narrowed = true;
            continue;
        };
        for item in list
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            if readable(item) {
                kept.push(item.to_owned());
            } else {
                narrowed = true;
            }
        }
    }
    if !narrowed {
        return;
    }
    headers.remove(header::ACCEPT_ENCODING);
    if kept.is_empty() {
        return;
    }
    if let Ok(value) = header::HeaderValue::from_str(&kept.join(", ")) {
        headers.insert(header::ACCEPT_ENCODING, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_limited_call_asks_only_for_codings_that_can_be_read() {
        let narrowed = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(
                    header::ACCEPT_ENCODING,
                    header::HeaderValue::from_str(value).unwrap(),
                );
            }
            keep_readable_encodings(&mut headers);
            let left: Vec<_> = headers
                .get_all(header::ACCEPT_ENCODING)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            left
        };
        assert_eq!(narrowed(&["gzip, deflate"]), ["gzip, deflate"], "untouched");
        assert_eq!(
            narrowed(&["GZip;q=1.0, identity"]),
            ["GZip;q=1.0, identity"]
        );
        assert_eq!(narrowed(&["gzip, deflate, br, zstd"]), ["gzip, deflate"]);
        assert_eq!(
            narrowed(&["br;q=1.0, gzip;q=0.8", "*;q=0.1"]),
            ["gzip;q=0.8"]
        );
        assert_eq!(
            narrowed(&["br"]),
            Vec::<String>::new(),
            "nothing readable: no field"
        );
        assert_eq!(narrowed(&["*"]), Vec::<String>::new());
        assert_eq!(narrowed(&[]), Vec::<String>::new());

        // Only limited calls are narrowed; hop-by-hop fields go from both.
        for limited in [true, false] {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::ACCEPT_ENCODING,
                header::HeaderValue::from_static("br, gzip"),
            );
            headers.insert(header::TE, header::HeaderValue::from_static("trailers"));
            prepare_upstream_request(&mut headers, limited);
            let want = if limited { "gzip" } else { "br, gzip" };
            assert_eq!(headers[header::ACCEPT_ENCODING], want, "limited: {limited}");
            assert!(!headers.contains_key(header::TE));
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Zoho-oauthtoken t"),
        );
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["authorization", "x-end-to-end"]);
    }

    #[test]
    fn the_hop_by_hop_match_agrees_with_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name), Some(Hop::Listed(i)), "{name}");
        }
        assert_eq!(hop_by_hop(&header::UPGRADE), Some(Hop::Upgrade));
        assert_eq!(hop_by_hop(&header::AUTHORIZATION), None);
    }

    #[test]
    fn each_hop_by_hop_field_is_removed_on_its_own() {
        let hop = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ];
        for name in hop {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("x-end-to-end", HeaderValue::from_static("kept"));
            remove_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} left behind");
            assert!(h.contains_key("x-end-to-end"));
        }
        // Nothing hop-by-hop: nothing changes.
        let mut h = HeaderMap::new();
        h.append("accept", HeaderValue::from_static("a"));
        h.append("accept", HeaderValue::from_static("b"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.get_all("accept").iter().count(), 2);
    }
}
