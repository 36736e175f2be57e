//! The one image preprocessing shared by training and serving.
//!
//! Reference: OpenAI CLIP / the authors' test transform, i.e. PIL decode → RGB → torchvision
//! `Resize(224, BICUBIC)` (shorter side, PIL's antialiased bicubic) → `CenterCrop(224)` →
//! `ToTensor()` → `Normalize(CLIP mean, std)`. Both the trainer and the runtime call into this
//! module, so the pixels a model was trained on and the pixels it is served can never drift.
//!
//! Conversion to RGB is, by default, literally PIL's `Image.open(p).convert("RGB")`:
//! - alpha is dropped (the colour stored under a transparent pixel shows), palette
//!   transparency is ignored;
//! - EXIF orientation is ignored (PIL's `open` + `convert` do not apply it);
//! - 16-bit samples keep their high byte, as Pillow reads 16-bit RGB(A) PNGs. For 16-bit
//!   greyscale (PIL mode `I;16`) PIL clips every value above 255 to white; that is the one
//!   documented deviation: the high byte is kept there too;
//! - grey is replicated, palettes are expanded, 1-bit is 0/255, CMYK/YCCK JPEGs convert as
//!   Pillow converts them; JPEGs are decoded by libjpeg-turbo's code ([`crate::jpeg`]);
//! - animated images contribute their first frame.
//!
//! Opt-ins, recorded in a model's [`Preprocessing`]: [`Alpha::OverWhite`] / [`Alpha::OverBlack`]
//! and [`ExifOrientation::Apply`]. Models whose metadata predates these fields (format 1) decode
//! as they always did: alpha over white, EXIF applied, 16-bit as `round(v / 257)`.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::resample::resize_bicubic_window;

/// CLIP's per-channel mean, in `[0, 1]` units (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation, in `[0, 1]` units (RGB).
// Written digit for digit as in the reference code, so a reader can compare them.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// How the image is resized before cropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Shorter side to `image_size`, aspect ratio kept (torchvision `Resize(int)`).
    ShorterSide,
}

/// Resampling filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Pillow's BICUBIC (a = −0.5, kernel widened when downscaling), bit-exact.
    Bicubic,
}

/// How the square model input is cut from the resized image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropMode {
    /// torchvision `CenterCrop`: offset `round((resized - size) / 2)`.
    Center,
}

/// Version of the pixel-producing implementation (decoders, conversion, resampler). Bumped
/// whenever the same file and [`Preprocessing`] can give different pixels, so caches of
/// preprocessed data or features (the trainer's) never mix old pixels with new ones.
/// - 1: first release.
/// - 2: Pillow 13's resampling pass order (portraits over 2:1); PIL's RGB conversion as the
///   default; JPEG-strip, CMYK and palette TIFFs and GIF first frames decoded as Pillow does.
pub const PREPROCESSING_IMPL_VERSION: u32 = 2;

/// What becomes of transparency when an image is converted to RGB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alpha {
    /// Dropped, as PIL's `convert("RGB")` drops it: the stored colour shows (the default).
    Drop,
    /// Composited over white, `round(c·a + 255·(1 − a))` in f32 (opt-in; format 1's rule).
    OverWhite,
    /// Composited over black, `round(c·a)` in f32 (opt-in).
    OverBlack,
}

/// Whether the EXIF Orientation tag is applied before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExifOrientation {
    /// Ignored, as PIL's `Image.open(p).convert("RGB")` ignores it (the default).
    Ignore,
    /// Applied, as `ImageOps.exif_transpose` does (opt-in; format 1's rule).
    Apply,
}

/// How 16-bit samples become 8-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SixteenBit {
    /// The high byte, `v >> 8`, as Pillow reads 16-bit PNGs (the default; see the module docs
    /// for 16-bit greyscale, where PIL itself clips).
    HighByte,
    /// `round(v / 257)`, alpha composited at full precision: format 1's rule, kept only so
    /// that models exported before format 2 keep their scores.
    Rounded,
}

/// Format 1's alpha field, read from old checkpoints and metadata only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AlphaBackground {
    White,
    Black,
}

