//! The shared store: several replicas, one quota per (route, user).
//!
//! Every decision is one Lua script run inside Redis (or Valkey): it reads Redis's own clock
//! (`TIME`), checks the key's lock, computes the next free slot and records the send or the
//! reservation, atomically. Replica clocks never matter; no slot is ever given twice.
//!
//! Keys carry a hash tag, `{route:user}`, so everything about one (route, user) lives in one
//! Redis Cluster slot, and expire by themselves once they constrain nothing.
//!
//! When Redis is unreachable or slow the store follows `on_error`: `reject` refuses limited calls,
//! `local` decides in this process with `limit / replicas` of every quota. Either way a probe
//! brings it back to Redis by itself. The hand-overs are conservative, so the fleet stays under
//! every threshold across an outage:
//! - going local, every key starts as if its (local share of the) quota was used at the last slot
//!   Redis may have promised (calls queued there still go at their slot), since what the fleet
//!   sent just before is unknown; locks Redis told this replica about are kept locally;
//! - coming back, this replica first adds its local sends to Redis (holding new decisions for
//!   the last of them), and for one window decides with headroom for replicas that have not yet
//!   come back (`limit - (replicas - 1) x share`);
//! - a Redis that lost its data (restart without persistence) is noticed through an epoch key:
//!   in its first window every key is treated as if its whole quota went when the data began.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::memory::Recent;
use super::{
    clock, Acquire, Clock, Key, Kind, MemoryStore, Nanos, Policy, QueueRule, QuotaView, Refusal,
    RefusalReason, Reservation, RouteId, RouteNames, StoreError, UserKey,
};
use crate::config::OnStoreError;
use crate::metrics::Metrics;

/// `GET /admin/limits` for this store (a child module: it reads the store's private state).
#[path = "redis_admin.rs"]
mod admin;

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// Shared identity answers go in one Redis hash per this long ([`RedisStore::shared_answer`]).
const ANSWER_BUCKET_MS: u64 = 60 * 60 * 1000;

/// The wall clock in Unix milliseconds (shared answers carry their expiry in it).
fn unix_ms_now() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// How often a replica checks on Redis (faster while it is down, to come back quickly).
const PROBE_INTERVAL_UP: Duration = Duration::from_secs(1);
const PROBE_INTERVAL_DOWN: Duration = Duration::from_millis(250);

/// Everything needed to open a [`RedisStore`].
#[derive(Clone)]
pub struct RedisOptions {
    pub url: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub on_error: OnStoreError,
    pub replicas: u32,
    /// Prefix of every key, so several deployments (or tests) can share one Redis.
    pub prefix: String,
    /// Route names by `RouteId`: keys use names, which every replica with the same config shares.
    pub routes: Arc<RouteNames>,
    /// The longest `per + safety_margin` of any route: how long hand-overs stay conservative.
    pub max_window: Duration,
    /// The longest `max_wait` of any queueing route: how far ahead Redis may have promised slots
    /// (see [`RedisStore::queue_waits_up_to`]).
    pub max_wait: Duration,
    pub max_queued_total: usize,
    /// Tests only: decide on the local (fake) clock instead of Redis's `TIME`.
    pub injected_time: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Up,
    /// Unreachable since this local time.
    Down {
        since: Nanos,
    },
    /// Back, and adding what this replica sent alone to Redis; decisions wait for it to finish.
    Merging {
        since: Nanos,
    },
    /// Back, deciding with headroom until this local time.
    Recovering {
        until: Nanos,
    },
}

struct Scripts {
    acquire_window: Script,
    acquire_gcra: Script,
    cancel: Script,
    check_lock: Script,
    lock: Script,
    merge: Script,
    restart_epoch: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            acquire_window: with_prelude(include_str!("lua/acquire_window.lua")),
            acquire_gcra: with_prelude(include_str!("lua/acquire_gcra.lua")),
            cancel: with_prelude(include_str!("lua/cancel.lua")),
            check_lock: with_prelude(include_str!("lua/check_lock.lua")),
            lock: with_prelude(include_str!("lua/lock.lua")),
            merge: with_prelude(include_str!("lua/merge.lua")),
            restart_epoch: with_prelude(include_str!("lua/restart_epoch.lua")),
        }
    }
}

