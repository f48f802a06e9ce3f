//! Energy from cumulative registers: the arithmetic behind energy reports, as pure functions.
//!
//! A meter's energy register only ever counts up, so the energy in a period is the sum of the
//! register's increases between readings — with three exceptions that must be recognised
//! rather than counted as huge negative (or positive) energy:
//!
//! - **rollover**: the register wrapped past its maximum (a 32-bit register at 4 294 967 295 Wh,
//!   say) and starts again near zero; the energy is what it counted up to the maximum plus what
//!   it counted since;
//! - **reset**: the register went back to (near) zero without being near a maximum — the meter
//!   was reset or its battery-backed memory lost; the energy since is the new value itself;
//! - **backwards**: a small step back (a gateway glitch, a rounding artefact); counted as zero.
//!
//! Meter replacement is a different meter ID (its own serial) and so its own series: a site's
//! energy is the sum over its series, and a replacement needs no special arithmetic here.
//!
//! A step between two readings that straddles a period boundary is shared out in proportion to
//! time, so that consecutive months add up exactly to the register's total increase. Gaps (no
//! reading for much longer than the usual interval) are listed; the register keeps counting
//! through a gap, so no energy is lost — only its timing inside the gap is unknown.

use serde::{Deserialize, Serialize};

/// One reading of a cumulative register: time (Unix ms) and value (in the register's scaled
/// unit, Wh × 10^scale).
pub type Point = (i64, i64);

/// How a backward step was explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anomaly {
    /// The register wrapped past its maximum.
    Rollover,
    /// The register restarted from (near) zero.
    Reset,
    /// A small step back, counted as zero.
    Backwards,
}

/// A flagged step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// The anomaly.
    pub kind: Anomaly,
    /// Time of the reading before the step.
    pub from_ts: i64,
    /// Time of the reading after it.
    pub to_ts: i64,
    /// Value before.
    pub from_value: i64,
    /// Value after.
    pub to_value: i64,
    /// The energy counted for the step.
    pub counted: i64,
}

/// A stretch without readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// Start (Unix ms): the last reading before it, or the period start.
    pub from_ts: i64,
    /// End: the first reading after it, or the period end.
    pub to_ts: i64,
}

/// The energy of one register over one period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisterEnergy {
    /// Energy in the period (scaled unit, rounded to the nearest unit).
    pub energy: i64,
    /// Share of the period covered by readings, 0.0 ..= 100.0.
    pub completeness_pct: f64,
    /// Every gap in the period.
    pub gaps: Vec<Gap>,
    /// Every flagged step that touches the period.
    pub flags: Vec<Flag>,
    /// Readings inside the period.
    pub readings: usize,
}

/// The register sizes (in raw counts) rollovers are recognised at.
const REGISTER_MAXIMA: [i64; 3] = [(1 << 32) - 1, (1 << 48) - 1, i64::MAX];

/// A step back counts as a reset when the new value is at most this share of the old one.
const RESET_RATIO: f64 = 0.1;

/// The increase a step from `a` to `b` stands for, and its anomaly if it went backwards.
///
/// ```
/// use drover_hub::telemetry::energy::{step_energy, Anomaly};
/// assert_eq!(step_energy(100, 130), (30, None));
/// assert_eq!(step_energy(4_294_967_290, 4), (10, Some(Anomaly::Rollover)));
/// assert_eq!(step_energy(120_000, 15), (15, Some(Anomaly::Reset)));
/// assert_eq!(step_energy(120_000, 119_999), (0, Some(Anomaly::Backwards)));
/// ```
pub fn step_energy(a: i64, b: i64) -> (i64, Option<Anomaly>) {
    if b >= a {
        return (b - a, None);
    }
    // A wrap: the old value sits close under a register maximum and the new one is small.
    for max in REGISTER_MAXIMA {
        if a <= max && max - a < max / 100 && b < max / 100 {
            return (
                (max - a).saturating_add(b).saturating_add(1),
                Some(Anomaly::Rollover),
            );
        }
    }
    if (b as f64) <= (a as f64) * RESET_RATIO {
        return (b.max(0), Some(Anomaly::Reset));
    }
    (0, Some(Anomaly::Backwards))
}

/// The usual interval between readings: the median of the positive steps in time.
pub fn typical_interval(points: &[Point]) -> Option<i64> {
    let mut steps: Vec<i64> = points
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .filter(|d| *d > 0)
        .collect();
    if steps.is_empty() {
        return None;
    }
    steps.sort_unstable();
    Some(steps[steps.len() / 2])
}

