//! The exact sliding log (`algorithm: window`): the last `limit` send times of one key.
//!
//! Invariant: the recorded times are sorted, and every send went no earlier than the recorded
//! time `limit` places before it plus `window`. That is exactly "no window of that length holds
//! more than `limit` sends": of any `limit + 1` sends, the last went at least `window` after the
//! recorded time of the first, which is no earlier than when the first really went. Only the last
//! `limit + pending reservations` times are ever needed: whichever reservations are cancelled, the
//! `limit` most recent remaining times are still held, and removing times from a valid log leaves
//! it valid. Of those, the times that have left the window are dropped too while no reservation
//! is out ([`SendLog::forget_expired`]): they cannot hold back any send from now on.
//!
//! ## Encoding: 4 bytes a send, rounded up
//!
//! A time is kept as a `u32` count of units past a per-log base, where a unit is `2^shift` ns and
//! the base is a multiple of the unit (and of 64 ns). The unit is the finest whose 2^32 steps
//! cover twice what the log must represent, from its oldest time to its idle time (`newest +
//! window`): 1 ns for spans up to 2.1 s, 64 ns for the shipped one-minute windows, 2^32 ns at
//! most, which reaches every `u64` time. A time out of range moves the base up (about once per
//! span, as time moves on) or, if the span itself outgrew the range, makes the unit coarser; the
//! log is then re-encoded.
//!
//! **Every time is rounded up** to the next multiple of the unit: a recorded time is never earlier
//! than the real one, so a send's window never ends earlier than it really does. [`SendLog::next_free`]
//! computes a new send's earliest time from the *recorded* times, so the bound above holds exactly
//! for the real send times; rounding costs at most one unit of extra wait. Making the unit coarser
//! rounds every recorded time up once more (later: still safe); making it finer is exact, and
//! happens only while no reservation is outstanding.
//!
//! A reservation is given back by the time it was recorded at ([`SendLog::reserve`] returns it).
//! Units are powers of two and bases multiples of them, so rounding that time up to a coarser unit
//! gives exactly what re-encoding the stored entry gave: cancel finds the entry it recorded (or an
//! equal one, which is the same thing to the log).

use super::{Nanos, QuotaView};

/// Low bits of `anchor` that hold the shift; the base is a multiple of `1 << ANCHOR_BITS`.
const ANCHOR_BITS: u32 = 6;
const SHIFT_MASK: u64 = (1 << ANCHOR_BITS) - 1;
/// The coarsest unit, 2^32 ns: 2^32 of them span every `u64` time.
const MAX_SHIFT: u32 = 32;
/// The offset that stands for "the end of time" (`Nanos::MAX`): for times past the range even in
/// the coarsest unit, only reachable through saturating arithmetic on absurd windows.
const END: u32 = u32::MAX;

/// The send times of one key, oldest first, in a ring sized to what the log must hold.
#[derive(Debug, Clone, Default)]
pub(super) struct SendLog {
    /// Offsets from the base, in units; its length is the capacity.
    ring: Box<[u32]>,
    /// The base time, with the shift in its low [`ANCHOR_BITS`] bits (one word instead of two).
    anchor: u64,
    /// Index of the oldest time in `ring`.
    head: u32,
    len: u32,
    /// When the log stops constraining anything, as an offset (rounded up); 0 in an empty log
    /// means "already".
    idle: u32,
    /// Callers holding a reservation recorded here, not yet sent or given back.
    queued: u32,
}

impl SendLog {
    /// The earliest time at or after `now` that a new send may take.
    pub(super) fn next_free(&self, limit: u32, window: Nanos, now: Nanos) -> Nanos {
        if self.len == 0 {
            return now.max(self.idle_at()); // held (see `hold_until`), or nothing to wait for
        }
        // Behind every recorded time (FIFO behind reservations): any time past the unit before the
        // newest is recorded no earlier than the newest, which keeps the log sorted.
        let behind = self
            .newest()
            .map_or(0, |newest| newest.saturating_sub(self.unit() - 1));
        let freed_by_window = match self.len.checked_sub(limit) {
            Some(i) => self.decode(self.get(i)).saturating_add(window),
            None => 0,
        };
        now.max(behind).max(freed_by_window)
    }

