//! [`ScorerOptions`] and the small value types its fields use. Every field has a serde default,
//! so options written by older versions (e.g. `{"device_id": 0}`) still parse.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::preprocess::{DecodeLimits, JpegDecoding};

/// Which ONNX Runtime execution provider to run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    Cpu,
    Cuda,
    #[serde(rename = "tensorrt")]
    TensorRt,
    /// TensorRT, then CUDA, then CPU: the first that loads; each fallback is logged and kept in
    /// [`super::Scorer::provider_notes`].
    #[default]
    Auto,
}

impl ExecutionProvider {
    /// The order `auto` tries.
    pub const AUTO_ORDER: [ExecutionProvider; 3] = [
        ExecutionProvider::TensorRt,
        ExecutionProvider::Cuda,
        ExecutionProvider::Cpu,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::TensorRt => "tensorrt",
            ExecutionProvider::Auto => "auto",
        }
    }

    /// CUDA or TensorRT.
    pub fn is_gpu(self) -> bool {
        matches!(self, ExecutionProvider::Cuda | ExecutionProvider::TensorRt)
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExecutionProvider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(ExecutionProvider::Cpu),
            "cuda" => Ok(ExecutionProvider::Cuda),
            "tensorrt" | "trt" => Ok(ExecutionProvider::TensorRt),
            "auto" => Ok(ExecutionProvider::Auto),
            other => Err(format!(
                "unknown execution provider '{other}' (expected cpu, cuda, tensorrt or auto)"
            )),
        }
    }
}

/// GPU ordinals to run on (CUDA and TensorRT), at least one, no repeats. Written as one number
/// (`0`, what older options hold) or a list (`[0, 1]`); on the command line `0` or `0,1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIds(Vec<i32>);

/// Highest GPU ordinal accepted (a typo guard, far above any machine).
pub const MAX_DEVICE_ID: i32 = 1023;

impl DeviceIds {
    pub fn new(ids: Vec<i32>) -> Result<DeviceIds, String> {
        if ids.is_empty() {
            return Err("give at least one GPU ordinal".into());
        }
        if let Some(bad) = ids.iter().find(|&&id| !(0..=MAX_DEVICE_ID).contains(&id)) {
            return Err(format!(
                "GPU ordinal {bad} is out of range 0..={MAX_DEVICE_ID}"
            ));
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("GPU ordinal {} is listed twice", w[0]));
        }
        Ok(DeviceIds(ids))
    }

    pub fn ids(&self) -> &[i32] {
        &self.0
    }

    /// The first device (the one a single-device provider registration uses).
    pub fn first(&self) -> i32 {
        self.0[0]
    }
}

impl Default for DeviceIds {
    fn default() -> Self {
        DeviceIds(vec![0])
    }
}

impl From<i32> for DeviceIds {
    /// One device; an out-of-range ordinal is kept and fails when the provider registers.
    fn from(id: i32) -> Self {
        DeviceIds(vec![id])
    }
}

impl FromStr for DeviceIds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ids = s
            .split(',')
            .map(|part| {
                part.trim()
                    .parse::<i32>()
                    .map_err(|_| format!("`{part}` is not a GPU ordinal (e.g. 0 or 0,1)"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        DeviceIds::new(ids)
    }
}

impl fmt::Display for DeviceIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(i32::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for DeviceIds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // One device stays a number, as older readers expect.
        match self.0.as_slice() {
            [one] => s.serialize_i32(*one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(i32),
            Many(Vec<i32>),
        }
        let ids = match OneOrMany::deserialize(d)? {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        };
        DeviceIds::new(ids).map_err(serde::de::Error::custom)
    }
}

/// ONNX Runtime's graph optimisation level (`--graph-optimization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphOptimization {
    Disable,
    Basic,
    Extended,
    /// Every fusion, layout changes included (LayerNorm, Gelu, MatMul+Add, ...).
    #[default]
    All,
}

impl FromStr for GraphOptimization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "disable" | "none" => Ok(GraphOptimization::Disable),
            "basic" => Ok(GraphOptimization::Basic),
            "extended" => Ok(GraphOptimization::Extended),
            "all" => Ok(GraphOptimization::All),
            other => Err(format!(
                "unknown graph optimisation level '{other}' (expected disable, basic, extended or all)"
            )),
        }
    }
}

