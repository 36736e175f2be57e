//! CLIP architecture hyper-parameters: named presets and inference from a state dict's shapes.
//!
//! Inference follows OpenAI's `clip.model.build_model`, so any checkpoint it accepts is read the
//! same way here; explicit head counts (Hugging Face `config.json`) may override the inferred ones.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::weights::WeightsError;

/// Shapes of a state dict, by OpenAI tensor name.
pub type Shapes = BTreeMap<String, Vec<i64>>;

/// The whole model: a vision tower and a text tower meeting in a joint embedding space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    /// Width of the joint image-text embedding (`E`).
    pub embed_dim: i64,
    pub vision: VisionConfig,
    pub text: TextConfig,
}

/// The two kinds of image encoder CLIP was released with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VisionConfig {
    Vit(VitConfig),
    #[serde(rename = "resnet")]
    ResNet(ResNetConfig),
}

/// Vision transformer: square patches, a class token, pre-LN residual blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Input side in pixels (`R`); the positional embedding is sized for exactly this.
    pub image_resolution: i64,
    pub patch_size: i64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    #[serde(default)]
    pub activation: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

/// OpenAI's ModifiedResNet: 3-conv stem, anti-aliased bottlenecks, attention pooling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Input side in pixels; a multiple of 32 (the tower's total stride).
    pub image_resolution: i64,
    /// Bottleneck blocks per stage.
    pub layers: [i64; 4],
    /// Stem width; stage `i` has `width * 2^i` planes and the pooled features `width * 32`.
    pub width: i64,
    /// Heads of the attention pool.
    pub heads: i64,
}

/// Causal text transformer over BPE tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub context_length: i64,
    pub vocab_size: i64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    #[serde(default)]
    pub activation: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

/// MLP non-linearity of the transformer blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, what every OpenAI checkpoint was trained with.
    #[default]
    QuickGelu,
    /// Exact (erf) GELU, used by some open_clip / Hugging Face re-trainings.
    Gelu,
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// Names accepted by [`ClipConfig::preset`].
pub const PRESET_NAMES: [&str; 8] = [
    "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14",
];

/// A small ViT CLIP (2 layers, width 256, 16-pixel patches) with the real 224-pixel input and
/// the real tokenizer vocabulary, for demos and tests on CPU: no pretrained weights can ship, so
/// it runs with random weights, whose frozen features still carry blur, noise and colour cues.
pub const TINY_PRESET: &str = "tiny";

/// The ModifiedResNet counterpart of [`TINY_PRESET`]: one bottleneck per stage, stem width 16
/// (pooled width 512, 8 heads), real 224-pixel input, the tiny text tower.
pub const TINY_RN_PRESET: &str = "tiny-rn";

impl ClipConfig {
    /// The configuration of a released OpenAI model, e.g. `"ViT-B/16"` or `"RN50"`.
    /// `ViT-L/14@336px` is also accepted.
    pub fn preset(name: &str) -> Option<ClipConfig> {
        let vit = |patch_size, width, layers, image_resolution| {
            VisionConfig::Vit(VitConfig {
                image_resolution,
                patch_size,
                width,
                layers,
                heads: width / 64,
                activation: Activation::QuickGelu,
                layer_norm_eps: default_layer_norm_eps(),
            })
        };
        let resnet = |layers, width, image_resolution| {
            VisionConfig::ResNet(ResNetConfig {
                image_resolution,
                layers,
                width,
                heads: width * 32 / 64,
            })
        };
        let (embed_dim, vision, text_width) = match name {
            "RN50" => (1024, resnet([3, 4, 6, 3], 64, 224), 512),
            "RN101" => (512, resnet([3, 4, 23, 3], 64, 224), 512),
            "RN50x4" => (640, resnet([4, 6, 10, 6], 80, 288), 640),
            "RN50x16" => (768, resnet([6, 8, 18, 8], 96, 384), 768),
            "RN50x64" => (1024, resnet([3, 15, 36, 10], 128, 448), 1024),
            "ViT-B/32" => (512, vit(32, 768, 12, 224), 512),
            "ViT-B/16" => (512, vit(16, 768, 12, 224), 512),
            "ViT-L/14" => (768, vit(14, 1024, 24, 224), 768),
            "ViT-L/14@336px" => (768, vit(14, 1024, 24, 336), 768),
            TINY_PRESET => (256, vit(16, 256, 2, 224), 256),
            TINY_RN_PRESET => (256, resnet([1, 1, 1, 1], 16, 224), 256),
            _ => return None,
        };
        let text = TextConfig {
            context_length: 77,
            vocab_size: 49408,
            width: text_width,
            layers: if name == TINY_PRESET || name == TINY_RN_PRESET {
                2
            } else {
                12
            },
            heads: text_width / 64,
            activation: Activation::QuickGelu,
            layer_norm_eps: default_layer_norm_eps(),
        };
        Some(ClipConfig {
            embed_dim,
            vision,
            text,
        })
    }

