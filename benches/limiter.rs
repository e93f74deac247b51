//! Limiter decisions per second and time per decision, for the in-memory store and for the Redis
//! store with Redis on loopback.
//!
//! ```sh
//! cargo bench --bench limiter              # everything (starts its own redis-server)
//! cargo bench --bench limiter -- memory    # only the in-memory store
//! cargo bench --bench limiter -- redis     # only Redis
//! scripts/bench-redis.sh                   # installs redis-server if missing, then the above
//! ```
//!
//! - `memory_*`: the embedded store through the `Limiter` trait (its answer is ready at once, so
//!   the future is polled once, without a runtime). Hot paths use the shipped figures of
//!   `chats.post_message` (20 per 1m + 1s margin) with N active keys visited in turn on a fake
//!   clock that moves so each key runs at 80% of its quota: every decision is "send now" and every
//!   key's log is full, the steady state of a busy proxy. (Not a huge quota as for Redis: the
//!   embedded window log holds the last `limit` send times of a key, so its cost grows with it.)
//! - `redis_*`: [`RedisStore`] on Redis's own clock (`TIME`) with a fresh `redis-server` on a free
//!   loopback port. Hot paths use a quota of 1,000,000 per 60s so every decision is "send now";
//!   `redis_refused` uses 20 per 61s on one key that is already full. `redis_concurrent` runs
//!   16 or 64 tasks at once on the 2-worker runtime, like concurrent calls in the proxy;
//!   its throughput column is decisions per second.
//! - After the table, `cargo bench` prints the latency distribution of Redis decisions (what each
//!   call through the proxy waits for the store) for 1, 16 and 64 concurrent callers.
//!
//! Under `cargo test --all-targets` (no `--bench`), divan runs every benchmark once as a test,
//! with small key counts, and the Redis part is skipped: it needs no redis-server.

mod common;

use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::num::NonZeroU32;
use std::pin::pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use cliqgate::config::{Algorithm, OnStoreError};
use cliqgate::limit::{
    Acquire, Key, Kind, Limiter, ManualClock, MemoryStore, Policy, RedisOptions, RedisStore,
    Refusal, RefusalReason, RouteId, Store, TokioClock, UserKey,
};
use divan::counter::ItemsCount;
use divan::Bencher;

fn main() {
    let _server = StopServerOnExit;
    if common::bench_mode() {
        println!("machine: {}", common::machine());
        if wants_redis() {
            redis(); // started before the table, so its line does not land inside it
        }
    }
    divan::main();
    if common::bench_mode() && wants_redis() {
        if let Some(env) = redis() {
            latency_table(env);
            server_time(env);
        }
    }
}

/// False when a name filter is given (`cargo bench --bench limiter -- memory`) that says nothing
/// about Redis: then Redis is started only if a benchmark asks for it, and the latency table is
/// skipped.
fn wants_redis() -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| f.contains("redis") || f.contains("latency"))
}

// ---- keys and policies ----

/// The routes the Redis store knows, by `RouteId`: key names use them.
const ROUTES: [&str; 3] = [
    "chats.post_message",
    "chats.delete_messages",
    "messages.forward",
];
const HOT: RouteId = RouteId(0);
const REFUSED: RouteId = RouteId(1);
const HOT_GCRA: RouteId = RouteId(2);

/// `n` distinct users (uniform 128-bit keys, like hashed credentials), `seed` keeps sets apart.
fn keys(route: RouteId, n: usize, seed: u64) -> Vec<Key> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let mut user = [0u8; 16];
            user[..8].copy_from_slice(&next().to_le_bytes());
            user[8..].copy_from_slice(&next().to_le_bytes());
            Key {
                route,
                user: UserKey(user),
            }
        })
        .collect()
}

fn policy(limit: u32, per: Duration, algorithm: Algorithm) -> Policy {
    let limit = NonZeroU32::new(limit).expect("limit > 0");
    Policy::new(limit, per, Duration::from_secs(600), algorithm)
}

