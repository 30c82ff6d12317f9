//! Sliding-window counter arithmetic, compiled into both the XDP program and the agent.
//!
//! A key's rate over the last window length, at a time when a fraction `f` of the current
//! window has elapsed, is estimated as `previous * (1 - f) + current`. The XDP program uses
//! it with `CLOCK_MONOTONIC` nanoseconds while a key has no grant; the agent uses it with the
//! microseconds of Redis `TIME` to turn fleet-wide counts into a remaining budget.
//!
//! Everything here is integer arithmetic that saturates instead of overflowing, never divides
//! by zero, and avoids 128-bit operations, which the BPF instruction set lacks. Times and
//! window lengths may be in any unit as long as both use the same one.

use crate::SlidingWindow;

/// Fraction bits of the fixed-point weight of the previous window: 2^-20 of a window is
/// below one microsecond for a 1 s window.
pub const WEIGHT_SHIFT: u32 = 20;

/// Counts above this are treated as equal to it when weighted. 2^40 packets in one window is
/// far beyond any real rate, and the clamp keeps `count * weight` within 64 bits.
pub const COUNT_CLAMP: u64 = 1 << 40;

/// Window lengths up to this are weighted exactly; longer ones lose the low bits first.
const EXACT_WINDOW_MAX: u64 = 1 << (63 - WEIGHT_SHIFT);

/// Returns the index of the window `now` falls in, or 0 for a zero-length window.
#[inline(always)]
pub fn window_id(now: u64, window_len: u64) -> u64 {
    match now.checked_div(window_len) {
        Some(id) => id,
        None => 0,
    }
}

/// Returns how far `now` is into its window, or 0 for a zero-length window.
#[inline(always)]
pub fn elapsed_in_window(now: u64, window_len: u64) -> u64 {
    match now.checked_rem(window_len) {
        Some(elapsed) => elapsed,
        None => 0,
    }
}

/// Returns the weight of the previous window after `elapsed` of a `window_len` window, in
/// units of 2^-[`WEIGHT_SHIFT`]: `1 << WEIGHT_SHIFT` at the window's start, 0 at its end.
#[inline(always)]
pub fn previous_weight(elapsed: u64, window_len: u64) -> u64 {
    if window_len == 0 || elapsed >= window_len {
        return 0;
    }
    let time_left = window_len - elapsed;
    let full = 1u64 << WEIGHT_SHIFT;

    let weight = if window_len <= EXACT_WINDOW_MAX {
        (time_left << WEIGHT_SHIFT) / window_len
    } else {
        // `window_len >> WEIGHT_SHIFT` is at least 2^43 here, so it is never zero.
        time_left / (window_len >> WEIGHT_SHIFT)
    };
    if weight > full { full } else { weight }
}

/// Returns the part of `delta`, counted evenly over the `span` that ends `elapsed` into the
/// current window, that was counted before the window started: `delta * before / span`,
/// rounded down, where `before` is the part of the span before the window. The sync script
/// splits deltas with the same formula.
#[inline(always)]
pub fn part_before_window(delta: u64, span: u64, elapsed: u64) -> u64 {
    if span == 0 || elapsed >= span {
        return 0;
    }
    // Callers pass microseconds and spans of at most one window (1 h is below 2^32 us), so
    // with the delta clamped to 2^32 the product fits in 64 bits; it saturates otherwise.
    const DELTA_CLAMP: u64 = 1 << 32;
    let before = span - elapsed;
    let delta = if delta > DELTA_CLAMP { DELTA_CLAMP } else { delta };
    delta.saturating_mul(before) / span
}

/// Returns `limit - estimate`, or 0 when the estimate has reached the limit.
#[inline(always)]
pub fn remaining(limit: u64, estimate: u64) -> u64 {
    limit.saturating_sub(estimate)
}

