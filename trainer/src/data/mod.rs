//! Datasets for training and evaluation: AGIQA-3K, AIGCIQA2023 and plain manifests, validated up
//! front, plus the paper's reference splits, random (optionally prompt-grouped) splits, and
//! synthetic datasets written in the real formats.
//!
//! Loading checks everything before training starts — missing or undecodable images (decoded with
//! the serving decoder, [`agiqa_runtime::preprocess::decode_image_file`]), empty, non-numeric,
//! non-finite or out-of-scale scores, duplicate ids — and fails with one error that lists every
//! offending row, or, with [`LoadOptions::skip_bad`], drops those rows and reports them.

pub mod agiqa3k;
pub mod aigciqa2023;
pub mod manifest;
pub mod mat;
pub mod split;
pub mod synthetic;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use agiqa_runtime::preprocess::{decode_image_file, DecodeLimits};

pub use mat::MatError;
pub use split::{Protocol, Split};

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

/// One row that failed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRow {
    /// 1-based line of a CSV (the header is line 1) or JSONL file; for AIGCIQA2023, the 1-based
    /// MATLAB index into `MOSz` (image `{row-1}.png`).
    pub row: usize,
    /// The sample's id ([`Sample::name`]), or `""` when the row has none.
    pub id: String,
    /// Every problem found in the row, joined by `; `.
    pub reason: String,
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.id.is_empty() {
            write!(f, "row {}: {}", self.row, self.reason)
        } else {
            write!(f, "row {} ({}): {}", self.row, self.id, self.reason)
        }
    }
}

/// Rows dropped by a `skip_bad` load.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ValidationReport {
    /// The file the rows refer to (`data.csv`, `mosz1.mat`, the manifest).
    pub file: PathBuf,
    pub skipped: Vec<BadRow>,
}

/// At most this many bad rows are printed in an error; the rest are counted.
pub const MAX_LISTED_ROWS: usize = 50;

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

/// Picks `options.dimension` (or the first, default, entry) out of `valid`.
pub(crate) fn choose_dimension<'a>(
    dataset: &str,
    valid: &[&'a str],
    options: &LoadOptions,
) -> Result<&'a str, DataError> {
    match options.dimension.as_deref() {
        None => Ok(valid[0]),
        Some(given) => valid
            .iter()
            .find(|v| v.eq_ignore_ascii_case(given.trim()))
            .copied()
            .ok_or_else(|| DataError::UnknownDimension {
                dataset: dataset.to_string(),
                given: given.to_string(),
                valid: valid.iter().map(|v| v.to_string()).collect(),
            }),
    }
}

/// A row as read from a dataset's table, before the shared checks.
pub(crate) struct Candidate {
    pub row: usize,
    pub sample: Sample,
    /// Problems found while reading the row (unparseable score, bad split, ...).
    pub problems: Vec<String>,
}

/// Parses a score cell: empty, non-numeric and non-finite values are problems.
pub(crate) fn parse_score(cell: &str, column: &str) -> Result<f64, String> {
    let cell = cell.trim();
    if cell.is_empty() {
        return Err(format!("empty {column}"));
    }
    match cell.parse::<f64>() {
        Ok(v) if v.is_nan() => Err(format!("{column} is NaN")),
        Ok(v) if v.is_infinite() => Err(format!("{column} is infinite")),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("{column} `{cell}` is not a number")),
    }
}

/// The checks every format shares, then the keep-or-fail decision.
///
/// `scale` bounds the scores when given (manifests without a declared scale pass `None` and get
/// the observed range). Duplicates keep their first occurrence.
pub(crate) fn finish(
    header: DatasetHeader,
    candidates: Vec<Candidate>,
    options: &LoadOptions,
) -> Result<(Dataset, ValidationReport), DataError> {
    let DatasetHeader {
        name,
        dimension,
        scale,
        root,
        file,
    } = header;
    let mut candidates = candidates;
    let mut first_row: HashMap<String, usize> = HashMap::new();
    for c in &mut candidates {
        if let Some(&first) = first_row.get(&c.sample.name) {
            c.problems
                .push(format!("duplicate id, first seen in row {first}"));
        } else {
            first_row.insert(c.sample.name.clone(), c.row);
        }
        if let Some((lo, hi)) = scale {
            let mos = c.sample.mos;
            if mos.is_finite() && !(lo..=hi).contains(&mos) {
                c.problems
                    .push(format!("score {mos} outside the scale {lo}–{hi}"));
            }
        }
    }
    check_images(&mut candidates, options.check_images);

    let mut bad = Vec::new();
    let mut samples = Vec::with_capacity(candidates.len());
    for c in candidates {
        if c.problems.is_empty() {
            samples.push(c.sample);
        } else {
            bad.push(BadRow {
                row: c.row,
                id: c.sample.name,
                reason: c.problems.join("; "),
            });
        }
    }
    if !bad.is_empty() && !options.skip_bad {
        return Err(DataError::InvalidRows { file, rows: bad });
    }
    if samples.is_empty() {
        return Err(DataError::Empty { path: file });
    }
    let scale = scale.unwrap_or_else(|| {
        samples
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| {
                (lo.min(s.mos), hi.max(s.mos))
            })
    });
    Ok((
        Dataset {
            name,
            dimension,
            scale,
            samples,
            root,
        },
        ValidationReport { file, skipped: bad },
    ))
}

