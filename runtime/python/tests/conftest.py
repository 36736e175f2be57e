"""Shared by the agiqa package's tests: fixture models (runtime/tests/fixtures, no libtorch
needed) and images generated with Pillow."""

import io
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "runtime" / "tests" / "fixtures"

# The package must find ONNX Runtime in the environment (agiqa[cpu]), not through the
# project's ORT_DYLIB_PATH; the CLI is pointed at the same library explicitly.
os.environ.pop("ORT_DYLIB_PATH", None)


def model(name: str) -> str:
    return str(FIXTURES / name)


def picture(w: int, h: int, seed: int):
    from PIL import Image

    img = Image.new("RGB", (w, h))
    img.putdata(
        [
            ((x * 255 // w + seed * 31) % 256, (y * 255 // h + seed * 17) % 256, ((x + y + seed * 13) * 7) % 256)
            for y in range(h)
            for x in range(w)
        ]
    )
    return img


def encoded(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def good_images(tmp_path_factory):
    """Twenty-four decodable images of varied sizes and formats."""
    folder = tmp_path_factory.mktemp("good")
    paths = []
    for i in range(24):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")][i % 4]
        path = folder / f"img{i:02d}.{ext}"
        path.write_bytes(encoded(picture(40 + 7 * i, 90 - 2 * i, i), fmt))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def bad_images(tmp_path_factory):
    """(path, what the error must mention) for images that cannot be scored."""
    folder = tmp_path_factory.mktemp("bad")
    jpeg = encoded(picture(64, 64, 3), "JPEG")
    png = encoded(picture(64, 64, 4), "PNG")
    cases = {
        "empty.jpg": (b"", None),
        "text.png": (b"this is not an image", "not a recognised image format"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], None),
        "truncated.png": (png[:60], None),
        # A PNG header claiming 100000 x 100000 pixels: refused before decoding.
        "bomb.png": (
            png[:16] + (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big") + png[24:],
            None,
        ),
    }
    out = []
    for name, (data, mention) in cases.items():
        path = folder / name
        path.write_bytes(data)
        out.append((str(path), mention))
    out.append((str(folder / "missing.jpg"), "cannot read"))
    return out
