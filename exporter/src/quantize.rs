//! int8 graphs, as a rewrite of the finished fp32 graph: the tower builders stay one
//! implementation, and the rewrite sees the whole graph (which layer feeds which) to decide
//! what to quantise.
//!
//! Weights are int8, symmetric (range ±127, zero point 0), one scale per output channel.
//! Activations follow the [`Int8Mode`]:
//! - `dynamic`: `DynamicQuantizeLinear` (uint8, per tensor, at run time) → `MatMulInteger` /
//!   `ConvInteger` → `Cast` → `Mul` by both scales, exactly the form ONNX Runtime's own
//!   `quantize_dynamic` writes, so its optimiser fuses it into `DynamicQuantizeMatMul`;
//! - `static`: a `QuantizeLinear` → `DequantizeLinear` pair with a calibrated scale (int8,
//!   symmetric, zero point 0) on each quantised input, and `DequantizeLinear` of the int8
//!   weights: the QDQ form ONNX Runtime and TensorRT both turn into int8 kernels.
//!
//! BatchNormalization after a Conv is folded into the Conv first (int8 Convs cannot be fused
//! with it at load as float Convs are). LayerNorm, softmax, the L2 normalisation and the heads
//! always stay in fp32; the [`Int8Plan`] says which of the optional layers are quantised.

use std::collections::{BTreeMap, HashMap, HashSet};

use agiqa_runtime::metadata::FloatLayer;
pub use agiqa_runtime::metadata::Int8Mode;

use crate::graph::{attr_int, HostTensor};
use crate::onnx_proto::{data_type, AttributeProto, GraphProto, NodeProto, TensorProto};
use crate::ExportError;

/// The int8 range of weights and static activations: symmetric, without −128, as TensorRT
/// requires (and so that `−x` is representable).
const INT8_MAX: f32 = 127.0;

/// Which layers run in int8. Every weight MatMul and Conv of the image tower is quantised
/// except the ones switched off here; the defaults are the measured choice on ViT-B/16
/// (docs/RESULTS.md, "int8").
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Plan {
    pub mode: Int8Mode,
    /// The layer that sees the pixels: the ViT patch embedding, the ResNet's first stem Conv.
    pub input_layer: bool,
    /// The activation × activation MatMuls of attention (`Q·Kᵀ`, `P·V`).
    pub attention_scores: bool,
    /// The tower's last projection to the embedding (`visual.proj`, `visual.attnpool.c_proj`).
    pub output_projection: bool,
}

impl Int8Plan {
    /// The measured default for `mode`.
    pub fn new(mode: Int8Mode) -> Self {
        Int8Plan {
            mode,
            input_layer: false,
            attention_scores: false,
            output_projection: false,
        }
    }
}

/// What [`quantize`] did: counts and the layers left in float, for the metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeSummary {
    /// Weight layers (MatMul, Conv) now in int8.
    pub int8_layers: usize,
    /// Activation × activation MatMuls now in int8.
    pub int8_attention_matmuls: usize,
    pub float_layers: Vec<FloatLayer>,
}

/// `[lo, hi]` of a calibrated activation: static int8 uses `max(|lo|, |hi|)` symmetrically.
pub type ActivationRanges = BTreeMap<String, f32>;

/// One op the plan quantises.
#[derive(Clone, Debug)]
enum Target {
    /// `MatMul(x, W)` with `W` `[in, out]`, possibly written as `Transpose` of an `[out, in]`
    /// initializer (`transposed`).
    Linear { weight: String, transposed: bool },
    /// `Conv(x, W[, b])` with `W` `[O, I, kh, kw]`.
    Conv { weight: String },
    /// `MatMul(a, b)` of two activations.
    ActivationMatMul,
}

