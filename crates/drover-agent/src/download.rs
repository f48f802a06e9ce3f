//! Fetching a release's artifact: resumable with HTTP Range, checked against the offered size,
//! SHA-256 and the fleet's release signature before it is renamed to its verified name.
//!
//! - `downloads/<sha256>.part` grows as bytes arrive. After a cut (or an agent restart) the
//!   download resumes with `Range: bytes=N-` and `If-Range: "<sha256>"`; a `200` means the hub
//!   sends the whole artifact again, a `416` means the part is past the end and is discarded.
//! - The HTTP status is always checked: the seed updater once saved an error page as
//!   `update.sh`.
//! - Only a file whose size and hash match the signed manifest is renamed to
//!   `downloads/<sha256>`. Nothing from an unverified file is ever unpacked or run.
//!
//! Errors are sorted by what should happen next: [`DownloadError::Transient`] keeps the part
//! file and tries later without counting a failed attempt (the network is not the release's
//! fault); [`DownloadError::Rejected`] means the artifact is wrong and the attempt failed.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

use drover_protocol::device::ReleaseOffer;
use drover_protocol::signing::ReleasePublicKey;
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::client::{HubClient, refusal};
use crate::crash::{CrashPoint, CrashPoints};
use crate::fsutil::{self, Context as _, FileError};

/// Why a download did not produce a verified file.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Try again later; the partial download is kept.
    #[error("{0}")]
    Transient(String),
    /// The artifact or its offer is wrong: this attempt failed.
    #[error("{0}")]
    Rejected(String),
    /// A local file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The agent is shutting down.
    #[error("the download was stopped because the agent is shutting down")]
    Cancelled,
}

/// Checks an offer before a byte is downloaded: names that become paths, the device type, and
/// the release signature over the manifest.
pub fn check_offer(
    offer: &ReleaseOffer,
    release_key: Option<&ReleasePublicKey>,
    device_type: &str,
) -> Result<(), String> {
    drover_protocol::validate::release_version(&offer.version).map_err(|e| e.to_string())?;
    let hex_ok = offer.sha256.len() == 64
        && offer
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex_ok {
        return Err(format!(
            "the offered sha256 {:?} is not 64 lower-case hex digits",
            offer.sha256
        ));
    }
    if let Some(wanted) = &offer.device_type
        && wanted != device_type
    {
        return Err(format!(
            "release {} is built for device type {wanted:?}, but this device is {device_type:?}",
            offer.version
        ));
    }
    let Some(key) = release_key else {
        return Err(
            "no release key is known: pin `release_key` in the agent config, or give the \
                    fleet a release key so that the hub hands it out at enrolment"
                .into(),
        );
    };
    offer
        .manifest()
        .verify(key, &offer.signature)
        .map_err(|e| format!("release {} refused: {e}", offer.version))
}

/// The verified artifact's path.
pub fn verified_path(downloads: &Path, sha256: &str) -> PathBuf {
    downloads.join(sha256)
}

/// The partial download's path.
pub fn part_path(downloads: &Path, sha256: &str) -> PathBuf {
    downloads.join(format!("{sha256}.part"))
}

/// Everything a download needs.
#[derive(Debug)]
pub struct Downloader<'a> {
    /// The hub.
    pub client: &'a HubClient,
    /// The device credential.
    pub credential: &'a str,
    /// `downloads/`.
    pub dir: &'a Path,
    /// Test crash hooks.
    pub crash: &'a CrashPoints,
    /// Stops the download on shutdown.
    pub cancel: &'a CancellationToken,
}

