//! The store the proxy runs on: the embedded one or Redis, behind one [`Limiter`] interface.
//!
//! An enum rather than a trait object: the embedded store's answers are ready at once and stay
//! free of boxing, and the proxy still sees one interface.

use std::sync::Arc;

use super::{
    Acquire, Clock, Key, Limiter, LockReason, MemoryStore, Nanos, Policy, QueueRule, RedisStore,
    Refusal, Reservation, RouteId, StoreError,
};

pub enum Store {
    Memory(MemoryStore),
    Redis(Arc<RedisStore>),
}

impl Store {
    /// Gives a reservation back from a place that cannot wait (a `Drop`): at once for the
    /// embedded store, in a background task for a remote one.
    pub fn cancel_detached(self: &Arc<Self>, policy: Policy, reservation: Reservation) {
        match self.as_ref() {
            Store::Memory(m) => m.cancel_now(&policy, &reservation),
            Store::Redis(r) => {
                let r = r.clone();
                tokio::spawn(async move {
                    // A failure is counted by the store; the slot then simply expires.
                    let _ = r.cancel(&policy, &reservation).await;
                });
            }
        }
    }

    /// Ready to take calls: the embedded store always is.
    pub fn ready(&self) -> bool {
        match self {
            Store::Memory(_) => true,
            Store::Redis(r) => r.ready(),
        }
    }
}

impl Limiter for Store {
    async fn acquire(
        &self,
        policy: &Policy,
        key: Key,
        queue: Option<QueueRule>,
    ) -> Result<Acquire, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.acquire_now(policy, key, queue)),
            // Boxed: a Redis round trip's state is large, and every call's future (queued ones
            // included) would otherwise reserve room for it, memory store or not.
            Store::Redis(r) => Box::pin(r.acquire(policy, key, queue)).await,
        }
    }

    async fn cancel(&self, policy: &Policy, reservation: &Reservation) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.cancel_now(policy, reservation);
                Ok(())
            }
            Store::Redis(r) => Box::pin(r.cancel(policy, reservation)).await,
        }
    }

    async fn redeem(
        &self,
        _policy: &Policy,
        reservation: &Reservation,
    ) -> Result<Result<(), Refusal>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.redeem_now(reservation)),
            Store::Redis(r) => Box::pin(r.redeem(reservation)).await,
        }
    }

    async fn lock(
        &self,
        _policy: &Policy,
        key: Key,
        until: Nanos,
        _reason: LockReason,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.lock_now(key, until);
                Ok(())
            }
            Store::Redis(r) => Box::pin(r.lock(key, until)).await,
        }
    }

    fn evict_idle(&self) -> usize {
        match self {
            Store::Memory(m) => m.evict_idle_now(),
            Store::Redis(r) => r.evict_idle(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Store::Memory(m) => m.keys(),
            Store::Redis(r) => r.keys(),
        }
    }

    fn locks_active(&self, route: RouteId) -> usize {
        match self {
            Store::Memory(m) => m.locks_in(route),
            Store::Redis(r) => r.locks_in(route),
        }
    }

    fn clock(&self) -> &dyn Clock {
        match self {
            Store::Memory(m) => Limiter::clock(m),
            Store::Redis(r) => r.local_clock(),
        }
    }
}
