//! Verification: the exported graph, run by ONNX Runtime (located and loaded by the runtime
//! crate), against the trainer's tch forward on the same inputs — random tensors and
//! synthetic images through the shared preprocessing.

use std::path::Path;

use agiqa_runtime::preprocess::{Preprocessing, Preprocessor};
use agiqa_trainer::synthetic_images::{procedural_scene, Distortion, SplitMix64};
use image::RgbImage;
use serde::Serialize;
use tch::{Kind, Tensor};

use agiqa_runtime::metadata::OUTPUT_IMAGE_FEATURES;

use crate::export::{HeadSource, InputKind};
use crate::graph::Precision;
use crate::ExportError;

/// fp32 graphs must agree with the trainer to this absolute difference, in MOS units.
pub const FP32_MAX_ABS: f64 = 1e-4;
/// fp16 graphs must agree to this relative difference: `|onnx − torch|` over the span of the
/// head's score scale (AGIQA-3K: 5 MOS points). Relative to the score itself would blow up
/// near a scale's zero, which says nothing about the export.
pub const FP16_MAX_REL: f64 = 2e-2;

/// How many inputs of each kind to compare.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Random input tensors compared in one batch (at least 1).
    pub batch: usize,
    /// Synthetic images compared through the shared preprocessing (0: none).
    pub synthetic_images: usize,
    /// Seed of the random tensors and synthetic scenes.
    pub seed: u64,
    /// `libonnxruntime.so` to use (default: the runtime's search order).
    pub ort_lib: Option<std::path::PathBuf>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            batch: 4,
            synthetic_images: 6,
            seed: 7,
            ort_lib: None,
        }
    }
}

/// One comparison: `[N, H]` scores from both sides.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyCase {
    pub label: String,
    pub images: usize,
    pub max_abs: f64,
    pub max_rel: f64,
}

/// Every comparison of one verification, and whether the graph passed.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The graph's precision, which sets the criterion.
    pub precision: Precision,
    pub cases: Vec<VerifyCase>,
    /// The criterion: `max_abs ≤ 1e-4` (fp32) or `max_rel ≤ 2e-2` (fp16, relative to the
    /// score scale's span).
    pub criterion: String,
    pub passed: bool,
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for case in &self.cases {
            writeln!(
                f,
                "  {:<36} {:>3} images  max |Δ| {:.3e}  max |Δ|/span {:.3e}",
                case.label, case.images, case.max_abs, case.max_rel
            )?;
        }
        write!(
            f,
            "  {} ({}): {}",
            if self.passed { "PASSED" } else { "FAILED" },
            match self.precision {
                Precision::Fp32 => "fp32",
                Precision::Fp16 => "fp16",
            },
            self.criterion
        )
    }
}

/// One verification input: what the graph takes (`graph_input`) and the normalised
/// `[N, 3, R, R]` pixels the trainer takes.
struct Batch {
    label: String,
    graph_input: GraphInput,
    pixels: Tensor,
}

enum GraphInput {
    Float(Vec<f32>),
    Uint8(Vec<u8>),
}

/// Normalised NCHW pixels of `[R, R]` crops, through the shared preprocessing.
fn normalise(preprocessor: &Preprocessor, crops: &[RgbImage], size: i64) -> Tensor {
    let plane = 3 * (size * size) as usize;
    let mut values = vec![0f32; crops.len() * plane];
    for (crop, out) in crops.iter().zip(values.chunks_exact_mut(plane)) {
        preprocessor.normalize_into(crop, out);
    }
    Tensor::from_slice(&values).view([crops.len() as i64, 3, size, size])
}

/// NHWC bytes of `[R, R]` crops.
fn nhwc(crops: &[RgbImage]) -> Vec<u8> {
    crops
        .iter()
        .flat_map(|c| c.as_raw().iter().copied())
        .collect()
}