    /// The preset name when this is one (`"ViT-B/16"`), otherwise a short description of the
    /// custom architecture.
    pub fn name(&self) -> String {
        let presets =
            PRESET_NAMES
                .iter()
                .copied()
                .chain(["ViT-L/14@336px", TINY_PRESET, TINY_RN_PRESET]);
        if let Some(name) = presets
            .into_iter()
            .find(|n| Self::preset(n).as_ref() == Some(self))
        {
            return name.to_string();
        }
        let vision = match &self.vision {
            VisionConfig::Vit(v) => {
                format!(
                    "ViT w{} l{} p{} {}px",
                    v.width, v.layers, v.patch_size, v.image_resolution
                )
            }
            VisionConfig::ResNet(r) => {
                let [a, b, c, d] = r.layers;
                format!("RN w{} l{a}-{b}-{c}-{d} {}px", r.width, r.image_resolution)
            }
        };
        let t = &self.text;
        format!(
            "custom CLIP ({vision}; text w{} l{}; embed {})",
            t.width, t.layers, self.embed_dim
        )
    }

    /// Side of the square input image in pixels.
    pub fn image_resolution(&self) -> i64 {
        match &self.vision {
            VisionConfig::Vit(v) => v.image_resolution,
            VisionConfig::ResNet(r) => r.image_resolution,
        }
    }

    /// Infers the architecture from tensor shapes (OpenAI names), as `clip.model.build_model` does.
    pub fn infer(shapes: &Shapes) -> Result<ClipConfig, WeightsError> {
        let vision = if shapes.contains_key("visual.proj") {
            let conv1 = dims(shapes, "visual.conv1.weight", 4)?;
            let positions = dims(shapes, "visual.positional_embedding", 2)?[0];
            let patch_size = conv1[3];
            let grid = ((positions - 1) as f64).sqrt().round() as i64;
            let width = conv1[0];
            VisionConfig::Vit(VitConfig {
                image_resolution: patch_size * grid,
                patch_size,
                width,
                layers: shapes
                    .keys()
                    .filter(|k| k.starts_with("visual.") && k.ends_with(".attn.in_proj_weight"))
                    .count() as i64,
                heads: width / 64,
                activation: Activation::QuickGelu,
                layer_norm_eps: default_layer_norm_eps(),
            })
        } else {
            let mut layers = [0; 4];
            for (stage, count) in layers.iter_mut().enumerate() {
                *count = distinct_indices(shapes, &format!("visual.layer{}.", stage + 1));
            }
            let width = dims(shapes, "visual.layer1.0.conv1.weight", 4)?[0];
            let positions = dims(shapes, "visual.attnpool.positional_embedding", 2)?[0];
            let grid = ((positions - 1) as f64).sqrt().round() as i64;
            VisionConfig::ResNet(ResNetConfig {
                image_resolution: grid * 32,
                layers,
                width,
                heads: width * 32 / 64,
            })
        };
        let width = dims(shapes, "ln_final.weight", 1)?[0];
        let text = TextConfig {
            context_length: dims(shapes, "positional_embedding", 2)?[0],
            vocab_size: dims(shapes, "token_embedding.weight", 2)?[0],
            width,
            layers: distinct_indices(shapes, "transformer.resblocks."),
            heads: width / 64,
            activation: Activation::QuickGelu,
            layer_norm_eps: default_layer_norm_eps(),
        };
        let embed_dim = dims(shapes, "text_projection", 2)?[1];
        // Not validated here: declared head counts may still override the inferred ones.
        Ok(ClipConfig {
            embed_dim,
            vision,
            text,
        })
    }

