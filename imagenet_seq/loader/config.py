"""What a Loader works out from its arguments before any stage runs: the default worker
count, the mean record size (memory budgets) and the per-image transform."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import numpy as np


def default_workers(local_world: int) -> int:
    """Decode workers per rank: this machine's usable CPUs split among its ranks."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_world))


def mean_record_bytes(meta: Any, reader: Any, num_records: int) -> float:
    """Mean JPEG record size: from the metadata, else from the first 256 records."""
    if meta.total_bytes and num_records:
        return meta.total_bytes / num_records
    sizes = [len(j) for _, j, _ in reader.read_range(0, min(256, num_records))]
    reader.close()
    return float(np.mean(sizes)) if sizes else 0.0


def make_transform(transform: Optional[Callable], mode: str, image_size: int, resize_size: int,
                   scale: Tuple[float, float], ratio: Tuple[float, float]):
    """``(transform, collate)``: the fast OpenCV path (``'array'``) or a PIL-image transform
    collated like ``default_collate`` (``'default'``)."""
    from imagenet_seq.decode import transforms as decode

    if transform is None:
        if mode == "train":
            return decode.TrainTransform(image_size, scale, ratio), "array"
        return decode.ValTransform(image_size, resize_size), "array"
    if isinstance(transform, (decode.TrainTransform, decode.ValTransform)):
        return transform, "array"
    if isinstance(transform, decode.PILTransform):
        return transform, "default"
    if not callable(transform):
        raise TypeError(f"transform={transform!r} is not callable; pass None (fast OpenCV "
                        "path) or a torchvision-style transform")
    return decode.PILTransform(transform), "default"
