//! One fixture per config mistake (tests/fixtures/config/*.yaml), each loaded through
//! `Config::load` as `cliqgate check` does. Every test asserts the complete list of errors (key
//! and line exactly, a telling part of the message), so an extra or a lost report fails too.

use std::path::{Path, PathBuf};

use std::time::Duration;

use cliqgate::config::{
    Config, ConfigError, IdentityConfig, OnIdentityError, OnStoreError, ResolveConfig, RouteMode,
    StoreConfig, DOCUMENT_KEY,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn errors_of(name: &str) -> Vec<ConfigError> {
    match Config::load(&fixture(name)) {
        Ok(_) => panic!("{name} should be refused"),
        Err(errors) => errors.0,
    }
}

/// Asserts the exact errors of a fixture: `(line, key, part of the message)`, in line order.
fn assert_errors(name: &str, expected: &[(usize, &str, &str)]) {
    let errors = errors_of(name);
    let listing: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors.len(),
        expected.len(),
        "{name}: expected {} errors, got:\n{}",
        expected.len(),
        listing.join("\n")
    );
    for (error, (line, key, fragment)) in errors.iter().zip(expected) {
        assert_eq!(
            (error.line, error.key.as_str()),
            (*line, *key),
            "{name}: {error}"
        );
        assert!(
            error.message.contains(fragment),
            "{name}: {error}\nshould contain: {fragment}"
        );
    }
}

#[test]
fn valid_fixture_with_every_key_loads() {
    let config = match Config::load(&fixture("valid.yaml")) {
        Ok(config) => config,
        Err(errors) => panic!("valid.yaml:\n{errors}"),
    };
    assert_eq!(config.listen.port(), 0);
    let IdentityConfig::Header { name, trusted } = &config.identity else {
        panic!("expected header identity, got {:?}", config.identity);
    };
    assert_eq!(name.as_str(), "x-cliq-user");
    let trusted: Vec<String> = trusted.iter().map(ToString::to_string).collect();
    assert_eq!(
        trusted,
        ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8", "::1/128"],
        "a bare address is one host"
    );
    assert_eq!(
        config.upstream_ca_file,
        Some(fixture("valid.yaml")),
        "a relative CA path is taken from the config file's directory"
    );
    assert_eq!(
        config.state_file,
        Some(fixture("state.json")),
        "a relative state file is taken from the config file's directory"
    );
    assert_eq!(
        config.admin.token.as_deref(),
        Some("0123456789abcdef-valid-fixture")
    );
    assert!(config.reload.watch);
    let modes: Vec<(&str, RouteMode)> = config
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r.mode))
        .collect();
    assert_eq!(
        modes,
        [
            ("chats.post_message", RouteMode::Shadow),
            ("users.me", RouteMode::Enforce),
            ("messages.forward", RouteMode::Shadow)
        ],
        "`defaults.mode` applies unless the route sets its own"
    );
    let validated: Vec<Option<&str>> = config
        .routes
        .iter()
        .map(|r| r.validate.map(|set| set.name))
        .collect();
    assert_eq!(validated, [None, None, Some("cliq.forward_messages")]);
    for shown in [
        config.describe(),
        format!("{config:?}"),
        format!("{config:#?}"),
    ] {
        assert!(
            !shown.contains("valid-fixture"),
            "the admin token leaks:\n{shown}"
        );
    }
    assert!(config.describe().contains("admin token set"));
}

#[test]
fn unreadable_file_is_one_error_naming_the_file() {
    let path = fixture("does_not_exist.yaml");
    let errors = match Config::load(&path) {
        Ok(_) => panic!("a missing file cannot load"),
        Err(errors) => errors.0,
    };
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, 0);
    assert_eq!(errors[0].key, path.display().to_string());
    assert!(errors[0].message.contains("cannot read the config file"));
}

#[test]
fn yaml_syntax_error_is_reported_at_the_scanner_line() {
    assert_errors(
        "yaml_syntax.yaml",
        &[(5, DOCUMENT_KEY, "YAML syntax error")],
    );
}

#[test]
fn top_level_must_be_a_mapping() {
    assert_errors(
        "top_level_list.yaml",
        &[(1, DOCUMENT_KEY, "expected a mapping of keys, found a list")],
    );
}

#[test]
fn unknown_keys_are_rejected_with_the_allowed_keys() {
    assert_errors(
        "unknown_key.yaml",
        &[
            (
                2,
                "listn",
                "did you mean `listen`? allowed here: listen, admin_listen",
            ),
            (
                6,
                "routes[0].limt",
                "did you mean `limit`? allowed here: name, method, path",
            ),
        ],
    );
}

