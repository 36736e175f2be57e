//! One int8 export: the fp32 graph built as for any export, batch norms folded, activations
//! calibrated (static), the graph rewritten ([`crate::quantize`]), measured against the fp32
//! graph on held-out images, and the metadata told what was done.

use agiqa_runtime::metadata::{Int8Mode, Quantization, OUTPUT_IMAGE_FEATURES};
use agiqa_runtime::preprocess::Preprocessor;

use crate::calibrate::{calibrate, describe, CalibrationOptions};
use crate::export::{build_model, metadata_props, ExportOptions, ExportedModel, HeadSource};
use crate::graph::Precision;
use crate::image_sets::{check_disjoint, crops, held_out, resolve, synthetic_crops, ImageSet};
use crate::quantize::{calibration_tensors, fold_batch_norms, quantize, remove_unused, Int8Plan};
use crate::verify::{int8_accuracy, HeldOut, Int8Budget, VerifyOptions};
use crate::ExportError;

/// The mode `--int8` takes when none is named: the faster of the two on ViT-B/16 on our
/// 2-core CPU (docs/RESULTS.md, "int8": 2.47× vs 2.42× fp32, and no calibration images
/// needed). Neither mode is within the budget on that random-weight, whitened-head model, so
/// speed alone decided.
pub const DEFAULT_INT8_MODE: Int8Mode = Int8Mode::Dynamic;

/// Seed of the synthetic held-out scenes (far from the verification scenes' seeds).
const HELD_OUT_SEED: u64 = 1_000_003;

/// What an int8 export quantises, on which images, against what budget.
#[derive(Clone, Debug)]
pub struct Int8Export {
    pub plan: Int8Plan,
    /// Calibration images (static int8): a folder, a manifest, or the dataset the checkpoint
    /// was trained on (`agiqa3k:<dir>`: its training split).
    pub calibration: Option<String>,
    /// At most this many calibration images (spread over the set).
    pub calibration_images: usize,
    pub calibration_options: CalibrationOptions,
    /// Held-out images for the budget; default: the test split of a dataset given as
    /// calibration, else synthetic scenes.
    pub held_out: Option<String>,
    /// At most this many held-out images.
    pub held_out_images: usize,
    pub budget: Int8Budget,
    /// Write a graph over budget anyway (its metadata says so).
    pub allow_over_budget: bool,
}

impl Int8Export {
    pub fn new(mode: Int8Mode) -> Self {
        Int8Export {
            plan: Int8Plan::new(mode),
            calibration: None,
            calibration_images: 64,
            calibration_options: CalibrationOptions::default(),
            held_out: None,
            held_out_images: 64,
            budget: Int8Budget::default(),
            allow_over_budget: false,
        }
    }
}

