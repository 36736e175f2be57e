//! What a run reports: each split's result, the summary over splits (mean ± std), and the labels
//! that say how a number was obtained (which set chose the checkpoint).

use std::path::PathBuf;

use agiqa_runtime::metrics::Correlations;
use serde::{Deserialize, Serialize};

use super::TrainJob;
use crate::data::Split;
use crate::device::device_name;
use crate::model::Variant;
use crate::precision::Precision;

/// Result of one split.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SplitResult {
    pub split: String,
    pub protocol: String,
    pub best_epoch: usize,
    pub selected_on: String,
    /// Metrics of the selected checkpoint on the test part.
    pub test: Correlations,
    pub run_dir: PathBuf,
}

/// Results over all splits, with mean ± std where there are several.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub dataset: String,
    pub dimension: String,
    pub clip: String,
    pub variant: Variant,
    /// Where CLIP ran (`cpu`, `cuda:0`) and in which precision (context and head: fp32).
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub precision: Precision,
    pub splits: Vec<SplitResult>,
    /// `(mean, std)` of PLCC, SRCC, KRCC, logistic PLCC over splits.
    pub mean_std: [(f64, f64); 4],
}

pub(crate) fn selection_name(split: &Split) -> &'static str {
    if split.val.is_empty() {
        "test"
    } else {
        "val"
    }
}

/// How a number was obtained, for every output.
pub fn protocol_label(split: &Split) -> String {
    if split.val.is_empty() {
        format!(
            "{} — best epoch selected on the TEST set (paper protocol, optimistic)",
            split.label
        )
    } else {
        format!("{} — checkpoint selected on validation", split.label)
    }
}

pub(crate) fn summarise(job: &TrainJob<'_>, splits: Vec<SplitResult>) -> RunSummary {
    let stat = |f: &dyn Fn(&Correlations) -> f64| {
        let values: Vec<f64> = splits.iter().map(|s| f(&s.test)).collect();
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        (mean, var.sqrt())
    };
    RunSummary {
        dataset: job.dataset.name.clone(),
        dimension: job.dataset.dimension.clone(),
        clip: format!(
            "{} ({})",
            job.clip.config().name(),
            job.clip_source.describe()
        ),
        variant: job.config.model.variant,
        device: device_name(job.clip.device()),
        precision: job.clip.precision(),
        mean_std: [
            stat(&|c| c.plcc),
            stat(&|c| c.srcc),
            stat(&|c| c.krcc),
            stat(&|c| c.plcc_logistic),
        ],
        splits,
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} / {} — CLIP {} — variant {:?} — {} {}",
            self.dataset, self.dimension, self.clip, self.variant, self.device, self.precision
        )?;
        writeln!(
            f,
            "{:<6} {:>8} {:>8} {:>8} {:>10}  protocol",
            "split", "PLCC", "SRCC", "KRCC", "PLCC(log)"
        )?;
        for (i, s) in self.splits.iter().enumerate() {
            writeln!(
                f,
                "{:<6} {:>8.4} {:>8.4} {:>8.4} {:>10.4}  {} (epoch {})",
                i,
                s.test.plcc,
                s.test.srcc,
                s.test.krcc,
                s.test.plcc_logistic,
                s.protocol,
                s.best_epoch
            )?;
        }
        if self.splits.len() > 1 {
            let [p, s, k, l] = self.mean_std;
            writeln!(
                f,
                "{:<6} {:.4}±{:.4} {:.4}±{:.4} {:.4}±{:.4} {:.4}±{:.4}  mean ± std over {} splits",
                "all",
                p.0,
                p.1,
                s.0,
                s.1,
                k.0,
                k.1,
                l.0,
                l.1,
                self.splits.len()
            )?;
        }
        Ok(())
    }
}