#[test]
fn duplicate_keys_are_rejected() {
    assert_errors(
        "duplicate_key.yaml",
        &[(
            8,
            "routes[0].limit",
            "duplicate key: it is also set at line 5",
        )],
    );
}

#[test]
fn merge_keys_are_rejected_without_knock_on_errors() {
    assert_errors(
        "merge_key.yaml",
        &[(9, "routes[1].<<", "merge keys (`<<`) are not supported")],
    );
}

#[test]
fn bad_durations_name_the_problem() {
    assert_errors(
        "bad_duration.yaml",
        &[
            (
                6,
                "routes[0].per",
                "\"1 minute\" is not a duration: spaces are not allowed",
            ),
            (
                7,
                "routes[0].lock",
                "\"10\" is not a duration: 10 has no unit",
            ),
            (
                8,
                "routes[0].max_wait",
                "\"-1s\" is not a duration: it is negative",
            ),
            (12, "routes[1].per", "unknown unit \"x\""),
            (
                13,
                "routes[1].lock",
                "expected a duration string with a unit",
            ),
        ],
    );
}

#[test]
fn zero_timeout_is_rejected() {
    assert_errors(
        "zero_timeout.yaml",
        &[(3, "timeouts.connect", "must be greater than zero")],
    );
}

#[test]
fn zero_client_body_timeout_is_rejected() {
    assert_errors(
        "zero_client_body.yaml",
        &[(3, "timeouts.client_body", "must be greater than zero")],
    );
}

#[test]
fn missing_limit_is_reported_at_the_route() {
    assert_errors(
        "missing_limit.yaml",
        &[(5, "routes[0].limit", "missing: every route needs `limit`")],
    );
}

#[test]
fn missing_upstream_is_reported() {
    assert_errors(
        "missing_upstream.yaml",
        &[(1, "upstream", "missing: the Zoho Cliq base URL")],
    );
}

#[test]
fn duplicate_route_name_points_at_the_first() {
    assert_errors(
        "duplicate_route_name.yaml",
        &[(
            9,
            "routes[1].name",
            "duplicate route name \"chats.post_message\": already used by routes[0] at line 7",
        )],
    );
}

#[test]
fn resolve_identity_with_every_key_loads() {
    let config = match Config::load(&fixture("resolve_mode.yaml")) {
        Ok(config) => config,
        Err(errors) => panic!("resolve_mode.yaml:\n{errors}"),
    };
    assert_eq!(
        config.identity,
        IdentityConfig::Resolve(ResolveConfig {
            url: "https://cliq.zoho.com/api/v2/me".parse().expect("uri"),
            user_field: "/data/zuid".into(),
            ttl: Duration::from_secs(30 * 60),
            negative_ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            cache_size: 5000,
            on_unreachable: OnIdentityError::Token,
            lookup_reserve: std::num::NonZeroU32::new(4),
        })
    );
    assert!(
        config.describe().contains(
            "identity resolve https://cliq.zoho.com/api/v2/me (ttl 30m, lookups 4 of 20 a window)"
        ),
        "{}",
        config.describe()
    );
}

#[test]
fn resolve_identity_needs_a_url() {
    assert_errors(
        "resolve_without_url.yaml",
        &[(3, "identity.url", "missing: mode resolve needs `url`")],
    );
}

#[test]
fn resolve_url_with_another_scheme_is_refused() {
    assert_errors(
        "resolve_bad_url.yaml",
        &[(
            4,
            "identity.url",
            "scheme \"ftp\" is not supported; use https:// (or http:// for tests)",
        )],
    );
}

#[test]
fn resolve_user_field_must_be_a_json_pointer() {
    assert_errors(
        "resolve_bad_user_field.yaml",
        &[(
            5,
            "identity.user_field",
            "\"data.zuid\" is not a JSON pointer (RFC 6901): it must start with '/', e.g. \"/data/zuid\"",
        )],
    );
}

#[test]
fn resolve_ttl_over_an_hour_is_refused() {
    assert_errors(
        "resolve_ttl_over_an_hour.yaml",
        &[(
            6,
            "identity.ttl",
            "2h is longer than 1h: Zoho access tokens live one hour",
        )],
    );
}

#[test]
fn resolve_zero_negative_ttl_is_refused() {
    assert_errors(
        "resolve_zero_negative_ttl.yaml",
        &[(6, "identity.negative_ttl", "must be greater than zero")],
    );
}