    /// Forgets the sends that had left the window by `now`, but never the newest, and only while
    /// no reservation is out. No send can go before `now` any more, so these can never hold one
    /// back: every decision stays exactly what it would have been. The log then holds what the
    /// window holds, not up to `limit` times, and the checks that follow stop at its first entry.
    ///
    /// The two exceptions keep the log from ever being left empty by this: an empty log means
    /// something else, one that lets nothing go before its idle time ([`SendLog::hold_until`]).
    /// For a log with sends that time is only how long it is kept (a restored key's may be the
    /// longest window of any route), and a reservation given back from a log holding nothing
    /// else makes a hold until its slot ([`SendLog::cancel`]); with the newest send kept and no
    /// reservation out, neither can follow from forgetting.
    pub(super) fn forget_expired(&mut self, now: Nanos, window: Nanos) {
        while self.len > 1
            && self.queued == 0
            && self
                .oldest()
                .is_some_and(|oldest| oldest.saturating_add(window) <= now)
        {
            self.pop_front();
        }
    }

    /// Records a send at `at` (from `next_free`), keeping the newest `limit` times plus one per
    /// outstanding reservation. Returns the time recorded: `at` rounded up.
    pub(super) fn record(&mut self, at: Nanos, limit: u32, window: Nanos) -> Nanos {
        let keep = (limit as usize).saturating_add(self.queued as usize).max(1);
        while self.len as usize >= keep {
            self.pop_front();
        }
        self.size_for(keep, limit as usize);
        // `at` is no earlier than the oldest time (`fit` takes that into account when it must).
        self.fit(at, at.saturating_add(window));
        let mut offset = self.encode(at);
        if self.len > 0 {
            // Only after the unit got finer (never with a reservation out): stay sorted.
            offset = offset.max(self.get(self.len - 1));
        } else if self.idle > 0 {
            // The first send after a hold is recorded past it, so that the sends behind it (up to
            // a unit before it, see `next_free`) cannot go before the hold either.
            offset = offset.max(self.idle.saturating_add(1));
        }
        self.push_back(offset);
        self.set_idle_after(window);
        self.decode(offset)
    }

    /// Records a reservation at `at`, outstanding until [`SendLog::release`]: like
    /// [`SendLog::record`]. Returns the time to give to [`SendLog::cancel`].
    pub(super) fn reserve(&mut self, at: Nanos, limit: u32, window: Nanos) -> Nanos {
        self.queued = self.queued.saturating_add(1);
        self.record(at, limit, window)
    }

    /// Gives back a reservation that will not be used: `recorded` is what `reserve` returned. The
    /// caller releases it too ([`SendLog::release`]).
    pub(super) fn cancel(&mut self, recorded: Nanos, window: Nanos) {
        if self.len == 0 || recorded < self.base() {
            return; // not held (any more)
        }
        let offset = self.encode(recorded);
        if let Some(i) = (0..self.len).rev().find(|&i| self.get(i) == offset) {
            self.remove(i);
            if self.len > 0 {
                self.set_idle_after(window);
            } else {
                // Only a hold or an assumed-full floor lets a log hold nothing but reservations
                // (forgetting never empties a log, nor runs while one is out): keep holding
                // until just before the slot given back (no earlier than the hold).
                self.idle = offset.saturating_sub(1).max(1);
            }
        }
    }

    /// A reservation was sent or given back: it no longer needs a place in the log.
    pub(super) fn release(&mut self) {
        self.queued = self.queued.saturating_sub(1);
    }

    /// Callers holding a reservation recorded here.
    pub(super) fn queued(&self) -> u32 {
        self.queued
    }

    /// Carries reservations over to a new log (their places in the old one are gone).
    pub(super) fn set_queued(&mut self, queued: u32) {
        self.queued = queued;
    }

    /// Sends recorded at or after `at`.
    pub(super) fn count_since(&self, at: Nanos) -> usize {
        self.len as usize - self.count_while(|t| t < at)
    }

