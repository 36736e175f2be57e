//! Hugging Face `transformers` CLIP checkpoints (`openai/clip-vit-base-patch16` and friends):
//! tensor names mapped to and from OpenAI's, and the `config.json` fields shapes cannot tell.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::Tensor;

use super::{is_ignored, StateDict, WeightsError};
use crate::clip::config::{Activation, ClipConfig, VisionConfig};

/// One-to-one renames outside the transformer blocks (HF name, OpenAI name).
const GLOBAL_NAMES: [(&str, &str); 12] = [
    (
        "vision_model.embeddings.patch_embedding.weight",
        "visual.conv1.weight",
    ),
    (
        "vision_model.embeddings.class_embedding",
        "visual.class_embedding",
    ),
    (
        "vision_model.embeddings.position_embedding.weight",
        "visual.positional_embedding",
    ),
    // "layrnorm" is HF's spelling.
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
    (
        "vision_model.post_layernorm.weight",
        "visual.ln_post.weight",
    ),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
    (
        "text_model.embeddings.token_embedding.weight",
        "token_embedding.weight",
    ),
    (
        "text_model.embeddings.position_embedding.weight",
        "positional_embedding",
    ),
    ("text_model.final_layer_norm.weight", "ln_final.weight"),
    ("text_model.final_layer_norm.bias", "ln_final.bias"),
    ("logit_scale", "logit_scale"),
];

/// Projections stored as `nn.Linear` weights `[E, W]` by HF and as matrices `[W, E]` by OpenAI.
const TRANSPOSED_NAMES: [(&str, &str); 2] = [
    ("visual_projection.weight", "visual.proj"),
    ("text_projection.weight", "text_projection"),
];

/// Block prefixes, each followed by the layer index (HF, OpenAI).
const BLOCK_PREFIXES: [(&str, &str); 2] = [
    (
        "vision_model.encoder.layers.",
        "visual.transformer.resblocks.",
    ),
    ("text_model.encoder.layers.", "transformer.resblocks."),
];

/// One-to-one renames inside a block (HF suffix, OpenAI suffix).
const BLOCK_NAMES: [(&str, &str); 10] = [
    ("self_attn.out_proj.weight", "attn.out_proj.weight"),
    ("self_attn.out_proj.bias", "attn.out_proj.bias"),
    ("layer_norm1.weight", "ln_1.weight"),
    ("layer_norm1.bias", "ln_1.bias"),
    ("layer_norm2.weight", "ln_2.weight"),
    ("layer_norm2.bias", "ln_2.bias"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc1.bias", "mlp.c_fc.bias"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
    ("mlp.fc2.bias", "mlp.c_proj.bias"),
];

/// HF keeps q, k, v separate; OpenAI packs them (in that order) along dim 0 of `in_proj_*`.
const PACKED_PROJECTIONS: [&str; 3] = [
    "self_attn.q_proj.",
    "self_attn.k_proj.",
    "self_attn.v_proj.",
];

/// How an HF tensor becomes (part of) an OpenAI one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    Renamed(String),
    Transposed(String),
    /// The `index`-th third (q = 0, k = 1, v = 2) of a packed `in_proj_weight`/`in_proj_bias`.
    Packed {
        name: String,
        index: usize,
    },
}

/// Whether names look like `transformers`' CLIPModel rather than OpenAI's.
pub fn uses_hf_names<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n.starts_with("vision_model.") || n.starts_with("text_model."))
}

