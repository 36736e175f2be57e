//! Using a trained checkpoint: evaluate it on a dataset, or score images.

use std::path::{Path, PathBuf};

use agiqa_runtime::metrics::{Correlations, Logistic4};
use agiqa_runtime::preprocess::{DecodeLimits, PreprocessError, Preprocessor};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::clip::Clip;
use crate::data::Dataset;
use crate::features::{clip_fingerprint, FeatureExtractor, ViewSpec};
use crate::model::AgiqaModel;
use crate::tokenizer::ClipTokenizer;
use crate::train::{load_trainable, CheckpointMeta, TrainError};

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
    let (tensors, meta): (_, CheckpointMeta) = checkpoint::load(stem)?;
    if meta.format != crate::train::CHECKPOINT_FORMAT {
        return Err(TrainError::Invalid(format!(
            "{} has format {:?}; this version reads {:?}",
            stem.display(),
            meta.format,
            crate::train::CHECKPOINT_FORMAT
        )));
    }
    let clip = match clip {
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
    let mut model = AgiqaModel::new(clip, tokenizer, &meta.model)?;
    load_trainable(&mut model, &tensors)?;
    Ok(LoadedCheckpoint {
        model,
        meta,
        clip_sha256: found,
        path: stem.to_path_buf(),
    })
}

/// A checkpoint's scores on a dataset.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub dataset: String,
    pub dimension: String,
    /// The protocol the checkpoint was trained under (this evaluation uses every sample given).
    pub trained_with: String,
    pub metrics: Correlations,
    pub logistic: Logistic4,
    pub predictions: Vec<(String, f64, f64)>,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "checkpoint {} on {} / {} ({} images)",
            self.checkpoint.display(),
            self.dataset,
            self.dimension,
            self.metrics.n
        )?;
        writeln!(f, "trained with: {}", self.trained_with)?;
        writeln!(
            f,
            "{:>8} {:>8} {:>8} {:>10}",
            "PLCC", "SRCC", "KRCC", "PLCC(log)"
        )?;
        writeln!(
            f,
            "{:>8.4} {:>8.4} {:>8.4} {:>10.4}",
            self.metrics.plcc, self.metrics.srcc, self.metrics.krcc, self.metrics.plcc_logistic
        )
    }
}

/// Scores every sample of `dataset` (centre view) and compares with its MOS.
pub fn evaluate_dataset(
    loaded: &LoadedCheckpoint,
    dataset: &Dataset,
    feature_cache: Option<&Path>,
) -> Result<EvalReport, TrainError> {
    let paths: Vec<PathBuf> = dataset.samples.iter().map(|s| s.path.clone()).collect();
    let features = FeatureExtractor::new(
        loaded.model.clip(),
        &loaded.clip_sha256,
        ViewSpec::Center,
        feature_cache,
    )
    .extract(&paths, &mut |_| {})?
    .squeeze_dim(1);
    let mos = dataset.mos();
    let all: Vec<usize> = (0..dataset.samples.len()).collect();
    let (metrics, predicted) =
        crate::train::evaluate_features(&loaded.model, &features, &mos, &all)?;
    Ok(EvalReport {
        checkpoint: loaded.path.clone(),
        dataset: dataset.name.clone(),
        dimension: dataset.dimension.clone(),
        trained_with: format!(
            "{} / {} — {}",
            loaded.meta.dataset, loaded.meta.dimension, loaded.meta.protocol
        ),
        logistic: Logistic4::fit(&predicted, &mos),
        metrics,
        predictions: dataset
            .samples
            .iter()
            .zip(&predicted)
            .map(|(s, &p)| (s.name.clone(), s.mos, p))
            .collect(),
    })
}

/// Scores image files; a file that cannot be read is reported, the others still scored.
pub fn predict_files(
    loaded: &LoadedCheckpoint,
    paths: &[PathBuf],
) -> Vec<Result<f64, PreprocessError>> {
    const BATCH: usize = 32;
    let preprocessor = Preprocessor::new(loaded.meta.preprocessing.clone());
    let size = i64::from(loaded.meta.preprocessing.image_size);
    let text = tch::no_grad(|| loaded.model.text_features());
    let mut results: Vec<Result<f64, PreprocessError>> = Vec::with_capacity(paths.len());
    // Images go through the encoder in batches; a file that fails keeps its error in place.
    for chunk in paths.chunks(BATCH) {
        let mut pixels = Vec::with_capacity(chunk.len() * preprocessor.config().tensor_len());
        let mut good = Vec::with_capacity(chunk.len());
        for path in chunk {
            match preprocessor.preprocess_file(path, &DecodeLimits::default()) {
                Ok(p) => {
                    pixels.extend(p);
                    good.push(results.len());
                    results.push(Ok(f64::NAN));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if good.is_empty() {
            continue;
        }
        let x = Tensor::from_slice(&pixels).view([good.len() as i64, 3, size, size]);
        let scores = tch::no_grad(|| {
            let image = loaded.model.image_features(&x);
            loaded
                .model
                .scores(&image, &text, false)
                .to_kind(Kind::Double)
                .to_device(tch::Device::Cpu)
        });
        let scores: Vec<f64> =
            Vec::try_from(&scores).unwrap_or_else(|_| vec![f64::NAN; good.len()]);
        for (&i, score) in good.iter().zip(scores) {
            results[i] = Ok(score);
        }
    }
    results
}
