//! `agiqa bench`: model-only throughput and latency per batch size on synthetic tensors, and
//! end-to-end throughput from image files through the [`crate::pipeline`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cpu_features::CpuFeatures;
use crate::pipeline::{score_paths, PipelineOptions, PipelineStats};
use crate::preprocess::JpegDecoding;
use crate::scorer::{ExecutionProvider, InputKind, ScoreError, Scorer, ScorerOptions, TensorBatch};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub batch_sizes: Vec<usize>,
    /// Time spent measuring each batch size (after the warm-up).
    pub duration: Duration,
    /// Untimed runs before measuring (TensorRT builds its engine, allocators settle).
    pub warmup: usize,
    /// Image files for the end-to-end measurement (none: skipped).
    pub images: Vec<PathBuf>,
    /// How many times the image list is gone through end to end.
    pub repeat: usize,
}

/// Latency percentiles, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// Model-only result for one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct ModelOnly {
    pub batch_size: usize,
    pub runs: usize,
    pub images_per_second: f64,
    /// Per batch.
    pub latency_ms: Latency,
}

/// A whole benchmark report (what `agiqa bench --json` prints).
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: PathBuf,
    pub provider: String,
    pub provider_notes: Vec<String>,
    /// ONNX Runtime's build information string.
    pub onnxruntime: String,
    pub input: InputKind,
    pub image_size: u32,
    pub threads: Option<usize>,
    /// The CPU and the kernel paths ONNX Runtime takes on it.
    pub cpu: CpuFeatures,
    pub model_only: Vec<ModelOnly>,
    /// GPU memory this process held after the model-only runs (MiB, from the driver), or why
    /// it is unknown; `None` on the CPU provider.
    pub gpu_memory_mib: Option<Result<u64, String>>,
    /// Decoding and preprocessing alone, on one core (with images).
    pub decode_per_core: Option<DecodeRate>,
    pub end_to_end: Option<EndToEnd>,
}

/// Decode + preprocess on one thread, the images' bytes already in memory, so that the rate
/// a core can feed compares directly with the model's rate.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeRate {
    pub images: usize,
    pub failed: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    /// How many cores decoding would need to keep up with the best model-only rate measured.
    pub cores_to_feed_the_model: f64,
}

/// End-to-end result: files → decode → preprocess → batches → scores.
#[derive(Clone, Debug, Serialize)]
pub struct EndToEnd {
    pub batch_size: usize,
    pub workers: usize,
    /// How JPEGs were decoded (`reduced` only with `--fast-decode`).
    pub jpeg_decoding: JpegDecoding,
    #[serde(flatten)]
    pub stats: PipelineStats,
}

/// Runs the model-only benchmark with `scorer`, and the end-to-end one (when `options` has
/// images) with `pipeline_scorer`, or `scorer` when it is `None`.
pub fn run(
    scorer: &Scorer,
    pipeline_scorer: Option<&Scorer>,
    options: &BenchOptions,
) -> Result<BenchReport, ScoreError> {
    let mut model_only = Vec::new();
    for &n in &options.batch_sizes {
        model_only.push(model_only_one(scorer, n.max(1), options)?);
    }
    let gpu_memory_mib =
        (scorer.provider() != ExecutionProvider::Cpu).then(crate::gpu_memory::used_by_this_process);
    let best_model_rate = model_only
        .iter()
        .map(|m| m.images_per_second)
        .fold(0.0, f64::max);
    let decode_per_core = (!options.images.is_empty())
        .then(|| decode_rate(scorer, &options.images, options.duration, best_model_rate));
    let end_to_end = if options.images.is_empty() {
        None
    } else {
        let scorer = pipeline_scorer.unwrap_or(scorer);
        let paths: Vec<PathBuf> = std::iter::repeat_n(&options.images, options.repeat.max(1))
            .flatten()
            .cloned()
            .collect();
        let pipeline = PipelineOptions::for_scorer(scorer);
        // One untimed pass over a few files warms the decoders and the session.
        let warm = &paths[..paths.len().min(scorer.batch_size())];
        score_paths(scorer, warm, &pipeline, |_| true);
        let stats = score_paths(scorer, &paths, &pipeline, |_| true);
        Some(EndToEnd {
            batch_size: scorer.batch_size(),
            workers: pipeline.workers,
            jpeg_decoding: scorer.options().jpeg_decoding,
            stats,
        })
    };
    Ok(BenchReport {
        model: scorer.path().to_path_buf(),
        provider: scorer.provider().to_string(),
        provider_notes: scorer.provider_notes().to_vec(),
        onnxruntime: crate::onnxruntime::version(),
        input: scorer.input_kind(),
        image_size: scorer.preprocessor().config().image_size,
        threads: scorer.options().threads,
        cpu: CpuFeatures::detect(),
        model_only,
        gpu_memory_mib,
        decode_per_core,
        end_to_end,
    })
}