/// The graph with every Conv + BatchNormalization pair folded into one Conv.
pub fn fold_batch_norms(graph: &GraphProto) -> Result<GraphProto, ExportError> {
    let inits = initializers(graph);
    let producers = producers(graph);
    let mut folded: HashMap<usize, (String, Vec<String>)> = HashMap::new(); // conv → (output, inputs)
    let mut dropped = HashSet::new();
    let mut new_inits = Vec::new();
    for (bn_index, bn) in graph.node.iter().enumerate() {
        if bn.op_type.as_deref() != Some("BatchNormalization") || bn.input.len() != 5 {
            continue;
        }
        let Some(&conv_index) = producers.get(bn.input[0].as_str()) else {
            continue;
        };
        let conv = &graph.node[conv_index];
        let weight = conv.input.get(1).and_then(|w| inits.get(w.as_str()));
        let params: Option<Vec<HostTensor>> = bn.input[1..]
            .iter()
            .map(|name| inits.get(name.as_str()).and_then(|t| float_tensor(t).ok()))
            .collect();
        let (Some(weight), Some(params)) = (weight, params) else {
            continue;
        };
        if conv.op_type.as_deref() != Some("Conv") || conv.input.len() != 2 {
            continue;
        }
        let epsilon = bn
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some("epsilon"))
            .and_then(|a| a.f)
            .unwrap_or(1e-5);
        let mut w = float_tensor(weight)?;
        let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
        let channels = w.dims[0] as usize;
        let per_channel = w.values.len() / channels.max(1);
        let mut bias = vec![0f32; channels];
        for (c, (b, kernel)) in bias
            .iter_mut()
            .zip(w.values.chunks_mut(per_channel.max(1)))
            .enumerate()
        {
            let k = gamma.values[c] / (var.values[c] + epsilon).sqrt();
            kernel.iter_mut().for_each(|v| *v *= k);
            *b = beta.values[c] - mean.values[c] * k;
        }
        let weight_name = format!("{}.bn_folded", conv.input[1]);
        let bn_prefix = bn.input[1].strip_suffix(".weight").unwrap_or(&bn.input[1]);
        let bias_name = format!("{bn_prefix}.bn_folded_bias");
        new_inits.push(float_initializer(&weight_name, &w.dims, &w.values));
        new_inits.push(float_initializer(&bias_name, &[channels as i64], &bias));
        folded.insert(
            conv_index,
            (
                bn.output[0].clone(),
                vec![conv.input[0].clone(), weight_name, bias_name],
            ),
        );
        dropped.insert(bn_index);
    }
    let mut out = graph.clone();
    out.node = graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| !dropped.contains(i))
        .map(|(i, node)| match folded.get(&i) {
            Some((output, inputs)) => NodeProto {
                input: inputs.clone(),
                output: vec![output.clone()],
                ..node.clone()
            },
            None => node.clone(),
        })
        .collect();
    out.initializer.extend(new_inits);
    remove_unused(&mut out);
    Ok(out)
}

/// The activations whose ranges static int8 needs (the float inputs of every quantised op),
/// in graph order.
pub fn calibration_tensors(graph: &GraphProto, plan: &Int8Plan) -> Vec<String> {
    let (targets, _) = plan_targets(graph, plan);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (index, target) in &targets {
        let node = &graph.node[*index];
        let inputs = match target {
            Target::ActivationMatMul => &node.input[..2],
            _ => &node.input[..1],
        };
        for input in inputs {
            if seen.insert(input.clone()) {
                out.push(input.clone());
            }
        }
    }
    out
}

