//! Where a frozen CLIP came from, recorded in checkpoints so that `eval`, `predict` and the
//! exporter can rebuild the same model.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::Device;

use super::{Clip, ClipConfig};
use crate::error::TrainError;

/// A weights file, or a seeded random preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ClipSource {
    /// A weights file or folder (OpenAI TorchScript, state dict, Hugging Face).
    File { path: PathBuf },
    /// Randomly initialised weights of a preset architecture (demos and tests).
    Random { preset: String, seed: i64 },
}

impl ClipSource {
    pub fn load(&self, device: Device) -> Result<Clip, TrainError> {
        match self {
            ClipSource::File { path } => Ok(Clip::load(path, device)?),
            ClipSource::Random { preset, seed } => {
                let config = ClipConfig::preset(preset)
                    .ok_or_else(|| TrainError::UnknownPreset(preset.clone()))?;
                Ok(Clip::random(&config, *seed, device))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ClipSource::File { path } => path.display().to_string(),
            ClipSource::Random { preset, seed } => {
                format!("random {preset} (seed {seed}; no pretrained weights)")
            }
        }
    }
}
