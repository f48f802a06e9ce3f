//! Rules for the names that appear in URLs, file names and signed manifests: fleet names,
//! release versions, device types, tag names. One place, so that the hub refuses what the agent
//! could not store and the CLI can say why before it uploads anything.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 1 to {max} characters of letters, digits, {extra}; got {got:?}")]
pub struct BadName {
    /// What kind of name it was ("a release version", ...).
    pub what: &'static str,
    /// The longest allowed.
    pub max: usize,
    /// The punctuation allowed, in words.
    pub extra: &'static str,
    /// What was given (cut to 80 characters).
    pub got: String,
}

fn check(
    what: &'static str,
    text: &str,
    max: usize,
    extra_chars: &[u8],
    extra: &'static str,
) -> Result<(), BadName> {
    let ok = !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra_chars.contains(&b))
        // A leading dot or dash would make hidden files or look like a flag.
        && !text.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(BadName {
            what,
            max,
            extra,
            got: text.chars().take(80).collect(),
        })
    }
}

/// A fleet name: it appears in URLs and CLI arguments.
pub fn fleet_name(text: &str) -> Result<(), BadName> {
    check("a fleet name", text, 64, b"-_.", "'-', '_' or '.'")
}

/// A release version: it names a directory on the device (`releases/<version>`) and is part of
/// the signed manifest, so it may not hold `/` or a newline.
pub fn release_version(text: &str) -> Result<(), BadName> {
    check(
        "a release version",
        text,
        64,
        b"-_.+~",
        "'-', '_', '.', '+' or '~'",
    )
}

/// A device type (hardware and architecture, such as `raspberrypi4-arm64`).
pub fn device_type(text: &str) -> Result<(), BadName> {
    check("a device type", text, 64, b"-_.", "'-', '_' or '.'")
}

/// A tag or attribute name reported by a device.
pub fn tag(text: &str) -> Result<(), BadName> {
    check(
        "a tag",
        text,
        64,
        b"-_.:/=",
        "'-', '_', '.', ':', '/' or '='",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_cannot_escape_their_directory_or_forge_manifest_lines() {
        assert!(release_version("1.2.3+build.4").is_ok());
        assert!(release_version("../x").is_err());
        assert!(release_version("a/b").is_err());
        assert!(release_version("1\nsha256=0").is_err());
        assert!(release_version(".hidden").is_err());
        assert!(release_version("").is_err());
        assert!(release_version(&"1".repeat(65)).is_err());
    }

    #[test]
    fn the_error_says_what_is_allowed() {
        let err = fleet_name("my fleet").unwrap_err().to_string();
        assert!(err.contains("a fleet name"), "{err}");
        assert!(err.contains("\"my fleet\""), "{err}");
    }
}
