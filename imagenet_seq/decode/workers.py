"""Decode workers: whole raw batches in, decoded batches out, in batch order.

Three pools share one interface (``submit(raw)``, ``get(index)``, ``reset()``, ``close()``).
A pool lives as long as its Loader: the epoch and the output size travel with every batch
(:class:`~imagenet_seq.decode.batch.RawBatch`), ``reset()`` drops what one pass left in flight
(a ``break``) so the next pass starts clean, ``close()`` ends the workers.

* :class:`InlinePool` decodes in the caller (``num_workers=0``: debugging, profiling);
* :class:`ThreadPool`: N threads (OpenCV releases the GIL while decoding/resizing);
* :class:`ProcessPool`: N forked processes. Raw JPEG bytes travel in one shared-memory tensor per
  batch, decoded images come back as shared-memory tensors (no pickling of pixels). Workers get
  ``PR_SET_PDEATHSIG=SIGKILL`` so they die with the trainer even after ``kill -9``. The kernel
  sends it when the *thread* that forked a worker ends, so every worker is forked by one
  thread that lives as long as the process (:func:`start_processes`), not by whichever thread
  called ``iter(loader)`` (a short-lived helper thread would take the workers with it).

What a worker does with one batch is :func:`imagenet_seq.decode.batch.decode_batch`.

Why not tensorpack's ``MultiProcessMapDataZMQ``: it pickles every decoded array through ZMQ, does
not keep order unless ``strict=True`` and hung on a finite input with ``strict=False``; the loader
needs ordered results, per-record error reports and shared-memory output, which take less code
here than around it.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from imagenet_seq.decode.batch import DecodedBatch, DecodeSpec, RawBatch, decode_batch
# the process pool lives in its own module; these names stay importable from here
from imagenet_seq.decode.processes import (ProcessPool, SlotRing, set_pdeathsig,  # noqa: F401
                                           start_processes)

__all__ = ["InlinePool", "ThreadPool", "ProcessPool", "SlotRing", "set_pdeathsig",
           "start_processes"]
_POLL_S = 0.5


class _InOrder:
    """What was submitted, by batch index, for ``get`` to wait on (inline and thread pools)."""

    def __init__(self):
        self._items: Dict[int, Any] = {}
        self._cond = threading.Condition()

    def input_slot(self, index: int) -> Optional[Tuple[np.ndarray, int]]:
        return None

    def _put(self, index: int, item: Any) -> None:
        with self._cond:
            self._items[index] = item
            self._cond.notify_all()

    def _take(self, index: int, check: Callable[[], None]) -> Any:
        with self._cond:
            while index not in self._items:
                check()
                self._cond.wait(_POLL_S)
            return self._items.pop(index)

    def _drain(self) -> list:
        with self._cond:
            items = list(self._items.values())
            self._items.clear()
        return items


class InlinePool(_InOrder):
    """Decode in the thread that asks for the batch (``num_workers=0``, or a raw-batch decoder).

    Args:
        decode: ``raw -> DecodedBatch``; e.g. ``functools.partial(decode_batch, spec=spec)``.
    """

    def __init__(self, decode: Callable[[RawBatch], DecodedBatch]):
        super().__init__()
        self._decode = decode

    def submit(self, raw: RawBatch) -> None:
        self._put(raw.index, raw)

    def get(self, index: int, check: Callable[[], None] = lambda: None) -> DecodedBatch:
        return self._decode(self._take(index, check))

    def reset(self) -> None:
        self._drain()

    def close(self) -> None:
        self._drain()


class ThreadPool(_InOrder):
    """``num_workers`` decode threads in this process."""

    def __init__(self, spec: DecodeSpec, num_workers: int):
        super().__init__()
        self.spec = spec
        self._exec = ThreadPoolExecutor(num_workers, thread_name_prefix="imagenet_seq-decode")

    def submit(self, raw: RawBatch) -> None:
        self._put(raw.index, self._exec.submit(decode_batch, raw, self.spec))

    def get(self, index: int, check: Callable[[], None] = lambda: None) -> DecodedBatch:
        fut = self._take(index, check)
        while True:  # a decode that never returns is a stall the check reports
            try:
                return fut.result(timeout=_POLL_S)
            except FutureTimeout:
                check()

    def reset(self) -> None:
        """Cancel queued batches; running ones finish into futures nobody holds (their
        outputs are fresh tensors, so nothing is shared with the next pass)."""
        for fut in self._drain():
            fut.cancel()

    def close(self) -> None:
        self.reset()
        self._exec.shutdown(wait=True, cancel_futures=True)
