"""Dropping a file's pages from the page cache, so a measurement reads the disk and not RAM.

``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` needs no root: the kernel drops the clean,
unmapped pages of that one file. Pages another process has mapped, or dirty pages, stay; so the
result is checked with ``mincore(2)`` where the platform has it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from typing import Optional, Tuple

from imagenet_seq.format.lmdbfile import data_file

__all__ = ["drop_cache", "page_residency", "cached_fraction", "evict"]


def drop_cache(path: str, fd: Optional[int] = None) -> None:
    """Ask the kernel to drop ``path``'s cached pages.

    Raises:
        OSError: the platform has no ``posix_fadvise`` or the call failed.
    """
    if not hasattr(os, "posix_fadvise"):
        raise OSError("os.posix_fadvise is not available on this platform")
    if fd is not None:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fdatasync(fd)  # dirty pages (a file just written) cannot be dropped
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _load_libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    if libc is None or not hasattr(libc, "mincore"):
        return None
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _load_libc()


def page_residency(addr: int, length: int) -> Optional[bytes]:
    """``mincore(2)`` of this process's memory ``[addr, addr + length)``: one byte per page,
    bit 0 set where the page is in RAM (for a file map: in the page cache). None when it cannot
    be known."""
    if _LIBC is None:
        return None
    start = addr - addr % mmap.PAGESIZE
    length += addr - start
    vec = (ctypes.c_ubyte * (-(-length // mmap.PAGESIZE)))()
    if _LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        return None
    return bytes(vec)


def cached_fraction(path: str) -> Optional[float]:
    """Fraction (0..1) of ``path``'s pages in the page cache, or None when it cannot be known."""
    if _LIBC is None:
        return None
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = page_residency(addr, size)
        finally:
            _LIBC.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return None if vec is None else sum(b & 1 for b in vec) / len(vec)


def evict(path) -> Tuple[bool, str]:
    """Drop ``path`` (a split file, or a list of them: a sharded split's shards) from the page
    cache and check it left.

    Returns:
        ``(evicted, note)``: ``evicted`` is True when the drop was done and (where ``mincore``
        works) at most 1 % of each file stayed cached; ``note`` says what happened in words.
    """
    if not isinstance(path, str):
        done = [evict(p) for p in path]
        bad = [note for ok, note in done if not ok]
        if len(done) == 1 or bad:
            return (not bad, "; ".join(bad) if bad else done[0][1])
        return True, f"page cache of {len(done)} shard files dropped ({done[0][1].split('(')[-1]}"
    path = data_file(path)
    try:
        drop_cache(path)
    except OSError as e:
        return False, f"could not evict {path} from the page cache ({e}); results may be RAM speed"
    frac = cached_fraction(path)
    if frac is None:
        return True, f"page cache of {path} dropped (posix_fadvise; not verifiable here)"
    if frac > 0.01:
        return False, (f"{frac:.0%} of {path} is still in the page cache after posix_fadvise "
                       "(mapped or written by another process?); results may be RAM speed")
    return True, f"page cache of {path} dropped (verified: {frac:.1%} resident)"
