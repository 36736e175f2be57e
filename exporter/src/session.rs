//! An exported graph, held in memory, run by ONNX Runtime (CPU) on preprocessed crops: what
//! calibration and the int8 accuracy budget both need.

use std::collections::BTreeMap;
use std::path::Path;

use agiqa_runtime::preprocess::Preprocessor;
use image::RgbImage;
use ort::session::Session;

use crate::export::InputKind;
use crate::onnx_proto::ModelProto;
use crate::ExportError;

/// Images fed per run: large enough for ONNX Runtime's kernels, small enough that a dozen
/// `[B, 197, 3072]` calibration outputs stay far below memory.
pub const BATCH: usize = 8;

/// One graph ready to run.
pub struct GraphSession {
    session: Session,
    input: InputKind,
    input_name: String,
    size: u32,
}

impl GraphSession {
    /// Opens `model` (ONNX Runtime loaded from `ort_lib` or the runtime's search order).
    pub fn new(
        model: &ModelProto,
        input: InputKind,
        size: u32,
        ort_lib: Option<&Path>,
    ) -> Result<Self, ExportError> {
        agiqa_runtime::onnxruntime::init(ort_lib)?;
        let environment = agiqa_runtime::onnxruntime::environment().ok_or_else(|| {
            ExportError::Internal("ONNX Runtime initialised without an environment".into())
        })?;
        let session = Session::builder(environment)?.commit_from_memory(&model.to_bytes())?;
        let input_name = session.inputs()[0].name().to_string();
        Ok(GraphSession {
            session,
            input,
            input_name,
            size,
        })
    }

    /// Runs `crops` (one batch) and returns each named float output, flattened, in the
    /// order asked.
    pub fn run(
        &mut self,
        crops: &[RgbImage],
        preprocessor: &Preprocessor,
        outputs: &[&str],
    ) -> Result<BTreeMap<String, Vec<f32>>, ExportError> {
        let (n, r) = (crops.len() as i64, i64::from(self.size));
        let value: ort::value::DynValue = match self.input {
            InputKind::PixelValues => {
                let plane = 3 * (self.size * self.size) as usize;
                let mut values = vec![0f32; crops.len() * plane];
                for (crop, out) in crops.iter().zip(values.chunks_exact_mut(plane)) {
                    preprocessor.normalize_into(crop, out);
                }
                ort::value::Tensor::from_array((vec![n, 3, r, r], values))?.into_dyn()
            }
            InputKind::PixelsUint8 => {
                let bytes: Vec<u8> = crops
                    .iter()
                    .flat_map(|c| c.as_raw().iter().copied())
                    .collect();
                ort::value::Tensor::from_array((vec![n, r, r, 3], bytes))?.into_dyn()
            }
        };
        let results = self
            .session
            .run(ort::inputs![self.input_name.as_str() => value])?;
        let mut out = BTreeMap::new();
        for name in outputs {
            let value = results.get(name).ok_or_else(|| {
                ExportError::Internal(format!("the graph has no output {name:?}"))
            })?;
            let (_, data) = value.try_extract_tensor::<f32>()?;
            out.insert(name.to_string(), data.to_vec());
        }
        Ok(out)
    }
}
