//! How many graph nodes each execution provider took for a model. Nodes a GPU provider could
//! not take run on the CPU, with a copy each way: a performance bug the user must see, which
//! ONNX Runtime only logs at verbose level.
//!
//! Measured, not predicted: a session with ONNX Runtime's profiler on runs one batch of zeros,
//! and the profile's `Node` events carry the provider that ran each (fused) node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ort::ep::{self, ExecutionProvider as _};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, Tensor, TensorElementType, ValueType};

use crate::scorer::ExecutionProvider;

/// Which provider to place the graph on.
#[derive(Debug, Clone)]
pub struct PlacementOptions {
    /// `cpu`, `cuda` or `tensorrt` (TensorRT with CUDA under it, as the scorer registers them).
    pub provider: ExecutionProvider,
    pub device_id: i32,
    /// Rows of the zero batch (dynamic batch dimensions only).
    pub batch: usize,
}

/// Nodes per provider after ONNX Runtime's partitioning and fusions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodePlacement {
    pub model: PathBuf,
    pub requested: String,
    /// Provider name (`CUDAExecutionProvider`, ...) → nodes it ran.
    pub nodes: BTreeMap<String, usize>,
}

impl NodePlacement {
    /// Nodes run by the CPU provider although a GPU provider was asked for.
    pub fn cpu_fallback(&self) -> usize {
        if self.requested == ExecutionProvider::Cpu.as_str() {
            return 0;
        }
        self.nodes.get(ep::CPU::NAME).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.nodes.values().sum()
    }
}

/// Why the placement could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("ONNX Runtime is not initialised")]
    NotInitialised,
    #[error("provider {provider}: {reason}")]
    Provider {
        provider: ExecutionProvider,
        reason: String,
    },
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("running a batch of zeros through {path}: {reason}")]
    Run { path: PathBuf, reason: String },
    #[error("ONNX Runtime's profile {path}: {reason}")]
    Profile { path: PathBuf, reason: String },
}

