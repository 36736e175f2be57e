//! The flags of `agiqa-train`, one struct per subcommand (clap derive), and the small helpers
//! that turn shared flags into library values.
// Doc comments here are clap help texts (`<dir>` is a placeholder, not an HTML tag).
#![allow(rustdoc::invalid_html_tags)]

use std::path::{Path, PathBuf};

use agiqa_trainer::checkpoint::{load_checkpoint_in, LoadedCheckpoint};
use agiqa_trainer::clip::{Clip, ClipConfig, ClipSource};
use agiqa_trainer::config::TrainOverrides;
use agiqa_trainer::data::{load_dataset, Dataset, DatasetSpec, LoadOptions};
use agiqa_trainer::device::device_from;
use agiqa_trainer::model::Variant;
use agiqa_trainer::precision::Precision;
use agiqa_trainer::tokenizer::ClipTokenizer;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "agiqa-train",
    version,
    about = "Train and evaluate CLIP-AGIQA quality models (tch / libtorch)."
)]
pub(crate) struct Cli {
    /// CPU worker threads for image checks, decoding and resampling (default: one per core).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) workers: Option<u16>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// What this libtorch can run on: library path and version, CUDA (or why not), GPUs
    /// (name, compute capability, memory), cuDNN, and the precisions that work.
    Doctor(DoctorArgs),
}

#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct ClipArgs {
    /// CLIP weights: OpenAI TorchScript (.pt), torch.save state dict, Hugging Face folder or
    /// model.safetensors.
    #[arg(long, conflicts_with = "random")]
    pub(crate) clip: Option<PathBuf>,
    /// Use randomly initialised weights of this architecture instead (ViT-B/16, ViT-B/32,
    /// ViT-L/14, RN50, RN101, tiny, tiny-rn): no meaning in the features, but shapes and speed are real.
    #[arg(long)]
    pub(crate) random: Option<String>,
    /// Seed for --random.
    #[arg(long, default_value_t = 0)]
    pub(crate) clip_seed: i64,
    /// Hugging Face tokenizer.json (default: the embedded CLIP tokenizer).
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
}

impl ClipArgs {
    pub(crate) fn source(&self) -> anyhow::Result<Option<ClipSource>> {
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

    pub(crate) fn required_source(&self) -> anyhow::Result<ClipSource> {
        self.source()?
            .context("give --clip <weights> or --random <architecture>")
    }

    pub(crate) fn load(&self, device: tch::Device) -> anyhow::Result<Clip> {
        let source = self.required_source()?;
        if let ClipSource::Random { preset, seed } = &source {
            eprintln!(
                "note: CLIP {preset} with RANDOM weights (seed {seed}): no pretrained knowledge"
            );
        }
        source
            .load(device)
            .with_context(|| format!("cannot load CLIP from {}", source.describe()))
    }

    pub(crate) fn tokenizer(&self) -> anyhow::Result<ClipTokenizer> {
        Ok(match &self.tokenizer {
            Some(path) => ClipTokenizer::from_file(path)?,
            None => ClipTokenizer::embedded()?,
        })
    }

    /// Loads a checkpoint with the CLIP given here, or else the one it records, computing in
    /// `precision` (default: the device's).
    pub(crate) fn checkpoint(
        &self,
        stem: &Path,
        device: &str,
        precision: Option<Precision>,
    ) -> anyhow::Result<LoadedCheckpoint> {
        let device = device_from(device)?;
        let precision = Precision::resolve(precision, device)?;
        let clip = match self.source()? {
            Some(_) => Some(self.load(device)?),
            None => None,
        };
        let loaded = load_checkpoint_in(stem, clip, &self.tokenizer()?, device, precision)
            .with_context(|| format!("cannot load checkpoint {}", stem.display()))?;
        eprintln!(
            "CLIP {} on {} in {precision}",
            loaded.meta.clip_name,
            agiqa_trainer::device::device_name(device)
        );
        Ok(loaded)
    }
}

#[derive(Args)]
pub(crate) struct DataArgs {
    /// Dataset: agiqa3k:<dir>, aigciqa2023:<dir>, manifest:<file.csv|jsonl> or a manifest path.
    #[arg(long)]
    pub(crate) dataset: String,
    /// Rated dimension: quality, alignment (AGIQA-3K), authenticity, correspondence (AIGCIQA2023).
    #[arg(long)]
    pub(crate) dimension: Option<String>,
    /// Drop invalid rows (reported) instead of failing on them.
    #[arg(long)]
    pub(crate) skip_bad: bool,
}

impl DataArgs {
    pub(crate) fn load(&self) -> anyhow::Result<Dataset> {
        let spec: DatasetSpec = self.dataset.parse()?;
        let options = LoadOptions {
            dimension: self.dimension.clone(),
            skip_bad: self.skip_bad,
            check_images: true,
        };
        let (dataset, report) = load_dataset(&spec, &options)?;
        if !report.skipped.is_empty() {
            let file = report.file.display();
            eprintln!("skipped {} invalid rows of {file}:", report.skipped.len());
            for row in &report.skipped {
                eprintln!("  {row}");
            }
        }
        let (lo, hi) = dataset.scale;
        let (name, n) = (&dataset.name, dataset.samples.len());
        eprintln!(
            "dataset {name} / {}: {n} images, MOS scale {lo}–{hi}",
            dataset.dimension
        );
        Ok(dataset)
    }
}

#[derive(Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub(crate) clip: ClipArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Output folder (config.toml, log.jsonl, checkpoints, plots, metrics).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Configuration file (TOML or JSON); flags below override it. Defaults: the paper's.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Continue an interrupted run in --out.
    #[arg(long)]
    pub(crate) resume: bool,
    #[command(flatten)]
    pub(crate) overrides: TrainOverrides,
    /// Stop after this many epochs in this process (exit status 0), leaving `last` to
    /// continue with --resume: a kill at an epoch boundary, for checking resumption.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) stop_after_epochs: Option<u32>,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// Checkpoint (e.g. runs/x/best).
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    #[command(flatten)]
    pub(crate) clip: ClipArgs,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Folder for eval.json and scatter.png.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Frozen-feature cache to read and fill (the one training used saves re-encoding).
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Precision of the frozen CLIP (default: fp16 on CUDA, fp32 on CPU).
    #[arg(long, value_enum)]
    pub(crate) precision: Option<Precision>,
}

