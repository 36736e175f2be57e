//! Manifests: any set of scored images, listed in a CSV or JSONL file.
//!
//! CSV (header required):
//! ```text
//! # scale: 0,5
//! path,score,split,prompt
//! img/001.png,3.2,train,a red car
//! ```
//! JSONL (one object per line, same keys): `{"path": "img/001.png", "score": 3.2, "split": "train"}`.
//!
//! - `path` (required): the image, relative to the manifest's folder unless absolute. It is also
//!   the sample id ([`super::Sample::name`]), so it must be unique.
//! - `score` or `mos` (required): the MOS.
//! - `split` (optional): `train`, `val` or `test`; honoured by `agiqa_trainer::data::split::manifest_split`.
//! - `prompt` (optional): groups images for prompt-grouped random splits.
//! - `dimension` (optional): lets one manifest hold several rated dimensions; only the rows of
//!   [`super::LoadOptions::dimension`] (default `quality`) are loaded.
//!
//! Lines starting with `#` are comments. A comment `# scale: <min>,<max>` declares the nominal MOS
//! range: scores outside it are invalid rows. Without it the scale is the observed min and max.

use std::path::{Path, PathBuf};

use super::{
    finish, parse_csv, parse_score, read_text, Candidate, DataError, Dataset, DatasetHeader,
    LoadOptions, Sample, SplitPart, ValidationReport,
};

/// The default dimension of a manifest, when neither the options nor the file choose one.
pub const DEFAULT_DIMENSION: &str = "quality";

/// One row as read, before the shared checks.
struct RawRow {
    line: usize,
    path: String,
    score: Result<f64, String>,
    split: String,
    prompt: String,
    dimension: String,
    problems: Vec<String>,
}

/// Loads a `.csv` or `.jsonl` manifest (by extension; anything else is read as CSV).
pub fn load(file: &Path, options: &LoadOptions) -> Result<(Dataset, ValidationReport), DataError> {
    load_text(&read_text(file)?, file, options)
}

/// [`load`] on a manifest already read into memory: `file` chooses the format (by extension),
/// the image root (its folder) and names the manifest in errors.
pub fn load_text(
    text: &str,
    file: &Path,
    options: &LoadOptions,
) -> Result<(Dataset, ValidationReport), DataError> {
    let scale = declared_scale(text, file)?;
    let jsonl = file
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let (rows, has_dimension) = if jsonl {
        read_jsonl(text, file)?
    } else {
        read_csv(text, file)?
    };
    let dimension = if has_dimension {
        pick_dimension(&rows, file, options)?
    } else {
        options
            .dimension
            .clone()
            .unwrap_or_else(|| DEFAULT_DIMENSION.to_string())
    };
    let root = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let candidates = rows
        .into_iter()
        .filter(|r| !has_dimension || r.dimension.eq_ignore_ascii_case(&dimension))
        .map(|r| {
            let mut problems = r.problems;
            let mos = r.score.unwrap_or_else(|p| {
                problems.push(p);
                f64::NAN
            });
            if r.path.is_empty() {
                problems.push("empty path".to_string());
            }
            let split = if r.split.is_empty() {
                None
            } else {
                r.split
                    .parse::<SplitPart>()
                    .map_err(|p| problems.push(p))
                    .ok()
            };
            Candidate {
                row: r.line,
                sample: Sample {
                    path: root.join(&r.path),
                    mos,
                    prompt: (!r.prompt.is_empty()).then_some(r.prompt),
                    name: r.path,
                    split,
                },
                problems,
            }
        })
        .collect();
    finish(
        DatasetHeader {
            name: "manifest".to_string(),
            dimension,
            scale,
            root,
            file: file.to_path_buf(),
        },
        candidates,
        options,
    )
}

/// The `# scale: min,max` comment, if any.
fn declared_scale(text: &str, file: &Path) -> Result<Option<(f64, f64)>, DataError> {
    for (i, line) in text.lines().enumerate() {
        let Some(comment) = line.trim_start_matches('\u{feff}').trim().strip_prefix('#') else {
            continue;
        };
        let Some(value) = comment.trim().strip_prefix("scale:") else {
            continue;
        };
        let bad = || DataError::Malformed {
            path: file.to_path_buf(),
            line: i + 1,
            reason: format!("`# scale:{value}` must be two numbers `min,max` with min < max"),
        };
        let (lo, hi) = value.split_once(',').ok_or_else(bad)?;
        let (lo, hi) = match (lo.trim().parse::<f64>(), hi.trim().parse::<f64>()) {
            (Ok(lo), Ok(hi)) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
            _ => return Err(bad()),
        };
        return Ok(Some((lo, hi)));
    }
    Ok(None)
}

