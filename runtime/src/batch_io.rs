//! What `agiqa score` reads and writes: the image list (files, folders, globs, list files) and
//! the result stream (JSONL or CSV, one flushed line per image, resumable).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::csv_line::csv_line;

/// File extensions taken from folders (files named explicitly are always taken).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "png", "gif", "webp", "bmp", "tif", "tiff",
];

/// Why the image list could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InputListError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("invalid glob pattern '{pattern}': {reason}")]
    Pattern { pattern: String, reason: String },
}

/// Expands command-line inputs into image paths, in order, without duplicates: a folder
/// contributes its image files recursively (sorted), a pattern with `*`, `?` or `[` its glob
/// matches (sorted), anything else is taken as a file (a missing one becomes that file's error
/// later, not a failure of the whole run). `lists` are files with one path per line (blank
/// lines and `#` comments skipped; relative paths are relative to the list's folder).
pub fn collect_inputs(
    inputs: &[String],
    lists: &[PathBuf],
) -> Result<Vec<PathBuf>, InputListError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |p: PathBuf, out: &mut Vec<PathBuf>| {
        if seen.insert(p.clone()) {
            out.push(p);
        }
    };
    for list in lists {
        let file = File::open(list).map_err(|source| InputListError::Read {
            path: list.clone(),
            source,
        })?;
        let base = list.parent().unwrap_or(Path::new(""));
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|source| InputListError::Read {
                path: list.clone(),
                source,
            })?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            push(base.join(line), &mut out);
        }
    }
    for input in inputs {
        let path = Path::new(input);
        if path.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found)?;
            found.sort();
            for p in found {
                push(p, &mut out);
            }
        } else if !path.exists() && input.contains(['*', '?', '[']) {
            let matches = glob::glob(input).map_err(|e| InputListError::Pattern {
                pattern: input.clone(),
                reason: e.to_string(),
            })?;
            let mut found: Vec<PathBuf> = matches
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            found.sort();
            for p in found {
                push(p, &mut out);
            }
        } else {
            push(path.to_path_buf(), &mut out);
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), InputListError> {
    let read_err = |source| InputListError::Read {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Result file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON object a line: `{"path", "scores": {head: score}}` or `{"path", "error"}`.
    Jsonl,
    /// `path,<head>...,error` with a header row.
    Csv,
}

impl OutputFormat {
    /// CSV for `.csv` files, JSONL otherwise.
    pub fn for_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => OutputFormat::Csv,
            _ => OutputFormat::Jsonl,
        }
    }
}

/// Writes one line per image and flushes it, so that a crash loses at most the line being
/// written (and `--resume` drops such a partial last line).
pub struct ResultWriter<W: Write> {
    out: W,
    format: OutputFormat,
    heads: Vec<String>,
}

impl<W: Write> ResultWriter<W> {
    /// A writer; `write_header` is false when appending to a file that already has one.
    pub fn new(
        mut out: W,
        format: OutputFormat,
        heads: &[&str],
        write_header: bool,
    ) -> io::Result<Self> {
        let heads: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
        if format == OutputFormat::Csv && write_header {
            let row = std::iter::once("path")
                .chain(heads.iter().map(String::as_str))
                .chain(["error"]);
            out.write_all(csv_line(row).as_bytes())?;
            out.flush()?;
        }
        Ok(ResultWriter { out, format, heads })
    }

    /// One image's outcome.
    pub fn write(&mut self, path: &Path, result: Result<&[f32], &str>) -> io::Result<()> {
        let path_text = path.to_string_lossy();
        match self.format {
            OutputFormat::Jsonl => {
                let line = match result {
                    Ok(scores) => {
                        let map: Map<String, Value> = self
                            .heads
                            .iter()
                            .zip(scores)
                            .map(|(h, s)| (h.clone(), json!(s)))
                            .collect();
                        json!({ "path": path_text, "scores": map })
                    }
                    Err(e) => json!({ "path": path_text, "error": e }),
                };
                writeln!(self.out, "{line}")?;
            }
            OutputFormat::Csv => {
                let mut row = vec![path_text.into_owned()];
                match result {
                    Ok(scores) => {
                        row.extend(scores.iter().map(|s| s.to_string()));
                        row.push(String::new());
                    }
                    Err(e) => {
                        row.extend(self.heads.iter().map(|_| String::new()));
                        row.push(e.to_string());
                    }
                }
                self.out.write_all(csv_line(&row).as_bytes())?;
            }
        }
        self.out.flush()
    }
}

