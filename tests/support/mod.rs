//! Shared support for end-to-end tests: a Zoho-like stub upstream that enforces and records
//! per-(route, user) quotas, a bounded HTTP client, and a Prometheus text reader.
//!
//! Use from a test file with `mod support;` then e.g.
//! ```ignore
//! use support::*;
//! let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, "/api/v3/chats/{chat_id}/message",
//!     20, Duration::from_secs(60), Duration::from_secs(600))]).await;
//! // ... start the proxy with `upstream: stub.url()` ...
//! let answer = Client::new().post(&format!("http://{proxy}/api/v3/chats/C1/message"), "alice", "{}").await;
//! assert_eq!(stub.violations(), 0);
//! assert!(stub.max_in_any_window("/api/v3/chats/{chat_id}/message", "alice", per) <= 20);
//! ```
// Each test binary compiles its own copy of this module and uses a different subset of it.
#![allow(dead_code, unused_imports)]

mod binary;
mod client;
mod metrics;
mod proxy;
mod redis;
mod stub;
mod window;

pub use binary::{gate_config, post_route, run_to_exit, write_config, Finished, Gate, Spawned};
pub use client::{
    raw_exchange, request, scrape, wait_for, Client, ClientError, TestResponse, CLIENT_TIMEOUT,
    POLL_INTERVAL,
};
pub use metrics::{metric_sum, metric_value, parse_sample, Sample};
pub use proxy::{base_url, config_yaml, start_proxy};
pub use redis::RedisServer;
pub use stub::{
    credential, gzipped, Arrival, FixedResponse, Outcome, Responder, StubRoute, ThrottleShape,
    UserKey, UserKeyFn, ZohoStub,
};
pub use window::{max_in_any_window, template_matches, Quota, Verdict};

// Re-exported so test files need not import them separately for the common calls above.
pub use bytes::Bytes;
pub use http::{Method, StatusCode};
pub use std::time::Duration;
pub use tokio::time::Instant;