/// `chats.post_message` as shipped: 20 per 1m, plus the 1s safety margin.
fn shipped(algorithm: Algorithm) -> Policy {
    policy(20, Duration::from_secs(61), algorithm)
}

fn gcra(burst: u32) -> Algorithm {
    Algorithm::Gcra {
        burst: NonZeroU32::new(burst).expect("burst > 0"),
    }
}

fn is_now(answer: &Acquire) -> bool {
    matches!(answer, Acquire::Now { .. })
}

fn is_limited(answer: &Acquire) -> bool {
    matches!(
        answer,
        Acquire::Refused(Refusal {
            reason: RefusalReason::Limited,
            ..
        })
    )
}

// ---- the in-memory store ----

/// Polls a future once: the embedded store answers at once, so no runtime is involved.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(answer) => answer,
        Poll::Pending => panic!("the memory store answered later than at once"),
    }
}

/// `n` keys in the steady state of a busy proxy: every key's log full, each key visited in turn
/// once per `visit` of fake time, which is 1.25x the key's minimum spacing (80% of its quota), so
/// every decision is "send now".
struct MemoryHot {
    store: Store,
    clock: Arc<ManualClock>,
    keys: Vec<Key>,
    policy: Policy,
    /// Fake time between two decisions (`visit / n`).
    step: u64,
    now: u64,
    next: usize,
}

impl MemoryHot {
    fn new(n: usize, policy: Policy) -> Self {
        let clock = Arc::new(ManualClock::new());
        let spacing = match policy.kind {
            Kind::Window => policy.window / u64::from(policy.limit),
            Kind::Gcra { period, .. } => period,
        };
        let visit = spacing + spacing / 4;
        let mut hot = MemoryHot {
            store: Store::Memory(MemoryStore::new(clock.clone(), 10_000)),
            clock,
            keys: keys(HOT, n, n as u64),
            policy,
            step: (visit / n as u64).max(1),
            now: 0,
            next: 0,
        };
        // Fill every key's log: `limit` rounds (a burst's worth for GCRA) before measuring.
        for _ in 0..n * policy.limit as usize {
            assert!(is_now(&hot.decide()), "warm-up decision was not 'now'");
        }
        hot
    }

    fn decide(&mut self) -> Acquire {
        self.now += self.step;
        self.clock.set(self.now);
        let key = self.keys[self.next];
        self.next = (self.next + 1) % self.keys.len();
        ready(self.store.acquire(&self.policy, key, None)).expect("memory store never fails")
    }
}

/// Fewer keys under `cargo test`, where everything is unoptimised and runs once.
fn scaled(n: usize) -> usize {
    if common::bench_mode() {
        n
    } else {
        n.min(1_000)
    }
}

/// Window algorithm, steady state with 1, 10k and 1M active (route, user) keys.
#[divan::bench(args = [1, 10_000, 1_000_000], sample_count = 1000, sample_size = 1000)]
fn memory_window(bencher: Bencher, keys: usize) {
    let mut hot = MemoryHot::new(scaled(keys), shipped(Algorithm::Window));
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let answer = hot.decide();
        assert!(is_now(&answer));
        answer
    });
}

/// GCRA (burst 10 of 20), steady state with 10k active keys.
#[divan::bench(args = [10_000], sample_count = 1000, sample_size = 1000)]
fn memory_gcra(bencher: Bencher, keys: usize) {
    let mut hot = MemoryHot::new(scaled(keys), shipped(gcra(10)));
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let answer = hot.decide();
        assert!(is_now(&answer));
        answer
    });
}

