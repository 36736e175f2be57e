//! Triton Inference Server model repositories: `<repo>/<name>/1/model.onnx` and
//! `<repo>/<name>/config.pbtxt` (protobuf text format of Triton's `ModelConfig`, see
//! `model_config.proto` in triton-inference-server/common). The tests parse what we write with
//! that very schema.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use agiqa_runtime::atomic_file::temporary_sibling;
use agiqa_runtime::metadata::{
    INPUT_PIXELS_UINT8, INPUT_PIXEL_VALUES, OUTPUT_SCORE, OUTPUT_SCORES,
};

use crate::export::InputKind;
use crate::ExportError;

/// Where Triton runs the model instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceKind {
    /// `KIND_GPU`.
    Gpu,
    /// `KIND_CPU`.
    Cpu,
}

/// One Triton model repository entry's `config.pbtxt` settings.
#[derive(Clone, Debug)]
pub struct TritonOptions {
    /// Model name in the repository (a folder name).
    pub name: String,
    /// Largest batch Triton may form; the graph's batch dimension is dynamic.
    pub max_batch_size: u32,
    /// Batch sizes the dynamic batcher prefers to form.
    pub preferred_batch_sizes: Vec<u32>,
    /// How long a request may wait for others to join its batch.
    pub max_queue_delay_us: u64,
    /// Model instances run side by side.
    pub instances: u32,
    /// Where the instances run.
    pub kind: InstanceKind,
    /// Let ONNX Runtime hand the graph to TensorRT (GPU instances only).
    pub tensorrt: bool,
    /// Build TensorRT engines in FP16 (LayerNorm kept in FP32, as the runtime does).
    pub tensorrt_fp16: bool,
    /// The graph is a static (QDQ) int8 graph: TensorRT builds INT8 engines from its scales.
    pub tensorrt_int8: bool,
    /// Batch size TensorRT tunes its engine for; `None`: `max_batch_size`. The profile always
    /// spans 1..=`max_batch_size`, so no batch the dynamic batcher forms rebuilds the engine.
    pub tensorrt_opt_batch: Option<u32>,
}

impl Default for TritonOptions {
    fn default() -> Self {
        TritonOptions {
            name: "clip_agiqa".into(),
            max_batch_size: 64,
            preferred_batch_sizes: vec![16, 32, 64],
            max_queue_delay_us: 2000,
            instances: 1,
            kind: InstanceKind::Gpu,
            tensorrt: true,
            tensorrt_fp16: true,
            tensorrt_int8: false,
            tensorrt_opt_batch: None,
        }
    }
}

impl TritonOptions {
    fn validate(&self) -> Result<(), ExportError> {
        crate::check_name("Triton model name", &self.name)?;
        if self.max_batch_size == 0 || self.instances == 0 {
            return Err(ExportError::Unsupported(
                "Triton max batch size and instance count must be at least 1".into(),
            ));
        }
        if let Some(b) = self
            .preferred_batch_sizes
            .iter()
            .find(|&&b| b == 0 || b > self.max_batch_size)
        {
            return Err(ExportError::Unsupported(format!(
                "preferred batch size {b} is outside 1..={}",
                self.max_batch_size
            )));
        }
        if let Some(opt) = self
            .tensorrt_opt_batch
            .filter(|&b| b == 0 || b > self.max_batch_size)
        {
            return Err(ExportError::Unsupported(format!(
                "TensorRT opt batch {opt} is outside 1..={}",
                self.max_batch_size
            )));
        }
        if self.tensorrt && self.kind == InstanceKind::Cpu {
            return Err(ExportError::Unsupported(
                "TensorRT needs GPU instances; use --triton-kind gpu or --no-tensorrt".into(),
            ));
        }
        Ok(())
    }
}

