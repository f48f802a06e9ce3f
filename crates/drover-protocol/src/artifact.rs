//! Recognising what an artifact is from its first bytes.
//!
//! Releases carry archives (gzip-compressed tar or zip) or bare scripts. The hub records the
//! format when the artifact is uploaded (the seed protocol must announce `zip`, `sh` or `js`),
//! and the agent picks the unpacker from the same bytes rather than trusting a file name.

use serde::{Deserialize, Serialize};

/// An artifact's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactFormat {
    /// A gzip-compressed tar archive.
    TarGz,
    /// A zip archive.
    Zip,
    /// A shell script (a text file, usually starting with `#!`).
    Shell,
    /// A JavaScript file run with node (the seed updater's `js` download type): a text file
    /// whose first line is a `#!` naming node.
    NodeScript,
}

impl ArtifactFormat {
    /// Recognises a format from at least the first 512 bytes (fewer if the file is shorter).
    /// Returns `None` for anything else (say, a bare tar or a binary).
    ///
    /// ```
    /// use drover_protocol::artifact::ArtifactFormat;
    /// assert_eq!(ArtifactFormat::sniff(b"PK\x03\x04rest"), Some(ArtifactFormat::Zip));
    /// assert_eq!(ArtifactFormat::sniff(b"#!/bin/sh\necho hi\n"), Some(ArtifactFormat::Shell));
    /// assert_eq!(ArtifactFormat::sniff(b"\x7fELF"), None);
    /// ```
    pub fn sniff(head: &[u8]) -> Option<ArtifactFormat> {
        if head.starts_with(b"\x1f\x8b") {
            return Some(ArtifactFormat::TarGz);
        }
        if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            return Some(ArtifactFormat::Zip);
        }
        if head.starts_with(b"#!") {
            let first_line = head.split(|&b| b == b'\n').next().unwrap_or(head);
            let is_node = first_line.windows(4).any(|w| w == b"node");
            return Some(if is_node {
                ArtifactFormat::NodeScript
            } else {
                ArtifactFormat::Shell
            });
        }
        None
    }

    /// The format's name in the API and database.
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactFormat::TarGz => "tar_gz",
            ArtifactFormat::Zip => "zip",
            ArtifactFormat::Shell => "shell",
            ArtifactFormat::NodeScript => "node_script",
        }
    }

    /// Parses a format name.
    pub fn parse(text: &str) -> Option<ArtifactFormat> {
        Some(match text {
            "tar_gz" => ArtifactFormat::TarGz,
            "zip" => ArtifactFormat::Zip,
            "shell" => ArtifactFormat::Shell,
            "node_script" => ArtifactFormat::NodeScript,
            _ => return None,
        })
    }

    /// Whether this is an archive (as opposed to a bare script).
    pub fn is_archive(self) -> bool {
        matches!(self, ArtifactFormat::TarGz | ArtifactFormat::Zip)
    }

    /// The seed updater's `downloadType` for this format, if the seed updater can run it.
    pub fn seed_download_type(self) -> Option<&'static str> {
        match self {
            ArtifactFormat::Zip => Some("zip"),
            ArtifactFormat::Shell => Some("sh"),
            ArtifactFormat::NodeScript => Some("js"),
            ArtifactFormat::TarGz => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_each_format() {
        assert_eq!(
            ArtifactFormat::sniff(&[0x1f, 0x8b, 8, 0]),
            Some(ArtifactFormat::TarGz)
        );
        assert_eq!(
            ArtifactFormat::sniff(b"#!/usr/bin/env node\nconsole.log(1)"),
            Some(ArtifactFormat::NodeScript)
        );
        assert_eq!(ArtifactFormat::sniff(b""), None);
        assert_eq!(ArtifactFormat::sniff(b"plain text"), None);
        for f in [
            ArtifactFormat::TarGz,
            ArtifactFormat::Zip,
            ArtifactFormat::Shell,
            ArtifactFormat::NodeScript,
        ] {
            assert_eq!(ArtifactFormat::parse(f.as_str()), Some(f));
        }
    }
}
