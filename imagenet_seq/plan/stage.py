"""The plan stage: one rank's epoch as contiguous reads, and as record ids, from any position.

A :class:`Plan` holds every parameter of the order -- split size, mode, seed, rank, world size,
shuffle, chunk size and shuffle buffer size -- and is checked when it is made. The order is a
pure function of those and the epoch: :mod:`.order` computes it, no data is read.
``plan.spans(e)`` gives the ``(first record, count)`` reads of epoch ``e``; ``plan.ids(e)`` the
records in reading order (before the shuffle buffer); ``plan.spans_from(e, pos)`` the reads
from input position ``pos`` on (a resume); ``plan.shuffle_rng(e)`` the shuffle buffer's
randomness and ``plan.epoch_order(e)`` the records in the order they come out of it.
Stateless: a resume needs nothing of it but the epoch.

Two plans: today's per-rank plan (:data:`RANK_PLAN`, :mod:`.order`) and, with
``node_ranks`` = the node's ranks (one reader per node, issue 24), the node plan
(:data:`.node.PLAN`, :mod:`.node`): its spans are tagged (:class:`.node.EpochSpans`) so that a
node client reads them through the node's reader. The same guarantees; other orders.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from imagenet_seq.plan import node, order
from imagenet_seq.plan.order import slice_spans

__all__ = ["Plan", "merge_ids", "slice_spans", "RANK_PLAN"]

#: The name a resume state carries for today's per-rank plan (a state without one: this plan).
RANK_PLAN = "rank-1"


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
    """Which records one rank reads in an epoch, and in which order.

    Attributes:
        num_records: records in the split.
        mode: ``'train'`` (equal shares) or ``'val'`` (contiguous slices, every record once).
        seed: the randomness of the order (and, in the Loader, of the augmentation).
        rank, world_size: this rank's place in the job.
        shuffle: permute chunks and mix them through the shuffle buffer.
        chunk_size: records per contiguous read (``order.DEFAULT_CHUNK_RECORDS``: automatic).
        buffer_size: shuffle buffer in records (used only with ``shuffle``; <= 1: none).
        node_ranks: 0: today's per-rank plan; ``L`` >= 2: the node plan of nodes of ``L``
            consecutive ranks (read through one node reader).

    Raises:
        ValueError: a combination no epoch can have (:func:`order.check`).
    """

    num_records: int
    mode: str = "train"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    chunk_size: int = order.DEFAULT_CHUNK_RECORDS
    buffer_size: int = 0
    node_ranks: int = 0

    def __post_init__(self) -> None:
        order.check(self.num_records, self.mode, self.rank, self.world_size, self.seed,
                    self.chunk_size)
        if self.node_ranks:
            first = self.rank - self.rank % self.node_ranks
            node.check_layout(self.world_size, range(first, first + self.node_ranks))

    @property
    def name(self) -> str:
        """The plan's name (a resume state carries it): :data:`RANK_PLAN` or ``node.PLAN``."""
        return node.PLAN if self.node_ranks else RANK_PLAN

    def _node_args(self) -> dict:
        return dict(seed=self.seed, rank=self.rank, world_size=self.world_size,
                    local_world_size=self.node_ranks, shuffle=self.shuffle,
                    chunk_size=self.chunk_size)

    @property
    def shuffled(self) -> bool:
        """Records go through a shuffle buffer (``shuffle`` and a buffer of 2 or more)."""
        return self.shuffle and self.buffer_size > 1

    @property
    def records(self) -> int:
        """Records this rank reads per epoch (train: ``N // W``; val: its slice)."""
        return order.rank_records(self.num_records, self.mode, self.rank, self.world_size)

    def for_rank(self, rank: int) -> "Plan":
        """The same plan for another rank of the job."""
        return dataclasses.replace(self, rank=rank)

    def spans(self, epoch: int) -> List[order.Span]:
        if self.node_ranks:
            return node.epoch_spans(self.num_records, self.mode, epoch=epoch,
                                    **self._node_args())
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
        if self.node_ranks:
            return node.epoch_spans(self.num_records, self.mode, epoch=epoch,
                                    position=position, **self._node_args())
        spans = self.spans(epoch)
        return slice_spans(spans, position, sum(c for _, c in spans))

    def shuffle_rng(self, epoch: int) -> np.random.Generator:
        """The shuffle buffer's randomness in ``epoch``."""
        return order.shuffle_rng(self.seed, epoch, self.rank)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Record indices in the order this rank yields them in ``epoch`` (no data read)."""
        if self.node_ranks:
            return node.epoch_order(self.num_records, self.mode, epoch=epoch,
                                    buffer_size=self.buffer_size, **self._node_args())
        return order.epoch_order(self.num_records, self.mode, seed=self.seed, epoch=epoch,
                                 rank=self.rank, world_size=self.world_size,
                                 shuffle=self.shuffle, chunk_size=self.chunk_size,
                                 buffer_size=self.buffer_size)
