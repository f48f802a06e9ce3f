//! The agent's archive unpacker: arbitrary bytes as a tar.gz or a zip must never panic, and
//! nothing may be written outside the destination directory, whatever the entries' names and
//! links say. (Archives are unpacked only after their signature verified, so this guards against
//! a signed-but-hostile or merely broken archive.)
#![no_main]

use drover_protocol::artifact::ArtifactFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (bool, &[u8])| {
    let (zip, data) = input;
    let format = if zip {
        ArtifactFormat::Zip
    } else {
        ArtifactFormat::TarGz
    };
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("artifact");
    std::fs::write(&archive, data).unwrap();
    // The destination must not exist yet: unpack creates it.
    let dest = dir.path().join("out");
    let _ = drover_agent::archive::unpack(format, &archive, &dest);
    // Only "artifact" and "out" may exist beside each other.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["artifact", "out"],
        "something escaped the destination"
    );
});
