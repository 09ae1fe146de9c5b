"""One process-wide allocator setting that decoding processes want, and a heap trim.

With glibc's defaults every decoded full-size image (~0.5 MB) is a fresh mmap/munmap pair, and
the page faults of touching it make ``cv2.imdecode`` ~1.5x slower in a fresh interpreter than
after ``import torch`` (which happens to change the allocator's state); measured in
benchmarks/results/throughput.md. Raising the mmap and trim thresholds keeps freed image
buffers in the heap for the next decode.
"""
from __future__ import annotations

import ctypes
from typing import Optional

__all__ = ["M_TRIM_THRESHOLD", "M_MMAP_THRESHOLD", "keep_decode_buffers", "trim"]

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_decode_buffers() -> bool:
    """Tune glibc malloc for repeated image-sized allocations; False where that is not glibc."""
    libc = _glibc()
    try:
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        return True
    except AttributeError:  # no glibc (libc is None) or no mallopt
        return False


def trim() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``)."""
    libc = _glibc()
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False