fn batches(
    input: InputKind,
    preprocessing: &Preprocessing,
    options: &VerifyOptions,
) -> Result<Vec<Batch>, ExportError> {
    let size = preprocessing.image_size;
    let r = i64::from(size);
    let preprocessor = Preprocessor::new(preprocessing.clone());
    let mut rng = SplitMix64::new(options.seed);
    let mut out = Vec::new();

    // Random inputs: arbitrary pixels (float: any normalised values; uint8: any bytes).
    let n = options.batch.max(1);
    match input {
        InputKind::PixelValues => {
            let values: Vec<f32> = (0..n * 3 * (r * r) as usize)
                .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0)
                .collect();
            out.push(Batch {
                label: "random tensors".into(),
                pixels: Tensor::from_slice(&values).view([n as i64, 3, r, r]),
                graph_input: GraphInput::Float(values),
            });
        }
        InputKind::PixelsUint8 => {
            let crops: Vec<RgbImage> = (0..n)
                .map(|_| {
                    let bytes = (0..3 * size * size)
                        .map(|_| (rng.next_u64() >> 56) as u8)
                        .collect();
                    RgbImage::from_raw(size, size, bytes).expect("buffer sized for the image")
                })
                .collect();
            out.push(Batch {
                label: "random pixels".into(),
                pixels: normalise(&preprocessor, &crops, r),
                graph_input: GraphInput::Uint8(nhwc(&crops)),
            });
        }
    }

    // Synthetic images of several sizes and distortions, resized and cropped as in serving.
    let distortions = [
        Distortion::Blur(0.0),
        Distortion::Blur(2.5),
        Distortion::Noise(18.0),
        Distortion::Jpeg(15),
        Distortion::ColourShift(40.0),
    ];
    let sizes = [(320, 240), (224, 224), (200, 360), (512, 288)];
    let crops = (0..options.synthetic_images)
        .map(|i| {
            let (w, h) = sizes[i % sizes.len()];
            let scene = procedural_scene(options.seed + i as u64, w, h);
            let image = distortions[i % distortions.len()].apply(&scene, i as u64);
            preprocessor
                .resize_and_crop(&image)
                .map_err(|e| ExportError::Internal(format!("preprocessing a synthetic image: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !crops.is_empty() {
        let pixels = normalise(&preprocessor, &crops, r);
        let graph_input = match input {
            InputKind::PixelValues => GraphInput::Float(
                Vec::<f32>::try_from(pixels.view([-1]))
                    .map_err(|e| ExportError::Internal(e.to_string()))?,
            ),
            InputKind::PixelsUint8 => GraphInput::Uint8(nhwc(&crops)),
        };
        out.push(Batch {
            label: "synthetic images".into(),
            pixels,
            graph_input,
        });
    }
    Ok(out)
}

/// Runs the graph at `model_path` and each head's trainer forward on the same inputs.
pub fn verify(
    model_path: &Path,
    heads: &[HeadSource],
    input: InputKind,
    precision: Precision,
    options: &VerifyOptions,
) -> Result<VerifyReport, ExportError> {
    let first = heads.first().ok_or(ExportError::NoCheckpoints)?;
    agiqa_runtime::onnxruntime::init(options.ort_lib.as_deref())?;
    let environment = agiqa_runtime::onnxruntime::environment().ok_or_else(|| {
        ExportError::Internal("ONNX Runtime initialised without an environment".into())
    })?;
    let mut session = ort::session::Session::builder(environment)?.commit_from_file(model_path)?;
    let input_name = session.inputs()[0].name().to_string();
    let size = i64::from(first.checkpoint.meta.preprocessing.image_size);
    let mut cases = Vec::new();
    for batch in batches(input, &first.checkpoint.meta.preprocessing, options)? {
        let n = batch.pixels.size()[0];
        let expected = Tensor::stack(
            &heads
                .iter()
                .map(|h| {
                    h.checkpoint
                        .model
                        .predict(&batch.pixels)
                        .to_kind(Kind::Double)
                })
                .collect::<Vec<_>>(),
            1,
        )
        .to_device(tch::Device::Cpu);
        let expected = Vec::<f64>::try_from(expected.view([-1]))
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        let value: ort::value::DynValue = match batch.graph_input {
            GraphInput::Float(values) => {
                ort::value::Tensor::from_array((vec![n, 3, size, size], values))?.into_dyn()
            }
            GraphInput::Uint8(bytes) => {
                ort::value::Tensor::from_array((vec![n, size, size, 3], bytes))?.into_dyn()
            }
        };
        let outputs = session.run(ort::inputs![input_name.as_str() => value])?;
        if let Some(features) = outputs.get(OUTPUT_IMAGE_FEATURES) {
            // The encoder alone, before any head can flatten differences.
            let (_, got) = features.try_extract_tensor::<f32>()?;
            let expected = Vec::<f32>::try_from(
                first
                    .checkpoint
                    .model
                    .image_features(&batch.pixels)
                    .to_device(tch::Device::Cpu)
                    .view([-1]),
            )
            .map_err(|e| ExportError::Internal(e.to_string()))?;
            let max_abs = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| f64::from((a - b).abs()))
                .fold(0.0, f64::max);
            // Unit vectors: the absolute difference is already relative.
            cases.push(VerifyCase {
                label: format!("{} (image features)", batch.label),
                images: n as usize,
                max_abs,
                max_rel: max_abs,
            });
        }
        let (_, got) = outputs[0].try_extract_tensor::<f32>()?;
        if got.len() != expected.len() {
            return Err(ExportError::Internal(format!(
                "the graph returned {} scores for {n} images and {} heads",
                got.len(),
                heads.len()
            )));
        }
        let spans: Vec<f64> = heads
            .iter()
            .map(|h| {
                let (min, max) = h.checkpoint.meta.score_scale;
                (max - min).abs().max(f64::MIN_POSITIVE)
            })
            .collect();
        let (mut max_abs, mut max_rel) = (0f64, 0f64);
        for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
            let diff = (f64::from(g) - e).abs();
            max_abs = max_abs.max(diff);
            max_rel = max_rel.max(diff / spans[i % spans.len()]);
        }
        cases.push(VerifyCase {
            label: batch.label,
            images: n as usize,
            max_abs,
            max_rel,
        });
    }
    let (criterion, passed) = match precision {
        Precision::Fp32 => (
            format!("max |Δ| ≤ {FP32_MAX_ABS:e}"),
            cases.iter().all(|c| c.max_abs <= FP32_MAX_ABS),
        ),
        Precision::Fp16 => (
            format!("max |Δ| / score-scale span ≤ {FP16_MAX_REL:e}"),
            cases.iter().all(|c| c.max_rel <= FP16_MAX_REL),
        ),
    };
    Ok(VerifyReport {
        precision,
        cases,
        criterion,
        passed,
    })
}

/// The int8 accuracy budget, against the fp32 graph on held-out images.
#[derive(Clone, Debug, Serialize)]
pub struct Int8Budget {
    /// Spearman correlation of int8 with fp32 scores, per head, at least this.
    pub min_srcc_vs_fp32: f64,
    /// Cosine of int8 and fp32 image features, for every image, at least this.
    pub min_feature_cosine: f64,
    /// `|int8 − fp32|` over the score scale's span, for every score, at most this.
    pub max_delta_over_span: f64,
    /// `|SRCC(int8, MOS) − SRCC(fp32, MOS)|`, where the images have MOS, at most this.
    pub max_srcc_vs_mos_change: f64,
}

impl Default for Int8Budget {
    fn default() -> Self {
        Int8Budget {
            min_srcc_vs_fp32: 0.99,
            min_feature_cosine: 0.999,
            max_delta_over_span: 0.01,
            max_srcc_vs_mos_change: 0.005,
        }
    }
}

/// Held-out images as crops, with their MOS where known.
pub struct HeldOut {
    pub label: String,
    pub crops: Vec<RgbImage>,
    pub mos: Option<Vec<f64>>,
}

/// Scores `[N, H]` (row-major) and features `[N, E]` of one graph over `held_out`.
fn scores_and_features(
    model: &crate::onnx_proto::ModelProto,
    input: InputKind,
    preprocessor: &Preprocessor,
    held_out: &HeldOut,
    ort_lib: Option<&Path>,
) -> Result<(Vec<f32>, Vec<f32>), ExportError> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| ExportError::Internal("model without a graph".into()))?;
    let score_name = graph
        .output
        .first()
        .and_then(|o| o.name.clone())
        .ok_or_else(|| ExportError::Internal("graph without outputs".into()))?;
    let size = preprocessor.config().image_size;
    let mut session = crate::session::GraphSession::new(model, input, size, ort_lib)?;
    let (mut scores, mut features) = (Vec::new(), Vec::new());
    for batch in held_out.crops.chunks(crate::session::BATCH) {
        let mut out = session.run(
            batch,
            preprocessor,
            &[score_name.as_str(), OUTPUT_IMAGE_FEATURES],
        )?;
        scores.extend(out.remove(&score_name).unwrap_or_default());
        features.extend(out.remove(OUTPUT_IMAGE_FEATURES).unwrap_or_default());
    }
    Ok((scores, features))
}

