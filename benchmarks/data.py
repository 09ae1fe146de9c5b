"""The ImageNet-like files every throughput peer reads, built once and reused.

    python benchmarks/data.py [--images 2000] [--out bench_out/throughput]

Under ``<out>/imagenet_<N>/``:
  * ``folder/train/<class>/*.JPEG`` (+ a small ``val``): real-photo crops, 500x375 / 375x500,
    ~90 KB, made by ``imagenet_seq.tools.sample.make_sample_imagefolder`` (8 classes);
  * ``lmdb/ILSVRC-{train,val}.lmdb``: the same images through ``preprocess_sequential.py``;
  * ``legacy/ILSVRC-train.lmdb``: the same train images in the original tool's format (tensorpack
    ``LMDBSerializer.save`` of ``[uint8 JPEG array, label]``), for tensorpack's own flow.
Each part is built under a temporary name and renamed when complete, so an interrupted build is
redone rather than half used.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_OUT = os.path.join(REPO, "bench_out", "throughput")
NUM_CLASSES = 8


@dataclass
class BenchData:
    """Paths of one benchmark data set (all hold the same train images)."""

    folder: str  # ImageFolder root (train/, val/)
    lmdb: str  # folder with ILSVRC-train.lmdb / ILSVRC-val.lmdb (our format)
    legacy: Optional[str]  # the original tool's train LMDB file (None without tensorpack)
    images: int

    @property
    def train_dir(self) -> str:
        return os.path.join(self.folder, "train")


def train_files(folder: str) -> List[Tuple[str, int]]:
    """(path, label) of every train image, classes sorted like torchvision's ImageFolder."""
    root = os.path.join(folder, "train")
    out = []
    for label, cls in enumerate(sorted(os.listdir(root))):
        d = os.path.join(root, cls)
        out += [(os.path.join(d, f), label) for f in sorted(os.listdir(d))]
    return out


def _build_folder(path: str, images: int) -> None:
    from imagenet_seq.tools.sample import make_sample_imagefolder

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_sample_imagefolder(tmp, train_per_class=max(1, images // NUM_CLASSES), val_per_class=8,
                            num_classes=NUM_CLASSES, seed=11)
    os.replace(tmp, path)


def _build_lmdb(folder: str, path: str) -> None:
    from imagenet_seq.convert.cli import main

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rc = main([folder, tmp, "--workers", str(os.cpu_count() or 1), "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"preprocess of {folder} failed with exit code {rc}")
    os.replace(tmp, path)


def _build_legacy(folder: str, path: str, seed: int = 0) -> None:
    """The original tool's file: tensorpack LMDBSerializer over shuffled [JPEG array, label]."""
    import numpy as np
    from tensorpack.dataflow import DataFromList, LMDBSerializer, MapData

    files = train_files(folder)
    order = np.random.default_rng(seed).permutation(len(files))

    def load(dp):
        with open(dp[0], "rb") as f:
            return [np.frombuffer(f.read(), dtype=np.uint8), dp[1]]

    ds = MapData(DataFromList([list(files[i]) for i in order], shuffle=False), load)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    for p in (tmp, tmp + "-lock"):
        if os.path.exists(p):
            os.remove(p)
    LMDBSerializer.save(ds, tmp)
    os.replace(tmp, path)
    if os.path.exists(tmp + "-lock"):
        os.remove(tmp + "-lock")


def ensure(images: int = 2000, out: str = DEFAULT_OUT, legacy: bool = True,
           verbose: bool = True) -> BenchData:
    """Build (once) and return the benchmark files for ``images`` train images.

    Args:
        images: number of train images (rounded down to a multiple of 8 classes).
        out: parent folder; the set lives in ``<out>/imagenet_<images>``.
        legacy: also write the original tool's LMDB (skipped with a note without tensorpack).
        verbose: print what is being built.
    """
    base = os.path.join(out, f"imagenet_{images}")
    os.makedirs(base, exist_ok=True)
    folder = os.path.join(base, "folder")
    lmdb_dir = os.path.join(base, "lmdb")
    legacy_path = os.path.join(base, "legacy", "ILSVRC-train.lmdb")
    say = print if verbose else (lambda *a, **k: None)
    if not os.path.isdir(folder):
        say(f"building {images} ImageNet-like JPEGs in {folder} ...", flush=True)
        _build_folder(folder, images)
    if not os.path.isdir(lmdb_dir):
        say(f"preprocessing into {lmdb_dir} ...", flush=True)
        _build_lmdb(folder, lmdb_dir)
    have_legacy = os.path.exists(legacy_path)
    if legacy and not have_legacy:
        try:
            import tensorpack.dataflow  # noqa: F401
        except ImportError:
            say("tensorpack not installed: no legacy LMDB (pip install tensorpack)")
        else:
            say(f"writing the original tool's LMDB {legacy_path} ...", flush=True)
            _build_legacy(folder, legacy_path)
            have_legacy = True
    n = len(train_files(folder))
    return BenchData(folder, lmdb_dir, legacy_path if have_legacy else None, n)


def warm_page_cache(data: BenchData) -> int:
    """Read every benchmark file once so all peers start from page cache; returns bytes read."""
    total = 0
    paths = [p for p, _ in train_files(data.folder)]
    for d in (data.lmdb, os.path.dirname(data.legacy) if data.legacy else None):
        if d and os.path.isdir(d):
            for dirpath, _, fs in os.walk(d):
                paths += [os.path.join(dirpath, f) for f in fs]
    for p in paths:
        with open(p, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                total += len(chunk)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    d = ensure(args.images, args.out)
    print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
