//! Path templates -> a compiled route table. Pure: no HTTP types beyond `Method`.

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
    for segment in template.split('/').skip(1) {
        if segment.contains(['{', '}']) {
            let name = segment
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if name.is_none() {
                return Err(format!(
                    "path template {template:?}: segment {segment:?} must be a whole {{name}} placeholder"
                ));
            }
        }
    }
    Ok(())
}
