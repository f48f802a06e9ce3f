//! Crash-safe file writes, and the one error type for local file trouble.
//!
//! Every state file the agent keeps goes through [`write_atomic`]: write a temporary file
//! beside the target, fsync it, rename it over the target, fsync the directory. After a power
//! cut the file is therefore either the old version or the new one, never a torn mix, and the
//! rename itself is durable. Nothing else in the crate writes state files by hand.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Mode for files only the agent may read: the identity key and the credential.
pub const PRIVATE: u32 = 0o600;
/// Mode for ordinary state files.
pub const PUBLIC: u32 = 0o644;

/// A local file operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FileError {
    /// What was being done ("writing", "reading", ...).
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

impl FileError {
    /// Wraps an `io::Error` with what was being done to which path.
    pub fn new(action: &'static str, path: &Path, source: io::Error) -> FileError {
        FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Shorthand for attaching an action and a path to an `io::Result`.
pub trait Context<T> {
    /// Turns an `io::Error` into a [`FileError`].
    fn at(self, action: &'static str, path: &Path) -> Result<T, FileError>;
}

impl<T> Context<T> for io::Result<T> {
    fn at(self, action: &'static str, path: &Path) -> Result<T, FileError> {
        self.map_err(|e| FileError::new(action, path, e))
    }
}

/// Replaces `path` with `bytes` atomically and durably, leaving the file with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let tmp = temp_path(path);
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .at("creating", &tmp)?;
        // A leftover temporary file from a crash keeps its old mode through `truncate`, so the
        // mode is set again explicitly before any secret is written into it.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .at("setting permissions on", &tmp)?;
        file.write_all(bytes).at("writing", &tmp)?;
        file.sync_all().at("syncing", &tmp)?;
    }
    fs::rename(&tmp, path).at("renaming into place", path)?;
    sync_parent(path)
}

/// Serialises `value` as pretty JSON and writes it with [`write_atomic`].
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), FileError> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| FileError::new("encoding", path, io::Error::other(e)))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, mode)
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, FileError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FileError::new("reading", path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        FileError::new(
            "parsing",
            path,
            io::Error::new(io::ErrorKind::InvalidData, e),
        )
    })
}

/// Reads a text file; `Ok(None)` when it does not exist.
pub fn read_text(path: &Path) -> Result<Option<String>, FileError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FileError::new("reading", path, e)),
    }
}

/// Makes the directory entry for `path` durable (after a create, rename or delete in it).
pub fn sync_parent(path: &Path) -> Result<(), FileError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

/// fsyncs a directory.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .at("syncing directory", dir)
}

/// Removes a file or a whole directory tree if it exists.
pub fn remove_if_exists(path: &Path) -> Result<(), FileError> {
    let result = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.at("removing", path)
}

/// Creates a directory and its parents with the given mode for any it creates.
pub fn create_dir_all(path: &Path, mode: u32) -> Result<(), FileError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .at("creating directory", path)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_sets_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credential");
        write_atomic(&path, b"one", PUBLIC).unwrap();
        write_atomic(&path, b"two", PRIVATE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_leftover_temp_file_with_a_loose_mode_does_not_leak_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let tmp = temp_path(&path);
        fs::write(&tmp, b"junk from a crash").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&path, b"secret", PRIVATE).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }

    #[test]
    fn json_round_trips_and_missing_files_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), None);
        write_json_atomic(&path, &vec![1u32, 2], PUBLIC).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), Some(vec![1, 2]));
        fs::write(&path, b"{not json").unwrap();
        let err = read_json::<Vec<u32>>(&path).unwrap_err().to_string();
        assert!(err.starts_with("parsing"), "{err}");
    }
}