pub struct RedisStore {
    conn: ConnectionManager,
    scripts: Scripts,
    options: RedisOptions,
    clock: Arc<dyn Clock>,
    /// This process's id in reservation members, so members never collide across replicas.
    replica: u64,
    seq: AtomicU64,
    /// Written on the hand-overs; read by every decision (a local one holds it while it
    /// decides, so a merge's second pass cannot begin in the middle of one).
    health: RwLock<Health>,
    /// Decides while Redis is away (`on_error: local`).
    fallback: MemoryStore,
    /// Calls of this process holding a Redis reservation (bounded by `max_queued_total`).
    queued: AtomicUsize,
    /// Locks this process learned or was told about, for the `locks_active` gauge.
    locks_seen: Mutex<HashMap<Key, Nanos>>,
    /// The longest queue wait Redis may have granted (nanoseconds; only grows).
    longest_wait: AtomicU64,
    /// An epoch Redis has yet to be given ([`RedisStore::restart_epoch`]; 0: none).
    epoch_due: AtomicU64,
    /// Wakes the decisions waiting for a merge ([`Health::Merging`]) to end.
    merged: tokio::sync::Notify,
    metrics: Option<Arc<Metrics>>,
}

/// Leaves [`Health::Merging`] for `Down` if a merge stops half-way without an error (its task
/// was cancelled), so that decisions waiting for the merge do not wait for ever.
struct MergeGuard<'a>(&'a RedisStore);

impl Drop for MergeGuard<'_> {
    fn drop(&mut self) {
        let mut health = self.0.health.write().unwrap_or_else(|p| p.into_inner());
        if let Health::Merging { since } = *health {
            *health = Health::Down { since };
            drop(health);
            self.0.merged.notify_waiters();
        }
    }
}

impl RedisStore {
    /// Opens the store. The connection is made lazily: the proxy starts (and serves according to
    /// `on_error`) even while Redis is down.
    pub fn open(
        options: RedisOptions,
        clock: Arc<dyn Clock>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(options.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {:?}", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(1)
            .set_max_delay(options.connect_timeout);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Unavailable(format!("{:?}", e.kind())))?;
        let fallback = MemoryStore::new(clock.clone(), options.max_queued_total);
        Ok(RedisStore {
            conn,
            scripts: Scripts::new(),
            replica: rand::random(),
            seq: AtomicU64::new(0),
            health: RwLock::new(Health::Up),
            fallback,
            queued: AtomicUsize::new(0),
            locks_seen: Mutex::new(HashMap::new()),
            longest_wait: AtomicU64::new(clock::nanos(options.max_wait)),
            epoch_due: AtomicU64::new(0),
            merged: tokio::sync::Notify::new(),
            metrics,
            clock,
            options,
        })
    }

    /// False while Redis is unreachable (`/readyz`).
    pub fn ready(&self) -> bool {
        !matches!(self.health(), Health::Down { .. })
    }

    /// Moves Redis's epoch to `ahead` from now, so every replica treats every key as full until
    /// a window after that (the epoch guard, as after a Redis that lost its data), and holds the
    /// local fallback the same way. For a change that moves callers to new keys (the identity
    /// scheme); `ahead` covers the slots already promised under the old keys. If Redis cannot
    /// be told now, it is told before it decides again (when the store comes back).
    pub async fn restart_epoch(&self, ahead: Duration) {
        let at = self.clock.now().saturating_add(clock::nanos(ahead));
        self.fallback.raise_floor(at);
        self.epoch_due.fetch_max(at, Ordering::AcqRel);
        if !matches!(self.health(), Health::Down { .. } | Health::Merging { .. }) {
            let _ = self.send_epoch().await;
        }
    }

    /// Writes the epoch [`RedisStore::restart_epoch`] asked for, if any is still due. The epoch
    /// is given as an offset from now: Redis's clock is not this process's.
    async fn send_epoch(&self) -> bool {
        let due = self.epoch_due.load(Ordering::Acquire);
        if due == 0 {
            return true;
        }
        let now = self.clock.now();
        let mut invocation = self.scripts.restart_epoch.prepare_invoke();
        invocation
            .key(self.epoch_key())
            .arg(self.now_arg(now))
            .arg(self.units(due.saturating_sub(now)));
        if self.run::<i64>("epoch", invocation).await.is_err() {
            return false;
        }
        // A later restart asked meanwhile stays due.
        let _ = self
            .epoch_due
            .compare_exchange(due, 0, Ordering::AcqRel, Ordering::Acquire);
        true
    }

