//! The embedded store: per-key state in sharded hash maps, one short critical section per decision.
//!
//! No lock is ever held across an await: callers sleep outside, on the reservation they got.
//! Idle keys are evicted by [`MemoryStore::evict_idle`], so memory follows active users. The
//! sweep takes each shard lock for a bounded step at a time and frees memory after unlocking, so
//! a decision never waits long behind it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::gcra::Tat;
use super::window::SendLog;
use super::{
    Acquire, Clock, Key, Kind, Limiter, LockReason, Nanos, Policy, QueueRule, QuotaView, Refusal,
    RefusalReason, Reservation, RouteId, StoreError,
};
use std::future::{ready, Future};

/// A key's recent history on the store's clock (see [`MemoryStore::recent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recent {
    /// When each send went, oldest first (later than now: a reservation still ahead).
    Sends(Vec<Nanos>),
    /// The theoretical arrival time.
    Tat(Nanos),
}

/// One key's state, for carrying it over a restart ([`MemoryStore::snapshot`] and
/// [`MemoryStore::restore`]). Times are on the store's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    pub key: Key,
    /// Window keys: the send log, oldest first; reservations still ahead are included as sends.
    /// Times are as recorded: rounded up to the log's unit (see `window`), never earlier.
    pub sends: Vec<Nanos>,
    /// GCRA keys: the theoretical arrival time (reservations included).
    pub tat: Option<Nanos>,
    /// 0 if the key is not locked.
    pub locked_until: Nanos,
    /// When the history stops constraining anything: a restored key is kept at least until then
    /// (and, if its route changed algorithm meanwhile, treated as fully used until then).
    pub idle_at: Nanos,
}

/// One key as the admin API shows it, computed under the route's current policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub key: Key,
    /// Sends in the window ending now (GCRA: cells the TAT is ahead of now, an estimate).
    /// Reservations not yet due are counted in `queued` instead.
    pub calls_in_window: u32,
    /// Calls that could go now (0 while locked).
    pub remaining: u32,
    /// Time until a new call could go (0: now); includes a running lock.
    pub next_free_in: Nanos,
    /// Time until the key's lock ends (0: not locked).
    pub locked_for: Nanos,
    /// Calls holding a reservation on this key.
    pub queued: u32,
}

/// Whether the assumed-full floor (see [`MemoryStore::assume_full_at`]; 0: unset) still holds
/// anything back at `now`: a window after it, it does not, whatever the key's log says (a log
/// that forgot its old sends would otherwise read as untouched since the floor).
fn floor_open(floor: Nanos, policy: &Policy, now: Nanos) -> bool {
    floor > 0 && floor.saturating_add(policy.window) > now
}

/// A key's status from its parts, at `now`. `floor`: see [`MemoryStore::assume_full_at`] (0: unset).
#[allow(clippy::too_many_arguments)]
pub(super) fn key_status(
    key: Key,
    history: &History,
    locked_until: Nanos,
    idle_at: Nanos,
    queued: u32,
    policy: &Policy,
    now: Nanos,
    floor: Nanos,
) -> KeyStatus {
    let locked_for = locked_until.saturating_sub(now);
    let (calls, view, next_free, floor_applies) = match (history, policy.kind) {
        (History::Window(log), Kind::Window) => {
            let calls = log
                .iter()
                .filter(|&t| t <= now && t.saturating_add(policy.window) > now)
                .count();
            let view = log.view(policy.limit, policy.window, now);
            let next_free = log.next_free(policy.limit, policy.window, now);
            let applies =
                floor_open(floor, policy, now) && log.count_since(floor) < policy.limit as usize;
            (calls as u64, view, next_free, applies)
        }
        (History::Gcra(GcraState { tat, .. }), Kind::Gcra { burst, period }) => {
            let cells = tat.0.saturating_sub(now).div_ceil(period.max(1));
            let view = tat.view(burst, period, now);
            let next_free = tat.next_free(burst, period, now);
            let applies = floor_open(floor, policy, now) && tat.0 <= floor;
            let calls = cells.saturating_sub(u64::from(queued));
            (calls, view, next_free, applies)
        }
        // The route changed algorithm: the next call restarts the key as fully used until
        // `idle_at` (see `Entry::next_free`).
        _ => {
            let view = QuotaView {
                remaining: 0,
                reset_in: idle_at.saturating_sub(now),
            };
            (u64::from(policy.limit), view, idle_at.max(now), false)
        }
    };
    let (mut remaining, mut next_free) = (view.remaining, next_free);
    if floor_applies {
        remaining = 0;
        next_free = next_free.max(floor.saturating_add(policy.window));
    }
    if locked_for > 0 {
        remaining = 0;
        next_free = next_free.max(locked_until);
    }
    KeyStatus {
        key,
        calls_in_window: u32::try_from(calls.min(u64::from(policy.limit))).unwrap_or(u32::MAX),
        remaining,
        next_free_in: next_free.saturating_sub(now),
        locked_for,
        queued,
    }
}

