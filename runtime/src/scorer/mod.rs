//! [`Scorer`]: an exported CLIP-AGIQA `.onnx` on ONNX Runtime, checked against the graph
//! contract at load, preprocessing and head names read from the model's own metadata.
//!
//! The contract (see [`crate::metadata::INPUT_PIXEL_VALUES`]): one input, float32
//! `pixel_values [N, 3, R, R]` or uint8 `pixels_uint8 [N, R, R, 3]`, one float32 output,
//! `score [N]` or `scores [N, H]`, and `agiqa.*` metadata whose `preprocessing.image_size` is `R`
//! and whose `heads` has `H` entries. Anything else is refused at load, not at the first request.
//!
//! GPU set-up lives beside it: `providers` (what each provider is told), [`tensorrt_cache`]
//! (profiles, keyed engine caches), [`io_binding`] (reused pinned buffers), [`devices`]
//! (sessions on several GPUs and which runs the next batch), `error` (ONNX Runtime's GPU
//! error text read into actionable errors).

mod contract;
pub mod devices;
mod error;
pub mod io_binding;
mod options;
mod providers;
mod session;
pub mod tensorrt_cache;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use ort::session::builder::PrepackedWeights;
use ort::value::TensorElementType;

use self::devices::{Batch, BatchRunner, Pool};
pub use self::error::{ProviderRefusal, ScoreError};
use self::io_binding::{Bound, BoundSpec, Memory};
pub use self::options::{
    ConvSearch, DeviceIds, ExecutionProvider, GraphOptimization, ScorerOptions, TensorRtProfile,
    MAX_DEVICE_ID,
};
pub use self::providers::available_providers;
use self::session::SessionRunner;
pub use crate::metadata::InputKind;
use crate::metadata::{ModelMetadata, OUTPUT_SCORES};
use crate::preprocess::{PreprocessError, Preprocessor};

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

