//! Release signatures.
//!
//! An operator signs each release with the fleet's release key (ed25519) on their own machine
//! (`drover release create`); the hub checks the signature when the release is created and the
//! agent checks it again, with the public key it was given in its config or at enrolment,
//! before anything from the artifact runs. A compromised hub, bucket or network path can
//! therefore withhold updates but cannot make a device run code the operator did not sign.
//!
//! What is signed is not the artifact alone but a [`ReleaseManifest`]: the version, the install
//! module, the device type, the artifact's SHA-256 and its size, as fixed text lines. Signing the
//! metadata too means a hub cannot relabel an old, signed artifact as a newer version, or hand a
//! script artifact to the `app` module.
//!
//! Key text formats (one line each, so they paste cleanly into TOML and terminals):
//! - public key: `ed25519:<base64 of the 32-byte key>`
//! - secret key file: `drover-release-key-v1:<base64 of the 32-byte seed>`
//! - signature: standard base64 of the 64-byte signature.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};

use crate::device::Module;

const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "drover-release-key-v1:";

/// Why a key or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    /// The public key is not `ed25519:` followed by 32 bytes of base64.
    #[error("a release public key looks like 'ed25519:' followed by 44 characters of base64")]
    BadPublicKey,
    /// The secret key file is not in Drover's format.
    #[error(
        "a release key file holds one line 'drover-release-key-v1:<base64>' (make one with 'drover keys generate')"
    )]
    BadSecretKey,
    /// The signature is not 64 bytes of base64.
    #[error("a release signature is 64 bytes in base64 (88 characters)")]
    BadSignature,
    /// The signature does not match the manifest and key.
    #[error("the signature does not match this release's manifest and the fleet's release key")]
    Mismatch,
}

/// What a release signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseManifest<'a> {
    /// The release version.
    pub version: &'a str,
    /// The install module that will run it.
    pub module: Module,
    /// The device type it is built for; `None` means any.
    pub device_type: Option<&'a str>,
    /// The artifact's SHA-256, lower-case hex.
    pub sha256: &'a str,
    /// The artifact's size in bytes.
    pub size: u64,
}

impl ReleaseManifest<'_> {
    /// The exact bytes that are signed.
    ///
    /// ```
    /// use drover_protocol::{device::Module, signing::ReleaseManifest};
    /// let m = ReleaseManifest {
    ///     version: "1.0.0",
    ///     module: Module::App,
    ///     device_type: None,
    ///     sha256: "ab",
    ///     size: 3,
    /// };
    /// assert_eq!(
    ///     m.signed_bytes(),
    ///     b"drover-release-v1\nversion=1.0.0\nmodule=app\ndevice-type=*\nsha256=ab\nsize=3\n"
    /// );
    /// ```
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "drover-release-v1\nversion={}\nmodule={}\ndevice-type={}\nsha256={}\nsize={}\n",
            self.version,
            self.module.as_str(),
            self.device_type.unwrap_or("*"),
            self.sha256,
            self.size
        )
        .into_bytes()
    }

    /// Signs the manifest.
    pub fn sign(&self, key: &ReleaseSigningKey) -> String {
        B64.encode(key.0.sign(&self.signed_bytes()).to_bytes())
    }

    /// Checks a base64 signature over the manifest against a public key.
    pub fn verify(&self, key: &ReleasePublicKey, signature: &str) -> Result<(), SigningError> {
        let bytes = B64
            .decode(signature.trim())
            .map_err(|_| SigningError::BadSignature)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| SigningError::BadSignature)?;
        key.0
            .verify(&self.signed_bytes(), &Signature::from_bytes(&bytes))
            .map_err(|_| SigningError::Mismatch)
    }
}

/// A fleet's release signing key (secret). Its `Debug` does not print the key.
pub struct ReleaseSigningKey(SigningKey);

impl std::fmt::Debug for ReleaseSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReleaseSigningKey({}, secret ***)", self.public())
    }
}

impl ReleaseSigningKey {
    /// A new key from the operating system's CSPRNG.
    pub fn generate() -> ReleaseSigningKey {
        let mut seed = [0u8; 32];
        crate::ids::fill_random(&mut seed);
        ReleaseSigningKey(SigningKey::from_bytes(&seed))
    }

    /// Parses the one-line key file format.
    pub fn from_text(text: &str) -> Result<ReleaseSigningKey, SigningError> {
        let b64 = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SigningError::BadSecretKey)?;
        let bytes = B64.decode(b64).map_err(|_| SigningError::BadSecretKey)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| SigningError::BadSecretKey)?;
        Ok(ReleaseSigningKey(SigningKey::from_bytes(&seed)))
    }

    /// The key file text (one line, with a trailing newline).
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", B64.encode(self.0.to_bytes()))
    }

    /// The matching public key.
    pub fn public(&self) -> ReleasePublicKey {
        ReleasePublicKey(self.0.verifying_key())
    }

    /// Signs arbitrary bytes (used for the enrolment proof of possession).
    pub fn sign_raw(&self, message: &[u8]) -> String {
        B64.encode(self.0.sign(message).to_bytes())
    }
}