/// The complete preprocessing contract of a model. It is stored in checkpoints and in exported
/// ONNX metadata, so a served model always preprocesses exactly as it was trained.
///
/// Reading one written before format 2 (no `alpha`, `exif_orientation`, `sixteen_bit`; an
/// `alpha_background` instead) gives that format's behaviour, so old models' scores do not
/// change silently; unknown fields are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "PreprocessingRecord")]
pub struct Preprocessing {
    /// Side of the square model input, in pixels.
    pub image_size: u32,
    pub resize: ResizeMode,
    pub interpolation: Interpolation,
    pub crop: CropMode,
    /// Per-channel mean subtracted after scaling to `[0, 1]` (RGB order).
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after the mean (RGB order).
    pub std: [f32; 3],
    pub alpha: Alpha,
    pub exif_orientation: ExifOrientation,
    pub sixteen_bit: SixteenBit,
}

/// The serialised form of [`Preprocessing`] in every format version.
#[derive(Deserialize)]
struct PreprocessingRecord {
    image_size: u32,
    resize: ResizeMode,
    interpolation: Interpolation,
    crop: CropMode,
    mean: [f32; 3],
    std: [f32; 3],
    #[serde(default)]
    alpha: Option<Alpha>,
    #[serde(default)]
    alpha_background: Option<AlphaBackground>,
    #[serde(default)]
    exif_orientation: Option<ExifOrientation>,
    #[serde(default)]
    sixteen_bit: Option<SixteenBit>,
}

impl From<PreprocessingRecord> for Preprocessing {
    /// Absent fields mean format 1: alpha over its background (white), EXIF applied, 16-bit
    /// samples rounded.
    fn from(r: PreprocessingRecord) -> Self {
        let format_1_alpha = match r.alpha_background {
            Some(AlphaBackground::Black) => Alpha::OverBlack,
            Some(AlphaBackground::White) | None => Alpha::OverWhite,
        };
        Preprocessing {
            image_size: r.image_size,
            resize: r.resize,
            interpolation: r.interpolation,
            crop: r.crop,
            mean: r.mean,
            std: r.std,
            alpha: r.alpha.unwrap_or(format_1_alpha),
            exif_orientation: r.exif_orientation.unwrap_or(ExifOrientation::Apply),
            sixteen_bit: r.sixteen_bit.unwrap_or(SixteenBit::Rounded),
        }
    }
}

impl Default for Preprocessing {
    /// OpenAI CLIP's 224-pixel preprocessing (ViT-B/16, ViT-B/32, RN50, RN101).
    fn default() -> Self {
        Preprocessing::clip(224)
    }
}

impl Preprocessing {
    /// CLIP's preprocessing for a model of `image_size` pixels, converting as PIL does.
    pub fn clip(image_size: u32) -> Self {
        Preprocessing {
            image_size,
            resize: ResizeMode::ShorterSide,
            interpolation: Interpolation::Bicubic,
            crop: CropMode::Center,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            alpha: Alpha::Drop,
            exif_orientation: ExifOrientation::Ignore,
            sixteen_bit: SixteenBit::HighByte,
        }
    }

    /// The same geometry and normalisation with format 1's conversion (alpha over white, EXIF
    /// applied, 16-bit rounded): what a model exported before format 2 recorded.
    pub fn with_format_1_conversion(self) -> Self {
        Preprocessing {
            alpha: Alpha::OverWhite,
            exif_orientation: ExifOrientation::Apply,
            sixteen_bit: SixteenBit::Rounded,
            ..self
        }
    }

    /// Number of `f32` values of one preprocessed image: `3 · size · size`.
    pub fn tensor_len(&self) -> usize {
        3 * self.image_size as usize * self.image_size as usize
    }

    /// Why this contract cannot preprocess any image, if it cannot: a side outside
    /// `1..=`[`MAX_IMAGE_SIZE`] (0 leaves nothing to resize to; a huge one asks for more memory
    /// than exists), or a mean or std that is not finite, or a std of 0 (every pixel infinite).
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            return Err(format!(
                "image_size {} is outside 1..={MAX_IMAGE_SIZE}",
                self.image_size
            ));
        }
        if !self.mean.iter().all(|m| m.is_finite()) {
            return Err(format!("mean {:?} is not finite", self.mean));
        }
        if !self.std.iter().all(|s| s.is_finite() && *s != 0.0) {
            return Err(format!("std {:?} must be finite and non-zero", self.std));
        }
        Ok(())
    }
}

/// Largest model input side [`Preprocessing::check`] accepts: CLIP's largest is 448 (RN50x64),
/// and one `[3, 4096, 4096]` float input is already 200 MB.
pub const MAX_IMAGE_SIZE: u32 = 4096;

