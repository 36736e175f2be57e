#!/usr/bin/env python3
"""The baseline of `cargo bench -p agiqa-benches --bench preprocess`: what users run to
preprocess an image for CLIP, PIL decoding plus torchvision's transforms, on one core.

  pil_preprocess.py make DIR              write the image sets (JPEG 4:2:0 and 4:4:4 at
                                          512x384 and 1024x1024, PNG 512x384) under DIR
  pil_preprocess.py time DIR --size 224   time each set on one thread, print JSON, and
                                          write each image's 224x224 RGB crop as DIR/<set>/
                                          <name>.rgb for the pixel comparison

Bytes are read into memory first (as the Rust side does), so neither side times the disk;
both sides count the thread's CPU time, so the figures are per core even on a busy machine.
"""

import argparse
import io
import json
import os
import sys
import time

SETS = [
    # name, (width, height), format, PIL save options
    ("jpeg_512x384_420", (512, 384), "JPEG", {"quality": 90, "subsampling": 2}),
    ("jpeg_512x384_444", (512, 384), "JPEG", {"quality": 90, "subsampling": 0}),
    ("jpeg_1024x1024_420", (1024, 1024), "JPEG", {"quality": 90, "subsampling": 2}),
    ("jpeg_1024x1024_444", (1024, 1024), "JPEG", {"quality": 90, "subsampling": 0}),
    ("png_512x384", (512, 384), "PNG", {}),
]


def photo_like(width, height, seed):
    """Smooth gradients, shapes and a little noise: compresses like a picture, not like noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.02), rng.uniform(0.002, 0.02), rng.uniform(0, 6.3)
        image[..., c] = 128 + 90 * np.sin(fx * x + fy * y + phase)
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.25) * min(width, height)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        image[mask] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make(root, per_set):
    from PIL import Image

    for index, (name, (width, height), fmt, options) in enumerate(SETS):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_set):
            pixels = photo_like(width, height, seed=1000 * index + i)
            extension = "jpg" if fmt == "JPEG" else "png"
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.{extension}"), fmt, **options)


def time_sets(root, size, seconds):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms

    # One core: the figure is per core, as the Rust side measures it.
    torch.set_num_threads(1)
    resize_crop = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
        ]
    )
    to_tensor = transforms.Compose(
        [
            transforms.ToTensor(),
            transforms.Normalize(
                (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
            ),
        ]
    )

    def preprocess(data):
        return to_tensor(resize_crop(Image.open(io.BytesIO(data)).convert("RGB")))

    report = {}
    for name, *_ in SETS:
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if not f.endswith(".rgb"))
        blobs = [open(os.path.join(folder, f), "rb").read() for f in files]
        for f, data in zip(files, blobs):
            crop = resize_crop(Image.open(io.BytesIO(data)).convert("RGB"))
            np.asarray(crop, dtype=np.uint8).tofile(os.path.join(folder, f + ".rgb"))
        for data in blobs[:2]:
            preprocess(data)
        # CPU time of this thread: per core, and not inflated when other work shares the cores.
        count, start = 0, time.thread_time()
        while True:
            for data in blobs:
                preprocess(data)
                count += 1
            if time.thread_time() - start >= seconds:
                break
        elapsed = time.thread_time() - start
        report[name] = {"images": count, "cpu_seconds": elapsed, "images_per_second": count / elapsed}
    import PIL
    import torchvision

    report["versions"] = {
        "pillow": PIL.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make_parser = sub.add_parser("make")
    make_parser.add_argument("dir")
    make_parser.add_argument("--per-set", type=int, default=12)
    time_parser = sub.add_parser("time")
    time_parser.add_argument("dir")
    time_parser.add_argument("--size", type=int, default=224)
    time_parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    if args.command == "make":
        make(args.dir, args.per_set)
    else:
        json.dump(time_sets(args.dir, args.size, args.seconds), sys.stdout)
        print()


if __name__ == "__main__":
    main()
