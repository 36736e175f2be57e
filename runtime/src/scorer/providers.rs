//! Execution-provider registration: what each provider is told (TensorRT profiles, caches and
//! precision; CUDA's cuDNN search, strict SkipLayerNorm, CUDA graphs; the CPU arena), the
//! session options, and `auto`'s fallback order. Registration failures are errors, never a
//! silent CPU run.

use std::path::{Path, PathBuf};

use ort::ep::{self, ExecutionProvider as _, ExecutionProviderDispatch};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights, SessionBuilder};
use ort::session::Session;

use super::error::{
    classify_run_error, explain_registration_failure, ProviderRefusal, RunContext, ScoreError,
};
use super::options::{ConvSearch, ExecutionProvider, GraphOptimization, ScorerOptions};
use super::tensorrt_cache::{self, EngineCacheKey, ProfileShapes};
use crate::metadata::{InputKind, Int8Mode, Quantization};
use crate::onnx_props::GraphSummary;

/// ONNX `TensorProto.DataType` codes of the two graph inputs.
const ONNX_FLOAT: i32 = 1;
const ONNX_UINT8: i32 = 2;

/// What the runtime reads from the model file before any session exists.
pub(crate) struct ModelFacts {
    pub quantization: Option<Quantization>,
    pub summary: GraphSummary,
    /// The contract's input, when the file declares one of the two.
    pub input: Option<InputKind>,
    /// The batch dimension when the graph fixes it.
    pub fixed_batch: Option<usize>,
    /// `preprocessing.image_size` from the metadata.
    pub image_size: Option<u32>,
    /// FNV-1a of the file, computed once when a TensorRT cache needs it.
    pub model_hash: std::sync::OnceLock<u64>,
}

impl ModelFacts {
    pub fn fp16_weights(&self) -> bool {
        self.summary.doc_string.contains("fp16 precision")
    }

    /// `fp32`, `fp16`, `int8` or `int8+fp16`: what a TensorRT engine is built in.
    pub fn tensorrt_precision(&self, options: &ScorerOptions) -> String {
        let int8 = self.is_static_int8();
        match (int8, options.tensorrt_fp16) {
            (true, true) => "int8+fp16",
            (true, false) => "int8",
            (false, true) => "fp16",
            (false, false) => "fp32",
        }
        .to_string()
    }

    fn is_static_int8(&self) -> bool {
        self.quantization
            .as_ref()
            .is_some_and(|q| q.mode == Int8Mode::Static)
    }

    pub fn profile_shapes(&self, options: &ScorerOptions) -> Option<ProfileShapes> {
        // A graph with a fixed batch has nothing to profile.
        if self.fixed_batch.is_some() {
            return None;
        }
        Some(tensorrt_cache::profile_shapes(
            self.input?,
            self.image_size?,
            options.profile_for(options.batch_size),
        ))
    }
}