/// How JPEGs are decoded at run time. A scoring option, not part of a model's contract.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JpegDecoding {
    /// Full size, Pillow's pixels exactly.
    #[default]
    Exact,
    /// Large JPEGs decoded at a reduced size by libjpeg's DCT scaling: the smallest `M/8` whose
    /// short side stays at least twice the model input. Faster, but the pixels (and so the
    /// scores) differ slightly from training's; opt-in only.
    Reduced,
}

impl JpegDecoding {
    /// `exact` or `reduced`, as results and reports record it.
    pub fn as_str(self) -> &'static str {
        match self {
            JpegDecoding::Exact => "exact",
            JpegDecoding::Reduced => "reduced",
        }
    }
}

/// Limits that protect a decoder from hostile input (decompression bombs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeLimits {
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted `width · height`.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    /// 16384 pixels a side and 100 megapixels: far above any generated image, far below what
    /// would exhaust memory (100 MP of RGBA16 is 800 MB).
    fn default() -> Self {
        DecodeLimits {
            max_side: 16_384,
            max_pixels: 100_000_000,
        }
    }
}

/// Why an image could not be turned into a model input.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("empty input (0 bytes)")]
    Empty,
    #[error("not a recognised image format (supported: JPEG, PNG, GIF, WebP, BMP, TIFF)")]
    UnknownFormat,
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
    #[error("image is {width}x{height}, over the limit of {max_side} pixels a side or {max_pixels} pixels")]
    TooLarge {
        width: u32,
        height: u32,
        max_side: u32,
        max_pixels: u64,
    },
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSized { width: u32, height: u32 },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        source: Box<PreprocessError>,
    },
}

impl PreprocessError {
    /// Attaches the file the error came from.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            e @ (PreprocessError::Read { .. } | PreprocessError::InFile { .. }) => e,
            e => PreprocessError::InFile {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        }
    }
}

fn classify(err: image::ImageError) -> PreprocessError {
    use image::error::ImageError as E;
    match err {
        E::Unsupported(e) => match e.kind() {
            image::error::UnsupportedErrorKind::Format(image::error::ImageFormatHint::Unknown) => {
                PreprocessError::UnknownFormat
            }
            _ => PreprocessError::Unsupported(e.to_string()),
        },
        E::Decoding(e) => PreprocessError::Corrupt(e.to_string()),
        E::IoError(e) => PreprocessError::Corrupt(e.to_string()),
        E::Limits(e) => PreprocessError::Unsupported(format!("decoder limit: {e}")),
        E::Parameter(e) => PreprocessError::Corrupt(e.to_string()),
        E::Encoding(e) => PreprocessError::Corrupt(e.to_string()),
    }
}

/// Decodes an encoded image (JPEG, PNG, GIF, WebP, BMP, TIFF) into 8-bit RGB as PIL's
/// `Image.open(p).convert("RGB")` does (the default [`Preprocessing`]'s conversion).
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, PreprocessError> {
    decode_image_as(bytes, limits, &Preprocessing::default())
}

/// Reads and decodes an image file with the default conversion; errors name the file.
pub fn decode_image_file(path: &Path, limits: &DecodeLimits) -> Result<RgbImage, PreprocessError> {
    decode_image_file_as(path, limits, &Preprocessing::default())
}

/// Decodes an encoded image into 8-bit RGB with `config`'s conversion rules (alpha, EXIF
/// orientation, 16-bit samples; see the module documentation).
pub fn decode_image_as(
    bytes: &[u8],
    limits: &DecodeLimits,
    config: &Preprocessing,
) -> Result<RgbImage, PreprocessError> {
    decode_image_with(bytes, limits, config, JpegDecoding::Exact)
}

