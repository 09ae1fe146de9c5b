"""``loader.sampler`` and ``loader.dataset``: the DataLoader-shaped faces of a Loader.

Training scripts written for ``DataLoader`` + ``DistributedSampler`` touch a few attributes
beyond iteration. PyTorch's ImageNet example (``pytorch/examples``, ``imagenet/main.py``) calls
``train_sampler.set_epoch(epoch)`` and, in ``validate``, reads ``len(val_loader.sampler)`` and
``len(val_loader.dataset)`` and builds an auxiliary loader over
``Subset(val_loader.dataset, range(len(val_loader.sampler) * world_size, len(dataset)))`` for the
samples its ``DistributedSampler(drop_last=True)`` left out. PyTorch Lightning calls
``dataloader.sampler.set_epoch(epoch)`` before every epoch. With these faces that code runs
unchanged on a :class:`~imagenet_seq.loader.loader.Loader`:

* :class:`LoaderSampler` -- ``set_epoch`` (the Loader's), ``len()`` (records per rank; see
  below), ``iter()`` (the record indices this rank gets next epoch, no data read) and
  ``DistributedSampler``'s attributes ``num_replicas``, ``rank``, ``shuffle``, ``seed``,
  ``drop_last``, ``epoch``.
* :class:`LoaderDataset` -- a map-style dataset of every record of the split: ``len()`` = records
  of the split, ``dataset[i]`` = record ``i`` decoded by the Loader's own transform and
  per-record randomness (same pixels as in the Loader's batches), so ``Subset`` + ``DataLoader``
  over it work.

Validation under DDP: the Loader gives rank ``r`` the records ``[r*N//W, (r+1)*N//W)``, every
image once, nothing padded or dropped. ``len(val_loader.sampler)`` is therefore ``ceil(N / W)``
(the largest share, what ``DistributedSampler(drop_last=False)`` reports): then
``len(val_loader.sampler) * world_size >= len(val_loader.dataset)``, the example's leftover check
is false and its auxiliary loader is not built (nor needed: it would evaluate the last images a
second time). A rank's exact count is ``loader.num_records``. Train: ``N // W`` on every rank.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Iterator, Optional, Tuple

import torch

from imagenet_seq.loader.config import OrderSettings, Settings
from imagenet_seq.loader.state import Cursor

__all__ = ["LoaderSampler", "LoaderDataset"]


class LoaderSampler:
    """``loader.sampler``: the parts of ``DistributedSampler`` training scripts touch."""

    def __init__(self, order: OrderSettings, cursor: Cursor):
        self.order, self.plan, self._cursor = order, order.plan, cursor

    def set_epoch(self, epoch: int) -> None:
        """The Loader's ``set_epoch``: order and augmentation of the next pass."""
        self._cursor.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    @property
    def num_replicas(self) -> int:
        return self.plan.world_size

    @property
    def rank(self) -> int:
        return self.plan.rank

    @property
    def shuffle(self) -> bool:
        return self.plan.shuffle

    @property
    def seed(self) -> int:
        return self.plan.seed

    @property
    def drop_last(self) -> bool:
        return self.order.drop_last

    def __len__(self) -> int:
        n, world = self.plan.num_records, self.plan.world_size
        if self.plan.mode == "val":
            return -(-n // world)  # the largest share: len * world_size >= n, no leftover
        return n // world

    def __iter__(self) -> Iterator[int]:
        """Record indices this rank yields in the next pass, in order (no data read)."""
        return iter(self.plan.epoch_order(self.epoch).tolist())

    def __repr__(self) -> str:
        return (f"LoaderSampler({self.plan.mode}, rank {self.rank} of {self.num_replicas}, "
                f"epoch {self.epoch}, len {len(self)})")


class LoaderDataset(torch.utils.data.Dataset):
    """``loader.dataset``: every record of the split, by index, decoded like the Loader does.

    ``dataset[i]`` is ``(image, target)``: for the fast path a uint8 ``(3, H, W)`` tensor (what one
    row of the Loader's batch holds), for a torchvision-style transform its output; ``target`` an
    int. Train records use the Loader's current epoch's augmentation of record ``i``. Reads one
    record at a time (a seek each on a disk): meant for a few leftover images, not for epochs.
    Safe in ``DataLoader`` workers (each process opens the file itself).
    """

    def __init__(self, settings: Settings, reader: Any, cursor: Cursor):
        # the Loader's cursor, for its current epoch; not pickled (worker processes get numbers)
        self._cursor: Optional[Cursor] = cursor
        self.path = settings.data.path
        self._shards = settings.data.shard_starts  # errors name the shard file
        self.classes = list(settings.data.classes)
        self._size = settings.data.num_records
        self._source = reader
        self._spec = (settings.decode.transform, settings.order.plan.seed,
                      settings.decode.collate)
        self._epoch = cursor.epoch
        self._reader = None
        self._pid = -1

    def __len__(self) -> int:
        return self._size

    def _get_reader(self):
        if self._reader is None or self._pid != os.getpid():
            self._reader = copy.copy(self._source)  # no open file: opened on first read
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from imagenet_seq.decode.batch import DecodeSpec, decode_batch, pack_batch

        if not hasattr(index, "__index__"):
            raise TypeError(f"index={index!r}; expected an int")
        n, index = self._size, int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} outside the {n} records of {self.path}")
        items = list(self._get_reader().read_range(index, 1))
        transform, seed, collate = self._spec
        epoch = self._cursor.epoch if self._cursor is not None else self._epoch
        spec = DecodeSpec(transform, seed, epoch, collate, False, False, self.path,
                          self._shards)
        res = decode_batch(pack_batch(0, items), spec)
        return res.images[0], int(res.targets[0])

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._cursor is not None:
            state["_epoch"] = self._cursor.epoch
        state["_cursor"], state["_reader"], state["_pid"] = None, None, -1
        return state

    def __repr__(self) -> str:
        return f"LoaderDataset({self.path}, {len(self)} records)"
