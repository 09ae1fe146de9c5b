"""One pass of a :class:`~imagenet_seq.loader.loader.Loader` over an epoch: the reader thread
that runs plan -> read -> shuffle -> batch (:func:`record_batches`) and hands raw batches to
the Loader's decode stage (whose workers outlive the pass), and the iterator that hands the
decoded, finished batches out in order, ``len(loader)`` of them (from batch ``start`` on, after
a resume), raising (never hanging) when reading or a worker fails, or when no batch comes for
``stall_timeout`` seconds.

A Loader runs one pass at a time (one disk reader, one set of workers): ``iter(loader)`` stops
the pass before it, and that older iterator then raises :class:`Superseded` instead of ending
early as if its epoch were complete (``zip(L, L)``, a nested loop over one Loader, two threads).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple

import lmdb
import torch

from imagenet_seq import format as fmt
from imagenet_seq.decode.batch import pack_batch
from imagenet_seq.loader.batcher import Batcher
from imagenet_seq.plan import order
from imagenet_seq.plan.shuffle import ShuffleBuffer
from imagenet_seq.read.stage import Read, read_records

if TYPE_CHECKING:
    from imagenet_seq.loader.loader import Loader


def record_batches(loader: "Loader", epoch: int, start: int,
                   stop: threading.Event) -> Batcher:
    """plan -> read -> shuffle -> batch for one pass, from batch ``start`` of ``epoch``.

    A resume (``start > 0``) replays the shuffle on record ids (no data) up to stream position
    ``start * batch_size``, reads again only the records the shuffle buffer holds at that
    point (at most ``buffer_size``, as sorted forward spans), and reads the rest of the epoch
    from where the uninterrupted pass would have been: nothing before it is decoded again.
    """
    plan, reader, size = loader.plan, loader.reader, loader.buffer_size
    total, pos = len(loader), start * loader.batch_size
    shuffled = loader.shuffle and size > 1
    if not shuffled:
        items = iter(Read(reader, plan.spans_from(epoch, pos) if pos else plan.spans(epoch),
                          stop))
    else:
        buf = ShuffleBuffer(size, order.shuffle_rng(loader.seed, epoch, loader.rank))
        if pos:
            consumed = buf.fast_forward(plan.ids(epoch).tolist(), pos)
            records = read_records(reader, buf.pending_ids(), stop)
            buf.fill(records.__getitem__)
            del records
            items = buf.run(Read(reader, plan.spans_from(epoch, consumed), stop))
        else:
            items = buf.run(Read(reader, plan.spans(epoch), stop))
    return Batcher(items, loader.batch_size, total, start, stop)


class _Feeder:
    """The reader thread: batches of records -> raw batches -> decode stage, ``prefetch``
    ahead. Holds no reference to the iterator, so dropping the iterator frees everything.
    """

    def __init__(self, loader: "Loader", epoch: int, start: int, decode):
        self.loader, self.epoch, self.start, self.decode = loader, epoch, start, decode
        self.image_size = loader.image_size
        self.stop = threading.Event()
        self.slots = threading.Semaphore(loader.prefetch)
        self.error: Optional[BaseException] = None
        self.submitted = start
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name="imagenet_seq-reader")
        self.thread.start()

    def run(self) -> None:
        try:
            checksums = self.loader.reader.checksums if self.loader.verify else None
            for index, items in record_batches(self.loader, self.epoch, self.start, self.stop):
                # a free slot first: batch i reuses the shared input slot of batch i - prefetch
                while not self.slots.acquire(timeout=0.2):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                dest = self.decode.input_slot(index)
                raw = pack_batch(index, items, *(dest or (None, -1)), checksums=checksums,
                                 epoch=self.epoch, image_size=self.image_size)
                self.decode.submit(raw)
                self.submitted += 1
        except BaseException as e:  # noqa: BLE001 - re-raised in the iterating thread
            self.error = e

    def check(self, index: int) -> None:
        """Raise instead of waiting for a batch that will never come."""
        path = self.loader.reader.path
        if isinstance(self.error, (fmt.DamagedFile, fmt.RecordError)):
            raise self.error  # names the file, the record and the fix already
        if isinstance(self.error, lmdb.Error):  # a page LMDB found damaged
            raise fmt.damaged(path, self.error) from self.error
        if self.error is not None:
            raise RuntimeError(f"reading {path} failed: {type(self.error).__name__}: "
                               f"{self.error}") from self.error
        if not self.thread.is_alive() and index >= self.submitted:
            raise RuntimeError(f"batch {index} was never read from {path}; "
                               "the file ended early")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10.0)
        self.decode.end()  # drop this pass's batches in flight; the workers stay
        if not self.thread.is_alive():
            # drop this epoch's reference to the shared environment and its read-ahead fd
            self.loader.reader.close()


@dataclass
class Position:
    """Where a pass is: its epoch and the batches it has handed out (what a resume needs)."""

    epoch: int
    batches: int


class Superseded(RuntimeError):
    """This iterator's pass was stopped by a newer ``iter(loader)``."""


