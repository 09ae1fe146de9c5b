"""timm: :func:`create_loader`, timm's loader factory with the Loader underneath.

Takes the arguments of ``timm.data.create_loader`` that ``train.py`` passes (input size, batch
size, ``is_training``, mean/std, interpolation, ``re_prob``, ``auto_augment``, ``distributed``,
mixup/cutmix through ``collate_fn=FastCollateMixup(...)``, ``use_prefetcher``, ``device``...),
reads the split of ``dataset`` (an imagenet_seq LMDB folder) and returns what timm's own factory
returns: with ``use_prefetcher`` (timm's default) a ``timm.data.PrefetchLoader`` over uint8
batches, which moves them to ``device``, normalises them there and applies random erasing
(``re_prob``) on the device; without it, normalised float batches.

Augmentation paths:

* fast (chosen automatically when the arguments ask for nothing more): RandomResizedCrop
  (``scale``, ``ratio``) + horizontal flip, bilinear or bicubic (torchvision's antialiased
  filters: PIL's ``BILINEAR`` / ``BICUBIC`` pixels; bicubic is timm's default for most models,
  e.g. ``resnet10t``), crop-only DCT-scaled decode; eval: resize ``floor(size / crop_pct)`` +
  centre crop. Thread workers, no PIL.
* PIL-compatible: anything else (``auto_augment='rand-m9-mstd0.5'``, ``color_jitter``,
  ``interpolation='random'``, ``no_aug``, ``vflip``, aug splits...) runs timm's own
  ``create_transform(..., use_prefetcher=True)`` on each image in process workers: the same
  images timm's loader makes. timm's ``train.py`` default ``--color-jitter 0.4`` selects it;
  pass ``color_jitter=0`` (``--color-jitter 0``) for the fast path.

Each loader logs once, at INFO on the ``imagenet_seq.integrations.timm`` logger (timm's
``train.py`` shows INFO), which path it took and, for the per-image one, which arguments chose
it; :class:`TimmBatches` (``loader.loader`` under a ``PrefetchLoader``) keeps the same in
``path`` (``'fast'`` / ``'per-image'``) and ``path_reason``.

Differences from timm's loader: batches come in the Loader's order (exact epochs, chunked
sequential reads, shuffle buffer) instead of a ``DistributedSampler``; validation under
``distributed`` gives every image once with no padding (timm's ``OrderedDistributedSampler``
pads); training drops the last partial batch as timm does (``drop_last=is_training``: also
keeps ``FastCollateMixup``'s even batch). ``loader.sampler.set_epoch`` works as timm's
``train.py`` calls it.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from imagenet_seq.integrations import check_image_size, require

TIMM_MIN = (1, 0)
_timm = require("timm", TIMM_MIN, "timm", "imagenet_seq.integrations.timm")
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from timm.data import create_transform  # noqa: E402
from timm.data.loader import PrefetchLoader  # noqa: E402

__all__ = ["create_loader", "TIMM_MIN"]

DEFAULT_CROP_PCT = 0.875
FAST_INTERPOLATIONS = ("bilinear", "bicubic")
log = logging.getLogger(__name__)


class TimmBatches:
    """The Loader's batches as timm's loop expects them: ``collate_fn`` (e.g.
    ``FastCollateMixup``) applied per batch, ``sampler``/``dataset``/``collate_fn`` attributes,
    and (``normalize=(mean, std)``) float normalisation on the host for ``use_prefetcher=False``.
    ``path`` / ``path_reason``: the augmentation path :func:`create_loader` chose and why.
    """

    def __init__(self, loader, collate_fn: Optional[Callable] = None,
                 normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 path: str = "fast", path_reason: str = ""):
        self.loader = loader
        self.collate_fn = collate_fn
        self.path, self.path_reason = path, path_reason
        self._norm = None
        if normalize is not None:
            mean, std = normalize
            self._norm = (torch.tensor([m * 255 for m in mean]).view(1, -1, 1, 1),
                          torch.tensor([s * 255 for s in std]).view(1, -1, 1, 1))

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    batch_sampler = None

    def __iter__(self):
        for images, targets in self.loader:
            if self.collate_fn is not None:
                # timm's collate functions take samples: (uint8 CHW numpy, int) each
                arrays = images.numpy()
                images, targets = self.collate_fn(
                    [(arrays[i], int(t)) for i, t in enumerate(targets.tolist())])
            if self._norm is not None and images.dtype == torch.uint8:
                images = images.float().sub_(self._norm[0]).div_(self._norm[1])
            yield images, targets


def _size(input_size) -> int:
    if not isinstance(input_size, (tuple, list)):
        return check_image_size(input_size, "input_size")
    hw = tuple(input_size)[-2:]
    if len(hw) == 1 or hw[0] == hw[1]:
        return check_image_size(hw[0], "input_size")
    raise ValueError(f"input_size={input_size!r}: the Loader makes square images; use "
                     "(3, S, S)")


def _not_fast(is_training: bool, **a) -> list:
    """The arguments the fast path cannot honour (empty: it gives timm's augmentation)."""
    why = []
    if a["interpolation"] not in FAST_INTERPOLATIONS:
        why.append(f"interpolation={a['interpolation']!r}")
    if is_training:
        checks = {"no_aug": not a["no_aug"], "auto_augment": not a["auto_augment"],
                  "color_jitter": not a["color_jitter"], "grayscale_prob": not a["grayscale_prob"],
                  "gaussian_blur_prob": not a["gaussian_blur_prob"],
                  "hflip": a["hflip"] == 0.5, "vflip": not a["vflip"],
                  "num_aug_splits": not a["num_aug_splits"],
                  "train_crop_mode": a["train_crop_mode"] in (None, "rrc")}
    else:
        checks = {"crop_mode": a["crop_mode"] in (None, "center"),
                  "crop_border_pixels": not a["crop_border_pixels"]}
    why += [f"{k}={a[k]!r}" for k, ok in checks.items() if not ok]
    return why


def create_loader(dataset: str, input_size: Union[int, Tuple[int, ...]], batch_size: int,
                  is_training: bool = False, no_aug: bool = False, re_prob: float = 0.,
                  re_mode: str = "const", re_count: int = 1, re_split: bool = False,
                  train_crop_mode: Optional[str] = None,
                  scale: Optional[Tuple[float, float]] = None,
                  ratio: Optional[Tuple[float, float]] = None, hflip: float = 0.5,
                  vflip: float = 0., color_jitter: Optional[float] = 0.4,
                  color_jitter_prob: Optional[float] = None, grayscale_prob: float = 0.,
                  gaussian_blur_prob: float = 0., auto_augment: Optional[str] = None,
                  num_aug_repeats: int = 0, num_aug_splits: int = 0,
                  interpolation: str = "bilinear",
                  mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                  std: Tuple[float, ...] = IMAGENET_DEFAULT_STD, num_workers: int = 1,
                  distributed: bool = False, crop_pct: Optional[float] = None,
                  crop_mode: Optional[str] = None, crop_border_pixels: Optional[int] = None,
                  collate_fn: Optional[Callable] = None, pin_memory: bool = False,
                  fp16: bool = False, img_dtype: torch.dtype = torch.float32,
                  device: Any = torch.device("cuda"), use_prefetcher: bool = True,
                  split: Optional[str] = None, seed: int = 0, path: str = "auto",
                  **loader_kwargs: Any):
    """timm's ``create_loader`` over an imagenet_seq LMDB folder (see the module docstring).

    Args:
        dataset: folder with ``ILSVRC-train.lmdb`` / ``ILSVRC-val.lmdb`` (or one .lmdb file).
        split: ``'train'`` / ``'val'``; default from ``is_training``.
        seed: order and fast-path augmentation seed.
        path: ``'auto'``, ``'fast'`` (error if an argument needs the PIL path) or ``'pil'``.
        loader_kwargs: other :class:`imagenet_seq.data.Loader` arguments (``buffer_bytes``...).
        The rest: as timm's ``create_loader``. ``num_aug_repeats`` (repeated augmentation) is
        not supported (ValueError); ``persistent_workers``/``worker_seeding`` do not apply.

    Returns:
        ``timm.data.PrefetchLoader`` (``use_prefetcher=True``) or :class:`TimmBatches`.
    """
    from imagenet_seq.data import Loader

    if num_aug_repeats:
        raise ValueError("num_aug_repeats (repeated augmentation sampler) is not supported by "
                         "imagenet_seq's loader; use num_aug_repeats=0")
    if path not in ("auto", "fast", "pil"):
        raise ValueError(f"path={path!r}; expected 'auto', 'fast' or 'pil'")
    for key in ("persistent_workers", "worker_seeding", "use_multi_epochs_loader",
                "tf_preprocessing", "batch_choice_weights", "batch_choice_seed",
                "batch_choice_schedule", "batch_schedule_epochs", "batch_schedule_spread",
                "batch_schedule_random_mix"):
        loader_kwargs.pop(key, None)  # timm DataLoader options with no meaning here
    for key in ("input_size_choices", "batch_size_choices", "num_batches"):
        if loader_kwargs.pop(key, None) is not None:  # train.py passes None by default
            raise ValueError(f"{key} (timm's scheduled-size batch sampler) is not supported; "
                             "for progressive resizing call loader.loader.loader"
                             ".set_image_size(size) between epochs (see the README)")
    size = _size(input_size)
    crop_pct = crop_pct or DEFAULT_CROP_PCT
    scale = tuple(scale or (0.08, 1.0))
    ratio = tuple(ratio or (3 / 4, 4 / 3))
    why = _not_fast(is_training, interpolation=interpolation, no_aug=no_aug,
                    auto_augment=auto_augment, color_jitter=color_jitter,
                    grayscale_prob=grayscale_prob, gaussian_blur_prob=gaussian_blur_prob,
                    hflip=hflip, vflip=vflip, num_aug_splits=num_aug_splits,
                    train_crop_mode=train_crop_mode, crop_mode=crop_mode,
                    crop_border_pixels=crop_border_pixels)
    if path == "fast" and why:
        raise ValueError(f"path='fast' cannot honour {', '.join(why)}; use path='auto' (timm's "
                         "own transform for those) or drop them")
    fast = path == "fast" or (path == "auto" and not why)
    split = split or ("train" if is_training else "val")
    resize_size = int(math.floor(size / crop_pct))
    if fast:
        from imagenet_seq.decode.transforms import TrainTransform, ValTransform

        transform = (TrainTransform(size, scale, ratio, interpolation=interpolation)
                     if is_training else ValTransform(size, resize_size,
                                                      interpolation=interpolation))
        reason = (f"{'RandomResizedCrop + flip' if is_training else 'resize + centre crop'} "
                  f"with torchvision's antialiased {interpolation} filter, decoded by OpenCV in "
                  "thread workers")
    else:
        newer = {k: v for k, v in (("color_jitter_prob", color_jitter_prob),
                                   ("grayscale_prob", grayscale_prob),
                                   ("gaussian_blur_prob", gaussian_blur_prob)) if v}
        transform = create_transform(  # (arguments of later timm 1.0 releases only when used)
            (3, size, size), is_training=is_training, no_aug=no_aug, scale=scale, ratio=ratio,
            hflip=hflip, vflip=vflip, color_jitter=color_jitter, **newer,
            auto_augment=auto_augment,
            interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct,
            crop_mode=crop_mode, crop_border_pixels=crop_border_pixels,
            re_prob=0. if use_prefetcher else re_prob, re_mode=re_mode, re_count=re_count,
            re_num_splits=0, use_prefetcher=use_prefetcher,
            separate=num_aug_splits > 0, train_crop_mode=train_crop_mode)
        reason = "timm's create_transform on PIL images in process workers, " + (
            "path='pil' asked" if path == "pil" else
            f"because the fast path cannot honour {', '.join(why)} (it covers RandomResizedCrop"
            f" + flip / resize + centre crop, {' or '.join(FAST_INTERPOLATIONS)})")
    chosen = "fast" if fast else "per-image"
    base = Loader(dataset, split, transform,
                  batch_size=batch_size, num_workers=num_workers, shuffle=is_training,
                  drop_last=is_training, seed=seed, pin_memory=pin_memory,
                  image_size=size, resize_size=resize_size, scale=scale,
                  ratio=ratio, distributed=None if distributed else False, **loader_kwargs)
    log.info("imagenet_seq timm %s loader (%s, %d px): %s path: %s", split, dataset, size,
             chosen, reason)
    normalize = None if (use_prefetcher or not fast) else (mean, std)
    loader = TimmBatches(base, collate_fn, normalize, chosen, reason)
    if not use_prefetcher:
        return loader
    re_num_splits = (num_aug_splits or 2) if re_split else 0
    return PrefetchLoader(loader, mean=mean, std=std, channels=3, device=torch.device(device),
                          img_dtype=img_dtype, fp16=fp16, re_prob=re_prob if is_training else 0.,
                          re_mode=re_mode, re_count=re_count, re_num_splits=re_num_splits)
