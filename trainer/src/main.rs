//! `agiqa-train`: the trainer's command line. Parses flags and calls the library.

use std::path::PathBuf;

use agiqa_trainer::clip::{Clip, ClipConfig};
use agiqa_trainer::config::{ProtocolConfig, TrainConfig};
use agiqa_trainer::data::synthetic::{
    write_agiqa3k_like, write_aigciqa2023_like, SynthOptions, KINDS,
};
use agiqa_trainer::data::{load_dataset, DatasetSpec, LoadOptions};
use agiqa_trainer::evaluate::{evaluate_dataset, load_checkpoint, predict_files};
use agiqa_trainer::inspect::embedding_report;
use agiqa_trainer::model::{parse_categories, Variant};
use agiqa_trainer::prompt::ContextInit;
use agiqa_trainer::synthetic::{procedural_scene, Distortion};
use agiqa_trainer::tokenizer::ClipTokenizer;
use agiqa_trainer::train::{device_from, ClipSource, TrainJob};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "agiqa-train",
    version,
    about = "Train and evaluate CLIP-AGIQA quality models (tch / libtorch)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (context + head; CLIP frozen) and evaluate the selected checkpoint.
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint on a dataset: PLCC/SRCC/KRCC table, JSON and scatter plot.
    Eval(EvalArgs),
    /// Score image files with a checkpoint.
    Predict(PredictArgs),
    /// Print CLIP image and text embeddings and zero-shot similarities, for spot checks of
    /// weights against the reference implementation.
    Embed(EmbedArgs),
    /// Write a synthetic dataset in a real dataset's format, whose MOS is a known function of
    /// controlled distortions.
    Synth(SynthArgs),
    /// Write procedurally generated images with distortions of increasing strength.
    SynthImages(SynthImagesArgs),
    /// Write an untrained checkpoint (learned parts at their initialisation), to export,
    /// benchmark or check an architecture before training, e.g. `--random ViT-B/16`.
    Init(InitArgs),
}

#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    clip: ClipArgs,
    /// Folder for `best.safetensors` + `best.json`.
    #[arg(long)]
    out: PathBuf,
    /// regression, classification or zero-shot.
    #[arg(long, default_value = "regression")]
    variant: String,
    /// Quality categories: adjectives6, adjectives8, scores6, or a comma-separated list.
    #[arg(long, default_value = "adjectives6")]
    categories: String,
    #[arg(long, default_value_t = 16)]
    context_len: usize,
    /// Score scale `MIN,MAX` (AGIQA-3K: 0,5; AIGCIQA2023: 0,100).
    #[arg(long, default_value = "0,5")]
    score_scale: String,
    /// Name of the rated dimension.
    #[arg(long, default_value = "quality")]
    dimension: String,
    /// Seeds the context and head initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn parse_variant(name: &str) -> anyhow::Result<Variant> {
    Ok(match name {
        "regression" => Variant::Regression,
        "classification" => Variant::Classification,
        "zero-shot" => Variant::ZeroShot,
        other => bail!("unknown variant {other:?}: regression, classification or zero-shot"),
    })
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let source = args
        .clip
        .source()?
        .context("give --clip <weights> or --random <architecture>")?;
    let (min, max) = args
        .score_scale
        .split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)))
        .with_context(|| format!("--score-scale {:?} is not MIN,MAX", args.score_scale))?;
    let model = agiqa_trainer::model::ModelConfig {
        variant: parse_variant(&args.variant)?,
        categories: parse_categories(&args.categories)?,
        context_len: args.context_len,
        score_min: min,
        score_max: max,
        ..Default::default()
    };
    let stem = agiqa_trainer::train::write_untrained(
        &source,
        &model,
        &args.dimension,
        args.seed,
        &args.out,
        &args.clip.tokenizer()?,
        device_from(&args.device)?,
    )?;
    println!(
        "wrote untrained checkpoint {} (CLIP {})",
        stem.display(),
        source.describe()
    );
    Ok(())
}

