//! The frame around the columns: version, device, sequence number, base time, meters, their
//! timestamp columns with clock-state runs, their series with presence runs, and the CRC-32.
//! docs/protocol.md ("Telemetry batches") describes the same layout field by field.
//!
//! A stream frame (version 2, [`StreamContext`]) has the same layout, less what the frames
//! before it on the same telemetry stream already said: the device, the sequence number when it
//! is the next one, the base time as a step from the last frame's latest reading, meters seen
//! before as an index, a meter's series headers when they are the same as last time, and each
//! series' values relative to its last value.

use std::collections::{BTreeMap, HashMap};

use super::bits::{BitReader, BitWriter, Effort};
use super::{
    Batch, BatchError, FORMAT_VERSION, MAX_BATCH_BYTES, MAX_METERS, MAX_READINGS, MAX_SERIES,
    STREAM_FORMAT_VERSION, canonical_order, clock_code, column,
};
use crate::ids::DeviceId;
use crate::reading::{Channel, ClockState, MeterId, Reading};

/// The characters of a device ID, by their 6-bit code.
const DEVICE_ID_CHARS: &[u8; 38] = b"abcdefghijklmnopqrstuvwxyz0123456789-_";

/// A meter ID of this form (with a canonical decimal serial) travels as its number.
const MODBUS_PREFIX: &str = "modbus-";

/// One timestamp row: the time and the clock state it was taken with.
type Row = (i64, u8);

/// One series of one meter, as the encoder sees it.
struct Series {
    channel: Channel,
    scale: i8,
    rows: Vec<Row>,
    values: Vec<i64>,
}

/// The most meters a stream's context remembers; meters past it travel in full every time.
pub const MAX_STREAM_METERS: usize = 1024;

/// The most series a stream's context remembers, over all its meters, both as values (series
/// past it are written relative to 0) and in the meters' shapes (a shape past it is forgotten,
/// and the meter's next frame gives its series headers again).
pub const MAX_STREAM_SERIES: usize = 4096;

/// What the frames before this one on a telemetry stream said, against which a stream frame
/// (version 2) is written and read. Each end of a stream keeps one, starting from
/// [`StreamContext::new`], and advances it with every frame it writes or reads, of either
/// version; so both ends must see the same frames in the same order, which the stream gives.
#[derive(Debug, Clone)]
pub struct StreamContext {
    device: DeviceId,
    last_seq: u64,
    last_time: i64,
    meters: Vec<KnownMeter>,
    index: HashMap<MeterId, usize>,
    /// Series values remembered, over all meters.
    series: usize,
    /// Series in the remembered shapes, over all meters.
    shape_series: usize,
}

/// A meter the stream has carried.
#[derive(Debug, Clone)]
pub(super) struct KnownMeter {
    id: MeterId,
    /// Its series headers the last time it came (`None` when they did not fit in the limit).
    shape: Option<Shape>,
    /// The latest value of each of its series (channel, scale).
    last: Vec<(Channel, i8, i64)>,
}

/// A meter's series headers: how many timestamp columns, and each series' channel, scale and
/// column, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    columns: usize,
    series: Vec<(Channel, i8, usize)>,
}

impl StreamContext {
    /// The context at the start of a stream: the device the stream belongs to and the highest
    /// sequence number the hub had stored for it when the stream opened.
    pub fn new(device: DeviceId, last_seq: u64) -> StreamContext {
        StreamContext {
            device,
            last_seq,
            last_time: 0,
            meters: Vec::new(),
            index: HashMap::new(),
            series: 0,
            shape_series: 0,
        }
    }

    /// Encodes a batch of this context's device as a stream frame (its `device` is not
    /// written: the decoder takes the context's) and advances the context.
    pub fn encode(&mut self, batch: &Batch) -> Result<Vec<u8>, BatchError> {
        let (body, shapes) = encode_body(batch, Some(self))?;
        let frame = seal(STREAM_FORMAT_VERSION, body)?;
        let mut readings = batch.readings.clone();
        readings.sort_by(canonical_order);
        self.advance(batch.seq, &readings, shapes);
        Ok(frame)
    }

