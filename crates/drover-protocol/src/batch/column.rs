//! One column of integers (a timestamp column, or one series' values): a predictor turns the
//! values into small residuals, and a coder writes the residuals in few bits. The encoder tries
//! every predictor with every coder and keeps the shortest, so each column gets what suits it:
//! delta + Rice for a power random walk, no predictor + Rice around the median for a noisy
//! voltage, delta + bit-packing for an energy register, a linear grid for poll timestamps.
//!
//! All arithmetic wraps (two's complement), so any `i64` values, extremes included, round-trip
//! exactly.

use super::BatchError;
use super::bits::{BitReader, BitWriter, Effort, cost, unzigzag, zigzag};

/// How values are predicted; the wire code is the discriminant (2 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Predictor {
    /// Residual = value.
    None = 0,
    /// Residual = value − previous value; the first value is sent as it is.
    Delta = 1,
    /// Residual = delta − previous delta; the first value and first delta are sent.
    DeltaOfDelta = 2,
    /// Residual = value − (first + i × slope); the first value and the slope are sent.
    Linear = 3,
}

const PREDICTORS: [Predictor; 4] = [
    Predictor::None,
    Predictor::Delta,
    Predictor::DeltaOfDelta,
    Predictor::Linear,
];

/// How residuals are written; the wire code is the discriminant (2 bits, 3 is reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coder {
    /// `sv` minimum, 7-bit width `w` (0..=64), then each residual − minimum in `w` bits.
    Packed = 0,
    /// `sv` centre, 6-bit `k`, then each zigzag(residual − centre) as a Rice code.
    RiceSigned = 1,
    /// `sv` minimum, 6-bit `k`, then each residual − minimum as a Rice code.
    RiceUnsigned = 2,
}

/// The chosen encoding of one column.
struct Plan {
    predictor: Predictor,
    leading: Vec<i64>,
    residuals: Vec<i64>,
    coder: Coder,
    /// The minimum (packed, unsigned Rice) or the centre (signed Rice).
    base: i64,
    /// The width (packed) or `k` (Rice).
    param: u32,
    bits: u64,
}

/// Writes `values` (at least one). The first leading value is written relative to `origin`
/// (the batch's base time for timestamps, 0 for series values).
pub(crate) fn write(w: &mut BitWriter, values: &[i64], origin: i64) {
    if values.is_empty() {
        return;
    }
    let plan = match w.effort {
        Effort::Smallest => {
            let mut best: Option<Plan> = None;
            for predictor in PREDICTORS {
                let plan = plan(predictor, values, origin);
                if best.as_ref().is_none_or(|b| plan.bits < b.bits) {
                    best = Some(plan);
                }
            }
            let Some(plan) = best else { return };
            plan
        }
        Effort::Quick => quick_plan(values, origin),
    };
    let start = w.bit_len();
    w.note(|| format!("predictor {:?}", plan.predictor));
    w.bits(2, plan.predictor as u64);
    for (i, &v) in plan.leading.iter().enumerate() {
        let v = if i == 0 { v.wrapping_sub(origin) } else { v };
        w.note(|| format!("leading value {i}: sv {v}"));
        w.sv(v);
    }
    if !plan.residuals.is_empty() {
        w.note(|| format!("coder {:?}", plan.coder));
        w.bits(2, plan.coder as u64);
        w.note(|| format!("base: sv {}", plan.base));
        w.sv(plan.base);
        let param = if plan.coder == Coder::Packed {
            "width"
        } else {
            "k"
        };
        w.note(|| format!("{param} {}", plan.param));
        w.bits(
            if plan.coder == Coder::Packed { 7 } else { 6 },
            u64::from(plan.param),
        );
        w.note(|| format!("{} residuals", plan.residuals.len()));
        match plan.coder {
            Coder::Packed => {
                for &r in &plan.residuals {
                    w.bits(plan.param, r.wrapping_sub(plan.base) as u64);
                }
            }
            Coder::RiceSigned => {
                for &r in &plan.residuals {
                    w.rice(plan.param, zigzag(r.wrapping_sub(plan.base)));
                }
            }
            Coder::RiceUnsigned => {
                for &r in &plan.residuals {
                    w.rice(plan.param, r.wrapping_sub(plan.base) as u64);
                }
            }
        }
    }
    debug_assert_eq!((w.bit_len() - start) as u64, plan.bits);
}

