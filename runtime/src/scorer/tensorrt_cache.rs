//! TensorRT's optimisation-profile shapes and the engine-cache folder. ONNX Runtime's own cache
//! file names do not cover everything that makes an engine stale (the TensorRT library, the
//! precision, our profile), so engines live in a subfolder whose name hashes all of it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::options::TensorRtProfile;
use crate::metadata::InputKind;

/// `trt_profile_{min,opt,max}_shapes` values: `name:NxDxDxD` for the model's single input,
/// float NCHW (`pixel_values:Nx3xRxR`) or uint8 NHWC (`pixels_uint8:NxRxRx3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileShapes {
    pub min: String,
    pub opt: String,
    pub max: String,
}

pub fn profile_shapes(
    input: InputKind,
    image_size: u32,
    profile: TensorRtProfile,
) -> ProfileShapes {
    let shape = |n: usize| match input {
        InputKind::PixelValues => format!("{}:{n}x3x{image_size}x{image_size}", input.name()),
        InputKind::PixelsUint8 => format!("{}:{n}x{image_size}x{image_size}x3", input.name()),
    };
    ProfileShapes {
        min: shape(profile.min),
        opt: shape(profile.opt),
        max: shape(profile.max),
    }
}

/// A profile that covers every batch the scorer runs: `1 <= min <= opt <= max`, and `max` at
/// least the batch size (a full batch outside the profile would fail at run time).
pub fn check_profile(profile: TensorRtProfile, batch_size: usize) -> Result<(), String> {
    let TensorRtProfile { min, opt, max } = profile;
    if !(1 <= min && min <= opt && opt <= max) {
        return Err(format!(
            "TensorRT profile min {min}, opt {opt}, max {max} must satisfy 1 <= min <= opt <= max"
        ));
    }
    if max < batch_size {
        return Err(format!(
            "TensorRT profile max {max} is below the batch size {batch_size}"
        ));
    }
    if min > 1 {
        return Err(format!(
            "TensorRT profile min {min} is above 1: a last partial batch would not fit"
        ));
    }
    Ok(())
}

/// Everything an engine depends on. Each field changes the cache folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineCacheKey {
    /// Hash of the model file's bytes.
    pub model: u64,
    /// ONNX Runtime version (its TensorRT provider is built against one TensorRT).
    pub ort_version: String,
    /// TensorRT's version when its library is found, else the provider library's identity.
    pub tensorrt: String,
    /// GPU name and compute capability when obtainable, else `unknown` plus the ordinal.
    pub gpu: String,
    /// `fp32`, `fp16`, `int8` or `int8+fp16`.
    pub precision: String,
    /// The profile shapes.
    pub profile: ProfileShapes,
}

impl EngineCacheKey {
    /// 16 hex digits naming the subfolder.
    pub fn digest(&self) -> String {
        let mut h = Fnv::new();
        h.write_u64(self.model);
        for part in [
            &self.ort_version,
            &self.tensorrt,
            &self.gpu,
            &self.precision,
            &self.profile.min,
            &self.profile.opt,
            &self.profile.max,
        ] {
            h.write(part.as_bytes());
            // A separator, so ("ab", "c") and ("a", "bc") differ.
            h.write(&[0xff]);
        }
        format!("{:016x}", h.finish())
    }

    /// `root/<digest>`.
    pub fn folder(&self, root: &Path) -> PathBuf {
        root.join(self.digest())
    }

    /// What the folder was keyed on, written beside the engines for people.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "model_fnv64 = {:016x}", self.model);
        let _ = writeln!(text, "onnxruntime = {}", self.ort_version);
        let _ = writeln!(text, "tensorrt = {}", self.tensorrt);
        let _ = writeln!(text, "gpu = {}", self.gpu);
        let _ = writeln!(text, "precision = {}", self.precision);
        let _ = writeln!(text, "profile_min = {}", self.profile.min);
        let _ = writeln!(text, "profile_opt = {}", self.profile.opt);
        let _ = writeln!(text, "profile_max = {}", self.profile.max);
        text
    }
}

/// FNV-1a, 64-bit: stable across builds and Rust versions (std's hasher is not), no dependency.
pub struct Fnv(u64);

impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn write_u64(&mut self, value: u64) {
        self.write(&value.to_le_bytes());
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

/// FNV-1a of a model's bytes.
pub fn model_hash(model: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(model);
    h.finish()
}

/// TensorRT's identity: the real file name of `libnvinfer.so*` (e.g. `libnvinfer.so.10.13.3`)
/// found beside ONNX Runtime or on `LD_LIBRARY_PATH`; else the TensorRT provider library's
/// path, size and modification time, which change when a different build is installed.
pub fn tensorrt_identity(ort_lib: &Path) -> String {
    let ort_dir = ort_lib.parent().map(Path::to_path_buf);
    let mut dirs: Vec<PathBuf> = ort_dir.iter().cloned().collect();
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths));
    }
    for dir in &dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("libnvinfer.so").then(|| {
                    std::fs::canonicalize(e.path())
                        .ok()
                        .and_then(|real| real.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .unwrap_or(name)
                })
            })
            .collect();
        found.sort();
        if let Some(longest) = found.into_iter().max_by_key(String::len) {
            return longest;
        }
    }
    let provider = ort_dir
        .unwrap_or_default()
        .join("libonnxruntime_providers_tensorrt.so");
    match std::fs::metadata(&provider) {
        Ok(meta) => format!(
            "{} size {} modified {:?}",
            provider.display(),
            meta.len(),
            meta.modified().ok()
        ),
        Err(_) => "unknown".into(),
    }
}