/// How cuDNN picks convolution algorithms on CUDA (`--cudnn-conv-search`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvSearch {
    /// Benchmark every algorithm per convolution shape at its first run. The default: ResNet
    /// towers are dozens of convolutions where the fastest algorithm pays, and the load-time
    /// warm-up takes the search for the full batch; each new partial-batch size searches once.
    #[default]
    Exhaustive,
    /// cuDNN's heuristic choice: no first-run search, for many batch sizes or tight memory
    /// (the exhaustive search allocates large workspaces).
    Heuristic,
}

impl FromStr for ConvSearch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "exhaustive" => Ok(ConvSearch::Exhaustive),
            "heuristic" => Ok(ConvSearch::Heuristic),
            other => Err(format!(
                "unknown cuDNN convolution search '{other}' (expected exhaustive or heuristic)"
            )),
        }
    }
}

/// The batch sizes a TensorRT optimisation profile covers: the engine is built once for
/// `min..=max` and tuned for `opt`, so a smaller last batch does not rebuild it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRtProfile {
    pub min: usize,
    pub opt: usize,
    pub max: usize,
}

/// How a [`super::Scorer`] is set up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScorerOptions {
    pub provider: ExecutionProvider,
    /// ONNX Runtime intra-op threads; `None` lets ONNX Runtime use every core.
    pub threads: Option<usize>,
    /// Most images per inference call.
    pub batch_size: usize,
    /// GPU ordinals for CUDA and TensorRT; with several, [`ScorerOptions::sessions`] sessions
    /// are opened on each and batches go to the least busy.
    pub device_id: DeviceIds,
    /// Let TensorRT build fp16 engines (LayerNorm kept in fp32, which ViTs need).
    pub tensorrt_fp16: bool,
    /// Folder for TensorRT engines, so later loads skip the (minutes-long) engine build. Engines
    /// go in a subfolder keyed by model, ONNX Runtime, TensorRT, GPU, precision and profile.
    pub tensorrt_cache_dir: Option<PathBuf>,
    /// TensorRT optimisation profile of the batch dimension; `None`: min 1, opt = max =
    /// [`ScorerOptions::batch_size`].
    pub tensorrt_profile: Option<TensorRtProfile>,
    /// Independent sessions per device (each owns its run state; weights are prepacked once
    /// and shared). More than one lets several threads run inference at the same time.
    pub sessions: usize,
    /// Whether ONNX Runtime's idle worker threads spin, as the caller's default (the file
    /// pipeline turns it off: spinning burns the cores that decoding needs).
    pub intra_op_spinning: bool,
    /// The user's explicit spinning choice (`--spin` / `--no-spin`); wins over
    /// [`ScorerOptions::intra_op_spinning`] whatever default a caller picked.
    pub spin: Option<bool>,
    /// ONNX Runtime graph optimisation level.
    pub graph_optimization: GraphOptimization,
    /// ONNX Runtime's memory pattern (plans allocations from the first run's shapes).
    pub memory_pattern: bool,
    /// The CPU provider's arena allocator.
    pub cpu_arena: bool,
    /// Bind inputs and outputs to reused buffers (pinned host memory on CUDA) instead of
    /// handing ONNX Runtime fresh tensors each run; `None`: on for CUDA/TensorRT, off for CPU.
    pub io_binding: Option<bool>,
    /// CUDA graphs: capture the first run and replay it. Needs IoBinding and one batch shape,
    /// so partial batches are padded to [`ScorerOptions::batch_size`].
    pub cuda_graph: bool,
    /// cuDNN convolution algorithm search on CUDA.
    pub cudnn_conv_search: ConvSearch,
    /// Run one full batch per session at load (builds TensorRT engines, runs cuDNN's search);
    /// `None`: on GPU providers only.
    pub warmup: Option<bool>,
    /// Limits applied when this scorer decodes images (bytes and files).
    pub decode_limits: DecodeLimits,
    /// Exact JPEG decoding (the default), or reduced-size decoding of large JPEGs: faster,
    /// scores change slightly (see [`JpegDecoding::Reduced`]).
    pub jpeg_decoding: JpegDecoding,
    /// Explicit `libonnxruntime` path (else `ORT_DYLIB_PATH`, beside the executable, `.deps/lib`).
    pub ort_lib: Option<PathBuf>,
}

impl Default for ScorerOptions {
    fn default() -> Self {
        ScorerOptions {
            provider: ExecutionProvider::Auto,
            threads: None,
            batch_size: 16,
            device_id: DeviceIds::default(),
            tensorrt_fp16: false,
            tensorrt_cache_dir: None,
            tensorrt_profile: None,
            sessions: 1,
            intra_op_spinning: true,
            spin: None,
            graph_optimization: GraphOptimization::All,
            memory_pattern: true,
            cpu_arena: true,
            io_binding: None,
            cuda_graph: false,
            cudnn_conv_search: ConvSearch::Exhaustive,
            warmup: None,
            decode_limits: DecodeLimits::default(),
            jpeg_decoding: JpegDecoding::Exact,
            ort_lib: None,
        }
    }
}