fn read_csv(text: &str, file: &Path) -> Result<(Vec<RawRow>, bool), DataError> {
    let table = parse_csv(text, file, true)?;
    let score_name = if table.column("score").is_some() {
        "score"
    } else if table.column("mos").is_some() {
        "mos"
    } else {
        "score (or mos)"
    };
    let columns = table.require(file, &["path", score_name])?;
    let (path_col, score_col) = (columns[0], columns[1]);
    let split_col = table.column("split");
    let prompt_col = table.column("prompt");
    let dimension_col = table.column("dimension");
    let width = table.header.len();
    let rows = table
        .records
        .iter()
        .map(|(line, record)| {
            let cell = |i: Option<usize>| {
                i.and_then(|i| record.get(i))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            let mut problems = Vec::new();
            if record.len() != width {
                problems.push(format!("{} fields, header has {width}", record.len()));
            }
            RawRow {
                line: *line,
                path: cell(Some(path_col)),
                score: parse_score(&cell(Some(score_col)), score_name),
                split: cell(split_col),
                prompt: cell(prompt_col),
                dimension: cell(dimension_col),
                problems,
            }
        })
        .collect();
    Ok((rows, dimension_col.is_some()))
}

fn read_jsonl(text: &str, file: &Path) -> Result<(Vec<RawRow>, bool), DataError> {
    use serde_json::Value;
    let mut rows = Vec::new();
    let (mut any_path, mut any_score, mut any_dimension) = (false, false, false);
    for (i, line) in text.lines().enumerate() {
        let line = line.trim().trim_start_matches('\u{feff}');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut row = RawRow {
            line: i + 1,
            path: String::new(),
            score: Err("no `score` (or `mos`)".to_string()),
            split: String::new(),
            prompt: String::new(),
            dimension: String::new(),
            problems: Vec::new(),
        };
        let object = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => object,
            Ok(_) => {
                row.problems.push("not a JSON object".to_string());
                rows.push(row);
                continue;
            }
            Err(e) => {
                row.problems.push(format!("invalid JSON: {e}"));
                rows.push(row);
                continue;
            }
        };
        let text_of = |key: &str| match object.get(key) {
            Some(Value::String(s)) => s.trim().to_string(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        if object.contains_key("path") {
            any_path = true;
        } else {
            row.problems.push("no `path`".to_string());
        }
        row.path = text_of("path");
        let key = ["score", "mos"]
            .into_iter()
            .find(|k| object.contains_key(*k));
        if let Some(key) = key {
            any_score = true;
            row.score = match &object[key] {
                Value::Number(n) => n
                    .as_f64()
                    .ok_or_else(|| format!("{key} is not representable"))
                    .and_then(|v| parse_score(&v.to_string(), key)),
                Value::String(s) => parse_score(s, key),
                Value::Null => Err(format!("empty {key}")),
                other => Err(format!("{key} `{other}` is not a number")),
            };
        }
        row.split = text_of("split");
        row.prompt = text_of("prompt");
        any_dimension |= object.contains_key("dimension");
        row.dimension = text_of("dimension");
        rows.push(row);
    }
    let mut missing = Vec::new();
    if !any_path {
        missing.push("path".to_string());
    }
    if !any_score {
        missing.push("score (or mos)".to_string());
    }
    if !missing.is_empty() && !rows.is_empty() {
        return Err(DataError::MissingColumns {
            path: file.to_path_buf(),
            missing,
            found: Vec::new(),
        });
    }
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: file.to_path_buf(),
        });
    }
    Ok((rows, any_dimension))
}

/// With a `dimension` column: the requested one (which must occur), else `quality` when present,
/// else the only one.
fn pick_dimension(
    rows: &[RawRow],
    file: &Path,
    options: &LoadOptions,
) -> Result<String, DataError> {
    let mut present: Vec<String> = Vec::new();
    for r in rows {
        if !r.dimension.is_empty() && !present.iter().any(|p| p.eq_ignore_ascii_case(&r.dimension))
        {
            present.push(r.dimension.clone());
        }
    }
    let unknown = |given: &str| DataError::UnknownDimension {
        dataset: file.display().to_string(),
        given: given.to_string(),
        valid: present.clone(),
    };
    match options.dimension.as_deref() {
        Some(given) => present
            .iter()
            .find(|p| p.eq_ignore_ascii_case(given.trim()))
            .cloned()
            .ok_or_else(|| unknown(given)),
        None if present
            .iter()
            .any(|p| p.eq_ignore_ascii_case(DEFAULT_DIMENSION)) =>
        {
            Ok(DEFAULT_DIMENSION.to_string())
        }
        None if present.len() == 1 => Ok(present[0].clone()),
        None => Err(unknown("(none chosen)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_comment_is_parsed_and_checked() {
        assert_eq!(
            declared_scale("# scale: 0, 5\npath,score\n", Path::new("m.csv")).unwrap(),
            Some((0.0, 5.0))
        );
        assert_eq!(
            declared_scale("path,score\n", Path::new("m.csv")).unwrap(),
            None
        );
        let err = declared_scale("# note\n# scale: 5,0\n", Path::new("m.csv"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.csv line 2"), "{err}");
    }

    #[test]
    fn dimension_column_selects_rows() {
        let dir = std::env::temp_dir().join(format!("manifest-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        image::RgbImage::new(2, 2).save(dir.join("a.png")).unwrap();
        let file = dir.join("m.csv");
        std::fs::write(
            &file,
            "path,mos,dimension\na.png,1,quality\na.png,7,aesthetics\n",
        )
        .unwrap();
        let (ds, _) = load(&file, &LoadOptions::default()).unwrap();
        assert_eq!((ds.dimension.as_str(), ds.mos()), ("quality", vec![1.0]));
        let options = LoadOptions {
            dimension: Some("Aesthetics".into()),
            ..LoadOptions::default()
        };
        assert_eq!(load(&file, &options).unwrap().0.mos(), vec![7.0]);
        let options = LoadOptions {
            dimension: Some("alignment".into()),
            ..LoadOptions::default()
        };
        let err = load(&file, &options).unwrap_err().to_string();
        assert!(err.contains("quality, aesthetics"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