/// What one sweep of idle keys did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Keys removed.
    pub removed: usize,
    /// Times a shard lock was taken.
    pub holds: usize,
    /// The longest a shard lock was held: a decision on that shard could wait this long.
    pub longest_hold: Duration,
}

impl SweepReport {
    fn held(&mut self, hold: Duration) {
        self.holds += 1;
        self.longest_hold = self.longest_hold.max(hold);
    }
}

/// Enough shards that two cores rarely contend, few enough that a sweep is cheap.
const SHARDS: usize = 64;

/// Keys a sweep looks at per shard lock hold. At 1M keys a whole shard (15.6k keys, a 2.3 MB
/// table) took 4-7 ms under one hold; a step of this many takes tens of microseconds.
const SWEEP_STEP: usize = 1024;

/// A shard table four times larger than its keys is rebuilt smaller, under its lock, only while
/// at most this many keys remain (a rebuild rehashes each: ~100 µs for this many); an emptied
/// table is dropped whole, after unlocking. A larger, mostly idle table waits for a later sweep.
const SHRINK_MAX_KEYS: usize = 2048;

#[derive(Debug, Clone)]
pub(super) enum History {
    Window(SendLog),
    Gcra(GcraState),
}

/// A GCRA key: its TAT, and the callers holding a reservation on it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct GcraState {
    pub(super) tat: Tat,
    /// After this the key constrains nothing, whichever algorithm its route uses next: a window
    /// after the TAT (a TAT does not tell when its sends were, and any of them may lie up to a
    /// window before it, which a route switched to `window` by a reload must still count), unless
    /// restored or held later.
    pub(super) idle_at: Nanos,
    queued: u32,
}

impl GcraState {
    pub(super) fn new(tat: Nanos, idle_at: Nanos) -> Self {
        GcraState {
            tat: Tat(tat),
            idle_at,
            queued: 0,
        }
    }
}

impl History {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Window => History::Window(SendLog::default()),
            Kind::Gcra { .. } => History::Gcra(GcraState::default()),
        }
    }

    /// Callers holding a reservation on this key.
    fn queued(&self) -> u32 {
        match self {
            History::Window(log) => log.queued(),
            History::Gcra(g) => g.queued,
        }
    }

    fn release(&mut self) {
        match self {
            History::Window(log) => log.release(),
            History::Gcra(g) => g.queued = g.queued.saturating_sub(1),
        }
    }

    fn set_queued(&mut self, queued: u32) {
        match self {
            History::Window(log) => log.set_queued(queued),
            History::Gcra(g) => g.queued = queued,
        }
    }

    /// Not idle before `at`.
    fn hold_until(&mut self, at: Nanos) {
        match self {
            History::Window(log) => log.hold_until(at),
            History::Gcra(g) => g.idle_at = g.idle_at.max(at),
        }
    }

    /// After this the history constrains nothing.
    pub(super) fn idle_at(&self) -> Nanos {
        match self {
            History::Window(log) => log.idle_at(),
            History::Gcra(g) => g.idle_at,
        }
    }

    /// A history of `kind` that lets no call go before `until` (as if the whole quota had just
    /// been used), carrying `queued` callers over; a fresh one if `until` is not after `now`.
    fn restarted(kind: Kind, window: Nanos, until: Nanos, now: Nanos, queued: u32) -> Self {
        let until = if until > now { until } else { 0 };
        match kind {
            Kind::Window => {
                let mut log = SendLog::default();
                log.set_queued(queued);
                log.hold_until(until);
                History::Window(log)
            }
            Kind::Gcra { burst, period } => {
                let tat = match until {
                    0 => 0,
                    _ => until.saturating_add(Tat::tolerance(burst, period)),
                };
                History::Gcra(GcraState {
                    tat: Tat(tat),
                    idle_at: if tat == 0 {
                        0
                    } else {
                        tat.saturating_add(window)
                    },
                    queued,
                })
            }
        }
    }
}

