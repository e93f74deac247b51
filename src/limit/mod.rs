//! The window guarantee: for every (route, user), at most `limit` sends in any window of
//! `per + safety_margin` (SPEC promise 1), a burst of `limit` from idle at once (promise 2), learned
//! locks (promise 3) and the reservations that queue mode waits on (promise 4).
//!
//! This module is pure of HTTP and of sockets: it answers "may this call go, and when", and keeps
//! the per-key state that answer depends on. It never builds a response and never sleeps; the
//! proxy sleeps until a reserved slot. Time is injected through [`Clock`], so tests drive it.

mod clock;
mod gcra;
mod memory;
mod redis;
mod store;
mod window;

pub use clock::{nanos, Clock, ManualClock, Nanos, TokioClock};
pub use gcra::gcra_period;
pub use memory::{KeySnapshot, KeyStatus, MemoryStore, Recent, SweepReport};
pub use redis::{RedisOptions, RedisStore};

pub use store::Store;

use std::future::Future;
use std::num::NonZeroU32;
use std::time::Duration;

use crate::config::{Algorithm, RouteConfig};

/// Index of a route in the compiled route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(pub u32);

/// Stable ids for route names. A route keeps its id (and so its limiter state) for the life of
/// the process, across config reloads; a name never seen before gets the next id.
#[derive(Debug, Default)]
pub struct RouteNames {
    names: std::sync::RwLock<Vec<String>>,
}

impl RouteNames {
    pub fn new(names: impl IntoIterator<Item = String>) -> std::sync::Arc<Self> {
        let registry = RouteNames::default();
        for name in names {
            registry.id(&name);
        }
        std::sync::Arc::new(registry)
    }

    /// The id of `name`, registering it if new.
    pub fn id(&self, name: &str) -> RouteId {
        let read = self.names.read().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = read.iter().position(|n| n == name) {
            return RouteId(i as u32);
        }
        drop(read);
        let mut write = self.names.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = write.iter().position(|n| n == name) {
            return RouteId(i as u32);
        }
        write.push(name.to_string());
        RouteId((write.len() - 1) as u32)
    }

    pub fn name(&self, id: RouteId) -> Option<String> {
        let read = self.names.read().unwrap_or_else(|p| p.into_inner());
        read.get(id.0 as usize).cloned()
    }
}

/// A 128-bit hash that names one user without revealing the credential it came from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserKey(pub [u8; 16]);

impl UserKey {
    /// The first 8 bytes in hex: enough to tell users apart in logs, too short to be a credential.
    pub fn short(&self) -> String {
        lower_hex(&self.0[..8])
    }

    /// All 16 bytes in lowercase hex: how stores outside the process write a key.
    pub fn hex(&self) -> String {
        lower_hex(&self.0)
    }

    /// The key [`UserKey::hex`] wrote; `None` for anything else.
    pub fn from_hex(text: &str) -> Option<UserKey> {
        if text.len() != 32 || !text.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(UserKey(out))
    }
}

fn lower_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserKey({})", self.short())
    }
}

/// One limiter key: Zoho counts per endpoint and per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub route: RouteId,
    pub user: UserKey,
}

/// A route's quota in the limiter's own units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub limit: u32,
    /// `per + safety_margin`: no window of this length may hold more than `limit` sends.
    pub window: Nanos,
    /// Zoho's lock period, applied when Zoho says a user is throttled.
    pub lock: Nanos,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Exact sliding log of the last `limit` send times.
    Window,
    /// GCRA: `burst` cells at once, then one per `period`; sized so the window bound holds.
    Gcra { burst: u32, period: Nanos },
}

impl Policy {
    /// The same route with a smaller quota (a replica's share of it), or `None` if the share is
    /// less than one call per window.
    pub fn scaled(&self, limit: u32) -> Option<Policy> {
        let limit = NonZeroU32::new(limit.min(self.limit))?;
        let kind = match self.kind {
            Kind::Window => Kind::Window,
            Kind::Gcra { burst, .. } => {
                let burst = burst.min(limit.get());
                Kind::Gcra {
                    burst,
                    period: gcra_period(limit.get(), burst, self.window),
                }
            }
        };
        Some(Policy {
            limit: limit.get(),
            kind,
            ..*self
        })
    }

    pub fn new(limit: NonZeroU32, window: Duration, lock: Duration, algorithm: Algorithm) -> Self {
        let window = clock::nanos(window).max(1);
        let kind = match algorithm {
            Algorithm::Window => Kind::Window,
            Algorithm::Gcra { burst } => {
                let burst = burst.get().min(limit.get());
                Kind::Gcra {
                    burst,
                    period: gcra_period(limit.get(), burst, window),
                }
            }
        };
        Policy {
            limit: limit.get(),
            window,
            lock: clock::nanos(lock),
            kind,
        }
    }

