"""PyTorch Lightning: :class:`ImagenetSeqDataModule`, the Loader as a ``LightningDataModule``.

    from imagenet_seq.integrations.lightning import ImagenetSeqDataModule
    dm = ImagenetSeqDataModule('/data/lmdb', image_folder='/data/imagenet', batch_size=256,
                               num_workers=8)
    trainer = lightning.Trainer(accelerator='gpu', devices=8, strategy='ddp', max_epochs=90)
    trainer.fit(model, datamodule=dm)   # model: uint8 NCHW batches in (see below)

* ``prepare_data`` converts ``image_folder`` into ``data_dir`` once (Lightning runs it on one
  process per node); with both LMDBs already there it does nothing, so reruns are free.
* ``setup`` builds one train and one val Loader for this process, with the rank and world size
  of the trainer (``trainer.global_rank`` / ``trainer.world_size``): disjoint equal train shares,
  every val image once. Lightning does not replace the loaders with a ``DistributedSampler``
  (they are not ``DataLoader`` objects), so leave ``use_distributed_sampler`` as it is.
* Epochs: Lightning calls ``dataloader.sampler.set_epoch(epoch)`` before every epoch
  (``Loader.sampler``), which fixes the Loader's order and augmentation for that epoch.
* Epochs are decided by ``set_epoch`` only: Lightning makes two iterators before it calls
  ``set_epoch(0)``; a Loader's pass starts at its first batch, so those consume nothing and
  Lightning's epoch ``e`` is the Loader's ``epoch_order(e)``.
* Mid-epoch resume: the train loader Lightning sees has ``state_dict`` / ``load_state_dict``;
  Lightning stores them in its checkpoints and restores them on ``fit(ckpt_path=...)``: the
  resumed epoch yields exactly the batches the interrupted one had left. (Lightning fetches
  one batch ahead; the saved position is the batches it has processed, not the one it
  prefetched.) Under DDP the checkpoint holds every rank's state (gathered when it is saved)
  and each rank resumes from its own; a mid-epoch checkpoint of another world size is a
  ValueError saying so.
* Batches are ``(uint8 NCHW images, int64 targets)`` on the host; normalise on the device in
  the model, e.g. ``imagenet_seq.data.to_device(images, targets, self.device)`` in
  ``training_step``, or pass ``device=`` through ``loader_kwargs`` for float batches.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from imagenet_seq.integrations import check_image_size, require

LIGHTNING_MIN = (2, 0)
L = require("lightning", LIGHTNING_MIN, "lightning", "imagenet_seq.integrations.lightning")

__all__ = ["ImagenetSeqDataModule", "LIGHTNING_MIN"]


class _Batches:
    """What Lightning iterates: the Loader's batches, ``len``, ``sampler`` (for ``set_epoch``)."""

    def __init__(self, loader, module: "ImagenetSeqDataModule"):
        self.loader = loader
        self._module = module

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def batch_size(self) -> int:
        return self.loader.settings.order.batch_size

    batch_sampler = None  # Lightning reads it; batches come from the Loader itself

    def __getattr__(self, name: str) -> Any:  # everything else: the Loader's
        if name.startswith("__") or name in ("loader", "_module"):
            raise AttributeError(name)
        return getattr(self.loader, name)


class _ResumableBatches(_Batches):
    """:class:`_Batches` with ``state_dict``/``load_state_dict`` (Lightning's ``_Stateful``).

    Lightning writes the checkpoint from rank 0 only, and every rank loads that one file: a
    per-rank state would hand rank 0's position to every rank. So under DDP ``state_dict``
    gathers every rank's state (each rank calls it while the checkpoint is made, Lightning's
    contract for ``save_checkpoint``) and ``load_state_dict`` gives each rank its own.
    """

    def state_dict(self) -> Dict[str, Any]:
        state = self.loader.state_dict()
        trainer = self._module._trainer_or_none()
        if trainer is None:
            return state
        if self.loader.settings.data.mode == "train":
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            # Lightning holds one prefetched batch the step has not seen: resume after the
            # batches it processed
            if (0 < state["batches"] < len(self.loader)
                    and state["epoch"] == trainer.current_epoch and 0 <= done < state["batches"]):
                state = dict(state, batches=int(done))
        return _gather_ranks(state, self.loader.settings.order.plan.world_size)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.loader.load_state_dict(_this_ranks(state_dict, self.loader))


_RANKS_KEY = "imagenet_seq_rank_states"


def _gather_ranks(state: Dict[str, Any], world: int) -> Dict[str, Any]:
    """Every rank's loader state, in rank order (one process: the state itself)."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return state
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return {_RANKS_KEY: states, "world_size": len(states)}


def _this_ranks(saved: Dict[str, Any], loader) -> Dict[str, Any]:
    """This rank's state out of what :func:`_gather_ranks` saved."""
    if not isinstance(saved, dict) or _RANKS_KEY not in saved:
        return saved  # one process's state: the Loader checks its rank and world size
    plan = loader.settings.order.plan
    rank, world = plan.rank, plan.world_size
    states = saved[_RANKS_KEY]
    if len(states) == world:
        return states[rank]
    if all(s.get("batches") == 0 for s in states):  # an epoch boundary: any world size
        return states[0]
    raise ValueError(
        f"the checkpoint holds the mid-epoch loader states of {len(states)} ranks "
        f"(epoch {states[0].get('epoch')}), this run has {world}: resume on "
        f"{len(states)} ranks, or resume from a checkpoint saved at an epoch boundary (a "
        "mid-epoch position is not re-sharded)")


