"""The batch stage: items in, lists of ``batch_size`` items out, numbered from ``start``.

Batch boundaries are fixed by position in the (shuffled) record stream -- never by what the
decode stage later skips -- so a resume at batch ``k`` knows its first record is stream item
``k * batch_size``. At most ``total`` batches (``drop_last`` leaves the partial tail out).
Interface: iterate ``(index, items)``; ``next_index`` is the next batch's number. No state a
resume needs beyond the batch it starts at (``start``).
"""
from __future__ import annotations

import threading
from typing import Iterable, Iterator, List, Optional, Tuple

__all__ = ["Batcher"]


class Batcher:
    def __init__(self, items: Iterable, batch_size: int, total: int, start: int = 0,
                 stop: Optional[threading.Event] = None):
        self.items, self.batch_size, self.total = items, batch_size, total
        self.next_index, self.stop = start, stop

    def __iter__(self) -> Iterator[Tuple[int, List]]:
        if self.next_index >= self.total:
            return
        batch: List = []
        for item in self.items:
            batch.append(item)
            if len(batch) == self.batch_size:
                full, batch = batch, []
                self.next_index += 1
                yield self.next_index - 1, full
                if self.next_index >= self.total or (self.stop is not None and
                                                     self.stop.is_set()):
                    return
        if batch and self.next_index < self.total:
            self.next_index += 1
            yield self.next_index - 1, batch
