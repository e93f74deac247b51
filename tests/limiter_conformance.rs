//! The limiter conformance suite: the same properties hold for every store.
//!
//! The invariant this product lives by: for every (route, user), no window of `per +
//! safety_margin` ever holds more than `limit` sends, whatever the arrival pattern, the mix of
//! queued and refused calls, cancellations, or concurrency. Time is a fake clock; nothing sleeps.

mod support;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cliqgate::config::{Algorithm, OnStoreError};
use cliqgate::limit::{
    Acquire, Clock, Key, Limiter, LockReason, ManualClock, MemoryStore, Nanos, Policy, QueueRule,
    RedisOptions, RedisStore, RefusalReason, Reservation, RouteId, Store, UserKey,
};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use support::RedisServer;

/// The stores under test.
const STORES: [&str; 2] = ["memory", "redis"];

/// What the stores need for one test function: a real redis-server (one per test, so tests run
/// in parallel without sharing state; each store also gets its own key prefix).
struct Backends {
    redis: RedisServer,
}

impl Backends {
    async fn start() -> Self {
        Backends {
            redis: RedisServer::start().await,
        }
    }

    /// A fresh, empty store of kind `name` deciding on `clock`.
    fn store(&self, name: &str, clock: &Arc<ManualClock>) -> Store {
        static PREFIX: AtomicU64 = AtomicU64::new(0);
        match name {
            "memory" => Store::Memory(MemoryStore::new(clock.clone(), 10_000)),
            "redis" => {
                let options = RedisOptions {
                    url: self.redis.url(),
                    // Generous: a loaded CI machine must not turn into a spurious store error.
                    timeout: Duration::from_secs(5),
                    connect_timeout: Duration::from_secs(5),
                    on_error: OnStoreError::Reject,
                    replicas: 1,
                    prefix: format!("t{}:", PREFIX.fetch_add(1, Ordering::Relaxed)),
                    routes: cliqgate::limit::RouteNames::new(["route".to_string()]),
                    max_window: Duration::from_secs(1),
                    max_wait: Duration::from_secs(5),
                    max_queued_total: 10_000,
                    injected_time: true,
                };
                let store = RedisStore::open(options, clock.clone(), None).expect("valid options");
                Store::Redis(Arc::new(store))
            }
            other => panic!("no store {other}"),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Runs `test` once per store, each on a fresh store and a fake clock at 0.
fn each_store(test: impl AsyncFn(&str, &ManualClock, &Store)) {
    let rt = runtime();
    rt.block_on(async {
        let backends = Backends::start().await;
        for name in STORES {
            let clock = Arc::new(ManualClock::new());
            let store = backends.store(name, &clock);
            test(name, &clock, &store).await;
        }
    });
}

async fn acquire(store: &Store, policy: &Policy, key: Key, queue: Option<QueueRule>) -> Acquire {
    store
        .acquire(policy, key, queue)
        .await
        .expect("the store answers")
}

fn key(user: u8) -> Key {
    Key {
        route: RouteId(0),
        user: UserKey([user; 16]),
    }
}

fn policy(limit: u32, window: u64, algorithm: Algorithm) -> Policy {
    let limit = NonZeroU32::new(limit).expect("limit >= 1");
    Policy::new(
        limit,
        Duration::from_nanos(window),
        Duration::from_nanos(window * 5),
        algorithm,
    )
}

/// Largest number of sends inside any half-open window `[t, t + window)`.
fn max_in_window(sends: &[Nanos], window: Nanos) -> usize {
    let mut sorted = sends.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[test]
fn max_in_window_counts_half_open_windows() {
    assert_eq!(max_in_window(&[0, 10, 20], 20), 2);
    assert_eq!(max_in_window(&[0, 10, 19], 20), 3);
    assert_eq!(max_in_window(&[5, 5, 5], 1), 3);
    assert_eq!(max_in_window(&[], 10), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Call {
        user: u8,
        queue: Option<u64>,
    },
    /// The caller of the oldest pending reservation of `user` goes away.
    Cancel {
        user: u8,
    },
}

fn op(window: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..window).prop_map(Op::Advance),
        5 => (0u8..3, prop::option::of(0..window * 3)).prop_map(|(user, queue)| Op::Call { user, queue }),
        1 => (0u8..3).prop_map(|user| Op::Cancel { user }),
    ]
}

fn algorithm(limit: u32) -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::Window),
        (1..=limit).prop_map(|b| Algorithm::Gcra {
            burst: NonZeroU32::new(b).expect("b >= 1")
        }),
    ]
}

