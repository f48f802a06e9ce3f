//! The bit-level primitives a batch body is written in: fixed-width fields, Exp-Golomb codes,
//! length-prefixed 64-bit integers and Rice codes with an escape. Bits are written most
//! significant first; the last byte is padded with zero bits.
//!
//! Every read is bounds-checked and answers [`BatchError::Truncated`] past the end, so a
//! decoder built from these cannot read out of bounds or loop on a short input.

use super::BatchError;

/// After this many 1 bits, a Rice code's quotient continues as an Exp-Golomb code, so that an
/// outlier (a load step in a power series) costs tens of bits instead of thousands.
pub(crate) const RICE_ESCAPE: u64 = 8;

/// How hard column coders try to make their bits few.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Effort {
    /// Every predictor with every coder, keeping the shortest (what devices send and the hub
    /// keeps at rest).
    #[default]
    Smallest,
    /// One fixed predictor and coder (delta, bit-packed): several times faster, a few bits a
    /// value larger; for bytes that are kept briefly.
    Quick,
}

/// Writes fields into a growing bit string.
#[derive(Default)]
pub(crate) struct BitWriter {
    /// How the column coders writing here choose their encoding.
    pub(crate) effort: Effort,
    bytes: Vec<u8>,
    /// Bits not yet flushed into `bytes`, right-aligned.
    acc: u64,
    /// How many bits `acc` holds (0..8 between calls).
    acc_bits: u32,
    /// Field names and their starting bit, for the annotated golden vector in the tests.
    #[cfg(test)]
    pub(crate) trace: Vec<(usize, String)>,
}

impl BitWriter {
    /// How many bits have been written.
    pub(crate) fn bit_len(&self) -> usize {
        self.bytes.len() * 8 + self.acc_bits as usize
    }

    /// Names the field that starts here (test builds only: it feeds the annotated example in
    /// docs/protocol.md).
    #[cfg_attr(
        not(test),
        allow(unused_variables, reason = "tracing is compiled in tests only")
    )]
    pub(crate) fn note(&mut self, field: impl FnOnce() -> String) {
        #[cfg(test)]
        {
            let at = self.bit_len();
            self.trace.push((at, field()));
        }
    }

    /// The low `n` bits of `value` (`n` ≤ 64).
    pub(crate) fn bits(&mut self, n: u32, value: u64) {
        debug_assert!(n <= 64);
        debug_assert!(n == 64 || value >> n == 0, "{value} does not fit {n} bits");
        // Feed at most 32 bits at a time so that `acc` (≤ 7 pending bits) never overflows.
        if n > 32 {
            self.bits(n - 32, value >> 32);
            self.bits(32, value & 0xffff_ffff);
            return;
        }
        if n == 0 {
            return;
        }
        self.acc = (self.acc << n) | value;
        self.acc_bits += n;
        while self.acc_bits >= 8 {
            self.acc_bits -= 8;
            self.bytes.push((self.acc >> self.acc_bits) as u8);
        }
        self.acc &= (1 << self.acc_bits) - 1;
    }

    /// `ue`: Exp-Golomb order 0 (`value + 1` in binary, preceded by one 0 bit per bit after the
    /// first). 0 → `1`, 1 → `010`, 2 → `011`, 3 → `00100`. `value` < 2^64 − 1.
    pub(crate) fn ue(&mut self, value: u64) {
        let v = value + 1;
        let len = 64 - v.leading_zeros();
        self.bits(len - 1, 0);
        self.bits(len, v);
    }

    /// `se`: a signed integer as `ue` of its zigzag code (0, -1, 1, -2 → 0, 1, 2, 3).
    pub(crate) fn se(&mut self, value: i64) {
        self.ue(zigzag(value));
    }

    /// `uv`: 6 bits holding `n` = (bit length of `value`) − 1 (0 for 0), then `value` in
    /// `n + 1` bits. 7 bits for 0 and 1, 70 at most.
    pub(crate) fn uv(&mut self, value: u64) {
        let n = 63u32.saturating_sub(value.leading_zeros());
        self.bits(6, u64::from(n));
        self.bits(n + 1, value);
    }

    /// `sv`: a signed integer as `uv` of its zigzag code.
    pub(crate) fn sv(&mut self, value: i64) {
        self.uv(zigzag(value));
    }

    /// A Rice code with parameter `k` (≤ 63): the quotient `value >> k` in unary (that many 1
    /// bits and a 0), or, from [`RICE_ESCAPE`] on, `RICE_ESCAPE` 1 bits and
    /// `ue(quotient − RICE_ESCAPE)`; then the `k` low bits.
    pub(crate) fn rice(&mut self, k: u32, value: u64) {
        debug_assert!(k < 64);
        let q = value >> k;
        if q < RICE_ESCAPE {
            self.bits(q as u32 + 1, ((1 << q) - 1) << 1);
        } else {
            self.bits(RICE_ESCAPE as u32, (1 << RICE_ESCAPE) - 1);
            self.ue(q - RICE_ESCAPE);
        }
        self.bits(k, low_bits(value, k));
    }

    /// Appends everything another writer wrote.
    pub(crate) fn append(&mut self, other: BitWriter) {
        #[cfg(test)]
        {
            let base = self.bit_len();
            self.trace
                .extend(other.trace.into_iter().map(|(at, f)| (at + base, f)));
        }
        for &b in &other.bytes {
            self.bits(8, u64::from(b));
        }
        self.bits(other.acc_bits, other.acc);
    }

    /// The bytes, the last one padded with zero bits.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        if self.acc_bits > 0 {
            let pad = 8 - self.acc_bits;
            self.bits(pad, 0);
        }
        self.bytes
    }
}