    /// Encodes a batch as a plain frame (any device, as on `POST /device/v1/batches`) to send
    /// on the stream, and advances the context as the decoder will.
    pub fn encode_plain(&mut self, batch: &Batch) -> Result<Vec<u8>, BatchError> {
        let (body, shapes) = encode_body(batch, None)?;
        let frame = seal(FORMAT_VERSION, body)?;
        let mut readings = batch.readings.clone();
        readings.sort_by(canonical_order);
        self.advance(batch.seq, &readings, shapes);
        Ok(frame)
    }

    /// Decodes the next frame of the stream, a stream frame or a plain one, and advances the
    /// context. A frame that fails leaves the context as it was.
    pub fn decode(&mut self, frame: &[u8]) -> Result<Batch, BatchError> {
        decode_with(frame, Some(self))
    }

    fn meter(&self, id: &MeterId) -> Option<(usize, &KnownMeter)> {
        let &i = self.index.get(id)?;
        Some((i, &self.meters[i]))
    }

    /// Takes in a frame's batch (readings in canonical order) and the shapes of its meters.
    fn advance(&mut self, seq: u64, readings: &[Reading], shapes: Vec<(MeterId, Shape)>) {
        self.last_seq = seq;
        if let Some(latest) = readings.iter().map(|r| r.ts_ms).max() {
            self.last_time = latest;
        }
        for (id, shape) in shapes {
            let i = match self.index.get(&id) {
                Some(&i) => i,
                None if self.meters.len() < MAX_STREAM_METERS => {
                    self.index.insert(id.clone(), self.meters.len());
                    self.meters.push(KnownMeter {
                        id,
                        shape: None,
                        last: Vec::new(),
                    });
                    self.meters.len() - 1
                }
                None => continue,
            };
            // The shapes' series count against the same limit as the values: past it, a
            // meter's shape is forgotten (its next frame gives its headers again).
            let old = self.meters[i].shape.take().map_or(0, |s| s.series.len());
            self.shape_series -= old;
            if self.shape_series + shape.series.len() <= MAX_STREAM_SERIES {
                self.shape_series += shape.series.len();
                self.meters[i].shape = Some(shape);
            }
        }
        let series = readings
            .chunk_by(|a, b| (&a.meter, a.channel, a.scale) == (&b.meter, b.channel, b.scale));
        for run in series {
            let (Some(first), Some(latest)) = (run.first(), run.last()) else {
                continue;
            };
            let Some(&i) = self.index.get(&first.meter) else {
                continue;
            };
            let last = &mut self.meters[i].last;
            match last
                .iter_mut()
                .find(|(c, s, _)| (*c, *s) == (first.channel, first.scale))
            {
                Some(entry) => entry.2 = latest.value,
                None if self.series < MAX_STREAM_SERIES => {
                    last.push((first.channel, first.scale, latest.value));
                    self.series += 1;
                }
                None => {}
            }
        }
    }
}

impl KnownMeter {
    /// What a series' values are written relative to.
    fn reference(&self, channel: Channel, scale: i8) -> i64 {
        self.last
            .iter()
            .find(|(c, s, _)| (*c, *s) == (channel, scale))
            .map_or(0, |e| e.2)
    }
}

pub(super) fn encode(batch: &Batch, effort: Effort) -> Result<Vec<u8>, BatchError> {
    let (body, _) = encode_body_with(batch, None, effort)?;
    seal(FORMAT_VERSION, body)
}

/// The frame: the version byte, the body and the checksum.
fn seal(version: u8, body: BitWriter) -> Result<Vec<u8>, BatchError> {
    let mut frame = vec![version];
    frame.extend(body.finish());
    let crc = crc32fast::hash(&frame);
    frame.extend(crc.to_le_bytes());
    if frame.len() > MAX_BATCH_BYTES {
        return Err(too_large("bytes", MAX_BATCH_BYTES));
    }
    Ok(frame)
}

/// The body of the frame (between the version byte and the checksum), as bits, and the shape
/// of each meter; a stream frame when a context is given.
pub(super) fn encode_body(
    batch: &Batch,
    context: Option<&StreamContext>,
) -> Result<(BitWriter, Vec<(MeterId, Shape)>), BatchError> {
    encode_body_with(batch, context, Effort::Smallest)
}

