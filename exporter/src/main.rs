//! `agiqa-export`: trained checkpoint(s) → one ONNX graph, verified, optionally as a Triton
//! model repository.

use std::path::PathBuf;

use agiqa_exporter::triton::{InstanceKind, TritonOptions};
use agiqa_exporter::verify::VerifyOptions;
use agiqa_exporter::{
    export_checkpoints, CheckpointExport, ExportOptions, InputKind, NamedCheckpoint, Precision,
    TritonEntry,
};
use agiqa_trainer::device::device_from;
use anyhow::bail;
use clap::builder::RangedU64ValueParser;
use clap::Parser;

/// A count flag's parser: a whole number in `min..=max` (clap's error names the range).
fn count(min: u64, max: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(min..=max)
}

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
    checkpoints: Vec<NamedCheckpoint>,
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
    /// Random input tensors --verify compares (1 to 1024).
    #[arg(long, default_value_t = 4, value_parser = count(1, 1024))]
    verify_random: usize,
    /// Synthetic images --verify sends through the shared preprocessing and compares (0: none,
    /// at most 1024).
    #[arg(long, default_value_t = 6, value_parser = count(0, 1024))]
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
    /// Model name in the Triton repository (the entry's folder name).
    #[arg(long, default_value = "clip_agiqa")]
    triton_name: String,
    /// Largest batch Triton's dynamic batcher may form (it prefers 8, 16, 32, 64 up to this).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    triton_max_batch: u32,
    /// Model instances Triton runs side by side.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    triton_instances: u32,
    /// Where Triton runs the instances.
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
    /// `pixel_values`: float32 `[N, 3, R, R]`, normalised.
    Float,
    /// `pixels_uint8`: uint8 `[N, R, R, 3]`, resized and cropped RGB.
    Uint8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindArg {
    /// `KIND_GPU` instances.
    Gpu,
    /// `KIND_CPU` instances (no TensorRT).
    Cpu,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = CheckpointExport {
        checkpoints: args.checkpoints,
        out: args.out.clone(),
        export: ExportOptions {
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
        },
        clip: args.clip,
        device: device_from(&args.device)?,
        verify: args.verify.then(|| VerifyOptions {
            ort_lib: args.ort_lib.clone(),
            batch: args.verify_random,
            synthetic_images: args.verify_images,
            ..VerifyOptions::default()
        }),
        triton: args.triton.map(|repo| TritonEntry {
            repo,
            options: TritonOptions {
                name: args.triton_name,
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
            },
        }),
        report: args.report,
    };
    let report = export_checkpoints(&options)?;
    println!(
        "wrote {} ({:.1} MB, {}, {} input, heads: {}) in {:.2} s (+ {:.2} s loading)",
        report.onnx.display(),
        report.bytes as f64 / 1e6,
        report.backbone,
        report.input.name(),
        report.heads.join(", "),
        report.export_seconds,
        report.load_seconds
    );
    if let Some(verified) = &report.verify {
        println!("verification against the trainer (ONNX Runtime CPU):\n{verified}");
    }
    if let Some(entry) = &report.triton {
        println!("wrote Triton model repository entry {}", entry.display());
    }
    if !report.passed() {
        bail!(
            "the exported graph does not match the trainer within tolerance (kept for inspection: {})",
            args.out.display()
        );
    }
    Ok(())
}
