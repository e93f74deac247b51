//! Path templates -> a compiled route table. Pure: no HTTP types beyond `Method`.

/// Deeper than any Cliq endpoint; bounds the matcher's work per call.
pub const MAX_SEGMENTS: usize = 16;

/// Checks one path template: starts with `/`, has no query or fragment, and every `{name}` is a
/// whole segment with a non-empty name of letters, digits and `_`.
pub fn validate_template(template: &str) -> Result<(), String> {
    if !template.starts_with('/') {
        return Err(format!("path template {template:?} must start with '/'"));
    }
    if template.contains(['?', '#']) {
        return Err(format!(
            "path template {template:?} must not contain a query or fragment"
        ));
    }
    if template.split('/').filter(|s| !s.is_empty()).count() > MAX_SEGMENTS {
        return Err(format!(
            "path template {template:?} has more than {MAX_SEGMENTS} segments"
        ));
    }
    for segment in template.split('/').skip(1) {
        if segment.contains(['{', '}']) {
            let name = segment
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .filter(|n| {
                    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
            if name.is_none() {
                return Err(format!(
                    "path template {template:?}: segment {segment:?} must be a whole {{name}} placeholder"
                ));
            }
        }
    }
    Ok(())
}

use http::Method;
use percent_encoding::percent_decode_str;

use crate::config::RouteConfig;
use crate::limit::RouteId;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

#[derive(Debug, Clone)]
struct Compiled {
    id: RouteId,
    method: Option<Method>,
    segments: Vec<Segment>,
}

/// The compiled route table: the first route (in file order) whose method and path match wins.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    entries: Vec<Compiled>,
}

impl RouteTable {
    /// Compiles validated routes; route `i` gets `RouteId(i)`.
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut entries = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            for template in &route.paths {
                entries.push(Compiled {
                    id: RouteId(i as u32),
                    method: route.method.clone(),
                    segments: compile(template),
                });
            }
        }
        RouteTable { entries }
    }

    /// Finds the route for a call. `path` is the raw request path (never the query).
    ///
    /// Matching errs on the side of limiting: literal segments compare after percent-decoding and
    /// ignoring ASCII case, empty segments (`//`, a trailing `/`) are skipped, and dot segments
    /// are resolved (`/a/./b` is `/a/b`, `/a/x/../b` is `/a/b`, RFC 3986 section 5.2.4, also
    /// percent-encoded), so a caller cannot dodge a quota with a spelling that Zoho's front end
    /// could still route to the same endpoint.
    pub fn find(&self, method: &Method, path: &str) -> Option<RouteId> {
        let mut segments: [&str; MAX_SEGMENTS] = [""; MAX_SEGMENTS];
        // How deep the resolved path is. Positions past the array are not kept: a path that
        // ends deeper than any Cliq endpoint matches nothing, and `..` only ever pops the
        // deepest segment, so every kept position holds its latest segment.
        let mut depth = 0usize;
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            match dot_segment(segment) {
                Some(Dots::One) => {}
                Some(Dots::Two) => depth = depth.saturating_sub(1),
                None => {
                    if let Some(slot) = segments.get_mut(depth) {
                        *slot = segment;
                    }
                    depth += 1;
                }
            }
        }
        let segments = segments.get(..depth)?;
        self.entries
            .iter()
            .find(|c| {
                c.method.as_ref().is_none_or(|m| m == method) && matches(&c.segments, segments)
            })
            .map(|c| c.id)
    }
}

enum Dots {
    One,
    Two,
}

/// Whether a raw path segment is `.` or `..`, written plainly or percent-encoded (`%2e`).
fn dot_segment(raw: &str) -> Option<Dots> {
    if raw.len() > 6 || !(raw.starts_with('.') || raw.starts_with('%')) {
        return None;
    }
    let decoded: Vec<u8> = percent_decode_str(raw).collect();
    match decoded.as_slice() {
        b"." => Some(Dots::One),
        b".." => Some(Dots::Two),
        _ => None,
    }
}

fn compile(template: &str) -> Vec<Segment> {
    template
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.starts_with('{') {
                Segment::Param
            } else {
                Segment::Literal(s.to_ascii_lowercase())
            }
        })
        .collect()
}

fn matches(template: &[Segment], path: &[&str]) -> bool {
    template.len() == path.len()
        && template.iter().zip(path).all(|(t, p)| match t {
            Segment::Param => true,
            Segment::Literal(lit) => literal_eq(lit, p),
        })
}

