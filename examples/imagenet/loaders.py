"""The two data paths the ImageNet example compares: sequential LMDBs or a plain ImageFolder.

Both yield ``(uint8 NCHW images, int64 targets)`` batches on the host, so the training loop moves
and normalises them the same way (``imagenet_seq.data.to_device``). Under DDP both give every rank
the same number of train batches and every validation image exactly once across ranks.
"""
from __future__ import annotations

import argparse
import os
from typing import Tuple

import torch


def seq_loaders(args: argparse.Namespace, device: torch.device, num_workers: int,
                per_rank_batch: int, need_train: bool = True) -> Tuple[object, object, list]:
    """``imagenet_seq.data.Loader`` over ``args.data``'s ILSVRC-train/val.lmdb.

    Rank and world size come from the initialised process group. Returns (train or None, val,
    class names).
    """
    from imagenet_seq.data import Loader

    common = dict(batch_size=per_rank_batch, num_workers=num_workers, seed=args.seed,
                  pin_memory=device.type == "cuda", channels_last=args.channels_last,
                  image_size=args.image_size, resize_size=args.resize_size, decoder=args.decoder)
    if args.decoder == "dali":
        common["device"] = device
    try:
        val = Loader(args.data, "val", shuffle=False, **common)
    except FileNotFoundError as e:
        if all(os.path.isdir(os.path.join(args.data, d)) for d in ("train", "val")):
            raise FileNotFoundError(f"{e} (it looks like an ImageFolder: convert it, or train "
                                    "from the JPEG files with --loader folder)") from None
        raise
    train = Loader(args.data, "train", shuffle=True, **common) if need_train else None
    return train, val, list(val.meta.classes)


class _ContiguousShard(torch.utils.data.Sampler):
    """Rank r's contiguous slice of ``range(n)``: every index once across ranks, no padding."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.start, self.stop = n * rank // world_size, n * (rank + 1) // world_size

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def folder_loaders(args: argparse.Namespace, device: torch.device, rank: int, world_size: int,
                   num_workers: int, per_rank_batch: int,
                   need_train: bool = True) -> Tuple[object, object, list]:
    """torchvision ``ImageFolder`` + ``DataLoader`` over ``args.data``/train and /val (baseline).

    Train uses ``DistributedSampler`` (it pads so ranks get equal batch counts: what users run
    today); val uses a contiguous unpadded slice per rank so accuracy counts every image once.

    Raises:
        ImportError: torchvision is missing (with the pip line).
        FileNotFoundError: ``args.data`` has no train/ or val/ class folders.
    """
    from models import torchvision_problem

    problem = torchvision_problem()
    if problem:
        raise ImportError(f"--loader folder needs torchvision; {problem} (or use the default "
                          "--loader seq)")
    from torchvision import datasets, transforms
    for split in (("train", "val") if need_train else ("val",)):
        if not os.path.isdir(os.path.join(args.data, split)):
            raise FileNotFoundError(
                f"--loader folder: no {split}/ folder in {args.data!r}; pass the ImageFolder root "
                "(with train/<class>/ and val/<class>/), not the LMDB folder")
    to_uint8 = transforms.PILToTensor()  # uint8 CHW, normalised on the device like the seq path
    val_tf = transforms.Compose([transforms.Resize(args.resize_size),
                                 transforms.CenterCrop(args.image_size), to_uint8])
    val_set = datasets.ImageFolder(os.path.join(args.data, "val"), val_tf)
    kw = dict(batch_size=per_rank_batch, num_workers=num_workers,
              pin_memory=device.type == "cuda",
              persistent_workers=num_workers > 0)
    val = torch.utils.data.DataLoader(
        val_set, sampler=_ContiguousShard(len(val_set), rank, world_size), **kw)
    train = None
    if need_train:
        train_tf = transforms.Compose([transforms.RandomResizedCrop(args.image_size),
                                       transforms.RandomHorizontalFlip(), to_uint8])
        train_set = datasets.ImageFolder(os.path.join(args.data, "train"), train_tf)
        sampler = torch.utils.data.DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
        train = torch.utils.data.DataLoader(train_set, sampler=sampler, **kw)
        train.set_epoch = sampler.set_epoch  # same call as imagenet_seq's Loader
    return train, val, list(val_set.classes)
