"""The Loader: plan -> read -> shuffle -> batch -> decode -> finish, one pass per epoch.

It only composes the stages (each its own module, same interface: iterate; ``state()`` /
restore where it holds state; ``close()``; see :mod:`imagenet_seq.loader`):
:class:`~imagenet_seq.plan.stage.Plan` (which records, in which order: a pure function),
:class:`~imagenet_seq.read.stage.Read` (one forward cursor per contiguous span),
:class:`~imagenet_seq.plan.shuffle.ShuffleBuffer` (bounded, replayable),
:class:`~imagenet_seq.loader.batcher.Batcher`, :class:`~imagenet_seq.decode.stage.Decode`
(persistent workers, any decoder) and :class:`~imagenet_seq.loader.finish.Finish` (skip count,
pinning, device). :mod:`.epoch` runs one pass (its reader thread, ordered hand-out);
:mod:`.state` is the resume state.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from imagenet_seq.plan import order
from imagenet_seq.loader import faces
from imagenet_seq.loader.config import default_workers as _default_workers
from imagenet_seq.loader.config import (WORKER_TYPES, check_args, check_device,  # noqa: F401
                                        check_size, make_transform, mean_record_bytes,
                                        memory_bound)
from imagenet_seq.plan.distributed import resolve_rank
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.plan.shuffle import buffer_records
from imagenet_seq.plan.stage import Plan
from imagenet_seq.decode.batch import DecodeSpec, resized_transform
from imagenet_seq.decode.stage import Decode
from imagenet_seq.loader import state as resume_state
from imagenet_seq.loader.epoch import EpochIterator, LazyPass, shutdown
from imagenet_seq.loader.finish import Finish
from imagenet_seq.malloc import trim


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

    Args:
        root: folder holding ``ILSVRC-<mode>.lmdb`` (or the .lmdb file itself).
        mode: ``'train'`` or ``'val'``.
        transform: ``None`` for the fast OpenCV path (train: RandomResizedCrop + flip; val:
            resize + centre crop), a :mod:`imagenet_seq.decode.transforms` transform, or a
            torchvision-style transform (PIL image in) collated like ``default_collate``.
            The fast path yields uint8 NCHW batches; add ``device=`` to get float32
            ImageNet-normalised batches on that device (the one-step switch from a torchvision
            transform: a float model fed uint8 batches fails in its first layer).
        batch_size, drop_last, pin_memory: as for ``torch.utils.data.DataLoader``.
        num_workers: decode workers (default: CPUs / ranks on this machine); 0 decodes in the
            iterating thread.
        shuffle: chunk permutation + shuffle buffer (default: True for train, False for val).
        seed: the randomness of order and augmentation.
        channels_last: images in channels_last memory format (free: stored NHWC).
        image_size, resize_size, scale, ratio: the fast path's geometry.
        buffer_size / buffer_bytes: shuffle buffer in records / bytes for this rank.
        chunk_size: records per contiguous read when chunks are permuted.
        rank, world_size, distributed: see :func:`imagenet_seq.plan.distributed.resolve_rank`.
        decoder: ``'cpu'``; ``'dali'`` (raw JPEGs decoded on the GPU by
            :class:`imagenet_seq.decode.dali.DaliDecoder`); or a callable ``(jpegs, labels) ->
            (images, targets)`` applied to raw batches in the iterating thread.
        device: move batches there and normalise (ImageNet mean/std, float) with :func:`to_device`
            (``'cuda'`` where torch sees no CUDA device: ValueError at construction).
        skip_broken: skip records that fail to decode (counted in ``skipped``) instead of
            raising :class:`imagenet_seq.decode.batch.RecordError`.
        worker_type: ``'thread'`` or ``'process'``; default: threads for the OpenCV path
            (less CPU per image: OpenCV releases the GIL), processes for torchvision-style
            transforms (Python code holding the GIL, torch's global RNG).
        prefetch: batches in flight (default ``num_workers + 2``).
        verify: check every record against the checksum stored at conversion before decoding
            (a mismatch is a :class:`RecordError` naming the key, or a skip with
            ``skip_broken``); ~70 us per 110 KB record, in the decode workers. Labels outside
            the classes are always an error, with or without it.
        stall_timeout: seconds to wait for one batch before raising an error that says what
            is stuck (a stopped worker, a hung read); ``None`` waits for ever.
        check_split: refuse a file whose metadata names the other split (``mode='train'`` on
            ``ILSVRC-val.lmdb`` would train on validation data).
        overlap_epochs: once the last batch of epoch ``e`` is read, go on reading, shuffling
            and decoding epoch ``e + 1`` (no stall between epochs: the buffer fill of the next
            epoch overlaps this one's tail). Default: on with a shuffle buffer (train), off
            without (val: nothing to fill; the file would stay open between passes). Used when the next ``iter`` asks for ``e + 1``
            from its first batch at the same image size, else dropped. Memory across the
            boundary stays within :meth:`memory_bound` (the two epochs share the ``prefetch``
            window; ``e``'s buffer is empty before ``e + 1``'s fills). Costs one extra buffer
            fill of reading after the last epoch (``close()`` stops it).

    One pass at a time: a pass's first ``next()`` stops an unfinished earlier pass, whose iterator then
    raises :class:`imagenet_seq.loader.epoch.Superseded` (never a silently short epoch); for two
    passes at once, make two Loaders.
    """

    def __init__(self, root: str, mode: str = "train", transform: Optional[Callable] = None, *,
                 batch_size: int = 256, num_workers: Optional[int] = None,
                 shuffle: Optional[bool] = None, drop_last: bool = False, seed: int = 0,
                 pin_memory: bool = False, channels_last: bool = False, image_size: int = 224,
                 resize_size: int = 256, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), buffer_size: Optional[int] = None,
                 buffer_bytes: Optional[int] = None, chunk_size: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 distributed: Optional[bool] = None,
                 decoder: Union[str, Callable] = "cpu", device: Any = None,
                 skip_broken: bool = False, worker_type: Optional[str] = None,
                 prefetch: Optional[int] = None, verify: bool = False,
                 stall_timeout: Optional[float] = 300.0, check_split: bool = True,
                 overlap_epochs: Optional[bool] = None):
        check_args(mode=mode, worker_type=worker_type, decoder=decoder, batch_size=batch_size,
                   num_workers=num_workers, seed=seed, stall_timeout=stall_timeout,
                   image_size=image_size, resize_size=resize_size)
        check_device(device, pin_memory)
        info = resolve_rank(rank, world_size, distributed)
        self.rank, self.world_size = info.rank, info.world_size
        self.reader = SplitReader(root, mode, check_split=check_split)
        if verify and self.reader.checksums is None:
            raise ValueError(
                f"verify=True, but {self.reader.path} has no record checksums (converted before "
                f"they existed{', by the original tool' if self.reader.legacy else ''}); add "
                f"them with `imagenet-seq-verify --add-checksums {self.reader.path}`, or pass "
                "verify=False")
        self.verify = verify
        self.stall_timeout = stall_timeout
        self.meta = self.reader.meta
        self.classes: List[str] = list(self.meta.classes)
        self.dataset_size = len(self.reader)
        self.mode = mode
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = (mode == "train") if shuffle is None else bool(shuffle)
        self.seed = seed
        self.chunk_size = chunk_size or order.DEFAULT_CHUNK_RECORDS
        order.read_spans(self.dataset_size, mode, rank=self.rank, world_size=self.world_size,
                         chunk_size=self.chunk_size)  # validates the combination now
        self._mean_bytes = mean_record_bytes(self.meta, self.reader, self.dataset_size)
        self.buffer_size = buffer_records(buffer_size, buffer_bytes, self._mean_bytes,
                                          info.local_world_size) if self.shuffle else 0
        self.num_workers = _default_workers(info.local_world_size) if num_workers is None \
            else num_workers
        self.prefetch = prefetch or self.num_workers + 2
        self.pin_memory = pin_memory
        self.channels_last = channels_last
        self.device = device
        self.skip_broken = skip_broken
        self.decoder = decoder
        self._dali = None
        self._decode: Optional[Decode] = None  # the decode stage: workers made on first iter
        self._decode_end = None
        self._transform, self._collate = make_transform(transform, mode, image_size,
                                                        resize_size, scale, ratio)
        # a TrainTransform / ValTransform passed in keeps its own size (not the default 224)
        self.image_size = int(getattr(self._transform, "size", image_size))
        self.plan = Plan(self.dataset_size, mode, seed, self.rank, self.world_size,
                         self.shuffle, self.chunk_size)
        self.finish = Finish(self._pin(), device, channels_last)
        self._resume: Optional[Tuple[int, int]] = None  # (epoch, batch) the next iter starts at
        self._position = None  # the last pass's epoch and batches handed out
        # default: where an epoch starts with a buffer fill (train); a val pass would only
        # keep its file open and a few decoded batches between passes
        self.overlap_epochs = (self.shuffle and self.buffer_size > 1) \
            if overlap_epochs is None else bool(overlap_epochs)
        self._carry: List[Any] = [None]  # next_pass, in a box the finaliser can hold
        # measured on 2 cores (benchmarks/results/workers.md): threads need ~20 % less CPU per
        # image on the OpenCV path (it releases the GIL); Python/PIL transforms hold the GIL
        # and use torch's global RNG, so they get processes.
        self.worker_type = worker_type or ("thread" if self._collate == "array" else "process")
        self.dali_args = dict(mode=mode, batch_size=batch_size, image_size=image_size,
                              resize_size=resize_size, scale=scale, ratio=ratio, seed=seed,
                              channels_last=channels_last)
        self._epoch = 0
        self._epoch_fixed = False
        # weak: an abandoned iterator (``next(iter(loader))``) is freed at once, stopping its
        # workers and closing the LMDB environment
        self._live: Optional[weakref.ref] = None
        self._live_lock = threading.Lock()

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch of the next iterations (order and augmentation depend on it).

        After :meth:`load_state_dict`, ``set_epoch`` of the saved epoch keeps the resume
        position; another epoch starts that epoch from its first batch."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}; expected >= 0")
        if self._resume is not None and self._resume[0] != int(epoch):
            self._resume = None
        self._epoch = int(epoch)
        self._epoch_fixed = True

    def set_image_size(self, size: int) -> None:
        """Output side (pixels) of the images of the next passes (progressive resizing).

        Travels with every batch, so the persistent workers honour it without a restart; the
        crop decode picks its DCT scale for it. Val keeps its resize/crop ratio (256/224).
        Works with the built-in transforms and DALI; a torchvision-style transform or a
        callable decoder decides its own size (TypeError). ``size`` must be an int in
        16..4096 (``loader.config.MAX_IMAGE_SIZE``).
        """
        size = check_size("set_image_size", size, low=16, call=True)
        if self.decoder == "cpu":
            resized_transform(self._transform, size)  # TypeError now, not in a worker
        elif self.decoder != "dali":
            raise TypeError(f"set_image_size: decoder={self.decoder!r} decides its own output "
                            "size; change it in your decoder instead")
        self.image_size = size
        self.dali_args["image_size"] = size

    @property
    def epoch(self) -> int:
        return self._epoch

    # DataLoader-shaped faces for code written against DataLoader + DistributedSampler
    # (PyTorch's ImageNet example, Lightning): see imagenet_seq/loader/faces.py
    sampler = property(lambda self: faces.LoaderSampler(self), doc=faces.LoaderSampler.__doc__)
    dataset = property(lambda self: faces.LoaderDataset(self), doc=faces.LoaderDataset.__doc__)
    batch_sampler = None  # as a DataLoader given batches by its dataset (Lightning reads it)

    @property
    def num_records(self) -> int:
        """Images this rank yields per epoch (``drop_last`` applied; skipped records counted)."""
        n = order.rank_records(self.dataset_size, self.mode, self.rank, self.world_size)
        return len(self) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = order.rank_records(self.dataset_size, self.mode, self.rank, self.world_size)
        return order.num_batches(n, self.batch_size, self.drop_last)

    def read_spans(self, epoch: Optional[int] = None) -> List[order.Span]:
        """The contiguous reads of this rank in ``epoch`` (default: the next one)."""
        return order.read_spans(self.dataset_size, self.mode,
                                seed=self.seed, epoch=self._epoch if epoch is None else epoch,
                                rank=self.rank, world_size=self.world_size, shuffle=self.shuffle,
                                chunk_size=self.chunk_size)

    def epoch_order(self, epoch: Optional[int] = None) -> np.ndarray:
        """Record indices in the order this rank yields them in ``epoch`` (no data read)."""
        return order.epoch_order(self.dataset_size, self.mode, seed=self.seed,
                                 epoch=self._epoch if epoch is None else epoch, rank=self.rank,
                                 world_size=self.world_size, shuffle=self.shuffle,
                                 chunk_size=self.chunk_size, buffer_size=self.buffer_size)

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Where this Loader is: the state to resume from (small; no data).

        Mid-pass: the epoch of the pass and the batches it has handed out (save after the step
        that used the last one). After a complete pass, or before any: the next epoch at batch
        0. Under DDP each rank saves its own. See :mod:`imagenet_seq.loader.state`.
        """
        pos = self._position  # the last pass's (shared with its iterator)
        if self._resume is not None:
            epoch, batches = self._resume
        elif pos is not None and pos.batches < len(self):
            epoch, batches = pos.epoch, pos.batches
        elif pos is not None:  # complete: the next epoch (or the one set_epoch chose since)
            epoch, batches = max(pos.epoch + 1, self._epoch), 0
        else:
            epoch, batches = self._epoch, 0
        return resume_state.make(self, epoch, batches)

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
        it = self._live() if self._live is not None else None
        if it is not None and it.running:
            raise RuntimeError(
                f"load_state_dict while a pass over {self.reader.path} is running (epoch "
                f"{it.epoch}, {it.next_index} of {it.total} batches): call it before iter(loader), "
                "or end the pass first (finish it, or loader.close())")
        mine = resume_state.make(self, self._epoch, 0)
        resume_state.check(state_dict, mine, len(self))
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        size = state_dict.get("image_size")
        if size is not None and size != self.image_size:
            self.set_image_size(size)
        self.finish.restore(state_dict)
        self._epoch = epoch
        self._resume = (epoch, batches) if batches else None
        self._position = None
        shutdown(self._carry, None)  # what was read ahead is not this state's next batch

    def memory_bound(self) -> Dict[str, int]:
        """Estimated peak bytes this rank's loader holds, by part (excluding batches you keep).

        ``shuffle_buffer`` = buffer records x mean record; ``in_flight`` = ``prefetch`` raw +
        decoded batches (the process pool's shared rings have the same size); ``total``.
        """
        sized = isinstance(getattr(self._transform, "size", None), int)
        return memory_bound(self.batch_size, self._mean_bytes, self.buffer_size, self.prefetch,
                            self.image_size if sized or self.decoder == "dali" else None)

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tuple[Any, torch.Tensor]]:
        """A pass that starts at its first ``next()``: its epoch (``set_epoch`` or the next
        number), resume point and workers are fixed then, not here. An iterator made and
        dropped without yielding (Lightning makes two before it calls ``set_epoch``) changes
        nothing: no epoch is consumed, no earlier pass is stopped."""
        return LazyPass(self._start_pass)

    def _start_pass(self) -> EpochIterator:
        with self._live_lock:  # two threads starting passes: one stops the other, never both
            old = self._live() if self._live is not None else None
            if old is not None:  # `break` earlier: stop its workers before starting new ones
                old.supersede()  # and if it is still iterated, it says so (not a short epoch)
            epoch = self._epoch
            start = 0
            if self._resume is not None and self._resume[0] == epoch:
                start = self._resume[1]
            self._resume = None
            if not self._epoch_fixed:
                self._epoch += 1
            carry, self.next_pass = self.next_pass, None
            if carry is not None:  # the last pass read on into the next epoch: this one?
                following = carry[0].continues(epoch, start, self.image_size, carry[1])
                if following is None:
                    carry[0].close()
                carry = None if following is None else (carry[0], following)
            it = EpochIterator(self, epoch, start, carry)
            self._position = it.position
            self._live = weakref.ref(it)
        return it

    def decode_stage(self) -> Decode:
        """The decode stage; its workers start on the first call and live until ``close()``."""
        if self._decode is None:
            if self.decoder == "cpu":
                spec = DecodeSpec(self._transform, self.seed, 0, self._collate,
                                  self.channels_last, self.skip_broken, self.reader.path)
                if self.num_workers and self.worker_type == "process":
                    trim()  # freed memory of this process: not into the forked workers
                self._decode = Decode(
                    spec, self.num_workers, self.worker_type, prefetch=self.prefetch,
                    batch_size=self.batch_size,
                    slot_bytes=int(2 * self.batch_size * self._mean_bytes) + (4 << 20),
                    touch_bytes=int(self.batch_size * self._mean_bytes), pin_memory=self._pin(),
                    source=self.reader.path)
            else:
                self._decode = Decode(external=self._external_decoder(),
                                      source=self.reader.path)
            # the workers (and a feeder reading ahead) end with the Loader even if close() is
            # never called
            self._decode_end = weakref.finalize(self, shutdown, self._carry, self._decode)
        if self._dali is not None:
            self._dali.set_image_size(self.image_size)
        return self._decode

    def _external_decoder(self) -> Callable:
        if self.decoder != "dali":
            return self.decoder
        from imagenet_seq.decode.dali import DaliDecoder  # lazily: nvidia-dali is an optional extra

        self._dali = DaliDecoder(device=self.device, output="uint8",
                                 skip_broken=self.skip_broken, rank=self.rank, **self.dali_args)
        return self._dali

    def close(self) -> None:
        """End an unfinished pass (its iterator ends: ``StopIteration``) and the decode
        workers (a later ``iter`` starts new ones). Also: ``with Loader(...) as ld:``, and
        garbage collection of the Loader."""
        with self._live_lock:
            it = self._live() if self._live is not None else None
            self._live = None
        if it is not None:
            it.close()
        shutdown(self._carry, None)
        if self._decode_end is not None:
            self._decode_end()  # Decode.close, once
            self._decode = self._decode_end = None

    @property
    def next_pass(self):
        """``overlap_epochs``: the finished pass's feeder, reading on into the next epoch, and
        where that epoch starts in its stream; the next ``iter`` adopts or closes it."""
        return self._carry[0]

    @next_pass.setter
    def next_pass(self, value) -> None:
        self._carry[0] = value

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

    def _pin(self) -> bool:
        return self.pin_memory and self.device is None and torch.cuda.is_available()