/// [`encode_body`], its columns coded with the given effort.
fn encode_body_with(
    batch: &Batch,
    context: Option<&StreamContext>,
    effort: Effort,
) -> Result<(BitWriter, Vec<(MeterId, Shape)>), BatchError> {
    if batch.readings.len() > MAX_READINGS {
        return Err(too_large("readings", MAX_READINGS));
    }
    let mut sorted: Vec<&Reading> = batch.readings.iter().collect();
    sorted.sort_by(|a, b| canonical_order(a, b));
    let meters: Vec<&[&Reading]> = sorted.chunk_by(|a, b| a.meter == b.meter).collect();
    if meters.len() > MAX_METERS {
        return Err(too_large("meters", MAX_METERS));
    }
    let series_count: usize = meters
        .iter()
        .map(|m| {
            m.chunk_by(|a, b| (a.channel, a.scale) == (b.channel, b.scale))
                .count()
        })
        .sum();
    if series_count > MAX_SERIES {
        return Err(too_large("series", MAX_SERIES));
    }
    // The earliest time of the first meter: its first time column then starts at +0.
    let base = meters
        .first()
        .and_then(|m| m.iter().map(|r| r.ts_ms).min())
        .unwrap_or(0);

    let mut w = BitWriter::default();
    w.effort = effort;
    if let Some(context) = context {
        if batch.seq == context.last_seq.wrapping_add(1) {
            w.note(|| format!("seq {}: the next one", batch.seq));
            w.bits(1, 0);
        } else {
            w.note(|| format!("seq: given, uv {}", batch.seq));
            w.bits(1, 1);
            w.uv(batch.seq);
        }
        let step = base.wrapping_sub(context.last_time);
        w.note(|| format!("base time: sv {step} after the last frame's latest reading"));
        w.sv(step);
    } else {
        w.note(|| format!("device ID {}", batch.device));
        write_device(&mut w, &batch.device)?;
        w.note(|| format!("seq: uv {}", batch.seq));
        w.uv(batch.seq);
        w.note(|| format!("base time: sv {base}"));
        w.sv(base);
    }
    w.note(|| format!("meter count: ue {}", meters.len()));
    w.ue(meters.len() as u64);
    let mut shapes = Vec::with_capacity(meters.len());
    for readings in meters {
        shapes.push(write_meter(&mut w, readings, base, context));
    }
    Ok((w, shapes))
}

pub(super) fn decode(frame: &[u8]) -> Result<Batch, BatchError> {
    decode_with(frame, None)
}

/// Decodes a plain frame, or, with the stream's context, either kind (and advances it).
fn decode_with(frame: &[u8], context: Option<&mut StreamContext>) -> Result<Batch, BatchError> {
    if frame.len() > MAX_BATCH_BYTES {
        return Err(too_large("bytes", MAX_BATCH_BYTES));
    }
    let Some((crc_bytes, covered)) = frame
        .len()
        .checked_sub(4)
        .filter(|&n| n >= 1)
        .map(|n| (&frame[n..], &frame[..n]))
    else {
        return Err(BatchError::Truncated {
            offset: frame.len(),
        });
    };
    let expected = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let actual = crc32fast::hash(covered);
    if expected != actual {
        return Err(BatchError::BadChecksum { expected, actual });
    }
    let stream = match (covered[0], &context) {
        (FORMAT_VERSION, _) => false,
        (STREAM_FORMAT_VERSION, Some(_)) => true,
        (STREAM_FORMAT_VERSION, None) => {
            return Err(BatchError::Invalid(
                "a stream frame (version 2) is only valid on the telemetry stream",
            ));
        }
        (version, _) => return Err(BatchError::UnsupportedVersion(version)),
    };

    let mut r = BitReader::new(&covered[1..], 1);
    let known = if stream { context.as_deref() } else { None };
    let (device, seq, base) = match known {
        Some(c) => {
            let seq = if r.bits(1)? == 0 {
                c.last_seq.wrapping_add(1)
            } else {
                r.uv()?
            };
            (c.device.clone(), seq, c.last_time.wrapping_add(r.sv()?))
        }
        None => (read_device(&mut r)?, r.uv()?, r.sv()?),
    };
    let meters = r.ue(MAX_METERS as u64, || too_large("meters", MAX_METERS))?;
    let mut budget = Budget::default();
    let mut readings = Vec::new();
    let mut shapes = Vec::new();
    for _ in 0..meters {
        shapes.push(read_meter(&mut r, base, known, &mut budget, &mut readings)?);
    }
    r.finish()?;
    readings.sort_by(canonical_order);
    if let Some(context) = context {
        context.advance(seq, &readings, shapes);
    }
    Ok(Batch {
        device,
        seq,
        readings,
    })
}

