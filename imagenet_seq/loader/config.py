"""A Loader's arguments, checked and resolved once into one frozen value: :class:`Settings`.

:func:`resolve` is the only place that turns the user's keywords into settings: it checks them
(a ValueError naming the first bad one), opens the split (its size, classes and mean record
size), asks where this process sits in the job (:mod:`.ranks`: ``torch.distributed``, the
environment) and fills in every default. The stages, faces and tools get the result, or the
group they need, never the Loader:

======== ==================================================================================
group    fields
======== ==================================================================================
data     ``path``, ``mode``, ``classes``, ``num_records``, ``mean_record_bytes``, ``meta``,
         ``verify``, ``check_split``, ``shard_dirs``, ``shard_devices``, ``shards``
order    ``plan`` (:class:`~imagenet_seq.plan.stage.Plan`: seed, rank, world size, shuffle,
         chunk size, buffer size, node plan or not), ``batch_size``, ``drop_last``,
         ``local_world_size``, ``node_reader`` (one reader per node: the node plan)
decode   ``decoder``, ``transform``, ``collate``, ``image_size``, ``resize_size``, ``scale``,
         ``ratio``, ``num_workers``, ``worker_type``, ``skip_broken``, ``channels_last``
device   ``device``, ``pin_memory``, ``pin`` (pinning really happens: no ``device``, CUDA seen)
runtime  ``prefetch``, ``stall_timeout``, ``overlap_epochs``
======== ==================================================================================

The one setting that changes after construction, the output size (``set_image_size``), gives
a new value (:meth:`Settings.with_image_size`); a :class:`Current` holds the Loader's latest.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from imagenet_seq.format import SPLITS
from imagenet_seq.loader.ranks import node_layout, resolve_rank
from imagenet_seq.plan import order
from imagenet_seq.plan.shuffle import buffer_records
from imagenet_seq.plan.stage import Plan

__all__ = ["Settings", "DataSettings", "OrderSettings", "DecodeSettings", "DeviceSettings",
           "RuntimeSettings", "Current", "resolve", "resolve_order", "memory_bound",
           "default_workers", "mean_record_bytes", "check_size", "MAX_IMAGE_SIZE",
           "WORKER_TYPES"]

log = logging.getLogger(__name__)

WORKER_TYPES = ("process", "thread")
#: Largest ``image_size`` / ``resize_size`` (pixels per side) a Loader accepts: 18x ImageNet's
#: 224 and above its typical 500x375 sources; a decoded batch of 256 at this size is already
#: 12.9 GB, so a larger value is a typo or a damaged resume state, not a training setting.
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class DataSettings:
    """Which file (or shards), and what it holds (read once, at construction)."""

    path: str  # the split's LMDB file, or the manifest of a sharded split
    mode: str  # 'train' or 'val'
    classes: Tuple[str, ...]
    num_records: int
    mean_record_bytes: float  # memory budgets: the shuffle buffer in records, the rings
    meta: Any = field(repr=False)  # the file's metadata (resume state: fingerprint, version)
    verify: bool  # check every record against its stored checksum
    check_split: bool
    shard_dirs: Tuple[str, ...] = ()  # more folders to find shards in (a moved disk)
    shard_devices: Any = None  # shards' grouping into readers (read.devices); None: automatic
    shards: int = 1  # shard files of the split (1: one file)
    # (first record, path) of each shard of a sharded split, () for one file: errors of the
    # decode stage name the shard file and its own record key
    shard_starts: Tuple[Tuple[int, str], ...] = ()


@dataclass(frozen=True)
class OrderSettings:
    """Which records, in which order, in which batches (``plan`` holds the order's
    parameters; batch boundaries are fixed by position in its stream)."""

    plan: Plan
    batch_size: int
    drop_last: bool
    local_world_size: int  # ranks on this machine (they share its default buffer budget)
    node_reader: bool = False  # read through the node's reader (plan.node_ranks > 0)

    @property
    def batches(self) -> int:
        """Batches per epoch: ``len(loader)``."""
        return order.num_batches(self.plan.records, self.batch_size, self.drop_last)

    @property
    def records(self) -> int:
        """Images per epoch for this rank (``drop_last`` applied)."""
        return self.batches * self.batch_size if self.drop_last else self.plan.records


@dataclass(frozen=True)
class DecodeSettings:
    """What turns JPEG bytes into a batch."""

    decoder: Union[str, Callable]  # 'cpu', 'dali' or a callable (jpegs, labels) -> batch
    transform: Any  # the per-image transform of the 'cpu' decoder, as built
    collate: str  # 'array' (fast path: uint8 NCHW) or 'default' (like default_collate)
    image_size: int  # output side of the next passes
    resize_size: int
    scale: Tuple[float, float]
    ratio: Tuple[float, float]
    num_workers: int
    worker_type: str  # 'thread' or 'process'
    skip_broken: bool
    channels_last: bool

    @property
    def sized(self) -> bool:
        """The output side is known (built-in transforms, DALI), not the user's transform's."""
        return isinstance(getattr(self.transform, "size", None), int) or self.decoder == "dali"


@dataclass(frozen=True)
class DeviceSettings:
    """Where finished batches go."""

    device: Any  # None: stay on the host (uint8); else moved and normalised there
    pin_memory: bool  # as asked
    pin: bool  # pinning happens: pin_memory, no device, and torch sees a CUDA device


@dataclass(frozen=True)
class RuntimeSettings:
    """How a pass runs."""

    prefetch: int  # batches in flight
    stall_timeout: Optional[float]  # seconds without a batch before an error; None: wait
    overlap_epochs: bool  # read on into the next epoch at the end of one


@dataclass(frozen=True)
class Settings:
    """Everything a Loader resolved from its arguments; see the module docstring."""

    data: DataSettings
    order: OrderSettings
    decode: DecodeSettings
    device: DeviceSettings
    runtime: RuntimeSettings

    def with_image_size(self, size: int) -> "Settings":
        """These settings with output side ``size`` (``Loader.set_image_size``)."""
        return dataclasses.replace(self, decode=dataclasses.replace(self.decode,
                                                                    image_size=int(size)))


class Current:
    """The Loader's settings as they are now: a feeder reading on into the next epoch takes
    that epoch's image size from here. Held weakly by the feeder, so read-ahead stops with the
    Loader that owns it."""

    def __init__(self, settings: Settings):
        self.settings = settings


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_size(name: str, value: Any, low: int = 1, call: bool = False) -> int:
    """``value`` as an int in ``low .. MAX_IMAGE_SIZE``, else ValueError naming ``name``, the
    value and the range (a bool is not a size); ``call``: ``name`` is a method, named
    ``name(value)`` in the message."""
    if not _is_int(value) or not low <= value <= MAX_IMAGE_SIZE:
        said = f"{name}({value!r})" if call else f"{name}={value!r}"
        raise ValueError(f"{said}; expected an int in {low}..{MAX_IMAGE_SIZE} "
                         f"(pixels per side; {MAX_IMAGE_SIZE} is imagenet_seq's upper bound, "
                         "e.g. 224)")
    return int(value)


_pin_warned = False  # once per process: a script makes a train and a val Loader, per rank


def _check_device(device: Any, pin_memory: bool) -> None:
    """Refuse a CUDA ``device`` where torch sees no CUDA device, before any stage starts (else
    the first batch fails deep inside torch with "Found no NVIDIA driver"); warn that
    ``pin_memory=True`` does nothing there (pinned memory only speeds copies to a GPU), once
    per process."""
    global _pin_warned
    import torch

    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a torch device ({e}); pass e.g. "
                             "'cuda', 'cuda:0', 'cpu' or None") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but torch {torch.__version__} sees no CUDA device "
                f"(torch.cuda.is_available() is False, CUDA build: {torch.version.cuda}); run on "
                "a machine with a GPU and a CUDA build of torch, or pass device='cpu' (float "
                "normalised batches on the CPU) or device=None (uint8 batches)")
    if pin_memory and device is None and not _pin_warned and not torch.cuda.is_available():
        import warnings

        _pin_warned = True
        # stacklevel: the user's Loader(...) call (-> Loader.__init__ -> resolve -> here)
        warnings.warn("pin_memory=True has no effect: torch sees no CUDA device, and pinned "
                      "memory only speeds up copies to a GPU; batches stay in ordinary memory",
                      RuntimeWarning, stacklevel=4)


def _check_shard_dirs(shard_dirs: Any) -> Tuple[str, ...]:
    """``shard_dirs`` as a tuple of existing folders (a str is one folder), else ValueError."""
    if shard_dirs is None:
        return ()
    dirs = (shard_dirs,) if isinstance(shard_dirs, (str, os.PathLike)) else shard_dirs
    try:
        dirs = tuple(os.fspath(d) for d in dirs)
    except TypeError:
        raise ValueError(f"shard_dirs={shard_dirs!r}; expected a folder or a list of folders "
                         "to look for shards in (e.g. ['/mnt/disk2/lmdb'])") from None
    for d in dirs:
        if not os.path.isdir(d):
            raise ValueError(f"shard_dirs names {d!r}, which is not a folder; name the folders "
                             "the moved shards are in now (e.g. ['/mnt/disk2/lmdb'])")
    return dirs


def _check_args(mode: str, worker_type: Optional[str], decoder: Any, batch_size: int,
                num_workers: Optional[int], seed: int, stall_timeout: Optional[float],
                image_size: int, resize_size: int) -> None:
    """ValueError naming the first bad Loader argument and what it expects."""
    if mode not in SPLITS:
        raise ValueError(f"mode={mode!r}; expected one of 'train', 'val'")
    if worker_type is not None and worker_type not in WORKER_TYPES:
        raise ValueError(f"worker_type={worker_type!r}; expected 'process', 'thread' or "
                         "None (automatic)")
    if not (decoder in ("cpu", "dali") or callable(decoder)):
        raise ValueError(f"decoder={decoder!r}; expected 'cpu', 'dali' or a callable "
                         "(jpegs, labels) -> (images, targets)")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers={num_workers}; expected >= 0")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r}; expected a non-negative integer")
    if stall_timeout is not None and not stall_timeout > 0:
        raise ValueError(f"stall_timeout={stall_timeout!r}; expected seconds > 0, or None "
                         "to wait for ever")
    check_size("image_size", image_size)
    check_size("resize_size", resize_size)


def memory_bound(settings: Settings) -> Dict[str, int]:
    """Estimated peak bytes of one rank's Loader by part: ``shuffle_buffer`` (records x mean
    record), ``in_flight`` (``prefetch`` raw + decoded batches; the process pool's rings have
    the same size; the epoch boundary shares this window), ``total``."""
    batch, mean = settings.order.batch_size, settings.data.mean_record_bytes
    size = settings.decode.image_size if settings.decode.sized else None
    raw = int(batch * mean)
    decoded = batch * 3 * size * size if size else 0
    parts = {"shuffle_buffer": int(settings.order.plan.buffer_size * mean),
             "in_flight": settings.runtime.prefetch * (raw + decoded)}
    parts["total"] = sum(parts.values())
    return parts


def default_workers(local_world: int) -> int:
    """Decode workers per rank: this machine's usable CPUs split among its ranks."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_world))


