//! [`Scorer`]: an exported CLIP-AGIQA `.onnx` on ONNX Runtime, checked against the graph
//! contract at load, preprocessing and head names read from the model's own metadata.
//!
//! The contract (see [`crate::metadata::INPUT_PIXEL_VALUES`]): one input, float32
//! `pixel_values [N, 3, R, R]` or uint8 `pixels_uint8 [N, R, R, 3]`, one float32 output,
//! `score [N]` or `scores [N, H]`, and `agiqa.*` metadata whose `preprocessing.image_size` is `R`
//! and whose `heads` has `H` entries. Anything else is refused at load, not at the first request.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use image::RgbImage;
use ort::ep::{self, ExecutionProvider as _, ExecutionProviderDispatch};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights, SessionBuilder};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};
use serde::{Deserialize, Serialize};

pub use crate::metadata::InputKind;
use crate::metadata::{
    Int8Mode, MetadataError, ModelMetadata, Quantization, INPUT_PIXELS_UINT8, INPUT_PIXEL_VALUES,
    OUTPUT_IMAGE_FEATURES, OUTPUT_SCORE, OUTPUT_SCORES,
};
use crate::onnxruntime::OrtLibraryError;
use crate::preprocess::{DecodeLimits, JpegDecoding, PreprocessError, Preprocessor};

/// Which ONNX Runtime execution provider to run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    Cpu,
    Cuda,
    #[serde(rename = "tensorrt")]
    TensorRt,
    /// TensorRT, then CUDA, then CPU: the first that loads; each fallback is logged and kept in
    /// [`Scorer::provider_notes`].
    #[default]
    Auto,
}

impl ExecutionProvider {
    /// The order `auto` tries.
    pub const AUTO_ORDER: [ExecutionProvider; 3] = [
        ExecutionProvider::TensorRt,
        ExecutionProvider::Cuda,
        ExecutionProvider::Cpu,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::TensorRt => "tensorrt",
            ExecutionProvider::Auto => "auto",
        }
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExecutionProvider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(ExecutionProvider::Cpu),
            "cuda" => Ok(ExecutionProvider::Cuda),
            "tensorrt" | "trt" => Ok(ExecutionProvider::TensorRt),
            "auto" => Ok(ExecutionProvider::Auto),
            other => Err(format!(
                "unknown execution provider '{other}' (expected cpu, cuda, tensorrt or auto)"
            )),
        }
    }
}

/// How a [`Scorer`] is set up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScorerOptions {
    pub provider: ExecutionProvider,
    /// ONNX Runtime intra-op threads; `None` lets ONNX Runtime use every core.
    pub threads: Option<usize>,
    /// Most images per inference call.
    pub batch_size: usize,
    /// GPU ordinal for CUDA and TensorRT.
    pub device_id: i32,
    /// Let TensorRT build fp16 engines (LayerNorm kept in fp32, which ViTs need).
    pub tensorrt_fp16: bool,
    /// Folder for TensorRT engines, so later loads skip the (minutes-long) engine build.
    pub tensorrt_cache_dir: Option<PathBuf>,
    /// Independent sessions (each owns its run state; weights are prepacked once and shared).
    /// More than one lets several threads run inference at the same time.
    pub sessions: usize,
    /// Whether ONNX Runtime's idle worker threads spin. Spinning shaves latency off
    /// back-to-back runs but burns the cores that decoding needs in the throughput pipeline.
    pub intra_op_spinning: bool,
    /// Limits applied when this scorer decodes images (bytes and files).
    pub decode_limits: DecodeLimits,
    /// Exact JPEG decoding (the default), or reduced-size decoding of large JPEGs: faster,
    /// scores change slightly (see [`JpegDecoding::Reduced`]).
    pub jpeg_decoding: JpegDecoding,
    /// Explicit `libonnxruntime` path (else `ORT_DYLIB_PATH`, beside the executable, `.deps/lib`).
    pub ort_lib: Option<PathBuf>,
}