fn too_large(what: &'static str, limit: usize) -> BatchError {
    BatchError::TooLarge { what, limit }
}

fn write_device(w: &mut BitWriter, device: &DeviceId) -> Result<(), BatchError> {
    let text = device.as_str().as_bytes();
    w.bits(6, text.len() as u64 - 1);
    for &c in text {
        let code = DEVICE_ID_CHARS
            .iter()
            .position(|&d| d == c)
            .ok_or(BatchError::BadDeviceId)?;
        w.bits(6, code as u64);
    }
    Ok(())
}

fn read_device(r: &mut BitReader<'_>) -> Result<DeviceId, BatchError> {
    let len = r.bits(6)? + 1;
    let mut text = String::new();
    for _ in 0..len {
        let code = r.bits(6)? as usize;
        let c = DEVICE_ID_CHARS.get(code).ok_or(BatchError::BadDeviceId)?;
        text.push(char::from(*c));
    }
    DeviceId::parse(&text).map_err(|_| BatchError::BadDeviceId)
}

fn write_meter_id(w: &mut BitWriter, meter: &MeterId) {
    let serial = meter
        .as_str()
        .strip_prefix(MODBUS_PREFIX)
        .and_then(|digits| Some((digits, digits.parse::<u64>().ok()?)))
        .filter(|(digits, n)| n.to_string() == *digits);
    w.note(|| format!("meter ID {meter}"));
    if let Some((_, serial)) = serial {
        w.bits(1, 1);
        w.uv(serial);
        return;
    }
    let text = meter.as_str().as_bytes();
    w.bits(1, 0);
    w.bits(6, text.len() as u64 - 1);
    for &c in text {
        w.bits(7, u64::from(c));
    }
}

fn read_meter_id(r: &mut BitReader<'_>) -> Result<MeterId, BatchError> {
    if r.bits(1)? == 1 {
        let serial = r.uv()?;
        return Ok(MeterId::parse(&format!("{MODBUS_PREFIX}{serial}"))?);
    }
    let len = r.bits(6)? + 1;
    let mut text = String::new();
    for _ in 0..len {
        text.push(char::from(r.bits(7)? as u8));
    }
    Ok(MeterId::parse(&text)?)
}

/// Writes one meter: its ID, its timestamp columns and its series; returns its shape. All
/// readings have the same meter and are in canonical order.
fn write_meter(
    w: &mut BitWriter,
    readings: &[&Reading],
    base: i64,
    context: Option<&StreamContext>,
) -> (MeterId, Shape) {
    let meter = &readings[0].meter;
    let known = context.and_then(|c| c.meter(meter));
    if context.is_some() {
        match known {
            Some((i, _)) => {
                w.note(|| format!("meter {meter}: known, index ue {i}"));
                w.bits(1, 1);
                w.ue(i as u64);
            }
            None => {
                w.note(|| format!("meter {meter}: new"));
                w.bits(1, 0);
                write_meter_id(w, meter);
            }
        }
    } else {
        write_meter_id(w, meter);
    }
    let known = known.map(|(_, m)| m);
    let series: Vec<Series> = readings
        .chunk_by(|a, b| (a.channel, a.scale) == (b.channel, b.scale))
        .map(|rs| Series {
            channel: rs[0].channel,
            scale: rs[0].scale,
            rows: rs.iter().map(|r| (r.ts_ms, clock_code(r.clock))).collect(),
            values: rs.iter().map(|r| r.value).collect(),
        })
        .collect();

    // Two ways to lay out the timestamps: one column with every row any series has (series
    // that miss a row mark it absent), or one column per distinct row sequence. The first wins
    // when series share polls, the second when they were polled on different schedules.
    let mut best = layout_shared(&series, base, known);
    if let Some(distinct) = layout_distinct(&series, base, known)
        && distinct.0.bit_len() < best.0.bit_len()
    {
        best = distinct;
    }
    w.append(best.0);
    (meter.clone(), best.1)
}

