"""Plug-ins for the training frameworks users already run.

* :mod:`imagenet_seq.integrations.timm` -- ``create_loader``: timm's factory, on the Loader
  (``pip install "imagenet_seq[timm]"``).
* :mod:`imagenet_seq.integrations.lightning` -- ``ImagenetSeqDataModule`` for PyTorch Lightning
  (``pip install "imagenet_seq[lightning]"``).
* :mod:`imagenet_seq.integrations.tensorpack` -- tensorpack DataFlows, imported as
  ``imagenet_seq.dataflow`` (``pip install "imagenet_seq[tensorpack]"``).

Each module imports its framework on import and names the pip line when it is missing or
older than the version tested.
"""
from typing import Tuple

__all__ = ["version_tuple", "require", "check_image_size"]


def version_tuple(version: str) -> Tuple[int, ...]:
    """``'2.6.0rc1'`` -> ``(2, 6, 0)``: the leading numbers of a version string."""
    out = []
    for part in str(version).split(".")[:3]:
        digits = ""
        for c in part:
            if not c.isdigit():
                break
            digits += c
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def require(module: str, minimum: Tuple[int, ...], extra: str, what: str):
    """Import ``module``; ImportError naming ``pip install "imagenet_seq[extra]"`` when it is
    missing or older than ``minimum``."""
    import importlib

    need = ".".join(map(str, minimum))
    pip = f'pip install "imagenet_seq[{extra}]"'
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs {module} >= {need}: {pip} ({e})") from e
    found = getattr(mod, "__version__", "0")
    if version_tuple(found) < minimum:
        raise ImportError(f"{what} needs {module} >= {need}, found {found}: {pip} --upgrade")
    return mod


def check_image_size(value, name: str = "image_size") -> int:
    """``value`` as an int in 16..4096 (the Loader's bound), or ValueError naming ``name`` and
    the value."""
    from imagenet_seq.loader.config import MAX_IMAGE_SIZE

    if isinstance(value, bool) or not hasattr(value, "__index__") \
            or not 16 <= int(value) <= MAX_IMAGE_SIZE:
        raise ValueError(f"{name}={value!r}; expected an int in 16..{MAX_IMAGE_SIZE} (pixels "
                         "per side)")
    return int(value)
