"""One epoch of a :class:`~imagenet_seq.loader.Loader`: the reader thread that turns the epoch's
plan into raw batches for the worker pool, and the iterator that hands the decoded batches out
in order, ``len(loader)`` of them, raising (never hanging) when reading or a worker fails.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch

from .batch import pack_batch

if TYPE_CHECKING:
    from .loader import Loader


class _Feeder:
    """The reader thread: plan -> records -> shuffle -> raw batches -> pool, ``prefetch`` ahead.

    Holds no reference to the iterator, so dropping the iterator frees everything.
    """

    def __init__(self, loader: "Loader", epoch: int, pool):
        self.loader, self.epoch, self.pool = loader, epoch, pool
        self.stop = threading.Event()
        self.slots = threading.Semaphore(loader.prefetch)
        self.error: Optional[BaseException] = None
        self.submitted = 0
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name="imagenet_seq-reader")
        self.thread.start()

    def run(self) -> None:
        try:
            batches = self.loader._record_batches(self.epoch, self.stop)
            for index, items in enumerate(batches):
                # a free slot first: batch i reuses the shared input slot of batch i - prefetch
                while not self.slots.acquire(timeout=0.2):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                dest = self.pool.input_slot(index)
                raw = pack_batch(index, items, *(dest or (None, -1)))
                self.pool.submit(raw)
                self.submitted += 1
        except BaseException as e:  # noqa: BLE001 - re-raised in the iterating thread
            self.error = e

    def check(self, index: int) -> None:
        """Raise instead of waiting for a batch that will never come."""
        path = self.loader.reader.path
        if self.error is not None:
            raise RuntimeError(f"reading {path} failed: {type(self.error).__name__}: "
                               f"{self.error}") from self.error
        if not self.thread.is_alive() and index >= self.submitted:
            raise RuntimeError(f"batch {index} was never read from {path}; "
                               "the file ended early")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10.0)
        self.pool.close()
        if not self.thread.is_alive():
            # drop this epoch's reference to the shared environment and its read-ahead fd
            self.loader.reader.close()


class EpochIterator:
    """One pass over this rank's share: batches in order, ``len(loader)`` of them."""

    def __init__(self, loader: "Loader", epoch: int):
        self.loader = loader
        self.total = len(loader)
        self.next_index = 0
        self._feeder = _Feeder(loader, epoch, loader._make_pool(epoch))
        self._closed = False

    def __iter__(self) -> "EpochIterator":
        return self

    def __next__(self) -> Tuple[Any, torch.Tensor]:
        if self.next_index >= self.total or self._closed:
            self.close()
            raise StopIteration
        index = self.next_index
        try:
            res = self._feeder.pool.get(index, lambda: self._feeder.check(index))
        except BaseException:
            self.close()
            raise
        self._feeder.slots.release()
        self.next_index += 1
        if self.next_index == self.total:
            self.close()
        return self.loader._finish(res)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._feeder.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
