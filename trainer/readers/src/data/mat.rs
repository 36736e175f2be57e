//! A small reader and writer for MATLAB Level 5 MAT-files (the format of `save -v6`/`-v7`),
//! enough for AIGCIQA2023's `DATA/MOS/mosz*.mat`: real numeric matrices, plain or zlib-compressed.
//!
//! Layout (MathWorks, "MAT-File Format", R2024): a 128-byte header (116 bytes of text, 8 bytes of
//! subsystem offset, a 2-byte version 0x0100 and the endian indicator `MI` written as a 16-bit
//! integer, so `IM` on disk means little-endian), then data elements. Each element is an 8-byte tag
//! (type, byte count) — or a 4-byte "small data element" tag when the data fits in 4 bytes — and its
//! data padded to 8 bytes. A variable is an `miMATRIX` element (array flags, dimensions, name, real
//! part, imaginary part) or an `miCOMPRESSED` element holding one zlib-compressed `miMATRIX`.
//! MATLAB stores doubles in the smallest integer type that holds them exactly, so every numeric
//! storage type is widened to `f64` here. Values are column-major, as MATLAB keeps them.
//!
//! `-v7.3` files are HDF5 and are rejected with an instruction to re-save them.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Why a MAT-file could not be read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum MatError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: saved with -v7.3 (HDF5), which is not supported; re-save it in MATLAB with `save(file, '-v7')`")]
    V73 { path: PathBuf },
    #[error("{path}: not a MATLAB Level 5 MAT-file ({reason})")]
    NotMat { path: PathBuf, reason: String },
    #[error("{path}: corrupt MAT-file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: variable `{variable}` is {what}, which is not supported (only real numeric matrices are)")]
    Unsupported {
        path: PathBuf,
        variable: String,
        what: String,
    },
    #[error("{path}: no variable `{variable}` (variables in the file: {available})")]
    MissingVariable {
        path: PathBuf,
        variable: String,
        available: String,
    },
}

/// One real numeric variable, widened to `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct MatVariable {
    pub name: String,
    /// MATLAB dimensions, e.g. `[1, 2400]` for a row vector, `[2400, 1]` for a column.
    pub dims: Vec<usize>,
    /// The MATLAB class the variable was saved as (`double`, `single`, `int32`, ...).
    pub class: &'static str,
    /// `dims.iter().product()` values in column-major order.
    pub values: Vec<f64>,
}

/// The variables of a MAT-file: the numeric ones decoded, the others listed with what they are.
#[derive(Clone, Debug, Default)]
pub struct MatFile {
    pub path: PathBuf,
    pub variables: Vec<MatVariable>,
    /// `(name, description)` of variables that are not real numeric matrices (cells, structs,
    /// chars, sparse, complex): kept so that asking for one gives a precise error.
    pub unsupported: Vec<(String, String)>,
}

impl MatFile {
    /// The numeric variable `name`, or an error that says what the file holds instead.
    pub fn get(&self, name: &str) -> Result<&MatVariable, MatError> {
        if let Some(v) = self.variables.iter().find(|v| v.name == name) {
            return Ok(v);
        }
        if let Some((_, what)) = self.unsupported.iter().find(|(n, _)| n == name) {
            return Err(MatError::Unsupported {
                path: self.path.clone(),
                variable: name.to_string(),
                what: what.clone(),
            });
        }
        let mut names: Vec<&str> = self.variables.iter().map(|v| v.name.as_str()).collect();
        names.extend(self.unsupported.iter().map(|(n, _)| n.as_str()));
        Err(MatError::MissingVariable {
            path: self.path.clone(),
            variable: name.to_string(),
            available: if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            },
        })
    }
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;

const MX_DOUBLE: u32 = 6;
const HDF5_SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

fn class_name(class: u32) -> &'static str {
    match class {
        1 => "a cell array",
        2 => "a struct",
        3 => "an object",
        4 => "a char array",
        5 => "a sparse matrix",
        6 => "double",
        7 => "single",
        8 => "int8",
        9 => "uint8",
        10 => "int16",
        11 => "uint16",
        12 => "int32",
        13 => "uint32",
        14 => "int64",
        15 => "uint64",
        16 => "a function handle",
        17 => "an opaque object",
        _ => "an unknown class",
    }
}

