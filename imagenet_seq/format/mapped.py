"""A file's per-record metadata as read-only views of the file: one copy per machine, not per
process.

``__labels__`` (4 bytes a record), ``__crc__`` (4) and ``__offsets__`` (12) take 20 bytes a
record: 280 MB at ImageNet-21k's 14 M records. Copied out of LMDB, every rank of a node holds
them once more (8 ranks: 2.2 GB, and the decode workers' pickled readers once more each).
Mapped from the file, they are pages of the page cache that every process mapping the file
shares: read from disk once per machine, counted once, and given back by the kernel under
memory pressure like any clean file page (and read again when touched).

:func:`get` returns a value of a ``buffers=True`` transaction as a read-only ``memoryview`` of
the file through this module's own ``mmap`` -- not LMDB's map, so it lives exactly as long as
the arrays made from it, whatever happens to the environment, and a forked child inherits it.
LMDB stores every value contiguously in its file (inside a leaf page, or as a run of overflow
pages), and a converted file is not written again (``offsets.py``): the bytes stay where the
transaction found them. :func:`picklable` lets an object pickle such an array as where it lies
(:class:`Region`: file, offset, length, and the file's device, inode, size and modification
time), so a process that receives it maps the same pages instead of receiving a copy; a file
changed in between is a :class:`~.lmdbfile.DamagedFile` naming it, not other bytes.

Like LMDB's own map (``lmdbfile.py``), a view of a file that shrinks while it is open raises
SIGBUS when a page past the new end is touched; the reader re-checks the file at every pass
start (``check_file``: the views lie inside the pages its LMDB header counts), where a file
cut short is an error naming it.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from imagenet_seq.format.lmdbfile import REMEDY, DamagedFile, check_in_file, data_file, map_base

__all__ = ["Region", "get", "where", "array", "picklable"]


@dataclass(frozen=True)
class Region:
    """Bytes ``[offset, offset + length)`` of the file ``path`` as it was when mapped
    (``identity``: device, inode, size, modification time in ns)."""

    path: str
    offset: int
    length: int
    identity: Tuple[int, int, int, int]


class _FileMap(mmap.mmap):
    """An ``mmap`` that knows which file and offset it maps (for :func:`where`)."""

    path: str
    start: int
    identity: Tuple[int, int, int, int]


def _identity(st: os.stat_result) -> Tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _map(path: str, offset: int, length: int,
         identity: Optional[Tuple[int, int, int, int]] = None) -> memoryview:
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if identity is not None and _identity(st) != tuple(identity):
            raise DamagedFile(
                f"{path} changed since its reader was made (device, inode, size or "
                f"modification time differ): make the reader (the Loader) again; if the file "
                f"was not meant to change, {REMEDY}")
        if offset + length > st.st_size:
            raise DamagedFile(f"{path} is {st.st_size:,} bytes, but a metadata value lies at "
                              f"[{offset:,}, {offset + length:,}): the file is truncated; "
                              f"{REMEDY}")
        mm = _FileMap(f.fileno(), offset + length - start, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ, offset=start)
    mm.path, mm.start, mm.identity = path, start, _identity(st)
    return memoryview(mm)[offset - start:offset - start + length]


def get(txn, key: bytes, path: str, base: Optional[int] = None):
    """The value of ``key`` in an open file: None when absent; a read-only view of the file
    (shared, outlives ``txn``) when ``txn`` gives buffers and the file's place in this
    process is known (``base``, else looked up); else a copy (``bytes``).

    Raises:
        DamagedFile: the value reaches past the file's end (a damaged B-tree node).
    """
    value = txn.get(key)
    if value is None or not isinstance(value, memoryview):
        return value
    data = data_file(path)
    size = os.path.getsize(data)
    base = map_base(path) if base is None else base
    check_in_file(value, base, size, path, f"record {key!r}")
    if base is None or not len(value):
        return bytes(value)
    offset = np.frombuffer(value, np.uint8).ctypes.data - base
    return _map(data, offset, len(value))


def where(arr: Any) -> Optional[Region]:
    """Where a (contiguous) array made by :func:`get`'s view lies in its file, else None."""
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        return None
    base = arr.base
    while isinstance(base, np.ndarray):
        base = base.base
    fm = base.obj if isinstance(base, memoryview) else None
    if not isinstance(fm, _FileMap) or fm.closed:
        return None
    first = np.frombuffer(fm, np.uint8, 1).ctypes.data  # the map's address (no bytes read)
    offset = fm.start + arr.ctypes.data - first
    return Region(fm.path, offset, arr.nbytes, fm.identity)


def array(region: Region, dtype: str, shape: Tuple[int, ...]) -> np.ndarray:
    """The array ``where`` described, mapped again (in this process), after checking the file
    is the one it was.

    Raises:
        DamagedFile: the file changed (its identity differs) or is shorter.
    """
    if not region.length:
        return np.empty(shape, dtype)
    view = _map(region.path, region.offset, region.length, region.identity)
    return np.frombuffer(view, dtype).reshape(shape)


class _Remap:
    """Pickles as the instruction to map an array again (:func:`picklable`)."""

    def __init__(self, region: Region, dtype: str, shape: Tuple[int, ...]):
        self.args = (region, dtype, shape)

    def __reduce__(self):
        return array, self.args


def picklable(arr: Any) -> Any:
    """``arr``, or -- for an array that is a view of a file (:func:`where`) -- an object
    that unpickles as that array mapped again: put it in a ``__getstate__`` (pickle only;
    ``copy.copy`` would keep the placeholder)."""
    region = where(arr)
    if region is None:
        return arr
    return _Remap(region, arr.dtype.str, arr.shape)

