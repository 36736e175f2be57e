//! The shared preprocessing against the reference pipeline (PIL + torchvision), on the images
//! and outputs written by `scripts/make-fixtures` (see tests/fixtures/README.md).

use std::path::{Path, PathBuf};

use agiqa_runtime::preprocess::{
    decode_image_file, resize_geometry, CropBox, DecodeLimits, Preprocessing, Preprocessor,
};
use image::RgbImage;

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

// ---------------------------------------------------------------------------------------
// Geometry sweep: every size and aspect ratio in geometry.json, at 0 levels.

#[derive(serde::Deserialize)]
struct Geometry {
    sweep: Vec<SweepCase>,
    rrc: Vec<ViewCase>,
}

#[derive(serde::Deserialize)]
struct SweepCase {
    name: String,
    width: u32,
    height: u32,
    cell: u32,
    seed: u64,
    input_sha256: String,
    resized: [u32; 2],
    expected: String,
}

#[derive(serde::Deserialize)]
struct ViewCase {
    name: String,
    width: u32,
    height: u32,
    cell: u32,
    seed: u64,
    input_sha256: String,
    #[serde(rename = "box")]
    crop: [u32; 4],
    flip: bool,
    expected: String,
}

fn geometry() -> Geometry {
    let text = std::fs::read_to_string(fixtures().join("geometry.json"))
        .expect("tests/fixtures/preprocess/geometry.json (run scripts/make-fixtures)");
    serde_json::from_str(&text).expect("geometry.json")
}

/// splitmix64's finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `sweep_image` of scripts/fixtures/make_fixtures.py: random colour blocks of `cell` pixels.
fn sweep_image(width: u32, height: u32, cell: u32, seed: u64) -> RgbImage {
    let base = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    RgbImage::from_fn(width, height, |x, y| {
        let block = (u64::from(y / cell) << 32) | u64::from(x / cell);
        let key = base.wrapping_add(block.wrapping_mul(4));
        image::Rgb([0, 1, 2].map(|c| (mix64(key.wrapping_add(c)) >> 56) as u8))
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn expected_png(relative: &str) -> RgbImage {
    image::open(fixtures().join(relative))
        .unwrap_or_else(|e| panic!("{relative}: {e}"))
        .to_rgb8()
}

/// Largest absolute difference and the share of differing samples.
fn difference(ours: &RgbImage, expected: &RgbImage) -> (u8, f64) {
    assert_eq!(ours.dimensions(), expected.dimensions());
    let diffs: Vec<u8> = ours
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let share = diffs.iter().filter(|&&d| d > 0).count() as f64 / diffs.len() as f64;
    (max, share)
}

/// Resize(224, BICUBIC) + CenterCrop(224) equals torchvision on PIL for every geometry: both
/// orientations, 1:1 to 1:8, odd and prime sizes, upscaling, 1-pixel-wide images.
#[test]
fn geometry_sweep_is_identical_to_torchvision() {
    let geometry = geometry();
    assert!(geometry.sweep.len() >= 40, "{} cases", geometry.sweep.len());
    let pre = Preprocessor::new(Preprocessing::default());
    let mut failures = Vec::new();
    for case in &geometry.sweep {
        let input = sweep_image(case.width, case.height, case.cell, case.seed);
        assert_eq!(
            sha256_hex(input.as_raw()),
            case.input_sha256,
            "{}: the Rust and Python generators disagree",
            case.name
        );
        let (resized, _) = resize_geometry(case.width, case.height, 224);
        assert_eq!([resized.0, resized.1], case.resized, "{}", case.name);
        let ours = pre.resize_and_crop(&input).unwrap();
        let (max, share) = difference(&ours, &expected_png(&case.expected));
        println!(
            "{:<16} max |diff| = {max:>2}, differing = {:.2} %",
            case.name,
            100.0 * share
        );
        if max > 0 {
            failures.push(format!(
                "{}: max {max}, {:.2} % differ",
                case.name,
                100.0 * share
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "not identical to torchvision: {failures:?}"
    );
}

/// The training view (crop, resize to 224×224, optional mirror) equals torchvision's
/// `resized_crop` (+ `hflip`) on PIL images for given crop boxes.
#[test]
fn training_views_are_identical_to_torchvision_resized_crop() {
    let geometry = geometry();
    assert!(geometry.rrc.len() >= 10, "{} cases", geometry.rrc.len());
    let pre = Preprocessor::new(Preprocessing::default());
    let mut failures = Vec::new();
    for case in &geometry.rrc {
        let input = sweep_image(case.width, case.height, case.cell, case.seed);
        assert_eq!(
            sha256_hex(input.as_raw()),
            case.input_sha256,
            "{}",
            case.name
        );
        let [left, top, width, height] = case.crop;
        let crop = CropBox {
            left,
            top,
            width,
            height,
            flip: case.flip,
        };
        let ours = pre.augmented_view(&input, &crop).unwrap();
        let (max, share) = difference(&ours, &expected_png(&case.expected));
        println!(
            "{:<28} max |diff| = {max:>2}, differing = {:.2} %",
            case.name,
            100.0 * share
        );
        if max > 0 {
            failures.push(format!("{}: max {max}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "not identical to torchvision: {failures:?}"
    );
}
