//! A real `redis-server` for tests: one child process per [`RedisServer`], on a free loopback port,
//! in its own temp dir, with no persistence. Tests can crash it ([`RedisServer::kill`]), bring it
//! back empty on the same port ([`RedisServer::restart`]), slow it down ([`RedisServer::pause`])
//! and look inside it ([`RedisServer::command`]) without any client library.
//!
//! `scripts/test.sh` installs `redis-server` when it is missing; set `REDIS_SERVER` to use another
//! binary (e.g. `valkey-server`). The child is killed when the value is dropped, also when the test
//! panics, so keep one per test (a `static` server is never dropped and would outlive the tests).

use std::fs::File;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

/// How long a started `redis-server` has to answer `PING` with `PONG`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a killed `redis-server` has to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one [`RedisServer::command`] (connect, write, whole reply). Generous so that a command
/// sent during a [`RedisServer::pause`] still gets its answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one `PING` while waiting for startup.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between startup probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// Fresh ports tried by [`RedisServer::start`] before giving up (another process may take the
/// port between finding it free and `redis-server` binding it).
const START_ATTEMPTS: usize = 5;
/// Tries of [`RedisServer::restart`] on its one port.
const RESTART_ATTEMPTS: usize = 3;
/// Lines of the server's log shown when it fails to start.
const LOG_TAIL_LINES: usize = 30;

/// A `redis-server` child process in its own temp dir, killed on drop.
pub struct RedisServer {
    port: u16,
    /// `None` between [`RedisServer::kill`] and [`RedisServer::restart`].
    child: Option<Child>,
    /// Working dir of the server (its `--dir`), holding its log; removed on drop, after the kill.
    dir: TempDir,
    log: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` on a free port of 127.0.0.1 and waits until it answers `PING`.
    /// Panics (with the tail of the server's log) if it cannot be started.
    pub async fn start() -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("cliqgate-redis-")
            .tempdir()
            .expect("create a temp dir for redis-server");
        let log = dir.path().join("redis-server.log");
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir,
            log,
        };
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(why) => failures.push(format!("port {}: {why}", server.port)),
            }
        }
        panic!(
            "redis-server did not start after {START_ATTEMPTS} attempts:\n  {}\n{}",
            failures.join("\n  "),
            server.log_tail()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`, for the proxy's `store.url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The OS process id of the running server, `None` after [`RedisServer::kill`].
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until it has exited. Its port is
    /// kept for [`RedisServer::restart`]. Does nothing if it is not running.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(why) = kill_and_reap(&mut child).await {
                panic!("could not kill redis-server (pid {}): {why}", child.id());
            }
        }
    }

    /// Starts the server again on the same port, with no data (like a crashed cache), and waits
    /// until it answers `PING`. Kills it first if it is still running.
    pub async fn restart(&mut self) {
        self.kill().await;
        let mut failures = Vec::new();
        for _ in 0..RESTART_ATTEMPTS {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(why) => failures.push(why),
            }
            sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "redis-server did not restart on port {}:\n  {}\n{}",
            self.port,
            failures.join("\n  "),
            self.log_tail()
        );
    }

    /// Makes the server hold every client's commands for `d` (`CLIENT PAUSE <ms> ALL`), as a slow
    /// or overloaded Redis would. Returns at once; the pause runs on in the server.
    pub async fn pause(&self, d: Duration) {
        let ms = d.as_millis().max(1).to_string();
        let reply = self.command(&["CLIENT", "PAUSE", &ms, "ALL"]).await;
        assert_eq!(reply, "OK", "CLIENT PAUSE {ms} ALL");
    }

    /// Runs one command on a fresh connection and renders the reply as text: simple strings and
    /// bulk strings as they are, integers in decimal, a nil as `(nil)`, an error as
    /// `(error) <message>`, an array as its rendered elements joined by `\n` (empty: `""`).
    /// Panics if the server cannot be reached; see [`RedisServer::try_command`].
    pub async fn command(&self, args: &[&str]) -> String {
        match self.try_command(args).await {
            Ok(reply) => reply,
            Err(why) => panic!("redis command {args:?} on port {}: {why}", self.port),
        }
    }

    /// [`RedisServer::command`] that returns connection errors (e.g. `ConnectionRefused` after
    /// [`RedisServer::kill`]) instead of panicking.
    pub async fn try_command(&self, args: &[&str]) -> io::Result<String> {
        run_command(self.port, args, COMMAND_TIMEOUT).await
    }

    /// Spawns `redis-server` on `self.port` and waits for `PONG` from that very process.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut child = self.spawn()?;
        let pid = child.id();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(format!("redis-server exited at startup: {status}"))
                }
                Ok(None) => {}
                Err(why) => {
                    let _ = kill_and_reap(&mut child).await;
                    return Err(format!("could not watch redis-server: {why}"));
                }
            }
            if let Ok(reply) = run_command(self.port, &["PING"], PROBE_TIMEOUT).await {
                // Something answers; make sure it is our child and not another server that took
                // the port first (ours would then exit with "Address already in use").
                let owner = run_command(self.port, &["INFO", "server"], PROBE_TIMEOUT)
                    .await
                    .ok()
                    .and_then(|info| info_field(&info, "process_id"));
                if reply == "PONG" && owner == Some(pid.to_string()) {
                    self.child = Some(child);
                    return Ok(());
                }
                if owner.is_some() && owner != Some(pid.to_string()) {
                    let _ = kill_and_reap(&mut child).await;
                    return Err(format!(
                        "port taken by another redis-server (pid {})",
                        owner.unwrap_or_default()
                    ));
                }
            }
            if Instant::now() >= deadline {
                let _ = kill_and_reap(&mut child).await;
                return Err(format!("no PONG within {STARTUP_TIMEOUT:?}"));
            }
            sleep(PROBE_INTERVAL).await;
        }
    }

    fn spawn(&self) -> Result<Child, String> {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|why| format!("open {}: {why}", self.log.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|why| format!("clone log handle: {why}"))?;
        let port = self.port.to_string();
        let dir = self.dir.path().to_str().expect("temp dir path is UTF-8");
        let spawned = Command::new(&binary)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--dir", dir, "--protected-mode", "no"])
            .args(["--daemonize", "no", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn();
        match spawned {
            Ok(child) => Ok(child),
            Err(why) if why.kind() == ErrorKind::NotFound => panic!(
                "`{binary}` was not found on PATH: run the tests with `scripts/test.sh`, which \
                 installs redis-server (or `apt-get install redis-server`)"
            ),
            Err(why) => Err(format!("spawn {binary}: {why}")),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_else(|why| format!("({why})"));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!("--- tail of {}:\n{tail}", self.log.display())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL makes the exit immediate, so the blocking wait is short.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port of 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// SIGKILLs the child and waits (bounded) until it has exited and been reaped.
async fn kill_and_reap(child: &mut Child) -> io::Result<()> {
    match child.kill() {
        Ok(()) => {}
        // Already exited (and possibly reaped): nothing to kill.
        Err(why) if why.kind() == ErrorKind::InvalidInput => {}
        Err(why) => return Err(why),
    }
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                format!("still running {EXIT_TIMEOUT:?} after SIGKILL"),
            ));
        }
        sleep(Duration::from_millis(5)).await;
    }
}

