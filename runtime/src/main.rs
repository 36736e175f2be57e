//! `agiqa`: the runtime's command-line entry point.

use std::path::PathBuf;

use agiqa_runtime::preprocess::{decode_image_file, DecodeLimits, Preprocessing, Preprocessor};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agiqa",
    version,
    about = "Score AI-generated images with an exported CLIP-AGIQA model (ONNX Runtime)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Doctor { ort_lib } => {
            let path = agiqa_runtime::onnxruntime::init(ort_lib.as_deref())?;
            println!("ONNX Runtime: {}", path.display());
            println!("build info: {}", agiqa_runtime::onnxruntime::version());
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
    }
}
