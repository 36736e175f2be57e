//! The shared preprocessing against the reference pipeline (PIL + torchvision), on the images
//! and outputs written by `scripts/make-fixtures` (see tests/fixtures/README.md).

use std::path::{Path, PathBuf};

use agiqa_runtime::preprocess::{decode_image_file, DecodeLimits, Preprocessing, Preprocessor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/preprocess")
}

/// Largest and mean absolute difference between our 224×224 crop and PIL's, in 8-bit levels.
fn compare(input: &Path) -> (u8, f64) {
    let stem = input.file_stem().unwrap().to_string_lossy().to_string();
    let expected = image::open(fixtures().join("expected").join(format!("{stem}.png")))
        .unwrap_or_else(|e| panic!("expected output for {stem}: {e}"))
        .to_rgb8();
    let image = decode_image_file(input, &DecodeLimits::default())
        .unwrap_or_else(|e| panic!("decoding {}: {e}", input.display()));
    let ours = Preprocessor::new(Preprocessing::default())
        .resize_and_crop(&image)
        .unwrap();
    assert_eq!(ours.dimensions(), expected.dimensions(), "{stem}");
    let diffs: Vec<u8> = ours
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = *diffs.iter().max().unwrap();
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    (max, mean)
}

/// Every input format (JPEG, EXIF-rotated JPEG, CMYK JPEG, PNG 8/16-bit, grey, palette, RGBA,
/// animated GIF, WebP) lands within 1/255 per pixel of the reference pipeline.
#[test]
fn every_fixture_is_within_one_level_of_pil() {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(fixtures().join("inputs"))
        .expect("tests/fixtures/preprocess/inputs (run scripts/make-fixtures)")
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 10,
        "expected the full fixture set, found {}",
        inputs.len()
    );
    let mut failures = Vec::new();
    for input in &inputs {
        let (max, mean) = compare(input);
        println!(
            "{:<24} max |diff| = {max} / 255, mean = {mean:.4} / 255",
            input.file_name().unwrap().to_string_lossy()
        );
        // Measured: 0 on every fixture (JPEGs are decoded by libjpeg-turbo's code, as in PIL).
        if max > 1 || mean > 0.01 {
            failures.push(format!("{}: max diff {max}, mean {mean}", input.display()));
        }
    }
    assert!(failures.is_empty(), "over 1/255: {failures:?}");
}

/// The normalised tensor equals torchvision's `ToTensor` + `Normalize` output.
#[test]
fn normalised_tensor_matches_torchvision() {
    let bytes =
        std::fs::read(fixtures().join("expected/normalized_photo_q90.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, view) = tensors.tensors().into_iter().next().expect("one tensor");
    assert_eq!(view.shape(), &[3, 224, 224]);
    let expected: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let ours = Preprocessor::new(Preprocessing::default())
        .preprocess_file(
            &fixtures().join("inputs/photo_q90.jpg"),
            &DecodeLimits::default(),
        )
        .unwrap();
    let max = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("normalised photo_q90: max |diff| = {max:.6}");
    // One 8-bit level divided by the smallest std.
    assert!(max <= 1.0 / 255.0 / 0.2613 + 1e-5, "max diff {max}");
}
