//! Injected time. Decisions read the clock inside the per-key critical section, so the send times
//! a key records never go backwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Nanoseconds since the clock's origin.
pub type Nanos = u64;

/// A duration in the limiter's unit, saturating (a duration past ~584 years is "forever").
pub fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Nanos;
    /// The tokio instant of `at`, for sleeping until a reserved slot.
    fn instant(&self, at: Nanos) -> tokio::time::Instant;
}

/// Real time, on tokio's clock (so `start_paused` tests control it too).
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl TokioClock {
    /// A clock whose origin lies `history` in the past, so times up to `history` before the
    /// process started (restored from a state file) keep their true distance from now.
    pub fn with_history(history: std::time::Duration) -> Self {
        let now = tokio::time::Instant::now();
        TokioClock {
            origin: now.checked_sub(history).unwrap_or(now),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Nanos {
        nanos(self.origin.elapsed())
    }

    fn instant(&self, at: Nanos) -> tokio::time::Instant {
        self.origin + Duration::from_nanos(at)
    }
}

/// A clock that moves only when told to: for limiter tests and benchmarks.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
    origin: std::sync::OnceLock<tokio::time::Instant>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, at: Nanos) {
        self.now.store(at, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(nanos(by), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.now.load(Ordering::SeqCst)
    }

    fn instant(&self, at: Nanos) -> tokio::time::Instant {
        *self.origin.get_or_init(tokio::time::Instant::now) + Duration::from_nanos(at)
    }
}
