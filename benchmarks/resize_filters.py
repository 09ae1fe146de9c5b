"""Which resize gives torchvision's pixels, and at what cost (the choice behind imagenet_seq.decode.resize).

    python benchmarks/resize_filters.py [--images 120] [--rounds 3]

ImageNet-like 500x375 / 375x500 JPEGs (imagenet_seq.tools.sample), decoded once; each candidate resizes
them with torchvision's val geometry (shorter side to 256) on one thread. Reference:
torchvision's PIL path, ``Image.resize(..., BILINEAR)`` (what ``Resize(256)`` computes).
Prints mean / p99 / max absolute difference (grey levels) and the median time per image over
interleaved rounds (a shared machine: compare times within one run only).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imagenet_seq.tools.sample import _photos, imagenet_like_jpeg  # noqa: E402


def _geometry(w: int, h: int, size: int = 256):
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def opencv_default(a, w, h):  # the fast path's filter before issue 11
    big = a.shape[1] >= 2 * w and a.shape[0] >= 2 * h
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA if big else cv2.INTER_LINEAR)


def opencv_area(a, w, h):
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)


def pillow(a, w, h):
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))


def torch_aa(a, w, h):
    t = torch.from_numpy(a).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


CANDIDATES = {"OpenCV INTER_LINEAR (INTER_AREA from 2x)": opencv_default,
              "OpenCV INTER_AREA": opencv_area, "Pillow resize(BILINEAR)": pillow,
              "torch uint8 antialiased bilinear": torch_aa}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    photos = [p for _, p in _photos()]
    jpegs = [imagenet_like_jpeg(photos[i % len(photos)], rng) for i in range(args.images)]
    rgbs = [np.array(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    refs = [np.asarray(Image.fromarray(a).resize(_geometry(a.shape[1], a.shape[0]),
                                                 Image.BILINEAR)) for a in rgbs]
    times = {name: [] for name in CANDIDATES}
    for _ in range(args.rounds):
        for name, fn in CANDIDATES.items():
            t0 = time.perf_counter()
            for a in rgbs:
                fn(a, *_geometry(a.shape[1], a.shape[0]))
            times[name].append((time.perf_counter() - t0) / len(rgbs) * 1e3)
    print(f"{'filter':42s} {'mean':>6s} {'p99':>4s} {'max':>4s} {'ms/img':>7s}")
    for name, fn in CANDIDATES.items():
        d = np.concatenate([np.abs(fn(a, *_geometry(a.shape[1], a.shape[0])).astype(np.int16)
                                   - r).ravel() for a, r in zip(rgbs, refs)])
        print(f"{name:42s} {d.mean():6.3f} {np.quantile(d, 0.99):4.0f} {d.max():4d} "
              f"{float(np.median(times[name])):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
