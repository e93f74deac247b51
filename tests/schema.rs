//! The JSON Schema of the config (src/schema.json, printed by `cliqgate schema`): it compiles
//! (draft 2020-12, with boon), accepts every shipped config and every fixture cliqgate accepts,
//! refuses the mistakes it can express at the keys where they are, and names exactly the keys the
//! parser accepts, so it cannot silently fall behind the parser.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use boon::{Compiler, SchemaIndex, Schemas, ValidationError};
use cliqgate::config::{known_keys, Config, JSON_SCHEMA};
use cliqgate::validate::{NO_VALIDATION, RULE_SETS};
use saphyr::{LoadableYamlNode, Scalar, Yaml};
use serde_json::{Map, Number, Value};

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn schema_json() -> Value {
    serde_json::from_str(JSON_SCHEMA).expect("src/schema.json is JSON")
}

fn compiled() -> (Schemas, SchemaIndex) {
    let mut schemas = Schemas::new();
    let mut compiler = Compiler::new();
    let loc = repo("src/schema.json").display().to_string();
    compiler
        .add_resource(&loc, schema_json())
        .expect("schema location");
    let index = compiler
        .compile(&loc, &mut schemas)
        .unwrap_or_else(|e| panic!("src/schema.json does not compile: {e:#}"));
    (schemas, index)
}