/// Runs `ops` against a store and returns the send times per user, checking each answer's shape.
async fn simulate(
    store: &Store,
    clock: &ManualClock,
    policy: &Policy,
    ops: &[Op],
) -> Vec<Vec<Nanos>> {
    let mut sends = vec![Vec::new(); 3];
    let mut pending: Vec<Vec<Reservation>> = vec![Vec::new(); 3];
    for op in ops {
        match *op {
            Op::Advance(by) => {
                clock.advance(Duration::from_nanos(by));
                // Callers whose slot has come are sent.
                let now = clock.now();
                for (user, list) in pending.iter_mut().enumerate() {
                    let (due, waiting): (Vec<_>, Vec<_>) =
                        list.drain(..).partition(|r| r.slot <= now);
                    *list = waiting;
                    for r in due {
                        let redeemed = store.redeem(policy, &r).await.expect("the store answers");
                        assert!(
                            redeemed.is_ok(),
                            "no lock was set, so a due slot is always redeemed"
                        );
                        sends[user].push(r.slot);
                    }
                }
            }
            Op::Call { user, queue } => {
                let rule = queue.map(|max_wait| QueueRule {
                    max_wait,
                    max_per_user: 1_000,
                });
                let now = clock.now();
                match acquire(store, policy, key(user), rule).await {
                    Acquire::Now { at, .. } => {
                        assert_eq!(at, now);
                        sends[user as usize].push(at);
                    }
                    Acquire::Reserved { reservation, .. } => {
                        let max_wait = queue.expect("reservations only in queue mode");
                        assert!(reservation.slot > now && reservation.slot - now <= max_wait);
                        pending[user as usize].push(reservation);
                    }
                    Acquire::Refused(refusal) => {
                        assert!(
                            refusal.retry_at > now,
                            "a refusal always points to the future"
                        );
                        match refusal.reason {
                            RefusalReason::Limited => assert!(queue.is_none()),
                            RefusalReason::TooFar => {
                                assert!(refusal.retry_at - now > queue.unwrap_or(0))
                            }
                            other => panic!("unexpected refusal {other:?}"),
                        }
                    }
                }
            }
            Op::Cancel { user } => {
                if !pending[user as usize].is_empty() {
                    let r = pending[user as usize].remove(0);
                    store.cancel(policy, &r).await.expect("the store answers");
                }
            }
        }
    }
    for (user, list) in pending.into_iter().enumerate() {
        sends[user].extend(list.iter().map(|r| r.slot));
    }
    sends
}

