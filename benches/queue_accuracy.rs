//! Queue accuracy: how late a queued call reaches the upstream after its slot opens.
//!
//! ```sh
//! cargo bench --bench queue_accuracy       # about 30 seconds
//! ```
//!
//! The real proxy (`cliqgate::app::start`, memory store, its own 2-worker runtime like the
//! binary's) runs on 127.0.0.1:0 in front of a recording upstream on loopback, which notes the
//! arrival `Instant` of every call. The route allows 1 call per 100 ms per user
//! (`safety_margin: 0s`, so the window is exactly 100 ms), queue mode. Each scenario sends every
//! call at once, one HTTP/1.1 connection per call, from a client on a runtime (thread) of its own.
//!
//! The slot of every queued call is read from the proxy's own store once every call has been
//! decided (`MemoryStore::recent`: the send log of each (route, user) holds the first send and
//! every reservation, as offsets from the store's clock, converted to `Instant`s), so the
//! lateness of a call is exactly `arrival at the upstream - its slot`: the timer's lateness plus
//! the trip through the proxy to the upstream. (Anchoring on the first call's arrival instead
//! would be biased: the first call is forwarded amid the storm of every other call arriving.)
//! The upstream connection pool is warmed first, so no queued call waits for a new connection.
//!
//! - `one user`: 200 calls of one user: one slot every 100 ms for 20 s.
//! - `50 users`: 40 calls each of 50 users, 2000 calls: every 100 ms, 50 slots open within a few
//!   milliseconds of each other (the users' first calls were decided in the same storm), so the
//!   proxy releases a burst of 50 calls at once on its 2 workers.
//!
//! Under `cargo test --all-targets` (no `--bench`) a tiny scenario runs once (2 users, 3 calls,
//! 20 ms window), with no assertion on timing.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cliqgate::config::Config;
use cliqgate::identity::identify;
use cliqgate::limit::{Limiter, Store, UserKey};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn main() {
    let bench = common::bench_mode();
    if bench {
        println!("machine: {}", common::machine());
    }
    let scenarios: Vec<(&str, usize, usize, Duration)> = if bench {
        vec![
            ("one user", 1, 200, Duration::from_millis(100)),
            ("50 users", 50, 40, Duration::from_millis(100)),
        ]
    } else {
        vec![("tiny", 2, 3, Duration::from_millis(20))]
    };
    println!("\nLateness of queued calls: arrival at the upstream minus the slot the limiter reserved (limit 1 per window per user):\n");
    println!("| scenario | window | queued calls | p50 | p90 | p99 | p99.9 | max | min |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, users, calls, window) in scenarios {
        let mut late = run(users, calls, window);
        late.sort_unstable();
        let at = |q: f64| {
            let i = ((late.len() as f64 * q).ceil() as usize).clamp(1, late.len()) - 1;
            ms(late[i])
        };
        println!(
            "| {name} | {} ms | {} | {} | {} | {} | {} | {} | {} |",
            window.as_millis(),
            late.len(),
            at(0.50),
            at(0.90),
            at(0.99),
            at(0.999),
            ms(*late.last().expect("some calls")),
            ms(late[0]),
        );
    }
}

/// Signed nanoseconds as milliseconds.
fn ms(nanos: i128) -> String {
    format!("{:.3} ms", nanos as f64 / 1e6)
}