/// A YAML document as JSON: scalars to numbers, booleans, strings or null; mappings to objects
/// (string keys only); sequences to arrays.
fn yaml_to_json(node: &Yaml) -> Value {
    match node {
        Yaml::Value(Scalar::Null) => Value::Null,
        Yaml::Value(Scalar::Boolean(b)) => Value::Bool(*b),
        Yaml::Value(Scalar::Integer(n)) => Value::Number((*n).into()),
        Yaml::Value(Scalar::FloatingPoint(x)) => {
            Number::from_f64(x.into_inner()).map_or(Value::Null, Value::Number)
        }
        Yaml::Value(Scalar::String(s)) => Value::String(s.to_string()),
        Yaml::Sequence(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Mapping(map) => {
            let mut object = Map::new();
            for (k, v) in map {
                let key = k.as_str().unwrap_or_else(|| panic!("non-string key {k:?}"));
                object.insert(key.to_string(), yaml_to_json(v));
            }
            Value::Object(object)
        }
        other => panic!("no JSON for the YAML node {other:?}"),
    }
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = Yaml::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match docs.as_slice() {
        [doc] => yaml_to_json(doc),
        _ => panic!("{}: expected one YAML document", path.display()),
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The instance locations (JSON pointers) of the innermost errors.
fn leaf_locations(error: &ValidationError, out: &mut BTreeSet<String>) {
    if error.causes.is_empty() {
        out.insert(error.instance_location.to_string());
    }
    for cause in &error.causes {
        leaf_locations(cause, out);
    }
}

#[test]
fn shipped_configs_validate() {
    let (schemas, index) = compiled();
    let files = yaml_files(&repo("config"));
    assert!(files.len() >= 3, "{files:?}");
    for path in files {
        let instance = yaml_file(&path);
        if let Err(e) = schemas.validate(&instance, index) {
            panic!("{} does not validate:\n{e:#}", path.display());
        }
    }
}

#[test]
fn every_fixture_cliqgate_accepts_validates() {
    let (schemas, index) = compiled();
    let mut accepted = Vec::new();
    for path in yaml_files(&repo("tests/fixtures/config")) {
        if Config::load(&path).is_err() {
            continue;
        }
        let instance = yaml_file(&path);
        if let Err(e) = schemas.validate(&instance, index) {
            panic!("{} does not validate:\n{e:#}", path.display());
        }
        accepted.push(
            path.file_name()
                .expect("name")
                .to_string_lossy()
                .to_string(),
        );
    }
    for name in ["valid.yaml", "redis_store.yaml", "resolve_mode.yaml"] {
        assert!(accepted.iter().any(|a| a == name), "{name}: {accepted:?}");
    }
}

/// Fixtures holding mistakes the schema can express, with the instance locations of its errors
/// (an unknown key and a missing key are errors of the mapping holding them).
const REFUSED: &[(&str, &[&str])] = &[
    ("unknown_key.yaml", &["", "/routes/0"]),
    (
        "bad_enum.yaml",
        &[
            "/unmatched",
            "/log/format",
            "/routes/0/method",
            "/routes/0/on_limit",
            "/routes/0/algorithm",
        ],
    ),
    (
        "bad_duration.yaml",
        &[
            "/routes/0/per",
            "/routes/0/lock",
            "/routes/0/max_wait",
            "/routes/1/per",
            "/routes/1/lock",
        ],
    ),
    ("bad_route_mode.yaml", &["/defaults/mode", "/routes/0/mode"]),
    ("bad_reload_watch.yaml", &["/reload/watch"]),
    ("bad_validate.yaml", &["/defaults", "/routes/0/validate"]),
    ("admin_short_token.yaml", &["/admin/token"]),
    ("state_file_under_redis.yaml", &["/store/state_file"]),
    (
        "redis_keys_under_memory.yaml",
        &[
            "/store/url",
            "/store/on_error",
            "/store/replicas",
            "/store/timeout",
            "/store/connect_timeout",
        ],
    ),
    ("redis_without_url.yaml", &["/store"]),
    (
        "header_keys_under_resolve.yaml",
        &["/identity/header", "/identity/trusted_networks"],
    ),
    ("header_mode_without_header.yaml", &["/identity"]),
    ("resolve_without_url.yaml", &["/identity"]),
    ("missing_upstream.yaml", &[""]),
    (
        "wrong_type.yaml",
        &[
            "/safety_margin",
            "/identity",
            "/routes/0/limit",
            "/routes/1",
        ],
    ),
    (
        "bad_sizes.yaml",
        &["/http/max_header_bytes", "/http/max_body_bytes"],
    ),
    (
        "bad_numbers.yaml",
        &[
            "/queue/max_per_user",
            "/queue/max_total",
            "/routes/0/limit",
            "/routes/1/limit",
        ],
    ),
];

#[test]
fn fixtures_with_expressible_mistakes_are_refused_where_they_are() {
    let (schemas, index) = compiled();
    for (name, expected) in REFUSED {
        let path = repo("tests/fixtures/config").join(name);
        assert!(Config::load(&path).is_err(), "{name}: cliqgate refuses it");
        let instance = yaml_file(&path);
        let Err(error) = schemas.validate(&instance, index) else {
            panic!("{name}: the schema accepts it");
        };
        let mut found = BTreeSet::new();
        leaf_locations(&error, &mut found);
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_string()).collect();
        assert_eq!(found, expected, "{name}:\n{error:#}");
    }
}

#[test]
fn the_schema_refuses_what_it_describes_in_small_documents() {
    let (schemas, index) = compiled();
    let refused = [
        r#"{"upstream": "https://cliq.zoho.com", "safety_margin": "1.5s"}"#,
        r#"{"upstream": "https://cliq.zoho.com", "safety_margin": "1 minute"}"#,
        r#"{"upstream": "https://cliq.zoho.com/api"}"#,
        r#"{"upstream": "https://cliq.zoho.com", "listen": "localhost:8080"}"#,
        r#"{"upstream": "https://cliq.zoho.com", "http": {"max_body_bytes": "64KB"}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "admin": {"token": "has a space in it!"}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "admin": {"token": ""}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "reload": {"watch": "yes"}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "defaults": {"name": "x"}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a b", "path": "/a"}]}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a", "path": "a"}]}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a", "path": "/{x}y"}]}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a", "path": []}]}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a", "path": "/a", "mode": "dry"}]}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a", "path": "/a", "validate": "cliq.nope"}]}"#,
        r#"{"upstream": "https://cliq.zoho.com", "defaults": {"validate": "cliq.search_messages"}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "identity": {"url": "https://h/me"}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "identity": {"mode": "resolve", "url": "https://h/me", "user_field": "data"}}"#,
    ];
    for text in refused {
        let instance: Value = serde_json::from_str(text).expect(text);
        assert!(
            schemas.validate(&instance, index).is_err(),
            "accepted: {text}"
        );
    }
    let accepted = [
        r#"{"upstream": "https://cliq.zoho.com"}"#,
        r#"{"upstream": "http://127.0.0.1:8081/", "listen": "[::1]:0", "safety_margin": "0s"}"#,
        r#"{"upstream": "https://cliq.zoho.com", "identity": null, "store": null, "routes": null}"#,
        r#"{"upstream": "https://cliq.zoho.com", "store": {"state_file": "state.json"}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "admin": {"token": "0123456789abcdef"}, "reload": {"watch": true}}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a", "method": "Post", "path": "/a/{id}", "mode": "shadow", "limit": 1, "per": "1h30m", "lock": "1m500ms"}]}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a", "method": "*", "path": ["/a", "/b"]}]}"#,
        r#"{"upstream": "https://cliq.zoho.com", "routes": [{"name": "a", "method": "GET", "path": "/a", "validate": "cliq.search_messages"}]}"#,
    ];
    for text in accepted {
        let instance: Value = serde_json::from_str(text).expect(text);
        if let Err(e) = schemas.validate(&instance, index) {
            panic!("refused: {text}\n{e:#}");
        }
    }
}

// ---- The schema and the parser name the same keys ----

/// Follows a local `$ref` (`#/$defs/name`), as often as it takes.
fn resolve<'a>(root: &'a Value, mut node: &'a Value) -> &'a Value {
    while let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        node = root
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    node
}

/// Every key the schema describes, as dotted paths like [`known_keys`] gives them.
fn schema_keys(root: &Value, node: &Value, prefix: &str, out: &mut Vec<String>) {
    let node = resolve(root, node);
    let Some(properties) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, sub) in properties {
        let key = format!("{prefix}{name}");
        out.push(key.clone());
        let sub = resolve(root, sub);
        schema_keys(root, sub, &format!("{key}."), out);
        if let Some(items) = sub.get("items") {
            schema_keys(root, items, &format!("{key}[]."), out);
        }
    }
}

#[test]
fn the_schema_names_exactly_the_keys_the_parser_accepts() {
    let root = schema_json();
    let mut in_schema = Vec::new();
    schema_keys(&root, &root, "", &mut in_schema);
    let in_schema: BTreeSet<String> = in_schema.into_iter().collect();
    let in_parser: BTreeSet<String> = known_keys().into_iter().collect();
    let missing: Vec<&String> = in_parser.difference(&in_schema).collect();
    let extra: Vec<&String> = in_schema.difference(&in_parser).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "keys the parser accepts but the schema lacks: {missing:?}\n\
         keys the schema has but the parser refuses: {extra:?}"
    );
    for key in [
        "store.state_file",
        "admin.token",
        "reload.watch",
        "routes[].mode",
    ] {
        assert!(in_schema.contains(key), "{key}");
    }
}

