"""Finding ONNX Runtime in the user's environment: the `onnxruntime` or `onnxruntime-gpu`
package (extras `agiqa[cpu]` / `agiqa[gpu]`), whose `capi/` folder holds the plain C-API
library the Rust runtime loads. Nothing is bundled, so agiqa never fights another ORT."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

from ._agiqa import OnnxRuntimeError

MINIMUM = (1, 31)
_INSTALL = (
    "install one of the extras: pip install 'agiqa[cpu]' (onnxruntime) or "
    "pip install 'agiqa[gpu]' (onnxruntime-gpu with its CUDA/cuDNN wheels), "
    "or set ORT_DYLIB_PATH to a libonnxruntime of version >= 1.31"
)


def _distribution() -> Optional[tuple[str, str]]:
    """(name, version) of the installed ONNX Runtime distribution, GPU build first."""
    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _library_names() -> tuple[str, ...]:
    if sys.platform == "darwin":
        return ("libonnxruntime.*.dylib", "libonnxruntime.dylib")
    if sys.platform == "win32":
        return ("onnxruntime.dll",)
    return ("libonnxruntime.so.*", "libonnxruntime.so")


def find_library() -> Optional[str]:
    """The libonnxruntime to load, or None when ORT_DYLIB_PATH names one (the runtime then
    loads that; a wrong path is an error there). Raises OnnxRuntimeError naming both extras
    when no ONNX Runtime >= 1.31 is installed."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return None
    dist = _distribution()
    spec = importlib.util.find_spec("onnxruntime")
    if dist is None or spec is None or not spec.submodule_search_locations:
        raise OnnxRuntimeError(f"ONNX Runtime is not installed; {_INSTALL}")
    name, version = dist
    if _version_tuple(version) < MINIMUM:
        raise OnnxRuntimeError(
            f"{name} {version} is too old (agiqa needs >= 1.31); {_INSTALL}"
        )
    capi = Path(list(spec.submodule_search_locations)[0]) / "capi"
    for pattern in _library_names():
        found = sorted(capi.glob(pattern))
        if found:
            return str(found[-1])
    raise OnnxRuntimeError(
        f"{name} {version} is installed but {capi} holds no libonnxruntime; reinstall it"
    )


def is_gpu_build() -> bool:
    dist = _distribution()
    return dist is not None and dist[0] == "onnxruntime-gpu"


def preload_gpu_libraries() -> Optional[str]:
    """Loads the CUDA/cuDNN libraries of the nvidia-* wheels the way ONNX Runtime's own
    `onnxruntime.preload_dlls()` does (it is called), so that the CUDA provider, which the Rust
    runtime opens, finds them. Returns a note when that was not possible."""
    if not is_gpu_build():
        return None
    try:
        import onnxruntime  # the pip package; only its preload helper is used

        preload = getattr(onnxruntime, "preload_dlls", None)
        if preload is None:
            return "onnxruntime has no preload_dlls(); CUDA libraries must be on the loader path"
        preload()
    except Exception as e:  # a failed preload leaves `auto` to fall back, with this reason
        return f"onnxruntime.preload_dlls() failed: {e}"
    return None
