//! CLIP-AGIQA: frozen CLIP, a learned unified prompt context and a regression head, plus the
//! paper's "without regression" ablation and the CLIP-IQA zero-shot baseline.

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Reduction, Tensor};

use crate::clip::Clip;
use crate::head::{QualityHead, DEFAULT_DROPOUT, DEFAULT_HIDDEN};
use crate::prompt::{ContextInit, PromptError, PromptLearner, DEFAULT_CONTEXT_LEN};
use crate::tokenizer::{ClipTokenizer, TokenizerError};

/// CLIP-IQA's antonym pair, in this order: p(good) is the softmax's first entry.
pub const ZERO_SHOT_PROMPTS: [&str; 2] = ["Good photo.", "Bad photo."];

/// Names accepted by [`category_preset`].
pub const CATEGORY_PRESETS: [&str; 3] = ["adjectives6", "adjectives8", "scores6"];

/// Which model is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// The paper's full model: `[image; text_1 … text_K]` → MLP → MOS, trained with MSE.
    #[default]
    Regression,
    /// Ablation 1 ("without regression"): `softmax(logit_scale · cos(image, text_k))` over the
    /// K categories, trained with cross-entropy on the MOS binned into K equal-width bins of
    /// `[score_min, score_max]`; the score is the expected bin centre `Σ_k p_k · centre_k`.
    /// Only the context is learned.
    Classification,
    /// CLIP-IQA: fixed prompts "Good photo." / "Bad photo.", `softmax(logit_scale · cos)`,
    /// `score = score_min + p(good)·(score_max − score_min)`. Nothing is learned; the
    /// configured categories and context are ignored.
    ZeroShot,
}

/// The model's hyper-parameters; [`Default`] is the paper's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    pub variant: Variant,
    /// Quality category words, ordered from worst to best (the order matters only to
    /// [`Variant::Classification`], whose bin `k` is category `k`).
    pub categories: Vec<String>,
    /// M, learnable context tokens shared by all categories (a phrase init overrides it).
    pub context_len: usize,
    pub context_init: ContextInit,
    /// Hidden width of the regression head.
    pub hidden: i64,
    /// Dropout probability before each of the head's linear layers.
    pub dropout: f64,
    /// The MOS scale (AGIQA-3K: 0–5; AIGCIQA2023: 0–100). Used by the classification bins and
    /// the zero-shot mapping; the regression head predicts raw MOS and ignores it.
    pub score_min: f64,
    pub score_max: f64,
    /// How image features enter the regression head (see [`ImageNorm`]).
    pub image_norm: ImageNorm,
}

/// Optional fixed affine map of the (L2-normalised) image features before the regression head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageNorm {
    /// The reference: features enter the head as they are.
    #[default]
    None,
    /// ZCA whitening with the training images' mean and covariance (`x ↦ (x − μ)·W`,
    /// `W = (Σ + εI)^(−1/2)`), fixed before training and saved with the model
    /// (`head.image_mean`, `head.image_whitening`; an exporter folds it into the head's first
    /// layer). For encoders whose quality signal lies in low-variance feature directions (a
    /// small CLIP with random weights), gradient descent otherwise needs far too many steps.
    Whiten,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            variant: Variant::Regression,
            categories: category_preset("adjectives6").unwrap_or_default(),
            context_len: DEFAULT_CONTEXT_LEN,
            context_init: ContextInit::default(),
            hidden: DEFAULT_HIDDEN,
            dropout: DEFAULT_DROPOUT,
            score_min: 0.,
            score_max: 5.,
            image_norm: ImageNorm::None,
        }
    }
}