/// One timestamp column holding every row of any series; each series names the rows it has.
fn layout_shared(series: &[Series], base: i64, known: Option<&KnownMeter>) -> (BitWriter, Shape) {
    // The union as a multiset: a row appears as often as in the series that has it most often.
    let mut counts: BTreeMap<Row, usize> = BTreeMap::new();
    for s in series {
        for run in s.rows.chunk_by(|a, b| a == b) {
            let n = counts.entry(run[0]).or_default();
            *n = (*n).max(run.len());
        }
    }
    let union: Vec<Row> = counts
        .into_iter()
        .flat_map(|(row, n)| std::iter::repeat_n(row, n))
        .collect();
    let refs = series
        .iter()
        .map(|s| {
            // Both are sorted, and the union has each row at least as often as the series, so
            // a greedy walk finds the series' rows. Runs alternate present, absent, present...
            let mut runs = vec![0usize];
            let mut next = s.rows.iter().peekable();
            for row in &union {
                let here = next.peek() == Some(&row);
                if here {
                    next.next();
                }
                // The current run is of present rows when it is the 1st, 3rd, 5th ...
                if here != (runs.len() % 2 == 1) {
                    runs.push(0);
                }
                if let Some(last) = runs.last_mut() {
                    *last += 1;
                }
            }
            (0, Some(runs).filter(|r| r.len() > 1))
        })
        .collect::<Vec<_>>();
    let mut w = BitWriter::default();
    let shape = write_layout(&mut w, &[union], series, &refs, base, known);
    (w, shape)
}

/// One timestamp column per distinct row sequence, each series naming its own; `None` when
/// that is the same as the shared layout (all series have the same rows).
fn layout_distinct(
    series: &[Series],
    base: i64,
    known: Option<&KnownMeter>,
) -> Option<(BitWriter, Shape)> {
    let mut columns: Vec<Vec<Row>> = Vec::new();
    let mut refs = Vec::with_capacity(series.len());
    for s in series {
        let index = match columns.iter().position(|c| *c == s.rows) {
            Some(i) => i,
            None => {
                columns.push(s.rows.clone());
                columns.len() - 1
            }
        };
        refs.push((index, None));
    }
    if columns.len() == 1 {
        return None;
    }
    let mut w = BitWriter::default();
    let shape = write_layout(&mut w, &columns, series, &refs, base, known);
    Some((w, shape))
}

/// Writes a meter after its ID given its timestamp columns and, for each series, the column it
/// uses and the runs of rows it has and lacks there (`None`: it has all of them); returns its
/// shape. `known`: what the stream knows of the meter, on a stream frame.
fn write_layout(
    w: &mut BitWriter,
    columns: &[Vec<Row>],
    series: &[Series],
    refs: &[(usize, Option<Vec<usize>>)],
    base: i64,
    known: Option<&KnownMeter>,
) -> Shape {
    let shape = Shape {
        columns: columns.len(),
        series: series
            .iter()
            .zip(refs)
            .map(|(s, (index, _))| (s.channel, s.scale, *index))
            .collect(),
    };
    // On a stream frame, a meter whose headers came before says whether they are the same.
    let same = match known.and_then(|k| k.shape.as_ref()) {
        Some(before) => {
            let same = *before == shape;
            w.note(|| format!("same series headers as before: {same}"));
            w.bits(1, u64::from(same));
            same
        }
        None => false,
    };
    if !same {
        w.note(|| format!("timestamp columns − 1: ue {}", columns.len() - 1));
        w.ue(columns.len() as u64 - 1);
        w.note(|| format!("series − 1: ue {}", series.len() - 1));
        w.ue(series.len() as u64 - 1);
    }
    for rows in columns {
        w.note(|| format!("timestamp column: rows − 1: ue {}", rows.len() - 1));
        w.ue(rows.len() as u64 - 1);
        let runs: Vec<&[Row]> = rows.chunk_by(|a, b| a.1 == b.1).collect();
        w.note(|| format!("clock runs − 1: ue {}", runs.len() - 1));
        w.ue(runs.len() as u64 - 1);
        for (i, run) in runs.iter().enumerate() {
            w.note(|| format!("clock state {}", run[0].1));
            w.bits(2, u64::from(run[0].1));
            if i + 1 < runs.len() {
                w.note(|| format!("run length − 1: ue {}", run.len() - 1));
                w.ue(run.len() as u64 - 1);
            }
        }
        let times: Vec<i64> = rows.iter().map(|r| r.0).collect();
        column::write(w, &times, base);
    }
    for (s, (index, present)) in series.iter().zip(refs) {
        if !same {
            w.note(|| {
                format!(
                    "series: channel {} ({})",
                    s.channel.code(),
                    s.channel.name()
                )
            });
            w.bits(8, u64::from(s.channel.code()));
            w.note(|| format!("scale: se {}", s.scale));
            w.se(i64::from(s.scale));
            if columns.len() > 1 {
                w.note(|| format!("timestamp column: ue {index}"));
                w.ue(*index as u64);
            }
        }
        write_presence(w, present.as_deref());
        match known.map(|k| k.reference(s.channel, s.scale)) {
            Some(reference) if reference != 0 => {
                w.note(|| format!("values relative to {reference}"));
                let relative: Vec<i64> =
                    s.values.iter().map(|v| v.wrapping_sub(reference)).collect();
                column::write(w, &relative, 0);
            }
            _ => column::write(w, &s.values, 0),
        }
    }
    shape
}

