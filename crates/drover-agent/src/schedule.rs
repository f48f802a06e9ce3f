//! Timing arithmetic: check-in intervals, jitter, error backoff, and the retry policy for a
//! failing release. Pure functions, so the rules that keep a fleet from hammering its hub can be
//! tested without clocks.
//!
//! The seed updater polled every 5 s with no jitter and no backoff, took a NaN interval from the
//! hub as "now", and retried a failing update on every poll. Here every wait is clamped, every
//! wait is jittered, and failures back off exponentially.

use std::time::Duration;

use crate::config::{HARD_MIN_INTERVAL, PollConfig, RetryConfig};

/// The first wait after a failed check-in; it doubles per consecutive failure.
pub const ERROR_BACKOFF_START: Duration = Duration::from_secs(1);

/// The check-in interval: the hub's value (or the configured default until the hub named one),
/// clamped into `[min_interval, max_interval]`.
pub fn poll_interval(hub_seconds: Option<u64>, poll: &PollConfig) -> Duration {
    let wanted = hub_seconds.map_or(poll.default_interval, Duration::from_secs);
    wanted.clamp(poll.min_interval.max(HARD_MIN_INTERVAL), poll.max_interval)
}

/// The wait after `consecutive` failed check-ins (1, 2, ...): 1 s doubling, capped.
pub fn error_backoff(consecutive: u32, poll: &PollConfig) -> Duration {
    doubling(ERROR_BACKOFF_START, consecutive, poll.error_backoff_max)
}

/// The wait before the next attempt at a release that failed `failures` times:
/// `base * 2^(failures-1)`, capped at `max_backoff`.
pub fn retry_delay(failures: u32, retry: &RetryConfig) -> Duration {
    doubling(retry.base, failures, retry.max_backoff)
}

/// Whether a release that failed `failures` times is held until an operator acts.
pub fn is_held(failures: u32, retry: &RetryConfig) -> bool {
    failures >= retry.max_failures
}

/// `wait` scaled by a random factor in [0.9, 1.1], but never below `floor`: spreads a fleet's
/// requests out after a hub restart without letting jitter undercut the configured minimum.
pub fn jittered(wait: Duration, floor: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    drover_protocol::ids::fill_random(&mut bytes);
    let unit = f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX);
    jitter_with(wait, unit).max(floor)
}

/// `wait * (0.9 + 0.2 * unit)` for `unit` in [0, 1].
fn jitter_with(wait: Duration, unit: f64) -> Duration {
    wait.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

fn doubling(start: Duration, n: u32, cap: Duration) -> Duration {
    let exponent = n.saturating_sub(1);
    if exponent >= 32 {
        return cap;
    }
    start
        .checked_mul(1u32 << exponent)
        .map_or(cap, |d| d.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll() -> PollConfig {
        PollConfig {
            min_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(3600),
            default_interval: Duration::from_secs(60),
            error_backoff_max: Duration::from_secs(300),
        }
    }

    #[test]
    fn a_hub_interval_of_zero_still_waits_at_least_min_interval() {
        let p = poll();
        assert_eq!(poll_interval(Some(0), &p), Duration::from_secs(5));
        for _ in 0..1000 {
            let wait = jittered(poll_interval(Some(0), &p), p.min_interval);
            assert!(wait >= Duration::from_secs(5), "{wait:?}");
            assert!(wait <= Duration::from_millis(5500), "{wait:?}");
        }
    }

    #[test]
    fn hub_intervals_are_clamped_and_default_until_named() {
        let p = poll();
        assert_eq!(poll_interval(None, &p), Duration::from_secs(60));
        assert_eq!(poll_interval(Some(30), &p), Duration::from_secs(30));
        assert_eq!(poll_interval(Some(u64::MAX), &p), Duration::from_secs(3600));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let d = Duration::from_secs(100);
        assert_eq!(jitter_with(d, 0.0), Duration::from_secs(90));
        assert_eq!(jitter_with(d, 1.0), Duration::from_secs(110));
        assert_eq!(jitter_with(d, 0.5), Duration::from_secs(100));
        for _ in 0..1000 {
            let j = jittered(d, Duration::ZERO);
            assert!((Duration::from_secs(90)..=Duration::from_secs(110)).contains(&j));
        }
    }

    #[test]
    fn error_backoff_doubles_from_one_second_to_the_cap() {
        let p = poll();
        let waits: Vec<u64> = (1..=11).map(|n| error_backoff(n, &p).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(error_backoff(u32::MAX, &p), Duration::from_secs(300));
        assert_eq!(error_backoff(0, &p), Duration::from_secs(1));
    }

    #[test]
    fn retry_delays_double_and_hold_after_max_failures() {
        let r = RetryConfig {
            base: Duration::from_secs(60),
            max_backoff: Duration::from_secs(6 * 3600),
            max_failures: 3,
        };
        assert_eq!(retry_delay(1, &r), Duration::from_secs(60));
        assert_eq!(retry_delay(2, &r), Duration::from_secs(120));
        assert_eq!(retry_delay(3, &r), Duration::from_secs(240));
        assert_eq!(retry_delay(20, &r), Duration::from_secs(6 * 3600));
        assert_eq!(retry_delay(64, &r), Duration::from_secs(6 * 3600));
        assert!(!is_held(2, &r));
        assert!(is_held(3, &r));
        assert!(is_held(4, &r));
    }
}
