"""Shuffle quality of Loader configurations: label diversity per batch and co-batch repetition.

Computed from the epoch plan and the labels only (no image is read), so ImageNet-sized
configurations take seconds. Labels come from a converted LMDB (``--lmdb``) or are synthesised
like ImageNet-1k train (1,281,167 records, 1000 classes, written in a seeded random order as
preprocess_sequential.py does; ``--class-sorted`` simulates a file in class order instead).

    python benchmarks/shuffle_quality.py --synthetic-imagenet
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


def synthetic_labels(class_sorted: bool, seed: int = 0) -> np.ndarray:
    counts = np.full(1000, IMAGENET_TRAIN // 1000)
    counts[: IMAGENET_TRAIN % 1000] += 1
    labels = np.repeat(np.arange(1000), counts)
    return labels if class_sorted else np.random.default_rng(seed).permutation(labels)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lmdb", help="folder with ILSVRC-train.lmdb (labels read from it)")
    src.add_argument("--synthetic-imagenet", action="store_true")
    p.add_argument("--class-sorted", action="store_true", help="synthetic file in class order")
    p.add_argument("--batch-size", type=int, default=256)
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
    else:
        labels = synthetic_labels(args.class_sorted)
        mean = IMAGENET_MEAN_RECORD_BYTES
    rows = []
    for world in args.world_size:
        buffers = args.buffer_size if args.buffer_size is not None else \
            [buffer_records(None, None, mean, world)]
        for chunk in args.chunk_size:
            for buf in buffers:
                t0 = time.time()
                rep = shuffle_report(labels, batch_size=args.batch_size, world_size=world,
                                     chunk_size=chunk, buffer_size=buf)
                row = rep.as_dict()
                row.update(buffer_mb=buf * mean / 1e6, seconds=time.time() - t0)
                rows.append(row)
                if not args.json:
                    print(f"world {world:>2}  chunk {chunk:>5}  buffer {buf:>6} rec "
                          f"({row['buffer_mb']:>6.0f} MB/rank)  distinct labels/batch "
                          f"{rep.distinct_labels:7.2f} / {rep.full_shuffle_distinct_labels:7.2f}"
                          f" = {rep.diversity_ratio:.4f}  repetition "
                          f"{100 * rep.repetition:7.3f}% (full shuffle "
                          f"{100 * rep.full_shuffle_repetition:.3f}%)", flush=True)
    if args.json:
        print(json.dumps(dict(default_node_buffer_bytes=DEFAULT_NODE_BUFFER_BYTES, rows=rows),
                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
