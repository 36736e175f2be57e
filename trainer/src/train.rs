//! Training and evaluation of CLIP-AGIQA: the epoch loop, model selection, per-epoch log,
//! checkpoints and resume, final evaluation with plots.
//!
//! Determinism: every epoch's data order, sampled augmented view and dropout masks derive from
//! `(seed, epoch)` alone, and the optimiser state (momentum or Adam moments) is checkpointed, so a run
//! resumed after a kill ends exactly where the uninterrupted run ends (CPU).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use agiqa_runtime::metrics::{Correlations, Logistic4, MetricsError};
use agiqa_runtime::preprocess::Preprocessing;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointError};
use crate::clip::{Clip, ClipConfig};
use crate::config::{OptimizerKind, ProtocolConfig, TrainConfig};
use crate::data::split::{manifest_split, reference_split, repeated_splits};
use crate::data::{DataError, Dataset, Split};
use crate::features::{clip_fingerprint, FeatureError, FeatureExtractor, ViewSpec};
use crate::model::{AgiqaModel, ModelError, Variant};
use crate::synthetic::SplitMix64;
use crate::tokenizer::ClipTokenizer;
use crate::weights::WeightsError;

/// Where the frozen CLIP came from, recorded in checkpoints so `eval`/`predict` can rebuild it.
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

/// The description stored with every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub model: crate::model::ModelConfig,
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
}

pub const CHECKPOINT_FORMAT: &str = "agiqa-checkpoint/1";

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

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes libtorch's CUDA backend available when the machine has it, and says why not otherwise.
///
/// The linker drops `libtorch_cuda.so` (nothing references it by symbol), and linking it
/// unconditionally would stop the binary from starting on machines without CUDA libraries. So
/// it is loaded here, at run time: its static initialisers register CUDA with libtorch.
pub fn enable_cuda() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: loading libtorch's own CUDA library runs only libtorch's initialisers.
            let library = unsafe { libloading::Library::new("libtorch_cuda.so") }.map_err(|e| {
                let detail = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                format!("libtorch_cuda.so could not be loaded ({e}{detail})")
            })?;
            // Kept loaded for the life of the process.
            std::mem::forget(library);
            if tch::Cuda::is_available() {
                Ok(())
            } else {
                Err("libtorch_cuda.so is loaded but no CUDA device is visible".into())
            }
        })
        .clone()
}

/// Picks the device a config names: `auto` (CUDA when available, else CPU, saying why),
/// `cpu`, `cuda` or `cuda:N` (an error when CUDA cannot be used).
pub fn device_from(name: &str) -> Result<Device, TrainError> {
    let cuda = |index: usize| {
        enable_cuda()
            .map(|()| Device::Cuda(index))
            .map_err(|reason| {
                TrainError::Invalid(format!("device {name:?} requested but {reason}"))
            })
    };
    match name {
        "auto" => Ok(match enable_cuda() {
            Ok(()) => Device::Cuda(0),
            Err(reason) => {
                eprintln!("note: running on CPU ({reason})");
                Device::Cpu
            }
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(index) => cuda(index),
            None => Err(TrainError::Invalid(format!(
                "unknown device {other:?}: use cpu, cuda, cuda:N or auto"
            ))),
        },
    }
}

/// The splits a protocol asks for.
pub fn make_splits(
    dataset: &Dataset,
    protocol: &ProtocolConfig,
    seed: u64,
) -> Result<Vec<Split>, TrainError> {
    Ok(match protocol {
        ProtocolConfig::Paper => vec![reference_split(dataset)?],
        ProtocolConfig::Manifest => vec![manifest_split(dataset)?],
        ProtocolConfig::Random {
            train,
            val,
            test,
            repeats,
            grouped_by_prompt,
        } => repeated_splits(
            dataset,
            *repeats,
            (*train, *val, *test),
            *grouped_by_prompt,
            seed,
        ),
    })
}

/// One epoch's log line (`log.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub selected_on: String,
    // NaN (a constant prediction, a failed logistic fit) is written as JSON null: read it back.
    #[serde(deserialize_with = "agiqa_runtime::metrics::nan_from_null")]
    pub plcc: f64,
    #[serde(deserialize_with = "agiqa_runtime::metrics::nan_from_null")]
    pub srcc: f64,
    #[serde(deserialize_with = "agiqa_runtime::metrics::nan_from_null")]
    pub krcc: f64,
    #[serde(deserialize_with = "agiqa_runtime::metrics::nan_from_null")]
    pub plcc_logistic: f64,
    pub seconds: f64,
}

