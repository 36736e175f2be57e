//! The lean CLIP-AGIQA runtime: what other services embed to score images. It never links
//! libtorch.
//!
//! It is also the single home of what training and serving must agree on — image
//! preprocessing ([`preprocess`]), correlation metrics ([`metrics`]) and the model-metadata
//! schema ([`metadata`]) — so the trainer depends on this crate (without its ONNX Runtime
//! parts: no default features) rather than keeping copies that could drift.

pub mod atomic_file;
pub mod cpu_features;
pub mod csv_line;
pub mod gif_decode;
pub mod input_preview;
pub mod jpeg;
pub mod metadata;
pub mod metrics;
pub mod onnx_props;
pub mod preprocess;
pub mod resample;
pub mod tiff_decode;

#[cfg(feature = "pipeline")]
pub mod batch_io;
#[cfg(feature = "pipeline")]
pub mod bench;
#[cfg(feature = "doctor")]
pub mod doctor;
#[cfg(feature = "doctor")]
pub mod elf_deps;
#[cfg(feature = "doctor")]
pub mod gpu_devices;
#[cfg(feature = "scorer")]
pub mod gpu_libraries;
#[cfg(feature = "pipeline")]
pub mod gpu_memory;
#[cfg(feature = "doctor")]
pub mod node_placement;
#[cfg(feature = "scorer")]
pub mod nvidia_smi;
#[cfg(feature = "scorer")]
pub mod onnxruntime;
#[cfg(feature = "pipeline")]
pub mod pipeline;
#[cfg(feature = "pipeline")]
pub mod score_files;
#[cfg(feature = "scorer")]
pub mod scorer;
#[cfg(feature = "serve")]
pub mod serve;

/// The README's Rust blocks, compiled as doc-tests so that the embedding example stays true.
#[cfg(all(doctest, feature = "scorer"))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
