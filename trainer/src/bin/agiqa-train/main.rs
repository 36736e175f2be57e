//! `agiqa-train`: the trainer's command line. Parses flags ([`args`]) and calls the library.

mod args;

use agiqa_trainer::checkpoint::write_untrained;
use agiqa_trainer::config::TrainConfig;
use agiqa_trainer::data::synthetic_dataset::{
    parse_kinds, write_agiqa3k_like, write_aigciqa2023_like, SynthOptions,
};
use agiqa_trainer::device::{device_from, device_name};
use agiqa_trainer::doctor::device_report;
use agiqa_trainer::evaluate::{evaluate_dataset, predict_files, write_eval_outputs};
use agiqa_trainer::inspect::embedding_report;
use agiqa_trainer::model::{parse_categories, ModelConfig};
use agiqa_trainer::synthetic_images::write_distortion_ladders;
use agiqa_trainer::train::{RunOutcome, TrainJob};
use agiqa_trainer::workers::init_worker_pool;
use anyhow::{bail, Context};
use args::{
    Cli, Command, DoctorArgs, EmbedArgs, EvalArgs, InitArgs, PredictArgs, SynthArgs, SynthFormat,
    TrainArgs,
};
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_worker_pool(cli.workers.map(usize::from)).context("cannot start the worker pool")?;
    match cli.command {
        Command::Train(args) => train(*args),
        Command::Eval(args) => eval(args),
        Command::Predict(args) => predict(args),
        Command::Embed(args) => embed(args),
        Command::Synth(args) => synth(args),
        Command::SynthImages(args) => {
            let written = write_distortion_ladders(&args.out, args.scenes, args.size)?;
            println!("wrote {written} images to {}", args.out.display());
            Ok(())
        }
        Command::Init(args) => init(args),
        Command::Doctor(args) => doctor(args),
    }
}

fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let report = device_report();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let config = TrainConfig::resolve(args.config.as_deref(), &args.overrides)?;
    let device = device_from(&config.device)?;
    let precision = config.precision_on(device)?;
    let dataset = args.data.load()?;
    let mut clip = args.clip.load(device)?;
    clip.set_precision(precision);
    let (name, out) = (clip.config().name(), args.out.display());
    eprintln!(
        "CLIP {name} on {} in {precision} (context, head and optimiser in fp32); writing to {out}",
        device_name(device)
    );
    let job = TrainJob {
        clip: &clip,
        clip_source: args.clip.required_source()?,
        tokenizer: &args.clip.tokenizer()?,
        dataset: &dataset,
        config,
        out_dir: args.out.clone(),
        resume: args.resume,
        stop_after_epochs: args.stop_after_epochs.map(|n| n as usize),
        show_progress: true,
    };
    match job.run()? {
        RunOutcome::Finished(summary) => println!("{summary}\noutputs: {out}"),
        RunOutcome::Stopped { epoch, dir } => println!(
            "stopped after epoch {epoch} as asked; continue with --resume (run in {})",
            dir.display()
        ),
    }
    Ok(())
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let loaded = args
        .clip
        .checkpoint(&args.checkpoint, &args.device, args.precision)?;
    let dataset = args.data.load()?;
    let report = evaluate_dataset(&loaded, &dataset, args.cache_dir.as_deref())?;
    print!("{report}");
    if let Some(out) = &args.out {
        let (json, scatter) = write_eval_outputs(&report, out)?;
        println!("wrote {} and {}", json.display(), scatter.display());
    }
    Ok(())
}

fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let loaded = args
        .clip
        .checkpoint(&args.checkpoint, &args.device, args.precision)?;
    let mut failed = 0;
    println!("path,{}", loaded.meta.dimension);
    for (path, result) in args.images.iter().zip(predict_files(&loaded, &args.images)) {
        match result {
            Ok(score) => println!("{},{score:.6}", path.display()),
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} images could not be scored",
            args.images.len()
        );
    }
    Ok(())
}

fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    let device = device_from(&args.device)?;
    let clip = args.clip.load(device)?;
    let tokenizer = args.clip.tokenizer()?;
    let report = embedding_report(&clip, &tokenizer, &args.images, &args.texts, device)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let options = SynthOptions {
        images: args.images as usize,
        size: args.size,
        seed: args.seed,
        kinds: parse_kinds(&args.kinds)?,
    };
    let summary = match args.format {
        SynthFormat::Agiqa3k => write_agiqa3k_like(&args.out, &options)?,
        SynthFormat::Aigciqa2023 => write_aigciqa2023_like(&args.out, &options)?,
    };
    let (w, h) = summary.image_size;
    let (n, dir) = (summary.records.len(), summary.dir.display());
    println!("wrote {n} images ({w}x{h}) to {dir}");
    Ok(())
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let source = args.clip.required_source()?;
    let model = ModelConfig {
        variant: args.variant,
        categories: parse_categories(&args.categories)?,
        context_len: args.context_len,
        score_min: args.score_scale.0,
        score_max: args.score_scale.1,
        ..Default::default()
    };
    let device = device_from(&args.device)?;
    let tokenizer = args.clip.tokenizer()?;
    let stem = write_untrained(
        &source,
        &model,
        &args.dimension,
        args.seed,
        &args.out,
        &tokenizer,
        device,
    )?;
    println!(
        "wrote untrained checkpoint {} (CLIP {})",
        stem.display(),
        source.describe()
    );
    Ok(())
}
