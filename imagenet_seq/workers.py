"""Decode workers: whole raw batches in, decoded batches out, in batch order.

Three pools share one interface (``submit(raw)``, ``get(index)``, ``close()``):

* :class:`InlinePool` decodes in the caller (``num_workers=0``: debugging, profiling);
* :class:`ThreadPool`: N threads (OpenCV releases the GIL while decoding/resizing);
* :class:`ProcessPool`: N forked processes. Raw JPEG bytes travel in one shared-memory tensor per
  batch, decoded images come back as shared-memory tensors (no pickling of pixels). Workers get
  ``PR_SET_PDEATHSIG=SIGKILL`` so they die with the trainer even after ``kill -9``.

Augmentation randomness is a function of ``(seed, epoch, record index)`` only, so the output does
not depend on the pool type, the worker count, or which worker got which batch.

Why not tensorpack's ``MultiProcessMapDataZMQ``: it pickles every decoded array through ZMQ, does
not keep order unless ``strict=True`` and hung on a finite input with ``strict=False``; the loader
needs ordered results, per-record error reports and shared-memory output, which take less code
here than around it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import queue
import signal
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5


@dataclass
class RawBatch:
    """One batch of undecoded records: record ``i``'s JPEG is ``jpeg(i)``.

    The bytes are either ``blobs`` (the records' own ``bytes`` objects: no copy, for pools in
    this process) or ``data[offsets[i]:offsets[i+1]]`` (one contiguous array, e.g. a process
    pool's shared input slot).
    """

    index: int
    records: np.ndarray  # int64 record indices (file positions)
    labels: np.ndarray  # int64
    offsets: np.ndarray  # int64, len(records) + 1
    data: Any  # 1-D uint8 numpy array (a view of a shared slot while ``slot >= 0``) or None
    slot: int = -1  # input slot of a process pool holding ``data``; -1: ``data`` travels itself
    blobs: Optional[List[bytes]] = None  # the JPEGs themselves when ``data`` is None

    def jpeg(self, i: int) -> Any:
        if self.blobs is not None:
            return self.blobs[i]
        return memoryview(self.data[self.offsets[i]:self.offsets[i + 1]])

    def jpegs(self) -> List[bytes]:
        return [bytes(self.jpeg(i)) for i in range(len(self.records))]


def pack_batch(index: int, items: Sequence[Tuple[int, bytes, int]],
               dest: Optional[np.ndarray] = None, slot: int = -1) -> RawBatch:
    """Records ``(index, jpeg, label)`` -> a :class:`RawBatch`.

    The bytes are copied into ``dest`` (a pool's shared input slot) when they fit; otherwise the
    batch keeps the records' ``bytes`` objects (no copy).
    """
    n = len(items)
    records, blobs, labels = zip(*items) if n else ((), (), ())
    sizes = np.fromiter(map(len, blobs), np.int64, count=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data, kept = None, list(blobs)
    if dest is not None and offsets[-1] <= len(dest):
        data, kept = dest[: offsets[-1]], None
        for k, jpeg in enumerate(blobs):
            data[offsets[k]:offsets[k + 1]] = np.frombuffer(jpeg, np.uint8)
    else:
        slot = -1
    return RawBatch(index, np.array(records, np.int64), np.array(labels, np.int64), offsets,
                    data, slot, kept)


class SlotRing:
    """Fixed shared-memory slots made before the workers fork (they inherit the mapping).

    An anonymous ``MAP_SHARED`` mapping: no file, no name, nothing left behind after
    ``kill -9``. ``touch`` bytes at the start of every slot are written once at creation, so
    the memory a pool uses in steady state is there from its first batch (flat from epoch 1,
    instead of growing as batches cycle through the slots); the rest of a slot costs memory
    only once a batch needs it.
    """

    def __init__(self, slots: int, slot_bytes: int, touch: Optional[int] = None):
        self.slots, self.slot_bytes = slots, max(1, int(slot_bytes))
        self._mm = mmap.mmap(-1, self.slots * self.slot_bytes)
        self._view = np.frombuffer(self._mm, np.uint8)
        touch = self.slot_bytes if touch is None else min(self.slot_bytes, max(0, int(touch)))
        if touch:
            self._view.reshape(self.slots, self.slot_bytes)[:, :touch] = 0

    def slot(self, k: int) -> np.ndarray:
        return self._view[k * self.slot_bytes:(k + 1) * self.slot_bytes]

    def release(self) -> None:
        """Unmap now (not when a reference cycle is collected); views still held keep it."""
        self._view = np.empty(0, np.uint8)
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view: freed with the last one
            pass


class RingCache:
    """Keeps a process pool's rings for the next pool of the same shape (the next epoch's),
    so they are allocated and written once per Loader, not once per epoch."""

    def __init__(self) -> None:
        self.key: Optional[Tuple[int, ...]] = None
        self.rings: Optional[Tuple[SlotRing, SlotRing]] = None
        self.busy = False

    def take(self, key: Tuple[int, ...], make: Callable[[], Tuple["SlotRing", "SlotRing"]]):
        """The cached rings if free and of this shape (else new ones, cached); marked busy."""
        if self.busy:  # an older pool still has them: this one gets rings of its own
            return make()
        if self.rings is None or self.key != key:
            self.rings, self.key = make(), key
        self.busy = True
        return self.rings

    def give_back(self, reusable: bool) -> None:
        """The pool using the cached rings closed; ``reusable``: its workers are all gone."""
        self.busy = False
        if not reusable:
            self.rings = self.key = None


@dataclass
class DecodeSpec:
    """What a worker does to each record.

    ``collate='array'``: the transform returns ``(H, W, 3)`` uint8 arrays, stacked into NCHW
    (or NHWC storage seen as NCHW channels_last). ``collate='default'``: anything, collated with
    ``torch.utils.data.default_collate`` (the torchvision-transform path).
    """

    transform: Callable[[Any, Optional[np.random.Generator]], Any]
    seed: int = 0
    epoch: int = 0
    collate: str = "array"
    channels_last: bool = False
    skip_broken: bool = False
    source: str = ""  # file path, for error messages
    shared: bool = False  # allocate outputs in shared memory (process pool)

    def out_shape(self, batch_size: int) -> Optional[Tuple[int, ...]]:
        """Storage shape of a decoded batch when the transform's output size is known."""
        size = getattr(self.transform, "size", None)
        if self.collate != "array" or not isinstance(size, int):
            return None
        return (batch_size, size, size, 3) if self.channels_last else (batch_size, 3, size, size)


@dataclass
class DecodedBatch:
    index: int
    images: Any
    targets: torch.Tensor
    records: np.ndarray  # record indices of the images, in batch order
    skipped: List[Tuple[int, str]] = field(default_factory=list)


class RecordError(RuntimeError):
    """A record failed to decode; ``key`` is its LMDB key (``b'%08d'``)."""

    def __init__(self, message: str, key: bytes = b"", index: int = -1):
        super().__init__(message)
        self.key = key
        self.index = index


def augment_rng(seed: int, epoch: int, record: int) -> np.random.Generator:
    """Augmentation randomness of one record in one epoch (independent of workers).

    Counter-based (Philox): key = (seed, epoch), the record in the counter's top word, so each
    record's stream is disjoint from its neighbours' and costs no seed hashing per image.
    """
    return np.random.Generator(np.random.Philox(key=[seed, epoch], counter=[0, 0, 0, record]))


_local = threading.local()
_NO_BUFFER = np.zeros(4, np.uint64)


def _reused_rng(seed: int, epoch: int, record: int) -> np.random.Generator:
    """:func:`augment_rng`'s generator, recycled per thread: the same draws, ~4x cheaper.

    Setting a Philox state (key, counter, empty output buffer) is what constructing one does,
    minus the entropy gathering and locks. Only for callers that finish with the generator
    before asking for the next one (the OpenCV ``write`` path).
    """
    gen = getattr(_local, "rng", None)
    if gen is None:
        gen = _local.rng = np.random.Generator(np.random.Philox(key=0))
    gen.bit_generator.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.array([0, 0, 0, record], np.uint64),
                  "key": np.array([seed, epoch], np.uint64)},
        "buffer": _NO_BUFFER, "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    return gen


