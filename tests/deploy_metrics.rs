//! The shipped dashboard (deploy/grafana/cliqgate.json) and rules (deploy/prometheus/alerts.yml)
//! read only what a running cliqgate exposes.
//!
//! Every `cliqgate_*` series their PromQL names must be in the real binary's `/metrics`, with
//! every label the query filters or groups by; recording rules (`level:metric:operations`) the
//! dashboard reads must be defined in alerts.yml. `up` and PromQL's functions are Prometheus's
//! own. The binary runs behind the Zoho stub with traffic that makes every labelled series
//! exist (a forwarded, a delayed, a refused and a throttled call, reloads that succeed and fail)
//! and, for `cliqgate_store_errors_total`, a second binary whose Redis is unreachable.
//!
//! A misspelt metric or label fails `shipped_dashboard_and_alerts_name_only_exposed_metrics`;
//! `checker_reports_misspelt_metrics_and_labels` shows that it would.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use saphyr::{LoadableYamlNode, Yaml};
use support::*;

const DASHBOARD: &str = include_str!("../deploy/grafana/cliqgate.json");
const ALERTS: &str = include_str!("../deploy/prometheus/alerts.yml");

/// Upper bound on a signal's or a Redis failure's effect showing in `/metrics`.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on the exit after SIGTERM (the configs' drain deadline is shorter).
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Labels Prometheus attaches to every scraped series (target labels).
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const CHANNEL: &str = "/api/v3/channelsbyname/{channel}/message";
const SEARCH: &str = "/api/v3/messages/search";
const PER: Duration = Duration::from_secs(60);
const LOCK: Duration = Duration::from_secs(600);

/// (where, PromQL) pairs.
type Queries = Vec<(String, String)>;
/// A series or recording rule's name -> the label names it carries.
type LabelsByName = BTreeMap<String, BTreeSet<String>>;

// ---- What the queries name --------------------------------------------------------------------

/// One metric named in a query, and the labels the query matches it on.
#[derive(Debug, PartialEq)]
struct Selector {
    name: String,
    labels: BTreeSet<String>,
}

/// What one PromQL expression reads: metric selectors, and the labels it groups by (`by (...)`,
/// `without (...)`, `on (...)`, `ignoring (...)`, `group_left/right (...)`).
#[derive(Debug, Default, PartialEq)]
struct Reads {
    selectors: Vec<Selector>,
    grouping: BTreeSet<String>,
}

/// A small PromQL reader: enough to find metric names, label matchers and grouping labels.
/// String literals and `[...]` ranges are skipped (Grafana's `$__rate_interval` lives there).
fn reads(expr: &str) -> Reads {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Reads::default();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            // A number (and any unit or exponent glued to it): never a name.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            let opens = |ch: char| next < chars.len() && chars[next] == ch;
            if matches!(
                ident.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) && opens('(')
            {
                let (labels, end) = label_list(&chars, next + 1);
                out.grouping.extend(labels);
                i = end;
            } else if opens('(') {
                // A function or an aggregation: its arguments are read in turn.
            } else if opens('{') {
                let (labels, end) = matcher_labels(&chars, next + 1);
                out.selectors.push(Selector {
                    name: ident,
                    labels,
                });
                i = end;
            } else if !is_keyword(&ident) {
                out.selectors.push(Selector {
                    name: ident,
                    labels: BTreeSet::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

fn is_keyword(ident: &str) -> bool {
    matches!(
        ident,
        "and" | "or" | "unless" | "offset" | "bool" | "inf" | "Inf" | "nan" | "NaN"
    )
}

/// Index just past the string literal starting at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// `a, b)` -> the names and the index past `)`.
fn label_list(chars: &[char], mut i: usize) -> (Vec<String>, usize) {
    let mut labels = Vec::new();
    let mut current = String::new();
    while i < chars.len() && chars[i] != ')' {
        if chars[i] == ',' {
            labels.push(std::mem::take(&mut current));
        } else if !chars[i].is_whitespace() {
            current.push(chars[i]);
        }
        i += 1;
    }
    labels.push(current);
    labels.retain(|l| !l.is_empty());
    (labels, i + 1)
}

/// `a="x", b=~"y"}` -> the label names and the index past `}`.
fn matcher_labels(chars: &[char], mut i: usize) -> (BTreeSet<String>, usize) {
    let mut labels = BTreeSet::new();
    let mut current = String::new();
    while i < chars.len() && chars[i] != '}' {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(chars, i);
            continue;
        }
        if "=!~".contains(c) {
            if !current.is_empty() {
                labels.insert(std::mem::take(&mut current));
            }
        } else if c == ',' || c.is_whitespace() {
            current.clear();
        } else {
            current.push(c);
        }
        i += 1;
    }
    (labels, i + 1)
}

// ---- Where the queries are ---------------------------------------------------------------------

/// (where, PromQL) of every dashboard query: panel targets and the variables' label_values().
fn dashboard_queries() -> Queries {
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("deploy/grafana/cliqgate.json is JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((
                    format!("panel {:?}", panel["title"].as_str().unwrap_or("")),
                    expr.to_owned(),
                ));
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or("");
        if let Some(inner) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.rsplit_once(','))
        {
            out.push((
                format!("variable {:?}", variable["name"].as_str().unwrap_or("")),
                inner.0.into(),
            ));
        }
    }
    out
}