/// One key's state: 48 bytes, so a (key, entry) slot of the shard table takes 72.
#[derive(Debug, Clone)]
struct Entry {
    history: History,
    /// 0 if not locked. Also in [`MemoryStore::locks`], which counts locks without walking keys;
    /// here so a decision reads it without a second lock.
    locked_until: Nanos,
}

impl Entry {
    fn new(kind: Kind) -> Self {
        Entry {
            history: History::new(kind),
            locked_until: 0,
        }
    }

    fn queued(&self) -> u32 {
        self.history.queued()
    }

    fn idle_at(&self) -> Nanos {
        self.history.idle_at()
    }

    /// Whether the key still holds anything: history that constrains a call after `now`, a
    /// running lock, or a reservation.
    fn holds(&self, now: Nanos) -> bool {
        self.queued() > 0 || self.locked_until > now || self.idle_at() > now
    }

    fn next_free(&mut self, policy: &Policy, now: Nanos) -> Nanos {
        match (&mut self.history, policy.kind) {
            (History::Window(log), Kind::Window) => {
                log.forget_expired(now, policy.window);
                log.next_free(policy.limit, policy.window, now)
            }
            (History::Gcra(g), Kind::Gcra { burst, period }) => g.tat.next_free(burst, period, now),
            // The route changed algorithm (config reload): start over with the new one,
            // conservatively treating the key as if it had just used its whole window (a GCRA
            // key's `idle_at` is a window after its TAT: see `GcraState::idle_at`).
            _ => {
                let until = self.idle_at();
                self.history =
                    History::restarted(policy.kind, policy.window, until, now, self.queued());
                until.max(now)
            }
        }
    }

    /// Records a send at `at` (now, or a reserved slot when `reserve`); returns the undo token
    /// for a reservation.
    fn record(&mut self, policy: &Policy, at: Nanos, reserve: bool) -> Nanos {
        match (&mut self.history, policy.kind) {
            (History::Window(log), _) if reserve => log.reserve(at, policy.limit, policy.window),
            (History::Window(log), _) => log.record(at, policy.limit, policy.window),
            (History::Gcra(g), Kind::Gcra { period, .. }) => {
                g.queued += u32::from(reserve);
                let undo = g.tat.record(at, period);
                g.idle_at = undo.saturating_add(policy.window);
                undo
            }
            (History::Gcra(_), Kind::Window) => at, // unreachable: next_free restarted the entry
        }
    }

    /// Sends recorded at or after `at` (GCRA: at most the whole burst, if its TAT moved since).
    fn sends_since(&self, policy: &Policy, at: Nanos) -> usize {
        match &self.history {
            History::Window(log) => log.count_since(at),
            History::Gcra(g) if g.tat.0 > at => policy.limit as usize,
            History::Gcra(_) => 0,
        }
    }

    fn view(&self, policy: &Policy, now: Nanos) -> QuotaView {
        match (&self.history, policy.kind) {
            (History::Window(log), _) => log.view(policy.limit, policy.window, now),
            (History::Gcra(g), Kind::Gcra { burst, period }) => g.tat.view(burst, period, now),
            (History::Gcra(_), Kind::Window) => QuotaView::default(),
        }
    }
}

/// A map by (route, user) key. The user half is a SHA-256 value, so a fast hasher spreads keys
/// well; its seed is random per process, which makes aiming keys at one bucket hard (foldhash is
/// not a keyed cryptographic hash, but no caller sees the seed or the table).
type KeyMap<V> = HashMap<Key, V, foldhash::fast::RandomState>;