impl SlidingWindow {
    /// Moves the counter forward to window `window_id`.
    ///
    /// One window ahead, the current count becomes the previous one. Further ahead, after an
    /// idle gap, both counts restart at zero. An older `window_id` (a clock that stepped
    /// back) leaves the counter as it is, so a skewed clock cannot erase counts.
    #[inline(always)]
    pub fn advance(&mut self, window_id: u64) {
        if window_id <= self.window_id {
            return;
        }
        self.previous = if window_id == self.window_id + 1 { self.current } else { 0 };
        self.current = 0;
        self.window_id = window_id;
    }

    /// Returns the estimated count over the last window length, `elapsed` into the current
    /// window: `previous * (1 - elapsed / window_len) + current`, rounded down.
    #[inline(always)]
    pub fn estimate(&self, elapsed: u64, window_len: u64) -> u64 {
        let previous = if self.previous > COUNT_CLAMP { COUNT_CLAMP } else { self.previous };
        let weighted_previous = (previous * previous_weight(elapsed, window_len)) >> WEIGHT_SHIFT;
        weighted_previous.saturating_add(self.current)
    }

    /// Returns the estimate at a later time `at`, assuming nothing more is counted before
    /// then: the previous window's weight keeps falling, and past the window's end the
    /// current count becomes the previous one.
    #[inline(always)]
    pub fn estimate_at(&self, at: u64, window_len: u64) -> u64 {
        let mut later = *self;
        later.advance(window_id(at, window_len));
        later.estimate(elapsed_in_window(at, window_len), window_len)
    }

    /// Counts one packet at time `now`, without a limit.
    #[inline(always)]
    pub fn count(&mut self, now: u64, window_len: u64) {
        self.count_cost(now, window_len, 1);
    }

    /// Counts `cost` units (packets, or bytes for a rule that counts bytes) at time `now`,
    /// without a limit.
    #[inline(always)]
    pub fn count_cost(&mut self, now: u64, window_len: u64, cost: u64) {
        self.advance(window_id(now, window_len));
        self.current = self.current.saturating_add(cost);
    }

    /// Returns whether `cost` more units at time `now` keep the estimate within `limit`,
    /// without counting them: `estimate + cost <= limit`. For a cost of 1 this is
    /// `estimate < limit`, the packet case. Moves the counter to `now`'s window.
    #[inline(always)]
    pub fn admits(&mut self, now: u64, window_len: u64, limit: u64, cost: u64) -> bool {
        self.advance(window_id(now, window_len));
        let estimate = self.estimate(elapsed_in_window(now, window_len), window_len);
        estimate.saturating_add(cost) <= limit
    }

    /// Counts one packet at time `now` if the estimate is below `limit`, and returns whether
    /// it was counted. This is the whole per-packet decision of the fallback path.
    #[inline(always)]
    pub fn try_admit(&mut self, now: u64, window_len: u64, limit: u64) -> bool {
        self.try_admit_cost(now, window_len, limit, 1)
    }