/// Arrival times at the upstream, by path.
type Arrivals = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// An HTTP/1.1 upstream that answers 200 `{}` and records when each call arrived.
async fn recording_upstream(arrivals: Arrivals) -> SocketAddr {
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
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let at = Instant::now();
                    arrivals
                        .lock()
                        .expect("arrivals")
                        .entry(req.uri().path().to_owned())
                        .or_default()
                        .push(at);
                    async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn token(user: usize) -> String {
    format!(
        "1000.{user:027x}{:032x}",
        (user as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

/// One call on a connection of its own; its status.
async fn call(proxy: SocketAddr, path: String, user: usize) -> u16 {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "cliq.zoho.com")
        .header("authorization", format!("Zoho-oauthtoken {}", token(user)))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(req).await.expect("answer");
    response.status().as_u16()
}

/// Runs one scenario; the lateness of every queued call, in nanoseconds.
fn run(users: usize, calls: usize, window: Duration) -> Vec<i128> {
    let arrivals: Arrivals = Arc::default();
    // The client and the upstream: a runtime of their own, off the proxy's workers.
    let aux = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let upstream = aux.block_on(recording_upstream(arrivals.clone()));
    // The proxy: the binary's runtime (one worker per core).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let yaml = format!(
        r#"listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
upstream: "http://{upstream}"
safety_margin: "0s"
log:
  level: "error"
timeouts:
  shutdown: "1s"
queue:
  max_per_user: 1000
  max_total: 100000
routes:
  - name: queued
    method: GET
    path: "/api/v2/chats/{{chat_id}}/messages"
    limit: 1
    per: "{}ms"
    lock: "10m"
    on_limit: queue
    max_wait: "10m"
  - name: warm
    method: GET
    path: "/warm/{{n}}"
    limit: 1000000
    per: "1m"
    lock: "10m"
    on_limit: reject
"#,
        window.as_millis()
    );
    let config = Config::from_yaml(&yaml).expect("valid config");
    let running = rt
        .block_on(cliqgate::app::start(config))
        .expect("proxy starts");
    let proxy = running.proxy_addr;

    aux.block_on(async {
        // Warm the proxy's upstream pool with as many connections as calls will go at once.
        for _ in 0..2 {
            let warm: Vec<_> = (0..users)
                .map(|u| tokio::spawn(call(proxy, format!("/warm/{u}"), 10_000 + u)))
                .collect();
            for w in warm {
                assert_eq!(w.await.expect("warm-up"), 200);
            }
        }
    });
    arrivals.lock().expect("arrivals").clear();

    // The limiter's slots, recorded while the calls run.
    let stop = Arc::new(AtomicBool::new(false));
    let recorder = {
        let proxy = running.proxy();
        let stop = stop.clone();
        std::thread::spawn(move || record_slots(&proxy, users, &stop))
    };
    // Every call at once (paced by 1 ms per 100 connections, so the listener's backlog never
    // overflows); each user's first call goes at once, the others queue.
    aux.block_on(async {
        let mut all = Vec::with_capacity(users * calls);
        for (i, user) in (0..calls).flat_map(|_| 0..users).enumerate() {
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            all.push(tokio::spawn(call(
                proxy,
                format!("/api/v2/chats/CT_{user}/messages"),
                user,
            )));
        }
        for c in all {
            assert_eq!(c.await.expect("call"), 200, "every queued call is sent");
        }
    });
    stop.store(true, Ordering::Release);
    let slots = recorder.join().expect("slot recorder");
    rt.block_on(running.shutdown());

    let arrivals = arrivals.lock().expect("arrivals");
    let mut late = Vec::with_capacity(users * calls);
    for user in 0..users {
        let mut times = arrivals
            .get(&format!("/api/v2/chats/CT_{user}/messages"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(times.len(), calls, "user {user}: every call arrived");
        times.sort_unstable();
        let slots = &slots[user];
        assert_eq!(slots.len(), calls, "user {user}: one slot per call");
        // Both sorted: the k-th arrival went in the k-th slot (slots are at least a window apart,
        // far more than any lateness). A slot exactly one window after the one before was a
        // reservation (a queued call); the first, or one further apart (the queue had run dry
        // before the call arrived), was a call that went at once: not counted.
        for k in 0..calls {
            let queued = k > 0 && (slots[k] - slots[k - 1]).as_nanos() == window.as_nanos();
            assert!(
                k == 0 || slots[k] - slots[k - 1] >= window,
                "user {user}: slots"
            );
            if queued {
                late.push(signed_nanos(times[k], slots[k]));
            }
        }
    }
    late
}

fn signed_nanos(a: Instant, b: Instant) -> i128 {
    if a >= b {
        a.duration_since(b).as_nanos() as i128
    } else {
        -(b.duration_since(a).as_nanos() as i128)
    }
}

/// Every slot the limiter gave each user's calls (the first send and every reservation), as
/// `Instant`s, sorted: the proxy's own store is read every millisecond until `stop` (its send log
/// holds a reservation from the moment it is made until a later call of the same user trims it,
/// which cannot happen before the reservation's slot has passed).
fn record_slots(
    proxy: &cliqgate::proxy::Proxy,
    users: usize,
    stop: &AtomicBool,
) -> Vec<Vec<Instant>> {
    let Store::Memory(store) = proxy.limiter.as_ref() else {
        unreachable!("the memory store is configured")
    };
    let route = proxy.routes[0].id;
    let by_user: HashMap<UserKey, usize> = (0..users)
        .map(|u| {
            let mut headers = http::HeaderMap::new();
            let value = format!("Zoho-oauthtoken {}", token(u));
            headers.insert(
                http::header::AUTHORIZATION,
                value.parse().expect("header value"),
            );
            let key = identify(&proxy.config.identity, &headers, None).expect("credential");
            (key, u)
        })
        .collect();
    let mut seen = vec![BTreeSet::new(); users];
    while !stop.load(Ordering::Acquire) {
        for saved in store.snapshot() {
            if saved.key.route != route {
                continue;
            }
            if let Some(&u) = by_user.get(&saved.key.user) {
                seen[u].extend(saved.sends);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let clock = Limiter::clock(store);
    // The store keeps send times rounded up to a unit that follows the log's span, so one slot
    // may be seen at a few values a unit or so apart as the log re-encodes; slots themselves are a
    // window apart. The earliest value of each cluster is the finest reading.
    let same_slot = Duration::from_millis(1).as_nanos() as u64;
    seen.into_iter()
        .map(|times| {
            let mut slots: Vec<u64> = Vec::new();
            for at in times {
                if slots.last().is_none_or(|&last| at - last > same_slot) {
                    slots.push(at);
                }
            }
            slots
                .into_iter()
                .map(|at| clock.instant(at).into_std())
                .collect()
        })
        .collect()
}