/// `name, compute capability` of CUDA device `device_id` from `nvidia-smi`, mapping the
/// ordinal through a numeric `CUDA_VISIBLE_DEVICES` (nvidia-smi ignores it); `None` when
/// nvidia-smi is absent or says nothing usable.
pub fn gpu_identity(device_id: i32) -> Option<String> {
    let physical = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(visible) if !visible.trim().is_empty() => visible
            .split(',')
            .nth(usize::try_from(device_id).ok()?)?
            .trim()
            .to_string(),
        _ => device_id.to_string(),
    };
    let text = crate::nvidia_smi::run(&[
        "--query-gpu=name,compute_cap",
        "--format=csv,noheader",
        "-i",
        &physical,
    ])
    .ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(max: usize) -> TensorRtProfile {
        TensorRtProfile {
            min: 1,
            opt: max,
            max,
        }
    }

    #[test]
    fn profile_shapes_follow_the_input_layout() {
        let nchw = profile_shapes(InputKind::PixelValues, 224, profile(32));
        assert_eq!(nchw.min, "pixel_values:1x3x224x224");
        assert_eq!(nchw.opt, "pixel_values:32x3x224x224");
        assert_eq!(nchw.max, "pixel_values:32x3x224x224");
        let nhwc = profile_shapes(InputKind::PixelsUint8, 336, profile(8));
        assert_eq!(nhwc.min, "pixels_uint8:1x336x336x3");
        assert_eq!(nhwc.max, "pixels_uint8:8x336x336x3");
    }

    #[test]
    fn profiles_must_cover_every_batch() {
        assert!(check_profile(profile(16), 16).is_ok());
        let p = TensorRtProfile {
            min: 1,
            opt: 8,
            max: 64,
        };
        assert!(check_profile(p, 16).is_ok());
        assert!(check_profile(profile(8), 16)
            .unwrap_err()
            .contains("below the batch size"));
        let p = TensorRtProfile {
            min: 1,
            opt: 9,
            max: 8,
        };
        assert!(check_profile(p, 8)
            .unwrap_err()
            .contains("min <= opt <= max"));
        let p = TensorRtProfile {
            min: 2,
            opt: 8,
            max: 8,
        };
        assert!(check_profile(p, 8).unwrap_err().contains("partial batch"));
    }

    #[test]
    fn every_key_component_changes_the_folder() {
        let base = EngineCacheKey {
            model: model_hash(b"model bytes"),
            ort_version: "1.31.1".into(),
            tensorrt: "libnvinfer.so.10.13.3".into(),
            gpu: "NVIDIA H200, 9.0".into(),
            precision: "fp16".into(),
            profile: profile_shapes(InputKind::PixelValues, 224, profile(32)),
        };
        let root = Path::new("/cache");
        let folder = base.folder(root);
        assert_eq!(
            folder,
            base.clone().folder(root),
            "the key is deterministic"
        );
        assert_eq!(folder.parent(), Some(root));
        let variants: Vec<(&str, EngineCacheKey)> = vec![
            (
                "model",
                EngineCacheKey {
                    model: model_hash(b"model bytez"),
                    ..base.clone()
                },
            ),
            (
                "ort",
                EngineCacheKey {
                    ort_version: "1.31.2".into(),
                    ..base.clone()
                },
            ),
            (
                "tensorrt",
                EngineCacheKey {
                    tensorrt: "libnvinfer.so.10.14.1".into(),
                    ..base.clone()
                },
            ),
            (
                "gpu",
                EngineCacheKey {
                    gpu: "NVIDIA A100-SXM4-80GB, 8.0".into(),
                    ..base.clone()
                },
            ),
            (
                "precision",
                EngineCacheKey {
                    precision: "fp32".into(),
                    ..base.clone()
                },
            ),
            (
                "profile max",
                EngineCacheKey {
                    profile: profile_shapes(InputKind::PixelValues, 224, profile(64)),
                    ..base.clone()
                },
            ),
            (
                "profile layout",
                EngineCacheKey {
                    profile: profile_shapes(InputKind::PixelsUint8, 224, profile(32)),
                    ..base.clone()
                },
            ),
        ];
        let mut seen = vec![folder];
        for (what, key) in variants {
            let other = key.folder(root);
            assert!(!seen.contains(&other), "{what} did not change the folder");
            seen.push(other);
        }
        assert!(base.describe().contains("precision = fp16"));
    }

    #[test]
    fn fnv_matches_the_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(model_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(model_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(model_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
