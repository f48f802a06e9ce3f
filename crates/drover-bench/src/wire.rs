//! Bytes per point on the wire, all-in: a device sends the synthetic 3-channel meter's
//! readings in 1-minute and 5-minute batches over HTTPS to a hub with its own local CA, on one
//! keep-alive connection, with a client set up as the agent's (reqwest, rustls with ring,
//! ALPN `h2` so HTTP/2, the agent's `User-Agent`); tcpdump captures every packet on the loopback
//! interface, and the IP packets' bytes (IP and TCP headers included) are counted uplink and
//! downlink. Beside it, the same energy readings in the seed's JSON format
//! (`POST /seed/<secret>/modbusnotification`) on the same kind of connection.
//!
//! Each kind of batch gets its own device and connection. The first batch opens the connection
//! (TCP and full TLS handshake); the next ones are the steady state, sent `gap` apart so that
//! every delayed ACK goes out on its own, as it would between batches a minute apart; then the
//! connection is dropped and one more batch goes out on a new one, which resumes the TLS session.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use drover_protocol::batch::stream::StreamContext;
use drover_protocol::batch::{self, Batch, synthetic};
use drover_protocol::reading::{Channel, Reading};
use reqwest::StatusCode;

use crate::children::{self, Child};
use crate::device::{self, EnrolledDevice};
use crate::hub::{self, Hub, HubOptions};
use crate::meter::{self, Meter};
use crate::pcap::{self, Packet};

/// The fleet the devices enrol in.
const FLEET: &str = "bench-wire";
/// The `User-Agent` the agent sends (`drover-agent/src/client.rs`).
const USER_AGENT: &str = concat!("drover-agent/", env!("CARGO_PKG_VERSION"));
/// Bytes a TLS 1.3 record adds to what it carries: a 5-byte header, the inner content type and
/// the 16-byte AEAD tag.
pub const TLS13_RECORD_OVERHEAD: u32 = 22;
/// How long tcpdump may take to start capturing.
const CAPTURE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Steady-state batches per kind.
    pub batches: usize,
    /// Time between batches.
    pub gap: Duration,
}

/// How a kind of batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Drover's binary batches with all three channels on the telemetry stream, confirmed every
    /// 5 minutes as the agent does by default.
    DroverStream,
    /// Drover's binary batch with all three channels, a request each.
    Drover,
    /// Drover's binary batch with the energy register only (like for like with the seed).
    DroverEnergy,
    /// The seed's JSON (`modbusnotification`), which carries the energy register only.
    SeedJson,
}

impl Format {
    /// How it is named in the report.
    pub fn name(self) -> &'static str {
        match self {
            Format::DroverStream => "Drover stream, 3 channels",
            Format::Drover => "Drover batch, 3 channels",
            Format::DroverEnergy => "Drover batch, energy only",
            Format::SeedJson => "seed JSON, energy only",
        }
    }

    /// What its points are called in the report.
    pub fn unit(self) -> &'static str {
        match self {
            Format::Drover | Format::DroverStream => "point",
            Format::DroverEnergy | Format::SeedJson => "energy reading",
        }
    }
}

/// The agent's default `ack_interval`: the stream asks the hub to confirm every this many
/// minutes of batches.
pub const ACK_INTERVAL_MINUTES: u32 = 5;

/// The kinds measured: each format at 1-minute and 5-minute batches.
pub const KINDS: [(Format, u32); 8] = [
    (Format::DroverStream, 1),
    (Format::DroverStream, 5),
    (Format::Drover, 1),
    (Format::Drover, 5),
    (Format::DroverEnergy, 1),
    (Format::DroverEnergy, 5),
    (Format::SeedJson, 1),
    (Format::SeedJson, 5),
];

/// Bytes and packets of one direction, per batch in the steady state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// IP bytes.
    pub bytes: f64,
    /// Packets.
    pub packets: f64,
    /// IP and TCP header bytes of the packets that carry data.
    pub data_header_bytes: f64,
    /// TLS records.
    pub tls_records: f64,
    /// TCP payload bytes (TLS records).
    pub payload_bytes: f64,
    /// Bytes of packets with no payload (pure ACKs).
    pub ack_bytes: f64,
    /// Packets with no payload.
    pub ack_packets: f64,
}