/// The OpenAI tensor an HF tensor maps to; `None` for names outside the CLIP architecture.
pub fn openai_name(hf_name: &str) -> Option<Mapping> {
    if let Some(&(_, openai)) = GLOBAL_NAMES.iter().find(|(hf, _)| *hf == hf_name) {
        return Some(Mapping::Renamed(openai.to_string()));
    }
    if let Some(&(_, openai)) = TRANSPOSED_NAMES.iter().find(|(hf, _)| *hf == hf_name) {
        return Some(Mapping::Transposed(openai.to_string()));
    }
    let (openai_prefix, rest) = BLOCK_PREFIXES
        .iter()
        .find_map(|(hf, openai)| Some((openai, hf_name.strip_prefix(hf)?)))?;
    let (layer, suffix) = rest.split_once('.')?;
    layer.parse::<u32>().ok()?;
    if let Some(&(_, openai)) = BLOCK_NAMES.iter().find(|(hf, _)| *hf == suffix) {
        return Some(Mapping::Renamed(format!("{openai_prefix}{layer}.{openai}")));
    }
    PACKED_PROJECTIONS
        .iter()
        .enumerate()
        .find_map(|(index, projection)| {
            let part = suffix.strip_prefix(projection)?;
            matches!(part, "weight" | "bias").then(|| Mapping::Packed {
                name: format!("{openai_prefix}{layer}.attn.in_proj_{part}"),
                index,
            })
        })
}

/// The HF tensors an OpenAI tensor splits into, with how each is derived (the inverse of
/// [`openai_name`]); empty for names with no HF counterpart (e.g. the ModifiedResNet).
pub fn hf_names(openai: &str) -> Vec<(String, Mapping)> {
    if let Some(&(hf, _)) = GLOBAL_NAMES.iter().find(|(_, o)| *o == openai) {
        return vec![(hf.to_string(), Mapping::Renamed(openai.to_string()))];
    }
    if let Some(&(hf, _)) = TRANSPOSED_NAMES.iter().find(|(_, o)| *o == openai) {
        return vec![(hf.to_string(), Mapping::Transposed(openai.to_string()))];
    }
    let Some((hf_prefix, rest)) = BLOCK_PREFIXES
        .iter()
        .find_map(|(hf, o)| Some((hf, openai.strip_prefix(o)?)))
    else {
        return Vec::new();
    };
    let Some((layer, suffix)) = rest.split_once('.') else {
        return Vec::new();
    };
    if let Some(&(hf, _)) = BLOCK_NAMES.iter().find(|(_, o)| *o == suffix) {
        return vec![(
            format!("{hf_prefix}{layer}.{hf}"),
            Mapping::Renamed(openai.to_string()),
        )];
    }
    let Some(part) = suffix.strip_prefix("attn.in_proj_") else {
        return Vec::new();
    };
    PACKED_PROJECTIONS
        .iter()
        .enumerate()
        .map(|(index, projection)| {
            let name = format!("{hf_prefix}{layer}.{projection}{part}");
            (
                name,
                Mapping::Packed {
                    name: openai.to_string(),
                    index,
                },
            )
        })
        .collect()
}

/// Converts HF-named tensors to an OpenAI state dict.
///
/// Names that do not map (and q/k/v triples with a member missing) are kept under their HF names,
/// so the architecture check reports them as unexpected rather than dropping them silently.
pub fn to_openai(tensors: Vec<(String, Tensor)>) -> StateDict {
    let mut sd = StateDict::new();
    let mut packed: BTreeMap<String, [Option<(String, Tensor)>; 3]> = BTreeMap::new();
    for (hf_name, tensor) in tensors {
        if is_ignored(&hf_name) {
            continue;
        }
        match openai_name(&hf_name) {
            Some(Mapping::Renamed(name)) => sd.insert(name, &tensor),
            Some(Mapping::Transposed(name)) => sd.insert(name, &tensor.tr().contiguous()),
            Some(Mapping::Packed { name, index }) => {
                packed.entry(name).or_default()[index] = Some((hf_name, tensor));
            }
            None => sd.insert(hf_name, &tensor),
        }
    }
    for (name, parts) in packed {
        if parts.iter().all(Option::is_some) {
            let tensors: Vec<Tensor> = parts.into_iter().flatten().map(|(_, t)| t).collect();
            sd.insert(name, &Tensor::cat(&tensors, 0));
        } else {
            for (hf_name, tensor) in parts.into_iter().flatten() {
                sd.insert(hf_name, &tensor);
            }
        }
    }
    sd
}

