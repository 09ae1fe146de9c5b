"""Bounded shuffle buffer: the last stage of the epoch order, after the chunk plan.

The reader streams records in plan order (long contiguous runs); this buffer holds ``size``
records and emits a uniformly chosen one for every record that comes in, then drains the rest in
a random order. Nothing is lost or repeated: the output is a permutation of the input.

Memory: ``size`` x mean record size (compressed JPEG bytes; ImageNet ~110 KB). The default is
:data:`DEFAULT_NODE_BUFFER_BYTES` per machine, divided among the ranks on that machine.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, TypeVar

import numpy as np

T = TypeVar("T")

#: Default buffer budget per machine (all ranks on it together): ~19,500 ImageNet records.
DEFAULT_NODE_BUFFER_BYTES = 2 << 30
#: Mean ImageNet train record (JPEG bytes); used when a file does not say (legacy files).
IMAGENET_MEAN_RECORD_BYTES = 110_000
_RANDOM_BLOCK = 4096


def buffered_shuffle(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Shuffle a stream through a buffer of ``size`` items.

    The same input length, ``size`` and ``rng`` state give the same output order whatever the
    items are, so the order of indices computed without data equals the order of records read.

    Args:
        items: the input stream (consumed once, in order).
        size: buffer capacity in items; ``<= 1`` passes the stream through unchanged.
        rng: the randomness; consumed in fixed-size blocks.

    Yields:
        every input item exactly once.
    """
    if size <= 1:
        yield from items
        return
    buf = []
    draws = np.empty(0)
    pos = 0
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        if pos == len(draws):
            draws = rng.integers(0, size, _RANDOM_BLOCK)
            pos = 0
        j = int(draws[pos])
        pos += 1
        out = buf[j]
        buf[j] = item
        yield out
    for j in rng.permutation(len(buf)):
        yield buf[j]


def buffer_records(buffer_size: Optional[int], buffer_bytes: Optional[int],
                   mean_record_bytes: float, local_world_size: int = 1) -> int:
    """The buffer capacity in records for one rank.

    Args:
        buffer_size: explicit capacity in records (wins over ``buffer_bytes``).
        buffer_bytes: capacity in bytes for this rank; converted with the mean record size.
        mean_record_bytes: mean JPEG record size of the file (``meta.total_bytes / num_records``).
        local_world_size: ranks on this machine; the default per-machine budget is split
            among them so the machine total stays :data:`DEFAULT_NODE_BUFFER_BYTES`.

    Raises:
        ValueError: negative sizes.
    """
    if buffer_size is not None:
        if buffer_size < 0:
            raise ValueError(f"buffer_size={buffer_size}; expected >= 0 records (0 = no buffer)")
        return int(buffer_size)
    if buffer_bytes is None:
        buffer_bytes = DEFAULT_NODE_BUFFER_BYTES // max(1, local_world_size)
    if buffer_bytes < 0:
        raise ValueError(f"buffer_bytes={buffer_bytes}; expected >= 0")
    mean = mean_record_bytes if mean_record_bytes > 0 else IMAGENET_MEAN_RECORD_BYTES
    return int(buffer_bytes // mean)
