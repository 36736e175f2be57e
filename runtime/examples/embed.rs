//! Embedding the scorer in a service: load an exported model once, read its metadata, score
//! files and an image already in memory, and tell a bad image from a broken set-up. Needs only
//! the `scorer` feature (the default):
//! `cargo run -p agiqa-runtime --example embed -- model.onnx a.jpg b.png`.
//! The README shows this file verbatim (a test keeps the two equal).

use std::path::Path;

use agiqa_runtime::scorer::{ExecutionProvider, ScoreError, Scorer, ScorerOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().ok_or("usage: embed MODEL.onnx [IMAGE...]")?;
    let options = ScorerOptions {
        provider: ExecutionProvider::Cpu, // or Auto: TensorRT, then CUDA, then CPU
        batch_size: 8,
        ..ScorerOptions::default()
    };
    // A missing ONNX Runtime or a model outside the graph contract fails here, once.
    let scorer = Scorer::load(Path::new(&model), options)?;
    let meta = scorer.metadata();
    println!("{} on {}", meta.backbone, scorer.provider());
    for head in &meta.heads {
        let scale = &head.scale;
        println!(
            "head {}: {} {}..{} ({})",
            head.name, scale.dimension, scale.min, scale.max, head.dataset
        );
    }
    for path in args {
        // A bad image is an error for that image only; the scorer stays usable.
        match scorer.score_file(Path::new(&path)) {
            Ok(scores) => println!("{path}: {scores:?}"),
            Err(ScoreError::Preprocess(e)) => eprintln!("skipped: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    // An image already in memory: decoded pixels, or encoded bytes with `score_bytes`.
    let image = image::RgbImage::from_pixel(320, 240, image::Rgb([120, 160, 200]));
    println!("in memory: {:?}", scorer.score_image(&image)?);
    Ok(())
}