/// Reads every variable of a MAT-file.
pub fn read_mat_file(path: &Path) -> Result<MatFile, MatError> {
    let bytes = std::fs::read(path).map_err(|source| MatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_mat_bytes(&bytes, path)
}

/// Reads one numeric variable of a MAT-file.
pub fn read_mat_variable(path: &Path, name: &str) -> Result<MatVariable, MatError> {
    read_mat_file(path)?.get(name).cloned()
}

/// Parses a MAT-file held in memory; `path` is only used in error messages.
pub fn read_mat_bytes(bytes: &[u8], path: &Path) -> Result<MatFile, MatError> {
    let not_mat = |reason: &str| MatError::NotMat {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() >= 520 && &bytes[512..520] == HDF5_SIGNATURE
        || bytes.starts_with(HDF5_SIGNATURE)
        || bytes.starts_with(b"MATLAB 7.3 MAT-file")
    {
        return Err(MatError::V73 {
            path: path.to_path_buf(),
        });
    }
    if bytes.len() < 128 {
        return Err(not_mat("shorter than the 128-byte header"));
    }
    if bytes[..4].contains(&0) {
        // Level 4 files start with a binary header whose first bytes contain zeros.
        return Err(not_mat(
            "no text header; a Level 4 file? re-save it with `save(file, '-v7')`",
        ));
    }
    let big_endian = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        _ => return Err(not_mat("no MI/IM endian indicator at byte 126")),
    };
    let reader = Reader { path, big_endian };
    let version = reader.u16_at(&bytes[124..126]);
    if version == 0x0200 {
        return Err(MatError::V73 {
            path: path.to_path_buf(),
        });
    }
    if version != 0x0100 {
        return Err(not_mat(&format!("unknown version 0x{version:04x}")));
    }
    let mut file = MatFile {
        path: path.to_path_buf(),
        ..MatFile::default()
    };
    let mut pos = 128;
    while pos < bytes.len() {
        // Trailing padding (some writers leave zeros) ends the file.
        if bytes.len() - pos < 8 && bytes[pos..].iter().all(|&b| b == 0) {
            break;
        }
        let (kind, data, next) = reader.element(bytes, pos)?;
        pos = next;
        match kind {
            MI_MATRIX => reader.matrix(data, &mut file)?,
            MI_COMPRESSED => {
                let mut inflated = Vec::new();
                flate2::read::ZlibDecoder::new(data)
                    .read_to_end(&mut inflated)
                    .map_err(|e| {
                        reader.corrupt(format!("compressed element at byte {pos}: {e}"))
                    })?;
                let (inner, inner_data, _) = reader.element(&inflated, 0)?;
                if inner != MI_MATRIX {
                    return Err(reader.corrupt(format!(
                        "compressed element holds data type {inner}, expected miMATRIX (14)"
                    )));
                }
                reader.matrix(inner_data, &mut file)?;
            }
            // Top-level elements other than variables carry nothing we need.
            _ => {}
        }
    }
    Ok(file)
}

struct Reader<'a> {
    path: &'a Path,
    big_endian: bool,
}

