//! The TIFF variants the `image` crate decodes unlike Pillow (which uses libtiff), decoded as
//! Pillow does: JPEG-compressed strips (libjpeg-turbo's code, as libtiff uses libjpeg), CMYK
//! (Pillow's `cmyk2rgb`, samples not inverted) and 8-bit palettes (the colour map's high bytes).
//! Everything else — raw, LZW, Deflate, PackBits, CCITT, grey, RGB(A), 16-bit — the `image`
//! crate decodes losslessly, hence identically.

use std::io::Cursor;

use ::tiff::decoder::{ChunkType, Decoder, DecodingResult};
use ::tiff::tags::Tag;
use ::tiff::ColorType;
use image::metadata::Orientation;
use image::RgbImage;

use crate::preprocess::{check_dimensions, DecodeLimits, PreprocessError};

/// TIFF `Compression` value of (new-style) JPEG.
const COMPRESSION_JPEG: u16 = 7;
/// TIFF `PhotometricInterpretation` of palette images.
const PHOTOMETRIC_PALETTE: u16 = 3;
/// TIFF `PhotometricInterpretation` of greyscale, 0 = black.
const PHOTOMETRIC_MIN_IS_BLACK: u16 = 1;

/// True for either TIFF byte-order signature.
pub fn is_tiff(bytes: &[u8]) -> bool {
    bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*")
}

/// A TIFF decoded here, and the orientation its `Orientation` tag asks for.
pub struct DecodedTiff {
    pub image: RgbImage,
    pub orientation: Orientation,
}

fn corrupt(e: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::Corrupt(format!("TIFF: {e}"))
}

/// Decodes the first image of a TIFF if it is one of the variants above; `Ok(None)` leaves
/// the file to the `image` crate.
pub fn decode_tiff(
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<Option<DecodedTiff>, PreprocessError> {
    let mut decoder = Decoder::new(Cursor::new(bytes)).map_err(corrupt)?;
    let (width, height) = decoder.dimensions().map_err(corrupt)?;
    check_dimensions(width, height, limits)?;
    let compression = decoder
        .find_tag_unsigned::<u16>(Tag::Compression)
        .map_err(corrupt)?
        .unwrap_or(1);
    let orientation = decoder
        .find_tag_unsigned::<u8>(Tag::Orientation)
        .ok()
        .flatten()
        .and_then(Orientation::from_exif)
        .unwrap_or(Orientation::NoTransforms);
    let photometric = decoder
        .find_tag_unsigned::<u16>(Tag::PhotometricInterpretation)
        .map_err(corrupt)?;
    if photometric == Some(PHOTOMETRIC_PALETTE) {
        return palette(bytes, decoder, (width, height))
            .map(|image| Some(DecodedTiff { image, orientation }));
    }
    let colortype = decoder.colortype().map_err(corrupt)?;
    let image = if compression == COMPRESSION_JPEG {
        let planar = decoder
            .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
            .map_err(corrupt)?
            .unwrap_or(1);
        if decoder.get_chunk_type() != ChunkType::Strip || planar != 1 {
            // Tiled or planar JPEG TIFFs are left to the `image` crate (zune-jpeg; README).
            return Ok(None);
        }
        jpeg_strips(&mut decoder, bytes, (width, height), limits)?
    } else {
        match colortype {
            ColorType::CMYK(8) => {
                let cmyk = read_u8(&mut decoder)?;
                RgbImage::from_raw(width, height, crate::jpeg::cmyk_to_rgb(&cmyk, false))
                    .ok_or_else(|| corrupt("CMYK data shorter than the image"))?
            }
            _ => return Ok(None),
        }
    };
    Ok(Some(DecodedTiff { image, orientation }))
}

fn read_u8(decoder: &mut Decoder<Cursor<&[u8]>>) -> Result<Vec<u8>, PreprocessError> {
    match decoder.read_image().map_err(corrupt)? {
        DecodingResult::U8(data) => Ok(data),
        _ => Err(corrupt("expected 8-bit samples")),
    }
}

/// Pillow reads the 16-bit colour map as its high bytes (`b // 256`), R, G and B planes. The
/// `tiff` crate reads no palette images, so the indices are read as greyscale from a copy
/// whose `PhotometricInterpretation` says so (any compression then works).
fn palette(
    bytes: &[u8],
    mut decoder: Decoder<Cursor<&[u8]>>,
    (width, height): (u32, u32),
) -> Result<RgbImage, PreprocessError> {
    let map = decoder.get_tag_u16_vec(Tag::ColorMap).map_err(corrupt)?;
    let bits = decoder
        .find_tag_unsigned::<u16>(Tag::BitsPerSample)
        .map_err(corrupt)?
        .unwrap_or(1);
    if bits != 8 || map.len() != 3 * 256 {
        return Err(PreprocessError::Unsupported(format!(
            "{bits}-bit palette TIFF (only 8-bit palettes are read)"
        )));
    }
    let mut grey = bytes.to_vec();
    set_photometric(&mut grey, PHOTOMETRIC_MIN_IS_BLACK)?;
    let mut decoder = Decoder::new(Cursor::new(grey.as_slice())).map_err(corrupt)?;
    let indices = read_u8(&mut decoder)?;
    let rgb: Vec<u8> = indices
        .iter()
        .flat_map(|&i| {
            let i = usize::from(i);
            [map[i], map[256 + i], map[512 + i]].map(|v| (v >> 8) as u8)
        })
        .collect();
    RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| corrupt("palette data shorter than the image"))
}