/// Reads a column of `n` values written by [`write`] with the same `origin`, appending them to
/// `out`. The caller has checked `n` against the batch limits.
pub(crate) fn read(
    r: &mut BitReader<'_>,
    n: usize,
    origin: i64,
    out: &mut Vec<i64>,
) -> Result<(), BatchError> {
    if n == 0 {
        return Ok(());
    }
    let predictor = PREDICTORS[r.bits(2)? as usize];
    let leading = leading_count(predictor, n);
    let mut lead = [0i64; 2];
    for (i, slot) in lead.iter_mut().take(leading).enumerate() {
        let v = r.sv()?;
        *slot = if i == 0 { v.wrapping_add(origin) } else { v };
    }
    let residuals = n - leading_values(predictor, n);
    out.reserve(n);
    let start = out.len();
    let [first, second] = lead;
    match predictor {
        Predictor::None => {}
        Predictor::Delta | Predictor::Linear => out.push(first),
        Predictor::DeltaOfDelta => {
            out.push(first);
            if n >= 2 {
                out.push(first.wrapping_add(second));
            }
        }
    }
    if residuals == 0 {
        return Ok(());
    }
    let coder = r.bits(2)?;
    let base = r.sv()?;
    let (param, signed) = match coder {
        0 => {
            let width = r.bits(7)? as u32;
            if width > 64 {
                return Err(BatchError::Invalid("a packed column is wider than 64 bits"));
            }
            (width, false)
        }
        1 => (r.bits(6)? as u32, true),
        2 => (r.bits(6)? as u32, false),
        _ => return Err(BatchError::Invalid("reserved coder 3 in a column")),
    };
    // Refuse a column whose residuals cannot fit in what is left: every Rice code takes at
    // least one bit, every packed one `width` bits.
    let least = if coder == 0 { param as usize } else { 1 };
    if r.remaining() / least.max(1) < residuals && least > 0 {
        return Err(r.truncated());
    }
    let mut delta = second;
    for i in 0..residuals {
        let raw = if coder == 0 {
            r.bits(param)?
        } else {
            r.rice(param)?
        };
        let residual = if signed {
            base.wrapping_add(unzigzag(raw))
        } else {
            base.wrapping_add(raw as i64)
        };
        let value = match predictor {
            Predictor::None => residual,
            Predictor::Delta => out[out.len() - 1].wrapping_add(residual),
            Predictor::DeltaOfDelta => {
                delta = delta.wrapping_add(residual);
                out[out.len() - 1].wrapping_add(delta)
            }
            Predictor::Linear => {
                let step = i as i64 + 1;
                first
                    .wrapping_add(step.wrapping_mul(second))
                    .wrapping_add(residual)
            }
        };
        out.push(value);
    }
    debug_assert_eq!(out.len() - start, n);
    Ok(())
}

/// How many fields a predictor sends before the residuals, for a column of `n` ≥ 1 values.
fn leading_count(predictor: Predictor, n: usize) -> usize {
    match predictor {
        Predictor::None => 0,
        Predictor::Delta => 1,
        Predictor::DeltaOfDelta | Predictor::Linear => n.min(2),
    }
}

/// How many of the `n` ≥ 1 values those fields give without a residual (the linear
/// predictor's slope is not a value).
fn leading_values(predictor: Predictor, n: usize) -> usize {
    match predictor {
        Predictor::Linear => 1,
        other => leading_count(other, n),
    }
}

fn plan(predictor: Predictor, values: &[i64], origin: i64) -> Plan {
    let n = values.len();
    let first = values[0];
    let (leading, residuals): (Vec<i64>, Vec<i64>) = match predictor {
        Predictor::None => (vec![], values.to_vec()),
        Predictor::Delta => (vec![first], deltas(values)),
        Predictor::DeltaOfDelta => {
            let d = deltas(values);
            let mut leading = vec![first];
            leading.extend(d.first());
            (leading, deltas(&d))
        }
        Predictor::Linear => {
            if n < 2 {
                (vec![first], vec![])
            } else {
                let slope = median(&deltas(values));
                let residuals = values[1..]
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let step = i as i64 + 1;
                        v.wrapping_sub(first.wrapping_add(step.wrapping_mul(slope)))
                    })
                    .collect();
                (vec![first, slope], residuals)
            }
        }
    };
    debug_assert_eq!(leading.len(), leading_count(predictor, n));
    debug_assert_eq!(residuals.len(), n - leading_values(predictor, n));
    let mut bits = 2;
    for (i, &v) in leading.iter().enumerate() {
        bits += cost::sv(if i == 0 { v.wrapping_sub(origin) } else { v });
    }
    let (coder, base, param, residual_bits) = if residuals.is_empty() {
        (Coder::Packed, 0, 0, 0)
    } else {
        best_coder(&residuals)
    };
    Plan {
        predictor,
        leading,
        residuals,
        coder,
        base,
        param,
        bits: bits + residual_bits,
    }
}

/// The delta predictor with the bit-packing coder, without trying the others (`values` is
/// not empty).
fn quick_plan(values: &[i64], origin: i64) -> Plan {
    let first = values[0];
    let residuals = deltas(values);
    let mut bits = 2 + cost::sv(first.wrapping_sub(origin));
    let (base, param) = match residuals.iter().copied().min() {
        Some(min) => {
            let widest = residuals
                .iter()
                .map(|&r| r.wrapping_sub(min) as u64)
                .max()
                .unwrap_or(0);
            let width = bit_length(widest);
            bits += 2 + cost::sv(min) + 7 + u64::from(width) * residuals.len() as u64;
            (min, width)
        }
        None => (0, 0),
    };
    Plan {
        predictor: Predictor::Delta,
        leading: vec![first],
        residuals,
        coder: Coder::Packed,
        base,
        param,
        bits,
    }
}

