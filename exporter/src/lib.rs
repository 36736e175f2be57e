//! The exporter: turns trained CLIP-AGIQA checkpoints into one ONNX graph — the CLIP image
//! tower plus the head(s), with the text branch frozen and folded into constants — verifies it
//! against the trainer with ONNX Runtime, and writes Triton model repositories.
//!
//! - [`onnx_proto`]: the ONNX protobuf messages we write (prost);
//! - [`graph`]: a graph builder and CLIP's composite layers;
//! - [`vision`]: the ViT and ModifiedResNet towers;
//! - [`fold`]: freezing the prompts and folding them into the head;
//! - [`export`]: assembling the graph and its metadata, writing it atomically;
//! - [`verify`]: ONNX Runtime against the trainer's forward, and int8 against fp32 (the budget);
//! - [`quantize`]: the int8 rewrite of an fp32 graph; [`calibrate`]: static int8's activation
//!   ranges; [`image_sets`]: calibration and held-out images; [`int8`]: one int8 export;
//! - [`session`]: an in-memory graph run by ONNX Runtime on preprocessed crops;
//! - [`triton`]: Triton Inference Server model repositories;
//! - [`run`]: one whole export as `agiqa-export` runs it (checks, verification, Triton, report).

use std::path::PathBuf;

pub mod calibrate;
pub mod export;
pub mod fold;
pub mod graph;
pub mod image_sets;
pub mod int8;
pub mod onnx_proto;
pub mod quantize;
pub mod run;
pub mod session;
pub mod triton;
pub mod verify;
pub mod vision;

pub use export::{build_model, write_model, ExportOptions, ExportedModel, HeadSource, InputKind};
pub use graph::{AttentionOps, Precision};
pub use int8::{build_int8_model, Int8Export, DEFAULT_INT8_MODE};
pub use quantize::{Int8Mode, Int8Plan};
pub use run::{export_checkpoints, CheckpointExport, ExportReport, NamedCheckpoint, TritonEntry};

/// Names that become graph value names, output columns or folder names: non-empty ASCII
/// letters, digits, `_` and `-`.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), ExportError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(ExportError::Unsupported(format!(
            "{what} {name:?} must be non-empty ASCII letters, digits, '_' or '-'"
        )))
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no checkpoint given")]
    NoCheckpoints,
    #[error(
        "the CLIP weights have no tensor {0:?}; the checkpoint does not match its architecture"
    )]
    MissingTensor(String),
    #[error("the model does not match its config: {0}")]
    Mismatch(String),
    #[error("these checkpoints cannot share one graph: {0}")]
    Incompatible(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read checkpoint {path}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: agiqa_trainer::checkpoint::CheckpointError,
    },
    #[error("cannot load checkpoint {path}")]
    LoadCheckpoint {
        path: PathBuf,
        #[source]
        source: agiqa_trainer::TrainError,
    },
    #[error("cannot load CLIP weights {path}")]
    ClipWeights {
        path: PathBuf,
        #[source]
        source: agiqa_trainer::weights::WeightsError,
    },
    #[error(transparent)]
    Tokenizer(#[from] agiqa_trainer::tokenizer::TokenizerError),
    #[error("verification could not run")]
    Verify(#[source] Box<ExportError>),
    #[error(transparent)]
    Train(#[from] agiqa_trainer::TrainError),
    #[error(transparent)]
    OrtLibrary(#[from] agiqa_runtime::onnxruntime::OrtLibraryError),
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    #[error(
        "the int8 graph is over its accuracy budget against the fp32 graph (nothing written; \
             --allow-over-budget writes it anyway, marked so in its metadata):\n{0}"
    )]
    OverBudget(String),
    #[error("internal exporter error: {0}")]
    Internal(String),
}