/// The bit cost of each primitive, for choosing between encodings without writing them.
pub(crate) mod cost {
    use super::{RICE_ESCAPE, zigzag};

    pub(crate) fn ue(value: u64) -> u64 {
        let len = u64::from(64 - (value + 1).leading_zeros());
        2 * len - 1
    }

    pub(crate) fn uv(value: u64) -> u64 {
        6 + u64::from(64u32.saturating_sub(value.leading_zeros()).max(1))
    }

    pub(crate) fn sv(value: i64) -> u64 {
        uv(zigzag(value))
    }

    pub(crate) fn rice(k: u32, value: u64) -> u64 {
        let q = value >> k;
        let quotient = if q < RICE_ESCAPE {
            q + 1
        } else {
            RICE_ESCAPE + ue(q - RICE_ESCAPE)
        };
        quotient + u64::from(k)
    }
}

/// Reads fields from a bit string.
pub(crate) struct BitReader<'a> {
    bytes: &'a [u8],
    /// The next bit to read, counted from the start of `bytes`.
    pos: usize,
    /// Added to byte offsets in errors: where `bytes` starts within the whole frame.
    frame_offset: usize,
}

impl<'a> BitReader<'a> {
    pub(crate) fn new(bytes: &'a [u8], frame_offset: usize) -> BitReader<'a> {
        BitReader {
            bytes,
            pos: 0,
            frame_offset,
        }
    }

    /// How many bits are left.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() * 8 - self.pos
    }

    /// The error for a field that runs past the end.
    pub(crate) fn truncated(&self) -> BatchError {
        BatchError::Truncated {
            offset: self.frame_offset + self.bytes.len(),
        }
    }

    /// `n` bits (≤ 64) as an unsigned integer.
    pub(crate) fn bits(&mut self, n: u32) -> Result<u64, BatchError> {
        debug_assert!(n <= 64);
        if self.remaining() < n as usize {
            return Err(self.truncated());
        }
        let mut out = 0u64;
        let mut left = n;
        while left > 0 {
            let byte = self.bytes[self.pos / 8];
            let used = (self.pos % 8) as u32;
            let take = (8 - used).min(left);
            let chunk = (u64::from(byte) >> (8 - used - take)) & ((1 << take) - 1);
            // `out` holds at most 64 − `take` bits so far.
            out = out << take | chunk;
            left -= take;
            self.pos += take as usize;
        }
        Ok(out)
    }

    fn bit(&mut self) -> Result<bool, BatchError> {
        Ok(self.bits(1)? == 1)
    }

    /// See [`BitWriter::ue`]. Values past `max` are refused (with the error `too_large`
    /// returns) before more bits are read, so a hostile run of zeros cannot declare a huge count.
    pub(crate) fn ue(
        &mut self,
        max: u64,
        too_large: impl FnOnce() -> BatchError,
    ) -> Result<u64, BatchError> {
        let mut zeros = 0u32;
        while !self.bit()? {
            zeros += 1;
            if zeros > 63 || (1u64 << zeros) - 1 > max {
                return Err(too_large());
            }
        }
        let rest = self.bits(zeros)?;
        let value = ((1u64 << zeros) | rest) - 1;
        if value > max {
            return Err(too_large());
        }
        Ok(value)
    }

    /// See [`BitWriter::se`].
    pub(crate) fn se(&mut self, max_magnitude: u64) -> Result<i64, BatchError> {
        let z = self.ue(max_magnitude.saturating_mul(2), || {
            BatchError::Invalid("a small signed field is out of range")
        })?;
        Ok(unzigzag(z))
    }

    /// See [`BitWriter::uv`].
    pub(crate) fn uv(&mut self) -> Result<u64, BatchError> {
        let n = self.bits(6)? as u32;
        self.bits(n + 1)
    }

    /// See [`BitWriter::sv`].
    pub(crate) fn sv(&mut self) -> Result<i64, BatchError> {
        Ok(unzigzag(self.uv()?))
    }

    /// See [`BitWriter::rice`].
    pub(crate) fn rice(&mut self, k: u32) -> Result<u64, BatchError> {
        let mut q = 0u64;
        while q < RICE_ESCAPE && self.bit()? {
            q += 1;
        }
        if q == RICE_ESCAPE {
            q += self.ue(u64::MAX - RICE_ESCAPE, || {
                BatchError::Invalid("a Rice-coded value is out of range")
            })?;
        }
        let low = self.bits(k)?;
        if q > u64::MAX >> k {
            return Err(BatchError::Invalid("a Rice-coded value is out of range"));
        }
        Ok(q << k | low)
    }