impl ModelConfig {
    /// Checks what the user can get wrong before anything is built.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.score_min.is_finite() && self.score_max.is_finite())
            || self.score_max <= self.score_min
        {
            return Err(ModelError::InvalidConfig(format!(
                "score range [{}, {}] must be finite with min < max (AGIQA-3K uses 0–5)",
                self.score_min, self.score_max
            )));
        }
        match self.variant {
            Variant::ZeroShot => return Ok(()),
            Variant::Classification if self.categories.len() < 2 => {
                return Err(ModelError::TooFewCategories(self.categories.len()))
            }
            _ => {}
        }
        if self.categories.is_empty() {
            return Err(PromptError::NoCategories.into());
        }
        if let Some(index) = self.categories.iter().position(|c| c.trim().is_empty()) {
            return Err(PromptError::EmptyCategory { index }.into());
        }
        if self.variant == Variant::Regression {
            if self.hidden <= 0 {
                return Err(ModelError::InvalidConfig(format!(
                    "head hidden width must be positive, got {} (the paper uses 512)",
                    self.hidden
                )));
            }
            if !(0. ..1.).contains(&self.dropout) {
                return Err(ModelError::InvalidConfig(format!(
                    "dropout must be in [0, 1), got {} (the paper uses 0.5)",
                    self.dropout
                )));
            }
        }
        Ok(())
    }

    /// The K equal-width bin centres of the score range, in MOS units.
    pub fn bin_centres(&self) -> Vec<f64> {
        let k = self.categories.len();
        let width = (self.score_max - self.score_min) / k as f64;
        (0..k)
            .map(|i| self.score_min + (i as f64 + 0.5) * width)
            .collect()
    }
}

/// The quality categories of a named preset, worst first:
/// - `adjectives6`: the paper's terrible, bad, poor, average, good, perfect;
/// - `adjectives8`: the paper's six with "mediocre" (between poor and average) and
///   "excellent" (between good and perfect) added — the paper does not list its eight words;
/// - `scores6`: the paper's "6 scores", the digits "1" … "6".
pub fn category_preset(name: &str) -> Option<Vec<String>> {
    let words: &[&str] = match name {
        "adjectives6" => &["terrible", "bad", "poor", "average", "good", "perfect"],
        "adjectives8" => &[
            "terrible",
            "bad",
            "poor",
            "mediocre",
            "average",
            "good",
            "excellent",
            "perfect",
        ],
        "scores6" => &["1", "2", "3", "4", "5", "6"],
        _ => return None,
    };
    Some(words.iter().map(|w| w.to_string()).collect())
}

/// A preset name (see [`category_preset`]) or a comma-separated list such as
/// `"bad,average,good"` (words trimmed; a single word with no comma must be a preset).
pub fn parse_categories(spec: &str) -> Result<Vec<String>, ModelError> {
    let spec = spec.trim();
    if let Some(preset) = category_preset(spec) {
        return Ok(preset);
    }
    if !spec.contains(',') {
        return Err(ModelError::UnknownPreset {
            name: spec.to_string(),
            known: CATEGORY_PRESETS.join(", "),
        });
    }
    let words: Vec<String> = spec.split(',').map(|w| w.trim().to_string()).collect();
    if let Some(index) = words.iter().position(|w| w.is_empty()) {
        return Err(PromptError::EmptyCategory { index }.into());
    }
    Ok(words)
}

/// Why a model could not be built or trained.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("unknown category preset {name:?}; use one of {known} or a comma-separated list")]
    UnknownPreset { name: String, known: String },
    #[error("the classification variant needs at least 2 categories to bin the MOS, got {0}")]
    TooFewCategories(usize),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("the zero-shot variant has nothing to train; evaluate it directly instead")]
    NothingToTrain,
}

/// Frozen CLIP plus the variant's learned parts.
pub struct AgiqaModel {
    clip: Clip,
    config: ModelConfig,
    /// The learned parameters only: `prompt.ctx`, `head.fc{1,2}.{weight,bias}`.
    vars: nn::VarStore,
    prompt: Option<PromptLearner>,
    head: Option<QualityHead>,
    /// Zero-shot: the L2-normalised features of [`ZERO_SHOT_PROMPTS`], `[2, E]`.
    fixed_text: Option<Tensor>,
    /// `[K]` f32 bin centres (classification); `[2]` (score_max, score_min) for zero-shot.
    centres: Tensor,
    /// `(mean [E], whitening [E, E])` of [`ImageNorm::Whiten`] (views of the store's variables).
    image_norm: Option<(Tensor, Tensor)>,
}

