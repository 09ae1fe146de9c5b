"""External sort of records by write position: sorted run files, then one k-way merge.

Why: the source is read in on-disk order but the output must be in the plan's order (a seeded
permutation for train, sorted for val). Holding a split in memory is ~140 GB for ImageNet, so:

* pass 1 (``RunBuffer``): records arrive in read order, tagged with their plan position; when
  the buffer reaches its byte budget it is sorted by position and written as ONE sequential
  file (``run-00000``, ...) with large writes, then fsync'd. The run is the unit of resume.
* pass 2 (``merge``): every run is read front to back through its own buffer of
  ``merge budget / runs`` bytes, a heap picks the smallest position: the records come out in
  plan order. Each run is read sequentially; switching runs costs one seek per buffer refill.

Run file layout: repeated ``[uint64 position][uint32 length][length bytes of record]``
(little-endian). Memory: pass 1 holds one run (``run_bytes``), pass 2 holds the read buffers
(``merge_bytes`` in all) and one record per run.
"""
from __future__ import annotations

import heapq
import os
import struct
from typing import BinaryIO, Iterator, List, Optional, Tuple

HEAD = struct.Struct("<QI")
PER_RECORD_OVERHEAD = 120  # bytes of Python objects per buffered record (tuple, bytes header)
MIN_READ_BUFFER = 256 << 10
MAX_READ_BUFFER = 64 << 20
WRITE_BUFFER = 16 << 20


class RunBuffer:
    """Records of the run being gathered; ``full`` at ``max_bytes`` (payload + overhead) or
    ``max_records``."""

    def __init__(self, max_bytes: int, max_records: Optional[int] = None):
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.items: List[Tuple[int, bytes]] = []
        self.nbytes = 0

    def add(self, pos: int, payload: bytes) -> None:
        self.items.append((pos, payload))
        self.nbytes += len(payload) + PER_RECORD_OVERHEAD

    def full(self) -> bool:
        return self.nbytes >= self.max_bytes or (
            self.max_records is not None and len(self.items) >= self.max_records)

    def write(self, path: str) -> Tuple[int, int]:
        """Sort, write to ``path`` (a new file), fsync; (records, bytes). Empties the buffer.

        Raises:
            OSError: the write failed (full disk, I/O error); ``path`` may hold part of the run
                (the caller's resume state does not name it, so it is discarded).
        """
        self.items.sort(key=lambda it: it[0])
        size = 0
        with open(path, "wb", buffering=WRITE_BUFFER) as f:
            for pos, payload in self.items:
                f.write(HEAD.pack(pos, len(payload)))
                f.write(payload)
                size += HEAD.size + len(payload)
            f.flush()
            os.fsync(f.fileno())
        n = len(self.items)
        self.items, self.nbytes = [], 0
        return n, size


class RunReader:
    """One run file from ``offset`` on, buffered; ``offset`` is where the next record starts."""

    def __init__(self, path: str, offset: int, buffer_bytes: int):
        self.path = path
        self.f: BinaryIO = open(path, "rb", buffering=0)
        self.size = os.fstat(self.f.fileno()).st_size
        if offset > self.size:
            raise ValueError(f"{path} is {self.size} bytes, shorter than the {offset} bytes "
                             "already merged from it")
        self.f.seek(offset)
        self.offset = offset  # of the next record not yet returned
        self.buffer_bytes = buffer_bytes
        self.buf = b""
        self.at = 0  # position in buf

    def _need(self, n: int) -> bool:
        if len(self.buf) - self.at >= n:
            return True
        rest = self.buf[self.at:]
        more = self.f.read(max(self.buffer_bytes, n - len(rest)))
        self.buf, self.at = rest + more, 0
        return len(self.buf) >= n

    def next(self) -> Optional[Tuple[int, bytes]]:
        """(position, record), or None at the end. Raises ValueError on a cut-short run."""
        if not self._need(HEAD.size):
            if len(self.buf) - self.at:
                raise ValueError(f"{self.path} ends inside a record header (at byte "
                                 f"{self.offset})")
            return None
        pos, n = HEAD.unpack_from(self.buf, self.at)
        if not self._need(HEAD.size + n):
            raise ValueError(f"{self.path} ends inside the record at byte {self.offset}")
        payload = self.buf[self.at + HEAD.size:self.at + HEAD.size + n]
        self.at += HEAD.size + n
        self.offset += HEAD.size + n
        return pos, payload

    def close(self) -> None:
        self.f.close()


def read_buffer(merge_bytes: int, runs: int) -> int:
    """Bytes of read buffer per run for ``runs`` runs within ``merge_bytes``: half the share,
    because a refill briefly holds the old buffer's tail and the new one together."""
    return max(MIN_READ_BUFFER, min(MAX_READ_BUFFER, merge_bytes // (2 * max(1, runs))))


def merge(paths: List[str], offsets: List[int], merge_bytes: int
          ) -> Iterator[Tuple[int, bytes, int, int]]:
    """(position, record, run index, that run's offset after this record), smallest position
    first. ``offsets[i]``: where to start in run ``i`` (0, or a resumed merge's state).

    Positions are unique across runs (each plan position is read once), so the order is the
    plan's whatever the number of runs.
    """
    buf = read_buffer(merge_bytes, len(paths))
    readers = [RunReader(p, o, buf) for p, o in zip(paths, offsets)]
    try:
        heap = []
        for i, r in enumerate(readers):
            got = r.next()
            if got is not None:
                heap.append((got[0], i, got[1]))
        heapq.heapify(heap)
        while heap:
            pos, i, payload = heapq.heappop(heap)
            after = readers[i].offset
            got = readers[i].next()
            if got is not None:
                heapq.heappush(heap, (got[0], i, got[1]))
            yield pos, payload, i, after
    finally:
        for r in readers:
            r.close()