/// Result of one split.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SplitResult {
    pub split: String,
    pub protocol: String,
    pub best_epoch: usize,
    pub selected_on: String,
    /// Metrics of the selected checkpoint on the test part.
    pub test: Correlations,
    pub run_dir: PathBuf,
}

/// Results over all splits, with mean ± std where there are several.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub dataset: String,
    pub dimension: String,
    pub clip: String,
    pub variant: Variant,
    pub splits: Vec<SplitResult>,
    /// `(mean, std)` of PLCC, SRCC, KRCC, logistic PLCC over splits.
    pub mean_std: [(f64, f64); 4],
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
        let center = FeatureExtractor::new(self.clip, fingerprint, ViewSpec::Center, cache)
            .extract(&paths, &mut |n| bar.set_position(n as u64))?;
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
                let views = FeatureExtractor::new(self.clip, fingerprint, spec, cache)
                    .extract(&paths, &mut |n| bar.set_position(n as u64))?;
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
    pub fn run(&self) -> Result<RunSummary, TrainError> {
        self.config
            .validate()
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        std::fs::create_dir_all(&self.out_dir).map_err(write_err(&self.out_dir))?;
        let config_path = self.out_dir.join("config.toml");
        checkpoint::write_atomic(&config_path, self.config.to_toml().as_bytes())
            .map_err(write_err(&config_path))?;
        let splits = make_splits(self.dataset, &self.config.protocol, self.config.seed)?;
        let fingerprint = clip_fingerprint(self.clip);
        let features = self.features(&fingerprint)?;
        let mut results = Vec::new();
        for (i, split) in splits.iter().enumerate() {
            let dir = if splits.len() == 1 {
                self.out_dir.clone()
            } else {
                self.out_dir.join(format!("split-{i}"))
            };
            results.push(self.train_split(split, &features, &fingerprint, &dir)?);
            if self.stop_after_epochs.is_some() {
                break;
            }
        }
        let summary = summarise(self, results);
        let path = self.out_dir.join("summary.json");
        let json =
            serde_json::to_vec_pretty(&summary).map_err(|e| TrainError::Invalid(e.to_string()))?;
        checkpoint::write_atomic(&path, &json).map_err(write_err(&path))?;
        Ok(summary)
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
            preprocessing: Preprocessing::clip(self.clip.config().image_resolution() as u32),
            dataset: self.dataset.name.clone(),
            dimension: self.dataset.dimension.clone(),
            score_scale: self.dataset.scale,
            protocol: protocol_label(split),
            epoch,
            metrics,
            selected_on: selection_name(split).into(),
            best,
            train_config: self.config.clone(),
        }
    }

    /// The model configuration with the dataset's score scale filled in.
    fn model_config(&self) -> crate::model::ModelConfig {
        let mut model = self.config.model.clone();
        model.score_min = self.dataset.scale.0;
        model.score_max = self.dataset.scale.1;
        model
    }

    fn train_split(
        &self,
        split: &Split,
        features: &DatasetFeatures,
        fingerprint: &str,
        dir: &Path,
    ) -> Result<SplitResult, TrainError> {
        std::fs::create_dir_all(dir).map_err(write_err(dir))?;
        let config = &self.config;
        let device = self.clip.device();
        tch::manual_seed(config.seed as i64);
        let mut model = AgiqaModel::new(
            self.clip.clone_frozen(),
            self.tokenizer,
            &self.model_config(),
        )?;
        let train_rows =
            Tensor::from_slice(&split.train.iter().map(|&i| i as i64).collect::<Vec<_>>());
        model.fit_image_norm(&features.center.index_select(0, &train_rows));
        let mos: Vec<f64> = self.dataset.mos();
        let selection = split.selection().to_vec();
        let log_path = dir.join("log.jsonl");
        let last = dir.join("last");

        let mut state = TrainState::new();
        let mut start_epoch = 0;
        if checkpoint::paths(&last).1.exists() {
            if !self.resume {
                return Err(TrainError::Resume {
                    dir: dir.to_path_buf(),
                    reason: "it already holds a run; pass --resume to continue it or choose another --out".into(),
                });
            }
            let (tensors, meta): (_, CheckpointMeta) = checkpoint::load(&last)?;
            if meta.train_config != *config {
                return Err(TrainError::Resume {
                    dir: dir.to_path_buf(),
                    reason: "its config.toml differs from this run's configuration".into(),
                });
            }
            if meta.clip_sha256 != fingerprint {
                return Err(TrainError::Resume {
                    dir: dir.to_path_buf(),
                    reason: "it was trained with different CLIP weights".into(),
                });
            }
            state.restore(&mut model, &tensors)?;
            state.best = meta.best;
            start_epoch = meta.epoch;
            truncate_log(&log_path, start_epoch)?;
        } else if log_path.exists() {
            std::fs::remove_file(&log_path).map_err(write_err(&log_path))?;
        }

        let trainable = model.config().variant != Variant::ZeroShot;
        let epochs = if trainable { config.epochs } else { 0 };
        let stop_at = self
            .stop_after_epochs
            .map_or(epochs, |n| (start_epoch + n).min(epochs));
        let bar = self.progress(epochs as u64, "epochs");
        bar.set_position(start_epoch as u64);
        let views = features.train.views();
        let encoder = match &features.train {
            TrainViews::Encoded { spec, .. } => Some(FeatureExtractor::new(
                self.clip,
                fingerprint,
                spec.clone(),
                None,
            )),
            TrainViews::Cached(_) => None,
        };
        for epoch in start_epoch..stop_at {
            let started = Instant::now();
            let lr = config.optimizer.lr_at(epoch, config.epochs);
            let mut rng = SplitMix64::new(
                config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (epoch as u64 + 1),
            );
            let mut order = split.train.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            // Dropout masks depend on the epoch only, not on how the run got here.
            tch::manual_seed(config.seed as i64 * 1_000_003 + epoch as i64);
            let (mut loss_sum, mut count) = (0.0, 0usize);
            for batch in order.chunks(config.batch_size) {
                let rows: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
                let picks: Vec<i64> = batch
                    .iter()
                    .map(|_| (rng.next_u64() % views as u64) as i64)
                    .collect();
                let image = match (&features.train, &encoder) {
                    (TrainViews::Cached(all), _) => {
                        let dim = all.size()[2];
                        let pick = Tensor::from_slice(&picks)
                            .view([-1, 1, 1])
                            .expand([rows.len() as i64, 1, dim], false);
                        all.index_select(0, &Tensor::from_slice(&rows))
                            .gather(1, &pick, false)
                            .squeeze_dim(1)
                    }
                    (TrainViews::Encoded { hashes, .. }, Some(encoder)) => {
                        let paths: Vec<&Path> = batch
                            .iter()
                            .map(|&i| self.dataset.samples[i].path.as_path())
                            .collect();
                        let batch_hashes: Vec<&str> =
                            batch.iter().map(|&i| hashes[i].as_str()).collect();
                        let picks: Vec<usize> = picks.iter().map(|&p| p as usize).collect();
                        encoder.encode_picked(&paths, &batch_hashes, &picks)?
                    }
                    (TrainViews::Encoded { .. }, None) => {
                        unreachable!("an encoder is made for uncached views")
                    }
                }
                .to_device(device);
                let target: Vec<f32> = batch.iter().map(|&i| mos[i] as f32).collect();
                let loss = model.loss(&image, &Tensor::from_slice(&target), true)?;
                let value = f64::try_from(&loss)?;
                if !value.is_finite() {
                    return Err(TrainError::Diverged {
                        epoch: epoch + 1,
                        loss: value,
                        lr,
                    });
                }
                state.step(&model, &loss, lr, &config.optimizer);
                loss_sum += value * batch.len() as f64;
                count += batch.len();
            }
            let metrics = evaluate_features(&model, &features.center, &mos, &selection)?.0;
            let train_loss = loss_sum / count.max(1) as f64;
            let entry = EpochLog {
                epoch: epoch + 1,
                lr,
                train_loss,
                selected_on: selection_name(split).into(),
                plcc: metrics.plcc,
                srcc: metrics.srcc,
                krcc: metrics.krcc,
                plcc_logistic: metrics.plcc_logistic,
                seconds: started.elapsed().as_secs_f64(),
            };
            append_log(&log_path, &entry)?;
            if state.best.is_none_or(|(_, best)| metrics.srcc > best) {
                state.best = Some((epoch + 1, metrics.srcc));
                let meta = self.meta(split, fingerprint, epoch + 1, Some(metrics), state.best);
                checkpoint::save(&dir.join("best"), &state.parameters(&model), &meta)?;
            }
            let meta = self.meta(split, fingerprint, epoch + 1, Some(metrics), state.best);
            checkpoint::save(&last, &state.with_optimizer_state(&model), &meta)?;
            bar.set_position(epoch as u64 + 1);
            bar.set_prefix(format!(
                "loss {train_loss:.4} {} SRCC {:.4}",
                selection_name(split),
                metrics.srcc
            ));
        }
        bar.finish();
        if stop_at < epochs {
            return Err(TrainError::Invalid(format!(
                "stopped after epoch {stop_at} as asked; resume with --resume"
            )));
        }

        // The selected checkpoint, evaluated on the test part.
        let best_epoch = if trainable {
            let (tensors, _): (_, CheckpointMeta) = checkpoint::load(&dir.join("best"))?;
            state.restore(&mut model, &tensors)?;
            state.best.map_or(0, |b| b.0)
        } else {
            let meta = self.meta(split, fingerprint, 0, None, None);
            checkpoint::save(&dir.join("best"), &state.parameters(&model), &meta)?;
            0
        };
        let (test, predictions) = evaluate_features(&model, &features.center, &mos, &split.test)?;
        write_predictions(dir, self.dataset, &split.test, &predictions)?;
        let test_mos: Vec<f64> = split.test.iter().map(|&i| mos[i]).collect();
        let logistic = Logistic4::fit(&predictions, &test_mos);
        // Short enough for the plot width; the full protocol label is in metrics.json.
        let title = format!(
            "{} / {} — test set, epoch {best_epoch} ({}-selected)",
            self.dataset.name,
            self.dataset.dimension,
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
        if trainable {
            let points = read_log(&log_path)?
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
        checkpoint::write_atomic(&path, &json).map_err(write_err(&path))?;
        Ok(result)
    }
}

fn selection_name(split: &Split) -> &'static str {
    if split.val.is_empty() {
        "test"
    } else {
        "val"
    }
}

