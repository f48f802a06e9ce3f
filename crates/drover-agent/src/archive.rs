//! Unpacking release archives (gzip-compressed tar and zip) into a fresh directory, refusing
//! anything that would write outside it.
//!
//! Artifacts are signed, so a hostile archive means a compromised release key, but unpacking runs
//! as root and a mistake in a build script (an absolute path, a stray `..`) must not overwrite
//! the system. Refused: absolute paths, `..` components, symlinks whose target is absolute or
//! climbs out of the directory, hard links to paths outside it, device files and pipes. Files are
//! never written through a symlinked parent that leads outside.
//!
//! Unpacking is blocking work: callers run it on a blocking thread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use drover_protocol::artifact::ArtifactFormat;

use crate::fsutil::{Context as _, FileError};

/// The longest symlink target read from a zip entry.
const MAX_LINK_TARGET: u64 = 4096;

/// Why an archive could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A local file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The archive is not a valid tar.gz or zip.
    #[error("the archive is damaged: {0}")]
    Corrupt(String),
    /// An entry could not be written.
    #[error("cannot unpack {entry:?}: {source}")]
    Unpack {
        /// The entry's path in the archive.
        entry: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// An entry would write outside the directory, or is of a refused kind.
    #[error("the archive entry {entry:?} {reason}; nothing from this archive was installed")]
    Unsafe {
        /// The entry's path in the archive.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The artifact is a bare script, not an archive.
    #[error("the artifact is a {}, not an archive", format.as_str())]
    NotArchive {
        /// What it is.
        format: ArtifactFormat,
    },
}

/// Unpacks `archive` into `dest`, which must not exist yet, and fsyncs what it wrote.
pub fn unpack(format: ArtifactFormat, archive: &Path, dest: &Path) -> Result<(), ArchiveError> {
    fs::create_dir(dest).at("creating directory", dest)?;
    match format {
        ArtifactFormat::TarGz => unpack_tar_gz(archive, dest)?,
        ArtifactFormat::Zip => unpack_zip(archive, dest)?,
        ArtifactFormat::Shell | ArtifactFormat::NodeScript => {
            return Err(ArchiveError::NotArchive { format });
        }
    }
    sync_tree(dest)
}

fn unpack_tar_gz(archive: &Path, dest: &Path) -> Result<(), ArchiveError> {
    let file = File::open(archive).at("opening", archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(true);
    let corrupt = |e: io::Error| ArchiveError::Corrupt(e.to_string());
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = entry.path().map_err(corrupt)?.into_owned();
        let name = raw.display().to_string();
        let unsafe_entry = |reason| ArchiveError::Unsafe {
            entry: name.clone(),
            reason,
        };
        let rel = safe_relative(&raw).map_err(unsafe_entry)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(corrupt)?
                .ok_or_else(|| unsafe_entry("is a symlink without a target"))?;
            check_link(&rel, &target).map_err(unsafe_entry)?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(corrupt)?
                .ok_or_else(|| unsafe_entry("is a hard link without a target"))?;
            safe_relative(&target)
                .map_err(|_| unsafe_entry("is a hard link to a path outside the archive"))?;
        } else if !(kind.is_file() || kind.is_dir() || kind.is_contiguous()) {
            return Err(unsafe_entry("is a device file, pipe or other special file"));
        }
        // `unpack_in` checks again that the entry lands inside `dest` after resolving any
        // symlinked parent directories.
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|source| ArchiveError::Unpack {
                entry: name.clone(),
                source,
            })?;
        if !unpacked {
            return Err(unsafe_entry(
                "would be written outside the release directory",
            ));
        }
    }
    Ok(())
}

