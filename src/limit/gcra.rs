//! GCRA (`algorithm: gcra`): one theoretical arrival time per key, 8 bytes of state.
//!
//! governor's GCRA with burst N and refill N/per lets 2N-1 calls into one window. To keep the
//! window bound, the emission period is sized so `burst + (window / period) - 1 <= limit`, that is
//! `period = ceil(window / (limit - burst + 1))`, rounded up (rounding down breaks the bound).
//! The decisions are the same as governor's `check_key` for the same quota (a test checks that);
//! the state lives here instead of in governor because queue mode must reserve a future cell and
//! give it back, which governor's API cannot do.

use super::{Nanos, QuotaView};

/// The emission period that keeps `burst` at once plus steady pacing under `limit` per `window`.
pub fn gcra_period(limit: u32, burst: u32, window: Nanos) -> Nanos {
    let burst = burst.clamp(1, limit.max(1));
    let cells = u64::from(limit.max(1) - burst + 1);
    window.div_ceil(cells).max(1)
}

/// Theoretical arrival time of the next cell.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tat(pub(super) Nanos);

impl Tat {
    pub(super) fn tolerance(burst: u32, period: Nanos) -> Nanos {
        u64::from(burst.saturating_sub(1)).saturating_mul(period)
    }

    pub(super) fn next_free(self, burst: u32, period: Nanos, now: Nanos) -> Nanos {
        now.max(self.0.saturating_sub(Self::tolerance(burst, period)))
    }

    /// Takes the cell at `at` (from `next_free`); returns the new TAT, which is also the undo token.
    pub(super) fn record(&mut self, at: Nanos, period: Nanos) -> Nanos {
        self.0 = self.0.max(at).saturating_add(period);
        self.0
    }

    /// Gives a reserved cell back, if nothing was taken after it.
    pub(super) fn cancel(&mut self, undo: Nanos, period: Nanos) {
        if self.0 == undo {
            self.0 = self.0.saturating_sub(period);
        }
    }

    pub(super) fn view(self, burst: u32, period: Nanos, now: Nanos) -> QuotaView {
        let earliest = self.next_free(burst, period, now);
        if earliest > now {
            return QuotaView {
                remaining: 0,
                reset_in: earliest - now,
            };
        }
        // Cells that could still go at `now`: each one moves the TAT on by one period.
        let headroom = (now + Self::tolerance(burst, period)).saturating_sub(self.0.max(now));
        let remaining = (headroom / period + 1).min(u64::from(burst)) as u32;
        QuotaView {
            remaining,
            reset_in: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_is_rounded_up() {
        assert_eq!(gcra_period(20, 5, 61_000), 3_813); // 61000 / 16 = 3812.5
        assert_eq!(gcra_period(20, 20, 60), 60);
        assert_eq!(gcra_period(20, 1, 60), 3);
    }

    #[test]
    fn burst_then_one_per_period() {
        let (burst, period) = (3, 10);
        let mut tat = Tat::default();
        for _ in 0..3 {
            let at = tat.next_free(burst, period, 0);
            assert_eq!(at, 0);
            tat.record(at, period);
        }
        assert_eq!(tat.next_free(burst, period, 0), 10);
    }

    #[test]
    fn cancel_undoes_only_the_last_cell() {
        let (burst, period) = (1, 10);
        let mut tat = Tat::default();
        tat.record(0, period);
        let first = tat.record(tat.next_free(burst, period, 0), period);
        let second = tat.record(tat.next_free(burst, period, 0), period);
        tat.cancel(first, period);
        assert_eq!(tat.0, second, "an earlier reservation cannot be undone");
        tat.cancel(second, period);
        assert_eq!(
            tat.next_free(burst, period, 0),
            20,
            "the first reservation (at 10) still holds"
        );
    }
}