def mean_record_bytes(meta: Any, reader: Any, num_records: int) -> float:
    """Mean JPEG record size: from the metadata, else from the first 256 records."""
    if meta.total_bytes and num_records:
        return meta.total_bytes / num_records
    sizes = [len(j) for _, j, _ in reader.read_range(0, min(256, num_records))]
    reader.close()
    return float(np.mean(sizes)) if sizes else 0.0


def _make_transform(transform: Optional[Callable], mode: str, image_size: int,
                    resize_size: int, scale: Tuple[float, float], ratio: Tuple[float, float]):
    """``(transform, collate)``: the fast OpenCV path (``'array'``) or a PIL-image transform
    collated like ``default_collate`` (``'default'``)."""
    from imagenet_seq.decode import transforms as decode

    if transform is None:
        if mode == "train":
            return decode.TrainTransform(image_size, scale, ratio), "array"
        return decode.ValTransform(image_size, resize_size), "array"
    if isinstance(transform, (decode.TrainTransform, decode.ValTransform)):
        return transform, "array"
    if isinstance(transform, decode.PILTransform):
        return transform, "default"
    if not callable(transform):
        raise TypeError(f"transform={transform!r} is not callable; pass None (fast OpenCV "
                        "path) or a torchvision-style transform")
    return decode.PILTransform(transform), "default"