/// The refusal path: one key whose window is full, reject mode.
#[divan::bench(sample_count = 1000, sample_size = 1000)]
fn memory_refused(bencher: Bencher) {
    let clock = Arc::new(ManualClock::new());
    let store = Store::Memory(MemoryStore::new(clock.clone(), 10_000));
    let policy = shipped(Algorithm::Window);
    let key = keys(REFUSED, 1, 7)[0];
    for _ in 0..policy.limit {
        assert!(is_now(&ready(store.acquire(&policy, key, None)).unwrap()));
    }
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let answer = ready(store.acquire(&policy, key, None)).unwrap();
        assert!(is_limited(&answer));
        answer
    });
}

// ---- the Redis store ----

/// A `redis-server` of this process's own, on a free loopback port, in a temp dir.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

/// Killed when `main` ends, even by a panic: statics are never dropped.
static SERVER: Mutex<Option<Server>> = Mutex::new(None);

struct StopServerOnExit;

impl Drop for StopServerOnExit {
    fn drop(&mut self) {
        let server = SERVER.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut server) = server {
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
    }
}

struct RedisEnv {
    rt: tokio::runtime::Runtime,
    store: Arc<Store>,
    version: String,
    port: u16,
}

/// Hot quota for Redis: high enough that no decision is ever refused.
fn redis_hot(algorithm: Algorithm) -> Policy {
    policy(1_000_000, Duration::from_secs(60), algorithm)
}

/// Starts Redis and opens the store, once; `None` under `cargo test` or without redis-server.
fn redis() -> Option<&'static RedisEnv> {
    static ENV: OnceLock<Option<RedisEnv>> = OnceLock::new();
    ENV.get_or_init(|| {
        if !common::bench_mode() {
            return None;
        }
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let port = match start_server(&binary) {
            Ok(port) => port,
            Err(why) => {
                eprintln!("skipping the Redis benchmarks: {why}");
                return None;
            }
        };
        let version = info_field(&command(port, &["INFO", "server"]), "redis_version")
            .unwrap_or_else(|| "?".into());
        println!("redis-server {version} on 127.0.0.1:{port} (loopback)");
        // Real TIME, and an epoch long past: no key starts with the conservative first window.
        assert_eq!(command(port, &["SET", "cliqgate:epoch", "1"]), "OK");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let options = RedisOptions {
            url: format!("redis://127.0.0.1:{port}/0"),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            on_error: OnStoreError::Reject,
            replicas: 1,
            prefix: "cliqgate:".into(),
            routes: cliqgate::limit::RouteNames::new(ROUTES.iter().map(|r| r.to_string())),
            max_window: Duration::from_secs(61),
            max_wait: Duration::from_secs(30),
            max_queued_total: 10_000,
            injected_time: false,
        };
        let store = rt.block_on(async {
            let store = RedisStore::open(options, Arc::new(TokioClock::new()), None)
                .expect("valid Redis options");
            Arc::new(Store::Redis(Arc::new(store)))
        });
        Some(RedisEnv {
            rt,
            store,
            version,
            port,
        })
    })
    .as_ref()
}

fn start_server(binary: &str) -> Result<u16, String> {
    let mut failures = Vec::new();
    for _ in 0..5 {
        let dir = tempfile::Builder::new()
            .prefix("cliqgate-bench-redis-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("free port: {e}"))?
            .port();
        let spawned = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return Err(format!("`{binary}` could not be started: {e}")),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                failures.push(format!("port {port}: exited with {status}"));
                break;
            }
            if try_command(port, &["PING"]).is_ok_and(|r| r == "PONG") {
                // Our child answers, not another server that took the port first (ours would
                // then have exited).
                std::thread::sleep(Duration::from_millis(50));
                if matches!(child.try_wait(), Ok(None)) {
                    *SERVER.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Server { child, _dir: dir });
                    return Ok(port);
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                failures.push(format!("port {port}: no PONG in 10s"));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Err(failures.join("; "))
}

/// One command on a fresh connection; the reply as text (simple/bulk string or integer).
fn try_command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
        if let Some(text) = parse_reply(&reply) {
            return Ok(text);
        }
    }
    Err(std::io::Error::other("connection closed before a reply"))
}

