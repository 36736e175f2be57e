"""`agiqa.Scorer`: the Python face of the Rust runtime's `Scorer` and parallel pipeline."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _agiqa, _ort
from ._agiqa import InputError, ProviderError

PathLike = Union[str, "os.PathLike[str]"]


def _paths(paths: Union[PathLike, Iterable[PathLike]]) -> List[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [os.fspath(p) for p in paths]


class Scorer:
    """An exported CLIP-AGIQA model (`.onnx` from `agiqa-export`) on ONNX Runtime.

    `provider` is `cpu`, `cuda`, `tensorrt` or `auto` (TensorRT, then CUDA, then CPU; the
    reasons for skipping each are in `provider_notes`). An explicitly requested GPU provider that
    cannot run raises `ProviderError`, never silently runs on CPU. `threads` are ONNX Runtime's
    intra-op threads (None: every core), `workers` the decode threads of `score` (None: every
    core), `device_id` the GPU (one id; one Scorer per GPU). Thread-safe.
    """

    def __init__(
        self,
        model_path: PathLike,
        provider: str = "auto",
        threads: Optional[int] = None,
        batch_size: int = 16,
        device_id: Union[int, Sequence[int]] = 0,
        workers: Optional[int] = None,
    ) -> None:
        ids = [device_id] if isinstance(device_id, int) else list(device_id)
        if len(ids) != 1 or not all(isinstance(i, int) for i in ids):
            raise ProviderError(
                f"device_id {device_id!r}: a Scorer runs on one GPU; create one Scorer per "
                "device (e.g. one Ray actor per GPU)"
            )
        library = _ort.find_library()
        notes = []
        if provider.lower() != "cpu":
            note = _ort.preload_gpu_libraries()
            if note:
                notes.append(note)
        self._inner = _agiqa.Scorer(
            os.fspath(model_path),
            ort_lib=library,
            provider=provider,
            threads=threads,
            batch_size=batch_size,
            device_id=ids[0],
            workers=workers,
        )
        self._notes = notes + self._inner.provider_notes
        self._metadata: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"agiqa.Scorer(heads={self.heads}, provider={self.provider!r})"

    @property
    def provider(self) -> str:
        """The execution provider that actually runs: `cpu`, `cuda` or `tensorrt`."""
        return self._inner.provider

    @property
    def provider_notes(self) -> List[str]:
        return list(self._notes)

    @property
    def heads(self) -> List[str]:
        """Head names, the keys of every result's `scores` (and the columns of `score_batch`)."""
        return self._inner.heads

    @property
    def batch_size(self) -> int:
        return self._inner.batch_size

    @property
    def image_size(self) -> int:
        """The model's square input side R."""
        return self._inner.image_size

    @property
    def input_name(self) -> str:
        """`pixel_values` (float32 [N, 3, R, R]) or `pixels_uint8` (uint8 [N, R, R, 3])."""
        return self._inner.input_name

    @property
    def metadata(self) -> Dict[str, Any]:
        """What the model says about itself: backbone, preprocessing, input, quantisation
        (`fp32`/`fp16` weights, None if unrecorded) and, per head, score scale, dataset,
        metrics and protocol (dicts keyed by head name). `raw` is the `agiqa.*` metadata."""
        if self._metadata is None:
            raw = json.loads(self._inner.metadata_json())
            heads = raw["heads"]
            self._metadata = {
                "backbone": raw["backbone"],
                "preprocessing": raw["preprocessing"],
                "input": self.input_name,
                "quantisation": raw.get("weight_precision"),
                "heads": [h["name"] for h in heads],
                "score_scale": {h["name"]: h["scale"] for h in heads},
                "dataset": {h["name"]: h["dataset"] for h in heads},
                "metrics": {h["name"]: h.get("metrics") for h in heads},
                "protocol": {h["name"]: h.get("protocol") for h in heads},
                "categories": raw["categories"],
                "context_len": raw["context_len"],
                "format_version": raw["format_version"],
                "raw": raw,
            }
        return self._metadata

    def score(self, paths: Union[PathLike, Iterable[PathLike]]) -> List[Dict[str, Any]]:
        """Scores image files with the parallel pipeline (decode on every core, batched
        inference). One dict per path, in input order: `{"path", "scores": {head: float}}` or
        `{"path", "error"}` for an image that cannot be scored. The GIL is released while it
        runs; Ctrl-C interrupts it."""
        paths = _paths(paths)
        results: List[Optional[Dict[str, Any]]] = [None] * len(paths)
        stream = self._inner.stream(paths)
        try:
            for index, item in stream:
                results[index] = item
        finally:
            stream.cancel()
        return results  # type: ignore[return-value]

    def iter_score(self, paths: Union[PathLike, Iterable[PathLike]]) -> Iterator[Dict[str, Any]]:
        """As `score`, but yields each result as soon as it is known (completion order), for
        lists too large to hold; closing the iterator stops the pipeline."""
        stream = self._inner.stream(_paths(paths))
        try:
            for _, item in stream:
                yield item
        finally:
            stream.cancel()

    def score_image(self, image: Any) -> Dict[str, float]:
        """Scores one image held in memory: a PIL image (converted with `.convert("RGB")`), a
        NumPy uint8 array [H, W, 3] (RGB), or encoded bytes (JPEG, PNG, GIF, WebP, BMP, TIFF;
        decoded exactly as files are). Raises `ImageError` for an image that cannot be used."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            scores = self._inner.score_bytes(bytes(image))
        elif hasattr(image, "convert") and hasattr(image, "mode") and hasattr(image, "size"):
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
            scores = self._rgb(rgb)
        elif isinstance(image, np.ndarray):
            scores = self._rgb(image)
        else:
            raise InputError(
                f"score_image takes a PIL image, a uint8 [H, W, 3] array or encoded bytes, "
                f"not {type(image).__name__}"
            )
        return dict(zip(self.heads, scores))

    def _rgb(self, array: np.ndarray) -> List[float]:
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise InputError(
                f"expected a uint8 [H, W, 3] RGB array, got {array.dtype} {list(array.shape)}"
            )
        h, w, _ = array.shape
        return self._inner.score_rgb(np.ascontiguousarray(array).tobytes(), w, h)

    def score_batch(self, batch: Any) -> np.ndarray:
        """Scores a batch array → float32 [N, heads]. uint8 [N, H, W, 3] RGB images of any
        size go through the shared preprocessing; float32 [N, 3, R, R] must already be the
        model's normalised `pixel_values` input."""
        array = np.asarray(batch)
        heads = len(self.heads)
        if array.dtype == np.uint8 and array.ndim == 4 and array.shape[3] == 3:
            n, h, w, _ = array.shape
            data = np.ascontiguousarray(array).tobytes()
            flat = self._inner.score_rgb_batch(data, n, w, h)
        elif array.dtype == np.float32 and array.ndim == 4 and array.shape[1] == 3:
            r = self.image_size
            if array.shape[2:] != (r, r):
                raise InputError(
                    f"float32 batches must be the model input [N, 3, {r}, {r}], "
                    f"got {list(array.shape)}"
                )
            data = np.ascontiguousarray(array).tobytes()
            flat = self._inner.score_tensor(data, "float32")
        else:
            raise InputError(
                "score_batch takes uint8 [N, H, W, 3] or float32 [N, 3, R, R], "
                f"got {array.dtype} {list(array.shape)}"
            )
        return np.asarray(flat, dtype=np.float32).reshape(-1, heads)


def load(model_path: PathLike, **options: Any) -> Scorer:
    """`agiqa.load("quality.onnx").score(...)`, as ImageReward's `load`."""
    return Scorer(model_path, **options)


def create_metric(model_path: PathLike, device: str = "auto", **options: Any) -> Scorer:
    """pyiqa-style entry point: `create_metric("quality.onnx", device="cuda")`; `device` is
    the execution provider (`cpu`, `cuda`, `tensorrt`, `auto`)."""
    return Scorer(model_path, provider=device, **options)