pub struct MemoryStore {
    /// If set: every key is treated as if its whole quota was used at this time (see
    /// [`MemoryStore::assume_full_at`]).
    floor: AtomicU64,
    shards: Box<[Mutex<KeyMap<Entry>>]>,
    /// Locked keys, kept apart so counting active locks never walks every key.
    locks: Mutex<KeyMap<Nanos>>,
    queued_total: AtomicUsize,
    max_queued_total: usize,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>, max_queued_total: usize) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(KeyMap::default())).collect();
        MemoryStore {
            floor: AtomicU64::new(0),
            shards,
            locks: Mutex::new(KeyMap::default()),
            queued_total: AtomicUsize::new(0),
            max_queued_total,
            clock,
        }
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, KeyMap<Entry>> {
        // The user key is already a uniform hash; mix in the route so one user's routes spread.
        let index = (usize::from(key.user.0[0]) ^ (key.route.0 as usize).wrapping_mul(31)) % SHARDS;
        relock(&self.shards[index])
    }

    fn release_queue_slot(&self, entry: Option<&mut Entry>) {
        if let Some(entry) = entry {
            entry.history.release();
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

    /// The time every key is assumed full at ([`MemoryStore::assume_full_at`]), if any: kept in
    /// the state file, so a restart inside its window still holds.
    pub fn floor(&self) -> Option<Nanos> {
        match self.floor.load(Ordering::Acquire) {
            0 => None,
            floor => Some(floor),
        }
    }

    /// [`MemoryStore::assume_full_at`], unless a later time is already assumed.
    pub fn raise_floor(&self, at: Nanos) {
        self.floor.fetch_max(at.max(1), Ordering::AcqRel);
    }

    /// Treats every key as if its whole quota went `ahead` from now (the last slot already
    /// promised under keys callers no longer map to), so none gets a second quota in a window
    /// around a change of identity: [`MemoryStore::raise_floor`] at now + `ahead`.
    pub fn hold_every_key(&self, ahead: std::time::Duration) {
        self.raise_floor(self.clock.now().saturating_add(super::nanos(ahead)));
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
                e.history = History::restarted(Kind::Window, 0, 0, now, e.queued());
                true
            });
        }
    }

    /// Each key's recorded send times (window keys) or TAT (GCRA keys), for the keys touched at
    /// or after `since` (0: every key): a key with a send, a reservation or a TAT at or after it.
    pub fn recent(&self, since: Nanos) -> Vec<(Key, Recent)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (key, entry) in relock(shard).iter() {
                let recent = match &entry.history {
                    History::Window(log) => {
                        if log.iter().last().is_none_or(|newest| newest < since) {
                            continue;
                        }
                        Recent::Sends(log.iter().collect())
                    }
                    History::Gcra(g) if g.tat.0 >= since => Recent::Tat(g.tat.0),
                    History::Gcra(_) => continue,
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

    /// Every key that still holds something (history that constrains a future call, a running
    /// lock, or a reservation), for saving across a restart. Reservations are saved as sends:
    /// whether their calls go or not, counting them is the safe side.
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        let now = self.clock.now();
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (key, entry) in relock(shard).iter() {
                if !entry.holds(now) {
                    continue;
                }
                let (sends, tat) = match &entry.history {
                    History::Window(log) => (log.iter().collect(), None),
                    History::Gcra(g) => (Vec::new(), Some(g.tat.0)),
                };
                out.push(KeySnapshot {
                    key: *key,
                    sends,
                    tat,
                    locked_until: entry.locked_until,
                    idle_at: entry.idle_at(),
                });
            }
        }
        out
    }

    /// Adds saved keys (from [`MemoryStore::snapshot`], possibly of another process, converted to
    /// this store's clock). A key this store already holds is merged on the safe side: the union
    /// of both send logs, the later TAT, the later lock.
    pub fn restore(&self, keys: Vec<KeySnapshot>) {
        for saved in keys {
            // Times are rounded up on the way in (later: the safe side).
            let history = match saved.tat {
                Some(tat) => History::Gcra(GcraState::new(tat, saved.idle_at)),
                None => History::Window(SendLog::from_times(saved.sends, saved.idle_at)),
            };
            let locked = saved.locked_until > 0;
            {
                let mut shard = self.shard(&saved.key);
                match shard.get_mut(&saved.key) {
                    None => {
                        shard.insert(
                            saved.key,
                            Entry {
                                history,
                                locked_until: saved.locked_until,
                            },
                        );
                    }
                    Some(entry) => {
                        let idle_at = entry.idle_at().max(saved.idle_at);
                        match (&mut entry.history, history) {
                            (History::Window(mine), History::Window(theirs)) => {
                                mine.merge(&theirs, idle_at);
                            }
                            (History::Gcra(mine), History::Gcra(theirs)) => {
                                mine.tat.0 = mine.tat.0.max(theirs.tat.0);
                            }
                            // Different algorithms: keep the one that constrains longer.
                            (mine, theirs) => {
                                if saved.idle_at > mine.idle_at() {
                                    let queued = mine.queued();
                                    *mine = theirs;
                                    mine.set_queued(queued);
                                }
                            }
                        }
                        entry.history.hold_until(idle_at);
                        entry.locked_until = entry.locked_until.max(saved.locked_until);
                    }
                }
            }
            if locked {
                let mut locks = relock(&self.locks);
                let held = locks.entry(saved.key).or_insert(0);
                *held = (*held).max(saved.locked_until);
            }
        }
    }

    /// The status of every key that holds something, under its policy (`policy` gives `None`
    /// for routes no longer configured: those keys are left out).
    pub fn status(&self, policy: impl Fn(&Key) -> Option<Policy>) -> Vec<KeyStatus> {
        let now = self.clock.now();
        let floor = self.floor.load(Ordering::Acquire);
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (key, entry) in relock(shard).iter() {
                if !entry.holds(now) {
                    continue;
                }
                let Some(policy) = policy(key) else {
                    continue;
                };
                out.push(key_status(
                    *key,
                    &entry.history,
                    entry.locked_until,
                    entry.idle_at(),
                    entry.queued(),
                    &policy,
                    now,
                    floor,
                ));
            }
        }
        out
    }
}

