//! The model-metadata schema: what a checkpoint (trainer) and an exported graph (exporter) say
//! about themselves, and what the runtime reads back to preprocess and label scores. One
//! definition, so that the three stages cannot disagree on a field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::metrics::Correlations;
use crate::preprocess::Preprocessing;

/// Version of this schema; bumped on any incompatible change.
/// - 1: first release; images converted with alpha over white, EXIF applied, 16-bit rounded.
/// - 2: [`Preprocessing`] records its conversion (`alpha`, `exif_orientation`, `sixteen_bit`),
///   PIL's by default; format-1 metadata still reads as format 1's conversion. Readers ignore
///   keys they do not know, so later fields can be added under this version. Added within 2
///   (before its release, optional): `quantization` ([`Quantization`]) on int8 graphs; a graph
///   without it is a float graph, as every earlier one is.
pub const METADATA_FORMAT_VERSION: u32 = 2;

/// Prefix of every key this project writes into ONNX `metadata_props`.
pub const METADATA_KEY_PREFIX: &str = "agiqa.";

/// The graph contract between the exporter and the runtime: input and output names.
///
/// An exported model has exactly one input, either
/// - [`INPUT_PIXEL_VALUES`]: float32 `[N, 3, R, R]`, pixels already normalised with the
///   model's [`Preprocessing`] mean and std (what the trainer's forward takes), or
/// - [`INPUT_PIXELS_UINT8`]: uint8 `[N, R, R, 3]`, the resized and cropped RGB pixels
///   (`Preprocessor::resize_and_crop`); the graph normalises and transposes them itself, so a
///   quarter of the bytes cross to the device;
///
/// and exactly one output, float32 in each head's MOS scale:
/// - [`OUTPUT_SCORE`] `[N]` when the model has one head, or
/// - [`OUTPUT_SCORES`] `[N, H]` with column `h` the head `heads[h]` of [`ModelMetadata`];
///
/// optionally followed by [`OUTPUT_IMAGE_FEATURES`], float32 `[N, E]`, the L2-normalised CLIP
/// image embeddings (exported on request, for retrieval or deduplication beside the scores).
pub const INPUT_PIXEL_VALUES: &str = "pixel_values";
/// See [`INPUT_PIXEL_VALUES`].
pub const INPUT_PIXELS_UINT8: &str = "pixels_uint8";
/// See [`INPUT_PIXEL_VALUES`].
pub const OUTPUT_SCORE: &str = "score";
/// See [`INPUT_PIXEL_VALUES`].
pub const OUTPUT_SCORES: &str = "scores";
/// See [`INPUT_PIXEL_VALUES`].
pub const OUTPUT_IMAGE_FEATURES: &str = "image_features";

/// Which of the two contract inputs a model takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// float32 `[N, 3, R, R]`, normalised with the metadata's mean and std.
    PixelValues,
    /// uint8 `[N, R, R, 3]`, resized and cropped RGB; the graph normalises.
    PixelsUint8,
}

impl InputKind {
    pub fn name(self) -> &'static str {
        match self {
            InputKind::PixelValues => INPUT_PIXEL_VALUES,
            InputKind::PixelsUint8 => INPUT_PIXELS_UINT8,
        }
    }
}

/// What a score means: its dimension and scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreScale {
    /// Quality dimension, e.g. `quality`, `alignment`, `authenticity`, `correspondence`.
    pub dimension: String,
    /// Lowest and highest MOS of the training data's scale (AGIQA-3K: 0–5, AIGCIQA2023: 0–100).
    pub min: f64,
    pub max: f64,
    /// Always true for MOS; kept explicit because users ask which direction is better.
    pub higher_is_better: bool,
}

