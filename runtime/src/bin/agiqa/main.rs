//! `agiqa`: the runtime's command-line entry point. It parses flags ([`args`]), calls the
//! library and prints; the work is in `agiqa_runtime`.

mod args;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agiqa_runtime::batch_io::collect_inputs;
use agiqa_runtime::bench::{self, BenchOptions, ProviderBench, ProviderBenchOptions};
use agiqa_runtime::doctor::{self, DoctorOptions};
use agiqa_runtime::input_preview::write_input_previews;
use agiqa_runtime::preprocess::JpegDecoding;
use agiqa_runtime::score_files::{score_files, ResultsOut, ScoreFilesOptions, ScoreObserver};
use agiqa_runtime::scorer::{ScoreError, Scorer};
use agiqa_runtime::serve::{serve_until_signal, ServeOptions};
use anyhow::Context;
use args::{BenchArgs, Cli, Command, DoctorArgs, PreprocessArgs, ScoreArgs, ServeArgs};
use clap::Parser;

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
        Command::Doctor(args) => doctor(args),
        Command::Preprocess(args) => preprocess(args),
        Command::Score(args) => score(args),
        Command::Serve(args) => serve(args),
        Command::Bench(args) => bench(args),
    }
}

fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let report = doctor::run(&DoctorOptions {
        ort_lib: args.ort_lib,
        model: args.model.clone(),
        provider: args.provider,
        device_id: args.device_id,
    })
    .with_context(|| match &args.model {
        Some(model) => format!("doctor (model {})", model.display()),
        None => "doctor".to_string(),
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", doctor::render(&report));
    }
    Ok(())
}

fn preprocess(args: PreprocessArgs) -> anyhow::Result<()> {
    let previews = write_input_previews(&args.images, &args.out_dir, args.image_size)?;
    let mut failed = 0;
    for preview in previews {
        match preview.result {
            Ok(((w, h), out)) => {
                println!("{}: {w}x{h} -> {}", preview.image.display(), out.display())
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} images failed",
        args.images.len()
    );
    Ok(())
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let paths = collect_inputs(&args.inputs, &args.list)?;
    anyhow::ensure!(
        !paths.is_empty(),
        "no images given (files, folders, globs or --list)"
    );
    let options = ScoreFilesOptions {
        model: args.model.model.clone(),
        scorer: args.model.options(),
        paths,
        format: args.output_format(),
        out: match args.out {
            Some(path) => ResultsOut::File {
                path,
                resume: args.resume,
            },
            None => ResultsOut::Stdout,
        },
        workers: args.workers,
    };
    let mut progress = Progress {
        model: &args.model.model,
        quiet: args.quiet,
        bar: indicatif::ProgressBar::hidden(),
        failed: 0,
    };
    let summary = score_files(&options, &mut progress);
    progress.bar.finish_and_clear();
    let summary = summary?;
    let stats = summary.stats;
    let decoding = match summary.jpeg_decoding {
        JpegDecoding::Exact => "",
        JpegDecoding::Reduced => "; large JPEGs decoded at reduced size (--fast-decode)",
    };
    eprintln!(
        "scored {} of {} images in {:.1} s ({:.1} images/s, {} batches{decoding})",
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

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let model = &args.model.model;
    let scorer = Scorer::load(model, args.model.options())
        .with_context(|| format!("cannot use model {}", model.display()))?;
    describe(model, &scorer);
    let scorer = Arc::new(scorer);
    let mut options = ServeOptions::for_scorer(&scorer);
    options.max_wait = Duration::from_millis(args.max_wait_ms);
    options.queue_capacity = args.queue;
    options.max_queue_delay = args.max_queue_delay;
    options.body_limit = args.body_limit;
    options.request_timeout = args.timeout;
    options.header_read_timeout = args.header_timeout;
    options.body_read_timeout = args.body_timeout;
    options.keep_alive_timeout = args.keep_alive;
    options.max_connections = args.max_connections;
    options.drain_grace = Duration::from_secs_f64(args.drain_grace);
    let addr = args.addr;
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")?
        .block_on(serve_until_signal(addr, scorer, options))
        .with_context(|| format!("serving on {addr}"))
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let options = ProviderBenchOptions {
        model: args.model.model.clone(),
        scorer: args.model.options(),
        providers: args.providers,
        bench: BenchOptions {
            batch_sizes: args.batch_sizes,
            duration: args.seconds,
            warmup: args.warmup,
            images: collect_inputs(&args.images, &[])?,
            repeat: args.repeat,
        },
    };
    // A provider that cannot load is reported (in the JSON too) and makes the exit status
    // non-zero, without hiding the others.
    let mut failed = Vec::new();
    let rows = bench::run_providers(&options, |row| match row {
        ProviderBench::Measured(report) if !args.json => {
            print!("{}", bench::render_table(report))
        }
        ProviderBench::Measured(_) => {}
        ProviderBench::Failed { provider, error } => {
            eprintln!("error: {}", bench::error_chain(error));
            failed.push(provider.as_str());
        }
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    anyhow::ensure!(
        failed.is_empty(),
        "could not benchmark on {}",
        failed.join(", ")
    );
    Ok(())
}

/// Prints the provider notes and what runs where, once a model is loaded.
fn describe(model: &Path, scorer: &Scorer) {
    for note in scorer.provider_notes() {
        eprintln!("note: {note}");
    }
    let devices = scorer.session_devices();
    let placement = if scorer.provider().is_gpu() {
        let mut gpus: Vec<String> = devices.iter().map(i32::to_string).collect();
        gpus.dedup();
        gpus.sort();
        gpus.dedup();
        format!("{} sessions on GPU {}", devices.len(), gpus.join(","))
    } else {
        format!("{} sessions", devices.len())
    };
    eprintln!(
        "model {} on {} (heads: {}; input {}; {placement}{})",
        model.display(),
        scorer.provider(),
        scorer.head_names().join(", "),
        scorer.input_kind().name(),
        if scorer.uses_io_binding() {
            "; IoBinding"
        } else {
            ""
        }
    );
}

/// `score`'s messages and progress bar, on standard error.
struct Progress<'a> {
    model: &'a Path,
    quiet: bool,
    /// Hidden until scoring starts, and with --quiet.
    bar: indicatif::ProgressBar,
    failed: usize,
}

impl ScoreObserver for Progress<'_> {
    fn resumed(&mut self, out: &Path, skipped: usize, total: usize) {
        eprintln!(
            "resume: {skipped} of {total} images already in {}",
            out.display()
        );
    }

    fn loaded(&mut self, scorer: &Scorer) {
        describe(self.model, scorer);
    }

    fn started(&mut self, images: usize) {
        if !self.quiet {
            let style = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} images, {per_sec}, eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            self.bar = indicatif::ProgressBar::new(images as u64).with_style(style);
        }
    }

    fn scored(&mut self, _path: &Path, result: Result<&[f32], &ScoreError>) {
        self.bar.inc(1);
        if result.is_err() {
            self.failed += 1;
            self.bar.set_message(format!("({} failed)", self.failed));
        }
    }
}