def decode_batch(raw: RawBatch, spec: DecodeSpec,
                 out: Optional[torch.Tensor] = None) -> DecodedBatch:
    """Decode and augment every record of ``raw``; the per-batch work of every pool.

    ``out``: a preallocated uint8 storage-shaped tensor to write into (see ``out_shape``).
    Transforms with a ``write(jpeg, rng, dst)`` method (the OpenCV ones) write each image
    straight into its place in the batch; others return arrays that are copied in.

    Raises:
        RecordError: naming the record key, unless ``spec.skip_broken`` (then counted).
    """
    n = len(raw.records)
    outs: List[Any] = []
    kept: List[int] = []
    skipped: List[Tuple[int, str]] = []
    images = out
    write = getattr(spec.transform, "write", None) if spec.collate == "array" else None
    shape = spec.out_shape(n) if write is not None else None
    if shape is not None and images is None:
        images = _new_images(shape, spec)
    dst = images.numpy() if shape is not None else None  # one view per batch, not per image
    transform, seed, epoch = spec.transform, spec.seed, spec.epoch
    records = raw.records.tolist()
    blobs, data, offsets = raw.blobs, raw.data, raw.offsets.tolist()
    for i in range(n):
        rec = records[i]
        try:
            jpeg = blobs[i] if blobs is not None else memoryview(data[offsets[i]:offsets[i + 1]])
            if dst is not None:
                write(jpeg, _reused_rng(seed, epoch, rec), dst[len(kept)])
            else:
                res = transform(jpeg, augment_rng(seed, epoch, rec))
                if spec.collate == "array":
                    images = _put(images, res, len(kept), n, spec, rec)
                else:
                    outs.append(res)
        except Exception as e:  # noqa: BLE001 - reported with the record key
            if spec.skip_broken:
                skipped.append((rec, f"{type(e).__name__}: {e}"))
                continue
            raise RecordError(f"record {b'%08d' % rec!r} (index {rec}) of {spec.source} failed "
                              f"to decode: {type(e).__name__}: {e}", b"%08d" % rec, rec) from e
        kept.append(i)
    labels = raw.labels if len(kept) == n else raw.labels[kept]
    targets = torch.from_numpy(labels.astype(np.int64))
    if spec.collate == "array":
        if images is None:  # every record skipped
            images = torch.empty((0, 3, 0, 0), dtype=torch.uint8)
        else:
            if len(kept) < len(images):
                images = images[: len(kept)]
            images = images.permute(0, 3, 1, 2) if spec.channels_last else images
    else:
        images = torch.utils.data.default_collate(outs) if outs else torch.empty(0)
    return DecodedBatch(raw.index, images, targets,
                        raw.records if len(kept) == n else raw.records[kept], skipped)


