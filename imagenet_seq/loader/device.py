"""The device stage: move a uint8 batch to the GPU (non_blocking) and normalise it there."""
from __future__ import annotations

from typing import Any, Tuple

import torch

from imagenet_seq.decode.normalize import IMAGENET_MEAN, IMAGENET_STD
from imagenet_seq.decode.normalize import normalize as _normalize

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "to_device"]


def to_device(images: torch.Tensor, targets: torch.Tensor, device: Any, normalize: bool = True,
              channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copy a batch to ``device`` (non_blocking) and normalise there.

    uint8 images become float32 ``(x / 255 - mean) / std`` with ImageNet mean/std, computed on
    the device (the float math belongs on the GPU, not the CPU cores). Non-uint8 images (a
    torchvision transform already normalised them) are only moved.
    """
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if normalize and images.dtype == torch.uint8:
        images = _normalize(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets
