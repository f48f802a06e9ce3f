//! Facts the device reports about itself: OS, architecture, host name, uptime, primary IP, and
//! the tags and attributes from the config. Everything is best effort: a fact that cannot be
//! read is left empty rather than failing a check-in.

use std::net::{IpAddr, UdpSocket};
use std::time::{Duration, Instant};

use drover_protocol::device::Facts;

use crate::config::AgentConfig;

/// Facts are sent at least this often even when nothing changed.
pub const RESEND_AFTER: Duration = Duration::from_secs(3600);

/// Reads the facts now.
pub fn collect(config: &AgentConfig) -> Facts {
    Facts {
        os: cap(os_name(
            &std::fs::read_to_string("/etc/os-release").unwrap_or_default(),
        )),
        arch: std::env::consts::ARCH.to_string(),
        ip: primary_ip().map(|ip| ip.to_string()),
        uptime_s: uptime(&std::fs::read_to_string("/proc/uptime").unwrap_or_default()),
        hostname: cap(std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()),
        tags: config.tags.clone(),
        attributes: config.attributes.clone(),
    }
}

/// Decides when facts go into a check-in: on the first one after start, when they changed
/// (uptime aside, which always changes), and at least every [`RESEND_AFTER`].
#[derive(Debug, Default)]
pub struct FactsTracker {
    sent: Option<(Facts, Instant)>,
}

impl FactsTracker {
    /// The facts to send now, if any.
    pub fn due(&self, current: &Facts, now: Instant) -> bool {
        match &self.sent {
            None => true,
            Some((sent, at)) => {
                !same_ignoring_uptime(sent, current) || now.duration_since(*at) >= RESEND_AFTER
            }
        }
    }

    /// Records that the hub received these facts.
    pub fn sent(&mut self, facts: Facts, now: Instant) {
        self.sent = Some((facts, now));
    }
}

fn same_ignoring_uptime(a: &Facts, b: &Facts) -> bool {
    Facts {
        uptime_s: 0,
        ..a.clone()
    } == Facts {
        uptime_s: 0,
        ..b.clone()
    }
}

/// The hub refuses fact values over 256 bytes (and with them the whole check-in).
fn cap(mut value: String) -> String {
    const MAX: usize = 256;
    if value.len() > MAX {
        let mut end = MAX;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

/// `PRETTY_NAME` from /etc/os-release, unquoted.
fn os_name(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .unwrap_or_default()
}

/// The first number in /proc/uptime, in whole seconds.
fn uptime(proc_uptime: &str) -> u64 {
    proc_uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |s| s as u64)
}

/// The local address the kernel would use to reach the internet. Connecting a UDP socket sends
/// no packet; it only asks the routing table.
fn primary_ip() -> Option<IpAddr> {
    let probe = |bind: &str, target: &str| -> Option<IpAddr> {
        let socket = UdpSocket::bind(bind).ok()?;
        socket.connect(target).ok()?;
        Some(socket.local_addr().ok()?.ip())
    };
    probe("0.0.0.0:0", "8.8.8.8:53").or_else(|| probe("[::]:0", "[2001:4860:4860::8888]:53"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_and_uptime_are_parsed() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(os_name(text), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_name(""), "");
        assert_eq!(uptime("12345.67 54321.00\n"), 12345);
        assert_eq!(uptime("garbage"), 0);
        assert_eq!(cap("é".repeat(200)).len(), 256);
    }

    #[test]
    fn facts_are_resent_on_change_or_after_an_hour_but_not_for_uptime() {
        let config = AgentConfig::default();
        let facts = collect(&config);
        assert_eq!(facts.arch, std::env::consts::ARCH);
        let mut tracker = FactsTracker::default();
        let start = Instant::now();
        assert!(tracker.due(&facts, start), "first check-in");
        tracker.sent(facts.clone(), start);
        let later = Facts {
            uptime_s: facts.uptime_s + 60,
            ..facts.clone()
        };
        assert!(!tracker.due(&later, start + Duration::from_secs(60)));
        let renamed = Facts {
            hostname: "other".into(),
            ..facts.clone()
        };
        assert!(tracker.due(&renamed, start + Duration::from_secs(60)));
        assert!(tracker.due(&later, start + RESEND_AFTER));
    }
}
