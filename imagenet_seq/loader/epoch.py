"""Running a Loader's passes: the decode stage (workers that outlive a pass), one pass at a
time, and the iterator that hands a pass's decoded, finished batches out in order.

:class:`Passes` is the running part of a Loader. It makes the decode stage for the settings
on the first pass (:func:`decode_stage`), starts each pass from the Loader's
:class:`~.state.Cursor` (its epoch and resume point), adopts what the previous pass read ahead
into this epoch (``overlap_epochs``) and stops an unfinished earlier pass. The pass itself is a
:class:`~.feeder.Feeder` (the reader thread: plan -> read -> shuffle -> batch -> decode stage)
and an :class:`EpochIterator`, which takes the decoded batches in order, ``len(loader)`` of
them (from batch ``start`` on, after a resume), through the finish stage, raising (never
hanging) when reading or a worker fails, or when no batch comes for ``stall_timeout`` seconds.

A pass starts at its first ``next()`` (:class:`LazyPass`: ``iter(loader)`` alone decides
nothing) and stops the pass before it; that older iterator then raises :class:`Superseded`
instead of ending early as if its epoch were complete (``zip(L, L)``, a nested loop over one
Loader, two threads).
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, List, Optional, Tuple

import torch

from imagenet_seq.decode.batch import DecodeSpec
from imagenet_seq.decode.stage import Decode
from imagenet_seq.loader.config import Current, Settings
from imagenet_seq.loader.feeder import Feeder, Segment, shutdown
from imagenet_seq.loader.finish import Finish
from imagenet_seq.loader.state import Cursor, Position
from imagenet_seq.malloc import trim

__all__ = ["Passes", "EpochIterator", "LazyPass", "Superseded", "decode_stage"]


def decode_stage(settings: Settings) -> Decode:
    """The decode stage for ``settings`` (no worker started yet: ``begin()`` starts them)."""
    dec, path, shards = settings.decode, settings.data.path, settings.data.shard_starts
    if dec.decoder == "cpu":
        spec = DecodeSpec(dec.transform, settings.order.plan.seed, 0, dec.collate,
                          dec.channels_last, dec.skip_broken, path, shards)
        if dec.num_workers and dec.worker_type == "process":
            trim()  # freed memory of this process: not into the forked workers
        batch, mean = settings.order.batch_size, settings.data.mean_record_bytes
        return Decode(spec, dec.num_workers, dec.worker_type,
                      prefetch=settings.runtime.prefetch, batch_size=batch,
                      slot_bytes=int(2 * batch * mean) + (4 << 20),
                      touch_bytes=int(batch * mean), pin_memory=settings.device.pin,
                      source=path)
    if dec.decoder != "dali":
        return Decode(external=dec.decoder, source=path, shards=shards)
    from imagenet_seq.decode.dali import DaliDecoder  # lazily: nvidia-dali is an optional extra

    plan = settings.order.plan
    dali = DaliDecoder(device=settings.device.device, output="uint8",
                       skip_broken=dec.skip_broken, rank=plan.rank, mode=settings.data.mode,
                       batch_size=settings.order.batch_size, image_size=dec.image_size,
                       resize_size=dec.resize_size, scale=dec.scale, ratio=dec.ratio,
                       seed=plan.seed, channels_last=dec.channels_last)
    return Decode(external=dali, source=path, sized=True,  # follows each batch's image size
                  shards=shards)


class Superseded(RuntimeError):
    """This iterator's pass was stopped by a newer ``iter(loader)``."""


