//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time and `libonnxruntime.so`
//! is opened at run time. `ort` panics when it cannot find the library, so the path is resolved
//! here first and a missing library becomes an error that says what to run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
/// 2. beside the executable, and in `lib/` beside it (how a deployed binary ships it);
/// 3. the project's own install folder `.deps/lib` (written by `scripts/setup`).
pub fn candidate_paths(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            dirs.push(dir.join("lib"));
        }
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/lib"));
    let mut paths: Vec<PathBuf> = explicit.map(Path::to_path_buf).into_iter().collect();
    if let Some(env) = std::env::var_os(ORT_DYLIB_ENV).filter(|v| !v.is_empty()) {
        paths.push(PathBuf::from(env));
    }
    for dir in dirs {
        for name in LIBRARY_NAMES {
            paths.push(dir.join(name));
        }
    }
    paths
}

/// Resolves the ONNX Runtime library without loading it.
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, OrtLibraryError> {
    let from_env = std::env::var_os(ORT_DYLIB_ENV).filter(|v| !v.is_empty());
    // An explicit choice that does not exist is a mistake to report, not to paper over.
    if let Some(chosen) = explicit
        .map(Path::to_path_buf)
        .or(from_env.map(PathBuf::from))
    {
        if !chosen.is_file() {
            return Err(OrtLibraryError::ExplicitMissing { path: chosen });
        }
        return Ok(chosen);
    }
    let searched = candidate_paths(None);
    searched
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or(OrtLibraryError::NotFound { searched })
}

/// The library in use and the process-wide environment (kept alive for the process: `ort`
/// holds only a weak reference to it).
struct Loaded {
    path: PathBuf,
    environment: ort::environment::Environment,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// Loads ONNX Runtime once per process and returns the library path in use. Later calls
/// return the first result; the explicit path is only consulted on the first call.
pub fn init(explicit: Option<&Path>) -> Result<&'static Path, OrtLibraryError> {
    if let Some(loaded) = LOADED.get() {
        return Ok(&loaded.path);
    }
    let path = locate_library(explicit)?;
    let load_failed = |reason: String| OrtLibraryError::LoadFailed {
        path: path.clone(),
        reason,
    };
    let environment = ort::init_from(&path)
        .map_err(|e| load_failed(e.to_string()))?
        .with_name("agiqa")
        .build()
        .map_err(|e| load_failed(e.to_string()))?;
    let loaded = LOADED.get_or_init(|| Loaded {
        path: path.clone(),
        environment,
    });
    Ok(&loaded.path)
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

    #[test]
    fn project_install_folder_is_searched() {
        let paths = candidate_paths(None);
        assert!(paths
            .iter()
            .any(|p| p.ends_with(".deps/lib/libonnxruntime.so")));
    }
}
