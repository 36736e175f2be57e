"""Prints scripts/bench-vs-pytorch's one-run table (markdown) from the engines' JSON reports.

Arguments: `NAME|REPORT.json` per engine, in row order. The first PyTorch row (if any) is the
end-to-end baseline; for int8 rows, model-only is also compared with ONNX Runtime Python's
`quantize_dynamic` graph. `--accuracy-dir` holds the exporter's `--verify` reports
(`dynamic.json`, `static.json`) whose figures fill the accuracy columns.
"""

import argparse
import json
import os


def load(path):
    r = json.load(open(path))
    r = r[0] if isinstance(r, list) else r  # agiqa bench: one report per provider
    model_only = {m["batch_size"]: m["images_per_second"] for m in r["model_only"]}
    e2e = (r.get("end_to_end") or {}).get("images_per_second")
    return r, model_only, e2e


def srcc(a, b):
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--accuracy-dir", default="")
    ap.add_argument("--torch-skipped", default="")
    ap.add_argument("rows", nargs="+")
    args = ap.parse_args()
    rows = [(name, *load(path)) for name, path in (r.split("|", 1) for r in args.rows)]
    sizes = sorted({b for _, _, m, _ in rows for b in m})
    torch_e2e = next((e for n, _, _, e in rows if n.startswith("PyTorch")), None)
    ortq = next((m for n, _, m, _ in rows if "quantize_dynamic" in n), None)
    accuracy = {}
    if args.accuracy_dir:
        for mode in ("dynamic", "static"):
            p = os.path.join(args.accuracy_dir, f"{mode}.json")
            if os.path.exists(p):
                accuracy[mode] = json.load(open(p))["quantization"]["accuracy"]
        # ONNX Runtime's own int8 against its fp32 on the same end-to-end images.
        ort = {n: r.get("end_to_end") for n, r, _, _ in rows if n.startswith("ORT Python")}
        f, q = ort.get("ORT Python fp32"), ort.get("ORT Python quantize_dynamic int8")
        if f and q and f["paths"] == q["paths"] and len(f["scores"]) > 2:
            first = lambda s: s[0] if isinstance(s, list) else s  # one head: `score` is [N]
            fs, qs = [first(s) for s in f["scores"]], [first(s) for s in q["scores"]]
            scale = json.loads(q["heads_metadata"])[0]["scale"] if q.get("heads_metadata") else None
            span = (scale["max"] - scale["min"]) if scale else 5.0
            accuracy["ort"] = {"srcc_vs_fp32": srcc(qs, fs), "feature_cosine_min": None,
                               "max_abs_delta_over_span": max(abs(a - b) for a, b in zip(qs, fs)) / span,
                               "srcc_vs_mos_change": None, "count": len(fs),
                               "images": "the end-to-end images"}

    first = rows[0][1]
    where = first.get("device") or first.get("provider") or "cpu"
    print(f"\n{args.backbone}, {where}, {os.cpu_count()} cores, one run; "
          f"end-to-end baseline: {'PyTorch eager' if torch_e2e else 'none (PyTorch skipped: ' + args.torch_skipped + ')'}\n")
    head = ["engine"] + [f"model b{b} img/s" for b in sizes] + ["e2e img/s", "e2e vs PyTorch"]
    if ortq:
        head.append("model vs ORT int8")
    if accuracy:
        head += ["SRCC vs fp32", "cos min", "max|Δ|/span", "ΔSRCC MOS"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    notes = []

    def fmt(x, spec):
        return "" if x is None else format(x, spec)
    for name, report, model_only, e2e in rows:
        cells = [name] + [fmt(model_only.get(b), ".2f") for b in sizes]
        cells += [fmt(e2e, ".2f"), f"{e2e / torch_e2e:.2f}x" if e2e and torch_e2e else ""]
        if ortq:
            mid = max(b for b in sizes if b in ortq)
            cells.append(f"{model_only[mid] / ortq[mid]:.2f}x (b{mid})"
                         if "int8" in name and "quantize_dynamic" not in name and mid in model_only else "")
        if accuracy:
            key = "dynamic" if "dynamic" in name and "agiqa" in name else \
                  "static" if "static" in name else "ort" if "quantize_dynamic" in name else None
            a = accuracy.get(key) or {}
            cells += [fmt(a.get("srcc_vs_fp32"), ".4f"), fmt(a.get("feature_cosine_min"), ".6f"),
                      fmt(a.get("max_abs_delta_over_span"), ".5f"), fmt(a.get("srcc_vs_mos_change"), ".4f")]
        print("| " + " | ".join(cells) + " |")
        if "end_to_end_skipped" in report:
            notes.append(f"{name}: end to end skipped: {report['end_to_end_skipped']}")
    for n in notes:
        print(f"\nnote: {n}", end="")
    print()
    if accuracy:
        some = next(iter(accuracy.values()))
        print(f"\naccuracy: agiqa rows on {some['count']} held-out images ({some['images']}), "
              "ORT's quantize_dynamic on the end-to-end images; budget: SRCC >= 0.99, cosine >= "
              "0.999, max|Δ|/span <= 0.01, ΔSRCC vs MOS <= 0.005")
    if torch_e2e:
        for name, _, _, e2e in rows:
            if name.startswith("agiqa") and e2e:
                target = 2.0 if "int8" in name else 1.2 if args.accuracy_dir else None
                if target:
                    verdict = "met" if e2e / torch_e2e >= target else "NOT met"
                    print(f"target {name} e2e >= {target}x PyTorch: {e2e / torch_e2e:.2f}x, {verdict}")


if __name__ == "__main__":
    main()
