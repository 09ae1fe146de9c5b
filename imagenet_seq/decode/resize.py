"""Resizing for the fast path: torchvision's antialiased bilinear (or bicubic) filter, on uint8
HWC images.

torchvision's ``Resize`` / ``RandomResizedCrop`` on PIL images (and on tensors with
``antialias=True``) use an antialiased bilinear filter at every shrink: each output pixel is a
triangle-weighted mean of the input pixels under a triangle as wide as the shrink factor.
OpenCV's ``INTER_LINEAR`` reads only the 2x2 nearest input pixels, so below a 2x shrink it
aliases, and its ``INTER_AREA`` is a box filter: both give other pixels than torchvision (issue
#11 measured 1.9 grey levels mean, p99 11, on val images), and a model trained on one filter
scores lower when evaluated on the other.

:func:`resize_into` computes torchvision's filter with torch's uint8 antialiased kernel
(``_upsample_bilinear2d_aa``, the one behind ``F.interpolate(..., antialias=True)``, written to
match PIL's ``Image.resize(BILINEAR)``: at most 1 grey level apart, measured in
``tests/test_fidelity_pixels.py``). It runs on one core (no intra-op threads, so decode threads
do not multiply) at ~2.5-3x the cost of ``INTER_LINEAR``. ``antialias=False`` keeps the old,
faster, *different* filter (``INTER_LINEAR``, ``INTER_AREA`` from a 2x shrink) as an explicit
choice.

DCT-scaled decoding (libjpeg's 1/2, 1/4, 1/8 IDCT) is a different low-pass filter than the
triangle: decoding at 1/d and then shrinking by only a little more gives visibly other pixels
(measured on 2000x1500 photos, 224 px crops: mean 1.4 grey levels apart at a remaining shrink of
1x, 0.37 at 2x, 0.28 at 3x). :func:`reduction` therefore only picks a scale 1/d when the image
still shrinks by at least ``REDUCING_GAP`` = 2 after it (Pillow's ``reducing_gap`` idea), which
keeps the mean difference under 0.5 grey level and p99 under 3. A crop box rarely falls on the
reduced image's pixel grid, and rounding it there shifts the crop by up to d/2 full-resolution
pixels (measured: mean 0.4-1.9 grey levels instead of 0.15-0.5), so reduced decodes are resized
from the exact fractional box (:func:`resize_box`, Pillow's ``resize(box=...)``).

``interpolation='bicubic'`` (timm's default for most models) is torchvision's
``Resize(..., InterpolationMode.BICUBIC)``: on a PIL image that is Pillow's antialiased bicubic
(a = -0.5, support widened by the shrink), and torch's uint8 ``_upsample_bicubic2d_aa`` (behind
``F.interpolate(..., mode='bicubic', antialias=True)``) is written to match it, at about the
cost of the bilinear kernel. Same policy for DCT-scaled decodes (``tests/test_bicubic.py``
measures both).
"""
from __future__ import annotations

import math
import threading
from typing import Tuple

import cv2
import numpy as np
import torch

__all__ = ["INTERPOLATIONS", "REDUCING_GAP", "check_interpolation", "reduction", "resize",
           "resize_box", "resize_into", "scratch", "growing"]

INTERPOLATIONS = ("bilinear", "bicubic")

REDUCING_GAP = 2
_DENOMS = (8, 4, 2)  # libjpeg scale denominators, largest reduction first


_OPS = {"bilinear": "_upsample_bilinear2d_aa", "bicubic": "_upsample_bicubic2d_aa"}
_PIL_FILTERS = {"bilinear": 2, "bicubic": 3}  # PIL.Image.BILINEAR, BICUBIC


def _aa_public(src: torch.Tensor, size: Tuple[int, int], out: torch.Tensor,
               mode: str = "bilinear") -> None:
    out.copy_(torch.nn.functional.interpolate(src, size=size, mode=mode, antialias=True,
                                              align_corners=False))


def _aa_op(src: torch.Tensor, size: Tuple[int, int], out: torch.Tensor,
           mode: str = "bilinear") -> None:
    # the op behind F.interpolate(antialias=True), writing straight into our buffer
    getattr(torch._C._nn, _OPS[mode])(src, size, False, None, None, out=out)


# a torch that renames its private ops still gets the filters, through the public call
_aa = _aa_op if all(hasattr(torch._C._nn, op) for op in _OPS.values()) else _aa_public


def check_interpolation(interpolation: str, antialias: bool = True) -> str:
    """``interpolation`` if the fast path has it with this ``antialias``, else ValueError."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of "
                         f"{', '.join(map(repr, INTERPOLATIONS))} (torchvision's antialiased "
                         "filters); for others pass a torchvision transform (per-image PIL path)")
    if interpolation != "bilinear" and not antialias:
        raise ValueError(f"interpolation={interpolation!r} with antialias=False: OpenCV's "
                         "filter is bilinear only; pass antialias=True (torchvision's pixels)")
    return interpolation

_local = threading.local()


def scratch(name: str, shape: Tuple[int, ...]) -> np.ndarray:
    """A per-thread reusable uint8 buffer (decode threads each get their own), one per shape."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get((name, shape))
    if buf is None:
        if len(bufs) >= 16:  # many image shapes (val): keep the memory bounded
            bufs.clear()
        buf = bufs[(name, shape)] = np.empty(shape, np.uint8)
    return buf