/// Compares the int8 graph with the fp32 graph it came from (both with `image_features`) on
/// `held_out`; `spans` are the heads' score-scale spans, in output order.
#[allow(clippy::too_many_arguments)]
pub fn int8_accuracy(
    fp32: &crate::onnx_proto::ModelProto,
    int8: &crate::onnx_proto::ModelProto,
    input: InputKind,
    preprocessor: &Preprocessor,
    held_out: &HeldOut,
    spans: &[f64],
    budget: &Int8Budget,
    ort_lib: Option<&Path>,
) -> Result<agiqa_runtime::metadata::Int8Accuracy, ExportError> {
    use agiqa_runtime::metrics::spearman;
    let n = held_out.crops.len();
    if n < 2 || spans.is_empty() {
        return Err(ExportError::Unsupported(
            "the int8 budget needs at least two held-out images".into(),
        ));
    }
    let (reference, reference_features) =
        scores_and_features(fp32, input, preprocessor, held_out, ort_lib)?;
    let (quantised, quantised_features) =
        scores_and_features(int8, input, preprocessor, held_out, ort_lib)?;
    let heads = spans.len();
    if reference.len() != n * heads || quantised.len() != n * heads {
        return Err(ExportError::Internal(format!(
            "expected {n}×{heads} scores, got {} and {}",
            reference.len(),
            quantised.len()
        )));
    }
    let column = |values: &[f32], h: usize| -> Vec<f64> {
        values
            .iter()
            .skip(h)
            .step_by(heads)
            .map(|&v| f64::from(v))
            .collect()
    };
    let (mut srcc_vs_fp32, mut max_delta, mut mos_change) = (f64::INFINITY, 0f64, None::<f64>);
    for (h, span) in spans.iter().enumerate() {
        let (a, b) = (column(&reference, h), column(&quantised, h));
        srcc_vs_fp32 = srcc_vs_fp32.min(spearman(&b, &a));
        for (x, y) in a.iter().zip(&b) {
            max_delta = max_delta.max((x - y).abs() / span.abs().max(f64::MIN_POSITIVE));
        }
        if let Some(mos) = &held_out.mos {
            let change = (spearman(&b, mos) - spearman(&a, mos)).abs();
            mos_change = Some(mos_change.map_or(change, |c: f64| c.max(change)));
        }
    }
    let dim = reference_features.len() / n;
    let cosines: Vec<f64> = reference_features
        .chunks(dim.max(1))
        .zip(quantised_features.chunks(dim.max(1)))
        .map(|(a, b)| {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum();
            let na: f64 = a.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
            dot / (na * nb).max(f64::MIN_POSITIVE)
        })
        .collect();
    let cosine_min = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    let cosine_mean = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
    // NaN (a constant column) fails every comparison below, as it should.
    let within_budget = srcc_vs_fp32 >= budget.min_srcc_vs_fp32
        && cosine_min >= budget.min_feature_cosine
        && max_delta <= budget.max_delta_over_span
        && mos_change.is_none_or(|c| c <= budget.max_srcc_vs_mos_change);
    Ok(agiqa_runtime::metadata::Int8Accuracy {
        images: held_out.label.clone(),
        count: n,
        srcc_vs_fp32,
        feature_cosine_min: cosine_min,
        feature_cosine_mean: cosine_mean,
        max_abs_delta_over_span: max_delta,
        srcc_vs_mos_change: mos_change,
        within_budget,
    })
}