/// Energy of a register over `[start, end)`.
///
/// `points` must be sorted by time and should include the last reading before `start` and the
/// first after `end` when they exist, so that steps straddling the boundaries are shared out.
/// Time between two readings at most `gap_after` ms apart counts as covered; everything else in
/// the period (longer silences, and the edges before the first and after the last reading) is
/// listed as a gap.
pub fn register_energy(points: &[Point], start: i64, end: i64, gap_after: i64) -> RegisterEnergy {
    let mut energy = 0f64;
    let mut flags = Vec::new();
    // Time inside the period that lies between two readings no further apart than gap_after.
    let mut covered: Vec<(i64, i64)> = Vec::new();
    for w in points.windows(2) {
        let ((t0, v0), (t1, v1)) = (w[0], w[1]);
        if t1 <= start || t0 >= end || t1 <= t0 {
            continue;
        }
        let (step, anomaly) = step_energy(v0, v1);
        let (from, to) = (t0.max(start), t1.min(end));
        // The share of the step's time span that lies inside the period.
        energy += step as f64 * (to - from) as f64 / (t1 - t0) as f64;
        if let Some(kind) = anomaly {
            flags.push(Flag {
                kind,
                from_ts: t0,
                to_ts: t1,
                from_value: v0,
                to_value: v1,
                counted: step,
            });
        }
        if t1 - t0 <= gap_after {
            match covered.last_mut() {
                Some(last) if last.1 >= from => last.1 = last.1.max(to),
                _ => covered.push((from, to)),
            }
        }
    }
    // The gaps are what the covered stretches leave of the period.
    let mut gaps = Vec::new();
    let mut cursor = start;
    for (from, to) in &covered {
        if *from > cursor {
            gaps.push(Gap {
                from_ts: cursor,
                to_ts: *from,
            });
        }
        cursor = cursor.max(*to);
    }
    if cursor < end {
        gaps.push(Gap {
            from_ts: cursor,
            to_ts: end,
        });
    }
    let missing: i64 = gaps.iter().map(|g| g.to_ts - g.from_ts).sum();
    let length = (end - start).max(1);
    RegisterEnergy {
        energy: energy.round() as i64,
        completeness_pct: (100.0 * (1.0 - missing as f64 / length as f64)).clamp(0.0, 100.0),
        gaps,
        flags,
        readings: points
            .iter()
            .filter(|(t, _)| *t >= start && *t < end)
            .count(),
    }
}