/// A 0 bit when the series has every row of its timestamp column; else a 1 bit and the lengths
/// of alternating runs of present and absent rows (starting with present, possibly empty).
fn write_presence(w: &mut BitWriter, runs: Option<&[usize]>) {
    let Some(runs) = runs else {
        w.note(|| "presence: all rows".to_string());
        w.bits(1, 0);
        return;
    };
    w.note(|| "presence: runs follow".to_string());
    w.bits(1, 1);
    for (i, &len) in runs.iter().enumerate() {
        let kind = if i % 2 == 0 { "present" } else { "absent" };
        w.note(|| format!("{kind} run: ue {len}"));
        w.ue(len as u64);
    }
}

/// Running totals checked against the limits while decoding, before anything is allocated.
#[derive(Default)]
struct Budget {
    series: usize,
    rows: usize,
    readings: usize,
}

impl Budget {
    fn add(
        count: &mut usize,
        n: usize,
        what: &'static str,
        limit: usize,
    ) -> Result<(), BatchError> {
        *count = count.saturating_add(n);
        if *count > limit {
            return Err(too_large(what, limit));
        }
        Ok(())
    }
}

/// A decoded timestamp column.
struct TimeColumn {
    times: Vec<i64>,
    clocks: Vec<ClockState>,
}

