//! MATLAB v5 MAT files (AIGCIQA2023's `MOSz`), read from bytes.

use std::path::Path;

use agiqa_readers::data::mat::read_mat_bytes;

/// Reads every variable; accepted when the file holds a readable `MOSz`, as AIGCIQA2023 needs.
pub fn run(data: &[u8]) -> bool {
    match read_mat_bytes(data, Path::new("fuzz.mat")) {
        Ok(mat) => {
            for variable in &mat.variables {
                let numel = variable.dims.iter().product::<usize>();
                assert_eq!(numel, variable.values.len(), "{}", variable.name);
            }
            mat.get("MOSz").is_ok()
        }
        Err(_) => false,
    }
}
