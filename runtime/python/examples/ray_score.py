"""Scoring a large image listing on a Ray cluster with Ray Data: `map_batches` with one
`agiqa.Scorer` per actor (each loads the model once, then scores its batches with the parallel
pipeline). Ray is the distributed engine; agiqa only scores.

    python ray_score.py --model quality.onnx --list images.txt --out scores/ [--actors 4]
    python ray_score.py --model quality.onnx --folder photos/ --check   # local test

`--address auto` joins a running cluster; by default a local Ray starts (2 CPUs, no dashboard).
Paths must be readable on every node (shared storage, or use ray.data.read_binary_files and
Scorer.score_image on the bytes instead).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class ScoreActor:
    """One Scorer per actor; Ray calls it on batches of paths."""

    def __init__(self, model: str, provider: str, threads: int, workers: int) -> None:
        import agiqa

        self.scorer = agiqa.Scorer(model, provider=provider, threads=threads, workers=workers)
        self.heads = self.scorer.heads

    def __call__(self, batch):
        results = self.scorer.score(list(batch["path"]))
        out = {"path": [r["path"] for r in results], "error": [r.get("error", "") for r in results]}
        for head in self.heads:
            out[head] = [r["scores"][head] if "scores" in r else float("nan") for r in results]
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--list", help="file with one image path a line")
    parser.add_argument("--folder", help="folder of images (recursive)")
    parser.add_argument("--out", help="folder for the Parquet results")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="paths per map_batches call")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--check", action="store_true", help="assert every image was scored once")
    args = parser.parse_args(argv)

    import ray

    if args.list:
        paths = [l.strip() for l in Path(args.list).read_text().splitlines() if l.strip()]
    else:
        import agiqa._agiqa as core

        paths = [str(p) for p in core.collect_inputs([args.folder])]
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    ds = ray.data.from_items([{"path": p} for p in paths])
    scored = ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs=dict(model=args.model, provider=args.provider, threads=1, workers=1),
        batch_size=args.batch_size,
        concurrency=args.actors,
        num_cpus=1,
        batch_format="numpy",
    )
    if args.out:
        scored.write_parquet(args.out)
        rows = ray.data.read_parquet(args.out).take_all()
    else:
        rows = scored.take_all()
    seconds = time.perf_counter() - start
    failed = sum(1 for r in rows if r["error"])
    print(json.dumps({"images": len(paths), "rows": len(rows), "failed": failed,
                      "seconds": round(seconds, 2)}))
    if args.check:
        got = sorted(r["path"] for r in rows)
        assert got == sorted(paths), "some images were not scored exactly once"
        assert failed == 0, f"{failed} images failed"
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
