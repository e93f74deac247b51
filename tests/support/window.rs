//! The stub's model of Zoho's quota, as pure functions over timestamps.
//!
//! This is the test oracle's arithmetic: it is deliberately written independently of the proxy's
//! limiter (sharing code would let one bug hide in both), and it takes time as an argument so its
//! edge cases are tested exactly, without sleeping.
//!
//! Window convention, used everywhere in this module: a window of length `w` is half-open, so two
//! calls exactly `w` apart never share one. For the arrival at `t` that means the calls in
//! `(t - w, t]`; for a scan over a record it means every `[s, s + w)`. The two agree.

use std::collections::VecDeque;
use std::ops::Sub;
use std::time::Duration;

use tokio::time::Instant;

/// The largest number of timestamps that fall in any one half-open window of length `window`.
///
/// Accepts timestamps in any order (it sorts a copy) and any type whose difference is a
/// `Duration` (`Instant`, or `Duration` offsets in hand-built tests). A zero-length window holds
/// nothing. Proving "at most `limit` per `per`" over a recorded run is `<= limit` on this.
pub fn max_in_any_window<T>(times: &[T], window: Duration) -> usize
where
    T: Copy + Ord + Sub<T, Output = Duration>,
{
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    // Two pointers: `start` is the oldest timestamp still within `window` of `sorted[end]`. It only
    // moves forward, so the scan is linear after the sort.
    let mut start = 0;
    let mut best = 0;
    for end in 0..sorted.len() {
        while start <= end && sorted[end] - sorted[start] >= window {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

/// What the stub (as Zoho) does with one arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the threshold: served normally.
    Allowed,
    /// This arrival pushed the window over the threshold: the user is now locked out.
    Violation,
    /// The user was already locked out when this arrived.
    Locked,
}

/// One (route, user)'s history as Zoho would keep it.
#[derive(Debug, Default)]
pub struct Quota {
    /// Arrivals younger than `per`, oldest first. Every arrival counts, including refused ones:
    /// Zoho publishes no exemption for them, and counting them is the strict reading, which is
    /// the right one for an oracle whose job is to catch over-sending.
    recent: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

impl Quota {
    /// Judges an arrival at `now` against `limit` calls per sliding `per`, locking for `lock` on a
    /// violation. Arrivals must be fed in time order (the stub does so under one lock).
    pub fn arrive(&mut self, now: Instant, limit: u32, per: Duration, lock: Duration) -> Verdict {
        self.recent.push_back(now);
        while let Some(&oldest) = self.recent.front() {
            // Half-open window (now - per, now]: a call exactly `per` old no longer counts.
            if now.saturating_duration_since(oldest) >= per {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.locked_until.is_some_and(|until| now < until) {
            // A lock is not extended by calls made during it: Zoho documents a fixed lock period.
            return Verdict::Locked;
        }
        if self.recent.len() > limit as usize {
            self.locked_until = Some(now + lock);
            return Verdict::Violation;
        }
        Verdict::Allowed
    }

    /// When the current lock ends, if the user is locked at `now`.
    pub fn locked_until(&self, now: Instant) -> Option<Instant> {
        self.locked_until.filter(|&until| now < until)
    }
}

/// Whether a request path matches a route template: same number of segments, literal segments
/// equal, and each `{name}` segment non-empty. Compared on the raw path, so `%20` in an id is just
/// part of a non-empty segment, as it is for Zoho.
pub fn template_matches(template: &str, path: &str) -> bool {
    let mut want = template.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some(w), Some(h)) => {
                let placeholder = w.starts_with('{') && w.ends_with('}');
                let ok = if placeholder { !h.is_empty() } else { w == h };
                if !ok {
                    return false;
                }
            }
            _ => return false,
        }
    }
}
