#!/usr/bin/env python3
"""The Python half of scripts/reproduce-paper: one run's metrics line, and the paper's tables
(ours beside the paper's numbers) rendered from the finished runs.

Usage (called by scripts/reproduce-paper):
    reproduce_paper.py metrics <summary.json>
    reproduce_paper.py render <tables.tsv> <out> [--quiet]   (settings come from RP_* variables)
"""
import sys


def metrics(argv):
    import json, sys
    s = json.load(open(argv[0]))
    (p, _), (sr, _), (k, _), _ = s["mean_std"]
    f = lambda v: "nan" if v is None else f"{v:.4f}"
    first = s["splits"][0]
    if s["variant"] == "zero-shot":
        extra = "nothing trained"
    elif len(s["splits"]) == 1:
        extra = f"best epoch {first['best_epoch']}, chosen on {first['selected_on']}"
    else:
        extra = f"mean of {len(s['splits'])} splits"
    print(f"PLCC {f(p)}  SRCC {f(sr)}  KRCC {f(k)}  (test n={first['test']['n']}, {extra})")


def render(argv):
    import csv, json, math, os, sys
    from datetime import datetime, timezone

    tables_tsv, out = argv[0], argv[1]
    quiet = "--quiet" in argv[2:]
    env = os.environ
    smoke = env["RP_SMOKE"] == "1"
    protocol = env["RP_PROTOCOL"]
    runs_dir = os.path.join(out, "runs")

    with open(tables_tsv) as f:
        rows = list(csv.DictReader((l for l in f if not l.startswith("#")), delimiter="\t"))
    plan = {}
    with open(os.path.join(out, "plan.tsv")) as f:
        for line in f:
            run, state, detail = line.rstrip("\n").split("\t", 2)
            plan[run] = (state, detail)

    def num(s):
        return None if s == "-" else float(s)

    def ours(run):
        """Our result for `run`: (status, metrics or None, detail)."""
        state, detail = plan.get(run, ("unselected", "not selected"))
        if state != "run":
            return ("not run", None, detail)
        d = os.path.join(runs_dir, run)
        summary = os.path.join(d, "summary.json")
        if os.path.exists(summary):
            with open(summary) as f:
                s = json.load(f)
            keys = ["plcc", "srcc", "krcc", "plcc_logistic"]
            m = {k: s["mean_std"][i][0] for i, k in enumerate(keys)}
            m["std"] = {k: s["mean_std"][i][1] for i, k in enumerate(keys)}
            m["splits"] = len(s["splits"])
            m["test_n"] = s["splits"][0]["test"]["n"]
            m["best_epoch"] = [x["best_epoch"] for x in s["splits"]]
            m["selected_on"] = sorted({x["selected_on"] for x in s["splits"]})
            m["protocol"] = sorted({x["protocol"] for x in s["splits"]})
            m["clip"] = s["clip"]
            m["variant"] = s["variant"]
            m["run_dir"] = d
            return ("done", m, detail)
        failed = os.path.join(d, "reproduce-failed")
        if os.path.exists(failed):
            with open(failed) as f:
                return ("failed", None, f.read().strip())
        return ("not finished", None, f"no {summary} yet")

    # Rows of the paper's tables: one per (table, no, method, setting), cells per dimension.
    tables = {}
    for r in rows:
        t = tables.setdefault(r["table"], {})
        key = (r["no"], r["method"], r["setting"])
        row = t.setdefault(key, {"no": r["no"], "method": r["method"], "setting": r["setting"], "cells": {}})
        paper = None if r["plcc"] == "-" else {k: num(r[k]) for k in ("plcc", "srcc", "krcc")}
        cell = {"paper": paper, "note": r["note"] or None}
        if r["run"] == "-":
            cell.update(status="paper only", ours=None, run=None)
        else:
            status, m, detail = ours(r["run"])
            cell.update(status=status, ours=m, run=r["run"], detail=detail)
        row["cells"][r["dimension"]] = cell

    TITLES = {
        "table1": "Table 1: AGIQA-3K (perceptual quality)",
        "table2": "Table 2: AIGCIQA2023",
        "table3": "Table 3: ablations on AGIQA-3K (perceptual quality)",
        "extra": "Beyond the paper: AIGCIQA2023 correspondence (the paper reports no number)",
    }
    DIMS = {"table1": ["quality"], "table2": ["quality", "authenticity"], "table3": ["quality"],
            "extra": ["correspondence"]}

    if protocol == "paper":
        protocol_text = ("paper: the authors' reference split (full datasets: AGIQA-3K 2385/597, "
                         "AIGCIQA2023 1920/480 train/test), no validation set, the best epoch chosen on "
                         "the TEST set as the paper's code does: OPTIMISTIC (model selection sees the "
                         "test set)")
    else:
        reps = env["RP_REPEATS"] or "1"
        protocol_text = (f"random: seeded 70/10/20 train/val/test split, checkpoint chosen on validation "
                         f"(honest), {reps} split(s), mean ± std; not the paper's protocol")
    labels = sorted({l for t in tables.values() for row in t.values() for c in row["cells"].values()
                     if c.get("ours") for l in c["ours"]["protocol"]})

    def fmt(v):
        return "    nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:7.4f}"

    def triple(m):
        return "  ".join(fmt(m[k]) for k in ("plcc", "srcc", "krcc"))

    W = 25  # width of " 0.0000   0.0000   0.0000"
    METRICS = "  ".join(f"{h:>7}" for h in ("PLCC", "SRCC", "KRCC"))

    def ours_text(cell, width):
        if cell["status"] == "done":
            return triple(cell["ours"])
        if cell["status"] == "paper only":
            return "paper only".ljust(width)
        text = cell["status"] + (": " + cell["detail"] if cell["status"] != "not finished" else "")
        return text

    lines = []
    P = lines.append
    P("CLIP-AGIQA (Tang et al.): the paper's Tables 1-3 beside this implementation's numbers")
    if smoke:
        P("SMOKE RUN: synthetic datasets, a tiny CLIP with RANDOM weights (other random tiny CLIPs "
          f"stand in for ViT-B/32 and ResNet-101), {env['RP_EPOCHS']} epoch(s): the numbers check the "
          "pipeline, not the paper")
    P(f"CLIP: {env['RP_CLIP']}; epochs: {env['RP_EPOCHS']}")
    P(f"protocol of our numbers: {protocol_text}")
    for l in labels:
        P(f"  trainer's label: {l}")
    P("")
    footnotes = []

    def note_mark(cell):
        n = []
        if cell.get("note"):
            footnotes.append(cell["note"])
            n.append(f"({len(footnotes)})")
        return " ".join(n)

    # A table is shown when --only selected at least one of its runs.
    shown = [tid for tid in ("table1", "table2", "table3", "extra") if tid in tables and any(
        plan.get(c["run"], ("unselected",))[0] != "unselected"
        for row in tables[tid].values() for c in row["cells"].values() if c["run"])]

    for tid in shown:
        t = tables[tid]
        dims = DIMS[tid]
        P(TITLES[tid])
        if tid == "table3":
            lead = f"{'No.':<4}{'Ablation':<21}{'Setting':<30}"
        else:
            lead = f"{'Methods':<18}"
        pad = " " * len(lead)
        if len(dims) > 1:
            P(pad + "".join(f"| {d.capitalize():^{2 * W + 3}} " for d in dims).rstrip())
        P(pad + "".join(f"| {'paper':^{W}} | {'ours':^{W}} " for _ in dims).rstrip())
        P(lead + "".join(f"| {METRICS} | {METRICS} " for _ in dims).rstrip())
        for row in t.values():
            if tid == "table3":
                head = f"{row['no']:<4}{row['method']:<21}{row['setting']:<30}"
            else:
                head = f"{row['method']:<18}"
            cells, marks = [], []
            for d in dims:
                c = row["cells"].get(d)
                paper = triple(c["paper"]) if c and c["paper"] else "not reported".center(W)
                o = ours_text(c, W) if c else "".ljust(W)
                cells.append(f"| {paper} | {o:<{W}} ")
                if c:
                    m = note_mark(c)
                    if m:
                        marks.append(m)
            P((head + "".join(cells)).rstrip() + ("  " + " ".join(marks) if marks else ""))
        P("")
    if footnotes:
        P("Notes:")
        for i, n in enumerate(footnotes, 1):
            P(f"  ({i}) {n}")
        P("")
    text = "\n".join(lines)

    # Markdown: the same tables, with ± std and the run folders.
    md = ["# CLIP-AGIQA: the paper's tables beside ours", ""]
    if smoke:
        md += ["**Smoke run**: synthetic datasets, tiny CLIP with random weights; the numbers check "
               "the pipeline, not the paper.", ""]
    md += [f"- CLIP: {env['RP_CLIP']}; epochs: {env['RP_EPOCHS']}",
           f"- Protocol of our numbers: {protocol_text}"]
    md += [f"  - trainer's label: {l}" for l in labels]
    md.append("")

    def md_ours(c):
        if c["status"] != "done":
            return [c["status"] + ("" if c["status"] in ("paper only", "not finished") else f": {c['detail']}")] + [""] * 2
        m = c["ours"]
        if m["splits"] > 1:
            return [f"{fmt(m[k]).strip()} ± {m['std'][k]:.4f}" for k in ("plcc", "srcc", "krcc")]
        return [fmt(m[k]).strip() for k in ("plcc", "srcc", "krcc")]

    for tid in shown:
        t = tables[tid]
        dims = DIMS[tid]
        md += [f"## {TITLES[tid]}", ""]
        lead = ["No.", "Ablation", "Setting"] if tid == "table3" else ["Methods"]
        hdr = list(lead)
        for d in dims:
            pre = f"{d} " if len(dims) > 1 else ""
            hdr += [f"{pre}paper {k}" for k in ("PLCC", "SRCC", "KRCC")]
            hdr += [f"{pre}ours {k}" for k in ("PLCC", "SRCC", "KRCC")]
        md += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for row in t.values():
            cells = [row["no"], row["method"], row["setting"]] if tid == "table3" else [row["method"]]
            for d in dims:
                c = row["cells"].get(d)
                cells += ([fmt(c["paper"][k]).strip() for k in ("plcc", "srcc", "krcc")] if c and c["paper"]
                          else ["—"] * 3)
                cells += md_ours(c) if c else [""] * 3
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    if footnotes:
        md += ["Notes:", ""] + [f"{i}. {n}" for i, n in enumerate(footnotes, 1)] + [""]
    md += ["Runs:", ""]
    for run, (state, detail) in plan.items():
        status, m, d = ours(run) if state == "run" else ("not run", None, detail)
        where = f" — `{m['run_dir']}`" if m else ""
        md.append(f"- `{run}`: {status}{where}" + ("" if m or status == "not finished" else f" ({d})"))
    md.append("")

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    result = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": smoke,
        "clip": env["RP_CLIP"], "clip_vit_b32": env["RP_CLIP_B32"] or None,
        "clip_rn101": env["RP_CLIP_RN101"] or None,
        "datasets": {"agiqa3k": env["RP_AGIQA3K"] or None, "aigciqa2023": env["RP_AIGCIQA2023"] or None},
        "epochs": int(env["RP_EPOCHS"]),
        "protocol": {"name": protocol, "description": protocol_text, "trainer_labels": labels},
        "tables": [{"id": tid, "title": TITLES[tid], "rows": list(tables[tid].values())}
                   for tid in shown],
        "runs": {run: {"state": s, "detail": d} for run, (s, d) in plan.items()},
    }

    def write(name, data):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(data)
        os.replace(path + ".tmp", path)

    write("results.json", json.dumps(clean(result), indent=2) + "\n")
    write("results.md", "\n".join(md))
    write("results.txt", text + "\n")
    if not quiet:
        print(text)
        print(f"written: {out}/results.json, results.md, results.txt")


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    {"metrics": metrics, "render": render}[command](rest)
