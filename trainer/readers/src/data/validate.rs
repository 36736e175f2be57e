//! The checks every dataset format shares (ids, scores, scale, images), and the keep-or-fail
//! decision with its report of bad rows.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use super::image_check::check_images;
use super::{DataError, Dataset, LoadOptions, Sample};

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

#[cfg(test)]
mod tests {
    use super::*;

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
