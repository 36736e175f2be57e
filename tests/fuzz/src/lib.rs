//! Fuzz target bodies: one module per parser, each with `run(&[u8]) -> bool` (true when the
//! input was accepted). A body must never panic, abort or exhaust memory on any input: every
//! malformed input is a typed error of the parser it drives.
//!
//! The same functions are called by the libFuzzer binaries (`libfuzzer/fuzz_targets/`) and by
//! the corpus replay (`tests/replay.rs`), so what CI replays is exactly what was fuzzed.

pub mod image;
pub mod manifest;
pub mod mat;
pub mod metadata;
pub mod multipart;
pub mod torch_archive;

/// A target's body: the fuzzer's bytes in, whether the parser accepted them out.
pub type Body = fn(&[u8]) -> bool;

/// Every target: its name (the fuzz binary and the `corpus/<name>/` folder) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("image", image::run),
    ("torch_archive", torch_archive::run),
    ("mat", mat::run),
    ("manifest", manifest::run),
    ("metadata", metadata::run),
    ("multipart", multipart::run),
];