class EpochIterator:
    """One pass over this rank's share: batches in order, ``len(loader)`` of them."""

    def __init__(self, loader: "Loader", epoch: int, start: int = 0):
        self.loader = loader
        self.epoch = epoch
        self.total = len(loader)
        self.next_index = start
        self.position = Position(epoch, start)
        decode = loader.decode_stage()
        decode.begin()
        self._feeder = _Feeder(loader, epoch, start, decode)
        self._closed = False
        self._superseded = False

    def __iter__(self) -> "EpochIterator":
        return self

    @property
    def finished(self) -> bool:
        """Every batch of the pass was handed out."""
        return self.next_index >= self.total

    @property
    def running(self) -> bool:
        """Started, not finished, not closed (a ``break`` closes it when it is dropped)."""
        return not self._closed and not self.finished

    def __next__(self) -> Tuple[Any, torch.Tensor]:
        if self._superseded:
            raise self._superseded_error()
        if self.next_index >= self.total or self._closed:
            self.close()
            raise StopIteration
        index = self.next_index
        since = time.monotonic()
        try:
            res = self._feeder.decode.get(index, lambda: self._check(index, since))
        except BaseException:
            self.close()
            if self._superseded:  # the pool was closed under us: say why, not how
                raise self._superseded_error() from None
            raise
        self._feeder.slots.release()
        self.next_index += 1
        self.position.batches = self.next_index
        if self.next_index == self.total:
            self.close()
        return self.loader.finish(res)

    def _check(self, index: int, since: float) -> None:
        """Called while waiting for batch ``index``: raise rather than wait for ever."""
        if self._superseded:
            raise self._superseded_error()
        self._feeder.check(index)
        limit = self.loader.stall_timeout
        waited = time.monotonic() - since
        if limit is not None and waited > limit:
            what = self._feeder.decode.describe()
            reader = "still reading" if self._feeder.thread.is_alive() else "done"
            raise RuntimeError(
                f"no batch for {waited:.0f} s (batch {index} of {self.total}, epoch "
                f"{self.epoch}, {self.loader.reader.path}): {what}; the reader is {reader}, "
                f"{self._feeder.submitted} batches sent. If the data is just slow (a busy "
                "network share, a slow transform), pass a larger Loader(stall_timeout=...) "
                "(None waits for ever)")

    def _superseded_error(self) -> Superseded:
        return Superseded(
            f"this pass over {self.loader.reader.path} (epoch {self.epoch}) was stopped after "
            f"{self.next_index} of {self.total} batches by a newer iter(loader): a Loader runs "
            "one pass at a time (one disk reader, one set of workers). For two passes at once "
            "(zip(L, L), a loop over L inside a loop over L, two threads), make a second Loader")

    def supersede(self) -> None:
        """Stop this pass because a newer one starts; its next ``next()`` raises."""
        self._superseded = True
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._feeder.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
