//! Energy reports for a meter, a site or a customer over a period: the energy from register
//! deltas (resets and rollovers handled), the data completeness, every gap and every flag, and
//! meter replacements noted.
//!
//! Reports read raw points where they are still kept (exact even across a reset) and, for older
//! times, the 1-minute rollups (each bucket's last reading is a register reading), so a report
//! stays correct after raw points have passed their retention. A meter replacement needs no
//! arithmetic — the new meter is a new series with its own register — but a report says when a
//! device's meter changed, because an authority will ask.

use serde::{Deserialize, Serialize};

use super::energy::{Anomaly, Flag, Gap, interval_energy, register_energy, typical_interval};
use super::rollup::Resolution;
use crate::store::{Series, SeriesFilter, Site, Store, StoreResult, now_ms, unscale};

/// Look this far beyond a period's edges for the readings that straddle them.
const EDGE_LOOKAROUND_MS: i64 = 7 * 86_400_000;
/// Minute buckets further apart than this (1.5 minutes, at least) are a gap.
const MIN_GAP_MS: i64 = 90_000;
/// The channels energy is reported from: cumulative registers, and the seed's interval events.
const ENERGY_CHANNELS: [&str; 2] = ["energy_import", "energy_interval"];

/// What a report covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One meter of one device.
    Meter {
        /// The device.
        device: String,
        /// The meter.
        meter: String,
    },
    /// Every meter at a site.
    Site(Site),
    /// Every meter at the customer's sites.
    Customer(String, Vec<Site>),
}

impl Scope {
    /// `meter`, `site` or `customer`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Meter { .. } => "meter",
            Scope::Site(_) => "site",
            Scope::Customer(..) => "customer",
        }
    }

    /// The subject as text.
    pub fn subject(&self) -> String {
        match self {
            Scope::Meter { device, meter } => format!("{device}/{meter}"),
            Scope::Site(site) => site.name.clone(),
            Scope::Customer(customer, _) => customer.clone(),
        }
    }
}

/// One meter's part of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterEnergy {
    /// The device.
    pub device: String,
    /// The site it was at for this part of the period (`None` in a meter report).
    pub site: Option<String>,
    /// The meter.
    pub meter: String,
    /// The part of the period this meter was reported for (Unix ms).
    pub from: i64,
    /// End (exclusive).
    pub to: i64,
    /// Energy, in Wh (exact to the meter's resolution: a 0.01 Wh register gives 0.01 Wh).
    pub energy_wh: f64,
    /// Share of its period with readings, in percent.
    pub completeness_pct: f64,
    /// Minutes with readings.
    pub minutes_with_data: usize,
    /// Every gap.
    pub gaps: Vec<Gap>,
    /// Every reset, rollover or backward step.
    pub flags: Vec<ReportFlag>,
}

/// A flagged step of a meter's register, in Wh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportFlag {
    /// The anomaly.
    pub kind: Anomaly,
    /// Time of the reading before the step (Unix ms).
    pub from_ts: i64,
    /// Time of the reading after it.
    pub to_ts: i64,
    /// The register before, in Wh.
    #[serde(alias = "from_value")]
    pub from_wh: f64,
    /// The register after, in Wh.
    #[serde(alias = "to_value")]
    pub to_wh: f64,
    /// The energy counted for the step, in Wh.
    #[serde(alias = "counted")]
    pub counted_wh: f64,
}

impl ReportFlag {
    fn new(flag: &Flag, scale: i64) -> ReportFlag {
        ReportFlag {
            kind: flag.kind,
            from_ts: flag.from_ts,
            to_ts: flag.to_ts,
            from_wh: unscale(i128::from(flag.from_value), scale),
            to_wh: unscale(i128::from(flag.to_value), scale),
            counted_wh: unscale(i128::from(flag.counted), scale),
        }
    }
}

/// The sum of values each stored at its own scale, in Wh, added exactly (at the finest scale)
/// before the one conversion.
fn sum_in_wh(values: &[(i64, i64)]) -> f64 {
    let Some(finest) = values.iter().map(|&(_, scale)| scale).min() else {
        return 0.0;
    };
    let mut total: i128 = 0;
    for &(value, scale) in values {
        let shift = u32::try_from(scale - finest).unwrap_or(u32::MAX);
        let factor = 10i128.checked_pow(shift).unwrap_or(i128::MAX);
        total = total.saturating_add(i128::from(value).saturating_mul(factor));
    }
    unscale(total, finest)
}

/// A replacement seen at a device: one meter's readings end, another's begin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replacement {
    /// The device.
    pub device: String,
    /// The meter that stopped.
    pub old_meter: String,
    /// Its last reading (Unix ms).
    pub old_last: i64,
    /// The meter that started.
    pub new_meter: String,
    /// Its first reading.
    pub new_first: i64,
}