def _new_images(shape: Tuple[int, ...], spec: DecodeSpec) -> torch.Tensor:
    images = torch.empty(shape, dtype=torch.uint8)
    if spec.shared:
        images.share_memory_()
    return images


def _put(images, out, k: int, n: int, spec: DecodeSpec, rec: int):
    """Write one decoded image into the batch tensor (allocated from the first image)."""
    arr = np.asarray(out)
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise TypeError(f"transform returned {arr.dtype} array of shape {arr.shape}; "
                        "expected (H, W, C) uint8")
    if images is None:
        h, w, c = arr.shape
        images = _new_images((n, h, w, c) if spec.channels_last else (n, c, h, w), spec)
    expected = tuple(images.shape[1:]) if spec.channels_last else \
        (images.shape[2], images.shape[3], images.shape[1])
    if arr.shape != expected:
        raise ValueError(f"transform returned shape {arr.shape} for record {rec}, the batch "
                         f"has {expected}; transforms must give one size")
    dst = images[k].numpy()
    if spec.channels_last:
        dst[...] = arr
    else:
        cv2.split(arr, list(dst))  # HWC -> CHW planes in place, ~5x faster than a transpose
    return images


class InlinePool:
    """Decode in the thread that asks for the batch (``num_workers=0``, or a raw-batch decoder).

    Args:
        decode: ``raw -> DecodedBatch``; e.g. ``functools.partial(decode_batch, spec=spec)``.
    """

    def __init__(self, decode: Callable[[RawBatch], DecodedBatch]):
        self._decode = decode
        self._raw: Dict[int, RawBatch] = {}
        self._cond = threading.Condition()

    def input_slot(self, index: int) -> Optional[Tuple[np.ndarray, int]]:
        return None

    def submit(self, raw: RawBatch) -> None:
        with self._cond:
            self._raw[raw.index] = raw
            self._cond.notify_all()

    def get(self, index: int, check: Callable[[], None] = lambda: None) -> DecodedBatch:
        with self._cond:
            while index not in self._raw:
                check()
                self._cond.wait(_POLL_S)
            raw = self._raw.pop(index)
        return self._decode(raw)

    def close(self) -> None:
        with self._cond:
            self._raw.clear()


