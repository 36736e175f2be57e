//! `agiqa._agiqa`: the PyO3 layer between Python and `agiqa-runtime`. It converts types and
//! errors and releases the GIL; the scoring logic stays in the runtime, and the Python package
//! (`python/agiqa/`) finds ONNX Runtime and shapes the public API.
//!
//! Every entry point runs under [`guarded`], so a Rust panic reaches Python as
//! [`InternalError`] (an `agiqa.AgiqaError`), never as PyO3's `PanicException`.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use agiqa_runtime::batch_io::{collect_inputs as collect, OutputFormat};
use agiqa_runtime::pipeline::{score_paths, PipelineOptions};
use agiqa_runtime::score_files::{score_files as run_score_files, ResultsOut, ScoreFilesError};
use agiqa_runtime::score_files::{ScoreFilesOptions, ScoreObserver};
use agiqa_runtime::scorer::{ExecutionProvider, ScoreError, Scorer, ScorerOptions, TensorBatch};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

create_exception!(
    _agiqa,
    AgiqaError,
    PyException,
    "Base class of every error the agiqa package raises."
);
create_exception!(
    _agiqa,
    OnnxRuntimeError,
    AgiqaError,
    "ONNX Runtime is missing, too old or cannot be loaded."
);
create_exception!(
    _agiqa,
    ModelError,
    AgiqaError,
    "The model cannot be read or does not fit the agiqa graph contract."
);
create_exception!(
    _agiqa,
    ProviderError,
    AgiqaError,
    "The execution provider asked for is unknown or cannot run here."
);
create_exception!(
    _agiqa,
    ImageError,
    AgiqaError,
    "One image cannot be read, decoded or preprocessed."
);
create_exception!(
    _agiqa,
    InputError,
    AgiqaError,
    "An array or argument does not fit the model (shape, dtype, batch size)."
);
create_exception!(
    _agiqa,
    InferenceError,
    AgiqaError,
    "ONNX Runtime failed while running the model."
);
create_exception!(
    _agiqa,
    InternalError,
    AgiqaError,
    "A bug in agiqa (a Rust panic, caught); please report it."
);

/// The package's exception for a runtime error.
fn py_error(e: &ScoreError) -> PyErr {
    let message = e.to_string();
    match e {
        ScoreError::Library(_) => OnnxRuntimeError::new_err(message),
        ScoreError::Load { .. } | ScoreError::Contract { .. } | ScoreError::Metadata { .. } => {
            ModelError::new_err(message)
        }
        ScoreError::ProviderUnavailable { .. }
        | ScoreError::ProviderRefused(_)
        | ScoreError::UnsupportedOps { .. } => ProviderError::new_err(message),
        ScoreError::Preprocess(_) => ImageError::new_err(message),
        ScoreError::Tensor(_) | ScoreError::Options(_) => InputError::new_err(message),
        ScoreError::Inference(_)
        | ScoreError::GpuOutOfMemory { .. }
        | ScoreError::TensorRtBuild { .. } => InferenceError::new_err(message),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn internal_error(payload: &(dyn Any + Send)) -> PyErr {
    InternalError::new_err(format!(
        "internal error in agiqa (please report it): {}",
        panic_message(payload)
    ))
}

/// Runs `f`, turning a panic into [`InternalError`].
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| Err(internal_error(&*payload)))
}

/// An exported model on ONNX Runtime. Shared freely between Python threads.
#[pyclass(module = "agiqa._agiqa", name = "Scorer", frozen)]
struct PyScorer {
    scorer: Arc<Scorer>,
    /// Decode/preprocess threads of the file pipeline.
    workers: usize,
}

