//! `agiqa doctor`: what this machine can run and, when a GPU provider cannot, exactly why — the
//! ONNX Runtime library in use, the providers compiled in, the GPUs and driver, each GPU
//! provider's load result with its missing libraries resolved as the loader would, and for a
//! model the nodes each provider took.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ort::ep::{self, ExecutionProvider as _};
use ort::session::Session;

use crate::elf_deps::{self, Dependency, SearchPath};
use crate::gpu_devices::{self, GpuReport};
use crate::gpu_libraries::{self, Preloaded, CUDA_PROVIDER, TENSORRT_PROVIDER};
use crate::node_placement::{self, NodePlacement, PlacementOptions};
use crate::onnxruntime::{self, OrtLibraryError};
use crate::scorer::{self, ExecutionProvider};

/// The CUDA driver API library, installed with the NVIDIA driver (never by pip).
const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    pub ort_lib: Option<PathBuf>,
    /// A model whose node placement to measure.
    pub model: Option<PathBuf>,
    /// Provider for the placement; `auto`: the first GPU provider that loads, else CPU.
    pub provider: ExecutionProvider,
    pub device_id: i32,
}

/// The ONNX Runtime library in use.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LibraryReport {
    /// The real file (links followed).
    pub path: PathBuf,
    /// Where it was found (its folder is where ONNX Runtime looks for provider libraries).
    pub found: PathBuf,
    pub version: String,
    pub build_info: String,
    pub providers_compiled_in: Vec<String>,
    /// Folders from the `library-path` file beside it.
    pub library_path: Vec<PathBuf>,
    pub preloaded: Vec<Preloaded>,
}

/// One GPU provider's state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderReport {
    /// `cuda` or `tensorrt`.
    pub provider: String,
    pub compiled_in: bool,
    /// The provider library beside `libonnxruntime.so`, when shipped.
    pub library: Option<PathBuf>,
    /// Whether ONNX Runtime registered it.
    pub loads: bool,
    /// ONNX Runtime's registration error.
    pub error: Option<String>,
    /// Dependencies the loader would not find (the exact reason a provider does not load).
    pub missing: Vec<Dependency>,
    /// A problem reading the provider library itself.
    pub unreadable: Option<String>,
    /// One line for people.
    pub summary: String,
}

/// Everything `doctor` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DoctorReport {
    pub library: LibraryReport,
    pub gpus: GpuReport,
    /// The driver's `libcuda.so.1` as the loader would find it; `None`: no NVIDIA driver.
    pub libcuda: Option<PathBuf>,
    pub providers: Vec<ProviderReport>,
    /// Node placement for `--model`.
    pub placement: Option<NodePlacement>,
}

