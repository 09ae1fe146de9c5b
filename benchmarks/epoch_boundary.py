"""The gap between epochs: last batch of epoch e -> first batch of e + 1, vs the steady interval.

    python benchmarks/epoch_boundary.py                      # page cache, before vs after
    python benchmarks/epoch_boundary.py --slow-disk hdd      # through the emulated HDD
    python benchmarks/epoch_boundary.py --images 400 --epochs 2 --quick   # a smoke run

"Before" is ``Loader(overlap_epochs=False)`` (every epoch starts with an empty shuffle buffer
and an idle decode pool: the behaviour before issue 13); "after" is the default
(``overlap_epochs=True``: the next epoch is read, shuffled and decoded during this one's tail).
A training loop is simulated by sleeping ``--step-ms`` per batch (0: the loader is the
bottleneck). Each configuration runs in its own process; a sampler thread reads the process
tree's memory (RSS and PSS over the trainer and its workers) every 20 ms, and the peak in the
window [last batch of e - 2 steady intervals, first batch of e + 1 + 2 intervals] is reported
next to the peak of the steady part of the epochs.

Output: one JSON line per configuration and a table (median gap, gap / steady interval, peak
memory across the boundary vs steady), also written to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)


def _tree_memory() -> Dict[str, int]:
    import psutil

    me = psutil.Process()
    rss = pss = 0
    for p in [me] + me.children(recursive=True):
        try:
            full = p.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", full.rss)
        except (psutil.Error, OSError):
            pass
    return {"rss": rss, "pss": pss}


def measure(lmdb: str, overlap: bool, args) -> dict:
    """One configuration, in this process: batch times and memory samples over the epochs."""
    from imagenet_seq.data import Loader

    ld = Loader(lmdb, "train", batch_size=args.batch_size, num_workers=args.workers,
                worker_type=args.worker_type, overlap_epochs=overlap,
                buffer_size=args.buffer_size, image_size=args.image_size)
    samples: List[tuple] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), _tree_memory()))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times: List[List[float]] = []
    t_iter: List[float] = []
    try:
        for epoch in range(args.epochs):
            ld.set_epoch(epoch)
            t_iter.append(time.perf_counter())
            stamps = []
            for _ in ld:
                stamps.append(time.perf_counter())
                if args.step_ms:
                    time.sleep(args.step_ms / 1000)
            times.append(stamps)
    finally:
        stop.set()
        sampler.join()
        bound = ld.memory_bound()
        ld.close()
    steady = [b - a for st in times for a, b in zip(st[2:], st[3:])]
    interval = statistics.median(steady)
    gaps = [times[e + 1][0] - times[e][-1] for e in range(len(times) - 1)]
    near = []
    for e in range(len(times) - 1):
        lo, hi = times[e][-1] - 2 * interval, times[e + 1][0] + 2 * interval
        near += [m for t, m in samples if lo <= t <= hi]
    inside = [m for t, m in samples
              if any(st[len(st) // 4] <= t <= st[3 * len(st) // 4] for st in times)]
    peak = lambda ms, k: max((m[k] for m in ms), default=0)  # noqa: E731
    return {"overlap_epochs": overlap, "batches_per_epoch": len(times[0]),
            "steady_interval_s": interval, "gaps_s": gaps,
            "median_gap_s": statistics.median(gaps) if gaps else None,
            "gap_over_interval": statistics.median(gaps) / interval if gaps else None,
            "first_batch_after_iter_s": times[0][0] - t_iter[0],
            "peak_rss_boundary": peak(near, "rss"), "peak_pss_boundary": peak(near, "pss"),
            "peak_rss_steady": peak(inside, "rss"), "peak_pss_steady": peak(inside, "pss"),
            "memory_bound": bound}


def _child(argv: List[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("lmdb")
    p.add_argument("overlap", type=int)
    p.add_argument("cfg")
    a = p.parse_args(argv)
    args = argparse.Namespace(**json.loads(a.cfg))
    print("RESULT " + json.dumps(measure(a.lmdb, bool(a.overlap), args)), flush=True)
    return 0


def run_config(lmdb: str, overlap: bool, args) -> dict:
    cfg = json.dumps({k: v for k, v in vars(args).items() if k in (
        "batch_size", "workers", "worker_type", "buffer_size", "image_size", "epochs",
        "step_ms")})
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", lmdb,
                          str(int(overlap)), cfg], env=env, capture_output=True, text=True,
                         timeout=args.timeout)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-3000:]}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return _child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="train images (benchmarks/data.py)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-type", choices=("thread", "process"), default="thread")
    p.add_argument("--buffer-size", type=int, default=None,
                   help="shuffle buffer records (default: the Loader's, 2 GiB per machine)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated training step")
    p.add_argument("--slow-disk", choices=("hdd", "nfs"), default=None,
                   help="read through benchmarks/slowfs.py's emulated device (needs FUSE)")
    p.add_argument("--rounds", type=int, default=1, help="before/after pairs, alternating")
    p.add_argument("--quick", action="store_true", help="2 epochs, 1 round (smoke test)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--data", default=None, help="benchmark data parent folder")
    p.add_argument("--out", default=os.path.join(HERE, "results", "epoch_boundary.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.rounds = 2, 1
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (a boundary needs two epochs)")
    import data as bench_data

    kw = {"out": args.data} if args.data else {}
    d = bench_data.ensure(args.images, legacy=False, verbose=True, **kw)
    results = []

    def one_round(lmdb: str) -> None:
        for overlap in (False, True):
            r = run_config(lmdb, overlap, args)
            r.update(slow_disk=args.slow_disk, images=d.images if hasattr(d, "images") else
                     args.images, worker_type=args.worker_type, workers=args.workers,
                     step_ms=args.step_ms)
            print(json.dumps(r), flush=True)
            results.append(r)

    for _ in range(args.rounds):
        if args.slow_disk:
            import slowfs

            mnt = tempfile.mkdtemp(prefix="imagenet_seq_boundary_")
            with slowfs.mounted(d.lmdb, mnt, args.slow_disk):
                one_round(mnt)
        else:
            bench_data.warm_page_cache(d)
            one_round(d.lmdb)
    print(f"\n{'overlap':>8} {'interval ms':>12} {'gap ms':>8} {'gap/int':>8} "
          f"{'PSS boundary MB':>16} {'PSS steady MB':>14}")
    for r in results:
        print(f"{str(r['overlap_epochs']):>8} {1000 * r['steady_interval_s']:12.1f} "
              f"{1000 * r['median_gap_s']:8.1f} {r['gap_over_interval']:8.2f} "
              f"{r['peak_pss_boundary'] / 2**20:16.0f} {r['peak_pss_steady'] / 2**20:14.0f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/epoch_boundary.py " + " ".join(argv),
                   "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