/// Loads `model` on the requested provider (failures are errors, never a silent CPU run),
/// runs one batch of zeros with profiling on, and counts the nodes per provider.
pub fn measure(model: &Path, options: &PlacementOptions) -> Result<NodePlacement, PlacementError> {
    let environment = crate::onnxruntime::environment().ok_or(PlacementError::NotInitialised)?;
    let load = |reason: String| PlacementError::Load {
        path: model.to_path_buf(),
        reason,
    };
    // Profile files are named `<prefix>_<timestamp>.json`; a private folder keeps them apart.
    let dir = std::env::temp_dir().join(format!(
        "agiqa-placement-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).map_err(|e| load(format!("{}: {e}", dir.display())))?;
    let result = measure_in(model, options, environment, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure_in(
    model: &Path,
    options: &PlacementOptions,
    environment: &ort::environment::Environment,
    dir: &Path,
) -> Result<NodePlacement, PlacementError> {
    let load = |reason: String| PlacementError::Load {
        path: model.to_path_buf(),
        reason,
    };
    let builder = Session::builder(environment)
        .map_err(|e| load(e.to_string()))?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
        .map_err(|e| load(e.to_string()))?
        .with_profiling(dir.join("profile"))
        .map_err(|e| load(e.to_string()))?;
    let mut builder = builder
        .with_execution_providers(dispatches(options))
        .map_err(|e| PlacementError::Provider {
            provider: options.provider,
            reason: e.to_string(),
        })?;
    let mut session = builder
        .commit_from_file(model)
        .map_err(|e| load(e.to_string()))?;
    let run = |reason: String| PlacementError::Run {
        path: model.to_path_buf(),
        reason,
    };
    let inputs = session
        .inputs()
        .iter()
        .map(|input| {
            Ok((
                input.name().to_string(),
                zeros(input.dtype(), options.batch)?,
            ))
        })
        .collect::<Result<Vec<(String, SessionInputValue<'static>)>, String>>()
        .map_err(run)?;
    session.run(inputs).map_err(|e| run(e.to_string()))?;
    let profile = PathBuf::from(session.end_profiling().map_err(|e| run(e.to_string()))?);
    let profile = if profile.is_absolute() {
        profile
    } else {
        dir.join(profile.file_name().unwrap_or_default())
    };
    let text = std::fs::read_to_string(&profile).map_err(|e| PlacementError::Profile {
        path: profile.clone(),
        reason: e.to_string(),
    })?;
    let nodes = count_nodes(&text).map_err(|reason| PlacementError::Profile {
        path: profile.clone(),
        reason,
    })?;
    Ok(NodePlacement {
        model: model.to_path_buf(),
        requested: options.provider.as_str().to_string(),
        nodes,
    })
}

/// The providers for one concrete choice, each failing loudly.
fn dispatches(options: &PlacementOptions) -> Vec<ort::ep::ExecutionProviderDispatch> {
    let cuda = || {
        ep::CUDA::default()
            .with_device_id(options.device_id)
            .build()
            .error_on_failure()
    };
    match options.provider {
        ExecutionProvider::Cpu | ExecutionProvider::Auto => vec![],
        ExecutionProvider::Cuda => vec![cuda()],
        ExecutionProvider::TensorRt => vec![
            ep::TensorRT::default()
                .with_device_id(options.device_id)
                .build()
                .error_on_failure(),
            cuda(),
        ],
    }
}

/// A zero tensor for one graph input; dynamic dimensions become `batch` (the first) or 1.
fn zeros(dtype: &ValueType, batch: usize) -> Result<SessionInputValue<'static>, String> {
    let ValueType::Tensor { ty, shape, .. } = dtype else {
        return Err(format!("input of type {dtype} is not a tensor"));
    };
    let mut first = true;
    let dims: Vec<i64> = shape
        .iter()
        .map(|&d| {
            let dim = if d >= 0 {
                d
            } else if first {
                batch as i64
            } else {
                1
            };
            first &= d >= 0;
            dim
        })
        .collect();
    let len = dims.iter().product::<i64>().max(0) as usize;
    let err = |e: ort::Error| e.to_string();
    Ok(match ty {
        TensorElementType::Float32 => Tensor::from_array((dims, vec![0f32; len]))
            .map_err(err)?
            .into_dyn()
            .into(),
        TensorElementType::Uint8 => Tensor::from_array((dims, vec![0u8; len]))
            .map_err(err)?
            .into_dyn()
            .into(),
        TensorElementType::Int64 => Tensor::from_array((dims, vec![0i64; len]))
            .map_err(err)?
            .into_dyn()
            .into(),
        TensorElementType::Int32 => Tensor::from_array((dims, vec![0i32; len]))
            .map_err(err)?
            .into_dyn()
            .into(),
        // Other types (fp16 inputs): an allocated tensor; placement does not depend on values.
        other => DynTensor::new(&ort::memory::Allocator::default(), *other, dims)
            .map_err(err)?
            .into(),
    })
}

/// Counts the distinct nodes of ONNX Runtime's profile (a JSON array of Chrome trace events)
/// per `args.provider`. Each node has `_kernel_time` events (one per run) and fence events;
/// only the first are counted, once per node name.
pub fn count_nodes(profile: &str) -> Result<BTreeMap<String, usize>, String> {
    let events: Vec<serde_json::Value> =
        serde_json::from_str(profile).map_err(|e| format!("not a JSON event list: {e}"))?;
    let mut seen = BTreeSet::new();
    let mut nodes = BTreeMap::new();
    for event in &events {
        let (Some("Node"), Some(name)) = (
            event.get("cat").and_then(|v| v.as_str()),
            event.get("name").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let Some(node) = name.strip_suffix("_kernel_time") else {
            continue;
        };
        let Some(provider) = event.pointer("/args/provider").and_then(|v| v.as_str()) else {
            continue;
        };
        if seen.insert(node.to_string()) {
            *nodes.entry(provider.to_string()).or_insert(0) += 1;
        }
    }
    if nodes.is_empty() {
        return Err("no node events (was profiling on?)".into());
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_events_are_counted_once_per_node_and_provider() {
        let profile = r#"[
          {"cat":"Session","name":"model_loading_uri","args":{}},
          {"cat":"Node","name":"a_fence_before","args":{"op_name":"MatMul"}},
          {"cat":"Node","name":"a_kernel_time","args":{"op_name":"MatMul","provider":"CUDAExecutionProvider"}},
          {"cat":"Node","name":"a_kernel_time","args":{"op_name":"MatMul","provider":"CUDAExecutionProvider"}},
          {"cat":"Node","name":"b_kernel_time","args":{"op_name":"Resize","provider":"CPUExecutionProvider"}},
          {"cat":"Node","name":"c_kernel_time","args":{"op_name":"Add","provider":"CUDAExecutionProvider"}}
        ]"#;
        let nodes = count_nodes(profile).unwrap();
        assert_eq!(nodes.get("CUDAExecutionProvider"), Some(&2));
        assert_eq!(nodes.get("CPUExecutionProvider"), Some(&1));
        let placement = NodePlacement {
            model: PathBuf::from("m.onnx"),
            requested: "cuda".into(),
            nodes,
        };
        assert_eq!(placement.cpu_fallback(), 1);
        assert_eq!(placement.total(), 3);
        assert!(count_nodes("[]").is_err());
    }
}
