//! The Redis store's hand-overs with `on_error: local`, on a fake clock against a real
//! redis-server: going local, coming back, and the locks a replica holds across both; and the
//! fleet-wide hold when callers move to new keys. Each test replays one sequence in which the
//! fleet could otherwise have sent more than a quota in one window, or sent into a lock.

mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use cliqgate::config::{Algorithm, OnStoreError};
use cliqgate::limit::{
    Acquire, Key, Limiter, LockReason, ManualClock, Nanos, Policy, QueueRule, RedisOptions,
    RedisStore, RefusalReason, RouteId, RouteNames, Store, TokioClock, UserKey,
};
use support::{max_in_any_window, RedisServer};

const SEC: Nanos = 1_000_000_000;
/// The shipped routes' window: one minute plus the one-second safety margin.
const WINDOW: Nanos = 61 * SEC;
/// The shipped `max_wait`.
const MAX_WAIT: Nanos = 30 * SEC;

fn open(redis: &RedisServer, clock: &Arc<ManualClock>, replicas: u32) -> Arc<RedisStore> {
    let options = RedisOptions {
        url: redis.url(),
        // Generous: a loaded CI machine must not turn into a spurious store error.
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_millis(500),
        on_error: OnStoreError::Local,
        replicas,
        prefix: "t:".into(),
        routes: RouteNames::new(["route".to_string()]),
        max_window: Duration::from_nanos(WINDOW),
        max_wait: Duration::from_nanos(MAX_WAIT),
        max_queued_total: 10_000,
        injected_time: true,
    };
    Arc::new(RedisStore::open(options, clock.clone(), None).expect("valid options"))
}

fn policy(limit: u32) -> Policy {
    Policy::new(
        NonZeroU32::new(limit).expect("limit >= 1"),
        Duration::from_nanos(WINDOW),
        Duration::from_secs(600),
        Algorithm::Window,
    )
}

fn user(n: u16) -> Key {
    let mut bytes = [0u8; 16];
    bytes[..2].copy_from_slice(&n.to_be_bytes());
    Key {
        route: RouteId(0),
        user: UserKey(bytes),
    }
}

/// Largest number of sends inside any half-open window `[t, t + window)`.
fn max_in_window(sends: &[Nanos], window: Nanos) -> usize {
    let sends: Vec<Duration> = sends.iter().map(|&at| Duration::from_nanos(at)).collect();
    max_in_any_window(&sends, Duration::from_nanos(window))
}

/// Takes Redis away from a lone replica, lets `users` users send once locally after the
/// outage's strict first window, brings Redis back (empty) and starts the probe that adds their
/// sends to it. Returns the probe's task once the merge has begun (keys are appearing).
async fn merge_under_way(
    redis: &mut RedisServer,
    clock: &ManualClock,
    lone: &Arc<RedisStore>,
    users: u16,
) -> tokio::task::JoinHandle<()> {
    let store = Store::Redis(lone.clone());
    clock.set(100 * SEC);
    redis.kill().await;
    lone.probe().await;
    assert!(!store.ready());
    clock.set(100 * SEC + MAX_WAIT + WINDOW + SEC);
    for n in 0..users {
        let answer = store
            .acquire(&policy(4), user(n), None)
            .await
            .expect("local");
        assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");
    }
    redis.restart().await;
    clock.advance(Duration::from_secs(1));
    let probing = tokio::spawn({
        let lone = lone.clone();
        async move { lone.probe().await }
    });
    while redis
        .command(&["DBSIZE"])
        .await
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
        < 10
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    probing
}