/// Rewrites `graph` (batch norms already folded) to int8 as `plan` says. Static mode needs the
/// range of every tensor [`calibration_tensors`] lists.
pub fn quantize(
    graph: &GraphProto,
    plan: &Int8Plan,
    ranges: Option<&ActivationRanges>,
) -> Result<(GraphProto, QuantizeSummary), ExportError> {
    let (targets, float_layers) = plan_targets(graph, plan);
    if plan.mode == Int8Mode::Static && ranges.is_none() {
        return Err(ExportError::Internal(
            "static int8 needs calibrated activation ranges".into(),
        ));
    }
    let inits = initializers(graph);
    let mut rewrite = Rewrite {
        mode: plan.mode,
        ranges,
        nodes: Vec::with_capacity(graph.node.len() * 2),
        initializers: Vec::new(),
        activations: HashMap::new(),
    };
    let targets: HashMap<usize, Target> = targets.into_iter().collect();
    let (mut layers, mut attention) = (0, 0);
    for (index, node) in graph.node.iter().enumerate() {
        match targets.get(&index) {
            None => rewrite.nodes.push(node.clone()),
            Some(Target::Linear { weight, transposed }) => {
                let w = float_tensor(inits[weight.as_str()])?;
                rewrite.linear(node, weight, &w, *transposed)?;
                layers += 1;
            }
            Some(Target::Conv { weight }) => {
                let w = float_tensor(inits[weight.as_str()])?;
                let bias = match node.input.get(2) {
                    Some(b) => Some(float_tensor(inits.get(b.as_str()).ok_or_else(|| {
                        ExportError::Unsupported(format!("Conv bias {b} is not an initializer"))
                    })?)?),
                    None => None,
                };
                rewrite.conv(node, weight, &w, bias.as_ref())?;
                layers += 1;
            }
            Some(Target::ActivationMatMul) => {
                rewrite.activation_matmul(node)?;
                attention += 1;
            }
        }
    }
    let mut out = graph.clone();
    out.node = rewrite.nodes;
    out.initializer.extend(rewrite.initializers);
    remove_unused(&mut out);
    Ok((
        out,
        QuantizeSummary {
            int8_layers: layers,
            int8_attention_matmuls: attention,
            float_layers,
        },
    ))
}

/// The ops to quantise (node index → kind) and the layers the plan leaves in float.
fn plan_targets(graph: &GraphProto, plan: &Int8Plan) -> (Vec<(usize, Target)>, Vec<FloatLayer>) {
    let inits = initializers(graph);
    let producers = producers(graph);
    let weight_of_transpose = |name: &str| -> Option<String> {
        let node = &graph.node[*producers.get(name)?];
        let perm = node
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some("perm"));
        let is_2d_swap = perm.is_some_and(|p| p.ints == [1, 0]);
        let w = node.input.first()?;
        (node.op_type.as_deref() == Some("Transpose") && is_2d_swap && is_float_2d(&inits, w))
            .then(|| w.clone())
    };
    let input_layer = input_layer_weight(graph, &inits);
    let mut targets = Vec::new();
    let mut float = vec![
        FloatLayer {
            layer: "LayerNormalization, Softmax, activations, residual adds".into(),
            reason: "no int8 kernels; they are a small share of the time".into(),
        },
        FloatLayer {
            layer: "heads (L2 normalisation and the folded head)".into(),
            reason: "a few hundred thousand multiply-adds per image; the scores are the product"
                .into(),
        },
    ];
    let mut skipped_input = false;
    let mut skipped_projection = false;
    let mut skipped_scores = 0;
    for (index, node) in graph.node.iter().enumerate() {
        let op = node.op_type.as_deref();
        let target = match op {
            Some("MatMul") if node.input.len() == 2 => {
                let b = &node.input[1];
                if let Some(w) = weight_of_transpose(b) {
                    Some(Target::Linear {
                        weight: w,
                        transposed: true,
                    })
                } else if is_float_2d(&inits, b) {
                    Some(Target::Linear {
                        weight: b.clone(),
                        transposed: false,
                    })
                } else if !inits.contains_key(node.input[0].as_str())
                    && !inits.contains_key(b.as_str())
                {
                    Some(Target::ActivationMatMul)
                } else {
                    None
                }
            }
            Some("Conv") if node.input.len() >= 2 && inits.contains_key(node.input[1].as_str()) => {
                Some(Target::Conv {
                    weight: node.input[1].clone(),
                })
            }
            _ => None,
        };
        let Some(target) = target else { continue };
        let keep = match &target {
            Target::Linear { weight, .. } | Target::Conv { weight } => {
                if weight.starts_with("heads.") {
                    false
                } else if Some(weight) == input_layer.as_ref() {
                    skipped_input |= !plan.input_layer;
                    plan.input_layer
                } else if is_output_projection(weight) {
                    skipped_projection |= !plan.output_projection;
                    plan.output_projection
                } else {
                    true
                }
            }
            Target::ActivationMatMul => {
                // Only the tower's attention: the heads' MatMuls take an initializer.
                skipped_scores += usize::from(!plan.attention_scores);
                plan.attention_scores
            }
        };
        if keep {
            targets.push((index, target));
        }
    }
    if skipped_input {
        float.push(FloatLayer {
            layer: input_layer.unwrap_or_default(),
            reason: "the layer that sees the pixels: its error reaches every later layer, and \
                     it is ~1% of the FLOPs"
                .into(),
        });
    }
    if skipped_projection {
        float.push(FloatLayer {
            layer: "output projection (visual.proj / visual.attnpool.c_proj)".into(),
            reason: "one token per image (<0.1% of the FLOPs), and the features come straight \
                     out of it: the most sensitive layer measured"
                .into(),
        });
    }
    if skipped_scores > 0 {
        float.push(FloatLayer {
            layer: format!("attention scores (Q·Kᵀ, P·V; {skipped_scores} MatMuls)"),
            reason: "two activations quantised per MatMul cost more than the int8 product saves, \
                     and softmax inputs are the most sensitive tensors"
                .into(),
        });
    }
    (targets, float)
}

