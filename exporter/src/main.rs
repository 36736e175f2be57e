//! `agiqa-export`: trained checkpoint(s) → one ONNX graph, verified, optionally as a Triton
//! model repository.

use std::path::PathBuf;

use agiqa_exporter::triton::{InstanceKind, TritonOptions};
use agiqa_exporter::verify::describe_accuracy;
use agiqa_exporter::verify::VerifyOptions;
use agiqa_exporter::{
    export_checkpoints, AttentionOps, CheckpointExport, ExportOptions, InputKind, Int8Export,
    Int8Mode, NamedCheckpoint, Precision, TritonEntry, DEFAULT_INT8_MODE,
};
use agiqa_trainer::device::device_from;
use anyhow::{bail, Context};
use clap::builder::RangedU64ValueParser;
use clap::Parser;

/// A count flag's parser: a whole number in `min..=max` (clap's error names the range).
fn count(min: u64, max: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(min..=max)
}

/// A percentile in 50..=100.
fn percentile(raw: &str) -> Result<f64, String> {
    let p: f64 = raw.parse().map_err(|e| format!("{e}"))?;
    if (50.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{raw} is not a percentile in 50..=100"))
    }
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
    /// Write ViT attention as ONNX Runtime's fused `com.microsoft.MultiHeadAttention` (ONNX
    /// Runtime CPU/CUDA only: TensorRT and other runtimes refuse the graph). Recorded in the
    /// metadata (`agiqa.attention`); the default is plain opset-17 attention.
    #[arg(long)]
    fused_attention: bool,
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
    /// Batch size Triton's TensorRT engine is tuned for (default: --triton-max-batch); its
    /// profile spans 1..=--triton-max-batch either way, as the runtime's does.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    triton_trt_opt_batch: Option<u32>,
    /// Write a JSON report (sizes, timings, verification) here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// int8 weights (symmetric, per output channel) and activations, quantised from the fp32
    /// graph: `dynamic` (activations at run time; ONNX Runtime CPU only) or `static`
    /// (calibrated QDQ, S8S8; CPU, CUDA, TensorRT). `--int8` alone takes the measured default.
    /// With --verify, measured against the fp32 graph on held-out images (the budget).
    #[arg(long, value_enum, num_args = 0..=1, require_equals = false,
          default_missing_value = DEFAULT_INT8_MODE.name())]
    int8: Option<Int8Arg>,
    /// Calibration images for static int8: a folder, a manifest, or the checkpoint's dataset
    /// (`agiqa3k:<dir>`, … : its training split; the budget then uses its test split).
    #[arg(long, value_name = "FOLDER|MANIFEST|DATASET")]
    calibration: Option<String>,
    /// At most this many calibration images (spread over the set).
    #[arg(long, default_value_t = 64, value_parser = count(1, 100_000))]
    calibration_images: usize,
    /// Percentile of |x| taken as an activation's range (100: the maximum).
    #[arg(long, default_value_t = 99.99, value_parser = percentile)]
    calibration_percentile: f64,
    /// Held-out images for the int8 budget (default: the calibration dataset's test split,
    /// else synthetic scenes); never calibration images.
    #[arg(long, value_name = "FOLDER|MANIFEST|DATASET")]
    budget_images: Option<String>,
    /// At most this many held-out images for the budget.
    #[arg(long, default_value_t = 64, value_parser = count(2, 100_000))]
    budget_count: usize,
    /// Write an int8 graph whose --verify figures are over budget (marked so in its metadata).
    #[arg(long)]
    allow_over_budget: bool,
    /// int8: also quantise the input layer (ViT patch embedding, ResNet first stem Conv).
    #[arg(long)]
    int8_input_layer: bool,
    /// int8: also quantise attention's activation × activation MatMuls (Q·Kᵀ, P·V).
    #[arg(long)]
    int8_attention_scores: bool,
    /// int8: also quantise the tower's output projection (`visual.proj`, attnpool `c_proj`).
    #[arg(long)]
    int8_output_projection: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Int8Arg {
    /// Activations quantised at run time (ONNX Runtime CPU).
    Dynamic,
    /// Calibrated QDQ activations, symmetric S8S8 (ONNX Runtime, TensorRT).
    Static,
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
    let int8 = args.int8.map(|mode| {
        let mut int8 = Int8Export::new(match mode {
            Int8Arg::Dynamic => Int8Mode::Dynamic,
            Int8Arg::Static => Int8Mode::Static,
        });
        int8.plan.input_layer |= args.int8_input_layer;
        int8.plan.attention_scores |= args.int8_attention_scores;
        int8.plan.output_projection |= args.int8_output_projection;
        int8.calibration = args.calibration.clone();
        int8.calibration_images = args.calibration_images;
        int8.calibration_options.percentile = args.calibration_percentile;
        int8.calibration_options.ort_lib = args.ort_lib.clone();
        int8.held_out = args.budget_images.clone();
        int8.held_out_images = args.budget_count;
        int8.allow_over_budget = args.allow_over_budget;
        int8
    });
    if int8.is_none() && (args.calibration.is_some() || args.budget_images.is_some()) {
        bail!("--calibration and --budget-images only apply to --int8 exports");
    }
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
            attention: if args.fused_attention {
                AttentionOps::MicrosoftMultiHead
            } else {
                AttentionOps::Plain
            },
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
                tensorrt_opt_batch: args.triton_trt_opt_batch,
                ..TritonOptions::default()
            },
        }),
        report: args.report,
        int8,
    };
    let report = export_checkpoints(&options)
        .with_context(|| format!("exporting {}", args.out.display()))?;
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
    if let Some(q) = &report.quantization {
        println!(
            "int8 {}: {} layers in int8, for providers {}; in float: {}",
            q.mode.name(),
            q.int8_layers,
            q.providers.join(", "),
            q.float_layers
                .iter()
                .map(|l| l.layer.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
        if report.backbone.starts_with("RN") || report.backbone.ends_with("-rn") {
            // Measured (docs/RESULTS.md): ONNX Runtime CPU has no fused kernel for these Conv
            // forms, so the int8 ResNet pays quantisation around every Conv and gains nothing.
            eprintln!(
                "warning: a ModifiedResNet in int8 runs slower than in fp32 on ONNX Runtime CPU \
                 (RN50 measured at 0.14x (dynamic) and 0.43x (static) of fp32): export fp32 for \
                 CPU scoring"
            );
        }
        if let Some(c) = &q.calibration {
            println!(
                "calibrated on {} images ({}), {}",
                c.images, c.source, c.method
            );
        }
        match &q.accuracy {
            Some(a) => {
                let budget = agiqa_exporter::verify::Int8Budget::default();
                println!(
                    "int8 against fp32 (ONNX Runtime CPU):\n{}",
                    describe_accuracy(a, &budget)
                );
                if !a.within_budget {
                    eprintln!("warning: over budget, written because of --allow-over-budget");
                }
            }
            None => println!("int8 accuracy not measured (add --verify)"),
        }
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