    /// Checks what the layers need to be buildable (heads divide widths, patches tile the image).
    pub fn validate(&self) -> Result<(), WeightsError> {
        let invalid = |reason: String| Err(WeightsError::InvalidConfig { reason });
        let divides = |what: &str, heads: i64, width: i64| {
            if heads <= 0 || width <= 0 || width % heads != 0 {
                invalid(format!(
                    "{what}: {heads} heads do not divide width {width} (inference assumes 64-wide \
                     heads; declare the head count when the width is not a multiple of 64)"
                ))
            } else {
                Ok(())
            }
        };
        if self.embed_dim <= 0 {
            return invalid(format!(
                "embed_dim must be positive, not {}",
                self.embed_dim
            ));
        }
        match &self.vision {
            VisionConfig::Vit(v) => {
                divides("vision transformer", v.heads, v.width)?;
                if v.patch_size <= 0
                    || v.image_resolution <= 0
                    || v.image_resolution % v.patch_size != 0
                {
                    return invalid(format!(
                        "image resolution {} is not a positive multiple of the patch size {}",
                        v.image_resolution, v.patch_size
                    ));
                }
            }
            VisionConfig::ResNet(r) => {
                divides("attention pool", r.heads, r.width * 32)?;
                if r.image_resolution <= 0 || r.image_resolution % 32 != 0 {
                    return invalid(format!(
                        "ResNet image resolution {} is not a positive multiple of 32",
                        r.image_resolution
                    ));
                }
                if r.layers.iter().any(|&n| n <= 0) {
                    return invalid(format!(
                        "every ResNet stage needs a block, got {:?}",
                        r.layers
                    ));
                }
            }
        }
        divides("text transformer", self.text.heads, self.text.width)?;
        if self.text.context_length <= 0 || self.text.vocab_size <= 0 {
            return invalid("text context length and vocabulary must be positive".to_string());
        }
        Ok(())
    }
}

/// The shape of a tensor that inference needs, with its rank checked.
fn dims<'a>(shapes: &'a Shapes, name: &str, rank: usize) -> Result<&'a [i64], WeightsError> {
    match shapes.get(name) {
        Some(shape) if shape.len() == rank => Ok(shape),
        Some(shape) => Err(WeightsError::Infer {
            reason: format!("`{name}` has shape {shape:?}, expected {rank} dimensions"),
        }),
        None => Err(WeightsError::Infer {
            reason: format!("`{name}` is missing (is this a CLIP checkpoint?)"),
        }),
    }
}

/// Number of distinct block indices `N` among names `{prefix}N.…`.
fn distinct_indices(shapes: &Shapes, prefix: &str) -> i64 {
    let indices: BTreeSet<&str> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next())
        .collect();
    indices.len() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_named_by_its_own_name() {
        for name in PRESET_NAMES.iter().copied().chain(["ViT-L/14@336px"]) {
            let config = ClipConfig::preset(name).expect("listed preset exists");
            config.validate().expect("presets are valid");
            assert_eq!(config.name(), name);
        }
        assert!(ClipConfig::preset("ViT-H/14").is_none());
    }

    #[test]
    fn preset_values_match_openai_release() {
        let b16 = ClipConfig::preset("ViT-B/16").unwrap();
        assert_eq!(b16.image_resolution(), 224);
        assert_eq!(b16.embed_dim, 512);
        let VisionConfig::Vit(v) = &b16.vision else {
            panic!("ViT-B/16 is a ViT")
        };
        assert_eq!(
            (v.width, v.layers, v.heads, v.patch_size),
            (768, 12, 12, 16)
        );
        let rn101 = ClipConfig::preset("RN101").unwrap();
        let VisionConfig::ResNet(r) = &rn101.vision else {
            panic!("RN101 is a ResNet")
        };
        assert_eq!((r.layers, r.width, r.heads), ([3, 4, 23, 3], 64, 32));
        assert_eq!(rn101.text.width, 512);
    }

    #[test]
    fn custom_config_gets_a_descriptive_name() {
        let mut config = ClipConfig::preset("ViT-B/16").unwrap();
        config.embed_dim = 32;
        assert!(
            config.name().starts_with("custom CLIP (ViT w768"),
            "{}",
            config.name()
        );
    }

    #[test]
    fn serde_round_trip_keeps_the_config() {
        for name in ["RN50", "ViT-B/32"] {
            let config = ClipConfig::preset(name).unwrap();
            let json = serde_json::to_string(&config).unwrap();
            assert_eq!(serde_json::from_str::<ClipConfig>(&json).unwrap(), config);
        }
    }

    #[test]
    fn inference_without_the_text_tower_names_the_missing_tensor() {
        let mut shapes = Shapes::new();
        shapes.insert("visual.proj".into(), vec![64, 32]);
        shapes.insert("visual.conv1.weight".into(), vec![64, 3, 16, 16]);
        shapes.insert("visual.positional_embedding".into(), vec![17, 64]);
        let err = ClipConfig::infer(&shapes).unwrap_err().to_string();
        assert!(err.contains("ln_final.weight"), "{err}");
    }

    #[test]
    fn invalid_head_count_is_rejected() {
        let mut config = ClipConfig::preset("ViT-B/32").unwrap();
        config.text.heads = 7;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("7 heads"), "{err}");
    }
}
