//! The embedded store: per-key state in sharded hash maps, one short critical section per decision.
//!
//! No lock is ever held across an await: callers sleep outside, on the reservation they got.
//! Idle keys are evicted by [`MemoryStore::evict_idle`], so memory follows active users.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::gcra::Tat;
use super::window::SendLog;
use super::{
    Acquire, Clock, Key, Kind, Limiter, LockReason, Nanos, Policy, QueueRule, QuotaView, Refusal,
    RefusalReason, Reservation, RouteId, StoreError,
};
use std::future::{ready, Future};

/// A key's recent history, relative to now (see [`MemoryStore::recent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recent {
    /// How long ago each send went (negative: a reservation still ahead).
    Sends(Vec<i128>),
    /// The TAT minus now.
    Tat(i128),
}

/// Enough shards that two cores rarely contend, few enough that a sweep is cheap.
const SHARDS: usize = 64;

#[derive(Debug, Clone)]
enum History {
    Window(SendLog),
    Gcra(Tat),
}

#[derive(Debug, Clone)]
struct Entry {
    history: History,
    /// After this the history constrains nothing (sweepable if also unlocked and unqueued).
    idle_at: Nanos,
    locked_until: Nanos,
    /// Callers holding a reservation on this key.
    queued: u32,
}

impl Entry {
    fn new(kind: Kind) -> Self {
        let history = match kind {
            Kind::Window => History::Window(SendLog::default()),
            Kind::Gcra { .. } => History::Gcra(Tat::default()),
        };
        Entry {
            history,
            idle_at: 0,
            locked_until: 0,
            queued: 0,
        }
    }

    fn next_free(&mut self, policy: &Policy, now: Nanos) -> Nanos {
        match (&self.history, policy.kind) {
            (History::Window(log), Kind::Window) => log.next_free(policy.limit, policy.window, now),
            (History::Gcra(tat), Kind::Gcra { burst, period }) => tat.next_free(burst, period, now),
            // The route changed algorithm (config reload): start over with the new one,
            // conservatively treating the key as if it had just used its whole window.
            _ => {
                let restart = self.idle_at.max(now);
                *self = Entry {
                    locked_until: self.locked_until,
                    queued: self.queued,
                    ..Entry::new(policy.kind)
                };
                self.idle_at = restart;
                restart
            }
        }
    }

    /// Records a send at `at`; returns the undo token for a reservation.
    fn record(&mut self, policy: &Policy, at: Nanos) -> Nanos {
        match (&mut self.history, policy.kind) {
            (History::Window(log), _) => {
                log.record(at, policy.limit as usize + self.queued as usize);
                self.idle_at = log.idle_at(policy.window);
                at
            }
            (History::Gcra(tat), Kind::Gcra { period, .. }) => {
                let undo = tat.record(at, period);
                self.idle_at = undo;
                undo
            }
            (History::Gcra(_), Kind::Window) => at, // unreachable: next_free restarted the entry
        }
    }

    /// Sends recorded at or after `at` (GCRA: at most the whole burst, if its TAT moved since).
    fn sends_since(&self, policy: &Policy, at: Nanos) -> usize {
        match &self.history {
            History::Window(log) => log.count_since(at),
            History::Gcra(tat) if tat.0 > at => policy.limit as usize,
            History::Gcra(_) => 0,
        }
    }

    fn view(&self, policy: &Policy, now: Nanos) -> QuotaView {
        match (&self.history, policy.kind) {
            (History::Window(log), _) => log.view(policy.limit, policy.window, now),
            (History::Gcra(tat), Kind::Gcra { burst, period }) => tat.view(burst, period, now),
            (History::Gcra(_), Kind::Window) => QuotaView::default(),
        }
    }
}