/// How a number was obtained, for every output.
pub fn protocol_label(split: &Split) -> String {
    if split.val.is_empty() {
        format!(
            "{} — best epoch selected on the TEST set (paper protocol, optimistic)",
            split.label
        )
    } else {
        format!("{} — checkpoint selected on validation", split.label)
    }
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

/// The optimiser, written out (PyTorch semantics) so its state can be checkpointed with the
/// parameters: SGD with momentum and weight decay (dampening 0, no Nesterov, the first step's
/// buffer is the gradient), or AdamW (decoupled weight decay, bias-corrected moments).
struct TrainState {
    /// `momentum/<param>` (SGD) or `exp_avg/<param>` and `exp_avg_sq/<param>` (AdamW).
    buffers: std::collections::BTreeMap<String, Tensor>,
    /// Optimiser steps taken (AdamW's bias correction).
    steps: i64,
    best: Option<(usize, f64)>,
}

impl TrainState {
    fn new() -> Self {
        TrainState {
            buffers: Default::default(),
            steps: 0,
            best: None,
        }
    }

    fn step(
        &mut self,
        model: &AgiqaModel,
        loss: &Tensor,
        lr: f64,
        optimizer: &crate::config::OptimizerConfig,
    ) {
        let mut vars = model.trainable().variables();
        for v in vars.values_mut() {
            v.zero_grad();
        }
        loss.backward();
        self.steps += 1;
        let t = self.steps as i32;
        tch::no_grad(|| {
            for (name, param) in &vars {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let mut p = param.shallow_clone();
                match optimizer.kind {
                    OptimizerKind::Sgd => {
                        let d = &grad + param * optimizer.weight_decay;
                        let buffer = self
                            .buffers
                            .entry(format!("momentum/{name}"))
                            .and_modify(|b| *b = &*b * optimizer.momentum + &d)
                            .or_insert_with(|| d.copy());
                        let _ = p.f_sub_(&(&*buffer * lr));
                    }
                    OptimizerKind::AdamW => {
                        let (b1, b2) = optimizer.betas;
                        let _ = p.f_mul_scalar_(1.0 - lr * optimizer.weight_decay);
                        let m = self
                            .buffers
                            .entry(format!("exp_avg/{name}"))
                            .or_insert_with(|| grad.zeros_like());
                        *m = &*m * b1 + &grad * (1.0 - b1);
                        let m_hat = &*m / (1.0 - b1.powi(t));
                        let v = self
                            .buffers
                            .entry(format!("exp_avg_sq/{name}"))
                            .or_insert_with(|| grad.zeros_like());
                        *v = &*v * b2 + grad.square() * (1.0 - b2);
                        let v_hat = &*v / (1.0 - b2.powi(t));
                        let _ = p.f_sub_(&(m_hat / (v_hat.sqrt() + optimizer.eps) * lr));
                    }
                }
            }
        });
    }

    fn parameters(&self, model: &AgiqaModel) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = model.trainable().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Parameters plus optimiser state, for the `last` checkpoint.
    fn with_optimizer_state(&self, model: &AgiqaModel) -> Vec<(String, Tensor)> {
        let mut all = self.parameters(model);
        for (name, buffer) in &self.buffers {
            all.push((format!("optimizer/{name}"), buffer.shallow_clone()));
        }
        all.push(("optimizer/steps".into(), Tensor::from(self.steps)));
        all
    }

    fn restore(
        &mut self,
        model: &mut AgiqaModel,
        tensors: &[(String, Tensor)],
    ) -> Result<(), TrainError> {
        let device = model.clip().device();
        let mut parameters = Vec::new();
        for (name, tensor) in tensors {
            match name.strip_prefix("optimizer/") {
                Some("steps") => self.steps = tensor.int64_value(&[]),
                Some(buffer) => {
                    self.buffers
                        .insert(buffer.to_string(), tensor.to_device(device));
                }
                None => parameters.push((name.clone(), tensor.shallow_clone())),
            }
        }
        load_trainable(model, &parameters)
    }
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

fn append_log(path: &Path, entry: &EpochLog) -> Result<(), TrainError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(write_err(path))?;
    let line = serde_json::to_string(entry).map_err(|e| TrainError::Invalid(e.to_string()))?;
    writeln!(file, "{line}").map_err(write_err(path))?;
    file.sync_data().map_err(write_err(path))
}

/// Reads `log.jsonl`.
pub fn read_log(path: &Path) -> Result<Vec<EpochLog>, TrainError> {
    let raw = std::fs::read_to_string(path).map_err(write_err(path))?;
    raw.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
        })
        .collect()
}

