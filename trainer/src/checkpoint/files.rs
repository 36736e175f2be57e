//! A checkpoint on disk: a safetensors file of tensors plus a JSON file describing them, both
//! written atomically (temporary file, fsync, rename). The JSON records the SHA-256 of the tensors
//! file, so a pair that does not belong together is refused instead of silently mixed.

use std::path::{Path, PathBuf};

use agiqa_runtime::atomic_file::{temporary_sibling, write_atomic};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::features::sha256_hex;

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid checkpoint description: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Tensors { path: PathBuf, reason: String },
    #[error("{tensors} does not match {json} (SHA-256 {found}, expected {expected}): the pair was mixed or the write was interrupted")]
    HashMismatch {
        tensors: PathBuf,
        json: PathBuf,
        expected: String,
        found: String,
    },
}

/// The envelope written beside the tensors.
#[derive(Serialize, Deserialize)]
struct Envelope<M> {
    /// SHA-256 of the safetensors file.
    tensors_sha256: String,
    #[serde(flatten)]
    meta: M,
}

/// Paths of the two files of checkpoint `stem` (e.g. `run/best` → `run/best.safetensors`,
/// `run/best.json`). A path given with either extension names the same checkpoint.
pub(crate) fn paths(stem: &Path) -> (PathBuf, PathBuf) {
    let stem = match stem.extension().and_then(|e| e.to_str()) {
        Some("safetensors" | "json") => stem.with_extension(""),
        _ => stem.to_path_buf(),
    };
    let with = |ext: &str| {
        let mut s = stem.clone().into_os_string();
        s.push(ext);
        PathBuf::from(s)
    };
    (with(".safetensors"), with(".json"))
}

/// Saves `tensors` and `meta` as checkpoint `stem`. The JSON is written last: it is the commit.
pub(crate) fn save<M: Serialize>(
    stem: &Path,
    tensors: &[(String, Tensor)],
    meta: &M,
) -> Result<(), CheckpointError> {
    let (tensor_path, json_path) = paths(stem);
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Write { path, source }
    };
    let dir = tensor_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    // tch writes to a path; write beside the target and read back for the atomic rename + hash.
    let tmp = temporary_sibling(&tensor_path).map_err(write_err(&tensor_path))?;
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.detach().to_device(tch::Device::Cpu).contiguous(),
            )
        })
        .collect();
    let written = Tensor::write_safetensors(&cpu, &tmp)
        .map_err(|e| CheckpointError::Tensors {
            path: tensor_path.clone(),
            reason: e.to_string(),
        })
        .and_then(|()| std::fs::read(&tmp).map_err(write_err(&tmp)));
    std::fs::remove_file(&tmp).ok();
    let bytes = written?;
    write_atomic(&tensor_path, &bytes).map_err(write_err(&tensor_path))?;
    let envelope = Envelope {
        tensors_sha256: sha256_hex(&bytes),
        meta,
    };
    let json = serde_json::to_vec_pretty(&envelope).map_err(|e| CheckpointError::Json {
        path: json_path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&json_path, &json).map_err(write_err(&json_path))
}

/// Reads only the description of checkpoint `stem`.
pub(crate) fn read_description<M: DeserializeOwned>(stem: &Path) -> Result<M, CheckpointError> {
    Ok(read_envelope(&paths(stem).1)?.meta)
}

fn read_envelope<M: DeserializeOwned>(json_path: &Path) -> Result<Envelope<M>, CheckpointError> {
    let raw = std::fs::read(json_path).map_err(|source| CheckpointError::Read {
        path: json_path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&raw).map_err(|e| CheckpointError::Json {
        path: json_path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Loads checkpoint `stem`: its tensors (CPU) and description, after checking they belong
/// together.
pub(crate) fn load<M: DeserializeOwned>(
    stem: &Path,
) -> Result<(Vec<(String, Tensor)>, M), CheckpointError> {
    let (tensor_path, json_path) = paths(stem);
    let envelope: Envelope<M> = read_envelope(&json_path)?;
    let bytes = std::fs::read(&tensor_path).map_err(|source| CheckpointError::Read {
        path: tensor_path.clone(),
        source,
    })?;
    let found = sha256_hex(&bytes);
    if found != envelope.tensors_sha256 {
        return Err(CheckpointError::HashMismatch {
            tensors: tensor_path,
            json: json_path,
            expected: envelope.tensors_sha256,
            found,
        });
    }
    let tensors = Tensor::read_safetensors(&tensor_path).map_err(|e| CheckpointError::Tensors {
        path: tensor_path.clone(),
        reason: e.to_string(),
    })?;
    Ok((tensors, envelope.meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Meta {
        epoch: usize,
    }

    #[test]
    fn round_trip_and_mismatch_detection() {
        let dir = std::env::temp_dir().join(format!("agiqa-ckpt-{}", std::process::id()));
        let a = dir.join("a");
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        save(
            &a,
            &[("x".to_string(), t.shallow_clone())],
            &Meta { epoch: 3 },
        )
        .unwrap();
        let (tensors, meta): (_, Meta) = load(&dir.join("a.json")).unwrap();
        assert_eq!(meta, Meta { epoch: 3 });
        assert!(tensors[0].1.equal(&t));
        // A tensors file from another checkpoint is refused.
        let b = dir.join("b");
        save(&b, &[("x".to_string(), t * 2)], &Meta { epoch: 4 }).unwrap();
        std::fs::copy(dir.join("b.safetensors"), dir.join("a.safetensors")).unwrap();
        let err = load::<Meta>(&a).unwrap_err();
        assert!(matches!(err, CheckpointError::HashMismatch { .. }), "{err}");
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }
}
