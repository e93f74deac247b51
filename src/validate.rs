//! Request validation: a call that Zoho would refuse as malformed is answered here, before it
//! spends any quota.
//!
//! A call Zoho refuses still counts against the user's 20 or 50 calls a minute, and in a retry
//! loop it can trip a lock on its own. The Cliq reference (../shared/cliq-api.md) documents the
//! limits that make a call invalid; each endpoint that has them gets one [`RuleSet`] below, as
//! data: one row per rule, naming where the value is, what it must be, the code Zoho answers with
//! and where the limit is published. A change in Zoho's limits is a change to one row.
//!
//! The rules refuse only what Zoho documents as refused, and read the input the lenient way
//! wherever Zoho's own reading is not published (letter case, spaces around commas, empty values,
//! repeated parameters, how characters are counted): a call cliqgate refuses is one Zoho would
//! refuse too, and a malformed call that slips through costs only what it cost before.
//!
//! Pure: no I/O, no HTTP types beyond `Method`. The pipeline (src/proxy.rs) decides which calls
//! are checked and reads their bodies; src/error.rs turns an [`Invalid`] into Zoho's response.

use std::borrow::Cow;

use http::Method;
use serde_json::Value;

use crate::error::Envelope;

/// Where a rule finds its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A query parameter by name, form-decoded (`%XX` escapes, `+` for a space) as Zoho reads it.
    Query(&'static str),
    /// A member of the JSON request body, by JSON pointer (RFC 6901); `""` is the whole body.
    Body(&'static str),
}

/// What a value must be. A check passes on an absent value (a missing parameter, a JSON `null`)
/// unless it says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// A list of at least this many items; an absent list has none. A list is comma-separated
    /// text or a JSON array; empty items (`a,,b`, a trailing comma) are not counted.
    MinItems(usize),
    /// A list of at most this many items.
    MaxItems(usize),
    /// Text of at most this many characters. Counted as Unicode scalar values, which is never
    /// more than Java's UTF-16 `length()`: a text within Zoho's limit is never refused.
    MaxChars(usize),
    /// One of these words (ASCII case and surrounding spaces ignored; empty is absent).
    OneOf(&'static [&'static str]),
    /// A list whose every item is one of these words (as [`Check::OneOf`]).
    EachOneOf(&'static [&'static str]),
    /// A whole number that fits in 64 signed bits (Zoho's cursors are Java longs).
    Integer64,
    /// A JSON object; required.
    Object,
}

/// One documented limit of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub place: Place,
    pub check: Check,
    /// The error code Zoho answers a call that breaks this rule with.
    pub code: &'static str,
    /// Where the limit is published.
    pub source: &'static str,
}

const fn query(name: &'static str, check: Check, code: &'static str, source: &'static str) -> Rule {
    Rule {
        place: Place::Query(name),
        check,
        code,
        source,
    }
}

const fn body(
    pointer: &'static str,
    check: Check,
    code: &'static str,
    source: &'static str,
) -> Rule {
    Rule {
        place: Place::Body(pointer),
        check,
        code,
        source,
    }
}

/// The rules of one endpoint, named for the `validate` key of a route.
#[derive(PartialEq, Eq)]
pub struct RuleSet {
    /// The `validate:` value that selects it, e.g. `cliq.delete_messages`.
    pub name: &'static str,
    /// The endpoint's method: a route using the set must take only this method, so a call of
    /// another method is never judged by rules that are not its own.
    pub method: Method,
    /// The endpoint's path, as Zoho documents it.
    pub endpoint: &'static str,
    /// The shape of Zoho's error answers on this endpoint.
    pub envelope: Envelope,
    /// Checked in order; the first rule broken answers the call.
    pub rules: &'static [Rule],
}

// ---- The rule sets. Each row: where, what, Zoho's code, the source. ----

/// The v3 Messages API's code for a bad parameter (cliq-api.md lists it for Delete multiple
/// messages; Forward messages publishes no codes of its own, so it is used there too).
const INVALID_PARAMETERS: &str = "invalid_parameters";
/// Search messages: "Bad input answers 400 {"error":{"code":"invalid.inputs.submitted",...}}".
const INVALID_INPUTS: &str = "invalid.inputs.submitted";

const DELETE: &str = "cliq-api.md, The v3 Messages API, Delete multiple messages";
const DELETE_REASONS: &[&str] = &["irrelevant_information", "obscene_content", "others"];

