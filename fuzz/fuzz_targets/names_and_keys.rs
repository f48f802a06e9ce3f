//! Text a device or operator controls that the hub parses outside JSON: device IDs, names,
//! keys, signatures and artifact headers.
#![no_main]

use drover_protocol::artifact::ArtifactFormat;
use drover_protocol::device::Module;
use drover_protocol::ids::DeviceId;
use drover_protocol::signing::{ReleaseManifest, ReleasePublicKey, ReleaseSigningKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ArtifactFormat::sniff(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = DeviceId::parse(text) {
        assert!(id.as_str().len() <= 64);
        assert!(!id.as_str().contains('/'));
    }
    if drover_protocol::validate::release_version(text).is_ok() {
        assert!(!text.contains('/') && !text.contains('\n') && text != "..");
    }
    let _ = ReleasePublicKey::parse(text);
    let _ = ReleaseSigningKey::from_text(text);
    let key = ReleaseSigningKey::from_text(
        "drover-release-key-v1:BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
    )
    .unwrap();
    let manifest = ReleaseManifest {
        version: "1.0",
        module: Module::App,
        device_type: None,
        sha256: "00",
        size: 1,
    };
    assert!(manifest.verify(&key.public(), text).is_err() || text.trim().len() == 88);
});
