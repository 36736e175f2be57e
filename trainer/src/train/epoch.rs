//! One training epoch, in the steps a reader can follow: the epoch's data order, each batch's
//! image features (a cached view or a freshly encoded one), the loss and optimiser step — and
//! the rule that decides whether an epoch's model becomes the best checkpoint.

use std::path::Path;

use tch::Tensor;

use super::{DatasetFeatures, TrainViews};
use crate::config::TrainConfig;
use crate::data::Dataset;
use crate::device::catch_oom;
use crate::error::TrainError;
use crate::features::FeatureExtractor;
use crate::model::AgiqaModel;
use crate::optim::Optimizer;
use crate::synthetic_images::SplitMix64;

/// The epoch's shuffled training indices and the generator that then picks each image's view.
/// Both derive from `(seed, epoch)` alone, so a resumed run sees the same epochs.
pub(crate) fn epoch_order(train: &[usize], seed: u64, epoch: usize) -> (Vec<usize>, SplitMix64) {
    let mut rng = SplitMix64::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (epoch as u64 + 1));
    let mut order = train.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    (order, rng)
}

/// Image features `[n, E]` of one batch: view `picks[k]` of image `batch[k]`.
fn batch_features(
    features: &DatasetFeatures,
    encoder: Option<&FeatureExtractor<'_>>,
    dataset: &Dataset,
    batch: &[usize],
    picks: &[i64],
) -> Result<Tensor, TrainError> {
    let rows: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
    match (&features.train, encoder) {
        (TrainViews::Cached(all), _) => {
            let dim = all.size()[2];
            let pick = Tensor::from_slice(picks)
                .view([-1, 1, 1])
                .expand([rows.len() as i64, 1, dim], false);
            Ok(all
                .index_select(0, &Tensor::from_slice(&rows))
                .gather(1, &pick, false)
                .squeeze_dim(1))
        }
        (TrainViews::Encoded { hashes, .. }, Some(encoder)) => {
            let paths: Vec<&Path> = batch
                .iter()
                .map(|&i| dataset.samples[i].path.as_path())
                .collect();
            let batch_hashes: Vec<&str> = batch.iter().map(|&i| hashes[i].as_str()).collect();
            let picks: Vec<usize> = picks.iter().map(|&p| p as usize).collect();
            Ok(encoder.encode_picked(&paths, &batch_hashes, &picks)?)
        }
        (TrainViews::Encoded { .. }, None) => Err(TrainError::Invalid(
            "training views are not cached and no encoder was given".into(),
        )),
    }
}

/// What one epoch needs besides the model and optimiser.
pub(crate) struct EpochInputs<'a> {
    pub config: &'a TrainConfig,
    pub dataset: &'a Dataset,
    pub features: &'a DatasetFeatures,
    /// Encodes views when they are not cached.
    pub encoder: Option<&'a FeatureExtractor<'a>>,
    pub train: &'a [usize],
    pub mos: &'a [f64],
}

/// Trains for epoch `epoch` (0-based) at learning rate `lr`; returns the mean training loss.
pub(crate) fn train_epoch(
    model: &AgiqaModel,
    optimizer: &mut Optimizer,
    inputs: &EpochInputs<'_>,
    epoch: usize,
    lr: f64,
) -> Result<f64, TrainError> {
    let config = inputs.config;
    let device = model.clip().device();
    let views = inputs.features.train.views() as u64;
    let (order, mut rng) = epoch_order(inputs.train, config.seed, epoch);
    // Dropout masks depend on the epoch only, not on how the run got here.
    tch::manual_seed(config.seed as i64 * 1_000_003 + epoch as i64);
    let (mut loss_sum, mut count) = (0.0, 0usize);
    for batch in order.chunks(config.batch_size) {
        let picks: Vec<i64> = batch
            .iter()
            .map(|_| (rng.next_u64() % views) as i64)
            .collect();
        let image = batch_features(
            inputs.features,
            inputs.encoder,
            inputs.dataset,
            batch,
            &picks,
        )?
        .to_device(device);
        let target: Vec<f32> = batch.iter().map(|&i| inputs.mos[i] as f32).collect();
        // The text tower's backward (through the context) is where a step allocates most.
        let value = catch_oom(device, batch.len(), || -> Result<f64, TrainError> {
            let loss = model.loss(&image, &Tensor::from_slice(&target), true)?;
            let value = f64::try_from(&loss)?;
            if !value.is_finite() {
                return Err(TrainError::Diverged {
                    epoch: epoch + 1,
                    loss: value,
                    lr,
                });
            }
            optimizer.step(model, &loss, lr, &config.optimizer)?;
            Ok(value)
        })??;
        loss_sum += value * batch.len() as f64;
        count += batch.len();
    }
    Ok(loss_sum / count.max(1) as f64)
}

/// Model selection: does an epoch with selection SRCC `candidate` replace the best so far?
///
/// Any finite SRCC beats a NaN one (a constant prediction early in training), and a higher
/// finite one beats a lower. A NaN epoch only becomes "best" when there is none yet, so a best
/// checkpoint always exists — and is replaced by the first epoch with a real SRCC.
pub(crate) fn improves(candidate: f64, best: Option<f64>) -> bool {
    match best {
        None => true,
        Some(best) if best.is_nan() => !candidate.is_nan(),
        Some(best) => candidate > best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_epoch_does_not_freeze_model_selection() {
        assert!(improves(f64::NAN, None));
        assert!(improves(0.1, Some(f64::NAN)));
        assert!(!improves(f64::NAN, Some(f64::NAN)));
        assert!(!improves(f64::NAN, Some(0.5)));
        assert!(improves(0.6, Some(0.5)));
        assert!(!improves(0.5, Some(0.5)));
        // The sequence NaN, 0.2, 0.4, 0.3 selects the epoch with 0.4.
        let mut best: Option<(usize, f64)> = None;
        for (epoch, srcc) in [f64::NAN, 0.2, 0.4, 0.3].into_iter().enumerate() {
            if improves(srcc, best.map(|b| b.1)) {
                best = Some((epoch + 1, srcc));
            }
        }
        assert_eq!(best, Some((3, 0.4)));
    }

    #[test]
    fn epoch_order_is_a_permutation_fixed_by_seed_and_epoch() {
        let train: Vec<usize> = (10..30).collect();
        let (a, _) = epoch_order(&train, 7, 3);
        let (b, _) = epoch_order(&train, 7, 3);
        let (c, _) = epoch_order(&train, 7, 4);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, train);
    }
}