impl Downloader<'_> {
    /// Downloads (or resumes, or finds already verified) the offer's artifact and returns the
    /// verified file. The offer must have passed [`check_offer`].
    pub async fn fetch(&self, offer: &ReleaseOffer) -> Result<PathBuf, DownloadError> {
        let verified = verified_path(self.dir, &offer.sha256);
        if verified.exists() {
            let (hasher, len) = hash_file(&verified).await?;
            if len == offer.size && hex(hasher) == offer.sha256 {
                return Ok(verified);
            }
            tracing::warn!(path = %verified.display(), "a verified download changed on disk; fetching it again");
            fsutil::remove_if_exists(&verified)?;
        }
        let part = part_path(self.dir, &offer.sha256);
        // A part file resumed from disk may hold bytes a power cut garbled; if its hash does not
        // match, one fresh download from byte 0 decides.
        let mut fresh_tried = false;
        loop {
            let (digest, resumed) = self.fetch_part(offer, &part).await?;
            if digest == offer.sha256 {
                break;
            }
            fsutil::remove_if_exists(&part)?;
            if resumed && !fresh_tried {
                fresh_tried = true;
                tracing::warn!(release = %offer.version, "resumed download has the wrong hash; downloading it again from the start");
                continue;
            }
            return Err(DownloadError::Rejected(format!(
                "the downloaded artifact's sha256 is {digest}, but release {} was signed with {}",
                offer.version, offer.sha256
            )));
        }
        fs::rename(&part, &verified).at("renaming into place", &verified)?;
        fsutil::sync_parent(&verified)?;
        self.crash.hit(CrashPoint::Verified);
        Ok(verified)
    }

    /// Brings the part file to exactly `offer.size` bytes and returns its SHA-256 and whether
    /// bytes from an earlier run were reused.
    async fn fetch_part(
        &self,
        offer: &ReleaseOffer,
        part: &Path,
    ) -> Result<(String, bool), DownloadError> {
        let url = self.client.resolve(&offer.artifact_url).ok_or_else(|| {
            DownloadError::Rejected(format!(
                "the artifact URL {:?} is not on the hub; the device credential is only sent to the hub",
                offer.artifact_url
            ))
        })?;
        let etag = format!("\"{}\"", offer.sha256);
        let mut restarted = false;
        loop {
            let have = file_len(part)?;
            if have > offer.size {
                fsutil::remove_if_exists(part)?;
                continue;
            }
            if have == offer.size {
                let (hasher, _) = hash_file(part).await?;
                return Ok((hex(hasher), have > 0));
            }
            let response = tokio::select! {
                r = self.client.artifact(&url, self.credential, have, &etag) => {
                    r.map_err(|e| DownloadError::Transient(e.to_string()))?
                }
                () = self.cancel.cancelled() => return Err(DownloadError::Cancelled),
            };
            let status = response.status();
            let (hasher, start) = match status {
                StatusCode::OK => (Sha256::new(), 0),
                StatusCode::PARTIAL_CONTENT if content_range_start(&response) == Some(have) => {
                    let (hasher, len) = hash_file(part).await?;
                    (hasher, len)
                }
                StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE => {
                    // The part does not fit what the hub has: start over, once.
                    fsutil::remove_if_exists(part)?;
                    if restarted {
                        return Err(DownloadError::Transient(format!(
                            "the hub answered {status} to a download from byte 0"
                        )));
                    }
                    restarted = true;
                    continue;
                }
                StatusCode::NOT_FOUND | StatusCode::GONE => {
                    return Err(DownloadError::Rejected(format!(
                        "the hub has no artifact for release {} ({status} for {url})",
                        offer.version
                    )));
                }
                _ => {
                    return Err(DownloadError::Transient(
                        refusal(response, "artifact download").await.to_string(),
                    ));
                }
            };
            let sum = self.receive(response, part, hasher, start, offer).await?;
            return Ok((sum, start > 0));
        }
    }

    /// Appends the response body to the part file from `start`, hashing as it goes.
    async fn receive(
        &self,
        mut response: reqwest::Response,
        part: &Path,
        mut hasher: Sha256,
        start: u64,
        offer: &ReleaseOffer,
    ) -> Result<String, DownloadError> {
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .append(start > 0)
            .open(part)
            .await
            .at("opening", part)?;
        let mut written = start;
        let mut first = true;
        loop {
            let chunk = tokio::select! {
                c = tokio::time::timeout(crate::client::READ_TIMEOUT, response.chunk()) => match c {
                    Ok(c) => c,
                    Err(_) => {
                        file.flush().await.at("writing", part)?;
                        return Err(DownloadError::Transient(format!(
                            "the download stalled at {written} of {} bytes for {}s (it resumes from there)",
                            offer.size,
                            crate::client::READ_TIMEOUT.as_secs()
                        )));
                    }
                },
                () = self.cancel.cancelled() => {
                    file.flush().await.at("writing", part)?;
                    return Err(DownloadError::Cancelled);
                }
            };
            let chunk = match chunk {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    file.flush().await.at("writing", part)?;
                    return Err(DownloadError::Transient(format!(
                        "the download broke off at {written} of {} bytes (it resumes from there): {}",
                        offer.size,
                        crate::client::error_chain(&e)
                    )));
                }
            };
            written += chunk.len() as u64;
            if written > offer.size {
                drop(file);
                fsutil::remove_if_exists(part)?;
                return Err(DownloadError::Rejected(format!(
                    "the hub sent more than the {} bytes release {} was signed with",
                    offer.size, offer.version
                )));
            }
            file.write_all(&chunk).await.at("writing", part)?;
            hasher.update(&chunk);
            if first {
                first = false;
                file.flush().await.at("writing", part)?;
                self.crash.hit(CrashPoint::Download);
            }
        }
        file.flush().await.at("writing", part)?;
        file.sync_all().await.at("syncing", part)?;
        if written < offer.size {
            return Err(DownloadError::Transient(format!(
                "the download ended early at {written} of {} bytes (it resumes from there)",
                offer.size
            )));
        }
        Ok(hex(hasher))
    }
}