fn unpack_zip(archive: &Path, dest: &Path) -> Result<(), ArchiveError> {
    let file = File::open(archive).at("opening", archive)?;
    let corrupt = |e: zip::result::ZipError| ArchiveError::Corrupt(e.to_string());
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(corrupt)?;
    let root = dest.canonicalize().at("resolving", dest)?;
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(corrupt)?;
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        let unsafe_entry = |reason| ArchiveError::Unsafe {
            entry: name.clone(),
            reason,
        };
        let rel = safe_relative(Path::new(&name)).map_err(unsafe_entry)?;
        if entry.enclosed_name().is_none() {
            return Err(unsafe_entry(
                "would be written outside the release directory",
            ));
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        let path = dest.join(&rel);
        let unpack_error = |source| ArchiveError::Unpack {
            entry: name.clone(),
            source,
        };
        if entry.is_dir() {
            fs::create_dir_all(&path).map_err(unpack_error)?;
            ensure_inside(&root, &path).map_err(unsafe_entry)?;
            continue;
        }
        let parent = path.parent().unwrap_or(dest);
        fs::create_dir_all(parent).map_err(unpack_error)?;
        ensure_inside(&root, parent).map_err(unsafe_entry)?;
        // Never write through whatever is there already (it could be a symlink from an earlier
        // entry): remove it, then create the file exclusively.
        remove_entry(&path).map_err(unpack_error)?;
        if entry.is_symlink() {
            let mut target = String::new();
            entry
                .by_ref()
                .take(MAX_LINK_TARGET)
                .read_to_string(&mut target)
                .map_err(unpack_error)?;
            check_link(&rel, Path::new(&target)).map_err(unsafe_entry)?;
            std::os::unix::fs::symlink(&target, &path).map_err(unpack_error)?;
            continue;
        }
        let mode = entry.unix_mode().map_or(0o644, |m| m & 0o777);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(unpack_error)?;
        io::copy(&mut entry, &mut out)
            .map_err(|e| ArchiveError::Corrupt(format!("{name}: {e}")))?;
        // The process umask may have cleared bits the release needs (an executable start script).
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(unpack_error)?;
    }
    Ok(())
}

/// The path with `.` components dropped, if it is relative and has no `..`.
pub fn safe_relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    Ok(out)
}

/// Checks that a symlink at `link` (relative to the release directory) pointing at `target`
/// stays inside the directory, judged by the path alone.
pub fn check_link(link: &Path, target: &Path) -> Result<(), &'static str> {
    let mut at: Vec<_> = link
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for component in target.components() {
        match component {
            Component::Normal(_) => at.push(component),
            Component::CurDir => {}
            Component::ParentDir => {
                if at.pop().is_none() {
                    return Err("is a symlink pointing outside the release directory");
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("is a symlink to an absolute path");
            }
        }
    }
    Ok(())
}

fn ensure_inside(root: &Path, dir: &Path) -> Result<(), &'static str> {
    match dir.canonicalize() {
        Ok(real) if real.starts_with(root) => Ok(()),
        _ => Err("would be written through a symlink leading outside the release directory"),
    }
}

fn remove_entry(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    }
}