/// Rewrites the first IFD's `PhotometricInterpretation` (classic TIFF, SHORT value).
fn set_photometric(bytes: &mut [u8], value: u16) -> Result<(), PreprocessError> {
    let little = bytes.starts_with(b"II");
    let u16_at = |b: &[u8], at: usize| -> Option<u16> {
        let v: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
        Some(if little {
            u16::from_le_bytes(v)
        } else {
            u16::from_be_bytes(v)
        })
    };
    let ifd = bytes
        .get(4..8)
        .and_then(|v| <[u8; 4]>::try_from(v).ok())
        .map(|v| if little { u32::from_le_bytes(v) } else { u32::from_be_bytes(v) } as usize)
        .ok_or_else(|| corrupt("no IFD"))?;
    let entries = u16_at(bytes, ifd).ok_or_else(|| corrupt("IFD beyond the end"))?;
    for e in 0..usize::from(entries) {
        let at = ifd + 2 + 12 * e;
        if u16_at(bytes, at) == Some(262) && u16_at(bytes, at + 2) == Some(3) {
            let v = if little {
                value.to_le_bytes()
            } else {
                value.to_be_bytes()
            };
            bytes[at + 8..at + 10].copy_from_slice(&v);
            return Ok(());
        }
    }
    Err(corrupt("no PhotometricInterpretation entry"))
}

/// Each strip is a JPEG stream abbreviated by the shared `JPEGTables`; libtiff hands them to
/// libjpeg (converting YCbCr to RGB there, or passing RGB through), as [`crate::jpeg`] does.
fn jpeg_strips(
    decoder: &mut Decoder<Cursor<&[u8]>>,
    bytes: &[u8],
    (width, height): (u32, u32),
    limits: &DecodeLimits,
) -> Result<RgbImage, PreprocessError> {
    let offsets = decoder
        .get_tag_u64_vec(Tag::StripOffsets)
        .map_err(corrupt)?;
    let counts = decoder
        .get_tag_u64_vec(Tag::StripByteCounts)
        .map_err(corrupt)?;
    let tables = match decoder.find_tag(Tag::JPEGTables).map_err(corrupt)? {
        Some(value) => value.into_u8_vec().map_err(corrupt)?,
        None => Vec::new(),
    };
    if offsets.len() != counts.len() || offsets.is_empty() {
        return Err(corrupt("strip offsets and byte counts disagree"));
    }
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for (&offset, &count) in offsets.iter().zip(&counts) {
        let start = usize::try_from(offset).map_err(corrupt)?;
        let end = start
            .checked_add(usize::try_from(count).map_err(corrupt)?)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| corrupt("strip beyond the end of the file"))?;
        let strip = &bytes[start..end];
        // Tables: SOI … EOI; strip: SOI … EOI. Together: one stream with a single SOI and EOI.
        let stream: Vec<u8> = if tables.len() >= 4 && strip.len() >= 2 {
            [&tables[..tables.len() - 2], &strip[2..]].concat()
        } else {
            strip.to_vec()
        };
        let decoded = crate::jpeg::decode_jpeg(&stream, limits)?;
        if decoded.image.width() != width {
            return Err(corrupt("JPEG strip narrower or wider than the image"));
        }
        pixels.extend_from_slice(decoded.image.as_raw());
    }
    pixels.truncate(width as usize * height as usize * 3);
    RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| corrupt("fewer JPEG rows than the image"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb_tiff() -> Vec<u8> {
        let img = RgbImage::from_fn(20, 9, |x, y| {
            image::Rgb([(x * 12) as u8, (y * 25) as u8, 7])
        });
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Tiff)
            .unwrap();
        bytes
    }

    #[test]
    fn plain_tiffs_are_left_to_the_image_crate() {
        let bytes = rgb_tiff();
        assert!(is_tiff(&bytes));
        assert!(decode_tiff(&bytes, &DecodeLimits::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn broken_tiffs_are_errors_not_panics() {
        let bytes = rgb_tiff();
        for cut in [8, 20, bytes.len() / 2] {
            assert!(
                decode_tiff(&bytes[..cut], &DecodeLimits::default()).is_err(),
                "{cut}"
            );
        }
        // Claim JPEG compression for strips that hold raw samples.
        let mut fake = bytes.clone();
        let ifd = u32::from_le_bytes(fake[4..8].try_into().unwrap()) as usize;
        let entries = u16::from_le_bytes([fake[ifd], fake[ifd + 1]]) as usize;
        for e in 0..entries {
            let at = ifd + 2 + 12 * e;
            if u16::from_le_bytes([fake[at], fake[at + 1]]) == 259 {
                fake[at + 8..at + 10].copy_from_slice(&COMPRESSION_JPEG.to_le_bytes());
            }
        }
        assert!(decode_tiff(&fake, &DecodeLimits::default()).is_err());
        // RGB samples labelled as a palette without a colour map.
        let mut fake = bytes;
        set_photometric(&mut fake, PHOTOMETRIC_PALETTE).unwrap();
        assert!(decode_tiff(&fake, &DecodeLimits::default()).is_err());
    }
}