/// `DELETE /api/v3/chats/{chat_id}/messages?message_ids=a,b,c` (all query parameters).
#[rustfmt::skip]
pub static DELETE_MESSAGES: RuleSet = RuleSet {
    name: "cliq.delete_messages",
    method: Method::DELETE,
    endpoint: "/api/v3/chats/{chat_id}/messages",
    envelope: Envelope::Flat,
    rules: &[
        query("message_ids", Check::MinItems(1), INVALID_PARAMETERS, DELETE),
        query("message_ids", Check::MaxItems(25), "message_delete_limit_exceeded", DELETE),
        query("reason", Check::OneOf(DELETE_REASONS), "invalid_delete_reason", DELETE),
        query("comment", Check::MaxChars(250), INVALID_PARAMETERS, DELETE),
    ],
};

const FORWARD: &str = "cliq-api.md, The v3 Messages API, Forward messages body (Zoho's OpenAPI)";

/// `POST /api/v3/messages` with a JSON body (`source` and `recipients`).
#[rustfmt::skip]
pub static FORWARD_MESSAGES: RuleSet = RuleSet {
    name: "cliq.forward_messages",
    method: Method::POST,
    endpoint: "/api/v3/messages",
    envelope: Envelope::Flat,
    rules: &[
        body("", Check::Object, INVALID_PARAMETERS, FORWARD),
        body("/source", Check::Object, INVALID_PARAMETERS, FORWARD),
        body("/recipients", Check::Object, INVALID_PARAMETERS, FORWARD),
        body("/source/message_ids", Check::MinItems(1), INVALID_PARAMETERS, FORWARD),
        body("/source/message_ids", Check::MaxItems(25), INVALID_PARAMETERS, FORWARD),
        body("/recipients/chat_ids", Check::MaxItems(100), INVALID_PARAMETERS, FORWARD),
        body("/recipients/user_ids", Check::MaxItems(100), INVALID_PARAMETERS, FORWARD),
        body("/recipients/title", Check::MaxChars(255), INVALID_PARAMETERS, FORWARD),
    ],
};

const SEARCH: &str = "cliq-api.md, The v3 Messages API, Search messages query parameters";
const CHAT_TYPES: &[&str] = &[
    "direct_message",
    "group_chat",
    "channel",
    "threads",
    "bot",
    "guests",
];
const CHANNEL_TYPES: &[&str] = &["organisation", "team", "personal", "external"];
const MESSAGE_TYPES: &[&str] = &["text", "link", "file"];
const STAR_TYPES: &[&str] = &[
    "important",
    "to_do",
    "note",
    "manager",
    "follow_up",
    "followup",
    "question",
    "idea",
    "other",
];

/// `GET /api/v3/messages/search` (all query parameters). Not checked, because Zoho does not say
/// what it does with them or the check needs more than one value: `limit` (at most 50: a page
/// size may be clamped rather than refused), the booleans, `is_pinned` with one chat id, and
/// the times (`invalid.time.submitted`).
#[rustfmt::skip]
pub static SEARCH_MESSAGES: RuleSet = RuleSet {
    name: "cliq.search_messages",
    method: Method::GET,
    endpoint: "/api/v3/messages/search",
    envelope: Envelope::Nested,
    rules: &[
        query("query", Check::MaxChars(1000), INVALID_INPUTS, SEARCH),
        query("from_user_ids", Check::MaxItems(5), INVALID_INPUTS, SEARCH),
        query("to_user_ids", Check::MaxItems(5), INVALID_INPUTS, SEARCH),
        query("mentioned_user_ids", Check::MaxItems(5), INVALID_INPUTS, SEARCH),
        query("chat_ids", Check::MaxItems(5), INVALID_INPUTS, SEARCH),
        query("team_ids", Check::MaxItems(5), INVALID_INPUTS, SEARCH),
        query("chat_type", Check::EachOneOf(CHAT_TYPES), INVALID_INPUTS, SEARCH),
        query("channel_type", Check::EachOneOf(CHANNEL_TYPES), INVALID_INPUTS, SEARCH),
        query("message_type", Check::EachOneOf(MESSAGE_TYPES), INVALID_INPUTS, SEARCH),
        query("star_types", Check::EachOneOf(STAR_TYPES), INVALID_INPUTS, SEARCH),
        query("star_types", Check::MaxItems(5), INVALID_INPUTS, SEARCH),
        query("file_name", Check::MaxItems(10), INVALID_INPUTS, SEARCH),
        query("file_name", Check::MaxChars(500), INVALID_INPUTS, SEARCH),
        query("file_type", Check::MaxItems(10), INVALID_INPUTS, SEARCH),
        query("file_type", Check::MaxChars(500), INVALID_INPUTS, SEARCH),
        query("file_content_query", Check::MaxChars(500), INVALID_INPUTS, SEARCH),
        query("next_token", Check::Integer64, INVALID_INPUTS, SEARCH),
    ],
};

/// Its name: a route's config reads `validate: Some(cliq.delete_messages)`, not every row.
impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every rule set, by the name a route's `validate` key gives.
pub static RULE_SETS: [&RuleSet; 3] = [&DELETE_MESSAGES, &FORWARD_MESSAGES, &SEARCH_MESSAGES];

