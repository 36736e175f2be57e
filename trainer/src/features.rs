//! Frozen image features, computed once and cached on disk.
//!
//! CLIP's image encoder is frozen, so an image's features depend only on the CLIP weights, the
//! preprocessing, the arithmetic (device kind and precision: fp16 CUDA features are not fp32 CPU
//! features) and the image itself. They are cached keyed by exactly those ([`cache_key`]: a
//! fingerprint of the weights, the preprocessing and its implementation's version, the view
//! settings, device kind and precision; then the SHA-256 of the file's bytes):
//! without augmentation one centre view per image, with augmentation `V` precomputed random
//! views per image, of which training samples one per epoch. Training then costs only the text
//! branch and the head. Every image's entry is written as soon as it is computed (atomically),
//! so an interrupted run keeps what it finished.

use std::path::{Path, PathBuf};

use agiqa_runtime::preprocess::{
    CropBox, DecodeLimits, PreprocessError, Preprocessing, Preprocessor, RandomResizedCrop,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::clip::Clip;
use crate::device::{catch_oom, device_kind, DeviceError};
use crate::precision::Precision;
use crate::synthetic_images::SplitMix64;

/// Which views of each image are encoded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ViewSpec {
    /// The test-time view: shorter side resized, centre crop.
    Center,
    /// `views` random-resized-crop + flip views per image, drawn from `seed` and the image's
    /// content hash, so the same image always gets the same views.
    Augmented {
        views: usize,
        crop: RandomResizedCrop,
        seed: u64,
    },
}

impl ViewSpec {
    pub fn views(&self) -> usize {
        match self {
            ViewSpec::Center => 1,
            ViewSpec::Augmented { views, .. } => *views,
        }
    }
}

/// Why features could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error(transparent)]
    Image(#[from] PreprocessError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the feature cache at {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// The cache folder name of features computed with these settings (hex SHA-256). Layout 2 added
/// the device kind and precision: caches written before have other keys, so they miss (and
/// are recomputed) rather than being read as features of another precision.
pub fn cache_key(
    clip_fingerprint: &str,
    preprocessing: &Preprocessing,
    spec: &ViewSpec,
    device: Device,
    precision: Precision,
) -> String {
    sha256_hex(
        serde_json::json!({
            "clip": clip_fingerprint,
            "preprocessing": preprocessing,
            "preprocessing_impl": agiqa_runtime::preprocess::PREPROCESSING_IMPL_VERSION,
            "views": spec,
            "device": device_kind(device),
            "precision": precision,
            "format": 2,
        })
        .to_string()
        .as_bytes(),
    )
}

/// SHA-256 (hex) of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 over CLIP's tensors (names, shapes and fp32 bytes, in name order): the identity of
/// the frozen weights, whatever file format they came from and whatever precision they were
/// cast to afterwards (see [`Clip::fingerprint`]).
pub fn clip_fingerprint(clip: &Clip) -> String {
    clip.fingerprint()
}

/// The crop box of view `view` of an image with content hash `content`.
pub fn view_crop(
    spec: &ViewSpec,
    content: &str,
    view: usize,
    width: u32,
    height: u32,
) -> Option<CropBox> {
    match spec {
        ViewSpec::Center => None,
        ViewSpec::Augmented { crop, seed, .. } => {
            let content_bits =
                u64::from_str_radix(&content[..16.min(content.len())], 16).unwrap_or(0);
            let mut rng =
                SplitMix64::new(seed ^ content_bits ^ (view as u64).wrapping_mul(0x9E37_79B9));
            Some(crop.sample(width, height, &mut || f64::from(rng.uniform())))
        }
    }
}

/// Encodes images to L2-normalised features, through the cache when one is given.
pub struct FeatureExtractor<'a> {
    clip: &'a Clip,
    preprocessor: Preprocessor,
    spec: ViewSpec,
    limits: DecodeLimits,
    /// `<cache root>/<key>/`, where key = [`cache_key`].
    cache: Option<PathBuf>,
    /// Images encoded per forward pass (the run's `--batch-size`; an out-of-memory error says to
    /// lower it).
    pub batch_size: usize,
}

