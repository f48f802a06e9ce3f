//! Counting S0 pulses from line edges: debounce, then count. No I/O, so that tests feed it
//! edges with timestamps; [`super::gpio`] feeds it the kernel's edge events.
//!
//! Debouncing is by **stable level**: the line's debounced level changes only once the raw
//! level has stayed the same for the debounce period, and a pulse is counted when the
//! debounced level becomes active. Contact bounce (edges a few milliseconds apart) therefore
//! counts once, and a spike shorter than the period not at all. (The seed polled the pin with
//! no debounce and could count a bounce twice or miss a pulse; seed weakness 18.)
//!
//! The level is settled when the next edge arrives, so a pulse is counted at its end (the
//! release edge, 30 to 120 ms after it began for an S0 output), never later. Edges carry the
//! kernel's timestamps, so the count does not depend on how fast the agent reads them.

use std::time::Duration;

/// Debounces edges into a pulse count.
#[derive(Debug, Clone)]
pub struct PulseCounter {
    debounce_ns: u64,
    /// The line as last seen, and since when (ns, the edge clock).
    raw_active: bool,
    raw_since_ns: u64,
    /// The debounced level.
    stable_active: bool,
    count: u64,
}

impl PulseCounter {
    /// A counter starting at `count`, with the line now at `active`.
    pub fn new(debounce: Duration, active: bool, count: u64) -> PulseCounter {
        PulseCounter {
            debounce_ns: u64::try_from(debounce.as_nanos()).unwrap_or(u64::MAX),
            raw_active: active,
            raw_since_ns: 0,
            stable_active: active,
            count,
        }
    }

    /// An edge: the line became `active` (or inactive) at `t_ns`.
    pub fn edge(&mut self, active: bool, t_ns: u64) {
        self.settle(t_ns);
        // Two edges the same way in a row mean a bounce too quick to see: the level restarted.
        self.raw_active = active;
        self.raw_since_ns = t_ns;
    }

    /// The line is at `active` now, as read when it was (re)opened: no pulse is counted for it.
    pub fn set_level(&mut self, active: bool, t_ns: u64) {
        self.raw_active = active;
        self.raw_since_ns = t_ns;
        self.stable_active = active;
    }

    /// The pulses counted so far (including the starting count).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Lets the raw level become the debounced level if it has been stable long enough.
    fn settle(&mut self, now_ns: u64) {
        let held = now_ns.saturating_sub(self.raw_since_ns);
        if self.raw_active != self.stable_active && held >= self.debounce_ns {
            self.stable_active = self.raw_active;
            if self.stable_active {
                self.count = self.count.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn counter() -> PulseCounter {
        PulseCounter::new(Duration::from_millis(20), false, 0)
    }

    /// A clean pulse of `width_ms` starting at `at_ms`.
    fn pulse(c: &mut PulseCounter, at_ms: u64, width_ms: u64) {
        c.edge(true, at_ms * MS);
        c.edge(false, (at_ms + width_ms) * MS);
    }

    #[test]
    fn clean_pulses_count_once_each_at_their_end() {
        let mut c = counter();
        c.edge(true, 1_000 * MS);
        assert_eq!(
            c.count(),
            0,
            "not before the pulse has lasted the debounce period"
        );
        c.edge(false, 1_050 * MS);
        assert_eq!(c.count(), 1);
        pulse(&mut c, 2_000, 50);
        pulse(&mut c, 3_000, 30);
        assert_eq!(c.count(), 3);
    }

    #[test]
    fn bounces_within_the_debounce_window_count_once() {
        let mut c = counter();
        // Closing bounces: active, inactive, active within 4 ms, then held for 50 ms.
        c.edge(true, 1_000 * MS);
        c.edge(false, 1_001 * MS);
        c.edge(true, 1_003 * MS);
        // Release bounces.
        c.edge(false, 1_053 * MS);
        c.edge(true, 1_054 * MS);
        c.edge(false, 1_056 * MS);
        // The next pulse a second later.
        pulse(&mut c, 2_000, 40);
        assert_eq!(c.count(), 2);
    }

    #[test]
    fn spikes_shorter_than_the_debounce_period_do_not_count() {
        let mut c = counter();
        pulse(&mut c, 1_000, 5);
        pulse(&mut c, 1_100, 19);
        assert_eq!(c.count(), 0);
        pulse(&mut c, 1_200, 20);
        assert_eq!(c.count(), 1);
    }

    #[test]
    fn a_line_active_at_start_is_not_a_pulse_and_counts_continue() {
        let mut c = PulseCounter::new(Duration::from_millis(20), true, 41);
        c.edge(false, 10 * MS);
        assert_eq!(c.count(), 41);
        pulse(&mut c, 1_000, 50);
        assert_eq!(c.count(), 42);
        // Reopened while the line was active: that pulse is not counted twice.
        c.set_level(true, 2_000 * MS);
        c.edge(false, 2_040 * MS);
        assert_eq!(c.count(), 42);
    }
}
