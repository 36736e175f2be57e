//! Training CLIP-AGIQA: a run over every split of the protocol ([`TrainJob::run`]), each split
//! trained epoch by epoch (`epoch.rs`), logged (`log.rs`), checkpointed (`best`, `last`) and
//! finally evaluated on its test part (`report.rs`).
//!
//! Determinism: every epoch's data order, sampled augmented view and dropout masks derive from
//! `(seed, epoch)` alone, and the optimiser state (momentum or Adam moments) is checkpointed, so a
//! run resumed after a kill ends exactly where the uninterrupted run ends (CPU, in every
//! precision). On CUDA, libtorch's kernels are not all deterministic (atomics in backward,
//! cuBLAS split-K): there a resumed run matches within a tolerance, not bit for bit.
//!
//! Device and precision: CLIP arrives on its device, already cast to the run's precision
//! ([`TrainConfig::precision_on`]; main does it); the checkpoints and `summary.json` record
//! both, and resuming in another precision is refused.

mod epoch;
mod log;
mod report;
mod summary;

use std::path::{Path, PathBuf};
use std::time::Instant;

use agiqa_runtime::atomic_file::write_atomic;
use agiqa_runtime::metrics::Correlations;
use agiqa_runtime::preprocess::Preprocessing;
use indicatif::{ProgressBar, ProgressStyle};
use tch::Tensor;

pub use self::log::{read_log, EpochLog};
pub use self::summary::{protocol_label, RunSummary, SplitResult};
use crate::checkpoint::{self, trainable_tensors, CheckpointMeta, CHECKPOINT_FORMAT};
use crate::clip::{Clip, ClipSource};
use crate::config::TrainConfig;
use crate::data::split::splits_for;
use crate::data::{Dataset, Split};
use crate::device::device_name;
use crate::error::{write_err, TrainError};
use crate::evaluate::evaluate_features;
use crate::features::{clip_fingerprint, FeatureError, FeatureExtractor, ViewSpec};
use crate::model::{AgiqaModel, Variant};
use crate::optim::Optimizer;
use crate::tokenizer::ClipTokenizer;
use epoch::{improves, train_epoch, EpochInputs};
use log::{append_log, truncate_log};
use summary::{selection_name, summarise};

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// Every split trained and evaluated; `summary.json` written.
    Finished(RunSummary),
    /// Stopped as asked ([`TrainJob::stop_after_epochs`]) after `epoch` epochs of the split in
    /// `dir`; `--resume` continues it.
    Stopped { epoch: usize, dir: PathBuf },
}

impl RunOutcome {
    /// The summary of a finished run.
    pub fn finished(self) -> Option<RunSummary> {
        match self {
            RunOutcome::Finished(summary) => Some(summary),
            RunOutcome::Stopped { .. } => None,
        }
    }
}

/// Everything a training run needs.
pub struct TrainJob<'a> {
    pub clip: &'a Clip,
    pub clip_source: ClipSource,
    pub tokenizer: &'a ClipTokenizer,
    pub dataset: &'a Dataset,
    pub config: TrainConfig,
    pub out_dir: PathBuf,
    /// Continue from `last` checkpoints instead of refusing a non-empty output folder.
    pub resume: bool,
    /// Stop after this many epochs in this process (tests of kill-and-resume).
    pub stop_after_epochs: Option<usize>,
    pub show_progress: bool,
}

/// Frozen features of the whole dataset: the centre view `[N, E]` for evaluation, and the
/// training views.
pub struct DatasetFeatures {
    pub center: Tensor,
    pub train: TrainViews,
}

/// Where training views come from.
pub enum TrainViews {
    /// Precomputed `[N, V, E]` (V = 1: the centre view when not augmenting).
    Cached(Tensor),
    /// No cache: each epoch encodes the sampled view of every training image (the view the
    /// cache would have served), running the frozen encoder again.
    Encoded { spec: ViewSpec, hashes: Vec<String> },
}

impl TrainViews {
    fn views(&self) -> usize {
        match self {
            TrainViews::Cached(t) => t.size()[1] as usize,
            TrainViews::Encoded { spec, .. } => spec.views(),
        }
    }
}

