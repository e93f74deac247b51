//! The exact sliding log (`algorithm: window`): the last `limit` send times of one key.
//!
//! Invariant: the recorded times are sorted, and any `limit + 1` consecutive ones span at least
//! `window`. That is exactly "no window of that length holds more than `limit` sends". A new send
//! keeps it if it goes no earlier than the `limit`-th most recent send plus `window`, and no earlier
//! than the newest one (FIFO behind every reservation). Only the last `limit + pending reservations`
//! times are ever needed: whichever reservations are cancelled, the `limit` most recent remaining
//! times are still held, and removing times from a valid log leaves it valid.

use std::collections::VecDeque;

use super::{Nanos, QuotaView};

#[derive(Debug, Default, Clone)]
pub(super) struct SendLog {
    times: VecDeque<Nanos>,
}

impl SendLog {
    /// The earliest time at or after `now` that a new send may take.
    pub(super) fn next_free(&self, limit: u32, window: Nanos, now: Nanos) -> Nanos {
        let newest = self.times.back().copied().unwrap_or(0);
        let limit = limit as usize;
        let freed_by_window = if self.times.len() >= limit {
            self.times[self.times.len() - limit].saturating_add(window)
        } else {
            0
        };
        now.max(newest).max(freed_by_window)
    }

    /// Records a send (or a reservation) at `at`, which must come from `next_free`, keeping the
    /// newest `keep` times (`limit` plus the reservations that may still be cancelled).
    pub(super) fn record(&mut self, at: Nanos, keep: usize) {
        self.times.push_back(at);
        while self.times.len() > keep {
            self.times.pop_front();
        }
    }

    /// Gives back a reservation that will not be used.
    pub(super) fn cancel(&mut self, at: Nanos) {
        if let Some(i) = self.times.iter().rposition(|&t| t == at) {
            self.times.remove(i);
        }
    }

    /// Sends recorded at or after `at`.
    pub(super) fn count_since(&self, at: Nanos) -> usize {
        self.times.iter().filter(|&&t| t >= at).count()
    }

    /// Send times, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = Nanos> + '_ {
        self.times.iter().copied()
    }

    /// When this log stops constraining anything: then it is as good as empty.
    pub(super) fn idle_at(&self, window: Nanos) -> Nanos {
        self.times.back().map_or(0, |&t| t.saturating_add(window))
    }

    /// Remaining calls in the window ending now, and when the next one frees up.
    pub(super) fn view(&self, limit: u32, window: Nanos, now: Nanos) -> QuotaView {
        let used = self
            .times
            .iter()
            .filter(|&&t| t.saturating_add(window) > now)
            .count();
        let remaining = (limit as usize).saturating_sub(used) as u32;
        let reset_in = self.next_free(limit, window, now) - now;
        QuotaView {
            remaining,
            reset_in,
        }
    }

    #[cfg(test)]
    fn times(&self) -> Vec<Nanos> {
        self.times.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Nanos = 60;

    fn log_after(sends: &[Nanos], limit: u32) -> SendLog {
        let mut log = SendLog::default();
        for &t in sends {
            let at = log.next_free(limit, W, t);
            log.record(at, limit as usize);
        }
        log
    }

    #[test]
    fn burst_of_limit_from_idle_goes_at_once() {
        let log = log_after(&[0, 0, 0], 3);
        assert_eq!(log.times(), vec![0, 0, 0]);
    }

    #[test]
    fn call_over_limit_waits_for_oldest_to_leave_window() {
        let log = log_after(&[0, 10, 20], 3);
        assert_eq!(log.next_free(3, W, 25), 60);
        assert_eq!(log.next_free(3, W, 70), 70);
    }

    #[test]
    fn new_send_never_goes_before_a_reservation() {
        let mut log = log_after(&[0, 0], 2);
        log.record(log.next_free(2, W, 1), 3); // reserved at 60
        assert_eq!(log.next_free(2, W, 2), 60);
    }

    #[test]
    fn cancelled_last_reservation_frees_its_slot() {
        let mut log = log_after(&[0, 0], 2);
        let slot = log.next_free(2, W, 1);
        log.record(slot, 3);
        log.cancel(slot);
        assert_eq!(log.next_free(2, W, 2), 60);
        assert_eq!(log.times(), vec![0, 0]);
    }

    #[test]
    fn view_counts_calls_in_window() {
        let log = log_after(&[0, 10], 3);
        assert_eq!(
            log.view(3, W, 20),
            QuotaView {
                remaining: 1,
                reset_in: 0
            }
        );
        assert_eq!(
            log.view(3, W, 65),
            QuotaView {
                remaining: 2,
                reset_in: 0
            }
        );
    }
}