def resolve_order(num_records: int, mode: str, mean_bytes: float, *, batch_size: int,
                  drop_last: bool, shuffle: Optional[bool], seed: int, rank: int,
                  world_size: int, local_world_size: int, chunk_size: Optional[int],
                  buffer_size: Optional[int], buffer_bytes: Optional[int],
                  node_reader: bool = False) -> OrderSettings:
    """The order group from the Loader's order arguments (no file, no environment): what
    ``None`` means -- shuffle for train, the automatic chunk, the machine's buffer budget split
    among its ranks -- for the Loader and for tools that plan without one (diagnostics).
    ``node_reader``: the node plan (nodes of ``local_world_size`` ranks) instead of today's."""
    shuffle = (mode == "train") if shuffle is None else bool(shuffle)
    chunk_size = chunk_size or order.DEFAULT_CHUNK_RECORDS
    order.check(num_records, mode, rank, world_size, seed, chunk_size)  # before the buffer
    buffer = buffer_records(buffer_size, buffer_bytes, mean_bytes, local_world_size) \
        if shuffle else 0
    plan = Plan(num_records, mode, seed, rank, world_size, shuffle, chunk_size, buffer,
                local_world_size if node_reader else 0)
    return OrderSettings(plan, batch_size, bool(drop_last), local_world_size, bool(node_reader))