    /// A reload may let routes queue longer: slots Redis promises can then lie further ahead,
    /// and an outage must hold local sends back past them. Never shrinks (slots promised under
    /// the old, longer wait may still be outstanding).
    pub fn queue_waits_up_to(&self, max_wait: Duration) {
        self.longest_wait
            .fetch_max(clock::nanos(max_wait), Ordering::AcqRel);
    }

    fn health(&self) -> Health {
        *self.health.read().unwrap_or_else(|p| p.into_inner())
    }

    fn set_health(&self, health: Health) {
        *self.health.write().unwrap_or_else(|p| p.into_inner()) = health;
    }

    // ---- keys and units ----

    fn key_base(&self, key: &Key) -> String {
        let route = self
            .options
            .routes
            .name(key.route)
            .unwrap_or_else(|| "?".to_string());
        format!("{}{{{route}:{}}}", self.options.prefix, key.user.hex())
    }

    fn epoch_key(&self) -> String {
        format!("{}epoch", self.options.prefix)
    }

    /// Redis decides in microseconds; a fake clock's units pass through unchanged.
    fn units(&self, ns: Nanos) -> i64 {
        let units = if self.options.injected_time {
            ns
        } else {
            ns.div_ceil(1_000)
        };
        i64::try_from(units).unwrap_or(i64::MAX)
    }

    fn nanos(&self, units: i64) -> Nanos {
        let units = u64::try_from(units).unwrap_or(0);
        if self.options.injected_time {
            units
        } else {
            units.saturating_mul(1_000)
        }
    }

    /// The `now` a script decides on: empty (Redis's TIME), or the injected clock's reading.
    fn now_arg(&self, injected_now: Nanos) -> String {
        if self.options.injected_time {
            injected_now.to_string()
        } else {
            String::new()
        }
    }

    /// The local time a script's relative answer ("in `wait`") counts from. With Redis's clock
    /// that is the moment the answer arrived: later than the decision, so slots are never early.
    fn answer_base(&self, injected_now: Nanos) -> Nanos {
        if self.options.injected_time {
            injected_now
        } else {
            self.clock.now()
        }
    }

    fn units_per_ms(&self) -> i64 {
        if self.options.injected_time {
            0
        } else {
            1_000
        }
    }

    fn member(&self, seq: u64) -> String {
        format!("{:016x}:{seq:x}", self.replica)
    }

