"""The Loader: its arguments resolved once into :class:`~.config.Settings`, its passes run by
:class:`~.epoch.Passes`, its place between passes kept by a :class:`~.state.Cursor`.

Everything the Loader does beyond holding these three is its public surface (iteration,
``set_epoch``, ``state_dict``, the DataLoader-shaped faces); a newcomer follows one epoch in
:mod:`.epoch` (start a pass, hand out its batches) and :mod:`.feeder` (plan -> read -> shuffle
-> batch -> decode, in a thread).
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from imagenet_seq.decode.batch import resized_transform
from imagenet_seq.loader import faces
from imagenet_seq.loader import state as resume_state
from imagenet_seq.loader.config import Current, Settings, check_size, memory_bound, resolve
from imagenet_seq.loader.epoch import LazyPass, Passes
from imagenet_seq.loader.finish import Finish
from imagenet_seq.plan import order

__all__ = ["Loader", "settings_for"]


def _setting(path: str, doc: str) -> property:
    get = operator.attrgetter(path)
    return property(lambda self: get(self.settings), doc=f"{doc} (``settings.{path}``)")


class Loader:
    """Batches of one split of a sequential LMDB, for one rank, epoch after epoch.

    Example::

        train = Loader('/data/lmdb', 'train', batch_size=256, num_workers=8)
        for epoch in range(90):
            train.set_epoch(epoch)
            for images, targets in train:  # uint8 NCHW, int64
                ...

    Ordering guarantees (see :mod:`imagenet_seq.plan.order`): every epoch yields every record of this
    rank's share exactly once; ``len(loader)`` batches, the last one partial unless
    ``drop_last`` (then its records are left out of this epoch: a different set each epoch).
    Train: order = pure function of (seed, epoch, rank, world_size, chunk_size, buffer_size);
    ranks disjoint, equal batch counts, union = dataset minus a tail of ``N % world_size``.
    Val: file order, rank r gets a contiguous slice, every image once across ranks, no padding.
    Without ``set_epoch``, each new pass takes the next epoch number (0, 1, 2, ...); a pass
    starts at its first batch, so ``iter(loader)`` alone consumes no epoch.

    Memory (per rank): shuffle buffer ``buffer_size`` x mean JPEG record (default 2 GiB per
    machine split among its ranks: ~19,500 ImageNet records) + ``prefetch`` raw batches (JPEG
    bytes, ~28 MB at batch 256) + ``prefetch`` decoded batches (batch x 3 x 224 x 224 bytes,
    ~38.5 MB at 256) + the batches the caller holds. ImageNet, batch 256, 8 workers, 1 rank:
    ~2.1 GB + 10 x 67 MB ~ 2.8 GB.

    The arguments are checked and resolved once, at construction, into ``loader.settings``
    (:class:`imagenet_seq.loader.config.Settings`, frozen), in the groups below; the
    attributes of the same names (``loader.batch_size``, ``loader.buffer_size``, ...) read it.

    Args:
        root: folder holding ``ILSVRC-<mode>.lmdb`` or ``ILSVRC-<mode>.manifest.json`` (a
            sharded split), or that file itself.
        mode: ``'train'`` or ``'val'``.
        transform: (decode) ``None`` for the fast OpenCV path (train: RandomResizedCrop +
            flip; val: resize + centre crop), a :mod:`imagenet_seq.decode.transforms`
            transform, or a torchvision-style transform (PIL image in) collated like
            ``default_collate``. The fast path yields uint8 NCHW batches; add ``device=`` to
            get float32 ImageNet-normalised batches on that device (the one-step switch from a
            torchvision transform: a float model fed uint8 batches fails in its first layer).

        Data -- which file (or shards), checked how:

        check_split: refuse a file whose metadata names the other split (``mode='train'`` on
            ``ILSVRC-val.lmdb`` would train on validation data).
        verify: check every record against the checksum stored at conversion before decoding
            (a mismatch is a :class:`RecordError` naming the key, or a skip with
            ``skip_broken``); ~70 us per 110 KB record, in the decode workers. Labels outside
            the classes are always an error, with or without it.
        shard_dirs: a sharded split (``ILSVRC-<mode>.manifest.json`` in ``root``, its shards
            in the folders the conversion wrote them to): more folders to look for shards in,
            e.g. a disk mounted elsewhere since (a folder or a list of folders).
        shard_devices: how a sharded split's shards are grouped into readers (one reader per
            group, all feeding this Loader's plan; :mod:`imagenet_seq.read.devices`): ``None``
            (default: ``IMAGENET_SEQ_SHARD_DEVICES``, else by the device each file is on,
            ``st_dev``), ``'device'``, ``'folder'`` (a pool of disks under one filesystem),
            ``'one'`` (partitions of one disk) or one label per shard. The records, their
            order and resume states are the same whatever the shards and groups.

        Order -- which records, in which order, in which batches:

        batch_size, drop_last: as for ``torch.utils.data.DataLoader``.
        shuffle: chunk permutation + shuffle buffer (default: True for train, False for val).
        seed: the randomness of order and augmentation.
        chunk_size: records per contiguous read when chunks are permuted (default: automatic,
            1024 on large splits).
        buffer_size / buffer_bytes: shuffle buffer in records / bytes for this rank.
        rank, world_size, distributed: see :func:`imagenet_seq.loader.ranks.resolve_rank`
            (default: the initialised ``torch.distributed`` group, else one rank).
        node_reader: one reader process per node serving all its ranks (issue 24: one
            forward sweep of the disk instead of one reader per rank). ``None`` (default): on
            when the launcher runs several ranks on this node (``LOCAL_WORLD_SIZE`` > 1,
            torchrun) and ``IMAGENET_SEQ_NODE_READER`` is not ``0``; per-rank readers, with
            one log line saying why, when the layout is not torchrun's or the file lacks its
            offsets index. ``False``: off; ``True``: on, or ValueError saying why not. When
            on, the order is the node plan (:mod:`imagenet_seq.plan.node`: the same
            guarantees, other orders): a mid-epoch state resumes only with the same setting.

        Decode -- what turns JPEG bytes into a batch:

        decoder: ``'cpu'``; ``'dali'`` (raw JPEGs decoded on the GPU by
            :class:`imagenet_seq.decode.dali.DaliDecoder`); or a callable ``(jpegs, labels) ->
            (images, targets)`` applied to raw batches in the iterating thread.
        num_workers: decode workers (default: CPUs / ranks on this machine); 0 decodes in the
            iterating thread.
        worker_type: ``'thread'`` or ``'process'``; default: threads for the OpenCV path
            (less CPU per image: OpenCV releases the GIL), processes for torchvision-style
            transforms (Python code holding the GIL, torch's global RNG).
        image_size, resize_size, scale, ratio: the fast path's geometry.
        skip_broken: skip records that fail to decode (counted in ``skipped``) instead of
            raising :class:`imagenet_seq.decode.batch.RecordError`.
        channels_last: images in channels_last memory format (free: stored NHWC).

        Device -- where finished batches go:

        device: move batches there and normalise (ImageNet mean/std, float) with
            :func:`to_device` (``'cuda'`` where torch sees no CUDA device: ValueError at
            construction).
        pin_memory: as for ``DataLoader`` (pinned host batches; without a CUDA device it
            warns once and does nothing).

        Runtime -- how a pass runs:

        prefetch: batches in flight (default ``num_workers + 2``).
        stall_timeout: seconds to wait for one batch before raising an error that says what
            is stuck (a stopped worker, a hung read); ``None`` waits for ever.
        overlap_epochs: once the last batch of epoch ``e`` is read, go on reading, shuffling
            and decoding epoch ``e + 1`` (no stall between epochs: the buffer fill of the next
            epoch overlaps this one's tail). Default: on with a shuffle buffer (train), off
            without (val: nothing to fill; the file would stay open between passes). Used
            when the next ``iter`` asks for ``e + 1`` from its first batch at the same image
            size, else dropped. Memory across the boundary stays within :meth:`memory_bound`
            (the two epochs share the ``prefetch`` window; ``e``'s buffer is empty before
            ``e + 1``'s fills). Costs one extra buffer fill of reading after the last epoch
            (``close()`` stops it).

    One pass at a time: a pass's first ``next()`` stops an unfinished earlier pass, whose iterator then
    raises :class:`imagenet_seq.loader.epoch.Superseded` (never a silently short epoch); for two
    passes at once, make two Loaders.
    """

    def __init__(self, root: str, mode: str = "train", transform: Optional[Callable] = None, *,
                 # data
                 check_split: bool = True, verify: bool = False,
                 shard_dirs: Optional[List[str]] = None, shard_devices: Any = None,
                 # order
                 batch_size: int = 256, drop_last: bool = False, shuffle: Optional[bool] = None,
                 seed: int = 0, chunk_size: Optional[int] = None,
                 buffer_size: Optional[int] = None, buffer_bytes: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 distributed: Optional[bool] = None, node_reader: Optional[bool] = None,
                 # decode
                 decoder: Union[str, Callable] = "cpu", num_workers: Optional[int] = None,
                 worker_type: Optional[str] = None, image_size: int = 224,
                 resize_size: int = 256, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), skip_broken: bool = False,
                 channels_last: bool = False,
                 # device
                 device: Any = None, pin_memory: bool = False,
                 # runtime
                 prefetch: Optional[int] = None, stall_timeout: Optional[float] = 300.0,
                 overlap_epochs: Optional[bool] = None):
        arguments = dict(locals())  # exactly the parameters above (a test keeps resolve's same)
        del arguments["self"]
        settings, self.reader = resolve(**arguments)
        self._current = Current(settings)
        self._node_client_shut = False
        if settings.order.node_reader:
            self.reader = _node_client(settings, self.reader)
        self.finish = Finish(settings.device.pin, settings.device.device,
                             settings.decode.channels_last)
        self._cursor = resume_state.Cursor()
        self._passes = Passes(self.reader, self.finish)

    @property
    def settings(self) -> Settings:
        """What this Loader resolved its arguments to (frozen; ``set_image_size`` replaces it)."""
        return self._current.settings

    # the arguments as resolved, under their own names
    mode = _setting("data.mode", "``'train'`` or ``'val'``")
    meta = _setting("data.meta", "The file's metadata")
    dataset_size = _setting("data.num_records", "Records in the split")
    verify = _setting("data.verify", "Records checked against their checksums")
    classes = property(lambda self: list(self.settings.data.classes),
                       doc="Class names, in label order")
    batch_size = _setting("order.batch_size", "Images per batch")
    drop_last = _setting("order.drop_last", "The partial last batch is left out")
    plan = _setting("order.plan", "This rank's order (:class:`~imagenet_seq.plan.stage.Plan`)")
    seed = _setting("order.plan.seed", "The randomness of order and augmentation")
    rank = _setting("order.plan.rank", "This process's rank")
    world_size = _setting("order.plan.world_size", "Ranks reading the split")
    shuffle = _setting("order.plan.shuffle", "Chunks permuted and mixed by a buffer")
    chunk_size = _setting("order.plan.chunk_size", "Records per contiguous read")
    buffer_size = _setting("order.plan.buffer_size", "Shuffle buffer in records (0: none)")
    decoder = _setting("decode.decoder", "``'cpu'``, ``'dali'`` or your callable")
    num_workers = _setting("decode.num_workers", "Decode workers")
    worker_type = _setting("decode.worker_type", "``'thread'`` or ``'process'``")
    image_size = _setting("decode.image_size", "Output side of the next passes")
    skip_broken = _setting("decode.skip_broken", "Undecodable records are skipped")
    channels_last = _setting("decode.channels_last", "Images in channels_last format")
    device = _setting("device.device", "Where batches go (None: the host)")
    pin_memory = _setting("device.pin_memory", "Pinned host batches asked for")
    prefetch = _setting("runtime.prefetch", "Batches in flight")
    stall_timeout = _setting("runtime.stall_timeout", "Seconds without a batch before an error")
    overlap_epochs = _setting("runtime.overlap_epochs", "Reading on into the next epoch")

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch of the next iterations (order and augmentation depend on it).

        After :meth:`load_state_dict`, ``set_epoch`` of the saved epoch keeps the resume
        position; another epoch starts that epoch from its first batch."""
        self._cursor.set_epoch(epoch)

    def set_image_size(self, size: int) -> None:
        """Output side (pixels) of the images of the next passes (progressive resizing).

        Travels with every batch, so the persistent workers honour it without a restart; the
        crop decode picks its DCT scale for it. Val keeps its resize/crop ratio (256/224).
        Works with the built-in transforms and DALI; a torchvision-style transform or a
        callable decoder decides its own size (TypeError). ``size`` must be an int in
        16..4096 (``loader.config.MAX_IMAGE_SIZE``).
        """
        size = check_size("set_image_size", size, low=16, call=True)
        decode = self.settings.decode
        if decode.decoder == "cpu":
            resized_transform(decode.transform, size)  # TypeError now, not in a worker
        elif decode.decoder != "dali":
            raise TypeError(f"set_image_size: decoder={decode.decoder!r} decides its own output "
                            "size; change it in your decoder instead")
        self._current.settings = self.settings.with_image_size(size)

    @property
    def epoch(self) -> int:
        """The epoch the next pass takes."""
        return self._cursor.epoch

    # DataLoader-shaped faces for code written against DataLoader + DistributedSampler
    # (PyTorch's ImageNet example, Lightning): see imagenet_seq/loader/faces.py
    sampler = property(lambda self: faces.LoaderSampler(self.settings.order, self._cursor),
                       doc=faces.LoaderSampler.__doc__)
    dataset = property(lambda self: faces.LoaderDataset(
        self.settings, getattr(self.reader, "split_reader", self.reader), self._cursor),
                       doc=faces.LoaderDataset.__doc__)
    batch_sampler = None  # as a DataLoader given batches by its dataset (Lightning reads it)

    @property
    def num_records(self) -> int:
        """Images this rank yields per epoch (``drop_last`` applied; skipped records counted)."""
        return self.settings.order.records

    def __len__(self) -> int:
        return self.settings.order.batches

    def read_spans(self, epoch: Optional[int] = None) -> List[order.Span]:
        """The contiguous reads of this rank in ``epoch`` (default: the next one)."""
        return self.plan.spans(self.epoch if epoch is None else epoch)

    def epoch_order(self, epoch: Optional[int] = None) -> np.ndarray:
        """Record indices in the order this rank yields them in ``epoch`` (no data read)."""
        return self.plan.epoch_order(self.epoch if epoch is None else epoch)

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Where this Loader is: the state to resume from (small; no data).

        Mid-pass: the epoch of the pass and the batches it has handed out (save after the step
        that used the last one). After a complete pass, or before any: the next epoch at batch
        0. Under DDP each rank saves its own. See :mod:`imagenet_seq.loader.state`.
        """
        epoch, batches = self._cursor.saved(len(self))
        return resume_state.make(self.settings, epoch, batches, self.finish.state())

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next ``iter(loader)`` yields exactly the batches
        the saved run would have yielded next (records, labels, augmented pixels, boundaries),
        without decoding the consumed part again; it reads again at most ``buffer_size``
        records (the shuffle buffer's contents at that point). (``decoder='dali'``: DALI draws
        crops from its own pipeline state: records and boundaries exact, train pixels not.)

        Raises:
            ValueError: a state of another split, seed, batch size, dataset size, format or
                state version; a mid-epoch state on another world size or rank (names the
                field, both values and the way out).
            RuntimeError: this Loader is in the middle of a pass.
        """
        it = self._passes.live()
        if it is not None and it.running:
            raise RuntimeError(
                f"load_state_dict while a pass over {self.reader.path} is running (epoch "
                f"{it.epoch}, {it.next_index} of {it.total} batches): call it before iter(loader), "
                "or end the pass first (finish it, or loader.close())")
        mine = resume_state.make(self.settings, self.epoch, 0, self.finish.state())
        resume_state.check(state_dict, mine, len(self))
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        size = state_dict.get("image_size")
        if size is not None and size != self.image_size:
            self.set_image_size(size)
        self.finish.restore(state_dict)
        self._cursor.restore(epoch, batches)
        self._passes.drop_read_ahead()  # what was read ahead is not this state's next batch

    def memory_bound(self) -> Dict[str, int]:
        """Estimated peak bytes this rank's loader holds, by part (excluding batches you keep).

        ``shuffle_buffer`` = buffer records x mean record; ``in_flight`` = ``prefetch`` raw +
        decoded batches (the process pool's shared rings have the same size); ``total``.
        """
        return memory_bound(self.settings)

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tuple[Any, torch.Tensor]]:
        """A pass that starts at its first ``next()``: its epoch (``set_epoch`` or the next
        number), resume point and workers are fixed then, not here. An iterator made and
        dropped without yielding (Lightning makes two before it calls ``set_epoch``) changes
        nothing: no epoch is consumed, no earlier pass is stopped."""
        return LazyPass(self._start_pass)

    def _start_pass(self):
        if self._node_client_shut:  # closed: a new pass connects again
            self.reader = _node_client(self.settings, self.reader.split_reader)
            self._passes.reader, self._node_client_shut = self.reader, False
        return self._passes.start(self._current, self._cursor)

    def close(self) -> None:
        """End an unfinished pass (its iterator ends: ``StopIteration``) and the decode
        workers (a later ``iter`` starts new ones). Also: ``with Loader(...) as ld:``, and
        garbage collection of the Loader. With the node reader: says goodbye to it (a later
        ``iter`` connects again)."""
        self._passes.close()
        if self.settings.order.node_reader and not self._node_client_shut:
            self._node_client_shut = True
            self.reader.shutdown()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # what the finish stage counts (the same for every decoder)
    skipped = property(lambda self: self.finish.skipped,
                       doc="Records skipped so far (``skip_broken``), every decoder alike.")
    skipped_records = property(lambda self: self.finish.skipped_records,
                               doc="The first 1000 skipped records: ``(index, reason)``.")
    last_batch_records = property(lambda self: self.finish.last_batch_records,
                                  doc="Record indices of the last batch's images, in order.")


def _node_client(settings: Settings, reader: Any) -> Any:
    """``reader`` behind this node's reader (:class:`~imagenet_seq.read.node_client.NodeClient`)."""
    from imagenet_seq.read.node_client import NodeClient

    plan = settings.order.plan
    return NodeClient(reader, rank=plan.rank, world_size=plan.world_size,
                      local_world_size=plan.node_ranks, seed=plan.seed, shuffle=plan.shuffle,
                      chunk_size=plan.chunk_size)


def settings_for(root: str, mode: str = "train", transform: Optional[Callable] = None,
                 **arguments: Any) -> Tuple[Settings, Any]:
    """:func:`~imagenet_seq.loader.config.resolve` with the Loader's defaults for every argument
    not given: ``(settings, reader)`` of the Loader these arguments would make, without its
    workers (a face that reads by the same plan itself: the DataFlow source)."""
    bound = inspect.signature(Loader.__init__).bind(None, root, mode, transform, **arguments)
    bound.apply_defaults()
    given = dict(bound.arguments)
    del given["self"]
    return resolve(**given)