/// Energy of interval readings (each the energy counted in the `interval_ms` before its time,
/// as the seed's pulse meters sent them) over `[start, end)`: intervals straddling an edge are
/// shared out in proportion to time; time not covered by any interval is a gap.
pub fn interval_energy(points: &[Point], start: i64, end: i64, interval_ms: i64) -> RegisterEnergy {
    let interval_ms = interval_ms.max(1);
    let mut energy = 0f64;
    let mut covered: Vec<(i64, i64)> = Vec::new();
    for &(ts, value) in points {
        let (from, to) = (ts - interval_ms, ts);
        if to <= start || from >= end {
            continue;
        }
        let (a, b) = (from.max(start), to.min(end));
        energy += value as f64 * (b - a) as f64 / interval_ms as f64;
        match covered.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => covered.push((a, b)),
        }
    }
    let mut gaps = Vec::new();
    let mut cursor = start;
    for (a, b) in &covered {
        if *a > cursor {
            gaps.push(Gap {
                from_ts: cursor,
                to_ts: *a,
            });
        }
        cursor = cursor.max(*b);
    }
    if cursor < end {
        gaps.push(Gap {
            from_ts: cursor,
            to_ts: end,
        });
    }
    let missing: i64 = gaps.iter().map(|g| g.to_ts - g.from_ts).sum();
    RegisterEnergy {
        energy: energy.round() as i64,
        completeness_pct: (100.0 * (1.0 - missing as f64 / (end - start).max(1) as f64))
            .clamp(0.0, 100.0),
        gaps,
        flags: Vec::new(),
        readings: points
            .iter()
            .filter(|(t, _)| *t > start && *t <= end)
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(start: i64, step_ms: i64, values: &[i64]) -> Vec<Point> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (start + i as i64 * step_ms, *v))
            .collect()
    }

    #[test]
    fn a_steady_register_gives_its_increase_and_full_coverage() {
        let points = series(
            0,
            2_000,
            &(0..=30).map(|i| 1_000 + i * 2).collect::<Vec<_>>(),
        );
        let e = register_energy(&points, 0, 60_000, 10_000);
        assert_eq!(e.energy, 60);
        assert_eq!(e.readings, 30);
        assert!(e.gaps.is_empty(), "{:?}", e.gaps);
        assert!((e.completeness_pct - 100.0).abs() < 1e-9);
        assert!(e.flags.is_empty());
    }

    #[test]
    fn consecutive_periods_add_up_to_the_total_increase() {
        // Readings every 7 s, periods of 10 s: every step straddles a boundary somewhere.
        let points = series(0, 7_000, &[0, 7, 20, 20, 33, 50, 51, 70, 91, 100]);
        let total: i64 = (0..6)
            .map(|k| register_energy(&points, k * 10_000, (k + 1) * 10_000, 30_000).energy)
            .sum();
        let whole = register_energy(&points, 0, 60_000, 30_000).energy;
        assert!((total - whole).abs() <= 3, "{total} vs {whole}");
        assert_eq!(register_energy(&points, 0, 63_000, 30_000).energy, 100);
    }

    #[test]
    fn a_reset_is_flagged_and_counted_from_zero() {
        let points = series(0, 2_000, &[50_000, 50_010, 3, 8]);
        let e = register_energy(&points, 0, 8_000, 10_000);
        assert_eq!(e.energy, 10 + 3 + 5);
        assert_eq!(e.flags.len(), 1);
        assert_eq!(e.flags[0].kind, Anomaly::Reset);
        assert_eq!(e.flags[0].counted, 3);
    }

    #[test]
    fn a_rollover_counts_across_the_wrap() {
        let max = (1i64 << 32) - 1;
        let points = series(0, 2_000, &[max - 5, max, 4]);
        let e = register_energy(&points, 0, 6_000, 10_000);
        assert_eq!(e.energy, 5 + 5);
        assert_eq!(e.flags[0].kind, Anomaly::Rollover);
    }

    #[test]
    fn gaps_are_listed_and_lower_completeness_but_not_energy() {
        // Readings at 0..10 s, then nothing until 50 s: the register counted on meanwhile.
        let mut points = series(0, 2_000, &[0, 1, 2, 3, 4, 5]);
        points.extend(series(50_000, 2_000, &[45, 46, 47, 48, 49]));
        let e = register_energy(&points, 0, 60_000, 6_000);
        assert_eq!(e.energy, 49, "the register's increase, gap included");
        assert_eq!(
            e.gaps,
            vec![
                Gap {
                    from_ts: 10_000,
                    to_ts: 50_000
                },
                Gap {
                    from_ts: 58_000,
                    to_ts: 60_000
                }
            ]
        );
        assert!((e.completeness_pct - 100.0 * (1.0 - 42.0 / 60.0)).abs() < 1e-9);
    }

    #[test]
    fn an_empty_period_is_one_gap() {
        let points = series(0, 2_000, &[0, 1]);
        let e = register_energy(&points, 100_000, 200_000, 6_000);
        assert_eq!(e.energy, 0);
        assert_eq!(
            e.gaps,
            vec![Gap {
                from_ts: 100_000,
                to_ts: 200_000
            }]
        );
        assert_eq!(e.completeness_pct, 0.0);
    }

    #[test]
    fn interval_energy_sums_events_and_shares_the_edges() {
        // 10-second events of 5 Wh from 10 s to 60 s; the period starts mid-event.
        let points: Vec<Point> = (1..=6).map(|i| (i * 10_000, 5)).collect();
        let e = interval_energy(&points, 5_000, 60_000, 10_000);
        assert_eq!(
            e.energy, 28,
            "half of the first event, then five whole ones (27.5 rounds up)"
        );
        assert!(e.gaps.is_empty(), "{:?}", e.gaps);
        let e = interval_energy(&points, 0, 100_000, 10_000);
        assert_eq!(e.energy, 30);
        assert_eq!(
            e.gaps,
            vec![Gap {
                from_ts: 60_000,
                to_ts: 100_000
            }]
        );
    }

    #[test]
    fn the_typical_interval_is_the_median_step() {
        let points = series(0, 2_000, &[0; 10]);
        assert_eq!(typical_interval(&points), Some(2_000));
        assert_eq!(typical_interval(&points[..1]), None);
    }
}
