//! What the benchmarks read from `/proc`: resident memory and CPU time of a process (and of its
//! children, for nginx's workers).

use std::path::Path;

use anyhow::{Context as _, bail};

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on every Linux architecture
/// this runs on; the kernel converts to it for user space whatever its own tick rate).
pub const TICKS_PER_SEC: u64 = 100;

/// A memory figure from `/proc/<pid>/status`, such as `VmRSS` or `VmHWM`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&text, field).with_context(|| format!("{field} in {path}"))
}

fn parse_status_kib(status: &str, field: &str) -> anyhow::Result<u64> {
    for line in status.lines() {
        let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let value = words.next().context("no value")?;
        if words.next() != Some("kB") {
            bail!("expected a value in kB, got {line:?}");
        }
        return value.parse().with_context(|| format!("value in {line:?}"));
    }
    bail!("no {field} line")
}

/// User plus system CPU time, in ticks, of `pid` and all its descendants that are running now.
pub fn cpu_ticks_tree(pid: u32) -> anyhow::Result<u64> {
    let mut total = cpu_ticks(pid)?;
    for child in children(pid)? {
        // A child may exit between the listing and the read; it then simply stops counting.
        total += cpu_ticks_tree(child).unwrap_or(0);
    }
    Ok(total)
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_ticks(&text).with_context(|| format!("parsing {path}"))
}

/// utime + stime from a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from its closing parenthesis.
fn parse_stat_ticks(stat: &str) -> anyhow::Result<u64> {
    let (_, rest) = stat
        .rsplit_once(')')
        .context("no ')' after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn children(pid: u32) -> anyhow::Result<Vec<u32>> {
    let tasks = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
        let file = task?.path().join("children");
        // Needs CONFIG_PROC_CHILDREN; without it the tree is the process alone.
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for word in text.split_whitespace() {
            out.push(
                word.parse()
                    .with_context(|| format!("pid in {}", file.display()))?,
            );
        }
    }
    Ok(out)
}

/// Whether an ELF file still has a symbol table (`.symtab`), i.e. was not stripped.
pub fn has_symbol_table(path: &Path) -> anyhow::Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes.windows(8).any(|w| w == b".symtab\0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_lines() {
        let status = "Name:\tdrover-agent\nVmHWM:\t    5120 kB\nVmRSS:\t    4096 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS").unwrap(), 4096);
        assert_eq!(parse_status_kib(status, "VmHWM").unwrap(), 5120);
        assert!(parse_status_kib(status, "VmSwap").is_err());
    }

    #[test]
    fn reads_cpu_ticks_past_odd_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 1000 200";
        assert_eq!(parse_stat_ticks(stat).unwrap(), 10);
    }

    #[test]
    fn this_process_is_measurable() {
        let pid = std::process::id();
        assert!(status_kib(pid, "VmRSS").unwrap() > 0);
        cpu_ticks_tree(pid).unwrap();
    }
}