#[derive(Args)]
pub(crate) struct PredictArgs {
    /// Checkpoint (e.g. runs/x/best).
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    #[command(flatten)]
    pub(crate) clip: ClipArgs,
    /// Images to score.
    #[arg(required = true)]
    pub(crate) images: Vec<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Precision of the frozen CLIP (default: fp16 on CUDA, fp32 on CPU).
    #[arg(long, value_enum)]
    pub(crate) precision: Option<Precision>,
}

#[derive(Args)]
pub(crate) struct EmbedArgs {
    #[command(flatten)]
    pub(crate) clip: ClipArgs,
    /// Images to embed (repeatable).
    #[arg(long = "image", required = true)]
    pub(crate) images: Vec<PathBuf>,
    /// Texts to embed (repeatable).
    #[arg(long = "text", required = true)]
    pub(crate) texts: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SynthFormat {
    Agiqa3k,
    Aigciqa2023,
}

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// Which dataset's format to write.
    #[arg(long, value_enum)]
    pub(crate) format: SynthFormat,
    /// Output folder.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) images: u32,
    /// Image width (height is 3/4 of it).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(8..=8192))]
    pub(crate) size: u32,
    /// Seeds scenes, distortions and MOS noise.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Distortion kinds to use, comma-separated (blur, noise, jpeg, colour; default all).
    #[arg(long, value_delimiter = ',')]
    pub(crate) kinds: Vec<String>,
}

#[derive(Args)]
pub(crate) struct SynthImagesArgs {
    /// Output folder.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Number of procedural scenes.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) scenes: u64,
    /// Image width (height is 3/4 of it).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(8..=8192))]
    pub(crate) size: u32,
}

#[derive(Args)]
pub(crate) struct InitArgs {
    #[command(flatten)]
    pub(crate) clip: ClipArgs,
    /// Folder for `best.safetensors` + `best.json`.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Model variant.
    #[arg(long, value_enum, default_value_t = Variant::Regression)]
    pub(crate) variant: Variant,
    /// Quality categories: adjectives6, adjectives8, scores6, or a comma-separated list.
    #[arg(long, default_value = "adjectives6")]
    pub(crate) categories: String,
    /// Learnable context tokens (M).
    #[arg(long, default_value_t = 16)]
    pub(crate) context_len: usize,
    /// Score scale `MIN,MAX` (AGIQA-3K: 0,5; AIGCIQA2023: 0,100).
    #[arg(long, default_value = "0,5", value_parser = parse_scale)]
    pub(crate) score_scale: (f64, f64),
    /// Name of the rated dimension.
    #[arg(long, default_value = "quality")]
    pub(crate) dimension: String,
    /// Seeds the context and head initialisation.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

/// `MIN,MAX` with finite MIN < MAX.
pub(crate) fn parse_scale(text: &str) -> Result<(f64, f64), String> {
    let (a, b) = text.split_once(',').ok_or("expected MIN,MAX")?;
    let parse = |s: &str| s.trim().parse::<f64>().map_err(|e| format!("{s:?}: {e}"));
    let (min, max) = (parse(a)?, parse(b)?);
    if !(min.is_finite() && max.is_finite() && min < max) {
        return Err(format!("need finite MIN < MAX, got {min},{max}"));
    }
    Ok((min, max))
}
