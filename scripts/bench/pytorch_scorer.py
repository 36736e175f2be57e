"""A plain PyTorch-eager CLIP-AGIQA scorer, the baseline of scripts/bench-vs-pytorch.

It runs the same model with the same weights as an exported ONNX graph: the image tower is
OpenAI's reference implementation (`clip.model.VisionTransformer` / `ModifiedResNet`) loaded with
the graph's `visual.*` initializers, and the head is the graph's folded head (the prompts'
features computed once, as a sensible eager scorer would; the reference training code recomputes
them every batch, which would only make this baseline slower). Preprocessing is PIL +
torchvision, as the reference code does, in a DataLoader with worker processes.

Prints one JSON object: model-only images/s per batch size, and end-to-end images/s.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import onnx
import torch
import torchvision.transforms as T
from clip.model import ModifiedResNet, VisionTransformer
from onnx import numpy_helper
from PIL import Image


def load(path, device):
    model = onnx.load(path)
    weights = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float32))
        for t in model.graph.initializer
    }
    meta = {p.key: p.value for p in model.metadata_props}
    heads = json.loads(meta["agiqa.heads"])
    pre = json.loads(meta["agiqa.preprocessing"])
    # Checkpoint tensors only: generated graph constants carry a "/" in their names.
    visual = {k[len("visual."):]: v for k, v in weights.items()
              if k.startswith("visual.") and "/" not in k}
    if "proj" in visual:
        width = visual["conv1.weight"].shape[0]
        patch = visual["conv1.weight"].shape[-1]
        layers = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
        grid = round(math.sqrt(visual["positional_embedding"].shape[0] - 1))
        tower = VisionTransformer(patch * grid, patch, width, layers, width // 64,
                                  visual["proj"].shape[1])
    else:
        counts = [len({k.split(".")[1] for k in visual if k.startswith(f"layer{i}.")})
                  for i in (1, 2, 3, 4)]
        width = visual["layer1.0.conv1.weight"].shape[0]
        out_dim = visual["attnpool.c_proj.weight"].shape[0]
        spacial = round(math.sqrt(visual["attnpool.positional_embedding"].shape[0] - 1))
        tower = ModifiedResNet(counts, out_dim, width * 32 // 64, spacial * 32, width)
    missing, unexpected = tower.load_state_dict(visual, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit the tower: missing {missing}, unexpected {unexpected}")
    tower.eval().to(device)
    weights = {k: v.to(device) for k, v in weights.items() if k.startswith("heads.")}
    head_fns = []
    for head in heads:
        p = f"heads.{head['name']}."
        if p + "fc1.image_weight_folded" in weights:
            a, c = weights[p + "fc1.image_weight_folded"], weights[p + "fc1.bias_folded"]
            w, b = weights[p + "fc2.weight_t"], weights[p + "fc2.bias"]
            head_fns.append(lambda x, a=a, c=c, w=w, b=b: (torch.relu(x @ a + c) @ w + b)[:, 0])
        else:
            t, s = weights[p + "text_features_scaled"], weights[p + "class_scores"]
            head_fns.append(lambda x, t=t, s=s: (torch.softmax(x @ t, -1) @ s)[:, 0])

    def forward(pixels):
        x = tower(pixels)
        x = x / x.norm(dim=-1, keepdim=True)
        return torch.stack([f(x) for f in head_fns], 1)

    transform = T.Compose([
        T.Resize(pre["image_size"], interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(pre["image_size"]),
        T.ToTensor(),
        T.Normalize(pre["mean"], pre["std"]),
    ])
    return forward, transform, pre["image_size"]


class Images(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True, help="folder of images")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--batch-size", type=int, default=16, help="end to end")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    forward, transform, size = load(args.model, device)
    report = {"torch": torch.__version__, "threads": args.threads, "device": args.device,
              "model_only": []}
    with torch.inference_mode():
        for n in [int(b) for b in args.batch_sizes.split(",")]:
            x = torch.randn(n, 3, size, size, device=device)
            forward(x)
            sync()
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds or runs < 2:
                forward(x)
                runs += 1
            sync()
            elapsed = time.perf_counter() - start
            report["model_only"].append(
                {"batch_size": n, "runs": runs, "images_per_second": n * runs / elapsed})
        paths = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                       if f.lower().endswith((".jpg", ".jpeg", ".png")))
        loader = torch.utils.data.DataLoader(
            Images(paths, transform), batch_size=args.batch_size, num_workers=args.workers)
        start, scored = time.perf_counter(), 0
        for batch in loader:
            scored += forward(batch.to(device, non_blocking=True)).cpu().shape[0]
        elapsed = time.perf_counter() - start
        report["end_to_end"] = {"images": scored, "seconds": elapsed,
                                "images_per_second": scored / elapsed,
                                "batch_size": args.batch_size, "workers": args.workers}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
