"""Validate and normalise one source image into the JPEG bytes a record stores.

The reference for pixels is ``PIL.Image.open(f).convert('RGB')`` (what torchvision's
ImageFolder feeds a model): no EXIF rotation, CMYK/YCCK converted the way PIL converts them,
grayscale replicated to three channels, a PNG's alpha dropped.

* Plain RGB / grayscale JPEGs (baseline or progressive) are stored byte for byte.
* EXIF segments are removed losslessly (no re-encode): OpenCV and DALI honour the EXIF
  orientation tag while PIL does not, and stripping it makes every decoder agree with PIL.
* CMYK/YCCK JPEGs, PNGs (also when named ``.JPEG``) and other formats PIL reads are converted
  with PIL and re-encoded as RGB JPEG (4:4:4, ``quality``).
* Truncated or undecodable files, and images above PIL's pixel limit (:func:`pixel_limit`),
  raise :class:`BrokenImage` with the reason.

The JPEG header is read by :mod:`imagenet_seq.format.jpeg` (the format's knowledge, shared
with the decoder).
"""
from __future__ import annotations

import io
import warnings
from typing import Optional, Tuple

import cv2
import numpy as np

from imagenet_seq.format.jpeg import BrokenImage, inspect_jpeg, strip_exif

__all__ = ["BrokenImage", "CONVERT_QUALITY", "IMAGE_EXTENSIONS", "inspect_jpeg", "normalise",
           "pixel_limit", "strip_exif"]

CONVERT_QUALITY = 95

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def pixel_limit() -> Optional[int]:
    """Pixels above which PIL refuses to open an image (``DecompressionBombError``): twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 by default), None if a user disabled it.

    torchvision's ImageFolder cannot load such an image, so it is never stored, whatever its
    format (OpenCV alone would decode a JPEG up to 2**30 pixels).
    """
    from PIL import Image

    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def _check_pixels(pixels: int) -> None:
    limit = pixel_limit()
    if limit and pixels > limit:
        raise BrokenImage(f"{pixels} pixels, above PIL's limit of {limit} (a decompression "
                          "bomb to PIL: torchvision's ImageFolder cannot open it either)")


def _decode_cv2(data: bytes, check_only: bool = False) -> Optional[np.ndarray]:
    """OpenCV's decode; None where libjpeg fails (truncated, corrupt header or scan).

    ``check_only``: decode at 1/8 scale. libjpeg still reads every scan's entropy-coded data
    (the failures a check is for) but skips most of the inverse DCT and the upsampling: ~3x
    less CPU per ImageNet JPEG (2.0 vs 6.2 ms on a loaded 2-core machine), and validation is
    most of the conversion's CPU.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    flags = cv2.IMREAD_REDUCED_COLOR_8 if check_only else cv2.IMREAD_COLOR
    return cv2.imdecode(arr, flags | cv2.IMREAD_IGNORE_ORIENTATION)


def _encode_bgr(bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr,
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality),
                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    if not ok:
        raise BrokenImage("re-encode failed")
    return buf.tobytes()


_STRIP_BYTES = 16 << 20


def _pil_bgr(data: bytes) -> np.ndarray:
    """PIL's RGB pixels (the reference), channels in OpenCV's BGR order.

    Memory: the decoded image plus one numpy copy, ~6 bytes per pixel at peak (7 for RGBA or
    CMYK sources while ``convert`` runs). Copied in strips: ``np.asarray(im)`` of a whole
    image goes through ``tobytes()`` and would hold two more copies.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # above MAX_IMAGE_PIXELS PIL warns from every worker; the README states the cost
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode != "RGB":  # convert() of an RGB image would copy it
                    rgb = im.convert("RGB")
                    im.close()
                    im = rgb
                with im:
                    w, h = im.size
                    out = np.empty((h, w, 3), np.uint8)
                    step = max(1, _STRIP_BYTES // max(1, 3 * w))
                    for y in range(0, h, step):
                        strip = np.asarray(im.crop((0, y, w, min(h, y + step))))
                        out[y:y + step] = strip[:, :, ::-1]
                    return out
    except UnidentifiedImageError:
        raise BrokenImage("not an image (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise BrokenImage(f"{e} (PIL refuses it: torchvision's ImageFolder cannot open it "
                          "either)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BrokenImage(f"undecodable image ({e})") from None


def _limit(img: np.ndarray, max_size: Optional[int]) -> Tuple[np.ndarray, bool]:
    h, w = img.shape[:2]
    if not max_size or max(h, w) <= max_size:
        return img, False
    s = max_size / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA), True


def normalise(data: bytes, max_size: Optional[int] = None,
              quality: int = CONVERT_QUALITY) -> Tuple[bytes, Optional[str]]:
    """Source file bytes -> (JPEG bytes to store, what was changed or None).

    Raises:
        BrokenImage: the file must be skipped; the message says why.
    """
    if not data:
        raise BrokenImage("empty file")
    note = None
    if data[:3] == b"\xff\xd8\xff":
        components, has_exif, pixels = inspect_jpeg(data)
        _check_pixels(pixels)
        if components in (1, 3):
            img = _decode_cv2(data, check_only=not max_size)  # pixels needed only to resize
            if img is not None:
                if max_size and max(img.shape[:2]) > max_size:
                    small, _ = _limit(img, max_size)
                    return _encode_bgr(small, quality), f"resized to max side {max_size}"
                if has_exif:
                    return strip_exif(data), "EXIF removed"
                return data, None
            note = "re-encoded (OpenCV cannot decode it)"
        else:
            note = f"{'CMYK/YCCK' if components == 4 else f'{components}-channel'} JPEG -> RGB"
    else:
        note = "converted to RGB JPEG"
    bgr = _pil_bgr(data)
    if bgr.size == 0:
        raise BrokenImage(f"unexpected decoded shape {bgr.shape}")
    bgr, resized = _limit(bgr, max_size)
    out = _encode_bgr(bgr, quality)
    if resized:
        note += f", resized to max side {max_size}"
    return out, note
