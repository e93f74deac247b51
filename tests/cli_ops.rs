//! The real binary under operations (issue 5): SIGHUP reloads, a refused reload, the file watch,
//! shadow routes in the access log, and SIGTERM with calls still queued.
//!
//! Every test runs `target/.../cliqgate` as a child process (killed if the test fails) with its
//! config in a temp dir, parses its JSON logs, and bounds every wait on it.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_cliqgate");

/// Upper bound on the binary logging `cliqgate listening` after spawn. Generous for a loaded CI
/// machine, far below a CI job's timeout.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on a reload (signal or file change) showing in `/metrics`: the signal is handled
/// at once, the watch debounces for 300 ms.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on exiting after SIGTERM: the test configs' drain deadline is shorter.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on reading the rest of the child's output once it has exited.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const CHAT_ROUTE: &str = "chats.post_message";
const CHANNEL: &str = "/api/v3/channelsbyname/{channel}/message";
const CHANNEL_ROUTE: &str = "channels.post_message";
/// Zoho's (and the routes') window: long, so no window ends during a test and every count is
/// exact.
const PER: Duration = Duration::from_secs(60);
const LOCK: Duration = Duration::from_secs(600);

/// A child process of the binary, its output collected line by line as it comes. Killed on
/// drop, so a failing test leaves nothing running.
struct Spawned {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect_lines(
    stream: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            into.lock().expect("output lines").push(line);
        }
    })
}

