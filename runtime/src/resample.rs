//! Pillow's bicubic resampling, reproduced operation for operation.
//!
//! CLIP was trained, and CLIP-AGIQA is trained, on images resized by Pillow. General-purpose
//! resizers (fast_image_resize, `image::imageops`) use the same Catmull-Rom kernel but keep more
//! precision between the two separable passes; Pillow rounds and clips the first pass to 8 bits
//! before the second. On sharp edges, where bicubic overshoots, that clipping changes outputs
//! by up to 10 levels, and so does the order of the passes. Matching Pillow's arithmetic
//! (coefficients in f64, 22-bit fixed point, Pillow 13's choice of which pass runs first, clip to
//! u8 in between) makes our pixels Pillow's.

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
        // Pillow multiplies by the reciprocal; dividing differs in the last bit now and then.
        let inverse_scale = 1.0 / filter_scale;
        for (i, xx) in (window.0..window.0 + window.1).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // Pillow truncates toward zero with a C cast after adding 0.5.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin).min(taps_per_pixel);
            let mut total = 0.0;
            for (x, tap) in taps.iter_mut().enumerate().take(count) {
                *tap = bicubic((x as f64 + xmin as f64 - center + 0.5) * inverse_scale);
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
/// Pillow branches (`≥ 2^30` → 255, `≤ 0` → 0, else `acc >> 22`); shifting first and clamping
/// gives the same byte for every `i32` and has no branch, so it vectorises.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow 13 runs the vertical pass first when it removes more than twice as many rows as the
/// horizontal pass removes columns (`in_h − out_h > 2·(in_w − out_w)`), else horizontal first.
/// Because the intermediate image is clipped to 8 bits, the order changes pixels: portraits
/// taller than 2:1 come out differently. Pillow ≤ 12 always ran horizontal first.
fn vertical_first(input: (usize, usize), output: (usize, usize)) -> bool {
    let removed_rows = input.1 as i64 - output.1 as i64;
    let removed_cols = input.0 as i64 - output.0 as i64;
    removed_rows > 0 && removed_rows > 2 * removed_cols
}

/// Rows the horizontal pass computes at once: 8 rows × 3 channels of i32 are three AVX2
/// registers, so one tap of 8 output pixels is three multiply-adds.
const ROW_BLOCK: usize = 8;

/// One horizontal pass: rows `rows` of `src` (RGB, `src_w` pixels a row) through `coeffs`, whose
/// taps index source columns counted from `col_offset` (the first column `src` holds).
///
/// Rows are taken eight at a time and transposed into columns of `[row][channel]` i32 lanes, so
/// that each tap is a multiply-add over 24 lanes at once. The sums are the same integers
/// Pillow adds (integer addition does not care about order), so the pixels stay Pillow's.
#[inline(always)]
fn horizontal_pass_body(
    src: &[u8],
    src_w: usize,
    rows: std::ops::Range<usize>,
    col_offset: usize,
    coeffs: &Coefficients,
) -> Vec<u8> {
    const LANES: usize = ROW_BLOCK * 3;
    let out_w = coeffs.bounds.len();
    let row_bytes = out_w * 3;
    let mut out = vec![0u8; rows.len() * row_bytes];
    let half = 1i32 << (PRECISION_BITS - 1);
    let read = span(coeffs);
    let (first_col, read_w) = (read.start - col_offset, read.len());
    // Lane `r·3 + c` (row r of the block, channel c) of a column is `column[lane / 8][lane % 8]`:
    // three 8-lane vectors, which the compiler keeps in three registers.
    let mut columns = vec![[[0i32; 8]; 3]; read_w];
    let row_list: Vec<usize> = rows.collect();
    for (block, block_rows) in row_list.chunks(ROW_BLOCK).enumerate() {
        for (r, &row) in block_rows.iter().enumerate() {
            let start = (row * src_w + first_col) * 3;
            let line = &src[start..start + read_w * 3];
            for (column, px) in columns.iter_mut().zip(line.chunks_exact(3)) {
                for (c, &v) in px.iter().enumerate() {
                    let lane = r * 3 + c;
                    column[lane / 8][lane % 8] = i32::from(v);
                }
            }
        }
        let out_block = &mut out[block * ROW_BLOCK * row_bytes..];
        for x in 0..out_w {
            let (first, taps) = coeffs.taps(x);
            let start = first - col_offset - first_col;
            let mut acc = [[half; 8]; 3];
            for (column, &w) in columns[start..start + taps.len()].iter().zip(taps) {
                for (a, v) in acc.iter_mut().zip(column) {
                    for i in 0..8 {
                        a[i] += v[i] * w;
                    }
                }
            }
            let mut clipped = [0u8; LANES];
            for (lane, byte) in clipped.iter_mut().enumerate() {
                *byte = clip8(acc[lane / 8][lane % 8]);
            }
            for (r, px) in clipped.chunks_exact(3).take(block_rows.len()).enumerate() {
                out_block[r * row_bytes + x * 3..r * row_bytes + x * 3 + 3].copy_from_slice(px);
            }
        }
    }
    out
}

/// One vertical pass over columns `cols` of `src` (RGB, `src_w` pixels a row) through `coeffs`,
/// whose taps index source rows counted from `row_offset` (the first row `src` holds).
///
/// Tap by tap over whole rows, so the inner loop runs over contiguous bytes and vectorises;
/// the sums are the same integers as Pillow's.
#[inline(always)]
fn vertical_pass_body(
    src: &[u8],
    src_w: usize,
    row_offset: usize,
    cols: std::ops::Range<usize>,
    coeffs: &Coefficients,
) -> Vec<u8> {
    let out_w = cols.len();
    let mut out = vec![0u8; coeffs.bounds.len() * out_w * 3];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; out_w * 3];
    for (y, dst) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let (first, taps) = coeffs.taps(y);
        acc.fill(half);
        for (k, &w) in taps.iter().enumerate() {
            let row = (first - row_offset + k) * src_w;
            let line = &src[(row + cols.start) * 3..(row + cols.end) * 3];
            for (a, &v) in acc.iter_mut().zip(line) {
                *a += i32::from(v) * w;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

/// The passes compiled twice: for any x86-64 (SSE2, which lacks a 32-bit lane multiply) and
/// for AVX2, chosen at run time. Same integer arithmetic, so the same pixels either way.
macro_rules! dispatch {
    ($name:ident, $avx2:ident, $body:ident, $($arg:ident: $ty:ty),*) => {
        fn $name($($arg: $ty),*) -> Vec<u8> {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { $avx2($($arg),*) };
            }
            $body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2($($arg: $ty),*) -> Vec<u8> {
            $body($($arg),*)
        }
    };
}

dispatch!(horizontal_pass, horizontal_pass_avx2, horizontal_pass_body,
    src: &[u8], src_w: usize, rows: std::ops::Range<usize>, col_offset: usize,
    coeffs: &Coefficients);
dispatch!(vertical_pass, vertical_pass_avx2, vertical_pass_body,
    src: &[u8], src_w: usize, row_offset: usize, cols: std::ops::Range<usize>,
    coeffs: &Coefficients);

/// The source range `[min first tap, max last tap)` that a pass reads.
fn span(coeffs: &Coefficients) -> std::ops::Range<usize> {
    let first = coeffs.bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let last = coeffs
        .bounds
        .iter()
        .map(|b| b.0 + b.1)
        .max()
        .unwrap_or(first);
    first..last
}

/// Rows `rows`, columns `cols` of `src` (RGB, `src_w` pixels a row), copied.
fn copy_window(
    src: &[u8],
    src_w: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * cols.len() * 3);
    for r in rows {
        out.extend_from_slice(&src[(r * src_w + cols.start) * 3..(r * src_w + cols.end) * 3]);
    }
    out
}

/// Resizes `src` to `resized` (width, height) with Pillow's BICUBIC and returns only the output
/// window `(left, top, width, height)` — e.g. the centre crop — computing nothing outside it.
/// Identical, pixel for pixel, to `src.resize(resized, Image.BICUBIC).crop(window)` in
/// Pillow 13, pass order included (see `vertical_first`).
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
    // As in Pillow, a pass runs only when its axis changes size; an unchanged axis is a copy
    // of the window's rows or columns.
    let horizontal = (out_w != in_w).then(|| Coefficients::new(in_w, out_w, (left, win_w)));
    let vertical = (out_h != in_h).then(|| Coefficients::new(in_h, out_h, (top, win_h)));
    let out = match (horizontal, vertical) {
        (None, None) => copy_window(pixels, in_w, top..top + win_h, left..left + win_w),
        (Some(h), None) => horizontal_pass(pixels, in_w, top..top + win_h, 0, &h),
        (None, Some(v)) => vertical_pass(pixels, in_w, 0, left..left + win_w, &v),
        (Some(h), Some(v)) if vertical_first((in_w, in_h), (out_w, out_h)) => {
            let cols = span(&h);
            let first_col = cols.start;
            let temp = vertical_pass(pixels, in_w, 0, cols.clone(), &v);
            horizontal_pass(&temp, cols.len(), 0..win_h, first_col, &h)
        }
        (Some(h), Some(v)) => {
            let rows = span(&v);
            let first_row = rows.start;
            let temp = horizontal_pass(pixels, in_w, rows, 0, &h);
            vertical_pass(&temp, win_w, first_row, 0..win_w, &v)
        }
    };
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
    fn clip8_is_pillows_branches() {
        let pillow = |acc: i32| {
            if acc >= (1 << PRECISION_BITS << 8) {
                255
            } else if acc <= 0 {
                0
            } else {
                (acc >> PRECISION_BITS) as u8
            }
        };
        let edges = [
            i32::MIN,
            -1,
            0,
            1,
            (1 << 22) - 1,
            1 << 22,
            (1 << 30) - 1,
            1 << 30,
            i32::MAX,
        ];
        for acc in edges.into_iter().chain((-3000..3000).map(|i| i * 524_287)) {
            assert_eq!(clip8(acc), pillow(acc), "{acc}");
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

    #[test]
    fn pass_order_follows_pillow_13() {
        // Measured against Pillow 13.0.0: 40x60 -> 20x20 runs horizontal first, 40x61 vertical.
        assert!(!vertical_first((40, 60), (20, 20)));
        assert!(vertical_first((40, 61), (20, 20)));
        // The reported portrait: 300x700 -> 224x522 removes 178 rows but only 76 columns.
        assert!(vertical_first((300, 700), (224, 522)));
        assert!(!vertical_first((700, 300), (522, 224)));
        // Upscaling never runs the vertical pass first.
        assert!(!vertical_first((50, 400), (224, 1792)));
    }

    #[test]
    fn window_equals_crop_of_full_resize_when_vertical_runs_first() {
        let img = RgbImage::from_fn(41, 133, |x, y| {
            image::Rgb([
                ((x * 29) ^ (y * 3)) as u8,
                if (x / 3 + y / 5) % 2 == 0 { 250 } else { 5 },
                (x * y * 7) as u8,
            ])
        });
        assert!(vertical_first((41, 133), (30, 60)));
        let full = resize_bicubic_window(&img, (30, 60), (0, 0, 30, 60));
        let window = resize_bicubic_window(&img, (30, 60), (3, 17, 20, 30));
        let cropped = image::imageops::crop_imm(&full, 3, 17, 20, 30).to_image();
        assert_eq!(window, cropped);
    }
}