    // ---- talking to Redis ----

    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let result =
            tokio::time::timeout(self.options.timeout, invocation.invoke_async(&mut conn)).await;
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => StoreError::Unavailable(format!("{:?}", e.kind())),
            Err(_) => StoreError::Timeout,
        };
        self.failed(op, &error);
        Err(error)
    }

    /// Counts the failure and, on the first one, hands decisions over (see the module docs).
    fn failed(&self, op: &'static str, error: &StoreError) {
        if let Some(metrics) = &self.metrics {
            metrics.store_error(op);
        }
        let now = self.clock.now();
        let mut health = self.health.write().unwrap_or_else(|p| p.into_inner());
        match *health {
            Health::Down { .. } => {}
            // The merge failed half-way: this replica's local history is still its own, and
            // the floor set when the outage began still holds.
            Health::Merging { since } => {
                *health = Health::Down { since };
                drop(health);
                self.merged.notify_waiters();
            }
            Health::Up | Health::Recovering { .. } => {
                // Every key is full until a window after the last slot Redis may have promised:
                // calls queued in Redis before the outage still go when their slot comes (their
                // slot was reserved there), up to the longest queue wait from now. Set before
                // the health lock is let go: a local decision never sees Down without it.
                self.fallback.clear();
                let promised = now.saturating_add(self.longest_wait.load(Ordering::Acquire));
                self.fallback.assume_full_at(Some(promised));
                *health = Health::Down { since: now };
                drop(health);
                tracing::warn!(op, error = %error, on_error = ?self.options.on_error,
                    "Redis store unavailable; deciding per on_error until it is back");
            }
        }
    }

    /// Whether the sends in Redis may be under keys users no longer map to: Redis recorded
    /// another way of keying users ([`crate::identity::scheme_id`]) than `scheme`, or it cannot
    /// be asked now. None recorded (a new Redis, or a version that did not record it) counts as
    /// the same. The caller then moves the epoch before [`RedisStore::record_identity_scheme`].
    pub async fn identity_scheme_may_differ(&self, scheme: &str) -> bool {
        let mut get = redis::cmd("GET");
        get.arg(self.identity_scheme_key());
        let mut conn = self.conn.clone();
        // The first command of a process: it may have to connect first (the connection is lazy),
        // so a slow connect is not taken for a Redis that cannot tell.
        let wait = self.options.connect_timeout + self.options.timeout;
        let found: Result<Result<Option<String>, _>, _> =
            tokio::time::timeout(wait, get.query_async(&mut conn)).await;
        match found {
            Ok(Ok(recorded)) => recorded.is_some_and(|recorded| recorded != scheme),
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(
                    "cannot read the identity scheme from Redis; holding as if it changed"
                );
                true
            }
        }
    }

    /// Records how users are keyed, once the epoch holds what was sent under another scheme.
    /// Best effort: if it fails, the next start cannot tell and holds again.
    pub async fn record_identity_scheme(&self, scheme: &str) {
        let mut set = redis::cmd("SET");
        set.arg(self.identity_scheme_key()).arg(scheme);
        let mut conn = self.conn.clone();
        let _: Result<Result<(), _>, _> =
            tokio::time::timeout(self.options.timeout, set.query_async(&mut conn)).await;
    }

    fn identity_scheme_key(&self) -> String {
        format!("{}identity_scheme", self.options.prefix)
    }

    // ---- resolve mode's answers, shared by the replicas ----

    /// Who owns a token, as another replica (or this one before a restart) learnt it: the user
    /// key and how much longer the answer holds. `scope` tells apart answers about one endpoint
    /// and field from another's. Best effort: `None` when Redis is away, slow or has none, and
    /// the caller asks the endpoint itself. Redis holds hashes only, never a token.
    ///
    /// The answers of one hour go in one hash (a key per token would crowd the limiter's keys
    /// out of the admin API's bounded `SCAN`), each field `token hash -> user hash:expiry`, the
    /// expiry in Unix milliseconds; a hash expires three hours after its last write, when every
    /// answer in it has (`ttl` is at most an hour).
    pub async fn shared_answer(&self, scope: &str, token: &UserKey) -> Option<(UserKey, Duration)> {
        if matches!(self.health(), Health::Down { .. }) {
            return None;
        }
        let now_ms = unix_ms_now();
        let hour = now_ms / ANSWER_BUCKET_MS;
        let field = token.hex();
        let mut pipe = redis::pipe();
        for bucket in [hour, hour.saturating_sub(1)] {
            pipe.hget(self.answers_key(scope, bucket), &field);
        }
        let mut conn = self.conn.clone();
        let found: Result<Result<Vec<Option<String>>, _>, _> =
            tokio::time::timeout(self.options.timeout, pipe.query_async(&mut conn)).await;
        let found = match found {
            Ok(Ok(found)) => found,
            _ => {
                self.answers_failed();
                return None;
            }
        };
        found.into_iter().flatten().find_map(|value| {
            let (user, expires_ms) = value.split_once(':')?;
            let left_ms = expires_ms.parse::<u64>().ok()?.checked_sub(now_ms)?;
            Some((UserKey::from_hex(user)?, Duration::from_millis(left_ms)))
        })
    }

    /// Shares an answer that holds for `ttl` (best effort, like [`RedisStore::shared_answer`]).
    pub async fn share_answer(&self, scope: &str, token: &UserKey, user: &UserKey, ttl: Duration) {
        if matches!(self.health(), Health::Down { .. }) {
            return;
        }
        let now_ms = unix_ms_now();
        let expires_ms = now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let key = self.answers_key(scope, now_ms / ANSWER_BUCKET_MS);
        let mut pipe = redis::pipe();
        pipe.hset(&key, token.hex(), format!("{}:{expires_ms}", user.hex()))
            .ignore()
            .pexpire(
                &key,
                i64::try_from(3 * ANSWER_BUCKET_MS).unwrap_or(i64::MAX),
            )
            .ignore();
        let mut conn = self.conn.clone();
        let done: Result<Result<(), _>, _> =
            tokio::time::timeout(self.options.timeout, pipe.query_async(&mut conn)).await;
        if !matches!(done, Ok(Ok(()))) {
            self.answers_failed();
        }
    }

    fn answers_key(&self, scope: &str, bucket: u64) -> String {
        format!("{}identity:{scope}:{bucket}", self.options.prefix)
    }

    /// A shared answer could not be read or written: counted, but decisions stay with Redis
    /// (the caller asks the endpoint itself, or keeps the answer to itself).
    fn answers_failed(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.store_error("identity_answers");
        }
    }

    /// One probe: while up, notices an outage without traffic; while down, brings the store back.
    pub async fn probe(&self) {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        let answer: Result<Result<String, _>, _> =
            tokio::time::timeout(self.options.timeout, ping.query_async(&mut conn)).await;
        let ok = matches!(answer, Ok(Ok(_)));
        match (self.health(), ok) {
            (Health::Down { .. }, true) => self.come_back().await,
            (Health::Recovering { until }, true) if self.clock.now() >= until => {
                self.set_health(Health::Up)
            }
            (Health::Down { .. }, false) => {
                if let Some(metrics) = &self.metrics {
                    metrics.store_error("probe");
                }
            }
            (_, false) => self.failed("probe", &StoreError::Unavailable("PING failed".into())),
            _ => {}
        }
    }

    /// Runs probes until the process stops (spawned by the app).
    pub async fn probe_forever(self: Arc<Self>) {
        loop {
            let pause = match self.health() {
                Health::Down { .. } => PROBE_INTERVAL_DOWN,
                _ => PROBE_INTERVAL_UP,
            };
            tokio::time::sleep(pause).await;
            self.probe().await;
        }
    }

    /// Hands decisions back to Redis. With `on_error: local`, what this replica sent alone goes
    /// to Redis first, in two passes: every key while local decisions go on, then, with
    /// decisions held ([`Health::Merging`]), the keys touched since the first pass began. A send
    /// decided locally is therefore in Redis before Redis decides for its key again. A failure
    /// on the way leaves the replica local; the next probe starts over (adding a send twice is
    /// harmless: its member is derived from the send itself).
    async fn come_back(&self) {
        let merging = self.options.on_error == OnStoreError::Local;
        let first_pass = self.clock.now();
        if merging {
            if !self.merge_local_sends(0).await {
                return; // stay local; the next probe tries again
            }
            let mut health = self.health.write().unwrap_or_else(|p| p.into_inner());
            let Health::Down { since } = *health else {
                return;
            };
            *health = Health::Merging { since };
        }
        // From here to the switch below: a merge stopped half-way goes back to Down.
        let _stopped_half_way = MergeGuard(self);
        if merging && !self.merge_local_sends(first_pass).await {
            return; // `failed` went back to Down and woke the waiting decisions
        }
        if !self.restore_locks().await || !self.send_epoch().await {
            return;
        }
        let until = self
            .clock
            .now()
            .saturating_add(clock::nanos(self.options.max_window));
        {
            let mut health = self.health.write().unwrap_or_else(|p| p.into_inner());
            // Anything that failed meanwhile (a redeem's or a lock's call to Redis) went back to
            // Down, and decisions made locally since then are in no pass: start over.
            let expected = if merging {
                matches!(*health, Health::Merging { .. })
            } else {
                matches!(*health, Health::Down { .. })
            };
            if !expected {
                return;
            }
            *health = Health::Recovering { until };
            self.fallback.assume_full_at(None);
        }
        self.merged.notify_waiters();
        tracing::info!("Redis store is back; deciding with headroom for one window");
    }

    /// Writes the locks this replica knows are still running back to Redis: one learned while
    /// Redis was away exists nowhere else (once Redis decides again even this replica would forget
    /// it), and a Redis that lost its data lost the others.
    async fn restore_locks(&self) -> bool {
        let now = self.clock.now();
        let running: Vec<(Key, Nanos)> = self
            .locks_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, &until)| until > now)
            .map(|(&key, &until)| (key, until))
            .collect();
        for (key, until) in running {
            let mut invocation = self.scripts.lock.prepare_invoke();
            invocation
                .key(format!("{}:lock", self.key_base(&key)))
                .arg(self.now_arg(now))
                .arg(self.units(until - now))
                .arg(self.units_per_ms());
            if self.run::<i64>("lock", invocation).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Adds what this replica sent on its own during the outage to the shared state: the keys
    /// touched at or after `since` (0: every key). Each send's member is derived from its time,
    /// so adding a send again (a second pass, a retried merge) changes nothing.
    async fn merge_local_sends(&self, since: Nanos) -> bool {
        let window = self.units(clock::nanos(self.options.max_window));
        for (key, recent) in self.fallback.recent(since) {
            let base = self.key_base(&key);
            // Ages count from a `now` read once per key, before the script runs: Redis's clock
            // is read later, so every send lands at its true time or later (the safe side).
            let now = self.clock.now();
            let mut invocation = self.scripts.merge.prepare_invoke();
            match recent {
                Recent::Sends(sends) => {
                    invocation
                        .key(format!("{base}:w"))
                        .arg(self.now_arg(now))
                        .arg("window")
                        .arg(window)
                        .arg(self.units_per_ms());
                    let mut previous = None;
                    let mut same = 0u32;
                    for at in sends {
                        same = if previous == Some(at) { same + 1 } else { 0 };
                        previous = Some(at);
                        let age = i128::from(now) - i128::from(at);
                        invocation
                            .arg(self.age_units(age))
                            .arg(format!("{:016x}:m{at:x}.{same:x}", self.replica));
                    }
                }
                Recent::Tat(tat) => {
                    // A TAT ahead of now is an offset into the future: rounded up.
                    let offset = i128::from(tat) - i128::from(now);
                    invocation
                        .key(format!("{base}:g"))
                        .arg(self.now_arg(now))
                        .arg("gcra")
                        .arg(window)
                        .arg(self.units_per_ms())
                        .arg(self.age_units(-offset).saturating_neg());
                }
            }
            if self.run::<i64>("merge", invocation).await.is_err() {
                return false;
            }
        }
        true
    }

    /// An age (now minus a time, nanoseconds) in script units, rounded down, so that the time
    /// it stands for is never moved earlier.
    fn age_units(&self, age: i128) -> i64 {
        let units = if self.options.injected_time {
            age
        } else {
            age.div_euclid(1_000)
        };
        i64::try_from(units).unwrap_or(if units < 0 { i64::MIN } else { i64::MAX })
    }

    // ---- decisions ----

    /// The policy a decision runs under right now (smaller while recovering).
    fn effective(&self, policy: &Policy) -> Option<Policy> {
        match self.health() {
            Health::Recovering { .. } => {
                let share = policy.limit / self.options.replicas.max(1);
                let headroom = (self.options.replicas.max(1) - 1) * share;
                policy.scaled(policy.limit - headroom)
            }
            _ => Some(*policy),
        }
    }

    /// This replica's share while it decides alone.
    fn local_policy(&self, policy: &Policy) -> Option<Policy> {
        policy.scaled(policy.limit / self.options.replicas.max(1))
    }

    fn local_acquire(
        &self,
        policy: &Policy,
        key: Key,
        queue: Option<QueueRule>,
    ) -> Result<Acquire, StoreError> {
        if self.options.on_error == OnStoreError::Reject {
            return Err(StoreError::Unavailable(
                "Redis is down and on_error is reject".into(),
            ));
        }
        let Some(share) = self.local_policy(policy) else {
            // Less than one call per window each: only Redis can hand out this quota.
            let retry_at = self.clock.now().saturating_add(policy.window);
            return Ok(Acquire::Refused(Refusal {
                reason: RefusalReason::Limited,
                retry_at,
            }));
        };
        Ok(self.fallback.acquire_now(&share, key, queue))
    }

    async fn shared_acquire(
        &self,
        policy: &Policy,
        key: Key,
        queue: Option<QueueRule>,
    ) -> Result<Acquire, StoreError> {
        let Some(policy) = self.effective(policy) else {
            let retry_at = self.clock.now().saturating_add(policy.window);
            return Ok(Acquire::Refused(Refusal {
                reason: RefusalReason::Limited,
                retry_at,
            }));
        };
        let base = self.key_base(&key);
        let max_wait = queue.map_or(-1, |q| self.units(q.max_wait));
        let max_queued = queue.map_or(0, |q| q.max_per_user);
        let epoch_guard = if self.options.injected_time { "0" } else { "1" };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let asked = self.clock.now();
        let (status, wait, remaining, reset_in, undo) = match policy.kind {
            Kind::Window => {
                let mut invocation = self.scripts.acquire_window.prepare_invoke();
                invocation
                    .key(format!("{base}:w"))
                    .key(format!("{base}:lock"))
                    .key(self.epoch_key())
                    .key(format!("{base}:g"))
                    .arg(self.now_arg(asked))
                    .arg(policy.limit)
                    .arg(self.units(policy.window))
                    .arg(max_wait)
                    .arg(max_queued)
                    .arg(self.member(seq))
                    .arg(self.units_per_ms())
                    .arg(epoch_guard);
                let (status, wait, remaining, reset_in): (String, i64, i64, i64) =
                    self.run("acquire", invocation).await?;
                (status, wait, remaining, reset_in, seq)
            }
            Kind::Gcra { burst, period } => {
                let mut invocation = self.scripts.acquire_gcra.prepare_invoke();
                invocation
                    .key(format!("{base}:g"))
                    .key(format!("{base}:lock"))
                    .key(self.epoch_key())
                    .key(format!("{base}:w"))
                    .arg(self.now_arg(asked))
                    .arg(burst)
                    .arg(self.units(period))
                    .arg(max_wait)
                    .arg(max_queued)
                    .arg(self.units(policy.window))
                    .arg(self.units_per_ms())
                    .arg(epoch_guard);
                let (status, wait, remaining, reset_in, tat): (String, i64, i64, i64, i64) =
                    self.run("acquire", invocation).await?;
                (
                    status,
                    wait,
                    remaining,
                    reset_in,
                    u64::try_from(tat).unwrap_or(0),
                )
            }
        };
        let now = self.answer_base(asked);
        let wait = self.nanos(wait);
        let view = QuotaView {
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset_in: self.nanos(reset_in),
        };
        let refused = |reason| {
            Ok(Acquire::Refused(Refusal {
                reason,
                retry_at: now.saturating_add(wait),
            }))
        };
        match status.as_str() {
            "ok" if wait == 0 => Ok(Acquire::Now { at: now, view }),
            "ok" => {
                let reservation = Reservation {
                    key,
                    slot: now.saturating_add(wait),
                    undo,
                    shared: true,
                };
                let room = self
                    .queued
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.options.max_queued_total).then_some(n + 1)
                    })
                    .is_ok();
                if !room {
                    self.shared_cancel(&policy, &reservation).await?;
                    return refused(RefusalReason::QueueFull);
                }
                Ok(Acquire::Reserved { reservation, view })
            }
            "locked" => {
                self.saw_lock(key, now.saturating_add(wait));
                refused(RefusalReason::Locked)
            }
            "limited" => refused(RefusalReason::Limited),
            "too_far" => refused(RefusalReason::TooFar),
            "queue_full" => refused(RefusalReason::QueueFull),
            other => {
                let error = StoreError::Unavailable(format!(
                    "unexpected answer {other:?} from the acquire script"
                ));
                self.failed("acquire", &error);
                Err(error)
            }
        }
    }

    async fn shared_cancel(
        &self,
        policy: &Policy,
        reservation: &Reservation,
    ) -> Result<(), StoreError> {
        let base = self.key_base(&reservation.key);
        let mut invocation = self.scripts.cancel.prepare_invoke();
        match policy.kind {
            Kind::Window => invocation
                .key(format!("{base}:w"))
                .arg("window")
                .arg(self.member(reservation.undo))
                .arg(0),
            Kind::Gcra { period, .. } => invocation
                .key(format!("{base}:g"))
                .arg("gcra")
                .arg(reservation.undo)
                .arg(self.units(period)),
        };
        self.run::<i64>("cancel", invocation).await.map(|_| ())
    }

    fn release_queue_place(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// A lock Redis told this replica about (another replica learned it): kept locally too, so
    /// the replica still honours it if Redis goes away before the lock ends.
    fn saw_lock(&self, key: Key, until: Nanos) {
        {
            let mut seen = self.locks_seen.lock().unwrap_or_else(|p| p.into_inner());
            let held = seen.entry(key).or_insert(0);
            *held = (*held).max(until);
        }
        self.fallback.lock_now(key, until);
    }

    pub(super) async fn acquire(
        &self,
        policy: &Policy,
        key: Key,
        queue: Option<QueueRule>,
    ) -> Result<Acquire, StoreError> {
        if let Some(local) = self.decide_if_down(policy, key, queue).await {
            return local;
        }
        match self.shared_acquire(policy, key, queue).await {
            Ok(answer) => Ok(answer),
            // The store is now down: decide as on_error says (a pessimistic local start).
            Err(_) => self
                .decide_if_down(policy, key, queue)
                .await
                .unwrap_or_else(|| self.local_acquire(policy, key, queue)),
        }
    }

    /// Decides locally if Redis is down, or `None` if Redis decides. Waits while local sends are
    /// being added to Redis. A local decision is made holding the health lock, so it is either
    /// recorded before a merge's second pass looks, or made after the hand-over, by Redis.
    async fn decide_if_down(
        &self,
        policy: &Policy,
        key: Key,
        queue: Option<QueueRule>,
    ) -> Option<Result<Acquire, StoreError>> {
        loop {
            {
                let health = self.health.read().unwrap_or_else(|p| p.into_inner());
                match *health {
                    Health::Down { .. } => return Some(self.local_acquire(policy, key, queue)),
                    Health::Up | Health::Recovering { .. } => return None,
                    Health::Merging { .. } => {}
                }
            }
            // Registered before the state is looked at again, so the end of the merge is not
            // missed between the two.
            let merged = self.merged.notified();
            tokio::pin!(merged);
            merged.as_mut().enable();
            if matches!(self.health(), Health::Merging { .. }) {
                merged.await;
            }
        }
    }

    pub(super) async fn cancel(
        &self,
        policy: &Policy,
        reservation: &Reservation,
    ) -> Result<(), StoreError> {
        if !reservation.shared {
            if let Some(share) = self.local_policy(policy) {
                self.fallback.cancel_now(&share, reservation);
            }
            return Ok(());
        }
        self.release_queue_place();
        self.shared_cancel(policy, reservation).await
    }

    pub(super) async fn redeem(
        &self,
        reservation: &Reservation,
    ) -> Result<Result<(), Refusal>, StoreError> {
        if !reservation.shared {
            return Ok(self.fallback.redeem_now(reservation));
        }
        self.release_queue_place();
        let base = self.key_base(&reservation.key);
        let mut invocation = self.scripts.check_lock.prepare_invoke();
        invocation
            .key(format!("{base}:lock"))
            .arg(self.now_arg(self.clock.now()));
        match self.run::<i64>("redeem", invocation).await {
            Ok(0) => Ok(Ok(())),
            Ok(left) => {
                let retry_at = self.clock.now().saturating_add(self.nanos(left));
                self.saw_lock(reservation.key, retry_at);
                Ok(Err(Refusal {
                    reason: RefusalReason::Locked,
                    retry_at,
                }))
            }
            // The slot itself was reserved in Redis before it went away, so sending keeps the
            // window bound; only a lock learned meanwhile could be missed. `reject` refuses.
            Err(e) => match self.options.on_error {
                OnStoreError::Reject => Err(e),
                OnStoreError::Local => Ok(self.fallback.redeem_now(reservation)),
            },
        }
    }

    pub(super) async fn lock(&self, key: Key, until: Nanos) -> Result<(), StoreError> {
        // Always kept locally too: if Redis is away, this replica still honours it.
        self.saw_lock(key, until);
        if matches!(self.health(), Health::Down { .. }) {
            return Ok(());
        }
        let asked = self.clock.now();
        let duration = until.saturating_sub(asked);
        let mut invocation = self.scripts.lock.prepare_invoke();
        invocation
            .key(format!("{}:lock", self.key_base(&key)))
            .arg(self.now_arg(asked))
            .arg(self.units(duration))
            .arg(self.units_per_ms());
        self.run::<i64>("lock", invocation).await.map(|_| ())
    }

    pub(super) fn evict_idle(&self) -> usize {
        let now = self.clock.now();
        self.locks_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, &mut until| until > now);
        self.fallback.evict_idle_now()
    }

    pub(super) fn keys(&self) -> usize {
        self.fallback.keys()
    }

    pub(super) fn locks_in(&self, route: RouteId) -> usize {
        let now = self.clock.now();
        self.locks_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(k, &until)| k.route == route && until > now)
            .count()
    }

    pub(super) fn local_clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }
}
