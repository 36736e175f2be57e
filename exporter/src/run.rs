//! One export as `agiqa-export` runs it, as a library call: checkpoint descriptions checked
//! for a shared encoder, checkpoints loaded, graph built and written, optionally verified
//! against the trainer, written as a Triton entry and summarised in a JSON report.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use agiqa_runtime::atomic_file::write_atomic;
use agiqa_runtime::metadata::Int8Mode;
use agiqa_trainer::checkpoint::{load_checkpoint, CheckpointMeta, LoadedCheckpoint};
use agiqa_trainer::clip::Clip;
use agiqa_trainer::tokenizer::ClipTokenizer;
use serde::Serialize;

use crate::export::{build_model, check_shared_encoder, write_model, ExportOptions, HeadSource};
use crate::graph::Precision;
use crate::int8::{build_int8_model, Int8Export};
use crate::triton::{config_pbtxt, write_repository, TritonOptions};
use crate::verify::{verify, VerifyOptions, VerifyReport};
use crate::{ExportError, InputKind};

/// A checkpoint stem (`runs/x/best`) and the head name it gets in the graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedCheckpoint {
    /// Output column name (`None`: the checkpoint's quality dimension).
    pub name: Option<String>,
    /// The checkpoint without extension (`<stem>.json` + `<stem>.safetensors`).
    pub stem: PathBuf,
}

impl FromStr for NamedCheckpoint {
    type Err = Infallible;

    /// `NAME=PATH` or `PATH` (an `=` after a `/` belongs to the path).
    fn from_str(spec: &str) -> Result<Self, Infallible> {
        Ok(match spec.split_once('=') {
            Some((name, stem)) if !name.contains('/') => NamedCheckpoint {
                name: Some(name.to_string()),
                stem: PathBuf::from(stem),
            },
            _ => NamedCheckpoint {
                name: None,
                stem: PathBuf::from(spec),
            },
        })
    }
}

/// Where a Triton model repository entry goes, and how it is configured.
#[derive(Clone, Debug)]
pub struct TritonEntry {
    /// The repository folder; the entry is `<repo>/<options.name>/`.
    pub repo: PathBuf,
    /// Name, batching, instances and TensorRT settings of the entry.
    pub options: TritonOptions,
}

/// Everything one export does.
#[derive(Clone, Debug)]
pub struct CheckpointExport {
    /// One or more checkpoints trained on the same CLIP; each becomes one output column.
    pub checkpoints: Vec<NamedCheckpoint>,
    /// The `.onnx` file to write.
    pub out: PathBuf,
    /// Precision, input kind and extra outputs of the graph.
    pub export: ExportOptions,
    /// CLIP weights to use instead of the source each checkpoint records.
    pub clip: Option<PathBuf>,
    /// Device for the trainer's forward (loading and verification).
    pub device: tch::Device,
    /// Compare the graph (ONNX Runtime) with the trainer's forward; `None` skips it.
    pub verify: Option<VerifyOptions>,
    /// Also write a Triton model repository entry.
    pub triton: Option<TritonEntry>,
    /// Write the [`ExportReport`] as JSON here.
    pub report: Option<PathBuf>,
    /// Quantise the graph to int8 (from fp32); with `verify`, measured against the fp32
    /// graph instead of the trainer.
    pub int8: Option<Int8Export>,
}

/// What an export wrote and measured (the JSON report).
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    /// The `.onnx` file written.
    pub onnx: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The CLIP architecture of the image encoder (e.g. `ViT-B/32`).
    pub backbone: String,
    /// Image encoder precision.
    pub precision: Precision,
    /// The graph's input kind.
    pub input: InputKind,
    /// Output columns, in order.
    pub heads: Vec<String>,
    /// Seconds spent reading checkpoints and CLIP weights.
    pub load_seconds: f64,
    /// Seconds spent building and writing the graph.
    pub export_seconds: f64,
    /// The comparison with the trainer, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
    /// What int8 quantisation did and, when verified, its accuracy against fp32 (as in the
    /// graph's metadata).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<agiqa_runtime::metadata::Quantization>,
    /// The Triton entry folder written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triton: Option<PathBuf>,
}

impl ExportReport {
    /// False when verification ran and the graph did not match the trainer; the graph is
    /// kept for inspection either way.
    pub fn passed(&self) -> bool {
        self.verify.as_ref().is_none_or(|v| v.passed)
    }
}

