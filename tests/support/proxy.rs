//! Starting the real proxy (the library's `app::start`) on 127.0.0.1:0 for end-to-end tests.

use cliqgate::app::Running;
use cliqgate::config::Config;

/// A config with loopback listeners on port 0 in front of `upstream`, plus `rest` (YAML lines
/// appended verbatim: `safety_margin`, `defaults`, `routes`, ...).
pub fn config_yaml(upstream: &str, rest: &str) -> String {
    format!(
        "listen: \"127.0.0.1:0\"\nadmin_listen: \"127.0.0.1:0\"\nupstream: \"{upstream}\"\nlog:\n  level: \"warn\"\n{rest}"
    )
}

/// Parses `yaml` (panicking with every config error if it is invalid) and starts the proxy.
pub async fn start_proxy(yaml: &str) -> Running {
    let config = match Config::from_yaml(yaml) {
        Ok(config) => config,
        Err(errors) => panic!("test config is invalid:\n{errors}\n---\n{yaml}"),
    };
    cliqgate::app::start(config)
        .await
        .expect("proxy starts on 127.0.0.1:0")
}

/// `http://ADDR` of a running proxy.
pub fn base_url(running: &Running) -> String {
    format!("http://{}", running.proxy_addr)
}