/// Reads one meter (of a stream frame when `context` is given); returns its ID and shape.
fn read_meter(
    r: &mut BitReader<'_>,
    base: i64,
    context: Option<&StreamContext>,
    budget: &mut Budget,
    readings: &mut Vec<Reading>,
) -> Result<(MeterId, Shape), BatchError> {
    let (meter, known) = match context {
        Some(c) if r.bits(1)? == 1 => {
            let unknown = || BatchError::Invalid("a meter index names no meter of the stream");
            let max = c.meters.len().checked_sub(1).ok_or_else(unknown)?;
            let known = &c.meters[r.ue(max as u64, unknown)? as usize];
            (known.id.clone(), Some(known))
        }
        Some(c) => {
            let id = read_meter_id(r)?;
            let known = c.meter(&id).map(|(_, m)| m);
            (id, known)
        }
        None => (read_meter_id(r)?, None),
    };
    let before = known.and_then(|k| k.shape.as_ref());
    let same = match before {
        Some(_) => r.bits(1)? == 1,
        None => false,
    };
    let series_limit = MAX_SERIES as u64 - 1;
    let (column_count, series_count) = match before {
        Some(shape) if same => (shape.columns, shape.series.len()),
        _ => (
            r.ue(series_limit, || too_large("series", MAX_SERIES))? as usize + 1,
            r.ue(series_limit, || too_large("series", MAX_SERIES))? as usize + 1,
        ),
    };
    Budget::add(&mut budget.series, series_count, "series", MAX_SERIES)?;
    if column_count > series_count {
        return Err(BatchError::Invalid(
            "a meter has more timestamp columns than series",
        ));
    }
    let mut columns = Vec::with_capacity(column_count);
    for _ in 0..column_count {
        let rows = r.ue(MAX_READINGS as u64 - 1, || {
            too_large("readings", MAX_READINGS)
        })? as usize
            + 1;
        Budget::add(&mut budget.rows, rows, "readings", MAX_READINGS)?;
        let clocks = read_clock_runs(r, rows)?;
        let mut times = Vec::new();
        column::read(r, rows, base, &mut times)?;
        columns.push(TimeColumn { times, clocks });
    }
    let mut shape = Shape {
        columns: column_count,
        series: Vec::with_capacity(series_count),
    };
    for k in 0..series_count {
        let (channel, scale, index) = match before {
            Some(before) if same => before.series[k],
            _ => {
                let code = r.bits(8)? as u8;
                let channel = Channel::from_code(code).ok_or(BatchError::UnknownChannel(code))?;
                let scale = i8::try_from(r.se(128)?)
                    .map_err(|_| BatchError::Invalid("a scale is outside -128..=127"))?;
                let index = if column_count > 1 {
                    r.ue(column_count as u64 - 1, || {
                        BatchError::Invalid("a series names a timestamp column that does not exist")
                    })? as usize
                } else {
                    0
                };
                (channel, scale, index)
            }
        };
        shape.series.push((channel, scale, index));
        let column = &columns[index];
        let present = read_presence(r, column.times.len())?;
        let count = present
            .as_ref()
            .map_or(column.times.len(), |p| p.iter().filter(|&&x| x).count());
        Budget::add(&mut budget.readings, count, "readings", MAX_READINGS)?;
        let mut values = Vec::new();
        column::read(r, count, 0, &mut values)?;
        if let Some(reference) = known.map(|k| k.reference(channel, scale)) {
            for v in &mut values {
                *v = v.wrapping_add(reference);
            }
        }
        let rows = (0..column.times.len()).filter(|&i| present.as_ref().is_none_or(|p| p[i]));
        readings.reserve(count);
        for (row, value) in rows.zip(values) {
            readings.push(Reading {
                meter: meter.clone(),
                channel,
                ts_ms: column.times[row],
                value,
                scale,
                clock: column.clocks[row],
            });
        }
    }
    Ok((meter, shape))
}

/// Reads the clock-state runs of a timestamp column of `rows` rows.
fn read_clock_runs(r: &mut BitReader<'_>, rows: usize) -> Result<Vec<ClockState>, BatchError> {
    let runs = r.ue(rows as u64 - 1, || {
        BatchError::Invalid("a timestamp column has more clock runs than rows")
    })? as usize
        + 1;
    let mut clocks = Vec::with_capacity(rows);
    for i in 0..runs {
        let code = r.bits(2)? as u8;
        let clock = ClockState::from_code(code).ok_or(BatchError::UnknownClockState(code))?;
        let len = if i + 1 == runs {
            rows - clocks.len()
        } else {
            // Leave at least one row for each run after this one.
            let room = rows - clocks.len() - (runs - i - 1);
            r.ue(room as u64 - 1, || {
                BatchError::Invalid("clock runs are longer than their timestamp column")
            })? as usize
                + 1
        };
        clocks.extend(std::iter::repeat_n(clock, len));
    }
    Ok(clocks)
}

/// Reads a series' presence: `None` when it has every row, else one flag per row.
fn read_presence(r: &mut BitReader<'_>, rows: usize) -> Result<Option<Vec<bool>>, BatchError> {
    if r.bits(1)? == 0 {
        return Ok(None);
    }
    let mut present = Vec::with_capacity(rows);
    let mut expect = true;
    while present.len() < rows {
        let room = rows - present.len();
        let len = r.ue(room as u64, || {
            BatchError::Invalid("presence runs are longer than their timestamp column")
        })? as usize;
        present.extend(std::iter::repeat_n(expect, len));
        expect = !expect;
    }
    Ok(Some(present))
}