impl std::fmt::Debug for AgiqaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgiqaModel")
            .field("clip", &self.clip)
            .field("config", &self.config)
            .finish()
    }
}

impl AgiqaModel {
    /// Builds the variant's trainable variables on `clip`'s device (fp32). They are drawn on the
    /// CPU and then moved, so a seed gives the same initial context and head on every device.
    pub fn new(
        clip: Clip,
        tokenizer: &ClipTokenizer,
        config: &ModelConfig,
    ) -> Result<AgiqaModel, ModelError> {
        config.validate()?;
        let device = clip.device();
        let mut vars = nn::VarStore::new(tch::Device::Cpu);
        let root = vars.root();
        let (mut prompt, mut head, mut fixed_text, mut image_norm) = (None, None, None, None);
        let centres = match config.variant {
            Variant::Regression | Variant::Classification => {
                let learner = PromptLearner::new(
                    &(&root / "prompt"),
                    &clip,
                    tokenizer,
                    &config.categories,
                    config.context_len,
                    &config.context_init,
                )?;
                if config.variant == Variant::Regression {
                    let k = config.categories.len() as i64;
                    let embed = clip.config().embed_dim;
                    if config.image_norm == ImageNorm::Whiten {
                        let head_path = &root / "head";
                        let whitening =
                            head_path.zeros_no_train("image_whitening", &[embed, embed]);
                        tch::no_grad(|| {
                            whitening
                                .shallow_clone()
                                .copy_(&Tensor::eye(embed, (Kind::Float, tch::Device::Cpu)))
                        });
                        image_norm =
                            Some((head_path.zeros_no_train("image_mean", &[embed]), whitening));
                    }
                    let in_dim = (k + 1) * embed;
                    head = Some(QualityHead::new(
                        &(&root / "head"),
                        in_dim,
                        config.hidden,
                        config.dropout,
                    ));
                }
                prompt = Some(learner);
                config.bin_centres()
            }
            Variant::ZeroShot => {
                let ids = tokenizer.encode_batch(&ZERO_SHOT_PROMPTS)?;
                let ids = Tensor::from_slice(&ids).view([2, -1]);
                let ids = ids.narrow(1, 0, clip.config().text.context_length.min(ids.size()[1]));
                fixed_text = Some(tch::no_grad(|| {
                    l2_normalise(&clip.encode_text(&ids).to_kind(Kind::Float))
                }));
                vec![config.score_max, config.score_min]
            }
        };
        // The prompt learner's and head's tensors hold shallow copies of these variables:
        // moving the store moves them too (as `Clip::random` does).
        vars.set_device(device);
        let centres = Tensor::from_slice(&centres)
            .to_kind(Kind::Float)
            .to_device(device);
        Ok(AgiqaModel {
            clip,
            config: config.clone(),
            vars,
            prompt,
            head,
            fixed_text,
            centres,
            image_norm,
        })
    }

    /// Applies [`ImageNorm`] to `[N, E]` features (identity for `None`).
    fn normalise_image(&self, image: Tensor) -> Tensor {
        match &self.image_norm {
            Some((mean, whitening)) => (image - mean).matmul(whitening),
            None => image,
        }
    }