/// One output head of a model (one score per image).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadInfo {
    /// Name of the score, unique within a model (e.g. `quality`).
    pub name: String,
    pub scale: ScoreScale,
    /// Dataset the head was trained on, e.g. `agiqa3k`.
    pub dataset: String,
    /// Evaluation protocol that produced `metrics` (e.g. `paper-reference-split`, `val-selected`).
    pub protocol: Option<String>,
    pub metrics: Option<Correlations>,
    /// SHA-256 of the checkpoint the head came from.
    pub checkpoint_sha256: Option<String>,
    /// How the head scores: `regression`, `classification` or `zero-shot`.
    #[serde(default)]
    pub variant: Option<String>,
    /// The head's quality categories and context length; heads of one model may differ
    /// (the model-level fields describe the first head).
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    #[serde(default)]
    pub context_len: Option<usize>,
}

impl HeadInfo {
    /// Why the head's scale cannot label scores, if it cannot: bounds that are not finite
    /// (JSON would write them back as `null`) or not increasing.
    fn scale_problem(&self) -> Option<String> {
        let ScoreScale { min, max, .. } = self.scale;
        (!(min.is_finite() && max.is_finite() && min < max)).then(|| {
            format!(
                "head `{}`: scale {min}–{max} must be finite with min < max",
                self.name
            )
        })
    }
}

/// Everything a consumer of a trained or exported model needs to know about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub format_version: u32,
    /// CLIP backbone, e.g. `ViT-B/16`, `RN101`.
    pub backbone: String,
    /// Quality categories of the prompts, in order (e.g. terrible … perfect).
    pub categories: Vec<String>,
    /// Number of learned context tokens.
    pub context_len: usize,
    pub preprocessing: Preprocessing,
    pub heads: Vec<HeadInfo>,
    /// SHA-256 of the CLIP weights the model was built on.
    pub clip_weights_sha256: Option<String>,
    /// How the graph was quantised to int8; `None` for float (fp32/fp16) graphs.
    pub quantization: Option<Quantization>,
    /// How attention is written (`agiqa.attention`, e.g. `com.microsoft.MultiHeadAttention`
    /// for ONNX Runtime's fused kernel); `None` in models written before the key existed,
    /// whose attention is plain opset ops.
    pub attention: Option<String>,
}

/// How int8 activations are quantised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Int8Mode {
    /// Activations quantised at run time (`DynamicQuantizeLinear` → `MatMulInteger` /
    /// `ConvInteger`): ONNX Runtime's CPU kernels only.
    Dynamic,
    /// Activations quantised with calibrated scales, as QDQ pairs (symmetric S8S8, zero point
    /// 0): what ONNX Runtime CPU/CUDA and TensorRT take.
    Static,
}

impl Int8Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Int8Mode::Dynamic => "dynamic",
            Int8Mode::Static => "static",
        }
    }
}

/// A layer left in float in an int8 graph, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FloatLayer {
    /// The layer or layer group, e.g. `visual.conv1` or `attention scores (Q·Kᵀ, P·V)`.
    pub layer: String,
    pub reason: String,
}

/// The calibration of a static int8 graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    /// What the images were (`folder <path>`, `manifest <path>`, `train split of <dataset>`).
    pub source: String,
    pub images: usize,
    /// How a tensor's range was chosen from its values, e.g. `percentile 99.99 of |x|`.
    pub method: String,
}

/// The accuracy of an int8 graph against its fp32 graph on held-out images (minimum over
/// heads where a figure is per head).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Int8Accuracy {
    /// What the held-out images were, and how many.
    pub images: String,
    pub count: usize,
    /// Spearman correlation of int8 scores with fp32 scores.
    pub srcc_vs_fp32: f64,
    /// Smallest and mean cosine between int8 and fp32 image features.
    pub feature_cosine_min: f64,
    pub feature_cosine_mean: f64,
    /// Largest `|int8 − fp32|` score over the score scale's span.
    pub max_abs_delta_over_span: f64,
    /// `|SRCC(int8, MOS) − SRCC(fp32, MOS)|`, where the images have MOS.
    pub srcc_vs_mos_change: Option<f64>,
    /// Whether every figure is within the budget.
    pub within_budget: bool,
}