fn command(port: u16, args: &[&str]) -> String {
    try_command(port, args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
}

/// A whole simple string, error, integer or bulk string reply, if `buf` holds one.
fn parse_reply(buf: &[u8]) -> Option<String> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&buf[1..end]).into_owned();
    match buf.first()? {
        b'$' => {
            let len: usize = line.parse().ok()?;
            let body = buf.get(end + 2..end + 2 + len)?;
            Some(String::from_utf8_lossy(body).into_owned())
        }
        b'-' => Some(format!("(error) {line}")),
        _ => Some(line),
    }
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// The Redis environment; `None` under `cargo test` (then a no-op is registered, so the test run
/// stays quiet) or when redis-server could not be started (divan then warns).
fn with_redis<'a, 'b>(bencher: Bencher<'a, 'b>) -> Option<(&'static RedisEnv, Bencher<'a, 'b>)> {
    match redis() {
        Some(env) => Some((env, bencher)),
        None => {
            if !common::bench_mode() {
                bencher.bench_local(|| ());
            }
            None
        }
    }
}

/// Makes `keys` active in Redis (one decision each), 64 at a time.
fn warm_up(env: &RedisEnv, policy: Policy, keys: &Arc<Vec<Key>>, each: usize) {
    env.rt.block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (store, keys, next) = (env.store.clone(), keys.clone(), next.clone());
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= keys.len() * each {
                        break;
                    }
                    let answer = store.acquire(&policy, keys[i % keys.len()], None).await;
                    assert!(answer.is_ok(), "warm-up: {answer:?}");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("warm-up task");
        }
    });
}

/// One caller, one decision at a time (window algorithm): the latency each call adds.
#[divan::bench(args = [1, 10_000], sample_count = 3000, sample_size = 1)]
fn redis_window(bencher: Bencher, keys: usize) {
    let Some((env, bencher)) = with_redis(bencher) else {
        return;
    };
    let policy = redis_hot(Algorithm::Window);
    let keys = Arc::new(self::keys(HOT, keys, 100 + keys as u64));
    warm_up(env, policy, &keys, 1);
    let mut next = 0;
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let key = keys[next % keys.len()];
        next += 1;
        let answer = env.rt.block_on(env.store.acquire(&policy, key, None));
        assert!(answer.as_ref().is_ok_and(is_now), "{answer:?}");
        answer
    });
}

/// One caller, GCRA, 10k keys.
#[divan::bench(args = [10_000], sample_count = 3000, sample_size = 1)]
fn redis_gcra(bencher: Bencher, keys: usize) {
    let Some((env, bencher)) = with_redis(bencher) else {
        return;
    };
    let policy = redis_hot(gcra(1_000));
    let keys = Arc::new(self::keys(HOT_GCRA, keys, 200 + keys as u64));
    warm_up(env, policy, &keys, 1);
    let mut next = 0;
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let key = keys[next % keys.len()];
        next += 1;
        let answer = env.rt.block_on(env.store.acquire(&policy, key, None));
        assert!(answer.as_ref().is_ok_and(is_now), "{answer:?}");
        answer
    });
}

/// The refusal path: one key already at 20 sends in its 61s window, reject mode.
#[divan::bench(sample_count = 3000, sample_size = 1)]
fn redis_refused(bencher: Bencher) {
    let Some((env, bencher)) = with_redis(bencher) else {
        return;
    };
    let policy = shipped(Algorithm::Window);
    let keys = Arc::new(keys(REFUSED, 1, 300));
    warm_up(env, policy, &keys, policy.limit as usize);
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let answer = env.rt.block_on(env.store.acquire(&policy, keys[0], None));
        assert!(answer.as_ref().is_ok_and(is_limited), "{answer:?}");
        answer
    });
}