/// Runs a property over generated cases, every case against every store.
fn check_property<S: Strategy>(
    cases: u32,
    strategy: S,
    property: impl AsyncFn(&str, Arc<ManualClock>, Store, S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: Clone,
{
    let rt = runtime();
    let backends = rt.block_on(Backends::start());
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let result = runner.run(&strategy, |input| {
        rt.block_on(async {
            for name in STORES {
                let clock = Arc::new(ManualClock::new());
                let store = backends.store(name, &clock);
                property(name, clock, store, input.clone()).await?;
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn no_window_ever_holds_more_than_limit() {
    let cases = (1u32..6, 5u64..60).prop_flat_map(|(limit, window)| {
        (
            Just(limit),
            Just(window),
            algorithm(limit),
            prop::collection::vec(op(window), 1..120),
        )
    });
    check_property(
        300,
        cases,
        async |name, clock, store, (limit, window, algorithm, ops)| {
            let policy = policy(limit, window, algorithm);
            let sends = simulate(&store, &clock, &policy, &ops).await;
            for (user, times) in sends.iter().enumerate() {
                let worst = max_in_window(times, policy.window);
                prop_assert!(
                worst <= limit as usize,
                "{name}: user {user} sent {worst} in one window of {} (limit {limit}): {times:?}",
                policy.window
            );
            }
            Ok(())
        },
    );
}

#[test]
fn gcra_decides_exactly_like_governor() {
    use governor::clock::FakeRelativeClock;
    use governor::{Quota, RateLimiter};

    let cases = (1u32..8, 1u32..8, 10u64..200).prop_flat_map(|(limit, burst, window)| {
        (
            Just(limit),
            Just(burst.min(limit)),
            Just(window),
            prop::collection::vec(0u64..40, 1..80),
        )
    });
    check_property(
        200,
        cases,
        async |name, clock, store, (limit, burst, window, gaps)| {
            let burst = NonZeroU32::new(burst).expect("burst >= 1");
            let policy = policy(limit, window, Algorithm::Gcra { burst });
            let cliqgate::limit::Kind::Gcra { period, .. } = policy.kind else {
                unreachable!("a gcra policy")
            };
            let quota = Quota::with_period(Duration::from_nanos(period))
                .expect("period > 0")
                .allow_burst(burst);
            let gov_clock = FakeRelativeClock::default();
            let governor = RateLimiter::direct_with_clock(quota, gov_clock.clone());
            for &gap in &gaps {
                clock.advance(Duration::from_nanos(gap));
                gov_clock.advance(Duration::from_nanos(gap));
                let ours = matches!(
                    acquire(&store, &policy, key(0), None).await,
                    Acquire::Now { .. }
                );
                let theirs = governor.check().is_ok();
                prop_assert_eq!(
                    ours,
                    theirs,
                    "{} disagrees with governor at t={}",
                    name,
                    clock.now()
                );
            }
            Ok(())
        },
    );
}

#[test]
fn burst_of_limit_from_idle_goes_at_once() {
    each_store(async |name, _clock, store| {
        let policy = policy(20, 61_000, Algorithm::Window);
        for i in 0..20 {
            let answer = acquire(store, &policy, key(1), None).await;
            assert!(
                matches!(answer, Acquire::Now { .. }),
                "{name}: call {i} of the burst: {answer:?}"
            );
        }
        let over = acquire(store, &policy, key(1), None).await;
        assert!(
            matches!(over, Acquire::Refused(r) if r.reason == RefusalReason::Limited && r.retry_at == 61_000)
        );
    });
}

#[test]
fn sustained_demand_gets_the_whole_quota() {
    each_store(async |name, clock, store| {
        let (limit, window) = (20u32, 61_000u64);
        let policy = policy(limit, window, Algorithm::Window);
        let mut sent = 0u64;
        let windows = 50;
        // A caller retries every 100 units, forever hungry.
        while clock.now() < window * windows {
            if let Acquire::Now { .. } = acquire(store, &policy, key(1), None).await {
                sent += 1;
            } else {
                clock.advance(Duration::from_nanos(100));
            }
        }
        let quota = u64::from(limit) * windows;
        assert!(
            sent * 100 >= quota * 95,
            "{name}: sent {sent} of a quota of {quota}"
        );
        assert!(
            sent <= quota + u64::from(limit),
            "{name}: sent {sent}, more than the quota {quota}"
        );
    });
}

#[test]
fn slot_beyond_max_wait_is_refused_at_once() {
    each_store(async |name, clock, store| {
        let policy = policy(2, 1_000, Algorithm::Window);
        let rule = Some(QueueRule {
            max_wait: 500,
            max_per_user: 100,
        });
        assert!(matches!(
            acquire(store, &policy, key(1), rule).await,
            Acquire::Now { .. }
        ));
        assert!(matches!(
            acquire(store, &policy, key(1), rule).await,
            Acquire::Now { .. }
        ));
        let answer = acquire(store, &policy, key(1), rule).await;
        assert!(
            matches!(answer, Acquire::Refused(r) if r.reason == RefusalReason::TooFar && r.retry_at == 1_000),
            "{name}: {answer:?}"
        );
        clock.set(600);
        assert!(
            matches!(acquire(store, &policy, key(1), rule).await, Acquire::Reserved { reservation, .. } if reservation.slot == 1_000)
        );
    });
}

#[test]
fn queue_is_fifo_and_bounded_per_user() {
    each_store(async |name, _clock, store| {
        let policy = policy(1, 100, Algorithm::Window);
        let rule = Some(QueueRule {
            max_wait: 10_000,
            max_per_user: 3,
        });
        assert!(matches!(
            acquire(store, &policy, key(1), rule).await,
            Acquire::Now { .. }
        ));
        let mut slots: Vec<Nanos> = Vec::new();
        for _ in 0..3 {
            match acquire(store, &policy, key(1), rule).await {
                Acquire::Reserved { reservation, .. } => slots.push(reservation.slot),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(
            slots,
            vec![100, 200, 300],
            "{name}: one slot per window, in arrival order"
        );
        let full = acquire(store, &policy, key(1), rule).await;
        assert!(
            matches!(full, Acquire::Refused(r) if r.reason == RefusalReason::QueueFull),
            "{name}: {full:?}"
        );
        // Another user is not behind this one.
        assert!(
            matches!(
                acquire(store, &policy, key(2), rule).await,
                Acquire::Now { .. }
            ),
            "{name}"
        );
    });
}

#[test]
fn cancelled_reservation_gives_its_slot_back() {
    each_store(async |name, _clock, store| {
        let policy = policy(1, 100, Algorithm::Window);
        let rule = Some(QueueRule {
            max_wait: 10_000,
            max_per_user: 10,
        });
        assert!(matches!(
            acquire(store, &policy, key(1), rule).await,
            Acquire::Now { .. }
        ));
        let Acquire::Reserved { reservation, .. } = acquire(store, &policy, key(1), rule).await
        else {
            panic!("{name}")
        };
        store.cancel(&policy, &reservation).await.expect("cancel");
        let Acquire::Reserved {
            reservation: next, ..
        } = acquire(store, &policy, key(1), rule).await
        else {
            panic!("{name}")
        };
        assert_eq!(
            next.slot, reservation.slot,
            "{name}: the next caller takes the freed slot"
        );
    });
}

#[test]
fn lock_refuses_until_it_ends_and_stops_waiters() {
    each_store(async |name, clock, store| {
        let policy = policy(1, 100, Algorithm::Window);
        let rule = Some(QueueRule {
            max_wait: 10_000,
            max_per_user: 10,
        });
        assert!(matches!(
            acquire(store, &policy, key(1), rule).await,
            Acquire::Now { .. }
        ));
        let Acquire::Reserved { reservation, .. } = acquire(store, &policy, key(1), rule).await
        else {
            panic!("{name}")
        };
        store
            .lock(&policy, key(1), 5_000, LockReason::UpstreamThrottle)
            .await
            .expect("lock");
        assert_eq!(store.locks_active(RouteId(0)), 1, "{name}");
        clock.set(reservation.slot);
        let redeemed = store.redeem(&policy, &reservation).await.expect("redeem");
        assert!(
            matches!(redeemed, Err(r) if r.reason == RefusalReason::Locked && r.retry_at == 5_000),
            "{name}"
        );
        let answer = acquire(store, &policy, key(1), rule).await;
        assert!(
            matches!(answer, Acquire::Refused(r) if r.reason == RefusalReason::Locked),
            "{name}: {answer:?}"
        );
        assert!(
            matches!(
                acquire(store, &policy, key(2), rule).await,
                Acquire::Now { .. }
            ),
            "{name}: other users unaffected"
        );
        clock.set(5_000);
        assert!(
            matches!(
                acquire(store, &policy, key(1), rule).await,
                Acquire::Now { .. }
            ),
            "{name}: lock over"
        );
        assert_eq!(store.locks_active(RouteId(0)), 0, "{name}");
    });
}

#[test]
fn idle_keys_are_evicted_from_memory() {
    // Redis expires its keys itself (checked end to end); this is the embedded store's sweep.
    let clock = Arc::new(ManualClock::new());
    let store = MemoryStore::new(clock.clone(), 10_000);
    let policy = policy(5, 100, Algorithm::Window);
    for user in 0..50 {
        store.acquire_now(&policy, key(user), None);
    }
    store.lock_now(key(0), 1_000);
    assert_eq!(store.keys(), 50);
    clock.set(99);
    assert_eq!(store.evict_idle_now(), 0, "still inside the window");
    clock.set(100);
    assert_eq!(store.evict_idle_now(), 49, "all but the locked key");
    clock.set(1_000);
    assert_eq!(store.evict_idle_now(), 1);
    assert_eq!(store.keys(), 0);
}

/// Many tasks on several threads hammer one key while a thread moves the fake clock: the bound
/// still holds.
#[test]
fn concurrent_callers_never_break_the_bound() {
    const TASKS: usize = 4;
    const CALLS: usize = 1_500;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let backends = Backends::start().await;
        for name in STORES {
            let gcra = Algorithm::Gcra {
                burst: NonZeroU32::new(3).expect("3"),
            };
            for algorithm in [Algorithm::Window, gcra] {
                if name == "redis" && algorithm == gcra {
                    // With an injected clock, two tasks may read the fake time in one order and
                    // reach Redis in the other; GCRA assumes time never goes backwards. Real
                    // deployments read TIME inside the script, in execution order.
                    continue;
                }
                let clock = Arc::new(ManualClock::new());
                let store = Arc::new(backends.store(name, &clock));
                let policy = policy(7, 1_000, algorithm);
                let sends = Arc::new(Mutex::new(Vec::new()));
                let stop = Arc::new(AtomicBool::new(false));
                let ticker = {
                    let (clock, stop) = (clock.clone(), stop.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            clock.advance(Duration::from_nanos(7));
                            std::thread::yield_now();
                        }
                    })
                };
                let mut workers = tokio::task::JoinSet::new();
                for t in 0..TASKS {
                    let (store, sends) = (store.clone(), sends.clone());
                    workers.spawn(async move {
                        for i in 0..CALLS {
                            let rule = ((i + t) % 2 == 0).then_some(QueueRule {
                                max_wait: 3_000,
                                max_per_user: 1_000,
                            });
                            let sent = match acquire(&store, &policy, key(9), rule).await {
                                Acquire::Now { at, .. } => Some(at),
                                Acquire::Reserved { reservation, .. } if i % 5 == 0 => {
                                    store.cancel(&policy, &reservation).await.expect("cancel");
                                    None
                                }
                                Acquire::Reserved { reservation, .. } => Some(reservation.slot),
                                Acquire::Refused(_) => None,
                            };
                            if let Some(at) = sent {
                                sends.lock().expect("no panics while held").push(at);
                            }
                        }
                    });
                }
                workers.join_all().await;
                stop.store(true, Ordering::Relaxed);
                ticker.join().expect("ticker");
                let sends = sends.lock().expect("workers done").clone();
                assert!(sends.len() > 7, "{name}: the test must actually send");
                let worst = max_in_window(&sends, policy.window);
                assert!(
                    worst <= 7,
                    "{name} {algorithm:?}: {worst} sends in one window"
                );
            }
        }
    });
}

/// A reload may switch a route between `window` and `gcra` while its users are busy. Whatever the
/// direction, the sends on either side of the switch together never put more than `limit` in a
/// window, and the route keeps sending after it.
#[test]
fn switching_algorithm_never_breaks_the_bound() {
    each_store(async |name, clock, store| {
        let (limit, window) = (4, 1_000);
        let window_log = policy(limit, window, Algorithm::Window);
        let gcra = policy(
            limit,
            window,
            Algorithm::Gcra {
                burst: NonZeroU32::new(limit).expect("4"),
            },
        );
        for (first, then, user) in [(&gcra, &window_log, 1), (&window_log, &gcra, 2)] {
            let mut sends = Vec::new();
            // A greedy caller: at each instant, as many calls as the store lets go.
            let mut t = 0;
            while t <= 12_000 {
                clock.set(t);
                let policy = if t < 10 { first } else { then };
                while matches!(
                    acquire(store, policy, key(user), None).await,
                    Acquire::Now { .. }
                ) {
                    sends.push(t);
                    assert!(sends.len() < 1_000, "{name}: no call is ever refused");
                }
                t += 10;
            }
            assert!(
                max_in_window(&sends, window) <= limit as usize,
                "{name}: {:?} then {:?}: {sends:?}",
                first.kind,
                then.kind
            );
            assert!(
                sends.iter().any(|&s| s >= 10),
                "{name}: nothing was sent after the switch"
            );
        }
    });
}
