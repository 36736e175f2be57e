//! `agiqa`: the runtime's command-line entry point.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agiqa_runtime::batch_io::{collect_inputs, recorded_paths, OutputFormat, ResultWriter};
use agiqa_runtime::bench::{self, BenchOptions};
use agiqa_runtime::pipeline::{score_paths, PipelineOptions};
use agiqa_runtime::preprocess::{decode_image_file, DecodeLimits, Preprocessing, Preprocessor};
use agiqa_runtime::scorer::{ExecutionProvider, Scorer, ScorerOptions};
use agiqa_runtime::serve::{serve_until_signal, ServeOptions};
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "agiqa",
    version,
    about = "Score AI-generated images with an exported CLIP-AGIQA model (ONNX Runtime)."
)]
struct Cli {
    /// Log at info level (model loading, provider choice, TensorRT engine builds).
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

/// The model and how it runs (shared by `score`, `serve` and `bench`).
#[derive(Args)]
struct ModelArgs {
    /// Exported model (`.onnx` with agiqa metadata).
    #[arg(long, short)]
    model: PathBuf,
    /// Execution provider: cpu, cuda, tensorrt, or auto (TensorRT, then CUDA, then CPU).
    #[arg(long, env = "AGIQA_PROVIDER", default_value = "auto")]
    provider: ExecutionProvider,
    /// ONNX Runtime intra-op threads (default: every core).
    #[arg(long, env = "AGIQA_THREADS")]
    threads: Option<usize>,
    /// Most images per inference batch.
    #[arg(long, env = "AGIQA_BATCH_SIZE", default_value_t = 16)]
    batch_size: usize,
    /// GPU ordinal for CUDA and TensorRT.
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// TensorRT: build fp16 engines (LayerNorm stays fp32).
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: engine and timing cache folder (skips rebuilding engines on later starts).
    #[arg(long)]
    trt_cache: Option<PathBuf>,
    /// Independent inference sessions (weights shared); more lets requests run in parallel.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Largest accepted image width or height, in pixels.
    #[arg(long, default_value_t = DecodeLimits::default().max_side)]
    max_side: u32,
    /// Largest accepted image area, in pixels.
    #[arg(long, default_value_t = DecodeLimits::default().max_pixels)]
    max_pixels: u64,
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH, beside this binary, .deps/lib).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
}

impl ModelArgs {
    fn options(&self, provider: ExecutionProvider, spinning: bool) -> ScorerOptions {
        ScorerOptions {
            provider,
            threads: self.threads,
            batch_size: self.batch_size,
            device_id: self.device_id,
            tensorrt_fp16: self.trt_fp16,
            tensorrt_cache_dir: self.trt_cache.clone(),
            sessions: self.sessions,
            intra_op_spinning: spinning,
            decode_limits: DecodeLimits {
                max_side: self.max_side,
                max_pixels: self.max_pixels,
            },
            ort_lib: self.ort_lib.clone(),
        }
    }