/// `agiqa bench`: one model measured on each of several execution providers.
#[derive(Clone, Debug)]
pub struct ProviderBenchOptions {
    /// Exported model (`.onnx` with agiqa metadata).
    pub model: PathBuf,
    /// Scorer options shared by every provider; `provider` is replaced by each of
    /// `providers` in turn and `batch_size` is the end-to-end batch size.
    pub scorer: ScorerOptions,
    /// Providers to measure, in order (empty: `scorer.provider` alone).
    pub providers: Vec<ExecutionProvider>,
    pub bench: BenchOptions,
}

/// Why one provider could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot use model {model} on {provider}")]
    Load {
        model: PathBuf,
        provider: ExecutionProvider,
        #[source]
        source: ScoreError,
    },
    #[error("benchmarking on {provider}")]
    Run {
        provider: ExecutionProvider,
        #[source]
        source: ScoreError,
    },
}

/// One provider's outcome. In JSON a measured row is its [`BenchReport`] and a failed one
/// `{"provider", "error"}`, the error with its causes joined by `": "`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ProviderBench {
    /// The provider loaded and was measured.
    Measured(Box<BenchReport>),
    /// The provider could not be measured (it did not load, or a run failed).
    Failed {
        /// The provider asked for.
        provider: ExecutionProvider,
        /// Why.
        #[serde(serialize_with = "serialize_error_chain")]
        error: BenchError,
    },
}

/// `error: cause: cause...`, as a string.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn serialize_error_chain<S: serde::Serializer>(
    error: &BenchError,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&error_chain(error))
}

/// Measures every requested provider on its own, calling `on_row` as each finishes, and
/// returns the rows in order. A provider that cannot load is a failed row, not the end of
/// the run, so one missing GPU library does not hide the other providers' numbers.
pub fn run_providers(
    options: &ProviderBenchOptions,
    mut on_row: impl FnMut(&ProviderBench),
) -> Vec<ProviderBench> {
    let providers = if options.providers.is_empty() {
        vec![options.scorer.provider]
    } else {
        options.providers.clone()
    };
    let mut rows = Vec::with_capacity(providers.len());
    for provider in providers {
        let row = match run_provider(options, provider) {
            Ok(report) => ProviderBench::Measured(Box::new(report)),
            Err(error) => ProviderBench::Failed { provider, error },
        };
        on_row(&row);
        rows.push(row);
    }
    rows
}

fn run_provider(
    options: &ProviderBenchOptions,
    provider: ExecutionProvider,
) -> Result<BenchReport, BenchError> {
    let load = |intra_op_spinning, batch_size| {
        let scorer_options = ScorerOptions {
            provider,
            batch_size,
            intra_op_spinning,
            ..options.scorer.clone()
        };
        Scorer::load(&options.model, scorer_options).map_err(|source| BenchError::Load {
            model: options.model.clone(),
            provider,
            source,
        })
    };
    // Model-only runs as ONNX Runtime runs by default (spinning threads) and runs each batch
    // size whole; end to end runs as `score` does, with the scorer's batch size, leaving the
    // cores to the decoders between batches.
    let largest = options.bench.batch_sizes.iter().copied().max().unwrap_or(1);
    let scorer = load(true, largest.max(1))?;
    let pipeline_scorer = if options.bench.images.is_empty() {
        None
    } else {
        Some(load(false, options.scorer.batch_size)?)
    };
    run(&scorer, pipeline_scorer.as_ref(), &options.bench)
        .map_err(|source| BenchError::Run { provider, source })
}