pub struct MemoryStore {
    /// If set: every key is treated as if its whole quota was used at this time (see
    /// [`MemoryStore::assume_full_at`]).
    floor: AtomicU64,
    shards: Box<[Mutex<HashMap<Key, Entry>>]>,
    /// Locked keys, kept apart so counting active locks never walks every key.
    locks: Mutex<HashMap<Key, Nanos>>,
    queued_total: AtomicUsize,
    max_queued_total: usize,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>, max_queued_total: usize) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        MemoryStore {
            floor: AtomicU64::new(0),
            shards,
            locks: Mutex::new(HashMap::new()),
            queued_total: AtomicUsize::new(0),
            max_queued_total,
            clock,
        }
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // The user key is already a uniform hash; mix in the route so one user's routes spread.
        let index = (usize::from(key.user.0[0]) ^ (key.route.0 as usize).wrapping_mul(31)) % SHARDS;
        relock(&self.shards[index])
    }

    fn release_queue_slot(&self, entry: Option<&mut Entry>) {
        if let Some(entry) = entry {
            entry.queued = entry.queued.saturating_sub(1);
        }
        // Saturating: never underflow even if a caller misuses the API.
        let _ = self
            .queued_total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// From now on, treat every key as if `limit` calls went at `at`, until it has recorded
    /// `limit` sends of its own since: used when this store takes over from a shared one that
    /// may have sent anything just before (`None` clears it).
    pub fn assume_full_at(&self, at: Option<Nanos>) {
        // 0 means "unset", so a floor at time 0 is stored as 1 (one nanosecond later: safe).
        let floor = at.map_or(0, |at| at.max(1));
        self.floor.store(floor, Ordering::Release);
    }

    /// Forgets every key's sends (they are elsewhere now), keeping locks still running: a lock
    /// learned from Zoho holds whichever store decides.
    pub fn clear(&self) {
        let now = self.clock.now();
        for shard in self.shards.iter() {
            relock(shard).retain(|_, e| {
                if e.locked_until <= now {
                    return false;
                }
                *e = Entry {
                    locked_until: e.locked_until,
                    queued: e.queued,
                    ..Entry::new(Kind::Window)
                };
                true
            });
        }
    }

    /// Each key's recorded send times within the window ending now, as offsets before now
    /// (window keys), or its TAT as an offset from now (GCRA keys).
    pub fn recent(&self) -> Vec<(Key, Recent)> {
        let now = self.clock.now();
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (key, entry) in relock(shard).iter() {
                let recent = match &entry.history {
                    History::Window(log) => Recent::Sends(
                        log.iter()
                            .map(|t| i128::from(now) - i128::from(t))
                            .collect(),
                    ),
                    History::Gcra(tat) => Recent::Tat(i128::from(tat.0) - i128::from(now)),
                };
                out.push((*key, recent));
            }
        }
        out
    }

    /// Calls holding a reservation in this store, all routes together.
    pub fn queued_total(&self) -> usize {
        self.queued_total.load(Ordering::Acquire)
    }
}

/// A poisoned shard only means another thread panicked mid-decision; the map itself is intact.
fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryStore {
    /// [`Limiter::acquire`], synchronously: the embedded store never waits.
    pub fn acquire_now(&self, policy: &Policy, key: Key, queue: Option<QueueRule>) -> Acquire {
        let mut shard = self.shard(&key);
        let now = self.clock.now();
        let entry = shard.entry(key).or_insert_with(|| Entry::new(policy.kind));
        if entry.locked_until > now {
            let retry_at = entry.locked_until;
            return Acquire::Refused(Refusal {
                reason: RefusalReason::Locked,
                retry_at,
            });
        }
        let slot = entry.next_free(policy, now);
        let floor = self.floor.load(Ordering::Acquire);
        let slot = if floor > 0 && entry.sends_since(policy, floor) < policy.limit as usize {
            slot.max(floor.saturating_add(policy.window))
        } else {
            slot
        };
        if slot <= now {
            entry.record(policy, now);
            return Acquire::Now {
                at: now,
                view: entry.view(policy, now),
            };
        }
        let Some(rule) = queue else {
            return Acquire::Refused(Refusal {
                reason: RefusalReason::Limited,
                retry_at: slot,
            });
        };
        if slot - now > rule.max_wait {
            return Acquire::Refused(Refusal {
                reason: RefusalReason::TooFar,
                retry_at: slot,
            });
        }
        let total = &self.queued_total;
        let room_in_total = total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queued_total).then_some(n + 1)
            })
            .is_ok();
        if !room_in_total || entry.queued as usize >= rule.max_per_user {
            if room_in_total {
                total.fetch_sub(1, Ordering::AcqRel);
            }
            return Acquire::Refused(Refusal {
                reason: RefusalReason::QueueFull,
                retry_at: slot,
            });
        }
        entry.queued += 1;
        let undo = entry.record(policy, slot);
        let view = entry.view(policy, now);
        Acquire::Reserved {
            reservation: Reservation {
                key,
                slot,
                undo,
                shared: false,
            },
            view,
        }
    }

    pub fn cancel_now(&self, policy: &Policy, reservation: &Reservation) {
        let mut shard = self.shard(&reservation.key);
        let entry = shard.get_mut(&reservation.key);
        if let Some(entry) = entry {
            match (&mut entry.history, policy.kind) {
                (History::Window(log), Kind::Window) => {
                    log.cancel(reservation.slot);
                    entry.idle_at = log.idle_at(policy.window);
                }
                (History::Gcra(tat), Kind::Gcra { period, .. }) => {
                    tat.cancel(reservation.undo, period);
                    entry.idle_at = tat.0;
                }
                _ => {}
            }
            self.release_queue_slot(Some(entry));
        } else {
            self.release_queue_slot(None);
        }
    }

    pub fn redeem_now(&self, reservation: &Reservation) -> Result<(), Refusal> {
        let mut shard = self.shard(&reservation.key);
        let now = self.clock.now();
        let entry = shard.get_mut(&reservation.key);
        let locked_until = entry.as_ref().map_or(0, |e| e.locked_until);
        self.release_queue_slot(entry);
        if locked_until > now {
            return Err(Refusal {
                reason: RefusalReason::Locked,
                retry_at: locked_until,
            });
        }
        Ok(())
    }

    pub fn lock_now(&self, key: Key, until: Nanos) {
        {
            let mut shard = self.shard(&key);
            let entry = shard.entry(key).or_insert_with(|| Entry::new(Kind::Window));
            entry.locked_until = entry.locked_until.max(until);
        }
        let mut locks = relock(&self.locks);
        let held = locks.entry(key).or_insert(0);
        *held = (*held).max(until);
    }

    pub fn evict_idle_now(&self) -> usize {
        let now = self.clock.now();
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = relock(shard);
            let before = map.len();
            map.retain(|_, e| e.queued > 0 || e.locked_until > now || e.idle_at > now);
            removed += before - map.len();
            if map.capacity() > 64 && map.capacity() > map.len() * 4 {
                map.shrink_to_fit();
            }
        }
        relock(&self.locks).retain(|_, &mut until| until > now);
        removed
    }

    pub fn keys(&self) -> usize {
        self.shards.iter().map(|s| relock(s).len()).sum()
    }

    pub fn locks_in(&self, route: RouteId) -> usize {
        let now = self.clock.now();
        relock(&self.locks)
            .iter()
            .filter(|(k, &until)| k.route == route && until > now)
            .count()
    }
}

