"""Command line, bookkeeping and the report of benchmarks/fidelity.py (see its docstring)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import fidelity
import fidelity_data
from fidelity import CONFIGS, DEFAULT_OUT, RESULTS


def _t975(df: int) -> float:
    from scipy.stats import t  # scipy ships with scikit-learn, which the data needs

    return float(t.ppf(0.975, df))


def interval(values: List[float]) -> Dict[str, float]:
    """Mean, standard deviation and the 95 % confidence interval of the mean (t distribution)."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else float("nan")
    half = _t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def summarise(runs: Dict[str, Dict[str, dict]], seeds: List[int]) -> dict:
    """Per config: accuracy on both val pipelines, paired gap to torchvision, pipeline gap."""
    out = {}
    ref = runs.get("torchvision", {})
    for config, by_seed in runs.items():
        done = [s for s in seeds if str(s) in by_seed]
        if not done:
            continue
        rows = [by_seed[str(s)] for s in done]
        entry = {"seeds": done,
                 "tv_val": interval([r["tv_val"] for r in rows]),
                 "ours_val": interval([r["ours_val"] for r in rows]),
                 "val_gap": interval([r["tv_val"] - r["ours_val"] for r in rows]),
                 "agree": statistics.fmean(r["agree"] for r in rows)}
        paired = [s for s in done if str(s) in ref]
        if config != "torchvision" and len(paired) > 0:
            entry["paired_gap"] = interval([by_seed[str(s)]["tv_val"] - ref[str(s)]["tv_val"]
                                            for s in paired])
            entry["paired_gap_ours_val"] = interval(
                [by_seed[str(s)]["ours_val"] - ref[str(s)]["ours_val"] for s in paired])
        out[config] = entry
    return out


def _fmt(iv: dict, sign: bool = False) -> str:
    if iv["n"] < 2:
        return f"{iv['mean']:+.2f}" if sign else f"{iv['mean']:.2f}"
    f = "+.2f" if sign else ".2f"
    return f"{iv['mean']:{f}} [{iv['lo']:{f}}, {iv['hi']:{f}}]"


def report(summary: dict, meta: dict) -> str:
    lines = [
        "# Accuracy parity (issue 11)", "",
        f"`{meta['command']}` at commit {meta['commit']}; {meta['train']} train / {meta['val']} "
        f"val images (benchmarks/fidelity_data.py), {meta['epochs']} epochs, batch 64, "
        f"{meta['host']}. Top-1 in %, mean [95 % CI] over seeds.", "",
        "| trained through | seeds | top-1, torchvision val | top-1, Loader val | "
        "val pipelines (tv - Loader), same weights | predictions agreeing | "
        "paired gap to torchvision-trained, tv val | paired gap, Loader val |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for config in CONFIGS:
        e = summary.get(config)
        if e is None:
            continue
        gap = _fmt(e["paired_gap"], True) if "paired_gap" in e else "(reference)"
        gap2 = _fmt(e["paired_gap_ours_val"], True) if "paired_gap_ours_val" in e else ""
        lines.append(f"| {config} | {len(e['seeds'])} | {_fmt(e['tv_val'])} | "
                     f"{_fmt(e['ours_val'])} | {_fmt(e['val_gap'], True)} | "
                     f"{e['agree']:.1f} | {gap} | {gap2} |")
    lines += ["", "Targets: paired gap between loaders within ±0.5 points, val pipelines within "
              "±0.3 points on the same weights; the class-order ablation must lose accuracy.", ""]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=fidelity.REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS))
    ap.add_argument("--renders", type=int, default=2, help="renders of each digit")
    ap.add_argument("--limit", type=int, default=0, help="use only N digits (smoke runs)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="data folder")
    ap.add_argument("--results", default=os.path.join(RESULTS, "fidelity"),
                    help="results path without extension (.json, .md)")
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier run")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"--configs {','.join(bad)}: expected some of {','.join(CONFIGS)}")
    import torch

    torch.set_num_threads(2)
    paths = fidelity_data.build(args.out, args.renders, 0, args.limit)
    print(f"data: {paths['train']} train / {paths['val']} val images in {args.out}", flush=True)
    jpath = args.results + ".json"
    state = {"runs": {}}
    if os.path.exists(jpath) and not args.fresh:
        with open(jpath) as f:
            state = json.load(f)
        if state.get("epochs") != args.epochs or state.get("data") != [paths["train"],
                                                                       paths["val"]]:
            state = {"runs": {}}  # other settings: nothing to reuse
    state.update(epochs=args.epochs, data=[paths["train"], paths["val"]])
    seeds = list(range(args.seeds))
    os.makedirs(os.path.dirname(jpath) or ".", exist_ok=True)
    for seed in seeds:  # seed-major: an interrupted run still has complete pairs
        for config in configs:
            runs = state["runs"].setdefault(config, {})
            if str(seed) in runs:
                continue
            res = fidelity.run_one(config, paths, seed, args.epochs, args.out)
            runs[str(seed)] = res
            print(f"seed {seed} {config:17s} tv_val {res['tv_val']:.2f}  ours_val "
                  f"{res['ours_val']:.2f}  agree {res['agree']:.1f}  ({res['seconds']} s)",
                  flush=True)
            with open(jpath + ".tmp", "w") as f:
                json.dump(state, f, indent=1)
            os.replace(jpath + ".tmp", jpath)
    # every config measured so far, each over the seeds it has (a run that adds seeds to some
    # configs keeps the others' results in the report)
    all_seeds = sorted({int(k) for r in state["runs"].values() for k in r})
    summary = summarise(state["runs"], all_seeds)
    meta = {"command": " ".join(["python benchmarks/fidelity.py"] + (argv or sys.argv[1:])),
            "commit": _commit(), "train": paths["train"], "val": paths["val"],
            "epochs": args.epochs, "host": f"{os.cpu_count()} CPUs, {platform.python_version()},"
                                           f" torch {torch.__version__}",
            "finished": time.strftime("%Y-%m-%d %H:%M")}
    state["summary"], state["meta"] = summary, meta
    with open(jpath, "w") as f:
        json.dump(state, f, indent=1)
    text = report(summary, meta)
    with open(args.results + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0