def growing(name: str, shape: Tuple[int, ...]) -> np.ndarray:
    """A per-thread uint8 array of ``shape`` in a buffer kept at the largest size asked so far:
    for shapes that change with every image (crop boxes), where :func:`scratch` would thrash."""
    n = math.prod(shape)
    bufs = getattr(_local, "growing", None)
    if bufs is None:
        bufs = _local.growing = {}
    buf = bufs.get(name)
    if buf is None or buf.size < n:
        buf = bufs[name] = np.empty(n, np.uint8)
    return buf[:n].reshape(shape)


def reduction(src_w: int, src_h: int, out_w: int, out_h: int, antialias: bool = True) -> int:
    """The libjpeg scale denominator (1, 2, 4 or 8) to decode a ``src_w x src_h`` region at,
    when it will be resized to ``out_w x out_h``.

    With ``antialias`` the region keeps at least ``REDUCING_GAP`` x the output size at the
    reduced scale (pixels within 0.5 grey level of a full decode, see the module docstring);
    without it, at least the output size (the old, faster policy).
    """
    gap = REDUCING_GAP if antialias else 1
    for d in _DENOMS:
        if src_w >= gap * d * out_w and src_h >= gap * d * out_h:
            return d
    return 1


def resize(bgr: np.ndarray, w: int, h: int, antialias: bool = True,
           buffer: str = "resized", interpolation: str = "bilinear") -> np.ndarray:
    """``bgr`` resized to ``(h, w, 3)``, in the calling thread's scratch buffer ``buffer``
    (valid until the next call with the same buffer name and shape). ``interpolation``: one of
    :data:`INTERPOLATIONS` (``'bicubic'`` needs ``antialias``)."""
    out = scratch(buffer, (h, w, 3))
    if antialias:
        # HWC arrays are NCHW tensors in channels_last layout: the kernel's fast uint8 path
        src = torch.from_numpy(bgr).permute(2, 0, 1).unsqueeze(0)
        _aa(src, (h, w), torch.from_numpy(out).permute(2, 0, 1)[None], interpolation)
    else:
        # INTER_AREA (a box filter) only where bilinear would skip source pixels
        big = bgr.shape[1] >= 2 * w and bgr.shape[0] >= 2 * h
        cv2.resize(bgr, (w, h), dst=out, interpolation=cv2.INTER_AREA if big else cv2.INTER_LINEAR)
    return out


def resize_box(img: np.ndarray, box: Tuple[float, float, float, float], w: int, h: int,
               buffer: str = "resized", interpolation: str = "bilinear") -> np.ndarray:
    """The fractional ``box`` ``(x0, y0, x1, y1)`` of ``img`` resized to ``(h, w, 3)`` with the
    antialiased ``interpolation`` filter (Pillow's, which torchvision's PIL path uses), in the
    calling thread's scratch buffer ``buffer``. For DCT-reduced decodes, whose crop box is
    fractional."""
    from PIL import Image

    src = Image.frombuffer("RGB", (img.shape[1], img.shape[0]), np.ascontiguousarray(img),
                           "raw", "RGB", 0, 1)  # channel order does not matter to a resize
    out = scratch(buffer, (h, w, 3))
    out[...] = np.asarray(src.resize((w, h), _PIL_FILTERS[interpolation], box=box))
    return out


def resize_into(bgr: np.ndarray, w: int, h: int, dst: np.ndarray, flip: bool = False,
                antialias: bool = True, interpolation: str = "bilinear") -> None:
    """Resize a BGR (view of an) image, flip it horizontally if asked, write RGB into ``dst``.

    Args:
        bgr: ``(H, W, 3)`` uint8, any strides with a unit channel step (a crop view is fine).
        dst: ``(h, w, 3)`` HWC or ``(3, h, w)`` CHW uint8 RGB.
        antialias: torchvision's antialiased bilinear filter (default); ``False``: OpenCV's
            ``INTER_LINEAR`` / ``INTER_AREA`` (faster, other pixels).
        interpolation: ``'bilinear'`` or ``'bicubic'`` (torchvision's antialiased filters).

    The colour swap is folded into the last copy (CHW: the B, G, R planes are split straight
    into the R, G, B planes of ``dst``), and intermediate images live in per-thread buffers, so
    nothing is allocated (or page-faulted) per image.
    """
    if dst.shape not in ((3, h, w), (h, w, 3)):
        raise ValueError(f"dst of shape {dst.shape}; expected {(h, w, 3)} or {(3, h, w)}")
    if bgr.shape[:2] != (h, w):
        bgr = resize(bgr, w, h, antialias, interpolation=interpolation)
    out = bgr
    if flip:
        out = cv2.flip(out, 1, dst=scratch("flipped", (h, w, 3)))
    if dst.shape == (3, h, w):
        cv2.split(out, [dst[2], dst[1], dst[0]])
    else:
        cv2.cvtColor(out, cv2.COLOR_BGR2RGB, dst=dst)
