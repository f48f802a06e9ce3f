//! BENCHMARKS.md: the measured figures as Markdown, each with what it measures, the command that
//! reproduces it, the reference, the goal and whether it is met.
//!
//! The file is generated from one run; nothing in its upper part is typed by hand. Notes a
//! person writes (what a profile showed, say) go below [`NOTES_MARKER`] and are kept when the
//! file is rewritten.

use std::fmt::Write as _;
use std::time::Duration;

use crate::agent;
use crate::checkin;
use crate::children::BUILD_COMMAND;
use crate::machine::Machine;
use crate::stats::median;

/// Everything below this line in BENCHMARKS.md is kept when the file is rewritten.
pub const NOTES_MARKER: &str =
    "<!-- Hand-written notes below this line are kept when drover-bench rewrites this file. -->";

/// The throughput goal: the hub answers at least this share of what nginx answers.
pub const THROUGHPUT_GOAL: f64 = 0.5;
/// The agent's resident memory goal, in bytes (10 MB).
pub const AGENT_RSS_GOAL_BYTES: f64 = 10e6;
/// The agent's binary size goal, in bytes (8 MB).
pub const AGENT_SIZE_GOAL_BYTES: u64 = 8_000_000;

/// The whole file: a header, the machine, the sections of the benchmarks that ran (each already
/// rendered, in order), and the kept notes.
pub fn document(machine: &Machine, sections: &[String], kept_notes: Option<&str>) -> String {
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(
        "Written by `drover-bench` from one run; the figures are not edited by hand. To reproduce \
         them, from the repository root:\n\n",
    );
    let _ = writeln!(
        out,
        "```sh\n{BUILD_COMMAND} && ./target/release/drover-bench all\n```\n"
    );
    out.push_str(
        "`drover-bench checkin`, `agent`, `ingest`, `wire`, `rest` and `query` run one benchmark \
         each and print its section (with `--write`, they also replace that section here); \
         `drover-bench --help` lists the knobs (runs, durations, loads). wrk, nginx and tcpdump \
         come from Debian: `apt-get install wrk nginx-light tcpdump`; the PostgreSQL figures \
         need a server (`--postgres-url`).\n\n",
    );
    out.push_str(&machine_section(machine));
    for section in sections {
        out.push_str(section);
    }
    out.push_str(NOTES_MARKER);
    out.push('\n');
    if let Some(notes) = kept_notes {
        out.push_str(notes);
    }
    out
}

/// `existing` with section `number` (from its `## <number>. ` heading to the next `## `
/// heading or the notes marker) replaced by `section`; a missing section is put before the
/// first section with a higher number, or before the notes marker.
pub fn replace_section(existing: &str, number: u32, section: &str) -> String {
    let heading = |n: u32| format!("\n## {n}. ");
    let section_number = |at: usize| -> Option<u32> {
        let rest = existing.get(at + 4..)?;
        rest.split_once(". ")?.0.parse().ok()
    };
    let end_of = |from: usize| -> usize {
        let next_heading = existing[from..].find("\n## ").map(|i| from + i);
        let marker = existing[from..].find(NOTES_MARKER).map(|i| from + i - 1);
        [next_heading, marker]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(existing.len())
    };
    let (start, end) = match existing.find(&heading(number)) {
        Some(start) => (start, end_of(start + 1)),
        None => {
            let later = existing
                .match_indices("\n## ")
                .map(|(i, _)| i)
                .find(|&i| section_number(i).is_some_and(|n| n > number));
            let at = later
                .or_else(|| existing.find(NOTES_MARKER).map(|i| i.saturating_sub(1)))
                .unwrap_or(existing.len());
            (at, at)
        }
    };
    format!(
        "{}\n{}{}",
        &existing[..start],
        section.trim_end_matches('\n').to_string() + "\n",
        &existing[end..]
    )
}

/// What follows the notes marker in an existing file, if it has one.
pub fn kept_notes(existing: &str) -> Option<&str> {
    let (_, notes) = existing.split_once(NOTES_MARKER)?;
    Some(notes.strip_prefix('\n').unwrap_or(notes))
}

