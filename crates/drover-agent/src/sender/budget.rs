//! The monthly data budget: how wide the batch interval must be for the rest of the month to
//! fit in what is left of it.
//!
//! A batch costs a fixed overhead (HTTP headers, TLS records, TCP/IP packets both ways:
//! [`REQUEST_OVERHEAD_BYTES`]) plus its body, which grows with the readings it carries. Sending
//! every `T` seconds from a meter producing `r` readings a second at `p` body bytes a reading
//! costs `overhead / T + p * r` bytes a second; the widest interval needed is the `T` at which
//! that, over the seconds left in the month, equals the bytes left. The readings themselves
//! cannot be made cheaper, so when even that does not fit, the interval goes to its maximum
//! (and the budget is exceeded, visibly: the hub shows the bytes used).

use std::time::Duration;

use time::{Date, Month, OffsetDateTime};

use crate::config::TelemetryConfig;

/// The bytes a batch costs besides its body, both ways, on a kept-alive HTTP/2 connection over
/// TLS: measured by `drover-bench wire` (BENCHMARKS.md section 4) as 398 bytes up and 147 down
/// for a 106-byte body (HTTP/2 head, two TLS records, TCP/IP headers, the answer and the ACKs).
/// An estimate for other links: a new connection costs about 2 KB more.
pub const REQUEST_OVERHEAD_BYTES: u64 = 440;

/// The calendar month (UTC) of a Unix time in ms, as `year * 12 + month - 1`.
pub fn month_of(now_ms: i64) -> i64 {
    let t = at(now_ms);
    i64::from(t.year()) * 12 + i64::from(u8::from(t.month())) - 1
}

/// Seconds from `now_ms` to the start of the next calendar month (UTC); at least 1.
pub fn seconds_left_in_month(now_ms: i64) -> f64 {
    let t = at(now_ms);
    let (year, month) = match t.month() {
        Month::December => (t.year() + 1, Month::January),
        m => (t.year(), m.next()),
    };
    let next = Date::from_calendar_date(year, month, 1)
        .map(|d| d.midnight().assume_utc().unix_timestamp())
        .unwrap_or(t.unix_timestamp() + 31 * 86_400);
    ((next * 1000 - now_ms) as f64 / 1000.0).max(1.0)
}

fn at(now_ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// How the device's telemetry has been costing: measured as it sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// Readings the meters produce per second.
    pub readings_per_s: f64,
    /// Body bytes per reading in the batches sent.
    pub bytes_per_reading: f64,
}

impl Default for Usage {
    /// Until measured: one 3-channel meter every 2 s, at the codec's cost for 1-minute batches.
    fn default() -> Usage {
        Usage {
            readings_per_s: 1.5,
            bytes_per_reading: 1.5,
        }
    }
}

impl Usage {
    /// Folds a new measurement in (an exponentially weighted mean, new weight 1/4).
    pub fn observe(&mut self, readings_per_s: Option<f64>, bytes_per_reading: Option<f64>) {
        let blend = |old: &mut f64, new: Option<f64>| {
            if let Some(new) = new.filter(|v| v.is_finite() && *v >= 0.0) {
                *old = 0.75 * *old + 0.25 * new;
            }
        };
        blend(&mut self.readings_per_s, readings_per_s);
        blend(&mut self.bytes_per_reading, bytes_per_reading);
    }
}

/// The batch interval to use: the configured one, widened when the budget requires it, never
/// past `max_batch_interval`.
pub fn interval(config: &TelemetryConfig, used: u64, now_ms: i64, usage: Usage) -> Duration {
    let Some(budget) = config.monthly_budget_bytes else {
        return config.batch_interval;
    };
    let left = budget.saturating_sub(used) as f64;
    let per_s_left = left / seconds_left_in_month(now_ms);
    let for_overhead = per_s_left - usage.readings_per_s * usage.bytes_per_reading;
    if for_overhead <= 0.0 {
        return config.max_batch_interval;
    }
    let needed = Duration::from_secs_f64((REQUEST_OVERHEAD_BYTES as f64 / for_overhead).min(1e9));
    needed.clamp(config.batch_interval, config.max_batch_interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-16T00:00:00Z: 15 days before December.
    const MID_NOVEMBER_MS: i64 = 1_794_787_200_000;

    #[test]
    fn months_are_calendar_months_in_utc() {
        assert_eq!(month_of(MID_NOVEMBER_MS), 2026 * 12 + 10);
        assert_eq!(month_of(MID_NOVEMBER_MS + 15 * 86_400_000), 2026 * 12 + 11);
        assert_eq!(seconds_left_in_month(MID_NOVEMBER_MS), 15.0 * 86_400.0);
        // December rolls over into the next year.
        let mid_december = MID_NOVEMBER_MS + 30 * 86_400_000;
        assert_eq!(seconds_left_in_month(mid_december), 16.0 * 86_400.0);
    }

    #[test]
    fn no_budget_keeps_the_configured_interval() {
        let config = TelemetryConfig::default();
        let usage = Usage::default();
        assert_eq!(
            interval(&config, u64::MAX, MID_NOVEMBER_MS, usage),
            config.batch_interval
        );
    }

    #[test]
    fn a_tight_budget_widens_the_interval_and_an_ample_one_does_not() {
        let usage = Usage {
            readings_per_s: 1.5,
            bytes_per_reading: 1.2,
        };
        let seconds = seconds_left_in_month(MID_NOVEMBER_MS);
        // Readings alone cost 1.8 B/s; at 1-minute batches the overhead adds O/60 B/s.
        let overhead = REQUEST_OVERHEAD_BYTES as f64;
        let at_one_minute = ((1.8 + overhead / 60.0) * seconds) as u64;
        let mut config = TelemetryConfig {
            monthly_budget_bytes: Some(at_one_minute * 2),
            ..TelemetryConfig::default()
        };
        let ample = interval(&config, 0, MID_NOVEMBER_MS, usage);
        assert_eq!(ample, Duration::from_secs(60));

        // Half of that, with half of it used: room for 1.8 + O/T B/s with T about 160 s.
        config.monthly_budget_bytes = Some(at_one_minute);
        let used = at_one_minute / 2;
        let widened = interval(&config, used, MID_NOVEMBER_MS, usage);
        let expected = overhead / ((at_one_minute - used) as f64 / seconds - 1.8);
        assert!(
            (widened.as_secs_f64() - expected).abs() < 1.0,
            "{widened:?} vs {expected}"
        );
        assert!(widened > Duration::from_secs(100), "{widened:?}");

        // Spent: as wide as allowed.
        let spent = interval(&config, at_one_minute, MID_NOVEMBER_MS, usage);
        assert_eq!(spent, config.max_batch_interval);
    }

    #[test]
    fn measurements_move_the_estimate_gradually_and_nonsense_is_ignored() {
        let mut usage = Usage::default();
        usage.observe(Some(3.5), None);
        assert_eq!(usage.readings_per_s, 2.0);
        usage.observe(Some(f64::NAN), Some(-1.0));
        assert_eq!(usage.readings_per_s, 2.0);
        assert_eq!(usage.bytes_per_reading, 1.5);
    }
}
