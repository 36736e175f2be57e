//! The graph contract, checked on the first session: one input (`pixel_values` float32
//! `[N, 3, R, R]` or `pixels_uint8` uint8 `[N, R, R, 3]`), the scores output, and metadata
//! whose image size and heads match them.

use std::collections::BTreeMap;
use std::path::Path;

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use super::error::ScoreError;
use crate::metadata::{
    InputKind, ModelMetadata, INPUT_PIXELS_UINT8, INPUT_PIXEL_VALUES, OUTPUT_IMAGE_FEATURES,
    OUTPUT_SCORE, OUTPUT_SCORES,
};

pub(crate) struct Contract {
    pub metadata: ModelMetadata,
    pub input: InputKind,
    pub output_name: &'static str,
    pub fixed_batch: Option<usize>,
    pub graph_description: Option<String>,
}

pub(crate) fn check_contract(session: &Session, path: &Path) -> Result<Contract, ScoreError> {
    let problem = |p: String| ScoreError::Contract {
        path: path.to_path_buf(),
        problem: p,
    };
    let meta = session
        .metadata()
        .map_err(|e| problem(format!("cannot read metadata: {e}")))?;
    let keys = meta
        .custom_keys()
        .map_err(|e| problem(format!("cannot read metadata: {e}")))?;
    let props: BTreeMap<String, String> = keys
        .into_iter()
        .filter_map(|k| meta.custom(&k).map(|v| (k, v)))
        .collect();
    let metadata = ModelMetadata::from_props(&props).map_err(|source| ScoreError::Metadata {
        path: path.to_path_buf(),
        source,
    })?;
    if metadata.heads.is_empty() {
        return Err(problem("metadata lists no heads".into()));
    }
    let mut names: Vec<&str> = metadata.heads.iter().map(|h| h.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(problem(format!("head names are not unique: {names:?}")));
    }
    let r = i64::from(metadata.preprocessing.image_size);

    let [input] = session.inputs() else {
        return Err(problem(format!(
            "expected exactly one input (`{INPUT_PIXEL_VALUES}` or `{INPUT_PIXELS_UINT8}`), found {:?}",
            session.inputs().iter().map(|i| i.name()).collect::<Vec<_>>()
        )));
    };
    let (kind, want_ty, want_shape) = match input.name() {
        INPUT_PIXEL_VALUES => (
            InputKind::PixelValues,
            TensorElementType::Float32,
            [-1, 3, r, r],
        ),
        INPUT_PIXELS_UINT8 => (
            InputKind::PixelsUint8,
            TensorElementType::Uint8,
            [-1, r, r, 3],
        ),
        other => {
            return Err(problem(format!(
                "input is called `{other}`; expected `{INPUT_PIXEL_VALUES}` (float32 [N, 3, R, R]) \
                 or `{INPUT_PIXELS_UINT8}` (uint8 [N, R, R, 3])"
            )))
        }
    };
    let (ty, shape) = tensor_type(input.dtype())
        .ok_or_else(|| problem(format!("input `{}` is not a tensor", input.name())))?;
    if ty != want_ty {
        return Err(problem(format!(
            "input `{}` is {ty:?}; expected {want_ty:?}",
            input.name()
        )));
    }
    if shape.len() != 4
        || shape
            .iter()
            .zip(want_shape)
            .skip(1)
            .any(|(&got, want)| got >= 0 && got != want)
    {
        return Err(problem(format!(
            "input `{}` has shape {shape:?}; expected [N, {}] with R = {r} from metadata \
             preprocessing.image_size",
            input.name(),
            if kind == InputKind::PixelValues {
                "3, R, R"
            } else {
                "R, R, 3"
            }
        )));
    }
    let fixed_batch = (shape[0] > 0).then_some(shape[0] as usize);

    // The scores, optionally followed by the image embeddings (exported on request; the
    // scorer reads only the scores).
    let output = match session.outputs() {
        [output] => output,
        [output, extra] if extra.name() == OUTPUT_IMAGE_FEATURES => output,
        others => {
            return Err(problem(format!(
                "expected the output `{OUTPUT_SCORE}` or `{OUTPUT_SCORES}` (optionally followed \
                 by `{OUTPUT_IMAGE_FEATURES}`), found {:?}",
                others.iter().map(|o| o.name()).collect::<Vec<_>>()
            )))
        }
    };
    let heads = metadata.heads.len() as i64;
    let (ty, shape) = tensor_type(output.dtype())
        .ok_or_else(|| problem(format!("output `{}` is not a tensor", output.name())))?;
    if ty != TensorElementType::Float32 {
        return Err(problem(format!(
            "output `{}` is {ty:?}; expected Float32",
            output.name()
        )));
    }
    let output_name = match output.name() {
        OUTPUT_SCORE if shape.len() == 1 && heads == 1 => OUTPUT_SCORE,
        OUTPUT_SCORE => {
            return Err(problem(format!(
                "output `{OUTPUT_SCORE}` has shape {shape:?} and metadata lists {heads} heads; \
                 `{OUTPUT_SCORE}` must be [N] with exactly one head (use `{OUTPUT_SCORES}` [N, H] \
                 for several)"
            )))
        }
        OUTPUT_SCORES if shape.len() == 2 && (shape[1] < 0 || shape[1] == heads) => OUTPUT_SCORES,
        OUTPUT_SCORES => {
            return Err(problem(format!(
            "output `{OUTPUT_SCORES}` has shape {shape:?} but metadata lists {heads} heads {:?}; \
                 expected [N, {heads}]",
            metadata.heads.iter().map(|h| &h.name).collect::<Vec<_>>()
        )))
        }
        other => {
            return Err(problem(format!(
            "output is called `{other}`; expected `{OUTPUT_SCORE}` [N] or `{OUTPUT_SCORES}` [N, H]"
        )))
        }
    };
    Ok(Contract {
        metadata,
        input: kind,
        output_name,
        fixed_batch,
        graph_description: meta.graph_description().filter(|d| !d.is_empty()),
    })
}

fn tensor_type(ty: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect())),
        _ => None,
    }
}