/// Paths already recorded in an existing result file (scored or failed), for `--resume`.
/// A partial last line (a crash mid-write) does not count, and is cut off so that appending
/// starts on a fresh line. Returns an empty set when the file does not exist.
pub fn recorded_paths(path: &Path, format: OutputFormat) -> io::Result<HashSet<PathBuf>> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let complete = complete_len(&text, format);
    if complete < text.len() {
        file.set_len(complete as u64)?;
        file.seek(SeekFrom::End(0))?;
    }
    let text = &text[..complete];
    let mut done = HashSet::new();
    match format {
        OutputFormat::Jsonl => {
            for line in text.lines() {
                if let Some(p) = serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|v| v.get("path").and_then(Value::as_str).map(PathBuf::from))
                {
                    done.insert(p);
                }
            }
        }
        OutputFormat::Csv => {
            // The header row is skipped; `flexible` keeps a row of another head count readable.
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(true)
                .flexible(true)
                .from_reader(text.as_bytes());
            for record in reader.records() {
                if let Some(p) = record?.get(0) {
                    done.insert(PathBuf::from(p));
                }
            }
        }
    }
    Ok(done)
}

/// Length of the complete lines of a result file. JSON escapes newlines inside strings, so a
/// JSONL line ends at every `\n`; in CSV a `\n` inside a quoted field (an odd number of quotes
/// before it) does not end the row.
fn complete_len(text: &str, format: OutputFormat) -> usize {
    match format {
        OutputFormat::Jsonl => text.rfind('\n').map_or(0, |i| i + 1),
        OutputFormat::Csv => {
            let mut quoted = false;
            let mut complete = 0;
            for (i, b) in text.bytes().enumerate() {
                match b {
                    b'"' => quoted = !quoted,
                    b'\n' if !quoted => complete = i + 1,
                    _ => {}
                }
            }
            complete
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_awkward_paths() {
        let mut buf = Vec::new();
        let mut w = ResultWriter::new(&mut buf, OutputFormat::Csv, &["quality"], true).unwrap();
        w.write(Path::new("a,b \"c\".png"), Ok(&[1.5])).unwrap();
        w.write(Path::new("plain.jpg"), Err("corrupt, truncated"))
            .unwrap();
        let rows: Vec<Vec<String>> = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(buf.as_slice())
            .records()
            .map(|r| r.unwrap().iter().map(str::to_string).collect())
            .collect();
        assert_eq!(rows[0], ["path", "quality", "error"]);
        assert_eq!(rows[1], ["a,b \"c\".png", "1.5", ""]);
        assert_eq!(rows[2], ["plain.jpg", "", "corrupt, truncated"]);
    }

    #[test]
    fn csv_resume_reads_back_paths_with_carriage_returns_and_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.csv");
        let awkward = [
            Path::new("shot\r1.png"),
            Path::new("two\r\nlines,\"q\".jpg"),
            Path::new("plain.png"),
        ];
        let file = File::create(&out).unwrap();
        let mut w =
            ResultWriter::new(file, OutputFormat::Csv, &["quality", "alignment"], true).unwrap();
        w.write(awkward[0], Ok(&[1.0, 2.0])).unwrap();
        w.write(awkward[1], Err("bad\rpixels")).unwrap();
        w.write(awkward[2], Ok(&[3.0, 4.0])).unwrap();
        drop(w);
        let done = recorded_paths(&out, OutputFormat::Csv).unwrap();
        assert_eq!(done, awkward.iter().map(|p| p.to_path_buf()).collect());
    }

    #[test]
    fn csv_resume_cuts_a_partial_row_even_inside_a_quoted_newline() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.csv");
        let whole = "path,quality,error\na.png,1.5,\n";
        // A crash while writing `"b\nc.png",2.5,`: the last `\n` is inside the quotes.
        std::fs::write(&out, format!("{whole}\"b\nc.p")).unwrap();
        let done = recorded_paths(&out, OutputFormat::Csv).unwrap();
        assert_eq!(done, HashSet::from([PathBuf::from("a.png")]));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), whole);
    }

    #[test]
    fn resume_ignores_and_cuts_a_partial_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.jsonl");
        std::fs::write(&out, "{\"path\":\"a.jpg\",\"scores\":{}}\n{\"path\":\"b.jp").unwrap();
        let done = recorded_paths(&out, OutputFormat::Jsonl).unwrap();
        assert_eq!(done, HashSet::from([PathBuf::from("a.jpg")]));
        assert!(std::fs::read_to_string(&out).unwrap().ends_with("}\n"));
        assert!(
            recorded_paths(&dir.path().join("none.jsonl"), OutputFormat::Jsonl)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn folders_globs_and_lists_expand_in_order_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        for f in ["b.png", "a.JPG", "sub/c.webp", "notes.txt"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::fs::write(d.join("list.txt"), "# picked\nb.png\n\nmissing.jpg\n").unwrap();
        let inputs = vec![d.display().to_string(), format!("{}/*.png", d.display())];
        let got = collect_inputs(&inputs, &[d.join("list.txt")]).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.strip_prefix(d).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["b.png", "missing.jpg", "a.JPG", "sub/c.webp"]);
    }
}
