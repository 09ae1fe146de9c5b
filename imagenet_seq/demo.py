"""``imagenet-seq-demo``: the main job end to end on a sample made from real photographs."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional

from . import preprocess_cli
from .reader import SplitReader
from .sample import make_sample_imagefolder


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="imagenet-seq-demo", description=__doc__)
    p.add_argument("--workdir", help="where to put the sample and the LMDBs (default: a temp dir)")
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=10)
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="imagenet_seq_demo_")
    src, dst = os.path.join(work, "imagefolder"), os.path.join(work, "lmdb")
    print(f"1/2 building a sample ImageFolder from real photographs in {src}")
    classes = make_sample_imagefolder(src, args.train_per_class, args.val_per_class)
    print(f"    {len(classes)} classes")
    print(f"2/2 python preprocess_sequential.py {src} {dst}")
    rc = preprocess_cli.main([src, dst, "--overwrite"])
    if rc != 0:
        return rc
    for split in ("train", "val"):
        r = SplitReader(dst, split)
        t0 = time.perf_counter()
        n = sum(1 for _ in r.read_all())
        dt = time.perf_counter() - t0
        print(f"    {split}: {n} records, {r.meta.total_bytes / 1e6:.1f} MB, "
              f"streamed at {n / dt:.0f} records/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
