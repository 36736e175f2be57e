//! A split's final report: the selected checkpoint scored on the test part, with its
//! predictions (`predictions.csv`), scatter plot and training curves.

use std::path::Path;

use agiqa_runtime::atomic_file::write_atomic;
use agiqa_runtime::csv_line::csv_line;
use agiqa_runtime::metrics::{Correlations, Logistic4};

use super::log::read_log;
use super::summary::selection_name;
use super::{DatasetFeatures, TrainJob};
use crate::data::{Dataset, Split};
use crate::error::{write_err, TrainError};
use crate::evaluate::evaluate_features;
use crate::model::{AgiqaModel, Variant};

/// Scores the test part with `model` (the selected checkpoint), writes predictions and plots
/// into `dir`, and returns the test metrics.
pub(super) fn report_test(
    job: &TrainJob<'_>,
    model: &AgiqaModel,
    split: &Split,
    features: &DatasetFeatures,
    best_epoch: usize,
    dir: &Path,
) -> Result<Correlations, TrainError> {
    let mos = job.dataset.mos();
    let (test, predictions) = evaluate_features(model, &features.center, &mos, &split.test)?;
    write_predictions(dir, job.dataset, &split.test, &predictions)?;
    let test_mos: Vec<f64> = split.test.iter().map(|&i| mos[i]).collect();
    let logistic = Logistic4::fit(&predictions, &test_mos);
    // Short enough for the plot width; the full protocol label is in metrics.json.
    let title = format!(
        "{} / {} — test set, epoch {best_epoch} ({}-selected)",
        job.dataset.name,
        job.dataset.dimension,
        selection_name(split)
    );
    crate::plots::plot_scatter(
        &dir.join("scatter.png"),
        &title,
        &predictions,
        &test_mos,
        Some(&logistic),
        &test,
    )?;
    if model.config().variant != Variant::ZeroShot {
        let points = read_log(&dir.join("log.jsonl"))?
            .iter()
            .map(|e| crate::plots::EpochPoint {
                epoch: e.epoch,
                train_loss: e.train_loss,
                lr: e.lr,
                val_plcc: Some(e.plcc),
                val_srcc: Some(e.srcc),
                val_krcc: Some(e.krcc),
            })
            .collect::<Vec<_>>();
        crate::plots::plot_training_curves(&dir.join("curves.png"), &title, &points)?;
    }
    Ok(test)
}

/// `predictions.csv`: `name,mos,predicted` per test image.
fn write_predictions(
    dir: &Path,
    dataset: &Dataset,
    indices: &[usize],
    predictions: &[f64],
) -> Result<(), TrainError> {
    let path = dir.join("predictions.csv");
    let mut text = csv_line(["name", "mos", "predicted"]);
    for (&i, p) in indices.iter().zip(predictions) {
        let s = &dataset.samples[i];
        text.push_str(&csv_line([
            s.name.clone(),
            s.mos.to_string(),
            p.to_string(),
        ]));
    }
    write_atomic(&path, text.as_bytes()).map_err(write_err(&path))
}
