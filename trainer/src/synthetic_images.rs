//! Procedurally generated images with controlled distortions: data with a known quality
//! ordering, for demos and tests where no real dataset can be downloaded.

use std::path::Path;

use image::{imageops, Rgb, RgbImage};

/// Small deterministic generator (SplitMix64): the same seed gives the same images everywhere.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

/// A clean scene: a two-colour gradient, a sinusoidal texture and a few sharp-edged shapes, so
/// blur, noise and compression all leave measurable traces.
pub fn procedural_scene(seed: u64, width: u32, height: u32) -> RgbImage {
    let mut rng = SplitMix64::new(seed);
    let mut colour = || {
        [
            rng.uniform() * 255.0,
            rng.uniform() * 255.0,
            rng.uniform() * 255.0,
        ]
    };
    let (top, bottom) = (colour(), colour());
    let mut rng = SplitMix64::new(seed ^ 0xA5A5_5A5A);
    let (fx, fy) = (2.0 + rng.uniform() * 10.0, 2.0 + rng.uniform() * 10.0);
    let mut image = RgbImage::from_fn(width, height, |x, y| {
        let t = y as f32 / height.max(1) as f32;
        let texture = 20.0
            * ((x as f32 / width as f32 * fx * std::f32::consts::TAU).sin()
                * (y as f32 / height as f32 * fy * std::f32::consts::TAU).cos());
        let px = |c: usize| (top[c] * (1.0 - t) + bottom[c] * t + texture).clamp(0.0, 255.0) as u8;
        Rgb([px(0), px(1), px(2)])
    });
    for _ in 0..(3 + rng.next_u64() % 4) {
        let fill = Rgb([
            (rng.uniform() * 255.0) as u8,
            (rng.uniform() * 255.0) as u8,
            (rng.uniform() * 255.0) as u8,
        ]);
        let cx = rng.uniform() * width as f32;
        let cy = rng.uniform() * height as f32;
        let r = (0.05 + rng.uniform() * 0.2) * width.min(height) as f32;
        let square = rng.uniform() < 0.5;
        for (x, y, p) in image.enumerate_pixels_mut() {
            let (dx, dy) = ((x as f32 - cx).abs(), (y as f32 - cy).abs());
            let inside = if square {
                dx.max(dy) < r
            } else {
                dx * dx + dy * dy < r * r
            };
            if inside {
                *p = fill;
            }
        }
    }
    image
}

/// A distortion of controlled strength.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distortion {
    /// Gaussian blur with this sigma, in pixels.
    Blur(f32),
    /// Additive Gaussian noise with this standard deviation, in 8-bit levels.
    Noise(f32),
    /// JPEG re-encoding at this quality (1–100).
    Jpeg(u8),
    /// Colour cast: adds this many levels to red and removes them from blue.
    ColourShift(f32),
}

impl Distortion {
    /// Short name used in file names and tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Distortion::Blur(_) => "blur",
            Distortion::Noise(_) => "noise",
            Distortion::Jpeg(_) => "jpeg",
            Distortion::ColourShift(_) => "colour",
        }
    }

    /// Applies the distortion; `seed` drives the noise.
    pub fn apply(&self, image: &RgbImage, seed: u64) -> RgbImage {
        match *self {
            Distortion::Blur(sigma) if sigma > 0.0 => imageops::blur(image, sigma),
            Distortion::Blur(_) => image.clone(),
            Distortion::Noise(std) => {
                let mut rng = SplitMix64::new(seed);
                let mut out = image.clone();
                for v in out.iter_mut() {
                    *v = (f32::from(*v) + rng.normal() * std)
                        .round()
                        .clamp(0.0, 255.0) as u8;
                }
                out
            }
            Distortion::Jpeg(quality) => {
                let mut bytes = Vec::new();
                let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(
                    &mut bytes,
                    quality.clamp(1, 100),
                );
                // Encoding an in-memory RGB image into a Vec cannot fail for valid sizes.
                if image.write_with_encoder(encoder).is_err() {
                    return image.clone();
                }
                image::load_from_memory(&bytes)
                    .map(|d| d.to_rgb8())
                    .unwrap_or_else(|_| image.clone())
            }
            Distortion::ColourShift(amount) => {
                let mut out = image.clone();
                for p in out.pixels_mut() {
                    p.0[0] = (f32::from(p.0[0]) + amount).clamp(0.0, 255.0) as u8;
                    p.0[2] = (f32::from(p.0[2]) - amount).clamp(0.0, 255.0) as u8;
                }
                out
            }
        }
    }
}

/// Mean absolute difference between two images of equal size, in 8-bit levels.
pub fn mean_abs_difference(a: &RgbImage, b: &RgbImage) -> f64 {
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.as_raw().len().max(1) as f64
}

/// Writes, for each of `scenes` procedural scenes of `size × size·3/4`, the clean image and two
/// levels of each distortion kind (`scene{s}_{kind}{level}.png`, `scene{s}_clean.png`) into
/// `out`. Returns the number of images written.
pub fn write_distortion_ladders(out: &Path, scenes: u64, size: u32) -> std::io::Result<usize> {
    let ladders = [
        [
            Distortion::Blur(0.0),
            Distortion::Blur(1.5),
            Distortion::Blur(4.0),
        ],
        [
            Distortion::Noise(0.0),
            Distortion::Noise(15.0),
            Distortion::Noise(45.0),
        ],
        [
            Distortion::Jpeg(95),
            Distortion::Jpeg(30),
            Distortion::Jpeg(5),
        ],
        [
            Distortion::ColourShift(0.0),
            Distortion::ColourShift(30.0),
            Distortion::ColourShift(80.0),
        ],
    ];
    std::fs::create_dir_all(out)?;
    let save = |image: &RgbImage, name: String| {
        let path = out.join(name);
        image
            .save(&path)
            .map_err(|e| std::io::Error::other(format!("cannot write {}: {e}", path.display())))
    };
    let mut written = 0;
    for scene in 0..scenes {
        let clean = procedural_scene(scene, size, size * 3 / 4);
        for ladder in &ladders {
            for (level, distortion) in ladder.iter().enumerate().skip(1) {
                save(
                    &distortion.apply(&clean, scene),
                    format!("scene{scene}_{}{level}.png", distortion.kind()),
                )?;
                written += 1;
            }
        }
        save(&clean, format!("scene{scene}_clean.png"))?;
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_distinct() {
        let a = procedural_scene(1, 64, 48);
        assert_eq!(a, procedural_scene(1, 64, 48));
        assert!(mean_abs_difference(&a, &procedural_scene(2, 64, 48)) > 5.0);
    }

    #[test]
    fn stronger_distortions_move_further_from_the_clean_image() {
        let clean = procedural_scene(7, 96, 96);
        for levels in [
            [Distortion::Blur(0.5), Distortion::Blur(3.0)],
            [Distortion::Noise(5.0), Distortion::Noise(40.0)],
            [Distortion::Jpeg(90), Distortion::Jpeg(5)],
            [Distortion::ColourShift(5.0), Distortion::ColourShift(60.0)],
        ] {
            let mild = mean_abs_difference(&clean, &levels[0].apply(&clean, 3));
            let strong = mean_abs_difference(&clean, &levels[1].apply(&clean, 3));
            assert!(strong > mild, "{:?}: {strong} <= {mild}", levels[1]);
        }
    }
}
