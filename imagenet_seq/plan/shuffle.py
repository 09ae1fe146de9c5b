"""Bounded shuffle buffer: the last stage of the epoch order, after the chunk plan.

The reader streams records in plan order (long contiguous runs); this buffer holds ``size``
records and emits a uniformly chosen one for every record that comes in, then drains the rest in
a random order. Nothing is lost or repeated: the output is a permutation of the input.

Memory: ``size`` x mean record size (compressed JPEG bytes; ImageNet ~110 KB). The default is
:data:`DEFAULT_NODE_BUFFER_BYTES` per machine, divided among the ranks on that machine.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, TypeVar

import numpy as np

__all__ = ["DEFAULT_NODE_BUFFER_BYTES", "IMAGENET_MEAN_RECORD_BYTES", "ShuffleBuffer",
           "buffered_shuffle", "buffer_records"]

T = TypeVar("T")

#: Default buffer budget per machine (all ranks on it together): ~19,500 ImageNet records.
DEFAULT_NODE_BUFFER_BYTES = 2 << 30
#: Mean ImageNet train record (JPEG bytes); used when a file does not say (legacy files).
IMAGENET_MEAN_RECORD_BYTES = 110_000
_RANDOM_BLOCK = 4096
NOTHING = object()  # what ShuffleBuffer.push returns while the buffer fills


class ShuffleBuffer:
    """The shuffle stage: a buffer of ``size`` items with explicit, replayable state.

    ``run(items)`` yields every item once (see :func:`buffered_shuffle`). The state after ``k``
    outputs is a function of (input length, ``size``, rng seed, ``k``) only, so a resume does
    not store the buffer: :meth:`fast_forward` replays the shuffle on the input's *ids* (cheap:
    no data) up to output ``k``, leaving the buffer holding the ids it would hold then;
    :meth:`fill` swaps those ids for the records (read again: at most ``size`` of them), and
    ``run(rest)`` continues with input item ``consumed`` onwards, exactly as the
    uninterrupted stream would have.

    Interface: iterate (``run``); ``consumed`` / ``emitted`` count the items taken and given;
    ``fast_forward`` + ``fill`` restore it from a stream position (all a resume stores).
    """

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = int(size), rng
        self.buf: list = []
        self.draws = np.empty(0, np.int64)
        self.pos = 0
        self.consumed = 0  # input items taken
        self.emitted = 0  # output items given
        self.drain: Optional[np.ndarray] = None  # the final permutation, once input ended
        self.drain_pos = 0

    def push(self, item: T) -> Any:
        """Take one input item; return the item it displaces (:data:`NOTHING` while filling)."""
        self.consumed += 1
        if len(self.buf) < self.size:
            self.buf.append(item)
            return NOTHING
        if self.pos == len(self.draws):
            self.draws = self.rng.integers(0, self.size, _RANDOM_BLOCK)
            self.pos = 0
        j = int(self.draws[self.pos])
        self.pos += 1
        out = self.buf[j]
        self.buf[j] = item
        self.emitted += 1
        return out

    def drain_next(self) -> Optional[int]:
        """After the input ended: the buffer position of the next output (None: done)."""
        if self.drain is None:
            self.drain = self.rng.permutation(len(self.buf))
            self.drain_pos = 0
        if self.drain_pos == len(self.drain):
            return None
        j = int(self.drain[self.drain_pos])
        self.drain_pos += 1
        self.emitted += 1
        return j

    def run(self, items: Iterable[T]) -> Iterator[T]:
        if self.size <= 1:
            for item in items:
                self.consumed += 1
                self.emitted += 1
                yield item
            return
        if self.drain is None:
            for item in items:
                out = self.push(item)
                if out is not NOTHING:
                    yield out
        while True:
            j = self.drain_next()
            if j is None:
                return
            yield self.buf[j]

    def fast_forward(self, ids: Sequence[int], outputs: int) -> int:
        """Replay the shuffle over ``ids`` (the whole input's ids, in input order) until
        ``outputs`` items came out; returns how many input items that took (the input of the
        resumed stream starts there). The buffer then holds ids; see :meth:`fill`."""
        if self.size <= 1:
            self.consumed = self.emitted = outputs
            return outputs
        n = len(ids)
        if self.consumed == 0 and outputs > 0:
            self._skip_steady(ids, outputs)
        while self.emitted < outputs:
            if self.consumed < n:
                self.push(ids[self.consumed])
            elif self.drain_next() is None:
                raise ValueError(f"{outputs} outputs asked of a stream of {n}")
        return self.consumed

    def _skip_steady(self, ids: Sequence[int], outputs: int) -> None:
        """Fill, then the steady part (one in, one out) in a few numpy calls: the same rng
        blocks as :meth:`push` draws; a slot ends holding the last id written to it."""
        fill = min(self.size, len(ids))
        buf = np.asarray(ids[:fill], dtype=np.int64)
        steady = max(0, min(outputs, len(ids) - fill))
        if steady:
            blocks = -(-steady // _RANDOM_BLOCK)
            drawn = [self.rng.integers(0, self.size, _RANDOM_BLOCK) for _ in range(blocks)]
            draws = np.concatenate(drawn)[:steady]
            last = np.full(self.size, -1, np.int64)
            np.maximum.at(last, draws, np.arange(steady))
            written = last >= 0
            buf[written] = np.asarray(ids[fill:fill + steady], dtype=np.int64)[last[written]]
            self.draws, self.pos = drawn[-1], steady - _RANDOM_BLOCK * (blocks - 1)
        self.buf = buf.tolist()
        self.consumed, self.emitted = fill + steady, steady

    def pending_ids(self) -> List[int]:
        """Ids the buffer still has to give out (after :meth:`fast_forward`)."""
        if self.drain is None:
            return list(self.buf)
        return [self.buf[j] for j in self.drain[self.drain_pos:]]

    def fill(self, lookup: Callable[[int], T]) -> None:
        """Replace the ids in the buffer by ``lookup(id)`` (the records read again)."""
        if self.drain is None:
            self.buf = [lookup(i) for i in self.buf]
            return
        left = set(self.drain[self.drain_pos:].tolist())  # given out already: not read again
        self.buf = [lookup(x) if j in left else None for j, x in enumerate(self.buf)]


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
    return ShuffleBuffer(size, rng).run(items)


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