/// Converts an OpenAI state dict to HF names; tensors without an HF counterpart keep their name.
pub fn from_openai(sd: &StateDict) -> Vec<(String, Tensor)> {
    let mut out = Vec::with_capacity(sd.len() + 16);
    for (name, tensor) in sd.iter() {
        let targets = hf_names(name);
        if targets.is_empty() {
            out.push((name.to_string(), tensor.shallow_clone()));
        }
        for (hf_name, mapping) in targets {
            let tensor = match mapping {
                Mapping::Renamed(_) => tensor.shallow_clone(),
                Mapping::Transposed(_) => tensor.tr().contiguous(),
                Mapping::Packed { index, .. } => tensor.chunk(3, 0)[index].contiguous(),
            };
            out.push((hf_name, tensor));
        }
    }
    out
}

/// What `config.json` says about one tower; `None` fields keep the shape-inferred value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HfTowerConfig {
    pub heads: Option<i64>,
    pub layer_norm_eps: Option<f64>,
    pub activation: Option<Activation>,
}

/// The parts of an HF `CLIPConfig` that tensor shapes cannot reveal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HfClipConfig {
    pub vision: HfTowerConfig,
    pub text: HfTowerConfig,
}

#[derive(Deserialize)]
struct RawConfig {
    text_config: Option<RawTower>,
    vision_config: Option<RawTower>,
    // Written by older `transformers` versions instead of (or beside) the two above.
    text_config_dict: Option<RawTower>,
    vision_config_dict: Option<RawTower>,
}

#[derive(Deserialize)]
struct RawTower {
    num_attention_heads: Option<i64>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
}

impl HfClipConfig {
    /// Reads `config.json` from a model folder or beside a weights file; `None` when absent.
    pub fn find(weights: &Path) -> Result<Option<HfClipConfig>, WeightsError> {
        let dir = if weights.is_dir() {
            weights
        } else {
            weights.parent().unwrap_or(Path::new("."))
        };
        let path = dir.join("config.json");
        if !path.is_file() {
            return Ok(None);
        }
        Self::read(&path).map(Some)
    }

