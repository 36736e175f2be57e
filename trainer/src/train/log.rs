//! The per-epoch log of a training run (`log.jsonl`): appended and fsynced after every epoch,
//! cut back to the checkpoint a resumed run continues from.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{write_err, TrainError};

/// One epoch's log line (`log.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub selected_on: String,
    // NaN (a constant prediction, a failed logistic fit) is written as JSON null: read it back.
    #[serde(deserialize_with = "agiqa_runtime::metrics::nan_from_null")]
    pub plcc: f64,
    #[serde(deserialize_with = "agiqa_runtime::metrics::nan_from_null")]
    pub srcc: f64,
    #[serde(deserialize_with = "agiqa_runtime::metrics::nan_from_null")]
    pub krcc: f64,
    #[serde(deserialize_with = "agiqa_runtime::metrics::nan_from_null")]
    pub plcc_logistic: f64,
    pub seconds: f64,
}

/// Appends one line and syncs it to disk: a killed run keeps every finished epoch's line.
pub(crate) fn append_log(path: &Path, entry: &EpochLog) -> Result<(), TrainError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(write_err(path))?;
    let line = serde_json::to_string(entry).map_err(|e| TrainError::Invalid(e.to_string()))?;
    writeln!(file, "{line}").map_err(write_err(path))?;
    file.sync_data().map_err(write_err(path))
}

/// Reads `log.jsonl`.
pub fn read_log(path: &Path) -> Result<Vec<EpochLog>, TrainError> {
    let raw = std::fs::read_to_string(path).map_err(write_err(path))?;
    raw.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
        })
        .collect()
}

/// Drops log lines of epochs after the checkpoint a resumed run continues from.
pub(crate) fn truncate_log(path: &Path, epochs_done: usize) -> Result<(), TrainError> {
    if !path.exists() {
        return Ok(());
    }
    let kept: Vec<String> = read_log(path)?
        .into_iter()
        .filter(|e| e.epoch <= epochs_done)
        .filter_map(|e| serde_json::to_string(&e).ok())
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    agiqa_runtime::atomic_file::write_atomic(path, text.as_bytes()).map_err(write_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_metrics_survive_the_log_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let line = |epoch| EpochLog {
            epoch,
            lr: 0.002,
            train_loss: 1.0,
            selected_on: "val".into(),
            plcc: 0.5,
            srcc: f64::NAN,
            krcc: 0.1,
            plcc_logistic: f64::NAN,
            seconds: 1.0,
        };
        let text: String = [line(1), line(2)]
            .iter()
            .map(|l| serde_json::to_string(l).unwrap() + "\n")
            .collect();
        assert!(text.contains("null"), "{text}");
        std::fs::write(&path, text).unwrap();
        truncate_log(&path, 1).unwrap();
        let read = read_log(&path).unwrap();
        assert_eq!(read.len(), 1);
        assert!(read[0].srcc.is_nan() && read[0].plcc_logistic.is_nan());
        assert_eq!(read[0].plcc, 0.5);
    }
}
