//! Memory: what active limiter keys and queued calls cost, as resident memory (VmRSS from
//! `/proc/self/status`) and as live heap bytes (a counting global allocator).
//!
//! ```sh
//! cargo bench --bench memory                 # everything (about 6 minutes)
//! cargo bench --bench memory -- keys         # limiter keys only (about 45 s)
//! cargo bench --bench memory -- queue        # queued calls through the real proxy only
//! cargo bench --bench memory -- "queue h2"   # one protocol (a filter matches run names)
//! ```
//!
//! The bench runs on the allocator the `cliqgate` binary uses: mimalloc (the default `mimalloc`
//! feature); `cargo bench --bench memory --no-default-features` measures glibc's malloc instead.
//!
//! Every measurement runs in a fresh child process (this binary, re-executed with
//! `CLIQGATE_MEMORY_ROLE` set), so one measurement's allocator state never pollutes the next.
//!
//! - `keys`: a `MemoryStore` on a `ManualClock` is filled with N active (route, user) keys at
//!   limit 50 (window algorithm, 50 per 61s: `per: 1m` plus the default 1s margin): 50 sends per
//!   key through `acquire_now`, all inside one window, so every key holds a full log. RSS and
//!   live heap are read before and after: the difference over N is the cost per key. Then the
//!   clock moves past the window, the store is swept (`MemoryStore::sweep`, as the proxy's
//!   sweeper does: it also reports the longest shard lock hold), and RSS is read again; again
//!   10 s later, after the next sweep (an allocator may return memory after a delay); then once
//!   more after glibc's `malloc_trim(0)`, which tells whether the memory kept after eviction is
//!   only cached by the allocator (free inside the process) or still in use (with mimalloc,
//!   glibc's heap holds next to nothing). A GCRA row (burst 50) is there for comparison.
//! - `queue`: the real proxy (`cliqgate::app::start`, memory store) runs in this process on
//!   127.0.0.1:0 in front of a tiny upstream answering 200. One route allows 1 call per minute per
//!   user, queue mode, `max_wait: 1h`, queue limits raised to 1,000,000. A client in another
//!   process (so its sockets and memory are not counted, and each side has its own file
//!   descriptor limit) first sends one call per user (which fills the user's window), then N
//!   calls at once, 10 per user, bodiless GETs: every one of them is queued (slots 1 to 10
//!   minutes ahead). RSS, live heap (by size class) and open fds are read when the proxy holds all N, and again
//!   after the client has hung up (every reservation given back). A second round with other users
//!   then tells memory kept for reuse (it does not grow) from memory leaked per call (it doubles);
//!   at the very end RSS is read once more after `malloc_trim(0)`.
//!   - `h1`: one HTTP/1.1 connection per queued call, as most clients do. The number is bounded by
//!     the file descriptor limit (`ulimit -n`, 20000 here: it cannot be raised in this
//!     container), so 100k is extrapolated from the per-call cost at 1k, 10k and 18k.
//!   - `h2`: HTTP/2 (prior knowledge), 200 streams per connection (hyper's default
//!     `max_concurrent_streams`), which reaches 100k queued calls for real.
//!
//! Under `cargo test --all-targets` (no `--bench`) each part runs once at a tiny size.

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cliqgate::config::{Algorithm, Config};
use cliqgate::limit::{Acquire, Key, ManualClock, MemoryStore, Policy, RouteId, Store, UserKey};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

// ---- a counting allocator: live heap bytes and allocations, by size class ----

/// The allocator the `cliqgate` binary uses (src/main.rs): mimalloc by default, the system's
/// (glibc) with `--no-default-features`. RSS depends on it, so the bench measures the same one.
#[cfg(feature = "mimalloc")]
use mimalloc::MiMalloc as Inner;
#[cfg(not(feature = "mimalloc"))]
use std::alloc::System as Inner;

/// Counts around [`Inner`].
struct Counting;

/// Size classes: `i` holds allocations of at most `2^i` bytes (and more than `2^(i-1)`).
const CLASSES: usize = 48;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_ALLOCS: AtomicI64 = AtomicI64::new(0);
static CLASS_ALLOCS: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];
static CLASS_BYTES: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

fn class(size: usize) -> usize {
    (usize::BITS - size.saturating_sub(1).leading_zeros()).min(CLASSES as u32 - 1) as usize
}

