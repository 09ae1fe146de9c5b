"""DALI's setup for :mod:`.dali`: the import with its install line, the output device, and
reading DALI's error messages (which sample failed; the informative line)."""
from __future__ import annotations

import re
from typing import Any, Optional, Tuple, Union

import torch

__all__ = ["INSTALL_LINE", "DEVICE_PADDING", "HOST_PADDING", "import_dali", "resolve_device",
           "failed_sample", "short_error"]

INSTALL_LINE = "pip install nvidia-dali-cuda120"
# nvJPEG scratch sizes from NVIDIA's ImageNet examples: big enough for ImageNet's largest
# images, so the mixed decoder never reallocates mid-epoch
DEVICE_PADDING = 211025920
HOST_PADDING = 140544512


def import_dali() -> Tuple[Any, Any, Any]:
    """``(nvidia.dali, nvidia.dali.fn, nvidia.dali.types)``, or an ImportError with the fix."""
    try:
        import nvidia.dali as dali
        from nvidia.dali import fn, types
    except ImportError as e:
        raise ImportError(
            f"decoder='dali' needs NVIDIA DALI, which cannot be imported ({e}). Install it with:\n"
            f"    {INSTALL_LINE}\n(or `pip install -e .[dali]`; CUDA 13 users: "
            "pip install nvidia-dali-cuda130), or use decoder='cpu'") from e
    return dali, fn, types


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """The torch device outputs go to; ``None`` = this process's current CUDA device, else CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}; expected None, 'cpu', 'cuda', 'cuda:N' or a "
                         f"torch.device ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}; DALI outputs go to 'cpu' or 'cuda[:N]' only")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was requested but CUDA is not available here (torch "
            f"{torch.__version__}, torch.version.cuda={torch.version.cuda}); pass device='cpu' "
            "to run DALI's CPU backend, or run on a machine with a GPU and a CUDA build of torch")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"device={device!r}, but only {torch.cuda.device_count()} CUDA "
                           "device(s) are visible (check CUDA_VISIBLE_DEVICES / LOCAL_RANK)")
    return torch.device("cuda", index)


def failed_sample(err: BaseException) -> Optional[int]:
    """The sample index DALI names in a decode error ("Failed to decode sample #3"), if any."""
    m = re.search(r"sample #(\d+)", str(err))
    return int(m.group(1)) if m else None


def short_error(err: BaseException) -> str:
    """The informative line of a DALI error (its message is mostly a traceback of the graph)."""
    text = str(err)
    m = re.search(r"encountered:\s*(.+)", text)
    line = m.group(1) if m else text.strip().splitlines()[-1] if text.strip() else repr(err)
    return line.strip()[:300]
