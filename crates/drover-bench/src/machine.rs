//! Facts about the machine a benchmark ran on, for the report: cores, CPU model, kernel,
//! memory, load, the date and the commit measured.

use anyhow::Context as _;

/// What the report says about the machine.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Cores available to this process.
    pub cores: usize,
    /// The CPU's model name from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// The kernel release.
    pub kernel: String,
    /// Total memory, in GiB.
    pub memory_gib: f64,
    /// When the benchmark ran (UTC, RFC 3339).
    pub date: String,
    /// The commit measured, when run inside a git work tree.
    pub commit: Option<String>,
}

impl Machine {
    /// Reads the facts.
    pub fn probe() -> anyhow::Result<Machine> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .context("reading /proc/sys/kernel/osrelease")?
            .trim()
            .to_string();
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .context("reading /proc/meminfo")?
            .lines()
            .find_map(|line| {
                line.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0);
        let date = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
            .format(&time::format_description::well_known::Rfc3339)
            .context("formatting the date")?;
        Ok(Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            memory_gib: memory_kib / (1024.0 * 1024.0),
            date,
            commit: git_commit(),
        })
    }
}

/// The load average over the last minute, to show how busy the shared machine was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}

fn git_commit() -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    let commit = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (output.status.success() && !commit.is_empty()).then_some(commit)
}

/// The first line a tool prints about its version (on stdout or stderr), such as
/// `nginx version: nginx/1.22.1`.
pub async fn tool_version(tool: &std::path::Path, flag: &str) -> String {
    let Ok(output) = tokio::process::Command::new(tool).arg(flag).output().await else {
        return "unknown".to_string();
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .next()
        .map(|line| {
            line.split(" Copyright")
                .next()
                .unwrap_or(line)
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "unknown".to_string())
}
