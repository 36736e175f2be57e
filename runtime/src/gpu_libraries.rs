//! The CUDA, cuDNN and TensorRT libraries a GPU build of ONNX Runtime needs, found without any
//! variable exported by hand.
//!
//! glibc reads `LD_LIBRARY_PATH` once, at process start, so a program cannot extend it for its
//! own later `dlopen` calls. Instead, the folders listed in a [`LIBRARY_PATH_FILE`] beside
//! `libonnxruntime.so` (written by `scripts/setup --gpu` and by the offline bundle's entry
//! point) are searched here, and each library the providers need is opened by its full path
//! with `RTLD_GLOBAL` before ONNX Runtime loads a provider: the loader then satisfies the
//! provider's `DT_NEEDED` names with the libraries already loaded.

use std::path::{Path, PathBuf};

/// File beside `libonnxruntime.so` naming the CUDA/cuDNN/TensorRT library folders, one a line;
/// relative lines are relative to the file's folder, `#` starts a comment.
pub const LIBRARY_PATH_FILE: &str = "library-path";
/// ONNX Runtime's provider libraries, loaded by ONNX Runtime from its own folder.
pub const SHARED_PROVIDER: &str = "libonnxruntime_providers_shared.so";
pub const CUDA_PROVIDER: &str = "libonnxruntime_providers_cuda.so";
pub const TENSORRT_PROVIDER: &str = "libonnxruntime_providers_tensorrt.so";

/// What the CUDA 13 build of ONNX Runtime 1.31 and TensorRT 10 need, each after its own
/// dependencies, so that opening one by full path never searches for an earlier one. cuDNN and
/// TensorRT open some of their parts themselves, by soname, later: those are preloaded too
/// (the loader matches an already-loaded soname first). A trailing `*` takes the first file
/// whose name starts with the rest (TensorRT's builder resource carries its full version).
pub const PRELOAD_ORDER: &[&str] = &[
    "libcudart.so.13",
    "libnvrtc.so.13",
    "libnvrtc-builtins.so.13*",
    "libnvJitLink.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudnn_graph.so.9",
    "libcudnn_engines_precompiled.so.9",
    "libcudnn_engines_runtime_compiled.so.9",
    "libcudnn_heuristic.so.9",
    "libcudnn_ops.so.9",
    "libcudnn_cnn.so.9",
    "libcudnn_adv.so.9",
    "libcudnn.so.9",
    "libnvinfer.so.10",
    "libnvinfer_builder_resource.so.10*",
    "libnvinfer_plugin.so.10",
    "libnvonnxparser.so.10",
];

/// One library opened ahead of ONNX Runtime's providers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Preloaded {
    /// The soname, e.g. `libcublasLt.so.13`.
    pub name: String,
    /// Where it was found.
    pub path: PathBuf,
    /// Why `dlopen` refused it (a missing dependency, the wrong architecture), if it did.
    pub error: Option<String>,
}

/// The folders named by the [`LIBRARY_PATH_FILE`] in `lib_dir` (none when there is no file).
pub fn library_path_dirs(lib_dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(lib_dir.join(LIBRARY_PATH_FILE)) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(|line| lib_dir.join(line))
        .collect()
}

/// The first `dirs` entry holding a file called `name` (or, for `prefix*`, the first file
/// in name order whose name starts with `prefix`).
pub fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    let Some(prefix) = name.strip_suffix('*') else {
        return dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
    };
    dirs.iter().find_map(|d| {
        let mut matches: Vec<PathBuf> = std::fs::read_dir(d)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect();
        matches.sort();
        matches.into_iter().next()
    })
}

/// Whether `lib_dir` holds a GPU build's provider library.
pub fn has_gpu_provider(lib_dir: &Path) -> bool {
    [CUDA_PROVIDER, TENSORRT_PROVIDER]
        .iter()
        .any(|name| lib_dir.join(name).exists())
}