#[test]
fn resolve_on_unreachable_lists_the_allowed_values() {
    assert_errors(
        "resolve_bad_on_unreachable.yaml",
        &[(
            6,
            "identity.on_unreachable",
            "unknown value \"fallback\"; allowed: reject, token",
        )],
    );
}

#[test]
fn header_keys_under_mode_resolve_are_refused() {
    assert_errors(
        "header_keys_under_resolve.yaml",
        &[
            (
                6,
                "identity.header",
                "only used with `mode: header` (mode here is resolve)",
            ),
            (
                7,
                "identity.trusted_networks",
                "only used with `mode: header` (mode here is resolve)",
            ),
        ],
    );
}

#[test]
fn bad_trusted_networks_are_reported_per_entry() {
    assert_errors(
        "bad_trusted_networks.yaml",
        &[
            (
                7,
                "identity.trusted_networks[1]",
                "\"10.0.0.0/33\": the prefix length /33 is not a whole number from 0 to 32",
            ),
            (
                8,
                "identity.trusted_networks[2]",
                "\"not-an-ip\" is not an IP address or network",
            ),
        ],
    );
}

#[test]
fn empty_trusted_networks_are_refused() {
    assert_errors(
        "empty_trusted_networks.yaml",
        &[(
            5,
            "identity.trusted_networks",
            "the list is empty, so no caller could ever be trusted",
        )],
    );
}

#[test]
fn the_authorization_header_cannot_name_the_user() {
    assert_errors(
        "header_authorization.yaml",
        &[(
            4,
            "identity.header",
            "\"Authorization\" carries the caller's credential",
        )],
    );
}

#[test]
fn redis_store_with_every_key_loads() {
    let config = match Config::load(&fixture("redis_store.yaml")) {
        Ok(config) => config,
        Err(errors) => panic!("redis_store.yaml:\n{errors}"),
    };
    let StoreConfig::Redis(redis) = &config.store else {
        panic!("expected a redis store, got {:?}", config.store);
    };
    assert_eq!(
        redis.url,
        "rediss://cliq:hunter2-secret@redis.internal:6380/2"
    );
    assert_eq!(redis.on_error, OnStoreError::Local);
    assert_eq!(redis.replicas.get(), 3);
    assert_eq!(redis.timeout, Duration::from_millis(100));
    assert_eq!(redis.connect_timeout, Duration::from_secs(2));
    for shown in [
        config.describe(),
        format!("{config:?}"),
        format!("{config:#?}"),
    ] {
        assert!(!shown.contains("hunter2"), "the password leaks:\n{shown}");
        assert!(
            shown.contains("cliq:REDACTED@redis.internal:6380/2"),
            "{shown}"
        );
    }
}

#[test]
fn state_file_under_redis_is_refused() {
    assert_errors(
        "state_file_under_redis.yaml",
        &[(
            5,
            "store.state_file",
            "only used with `kind: memory`: the Redis store keeps its state in Redis",
        )],
    );
}

#[test]
fn state_file_in_a_missing_directory_is_reported_with_its_resolved_path() {
    let expected = fixture("no-such-dir").display().to_string();
    assert_errors(
        "state_file_missing_dir.yaml",
        &[(
            4,
            "store.state_file",
            &format!("no such directory: {expected}"),
        )],
    );
}

/// `assert_errors`, plus: no message (nor the errors' Debug form) holds `secret`.
fn assert_errors_without(name: &str, secret: &str, expected: &[(usize, &str, &str)]) {
    assert_errors(name, expected);
    let listing = match Config::load(&fixture(name)) {
        Ok(_) => unreachable!("checked by assert_errors"),
        Err(errors) => format!("{errors}\n{errors:?}"),
    };
    assert!(
        !listing.contains(secret),
        "{name}: {secret:?} leaks:\n{listing}"
    );
}

#[test]
fn a_short_admin_token_is_refused_without_being_quoted() {
    assert_errors_without(
        "admin_short_token.yaml",
        "tiny-Secret-42",
        &[(
            3,
            "admin.token",
            "is shorter than 16 characters; it guards the admin API",
        )],
    );
}

#[test]
fn misplaced_admin_secrets_are_reported_without_being_quoted() {
    for secret in ["4242424242424242424", "Misplaced-Secret-0001"] {
        assert_errors_without(
            "admin_token_misplaced.yaml",
            secret,
            &[
                (4, "admin.token", "expected a string, found a number"),
                (5, "admin", "unknown key (not quoted"),
            ],
        );
    }
}

