//! Artifact storage: release files, content-addressed by SHA-256.
//!
//! [`ArtifactStore`] is the interface; [`LocalArtifacts`] keeps files under
//! `<data_dir>/artifacts/sha256/<first two hex digits>/<hash>`. A shared store (S3 or NFS, for
//! several hub replicas) implements the same trait. Uploads are streamed to a temporary file
//! while being hashed and counted, and only renamed into place once the hash matches what the
//! uploader declared, so a half-received or corrupted upload never becomes an artifact.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_trait::async_trait;
use axum::body::Bytes;
use drover_protocol::artifact::ArtifactFormat;
use futures_util::{Stream, StreamExt as _};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

/// A stream of body chunks.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Errors from artifact storage.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The upload went past the size limit.
    #[error("artifact larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The bytes did not hash to what the uploader declared.
    #[error("artifact hashes to {actual}, expected {expected}")]
    HashMismatch {
        /// Declared.
        expected: String,
        /// Received.
        actual: String,
    },
    /// Reading the request body failed (the client went away, say).
    #[error("reading upload: {0}")]
    BodyRead(String),
    /// A file operation failed.
    #[error("artifact storage: {0}")]
    Io(#[from] std::io::Error),
}

/// What is known about a stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactInfo {
    /// SHA-256, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The format, if it is one Drover can install.
    pub format: Option<ArtifactFormat>,
}

/// Where artifacts live.
#[async_trait]
pub trait ArtifactStore: Send + Sync + std::fmt::Debug {
    /// Stores a stream of bytes that must hash to `expected_sha256` and be at most `limit`
    /// bytes long.
    async fn put(
        &self,
        body: ByteStream,
        expected_sha256: &str,
        limit: u64,
    ) -> Result<ArtifactInfo, ArtifactError>;

    /// Facts about a stored artifact, or `None` if it is not stored.
    async fn stat(&self, sha256: &str) -> Result<Option<ArtifactInfo>, ArtifactError>;

    /// Bytes `start..=end` of a stored artifact.
    async fn read_range(
        &self,
        sha256: &str,
        start: u64,
        end: u64,
    ) -> Result<ByteStream, ArtifactError>;
}

/// Whether a string is a SHA-256 in lower-case hex (and so safe as a file name).
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Artifacts in a local directory.
#[derive(Debug, Clone)]
pub struct LocalArtifacts {
    root: PathBuf,
}

impl LocalArtifacts {
    /// Artifacts under `<data_dir>/artifacts`.
    pub async fn open(data_dir: &Path) -> Result<LocalArtifacts, ArtifactError> {
        let root = data_dir.join("artifacts");
        tokio::fs::create_dir_all(root.join("tmp")).await?;
        tokio::fs::create_dir_all(root.join("sha256")).await?;
        Ok(LocalArtifacts { root })
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(&sha256[..2]).join(sha256)
    }
}

async fn sniff_file(path: &Path) -> Result<Option<ArtifactFormat>, std::io::Error> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut head = vec![0u8; 512];
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read(&mut head[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(ArtifactFormat::sniff(&head[..filled]))
}

#[async_trait]
impl ArtifactStore for LocalArtifacts {
    async fn put(
        &self,
        mut body: ByteStream,
        expected_sha256: &str,
        limit: u64,
    ) -> Result<ArtifactInfo, ArtifactError> {
        let tmp_name = format!(
            "{}.{}",
            expected_sha256,
            drover_protocol::ids::random_string(b"abcdefghijklmnopqrstuvwxyz", 8)
        );
        let tmp = self.root.join("tmp").join(tmp_name);
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let mut hasher = Sha256::new();
            let mut size: u64 = 0;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ArtifactError::BodyRead(e.to_string()))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(ArtifactError::TooLarge { limit });
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await?;
            }
            file.sync_all().await?;
            let actual = drover_protocol::ids::to_hex(&hasher.finalize());
            if actual != expected_sha256 {
                return Err(ArtifactError::HashMismatch {
                    expected: expected_sha256.to_string(),
                    actual,
                });
            }
            Ok(size)
        }
        .await;
        let size = match result {
            Ok(size) => size,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let format = sniff_file(&tmp).await?;
        let dest = self.path_of(expected_sha256);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        // Same content, same name: if it is already there, the rename just replaces it.
        tokio::fs::rename(&tmp, &dest).await?;
        Ok(ArtifactInfo {
            sha256: expected_sha256.to_string(),
            size,
            format,
        })
    }

    async fn stat(&self, sha256: &str) -> Result<Option<ArtifactInfo>, ArtifactError> {
        if !is_sha256_hex(sha256) {
            return Ok(None);
        }
        let path = self.path_of(sha256);
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(Some(ArtifactInfo {
                sha256: sha256.to_string(),
                size: meta.len(),
                format: sniff_file(&path).await?,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn read_range(
        &self,
        sha256: &str,
        start: u64,
        end: u64,
    ) -> Result<ByteStream, ArtifactError> {
        let mut file = tokio::fs::File::open(self.path_of(sha256)).await?;
        file.seek(std::io::SeekFrom::Start(start)).await?;
        let reader = file.take(end.saturating_sub(start) + 1);
        Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(
            reader,
            64 * 1024,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::ids::sha256_hex;

    fn stream(parts: Vec<&'static [u8]>) -> ByteStream {
        Box::pin(futures_util::stream::iter(
            parts.into_iter().map(|p| Ok(Bytes::from_static(p))),
        ))
    }

    #[tokio::test]
    async fn put_stat_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalArtifacts::open(dir.path()).await.unwrap();
        let data = b"#!/bin/sh\necho hello\n";
        let sha = sha256_hex(data);
        let info = store
            .put(stream(vec![&data[..5], &data[5..]]), &sha, 1000)
            .await
            .unwrap();
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(info.format, Some(ArtifactFormat::Shell));
        assert_eq!(store.stat(&sha).await.unwrap(), Some(info));
        let mut range = store.read_range(&sha, 2, 5).await.unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = range.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, &data[2..=5]);
        assert_eq!(store.stat(&"0".repeat(64)).await.unwrap(), None);
        assert_eq!(store.stat("../../etc/passwd").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_bad_upload_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalArtifacts::open(dir.path()).await.unwrap();
        let sha = sha256_hex(b"something else");
        let err = store
            .put(stream(vec![b"abc"]), &sha, 1000)
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::HashMismatch { .. }));
        let err = store
            .put(stream(vec![b"abcdef"]), &sha256_hex(b"abcdef"), 3)
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::TooLarge { limit: 3 }));
        let leftovers = std::fs::read_dir(dir.path().join("artifacts/tmp"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 0);
        assert_eq!(store.stat(&sha).await.unwrap(), None);
    }
}
