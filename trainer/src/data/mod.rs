//! Datasets for training and evaluation: AGIQA-3K, AIGCIQA2023 and plain manifests, validated up
//! front, plus the paper's reference splits, random (optionally prompt-grouped) splits, and
//! synthetic datasets written in the real formats.
//!
//! The readers (formats, validation, errors) live in the tch-free `agiqa-readers` crate so that
//! they can be fuzzed and replayed without libtorch; they are re-exported here unchanged.

pub use agiqa_readers::data::*;

pub mod split;
pub mod synthetic_dataset;

pub use split::{Protocol, Split};
