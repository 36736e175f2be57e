//! GIF's first frame as Pillow composes it: on a canvas of the logical screen filled with the
//! frame's transparent index (else index 0), through the frame's palette (else the global one).
//! The `image` crate composes on transparent black instead, which shows wherever the first
//! frame does not cover the screen.

use std::io::Cursor;

use image::RgbaImage;

use crate::preprocess::{check_dimensions, DecodeLimits, PreprocessError};

/// True for the `GIF87a` / `GIF89a` signatures.
pub fn is_gif(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a")
}

fn corrupt(e: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::Corrupt(format!("GIF: {e}"))
}

/// The first frame on the logical screen. Alpha is 0 exactly where Pillow's
/// `convert("RGBA")` makes it 0 (the transparent index), so every [`crate::preprocess::Alpha`]
/// policy applies unchanged; indices beyond the palette are black, as in Pillow.
pub fn decode_gif(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbaImage, PreprocessError> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let frame_bytes = limits.max_pixels.max(1);
    if let Some(limit) = std::num::NonZeroU64::new(frame_bytes) {
        options.set_memory_limit(gif::MemoryLimit::Bytes(limit));
    }
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(corrupt)?;
    let (width, height) = (u32::from(decoder.width()), u32::from(decoder.height()));
    check_dimensions(width, height, limits)?;
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder
        .read_next_frame()
        .map_err(corrupt)?
        .ok_or_else(|| corrupt("no image in the file"))?;
    let fill = frame.transparent.unwrap_or(0);
    let mut indices = vec![fill; width as usize * height as usize];
    let (fw, fh) = (usize::from(frame.width), usize::from(frame.height));
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    for (y, row) in frame.buffer.chunks_exact(fw.max(1)).take(fh).enumerate() {
        let Some(dst_y) = (top + y < height as usize).then_some(top + y) else {
            break;
        };
        let visible = row.len().min((width as usize).saturating_sub(left));
        let start = dst_y * width as usize + left;
        indices[start..start + visible].copy_from_slice(&row[..visible]);
    }
    let palette = frame.palette.as_deref().or(global.as_deref());
    let colour = |i: u8| -> [u8; 3] {
        match palette {
            Some(p) => p
                .get(usize::from(i) * 3..usize::from(i) * 3 + 3)
                .map_or([0, 0, 0], |c| [c[0], c[1], c[2]]),
            // No colour table at all: Pillow reads the indices as greyscale.
            None => [i; 3],
        }
    };
    let transparent = frame.transparent;
    let pixels: Vec<u8> = indices
        .iter()
        .flat_map(|&i| {
            let [r, g, b] = colour(i);
            [r, g, b, if Some(i) == transparent { 0 } else { 255 }]
        })
        .collect();
    RgbaImage::from_raw(width, height, pixels).ok_or_else(|| corrupt("frame buffer size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_gifs_are_errors_not_panics() {
        let img = image::RgbaImage::from_fn(30, 20, |x, y| {
            image::Rgba([(x * 8) as u8, (y * 12) as u8, 3, 255])
        });
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Gif)
            .unwrap();
        assert!(is_gif(&bytes));
        let full = decode_gif(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(full.dimensions(), (30, 20));
        for cut in [6, 13, 40, bytes.len() / 2] {
            assert!(
                decode_gif(&bytes[..cut], &DecodeLimits::default()).is_err(),
                "{cut}"
            );
        }
    }
}