impl Default for ScorerOptions {
    fn default() -> Self {
        ScorerOptions {
            provider: ExecutionProvider::Auto,
            threads: None,
            batch_size: 16,
            device_id: 0,
            tensorrt_fp16: false,
            tensorrt_cache_dir: None,
            sessions: 1,
            intra_op_spinning: true,
            decode_limits: DecodeLimits::default(),
            jpeg_decoding: JpegDecoding::Exact,
            ort_lib: None,
        }
    }
}

/// One image turned into exactly what the model's input takes.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelInput {
    /// `[3, R, R]` normalised (for `pixel_values`).
    PixelValues(Vec<f32>),
    /// `[R, R, 3]` RGB (for `pixels_uint8`).
    PixelsUint8(Vec<u8>),
}

/// A batch of ready tensors in the model's input layout, `N` images back to back.
#[derive(Clone, Copy, Debug)]
pub enum TensorBatch<'a> {
    /// `N · 3 · R · R` values, `[N, 3, R, R]`.
    PixelValues(&'a [f32]),
    /// `N · R · R · 3` values, `[N, R, R, 3]`.
    PixelsUint8(&'a [u8]),
}

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
    first: String,
    hint: &'static str,
}

/// An exported model ready to score. `Send + Sync`: share it (`Arc<Scorer>`) across threads.
pub struct Scorer {
    path: PathBuf,
    sessions: Vec<Mutex<Session>>,
    next_session: AtomicUsize,
    metadata: ModelMetadata,
    preprocessor: Preprocessor,
    input: InputKind,
    output_name: &'static str,
    /// Fixed batch dimension of the graph, when it has one (then batches are padded to it).
    fixed_batch: Option<usize>,
    provider: ExecutionProvider,
    provider_notes: Vec<String>,
    options: ScorerOptions,
    graph_description: Option<String>,
}