/// Makes a shard table four times larger than its keys smaller (see [`SHRINK_MAX_KEYS`]);
/// returns the old table, for the caller to drop after unlocking.
fn shrink(map: &mut KeyMap<Entry>) -> Option<KeyMap<Entry>> {
    let (len, capacity) = (map.len(), map.capacity());
    if capacity <= 64 || capacity <= len * 4 || len > SHRINK_MAX_KEYS {
        return None;
    }
    let mut smaller = HashMap::with_capacity_and_hasher(len, map.hasher().clone());
    smaller.extend(map.drain());
    Some(std::mem::replace(map, smaller))
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
        let slot = if floor_open(floor, policy, now)
            && entry.sends_since(policy, floor) < policy.limit as usize
        {
            slot.max(floor.saturating_add(policy.window))
        } else {
            slot
        };
        if slot <= now {
            entry.record(policy, now, false);
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
        if !room_in_total || entry.queued() as usize >= rule.max_per_user {
            if room_in_total {
                total.fetch_sub(1, Ordering::AcqRel);
            }
            return Acquire::Refused(Refusal {
                reason: RefusalReason::QueueFull,
                retry_at: slot,
            });
        }
        let undo = entry.record(policy, slot, true);
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
                // `undo` is the slot as recorded (rounded up), which finds it again.
                (History::Window(log), Kind::Window) => log.cancel(reservation.undo, policy.window),
                (History::Gcra(g), Kind::Gcra { period, .. }) => {
                    g.tat.cancel(reservation.undo, period);
                    g.idle_at = g.tat.0.saturating_add(policy.window);
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
        self.sweep().removed
    }

    /// [`MemoryStore::evict_idle_now`], telling how long it kept decisions waiting.
    pub fn sweep(&self) -> SweepReport {
        self.sweep_in_steps(SWEEP_STEP)
    }

    /// Removes the keys that hold nothing any more, looking at `step` keys of one shard per lock
    /// hold. Shards take turns, so a decision waiting on one gets the lock between two steps.
    /// Removed entries (their logs) and dropped tables are freed after unlocking.
    ///
    /// A step finds where the last one stopped by counting the keys it kept, in table order: a
    /// key inserted or removed meanwhile may shift that, so a key may be looked at twice or left
    /// for the next sweep. Either is harmless: a key is removed only if, under the lock, it holds
    /// nothing.
    fn sweep_in_steps(&self, step: usize) -> SweepReport {
        let now = self.clock.now();
        let mut report = SweepReport::default();
        // Per shard: keys looked at and kept so far; `None` once the shard is done.
        let mut kept: Vec<Option<usize>> = vec![Some(0); self.shards.len()];
        let mut doomed: Vec<Entry> = Vec::with_capacity(step);
        while kept.iter().any(Option::is_some) {
            for (shard, kept) in self.shards.iter().zip(kept.iter_mut()) {
                let Some(skip) = *kept else {
                    continue;
                };
                let mut map = relock(shard);
                let held = Instant::now();
                let (mut seen, mut looked) = (0, 0);
                map.retain(|_, entry| {
                    seen += 1;
                    if seen <= skip || looked == step {
                        return true;
                    }
                    looked += 1;
                    if entry.holds(now) {
                        return true;
                    }
                    doomed.push(std::mem::replace(entry, Entry::new(Kind::Window)));
                    false
                });
                let finished = looked < step;
                let old_table = if finished { shrink(&mut map) } else { None };
                report.held(held.elapsed());
                drop(map);
                report.removed += doomed.len();
                *kept = (!finished).then_some(skip + looked - doomed.len());
                doomed.clear();
                drop(old_table);
            }
        }
        relock(&self.locks).retain(|_, &mut until| until > now);
        report
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
        (clock, store, window_policy(2))
    }

    /// `limit` per 100 ns (lock 1,000 ns), `window` algorithm.
    fn window_policy(limit: u32) -> Policy {
        Policy::new(
            NonZeroU32::new(limit).expect("a limit above 0"),
            Duration::from_nanos(100),
            Duration::from_nanos(1_000),
            Algorithm::Window,
        )
    }

    /// `setup()`'s quota (2 per 100) under GCRA with a burst of 2.
    fn gcra_policy() -> Policy {
        Policy::new(
            NonZeroU32::new(2).expect("2"),
            Duration::from_nanos(100),
            Duration::from_nanos(1_000),
            Algorithm::Gcra {
                burst: NonZeroU32::new(2).expect("2"),
            },
        )
    }

    fn key(n: u8) -> Key {
        Key {
            route: RouteId(0),
            user: UserKey([n; 16]),
        }
    }

    #[test]
    fn an_entry_takes_48_bytes_and_its_table_slot_72() {
        assert_eq!(std::mem::size_of::<Entry>(), 48);
        assert_eq!(std::mem::size_of::<(Key, Entry)>(), 72);
    }

    #[test]
    fn a_route_switching_algorithm_holds_every_call_until_its_history_is_idle() {
        let (clock, store, window) = setup();
        let gcra = gcra_policy();
        let refused_until = |policy: &Policy, until: Nanos| {
            for _ in 0..3 {
                let answer = store.acquire_now(policy, key(1), None);
                assert!(
                    matches!(answer, Acquire::Refused(r) if r.retry_at == until),
                    "{answer:?}"
                );
            }
        };
        store.acquire_now(&window, key(1), None);
        store.acquire_now(&window, key(1), None);
        clock.set(10);
        refused_until(&gcra, 100);
        // GCRA starts as if its burst had just been spent: one cell at 100, the next a period on.
        clock.set(100);
        let answer = store.acquire_now(&gcra, key(1), None);
        assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");
        let answer = store.acquire_now(&gcra, key(1), None);
        assert!(
            matches!(answer, Acquire::Refused(r) if r.retry_at == 200),
            "{answer:?}"
        );
        // Back to the window: the GCRA history holds until a window after its TAT, so no window
        // holds both the GCRA sends (at 100 and 200) and the window's own.
        clock.set(200);
        let answer = store.acquire_now(&gcra, key(1), None);
        assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");
        let tat = 200 + 2 * 100;
        clock.set(250);
        refused_until(&window, tat + 100);
        clock.set(tat + 100);
        let answer = store.acquire_now(&window, key(1), None);
        assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");
    }

    #[test]
    fn a_gcra_key_is_kept_a_window_past_its_tat_for_a_switch_to_window() {
        let (clock, store, window) = setup();
        let gcra = gcra_policy();
        for _ in 0..2 {
            let answer = store.acquire_now(&gcra, key(1), None);
            assert!(matches!(answer, Acquire::Now { .. }), "{answer:?}");
        }
        // TAT 200 (two cells of 100): the key is kept, and a window log starts, a window after it.
        clock.set(250);
        assert_eq!(
            store.evict_idle_now(),
            0,
            "swept while its sends still count"
        );
        let answer = store.acquire_now(&window, key(1), None);
        assert!(
            matches!(answer, Acquire::Refused(r) if r.retry_at == 300),
            "{answer:?}"
        );
        clock.set(300);
        assert_eq!(store.evict_idle_now(), 1);
    }

    #[test]
    fn sweeping_in_steps_removes_exactly_the_keys_that_hold_nothing() {
        let queue = Some(QueueRule {
            max_wait: 10_000,
            max_per_user: 10,
        });
        for step in [1, 2, 3, 1_024] {
            let (clock, store, policy) = setup();
            // Four keys per shard, one of each kind: idle at 100; sending again at 150 (idle at
            // 250); locked until 1000; holding a reservation (slot 100, idle at 200).
            for user in 0..=255u8 {
                clock.set(if user % 4 == 1 { 150 } else { 0 });
                let sends = if user % 4 == 3 { 3 } else { 1 };
                for _ in 0..sends {
                    store.acquire_now(&policy, key(user), queue);
                }
                if user % 4 == 2 {
                    store.lock_now(key(user), 1_000);
                }
            }
            clock.set(200);
            let report = store.sweep_in_steps(step);
            assert_eq!(report.removed, 64, "step {step}");
            for user in 0..=255u8 {
                let held = store.shard(&key(user)).contains_key(&key(user));
                assert_eq!(held, user % 4 != 0, "step {step}, user {user}");
            }
            assert!(
                report.holds >= 64 * 4 / step.min(5),
                "step {step}: {report:?}"
            );
            assert_eq!(
                store.sweep_in_steps(step).removed,
                0,
                "nothing left to remove"
            );
        }
    }

    #[test]
    fn an_emptied_shard_table_is_given_back() {
        let (clock, store, policy) = setup();
        let in_shard_0 = |i: u16| Key {
            route: RouteId(0),
            user: UserKey([
                0,
                i as u8,
                (i >> 8) as u8,
                1,
                2,
                3,
                4,
                5,
                6,
                7,
                8,
                9,
                10,
                11,
                12,
                13,
            ]),
        };
        for i in 0..3_000 {
            store.acquire_now(&policy, in_shard_0(i), None);
        }
        assert!(relock(&store.shards[0]).capacity() >= 3_000);
        clock.set(100);
        assert_eq!(store.sweep_in_steps(100).removed, 3_000);
        assert_eq!(relock(&store.shards[0]).capacity(), 0);
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
    fn snapshot_skips_idle_keys_and_restore_merges_on_the_safe_side() {
        let (clock, store, policy) = setup();
        store.acquire_now(&policy, key(1), None);
        clock.set(50);
        store.acquire_now(&policy, key(2), None);
        store.lock_now(key(3), 400);
        clock.set(120); // key 1 idle since 100
        let mut snap = store.snapshot();
        snap.sort_by_key(|s| s.key.user);
        let users: Vec<u8> = snap.iter().map(|s| s.key.user.0[0]).collect();
        assert_eq!(users, vec![2, 3]);
        assert_eq!(snap[0].sends, vec![50]);
        assert_eq!((snap[0].idle_at, snap[1].locked_until), (150, 400));

        let (_clock2, other, _) = setup();
        other.acquire_now(&policy, key(2), None); // at 0
        other.restore(snap);
        let merged = other
            .snapshot()
            .into_iter()
            .find(|s| s.key == key(2))
            .expect("key 2");
        assert_eq!(merged.sends, vec![0, 50]);
        assert_eq!(other.locks_in(RouteId(0)), 1, "restored locks are counted");
        let refused = other.acquire_now(&policy, key(2), None);
        assert!(
            matches!(refused, Acquire::Refused(r) if r.retry_at == 100),
            "{refused:?}"
        );
    }

    #[test]
    fn a_floor_a_window_old_holds_nothing_back_in_the_status_either() {
        let (clock, store, _) = setup();
        let policy = window_policy(3);
        store.assume_full_at(Some(1));
        for t in [150, 151, 152] {
            clock.set(t);
            let got = store.acquire_now(&policy, key(1), None);
            assert!(matches!(got, Acquire::Now { .. }), "{got:?}");
        }
        // The first two leave the window by 260 and are forgotten by the next decision, which
        // leaves fewer sends since the floor than the limit.
        clock.set(260);
        assert!(matches!(
            store.acquire_now(&policy, key(1), None),
            Acquire::Now { .. }
        ));
        let status = store.status(|k| (k.route == RouteId(0)).then_some(policy));
        assert_eq!(
            (
                status[0].calls_in_window,
                status[0].remaining,
                status[0].next_free_in
            ),
            (1, 2, 0),
            "the floor ended at 101"
        );
    }

    #[test]
    fn status_reports_calls_remaining_locks_and_queue() {
        let (clock, store, _) = setup();
        let policy = window_policy(5);
        for _ in 0..3 {
            store.acquire_now(&policy, key(1), None);
        }
        store.lock_now(key(2), 300);
        let queue = Some(QueueRule {
            max_wait: 1_000,
            max_per_user: 10,
        });
        for _ in 0..6 {
            store.acquire_now(&policy, key(4), queue);
        }
        clock.set(10);
        let mut all = store.status(|k| (k.route == RouteId(0)).then_some(policy));
        all.sort_by_key(|s| s.key.user);
        assert_eq!(all.len(), 3);
        assert_eq!(
            all[0],
            KeyStatus {
                key: key(1),
                calls_in_window: 3,
                remaining: 2,
                next_free_in: 0,
                locked_for: 0,
                queued: 0
            }
        );
        assert_eq!(
            (all[1].remaining, all[1].next_free_in, all[1].locked_for),
            (0, 290, 290)
        );
        assert_eq!(
            (
                all[2].calls_in_window,
                all[2].remaining,
                all[2].queued,
                all[2].next_free_in
            ),
            (5, 0, 1, 90)
        );
        assert!(store.status(|_| None).is_empty(), "unknown routes left out");
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

    #[test]
    fn a_restored_window_frees_its_calls_once_it_has_passed_not_when_the_key_is_dropped() {
        let policy = Policy::new(
            NonZeroU32::new(5).expect("5"),
            Duration::from_secs(2),
            Duration::from_millis(200),
            Algorithm::Window,
        );
        let (clock, store, _) = setup();
        let start = 7_000_000_000;
        for i in 0..5 {
            clock.set(start + i * 1_000);
            let got = store.acquire_now(&policy, key(1), None);
            assert!(matches!(got, Acquire::Now { .. }), "{got:?}");
        }
        let mut snap = store.snapshot();
        // The state file keeps a key until the longest window of any route has passed.
        snap[0].idle_at = start + 60_000_000_000;
        let (clock2, other, _) = setup();
        other.restore(snap);
        clock2.set(start + 100_000_000);
        let got = other.acquire_now(&policy, key(1), None);
        assert!(matches!(got, Acquire::Refused(_)), "{got:?}");
        clock2.set(start + 2_500_000_000);
        for _ in 0..5 {
            let got = other.acquire_now(&policy, key(1), None);
            assert!(matches!(got, Acquire::Now { .. }), "{got:?}");
        }
    }
}
