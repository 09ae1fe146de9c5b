"""The finish stage: decoded batch -> what the training loop gets, the same for every decoder.

Counts and names skipped records (``skipped``, ``skipped_records``), remembers the records of
the last batch (``last_batch_records``), pins CPU batches (``pin_memory`` without ``device``),
and with ``device=`` moves the batch there and normalises uint8 images to float
(:func:`~imagenet_seq.loader.device.to_device`) -- whichever decoder made the batch.

Interface: ``__call__(decoded) -> (images, targets)``; ``state()`` / ``restore(state)``: the
skip count, part of the Loader's ``state_dict()``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from imagenet_seq.decode.batch import DecodedBatch
from imagenet_seq.loader.device import to_device

__all__ = ["Finish", "SKIP_LOG"]

SKIP_LOG = 1000  # skipped records kept for inspection


class Finish:
    """Args: ``pin`` (pin CPU batches), ``device`` (``None``: stay on the CPU),
    ``channels_last`` (memory format on the device)."""

    def __init__(self, pin: bool = False, device: Any = None, channels_last: bool = False):
        self.pin, self.device, self.channels_last = pin, device, channels_last
        self.skipped = 0
        self.skipped_records: List[Tuple[int, str]] = []
        self.last_batch_records = np.empty(0, np.int64)

    def __call__(self, res: DecodedBatch) -> Tuple[Any, torch.Tensor]:
        if res.skipped:
            self.skipped += len(res.skipped)
            room = SKIP_LOG - len(self.skipped_records)
            self.skipped_records.extend(res.skipped[:max(0, room)])
        self.last_batch_records = np.asarray(res.records, np.int64)
        images, targets = res.images, res.targets
        if self.pin:
            if images.device.type == "cpu" and not images.is_pinned():
                images = images.pin_memory()
            if targets.device.type == "cpu" and not targets.is_pinned():
                targets = targets.pin_memory()
        if self.device is not None:
            images, targets = to_device(images, targets, self.device,
                                        channels_last=self.channels_last)
        return images, targets

    def state(self) -> Dict[str, int]:
        return {"skipped": self.skipped}

    def restore(self, state: Dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