/// Decodes and preprocesses the images on this thread, whole passes until `budget` has passed
/// (at least one pass); unreadable files are counted as failed and not timed again.
fn decode_rate(
    scorer: &Scorer,
    images: &[PathBuf],
    budget: Duration,
    best_model_rate: f64,
) -> DecodeRate {
    let files: Vec<Vec<u8>> = images
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    let unreadable = images.len() - files.len();
    let mut decoded = 0usize;
    let mut failed = unreadable;
    let start = Instant::now();
    loop {
        for bytes in &files {
            match scorer.prepare_bytes(bytes) {
                Ok(input) => {
                    std::hint::black_box(input);
                    decoded += 1;
                }
                Err(_) => failed += 1,
            }
        }
        if files.is_empty() || start.elapsed() >= budget {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let images_per_second = decoded as f64 / seconds.max(1e-9);
    DecodeRate {
        images: decoded,
        failed,
        seconds,
        images_per_second,
        cores_to_feed_the_model: if images_per_second > 0.0 {
            best_model_rate / images_per_second
        } else {
            f64::INFINITY
        },
    }
}

fn model_only_one(
    scorer: &Scorer,
    n: usize,
    options: &BenchOptions,
) -> Result<ModelOnly, ScoreError> {
    let len = n * scorer.input_len();
    // Deterministic, non-constant data: constant inputs could hit shortcuts no image takes.
    let f32_data: Vec<f32>;
    let u8_data: Vec<u8>;
    let batch = match scorer.input_kind() {
        InputKind::PixelValues => {
            f32_data = (0..len)
                .map(|i| ((i * 7919) % 997) as f32 / 498.5 - 1.0)
                .collect();
            TensorBatch::PixelValues(&f32_data)
        }
        InputKind::PixelsUint8 => {
            u8_data = (0..len).map(|i| ((i * 7919) % 251) as u8).collect();
            TensorBatch::PixelsUint8(&u8_data)
        }
    };
    for _ in 0..options.warmup {
        scorer.score_tensor(batch)?;
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    while latencies.len() < 3 || start.elapsed() < options.duration {
        let t = Instant::now();
        scorer.score_tensor(batch)?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total = start.elapsed().as_secs_f64();
    Ok(ModelOnly {
        batch_size: n,
        runs: latencies.len(),
        images_per_second: (latencies.len() * n) as f64 / total,
        latency_ms: percentiles(&mut latencies),
    })
}

/// Nearest-rank percentiles of `values` (sorted in place).
pub fn percentiles(values: &mut [f64]) -> Latency {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if values.is_empty() {
            return 0.0;
        }
        let rank = (q * values.len() as f64).ceil() as usize;
        values[rank.clamp(1, values.len()) - 1]
    };
    Latency {
        mean: values.iter().sum::<f64>() / values.len().max(1) as f64,
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
    }
}

/// A human-readable table of a report.
pub fn render_table(report: &BenchReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model {} ({} input, {}x{}), provider {}, threads {}, ONNX Runtime {}",
        report.model.display(),
        report.input.name(),
        report.image_size,
        report.image_size,
        report.provider,
        report.threads.map_or("all".to_string(), |t| t.to_string()),
        report.onnxruntime,
    );
    for note in &report.provider_notes {
        let _ = writeln!(out, "  note: {note}");
    }
    let _ = writeln!(out, "  cpu: {}", report.cpu.summary());
    let _ = writeln!(
        out,
        "{:>6} {:>7} {:>11} {:>9} {:>9} {:>9}",
        "batch", "runs", "images/s", "p50 ms", "p95 ms", "p99 ms"
    );
    for m in &report.model_only {
        let _ = writeln!(
            out,
            "{:>6} {:>7} {:>11.1} {:>9.3} {:>9.3} {:>9.3}",
            m.batch_size,
            m.runs,
            m.images_per_second,
            m.latency_ms.p50,
            m.latency_ms.p95,
            m.latency_ms.p99
        );
    }
    match &report.gpu_memory_mib {
        Some(Ok(mib)) => {
            let _ = writeln!(
                out,
                "GPU memory held by this process: {mib} MiB (nvidia-smi)"
            );
        }
        Some(Err(why)) => {
            let _ = writeln!(out, "GPU memory: unknown ({why})");
        }
        None => {}
    }
    if let Some(d) = &report.decode_per_core {
        let _ = writeln!(
            out,
            "decode + preprocess on one core: {:.1} images/s ({} images, {} failed); \
             the best model-only rate needs {:.1} such cores",
            d.images_per_second, d.images, d.failed, d.cores_to_feed_the_model
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let bound = if d.cores_to_feed_the_model > cores as f64 {
            format!("decoding: this machine's {cores} cores cannot feed the model")
        } else {
            format!("the model: {cores} cores decode faster than it scores")
        };
        let _ = writeln!(out, "end-to-end bound: {bound}");
    }
    if let Some(e) = &report.end_to_end {
        let _ = writeln!(
            out,
            "end to end: {} images ({} failed) in {:.2} s = {:.1} images/s (batch {}, {} decode workers)",
            e.stats.images,
            e.stats.failed,
            e.stats.seconds,
            e.stats.images_per_second,
            e.batch_size,
            e.workers
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let l = percentiles(&mut v);
        assert_eq!((l.p50, l.p95, l.p99), (50.0, 95.0, 99.0));
        assert!((l.mean - 50.5).abs() < 1e-12);
        let l = percentiles(&mut [7.0]);
        assert_eq!((l.p50, l.p99), (7.0, 7.0));
    }
}
