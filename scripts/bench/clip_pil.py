"""CLIP's reference preprocessing on a PIL image with numpy only: bicubic resize of the short
side (the long side truncated, as torchvision's Resize), centre crop, scale to [0, 1],
normalise; float32 CHW. What torchvision's transforms do on PIL images (they call PIL's
resize), for the baselines that run without torchvision."""

import numpy as np
from PIL import Image


def preprocess(image, pre):
    s = pre["image_size"]
    w, h = image.size
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    image = image.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
    x = np.asarray(image.crop((left, top, left + s, top + s)), dtype=np.float32) / 255.0
    x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return x.transpose(2, 0, 1)
