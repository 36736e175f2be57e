//! CLIP weight loading: OpenAI TorchScript archives, `torch.save` state dicts and safetensors in
//! OpenAI or Hugging Face naming, all turned into one [`StateDict`] in OpenAI names.

pub mod hf;
pub mod openai;
/// The zip/pickle reader lives in the tch-free `agiqa-readers` crate (fuzzed without libtorch).
pub use agiqa_readers::torch_archive;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use self::torch_archive::TorchArchiveError;

/// Tensors by OpenAI name (`visual.conv1.weight`, `transformer.resblocks.0.ln_1.bias`, ...),
/// all fp32 on the CPU.
#[derive(Debug, Default)]
pub struct StateDict {
    tensors: BTreeMap<String, Tensor>,
}

impl StateDict {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a detached fp32 CPU copy of `tensor`, replacing any tensor of that name.
    pub fn insert(&mut self, name: impl Into<String>, tensor: &Tensor) {
        let tensor = tensor.detach().to_device(Device::Cpu).to_kind(Kind::Float);
        self.tensors.insert(name.into(), tensor);
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Every tensor's shape, by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.size()))
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(name, t)| (name.as_str(), t))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Writes the tensors as fp32 safetensors in OpenAI naming (readable by [`load_state_dict`]).
    pub fn save_safetensors(&self, path: &Path) -> Result<(), WeightsError> {
        let named: Vec<(&str, &Tensor)> = self.iter().collect();
        Tensor::write_safetensors(&named, path).map_err(|source| WeightsError::Tensor {
            context: format!("writing {}", path.display()),
            source: Box::new(source),
        })
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Tensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, Tensor>;

    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        let mut sd = StateDict::new();
        for (name, tensor) in iter {
            sd.insert(name, &tensor);
        }
        sd
    }
}

/// Where a state dict came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `clip.load`'s JIT archives (`ViT-B-16.pt`), fp16.
    OpenAiTorchScript,
    /// A `torch.save`d state dict in OpenAI naming (open_clip `.pt`/`.bin`).
    TorchStateDict,
    /// `transformers`' `CLIPModel` (`model.safetensors`, usually with `config.json`).
    HuggingFaceSafetensors,
    /// safetensors in OpenAI naming, e.g. written by [`StateDict::save_safetensors`].
    OpenAiSafetensors,
    /// `transformers`' `pytorch_model.bin`.
    HuggingFaceTorch,
}

impl WeightsFormat {
    pub fn is_hugging_face(self) -> bool {
        matches!(self, Self::HuggingFaceSafetensors | Self::HuggingFaceTorch)
    }
}

/// A tensor whose shape differs from what the architecture expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub name: String,
    pub expected: Vec<i64>,
    pub found: Vec<i64>,
}

/// Everything that differs between a state dict and the architecture, reported at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mismatch {
    /// Expected by the architecture but absent, with the expected shape.
    pub missing: Vec<(String, Vec<i64>)>,
    /// Present but unknown to the architecture, with the found shape.
    pub unexpected: Vec<(String, Vec<i64>)>,
    pub misshaped: Vec<ShapeMismatch>,
}

impl Mismatch {
    /// Compares found shapes against expected ones; `None` when they agree exactly.
    pub fn between(
        expected: &BTreeMap<String, Vec<i64>>,
        found: &BTreeMap<String, Vec<i64>>,
    ) -> Option<Self> {
        let mut mismatch = Mismatch::default();
        for (name, shape) in expected {
            match found.get(name) {
                None => mismatch.missing.push((name.clone(), shape.clone())),
                Some(f) if f != shape => mismatch.misshaped.push(ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: f.clone(),
                }),
                Some(_) => {}
            }
        }
        for (name, shape) in found {
            if !expected.contains_key(name) {
                mismatch.unexpected.push((name.clone(), shape.clone()));
            }
        }
        let agree = mismatch.missing.is_empty()
            && mismatch.unexpected.is_empty()
            && mismatch.misshaped.is_empty();
        (!agree).then_some(mismatch)
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} missing, {} unexpected, {} mis-shaped",
            self.missing.len(),
            self.unexpected.len(),
            self.misshaped.len()
        )?;
        for (name, shape) in &self.missing {
            write!(f, "\n  missing    {name} (expected {shape:?})")?;
        }
        for (name, shape) in &self.unexpected {
            write!(f, "\n  unexpected {name} (found {shape:?})")?;
        }
        for m in &self.misshaped {
            write!(
                f,
                "\n  mis-shaped {} (expected {:?}, found {:?})",
                m.name, m.expected, m.found
            )?;
        }
        Ok(())
    }
}

/// Why weights could not be read or do not fit the architecture.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is not a CLIP checkpoint we can read: expected an OpenAI `.pt` (TorchScript), a \
         `torch.save` state dict, a safetensors file or a Hugging Face model folder",
        path.display()
    )]
    UnknownFormat { path: PathBuf },
    #[error("cannot read the PyTorch archive {}: {source}", path.display())]
    Archive {
        path: PathBuf,
        source: Box<TorchArchiveError>,
    },
    #[error("cannot read the safetensors file {}: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        source: Box<tch::TchError>,
    },
    #[error("invalid Hugging Face config {}: {reason}", path.display())]
    HfConfig { path: PathBuf, reason: String },
    #[error("cannot infer the CLIP architecture: {reason}")]
    Infer { reason: String },
    #[error("invalid CLIP configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error("the weights do not match the CLIP architecture: {0}")]
    Mismatch(Box<Mismatch>),
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        source: Box<tch::TchError>,
    },
}

