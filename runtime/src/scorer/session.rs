//! One ONNX Runtime session as a [`BatchRunner`]: plain runs (a tensor view over the caller's
//! data), or IoBinding runs through buffers it owns.

use std::path::PathBuf;

use ort::session::Session;
use ort::value::TensorRef;

use super::devices::{Batch, BatchRunner};
use super::error::{classify_run_error, RunContext, ScoreError};
use super::io_binding::Bound;
use super::options::ExecutionProvider;
use crate::metadata::OUTPUT_SCORES;

pub(crate) struct SessionRunner {
    pub session: Session,
    pub bound: Option<Bound>,
    pub provider: ExecutionProvider,
    /// TensorRT's keyed cache folder (named in build errors).
    pub cache_dir: Option<PathBuf>,
    pub input_name: &'static str,
    pub image_size: usize,
    pub output_name: &'static str,
    pub heads: usize,
    /// The graph's fixed batch: plain runs pad to it.
    pub fixed_batch: Option<usize>,
}

impl BatchRunner for SessionRunner {
    fn run(&mut self, batch: Batch<'_>) -> Result<Vec<Vec<f32>>, ScoreError> {
        let rows = batch.rows();
        let result = match &mut self.bound {
            Some(bound) => bound.run(&mut self.session, batch),
            None => self.run_plain(batch),
        };
        let scores = result.map_err(|message| {
            classify_run_error(
                message,
                &RunContext {
                    provider: self.provider,
                    batch_size: rows,
                    cache_dir: self.cache_dir.as_deref(),
                },
            )
        })?;
        if scores.len() != rows || scores.iter().any(|s| s.len() != self.heads) {
            return Err(ScoreError::Inference(format!(
                "output `{}` has {} rows; expected [{rows}{}]",
                self.output_name,
                scores.len(),
                if self.output_name == OUTPUT_SCORES {
                    format!(", {}", self.heads)
                } else {
                    String::new()
                }
            )));
        }
        Ok(scores)
    }
}

impl SessionRunner {
    fn run_plain(&mut self, batch: Batch<'_>) -> Result<Vec<Vec<f32>>, String> {
        let r = self.image_size;
        let rows = batch.rows();
        let padded_rows = self.fixed_batch.filter(|&n| n > rows).unwrap_or(rows);
        let (padded_f32, padded_u8);
        let value: ort::session::SessionInputValue<'_> = match batch {
            Batch::PixelValues { data, .. } => {
                padded_f32 = pad(data, rows, padded_rows);
                let data = padded_f32.as_deref().unwrap_or(data);
                TensorRef::from_array_view(([padded_rows, 3, r, r], data))
                    .map_err(|e| e.to_string())?
                    .into_dyn()
                    .into()
            }
            Batch::PixelsUint8 { data, .. } => {
                padded_u8 = pad(data, rows, padded_rows);
                let data = padded_u8.as_deref().unwrap_or(data);
                TensorRef::from_array_view(([padded_rows, r, r, 3], data))
                    .map_err(|e| e.to_string())?
                    .into_dyn()
                    .into()
            }
        };
        let outputs = self
            .session
            .run(ort::inputs![self.input_name => value])
            .map_err(|e| e.to_string())?;
        let output = outputs
            .get(self.output_name)
            .ok_or_else(|| format!("no output `{}`", self.output_name))?;
        let (shape, values) = output
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        let got = shape.first().copied().unwrap_or(0) as usize;
        if values.len() != got * self.heads || got < rows {
            return Err(format!(
                "output `{}` has shape {shape:?}; expected [{rows}{}]",
                self.output_name,
                if self.output_name == OUTPUT_SCORES {
                    format!(", {}", self.heads)
                } else {
                    String::new()
                }
            ));
        }
        Ok(values
            .chunks(self.heads)
            .take(rows)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Zero rows up to a graph's fixed batch size (`None` when nothing is missing).
fn pad<T: Copy + Default>(data: &[T], rows: usize, padded_rows: usize) -> Option<Vec<T>> {
    (padded_rows > rows).then(|| {
        let per_row = data.len() / rows.max(1);
        let mut padded = data.to_vec();
        padded.resize(padded_rows * per_row, T::default());
        padded
    })
}
