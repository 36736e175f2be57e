//! A small builder for ONNX graphs: named initializers, nodes with generated output names, and
//! the few composite layers CLIP needs (linear, layer norm, multi-head attention).
//!
//! Precision: in [`Precision::Fp16`] weights are stored as fp16 and activations flow in fp16;
//! layer norms keep fp32 statistics (`stash_type = 1`), softmaxes run in fp32 between casts,
//! and whatever the caller builds with [`GraphBuilder::constant_f32`] stays fp32.

use std::collections::{BTreeMap, HashSet};

use half::f16;

use crate::onnx_proto::{
    attribute_type, data_type, AttributeProto, Dimension, NodeProto, TensorProto, TensorShapeProto,
    TypeProto, TypeProtoTensor, ValueInfoProto,
};
use crate::ExportError;

/// Storage and arithmetic precision of the image encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
}

impl Precision {
    pub fn data_type(self) -> i32 {
        match self {
            Precision::Fp32 => data_type::FLOAT,
            Precision::Fp16 => data_type::FLOAT16,
        }
    }
}

/// A float tensor taken out of the trainer: shape and row-major values.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub dims: Vec<i64>,
    pub values: Vec<f32>,
}

/// Tensors by their checkpoint name (`visual.conv1.weight`, …).
pub type Weights = BTreeMap<String, HostTensor>;

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_type::INT),
        i: Some(value),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_type::INTS),
        ints: values.to_vec(),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_type::FLOAT),
        f: Some(value),
        ..Default::default()
    }
}

/// A tensor-typed graph input or output; `None` dims are the symbolic batch size `N`.
pub fn value_info(name: &str, elem_type: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Some(v) => Dimension {
                dim_value: Some(*v),
                dim_param: None,
            },
            None => Dimension {
                dim_value: None,
                dim_param: Some("N".into()),
            },
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
        doc_string: None,
    }
}

/// Nodes and initializers of one graph under construction.
/// ONNX Runtime's contrib-op domain.
pub const MICROSOFT_DOMAIN: &str = "com.microsoft";

/// How attention is written into the graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionOps {
    /// Opset-17 ops (MatMul, Softmax...), Q scaled before Q·Kᵀ, which is the pattern
    /// TensorRT fuses into its attention kernels; every runtime takes it.
    #[default]
    Plain,
    /// ONNX Runtime's `com.microsoft.MultiHeadAttention` (one fused kernel per block on CPU
    /// and CUDA); ONNX Runtime only, refused by TensorRT.
    MicrosoftMultiHead,
}

impl AttentionOps {
    /// The value of the `agiqa.attention` metadata key.
    pub const fn metadata_name(self) -> &'static str {
        match self {
            AttentionOps::Plain => "plain (Q scaled before Q·Kᵀ)",
            AttentionOps::MicrosoftMultiHead => "com.microsoft.MultiHeadAttention",
        }
    }
}

pub struct GraphBuilder {
    pub precision: Precision,
    uses_microsoft_ops: bool,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: HashSet<String>,
    counter: usize,
    scope: String,
}

impl GraphBuilder {
    pub fn new(precision: Precision) -> Self {
        GraphBuilder {
            precision,
            uses_microsoft_ops: false,
            nodes: Vec::new(),
            initializers: Vec::new(),
            names: HashSet::new(),
            counter: 0,
            scope: String::new(),
        }
    }

