"""Decoding: raw JPEG batches in, decoded uint8 batches out.

``transforms`` (per image: crop-only decode, torchvision-equal resize), ``batch`` (one batch),
``workers`` (inline / thread / process pools), ``dali`` (optional DALI stage).

``from imagenet_seq.decode import TrainTransform`` keeps working; the names are loaded on first
use so that importing a light submodule (``malloc``) does not import OpenCV and torch.
"""
_TRANSFORMS = ("DecodeError", "TrainTransform", "ValTransform", "PILTransform", "jpeg_size",
               "sample_crop")


def __getattr__(name):
    if name in _TRANSFORMS:
        from imagenet_seq.decode import transforms
        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