impl Reader<'_> {
    fn corrupt(&self, reason: String) -> MatError {
        MatError::Corrupt {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn u16_at(&self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        if self.big_endian {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        }
    }

    fn u32_at(&self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }

    /// The element starting at `pos`: `(data type, data, position of the next element)`.
    fn element<'b>(&self, bytes: &'b [u8], pos: usize) -> Result<(u32, &'b [u8], usize), MatError> {
        if bytes.len() < pos + 8 {
            // A small element needs only 8 bytes too, so anything shorter is truncated.
            return Err(self.corrupt(format!("truncated element tag at byte {pos}")));
        }
        let first = self.u32_at(&bytes[pos..]);
        // Small data element: the byte count lives in the upper 16 bits of the type word.
        if first >> 16 != 0 {
            let kind = first & 0xffff;
            let size = (first >> 16) as usize;
            if size > 4 {
                return Err(self.corrupt(format!(
                    "small data element at byte {pos} claims {size} bytes (max 4)"
                )));
            }
            return Ok((kind, &bytes[pos + 4..pos + 4 + size], pos + 8));
        }
        let size = self.u32_at(&bytes[pos + 4..]) as usize;
        let start = pos + 8;
        let end = start
            .checked_add(size)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                self.corrupt(format!(
                    "element at byte {pos} claims {size} bytes, past the end ({} bytes)",
                    bytes.len()
                ))
            })?;
        // Compressed elements are not padded (so later elements may start unaligned); everything
        // else is padded to a multiple of 8 bytes from its own start.
        let next = if first == MI_COMPRESSED {
            end
        } else {
            start + size.div_ceil(8) * 8
        };
        Ok((first, &bytes[start..end], next.min(bytes.len())))
    }

    /// Decodes the body of an `miMATRIX` element and files it under `variables` or `unsupported`.
    fn matrix(&self, data: &[u8], file: &mut MatFile) -> Result<(), MatError> {
        if data.is_empty() {
            return Ok(()); // An empty miMATRIX is a legal placeholder (empty cell content).
        }
        let (flags_kind, flags, pos) = self.element(data, 0)?;
        if flags_kind != MI_UINT32 || flags.len() < 8 {
            return Err(self.corrupt("matrix without an array-flags sub-element".to_string()));
        }
        let flag_word = self.u32_at(flags);
        let class = flag_word & 0xff;
        let complex = flag_word & 0x0800 != 0;
        let (dims_kind, dims_raw, pos) = self.element(data, pos)?;
        if dims_kind != MI_INT32 {
            return Err(self.corrupt("matrix without a dimensions sub-element".to_string()));
        }
        let dims: Vec<usize> = dims_raw
            .chunks_exact(4)
            .map(|c| self.u32_at(c) as i32)
            .map(|d| usize::try_from(d).unwrap_or(0))
            .collect();
        let (name_kind, name_raw, pos) = self.element(data, pos)?;
        if name_kind != MI_INT8 && name_kind != MI_UTF8 {
            return Err(self.corrupt("matrix without a name sub-element".to_string()));
        }
        let name = String::from_utf8_lossy(name_raw).into_owned();
        let numeric = (6..=15).contains(&class);
        if !numeric || complex {
            let what = if complex {
                format!("complex {}", class_name(class))
            } else {
                class_name(class).to_string()
            };
            file.unsupported.push((name, what));
            return Ok(());
        }
        let (real_kind, real, _) = self.element(data, pos)?;
        let values = self.numbers(real_kind, real).ok_or_else(|| {
            self.corrupt(format!(
                "variable `{name}`: real part has data type {real_kind} with {} bytes",
                real.len()
            ))
        })?;
        // Checked: hostile dimensions must not overflow.
        let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if expected != Some(values.len()) {
            return Err(self.corrupt(format!(
                "variable `{name}`: dimensions {dims:?} do not match the {} values stored",
                values.len()
            )));
        }
        file.variables.push(MatVariable {
            name,
            dims,
            class: class_name(class),
            values,
        });
        Ok(())
    }

    /// Widens numeric data of MAT data type `kind` to `f64`; `None` for non-numeric types or a
    /// byte count that is not a multiple of the element size.
    fn numbers(&self, kind: u32, b: &[u8]) -> Option<Vec<f64>> {
        let width = match kind {
            MI_INT8 | MI_UINT8 => 1,
            MI_INT16 | MI_UINT16 => 2,
            MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
            MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
            _ => return None,
        };
        if b.len() % width != 0 {
            return None;
        }
        let be = self.big_endian;
        let word = |c: &[u8]| -> u64 {
            let mut a = [0u8; 8];
            if be {
                a[8 - width..].copy_from_slice(c);
                u64::from_be_bytes(a)
            } else {
                a[..width].copy_from_slice(c);
                u64::from_le_bytes(a)
            }
        };
        Some(
            b.chunks_exact(width)
                .map(|c| {
                    let w = word(c);
                    match kind {
                        MI_INT8 => f64::from(w as u8 as i8),
                        MI_UINT8 => f64::from(w as u8),
                        MI_INT16 => f64::from(w as u16 as i16),
                        MI_UINT16 => f64::from(w as u16),
                        MI_INT32 => f64::from(w as u32 as i32),
                        MI_UINT32 => f64::from(w as u32),
                        MI_SINGLE => f64::from(f32::from_bits(w as u32)),
                        MI_INT64 => w as i64 as f64,
                        MI_UINT64 => w as f64,
                        _ => f64::from_bits(w),
                    }
                })
                .collect(),
        )
    }
}

