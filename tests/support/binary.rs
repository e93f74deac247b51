//! Running the real binary (`target/.../cliqgate`) for end-to-end tests: a child process with its
//! output collected line by line as it comes (on threads: tokio's `process` feature is not enabled
//! in this crate), killed on drop so a failing test leaves nothing running, and every wait on it
//! bounded.
//!
//! ```ignore
//! let mut gate = Gate::start(&yaml).await; // JSON logs, listeners on 127.0.0.1:0
//! let answer = Client::new().post(&gate.url("/api/v3/chats/C1/message"), "alice", "{}").await;
//! gate.signal("TERM");
//! assert_eq!(gate.exit(Duration::from_secs(10)).await.code(), Some(0));
//! ```

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::time::Instant;

use super::client::{wait_for, POLL_INTERVAL};

const BIN: &str = env!("CARGO_BIN_EXE_cliqgate");

/// Upper bound on the binary logging `cliqgate listening` after spawn. Generous for a loaded CI
/// machine, far below a CI job's timeout.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on reading the rest of the child's output once it has exited.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A child process of the binary, its stderr and stdout collected line by line as they come.
/// Killed on drop, so a failing test leaves nothing running.
pub struct Spawned {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
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
    /// Starts the binary with `args`, no stdin and `RUST_LOG` unset (the config decides the log
    /// level).
    pub fn new<I, S>(args: I) -> Spawned
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cliqgate");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect_lines(child.stderr.take().expect("piped stderr"), stderr.clone()),
            collect_lines(child.stdout.take().expect("piped stdout"), stdout.clone()),
        ];
        Spawned {
            child,
            stderr,
            stdout,
            readers,
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll cliqgate")
    }

    /// Waits (bounded) for the process to exit, then (bounded by [`OUTPUT_DRAIN_TIMEOUT`]) for
    /// the rest of its output.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        let give_up = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.try_wait() {
                break status;
            }
            if Instant::now() >= give_up {
                panic!(
                    "cliqgate did not exit within {within:?}:\n{}",
                    self.stderr_text()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let give_up = Instant::now() + OUTPUT_DRAIN_TIMEOUT;
        while !self.readers.iter().all(JoinHandle::is_finished) {
            assert!(
                Instant::now() < give_up,
                "the child's output did not end after it exited"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        status
    }

    /// Sends `SIGHUP`, `SIGTERM`, `SIGINT`, ... with the `kill` command.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("output lines").clone()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("output lines").clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    pub fn stdout_text(&self) -> String {
        self.stdout_lines().join("\n")
    }

    /// Every stderr line (so far) that is a JSON event.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stderr
            .lock()
            .expect("output lines")
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
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

/// What a finished run printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary to completion with `args`, bounded by `within` (and its output by
/// [`OUTPUT_DRAIN_TIMEOUT`]).
pub async fn run_to_exit<I, S>(args: I, within: Duration) -> Finished
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut spawned = Spawned::new(args);
    let status = spawned.exit(within).await;
    Finished {
        status,
        stdout: spawned.stdout_text(),
        stderr: spawned.stderr_text(),
    }
}

/// Writes `yaml` as `cliqgate.yaml` in `dir`; its path.
pub fn write_config(dir: &tempfile::TempDir, yaml: &str) -> PathBuf {
    let path = dir.path().join("cliqgate.yaml");
    std::fs::write(&path, yaml).expect("write the test config");
    path
}

/// A config for [`Gate::start`]: listeners on 127.0.0.1:0 in front of `upstream`, JSON logs (which
/// [`Gate`] reads) at `log_level`, a drain deadline of `shutdown` (e.g. `"5s"`), then `rest` (YAML
/// lines appended verbatim: `reload:`, `routes:`, ...).
pub fn gate_config(upstream: &str, log_level: &str, shutdown: &str, rest: &str) -> String {
    format!(
        r#"listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
upstream: "{upstream}"
log:
  format: json
  level: "{log_level}"
timeouts:
  shutdown: "{shutdown}"
{rest}"#
    )
}

/// One entry of a `routes:` list: `name` for `POST path`, `limit` calls per `per`, locked for
/// `lock` (both whole seconds), then `rest` (YAML lines at the entry's indent, e.g.
/// `"    on_limit: reject\n"`).
pub fn post_route(
    name: &str,
    path: &str,
    limit: u32,
    per: Duration,
    lock: Duration,
    rest: &str,
) -> String {
    format!(
        "  - name: {name}\n    method: POST\n    path: \"{path}\"\n    limit: {limit}\n    per: \"{}s\"\n    lock: \"{}s\"\n{rest}",
        per.as_secs(),
        lock.as_secs()
    )
}

/// The running proxy binary, its config file (in a temp dir it owns) and the addresses it logged.
pub struct Gate {
    pub process: Spawned,
    pub config: PathBuf,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The `cliqgate listening` event.
    pub listening: serde_json::Value,
    _dir: tempfile::TempDir,
}

impl Gate {
    /// Starts the binary on `yaml` (which must ask for JSON logs) and waits, bounded by
    /// [`START_TIMEOUT`], for its `cliqgate listening` event to learn `proxy_addr` and
    /// `admin_addr`.
    pub async fn start(yaml: &str) -> Gate {
        Gate::start_with_args(yaml, &[]).await
    }

    /// As [`Gate::start`], with `args` before `--config FILE`.
    pub async fn start_with_args(yaml: &str, args: &[&str]) -> Gate {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(&dir, yaml);
        let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        all.extend([OsStr::new("--config"), config.as_os_str()]);
        let mut process = Spawned::new(all);
        let give_up = Instant::now() + START_TIMEOUT;
        let listening = loop {
            let found = process
                .events()
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
            listening: listening.clone(),
            proxy_addr: addr("proxy_addr"),
            admin_addr: addr("admin_addr"),
            process,
            config,
            _dir: dir,
        }
    }

    /// `http://PROXY_ADDR{path_and_query}`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.proxy_addr)
    }

    /// `http://ADMIN_ADDR{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Replaces the config file the way editors and ConfigMaps do: a new file renamed over it.
    pub fn rewrite_config(&self, yaml: &str) {
        let next = self.config.with_extension("yaml.next");
        std::fs::write(&next, yaml).expect("write the new config");
        std::fs::rename(&next, &self.config).expect("replace the config");
    }

    /// Sends `SIGHUP`, `SIGTERM`, `SIGINT`, ... with the `kill` command.
    pub fn signal(&self, name: &str) {
        self.process.signal(name);
    }

    /// Panics (with its stderr) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.process.try_wait() {
            panic!(
                "cliqgate exited ({status}):\n{}",
                self.process.stderr_text()
            );
        }
    }

    /// Waits (bounded) for the process to exit, then (bounded) for the rest of its output.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        self.process.exit(within).await
    }

    /// Every stderr line (so far) that is a JSON event.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.process.events()
    }

    /// Access-log events (target `cliqgate::access`), in order.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|event| event["target"] == "cliqgate::access")
            .collect()
    }

    /// Access-log events (target `cliqgate::access`) for `route`, in order.
    pub fn access_log_for(&self, route: &str) -> Vec<serde_json::Value> {
        self.access_log()
            .into_iter()
            .filter(|event| event["route"] == route)
            .collect()
    }

    /// Waits, bounded by `within`, until a JSON log event matching `wanted` has been read from
    /// stderr (the metric for an event may be visible before its log line is).
    pub async fn wait_for_event(
        &self,
        what: &str,
        within: Duration,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) {
        let wanted = &wanted;
        wait_for(
            what,
            within,
            || async move { self.events().iter().any(wanted) },
        )
        .await;
    }
}