impl fmt::Debug for Scorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scorer")
            .field("path", &self.path)
            .field("input", &self.input)
            .field("heads", &self.head_names())
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl Scorer {
    /// Loads an exported model and checks it against the graph contract.
    pub fn load(path: &Path, options: ScorerOptions) -> Result<Scorer, ScoreError> {
        crate::onnxruntime::init(options.ort_lib.as_deref())?;
        let model = std::fs::read(path).map_err(|e| ScoreError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let quantization = quantization_of(&model, path)?;
        let (provider, mut notes, first) =
            open_session(&model, path, &options, None, quantization.as_ref())?;
        let contract = check_contract(&first, path)?;
        let mut sessions = vec![Mutex::new(first)];
        if options.sessions > 1 {
            let weights = PrepackedWeights::new();
            for _ in 1..options.sessions {
                let (_, _, session) =
                    open_session(&model, path, &options, Some((provider, &weights)), None)?;
                sessions.push(Mutex::new(session));
            }
        }
        if options.batch_size == 0 {
            return Err(ScoreError::Tensor("batch size must be at least 1".into()));
        }
        if let Some(n) = contract.fixed_batch {
            notes.push(format!(
                "the graph has a fixed batch size of {n}; batches are padded to it"
            ));
        }
        tracing::info!(model = %path.display(), provider = %provider, "model loaded");
        Ok(Scorer {
            path: path.to_path_buf(),
            sessions,
            next_session: AtomicUsize::new(0),
            preprocessor: Preprocessor::new(contract.metadata.preprocessing.clone()),
            metadata: contract.metadata,
            input: contract.input,
            output_name: contract.output_name,
            fixed_batch: contract.fixed_batch,
            provider,
            provider_notes: notes,
            options,
            graph_description: contract.graph_description,
        })
    }

    /// The model's metadata (`agiqa.*` props).
    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// Head names, in the order of each image's scores.
    pub fn head_names(&self) -> Vec<&str> {
        self.metadata
            .heads
            .iter()
            .map(|h| h.name.as_str())
            .collect()
    }

    /// The execution provider that actually runs the model (never `Auto`).
    pub fn provider(&self) -> ExecutionProvider {
        self.provider
    }

    /// Why providers were skipped (for `auto`) and other load-time remarks.
    pub fn provider_notes(&self) -> &[String] {
        &self.provider_notes
    }

    pub fn input_kind(&self) -> InputKind {
        self.input
    }

    /// The shared preprocessing configured from the model's metadata.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// The graph's own description (the exporter writes backbone, heads, input and precision).
    pub fn graph_description(&self) -> Option<&str> {
        self.graph_description.as_deref()
    }

    /// Precision of the image encoder's weights, `fp32` or `fp16`, as the exporter's graph
    /// description records it (`…, fp16 precision.`); `None` for graphs that do not say.
    pub fn weight_precision(&self) -> Option<&'static str> {
        let description = self.graph_description.as_deref()?;
        ["fp32", "fp16"]
            .into_iter()
            .find(|p| description.contains(&format!("{p} precision")))
    }

    pub fn options(&self) -> &ScorerOptions {
        &self.options
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Most images one inference call takes.
    pub fn batch_size(&self) -> usize {
        self.fixed_batch.unwrap_or(self.options.batch_size)
    }

    /// Values per image of the model input (`3 · R · R`, for both input kinds).
    pub fn input_len(&self) -> usize {
        self.preprocessor.config().tensor_len()
    }

    /// A decoded image → this model's input (the shared preprocessing; for `pixels_uint8` the
    /// resized and cropped pixels, normalised by the graph).
    pub fn prepare(&self, image: &RgbImage) -> Result<ModelInput, PreprocessError> {
        match self.input {
            InputKind::PixelValues => self
                .preprocessor
                .preprocess(image)
                .map(ModelInput::PixelValues),
            InputKind::PixelsUint8 => self
                .preprocessor
                .resize_and_crop(image)
                .map(|square| ModelInput::PixelsUint8(square.into_raw())),
        }
    }

    /// Encoded bytes → this model's input, with the scorer's decode limits and JPEG decoding.
    pub fn prepare_bytes(&self, bytes: &[u8]) -> Result<ModelInput, PreprocessError> {
        self.prepare(&self.preprocessor.decode_with(
            bytes,
            &self.options.decode_limits,
            self.options.jpeg_decoding,
        )?)
    }

    /// An image file → this model's input; errors name the file.
    pub fn prepare_file(&self, path: &Path) -> Result<ModelInput, PreprocessError> {
        let bytes = std::fs::read(path).map_err(|source| PreprocessError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.prepare_bytes(&bytes).map_err(|e| e.in_file(path))
    }

    /// Scores prepared inputs (any number; run in batches of [`Scorer::batch_size`]). One
    /// `Vec` per image, one score per head in [`Scorer::head_names`] order.
    pub fn score_inputs(&self, inputs: &[ModelInput]) -> Result<Vec<Vec<f32>>, ScoreError> {
        let mut out = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(self.batch_size()) {
            out.extend(self.run_batch(chunk)?);
        }
        Ok(out)
    }

    /// Scores decoded images.
    pub fn score_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, ScoreError> {
        let inputs = images
            .iter()
            .map(|img| self.prepare(img))
            .collect::<Result<Vec<_>, _>>()?;
        self.score_inputs(&inputs)
    }

    /// Scores one decoded image.
    pub fn score_image(&self, image: &RgbImage) -> Result<Vec<f32>, ScoreError> {
        let input = self.prepare(image)?;
        self.single(input)
    }

    /// Scores one encoded image (JPEG, PNG, GIF, WebP, BMP, TIFF) held in memory.
    pub fn score_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>, ScoreError> {
        let input = self.prepare_bytes(bytes)?;
        self.single(input)
    }

    /// Scores one image file. For many files use [`crate::pipeline`], which decodes in parallel.
    pub fn score_file(&self, path: &Path) -> Result<Vec<f32>, ScoreError> {
        let input = self.prepare_file(path)?;
        self.single(input)
    }

    fn single(&self, input: ModelInput) -> Result<Vec<f32>, ScoreError> {
        self.run_batch(std::slice::from_ref(&input))?
            .pop()
            .ok_or_else(|| ScoreError::Inference("the model returned no scores".into()))
    }

    /// Scores a ready tensor batch in the model's input layout (`N` inferred from its length).
    pub fn score_tensor(&self, batch: TensorBatch<'_>) -> Result<Vec<Vec<f32>>, ScoreError> {
        let per_image = self.input_len();
        let (kind, len) = match batch {
            TensorBatch::PixelValues(d) => (InputKind::PixelValues, d.len()),
            TensorBatch::PixelsUint8(d) => (InputKind::PixelsUint8, d.len()),
        };
        if kind != self.input {
            return Err(ScoreError::Tensor(format!(
                "the model takes `{}`, not `{}`",
                self.input.name(),
                kind.name()
            )));
        }
        if len == 0 || len % per_image != 0 {
            return Err(ScoreError::Tensor(format!(
                "{len} values is not a whole number of {per_image}-value images"
            )));
        }
        let n = len / per_image;
        let step = self.batch_size() * per_image;
        let mut out = Vec::with_capacity(n);
        match batch {
            TensorBatch::PixelValues(d) => {
                for chunk in d.chunks(step) {
                    out.extend(self.run_f32(chunk)?);
                }
            }
            TensorBatch::PixelsUint8(d) => {
                for chunk in d.chunks(step) {
                    out.extend(self.run_u8(chunk)?);
                }
            }
        }
        Ok(out)
    }

    /// Runs one batch of at most [`Scorer::batch_size`] prepared inputs.
    pub fn run_batch(&self, inputs: &[ModelInput]) -> Result<Vec<Vec<f32>>, ScoreError> {
        let per_image = self.input_len();
        let wrong = |i: usize| {
            ScoreError::Tensor(format!(
                "input {i} is not a {per_image}-value `{}` image",
                self.input.name()
            ))
        };
        match self.input {
            InputKind::PixelValues => {
                let mut data = Vec::with_capacity(inputs.len() * per_image);
                for (i, input) in inputs.iter().enumerate() {
                    match input {
                        ModelInput::PixelValues(v) if v.len() == per_image => {
                            data.extend_from_slice(v)
                        }
                        _ => return Err(wrong(i)),
                    }
                }
                self.run_f32(&data)
            }
            InputKind::PixelsUint8 => {
                let mut data = Vec::with_capacity(inputs.len() * per_image);
                for (i, input) in inputs.iter().enumerate() {
                    match input {
                        ModelInput::PixelsUint8(v) if v.len() == per_image => {
                            data.extend_from_slice(v)
                        }
                        _ => return Err(wrong(i)),
                    }
                }
                self.run_u8(&data)
            }
        }
    }

    fn run_f32(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, ScoreError> {
        let r = self.preprocessor.config().image_size as usize;
        let n = data.len() / self.input_len();
        let padded = self.pad(data, n);
        let data = padded.as_deref().unwrap_or(data);
        let rows = data.len() / self.input_len();
        let tensor = TensorRef::from_array_view(([rows, 3, r, r], data))
            .map_err(|e| ScoreError::Tensor(e.to_string()))?;
        self.run_value(tensor.into(), n)
    }

    fn run_u8(&self, data: &[u8]) -> Result<Vec<Vec<f32>>, ScoreError> {
        let r = self.preprocessor.config().image_size as usize;
        let n = data.len() / self.input_len();
        let padded = self.pad(data, n);
        let data = padded.as_deref().unwrap_or(data);
        let rows = data.len() / self.input_len();
        let tensor = TensorRef::from_array_view(([rows, r, r, 3], data))
            .map_err(|e| ScoreError::Tensor(e.to_string()))?;
        self.run_value(tensor.into(), n)
    }

    /// Zero rows up to a graph's fixed batch size.
    fn pad<T: Copy + Default>(&self, data: &[T], n: usize) -> Option<Vec<T>> {
        let fixed = self.fixed_batch?;
        (n < fixed).then(|| {
            let mut padded = data.to_vec();
            padded.resize(fixed * self.input_len(), T::default());
            padded
        })
    }

    fn run_value(
        &self,
        value: ort::session::SessionInputValue<'_>,
        n: usize,
    ) -> Result<Vec<Vec<f32>>, ScoreError> {
        let heads = self.metadata.heads.len();
        let slot = self.next_session.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
        // A panic while another thread held the lock leaves the session itself intact.
        let mut session = self.sessions[slot]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let outputs = session
            .run(ort::inputs![self.input.name() => value])
            .map_err(|e| ScoreError::Inference(e.to_string()))?;
        let output = outputs
            .get(self.output_name)
            .ok_or_else(|| ScoreError::Inference(format!("no output `{}`", self.output_name)))?;
        let (shape, values) = output
            .try_extract_tensor::<f32>()
            .map_err(|e| ScoreError::Inference(e.to_string()))?;
        let rows = shape.first().copied().unwrap_or(0) as usize;
        if values.len() != rows * heads || rows < n {
            return Err(ScoreError::Inference(format!(
                "output `{}` has shape {shape:?}; expected [{n}{}]",
                self.output_name,
                if self.output_name == OUTPUT_SCORES {
                    format!(", {heads}")
                } else {
                    String::new()
                }
            )));
        }
        Ok(values.chunks(heads).take(n).map(<[f32]>::to_vec).collect())
    }
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

/// The providers registered for one concrete choice; failures are errors, never silent CPU.
fn dispatches(
    provider: ExecutionProvider,
    options: &ScorerOptions,
) -> Vec<ExecutionProviderDispatch> {
    let cuda = || {
        ep::CUDA::default()
            .with_device_id(options.device_id)
            .build()
            .error_on_failure()
    };
    match provider {
        ExecutionProvider::Cpu | ExecutionProvider::Auto => vec![],
        ExecutionProvider::Cuda => vec![cuda()],
        ExecutionProvider::TensorRt => {
            let mut trt = ep::TensorRT::default()
                .with_device_id(options.device_id)
                .with_fp16(options.tensorrt_fp16)
                .with_layer_norm_fp32_fallback(options.tensorrt_fp16);
            if let Some(dir) = &options.tensorrt_cache_dir {
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(dir.display());
            }
            // CUDA runs what TensorRT does not take.
            vec![trt.build().error_on_failure(), cuda()]
        }
    }
}

fn builder(
    provider: ExecutionProvider,
    options: &ScorerOptions,
    weights: Option<&PrepackedWeights>,
) -> Result<SessionBuilder, String> {
    let environment = crate::onnxruntime::environment()
        .ok_or_else(|| "ONNX Runtime is not initialised".to_string())?;
    let mut b = Session::builder(environment)
        .map_err(|e| e.to_string())?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| e.to_string())?
        .with_intra_op_spinning(options.intra_op_spinning)
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
    b.with_execution_providers(dispatches(provider, options))
        .map_err(|e| format!("provider: {e}"))
}

/// Opens one session: the requested provider, or for `auto` the first of
/// [`ExecutionProvider::AUTO_ORDER`] that loads. Returns the provider in use and the notes.
fn open_session(
    model: &[u8],
    path: &Path,
    options: &ScorerOptions,
    fixed: Option<(ExecutionProvider, &PrepackedWeights)>,
    quantization: Option<&Quantization>,
) -> Result<(ExecutionProvider, Vec<String>, Session), ScoreError> {
    let (candidates, weights): (Vec<ExecutionProvider>, _) = match (fixed, options.provider) {
        (Some((provider, weights)), _) => (vec![provider], Some(weights)),
        (None, ExecutionProvider::Auto) => (ExecutionProvider::AUTO_ORDER.to_vec(), None),
        (None, provider) => (vec![provider], None),
    };
    let mut notes = Vec::new();
    for provider in candidates {
        if let Some(q) = quantization.filter(|q| !q.supports(provider.as_str())) {
            if options.provider != ExecutionProvider::Auto {
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
            let note = format!(
                "auto: {provider} skipped: the {} int8 graph is built for {}",
                q.mode.name(),
                q.providers.join(", ")
            );
            tracing::info!("{note}");
            notes.push(note);
            continue;
        }
        let attempt = builder(provider, options, weights)
            .and_then(|mut b| b.commit_from_memory(model).map_err(|e| e.to_string()));
        match attempt {
            Ok(session) => return Ok((provider, notes, session)),
            Err(reason) if provider == ExecutionProvider::Cpu => {
                // CPU always registers; a failure here is the model's.
                return Err(ScoreError::Load {
                    path: path.to_path_buf(),
                    reason,
                });
            }
            Err(reason) if options.provider == ExecutionProvider::Auto => {
                let note =
                    format!("auto: {provider} unavailable ({reason}); trying the next provider");
                tracing::warn!("{note}");
                notes.push(note);
            }
            Err(reason) => {
                return Err(ScoreError::ProviderUnavailable {
                    provider,
                    reason,
                    available: available_providers().join(", "),
                })
            }
        }
    }
    Err(ScoreError::Load {
        path: path.to_path_buf(),
        reason: "no execution provider could load the model".into(),
    })
}

/// The int8 description the model carries (`agiqa.quantization`), read from its bytes before
/// any provider is registered; `None` for float graphs.
fn quantization_of(model: &[u8], path: &Path) -> Result<Option<Quantization>, ScoreError> {
    let props = crate::onnx_props::metadata_props(model).map_err(|e| ScoreError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    ModelMetadata::quantization_from_props(&props).map_err(|source| ScoreError::Metadata {
        path: path.to_path_buf(),
        source,
    })
}

struct Contract {
    metadata: ModelMetadata,
    input: InputKind,
    output_name: &'static str,
    fixed_batch: Option<usize>,
    graph_description: Option<String>,
}

fn check_contract(session: &Session, path: &Path) -> Result<Contract, ScoreError> {
    let problem = |p: String| ScoreError::Contract {
        path: path.to_path_buf(),
        problem: p,
    };
    let meta = session
        .metadata()
        .map_err(|e| problem(format!("cannot read metadata: {e}")))?;
    let keys = meta
        .custom_keys()
        .map_err(|e| problem(format!("cannot read metadata: {e}")))?;
    let props: BTreeMap<String, String> = keys
        .into_iter()
        .filter_map(|k| meta.custom(&k).map(|v| (k, v)))
        .collect();
    let metadata = ModelMetadata::from_props(&props).map_err(|source| ScoreError::Metadata {
        path: path.to_path_buf(),
        source,
    })?;
    if metadata.heads.is_empty() {
        return Err(problem("metadata lists no heads".into()));
    }
    let mut names: Vec<&str> = metadata.heads.iter().map(|h| h.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(problem(format!("head names are not unique: {names:?}")));
    }
    let r = i64::from(metadata.preprocessing.image_size);

    let [input] = session.inputs() else {
        return Err(problem(format!(
            "expected exactly one input (`{INPUT_PIXEL_VALUES}` or `{INPUT_PIXELS_UINT8}`), found {:?}",
            session.inputs().iter().map(|i| i.name()).collect::<Vec<_>>()
        )));
    };
    let (kind, want_ty, want_shape) = match input.name() {
        INPUT_PIXEL_VALUES => (
            InputKind::PixelValues,
            TensorElementType::Float32,
            [-1, 3, r, r],
        ),
        INPUT_PIXELS_UINT8 => (
            InputKind::PixelsUint8,
            TensorElementType::Uint8,
            [-1, r, r, 3],
        ),
        other => {
            return Err(problem(format!(
                "input is called `{other}`; expected `{INPUT_PIXEL_VALUES}` (float32 [N, 3, R, R]) \
                 or `{INPUT_PIXELS_UINT8}` (uint8 [N, R, R, 3])"
            )))
        }
    };
    let (ty, shape) = tensor_type(input.dtype())
        .ok_or_else(|| problem(format!("input `{}` is not a tensor", input.name())))?;
    if ty != want_ty {
        return Err(problem(format!(
            "input `{}` is {ty:?}; expected {want_ty:?}",
            input.name()
        )));
    }
    if shape.len() != 4
        || shape
            .iter()
            .zip(want_shape)
            .skip(1)
            .any(|(&got, want)| got >= 0 && got != want)
    {
        return Err(problem(format!(
            "input `{}` has shape {shape:?}; expected [N, {}] with R = {r} from metadata \
             preprocessing.image_size",
            input.name(),
            if kind == InputKind::PixelValues {
                "3, R, R"
            } else {
                "R, R, 3"
            }
        )));
    }
    let fixed_batch = (shape[0] > 0).then_some(shape[0] as usize);

    // The scores, optionally followed by the image embeddings (exported on request; the
    // scorer reads only the scores).
    let output = match session.outputs() {
        [output] => output,
        [output, extra] if extra.name() == OUTPUT_IMAGE_FEATURES => output,
        others => {
            return Err(problem(format!(
                "expected the output `{OUTPUT_SCORE}` or `{OUTPUT_SCORES}` (optionally followed \
                 by `{OUTPUT_IMAGE_FEATURES}`), found {:?}",
                others.iter().map(|o| o.name()).collect::<Vec<_>>()
            )))
        }
    };
    let heads = metadata.heads.len() as i64;
    let (ty, shape) = tensor_type(output.dtype())
        .ok_or_else(|| problem(format!("output `{}` is not a tensor", output.name())))?;
    if ty != TensorElementType::Float32 {
        return Err(problem(format!(
            "output `{}` is {ty:?}; expected Float32",
            output.name()
        )));
    }
    let output_name = match output.name() {
        OUTPUT_SCORE if shape.len() == 1 && heads == 1 => OUTPUT_SCORE,
        OUTPUT_SCORE => {
            return Err(problem(format!(
                "output `{OUTPUT_SCORE}` has shape {shape:?} and metadata lists {heads} heads; \
                 `{OUTPUT_SCORE}` must be [N] with exactly one head (use `{OUTPUT_SCORES}` [N, H] \
                 for several)"
            )))
        }
        OUTPUT_SCORES if shape.len() == 2 && (shape[1] < 0 || shape[1] == heads) => OUTPUT_SCORES,
        OUTPUT_SCORES => {
            return Err(problem(format!(
            "output `{OUTPUT_SCORES}` has shape {shape:?} but metadata lists {heads} heads {:?}; \
                 expected [N, {heads}]",
            metadata.heads.iter().map(|h| &h.name).collect::<Vec<_>>()
        )))
        }
        other => {
            return Err(problem(format!(
            "output is called `{other}`; expected `{OUTPUT_SCORE}` [N] or `{OUTPUT_SCORES}` [N, H]"
        )))
        }
    };
    Ok(Contract {
        metadata,
        input: kind,
        output_name,
        fixed_batch,
        graph_description: meta.graph_description().filter(|d| !d.is_empty()),
    })
}

fn tensor_type(ty: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_parse_and_print() {
        for p in [
            ExecutionProvider::Cpu,
            ExecutionProvider::Cuda,
            ExecutionProvider::TensorRt,
            ExecutionProvider::Auto,
        ] {
            assert_eq!(p.to_string().parse::<ExecutionProvider>(), Ok(p));
        }
        let err = "gpu".parse::<ExecutionProvider>().unwrap_err();
        assert!(err.contains("cpu, cuda, tensorrt or auto"), "{err}");
    }

    #[test]
    fn options_round_trip_through_json_with_defaults() {
        let options: ScorerOptions = serde_json::from_str(r#"{"provider": "tensorrt"}"#).unwrap();
        assert_eq!(options.provider, ExecutionProvider::TensorRt);
        assert_eq!(options.batch_size, ScorerOptions::default().batch_size);
    }
}
