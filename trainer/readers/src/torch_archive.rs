//! Pure-Rust reader for PyTorch's zip-based archives.
//!
//! Two kinds of files are understood, without libtorch or Python:
//!
//! * TorchScript archives written by `torch.jit.save` (for example OpenAI's released CLIP
//!   checkpoints `ViT-B-16.pt`, `RN101.pt`). Every tensor attribute of the module tree —
//!   parameters *and* buffers such as BatchNorm `running_mean` / `running_var` /
//!   `num_batches_tracked` — is returned under its dotted module path
//!   (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`, `logit_scale`).
//!   libtorch's C++ module API only lists parameters, which is why this reader exists.
//! * Plain `torch.save(obj)` files in the zip format (`.pt`, `.pth`, `pytorch_model.bin`):
//!   a (possibly `collections.OrderedDict`) state dict name → tensor, possibly nested under a
//!   key like `state_dict` or `model`. Nested dicts (and lists/tuples) are flattened with
//!   dotted names (`state_dict.conv.weight`, `layers.0.bias`).
//!
//! # Format
//!
//! Both are zip files whose entries share one folder prefix: `<prefix>/data.pkl` (the object
//! graph, a pickle), `<prefix>/data/<key>` (raw little-endian storage bytes), plus files this
//! reader ignores (`version`, `byteorder`, `constants.pkl`, `code/...`). `data.pkl` is
//! unpickled by a small stack machine (protocols 2–5 as written by `torch.save` and the
//! TorchScript pickler). Storages come from persistent ids
//! `('storage', torch.<Type>Storage, key, location, numel)`; tensors from
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` (also
//! `_rebuild_tensor`, `_rebuild_parameter`, `torch._tensor._rebuild_from_type_v2`). TorchScript
//! modules are `__torch__.*` objects created by `NEWOBJ`/`REDUCE` whose attribute dict arrives
//! via `BUILD`. The object graph is then walked: dict keys and object attributes give name
//! components, list/tuple positions give numeric components, and every tensor reached is
//! copied out of its storage into a contiguous row-major buffer (any strides / offsets /
//! shared storages). Non-tensor values are ignored.
//!
//! Malformed input never panics and never triggers allocations much larger than the file: it
//! yields a [`TorchArchiveError`] that names the file and what is wrong. Hostile aliasing is
//! bounded too: at most 64 dimensions, 4096-byte names, 256 levels of nesting, 5M object
//! visits while naming, and a total output of 16x the distinct storage bytes plus 1 GiB.
//!
//! Not supported (reported as errors, never silently skipped): the legacy pre-1.6 non-zip
//! `torch.save` format, quantized / sparse / nested / complex tensors, tensors stored as
//! `torch.UntypedStorage`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Element type of a tensor stored in a PyTorch archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RawDtype {
    /// IEEE 754 half precision (`torch.float16`, `HalfStorage`).
    F16,
    /// bfloat16 (`torch.bfloat16`, `BFloat16Storage`).
    BF16,
    /// `torch.float32` (`FloatStorage`).
    F32,
    /// `torch.float64` (`DoubleStorage`).
    F64,
    /// `torch.int64` (`LongStorage`).
    I64,
    /// `torch.int32` (`IntStorage`).
    I32,
    /// `torch.int16` (`ShortStorage`).
    I16,
    /// `torch.int8` (`CharStorage`).
    I8,
    /// `torch.uint8` (`ByteStorage`).
    U8,
    /// `torch.bool` (`BoolStorage`), one byte per element (0 or 1).
    Bool,
}

impl RawDtype {
    /// Size of one element in bytes.
    pub fn element_size(self) -> usize {
        match self {
            RawDtype::F16 | RawDtype::BF16 | RawDtype::I16 => 2,
            RawDtype::F32 | RawDtype::I32 => 4,
            RawDtype::F64 | RawDtype::I64 => 8,
            RawDtype::I8 | RawDtype::U8 | RawDtype::Bool => 1,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            RawDtype::F16 | RawDtype::BF16 | RawDtype::F32 | RawDtype::F64
        )
    }

    /// Maps a legacy storage class name (`HalfStorage`, `FloatStorage`, ...) to its dtype.
    fn from_storage_class(name: &str) -> Option<RawDtype> {
        Some(match name {
            "HalfStorage" => RawDtype::F16,
            "BFloat16Storage" => RawDtype::BF16,
            "FloatStorage" => RawDtype::F32,
            "DoubleStorage" => RawDtype::F64,
            "LongStorage" => RawDtype::I64,
            "IntStorage" => RawDtype::I32,
            "ShortStorage" => RawDtype::I16,
            "CharStorage" => RawDtype::I8,
            "ByteStorage" => RawDtype::U8,
            "BoolStorage" => RawDtype::Bool,
            _ => return None,
        })
    }
}

/// A tensor read from an archive: contiguous, row-major, little-endian element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type of `data`.
    pub dtype: RawDtype,
    /// Dimensions (empty for a 0-d scalar tensor).
    pub shape: Vec<usize>,
    /// `numel() * dtype.element_size()` bytes, row-major, little-endian.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Number of elements: the product of `shape` (1 for a 0-d tensor; `usize::MAX` if the
    /// product overflows, which no tensor read by this module does).
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// Converts every element to `f32` (row-major). Floats convert exactly except `F64`
    /// (rounded); integers convert as `as f32` would; `Bool` gives 0.0 / 1.0. Fails only if
    /// `data` does not hold exactly `numel()` elements.
    ///
    /// # Errors
    ///
    /// [`TorchArchiveError::InvalidData`] if `data.len() != numel() * dtype.element_size()`.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, TorchArchiveError> {
        let esize = self.dtype.element_size();
        let expected = self.numel().checked_mul(esize);
        if expected != Some(self.data.len()) {
            return Err(TorchArchiveError::InvalidData {
                detail: format!(
                    "{:?} tensor of shape {:?} needs {} bytes of data, it has {}",
                    self.dtype,
                    self.shape,
                    expected.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string()),
                    self.data.len()
                ),
            });
        }
        let d = &self.data;
        let out = match self.dtype {
            RawDtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            RawDtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            RawDtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            RawDtype::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
                .collect(),
            RawDtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
                .collect(),
            RawDtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            RawDtype::I16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
                .collect(),
            RawDtype::I8 => d.iter().map(|&b| b as i8 as f32).collect(),
            RawDtype::U8 => d.iter().map(|&b| b as f32).collect(),
            RawDtype::Bool => d.iter().map(|&b| if b != 0 { 1.0 } else { 0.0 }).collect(),
        };
        Ok(out)
    }
}

/// Everything that can go wrong reading an archive. Each variant except
/// [`TorchArchiveError::InvalidData`] (raised by [`RawTensor::to_f32_vec`], which has no
/// file) names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TorchArchiveError {
    /// The file could not be opened or read.
    #[error("{}: cannot read file: {source}", path.display())]
    Io {
        /// The archive.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a zip archive, or its zip directory is unreadable (truncated, corrupt).
    #[error("{}: not a zip archive: {detail}", path.display())]
    NotZip {
        /// The archive.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// A zip entry exists but could not be read (corrupt data, CRC mismatch, truncation).
    #[error("{}: cannot read zip entry '{entry}': {detail}", path.display())]
    Entry {
        /// The archive.
        path: PathBuf,
        /// The zip entry name.
        entry: String,
        /// What went wrong.
        detail: String,
    },
    /// The zip has no `data.pkl`: it is not a `torch.save` / `torch.jit.save` archive.
    #[error("{}: no 'data.pkl' entry: not a torch.save / torch.jit.save zip archive", path.display())]
    MissingDataPkl {
        /// The archive.
        path: PathBuf,
    },
    /// `data.pkl` contains a pickle opcode this reader does not implement.
    #[error("{}: unsupported pickle opcode 0x{opcode:02x} at byte {offset} in {entry}", path.display())]
    UnsupportedOpcode {
        /// The archive.
        path: PathBuf,
        /// The pickle's zip entry name.
        entry: String,
        /// The opcode byte.
        opcode: u8,
        /// Its offset in the pickle.
        offset: usize,
    },
    /// `data.pkl` is malformed (truncated, stack underflow, bad argument types...).
    #[error("{}: malformed pickle {entry}: {detail} (opcode at byte {offset})", path.display())]
    Pickle {
        /// The archive.
        path: PathBuf,
        /// The pickle's zip entry name.
        entry: String,
        /// Offset of the opcode being executed.
        offset: usize,
        /// What is wrong.
        detail: String,
    },
    /// A tensor refers to a storage whose zip entry does not exist.
    #[error("{}: storage '{entry}' is missing (needed by tensor '{tensor}')", path.display())]
    MissingStorage {
        /// The archive.
        path: PathBuf,
        /// The expected zip entry name, e.g. `archive/data/3`.
        entry: String,
        /// The first tensor that needs it.
        tensor: String,
    },
    /// A tensor's size/stride/offset reaches past the end of its storage.
    #[error("{}: tensor '{tensor}' needs {needed} bytes, storage '{entry}' has {available}", path.display())]
    StorageTooSmall {
        /// The archive.
        path: PathBuf,
        /// The tensor's dotted name.
        tensor: String,
        /// The storage's zip entry name.
        entry: String,
        /// Bytes the tensor view needs.
        needed: u128,
        /// Bytes the storage holds.
        available: u64,
    },
    /// A tensor is described in a way this reader cannot or will not decode (bad size or
    /// stride, unsupported dtype or tensor kind such as quantized / sparse).
    #[error("{}: tensor '{tensor}': {detail}", path.display())]
    BadTensor {
        /// The archive.
        path: PathBuf,
        /// The tensor's dotted name (empty for a bare top-level tensor).
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// The archive as a whole is unsupported or inconsistent (duplicate tensor names, object
    /// graph too deep or too large, unknown byte order).
    #[error("{}: {detail}", path.display())]
    Unsupported {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A [`RawTensor`]'s `data` does not match its dtype and shape.
    #[error("invalid tensor data: {detail}")]
    InvalidData {
        /// What is wrong.
        detail: String,
    },
}

/// Reads every tensor from a zip-format `torch.save` or `torch.jit.save` archive.
///
/// Returns `(dotted name, tensor)` pairs sorted by name. For TorchScript archives the names
/// are attribute paths from the root module (parameters, buffers and plain tensor
/// attributes); for `torch.save` files they are the (flattened) dict keys. A tensor reachable
/// under several attribute paths (e.g. tied weights) is returned under each of them.
///
/// # Errors
///
/// Any [`TorchArchiveError`] except `InvalidData`: the file cannot be read or is not a zip
/// archive, `data.pkl` is missing or malformed, a storage is missing or too small, a tensor is
/// of an unsupported kind, or two tensors would get the same name.
pub fn read_torch_archive(path: &Path) -> Result<Vec<(String, RawTensor)>, TorchArchiveError> {
    let mut file = File::open(path).map_err(|source| TorchArchiveError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_len = file
        .metadata()
        .map_err(|source| TorchArchiveError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut magic = Vec::with_capacity(4);
    (&mut file)
        .take(4)
        .read_to_end(&mut magic)
        .and_then(|_| file.rewind())
        .map_err(|source| TorchArchiveError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    check_zip_signature(path, &magic)?;
    read_zip(path, open_zip(path, file)?, file_len)
}

/// [`read_torch_archive`] on an archive already in memory; `path` only names it in errors.
pub fn read_torch_archive_bytes(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<(String, RawTensor)>, TorchArchiveError> {
    check_zip_signature(path, &bytes[..bytes.len().min(4)])?;
    let file_len = bytes.len() as u64;
    read_zip(path, open_zip(path, std::io::Cursor::new(bytes))?, file_len)
}

/// Fails with a hint at what the file is when its first bytes are not a zip's `PK`.
fn check_zip_signature(path: &Path, magic: &[u8]) -> Result<(), TorchArchiveError> {
    if magic.starts_with(b"PK") {
        return Ok(());
    }
    let detail = if magic.is_empty() {
        "the file is empty".to_string()
    } else if magic[0] == 0x80 {
        "it looks like a legacy (pre-1.6, non-zip) torch.save pickle, which is not supported; \
         re-save it with a current torch.save"
            .to_string()
    } else {
        format!("it starts with bytes {magic:02x?}, not the zip signature 'PK'")
    };
    Err(TorchArchiveError::NotZip {
        path: path.to_path_buf(),
        detail,
    })
}

fn open_zip<R: Read + Seek>(
    path: &Path,
    reader: R,
) -> Result<zip::ZipArchive<R>, TorchArchiveError> {
    zip::ZipArchive::new(reader).map_err(|e| TorchArchiveError::NotZip {
        path: path.to_path_buf(),
        detail: format!("unreadable zip directory (truncated or corrupt?): {e}"),
    })
}

// ---------------------------------------------------------------------------------------------
// Archive level
// ---------------------------------------------------------------------------------------------

/// Most bytes a single tensor may expand to beyond its storage size (stride-0 expansion).
const MAX_EXPANDED_BYTES: u128 = 1 << 28;
/// Largest capacity reserved up front for a zip entry (the data still has to actually exist).
const MAX_PREALLOC: u64 = 1 << 28;
/// Most dimensions a tensor may have (PyTorch's own limit is 64).
const MAX_NDIM: usize = 64;
/// Longest dotted tensor name.
const MAX_NAME_LEN: usize = 4096;
/// Most bytes of tensor names in total (guards against long names times many aliases).
const MAX_NAME_BYTES: usize = 1 << 28;
/// Output allowed beyond [`OUTPUT_PER_STORAGE_BYTE`] times the distinct storage bytes read
/// (guards against one storage viewed by a huge number of aliases).
const OUTPUT_SLACK_BYTES: u64 = 1 << 30;
/// How many times its distinct storage bytes the total output may be (aliases, expansions).
const OUTPUT_PER_STORAGE_BYTE: u64 = 16;
/// Deepest object nesting followed while naming tensors.
const MAX_DEPTH: usize = 256;
/// Most object-graph nodes visited while naming tensors (guards against exponential sharing).
const MAX_VISITS: usize = 5_000_000;

fn read_zip<R: Read + Seek>(
    path: &Path,
    mut zip: zip::ZipArchive<R>,
    file_len: u64,
) -> Result<Vec<(String, RawTensor)>, TorchArchiveError> {
    // The archive's folder prefix comes from its shallowest `data.pkl` entry.
    let pkl_name = zip
        .file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.matches('/').count(), n.len()))
        .map(str::to_string)
        .ok_or_else(|| TorchArchiveError::MissingDataPkl {
            path: path.to_path_buf(),
        })?;
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
    let pkl = read_entry(path, &mut zip, file_len, &pkl_name)?.ok_or_else(|| {
        TorchArchiveError::MissingDataPkl {
            path: path.to_path_buf(),
        }
    })?;

    let big_endian = match read_entry(path, &mut zip, file_len, &format!("{prefix}byteorder"))? {
        None => false,
        Some(bytes) => match String::from_utf8_lossy(&bytes).trim() {
            "little" => false,
            "big" => true,
            other => {
                return Err(TorchArchiveError::Unsupported {
                    path: path.to_path_buf(),
                    detail: format!("unknown byte order {other:?} in {prefix}byteorder"),
                })
            }
        },
    };

    let (root, nodes) = Unpickler::new(&pkl)
        .load()
        .map_err(|e| e.into_error(path, &pkl_name))?;

    let mut walker = Walker {
        nodes: &nodes,
        on_path: vec![false; nodes.len()],
        visits: 0,
        name_bytes: 0,
        found: Vec::new(),
    };
    walker.walk(&root, String::new(), 0).map_err(|e| match e {
        WalkError::Tensor { name, detail } => TorchArchiveError::BadTensor {
            path: path.to_path_buf(),
            tensor: name,
            detail,
        },
        WalkError::Graph(detail) => TorchArchiveError::Unsupported {
            path: path.to_path_buf(),
            detail,
        },
    })?;
    let mut found = walker.found;
    found.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = found.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(TorchArchiveError::Unsupported {
            path: path.to_path_buf(),
            detail: format!("more than one tensor is named '{}'", w[0].0),
        });
    }

    // Read each storage once; drop it after its last user.
    let spec_of = |node: usize| -> &TensorSpec {
        match &nodes[node] {
            Node::Tensor(t) => t,
            _ => unreachable!("walker only records tensor nodes"),
        }
    };
    let storage_of = |spec: &TensorSpec| -> &StorageRef {
        match &nodes[spec.storage] {
            Node::Storage(s) => s,
            _ => unreachable!("tensor specs always point at storage nodes"),
        }
    };
    let mut remaining_uses: HashMap<&str, usize> = HashMap::new();
    for (_, node) in &found {
        *remaining_uses
            .entry(storage_of(spec_of(*node)).key.as_str())
            .or_default() += 1;
    }
    let mut cache: HashMap<&str, Vec<u8>> = HashMap::new();
    let (mut storage_bytes, mut output_bytes) = (0u64, 0u64);
    let mut out = Vec::with_capacity(found.len());
    for (name, node) in found {
        let spec = spec_of(node);
        let storage = storage_of(spec);
        let entry = format!("{prefix}data/{}", storage.key);
        if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(storage.key.as_str()) {
            let bytes = read_entry(path, &mut zip, file_len, &entry)?.ok_or_else(|| {
                TorchArchiveError::MissingStorage {
                    path: path.to_path_buf(),
                    entry: entry.clone(),
                    tensor: name.clone(),
                }
            })?;
            storage_bytes += bytes.len() as u64;
            slot.insert(bytes);
        }
        let bytes = &cache[storage.key.as_str()];
        let data = copy_view(spec, storage.dtype, bytes, big_endian).map_err(|e| match e {
            ViewError::TooSmall { needed } => TorchArchiveError::StorageTooSmall {
                path: path.to_path_buf(),
                tensor: name.clone(),
                entry: entry.clone(),
                needed,
                available: bytes.len() as u64,
            },
            ViewError::Other(detail) => TorchArchiveError::BadTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                detail,
            },
        })?;
        let uses = remaining_uses
            .get_mut(storage.key.as_str())
            .expect("counted above");
        output_bytes += data.len() as u64;
        if output_bytes > storage_bytes * OUTPUT_PER_STORAGE_BYTE + OUTPUT_SLACK_BYTES {
            return Err(TorchArchiveError::Unsupported {
                path: path.to_path_buf(),
                detail: format!(
                    "tensors need {output_bytes}+ bytes from {storage_bytes} bytes of storage \
                     (excessive aliasing or expansion)"
                ),
            });
        }
        *uses -= 1;
        if *uses == 0 {
            cache.remove(storage.key.as_str());
        }
        out.push((
            name,
            RawTensor {
                dtype: storage.dtype,
                shape: spec.size.clone(),
                data,
            },
        ));
    }
    Ok(out)
}

/// Reads a whole zip entry; `Ok(None)` if there is no entry of that name.
fn read_entry<R: Read + Seek>(
    path: &Path,
    zip: &mut zip::ZipArchive<R>,
    file_len: u64,
    name: &str,
) -> Result<Option<Vec<u8>>, TorchArchiveError> {
    let entry_err = |detail: String| TorchArchiveError::Entry {
        path: path.to_path_buf(),
        entry: name.to_string(),
        detail,
    };
    if zip.index_for_name(name).is_none() {
        return Ok(None);
    }
    let mut f = zip.by_name(name).map_err(|e| entry_err(e.to_string()))?;
    let size = f.size();
    // Reserve no more than the file could hold; deflated entries grow the buffer as needed.
    let mut buf = Vec::with_capacity(size.min(file_len).min(MAX_PREALLOC) as usize);
    // Reading one byte past the declared size makes the zip reader reach its end, where it
    // verifies the CRC, while still bounding what a lying header can make us allocate.
    (&mut f)
        .take(size.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| entry_err(e.to_string()))?;
    if buf.len() as u64 != size {
        return Err(entry_err(format!(
            "expected {size} bytes, got {} (truncated or corrupt)",
            buf.len()
        )));
    }
    Ok(Some(buf))
}

enum ViewError {
    TooSmall { needed: u128 },
    Other(String),
}

/// Copies the strided view `spec` out of `storage` into a contiguous little-endian buffer.
fn copy_view(
    spec: &TensorSpec,
    dtype: RawDtype,
    storage: &[u8],
    big_endian: bool,
) -> Result<Vec<u8>, ViewError> {
    let esize = dtype.element_size();
    let ndim = spec.size.len();
    let overflow = || {
        ViewError::Other(format!(
            "size {:?} / stride {:?} overflow",
            spec.size, spec.stride
        ))
    };
    let numel = spec
        .size
        .iter()
        .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
        .ok_or_else(overflow)?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    // Highest element index the view touches.
    let max_index = spec
        .size
        .iter()
        .zip(&spec.stride)
        .try_fold(spec.offset as u128, |acc, (&d, &s)| {
            acc.checked_add((d as u128 - 1).checked_mul(s as u128)?)
        })
        .ok_or_else(overflow)?;
    let needed = max_index
        .checked_add(1)
        .and_then(|n| n.checked_mul(esize as u128))
        .ok_or_else(overflow)?;
    if needed > storage.len() as u128 {
        return Err(ViewError::TooSmall { needed });
    }
    let out_bytes = numel.checked_mul(esize as u128).ok_or_else(overflow)?;
    if out_bytes > storage.len() as u128 + MAX_EXPANDED_BYTES {
        return Err(ViewError::Other(format!(
            "view of {out_bytes} bytes expands a {}-byte storage implausibly",
            storage.len()
        )));
    }
    let out_bytes = out_bytes as usize; // <= storage.len() + 256 MiB, fits
    let mut out = Vec::with_capacity(out_bytes);

    // Row-major contiguous (ignoring dims of size 1)?
    let mut expect = 1usize;
    let mut contiguous = true;
    for i in (0..ndim).rev() {
        if spec.size[i] != 1 {
            if spec.stride[i] != expect {
                contiguous = false;
                break;
            }
            expect *= spec.size[i]; // bounded by numel, which fits
        }
    }
    let start = spec.offset * esize; // bounded by `needed`
    if contiguous {
        out.extend_from_slice(&storage[start..start + out_bytes]);
    } else {
        // Iterate over all but the last dimension; copy the last dimension as a run when its
        // stride is 1, element by element otherwise.
        let last = ndim - 1; // ndim >= 1 here: a 0-d tensor is always contiguous
        let (run_len, run_stride) = (spec.size[last], spec.stride[last]);
        let runs: usize = spec.size[..last].iter().product(); // <= numel
        let mut idx = vec![0usize; last];
        for _ in 0..runs {
            let base = spec.offset
                + idx
                    .iter()
                    .zip(&spec.stride)
                    .map(|(&i, &s)| i * s)
                    .sum::<usize>();
            if run_stride == 1 {
                out.extend_from_slice(&storage[base * esize..(base + run_len) * esize]);
            } else {
                for j in 0..run_len {
                    let e = (base + j * run_stride) * esize;
                    out.extend_from_slice(&storage[e..e + esize]);
                }
            }
            // Odometer increment over dims 0..last.
            for d in (0..last).rev() {
                idx[d] += 1;
                if idx[d] < spec.size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        debug_assert_eq!(out.len(), out_bytes);
    }
    Ok(finish(out, esize, big_endian))
}

fn finish(mut out: Vec<u8>, esize: usize, big_endian: bool) -> Vec<u8> {
    if big_endian && esize > 1 {
        for chunk in out.chunks_exact_mut(esize) {
            chunk.reverse();
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Object graph
// ---------------------------------------------------------------------------------------------

/// A pickled value. Containers live in the node arena and are referenced by index, so sharing,
/// mutation after memoization and cycles need no reference counting and dropping is flat.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64 (never meaningful for tensors).
    BigInt,
    Float(#[allow(dead_code)] f64),
    Str(Rc<str>),
    /// A bytes object (only its length is kept).
    Bytes(#[allow(dead_code)] usize),
    /// `module`, `name` from GLOBAL / STACK_GLOBAL.
    Global(Rc<str>, Rc<str>),
    Node(usize),
}

#[derive(Debug)]
enum Node {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(DictNode),
    Set,
    /// An instance of some class (TorchScript module, unknown Python object...).
    Object {
        /// BUILD state: an attribute dict for TorchScript modules.
        state: Option<Value>,
        /// Items SETITEM'd onto a dict subclass instance.
        items: Vec<(Value, Value)>,
        /// Items APPEND'ed onto a list subclass instance.
        list_items: Vec<Value>,
    },
    Storage(StorageRef),
    Tensor(TensorSpec),
    /// Something that was meant to be a tensor but cannot be decoded; an error if named.
    BadTensor(String),
}

#[derive(Debug, Default)]
struct DictNode {
    items: Vec<(Value, Value)>,
    index: HashMap<HashKey, usize>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
enum HashKey {
    Str(Rc<str>),
    Int(i64),
}

impl DictNode {
    fn insert(&mut self, k: Value, v: Value) {
        let hk = match &k {
            Value::Str(s) => Some(HashKey::Str(s.clone())),
            Value::Int(i) => Some(HashKey::Int(*i)),
            Value::Bool(b) => Some(HashKey::Int(*b as i64)),
            _ => None,
        };
        match hk {
            Some(hk) => match self.index.get(&hk) {
                Some(&i) => self.items[i].1 = v,
                None => {
                    self.index.insert(hk, self.items.len());
                    self.items.push((k, v));
                }
            },
            None => self.items.push((k, v)),
        }
    }
}

#[derive(Debug)]
struct StorageRef {
    key: String,
    dtype: RawDtype,
}

#[derive(Debug)]
struct TensorSpec {
    /// Index of a `Node::Storage`.
    storage: usize,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

// ---------------------------------------------------------------------------------------------
// Unpickler
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum PickleError {
    Opcode { opcode: u8, offset: usize },
    Malformed { offset: usize, detail: String },
}

impl PickleError {
    fn into_error(self, path: &Path, entry: &str) -> TorchArchiveError {
        match self {
            PickleError::Opcode { opcode, offset } => TorchArchiveError::UnsupportedOpcode {
                path: path.to_path_buf(),
                entry: entry.to_string(),
                opcode,
                offset,
            },
            PickleError::Malformed { offset, detail } => TorchArchiveError::Pickle {
                path: path.to_path_buf(),
                entry: entry.to_string(),
                offset,
                detail,
            },
        }
    }
}

type PResult<T> = Result<T, PickleError>;

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed (for error messages).
    op_pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    nodes: Vec<Node>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            op_pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            nodes: Vec::new(),
        }
    }

    fn err<T>(&self, detail: impl Into<String>) -> PResult<T> {
        Err(PickleError::Malformed {
            offset: self.op_pos,
            detail: detail.into(),
        })
    }

    fn take(&mut self, n: u64) -> PResult<&'a [u8]> {
        let avail = (self.data.len() - self.pos) as u64;
        if n > avail {
            return self.err(format!(
                "argument of {n} bytes runs past the end of the pickle ({avail} bytes left)"
            ));
        }
        let n = n as usize;
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> PResult<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.arr::<1>()?[0])
    }

    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn u64(&mut self) -> PResult<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("unterminated GLOBAL argument");
        };
        let s = std::str::from_utf8(&rest[..n])
            .or_else(|_| self.err("GLOBAL argument is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&mut self, n: u64) -> PResult<Value> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => self.err("string is not valid UTF-8"),
        }
    }

    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> PResult<Value> {
        if self.stack.len() <= self.base() {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().expect("checked length"))
    }

    fn top(&self) -> PResult<&Value> {
        if self.stack.len() <= self.base() {
            return self.err("stack underflow");
        }
        Ok(self.stack.last().expect("checked length"))
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        Ok(self.stack.split_off(m))
    }

    fn new_node(&mut self, n: Node) -> Value {
        self.nodes.push(n);
        Value::Node(self.nodes.len() - 1)
    }

    fn memo_get(&mut self, idx: u32) -> PResult<()> {
        match self.memo.get(&idx) {
            Some(v) => {
                let v = v.clone();
                self.push(v);
                Ok(())
            }
            None => self.err(format!("memo entry {idx} does not exist")),
        }
    }

    fn memo_put(&mut self, idx: u32) -> PResult<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    /// Runs the pickle to STOP; returns the result and the node arena.
    fn load(mut self) -> PResult<(Value, Vec<Node>)> {
        loop {
            self.op_pos = self.pos;
            if self.pos >= self.data.len() {
                return self.err("pickle ends without STOP");
            }
            let opcode = self.u8()?;
            match opcode {
                op::PROTO => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => {
                    let v = self.pop()?;
                    return Ok((v, self.nodes));
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    if self.stack.len() == self.base() && !self.marks.is_empty() {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                op::NONE => self.push(Value::None),
                op::NEWTRUE => self.push(Value::Bool(true)),
                op::NEWFALSE => self.push(Value::Bool(false)),
                op::BININT => {
                    let v = i32::from_le_bytes(self.arr()?);
                    self.push(Value::Int(v as i64));
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.arr()?);
                    self.push(Value::Int(v as i64));
                }
                op::LONG1 | op::LONG4 => {
                    let n = if opcode == op::LONG1 {
                        self.u8()? as u64
                    } else {
                        let n = i32::from_le_bytes(self.arr()?);
                        if n < 0 {
                            return self.err("negative LONG4 length");
                        }
                        n as u64
                    };
                    let b = self.take(n)?;
                    let v = if b.is_empty() {
                        Value::Int(0)
                    } else if b.len() <= 8 {
                        // little-endian two's complement, sign-extended
                        let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
                        let mut buf = [fill; 8];
                        buf[..b.len()].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(buf))
                    } else {
                        Value::BigInt
                    };
                    self.push(v);
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.arr()?);
                    self.push(Value::Float(v));
                }
                op::BINUNICODE => {
                    let n = self.u32()? as u64;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8()? as u64;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                op::BINUNICODE8 => {
                    let n = self.u64()?;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                op::BINSTRING | op::SHORT_BINSTRING => {
                    // Python 2 `str`: bytes, decoded as latin-1 like `encoding='latin1'`.
                    let n = if opcode == op::BINSTRING {
                        let n = i32::from_le_bytes(self.arr()?);
                        if n < 0 {
                            return self.err("negative BINSTRING length");
                        }
                        n as u64
                    } else {
                        self.u8()? as u64
                    };
                    let b = self.take(n)?;
                    let s: String = b.iter().map(|&c| c as char).collect();
                    self.push(Value::Str(Rc::from(s)));
                }
                op::BINBYTES | op::SHORT_BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = match opcode {
                        op::BINBYTES => self.u32()? as u64,
                        op::SHORT_BINBYTES => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    self.take(n)?;
                    self.push(Value::Bytes(n as usize));
                }
                op::EMPTY_TUPLE => {
                    let v = self.new_node(Node::Tuple(Vec::new()));
                    self.push(v);
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    let v = self.new_node(Node::Tuple(items));
                    self.push(v);
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (opcode - op::TUPLE1 + 1) as usize;
                    if self.stack.len() < self.base() + n {
                        return self.err("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let v = self.new_node(Node::Tuple(items));
                    self.push(v);
                }
                op::EMPTY_LIST => {
                    let v = self.new_node(Node::List(Vec::new()));
                    self.push(v);
                }
                op::LIST => {
                    let items = self.pop_mark()?;
                    let v = self.new_node(Node::List(items));
                    self.push(v);
                }
                op::APPEND => {
                    let item = self.pop()?;
                    self.append(vec![item])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                op::EMPTY_DICT => {
                    let v = self.new_node(Node::Dict(DictNode::default()));
                    self.push(v);
                }
                op::DICT => {
                    let items = self.pop_mark()?;
                    let d = self.make_dict(items)?;
                    let v = self.new_node(Node::Dict(d));
                    self.push(v);
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                op::EMPTY_SET => {
                    let v = self.new_node(Node::Set);
                    self.push(v);
                }
                op::ADDITEMS => {
                    self.pop_mark()?;
                    match self.top()? {
                        Value::Node(i) if matches!(self.nodes[*i], Node::Set) => {}
                        _ => return self.err("ADDITEMS target is not a set"),
                    }
                }
                op::FROZENSET => {
                    self.pop_mark()?;
                    let v = self.new_node(Node::Set);
                    self.push(v);
                }
                op::GLOBAL => {
                    let module = Rc::from(self.line()?);
                    let name = Rc::from(self.line()?);
                    self.push(Value::Global(module, name));
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n)),
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(&func, &args, 0)?;
                    self.push(v);
                }
                op::NEWOBJ => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.instantiate(&cls);
                    self.push(v);
                }
                op::NEWOBJ_EX => {
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.instantiate(&cls);
                    self.push(v);
                }
                op::BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    self.build(&target, state);
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.push(v);
                }
                op::BINPUT => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                op::MEMOIZE => {
                    let i =
                        u32::try_from(self.memo.len()).or_else(|_| self.err("memo overflow"))?;
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                op::LONG_BINGET => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                _ => {
                    return Err(PickleError::Opcode {
                        opcode,
                        offset: self.op_pos,
                    })
                }
            }
        }
    }

    fn make_dict(&self, items: Vec<Value>) -> PResult<DictNode> {
        if items.len() % 2 != 0 {
            return self.err("odd number of items for a dict");
        }
        let mut d = DictNode::default();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.insert(k, v);
        }
        Ok(d)
    }

    fn set_items(&mut self, items: Vec<Value>) -> PResult<()> {
        if items.len() % 2 != 0 {
            return self.err("odd number of items for SETITEMS");
        }
        let target = match self.top()? {
            Value::Node(i) => *i,
            _ => return self.err("SETITEM(S) target is not a dict"),
        };
        match &mut self.nodes[target] {
            Node::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.insert(k, v);
                }
            }
            Node::Object {
                items: obj_items, ..
            } => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    obj_items.push((k, v));
                }
            }
            _ => return self.err("SETITEM(S) target is not a dict"),
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> PResult<()> {
        let target = match self.top()? {
            Value::Node(i) => *i,
            _ => return self.err("APPEND(S) target is not a list"),
        };
        match &mut self.nodes[target] {
            Node::List(l) => l.extend(items),
            Node::Object { list_items, .. } => list_items.extend(items),
            _ => return self.err("APPEND(S) target is not a list"),
        }
        Ok(())
    }

    fn new_object(&mut self) -> Value {
        self.new_node(Node::Object {
            state: None,
            items: Vec::new(),
            list_items: Vec::new(),
        })
    }

    /// `cls.__new__(cls, ...)`: dict classes become dicts, everything else a generic object.
    fn instantiate(&mut self, cls: &Value) -> Value {
        if let Value::Global(module, name) = cls {
            if matches!(
                (&**module, &**name),
                ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict")
            ) {
                return self.new_node(Node::Dict(DictNode::default()));
            }
        }
        self.new_object()
    }

    /// `BUILD`: attaches `state` to an object (Python's pickler emits at most one BUILD per
    /// object; a repeated one replaces the state). States of dicts (e.g. a state dict's
    /// `_metadata`) and of tensors (metadata) are ignored.
    fn build(&mut self, target: &Value, state: Value) {
        if let Value::Node(t) = *target {
            if let Node::Object { state: slot, .. } = &mut self.nodes[t] {
                *slot = Some(state);
            }
        }
    }

    /// The items of a tuple or list value (borrowed: memoized tuples may be referenced often).
    fn tuple_ref(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Node(i) => match &self.nodes[*i] {
                Node::Tuple(items) | Node::List(items) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// Item `i` of a tuple or list value.
    fn arg(&self, v: &Value, i: usize) -> Option<Value> {
        self.tuple_ref(v).and_then(|items| items.get(i)).cloned()
    }

    /// `REDUCE`: applies the callables torch archives use; anything else becomes an object.
    fn call(&mut self, func: &Value, args: &Value, depth: usize) -> PResult<Value> {
        let Value::Global(module, name) = func else {
            return Ok(self.new_object());
        };
        let (module, name) = (&**module, &**name);
        if self.tuple_ref(args).is_none() {
            return self.err(format!(
                "REDUCE arguments for {module}.{name} are not a tuple"
            ));
        }
        let v = match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let n = match self.rebuild_tensor(args) {
                    Ok(spec) => Node::Tensor(spec),
                    Err(detail) => Node::BadTensor(format!("{module}.{name}: {detail}")),
                };
                self.new_node(n)
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state")
            | ("torch.jit._pickle", "restore_type_tag")
            | ("torch", "Size") => self.arg(args, 0).unwrap_or(Value::None),
            ("torch.jit._pickle", "build_tensor_from_id") => self.new_node(Node::BadTensor(
                "tensor-table references (torch.jit._pickle.build_tensor_from_id) are not \
                 supported"
                    .to_string(),
            )),
            ("torch.jit._pickle", n) if n.starts_with("build_") => {
                self.arg(args, 0).unwrap_or(Value::None)
            }
            ("torch._tensor", "_rebuild_from_type_v2") | ("torch._tensor", "_rebuild_from_type") => {
                // (func, new_type, args, state): the tensor is func(*args).
                match (self.arg(args, 0), self.arg(args, 2)) {
                    (Some(f), Some(a)) if depth < 8 => self.call(&f, &a, depth + 1)?,
                    _ => self.new_node(Node::BadTensor(format!("malformed {module}.{name} call"))),
                }
            }
            ("torch._utils", n) if n.starts_with("_rebuild") => self.new_node(Node::BadTensor(
                format!("{module}.{name} tensors (quantized / sparse / wrapper subclasses / ...) are not supported"),
            )),
            ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => {
                self.new_node(Node::Dict(DictNode::default()))
            }
            ("_codecs", "encode") => match self.arg(args, 0) {
                Some(Value::Str(s)) => Value::Bytes(s.chars().count()),
                _ => Value::None,
            },
            _ => self.new_object(),
        };
        Ok(v)
    }

    fn rebuild_tensor(&self, args: &Value) -> Result<TensorSpec, String> {
        let items = self.tuple_ref(args).unwrap_or(&[]);
        if items.len() < 4 {
            return Err(format!(
                "expected at least 4 arguments, got {}",
                items.len()
            ));
        }
        let storage = match &items[0] {
            Value::Node(i) => match &self.nodes[*i] {
                Node::Storage(_) => *i,
                Node::BadTensor(d) => return Err(d.clone()),
                other => {
                    return Err(format!(
                        "first argument is not a storage but {}",
                        node_kind(other)
                    ))
                }
            },
            other => return Err(format!("first argument is not a storage but {other:?}")),
        };
        let offset = match items[1] {
            Value::Int(o) if usize::try_from(o).is_ok() => o as usize,
            ref other => return Err(format!("bad storage offset {other:?}")),
        };
        let ints = |v: &Value, what: &str| -> Result<Vec<usize>, String> {
            let list = self
                .tuple_ref(v)
                .ok_or_else(|| format!("{what} is not a tuple"))?;
            if list.len() > MAX_NDIM {
                return Err(format!(
                    "{what} has {} dimensions (at most {MAX_NDIM})",
                    list.len()
                ));
            }
            list.iter()
                .map(|x| match x {
                    Value::Int(i) if *i >= 0 && (*i as u64) <= usize::MAX as u64 => Ok(*i as usize),
                    other => Err(format!("bad {what} entry {other:?}")),
                })
                .collect()
        };
        let size = ints(&items[2], "size")?;
        let stride = ints(&items[3], "stride")?;
        if size.len() != stride.len() {
            return Err(format!(
                "size {size:?} and stride {stride:?} differ in length"
            ));
        }
        Ok(TensorSpec {
            storage,
            offset,
            size,
            stride,
        })
    }

    /// `BINPERSID`: `('storage', torch.<Type>Storage, key, location, numel)` → storage node.
    fn persistent_load(&mut self, pid: &Value) -> PResult<Value> {
        let Some(items) = self.tuple_ref(pid) else {
            return self.err("persistent id is not a tuple");
        };
        match items.first() {
            Some(Value::Str(s)) if &**s == "storage" => {}
            other => return self.err(format!("unsupported persistent id kind {other:?}")),
        }
        if items.len() < 3 {
            return self.err("storage persistent id has fewer than 3 fields");
        }
        let key = match &items[2] {
            Value::Str(s) if s.len() <= 256 => s.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Str(s) => return self.err(format!("storage key of {} bytes", s.len())),
            other => return self.err(format!("bad storage key {other:?}")),
        };
        let node = match &items[1] {
            Value::Global(module, name) => match RawDtype::from_storage_class(name) {
                Some(dtype) => Node::Storage(StorageRef { key, dtype }),
                None => Node::BadTensor(format!("unsupported storage type {module}.{name}")),
            },
            other => Node::BadTensor(format!("storage type is not a class but {other:?}")),
        };
        Ok(self.new_node(node))
    }
}

fn node_kind(n: &Node) -> &'static str {
    match n {
        Node::Tuple(_) => "a tuple",
        Node::List(_) => "a list",
        Node::Dict(_) => "a dict",
        Node::Set => "a set",
        Node::Object { .. } => "an object",
        Node::Storage(_) => "a storage",
        Node::Tensor(_) => "a tensor",
        Node::BadTensor(_) => "an unsupported tensor",
    }
}

// ---------------------------------------------------------------------------------------------
// Naming walk
// ---------------------------------------------------------------------------------------------

enum WalkError {
    Tensor { name: String, detail: String },
    Graph(String),
}

struct Walker<'n> {
    nodes: &'n [Node],
    /// Nodes on the current path (cycle guard).
    on_path: Vec<bool>,
    visits: usize,
    /// Total length of the names in `found`.
    name_bytes: usize,
    /// (dotted name, tensor node index)
    found: Vec<(String, usize)>,
}

fn join(prefix: &str, key: &str) -> Result<String, WalkError> {
    if prefix.len() + key.len() >= MAX_NAME_LEN {
        let head: String = prefix.chars().take(80).collect();
        return Err(WalkError::Graph(format!(
            "tensor name longer than {MAX_NAME_LEN} bytes ('{head}...')"
        )));
    }
    Ok(if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    })
}

fn key_name(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        Value::Bool(b) => Some(if *b { "True" } else { "False" }.to_string()),
        _ => None,
    }
}

impl Walker<'_> {
    fn walk(&mut self, v: &Value, name: String, depth: usize) -> Result<(), WalkError> {
        let Value::Node(i) = *v else { return Ok(()) };
        self.visits += 1;
        if self.visits > MAX_VISITS {
            return Err(WalkError::Graph(format!(
                "object graph too large to name (more than {MAX_VISITS} visits; excessive sharing?)"
            )));
        }
        if depth > MAX_DEPTH {
            return Err(WalkError::Graph(format!(
                "objects nested deeper than {MAX_DEPTH} levels at '{name}'"
            )));
        }
        if self.on_path[i] {
            return Ok(()); // a cycle: already being named further up
        }
        let nodes = self.nodes;
        match &nodes[i] {
            Node::Tensor(_) => {
                self.name_bytes += name.len();
                if self.name_bytes > MAX_NAME_BYTES {
                    return Err(WalkError::Graph(format!(
                        "tensor names exceed {MAX_NAME_BYTES} bytes in total (excessive aliasing?)"
                    )));
                }
                self.found.push((name, i));
                return Ok(());
            }
            Node::BadTensor(detail) => {
                return Err(WalkError::Tensor {
                    name,
                    detail: detail.clone(),
                })
            }
            Node::Storage(_) | Node::Set => return Ok(()),
            _ => {}
        }
        self.on_path[i] = true;
        let result = (|| {
            match &nodes[i] {
                Node::Tuple(items) | Node::List(items) => {
                    for (j, item) in items.iter().enumerate() {
                        self.walk(item, join(&name, &j.to_string())?, depth + 1)?;
                    }
                }
                Node::Dict(d) => {
                    for (k, item) in &d.items {
                        if let Some(k) = key_name(k) {
                            self.walk(item, join(&name, &k)?, depth + 1)?;
                        }
                    }
                }
                Node::Object {
                    state,
                    items,
                    list_items,
                } => {
                    if let Some(state) = state {
                        // An attribute dict names its entries directly below the object.
                        self.walk(state, name.clone(), depth + 1)?;
                    }
                    for (k, item) in items {
                        if let Some(k) = key_name(k) {
                            self.walk(item, join(&name, &k)?, depth + 1)?;
                        }
                    }
                    for (j, item) in list_items.iter().enumerate() {
                        self.walk(item, join(&name, &j.to_string())?, depth + 1)?;
                    }
                }
                _ => {}
            }
            Ok(())
        })();
        self.on_path[i] = false;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

    fn fixture(rel: &str) -> PathBuf {
        Path::new(FIXTURES).join(rel)
    }

    fn archive_case(case: &str) -> PathBuf {
        fixture(&format!("torch_archive/{case}.pt"))
    }

    /// A fresh directory under the system temp dir, removed on drop (no tempfile crate here).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "torch_archive_test_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn zip_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
        let mut z = zip::ZipArchive::new(File::open(path).unwrap()).unwrap();
        (0..z.len())
            .map(|i| {
                let mut f = z.by_index(i).unwrap();
                let mut buf = Vec::new();
                f.read_to_end(&mut buf).unwrap();
                (f.name().to_string(), buf)
            })
            .collect()
    }

    fn make_zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            w.start_file(name.as_str(), opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn read_mem(bytes: Vec<u8>) -> Result<Vec<(String, RawTensor)>, TorchArchiveError> {
        let path = Path::new("in-memory.pt");
        let len = bytes.len() as u64;
        let zip =
            zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| TorchArchiveError::NotZip {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        read_zip(path, zip, len)
    }

    /// Copy of a fixture archive with each entry passed through `edit` (None drops it).
    fn edited(case: &str, mut edit: impl FnMut(&str, Vec<u8>) -> Option<Vec<u8>>) -> Vec<u8> {
        let entries: Vec<_> = zip_entries(&archive_case(case))
            .into_iter()
            .filter_map(|(n, d)| edit(&n, d).map(|d| (n, d)))
            .collect();
        make_zip(&entries)
    }

    fn f32_bits_eq(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    fn check_against_expected(case: &str) {
        let path = archive_case(case);
        let got = read_torch_archive(&path).unwrap_or_else(|e| panic!("{case}: {e}"));
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture(&format!("torch_archive/{case}.expected.json"))).unwrap(),
        )
        .unwrap();
        let expected = json["tensors"].as_object().unwrap();
        let got_names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        let mut want_names: Vec<&str> = expected.keys().map(String::as_str).collect();
        want_names.sort();
        assert_eq!(got_names, want_names, "{case}: tensor names");
        for (name, t) in &got {
            let e = &expected[name];
            assert_eq!(
                format!("{:?}", t.dtype),
                e["dtype"].as_str().unwrap(),
                "{case}/{name} dtype"
            );
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.shape, shape, "{case}/{name} shape");
            assert_eq!(
                t.data.len(),
                t.numel() * t.dtype.element_size(),
                "{case}/{name} bytes"
            );
            let values = e["values"].as_array().unwrap();
            assert_eq!(values.len(), t.numel(), "{case}/{name} numel");
            match t.dtype {
                RawDtype::F64 => {
                    let raw: Vec<f64> = t
                        .data
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    let want: Vec<f64> = values.iter().map(|v| v.as_f64().unwrap()).collect();
                    assert_eq!(raw, want, "{case}/{name} values");
                }
                d if d.is_float() => {
                    let want: Vec<f32> =
                        values.iter().map(|v| v.as_f64().unwrap() as f32).collect();
                    let got = t.to_f32_vec().unwrap();
                    assert!(
                        f32_bits_eq(&got, &want),
                        "{case}/{name}: {got:?} != {want:?}"
                    );
                }
                RawDtype::Bool => {
                    let want: Vec<u8> = values.iter().map(|v| v.as_bool().unwrap() as u8).collect();
                    assert_eq!(t.data, want, "{case}/{name} values");
                }
                d => {
                    let esize = d.element_size();
                    let raw: Vec<i64> = t
                        .data
                        .chunks_exact(esize)
                        .map(|c| match d {
                            RawDtype::I64 => i64::from_le_bytes(c.try_into().unwrap()),
                            RawDtype::I32 => i32::from_le_bytes(c.try_into().unwrap()) as i64,
                            RawDtype::I16 => i16::from_le_bytes(c.try_into().unwrap()) as i64,
                            RawDtype::I8 => c[0] as i8 as i64,
                            RawDtype::U8 => c[0] as i64,
                            _ => unreachable!(),
                        })
                        .collect();
                    let want: Vec<i64> = values.iter().map(|v| v.as_i64().unwrap()).collect();
                    assert_eq!(raw, want, "{case}/{name} values");
                }
            }
        }
    }

    #[test]
    fn state_dict_all_dtypes_views_and_sharing() {
        check_against_expected("state_dict");
    }

    #[test]
    fn state_dict_pickle_protocol_4() {
        check_against_expected("state_dict_p4");
    }

    #[test]
    fn nested_checkpoint_dict_is_flattened() {
        check_against_expected("nested");
        let names: Vec<String> = read_torch_archive(&archive_case("nested"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(
            names.contains(&"state_dict.conv.weight".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"history.1".to_string()), "{names:?}");
    }

    #[test]
    fn module_state_dict_with_metadata() {
        check_against_expected("module_state");
    }

    #[test]
    fn scripted_module_params_buffers_and_attributes() {
        check_against_expected("scripted");
        let got = read_torch_archive(&archive_case("scripted")).unwrap();
        let get = |n: &str| {
            &got.iter()
                .find(|(k, _)| k == n)
                .unwrap_or_else(|| panic!("{n}"))
                .1
        };
        assert_eq!(get("bn1.num_batches_tracked").dtype, RawDtype::I64);
        assert_eq!(
            get("bn1.num_batches_tracked").to_f32_vec().unwrap(),
            vec![17.0]
        );
        assert_eq!(get("bn1.running_var").shape, vec![2]);
        assert_eq!(get("layers.1.weight").shape, vec![2, 2]);
        assert_eq!(get("logit_scale").shape, Vec::<usize>::new());
        assert_eq!(get("half_proj").dtype, RawDtype::F16);
    }

    #[test]
    fn traced_fp16_module() {
        check_against_expected("traced_fp16");
        let got = read_torch_archive(&archive_case("traced_fp16")).unwrap();
        for (name, t) in &got {
            let want = if name.ends_with("num_batches_tracked") {
                RawDtype::I64
            } else {
                RawDtype::F16
            };
            assert_eq!(t.dtype, want, "{name}");
        }
    }

    /// Checks a tiny OpenAI-style CLIP (`clip.model.build_model` + `convert_weights`, traced and
    /// `torch.jit.save`d by scripts/make-fixtures). `f16` must be F16; the integer buffers
    /// (`num_batches_tracked`, `input_resolution`, `context_length`, `vocab_size`) must be I64;
    /// every other tensor is F16 or F32 (convert_weights leaves norms and embeddings in F32).
    /// Bit-exactness of all tensors against torch's own reading was checked when this test was
    /// written; here the names, dtypes and a few values are checked.
    fn check_openai_clip(rel: &str, min_count: usize, must_have: &[&str], f16: &[&str]) {
        let path = fixture(rel);
        if !path.exists() {
            eprintln!(
                "skipping: {} not generated (scripts/make-fixtures)",
                path.display()
            );
            return;
        }
        let got = read_torch_archive(&path).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.len() >= min_count,
            "{rel}: only {} tensors: {names:?}",
            names.len()
        );
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
        for n in must_have.iter().chain(f16) {
            assert!(names.contains(n), "{rel}: missing {n} in {names:?}");
        }
        const INT_BUFFERS: [&str; 4] = [
            "num_batches_tracked",
            "input_resolution",
            "context_length",
            "vocab_size",
        ];
        for (name, t) in &got {
            assert_eq!(
                t.data.len(),
                t.numel() * t.dtype.element_size(),
                "{rel}: {name}"
            );
            if INT_BUFFERS.iter().any(|b| name.ends_with(b)) {
                assert_eq!(t.dtype, RawDtype::I64, "{rel}: {name}");
                assert!(t.shape.is_empty(), "{rel}: {name}");
            } else if f16.contains(&name.as_str()) {
                assert_eq!(t.dtype, RawDtype::F16, "{rel}: {name}");
            } else {
                assert!(
                    matches!(t.dtype, RawDtype::F16 | RawDtype::F32),
                    "{rel}: {name}"
                );
            }
            let v = t.to_f32_vec().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{rel}: {name}");
            if name.ends_with("running_var") {
                assert!(v.iter().all(|&x| x > 0.0), "{rel}: {name}");
            }
        }
        let get = |n: &str| &got.iter().find(|(k, _)| k == n).unwrap().1;
        assert_eq!(get("context_length").to_f32_vec().unwrap(), [77.0]);
        assert_eq!(get("logit_scale").shape, Vec::<usize>::new());
        assert_eq!(get("positional_embedding").shape[0], 77);
    }

    #[test]
    fn openai_clip_vit_fixture() {
        check_openai_clip(
            "clip/vit_tiny/openai.pt",
            65,
            &[
                "visual.class_embedding",
                "visual.positional_embedding",
                "visual.ln_pre.weight",
                "positional_embedding",
                "token_embedding.weight",
                "ln_final.bias",
                "logit_scale",
                "input_resolution",
                "vocab_size",
            ],
            &[
                "visual.conv1.weight",
                "visual.proj",
                "visual.transformer.resblocks.1.attn.out_proj.weight",
                "transformer.resblocks.0.attn.in_proj_weight",
                "transformer.resblocks.0.attn.in_proj_bias",
                "transformer.resblocks.1.mlp.c_fc.weight",
                "transformer.resblocks.1.mlp.c_proj.bias",
                "text_projection",
            ],
        );
    }

    #[test]
    fn openai_clip_resnet_fixture() {
        check_openai_clip(
            "clip/rn_tiny/openai.pt",
            156,
            &[
                "visual.bn1.weight",
                "visual.bn1.running_mean",
                "visual.bn1.running_var",
                "visual.bn1.num_batches_tracked",
                "visual.layer1.0.downsample.1.running_mean",
                "visual.layer4.0.bn3.running_var",
                "visual.attnpool.positional_embedding",
                "logit_scale",
            ],
            &[
                "visual.conv1.weight",
                "visual.layer1.0.downsample.0.weight",
                "visual.attnpool.q_proj.weight",
                "visual.attnpool.c_proj.bias",
                "transformer.resblocks.0.attn.in_proj_weight",
                "text_projection",
            ],
        );
    }

    fn expect_err(path: &Path) -> String {
        match read_torch_archive(path) {
            Ok(t) => panic!(
                "{}: expected an error, read {} tensors",
                path.display(),
                t.len()
            ),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&path.display().to_string()),
                    "message must name the file: {msg}"
                );
                msg
            }
        }
    }

    #[test]
    fn legacy_non_zip_format_is_rejected() {
        let msg = expect_err(&archive_case("legacy"));
        assert!(
            msg.contains("not a zip archive") && msg.contains("legacy"),
            "{msg}"
        );
    }

    #[test]
    fn non_zip_empty_and_missing_files_are_rejected() {
        let tmp = TempDir::new();
        let text = tmp.path("text.pt");
        std::fs::write(&text, "hello, I am not a zip\n").unwrap();
        assert!(expect_err(&text).contains("not a zip archive"));
        let empty = tmp.path("empty.pt");
        std::fs::write(&empty, b"").unwrap();
        assert!(expect_err(&empty).contains("empty"));
        let json = fixture("torch_archive/state_dict.expected.json");
        assert!(expect_err(&json).contains("not a zip archive"));
        let missing = tmp.path("does-not-exist.pt");
        assert!(matches!(
            read_torch_archive(&missing),
            Err(TorchArchiveError::Io { .. })
        ));
        expect_err(&missing);
        // A zip without data.pkl.
        let other = tmp.path("other.zip");
        std::fs::write(
            &other,
            make_zip(&[("a/readme.txt".to_string(), b"hi".to_vec())]),
        )
        .unwrap();
        assert!(expect_err(&other).contains("no 'data.pkl'"));
    }

    #[test]
    fn truncated_archives_are_rejected() {
        let tmp = TempDir::new();
        for case in ["state_dict", "scripted"] {
            let bytes = std::fs::read(archive_case(case)).unwrap();
            let n = bytes.len();
            let mut cuts: Vec<usize> = (0..n).step_by(97).collect();
            cuts.extend([1, 2, 3, 4, 22, n / 2, n - 1, n - 22, n - 23]);
            for cut in cuts {
                let p = tmp.path("truncated.pt");
                std::fs::write(&p, &bytes[..cut]).unwrap();
                expect_err(&p);
                std::fs::remove_file(&p).unwrap();
            }
        }
    }

    #[test]
    fn corrupt_bytes_never_panic() {
        // Flip bytes across the whole file: every result is an Ok or an error naming the file.
        let tmp = TempDir::new();
        let bytes = std::fs::read(archive_case("scripted")).unwrap();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let p = tmp.path("corrupt.pt");
        for _ in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                b[i] ^= 1 + (next() % 255) as u8;
            }
            std::fs::write(&p, &b).unwrap();
            if let Err(e) = read_torch_archive(&p) {
                assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            }
        }
        // Corrupting a storage's bytes is caught by the zip CRC check.
        let entries = zip_entries(&archive_case("state_dict"));
        let mut b = make_zip(&entries);
        let needle = &entries
            .iter()
            .find(|(n, _)| n.ends_with("/data/0"))
            .unwrap()
            .1;
        let pos = b
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .unwrap();
        b[pos] ^= 0xff;
        let msg = read_mem(b).unwrap_err().to_string();
        assert!(
            msg.contains("cannot read zip entry 'state_dict/data/0'"),
            "{msg}"
        );
    }

    #[test]
    fn mutated_pickles_never_panic() {
        for case in [
            "state_dict",
            "state_dict_p4",
            "nested",
            "module_state",
            "scripted",
            "traced_fp16",
        ] {
            let entries = zip_entries(&archive_case(case));
            let pkl = entries
                .iter()
                .find(|(n, _)| n.ends_with("/data.pkl"))
                .unwrap()
                .1
                .clone();
            // Every truncation.
            for cut in 0..pkl.len() {
                assert!(
                    Unpickler::new(&pkl[..cut]).load().is_err(),
                    "{case}: truncated at {cut}"
                );
            }
            // Random byte flips, through the whole reader (pickle, walk, storage copy).
            let mut seed = 0x2545f4914f6cdd1du64 ^ pkl.len() as u64;
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            // TORCH_ARCHIVE_FUZZ_ITERS=100000 for a longer run.
            let iters = std::env::var("TORCH_ARCHIVE_FUZZ_ITERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(200);
            for _ in 0..iters {
                let mut p = pkl.clone();
                for _ in 0..1 + next() % 3 {
                    let i = (next() % p.len() as u64) as usize;
                    p[i] = (next() % 256) as u8;
                }
                let bytes = edited(case, |n, d| {
                    Some(if n.ends_with("/data.pkl") {
                        p.clone()
                    } else {
                        d
                    })
                });
                let _ = read_mem(bytes);
            }
        }
    }

    #[test]
    fn mutated_clip_pickles_never_panic() {
        for rel in ["clip/vit_tiny/openai.pt", "clip/rn_tiny/openai.pt"] {
            let path = fixture(rel);
            if !path.exists() {
                eprintln!("skipping: {} not generated", path.display());
                continue;
            }
            let pkl = zip_entries(&path)
                .into_iter()
                .find(|(n, _)| n.ends_with("/data.pkl"))
                .unwrap()
                .1;
            let mut seed = 0x853c49e6748fea9bu64;
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for _ in 0..500 {
                let mut p = pkl.clone();
                for _ in 0..1 + next() % 3 {
                    let i = (next() % p.len() as u64) as usize;
                    p[i] = (next() % 256) as u8;
                }
                if next() % 4 == 0 {
                    p.truncate((next() % p.len() as u64) as usize);
                }
                if let Ok((root, nodes)) = Unpickler::new(&p).load() {
                    let mut w = Walker {
                        nodes: &nodes,
                        on_path: vec![false; nodes.len()],
                        visits: 0,
                        name_bytes: 0,
                        found: Vec::new(),
                    };
                    let _ = w.walk(&root, String::new(), 0);
                }
            }
        }
    }

    #[test]
    fn missing_storage_is_reported() {
        let bytes = edited("state_dict", |n, d| (!n.ends_with("/data/3")).then_some(d));
        let msg = read_mem(bytes).unwrap_err().to_string();
        assert!(
            msg.contains("in-memory.pt: storage 'state_dict/data/3' is missing"),
            "{msg}"
        );
    }

    #[test]
    fn short_storage_is_reported() {
        let bytes = edited("scripted", |n, mut d| {
            if n.ends_with("/data/4") {
                d.truncate(d.len() / 2);
            }
            Some(d)
        });
        let msg = read_mem(bytes).unwrap_err().to_string();
        // conv1.weight: 2x1x3x3 f32 = 72 bytes.
        assert!(
            msg.contains("tensor 'conv1.weight' needs 72 bytes, storage 'scripted/data/4' has 36"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_opcode_is_reported() {
        let bytes = make_zip(&[("archive/data.pkl".to_string(), b"\x80\x02N\xff.".to_vec())]);
        let msg = read_mem(bytes).unwrap_err().to_string();
        assert!(
            msg.contains("unsupported pickle opcode 0xff at byte 3 in archive/data.pkl"),
            "{msg}"
        );
    }

    /// Builds a protocol-2 pickle by hand.
    struct P(Vec<u8>);
    impl P {
        fn op(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
        fn s(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn int(&mut self, i: i32) -> &mut Self {
            self.0.push(b'J');
            self.0.extend_from_slice(&i.to_le_bytes());
            self
        }
        fn global(&mut self, m: &str, n: &str) -> &mut Self {
            self.op(format!("c{m}\n{n}\n").as_bytes())
        }
        /// `_rebuild_tensor_v2(storage(key, FloatStorage), offset, size, stride, False, OrderedDict())`
        fn tensor(&mut self, key: &str, offset: i32, size: &[i32], stride: &[i32]) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
            self.op(b"(")
                .s("storage")
                .global("torch", "FloatStorage")
                .s(key)
                .s("cpu")
                .int(4)
                .op(b"tQ");
            self.int(offset).op(b"(");
            for &d in size {
                self.int(d);
            }
            self.op(b"t(");
            for &d in stride {
                self.int(d);
            }
            self.op(b"t\x89")
                .global("collections", "OrderedDict")
                .op(b")Rt")
                .op(b"R")
        }
    }

    fn storage_0123() -> Vec<u8> {
        [0.0f32, 1.0, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    #[test]
    fn cyclic_and_shared_references_terminate() {
        // d = {'t': tensor, 'self': d, 'l': l} with l = [l, tensor]  (memoized + re-fetched)
        let mut p = P(b"\x80\x02}q\x00(".to_vec());
        p.s("t").tensor("0", 1, &[2], &[2]).op(b"q\x01");
        p.s("self").op(b"h\x00");
        p.s("l").op(b"]q\x02(h\x02h\x01eu.");
        let bytes = make_zip(&[
            ("x/data.pkl".to_string(), p.0.clone()),
            ("x/data/0".to_string(), storage_0123()),
        ]);
        let got = read_mem(bytes).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["l.1", "t"]);
        for (_, t) in &got {
            assert_eq!(t.to_f32_vec().unwrap(), vec![1.0, 3.0]);
        }
    }

    #[test]
    fn setstate_tuples_and_unknown_objects() {
        // An unknown class built by REDUCE whose BUILD state is a tuple holding a tensor, and an
        // object whose state is a dict. Non-tensor junk (floats, bytes, sets) is ignored.
        let mut p = P(b"\x80\x02}(".to_vec());
        p.s("packed").global("__torch__.Foo", "Bar").op(b")R(");
        p.tensor("0", 0, &[2, 2], &[1, 2])
            .op(b"G\x3f\xf0\x00\x00\x00\x00\x00\x00C\x02hi\x8f")
            .op(b"tb");
        p.s("obj")
            .global("argparse", "Namespace")
            .op(b")\x81}(")
            .s("w")
            .tensor("0", 3, &[], &[])
            .op(b"ub");
        p.op(b"u.");
        let bytes = make_zip(&[
            ("x/data.pkl".to_string(), p.0.clone()),
            ("x/data/0".to_string(), storage_0123()),
        ]);
        let got = read_mem(bytes).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["obj.w", "packed.0"]);
        assert_eq!(got[0].1.shape, Vec::<usize>::new());
        assert_eq!(got[0].1.to_f32_vec().unwrap(), vec![3.0]);
        assert_eq!(got[1].1.to_f32_vec().unwrap(), vec![0.0, 2.0, 1.0, 3.0]);
    }

    #[test]
    fn rebuild_from_type_v2_and_parameter_wrappers() {
        // {'sub': _rebuild_from_type_v2(_rebuild_tensor_v2, my.Sub, (storage, 0, (2,), (1,), ...), {}),
        //  'p': _rebuild_parameter(_rebuild_from_type_v2(...), True, OrderedDict())}
        let mut p = P(b"\x80\x02}(".to_vec());
        for (key, offset) in [("sub", 0), ("p", 2)] {
            p.s(key);
            if key == "p" {
                p.global("torch._utils", "_rebuild_parameter").op(b"(");
            }
            p.global("torch._tensor", "_rebuild_from_type_v2").op(b"(");
            p.global("torch._utils", "_rebuild_tensor_v2")
                .global("my", "Sub")
                .op(b"((");
            p.s("storage")
                .global("torch", "FloatStorage")
                .s("0")
                .s("cpu")
                .int(4)
                .op(b"tQ");
            p.int(offset)
                .int(2)
                .op(b"\x85")
                .int(1)
                .op(b"\x85\x89")
                .global("collections", "OrderedDict");
            p.op(b")Rt}tR");
            if key == "p" {
                p.op(b"\x88")
                    .global("collections", "OrderedDict")
                    .op(b")RtR");
            }
        }
        p.op(b"u.");
        let bytes = make_zip(&[
            ("x/data.pkl".to_string(), p.0.clone()),
            ("x/data/0".to_string(), storage_0123()),
        ]);
        let got = read_mem(bytes).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["p", "sub"]);
        assert_eq!(got[0].1.to_f32_vec().unwrap(), [2.0, 3.0]);
        assert_eq!(got[1].1.to_f32_vec().unwrap(), [0.0, 1.0]);
    }

    #[test]
    fn bad_tensor_descriptions_are_errors() {
        type Build = Box<dyn Fn(&mut P)>;
        let cases: [(&str, Build); 8] = [
            (
                "unsupported storage type torch.ComplexFloatStorage",
                Box::new(|p: &mut P| {
                    p.global("torch._utils", "_rebuild_tensor_v2")
                        .op(b"((")
                        .s("storage");
                    p.global("torch", "ComplexFloatStorage")
                        .s("0")
                        .s("cpu")
                        .int(2)
                        .op(b"tQ");
                    p.int(0).op(b"(J\x02\x00\x00\x00t(J\x01\x00\x00\x00t\x89tR");
                }),
            ),
            (
                "bad size entry",
                Box::new(|p: &mut P| {
                    p.tensor("0", 0, &[-1], &[1]);
                }),
            ),
            (
                "overflow",
                Box::new(|p: &mut P| {
                    let big = i32::MAX;
                    p.tensor(
                        "0",
                        0,
                        &[big, big, big, big, big],
                        &[big, big, big, big, big],
                    );
                }),
            ),
            (
                "overflow",
                Box::new(|p: &mut P| {
                    // numel overflows u128 only through many dimensions
                    p.tensor("0", 0, &[i32::MAX; 20], &[1; 20]);
                }),
            ),
            (
                "needs 8589934596 bytes",
                Box::new(|p: &mut P| {
                    p.tensor("0", 0, &[2, 2], &[i32::MAX, 1]);
                }),
            ),
            (
                "build_tensor_from_id",
                Box::new(|p: &mut P| {
                    p.global("torch.jit._pickle", "build_tensor_from_id")
                        .int(0)
                        .op(b"\x85R");
                }),
            ),
            (
                "_rebuild_qtensor",
                Box::new(|p: &mut P| {
                    p.global("torch._utils", "_rebuild_qtensor").op(b")R");
                }),
            ),
            (
                "needs 20 bytes, storage 'x/data/0' has 16",
                Box::new(|p: &mut P| {
                    p.tensor("0", 1, &[2, 2], &[2, 1]);
                }),
            ),
        ];
        for (want, build) in cases {
            let mut p = P(b"\x80\x02}(".to_vec());
            p.s("w");
            build(&mut p);
            p.op(b"u.");
            let bytes = make_zip(&[
                ("x/data.pkl".to_string(), p.0.clone()),
                ("x/data/0".to_string(), storage_0123()),
            ]);
            let msg = read_mem(bytes).unwrap_err().to_string();
            assert!(
                msg.contains(want) && msg.contains("'w'"),
                "want {want:?} in {msg}"
            );
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        // 100k nested 1-tuples around a tensor: walking stops at MAX_DEPTH with an error.
        let mut p = P(b"\x80\x02".to_vec());
        p.tensor("0", 0, &[1], &[1]);
        for _ in 0..100_000 {
            p.op(b"\x85");
        }
        p.op(b".");
        let bytes = make_zip(&[
            ("x/data.pkl".to_string(), p.0.clone()),
            ("x/data/0".to_string(), storage_0123()),
        ]);
        let msg = read_mem(bytes).unwrap_err().to_string();
        assert!(msg.contains("nested deeper"), "{msg}");
    }

    /// A zip holding `pickle` as `x/data.pkl` and a 4-float storage `x/data/0`.
    fn zip_with_pickle(pickle: &[u8]) -> Vec<u8> {
        make_zip(&[
            ("x/data.pkl".to_string(), pickle.to_vec()),
            ("x/data/0".to_string(), storage_0123()),
        ])
    }

    #[test]
    fn aliasing_amplification_is_refused() {
        // {'k'*4000: [t, t, t, ... 100k times]}: ~200 KB of pickle, ~400 MB of names.
        let mut p = P(b"\x80\x02}(".to_vec());
        p.s(&"k".repeat(4000)).op(b"](");
        p.tensor("0", 0, &[1], &[1]).op(b"q\x00");
        for _ in 0..100_000 {
            p.op(b"h\x00");
        }
        p.op(b"eu.");
        let msg = read_mem(zip_with_pickle(&p.0)).unwrap_err().to_string();
        assert!(msg.contains("tensor names exceed"), "{msg}");

        // A name over MAX_NAME_LEN.
        let mut p = P(b"\x80\x02}(".to_vec());
        p.s(&"k".repeat(MAX_NAME_LEN))
            .tensor("0", 0, &[1], &[1])
            .op(b"u.");
        let msg = read_mem(zip_with_pickle(&p.0)).unwrap_err().to_string();
        assert!(msg.contains("tensor name longer than"), "{msg}");
    }

    #[test]
    fn memo_reuse_of_big_values_is_cheap() {
        // A 200k-item tuple and a 100 KB string, each memoized once and then reused 200k times
        // as REDUCE arguments, persistent ids and STACK_GLOBAL names: must stay linear.
        let mut p = P(b"\x80\x02(".to_vec());
        p.s("storage")
            .global("torch", "FloatStorage")
            .s("0")
            .s("cpu")
            .int(4);
        for _ in 0..200_000 {
            p.op(b"K\x01");
        }
        p.op(b"tq\x00"); // memo 0: big tuple, also a valid persistent id
        p.s(&"m".repeat(100_000)).op(b"q\x01"); // memo 1: big string
        p.global("some", "func").op(b"q\x02"); // memo 2
        for _ in 0..200_000 {
            p.op(b"h\x02h\x00R0"); // some.func(*big) ; POP
            p.op(b"h\x00Q0"); // persistent_load(big) ; POP
            p.op(b"h\x01h\x01\x930"); // STACK_GLOBAL(big, big) ; POP
            p.op(b"c_codecs\nencode\nh\x01\x85R0"); // _codecs.encode(big) ; POP
        }
        p.op(b"N.");
        let start = std::time::Instant::now();
        let got = read_mem(zip_with_pickle(&p.0)).unwrap();
        assert!(got.is_empty());
        assert!(start.elapsed().as_secs() < 60, "took {:?}", start.elapsed());
    }

    #[test]
    fn to_f32_vec_conversions() {
        let t = |dtype, data: Vec<u8>| RawTensor {
            dtype,
            shape: vec![2],
            data,
        };
        let f16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(t(RawDtype::F16, f16).to_f32_vec().unwrap(), [1.5, -2.0]);
        assert_eq!(t(RawDtype::BF16, bf16).to_f32_vec().unwrap(), [1.5, -2.0]);
        assert_eq!(
            t(RawDtype::I8, vec![0xff, 3]).to_f32_vec().unwrap(),
            [-1.0, 3.0]
        );
        assert_eq!(
            t(RawDtype::U8, vec![0xff, 3]).to_f32_vec().unwrap(),
            [255.0, 3.0]
        );
        assert_eq!(
            t(RawDtype::Bool, vec![0, 1]).to_f32_vec().unwrap(),
            [0.0, 1.0]
        );
        assert_eq!(
            t(RawDtype::I16, vec![0xff, 0xff, 2, 0])
                .to_f32_vec()
                .unwrap(),
            [-1.0, 2.0]
        );
        let err = t(RawDtype::F32, vec![0; 7])
            .to_f32_vec()
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 8 bytes"), "{err}");
        let scalar = RawTensor {
            dtype: RawDtype::F64,
            shape: vec![],
            data: 2.5f64.to_le_bytes().to_vec(),
        };
        assert_eq!(scalar.numel(), 1);
        assert_eq!(scalar.to_f32_vec().unwrap(), [2.5]);
    }
}
