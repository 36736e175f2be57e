//! JPEG decoding with libjpeg-turbo's code (through `mozjpeg`), as Pillow decodes it.
//!
//! Pillow — hence every CLIP and CLIP-AGIQA training run — decodes JPEG with libjpeg-turbo
//! (integer "islow" IDCT, fancy chroma upsampling). Pure-Rust decoders use other IDCTs and
//! differ by up to 4 levels per pixel; libjpeg's own code gives Pillow's pixels exactly.
//! CMYK/YCCK files are converted with Pillow's formula; like Pillow, CMYK samples are taken as
//! Adobe-inverted (what Photoshop and libjpeg-based writers store).

use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use image::metadata::Orientation;
use image::RgbImage;
use mozjpeg::{Decompress, Format};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

use crate::preprocess::{DecodeLimits, PreprocessError};

/// A decoded JPEG and the EXIF orientation it asks for.
pub struct DecodedJpeg {
    pub image: RgbImage,
    pub orientation: Orientation,
}

/// Fatal libjpeg errors unwind (the `unwinding` build of libjpeg is compiled for that) and are
/// caught below; the message is formatted by libjpeg itself.
unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(format_message(cinfo)));
}

/// Warnings are ignored as Pillow ignores them, except premature end of data: Pillow refuses
/// truncated files ("image file is truncated") rather than returning grey rows.
unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: libjpeg always calls with `err` pointing at the manager installed below.
    let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
    if level < 0 && code == JWRN_JPEG_EOF as c_int {
        std::panic::resume_unwind(Box::new(
            "truncated: premature end of JPEG data".to_string(),
        ));
    }
}

fn format_message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: as above; `format_message` writes at most JMSG_LENGTH_MAX (200) bytes.
    unsafe {
        let Some(err) = cinfo.err.as_ref() else {
            return "libjpeg error".into();
        };
        let code = err.msg_code;
        match err.format_message {
            Some(format) => {
                let mut buffer = [0u8; 200];
                let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 200]) =
                    std::mem::transmute(format);
                format(cinfo, &mut buffer);
                let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
                String::from_utf8_lossy(&buffer[..end]).into_owned()
            }
            None => format!("libjpeg error code {code}"),
        }
    }
}

fn error_manager() -> jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills every field of a zeroed manager.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

/// True for the JPEG signature `FF D8 FF`.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a JPEG into 8-bit RGB exactly as Pillow's `Image.open(...).convert("RGB")` does.
pub fn decode_jpeg(bytes: &[u8], limits: &DecodeLimits) -> Result<DecodedJpeg, PreprocessError> {
    decode_jpeg_reduced(bytes, limits, None)
}

/// Like [`decode_jpeg`], but with `min_short_side`, a large JPEG is decoded at a reduced size
/// by libjpeg's DCT scaling (`M/8`, the smallest `M` whose output keeps the short side at or
/// above `min_short_side`): several times faster for large files, but not Pillow's pixels.
pub fn decode_jpeg_reduced(
    bytes: &[u8],
    limits: &DecodeLimits,
    min_short_side: Option<u32>,
) -> Result<DecodedJpeg, PreprocessError> {
    let result = catch_unwind(AssertUnwindSafe(|| {
        decode_inner(bytes, limits, min_short_side)
    }));
    match result {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg failed".into());
            Err(PreprocessError::Corrupt(message))
        }
    }
}

/// The DCT scale numerator (over 8) that keeps `short_side · M / 8` (rounded up, as libjpeg
/// sizes its output) at or above `min_short_side`; 8 (no scaling) when nothing smaller does.
pub fn dct_scale_numerator(short_side: u32, min_short_side: u32) -> u8 {
    (1..8u8)
        .find(|&m| (u64::from(short_side) * u64::from(m)).div_ceil(8) >= u64::from(min_short_side))
        .unwrap_or(8)
}