/// What [`finish`] needs besides the rows.
pub(crate) struct DatasetHeader {
    pub name: String,
    pub dimension: String,
    /// `None`: use the observed range and check nothing.
    pub scale: Option<(f64, f64)>,
    pub root: PathBuf,
    /// The table the row numbers refer to.
    pub file: PathBuf,
}

/// Checks that each image exists and, with `decode`, that it decodes with the serving decoder.
/// Decoding runs on all cores: each worker claims the next unchecked row.
fn check_images(candidates: &mut [Candidate], decode: bool) {
    let limits = DecodeLimits::default();
    let check = |sample: &Sample| -> Option<String> {
        if !sample.path.is_file() {
            return Some(format!("image not found: {}", sample.path.display()));
        }
        if !decode {
            return None;
        }
        decode_image_file(&sample.path, &limits)
            .err()
            .map(|e| format!("unreadable image: {e}"))
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(candidates.len().max(1));
    let next = AtomicUsize::new(0);
    let samples: Vec<&Sample> = candidates.iter().map(|c| &c.sample).collect();
    let results: Vec<(usize, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut found = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(sample) = samples.get(i) else { break };
                        if let Some(problem) = check(sample) {
                            found.push((i, problem));
                        }
                    }
                    found
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(found) => found,
                // A decoder panic is a bug elsewhere; surface it rather than hide the rows.
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    for (i, problem) in results {
        candidates[i].problems.push(problem);
    }
}

/// A parsed CSV file: the header and each record with the 1-based line it starts on.
#[derive(Debug)]
pub(crate) struct CsvTable {
    pub header: Vec<String>,
    pub records: Vec<(usize, Vec<String>)>,
}

impl CsvTable {
    /// The index of `name` in the header (exact match after trimming; case-insensitive).
    pub fn column(&self, name: &str) -> Option<usize> {
        self.header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    }

    /// Indices of `names`, or an error naming every missing one.
    pub fn require(&self, path: &Path, names: &[&str]) -> Result<Vec<usize>, DataError> {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| self.column(n).is_none())
            .map(|n| n.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(DataError::MissingColumns {
                path: path.to_path_buf(),
                missing,
                found: self.header.clone(),
            });
        }
        Ok(names.iter().filter_map(|n| self.column(n)).collect())
    }
}

/// Parses RFC 4180 CSV: quoted fields may hold commas, doubled quotes and line breaks; CRLF and a
/// UTF-8 BOM are accepted; blank lines are skipped, and so are lines starting with `#` when
/// `comments` is set. Records are returned as read: checking field counts is the caller's job.
pub(crate) fn parse_csv(text: &str, path: &Path, comments: bool) -> Result<CsvTable, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records: Vec<(usize, Vec<String>)> = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start_line = line;
        if comments && chars.peek() == Some(&'#') {
            for c in chars.by_ref() {
                if c == '\n' {
                    line += 1;
                    break;
                }
            }
            continue;
        }
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut was_quoted = false;
        loop {
            let Some(c) = chars.next() else {
                if quoted {
                    return Err(DataError::Malformed {
                        path: path.to_path_buf(),
                        line: start_line,
                        reason: "unterminated quoted field".to_string(),
                    });
                }
                break;
            };
            if quoted {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => quoted = false,
                    '\n' => {
                        line += 1;
                        field.push(c);
                    }
                    _ => field.push(c),
                }
                continue;
            }
            match c {
                '"' if field.trim().is_empty() && !was_quoted => {
                    field.clear();
                    quoted = true;
                    was_quoted = true;
                }
                ',' => {
                    fields.push(std::mem::take(&mut field));
                    was_quoted = false;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    break;
                }
                _ => field.push(c),
            }
        }
        fields.push(field);
        if fields.len() == 1 && fields[0].trim().is_empty() {
            continue; // blank line
        }
        records.push((start_line, fields));
    }
    if records.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    let (_, header) = records.remove(0);
    Ok(CsvTable {
        header: header.into_iter().map(|h| h.trim().to_string()).collect(),
        records,
    })
}

/// Reads a text file, naming it on failure.
pub(crate) fn read_text(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_handles_quotes_crlf_bom_and_reports_lines() {
        let text = "\u{feff}name,prompt\r\na.jpg,\"x, \"\"y\"\"\"\r\n\r\nb.jpg,\"two\nlines\"\nc.jpg,plain\n";
        let t = parse_csv(text, Path::new("t.csv"), false).unwrap();
        assert_eq!(t.header, vec!["name", "prompt"]);
        let lines: Vec<usize> = t.records.iter().map(|r| r.0).collect();
        assert_eq!(lines, vec![2, 4, 6]);
        assert_eq!(t.records[0].1, vec!["a.jpg", "x, \"y\""]);
        assert_eq!(t.records[1].1, vec!["b.jpg", "two\nlines"]);
        let err = parse_csv("a\n\"open", Path::new("t.csv"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.csv line 2") && err.contains("unterminated"),
            "{err}"
        );
        let t = parse_csv("# scale: 0,5\npath,score\nx,1\n", Path::new("m.csv"), true).unwrap();
        assert_eq!((t.header.len(), t.records[0].0), (2, 3));
    }

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

    #[test]
    fn scores_reject_empty_nan_inf_and_text() {
        assert_eq!(parse_score(" 2.5 ", "mos"), Ok(2.5));
        for (cell, want) in [
            ("", "empty"),
            ("nan", "NaN"),
            ("-inf", "infinite"),
            ("x", "not a number"),
        ] {
            let err = parse_score(cell, "mos").unwrap_err();
            assert!(err.contains(want), "{cell}: {err}");
        }
    }
}