/// [`decode_image_as`] with a choice of JPEG decoding (see [`JpegDecoding::Reduced`]).
pub fn decode_image_with(
    bytes: &[u8],
    limits: &DecodeLimits,
    config: &Preprocessing,
    jpeg: JpegDecoding,
) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let orient = |image: &mut DynamicImage, orientation| {
        if config.exif_orientation == ExifOrientation::Apply {
            image.apply_orientation(orientation);
        }
    };
    if crate::jpeg::is_jpeg(bytes) {
        let min_short_side = match jpeg {
            JpegDecoding::Exact => None,
            JpegDecoding::Reduced => Some(config.image_size.saturating_mul(2)),
        };
        let decoded = crate::jpeg::decode_jpeg_reduced(bytes, limits, min_short_side)?;
        let mut image = DynamicImage::ImageRgb8(decoded.image);
        orient(&mut image, decoded.orientation);
        return Ok(image.into_rgb8());
    }
    if crate::gif_decode::is_gif(bytes) {
        let image = DynamicImage::ImageRgba8(crate::gif_decode::decode_gif(bytes, limits)?);
        return Ok(to_rgb8(image, config.alpha, config.sixteen_bit));
    }
    if crate::tiff_decode::is_tiff(bytes) {
        if let Some(decoded) = crate::tiff_decode::decode_tiff(bytes, limits)? {
            let mut image = DynamicImage::ImageRgb8(decoded.image);
            orient(&mut image, decoded.orientation);
            return Ok(image.into_rgb8());
        }
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(PreprocessError::UnknownFormat);
    }
    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    // Room for the largest pixel type we accept (RGBA, 16 bits a channel) plus slack.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(1 << 20));
    decoder.set_limits(decoder_limits).map_err(classify)?;
    // A broken EXIF block must not cost the image: orientation falls back to "as stored".
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(classify)?;
    orient(&mut image, orientation);
    Ok(to_rgb8(image, config.alpha, config.sixteen_bit))
}

/// Reads and decodes an image file with `config`'s conversion rules; errors name the file.
pub fn decode_image_file_as(
    path: &Path,
    limits: &DecodeLimits,
    config: &Preprocessing,
) -> Result<RgbImage, PreprocessError> {
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image_as(&bytes, limits, config).map_err(|e| e.in_file(path))
}

pub(crate) fn check_dimensions(
    width: u32,
    height: u32,
    limits: &DecodeLimits,
) -> Result<(), PreprocessError> {
    if width == 0 || height == 0 {
        return Err(PreprocessError::ZeroSized { width, height });
    }
    if width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(PreprocessError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// Converts any decoded image to 8-bit RGB: `alpha` says what becomes of transparency and
/// `sixteen_bit` how 16-bit samples are reduced (see the module documentation).
pub fn to_rgb8(image: DynamicImage, alpha: Alpha, sixteen_bit: SixteenBit) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    // f32 throughout, halves rounded away from zero: format 1's arithmetic, bit for bit.
    let over = |c: f32, a: f32| match alpha {
        Alpha::Drop => c.round().clamp(0.0, 255.0) as u8,
        Alpha::OverWhite => (c * a + 255.0 * (1.0 - a)).round().clamp(0.0, 255.0) as u8,
        Alpha::OverBlack => (c * a + 0.0 * (1.0 - a)).round().clamp(0.0, 255.0) as u8,
    };
    let depth = |v: u16| match sixteen_bit {
        SixteenBit::HighByte => (v >> 8) as u8,
        SixteenBit::Rounded => ((u32::from(v) + 128) / 257) as u8,
    };
    let rgb = |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    match image {
        DynamicImage::ImageRgb8(img) => img,
        DynamicImage::ImageLuma8(img) => rgb(&|x, y| [img.get_pixel(x, y)[0]; 3]),
        DynamicImage::ImageLuma16(img) => rgb(&|x, y| [depth(img.get_pixel(x, y)[0]); 3]),
        DynamicImage::ImageRgb16(img) => rgb(&|x, y| img.get_pixel(x, y).0.map(depth)),
        DynamicImage::ImageRgba8(img) => rgb(&|x, y| {
            let [r, g, b, a] = img.get_pixel(x, y).0;
            let a = f32::from(a) / 255.0;
            [r, g, b].map(|c| over(f32::from(c), a))
        }),
        DynamicImage::ImageLumaA8(img) => rgb(&|x, y| {
            let [l, a] = img.get_pixel(x, y).0;
            [over(f32::from(l), f32::from(a) / 255.0); 3]
        }),
        // Pillow reads these as 8-bit RGBA/LA (high bytes); format 1 composited at 16 bits.
        DynamicImage::ImageRgba16(img) => rgb(&|x, y| {
            let [r, g, b, a] = img.get_pixel(x, y).0;
            match sixteen_bit {
                SixteenBit::HighByte => {
                    let a = f32::from(depth(a)) / 255.0;
                    [r, g, b].map(|c| over(f32::from(depth(c)), a))
                }
                SixteenBit::Rounded if alpha == Alpha::Drop => [r, g, b].map(depth),
                SixteenBit::Rounded => {
                    let a = f32::from(a) / 65535.0;
                    [r, g, b].map(|c| over(f32::from(c) / 257.0, a))
                }
            }
        }),
        DynamicImage::ImageLumaA16(img) => rgb(&|x, y| {
            let [l, a] = img.get_pixel(x, y).0;
            let v = match sixteen_bit {
                SixteenBit::HighByte => over(f32::from(depth(l)), f32::from(depth(a)) / 255.0),
                SixteenBit::Rounded if alpha == Alpha::Drop => depth(l),
                SixteenBit::Rounded => over(f32::from(l) / 257.0, f32::from(a) / 65535.0),
            };
            [v; 3]
        }),
        // Float images (TIFF, OpenEXR) and anything newer: the library's own conversion, which
        // clamps to [0, 1]; alpha is composited first unless dropped.
        other => {
            if other.color().has_alpha() && alpha != Alpha::Drop {
                let rgba = other.to_rgba32f();
                rgb(&|x, y| {
                    let [r, g, b, a] = rgba.get_pixel(x, y).0;
                    [r, g, b].map(|c| over(c.clamp(0.0, 1.0) * 255.0, a.clamp(0.0, 1.0)))
                })
            } else {
                other.to_rgb8()
            }
        }
    }
}

/// Resized size `(width, height)` and crop offset `(left, top)` of torchvision's
/// `Resize(size)` + `CenterCrop(size)` for an image of `width × height`.
pub fn resize_geometry(width: u32, height: u32, size: u32) -> ((u32, u32), (u32, u32)) {
    // torchvision: the shorter side becomes `size`, the longer `int(size * long / short)`.
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (u64::from(size) * u64::from(long) / u64::from(short)) as u32;
    let (rw, rh) = if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    };
    // CenterCrop: int(round((resized - size) / 2)), Python's round half to even.
    let offset = |resized: u32| -> u32 {
        if resized <= size {
            0
        } else {
            (f64::from(resized - size) / 2.0).round_ties_even() as u32
        }
    };
    ((rw, rh), (offset(rw), offset(rh)))
}

