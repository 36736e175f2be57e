//! CLIP-AGIQA training stack on tch (libtorch): the CLIP model, weight loading and tokenizer.
//!
//! Shared with serving (and therefore kept out of this crate): image preprocessing, metrics and
//! the model-metadata schema live in `agiqa_runtime`, so training and serving cannot drift.

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod data;
pub mod evaluate;
pub mod features;
pub mod head;
pub mod inspect;
pub mod model;
pub mod plots;
pub mod prompt;
pub mod synthetic;
pub mod tokenizer;
pub mod train;
pub mod weights;
