//! `agiqa-export`: trained checkpoint(s) → one ONNX graph, verified, optionally as a Triton
//! model repository.

use std::path::{Path, PathBuf};
use std::time::Instant;

use agiqa_exporter::export::check_shared_encoder;
use agiqa_exporter::triton::{config_pbtxt, write_repository, InstanceKind, TritonOptions};
use agiqa_exporter::verify::{verify, VerifyOptions};
use agiqa_exporter::{build_model, write_model, ExportOptions, HeadSource, InputKind, Precision};
use agiqa_trainer::checkpoint::CheckpointMeta;
use agiqa_trainer::checkpoint::{load_checkpoint, LoadedCheckpoint};
use agiqa_trainer::clip::Clip;
use agiqa_trainer::device::device_from;
use agiqa_trainer::tokenizer::ClipTokenizer;
use anyhow::{bail, Context};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "agiqa-export",
    version,
    about = "Export trained CLIP-AGIQA checkpoints as one ONNX graph (image encoder + folded heads)."
)]
struct Args {
    /// Checkpoints (`runs/x/best`), each optionally named `NAME=CHECKPOINT`. Several
    /// checkpoints trained on the same CLIP become one graph with one output column per head.
    #[arg(required = true)]
    checkpoints: Vec<String>,
    /// The .onnx file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// fp16 weights and activations (fp32 inputs and outputs).
    #[arg(long)]
    fp16: bool,
    /// `float`: normalised float32 NCHW input; `uint8`: resized-and-cropped uint8 NHWC pixels,
    /// normalised inside the graph (a quarter of the bytes to copy to the device).
    #[arg(long, value_enum, default_value = "float")]
    input: InputArg,
    /// Also output the L2-normalised CLIP image embeddings (`image_features`, `[N, E]`).
    #[arg(long)]
    with_features: bool,
    /// Compare the graph (ONNX Runtime) with the trainer's forward; exit non-zero on failure.
    #[arg(long)]
    verify: bool,
    /// Random tensors and synthetic images --verify compares (each at least 1 and 0).
    #[arg(long, default_value_t = 4)]
    verify_random: usize,
    #[arg(long, default_value_t = 6)]
    verify_images: usize,
    /// CLIP weights to use instead of the source each checkpoint records.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// Device for the trainer's forward (`cpu`, `cuda`, `auto`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libonnxruntime.so for --verify (default: ORT_DYLIB_PATH, beside the binary, .deps/lib).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_lib: Option<PathBuf>,
    /// Also write a Triton model repository entry `<DIR>/<name>/{1/model.onnx,config.pbtxt}`.
    #[arg(long, value_name = "DIR")]
    triton: Option<PathBuf>,
    #[arg(long, default_value = "clip_agiqa")]
    triton_name: String,
    #[arg(long, default_value_t = 64)]
    triton_max_batch: u32,
    #[arg(long, default_value_t = 1)]
    triton_instances: u32,
    #[arg(long, value_enum, default_value = "gpu")]
    triton_kind: KindArg,
    /// Do not ask Triton to run the graph through TensorRT.
    #[arg(long)]
    no_tensorrt: bool,
    /// TensorRT engines in FP32 instead of FP16.
    #[arg(long)]
    tensorrt_fp32: bool,
    /// Write a JSON report (sizes, timings, verification) here.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum InputArg {
    Float,
    Uint8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Gpu,
    Cpu,
}