/// Writes a little-endian Level 5 MAT-file (`save -v6` when `compressed` is false, `-v7`
/// when true) holding the given real double matrices. `values` are column-major and must have
/// `dims.iter().product()` entries. Names must be valid MATLAB identifiers (1–63 characters).
pub fn write_mat_file(
    path: &Path,
    variables: &[MatVariable],
    compressed: bool,
) -> Result<(), MatError> {
    let mut out = Vec::with_capacity(
        128 + variables
            .iter()
            .map(|v| 64 + 8 * v.values.len())
            .sum::<usize>(),
    );
    let mut text =
        b"MATLAB 5.0 MAT-file, Platform: agiqa-trainer, Created by: agiqa_trainer::data::mat"
            .to_vec();
    text.resize(116, b' ');
    out.extend_from_slice(&text);
    out.extend_from_slice(&[0u8; 8]); // no subsystem data
    out.extend_from_slice(&0x0100u16.to_le_bytes());
    out.extend_from_slice(b"IM");
    for variable in variables {
        let invalid = |what: String| MatError::Unsupported {
            path: path.to_path_buf(),
            variable: variable.name.clone(),
            what,
        };
        let name_ok = !variable.name.is_empty()
            && variable.name.len() <= 63
            && variable.name.starts_with(|c: char| c.is_ascii_alphabetic())
            && variable
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            return Err(invalid("not a valid MATLAB name".to_string()));
        }
        if variable.dims.len() < 2 || variable.dims.iter().any(|&d| d > i32::MAX as usize) {
            return Err(invalid(format!(
                "dimensions {:?} (need at least 2, each < 2^31)",
                variable.dims
            )));
        }
        if variable
            .dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            != Some(variable.values.len())
        {
            return Err(invalid(format!(
                "{} values for dimensions {:?}",
                variable.values.len(),
                variable.dims
            )));
        }
        let matrix = matrix_element(variable);
        if compressed {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            let deflated = encoder
                .write_all(&matrix)
                .and_then(|()| encoder.finish())
                .map_err(|source| MatError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            push_tag(&mut out, MI_COMPRESSED, deflated.len());
            out.extend_from_slice(&deflated);
        } else {
            out.extend_from_slice(&matrix);
        }
    }
    std::fs::write(path, out).map_err(|source| MatError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn push_tag(out: &mut Vec<u8>, kind: u32, size: usize) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(size as u32).to_le_bytes());
}

fn push_padded(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    push_tag(out, kind, data.len());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(8) * 8, 0);
}

