"""Shuffle quality of Loader configurations: label diversity per batch and co-batch repetition.

Computed from the epoch plan and the labels only (no image is read), so ImageNet-sized
configurations take seconds. Labels come from a converted LMDB (``--lmdb``) or are synthesised
like ImageNet-1k train (1,281,167 records, 1000 classes, written in a seeded random order as
preprocess_sequential.py does; ``--class-sorted`` simulates a file in class order instead), or
like a small split (``--synthetic-small``: 10,000 records, 100 classes, seeded random order;
``--records`` changes the size). ``--epoch-pairs P`` reports the mean and the worst repetition
over the epoch pairs (0, 1) .. (P-1, P).

    python benchmarks/shuffle_quality.py --synthetic-imagenet
    python benchmarks/shuffle_quality.py --synthetic-small --batch-size 32 64 256 --epoch-pairs 5
    python benchmarks/shuffle_quality.py --lmdb /data/lmdb --batch-size 256 --world-size 1 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagenet_seq.plan import order  # noqa: E402
from imagenet_seq.tools.diagnostics import shuffle_report  # noqa: E402
from imagenet_seq.plan.shuffle import (DEFAULT_NODE_BUFFER_BYTES,  # noqa: E402
                                  IMAGENET_MEAN_RECORD_BYTES, buffer_records)

IMAGENET_TRAIN = 1_281_167
SMALL_SPLIT = 10_000


def synthetic_labels(class_sorted: bool, seed: int = 0) -> np.ndarray:
    counts = np.full(1000, IMAGENET_TRAIN // 1000)
    counts[: IMAGENET_TRAIN % 1000] += 1
    labels = np.repeat(np.arange(1000), counts)
    return labels if class_sorted else np.random.default_rng(seed).permutation(labels)


def synthetic_small_labels(records: int, classes: int = 100, seed: int = 0) -> np.ndarray:
    """A small split: ``records`` records of ``classes`` classes, in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.arange(records) % classes)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lmdb", help="folder with ILSVRC-train.lmdb (labels read from it)")
    src.add_argument("--synthetic-imagenet", action="store_true")
    src.add_argument("--synthetic-small", action="store_true",
                     help=f"a small split ({SMALL_SPLIT:,} records, 100 classes; see --records)")
    p.add_argument("--records", type=int, default=SMALL_SPLIT, help="--synthetic-small's size")
    p.add_argument("--class-sorted", action="store_true", help="synthetic file in class order")
    p.add_argument("--batch-size", type=int, nargs="+", default=[256])
    p.add_argument("--epoch-pairs", type=int, default=1,
                   help="repetition over epochs (e, e+1) for e < this: mean and worst")
    p.add_argument("--world-size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--chunk-size", type=int, nargs="+", default=[order.DEFAULT_CHUNK_RECORDS])
    p.add_argument("--buffer-size", type=int, nargs="*", default=None,
                   help="buffer records per rank (default: the Loader's default per world size)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    if args.lmdb:
        from imagenet_seq.read.reader import SplitReader

        reader = SplitReader(args.lmdb, "train")
        labels = reader.labels
        if labels is None:
            p.error(f"{reader.path} stores no labels (original-tool LMDB)")
        mean = reader.meta.total_bytes / max(1, len(reader))
    elif args.synthetic_small:
        labels = synthetic_small_labels(args.records)
        mean = IMAGENET_MEAN_RECORD_BYTES
    else:
        labels = synthetic_labels(args.class_sorted)
        mean = IMAGENET_MEAN_RECORD_BYTES
    rows = []
    for world in args.world_size:
        buffers = args.buffer_size if args.buffer_size is not None else \
            [buffer_records(None, None, mean, world)]
        for chunk in args.chunk_size:
            for buf in buffers:
                for batch in args.batch_size:
                    t0 = time.time()
                    reps = [shuffle_report(labels, batch_size=batch, world_size=world,
                                           chunk_size=chunk, buffer_size=buf, epoch=e)
                            for e in range(max(1, args.epoch_pairs))]
                    rep = reps[0]
                    row = rep.as_dict()
                    worst = max(r.repetition for r in reps)
                    row.update(buffer_mb=buf * mean / 1e6, seconds=time.time() - t0,
                               effective_chunk=order.effective_chunk_size(len(labels), world,
                                                                          chunk),
                               epoch_pairs=len(reps),
                               mean_repetition=float(np.mean([r.repetition for r in reps])),
                               worst_repetition=worst)
                    rows.append(row)
                    if not args.json:
                        pairs = "" if len(reps) == 1 else \
                            (f" mean of {len(reps)} epoch pairs "
                             f"{100 * row['mean_repetition']:.3f}% worst {100 * worst:.3f}%")
                        print(f"N {len(labels):>9,}  world {world:>2}  batch {batch:>4}  chunk "
                              f"{chunk:>5} (effective {row['effective_chunk']:>5})  buffer "
                              f"{buf:>6} rec ({row['buffer_mb']:>6.0f} MB/rank)  distinct "
                              f"labels/batch {rep.distinct_labels:7.2f} / "
                              f"{rep.full_shuffle_distinct_labels:7.2f} = "
                              f"{rep.diversity_ratio:.4f}  repetition "
                              f"{100 * rep.repetition:7.3f}%{pairs} (full shuffle "
                              f"{100 * rep.full_shuffle_repetition:.3f}%)", flush=True)
    if args.json:
        print(json.dumps(dict(default_node_buffer_bytes=DEFAULT_NODE_BUFFER_BYTES, rows=rows),
                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
