"""The reading side of a pass: plan -> read -> shuffle -> batch, and the thread that hands the
raw batches to the decode stage.

:func:`record_stream` is the one pass builder: the records of one rank's epoch in the order
the Loader yields them, from any stream position (a resume). The Loader's feeder batches it
(:func:`record_batches`); the DataFlow face (:mod:`imagenet_seq.integrations.tensorpack`)
yields it as it is. :class:`Feeder` runs it in a thread, packs each batch and submits it to
the decode stage, ``prefetch`` batches ahead, and with ``overlap_epochs`` goes on into the next
epoch. The consuming side, which hands decoded batches out in order, is :mod:`.epoch`.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import lmdb

from imagenet_seq import format as fmt
from imagenet_seq.decode.batch import pack_batch
from imagenet_seq.loader.batcher import Batcher
from imagenet_seq.loader.config import Current, Settings
from imagenet_seq.plan.shuffle import ShuffleBuffer
from imagenet_seq.plan.stage import Plan
from imagenet_seq.read import node_fault
from imagenet_seq.read.stage import Item, read, read_records

__all__ = ["record_stream", "record_batches", "Segment", "Feeder", "shutdown"]


def record_stream(plan: Plan, reader: Any, epoch: int, position: int = 0,
                  stop: Optional[threading.Event] = None) -> Iterator[Item]:
    """plan -> read -> shuffle: ``(record, jpeg bytes, label)`` of ``epoch`` in the order this
    rank yields them, from stream position ``position`` on.

    A resume (``position > 0``) replays the shuffle on record ids (no data) up to that
    position, reads again only the records the shuffle buffer holds at that point (at most
    ``buffer_size``, as sorted forward spans), and reads the rest of the epoch from where the
    uninterrupted pass would have been: nothing before it is read or decoded again.
    """
    if not plan.shuffled:
        return read(reader, plan.spans_from(epoch, position) if position else
                    plan.spans(epoch), stop)
    buf = ShuffleBuffer(plan.buffer_size, plan.shuffle_rng(epoch))
    if not position:
        return buf.run(read(reader, plan.spans(epoch), stop))
    consumed = buf.fast_forward(plan.ids(epoch).tolist(), position)
    records = read_records(reader, buf.pending_ids(), stop)
    buf.fill(records.__getitem__)
    del records
    return buf.run(read(reader, plan.spans_from(epoch, consumed), stop))


def record_batches(settings: Settings, reader: Any, epoch: int, start: int,
                   stop: threading.Event) -> Batcher:
    """The records of :func:`record_stream` in ``batch_size`` batches, from batch ``start``."""
    order = settings.order
    items = record_stream(order.plan, reader, epoch, start * order.batch_size, stop)
    return Batcher(items, order.batch_size, order.batches, start, stop)


@dataclass
class Segment:
    """One epoch in a feeder's stream of batches: global batch ``base + i`` is its batch ``i``."""

    epoch: int
    base: int
    image_size: int


class Feeder:
    """The reader thread: batches of records -> raw batches -> decode stage, ``prefetch``
    ahead. Holds no reference to the iterator, so dropping the iterator frees everything.

    Epochs back to back (``overlap_epochs``): once the last batch of its epoch is submitted,
    the feeder goes on with epoch ``e + 1`` from batch 0 -- the next epoch's reads, shuffle
    buffer fill and first decodes overlap this epoch's tail. Batches are numbered globally
    (one stream, one ``prefetch`` window, one set of ring slots), so the tail and the head
    share the window: memory across the boundary stays within the steady-state bound (the
    buffer of epoch ``e`` is empty once its last batch is submitted; only then does ``e + 1``'s
    fill). The next epoch's image size is the Loader's at that moment (``current``, held
    weakly: a Loader gone, no reading on). The next pass adopts the feeder when it asks for
    epoch ``e + 1`` from batch 0 at the same image size (:meth:`continues`); anything else
    closes it.
    """

    def __init__(self, current: Current, reader: Any, epoch: int, start: int, decode: Any):
        settings = current.settings
        self.settings, self.reader, self.decode = settings, reader, decode
        self._current = weakref.ref(current)
        # the stored checksums to verify, or None
        self.checksums = reader.checksums if settings.data.verify else None
        self.segments = [Segment(epoch, 0, settings.decode.image_size)]
        self.start = start
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.slots = threading.Semaphore(settings.runtime.prefetch)
        self.error: Optional[BaseException] = None
        self.error_at = 1 << 62  # the first global batch the error concerns
        self.submitted = start
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name="imagenet_seq-reader")
        self.thread.start()

    def run(self) -> None:
        seg, start, total = self.segments[0], self.start, self.settings.order.batches
        while True:
            try:
                for index, items in record_batches(self.settings, self.reader, seg.epoch,
                                                   start, self.stop):
                    # a free slot first: batch i reuses the shared input slot of batch
                    # i - prefetch
                    while not self.slots.acquire(timeout=0.2):
                        if self.stop.is_set():
                            return
                    if self.stop.is_set():
                        return
                    k = seg.base + index
                    dest = self.decode.input_slot(k)
                    raw = pack_batch(k, items, *(dest or (None, -1)), checksums=self.checksums,
                                     epoch=seg.epoch, image_size=seg.image_size)
                    self.decode.submit(raw)
                    self.submitted = k + 1
            except BaseException as e:  # noqa: BLE001 - re-raised in the iterating thread
                self.error, self.error_at = e, self.submitted
                return
            current = self._current()
            with self.lock:
                if current is None or self.stop.is_set() or \
                        not self.settings.runtime.overlap_epochs:
                    return
                seg = Segment(seg.epoch + 1, seg.base + total,
                              current.settings.decode.image_size)
                self.segments.append(seg)
                start = 0
            del current

    def continues(self, epoch: int, start: int, image_size: int, after: Segment) -> \
            Optional[Segment]:
        """The segment following ``after`` if it is what a new pass asks for, else None."""
        if start != 0 or self.error is not None:
            return None
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            with self.lock:
                nxt = [s for s in self.segments if s.base > after.base]
                if nxt:
                    s = nxt[0]
                    return s if (s.epoch, s.image_size) == (epoch, image_size) else None
            if not self.thread.is_alive() or self.stop.is_set():
                return None
            time.sleep(0.001)
        return None

    def check(self, index: int) -> None:
        """Raise instead of waiting for (global) batch ``index`` when it will never come."""
        path = self.settings.data.path
        error = self.error if index >= self.error_at else None
        if error is not None:  # the loop takes it: a node reader's fault ends no process now
            node_fault.taken(error)
        if isinstance(error, (fmt.DamagedFile, fmt.RecordError)):
            raise error  # names the file, the record and the fix already
        if isinstance(error, lmdb.Error):  # a page LMDB found damaged
            raise fmt.damaged(path, error) from error
        if error is not None:
            raise RuntimeError(f"reading {path} failed: {type(error).__name__}: "
                               f"{error}") from error
        if not self.thread.is_alive() and index >= self.submitted:
            raise RuntimeError(f"batch {index} was never read from {path}; "
                               "the file ended early")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10.0)
        self.decode.end()  # drop this pass's batches in flight; the workers stay
        if not self.thread.is_alive():
            # drop this epoch's reference to the shared environment and its read-ahead fd
            self.reader.close()


def shutdown(carry: List[Any], decode: Any = None) -> None:
    """Stop a feeder reading ahead (``carry[0]``: ``(feeder, segment)``), then the decode
    workers."""
    if carry[0] is not None:
        feeder, carry[0] = carry[0][0], None
        feeder.close()
    if decode is not None:
        decode.close()