/// Opens, with `RTLD_GLOBAL`, the [`PRELOAD_ORDER`] libraries found in the folders that the
/// [`LIBRARY_PATH_FILE`]s of `lib_dirs` name, when those folders hold a GPU provider. Libraries
/// not found are left to the loader's own search (a system CUDA in ld.so.cache); the handles
/// stay open for the life of the process, as the providers need them.
pub fn preload(lib_dirs: &[&Path]) -> Vec<Preloaded> {
    if !lib_dirs.iter().any(|d| has_gpu_provider(d)) {
        return Vec::new();
    }
    let dirs: Vec<PathBuf> = lib_dirs.iter().flat_map(|d| library_path_dirs(d)).collect();
    PRELOAD_ORDER
        .iter()
        .filter_map(|name| find_in(&dirs, name).map(|path| (name, path)))
        .map(|(name, path)| {
            // The file's own name for a prefix entry: that is the soname it is needed by.
            let name = match name.strip_suffix('*') {
                Some(_) => path
                    .file_name()
                    .map_or_else(|| name.to_string(), |n| n.to_string_lossy().into_owned()),
                None => name.to_string(),
            };
            let error = open_global(&path).err();
            if let Some(e) = &error {
                tracing::warn!("cannot preload {}: {e}", path.display());
            }
            Preloaded { name, path, error }
        })
        .collect()
}

#[cfg(unix)]
fn open_global(path: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LAZY};
    // Lazy binding: relocating cuDNN's and cuBLAS's hundreds of MB up front would slow every
    // start, CPU-only runs included; a missing DT_NEEDED library still fails here.
    // SAFETY: CUDA libraries run no initialisers that depend on the caller's state.
    let library =
        unsafe { Library::open(Some(path), RTLD_LAZY | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
    // Kept loaded for the process: the provider resolves its symbols against it later.
    let _ = library.into_raw();
    Ok(())
}

#[cfg(not(unix))]
fn open_global(_path: &Path) -> Result<(), String> {
    Err("preloading is only implemented for Linux".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_path_file_lines_are_relative_to_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(LIBRARY_PATH_FILE),
            "# CUDA\n../nvidia/cu13/lib\n\n/opt/trt/lib  # TensorRT\n",
        )
        .unwrap();
        let dirs = library_path_dirs(dir.path());
        assert_eq!(
            dirs,
            vec![
                dir.path().join("../nvidia/cu13/lib"),
                PathBuf::from("/opt/trt/lib")
            ]
        );
        assert!(library_path_dirs(&dir.path().join("absent")).is_empty());
    }

    #[test]
    fn a_prefix_entry_takes_the_first_matching_file() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "libnvinfer_builder_resource.so.10.16.1",
            "libnvinfer_builder_resource.so.10.9.0",
            "libnvinfer.so.10",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let dirs = [dir.path().join("absent"), dir.path().to_path_buf()];
        assert_eq!(
            find_in(&dirs, "libnvinfer_builder_resource.so.10*"),
            Some(dir.path().join("libnvinfer_builder_resource.so.10.16.1"))
        );
        assert_eq!(find_in(&dirs, "libcudnn.so.9"), None);
    }

    #[test]
    fn nothing_is_preloaded_beside_a_cpu_library() {
        let dir = tempfile::tempdir().unwrap();
        let cuda = dir.path().join("cuda");
        std::fs::create_dir(&cuda).unwrap();
        // An empty file would fail to load; it must not even be tried without a GPU provider.
        std::fs::write(cuda.join("libcudart.so.13"), b"").unwrap();
        std::fs::write(dir.path().join(LIBRARY_PATH_FILE), "cuda\n").unwrap();
        assert!(preload(&[dir.path()]).is_empty());
        assert_eq!(
            find_in(&library_path_dirs(dir.path()), "libcudart.so.13"),
            Some(dir.path().join("cuda/libcudart.so.13"))
        );
        // With a GPU provider beside it, the (empty, so refused) library is tried and reported.
        std::fs::write(dir.path().join(CUDA_PROVIDER), b"").unwrap();
        let tried = preload(&[dir.path()]);
        assert_eq!(tried.len(), 1);
        assert_eq!(tried[0].name, "libcudart.so.13");
        assert!(tried[0].error.is_some());
    }
}
