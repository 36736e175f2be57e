//! Assembling the graph: input adapter → image tower → L2 normalisation → folded heads, with
//! the model metadata the runtime reads.

use std::path::Path;

pub use agiqa_runtime::metadata::InputKind;
use agiqa_runtime::metadata::{
    HeadInfo, ModelMetadata, ScoreScale, INPUT_PIXELS_UINT8, INPUT_PIXEL_VALUES,
    METADATA_FORMAT_VERSION, OUTPUT_IMAGE_FEATURES, OUTPUT_SCORE, OUTPUT_SCORES,
};
use agiqa_trainer::checkpoint::{CheckpointMeta, LoadedCheckpoint};
use agiqa_trainer::clip::VisionConfig;
use agiqa_trainer::model::Variant;

use crate::check_name;
use crate::fold::{fold_head, host, FoldedHead};
use crate::graph::{
    attr_int, attr_ints, value_info, AttentionOps, GraphBuilder, Precision, Weights,
    MICROSOFT_DOMAIN,
};
use crate::onnx_proto::{
    data_type, GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto,
};
use crate::vision::{modified_resnet, vision_transformer};
use crate::ExportError;

/// Opset 17: the first with `LayerNormalization`, supported by ONNX Runtime ≥ 1.13,
/// TensorRT ≥ 8.6 and Triton's ONNX backend.
pub const OPSET: i64 = 17;
/// The IR version that goes with opset 17.
pub const IR_VERSION: i64 = 8;
/// Protobuf cannot hold a message over 2 GiB; we do not write external-data files.
const PROTOBUF_LIMIT: usize = (1 << 31) - (1 << 20);

/// What graph to build from the checkpoints.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Image encoder precision (the head always runs in fp32).
    pub precision: Precision,
    /// The graph's input: normalised float32 NCHW, or uint8 NHWC normalised in the graph.
    pub input: InputKind,
    /// Also output the L2-normalised image embeddings, `image_features` `[N, E]`.
    pub image_features: bool,
    /// Plain opset attention (every runtime), or ONNX Runtime's fused contrib op (ViT only).
    pub attention: AttentionOps,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            precision: Precision::Fp32,
            input: InputKind::PixelValues,
            image_features: false,
            attention: AttentionOps::Plain,
        }
    }
}

/// One checkpoint to export as a named head.
pub struct HeadSource<'a> {
    /// Output column name, e.g. `quality`.
    pub name: String,
    pub checkpoint: &'a LoadedCheckpoint,
}

/// The built graph and the metadata written into it.
pub struct ExportedModel {
    pub proto: ModelProto,
    pub metadata: ModelMetadata,
}

impl ExportedModel {
    /// Name of the graph's only input.
    pub fn input_name(&self) -> &str {
        let graph = self.proto.graph.as_ref();
        graph
            .and_then(|g| g.input.first())
            .and_then(|i| i.name.as_deref())
            .unwrap_or_default()
    }
}

/// SHA-256 of a checkpoint's tensors file (`<stem>.safetensors`).
fn checkpoint_sha256(stem: &Path) -> Result<String, ExportError> {
    agiqa_trainer::checkpoint::tensors_sha256(stem).map_err(|source| ExportError::Checkpoint {
        path: stem.to_path_buf(),
        source,
    })
}

/// Checks that checkpoint `b` can share checkpoint `a`'s image encoder: the same CLIP weights
/// (by the SHA-256 each checkpoint records) and the same preprocessing. Callers may run it on
/// the descriptions alone, before loading any CLIP.
pub fn check_shared_encoder(
    (a_path, a): (&Path, &CheckpointMeta),
    (b_path, b): (&Path, &CheckpointMeta),
) -> Result<(), ExportError> {
    if a.clip_sha256 != b.clip_sha256 {
        return Err(ExportError::Incompatible(format!(
            "{} was trained on CLIP {} (SHA-256 {}), {} on {} (SHA-256 {}); heads of one graph \
             must share the same image encoder weights",
            a_path.display(),
            a.clip_name,
            a.clip_sha256,
            b_path.display(),
            b.clip_name,
            b.clip_sha256
        )));
    }
    if a.preprocessing != b.preprocessing {
        return Err(ExportError::Incompatible(format!(
            "{} and {} use different preprocessing ({:?} vs {:?}); one graph has one input",
            a_path.display(),
            b_path.display(),
            a.preprocessing,
            b.preprocessing
        )));
    }
    Ok(())
}

