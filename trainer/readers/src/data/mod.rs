//! Datasets for training and evaluation: AGIQA-3K, AIGCIQA2023 and plain manifests, validated up
//! front. The splits and the synthetic datasets build on these in the trainer
//! (`agiqa_trainer::data`, which re-exports this module).
//!
//! Loading checks everything before training starts (`validate.rs`) — missing or undecodable
//! images (`image_check.rs`, with the serving decoder), empty, non-numeric, non-finite or
//! out-of-scale scores, duplicate ids — and fails with one error that lists every offending row,
//! or, with [`LoadOptions::skip_bad`], drops those rows and reports them.

pub mod agiqa3k;
pub mod aigciqa2023;
mod csv_table;
mod image_check;
pub mod manifest;
pub mod mat;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use csv_table::parse_csv;
pub use mat::MatError;
use validate::{choose_dimension, finish, parse_score, Candidate, DatasetHeader};
pub use validate::{BadRow, ValidationReport, MAX_LISTED_ROWS};

/// One scored image.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The image file (the dataset root joined with the name the dataset gives).
    pub path: PathBuf,
    /// Mean opinion score on the dataset's [`Dataset::scale`].
    pub mos: f64,
    /// The generation prompt, where the dataset has one (AGIQA-3K, manifests with a `prompt`
    /// column): grouped splits keep all images of one prompt together.
    pub prompt: Option<String>,
    /// The id splits refer to: the file name for AGIQA-3K (`AttnGAN_normal_000.jpg`), the image
    /// index for AIGCIQA2023 (`"17"`), the path as written for manifests.
    pub name: String,
    /// The part a manifest's `split` column assigns, if any.
    pub split: Option<SplitPart>,
}

/// A part of a split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SplitPart {
    Train,
    Val,
    Test,
}

impl FromStr for SplitPart {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(SplitPart::Train),
            "val" | "valid" | "validation" => Ok(SplitPart::Val),
            "test" | "testing" => Ok(SplitPart::Test),
            other => Err(format!("split `{other}` is not one of train, val, test")),
        }
    }
}

/// A validated dataset: every sample's image exists and decodes (unless image checks were
/// turned off) and every score is finite and on the scale.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// `"agiqa3k"`, `"aigciqa2023"` or `"manifest"`.
    pub name: String,
    /// The rated dimension the scores belong to: `quality`, `alignment` (AGIQA-3K),
    /// `authenticity`, `correspondence` (AIGCIQA2023), or a manifest's own.
    pub dimension: String,
    /// Nominal MOS range `(min, max)`: AGIQA-3K 0–5, AIGCIQA2023 0–100; a manifest's declared
    /// `# scale:` or else its observed minimum and maximum.
    pub scale: (f64, f64),
    pub samples: Vec<Sample>,
    /// The folder the dataset was loaded from (the manifest's folder for manifests).
    pub root: PathBuf,
}

impl Dataset {
    /// The scores, in sample order.
    pub fn mos(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.mos).collect()
    }
}

/// Where a dataset lives, parsed from `agiqa3k:<dir>`, `aigciqa2023:<dir>`, `manifest:<file>` or a
/// bare path to a `.csv`/`.jsonl` manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetSpec {
    /// A folder with `data.csv` and the images (beside it, or in `images/` or `image/`).
    Agiqa3k(PathBuf),
    /// A folder with `DATA/MOS/mosz{1,2,3}.mat` and `Image/allimg/{i}.png`.
    Aigciqa2023(PathBuf),
    /// A `.csv` or `.jsonl` file listing `path` and `score` (see [`manifest`]).
    Manifest(PathBuf),
}

const SPEC_FORMS: &str = "expected `agiqa3k:<dir>`, `aigciqa2023:<dir>`, `manifest:<file.csv|file.jsonl>` or a path to a .csv/.jsonl manifest";

impl FromStr for DatasetSpec {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::Spec {
            spec: s.to_string(),
            reason,
        };
        if let Some((kind, rest)) = s.split_once(':') {
            let known = ["agiqa3k", "aigciqa2023", "manifest"];
            if known.contains(&kind.to_ascii_lowercase().as_str()) {
                if rest.is_empty() {
                    return Err(bad(format!("no path after `{kind}:`; {SPEC_FORMS}")));
                }
                let path = PathBuf::from(rest);
                return Ok(match kind.to_ascii_lowercase().as_str() {
                    "agiqa3k" => DatasetSpec::Agiqa3k(path),
                    "aigciqa2023" => DatasetSpec::Aigciqa2023(path),
                    _ => DatasetSpec::Manifest(path),
                });
            }
            // A Windows drive letter or a path that merely contains ':' falls through.
            if kind.len() > 1 && !kind.contains(['/', '\\', '.']) {
                return Err(bad(format!("unknown dataset kind `{kind}`; {SPEC_FORMS}")));
            }
        }
        let path = PathBuf::from(s);
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        {
            Some(e) if e == "csv" || e == "jsonl" => Ok(DatasetSpec::Manifest(path)),
            _ => {
                let hint = if path.join("data.csv").is_file() {
                    format!(" (it has data.csv: did you mean `agiqa3k:{s}`?)")
                } else if path.join("DATA").join("MOS").is_dir() {
                    format!(" (it has DATA/MOS: did you mean `aigciqa2023:{s}`?)")
                } else {
                    String::new()
                };
                Err(bad(format!("{SPEC_FORMS}{hint}")))
            }
        }
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSpec::Agiqa3k(p) => write!(f, "agiqa3k:{}", p.display()),
            DatasetSpec::Aigciqa2023(p) => write!(f, "aigciqa2023:{}", p.display()),
            DatasetSpec::Manifest(p) => write!(f, "manifest:{}", p.display()),
        }
    }
}

