//! `metadata_props` read straight from an ONNX file's bytes, before ONNX Runtime sees it: the
//! runtime must know what a graph is (e.g. int8 for CPU only) before it registers an execution
//! provider, and opening a session just to ask would cost a full model load per provider.
//!
//! Only the protobuf wire format is needed: `ModelProto.metadata_props` is field 14, each a
//! `StringStringEntryProto { key = 1, value = 2 }`; every other field is skipped by its length.
//! [`graph_summary`] reads the few graph fields the GPU providers need before a session exists
//! (input names and shapes for TensorRT profiles, node domains for what TensorRT can take).

use std::collections::{BTreeMap, BTreeSet};

const METADATA_PROPS: u64 = 14;
const MODEL_GRAPH: u64 = 7;
// GraphProto fields.
const GRAPH_NODE: u64 = 1;
const GRAPH_INITIALIZER: u64 = 5;
const GRAPH_DOC_STRING: u64 = 10;
const GRAPH_INPUT: u64 = 11;

/// Why the bytes could not be read as a `ModelProto`.
#[derive(Debug, thiserror::Error)]
#[error("not an ONNX model: {0}")]
pub struct PropsError(String);

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, PropsError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| PropsError("truncated varint".into()))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(PropsError("varint longer than 10 bytes".into()))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], PropsError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| PropsError("field runs past the end".into()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    /// The next field: (number, length-delimited payload if wire type 2).
    fn field(&mut self) -> Result<(u64, Option<&'a [u8]>), PropsError> {
        let (number, value) = self.field_value()?;
        Ok((
            number,
            match value {
                Value::Bytes(b) => Some(b),
                _ => None,
            },
        ))
    }

    /// The next field with its varint value kept too.
    fn field_value(&mut self) -> Result<(u64, Value<'a>), PropsError> {
        let tag = self.varint()?;
        let (number, wire) = (tag >> 3, tag & 7);
        let value = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Other
            }
            2 => {
                let len = self.varint()?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Other
            }
            other => return Err(PropsError(format!("unsupported wire type {other}"))),
        };
        Ok((number, value))
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

/// The model's `metadata_props`, key → value.
pub fn metadata_props(model: &[u8]) -> Result<BTreeMap<String, String>, PropsError> {
    let mut props = BTreeMap::new();
    let mut reader = Reader {
        bytes: model,
        at: 0,
    };
    while !reader.done() {
        let (number, payload) = reader.field()?;
        let (METADATA_PROPS, Some(entry)) = (number, payload) else {
            continue;
        };
        let mut entry = Reader {
            bytes: entry,
            at: 0,
        };
        let (mut key, mut value) = (String::new(), String::new());
        while !entry.done() {
            match entry.field()? {
                (1, Some(k)) => key = String::from_utf8_lossy(k).into_owned(),
                (2, Some(v)) => value = String::from_utf8_lossy(v).into_owned(),
                _ => {}
            }
        }
        props.insert(key, value);
    }
    Ok(props)
}

/// One graph input as the file declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphInput {
    pub name: String,
    /// ONNX `TensorProto.DataType` (1 float, 2 uint8, 10 float16); 0 when not a tensor.
    pub elem_type: i32,
    /// Each dimension: `Some(n)` fixed, `None` symbolic or unknown.
    pub dims: Vec<Option<i64>>,
}

/// What the runtime checks in a graph before registering a GPU provider.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphSummary {
    /// Real inputs (initializers listed as inputs by old exporters are left out).
    pub inputs: Vec<GraphInput>,
    /// `(domain, op_type)` of every top-level node; the default domain is `""`.
    pub ops: BTreeSet<(String, String)>,
    /// `GraphProto.doc_string` (the exporter writes backbone, heads, input and precision).
    pub doc_string: String,
}