#[derive(Args)]
struct ClipArgs {
    /// CLIP weights: OpenAI TorchScript (.pt), torch.save state dict, Hugging Face folder or
    /// model.safetensors.
    #[arg(long, conflicts_with = "random")]
    clip: Option<PathBuf>,
    /// Use randomly initialised weights of this architecture instead (ViT-B/16, ViT-B/32,
    /// ViT-L/14, RN50, RN101, tiny, tiny-rn): no meaning in the features, but shapes and speed are real.
    #[arg(long)]
    random: Option<String>,
    /// Seed for --random.
    #[arg(long, default_value_t = 0)]
    clip_seed: i64,
    /// Hugging Face tokenizer.json (default: the embedded CLIP tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

impl ClipArgs {
    fn source(&self) -> anyhow::Result<Option<ClipSource>> {
        Ok(match (&self.clip, &self.random) {
            (Some(path), _) => Some(ClipSource::File { path: path.clone() }),
            (None, Some(preset)) => {
                if ClipConfig::preset(preset).is_none() {
                    bail!("unknown architecture {preset:?}; one of: ViT-B/16, ViT-B/32, ViT-L/14, RN50, RN101, tiny, tiny-rn");
                }
                Some(ClipSource::Random {
                    preset: preset.clone(),
                    seed: self.clip_seed,
                })
            }
            (None, None) => None,
        })
    }

    fn load(&self, device: tch::Device) -> anyhow::Result<(Clip, ClipSource)> {
        let source = self
            .source()?
            .context("give --clip <weights> or --random <architecture>")?;
        if let ClipSource::Random { preset, seed } = &source {
            eprintln!(
                "note: CLIP {preset} with RANDOM weights (seed {seed}): no pretrained knowledge"
            );
        }
        let clip = source
            .load(device)
            .with_context(|| format!("cannot load CLIP from {}", source.describe()))?;
        Ok((clip, source))
    }

    fn tokenizer(&self) -> anyhow::Result<ClipTokenizer> {
        Ok(match &self.tokenizer {
            Some(path) => ClipTokenizer::from_file(path)?,
            None => ClipTokenizer::embedded()?,
        })
    }
}

#[derive(Args)]
struct DataArgs {
    /// Dataset: agiqa3k:<dir>, aigciqa2023:<dir>, manifest:<file.csv|jsonl> or a manifest path.
    #[arg(long)]
    dataset: String,
    /// Rated dimension: quality, alignment (AGIQA-3K), authenticity, correspondence (AIGCIQA2023).
    #[arg(long)]
    dimension: Option<String>,
    /// Drop invalid rows (reported) instead of failing on them.
    #[arg(long)]
    skip_bad: bool,
}

impl DataArgs {
    fn load(&self) -> anyhow::Result<agiqa_trainer::data::Dataset> {
        let spec: DatasetSpec = self.dataset.parse()?;
        let (dataset, report) = load_dataset(
            &spec,
            &LoadOptions {
                dimension: self.dimension.clone(),
                skip_bad: self.skip_bad,
                check_images: true,
            },
        )?;
        if !report.skipped.is_empty() {
            eprintln!(
                "skipped {} invalid rows of {}:",
                report.skipped.len(),
                report.file.display()
            );
            for row in &report.skipped {
                eprintln!("  {row}");
            }
        }
        eprintln!(
            "dataset {} / {}: {} images, MOS scale {}–{}",
            dataset.name,
            dataset.dimension,
            dataset.samples.len(),
            dataset.scale.0,
            dataset.scale.1
        );
        Ok(dataset)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// The authors' reference split, best epoch on test (to compare with the paper).
    Paper,
    /// Seeded train/val/test, checkpoint selected on validation (honest default).
    Random,
    /// The split column of a manifest.
    Manifest,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    clip: ClipArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Output folder (config.toml, log.jsonl, checkpoints, plots, metrics).
    #[arg(long)]
    out: PathBuf,
    /// Configuration file (TOML or JSON); flags below override it. Defaults: the paper's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue an interrupted run in --out.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// sgd (the paper's) or adamw.
    #[arg(long)]
    optimizer: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Learnable context tokens (M).
    #[arg(long)]
    context_len: Option<usize>,
    /// Initialise the context from a phrase (e.g. "a photo of a") instead of N(0, 0.02).
    #[arg(long)]
    context_init: Option<String>,
    /// Quality categories: adjectives6, adjectives8, scores6, or a comma-separated list.
    #[arg(long)]
    categories: Option<String>,
    /// regression (the paper), classification (ablation: no regression), zero-shot (CLIP-IQA).
    #[arg(long)]
    variant: Option<String>,
    #[arg(long, value_enum)]
    protocol: Option<ProtocolArg>,
    /// Whiten image features with training-set statistics before the head (for encoders whose
    /// quality signal hides in low-variance directions, such as a random tiny CLIP; not the
    /// paper's setting).
    #[arg(long)]
    whiten_features: bool,
    /// Random splits to repeat (mean ± std), random protocol only.
    #[arg(long)]
    repeats: Option<usize>,
    /// Keep all images of one prompt in the same split part.
    #[arg(long)]
    grouped_by_prompt: bool,
    /// Turn off random-resized-crop + flip augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Augmented views per image precomputed in the feature cache.
    #[arg(long)]
    views: Option<usize>,
    /// Feature cache folder.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Run the image encoder every epoch instead of caching features.
    #[arg(long)]
    no_cache: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    device: Option<String>,
    /// Stop after this many epochs (the run can be resumed).
    #[arg(long, hide = true)]
    stop_after_epochs: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    /// Checkpoint (e.g. runs/x/best).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    clip: ClipArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Folder for eval.json, predictions.csv and scatter.png.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Frozen-feature cache to read and fill (the one training used saves re-encoding).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct PredictArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    clip: ClipArgs,
    /// Images to score.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    clip: ClipArgs,
    /// Images to embed (repeatable).
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// Texts to embed (repeatable).
    #[arg(long = "text", required = true)]
    texts: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum SynthFormat {
    Agiqa3k,
    Aigciqa2023,
}

#[derive(Args)]
struct SynthArgs {
    /// Which dataset's format to write.
    #[arg(long, value_enum)]
    format: SynthFormat,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 600)]
    images: usize,
    /// Image width (height is 3/4 of it).
    #[arg(long, default_value_t = 256)]
    size: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Distortion kinds to use, comma-separated (blur, noise, jpeg, colour; default all).
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
}

#[derive(Args)]
struct SynthImagesArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 2)]
    scenes: u64,
    #[arg(long, default_value_t = 256)]
    size: u32,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Train(args) => train(*args),
        Command::Eval(args) => eval(args),
        Command::Predict(args) => predict(args),
        Command::Embed(args) => embed(args),
        Command::Synth(args) => synth(args),
        Command::SynthImages(args) => synth_images(args),
        Command::Init(args) => init(args),
    }
}

