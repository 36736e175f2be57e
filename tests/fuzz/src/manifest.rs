//! Dataset tables: CSV and JSONL manifests and AGIQA-3K's `data.csv`, through the loaders'
//! parsing and validation (image decoding off).

use std::path::Path;

use agiqa_readers::data::{agiqa3k, manifest, LoadOptions};

/// The folder the tables live in: rows naming `Cargo.toml` or `README.md` find a file there, so
/// valid rows pass the existence check and the whole load runs.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Byte 0 picks the format (CSV manifest, JSONL manifest, AGIQA-3K `data.csv`), byte 1 the
/// options (bit 0: skip bad rows; bit 1: ask for the `alignment` dimension); the rest is the
/// file's text, which must be UTF-8 as the loaders read it.
pub fn run(data: &[u8]) -> bool {
    let [format, flags, text @ ..] = data else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return false;
    };
    let options = LoadOptions {
        dimension: (flags & 2 != 0).then(|| "alignment".to_string()),
        skip_bad: flags & 1 != 0,
        check_images: false,
    };
    let root = Path::new(ROOT);
    let loaded = match format % 3 {
        0 => manifest::load_text(text, &root.join("fuzz.csv"), &options),
        1 => manifest::load_text(text, &root.join("fuzz.jsonl"), &options),
        _ => agiqa3k::load_table(root, text, &options),
    };
    match loaded {
        Ok((dataset, _)) => {
            assert!(!dataset.samples.is_empty());
            assert!(dataset.samples.iter().all(|s| s.mos.is_finite()));
            true
        }
        Err(_) => false,
    }
}