impl ScorerOptions {
    /// Spinning as it will be set: the explicit choice, else the caller's default.
    pub fn effective_spinning(&self) -> bool {
        self.spin.unwrap_or(self.intra_op_spinning)
    }

    /// Whether IoBinding is used on `provider`.
    pub fn uses_io_binding(&self, provider: ExecutionProvider) -> bool {
        self.io_binding.unwrap_or(provider.is_gpu())
    }

    /// The TensorRT profile: as configured, else min 1 and opt = max = `batch`.
    pub fn profile_for(&self, batch: usize) -> TensorRtProfile {
        self.tensorrt_profile.unwrap_or(TensorRtProfile {
            min: 1,
            opt: batch,
            max: batch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_parse_and_print() {
        for p in [
            ExecutionProvider::Cpu,
            ExecutionProvider::Cuda,
            ExecutionProvider::TensorRt,
            ExecutionProvider::Auto,
        ] {
            assert_eq!(p.to_string().parse::<ExecutionProvider>(), Ok(p));
        }
        let err = "gpu".parse::<ExecutionProvider>().unwrap_err();
        assert!(err.contains("cpu, cuda, tensorrt or auto"), "{err}");
    }

    #[test]
    fn options_round_trip_through_json_with_defaults() {
        let options: ScorerOptions = serde_json::from_str(r#"{"provider": "tensorrt"}"#).unwrap();
        assert_eq!(options.provider, ExecutionProvider::TensorRt);
        assert_eq!(options.batch_size, ScorerOptions::default().batch_size);
        assert_eq!(options.graph_optimization, GraphOptimization::All);
        assert!(options.memory_pattern && options.cpu_arena && !options.cuda_graph);
        let back: ScorerOptions =
            serde_json::from_str(&serde_json::to_string(&options).unwrap()).unwrap();
        assert_eq!(back, options);
    }

    #[test]
    fn device_ids_take_one_number_or_a_list() {
        // Options written before device lists existed.
        let old: ScorerOptions = serde_json::from_str(r#"{"device_id": 3}"#).unwrap();
        assert_eq!(old.device_id.ids(), [3]);
        assert_eq!(serde_json::to_value(&old.device_id).unwrap(), 3);
        let many: ScorerOptions = serde_json::from_str(r#"{"device_id": [0, 1]}"#).unwrap();
        assert_eq!(many.device_id.ids(), [0, 1]);
        assert_eq!(
            serde_json::to_value(&many.device_id).unwrap(),
            serde_json::json!([0, 1])
        );
        assert!(serde_json::from_str::<ScorerOptions>(r#"{"device_id": []}"#).is_err());
        assert_eq!("2".parse::<DeviceIds>().unwrap().ids(), [2]);
        assert_eq!("0, 1".parse::<DeviceIds>().unwrap().ids(), [0, 1]);
        assert!("0,0".parse::<DeviceIds>().unwrap_err().contains("twice"));
        assert!("0,x".parse::<DeviceIds>().unwrap_err().contains("`x`"));
        assert!("-1".parse::<DeviceIds>().unwrap_err().contains("range"));
        assert!("".parse::<DeviceIds>().is_err());
        assert_eq!("0,1".parse::<DeviceIds>().unwrap().to_string(), "0,1");
    }

    #[test]
    fn knobs_parse_and_resolve() {
        assert_eq!("basic".parse(), Ok(GraphOptimization::Basic));
        assert_eq!("DISABLE".parse(), Ok(GraphOptimization::Disable));
        assert!("max".parse::<GraphOptimization>().is_err());
        assert_eq!("heuristic".parse(), Ok(ConvSearch::Heuristic));
        let mut options = ScorerOptions {
            intra_op_spinning: false,
            ..ScorerOptions::default()
        };
        assert!(!options.effective_spinning());
        options.spin = Some(true);
        assert!(options.effective_spinning());
        assert!(options.uses_io_binding(ExecutionProvider::Cuda));
        assert!(!options.uses_io_binding(ExecutionProvider::Cpu));
        options.io_binding = Some(true);
        assert!(options.uses_io_binding(ExecutionProvider::Cpu));
        assert_eq!(
            options.profile_for(32),
            TensorRtProfile {
                min: 1,
                opt: 32,
                max: 32
            }
        );
    }
}
