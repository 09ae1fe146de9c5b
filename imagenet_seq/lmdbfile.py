"""The file under an LMDB environment: checks that keep LMDB's memory map inside it.

LMDB maps the whole file and trusts its header: a file shorter than the pages the header says
are in use (an interrupted ``cp``/``rsync``, a full disk, a dropped network share) kills the
process with SIGBUS on the first touch past its end, and a damaged length in a B-tree node does
the same when the value is copied out. :func:`check_file` compares the file with its header
before an environment is opened (``format.open_env`` calls it); :func:`check_in_file` checks a
value's bytes lie inside the file before they are touched.

A file that shrinks while it is open cannot be fully guarded: pages touched through the map
after that still raise SIGBUS. The reader re-checks the file at every epoch start and reads
records with ``pread`` where the offsets index allows (a short read, not a signal).
"""
from __future__ import annotations

import collections
import os
import struct
from typing import Optional

import numpy as np

# LMDB's meta pages (0 and 1, at offsets 0 and psize; 64-bit build): a 16-byte page header, then
# MDB_meta: magic, version, address, mapsize, two MDB_db of 48 bytes (the first one's md_pad is
# the page size), last page number in use, transaction id.
_META = struct.Struct("<8x2xH4x" "II" "16x" "I4x40x" "48x" "QQ")
_Meta = collections.namedtuple("_Meta", "flags magic version psize last_pg txnid")
_LMDB_MAGIC = 0xBEEFC0DE
_P_META = 0x08
REMEDY = ("re-copy it from its source (an interrupted or partial copy leaves exactly this), or "
           "re-convert with preprocess_sequential.py --overwrite")


class DamagedFile(ValueError):
    """A file is not what its LMDB header or the format says; the message names it and the fix."""


def _read_meta(f, offset: int) -> Optional[_Meta]:
    f.seek(offset)
    raw = f.read(_META.size)
    return _Meta(*_META.unpack(raw)) if len(raw) == _META.size else None


def _valid_psize(psize: int) -> bool:
    return 512 <= psize <= (1 << 16) and not psize & (psize - 1)


def _valid_meta(m: _Meta) -> bool:
    return m.magic == _LMDB_MAGIC and bool(m.flags & _P_META) and _valid_psize(m.psize)


def data_file(path: str) -> str:
    """The file that holds an LMDB's data: ``path`` itself, or ``path/data.mdb`` (subdir LMDBs)."""
    inner = os.path.join(path, "data.mdb")
    return inner if os.path.isdir(path) and os.path.isfile(inner) else path


def check_file(path: str) -> int:
    """Check that ``path`` holds every page its LMDB header says is in use; returns its size.

    LMDB maps the file and touches pages up to the last one in use (``mm_last_pg`` of the newer
    of the two meta pages); a file shorter than that kills the process with SIGBUS on first
    touch. This reads the two meta pages (8 KB) and compares.

    Raises:
        DamagedFile: naming the file, its size, the size it should have and the way out.
    """
    data = data_file(path)
    with open(data, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = _read_meta(f, 0)
        # meta 1 sits one page further; a damaged meta 0 gives no page size: LMDB's default
        psize = first.psize if first is not None and _valid_psize(first.psize) else 4096
        second = _read_meta(f, psize)
    if first is None or second is None:
        raise DamagedFile(f"{data} is {size:,} bytes, shorter than the two {psize}-byte header "
                          f"pages of an LMDB file; {REMEDY}")
    bad = [k for k, m in enumerate((first, second)) if not _valid_meta(m)]
    if bad:
        raise DamagedFile(f"{data}: LMDB header page {bad[0]} is damaged, or this is not an "
                          f"LMDB file ({size:,} bytes); {REMEDY}")
    meta = max((first, second), key=lambda m: m.txnid)  # LMDB reads the newer one's pages
    need = (meta.last_pg + 1) * meta.psize
    if size < need:
        raise DamagedFile(
            f"{data} is {size:,} bytes but its LMDB header says it holds {meta.last_pg + 1:,} "
            f"pages of {meta.psize} bytes ({need:,} bytes): the file is truncated (or its header "
            f"damaged); {REMEDY}")
    return size

def map_base(path: str) -> Optional[int]:
    """Address where this process mapped ``path`` at file offset 0 (Linux), else None."""
    real = os.path.realpath(data_file(path))
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real and int(parts[2], 16) == 0:
                    return int(parts[0].split("-")[0], 16)
    except OSError:
        pass
    return None


def check_in_file(value, base: Optional[int], size: int, path: str, what: str) -> None:
    """Raise :class:`DamagedFile` if ``value`` (a buffer into the map of ``path``, from a
    ``buffers=True`` transaction) reaches past the file's end: a damaged length in a B-tree
    node would otherwise make the copy of it a SIGBUS. No-op where the map base is unknown."""
    if base is None or value is None:
        return
    off = np.frombuffer(value, np.uint8).ctypes.data - base if len(value) else 0
    if off < 0 or off + len(value) > size:
        raise DamagedFile(f"{path}: {what} claims file bytes [{off:,}, {off + len(value):,}) "
                          f"but the file is {size:,} bytes: the file is damaged; {REMEDY}")
