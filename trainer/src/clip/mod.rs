//! OpenAI CLIP in tch, frozen: a ViT or ModifiedResNet image tower, a causal text tower and the
//! learned temperature, with parameters named exactly as in OpenAI's state dicts. fp32 by
//! default; [`Clip::set_precision`] casts it to fp16 or bf16 (norms stay fp32, as OpenAI's).

pub mod attention;
pub mod config;
pub mod norm;
pub mod resnet;
pub mod source;
pub mod text;
pub mod vision;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

pub use self::config::{Activation, ClipConfig, ResNetConfig, TextConfig, VisionConfig, VitConfig};
use self::resnet::ModifiedResNet;
pub use self::source::ClipSource;
use self::text::TextTransformer;
use self::vision::VisionTransformer;
use crate::precision::Precision;
use crate::weights::hf::HfClipConfig;
use crate::weights::{load_state_dict, Mismatch, StateDict, WeightsError};

/// The frozen CLIP model.
///
/// Its weights live in a private var store with `requires_grad = false`, so no optimizer can be
/// handed them; gradients still flow *through* it to inputs that require them (CoOp's context).
pub struct Clip {
    config: ClipConfig,
    vars: nn::VarStore,
    visual: VisionTower,
    text: TextTransformer,
    /// Stored as a log, as in OpenAI's checkpoints.
    logit_scale: Tensor,
    /// The kind of the weights (norms excepted) and of the towers' activations.
    precision: Precision,
    /// SHA-256 of the weights as loaded (fp32), kept across precision casts so that a
    /// checkpoint trained in fp16 still names the weights `eval` and the exporter load.
    fingerprint: OnceLock<String>,
}

enum VisionTower {
    Vit(Box<VisionTransformer>),
    ResNet(Box<ModifiedResNet>),
}

impl Clip {
    /// Loads a checkpoint in any supported format (see [`load_state_dict`]); the architecture is
    /// inferred from the shapes, with head counts etc. from a Hugging Face `config.json` if any.
    pub fn load(path: &Path, device: Device) -> Result<Clip, WeightsError> {
        let (sd, format) = load_state_dict(path)?;
        let mut config = ClipConfig::infer(&sd.shapes())?;
        if format.is_hugging_face() {
            if let Some(declared) = HfClipConfig::find(path)? {
                declared.apply(&mut config);
                config.validate()?;
            }
        }
        Self::from_state_dict_with_config(sd, &config, device)
    }

    /// Builds the architecture inferred from the state dict's shapes and loads it.
    pub fn from_state_dict(sd: StateDict, device: Device) -> Result<Clip, WeightsError> {
        let config = ClipConfig::infer(&sd.shapes())?;
        Self::from_state_dict_with_config(sd, &config, device)
    }

    /// Loads a state dict into a declared architecture. Every missing, unexpected or mis-shaped
    /// tensor is reported in one [`WeightsError::Mismatch`].
    pub fn from_state_dict_with_config(
        sd: StateDict,
        config: &ClipConfig,
        device: Device,
    ) -> Result<Clip, WeightsError> {
        let clip = Self::build(config, device)?;
        let variables = clip.vars.variables();
        let expected: BTreeMap<String, Vec<i64>> = variables
            .iter()
            .map(|(name, var)| (name.clone(), var.size()))
            .collect();
        if let Some(mismatch) = Mismatch::between(&expected, &sd.shapes()) {
            return Err(WeightsError::Mismatch(Box::new(mismatch)));
        }
        tch::no_grad(|| {
            for (name, mut var) in variables {
                // Present with this shape: checked just above.
                if let Some(source) = sd.get(&name) {
                    var.f_copy_(source).map_err(|source| WeightsError::Tensor {
                        context: format!("loading `{name}`"),
                        source: Box::new(source),
                    })?;
                }
            }
            Ok(())
        })?;
        Ok(clip)
    }

    /// A randomly initialised model (OpenAI's initialisation), reproducible for a given `seed`
    /// on any device: weights are drawn on the CPU, then moved.
    ///
    /// Reseeds libtorch's global generator.
    ///
    /// # Panics
    /// When `config` is invalid (see [`ClipConfig::validate`]).
    pub fn random(config: &ClipConfig, seed: i64, device: Device) -> Clip {
        tch::manual_seed(seed);
        let mut clip =
            Self::build(config, Device::Cpu).unwrap_or_else(|e| panic!("Clip::random: {e}"));
        clip.vars.set_device(device);
        clip
    }

