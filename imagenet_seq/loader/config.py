"""What a Loader works out from its arguments before any stage runs: the default worker
count, the mean record size (memory budgets) and the per-image transform."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

WORKER_TYPES = ("process", "thread")
MODES = ("train", "val")
#: Largest ``image_size`` / ``resize_size`` (pixels per side) a Loader accepts: 18x ImageNet's
#: 224 and above its typical 500x375 sources; a decoded batch of 256 at this size is already
#: 12.9 GB, so a larger value is a typo or a damaged resume state, not a training setting.
MAX_IMAGE_SIZE = 4096


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_size(name: str, value: Any, low: int = 1, call: bool = False) -> int:
    """``value`` as an int in ``low .. MAX_IMAGE_SIZE``, else ValueError naming ``name``, the
    value and the range (a bool is not a size); ``call``: ``name`` is a method, named
    ``name(value)`` in the message."""
    if not _is_int(value) or not low <= value <= MAX_IMAGE_SIZE:
        said = f"{name}({value!r})" if call else f"{name}={value!r}"
        raise ValueError(f"{said}; expected an int in {low}..{MAX_IMAGE_SIZE} "
                         f"(pixels per side; {MAX_IMAGE_SIZE} is imagenet_seq's upper bound, "
                         "e.g. 224)")
    return int(value)


_pin_warned = False  # once per process: a script makes a train and a val Loader, per rank


def check_device(device: Any, pin_memory: bool) -> None:
    """Refuse a CUDA ``device`` where torch sees no CUDA device, before any stage starts (else
    the first batch fails deep inside torch with "Found no NVIDIA driver"); warn that
    ``pin_memory=True`` does nothing there (pinned memory only speeds copies to a GPU), once
    per process."""
    global _pin_warned
    import torch

    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a torch device ({e}); pass e.g. "
                             "'cuda', 'cuda:0', 'cpu' or None") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but torch {torch.__version__} sees no CUDA device "
                f"(torch.cuda.is_available() is False, CUDA build: {torch.version.cuda}); run on "
                "a machine with a GPU and a CUDA build of torch, or pass device='cpu' (float "
                "normalised batches on the CPU) or device=None (uint8 batches)")
    if pin_memory and device is None and not _pin_warned and not torch.cuda.is_available():
        import warnings

        _pin_warned = True
        warnings.warn("pin_memory=True has no effect: torch sees no CUDA device, and pinned "
                      "memory only speeds up copies to a GPU; batches stay in ordinary memory",
                      RuntimeWarning, stacklevel=3)


def check_args(mode: str, worker_type: Optional[str], decoder: Any, batch_size: int,
               num_workers: Optional[int], seed: int, stall_timeout: Optional[float],
               image_size: int = 224, resize_size: int = 256) -> None:
    """ValueError naming the first bad Loader argument and what it expects."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of 'train', 'val'")
    if worker_type is not None and worker_type not in WORKER_TYPES:
        raise ValueError(f"worker_type={worker_type!r}; expected 'process', 'thread' or "
                         "None (automatic)")
    if not (decoder in ("cpu", "dali") or callable(decoder)):
        raise ValueError(f"decoder={decoder!r}; expected 'cpu', 'dali' or a callable "
                         "(jpegs, labels) -> (images, targets)")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers={num_workers}; expected >= 0")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r}; expected a non-negative integer")
    if stall_timeout is not None and not stall_timeout > 0:
        raise ValueError(f"stall_timeout={stall_timeout!r}; expected seconds > 0, or None "
                         "to wait for ever")
    check_size("image_size", image_size)
    check_size("resize_size", resize_size)


def memory_bound(batch_size: int, mean_bytes: float, buffer_size: int, prefetch: int,
                 image_size: Optional[int]) -> Dict[str, int]:
    """Estimated peak bytes of one rank's Loader by part: ``shuffle_buffer`` (records x mean
    record), ``in_flight`` (``prefetch`` raw + decoded batches; the process pool's rings have
    the same size; the epoch boundary shares this window), ``total``."""
    raw = int(batch_size * mean_bytes)
    decoded = batch_size * 3 * image_size * image_size if image_size else 0
    parts = {"shuffle_buffer": int(buffer_size * mean_bytes),
             "in_flight": prefetch * (raw + decoded)}
    parts["total"] = sum(parts.values())
    return parts


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