/// Calls queued in Redis just before it fails still go at their slot (the slot was reserved
/// there). Local sends must not start until a window after the last slot Redis may have
/// promised, or both land in one of Zoho's windows.
#[tokio::test(flavor = "current_thread")]
async fn local_sends_wait_for_the_slots_redis_promised_before_the_outage() {
    let mut redis = RedisServer::start().await;
    let clock = Arc::new(ManualClock::new());
    let lone = open(&redis, &clock, 1);
    let store = Store::Redis(lone.clone());
    let policy = policy(20);
    let key = user(7);
    let queue = Some(QueueRule {
        max_wait: MAX_WAIT,
        max_per_user: 1_000,
    });
    let mut sent = Vec::new();

    clock.set(100 * SEC);
    for _ in 0..20 {
        match store
            .acquire(&policy, key, queue)
            .await
            .expect("Redis answers")
        {
            Acquire::Now { at, .. } => sent.push(at),
            other => panic!("a burst of the limit goes at once: {other:?}"),
        }
    }
    // 20 more, queued for 161 s (one window after the burst, 30 s ahead: within max_wait).
    clock.set(131 * SEC);
    let mut queued = Vec::new();
    for _ in 0..20 {
        match store
            .acquire(&policy, key, queue)
            .await
            .expect("Redis answers")
        {
            Acquire::Reserved { reservation, .. } => queued.push(reservation),
            other => panic!("queued in Redis: {other:?}"),
        }
    }
    assert!(queued.iter().all(|r| r.slot == 161 * SEC));

    redis.kill().await;
    clock.set(131 * SEC + 1);
    lone.probe().await;
    assert!(!store.ready(), "the replica noticed the outage");

    // The queued calls go at their slot: Redis cannot be asked, the slot was reserved there.
    clock.set(161 * SEC);
    for reservation in &queued {
        store
            .redeem(&policy, reservation)
            .await
            .expect("on_error: local decides")
            .expect("a slot reserved in Redis is kept");
        sent.push(reservation.slot);
    }
    // From a window after the outage was noticed until well past the promised slots' window,
    // local calls ask every second.
    for second in 192..=260 {
        clock.set(second * SEC);
        while let Acquire::Now { at, .. } = store.acquire(&policy, key, None).await.expect("local")
        {
            sent.push(at);
        }
    }
    assert!(
        sent.iter().any(|&at| at >= 192 * SEC),
        "local sends resume once the promised slots' window is over"
    );
    let most = max_in_window(&sent, WINDOW);
    assert!(most <= 20, "{most} sends in one window (limit 20)");
}

/// Coming back, a replica adds its local sends to Redis. Calls decided locally while it does so
/// must reach Redis too, or Redis hands their quota out again.
#[tokio::test(flavor = "current_thread")]
async fn sends_decided_while_coming_back_reach_redis() {
    let mut redis = RedisServer::start().await;
    let clock = Arc::new(ManualClock::new());
    let lone = open(&redis, &clock, 1);
    let store = Arc::new(Store::Redis(lone.clone()));
    let policy = policy(4);
    let key = user(60_000);

    // 2,000 users sent locally: enough keys that adding them to Redis takes many round trips.
    let probing = merge_under_way(&mut redis, &clock, &lone, 2_000).await;
    // Once the merge has begun, the user sends its whole quota (locally, or after the merge).
    let mut sent = 0;
    for _ in 0..4 {
        let store = store.clone();
        let answer = store.acquire(&policy, key, None).await.expect("decided");
        sent += usize::from(matches!(answer, Acquire::Now { .. }));
    }
    probing.await.expect("the probe ends");
    assert!(store.ready(), "back on Redis");
    clock.advance(Duration::from_secs(1));
    for _ in 0..4 {
        let answer = store
            .acquire(&policy, key, None)
            .await
            .expect("Redis answers");
        sent += usize::from(matches!(answer, Acquire::Now { .. }));
    }
    assert_eq!(sent, 4, "sends of one user within 2 s (limit 4 per 61 s)");
}

/// Decisions wait while the last local sends are added to Redis. If that merge is stopped
/// half-way (its task cancelled, as at shutdown), they must not wait for ever.
#[tokio::test(flavor = "current_thread")]
async fn a_merge_stopped_half_way_releases_the_waiting_decisions() {
    let mut redis = RedisServer::start().await;
    let clock = Arc::new(ManualClock::new());
    let lone = open(&redis, &clock, 1);
    let store = Arc::new(Store::Redis(lone.clone()));
    let policy = policy(4);

    let probing = merge_under_way(&mut redis, &clock, &lone, 1_000).await;
    // Sends decided now go to Redis in the second pass, with decisions held: many of them, so
    // that pass lasts.
    for n in 1_000..5_000 {
        store.acquire(&policy, user(n), None).await.expect("local");
    }
    while !store.ready() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    probing.abort();
    let _ = probing.await;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        store.acquire(&policy, user(60_000), None),
    )
    .await
    .expect("a decision after a merge was stopped half-way")
    .expect("decided");
    assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");
}