/// fsyncs every file and directory under `root` (symlinks are not followed), so that a release
/// directory renamed into place after a power cut holds what was unpacked, not empty files.
fn sync_tree(root: &Path) -> Result<(), ArchiveError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).at("listing", &dir)? {
            let entry = entry.at("listing", &dir)?;
            let path = entry.path();
            let kind = entry.file_type().at("inspecting", &path)?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .at("syncing", &path)?;
            }
        }
        crate::fsutil::sync_dir(&dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Entry, write_tar_gz, write_zip};

    fn good_entries() -> Vec<Entry<'static>> {
        vec![
            Entry::Dir("app/"),
            Entry::File("app/run.sh", b"#!/bin/sh\necho run\n", 0o755),
            Entry::File("app/data/config.txt", b"x=1\n", 0o644),
            Entry::Link("app/link", "data/config.txt"),
            Entry::Link("app/data/up", "../run.sh"),
        ]
    }

    fn check_good(dest: &Path) {
        let run = dest.join("app/run.sh");
        assert_eq!(fs::read(&run).unwrap(), b"#!/bin/sh\necho run\n");
        let mode = fs::metadata(&run).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "executable bit kept: {mode:o}");
        assert_eq!(fs::read(dest.join("app/link")).unwrap(), b"x=1\n");
        assert_eq!(
            fs::read(dest.join("app/data/up")).unwrap(),
            b"#!/bin/sh\necho run\n"
        );
    }

    #[test]
    fn unpacks_tar_gz_and_zip_with_modes_and_inner_links() {
        let dir = tempfile::tempdir().unwrap();
        let tgz = dir.path().join("a.tar.gz");
        write_tar_gz(&tgz, &good_entries());
        unpack(ArtifactFormat::TarGz, &tgz, &dir.path().join("t")).unwrap();
        check_good(&dir.path().join("t"));

        let zip = dir.path().join("a.zip");
        write_zip(&zip, &good_entries());
        unpack(ArtifactFormat::Zip, &zip, &dir.path().join("z")).unwrap();
        check_good(&dir.path().join("z"));
    }

    fn refused(entries: &[Entry<'_>]) -> Vec<String> {
        let mut errors = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        let tgz = dir.path().join("a.tar.gz");
        write_tar_gz(&tgz, entries);
        let dest = dir.path().join("sub/t");
        fs::create_dir(dir.path().join("sub")).unwrap();
        errors.push(
            unpack(ArtifactFormat::TarGz, &tgz, &dest)
                .unwrap_err()
                .to_string(),
        );
        let zip = dir.path().join("a.zip");
        write_zip(&zip, entries);
        let dest = dir.path().join("sub/z");
        errors.push(
            unpack(ArtifactFormat::Zip, &zip, &dest)
                .unwrap_err()
                .to_string(),
        );
        // Nothing landed beside the release directories.
        let mut beside: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        beside.sort();
        assert_eq!(beside, vec!["t", "z"]);
        assert!(!dir.path().join("evil").exists());
        errors
    }

    #[test]
    fn path_traversal_is_refused() {
        for err in refused(&[Entry::File("../evil", b"x", 0o644)]) {
            assert!(err.contains("'..'"), "{err}");
        }
        for err in refused(&[Entry::File("ok/../../evil", b"x", 0o644)]) {
            assert!(err.contains("'..'"), "{err}");
        }
    }

    #[test]
    fn absolute_paths_are_refused() {
        let target = tempfile::tempdir().unwrap();
        let abs = target.path().join("evil");
        for err in refused(&[Entry::File(abs.to_str().unwrap(), b"x", 0o644)]) {
            assert!(err.contains("absolute"), "{err}");
        }
        assert!(!abs.exists());
    }

    #[test]
    fn escaping_symlinks_are_refused() {
        for err in refused(&[Entry::Link("up", "../..")]) {
            assert!(err.contains("outside"), "{err}");
        }
        for err in refused(&[Entry::Link("etc", "/etc")]) {
            assert!(err.contains("absolute"), "{err}");
        }
        // A link that would be fine, followed by a file written through an escaping one.
        for err in refused(&[
            Entry::Dir("d/"),
            Entry::Link("d/out", "../../.."),
            Entry::File("d/out/evil", b"x", 0o644),
        ]) {
            assert!(err.contains("outside"), "{err}");
        }
    }

    #[test]
    fn link_checks_follow_the_links_own_directory() {
        assert!(check_link(Path::new("a/b/link"), Path::new("../../x")).is_ok());
        assert!(check_link(Path::new("a/b/link"), Path::new("../../../x")).is_err());
        assert!(check_link(Path::new("link"), Path::new("./x/../y")).is_ok());
        assert!(check_link(Path::new("link"), Path::new("..")).is_err());
        assert_eq!(
            safe_relative(Path::new("./a/./b")).unwrap(),
            PathBuf::from("a/b")
        );
    }

    #[test]
    fn damaged_archives_are_reported_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad");
        fs::write(&bad, b"\x1f\x8bnot really gzip").unwrap();
        let err = unpack(ArtifactFormat::TarGz, &bad, &dir.path().join("t")).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        fs::write(&bad, b"PK\x03\x04truncated").unwrap();
        let err = unpack(ArtifactFormat::Zip, &bad, &dir.path().join("z")).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
