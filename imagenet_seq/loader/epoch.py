"""One pass of a :class:`~imagenet_seq.loader.loader.Loader` over an epoch: the reader thread
that runs plan -> read -> shuffle -> batch (:func:`record_batches`) and hands raw batches to
the Loader's decode stage (whose workers outlive the pass), and the iterator that hands the
decoded, finished batches out in order, ``len(loader)`` of them (from batch ``start`` on, after
a resume), raising (never hanging) when reading or a worker fails, or when no batch comes for
``stall_timeout`` seconds.

A Loader runs one pass at a time (one disk reader, one set of workers): a pass starts at its
first ``next()`` (:class:`LazyPass`: ``iter(loader)`` alone decides nothing) and stops the pass
before it, and that older iterator then raises :class:`Superseded` instead of ending
early as if its epoch were complete (``zip(L, L)``, a nested loop over one Loader, two threads).
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

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


def record_batches(loader: "PassConfig", epoch: int, start: int,
                   stop: threading.Event) -> Batcher:
    """plan -> read -> shuffle -> batch for one pass, from batch ``start`` of ``epoch``.

    A resume (``start > 0``) replays the shuffle on record ids (no data) up to stream position
    ``start * batch_size``, reads again only the records the shuffle buffer holds at that
    point (at most ``buffer_size``, as sorted forward spans), and reads the rest of the epoch
    from where the uninterrupted pass would have been: nothing before it is decoded again.
    """
    plan, reader, size = loader.plan, loader.reader, loader.buffer_size
    total, pos = loader.total, start * loader.batch_size
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


@dataclass
class PassConfig:
    """What a feeder needs of its Loader (not the Loader itself: a feeder reading ahead into
    the next epoch must not keep an unused Loader alive)."""

    reader: Any
    plan: Any
    batch_size: int
    total: int
    buffer_size: int
    shuffle: bool
    seed: int
    rank: int
    prefetch: int
    checksums: Any  # the stored checksums to verify, or None

    @classmethod
    def of(cls, loader: "Loader") -> "PassConfig":
        return cls(loader.reader, loader.plan, loader.batch_size, len(loader),
                   loader.buffer_size, loader.shuffle, loader.seed, loader.rank,
                   loader.prefetch, loader.reader.checksums if loader.verify else None)


@dataclass
class Segment:
    """One epoch in a feeder's stream of batches: global batch ``base + i`` is its batch ``i``."""

    epoch: int
    base: int
    image_size: int


class _Feeder:
    """The reader thread: batches of records -> raw batches -> decode stage, ``prefetch``
    ahead. Holds no reference to the iterator, so dropping the iterator frees everything.

    Epochs back to back (``overlap_epochs``): once the last batch of its epoch is submitted,
    the feeder goes on with epoch ``e + 1`` from batch 0 -- the next epoch's reads, shuffle
    buffer fill and first decodes overlap this epoch's tail. Batches are numbered globally
    (one stream, one ``prefetch`` window, one set of ring slots), so the tail and the head
    share the window: memory across the boundary stays within the steady-state bound (the
    buffer of epoch ``e`` is empty once its last batch is submitted; only then does ``e + 1``'s
    fill). The next ``iter(loader)`` adopts the feeder when it asks for epoch ``e + 1`` from
    batch 0 at the same image size (:meth:`continues`); anything else closes it.
    """

    def __init__(self, loader: "Loader", epoch: int, start: int, decode):
        self.cfg, self.decode = PassConfig.of(loader), decode
        self._loader = weakref.ref(loader)  # live settings of the next epoch (image size)
        self.segments = [Segment(epoch, 0, loader.image_size)]
        self.start = start
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.slots = threading.Semaphore(loader.prefetch)
        self.error: Optional[BaseException] = None
        self.error_at = 1 << 62  # the first global batch the error concerns
        self.submitted = start
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name="imagenet_seq-reader")
        self.thread.start()

    def run(self) -> None:
        seg, start, total = self.segments[0], self.start, self.cfg.total
        checksums = self.cfg.checksums
        while True:
            try:
                for index, items in record_batches(self.cfg, seg.epoch, start, self.stop):
                    # a free slot first: batch i reuses the shared input slot of batch
                    # i - prefetch
                    while not self.slots.acquire(timeout=0.2):
                        if self.stop.is_set():
                            return
                    if self.stop.is_set():
                        return
                    k = seg.base + index
                    dest = self.decode.input_slot(k)
                    raw = pack_batch(k, items, *(dest or (None, -1)), checksums=checksums,
                                     epoch=seg.epoch, image_size=seg.image_size)
                    self.decode.submit(raw)
                    self.submitted = k + 1
            except BaseException as e:  # noqa: BLE001 - re-raised in the iterating thread
                self.error, self.error_at = e, self.submitted
                return
            loader = self._loader()
            with self.lock:
                if loader is None or self.stop.is_set() or not loader.overlap_epochs:
                    return
                seg = Segment(seg.epoch + 1, seg.base + total, loader.image_size)
                self.segments.append(seg)
                start = 0
            del loader

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
        path = self.cfg.reader.path
        error = self.error if index >= self.error_at else None
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
            self.cfg.reader.close()


