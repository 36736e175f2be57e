//! Static int8 calibration: the fp32 graph, with every tensor that will be quantised made an
//! extra output, run by ONNX Runtime on real images; each tensor's symmetric range is a high
//! percentile of `|x|` (a few outliers must not cost every other value its resolution).

use agiqa_runtime::metadata::CalibrationInfo;
use agiqa_runtime::preprocess::Preprocessor;
use image::RgbImage;

use crate::export::InputKind;
use crate::onnx_proto::{data_type, ModelProto, TypeProto, TypeProtoTensor, ValueInfoProto};
use crate::quantize::ActivationRanges;
use crate::session::{GraphSession, BATCH};
use crate::ExportError;

/// Bins of each tensor's `|x|` histogram.
const BINS: usize = 4096;
/// The first batch's largest `|x|` times this is the histogram's range; larger values later
/// are counted above it (and the true maximum kept).
const HEADROOM: f32 = 2.0;

/// How ranges are chosen.
#[derive(Clone, Debug)]
pub struct CalibrationOptions {
    /// Percentile of `|x|` taken as the range (100: the maximum).
    pub percentile: f64,
    /// `libonnxruntime.so` (default: the runtime's search order).
    pub ort_lib: Option<std::path::PathBuf>,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            percentile: 99.99,
            ort_lib: None,
        }
    }
}

/// A running histogram of `|x|` for one tensor.
struct AbsHistogram {
    range: f32,
    counts: Vec<u64>,
    above: u64,
    max: f32,
}

impl AbsHistogram {
    fn new(first: &[f32]) -> Self {
        let max = first.iter().fold(0f32, |m, v| m.max(v.abs()));
        AbsHistogram {
            range: if max > 0.0 { max * HEADROOM } else { 1.0 },
            counts: vec![0; BINS],
            above: 0,
            max: 0.0,
        }
    }

    fn add(&mut self, values: &[f32]) {
        let per_bin = BINS as f32 / self.range;
        for v in values {
            let a = v.abs();
            self.max = self.max.max(a);
            let bin = (a * per_bin) as usize;
            match self.counts.get_mut(bin) {
                Some(c) => *c += 1,
                None => self.above += 1,
            }
        }
    }

    /// The upper edge of the bin where `percentile`% of the values are at or below, capped by
    /// the maximum seen.
    fn percentile(&self, percentile: f64) -> f32 {
        let total: u64 = self.counts.iter().sum::<u64>() + self.above;
        if percentile >= 100.0 || total == 0 {
            return self.max;
        }
        let wanted = (total as f64 * percentile / 100.0).ceil() as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= wanted {
                return ((i + 1) as f32 * self.range / BINS as f32).min(self.max);
            }
        }
        self.max
    }
}

/// Ranges of `tensors` in `model` (fp32, batch norms folded) over `crops`.
pub fn calibrate(
    model: &ModelProto,
    tensors: &[String],
    crops: &[RgbImage],
    preprocessor: &Preprocessor,
    input: InputKind,
    options: &CalibrationOptions,
) -> Result<ActivationRanges, ExportError> {
    if crops.is_empty() {
        return Err(ExportError::Unsupported(
            "static int8 needs at least one calibration image".into(),
        ));
    }
    let mut probed = model.clone();
    let graph = probed
        .graph
        .as_mut()
        .ok_or_else(|| ExportError::Internal("model without a graph".into()))?;
    for name in tensors {
        // Element type only: ONNX Runtime infers the shapes.
        graph.output.push(ValueInfoProto {
            name: Some(name.clone()),
            r#type: Some(TypeProto {
                tensor_type: Some(TypeProtoTensor {
                    elem_type: Some(data_type::FLOAT),
                    shape: None,
                }),
            }),
            doc_string: None,
        });
    }
    let size = preprocessor.config().image_size;
    let mut session = GraphSession::new(&probed, input, size, options.ort_lib.as_deref())?;
    let names: Vec<&str> = tensors.iter().map(String::as_str).collect();
    let mut histograms: Vec<Option<AbsHistogram>> = tensors.iter().map(|_| None).collect();
    for batch in crops.chunks(BATCH) {
        let outputs = session.run(batch, preprocessor, &names)?;
        for (name, histogram) in tensors.iter().zip(histograms.iter_mut()) {
            let values = &outputs[name];
            histogram
                .get_or_insert_with(|| AbsHistogram::new(values))
                .add(values);
        }
    }
    Ok(tensors
        .iter()
        .zip(histograms)
        .map(|(name, h)| {
            let range = h.map_or(0.0, |h| h.percentile(options.percentile));
            (name.clone(), range)
        })
        .collect())
}

/// The metadata's description of a calibration.
pub fn describe(source: &str, images: usize, options: &CalibrationOptions) -> CalibrationInfo {
    CalibrationInfo {
        source: source.to_string(),
        images,
        method: if options.percentile >= 100.0 {
            "max |x| per tensor".into()
        } else {
            format!("percentile {} of |x| per tensor", options.percentile)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_ignore_rare_outliers_and_max_keeps_them() {
        let mut values: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        values.push(50.0);
        let mut h = AbsHistogram::new(&values[..1000]);
        h.add(&values);
        assert!(
            (h.percentile(99.9) - 0.999).abs() < 0.01,
            "{}",
            h.percentile(99.9)
        );
        assert_eq!(h.percentile(100.0), 50.0);
    }
}