/// `NAME=PATH` or `PATH`.
fn split_name(spec: &str) -> (Option<&str>, &Path) {
    match spec.split_once('=') {
        Some((name, path)) if !name.contains('/') => (Some(name), Path::new(path)),
        _ => (None, Path::new(spec)),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let device = device_from(&args.device)?;
    let tokenizer = ClipTokenizer::embedded()?;

    // Read every checkpoint's description first, so mismatched backbones are refused before
    // any CLIP is loaded.
    let mut specs = Vec::new();
    for spec in &args.checkpoints {
        let (name, stem) = split_name(spec);
        let meta: CheckpointMeta = agiqa_trainer::checkpoint::read_description(stem)
            .with_context(|| format!("cannot read checkpoint {}", stem.display()))?;
        specs.push((name.map(str::to_string), stem.to_path_buf(), meta));
    }
    for (_, stem, meta) in &specs[1..] {
        check_shared_encoder((&specs[0].1, &specs[0].2), (stem, meta))?;
    }

    let mut clip: Option<Clip> = match &args.clip {
        Some(path) => Some(
            Clip::load(path, device)
                .with_context(|| format!("cannot load CLIP weights {}", path.display()))?,
        ),
        None => None,
    };
    let mut loaded: Vec<(String, LoadedCheckpoint)> = Vec::new();
    let count = specs.len();
    for (i, (name, stem, meta)) in specs.into_iter().enumerate() {
        let checkpoint = load_checkpoint(&stem, clip.take(), &tokenizer, device)
            .with_context(|| format!("cannot load checkpoint {}", stem.display()))?;
        // The next head gets its own copy of the (verified) CLIP instead of loading it again.
        if i + 1 < count {
            clip = Some(checkpoint.model.clip().clone_frozen());
        }
        loaded.push((name.unwrap_or_else(|| meta.dimension.clone()), checkpoint));
    }
    let load_s = started.elapsed().as_secs_f64();

    let heads: Vec<HeadSource> = loaded
        .iter()
        .map(|(name, checkpoint)| HeadSource {
            name: name.clone(),
            checkpoint,
        })
        .collect();
    let options = ExportOptions {
        precision: if args.fp16 {
            Precision::Fp16
        } else {
            Precision::Fp32
        },
        input: match args.input {
            InputArg::Float => InputKind::PixelValues,
            InputArg::Uint8 => InputKind::PixelsUint8,
        },
        image_features: args.with_features,
    };
    let build_started = Instant::now();
    let model = build_model(&heads, &options)?;
    let model_bytes = write_model(&args.out, &model.proto)?;
    let bytes = model_bytes.len() as u64;
    let export_s = build_started.elapsed().as_secs_f64();
    println!(
        "wrote {} ({:.1} MB, {}, {} input, heads: {}) in {:.2} s (+ {:.2} s loading)",
        args.out.display(),
        bytes as f64 / 1e6,
        model.metadata.backbone,
        model.input_name(),
        model
            .metadata
            .heads
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        export_s,
        load_s
    );

    let mut report = serde_json::json!({
        "onnx": args.out,
        "bytes": bytes,
        "backbone": model.metadata.backbone,
        "precision": options.precision,
        "input": options.input,
        "heads": model.metadata.heads.iter().map(|h| &h.name).collect::<Vec<_>>(),
        "load_seconds": load_s,
        "export_seconds": export_s,
    });
    let mut failed = false;
    if args.verify {
        let verify_options = VerifyOptions {
            ort_lib: args.ort_lib.clone(),
            batch: args.verify_random,
            synthetic_images: args.verify_images,
            ..VerifyOptions::default()
        };
        let verified = verify(
            &args.out,
            &heads,
            options.input,
            options.precision,
            &verify_options,
        )
        .context("verification could not run")?;
        println!("verification against the trainer (ONNX Runtime CPU):\n{verified}");
        failed = !verified.passed;
        report["verify"] = serde_json::to_value(&verified)?;
    }

    if let Some(repo) = &args.triton {
        let triton = TritonOptions {
            name: args.triton_name.clone(),
            max_batch_size: args.triton_max_batch,
            preferred_batch_sizes: [8, 16, 32, 64]
                .into_iter()
                .filter(|&b| b <= args.triton_max_batch)
                .collect(),
            instances: args.triton_instances,
            kind: match args.triton_kind {
                KindArg::Gpu => InstanceKind::Gpu,
                KindArg::Cpu => InstanceKind::Cpu,
            },
            tensorrt: !args.no_tensorrt,
            tensorrt_fp16: !args.tensorrt_fp32,
            ..TritonOptions::default()
        };
        let config = config_pbtxt(
            &triton,
            options.input,
            model.metadata.preprocessing.image_size,
            model.metadata.heads.len(),
        )?;
        let entry = write_repository(repo, &triton, &model_bytes, &config)?;
        println!("wrote Triton model repository entry {}", entry.display());
        report["triton"] = serde_json::json!(entry);
    }
    if let Some(path) = &args.report {
        agiqa_runtime::atomic_file::write_atomic(
            path,
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if failed {
        bail!("the exported graph does not match the trainer within tolerance (kept for inspection: {})", args.out.display());
    }
    Ok(())
}