    pub fn read(path: &Path) -> Result<HfClipConfig, WeightsError> {
        let text = std::fs::read_to_string(path).map_err(|source| WeightsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| WeightsError::HfConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let tower = |main: Option<RawTower>, legacy: Option<RawTower>| {
            tower_config(main.or(legacy), path).map(Option::unwrap_or_default)
        };
        Ok(HfClipConfig {
            vision: tower(raw.vision_config, raw.vision_config_dict)?,
            text: tower(raw.text_config, raw.text_config_dict)?,
        })
    }

    /// Overrides inferred values with the declared ones (the ResNet has no HF counterpart).
    pub fn apply(&self, config: &mut ClipConfig) {
        let text = &mut config.text;
        text.heads = self.text.heads.unwrap_or(text.heads);
        text.layer_norm_eps = self.text.layer_norm_eps.unwrap_or(text.layer_norm_eps);
        text.activation = self.text.activation.unwrap_or(text.activation);
        if let VisionConfig::Vit(vision) = &mut config.vision {
            vision.heads = self.vision.heads.unwrap_or(vision.heads);
            vision.layer_norm_eps = self.vision.layer_norm_eps.unwrap_or(vision.layer_norm_eps);
            vision.activation = self.vision.activation.unwrap_or(vision.activation);
        }
    }
}

fn tower_config(raw: Option<RawTower>, path: &Path) -> Result<Option<HfTowerConfig>, WeightsError> {
    let Some(raw) = raw else { return Ok(None) };
    let activation = match raw.hidden_act.as_deref() {
        None => None,
        Some("quick_gelu") => Some(Activation::QuickGelu),
        Some("gelu") => Some(Activation::Gelu),
        Some(other) => {
            return Err(WeightsError::HfConfig {
                path: PathBuf::from(path),
                reason: format!("hidden_act `{other}` is not supported (use quick_gelu or gelu)"),
            })
        }
    };
    Ok(Some(HfTowerConfig {
        heads: raw.num_attention_heads,
        layer_norm_eps: raw.layer_norm_eps,
        activation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_map_both_ways() {
        let cases = [
            (
                "vision_model.encoder.layers.11.mlp.fc2.bias",
                "visual.transformer.resblocks.11.mlp.c_proj.bias",
            ),
            (
                "text_model.encoder.layers.0.layer_norm1.weight",
                "transformer.resblocks.0.ln_1.weight",
            ),
            ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
        ];
        for (hf, openai) in cases {
            assert_eq!(openai_name(hf), Some(Mapping::Renamed(openai.to_string())));
            assert_eq!(
                hf_names(openai),
                vec![(hf.to_string(), Mapping::Renamed(openai.to_string()))]
            );
        }
    }

    #[test]
    fn q_k_v_pack_in_order() {
        let packed = hf_names("visual.transformer.resblocks.3.attn.in_proj_weight");
        let names: Vec<&str> = packed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "vision_model.encoder.layers.3.self_attn.q_proj.weight",
                "vision_model.encoder.layers.3.self_attn.k_proj.weight",
                "vision_model.encoder.layers.3.self_attn.v_proj.weight",
            ]
        );
        assert_eq!(
            openai_name("text_model.encoder.layers.2.self_attn.v_proj.bias"),
            Some(Mapping::Packed {
                name: "transformer.resblocks.2.attn.in_proj_bias".into(),
                index: 2
            })
        );
    }

    #[test]
    fn unknown_names_do_not_map() {
        assert_eq!(
            openai_name("vision_model.encoder.layers.x.mlp.fc1.weight"),
            None
        );
        assert_eq!(
            openai_name("text_model.encoder.layers.1.self_attn.q_proj.scale"),
            None
        );
        assert!(hf_names("visual.layer1.0.conv1.weight").is_empty());
    }

    #[test]
    fn incomplete_q_k_v_stay_visible() {
        let t = Tensor::zeros([4, 4], (tch::Kind::Float, tch::Device::Cpu));
        let sd = to_openai(vec![
            (
                "text_model.encoder.layers.0.self_attn.q_proj.weight".into(),
                t.shallow_clone(),
            ),
            (
                "text_model.encoder.layers.0.self_attn.k_proj.weight".into(),
                t,
            ),
        ]);
        let names: Vec<&str> = sd.names().collect();
        assert_eq!(
            names,
            [
                "text_model.encoder.layers.0.self_attn.k_proj.weight",
                "text_model.encoder.layers.0.self_attn.q_proj.weight",
            ]
        );
    }

    #[test]
    fn config_json_overrides_heads_and_activation() {
        let dir = std::env::temp_dir().join(format!("agiqa-hf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = r#"{"text_config": {"num_attention_heads": 2, "hidden_act": "gelu"},
                       "vision_config": {"num_attention_heads": 4, "layer_norm_eps": 1e-6}}"#;
        std::fs::write(dir.join("config.json"), json).unwrap();
        let hf = HfClipConfig::find(&dir.join("model.safetensors"))
            .unwrap()
            .expect("config found");
        let mut config = ClipConfig::preset("ViT-B/32").unwrap();
        hf.apply(&mut config);
        assert_eq!(
            (config.text.heads, config.text.activation),
            (2, Activation::Gelu)
        );
        let VisionConfig::Vit(v) = &config.vision else {
            unreachable!()
        };
        assert_eq!(
            (v.heads, v.layer_norm_eps, v.activation),
            (4, 1e-6, Activation::QuickGelu)
        );

        std::fs::write(
            dir.join("config.json"),
            r#"{"text_config": {"hidden_act": "relu"}}"#,
        )
        .unwrap();
        let err = HfClipConfig::find(&dir).unwrap_err().to_string();
        assert!(err.contains("relu") && err.contains("config.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
