"""The node reader's one sweep: the ranks' requests merged into a single reading order.

A rank asks for pieces ``(start, count, key)`` in its reading order, keys non-decreasing: the
node plan's ``key = epoch << 32 | place in the node sweep``
(:meth:`imagenet_seq.plan.node.NodePlan.pieces`). :func:`merge` orders every active request's
remaining pieces by key (ties: in the order the requests are given), so the disk reads the node
sweep forward, each rank still gets its pieces in its own order, the ranks of an epoch are
served before anyone's next epoch, and a rank that is behind (joined late, resumed) is served
first until it is back in step. Pure: no I/O, testable with plain arrays.
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Request", "merge", "check_pieces", "key"]


def key(epoch: int, place: int) -> int:
    """The sweep key of a piece: epochs in order, then places in the epoch's node sweep."""
    return (epoch << 32) | place


class Request:
    """One rank's request: its pieces (an ``(n, 3)`` int64 array: start, count, key), how many
    records of them were delivered, whether it was cancelled. ``owner`` is the reader's
    handle on the rank."""

    def __init__(self, owner, req: int, pieces: np.ndarray):
        self.owner, self.id = owner, req
        self.starts, self.counts, self.keys = pieces[:, 0], pieces[:, 1], pieces[:, 2]
        self.cum = np.concatenate(([0], np.cumsum(self.counts)))
        self.delivered = 0
        self.cancelled = False
        self.t0 = time.monotonic()

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def at_piece_end(self) -> bool:
        """Whether the records delivered so far end a piece."""
        return bool(self.delivered == self.cum[np.searchsorted(self.cum, self.delivered)])

    def holds(self, record: int) -> bool:
        return bool(((self.starts <= record) & (record < self.starts + self.counts)).any())

    def remaining(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pieces not yet delivered (the first one cut to what is left of it)."""
        k = int(np.searchsorted(self.cum, self.delivered, "right")) - 1
        starts, counts = self.starts[k:].copy(), self.counts[k:].copy()
        cut = self.delivered - int(self.cum[k])
        if len(starts):
            starts[0] += cut
            counts[0] -= cut
        return starts, counts, self.keys[k:]


def merge(requests: Sequence[Request]) -> List[Tuple[Request, int, int]]:
    """Every request's remaining pieces as ``(request, start, count)`` in key order."""
    parts = [(q, q.remaining()) for q in requests if q.delivered < q.total]
    if not parts:
        return []
    keys = np.concatenate([k for _, (_, _, k) in parts])
    owners = np.concatenate([np.full(len(k), i) for i, (_, (_, _, k)) in enumerate(parts)])
    starts = np.concatenate([s for _, (s, _, _) in parts])
    counts = np.concatenate([c for _, (_, c, _) in parts])
    order = np.argsort(keys, kind="stable")
    return [(parts[owners[j]][0], int(starts[j]), int(counts[j])) for j in order]


def check_pieces(pieces: np.ndarray, num_records: int) -> Optional[str]:
    """What is wrong with a request's pieces (None: nothing)."""
    if pieces.ndim != 2 or pieces.shape[1] != 3:
        return f"pieces of shape {pieces.shape}, not (n, 3)"
    starts, counts, keys = pieces[:, 0], pieces[:, 1], pieces[:, 2]
    if (starts < 0).any() or (counts < 1).any() or (starts + counts > num_records).any():
        return f"records outside 0..{num_records} (or empty pieces)"
    if (np.diff(keys) < 0).any():
        return "pieces whose sweep keys go backwards"
    return None