/// The `validate` value that switches validation off (also the default).
pub const NO_VALIDATION: &str = "none";

/// The rule set named `name`, if there is one.
pub fn by_name(name: &str) -> Option<&'static RuleSet> {
    RULE_SETS.iter().copied().find(|set| set.name == name)
}

// ---- Judging a call ----

/// A call that breaks a rule: what Zoho would answer (400, this code, in this envelope).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
    pub envelope: Envelope,
}

impl RuleSet {
    /// True if a rule reads the JSON body: only then is the body read before the call is judged.
    pub fn reads_body(&self) -> bool {
        self.rules
            .iter()
            .any(|rule| matches!(rule.place, Place::Body(_)))
    }

    /// Judges a call by its raw query (without `?`) and, if [`RuleSet::reads_body`], its whole
    /// body (`None`: not read). The first broken rule answers.
    pub fn check(&self, query: Option<&str>, body: Option<&[u8]>) -> Result<(), Invalid> {
        let params: Vec<(Cow<str>, Cow<str>)> = match query {
            Some(q) if self.reads_query() => form_urlencoded::parse(q.as_bytes()).collect(),
            _ => Vec::new(),
        };
        // Not JSON (or nested deeper than serde_json's recursion limit): every body value is
        // absent, and the rule on the whole body refuses it.
        let json: Option<Value> = body.and_then(|b| serde_json::from_slice(b).ok());
        for rule in self.rules {
            let verdict = match rule.place {
                Place::Query(name) => judge_params(rule.check, &params, name),
                Place::Body(pointer) => {
                    let found = json.as_ref().and_then(|doc| doc.pointer(pointer));
                    judge(rule.check, found.and_then(Input::from_json).as_ref())
                }
            };
            if let Err(fault) = verdict {
                return Err(Invalid {
                    code: rule.code,
                    message: fault.message(rule.place),
                    envelope: self.envelope,
                });
            }
        }
        Ok(())
    }

    fn reads_query(&self) -> bool {
        self.rules
            .iter()
            .any(|rule| matches!(rule.place, Place::Query(_)))
    }
}

/// A value as the checks see it.
enum Input<'a> {
    Text(Cow<'a, str>),
    List(&'a [Value]),
    Object,
}

impl<'a> Input<'a> {
    /// A JSON value; `null` is absent. Numbers and booleans are read as their text, as Zoho's
    /// (Jackson) deserializer coerces them into text fields.
    fn from_json(value: &'a Value) -> Option<Input<'a>> {
        match value {
            Value::Null => None,
            Value::String(s) => Some(Input::Text(Cow::Borrowed(s))),
            Value::Number(n) => Some(Input::Text(Cow::Owned(n.to_string()))),
            Value::Bool(b) => Some(Input::Text(Cow::Borrowed(if *b {
                "true"
            } else {
                "false"
            }))),
            Value::Array(items) => Some(Input::List(items)),
            Value::Object(_) => Some(Input::Object),
        }
    }
}

/// A query rule: servers differ in which of a repeated parameter they read (the first, the last,
/// all of them), so the rule is broken only if every occurrence breaks it.
fn judge_params(check: Check, params: &[(Cow<str>, Cow<str>)], name: &str) -> Result<(), Fault> {
    let mut first_fault = None;
    for (_, value) in params.iter().filter(|(n, _)| n == name) {
        match judge(check, Some(&Input::Text(Cow::Borrowed(value)))) {
            Ok(()) => return Ok(()),
            Err(fault) => {
                first_fault.get_or_insert(fault);
            }
        }
    }
    match first_fault {
        Some(fault) => Err(fault),
        None => judge(check, None),
    }
}

/// Why a value breaks a rule.
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    TooFew {
        min: usize,
        found: usize,
    },
    TooMany {
        max: usize,
        found: usize,
    },
    TooLong {
        max: usize,
        found: usize,
    },
    NotOneOf(&'static [&'static str]),
    NotEachOneOf(&'static [&'static str]),
    NotInteger,
    NotObject,
    /// The value has the wrong JSON type (what it should be).
    WrongType(&'static str),
}