fn train_config(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut config = match &args.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    let c = &mut config;
    if let Some(v) = args.epochs {
        c.epochs = v;
    }
    if let Some(v) = args.batch_size {
        c.batch_size = v;
    }
    if let Some(v) = args.lr {
        c.optimizer.lr = v;
    }
    if let Some(v) = &args.optimizer {
        c.optimizer.kind = match v.as_str() {
            "sgd" => agiqa_trainer::config::OptimizerKind::Sgd,
            "adamw" => agiqa_trainer::config::OptimizerKind::AdamW,
            other => bail!("unknown optimizer {other:?}: sgd or adamw"),
        };
    }
    if let Some(v) = args.seed {
        c.seed = v;
    }
    if let Some(v) = args.context_len {
        c.model.context_len = v;
    }
    if let Some(v) = &args.context_init {
        c.model.context_init = ContextInit::Phrase(v.clone());
    }
    if let Some(v) = &args.categories {
        c.model.categories = parse_categories(v)?;
    }
    if let Some(v) = &args.variant {
        c.model.variant = parse_variant(v)?;
    }
    if args.whiten_features {
        c.model.image_norm = agiqa_trainer::model::ImageNorm::Whiten;
    }
    match args.protocol {
        Some(ProtocolArg::Paper) => c.protocol = ProtocolConfig::Paper,
        Some(ProtocolArg::Manifest) => c.protocol = ProtocolConfig::Manifest,
        Some(ProtocolArg::Random) if !matches!(c.protocol, ProtocolConfig::Random { .. }) => {
            c.protocol = ProtocolConfig::default()
        }
        _ => {}
    }
    if let ProtocolConfig::Random {
        repeats,
        grouped_by_prompt,
        ..
    } = &mut c.protocol
    {
        if let Some(v) = args.repeats {
            *repeats = v;
        }
        *grouped_by_prompt |= args.grouped_by_prompt;
    } else if args.repeats.is_some() || args.grouped_by_prompt {
        bail!("--repeats and --grouped-by-prompt apply to --protocol random only");
    }
    if args.no_augment {
        c.augmentation.enabled = false;
    }
    if let Some(v) = args.views {
        c.augmentation.views = v;
    }
    if let Some(v) = &args.cache_dir {
        c.feature_cache = Some(v.clone());
    }
    if args.no_cache {
        c.feature_cache = None;
    }
    if let Some(v) = &args.device {
        c.device = v.clone();
    }
    config.validate()?;
    Ok(config)
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let config = train_config(&args)?;
    let device = device_from(&config.device)?;
    let dataset = args.data.load()?;
    let (clip, clip_source) = args.clip.load(device)?;
    let tokenizer = args.clip.tokenizer()?;
    eprintln!(
        "CLIP {} on {device:?}; writing to {}",
        clip.config().name(),
        args.out.display()
    );
    let job = TrainJob {
        clip: &clip,
        clip_source,
        tokenizer: &tokenizer,
        dataset: &dataset,
        config,
        out_dir: args.out.clone(),
        resume: args.resume,
        stop_after_epochs: args.stop_after_epochs,
        show_progress: true,
    };
    let summary = job.run()?;
    println!("{summary}");
    println!("outputs: {}", args.out.display());
    Ok(())
}