/// A public ed25519 key: a fleet's release key, or a device's identity key.
#[derive(Clone, PartialEq, Eq)]
pub struct ReleasePublicKey(VerifyingKey);

impl ReleasePublicKey {
    /// Parses `ed25519:<base64>`.
    pub fn parse(text: &str) -> Result<ReleasePublicKey, SigningError> {
        let b64 = text
            .trim()
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or(SigningError::BadPublicKey)?;
        let bytes = B64.decode(b64).map_err(|_| SigningError::BadPublicKey)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| SigningError::BadPublicKey)?;
        VerifyingKey::from_bytes(&bytes)
            .map(ReleasePublicKey)
            .map_err(|_| SigningError::BadPublicKey)
    }

    /// Checks a base64 signature over arbitrary bytes.
    pub fn verify_raw(&self, message: &[u8], signature: &str) -> Result<(), SigningError> {
        let bytes = B64
            .decode(signature.trim())
            .map_err(|_| SigningError::BadSignature)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| SigningError::BadSignature)?;
        self.0
            .verify(message, &Signature::from_bytes(&bytes))
            .map_err(|_| SigningError::Mismatch)
    }
}

impl std::fmt::Display for ReleasePublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", B64.encode(self.0.as_bytes()))
    }
}

impl std::fmt::Debug for ReleasePublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReleasePublicKey({self})")
    }
}

/// The message a device signs with its identity key when it enrols, proving that it holds the
/// private half of the public key it registers.
pub fn enrolment_message(public_key: &str, device_type: &str) -> Vec<u8> {
    format!("drover-enrol-v1\npublic-key={public_key}\ndevice-type={device_type}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: &str) -> ReleaseManifest<'_> {
        ReleaseManifest {
            version,
            module: Module::Script,
            device_type: Some("rpi4"),
            sha256: "00ff",
            size: 10,
        }
    }

    #[test]
    fn sign_and_verify_round_trip_through_text() {
        let key = ReleaseSigningKey::generate();
        let key = ReleaseSigningKey::from_text(&key.to_text()).unwrap();
        let public = ReleasePublicKey::parse(&key.public().to_string()).unwrap();
        let sig = manifest("1.0").sign(&key);
        assert_eq!(sig.len(), 88);
        manifest("1.0").verify(&public, &sig).unwrap();
    }

    #[test]
    fn a_relabelled_or_resized_release_fails() {
        let key = ReleaseSigningKey::generate();
        let sig = manifest("1.0").sign(&key);
        let public = key.public();
        assert_eq!(
            manifest("2.0").verify(&public, &sig),
            Err(SigningError::Mismatch)
        );
        let mut m = manifest("1.0");
        m.size = 11;
        assert_eq!(m.verify(&public, &sig), Err(SigningError::Mismatch));
        let mut m = manifest("1.0");
        m.module = Module::App;
        assert_eq!(m.verify(&public, &sig), Err(SigningError::Mismatch));
        let other = ReleaseSigningKey::generate().public();
        assert_eq!(
            manifest("1.0").verify(&other, &sig),
            Err(SigningError::Mismatch)
        );
        assert_eq!(
            manifest("1.0").verify(&public, "not base64!"),
            Err(SigningError::BadSignature)
        );
    }

    #[test]
    fn bad_key_text_is_refused() {
        assert_eq!(
            ReleasePublicKey::parse("ed25519:AAAA"),
            Err(SigningError::BadPublicKey)
        );
        assert_eq!(
            ReleasePublicKey::parse("rsa:xyz"),
            Err(SigningError::BadPublicKey)
        );
        assert!(ReleaseSigningKey::from_text("drover-release-key-v1:short").is_err());
    }

    #[test]
    fn golden_signature_is_stable() {
        // A fixed seed gives a fixed signature (ed25519 is deterministic), so a change to the
        // signed bytes or the encoding cannot slip through unnoticed.
        let key =
            ReleaseSigningKey::from_text(&format!("{SECRET_PREFIX}{}", B64.encode([7u8; 32])))
                .unwrap();
        let sig = manifest("1.0").sign(&key);
        manifest("1.0").verify(&key.public(), &sig).unwrap();
        assert_eq!(sig, GOLDEN_SIG, "signed bytes or encoding changed");
    }

    const GOLDEN_SIG: &str =
        "cJp6YmfiakUadKT8zoXDJCNaWR1ERiFshWWUZc1Ngsxp9Mw8WXdQXHVDnAxod1IDeEbH0VDtpRNBsn5ayf2dCg==";
}