/// Preprocesses decoded images into model inputs. Cheap to clone; one per worker thread.
#[derive(Clone, Debug)]
pub struct Preprocessor {
    config: Preprocessing,
    /// `(v / 255 − mean) / std` for every 8-bit value, per channel: the exact float32
    /// arithmetic of torchvision's `ToTensor` + `Normalize`, looked up instead of recomputed.
    lut: Box<[[f32; 256]; 3]>,
}

impl Preprocessor {
    pub fn new(config: Preprocessing) -> Self {
        let mut lut = Box::new([[0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - config.mean[c]) / config.std[c];
            }
        }
        Preprocessor { config, lut }
    }

    pub fn config(&self) -> &Preprocessing {
        &self.config
    }

    /// Resizes the shorter side to `image_size` (Pillow's bicubic, see [`crate::resample`]) and
    /// centre-crops to a square: the `image_size × image_size` 8-bit RGB model input.
    pub fn resize_and_crop(&self, image: &RgbImage) -> Result<RgbImage, PreprocessError> {
        let size = self.config.image_size;
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(PreprocessError::ZeroSized {
                width: w,
                height: h,
            });
        }
        let ((rw, rh), (left, top)) = resize_geometry(w, h, size);
        // Only the crop window of the resized image is computed.
        Ok(resize_bicubic_window(
            image,
            (rw, rh),
            (left, top, size.min(rw), size.min(rh)),
        ))
    }

    /// Writes the normalised `[3, size, size]` (CHW, RGB) tensor of a `size × size` image into
    /// `out`, which must hold exactly [`Preprocessing::tensor_len`] values.
    pub fn normalize_into(&self, square: &RgbImage, out: &mut [f32]) {
        let plane = (square.width() * square.height()) as usize;
        assert_eq!(
            out.len(),
            3 * plane,
            "output buffer must hold 3 x H x W values"
        );
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in square.as_raw().chunks_exact(3).enumerate() {
            r[i] = self.lut[0][px[0] as usize];
            g[i] = self.lut[1][px[1] as usize];
            b[i] = self.lut[2][px[2] as usize];
        }
    }

    /// Decoded image → normalised `[3, size, size]` tensor written into `out`.
    pub fn preprocess_into(
        &self,
        image: &RgbImage,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        let square = self.resize_and_crop(image)?;
        self.normalize_into(&square, out);
        Ok(())
    }

    /// Decoded image → normalised `[3, size, size]` tensor.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Vec<f32>, PreprocessError> {
        let mut out = vec![0f32; self.config.tensor_len()];
        self.preprocess_into(image, &mut out)?;
        Ok(out)
    }

    /// Encoded bytes → 8-bit RGB with this model's conversion rules.
    pub fn decode(&self, bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, PreprocessError> {
        decode_image_as(bytes, limits, &self.config)
    }

    /// [`Preprocessor::decode`] with a choice of JPEG decoding.
    pub fn decode_with(
        &self,
        bytes: &[u8],
        limits: &DecodeLimits,
        jpeg: JpegDecoding,
    ) -> Result<RgbImage, PreprocessError> {
        decode_image_with(bytes, limits, &self.config, jpeg)
    }

    /// Image file → 8-bit RGB with this model's conversion rules; errors name the file.
    pub fn decode_file(
        &self,
        path: &Path,
        limits: &DecodeLimits,
    ) -> Result<RgbImage, PreprocessError> {
        decode_image_file_as(path, limits, &self.config)
    }

    /// Image file → normalised `[3, size, size]` tensor; errors name the file.
    pub fn preprocess_file(
        &self,
        path: &Path,
        limits: &DecodeLimits,
    ) -> Result<Vec<f32>, PreprocessError> {
        let image = self.decode_file(path, limits)?;
        self.preprocess(&image).map_err(|e| e.in_file(path))
    }
}

