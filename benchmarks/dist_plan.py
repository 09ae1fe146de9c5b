"""The serial step of a distributed conversion: rank 0 merging every run's keys file to find
where each shard's merge starts (``dist_plan.cut_points``), on synthetic keys files.

    python benchmarks/dist_plan.py [--images 1000000] [--runs 100] [--shards 64]

Keys as a train split's (8-byte hash + a path of ImageNet's length), spread over ``--runs``
sorted runs; reported: seconds, images/s, the keys files' bytes per image. The rest of the job
waits at a barrier meanwhile: at ImageNet-21k's 14 M images this is the figure times 14.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from imagenet_seq import format as fmt  # noqa: E402
from imagenet_seq.convert.dist_plan import cut_points  # noqa: E402
from imagenet_seq.convert.settle import decider  # noqa: E402
from imagenet_seq.convert.sort_runs import HEAD, NO_ORIGIN  # noqa: E402
from imagenet_seq.convert.write_order import sort_key  # noqa: E402
from imagenet_seq.format import manifest as mf  # noqa: E402


def make_keys(folder: str, images: int, runs: int) -> list:
    rng = random.Random(0)
    per = [[] for _ in range(runs)]
    for i in range(images):
        rel = f"n{rng.randrange(10**8):08d}/n{rng.randrange(10**8):08d}_{i}.JPEG"
        per[rng.randrange(runs)].append((sort_key(rel, "train", 0), i))
    paths = []
    for k, items in enumerate(per):
        items.sort()
        path = os.path.join(folder, f"run-{k:05d}.keys")
        with open(path, "wb") as f:
            for key, seq in items:
                f.write(HEAD.pack(seq, NO_ORIGIN, len(key), 110_000) + key
                        + fmt.RECORD_HEADER.pack(seq % 1000))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--shards", type=int, default=64)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        paths = make_keys(d, args.images, args.runs)
        size = sum(os.path.getsize(x) for x in paths)
        starts = [first for first, _ in mf.shard_ranges(args.images, args.shards)]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        decide = decider([str(c) for c in range(1000)], {}, {})  # a folder's: no copies
        cuts = cut_points(paths, starts, decide)
        dt = time.perf_counter() - t0
    assert len(cuts) == args.shards
    print(f"{args.images} images in {args.runs} runs, {args.shards} shards: {dt:.1f} s "
          f"({args.images / dt:,.0f} images/s), keys files {size / args.images:.0f} B/image, "
          f"load {load:.2f}-{os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