impl<'a> FeatureExtractor<'a> {
    /// `clip_fingerprint` comes from [`clip_fingerprint`] (computed once by the caller);
    /// `preprocessing` is the run's (or the checkpoint's) — its image size must be CLIP's.
    pub fn new(
        clip: &'a Clip,
        clip_fingerprint: &str,
        preprocessing: Preprocessing,
        spec: ViewSpec,
        cache_root: Option<&Path>,
    ) -> Self {
        let key = cache_key(
            clip_fingerprint,
            &preprocessing,
            &spec,
            clip.device(),
            clip.precision(),
        );
        FeatureExtractor {
            clip,
            preprocessor: Preprocessor::new(preprocessing),
            spec,
            limits: DecodeLimits::default(),
            cache: cache_root.map(|root| root.join(&key[..32])),
            batch_size: 32,
        }
    }

    pub fn spec(&self) -> &ViewSpec {
        &self.spec
    }

    /// Features of every view of every image: `[N, V, E]`, L2-normalised, on the CPU.
    /// `progress` is called with the number of images done.
    pub fn extract(
        &self,
        paths: &[PathBuf],
        progress: &mut dyn FnMut(usize),
    ) -> Result<Tensor, FeatureError> {
        let views = self.spec.views();
        let mut out: Vec<Option<Tensor>> = (0..paths.len()).map(|_| None).collect();
        let mut missing = Vec::new();
        let mut hashes = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|source| FeatureError::Read {
                path: path.clone(),
                source,
            })?;
            let hash = sha256_hex(&bytes);
            match self.cached(&hash) {
                Some(t) if t.size() == [views as i64, self.clip.config().embed_dim] => {
                    out[i] = Some(t)
                }
                _ => missing.push(i),
            }
            hashes.push(hash);
        }
        let mut done = paths.len() - missing.len();
        progress(done);
        for chunk in missing.chunks(self.batch_size.max(1)) {
            let chunk_paths: Vec<&Path> = chunk.iter().map(|&i| paths[i].as_path()).collect();
            let chunk_hashes: Vec<&str> = chunk.iter().map(|&i| hashes[i].as_str()).collect();
            let features = self.encode(&chunk_paths, &chunk_hashes)?;
            for (k, &i) in chunk.iter().enumerate() {
                let f = features.get(k as i64);
                self.store(&hashes[i], &f)?;
                out[i] = Some(f);
            }
            done += chunk.len();
            progress(done);
        }
        let rows: Vec<Tensor> = out.into_iter().flatten().collect();
        Ok(Tensor::stack(&rows, 0))
    }

    /// Encodes all views of `paths` without the cache: `[n, V, E]`.
    pub fn encode(&self, paths: &[&Path], hashes: &[&str]) -> Result<Tensor, FeatureError> {
        let all: Vec<usize> = (0..self.spec.views()).collect();
        self.encode_views(paths, hashes, &vec![all; paths.len()])
    }

    /// Encodes view `picks[k]` of image `k` without the cache: `[n, E]`. Training without a
    /// cache encodes one view per image per epoch this way: the view the cache would serve.
    pub fn encode_picked(
        &self,
        paths: &[&Path],
        hashes: &[&str],
        picks: &[usize],
    ) -> Result<Tensor, FeatureError> {
        let wanted: Vec<Vec<usize>> = picks.iter().map(|&p| vec![p]).collect();
        Ok(self.encode_views(paths, hashes, &wanted)?.squeeze_dim(1))
    }

    /// Encodes views `wanted[k]` (indices into the spec's views; the same count for every
    /// image) of image `k`: `[n, count, E]`.
    fn encode_views(
        &self,
        paths: &[&Path],
        hashes: &[&str],
        wanted: &[Vec<usize>],
    ) -> Result<Tensor, FeatureError> {
        let views = wanted.first().map_or(0, Vec::len);
        let tensor_len = self.preprocessor.config().tensor_len();
        let mut pixels = vec![0f32; paths.len() * views * tensor_len];
        // Decoding and resampling dominate on CPU: spread the images over the worker pool.
        let per_image = (views * tensor_len).max(1);
        let (preprocessor, spec, limits) = (&self.preprocessor, &self.spec, &self.limits);
        pixels
            .par_chunks_mut(per_image)
            .zip(paths.par_iter().zip(hashes).zip(wanted))
            .try_for_each(|(out, ((path, hash), wanted))| {
                preprocess_views(
                    preprocessor,
                    spec,
                    limits,
                    std::slice::from_ref(path),
                    std::slice::from_ref(hash),
                    std::slice::from_ref(wanted),
                    out,
                )
            })?;
        let size = i64::from(self.preprocessor.config().image_size);
        let device = self.clip.device();
        // One forward over every view of the batch: where a GPU runs out of memory.
        let features = catch_oom(device, paths.len(), || {
            let batch = Tensor::from_slice(&pixels)
                .view([(paths.len() * views) as i64, 3, size, size])
                .to_device(device);
            tch::no_grad(|| {
                let f = self.clip.encode_image(&batch).to_kind(Kind::Float);
                &f / f.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
            })
        })?;
        Ok(features.to_device(Device::Cpu).view([
            paths.len() as i64,
            views as i64,
            self.clip.config().embed_dim,
        ]))
    }

    fn entry(&self, hash: &str) -> Option<PathBuf> {
        self.cache
            .as_ref()
            .map(|dir| dir.join(format!("{hash}.f32")))
    }

    fn cached(&self, hash: &str) -> Option<Tensor> {
        let bytes = std::fs::read(self.entry(hash)?).ok()?;
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let dim = self.clip.config().embed_dim;
        let views = values.len() as i64 / dim.max(1);
        (views * dim == values.len() as i64).then(|| Tensor::from_slice(&values).view([views, dim]))
    }

    fn store(&self, hash: &str, features: &Tensor) -> Result<(), FeatureError> {
        let Some(path) = self.entry(hash) else {
            return Ok(());
        };
        let write_err = |source| FeatureError::Write {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write_err)?;
        }
        let values: Vec<f32> = Vec::try_from(features.contiguous().flatten(0, -1))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        agiqa_runtime::atomic_file::write_atomic(&path, &bytes).map_err(write_err)
    }
}