    /// Prefix for generated value names (e.g. the block a node belongs to), for readable
    /// graphs in Netron and in ONNX Runtime's errors.
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = scope.to_string();
    }

    pub fn into_parts(self) -> (Vec<NodeProto>, Vec<TensorProto>) {
        (self.nodes, self.initializers)
    }

    fn claim(&mut self, name: &str) -> Result<(), ExportError> {
        if !self.names.insert(name.to_string()) {
            return Err(ExportError::Internal(format!(
                "graph value {name:?} defined twice"
            )));
        }
        Ok(())
    }

    fn push_initializer(
        &mut self,
        name: &str,
        dims: &[i64],
        elem: i32,
        raw: Vec<u8>,
    ) -> Result<String, ExportError> {
        self.claim(name)?;
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: Some(elem),
            name: Some(name.into()),
            raw_data: Some(raw),
        });
        Ok(name.to_string())
    }

    /// An initializer in the encoder's precision, named `name`.
    pub fn weight(&mut self, name: &str, tensor: &HostTensor) -> Result<String, ExportError> {
        let raw = match self.precision {
            Precision::Fp32 => tensor.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Precision::Fp16 => {
                if let Some(v) = tensor.values.iter().find(|v| v.abs() > f16::MAX.to_f32()) {
                    return Err(ExportError::Unsupported(format!(
                        "tensor {name} holds {v}, beyond fp16's range; export it in fp32"
                    )));
                }
                tensor
                    .values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect()
            }
        };
        self.push_initializer(name, &tensor.dims, self.precision.data_type(), raw)
    }

    /// An fp32 initializer whatever the precision (head, normalisation constants).
    pub fn constant_f32(
        &mut self,
        name: &str,
        dims: &[i64],
        values: &[f32],
    ) -> Result<String, ExportError> {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, data_type::FLOAT, raw)
    }

    /// An int64 initializer (shapes, indices, axes).
    pub fn constant_i64(
        &mut self,
        name: &str,
        dims: &[i64],
        values: &[i64],
    ) -> Result<String, ExportError> {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, data_type::INT64, raw)
    }

    /// A scalar in the encoder's precision (for `Mul`/`Add` with activations), under a
    /// fresh name made from `stem`.
    pub fn scalar(&mut self, stem: &str, value: f32) -> Result<String, ExportError> {
        let tensor = HostTensor {
            dims: vec![],
            values: vec![value],
        };
        let name = self.unique(stem);
        self.weight(&name, &tensor)
    }

    /// An int64 constant under a fresh name made from `stem`.
    pub fn int_constant(
        &mut self,
        stem: &str,
        dims: &[i64],
        values: &[i64],
    ) -> Result<String, ExportError> {
        let name = self.unique(stem);
        self.constant_i64(&name, dims, values)
    }

    /// One node with a single generated output; returns the output's name.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> Result<String, ExportError> {
        self.counter += 1;
        let output = if self.scope.is_empty() {
            format!("{op}_{}", self.counter)
        } else {
            format!("{}/{op}_{}", self.scope, self.counter)
        };
        self.node_named(op, inputs, attributes, &output)?;
        Ok(output)
    }

    /// One `com.microsoft` contrib-op node (ONNX Runtime only) with a single generated output.
    pub fn microsoft_node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> Result<String, ExportError> {
        let output = self.node(op, inputs, attributes)?;
        if let Some(node) = self.nodes.last_mut() {
            node.domain = Some(MICROSOFT_DOMAIN.into());
        }
        self.uses_microsoft_ops = true;
        Ok(output)
    }

    /// Whether any `com.microsoft` node was emitted (the model must import that opset).
    pub fn uses_microsoft_ops(&self) -> bool {
        self.uses_microsoft_ops
    }

    /// One node whose output has a chosen name (graph outputs).
    pub fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: &str,
    ) -> Result<(), ExportError> {
        self.claim(output)?;
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(format!("{output}:node")),
            op_type: Some(op.into()),
            domain: None,
            attribute: attributes,
        });
        Ok(())
    }

    /// Looks a checkpoint tensor up and stores it as an initializer under its own name.
    pub fn checkpoint_weight(
        &mut self,
        weights: &Weights,
        name: &str,
    ) -> Result<String, ExportError> {
        let tensor = weights
            .get(name)
            .ok_or_else(|| ExportError::MissingTensor(name.to_string()))?;
        self.weight(name, tensor)
    }

    /// `x · Wᵀ + b` for a PyTorch-layout `[out, in]` weight (kept under its checkpoint name;
    /// ONNX Runtime folds the transpose at load).
    pub fn linear(
        &mut self,
        weights: &Weights,
        x: &str,
        weight: &str,
        bias: Option<&str>,
    ) -> Result<String, ExportError> {
        let w = self.checkpoint_weight(weights, weight)?;
        let wt = self.node("Transpose", &[&w], vec![attr_ints("perm", &[1, 0])])?;
        let y = self.node("MatMul", &[x, &wt], vec![])?;
        match bias {
            Some(bias) => {
                let b = self.checkpoint_weight(weights, bias)?;
                self.node("Add", &[&y, &b], vec![])
            }
            None => Ok(y),
        }
    }

    /// `LayerNormalization` over the last axis with `<prefix>.weight` / `<prefix>.bias`.
    /// Statistics are computed in fp32 in both precisions (`stash_type = 1`).
    pub fn layer_norm(
        &mut self,
        weights: &Weights,
        x: &str,
        prefix: &str,
        eps: f64,
    ) -> Result<String, ExportError> {
        let scale = self.checkpoint_weight(weights, &format!("{prefix}.weight"))?;
        let bias = self.checkpoint_weight(weights, &format!("{prefix}.bias"))?;
        self.node(
            "LayerNormalization",
            &[x, &scale, &bias],
            vec![
                attr_int("axis", -1),
                attr_float("epsilon", eps as f32),
                attr_int("stash_type", 1),
            ],
        )
    }

    /// Softmax over the last axis, in fp32 whatever the precision (fp16 exponentials of
    /// attention logits are where half precision loses most).
    pub fn softmax(&mut self, x: &str) -> Result<String, ExportError> {
        match self.precision {
            Precision::Fp32 => self.node("Softmax", &[x], vec![attr_int("axis", -1)]),
            Precision::Fp16 => {
                let wide = self.cast(x, data_type::FLOAT)?;
                let p = self.node("Softmax", &[&wide], vec![attr_int("axis", -1)])?;
                self.cast(&p, data_type::FLOAT16)
            }
        }
    }

    pub fn cast(&mut self, x: &str, to: i32) -> Result<String, ExportError> {
        self.node("Cast", &[x], vec![attr_int("to", to as i64)])
    }

    /// `[N, L, W]` → `[N, heads, L, W/heads]`.
    pub fn split_heads(
        &mut self,
        x: &str,
        heads: i64,
        head_dim: i64,
    ) -> Result<String, ExportError> {
        let shape = self.shape_constant(&[0, 0, heads, head_dim])?;
        let x = self.node("Reshape", &[x, &shape], vec![])?;
        self.node("Transpose", &[&x], vec![attr_ints("perm", &[0, 2, 1, 3])])
    }

    /// Scaled dot-product attention of `[N, H, Lq, d]` queries over `[N, H, L, d]` keys and
    /// values → `[N, Lq, H·d]`. Queries are scaled before the product, as PyTorch does, which
    /// keeps fp16 logits small.
    pub fn attention(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        head_dim: i64,
    ) -> Result<String, ExportError> {
        let scale = (head_dim as f32).powf(-0.5);
        let scale = self.scalar("attention_scale", scale)?;
        let q = self.node("Mul", &[q, &scale], vec![])?;
        let kt = self.node("Transpose", &[k], vec![attr_ints("perm", &[0, 1, 3, 2])])?;
        let logits = self.node("MatMul", &[&q, &kt], vec![])?;
        let p = self.softmax(&logits)?;
        let out = self.node("MatMul", &[&p, v], vec![])?;
        let out = self.node("Transpose", &[&out], vec![attr_ints("perm", &[0, 2, 1, 3])])?;
        let merged = self.shape_constant(&[0, 0, -1])?;
        self.node("Reshape", &[&out, &merged], vec![])
    }

    /// An int64 shape constant for `Reshape` (0 copies the input's dimension).
    pub fn shape_constant(&mut self, dims: &[i64]) -> Result<String, ExportError> {
        self.int_constant("shape", &[dims.len() as i64], dims)
    }

    /// A fresh name in the current scope.
    pub fn unique(&mut self, stem: &str) -> String {
        self.counter += 1;
        if self.scope.is_empty() {
            format!("{stem}_{}", self.counter)
        } else {
            format!("{}/{stem}_{}", self.scope, self.counter)
        }
    }
}
