"""Conversion speed and memory of preprocess_sequential.py against the decode limit.

    python benchmarks/preprocess.py [--images 3000] [--workers 2] [--rounds 2]

Builds ImageNet-like JPEGs (real photo crops, 500x375, ~90 KB; imagenet_seq.tools.sample) once under
bench_out/, then alternates, in one run on the same files in page cache:
  * single-core ``cv2.imdecode`` of every file at full size (the decode limit per core),
  * a full conversion (``--workers N``: read + validate + normalise + one writer), sampling the
    RSS of the whole process tree every 20 ms.
Reports conversion images/s as a ratio of (cores x single-core decode rate), the target being
>= 0.7, twice: by wall time, and by CPU time per image summed over the whole process tree
(contention-robust on a shared machine; fixed start-up costs measured on a tiny tree and
subtracted). Peak RSS is reported for two dataset sizes to show it does not grow with the dataset.
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

from imagenet_seq.malloc import keep_decode_buffers  # noqa: E402
from imagenet_seq.tools.sample import make_sample_imagefolder  # noqa: E402


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


def decode_rate(files):
    """(wall img/s, CPU seconds per image) of single-core full-size cv2.imdecode."""
    datas = [open(f, "rb").read() for f in files]
    cv2.setNumThreads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    for d in datas:
        cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
    return len(datas) / (time.perf_counter() - t0), (time.process_time() - c0) / len(datas)


def convert(folder: str, out: str, workers: int):
    """Run the CLI in a child; return (images/s from its JSON, CPU s per image of the whole
    process tree, peak tree RSS bytes)."""
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CLI and its reaped pool workers
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return s["images"] / s["seconds"], cpu / s["images"], peak[0]


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
    # the best single-core decode rate: the limit must not be inflated by glibc's mmap/munmap
    # of every output (the conversion's workers get the same setting)
    keep_decode_buffers()
    cores = args.workers or 1
    # fixed costs (interpreter start, imports, pool start) measured on an 8-image tree and
    # subtracted: the per-image figure is what a 1.28 M-image conversion pays
    tiny = dataset(args.out, 8)
    fixed = statistics.median(
        convert(tiny, os.path.join(args.out, "lmdb_tiny"), args.workers)[1] * 8
        for _ in range(3))
    dec, dcpu, conv, ccpu, rss = [], [], [], [], []
    for r in range(args.rounds):
        rate, cpu = decode_rate(files)
        dec.append(rate)
        dcpu.append(cpu)
        rate, cpu, peak = convert(folder, os.path.join(args.out, "lmdb_pre"), args.workers)
        conv.append(rate)
        cpu -= fixed / len(files)
        ccpu.append(cpu)
        rss.append(peak)
        print(f"round {r}: decode 1 core {dec[-1]:.0f} img/s ({dcpu[-1] * 1e6:.0f} CPU-us/img), "
              f"conversion {rate:.0f} img/s ({cpu * 1e6:.0f} CPU-us/img), "
              f"peak RSS {peak / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}")
    d, c = statistics.median(dec), statistics.median(conv)
    dc, cc = statistics.median(dcpu), statistics.median(ccpu)
    print(f"\n{'':28s}{'wall img/s':>12s}{'CPU-us/img':>12s}{'CPU-bound img/s':>17s}")
    print(f"{'single-core cv2.imdecode':28s}{d:12.0f}{dc * 1e6:12.0f}{1 / dc:17.0f}")
    print(f"{f'decode limit ({cores} cores)':28s}{d * cores:12.0f}{'':12s}{cores / dc:17.0f}")
    print(f"{'conversion, full validation':28s}{c:12.0f}{cc * 1e6:12.0f}{cores / cc:17.0f}")
    print(f"ratio to the limit (target >= 0.70): wall {c / (d * cores):.2f}, "
          f"CPU-bound {dc / cc:.2f}")
    print(f"peak RSS, whole tree       {max(rss) / 2**20:8.0f} MiB (target < 1024)")
    half = dataset(args.out, args.images // 2)
    _, _, peak_half = convert(half, os.path.join(args.out, "lmdb_pre_half"), args.workers)
    print(f"peak RSS at half the images {peak_half / 2**20:7.0f} MiB (does not grow with size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