/// Connection overhead: bytes a connection cost besides its batches (handshakes, teardown).
#[derive(Debug, Clone, Copy, Default)]
pub struct Overhead {
    /// Uplink bytes.
    pub up: f64,
    /// Downlink bytes.
    pub down: f64,
}

/// The figures of one kind.
#[derive(Debug, Clone)]
pub struct KindReport {
    /// The format.
    pub format: Format,
    /// Minutes per batch.
    pub minutes: u32,
    /// Points per batch.
    pub points: usize,
    /// Mean request body bytes.
    pub body_bytes: f64,
    /// Uplink, per steady batch.
    pub up: Traffic,
    /// Downlink, per steady batch.
    pub down: Traffic,
    /// A new connection with a full TLS handshake (and its teardown).
    pub full_setup: Overhead,
    /// A new connection that resumes the TLS session.
    pub resumed_setup: Overhead,
}

impl KindReport {
    /// Batches per hour.
    pub fn per_hour(&self) -> f64 {
        60.0 / f64::from(self.minutes)
    }
}

/// Everything measured.
#[derive(Debug)]
pub struct Report {
    /// What was asked.
    pub options: Options,
    /// Each kind.
    pub kinds: Vec<KindReport>,
    /// The capture tool's version.
    pub tcpdump_version: String,
}

/// The batches of one kind, ready to send: request bodies and where they go.
struct Prepared {
    /// On the telemetry stream, confirmed every this many batches; `None`: a request each.
    stream_ack_every: Option<usize>,
    bodies: Vec<Vec<u8>>,
    url: String,
    credential: Option<String>,
    content_type: &'static str,
    expect: StatusCode,
    points: usize,
}

/// Starts an HTTPS hub and tcpdump, sends every kind, and counts the captured bytes.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let tcpdump = children::system_tool("tcpdump")
        .context("the wire benchmark captures packets with tcpdump (apt-get install tcpdump)")?;
    let work = tempfile::tempdir().context("making the hub's data directory")?;
    let hub_options = HubOptions {
        tls: true,
        database_url: None,
    };
    let hub = Hub::start_with(&work.path().join("hub"), &hub_options).await?;
    eprintln!("hub at {} (pid {})", hub.url, hub.pid());
    let port: u16 = hub
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .with_context(|| format!("no port in the hub's URL {}", hub.url))?;
    let ca_file = hub.ca_file.clone().context("the hub made no CA")?;
    let provisioning_key = hub.create_fleet(FLEET, 3600).await?;
    let fleet = hub
        .patch_fleet(FLEET, serde_json::json!({"seed_protocol": true}))
        .await?;
    let seed_base = fleet["seed_base_path"]
        .as_str()
        .context("the fleet shows no seed_base_path after turning the seed protocol on")?
        .to_string();

    let mut prepared = Vec::new();
    for (format, minutes) in KINDS {
        let device = device::enrol(hub.http(), &hub.url, &provisioning_key).await?;
        prepared.push(prepare(
            &hub,
            &seed_base,
            &device,
            format,
            minutes,
            options.batches,
        )?);
    }

    let capture_file = work.path().join("wire.pcap");
    let capture = start_capture(&tcpdump, &capture_file, port).await?;
    let mut windows = Vec::new();
    for ((format, minutes), kind) in KINDS.into_iter().zip(&prepared) {
        eprintln!("sending {} at {minutes}-minute batches...", format.name());
        windows.push(send_kind(&ca_file, kind, &options).await?);
    }
    // tcpdump writes each packet as it comes; give the last ones a moment, then stop it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = capture.terminate(Duration::from_secs(5)).await?;
    hub.stop().await?;
    let bytes = std::fs::read(&capture_file)
        .with_context(|| format!("reading {}", capture_file.display()))?;
    let packets = pcap::parse(&bytes)?;

    let mut kinds = Vec::new();
    for (((format, minutes), kind), window) in KINDS.into_iter().zip(&prepared).zip(&windows) {
        let body_bytes =
            kind.bodies.iter().map(Vec::len).sum::<usize>() as f64 / kind.bodies.len() as f64;
        kinds.push(account(
            &packets,
            port,
            window,
            options.batches,
            KindReport {
                format,
                minutes,
                points: kind.points,
                body_bytes,
                up: Traffic::default(),
                down: Traffic::default(),
                full_setup: Overhead::default(),
                resumed_setup: Overhead::default(),
            },
        )?);
    }
    Ok(Report {
        options,
        kinds,
        tcpdump_version: crate::machine::tool_version(&tcpdump, "--version").await,
    })
}

