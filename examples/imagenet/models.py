"""Model zoo of the ImageNet example: torchvision's architectures plus a tiny built-in CNN.

``tiny`` needs only torch, so the example, the demo and the tests run on a CPU without torchvision.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

BUILTIN = ("tiny",)


class TinyNet(nn.Module):
    """A 4-layer CNN (~0.1 M parameters, ~13 M multiply-adds at 224 px): learns the demo's sample classes in an epoch on a CPU.

    Not an ImageNet model: it exists so the whole training path (loader, AMP, DDP, checkpoints)
    runs in seconds without a GPU or torchvision.
    """

    def __init__(self, num_classes: int = 1000, width: int = 32):
        super().__init__()
        # a 4x4/4 "patchify" stem keeps the full-resolution cost low (most of a CNN's CPU time
        # is spent at high resolution), so on a CPU the data pipeline, not the model, is measured
        layers: List[nn.Module] = [nn.Conv2d(3, width // 2, 4, stride=4, bias=False),
                                   nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)]
        c_in = width // 2
        for c_out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# torchvision must be the build made for the installed torch (pip cannot pick it from an extra:
# it takes the newest wheel for the pinned torch, which may be built for another CUDA/CPU variant)
TORCHVISION_PIP = "pip install torch==2.14.1 torchvision==0.29.1"


def torchvision_problem() -> str:
    """Why torchvision's models cannot be used here ('' when they can), with the pip line."""
    try:
        import torchvision.models  # noqa: F401
    except ImportError:
        return ("torchvision is not installed: its archs such as resnet18 need it, in the build "
                f"made for your torch, e.g. `{TORCHVISION_PIP}` (a matching pair)")
    except (RuntimeError, OSError) as e:  # e.g. "operator torchvision::nms does not exist"
        return (f"torchvision is installed but does not load with torch {torch.__version__} "
                f"({type(e).__name__}: {str(e).splitlines()[0]}): it was built for another "
                f"torch; install a matching pair, e.g. `{TORCHVISION_PIP}`")
    return ""


def _torchvision_models():
    if torchvision_problem():
        return None
    import torchvision.models as tvm

    return tvm


def available_archs() -> List[str]:
    """Names ``-a`` accepts: the built-in ones, plus torchvision's when it is installed."""
    names = list(BUILTIN)
    tvm = _torchvision_models()
    if tvm is not None:
        names += sorted(tvm.list_models(module=tvm)) if hasattr(tvm, "list_models") else sorted(
            n for n in tvm.__dict__ if n.islower() and not n.startswith("_")
            and callable(tvm.__dict__[n]))
    return names


def build_model(arch: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """Create ``arch`` with a ``num_classes``-way classifier.

    Raises:
        ValueError: unknown arch (the message lists the available ones), or a torchvision arch
            asked for without torchvision installed (the message gives the pip line).
    """
    if arch == "tiny":
        if pretrained:
            raise ValueError("-a tiny has no pretrained weights; drop --pretrained")
        return TinyNet(num_classes)
    tvm = _torchvision_models()
    if tvm is None:
        raise ValueError(f"unknown arch {arch!r}; available: {', '.join(BUILTIN)} "
                         f"({torchvision_problem()})")
    if arch not in available_archs():
        raise ValueError(f"unknown arch {arch!r}; available: {', '.join(available_archs())}")
    if pretrained:
        return tvm.get_model(arch, weights="DEFAULT") if num_classes == 1000 else _refit(
            tvm.get_model(arch, weights="DEFAULT"), num_classes)
    return tvm.get_model(arch, num_classes=num_classes)


def _refit(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace a pretrained model's last Linear layer for ``num_classes`` outputs."""
    for name, mod in reversed(list(model.named_modules())):
        if isinstance(mod, nn.Linear):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], nn.Linear(mod.in_features, num_classes))
            return model
    raise ValueError(f"cannot find the classifier layer of {type(model).__name__}")