#[pymethods]
impl PyScorer {
    #[new]
    #[pyo3(signature = (model_path, *, ort_lib=None, provider="auto", threads=None, batch_size=16, device_id=0, workers=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_path: PathBuf,
        ort_lib: Option<PathBuf>,
        provider: &str,
        threads: Option<usize>,
        batch_size: usize,
        device_id: i32,
        workers: Option<usize>,
    ) -> PyResult<Self> {
        let provider: ExecutionProvider = provider.parse().map_err(ProviderError::new_err)?;
        let options = ScorerOptions {
            provider,
            threads,
            batch_size,
            device_id: device_id.into(),
            // As `agiqa score`: idle inference threads must not spin while the decoders work.
            intra_op_spinning: false,
            ort_lib,
            ..ScorerOptions::default()
        };
        let scorer =
            py.detach(|| guarded(|| Scorer::load(&model_path, options).map_err(|e| py_error(&e))))?;
        let workers = workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        Ok(PyScorer {
            scorer: Arc::new(scorer),
            workers,
        })
    }

    /// The execution provider that actually runs the model: `cpu`, `cuda` or `tensorrt`.
    #[getter]
    fn provider(&self) -> &'static str {
        self.scorer.provider().as_str()
    }

    /// Why providers were skipped (`auto`) and other load-time remarks.
    #[getter]
    fn provider_notes(&self) -> Vec<String> {
        self.scorer.provider_notes().to_vec()
    }

    /// Head names, in the order of each image's scores.
    #[getter]
    fn heads(&self) -> Vec<String> {
        self.scorer
            .head_names()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// `pixel_values` (float32 `[N, 3, R, R]`) or `pixels_uint8` (uint8 `[N, R, R, 3]`).
    #[getter]
    fn input_name(&self) -> &'static str {
        self.scorer.input_kind().name()
    }

    /// `R`, the model's square input side.
    #[getter]
    fn image_size(&self) -> u32 {
        self.scorer.preprocessor().config().image_size
    }

    #[getter]
    fn batch_size(&self) -> usize {
        self.scorer.batch_size()
    }

    #[getter]
    fn workers(&self) -> usize {
        self.workers
    }

    /// The `agiqa.*` metadata as JSON, plus `weight_precision` and `graph_description`.
    fn metadata_json(&self) -> PyResult<String> {
        guarded(|| {
            let mut value = serde_json::to_value(self.scorer.metadata())
                .map_err(|e| InternalError::new_err(e.to_string()))?;
            if let Some(map) = value.as_object_mut() {
                map.insert(
                    "weight_precision".into(),
                    self.scorer.weight_precision().into(),
                );
                map.insert(
                    "graph_description".into(),
                    self.scorer.graph_description().into(),
                );
            }
            Ok(value.to_string())
        })
    }

    /// Scores one encoded image (JPEG, PNG, GIF, WebP, BMP, TIFF) → one score per head.
    fn score_bytes(&self, py: Python<'_>, data: &Bound<'_, PyBytes>) -> PyResult<Vec<f32>> {
        let bytes = data.as_bytes();
        py.detach(|| guarded(|| self.scorer.score_bytes(bytes).map_err(|e| py_error(&e))))
    }

    /// Scores one decoded RGB image given as `height · width · 3` bytes, row-major.
    fn score_rgb(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyBytes>,
        width: u32,
        height: u32,
    ) -> PyResult<Vec<f32>> {
        let bytes = data.as_bytes();
        py.detach(|| {
            guarded(|| {
                let image =
                    image::RgbImage::from_raw(width, height, bytes.to_vec()).ok_or_else(|| {
                        InputError::new_err(format!(
                            "{} bytes is not a {width}x{height} RGB image",
                            bytes.len()
                        ))
                    })?;
                self.scorer.score_image(&image).map_err(|e| py_error(&e))
            })
        })
    }

    /// Scores `n` decoded RGB images of `height · width · 3` bytes each, back to back, with
    /// the shared preprocessing and batched inference. Returns `n · heads` scores, row-major.
    fn score_rgb_batch(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyBytes>,
        n: usize,
        width: u32,
        height: u32,
    ) -> PyResult<Vec<f32>> {
        let bytes = data.as_bytes();
        py.detach(|| {
            guarded(|| {
                let per_image = width as usize * height as usize * 3;
                if n == 0 || per_image == 0 || bytes.len() != n * per_image {
                    return Err(InputError::new_err(format!(
                        "{} bytes is not {n} {width}x{height} RGB images",
                        bytes.len()
                    )));
                }
                let images: Vec<image::RgbImage> = bytes
                    .chunks_exact(per_image)
                    .filter_map(|c| image::RgbImage::from_raw(width, height, c.to_vec()))
                    .collect();
                let rows = self
                    .scorer
                    .score_images(&images)
                    .map_err(|e| py_error(&e))?;
                Ok(rows.into_iter().flatten().collect())
            })
        })
    }

    /// Scores a ready batch in the model's input layout: `uint8` for `pixels_uint8`, `float32`
    /// (native-endian bytes) for `pixel_values`. Returns `N · heads` scores, row-major.
    fn score_tensor(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyBytes>,
        dtype: &str,
    ) -> PyResult<Vec<f32>> {
        let bytes = data.as_bytes();
        let dtype = dtype.to_owned();
        py.detach(|| {
            guarded(|| {
                let rows = match dtype.as_str() {
                    "uint8" => self.scorer.score_tensor(TensorBatch::PixelsUint8(bytes)),
                    "float32" => {
                        if bytes.len() % 4 != 0 {
                            return Err(InputError::new_err("float32 data is not whole values"));
                        }
                        let values: Vec<f32> = bytes
                            .chunks_exact(4)
                            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                            .collect();
                        self.scorer.score_tensor(TensorBatch::PixelValues(&values))
                    }
                    other => {
                        return Err(InputError::new_err(format!(
                            "dtype {other} is not uint8 or float32"
                        )))
                    }
                }
                .map_err(|e| py_error(&e))?;
                Ok(rows.into_iter().flatten().collect())
            })
        })
    }

    /// Starts the parallel pipeline on `paths`; the stream yields `(index, result)` as images
    /// finish (completion order).
    fn stream(&self, paths: Vec<PathBuf>) -> ScoreStream {
        ScoreStream::start(Arc::clone(&self.scorer), paths, self.workers)
    }
}