/// The figures against the budget, one per line.
pub fn describe_accuracy(
    accuracy: &agiqa_runtime::metadata::Int8Accuracy,
    budget: &Int8Budget,
) -> String {
    let mark = |ok: bool| if ok { "ok" } else { "OVER BUDGET" };
    let mut lines = vec![
        format!(
            "  held-out images: {} ({})",
            accuracy.count, accuracy.images
        ),
        format!(
            "  SRCC(int8, fp32 scores)      {:.5}  (≥ {})  {}",
            accuracy.srcc_vs_fp32,
            budget.min_srcc_vs_fp32,
            mark(accuracy.srcc_vs_fp32 >= budget.min_srcc_vs_fp32)
        ),
        format!(
            "  image-feature cosine min     {:.6}  (≥ {}; mean {:.6})  {}",
            accuracy.feature_cosine_min,
            budget.min_feature_cosine,
            accuracy.feature_cosine_mean,
            mark(accuracy.feature_cosine_min >= budget.min_feature_cosine)
        ),
        format!(
            "  max |Δscore| / scale span    {:.5}  (≤ {})  {}",
            accuracy.max_abs_delta_over_span,
            budget.max_delta_over_span,
            mark(accuracy.max_abs_delta_over_span <= budget.max_delta_over_span)
        ),
    ];
    lines.push(match accuracy.srcc_vs_mos_change {
        Some(c) => format!(
            "  |ΔSRCC vs MOS|               {c:.5}  (≤ {})  {}",
            budget.max_srcc_vs_mos_change,
            mark(c <= budget.max_srcc_vs_mos_change)
        ),
        None => "  |ΔSRCC vs MOS|               n/a (the held-out images have no MOS)".into(),
    });
    lines.join("\n")
}