impl Spawned {
    fn new(config: &Path) -> Spawned {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cliqgate");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![collect_lines(
            child.stderr.take().expect("piped stderr"),
            stderr.clone(),
        )];
        Spawned {
            child,
            stderr,
            readers,
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll cliqgate")
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().expect("output lines").join("\n")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The running proxy binary, its config file and the addresses it logged.
struct Gate {
    process: Spawned,
    config: PathBuf,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Gate {
    async fn start(yaml: &str) -> Gate {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("cliqgate.yaml");
        std::fs::write(&config, yaml).expect("write the test config");
        let mut process = Spawned::new(&config);
        let give_up = Instant::now() + START_TIMEOUT;
        let listening = loop {
            let found = events_of(&process)
                .into_iter()
                .find(|event| event["message"] == "cliqgate listening");
            if let Some(event) = found {
                break event;
            }
            if let Some(status) = process.try_wait() {
                panic!(
                    "cliqgate exited ({status}) before listening:\n{}",
                    process.stderr_text()
                );
            }
            assert!(
                Instant::now() < give_up,
                "cliqgate did not log `cliqgate listening` within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let addr = |field: &str| -> SocketAddr {
            listening[field]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no {field} in {listening}"))
        };
        Gate {
            proxy_addr: addr("proxy_addr"),
            admin_addr: addr("admin_addr"),
            process,
            config,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy_addr)
    }

    /// Replaces the config file the way editors and ConfigMaps do: a new file renamed over it.
    fn rewrite_config(&self, yaml: &str) {
        let next = self.config.with_extension("yaml.next");
        std::fs::write(&next, yaml).expect("write the new config");
        std::fs::rename(&next, &self.config).expect("replace the config");
    }

    /// Sends `SIGHUP`, `SIGTERM`, ... with the `kill` command.
    fn signal(&self, name: &str) {
        let pid = self.process.child.id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.process.try_wait() {
            panic!(
                "cliqgate exited ({status}):\n{}",
                self.process.stderr_text()
            );
        }
    }

    /// Waits (bounded) for the process to exit, then (bounded) for the rest of its output.
    async fn exit(&mut self, within: Duration) -> ExitStatus {
        let give_up = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.process.try_wait() {
                break status;
            }
            if Instant::now() >= give_up {
                panic!(
                    "cliqgate did not exit within {within:?}:\n{}",
                    self.process.stderr_text()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let give_up = Instant::now() + OUTPUT_DRAIN_TIMEOUT;
        while !self.process.readers.iter().all(JoinHandle::is_finished) {
            assert!(
                Instant::now() < give_up,
                "the child's output did not end after it exited"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        status
    }

    fn events(&self) -> Vec<serde_json::Value> {
        events_of(&self.process)
    }

    /// Access-log events (target `cliqgate::access`) for `route`, in order.
    fn access_log(&self, route: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|event| event["target"] == "cliqgate::access" && event["route"] == route)
            .collect()
    }

    /// Waits until a JSON log event matching `wanted` has been read from stderr (the metric for
    /// an event may be visible before its log line is).
    async fn wait_for_event(&self, what: &str, wanted: impl Fn(&serde_json::Value) -> bool) {
        let wanted = &wanted;
        wait_for(what, RELOAD_TIMEOUT, || async move {
            self.events().iter().any(wanted)
        })
        .await;
    }

    /// Waits until `/metrics` counts `n` reloads with this `result`.
    async fn wait_for_reloads(&self, result: &str, n: f64) {
        let admin = self.admin_addr;
        wait_for(
            &format!("{n} config reload(s) with result {result}"),
            RELOAD_TIMEOUT,
            || async move { reloads(&scrape(admin).await, result) >= n },
        )
        .await;
    }
}

/// Every stderr line that is a JSON event.
fn events_of(process: &Spawned) -> Vec<serde_json::Value> {
    process
        .stderr
        .lock()
        .expect("output lines")
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn reloads(metrics: &str, result: &str) -> f64 {
    metric_value(
        metrics,
        "cliqgate_config_reloads_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

/// A config with JSON logs (info: the access log), ephemeral listeners, `top` lines (e.g.
/// `reload:`) and a reject-mode chat route allowing `limit` calls per [`PER`], plus `more` routes.
fn gate_yaml(upstream: &str, top: &str, limit: u32, more: &str) -> String {
    format!(
        r#"listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
upstream: "{upstream}"
log:
  format: json
  level: "info"
timeouts:
  shutdown: "5s"
{top}routes:
  - name: {CHAT_ROUTE}
    method: POST
    path: "{CHAT}"
    limit: {limit}
    per: "{per}s"
    lock: "{lock}s"
    on_limit: reject
{more}"#,
        per = PER.as_secs(),
        lock = LOCK.as_secs()
    )
}

/// `n` calls one after the other from `user`; their statuses in order.
async fn statuses(client: &Client, url: &str, user: &str, n: usize) -> Vec<StatusCode> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(client.post(url, user, r#"{"text":"hi"}"#).await.status);
    }
    out
}

/// `ok` times 200 then `refused` times 429.
fn ok_then_429(ok: usize, refused: usize) -> Vec<StatusCode> {
    let mut out = vec![StatusCode::OK; ok];
    out.extend(vec![StatusCode::TOO_MANY_REQUESTS; refused]);
    out
}

async fn chat_stub() -> ZohoStub {
    ZohoStub::start(vec![
        StubRoute::new(Method::POST, CHAT, 10, PER, LOCK),
        StubRoute::new(Method::POST, CHANNEL, 10, PER, LOCK),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_file_and_refuses_a_bad_one_without_stopping() {
    const OLD: u32 = 2;
    const NEW: u32 = 4;
    let stub = chat_stub().await;
    let mut gate = Gate::start(&gate_yaml(&stub.url(), "", OLD, "")).await;
    let client = Client::new();
    let chat = gate.url("/api/v3/chats/C1/message");

    assert_eq!(
        statuses(&client, &chat, "alice", 3).await,
        ok_then_429(2, 1)
    );

    // A new limit in the file, then SIGHUP.
    gate.rewrite_config(&gate_yaml(&stub.url(), "", NEW, ""));
    gate.signal("HUP");
    gate.wait_for_reloads("success", 1.0).await;
    gate.wait_for_event("config reloaded", |e| e["message"] == "config reloaded")
        .await;
    // In effect for a fresh user, and for alice on top of the two calls she already made.
    assert_eq!(statuses(&client, &chat, "bob", 5).await, ok_then_429(4, 1));
    assert_eq!(
        statuses(&client, &chat, "alice", 3).await,
        ok_then_429(2, 1)
    );

    // A broken file: refused, logged, counted; the process keeps running on the old config.
    std::fs::write(&gate.config, "routes: [\n  - name: x\n").expect("break the config");
    gate.signal("HUP");
    gate.wait_for_reloads("failure", 1.0).await;
    gate.assert_running();
    gate.wait_for_event("an ERROR log line for the refused reload", |e| {
        e["level"] == "ERROR"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("reload refused"))
    })
    .await;
    assert_eq!(
        statuses(&client, &chat, "carol", 5).await,
        ok_then_429(NEW as usize, 1)
    );
    let metrics = scrape(gate.admin_addr).await;
    assert_eq!(reloads(&metrics, "success"), 1.0);
    assert_eq!(reloads(&metrics, "failure"), 1.0);
    assert_eq!(stub.violations(), 0);

    gate.signal("TERM");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_config_file_reloads_without_a_signal() {
    const OLD: u32 = 1;
    const NEW: u32 = 3;
    let stub = chat_stub().await;
    let watch = "reload:\n  watch: true\n";
    let mut gate = Gate::start(&gate_yaml(&stub.url(), watch, OLD, "")).await;
    // The watch is set up just after `cliqgate listening`; a change before it would be missed.
    gate.wait_for_event("the config watch to be set up", |e| {
        e["message"] == "watching the config file for changes"
    })
    .await;
    let client = Client::new();
    let chat = gate.url("/api/v3/chats/C1/message");
    assert_eq!(
        statuses(&client, &chat, "alice", 2).await,
        ok_then_429(1, 1)
    );

    gate.rewrite_config(&gate_yaml(&stub.url(), watch, NEW, ""));
    gate.wait_for_reloads("success", 1.0).await;
    assert_eq!(statuses(&client, &chat, "bob", 4).await, ok_then_429(3, 1));

    // A broken edit is refused like a broken SIGHUP reload.
    gate.rewrite_config("routes: [\n");
    gate.wait_for_reloads("failure", 1.0).await;
    gate.assert_running();
    assert_eq!(
        statuses(&client, &chat, "carol", 4).await,
        ok_then_429(3, 1)
    );

    gate.signal("TERM");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_route_forwards_and_logs_what_it_would_have_done() {
    let stub = chat_stub().await;
    let shadow = format!(
        "  - name: {CHANNEL_ROUTE}\n    method: POST\n    path: \"{CHANNEL}\"\n    limit: 1\n    per: \"{}s\"\n    lock: \"{}s\"\n    on_limit: reject\n    mode: shadow\n",
        PER.as_secs(),
        LOCK.as_secs()
    );
    let mut gate = Gate::start(&gate_yaml(&stub.url(), "", 2, &shadow)).await;
    let client = Client::new();
    let channel = gate.url("/api/v3/channelsbyname/ops/message");
    let chat = gate.url("/api/v3/chats/C1/message");
    assert_eq!(
        statuses(&client, &channel, "dave", 3).await,
        ok_then_429(3, 0)
    );
    assert_eq!(stub.count_for(CHANNEL, "dave"), 3);
    // The enforcing route next to it is untouched.
    assert_eq!(statuses(&client, &chat, "dave", 3).await, ok_then_429(2, 1));

    gate.signal("TERM");
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
    let shadowed = gate.access_log(CHANNEL_ROUTE);
    let seen: Vec<(&str, bool, u64)> = shadowed
        .iter()
        .map(|e| {
            (
                e["decision"].as_str().unwrap_or("?"),
                e["shadow"].as_bool().unwrap_or(false),
                e["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("forwarded", true, 200),
            ("rejected", true, 200),
            ("rejected", true, 200)
        ],
        "{shadowed:#?}"
    );
    let enforced = gate.access_log(CHAT_ROUTE);
    assert!(
        enforced.iter().all(|e| e["shadow"] == false),
        "{enforced:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_a_call_queued_beyond_the_drain_and_exits_zero() {
    // One call per minute: the second one's slot is a minute away, far past the 5 s drain.
    let stub = chat_stub().await;
    let queue = format!(
        "  - name: {CHANNEL_ROUTE}\n    method: POST\n    path: \"{CHANNEL}\"\n    limit: 1\n    per: \"{}s\"\n    lock: \"{}s\"\n    on_limit: queue\n    max_wait: \"120s\"\n",
        PER.as_secs(),
        LOCK.as_secs()
    );
    let mut gate = Gate::start(&gate_yaml(&stub.url(), "", 2, &queue)).await;
    let client = Client::new();
    let channel = gate.url("/api/v3/channelsbyname/ops/message");
    assert_eq!(
        statuses(&client, &channel, "erin", 1).await,
        ok_then_429(1, 0)
    );
    let queued = tokio::spawn({
        let (client, channel) = (client.clone(), channel.clone());
        async move { client.post(&channel, "erin", "{}").await }
    });
    let admin = gate.admin_addr;
    wait_for(
        "the second call to be queued",
        RELOAD_TIMEOUT,
        || async move {
            metric_value(
                &scrape(admin).await,
                "cliqgate_queue_depth",
                &[("route", CHANNEL_ROUTE)],
            ) == Some(1.0)
        },
    )
    .await;

    let signalled = Instant::now();
    gate.signal("TERM");
    let answer = tokio::time::timeout(CLIENT_TIMEOUT, queued)
        .await
        .expect("the queued call is answered")
        .expect("queued call task");
    let answered_after = signalled.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.text()
    );
    assert_eq!(answer.json()["code"], "shutting_down");
    assert!(answer.header("retry-after").is_some());
    assert!(
        answered_after < Duration::from_secs(2),
        "the refusal took {answered_after:?}: it should come at once"
    );
    let status = gate.exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert_eq!(stub.count_for(CHANNEL, "erin"), 1);
    let logged: Vec<(String, u64)> = gate
        .access_log(CHANNEL_ROUTE)
        .iter()
        .map(|e| {
            (
                e["decision"].as_str().unwrap_or("?").to_owned(),
                e["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        logged,
        [("forwarded".to_owned(), 200), ("rejected".to_owned(), 503)]
    );
}