/// Runs one export. Mismatched checkpoints are refused from their descriptions, before any
/// CLIP is loaded; a verification that fails is a report with [`ExportReport::passed`] false,
/// not an error.
pub fn export_checkpoints(options: &CheckpointExport) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let loaded = load_checkpoints(options)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let heads: Vec<HeadSource> = loaded
        .iter()
        .map(|(name, checkpoint)| HeadSource {
            name: name.clone(),
            checkpoint,
        })
        .collect();

    let build_started = Instant::now();
    let model = match &options.int8 {
        Some(int8) => {
            // TensorRT takes static QDQ graphs (INT8 engines), not run-time quantisation.
            if int8.plan.mode == Int8Mode::Dynamic
                && options.triton.as_ref().is_some_and(|t| t.options.tensorrt)
            {
                return Err(ExportError::Unsupported(
                    "TensorRT cannot build dynamic int8 graphs; pass --int8 static, or \
                     --no-tensorrt with --triton"
                        .into(),
                ));
            }
            build_int8_model(&heads, &options.export, int8, options.verify.as_ref())?
        }
        None => build_model(&heads, &options.export)?,
    };
    let model_bytes = write_model(&options.out, &model.proto)?;
    let export_seconds = build_started.elapsed().as_secs_f64();
    let (precision, input) = (options.export.precision, options.export.input);

    let verify = match &options.verify {
        // An int8 graph is measured against the fp32 graph (its metadata holds the figures).
        Some(_) if options.int8.is_some() => None,
        Some(verify_options) => Some(
            verify(&options.out, &heads, input, precision, verify_options)
                .map_err(|e| ExportError::Verify(Box::new(e)))?,
        ),
        None => None,
    };
    let triton = match &options.triton {
        Some(entry) => {
            let triton_options = TritonOptions {
                tensorrt_int8: options
                    .int8
                    .as_ref()
                    .is_some_and(|i| i.plan.mode == Int8Mode::Static),
                ..entry.options.clone()
            };
            let config = config_pbtxt(
                &triton_options,
                input,
                model.metadata.preprocessing.image_size,
                model.metadata.heads.len(),
            )?;
            Some(write_repository(
                &entry.repo,
                &entry.options,
                &model_bytes,
                &config,
            )?)
        }
        None => None,
    };
    let report = ExportReport {
        onnx: options.out.clone(),
        bytes: model_bytes.len() as u64,
        backbone: model.metadata.backbone.clone(),
        precision,
        input,
        heads: model
            .metadata
            .heads
            .iter()
            .map(|h| h.name.clone())
            .collect(),
        load_seconds,
        export_seconds,
        verify,
        quantization: model.metadata.quantization.clone(),
        triton,
    };
    if let Some(path) = &options.report {
        write_report(path, &report)?;
    }
    Ok(report)
}

/// The checkpoints with their head names, sharing one CLIP load.
fn load_checkpoints(
    options: &CheckpointExport,
) -> Result<Vec<(String, LoadedCheckpoint)>, ExportError> {
    let described = options
        .checkpoints
        .iter()
        .map(|c| {
            agiqa_trainer::checkpoint::read_description(&c.stem)
                .map(|meta: CheckpointMeta| (c, meta))
                .map_err(|source| ExportError::LoadCheckpoint {
                    path: c.stem.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (first, first_meta) = described.first().ok_or(ExportError::NoCheckpoints)?;
    for (other, meta) in &described[1..] {
        check_shared_encoder((&first.stem, first_meta), (&other.stem, meta))?;
    }

    let tokenizer = ClipTokenizer::embedded()?;
    let mut clip =
        match &options.clip {
            Some(path) => Some(Clip::load(path, options.device).map_err(|source| {
                ExportError::ClipWeights {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };
    let mut loaded = Vec::with_capacity(described.len());
    let count = described.len();
    for (i, (named, meta)) in described.into_iter().enumerate() {
        let checkpoint = load_checkpoint(&named.stem, clip.take(), &tokenizer, options.device)
            .map_err(|source| ExportError::LoadCheckpoint {
                path: named.stem.clone(),
                source,
            })?;
        // The next head gets its own copy of the (verified) CLIP instead of loading it again.
        if i + 1 < count {
            clip = Some(checkpoint.model.clip().clone_frozen());
        }
        let name = named.name.clone().unwrap_or(meta.dimension);
        loaded.push((name, checkpoint));
    }
    Ok(loaded)
}

fn write_report(path: &Path, report: &ExportReport) -> Result<(), ExportError> {
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| ExportError::Internal(format!("cannot serialise the report: {e}")))?;
    write_atomic(path, json.as_bytes()).map_err(|source| ExportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_specs_take_a_name_only_before_any_slash() {
        let parse = |s: &str| NamedCheckpoint::from_str(s).unwrap();
        assert_eq!(
            parse("quality=runs/q/best"),
            NamedCheckpoint {
                name: Some("quality".into()),
                stem: "runs/q/best".into()
            }
        );
        assert_eq!(parse("runs/a=b/best").name, None);
        assert_eq!(parse("runs/a=b/best").stem, PathBuf::from("runs/a=b/best"));
        assert_eq!(parse("best").name, None);
    }
}