#[test]
fn unknown_route_modes_list_the_allowed_ones() {
    assert_errors(
        "bad_route_mode.yaml",
        &[
            (
                3,
                "defaults.mode",
                "unknown value \"dry-run\"; allowed: enforce, shadow",
            ),
            (
                10,
                "routes[0].mode",
                "unknown value \"Shadow\"; allowed: enforce, shadow",
            ),
        ],
    );
}

#[test]
fn bad_validate_values_name_the_rule_sets_and_the_method_they_need() {
    assert_errors(
        "bad_validate.yaml",
        &[
            (
                3,
                "defaults.validate",
                "belongs to the route of the endpoint whose rules it names, not to `defaults`",
            ),
            (
                11,
                "routes[0].validate",
                "unknown value \"cliq.delete_message\"; allowed: cliq.delete_messages, \
                 cliq.forward_messages, cliq.search_messages, none",
            ),
            (
                18,
                "routes[1].validate",
                "cliq.forward_messages checks POST /api/v3/messages calls, but this route takes \
                 GET; set `method: POST` on the route",
            ),
        ],
    );
}

#[test]
fn reload_watch_must_be_a_boolean() {
    assert_errors(
        "bad_reload_watch.yaml",
        &[(
            3,
            "reload.watch",
            "expected true or false, found the string \"yes\"",
        )],
    );
}

/// `assert_errors`, plus: the fixture's password (`hunter2-secret`) is in no message.
fn assert_errors_without_password(name: &str, expected: &[(usize, &str, &str)]) {
    assert_errors_without(name, "hunter2", expected);
}

#[test]
fn redis_store_needs_a_url() {
    assert_errors(
        "redis_without_url.yaml",
        &[(3, "store.url", "missing: `kind: redis` needs `url`")],
    );
}

#[test]
fn redis_url_with_another_scheme_is_refused_without_its_password() {
    assert_errors_without_password(
        "redis_bad_scheme.yaml",
        &[(
            4,
            "store.url",
            "not a usable Redis URL: scheme \"http\" is not supported; use redis:// or rediss://",
        )],
    );
}

#[test]
fn redis_url_with_a_bad_database_is_refused_without_its_password() {
    assert_errors_without_password(
        "redis_bad_db.yaml",
        &[(
            4,
            "store.url",
            "the database \"cache\" is not a database number",
        )],
    );
}

#[test]
fn redis_url_with_a_bad_port_is_refused_without_its_password() {
    assert_errors_without_password(
        "redis_bad_port.yaml",
        &[(4, "store.url", "port \"99999\" is not a port number")],
    );
}

#[test]
fn redis_keys_under_a_memory_store_are_refused() {
    let why = "only used with `kind: redis` (this store is memory)";
    assert_errors(
        "redis_keys_under_memory.yaml",
        &[
            (4, "store.url", why),
            (5, "store.on_error", why),
            (6, "store.replicas", why),
            (7, "store.timeout", why),
            (8, "store.connect_timeout", why),
        ],
    );
}

#[test]
fn zero_replicas_are_refused() {
    assert_errors(
        "redis_zero_replicas.yaml",
        &[(6, "store.replicas", "must be at least 1, found 0")],
    );
}

#[test]
fn unknown_on_error_lists_the_allowed_values() {
    assert_errors(
        "redis_bad_on_error.yaml",
        &[(
            5,
            "store.on_error",
            "unknown value \"maybe\"; allowed: reject, local",
        )],
    );
}

#[test]
fn zero_redis_timeouts_are_refused() {
    assert_errors(
        "redis_zero_timeout.yaml",
        &[
            (5, "store.timeout", "must be greater than zero"),
            (6, "store.connect_timeout", "must be greater than zero"),
        ],
    );
}

#[test]
fn upstream_with_a_path_is_refused() {
    assert_errors("bad_upstream.yaml", &[(2, "upstream", "no path or query")]);
}

#[test]
fn missing_ca_file_is_reported_with_its_resolved_path() {
    let expected = fixture("no-such-ca.pem").display().to_string();
    assert_errors(
        "missing_ca_file.yaml",
        &[(2, "upstream_ca_file", &format!("no such file: {expected}"))],
    );
}

#[test]
fn bad_addresses_are_refused() {
    assert_errors(
        "bad_address.yaml",
        &[
            (2, "listen", "\"localhost:8080\" is not a socket address"),
            (
                3,
                "admin_listen",
                "\"127.0.0.1:99999\" is not a socket address",
            ),
        ],
    );
}