/// The schema of a dotted key (`routes[].mode`) as written under `properties`, before any `$ref`.
fn property<'a>(root: &'a Value, key: &str) -> &'a Value {
    let mut holder = root;
    let mut parts = key.split('.').peekable();
    loop {
        let part = parts.next().expect("a non-empty key");
        let (name, items) = part.strip_suffix("[]").map_or((part, false), |n| (n, true));
        let property = &resolve(root, holder)["properties"][name];
        assert!(!property.is_null(), "{key}: no property {name}");
        if parts.peek().is_none() {
            return property;
        }
        holder = if items {
            &resolve(root, property)["items"]
        } else {
            property
        };
    }
}

/// An annotation (`description`, `default`) of a key: on its property, or on the first definition
/// along its `$ref` chain that has one.
fn annotation<'a>(root: &'a Value, key: &str, name: &str) -> Option<&'a Value> {
    let mut node = property(root, key);
    loop {
        if let Some(value) = node.get(name) {
            return Some(value);
        }
        let r = node.get("$ref")?.as_str()?;
        node = root.pointer(r.strip_prefix('#')?)?;
    }
}

#[test]
fn every_key_has_a_description() {
    let root = schema_json();
    for key in known_keys() {
        let description = annotation(&root, &key, "description").and_then(Value::as_str);
        assert!(
            description.is_some_and(|d| d.len() > 10),
            "{key} has no description"
        );
    }
}

