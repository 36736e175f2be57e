//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time and `libonnxruntime.so`
//! is opened at run time. `ort` panics when it cannot find the library, so the path is resolved
//! here first and a missing library becomes an error that says what to run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::gpu_libraries::Preloaded;

/// Environment variable naming the library explicitly (the same one `ort` reads).
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

#[cfg(target_os = "linux")]
const LIBRARY_NAMES: &[&str] = &["libonnxruntime.so", "libonnxruntime.so.1"];
#[cfg(target_os = "macos")]
const LIBRARY_NAMES: &[&str] = &["libonnxruntime.dylib"];
#[cfg(target_os = "windows")]
const LIBRARY_NAMES: &[&str] = &["onnxruntime.dll"];

/// Why ONNX Runtime could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum OrtLibraryError {
    #[error(
        "ONNX Runtime library not found (looked in: {}). Run `scripts/setup`, or set {ORT_DYLIB_ENV} \
         to a libonnxruntime.so of version >= 1.31 (e.g. from the PyPI `onnxruntime` wheel)",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound { searched: Vec<PathBuf> },
    #[error("{ORT_DYLIB_ENV}={path} does not exist; point it at libonnxruntime.so or unset it")]
    ExplicitMissing { path: PathBuf },
    #[error("cannot load ONNX Runtime from {path}: {reason} (it must be the plain C-API library, version >= 1.31)")]
    LoadFailed { path: PathBuf, reason: String },
}

/// Where the library is looked for, in order:
/// 1. an explicit path (a CLI flag), then `ORT_DYLIB_PATH` — what the user said wins;
/// 2. beside the executable, and in `lib/` beside it (how a deployed binary or the offline
///    bundle ships it);
/// 3. the project's GPU install `.deps/gpu/lib` (written by `scripts/setup --gpu`: ONNX Runtime
///    with the CUDA and TensorRT providers), then the CPU install `.deps/lib` (`scripts/setup`).
#[derive(Debug, Clone)]
pub struct SearchRoots {
    pub explicit: Option<PathBuf>,
    /// `ORT_DYLIB_PATH`, when set and not empty.
    pub env: Option<PathBuf>,
    /// The folder of the running executable.
    pub exe_dir: Option<PathBuf>,
    /// The project's `.deps` folder.
    pub deps_dir: PathBuf,
}

impl SearchRoots {
    /// The roots of this process: its flag, environment, executable and checkout.
    pub fn from_process(explicit: Option<&Path>) -> SearchRoots {
        SearchRoots {
            explicit: explicit.map(Path::to_path_buf),
            env: std::env::var_os(ORT_DYLIB_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            exe_dir: std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_path_buf)),
            deps_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps"),
        }
    }

    /// Every path tried, in order (explicit choices first).
    pub fn candidates(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(dir) = &self.exe_dir {
            dirs.push(dir.clone());
            dirs.push(dir.join("lib"));
        }
        dirs.push(self.deps_dir.join("gpu/lib"));
        dirs.push(self.deps_dir.join("lib"));
        let mut paths: Vec<PathBuf> = self.explicit.iter().chain(&self.env).cloned().collect();
        for dir in dirs {
            for name in LIBRARY_NAMES {
                paths.push(dir.join(name));
            }
        }
        paths
    }

    /// The library these roots pick, as found (not canonicalised: a link farm's folder is
    /// where its `library-path` file lives).
    pub fn locate(&self) -> Result<PathBuf, OrtLibraryError> {
        // An explicit choice that does not exist is a mistake to report, not to paper over.
        if let Some(chosen) = self.explicit.as_ref().or(self.env.as_ref()) {
            if !chosen.is_file() {
                return Err(OrtLibraryError::ExplicitMissing {
                    path: chosen.clone(),
                });
            }
            return Ok(chosen.clone());
        }
        let searched = self.candidates();
        searched
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .ok_or(OrtLibraryError::NotFound { searched })
    }
}

/// Every path this process would try, in order; see [`SearchRoots`].
pub fn candidate_paths(explicit: Option<&Path>) -> Vec<PathBuf> {
    SearchRoots::from_process(explicit).candidates()
}

/// Resolves the ONNX Runtime library without loading it (the real file, links followed).
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, OrtLibraryError> {
    let found = SearchRoots::from_process(explicit).locate()?;
    Ok(found.canonicalize().unwrap_or(found))
}