/// Checks that the heads can share one image encoder and have distinct names.
fn check_heads(heads: &[HeadSource]) -> Result<(), ExportError> {
    let first = heads.first().ok_or(ExportError::NoCheckpoints)?;
    for (i, head) in heads.iter().enumerate() {
        check_name("head name", &head.name)?;
        if heads[..i].iter().any(|h| h.name == head.name) {
            return Err(ExportError::Unsupported(format!(
                "two heads are named {:?}; name them with NAME=CHECKPOINT",
                head.name
            )));
        }
        check_shared_encoder(
            (&first.checkpoint.path, &first.checkpoint.meta),
            (&head.checkpoint.path, &head.checkpoint.meta),
        )?;
    }
    Ok(())
}

/// Builds the graph for `heads` (one or more checkpoints on the same CLIP).
pub fn build_model(
    heads: &[HeadSource],
    options: &ExportOptions,
) -> Result<ExportedModel, ExportError> {
    check_heads(heads)?;
    let first = heads[0].checkpoint;
    let clip = first.model.clip();
    let config = clip.config();
    let preprocessing = first.meta.preprocessing.clone();
    let resolution = config.image_resolution();
    if i64::from(preprocessing.image_size) != resolution {
        return Err(ExportError::Mismatch(format!(
            "{} preprocesses to {} pixels but its CLIP takes {resolution}",
            first.path.display(),
            preprocessing.image_size
        )));
    }
    let weights: Weights = clip
        .named_tensors()
        .into_iter()
        .filter(|(name, _)| name.starts_with("visual."))
        .map(|(name, tensor)| host(&tensor).map(|t| (name, t)))
        .collect::<Result<_, _>>()?;

    let mut g = GraphBuilder::new(options.precision);
    let (input, input_info) = input_adapter(&mut g, options, &preprocessing, resolution)?;
    let features = match &config.vision {
        VisionConfig::Vit(vit) => {
            vision_transformer(&mut g, &weights, vit, &input, options.attention)?
        }
        VisionConfig::ResNet(_) if options.attention != AttentionOps::Plain => {
            return Err(ExportError::Unsupported(
                "fused com.microsoft attention is written for ViT towers only; \
                 ModifiedResNet's one-query attention pool stays plain"
                    .into(),
            ))
        }
        VisionConfig::ResNet(resnet) => modified_resnet(&mut g, &weights, resnet, &input)?,
    };

    // The head runs in fp32 in both precisions: it is tiny, and the scores are the product.
    g.set_scope("head");
    let features = match options.precision {
        Precision::Fp32 => features,
        Precision::Fp16 => g.cast(&features, data_type::FLOAT)?,
    };
    let norm = g.node(
        "ReduceL2",
        &[&features],
        vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
    )?;
    let features = g.node("Div", &[&features, &norm], vec![])?;

    let mut columns = Vec::with_capacity(heads.len());
    for head in heads {
        let folded = fold_head(&head.checkpoint.model)?;
        g.set_scope(&format!("heads.{}", head.name));
        columns.push(emit_head(&mut g, &head.name, &folded, &features)?);
    }
    g.set_scope("");
    let embed_dim = clip.config().embed_dim;
    let mut outputs = Vec::with_capacity(2);
    outputs.push(if heads.len() == 1 {
        let flat = g.shape_constant(&[-1])?;
        g.node_named("Reshape", &[&columns[0], &flat], vec![], OUTPUT_SCORE)?;
        value_info(OUTPUT_SCORE, data_type::FLOAT, &[None])
    } else {
        let refs: Vec<&str> = columns.iter().map(String::as_str).collect();
        g.node_named("Concat", &refs, vec![attr_int("axis", 1)], OUTPUT_SCORES)?;
        value_info(
            OUTPUT_SCORES,
            data_type::FLOAT,
            &[None, Some(heads.len() as i64)],
        )
    });
    if options.image_features {
        g.node_named("Identity", &[&features], vec![], OUTPUT_IMAGE_FEATURES)?;
        outputs.push(value_info(
            OUTPUT_IMAGE_FEATURES,
            data_type::FLOAT,
            &[None, Some(embed_dim)],
        ));
    }

    let mut metadata = metadata(heads)?;
    metadata.attention = Some(options.attention.metadata_name().into());
    let mut opset_import = vec![OperatorSetIdProto {
        domain: Some(String::new()),
        version: Some(OPSET),
    }];
    if g.uses_microsoft_ops() {
        opset_import.push(OperatorSetIdProto {
            domain: Some(MICROSOFT_DOMAIN.into()),
            version: Some(1),
        });
    }
    let (node, initializer) = g.into_parts();
    let size: usize = initializer
        .iter()
        .map(|t| t.raw_data.as_ref().map_or(0, Vec::len))
        .sum();
    if size > PROTOBUF_LIMIT {
        return Err(ExportError::Unsupported(format!(
            "the weights take {:.2} GB, over protobuf's 2 GB limit for one .onnx file; \
             export with --fp16",
            size as f64 / 1e9
        )));
    }
    let head_list: Vec<&str> = heads.iter().map(|h| h.name.as_str()).collect();
    let graph = GraphProto {
        node,
        name: Some("clip_agiqa".into()),
        initializer,
        doc_string: Some(format!(
            "CLIP-AGIQA {} image encoder with folded head(s) [{}]; input {} ({}), {} precision.",
            metadata.backbone,
            head_list.join(", "),
            input_info.name.as_deref().unwrap_or_default(),
            match options.input {
                InputKind::PixelValues => "float32 NCHW, normalised",
                InputKind::PixelsUint8 => "uint8 NHWC, resized and cropped RGB",
            },
            match options.precision {
                Precision::Fp32 => "fp32",
                Precision::Fp16 => "fp16",
            }
        )),
        input: vec![input_info],
        output: outputs,
    };
    let metadata_props = metadata_props(&metadata);
    let proto = ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import,
        producer_name: Some("agiqa-exporter".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        domain: None,
        model_version: Some(1),
        doc_string: Some(format!(
            "CLIP-AGIQA quality model; scores in MOS units per head: {}",
            head_list.join(", ")
        )),
        graph: Some(graph),
        metadata_props,
    };
    Ok(ExportedModel { proto, metadata })
}

