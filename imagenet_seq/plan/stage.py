"""The plan stage: one rank's epoch as contiguous reads, and as record ids, from any position.

A :class:`Plan` is a pure function of (split size, mode, seed, epoch, rank, world size,
shuffle, chunk size): :mod:`.order` computes it, no data is read. Iterating ``plan.spans(e)``
gives the ``(first record, count)`` reads of epoch ``e``; ``plan.ids(e)`` the records in
reading order (before the shuffle buffer); ``plan.spans_from(e, pos)`` the reads from input
position ``pos`` on (a resume). Stateless: no ``state()``; ``close()`` is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from imagenet_seq.plan import order
from imagenet_seq.plan.order import slice_spans


def merge_ids(ids: Sequence[int]) -> List[order.Span]:
    """Record ids -> the fewest spans covering exactly them (sorted: one forward pass)."""
    out: List[order.Span] = []
    for i in sorted(int(x) for x in ids):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


@dataclass(frozen=True)
class Plan:
    num_records: int
    mode: str = "train"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    chunk_size: int = order.DEFAULT_CHUNK_RECORDS

    def spans(self, epoch: int) -> List[order.Span]:
        return order.read_spans(self.num_records, self.mode, seed=self.seed, epoch=epoch,
                                rank=self.rank, world_size=self.world_size,
                                shuffle=self.shuffle, chunk_size=self.chunk_size)

    def length(self, epoch: int) -> int:
        return sum(c for _, c in self.spans(epoch))

    def ids(self, epoch: int) -> np.ndarray:
        spans = self.spans(epoch)
        if not spans:
            return np.empty(0, np.int64)
        return np.concatenate([np.arange(s, s + c, dtype=np.int64) for s, c in spans])

    def spans_from(self, epoch: int, position: int) -> List[order.Span]:
        spans = self.spans(epoch)
        return slice_spans(spans, position, sum(c for _, c in spans))

    def close(self) -> None:
        pass
