//! Training configuration: one serde struct whose defaults are the paper's (and the authors'
//! code's), read from TOML or JSON and overridden by CLI flags. The configuration actually used
//! is written next to every run's outputs.

use std::path::{Path, PathBuf};

use agiqa_runtime::preprocess::{Alpha, ExifOrientation, Preprocessing, RandomResizedCrop};
use serde::{Deserialize, Serialize};

use crate::model::{parse_categories, ImageNorm, ModelConfig, Variant};
use crate::precision::{Precision, PrecisionError};
use crate::prompt::ContextInit;

/// Everything that defines a training run, except where its data and CLIP weights come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    /// Training epochs (paper: 100).
    pub epochs: usize,
    /// Images per step (paper: 32).
    pub batch_size: usize,
    /// Seeds data order, augmentation, dropout and the context initialisation.
    pub seed: u64,
    pub augmentation: AugmentationConfig,
    /// How decoded images become RGB (PIL's `convert("RGB")` by default).
    pub conversion: ConversionConfig,
    pub protocol: ProtocolConfig,
    /// Where frozen image features are cached (`None`: no cache, the encoder runs every epoch).
    pub feature_cache: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
    pub device: String,
    /// The frozen CLIP's precision; `None`: fp16 on CUDA (the reference's), fp32 on CPU. The
    /// context, head and optimiser are fp32 whatever this says.
    pub precision: Option<Precision>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelConfig::default(),
            optimizer: OptimizerConfig::default(),
            epochs: 100,
            batch_size: 32,
            seed: 0,
            augmentation: AugmentationConfig::default(),
            conversion: ConversionConfig::default(),
            protocol: ProtocolConfig::default(),
            feature_cache: Some(PathBuf::from(".cache/agiqa-features")),
            device: "auto".into(),
            precision: None,
        }
    }
}

/// Which update rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with momentum: the reference's.
    #[default]
    Sgd,
    /// AdamW: converges in far fewer steps on poorly conditioned features (e.g. a CLIP with
    /// random weights); not the paper's setting.
    #[serde(rename = "adamw")]
    #[value(name = "adamw")]
    AdamW,
}

/// SGD with momentum, cosine annealing and a constant warm-up, as the reference
/// (two optimisers with identical settings for the prompt learner and the head are one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Epochs at the constant warm-up learning rate before the cosine schedule takes over.
    pub warmup_epochs: usize,
    pub warmup_lr: f64,
    /// AdamW's moment decay rates.
    pub betas: (f64, f64),
    /// AdamW's denominator guard.
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            lr: 0.002,
            momentum: 0.9,
            weight_decay: 5e-4,
            warmup_epochs: 1,
            warmup_lr: 1e-5,
            betas: (0.9, 0.999),
            eps: 1e-8,
        }
    }
}

impl OptimizerConfig {
    /// Learning rate of `epoch` (0-based): constant during warm-up, then Dassl's cosine
    /// schedule `lr/2 · (1 + cos(π · epoch / epochs))`, which counts epochs from the start.
    pub fn lr_at(&self, epoch: usize, epochs: usize) -> f64 {
        if epoch < self.warmup_epochs {
            self.warmup_lr
        } else {
            0.5 * self.lr
                * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs.max(1) as f64).cos())
        }
    }
}

/// Train-time augmentation (test time is always resize + centre crop).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentationConfig {
    /// Random-resized-crop + horizontal flip, as the reference trains.
    pub enabled: bool,
    pub crop: RandomResizedCrop,
    /// Precomputed augmented views per image in the feature cache; one is sampled per epoch.
    pub views: usize,
}

impl Default for AugmentationConfig {
    fn default() -> Self {
        AugmentationConfig {
            enabled: true,
            crop: RandomResizedCrop::default(),
            views: 8,
        }
    }
}

/// How decoded images become 8-bit RGB before resizing. The default is PIL's
/// `Image.open(p).convert("RGB")`, what the reference feeds CLIP; the others are opt-ins that are
/// recorded in the checkpoint and the exported model, so serving converts the same way.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConversionConfig {
    pub alpha: Alpha,
    pub exif_orientation: ExifOrientation,
}

impl Default for ConversionConfig {
    fn default() -> Self {
        let pil = Preprocessing::default();
        ConversionConfig {
            alpha: pil.alpha,
            exif_orientation: pil.exif_orientation,
        }
    }
}

impl ConversionConfig {
    /// CLIP's preprocessing at `image_size` with this conversion.
    pub fn preprocessing(&self, image_size: u32) -> Preprocessing {
        Preprocessing {
            alpha: self.alpha,
            exif_orientation: self.exif_orientation,
            ..Preprocessing::clip(image_size)
        }
    }
}