/// What an int8 graph is: recorded so the runtime can refuse a provider that cannot run it and
/// users can see what was traded for speed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quantization {
    pub mode: Int8Mode,
    /// e.g. `int8, symmetric, per output channel`.
    pub weights: String,
    /// e.g. `uint8, per tensor, at run time` or `int8, symmetric, per tensor, calibrated`.
    pub activations: String,
    /// Execution providers the graph is meant for (`cpu`, `cuda`, `tensorrt`); the runtime
    /// refuses the others.
    pub providers: Vec<String>,
    /// How many weight layers run in int8.
    pub int8_layers: usize,
    /// What stays in float, and why.
    pub float_layers: Vec<FloatLayer>,
    #[serde(default)]
    pub calibration: Option<CalibrationInfo>,
    #[serde(default)]
    pub accuracy: Option<Int8Accuracy>,
}

impl Quantization {
    /// Whether the graph is meant to run on `provider` (`cpu`, `cuda`, `tensorrt`).
    pub fn supports(&self, provider: &str) -> bool {
        self.providers.iter().any(|p| p == provider)
    }
}

/// Why metadata could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("model metadata has no '{0}' entry; was it exported by this project?")]
    Missing(String),
    #[error("model metadata '{key}' is invalid: {reason}")]
    Invalid { key: String, reason: String },
    #[error("model metadata format {found} is newer than this runtime understands ({supported}); upgrade the runtime")]
    UnsupportedVersion { found: u32, supported: u32 },
}

impl ModelMetadata {
    /// Flattens to string key/value pairs (ONNX `metadata_props`), one JSON value per field.
    pub fn to_props(&self) -> BTreeMap<String, String> {
        let mut props = BTreeMap::new();
        let mut put = |key: &str, value: String| {
            props.insert(format!("{METADATA_KEY_PREFIX}{key}"), value);
        };
        put("format_version", self.format_version.to_string());
        put("backbone", self.backbone.clone());
        put("categories", to_json(&self.categories));
        put("context_len", self.context_len.to_string());
        put("preprocessing", to_json(&self.preprocessing));
        put("heads", to_json(&self.heads));
        if let Some(hash) = &self.clip_weights_sha256 {
            put("clip_weights_sha256", hash.clone());
        }
        if let Some(quantization) = &self.quantization {
            put("quantization", to_json(quantization));
        }
        if let Some(attention) = &self.attention {
            put("attention", attention.clone());
        }
        props
    }

    /// Reads back what [`ModelMetadata::to_props`] wrote.
    pub fn from_props(props: &BTreeMap<String, String>) -> Result<Self, MetadataError> {
        let get = |key: &str| {
            props
                .get(&format!("{METADATA_KEY_PREFIX}{key}"))
                .ok_or_else(|| MetadataError::Missing(format!("{METADATA_KEY_PREFIX}{key}")))
        };
        let invalid = |key: &str, reason: String| MetadataError::Invalid {
            key: format!("{METADATA_KEY_PREFIX}{key}"),
            reason,
        };
        let format_version: u32 = get("format_version")?
            .parse()
            .map_err(|e: std::num::ParseIntError| invalid("format_version", e.to_string()))?;
        if format_version > METADATA_FORMAT_VERSION {
            return Err(MetadataError::UnsupportedVersion {
                found: format_version,
                supported: METADATA_FORMAT_VERSION,
            });
        }
        fn parse<T: serde::de::DeserializeOwned>(
            raw: &str,
            key: &str,
            invalid: &dyn Fn(&str, String) -> MetadataError,
        ) -> Result<T, MetadataError> {
            serde_json::from_str(raw).map_err(|e| invalid(key, e.to_string()))
        }
        Ok(ModelMetadata {
            format_version,
            backbone: get("backbone")?.clone(),
            categories: parse(get("categories")?, "categories", &invalid)?,
            context_len: get("context_len")?
                .parse()
                .map_err(|e: std::num::ParseIntError| invalid("context_len", e.to_string()))?,
            preprocessing: parse::<Preprocessing>(get("preprocessing")?, "preprocessing", &invalid)
                .and_then(|p| {
                    p.check()
                        .map(|()| p)
                        .map_err(|e| invalid("preprocessing", e))
                })?,
            heads: parse::<Vec<HeadInfo>>(get("heads")?, "heads", &invalid).and_then(|heads| {
                match heads.iter().find_map(HeadInfo::scale_problem) {
                    Some(problem) => Err(invalid("heads", problem)),
                    None => Ok(heads),
                }
            })?,
            clip_weights_sha256: props
                .get(&format!("{METADATA_KEY_PREFIX}clip_weights_sha256"))
                .cloned(),
            quantization: Self::quantization_from_props(props)?,
            attention: props
                .get(&format!("{METADATA_KEY_PREFIX}attention"))
                .cloned(),
        })
    }

