"""External sort of records by write key: sorted run files, then one k-way merge.

Why: the source is read in on-disk order but the output must be in the plan's order (train
sorted by a seeded hash of each path, val sorted: ``write_order``). Holding a split in memory
is ~140 GB for ImageNet, so:

* pass 1 (``RunBuffer``): records arrive in read order, tagged with their sort key
  (``write_order.sort_key``: train a seeded hash of the path + the path, val the path) and
  their sequence number in the sweep (the order they were met); when the buffer reaches its
  byte budget it is sorted by (key, sequence) and written as ONE sequential file
  (``run-00000``, ...) with large writes, then fsync'd. The run is the unit of resume.
* pass 2 (``merge``): every run is read front to back through its own buffer of
  ``merge budget / runs`` bytes, a heap picks the smallest (key, sequence): the records come
  out in write order, two copies of one name (an archive holding a name twice) one after the
  other, the later-met last. Each run is read sequentially; switching runs costs one seek per
  buffer refill. No list of the split's files is needed: the key is the record's own.

Run file layout: repeated ``[uint64 sequence][uint64 origin][uint16 key length][uint32 record
length][key][record]`` (little-endian); ``origin``: the sequence number of the nested tar the
record came from (``NO_ORIGIN``: none). Memory: pass 1 holds one run (``run_bytes``), pass 2
holds the read buffers (``merge_bytes`` in all) and one record per run.
"""
from __future__ import annotations

import heapq
import os
import struct
from typing import BinaryIO, Iterator, List, Optional, Tuple

__all__ = ["HEAD", "NO_ORIGIN", "PER_RECORD_OVERHEAD", "MIN_READ_BUFFER", "MAX_READ_BUFFER",
           "WRITE_BUFFER", "WRITE_IOVECS", "RunBuffer", "RunReader", "KeysReader",
           "read_buffer", "merge", "merge_readers"]

HEAD = struct.Struct("<QQHI")
NO_ORIGIN = (1 << 64) - 1
# bytes of Python objects per buffered record beside its payload (the tuple, the key and header
# bytes objects, the list's slot, the sort's key tuple): measured ~605 B held + 72 B while
# sorted against the 460 B counted before for ~300 B records (benchmarks/convert_memory.py)
PER_RECORD_OVERHEAD = 340
MIN_READ_BUFFER = 256 << 10
MAX_READ_BUFFER = 64 << 20
WRITE_BUFFER = 16 << 20  # bytes per writev of a run
WRITE_IOVECS = 1024  # parts per writev (Linux's IOV_MAX)


class RunBuffer:
    """Records of the run being gathered; ``full`` at ``max_bytes`` (payload + overhead) or
    ``max_records``."""

    def __init__(self, max_bytes: int, max_records: Optional[int] = None):
        self.max_bytes = max_bytes
        self.max_records = max_records
        # (key, sequence, origin, prefix, payload)
        self.items: List[Tuple[bytes, int, int, bytes, bytes]] = []
        self.nbytes = 0

    def add(self, key: bytes, seq: int, payload: bytes, prefix: bytes = b"",
            origin: int = NO_ORIGIN) -> None:
        """Record ``prefix + payload`` under ``key`` (met ``seq``-th); the two are written one
        after the other, never concatenated in memory (a 90 KB copy per image in the writer's
        thread)."""
        self.items.append((key, seq, origin, prefix, payload))
        self.nbytes += len(key) + len(prefix) + len(payload) + PER_RECORD_OVERHEAD

    def full(self) -> bool:
        return self.nbytes >= self.max_bytes or (
            self.max_records is not None and len(self.items) >= self.max_records)

    def write(self, path: str, keys_path: Optional[str] = None) -> Tuple[int, int]:
        """Sort, write to ``path`` (a new file), fsync; (records, bytes). With ``keys_path``
        also the run's keys file (:class:`KeysReader`: each record's head, key and label
        header, no image bytes), fsync'd before the run. Empties the buffer
        as it goes: each batch's records are released once written and ``nbytes`` drops, so
        a run filled meanwhile (in another thread) can use the memory they held.

        Raises:
            OSError: the write failed (full disk, I/O error); ``path`` may hold part of the run
                (the caller's resume state does not name it, so it is discarded).
        """
        items = self.items
        items.sort(key=lambda it: (it[0], it[1]))
        size = 0
        if keys_path is not None:
            _write_keys(keys_path, items)
        with open(path, "wb", buffering=0) as f:
            batch: List[bytes] = []
            batch_bytes = first = 0
            for k, (key, seq, origin, prefix, payload) in enumerate(items):
                n = len(prefix) + len(payload)
                batch += (HEAD.pack(seq, origin, len(key), n), key, prefix, payload) \
                    if prefix else (HEAD.pack(seq, origin, len(key), n), key, payload)
                batch_bytes += HEAD.size + len(key) + n
                if len(batch) >= WRITE_IOVECS - 4 or batch_bytes >= WRITE_BUFFER \
                        or k == len(items) - 1:
                    size += _write_all(f.fileno(), batch, batch_bytes)
                    released = batch_bytes + (k + 1 - first) * (PER_RECORD_OVERHEAD - HEAD.size)
                    batch, batch_bytes = [], 0
                    items[first:k + 1] = [None] * (k + 1 - first)  # the records' bytes go now
                    first = k + 1
                    self.nbytes -= released
            os.fsync(f.fileno())
        n = len(items)
        self.items, self.nbytes = [], 0
        return n, size


def _write_keys(path: str, items) -> None:
    """The keys file of sorted ``items``: ``[HEAD][key][4-byte label header]`` per record,
    HEAD's length the record's length in the run (so offsets in the run can be summed)."""
    with open(path, "wb") as f:
        for key, seq, origin, prefix, payload in items:
            f.write(HEAD.pack(seq, origin, len(key), len(prefix) + len(payload)) + key
                    + prefix[:4])
        f.flush()
        os.fsync(f.fileno())


