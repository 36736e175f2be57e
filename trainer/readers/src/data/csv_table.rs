//! Dataset tables (AGIQA-3K's `data.csv`, CSV manifests) read with the `csv` crate, keeping the
//! line each record starts on so that validation errors can name it.

use std::path::Path;

use super::DataError;

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
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(comments.then_some(b'#'))
        .from_reader(text.as_bytes());
    let mut records: Vec<(usize, Vec<String>)> = Vec::new();
    let (mut last_start, mut line) = (0, 1);
    for record in reader.records() {
        let record = record.map_err(|e| DataError::Malformed {
            path: path.to_path_buf(),
            line: e
                .position()
                .map_or(0, |p| line_at(text, record_start(text, p.byte(), comments))),
            reason: e.to_string(),
        })?;
        let byte = record_start(text, record.position().map_or(0, |p| p.byte()), comments);
        // Counted on from the previous record (the csv crate's own line count lags behind
        // CRLF endings, blank lines and quoted line breaks).
        line += text.as_bytes()[last_start..byte]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        last_start = byte;
        let fields: Vec<String> = record.iter().map(str::to_string).collect();
        if fields.len() == 1 && fields[0].trim().is_empty() {
            continue; // a line of spaces
        }
        records.push((line, fields));
    }
    // The csv crate ends an unterminated quoted field at the end of the file without an error;
    // an odd number of quotes in the last record is that case (RFC 4180 pairs every quote).
    if text[last_start.min(text.len())..].matches('"').count() % 2 == 1 {
        return Err(DataError::Malformed {
            path: path.to_path_buf(),
            line,
            reason: "unterminated quoted field".to_string(),
        });
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

/// Where the record the csv crate places at `position` really starts: its positions point at the
/// end of what came before (a CRLF's `\n`, blank or comment lines), which are skipped here.
fn record_start(text: &str, position: u64, comments: bool) -> usize {
    let bytes = text.as_bytes();
    let mut at = (position as usize).min(bytes.len());
    loop {
        match bytes.get(at) {
            Some(b'\r' | b'\n') => at += 1,
            Some(b'#') if comments => {
                at = bytes[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |n| at + n + 1);
            }
            _ => return at,
        }
    }
}

/// The 1-based line of byte offset `byte` of `text`.
fn line_at(text: &str, byte: usize) -> usize {
    let byte = byte.min(text.len());
    1 + text.as_bytes()[..byte]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
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
}