class ThreadPool:
    """``num_workers`` decode threads in this process."""

    def __init__(self, spec: DecodeSpec, num_workers: int):
        self.spec = spec
        self._exec = ThreadPoolExecutor(num_workers, thread_name_prefix="imagenet_seq-decode")
        self._futures: Dict[int, Any] = {}
        self._cond = threading.Condition()

    def input_slot(self, index: int) -> Optional[Tuple[np.ndarray, int]]:
        return None

    def submit(self, raw: RawBatch) -> None:
        fut = self._exec.submit(decode_batch, raw, self.spec)
        with self._cond:
            self._futures[raw.index] = fut
            self._cond.notify_all()

    def get(self, index: int, check: Callable[[], None] = lambda: None) -> DecodedBatch:
        with self._cond:
            while index not in self._futures:
                check()
                self._cond.wait(_POLL_S)
            fut = self._futures.pop(index)
        return fut.result()

    def close(self) -> None:
        with self._cond:
            for fut in self._futures.values():
                fut.cancel()
            self._futures.clear()
        self._exec.shutdown(wait=True, cancel_futures=True)


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    try:
        import prctl  # python-prctl

        prctl.set_pdeathsig(sig)
        return
    except ImportError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: rely on the parent's shutdown
        pass


def _worker_main(in_q, out_q, spec: DecodeSpec, parent: int, rings, out_shape) -> None:
    set_pdeathsig()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    spec.shared = True
    in_ring, out_ring = rings
    while True:
        raw = in_q.get()
        if raw is None:
            break
        try:
            slot = raw.index % in_ring.slots
            if raw.slot >= 0:
                raw.data = in_ring.slot(raw.slot)[: raw.offsets[-1]]
            out = None
            if out_shape is not None:
                out = torch.from_numpy(out_ring.slot(slot)).view(out_shape)
            res = decode_batch(raw, spec, out)
            if out is not None:
                res.images = ("slot", slot, len(res.targets))  # pixels stay in the ring
            res.targets = res.targets.numpy()  # a torch tensor would get its own shm file
            out_q.put(("ok", res))
        except RecordError as e:
            out_q.put(("record", raw.index, str(e), e.key, e.index))
        except BaseException as e:  # noqa: BLE001 - every failure reaches the parent
            out_q.put(("error", raw.index, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        del raw


class ProcessPool:
    """``num_workers`` forked decode processes fed through one queue; results reordered.

    Batch ``i`` uses input and output slot ``i % slots`` of two shared rings, so at most
    ``slots`` batches may be in flight (the Loader's ``prefetch``). JPEG bytes and pixels never
    go through a pipe; only small descriptors do. Batches too large for a slot, and transforms
    of unknown output size, fall back to pickling (torch shared-memory tensors).

    Args:
        spec: the per-record work.
        num_workers: processes.
        slots: batches in flight.
        batch_size: largest batch (sizes the output slots).
        in_slot_bytes: JPEG bytes one input slot holds.
        in_touch_bytes: bytes of each input slot to allocate at once (a typical batch).
        pin_memory: copy decoded batches out of the ring into pinned memory.
        rings: a :class:`RingCache` to take the rings from and return them to (a Loader's,
            across epochs); ``None``: rings of this pool only, unmapped on ``close``.
    """

    def __init__(self, spec: DecodeSpec, num_workers: int, slots: int = 4,
                 batch_size: int = 256, in_slot_bytes: int = 64 << 20, pin_memory: bool = False,
                 in_touch_bytes: int = 0, rings: Optional[RingCache] = None):
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("fork")
        self._in = ctx.Queue()
        self._out = ctx.Queue()
        self._ready: Dict[int, DecodedBatch] = {}
        self._closed = False
        self.pin_memory = pin_memory
        self.out_shape = spec.out_shape(batch_size)
        self.channels_last = spec.channels_last
        out_bytes = int(np.prod(self.out_shape)) if self.out_shape else 1
        def make() -> Tuple[SlotRing, SlotRing]:  # every decoded batch fills its out slot
            return (SlotRing(slots, in_slot_bytes, touch=in_touch_bytes),
                    SlotRing(slots, out_bytes))

        self._cache = rings
        self._rings = make() if rings is None else \
            rings.take((slots, in_slot_bytes, in_touch_bytes, out_bytes), make)
        self.in_ring, self.out_ring = self._rings
        args = (self._in, self._out, spec, os.getpid(), (self.in_ring, self.out_ring),
                self.out_shape)
        self.procs = [ctx.Process(target=_worker_main, args=args,
                                  name=f"imagenet_seq-decode-{k}", daemon=True)
                      for k in range(num_workers)]
        for p in self.procs:
            p.start()

    def input_slot(self, index: int) -> Optional[Tuple[np.ndarray, int]]:
        """Where batch ``index``'s bytes go: (slot view, slot number)."""
        k = index % self.in_ring.slots
        return self.in_ring.slot(k), k

    def submit(self, raw: RawBatch) -> None:
        if raw.slot >= 0:
            raw = replace(raw, data=None)  # the bytes are in the ring already
        self._in.put(raw)

    def _materialise(self, res: DecodedBatch) -> DecodedBatch:
        res.targets = torch.from_numpy(res.targets)
        if self.pin_memory:
            res.targets = res.targets.pin_memory()
        if isinstance(res.images, tuple):  # ("slot", k, n): copy out so the slot can be reused
            _, k, n = res.images
            ring = torch.from_numpy(self.out_ring.slot(k)).view(self.out_shape)[:n]
            images = torch.empty(ring.shape, dtype=torch.uint8, pin_memory=self.pin_memory)
            # one plain memcpy: torch's copy_ splits it over OpenMP threads that then spin
            np.copyto(images.numpy(), ring.numpy())
            res.images = images.permute(0, 3, 1, 2) if self.channels_last else images
        return res

    def get(self, index: int, check: Callable[[], None] = lambda: None) -> DecodedBatch:
        while index not in self._ready:
            try:
                msg = self._out.get(timeout=_POLL_S)
            except queue.Empty:
                check()
                for p in self.procs:
                    if p.exitcode is not None:
                        raise RuntimeError(
                            f"decode worker {p.name} (pid {p.pid}) died with exit code "
                            f"{p.exitcode} (killed, or out of memory?)")
                continue
            if msg[0] == "ok":
                self._ready[msg[1].index] = msg[1]
            elif msg[0] == "record":
                raise RecordError(msg[2], msg[3], msg[4])
            else:
                raise RuntimeError(f"decode worker failed on batch {msg[1]}: {msg[2]}")
        return self._materialise(self._ready.pop(index))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        # Workers hold nothing worth finishing: stop them now rather than after queued batches.
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        for q in (self._in, self._out):
            q.cancel_join_thread()
            q.close()
        idle = not any(p.is_alive() for p in self.procs)  # nobody writes into the rings now
        if self._cache is not None and self._rings is self._cache.rings:
            self._cache.give_back(reusable=idle)
        elif idle:
            self.in_ring.release()
            self.out_ring.release()