/// The tower's first weight layer: the one whose input comes straight from the graph input
/// (through the uint8 adapter's elementwise ops, if any).
fn input_layer_weight(graph: &GraphProto, inits: &HashMap<&str, &TensorProto>) -> Option<String> {
    graph
        .node
        .iter()
        .find(|n| {
            n.op_type.as_deref() == Some("Conv")
                && n.input
                    .get(1)
                    .is_some_and(|w| inits.contains_key(w.as_str()))
        })
        .map(|n| n.input[1].clone())
}

fn is_output_projection(weight: &str) -> bool {
    weight == "visual.proj" || weight.starts_with("visual.attnpool.c_proj.weight")
}

fn is_float_2d(inits: &HashMap<&str, &TensorProto>, name: &str) -> bool {
    inits
        .get(name)
        .is_some_and(|t| t.dims.len() == 2 && t.data_type == Some(data_type::FLOAT))
}

fn initializers(graph: &GraphProto) -> HashMap<&str, &TensorProto> {
    graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
        .collect()
}

fn producers(graph: &GraphProto) -> HashMap<&str, usize> {
    graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect()
}

fn float_tensor(t: &TensorProto) -> Result<HostTensor, ExportError> {
    let name = t.name.as_deref().unwrap_or_default();
    if t.data_type != Some(data_type::FLOAT) {
        return Err(ExportError::Unsupported(format!(
            "int8 export starts from an fp32 graph; {name} is not fp32"
        )));
    }
    let raw = t.raw_data.as_deref().unwrap_or_default();
    Ok(HostTensor {
        dims: t.dims.clone(),
        values: raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    })
}

fn float_initializer(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: Some(data_type::FLOAT),
        name: Some(name.into()),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

fn int8_initializer(name: &str, dims: &[i64], values: &[i8]) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: Some(data_type::INT8),
        name: Some(name.into()),
        raw_data: Some(values.iter().map(|&v| v as u8).collect()),
    }
}