/// One finished image: its position in the input and its scores or error message.
type Finished = (usize, PathBuf, Result<Vec<f32>, String>);

/// Results of a running pipeline, as a Python iterator of `(index, dict)`. Dropping it (or
/// calling `cancel`) stops the pipeline after the batch in flight.
#[pyclass(module = "agiqa._agiqa")]
struct ScoreStream {
    receiver: Mutex<Receiver<Result<Finished, String>>>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
    heads: Vec<String>,
}

impl ScoreStream {
    fn start(scorer: Arc<Scorer>, paths: Vec<PathBuf>, workers: usize) -> Self {
        let heads = scorer.head_names().into_iter().map(str::to_owned).collect();
        let (sender, receiver) = sync_channel(4 * scorer.batch_size());
        let stop = Arc::new(AtomicBool::new(false));
        let worker_stop = Arc::clone(&stop);
        let worker = std::thread::spawn(move || {
            let run = catch_unwind(AssertUnwindSafe(|| {
                let mut options = PipelineOptions::for_scorer(&scorer);
                options.workers = workers;
                score_paths(&scorer, &paths, &options, |scored| {
                    let result = scored.result.map_err(|e| e.to_string());
                    !worker_stop.load(Ordering::Relaxed)
                        && sender.send(Ok((scored.index, scored.path, result))).is_ok()
                });
            }));
            if let Err(payload) = run {
                let _ = sender.send(Err(panic_message(&*payload)));
            }
        });
        ScoreStream {
            receiver: Mutex::new(receiver),
            stop,
            worker: Some(worker),
            heads,
        }
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock a pipeline waiting on a full channel, then wait for its threads.
        if let Ok(receiver) = self.receiver.lock() {
            while receiver.try_recv().is_ok() {}
        }
        if let Some(worker) = self.worker.take() {
            while !worker.is_finished() {
                if let Ok(receiver) = self.receiver.lock() {
                    let _ = receiver.recv_timeout(Duration::from_millis(20));
                }
            }
            let _ = worker.join();
        }
    }
}

impl Drop for ScoreStream {
    fn drop(&mut self) {
        self.finish();
    }
}