/// The graph input and the nodes that turn it into the encoder's normalised NCHW pixels.
fn input_adapter(
    g: &mut GraphBuilder,
    options: &ExportOptions,
    preprocessing: &agiqa_runtime::preprocess::Preprocessing,
    resolution: i64,
) -> Result<(String, crate::onnx_proto::ValueInfoProto), ExportError> {
    g.set_scope("input");
    let r = Some(resolution);
    let (pixels, info) = match options.input {
        InputKind::PixelValues => (
            INPUT_PIXEL_VALUES.to_string(),
            value_info(INPUT_PIXEL_VALUES, data_type::FLOAT, &[None, Some(3), r, r]),
        ),
        InputKind::PixelsUint8 => {
            // (v/255 − mean)/std = v·(1/(255·std)) − mean/std, per channel.
            let scale: Vec<f32> = (0..3)
                .map(|c| 1.0 / (255.0 * preprocessing.std[c]))
                .collect();
            let offset: Vec<f32> = (0..3)
                .map(|c| -preprocessing.mean[c] / preprocessing.std[c])
                .collect();
            let nchw = g.node(
                "Transpose",
                &[INPUT_PIXELS_UINT8],
                vec![attr_ints("perm", &[0, 3, 1, 2])],
            )?;
            let wide = g.cast(&nchw, data_type::FLOAT)?;
            let scale = g.constant_f32("input.scale", &[1, 3, 1, 1], &scale)?;
            let offset = g.constant_f32("input.offset", &[1, 3, 1, 1], &offset)?;
            let scaled = g.node("Mul", &[&wide, &scale], vec![])?;
            (
                g.node("Add", &[&scaled, &offset], vec![])?,
                value_info(INPUT_PIXELS_UINT8, data_type::UINT8, &[None, r, r, Some(3)]),
            )
        }
    };
    let pixels = match options.precision {
        Precision::Fp32 => pixels,
        Precision::Fp16 => g.cast(&pixels, data_type::FLOAT16)?,
    };
    Ok((pixels, info))
}