/// The machine the figures come from.
pub fn machine_section(machine: &Machine) -> String {
    let mut out = String::from("## Machine\n\n| | |\n| --- | --- |\n");
    let _ = writeln!(out, "| date (UTC) | {} |", machine.date);
    if let Some(commit) = &machine.commit {
        let _ = writeln!(out, "| commit | `{commit}` |");
    }
    let _ = writeln!(out, "| cores (nproc) | {} |", machine.cores);
    let _ = writeln!(out, "| CPU | {} |", machine.cpu_model);
    let _ = writeln!(out, "| memory | {:.1} GiB |", machine.memory_gib);
    let _ = writeln!(out, "| kernel | {} |", machine.kernel);
    out.push_str(
        "\nThe machine is shared with other engineers' builds, so absolute figures move from run \
         to run. Each figure is therefore the median of several runs, and the hub is always \
         compared with a reference measured in the same run.\n\n",
    );
    out
}

/// Section 1: check-ins, hub against nginx.
pub fn checkin_section(report: &checkin::Report) -> String {
    let options = &report.options;
    let mut out = String::from("## 1. No-change check-ins: the hub beside nginx\n\n");
    let _ = writeln!(
        out,
        "**What is measured.** Check-ins per second and their 99th-percentile latency for the \
         hot path of a settled fleet: `POST /device/v1/checkin` from a device that already holds \
         its desired state, which the hub answers `204 No Content` from memory (last-seen times \
         are batched). One `drover hub` (release build, SQLite, {workers} tokio worker threads, \
         default log level) serves {devices} devices enrolled through the real device API; wrk \
         sends each request with its own device's bearer credential and body, round-robin over \
         all of them. The reference is nginx answering the identical requests at the same path \
         with `return 204;` ({workers} worker processes, access log off), driven by the same wrk \
         and Lua script. Both run on this machine together with wrk itself.\n",
        workers = report.workers,
        devices = options.devices,
    );
    let _ = writeln!(
        out,
        "**How.** `./target/release/drover-bench checkin` (part of `all`). For each wrk load: a \
         {warmup}-second warm-up of each server, then {runs} runs of {duration} s against each, \
         alternating which goes first. Figures are medians over the runs; \
         *hub / nginx* divides the two medians; *paired* is the median of the ratios of runs \
         measured back to back, which a change in the machine's other load disturbs less. Load \
         average (1 min) before: {la0}, after: {la1}. Tools: {wrk}; {nginx}.\n",
        warmup = options.warmup.as_secs(),
        runs = options.runs,
        duration = options.duration.as_secs(),
        la0 = report.load_average.0,
        la1 = report.load_average.1,
        wrk = report.wrk_version,
        nginx = report.nginx_version,
    );
    out.push_str(
        "| wrk load | hub req/s | nginx req/s | hub / nginx | hub / nginx, paired | hub p99 | nginx p99 | p99 hub / nginx | hub CPU µs/req | nginx CPU µs/req |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for load in &report.loads {
        let s = LoadSummary::of(load);
        let _ = writeln!(
            out,
            "| `{}` | {:.0} | {:.0} | **{:.2}** | **{:.2}** | {} | {} | {:.2} | {:.1} | {:.1} |",
            load.load,
            s.hub_rps,
            s.nginx_rps,
            s.ratio(),
            s.paired_ratio,
            ms(s.hub_p99_ms),
            ms(s.nginx_p99_ms),
            s.hub_p99_ms / s.nginx_p99_ms,
            s.hub_cpu_us,
            s.nginx_cpu_us,
        );
    }
    out.push('\n');
    out.push_str(&throughput_verdict(report));
    let _ = writeln!(
        out,
        "\n**Last-seen writes.** After the runs the hub was stopped with SIGTERM and started \
         again on the same data directory; {} of {} devices then showed a stored last-seen time \
         from the measured window, so the batched last-seen path was exercised and written.\n",
        report.last_seen_written, options.devices
    );
    out.push_str(
        "\"CPU µs/req\" is the CPU time (user + system, from `/proc/<pid>/stat`, nginx's workers \
         included) the server spent per completed request: it does not depend on how the cores \
         were shared with wrk and with other work on the machine, so it is the steadier \
         measure of cost.\n\n",
    );
    out.push_str("<details><summary>Every run</summary>\n\n");
    out.push_str(
        "| wrk load | run | first | hub req/s | nginx req/s | hub / nginx | hub p99 | nginx p99 | hub CPU µs/req | nginx CPU µs/req | socket errors (hub, nginx) |\n\
         | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for load in &report.loads {
        for (i, (hub, nginx)) in load.hub.iter().zip(&load.nginx).enumerate() {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {:.0} | {:.0} | {:.2} | {} | {} | {:.1} | {:.1} | {}, {} |",
                load.load,
                i + 1,
                if checkin::hub_goes_first(i) {
                    "hub"
                } else {
                    "nginx"
                },
                hub.wrk.requests_per_sec,
                nginx.wrk.requests_per_sec,
                hub.wrk.requests_per_sec / nginx.wrk.requests_per_sec,
                ms(duration_ms(hub.wrk.p99)),
                ms(duration_ms(nginx.wrk.p99)),
                hub.cpu_us_per_request,
                nginx.cpu_us_per_request,
                hub.wrk.socket_errors,
                nginx.wrk.socket_errors,
            );
        }
    }
    out.push_str("\n</details>\n\n");
    out
}

