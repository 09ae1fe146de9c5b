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

__all__ = ["REMEDY", "DamagedFile", "data_file", "check_file", "map_base", "check_in_file", "Tree"]

# LMDB's meta pages (0 and 1, at offsets 0 and psize; 64-bit build): a 16-byte page header, then
# MDB_meta: magic, version, address, mapsize, two MDB_db of 48 bytes (the first one's md_pad is
# the page size), last page number in use, transaction id.
_META = struct.Struct("<8x2xH4x" "II" "16x" "I4x40x" "32xQQ" "QQ")
_Meta = collections.namedtuple("_Meta", "flags magic version psize entries root last_pg txnid")
_PAGE = struct.Struct("<QHHHH")  # page header: pgno, pad, flags, lower, upper
_NODE = struct.Struct("<HHHH")  # node header: lo, hi, flags, key size
_P_BRANCH, _P_LEAF, _F_BIGDATA = 0x01, 0x02, 0x01
_NO_PAGE = (1 << 64) - 1  # md_root of an empty database
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


def _newer(a: _Meta, b: _Meta) -> _Meta:
    return max((a, b), key=lambda m: m.txnid)  # LMDB reads the newer transaction's pages


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
    meta = _newer(first, second)
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


class Tree:
    """LMDB's main B-tree read by Python, every page checked before use, so a damaged page is
    an error here rather than LMDB reading past a page (or the file's end: SIGBUS) in C.

    :meth:`check_lookup` checks the pages LMDB will walk to find a key (a handful, read at
    open); :meth:`keys` walks every branch and leaf page (``imagenet-seq-verify``).
    """

    def __init__(self, path: str):
        self.path = data_file(path)
        self.size = check_file(path)
        with open(self.path, "rb") as f:
            first = _read_meta(f, 0)
            second = _read_meta(f, first.psize)
        self.meta = _newer(first, second)
        self.psize = self.meta.psize
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pages: dict = {}

    def close(self) -> None:
        os.close(self._fd)

    def _damaged(self, pgno: int, what: str) -> DamagedFile:
        return DamagedFile(f"{self.path}: B-tree page {pgno} is damaged ({what}); {REMEDY}")

    def nodes(self, pgno: int):
        """``(is_leaf, [(key, child page or None)])`` of a branch or leaf page, checked."""
        if pgno in self._pages:
            return self._pages[pgno]
        if pgno > self.meta.last_pg:
            raise self._damaged(pgno, f"beyond the last page in use, {self.meta.last_pg}")
        page = os.pread(self._fd, self.psize, pgno * self.psize)
        own, _, flags, lower, upper = _PAGE.unpack_from(page)
        if own != pgno or not flags & (_P_BRANCH | _P_LEAF):
            raise self._damaged(pgno, f"header says page {own}, flags {flags:#x}")
        if not _PAGE.size <= lower <= upper <= self.psize or (lower - _PAGE.size) % 2:
            raise self._damaged(pgno, f"free space [{lower}, {upper})")
        leaf, out = bool(flags & _P_LEAF), []
        ptrs = struct.unpack_from(f"<{(lower - _PAGE.size) // 2}H", page, _PAGE.size)
        for ptr in ptrs:
            if not upper <= ptr <= self.psize - _NODE.size:
                raise self._damaged(pgno, f"node offset {ptr}")
            lo, hi, nflags, ksize = _NODE.unpack_from(page, ptr)
            data = ptr + _NODE.size + ksize
            key = page[ptr + _NODE.size:data]
            if data > self.psize:
                raise self._damaged(pgno, f"key of {ksize} bytes at {ptr}")
            if not leaf:
                child = lo | hi << 16 | nflags << 32
                if child > self.meta.last_pg:
                    raise self._damaged(pgno, f"child page {child}")
                out.append((key, child))
                continue
            dsize = lo | hi << 16
            if nflags & _F_BIGDATA:  # the value is in overflow pages from this one
                if data + 8 > self.psize:
                    raise self._damaged(pgno, f"node at {ptr}")
                first = struct.unpack_from("<Q", page, data)[0]
                if first > self.meta.last_pg or first * self.psize + 16 + dsize > self.size:
                    raise self._damaged(pgno, f"value of {dsize} bytes at page {first}")
            elif data + dsize > self.psize:
                raise self._damaged(pgno, f"value of {dsize} bytes at {ptr}")
            out.append((key, None))
        self._pages[pgno] = (leaf, out)
        return leaf, out

    def check_lookup(self, key: bytes) -> None:
        """Check every page on the way from the root to ``key``'s leaf (found or not)."""
        pgno, depth = self.meta.root, 0
        while pgno != _NO_PAGE:
            leaf, nodes = self.nodes(pgno)
            if leaf or not nodes:
                return
            # node 0 of a branch page stands for every key below node 1's
            i = max(0, max((k for k, (nk, _) in enumerate(nodes) if k and nk <= key),
                           default=0))
            pgno, depth = nodes[i][1], depth + 1
            if depth > 64:
                raise self._damaged(pgno, "the tree loops")

    def keys(self, progress=None):
        """Every key in the main database, in order (branch and leaf pages checked)."""
        stack = [] if self.meta.root == _NO_PAGE else [(self.meta.root, 0)]
        seen = set()
        while stack:
            pgno, depth = stack.pop()
            if pgno in seen or depth > 64:
                raise self._damaged(pgno, "the tree loops")
            seen.add(pgno)
            leaf, nodes = self.nodes(pgno)
            self._pages.pop(pgno, None)  # walked once: keep memory flat
            if leaf:
                for key, _ in nodes:
                    yield key
            else:
                stack.extend((child, depth + 1) for _, child in reversed(nodes))