fn literal_eq(lowercase_literal: &str, raw: &str) -> bool {
    if !raw.contains('%') {
        return raw.eq_ignore_ascii_case(lowercase_literal);
    }
    let decoded = percent_decode_str(raw).collect::<Vec<u8>>();
    decoded.eq_ignore_ascii_case(lowercase_literal.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Algorithm, OnLimit};
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn route(name: &str, method: Option<Method>, paths: &[&str]) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            method,
            paths: paths.iter().map(|p| p.to_string()).collect(),
            limit: NonZeroU32::new(20).expect("20"),
            per: Duration::from_secs(60),
            lock: Duration::from_secs(600),
            on_limit: OnLimit::Queue,
            max_wait: Duration::from_secs(30),
            algorithm: Algorithm::Window,
            mode: crate::config::RouteMode::Enforce,
            validate: None,
            line: 1,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(&[
            route(
                "post",
                Some(Method::POST),
                &[
                    "/api/v3/chats/{chat_id}/message",
                    "/api/v3/chats/{chat_id}/messages",
                ],
            ),
            route(
                "get_one",
                Some(Method::GET),
                &["/api/v2/chats/{chat_id}/messages/{message_id}"],
            ),
            route("any", None, &["/api/v2/me"]),
        ])
    }

    #[test]
    fn templates_match_one_segment_per_placeholder() {
        let t = table();
        assert_eq!(
            t.find(&Method::POST, "/api/v3/chats/C1/message"),
            Some(RouteId(0))
        );
        assert_eq!(
            t.find(&Method::POST, "/api/v3/chats/C1/messages"),
            Some(RouteId(0)),
            "path list shares a route"
        );
        assert_eq!(t.find(&Method::POST, "/api/v3/chats/C1/x/message"), None);
        assert_eq!(
            t.find(&Method::POST, "/api/v3/chats//message"),
            None,
            "a placeholder needs a segment"
        );
        assert_eq!(
            t.find(&Method::GET, "/api/v2/chats/C1/messages/a%20b"),
            Some(RouteId(1))
        );
    }

    #[test]
    fn method_must_match_unless_route_has_none() {
        let t = table();
        assert_eq!(t.find(&Method::GET, "/api/v3/chats/C1/message"), None);
        assert_eq!(t.find(&Method::DELETE, "/api/v2/me"), Some(RouteId(2)));
    }

    #[test]
    fn spelling_variants_cannot_dodge_a_quota() {
        let t = table();
        assert_eq!(
            t.find(&Method::POST, "/API/v3/Chats/C1/message/"),
            Some(RouteId(0))
        );
        assert_eq!(
            t.find(&Method::POST, "//api/v3/%63hats/C1/message"),
            Some(RouteId(0))
        );
    }

    #[test]
    fn dot_segments_cannot_dodge_a_quota() {
        let t = table();
        for path in [
            "/api/v3/./chats/C1/message",
            "/api/v3/chats/C1/x/../message",
            "/api/v3/chats/C1/message/.",
            "/api/v3/chats/C1/message/x/..",
            "/api/v3/%2e/chats/C1/message",
            "/api/v3/chats/C1/x/%2E%2e/message",
            "/api/v3/chats/C1/x/.%2e/message",
            "/../api/v3/chats/C1/message",
            "/api/v3/chats/C1/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/../../../../../../../../../../../../../../../../../message",
        ] {
            assert_eq!(t.find(&Method::POST, path), Some(RouteId(0)), "{path}");
        }
        assert_eq!(
            t.find(&Method::POST, "/api/v3/chats/C1/message/x/../.."),
            None,
            "resolved to /api/v3/chats/C1"
        );
        assert_eq!(
            t.find(&Method::POST, "/api/v3/chats/.../message"),
            Some(RouteId(0)),
            "three dots are a chat id like any other"
        );
    }

    #[test]
    fn absurdly_deep_paths_match_nothing() {
        let deep = "/a".repeat(40);
        assert_eq!(table().find(&Method::GET, &deep), None);
    }

    #[test]
    fn template_validation() {
        assert!(validate_template("/api/v3/chats/{chat_id}/message").is_ok());
        assert!(validate_template("api/v3").is_err());
        assert!(validate_template("/api/{x}y").is_err());
        assert!(validate_template("/api/{}").is_err());
        assert!(validate_template("/api?x=1").is_err());
        assert!(validate_template(&"/a".repeat(MAX_SEGMENTS)).is_ok());
        assert!(validate_template(&"/a".repeat(MAX_SEGMENTS + 1)).is_err());
    }
}
