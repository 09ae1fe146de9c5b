"""The one sequential reader: contiguous record ranges of one split's LMDB, in file order.

Read-ahead: a cursor walking an mmap faults in one read-ahead window (128 KiB) at a time, and an
LMDB leaf page sits a few MB away from the records it indexes, so a plain walk makes the disk
seek back and forth, and several readers on one disk (DDP ranks) interleave their small
requests into a seek each. The reader therefore keeps ``PREFETCH_BYTES`` of its span queued
ahead of the cursor with ``posix_fadvise(WILLNEED)``, refilled in bursts of half of it: the disk
sees one deep sequential queue per span (measured on the emulated HDD of
``benchmarks/slowfs.py``: raw streaming 65 % -> 80-92 % of the disk's bandwidth; see
benchmarks/results/slow_disk.md).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import numpy as np

from . import format as fmt

PREFETCH_BYTES = 64 << 20  # queued ahead of the cursor (16 MB: 6-7 points less with 4 ranks)
_FADVISE_STEP = 128 << 10  # the kernel reads at most read_ahead_kb per WILLNEED call


def _map_base(path: str) -> Optional[int]:
    """Address where this process mapped ``path`` at file offset 0 (Linux), else None."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real and int(parts[2], 16) == 0:
                    return int(parts[0].split("-")[0], 16)
    except OSError:
        pass
    return None


class _Prefetch:
    """Keeps a window of one span's bytes queued for reading ahead of the cursor."""

    def __init__(self, fd: int, base: int, mean_record: float, count: int):
        self.fd, self.base = fd, base
        self.span_bytes = int((count + 2) * mean_record)
        self.queued = self.end = None

    def at(self, value) -> None:
        off = np.frombuffer(value, np.uint8).ctypes.data - self.base
        if self.end is None:
            self.queued, self.end = off, off + self.span_bytes
        if self.queued - off >= PREFETCH_BYTES // 2:
            return  # refill in bursts: a burst sits together in the disk's queue
        target = min(off + PREFETCH_BYTES, self.end)
        while self.queued < target:
            n = min(_FADVISE_STEP, self.end - self.queued)
            os.posix_fadvise(self.fd, self.queued, n, os.POSIX_FADV_WILLNEED)
            self.queued += n


class SplitReader:
    """Reads records of one split. Opens the LMDB lazily (after fork), in ``reset_state``;
    readers of the same file in one process share one environment (``format.acquire_env``).

    ``meta`` and ``labels`` are read once at construction with a short-lived environment, so an
    object can be built in the parent and used in a child process.
    """

    def __init__(self, root: str, split: str):
        self.path = fmt.find_split(root, split)
        self.split = split
        env = fmt.acquire_env(self.path)
        try:
            with env.begin() as txn:
                self.meta = fmt.read_metadata(txn, self.path)
                self.labels: Optional[np.ndarray] = fmt.read_labels(txn, self.meta)
        finally:
            fmt.release_env(self.path)
        self.legacy = self.meta.legacy
        self._env = None
        self._fd: Optional[int] = None
        self._base: Optional[int] = None

    def __len__(self) -> int:
        return self.meta.num_records

    def reset_state(self) -> None:
        self.close()
        self._env = fmt.acquire_env(self.path)
        data = self.path if os.path.isfile(self.path) else os.path.join(self.path, "data.mdb")
        self._fd = os.open(data, os.O_RDONLY)
        self._base = _map_base(data)

    def close(self) -> None:
        if self._env is not None:
            self._env = None
            fmt.release_env(self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_env"] = state["_fd"] = state["_base"] = None
        return state

    def read_range(self, start: int, count: int) -> Iterator[Tuple[int, bytes, int]]:
        """Yield ``(index, jpeg_bytes, label)`` for records ``start .. start+count-1``, in order.

        One cursor walks the range forward, with the span's next ``PREFETCH_BYTES`` queued
        ahead of it: the access pattern a disk serves at full bandwidth.
        """
        if self._env is None:
            self.reset_state()
        if count <= 0:
            return
        if start < 0 or start + count > self.meta.num_records:
            raise IndexError(f"range [{start}, {start + count}) outside 0..{self.meta.num_records}")
        total = self.meta.total_bytes or os.fstat(self._fd).st_size  # legacy: no byte count
        ahead = None if self._base is None else \
            _Prefetch(self._fd, self._base, total / max(1, self.meta.num_records) + 64, count)
        with self._env.begin(buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_key(fmt.record_key(start)):
                raise KeyError(f"{self.path}: record {fmt.record_key(start)!r} missing")
            for i in range(start, start + count):
                key, value = cur.item()
                if ahead is not None:
                    ahead.at(value)
                if bytes(key) != fmt.record_key(i):
                    raise KeyError(f"{self.path}: expected key {fmt.record_key(i)!r}, "
                                   f"found {bytes(key)!r}; the file is damaged")
                if self.legacy:
                    jpeg, label = fmt.decode_legacy_value(value)
                else:
                    view, label = fmt.decode_record(value)
                    jpeg = view.tobytes()  # copy out: buffers die with the transaction
                yield i, jpeg, label
                if i + 1 < start + count and not cur.next():
                    raise KeyError(f"{self.path}: file ends before record {i + 1}")

    def read_all(self) -> Iterator[Tuple[int, bytes, int]]:
        return self.read_range(0, self.meta.num_records)