    /// Fixes the [`ImageNorm::Whiten`] statistics from training features `[N, E]`
    /// (L2-normalised). A no-op for the other settings.
    pub fn fit_image_norm(&mut self, train_features: &Tensor) {
        if let Some((mean, whitening)) = &self.image_norm {
            let x = train_features
                .to_device(self.clip.device())
                .to_kind(Kind::Double);
            let mu = x.mean_dim([0i64].as_slice(), true, Kind::Double);
            let centred = &x - &mu;
            let n = (x.size()[0] - 1).max(1) as f64;
            let covariance = centred.transpose(0, 1).matmul(&centred) / n;
            let (eigenvalues, eigenvectors) = covariance.linalg_eigh("L");
            // ε: a thousandth of the mean variance, so directions that never vary are not
            // amplified without bound (the same role as a ridge penalty).
            let eps = f64::try_from(eigenvalues.mean(Kind::Double))
                .unwrap_or(1.0)
                .max(1e-12)
                * 1e-3;
            let inv_sqrt = (eigenvalues.clamp_min(0.0) + eps).rsqrt();
            let w = eigenvectors
                .matmul(&inv_sqrt.diag(0))
                .matmul(&eigenvectors.transpose(0, 1));
            tch::no_grad(|| {
                mean.shallow_clone()
                    .copy_(&mu.squeeze_dim(0).to_kind(Kind::Float));
                whitening.shallow_clone().copy_(&w.to_kind(Kind::Float));
            });
        }
    }

    /// The learned parameters, and only them: CLIP stays frozen in its own store. Empty for
    /// [`Variant::ZeroShot`]; only `prompt.ctx` for [`Variant::Classification`].
    pub fn trainable(&self) -> &nn::VarStore {
        &self.vars
    }