/// Training-time augmentation: torchvision's `RandomResizedCrop(size, scale, ratio, BICUBIC)`
/// followed by `RandomHorizontalFlip(0.5)`, as the reference trains. The random draws come from
/// the caller (`uniform` returns values in `[0, 1)`), so a seeded trainer gets the same views.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandomResizedCrop {
    /// Range of the crop's area as a fraction of the image's.
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio (width / height).
    pub ratio: (f64, f64),
    /// Probability of a horizontal flip.
    pub flip: f64,
}

impl Default for RandomResizedCrop {
    fn default() -> Self {
        RandomResizedCrop {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip: 0.5,
        }
    }
}

/// One sampled view: the crop box in source pixels and whether it is mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
    pub flip: bool,
}

impl RandomResizedCrop {
    /// torchvision's `get_params`: ten tries at a random area and log-uniform aspect ratio,
    /// then a centre crop clamped to the ratio range.
    pub fn sample(&self, width: u32, height: u32, uniform: &mut dyn FnMut() -> f64) -> CropBox {
        let (w, h) = (f64::from(width), f64::from(height));
        let area = w * h;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        let mut chosen = None;
        for _ in 0..10 {
            let target = area * (self.scale.0 + (self.scale.1 - self.scale.0) * uniform());
            let aspect = (log_lo + (log_hi - log_lo) * uniform()).exp();
            let cw = (target * aspect).sqrt().round();
            let ch = (target / aspect).sqrt().round();
            if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
                let top = ((h - ch + 1.0) * uniform()).floor().min(h - ch);
                let left = ((w - cw + 1.0) * uniform()).floor().min(w - cw);
                chosen = Some((left as u32, top as u32, cw as u32, ch as u32));
                break;
            }
        }
        let (left, top, cw, ch) = chosen.unwrap_or_else(|| {
            let in_ratio = w / h;
            let (cw, ch) = if in_ratio < self.ratio.0 {
                (w, (w / self.ratio.0).round())
            } else if in_ratio > self.ratio.1 {
                ((h * self.ratio.1).round(), h)
            } else {
                (w, h)
            };
            (
                ((w - cw) / 2.0) as u32,
                ((h - ch) / 2.0) as u32,
                cw as u32,
                ch as u32,
            )
        });
        CropBox {
            left,
            top,
            width: cw.max(1),
            height: ch.max(1),
            flip: uniform() < self.flip,
        }
    }
}