fn judge(check: Check, input: Option<&Input>) -> Result<(), Fault> {
    match check {
        Check::MinItems(min) => {
            let found = input.map_or(Ok(0), count_items)?;
            ok_if(found >= min, Fault::TooFew { min, found })
        }
        Check::MaxItems(max) => {
            let found = input.map_or(Ok(0), count_items)?;
            ok_if(found <= max, Fault::TooMany { max, found })
        }
        Check::MaxChars(max) => {
            let found = input.map_or(Ok(0), |i| text(i).map(|t| t.chars().count()))?;
            ok_if(found <= max, Fault::TooLong { max, found })
        }
        Check::OneOf(words) => match input {
            None => Ok(()),
            Some(i) => ok_if(is_one_of(text(i)?, words), Fault::NotOneOf(words)),
        },
        Check::EachOneOf(words) => match input {
            None => Ok(()),
            Some(Input::List(items)) => {
                let all = items
                    .iter()
                    .all(|item| item.as_str().is_some_and(|word| is_one_of(word, words)));
                ok_if(all, Fault::NotEachOneOf(words))
            }
            Some(i) => {
                let all = items(text(i)?).all(|word| is_one_of(word, words));
                ok_if(all, Fault::NotEachOneOf(words))
            }
        },
        Check::Integer64 => match input {
            None => Ok(()),
            Some(i) => {
                let t = text(i)?.trim();
                ok_if(t.is_empty() || t.parse::<i64>().is_ok(), Fault::NotInteger)
            }
        },
        Check::Object => ok_if(matches!(input, Some(Input::Object)), Fault::NotObject),
    }
}

fn ok_if(holds: bool, fault: Fault) -> Result<(), Fault> {
    if holds {
        Ok(())
    } else {
        Err(fault)
    }
}

fn text<'i>(input: &'i Input) -> Result<&'i str, Fault> {
    match input {
        Input::Text(t) => Ok(t),
        Input::List(_) | Input::Object => Err(Fault::WrongType("text")),
    }
}

fn count_items(input: &Input) -> Result<usize, Fault> {
    match input {
        Input::Text(t) => Ok(items(t).count()),
        Input::List(values) => Ok(values.len()),
        Input::Object => Err(Fault::WrongType("a list")),
    }
}

/// The items of a comma-separated list, trimmed, empty ones skipped.
fn items(text: &str) -> impl Iterator<Item = &str> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// Empty counts as absent: a server may well read `reason=` as no reason.
fn is_one_of(value: &str, words: &[&str]) -> bool {
    let value = value.trim();
    value.is_empty() || words.iter().any(|w| w.eq_ignore_ascii_case(value))
}