#[test]
fn header_mode_needs_a_valid_header_name() {
    assert_errors(
        "header_mode_without_header.yaml",
        &[(3, "identity.header", "missing: mode header needs `header`")],
    );
    assert_errors(
        "bad_header_name.yaml",
        &[(
            4,
            "identity.header",
            "\"X Cliq User\" is not a valid HTTP header name",
        )],
    );
}

#[test]
fn bad_path_templates_are_reported_per_list_item() {
    assert_errors(
        "bad_template.yaml",
        &[
            (
                6,
                "routes[0].path[1]",
                "segment \"{chat_id}x\" must be a whole {name} placeholder",
            ),
            (7, "routes[0].path[2]", "must start with '/'"),
        ],
    );
}

#[test]
fn a_route_hidden_by_an_earlier_route_is_refused() {
    assert_errors(
        "hidden_route.yaml",
        &[(
            11,
            "routes[1].path",
            "can never match: route \"messages.any\" (line 7) comes first",
        )],
    );
}

#[test]
fn bad_enum_values_list_the_allowed_ones() {
    assert_errors(
        "bad_enum.yaml",
        &[
            (
                2,
                "unmatched",
                "unknown value \"drop\"; allowed: forward, reject",
            ),
            (
                4,
                "log.format",
                "unknown value \"text\"; allowed: pretty, json",
            ),
            (
                7,
                "routes[0].method",
                "unknown method \"FETCH\"; allowed: GET, HEAD, POST",
            ),
            (
                12,
                "routes[0].on_limit",
                "unknown value \"wait\"; allowed: queue, reject",
            ),
            (
                13,
                "routes[0].algorithm",
                "unknown value \"token_bucket\"; allowed: window, gcra",
            ),
        ],
    );
}

#[test]
fn wrong_types_say_what_was_found() {
    assert_errors(
        "wrong_type.yaml",
        &[
            (2, "safety_margin", "found the integer 1"),
            (
                3,
                "identity",
                "expected a mapping of keys, found the string \"token\"",
            ),
            (
                7,
                "routes[0].limit",
                "expected a whole number, found the string \"twenty\"",
            ),
            (
                10,
                "routes[1]",
                "expected a mapping of keys, found the string \"just a string\"",
            ),
        ],
    );
}

#[test]
fn zero_negative_float_and_huge_numbers_are_refused() {
    assert_errors(
        "bad_numbers.yaml",
        &[
            (3, "queue.max_per_user", "must be at least 1, found 0"),
            (4, "queue.max_total", "must be at least 1, found -5"),
            (
                8,
                "routes[0].limit",
                "expected a whole number, found the number 2.5",
            ),
            (13, "routes[1].limit", "99999999999 is too large"),
        ],
    );
}

#[test]
fn bad_sizes_are_refused() {
    assert_errors(
        "bad_sizes.yaml",
        &[
            (
                3,
                "http.max_header_bytes",
                "must be at least 1024 bytes, found 512",
            ),
            (4, "http.max_body_bytes", "\"64KB\" is not a size"),
        ],
    );
}

#[test]
fn gcra_burst_over_limit_is_refused() {
    assert_errors(
        "gcra_burst_over_limit.yaml",
        &[(9, "routes[0].burst", "burst 6 must be at most limit 5")],
    );
}

#[test]
fn every_error_in_a_file_is_reported_at_once() {
    assert_errors(
        "many_errors.yaml",
        &[
            (2, "listen", "\"0.0.0.0\" is not a socket address"),
            (3, "upstream", "scheme \"ftp\" is not supported"),
            (4, "safety_margin", "spaces are not allowed"),
            (6, "identity.url", "missing: mode resolve needs `url`"),
            (
                6,
                "identity.user_field",
                "missing: mode resolve needs `user_field`",
            ),
            (8, "store.state_file", "no such directory"),
            (12, "defaults.name", "belongs to each route"),
            (17, "routes[0].limit", "must be at least 1, found 0"),
            (20, "routes[1].name", "use only letters, digits"),
            (21, "routes[1].path", "must be a whole {name} placeholder"),
            (25, "routes[1].colour", "unknown key"),
            (26, "routes[2].name", "already used by routes[0] at line 14"),
            (26, "routes[2].limit", "missing: every route needs `limit`"),
        ],
    );
}

#[test]
fn errors_display_as_line_key_message() {
    let errors = match Config::load(&fixture("gcra_burst_over_limit.yaml")) {
        Ok(_) => panic!("should be refused"),
        Err(errors) => errors,
    };
    assert_eq!(
        errors.to_string(),
        "line 9: routes[0].burst: burst 6 must be at most limit 5"
    );
}