fn count(size: usize, sign: i64) {
    let bytes = sign * size as i64;
    LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
    LIVE_ALLOCS.fetch_add(sign, Ordering::Relaxed);
    let c = class(size);
    CLASS_ALLOCS[c].fetch_add(sign, Ordering::Relaxed);
    CLASS_BYTES[c].fetch_add(bytes, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `Inner` unchanged; only counters are updated around it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = Inner.alloc(layout);
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = Inner.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Inner.dealloc(ptr, layout);
        count(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = Inner.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(layout.size(), -1);
            count(new_size, 1);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap at one moment.
#[derive(Clone, Copy)]
struct Heap {
    bytes: i64,
    allocs: i64,
    class_allocs: [i64; CLASSES],
    class_bytes: [i64; CLASSES],
}

fn heap() -> Heap {
    let mut h = Heap {
        bytes: LIVE_BYTES.load(Ordering::Relaxed),
        allocs: LIVE_ALLOCS.load(Ordering::Relaxed),
        class_allocs: [0; CLASSES],
        class_bytes: [0; CLASSES],
    };
    for c in 0..CLASSES {
        h.class_allocs[c] = CLASS_ALLOCS[c].load(Ordering::Relaxed);
        h.class_bytes[c] = CLASS_BYTES[c].load(Ordering::Relaxed);
    }
    h
}

/// What grew between two moments, per unit (`per`): the size classes that account for most of
/// it, largest first, as `"<=8KiB": [allocations per unit, bytes per unit]`.
fn growth(before: &Heap, after: &Heap, per: f64) -> Value {
    let mut classes: Vec<(usize, i64, i64)> = (0..CLASSES)
        .map(|c| {
            (
                c,
                after.class_allocs[c] - before.class_allocs[c],
                after.class_bytes[c] - before.class_bytes[c],
            )
        })
        .filter(|&(_, n, b)| n != 0 || b != 0)
        .collect();
    classes.sort_by_key(|&(_, _, b)| std::cmp::Reverse(b));
    let top: serde_json::Map<String, Value> = classes
        .iter()
        .take(8)
        .map(|&(c, n, b)| {
            (
                format!("<={}", human(1u64 << c)),
                json!([round2(n as f64 / per), round2(b as f64 / per)]),
            )
        })
        .collect();
    Value::Object(top)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Resident set size of this process, in bytes (`VmRSS`).
fn rss() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/self/status")
}

/// Hands memory the allocator keeps cached back to the OS (glibc only); false elsewhere.
fn malloc_trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim takes a byte count and touches only the allocator's state.
        unsafe { malloc_trim(0) };
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

// ---- the parent: runs each measurement in a child and prints the tables ----

const ROLE: &str = "CLIQGATE_MEMORY_ROLE";

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let parts: Vec<&str> = role.split(',').collect();
        match parts.as_slice() {
            ["keys", n, algorithm, idle_s] => keys(
                n.parse().expect("n"),
                algorithm,
                Duration::from_secs(idle_s.parse().expect("seconds")),
            ),
            ["queue", proto, n] => queue(proto, n.parse().expect("n")),
            ["client", proto, addr, n, users, offset] => client(
                proto,
                addr.parse().expect("addr"),
                n.parse().expect("n"),
                users.parse().expect("users"),
                offset.parse().expect("offset"),
            ),
            _ => panic!("unknown {ROLE}={role}"),
        }
        return;
    }
    let bench = common::bench_mode();
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants =
        |part: &str| filters.is_empty() || filters.iter().any(|f| part.contains(f.as_str()));
    if bench {
        let allocator = if cfg!(feature = "mimalloc") {
            "mimalloc (as the binary)"
        } else {
            "system (glibc)"
        };
        println!("machine: {}; allocator: {allocator}", common::machine());
    }
    let wants_any = |part: &str| {
        filters.is_empty()
            || filters
                .iter()
                .any(|f| part.contains(f.as_str()) || f.contains(part))
    };
    if wants_any("keys") {
        let runs: Vec<(usize, &str)> = if bench {
            vec![
                (10_000, "window"),
                (100_000, "window"),
                (1_000_000, "window"),
                (1_000_000, "gcra"),
            ]
        } else {
            vec![(200, "window"), (200, "gcra")]
        };
        println!(
            "\nActive (route, user) keys at limit 50, memory store (one fresh process each):\n"
        );
        println!("| keys | algorithm | RSS before | RSS full | RSS/key | heap/key | allocs/key | fill ns/decision | keys after evict | evict ms | longest shard lock hold | RSS after evict | RSS 10 s later (next sweep) | RSS after light traffic | RSS after malloc_trim | heap after evict |");
        println!(
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (n, algorithm) in runs {
            if !wants(&format!("keys {algorithm} {n}")) {
                continue;
            }
            let idle_s = if bench { 10 } else { 0 };
            let r = child(&format!("keys,{n},{algorithm},{idle_s}"));
            println!(
                "| {} | {} | {} | {} | {} B | {} B | {} | {} | {} | {} | {} µs ({} holds) | {} | {} | {} | {} | {} |",
                r["keys"],
                r["algorithm"].as_str().unwrap_or("?"),
                mib(&r["rss_before"]),
                mib(&r["rss_full"]),
                r["rss_per_key"],
                r["heap_per_key"],
                r["allocs_per_key"],
                r["fill_ns_per_decision"],
                r["keys_after_evict"],
                r["evict_ms"],
                r["evict_longest_hold_us"],
                r["evict_holds"],
                mib(&r["rss_after_evict"]),
                mib(&r["rss_after_idle"]),
                mib(&r["rss_after_traffic"]),
                mib(&r["rss_after_trim"]),
                mib(&r["heap_after_evict"]),
            );
            if bench {
                println!(
                    "  heap growth by size class [allocs/key, bytes/key]: {}",
                    r["growth"]
                );
            }
        }
    }
    if wants_any("queue") {
        let runs: Vec<(&str, usize)> = if bench {
            vec![
                ("h1", 1_000),
                ("h1", 10_000),
                ("h1", 18_000),
                ("h2", 10_000),
                ("h2", 100_000),
            ]
        } else {
            vec![("h1", 20), ("h2", 20)]
        };
        println!("\nQueued calls held by the real proxy (memory store; one fresh process each):\n");
        println!("| protocol | queued calls | connections | RSS before | RSS queued | RSS/call | heap/call | allocs/call | RSS after hang-up | heap after hang-up |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (proto, n) in runs {
            if !wants(&format!("queue {proto} {n}")) {
                continue;
            }
            let r = child(&format!("queue,{proto},{n}"));
            println!(
                "| {} | {} | {} | {} | {} | {} B | {} B | {} | {} | {} |",
                proto,
                r["queued"],
                r["connections"],
                mib(&r["rss_before"]),
                mib(&r["rss_queued"]),
                r["rss_per_call"],
                r["heap_per_call"],
                r["allocs_per_call"],
                mib(&r["rss_after_hangup"]),
                mib(&r["heap_after_hangup"]),
            );
            if bench {
                println!(
                    "  heap growth by size class [allocs/call, bytes/call]: {}",
                    r["growth"]
                );
                println!(
                    "  still live after hang-up [allocs/call, bytes/call]: {}",
                    r["kept_after_hangup"]
                );
                println!(
                    "  second round (other users): RSS queued {}, RSS after hang-up {} ({} after malloc_trim), heap still live over the first round's start {}: {}",
                    mib(&r["round2_rss_queued"]),
                    mib(&r["round2_rss_after_hangup"]),
                    mib(&r["rss_after_trim"]),
                    mib(&r["round2_heap_after_hangup"]),
                    r["round2_kept_after_hangup"]
                );
                println!(
                    "  open fds before/queued/after hang-up: {}/{}/{}",
                    r["fds_before"], r["fds_queued"], r["fds_after_hangup"]
                );
            }
        }
    }
}

fn mib(v: &Value) -> String {
    match v.as_f64() {
        Some(b) => format!("{:.1} MiB", b / (1024.0 * 1024.0)),
        None => "?".into(),
    }
}

/// Runs this binary as `role`; its `RESULT {...}` line.
fn child(role: &str) -> Value {
    let exe = std::env::current_exe().expect("own path");
    let output = Command::new(exe)
        .env(ROLE, role)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("child runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{role} failed: {stdout}");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("{role} printed no result: {stdout}"))
}

// ---- keys ----

/// Key `i`: one of the 25 shipped routes, and a uniform 128-bit user (like a credential hash).
fn key(i: u64) -> Key {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = mix(i.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1));
    let b = mix(a ^ 0xD1B5_4A32_D192_ED03);
    let mut user = [0u8; 16];
    user[..8].copy_from_slice(&a.to_le_bytes());
    user[8..].copy_from_slice(&b.to_le_bytes());
    Key {
        route: RouteId((i % 25) as u32),
        user: UserKey(user),
    }
}