/// The `config.pbtxt` for a graph with `input` at `resolution` pixels and `heads` outputs.
pub fn config_pbtxt(
    options: &TritonOptions,
    input: InputKind,
    resolution: u32,
    heads: usize,
) -> Result<String, ExportError> {
    options.validate()?;
    let r = resolution;
    // Dims exclude the batch dimension when max_batch_size > 0.
    let (input_name, input_type, input_dims) = match input {
        InputKind::PixelValues => (INPUT_PIXEL_VALUES, "TYPE_FP32", format!("3, {r}, {r}")),
        InputKind::PixelsUint8 => (INPUT_PIXELS_UINT8, "TYPE_UINT8", format!("{r}, {r}, 3")),
    };
    // A single head's output is `[N]`: Triton needs a non-empty shape, so it is declared `[1]`
    // and reshaped to the model's `[]` per item.
    let output = if heads == 1 {
        format!(
            "  {{\n    name: \"{OUTPUT_SCORE}\"\n    data_type: TYPE_FP32\n    dims: [ 1 ]\n    reshape: {{ shape: [ ] }}\n  }}"
        )
    } else {
        format!("  {{\n    name: \"{OUTPUT_SCORES}\"\n    data_type: TYPE_FP32\n    dims: [ {heads} ]\n  }}")
    };
    let mut text = String::new();
    let w = &mut text;
    let _ = writeln!(
        w,
        "# Written by agiqa-export. Schema: Triton's model_config.proto."
    );
    let _ = writeln!(w, "name: \"{}\"", options.name);
    let _ = writeln!(w, "platform: \"onnxruntime_onnx\"");
    let _ = writeln!(w, "max_batch_size: {}", options.max_batch_size);
    let _ = writeln!(
        w,
        "input [\n  {{\n    name: \"{input_name}\"\n    data_type: {input_type}\n    dims: [ {input_dims} ]\n  }}\n]"
    );
    let _ = writeln!(w, "output [\n{output}\n]");
    let preferred: Vec<String> = options
        .preferred_batch_sizes
        .iter()
        .map(u32::to_string)
        .collect();
    let _ = writeln!(
        w,
        "dynamic_batching {{\n  preferred_batch_size: [ {} ]\n  max_queue_delay_microseconds: {}\n}}",
        preferred.join(", "),
        options.max_queue_delay_us
    );
    let kind = match options.kind {
        InstanceKind::Gpu => "KIND_GPU",
        InstanceKind::Cpu => "KIND_CPU",
    };
    let _ = writeln!(
        w,
        "instance_group [\n  {{\n    count: {}\n    kind: {kind}\n  }}\n]",
        options.instances
    );
    if options.tensorrt {
        let _ = writeln!(w, "{}", tensorrt_accelerator(options, input, r));
    }
    Ok(text)
}

/// Triton's onnxruntime backend `tensorrt` accelerator: the same choices as the runtime's
/// TensorRT set-up (precision, LayerNorm in FP32 under FP16, a batch profile from 1 to the
/// largest batch). The backend takes one `precision_mode` (FP32, FP16, BF16 or INT8) and
/// passes the `trt_profile_*_shapes` keys through to ONNX Runtime as they are.
fn tensorrt_accelerator(options: &TritonOptions, input: InputKind, r: u32) -> String {
    let precision = match (options.tensorrt_int8, options.tensorrt_fp16) {
        (true, _) => "INT8",
        (false, true) => "FP16",
        (false, false) => "FP32",
    };
    let shape = |n: u32| match input {
        InputKind::PixelValues => format!("{INPUT_PIXEL_VALUES}:{n}x3x{r}x{r}"),
        InputKind::PixelsUint8 => format!("{INPUT_PIXELS_UINT8}:{n}x{r}x{r}x3"),
    };
    let max = options.max_batch_size;
    let opt = options.tensorrt_opt_batch.unwrap_or(max);
    let mut parameters = vec![
        ("precision_mode", precision.to_string()),
        ("max_workspace_size_bytes", "1073741824".to_string()),
        ("trt_profile_min_shapes", shape(1)),
        ("trt_profile_opt_shapes", shape(opt)),
        ("trt_profile_max_shapes", shape(max)),
    ];
    if options.tensorrt_fp16 && !options.tensorrt_int8 {
        parameters.push(("trt_layer_norm_fp32_fallback", "true".to_string()));
    }
    let parameters: Vec<String> = parameters
        .into_iter()
        .map(|(key, value)| format!("        parameters {{ key: \"{key}\" value: \"{value}\" }}"))
        .collect();
    format!(
        "optimization {{\n  execution_accelerators {{\n    gpu_execution_accelerator: [\n      {{\n        name: \"tensorrt\"\n{}\n      }}\n    ]\n  }}\n}}",
        parameters.join("\n")
    )
}

