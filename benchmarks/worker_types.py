"""Thread vs process decode workers of the Loader, measured in one run on the same file.

Reports images/s and CPU time per image (all processes: parent + reaped workers), median of
alternating repetitions; optionally with a simulated training step that holds the GIL.

    python benchmarks/worker_types.py /tmp/lmdb --workers 2 --batch-size 64 --reps 4
    python benchmarks/worker_types.py --make-sample /tmp/ws   # builds 1000 train images first
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagenet_seq.data import Loader  # noqa: E402


def _cpu() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:  # pure Python: holds the GIL like a training step's glue
        pass


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lmdb", nargs="?")
    p.add_argument("--make-sample", metavar="DIR", help="build a 10-class x 100 sample first")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 40.0],
                   help="simulated GIL-holding training step per batch")
    args = p.parse_args(argv)
    root = args.lmdb
    if args.make_sample:
        from imagenet_seq.convert.cli import main as preprocess
        from imagenet_seq.tools.sample import make_sample_imagefolder

        make_sample_imagefolder(os.path.join(args.make_sample, "img"), 100, 10,
                                num_classes=10, seed=2, repeat_photos=True)
        root = os.path.join(args.make_sample, "lmdb")
        preprocess([os.path.join(args.make_sample, "img"), root, "--no-progress"])
    if not root:
        p.error("give an LMDB folder or --make-sample DIR")
    results = {}
    for rep in range(args.reps):
        for step in args.step_ms:
            for wt in ("process", "thread"):
                ld = Loader(root, args.split, batch_size=args.batch_size,
                            num_workers=args.workers, worker_type=wt)
                c, t, n = _cpu(), time.perf_counter(), 0
                for _, y in ld:
                    n += len(y)
                    _busy(step)
                dt, dc = time.perf_counter() - t, _cpu() - c
                results.setdefault((step, wt), []).append((n / dt, (dc - step / 1000 * len(ld))
                                                           / n * 1000))
                print(f"rep {rep} step {step:4.0f} ms {wt:8s} {n / dt:7.0f} img/s "
                      f"{results[(step, wt)][-1][1]:.2f} loader CPU-ms/img", flush=True)
    print(f"\nmedians ({args.reps} reps, {args.workers} workers, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}):")
    print("step ms  type      img/s  loader CPU-ms/img")
    for (step, wt), v in sorted(results.items()):
        print(f"{step:7.0f}  {wt:8s} {np.median([a for a, _ in v]):6.0f}  "
              f"{np.median([b for _, b in v]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