    /// For loading checkpoints into the learned parameters.
    pub fn trainable_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vars
    }

    /// Whether the variant has anything to train (false for zero-shot).
    pub fn is_trainable(&self) -> bool {
        self.config.variant != Variant::ZeroShot
    }

    pub fn clip(&self) -> &Clip {
        &self.clip
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The prompt learner (absent for zero-shot).
    pub fn prompt(&self) -> Option<&PromptLearner> {
        self.prompt.as_ref()
    }

    /// The fixed [`ImageNorm::Whiten`] map `(mean [E], whitening [E, E])`, if any (exporters fold
    /// it into the head's first layer).
    pub fn image_norm(&self) -> Option<(&Tensor, &Tensor)> {
        self.image_norm.as_ref().map(|(mean, w)| (mean, w))
    }

    /// The regression head (regression variant only).
    pub fn head(&self) -> Option<&QualityHead> {
        self.head.as_ref()
    }

    /// `[N, 3, R, R]` normalised pixels → `[N, E]` L2-normalised frozen CLIP features, no grad.
    pub fn image_features(&self, pixels: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let pixels = pixels.to_device(self.clip.device()).to_kind(Kind::Float);
            l2_normalise(&self.clip.encode_image(&pixels))
        })
    }

    /// `[K, E]` L2-normalised prompt features (gradients reach the context); `[2, E]` fixed
    /// good/bad features for zero-shot. Independent of the images: compute once per step.
    pub fn text_features(&self) -> Tensor {
        match (&self.prompt, &self.fixed_text) {
            (Some(prompt), _) => l2_normalise(&prompt.forward(&self.clip)),
            (None, Some(fixed)) => fixed.shallow_clone(),
            (None, None) => unreachable!("every variant has prompts or fixed text"),
        }
    }

    /// `[N, E]` L2-normalised image features and `[K, E]` text features (from
    /// [`AgiqaModel::text_features`]) → `logit_scale · cos`, `[N, K]`.
    pub fn logits(&self, image_features: &Tensor, text_features: &Tensor) -> Tensor {
        let image = image_features.to_device(self.clip.device());
        image.matmul(&text_features.tr()) * self.clip.logit_scale()
    }

    /// `[N]` scores in MOS units. `image_features` already L2-normalised `[N, E]`,
    /// `text_features` from [`AgiqaModel::text_features`]; `train` switches dropout on.
    pub fn scores(&self, image_features: &Tensor, text_features: &Tensor, train: bool) -> Tensor {
        let image = image_features
            .to_device(self.clip.device())
            .to_kind(Kind::Float);
        match (&self.head, self.config.variant) {
            (Some(head), _) => {
                // The reference's `[image; text_1 … text_K]`, flattened; the text part is the
                // same row for every image, broadcast rather than recomputed.
                let image = self.normalise_image(image);
                let n = image.size()[0];
                let text = text_features.reshape([1, -1]);
                let width = text.size()[1];
                let input = Tensor::cat(&[image, text.expand([n, width], false)], 1);
                head.forward_t(&input, train)
            }
            (None, Variant::ZeroShot) => {
                // centres = (max, min): p(good)·max + p(bad)·min = min + p(good)·(max − min).
                let p = self.logits(&image, text_features).softmax(-1, Kind::Float);
                p.matmul(&self.centres)
            }
            (None, _) => {
                let p = self.logits(&image, text_features).softmax(-1, Kind::Float);
                p.matmul(&self.centres)
            }
        }
    }

    /// `[N]` MOS → `[N]` i64 bin index in `0..K`: K equal-width bins of the score range,
    /// values outside it clamped to the end bins.
    pub fn bin_labels(&self, mos: &Tensor) -> Tensor {
        let k = self.config.categories.len() as f64;
        let span = self.config.score_max - self.config.score_min;
        ((mos.to_device(self.clip.device()).to_kind(Kind::Float) - self.config.score_min)
            * (k / span))
            .floor()
            .clamp(0., k - 1.)
            .to_kind(Kind::Int64)
    }

    /// Training loss for a batch: MSE on the raw MOS (regression, as the reference) or
    /// cross-entropy on the MOS bins (classification). Computes the text features once.
    /// `image_features` `[N, E]` L2-normalised, `mos` `[N]`.
    pub fn loss(
        &self,
        image_features: &Tensor,
        mos: &Tensor,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        let mos = mos.to_device(self.clip.device()).to_kind(Kind::Float);
        let text = self.text_features();
        match self.config.variant {
            Variant::Regression => Ok(self
                .scores(image_features, &text, train)
                .mse_loss(&mos, Reduction::Mean)),
            Variant::Classification => Ok(self
                .logits(image_features, &text)
                .cross_entropy_for_logits(&self.bin_labels(&mos))),
            Variant::ZeroShot => Err(ModelError::NothingToTrain),
        }
    }

    /// `[N, 3, R, R]` normalised pixels → `[N]` scores in MOS units; eval mode, no grad.
    pub fn predict(&self, pixels: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let image = self.image_features(pixels);
            self.scores(&image, &self.text_features(), false)
        })
    }
}

