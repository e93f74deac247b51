//! The store the proxy runs on: the embedded one or Redis, behind one [`Limiter`] interface.
//!
//! An enum rather than a trait object: the embedded store's answers are ready at once and stay
//! free of boxing, and the proxy still sees one interface.

use std::sync::Arc;

use super::{
    Acquire, Clock, Key, Limiter, LockReason, MemoryStore, Nanos, Policy, QueueRule, Refusal,
    Reservation, RouteId, StoreError,
};

pub enum Store {
    Memory(MemoryStore),
}

impl Store {
    /// Gives a reservation back from a place that cannot wait (a `Drop`): at once for the
    /// embedded store, in a background task for a remote one.
    pub fn cancel_detached(self: &Arc<Self>, policy: Policy, reservation: Reservation) {
        match self.as_ref() {
            Store::Memory(m) => m.cancel_now(&policy, &reservation),
        }
    }

    /// Ready to take calls: the embedded store always is.
    pub fn ready(&self) -> bool {
        match self {
            Store::Memory(_) => true,
        }
    }
}

impl Limiter for Store {
    async fn acquire(&self, policy: &Policy, key: Key, queue: Option<QueueRule>) -> Result<Acquire, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.acquire_now(policy, key, queue)),
        }
    }

    async fn cancel(&self, policy: &Policy, reservation: &Reservation) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.cancel_now(policy, reservation);
                Ok(())
            }
        }
    }

    async fn redeem(&self, _policy: &Policy, reservation: &Reservation) -> Result<Result<(), Refusal>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.redeem_now(reservation)),
        }
    }

    async fn lock(&self, _policy: &Policy, key: Key, until: Nanos, _reason: LockReason) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.lock_now(key, until);
                Ok(())
            }
        }
    }

    fn evict_idle(&self) -> usize {
        match self {
            Store::Memory(m) => m.evict_idle_now(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Store::Memory(m) => m.keys(),
        }
    }

    fn locks_active(&self, route: RouteId) -> usize {
        match self {
            Store::Memory(m) => m.locks_in(route),
        }
    }

    fn clock(&self) -> &dyn Clock {
        match self {
            Store::Memory(m) => Limiter::clock(m),
        }
    }
}