    /// Recorded send times (rounded up), oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = Nanos> + '_ {
        let (first, second) = self.runs();
        first.iter().chain(second).map(|&o| self.decode(o))
    }

    /// When this log stops constraining anything: then it is as good as empty.
    pub(super) fn idle_at(&self) -> Nanos {
        if self.len == 0 && self.idle == 0 {
            0
        } else {
            self.decode(self.idle)
        }
    }

    /// Keeps the log from counting as idle before `at` (a restored key lives as long as the
    /// saved one would have); the next send sets the idle time from the sends again. An empty
    /// log lets no send go before `at`: as if `limit` had gone one window before.
    pub(super) fn hold_until(&mut self, at: Nanos) {
        if at <= self.idle_at() {
            return;
        }
        // In an empty log the offset must not be 0, which means "idle already".
        let lo = self.oldest().unwrap_or(at - 1);
        self.fit(lo, at);
        self.idle = self.encode(at);
    }

    /// A log of saved `times` (any order), each rounded up, held until at least `idle_at`.
    pub(super) fn from_times(times: Vec<Nanos>, idle_at: Nanos) -> Self {
        let mut log = SendLog::default();
        log.fill(times, idle_at);
        log
    }

    /// Adds `other`'s times to this log (restoring saved state over live state), held until at
    /// least `idle_at`. Outstanding reservations keep the unit from getting finer.
    pub(super) fn merge(&mut self, other: &SendLog, idle_at: Nanos) {
        let times = self.iter().chain(other.iter()).collect();
        let mut log = SendLog {
            queued: self.queued,
            anchor: if self.queued > 0 {
                u64::from(self.shift())
            } else {
                0
            },
            ..SendLog::default()
        };
        log.fill(times, idle_at.max(self.idle_at()));
        *self = log;
    }

    /// Fills an empty log with `times`, each rounded up.
    fn fill(&mut self, mut times: Vec<Nanos>, idle_at: Nanos) {
        times.sort_unstable();
        let (Some(&lo), Some(&hi)) = (times.first(), times.last()) else {
            self.hold_until(idle_at);
            return;
        };
        self.ring = vec![0; times.len()].into_boxed_slice();
        self.fit(lo, hi.max(idle_at));
        for t in times {
            let offset = self.encode(t);
            self.push_back(offset);
        }
        let idle = self.newest().unwrap_or(hi).max(idle_at);
        self.fit(lo, idle);
        self.idle = self.encode(idle);
    }

    /// Remaining calls in the window ending now, and when the next one frees up.
    pub(super) fn view(&self, limit: u32, window: Nanos, now: Nanos) -> QuotaView {
        let left_window = self.count_while(|t| t.saturating_add(window) <= now);
        let used = self.len as usize - left_window;
        let remaining = (limit as usize).saturating_sub(used) as u32;
        let reset_in = self.next_free(limit, window, now) - now;
        QuotaView {
            remaining,
            reset_in,
        }
    }

    // ---- the encoding ----

    fn base(&self) -> Nanos {
        self.anchor & !SHIFT_MASK
    }

    fn shift(&self) -> u32 {
        (self.anchor & SHIFT_MASK) as u32
    }

    /// One unit of recorded time, in nanoseconds.
    fn unit(&self) -> Nanos {
        1 << self.shift()
    }

    fn decode(&self, offset: u32) -> Nanos {
        decode(self.anchor, offset)
    }

    /// The offset of `t` (at or after the base), rounded up; [`END`] past the range.
    fn encode(&self, t: Nanos) -> u32 {
        encode(self.anchor, t).unwrap_or(END)
    }

    /// Sets the idle time from the newest send (0 when there is none).
    fn set_idle_after(&mut self, window: Nanos) {
        match self.newest() {
            Some(newest) => {
                let idle = newest.saturating_add(window);
                self.fit(newest, idle);
                self.idle = self.encode(idle);
            }
            None => {
                // Nothing left: base 0. The unit stays while a reservation is out (see `fit`).
                self.anchor &= if self.queued > 0 { SHIFT_MASK } else { 0 };
                self.idle = 0;
            }
        }
    }

    /// Makes every time in `lo..=hi` representable, with what the log holds. If it is not, the
    /// base moves to the oldest time and the unit becomes the finest that reaches twice the span
    /// (never finer while a reservation is out); the log is re-encoded. A unit four times coarser
    /// than needed is made finer the same way.
    fn fit(&mut self, lo: Nanos, hi: Nanos) {
        let base = self.base();
        let shift = self.shift();
        let room = u64::from(END - 1) << shift;
        if lo >= base {
            let span = hi.saturating_sub(base);
            let too_coarse = shift > 0 && self.queued == 0 && span < room >> 2;
            if span <= room && !too_coarse {
                return;
            }
        }
        let (mut lo, mut hi) = (lo, hi);
        for t in [self.oldest(), self.newest()].into_iter().flatten() {
            (lo, hi) = (lo.min(t), hi.max(t));
        }
        let idle = self.idle_at();
        if idle > 0 {
            (lo, hi) = (lo.min(idle), hi.max(idle));
        }
        // Room for the span to double before the next re-encoding: a log sliding with time then
        // re-encodes once per span, not at every send.
        let reach = hi.saturating_add(hi - lo);
        let mut shift = if self.queued > 0 { shift } else { 0 };
        let anchor = loop {
            let align = 1u64 << shift.max(ANCHOR_BITS);
            let anchor = (lo & !(align - 1)) | u64::from(shift);
            if shift == MAX_SHIFT || encode(anchor, reach).is_some() {
                break anchor;
            }
            shift += 1;
        };
        let old = self.anchor;
        for i in 0..self.len {
            let slot = self.slot(i);
            self.ring[slot] = encode(anchor, decode(old, self.ring[slot])).unwrap_or(END);
        }
        if idle > 0 {
            self.idle = encode(anchor, idle).unwrap_or(END);
        }
        self.anchor = anchor;
    }

    // ---- the ring ----

    fn get(&self, i: u32) -> u32 {
        self.ring[self.slot(i)]
    }

    /// Ring index of the `i`-th oldest time.
    fn slot(&self, i: u32) -> usize {
        let at = self.head as usize + i as usize;
        match at.checked_sub(self.ring.len()) {
            Some(wrapped) => wrapped,
            None => at,
        }
    }

    /// The recorded offsets as two sorted runs (the ring may wrap), oldest first.
    fn runs(&self) -> (&[u32], &[u32]) {
        let cap = self.ring.len();
        let (head, len) = (self.head as usize, self.len as usize);
        if head + len <= cap {
            (&self.ring[head..head + len], &[])
        } else {
            (&self.ring[head..], &self.ring[..head + len - cap])
        }
    }

    /// How many recorded times `before` holds for: a prefix, since the log is sorted. The oldest
    /// is looked at first: after [`SendLog::forget_expired`] that is usually the answer.
    fn count_while(&self, before: impl Fn(Nanos) -> bool) -> usize {
        if !self.oldest().is_some_and(&before) {
            return 0;
        }
        let (first, second) = self.runs();
        let n = first.partition_point(|&o| before(self.decode(o)));
        if n < first.len() {
            n
        } else {
            n + second.partition_point(|&o| before(self.decode(o)))
        }
    }

    fn oldest(&self) -> Option<Nanos> {
        (self.len > 0).then(|| self.decode(self.get(0)))
    }

    fn newest(&self) -> Option<Nanos> {
        (self.len > 0).then(|| self.decode(self.get(self.len - 1)))
    }

    fn pop_front(&mut self) {
        if self.len > 0 {
            self.head = self.slot(1) as u32;
            self.len -= 1;
        }
    }

    fn push_back(&mut self, offset: u32) {
        if self.len as usize == self.ring.len() {
            let cap = self.ring.len();
            self.resize(cap + (cap / 4).max(1));
        }
        let slot = self.slot(self.len);
        self.ring[slot] = offset;
        self.len += 1;
    }

    fn remove(&mut self, i: u32) {
        for j in i..self.len - 1 {
            let (to, from) = (self.slot(j), self.slot(j + 1));
            self.ring[to] = self.ring[from];
        }
        self.len -= 1;
    }

    /// Makes room for one more time, `keep` at most being held: the ring doubles up to `limit`
    /// and ends exactly there (a full log of `limit` takes `4 * limit` bytes, not a power of two);
    /// reservations grow it by a quarter at a time; a ring larger than needed once no reservation
    /// is out is cut back to `keep`.
    fn size_for(&mut self, keep: usize, limit: usize) {
        let (cap, need) = (self.ring.len(), self.len as usize + 1);
        if need > cap {
            let wanted = if cap < limit {
                (cap * 2).max(4).min(keep)
            } else {
                cap + cap / 4
            };
            self.resize(wanted.max(need));
        } else if cap > keep && self.queued == 0 {
            self.resize(keep);
        }
    }

    fn resize(&mut self, cap: usize) {
        let mut ring = vec![0; cap].into_boxed_slice();
        let (first, second) = self.runs();
        ring[..first.len()].copy_from_slice(first);
        ring[first.len()..first.len() + second.len()].copy_from_slice(second);
        self.ring = ring;
        self.head = 0;
    }
}

