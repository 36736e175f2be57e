//! Pillow's bicubic resampling, reproduced operation for operation.
//!
//! CLIP was trained, and CLIP-AGIQA is trained, on images resized by Pillow. General-purpose
//! resizers (fast_image_resize, `image::imageops`) use the same Catmull-Rom kernel but keep more
//! precision between the two separable passes; Pillow rounds and clips the horizontal pass to
//! 8 bits before the vertical one. On sharp edges, where bicubic overshoots, that clipping
//! changes outputs by up to 10 levels. Matching Pillow's arithmetic (coefficients in f64,
//! 22-bit fixed point, horizontal pass first, clip to u8 in between) makes our pixels Pillow's.

use image::RgbImage;

/// Fixed-point precision of Pillow's 8-bit resampling (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel (a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-pixel source span and fixed-point weights along one axis.
struct Coefficients {
    /// `(first source index, number of taps)` per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `taps_per_pixel` weights per output pixel.
    weights: Vec<i32>,
    taps_per_pixel: usize,
}

impl Coefficients {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` source
    /// pixels to `out_size`, keeping only output pixels `window.0 .. window.0 + window.1`.
    fn new(in_size: usize, out_size: usize, window: (usize, usize)) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = 2.0 * filter_scale;
        let taps_per_pixel = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(window.1);
        let mut weights = vec![0i32; window.1 * taps_per_pixel];
        let mut taps = vec![0f64; taps_per_pixel];
        for (i, xx) in (window.0..window.0 + window.1).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // Pillow truncates toward zero with a C cast after adding 0.5.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin).min(taps_per_pixel);
            let mut total = 0.0;
            for (x, tap) in taps.iter_mut().enumerate().take(count) {
                *tap = bicubic((x as f64 + xmin as f64 - center + 0.5) / filter_scale);
                total += *tap;
            }
            let out = &mut weights[i * taps_per_pixel..(i + 1) * taps_per_pixel];
            for (w, &tap) in out.iter_mut().zip(&taps).take(count) {
                let normalised = if total != 0.0 { tap / total } else { tap };
                let fixed = normalised * f64::from(1u32 << PRECISION_BITS);
                *w = if normalised < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            bounds.push((xmin, count));
        }
        Coefficients {
            bounds,
            weights,
            taps_per_pixel,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (first, count) = self.bounds[i];
        let start = i * self.taps_per_pixel;
        (first, &self.weights[start..start + count])
    }
}

/// Pillow's `clip8`: round (the accumulator starts at one half) and clamp to `0..=255`.
#[inline]
fn clip8(acc: i32) -> u8 {
    if acc >= (1 << PRECISION_BITS << 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Resizes `src` to `resized` (width, height) with Pillow's BICUBIC and returns only the output
/// window `(left, top, width, height)` — e.g. the centre crop — computing nothing outside it.
/// Identical, pixel for pixel, to `src.resize(resized, Image.BICUBIC).crop(window)` in Pillow.
pub fn resize_bicubic_window(
    src: &RgbImage,
    resized: (u32, u32),
    window: (u32, u32, u32, u32),
) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (out_w, out_h) = (resized.0 as usize, resized.1 as usize);
    let (left, top, win_w, win_h) = (
        window.0 as usize,
        window.1 as usize,
        window.2 as usize,
        window.3 as usize,
    );
    let pixels = src.as_raw();

    // Horizontal pass over just the source rows the vertical pass will read.
    let vertical = Coefficients::new(in_h, out_h, (top, win_h));
    let first_row = vertical.bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let last_row = vertical.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
    let rows = last_row - first_row;
    let need_horizontal = out_w != in_w || left != 0 || win_w != in_w;
    let temp: Vec<u8> = if need_horizontal {
        let horizontal = Coefficients::new(in_w, out_w, (left, win_w));
        let mut temp = vec![0u8; rows * win_w * 3];
        for r in 0..rows {
            let row = &pixels[(first_row + r) * in_w * 3..(first_row + r + 1) * in_w * 3];
            let out = &mut temp[r * win_w * 3..(r + 1) * win_w * 3];
            for x in 0..win_w {
                let (first, taps) = horizontal.taps(x);
                let half = 1i32 << (PRECISION_BITS - 1);
                let (mut r0, mut g0, mut b0) = (half, half, half);
                for (k, &w) in taps.iter().enumerate() {
                    let p = &row[(first + k) * 3..(first + k) * 3 + 3];
                    r0 += i32::from(p[0]) * w;
                    g0 += i32::from(p[1]) * w;
                    b0 += i32::from(p[2]) * w;
                }
                out[x * 3] = clip8(r0);
                out[x * 3 + 1] = clip8(g0);
                out[x * 3 + 2] = clip8(b0);
            }
        }
        temp
    } else {
        pixels[first_row * in_w * 3..last_row * in_w * 3].to_vec()
    };
    let temp_w = if need_horizontal { win_w } else { in_w };

    let need_vertical = out_h != in_h || top != 0 || win_h != in_h;
    let mut out = vec![0u8; win_w * win_h * 3];
    for y in 0..win_h {
        let dst = &mut out[y * win_w * 3..(y + 1) * win_w * 3];
        if !need_vertical {
            let start = (top + y - first_row) * temp_w * 3;
            dst.copy_from_slice(&temp[start..start + win_w * 3]);
            continue;
        }
        let (first, taps) = vertical.taps(y);
        let half = 1i32 << (PRECISION_BITS - 1);
        for (x, px) in dst.chunks_exact_mut(3).enumerate() {
            let (mut r0, mut g0, mut b0) = (half, half, half);
            for (k, &w) in taps.iter().enumerate() {
                let i = ((first - first_row + k) * temp_w + x) * 3;
                r0 += i32::from(temp[i]) * w;
                g0 += i32::from(temp[i + 1]) * w;
                b0 += i32::from(temp[i + 2]) * w;
            }
            px[0] = clip8(r0);
            px[1] = clip8(g0);
            px[2] = clip8(b0);
        }
    }
    // The buffer has exactly win_w · win_h · 3 bytes by construction.
    RgbImage::from_raw(win_w as u32, win_h as u32, out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(1000, 224), (100, 224), (224, 224), (513, 7)] {
            let c = Coefficients::new(input, output, (0, output));
            for i in 0..output {
                let sum: i64 = c.taps(i).1.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= c.taps(i).1.len() as i64,
                    "{input}->{output} px {i}: {sum}"
                );
            }
        }
    }

    #[test]
    fn same_size_is_identity() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 40) as u8, 9]));
        assert_eq!(resize_bicubic_window(&img, (7, 5), (0, 0, 7, 5)), img);
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let img = RgbImage::from_fn(97, 61, |x, y| {
            image::Rgb([
                ((x * 13) ^ (y * 7)) as u8,
                (x * y) as u8,
                if (x / 8 + y / 8) % 2 == 0 { 255 } else { 0 },
            ])
        });
        let full = resize_bicubic_window(&img, (50, 31), (0, 0, 50, 31));
        let window = resize_bicubic_window(&img, (50, 31), (9, 4, 30, 20));
        let cropped = image::imageops::crop_imm(&full, 9, 4, 30, 20).to_image();
        assert_eq!(window, cropped);
    }
}