/// Builds the bodies of one kind: the first batch, `batches` steady ones and the one sent on
/// a new connection.
fn prepare(
    hub: &Hub,
    seed_base: &str,
    device: &EnrolledDevice,
    format: Format,
    minutes: u32,
    batches: usize,
) -> anyhow::Result<Prepared> {
    let polls_per_batch = minutes as usize * 30;
    let count = batches + 2;
    let hours = (count * polls_per_batch).div_ceil(meter::POLLS_PER_HOUR) as u32;
    let meter = Meter::new(7, meter::first_hour_ending_now(hours));
    let readings: Vec<Reading> = (0..hours)
        .flat_map(|h| meter.hour(h))
        .filter(|r| {
            matches!(format, Format::Drover | Format::DroverStream)
                || r.channel == Channel::EnergyImport
        })
        .collect();
    let per_batch = readings.len() / (hours as usize * 60 / minutes as usize);
    let mut bodies = Vec::with_capacity(count);
    // On the stream, frames are written against the ones before them on the same stream, as
    // the agent does: the device is new, so the first stream opens with Drover-Last-Seq 0; the
    // last batch goes on a second stream, which opens with the seq before it.
    let mut context = StreamContext::new(device.id.clone(), 0);
    for (i, chunk) in readings.chunks(per_batch).take(count).enumerate() {
        let batch = Batch {
            device: device.id.clone(),
            seq: i as u64 + 1,
            readings: chunk.to_vec(),
        };
        let body = match format {
            Format::DroverStream => {
                if i + 1 == count {
                    context = StreamContext::new(device.id.clone(), i as u64);
                }
                context.encode(&batch).context("encoding a batch")?
            }
            Format::Drover | Format::DroverEnergy => {
                batch::encode(&batch).context("encoding a batch")?
            }
            Format::SeedJson => seed_body(&format!("bench-seed-{minutes}m"), chunk)?,
        };
        bodies.push(body);
    }
    let (url, credential, content_type, expect) = match format {
        Format::SeedJson => (
            format!("{}{seed_base}/modbusnotification", hub.url),
            None,
            "application/json",
            StatusCode::OK,
        ),
        Format::DroverStream => (
            format!("{}/device/v1/batches/stream", hub.url),
            Some(device.credential.clone()),
            batch::stream::CONTENT_TYPE,
            StatusCode::OK,
        ),
        _ => (
            format!("{}/device/v1/batches", hub.url),
            Some(device.credential.clone()),
            batch::CONTENT_TYPE,
            StatusCode::NO_CONTENT,
        ),
    };
    Ok(Prepared {
        stream_ack_every: (format == Format::DroverStream)
            .then(|| (ACK_INTERVAL_MINUTES / minutes).max(1) as usize),
        bodies,
        url,
        credential,
        content_type,
        expect,
        points: per_batch,
    })
}