/// Writes `<repo>/<name>/1/model.onnx` and `<repo>/<name>/config.pbtxt`. The model folder is
/// assembled in a staging folder beside its final place and renamed into it, so a failure
/// leaves no half-written repository entry (and no staging folder); an existing entry of the
/// same name is replaced.
pub fn write_repository(
    repo: &Path,
    options: &TritonOptions,
    model_bytes: &[u8],
    config: &str,
) -> Result<PathBuf, ExportError> {
    options.validate()?;
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Write { path, source }
    };
    std::fs::create_dir_all(repo).map_err(write_err(repo))?;
    let target = repo.join(&options.name);
    // Unique per call (process id and counter): concurrent exports never share a staging
    // folder. One of that name can only be a crashed process's leftover.
    let staging = temporary_sibling(&target).map_err(write_err(&target))?;
    let _ = std::fs::remove_dir_all(&staging);
    let result = (|| {
        let version = staging.join("1");
        std::fs::create_dir_all(&version).map_err(write_err(&version))?;
        let model = version.join("model.onnx");
        std::fs::write(&model, model_bytes).map_err(write_err(&model))?;
        let config_path = staging.join("config.pbtxt");
        std::fs::write(&config_path, config).map_err(write_err(&config_path))?;
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(write_err(&target))?;
        }
        std::fs::rename(&staging, &target).map_err(write_err(&target))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.map(|()| target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `key` → `value` of each `parameters { key: "..." value: "..." }` line.
    fn parameters(config: &str) -> std::collections::BTreeMap<String, String> {
        config
            .lines()
            .filter_map(|line| {
                let rest = line.trim().strip_prefix("parameters { key: \"")?;
                let (key, rest) = rest.split_once("\" value: \"")?;
                let value = rest.strip_suffix("\" }")?;
                Some((key.to_string(), value.to_string()))
            })
            .collect()
    }

    #[test]
    fn triton_tensorrt_carries_profile_and_precision() {
        let options = TritonOptions {
            max_batch_size: 32,
            preferred_batch_sizes: vec![16, 32],
            ..TritonOptions::default()
        };
        let config = config_pbtxt(&options, InputKind::PixelValues, 224, 1).unwrap();
        let p = parameters(&config);
        assert_eq!(p["precision_mode"], "FP16");
        assert_eq!(p["trt_layer_norm_fp32_fallback"], "true");
        assert_eq!(p["trt_profile_min_shapes"], "pixel_values:1x3x224x224");
        assert_eq!(p["trt_profile_opt_shapes"], "pixel_values:32x3x224x224");
        assert_eq!(p["trt_profile_max_shapes"], "pixel_values:32x3x224x224");
        assert_eq!(config.matches('{').count(), config.matches('}').count());

        let int8 = TritonOptions {
            max_batch_size: 64,
            tensorrt_int8: true,
            tensorrt_opt_batch: Some(16),
            ..TritonOptions::default()
        };
        let p = parameters(&config_pbtxt(&int8, InputKind::PixelsUint8, 336, 2).unwrap());
        assert_eq!(p["precision_mode"], "INT8");
        assert!(!p.contains_key("trt_layer_norm_fp32_fallback"));
        assert_eq!(p["trt_profile_min_shapes"], "pixels_uint8:1x336x336x3");
        assert_eq!(p["trt_profile_opt_shapes"], "pixels_uint8:16x336x336x3");
        assert_eq!(p["trt_profile_max_shapes"], "pixels_uint8:64x336x336x3");

        let fp32 = TritonOptions {
            tensorrt_fp16: false,
            ..TritonOptions::default()
        };
        let p = parameters(&config_pbtxt(&fp32, InputKind::PixelValues, 224, 1).unwrap());
        assert_eq!(p["precision_mode"], "FP32");

        let too_big = TritonOptions {
            tensorrt_opt_batch: Some(65),
            ..TritonOptions::default()
        };
        let err = config_pbtxt(&too_big, InputKind::PixelValues, 224, 1).unwrap_err();
        assert!(err.to_string().contains("opt batch 65"), "{err}");
        let off = TritonOptions {
            tensorrt: false,
            ..TritonOptions::default()
        };
        assert!(
            parameters(&config_pbtxt(&off, InputKind::PixelValues, 224, 1).unwrap()).is_empty()
        );
    }

    #[test]
    fn a_failed_write_leaves_no_staging_folder() {
        let repo = tempfile::tempdir().unwrap();
        let options = TritonOptions::default();
        // A file where the entry's folder goes: replacing it fails after staging is written.
        std::fs::write(repo.path().join(&options.name), b"in the way").unwrap();
        let err = write_repository(repo.path(), &options, b"onnx", "config").unwrap_err();
        assert!(matches!(err, ExportError::Write { .. }), "{err}");
        assert_eq!(entries(repo.path()), std::slice::from_ref(&options.name));
    }
}
