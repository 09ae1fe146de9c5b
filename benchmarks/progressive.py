"""Loader images/s by train image size (progressive resizing: FFCV's 160-192 px recipe).

    python benchmarks/progressive.py              # 128/160/192/224 px, 3 alternating rounds
    python benchmarks/progressive.py --rounds 1

Same files as benchmarks/throughput.py (benchmarks/data.py, page cache); the default train path
(RandomResizedCrop + flip, crop-only DCT-scaled decode, torchvision's antialiased resize),
batch 64, 2 thread workers. Each size runs in its own subprocess, sizes alternate in order
across rounds; one extra run switches sizes inside one Loader with ``set_image_size`` (what
``--progressive`` does) to show the switch costs nothing. Reports images/s and CPU us/img
(medians), and each size's ratio to 224 px within the run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import data as bench_data  # noqa: E402
from peers import BATCH, WORKERS, _timed, run_result_child  # noqa: E402

SIZES = (128, 160, 192, 224)


def measure(d, size: int, warmup: int, count: int, switch: bool = False):
    from imagenet_seq.data import Loader

    loader = Loader(d.lmdb, "train", batch_size=BATCH, num_workers=WORKERS,
                    buffer_size=max(BATCH, d.images // 25), image_size=224 if switch else size)

    def batches():
        epoch = 0
        while True:
            if switch:  # progressive: a new size every epoch, in one Loader
                loader.set_image_size(SIZES[epoch % len(SIZES)])
            loader.set_epoch(epoch)
            for images, _ in loader:
                yield len(images)
            epoch += 1
    return _timed(batches(), warmup, count)


def child(args) -> None:
    d = bench_data.ensure(args.images, args.out, verbose=False)
    res = measure(d, args.size, args.warmup, args.measure, switch=args.size == 0)
    print("RESULT " + json.dumps(res), flush=True)
    os._exit(0)


def run_child(size: int, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--size", str(size), "--images",
           str(args.images), "--out", args.out, "--warmup", str(args.warmup), "--measure",
           str(args.measure)]
    return run_result_child(cmd, REPO, 600)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--out", default=bench_data.DEFAULT_OUT)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--measure", type=int, default=40)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size is not None:
        child(args)
    d = bench_data.ensure(args.images, args.out)
    bench_data.warm_page_cache(d)
    load0 = os.getloadavg()[0]
    runs = {s: [] for s in SIZES + (0,)}
    for r in range(args.rounds):
        order = list(SIZES) + [0]
        for size in (order if r % 2 == 0 else order[::-1]):
            res = run_child(size, args)
            runs[size].append(res)
            name = f"{size} px" if size else "switching"
            print(f"round {r + 1} {name:10s} " + (
                f"{res['rate']:7.0f} img/s {res['cpu_us']:6.0f} CPU us/img" if "rate" in res
                else res.get("error", "?")), flush=True)
    med = {s: {k: statistics.median(x[k] for x in v) for k in ("rate", "cpu_us")}
           for s, v in runs.items() if v and all("rate" in x for x in v)}
    print(f"\nloadavg {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{d.images} images, batch {BATCH}, {WORKERS} thread workers, {args.rounds} rounds")
    print("| train size | images/s (median) | CPU us/img | vs 224 px (wall) | vs 224 px (CPU) |")
    print("|---|---:|---:|---:|---:|")
    base = med.get(224)
    for s, m in med.items():
        name = f"{s} px" if s else "128-224 px, set_image_size per epoch"
        wall = f"{m['rate'] / base['rate']:.2f}x" if base else "-"
        cpu = f"{base['cpu_us'] / m['cpu_us']:.2f}x" if base else "-"
        print(f"| {name} | {m['rate']:.0f} | {m['cpu_us']:.0f} | {wall} | {cpu} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": {str(k): v for k, v in runs.items()},
                       "median": {str(k): v for k, v in med.items()},
                       "loadavg": [load0, os.getloadavg()[0]],
                       "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