class Passes:
    """The running part of one Loader: its decode stage, the feeder reading ahead into the
    next epoch (``carry``), and the one live pass.

    The workers start with the first pass and live until :meth:`close`, or until neither the
    Loader nor a pass of it is left (a finaliser: ``close()`` need not be called).
    """

    def __init__(self, reader: Any, finish: Finish):
        self.reader, self.finish = reader, finish
        self.decode: Optional[Decode] = None
        self.carry: List[Any] = [None]  # (feeder, its last segment) reading ahead, or None
        self._end: Optional[weakref.finalize] = None
        # weak: an abandoned iterator (``next(iter(loader))``) is freed at once, stopping its
        # workers and closing the LMDB environment
        self._live: Optional[weakref.ref] = None
        self._lock = threading.Lock()

    def live(self) -> Optional["EpochIterator"]:
        """The last pass started, while its iterator exists."""
        return self._live() if self._live is not None else None

    def start(self, current: Current, cursor: Cursor) -> "EpochIterator":
        """A pass from where ``cursor`` stands, with the settings ``current`` holds."""
        settings = current.settings
        with self._lock:  # two threads starting passes: one stops the other, never both
            old = self.live()
            if old is not None:  # `break` earlier: stop its workers before starting new ones
                old.supersede()  # and if it is still iterated, it says so (not a short epoch)
            epoch, start = cursor.start_pass()
            carry, self.carry[0] = self.carry[0], None
            if carry is not None:  # the last pass read on into the next epoch: this one?
                following = carry[0].continues(epoch, start, settings.decode.image_size,
                                               carry[1])
                if following is None:
                    carry[0].close()
                carry = None if following is None else (carry[0], following)
            if carry is None:  # a feeder of its own, on the workers of the Loader
                if self.decode is None:
                    self.decode = decode_stage(settings)
                    self._end = weakref.finalize(self, shutdown, self.carry, self.decode)
                self.decode.begin()
                feeder = Feeder(current, self.reader, epoch, start, self.decode)
                carry = (feeder, feeder.segments[0])
            it = EpochIterator(self, settings, epoch, start, *carry)
            cursor.position = it.position
            self._live = weakref.ref(it)
        return it

    def drop_read_ahead(self) -> None:
        """Stop a feeder reading ahead (its batches are not what comes next)."""
        shutdown(self.carry, None)

    def close(self) -> None:
        """End an unfinished pass, a feeder reading ahead and the decode workers."""
        with self._lock:
            it = self.live()
            self._live = None
        if it is not None:
            it.close()
        shutdown(self.carry, None)
        if self._end is not None:
            self._end()  # Decode.close, once
            self.decode = self._end = None


class EpochIterator:
    """One pass over this rank's share: batches in order, ``len(loader)`` of them."""

    def __init__(self, passes: Passes, settings: Settings, epoch: int, start: int,
                 feeder: Feeder, segment: Segment):
        self._passes = passes  # its workers live as long as the pass
        self.settings, self.epoch = settings, epoch
        self.total = settings.order.batches
        self.next_index = start
        self.position = Position(epoch, start)
        # the feeder reading this epoch (the previous pass's, when it read on into this one)
        # and this epoch's segment of its stream
        self._feeder, self._segment = feeder, segment
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
            if self.settings.runtime.overlap_epochs and self._feeder.error is None:
                self._closed = True  # the feeder goes on into the next epoch: hand it on
                self._passes.carry[0] = (self._feeder, self._segment)
            else:
                self.close()
        return self._passes.finish(res)

    def _check(self, index: int, since: float) -> None:
        """Called while waiting for batch ``index``: raise rather than wait for ever."""
        if self._superseded:
            raise self._superseded_error()
        self._feeder.check(self.base + index)
        limit = self.settings.runtime.stall_timeout
        waited = time.monotonic() - since
        if limit is not None and waited > limit:
            what = self._feeder.decode.describe()
            reader = "still reading" if self._feeder.thread.is_alive() else "done"
            raise RuntimeError(
                f"no batch for {waited:.0f} s (batch {index} of {self.total}, epoch "
                f"{self.epoch}, {self.settings.data.path}): {what}; the reader is {reader}, "
                f"{self._feeder.submitted} batches sent. If the data is just slow (a busy "
                "network share, a slow transform), pass a larger Loader(stall_timeout=...) "
                "(None waits for ever)")

    def _superseded_error(self) -> Superseded:
        return Superseded(
            f"this pass over {self.settings.data.path} (epoch {self.epoch}) was stopped after "
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