/// Loads a checkpoint with the CLIP given on the command line, or else the one it records.
fn checkpoint_with_clip(
    checkpoint: &std::path::Path,
    clip: &ClipArgs,
    device: &str,
) -> anyhow::Result<agiqa_trainer::evaluate::LoadedCheckpoint> {
    let device = device_from(device)?;
    let tokenizer = clip.tokenizer()?;
    let clip = match clip.source()? {
        Some(_) => Some(clip.load(device)?.0),
        None => None,
    };
    load_checkpoint(checkpoint, clip, &tokenizer, device)
        .with_context(|| format!("cannot load checkpoint {}", checkpoint.display()))
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let loaded = checkpoint_with_clip(&args.checkpoint, &args.clip, &args.device)?;
    let dataset = args.data.load()?;
    let report = evaluate_dataset(&loaded, &dataset, args.cache_dir.as_deref())?;
    print!("{report}");
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let json = out.join("eval.json");
        std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", json.display()))?;
        let (pred, mos): (Vec<f64>, Vec<f64>) =
            report.predictions.iter().map(|(_, m, p)| (*p, *m)).unzip();
        let title = format!(
            "{} / {} — {}",
            dataset.name,
            dataset.dimension,
            args.checkpoint.display()
        );
        agiqa_trainer::plots::plot_scatter(
            &out.join("scatter.png"),
            &title,
            &pred,
            &mos,
            Some(&report.logistic),
            &report.metrics,
        )?;
        println!(
            "wrote {} and {}",
            json.display(),
            out.join("scatter.png").display()
        );
    }
    Ok(())
}

fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let loaded = checkpoint_with_clip(&args.checkpoint, &args.clip, &args.device)?;
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
    let (clip, _) = args.clip.load(device)?;
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
    let kinds = if args.kinds.is_empty() {
        KINDS.to_vec()
    } else {
        args.kinds
            .iter()
            .map(|k| {
                KINDS
                    .iter()
                    .find(|known| **known == k.trim())
                    .copied()
                    .with_context(|| {
                        format!("unknown distortion kind {k:?}; one of {}", KINDS.join(", "))
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let options = SynthOptions {
        images: args.images,
        size: args.size,
        seed: args.seed,
        kinds,
    };
    let summary = match args.format {
        SynthFormat::Agiqa3k => write_agiqa3k_like(&args.out, &options)?,
        SynthFormat::Aigciqa2023 => write_aigciqa2023_like(&args.out, &options)?,
    };
    println!(
        "wrote {} images ({}x{}) to {}",
        summary.records.len(),
        summary.image_size.0,
        summary.image_size.1,
        summary.dir.display()
    );
    Ok(())
}

fn synth_images(args: SynthImagesArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let ladders = [
        [
            Distortion::Blur(0.0),
            Distortion::Blur(1.5),
            Distortion::Blur(4.0),
        ],
        [
            Distortion::Noise(0.0),
            Distortion::Noise(15.0),
            Distortion::Noise(45.0),
        ],
        [
            Distortion::Jpeg(95),
            Distortion::Jpeg(30),
            Distortion::Jpeg(5),
        ],
        [
            Distortion::ColourShift(0.0),
            Distortion::ColourShift(30.0),
            Distortion::ColourShift(80.0),
        ],
    ];
    let mut written = 0;
    for scene in 0..args.scenes {
        let clean = procedural_scene(scene, args.size, args.size * 3 / 4);
        for ladder in &ladders {
            for (level, distortion) in ladder.iter().enumerate().skip(1) {
                let path = args
                    .out
                    .join(format!("scene{scene}_{}{level}.png", distortion.kind()));
                distortion
                    .apply(&clean, scene)
                    .save(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                written += 1;
            }
        }
        let path = args.out.join(format!("scene{scene}_clean.png"));
        clean
            .save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written += 1;
    }
    println!("wrote {written} images to {}", args.out.display());
    Ok(())
}