impl Limiter for MemoryStore {
    fn acquire(
        &self,
        policy: &Policy,
        key: Key,
        queue: Option<QueueRule>,
    ) -> impl Future<Output = Result<Acquire, StoreError>> + Send {
        ready(Ok(self.acquire_now(policy, key, queue)))
    }

    fn cancel(
        &self,
        policy: &Policy,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.cancel_now(policy, reservation);
        ready(Ok(()))
    }

    fn redeem(
        &self,
        _policy: &Policy,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<Result<(), Refusal>, StoreError>> + Send {
        ready(Ok(self.redeem_now(reservation)))
    }

    fn lock(
        &self,
        _policy: &Policy,
        key: Key,
        until: Nanos,
        _reason: LockReason,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.lock_now(key, until);
        ready(Ok(()))
    }

    fn evict_idle(&self) -> usize {
        self.evict_idle_now()
    }

    fn len(&self) -> usize {
        self.keys()
    }

    fn locks_active(&self, route: RouteId) -> usize {
        self.locks_in(route)
    }

    fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;
    use crate::config::Algorithm;
    use crate::limit::{ManualClock, UserKey};

    fn setup() -> (Arc<ManualClock>, MemoryStore, Policy) {
        let clock = Arc::new(ManualClock::new());
        let store = MemoryStore::new(clock.clone(), 100);
        let limit = NonZeroU32::new(2).expect("2");
        let policy = Policy::new(
            limit,
            Duration::from_nanos(100),
            Duration::from_nanos(1_000),
            Algorithm::Window,
        );
        (clock, store, policy)
    }

    fn key(n: u8) -> Key {
        Key {
            route: RouteId(0),
            user: UserKey([n; 16]),
        }
    }

    #[test]
    fn clear_forgets_sends_but_keeps_running_locks() {
        let (_clock, store, policy) = setup();
        store.acquire_now(&policy, key(1), None);
        store.acquire_now(&policy, key(1), None);
        store.lock_now(key(2), 500);
        store.clear();
        assert!(
            matches!(
                store.acquire_now(&policy, key(1), None),
                Acquire::Now { .. }
            ),
            "sends forgotten"
        );
        let locked = store.acquire_now(&policy, key(2), None);
        assert!(
            matches!(locked, Acquire::Refused(r) if r.reason == RefusalReason::Locked),
            "lock kept: {locked:?}"
        );
    }

    #[test]
    fn assumed_full_quota_holds_until_a_window_after_the_floor() {
        let (clock, store, policy) = setup();
        clock.set(1_000);
        store.assume_full_at(Some(1_000));
        let refused = store.acquire_now(&policy, key(1), None);
        assert!(
            matches!(refused, Acquire::Refused(r) if r.retry_at == 1_100),
            "{refused:?}"
        );
        clock.set(1_100);
        assert!(matches!(
            store.acquire_now(&policy, key(1), None),
            Acquire::Now { .. }
        ));
        assert!(matches!(
            store.acquire_now(&policy, key(1), None),
            Acquire::Now { .. }
        ));
        assert!(
            matches!(
                store.acquire_now(&policy, key(1), None),
                Acquire::Refused(_)
            ),
            "own sends count again"
        );
        store.assume_full_at(None);
        assert!(
            matches!(
                store.acquire_now(&policy, key(3), None),
                Acquire::Now { .. }
            ),
            "floor lifted"
        );
    }
}
