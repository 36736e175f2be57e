//! Using a trained checkpoint: evaluate it on a dataset, or score images.

use std::path::{Path, PathBuf};

use agiqa_runtime::metrics::{Correlations, Logistic4};
use agiqa_runtime::preprocess::{DecodeLimits, PreprocessError, Preprocessor};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::LoadedCheckpoint;
use crate::data::Dataset;
use crate::error::TrainError;
use crate::features::{FeatureExtractor, ViewSpec};
use crate::model::AgiqaModel;

/// A checkpoint's scores on a dataset.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub dataset: String,
    pub dimension: String,
    /// The protocol the checkpoint was trained under.
    pub trained_with: String,
    /// Which images the numbers cover: this evaluation scores every image of the dataset given,
    /// so a number on the dataset the checkpoint was trained on includes its training images.
    pub covered: String,
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
        writeln!(f, "images scored: {}", self.covered)?;
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

/// What a whole-dataset evaluation covers, said so that it is never read as a held-out number.
fn covered_label(loaded: &LoadedCheckpoint, dataset: &Dataset) -> String {
    let n = dataset.samples.len();
    if loaded.meta.dataset == dataset.name && loaded.meta.dimension == dataset.dimension {
        format!(
            "all {n} images (train, val and test parts together: includes the images this checkpoint was trained on; not a held-out figure)"
        )
    } else {
        format!(
            "all {n} images of {} (not the checkpoint's training set)",
            dataset.name
        )
    }
}

/// Writes `eval.json` and `scatter.png` (titled with what was covered) into `out`; returns
/// their paths.
pub fn write_eval_outputs(
    report: &EvalReport,
    out: &Path,
) -> Result<(PathBuf, PathBuf), TrainError> {
    std::fs::create_dir_all(out).map_err(crate::error::write_err(out))?;
    let json = out.join("eval.json");
    let bytes =
        serde_json::to_vec_pretty(report).map_err(|e| TrainError::Invalid(e.to_string()))?;
    agiqa_runtime::atomic_file::write_atomic(&json, &bytes)
        .map_err(crate::error::write_err(&json))?;
    let (pred, mos): (Vec<f64>, Vec<f64>) =
        report.predictions.iter().map(|(_, m, p)| (*p, *m)).unzip();
    let includes_training = if report.covered.contains("trained on") {
        ", incl. training"
    } else {
        ""
    };
    let title = format!(
        "{} / {} — all {} images{includes_training}",
        report.dataset,
        report.dimension,
        report.predictions.len()
    );
    let scatter = out.join("scatter.png");
    crate::plots::plot_scatter(
        &scatter,
        &title,
        &pred,
        &mos,
        Some(&report.logistic),
        &report.metrics,
    )?;
    Ok((json, scatter))
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
        loaded.meta.preprocessing.clone(),
        ViewSpec::Center,
        feature_cache,
    )
    .extract(&paths, &mut |_| {})?
    .squeeze_dim(1);
    let mos = dataset.mos();
    let all: Vec<usize> = (0..dataset.samples.len()).collect();
    let (metrics, predicted) = evaluate_features(&loaded.model, &features, &mos, &all)?;
    Ok(EvalReport {
        checkpoint: loaded.path.clone(),
        dataset: dataset.name.clone(),
        dimension: dataset.dimension.clone(),
        trained_with: format!(
            "{} / {} — {}",
            loaded.meta.dataset, loaded.meta.dimension, loaded.meta.protocol
        ),
        covered: covered_label(loaded, dataset),
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

/// Scores `indices` from centre-view features; returns metrics and the predictions.
pub fn evaluate_features(
    model: &AgiqaModel,
    center: &Tensor,
    mos: &[f64],
    indices: &[usize],
) -> Result<(Correlations, Vec<f64>), TrainError> {
    let rows = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let predictions: Vec<f64> = tch::no_grad(|| -> Result<Vec<f64>, TrainError> {
        let text = model.text_features();
        let image = center.index_select(0, &rows);
        let mut out = Vec::with_capacity(indices.len());
        for chunk in image.split(256, 0) {
            let s = model
                .scores(&chunk, &text, false)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu);
            out.extend(Vec::<f64>::try_from(&s)?);
        }
        Ok(out)
    })?;
    let truth: Vec<f64> = indices.iter().map(|&i| mos[i]).collect();
    Ok((Correlations::compute(&predictions, &truth)?, predictions))
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