class KeysReader:
    """A run's keys file (``RunBuffer.write(keys_path=)``), buffered, read as its run would be
    (:func:`merge_readers`): (key, sequence, origin, label header) per record, ``offset`` the
    byte offset in the run after the record returned last."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "rb", buffering=1 << 18)
        self.offset = 0

    def next(self) -> Optional[Tuple[bytes, int, int, bytes]]:
        head = self.f.read(HEAD.size)
        if not head:
            return None
        if len(head) < HEAD.size:
            raise ValueError(f"{self.path} ends inside a record header")
        seq, origin, k, n = HEAD.unpack(head)
        rest = self.f.read(k + 4)
        if len(rest) < k + 4:
            raise ValueError(f"{self.path} ends inside a record's key")
        self.offset += HEAD.size + k + n
        return rest[:k], seq, origin, rest[k:]

    def close(self) -> None:
        self.f.close()


def _write_all(fd: int, parts: List[bytes], total: int) -> int:
    """``parts`` written with writev (no copy into a user-space buffer first); a short write
    (a signal, a file size limit) goes on with the rest. Returns ``total``."""
    done = os.writev(fd, parts)
    if done < total:
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            rest = rest[os.write(fd, rest):]
    return total


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
        self.buf = memoryview(b"")
        self.at = 0  # position in buf
        self._current: Optional[bytearray] = None  # behind self.buf
        self._spare: Optional[bytearray] = None  # the other one: the next refill goes there
        self._held: Optional[bytearray] = None  # behind the record handed out last

    def _need(self, n: int) -> bool:
        if len(self.buf) - self.at >= n:
            return True
        # Two buffers in turn, allocated once (a fresh 64 MB bytearray per refill is zeroed and
        # page-faulted under the GIL: 12 % of the converter's Python time in a profile). A
        # refill never goes into the buffer behind the record handed out last (the caller may
        # still be using it); every older record was consumed (see merge).
        rest = self.buf[self.at:]
        size = max(self.buffer_bytes, n)
        new = self._spare
        if new is None or new is self._held or len(new) < size:  # held: a second refill in
            new = bytearray(size)                                # one next() (a big record)
        self._spare, self._current = self._current, new
        view, got = memoryview(new), len(rest)
        view[:got] = rest
        while got < len(view):
            k = self.f.readinto(view[got:])
            if not k:
                break
            got += k
        self.buf, self.at = view[:got], 0
        return got >= n

    def next(self) -> Optional[Tuple[bytes, int, int, memoryview]]:
        """(key, sequence, origin, record), or None at the end. The record is a view into a
        read buffer, valid until the call after the next one: use it (or copy it) before
        then. Raises ValueError on a cut-short run."""
        if not self._need(HEAD.size):
            if len(self.buf) - self.at:
                raise ValueError(f"{self.path} ends inside a record header (at byte "
                                 f"{self.offset})")
            return None
        seq, origin, k, n = HEAD.unpack_from(self.buf, self.at)
        if not self._need(HEAD.size + k + n):
            raise ValueError(f"{self.path} ends inside the record at byte {self.offset}")
        at = self.at + HEAD.size
        key = bytes(self.buf[at:at + k])
        payload = self.buf[at + k:at + k + n]
        self._held = self._current
        self.at += HEAD.size + k + n
        self.offset += HEAD.size + k + n
        return key, seq, origin, payload

    def close(self) -> None:
        self.f.close()


def read_buffer(merge_bytes: int, runs: int) -> int:
    """Bytes of read buffer per run for ``runs`` runs within ``merge_bytes``: half the share,
    because a refill briefly holds the old buffer's tail and the new one together."""
    return max(MIN_READ_BUFFER, min(MAX_READ_BUFFER, merge_bytes // (2 * max(1, runs))))


def merge(paths: List[str], offsets: List[int], merge_bytes: int
          ) -> Iterator[Tuple[bytes, int, int, memoryview, int, int, bool]]:
    """(key, sequence, origin, record, run index, that run's offset after this record,
    replaced), smallest (key, sequence) first. ``replaced``: a later-met record has the same
    key (an archive holding a name twice: the last copy wins, as extraction does).
    ``offsets[i]``: where to start in run ``i`` (0, or a resumed merge's state).

    Sequence numbers are unique (each item of the sweep is met once), so the order is the
    same whatever the number of runs. A record is a view into a reused read buffer: valid
    until the next one is asked for (store or copy it first; ``merge_pass`` puts it into the
    LMDB, which copies).
    """
    buf = read_buffer(merge_bytes, len(paths))
    yield from merge_readers([RunReader(p, o, buf) for p, o in zip(paths, offsets)])


def merge_readers(readers: list) -> Iterator[Tuple[bytes, int, int, object, int, int, bool]]:
    """:func:`merge` over open readers (``RunReader``, or ``KeysReader`` for the keys alone:
    ``next()`` -> (key, sequence, origin, record) or None, ``offset`` after it); closes them."""
    try:
        heap = []
        for i, r in enumerate(readers):
            got = r.next()
            if got is not None:
                heap.append((got[0], got[1], i, got[2], got[3]))
        heapq.heapify(heap)
        while heap:
            key, seq, i, origin, payload = heapq.heappop(heap)
            after = readers[i].offset
            got = readers[i].next()
            if got is not None:
                heapq.heappush(heap, (got[0], got[1], i, got[2], got[3]))
            yield key, seq, origin, payload, i, after, bool(heap) and heap[0][0] == key
    finally:
        for r in readers:
            r.close()
