"""The learnable image set of the accuracy-parity benchmark (benchmarks/fidelity.py).

scikit-learn's handwritten digits (1,797 real scans, 8x8, 10 classes; shipped inside the
package, no download) drawn as ink into photo-like JPEGs: each digit is upscaled, slightly
rotated and moved, and written into a random crop of one of scikit-image's photographs, with a
random ink colour, lighting and sensor grain, then JPEG-encoded at quality 90. Canvas 112x84 (or
84x112), so RandomResizedCrop(64) and Resize(73) + CenterCrop(64) shrink it by 1-1.7x: the
range where OpenCV's bilinear filter and torchvision's antialiased one differ most (ImageNet's
500x375 at 224 px is the same situation). Fine photo texture and grain are high-frequency
content a filter can alias, as in real photos.

Layout (ImageFolder): ``<out>/folder/{train,val}/<digit>/*.JPEG``; digits are split once
(seeded, stratified) into train and val, and each is rendered ``renders`` (train) or 4 (val:
a larger val set, less scoring noise) times on other backgrounds. Converted with ``preprocess_sequential.py`` into ``<out>/lmdb``; the same train
images converted in class order (sorted file order, the way an ImageFolder tree is laid out)
into ``<out>/class_order/ILSVRC-val.lmdb`` for the shuffle ablation.
"""
from __future__ import annotations

import os
import shutil
from typing import List, Tuple

import cv2
import numpy as np

CANVAS = (112, 84)
IMAGE_SIZE, RESIZE_SIZE = 64, 73  # 224 / 256 of ImageNet's geometry, scaled to the canvas


def _digits() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the fidelity benchmark needs scikit-learn: pip install -e "
                          "'.[bench]'") from None
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _render(digit: np.ndarray, backgrounds: List[np.ndarray], rng: np.random.Generator) -> bytes:
    w, h = CANVAS if rng.random() < 0.8 else CANVAS[::-1]
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    bh, bw = bg.shape[:2]
    scale = rng.uniform(0.35, 0.9)  # crop of the photo, so its texture appears at many scales
    cw = int(min(bw, bh * w / h) * scale)
    ch = int(cw * h / w)
    x, y = int(rng.integers(0, bw - cw + 1)), int(rng.integers(0, bh - ch + 1))
    img = cv2.resize(bg[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA)
    img = img.astype(np.float32) * rng.uniform(0.6, 1.1, size=3)
    # the digit: 8x8 -> a glyph of 55-80 % of the shorter side, rotated, placed near the centre
    side = int(min(w, h) * rng.uniform(0.55, 0.8))
    # the scans' faint background strokes (1-3 of 16) would draw the glyph's square: cut them
    glyph = ((cv2.resize(digit, (side, side), interpolation=cv2.INTER_CUBIC) - 0.2) / 0.8).clip(0, 1)
    m = cv2.getRotationMatrix2D((side / 2, side / 2), rng.uniform(-12, 12), 1.0)
    m[:, 2] += (w / 2 - side / 2 + rng.uniform(-0.12, 0.12) * w,
                h / 2 - side / 2 + rng.uniform(-0.12, 0.12) * h)
    alpha = cv2.warpAffine(glyph, m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    # ink that stands out from the background under it: dark on light, light on dark, coloured
    under = float((img * alpha).sum() / max(1e-6, alpha.sum() * 3))
    ink = rng.uniform(0, 70, size=3) if under > 110 else rng.uniform(185, 255, size=3)
    img = img * (1 - alpha) + ink * alpha
    img += rng.normal(0.0, 6.0, size=img.shape)  # sensor grain
    ok, buf = cv2.imencode(".jpg", img.clip(0, 255).astype(np.uint8),
                           [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def make_folder(root: str, renders: int = 2, seed: int = 0, val_fraction: float = 0.25,
                limit: int = 0, val_renders: int = 4) -> Tuple[int, int]:
    """Write the ImageFolder under ``root``; returns (train images, val images)."""
    from imagenet_seq.tools.sample import _photos

    images, labels = _digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    if limit:
        order = order[:limit]
    val = set()
    for c in range(10):  # stratified split: the same share of every digit in val
        idx = [i for i in order if labels[i] == c]
        val.update(idx[: int(round(len(idx) * val_fraction))])
    backgrounds = [p for _, p in _photos()]
    counts = {"train": 0, "val": 0}
    for i in sorted(order):
        split = "val" if i in val else "train"
        d = os.path.join(root, split, str(labels[i]))
        os.makedirs(d, exist_ok=True)
        for r in range(val_renders if split == "val" else renders):
            with open(os.path.join(d, f"digit{i:04d}_{r}.JPEG"), "wb") as f:
                f.write(_render(images[i], backgrounds, rng))
            counts[split] += 1
    return counts["train"], counts["val"]


def build(out: str, renders: int = 2, seed: int = 0, limit: int = 0) -> dict:
    """Folder + LMDBs under ``out`` (reused when complete); returns their paths and sizes."""
    from imagenet_seq.convert.cli import main as preprocess

    folder, lmdb, ordered = (os.path.join(out, n) for n in ("folder", "lmdb", "class_order"))
    done = os.path.join(out, "COMPLETE")
    if not os.path.exists(done):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        n_train, n_val = make_folder(folder, renders, seed, limit=limit)
        quiet = ["--no-progress", "--workers", "2"]
        if preprocess([folder, lmdb, "--seed", str(seed)] + quiet) != 0:
            raise RuntimeError(f"preprocess failed on {folder}")
        # class order: the train images converted as a 'val' split are written in sorted order
        tree = os.path.join(out, "class_order_tree")
        os.makedirs(tree)
        train = os.path.abspath(os.path.join(folder, "train"))
        for split in ("train", "val"):  # the converter checks the layout; only val is written
            os.symlink(train, os.path.join(tree, split))
        if preprocess([tree, ordered, "--splits", "val"] + quiet) != 0:
            raise RuntimeError(f"preprocess failed on {tree}")
        with open(done, "w") as f:
            f.write(f"{n_train} {n_val}\n")
    with open(done) as f:
        n_train, n_val = (int(v) for v in f.read().split())
    return {"folder": folder, "lmdb": lmdb, "class_order": os.path.join(ordered, "ILSVRC-val.lmdb"),
            "train": n_train, "val": n_val}
