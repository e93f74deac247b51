//! Reading samples out of Prometheus / OpenMetrics text exposition.
//!
//! Just enough of the format (https://prometheus.io/docs/instrumenting/exposition_formats/) to
//! find one sample: `name{label="value",...} value [timestamp] [# exemplar]`, with `\\`, `\"` and
//! `\n` escapes in label values. Comment lines (`# HELP`, `# TYPE`, `# EOF`) are skipped.

/// The value of the first sample named exactly `name` whose labels include every pair in
/// `labels` (it may have more). `None` if there is none.
pub fn metric_value(metrics_text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(metrics_text, name, labels).next()
}

/// The sum of every such sample, e.g. a counter over all `decision`s of one route. `0.0` if none.
pub fn metric_sum(metrics_text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(metrics_text, name, labels).sum()
}

fn samples<'a>(
    text: &'a str,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter_map(parse_sample)
        .filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|sample| sample.value)
}

/// One parsed sample line.
#[derive(Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses one exposition line; `None` for comments, blank lines and anything malformed (a
/// malformed line then simply never matches, and the test's assertion on it fails).
pub fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // The value is the first token; a timestamp or exemplar may follow.
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (the opening brace already consumed); returns the pairs and the text
/// after the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = s.split_once('=')?;
        let mut chars = after_key.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        s = &after_key[1 + end + 1..];
    }
}
