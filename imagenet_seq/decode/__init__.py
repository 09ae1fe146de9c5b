"""Decoding: raw JPEG batches in, decoded uint8 batches out.

``transforms`` (per image: crop-only decode, torchvision-equal resize), ``batch`` (one batch),
``workers`` (inline / thread / process pools), ``stage`` (the decode stage, one contract for
every decoder), ``normalize`` (ImageNet's mean and std), ``dali`` (optional DALI decoder).

``from imagenet_seq.decode import TrainTransform`` keeps working; the names are loaded on first
use, so that importing one submodule does not import OpenCV through ``transforms``.
"""
__all__ = ["DecodeError", "TrainTransform", "ValTransform", "PILTransform", "jpeg_size",
           "sample_crop"]


def __getattr__(name):
    if name in __all__:
        from imagenet_seq.decode import transforms
        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