    /// Just the int8 description (`agiqa.quantization`), `None` for float graphs: what the
    /// runtime needs before it picks an execution provider.
    pub fn quantization_from_props(
        props: &BTreeMap<String, String>,
    ) -> Result<Option<Quantization>, MetadataError> {
        let key = format!("{METADATA_KEY_PREFIX}quantization");
        props
            .get(&key)
            .map(|raw| {
                serde_json::from_str(raw).map_err(|e| MetadataError::Invalid {
                    key: key.clone(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }
}

/// Serialises a schema field; plain data structs with string keys cannot fail to serialise.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModelMetadata {
        ModelMetadata {
            format_version: METADATA_FORMAT_VERSION,
            backbone: "ViT-B/16".into(),
            categories: ["terrible", "bad", "poor", "average", "good", "perfect"]
                .map(String::from)
                .to_vec(),
            context_len: 16,
            preprocessing: Preprocessing::default(),
            heads: vec![HeadInfo {
                name: "quality".into(),
                scale: ScoreScale {
                    dimension: "quality".into(),
                    min: 0.0,
                    max: 5.0,
                    higher_is_better: true,
                },
                dataset: "agiqa3k".into(),
                protocol: Some("paper-reference-split".into()),
                metrics: None,
                checkpoint_sha256: Some("ab".repeat(32)),
                variant: Some("regression".into()),
                categories: None,
                context_len: Some(16),
            }],
            clip_weights_sha256: Some("cd".repeat(32)),
            quantization: None,
            attention: Some("plain (Q scaled before Q·Kᵀ)".into()),
        }
    }

    #[test]
    fn props_round_trip() {
        let meta = sample();
        let props = meta.to_props();
        assert!(props.keys().all(|k| k.starts_with(METADATA_KEY_PREFIX)));
        assert_eq!(ModelMetadata::from_props(&props).unwrap(), meta);
    }

    /// Found by the `metadata` fuzz target: these parsed, then panicked (resampling to 0 pixels,
    /// `tensor_len` overflow) or aborted allocating 120 GB when the first image was preprocessed.
    #[test]
    fn preprocessing_that_cannot_run_is_invalid_metadata() {
        let json = |field: &str| {
            let mut value = serde_json::to_value(Preprocessing::default()).unwrap();
            let (key, v) = field.split_once('=').unwrap();
            value[key] = serde_json::from_str(v).unwrap();
            value.to_string()
        };
        for (field, reason) in [
            ("image_size=0", "image_size 0 is outside 1..=4096"),
            ("image_size=100000", "image_size 100000 is outside"),
            ("image_size=4000000000", "image_size 4000000000 is outside"),
            ("std=[0.5,0.0,0.5]", "must be finite and non-zero"),
            // Beyond f32: refused while parsing (with float_roundtrip), never read as infinity.
            ("mean=[1e39,0,0]", "number out of range"),
            ("std=[0.5,1e39,0.5]", "number out of range"),
        ] {
            let mut props = sample().to_props();
            props.insert("agiqa.preprocessing".into(), json(field));
            let err = ModelMetadata::from_props(&props).unwrap_err().to_string();
            assert!(
                err.contains("'agiqa.preprocessing' is invalid"),
                "{field}: {err}"
            );
            assert!(err.contains(reason), "{field}: {err}");
        }
    }

    /// Found by the `metadata` fuzz target: a reversed or infinite scale was accepted, and a
    /// large bound came back 1 ulp off (serde_json's default float parsing is not exact).
    #[test]
    fn head_scales_must_be_finite_increasing_and_read_back_exactly() {
        for (min, max, reason) in [
            ("5.0", "0.0", "must be finite with min < max"),
            ("2.0", "2.0", "must be finite with min < max"),
            ("0.0", "1e309", "number out of range"),
        ] {
            let mut props = sample().to_props();
            let heads = props["agiqa.heads"]
                .replace("\"min\":0.0", &format!("\"min\":{min}"))
                .replace("\"max\":5.0", &format!("\"max\":{max}"));
            props.insert("agiqa.heads".into(), heads);
            let err = ModelMetadata::from_props(&props).unwrap_err().to_string();
            assert!(
                err.contains("'agiqa.heads' is invalid"),
                "{min}–{max}: {err}"
            );
            assert!(err.contains(reason), "{min}–{max}: {err}");
        }
        let mut meta = sample();
        meta.heads[0].scale.max = 5.888888888888889e74;
        let reread = ModelMetadata::from_props(&meta.to_props()).unwrap();
        assert_eq!(reread.heads[0].scale.max, 5.888888888888889e74);
    }

    #[test]
    fn missing_and_future_versions_are_clear_errors() {
        let mut props = sample().to_props();
        props.remove("agiqa.preprocessing");
        let err = ModelMetadata::from_props(&props).unwrap_err();
        assert!(err.to_string().contains("agiqa.preprocessing"), "{err}");
        let mut props = sample().to_props();
        props.insert("agiqa.format_version".into(), "99".into());
        assert!(matches!(
            ModelMetadata::from_props(&props),
            Err(MetadataError::UnsupportedVersion { found: 99, .. })
        ));
    }

    #[test]
    fn format_1_metadata_keeps_format_1_preprocessing() {
        // Props as a format-1 exporter wrote them: no conversion fields in the preprocessing.
        let mut props = sample().to_props();
        props.insert("agiqa.format_version".into(), "1".into());
        props.insert(
            "agiqa.preprocessing".into(),
            r#"{"image_size":224,"resize":"shorter_side","interpolation":"bicubic","crop":"center","mean":[0.48145467,0.4578275,0.40821072],"std":[0.26862955,0.2613026,0.2757771],"alpha_background":"white"}"#.into(),
        );
        let meta = ModelMetadata::from_props(&props).unwrap();
        assert_eq!(meta.format_version, 1);
        assert_eq!(
            meta.preprocessing,
            Preprocessing::default().with_format_1_conversion()
        );
        // What this version writes converts as PIL does, and keys added later are ignored.
        let mut props = sample().to_props();
        assert_eq!(props["agiqa.format_version"], "2");
        props.insert("agiqa.pruning".into(), r#"{"sparsity":0.5}"#.into());
        let meta = ModelMetadata::from_props(&props).unwrap();
        assert_eq!(meta.preprocessing, Preprocessing::default());
        assert_eq!(meta, sample());
    }

    #[test]
    fn quantization_round_trips_and_float_graphs_have_none() {
        assert!(!sample().to_props().contains_key("agiqa.quantization"));
        let mut meta = sample();
        meta.quantization = Some(Quantization {
            mode: Int8Mode::Dynamic,
            weights: "int8, symmetric, per output channel".into(),
            activations: "uint8, per tensor, at run time".into(),
            providers: vec!["cpu".into()],
            int8_layers: 48,
            float_layers: vec![FloatLayer {
                layer: "visual.conv1".into(),
                reason: "measured".into(),
            }],
            calibration: None,
            accuracy: None,
        });
        let props = meta.to_props();
        let back = ModelMetadata::from_props(&props).unwrap();
        assert_eq!(back, meta);
        let quantization = back.quantization.unwrap();
        assert!(quantization.supports("cpu") && !quantization.supports("tensorrt"));
        let mut props = props;
        props.insert("agiqa.quantization".into(), "{".into());
        let err = ModelMetadata::from_props(&props).unwrap_err();
        assert!(err.to_string().contains("agiqa.quantization"), "{err}");
    }
}
