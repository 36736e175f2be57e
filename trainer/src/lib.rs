//! CLIP-AGIQA training stack on tch (libtorch): the CLIP model, weight loading and tokenizer,
//! datasets, the prompt learner and head, training, evaluation and checkpoints.
//!
//! Shared with serving (and therefore kept out of this crate): image preprocessing, metrics and
//! the model-metadata schema live in `agiqa_runtime`, so training and serving cannot drift.

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod data;
pub mod device;
pub mod doctor;
pub mod error;
pub mod evaluate;
pub mod features;
pub mod head;
pub mod inspect;
pub mod model;
pub mod optim;
pub mod plots;
pub mod precision;
pub mod prompt;
pub mod synthetic_images;
pub mod tokenizer;
pub mod train;
pub mod weights;
pub mod workers;

pub use error::TrainError;