/// The seed meter reader's body: `{deviceId, measurements: [{serialNumber, energy, time}]}`,
/// the register in Wh and the time in ISO 8601 with milliseconds, as the seed sent them.
fn seed_body(device_id: &str, readings: &[Reading]) -> anyhow::Result<Vec<u8>> {
    let serial = synthetic::METER.trim_start_matches("modbus-");
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let measurements = readings
        .iter()
        .map(|r| {
            let t =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.ts_ms) * 1_000_000)
                    .context("a reading's time is out of range")?;
            Ok(serde_json::json!({
                "serialNumber": serial,
                "energy": r.value,
                "time": t.format(&format).context("formatting a time")?,
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    serde_json::to_vec(&serde_json::json!({"deviceId": device_id, "measurements": measurements}))
        .context("encoding a seed body")
}

/// When each phase of one kind began (Unix microseconds).
struct Window {
    start: i64,
    steady_start: i64,
    steady_end: i64,
    end: i64,
}

/// Sends one kind's bodies: the first on a new connection, the steady ones on it, the last on
/// a second connection that can resume the first's TLS session.
async fn send_kind(ca_file: &Path, kind: &Prepared, options: &Options) -> anyhow::Result<Window> {
    let mut tls = hub::rustls_config_trusting(ca_file)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let client = |tls: rustls::ClientConfig| {
        // The agent's client settings (drover-agent/src/client.rs).
        reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(15))
            .pool_idle_timeout(Duration::from_secs(600))
            .tls_backend_preconfigured(tls)
            .build()
            .context("building the device's HTTPS client")
    };
    let (first, rest) = kind.bodies.split_first().context("no batches")?;
    let (last, steady) = rest.split_last().context("no batches")?;
    let start = now_us();
    let http = client(tls.clone())?;
    let steady_start;
    let steady_end;
    if let Some(every) = kind.stream_ack_every {
        let mut stream = Stream::open(&http, kind).await?;
        stream.send(first, true).await?;
        tokio::time::sleep(options.gap).await;
        steady_start = now_us();
        for (i, body) in steady.iter().enumerate() {
            stream.send(body, (i + 1) % every == 0).await?;
            tokio::time::sleep(options.gap).await;
        }
        steady_end = now_us();
        drop(stream);
        drop(http);
        tokio::time::sleep(options.gap).await;
        let http = client(tls)?;
        let mut stream = Stream::open(&http, kind).await?;
        stream.send(last, true).await?;
        tokio::time::sleep(options.gap).await;
        drop(stream);
        drop(http);
    } else {
        send(&http, kind, first).await?;
        tokio::time::sleep(options.gap).await;
        steady_start = now_us();
        for body in steady {
            send(&http, kind, body).await?;
            tokio::time::sleep(options.gap).await;
        }
        steady_end = now_us();
        drop(http);
        tokio::time::sleep(options.gap).await;
        let http = client(tls)?;
        send(&http, kind, last).await?;
        tokio::time::sleep(options.gap).await;
        drop(http);
    }
    tokio::time::sleep(options.gap).await;
    Ok(Window {
        start,
        steady_start,
        steady_end,
        end: now_us(),
    })
}

/// The telemetry stream as the agent drives it (`drover-agent/src/client.rs`).
struct Stream {
    body: tokio::sync::mpsc::Sender<Vec<u8>>,
    response: reqwest::Response,
    buf: Vec<u8>,
}

impl Stream {
    async fn open(http: &reqwest::Client, kind: &Prepared) -> anyhow::Result<Stream> {
        let (body, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        let stream = futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx).map(|m| m.map(Ok::<_, std::io::Error>))
        });
        let mut request = http
            .post(&kind.url)
            .header(reqwest::header::CONTENT_TYPE, kind.content_type)
            .body(reqwest::Body::wrap_stream(stream));
        if let Some(credential) = &kind.credential {
            request = request.bearer_auth(credential);
        }
        let response = request.send().await.context("opening the stream")?;
        if response.status() != kind.expect {
            bail!("the stream was answered {}", response.status());
        }
        Ok(Stream {
            body,
            response,
            buf: Vec::new(),
        })
    }

    /// Sends one batch; when `ask`, waits for the hub's confirmation.
    async fn send(&mut self, frame: &[u8], ask: bool) -> anyhow::Result<()> {
        let mut message = Vec::new();
        batch::stream::encode_message(frame, ask, &mut message);
        self.body
            .send(message)
            .await
            .map_err(|_| anyhow::anyhow!("the stream ended"))?;
        if !ask {
            return Ok(());
        }
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let reply: serde_json::Value = serde_json::from_slice(&line)?;
                if reply.get("stored").is_none() {
                    bail!("the hub refused a batch on the stream: {reply}");
                }
                return Ok(());
            }
            let chunk = self
                .response
                .chunk()
                .await
                .context("reading the stream's replies")?
                .context("the hub ended the stream")?;
            self.buf.extend_from_slice(&chunk);
        }
    }
}

async fn send(http: &reqwest::Client, kind: &Prepared, body: &[u8]) -> anyhow::Result<()> {
    let mut request = http
        .post(&kind.url)
        .header(reqwest::header::CONTENT_TYPE, kind.content_type)
        .body(body.to_vec());
    if let Some(credential) = &kind.credential {
        request = request.bearer_auth(credential);
    }
    let response = request.send().await.context("sending a batch over HTTPS")?;
    let status = response.status();
    let answer = response.bytes().await.context("reading the answer")?;
    if status != kind.expect {
        bail!(
            "a batch was answered {status}, not {}: {}",
            kind.expect,
            String::from_utf8_lossy(&answer)
        );
    }
    Ok(())
}

