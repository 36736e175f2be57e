//! Image bytes → decode (JPEG, PNG, GIF, WebP, BMP, TIFF) → CLIP preprocessing, as the service
//! and the scorer run them.

use agiqa_runtime::preprocess::{
    decode_image_with, DecodeLimits, JpegDecoding, Preprocessing, Preprocessor,
};

/// Smaller than the serving defaults (16384 a side, 100 MP) so that one execution stays in
/// milliseconds; the limit checks themselves are the same code.
const LIMITS: DecodeLimits = DecodeLimits {
    max_side: 4096,
    max_pixels: 1 << 22,
};

/// Decodes `data` and preprocesses it to a 224-pixel input. The last byte picks the options
/// (bit 0: format 1's alpha-over-white, EXIF and 16-bit rounding instead of format 2's; bit 1:
/// `--fast-decode`'s reduced-size JPEG decoding): decoders ignore trailing bytes, so seeds keep
/// working either way.
pub fn run(data: &[u8]) -> bool {
    let options = data.last().copied().unwrap_or(0);
    let mut config = Preprocessing::clip(224);
    if options & 1 != 0 {
        config = config.with_format_1_conversion();
    }
    let jpeg = if options & 2 != 0 {
        JpegDecoding::Reduced
    } else {
        JpegDecoding::Exact
    };
    let Ok(image) = decode_image_with(data, &LIMITS, &config, jpeg) else {
        return false;
    };
    let preprocessor = Preprocessor::new(config);
    match preprocessor.preprocess(&image) {
        Ok(tensor) => {
            assert_eq!(tensor.len(), preprocessor.config().tensor_len());
            true
        }
        Err(_) => false,
    }
}