/// Builds the int8 graph; with `verify`, measures it against the fp32 graph (the figures go
/// into its metadata). An export over budget is [`ExportError::OverBudget`] unless allowed.
pub fn build_int8_model(
    heads: &[HeadSource],
    export: &ExportOptions,
    int8: &Int8Export,
    verify: Option<&VerifyOptions>,
) -> Result<ExportedModel, ExportError> {
    if export.precision != Precision::Fp32 {
        return Err(ExportError::Unsupported(
            "int8 graphs are quantised from the fp32 graph; drop --fp16".into(),
        ));
    }
    let first = heads.first().ok_or(ExportError::NoCheckpoints)?;
    let meta = &first.checkpoint.meta;
    let preprocessor = Preprocessor::new(meta.preprocessing.clone());
    let ort_lib = verify
        .and_then(|v| v.ort_lib.clone())
        .or_else(|| int8.calibration_options.ort_lib.clone());

    // The reference always carries the image features: the budget compares them.
    let reference = build_model(
        heads,
        &ExportOptions {
            image_features: true,
            ..export.clone()
        },
    )?;
    let reference_graph = reference
        .proto
        .graph
        .as_ref()
        .ok_or_else(|| ExportError::Internal("model without a graph".into()))?;
    let mut prepared = reference.proto.clone();
    prepared.graph = Some(fold_batch_norms(reference_graph)?);
    let prepared_graph = prepared.graph.as_ref().expect("set above");

    let (calibration_set, dataset_test) = match &int8.calibration {
        Some(spec) => {
            let (set, test) = resolve(spec, meta)?;
            (Some(set.spread(int8.calibration_images)), test)
        }
        None => (None, None),
    };
    let (ranges, calibration) = match int8.plan.mode {
        Int8Mode::Dynamic => (None, None),
        Int8Mode::Static => {
            let set = calibration_set.as_ref().ok_or_else(|| {
                ExportError::Unsupported(
                    "static int8 calibrates on real images: pass --calibration with a folder, \
                     a manifest, or the checkpoint's dataset (e.g. agiqa3k:<dir>, whose \
                     training split is used)"
                        .into(),
                )
            })?;
            let images = crops(set, &preprocessor)?;
            let tensors = calibration_tensors(prepared_graph, &int8.plan);
            let ranges = calibrate(
                &prepared,
                &tensors,
                &images,
                &preprocessor,
                export.input,
                &CalibrationOptions {
                    ort_lib: ort_lib.clone(),
                    ..int8.calibration_options.clone()
                },
            )?;
            let info = describe(&set.label, images.len(), &int8.calibration_options);
            (Some(ranges), Some(info))
        }
    };
    let (graph, summary) = quantize(prepared_graph, &int8.plan, ranges.as_ref())?;
    let mut quantised = prepared.clone();
    quantised.graph = Some(graph);

    let accuracy = match verify {
        Some(_) => {
            let held = held_out_images(int8, meta, calibration_set.as_ref(), dataset_test)?;
            let spans: Vec<f64> = heads
                .iter()
                .map(|h| {
                    let (min, max) = h.checkpoint.meta.score_scale;
                    max - min
                })
                .collect();
            Some(int8_accuracy(
                &reference.proto,
                &quantised,
                export.input,
                &preprocessor,
                &held,
                &spans,
                &int8.budget,
                ort_lib.as_deref(),
            )?)
        }
        None => None,
    };
    if let Some(accuracy) = &accuracy {
        if !accuracy.within_budget && !int8.allow_over_budget {
            return Err(ExportError::OverBudget(crate::verify::describe_accuracy(
                accuracy,
                &int8.budget,
            )));
        }
    }

    let (activations, providers) = match int8.plan.mode {
        Int8Mode::Dynamic => (
            "uint8, asymmetric, per tensor, quantised at run time (DynamicQuantizeLinear)",
            vec!["cpu"],
        ),
        Int8Mode::Static => (
            "int8, symmetric (zero point 0), per tensor, calibrated (QDQ)",
            vec!["cpu", "cuda", "tensorrt"],
        ),
    };
    let mut float_layers = summary.float_layers;
    if summary.int8_attention_matmuls > 0 {
        float_layers.retain(|l| !l.layer.starts_with("attention scores"));
    }
    let quantization = Quantization {
        mode: int8.plan.mode,
        weights: "int8, symmetric (zero point 0, ±127), per output channel".into(),
        activations: activations.into(),
        providers: providers.into_iter().map(String::from).collect(),
        int8_layers: summary.int8_layers + summary.int8_attention_matmuls,
        float_layers,
        calibration,
        accuracy,
    };

    let mut proto = quantised;
    let graph = proto.graph.as_mut().expect("set above");
    if !export.image_features {
        graph
            .output
            .retain(|o| o.name.as_deref() != Some(OUTPUT_IMAGE_FEATURES));
        remove_unused(graph);
    }
    graph.doc_string = graph.doc_string.as_ref().map(|d| {
        d.replace(
            "fp32 precision.",
            &format!("int8 ({}) precision.", int8.plan.mode.name()),
        )
    });
    let mut metadata = reference.metadata;
    metadata.quantization = Some(quantization);
    proto.metadata_props = metadata_props(&metadata);
    Ok(ExportedModel { proto, metadata })
}

/// The held-out crops: given, else a calibration dataset's test split,
/// else synthetic scenes. Never calibration images.
fn held_out_images(
    int8: &Int8Export,
    meta: &agiqa_trainer::checkpoint::CheckpointMeta,
    calibration: Option<&ImageSet>,
    dataset_test: Option<ImageSet>,
) -> Result<HeldOut, ExportError> {
    let preprocessor = Preprocessor::new(meta.preprocessing.clone());
    let set = match (&int8.held_out, dataset_test) {
        (Some(spec), _) => Some(held_out(spec, meta)?),
        (None, test) => test,
    };
    match set {
        Some(set) => {
            let set = set.spread(int8.held_out_images);
            if let Some(calibration) = calibration {
                check_disjoint(calibration, &set)?;
            }
            Ok(HeldOut {
                crops: crops(&set, &preprocessor)?,
                label: set.label,
                mos: set.mos,
            })
        }
        None => {
            let n = int8.held_out_images;
            Ok(HeldOut {
                label: format!("{n} synthetic scenes"),
                crops: synthetic_crops(n, HELD_OUT_SEED, &preprocessor)?,
                mos: None,
            })
        }
    }
}