def _node_reader(requested: Optional[bool], ranks: Any, reader: Any) -> bool:
    """Whether the Loader reads through the node's reader (:func:`.ranks.node_layout`, and the
    file's offsets index); an automatic choice that cannot be says why in one log line."""
    if requested is not None and not isinstance(requested, (bool, np.bool_)):
        raise ValueError(f"node_reader={requested!r}; expected None (automatic), True or False")
    on, why = node_layout(ranks, requested)
    if on and not reader.indexed:
        from imagenet_seq.format import offsets

        why = (f"{reader.path} has no offsets index (add it with "
               f"`{offsets.rebuild_command(reader.path)}`)")
        if requested:
            raise ValueError(f"node_reader=True, but {why}; or pass node_reader=None or False")
        on = False
    if why is not None and not on:
        log.warning("imagenet_seq: rank %d reads %s with its own reader, not the node's: %s",
                    ranks.rank, reader.path, why)
    return on


def resolve(root: str, mode: str, transform: Optional[Callable], *, check_split: bool,
            verify: bool, shard_dirs: Any, shard_devices: Any, batch_size: int,
            drop_last: bool, shuffle: Optional[bool],
            seed: int, chunk_size: Optional[int], buffer_size: Optional[int],
            buffer_bytes: Optional[int], rank: Optional[int], world_size: Optional[int],
            distributed: Optional[bool], node_reader: Optional[bool],
            decoder: Union[str, Callable],
            num_workers: Optional[int], worker_type: Optional[str], image_size: int,
            resize_size: int, scale: Tuple[float, float], ratio: Tuple[float, float],
            skip_broken: bool, channels_last: bool, device: Any, pin_memory: bool,
            prefetch: Optional[int], stall_timeout: Optional[float],
            overlap_epochs: Optional[bool]):
    """A Loader's arguments (see :class:`imagenet_seq.data.Loader`, which holds their
    defaults) -> ``(settings, reader)``.

    ``reader`` is the split's :class:`~imagenet_seq.read.reader.SplitReader` (no descriptor or
    environment kept open; its per-record metadata stays mapped, ``format/mapped.py``). Checks
    come in a fixed order: the arguments, the device, the ranks, the file, the plan, the
    buffer, the transform.
    """
    import torch

    from imagenet_seq.read.devices import check_grouping, describe
    from imagenet_seq.read.reader import SplitReader

    _check_args(mode, worker_type, decoder, batch_size, num_workers, seed, stall_timeout,
                image_size, resize_size)
    dirs, grouping = _check_shard_dirs(shard_dirs), check_grouping(shard_devices)
    _check_device(device, pin_memory)
    ranks = resolve_rank(rank, world_size, distributed)
    reader = SplitReader(root, mode, check_split=check_split, shard_dirs=dirs,
                         shard_devices=grouping)
    groups = describe(reader.devices, reader.paths)
    if groups:
        log.info("imagenet_seq: %s read with %s", reader.path, groups)
    if verify and reader.checksums is None:
        raise ValueError(
            f"verify=True, but {reader.path} has no record checksums (converted before "
            f"they existed{', by the original tool' if reader.legacy else ''}); add "
            f"them with `imagenet-seq-verify --add-checksums {reader.path}`, or pass "
            "verify=False")
    meta, n = reader.meta, len(reader)
    order.check(n, mode, ranks.rank, ranks.world_size, 0,
                chunk_size or order.DEFAULT_CHUNK_RECORDS)  # before the mean record reads
    mean = mean_record_bytes(meta, reader, n)
    node = _node_reader(node_reader, ranks, reader)
    data = DataSettings(str(reader.path), mode, tuple(meta.classes), n, mean, meta,
                        bool(verify), bool(check_split), dirs, grouping, len(reader.files),
                        tuple((f.first, f.path) for f in reader.files)
                        if len(reader.files) > 1 else ())
    plan_order = resolve_order(n, mode, mean, batch_size=batch_size, drop_last=drop_last,
                               shuffle=shuffle, seed=seed, rank=ranks.rank,
                               world_size=ranks.world_size,
                               local_world_size=ranks.local_world_size, chunk_size=chunk_size,
                               buffer_size=buffer_size, buffer_bytes=buffer_bytes,
                               node_reader=node)
    workers = default_workers(ranks.local_world_size) if num_workers is None else num_workers
    built, collate = _make_transform(transform, mode, image_size, resize_size, scale, ratio)
    decode = DecodeSettings(
        decoder, built, collate,
        # a TrainTransform / ValTransform passed in keeps its own size (not the default 224)
        int(getattr(built, "size", image_size)), resize_size, scale, ratio, workers,
        # measured on 2 cores (benchmarks/results/workers.md): threads need ~20 % less CPU per
        # image on the OpenCV path (it releases the GIL); Python/PIL transforms hold the GIL
        # and use torch's global RNG, so they get processes.
        worker_type or ("thread" if collate == "array" else "process"),
        bool(skip_broken), bool(channels_last))
    pin = bool(pin_memory and device is None and torch.cuda.is_available())
    plan = plan_order.plan
    runtime = RuntimeSettings(
        prefetch or workers + 2, stall_timeout,
        # default: where an epoch starts with a buffer fill (train); a val pass would only
        # keep its file open and a few decoded batches between passes
        plan.shuffled if overlap_epochs is None else bool(overlap_epochs))
    settings = Settings(data, plan_order, decode, DeviceSettings(device, bool(pin_memory), pin),
                        runtime)
    return settings, reader
