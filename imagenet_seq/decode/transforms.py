"""Per-image decode + augmentation: JPEG bytes -> (size, size, 3) uint8 RGB.

Pure functions of ``(bytes, rng)``: all randomness comes from the ``np.random.Generator`` the
caller passes, so a fixed generator gives a fixed image in any process or thread. The classes hold
only numbers (or a user's transform), so they pickle into worker processes.

* :class:`TrainTransform` — torchvision's ``RandomResizedCrop`` + horizontal flip, on OpenCV /
  libjpeg-turbo with **DCT-scaled decoding**: the crop is sampled in full-resolution
  coordinates from the JPEG header's size (no pixels decoded), then the image is decoded at the
  smallest libjpeg scale (1/2, 1/4, 1/8) after which the crop still shrinks 2x to ``size``
  (:func:`.resize.reduction`; less would change the pixels). Skipped IDCT work makes a 1/2
  decode about 2-3x cheaper than a full one. With the C
  extension :mod:`imagenet_seq.decode._jpegcrop` (built at install against the system libjpeg-turbo)
  only the crop is decoded: the iMCU columns covering it, rows above it skipped without IDCT,
  rows below it never read. Same pixels as decoding the whole image with OpenCV then slicing;
  without the extension (or for CMYK/YCCK JPEGs) the whole image is decoded with OpenCV.
* :class:`ValTransform` — resize the shorter side to ``resize`` then centre-crop ``size``
  (torchvision ``Resize(256)`` + ``CenterCrop(224)`` geometry).
* :class:`PILTransform` — the original tool's path: PIL ``convert('RGB')`` then a torchvision-style
  transform.

Interpolation: torchvision's antialiased bilinear filter at every scale (:mod:`.resize`), so
the pixels are torchvision's within 1 grey level (``interpolation='bicubic'``: its antialiased
bicubic, timm's default); ``antialias=False`` selects OpenCV's faster
``INTER_LINEAR`` / ``INTER_AREA``, which gives other pixels (and, measured, a model that scores
lower on torchvision-processed images). DCT-scaled decoding is used only where it keeps the
pixels (:func:`.resize.reduction`). EXIF orientation is always ignored
(``cv2.IMREAD_IGNORE_ORIENTATION``), as PIL does; preprocess strips EXIF anyway.
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Any, Callable, Optional, Tuple

import cv2
import numpy as np

from imagenet_seq.format.jpeg import jpeg_size
from imagenet_seq.decode.resize import (check_interpolation, growing, reduction, resize,
                                        resize_box, resize_into)

__all__ = ["DecodeError", "TrainTransform", "ValTransform", "PILTransform", "jpeg_size",
           "sample_crop"]

_FLAGS = cv2.IMREAD_IGNORE_ORIENTATION
# libjpeg scale denominator -> imread flag, largest reduction first
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8 | _FLAGS), (4, cv2.IMREAD_REDUCED_COLOR_4 | _FLAGS),
            (2, cv2.IMREAD_REDUCED_COLOR_2 | _FLAGS))
_FULL = cv2.IMREAD_COLOR | _FLAGS
_BY_DENOM = {1: _FULL, **dict(_REDUCED)}

try:
    from imagenet_seq.decode import _jpegcrop
    JPEGCROP_ERROR = ""
except ImportError as _e:  # not built (no libjpeg headers at install): whole-image cv2 decodes
    _jpegcrop = None
    JPEGCROP_ERROR = str(_e)
# what builds the extension: libjpeg-turbo's headers, then the package's build again
CROP_DECODE_FIX = ("apt-get install libjpeg62-turbo-dev (Ubuntu: libjpeg-turbo8-dev), then "
                   "pip install --force-reinstall --no-deps -e .")
_fallback_warned = False  # once per process: every Loader builds a TrainTransform


def _warn_crop_decode_fallback() -> None:
    """Warn (once per process) that train crops take the slower whole-image path."""
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    warnings.warn(
        "imagenet_seq: the crop-decode extension (imagenet_seq.decode._jpegcrop) is not built "
        f"({JPEGCROP_ERROR or 'not importable'}); train crops decode the whole image with "
        "OpenCV: same pixels, "
        f"~1.15x the CPU per image. Fix: {CROP_DECODE_FIX} (`imagenet-seq-info` shows what "
        "is on)", RuntimeWarning, stacklevel=3)


class DecodeError(ValueError):
    """The bytes of one record could not be decoded; the message says what failed."""


def sample_crop(width: int, height: int, scale: Tuple[float, float],
                ratio: Tuple[float, float], rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(x, y, w, h)``, sampled like torchvision's ``get_params``.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first box that
    fits is placed uniformly. If none fits, the whole image centre-cropped to the nearest allowed
    aspect ratio. All draws come from ``rng``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    s_lo, s_span, l_span = scale[0], scale[1] - scale[0], log_hi - log_lo
    random = rng.random
    for _ in range(10):
        # lo + span * random() is bit for bit what rng.uniform(lo, hi) computes, ~3x cheaper
        target = area * (s_lo + s_span * random())
        aspect = math.exp(log_lo + l_span * random())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _imdecode(data: bytes, flags: int, why: str = "") -> np.ndarray:
    if not data:
        raise DecodeError("empty record (0 bytes)")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if img is None:
        head = bytes(data[:8]).hex()
        raise DecodeError(f"OpenCV cannot decode {len(data)} bytes (first bytes {head}){why}; "
                          "not a JPEG/PNG or corrupt - re-run preprocess_sequential.py on the source")
    if img.ndim == 2:  # defensive: REDUCED/COLOR flags always give 3 channels
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img


def _check_size(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r}; expected a positive int (e.g. 224)")
    return int(value)


def _check_range(name: str, value: Tuple[float, float], positive: bool) -> Tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not lo <= hi or (positive and lo <= 0) or lo < 0:
        raise ValueError(f"{name}={value!r}; expected (low, high) with 0 {'<' if positive else '<='}"
                         f" low <= high, e.g. {'(3/4, 4/3)' if positive else '(0.08, 1.0)'}")
    return lo, hi


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) + random horizontal flip, DCT-scaled decode.

    Args:
        size: output side in pixels.
        scale: range of the crop's area as a fraction of the image area.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip: flip horizontally with probability 0.5.
        dct_scaling: decode at libjpeg scale 1/2, 1/4 or 1/8 when the crop keeps >= 2 x
            ``size`` pixels per side at that scale (within 0.5 grey level of a full decode, much
            less work; see :func:`.resize.reduction`). Turn off only to compare against a
            full-resolution decode.
        crop_decode: decode only the crop with :mod:`imagenet_seq.decode._jpegcrop` when it is built
            (same pixels as decoding the whole image, less work); when it is not built, the
            first such transform of the process warns (``RuntimeWarning``) and names the fix.
            Turn off only to compare against whole-image OpenCV decodes.
        antialias: torchvision's antialiased bilinear resize (default: the pixels of
            ``RandomResizedCrop`` on a PIL image, within 1 grey level). ``False``: OpenCV's
            ``INTER_LINEAR``/``INTER_AREA``, ~2.5x cheaper to resize but other pixels; a model
            trained on them scores lower on torchvision-processed images (``BENCHMARKS.md``).
        interpolation: ``'bilinear'`` (torchvision's default) or ``'bicubic'`` (timm's for
            most models): ``RandomResizedCrop(..., interpolation=...)``'s pixels on a PIL image.

    Call with ``(jpeg_bytes, rng)``; returns a C-contiguous ``(size, size, 3)`` uint8 RGB array.
    Draws from ``rng``: the crop (as :func:`sample_crop`), then one uniform for the flip.

    Raises:
        DecodeError: the bytes are not a decodable image.
    """

    def __init__(self, size: int = 224, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 dct_scaling: bool = True, crop_decode: bool = True,
                 antialias: bool = True, interpolation: str = "bilinear") -> None:
        self.size = _check_size("size", size)
        self.antialias = bool(antialias)
        self.interpolation = check_interpolation(interpolation, self.antialias)
        self.scale = _check_range("scale", scale, positive=False)
        self.ratio = _check_range("ratio", ratio, positive=True)
        self.flip = bool(flip)
        self.dct_scaling = bool(dct_scaling)
        self.crop_decode = bool(crop_decode)
        if self.crop_decode and _jpegcrop is None:
            _warn_crop_decode_fallback()

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip={self.flip}, dct_scaling={self.dct_scaling}, "
                f"crop_decode={self.crop_decode}, antialias={self.antialias}, "
                f"interpolation={self.interpolation!r})")

    def __call__(self, jpeg: bytes, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((self.size, self.size, 3), np.uint8)
        self.write(jpeg, rng, out)
        return out

    def write(self, jpeg: bytes, rng: np.random.Generator, dst: np.ndarray) -> None:
        """Like calling the transform, but into ``dst``: no intermediate image is allocated.

        Args:
            dst: ``(size, size, 3)`` RGB (HWC) or ``(3, size, size)`` RGB planes (CHW) uint8
                array, e.g. one image of a batch tensor; same pixels as ``self(jpeg, rng)``.
        """
        roi, sub = self._crop(jpeg, rng)
        flip = self.flip and rng.random() < 0.5
        if sub is not None and self.antialias:  # a reduced decode: resize the exact box
            roi = resize_box(roi, sub, self.size, self.size, interpolation=self.interpolation)
        resize_into(roi, self.size, self.size, dst, flip, self.antialias, self.interpolation)

    def _crop(self, jpeg: bytes, rng: np.random.Generator
              ) -> Tuple[np.ndarray, Optional[Tuple[float, float, float, float]]]:
        """Sample the crop (draws from ``rng``), decode (DCT-scaled) and return ``(region,
        box)``: the BGR pixels covering the crop, and for a reduced decode the crop's exact
        fractional box inside them (``None``: the region is the crop)."""
        dims = jpeg_size(jpeg)
        if dims is None:  # not a JPEG (or odd header): decode fully, take the size from pixels
            img = _imdecode(jpeg, _FULL)
            x, y, w, h = sample_crop(img.shape[1], img.shape[0], self.scale, self.ratio, rng)
            return img[y:y + h, x:x + w], None
        width, height = dims
        box = sample_crop(width, height, self.scale, self.ratio, rng)
        x, y, w, h = box
        denom = reduction(w, h, self.size, self.size, self.antialias) if self.dct_scaling else 1
        why = ""
        # libjpeg's scaled image is ceil(width / denom) x ceil(height / denom)
        x0, y0, x1, y1 = region = _scaled_box(box, denom, dims)
        sub = None if denom == 1 else _sub_box(box, denom, region)
        if self.crop_decode and _jpegcrop is not None:
            roi = growing("crop", (y1 - y0, x1 - x0, 3))
            try:
                _jpegcrop.decode_crop(jpeg, x0, y0, x1 - x0, y1 - y0, denom, roi)
                return roi, sub
            except _jpegcrop.UnsupportedError:
                pass  # CMYK/YCCK: OpenCV converts those
            except _jpegcrop.JpegError as e:
                # OpenCV bundles another libjpeg-turbo version: it has the last word
                why = f" (system libjpeg: {e})"
        img = _imdecode(jpeg, _BY_DENOM[denom], why)
        return img[y0:y1, x0:x1], sub


def _scaled_box(box: Tuple[int, int, int, int], denom: int,
                dims: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the pixels of an image of ``dims`` decoded at scale ``1/denom``
    that cover the full-resolution box ``(x, y, w, h)`` (reduced pixel i covers full-resolution
    pixels [i * denom, (i + 1) * denom); the scaled image is ``ceil(dims / denom)``)."""
    x, y, w, h = box
    if denom == 1:
        return x, y, x + w, y + h
    iw, ih = -(-dims[0] // denom), -(-dims[1] // denom)
    return (x // denom, y // denom, min(iw, -(-(x + w) // denom)),
            min(ih, -(-(y + h) // denom)))


def _sub_box(box: Tuple[int, int, int, int], denom: int,
             region: Tuple[int, int, int, int]) -> Tuple[float, float, float, float]:
    """The full-resolution ``box`` in the coordinates of the reduced ``region``: fractional,
    so that resizing it lands where torchvision's crop of the full image does."""
    x, y, w, h = box
    x0, y0, x1, y1 = region
    return (x / denom - x0, y / denom - y0, min(x1 - x0, (x + w) / denom - x0),
            min(y1 - y0, (y + h) / denom - y0))


class ValTransform:
    """Resize the shorter side to ``resize`` (aspect kept), then centre-crop ``size``.

    Geometry matches torchvision ``Resize(resize)`` + ``CenterCrop(size)``: the longer side
    becomes ``int(resize * long / short)``, the crop's top-left is ``round((side - size) / 2)``.
    Resized with torchvision's antialiased bilinear filter, or its bicubic one
    (``interpolation='bicubic'``: ``Resize(resize, InterpolationMode.BICUBIC)``'s pixels;
    ``antialias=False``: OpenCV's bilinear, see :class:`TrainTransform`). Decodes at libjpeg
    scale 1/2, 1/4 or 1/8 when the image still shrinks 2x after it (:func:`.resize.reduction`).
    Deterministic; ``rng`` is accepted for a uniform call signature and ignored.

    Raises:
        DecodeError: the bytes are not a decodable image.
        ValueError: ``size > resize``.
    """

    def __init__(self, size: int = 224, resize: int = 256, dct_scaling: bool = True,
                 antialias: bool = True, interpolation: str = "bilinear") -> None:
        self.size = _check_size("size", size)
        self.antialias = bool(antialias)
        self.interpolation = check_interpolation(interpolation, self.antialias)
        self.resize = _check_size("resize", resize)
        if self.size > self.resize:
            raise ValueError(f"size={size} > resize={resize}; the centre crop must fit inside the "
                             "resized image (e.g. size=224, resize=256)")
        self.dct_scaling = bool(dct_scaling)

    def __repr__(self) -> str:
        return (f"ValTransform(size={self.size}, resize={self.resize}, "
                f"antialias={self.antialias}, interpolation={self.interpolation!r})")

    def __call__(self, jpeg: bytes, rng: Any = None) -> np.ndarray:
        out = np.empty((self.size, self.size, 3), np.uint8)
        self.write(jpeg, rng, out)
        return out

    def write(self, jpeg: bytes, rng: Any, dst: np.ndarray) -> None:
        """Like calling the transform, but into ``dst`` (``(size, size, 3)`` HWC or
        ``(3, size, size)`` CHW uint8 RGB): same pixels, no intermediate image allocated."""
        dims = jpeg_size(jpeg)
        denom = 1
        if dims is not None:
            nw, nh = self._resized_dims(*dims)
            if self.dct_scaling:
                denom = reduction(dims[0], dims[1], nw, nh, self.antialias)
        img = _imdecode(jpeg, _BY_DENOM[denom])
        if dims is None:  # not a JPEG: the geometry comes from the decoded pixels
            nw, nh = self._resized_dims(img.shape[1], img.shape[0])
        mode = self.interpolation
        if denom > 1 and self.antialias:  # the whole image is (w / denom) x (h / denom)
            img = resize_box(img, (0, 0, dims[0] / denom, dims[1] / denom), nw, nh, "val", mode)
        elif (nw, nh) != (img.shape[1], img.shape[0]):
            img = resize(img, nw, nh, self.antialias, "val", mode)
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        crop = img[top:top + self.size, left:left + self.size]
        resize_into(crop, self.size, self.size, dst)

    def _resized_dims(self, w: int, h: int) -> Tuple[int, int]:
        """torchvision ``Resize(resize)``: the shorter side to ``resize``, the longer one
        ``int(resize * long / short)``, computed from the full-resolution size."""
        if w <= h:
            return self.resize, int(self.resize * h / w)
        return int(self.resize * w / h), self.resize


class PILTransform:
    """The original tool's path: ``PIL.Image.open(...).convert('RGB')`` then ``transform``.

    Args:
        transform: a callable taking a PIL RGB image (e.g. a torchvision ``Compose``); ``None``
            returns the decoded image as a ``(H, W, 3)`` uint8 array.

    Randomness: torchvision transforms draw from torch's (and Python's) global RNG. When ``rng``
    is given, both are seeded from ``rng`` for the call (state saved and restored around it), so a fixed
    ``rng`` gives a fixed output in worker processes too (not across threads sharing one process,
    which share torch's global RNG).

    Raises:
        DecodeError: PIL cannot read the bytes.
    """

    def __init__(self, transform: Optional[Callable[[Any], Any]]) -> None:
        self.transform = transform

    def __repr__(self) -> str:
        return f"PILTransform({self.transform!r})"

    def __call__(self, jpeg: bytes, rng: Optional[np.random.Generator] = None) -> Any:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(jpeg)) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise DecodeError(f"PIL cannot decode {len(jpeg)} bytes: {e}") from None
        if self.transform is None:
            return np.asarray(img)
        if rng is None:
            return self.transform(img)
        import random

        import torch

        seed = int(rng.integers(0, 2 ** 63 - 1))
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)  # some torchvision transforms use Python's random module
                return self.transform(img)
        finally:
            random.setstate(py_state)
