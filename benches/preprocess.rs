//! Preprocessing speed: our resize+crop (`agiqa_runtime::resample`, Pillow's bicubic reproduced
//! operation for operation, computing only the crop window) against the baseline a Rust user
//! reaches for first (`image::imageops::resize` with CatmullRom, then crop), on a 1024×768
//! image. Prints the ratio measured in the same run.
//!
//! `cargo bench -p agiqa-benches --bench preprocess`

use std::hint::black_box;
use std::time::{Duration, Instant};

use agiqa_runtime::preprocess::{resize_geometry, Preprocessing, Preprocessor};
use criterion::Criterion;
use image::{imageops, RgbImage};

fn test_image() -> RgbImage {
    RgbImage::from_fn(1024, 768, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 3 % 256) as u8,
            ((x ^ y) % 256) as u8,
        ])
    })
}

fn baseline(image: &RgbImage) -> RgbImage {
    let ((w, h), (left, top)) = resize_geometry(image.width(), image.height(), 224);
    let resized = imageops::resize(image, w, h, imageops::FilterType::CatmullRom);
    imageops::crop_imm(&resized, left, top, 224, 224).to_image()
}

fn per_second(mut f: impl FnMut(), budget: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget {
        f();
        n += 1;
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

fn main() {
    let image = test_image();
    let preprocessor = Preprocessor::new(Preprocessing::default());
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("resize_crop_1024x768_to_224");
    group.bench_function("agiqa (Pillow bicubic, crop window only)", |b| {
        b.iter(|| preprocessor.resize_and_crop(black_box(&image)).unwrap())
    });
    group.bench_function("baseline (image::imageops::resize + crop)", |b| {
        b.iter(|| baseline(black_box(&image)))
    });
    group.finish();
    let mut out = vec![0f32; preprocessor.config().tensor_len()];
    group_normalize(&mut criterion, &preprocessor, &mut out);
    criterion.final_summary();

    let budget = Duration::from_secs(2);
    let ours = per_second(
        || drop(black_box(preprocessor.resize_and_crop(&image))),
        budget,
    );
    let base = per_second(|| drop(black_box(baseline(&image))), budget);
    println!(
        "resize+crop 1024x768 -> 224: agiqa {ours:.0} img/s, baseline image::imageops {base:.0} img/s, ratio {:.2}x",
        ours / base
    );
}

fn group_normalize(criterion: &mut Criterion, preprocessor: &Preprocessor, out: &mut [f32]) {
    let square = RgbImage::from_pixel(224, 224, image::Rgb([1, 2, 3]));
    criterion.bench_function("normalize_224_chw", |b| {
        b.iter(|| preprocessor.normalize_into(black_box(&square), out))
    });
}
