"""Checkpoints of the ImageNet example: written every epoch, atomically, by rank 0 only.

A checkpoint holds what ``--resume`` needs to continue exactly where the run stopped: the model
(without the DDP wrapper), optimizer, LR schedule, AMP grad scaler, the next epoch and the best
top-1 so far, plus the arch and class count so a mismatched resume fails with a clear message.
A mid-epoch checkpoint (``--save-every N`` steps) has ``epoch`` = the unfinished epoch,
``step`` and ``loader``: every rank's ``Loader.state_dict()`` (gathered to rank 0), so each
rank resumes its own share at that batch, with the records and augmented pixels an
uninterrupted run would have had.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional

import torch
from torch import nn

LAST = "checkpoint.pth"
BEST = "model_best.pth"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(out_dir: str, state: Dict[str, Any], is_best: bool) -> str:
    """Write ``out_dir/checkpoint.pth`` (and copy it to ``model_best.pth`` when ``is_best``).

    Written to a temporary name and renamed, so a crash mid-write leaves the previous checkpoint.
    Returns the checkpoint's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LAST)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    if is_best:
        shutil.copyfile(path, os.path.join(out_dir, BEST) + ".tmp")
        os.replace(os.path.join(out_dir, BEST) + ".tmp", os.path.join(out_dir, BEST))
    return path


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler=None, scaler=None, arch: Optional[str] = None,
                    num_classes: Optional[int] = None) -> Dict[str, Any]:
    """Restore a checkpoint into the given objects; return it (``epoch``, ``best_acc1``, ...).

    ``path`` may be the file or the ``--output-dir`` folder holding ``checkpoint.pth``.

    Raises:
        FileNotFoundError: nothing at ``path`` (the message says how to start without it).
        ValueError: the file is not a checkpoint of this example, or holds another arch or class
            count than the run asks for.
    """
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--resume {path!r}: no such checkpoint; pass the checkpoint.pth written by an "
            "earlier run (in its --output-dir), or drop --resume to start from scratch")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a corrupt/foreign file
        raise ValueError(f"--resume {path!r} is not a readable checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise ValueError(f"--resume {path!r} is not a checkpoint written by this example")
    if arch is not None and ckpt.get("arch") not in (None, arch):
        raise ValueError(f"--resume {path!r} holds arch {ckpt['arch']!r} but the run asks for "
                         f"-a {arch}; pass -a {ckpt['arch']}")
    if num_classes is not None and ckpt.get("num_classes") not in (None, num_classes):
        raise ValueError(f"--resume {path!r} was trained on {ckpt['num_classes']} classes, the "
                         f"data has {num_classes}")
    unwrap(model).load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    ckpt["path"] = path
    return ckpt