/// A lock one replica learned from Zoho reaches the others through Redis; one that was told
/// about it must still honour it if Redis then goes away.
#[tokio::test(flavor = "current_thread")]
async fn a_lock_told_by_redis_holds_through_an_outage() {
    let mut redis = RedisServer::start().await;
    let clock = Arc::new(ManualClock::new());
    let (a, b) = (open(&redis, &clock, 2), open(&redis, &clock, 2));
    let (store_a, store_b) = (Store::Redis(a), Store::Redis(b.clone()));
    let policy = policy(20);
    let key = user(9);

    clock.set(100 * SEC);
    store_a
        .lock(&policy, key, 700 * SEC, LockReason::UpstreamThrottle)
        .await
        .expect("stored in Redis");
    let answer = store_b
        .acquire(&policy, key, None)
        .await
        .expect("Redis answers");
    assert!(
        matches!(answer, Acquire::Refused(r) if r.reason == RefusalReason::Locked),
        "{answer:?}"
    );

    redis.kill().await;
    b.probe().await;
    assert!(!store_b.ready());
    // Past the outage's strict first window, with the lock still running.
    clock.set(100 * SEC + MAX_WAIT + WINDOW + SEC);
    let answer = store_b.acquire(&policy, key, None).await.expect("local");
    assert!(
        matches!(answer, Acquire::Refused(r) if r.reason == RefusalReason::Locked && r.retry_at == 700 * SEC),
        "replica B must not send into the lock it was told about: {answer:?}"
    );
}

fn open_real(redis: &RedisServer, timeout: Duration) -> Arc<RedisStore> {
    let options = RedisOptions {
        url: redis.url(),
        timeout,
        connect_timeout: Duration::from_millis(500),
        on_error: OnStoreError::Reject,
        replicas: 2,
        prefix: "t:".into(),
        routes: RouteNames::new(["route".to_string()]),
        max_window: Duration::from_nanos(WINDOW),
        max_wait: Duration::from_nanos(MAX_WAIT),
        max_queued_total: 10_000,
        injected_time: false,
    };
    let store = RedisStore::open(options, Arc::new(TokioClock::new()), None);
    Arc::new(store.expect("valid options"))
}

/// The refusal of a call for a key nobody has used yet, and how long it is told to wait.
async fn held_for(store: &Store, n: u16) -> Duration {
    let answer = store
        .acquire(&policy(20), user(n), None)
        .await
        .expect("Redis");
    let Acquire::Refused(refusal) = answer else {
        panic!("a key held since the epoch moved went: {answer:?}");
    };
    assert_eq!(refusal.reason, RefusalReason::Limited);
    let now = Limiter::clock(store).now();
    Duration::from_nanos(refusal.retry_at.saturating_sub(now))
}

/// A reload that changes the identity scheme moves Redis's epoch: every replica then treats
/// every key as full until a window after it (on Redis's own clock), keys it has never seen
/// included. The epoch lies as far ahead as calls queued under the old keys may still go.
#[tokio::test(flavor = "current_thread")]
async fn restarting_the_epoch_holds_every_key_on_every_replica() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        open_real(&redis, Duration::from_secs(5)),
        open_real(&redis, Duration::from_secs(5)),
    );
    let (store_a, store_b) = (Store::Redis(a.clone()), Store::Redis(b));
    // Nothing was sent before this test: skip the first deployment's wait (README).
    redis.command(&["SET", "t:epoch", "1"]).await;
    let answer = store_b
        .acquire(&policy(20), user(1), None)
        .await
        .expect("Redis");
    assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");

    a.restart_epoch(Duration::from_nanos(MAX_WAIT)).await;
    for (store, n) in [(&store_a, 2), (&store_b, 3)] {
        let held = held_for(store, n).await;
        let until = Duration::from_nanos(MAX_WAIT + WINDOW);
        assert!(
            held > until - Duration::from_secs(2) && held <= until,
            "{held:?}"
        );
    }
}

/// An epoch asked for while Redis cannot be reached is written before Redis decides again.
#[tokio::test(flavor = "current_thread")]
async fn an_epoch_asked_for_while_redis_is_away_is_written_when_it_is_back() {
    let redis = RedisServer::start().await;
    let lone = open_real(&redis, Duration::from_millis(200));
    let store = Store::Redis(lone.clone());
    redis.command(&["SET", "t:epoch", "1"]).await;
    let answer = store
        .acquire(&policy(20), user(1), None)
        .await
        .expect("Redis");
    assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");

    // A slow Redis (its data kept): the probe times out and the replica goes local.
    redis.pause(Duration::from_millis(1_500)).await;
    lone.probe().await;
    assert!(!store.ready(), "down while Redis is paused");
    lone.restart_epoch(Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    lone.probe().await;
    assert!(store.ready(), "back");
    let held = held_for(&store, 2).await;
    assert!(held > Duration::from_secs(55), "{held:?}");
}
