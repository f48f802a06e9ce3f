//! Helpers shared by the unit tests: waiting on conditions (never on fixed sleeps), and small
//! archive builders.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a test waits for a condition before failing.
const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `condition` until it holds; panics with `what` after [`PATIENCE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A meter clock stopped at one instant (June 2025), in the given state.
#[derive(Debug)]
pub struct FixedClock(pub drover_protocol::reading::ClockState);

impl crate::meters::clock::Clock for FixedClock {
    fn now_ms(&self) -> i64 {
        1_750_000_000_000
    }
    fn state(&self) -> drover_protocol::reading::ClockState {
        self.0
    }
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.trim().chars().next());
            state != Some('Z')
        }
    }
}

/// An entry for the archive builders.
pub enum Entry<'a> {
    /// A regular file with its mode.
    File(&'a str, &'a [u8], u32),
    /// A directory.
    Dir(&'a str),
    /// A symlink and its target.
    Link(&'a str, &'a str),
}

/// Writes a gzip-compressed tar archive. Paths are written raw into the header, so that tests
/// can build the hostile archives the tar crate's builder would refuse to make.
pub fn write_tar_gz(path: &Path, entries: &[Entry<'_>]) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let (name, data): (&str, &[u8]) = match entry {
            Entry::File(name, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                (name, data)
            }
            Entry::Dir(name) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                (name, &[])
            }
            Entry::Link(name, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                set_raw(&mut header.as_old_mut().linkname, target);
                (name, &[])
            }
        };
        set_raw(&mut header.as_old_mut().name, name);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder
        .into_inner()
        .unwrap()
        .finish()
        .unwrap()
        .flush()
        .unwrap();
}

fn set_raw(field: &mut [u8], text: &str) {
    field.fill(0);
    field[..text.len()].copy_from_slice(text.as_bytes());
}

/// Writes a zip archive (deflate).
pub fn write_zip(path: &Path, entries: &[Entry<'_>]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    for entry in entries {
        match entry {
            Entry::File(name, data, mode) => {
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated)
                    .unix_permissions(*mode);
                zip.start_file(*name, options).unwrap();
                zip.write_all(data).unwrap();
            }
            Entry::Dir(name) => {
                zip.add_directory(*name, zip::write::SimpleFileOptions::default())
                    .unwrap();
            }
            Entry::Link(name, target) => {
                zip.add_symlink(*name, *target, zip::write::SimpleFileOptions::default())
                    .unwrap();
            }
        }
    }
    zip.finish().unwrap();
}
