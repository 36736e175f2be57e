//! Checkpoints in OpenAI naming: `clip.load`'s TorchScript archives and `torch.save` state dicts.
//!
//! Both are zip archives read by [`read_torch_archive`]; `tch::CModule` is not used because it
//! lists parameters only, losing the ModifiedResNet's BatchNorm running statistics.

use std::path::Path;

use tch::{Kind, Tensor};

use super::hf;
use super::torch_archive::{read_torch_archive, RawDtype, RawTensor};
use super::{is_ignored, StateDict, WeightsError, WeightsFormat};

/// Reads a PyTorch archive (TorchScript or `torch.save`), in OpenAI or Hugging Face naming.
pub fn read_torch_checkpoint(path: &Path) -> Result<(StateDict, WeightsFormat), WeightsError> {
    let raw = read_torch_archive(path).map_err(|source| WeightsError::Archive {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, tensor) in raw {
        if is_ignored(&name) {
            continue;
        }
        tensors.push((name.clone(), to_tensor(&name, &tensor)?));
    }
    if hf::uses_hf_names(tensors.iter().map(|(n, _)| n.as_str())) {
        return Ok((hf::to_openai(tensors), WeightsFormat::HuggingFaceTorch));
    }
    let format = if is_torchscript(path) {
        WeightsFormat::OpenAiTorchScript
    } else {
        WeightsFormat::TorchStateDict
    };
    Ok((collect(tensors), format))
}

/// Gathers OpenAI-named tensors, dropping non-weights and the `module.` prefix that
/// `DataParallel` training leaves behind.
pub fn collect(tensors: Vec<(String, Tensor)>) -> StateDict {
    let mut sd = StateDict::new();
    for (name, tensor) in tensors {
        let name = name.strip_prefix("module.").unwrap_or(&name);
        if !is_ignored(name) {
            sd.insert(name, &tensor);
        }
    }
    sd
}

/// TorchScript archives carry compiled code (`code/`, `constants.pkl`) beside the data.
fn is_torchscript(path: &Path) -> bool {
    let archive = std::fs::File::open(path)
        .ok()
        .and_then(|f| zip::ZipArchive::new(f).ok());
    archive.is_some_and(|a| {
        a.file_names()
            .any(|name| name.ends_with("/constants.pkl") || name.contains("/code/"))
    })
}

/// Copies raw little-endian bytes into a tensor of the stored dtype (cast to fp32 later).
fn to_tensor(name: &str, raw: &RawTensor) -> Result<Tensor, WeightsError> {
    let kind = match raw.dtype {
        RawDtype::F16 => Kind::Half,
        RawDtype::BF16 => Kind::BFloat16,
        RawDtype::F32 => Kind::Float,
        RawDtype::F64 => Kind::Double,
        RawDtype::I64 => Kind::Int64,
        RawDtype::I32 => Kind::Int,
        RawDtype::I16 => Kind::Int16,
        RawDtype::I8 => Kind::Int8,
        RawDtype::U8 => Kind::Uint8,
        RawDtype::Bool => Kind::Bool,
    };
    let shape: Vec<i64> = raw.shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(&raw.data, &shape, kind).map_err(|source| WeightsError::Tensor {
        context: format!("tensor `{name}`"),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/torch_archive")
            .join(name)
    }

    #[test]
    fn archives_are_told_apart_by_their_code() {
        let (_, format) = read_torch_checkpoint(&fixture("scripted.pt")).unwrap();
        assert_eq!(format, WeightsFormat::OpenAiTorchScript);
        let (sd, format) = read_torch_checkpoint(&fixture("state_dict.pt")).unwrap();
        assert_eq!(format, WeightsFormat::TorchStateDict);
        // Every tensor arrives as fp32, whatever its stored dtype.
        assert!(sd.iter().all(|(_, t)| t.kind() == Kind::Float));
    }

    #[test]
    fn buffers_are_kept_and_metadata_dropped() {
        let (sd, _) = read_torch_checkpoint(&fixture("scripted.pt")).unwrap();
        assert!(sd.get("bn1.running_mean").is_some());
        assert!(sd.names().all(|n| !n.ends_with("num_batches_tracked")));
    }

    #[test]
    fn data_parallel_prefix_is_stripped() {
        let t = Tensor::ones([2], (Kind::Float, tch::Device::Cpu));
        let sd = collect(vec![
            ("module.visual.proj".into(), t.shallow_clone()),
            ("module.transformer.resblocks.0.attn_mask".into(), t),
        ]);
        assert_eq!(sd.names().collect::<Vec<_>>(), ["visual.proj"]);
    }
}