/// A report's content: what is frozen and hashed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportContent {
    /// `meter`, `site` or `customer`.
    pub scope: String,
    /// What it is about.
    pub subject: String,
    /// Period start (Unix ms).
    pub from: i64,
    /// Period end (Unix ms, exclusive).
    pub to: i64,
    /// When it was computed.
    pub generated_at: i64,
    /// Total energy, in Wh.
    pub energy_wh: f64,
    /// Time-weighted completeness over the meters, in percent.
    pub completeness_pct: f64,
    /// Per meter.
    pub meters: Vec<MeterEnergy>,
    /// Meter replacements within the period.
    pub replacements: Vec<Replacement>,
}

impl ReportContent {
    /// The canonical bytes that are frozen and hashed.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Computes a report. `since_start` replaces `from` by each site's reporting start.
pub async fn compute(
    store: &Store,
    org_id: i64,
    scope: &Scope,
    from: i64,
    to: i64,
    since_start: bool,
) -> StoreResult<ReportContent> {
    // (series, the part of the period it is reported for, its site's name)
    let mut parts: Vec<(Series, i64, i64, Option<String>)> = Vec::new();
    match scope {
        Scope::Meter { device, meter } => {
            for channel in ENERGY_CHANNELS {
                let filter = SeriesFilter {
                    device: Some(device.clone()),
                    meter: Some(meter.clone()),
                    channel: Some(channel.into()),
                    ..SeriesFilter::default()
                };
                for s in store.list_series(org_id, &filter).await? {
                    parts.push((s, from, to, None));
                }
            }
        }
        Scope::Site(site) => {
            add_site(store, org_id, site, from, to, since_start, &mut parts).await?;
        }
        Scope::Customer(_, sites) => {
            for site in sites {
                add_site(store, org_id, site, from, to, since_start, &mut parts).await?;
            }
        }
    }
    let mut meters = Vec::new();
    // Each meter's energy in its register's own unit, and that unit's scale, for the total.
    let mut scaled: Vec<(i64, i64)> = Vec::new();
    let mut first_last: Vec<(String, String, i64, i64)> = Vec::new();
    for (series, start, end, site) in parts {
        let (lo, hi) = (
            start.saturating_sub(EDGE_LOOKAROUND_MS),
            end.saturating_add(EDGE_LOOKAROUND_MS),
        );
        let buckets = store
            .buckets(org_id, series.id, Resolution::Minute, lo, hi)
            .await?;
        // Raw points where they are still kept (exact at resets), minute rollups before that.
        let raw = store.points(org_id, series.id, lo, hi).await?;
        let first_raw = raw.first().map(|p| p.ts);
        let mut points: Vec<(i64, i64)> = buckets
            .iter()
            .filter(|b| first_raw.is_none_or(|first| b.last_ts < first))
            .map(|b| (b.last_ts, b.last))
            .collect();
        points.extend(raw.iter().map(|p| (p.ts, p.value)));
        if let (Some(first), Some(last)) = (points.first(), points.last()) {
            first_last.push((series.device.clone(), series.meter.clone(), first.0, last.0));
        }
        let interval = typical_interval(&points);
        let energy = if series.channel == "energy_interval" {
            interval_energy(&points, start, end, interval.unwrap_or(10_000))
        } else {
            let gap_after = interval.map_or(MIN_GAP_MS, |t| (t * 3 / 2).max(MIN_GAP_MS));
            register_energy(&points, start, end, gap_after)
        };
        scaled.push((energy.energy, series.scale));
        meters.push(MeterEnergy {
            device: series.device,
            site,
            meter: series.meter,
            from: start,
            to: end,
            energy_wh: unscale(i128::from(energy.energy), series.scale),
            completeness_pct: energy.completeness_pct,
            minutes_with_data: buckets
                .iter()
                .filter(|b| b.start >= start && b.start < end)
                .count(),
            gaps: energy.gaps,
            flags: energy
                .flags
                .iter()
                .map(|f| ReportFlag::new(f, series.scale))
                .collect(),
        });
    }
    let replacements = replacements(&first_last, from, to);
    let total_time: i64 = meters.iter().map(|m| (m.to - m.from).max(0)).sum();
    let completeness_pct = if total_time == 0 {
        0.0
    } else {
        meters
            .iter()
            .map(|m| m.completeness_pct * (m.to - m.from).max(0) as f64)
            .sum::<f64>()
            / total_time as f64
    };
    Ok(ReportContent {
        scope: scope.kind().into(),
        subject: scope.subject(),
        from,
        to,
        generated_at: now_ms(),
        energy_wh: sum_in_wh(&scaled),
        completeness_pct,
        meters,
        replacements,
    })
}

/// A site's parts of a report: each energy series of each device for the time the device was
/// at the site (from its site history), within the period.
async fn add_site(
    store: &Store,
    org_id: i64,
    site: &Site,
    from: i64,
    to: i64,
    since_start: bool,
    parts: &mut Vec<(Series, i64, i64, Option<String>)>,
) -> StoreResult<()> {
    let start = if since_start {
        site.reporting_start.unwrap_or(from)
    } else {
        from
    };
    for span in store.site_spans(org_id, site.id).await? {
        let (part_from, part_to) = (start.max(span.from), to.min(span.to));
        if part_from >= part_to {
            continue;
        }
        for channel in ENERGY_CHANNELS {
            let filter = SeriesFilter {
                device: Some(span.device.clone()),
                channel: Some(channel.into()),
                ..SeriesFilter::default()
            };
            for s in store.list_series(org_id, &filter).await? {
                parts.push((s, part_from, part_to, Some(site.name.clone())));
            }
        }
    }
    Ok(())
}

/// Within one device, a meter whose last reading comes before another meter's first is taken
/// to have been replaced by it (the nearest such successor).
fn replacements(spans: &[(String, String, i64, i64)], from: i64, to: i64) -> Vec<Replacement> {
    let mut found = Vec::new();
    for (device, meter, _, last) in spans {
        let successor = spans
            .iter()
            .filter(|(d, m, first, _)| d == device && m != meter && *first >= *last)
            .min_by_key(|(_, _, first, _)| *first);
        if let Some((_, new_meter, new_first, _)) = successor
            && *new_first >= from
            && *last < to
        {
            found.push(Replacement {
                device: device.clone(),
                old_meter: meter.clone(),
                old_last: *last,
                new_meter: new_meter.clone(),
                new_first: *new_first,
            });
        }
    }
    found
}

/// The report as CSV: a header comment, one line per meter and a total, then the gaps and the
/// flags.
pub fn to_csv(content: &ReportContent, id: i64, sha256: Option<&str>) -> String {
    let mut out = format!(
        "# Drover energy report {id}: {} {}, {} to {} (Unix ms, end exclusive)\n",
        content.scope, content.subject, content.from, content.to
    );
    if let Some(hash) = sha256 {
        out.push_str(&format!("# frozen; sha256 of the JSON content: {hash}\n"));
    }
    out.push_str("device,site,meter,from_ms,to_ms,energy_wh,completeness_pct,gaps,flags\n");
    for m in &content.meters {
        out.push_str(&format!(
            "{},{},{},{},{},{},{:.3},{},{}\n",
            csv_field(&m.device),
            csv_field(m.site.as_deref().unwrap_or("")),
            csv_field(&m.meter),
            m.from,
            m.to,
            m.energy_wh,
            m.completeness_pct,
            m.gaps.len(),
            m.flags.len()
        ));
    }
    out.push_str(&format!(
        "total,,,{},{},{},{:.3},,\n",
        content.from, content.to, content.energy_wh, content.completeness_pct
    ));
    out.push_str("\n# gaps\ndevice,meter,from_ms,to_ms,seconds\n");
    for m in &content.meters {
        for g in &m.gaps {
            out.push_str(&format!(
                "{},{},{},{},{}\n",
                csv_field(&m.device),
                csv_field(&m.meter),
                g.from_ts,
                g.to_ts,
                (g.to_ts - g.from_ts) / 1000
            ));
        }
    }
    out.push_str("\n# flags\ndevice,meter,kind,from_ms,to_ms,from_wh,to_wh,counted_wh\n");
    for m in &content.meters {
        for f in &m.flags {
            out.push_str(&format!(
                "{},{},{:?},{},{},{},{},{}\n",
                csv_field(&m.device),
                csv_field(&m.meter),
                f.kind,
                f.from_ts,
                f.to_ts,
                f.from_wh,
                f.to_wh,
                f.counted_wh
            ));
        }
    }
    if !content.replacements.is_empty() {
        out.push_str("\n# replacements\ndevice,old_meter,old_last_ms,new_meter,new_first_ms\n");
        for r in &content.replacements {
            out.push_str(&format!(
                "{},{},{},{},{}\n",
                csv_field(&r.device),
                csv_field(&r.old_meter),
                r.old_last,
                csv_field(&r.new_meter),
                r.new_first
            ));
        }
    }
    out
}

/// Quotes a CSV field when it needs it (and defuses formula injection in spreadsheets).
fn csv_field(text: &str) -> String {
    let risky = text.starts_with(['=', '+', '-', '@']);
    if text.contains([',', '"', '\n']) || risky {
        let prefix = if risky { "'" } else { "" };
        format!("\"{prefix}{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacements_pair_a_stopped_meter_with_its_successor() {
        let spans = vec![
            ("d1".into(), "modbus-1".into(), 0, 5_000),
            ("d1".into(), "modbus-2".into(), 6_000, 9_000),
            ("d2".into(), "modbus-3".into(), 0, 9_000),
        ];
        let found = replacements(&spans, 0, 10_000);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].old_meter.as_str(), found[0].new_meter.as_str()),
            ("modbus-1", "modbus-2")
        );
    }

    #[test]
    fn scaled_values_are_converted_to_wh_exactly() {
        assert_eq!(unscale(12_345, -2), 123.45);
        assert_eq!(unscale(7, 3), 7_000.0);
        assert_eq!(unscale(-5, 0), -5.0);
        // 0.1 + 0.2 Wh at scale -1 and 1 kWh at scale 3: added as integers, then converted.
        assert_eq!(sum_in_wh(&[(1, -1), (2, -1), (1, 3)]), 1_000.3);
        assert_eq!(sum_in_wh(&[]), 0.0);
    }

    #[test]
    fn csv_fields_are_quoted_and_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "\"'=cmd()\"");
    }
}
