//! `agiqa`'s flags (clap derive); every flag's doc comment is its `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agiqa_runtime::batch_io::OutputFormat;
use agiqa_runtime::preprocess::{DecodeLimits, JpegDecoding};
use agiqa_runtime::scorer::{
    ConvSearch, DeviceIds, ExecutionProvider, GraphOptimization, ScorerOptions, TensorRtProfile,
};
use clap::builder::RangedU64ValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// A count flag's parser: a whole number in `min..=max` (clap's error names the range).
fn count(min: u64, max: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(min..=max)
}

/// Longest duration a seconds flag accepts: beyond a day is a typo, not a setting.
const MAX_SECONDS: f64 = 86_400.0;

/// A duration flag's parser: finite seconds in (0, 86400]. `Duration::from_secs_f64` panics on
/// negative, NaN or huge values, so they are refused here with a message instead.
pub fn positive_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !seconds.is_finite() || seconds <= 0.0 || seconds > MAX_SECONDS {
        return Err(format!(
            "`{text}` seconds is out of range: give a finite number above 0 and at most {MAX_SECONDS}"
        ));
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}` seconds: {e}"))
}

#[derive(Parser)]
#[command(
    name = "agiqa",
    version,
    about = "Score AI-generated images with an exported CLIP-AGIQA model (ONNX Runtime)."
)]
pub struct Cli {
    /// Log at info level (model loading, provider choice, TensorRT engine builds).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check what can run here: the ONNX Runtime library in use, its providers, the GPUs and
    /// driver, whether CUDA and TensorRT load (or the exact library missing), and with --model
    /// how many graph nodes each provider took.
    Doctor(DoctorArgs),
    /// Run the shared preprocessing on images and write the model-input crops as PNG, to see
    /// exactly what a model is given.
    Preprocess(PreprocessArgs),
    /// Score image files, folders (recursively), glob patterns or list files; one result line
    /// per image, written and flushed as it arrives. Exits non-zero if any image failed.
    Score(ScoreArgs),
    /// Serve scores over HTTP: POST /v1/score, GET /health, /live, /ready, /metrics.
    Serve(ServeArgs),
    /// Measure model-only throughput and latency per batch size on synthetic tensors, and
    /// end-to-end throughput from image files.
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct DoctorArgs {
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH, beside this binary, .deps/gpu/lib,
    /// .deps/lib).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Exported model: report how many graph nodes each provider took (one batch of zeros).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// Provider for --model: cpu, cuda, tensorrt, or auto (the first GPU provider that loads).
    #[arg(long, default_value = "auto")]
    pub provider: ExecutionProvider,
    /// GPU ordinal for CUDA and TensorRT.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=1023))]
    pub device_id: i32,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The model and how it runs (shared by `score`, `serve` and `bench`).
#[derive(Args)]
pub struct ModelArgs {
    /// Exported model (`.onnx` with agiqa metadata).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Execution provider: cpu, cuda, tensorrt, or auto (TensorRT, then CUDA, then CPU).
    #[arg(long, env = "AGIQA_PROVIDER", default_value = "auto")]
    pub provider: ExecutionProvider,
    /// ONNX Runtime intra-op threads (default: every core).
    #[arg(long, env = "AGIQA_THREADS", value_parser = count(1, 4096))]
    pub threads: Option<usize>,
    /// Most images per inference batch.
    #[arg(long, env = "AGIQA_BATCH_SIZE", default_value_t = 16, value_parser = count(1, 65_536))]
    pub batch_size: usize,
    /// GPU ordinals for CUDA and TensorRT: one (`0`) or several (`0,1`); batches go to the
    /// least busy session.
    #[arg(long, default_value = "0")]
    pub device_id: DeviceIds,
    /// TensorRT: build fp16 engines (LayerNorm stays fp32).
    #[arg(long)]
    pub trt_fp16: bool,
    /// TensorRT: engine and timing cache folder (skips rebuilding engines on later starts);
    /// engines go in a subfolder keyed by model, ONNX Runtime, TensorRT, GPU, precision, profile.
    #[arg(long)]
    pub trt_cache: Option<PathBuf>,
    /// TensorRT: batch size the engine is tuned for (default: --batch-size).
    #[arg(long, value_parser = count(1, 65_536))]
    pub trt_opt_batch: Option<usize>,
    /// TensorRT: largest batch the engine takes (default: --batch-size); the profile's
    /// smallest is 1, so a last partial batch never rebuilds the engine.
    #[arg(long, value_parser = count(1, 65_536))]
    pub trt_max_batch: Option<usize>,
    /// Independent inference sessions per device (weights shared); more lets requests run in
    /// parallel.
    #[arg(long, default_value_t = 1, value_parser = count(1, 256))]
    pub sessions: usize,
    /// Bind inputs and outputs to reused buffers (pinned host memory on CUDA); the default on
    /// CUDA and TensorRT.
    #[arg(long, overrides_with = "no_io_binding")]
    pub io_binding: bool,
    /// Hand ONNX Runtime fresh tensors each run instead (the default on CPU).
    #[arg(long, overrides_with = "io_binding")]
    pub no_io_binding: bool,
    /// CUDA graphs: capture one run and replay it (CUDA/TensorRT; needs IoBinding; partial
    /// batches are padded to --batch-size).
    #[arg(long)]
    pub cuda_graph: bool,
    /// cuDNN convolution algorithm search on CUDA: exhaustive (benchmarks each shape once; the
    /// load-time warm-up takes it) or heuristic (no search: many batch sizes, tight memory).
    #[arg(long, default_value = "exhaustive")]
    pub cudnn_conv_search: ConvSearch,
    /// No warm-up batch at load (GPU providers run one by default: TensorRT engine build,
    /// cuDNN search).
    #[arg(long)]
    pub no_warmup: bool,
    /// ONNX Runtime graph optimisation level: disable, basic, extended or all.
    #[arg(long, default_value = "all")]
    pub graph_optimization: GraphOptimization,
    /// Turn off ONNX Runtime's memory pattern (allocation plan from the first run's shapes).
    #[arg(long)]
    pub no_memory_pattern: bool,
    /// Turn off the CPU provider's arena allocator.
    #[arg(long)]
    pub no_cpu_arena: bool,
    /// Let idle ONNX Runtime threads spin (default: on for `serve` and model-only `bench`, off
    /// where decoding shares the cores: `score`, end-to-end `bench`).
    #[arg(long, overrides_with = "no_spin")]
    pub spin: bool,
    /// Never let idle ONNX Runtime threads spin.
    #[arg(long, overrides_with = "spin")]
    pub no_spin: bool,
    /// Largest accepted image width or height, in pixels.
    #[arg(long, default_value_t = DecodeLimits::default().max_side,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub max_side: u32,
    /// Largest accepted image area, in pixels.
    #[arg(long, default_value_t = DecodeLimits::default().max_pixels,
          value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub max_pixels: u64,
    /// Decode large JPEGs at a reduced size (libjpeg DCT scaling, the short side kept at
    /// least twice the model input): faster, but not the training pixels, so scores change
    /// slightly. Never the default; recorded in the run's summary and `/health`.
    #[arg(long)]
    pub fast_decode: bool,
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH, beside this binary, .deps/lib).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
}

impl ModelArgs {
    /// The scorer these flags ask for (spinning ONNX Runtime threads, as ONNX Runtime runs by
    /// default; `score` and end-to-end `bench` turn spinning off).
    pub fn options(&self) -> ScorerOptions {
        let either = |on: bool, off: bool| match (on, off) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let tensorrt_profile =
            (self.trt_opt_batch.is_some() || self.trt_max_batch.is_some()).then(|| {
                let opt = self.trt_opt_batch.unwrap_or(
                    self.trt_max_batch
                        .map_or(self.batch_size, |max| max.min(self.batch_size)),
                );
                TensorRtProfile {
                    min: 1,
                    opt,
                    max: self.trt_max_batch.unwrap_or(opt.max(self.batch_size)),
                }
            });
        ScorerOptions {
            provider: self.provider,
            threads: self.threads,
            batch_size: self.batch_size,
            device_id: self.device_id.clone(),
            tensorrt_fp16: self.trt_fp16,
            tensorrt_cache_dir: self.trt_cache.clone(),
            tensorrt_profile,
            sessions: self.sessions,
            intra_op_spinning: true,
            spin: either(self.spin, self.no_spin),
            graph_optimization: self.graph_optimization,
            memory_pattern: !self.no_memory_pattern,
            cpu_arena: !self.no_cpu_arena,
            io_binding: either(self.io_binding, self.no_io_binding),
            cuda_graph: self.cuda_graph,
            cudnn_conv_search: self.cudnn_conv_search,
            warmup: self.no_warmup.then_some(false),
            decode_limits: DecodeLimits {
                max_side: self.max_side,
                max_pixels: self.max_pixels,
            },
            jpeg_decoding: if self.fast_decode {
                JpegDecoding::Reduced
            } else {
                JpegDecoding::Exact
            },
            ort_lib: self.ort_lib.clone(),
        }
    }
}

#[derive(Args)]
pub struct PreprocessArgs {
    /// Images to preprocess.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Folder for `<stem>.input.png` files.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Side of the square model input.
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u32).range(1..=16_384))]
    pub image_size: u32,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// One JSON object a line: `{"path", "scores": {head: score}}` or `{"path", "error"}`.
    Jsonl,
    /// `path,<head>...,error` with a header row.
    Csv,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image files, folders, or quoted glob patterns (`'shots/**/*.png'`).
    pub inputs: Vec<String>,
    /// File listing one image path per line (repeatable).
    #[arg(long)]
    pub list: Vec<PathBuf>,
    /// Result file (default: standard output).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Result format (default: from the --out extension, .csv or else JSONL).
    #[arg(long)]
    pub format: Option<FormatArg>,
    /// Skip images already recorded in --out and append to it.
    #[arg(long, requires = "out")]
    pub resume: bool,
    /// Decode/preprocess threads (default: every core).
    #[arg(long, value_parser = count(1, 4096))]
    pub workers: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl ScoreArgs {
    /// --format, else from the --out extension, else JSONL.
    pub fn output_format(&self) -> OutputFormat {
        match (self.format, &self.out) {
            (Some(FormatArg::Csv), _) => OutputFormat::Csv,
            (Some(FormatArg::Jsonl), _) => OutputFormat::Jsonl,
            (None, Some(path)) => OutputFormat::for_path(path),
            (None, None) => OutputFormat::Jsonl,
        }
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, env = "AGIQA_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Longest an image waits for others to fill its batch, in milliseconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub max_wait_ms: u64,
    /// Images admitted at once (waiting or in inference); beyond it requests get 503.
    #[arg(long, default_value_t = 256, value_parser = count(1, 1 << 20))]
    pub queue: usize,
    /// Seconds: refuse (503) an image when those already admitted are predicted to take longer
    /// than this to score, so that accepted requests keep their latency under overload
    /// (default: no bound, only --queue).
    #[arg(long, value_parser = positive_seconds)]
    pub max_queue_delay: Option<Duration>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 32 << 20, value_parser = count(1, 1 << 32))]
    pub body_limit: usize,
    /// Request timeout in seconds, above 0 and at most a day (504 beyond).
    #[arg(long, default_value = "30", value_parser = positive_seconds)]
    pub timeout: Duration,
    /// Seconds a client may take to send a request's headers; slower connections are closed.
    #[arg(long, default_value = "10", value_parser = positive_seconds)]
    pub header_timeout: Duration,
    /// Seconds a client may take to send a request's body (408 and the connection closed).
    #[arg(long, default_value = "30", value_parser = positive_seconds)]
    pub body_timeout: Duration,
    /// Seconds an idle keep-alive connection is kept open for its next request.
    #[arg(long, default_value = "5", value_parser = positive_seconds)]
    pub keep_alive: Duration,
    /// Most client connections open at once; more are closed when accepted.
    #[arg(long, default_value_t = 1024, value_parser = count(1, 1 << 20))]
    pub max_connections: usize,
    /// Seconds to keep serving after SIGTERM with /ready answering 503 (0: close at once), so
    /// that load balancers stop sending first.
    #[arg(long, default_value_t = 0.0, value_parser = grace_seconds)]
    pub drain_grace: f64,
}

/// `--drain-grace`: like [`positive_seconds`], but 0 (no grace) is allowed.
fn grace_seconds(text: &str) -> Result<f64, String> {
    if text.trim().parse::<f64>() == Ok(0.0) {
        return Ok(0.0);
    }
    positive_seconds(text).map(|d| d.as_secs_f64())
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32], value_parser = count(1, 65_536))]
    pub batch_sizes: Vec<usize>,
    /// Seconds measured per batch size, above 0 and at most a day.
    #[arg(long, default_value = "3", value_parser = positive_seconds)]
    pub seconds: Duration,
    /// Untimed runs before each measurement.
    #[arg(long, default_value_t = 3, value_parser = count(0, 1_000_000))]
    pub warmup: usize,
    /// Images (files, folders, globs) for the end-to-end measurement.
    #[arg(long)]
    pub images: Vec<String>,
    /// Passes over the images end to end.
    #[arg(long, default_value_t = 1, value_parser = count(1, 1_000_000))]
    pub repeat: usize,
    /// Providers to measure, comma-separated (default: --provider).
    #[arg(long, value_delimiter = ',')]
    pub providers: Vec<ExecutionProvider>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