    fn load(&self, spinning: bool) -> anyhow::Result<Scorer> {
        let scorer = Scorer::load(&self.model, self.options(self.provider, spinning))
            .with_context(|| format!("cannot use model {}", self.model.display()))?;
        for note in scorer.provider_notes() {
            eprintln!("note: {note}");
        }
        eprintln!(
            "model {} on {} (heads: {})",
            self.model.display(),
            scorer.provider(),
            scorer.head_names().join(", ")
        );
        Ok(scorer)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Jsonl,
    Csv,
}

#[derive(Subcommand)]
enum Command {
    /// Check that ONNX Runtime can be found and loaded, and print where it came from.
    Doctor {
        /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH, beside this binary, .deps/lib).
        #[arg(long, env = "ORT_DYLIB_PATH")]
        ort_lib: Option<PathBuf>,
    },
    /// Run the shared preprocessing on images and write the model-input crops as PNG, to see
    /// exactly what a model is given.
    Preprocess {
        /// Images to preprocess.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Folder for `<stem>.input.png` files.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        /// Side of the square model input.
        #[arg(long, default_value_t = 224)]
        image_size: u32,
    },
    /// Score image files, folders (recursively), glob patterns or list files; one result line
    /// per image, written and flushed as it arrives. Exits non-zero if any image failed.
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// Image files, folders, or quoted glob patterns (`'shots/**/*.png'`).
        inputs: Vec<String>,
        /// File listing one image path per line (repeatable).
        #[arg(long)]
        list: Vec<PathBuf>,
        /// Result file (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Result format (default: from the --out extension, .csv or else JSONL).
        #[arg(long)]
        format: Option<FormatArg>,
        /// Skip images already recorded in --out and append to it.
        #[arg(long, requires = "out")]
        resume: bool,
        /// Decode/preprocess threads (default: every core).
        #[arg(long)]
        workers: Option<usize>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Serve scores over HTTP: POST /v1/score, GET /health, GET /metrics.
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// Address to listen on.
        #[arg(long, env = "AGIQA_ADDR", default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Longest an image waits for others to fill its batch, in milliseconds.
        #[arg(long, default_value_t = 5)]
        max_wait_ms: u64,
        /// Images admitted at once (waiting or in inference); beyond it requests get 503.
        #[arg(long, default_value_t = 256)]
        queue: usize,
        /// Largest request body in bytes (413 beyond).
        #[arg(long, default_value_t = 32 << 20)]
        body_limit: usize,
        /// Request timeout in seconds (504 beyond).
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Measure model-only throughput and latency per batch size on synthetic tensors, and
    /// end-to-end throughput from image files.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Batch sizes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
        batch_sizes: Vec<usize>,
        /// Seconds measured per batch size.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Untimed runs before each measurement.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Images (files, folders, globs) for the end-to-end measurement.
        #[arg(long)]
        images: Vec<String>,
        /// Passes over the images end to end.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Providers to measure, comma-separated (default: --provider).
        #[arg(long, value_delimiter = ',')]
        providers: Vec<ExecutionProvider>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let level = if cli.verbose {
        tracing::Level::INFO
    } else {
        tracing::Level::WARN
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Doctor { ort_lib } => {
            let path = agiqa_runtime::onnxruntime::init(ort_lib.as_deref())?;
            println!("ONNX Runtime: {}", path.display());
            println!("version: {}", agiqa_runtime::onnxruntime::version());
            println!("build info: {}", agiqa_runtime::onnxruntime::build_info());
            Ok(())
        }
        Command::Preprocess {
            images,
            out_dir,
            image_size,
        } => {
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("cannot create {}", out_dir.display()))?;
            let preprocessor = Preprocessor::new(Preprocessing::clip(image_size));
            let mut failed = 0;
            for path in &images {
                let result = decode_image_file(path, &DecodeLimits::default())
                    .and_then(|img| Ok((img.dimensions(), preprocessor.resize_and_crop(&img)?)));
                match result {
                    Ok(((w, h), square)) => {
                        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                        let out = out_dir.join(format!("{stem}.input.png"));
                        square
                            .save(&out)
                            .with_context(|| format!("cannot write {}", out.display()))?;
                        println!("{}: {w}x{h} -> {}", path.display(), out.display());
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("error: {e}");
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} images failed", images.len());
            }
            Ok(())
        }
        Command::Score {
            model,
            inputs,
            list,
            out,
            format,
            resume,
            workers,
            quiet,
        } => score(model, inputs, list, out, format, resume, workers, quiet),
        Command::Serve {
            model,
            addr,
            max_wait_ms,
            queue,
            body_limit,
            timeout,
        } => {
            let scorer = Arc::new(model.load(true)?);
            let mut options = ServeOptions::for_scorer(&scorer);
            options.max_wait = Duration::from_millis(max_wait_ms);
            options.queue_capacity = queue;
            options.body_limit = body_limit;
            options.request_timeout = Duration::from_secs_f64(timeout);
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")?
                .block_on(serve_until_signal(addr, scorer, options))
                .with_context(|| format!("serving on {addr}"))
        }
        Command::Bench {
            model,
            batch_sizes,
            seconds,
            warmup,
            images,
            repeat,
            providers,
            json,
        } => {
            let images = collect_inputs(&images, &[])?;
            let options = BenchOptions {
                batch_sizes,
                duration: Duration::from_secs_f64(seconds),
                warmup,
                images,
                repeat,
            };
            let providers = if providers.is_empty() {
                vec![model.provider]
            } else {
                providers
            };
            // Each provider is measured on its own; one that cannot load is reported (in the
            // JSON too) and makes the exit status non-zero, without hiding the others.
            let mut reports = Vec::new();
            let mut failed = Vec::new();
            for provider in providers {
                match bench_one(&model, provider, &options) {
                    Ok(report) => {
                        if !json {
                            print!("{}", bench::render_table(&report));
                        }
                        reports.push(serde_json::to_value(&report)?);
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        reports.push(serde_json::json!({
                            "provider": provider.as_str(),
                            "error": format!("{e:#}"),
                        }));
                        failed.push(provider.as_str());
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            }
            anyhow::ensure!(
                failed.is_empty(),
                "could not benchmark on {}",
                failed.join(", ")
            );
            Ok(())
        }
    }
}

fn bench_one(
    model: &ModelArgs,
    provider: ExecutionProvider,
    options: &BenchOptions,
) -> anyhow::Result<bench::BenchReport> {
    let load = |spinning, batch_size| {
        let options = ScorerOptions {
            batch_size,
            ..model.options(provider, spinning)
        };
        Scorer::load(&model.model, options)
            .with_context(|| format!("cannot use model {} on {provider}", model.model.display()))
    };
    // Model-only runs as ONNX Runtime runs by default (spinning threads) and runs each batch
    // size whole; end to end runs as `score` does, with --batch-size, leaving the cores to the
    // decoders between batches.
    let largest = options.batch_sizes.iter().copied().max().unwrap_or(1);
    let scorer = load(true, largest.max(1))?;
    let pipeline_scorer = if options.images.is_empty() {
        None
    } else {
        Some(load(false, model.batch_size)?)
    };
    bench::run(&scorer, pipeline_scorer.as_ref(), options)
        .with_context(|| format!("benchmarking on {provider}"))
}

#[allow(clippy::too_many_arguments)]
fn score(
    model: ModelArgs,
    inputs: Vec<String>,
    lists: Vec<PathBuf>,
    out: Option<PathBuf>,
    format: Option<FormatArg>,
    resume: bool,
    workers: Option<usize>,
    quiet: bool,
) -> anyhow::Result<()> {
    let mut paths = collect_inputs(&inputs, &lists)?;
    anyhow::ensure!(
        !paths.is_empty(),
        "no images given (files, folders, globs or --list)"
    );
    let format = match (format, &out) {
        (Some(FormatArg::Csv), _) => OutputFormat::Csv,
        (Some(FormatArg::Jsonl), _) => OutputFormat::Jsonl,
        (None, Some(path)) => OutputFormat::for_path(path),
        (None, None) => OutputFormat::Jsonl,
    };
    let mut header = true;
    if let (true, Some(out)) = (resume, &out) {
        let done = recorded_paths(out, format)
            .with_context(|| format!("cannot read {} to resume", out.display()))?;
        header = !out.exists() || std::fs::metadata(out).map(|m| m.len() == 0).unwrap_or(true);
        let before = paths.len();
        paths.retain(|p| !done.contains(p));
        eprintln!(
            "resume: {} of {before} images already in {}",
            before - paths.len(),
            out.display()
        );
    }
    // Decoding needs the cores between batches: ONNX Runtime's threads must not spin on them.
    let scorer = model.load(false)?;
    let sink: Box<dyn Write> = match &out {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(resume)
                .write(true)
                .truncate(!resume)
                .open(path)
                .with_context(|| format!("cannot write {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut writer = ResultWriter::new(sink, format, &scorer.head_names(), header)
        .context("cannot write the results header")?;
    let progress = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(paths.len() as u64)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images, {per_sec}, eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut pipeline = PipelineOptions::for_scorer(&scorer);
    if let Some(w) = workers {
        pipeline.workers = w;
    }
    let mut write_error = None;
    let mut failed = 0;
    let stats = score_paths(&scorer, &paths, &pipeline, |scored| {
        progress.inc(1);
        let written = match &scored.result {
            Ok(scores) => writer.write(&scored.path, Ok(scores)),
            Err(e) => {
                failed += 1;
                progress.set_message(format!("({failed} failed)"));
                writer.write(&scored.path, Err(&e.to_string()))
            }
        };
        match written {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    });
    progress.finish_and_clear();
    if let Some(e) = write_error {
        return Err(e).context("cannot write results");
    }
    eprintln!(
        "scored {} of {} images in {:.1} s ({:.1} images/s, {} batches)",
        stats.scored, stats.images, stats.seconds, stats.images_per_second, stats.batches
    );
    anyhow::ensure!(
        stats.failed == 0,
        "{} of {} images failed; their reasons are in the results",
        stats.failed,
        stats.images
    );
    Ok(())
}