/// Decisions each task makes per iteration of `redis_concurrent`.
const PER_TASK: usize = 32;

/// `tasks` callers at once over 10k keys (window algorithm); the throughput column is
/// decisions per second.
#[divan::bench(args = [16, 64], sample_count = 40)]
fn redis_concurrent(bencher: Bencher, tasks: usize) {
    let Some((env, bencher)) = with_redis(bencher) else {
        return;
    };
    let policy = redis_hot(Algorithm::Window);
    let keys = Arc::new(keys(HOT, 10_000, 400 + tasks as u64));
    warm_up(env, policy, &keys, 1);
    let mut round = 0;
    bencher
        .counter(ItemsCount::new(tasks * PER_TASK))
        .bench_local(|| {
            round += 1;
            env.rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for t in 0..tasks {
                    let (store, keys) = (env.store.clone(), keys.clone());
                    let first = (round * tasks + t) * PER_TASK;
                    set.spawn(async move {
                        for i in first..first + PER_TASK {
                            let answer = store.acquire(&policy, keys[i % keys.len()], None).await;
                            assert!(answer.as_ref().is_ok_and(is_now), "{answer:?}");
                        }
                    });
                }
                while let Some(done) = set.join_next().await {
                    done.expect("a decision task");
                }
            })
        });
}

/// Per-decision latency percentiles with 1, 16 and 64 callers running closed loops for 3 s each.
fn latency_table(env: &RedisEnv) {
    let policy = redis_hot(Algorithm::Window);
    let keys = Arc::new(keys(HOT, 10_000, 500));
    warm_up(env, policy, &keys, 1);
    // Server-side time per script below counts these decisions only.
    assert_eq!(command(env.port, &["CONFIG", "RESETSTAT"]), "OK");
    println!();
    println!(
        "Redis store, redis-server {} on loopback, window algorithm, 10k keys, 3 s per row:",
        env.version
    );
    println!("| callers | decisions/s | p50 | p90 | p99 | p99.9 | max |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for callers in [1usize, 16, 64] {
        let run_for = Duration::from_secs(3);
        let (mut latencies, elapsed) = env.rt.block_on(async {
            let start = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for c in 0..callers {
                let (store, keys) = (env.store.clone(), keys.clone());
                set.spawn(async move {
                    let mut latencies = Vec::with_capacity(100_000);
                    let mut i = c * 7919;
                    while start.elapsed() < run_for {
                        let asked = Instant::now();
                        let answer = store.acquire(&policy, keys[i % keys.len()], None).await;
                        latencies.push(asked.elapsed());
                        assert!(answer.as_ref().is_ok_and(is_now), "{answer:?}");
                        i += 1;
                    }
                    latencies
                });
            }
            let mut all = Vec::new();
            while let Some(done) = set.join_next().await {
                all.extend(done.expect("a latency task"));
            }
            (all, start.elapsed())
        });
        latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((latencies.len() as f64 * q) as usize).min(latencies.len() - 1);
            micros(latencies[i])
        };
        println!(
            "| {callers} | {:.0} | {} | {} | {} | {} | {} |",
            latencies.len() as f64 / elapsed.as_secs_f64(),
            at(0.50),
            at(0.90),
            at(0.99),
            at(0.999),
            micros(*latencies.last().expect("some decisions")),
        );
    }
}

/// Redis's own time per script run during the latency table: what one decision costs Redis's
/// single thread, whatever the network and the client add.
fn server_time(env: &RedisEnv) {
    let stats = command(env.port, &["INFO", "commandstats"]);
    for line in stats.lines() {
        if let Some(rest) = line
            .strip_prefix("cmdstat_evalsha:")
            .or_else(|| line.strip_prefix("cmdstat_eval:"))
        {
            println!(
                "redis-server time per script ({}) in the latency table: {rest}",
                &line[8..line.find(':').unwrap_or(8)]
            );
        }
    }
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}
