//! The lean CLIP-AGIQA runtime: what other services embed to score images. It never links
//! libtorch.
//!
//! It is also the single home of what training and serving must agree on — image
//! preprocessing ([`preprocess`]), correlation metrics ([`metrics`]) and the model-metadata
//! schema ([`metadata`]) — so the trainer depends on this crate (without its ONNX Runtime
//! parts, feature `onnx`) rather than keeping copies that could drift.

pub mod atomic_file;
pub mod csv_line;
pub mod gif_decode;
pub mod input_preview;
pub mod jpeg;
pub mod metadata;
pub mod metrics;
pub mod preprocess;
pub mod resample;
pub mod tiff_decode;

#[cfg(feature = "onnx")]
pub mod batch_io;
#[cfg(feature = "onnx")]
pub mod bench;
#[cfg(feature = "onnx")]
pub mod onnxruntime;
#[cfg(feature = "onnx")]
pub mod pipeline;
#[cfg(feature = "onnx")]
pub mod score_files;
#[cfg(feature = "onnx")]
pub mod scorer;
#[cfg(feature = "onnx")]
pub mod serve;