#[pymethods]
impl ScoreStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next finished image; waits with the GIL released and checks for Ctrl-C (or any
    /// pending signal) after every result and every 100 ms, stopping the pipeline when a
    /// handler raises.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(usize, Py<PyDict>)>> {
        loop {
            let received = py.detach(|| {
                let receiver = self.receiver.lock().map_err(|_| ())?;
                match receiver.recv_timeout(Duration::from_millis(100)) {
                    Ok(message) => Ok(Some(message)),
                    Err(RecvTimeoutError::Timeout) => Ok(None),
                    Err(RecvTimeoutError::Disconnected) => Err(()),
                }
            });
            // Also between results: `list(stream)` pulls them from C without running the
            // interpreter loop, so a Ctrl-C would wait for the whole run if only a quiet
            // pipeline (the timeout below) checked. The check is a flag read when no signal
            // is pending.
            if let Err(e) = py.check_signals() {
                self.stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
            match received {
                Ok(Some(Ok((index, path, result)))) => {
                    let item = PyDict::new(py);
                    item.set_item("path", path.to_string_lossy().into_owned())?;
                    match result {
                        Ok(scores) => {
                            let by_head = PyDict::new(py);
                            for (head, score) in self.heads.iter().zip(scores) {
                                by_head.set_item(head, f64::from(score))?;
                            }
                            item.set_item("scores", by_head)?;
                        }
                        Err(message) => item.set_item("error", message)?,
                    }
                    return Ok(Some((index, item.unbind())));
                }
                Ok(Some(Err(panic))) => {
                    self.stop.store(true, Ordering::Relaxed);
                    return Err(InternalError::new_err(format!(
                        "internal error in agiqa's pipeline (please report it): {panic}"
                    )));
                }
                Ok(None) => {
                    if let Err(e) = py.check_signals() {
                        self.stop.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Err(()) => return Ok(None),
            }
        }
    }

    /// Stops the pipeline after the batch in flight and waits for its threads.
    fn cancel(&mut self, py: Python<'_>) {
        py.detach(|| self.finish());
    }
}

/// Files, folders (recursive), glob patterns and list files → image paths, exactly as
/// `agiqa score` expands them.
#[pyfunction]
#[pyo3(signature = (inputs, lists=Vec::new()))]
fn collect_inputs(inputs: Vec<String>, lists: Vec<PathBuf>) -> PyResult<Vec<PathBuf>> {
    guarded(|| collect(&inputs, &lists).map_err(|e| InputError::new_err(e.to_string())))
}

/// Stops `score_files` when a Python signal handler raises (Ctrl-C), keeping its exception.
#[derive(Default)]
struct Interruptible {
    raised: Option<PyErr>,
}

impl ScoreObserver for Interruptible {
    fn keep_going(&mut self) -> bool {
        if self.raised.is_none() {
            self.raised = Python::attach(|py| py.check_signals()).err();
        }
        self.raised.is_none()
    }
}

/// `agiqa score` as a function: the runtime's `score_files` (same pipeline, same result lines,
/// same resume). Returns the run's summary as a dict.
#[pyfunction]
#[pyo3(signature = (model, paths, *, out=None, format="jsonl", resume=false, workers=None, ort_lib=None, provider="auto", threads=None, batch_size=16, device_id=0))]
#[allow(clippy::too_many_arguments)]
fn score_files(
    py: Python<'_>,
    model: PathBuf,
    paths: Vec<PathBuf>,
    out: Option<PathBuf>,
    format: &str,
    resume: bool,
    workers: Option<usize>,
    ort_lib: Option<PathBuf>,
    provider: &str,
    threads: Option<usize>,
    batch_size: usize,
    device_id: i32,
) -> PyResult<Py<PyDict>> {
    let format = match format {
        "jsonl" => OutputFormat::Jsonl,
        "csv" => OutputFormat::Csv,
        other => {
            return Err(InputError::new_err(format!(
                "format {other} is not jsonl or csv"
            )))
        }
    };
    let options = ScoreFilesOptions {
        model,
        scorer: ScorerOptions {
            provider: provider.parse().map_err(ProviderError::new_err)?,
            threads,
            batch_size,
            device_id: device_id.into(),
            ort_lib,
            ..ScorerOptions::default()
        },
        paths,
        out: match out {
            Some(path) => ResultsOut::File { path, resume },
            None => ResultsOut::Stdout,
        },
        format,
        workers,
    };
    let mut observer = Interruptible::default();
    let summary = py.detach(|| {
        guarded(|| {
            run_score_files(&options, &mut observer).map_err(|e| match &e {
                ScoreFilesError::Model { source, .. } => py_error(source),
                _ => InputError::new_err(format!("{e}: {}", error_chain(&e))),
            })
        })
    })?;
    if let Some(raised) = observer.raised {
        return Err(raised);
    }
    let dict = PyDict::new(py);
    let stats = &summary.stats;
    dict.set_item("images", stats.images)?;
    dict.set_item("scored", stats.scored)?;
    dict.set_item("failed", stats.failed)?;
    dict.set_item("skipped", summary.skipped)?;
    dict.set_item("batches", stats.batches)?;
    dict.set_item("seconds", stats.seconds)?;
    dict.set_item("images_per_second", stats.images_per_second)?;
    Ok(dict.unbind())
}

/// The causes below an error, `: `-joined.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

/// Panics on purpose, inside the same guard as every entry point (for the package's tests).
#[pyfunction]
fn _panic_for_tests(message: &str) -> PyResult<()> {
    guarded(|| panic!("{message}"))
}

#[pymodule]
fn _agiqa(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyScorer>()?;
    m.add_class::<ScoreStream>()?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(collect_inputs, m)?)?;
    m.add_function(wrap_pyfunction!(score_files, m)?)?;
    m.add("AgiqaError", py.get_type::<AgiqaError>())?;
    m.add("OnnxRuntimeError", py.get_type::<OnnxRuntimeError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("ProviderError", py.get_type::<ProviderError>())?;
    m.add("ImageError", py.get_type::<ImageError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("InferenceError", py.get_type::<InferenceError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}
