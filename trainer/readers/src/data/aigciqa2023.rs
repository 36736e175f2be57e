//! AIGCIQA2023 (Wang et al., 2023): 2400 images from six generators, rated for quality,
//! authenticity and text–image correspondence; MOS on a 0–100 scale (about 26–74 in practice).
//!
//! Layout: `<dir>/DATA/MOS/mosz1.mat` (quality), `mosz2.mat` (authenticity), `mosz3.mat`
//! (correspondence), each a MATLAB file with one variable `MOSz` whose element `i` (0-based) scores
//! `<dir>/Image/allimg/{i}.png`. The images come 400 per generator, in [`GENERATORS`] order. The
//! dataset ships no prompt per image, so [`Sample::prompt`] stays `None`.

use std::path::Path;

use super::mat::read_mat_file;
use super::{
    choose_dimension, finish, Candidate, DataError, Dataset, DatasetHeader, LoadOptions, Sample,
    ValidationReport,
};

/// Dimensions and the MAT-file holding each; the first is the default.
pub const DIMENSIONS: [(&str, &str); 3] = [
    ("quality", "mosz1.mat"),
    ("authenticity", "mosz2.mat"),
    ("correspondence", "mosz3.mat"),
];

/// The variable holding the scores in every MOS file.
pub const MOS_VARIABLE: &str = "MOSz";

/// The nominal MOS range.
pub const SCALE: (f64, f64) = (0.0, 100.0);

/// The generators, in image-index order, 400 images each.
pub const GENERATORS: [&str; 6] = [
    "Controlnet",
    "DALLE",
    "Glide",
    "Lafite",
    "stable-diffusion",
    "Unidiffuser",
];

/// Images per generator in the real dataset.
pub const IMAGES_PER_GENERATOR: usize = 400;

/// The generator of image `index` in the real 2400-image dataset.
pub fn generator_of(index: usize) -> Option<&'static str> {
    GENERATORS.get(index / IMAGES_PER_GENERATOR).copied()
}

/// `<dir>/DATA/MOS/<file>`.
pub fn mos_path(dir: &Path, file: &str) -> std::path::PathBuf {
    dir.join("DATA").join("MOS").join(file)
}

/// `<dir>/Image/allimg/{index}.png`.
pub fn image_path(dir: &Path, index: usize) -> std::path::PathBuf {
    dir.join("Image")
        .join("allimg")
        .join(format!("{index}.png"))
}

/// Loads the chosen dimension's `MOSz` and validates every image (see [`super::load_dataset`]).
/// Row numbers in errors are MATLAB's 1-based indices into `MOSz`.
pub fn load(dir: &Path, options: &LoadOptions) -> Result<(Dataset, ValidationReport), DataError> {
    let names: Vec<&str> = DIMENSIONS.iter().map(|d| d.0).collect();
    let dimension = choose_dimension("aigciqa2023", &names, options)?;
    let file_name = DIMENSIONS
        .iter()
        .find(|d| d.0 == dimension)
        .map(|d| d.1)
        .unwrap_or(DIMENSIONS[0].1);
    let file = mos_path(dir, file_name);
    let mat = read_mat_file(&file)?;
    let mos = mat.get(MOS_VARIABLE)?;
    let candidates = mos
        .values
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            let mut problems = Vec::new();
            if value.is_nan() {
                problems.push("MOSz is NaN".to_string());
            } else if value.is_infinite() {
                problems.push("MOSz is infinite".to_string());
            }
            Candidate {
                row: index + 1,
                sample: Sample {
                    path: image_path(dir, index),
                    mos: value,
                    prompt: None,
                    name: index.to_string(),
                    split: None,
                },
                problems,
            }
        })
        .collect();
    finish(
        DatasetHeader {
            name: "aigciqa2023".to_string(),
            dimension: dimension.to_string(),
            scale: Some(SCALE),
            root: dir.to_path_buf(),
            file,
        },
        candidates,
        options,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mat::{write_mat_file, MatVariable};

    #[test]
    fn generators_follow_the_index_blocks() {
        assert_eq!(generator_of(0), Some("Controlnet"));
        assert_eq!(generator_of(399), Some("Controlnet"));
        assert_eq!(generator_of(400), Some("DALLE"));
        assert_eq!(generator_of(2399), Some("Unidiffuser"));
        assert_eq!(generator_of(2400), None);
    }

    #[test]
    fn bad_values_are_reported_by_matlab_index() {
        let dir = std::env::temp_dir().join(format!("aigciqa-unit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("DATA/MOS")).unwrap();
        std::fs::create_dir_all(dir.join("Image/allimg")).unwrap();
        let values = vec![50.0, f64::NAN, 120.0, 30.0];
        let var = MatVariable {
            name: "MOSz".into(),
            dims: vec![4, 1],
            class: "double",
            values,
        };
        write_mat_file(&mos_path(&dir, "mosz2.mat"), &[var], true).unwrap();
        for i in [0, 1, 2] {
            image::RgbImage::new(3, 2)
                .save(image_path(&dir, i))
                .unwrap();
        }
        let options = LoadOptions {
            dimension: Some("authenticity".into()),
            ..LoadOptions::default()
        };
        let err = load(&dir, &options).unwrap_err().to_string();
        assert!(err.contains("mosz2.mat: 3 invalid row(s)"), "{err}");
        assert!(err.contains("row 2 (1): MOSz is NaN"), "{err}");
        assert!(
            err.contains("row 3 (2): score 120 outside the scale 0–100"),
            "{err}"
        );
        assert!(err.contains("row 4 (3): image not found"), "{err}");
        let err = load(&dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("mosz1.mat"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