/// Every subschema of `node` (objects and arrays of the document), with its JSON pointer.
fn walk<'a>(node: &'a Value, pointer: String, out: &mut Vec<(String, &'a Value)>) {
    match node {
        Value::Object(map) => {
            out.push((pointer.clone(), node));
            for (k, v) in map {
                walk(v, format!("{pointer}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(v, format!("{pointer}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_mapping_in_the_schema_refuses_unknown_keys() {
    let root = schema_json();
    let mut nodes = Vec::new();
    walk(&root, String::new(), &mut nodes);
    let mut objects = 0;
    for (pointer, node) in nodes {
        let is_object = match node.get("type") {
            Some(Value::String(t)) => t == "object",
            Some(Value::Array(types)) => types.iter().any(|t| t == "object"),
            _ => false,
        };
        if is_object {
            objects += 1;
            assert_eq!(
                node.get("additionalProperties"),
                Some(&Value::Bool(false)),
                "{pointer}"
            );
        }
    }
    // The top level, identity, store, timeouts, http, queue, log, admin, reload, defaults, route.
    assert_eq!(objects, 11);
}

#[test]
fn key_schemas_carry_the_documented_defaults() {
    let root = schema_json();
    let default = |key: &str| annotation(&root, key, "default").cloned();
    for (key, expected) in [
        ("listen", "0.0.0.0:8080"),
        ("admin_listen", "127.0.0.1:9090"),
        ("safety_margin", "1s"),
        ("unmatched", "forward"),
        ("identity.mode", "token"),
        ("identity.ttl", "50m"),
        ("store.kind", "memory"),
        ("store.timeout", "250ms"),
        ("timeouts.client_body", "60s"),
        ("timeouts.shutdown", "30s"),
        ("http.max_header_bytes", "64KiB"),
        ("log.level", "info"),
        ("defaults.on_limit", "queue"),
        ("defaults.max_wait", "30s"),
        ("defaults.algorithm", "window"),
        ("defaults.mode", "enforce"),
        ("routes[].mode", "enforce"),
        ("routes[].validate", "none"),
    ] {
        assert_eq!(default(key), Some(Value::from(expected)), "{key}");
    }
    assert_eq!(default("reload.watch"), Some(Value::Bool(false)));
    assert_eq!(default("queue.max_total"), Some(Value::from(10_000)));
    assert_eq!(default("admin.token"), None, "no token by default");
}

#[test]
fn the_schema_lists_exactly_the_rule_sets_cliqgate_knows() {
    let root = schema_json();
    let listed: BTreeSet<&str> = property(&root, "routes[].validate")["enum"]
        .as_array()
        .expect("validate is an enum")
        .iter()
        .map(|v| v.as_str().expect("names are strings"))
        .collect();
    let mut known: BTreeSet<&str> = RULE_SETS.iter().map(|set| set.name).collect();
    known.insert(NO_VALIDATION);
    assert_eq!(listed, known);
}

// ---- `cliqgate schema` ----

#[test]
fn cliqgate_schema_prints_the_schema_without_a_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        vec!["schema"],
        vec!["schema", "--config", "no-such-file.yaml"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_cliqgate"))
            .args(&args)
            .current_dir(dir.path())
            .output()
            .expect("run cliqgate");
        let stdout = String::from_utf8(output.stdout).expect("UTF-8");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
        let printed: Value = serde_json::from_str(&stdout).expect("JSON on stdout");
        assert_eq!(printed, schema_json(), "{args:?}");
        let file = std::fs::read_to_string(repo("src/schema.json")).expect("src/schema.json");
        assert_eq!(stdout, file, "{args:?}: printed byte for byte");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("read tempdir").count(),
        0,
        "nothing written to the working directory"
    );
}