/// Symmetric per-channel int8 of a weight whose output channel is `axis` of a row-major
/// `[rows, cols]` view (`axis` 0: one channel per row, 1: per column). An all-zero channel
/// gets scale 1 (any scale represents it exactly).
pub fn quantize_per_channel(
    values: &[f32],
    rows: usize,
    cols: usize,
    axis: usize,
) -> (Vec<i8>, Vec<f32>) {
    let channels = if axis == 0 { rows } else { cols };
    let mut max_abs = vec![0f32; channels];
    for (i, v) in values.iter().enumerate() {
        let c = if axis == 0 { i / cols } else { i % cols };
        max_abs[c] = max_abs[c].max(v.abs());
    }
    let scales: Vec<f32> = max_abs
        .iter()
        .map(|&m| if m > 0.0 { m / INT8_MAX } else { 1.0 })
        .collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let c = if axis == 0 { i / cols } else { i % cols };
            (v / scales[c]).round().clamp(-INT8_MAX, INT8_MAX) as i8
        })
        .collect();
    (q, scales)
}

/// `[out, in]` row-major → `[in, out]` row-major.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// The rewrite in progress: nodes in graph order and the new initializers.
struct Rewrite<'a> {
    mode: Int8Mode,
    ranges: Option<&'a ActivationRanges>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Activation → its quantised form (shared by every op that reads it, e.g. K and V).
    activations: HashMap<String, QuantizedActivation>,
}

#[derive(Clone)]
enum QuantizedActivation {
    /// `DynamicQuantizeLinear` outputs: uint8 values, scale, zero point.
    Dynamic {
        values: String,
        scale: String,
        zero_point: String,
    },
    /// The dequantised float tensor after a QDQ pair.
    Static { dequantized: String },
}