/// The value of `field:` in an `INFO` reply.
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

/// Sends one command as a RESP array on a new connection and reads one reply, all within `limit`.
async fn run_command(port: u16, args: &[&str], limit: Duration) -> io::Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((reply, _)) = parse_reply(&buf)? {
                return Ok(reply);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed before a whole reply",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    match timeout(limit, exchange).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            ErrorKind::TimedOut,
            format!("no reply within {limit:?}"),
        )),
    }
}

/// Parses one RESP2 reply at the start of `buf`: `Ok(None)` if it is not complete yet, else the
/// rendered reply and the number of bytes it took.
fn parse_reply(buf: &[u8]) -> io::Result<Option<(String, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, rest)) = buf[..end].split_first() else {
        return Err(bad_reply("empty line"));
    };
    let line = String::from_utf8_lossy(rest).into_owned();
    let after_line = end + 2;
    let length = || -> io::Result<i64> {
        line.parse()
            .map_err(|_| bad_reply(&format!("bad length {line:?}")))
    };
    match kind {
        b'+' | b':' => Ok(Some((line, after_line))),
        b'-' => Ok(Some((format!("(error) {line}"), after_line))),
        b'$' => {
            let len = length()?;
            if len < 0 {
                return Ok(Some(("(nil)".to_owned(), after_line)));
            }
            let len = len as usize;
            if buf.len() < after_line + len + 2 {
                return Ok(None);
            }
            let text = String::from_utf8_lossy(&buf[after_line..after_line + len]).into_owned();
            Ok(Some((text, after_line + len + 2)))
        }
        b'*' => {
            let len = length()?;
            if len < 0 {
                return Ok(Some(("(nil)".to_owned(), after_line)));
            }
            let mut items = Vec::new();
            let mut at = after_line;
            for _ in 0..len {
                match parse_reply(&buf[at..])? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((items.join("\n"), at)))
        }
        other => Err(bad_reply(&format!("unknown type byte {:?}", other as char))),
    }
}

fn bad_reply(what: &str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, format!("bad RESP reply: {what}"))
}
