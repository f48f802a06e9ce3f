//! Building release archives in memory for tests.

use std::io::Write as _;

/// A gzip-compressed tar of `(path, contents, mode)` entries.
pub fn tar_gz(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    for (path, contents, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        #[allow(
            clippy::unwrap_used,
            reason = "test helper: in-memory writes cannot fail"
        )]
        builder.append_data(&mut header, path, *contents).unwrap();
    }
    #[allow(
        clippy::unwrap_used,
        reason = "test helper: in-memory writes cannot fail"
    )]
    builder.into_inner().unwrap().finish().unwrap()
}

/// A zip of `(path, contents, mode)` entries.
pub fn zip(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (path, contents, mode) in files {
        let options = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
        #[allow(
            clippy::unwrap_used,
            reason = "test helper: in-memory writes cannot fail"
        )]
        {
            writer.start_file(*path, options).unwrap();
            writer.write_all(contents).unwrap();
        }
    }
    #[allow(
        clippy::unwrap_used,
        reason = "test helper: in-memory writes cannot fail"
    )]
    writer.finish().unwrap().into_inner()
}