/// Drops log lines of epochs after the checkpoint a resumed run continues from.
fn truncate_log(path: &Path, epochs_done: usize) -> Result<(), TrainError> {
    if !path.exists() {
        return Ok(());
    }
    let kept: Vec<String> = read_log(path)?
        .into_iter()
        .filter(|e| e.epoch <= epochs_done)
        .filter_map(|e| serde_json::to_string(&e).ok())
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    checkpoint::write_atomic(path, text.as_bytes()).map_err(write_err(path))
}

fn write_predictions(
    dir: &Path,
    dataset: &Dataset,
    indices: &[usize],
    predictions: &[f64],
) -> Result<(), TrainError> {
    let path = dir.join("predictions.csv");
    let mut text = String::from("name,mos,predicted\n");
    for (&i, p) in indices.iter().zip(predictions) {
        let s = &dataset.samples[i];
        text.push_str(&format!("{},{},{p}\n", csv_field(&s.name), s.mos));
    }
    checkpoint::write_atomic(&path, text.as_bytes()).map_err(write_err(&path))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn summarise(job: &TrainJob<'_>, splits: Vec<SplitResult>) -> RunSummary {
    let stat = |f: &dyn Fn(&Correlations) -> f64| {
        let values: Vec<f64> = splits.iter().map(|s| f(&s.test)).collect();
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        (mean, var.sqrt())
    };
    RunSummary {
        dataset: job.dataset.name.clone(),
        dimension: job.dataset.dimension.clone(),
        clip: format!(
            "{} ({})",
            job.clip.config().name(),
            job.clip_source.describe()
        ),
        variant: job.config.model.variant,
        mean_std: [
            stat(&|c| c.plcc),
            stat(&|c| c.srcc),
            stat(&|c| c.krcc),
            stat(&|c| c.plcc_logistic),
        ],
        splits,
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} / {} — CLIP {} — variant {:?}",
            self.dataset, self.dimension, self.clip, self.variant
        )?;
        writeln!(
            f,
            "{:<6} {:>8} {:>8} {:>8} {:>10}  protocol",
            "split", "PLCC", "SRCC", "KRCC", "PLCC(log)"
        )?;
        for (i, s) in self.splits.iter().enumerate() {
            writeln!(
                f,
                "{:<6} {:>8.4} {:>8.4} {:>8.4} {:>10.4}  {} (epoch {})",
                i,
                s.test.plcc,
                s.test.srcc,
                s.test.krcc,
                s.test.plcc_logistic,
                s.protocol,
                s.best_epoch
            )?;
        }
        if self.splits.len() > 1 {
            let [p, s, k, l] = self.mean_std;
            writeln!(
                f,
                "{:<6} {:.4}±{:.4} {:.4}±{:.4} {:.4}±{:.4} {:.4}±{:.4}  mean ± std over {} splits",
                "all",
                p.0,
                p.1,
                s.0,
                s.1,
                k.0,
                k.1,
                l.0,
                l.1,
                self.splits.len()
            )?;
        }
        Ok(())
    }
}

