//! The data-cloud sections of BENCHMARKS.md (issue #3): ingest, bytes on the wire, bytes at
//! rest and queries. Each says what it measures, how, the command, the reference measured in
//! the same run, and whether the goal is met; each names its own run (date, commit), because a
//! single benchmark can rewrite its section alone (`--write`).

use std::fmt::Write as _;

use crate::ingest::{self, EngineRuns};
use crate::machine::Machine;
use crate::stats::median;
use crate::{query, rest, wire};

/// Ingest goal: the hub acknowledges at least this many times the reference's points/s.
pub const INGEST_GOAL: f64 = 1.0;
/// Wire goals, bytes per point all-in (uplink), at 1-minute and 5-minute batches.
pub const WIRE_GOAL_1MIN: f64 = 2.0;
/// See [`WIRE_GOAL_1MIN`].
pub const WIRE_GOAL_5MIN: f64 = 1.2;
/// At-rest goal: bytes per point of raw chunks.
pub const REST_GOAL: f64 = 1.5;
/// Query goal: API latency at most this share of a raw scan's.
pub const QUERY_GOAL: f64 = 0.1;

/// Section 3: durable ingest.
pub fn ingest_section(report: &ingest::Report, machine: &Machine) -> String {
    let o = &report.options;
    let mut out =
        String::from("## 3. Durable telemetry ingest: the hub beside one row per point\n\n");
    out.push_str(&run_line(machine));
    let loads = o
        .loads
        .iter()
        .map(|l| {
            let frame = report
                .engines
                .iter()
                .find(|e| e.load == *l)
                .map_or(f64::NAN, |e| e.mean_frame_bytes);
            format!(
                "`{l}`: {} devices each send {} batches per run, each holding {} min of data \
                 ({} points, {frame:.0} bytes encoded; {} points per run)",
                l.devices,
                l.batches,
                l.minutes,
                l.points_per_batch(),
                l.points_per_run()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let _ = writeln!(
        out,
        "**What is measured.** Telemetry points per second that the hub acknowledges durably, \
         end to end. Devices enrolled through the real device API send batches of a 3-channel \
         meter polled every 2 s (the protocol crate's `synthetic::solar_meter`, every batch a \
         new time range) to `POST /device/v1/batches`, all devices at once, each on its own \
         keep-alive HTTP/1.1 connection (plain HTTP on loopback), one batch after another as \
         the agent's sender does. Loads, as `DEVICESxBATCHESxMINUTES`: {loads}. One-hour \
         batches are a device catching up; one-minute batches are what a connected agent sends. \
         The hub answers `204` only once the writer has committed the batch where it lands \
         (one row of `landed_batches`, group commit), so a `204` is a durable acknowledgement; \
         a `503` (queue full) is retried after `Retry-After` with the same sequence number, and \
         the time it costs counts. *Acknowledged* counts until the last `204`; *queryable* \
         counts until a `GET /api/v1/series` sent after it has answered: a query first folds \
         every landed batch into chunks and rollups, so by then every point is where a query \
         reads it (the folder also folds on its own, in the background, meanwhile). The hub's \
         CPU is counted until queryable, folding included. One `drover hub` per load and engine \
         (release build, default settings: `ingest_queue_capacity` 4096, `ingest_group_max` \
         512, `ingest_fold_delay_ms` 1000, `ingest_fold_batches` 4096, from \
         `crates/drover-hub/src/config.rs`) on SQLite (WAL, `synchronous=FULL`) and on \
         PostgreSQL; the batches are encoded before the clock starts.\n"
    );
    let _ = writeln!(
        out,
        "**Reference.** The same points, in the order they reach the hub (batch after batch, \
         series after series), inserted by this benchmark into the same engine one row per \
         point: `(series_id, ts, value)` with the primary key `(series_id, ts)` that a store \
         needs to read a range and to refuse a resent point, in transactions of {tx} rows. \
         SQLite: a `WITHOUT ROWID` table (the key is the table: no rowid, no second index) in \
         its own file on the same disk, with the hub's settings (WAL, `synchronous=FULL`), \
         filled with prepared multi-row `INSERT`s of 1,000 rows through sqlx. PostgreSQL: a \
         table in the hub's database, filled with `COPY ... FROM STDIN` (text format) through \
         sqlx, the server's fastest bulk path, default durability (`synchronous_commit=on`).\n",
        tx = crate::rawstore::TX_ROWS,
    );
    let _ = writeln!(
        out,
        "**How.** `./target/release/drover-bench ingest --postgres-url \
         postgres://postgres@127.0.0.1:5432/postgres` (part of `all`; without the URL only \
         SQLite is measured; `--ingest-load`, `--ingest-runs`). Per load and engine: one \
         warm-up batch per device (it creates the series), then {runs} runs, hub and \
         reference back to back, alternating which goes first. On PostgreSQL a fresh database \
         `drover_bench_<pid>` is made for each load and dropped after it. *hub / reference* \
         divides the medians; *paired* is the median of the per-run ratios. \"CPU ns/point\" \
         is CPU time (user + system, from `/proc`) per point: of the hub process for the hub, \
         of this benchmark's process (sqlx and SQLite, which runs inside it) for the \
         reference; PostgreSQL's own processes are in neither.\n",
        runs = o.runs,
    );
    out.push_str(
        "| engine | load | hub points/s, acknowledged | hub points/s, queryable | reference points/s | hub / reference | hub / reference, paired | queryable / reference | hub CPU ns/point | reference CPU ns/point | 503 retries |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut verdicts = Vec::new();
    let mut all_met = true;
    for engine in &report.engines {
        let s = IngestSummary::of(engine);
        let _ = writeln!(
            out,
            "| {} | `{}` | {:.0} | {:.0} | {:.0} | **{:.2}** | **{:.2}** | {:.2} | {:.0} | {:.0} | {} |",
            engine.engine,
            engine.load,
            s.hub,
            s.queryable,
            s.raw,
            s.ratio(),
            s.paired,
            s.queryable / s.raw,
            s.cpu_ns,
            s.raw_cpu_ns,
            s.retries
        );
        let lower = s.ratio().min(s.paired);
        all_met &= lower >= INGEST_GOAL;
        verdicts.push(format!(
            "{} `{}`: {} ({lower:.2}×)",
            engine.engine,
            engine.load,
            if lower >= INGEST_GOAL {
                "met"
            } else {
                "**not met**"
            }
        ));
    }
    if let Some(why) = &report.postgres_skipped {
        let _ = writeln!(out, "| PostgreSQL | {why} | | | | | | | | | |");
    }
    let _ = writeln!(
        out,
        "\n**Goal: the hub acknowledges at least {INGEST_GOAL}× the reference's points per \
         second. {}** (judged on the lower of the two ratios) — {}.\n",
        if all_met { "Met" } else { "Not met" },
        verdicts.join("; ")
    );
    let best = report
        .engines
        .iter()
        .map(|e| IngestSummary::of(e).hub)
        .fold(f64::NAN, f64::max);
    let loads_seen = report
        .engines
        .iter()
        .map(|e| {
            format!(
                "{} `{}` {} → {}",
                e.engine, e.load, e.load_average.0, e.load_average.1
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "For scale: telemetry-anchors §5.2 aims at 1,000,000 points/s durable end to end on 2 \
         cores, TLS included (this run is plain HTTP); the best median here is {best:.0}. Load \
         average (1 min) before → after each: {loads_seen}.\n"
    );
    out.push_str("<details><summary>Every run</summary>\n\n");
    out.push_str(
        "| engine | load | run | first | hub points/s, acknowledged | hub points/s, queryable | reference points/s | hub / reference | queryable / reference | hub CPU ns/point | reference CPU ns/point | 503 retries |\n\
         | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for engine in &report.engines {
        for (i, r) in engine.runs.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {} |",
                engine.engine,
                engine.load,
                i + 1,
                if r.hub_first { "hub" } else { "reference" },
                r.hub_points_per_sec,
                r.hub_queryable_points_per_sec,
                r.raw_points_per_sec,
                r.hub_points_per_sec / r.raw_points_per_sec,
                r.hub_queryable_points_per_sec / r.raw_points_per_sec,
                r.hub_cpu_ns_per_point,
                r.raw_cpu_ns_per_point,
                r.retries
            );
        }
    }
    out.push_str("\n</details>\n\n");
    out
}

struct IngestSummary {
    hub: f64,
    queryable: f64,
    raw: f64,
    paired: f64,
    cpu_ns: f64,
    raw_cpu_ns: f64,
    retries: u64,
}

impl IngestSummary {
    fn of(engine: &EngineRuns) -> IngestSummary {
        let m = |f: fn(&ingest::Run) -> f64| med(&engine.runs.iter().map(f).collect::<Vec<_>>());
        IngestSummary {
            hub: m(|r| r.hub_points_per_sec),
            queryable: m(|r| r.hub_queryable_points_per_sec),
            raw: m(|r| r.raw_points_per_sec),
            paired: m(|r| r.hub_points_per_sec / r.raw_points_per_sec),
            cpu_ns: m(|r| r.hub_cpu_ns_per_point),
            raw_cpu_ns: m(|r| r.raw_cpu_ns_per_point),
            retries: engine.runs.iter().map(|r| r.retries).sum(),
        }
    }

    fn ratio(&self) -> f64 {
        self.hub / self.raw
    }
}

/// Section 4: bytes on the wire.
pub fn wire_section(report: &wire::Report, machine: &Machine) -> String {
    let o = &report.options;
    let mut out = String::from("## 4. Bytes per point on the wire\n\n");
    out.push_str(&run_line(machine));
    let _ = writeln!(
        out,
        "**What is measured.** Every byte a device and the hub exchange to deliver telemetry, \
         counted as IP packets (IPv4 and TCP headers included, TCP options too) captured by \
         tcpdump on the loopback interface ({tool}), uplink (device → hub) and downlink \
         separately. The device sends the synthetic 3-channel meter polled every 2 s \
         (`synthetic::solar_meter`) as Drover batches over HTTPS, either as stream frames on \
         the telemetry stream (`POST /device/v1/batches/stream`, each frame written against the \
         one before it, a confirmation asked for every 5 minutes of batches, as the agent does \
         by default) or as plain frames, one `POST /device/v1/batches` each, \
         to a `drover hub --tls-self-signed` (TLS 1.3, trusting the hub's local CA), in \
         1-minute batches (30 polls, 90 points) and 5-minute batches (150 polls, 450 points). \
         The client is set up as the agent's (`drover-agent/src/client.rs`): reqwest with \
         rustls and ring, the safe default TLS versions, ALPN offering `h2` and `http/1.1` (so \
         HTTP/2, which the hub accepts over TLS), the agent's `User-Agent`, \
         `Authorization: Bearer`, one keep-alive connection reused from batch to batch (the \
         agent keeps an idle connection 10 minutes). Beside it, the same readings in the seed's JSON \
         (`POST /seed/<secret>/modbusnotification` with `{{deviceId, measurements: \
         [{{serialNumber, energy, time}}]}}`, on a fleet with the seed protocol on) sent by the \
         same client on the same kind of connection, so only the body differs. The seed's \
         format carries the energy register only, so it is compared like for like with a \
         Drover batch holding the energy channel only, both per *energy reading*; the \
         3-channel Drover batch is per point.\n",
        tool = report.tcpdump_version,
    );
    let _ = writeln!(
        out,
        "**How.** `./target/release/drover-bench wire` (part of `all`; `--wire-batches`, \
         `--wire-gap-ms`; needs tcpdump and root or CAP_NET_RAW). Each kind has its own device \
         and connection: its first batch opens the connection (TCP and a full TLS handshake), \
         then {n} steady-state batches are sent {gap} ms apart (longer than Linux's delayed-ACK \
         timer, so every ACK goes out on its own as it does between batches a minute apart), \
         then the connection is dropped and one more batch goes out on a new connection, which \
         resumes the TLS session. *Steady* is the mean over the {n} steady batches (byte counts \
         do not depend on the machine's load, so one run is enough). *Setup* is what a \
         connection cost besides its batches (handshakes and teardown); *amortised over 1 h* \
         adds one full setup per hour of batches; *new connection per batch* adds a resumed \
         setup to every batch. That last column is what a device pays when the network (a \
         NAT that forgets idle flows) drops the connection between batches: the agent keeps an \
         idle connection for 10 minutes and the hub keeps an idle HTTP/2 connection open, \
         pinging it only after 15 minutes of silence (HTTP/1.1 clients are closed after 30 s idle: hyper's header-read timeout, \
         `HEADER_TIMEOUT` in `crates/drover-hub/src/server.rs`, also runs between requests).\n",
        n = o.batches,
        gap = o.gap.as_millis(),
    );
    out.push_str(
        "| format | batch | readings / batch | body bytes | uplink bytes / batch | **uplink B / reading, steady** | uplink, setup amortised over 1 h | uplink, new connection per batch | both directions, steady | both, setup amortised over 1 h |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for k in &report.kinds {
        let points = k.points as f64;
        let hour = k.per_hour();
        let both = k.up.bytes + k.down.bytes;
        let _ = writeln!(
            out,
            "| {} | {} min | {} {}s | {:.0} | {:.0} | **{:.2}** | {:.2} | {:.2} | {:.2} | {:.2} |",
            k.format.name(),
            k.minutes,
            k.points,
            k.format.unit(),
            k.body_bytes,
            k.up.bytes,
            k.up.bytes / points,
            (k.full_setup.up + hour * k.up.bytes) / (hour * points),
            (k.resumed_setup.up + k.up.bytes) / points,
            both / points,
            (k.full_setup.up + k.full_setup.down + hour * both) / (hour * points),
        );
    }
    out.push('\n');
    let verdict = |minutes: u32, goal: f64| -> (String, bool) {
        match report
            .kinds
            .iter()
            .find(|k| k.format == wire::Format::DroverStream && k.minutes == minutes)
        {
            Some(k) => {
                let steady = k.up.bytes / k.points as f64;
                let hour = k.per_hour();
                let amortised = (k.full_setup.up + hour * k.up.bytes) / (hour * k.points as f64);
                let ok = steady <= goal;
                (
                    format!(
                        "{minutes}-minute batches: **{steady:.2} B/point, {}** (goal ≤ {goal}; \
                         {:+.0} %); with the handshake amortised over an hour {amortised:.2}",
                        if ok { "met" } else { "not met" },
                        (steady / goal - 1.0) * 100.0
                    ),
                    ok,
                )
            }
            None => (format!("{minutes}-minute batches: not measured"), false),
        }
    };
    let reconnect = |minutes: u32| -> String {
        report
            .kinds
            .iter()
            .find(|k| k.format == wire::Format::DroverStream && k.minutes == minutes)
            .map_or_else(
                || "?".to_string(),
                |k| format!("{:.2}", (k.resumed_setup.up + k.up.bytes) / k.points as f64),
            )
    };
    let (one, one_ok) = verdict(1, WIRE_GOAL_1MIN);
    let (five, five_ok) = verdict(5, WIRE_GOAL_5MIN);
    let _ = writeln!(
        out,
        "**Goal: at most {WIRE_GOAL_1MIN} bytes per point all-in at 1-minute batches and \
         {WIRE_GOAL_5MIN} at 5-minute batches, counted uplink on a kept-alive connection (as \
         telemetry-anchors §2.3 counts), judged on the telemetry stream the agent uses by \
         default. {}.** {one}; {five}. With a new (resumed) \
         connection for every batch: {} at 1-minute and {} at 5-minute batches.\n",
        match (one_ok, five_ok) {
            (true, true) => "Met",
            (false, false) => "Not met",
            _ => "Met at one batch size only",
        },
        reconnect(1),
        reconnect(5),
    );
    if let Some(k) = report
        .kinds
        .iter()
        .find(|k| k.format == wire::Format::DroverStream && k.minutes == 1)
    {
        let tls = k.up.tls_records * f64::from(wire::TLS13_RECORD_OVERHEAD);
        let head = k.up.payload_bytes - tls - k.body_bytes;
        let share = |part: f64| part / k.up.bytes * 100.0;
        let _ = writeln!(
            out,
            "On the stream at 1-minute batches the uplink's {:.0} bytes per batch are: HTTP/2 \
             framing and the message varint {head:.0} ({:.0} %), TCP/IP headers of the batch's \
             segment and of the ACKs of the hub's confirmations {:.0} ({:.0} %), the batch \
             itself {:.0} ({:.0} %), the TLS records {tls:.0} ({:.0} %).\n",
            k.up.bytes,
            share(head),
            k.up.data_header_bytes + k.up.ack_bytes,
            share(k.up.data_header_bytes + k.up.ack_bytes),
            k.body_bytes,
            share(k.body_bytes),
            share(tls),
        );
    }
    out.push_str(
        "**Where the bytes go**, per steady batch (uplink: the request; downlink: the `204` \
         and ACKs). *HTTP head* is the TLS plaintext minus the body; *TLS records* counts \
         22 bytes per TLS 1.3 record (5-byte header, content type, 16-byte tag); *TCP/IP* is \
         the IPv4 and TCP headers (with options) of the packets that carry data; *pure ACKs* \
         are the packets without payload.\n\n\
         | format | batch | direction | body | HTTP head | TLS records | TCP/IP headers | pure ACKs | total |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for k in &report.kinds {
        for (direction, t, body) in [("up", &k.up, k.body_bytes), ("down", &k.down, 0.0)] {
            let tls = t.tls_records * f64::from(wire::TLS13_RECORD_OVERHEAD);
            let head = t.payload_bytes - tls - body;
            let _ = writeln!(
                out,
                "| {} | {} min | {direction} | {body:.0} | {head:.0} | {tls:.0} ({:.1} records) | {:.0} ({:.1} packets) | {:.0} ({:.1}) | {:.0} |",
                k.format.name(),
                k.minutes,
                t.tls_records,
                t.data_header_bytes,
                t.packets - t.ack_packets,
                t.ack_bytes,
                t.ack_packets,
                t.bytes,
            );
        }
    }
    out.push_str(
        "\n**Connection setup and teardown**, bytes besides the batches it carried:\n\n\
         | format | batch | full TLS handshake, up | down | resumed TLS session, up | down |\n\
         | --- | --- | ---: | ---: | ---: | ---: |\n",
    );
    for k in &report.kinds {
        let _ = writeln!(
            out,
            "| {} | {} min | {:.0} | {:.0} | {:.0} | {:.0} |",
            k.format.name(),
            k.minutes,
            k.full_setup.up,
            k.full_setup.down,
            k.resumed_setup.up,
            k.resumed_setup.down,
        );
    }
    out.push_str(
        "\nOn loopback the MTU is 64 KiB, so a handshake's certificate flight travels in fewer, \
         larger segments than on a real link (MSS 1448): a few more 52-byte headers there. \
         The batches themselves fit one segment either way.\n\n",
    );
    out
}

/// Section 5: bytes at rest.
pub fn rest_section(report: &rest::Report, machine: &Machine) -> String {
    let o = &report.options;
    let points = report.points as f64;
    let per = |bytes: u64| bytes as f64 / points;
    let mut out = String::from("## 5. Bytes per point at rest\n\n");
    out.push_str(&run_line(machine));
    let _ = writeln!(
        out,
        "**What is measured.** {devices} devices, each with its own 3-channel meter polled \
         every 2 s (`synthetic::solar_meter`), send {hours} hours of data each as one-hour \
         batches through the real device API to one `drover hub` on SQLite ({points} points in \
         all, every one acknowledged). The hub is then stopped (SIGTERM) and its `drover.db` \
         opened read-only: the bytes of the `chunks` table's blobs (the compressed raw points, \
         one row per series per hour), and the size of the whole database file (chunks and \
         their keys, the 1-minute, 1-hour and 1-day rollups, series, devices; the WAL is \
         checkpointed on shutdown), each divided by the points. The reference is the same \
         points stored one row per point in SQLite (`(series_id, ts, value)`, `WITHOUT ROWID`, \
         primary key `(series_id, ts)`, see section 3), whose file size is divided the same \
         way. Sizes do not depend on the machine's load, so one run is enough.\n",
        devices = 1 + o.devices,
        hours = o.hours,
        points = report.points,
    );
    let _ = writeln!(
        out,
        "**How.** `./target/release/drover-bench rest` (part of `all`; `--rest-hours`, \
         `--rest-devices`).\n"
    );
    let chunk_bpp = per(report.chunk_bytes);
    let _ = writeln!(
        out,
        "| measure | bytes | bytes per point | goal | met |\n| --- | ---: | ---: | ---: | --- |\n\
         | raw chunks ({chunks} rows) | {} | **{chunk_bpp:.3}** | ≤ {REST_GOAL} | {} |\n\
         | rollups (1 min, 1 h, 1 d) | {} | {:.3} | | |\n\
         | hub database file, whole | {} | **{:.2}** | | |\n\
         | reference: one row per point, file | {} | {:.2} | | |\n\
         | hub file / reference file | | **{:.3}** | | |\n",
        report.chunk_bytes,
        yes_no(chunk_bpp <= REST_GOAL),
        report.rollup_bytes,
        per(report.rollup_bytes),
        report.hub_file_bytes,
        per(report.hub_file_bytes),
        report.raw_file_bytes,
        per(report.raw_file_bytes),
        report.hub_file_bytes as f64 / report.raw_file_bytes as f64,
        chunks = report.chunks,
    );
    let channels = report
        .per_channel
        .iter()
        .map(|(channel, points, bytes)| {
            format!("`{channel}` {:.3}", *bytes as f64 / (*points).max(1) as f64)
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "**Goal: raw chunks at most {REST_GOAL} bytes per point. {}** ({chunk_bpp:.3}). Chunk \
         bytes per point by channel: {channels}.\n",
        met(chunk_bpp <= REST_GOAL)
    );
    out
}

/// Section 6: query latency.
pub fn query_section(report: &query::Report, machine: &Machine) -> String {
    let o = &report.options;
    let m = |f: fn(&query::Run) -> f64| med(&report.runs.iter().map(f).collect::<Vec<_>>());
    let (api50, api99) = (m(|r| r.api_1m.p50), m(|r| r.api_1m.p99));
    let (scan50, scan99) = (m(|r| r.scan.p50), m(|r| r.scan.p99));
    let (raw50, raw99) = (m(|r| r.api_raw.p50), m(|r| r.api_raw.p99));
    let paired50 = m(|r| r.api_1m.p50 / r.scan.p50);
    let paired99 = m(|r| r.api_1m.p99 / r.scan.p99);
    let mut out = String::from("## 6. Query: 24 hours of one series at 1-minute resolution\n\n");
    out.push_str(&run_line(machine));
    let _ = writeln!(
        out,
        "**What is measured.** The latency, seen by the client, of `GET \
         /api/v1/series/{{id}}/data?resolution=1m&from=…&to=…` (admin token; the average of \
         each minute, answered from the hub's 1-minute rollups) over one day of one series \
         (the power channel of a 3-channel meter polled every 2 s: {points} points, \
         ingested first as 24 one-hour batches through the device API); {buckets} buckets, \
         a JSON body of {body1} bytes. One `drover hub` on SQLite, plain HTTP on loopback, one \
         keep-alive connection, one request at a time. The reference is the same question put \
         to the same points stored one row per point in SQLite (`WITHOUT ROWID`, primary key \
         `(series_id, ts)`, see section 3) and answered by scanning them: `SELECT ts / 60000, \
         avg(value) … WHERE series_id = ? AND ts >= ? AND ts < ? GROUP BY 1` through sqlx, \
         from this process (no HTTP, no JSON), warm cache. For context, the same day at raw \
         resolution through the API ({points} points, {bodyraw} bytes of JSON).\n",
        points = report.points,
        buckets = report.buckets,
        body1 = report.body_bytes_1m,
        bodyraw = report.body_bytes_raw,
    );
    let _ = writeln!(
        out,
        "**How.** `./target/release/drover-bench query` (part of `all`; `--query-requests`, \
         `--query-runs`). {runs} runs, each {requests} requests of the API at 1-minute \
         resolution and {raw_requests} at raw resolution, and {requests} scans of the \
         reference, alternating which goes first; p50 and p99 per run, then the median over \
         runs. *API / scan* divides the medians; *paired* is the median of the per-run \
         ratios. Load average (1 min) before and after: {la0} → {la1}.\n",
        runs = o.runs,
        requests = o.requests,
        raw_requests = o.requests.div_ceil(4),
        la0 = report.load_average.0,
        la1 = report.load_average.1,
    );
    let _ = writeln!(
        out,
        "| query | p50 | p99 | p50 / scan | p99 / scan | p50 / scan, paired | p99 / scan, paired |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | API, 1-minute resolution | {} | {} | **{:.3}** | **{:.3}** | {paired50:.3} | {paired99:.3} |\n\
         | reference: scan of one row per point | {} | {} | 1 | 1 | | |\n\
         | API, raw resolution (context) | {} | {} | {:.2} | {:.2} | | |\n",
        ms(api50),
        ms(api99),
        api50 / scan50,
        api99 / scan99,
        ms(scan50),
        ms(scan99),
        ms(raw50),
        ms(raw99),
        raw50 / scan50,
        raw99 / scan99,
    );
    let worst = [api50 / scan50, api99 / scan99, paired50, paired99]
        .into_iter()
        .fold(f64::NAN, f64::max);
    let _ = writeln!(
        out,
        "**Goal: the API's latency at most {QUERY_GOAL}× the raw scan's. {}** (the worst of \
         the four ratios: {worst:.3}). For scale, telemetry-anchors §5.2 asks for p99 ≤ 50 ms \
         at the HTTP API including JSON: {}, p99 {} here.\n",
        met(worst <= QUERY_GOAL),
        if api99 <= 50.0 { "met" } else { "not met" },
        ms(api99),
    );
    out.push_str("<details><summary>Every run</summary>\n\n");
    out.push_str(
        "| run | first | API 1m p50 | API 1m p99 | scan p50 | scan p99 | API raw p50 | API raw p99 |\n\
         | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (i, r) in report.runs.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            if r.api_first { "API" } else { "scan" },
            ms(r.api_1m.p50),
            ms(r.api_1m.p99),
            ms(r.scan.p50),
            ms(r.scan.p99),
            ms(r.api_raw.p50),
            ms(r.api_raw.p99),
        );
    }
    out.push_str("\n</details>\n\n");
    out
}

/// The run a section comes from.
fn run_line(machine: &Machine) -> String {
    format!(
        "*Run {}{} on the machine above.*\n\n",
        machine.date,
        machine
            .commit
            .as_ref()
            .map(|c| format!(", commit `{c}`"))
            .unwrap_or_default()
    )
}

fn med(values: &[f64]) -> f64 {
    median(values).unwrap_or(f64::NAN)
}

fn met(ok: bool) -> &'static str {
    if ok { "Met" } else { "Not met" }
}

fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

fn ms(value: f64) -> String {
    format!("{value:.2} ms")
}