fn keys(n: usize, algorithm: &str, idle: Duration) {
    const LIMIT: u32 = 50;
    let limit = NonZeroU32::new(LIMIT).expect("50");
    let window = Duration::from_secs(61);
    let algo = match algorithm {
        "window" => Algorithm::Window,
        "gcra" => Algorithm::Gcra { burst: limit },
        other => panic!("unknown algorithm {other}"),
    };
    let policy = Policy::new(limit, window, Duration::from_secs(600), algo);
    let clock = Arc::new(ManualClock::new());
    let store = MemoryStore::new(clock.clone(), 10_000);
    clock.set(1);

    let (rss_before, heap_before) = (rss(), heap());
    // All sends inside the first 60 of the 61 seconds: every key ends with a full window.
    let sends = n as u64 * u64::from(LIMIT);
    let step = (60_000_000_000 / sends).max(1);
    let mut now = 1;
    let started = Instant::now();
    for _round in 0..LIMIT {
        for i in 0..n as u64 {
            now += step;
            clock.set(now);
            let answer = store.acquire_now(&policy, key(i), None);
            assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");
        }
    }
    let fill = started.elapsed();
    assert!(matches!(
        store.acquire_now(&policy, key(0), None),
        Acquire::Refused(_)
    ));
    let (rss_full, heap_full) = (rss(), heap());
    let keys_full = store.keys();
    assert_eq!(keys_full, n);

    // Past the point where no key constrains anything: one window after the last send for the
    // window log; for GCRA (burst 50 of 50: one cell per window after the burst) its TAT, 50
    // windows ahead.
    let idle_after = match algorithm {
        "window" => 61_000_000_000,
        _ => u64::from(LIMIT) * 61_000_000_000,
    };
    // (+1 ms: a window log records times rounded up to its unit, 64 ns here, so a key stays a
    // unit or two past its exact idle time.)
    clock.set(now + idle_after + 1_000_000);
    let started = Instant::now();
    let sweep = store.sweep();
    let evict = started.elapsed();
    let removed = sweep.removed;
    let (rss_after_evict, heap_after_evict) = (rss(), heap());
    let keys_after_evict = store.keys();
    // The proxy's sweeper runs again one interval later (src/app.rs EVICT_INTERVAL, 10 s): an
    // allocator that returns memory after a delay (mimalloc: 1 s) has done so by then.
    std::thread::sleep(idle);
    store.sweep();
    let rss_after_idle = rss();
    // A quiet proxy still serves someone: 2,000 other keys, 10 calls each, twice, a sweep apart.
    // (An allocator that returns memory lazily does it on such activity.)
    for round in 0..2u64 {
        for i in 0..20_000u64 {
            now += 1_000;
            clock.set(now + idle_after);
            store.acquire_now(&policy, key(n as u64 + i % 2_000), None);
        }
        if round == 0 {
            std::thread::sleep(idle / 5);
        }
        store.sweep();
    }
    let rss_after_traffic = rss();
    let trimmed = malloc_trim();
    let rss_after_trim = rss();

    let per = n as f64;
    let result = json!({
        "keys": n,
        "algorithm": algorithm,
        "limit": LIMIT,
        "rss_before": rss_before,
        "rss_full": rss_full,
        "rss_per_key": ((rss_full - rss_before) as f64 / per).round(),
        "heap_per_key": ((heap_full.bytes - heap_before.bytes) as f64 / per).round(),
        "allocs_per_key": round2((heap_full.allocs - heap_before.allocs) as f64 / per),
        "fill_ns_per_decision": (fill.as_nanos() as f64 / sends as f64).round(),
        "keys_full": keys_full,
        "removed": removed,
        "keys_after_evict": keys_after_evict,
        "evict_ms": round2(evict.as_secs_f64() * 1e3),
        "evict_longest_hold_us": round2(sweep.longest_hold.as_secs_f64() * 1e6),
        "evict_holds": sweep.holds,
        "rss_after_evict": rss_after_evict,
        "rss_after_idle": rss_after_idle,
        "rss_after_traffic": rss_after_traffic,
        "idle_s": idle.as_secs(),
        "heap_after_evict": heap_after_evict.bytes - heap_before.bytes,
        "rss_after_trim": if trimmed { json!(rss_after_trim) } else { Value::Null },
        "growth": growth(&heap_before, &heap_full, per),
    });
    println!("RESULT {result}");
}