fn decode(anchor: u64, offset: u32) -> Nanos {
    if offset == END {
        return Nanos::MAX;
    }
    let shift = (anchor & SHIFT_MASK) as u32;
    (anchor & !SHIFT_MASK).saturating_add(u64::from(offset) << shift)
}

/// `t` as an offset under `anchor`, rounded up, if it is representable.
fn encode(anchor: u64, t: Nanos) -> Option<u32> {
    let base = anchor & !SHIFT_MASK;
    let shift = (anchor & SHIFT_MASK) as u32;
    let past = t.checked_sub(base)?;
    let units = (u128::from(past) + (1u128 << shift) - 1) >> shift;
    match u32::try_from(units) {
        Ok(units) if units < END => Some(units),
        // Beyond even 2^32 units of 2^32 ns: "the end of time", which is no earlier.
        _ if shift == MAX_SHIFT => Some(END),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const W: Nanos = 60;
    /// The shipped one-minute windows: `per: 1m` plus the default 1s margin.
    const MINUTE: Nanos = 61_000_000_000;
    const DAY: Nanos = 86_400_000_000_000;

    fn log_after(sends: &[Nanos], limit: u32) -> SendLog {
        let mut log = SendLog::default();
        for &t in sends {
            let at = log.next_free(limit, W, t);
            log.record(at, limit, W);
        }
        log
    }

    fn times(log: &SendLog) -> Vec<Nanos> {
        log.iter().collect()
    }

    #[test]
    fn burst_of_limit_from_idle_goes_at_once() {
        let log = log_after(&[0, 0, 0], 3);
        assert_eq!(times(&log), vec![0, 0, 0]);
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
        log.reserve(log.next_free(2, W, 1), 2, W); // reserved at 60
        assert_eq!(log.next_free(2, W, 2), 60);
    }

    #[test]
    fn cancelled_last_reservation_frees_its_slot() {
        let mut log = log_after(&[0, 0], 2);
        let slot = log.next_free(2, W, 1);
        let recorded = log.reserve(slot, 2, W);
        log.cancel(recorded, W);
        log.release();
        assert_eq!(log.next_free(2, W, 2), 60);
        assert_eq!(times(&log), vec![0, 0]);
        assert_eq!(log.idle_at(), 60);
    }

    #[test]
    fn view_counts_calls_in_window() {
        let log = log_after(&[0, 10], 3);
        let view = |now| log.view(3, W, now);
        assert_eq!((view(20).remaining, view(20).reset_in), (1, 0));
        assert_eq!((view(65).remaining, view(65).reset_in), (2, 0));
    }

    #[test]
    fn a_full_log_takes_four_bytes_a_send_and_no_more() {
        assert_eq!(std::mem::size_of::<SendLog>(), 40);
        let mut log = SendLog::default();
        let mut now = 1_000_000_007;
        for _ in 0..500 {
            now += MINUTE / 40;
            let at = log.next_free(50, MINUTE, now);
            log.record(at, 50, MINUTE);
        }
        assert_eq!(
            (log.len, log.ring.len()),
            (50, 50),
            "sized exactly, not doubled to 64"
        );
    }

    #[test]
    fn recorded_times_are_rounded_up_by_less_than_a_unit() {
        let mut log = SendLog::default();
        let sent: Vec<Nanos> = (0..50).map(|i| 5_000_000_001 + i * 1_199_999_999).collect();
        for &t in &sent {
            assert_eq!(log.next_free(50, MINUTE, t), t, "room for all 50");
            log.record(t, 50, MINUTE);
        }
        let unit = log.unit();
        assert!(
            unit <= 64,
            "one-minute windows are kept in 64 ns units at most: {unit}"
        );
        for (&real, recorded) in sent.iter().zip(log.iter()) {
            assert!(
                (real..real + unit).contains(&recorded),
                "{real} kept as {recorded}"
            );
        }
        let newest = log.newest().expect("sends");
        assert!(log.idle_at() >= sent[49] + MINUTE && log.idle_at() < newest + MINUTE + unit);
    }

    #[test]
    fn burst_from_idle_at_an_unaligned_time_goes_at_once() {
        let mut log = SendLog::default();
        let now = 3 * MINUTE + 7;
        for _ in 0..50 {
            assert_eq!(log.next_free(50, MINUTE, now), now);
            log.record(now, 50, MINUTE);
        }
        let next = log.next_free(50, MINUTE, now);
        assert!(
            (now + MINUTE..now + MINUTE + log.unit()).contains(&next),
            "the 51st waits one window, and at most one unit more: {next}"
        );
    }

    #[test]
    fn a_rounded_reservation_is_cancelled_by_its_recorded_time() {
        let mut log = SendLog::default();
        let now = 10 * MINUTE + 3;
        log.record(now, 1, MINUTE);
        let slot = log.next_free(1, MINUTE, now + 5);
        let recorded = log.reserve(slot, 1, MINUTE);
        assert!(recorded >= slot && recorded - slot < log.unit());
        let second = log.next_free(1, MINUTE, now + 6);
        assert!(
            second >= recorded + MINUTE,
            "{second} is a window after {recorded}"
        );
        log.cancel(recorded, MINUTE);
        log.release();
        assert_eq!(log.len, 1);
        let again = log.next_free(1, MINUTE, now + 7);
        assert!(
            (slot..slot + log.unit()).contains(&again),
            "the slot is free again (within the unit, which grew with the span): {again}"
        );
    }

    #[test]
    fn cancel_finds_a_reservation_after_the_unit_got_coarser() {
        let mut log = SendLog::default();
        let now = 5 * MINUTE + 11;
        log.record(now, 1, MINUTE);
        let slot = log.next_free(1, MINUTE, now);
        let first = log.reserve(slot, 1, MINUTE);
        let fine = log.unit();
        // A reservation days ahead widens the span: the unit gets coarser and both are re-encoded.
        log.reserve(slot + 3 * DAY + 12_345, 1, MINUTE);
        assert!(log.unit() > fine, "unit {} after {fine}", log.unit());
        assert!(times(&log)[1] >= first, "re-encoded no earlier");
        log.cancel(first, MINUTE);
        log.release();
        assert_eq!(log.len, 2, "the first reservation is gone");
        assert!(times(&log)[1] > slot + 3 * DAY);
    }

    #[test]
    fn the_unit_gets_finer_again_only_once_no_reservation_is_out() {
        let mut log = SendLog::default();
        let now = MINUTE + 5;
        log.record(now, 3, MINUTE);
        let fine = log.unit();
        let far = log.reserve(now + 30 * DAY, 3, MINUTE);
        let coarse = log.unit();
        assert!(coarse > fine);
        log.cancel(far, MINUTE);
        assert_eq!(log.unit(), coarse, "a reservation is out: the unit stays");
        log.release();
        let at = log.next_free(3, MINUTE, now + 1);
        log.record(at, 3, MINUTE);
        assert_eq!(log.unit(), fine, "back to the finest unit for the span");
    }

    #[test]
    fn the_base_follows_time() {
        let mut log = SendLog::default();
        let mut now = 0;
        for i in 0..10_000u64 {
            now += 1_000_000_000 + i % 997;
            let at = log.next_free(20, MINUTE, now);
            let recorded = log.record(at, 20, MINUTE);
            assert!(recorded >= at && recorded - at < log.unit());
        }
        let oldest = log.oldest().expect("sends");
        assert!(
            log.base() > now - 2 * MINUTE && log.base() <= oldest,
            "base {} oldest {oldest} now {now}",
            log.base()
        );
        assert!(log.unit() <= 64, "unit {}", log.unit());
    }

    #[test]
    fn windows_longer_than_the_offset_range_keep_the_bound() {
        let window = 40 * DAY;
        let mut log = SendLog::default();
        let mut now = 17;
        for _ in 0..3 {
            now += DAY + 1;
            let at = log.next_free(3, window, now);
            assert_eq!(at, now);
            log.record(at, 3, window);
        }
        assert!(
            log.unit() >= 1 << 10,
            "2^32 ns covers only 4.3 s: unit {}",
            log.unit()
        );
        let next = log.next_free(3, window, now);
        assert!(next >= DAY + 18 + window && next < DAY + 18 + window + log.unit());
    }

    #[test]
    fn a_window_of_forever_never_frees() {
        let mut log = SendLog::default();
        log.record(5, 1, Nanos::MAX);
        assert_eq!(log.idle_at(), Nanos::MAX);
        assert_eq!(log.next_free(1, Nanos::MAX, 1_000), Nanos::MAX);
        assert_eq!(
            times(&log),
            vec![5 + (log.unit() - 5 % log.unit()) % log.unit()]
        );
    }

    #[test]
    fn restored_times_are_rounded_up_and_held_until_their_idle_time() {
        let saved = vec![
            7 * MINUTE + 999,
            7 * MINUTE + 1,
            7 * MINUTE + 30_000_000_005,
        ];
        let idle_at = 9 * MINUTE;
        let log = SendLog::from_times(saved.clone(), idle_at);
        let unit = log.unit();
        let mut sorted = saved;
        sorted.sort_unstable();
        for (&real, recorded) in sorted.iter().zip(log.iter()) {
            assert!(
                (real..real + unit).contains(&recorded),
                "{real} as {recorded}"
            );
        }
        assert!(log.idle_at() >= idle_at && log.idle_at() < idle_at + unit);
        assert_eq!(log.ring.len(), 3);
    }

    #[test]
    fn a_hold_lets_nothing_go_before_it() {
        let hold = 4 * MINUTE + 13;
        let mut log = SendLog::default();
        log.hold_until(hold);
        assert_eq!(log.idle_at(), hold.next_multiple_of(log.unit()));
        assert!(log.next_free(5, MINUTE, MINUTE) >= hold);
        let at = log.next_free(5, MINUTE, hold + 1);
        log.record(at, 5, MINUTE);
        for _ in 0..3 {
            assert!(
                log.next_free(5, MINUTE, hold + 1) >= hold,
                "no one slips in ahead"
            );
        }
    }

    #[test]
    fn a_hold_survives_a_cancelled_first_reservation() {
        let hold = 4 * MINUTE + 13;
        let mut log = SendLog::default();
        log.hold_until(hold);
        let slot = log.next_free(5, MINUTE, MINUTE);
        let recorded = log.reserve(slot, 5, MINUTE);
        log.cancel(recorded, MINUTE);
        log.release();
        assert!(log.next_free(5, MINUTE, MINUTE) >= hold);
    }

    #[test]
    fn sends_that_left_the_window_are_forgotten_and_change_nothing() {
        let mut log = log_after(&[0, 10, 20, 30], 10);
        let before = (log.next_free(3, W, 75), log.view(3, W, 75));
        log.forget_expired(75, W);
        assert_eq!(
            times(&log),
            vec![20, 30],
            "0 and 10 left the window at 60 and 70"
        );
        assert_eq!((log.next_free(3, W, 75), log.view(3, W, 75)), before);
        log.forget_expired(80, W);
        assert_eq!(
            times(&log),
            vec![30],
            "a send whose window ends now is gone"
        );
        log.forget_expired(95, W);
        assert_eq!(times(&log), vec![30], "the newest is kept");
        // A reservation made after forgetting is still found when it is given back.
        let at = log.next_free(1, W, 90);
        assert_eq!(at, 90);
        let slot = log.next_free(2, W, 91);
        let recorded = log.reserve(slot, 2, W);
        log.cancel(recorded, W);
        log.release();
        assert_eq!(times(&log), vec![30]);
        // A restored log is kept until its saved idle time, but that does not hold its sends
        // back once they have left the window, forgotten or not.
        let mut restored = SendLog::from_times(vec![10, 20], 500);
        restored.forget_expired(100, W);
        assert_eq!(times(&restored), vec![20]);
        assert_eq!(restored.next_free(2, W, 100), 100);
        assert_eq!(restored.idle_at(), 500);
        // An empty log that holds still does.
        let mut held = SendLog::default();
        held.hold_until(500);
        held.forget_expired(100, W);
        assert_eq!(held.next_free(3, W, 100), 500);
    }

    #[test]
    fn a_window_of_forever_forgets_nothing() {
        let mut log = log_after(&[0, 1], 5);
        log.forget_expired(Nanos::MAX - 1, Nanos::MAX);
        assert_eq!(log.len, 2);
    }

    /// Largest number of sends inside any half-open window `[t, t + window)`.
    fn max_in_window(sends: &[Nanos], window: Nanos) -> usize {
        let mut sorted = sends.to_vec();
        sorted.sort_unstable();
        let mut best = 0;
        let mut start = 0;
        for end in 0..sorted.len() {
            while sorted[end] - sorted[start] >= window {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Moves time on by this many thousandths of the window (plus a few ns).
        Advance(u64),
        /// Moves time on by a few nanoseconds: less than a unit.
        Nudge(u64),
        Call {
            queue: bool,
        },
        /// The caller of the `n`-th pending reservation (modulo their number) goes away.
        Cancel(usize),
    }

    /// Up to 150 steps of time, calls, and callers leaving the queue.
    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                3 => (0u64..=1_000).prop_map(Op::Advance),
                1 => (0u64..64).prop_map(Op::Nudge),
                5 => any::<bool>().prop_map(|queue| Op::Call { queue }),
                1 => any::<usize>().prop_map(Op::Cancel),
            ],
            1..150,
        )
    }

    proptest! {
        /// With units far coarser than the gaps between calls, reservations, cancellations and
        /// re-encoding as time moves on, the real send times never put more than `limit` in a
        /// window, and every recorded time is at or after the real one; also when the sends
        /// that left the window are forgotten before each decision.
        #[test]
        fn rounded_logs_keep_the_bound_for_real_send_times(
            limit in 1u32..6,
            window in prop_oneof![1u64..5_000, 1_000_000u64..100_000_000_000, Just(40 * DAY)],
            start in 0u64..1_000_000_000_000,
            ops in ops(),
            forget in any::<bool>(),
        ) {
            let mut log = SendLog::default();
            let mut now = start;
            let mut sent = Vec::new();
            let mut pending: Vec<(Nanos, Nanos)> = Vec::new(); // (slot, recorded)
            for op in ops {
                match op {
                    Op::Advance(_) | Op::Nudge(_) => {
                        now += match op {
                            Op::Advance(per_mille) => window / 1_000 * per_mille + per_mille % 7,
                            Op::Nudge(ns) => ns,
                            _ => 0,
                        };
                        let (due, waiting): (Vec<_>, Vec<_>) =
                            pending.into_iter().partition(|&(slot, _)| slot <= now);
                        pending = waiting;
                        for (slot, _) in due {
                            log.release();
                            sent.push(slot);
                        }
                    }
                    Op::Call { queue } => {
                        if forget {
                            // What the memory store does before every decision.
                            log.forget_expired(now, window);
                        }
                        let at = log.next_free(limit, window, now);
                        prop_assert!(at >= now);
                        if at == now {
                            let recorded = log.record(at, limit, window);
                            prop_assert!(recorded >= at);
                            sent.push(at);
                        } else if queue {
                            let recorded = log.reserve(at, limit, window);
                            prop_assert!(recorded >= at);
                            pending.push((at, recorded));
                        }
                    }
                    Op::Cancel(n) => {
                        if !pending.is_empty() {
                            let (_, recorded) = pending.remove(n % pending.len());
                            log.cancel(recorded, window);
                            log.release();
                        }
                    }
                }
                prop_assert!(log.iter().zip(log.iter().skip(1)).all(|(a, b)| a <= b), "sorted");
            }
            sent.extend(pending.iter().map(|&(slot, _)| slot));
            let worst = max_in_window(&sent, window);
            prop_assert!(worst <= limit as usize, "{} in one window of {}: {:?}", worst, window, sent);
        }

        /// A log that forgets before every decision and one that never does, driven through the
        /// same calls, reservations, cancellations and sends, decide every call alike (windows
        /// short enough for a unit of 1 ns, so rounding cannot tell them apart).
        #[test]
        fn forgetting_changes_no_decision(
            limit in 1u32..6,
            window in 1u64..5_000,
            start in 0u64..1_000_000_000,
            ops in ops(),
        ) {
            let (mut forgetting, mut keeping) = (SendLog::default(), SendLog::default());
            let mut now = start;
            let mut pending: Vec<(Nanos, Nanos)> = Vec::new(); // (slot, recorded)
            for op in ops {
                let advances = matches!(op, Op::Advance(_) | Op::Nudge(_));
                match op {
                    Op::Advance(per_mille) => now += window * per_mille / 1_000 + per_mille % 7,
                    Op::Nudge(ns) => now += ns,
                    Op::Call { queue } => {
                        forgetting.forget_expired(now, window);
                        let at = forgetting.next_free(limit, window, now);
                        prop_assert_eq!(at, keeping.next_free(limit, window, now), "at {}", now);
                        prop_assert_eq!(
                            forgetting.view(limit, window, now),
                            keeping.view(limit, window, now)
                        );
                        if at == now {
                            let recorded = forgetting.record(at, limit, window);
                            prop_assert_eq!(recorded, keeping.record(at, limit, window));
                        } else if queue {
                            let recorded = forgetting.reserve(at, limit, window);
                            prop_assert_eq!(recorded, keeping.reserve(at, limit, window));
                            pending.push((at, recorded));
                        }
                    }
                    Op::Cancel(n) => {
                        if !pending.is_empty() {
                            let (_, recorded) = pending.remove(n % pending.len());
                            for log in [&mut forgetting, &mut keeping] {
                                log.cancel(recorded, window);
                                log.release();
                            }
                        }
                    }
                }
                if advances {
                    // Reservations whose slot came are sent: no longer outstanding.
                    let (due, waiting): (Vec<_>, Vec<_>) =
                        pending.into_iter().partition(|&(slot, _)| slot <= now);
                    pending = waiting;
                    for _ in due {
                        forgetting.release();
                        keeping.release();
                    }
                }
            }
        }
    }
}