/// `--alpha`: `drop` (PIL), `over-white` or `over-black`.
fn parse_alpha(text: &str) -> Result<Alpha, String> {
    match text {
        "drop" => Ok(Alpha::Drop),
        "over-white" => Ok(Alpha::OverWhite),
        "over-black" => Ok(Alpha::OverBlack),
        other => Err(format!("{other:?}: use drop, over-white or over-black")),
    }
}

/// `--exif-orientation`: `ignore` (PIL) or `apply`.
fn parse_exif(text: &str) -> Result<ExifOrientation, String> {
    match text {
        "ignore" => Ok(ExifOrientation::Ignore),
        "apply" => Ok(ExifOrientation::Apply),
        other => Err(format!("{other:?}: use ignore or apply")),
    }
}

/// How data is split and how the reported checkpoint is chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum ProtocolConfig {
    /// The paper's: the authors' 80/20 reference split, no validation set, the best epoch
    /// chosen on the test set. Leaks test information; for comparison with the paper only.
    Paper,
    /// The honest default: seeded train/val/test, checkpoint chosen on validation, repeated
    /// over `repeats` random splits and reported as mean ± std.
    Random {
        train: f64,
        val: f64,
        test: f64,
        repeats: usize,
        /// Keep all images of one prompt in the same part (datasets with prompts).
        grouped_by_prompt: bool,
    },
    /// The split column of a manifest.
    Manifest,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig::Random {
            train: 0.7,
            val: 0.1,
            test: 0.2,
            repeats: 1,
            grouped_by_prompt: false,
        }
    }
}

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config {path}: unknown extension (use .toml or .json)")]
    Extension { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Which protocol a run follows (the `--protocol` choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtocolChoice {
    /// The authors' reference split, best epoch on test (to compare with the paper).
    Paper,
    /// Seeded train/val/test, checkpoint selected on validation (honest default).
    Random,
    /// The split column of a manifest.
    Manifest,
}

/// Command-line overrides of a [`TrainConfig`] (flattened into `agiqa-train train`): every field
/// left unset keeps the file's (or the paper's default) value.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TrainOverrides {
    /// Training epochs (paper: 100).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per optimiser step (paper: 32).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate after warm-up (paper: 0.002).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Update rule.
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Seeds data order, augmentation, dropout and the context initialisation.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Learnable context tokens (M; paper: 16).
    #[arg(long)]
    pub context_len: Option<usize>,
    /// Initialise the context from a phrase (e.g. "a photo of a") instead of N(0, 0.02).
    #[arg(long)]
    pub context_init: Option<String>,
    /// Quality categories: adjectives6, adjectives8, scores6, or a comma-separated list.
    #[arg(long)]
    pub categories: Option<String>,
    /// Model variant: the paper's regression, the no-regression ablation, or CLIP-IQA zero-shot.
    #[arg(long, value_enum)]
    pub variant: Option<Variant>,
    /// Evaluation protocol.
    #[arg(long, value_enum)]
    pub protocol: Option<ProtocolChoice>,
    /// Whiten image features with training-set statistics before the head (for encoders whose
    /// quality signal hides in low-variance directions, such as a random tiny CLIP; not the
    /// paper's setting).
    #[arg(long)]
    pub whiten_features: bool,
    /// Random splits to repeat (mean ± std), random protocol only.
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Keep all images of one prompt in the same split part (random protocol only).
    #[arg(long)]
    pub grouped_by_prompt: bool,
    /// Turn off random-resized-crop + flip augmentation.
    #[arg(long)]
    pub no_augment: bool,
    /// Augmented views per image precomputed in the feature cache.
    #[arg(long)]
    pub views: Option<usize>,
    /// Feature cache folder.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Run the image encoder every epoch instead of caching features.
    #[arg(long)]
    pub no_cache: bool,
    /// Transparency: drop (PIL's convert("RGB"), the default), over-white or over-black
    /// (opt-ins, recorded in the checkpoint and the exported model).
    #[arg(long, value_parser = parse_alpha)]
    pub alpha: Option<Alpha>,
    /// EXIF orientation: ignore (as PIL's convert("RGB"), the default) or apply (opt-in,
    /// recorded in the checkpoint and the exported model).
    #[arg(long, value_parser = parse_exif)]
    pub exif_orientation: Option<ExifOrientation>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// Precision of the frozen CLIP (default: fp16 on CUDA, as the reference; fp32 on CPU).
    /// The learned context, the head and the optimiser stay fp32.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
}

impl TrainConfig {
    /// The configuration of a run: `file` (TOML or JSON) or the paper's defaults, with
    /// `overrides` applied, validated.
    pub fn resolve(file: Option<&Path>, overrides: &TrainOverrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => TrainConfig::from_file(path)?,
            None => TrainConfig::default(),
        };
        config.apply(overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: &TrainOverrides) -> Result<(), ConfigError> {
        let c = self;
        if let Some(v) = o.epochs {
            c.epochs = v;
        }
        if let Some(v) = o.batch_size {
            c.batch_size = v;
        }
        if let Some(v) = o.lr {
            c.optimizer.lr = v;
        }
        if let Some(v) = o.optimizer {
            c.optimizer.kind = v;
        }
        if let Some(v) = o.seed {
            c.seed = v;
        }
        if let Some(v) = o.context_len {
            c.model.context_len = v;
        }
        if let Some(v) = &o.context_init {
            c.model.context_init = ContextInit::Phrase(v.clone());
        }
        if let Some(v) = &o.categories {
            c.model.categories =
                parse_categories(v).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if let Some(v) = o.variant {
            c.model.variant = v;
        }
        if o.whiten_features {
            c.model.image_norm = ImageNorm::Whiten;
        }
        match o.protocol {
            Some(ProtocolChoice::Paper) => c.protocol = ProtocolConfig::Paper,
            Some(ProtocolChoice::Manifest) => c.protocol = ProtocolConfig::Manifest,
            Some(ProtocolChoice::Random)
                if !matches!(c.protocol, ProtocolConfig::Random { .. }) =>
            {
                c.protocol = ProtocolConfig::default()
            }
            _ => {}
        }
        if let ProtocolConfig::Random {
            repeats,
            grouped_by_prompt,
            ..
        } = &mut c.protocol
        {
            if let Some(v) = o.repeats {
                *repeats = v;
            }
            *grouped_by_prompt |= o.grouped_by_prompt;
        } else if o.repeats.is_some() || o.grouped_by_prompt {
            return Err(ConfigError::Invalid(
                "--repeats and --grouped-by-prompt apply to --protocol random only".into(),
            ));
        }
        if o.no_augment {
            c.augmentation.enabled = false;
        }
        if let Some(v) = o.views {
            c.augmentation.views = v;
        }
        if let Some(v) = &o.cache_dir {
            c.feature_cache = Some(v.clone());
        }
        if o.no_cache {
            c.feature_cache = None;
        }
        if let Some(v) = o.alpha {
            c.conversion.alpha = v;
        }
        if let Some(v) = o.exif_orientation {
            c.conversion.exif_orientation = v;
        }
        if let Some(v) = &o.device {
            c.device = v.clone();
        }
        if let Some(v) = o.precision {
            c.precision = Some(v);
        }
        Ok(())
    }

    /// Reads a `.toml` or `.json` file; missing fields take the paper's defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_err = |reason: String| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        };
        let config: TrainConfig = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&raw).map_err(|e| parse_err(e.to_string()))?,
            Some("json") => serde_json::from_str(&raw).map_err(|e| parse_err(e.to_string()))?,
            _ => {
                return Err(ConfigError::Extension {
                    path: path.to_path_buf(),
                })
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would otherwise fail deep inside training.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.epochs == 0 {
            return invalid("epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return invalid("batch_size must be at least 1".into());
        }
        if !(self.optimizer.lr > 0.0 && self.optimizer.lr.is_finite()) {
            return invalid(format!(
                "optimizer.lr must be positive, got {}",
                self.optimizer.lr
            ));
        }
        if self.augmentation.enabled && self.augmentation.views == 0 {
            return invalid("augmentation.views must be at least 1".into());
        }
        if let ProtocolConfig::Random {
            train,
            val,
            test,
            repeats,
            ..
        } = &self.protocol
        {
            let sum = train + val + test;
            if (sum - 1.0).abs() > 1e-6 || *train <= 0.0 || *test <= 0.0 || *val < 0.0 {
                return invalid(format!(
                    "split fractions must be positive and sum to 1, got {train}/{val}/{test}"
                ));
            }
            if *repeats == 0 {
                return invalid("protocol.repeats must be at least 1".into());
            }
        }
        if self.model.categories.is_empty() {
            return invalid("model.categories is empty".into());
        }
        Ok(())
    }

    /// The precision CLIP runs in on `device`: the configured one or the device's default,
    /// checked against what libtorch can run there.
    pub fn precision_on(&self, device: tch::Device) -> Result<Precision, PrecisionError> {
        Precision::resolve(self.precision, device)
    }

    /// Whether a run with `self` can continue one started with `other`: everything equal but
    /// where it runs (device, precision), which resuming checks on the resolved values.
    pub fn same_training(&self, other: &TrainConfig) -> bool {
        let mut other = other.clone();
        other.device = self.device.clone();
        other.precision = self.precision;
        *self == other
    }

    /// The configuration as TOML, for `config.toml` beside a run's outputs.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers() {
        let c = TrainConfig::default();
        assert_eq!((c.epochs, c.batch_size), (100, 32));
        assert_eq!(c.optimizer.lr, 0.002);
        assert_eq!(c.model.context_len, 16);
        assert_eq!(c.optimizer.lr_at(0, 100), 1e-5);
        assert!(
            (c.optimizer.lr_at(1, 100)
                - 0.002 * 0.5 * (1.0 + (std::f64::consts::PI / 100.0).cos()))
            .abs()
                < 1e-15
        );
        assert!(c.optimizer.lr_at(99, 100) < 1e-5);
    }

    #[test]
    fn overrides_apply_and_conflicts_are_errors() {
        let overrides = TrainOverrides {
            epochs: Some(3),
            optimizer: Some(OptimizerKind::AdamW),
            variant: Some(Variant::Classification),
            protocol: Some(ProtocolChoice::Random),
            repeats: Some(4),
            no_cache: true,
            ..TrainOverrides::default()
        };
        let c = TrainConfig::resolve(None, &overrides).unwrap();
        assert_eq!((c.epochs, c.optimizer.kind), (3, OptimizerKind::AdamW));
        assert_eq!(c.model.variant, Variant::Classification);
        assert!(matches!(
            c.protocol,
            ProtocolConfig::Random { repeats: 4, .. }
        ));
        assert_eq!(c.feature_cache, None);
        assert_eq!(c.conversion, ConversionConfig::default());
        assert_eq!(c.conversion.preprocessing(224), Preprocessing::clip(224));
        let opt_in = TrainOverrides {
            alpha: Some(parse_alpha("over-black").unwrap()),
            exif_orientation: Some(parse_exif("apply").unwrap()),
            ..TrainOverrides::default()
        };
        let c = TrainConfig::resolve(None, &opt_in).unwrap();
        let p = c.conversion.preprocessing(224);
        assert_eq!(
            (p.alpha, p.exif_orientation),
            (Alpha::OverBlack, ExifOrientation::Apply)
        );
        assert!(parse_alpha("white").is_err());
        let paper_with_repeats = TrainOverrides {
            protocol: Some(ProtocolChoice::Paper),
            repeats: Some(2),
            ..TrainOverrides::default()
        };
        let err = TrainConfig::resolve(None, &paper_with_repeats).unwrap_err();
        assert!(err.to_string().contains("--protocol random only"), "{err}");
        let zero = TrainOverrides {
            batch_size: Some(0),
            ..TrainOverrides::default()
        };
        assert!(TrainConfig::resolve(None, &zero).is_err());
    }

    #[test]
    fn toml_round_trip_and_partial_files() {
        let c = TrainConfig::default();
        let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let partial: TrainConfig = toml::from_str("epochs = 5\n[optimizer]\nlr = 0.01\n").unwrap();
        assert_eq!(
            (partial.epochs, partial.optimizer.lr, partial.batch_size),
            (5, 0.01, 32)
        );
        assert!(
            toml::from_str::<TrainConfig>("epochz = 5").is_err(),
            "typos must be errors"
        );
        let bf16: TrainConfig = toml::from_str("precision = \"bf16\"\n").unwrap();
        assert_eq!(bf16.precision, Some(Precision::Bf16));
        assert_eq!(
            toml::from_str::<TrainConfig>(&bf16.to_toml()).unwrap(),
            bf16
        );
        assert!(toml::from_str::<TrainConfig>("precision = \"fp8\"").is_err());
        // Older config files have no precision: the device's default.
        assert_eq!(partial.precision, None);
        assert_eq!(c.precision_on(tch::Device::Cpu).unwrap(), Precision::Fp32);
        let moved = TrainConfig {
            device: "cuda".into(),
            precision: Some(Precision::Fp16),
            ..c.clone()
        };
        assert!(moved.same_training(&c) && moved != c);
        let longer = TrainConfig {
            epochs: 7,
            ..c.clone()
        };
        assert!(!longer.same_training(&c));
    }
}