impl Preprocessor {
    /// The `size × size` training view of `image` for a sampled crop box: crop, Pillow bicubic
    /// resize of the crop to a square (both sides, as `RandomResizedCrop`), optional mirror.
    pub fn augmented_view(
        &self,
        image: &RgbImage,
        crop: &CropBox,
    ) -> Result<RgbImage, PreprocessError> {
        let size = self.config.image_size;
        let (w, h) = image.dimensions();
        if crop.width == 0
            || crop.height == 0
            || crop.left + crop.width > w
            || crop.top + crop.height > h
        {
            return Err(PreprocessError::Unsupported(format!(
                "crop {crop:?} does not fit a {w}x{h} image"
            )));
        }
        let cropped =
            image::imageops::crop_imm(image, crop.left, crop.top, crop.width, crop.height)
                .to_image();
        let mut view = resize_bicubic_window(&cropped, (size, size), (0, 0, size, size));
        if crop.flip {
            image::imageops::flip_horizontal_in_place(&mut view);
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_torchvision() {
        // torchvision Resize(224) on 320x240 -> (298, 224); CenterCrop offset round(74/2) = 37.
        assert_eq!(resize_geometry(320, 240, 224), ((298, 224), (37, 0)));
        // 200x300 -> (224, 336), top = 56.
        assert_eq!(resize_geometry(200, 300, 224), ((224, 336), (0, 56)));
        // Odd difference rounds half to even: 225 -> offset round(0.5) = 0.
        assert_eq!(resize_geometry(225, 224, 224), ((225, 224), (0, 0)));
        assert_eq!(resize_geometry(227, 224, 224), ((227, 224), (2, 0)));
        // Upscaling a small image.
        assert_eq!(resize_geometry(100, 80, 224), ((280, 224), (28, 0)));
    }

    #[test]
    fn normalisation_is_torchvision_arithmetic() {
        let p = Preprocessor::new(Preprocessing::default());
        let img = RgbImage::from_pixel(224, 224, image::Rgb([0, 128, 255]));
        let mut out = vec![0f32; p.config().tensor_len()];
        p.normalize_into(&img, &mut out);
        let plane = 224 * 224;
        assert_eq!(out[0], (0.0 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0]);
        assert_eq!(out[plane], (128.0 / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1]);
        assert_eq!(out[2 * plane + 5], (1.0 - CLIP_MEAN[2]) / CLIP_STD[2]);
    }

    #[test]
    fn uniform_image_stays_uniform() {
        let p = Preprocessor::new(Preprocessing::default());
        let img = RgbImage::from_pixel(500, 300, image::Rgb([10, 200, 90]));
        let square = p.resize_and_crop(&img).unwrap();
        assert_eq!(square.dimensions(), (224, 224));
        assert!(square.pixels().all(|px| px.0 == [10, 200, 90]));
    }

    #[test]
    fn alpha_is_dropped_by_default_and_composited_on_request() {
        let half = image::RgbaImage::from_pixel(1, 1, image::Rgba([100, 0, 255, 128]));
        let convert = |alpha| {
            to_rgb8(
                DynamicImage::ImageRgba8(half.clone()),
                alpha,
                SixteenBit::HighByte,
            )
            .get_pixel(0, 0)
            .0
        };
        // PIL's convert("RGB") keeps the stored colour.
        assert_eq!(convert(Alpha::Drop), [100, 0, 255]);
        let a = 128.0f32 / 255.0;
        let white = |c: f32| (c * a + 255.0 * (1.0 - a)).round() as u8;
        assert_eq!(
            convert(Alpha::OverWhite),
            [white(100.0), white(0.0), white(255.0)]
        );
        assert_eq!(
            convert(Alpha::OverBlack),
            [(100.0 * a).round() as u8, 0, (255.0 * a).round() as u8]
        );
    }

    #[test]
    fn sixteen_bit_keeps_the_high_byte_unless_format_1() {
        let img =
            image::ImageBuffer::<image::Luma<u16>, _>::from_raw(3, 1, vec![0u16, 65535, 32896])
                .unwrap();
        let high = to_rgb8(
            DynamicImage::ImageLuma16(img.clone()),
            Alpha::Drop,
            SixteenBit::HighByte,
        );
        assert_eq!(high.as_raw(), &[0, 0, 0, 255, 255, 255, 128, 128, 128]);
        let rounded = to_rgb8(
            DynamicImage::ImageLuma16(img),
            Alpha::OverWhite,
            SixteenBit::Rounded,
        );
        // 32896 / 257 = 128.0 exactly, high byte 0x80 = 128: both rules agree here.
        assert_eq!(rounded.as_raw(), &[0, 0, 0, 255, 255, 255, 128, 128, 128]);
        let edge =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![0x80FF, 0x00FF, 0xFF00])
                .unwrap();
        let convert = |depth| {
            to_rgb8(DynamicImage::ImageRgb16(edge.clone()), Alpha::Drop, depth)
                .get_pixel(0, 0)
                .0
        };
        assert_eq!(convert(SixteenBit::HighByte), [0x80, 0x00, 0xFF]);
        // 0x00FF / 257 rounds up to 1, 0xFF00 / 257 = 254: the rules differ in both directions.
        assert_eq!(convert(SixteenBit::Rounded), [128, 1, 254]);
    }

    #[test]
    fn format_1_preprocessing_keeps_its_conversion() {
        // As written by format-1 checkpoints and metadata: no alpha / EXIF / 16-bit fields.
        let v1 = r#"{"image_size":224,"resize":"shorter_side","interpolation":"bicubic",
            "crop":"center","mean":[0.48145467,0.4578275,0.40821072],
            "std":[0.26862955,0.2613026,0.2757771],"alpha_background":"white"}"#;
        let p: Preprocessing = serde_json::from_str(v1).unwrap();
        assert_eq!(p, Preprocessing::clip(224).with_format_1_conversion());
        assert_eq!(p.alpha, Alpha::OverWhite);
        assert_eq!(p.exif_orientation, ExifOrientation::Apply);
        assert_eq!(p.sixteen_bit, SixteenBit::Rounded);
        let black: Preprocessing =
            serde_json::from_str(&v1.replace("\"white\"", "\"black\"")).unwrap();
        assert_eq!(black.alpha, Alpha::OverBlack);
        // Format 2 round-trips, and fields added later are ignored.
        for p in [
            Preprocessing::default(),
            Preprocessing {
                alpha: Alpha::OverBlack,
                exif_orientation: ExifOrientation::Apply,
                ..Preprocessing::default()
            },
        ] {
            let mut json: serde_json::Value = serde_json::to_value(&p).unwrap();
            assert!(json.get("alpha_background").is_none());
            json["future_field"] = serde_json::json!({"precision": "fp16"});
            assert_eq!(serde_json::from_value::<Preprocessing>(json).unwrap(), p);
        }
        let default = serde_json::to_value(Preprocessing::default()).unwrap();
        assert_eq!(default["alpha"], "drop");
        assert_eq!(default["exif_orientation"], "ignore");
        assert_eq!(default["sixteen_bit"], "high_byte");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let limits = DecodeLimits::default();
        assert!(matches!(
            decode_image(&[], &limits),
            Err(PreprocessError::Empty)
        ));
        assert!(matches!(
            decode_image(b"definitely not an image", &limits),
            Err(PreprocessError::UnknownFormat)
        ));
        // A PNG signature followed by garbage.
        let mut broken = b"\x89PNG\r\n\x1a\n".to_vec();
        broken.extend_from_slice(&[0u8; 40]);
        let err = decode_image(&broken, &limits).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::Corrupt(_) | PreprocessError::Unsupported(_)
            ),
            "{err}"
        );
    }

    #[test]
    fn oversized_images_are_refused_before_decoding() {
        let mut png = Vec::new();
        RgbImage::new(64, 64)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let tight = DecodeLimits {
            max_side: 32,
            max_pixels: 1 << 20,
        };
        let err = decode_image(&png, &tight).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::TooLarge {
                    width: 64,
                    height: 64,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn random_resized_crop_stays_inside_and_is_reproducible() {
        let rrc = RandomResizedCrop::default();
        let mut state = 7u64;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..500 {
            let c = rrc.sample(300, 200, &mut uniform);
            assert!(c.left + c.width <= 300 && c.top + c.height <= 200, "{c:?}");
            let area = f64::from(c.width * c.height) / 60000.0;
            assert!(area <= 1.0 + 1e-9);
        }
        let p = Preprocessor::new(Preprocessing::default());
        let img = RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let c = CropBox {
            left: 10,
            top: 20,
            width: 100,
            height: 80,
            flip: true,
        };
        let view = p.augmented_view(&img, &c).unwrap();
        assert_eq!(view.dimensions(), (224, 224));
        // Mirrored: the left edge now shows the crop's right side (larger x values).
        assert!(view.get_pixel(0, 100)[0] > view.get_pixel(223, 100)[0]);
        let outside = CropBox {
            left: 250,
            top: 0,
            width: 100,
            height: 10,
            flip: false,
        };
        assert!(p.augmented_view(&img, &outside).is_err());
    }

    #[test]
    fn file_errors_name_the_file() {
        let err = decode_image_file(Path::new("/nonexistent/cat.jpg"), &DecodeLimits::default())
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cat.jpg"), "{err}");
    }
}