// ---- queued calls through the real proxy ----

/// Calls queued per user: slots 1 to 10 minutes ahead, all within `max_wait: 1h`.
const CALLS_PER_USER: usize = 10;
/// hyper's default `max_concurrent_streams` for HTTP/2 servers.
const STREAMS_PER_CONNECTION: usize = 200;

fn token(user: usize) -> String {
    format!(
        "1000.{user:027x}{:032x}",
        (user as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

fn path(user: usize) -> String {
    format!("/api/v2/chats/CT_{user}/messages")
}

/// A tiny upstream: 200 with `{}` to everything, HTTP/1.1.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn queued_total(running: &cliqgate::app::Running) -> usize {
    match running.proxy().limiter.as_ref() {
        Store::Memory(m) => m.queued_total(),
        Store::Redis(_) => unreachable!("the memory store is configured"),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({} open file descriptors)",
            open_fds()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn queue(proto: &str, n: usize) {
    let users = n.div_ceil(CALLS_PER_USER);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let running = rt.block_on(async {
        let upstream = upstream().await;
        let yaml = format!(
            r#"listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
upstream: "http://{upstream}"
log:
  level: "error"
timeouts:
  shutdown: "1s"
queue:
  max_per_user: 1000000
  max_total: 1000000
routes:
  - name: chats.get_messages
    method: GET
    path: "/api/v2/chats/{{chat_id}}/messages"
    limit: 1
    per: "1m"
    lock: "10m"
    on_limit: queue
    max_wait: "1h"
"#
        );
        let config = Config::from_yaml(&yaml).expect("valid config");
        cliqgate::app::start(config).await.expect("proxy starts")
    });
    let connections = match proto {
        "h1" => n,
        _ => n.div_ceil(STREAMS_PER_CONNECTION),
    };
    let mut result = json!({
        "protocol": proto,
        "users": users,
        "connections": connections,
    });
    let mut first_before = None;
    // Two rounds with different users: memory still live after the first hang-up that does not
    // grow in the second is kept for reuse (a cache); memory that doubles is leaked per call.
    for round in 0..2 {
        let exe = std::env::current_exe().expect("own path");
        let mut client = Command::new(exe)
            .env(
                ROLE,
                format!(
                    "client,{proto},{},{n},{users},{}",
                    running.proxy_addr,
                    round * users
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("client starts");
        let mut to_client = client.stdin.take().expect("stdin");
        let mut from_client = BufReader::new(client.stdout.take().expect("stdout"));
        let mut expect_line = |want: &str| {
            let mut line = String::new();
            from_client.read_line(&mut line).expect("client output");
            assert_eq!(line.trim(), want, "client said {line:?}");
        };

        // Every user's window is full: each call that follows is queued.
        expect_line("PRIMED");
        std::thread::sleep(Duration::from_millis(200));
        let (rss_before, heap_before) = (rss(), heap());
        let fds_before = open_fds();
        let first = *first_before.get_or_insert(heap_before);

        writeln!(to_client, "go").expect("tell the client");
        expect_line("SENT");
        wait_for("every call to be queued", Duration::from_secs(120), || {
            queued_total(&running) >= n
        });
        std::thread::sleep(Duration::from_millis(500));
        let queued = queued_total(&running);
        let (rss_queued, heap_queued) = (rss(), heap());
        let fds_queued = open_fds();

        // The client hangs up: every queued call is cancelled and its memory freed.
        drop(to_client);
        let _ = client.wait();
        wait_for(
            "every reservation to be given back",
            Duration::from_secs(60),
            || queued_total(&running) == 0,
        );
        std::thread::sleep(Duration::from_millis(500));
        let (rss_after, heap_after) = (rss(), heap());
        let fds_after = open_fds();

        let per = queued as f64;
        if round == 0 {
            let first_round = json!({
                "queued": queued,
                "rss_before": rss_before,
                "rss_queued": rss_queued,
                "rss_per_call": ((rss_queued - rss_before) as f64 / per).round(),
                "heap_per_call": ((heap_queued.bytes - heap_before.bytes) as f64 / per).round(),
                "allocs_per_call": round2((heap_queued.allocs - heap_before.allocs) as f64 / per),
                "rss_after_hangup": rss_after,
                "heap_after_hangup": heap_after.bytes - heap_before.bytes,
                "growth": growth(&heap_before, &heap_queued, per),
                "kept_after_hangup": growth(&heap_before, &heap_after, per),
                "fds_before": fds_before,
                "fds_queued": fds_queued,
                "fds_after_hangup": fds_after,
            });
            for (k, v) in first_round.as_object().expect("object") {
                result[k] = v.clone();
            }
        } else {
            result["round2_rss_queued"] = json!(rss_queued);
            result["round2_rss_after_hangup"] = json!(rss_after);
            result["round2_heap_after_hangup"] = json!(heap_after.bytes - first.bytes);
            result["round2_kept_after_hangup"] = growth(&first, &heap_after, per);
        }
    }
    // Is what is still resident after both hang-ups in use, or only cached by the allocator?
    if malloc_trim() {
        result["rss_after_trim"] = json!(rss());
    }
    rt.block_on(running.shutdown());
    println!("RESULT {result}");
}

/// The client process: primes every user with one call, then on "go" sends `n` calls and holds
/// them until its stdin closes.
fn client(proto: &str, addr: SocketAddr, n: usize, users: usize, offset: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let held = rt.block_on(async {
        prime(addr, offset, users).await;
        println!("PRIMED");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("go");
        let held = match proto {
            "h1" => send_h1(addr, n, offset, users).await,
            "h2" => send_h2(addr, n, offset, users).await,
            other => panic!("unknown protocol {other}"),
        };
        println!("SENT");
        held
    });
    // Hold every connection (and keep the runtime driving the HTTP/2 ones) until told to stop.
    let _guard = rt.enter();
    let stop = std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    });
    rt.block_on(async {
        while !stop.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    drop(held);
}

/// One call per user over one keep-alive connection: each user's window is then full.
async fn prime(addr: SocketAddr, offset: usize, users: usize) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    for user in offset..offset + users {
        let req = Request::get(path(user))
            .header("host", "cliq.zoho.com")
            .header("authorization", format!("Zoho-oauthtoken {}", token(user)))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(req).await.expect("priming call");
        assert_eq!(response.status(), 200, "priming call for user {user}");
    }
}

/// What a client holds open: HTTP/1.1 connections, or the tasks awaiting HTTP/2 answers.
struct Held {
    _streams: Vec<tokio::net::TcpStream>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn send_h1(addr: SocketAddr, n: usize, offset: usize, users: usize) -> Held {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let user = offset + i % users;
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        if i % 250 == 249 {
            // Paced, so the proxy's accept queue (backlog 1024) never overflows: an overflowing
            // queue drops handshakes that the client believes complete.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let request = format!(
            "GET {} HTTP/1.1\r\nhost: cliq.zoho.com\r\nauthorization: Zoho-oauthtoken {}\r\nuser-agent: bench/1.0\r\naccept: application/json\r\n\r\n",
            path(user),
            token(user)
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        held.push(stream);
    }
    Held {
        _streams: held,
        tasks: Vec::new(),
    }
}

async fn send_h2(addr: SocketAddr, n: usize, offset: usize, users: usize) -> Held {
    let mut tasks = Vec::with_capacity(n + n / STREAMS_PER_CONNECTION + 1);
    let mut i = 0;
    while i < n {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tasks.push(tokio::spawn(async move {
            let _ = conn.await;
        }));
        for _ in 0..STREAMS_PER_CONNECTION.min(n - i) {
            let user = offset + i % users;
            i += 1;
            let req = Request::get(format!("http://cliq.zoho.com{}", path(user)))
                .header("authorization", format!("Zoho-oauthtoken {}", token(user)))
                .header("user-agent", "bench/1.0")
                .header("accept", "application/json")
                .body(Empty::<Bytes>::new())
                .expect("request");
            let mut sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let _ = sender.send_request(req).await;
            }));
        }
        // Let this connection's streams go out before opening the next.
        tokio::task::yield_now().await;
    }
    Held {
        _streams: Vec::new(),
        tasks,
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