/// A complete `miMATRIX` element (tag included) for a real double matrix.
fn matrix_element(variable: &MatVariable) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + 8 * variable.values.len());
    let mut flags = MX_DOUBLE.to_le_bytes().to_vec();
    flags.extend_from_slice(&0u32.to_le_bytes());
    push_padded(&mut body, MI_UINT32, &flags);
    let dims: Vec<u8> = variable
        .dims
        .iter()
        .flat_map(|&d| (d as i32).to_le_bytes())
        .collect();
    push_padded(&mut body, MI_INT32, &dims);
    push_padded(&mut body, MI_INT8, variable.name.as_bytes());
    let values: Vec<u8> = variable
        .values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    push_padded(&mut body, MI_DOUBLE, &values);
    let mut element = Vec::with_capacity(8 + body.len());
    push_tag(&mut element, MI_MATRIX, body.len());
    element.extend_from_slice(&body);
    element
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variable(name: &str, dims: &[usize], values: Vec<f64>) -> MatVariable {
        MatVariable {
            name: name.to_string(),
            dims: dims.to_vec(),
            class: "double",
            values,
        }
    }

    #[test]
    fn writer_output_reads_back_exactly_plain_and_compressed() {
        let dir = std::env::temp_dir().join(format!("agiqa-mat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = variable(
            "MOSz",
            &[1, 5],
            vec![26.5, 74.25, f64::MIN_POSITIVE, -0.0, 1e300],
        );
        let b = variable("grid_2", &[2, 3], (0..6).map(|i| i as f64 / 3.0).collect());
        for compressed in [false, true] {
            let path = dir.join(format!("rt_{compressed}.mat"));
            write_mat_file(&path, &[a.clone(), b.clone()], compressed).unwrap();
            let file = read_mat_file(&path).unwrap();
            assert_eq!(file.variables, vec![a.clone(), b.clone()]);
            assert!(file.unsupported.is_empty());
        }
        // A compressed element (unpadded, so the next one starts unaligned) then a plain one.
        let compressed = std::fs::read(dir.join("rt_true.mat")).unwrap();
        let plain = std::fs::read(dir.join("rt_false.mat")).unwrap();
        let a_only = dir.join("a.mat");
        write_mat_file(&a_only, std::slice::from_ref(&a), true).unwrap();
        let mut mixed = std::fs::read(&a_only).unwrap();
        assert_ne!(
            mixed.len() % 8,
            0,
            "the test needs an unaligned compressed element"
        );
        mixed.extend_from_slice(&plain[128..]);
        let file = read_mat_bytes(&mixed, Path::new("mixed.mat")).unwrap();
        assert_eq!(file.variables, vec![a.clone(), a.clone(), b.clone()]);
        assert!(compressed.len() < plain.len());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn big_endian_small_elements_and_integer_storage_are_decoded() {
        // Hand-built big-endian file: a 1x3 double stored as miUINT8 (as MATLAB does for small
        // integers), with a small-data-element name "x".
        let mut f = b"MATLAB 5.0 MAT-file".to_vec();
        f.resize(116, b' ');
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&0x0100u16.to_be_bytes());
        f.extend_from_slice(b"MI");
        let mut body = Vec::new();
        body.extend_from_slice(&MI_UINT32.to_be_bytes());
        body.extend_from_slice(&8u32.to_be_bytes());
        body.extend_from_slice(&MX_DOUBLE.to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        body.extend_from_slice(&MI_INT32.to_be_bytes());
        body.extend_from_slice(&8u32.to_be_bytes());
        body.extend_from_slice(&1i32.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(&((1u32 << 16) | MI_INT8).to_be_bytes());
        body.extend_from_slice(b"x\0\0\0");
        body.extend_from_slice(&((3u32 << 16) | MI_UINT8).to_be_bytes());
        body.extend_from_slice(&[7, 0, 255, 0]);
        f.extend_from_slice(&MI_MATRIX.to_be_bytes());
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(&body);
        let file = read_mat_bytes(&f, Path::new("be.mat")).unwrap();
        assert_eq!(file.get("x").unwrap().values, vec![7.0, 0.0, 255.0]);
        assert_eq!(file.get("x").unwrap().dims, vec![1, 3]);
        let missing = file.get("MOSz").unwrap_err().to_string();
        assert!(
            missing.contains("be.mat") && missing.contains("`MOSz`") && missing.contains("x"),
            "{missing}"
        );
    }

    #[test]
    fn hdf5_and_truncated_files_are_rejected_with_the_file_named() {
        let mut v73 = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".to_vec();
        v73.resize(512, b' ');
        v73.extend_from_slice(HDF5_SIGNATURE);
        let err = read_mat_bytes(&v73, Path::new("mosz1.mat"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mosz1.mat") && err.contains("-v7.3") && err.contains("-v7'"),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("agiqa-mat-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.mat");
        write_mat_file(&path, &[variable("MOSz", &[1, 4], vec![1.0; 4])], false).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let err = read_mat_bytes(&bytes[..bytes.len() - 9], &path).unwrap_err();
        assert!(matches!(err, MatError::Corrupt { .. }), "{err}");
        assert!(read_mat_bytes(b"hello", Path::new("x.mat"))
            .unwrap_err()
            .to_string()
            .contains("x.mat"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