/// The library in use and the process-wide environment (kept alive for the process: `ort`
/// holds only a weak reference to it).
struct Loaded {
    path: PathBuf,
    /// Where the library was found (a link farm's folder, before links are followed).
    found: PathBuf,
    preloaded: Vec<Preloaded>,
    environment: ort::environment::Environment,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// Loads ONNX Runtime once per process and returns the library path in use. Later calls
/// return the first result; the explicit path is only consulted on the first call.
pub fn init(explicit: Option<&Path>) -> Result<&'static Path, OrtLibraryError> {
    if let Some(loaded) = LOADED.get() {
        return Ok(&loaded.path);
    }
    let found = SearchRoots::from_process(explicit).locate()?;
    let path = found.canonicalize().unwrap_or_else(|_| found.clone());
    // Before ONNX Runtime loads: its providers are only opened at session creation, but the
    // libraries they need must be in the process by then.
    let dirs: Vec<&Path> = [found.parent(), path.parent()]
        .into_iter()
        .flatten()
        .collect();
    let preloaded = crate::gpu_libraries::preload(&dirs);
    let load_failed = |reason: String| OrtLibraryError::LoadFailed {
        path: path.clone(),
        reason,
    };
    // Loaded under the name it was found by: ONNX Runtime looks for its provider libraries
    // beside that name, which for a link farm (`.deps/gpu/lib`) is the farm.
    let environment = ort::init_from(&found)
        .map_err(|e| load_failed(e.to_string()))?
        .with_name("agiqa")
        .build()
        .map_err(|e| load_failed(e.to_string()))?;
    let loaded = LOADED.get_or_init(|| Loaded {
        path: path.clone(),
        found,
        preloaded,
        environment,
    });
    Ok(&loaded.path)
}

/// Where the loaded library was found before links were followed (`None` before [`init`]).
pub fn found_path() -> Option<&'static Path> {
    LOADED.get().map(|loaded| loaded.found.as_path())
}

/// The CUDA/cuDNN/TensorRT libraries opened ahead of the providers (empty for a CPU build).
pub fn preloaded() -> &'static [Preloaded] {
    LOADED
        .get()
        .map_or(&[], |loaded| loaded.preloaded.as_slice())
}

/// The process-wide environment sessions are built in; [`init`] must have succeeded.
pub fn environment() -> Option<&'static ort::environment::Environment> {
    LOADED.get().map(|loaded| &loaded.environment)
}

/// Version of the loaded library, e.g. `1.31.1`, read from its versioned file name
/// (`libonnxruntime.so.1.31.1`, what the wheels and release archives ship); `unknown` before
/// [`init`] or for an unversioned file. [`build_info`] has the build's own description.
pub fn version() -> String {
    LOADED
        .get()
        .and_then(|loaded| std::fs::canonicalize(&loaded.path).ok())
        .and_then(|real| {
            let name = real.file_name()?.to_string_lossy().into_owned();
            let (_, version) = name.split_once(".so.")?;
            Some(version.to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// ONNX Runtime's build description (git commit, build type).
pub fn build_info() -> String {
    ort::info().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_path_is_an_error_naming_it() {
        let err = locate_library(Some(Path::new("/nowhere/libonnxruntime.so"))).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("/nowhere/libonnxruntime.so"), "{message}");
    }

    /// A fake checkout: empty files where the libraries would be.
    fn layout(files: &[&str]) -> (tempfile::TempDir, SearchRoots) {
        let root = tempfile::tempdir().unwrap();
        for file in files {
            let path = root.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"").unwrap();
        }
        let roots = SearchRoots {
            explicit: None,
            env: None,
            exe_dir: Some(root.path().join("bin")),
            deps_dir: root.path().join(".deps"),
        };
        (root, roots)
    }

    #[test]
    fn gpu_install_is_picked_over_the_cpu_one() {
        let (root, roots) = layout(&[
            ".deps/lib/libonnxruntime.so",
            ".deps/gpu/lib/libonnxruntime.so",
        ]);
        assert_eq!(
            roots.locate().unwrap(),
            root.path().join(".deps/gpu/lib/libonnxruntime.so")
        );
        let (root, roots) = layout(&[".deps/lib/libonnxruntime.so"]);
        assert_eq!(
            roots.locate().unwrap(),
            root.path().join(".deps/lib/libonnxruntime.so")
        );
    }

    #[test]
    fn beside_the_executable_wins_over_the_project_installs() {
        let (root, roots) = layout(&[
            "bin/lib/libonnxruntime.so.1",
            ".deps/gpu/lib/libonnxruntime.so",
        ]);
        assert_eq!(
            roots.locate().unwrap(),
            root.path().join("bin/lib/libonnxruntime.so.1")
        );
    }

    #[test]
    fn flag_then_environment_override_the_search() {
        let (root, mut roots) = layout(&[
            ".deps/gpu/lib/libonnxruntime.so",
            "cpu/libonnxruntime.so",
            "other/libonnxruntime.so",
        ]);
        roots.env = Some(root.path().join("cpu/libonnxruntime.so"));
        assert_eq!(
            roots.locate().unwrap(),
            root.path().join("cpu/libonnxruntime.so")
        );
        roots.explicit = Some(root.path().join("other/libonnxruntime.so"));
        assert_eq!(
            roots.locate().unwrap(),
            root.path().join("other/libonnxruntime.so")
        );
        let (_root, roots) = layout(&[]);
        let err = roots.locate().unwrap_err().to_string();
        assert!(err.contains(".deps/gpu/lib/libonnxruntime.so"), "{err}");
    }

    #[test]
    fn project_install_folder_is_searched() {
        let paths = candidate_paths(None);
        assert!(paths
            .iter()
            .any(|p| p.ends_with(".deps/lib/libonnxruntime.so")));
    }
}