impl Rewrite<'_> {
    fn push(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: Some(format!("{}:node", outputs[0])),
            op_type: Some(op.into()),
            domain: None,
            attribute,
        });
    }

    fn activation(&mut self, x: &str) -> Result<QuantizedActivation, ExportError> {
        if let Some(q) = self.activations.get(x) {
            return Ok(q.clone());
        }
        let q = match self.mode {
            Int8Mode::Dynamic => {
                let (values, scale, zero_point) = (
                    format!("{x}.uint8"),
                    format!("{x}.scale"),
                    format!("{x}.zero_point"),
                );
                self.push(
                    "DynamicQuantizeLinear",
                    &[x],
                    &[&values, &scale, &zero_point],
                    vec![],
                );
                QuantizedActivation::Dynamic {
                    values,
                    scale,
                    zero_point,
                }
            }
            Int8Mode::Static => {
                let range =
                    self.ranges.and_then(|r| r.get(x)).copied().ok_or_else(|| {
                        ExportError::Internal(format!("no calibrated range for {x}"))
                    })?;
                let scale_value = if range > 0.0 { range / INT8_MAX } else { 1.0 };
                let scale = format!("{x}.scale");
                let zero_point = format!("{x}.zero_point");
                self.initializers
                    .push(float_initializer(&scale, &[], &[scale_value]));
                self.initializers
                    .push(int8_initializer(&zero_point, &[], &[0]));
                let (quantized, dequantized) = (format!("{x}.int8"), format!("{x}.dequantized"));
                self.push(
                    "QuantizeLinear",
                    &[x, &scale, &zero_point],
                    &[&quantized],
                    vec![],
                );
                self.push(
                    "DequantizeLinear",
                    &[&quantized, &scale, &zero_point],
                    &[&dequantized],
                    vec![],
                );
                QuantizedActivation::Static { dequantized }
            }
        };
        self.activations.insert(x.to_string(), q.clone());
        Ok(q)
    }

    /// int8 weight `[dims]` with per-channel scales along `axis`: (int8 name, scale name).
    fn weight(
        &mut self,
        name: &str,
        dims: &[i64],
        q: &[i8],
        scales: &[f32],
        scale_dims: &[i64],
    ) -> (String, String) {
        let (q_name, s_name) = (format!("{name}.int8"), format!("{name}.scale"));
        self.initializers.push(int8_initializer(&q_name, dims, q));
        self.initializers
            .push(float_initializer(&s_name, scale_dims, scales));
        (q_name, s_name)
    }

    /// Static mode: `DequantizeLinear` of an int8 weight along `axis`.
    fn dequantized_weight(&mut self, q: &str, scale: &str, channels: usize, axis: i64) -> String {
        let zero_point = format!("{q}.zero_point");
        self.initializers.push(int8_initializer(
            &zero_point,
            &[channels as i64],
            &vec![0; channels],
        ));
        let out = format!("{q}.dequantized");
        self.push(
            "DequantizeLinear",
            &[q, scale, &zero_point],
            &[&out],
            vec![attr_int("axis", axis)],
        );
        out
    }

    /// `y_int32 · (x_scale · w_scale)` → `output`, the tail of every dynamic int8 op.
    fn rescale(&mut self, y_int32: &str, x_scale: &str, w_scale: &str, output: &str) {
        let (wide, scale) = (format!("{output}.float"), format!("{output}.rescale"));
        self.push(
            "Cast",
            &[y_int32],
            &[&wide],
            vec![attr_int("to", i64::from(data_type::FLOAT))],
        );
        self.push("Mul", &[x_scale, w_scale], &[&scale], vec![]);
        self.push("Mul", &[&wide, &scale], &[output], vec![]);
    }

    fn linear(
        &mut self,
        node: &NodeProto,
        weight: &str,
        w: &HostTensor,
        transposed: bool,
    ) -> Result<(), ExportError> {
        let (rows, cols) = (w.dims[0] as usize, w.dims[1] as usize);
        // Stored `[in, out]` so that no Transpose of int8 data is left for the runtime.
        let (values, inputs, outputs) = if transposed {
            (transpose(&w.values, rows, cols), cols, rows)
        } else {
            (w.values.clone(), rows, cols)
        };
        let (q, scales) = quantize_per_channel(&values, inputs, outputs, 1);
        let dims = [inputs as i64, outputs as i64];
        let (q, scale) = self.weight(weight, &dims, &q, &scales, &[outputs as i64]);
        let output = &node.output[0];
        match self.activation(&node.input[0])? {
            QuantizedActivation::Dynamic {
                values,
                scale: x_scale,
                zero_point,
            } => {
                let y = format!("{output}.int32");
                self.push("MatMulInteger", &[&values, &q, &zero_point], &[&y], vec![]);
                self.rescale(&y, &x_scale, &scale, output);
            }
            QuantizedActivation::Static { dequantized } => {
                let w = self.dequantized_weight(&q, &scale, outputs, 1);
                self.push("MatMul", &[&dequantized, &w], &[output], vec![]);
            }
        }
        Ok(())
    }

    fn conv(
        &mut self,
        node: &NodeProto,
        weight: &str,
        w: &HostTensor,
        bias: Option<&HostTensor>,
    ) -> Result<(), ExportError> {
        let channels = w.dims[0] as usize;
        let per_channel = w.values.len() / channels.max(1);
        let (q, scales) = quantize_per_channel(&w.values, channels, per_channel, 0);
        let output = &node.output[0];
        match self.activation(&node.input[0])? {
            QuantizedActivation::Dynamic {
                values,
                scale: x_scale,
                zero_point,
            } => {
                // ConvInteger has no bias input; its scales broadcast over `[N, O, h, w]`.
                let (q, scale) =
                    self.weight(weight, &w.dims, &q, &scales, &[1, channels as i64, 1, 1]);
                let y = format!("{output}.int32");
                self.push(
                    "ConvInteger",
                    &[&values, &q, &zero_point],
                    &[&y],
                    node.attribute.clone(),
                );
                match bias {
                    Some(bias) => {
                        let unbiased = format!("{output}.unbiased");
                        self.rescale(&y, &x_scale, &scale, &unbiased);
                        let b = format!("{}.nchw", node.input[2]);
                        self.initializers.push(float_initializer(
                            &b,
                            &[1, channels as i64, 1, 1],
                            &bias.values,
                        ));
                        self.push("Add", &[&unbiased, &b], &[output], vec![]);
                    }
                    None => self.rescale(&y, &x_scale, &scale, output),
                }
            }
            QuantizedActivation::Static { dequantized } => {
                let (q, scale) = self.weight(weight, &w.dims, &q, &scales, &[channels as i64]);
                let w = self.dequantized_weight(&q, &scale, channels, 0);
                let mut inputs = vec![dequantized.as_str(), w.as_str()];
                if bias.is_some() {
                    inputs.push(&node.input[2]);
                }
                self.push("Conv", &inputs, &[output], node.attribute.clone());
            }
        }
        Ok(())
    }

    fn activation_matmul(&mut self, node: &NodeProto) -> Result<(), ExportError> {
        let output = &node.output[0];
        let a = self.activation(&node.input[0])?;
        let b = self.activation(&node.input[1])?;
        match (a, b) {
            (
                QuantizedActivation::Dynamic {
                    values: av,
                    scale: a_scale,
                    zero_point: a_zero,
                },
                QuantizedActivation::Dynamic {
                    values: bv,
                    scale: b_scale,
                    zero_point: b_zero,
                },
            ) => {
                let y = format!("{output}.int32");
                self.push(
                    "MatMulInteger",
                    &[&av, &bv, &a_zero, &b_zero],
                    &[&y],
                    vec![],
                );
                self.rescale(&y, &a_scale, &b_scale, output);
            }
            (
                QuantizedActivation::Static { dequantized: a },
                QuantizedActivation::Static { dequantized: b },
            ) => self.push("MatMul", &[&a, &b], &[output], vec![]),
            _ => {
                return Err(ExportError::Internal(
                    "mixed activation quantisation".into(),
                ))
            }
        }
        Ok(())
    }
}

