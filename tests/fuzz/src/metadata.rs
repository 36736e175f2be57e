//! The `agiqa.*` ONNX `metadata_props` a scorer reads back from an exported model.

use std::collections::BTreeMap;

use agiqa_runtime::metadata::{ModelMetadata, METADATA_KEY_PREFIX};
use agiqa_runtime::preprocess::Preprocessor;
use image::RgbImage;

/// Each line `key=value` is the property `agiqa.<key>`. Accepted metadata must write back to the
/// same properties, and its preprocessing must run on a small image.
pub fn run(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let props: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (format!("{METADATA_KEY_PREFIX}{key}"), value.to_string()))
        .collect();
    let Ok(metadata) = ModelMetadata::from_props(&props) else {
        return false;
    };
    // Compared as written: metrics may be NaN (`null`), which no struct equality matches.
    let props = metadata.to_props();
    let reread = ModelMetadata::from_props(&props).map(|m| m.to_props());
    assert_eq!(
        reread.ok().as_ref(),
        Some(&props),
        "metadata does not round-trip"
    );
    let preprocessor = Preprocessor::new(metadata.preprocessing.clone());
    let tensor = preprocessor.preprocess(&RgbImage::new(7, 5));
    tensor.is_ok_and(|t| t.len() == metadata.preprocessing.tensor_len())
}
