//! Why training, evaluation or checkpoint loading stopped: one error type for the trainer's
//! library entry points, wrapping each stage's own.

use std::path::{Path, PathBuf};

use agiqa_runtime::metrics::MetricsError;

use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::device::DeviceError;
use crate::features::FeatureError;
use crate::model::ModelError;
use crate::precision::PrecisionError;
use crate::weights::WeightsError;

/// Why training or evaluation stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Plot(#[from] crate::plots::PlotError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Precision(#[from] PrecisionError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unknown CLIP preset {0:?}")]
    UnknownPreset(String),
    #[error("cannot resume {dir}: {reason}")]
    Resume { dir: PathBuf, reason: String },
    #[error("the loaded CLIP weights (SHA-256 {found}) are not the ones checkpoint {checkpoint} was trained with ({expected})")]
    ClipMismatch {
        checkpoint: PathBuf,
        expected: String,
        found: String,
    },
    #[error("training diverged in epoch {epoch} (loss {loss}) at learning rate {lr}; lower optimizer.lr")]
    Diverged { epoch: usize, loss: f64, lr: f64 },
    #[error("{0}")]
    Invalid(String),
}

/// `map_err` helper: an I/O error while writing `path`.
pub(crate) fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Write {
        path: path.to_path_buf(),
        source,
    }
}