    /// The policy a configured route runs under, with the global safety margin added.
    pub fn for_route(route: &RouteConfig, safety_margin: Duration) -> Self {
        Policy::new(
            route.limit,
            route.per + safety_margin,
            route.lock,
            route.algorithm,
        )
    }
}

/// How far ahead a call may be scheduled: `None` means "now or never" (reject mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRule {
    pub max_wait: Nanos,
    pub max_per_user: usize,
}

/// The limiter's answer for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// Send now; the send is already counted at `at`.
    Now { at: Nanos, view: QuotaView },
    /// A future slot is reserved; the caller waits for it, and gives it back if it goes away.
    Reserved {
        reservation: Reservation,
        view: QuotaView,
    },
    /// Not now: the reason and the earliest time a new call could go.
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub key: Key,
    /// When the call may be sent.
    pub slot: Nanos,
    /// What to undo if the caller goes away before its slot (algorithm-specific).
    pub undo: Nanos,
    /// Made by a shared store (true) or by this process's own memory (false).
    pub shared: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    /// Earliest time a new call for this key could be sent (for Retry-After).
    pub retry_at: Nanos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// Reject mode and the window is full.
    Limited,
    /// Queue mode, but the next free slot is further away than `max_wait`.
    TooFar,
    /// Queue mode, but this key's or the whole queue is full.
    QueueFull,
    /// Zoho locked this user out of this route; no call goes until the lock ends.
    Locked,
}

/// What a caller is told about its quota (IETF RateLimit headers), as of the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaView {
    pub remaining: u32,
    /// Nanoseconds until at least one more call could go (0 if one can go now).
    pub reset_in: Nanos,
}

/// Why a key is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockReason {
    /// Zoho answered with a throttle signal.
    UpstreamThrottle,
}

/// A store could not answer (Redis unreachable, slow, or returned garbage).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("limiter store unavailable: {0}")]
    Unavailable(String),
    #[error("limiter store did not answer in time")]
    Timeout,
}

/// The limiter interface every store implements (the embedded one and Redis).
///
/// Decisions and the state they rest on change in one atomic step per key, reading the clock
/// inside that step, so concurrent callers (or replicas) can never both take the last slot.
/// Times in answers are on the local [`Clock`], whatever clock the store decides on.
pub trait Limiter: Send + Sync + 'static {
    /// Decides one call arriving now. `queue` is `None` in reject mode.
    fn acquire(
        &self,
        policy: &Policy,
        key: Key,
        queue: Option<QueueRule>,
    ) -> impl Future<Output = Result<Acquire, StoreError>> + Send;

    /// The caller of `reservation` went away before its slot: give the slot back.
    fn cancel(
        &self,
        policy: &Policy,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The caller of `reservation` reached its slot. `Ok(Err(refusal))` if the key was locked
    /// while it waited: the call must then not be sent.
    fn redeem(
        &self,
        policy: &Policy,
        reservation: &Reservation,
    ) -> impl Future<Output = Result<Result<(), Refusal>, StoreError>> + Send;

    /// Zoho signalled a throttle: no call for `key` goes until `until`.
    fn lock(
        &self,
        policy: &Policy,
        key: Key,
        until: Nanos,
        reason: LockReason,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Forgets keys that hold no information any more (idle past their window, unlocked, no
    /// waiters). Returns how many were removed. Stores that expire keys themselves return 0.
    fn evict_idle(&self) -> usize;

    /// Number of (route, user) keys held in this process.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys currently locked, per route, as far as this process knows.
    fn locks_active(&self, route: RouteId) -> usize;

    /// The local clock answers are expressed on (the proxy sleeps on it).
    fn clock(&self) -> &dyn Clock;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_user_key_is_the_first_eight_bytes_in_lowercase_hex() {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&[0x00, 0x0f, 0xa0, 0xff, 0x12, 0x34, 0xab, 0xcd]);
        bytes[8..].fill(0xee);
        assert_eq!(UserKey(bytes).short(), "000fa0ff1234abcd");
        assert_eq!(format!("{:?}", UserKey(bytes)), "UserKey(000fa0ff1234abcd)");
    }

    #[test]
    fn hex_user_keys_round_trip_and_nothing_else_parses() {
        let key = UserKey([
            0x00, 0x0f, 0xa0, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xab, 0xcd,
        ]);
        assert_eq!(key.hex(), "000fa0ff0102030405060708090aabcd");
        assert_eq!(UserKey::from_hex(&key.hex()), Some(key));
        for bad in [
            "",
            "000fa0ff",
            &"g".repeat(32),
            &"é".repeat(16),
            &"0".repeat(33),
        ] {
            assert_eq!(UserKey::from_hex(bad), None, "{bad:?}");
        }
    }
}
