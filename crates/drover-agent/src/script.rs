//! The `script` install module: the seed updater's contract, kept so that existing update
//! scripts run unchanged.
//!
//! An archive is unpacked into `work/<version>.partial` and renamed to `work/<version>` once
//! complete; `update.sh` must sit at its root or exactly one folder down. A bare shell artifact
//! is itself the script. The script runs with its own folder as the working directory and the
//! environment variables the seed's scripts expect: `apps_root`, `update_root` (the script's
//! folder) and `config` (the device's config as a JSON string), plus `DROVER_RELEASE` and
//! `DROVER_CONFIG_FILE` (the path of the same config in a file). It is
//! executed directly, so its `#!` line is honoured and its parent process is the agent.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_protocol::artifact::ArtifactFormat;
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveError};
use crate::fsutil::{self, Context as _, FileError};
use crate::process::{self, Finished, Invocation, ProcessError};

/// The script's name inside an archive.
pub const SCRIPT_NAME: &str = "update.sh";

/// Why a script could not be prepared or run.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// A local file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The archive could not be unpacked.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// No `update.sh` where the seed contract puts it.
    #[error(
        "the archive has no update.sh at its root or one folder down (found at the root: {found})"
    )]
    NoScript {
        /// What the archive's root holds, for the report.
        found: String,
    },
    /// More than one folder holds an `update.sh`.
    #[error("the archive has update.sh in more than one folder ({0}); keep exactly one")]
    Ambiguous(String),
    /// The script could not be started.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// What the script is told about the update.
#[derive(Debug, Clone)]
pub struct ScriptEnv {
    /// The release version (`DROVER_RELEASE`).
    pub release: String,
    /// `apps_root`.
    pub apps_root: PathBuf,
    /// The device config as JSON (`config`).
    pub config_json: String,
    /// `<state_dir>/config.json`, the same config as a file (`DROVER_CONFIG_FILE`).
    pub config_file: PathBuf,
}

/// The unpack directory for a version, and its in-progress twin.
pub fn work_dirs(work: &Path, version: &str) -> (PathBuf, PathBuf) {
    (work.join(version), work.join(format!("{version}.partial")))
}

/// Unpacks (or copies, for a bare script) a verified artifact into `work/<version>` and returns
/// the path of `update.sh`. Whatever an earlier, interrupted try left behind is removed first.
/// Blocking: run it on a blocking thread.
pub fn prepare(
    format: ArtifactFormat,
    artifact: &Path,
    work: &Path,
    version: &str,
) -> Result<PathBuf, ScriptError> {
    let (done, partial) = work_dirs(work, version);
    fsutil::remove_if_exists(&partial)?;
    fsutil::remove_if_exists(&done)?;
    if format.is_archive() {
        archive::unpack(format, artifact, &partial)?;
    } else {
        fs::create_dir(&partial).at("creating directory", &partial)?;
        let script = partial.join(SCRIPT_NAME);
        fs::copy(artifact, &script).at("copying the script to", &script)?;
        fs::File::open(&script)
            .and_then(|f| f.sync_all())
            .at("syncing", &script)?;
    }
    fs::rename(&partial, &done).at("renaming into place", &done)?;
    fsutil::sync_dir(work)?;
    find_script(&done)
}

/// `update.sh` at `root`, or in exactly one of its immediate subfolders.
pub fn find_script(root: &Path) -> Result<PathBuf, ScriptError> {
    let at_root = root.join(SCRIPT_NAME);
    if at_root.is_file() {
        return Ok(at_root);
    }
    let mut found = Vec::new();
    let mut names = Vec::new();
    for entry in fs::read_dir(root).at("listing", root)? {
        let entry = entry.at("listing", root)?;
        names.push(entry.file_name().to_string_lossy().into_owned());
        let candidate = entry.path().join(SCRIPT_NAME);
        // Not following a symlinked folder: the script must be in the archive itself.
        if entry.file_type().at("inspecting", &entry.path())?.is_dir() && candidate.is_file() {
            found.push(candidate);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => {
            names.sort();
            let found = if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            };
            Err(ScriptError::NoScript { found })
        }
        _ => {
            let mut dirs: Vec<String> = found
                .iter()
                .filter_map(|p| p.parent().and_then(Path::file_name))
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            dirs.sort();
            Err(ScriptError::Ambiguous(dirs.join(", ")))
        }
    }
}