impl TrainJob<'_> {
    fn progress(&self, len: u64, what: &str) -> ProgressBar {
        if !self.show_progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>14} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {prefix}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar
    }

    /// Encodes (or loads from the cache) every image's views.
    pub fn features(&self, fingerprint: &str) -> Result<DatasetFeatures, TrainError> {
        let paths: Vec<PathBuf> = self
            .dataset
            .samples
            .iter()
            .map(|s| s.path.clone())
            .collect();
        let cache = self.config.feature_cache.as_deref();
        let bar = self.progress(paths.len() as u64, "test view");
        let mut extractor = FeatureExtractor::new(
            self.clip,
            fingerprint,
            self.preprocessing(),
            ViewSpec::Center,
            cache,
        );
        extractor.batch_size = self.config.batch_size;
        let center = extractor.extract(&paths, &mut |n| bar.set_position(n as u64))?;
        bar.finish();
        let spec = ViewSpec::Augmented {
            views: self.config.augmentation.views,
            crop: self.config.augmentation.crop,
            seed: self.config.seed,
        };
        let train = match (self.config.augmentation.enabled, cache) {
            (false, _) => TrainViews::Cached(center.shallow_clone()),
            (true, Some(_)) => {
                let bar = self.progress(paths.len() as u64, "train views");
                let mut extractor = FeatureExtractor::new(
                    self.clip,
                    fingerprint,
                    self.preprocessing(),
                    spec,
                    cache,
                );
                extractor.batch_size = self.config.batch_size;
                let views = extractor.extract(&paths, &mut |n| bar.set_position(n as u64))?;
                bar.finish();
                TrainViews::Cached(views)
            }
            (true, None) => {
                let hashes = paths
                    .iter()
                    .map(|p| {
                        std::fs::read(p)
                            .map(|bytes| crate::features::sha256_hex(&bytes))
                            .map_err(|source| FeatureError::Read {
                                path: p.clone(),
                                source,
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                TrainViews::Encoded { spec, hashes }
            }
        };
        Ok(DatasetFeatures {
            center: center.squeeze_dim(1),
            train,
        })
    }

    /// Trains on every split of the protocol and writes `summary.json`.
    pub fn run(&self) -> Result<RunOutcome, TrainError> {
        self.config
            .validate()
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let expected = self.config.precision_on(self.clip.device())?;
        if self.clip.precision() != expected {
            return Err(TrainError::Invalid(format!(
                "CLIP computes in {} but the configuration asks for {expected} on {}; cast it \
                 with Clip::set_precision first",
                self.clip.precision(),
                device_name(self.clip.device())
            )));
        }
        std::fs::create_dir_all(&self.out_dir).map_err(write_err(&self.out_dir))?;
        let config_path = self.out_dir.join("config.toml");
        write_atomic(&config_path, self.config.to_toml().as_bytes())
            .map_err(write_err(&config_path))?;
        let splits = splits_for(self.dataset, &self.config.protocol, self.config.seed)?;
        let fingerprint = clip_fingerprint(self.clip);
        let features = self.features(&fingerprint)?;
        let mut results = Vec::new();
        for (i, split) in splits.iter().enumerate() {
            let dir = if splits.len() == 1 {
                self.out_dir.clone()
            } else {
                self.out_dir.join(format!("split-{i}"))
            };
            match self.train_split(split, &features, &fingerprint, &dir)? {
                SplitOutcome::Done(result) => results.push(result),
                SplitOutcome::Stopped(epoch) => return Ok(RunOutcome::Stopped { epoch, dir }),
            }
        }
        let summary = summarise(self, results);
        let path = self.out_dir.join("summary.json");
        let json =
            serde_json::to_vec_pretty(&summary).map_err(|e| TrainError::Invalid(e.to_string()))?;
        write_atomic(&path, &json).map_err(write_err(&path))?;
        Ok(RunOutcome::Finished(summary))
    }

    fn meta(
        &self,
        split: &Split,
        fingerprint: &str,
        epoch: usize,
        metrics: Option<Correlations>,
        best: Option<(usize, f64)>,
    ) -> CheckpointMeta {
        CheckpointMeta {
            format: CHECKPOINT_FORMAT.into(),
            model: self.model_config(),
            clip_name: self.clip.config().name(),
            clip_config: self.clip.config().clone(),
            clip_source: self.clip_source.clone(),
            clip_sha256: fingerprint.to_string(),
            preprocessing: self.preprocessing(),
            dataset: self.dataset.name.clone(),
            dimension: self.dataset.dimension.clone(),
            score_scale: self.dataset.scale,
            protocol: protocol_label(split),
            epoch,
            metrics,
            selected_on: selection_name(split).into(),
            best,
            train_config: self.config.clone(),
            device: Some(device_name(self.clip.device())),
            precision: Some(self.clip.precision()),
        }
    }

    /// The run's preprocessing: CLIP's at the model's resolution, with the configured conversion.
    fn preprocessing(&self) -> Preprocessing {
        let size = self.clip.config().image_resolution() as u32;
        self.config.conversion.preprocessing(size)
    }

    /// The model configuration with the dataset's score scale filled in.
    fn model_config(&self) -> crate::model::ModelConfig {
        let mut model = self.config.model.clone();
        model.score_min = self.dataset.scale.0;
        model.score_max = self.dataset.scale.1;
        model
    }

    /// A fresh model for a split: seeded learned parts, image normalisation fitted on the
    /// split's training images.
    fn new_model(
        &self,
        split: &Split,
        features: &DatasetFeatures,
    ) -> Result<AgiqaModel, TrainError> {
        tch::manual_seed(self.config.seed as i64);
        let mut model = AgiqaModel::new(
            self.clip.clone_frozen(),
            self.tokenizer,
            &self.model_config(),
        )?;
        let train_rows =
            Tensor::from_slice(&split.train.iter().map(|&i| i as i64).collect::<Vec<_>>());
        model.fit_image_norm(&features.center.index_select(0, &train_rows));
        Ok(model)
    }

    /// Continues from `dir/last` when resuming (checking it belongs to this run) or starts
    /// afresh; returns the epochs already done and the best `(epoch, SRCC)` so far.
    fn resume_or_start(
        &self,
        dir: &Path,
        fingerprint: &str,
        model: &mut AgiqaModel,
        optimizer: &mut Optimizer,
    ) -> Result<(usize, Option<(usize, f64)>), TrainError> {
        let last = dir.join("last");
        let log_path = dir.join("log.jsonl");
        if !checkpoint::exists(&last) {
            if log_path.exists() {
                std::fs::remove_file(&log_path).map_err(write_err(&log_path))?;
            }
            return Ok((0, None));
        }
        let refuse = |reason: &str| TrainError::Resume {
            dir: dir.to_path_buf(),
            reason: reason.into(),
        };
        if !self.resume {
            return Err(refuse(
                "it already holds a run; pass --resume to continue it or choose another --out",
            ));
        }
        let (tensors, meta) = checkpoint::load(&last)?;
        let here = device_name(self.clip.device());
        let there = meta
            .device
            .clone()
            .unwrap_or_else(|| "an unrecorded device".into());
        if meta.trained_precision() != self.clip.precision() {
            return Err(refuse(&format!(
                "it was trained with CLIP in {} on {there}, this run computes in {} on {here}; \
                 pass --precision {} to continue it as it started",
                meta.trained_precision(),
                self.clip.precision(),
                meta.trained_precision()
            )));
        }
        if !self.config.same_training(&meta.train_config) {
            return Err(refuse(
                "its config.toml differs from this run's configuration",
            ));
        }
        let kind = |name: &str| name.split(':').next().unwrap_or(name).to_string();
        if meta
            .device
            .as_deref()
            .is_some_and(|d| kind(d) != kind(&here))
        {
            eprintln!(
                "warning: resuming a run trained on {there} on {here} in {}: it continues, but \
                 ends where an uninterrupted run would only within {} rounding",
                self.clip.precision(),
                self.clip.precision()
            );
        }
        if meta.clip_sha256 != fingerprint {
            return Err(refuse("it was trained with different CLIP weights"));
        }
        let parameters = optimizer.restore(&tensors, model.clip().device())?;
        checkpoint::load_trainable(model, &parameters)?;
        truncate_log(&log_path, meta.epoch)?;
        Ok((meta.epoch, meta.best))
    }

    fn train_split(
        &self,
        split: &Split,
        features: &DatasetFeatures,
        fingerprint: &str,
        dir: &Path,
    ) -> Result<SplitOutcome, TrainError> {
        std::fs::create_dir_all(dir).map_err(write_err(dir))?;
        let config = &self.config;
        let mut model = self.new_model(split, features)?;
        let mut optimizer = Optimizer::default();
        let (start_epoch, mut best) =
            self.resume_or_start(dir, fingerprint, &mut model, &mut optimizer)?;
        let mos: Vec<f64> = self.dataset.mos();
        let log_path = dir.join("log.jsonl");

        let trainable = model.config().variant != Variant::ZeroShot;
        let epochs = if trainable { config.epochs } else { 0 };
        let stop_at = self
            .stop_after_epochs
            .map_or(epochs, |n| (start_epoch + n).min(epochs));
        let bar = self.progress(epochs as u64, "epochs");
        bar.set_position(start_epoch as u64);
        let encoder = match &features.train {
            TrainViews::Encoded { spec, .. } => {
                let mut encoder = FeatureExtractor::new(
                    self.clip,
                    fingerprint,
                    self.preprocessing(),
                    spec.clone(),
                    None,
                );
                encoder.batch_size = config.batch_size;
                Some(encoder)
            }
            TrainViews::Cached(_) => None,
        };
        let inputs = EpochInputs {
            config,
            dataset: self.dataset,
            features,
            encoder: encoder.as_ref(),
            train: &split.train,
            mos: &mos,
        };
        for epoch in start_epoch..stop_at {
            let started = Instant::now();
            let lr = config.optimizer.lr_at(epoch, config.epochs);
            let train_loss = train_epoch(&model, &mut optimizer, &inputs, epoch, lr)?;
            let metrics = evaluate_features(&model, &features.center, &mos, split.selection())?.0;
            append_log(
                &log_path,
                &EpochLog {
                    epoch: epoch + 1,
                    lr,
                    train_loss,
                    selected_on: selection_name(split).into(),
                    plcc: metrics.plcc,
                    srcc: metrics.srcc,
                    krcc: metrics.krcc,
                    plcc_logistic: metrics.plcc_logistic,
                    seconds: started.elapsed().as_secs_f64(),
                },
            )?;
            if improves(metrics.srcc, best.map(|b| b.1)) {
                best = Some((epoch + 1, metrics.srcc));
                let meta = self.meta(split, fingerprint, epoch + 1, Some(metrics), best);
                checkpoint::save(&dir.join("best"), &trainable_tensors(&model), &meta)?;
            }
            let meta = self.meta(split, fingerprint, epoch + 1, Some(metrics), best);
            let mut state = trainable_tensors(&model);
            state.extend(optimizer.state_tensors());
            checkpoint::save(&dir.join("last"), &state, &meta)?;
            bar.set_position(epoch as u64 + 1);
            bar.set_prefix(format!(
                "loss {train_loss:.4} {} SRCC {:.4}",
                selection_name(split),
                metrics.srcc
            ));
        }
        bar.finish();
        if stop_at < epochs {
            return Ok(SplitOutcome::Stopped(stop_at));
        }

        // The selected checkpoint (or, for zero-shot, the untrained model) on the test part.
        let best_epoch = if trainable {
            let (tensors, _) = checkpoint::load(&dir.join("best"))?;
            checkpoint::load_trainable(&mut model, &tensors)?;
            best.map_or(0, |b| b.0)
        } else {
            let meta = self.meta(split, fingerprint, 0, None, None);
            checkpoint::save(&dir.join("best"), &trainable_tensors(&model), &meta)?;
            0
        };
        let test = report::report_test(self, &model, split, features, best_epoch, dir)?;
        let result = SplitResult {
            split: split.label.clone(),
            protocol: protocol_label(split),
            best_epoch,
            selected_on: selection_name(split).into(),
            test,
            run_dir: dir.to_path_buf(),
        };
        let path = dir.join("metrics.json");
        let json =
            serde_json::to_vec_pretty(&result).map_err(|e| TrainError::Invalid(e.to_string()))?;
        write_atomic(&path, &json).map_err(write_err(&path))?;
        Ok(SplitOutcome::Done(result))
    }
}

/// How one split's training ended.
enum SplitOutcome {
    Done(SplitResult),
    /// Stopped as asked after this many epochs.
    Stopped(usize),
}
