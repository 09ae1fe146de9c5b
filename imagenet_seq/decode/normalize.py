"""ImageNet's mean and std, defined once: every float output is ``(x / 255 - mean) / std``
(the Loader's ``device=`` path, :func:`imagenet_seq.data.to_device`, and DALI)."""
from __future__ import annotations

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images -> float32 ``(x / 255 - mean) / std``, computed where they are."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std
