//! Why scoring or loading failed, and the reading of ONNX Runtime's GPU error text into errors
//! that say what to do (ONNX Runtime reports CUDA and TensorRT failures only as strings).

use std::path::PathBuf;

use super::options::ExecutionProvider;
use crate::metadata::MetadataError;
use crate::onnxruntime::OrtLibraryError;
use crate::preprocess::PreprocessError;

/// Why scoring (or loading a model) failed.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Library(#[from] OrtLibraryError),
    #[error("cannot load model {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("model {path} does not fit the agiqa graph contract: {problem}")]
    Contract { path: PathBuf, problem: String },
    #[error("model {path}: {source}")]
    Metadata {
        path: PathBuf,
        source: MetadataError,
    },
    #[error(
        "execution provider {provider} could not be used: {reason} (this ONNX Runtime offers: {available}); \
         install a GPU build of ONNX Runtime with its CUDA/TensorRT libraries, or choose --provider cpu or auto"
    )]
    ProviderUnavailable {
        provider: ExecutionProvider,
        reason: String,
        available: String,
    },
    /// The graph is not built for the provider asked for (boxed: errors stay small).
    #[error(transparent)]
    ProviderRefused(Box<ProviderRefusal>),
    #[error(
        "model {path} has {domain} ops TensorRT cannot build ({}); choose --provider cuda, or \
         export the graph without fused {domain} ops (int8: --int8 static)",
        ops.join(", ")
    )]
    UnsupportedOps {
        path: PathBuf,
        domain: &'static str,
        ops: Vec<String>,
    },
    #[error("invalid scorer options: {0}")]
    Options(String),
    #[error(
        "{provider} ran out of GPU memory at batch size {batch_size}; try --batch-size {} \
         (or fewer --sessions per GPU). ONNX Runtime said: {message}",
        (batch_size / 2).max(1)
    )]
    GpuOutOfMemory {
        provider: ExecutionProvider,
        batch_size: usize,
        message: String,
    },
    #[error(
        "TensorRT could not build an engine{}{}; delete that cache folder to rebuild from \
         scratch, or choose --provider cuda. ONNX Runtime said: {message}",
        layer.as_ref().map(|l| format!(" (layer {l})")).unwrap_or_default(),
        cache_dir.as_ref().map(|d| format!(" with the cache in {}", d.display())).unwrap_or_else(|| " (no --trt-cache folder)".into())
    )]
    TensorRtBuild {
        cache_dir: Option<PathBuf>,
        layer: Option<String>,
        message: String,
    },
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error("input tensor does not fit the model: {0}")]
    Tensor(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Why a provider was refused for an int8 graph before anything was registered.
#[derive(Debug, thiserror::Error)]
#[error(
    "model {path} is a {mode} int8 graph built for {intended}; it cannot run on {provider}. \
     Choose --provider {first}{hint}"
)]
pub struct ProviderRefusal {
    pub path: PathBuf,
    pub provider: ExecutionProvider,
    /// `dynamic` or `static`.
    pub mode: &'static str,
    /// The providers the graph is built for, comma-separated.
    pub intended: String,
    pub(crate) first: String,
    pub(crate) hint: &'static str,
}

/// Where a run happened, for turning its error text into a [`ScoreError`].
pub(crate) struct RunContext<'a> {
    pub provider: ExecutionProvider,
    pub batch_size: usize,
    /// The engine-cache subfolder in use (TensorRT).
    pub cache_dir: Option<&'a std::path::Path>,
}

/// An inference error from ONNX Runtime, read for the GPU failures users can act on.
pub(crate) fn classify_run_error(message: String, context: &RunContext<'_>) -> ScoreError {
    let lower = message.to_ascii_lowercase();
    if context.provider.is_gpu() && is_out_of_memory(&lower) {
        return ScoreError::GpuOutOfMemory {
            provider: context.provider,
            batch_size: context.batch_size,
            message,
        };
    }
    if context.provider == ExecutionProvider::TensorRt && is_tensorrt_build_failure(&lower) {
        return ScoreError::TensorRtBuild {
            cache_dir: context.cache_dir.map(std::path::Path::to_path_buf),
            layer: failing_layer(&message),
            message,
        };
    }
    ScoreError::Inference(message)
}

/// `CUDA failure 2` is `cudaErrorMemoryAllocation`; cuBLAS and cuDNN say it in their own words.
fn is_out_of_memory(lower: &str) -> bool {
    [
        "out of memory",
        "cuda failure 2:",
        "cudaerrormemoryallocation",
        "cublas_status_alloc_failed",
        "cudnn_status_alloc_failed",
        "failed to allocate memory",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

fn is_tensorrt_build_failure(lower: &str) -> bool {
    lower.contains("tensorrt")
        && [
            "build engine",
            "build the engine",
            "buildserializednetwork",
            "engine build",
            "failed to create engine",
            "could not build",
            "failed to parse",
        ]
        .iter()
        .any(|needle| lower.contains(needle))
}

/// The layer TensorRT names: `... layer /visual/conv1/Conv ...` or its `Error Code N: ...
/// (NAME: reason)` form.
fn failing_layer(message: &str) -> Option<String> {
    let token = |s: &str| {
        let name: String = s
            .trim_start_matches([' ', '\'', '"', '['])
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, ':' | ',' | '\'' | '"' | ']' | ')'))
            .collect();
        (!name.is_empty()).then_some(name)
    };
    if let Some(at) = message.find("layer ").or_else(|| message.find("Layer ")) {
        if let Some(name) = token(&message[at + "layer ".len()..]) {
            return Some(name);
        }
    }
    let code = message.find("Error Code")?;
    let open = message[code..].find('(')? + code + 1;
    let inside = &message[open..];
    let end = inside.find(": ")?;
    token(&inside[..end])
}

/// Why a GPU provider failed to register, told so the user can fix it (ONNX Runtime's own
/// messages name a library or an error number, not the cause).
pub(crate) fn explain_registration_failure(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    let cause = if lower.contains("not enabled in this build") {
        "the ONNX Runtime library in use is a CPU-only build (point --ort-lib or ORT_DYLIB_PATH \
         at the onnxruntime-gpu library that scripts/setup --gpu installs)"
            .to_string()
    } else if let Some(library) = missing_library(message) {
        format!(
            "a library it needs is missing: {library} (install the CUDA/cuDNN/TensorRT libraries \
             this ONNX Runtime build was made for, or put them on LD_LIBRARY_PATH)"
        )
    } else if lower.contains("no cuda-capable device")
        || lower.contains("cuda failure 100")
        || lower.contains("cudaerrornodevice")
    {
        "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)".into()
    } else if lower.contains("invalid device ordinal") || lower.contains("cuda failure 101") {
        "the requested --device-id does not exist on this machine".into()
    } else if lower.contains("driver version is insufficient")
        || lower.contains("cuda failure 35")
        || lower.contains("cudaerrorinsufficientdriver")
    {
        "the NVIDIA driver is older than this ONNX Runtime's CUDA needs (update the driver)".into()
    } else if lower.contains("libcuda.so") || lower.contains("cuda driver") {
        "the NVIDIA driver (libcuda.so) is not installed or cannot be loaded".into()
    } else {
        return message.to_string();
    };
    format!("{cause}; ONNX Runtime said: {message}")
}

/// The `libX.so...` named by a `cannot open shared object file` error.
fn missing_library(message: &str) -> Option<String> {
    let at = message.find(": cannot open shared object file")?;
    let head = &message[..at];
    let start = head
        .rfind(|c: char| c.is_whitespace() || c == '\'' || c == '"')
        .map_or(0, |i| i + 1);
    Some(head[start..].to_string()).filter(|name| name.contains(".so"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(provider: ExecutionProvider, message: &str) -> ScoreError {
        classify_run_error(
            message.to_string(),
            &RunContext {
                provider,
                batch_size: 64,
                cache_dir: Some(std::path::Path::new("/cache/trt/0123abcd")),
            },
        )
    }

    #[test]
    fn out_of_memory_suggests_a_smaller_batch() {
        for message in [
            "Non-zero status code returned while running FusedConv node. Name:'/conv1/Conv' \
             Status Message: CUDA error cudaErrorMemoryAllocation:out of memory",
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory ; GPU=0",
            "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED",
        ] {
            let err = run(ExecutionProvider::Cuda, message);
            assert!(
                matches!(err, ScoreError::GpuOutOfMemory { batch_size: 64, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("--batch-size 32"), "{err}");
        }
        // The same words on CPU are an ordinary inference error.
        let err = run(ExecutionProvider::Cpu, "out of memory");
        assert!(matches!(err, ScoreError::Inference(_)), "{err}");
        let err = run(ExecutionProvider::Cuda, "Invalid rank for input");
        assert!(matches!(err, ScoreError::Inference(_)), "{err}");
    }

    #[test]
    fn tensorrt_build_failure_names_cache_and_layer() {
        let err = run(
            ExecutionProvider::TensorRt,
            "TensorRT EP failed to create engine from network for fused node: \
             TRTKernel_graph_main_0. [TensorRT EP] Error Code 4: Internal Error \
             (/visual/transformer/resblocks.0/attn/MatMul: could not find any implementation)",
        );
        let ScoreError::TensorRtBuild { layer, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(
            layer.as_deref(),
            Some("/visual/transformer/resblocks.0/attn/MatMul")
        );
        let text = err.to_string();
        assert!(text.contains("/cache/trt/0123abcd"), "{text}");
        assert!(text.contains("layer /visual/transformer"), "{text}");
        let err = run(
            ExecutionProvider::TensorRt,
            "TensorRT EP could not build engine for fused node; unsupported layer 'Attention_12'",
        );
        let ScoreError::TensorRtBuild { layer, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(layer.as_deref(), Some("Attention_12"));
        // Out of memory while building is still out of memory.
        let err = run(
            ExecutionProvider::TensorRt,
            "TensorRT EP failed to build engine: out of memory",
        );
        assert!(matches!(err, ScoreError::GpuOutOfMemory { .. }), "{err}");
        let err = run(
            ExecutionProvider::TensorRt,
            "TensorRT EP failed to build engine",
        );
        let ScoreError::TensorRtBuild { layer: None, .. } = &err else {
            panic!("{err}");
        };
    }

    #[test]
    fn registration_failures_say_why() {
        let reason = explain_registration_failure(
            "Failed to load library libonnxruntime_providers_cuda.so with error: \
             libcublasLt.so.13: cannot open shared object file: No such file or directory",
        );
        assert!(reason.contains("missing: libcublasLt.so.13"), "{reason}");
        let reason = explain_registration_failure(
            "CUDA failure 100: no CUDA-capable device is detected ; GPU=0 ; hostname=x",
        );
        assert!(reason.starts_with("no CUDA GPU is visible"), "{reason}");
        let reason = explain_registration_failure(
            "CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version",
        );
        assert!(reason.contains("driver is older"), "{reason}");
        let reason = explain_registration_failure("CUDA failure 101: invalid device ordinal");
        assert!(reason.contains("--device-id"), "{reason}");
        assert_eq!(
            explain_registration_failure("something else"),
            "something else"
        );
    }
}
