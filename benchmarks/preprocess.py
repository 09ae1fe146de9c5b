"""Conversion speed and memory of preprocess_sequential.py against the decode limit.

    python benchmarks/preprocess.py [--images 3000] [--workers 2] [--rounds 2]

Builds ImageNet-like JPEGs (real photo crops, 500x375, ~90 KB; imagenet_seq.sample) once under
bench_out/, then alternates, in one run on the same files in page cache:
  * single-core ``cv2.imdecode`` of every file at full size (the decode limit per core),
  * a full conversion (``--workers N``: read + validate + normalise + one writer), sampling the
    RSS of the whole process tree every 20 ms.
Reports conversion images/s as a ratio of (cores x single-core decode rate); the target is
>= 0.7. Peak RSS is reported for two dataset sizes to show it does not grow with the dataset.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from imagenet_seq.sample import make_sample_imagefolder  # noqa: E402


def dataset(root: str, images: int) -> str:
    per_class = max(1, images // 8)
    path = os.path.join(root, f"folder_{per_class * 8}")
    if not os.path.isdir(os.path.join(path, "train")):
        make_sample_imagefolder(path + ".tmp", train_per_class=per_class, val_per_class=1, seed=3)
        os.replace(path + ".tmp", path)
    return path


def files_of(folder: str):
    out = []
    for d, _, fs in os.walk(os.path.join(folder, "train")):
        out += [os.path.join(d, f) for f in fs]
    return sorted(out)


def decode_rate(files) -> float:
    datas = [open(f, "rb").read() for f in files]
    t0 = time.perf_counter()
    for d in datas:
        cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
    return len(datas) / (time.perf_counter() - t0)


def convert(folder: str, out: str, workers: int):
    """Run the CLI in a child; return (images/s from its JSON, peak tree RSS bytes)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(os.path.dirname(HERE), "preprocess_sequential.py"),
           folder, out, "--splits", "train", "--workers", str(workers), "--json",
           "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        proc = psutil.Process(p.pid)
        while not done.is_set():
            try:
                tree = [proc] + proc.children(recursive=True)
                peak[0] = max(peak[0], sum(c.memory_info().rss for c in tree))
            except psutil.Error:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_text, _ = p.communicate()
    done.set()
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"conversion failed ({p.returncode})")
    import json

    s = json.loads(out_text)["train"]
    return s["images"] / s["seconds"], peak[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "bench_out"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    folder = dataset(args.out, args.images)
    files = files_of(folder)
    mb = sum(os.path.getsize(f) for f in files) / len(files) / 1e3
    print(f"{len(files)} ImageNet-like JPEGs, mean {mb:.0f} KB, {args.workers} workers, "
          f"{os.cpu_count()} cores")
    dec, conv, rss = [], [], []
    for r in range(args.rounds):
        dec.append(decode_rate(files))
        rate, peak = convert(folder, os.path.join(args.out, "lmdb_pre"), args.workers)
        conv.append(rate)
        rss.append(peak)
        print(f"round {r}: decode 1 core {dec[-1]:.0f} img/s, conversion {rate:.0f} img/s, "
              f"peak RSS {peak / 2**20:.0f} MiB")
    d, c = statistics.median(dec), statistics.median(conv)
    limit = d * args.workers
    print(f"\nsingle-core cv2.imdecode   {d:8.0f} img/s")
    print(f"{args.workers} x decode limit         {limit:8.0f} img/s")
    print(f"conversion (full validate) {c:8.0f} img/s  = {c / limit:.2f} x limit (target >= 0.70)")
    print(f"peak RSS, whole tree       {max(rss) / 2**20:8.0f} MiB (target < 1024)")
    half = dataset(args.out, args.images // 2)
    _, peak_half = convert(half, os.path.join(args.out, "lmdb_pre_half"), args.workers)
    print(f"peak RSS at half the images {peak_half / 2**20:7.0f} MiB (does not grow with size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
