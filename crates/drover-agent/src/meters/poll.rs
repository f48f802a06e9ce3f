//! The schedule every source runs on, and the rate-limited error log every source reports with.
//!
//! One source is one task: it polls, hands the readings to the sink, and waits for its next
//! tick. Because the poll is awaited inside the loop, two polls of one source can never overlap
//! (the seed's cron started a new poll whether or not the last one had finished), and
//! [`MissedTickBehavior::Delay`] makes a slow poll push the next tick back instead of firing
//! the missed ticks in a burst. Sources do not share a task, so a stuck gateway cannot delay a
//! pulse counter.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use drover_protocol::reading::Reading;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Where sources send their readings: one `Vec` per poll. The spool owns the receiving end.
pub type ReadingSink = mpsc::Sender<Vec<Reading>>;

/// After an error has been logged, the same kind of error is logged again at most this often
/// (with the number of failures in a row), so that a meter that is down does not write a
/// line every two seconds.
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(5 * 60);

/// A meter source: something that is polled on a schedule and yields readings.
pub trait Source: Send + 'static {
    /// Reads the source's meters once. A meter that fails is logged by the source (through an
    /// [`ErrorLog`]) and simply has no readings in the result; it never hides another meter's.
    fn poll(&mut self) -> impl Future<Output = Vec<Reading>> + Send;

    /// Called once when the source stops (after shutdown, or when the sink closed).
    fn stop(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Polls `source` every `every` (the first poll at once) until `shutdown`, or until the sink
/// is closed. A poll in progress at shutdown is abandoned (sources keep no state that a
/// dropped poll could corrupt); then [`Source::stop`] runs.
pub async fn run<S: Source>(
    mut source: S,
    every: Duration,
    sink: ReadingSink,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let readings = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            readings = source.poll() => readings,
        };
        if readings.is_empty() {
            continue;
        }
        // A full sink delays this source's next poll rather than dropping readings.
        let sent = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            sent = sink.send(readings) => sent,
        };
        if sent.is_err() {
            tracing::debug!("the reading sink is closed; the source stops");
            break;
        }
    }
    source.stop().await;
}

/// Logs failures per key (a meter, a slot, a connection) at most once per
/// [`ERROR_LOG_EVERY`], and says once when a failing key works again.
#[derive(Debug)]
pub struct ErrorLog<K> {
    entries: HashMap<K, Entry>,
}

#[derive(Debug)]
struct Entry {
    logged_at: Instant,
    /// Failures in a row.
    total: u64,
}

impl<K: Hash + Eq + Clone + fmt::Display> ErrorLog<K> {
    /// An empty log.
    pub fn new() -> ErrorLog<K> {
        ErrorLog {
            entries: HashMap::new(),
        }
    }

    /// Records a failure of `key`; logs it as a warning if nothing was logged about `key` in
    /// the last [`ERROR_LOG_EVERY`]. Returns whether it logged.
    pub fn failed(&mut self, key: &K, error: &dyn fmt::Display) -> bool {
        let now = Instant::now();
        match self.entries.get_mut(key) {
            None => {
                tracing::warn!(what = %key, error = %error, "read failed");
                self.entries.insert(
                    key.clone(),
                    Entry {
                        logged_at: now,
                        total: 1,
                    },
                );
                true
            }
            Some(entry) => {
                entry.total = entry.total.saturating_add(1);
                if now.duration_since(entry.logged_at) < ERROR_LOG_EVERY {
                    return false;
                }
                tracing::warn!(
                    what = %key,
                    error = %error,
                    failures_in_a_row = entry.total,
                    "read still failing"
                );
                entry.logged_at = now;
                true
            }
        }
    }

    /// Records a success of `key`; logs the recovery if it had been failing.
    pub fn succeeded(&mut self, key: &K) {
        if let Some(entry) = self.entries.remove(key) {
            tracing::info!(what = %key, failures = entry.total, "read works again");
        }
    }

    /// Whether `key` failed last time.
    pub fn is_failing(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }
}

impl<K: Hash + Eq + Clone + fmt::Display> Default for ErrorLog<K> {
    fn default() -> ErrorLog<K> {
        ErrorLog::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use drover_protocol::reading::{Channel, ClockState, MeterId};

    use super::*;

    /// A source whose poll takes `takes` of (paused) time and records when each poll started.
    struct Slow {
        takes: Duration,
        started: Arc<std::sync::Mutex<Vec<Instant>>>,
        running: Arc<AtomicUsize>,
        overlapped: Arc<AtomicUsize>,
    }

    impl Source for Slow {
        async fn poll(&mut self) -> Vec<Reading> {
            if self.running.fetch_add(1, Ordering::SeqCst) != 0 {
                self.overlapped.fetch_add(1, Ordering::SeqCst);
            }
            self.started.lock().unwrap().push(Instant::now());
            tokio::time::sleep(self.takes).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            vec![Reading {
                meter: MeterId::parse("slow").unwrap(),
                channel: Channel::Power,
                ts_ms: 0,
                value: 1,
                scale: 0,
                clock: ClockState::Unknown,
            }]
        }
    }

    async fn schedule_of(every: Duration, takes: Duration, polls: usize) -> (Vec<Duration>, usize) {
        let started = Arc::new(std::sync::Mutex::new(Vec::new()));
        let overlapped = Arc::new(AtomicUsize::new(0));
        let source = Slow {
            takes,
            started: started.clone(),
            running: Arc::new(AtomicUsize::new(0)),
            overlapped: overlapped.clone(),
        };
        let (sink, mut readings) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(source, every, sink, shutdown.clone()));
        for _ in 0..polls {
            readings.recv().await.unwrap();
        }
        shutdown.cancel();
        task.await.unwrap();
        let started = started.lock().unwrap().clone();
        let gaps = started.windows(2).map(|w| w[1] - w[0]).collect();
        (gaps, overlapped.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_source_is_polled_on_its_interval() {
        let (gaps, overlapped) =
            schedule_of(Duration::from_secs(2), Duration::from_millis(300), 5).await;
        assert_eq!(overlapped, 0);
        assert!(
            gaps.iter().all(|g| *g == Duration::from_secs(2)),
            "{gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_poll_delays_the_next_instead_of_stacking_up() {
        let (gaps, overlapped) =
            schedule_of(Duration::from_secs(2), Duration::from_secs(5), 5).await;
        assert_eq!(overlapped, 0);
        // The missed ticks are not fired in a burst: each poll starts when the last one ended.
        assert!(
            gaps.iter().all(|g| *g == Duration::from_secs(5)),
            "{gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_logged_once_per_period_and_recovery_once() {
        let mut log = ErrorLog::<String>::new();
        let key = "modbus-1".to_string();
        assert!(log.failed(&key, &"timeout"));
        assert!(!log.failed(&key, &"timeout"));
        assert!(log.is_failing(&key));
        tokio::time::advance(ERROR_LOG_EVERY).await;
        assert!(log.failed(&key, &"timeout"));
        assert!(!log.failed(&key, &"timeout"));
        log.succeeded(&key);
        assert!(!log.is_failing(&key));
        assert!(
            log.failed(&key, &"timeout"),
            "a new failure after recovery is logged"
        );
    }
}