/// How strictly to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The rated dimension; `None` takes the dataset's default (`quality`).
    pub dimension: Option<String>,
    /// Drop invalid rows (reported in [`ValidationReport`]) instead of failing.
    pub skip_bad: bool,
    /// Decode every image up front (in parallel) so a corrupt file fails now, not mid-epoch.
    pub check_images: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dimension: None,
            skip_bad: false,
            check_images: true,
        }
    }
}

fn list_rows(rows: &[BadRow]) -> String {
    let mut out = String::new();
    for row in rows.iter().take(MAX_LISTED_ROWS) {
        out.push_str("\n  ");
        out.push_str(&row.to_string());
    }
    if rows.len() > MAX_LISTED_ROWS {
        out.push_str(&format!(
            "\n  ... and {} more",
            rows.len() - MAX_LISTED_ROWS
        ));
    }
    out
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}
/// Why a dataset could not be loaded, split or written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("bad dataset `{spec}`: {reason}")]
    Spec { spec: String, reason: String },
    #[error("{path}: missing column(s) {}; the columns found are: {}", .missing.join(", "), list_or_none(.found))]
    MissingColumns {
        path: PathBuf,
        missing: Vec<String>,
        found: Vec<String>,
    },
    #[error("{dataset}: unknown dimension `{given}`; valid dimensions: {}", .valid.join(", "))]
    UnknownDimension {
        dataset: String,
        given: String,
        valid: Vec<String>,
    },
    #[error("{path} line {line}: {reason}")]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: no samples")]
    Empty { path: PathBuf },
    /// Every offending row, not just the first.
    #[error("{file}: {} invalid row(s); fix them, or skip them with skip_bad (--skip-bad):{}", .rows.len(), list_rows(.rows))]
    InvalidRows { file: PathBuf, rows: Vec<BadRow> },
    #[error(transparent)]
    Mat(#[from] MatError),
    #[error("no reference split for dataset `{dataset}`: the paper's splits exist for agiqa3k and aigciqa2023; use a random split (or a manifest `split` column)")]
    NoReferenceSplit { dataset: String },
    #[error("{what}: {} sample(s) have no assigned part: {}{}", .missing.len(), .missing.iter().take(10).cloned().collect::<Vec<_>>().join(", "), if .missing.len() > 10 { ", ..." } else { "" })]
    SplitMismatch { what: String, missing: Vec<String> },
}
/// Loads and validates a dataset. Returns the dataset and the rows dropped by `skip_bad`.
pub fn load_dataset(
    spec: &DatasetSpec,
    options: &LoadOptions,
) -> Result<(Dataset, ValidationReport), DataError> {
    match spec {
        DatasetSpec::Agiqa3k(dir) => agiqa3k::load(dir, options),
        DatasetSpec::Aigciqa2023(dir) => aigciqa2023::load(dir, options),
        DatasetSpec::Manifest(file) => manifest::load(file, options),
    }
}
/// Reads a text file, naming it on failure.
fn read_text(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_errors_list_the_forms() {
        assert_eq!(
            "agiqa3k:/d/AGIQA-3K".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::Agiqa3k("/d/AGIQA-3K".into())
        );
        assert_eq!(
            "AIGCIQA2023:x".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::Aigciqa2023("x".into())
        );
        assert_eq!(
            "data/my.jsonl".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::Manifest("data/my.jsonl".into())
        );
        assert_eq!(
            "manifest:m.txt".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::Manifest("m.txt".into())
        );
        for bad in ["koniq:/x", "/some/dir", "agiqa3k:"] {
            let err = bad.parse::<DatasetSpec>().unwrap_err().to_string();
            assert!(
                err.contains("agiqa3k:<dir>") || err.contains("no path"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn invalid_rows_error_lists_every_row_up_to_the_cap() {
        let rows: Vec<BadRow> = (0..60)
            .map(|i| BadRow {
                row: i + 2,
                id: format!("img{i}.jpg"),
                reason: "score is NaN".into(),
            })
            .collect();
        let msg = DataError::InvalidRows {
            file: "data.csv".into(),
            rows,
        }
        .to_string();
        assert!(msg.starts_with("data.csv: 60 invalid row(s)"), "{msg}");
        assert!(msg.contains("row 51 (img49.jpg): score is NaN"), "{msg}");
        assert!(!msg.contains("img50.jpg"), "{msg}");
        assert!(msg.ends_with("... and 10 more"), "{msg}");
    }
}
