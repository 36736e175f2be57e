//! Shared by the runtime's integration tests: fixture models and generated images.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};

use agiqa_runtime::scorer::{ExecutionProvider, Scorer, ScorerOptions};
use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};

/// A model written by `scripts/fixtures/make_runtime_models.py`.
pub fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// An image from the workspace's preprocessing fixtures (`tests/fixtures/preprocess/inputs`).
pub fn reference_image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/preprocess/inputs")
        .join(name)
}

pub fn cpu_options() -> ScorerOptions {
    ScorerOptions {
        provider: ExecutionProvider::Cpu,
        threads: Some(1),
        batch_size: 4,
        ..ScorerOptions::default()
    }
}

pub fn load(name: &str) -> Scorer {
    Scorer::load(&model(name), cpu_options()).expect("fixture model loads")
}

pub fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .expect("encodes");
    bytes
}

/// A smooth RGB test picture of `w × h`, different for each `seed`.
pub fn picture(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 255 / w.max(1)) as u8).wrapping_add(seed as u8 * 31),
            ((y * 255 / h.max(1)) as u8).wrapping_add(seed as u8 * 17),
            (((x + y + seed * 13) * 7) % 256) as u8,
        ])
    })
}

/// Encoded images that must score: `(file name, bytes)`.
pub fn good_images() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        (
            "photo.jpg".to_string(),
            encode(
                DynamicImage::ImageRgb8(picture(96, 64, 1)),
                ImageFormat::Jpeg,
            ),
        ),
        (
            "photo.png".to_string(),
            encode(
                DynamicImage::ImageRgb8(picture(40, 70, 2)),
                ImageFormat::Png,
            ),
        ),
        (
            "gray.png".to_string(),
            encode(
                DynamicImage::ImageLuma8(image::GrayImage::from_fn(50, 50, |x, y| {
                    image::Luma([(x * 5 + y) as u8])
                })),
                ImageFormat::Png,
            ),
        ),
        (
            "rgb16.png".to_string(),
            encode(
                DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(33, 45, |x, y| {
                    image::Rgb([(x * 1000) as u16, (y * 900) as u16, 40_000])
                })),
                ImageFormat::Png,
            ),
        ),
        (
            "alpha.png".to_string(),
            encode(
                DynamicImage::ImageRgba8(RgbaImage::from_fn(48, 48, |x, y| {
                    image::Rgba([200, (x * 5) as u8, 10, (y * 5) as u8])
                })),
                ImageFormat::Png,
            ),
        ),
    ];
    for name in ["cmyk.jpg", "animated.gif", "wide.webp", "gray16.png"] {
        out.push((
            name.to_string(),
            std::fs::read(reference_image(name)).expect("reference image"),
        ));
    }
    out
}

/// Inputs that must fail with a clear per-file error: `(file name, bytes, words the error must
/// contain)`.
pub fn bad_images() -> Vec<(String, Vec<u8>, &'static str)> {
    let jpeg = encode(
        DynamicImage::ImageRgb8(picture(64, 64, 3)),
        ImageFormat::Jpeg,
    );
    let png = encode(
        DynamicImage::ImageRgb8(picture(64, 64, 4)),
        ImageFormat::Png,
    );
    let huge = encode(
        DynamicImage::ImageLuma8(image::GrayImage::new(20_000, 1)),
        ImageFormat::Png,
    );
    let mut corrupt = png.clone();
    for b in corrupt.iter_mut().skip(40).take(60) {
        *b ^= 0x5a;
    }
    vec![
        ("empty.jpg".into(), vec![], "empty"),
        (
            "truncated.jpg".into(),
            jpeg[..jpeg.len() / 2].to_vec(),
            "truncated",
        ),
        (
            "truncated.png".into(),
            png[..png.len() / 2].to_vec(),
            "corrupt",
        ),
        ("corrupt.png".into(), corrupt, "corrupt"),
        (
            "notes.txt".into(),
            b"just some text, not an image".to_vec(),
            "not a recognised image",
        ),
        ("huge.png".into(), huge, "over the limit"),
        (
            "image.ppm".into(),
            b"P6\n4 4\n255\n".iter().copied().chain([0u8; 48]).collect(),
            "unsupported",
        ),
    ]
}