/// Drops nodes whose outputs nothing reads (the weights' Transposes) and unread initializers.
pub(crate) fn remove_unused(graph: &mut GraphProto) {
    loop {
        let read: HashSet<&str> = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .chain(graph.output.iter().filter_map(|o| o.name.as_deref()))
            .collect();
        let keep: Vec<bool> = graph
            .node
            .iter()
            .map(|n| n.output.iter().any(|o| read.contains(o.as_str())))
            .collect();
        if keep.iter().all(|&k| k) {
            let kept: HashSet<String> = read.iter().map(|s| s.to_string()).collect();
            graph
                .initializer
                .retain(|t| t.name.as_deref().is_some_and(|n| kept.contains(n)));
            return;
        }
        let mut flags = keep.into_iter();
        graph.node.retain(|_| flags.next().unwrap_or(true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_weights_use_the_full_symmetric_range_and_round_to_nearest() {
        // [rows = 2, cols = 3]; channels along axis 1 (columns), the second one all zero.
        let values = [0.5, 0.0, -2.0, -1.0, 0.0, 1.0];
        let (q, scales) = quantize_per_channel(&values, 2, 3, 1);
        assert_eq!(scales, vec![1.0 / 127.0, 1.0, 2.0 / 127.0]);
        assert_eq!(q, vec![64, 0, -127, -127, 0, 64]); // 63.5 rounds away from zero
        for (i, (&v, &q)) in values.iter().zip(&q).enumerate() {
            let scale = scales[i % 3];
            assert!((f32::from(q) * scale - v).abs() <= scale / 2.0 + 1e-7);
        }
        let (q, scales) = quantize_per_channel(&values, 2, 3, 0);
        assert_eq!(scales, vec![2.0 / 127.0, 1.0 / 127.0]);
        assert_eq!(q[2], -127);
        assert_eq!(q[3], -127);
    }
}
