//! `torch.save` / `torch.jit.save` archives: the zip layer and the pickle reader.

use std::io::{Cursor, Write};
use std::path::Path;

use agiqa_readers::torch_archive::read_torch_archive_bytes;
use zip::write::SimpleFileOptions;

/// Input starting with `PK` is a whole archive; anything else is the pickle (`data.pkl`) of an
/// archive built around it, with storages `0`–`3` of 256 bytes each, so that mutations reach
/// the unpickler instead of dying on zip CRCs.
pub fn run(data: &[u8]) -> bool {
    let wrapped;
    let archive = if data.starts_with(b"PK") {
        data
    } else {
        wrapped = archive_around(data);
        &wrapped
    };
    match read_torch_archive_bytes(archive, Path::new("fuzz.pt")) {
        Ok(tensors) => {
            for (_, tensor) in &tensors {
                // Conversion fails only for non-float dtypes, never on the sizes checked above.
                if let Ok(values) = tensor.to_f32_vec() {
                    assert_eq!(values.len(), tensor.numel());
                }
            }
            true
        }
        Err(_) => false,
    }
}

/// A stored (uncompressed) zip laid out as `torch.save` writes one: `archive/data.pkl`,
/// `archive/byteorder`, `archive/data/<key>`.
pub fn archive_around(pickle: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let storage: Vec<u8> = (0..=255u8).collect();
    let mut entries: Vec<(String, &[u8])> = vec![
        ("archive/data.pkl".into(), pickle),
        ("archive/byteorder".into(), b"little"),
    ];
    for key in 0..4 {
        entries.push((format!("archive/data/{key}"), &storage));
    }
    for (name, bytes) in entries {
        // Writing into a Vec cannot fail.
        let written = zip.start_file(name, stored).and_then(|()| {
            zip.write_all(bytes)?;
            Ok(())
        });
        debug_assert!(written.is_ok());
    }
    zip.finish().map(Cursor::into_inner).unwrap_or_default()
}
