//! The shared preprocessing against the reference pipeline (PIL + torchvision), on the images
//! and outputs written by `scripts/make-fixtures` (see tests/fixtures/README.md).

use std::path::{Path, PathBuf};

use agiqa_runtime::preprocess::{
    resize_geometry, Alpha, CropBox, DecodeLimits, ExifOrientation, Preprocessing, Preprocessor,
};
use image::RgbImage;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/preprocess")
}

#[derive(serde::Deserialize)]
struct Rules {
    pillow: String,
    files: std::collections::BTreeMap<String, FileRule>,
}

/// One input of `rules.json`: the reference outputs that exist for it.
#[derive(serde::Deserialize)]
struct FileRule {
    pil_mode: String,
    default: String,
    deviation: Option<String>,
    exif: Option<String>,
    alpha_white: Option<String>,
    alpha_black: Option<String>,
}

fn rules() -> Rules {
    let text = std::fs::read_to_string(fixtures().join("rules.json"))
        .expect("tests/fixtures/preprocess/rules.json (run scripts/make-fixtures)");
    serde_json::from_str(&text).expect("rules.json")
}

/// Our 224×224 crop of `file` with `config`'s conversion rules.
fn ours(file: &str, config: &Preprocessing) -> RgbImage {
    let path = fixtures().join("inputs").join(file);
    let pre = Preprocessor::new(config.clone());
    let image = pre
        .decode_file(&path, &DecodeLimits::default())
        .unwrap_or_else(|e| panic!("decoding {file}: {e}"));
    pre.resize_and_crop(&image).unwrap()
}

/// Every format and mode, with the default conversion, against literally
/// `Image.open(p).convert("RGB")` + torchvision: JPEG (4:2:0, 4:2:2, 4:4:0, 4:4:4,
/// progressive, grey, CMYK, YCCK, EXIF 2–8 ignored), PNG (RGB, RGBA, LA, 1-, 4-bit, grey,
/// palette with and without transparency, colour keys, 16-bit RGB(A) and grey+alpha), GIF
/// (first frame, transparency, frames smaller than the screen), BMP, TIFF (raw, LZW, Deflate,
/// JPEG, RGBA, CMYK, palette, CCITT G4, PackBits grey), WebP (lossless, lossy, with alpha).
/// 16-bit greyscale is the documented deviation (next test).
#[test]
fn every_format_is_identical_to_pil() {
    let rules = rules();
    assert!(rules.files.len() >= 40, "{} inputs", rules.files.len());
    println!("reference: Pillow {}", rules.pillow);
    let default = Preprocessing::default();
    let mut failures = Vec::new();
    for (file, rule) in &rules.files {
        if rule.deviation.is_some() {
            continue;
        }
        let (max, share) = difference(&ours(file, &default), &expected_png(&rule.default));
        println!(
            "{file:<20} {:<5} max |diff| = {max:>2}, differing = {:.2} %",
            rule.pil_mode,
            100.0 * share
        );
        if max > 0 {
            failures.push(format!("{file}: max {max}, {:.2} % differ", 100.0 * share));
        }
    }
    assert!(failures.is_empty(), "not identical to PIL: {failures:?}");
}

/// 16-bit greyscale: PIL's `convert("RGB")` clips every value above 255 (a photo turns
/// white); the runtime keeps the high byte instead, as Pillow does for 16-bit RGB. Measured:
/// the reference is entirely white, ours equals PIL on the high bytes at 0 levels.
#[test]
fn sixteen_bit_grey_deviates_from_pil_as_documented() {
    let rules = rules();
    let mut checked = 0;
    for (file, rule) in &rules.files {
        let Some(deviation) = &rule.deviation else {
            continue;
        };
        let ours = ours(file, &Preprocessing::default());
        let (max, _) = difference(&ours, &expected_png(deviation));
        assert_eq!(max, 0, "{file}: not PIL on the high bytes");
        let pil = expected_png(&rule.default);
        let white = pil.pixels().filter(|p| p.0 == [255; 3]).count();
        let (max_vs_pil, share) = difference(&ours, &pil);
        println!(
            "{file}: PIL's reference is {:.1} % white; ours differs from it by up to {max_vs_pil} \
             levels on {:.1} % of samples",
            100.0 * white as f64 / (224.0 * 224.0),
            100.0 * share
        );
        assert!(
            white > 224 * 224 * 9 / 10,
            "{file}: PIL no longer clips 16-bit grey"
        );
        checked += 1;
    }
    assert!(checked >= 1, "no 16-bit greyscale fixture");
}

/// The opt-ins: EXIF orientation applied (= `ImageOps.exif_transpose` before `convert`) and
/// alpha composited over white or black (the project's rule on PIL's RGBA decode).
#[test]
fn opt_ins_match_their_references() {
    let rules = rules();
    let exif = Preprocessing {
        exif_orientation: ExifOrientation::Apply,
        ..Preprocessing::default()
    };
    let white = Preprocessing {
        alpha: Alpha::OverWhite,
        ..Preprocessing::default()
    };
    let black = Preprocessing {
        alpha: Alpha::OverBlack,
        ..Preprocessing::default()
    };
    let mut failures = Vec::new();
    let mut counts = [0; 3];
    for (file, rule) in &rules.files {
        for (k, (expected, config, name)) in [
            (&rule.exif, &exif, "exif"),
            (&rule.alpha_white, &white, "alpha over white"),
            (&rule.alpha_black, &black, "alpha over black"),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(expected) = expected else { continue };
            counts[k] += 1;
            let (max, share) = difference(&ours(file, config), &expected_png(expected));
            println!(
                "{file:<20} {name:<16} max |diff| = {max:>2}, differing = {:.2} %",
                100.0 * share
            );
            if max > 0 {
                failures.push(format!("{file} ({name}): max {max}"));
            }
        }
    }
    assert!(
        counts[0] >= 7 && counts[1] >= 8 && counts[2] >= 8,
        "{counts:?}"
    );
    assert!(failures.is_empty(), "{failures:?}");
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