fn decode_inner(
    bytes: &[u8],
    limits: &DecodeLimits,
    min_short_side: Option<u32>,
) -> Result<DecodedJpeg, PreprocessError> {
    let io = |e: std::io::Error| PreprocessError::Corrupt(e.to_string());
    let markers = [mozjpeg::Marker::APP(1)];
    let mut decompress = Decompress::builder()
        .with_err(error_manager())
        .with_markers(&markers)
        .from_mem(bytes)
        .map_err(io)?;
    let (width, height) = decompress.size();
    crate::preprocess::check_dimensions(width as u32, height as u32, limits)?;
    let mut orientation = Orientation::NoTransforms;
    for marker in decompress.markers() {
        match marker.marker {
            mozjpeg::Marker::APP(1) if marker.data.starts_with(b"Exif\0\0") => {
                if let Some(o) = Orientation::from_exif_chunk(&marker.data[6..]) {
                    orientation = o;
                }
            }
            _ => {}
        }
    }
    if let Some(min_short_side) = min_short_side {
        let short_side = width.min(height) as u32;
        decompress.scale(dct_scale_numerator(short_side, min_short_side));
    }
    let image = match decompress.image().map_err(io)? {
        Format::RGB(mut started) => {
            let (w, h) = (started.width() as u32, started.height() as u32);
            let data = started.read_scanlines::<u8>().map_err(io)?;
            started.finish().map_err(io)?;
            RgbImage::from_raw(w, h, data)
        }
        Format::Gray(mut started) => {
            let (w, h) = (started.width() as u32, started.height() as u32);
            let data = started.read_scanlines::<u8>().map_err(io)?;
            started.finish().map_err(io)?;
            RgbImage::from_raw(w, h, data.iter().flat_map(|&v| [v, v, v]).collect())
        }
        Format::CMYK(mut started) => {
            let (w, h) = (started.width() as u32, started.height() as u32);
            let data = started.read_scanlines::<u8>().map_err(io)?;
            started.finish().map_err(io)?;
            RgbImage::from_raw(w, h, cmyk_to_rgb(&data, true))
        }
    };
    let image = image.ok_or_else(|| {
        PreprocessError::Corrupt("JPEG has fewer rows than its header says".into())
    })?;
    Ok(DecodedJpeg { image, orientation })
}

/// Pillow's `cmyk2rgb`: `c' = k' − c·k'/255` with `k' = 255 − k`, using its rounding division.
/// `inverted`: the samples are stored inverted, as Pillow's JPEG reader (`CMYK;I`) assumes for
/// every CMYK JPEG (Adobe's convention); TIFF stores them as they are.
pub(crate) fn cmyk_to_rgb(stored: &[u8], inverted: bool) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(stored.len() / 4 * 3);
    for px in stored.chunks_exact(4) {
        let v = |i: usize| {
            if inverted {
                255 - i32::from(px[i])
            } else {
                i32::from(px[i])
            }
        };
        let nk = 255 - v(3);
        for c in 0..3 {
            out.push((nk - muldiv255(v(c), nk)).clamp(0, 255) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 9) as u8, (y * 5) as u8, 77])
        });
        let mut bytes = Vec::new();
        img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut bytes, 90,
        ))
        .unwrap();
        bytes
    }

    #[test]
    fn decodes_a_jpeg() {
        let decoded = decode_jpeg(&encode(40, 24), &DecodeLimits::default()).unwrap();
        assert_eq!(decoded.image.dimensions(), (40, 24));
        assert_eq!(decoded.orientation, Orientation::NoTransforms);
    }

    #[test]
    fn truncated_and_corrupt_jpegs_are_errors() {
        let bytes = encode(64, 64);
        for cut in [3, 20, bytes.len() / 2, bytes.len() - 2] {
            let err = decode_jpeg(&bytes[..cut], &DecodeLimits::default());
            assert!(
                matches!(err, Err(PreprocessError::Corrupt(_))),
                "cut at {cut}: {:?}",
                err.err()
            );
        }
        let mut garbage = bytes.clone();
        for b in garbage.iter_mut().skip(200).take(200) {
            *b = 0xFF;
        }
        // Damaged entropy-coded data may decode to noise (as in Pillow) but must not panic.
        let _ = decode_jpeg(&garbage, &DecodeLimits::default());
    }

    #[test]
    fn reduced_decoding_keeps_the_short_side_at_or_above_the_minimum() {
        assert_eq!(dct_scale_numerator(1024, 448), 4);
        assert_eq!(dct_scale_numerator(2048, 448), 2);
        assert_eq!(dct_scale_numerator(4000, 448), 1);
        // 384 · 8/8 is the least that reaches 448: never scaled up, never below the minimum.
        assert_eq!(dct_scale_numerator(384, 448), 8);
        assert_eq!(dct_scale_numerator(897, 448), 4);
        assert_eq!(dct_scale_numerator(894, 448), 5);
        let bytes = encode(1024, 600);
        let limits = DecodeLimits::default();
        let reduced = decode_jpeg_reduced(&bytes, &limits, Some(224)).unwrap();
        // 600 · 3/8 = 225 ≥ 224; 1024 · 3/8 = 384.
        assert_eq!(reduced.image.dimensions(), (384, 225));
        let exact = decode_jpeg_reduced(&bytes, &limits, None).unwrap();
        assert_eq!(exact.image, decode_jpeg(&bytes, &limits).unwrap().image);
        assert_eq!(exact.image.dimensions(), (1024, 600));
    }

    #[test]
    fn cmyk_conversion_is_pillows() {
        // Stored inverted: 255 = no ink. White paper, full black ink, and 50 % cyan.
        assert_eq!(
            cmyk_to_rgb(&[255, 255, 255, 255], true),
            vec![255, 255, 255]
        );
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0], true), vec![0, 0, 0]);
        assert_eq!(
            cmyk_to_rgb(&[127, 255, 255, 255], true),
            vec![127, 255, 255]
        );
        // Not inverted (TIFF): 0 = no ink.
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 0], false), vec![255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[128, 0, 0, 0], false), vec![127, 255, 255]);
    }
}