    /// Creates the layers with their random initialisation, frozen.
    fn build(config: &ClipConfig, device: Device) -> Result<Clip, WeightsError> {
        config.validate()?;
        let mut vars = nn::VarStore::new(device);
        let (visual, text, logit_scale) = {
            let root = vars.root();
            let visual = &root / "visual";
            let visual = match &config.vision {
                VisionConfig::Vit(v) => VisionTower::Vit(Box::new(VisionTransformer::new(
                    visual,
                    v,
                    config.embed_dim,
                ))),
                VisionConfig::ResNet(r) => {
                    VisionTower::ResNet(Box::new(ModifiedResNet::new(visual, r, config.embed_dim)))
                }
            };
            let text = TextTransformer::new(&root, &config.text, config.embed_dim);
            // CLIP's initial temperature is 0.07.
            let logit_scale = root.var("logit_scale", &[], Init::Const((1. / 0.07f64).ln()));
            (visual, text, logit_scale)
        };
        vars.freeze();
        Ok(Clip {
            config: config.clone(),
            vars,
            visual,
            text,
            logit_scale,
            precision: Precision::Fp32,
            fingerprint: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.vars.device()
    }

    /// The precision the towers compute in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Casts the weights to `precision`'s kind, except normalisation layers and the
    /// temperature (see [`norm::stays_fp32`]): what OpenAI's `convert_weights` does for fp16.
    /// The fp32 fingerprint is computed first and kept. Casting back to fp32 does not restore
    /// the bits lost to a lower precision.
    pub fn set_precision(&mut self, precision: Precision) {
        if precision == self.precision {
            return;
        }
        self.fingerprint();
        self.cast_weights(precision);
    }

    fn cast_weights(&mut self, precision: Precision) {
        tch::no_grad(|| {
            for (name, mut var) in self.vars.variables() {
                if var.is_floating_point() && !norm::stays_fp32(&name) {
                    let cast = var.to_kind(precision.kind());
                    var.set_data(&cast);
                }
            }
        });
        self.precision = precision;
    }

    /// SHA-256 over the tensors (names, shapes and fp32 bytes, in name order): the identity of
    /// the frozen weights, whatever file format they came from. Computed once, before any
    /// precision cast.
    pub fn fingerprint(&self) -> String {
        self.fingerprint
            .get_or_init(|| {
                let mut hasher = Sha256::new();
                for (name, tensor) in self.named_tensors() {
                    hasher.update(name.as_bytes());
                    hasher.update(format!("{:?}", tensor.size()).as_bytes());
                    let t = tensor
                        .to_kind(Kind::Float)
                        .to_device(Device::Cpu)
                        .contiguous()
                        .flatten(0, -1);
                    let values: Vec<f32> = Vec::try_from(&t).unwrap_or_default();
                    for chunk in values.chunks(1 << 16) {
                        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
                        hasher.update(&bytes);
                    }
                }
                hasher
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            })
            .clone()
    }

    /// `[N, 3, R, R]` normalised pixels (any float kind) → `[N, E]` fp32 image features, not
    /// L2-normalised. The pixels are cast to CLIP's precision at the boundary.
    ///
    /// # Panics
    /// When `R` differs from [`ClipConfig::image_resolution`].
    pub fn encode_image(&self, pixels: &Tensor) -> Tensor {
        let pixels = pixels
            .to_device(self.device())
            .to_kind(self.precision.kind());
        let features = match &self.visual {
            VisionTower::Vit(vit) => vit.forward(&pixels),
            VisionTower::ResNet(resnet) => resnet.forward(&pixels),
        };
        features.to_kind(Kind::Float)
    }

    /// `[N, L]` i64 token ids (L ≤ context length, EOT the row's highest id) → `[N, E]` fp32
    /// text features, not L2-normalised.
    pub fn encode_text(&self, token_ids: &Tensor) -> Tensor {
        self.text
            .forward(&token_ids.to_device(self.device()))
            .to_kind(Kind::Float)
    }

    /// `[N, L]` token ids → `[N, L, W]` token embeddings (no positional embedding yet), in
    /// CLIP's precision.
    pub fn embed_tokens(&self, token_ids: &Tensor) -> Tensor {
        self.text.embed_tokens(&token_ids.to_device(self.device()))
    }

    /// `[N, L, W]` embedded prompts (as from [`Clip::embed_tokens`], possibly with learned
    /// context spliced in) and `[N]` EOT positions → `[N, E]` fp32 text features. An fp32
    /// prompt (the learned context) is cast to CLIP's precision here, so gradients flow back
    /// through the cast into the fp32 context.
    pub fn encode_text_embedded(&self, embedded: &Tensor, eot_positions: &Tensor) -> Tensor {
        let embedded = embedded
            .to_device(self.device())
            .to_kind(self.precision.kind());
        self.text
            .forward_embedded(&embedded, eot_positions)
            .to_kind(Kind::Float)
    }

    /// The softmax temperature's inverse, `exp(logit_scale)` (≈ 100 for trained models).
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale.exp().double_value(&[])
    }

    /// Every weight and buffer under its OpenAI name, sorted, on the model's device.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.vars.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// The weights as an fp32 CPU state dict (what [`Clip::from_state_dict`] takes back).
    pub fn state_dict(&self) -> StateDict {
        self.named_tensors().into_iter().collect()
    }

    /// An independent copy on the same device, in the same precision, with the same
    /// fingerprint (each trained model owns its frozen CLIP).
    pub fn clone_frozen(&self) -> Clip {
        let mut copy = Self::build(&self.config, self.device())
            .unwrap_or_else(|e| unreachable!("a built config stays valid: {e}"));
        if let Some(fingerprint) = self.fingerprint.get() {
            let _ = copy.fingerprint.set(fingerprint.clone());
        }
        // Cast before copying, so the copy receives the source's (already rounded) values.
        copy.cast_weights(self.precision);
        let source = self.vars.variables();
        tch::no_grad(|| {
            for (name, mut var) in copy.vars.variables() {
                if let Some(src) = source.get(&name) {
                    var.copy_(src);
                }
            }
        });
        copy
    }

    /// Number of learnable parameters in the released model (BatchNorm statistics excluded).
    pub fn parameter_count(&self) -> i64 {
        self.vars
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }
}

impl fmt::Debug for Clip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clip")
            .field("name", &self.config.name())
            .field("device", &self.device())
            .field("parameters", &self.parameter_count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    pub(crate) fn tiny_vit() -> ClipConfig {
        ClipConfig {
            embed_dim: 16,
            vision: VisionConfig::Vit(VitConfig {
                image_resolution: 32,
                patch_size: 8,
                width: 32,
                layers: 2,
                heads: 2,
                activation: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            }),
            text: TextConfig {
                context_length: 12,
                vocab_size: 50,
                width: 32,
                layers: 2,
                heads: 2,
                activation: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
        }
    }

    fn tiny_resnet() -> ClipConfig {
        let mut config = tiny_vit();
        config.vision = VisionConfig::ResNet(ResNetConfig {
            image_resolution: 64,
            layers: [1, 2, 1, 1],
            width: 8,
            heads: 4,
        });
        config
    }

    fn ids() -> Tensor {
        // EOT (the highest id, 49) at positions 3 and 6.
        let rows: [[i64; 12]; 2] = [
            [1, 5, 7, 49, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 2, 3, 4, 5, 6, 49, 0, 0, 0, 0, 0],
        ];
        Tensor::from_slice2(&rows)
    }

    #[test]
    fn towers_produce_embeddings_of_the_joint_width() {
        for config in [tiny_vit(), tiny_resnet()] {
            let clip = Clip::random(&config, 0, Device::Cpu);
            let r = config.image_resolution();
            let pixels = Tensor::randn([3, 3, r, r], (Kind::Float, Device::Cpu));
            assert_eq!(clip.encode_image(&pixels).size(), [3, 16]);
            assert_eq!(clip.encode_text(&ids()).size(), [2, 16]);
            assert!((clip.logit_scale() - 1. / 0.07).abs() < 1e-4);
        }
    }

    #[test]
    fn same_seed_same_model() {
        let a = Clip::random(&tiny_vit(), 7, Device::Cpu).named_tensors();
        let b = Clip::random(&tiny_vit(), 7, Device::Cpu).named_tensors();
        let c = Clip::random(&tiny_vit(), 8, Device::Cpu).named_tensors();
        assert!(a.iter().zip(&b).all(|((_, x), (_, y))| x.equal(y)));
        assert!(a.iter().zip(&c).any(|((_, x), (_, y))| !x.equal(y)));
    }

    #[test]
    fn embedded_entry_point_matches_token_entry_point() {
        let clip = Clip::random(&tiny_vit(), 1, Device::Cpu);
        let ids = ids();
        let direct = clip.encode_text(&ids);
        let eot = Tensor::from_slice(&[3i64, 6]);
        let spliced = clip.encode_text_embedded(&clip.embed_tokens(&ids), &eot);
        assert!(direct.allclose(&spliced, 1e-6, 1e-6, false));
    }

    #[test]
    fn weights_are_frozen_but_gradients_reach_the_prompt() {
        let clip = Clip::random(&tiny_vit(), 2, Device::Cpu);
        assert!(clip.named_tensors().iter().all(|(_, t)| !t.requires_grad()));
        let embedded = clip.embed_tokens(&ids()).detach().set_requires_grad(true);
        let features = clip.encode_text_embedded(&embedded, &Tensor::from_slice(&[3i64, 6]));
        features.sum(Kind::Float).backward();
        assert!(embedded.grad().abs().sum(Kind::Float).double_value(&[]) > 0.);
    }

    #[test]
    fn lower_precisions_cast_all_but_norms_and_keep_the_fingerprint() {
        let cosine = |a: &Tensor, b: &Tensor| {
            let n = |t: &Tensor| t / t.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
            (n(a) * n(b))
                .sum_dim_intlist(-1, false, Kind::Float)
                .min()
                .double_value(&[])
        };
        for config in [tiny_vit(), tiny_resnet()] {
            let fp32 = Clip::random(&config, 4, Device::Cpu);
            let r = config.image_resolution();
            let pixels = Tensor::randn([2, 3, r, r], (Kind::Float, Device::Cpu));
            let eot = Tensor::from_slice(&[3i64, 6]);
            for (precision, min_cosine) in [(Precision::Fp16, 0.999), (Precision::Bf16, 0.99)] {
                let mut clip = fp32.clone_frozen();
                clip.set_precision(precision);
                assert_eq!(clip.precision(), precision);
                assert_eq!(clip.fingerprint(), fp32.fingerprint());
                let (mut cast, mut kept) = (0, 0);
                for (name, t) in clip.named_tensors() {
                    if !t.is_floating_point() {
                        continue;
                    }
                    if norm::stays_fp32(&name) {
                        assert_eq!(t.kind(), Kind::Float, "{name}");
                        kept += 1;
                    } else {
                        assert_eq!(t.kind(), precision.kind(), "{name}");
                        cast += 1;
                    }
                }
                assert!(cast > 10 && kept > 4, "{cast} cast, {kept} kept");
                // A copy keeps the precision and the (rounded) values.
                let copy = clip.clone_frozen();
                assert_eq!(copy.precision(), precision);
                assert!(copy
                    .encode_image(&pixels)
                    .equal(&clip.encode_image(&pixels)));
                // fp32 at the boundary, close to the fp32 model.
                let image = clip.encode_image(&pixels);
                assert_eq!(image.kind(), Kind::Float);
                let c = cosine(&image, &fp32.encode_image(&pixels));
                assert!(c > min_cosine, "{precision} image cosine {c}");
                let text = clip.encode_text(&ids());
                let c = cosine(&text, &fp32.encode_text(&ids()));
                assert!(c > min_cosine, "{precision} text cosine {c}");
                // An fp32 prompt gets an fp32 gradient through the low-precision tower.
                let embedded = fp32.embed_tokens(&ids()).detach().set_requires_grad(true);
                let features = clip.encode_text_embedded(&embedded, &eot);
                assert_eq!(features.kind(), Kind::Float);
                features.sum(Kind::Float).backward();
                let grad = embedded.grad();
                assert_eq!(grad.kind(), Kind::Float);
                assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.);
            }
        }
    }

    #[test]
    fn state_dict_round_trip_and_inference() {
        for config in [tiny_vit(), tiny_resnet()] {
            let clip = Clip::random(&config, 3, Device::Cpu);
            let sd = clip.state_dict();
            let mut inferred = ClipConfig::infer(&sd.shapes()).unwrap();
            // Heads are not visible in shapes; OpenAI assumes 64-wide heads.
            match (&mut inferred.vision, &config.vision) {
                (VisionConfig::Vit(a), VisionConfig::Vit(b)) => a.heads = b.heads,
                (VisionConfig::ResNet(a), VisionConfig::ResNet(b)) => a.heads = b.heads,
                _ => panic!("tower kind changed"),
            }
            inferred.text.heads = config.text.heads;
            assert_eq!(inferred, config);
            let reloaded = Clip::from_state_dict_with_config(sd, &config, Device::Cpu).unwrap();
            let ids = ids();
            assert!(clip.encode_text(&ids).equal(&reloaded.encode_text(&ids)));
        }
    }
}
