//! The S0 input's GPIO side: a thread that requests the line from the Linux GPIO character
//! device (gpiocdev, uapi v2) with edge detection on both edges and feeds the kernel's edge
//! events, with their monotonic timestamps, to an [`EdgeInput`].
//!
//! A thread rather than a task because gpiocdev's waits are blocking (its async support would
//! pull in more crates than it saves); it waits in short slices so that it notices shutdown
//! within [`WAIT_SLICE`]. If the chip cannot be opened (wrong path, no permission, a board
//! without that line) or the request fails later, it logs (rate-limited) and tries again every
//! [`REOPEN_EVERY`], so that a fixed permission starts counting without a restart.
//!
//! The line is requested with the configured bias and, for `active = "low"`, as active-low, so
//! that the kernel reports "rising" when a pulse begins whichever way the circuit is wired.
//! Debouncing is left to [`super::counter`], where it is tested.
//!
//! This machine has no GPIO: this module is compiled and documented, and the counting it feeds
//! is tested through [`EdgeInput`] directly.

use std::thread::JoinHandle;
use std::time::Duration;

use gpiocdev::line::{Bias, EdgeDetection, EdgeKind, Value};
use gpiocdev::request::Request;
use tokio_util::sync::CancellationToken;

use super::EdgeInput;
use crate::meters::config::{ActiveLevel, BiasSetting, S0SourceConfig};
use crate::meters::poll::ErrorLog;

/// How long one wait for an edge lasts before shutdown is checked again.
pub const WAIT_SLICE: Duration = Duration::from_millis(250);

/// The pause before a line that could not be requested is tried again.
pub const REOPEN_EVERY: Duration = Duration::from_secs(10);

/// What the agent calls itself to the kernel (shown by `gpioinfo`).
const CONSUMER: &str = "drover-agent";

/// Starts the thread that reads the line of `config` until `shutdown`.
pub fn spawn(
    config: &S0SourceConfig,
    input: EdgeInput,
    shutdown: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    let config = config.clone();
    std::thread::Builder::new()
        .name(format!("s0-{}", config.name))
        .spawn(move || run(&config, &input, &shutdown))
}

fn run(config: &S0SourceConfig, input: &EdgeInput, shutdown: &CancellationToken) {
    let key = format!(
        "s0-{} ({} line {})",
        config.name,
        config.chip.display(),
        config.line
    );
    let mut errors = ErrorLog::new();
    while !shutdown.is_cancelled() {
        let result = request(config).and_then(|request| {
            errors.succeeded(&key);
            read_edges(&request, config.line, input, shutdown)
        });
        if let Err(e) = result {
            errors.failed(&key, &e);
            pause(REOPEN_EVERY, shutdown);
        }
    }
}

fn request(config: &S0SourceConfig) -> Result<Request, gpiocdev::Error> {
    let bias = match config.bias {
        BiasSetting::PullUp => Bias::PullUp,
        BiasSetting::PullDown => Bias::PullDown,
        BiasSetting::Disabled => Bias::Disabled,
    };
    let mut builder = Request::builder();
    builder
        .on_chip(&config.chip)
        .with_consumer(CONSUMER)
        .with_line(config.line)
        .as_input()
        .with_bias(bias)
        .with_edge_detection(EdgeDetection::BothEdges);
    if config.active == ActiveLevel::Low {
        builder.as_active_low();
    }
    builder.request()
}

/// Feeds edges until shutdown (`Ok`) or an error.
fn read_edges(
    request: &Request,
    line: u32,
    input: &EdgeInput,
    shutdown: &CancellationToken,
) -> Result<(), gpiocdev::Error> {
    let level = request.value(line)?;
    // The kernel's edge timestamps are CLOCK_MONOTONIC; the level read now has none, and 0
    // (the distant past) only means it has been stable "long enough".
    input.set_level(level == Value::Active, 0);
    while !shutdown.is_cancelled() {
        if !request.wait_edge_event(WAIT_SLICE)? {
            continue;
        }
        let event = request.read_edge_event()?;
        input.edge(event.kind == EdgeKind::Rising, event.timestamp_ns);
    }
    Ok(())
}

fn pause(total: Duration, shutdown: &CancellationToken) {
    let mut left = total;
    while !left.is_zero() && !shutdown.is_cancelled() {
        let step = left.min(WAIT_SLICE);
        std::thread::sleep(step);
        left -= step;
    }
}