/// Why `doctor` could not finish.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error(transparent)]
    Library(#[from] OrtLibraryError),
    #[error("node placement: {0}")]
    Placement(#[from] node_placement::PlacementError),
}

/// Runs every check; only a library that does not load or a placement that fails is an error
/// (GPU problems are findings, reported in the result).
pub fn run(options: &DoctorOptions) -> Result<DoctorReport, DoctorError> {
    let path = onnxruntime::init(options.ort_lib.as_deref())?.to_path_buf();
    let found = onnxruntime::found_path().unwrap_or(&path).to_path_buf();
    let lib_dir = found.parent().unwrap_or(Path::new(".")).to_path_buf();
    let library = LibraryReport {
        path: path.clone(),
        found: found.clone(),
        version: onnxruntime::version(),
        build_info: onnxruntime::build_info(),
        providers_compiled_in: scorer::available_providers()
            .into_iter()
            .map(String::from)
            .collect(),
        library_path: gpu_libraries::library_path_dirs(&lib_dir),
        preloaded: onnxruntime::preloaded().to_vec(),
    };
    let loaded: HashMap<String, PathBuf> = library
        .preloaded
        .iter()
        .filter(|p| p.error.is_none())
        .map(|p| (p.name.clone(), p.path.clone()))
        .collect();
    let search = SearchPath::from_system(loaded);
    let libcuda = elf_deps::find_library(DRIVER_LIBRARY, &search);
    let providers = vec![
        provider_report(
            "cuda",
            ep::CUDA::is_available().unwrap_or(false),
            &lib_dir.join(CUDA_PROVIDER),
            register(
                ep::CUDA::default()
                    .with_device_id(options.device_id)
                    .build(),
            ),
            &search,
            libcuda.is_some(),
        ),
        provider_report(
            "tensorrt",
            ep::TensorRT::is_available().unwrap_or(false),
            &lib_dir.join(TENSORRT_PROVIDER),
            register(
                ep::TensorRT::default()
                    .with_device_id(options.device_id)
                    .build(),
            ),
            &search,
            libcuda.is_some(),
        ),
    ];
    let placement = match &options.model {
        None => None,
        Some(model) => {
            let provider = match options.provider {
                ExecutionProvider::Auto => {
                    providers
                        .iter()
                        .find(|p| p.loads)
                        .map_or(ExecutionProvider::Cpu, |p| {
                            if p.provider == "tensorrt" {
                                ExecutionProvider::TensorRt
                            } else {
                                ExecutionProvider::Cuda
                            }
                        })
                }
                chosen => chosen,
            };
            Some(node_placement::measure(
                model,
                &PlacementOptions {
                    provider,
                    device_id: options.device_id,
                    batch: 1,
                },
            )?)
        }
    };
    // TensorRT first in `auto`'s order: keep the report in that order too.
    let mut providers = providers;
    providers.reverse();
    Ok(DoctorReport {
        library,
        gpus: gpu_devices::query(),
        libcuda,
        providers,
        placement,
    })
}

/// Registers one provider on a throw-away session builder; its error when it does not load.
fn register(dispatch: ep::ExecutionProviderDispatch) -> Result<(), String> {
    let environment =
        onnxruntime::environment().ok_or_else(|| "ONNX Runtime is not initialised".to_string())?;
    Session::builder(environment)
        .map_err(|e| e.to_string())?
        .with_execution_providers([dispatch.error_on_failure()])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn provider_report(
    provider: &str,
    compiled_in: bool,
    library: &Path,
    registered: Result<(), String>,
    search: &SearchPath,
    driver: bool,
) -> ProviderReport {
    let shipped = library.exists();
    let (missing, unreadable) = if shipped {
        match elf_deps::resolve(library, search) {
            Ok(deps) => (
                deps.into_iter().filter(|d| d.found.is_none()).collect(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e.to_string())),
        }
    } else {
        (Vec::new(), None)
    };
    let loads = registered.is_ok();
    let error = registered.err();
    let summary = summarise(
        provider,
        Facts {
            compiled_in,
            shipped,
            loads,
            driver,
        },
        &missing,
        &error,
        &unreadable,
    );
    ProviderReport {
        provider: provider.to_string(),
        compiled_in,
        library: shipped.then(|| library.to_path_buf()),
        loads,
        error,
        missing,
        unreadable,
        summary,
    }
}

/// The one line a person reads first: the most specific reason wins (a missing library over
/// ONNX Runtime's generic "failed to load").
/// What is known about one provider, for [`summarise`].
struct Facts {
    compiled_in: bool,
    shipped: bool,
    loads: bool,
    /// `libcuda.so.1` is installed.
    driver: bool,
}

fn summarise(
    provider: &str,
    facts: Facts,
    missing: &[Dependency],
    error: &Option<String>,
    unreadable: &Option<String>,
) -> String {
    let names = |m: &[Dependency]| {
        m.iter()
            .map(|d| {
                format!(
                    "{} (needed by {})",
                    d.name,
                    d.needed_by.file_name().map_or_else(
                        || d.needed_by.display().to_string(),
                        |n| n.to_string_lossy().into_owned()
                    )
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Facts {
        compiled_in,
        shipped,
        loads,
        driver,
    } = facts;
    if loads && missing.is_empty() {
        return "loads".into();
    }
    let no_driver = format!(
        "no NVIDIA driver ({DRIVER_LIBRARY} not found; install the driver, r580 or newer for \
         CUDA 13)"
    );
    // User-space libraries first: scripts/setup --gpu fixes them; the driver is the system's.
    let libraries: Vec<Dependency> = missing
        .iter()
        .filter(|d| d.name != DRIVER_LIBRARY)
        .cloned()
        .collect();
    if !libraries.is_empty() {
        return format!(
            "does not load: missing {}; run scripts/setup --gpu, or list its folder in {}{}",
            names(&libraries),
            gpu_libraries::LIBRARY_PATH_FILE,
            if driver {
                String::new()
            } else {
                format!("; also {no_driver}")
            }
        );
    }
    if ((compiled_in || shipped) && !loads && !driver) || libraries.len() < missing.len() {
        return format!("does not load: {no_driver}");
    }
    if !shipped && !compiled_in {
        return format!(
            "not in this ONNX Runtime (a CPU build, no {provider} provider library beside it); \
             scripts/setup --gpu installs the GPU build"
        );
    }
    if let Some(reason) = unreadable {
        return format!("provider library unreadable: {reason}");
    }
    match error {
        Some(e) => format!("does not load: {e}"),
        None => "loads".into(),
    }
}

/// The report as people read it.
pub fn render(report: &DoctorReport) -> String {
    let mut out = String::new();
    let lib = &report.library;
    let _ = writeln!(out, "ONNX Runtime");
    let _ = writeln!(out, "  library:    {}", lib.path.display());
    if lib.found != lib.path {
        let _ = writeln!(out, "  found as:   {}", lib.found.display());
    }
    let _ = writeln!(out, "  version:    {}", lib.version);
    let _ = writeln!(out, "  build info: {}", lib.build_info);
    let _ = writeln!(
        out,
        "  providers compiled in: {}",
        lib.providers_compiled_in.join(", ")
    );
    for dir in &lib.library_path {
        let _ = writeln!(out, "  library path: {}", dir.display());
    }
    for p in &lib.preloaded {
        match &p.error {
            None => {
                let _ = writeln!(out, "  preloaded:  {}", p.path.display());
            }
            Some(e) => {
                let _ = writeln!(out, "  NOT preloaded: {}: {e}", p.path.display());
            }
        }
    }
    let _ = writeln!(out, "GPUs");
    let _ = writeln!(
        out,
        "  CUDA_VISIBLE_DEVICES: {}",
        report
            .gpus
            .cuda_visible_devices
            .as_deref()
            .unwrap_or("(unset)")
    );
    if let Some(problem) = &report.gpus.problem {
        let _ = writeln!(out, "  {problem}");
    }
    match &report.libcuda {
        Some(path) => {
            let _ = writeln!(out, "  driver library: {}", path.display());
        }
        None => {
            let _ = writeln!(
                out,
                "  driver library: {DRIVER_LIBRARY} not found (no NVIDIA driver installed)"
            );
        }
    }
    for gpu in &report.gpus.gpus {
        let _ = writeln!(
            out,
            "  {}: {}, driver {}, compute capability {}{}",
            gpu.index,
            gpu.name,
            gpu.driver,
            gpu.compute_capability,
            gpu.memory_total_mib
                .map(|m| format!(", {m} MiB"))
                .unwrap_or_default()
        );
    }
    for p in &report.providers {
        let _ = writeln!(out, "{} provider: {}", p.provider, p.summary);
        if let Some(library) = &p.library {
            let _ = writeln!(out, "  library: {}", library.display());
        }
        for d in &p.missing {
            let _ = writeln!(
                out,
                "  missing: {} (needed by {})",
                d.name,
                d.needed_by.display()
            );
        }
        if let (Some(e), false) = (&p.error, p.loads) {
            let _ = writeln!(out, "  ONNX Runtime: {e}");
        }
    }
    if let Some(placement) = &report.placement {
        let _ = writeln!(
            out,
            "node placement ({} on {}): {} nodes",
            placement.model.display(),
            placement.requested,
            placement.total()
        );
        for (provider, n) in &placement.nodes {
            let _ = writeln!(out, "  {provider}: {n}");
        }
        if placement.cpu_fallback() > 0 {
            let _ = writeln!(
                out,
                "  warning: {} nodes fell back to CPU (a copy to and from the GPU each)",
                placement.cpu_fallback()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(name: &str) -> Dependency {
        Dependency {
            name: name.into(),
            needed_by: PathBuf::from("/x/libonnxruntime_providers_cuda.so"),
            found: None,
            via: None,
        }
    }

    fn gpu_build(loads: bool, driver: bool) -> Facts {
        Facts {
            compiled_in: true,
            shipped: true,
            loads,
            driver,
        }
    }

    #[test]
    fn the_most_specific_reason_is_summarised() {
        let error = Some("failed to load".to_string());
        let line = summarise("cuda", gpu_build(false, false), &[], &error, &None);
        assert!(
            line.contains("no NVIDIA driver (libcuda.so.1 not found"),
            "{line}"
        );
        let line = summarise(
            "cuda",
            gpu_build(false, false),
            &[missing("libcudnn.so.9")],
            &error,
            &None,
        );
        assert!(
            line.starts_with(
                "does not load: missing libcudnn.so.9 (needed by libonnxruntime_providers_cuda.so)"
            ),
            "{line}"
        );
        assert!(line.contains("also no NVIDIA driver"), "{line}");
        let line = summarise("cuda", gpu_build(false, true), &[], &error, &None);
        assert_eq!(line, "does not load: failed to load");
        assert_eq!(
            summarise("cuda", gpu_build(true, true), &[], &None, &None),
            "loads"
        );
    }
}