    /// Skips the zero padding to the next byte boundary and returns how many bytes have been
    /// read, for formats that put several bit strings back to back.
    pub(crate) fn align(&mut self) -> Result<usize, BatchError> {
        let pad = (8 - self.pos % 8) % 8;
        if self.bits(pad as u32)? != 0 {
            return Err(BatchError::Invalid("the padding bits are not zero"));
        }
        Ok(self.pos / 8)
    }

    /// Checks that only zero padding (fewer than 8 bits) is left.
    pub(crate) fn finish(self) -> Result<(), BatchError> {
        let rest = self.remaining();
        if rest >= 8 {
            return Err(BatchError::TrailingBytes { count: rest / 8 });
        }
        let mut me = self;
        if me.bits(rest as u32)? != 0 {
            return Err(BatchError::Invalid("the padding bits are not zero"));
        }
        Ok(())
    }
}

/// 0, -1, 1, -2, 2 → 0, 1, 2, 3, 4.
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
pub(crate) fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

fn low_bits(value: u64, k: u32) -> u64 {
    value & ((1 << k) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(write: impl FnOnce(&mut BitWriter), read: impl FnOnce(&mut BitReader<'_>)) {
        let mut w = BitWriter::default();
        write(&mut w);
        let bits = w.bit_len();
        let bytes = w.finish();
        assert_eq!(bytes.len(), bits.div_ceil(8));
        let mut r = BitReader::new(&bytes, 0);
        read(&mut r);
        assert_eq!(r.pos, bits, "read a different number of bits than written");
        r.finish().unwrap();
    }

    #[test]
    fn exp_golomb_codes_match_the_table_in_the_docs() {
        let mut w = BitWriter::default();
        for v in 0..4 {
            w.ue(v);
        }
        // 1 010 011 00100 → 1010_0110 0100_0000
        assert_eq!(w.finish(), [0b1010_0110, 0b0100_0000]);
    }

    #[test]
    fn every_primitive_round_trips_at_its_extremes_and_costs_what_it_writes() {
        let unsigned = [0, 1, 2, 3, 7, 8, 255, 256, 1 << 40, u64::MAX >> 1, u64::MAX];
        let signed = [0, 1, -1, 63, -64, i64::MAX, i64::MIN, 1_780_000_000_000];
        for &v in &unsigned {
            let mut w = BitWriter::default();
            w.uv(v);
            assert_eq!(w.bit_len() as u64, cost::uv(v), "uv({v})");
            round_trip(|w| w.uv(v), |r| assert_eq!(r.uv().unwrap(), v));
            for k in [0, 1, 5, 31, 63] {
                let mut w = BitWriter::default();
                w.rice(k, v);
                assert_eq!(w.bit_len() as u64, cost::rice(k, v), "rice({k}, {v})");
                round_trip(|w| w.rice(k, v), |r| assert_eq!(r.rice(k).unwrap(), v));
            }
            if v < u64::MAX {
                let mut w = BitWriter::default();
                w.ue(v);
                assert_eq!(w.bit_len() as u64, cost::ue(v), "ue({v})");
                round_trip(
                    |w| w.ue(v),
                    |r| assert_eq!(r.ue(u64::MAX, || unreachable!()).unwrap(), v),
                );
            }
        }
        for &v in &signed {
            round_trip(|w| w.sv(v), |r| assert_eq!(r.sv().unwrap(), v));
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        for v in [-128i64, -3, 0, 3, 127] {
            round_trip(|w| w.se(v), |r| assert_eq!(r.se(128).unwrap(), v));
        }
        round_trip(
            |w| w.bits(64, u64::MAX - 5),
            |r| assert_eq!(r.bits(64).unwrap(), u64::MAX - 5),
        );
    }

    #[test]
    fn reading_past_the_end_is_truncation_not_a_panic() {
        let mut r = BitReader::new(&[0xff], 10);
        assert_eq!(r.bits(9), Err(BatchError::Truncated { offset: 11 }));
        let mut r = BitReader::new(&[0x00], 0);
        assert!(r.ue(u64::MAX, || unreachable!()).is_err());
        // Eight 1 bits escape into an Exp-Golomb code that is not there.
        let mut r = BitReader::new(&[0xff], 0);
        assert!(r.rice(3).is_err());
    }

    #[test]
    fn huge_exp_golomb_counts_are_refused_before_they_are_read() {
        // 40 zero bits would announce a count above 2^40; the reader stops at the limit.
        let bytes = [0u8; 5];
        let mut r = BitReader::new(&bytes, 0);
        let err = r.ue(1000, || BatchError::Invalid("too many"));
        assert_eq!(err, Err(BatchError::Invalid("too many")));
        assert!(r.pos <= 10, "read {} bits", r.pos);
    }
}