/// (where, PromQL) of every rule in alerts.yml, and each recording rule's name with the labels
/// its series carry (its outermost `by (...)`).
fn alert_rules() -> (Queries, LabelsByName) {
    let docs = Yaml::load_from_str(ALERTS).expect("deploy/prometheus/alerts.yml is YAML");
    let mut exprs = Vec::new();
    let mut recorded = BTreeMap::new();
    let groups = docs[0]
        .as_mapping_get("groups")
        .and_then(Yaml::as_sequence)
        .expect("groups");
    for group in groups {
        for rule in group
            .as_mapping_get("rules")
            .and_then(Yaml::as_sequence)
            .expect("rules")
        {
            let text = |key: &str| rule.as_mapping_get(key).and_then(Yaml::as_str);
            let expr = text("expr").expect("every rule has an expr").to_owned();
            let name = text("alert")
                .or(text("record"))
                .expect("alert or record")
                .to_owned();
            if text("record").is_some() {
                recorded.insert(name.clone(), reads(&expr).grouping);
            }
            exprs.push((format!("alerts.yml rule {name}"), expr));
        }
    }
    (exprs, recorded)
}

// ---- What /metrics has -------------------------------------------------------------------------

/// Every series name in the exposition, with the label names seen on it.
fn exposed(metrics_text: &str) -> LabelsByName {
    let mut out = LabelsByName::new();
    for sample in metrics_text.lines().filter_map(parse_sample) {
        out.entry(sample.name)
            .or_default()
            .extend(sample.labels.into_iter().map(|(k, _)| k));
    }
    out
}

/// Every problem with `queries`: a `cliqgate_*` series `/metrics` does not have, a label it does
/// not carry, a recording rule alerts.yml does not define.
fn problems(
    queries: &[(String, String)],
    series: &LabelsByName,
    recorded: &LabelsByName,
) -> Vec<String> {
    let mut out = Vec::new();
    for (place, expr) in queries {
        let read = reads(expr);
        // The labels this expression's inputs carry, for its grouping clauses.
        let mut available: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for selector in &read.selectors {
            let labels = if selector.name.contains(':') {
                match recorded.get(&selector.name) {
                    Some(labels) => labels,
                    None => {
                        out.push(format!(
                            "{place}: reads {}, which alerts.yml does not record",
                            selector.name
                        ));
                        continue;
                    }
                }
            } else if selector.name.starts_with("cliqgate_") {
                match series.get(&selector.name) {
                    Some(labels) => labels,
                    None => {
                        out.push(format!(
                            "{place}: {} is not in cliqgate's /metrics",
                            selector.name
                        ));
                        continue;
                    }
                }
            } else {
                // Prometheus's own (`up`): nothing of cliqgate's to check.
                continue;
            };
            for label in &selector.labels {
                if !labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    out.push(format!(
                        "{place}: {} has no label {label:?} (it has {labels:?})",
                        selector.name
                    ));
                }
            }
            available.extend(labels.iter().cloned());
        }
        for label in &read.grouping {
            if !available.contains(label) {
                out.push(format!(
                    "{place}: groups by {label:?}, which none of its inputs carries"
                ));
            }
        }
    }
    out
}

// ---- The running binary ------------------------------------------------------------------------