/// One folded head on normalised fp32 `[N, E]` features → `[N, 1]`.
fn emit_head(
    g: &mut GraphBuilder,
    name: &str,
    head: &FoldedHead,
    features: &str,
) -> Result<String, ExportError> {
    let prefix = format!("heads.{name}");
    match head {
        FoldedHead::Regression {
            image_weight,
            bias,
            out_weight,
            out_bias,
        } => {
            let a = g.constant_f32(
                &format!("{prefix}.fc1.image_weight_folded"),
                &image_weight.dims,
                &image_weight.values,
            )?;
            let c = g.constant_f32(
                &format!("{prefix}.fc1.bias_folded"),
                &bias.dims,
                &bias.values,
            )?;
            let w = g.constant_f32(
                &format!("{prefix}.fc2.weight_t"),
                &out_weight.dims,
                &out_weight.values,
            )?;
            let b = g.constant_f32(
                &format!("{prefix}.fc2.bias"),
                &out_bias.dims,
                &out_bias.values,
            )?;
            let h = g.node("MatMul", &[features, &a], vec![])?;
            let h = g.node("Add", &[&h, &c], vec![])?;
            let h = g.node("Relu", &[&h], vec![])?;
            let y = g.node("MatMul", &[&h, &w], vec![])?;
            g.node("Add", &[&y, &b], vec![])
        }
        FoldedHead::Softmax { text, centres } => {
            let t = g.constant_f32(
                &format!("{prefix}.text_features_scaled"),
                &text.dims,
                &text.values,
            )?;
            let centres = g.constant_f32(
                &format!("{prefix}.class_scores"),
                &centres.dims,
                &centres.values,
            )?;
            let logits = g.node("MatMul", &[features, &t], vec![])?;
            let p = g.node("Softmax", &[&logits], vec![attr_int("axis", -1)])?;
            g.node("MatMul", &[&p, &centres], vec![])
        }
    }
}

fn metadata(heads: &[HeadSource]) -> Result<ModelMetadata, ExportError> {
    let first = &heads[0].checkpoint;
    let infos = heads
        .iter()
        .map(|head| {
            let meta = &head.checkpoint.meta;
            let variant = match meta.model.variant {
                Variant::Regression => "regression",
                Variant::Classification => "classification",
                Variant::ZeroShot => "zero-shot",
            };
            Ok(HeadInfo {
                name: head.name.clone(),
                scale: ScoreScale {
                    dimension: meta.dimension.clone(),
                    min: meta.score_scale.0,
                    max: meta.score_scale.1,
                    higher_is_better: true,
                },
                dataset: meta.dataset.clone(),
                protocol: Some(meta.protocol.clone()),
                metrics: meta.metrics,
                checkpoint_sha256: Some(checkpoint_sha256(&head.checkpoint.path)?),
                variant: Some(variant.into()),
                categories: Some(meta.model.categories.clone()),
                context_len: Some(meta.model.context_len),
            })
        })
        .collect::<Result<Vec<_>, ExportError>>()?;
    Ok(ModelMetadata {
        format_version: METADATA_FORMAT_VERSION,
        backbone: first.meta.clip_name.clone(),
        categories: first.meta.model.categories.clone(),
        context_len: first.meta.model.context_len,
        preprocessing: first.meta.preprocessing.clone(),
        heads: infos,
        clip_weights_sha256: Some(first.clip_sha256.clone()),
        quantization: None,
        attention: None,
    })
}

/// The metadata as the graph's `metadata_props`.
pub fn metadata_props(metadata: &ModelMetadata) -> Vec<StringStringEntryProto> {
    metadata
        .to_props()
        .into_iter()
        .map(|(key, value)| StringStringEntryProto {
            key: Some(key),
            value: Some(value),
        })
        .collect()
}

/// Writes the model atomically (temporary file, then rename): no partial `.onnx` is left.
/// Returns the bytes written, for callers that also need them (a Triton repository).
pub fn write_model(path: &Path, proto: &ModelProto) -> Result<Vec<u8>, ExportError> {
    let bytes = proto.to_bytes();
    agiqa_runtime::atomic_file::write_atomic(path, &bytes).map_err(|source| {
        ExportError::Write {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(bytes)
}