/// The goal is judged on the lower of the two ratios of each load, and must hold at every load.
fn throughput_verdict(report: &checkin::Report) -> String {
    let ratios: Vec<(String, f64)> = report
        .loads
        .iter()
        .map(|l| {
            let s = LoadSummary::of(l);
            (l.load.to_string(), s.ratio().min(s.paired_ratio))
        })
        .collect();
    let met = ratios.iter().filter(|(_, r)| *r >= THROUGHPUT_GOAL).count();
    let verdict = if met == ratios.len() {
        "Met"
    } else if met == 0 {
        "Not met"
    } else {
        "Met at some loads only"
    };
    let list = ratios
        .iter()
        .map(|(load, ratio)| format!("{ratio:.2} at `{load}`"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "**Goal: hub throughput at least {THROUGHPUT_GOAL} × nginx. {verdict}** (the lower of \
         the two ratios: {list}).\n"
    )
}

/// Medians of one load's runs.
struct LoadSummary {
    hub_rps: f64,
    nginx_rps: f64,
    /// The median over runs of hub / nginx within each run pair, which were measured back to
    /// back and so under much the same load from the rest of the machine.
    paired_ratio: f64,
    hub_p99_ms: f64,
    nginx_p99_ms: f64,
    hub_cpu_us: f64,
    nginx_cpu_us: f64,
}

impl LoadSummary {
    fn of(load: &checkin::LoadRuns) -> LoadSummary {
        let m = |runs: &[checkin::Run], f: fn(&checkin::Run) -> f64| {
            median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
        };
        LoadSummary {
            hub_rps: m(&load.hub, |r| r.wrk.requests_per_sec),
            nginx_rps: m(&load.nginx, |r| r.wrk.requests_per_sec),
            paired_ratio: median(
                &load
                    .hub
                    .iter()
                    .zip(&load.nginx)
                    .map(|(h, n)| h.wrk.requests_per_sec / n.wrk.requests_per_sec)
                    .collect::<Vec<_>>(),
            )
            .unwrap_or(f64::NAN),
            hub_p99_ms: m(&load.hub, |r| duration_ms(r.wrk.p99)),
            nginx_p99_ms: m(&load.nginx, |r| duration_ms(r.wrk.p99)),
            hub_cpu_us: m(&load.hub, |r| r.cpu_us_per_request),
            nginx_cpu_us: m(&load.nginx, |r| r.cpu_us_per_request),
        }
    }

    fn ratio(&self) -> f64 {
        self.hub_rps / self.nginx_rps
    }
}

/// Section 2: the agent's size and memory.
pub fn agent_section(report: &agent::Report) -> String {
    let mut out = String::from("## 2. The agent's footprint\n\n");
    out.push_str("MB here is 10^6 bytes and MiB 2^20 bytes; the goals are read in MB, the stricter unit.\n\n");
    let bytes = report.binary_bytes;
    let size_met = bytes <= AGENT_SIZE_GOAL_BYTES;
    let _ = writeln!(
        out,
        "**Binary size.** The release `drover-agent` binary for this machine (`{}`; the \
         workspace's release profile strips symbols{}), measured with \
         `./target/release/drover-bench agent` (part of `all`): **{bytes} bytes = {:.2} MB \
         ({:.2} MiB)**. Goal: at most 8 MB (8,000,000 bytes). **{}**.\n",
        display_path(&report.binary),
        if report.has_symbols {
            "; this one still has a symbol table, so it was not built with that profile"
        } else {
            "; this one has no symbol table"
        },
        bytes as f64 / 1e6,
        bytes as f64 / (1024.0 * 1024.0),
        if size_met { "Met" } else { "Not met" },
    );
    let median_bytes = report.median_rss_kib() * 1024.0;
    let max_bytes = report.max_rss_kib() * 1024.0;
    let rss_met = max_bytes <= AGENT_RSS_GOAL_BYTES;
    let _ = writeln!(
        out,
        "**Resident memory when idle.** One `drover-agent run` process enrolled with a hub on \
         this machine (plain HTTP on loopback; fleet poll interval 1 s, agent `poll.min_interval \
         = \"1s\"`), so it checks in about every second with no update to work on. Once the hub \
         had seen it check in {settled} times, VmRSS from `/proc/<pid>/status` was sampled {n} \
         times, {interval} s apart ({checkins} check-ins seen by the hub in all). Median \
         **{:.1} MB** ({:.0} KiB), max **{:.1} MB** ({:.0} KiB); peak since start (VmHWM) {:.1} \
         MB. Goal: at most 10 MB. **{}** (judged on the max sample).\n",
        median_bytes / 1e6,
        report.median_rss_kib(),
        max_bytes / 1e6,
        report.max_rss_kib(),
        report.peak_kib as f64 * 1024.0 / 1e6,
        if rss_met { "Met" } else { "Not met" },
        settled = agent::SETTLED_CHECKINS,
        n = report.rss_kib.len(),
        interval = report.options.interval.as_secs_f64(),
        checkins = report.checkins_seen,
    );
    let _ = writeln!(
        out,
        "| measure | value | goal | met |\n| --- | ---: | ---: | --- |\n\
         | binary size | {bytes} B ({:.2} MB) | 8 MB | {} |\n\
         | idle RSS, median | {:.1} MB | 10 MB | {} |\n\
         | idle RSS, max | {:.1} MB | 10 MB | {} |\n",
        bytes as f64 / 1e6,
        yes_no(size_met),
        median_bytes / 1e6,
        yes_no(median_bytes <= AGENT_RSS_GOAL_BYTES),
        max_bytes / 1e6,
        yes_no(rss_met),
    );
    out
}

/// A path relative to the current directory when it is inside it (the repository root, when
/// run as documented), so the report does not name one machine's folders.
fn display_path(path: &std::path::Path) -> String {
    let relative = std::env::current_dir().ok().and_then(|dir| {
        path.strip_prefix(dir)
            .ok()
            .map(std::path::Path::to_path_buf)
    });
    relative
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn yes_no(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ms(value: f64) -> String {
    format!("{value:.2} ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_below_the_marker_survive_a_rewrite() {
        let existing = format!("# old figures\n{NOTES_MARKER}\n## Notes\nperf says X.\n");
        assert_eq!(kept_notes(&existing), Some("## Notes\nperf says X.\n"));
        assert_eq!(kept_notes("# no marker"), None);
    }

    #[test]
    fn a_section_is_replaced_in_place_or_put_in_number_order() {
        let existing =
            format!("# B\n\n## 1. One\n\nold one\n\n## 4. Four\n\nfour\n\n{NOTES_MARKER}\nnotes\n");
        let replaced = replace_section(&existing, 1, "## 1. One\n\nnew one\n\n");
        assert_eq!(
            replaced,
            format!("# B\n\n## 1. One\n\nnew one\n\n## 4. Four\n\nfour\n\n{NOTES_MARKER}\nnotes\n")
        );
        let inserted = replace_section(&existing, 3, "## 3. Three\n\nthree\n\n");
        assert!(
            inserted.contains("old one\n\n## 3. Three\n\nthree\n\n## 4. Four"),
            "{inserted}"
        );
        let appended = replace_section(&existing, 6, "## 6. Six\n\nsix\n\n");
        assert!(
            appended.contains("four\n\n## 6. Six\n\nsix\n\n<!--"),
            "{appended}"
        );
    }
}
