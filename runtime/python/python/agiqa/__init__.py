"""Score AI-generated images with exported CLIP-AGIQA ONNX models, on ONNX Runtime (CPU or
GPU), without PyTorch.

    import agiqa
    scorer = agiqa.Scorer("quality.onnx")
    for r in scorer.score(["a.jpg", "b.png"]):
        print(r["path"], r.get("scores") or r["error"])
"""

from ._agiqa import (
    AgiqaError,
    ImageError,
    InferenceError,
    InputError,
    InternalError,
    ModelError,
    OnnxRuntimeError,
    ProviderError,
)
from ._scorer import Scorer, create_metric, load

__version__ = "0.1.0"

__all__ = [
    "AgiqaError",
    "ImageError",
    "InferenceError",
    "InputError",
    "InternalError",
    "ModelError",
    "OnnxRuntimeError",
    "ProviderError",
    "Scorer",
    "create_metric",
    "load",
]