/// The memory-store binary behind the stub, after traffic that makes every labelled series exist.
async fn scrape_after_traffic() -> String {
    // The stub allows one search per window where cliqgate allows five: the second search reaches
    // Zoho over its quota, as if another client had used it, and comes back throttled.
    let stub = ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, 10, PER, LOCK),
        StubRoute::new(Method::POST, CHANNEL, 10, PER, LOCK),
        StubRoute::new(Method::GET, SEARCH, 1, PER, LOCK),
    ])
    .await;
    let routes = |channel_limit: u32| {
        format!(
            "routes:\n{}{}  - name: messages.search\n    method: GET\n    path: \"{SEARCH}\"\n    limit: 5\n    per: \"60s\"\n    lock: \"600s\"\n    on_limit: reject\n",
            // One call per second, queued up to 5 s: the second of two calls is delayed.
            post_route("chats.post_message", CHAT, 1, Duration::from_secs(1), LOCK,
                "    on_limit: queue\n    max_wait: \"5s\"\n"),
            post_route("channels.post_message", CHANNEL, channel_limit, PER, LOCK,
                "    on_limit: reject\n"),
        )
    };
    let yaml = |channel_limit| {
        gate_config(
            &stub.url(),
            "info",
            "5s",
            &format!("safety_margin: \"100ms\"\n{}", routes(channel_limit)),
        )
    };
    let mut gate = Gate::start(&yaml(1)).await;
    let client = Client::new();

    let chat = gate.url("/api/v3/chats/C1/message");
    let (first, second) = tokio::join!(
        client.post(&chat, "alice", "{}"),
        client.post(&chat, "alice", "{}")
    );
    assert_eq!(
        (first.status, second.status),
        (StatusCode::OK, StatusCode::OK)
    );
    let channel = gate.url("/api/v3/channelsbyname/ops/message");
    assert_eq!(
        client.post(&channel, "alice", "{}").await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.post(&channel, "alice", "{}").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let search = gate.url("/api/v3/messages/search?query=x");
    assert_eq!(client.get(&search, "bob").await.status, StatusCode::OK);
    // Throttled by the stub (passed on as it came), then locked by cliqgate.
    assert_eq!(
        client.get(&search, "bob").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        client.get(&search, "bob").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // A reload that takes, and one that is refused.
    gate.rewrite_config(&yaml(2));
    gate.signal("HUP");
    wait_for_metric(
        &gate,
        "cliqgate_config_reloads_total",
        ("result", "success"),
    )
    .await;
    gate.rewrite_config("routes: [\n");
    gate.signal("HUP");
    wait_for_metric(
        &gate,
        "cliqgate_config_reloads_total",
        ("result", "failure"),
    )
    .await;

    let metrics = scrape(gate.admin_addr).await;
    assert_eq!(
        metric_value(
            &metrics,
            "cliqgate_upstream_throttled_total",
            &[("route", "messages.search")]
        ),
        Some(1.0),
        "the stub's throttle was seen:\n{metrics}"
    );
    gate.signal("TERM");
    assert_eq!(gate.exit(EXIT_TIMEOUT).await.code(), Some(0));
    metrics
}

/// A binary whose Redis store is unreachable: `cliqgate_store_errors_total` gets its series.
async fn scrape_with_store_errors() -> String {
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, 10, PER, LOCK)]).await;
    // A loopback port with nobody behind it: bound, noted, closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let store = format!(
        "store:\n  kind: redis\n  url: \"redis://127.0.0.1:{closed}/0\"\n  on_error: local\n  replicas: 1\n"
    );
    let route = post_route(
        "chats.post_message",
        CHAT,
        5,
        PER,
        LOCK,
        "    on_limit: reject\n",
    );
    let mut gate = Gate::start(&gate_config(
        &stub.url(),
        "info",
        "5s",
        &format!("{store}routes:\n{route}"),
    ))
    .await;
    // Whatever Redis says (nothing), the call is answered: on_error local.
    let _ = Client::new()
        .post(&gate.url("/api/v3/chats/C1/message"), "alice", "{}")
        .await;
    let admin = gate.admin_addr;
    wait_for("a store error in /metrics", SETTLE_TIMEOUT, || async move {
        metric_sum(&scrape(admin).await, "cliqgate_store_errors_total", &[]) > 0.0
    })
    .await;
    let metrics = scrape(admin).await;
    gate.signal("TERM");
    assert_eq!(gate.exit(EXIT_TIMEOUT).await.code(), Some(0));
    metrics
}

