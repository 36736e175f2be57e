//! `agiqa-train`: the trainer's command line. Parses flags and calls the library.

use std::path::PathBuf;

use agiqa_trainer::clip::{Clip, ClipConfig};
use agiqa_trainer::inspect::embedding_report;
use agiqa_trainer::synthetic::{procedural_scene, Distortion};
use agiqa_trainer::tokenizer::ClipTokenizer;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

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
    /// Print CLIP image and text embeddings and zero-shot similarities, for spot checks of
    /// weights against the reference implementation.
    Embed(EmbedArgs),
    /// Write procedurally generated images with distortions of increasing strength.
    SynthImages(SynthArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// CLIP weights: OpenAI TorchScript (.pt), torch.save state dict, Hugging Face folder or
    /// model.safetensors.
    #[arg(long, conflicts_with = "random")]
    clip: Option<PathBuf>,
    /// Use randomly initialised weights of this architecture instead (ViT-B/16, ViT-B/32,
    /// ViT-L/14, RN50, RN101, tiny); embeddings are then meaningless, but shapes and speed are real.
    #[arg(long)]
    random: Option<String>,
    /// Seed for --random.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Hugging Face tokenizer.json (default: the embedded CLIP tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Run on the GPU when one is available.
    #[arg(long)]
    cuda: bool,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images to embed (repeatable).
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// Texts to embed (repeatable).
    #[arg(long = "text", required = true)]
    texts: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SynthArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Number of distinct scenes.
    #[arg(long, default_value_t = 2)]
    scenes: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Embed(args) => embed(args),
        Command::SynthImages(args) => synth_images(args),
    }
}

fn load_model(args: &ModelArgs) -> anyhow::Result<(Clip, tch::Device)> {
    let device = if args.cuda {
        tch::Device::cuda_if_available()
    } else {
        tch::Device::Cpu
    };
    let clip = match (&args.clip, &args.random) {
        (Some(path), _) => Clip::load(path, device)
            .with_context(|| format!("cannot load CLIP weights from {}", path.display()))?,
        (None, Some(name)) => {
            let config = ClipConfig::preset(name).with_context(|| {
                format!("unknown architecture {name:?}; one of: ViT-B/16, ViT-B/32, ViT-L/14, RN50, RN101, tiny")
            })?;
            eprintln!(
                "note: {name} with RANDOM weights (seed {}): embeddings carry no meaning",
                args.seed
            );
            Clip::random(&config, args.seed, device)
        }
        (None, None) => bail!("give --clip <weights> or --random <architecture>"),
    };
    Ok((clip, device))
}

fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    let (clip, device) = load_model(&args.model)?;
    let tokenizer = match &args.model.tokenizer {
        Some(path) => ClipTokenizer::from_file(path)?,
        None => ClipTokenizer::embedded()?,
    };
    let report = embedding_report(&clip, &tokenizer, &args.images, &args.texts, device)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn synth_images(args: SynthArgs) -> anyhow::Result<()> {
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
