"""ONNX Runtime's own Python API scoring an exported graph: a baseline of scripts/bench-vs-pytorch.

Model only: images/s per batch size on the same synthetic input as `agiqa bench`. End to end
(when PIL is installed): PIL decoding and the reference preprocessing (bicubic resize of the
short side, centre crop, normalise; what torchvision does on PIL images) in a process pool
overlapped with inference, ONNX Runtime's default threads. Prints one JSON object, with the
end-to-end scores per image so that two graphs' scores can be compared.

    python ort_python_scorer.py --model M.onnx [--images DIR] [--batch-sizes 1,8,32]
"""

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import onnx_weights  # noqa: E402

try:
    from PIL import Image
    import clip_pil
except ImportError:
    Image = None

PRE = None


def _init(pre):
    global PRE
    PRE = pre


def preprocess(path):
    with Image.open(path) as image:
        return clip_pil.preprocess(image.convert("RGB"), PRE)


def synthetic(shape, uint8):
    # The same values as `agiqa bench` feeds.
    i = np.arange(int(np.prod(shape)), dtype=np.int64)
    if uint8:
        return ((i * 7919) % 251).astype(np.uint8).reshape(shape)
    return (((i * 7919) % 997).astype(np.float32) / np.float32(498.5) - np.float32(1.0)).reshape(shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", help="folder of images (end to end)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--batch-size", type=int, default=16, help="end to end")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    uint8 = inp.type == "tensor(uint8)"
    report = {"onnxruntime": ort.__version__, "model": args.model, "model_only": []}
    for n in [int(b) for b in args.batch_sizes.split(",")]:
        feed = {inp.name: synthetic([n] + list(inp.shape[1:]), uint8)}
        session.run(None, feed)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds or runs < 2:
            session.run(None, feed)
            runs += 1
        elapsed = time.perf_counter() - start
        report["model_only"].append(
            {"batch_size": n, "runs": runs, "images_per_second": n * runs / elapsed})
    if not args.images:
        report["end_to_end_skipped"] = "no --images"
    elif Image is None:
        report["end_to_end_skipped"] = "PIL is not installed"
    elif uint8:
        report["end_to_end_skipped"] = "uint8-input graph (this baseline feeds float pixels)"
    else:
        _, meta = onnx_weights.load(args.model)
        pre = json.loads(meta["agiqa.preprocessing"])
        paths = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                       if f.lower().endswith((".jpg", ".jpeg", ".png")))
        scores, batch = [], []
        start = time.perf_counter()
        with Pool(args.workers, initializer=_init, initargs=(pre,)) as pool:
            for x in pool.imap(preprocess, paths, chunksize=4):
                batch.append(x)
                if len(batch) == args.batch_size:
                    scores.extend(session.run(None, {inp.name: np.stack(batch)})[0].tolist())
                    batch = []
            if batch:
                scores.extend(session.run(None, {inp.name: np.stack(batch)})[0].tolist())
        elapsed = time.perf_counter() - start
        report["end_to_end"] = {"images": len(scores), "seconds": elapsed,
                                "images_per_second": len(scores) / elapsed,
                                "batch_size": args.batch_size, "workers": args.workers,
                                "heads_metadata": meta.get("agiqa.heads"),
                                "paths": [os.path.basename(p) for p in paths], "scores": scores}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