/// Decodes `paths` and writes every view's normalised tensor into `out` (`[n, V, 3, S, S]`).
fn preprocess_views(
    preprocessor: &Preprocessor,
    spec: &ViewSpec,
    limits: &DecodeLimits,
    paths: &[&Path],
    hashes: &[&str],
    wanted: &[Vec<usize>],
    out: &mut [f32],
) -> Result<(), PreprocessError> {
    let tensor_len = preprocessor.config().tensor_len();
    for (k, ((path, hash), wanted)) in paths.iter().zip(hashes).zip(wanted).enumerate() {
        let views = wanted.len();
        let image = preprocessor.decode_file(path, limits)?;
        for (slot_index, &v) in wanted.iter().enumerate() {
            let slot = &mut out
                [(k * views + slot_index) * tensor_len..(k * views + slot_index + 1) * tensor_len];
            match view_crop(spec, hash, v, image.width(), image.height()) {
                None => preprocessor.preprocess_into(&image, slot),
                Some(crop) => preprocessor
                    .augmented_view(&image, &crop)
                    .map(|view| preprocessor.normalize_into(&view, slot)),
            }
            .map_err(|e| e.in_file(path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::ClipConfig;

    fn images(dir: &Path, n: u64) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let path = dir.join(format!("img{i}.png"));
                crate::synthetic_images::procedural_scene(i, 96, 64)
                    .save(&path)
                    .unwrap();
                path
            })
            .collect()
    }

    #[test]
    fn cached_features_equal_fresh_ones_and_are_reused() {
        let dir = std::env::temp_dir().join(format!("agiqa-features-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = images(&dir, 3);
        let clip = Clip::random(&ClipConfig::preset("tiny").unwrap(), 0, Device::Cpu);
        let fp = clip_fingerprint(&clip);
        let spec = ViewSpec::Augmented {
            views: 2,
            crop: RandomResizedCrop::default(),
            seed: 5,
        };
        let extractor = FeatureExtractor::new(
            &clip,
            &fp,
            Preprocessing::clip(clip.config().image_resolution() as u32),
            spec.clone(),
            Some(&dir.join("cache")),
        );
        let first = extractor.extract(&paths, &mut |_| {}).unwrap();
        assert_eq!(first.size(), [3, 2, 256]);
        // Views differ from each other, and every row is unit length.
        assert!(
            f64::try_from((first.get(0).get(0) - first.get(0).get(1)).abs().max()).unwrap() > 1e-4
        );
        let norms = first.norm_scalaropt_dim(2, [-1], false);
        assert!(f64::try_from((norms - 1.0).abs().max()).unwrap() < 1e-5);
        // A second extractor finds everything in the cache (same values, no encoding).
        let again = FeatureExtractor::new(
            &clip,
            &fp,
            Preprocessing::clip(clip.config().image_resolution() as u32),
            spec,
            Some(&dir.join("cache")),
        );
        let mut calls = Vec::new();
        let second = again.extract(&paths, &mut |n| calls.push(n)).unwrap();
        assert_eq!(calls, vec![3], "everything should come from the cache");
        assert!(first.equal(&second));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn cache_keys_separate_device_kinds_and_precisions() {
        let p = Preprocessing::clip(224);
        let key = |device, precision| cache_key("fp", &p, &ViewSpec::Center, device, precision);
        let cpu32 = key(Device::Cpu, Precision::Fp32);
        let keys = [
            cpu32.clone(),
            key(Device::Cuda(0), Precision::Fp16),
            key(Device::Cpu, Precision::Bf16),
            key(Device::Cpu, Precision::Fp16),
            key(Device::Cuda(0), Precision::Fp32),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // Which GPU index ran it does not change the arithmetic.
        assert_eq!(
            key(Device::Cuda(0), Precision::Fp16),
            key(Device::Cuda(3), Precision::Fp16)
        );
        // The layout before device and precision were keyed (format 1) never matches.
        let old = sha256_hex(
            serde_json::json!({
                "clip": "fp",
                "preprocessing": p,
                "preprocessing_impl": agiqa_runtime::preprocess::PREPROCESSING_IMPL_VERSION,
                "views": ViewSpec::Center,
                "format": 1,
            })
            .to_string()
            .as_bytes(),
        );
        assert!(keys.iter().all(|k| k != &old));
        assert_eq!(cpu32, key(Device::Cpu, Precision::Fp32), "keys are stable");
    }

    #[test]
    fn half_precision_features_are_close_to_fp32_and_cached_apart() {
        let dir = std::env::temp_dir().join(format!("agiqa-features-prec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = images(&dir, 2);
        let clip = Clip::random(&ClipConfig::preset("tiny").unwrap(), 0, Device::Cpu);
        let fp = clip_fingerprint(&clip);
        let p = Preprocessing::clip(clip.config().image_resolution() as u32);
        let cache = dir.join("cache");
        let fp32 = FeatureExtractor::new(&clip, &fp, p.clone(), ViewSpec::Center, Some(&cache))
            .extract(&paths, &mut |_| {})
            .unwrap();
        for (precision, tolerance) in [(Precision::Fp16, 5e-3), (Precision::Bf16, 4e-2)] {
            let mut low = clip.clone_frozen();
            low.set_precision(precision);
            assert_eq!(
                clip_fingerprint(&low),
                fp,
                "the fingerprint names the fp32 weights"
            );
            let mut calls = Vec::new();
            let f = FeatureExtractor::new(&low, &fp, p.clone(), ViewSpec::Center, Some(&cache))
                .extract(&paths, &mut |n| calls.push(n))
                .unwrap();
            assert_eq!(
                calls[0], 0,
                "{precision}: fp32 cache entries must not be served"
            );
            assert_eq!(f.kind(), Kind::Float);
            let diff = f64::try_from((&f - &fp32).abs().max()).unwrap();
            assert!(diff > 0. && diff < tolerance, "{precision}: max |Δ| {diff}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