impl GraphSummary {
    /// Op types from `domain` (e.g. `com.microsoft` fused ops).
    pub fn ops_in(&self, domain: &str) -> Vec<&str> {
        self.ops
            .iter()
            .filter(|(d, _)| d == domain)
            .map(|(_, op)| op.as_str())
            .collect()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads the graph's inputs, node domains and description (subgraphs of control-flow nodes and
/// model-local functions are not visited: the exporter writes neither).
pub fn graph_summary(model: &[u8]) -> Result<GraphSummary, PropsError> {
    let mut summary = GraphSummary::default();
    let mut model_reader = Reader {
        bytes: model,
        at: 0,
    };
    // A message may arrive in pieces (protobuf merges repeated occurrences of a field).
    let mut initializers = BTreeSet::new();
    let mut inputs = Vec::new();
    while !model_reader.done() {
        let (MODEL_GRAPH, Some(graph)) = model_reader.field()? else {
            continue;
        };
        let mut graph = Reader {
            bytes: graph,
            at: 0,
        };
        while !graph.done() {
            match graph.field()? {
                (GRAPH_NODE, Some(node)) => summary.ops.insert(node_op(node)?),
                (GRAPH_INITIALIZER, Some(tensor)) => initializers.insert(tensor_name(tensor)?),
                (GRAPH_INPUT, Some(info)) => {
                    inputs.push(value_info(info)?);
                    true
                }
                (GRAPH_DOC_STRING, Some(doc)) => {
                    summary.doc_string = text(doc);
                    true
                }
                _ => true,
            };
        }
    }
    summary.inputs = inputs
        .into_iter()
        .filter(|i| !initializers.contains(&i.name))
        .collect();
    Ok(summary)
}

/// `NodeProto { op_type = 4, domain = 7 }`.
fn node_op(node: &[u8]) -> Result<(String, String), PropsError> {
    let (mut domain, mut op) = (String::new(), String::new());
    let mut r = Reader { bytes: node, at: 0 };
    while !r.done() {
        match r.field()? {
            (4, Some(b)) => op = text(b),
            (7, Some(b)) => domain = text(b),
            _ => {}
        }
    }
    // "ai.onnx" is the default domain spelled out.
    if domain == "ai.onnx" {
        domain.clear();
    }
    Ok((domain, op))
}

/// `TensorProto.name = 8`.
fn tensor_name(tensor: &[u8]) -> Result<String, PropsError> {
    let mut r = Reader {
        bytes: tensor,
        at: 0,
    };
    let mut name = String::new();
    while !r.done() {
        if let (8, Some(b)) = r.field()? {
            name = text(b);
        }
    }
    Ok(name)
}

/// `ValueInfoProto { name = 1, type = 2 }`, `TypeProto.tensor_type = 1`,
/// `Tensor { elem_type = 1, shape = 2 }`, `TensorShapeProto.dim = 1`,
/// `Dimension { dim_value = 1 | dim_param = 2 }`.
fn value_info(info: &[u8]) -> Result<GraphInput, PropsError> {
    let mut input = GraphInput {
        name: String::new(),
        elem_type: 0,
        dims: Vec::new(),
    };
    for (number, value) in fields(info)? {
        match (number, value) {
            (1, Value::Bytes(b)) => input.name = text(b),
            (2, Value::Bytes(ty)) => {
                for (number, value) in fields(ty)? {
                    let (1, Value::Bytes(tensor)) = (number, value) else {
                        continue;
                    };
                    for (number, value) in fields(tensor)? {
                        match (number, value) {
                            (1, Value::Varint(t)) => input.elem_type = t as i32,
                            (2, Value::Bytes(shape)) => {
                                for (number, value) in fields(shape)? {
                                    let (1, Value::Bytes(dim)) = (number, value) else {
                                        continue;
                                    };
                                    let mut fixed = None;
                                    for (number, value) in fields(dim)? {
                                        if let (1, Value::Varint(n)) = (number, value) {
                                            fixed = Some(n as i64);
                                        }
                                    }
                                    input.dims.push(fixed);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(input)
}

fn fields(bytes: &[u8]) -> Result<Vec<(u64, Value<'_>)>, PropsError> {
    let mut r = Reader { bytes, at: 0 };
    let mut out = Vec::new();
    while !r.done() {
        out.push(r.field_value()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len_field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8];
        let mut len = payload.len();
        while len >= 0x80 {
            out.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn reads_props_and_skips_other_fields() {
        let mut model = vec![0x08, 0x08]; // ir_version = 8 (varint)
        model.extend(len_field(7, b"graph bytes"));
        let mut entry = len_field(1, b"agiqa.backbone");
        entry.extend(len_field(2, b"ViT-B/16"));
        model.extend(len_field(14, &entry));
        let props = metadata_props(&model).unwrap();
        assert_eq!(props["agiqa.backbone"], "ViT-B/16");
        assert_eq!(props.len(), 1);
        assert!(metadata_props(&model[..model.len() - 3]).is_err());
        assert!(metadata_props(b"not protobuf at all \xff\xff").is_err());
    }

    fn varint_field(number: u64, value: u64) -> Vec<u8> {
        vec![(number << 3) as u8, value as u8]
    }

    fn node(op: &[u8], domain: &[u8]) -> Vec<u8> {
        let mut n = len_field(1, b"x");
        n.extend(len_field(4, op));
        if !domain.is_empty() {
            n.extend(len_field(7, domain));
        }
        len_field(GRAPH_NODE, &n)
    }

    /// A `[N, 3, 32, 32]` float input (`N` symbolic) plus a weight that old IRs list as input.
    fn small_graph(nodes: &[Vec<u8>]) -> Vec<u8> {
        let dim = |d: Vec<u8>| len_field(1, &d);
        let mut shape = dim(len_field(2, b"N"));
        for n in [3, 32, 32] {
            shape.extend(dim(varint_field(1, n)));
        }
        let mut tensor = varint_field(1, 1);
        tensor.extend(len_field(2, &shape));
        let mut info = len_field(1, b"pixel_values");
        info.extend(len_field(2, &len_field(1, &tensor)));
        let mut graph: Vec<u8> = nodes.concat();
        graph.extend(len_field(GRAPH_INPUT, &info));
        graph.extend(len_field(GRAPH_INPUT, &len_field(1, b"w")));
        graph.extend(len_field(GRAPH_INITIALIZER, &len_field(8, b"w")));
        graph.extend(len_field(GRAPH_DOC_STRING, b"fp16 precision."));
        let mut model = varint_field(1, 8);
        model.extend(len_field(MODEL_GRAPH, &graph));
        model
    }

    #[test]
    fn graph_summary_reads_inputs_ops_and_domains() {
        let model = small_graph(&[
            node(b"MatMul", b""),
            node(b"Add", b"ai.onnx"),
            node(b"MultiHeadAttention", b"com.microsoft"),
            node(b"QuickGelu", b"com.microsoft"),
        ]);
        let summary = graph_summary(&model).unwrap();
        assert_eq!(
            summary.inputs,
            [GraphInput {
                name: "pixel_values".into(),
                elem_type: 1,
                dims: vec![None, Some(3), Some(32), Some(32)],
            }]
        );
        assert_eq!(
            summary.ops_in("com.microsoft"),
            ["MultiHeadAttention", "QuickGelu"]
        );
        assert_eq!(summary.ops_in(""), ["Add", "MatMul"]);
        assert_eq!(summary.doc_string, "fp16 precision.");
        let plain = graph_summary(&small_graph(&[node(b"MatMul", b"")])).unwrap();
        assert!(plain.ops_in("com.microsoft").is_empty());
        assert!(graph_summary(&model[..model.len() - 4]).is_err());
    }
}