class ImagenetSeqDataModule(L.LightningDataModule):
    """Train and val :class:`imagenet_seq.data.Loader` as a ``LightningDataModule``.

    Args:
        data_dir: folder with (or to receive) ``ILSVRC-train.lmdb`` / ``ILSVRC-val.lmdb``.
        image_folder: ImageFolder root (``train/<class>/``, ``val/<class>/``) or anything
            ``preprocess_sequential.py`` reads; converted by ``prepare_data`` when the LMDBs
            are missing. ``None``: ``data_dir`` must hold them already.
        batch_size: per-process batch (Lightning's convention); ``val_batch_size`` defaults
            to it.
        num_workers: decode workers per process (default: the Loader's, CPUs / local ranks).
        image_size, resize_size, seed: as for the Loader.
        convert_workers: processes for the one-time conversion (default: all CPUs).
        loader_kwargs: any other Loader argument, for both splits (``channels_last``,
            ``buffer_bytes``, ``decoder``, ``device``...).
    """

    def __init__(self, data_dir: str, image_folder: Optional[str] = None, *,
                 batch_size: int = 256, val_batch_size: Optional[int] = None,
                 num_workers: Optional[int] = None, image_size: int = 224,
                 resize_size: int = 256, seed: int = 0, convert_workers: Optional[int] = None,
                 **loader_kwargs: Any):
        super().__init__()
        for bad in ("rank", "world_size", "distributed", "mode", "shuffle"):
            if bad in loader_kwargs:
                raise ValueError(f"ImagenetSeqDataModule sets {bad}= itself (from the trainer "
                                 "and the split); drop it from the arguments")
        self.data_dir, self.image_folder = data_dir, image_folder
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.image_size = check_image_size(image_size)
        self.resize_size = resize_size
        self.convert_workers = convert_workers
        self.loader_kwargs = loader_kwargs
        self.train_loader = None
        self.val_loader = None

    # -- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Convert ``image_folder`` once; nothing to do when both LMDBs exist."""
        from imagenet_seq import format as fmt

        have = [os.path.exists(os.path.join(self.data_dir, fmt.split_filename(s)))
                for s in fmt.SPLITS]
        if all(have):
            return
        if self.image_folder is None:
            missing = [fmt.split_filename(s) for s, h in zip(fmt.SPLITS, have) if not h]
            raise FileNotFoundError(
                f"{self.data_dir} lacks {', '.join(missing)}; pass image_folder= (an "
                "ImageFolder root) to convert it there, or run preprocess_sequential.py")
        from imagenet_seq.convert.cli import main as convert

        splits = [s for s, h in zip(fmt.SPLITS, have) if not h]
        args = [self.image_folder, self.data_dir, "--splits", ",".join(splits),
                "--no-progress"]
        if self.convert_workers is not None:
            args += ["--workers", str(self.convert_workers)]
        rc = convert(args)
        if rc != 0:
            raise RuntimeError(f"converting {self.image_folder} into {self.data_dir} failed "
                               f"(exit code {rc}); see the messages above")

    def setup(self, stage: Optional[str] = None) -> None:
        rank, world = self._ranks()
        common = dict(num_workers=self.num_workers, seed=self.seed, image_size=self.image_size,
                      resize_size=self.resize_size, rank=rank, world_size=world,
                      **self.loader_kwargs)
        from imagenet_seq.data import Loader

        if stage in (None, "fit") and self.train_loader is None:
            self.train_loader = Loader(self.data_dir, "train", batch_size=self.batch_size,
                                       shuffle=True, **common)
        if stage in (None, "fit", "validate") and self.val_loader is None:
            self.val_loader = Loader(self.data_dir, "val", batch_size=self.val_batch_size,
                                     shuffle=False, **common)

    def train_dataloader(self):
        if self.train_loader is None:
            self.setup("fit")
        return self._wrap(self.train_loader)

    def val_dataloader(self):
        if self.val_loader is None:
            self.setup("validate")
        return self._wrap(self.val_loader)

    def teardown(self, stage: Optional[str] = None) -> None:
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()

    # -- helpers -------------------------------------------------------------------------------
    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def _ranks(self):
        trainer = self._trainer_or_none()
        if trainer is None:
            return None, None  # the Loader's own resolution (a process group, or one rank)
        return int(trainer.global_rank), int(trainer.world_size)

    def _wrap(self, loader):
        cls = _ResumableBatches if hasattr(loader, "load_state_dict") else _Batches
        return cls(loader, self)