/// Removes every download except those for `keep` (a SHA-256), so the disk does not fill up
/// with old artifacts (the seed never deleted any).
pub fn remove_stale(downloads: &Path, keep: Option<&str>) -> Result<(), FileError> {
    let entries = match fs::read_dir(downloads) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FileError::new("listing", downloads, e)),
    };
    for entry in entries {
        let entry = entry.at("listing", downloads)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".part").unwrap_or(&name);
        if Some(stem) != keep {
            fsutil::remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

fn file_len(path: &Path) -> Result<u64, FileError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(FileError::new("inspecting", path, e)),
    }
}

fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let range = value.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// Hashes a file on a blocking thread; returns the hasher (to continue) and the length.
async fn hash_file(path: &Path) -> Result<(Sha256, u64), FileError> {
    let owned = path.to_path_buf();
    let result = tokio::task::spawn_blocking(move || -> io::Result<(Sha256, u64)> {
        let mut file = fs::File::open(&owned)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok((hasher, len));
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
    })
    .await
    .map_err(io::Error::other)
    .and_then(|r| r);
    result.at("hashing", path)
}

/// Checks a file against a SHA-256 (used before unpacking a verified file, which may have sat on
/// an SD card across a power cut).
pub async fn file_matches(path: &Path, sha256: &str, size: u64) -> Result<bool, FileError> {
    let (hasher, len) = hash_file(path).await?;
    Ok(len == size && hex(hasher) == sha256)
}

fn hex(hasher: Sha256) -> String {
    let mut out = String::with_capacity(64);
    for byte in hasher.finalize() {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::device::Module;
    use drover_protocol::signing::ReleaseSigningKey;

    fn offer_for(bytes: &[u8], key: &ReleaseSigningKey, device_type: Option<&str>) -> ReleaseOffer {
        let sha256 = drover_protocol::ids::sha256_hex(bytes);
        let mut offer = ReleaseOffer {
            version: "1.0".into(),
            module: Module::Script,
            device_type: device_type.map(str::to_string),
            artifact_url: format!("/device/v1/artifacts/{sha256}"),
            size: bytes.len() as u64,
            sha256,
            signature: String::new(),
        };
        offer.signature = offer.manifest().sign(key);
        offer
    }

    #[test]
    fn offers_are_checked_before_downloading() {
        let key = ReleaseSigningKey::generate();
        let public = key.public();
        let offer = offer_for(b"#!/bin/sh\n", &key, Some("rpi4"));
        check_offer(&offer, Some(&public), "rpi4").unwrap();

        let err = check_offer(&offer, Some(&public), "rpi3").unwrap_err();
        assert!(err.contains("device type"), "{err}");
        let err = check_offer(&offer, None, "rpi4").unwrap_err();
        assert!(err.contains("no release key"), "{err}");
        let other = ReleaseSigningKey::generate().public();
        let err = check_offer(&offer, Some(&other), "rpi4").unwrap_err();
        assert!(err.contains("signature"), "{err}");

        let mut relabelled = offer.clone();
        relabelled.version = "2.0".into();
        assert!(check_offer(&relabelled, Some(&public), "rpi4").is_err());
        let mut traversal = offer.clone();
        traversal.sha256 = "../../etc/passwd".into();
        assert!(check_offer(&traversal, Some(&public), "rpi4").is_err());
        let mut bad_version = offer;
        bad_version.version = "../x".into();
        assert!(check_offer(&bad_version, Some(&public), "rpi4").is_err());
    }

    #[test]
    fn stale_downloads_are_removed_but_the_target_kept() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["aa", "aa.part", "bb", "bb.part", "cc"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_stale(dir.path(), Some("bb")).unwrap();
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec!["bb", "bb.part"]);
    }
}