/// Counts one kind's packets: the steady state per batch, and what each connection cost
/// besides its batches.
fn account(
    packets: &[Packet],
    port: u16,
    window: &Window,
    steady_batches: usize,
    mut report: KindReport,
) -> anyhow::Result<KindReport> {
    let in_window: Vec<&Packet> = packets
        .iter()
        .filter(|p| p.ts_us >= window.start && p.ts_us < window.end)
        .collect();
    // The client's port of each connection, in the order they were opened.
    let connections: Vec<u16> = in_window
        .iter()
        .filter(|p| p.syn && p.dst_port == port)
        .map(|p| p.src_port)
        .collect();
    let [first, second] = connections[..] else {
        bail!(
            "expected 2 connections for {} at {} min, the capture shows {}",
            report.format.name(),
            report.minutes,
            connections.len()
        );
    };
    // Only the first connection's packets: the hub may close an idle connection of the
    // benchmark's own management client meanwhile.
    let steady: Vec<&Packet> = in_window
        .iter()
        .copied()
        .filter(|p| p.ts_us >= window.steady_start && p.ts_us < window.steady_end)
        .filter(|p| p.src_port == first || p.dst_port == first)
        .collect();
    let n = steady_batches as f64;
    report.up = traffic(steady.iter().copied().filter(|p| p.dst_port == port), n);
    report.down = traffic(steady.iter().copied().filter(|p| p.src_port == port), n);
    let total = |client: u16, up: bool| -> f64 {
        in_window
            .iter()
            .filter(|p| {
                if up {
                    p.src_port == client && p.dst_port == port
                } else {
                    p.src_port == port && p.dst_port == client
                }
            })
            .map(|p| f64::from(p.ip_bytes))
            .sum()
    };
    // The first connection carried the first batch and the steady ones; the second, one batch.
    report.full_setup = Overhead {
        up: total(first, true) - (n + 1.0) * report.up.bytes,
        down: total(first, false) - (n + 1.0) * report.down.bytes,
    };
    report.resumed_setup = Overhead {
        up: total(second, true) - report.up.bytes,
        down: total(second, false) - report.down.bytes,
    };
    Ok(report)
}

/// Per-batch means of some packets.
fn traffic<'a>(packets: impl Iterator<Item = &'a Packet>, batches: f64) -> Traffic {
    let mut t = Traffic::default();
    for p in packets {
        t.bytes += f64::from(p.ip_bytes);
        t.packets += 1.0;
        t.tls_records += f64::from(p.tls_records);
        t.payload_bytes += f64::from(p.payload_bytes());
        if p.payload_bytes() == 0 {
            t.ack_bytes += f64::from(p.ip_bytes);
            t.ack_packets += 1.0;
        } else {
            t.data_header_bytes += f64::from(p.header_bytes);
        }
    }
    for field in [
        &mut t.bytes,
        &mut t.packets,
        &mut t.data_header_bytes,
        &mut t.tls_records,
        &mut t.payload_bytes,
        &mut t.ack_bytes,
        &mut t.ack_packets,
    ] {
        *field /= batches;
    }
    t
}

/// Starts tcpdump on the loopback interface for the hub's port and waits until it captures.
async fn start_capture(tcpdump: &Path, file: &Path, port: u16) -> anyhow::Result<Child> {
    let mut command = tokio::process::Command::new(tcpdump);
    command
        // Immediate mode: packets reach the file as they come, not a buffer block at a time,
        // so none is still in the kernel when tcpdump is stopped.
        .args(["-i", "lo", "-n", "-U", "--immediate-mode", "-s", "0", "-w"])
        .arg(file)
        .arg(format!("tcp port {port}"));
    let mut child = Child::spawn("tcpdump", command)?;
    let deadline = std::time::Instant::now() + CAPTURE_START_TIMEOUT;
    loop {
        if child
            .recent_stderr()
            .iter()
            .any(|line| line.contains("listening on"))
        {
            return Ok(child);
        }
        child.ensure_running()?;
        if std::time::Instant::now() > deadline {
            bail!(
                "tcpdump did not start capturing within {CAPTURE_START_TIMEOUT:?}: {}",
                child.recent_stderr().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
