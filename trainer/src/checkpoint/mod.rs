//! Checkpoints: the one place that reads and writes them and their description
//! ([`CheckpointMeta`]). Training saves `best` and `last` through [`save`]; evaluation, prediction
//! and the exporter load through [`load_checkpoint`] / [`read_description`]. No other module
//! touches checkpoint files (a test in `tests/` keeps it so).

mod files;

use std::path::{Path, PathBuf};

use agiqa_runtime::metrics::Correlations;
use agiqa_runtime::preprocess::Preprocessing;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

pub use self::files::CheckpointError;
use crate::clip::{Clip, ClipConfig, ClipSource};
use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::features::{clip_fingerprint, sha256_hex};
use crate::model::{AgiqaModel, ModelConfig};
use crate::precision::Precision;
use crate::tokenizer::ClipTokenizer;

/// The format tag of [`CheckpointMeta::format`] this version writes and reads.
pub const CHECKPOINT_FORMAT: &str = "agiqa-checkpoint/1";

/// The description stored with every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub model: ModelConfig,
    pub clip_name: String,
    pub clip_config: ClipConfig,
    pub clip_source: ClipSource,
    /// SHA-256 over the CLIP tensors ([`clip_fingerprint`]).
    pub clip_sha256: String,
    pub preprocessing: Preprocessing,
    pub dataset: String,
    pub dimension: String,
    pub score_scale: (f64, f64),
    /// Human-readable protocol and split, e.g. `paper reference split (selected on test)`.
    pub protocol: String,
    /// Epochs completed when this checkpoint was written.
    pub epoch: usize,
    /// Metrics on the selection set at that epoch.
    pub metrics: Option<Correlations>,
    /// `val` or `test`: the set the best epoch is chosen on.
    pub selected_on: String,
    /// Best selection SRCC so far and its epoch (for resume).
    pub best: Option<(usize, f64)>,
    pub train_config: TrainConfig,
    /// Where it was trained (`cpu`, `cuda:0`); absent in checkpoints from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The frozen CLIP's precision during training; absent (= fp32, the only one then) in
    /// checkpoints from before it was recorded. Resuming continues in the same precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

impl CheckpointMeta {
    /// The precision training ran in (fp32 for checkpoints that do not say).
    pub fn trained_precision(&self) -> Precision {
        self.precision.unwrap_or(Precision::Fp32)
    }
}

/// Whether checkpoint `stem` (`run/last`) exists: its description file is the commit mark.
pub fn exists(stem: &Path) -> bool {
    files::paths(stem).1.exists()
}

/// Saves `tensors` with `meta` as checkpoint `stem` (e.g. `run/best`).
pub fn save(
    stem: &Path,
    tensors: &[(String, Tensor)],
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    files::save(stem, tensors, meta)
}

/// Loads checkpoint `stem`'s tensors (CPU) and description, after checking that they belong
/// together and that this version reads the format.
pub fn load(stem: &Path) -> Result<(Vec<(String, Tensor)>, CheckpointMeta), TrainError> {
    let (tensors, meta): (_, CheckpointMeta) = files::load(stem)?;
    check_format(stem, &meta)?;
    Ok((tensors, meta))
}

/// Reads only checkpoint `stem`'s description (no tensors), e.g. to compare backbones before
/// any CLIP is loaded.
pub fn read_description(stem: &Path) -> Result<CheckpointMeta, TrainError> {
    let meta: CheckpointMeta = files::read_description(stem)?;
    check_format(stem, &meta)?;
    Ok(meta)
}

/// SHA-256 of checkpoint `stem`'s tensors file: the identity of its learned weights.
pub fn tensors_sha256(stem: &Path) -> Result<String, CheckpointError> {
    let path = files::paths(stem).0;
    let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Read { path, source })?;
    Ok(sha256_hex(&bytes))
}

fn check_format(stem: &Path, meta: &CheckpointMeta) -> Result<(), TrainError> {
    if meta.format != CHECKPOINT_FORMAT {
        return Err(TrainError::Invalid(format!(
            "{} has format {:?}; this version reads {:?}",
            stem.display(),
            meta.format,
            CHECKPOINT_FORMAT
        )));
    }
    Ok(())
}

/// A checkpoint made ready to score: its model (with the frozen CLIP) and description.
pub struct LoadedCheckpoint {
    pub model: AgiqaModel,
    pub meta: CheckpointMeta,
    pub clip_sha256: String,
    pub path: PathBuf,
}

