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
    /// Build TensorRT engines in FP16.
    pub tensorrt_fp16: bool,
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
        let precision = if options.tensorrt_fp16 {
            "FP16"
        } else {
            "FP32"
        };
        let _ = writeln!(
            w,
            "optimization {{\n  execution_accelerators {{\n    gpu_execution_accelerator: [\n      {{\n        name: \"tensorrt\"\n        parameters {{ key: \"precision_mode\" value: \"{precision}\" }}\n        parameters {{ key: \"max_workspace_size_bytes\" value: \"1073741824\" }}\n      }}\n    ]\n  }}\n}}"
        );
    }
    Ok(text)
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