pub(crate) fn model_facts(model: &[u8], path: &Path) -> Result<ModelFacts, ScoreError> {
    let load_error = |e: crate::onnx_props::PropsError| ScoreError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let props = crate::onnx_props::metadata_props(model).map_err(load_error)?;
    let quantization =
        crate::metadata::ModelMetadata::quantization_from_props(&props).map_err(|source| {
            ScoreError::Metadata {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let summary = crate::onnx_props::graph_summary(model).map_err(load_error)?;
    let (input, fixed_batch) = match summary.inputs.as_slice() {
        [only] => {
            let kind = match (only.name.as_str(), only.elem_type) {
                (crate::metadata::INPUT_PIXEL_VALUES, ONNX_FLOAT) => Some(InputKind::PixelValues),
                (crate::metadata::INPUT_PIXELS_UINT8, ONNX_UINT8) => Some(InputKind::PixelsUint8),
                _ => None,
            };
            let fixed = only
                .dims
                .first()
                .copied()
                .flatten()
                .filter(|&n| n > 0)
                .map(|n| n as usize);
            (kind, fixed)
        }
        // The contract check after the first session names the problem.
        _ => (None, None),
    };
    let image_size = props
        .get("agiqa.preprocessing")
        .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
        .and_then(|p| p.get("image_size")?.as_u64())
        .and_then(|n| u32::try_from(n).ok());
    Ok(ModelFacts {
        quantization,
        summary,
        input,
        fixed_batch,
        image_size,
        model_hash: std::sync::OnceLock::new(),
    })
}

/// Refuses a graph on a provider it is not built for, before anything is registered. `Ok(Some)`
/// is `auto`'s note for skipping the provider.
pub(crate) fn refusal(
    facts: &ModelFacts,
    provider: ExecutionProvider,
    options: &ScorerOptions,
    path: &Path,
) -> Result<Option<String>, ScoreError> {
    let auto = options.provider == ExecutionProvider::Auto;
    if let Some(q) = facts
        .quantization
        .as_ref()
        .filter(|q| !q.supports(provider.as_str()))
    {
        if !auto {
            let gpu = provider != ExecutionProvider::Cpu && q.mode == Int8Mode::Dynamic;
            return Err(ScoreError::ProviderRefused(Box::new(ProviderRefusal {
                path: path.to_path_buf(),
                provider,
                mode: q.mode.name(),
                intended: q.providers.join(", "),
                first: q.providers.first().cloned().unwrap_or_default(),
                hint: if gpu {
                    ", or export the checkpoint with --int8 static for GPUs"
                } else {
                    ""
                },
            })));
        }
        return Ok(Some(format!(
            "auto: {provider} skipped: the {} int8 graph is built for {}",
            q.mode.name(),
            q.providers.join(", ")
        )));
    }
    // TensorRT parses standard ONNX only; ONNX Runtime's fused contrib ops would leave holes
    // in the engine (or fail its build).
    let microsoft = facts.summary.ops_in("com.microsoft");
    if provider == ExecutionProvider::TensorRt && !microsoft.is_empty() {
        if !auto {
            return Err(ScoreError::UnsupportedOps {
                path: path.to_path_buf(),
                domain: "com.microsoft",
                ops: microsoft.iter().map(|s| s.to_string()).collect(),
            });
        }
        return Ok(Some(format!(
            "auto: tensorrt skipped: the graph has com.microsoft ops ({})",
            microsoft.join(", ")
        )));
    }
    Ok(None)
}

/// The TensorRT set-up shared by a scorer's sessions.
pub(crate) struct TensorRtPlan {
    pub shapes: Option<ProfileShapes>,
    pub precision: String,
    pub int8: bool,
    /// Root `--trt-cache` folder; each device gets its keyed subfolder.
    pub cache_root: Option<PathBuf>,
    pub model_hash: u64,
    pub ort_version: String,
    pub tensorrt: String,
}

impl TensorRtPlan {
    pub fn new(facts: &ModelFacts, model: &[u8], options: &ScorerOptions, ort_lib: &Path) -> Self {
        let cache_root = options.tensorrt_cache_dir.clone();
        TensorRtPlan {
            shapes: facts.profile_shapes(options),
            precision: facts.tensorrt_precision(options),
            int8: facts.is_static_int8(),
            // Hashing hundreds of megabytes is only worth it when there is a cache to key.
            model_hash: if cache_root.is_some() {
                *facts
                    .model_hash
                    .get_or_init(|| tensorrt_cache::model_hash(model))
            } else {
                0
            },
            cache_root,
            ort_version: crate::onnxruntime::version(),
            tensorrt: tensorrt_cache::tensorrt_identity(ort_lib),
        }
    }

    /// The keyed cache folder for `device_id`, created, with the key written beside the engines.
    pub fn cache_folder(&self, device_id: i32) -> Result<Option<PathBuf>, String> {
        let Some(root) = &self.cache_root else {
            return Ok(None);
        };
        let key = EngineCacheKey {
            model: self.model_hash,
            ort_version: self.ort_version.clone(),
            tensorrt: self.tensorrt.clone(),
            gpu: tensorrt_cache::gpu_identity(device_id)
                .unwrap_or_else(|| format!("unknown GPU, ordinal {device_id}")),
            precision: self.precision.clone(),
            profile: self.shapes.clone().unwrap_or(ProfileShapes {
                min: "fixed".into(),
                opt: "fixed".into(),
                max: "fixed".into(),
            }),
        };
        let folder = key.folder(root);
        std::fs::create_dir_all(&folder)
            .and_then(|()| std::fs::write(folder.join("key.txt"), key.describe()))
            .map_err(|e| format!("TensorRT cache folder {}: {e}", folder.display()))?;
        Ok(Some(folder))
    }
}

/// The providers registered for one concrete choice on one device.
pub(crate) fn dispatches(
    provider: ExecutionProvider,
    options: &ScorerOptions,
    device_id: i32,
    facts: &ModelFacts,
    tensorrt: Option<(&TensorRtPlan, Option<&Path>)>,
) -> Vec<ExecutionProviderDispatch> {
    let cuda_graph = options.cuda_graph && options.uses_io_binding(provider);
    let cuda = || {
        ep::CUDA::default()
            .with_device_id(device_id)
            .with_conv_algorithm_search(match options.cudnn_conv_search {
                ConvSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
                ConvSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
            })
            // fp16 Skip-LayerNorm accumulates in fp16 unless strict, and CLIP's residual
            // stream has activations large enough to overflow it.
            .with_skip_layer_norm_strict_mode(facts.fp16_weights())
            .with_cuda_graph(cuda_graph && provider == ExecutionProvider::Cuda)
            .build()
            .error_on_failure()
    };
    // Registered last in every list, so the arena choice holds whatever runs on CPU.
    let cpu = ep::CPU::default()
        .with_arena_allocator(options.cpu_arena)
        .build();
    match provider {
        ExecutionProvider::Cpu | ExecutionProvider::Auto => vec![cpu],
        ExecutionProvider::Cuda => vec![cuda(), cpu],
        ExecutionProvider::TensorRt => {
            let mut trt = ep::TensorRT::default()
                .with_device_id(device_id)
                .with_fp16(options.tensorrt_fp16)
                .with_layer_norm_fp32_fallback(options.tensorrt_fp16)
                .with_cuda_graph(cuda_graph);
            if let Some((plan, folder)) = tensorrt {
                // Static QDQ graphs carry their scales: no calibration table.
                trt = trt.with_int8(plan.int8);
                if let Some(shapes) = &plan.shapes {
                    trt = trt
                        .with_profile_min_shapes(&shapes.min)
                        .with_profile_opt_shapes(&shapes.opt)
                        .with_profile_max_shapes(&shapes.max);
                }
                if let Some(dir) = folder {
                    trt = trt
                        .with_engine_cache(true)
                        .with_engine_cache_path(dir.display())
                        .with_timing_cache(true)
                        .with_timing_cache_path(dir.display());
                }
            }
            // CUDA runs what TensorRT does not take.
            vec![trt.build().error_on_failure(), cuda(), cpu]
        }
    }
}

fn optimization_level(level: GraphOptimization) -> GraphOptimizationLevel {
    match level {
        GraphOptimization::Disable => GraphOptimizationLevel::Disable,
        GraphOptimization::Basic => GraphOptimizationLevel::Level1,
        GraphOptimization::Extended => GraphOptimizationLevel::Level2,
        GraphOptimization::All => GraphOptimizationLevel::All,
    }
}

pub(crate) fn builder(
    options: &ScorerOptions,
    weights: Option<&PrepackedWeights>,
    providers: Vec<ExecutionProviderDispatch>,
) -> Result<SessionBuilder, String> {
    let environment = crate::onnxruntime::environment()
        .ok_or_else(|| "ONNX Runtime is not initialised".to_string())?;
    let mut b = Session::builder(environment)
        .map_err(|e| e.to_string())?
        .with_optimization_level(optimization_level(options.graph_optimization))
        .map_err(|e| e.to_string())?
        .with_memory_pattern(options.memory_pattern)
        .map_err(|e| e.to_string())?
        .with_intra_op_spinning(options.effective_spinning())
        .map_err(|e| e.to_string())?;
    if let Some(threads) = options.threads {
        b = b.with_intra_threads(threads).map_err(|e| e.to_string())?;
    }
    if let Some(weights) = weights {
        b = b
            .with_prepacked_weights(weights)
            .map_err(|e| e.to_string())?;
    }
    // Registration errors are the provider's; keep them apart from model errors.
    b.with_execution_providers(providers)
        .map_err(|e| format!("provider: {e}"))
}

/// The ONNX Runtime providers that this library build reports (e.g. `CPUExecutionProvider`).
pub fn available_providers() -> Vec<&'static str> {
    let mut found = vec![];
    if ep::CPU::is_available().unwrap_or(false) {
        found.push(ep::CPU::NAME);
    }
    if ep::CUDA::is_available().unwrap_or(false) {
        found.push(ep::CUDA::NAME);
    }
    if ep::TensorRT::is_available().unwrap_or(false) {
        found.push(ep::TensorRT::NAME);
    }
    found
}

/// One opened session and how it was opened.
pub(crate) struct Opened {
    pub provider: ExecutionProvider,
    pub session: Session,
    /// TensorRT's keyed cache folder, when there is one.
    pub cache_dir: Option<PathBuf>,
}

/// Opens one session on `device_id`: the requested provider, or for `auto` (when `fixed` is
/// `None`) the first of [`ExecutionProvider::AUTO_ORDER`] that loads. Notes collect why `auto`
/// skipped providers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_session(
    model: &[u8],
    path: &Path,
    options: &ScorerOptions,
    facts: &ModelFacts,
    device_id: i32,
    fixed: Option<ExecutionProvider>,
    weights: Option<&PrepackedWeights>,
    notes: &mut Vec<String>,
) -> Result<Opened, ScoreError> {
    let candidates: Vec<ExecutionProvider> = match (fixed, options.provider) {
        (Some(provider), _) => vec![provider],
        (None, ExecutionProvider::Auto) => ExecutionProvider::AUTO_ORDER.to_vec(),
        (None, provider) => vec![provider],
    };
    for provider in candidates {
        if fixed.is_none() {
            if let Some(note) = refusal(facts, provider, options, path)? {
                tracing::info!("{note}");
                notes.push(note);
                continue;
            }
        }
        let attempt = open_one(model, options, facts, provider, device_id, weights);
        match attempt {
            Ok(opened) => return Ok(opened),
            Err((reason, _)) if provider == ExecutionProvider::Cpu => {
                // CPU always registers; a failure here is the model's.
                return Err(ScoreError::Load {
                    path: path.to_path_buf(),
                    reason,
                });
            }
            Err((reason, _)) if options.provider == ExecutionProvider::Auto => {
                let note = format!(
                    "auto: {provider} unavailable ({}); trying the next provider",
                    explain_registration_failure(&reason)
                );
                tracing::warn!("{note}");
                notes.push(note);
            }
            Err((reason, cache_dir)) => {
                // TensorRT may build its engine while the session is created: a build failure
                // or running out of memory is not a missing provider.
                let context = RunContext {
                    provider,
                    batch_size: options.batch_size,
                    cache_dir: cache_dir.as_deref(),
                };
                if let e @ (ScoreError::GpuOutOfMemory { .. } | ScoreError::TensorRtBuild { .. }) =
                    classify_run_error(reason.clone(), &context)
                {
                    return Err(e);
                }
                return Err(ScoreError::ProviderUnavailable {
                    provider,
                    reason: explain_registration_failure(&reason),
                    available: available_providers().join(", "),
                });
            }
        }
    }
    Err(ScoreError::Load {
        path: path.to_path_buf(),
        reason: "no execution provider could load the model".into(),
    })
}

fn open_one(
    model: &[u8],
    options: &ScorerOptions,
    facts: &ModelFacts,
    provider: ExecutionProvider,
    device_id: i32,
    weights: Option<&PrepackedWeights>,
) -> Result<Opened, (String, Option<PathBuf>)> {
    let (plan, cache_dir) = if provider == ExecutionProvider::TensorRt {
        let ort_lib = crate::onnxruntime::init(None).map_err(|e| (e.to_string(), None))?;
        let plan = TensorRtPlan::new(facts, model, options, ort_lib);
        let folder = plan.cache_folder(device_id).map_err(|e| (e, None))?;
        (Some(plan), folder)
    } else {
        (None, None)
    };
    let providers = dispatches(
        provider,
        options,
        device_id,
        facts,
        plan.as_ref().map(|p| (p, cache_dir.as_deref())),
    );
    let session = builder(options, weights, providers)
        .and_then(|mut b| b.commit_from_memory(model).map_err(|e| e.to_string()))
        .map_err(|reason| (reason, cache_dir.clone()))?;
    Ok(Opened {
        provider,
        session,
        cache_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx_props::GraphInput;

    fn facts(ops: &[(&str, &str)], doc: &str) -> ModelFacts {
        ModelFacts {
            quantization: None,
            summary: GraphSummary {
                inputs: vec![GraphInput {
                    name: "pixels_uint8".into(),
                    elem_type: ONNX_UINT8,
                    dims: vec![None, Some(224), Some(224), Some(3)],
                }],
                ops: ops
                    .iter()
                    .map(|(d, o)| (d.to_string(), o.to_string()))
                    .collect(),
                doc_string: doc.into(),
            },
            input: Some(InputKind::PixelsUint8),
            fixed_batch: None,
            image_size: Some(224),
            model_hash: std::sync::OnceLock::new(),
        }
    }

    #[test]
    fn tensorrt_refuses_microsoft_ops_and_auto_skips_it() {
        let fused = facts(
            &[("", "MatMul"), ("com.microsoft", "MultiHeadAttention")],
            "",
        );
        let path = Path::new("m.onnx");
        let explicit = ScorerOptions {
            provider: ExecutionProvider::TensorRt,
            ..ScorerOptions::default()
        };
        let err = refusal(&fused, ExecutionProvider::TensorRt, &explicit, path).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ScoreError::UnsupportedOps { .. }), "{text}");
        assert!(
            text.contains("MultiHeadAttention") && text.contains("--provider cuda"),
            "{text}"
        );
        let auto = ScorerOptions::default();
        let note = refusal(&fused, ExecutionProvider::TensorRt, &auto, path).unwrap();
        assert!(note.unwrap().contains("com.microsoft"));
        // CUDA takes them, and a plain graph goes to TensorRT.
        assert!(refusal(&fused, ExecutionProvider::Cuda, &explicit, path)
            .unwrap()
            .is_none());
        let plain = facts(&[("", "MatMul")], "");
        assert!(
            refusal(&plain, ExecutionProvider::TensorRt, &explicit, path)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn profile_and_precision_come_from_graph_and_options() {
        let f = facts(&[], "ViT-B/16 ..., fp16 precision.");
        assert!(f.fp16_weights());
        let options = ScorerOptions {
            batch_size: 64,
            tensorrt_fp16: true,
            ..ScorerOptions::default()
        };
        let shapes = f.profile_shapes(&options).unwrap();
        assert_eq!(shapes.min, "pixels_uint8:1x224x224x3");
        assert_eq!(shapes.opt, "pixels_uint8:64x224x224x3");
        assert_eq!(f.tensorrt_precision(&options), "fp16");
        let fixed = ModelFacts {
            fixed_batch: Some(8),
            ..facts(&[], "")
        };
        assert!(fixed.profile_shapes(&options).is_none());
        assert!(!fixed.fp16_weights());
    }

    #[test]
    fn cache_folders_are_created_keyed_and_described() {
        let root = tempfile::tempdir().unwrap();
        let f = facts(&[], "fp16 precision.");
        let options = ScorerOptions {
            tensorrt_fp16: true,
            tensorrt_cache_dir: Some(root.path().to_path_buf()),
            batch_size: 32,
            ..ScorerOptions::default()
        };
        let plan = TensorRtPlan::new(
            &f,
            b"model bytes",
            &options,
            Path::new("/nowhere/libonnxruntime.so"),
        );
        assert_eq!(plan.precision, "fp16");
        assert_ne!(plan.model_hash, 0);
        let d0 = plan.cache_folder(0).unwrap().unwrap();
        let key = std::fs::read_to_string(d0.join("key.txt")).unwrap();
        assert!(
            key.contains("profile_max = pixels_uint8:32x224x224x3"),
            "{key}"
        );
        assert!(key.contains("precision = fp16"), "{key}");
        assert_eq!(d0.parent(), Some(root.path()));
        // Without nvidia-smi the ordinal stands in for the GPU, so GPUs never share engines
        // (with it, identical GPUs may: their engines are interchangeable).
        if tensorrt_cache::gpu_identity(0).is_none() {
            assert_ne!(plan.cache_folder(1).unwrap().unwrap(), d0);
        }
        let fp32 = TensorRtPlan::new(
            &f,
            b"model bytes",
            &ScorerOptions {
                tensorrt_fp16: false,
                ..options.clone()
            },
            Path::new("/nowhere/libonnxruntime.so"),
        );
        assert_ne!(fp32.cache_folder(0).unwrap().unwrap(), d0);
        let none = TensorRtPlan::new(&f, b"m", &ScorerOptions::default(), Path::new("/x"));
        assert!(none.cache_folder(0).unwrap().is_none());
    }

    #[test]
    fn cpu_dispatch_carries_the_arena_choice() {
        // Building the option list needs no library; CUDA/TensorRT add theirs before CPU.
        let f = facts(&[], "");
        let options = ScorerOptions::default();
        assert_eq!(
            dispatches(ExecutionProvider::Cpu, &options, 0, &f, None).len(),
            1
        );
        assert_eq!(
            dispatches(ExecutionProvider::Cuda, &options, 1, &f, None).len(),
            2
        );
        assert_eq!(
            dispatches(ExecutionProvider::TensorRt, &options, 0, &f, None).len(),
            3
        );
    }
}
