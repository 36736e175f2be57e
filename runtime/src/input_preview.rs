//! `agiqa preprocess`: the shared preprocessing's resized-and-cropped squares written as PNG
//! files, to see exactly what a model is given.

use std::path::{Path, PathBuf};

use crate::preprocess::{
    decode_image_file, DecodeLimits, PreprocessError, Preprocessing, Preprocessor,
};

/// One image's preview: its original size and the PNG written, or why it could not be made.
#[derive(Debug)]
pub struct InputPreview {
    /// The image file given.
    pub image: PathBuf,
    /// `((width, height) of the decoded image, <out_dir>/<stem>.input.png)`.
    pub result: Result<((u32, u32), PathBuf), PreprocessError>,
}

/// Why the previews could not be written (an image that does not decode is an
/// [`InputPreview`] error instead).
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("cannot create {path}")]
    Folder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

/// Writes `<out_dir>/<stem>.input.png`, the `image_size`-pixel square CLIP preprocessing
/// gives the model, for each of `images` (default decode limits).
pub fn write_input_previews(
    images: &[PathBuf],
    out_dir: &Path,
    image_size: u32,
) -> Result<Vec<InputPreview>, PreviewError> {
    std::fs::create_dir_all(out_dir).map_err(|source| PreviewError::Folder {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let preprocessor = Preprocessor::new(Preprocessing::clip(image_size));
    let mut previews = Vec::with_capacity(images.len());
    for image in images {
        let square = decode_image_file(image, &DecodeLimits::default())
            .and_then(|img| Ok((img.dimensions(), preprocessor.resize_and_crop(&img)?)));
        let result = match square {
            Ok((size, square)) => {
                let stem = image.file_stem().unwrap_or_default().to_string_lossy();
                let out = out_dir.join(format!("{stem}.input.png"));
                square.save(&out).map_err(|source| PreviewError::Write {
                    path: out.clone(),
                    source,
                })?;
                Ok((size, out))
            }
            Err(e) => Err(e),
        };
        previews.push(InputPreview {
            image: image.clone(),
            result,
        });
    }
    Ok(previews)
}
