"""The user-facing entry point: ``from imagenet_seq.data import Loader``.

``ImagenetLoader`` is the same class under the original tool's name;
:func:`to_device` moves a uint8 batch to the GPU and normalises it there.
"""
from imagenet_seq.loader.device import IMAGENET_MEAN, IMAGENET_STD, to_device
from imagenet_seq.loader.loader import Loader
from imagenet_seq.decode.batch import RecordError

ImagenetLoader = Loader

__all__ = ["Loader", "ImagenetLoader", "to_device", "RecordError", "IMAGENET_MEAN",
           "IMAGENET_STD"]
