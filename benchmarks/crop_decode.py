"""Crop-only decoding (imagenet_seq.decode._jpegcrop) vs whole-image OpenCV decoding, per image.

    python benchmarks/crop_decode.py [--images 300] [--rounds 7] [--out benchmarks/results/crop_decode.md]

Builds ImageNet-like JPEGs in memory (``imagenet_seq.tools.sample``: real-photo crops, 500x375 or
375x500, quality 94, ~90 KB) and times, single-threaded in this process, several rounds with the
methods interleaved within each round (so load from other jobs hits all of them alike):

  * ``cv2.imdecode`` full size: the per-core decode limit of benchmarks/throughput.py;
  * ``TrainTransform`` (RandomResizedCrop 224 + flip, into a preallocated array) with
    ``crop_decode=False`` (whole image decoded by OpenCV, DCT-scaled) and ``crop_decode=True``;
  * the decode step alone, same boxes and scales: OpenCV whole image at the chosen scale vs
    ``_jpegcrop.decode_crop`` of the box; the region a crop-decoding ValTransform would need;
    ``decode_crop`` of the whole image (system libjpeg-turbo vs OpenCV's) and of the last row
    only (rows above a box are still entropy-decoded: the floor of any crop).

Every method sees the same images and the same random boxes (same seed per round). Reported:
median over rounds of wall ms/image and CPU ms/image, and ratios against ``crop_decode=False``
and against the full-size decode.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402

from imagenet_seq.decode import transforms as decode  # noqa: E402
from imagenet_seq.decode.transforms import (TrainTransform, ValTransform, jpeg_size,  # noqa: E402
                                 sample_crop)
from imagenet_seq.malloc import keep_decode_buffers  # noqa: E402
from imagenet_seq.decode.resize import reduction  # noqa: E402
from imagenet_seq.tools.sample import _photos, imagenet_like_jpeg  # noqa: E402


def make_jpegs(n: int, seed: int = 11) -> List[bytes]:
    """n ImageNet-like JPEGs, the photos taken in turn (as make_sample_imagefolder does)."""
    rng = np.random.default_rng(seed)
    photos = [p for _, p in _photos()]
    return [imagenet_like_jpeg(photos[i % len(photos)], rng) for i in range(n)]


def _boxes(jpegs: List[bytes], t: TrainTransform, seed: int):
    """(scaled box, denom) per image, chosen exactly as TrainTransform._crop chooses them."""
    rng = np.random.default_rng(seed)
    out = []
    for data in jpegs:
        width, height = jpeg_size(data)
        box = sample_crop(width, height, t.scale, t.ratio, rng)
        denom = reduction(box[2], box[3], t.size, t.size, t.antialias) if t.dct_scaling else 1
        out.append((decode._scaled_box(box, denom, (width, height)), denom))
    return out


def _val_regions(jpegs: List[bytes], size: int = 224, resize: int = 256):
    """(source box, denom) per image that ValTransform's centre crop reads (+2 px for the
    bilinear taps): what a crop-decoding ValTransform would decode. Estimate only."""
    val = ValTransform(size, resize)
    out = []
    for data in jpegs:
        width, height = jpeg_size(data)
        full = val._resized_dims(width, height)  # the scale policy ValTransform applies
        denom = reduction(width, height, *full) if val.dct_scaling else 1
        w, h = -(-width // denom), -(-height // denom)
        nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        x0 = max(0, int(left * w / nw) - 2)
        y0 = max(0, int(top * h / nh) - 2)
        x1 = min(w, int((left + size) * w / nw) + 3)
        y1 = min(h, int((top + size) * h / nh) + 3)
        out.append(((x0, y0, x1, y1), denom))
    return out


def methods(jpegs: List[bytes], seed: int) -> Dict[str, Callable[[], None]]:
    out = np.empty((224, 224, 3), np.uint8)
    arrays = [np.frombuffer(d, np.uint8) for d in jpegs]
    boxes = _boxes(jpegs, TrainTransform(), seed)
    scratch = np.empty(1600 * 1200 * 3, np.uint8)
    dims = [jpeg_size(d) for d in jpegs]
    whole_images = [((0, 0, w, h), 1) for w, h in dims]
    last_rows = [((0, h - 1, w, h), 1) for w, h in dims]

    def full():
        for a in arrays:
            cv2.imdecode(a, cv2.IMREAD_COLOR)

    def train(crop_decode: bool):
        t = TrainTransform(crop_decode=crop_decode)

        def run():
            rng = np.random.default_rng(seed)
            for d in jpegs:
                t.write(d, rng, out)
        return run

    def decode_whole():
        for a, ((x0, y0, x1, y1), denom) in zip(arrays, boxes):
            cv2.imdecode(a, decode._BY_DENOM[denom])[y0:y1, x0:x1]

    def decode_box(regions):
        def run():
            for d, ((x0, y0, x1, y1), denom) in zip(jpegs, regions):
                decode._jpegcrop.decode_crop(d, x0, y0, x1 - x0, y1 - y0, denom, scratch)
        return run

    return {"cv2.imdecode full size": full,
            "TrainTransform crop_decode=False": train(False),
            "TrainTransform crop_decode=True": train(True),
            "decode only: OpenCV whole image, scaled": decode_whole,
            "decode only: _jpegcrop box, scaled": decode_box(boxes),
            "decode only: _jpegcrop, val centre-crop region": decode_box(_val_regions(jpegs)),
            # the system libjpeg against OpenCV's on the same work, and the floor of any crop
            # (rows above a box are still entropy-decoded)
            "decode only: _jpegcrop whole image, full size": decode_box(whole_images),
            "decode only: _jpegcrop last row only": decode_box(last_rows)}


def measure(jpegs: List[bytes], rounds: int) -> Dict[str, List[tuple]]:
    results: Dict[str, List[tuple]] = {}
    for r in range(rounds):
        for name, fn in methods(jpegs, seed=100 + r).items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            results.setdefault(name, []).append((wall * 1e3 / len(jpegs), cpu * 1e3 / len(jpegs)))
    return results


def report(results: Dict[str, List[tuple]], jpegs: List[bytes], rounds: int,
           argv: List[str]) -> str:
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in results.items()}
    full = med["cv2.imdecode full size"][1]
    off = med["TrainTransform crop_decode=False"][1]
    whole = med["decode only: OpenCV whole image, scaled"][1]
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=here).stdout.strip()
    lines = [
        "# Crop-only JPEG decoding in the train transform",
        "",
        "`" + " ".join(["python benchmarks/crop_decode.py"] + argv) + "`",
        "",
        f"{len(jpegs)} ImageNet-like JPEGs (imagenet_seq.tools.sample: 500x375 / 375x500, quality 94, "
        f"mean {statistics.mean(len(d) for d in jpegs) / 1e3:.0f} KB), in memory; one "
        f"thread; {rounds} rounds, methods interleaved in each round, medians. Commit {commit}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f} at the end; OpenCV {cv2.__version__} (bundled libjpeg-turbo), "
        f"system libjpeg-turbo {decode._jpegcrop.LIBJPEG_TURBO_VERSION_NUMBER} for _jpegcrop.",
        "",
        "| method | wall ms/image | CPU ms/image | CPU vs crop_decode=False | CPU vs full decode |",
        "|---|---|---|---|---|",
    ]
    for name, (wall, cpu) in med.items():
        vs_off = f"{cpu / off:.3f}" if name.startswith("TrainTransform") else ""
        if name.startswith("decode only: _jpegcrop box"):
            vs_off = f"{cpu / whole:.3f} (vs OpenCV whole)"
        lines.append(f"| {name} | {wall:.3f} | {cpu:.3f} | {vs_off} | {cpu / full:.3f} |")
    on = med["TrainTransform crop_decode=True"][1]
    per_round = sorted(a[1] / b[1] for a, b in zip(results["TrainTransform crop_decode=False"],
                                                      results["TrainTransform crop_decode=True"]))
    lines += ["", f"crop_decode=True: {off / on:.3f}x the images per CPU-second of "
              f"crop_decode=False (per round {per_round[0]:.3f}-{per_round[-1]:.3f}); the train transform costs "
              f"{on / full:.3f}x a full-size decode (was {off / full:.3f}x).", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", help="also write the report (markdown) here")
    args = p.parse_args(argv)
    if decode._jpegcrop is None:
        p.error("imagenet_seq.decode._jpegcrop is not built: python setup.py build_ext --inplace")
    keep_decode_buffers()
    cv2.setNumThreads(1)  # per-core figures: no OpenCV worker threads in resize
    jpegs = make_jpegs(args.images)
    results = measure(jpegs, args.rounds)
    text = report(results, jpegs, args.rounds, argv)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
