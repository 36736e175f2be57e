"""`python -m agiqa score …`: the `agiqa score` command from Python, through the same library
call (`score_files`): same inputs (files, folders, globs, --list), same result lines, --resume."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import _agiqa, _ort
from ._agiqa import AgiqaError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agiqa")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser(
        "score",
        help="score image files, folders (recursively), glob patterns or list files; one "
        "result line per image, flushed as it arrives; exits non-zero if any image failed",
    )
    score.add_argument("inputs", nargs="*", help="image files, folders, or quoted glob patterns")
    score.add_argument("-m", "--model", required=True, help="exported model (.onnx)")
    score.add_argument(
        "--provider",
        default=os.environ.get("AGIQA_PROVIDER", "auto"),
        help="cpu, cuda, tensorrt, or auto (TensorRT, then CUDA, then CPU)",
    )
    score.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    score.add_argument("--batch-size", type=int, default=16, help="most images per batch")
    score.add_argument("--device-id", type=int, default=0, help="GPU ordinal")
    score.add_argument("--list", action="append", default=[], help="file listing one path a line")
    score.add_argument("-o", "--out", default=None, help="result file (default: stdout)")
    score.add_argument("--format", choices=["jsonl", "csv"], default=None)
    score.add_argument("--resume", action="store_true", help="skip images already in --out")
    score.add_argument("--workers", type=int, default=None, help="decode threads")
    score.add_argument("--quiet", action="store_true", help="accepted for CLI compatibility")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.resume and not args.out:
        print("error: --resume needs --out", file=sys.stderr)
        return 2
    fmt = args.format or ("csv" if (args.out or "").lower().endswith(".csv") else "jsonl")
    try:
        paths = _agiqa.collect_inputs(args.inputs, args.list)
        if not paths:
            print("error: no images given (files, folders, globs or --list)", file=sys.stderr)
            return 2
        library = _ort.find_library()
        if args.provider.lower() != "cpu":
            _ort.preload_gpu_libraries()
        sys.stdout.flush()
        summary = _agiqa.score_files(
            args.model,
            paths,
            out=args.out,
            format=fmt,
            resume=args.resume,
            workers=args.workers,
            ort_lib=library,
            provider=args.provider,
            threads=args.threads,
            batch_size=args.batch_size,
            device_id=args.device_id,
        )
    except AgiqaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"scored {summary['scored']} of {summary['images']} images in "
        f"{summary['seconds']:.1f} s ({summary['images_per_second']:.1f} images/s, "
        f"{summary['batches']} batches)",
        file=sys.stderr,
    )
    if summary["failed"]:
        print(
            f"error: {summary['failed']} of {summary['images']} images failed; "
            "their reasons are in the results",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
