"""One batch through the decode stage: raw JPEG batch in, decoded tensor batch out.

Every pool in :mod:`.workers` runs :func:`decode_batch`; the augmentation randomness of a record
is :func:`augment_rng` of ``(seed, epoch, record index)`` only, so the output does not depend on
the pool type, the worker count, or which worker got which batch.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from imagenet_seq.format.checksums import ChecksumMismatch, of_record
from imagenet_seq.format import RecordError  # noqa: F401 - the error decode_batch raises; defined with the format

__all__ = ["where", "RawBatch", "pack_batch", "DecodeSpec", "resized_transform", "DecodedBatch",
           "augment_rng", "decode_batch", "check_record", "check_batch"]


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
    crcs: Optional[np.ndarray] = None  # stored checksums to verify before decoding (uint32)
    # the per-epoch decode parameters travel with the batch, so one set of persistent workers
    # serves every epoch: the augmentation epoch and the output side (None: the spec's)
    epoch: Optional[int] = None
    image_size: Optional[int] = None
    run: int = 0  # the pass (one ``iter(loader)``) this batch belongs to

    def jpeg(self, i: int) -> Any:
        if self.blobs is not None:
            return self.blobs[i]
        return memoryview(self.data[self.offsets[i]:self.offsets[i + 1]])

    def jpegs(self) -> List[bytes]:
        return [bytes(self.jpeg(i)) for i in range(len(self.records))]


def pack_batch(index: int, items: Sequence[Tuple[int, bytes, int]],
               dest: Optional[np.ndarray] = None, slot: int = -1,
               checksums: Optional[np.ndarray] = None, *, epoch: Optional[int] = None,
               image_size: Optional[int] = None, run: int = 0) -> RawBatch:
    """Records ``(index, jpeg, label)`` -> a :class:`RawBatch`.

    The bytes are copied into ``dest`` (a pool's shared input slot) when they fit; otherwise the
    batch keeps the records' ``bytes`` objects (no copy). ``checksums``: every record's stored
    checksum (the file's ``__crc__``); the batch carries its records' for the decode stage.
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
    records = np.array(records, np.int64)
    return RawBatch(index, records, np.array(labels, np.int64), offsets, data, slot, kept,
                    None if checksums is None else checksums[records], epoch, image_size, run)


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
    shards: tuple = ()  # a sharded split: ((first record, shard path), ...), for the same
    shared: bool = False  # allocate outputs in shared memory (process pool)

    def out_shape(self, batch_size: int, image_size: Optional[int] = None
                  ) -> Optional[Tuple[int, ...]]:
        """Storage shape of a decoded batch when the transform's output size is known."""
        size = getattr(self.transform_for(image_size), "size", None)
        if self.collate != "array" or not isinstance(size, int):
            return None
        return (batch_size, size, size, 3) if self.channels_last else (batch_size, 3, size, size)

    def transform_for(self, image_size: Optional[int]) -> Callable:
        """The transform with output side ``image_size`` (``None``: as built). The built-in
        transforms are copied with the new side (val keeps its resize/crop ratio); the copies
        are cached, so a persistent worker builds one per size it meets."""
        size = getattr(self.transform, "size", None)
        if image_size is None or image_size == size or not hasattr(self.transform, "write"):
            return self.transform  # (the Loader refuses other sizes for other transforms)
        cache = self.__dict__.setdefault("_sized", {})
        if image_size not in cache:
            cache[image_size] = resized_transform(self.transform, image_size)
        return cache[image_size]


def resized_transform(transform: Any, image_size: int) -> Any:
    """A copy of a built-in transform (``TrainTransform``/``ValTransform``) with output side
    ``image_size``; a ValTransform keeps its ``resize / size`` ratio (256/224 by default).
    Raises TypeError for other transforms (they decide their own size)."""
    import copy

    size = getattr(transform, "size", None)
    if not isinstance(size, int) or not hasattr(transform, "write"):
        raise TypeError(f"set_image_size works with the built-in transforms (transform=None, "
                        f"TrainTransform, ValTransform); {transform!r} decides its own output "
                        "size: change it in your transform instead")
    new = copy.copy(transform)
    new.size = int(image_size)
    if hasattr(new, "resize"):
        new.resize = max(int(image_size), int(round(transform.resize * image_size / size)))
    return new


@dataclass
class DecodedBatch:
    index: int
    images: Any
    targets: torch.Tensor
    records: np.ndarray  # record indices of the images, in batch order
    skipped: List[Tuple[int, str]] = field(default_factory=list)


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
    transform = spec.transform_for(raw.image_size)
    write = getattr(transform, "write", None) if spec.collate == "array" else None
    shape = spec.out_shape(n, raw.image_size) if write is not None else None
    if shape is not None and images is None:
        images = _new_images(shape, spec)
    dst = images.numpy() if shape is not None else None  # one view per batch, not per image
    seed, epoch = spec.seed, spec.epoch if raw.epoch is None else raw.epoch
    records = raw.records.tolist()
    blobs, data, offsets = raw.blobs, raw.data, raw.offsets.tolist()
    crcs = None if raw.crcs is None else raw.crcs.tolist()
    labels = raw.labels.tolist() if crcs is not None else None
    for i in range(n):
        rec = records[i]
        try:
            jpeg = blobs[i] if blobs is not None else memoryview(data[offsets[i]:offsets[i + 1]])
            if crcs is not None:
                check_record(jpeg, labels[i], crcs[i])
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
            if isinstance(e, ChecksumMismatch):
                raise _damaged(rec, spec.source, e, spec.shards) from None
            _, what = where(spec.source, spec.shards, rec)
            raise RecordError(f"{what} failed to decode: {type(e).__name__}: {e}",
                              b"%08d" % rec, rec) from e
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


def check_record(jpeg, label: int, crc: int) -> None:
    """Raise :class:`ChecksumMismatch` unless ``(label, jpeg)`` has the stored checksum."""
    got = of_record(label, jpeg)
    if got != crc:
        raise ChecksumMismatch(f"failed its checksum (stored {crc:#010x}, read {got:#010x})")


def check_batch(raw: RawBatch, source: str, shards: tuple = ()) -> None:
    """:func:`check_record` of every record of ``raw`` that carries checksums (for decoders that
    take the raw batch: DALI, a user callable); raises :class:`RecordError` on the first bad one."""
    if raw.crcs is None:
        return
    for i, rec in enumerate(raw.records.tolist()):
        try:
            check_record(raw.jpeg(i), int(raw.labels[i]), int(raw.crcs[i]))
        except ChecksumMismatch as e:
            raise _damaged(rec, source, e, shards) from None


def where(source: str, shards: tuple, rec: int) -> Tuple[str, str]:
    """(the file holding the split's record ``rec``, the record named in it): ``source`` for
    one file; for a sharded split (``shards``: (first record, path) each) the shard and its own
    key, with the split's index."""
    if not shards:
        return source, f"record {b'%08d' % rec!r} (index {rec}) of {source}"
    first, path = shards[bisect.bisect_right([f for f, _ in shards], rec) - 1]
    return path, (f"record {b'%08d' % (rec - first)!r} of {path} (index {rec} of the split "
                  f"{source})")


def _damaged(rec: int, source: str, e: ChecksumMismatch, shards: tuple = ()) -> RecordError:
    path, what = where(source, shards, rec)
    return RecordError(f"{what} {e}: its bytes changed after conversion; "
                       f"`imagenet-seq-verify {path}` lists every damaged record; re-copy the "
                       "file from its source or re-convert", b"%08d" % rec, rec)


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