@dataclass
class Position:
    """Where a pass is: its epoch and the batches it has handed out (what a resume needs)."""

    epoch: int
    batches: int


class Superseded(RuntimeError):
    """This iterator's pass was stopped by a newer ``iter(loader)``."""


class EpochIterator:
    """One pass over this rank's share: batches in order, ``len(loader)`` of them."""

    def __init__(self, loader: "Loader", epoch: int, start: int = 0,
                 carry: Optional[Tuple["_Feeder", Segment]] = None):
        self.loader = loader
        self.epoch = epoch
        self.total = len(loader)
        self.next_index = start
        self.position = Position(epoch, start)
        if carry is not None:  # the previous pass already reads and decodes this epoch
            self._feeder, self._segment = carry
        else:
            decode = loader.decode_stage()
            decode.begin()
            self._feeder = _Feeder(loader, epoch, start, decode)
            self._segment = self._feeder.segments[0]
        self.base = self._segment.base  # this pass's batch i is the feeder's batch base + i
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
            res = self._feeder.decode.get(self.base + index,
                                          lambda: self._check(index, since))
        except BaseException:
            self.close()
            if self._superseded:  # the pool was closed under us: say why, not how
                raise self._superseded_error() from None
            raise
        self._feeder.slots.release()
        self.next_index += 1
        self.position.batches = self.next_index
        if self.next_index == self.total:
            if self.loader.overlap_epochs and self._feeder.error is None:
                self._closed = True  # the feeder goes on into the next epoch: hand it on
                self.loader.next_pass = (self._feeder, self._segment)
            else:
                self.close()
        return self.loader.finish(res)

    def _check(self, index: int, since: float) -> None:
        """Called while waiting for batch ``index``: raise rather than wait for ever."""
        if self._superseded:
            raise self._superseded_error()
        self._feeder.check(self.base + index)
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


class LazyPass:
    """What ``iter(loader)`` returns: the pass itself starts at the first ``next()``.

    Frameworks make iterators they never use (Lightning calls ``iter()`` twice, then
    ``set_epoch``, then iterates the second), and ``DataLoader`` + ``DistributedSampler`` read
    the epoch only when the first batch is asked for; so does this. Until then nothing is
    decided: the epoch, the resume point, the workers, the stopping of an earlier pass.
    """

    def __init__(self, start: Callable[[], EpochIterator]):
        self._start: Optional[Callable[[], EpochIterator]] = start
        self.started: Optional[EpochIterator] = None  # the pass, once the first batch is asked

    def __iter__(self) -> "LazyPass":
        return self

    def __next__(self) -> Tuple[Any, torch.Tensor]:
        if self.started is None:
            if self._start is None:  # closed before it started
                raise StopIteration
            self.started, self._start = self._start(), None
        return next(self.started)

    def close(self) -> None:
        """End the pass (or, unstarted, make sure it never starts)."""
        self._start = None
        if self.started is not None:
            self.started.close()


def shutdown(carry: List[Any], decode: Any = None) -> None:
    """Stop a feeder reading ahead (``carry[0]``), then the decode workers."""
    if carry[0] is not None:
        feeder, carry[0] = carry[0][0], None
        feeder.close()
    if decode is not None:
        decode.close()
