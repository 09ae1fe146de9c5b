"""What a record's bytes are: a JPEG, read from its header without decoding a pixel.

The converter checks and cleans the files it stores with these functions
(:mod:`imagenet_seq.convert.images`); the decoder reads each record's frame size with them
before it picks a crop and a DCT scale (:mod:`imagenet_seq.decode.transforms`).

* :func:`segments` walks the header segments up to the start of scan (SOS);
* :func:`jpeg_size` reads the frame size, :func:`inspect_jpeg` the colour components, an EXIF
  segment and the pixel count, checking the end-of-image marker too;
* :func:`strip_exif` drops the EXIF segments losslessly (the entropy-coded data untouched).

A header that is cut off or malformed raises :class:`BrokenImage` with the reason.
"""
from __future__ import annotations

import struct
from typing import Iterator, Optional, Tuple

__all__ = ["BrokenImage", "SOF_MARKERS", "segments", "jpeg_size", "inspect_jpeg", "strip_exif"]


class BrokenImage(Exception):
    """Bytes that are not a usable image; ``str(e)`` is the reason (the converter's report)."""


# start-of-frame markers (baseline, progressive, lossless, ...): the segment holding the size
SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                         0xCE, 0xCF))
_EXIF = b"Exif\x00\x00"


def segments(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """Yield (marker, start, end) of each header segment up to and including SOS.

    Raises BrokenImage when the header structure is cut off or malformed.
    """
    pos = 2
    n = len(data)
    while True:
        # markers may be preceded by fill bytes 0xFF
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1
        if pos + 4 > n:
            raise BrokenImage("truncated JPEG (header ends early)")
        if data[pos] != 0xFF:
            raise BrokenImage(f"corrupt JPEG (no marker at byte {pos})")
        marker = data[pos + 1]
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if end > n:
            raise BrokenImage("truncated JPEG (header segment cut off)")
        yield marker, pos, end
        if marker == 0xDA:  # SOS: entropy-coded data follows
            return
        pos = end


def jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a JPEG's frame header without decoding pixels.

    Returns:
        ``None`` when ``data`` is not a JPEG or its header is malformed (the caller then falls
        back to a full decode, which reports real errors).
    """
    if data[:2] != b"\xff\xd8":
        return None
    try:
        for marker, start, _end in segments(data):
            if marker in SOF_MARKERS:
                h, w = struct.unpack_from(">HH", data, start + 5)
                return (w, h) if w > 0 and h > 0 else None
    except (BrokenImage, struct.error):
        return None
    return None


def inspect_jpeg(data: bytes) -> Tuple[int, bool, int]:
    """(colour components, has EXIF APP1, pixels) of a JPEG; BrokenImage if truncated."""
    components = pixels = 0
    has_exif = False
    sos_end = None
    for marker, start, end in segments(data):
        if marker in SOF_MARKERS:
            components = data[start + 9]
            height, width = struct.unpack_from(">HH", data, start + 5)
            pixels = height * width
        elif marker == 0xE1 and data[start + 4:start + 10] == _EXIF:
            has_exif = True
        elif marker == 0xDA:
            sos_end = end
    if components == 0:
        raise BrokenImage("corrupt JPEG (no frame header)")
    # 0xFF in entropy-coded data is always followed by 0x00 or a restart marker, so FFD9 after
    # the first scan header can only be the end-of-image marker.
    if data.rfind(b"\xff\xd9", sos_end) < 0:  # from the end: EOI is normally the last 2 bytes
        raise BrokenImage("truncated JPEG (no end-of-image marker)")
    return components, has_exif, pixels


def strip_exif(data: bytes) -> bytes:
    """The same JPEG without its EXIF APP1 segments (entropy data untouched)."""
    parts = [data[:2]]
    last = 2
    for marker, start, end in segments(data):
        if marker == 0xE1 and data[start + 4:start + 10] == _EXIF:
            parts.append(data[last:start])
            last = end
    parts.append(data[last:])
    return b"".join(parts)
