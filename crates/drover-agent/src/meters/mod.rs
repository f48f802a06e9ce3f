//! Meter sources: what the device measures, as [`Reading`]s for the spool.
//!
//! Each source in `[meters]` (see [`config`]) runs as its own task on its own schedule
//! ([`poll::run`]: default every 2 s, polls never overlap, a slow poll delays the next) and
//! sends one `Vec<Reading>` per poll to a [`ReadingSink`]. A source that fails logs it (rate
//! limited) and keeps going; it never stops another source, and within a source one meter's
//! failure never drops another meter's readings.
//!
//! - [`modbus`]: Modbus TCP gateways; register maps as data ([`modbus::maps`]), slot
//!   discovery, one reused connection, and the `drover-agent modbus probe` dump.
//! - [`s0`]: S0 pulse inputs on GPIO lines, debounced, with a persistent counter.
//! - [`command`]: programs that print readings.
//! - [`simulated`]: a solar production meter that is not there (`drover demo`).
//! - [`clock`]: the timestamp and the clock state every reading carries.
//!
//! Every reading names its meter (`modbus-<serial>` from the meter itself; `s0-<name>`,
//! `sim-<name>` from the config; whatever a command prints), and is stamped when that meter
//! was read. State that must survive a restart (the S0 counters, the simulated registers) lives
//! in `<state_dir>/meters/`.

pub mod clock;
pub mod command;
pub mod config;
pub mod modbus;
pub mod poll;
pub mod s0;
pub mod simulated;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::reading::Reading;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span};

pub use self::clock::{Clock, SystemClock};
pub use self::config::MetersConfig;
pub use self::poll::ReadingSink;

use self::command::CommandSource;
use self::modbus::ModbusSource;
use self::modbus::maps::RegisterMap;
use self::poll::Source;
use self::s0::{S0Error, S0Source};
use self::simulated::SimulatedSource;
use crate::layout::StateDir;

/// The running sources.
#[derive(Debug, Default)]
pub struct MeterTasks {
    tasks: Vec<JoinHandle<()>>,
}

impl MeterTasks {
    /// How many sources run.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no source runs.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Waits until every source has stopped (after the shutdown token was cancelled, or the
    /// sink was closed). Their last state (S0 counters) is on disk when this returns.
    pub async fn join(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a meter source task crashed");
            }
        }
    }
}

/// Starts every source of `config`, sending readings to `sink` until `shutdown`.
///
/// `state_dir` is the agent's state directory (the sources keep their files in its `meters/`).
/// A source that cannot start (a map file that disappeared since validation, an unwritable
/// state directory) is logged and left out; the others start. S0 inputs whose GPIO line cannot
/// be opened still start, and keep trying to open it. Must be called within a Tokio runtime.
pub fn start(
    config: &MetersConfig,
    state_dir: &Path,
    clock: Arc<dyn Clock>,
    sink: ReadingSink,
    shutdown: CancellationToken,
) -> MeterTasks {
    let meters_dir = StateDir::new(state_dir).meters_dir();
    let mut tasks = Vec::new();
    let mut spawn = |source, every, span: Span| {
        tasks.push(spawn_source(source, every, &sink, &shutdown, span));
    };
    for c in &config.modbus {
        let span = tracing::info_span!("meters", kind = "modbus", source = %c.name);
        match RegisterMap::resolve(&c.map) {
            Ok(map) => spawn(
                Any::Modbus(ModbusSource::new(c, map, clock.clone())),
                c.interval,
                span,
            ),
            Err(e) => tracing::error!(parent: &span, error = %e, "meter source not started"),
        }
    }
    for c in &config.s0 {
        let span = tracing::info_span!("meters", kind = "s0", source = %c.name);
        let started = S0Source::open(c, &meters_dir, clock.clone()).and_then(|(source, input)| {
            s0::gpio::spawn(c, input, shutdown.clone())
                .map_err(|e| S0Error::Thread(e.to_string()))?;
            Ok(source)
        });
        match started {
            Ok(source) => spawn(Any::S0(source), c.interval, span),
            Err(e) => tracing::error!(parent: &span, error = %e, "meter source not started"),
        }
    }
    for c in &config.command {
        let span = tracing::info_span!("meters", kind = "command", source = %c.name);
        spawn(
            Any::Command(CommandSource::new(c, clock.clone())),
            c.interval,
            span,
        );
    }
    for c in &config.simulated {
        let span = tracing::info_span!("meters", kind = "simulated", source = %c.name);
        match SimulatedSource::open(c, &meters_dir, clock.clone()) {
            Ok(source) => spawn(Any::Simulated(source), c.interval, span),
            Err(e) => tracing::error!(parent: &span, error = %e, "meter source not started"),
        }
    }
    MeterTasks { tasks }
}

fn spawn_source<S: Source>(
    source: S,
    every: Duration,
    sink: &ReadingSink,
    shutdown: &CancellationToken,
    span: Span,
) -> JoinHandle<()> {
    span.in_scope(|| tracing::info!(every = ?every, "meter source started"));
    tokio::spawn(poll::run(source, every, sink.clone(), shutdown.clone()).instrument(span))
}

/// Any kind of source, so that [`start`] can treat them alike.
#[derive(Debug)]
enum Any {
    Modbus(ModbusSource),
    S0(S0Source),
    Command(CommandSource),
    Simulated(SimulatedSource),
}

impl Source for Any {
    async fn poll(&mut self) -> Vec<Reading> {
        match self {
            Any::Modbus(s) => s.poll().await,
            Any::S0(s) => s.poll().await,
            Any::Command(s) => s.poll().await,
            Any::Simulated(s) => s.poll().await,
        }
    }

    async fn stop(&mut self) {
        match self {
            Any::Modbus(s) => s.stop().await,
            Any::S0(s) => s.stop().await,
            Any::Command(s) => s.stop().await,
            Any::Simulated(s) => s.stop().await,
        }
    }
}