    /// Counts `cost` units at time `now` if they keep the estimate within `limit`, and
    /// returns whether they were counted. A cost of 0 is always admitted.
    #[inline(always)]
    pub fn try_admit_cost(&mut self, now: u64, window_len: u64, limit: u64, cost: u64) -> bool {
        if !self.admits(now, window_len, limit, cost) {
            return false;
        }
        self.count_cost(now, window_len, cost);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const FULL: u64 = 1 << WEIGHT_SHIFT;

    fn window(window_id: u64, current: u64, previous: u64) -> SlidingWindow {
        SlidingWindow { window_id, current, previous }
    }

    #[test]
    fn estimate_at_window_start_counts_all_previous() {
        assert_eq!(window(7, 0, 100).estimate(0, SECOND), 100);
    }

    #[test]
    fn estimate_at_window_end_drops_previous() {
        assert_eq!(window(7, 30, 100).estimate(SECOND - 1, SECOND), 30);
        assert_eq!(window(7, 30, 100).estimate(SECOND, SECOND), 30);
        assert_eq!(window(7, 30, 100).estimate(5 * SECOND, SECOND), 30);
    }

    #[test]
    fn estimate_mid_window_weights_previous() {
        assert_eq!(window(7, 10, 100).estimate(SECOND / 4, SECOND), 75 + 10);
        assert_eq!(window(7, 10, 100).estimate(SECOND / 2, SECOND), 50 + 10);
        // 1000 * 0.9 is 900 in exact arithmetic; the fixed-point weight rounds down by 1.
        assert_eq!(window(7, 0, 1000).estimate(SECOND / 10, SECOND), 899);
    }

    #[test]
    fn zero_length_window_never_divides() {
        assert_eq!(window_id(123, 0), 0);
        assert_eq!(elapsed_in_window(123, 0), 0);
        assert_eq!(previous_weight(0, 0), 0);
        assert_eq!(window(0, 5, 9).estimate(0, 0), 5);
    }

    #[test]
    fn previous_weight_bounds() {
        assert_eq!(previous_weight(0, SECOND), FULL);
        assert_eq!(previous_weight(SECOND / 2, SECOND), FULL / 2);
        assert_eq!(previous_weight(SECOND, SECOND), 0);
        assert_eq!(previous_weight(0, u64::MAX), FULL);
        assert_eq!(previous_weight(u64::MAX / 2, u64::MAX), FULL / 2);
    }

    #[test]
    fn advance_by_one_window_keeps_current_as_previous() {
        let mut counter = window(7, 40, 100);
        counter.advance(8);
        assert_eq!(counter, window(8, 0, 40));
    }

    #[test]
    fn advance_after_long_idle_clears_both() {
        let mut counter = window(7, 40, 100);
        counter.advance(9);
        assert_eq!(counter, window(9, 0, 0));
        let mut counter = window(7, 40, 100);
        counter.advance(u64::MAX);
        assert_eq!(counter, window(u64::MAX, 0, 0));
    }

    #[test]
    fn advance_to_older_window_changes_nothing() {
        let mut counter = window(7, 40, 100);
        counter.advance(6);
        assert_eq!(counter, window(7, 40, 100));
        counter.advance(7);
        assert_eq!(counter, window(7, 40, 100));
    }

    #[test]
    fn estimate_saturates_near_overflow() {
        assert_eq!(window(1, u64::MAX, u64::MAX).estimate(0, SECOND), u64::MAX);
        assert_eq!(window(1, 0, u64::MAX).estimate(0, SECOND), COUNT_CLAMP);
        assert_eq!(window(1, u64::MAX - 1, 1).estimate(0, SECOND), u64::MAX);
    }

    #[test]
    fn estimate_at_later_time_decays_previous() {
        let counter = window(7, 40, 100);
        // Now 7.25 s: 75 + 40. At 7.75 s: 25 + 40. At 8.5 s: the 40 weigh half. At 9.5 s: 0.
        assert_eq!(counter.estimate(SECOND / 4, SECOND), 115);
        assert_eq!(counter.estimate_at(7 * SECOND + 3 * SECOND / 4, SECOND), 65);
        assert_eq!(counter.estimate_at(8 * SECOND + SECOND / 2, SECOND), 20);
        assert_eq!(counter.estimate_at(9 * SECOND + SECOND / 2, SECOND), 0);
    }

    #[test]
    fn part_before_window_splits_in_proportion() {
        assert_eq!(part_before_window(100, 100_000, 25_000), 75);
        assert_eq!(part_before_window(100, 100_000, 100_000), 0);
        assert_eq!(part_before_window(100, 100_000, 0), 100);
        assert_eq!(part_before_window(7, 100_000, 50_000), 3);
        assert_eq!(part_before_window(100, 0, 0), 0);
    }

    #[test]
    fn remaining_saturates_at_zero() {
        assert_eq!(remaining(100, 30), 70);
        assert_eq!(remaining(100, 100), 0);
        assert_eq!(remaining(100, 1000), 0);
    }

    #[test]
    fn try_admit_stops_at_limit_within_window() {
        let mut counter = SlidingWindow::default();
        let start = 10 * SECOND;
        let admitted = (0..150).filter(|i| counter.try_admit(start + i * 1000, SECOND, 100)).count();
        assert_eq!(admitted, 100);
        assert_eq!(counter, window(10, 100, 0));
    }

    #[test]
    fn try_admit_rollover_weights_previous_count() {
        let mut counter = window(10, 100, 0);
        // A quarter into window 11, the previous 100 still weigh 75, leaving room for 25.
        let now = 11 * SECOND + SECOND / 4;
        let admitted = (0..100).filter(|_| counter.try_admit(now, SECOND, 100)).count();
        assert_eq!(admitted, 25);
        assert_eq!(counter, window(11, 25, 100));
    }

    #[test]
    fn try_admit_after_long_idle_starts_fresh() {
        let mut counter = window(10, 100, 100);
        let admitted = (0..120).filter(|_| counter.try_admit(500 * SECOND, SECOND, 100)).count();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn try_admit_with_zero_limit_admits_nothing() {
        let mut counter = SlidingWindow::default();
        assert!(!counter.try_admit(SECOND, SECOND, 0));
        assert_eq!(counter.current, 0);
    }

    #[test]
    fn try_admit_cost_stops_before_exceeding_limit() {
        // 1000 bytes per window, 300-byte frames: three fit, the fourth would make 1200.
        let mut counter = SlidingWindow::default();
        let start = 10 * SECOND;
        let admitted = (0..6).filter(|i| counter.try_admit_cost(start + i * 1000, SECOND, 1000, 300)).count();
        assert_eq!(admitted, 3);
        assert_eq!(counter, window(10, 900, 0));
        // A 100-byte frame still fits in what is left.
        assert!(counter.try_admit_cost(start + 10_000, SECOND, 1000, 100));
        assert_eq!(counter.current, 1000);
    }

    #[test]
    fn try_admit_cost_weights_previous_bytes() {
        // A quarter into window 11, the previous 1000 bytes weigh 750, leaving 250.
        let mut counter = window(10, 1000, 0);
        let now = 11 * SECOND + SECOND / 4;
        assert!(!counter.try_admit_cost(now, SECOND, 1000, 300));
        assert!(counter.try_admit_cost(now, SECOND, 1000, 250));
        assert_eq!(counter, window(11, 250, 1000));
    }

    #[test]
    fn try_admit_cost_larger_than_limit_never_admits() {
        let mut counter = SlidingWindow::default();
        assert!(!counter.try_admit_cost(SECOND, SECOND, 1000, 1001));
        assert_eq!(counter.current, 0);
    }

    #[test]
    fn try_admit_matches_cost_one() {
        let mut by_packet = window(10, 60, 80);
        let mut by_cost = by_packet;
        for i in 0..200u64 {
            let now = 11 * SECOND + i * (SECOND / 150);
            assert_eq!(by_packet.try_admit(now, SECOND, 100), by_cost.try_admit_cost(now, SECOND, 100, 1), "packet {i}");
        }
        assert_eq!(by_packet, by_cost);
    }

    #[test]
    fn steady_overload_passes_limit_per_window() {
        // 300 packets per second, evenly spaced, against 100 per second: every window after
        // the first passes between 99 and 100 packets.
        let mut counter = SlidingWindow::default();
        let mut passed_per_window = [0u64; 6];
        for i in 0..1800u64 {
            let now = i * (SECOND / 300);
            if counter.try_admit(now, SECOND, 100) {
                passed_per_window[(now / SECOND) as usize] += 1;
            }
        }
        for (index, passed) in passed_per_window.iter().enumerate() {
            assert!((99..=100).contains(passed), "window {index} passed {passed}");
        }
    }
}