/// Loads checkpoint `stem` (`run/best`), with the CLIP it was trained on: `clip` when given,
/// else the source the checkpoint records. The CLIP weights must be the same ones (SHA-256).
pub fn load_checkpoint(
    stem: &Path,
    clip: Option<Clip>,
    tokenizer: &ClipTokenizer,
    device: Device,
) -> Result<LoadedCheckpoint, TrainError> {
    load_checkpoint_in(stem, clip, tokenizer, device, Precision::Fp32)
}

/// [`load_checkpoint`] with CLIP computing in `precision` (e.g. fp16 to evaluate on a GPU);
/// the weights are checked against the checkpoint before the cast.
pub fn load_checkpoint_in(
    stem: &Path,
    clip: Option<Clip>,
    tokenizer: &ClipTokenizer,
    device: Device,
    precision: Precision,
) -> Result<LoadedCheckpoint, TrainError> {
    let (tensors, meta) = load(stem)?;
    let mut clip = match clip {
        Some(clip) => clip,
        None => meta.clip_source.load(device)?,
    };
    let found = clip_fingerprint(&clip);
    if found != meta.clip_sha256 {
        return Err(TrainError::ClipMismatch {
            checkpoint: stem.to_path_buf(),
            expected: meta.clip_sha256.clone(),
            found,
        });
    }
    clip.set_precision(precision);
    let mut model = AgiqaModel::new(clip, tokenizer, &meta.model)?;
    load_trainable(&mut model, &tensors)?;
    Ok(LoadedCheckpoint {
        model,
        meta,
        clip_sha256: found,
        path: stem.to_path_buf(),
    })
}

/// The model's trainable parameters in name order, as a checkpoint stores them.
pub fn trainable_tensors(model: &AgiqaModel) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = model.trainable().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Copies checkpoint tensors into the model's trainable variables; every variable must be
/// present with its shape, and nothing else.
pub fn load_trainable(
    model: &mut AgiqaModel,
    tensors: &[(String, Tensor)],
) -> Result<(), TrainError> {
    let device = model.clip().device();
    let vars = model.trainable().variables();
    let mut seen = 0;
    for (name, tensor) in tensors {
        let Some(param) = vars.get(name) else {
            return Err(TrainError::Invalid(format!(
                "checkpoint has tensor {name}, which this model does not"
            )));
        };
        if param.size() != tensor.size() {
            return Err(TrainError::Invalid(format!(
                "checkpoint tensor {name} has shape {:?}, the model expects {:?}",
                tensor.size(),
                param.size()
            )));
        }
        tch::no_grad(|| param.shallow_clone().copy_(&tensor.to_device(device)));
        seen += 1;
    }
    if seen != vars.len() {
        return Err(TrainError::Invalid(format!(
            "checkpoint holds {seen} of the model's {} trainable tensors",
            vars.len()
        )));
    }
    Ok(())
}

/// Writes `<dir>/best` for a model that has not been trained: the CLIP from `source`, the
/// learned parts at their seeded initialisation, score scale `[score_min, score_max]` from
/// `model`. For exporting, benchmarking and parity checks of an architecture before (or
/// without) training, e.g. a ViT-B/16 of random weights. Returns the checkpoint stem.
pub fn write_untrained(
    source: &ClipSource,
    model: &ModelConfig,
    dimension: &str,
    seed: u64,
    dir: &Path,
    tokenizer: &ClipTokenizer,
    device: Device,
) -> Result<PathBuf, TrainError> {
    let clip = source.load(device)?;
    let fingerprint = clip_fingerprint(&clip);
    let clip_name = clip.config().name();
    let clip_config = clip.config().clone();
    tch::manual_seed(seed as i64);
    let built = AgiqaModel::new(clip, tokenizer, model)?;
    let train_config = TrainConfig {
        model: model.clone(),
        epochs: 0,
        seed,
        ..TrainConfig::default()
    };
    let meta = CheckpointMeta {
        format: CHECKPOINT_FORMAT.into(),
        model: model.clone(),
        preprocessing: Preprocessing::clip(clip_config.image_resolution() as u32),
        clip_name,
        clip_config,
        clip_source: source.clone(),
        clip_sha256: fingerprint,
        dataset: "none (untrained)".into(),
        dimension: dimension.into(),
        score_scale: (model.score_min, model.score_max),
        protocol: "untrained: initial weights, never evaluated".into(),
        epoch: 0,
        metrics: None,
        selected_on: "none".into(),
        best: None,
        train_config,
        device: None,
        precision: None,
    };
    let stem = dir.join("best");
    save(&stem, &trainable_tensors(&built), &meta)?;
    Ok(stem)
}
