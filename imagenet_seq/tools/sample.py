"""A small ImageNet-like ImageFolder made from real photographs shipped in scikit-image.

Used by the demo, the tests and the benchmarks: every image is a random crop of a real photo,
resized to ImageNet's typical 500x375 (or 375x500), re-encoded as a JPEG (quality 94, mild grain), so
decode cost and file sizes look like ImageNet's (~100 KB), unlike noise or solid colours.
One class per source photo, so a model can learn something in one epoch; asking for more classes
than photos is refused unless repeats are asked for (``repeat_photos=True``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import cv2
import numpy as np

__all__ = ["PHOTOS", "imagenet_like_jpeg", "make_sample_imagefolder"]

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def _photos() -> List[Tuple[str, np.ndarray]]:
    try:
        import skimage
    except ImportError:
        raise ImportError("the sample data needs scikit-image: pip install scikit-image") from None
    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = []
    for name in PHOTOS:
        img = cv2.imread(os.path.join(folder, name), cv2.IMREAD_COLOR)
        if img is not None:
            out.append((os.path.splitext(name)[0], img))
    if len(out) < 2:
        raise RuntimeError(f"scikit-image in {folder} ships too few photos")
    return out


def imagenet_like_jpeg(photo: np.ndarray, rng: np.random.Generator,
                       size: Tuple[int, int] = (500, 375), quality: int = 94) -> bytes:
    """A random crop of ``photo`` (BGR), resized to ``size`` (w, h), with slight jitter."""
    w, h = size if rng.random() < 0.8 else size[::-1]
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.55, 1.0)
    cw = int(min(pw, ph * w / h) * scale)
    ch = int(cw * h / w)
    x = int(rng.integers(0, pw - cw + 1))
    y = int(rng.integers(0, ph - ch + 1))
    crop = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = cv2.resize(crop, (w, h), interpolation=cv2.INTER_CUBIC)
    gain = rng.uniform(0.85, 1.15, size=3)
    # mild sensor-like grain: upscaled crops are smoother than camera photos, and grain brings
    # file size and decode cost to ImageNet's (~110 KB mean at 500x375)
    grain = rng.normal(0.0, 7.0, size=img.shape).astype(np.float32)
    img = np.clip(img.astype(np.float32) * gain + grain, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def make_sample_imagefolder(root: str, train_per_class: int = 16, val_per_class: int = 4,
                            num_classes: Optional[int] = None, seed: int = 0,
                            size: Tuple[int, int] = (500, 375), quality: int = 94,
                            repeat_photos: bool = False) -> List[str]:
    """Write ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``; return the classes.

    Args:
        num_classes: classes to make (default: one per photograph, ``len(PHOTOS)``).
        repeat_photos: allow more classes than photographs: class ``i`` then takes photograph
            ``i % len(PHOTOS)``, so classes repeat each other's images (fine for timing or
            label-count shapes; a model cannot tell such classes apart).

    Raises:
        ValueError: more classes than photographs without ``repeat_photos``.
    """
    rng = np.random.default_rng(seed)
    photos = _photos()
    if num_classes is not None:
        if num_classes > len(photos) and not repeat_photos:
            raise ValueError(
                f"num_classes={num_classes}, but scikit-image ships {len(photos)} usable "
                f"photographs ({', '.join(n for n, _ in photos)}), one per class: more classes "
                f"would be copies of others that no model can tell apart; ask for at most "
                f"{len(photos)} (or pass repeat_photos=True where that does not matter)")
        photos = [photos[i % len(photos)] for i in range(num_classes)]
    classes = []
    for ci, (name, photo) in enumerate(photos):
        cls = f"n{ci:08d}_{name}"
        classes.append(cls)
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                with open(os.path.join(d, f"{cls}_{split}_{i:05d}.JPEG"), "wb") as f:
                    f.write(imagenet_like_jpeg(photo, rng, size, quality))
    return classes
