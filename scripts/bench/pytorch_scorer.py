"""A plain PyTorch-eager CLIP-AGIQA scorer, the baseline of scripts/bench-vs-pytorch.

It runs the same model with the same weights as an exported ONNX graph: CLIP's image tower
(ViT or ModifiedResNet, written here with torch.nn.functional so that only torch and numpy are
needed: no OpenAI `clip` package, no `onnx` package) fed with the graph's `visual.*`
initializers, read by onnx_weights.py, and the graph's folded head (the prompts' features
computed once, as a sensible eager scorer would; the reference training code recomputes them
every batch, which would only make this baseline slower). Attention is
`scaled_dot_product_attention`, PyTorch's fused kernel. Preprocessing is PIL + torchvision, as
the reference code does, in a DataLoader with worker processes. `--fp16` runs the tower under
CUDA autocast (fp16), as the reference does on GPUs.

Prints one JSON object: model-only images/s per batch size, and end-to-end images/s.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import onnx_weights  # noqa: E402

try:  # End to end needs PIL; torchvision is used when present, as the reference code does.
    from PIL import Image
    import clip_pil
except ImportError:
    Image = None
try:
    import torchvision.transforms as T
except ImportError:
    T = None


def layer_norm(w, x, name):
    return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], 1e-5)


def vision_transformer(w):
    """OpenAI CLIP's VisionTransformer as a function of its state dict (batch-first)."""
    width, patch = w["conv1.weight"].shape[0], w["conv1.weight"].shape[-1]
    layers = len({k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")})
    heads = width // 64

    def forward(x):
        x = F.conv2d(x, w["conv1.weight"], stride=patch)
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([w["class_embedding"].to(x.dtype).expand(b, 1, c), x], 1)
        x = layer_norm(w, x + w["positional_embedding"].to(x.dtype), "ln_pre")
        n = x.shape[1]
        for i in range(layers):
            p = f"transformer.resblocks.{i}."
            h = layer_norm(w, x, p + "ln_1")
            qkv = F.linear(h, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"])
            q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            x = x + F.linear(a, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
            h = F.linear(layer_norm(w, x, p + "ln_2"), w[p + "mlp.c_fc.weight"],
                         w[p + "mlp.c_fc.bias"])
            h = h * torch.sigmoid(1.702 * h)  # QuickGELU
            x = x + F.linear(h, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        return layer_norm(w, x[:, 0], "ln_post") @ w["proj"]

    return forward


def modified_resnet(w):
    """OpenAI CLIP's ModifiedResNet (anti-aliased strided convolutions, attention pooling)."""
    def bn(x, name):
        return F.batch_norm(x, w[name + ".running_mean"], w[name + ".running_var"],
                            w[name + ".weight"], w[name + ".bias"], False, 0.0, 1e-5)

    def conv_bn_relu(x, i):
        return F.relu(bn(F.conv2d(x, w[f"conv{i}.weight"], padding=1, stride=2 if i == 1 else 1),
                         f"bn{i}"))

    def bottleneck(x, p, stride):
        out = F.relu(bn(F.conv2d(x, w[p + "conv1.weight"]), p + "bn1"))
        out = F.relu(bn(F.conv2d(out, w[p + "conv2.weight"], padding=1), p + "bn2"))
        if stride > 1:
            out = F.avg_pool2d(out, stride)
        out = bn(F.conv2d(out, w[p + "conv3.weight"]), p + "bn3")
        if p + "downsample.0.weight" in w:
            if stride > 1:
                x = F.avg_pool2d(x, stride)
            x = bn(F.conv2d(x, w[p + "downsample.0.weight"]), p + "downsample.1")
        return F.relu(out + x)

    blocks = [sorted({int(k.split(".")[1]) for k in w if k.startswith(f"layer{i}.")})
              for i in (1, 2, 3, 4)]
    embed = w["attnpool.c_proj.weight"].shape[1]
    heads = embed // 64

    def forward(x):
        for i in (1, 2, 3):
            x = conv_bn_relu(x, i)
        x = F.avg_pool2d(x, 2)
        for layer, indices in enumerate(blocks, start=1):
            for j in indices:
                x = bottleneck(x, f"layer{layer}.{j}.", 2 if layer > 1 and j == 0 else 1)
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + w["attnpool.positional_embedding"].to(x.dtype)
        b, n, c = x.shape
        def proj(name, t):
            return F.linear(t, w[f"attnpool.{name}.weight"], w[f"attnpool.{name}.bias"])
        q = proj("q_proj", x[:, :1]).view(b, 1, heads, c // heads).transpose(1, 2)
        k = proj("k_proj", x).view(b, n, heads, c // heads).transpose(1, 2)
        v = proj("v_proj", x).view(b, n, heads, c // heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c)
        return proj("c_proj", a)

    return forward


def load(path, device):
    arrays, meta = onnx_weights.load(path)
    weights = {k: torch.from_numpy(v.astype("float32")) for k, v in arrays.items()
               if v.dtype.kind == "f"}
    heads = json.loads(meta["agiqa.heads"])
    pre = json.loads(meta["agiqa.preprocessing"])
    # Checkpoint tensors only: generated graph constants carry a "/" in their names.
    visual = {k[len("visual."):]: v.to(device) for k, v in weights.items()
              if k.startswith("visual.") and "/" not in k}
    if "conv1.weight" not in visual:
        raise SystemExit(f"{path}: no visual.* float weights (an int8 graph? give the fp32 one)")
    tower = vision_transformer(visual) if "proj" in visual else modified_resnet(visual)
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
        x = tower(pixels).float()
        x = x / x.norm(dim=-1, keepdim=True)
        return torch.stack([f(x) for f in head_fns], 1)

    return forward, Transform(pre), pre["image_size"]


class Transform:
    """Resize (bicubic, short side), centre crop, to tensor, normalise: torchvision's when it is
    installed, else the same operations on PIL directly (torchvision calls PIL's resize too)."""

    def __init__(self, pre):
        self.pre, size = pre, pre["image_size"]
        if T is not None:
            self.torchvision = T.Compose([
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size), T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
        else:
            self.torchvision = None

    def __call__(self, image):
        if self.torchvision is not None:
            return self.torchvision(image)
        return torch.from_numpy(clip_pil.preprocess(image, self.pre))


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
    ap.add_argument("--fp16", action="store_true", help="CUDA autocast fp16 (GPU only)")
    ap.add_argument("--model-only", action="store_true", help="skip the end-to-end run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.fp16 and device.type != "cuda":
        raise SystemExit("--fp16 is CUDA autocast: give --device cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    forward, transform, size = load(args.model, device)
    report = {"torch": torch.__version__, "threads": args.threads, "device": args.device,
              "precision": "fp16 autocast" if args.fp16 else "fp32", "model_only": []}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    autocast = (torch.autocast("cuda", dtype=torch.float16) if args.fp16
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
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
        if device.type == "cuda":
            report["gpu_memory_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        if args.model_only or Image is None:
            report["end_to_end_skipped"] = ("--model-only" if args.model_only
                                            else "PIL is not installed")
            print(json.dumps(report))
            return
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