impl Fault {
    /// The message of the refusal. Never quotes the caller's value: it may be long, or private.
    fn message(&self, place: Place) -> String {
        let name = match place {
            Place::Query(name) => format!("`{name}`"),
            Place::Body("") => "The request body".to_string(),
            Place::Body(pointer) => {
                format!("`{}`", pointer.trim_start_matches('/').replace('/', "."))
            }
        };
        match self {
            Fault::TooFew { min, found: 0 } => {
                format!("{name} is required: give at least {min} value(s).")
            }
            Fault::TooFew { min, found } => {
                format!("{name} holds {found} value(s); at least {min} are required.")
            }
            Fault::TooMany { max, found } => {
                format!("{name} holds {found} values; at most {max} are allowed.")
            }
            Fault::TooLong { max, found } => {
                format!("{name} is {found} characters long; at most {max} are allowed.")
            }
            Fault::NotOneOf(words) => format!("{name} must be one of: {}.", words.join(", ")),
            Fault::NotEachOneOf(words) => {
                format!(
                    "Every value of {name} must be one of: {}.",
                    words.join(", ")
                )
            }
            Fault::NotInteger => format!("{name} must be a whole number."),
            Fault::NotObject => format!("{name} must be a JSON object."),
            Fault::WrongType(what) => format!("{name} must be {what}."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code a call gets: `None` if it passes.
    fn code_of(set: &RuleSet, query: &str, body: Option<&str>) -> Option<&'static str> {
        set.check(Some(query), body.map(str::as_bytes))
            .err()
            .map(|invalid| invalid.code)
    }

    /// `n` comma-separated ids.
    fn ids(n: usize) -> String {
        (1..=n)
            .map(|i| format!("17420000000{i:05}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `n` copies of `unit`, as the value of a query parameter (percent-encoded).
    fn repeat_encoded(unit: &str, n: usize) -> String {
        let text = unit.repeat(n);
        form_urlencoded::byte_serialize(text.as_bytes()).collect()
    }

    /// Table rows: (what, query, expected code or None for "passes").
    fn assert_table(set: &RuleSet, rows: &[(&str, String, Option<&str>)]) {
        for (what, query, expected) in rows {
            assert_eq!(
                code_of(set, query, None),
                *expected,
                "{}: {what}: ?{}",
                set.name,
                query.chars().take(120).collect::<String>()
            );
        }
    }

    // ---- Delete multiple messages ----

    #[test]
    fn delete_needs_message_ids_present_and_non_empty() {
        let bad = Some("invalid_parameters");
        assert_table(
            &DELETE_MESSAGES,
            &[
                ("one id", "message_ids=1".into(), None),
                ("absent", String::new(), bad),
                ("absent, other parameters", "reason=others".into(), bad),
                ("empty", "message_ids=".into(), bad),
                ("only commas and spaces", "message_ids=%2C+%2C".into(), bad),
                ("a name without a value", "message_ids".into(), bad),
            ],
        );
    }

    #[test]
    fn delete_takes_at_most_25_ids() {
        let over = Some("message_delete_limit_exceeded");
        assert_table(
            &DELETE_MESSAGES,
            &[
                ("25 ids", format!("message_ids={}", ids(25)), None),
                ("26 ids", format!("message_ids={}", ids(26)), over),
                (
                    "25 ids, trailing comma",
                    format!("message_ids={},", ids(25)),
                    None,
                ),
                (
                    "25 ids, spaces",
                    format!("message_ids={}", ids(25).replace(',', "+,+")),
                    None,
                ),
                (
                    "26 ids, percent-encoded commas",
                    format!("message_ids={}", ids(26).replace(',', "%2C")),
                    over,
                ),
                (
                    "ids holding a space",
                    format!("message_ids={}", ids(25).replace('7', "%207")),
                    None,
                ),
            ],
        );
    }

    #[test]
    fn delete_reason_is_one_of_the_allowed_values() {
        let bad = Some("invalid_delete_reason");
        let mut rows: Vec<(&str, String, Option<&str>)> = DELETE_REASONS
            .iter()
            .map(|r| ("allowed", format!("message_ids=1&reason={r}"), None))
            .collect();
        rows.extend([
            (
                "any case",
                "message_ids=1&reason=Obscene_Content".into(),
                None,
            ),
            (
                "spaces around",
                "message_ids=1&reason=+others+".into(),
                None,
            ),
            ("empty is no reason", "message_ids=1&reason=".into(), None),
            ("unknown", "message_ids=1&reason=spam".into(), bad),
            ("a list", "message_ids=1&reason=others,spam".into(), bad),
            ("a prefix", "message_ids=1&reason=other".into(), bad),
        ]);
        assert_table(&DELETE_MESSAGES, &rows);
    }

    #[test]
    fn delete_comment_is_at_most_250_characters() {
        let bad = Some("invalid_parameters");
        assert_table(
            &DELETE_MESSAGES,
            &[
                (
                    "250 ASCII",
                    format!("message_ids=1&comment={}", "a".repeat(250)),
                    None,
                ),
                (
                    "251 ASCII",
                    format!("message_ids=1&comment={}", "a".repeat(251)),
                    bad,
                ),
                (
                    "250 two-byte characters",
                    format!("message_ids=1&comment={}", repeat_encoded("é", 250)),
                    None,
                ),
                (
                    "251 two-byte characters",
                    format!("message_ids=1&comment={}", repeat_encoded("é", 251)),
                    bad,
                ),
                (
                    "250 emoji (1000 bytes)",
                    format!("message_ids=1&comment={}", repeat_encoded("🚀", 250)),
                    None,
                ),
                (
                    "251 emoji",
                    format!("message_ids=1&comment={}", repeat_encoded("🚀", 251)),
                    bad,
                ),
                (
                    "250 pluses are spaces",
                    format!("message_ids=1&comment={}", "+".repeat(250)),
                    None,
                ),
                (
                    "250 escaped pluses",
                    format!("message_ids=1&comment={}", "%2B".repeat(250)),
                    None,
                ),
            ],
        );
    }

    #[test]
    fn a_repeated_parameter_is_refused_only_if_every_occurrence_breaks_the_rule() {
        let over = format!("message_ids={}", ids(26));
        assert_eq!(
            code_of(&DELETE_MESSAGES, &format!("{over}&message_ids=1"), None),
            None
        );
        assert_eq!(
            code_of(&DELETE_MESSAGES, &format!("message_ids=1&{over}"), None),
            None
        );
        assert_eq!(
            code_of(&DELETE_MESSAGES, &format!("{over}&{over}"), None),
            Some("message_delete_limit_exceeded")
        );
        assert_eq!(
            code_of(
                &DELETE_MESSAGES,
                "message_ids=1&reason=spam&reason=nope",
                None
            ),
            Some("invalid_delete_reason")
        );
    }

    // ---- Forward messages ----

    fn forward(source: &str, recipients: &str) -> String {
        format!(r#"{{"source":{source},"recipients":{recipients}}}"#)
    }

    /// A valid body with `recipients` members replaced by `members` (JSON object members).
    fn forward_to(members: &str) -> String {
        forward(
            r#"{"chat_id":"C_1","message_ids":["1"]}"#,
            &format!("{{{members}}}"),
        )
    }

    fn forward_ids(ids: &str) -> String {
        forward(
            &format!(r#"{{"chat_id":"C_1","message_ids":{ids}}}"#),
            r#"{"chat_ids":"C_2"}"#,
        )
    }

    fn json_list(n: usize) -> String {
        let items: Vec<String> = (1..=n).map(|i| format!("\"{i}\"")).collect();
        format!("[{}]", items.join(","))
    }

    fn assert_bodies(rows: &[(&str, String, Option<&str>)]) {
        for (what, body, expected) in rows {
            assert_eq!(
                code_of(&FORWARD_MESSAGES, "", Some(body)),
                *expected,
                "{what}: {}",
                body.chars().take(160).collect::<String>()
            );
        }
    }

    #[test]
    fn forward_body_must_be_a_json_object_with_source_and_recipients() {
        let bad = Some("invalid_parameters");
        assert_bodies(&[
            ("the documented example", r#"{"source": {"chat_id": "C_987654321", "message_ids": ["1742000000000001", "1742000000000002"]}, "recipients": {"chat_ids": "C_111,C_222", "user_ids": "60025012345,60025012346", "forward_as_group": true, "show_original_sender": true, "title": "Group Title 1"}}"#.into(), None),
            ("not JSON", "source=C_1".into(), bad),
            ("empty", String::new(), bad),
            ("JSON, not an object", json_list(2), bad),
            ("JSON with trailing junk", format!("{} x", forward_ids(r#"["1"]"#)), bad),
            ("no source", r#"{"recipients":{"chat_ids":"C_2"}}"#.into(), bad),
            ("no recipients", r#"{"source":{"message_ids":["1"]}}"#.into(), bad),
            ("source null", forward("null", r#"{"chat_ids":"C_2"}"#), bad),
            ("source a string", forward(r#""C_1""#, r#"{"chat_ids":"C_2"}"#), bad),
            ("recipients a list", forward(r#"{"message_ids":["1"]}"#, r#"["C_2"]"#), bad),
        ]);
        assert_eq!(
            FORWARD_MESSAGES
                .check(None, Some(&[0xff, 0xfe, b'{']))
                .map_err(|e| e.code),
            Err("invalid_parameters")
        );
        assert_eq!(
            FORWARD_MESSAGES.check(None, None).map_err(|e| e.code),
            Err("invalid_parameters")
        );
    }

    #[test]
    fn forward_takes_1_to_25_message_ids() {
        let bad = Some("invalid_parameters");
        assert_bodies(&[
            ("1 id", forward_ids(&json_list(1)), None),
            ("25 ids", forward_ids(&json_list(25)), None),
            ("0 ids", forward_ids("[]"), bad),
            ("26 ids", forward_ids(&json_list(26)), bad),
            (
                "absent",
                forward(r#"{"chat_id":"C_1"}"#, r#"{"chat_ids":"C_2"}"#),
                bad,
            ),
            ("null", forward_ids("null"), bad),
            ("an object", forward_ids(r#"{"id":"1"}"#), bad),
            ("25 as text", forward_ids(&format!("\"{}\"", ids(25))), None),
            ("26 as text", forward_ids(&format!("\"{}\"", ids(26))), bad),
        ]);
    }

    #[test]
    fn forward_takes_at_most_100_chat_ids_and_100_user_ids() {
        let bad = Some("invalid_parameters");
        for key in ["chat_ids", "user_ids"] {
            assert_bodies(&[
                (
                    "100",
                    forward_to(&format!(r#""{key}":"{}""#, ids(100))),
                    None,
                ),
                (
                    "101",
                    forward_to(&format!(r#""{key}":"{}""#, ids(101))),
                    bad,
                ),
                (
                    "100 and a trailing comma",
                    forward_to(&format!(r#""{key}":"{},""#, ids(100))),
                    None,
                ),
                (
                    "101 as a JSON list",
                    forward_to(&format!(r#""{key}":{}"#, json_list(101))),
                    bad,
                ),
                ("an object", forward_to(&format!(r#""{key}":{{}}"#)), bad),
                (
                    "one number",
                    forward_to(&format!(r#""{key}":60025012345"#)),
                    None,
                ),
            ]);
        }
        assert_bodies(&[(
            "100 of each",
            forward_to(&format!(r#""chat_ids":"{0}","user_ids":"{0}""#, ids(100))),
            None,
        )]);
    }

    #[test]
    fn forward_title_is_at_most_255_characters() {
        let bad = Some("invalid_parameters");
        let title = |t: &str| forward_to(&format!(r#""chat_ids":"C_2","title":"{t}""#));
        assert_bodies(&[
            ("255 ASCII", title(&"t".repeat(255)), None),
            ("256 ASCII", title(&"t".repeat(256)), bad),
            ("255 emoji", title(&"🚀".repeat(255)), None),
            ("256 emoji", title(&"🚀".repeat(256)), bad),
            ("255 JSON escapes", title(&"\\u00e9".repeat(255)), None),
            ("a number", forward_to(r#""title":12"#), None),
            ("a list", forward_to(r#""title":["t"]"#), bad),
        ]);
    }

    #[test]
    fn hostile_bodies_are_refused_without_panicking() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let duplicate =
            r#"{"source":{"message_ids":[]},"source":{"message_ids":["1"]},"recipients":{}}"#;
        assert_bodies(&[
            (
                "nested past the recursion limit",
                deep,
                Some("invalid_parameters"),
            ),
            (
                "a duplicate key: the last wins, as in Jackson",
                duplicate.into(),
                None,
            ),
        ]);
    }

    // ---- Search messages ----

    #[test]
    fn search_query_is_at_most_1000_characters() {
        let bad = Some(INVALID_INPUTS);
        assert_table(
            &SEARCH_MESSAGES,
            &[
                ("no parameters", String::new(), None),
                ("1000", format!("query={}", "q".repeat(1000)), None),
                ("1001", format!("query={}", "q".repeat(1001)), bad),
                (
                    "1000 three-byte characters",
                    format!("query={}", repeat_encoded("検", 1000)),
                    None,
                ),
                (
                    "1001 three-byte characters",
                    format!("query={}", repeat_encoded("検", 1001)),
                    bad,
                ),
                (
                    "file_content_query 500",
                    format!("file_content_query={}", "q".repeat(500)),
                    None,
                ),
                (
                    "file_content_query 501",
                    format!("file_content_query={}", "q".repeat(501)),
                    bad,
                ),
            ],
        );
    }

    #[test]
    fn search_takes_at_most_5_ids_in_each_id_filter() {
        for key in [
            "from_user_ids",
            "to_user_ids",
            "mentioned_user_ids",
            "chat_ids",
            "team_ids",
        ] {
            assert_table(
                &SEARCH_MESSAGES,
                &[
                    ("5", format!("{key}={}", ids(5)), None),
                    ("6", format!("{key}={}", ids(6)), Some(INVALID_INPUTS)),
                    ("5 and empties", format!("{key}=,{},,", ids(5)), None),
                ],
            );
        }
    }

    #[test]
    fn search_types_come_from_the_allowed_lists() {
        let lists = [
            ("chat_type", CHAT_TYPES),
            ("channel_type", CHANNEL_TYPES),
            ("message_type", MESSAGE_TYPES),
            ("star_types", STAR_TYPES),
        ];
        for (key, allowed) in lists {
            let mut rows: Vec<(&str, String, Option<&str>)> = allowed
                .iter()
                .map(|value| ("each allowed value", format!("{key}={value}"), None))
                .collect();
            rows.extend([
                (
                    "two, any case, spaces",
                    format!("{key}={}+,+{}", allowed[0].to_uppercase(), allowed[1]),
                    None,
                ),
                ("one unknown", format!("{key}=nope"), Some(INVALID_INPUTS)),
                (
                    "one unknown among allowed",
                    format!("{key}={},nope", allowed[0]),
                    Some(INVALID_INPUTS),
                ),
                ("empty", format!("{key}="), None),
            ]);
            assert_table(&SEARCH_MESSAGES, &rows);
        }
    }

    #[test]
    fn search_takes_at_most_5_star_types() {
        let five = STAR_TYPES[..5].join(",");
        let six = STAR_TYPES[..6].join(",");
        assert_table(
            &SEARCH_MESSAGES,
            &[
                ("5", format!("star_types={five}"), None),
                ("6", format!("star_types={six}"), Some(INVALID_INPUTS)),
            ],
        );
    }

    #[test]
    fn search_file_filters_take_10_values_and_500_characters() {
        for key in ["file_name", "file_type"] {
            // 10 values of 49 characters, 9 commas and one more character: exactly 500.
            let ten_long: Vec<String> = (0..10).map(|i| format!("{i}{}", "f".repeat(48))).collect();
            let ten_long = ten_long.join(",") + "f";
            assert_eq!(ten_long.chars().count(), 500);
            assert_table(
                &SEARCH_MESSAGES,
                &[
                    ("10 values", format!("{key}={}", ids(10)), None),
                    (
                        "11 values",
                        format!("{key}={}", ids(11)),
                        Some(INVALID_INPUTS),
                    ),
                    (
                        "10 values, 500 characters",
                        format!("{key}={ten_long}"),
                        None,
                    ),
                    (
                        "10 values, 501 characters",
                        format!("{key}={ten_long}f"),
                        Some(INVALID_INPUTS),
                    ),
                    (
                        "1 value, 500 characters",
                        format!("{key}={}", "f".repeat(500)),
                        None,
                    ),
                    (
                        "1 value, 501 characters",
                        format!("{key}={}", "f".repeat(501)),
                        Some(INVALID_INPUTS),
                    ),
                ],
            );
        }
    }

    #[test]
    fn search_next_token_is_a_64_bit_number() {
        let bad = Some(INVALID_INPUTS);
        assert_table(
            &SEARCH_MESSAGES,
            &[
                ("a cursor", "next_token=1742000000000001".into(), None),
                ("i64::MAX", format!("next_token={}", i64::MAX), None),
                ("i64::MAX + 1", "next_token=9223372036854775808".into(), bad),
                ("negative", "next_token=-1".into(), None),
                ("empty is absent", "next_token=".into(), None),
                ("text", "next_token=abc".into(), bad),
                ("a fraction", "next_token=1.5".into(), bad),
            ],
        );
    }

    #[test]
    fn odd_query_strings_do_not_panic() {
        for query in [
            "%",
            "%ZZ=%",
            "message_ids=%FF%FE",
            "comment=%C3",
            "&&&==&=",
            "query=%00",
            "next_token=%F0%9F%9A%80",
        ] {
            for set in RULE_SETS {
                let _ = set.check(Some(query), None);
            }
        }
        // Undecodable bytes become U+FFFD, one character each: never more than Zoho counts.
        let comment = format!("message_ids=1&comment={}", "%FF".repeat(250));
        assert_eq!(code_of(&DELETE_MESSAGES, &comment, None), None);
    }

    // ---- The answer ----

    #[test]
    fn the_first_broken_rule_answers_in_the_sets_envelope() {
        let invalid = DELETE_MESSAGES
            .check(Some(&format!("message_ids={}&reason=spam", ids(26))), None)
            .expect_err("two rules broken");
        assert_eq!(invalid.code, "message_delete_limit_exceeded");
        assert_eq!(
            invalid.message,
            "`message_ids` holds 26 values; at most 25 are allowed."
        );
        assert_eq!(invalid.envelope, Envelope::Flat);
        let invalid = SEARCH_MESSAGES
            .check(Some("chat_type=nope"), None)
            .expect_err("unknown chat type");
        assert_eq!(invalid.envelope, Envelope::Nested);
        assert!(
            invalid
                .message
                .starts_with("Every value of `chat_type` must be one of: direct_message"),
            "{}",
            invalid.message
        );
        let invalid = FORWARD_MESSAGES
            .check(
                None,
                Some(forward_to(&format!(r#""title":"{}""#, "t".repeat(300))).as_bytes()),
            )
            .expect_err("title too long");
        assert_eq!(
            invalid.message,
            "`recipients.title` is 300 characters long; at most 255 are allowed."
        );
        let invalid = FORWARD_MESSAGES
            .check(None, Some(b"x"))
            .expect_err("not JSON");
        assert_eq!(invalid.message, "The request body must be a JSON object.");
    }

    #[test]
    fn messages_never_quote_the_callers_value() {
        let secret = "s3cr3t-value";
        for (set, query) in [
            (&DELETE_MESSAGES, format!("message_ids=1&reason={secret}")),
            (&SEARCH_MESSAGES, format!("chat_type={secret}")),
            (&SEARCH_MESSAGES, format!("next_token={secret}")),
        ] {
            let invalid = set.check(Some(&query), None).expect_err(&query);
            assert!(!invalid.message.contains(secret), "{}", invalid.message);
        }
    }

    // ---- The tables themselves ----

    #[test]
    fn every_rule_cites_cliq_api_md_and_names_a_code() {
        for set in RULE_SETS {
            assert!(set.name.starts_with("cliq."), "{}", set.name);
            assert!(set.endpoint.starts_with("/api/v3/"), "{}", set.endpoint);
            assert!(!set.rules.is_empty(), "{}", set.name);
            for rule in set.rules {
                assert!(
                    rule.source.starts_with("cliq-api.md, "),
                    "{}: {rule:?}",
                    set.name
                );
                assert!(!rule.code.is_empty(), "{}: {rule:?}", set.name);
            }
        }
    }

    #[test]
    fn rule_sets_are_found_by_their_unique_names() {
        for set in RULE_SETS {
            assert_eq!(by_name(set.name), Some(set));
        }
        assert_eq!(by_name(NO_VALIDATION), None);
        assert_eq!(by_name("cliq.delete_message"), None);
        let mut names: Vec<&str> = RULE_SETS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RULE_SETS.len());
    }

    #[test]
    fn only_the_forward_rules_read_the_body() {
        assert!(!DELETE_MESSAGES.reads_body());
        assert!(FORWARD_MESSAGES.reads_body());
        assert!(!SEARCH_MESSAGES.reads_body());
        assert_eq!(
            FORWARD_MESSAGES.check(
                Some("message_ids="),
                Some(forward_ids("[\"1\"]").as_bytes())
            ),
            Ok(()),
            "a body rule set ignores the query"
        );
    }
}
