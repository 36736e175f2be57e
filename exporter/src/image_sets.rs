//! The images an int8 export looks at: calibration images (static int8's activation ranges)
//! and held-out images (the accuracy budget), kept apart so that a graph is never judged on
//! the images it was calibrated on.
//!
//! A source is a folder of images (recursive), a manifest (`.csv`/`.jsonl` with `path` and
//! `score`), or a dataset (`agiqa3k:<dir>`, `aigciqa2023:<dir>`, `manifest:<file>`). For a
//! dataset the checkpoint's own split is rebuilt from its training config: calibration takes
//! its training images and the budget its test images, with their MOS.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use agiqa_runtime::preprocess::{DecodeLimits, Preprocessor};
use agiqa_trainer::checkpoint::CheckpointMeta;
use agiqa_trainer::data::split::splits_for;
use agiqa_trainer::data::{load_dataset, DatasetSpec, LoadOptions};
use agiqa_trainer::synthetic_images::{procedural_scene, Distortion};
use agiqa_trainer::train::protocol_label;
use image::RgbImage;

use crate::ExportError;

/// File extensions read from image folders.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// Images with their MOS where known.
#[derive(Clone, Debug)]
pub struct ImageSet {
    /// What the images are, for reports and metadata (`folder calib/`, `train split of …`).
    pub label: String,
    pub images: Vec<PathBuf>,
    /// One MOS per image, when every image has one.
    pub mos: Option<Vec<f64>>,
}

impl ImageSet {
    /// At most `n` images, spread evenly over the set (deterministic).
    pub fn spread(mut self, n: usize) -> ImageSet {
        let len = self.images.len();
        if n == 0 || len <= n {
            return self;
        }
        let pick: Vec<usize> = (0..n).map(|i| i * len / n).collect();
        self.images = pick.iter().map(|&i| self.images[i].clone()).collect();
        self.mos = self.mos.map(|m| pick.iter().map(|&i| m[i]).collect());
        self
    }
}

/// The calibration images of `spec` and, for a dataset, the held-out (test) images of the
/// checkpoint's split.
pub fn resolve(
    spec: &str,
    checkpoint: &CheckpointMeta,
) -> Result<(ImageSet, Option<ImageSet>), ExportError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok((folder(path)?, None));
    }
    let dataset_spec: DatasetSpec = spec
        .parse()
        .map_err(|e| ExportError::Unsupported(format!("images {spec:?}: {e}")))?;
    let options = LoadOptions {
        dimension: Some(checkpoint.dimension.clone()),
        check_images: false,
        ..LoadOptions::default()
    };
    let (dataset, _) = load_dataset(&dataset_spec, &options)
        .map_err(|e| ExportError::Unsupported(format!("images {spec}: {e}")))?;
    let set = |label: String, indices: &[usize]| ImageSet {
        label,
        images: indices
            .iter()
            .map(|&i| dataset.samples[i].path.clone())
            .collect(),
        mos: Some(indices.iter().map(|&i| dataset.samples[i].mos).collect()),
    };
    if let DatasetSpec::Manifest(_) = dataset_spec {
        if !spec.starts_with("manifest:") {
            let all: Vec<usize> = (0..dataset.samples.len()).collect();
            return Ok((set(format!("manifest {spec}"), &all), None));
        }
    }
    let config = &checkpoint.train_config;
    let splits = splits_for(&dataset, &config.protocol, config.seed)
        .map_err(|e| ExportError::Unsupported(format!("images {spec}: {e}")))?;
    let split = splits
        .iter()
        .find(|s| protocol_label(s) == checkpoint.protocol)
        .ok_or_else(|| {
            ExportError::Unsupported(format!(
                "{spec} does not give the checkpoint's split ({:?}); is it the dataset the \
                 checkpoint was trained on? Pass a folder or a plain manifest instead",
                checkpoint.protocol
            ))
        })?;
    Ok((
        set(format!("train split of {dataset_spec}"), &split.train),
        Some(set(format!("test split of {dataset_spec}"), &split.test)),
    ))
}

/// A held-out image set for the budget: a folder or manifest (all its images), or a dataset's
/// test split as [`resolve`] gives it.
pub fn held_out(spec: &str, checkpoint: &CheckpointMeta) -> Result<ImageSet, ExportError> {
    let (set, test) = resolve(spec, checkpoint)?;
    Ok(test.unwrap_or(set))
}

/// Every image file under `dir`, sorted.
fn folder(dir: &Path) -> Result<ImageSet, ExportError> {
    let mut images = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| ExportError::Read {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let path = entry
                .map_err(|source| ExportError::Read {
                    path: d.clone(),
                    source,
                })?
                .path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                images.push(path);
            }
        }
    }
    images.sort();
    if images.is_empty() {
        return Err(ExportError::Unsupported(format!(
            "{} holds no images ({})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        )));
    }
    Ok(ImageSet {
        label: format!("folder {}", dir.display()),
        images,
        mos: None,
    })
}

/// Refuses held-out images that are also calibration images.
pub fn check_disjoint(calibration: &ImageSet, held_out: &ImageSet) -> Result<(), ExportError> {
    let key = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
    let seen: HashSet<PathBuf> = calibration.images.iter().map(key).collect();
    if let Some(shared) = held_out.images.iter().find(|p| seen.contains(&key(p))) {
        return Err(ExportError::Unsupported(format!(
            "{} is both a calibration image ({}) and a held-out image ({}); a graph must not be \
             judged on the images it was calibrated on",
            shared.display(),
            calibration.label,
            held_out.label
        )));
    }
    Ok(())
}

/// The `[R, R]` crops of `set` through the shared preprocessing (what the graph is fed).
pub fn crops(set: &ImageSet, preprocessor: &Preprocessor) -> Result<Vec<RgbImage>, ExportError> {
    let limits = DecodeLimits::default();
    set.images
        .iter()
        .map(|path| {
            let image = preprocessor
                .decode_file(path, &limits)
                .map_err(|e| ExportError::Unsupported(format!("{}: {e}", path.display())))?;
            preprocessor
                .resize_and_crop(&image)
                .map_err(|e| ExportError::Unsupported(format!("{}: {e}", path.display())))
        })
        .collect()
}

/// `n` synthetic scenes (sizes and distortions varied) as `[R, R]` crops: held-out images for
/// the budget when none are given. Seeds start at `seed`, so they differ from any image set.
pub fn synthetic_crops(
    n: usize,
    seed: u64,
    preprocessor: &Preprocessor,
) -> Result<Vec<RgbImage>, ExportError> {
    let sizes = [(320, 240), (224, 224), (200, 360), (512, 288)];
    (0..n)
        .map(|i| {
            let (w, h) = sizes[i % sizes.len()];
            let scene = procedural_scene(seed + i as u64, w, h);
            // A spread of qualities, so that score ranks carry information.
            let strength = (i % 7) as f32;
            let distortion = match i % 4 {
                0 => Distortion::Blur(strength * 0.6),
                1 => Distortion::Noise(strength * 6.0),
                2 => Distortion::Jpeg(90 - 10 * (i % 7) as u8),
                _ => Distortion::ColourShift(strength * 10.0),
            };
            let image = distortion.apply(&scene, i as u64);
            preprocessor
                .resize_and_crop(&image)
                .map_err(|e| ExportError::Internal(format!("preprocessing a synthetic image: {e}")))
        })
        .collect()
}