/// An exported model ready to score. `Send + Sync`: share it (`Arc<Scorer>`) across threads.
pub struct Scorer {
    path: PathBuf,
    pool: Pool<SessionRunner>,
    metadata: ModelMetadata,
    preprocessor: Preprocessor,
    input: InputKind,
    /// Fixed batch dimension of the graph, when it has one (then batches are padded to it).
    fixed_batch: Option<usize>,
    provider: ExecutionProvider,
    provider_notes: Vec<String>,
    options: ScorerOptions,
    graph_description: Option<String>,
    io_binding: bool,
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

/// Option combinations that cannot work, refused before any session is opened.
fn check_options(options: &ScorerOptions) -> Result<(), ScoreError> {
    let bad = |m: String| Err(ScoreError::Options(m));
    if options.batch_size == 0 {
        return Err(ScoreError::Tensor("batch size must be at least 1".into()));
    }
    if options.cuda_graph {
        if options.provider == ExecutionProvider::Cpu {
            return bad("--cuda-graph needs --provider cuda or tensorrt".into());
        }
        if options.io_binding == Some(false) {
            return bad("--cuda-graph needs IoBinding (drop --no-io-binding)".into());
        }
    }
    if let Some(profile) = options.tensorrt_profile {
        tensorrt_cache::check_profile(profile, options.batch_size).or_else(bad)?;
    }
    Ok(())
}

impl Scorer {
    /// Loads an exported model and checks it against the graph contract.
    pub fn load(path: &Path, options: ScorerOptions) -> Result<Scorer, ScoreError> {
        crate::onnxruntime::init(options.ort_lib.as_deref())?;
        check_options(&options)?;
        let model = std::fs::read(path).map_err(|e| ScoreError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let facts = providers::model_facts(&model, path)?;
        let devices = options.device_id.ids().to_vec();
        let mut notes = Vec::new();
        let first = providers::open_session(
            &model,
            path,
            &options,
            &facts,
            options.device_id.first(),
            None,
            None,
            &mut notes,
        )?;
        let provider = first.provider;
        let contract = contract::check_contract(&first.session, path)?;
        // CPU sessions have no device: one group of `sessions`.
        let devices = if provider.is_gpu() {
            devices
        } else {
            if devices.len() > 1 {
                notes.push(format!(
                    "--device-id {} ignored on {provider}",
                    options.device_id
                ));
            }
            devices[..1].to_vec()
        };
        let io_binding = options.uses_io_binding(provider);
        let cuda_graph = options.cuda_graph && provider.is_gpu();
        if options.cuda_graph && !cuda_graph {
            notes.push(format!(
                "--cuda-graph ignored: the model runs on {provider}"
            ));
        }
        let batch_size = contract.fixed_batch.unwrap_or(options.batch_size);
        let runner =
            |opened: providers::Opened, device_id: i32| -> Result<SessionRunner, ScoreError> {
                let r = contract.metadata.preprocessing.image_size as usize;
                let bound = if io_binding {
                    let memory = match (provider, cuda_graph) {
                        (ExecutionProvider::Cpu | ExecutionProvider::Auto, _) => Memory::Cpu,
                        (_, true) => Memory::CudaGraph(device_id),
                        (_, false) => Memory::CudaPinned(device_id),
                    };
                    let spec = BoundSpec {
                        input_name: contract.input.name(),
                        input_type: match contract.input {
                            InputKind::PixelValues => TensorElementType::Float32,
                            InputKind::PixelsUint8 => TensorElementType::Uint8,
                        },
                        image_shape: match contract.input {
                            InputKind::PixelValues => [3, r, r],
                            InputKind::PixelsUint8 => [r, r, 3],
                        },
                        output_name: contract.output_name,
                        heads: (contract.output_name == OUTPUT_SCORES)
                            .then_some(contract.metadata.heads.len()),
                        max_rows: batch_size,
                        pad_all: contract.fixed_batch.is_some(),
                    };
                    Some(Bound::new(&opened.session, memory, spec).map_err(|reason| {
                        ScoreError::Load {
                            path: path.to_path_buf(),
                            reason: format!("cannot set up IoBinding: {reason}"),
                        }
                    })?)
                } else {
                    None
                };
                Ok(SessionRunner {
                    session: opened.session,
                    bound,
                    provider,
                    cache_dir: opened.cache_dir,
                    input_name: contract.input.name(),
                    image_size: r,
                    output_name: contract.output_name,
                    heads: contract.metadata.heads.len(),
                    fixed_batch: contract.fixed_batch,
                })
            };
        let sessions = options.sessions.max(1);
        let weights = PrepackedWeights::new();
        let mut per_device = Vec::new();
        let mut first = Some(first);
        for &device_id in &devices {
            let mut runners = Vec::with_capacity(sessions);
            for _ in 0..sessions {
                let opened = match first.take() {
                    Some(opened) => opened,
                    None => providers::open_session(
                        &model,
                        path,
                        &options,
                        &facts,
                        device_id,
                        Some(provider),
                        Some(&weights),
                        &mut notes,
                    )?,
                };
                runners.push(runner(opened, device_id)?);
            }
            per_device.push((device_id, runners));
        }
        if let Some(n) = contract.fixed_batch {
            notes.push(format!(
                "the graph has a fixed batch size of {n}; batches are padded to it"
            ));
        }
        let scorer = Scorer {
            path: path.to_path_buf(),
            pool: Pool::new(per_device),
            preprocessor: Preprocessor::new(contract.metadata.preprocessing.clone()),
            metadata: contract.metadata,
            input: contract.input,
            fixed_batch: contract.fixed_batch,
            provider,
            provider_notes: notes,
            graph_description: contract.graph_description,
            io_binding,
            options,
        };
        if scorer.options.warmup.unwrap_or(provider.is_gpu()) {
            scorer.warm_up()?;
        }
        tracing::info!(model = %path.display(), provider = %provider, sessions = scorer.pool.len(), io_binding, "model loaded");
        Ok(scorer)
    }

    /// Runs one full batch of zeros on every session: TensorRT builds (or loads) its engine and
    /// cuDNN searches its algorithms now rather than in the first request.
    fn warm_up(&self) -> Result<(), ScoreError> {
        let rows = self.batch_size();
        let len = rows * self.input_len();
        let (f32_zeros, u8_zeros);
        let batch = match self.input {
            InputKind::PixelValues => {
                f32_zeros = vec![0f32; len];
                Batch::PixelValues {
                    data: &f32_zeros,
                    rows,
                }
            }
            InputKind::PixelsUint8 => {
                u8_zeros = vec![0u8; len];
                Batch::PixelsUint8 {
                    data: &u8_zeros,
                    rows,
                }
            }
        };
        self.pool.each(|device, runner| {
            let started = Instant::now();
            runner.run(batch)?;
            let seconds = started.elapsed().as_secs_f64();
            match &runner.cache_dir {
                Some(dir) if runner.provider == ExecutionProvider::TensorRt => tracing::info!(
                    device, seconds, batch = rows, cache = %dir.display(),
                    "TensorRT engine built or loaded from the cache (warm-up)"
                ),
                _ if runner.provider == ExecutionProvider::TensorRt => tracing::info!(
                    device, seconds, batch = rows,
                    "TensorRT engine built (warm-up; --trt-cache keeps it for later starts)"
                ),
                _ => tracing::info!(device, seconds, batch = rows, provider = %runner.provider, "warm-up run"),
            }
            Ok(())
        })
    }

    /// Sessions in use (per device × devices), and the device of each.
    pub fn session_devices(&self) -> Vec<i32> {
        self.pool.devices()
    }

    /// Whether runs go through IoBinding (reused, pinned on CUDA, buffers).
    pub fn uses_io_binding(&self) -> bool {
        self.io_binding
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

    // Batches above the batch size (a caller of `run_batch` may pass one) are split: bound
    // buffers and TensorRT profiles end at it.
    fn run_f32(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, ScoreError> {
        let mut out = Vec::new();
        for data in data.chunks(self.batch_size() * self.input_len()) {
            let rows = data.len() / self.input_len();
            out.extend(self.pool.run(Batch::PixelValues { data, rows })?);
        }
        Ok(out)
    }

    fn run_u8(&self, data: &[u8]) -> Result<Vec<Vec<f32>>, ScoreError> {
        let mut out = Vec::new();
        for data in data.chunks(self.batch_size() * self.input_len()) {
            let rows = data.len() / self.input_len();
            out.extend(self.pool.run(Batch::PixelsUint8 { data, rows })?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_option_combinations_are_refused() {
        let cpu_graph = ScorerOptions {
            provider: ExecutionProvider::Cpu,
            cuda_graph: true,
            ..ScorerOptions::default()
        };
        let err = check_options(&cpu_graph).unwrap_err().to_string();
        assert!(err.contains("--cuda-graph needs --provider cuda"), "{err}");
        let unbound = ScorerOptions {
            provider: ExecutionProvider::Cuda,
            cuda_graph: true,
            io_binding: Some(false),
            ..ScorerOptions::default()
        };
        let err = check_options(&unbound).unwrap_err().to_string();
        assert!(err.contains("IoBinding"), "{err}");
        let small = ScorerOptions {
            batch_size: 32,
            tensorrt_profile: Some(TensorRtProfile {
                min: 1,
                opt: 8,
                max: 16,
            }),
            ..ScorerOptions::default()
        };
        let err = check_options(&small).unwrap_err().to_string();
        assert!(err.contains("below the batch size 32"), "{err}");
        assert!(check_options(&ScorerOptions::default()).is_ok());
    }
}