/// Runs `update.sh` with the seed contract's environment, in its own folder.
pub async fn run(
    script: &Path,
    env: &ScriptEnv,
    timeout: Duration,
    log: PathBuf,
    cancel: &CancellationToken,
) -> Result<Finished, ScriptError> {
    let folder = script.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut perms = fs::metadata(script).at("inspecting", script)?.permissions();
    perms.set_mode(perms.mode() | 0o755);
    fs::set_permissions(script, perms).at("making executable", script)?;
    let invocation = Invocation {
        program: script.to_path_buf(),
        args: Vec::new(),
        cwd: folder.clone(),
        env: vec![
            ("apps_root".into(), env.apps_root.display().to_string()),
            ("update_root".into(), folder.display().to_string()),
            ("config".into(), env.config_json.clone()),
            (
                "DROVER_CONFIG_FILE".into(),
                env.config_file.display().to_string(),
            ),
            ("DROVER_RELEASE".into(), env.release.clone()),
        ],
        timeout,
        log,
    };
    Ok(process::run(&invocation, cancel).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Ending;
    use crate::testutil::{Entry, write_tar_gz, write_zip};

    const REPORTER: &[u8] = b"#!/bin/sh
echo \"apps_root=$apps_root\"
echo \"update_root=$update_root\"
echo \"config=$config\"
echo \"release=$DROVER_RELEASE\"
echo \"config_file=$DROVER_CONFIG_FILE\"
echo \"pwd=$(pwd)\"
echo oops >&2
";

    fn env(dir: &Path) -> ScriptEnv {
        ScriptEnv {
            release: "1.2.3".into(),
            apps_root: dir.join("apps"),
            config_json: r#"{"meter":{"name":"a b"}}"#.into(),
            config_file: dir.join("config.json"),
        }
    }

    #[tokio::test]
    async fn runs_update_sh_one_folder_down_with_the_seed_environment() {
        let dir = tempfile::tempdir().unwrap();
        let artifact = dir.path().join("a.zip");
        write_zip(
            &artifact,
            &[
                Entry::Dir("bundle/"),
                // Without the executable bit, as zips made on other systems often are.
                Entry::File("bundle/update.sh", REPORTER, 0o644),
            ],
        );
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let script = prepare(ArtifactFormat::Zip, &artifact, &work, "1.2.3").unwrap();
        assert_eq!(script, work.join("1.2.3/bundle/update.sh"));
        let done = run(
            &script,
            &env(dir.path()),
            Duration::from_secs(30),
            work.join("out.log"),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(done.success(), "{done:?}");
        let folder = work.join("1.2.3/bundle").canonicalize().unwrap();
        let expected = format!(
            "apps_root={}\nupdate_root={}\nconfig={}\nrelease=1.2.3\nconfig_file={}\npwd={}\noops\n",
            dir.path().join("apps").display(),
            work.join("1.2.3/bundle").display(),
            r#"{"meter":{"name":"a b"}}"#,
            dir.path().join("config.json").display(),
            folder.display(),
        );
        assert_eq!(done.output, expected);
        assert!(
            std::env::var("update_root").is_err(),
            "set on the child only"
        );
    }

    #[tokio::test]
    async fn a_failing_script_reports_its_output_and_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let artifact = dir.path().join("a.tar.gz");
        write_tar_gz(
            &artifact,
            &[Entry::File(
                "update.sh",
                b"#!/bin/sh\necho step 1\necho broken >&2\nexit 7\n",
                0o755,
            )],
        );
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let script = prepare(ArtifactFormat::TarGz, &artifact, &work, "2").unwrap();
        assert_eq!(script, work.join("2/update.sh"));
        let done = run(
            &script,
            &env(dir.path()),
            Duration::from_secs(30),
            work.join("out.log"),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(done.ending, Ending::Exited(7));
        assert_eq!(done.output, "step 1\nbroken\n");
    }

    #[tokio::test]
    async fn a_bare_shell_artifact_is_the_script_and_times_out_as_a_group() {
        let dir = tempfile::tempdir().unwrap();
        let artifact = dir.path().join("artifact");
        let pid_file = dir.path().join("child.pid");
        fs::write(
            &artifact,
            format!(
                "#!/bin/sh\nsleep 3600 &\necho $! > {}\nwait\n",
                pid_file.display()
            ),
        )
        .unwrap();
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let script = prepare(ArtifactFormat::Shell, &artifact, &work, "3").unwrap();
        let done = run(
            &script,
            &env(dir.path()),
            Duration::from_millis(300),
            work.join("out.log"),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(done.ending, Ending::TimedOut);
        let pid = fs::read_to_string(&pid_file).unwrap().trim().to_string();
        crate::testutil::wait_until("the script's child to die", || {
            !crate::testutil::process_alive(&pid)
        })
        .await;
    }

    #[test]
    fn a_missing_or_ambiguous_update_sh_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let artifact = dir.path().join("a.tar.gz");
        write_tar_gz(
            &artifact,
            &[Entry::File("install.sh", b"#!/bin/sh\n", 0o755)],
        );
        let err = prepare(ArtifactFormat::TarGz, &artifact, &work, "4").unwrap_err();
        assert!(err.to_string().contains("no update.sh"), "{err}");
        assert!(err.to_string().contains("install.sh"), "{err}");

        write_tar_gz(
            &artifact,
            &[Entry::File("a/b/update.sh", b"#!/bin/sh\n", 0o755)],
        );
        let err = prepare(ArtifactFormat::TarGz, &artifact, &work, "5").unwrap_err();
        assert!(
            err.to_string().contains("no update.sh"),
            "two levels down is too deep: {err}"
        );

        write_tar_gz(
            &artifact,
            &[
                Entry::File("a/update.sh", b"#!/bin/sh\n", 0o755),
                Entry::File("b/update.sh", b"#!/bin/sh\n", 0o755),
            ],
        );
        let err = prepare(ArtifactFormat::TarGz, &artifact, &work, "6").unwrap_err();
        assert!(err.to_string().contains("more than one"), "{err}");
    }

    #[test]
    fn an_interrupted_unpack_is_redone_from_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let (done, partial) = work_dirs(&work, "7");
        fs::create_dir_all(partial.join("junk")).unwrap();
        fs::create_dir_all(&done).unwrap();
        fs::write(done.join("stale"), b"x").unwrap();
        let artifact = dir.path().join("a.tar.gz");
        write_tar_gz(
            &artifact,
            &[Entry::File("update.sh", b"#!/bin/sh\n", 0o755)],
        );
        prepare(ArtifactFormat::TarGz, &artifact, &work, "7").unwrap();
        assert!(!partial.exists());
        assert!(!done.join("stale").exists());
        assert!(done.join("update.sh").exists());
    }
}
