//! AGIQA-3K (Li et al., 2023): 2982 images from six generators, each rated for perceptual
//! quality and text–image alignment on a 0–5 scale.
//!
//! Layout: `<dir>/data.csv` with the columns `name, prompt, adj1, adj2, style, mos_quality,
//! std_quality, mos_align, std_align`, and the images `{model}_{setting}_{idx}.jpg` beside it (or,
//! as some mirrors ship them, in `<dir>/images/` or `<dir>/image/`; detected once per load).

use std::path::{Path, PathBuf};

use super::{
    choose_dimension, finish, parse_csv, parse_score, read_text, Candidate, DataError, Dataset,
    DatasetHeader, LoadOptions, Sample, ValidationReport,
};

/// Dimensions and the `data.csv` column holding each; the first is the default.
pub const DIMENSIONS: [(&str, &str); 2] = [("quality", "mos_quality"), ("alignment", "mos_align")];

/// The nominal MOS range of both dimensions.
pub const SCALE: (f64, f64) = (0.0, 5.0);

/// The folders searched for images, in order.
const IMAGE_DIRS: [&str; 3] = ["", "images", "image"];

/// Loads `<dir>/data.csv` and validates every row (see [`super::load_dataset`]).
pub fn load(dir: &Path, options: &LoadOptions) -> Result<(Dataset, ValidationReport), DataError> {
    // An unknown dimension fails before the file is read, as it always has.
    let names: Vec<&str> = DIMENSIONS.iter().map(|d| d.0).collect();
    choose_dimension("agiqa3k", &names, options)?;
    let csv_path = dir.join("data.csv");
    load_table(dir, &read_text(&csv_path)?, options)
}

/// [`load`] with `<dir>/data.csv` already read into memory as `data_csv`.
pub fn load_table(
    dir: &Path,
    data_csv: &str,
    options: &LoadOptions,
) -> Result<(Dataset, ValidationReport), DataError> {
    let names: Vec<&str> = DIMENSIONS.iter().map(|d| d.0).collect();
    let dimension = choose_dimension("agiqa3k", &names, options)?;
    let column_name = DIMENSIONS
        .iter()
        .find(|d| d.0 == dimension)
        .map(|d| d.1)
        .unwrap_or(DIMENSIONS[0].1);
    let csv_path = dir.join("data.csv");
    let table = parse_csv(data_csv, &csv_path, false)?;
    let columns = table.require(&csv_path, &["name", column_name])?;
    let (name_col, mos_col) = (columns[0], columns[1]);
    let prompt_col = table.column("prompt");

    let image_dir = find_image_dir(
        dir,
        table
            .records
            .iter()
            .filter_map(|(_, r)| r.get(name_col).map(|s| s.trim())),
    );
    let width = table.header.len();
    let candidates = table
        .records
        .iter()
        .map(|(line, record)| {
            let mut problems = Vec::new();
            if record.len() != width {
                problems.push(format!("{} fields, header has {width}", record.len()));
            }
            let cell = |i: usize| record.get(i).map(|s| s.trim()).unwrap_or("");
            let name = cell(name_col).to_string();
            if name.is_empty() {
                problems.push("empty name".to_string());
            }
            let mos = parse_score(cell(mos_col), column_name).unwrap_or_else(|p| {
                problems.push(p);
                f64::NAN
            });
            let prompt = prompt_col
                .map(cell)
                .filter(|p| !p.is_empty())
                .map(str::to_string);
            Candidate {
                row: *line,
                sample: Sample {
                    path: image_dir.join(&name),
                    mos,
                    prompt,
                    name,
                    split: None,
                },
                problems,
            }
        })
        .collect();
    finish(
        DatasetHeader {
            name: "agiqa3k".to_string(),
            dimension: dimension.to_string(),
            scale: Some(SCALE),
            root: dir.to_path_buf(),
            file: csv_path,
        },
        candidates,
        options,
    )
}

/// The first of `<dir>`, `<dir>/images`, `<dir>/image` holding any of the first few named
/// images; `<dir>` when none does (every image is then reported missing there).
fn find_image_dir<'a>(dir: &Path, names: impl Iterator<Item = &'a str>) -> PathBuf {
    let probe: Vec<&str> = names.filter(|n| !n.is_empty()).take(20).collect();
    IMAGE_DIRS
        .iter()
        .map(|sub| dir.join(sub))
        .find(|candidate| probe.iter().any(|n| candidate.join(n).is_file()))
        .unwrap_or_else(|| dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_found_in_an_images_subfolder_and_columns_are_named() {
        let dir = std::env::temp_dir().join(format!("agiqa3k-unit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(
            dir.join("data.csv"),
            "name,prompt,mos_quality,mos_align\na.png,\"a cat, oil\",1.5,2\nb.png,,4.0,3\n",
        )
        .unwrap();
        for n in ["a.png", "b.png"] {
            image::RgbImage::new(4, 3)
                .save(dir.join("images").join(n))
                .unwrap();
        }
        let (ds, report) = load(&dir, &LoadOptions::default()).unwrap();
        assert!(report.skipped.is_empty());
        assert_eq!(ds.samples.len(), 2);
        assert_eq!(ds.samples[0].path, dir.join("images").join("a.png"));
        assert_eq!(ds.samples[0].prompt.as_deref(), Some("a cat, oil"));
        assert_eq!(ds.samples[1].prompt, None);
        let options = LoadOptions {
            dimension: Some("alignment".into()),
            ..LoadOptions::default()
        };
        assert_eq!(load(&dir, &options).unwrap().0.mos(), vec![2.0, 3.0]);

        std::fs::write(dir.join("data.csv"), "name,prompt,mos_align\na.png,x,1\n").unwrap();
        let err = load(&dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("missing column(s) mos_quality"), "{err}");
        let options = LoadOptions {
            dimension: Some("aesthetics".into()),
            ..LoadOptions::default()
        };
        let err = load(&dir, &options).unwrap_err().to_string();
        assert!(
            err.contains("`aesthetics`") && err.contains("quality, alignment"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
