"""The decode stage: raw batches in, decoded batches out, in order -- one contract for every
decoder.

Whatever decodes (this package's OpenCV path inline, in a thread pool or in a process pool;
DALI; a user's callable), a :class:`Decode` turns each :class:`~.batch.RawBatch` into a
:class:`~.batch.DecodedBatch` whose ``records`` are the records of its images, in order, and
whose ``skipped`` names every record left out (``(record, reason)``). Skip counting,
``last_batch_records``, pinning and ``device=`` normalisation downstream
(:mod:`imagenet_seq.loader.finish`) therefore behave the same for all of them.

Interface (every stage of the loader has the same shape):

* ``submit(raw)`` / ``get(index)``: hand in raw batches, take decoded ones in batch order
  (testable with a plain list of raw batches);
* ``begin()`` starts a pass and returns its number (stamped on its raw batches);
  ``end()`` drops what the pass left in flight. The workers stay: they live until ``close()``
  (persistent workers; the epoch and output size travel with each batch);
* no ``state()``: the stage holds nothing a resume needs (augmentation is a function of
  ``(seed, epoch, record)``, :func:`~.batch.augment_rng`).

External decoders (DALI, a callable) run in the thread that asks for the batch. A callable
gets ``(jpegs, labels)`` and returns ``(images, targets)``, or ``(images, targets, skipped)``
with ``skipped`` the positions (in the input batch) it left out; a decoder with a
``last_skipped`` attribute (:class:`~.dali.DaliDecoder`) names them there. A decoder that
returns fewer images than it got records without naming them is an error (the batch's
records could no longer be matched to its images).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch

from imagenet_seq.decode.batch import DecodedBatch, DecodeSpec, RawBatch, check_batch, decode_batch
from imagenet_seq.decode.workers import InlinePool, ProcessPool, ThreadPool

__all__ = ["Decode", "ExternalDecoder"]


class ExternalDecoder:
    """A raw-batch decoder (DALI, a callable) on the stage contract: raw batch -> decoded batch
    naming its skipped records. ``sized``: the decoder has ``set_image_size`` and follows each
    batch's ``image_size`` (DALI), as the built-in workers do."""

    def __init__(self, fn: Callable, source: str = "", sized: bool = False,
                 shards: tuple = ()):
        self.fn, self.source, self.sized, self.shards = fn, source, sized, shards

    def __call__(self, raw: RawBatch) -> DecodedBatch:
        check_batch(raw, self.source, self.shards)  # verify=True: checksums first
        if self.sized and raw.image_size is not None:
            self.fn.set_image_size(raw.image_size)
        n = len(raw.records)
        if hasattr(self.fn, "last_skipped"):
            self.fn.last_skipped = []
        out = self.fn(raw.jpegs(), raw.labels)
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TypeError(f"decoder {self.fn!r} returned {type(out).__name__}; expected "
                            "(images, targets) or (images, targets, skipped positions)")
        images, targets = out[0], out[1]
        skipped: Sequence[int] = out[2] if len(out) == 3 else \
            list(getattr(self.fn, "last_skipped", None) or [])
        skipped = sorted({int(i) for i in skipped})
        if any(not 0 <= i < n for i in skipped):
            raise ValueError(f"decoder {self.fn!r} named skipped positions {skipped} for a "
                             f"batch of {n} records")
        if not isinstance(targets, torch.Tensor):
            targets = torch.as_tensor(targets, dtype=torch.int64)
        if len(images) != n - len(skipped) or len(targets) != len(images):
            raise ValueError(
                f"decoder {self.fn!r} returned {len(images)} images and {len(targets)} targets "
                f"for {n} records with {len(skipped)} named as skipped; a decoder that leaves "
                "records out must name their positions (return (images, targets, skipped) or "
                "set .last_skipped), so the batch's records still match its images")
        keep = [i for i in range(n) if i not in set(skipped)]
        records = raw.records if not skipped else raw.records[keep]
        reason = getattr(self.fn, "skip_reason", "the decoder could not decode it")
        return DecodedBatch(raw.index, images, targets, records,
                            [(int(raw.records[i]), reason) for i in skipped])


class Decode:
    """The decode stage of one Loader; its workers live until ``close()``.

    Args:
        spec: the per-record work of the built-in path (``None`` with ``external``).
        num_workers: 0 decodes in the asking thread.
        worker_type: ``'thread'`` or ``'process'``.
        external: a raw-batch decoder (DALI, a callable): used instead of ``spec``, in the
            asking thread.
        sized: ``external`` follows each batch's image size (:class:`ExternalDecoder`).
        prefetch, batch_size, slot_bytes, touch_bytes, pin_memory: the process pool's rings.
    """

    def __init__(self, spec: Optional[DecodeSpec] = None, num_workers: int = 0,
                 worker_type: str = "thread", external: Optional[Callable] = None,
                 prefetch: int = 4, batch_size: int = 256, slot_bytes: int = 64 << 20,
                 touch_bytes: int = 0, pin_memory: bool = False, source: str = "",
                 sized: bool = False, shards: tuple = ()):
        self.spec, self.num_workers, self.worker_type = spec, num_workers, worker_type
        self.external = None if external is None else ExternalDecoder(external, source, sized,
                                                                      shards)
        self._pool_args = dict(slots=prefetch, batch_size=batch_size, in_slot_bytes=slot_bytes,
                               in_touch_bytes=touch_bytes, pin_memory=pin_memory)
        self.pool: Any = None
        self.run = 0
        self.forks = 0  # process pools started (1 per Loader unless one broke)

    def _make(self):
        if self.external is not None:
            return InlinePool(self.external)
        if self.num_workers == 0:
            return InlinePool(functools.partial(decode_batch, spec=self.spec))
        if self.worker_type == "thread":
            return ThreadPool(self.spec, self.num_workers)
        self.forks += 1
        return ProcessPool(self.spec, self.num_workers, **self._pool_args)

    def begin(self) -> int:
        """Start a pass (the workers, the first time); returns the pass number."""
        if self.pool is not None and getattr(self.pool, "broken", False):
            self.pool.close()  # a worker died or hung: a fresh set
            self.pool = None
        if self.pool is None:
            self.pool = self._make()
        self.run = getattr(self.pool, "run", self.run + 1)
        return self.run

    def input_slot(self, index: int):
        return self.pool.input_slot(index)

    def submit(self, raw: RawBatch) -> None:
        raw.run = self.run
        self.pool.submit(raw)

    def get(self, index: int, check: Callable[[], None] = lambda: None) -> DecodedBatch:
        return self.pool.get(index, check)

    def describe(self) -> str:
        return self.pool.describe() if hasattr(self.pool, "describe") else \
            "the decode stage returned nothing"

    def end(self) -> None:
        """Drop what this pass left in flight; the workers stay for the next pass."""
        if self.pool is not None:
            self.pool.reset()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