/// Row-wise `x / ‖x‖₂` as the reference does it (no epsilon).
fn l2_normalise(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::ClipConfig;
    use std::sync::OnceLock;
    use tch::nn::OptimizerConfig;
    use tch::Device;

    fn tokenizer() -> &'static ClipTokenizer {
        static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| ClipTokenizer::embedded().unwrap())
    }

    fn model(config: &ModelConfig, seed: i64) -> AgiqaModel {
        let clip = Clip::random(&ClipConfig::preset("tiny").unwrap(), seed, Device::Cpu);
        AgiqaModel::new(clip, tokenizer(), config).unwrap()
    }

    fn variant(variant: Variant) -> ModelConfig {
        ModelConfig {
            variant,
            ..ModelConfig::default()
        }
    }

    /// `[n]` deterministic uniform draws in `[0, 1)` (a private xorshift: libtorch's global
    /// generator is reseeded by every test building a CLIP, concurrently).
    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }

    /// `[n, E]` deterministic random unit vectors.
    fn random_features(n: i64, seed: u64) -> Tensor {
        let raw = Tensor::from_slice(&uniform(n as usize * 256, seed)).view([n, 256]) - 0.5;
        l2_normalise(&raw)
    }

    /// `[n]` deterministic MOS in `[0, 5)`.
    fn random_mos(n: i64, seed: u64) -> Tensor {
        Tensor::from_slice(&uniform(n as usize, seed ^ 0xABCD)) * 5.
    }

    fn var_names(model: &AgiqaModel) -> Vec<String> {
        let mut names: Vec<String> = model.trainable().variables().into_keys().collect();
        names.sort();
        names
    }

    #[test]
    fn default_config_is_the_papers() {
        let config = ModelConfig::default();
        assert_eq!(config.variant, Variant::Regression);
        assert_eq!(
            config.categories,
            ["terrible", "bad", "poor", "average", "good", "perfect"]
        );
        assert_eq!(config.context_len, 16);
        assert_eq!(config.context_init, ContextInit::Random { std: 0.02 });
        assert_eq!((config.hidden, config.dropout), (512, 0.5));
        assert_eq!((config.score_min, config.score_max), (0., 5.));
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"regression\""), "{json}");
        assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), config);
        let partial: ModelConfig = serde_json::from_str(
            r#"{"variant": "zero-shot", "context_init": {"phrase": "a photo of a"}}"#,
        )
        .unwrap();
        assert_eq!(partial.variant, Variant::ZeroShot);
        assert_eq!(
            partial.context_init,
            ContextInit::Phrase("a photo of a".into())
        );
        assert_eq!(partial.hidden, 512);
    }

    #[test]
    fn presets_and_category_lists() {
        assert_eq!(category_preset("adjectives8").unwrap().len(), 8);
        assert_eq!(category_preset("scores6").unwrap()[5], "6");
        assert!(category_preset("nope").is_none());
        assert_eq!(parse_categories(" bad, good ").unwrap(), ["bad", "good"]);
        assert_eq!(parse_categories("adjectives6").unwrap().len(), 6);
        let err = parse_categories("adjectives7").unwrap_err();
        assert!(err.to_string().contains("adjectives8"), "{err}");
        assert!(matches!(
            parse_categories("bad,,good"),
            Err(ModelError::Prompt(PromptError::EmptyCategory { index: 1 }))
        ));
    }

    #[test]
    fn invalid_configs_are_refused() {
        let clip = || Clip::random(&ClipConfig::preset("tiny").unwrap(), 0, Device::Cpu);
        let cases = [
            ModelConfig {
                categories: vec![],
                ..ModelConfig::default()
            },
            ModelConfig {
                dropout: 1.,
                ..ModelConfig::default()
            },
            ModelConfig {
                score_max: 0.,
                ..ModelConfig::default()
            },
            ModelConfig {
                categories: vec!["good".into()],
                ..variant(Variant::Classification)
            },
            ModelConfig {
                context_len: 80,
                ..ModelConfig::default()
            },
        ];
        let messages: Vec<String> = cases
            .iter()
            .map(|c| {
                AgiqaModel::new(clip(), tokenizer(), c)
                    .unwrap_err()
                    .to_string()
            })
            .collect();
        for (message, needle) in
            messages
                .iter()
                .zip(["categor", "dropout", "score range", "at least 2", "context"])
        {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
    }

    #[test]
    fn each_variant_trains_only_its_own_parameters() {
        let regression = model(&ModelConfig::default(), 0);
        assert_eq!(
            var_names(&regression),
            [
                "head.fc1.bias",
                "head.fc1.weight",
                "head.fc2.bias",
                "head.fc2.weight",
                "prompt.ctx"
            ]
        );
        assert_eq!(regression.head().unwrap().in_dim(), 7 * 256);
        assert_eq!(
            var_names(&model(&variant(Variant::Classification), 0)),
            ["prompt.ctx"]
        );
        let zero = model(&variant(Variant::ZeroShot), 0);
        assert!(var_names(&zero).is_empty());
        assert!(!zero.is_trainable());
        let features = random_features(4, 0);
        let mos = Tensor::from_slice(&[1f32, 2., 3., 4.]);
        assert!(matches!(
            zero.loss(&features, &mos, true),
            Err(ModelError::NothingToTrain)
        ));
    }

    #[test]
    fn gradients_reach_context_and_head_but_no_clip_weight() {
        let model = model(&ModelConfig::default(), 1);
        let features = random_features(8, 1);
        let mos = random_mos(8, 1);
        model.loss(&features, &mos, true).unwrap().backward();
        for (name, var) in model.trainable().variables() {
            let grad = var.grad();
            assert!(grad.defined(), "{name} has no gradient");
            assert!(
                grad.abs().sum(Kind::Float).double_value(&[]) > 0.,
                "{name} gradient is zero"
            );
        }
        for (name, weight) in model.clip().named_tensors() {
            assert!(
                !weight.grad().defined(),
                "CLIP's {name} received a gradient"
            );
        }
    }

    #[test]
    fn batch_scores_equal_per_image_scores_and_eval_is_deterministic() {
        for v in [
            Variant::Regression,
            Variant::Classification,
            Variant::ZeroShot,
        ] {
            let model = model(&variant(v), 2);
            let features = random_features(5, 2);
            let text = model.text_features();
            assert!(
                text.equal(&model.text_features()),
                "{v:?}: text features vary"
            );
            let batch = model.scores(&features, &text, false);
            assert_eq!(batch.size(), [5]);
            assert!(batch.equal(&model.scores(&features, &text, false)), "{v:?}");
            for i in 0..5 {
                let single = model.scores(&features.narrow(0, i, 1), &text, false);
                let (a, b) = (single.double_value(&[0]), batch.double_value(&[i]));
                assert!(
                    (a - b).abs() < 1e-5,
                    "{v:?} image {i}: {a} alone vs {b} in batch"
                );
            }
        }
        // Dropout 0.5 is live in training mode only.
        let model = model(&ModelConfig::default(), 2);
        let features = random_features(5, 3);
        let text = model.text_features();
        let a = model.scores(&features, &text, true);
        assert!(!a.equal(&model.scores(&features, &text, true)));
    }

    #[test]
    fn predict_runs_the_image_tower_in_eval_mode() {
        let model = model(&ModelConfig::default(), 3);
        let pixels = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
        let image = model.image_features(&pixels);
        assert_eq!(image.size(), [2, 256]);
        let norms = image.norm_scalaropt_dim(2, [-1i64].as_slice(), false);
        assert!(norms.allclose(
            &Tensor::ones([2], (Kind::Float, Device::Cpu)),
            1e-5,
            1e-5,
            false
        ));
        assert!(!image.requires_grad());
        let scores = model.predict(&pixels);
        assert_eq!(scores.size(), [2]);
        assert!(!scores.requires_grad());
        assert!(scores.equal(&model.predict(&pixels)));
        let expected = model.scores(&image, &model.text_features(), false);
        assert!(scores.allclose(&expected, 1e-5, 1e-5, false));
    }

    #[test]
    fn checkpoints_round_trip_through_the_trainable_store() {
        let mut model = model(&ModelConfig::default(), 4);
        let features = random_features(3, 4);
        let scores = |m: &AgiqaModel| m.scores(&features, &m.text_features(), false);
        let saved = scores(&model);
        let path = std::env::temp_dir().join(format!(
            "agiqa-model-test-{}.safetensors",
            std::process::id()
        ));
        model.trainable().save(&path).unwrap();
        tch::no_grad(|| {
            for (_, mut var) in model.trainable().variables() {
                let _ = var.zero_();
            }
        });
        assert!(!scores(&model).equal(&saved));
        let loaded = model.trainable_mut().load(&path);
        std::fs::remove_file(&path).ok();
        loaded.unwrap();
        assert!(scores(&model).equal(&saved));
    }

    #[test]
    fn regression_overfits_sixteen_images() {
        // Dropout off so that the fit can reach zero; the graph is the paper's otherwise.
        let config = ModelConfig {
            dropout: 0.,
            ..ModelConfig::default()
        };
        let model = model(&config, 5);
        let features = random_features(16, 5);
        let mos = random_mos(16, 5);
        let mut sgd = nn::Sgd {
            momentum: 0.9,
            ..Default::default()
        }
        .build(model.trainable(), 0.01)
        .unwrap();
        let initial = model.loss(&features, &mos, true).unwrap().double_value(&[]);
        let mut steps = 0;
        let mut last = initial;
        while last > 1e-3 && steps < 300 {
            let loss = model.loss(&features, &mos, true).unwrap();
            sgd.backward_step(&loss);
            last = loss.double_value(&[]);
            steps += 1;
        }
        assert!(
            last <= 1e-3,
            "MSE {initial} → {last} after {steps} SGD steps"
        );
    }

    #[test]
    fn classification_learns_the_bins() {
        let model = model(&variant(Variant::Classification), 6);
        let features = random_features(24, 6);
        let mos = random_mos(24, 6);
        let labels = model.bin_labels(&mos);
        let accuracy = || {
            let logits = model.logits(&features, &model.text_features());
            let hits = logits.argmax(-1, false).eq_tensor(&labels);
            hits.to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        };
        let mut adam = nn::Adam::default().build(model.trainable(), 0.01).unwrap();
        let before = accuracy();
        let initial = model.loss(&features, &mos, true).unwrap().double_value(&[]);
        for _ in 0..150 {
            adam.backward_step(&model.loss(&features, &mos, true).unwrap());
        }
        let after = accuracy();
        let last = model.loss(&features, &mos, true).unwrap().double_value(&[]);
        assert!(last < initial, "CE {initial} → {last}");
        assert!(after > before + 0.2, "accuracy {before} → {after}");
        // Scores are expected bin centres: inside the scale.
        let scores = model.scores(&features, &model.text_features(), false);
        assert!(scores.min().double_value(&[]) >= 0.25 && scores.max().double_value(&[]) <= 4.75);
    }

    #[test]
    fn bins_are_equal_width_and_clamped() {
        let model = model(&variant(Variant::Classification), 7);
        let mos = Tensor::from_slice(&[-1f32, 0., 0.83, 0.84, 2.5, 4.99, 5., 7.]);
        let labels: Vec<i64> = Vec::try_from(model.bin_labels(&mos)).unwrap();
        assert_eq!(labels, [0, 0, 0, 1, 3, 5, 5, 5]);
        let centres = model.config().bin_centres();
        assert!((centres[0] - 5. / 12.).abs() < 1e-12 && (centres[5] - 55. / 12.).abs() < 1e-12);
    }

    #[test]
    fn zero_shot_maps_p_good_onto_the_scale() {
        let config = ModelConfig {
            score_min: 10.,
            score_max: 90.,
            ..variant(Variant::ZeroShot)
        };
        let model = model(&config, 8);
        let text = model.text_features();
        assert_eq!(text.size(), [2, 256]);
        // Images sliding from "bad photo" to "good photo".
        let t = Tensor::linspace(0., 1., 11, (Kind::Float, Device::Cpu)).unsqueeze(1);
        let features = l2_normalise(&(&t * text.get(0) + (1. - &t) * text.get(1)));
        let scores = model.scores(&features, &text, false);
        let p_good = model
            .logits(&features, &text)
            .softmax(-1, Kind::Float)
            .select(1, 0);
        let expected = &p_good * 80. + 10.;
        assert!(scores.allclose(&expected, 1e-4, 1e-4, false));
        let values: Vec<f64> = Vec::try_from(scores.to_kind(Kind::Double)).unwrap();
        assert!(
            values.iter().all(|s| (10. ..=90.).contains(s)),
            "{values:?}"
        );
        assert!(
            values.windows(2).all(|w| w[1] > w[0]),
            "not monotone: {values:?}"
        );
    }
}