/// The cheapest coder for some residuals: (coder, base, param, bits including its header).
fn best_coder(residuals: &[i64]) -> (Coder, i64, u32, u64) {
    let min = residuals.iter().copied().min().unwrap_or(0);
    let offsets: Vec<u64> = residuals
        .iter()
        .map(|&r| r.wrapping_sub(min) as u64)
        .collect();
    let width = bit_length(offsets.iter().copied().max().unwrap_or(0));
    let mut best = (
        Coder::Packed,
        min,
        width,
        2 + cost::sv(min) + 7 + u64::from(width) * residuals.len() as u64,
    );

    let centre = median(residuals);
    let folded: Vec<u64> = residuals
        .iter()
        .map(|&r| zigzag(r.wrapping_sub(centre)))
        .collect();
    for (coder, base, values) in [
        (Coder::RiceSigned, centre, &folded),
        (Coder::RiceUnsigned, min, &offsets),
    ] {
        let (k, bits) = best_rice_k(values);
        let bits = 2 + cost::sv(base) + 6 + bits;
        if bits < best.3 {
            best = (coder, base, k, bits);
        }
    }
    best
}

/// The Rice parameter that codes `values` in the fewest bits, and that many bits.
fn best_rice_k(values: &[u64]) -> (u32, u64) {
    let top = bit_length(values.iter().copied().max().unwrap_or(0)).min(63);
    (0..=top)
        .map(|k| (k, values.iter().map(|&v| cost::rice(k, v)).sum::<u64>()))
        .min_by_key(|&(k, bits)| (bits, k))
        .unwrap_or((0, 0))
}

fn deltas(values: &[i64]) -> Vec<i64> {
    values.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect()
}

/// The lower median (0 for none).
fn median(values: &[i64]) -> i64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    let mid = (sorted.len() - 1) / 2;
    *sorted.select_nth_unstable(mid).1
}

fn bit_length(v: u64) -> u32 {
    64 - v.leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(values: &[i64], origin: i64) -> usize {
        let mut w = BitWriter::default();
        write(&mut w, values, origin);
        let bits = w.bit_len();
        let bytes = w.finish();
        let mut r = BitReader::new(&bytes, 0);
        let mut out = vec![];
        read(&mut r, values.len(), origin, &mut out).unwrap();
        assert_eq!(out, values);
        r.finish().unwrap();
        bits
    }

    #[test]
    fn columns_round_trip_whatever_their_shape() {
        let cases: Vec<Vec<i64>> = vec![
            vec![5],
            vec![5, 5],
            vec![i64::MIN, i64::MAX, 0, -1, i64::MIN],
            vec![i64::MAX; 40],
            (0..100).map(|i| i * 2000).collect(),
            (0..100).map(|i| (i * i * 7919) % 1000 - 500).collect(),
            (0..70)
                .map(|i| if i % 2 == 0 { i64::MIN } else { i64::MAX })
                .collect(),
        ];
        for values in cases {
            round_trip(&values, 0);
            round_trip(&values, 1_780_000_000_000);
            round_trip(&values, i64::MIN);
        }
    }

    #[test]
    fn regular_timestamps_cost_almost_nothing() {
        let ts: Vec<i64> = (0..1800).map(|i| 1_780_000_000_000 + i * 2000).collect();
        let bits = round_trip(&ts, 1_780_000_000_000);
        assert!(bits < 40, "{bits} bits for a perfectly regular column");
    }

    #[test]
    fn an_outlier_does_not_blow_up_a_rice_column() {
        // A random walk with one 2 kW step: the step must cost tens of bits, not thousands.
        let mut v = vec![0i64];
        for i in 1..200 {
            let step = if i == 100 { 20_000 } else { (i * 37 % 61) - 30 };
            v.push(v[i as usize - 1] + step);
        }
        let bits = round_trip(&v, 0);
        assert!(bits < 200 * 8, "{bits} bits");
    }

    #[test]
    fn reserved_coders_and_wide_packing_are_refused() {
        for (coder, width) in [(3u64, 0u64), (0, 65)] {
            let mut w = BitWriter::default();
            w.bits(2, Predictor::None as u64);
            w.bits(2, coder);
            w.sv(0);
            w.bits(7, width);
            w.bits(64, 0);
            let bytes = w.finish();
            let mut r = BitReader::new(&bytes, 0);
            let err = read(&mut r, 1, 0, &mut vec![]).unwrap_err();
            assert!(matches!(err, BatchError::Invalid(_)), "{err:?}");
        }
    }
}
