//! The limiter conformance suite: the same properties hold for every store.
//!
//! The invariant this product lives by: for every (route, user), no window of `per +
//! safety_margin` ever holds more than `limit` sends, whatever the arrival pattern, the mix of
//! queued and refused calls, cancellations, or concurrency. Time is a fake clock; nothing sleeps.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cliqgate::config::Algorithm;
use cliqgate::limit::{
    Acquire, Clock, Key, Limiter, LockReason, ManualClock, MemoryStore, Nanos, Policy, QueueRule,
    RefusalReason, Reservation, RouteId, UserKey,
};
use proptest::prelude::*;

/// Builds a store on a shared fake clock.
type MakeStore = fn(Arc<ManualClock>) -> Box<dyn Limiter>;

/// Runs `test` once per store, each on a fresh store and a fake clock at 0.
fn each_store(test: impl Fn(&str, &ManualClock, &dyn Limiter)) {
    for (name, make) in stores() {
        let clock = Arc::new(ManualClock::new());
        let store = make(clock.clone());
        test(name, &clock, store.as_ref());
    }
}

/// Every store under test.
fn stores() -> Vec<(&'static str, MakeStore)> {
    vec![("memory", |clock| Box::new(MemoryStore::new(clock, 10_000)))]
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
fn simulate(
    store: &dyn Limiter,
    clock: &ManualClock,
    policy: &Policy,
    ops: &[Op],
) -> Vec<Vec<Nanos>> {
    let mut sends = vec![Vec::new(); 3];
    let mut pending: Vec<Vec<Reservation>> = vec![Vec::new(); 3];
    let redeem_due = |pending: &mut Vec<Vec<Reservation>>, sends: &mut Vec<Vec<Nanos>>| {
        let now = clock.now();
        for (user, list) in pending.iter_mut().enumerate() {
            list.retain(|r| {
                if r.slot > now {
                    return true;
                }
                assert!(
                    store.redeem(r).is_ok(),
                    "no lock was set, so a due slot is always redeemed"
                );
                sends[user].push(r.slot);
                false
            });
        }
    };
    for op in ops {
        match *op {
            Op::Advance(by) => {
                clock.advance(Duration::from_nanos(by));
                redeem_due(&mut pending, &mut sends);
            }
            Op::Call { user, queue } => {
                let rule = queue.map(|max_wait| QueueRule {
                    max_wait,
                    max_per_user: 1_000,
                });
                let now = clock.now();
                match store.acquire(policy, key(user), rule) {
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
                    store.cancel(policy, &r);
                }
            }
        }
    }
    for (user, list) in pending.into_iter().enumerate() {
        sends[user].extend(list.iter().map(|r| r.slot));
    }
    sends
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn no_window_ever_holds_more_than_limit(
        (limit, window, algorithm, ops) in (1u32..6, 5u64..60).prop_flat_map(|(limit, window)| {
            (Just(limit), Just(window), algorithm(limit), prop::collection::vec(op(window), 1..120))
        })
    ) {
        for (name, make) in stores() {
            let clock = Arc::new(ManualClock::new());
            let store = make(clock.clone());
            let policy = policy(limit, window, algorithm);
            let sends = simulate(store.as_ref(), &clock, &policy, &ops);
            for (user, times) in sends.iter().enumerate() {
                let worst = max_in_window(times, policy.window);
                prop_assert!(worst <= limit as usize,
                    "{name}: user {user} sent {worst} in one window of {} (limit {limit}): {times:?}", policy.window);
            }
        }
    }

    #[test]
    fn gcra_decides_exactly_like_governor(
        (limit, burst, window, gaps) in (1u32..8, 1u32..8, 10u64..200).prop_flat_map(|(limit, burst, window)| {
            (Just(limit), Just(burst.min(limit)), Just(window), prop::collection::vec(0u64..40, 1..80))
        })
    ) {
        use governor::clock::FakeRelativeClock;
        use governor::{Quota, RateLimiter};

        let policy = policy(limit, window, Algorithm::Gcra { burst: NonZeroU32::new(burst).expect("burst >= 1") });
        let cliqgate::limit::Kind::Gcra { period, .. } = policy.kind else { unreachable!() };
        let quota = Quota::with_period(Duration::from_nanos(period)).expect("period > 0")
            .allow_burst(NonZeroU32::new(burst).expect("burst >= 1"));
        let gov_clock = FakeRelativeClock::default();
        let governor = RateLimiter::direct_with_clock(quota, gov_clock.clone());
        for (name, make) in stores() {
            let clock = Arc::new(ManualClock::new());
            let store = make(clock.clone());
            for &gap in &gaps {
                clock.advance(Duration::from_nanos(gap));
                gov_clock.advance(Duration::from_nanos(gap));
                let ours = matches!(store.acquire(&policy, key(0), None), Acquire::Now { .. });
                let theirs = governor.check().is_ok();
                prop_assert_eq!(ours, theirs, "{} disagrees with governor at t={}", name, clock.now());
            }
        }
    }
}

#[test]
fn burst_of_limit_from_idle_goes_at_once() {
    each_store(|name, _clock, store| {
        let policy = policy(20, 61_000, Algorithm::Window);
        for i in 0..20 {
            let answer = store.acquire(&policy, key(1), None);
            assert!(
                matches!(answer, Acquire::Now { .. }),
                "{name}: call {i} of the burst: {answer:?}"
            );
        }
        let over = store.acquire(&policy, key(1), None);
        assert!(
            matches!(over, Acquire::Refused(r) if r.reason == RefusalReason::Limited && r.retry_at == 61_000)
        );
    });
}

#[test]
fn sustained_demand_gets_the_whole_quota() {
    each_store(|name, clock, store| {
        let (limit, window) = (20u32, 61_000u64);
        let policy = policy(limit, window, Algorithm::Window);
        let mut sent = 0u64;
        let windows = 50;
        // A caller retries every 100 units, forever hungry.
        while clock.now() < window * windows {
            if let Acquire::Now { .. } = store.acquire(&policy, key(1), None) {
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
    each_store(|name, clock, store| {
        let policy = policy(2, 1_000, Algorithm::Window);
        let rule = Some(QueueRule {
            max_wait: 500,
            max_per_user: 100,
        });
        assert!(matches!(
            store.acquire(&policy, key(1), rule),
            Acquire::Now { .. }
        ));
        assert!(matches!(
            store.acquire(&policy, key(1), rule),
            Acquire::Now { .. }
        ));
        let answer = store.acquire(&policy, key(1), rule);
        assert!(
            matches!(answer, Acquire::Refused(r) if r.reason == RefusalReason::TooFar && r.retry_at == 1_000),
            "{name}: {answer:?}"
        );
        clock.set(600);
        assert!(
            matches!(store.acquire(&policy, key(1), rule), Acquire::Reserved { reservation, .. } if reservation.slot == 1_000)
        );
    });
}

#[test]
fn queue_is_fifo_and_bounded_per_user() {
    each_store(|name, _clock, store| {
        let policy = policy(1, 100, Algorithm::Window);
        let rule = Some(QueueRule {
            max_wait: 10_000,
            max_per_user: 3,
        });
        assert!(matches!(
            store.acquire(&policy, key(1), rule),
            Acquire::Now { .. }
        ));
        let slots: Vec<Nanos> = (0..3)
            .map(|_| match store.acquire(&policy, key(1), rule) {
                Acquire::Reserved { reservation, .. } => reservation.slot,
                other => panic!("{name}: {other:?}"),
            })
            .collect();
        assert_eq!(
            slots,
            vec![100, 200, 300],
            "{name}: one slot per window, in arrival order"
        );
        let full = store.acquire(&policy, key(1), rule);
        assert!(
            matches!(full, Acquire::Refused(r) if r.reason == RefusalReason::QueueFull),
            "{name}: {full:?}"
        );
        // Another user is not behind this one.
        assert!(
            matches!(store.acquire(&policy, key(2), rule), Acquire::Now { .. }),
            "{name}"
        );
    });
}

#[test]
fn cancelled_reservation_gives_its_slot_back() {
    each_store(|name, _clock, store| {
        let policy = policy(1, 100, Algorithm::Window);
        let rule = Some(QueueRule {
            max_wait: 10_000,
            max_per_user: 10,
        });
        assert!(matches!(
            store.acquire(&policy, key(1), rule),
            Acquire::Now { .. }
        ));
        let Acquire::Reserved { reservation, .. } = store.acquire(&policy, key(1), rule) else {
            panic!("{name}")
        };
        store.cancel(&policy, &reservation);
        let Acquire::Reserved {
            reservation: next, ..
        } = store.acquire(&policy, key(1), rule)
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
    each_store(|name, clock, store| {
        let policy = policy(1, 100, Algorithm::Window);
        let rule = Some(QueueRule {
            max_wait: 10_000,
            max_per_user: 10,
        });
        assert!(matches!(
            store.acquire(&policy, key(1), rule),
            Acquire::Now { .. }
        ));
        let Acquire::Reserved { reservation, .. } = store.acquire(&policy, key(1), rule) else {
            panic!("{name}")
        };
        store.lock(key(1), 5_000, LockReason::UpstreamThrottle);
        assert_eq!(store.locks_active(RouteId(0)), 1, "{name}");
        clock.set(reservation.slot);
        let redeemed = store.redeem(&reservation);
        assert!(
            matches!(redeemed, Err(r) if r.reason == RefusalReason::Locked && r.retry_at == 5_000),
            "{name}"
        );
        let answer = store.acquire(&policy, key(1), rule);
        assert!(
            matches!(answer, Acquire::Refused(r) if r.reason == RefusalReason::Locked),
            "{name}: {answer:?}"
        );
        assert!(
            matches!(store.acquire(&policy, key(2), rule), Acquire::Now { .. }),
            "{name}: other users unaffected"
        );
        clock.set(5_000);
        assert!(
            matches!(store.acquire(&policy, key(1), rule), Acquire::Now { .. }),
            "{name}: lock over"
        );
        assert_eq!(store.locks_active(RouteId(0)), 0, "{name}");
    });
}

#[test]
fn idle_keys_are_evicted() {
    each_store(|name, clock, store| {
        let policy = policy(5, 100, Algorithm::Window);
        for user in 0..50 {
            store.acquire(&policy, key(user), None);
        }
        store.lock(key(0), 1_000, LockReason::UpstreamThrottle);
        assert_eq!(store.len(), 50, "{name}");
        clock.set(99);
        assert_eq!(store.evict_idle(), 0, "{name}: still inside the window");
        clock.set(100);
        assert_eq!(store.evict_idle(), 49, "{name}: all but the locked key");
        clock.set(1_000);
        assert_eq!(store.evict_idle(), 1, "{name}");
        assert_eq!(store.len(), 0, "{name}");
    });
}

/// Many threads hammer one key while another thread moves the fake clock: the bound still holds.
#[test]
fn concurrent_callers_never_break_the_bound() {
    const THREADS: usize = 4;
    const CALLS: usize = 3_000;
    for (name, make) in stores() {
        for algorithm in [
            Algorithm::Window,
            Algorithm::Gcra {
                burst: NonZeroU32::new(3).expect("3"),
            },
        ] {
            let clock = Arc::new(ManualClock::new());
            let store: Arc<dyn Limiter> = Arc::from(make(clock.clone()));
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
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (store, sends) = (store.clone(), sends.clone());
                    std::thread::spawn(move || {
                        for i in 0..CALLS {
                            let rule = (i + t) % 2 == 0;
                            let rule = rule.then_some(QueueRule {
                                max_wait: 3_000,
                                max_per_user: 1_000,
                            });
                            let sent = match store.acquire(&policy, key(9), rule) {
                                Acquire::Now { at, .. } => Some(at),
                                Acquire::Reserved { reservation, .. } if i % 5 == 0 => {
                                    store.cancel(&policy, &reservation);
                                    None
                                }
                                Acquire::Reserved { reservation, .. } => Some(reservation.slot),
                                Acquire::Refused(_) => None,
                            };
                            if let Some(at) = sent {
                                sends.lock().expect("no panics while held").push(at);
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().expect("worker");
            }
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
}