/// Non-weight entries some checkpoints carry: JIT attributes, buffers recomputed at build time.
/// Matched against the last component of the name.
const NOT_WEIGHTS: [&str; 6] = [
    "attn_mask",
    "input_resolution",
    "context_length",
    "vocab_size",
    "num_batches_tracked",
    "position_ids",
];

/// Whether a checkpoint entry is metadata rather than a CLIP weight.
pub fn is_ignored(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    NOT_WEIGHTS.contains(&last)
}

/// Reads a checkpoint in any supported format, returning OpenAI-named fp32 CPU tensors.
///
/// `path` may be a file or a Hugging Face model folder (`model.safetensors`, else
/// `pytorch_model.bin`).
pub fn load_state_dict(path: &Path) -> Result<(StateDict, WeightsFormat), WeightsError> {
    let file = resolve_checkpoint_file(path)?;
    match sniff(&file)? {
        Container::Zip | Container::Pickle => openai::read_torch_checkpoint(&file),
        Container::Safetensors => {
            let tensors = read_safetensors(&file)?;
            if hf::uses_hf_names(tensors.iter().map(|(n, _)| n.as_str())) {
                Ok((
                    hf::to_openai(tensors),
                    WeightsFormat::HuggingFaceSafetensors,
                ))
            } else {
                Ok((openai::collect(tensors), WeightsFormat::OpenAiSafetensors))
            }
        }
    }
}

/// The weights file inside a model folder, or `path` itself.
pub fn resolve_checkpoint_file(path: &Path) -> Result<PathBuf, WeightsError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    [
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_pytorch_model.bin",
    ]
    .iter()
    .map(|name| path.join(name))
    .find(|candidate| candidate.is_file())
    .ok_or_else(|| WeightsError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

/// Reads every tensor of a safetensors file in its stored dtype (weights, inputs, references).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
    Tensor::read_safetensors(path).map_err(|source| WeightsError::Safetensors {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

enum Container {
    Zip,
    Pickle,
    Safetensors,
}

/// Tells formats apart by their first bytes, not their extension (`.pt` and `.bin` are both
/// used for zip archives and legacy pickles).
fn sniff(path: &Path) -> Result<Container, WeightsError> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::with_capacity(9);
    std::fs::File::open(path)
        .map_err(io)?
        .take(9)
        .read_to_end(&mut head)
        .map_err(io)?;
    match head.as_slice() {
        [b'P', b'K', 3, 4, ..] => Ok(Container::Zip),
        [0x80, 2..=5, ..] => Ok(Container::Pickle),
        // safetensors: u64 little-endian header length, then the JSON header.
        [_, _, _, _, _, _, _, _, b'{'] => Ok(Container::Safetensors),
        _ => Err(WeightsError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignore_list_matches_only_the_last_component() {
        assert!(is_ignored("transformer.resblocks.3.attn_mask"));
        assert!(is_ignored("visual.layer1.0.bn1.num_batches_tracked"));
        assert!(is_ignored("text_model.embeddings.position_ids"));
        assert!(is_ignored("input_resolution"));
        assert!(!is_ignored("positional_embedding"));
        assert!(!is_ignored("visual.attnpool.positional_embedding"));
    }

    #[test]
    fn mismatch_reports_every_difference() {
        let expected: BTreeMap<_, _> = [
            ("a".to_string(), vec![2]),
            ("b".to_string(), vec![3, 4]),
            ("c".to_string(), vec![]),
        ]
        .into();
        let found: BTreeMap<_, _> = [
            ("b".to_string(), vec![4, 3]),
            ("c".to_string(), vec![]),
            ("d".to_string(), vec![1]),
        ]
        .into();
        let m = Mismatch::between(&expected, &found).expect("they differ");
        assert_eq!(m.missing, vec![("a".to_string(), vec![2])]);
        assert_eq!(m.unexpected, vec![("d".to_string(), vec![1])]);
        assert_eq!(
            m.misshaped,
            vec![ShapeMismatch {
                name: "b".into(),
                expected: vec![3, 4],
                found: vec![4, 3]
            }]
        );
        let text = m.to_string();
        assert!(text.contains("missing    a (expected [2])"), "{text}");
        assert!(Mismatch::between(&expected, &expected).is_none());
    }

    #[test]
    fn unknown_and_missing_files_name_the_path() {
        let dir = std::env::temp_dir().join(format!("agiqa-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pt");
        std::fs::write(&junk, b"not a checkpoint at all").unwrap();
        let err = load_state_dict(&junk).unwrap_err();
        assert!(matches!(err, WeightsError::UnknownFormat { .. }));
        assert!(err.to_string().contains("junk.pt"), "{err}");
        let err = load_state_dict(&dir.join("absent.pt")).unwrap_err();
        assert!(
            matches!(err, WeightsError::Io { .. }) && err.to_string().contains("absent.pt"),
            "{err}"
        );
        let err = load_state_dict(&dir).unwrap_err();
        assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