/// Writes `<dir>/best` for a model that has not been trained: the CLIP from `source`, the
/// learned parts at their seeded initialisation, score scale `[score_min, score_max]` from
/// `model`. For exporting, benchmarking and parity checks of an architecture before (or
/// without) training, e.g. a ViT-B/16 of random weights. Returns the checkpoint stem.
pub fn write_untrained(
    source: &ClipSource,
    model: &crate::model::ModelConfig,
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
    let mut parameters: Vec<(String, Tensor)> = built.trainable().variables().into_iter().collect();
    parameters.sort_by(|a, b| a.0.cmp(&b.0));
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
    };
    let stem = dir.join("best");
    checkpoint::save(&stem, &parameters, &meta)?;
    Ok(stem)
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn nan_metrics_survive_the_log_round_trip() {
        let dir = std::env::temp_dir().join(format!("agiqa-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.jsonl");
        let line = |epoch| EpochLog {
            epoch,
            lr: 0.002,
            train_loss: 1.0,
            selected_on: "val".into(),
            plcc: 0.5,
            srcc: f64::NAN,
            krcc: 0.1,
            plcc_logistic: f64::NAN,
            seconds: 1.0,
        };
        let text: String = [line(1), line(2)]
            .iter()
            .map(|l| serde_json::to_string(l).unwrap() + "\n")
            .collect();
        assert!(text.contains("null"), "{text}");
        std::fs::write(&path, text).unwrap();
        truncate_log(&path, 1).unwrap();
        let read = read_log(&path).unwrap();
        assert_eq!(read.len(), 1);
        assert!(read[0].srcc.is_nan() && read[0].plcc_logistic.is_nan());
        assert_eq!(read[0].plcc, 0.5);
        std::fs::remove_dir_all(&dir).ok();
    }
}