async fn wait_for_metric(gate: &Gate, name: &str, label: (&str, &str)) {
    let admin = gate.admin_addr;
    wait_for(
        &format!("{name}{{{}={:?}}} in /metrics", label.0, label.1),
        SETTLE_TIMEOUT,
        || async move { metric_value(&scrape(admin).await, name, &[label]).is_some() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_dashboard_and_alerts_name_only_exposed_metrics() {
    let (traffic, store_errors) = tokio::join!(scrape_after_traffic(), scrape_with_store_errors());
    let series = exposed(&format!("{traffic}\n{store_errors}"));
    let (alert_exprs, recorded) = alert_rules();
    let dashboard = dashboard_queries();

    // The files do name cliqgate's metrics (an empty or misread file would pass vacuously).
    let named: BTreeSet<String> = dashboard
        .iter()
        .chain(&alert_exprs)
        .flat_map(|(_, expr)| reads(expr).selectors)
        .map(|s| s.name)
        .filter(|n| n.starts_with("cliqgate_"))
        .collect();
    for wanted in [
        "cliqgate_requests_total",
        "cliqgate_upstream_throttled_total",
        "cliqgate_upstream_duration_seconds_bucket",
        "cliqgate_queue_depth",
        "cliqgate_queue_wait_seconds_bucket",
        "cliqgate_locks_active",
        "cliqgate_store_errors_total",
    ] {
        assert!(
            named.contains(wanted),
            "{wanted} is not read; read: {named:?}"
        );
    }
    assert!(recorded.len() >= 3, "alerts.yml records {recorded:?}");

    let mut found = problems(&alert_exprs, &series, &recorded);
    found.extend(problems(&dashboard, &series, &recorded));
    assert!(
        found.is_empty(),
        "the shipped dashboard/alerts read what cliqgate does not expose:\n  {}\n\nexposed: {:?}",
        found.join("\n  "),
        series.keys().collect::<Vec<_>>()
    );
}

#[test]
fn checker_reports_misspelt_metrics_and_labels() {
    let text = "# TYPE cliqgate_requests counter\n\
        cliqgate_requests_total{route=\"a\",decision=\"forwarded\"} 1\n\
        cliqgate_queue_wait_seconds_bucket{route=\"a\",le=\"0.5\"} 1\n";
    let series = exposed(text);
    let recorded = BTreeMap::from([(
        "job_route:cliqgate_requests:rate1m".to_string(),
        BTreeSet::from(["job".to_string(), "route".to_string()]),
    )]);
    let check = |expr: &str| problems(&[("q".into(), expr.into())], &series, &recorded);

    // Correct queries pass, Grafana variables, ranges and strings included.
    assert_eq!(
        check(
            r#"sum by (route, decision) (rate(cliqgate_requests_total{route=~"$route", decision!="x"}[$__rate_interval])) > 0.05"#
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        check(
            r#"histogram_quantile(0.99, sum by (le) (rate(cliqgate_queue_wait_seconds_bucket[5m]))) or up{job="cliqgate_x"} == 0"#
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        check(r#"sum by (route) (job_route:cliqgate_requests:rate1m{job=~"$job"})"#),
        Vec::<String>::new()
    );
    // A misspelt metric, label, grouping label or recording rule each fail.
    assert_eq!(check("rate(cliqgate_request_total[5m])").len(), 1);
    assert_eq!(check(r#"cliqgate_requests_total{rout="a"}"#).len(), 1);
    assert_eq!(check("sum by (decison) (cliqgate_requests_total)").len(), 1);
    assert_eq!(check("job_route:cliqgate_request:rate1m").len(), 1);
    assert_eq!(
        check("sum by (decision) (job_route:cliqgate_requests:rate1m)").len(),
        1
    );
}

#[test]
fn promql_reader_finds_names_matchers_and_grouping() {
    let read = reads(
        r#"increase(cliqgate_x_total{result="failure", a=~"b,c}"}[10m]) > 0 or (cliqgate_x_total unless cliqgate_y offset 10m) / on (instance) group_left (route) up"#,
    );
    let names: Vec<&str> = read.selectors.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["cliqgate_x_total", "cliqgate_x_total", "cliqgate_y", "up"]
    );
    assert_eq!(
        read.selectors[0].labels,
        BTreeSet::from(["result".to_string(), "a".to_string()])
    );
    assert_eq!(
        read.grouping,
        BTreeSet::from(["instance".to_string(), "route".to_string()])
    );
}
