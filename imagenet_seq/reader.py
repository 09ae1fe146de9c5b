"""The one sequential reader: contiguous record ranges of one split's LMDB, in file order.

Read-ahead: a cursor walking an mmap faults in one read-ahead window (128 KiB) at a time, and an
LMDB leaf page sits a few MB away from the records it indexes, so a plain walk makes the disk
seek back and forth, and several readers on one disk (DDP ranks) interleave their small
requests into a seek each. So each span is read ahead by a thread (:class:`_Prefetch`): up to
``PREFETCH_BYTES`` ahead of the cursor, queued with ``posix_fadvise(WILLNEED)`` as one deep
sequential run, in bursts during which the reader holds a node-wide lock for the file's device
(:class:`_DiskLock`): ranks on one disk take turns instead of interleaving. Measured on the
emulated HDD of ``benchmarks/slowfs.py`` (BENCHMARKS.md): raw stream 95 % of the disk's
bandwidth, 4 ranks 60 % -> 73 %.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional, Tuple

import numpy as np

from . import format as fmt
from .evict import page_residency

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


_PAGE = mmap.PAGESIZE
_EXTEND_BYTES = 2 << 20  # read past a span's estimated end in steps of this
_NEXT_BYTES = 3 * _PAGE  # the next record's first page: after this value and maybe a leaf page
_WAIT_STEP = 1 << 20  # the read-ahead thread confirms a burst read this much at a time
# IMAGENET_SEQ_DISK_TURNS=0: readers of one disk do not take turns (each reads when it likes)
DISK_TURNS = os.environ.get("IMAGENET_SEQ_DISK_TURNS", "1") != "0"


def _resident(addr: int, length: int) -> bool:
    """Whether all pages of this process's memory ``[addr, addr + length)`` are in RAM (for a
    file map: whether the page cache holds that part of the file); False when unknown."""
    if length <= 0:
        return True
    vec = page_residency(addr, length)
    return vec is not None and bool((np.frombuffer(vec, np.uint8) & 1).all())


class _DiskLock:
    """One reader's handle on the node-wide turn to read a device: ``flock`` on
    ``<tempdir>/imagenet_seq-<uid>-dev<st_dev>.lock``. The kernel drops a lock when its holder
    dies, so a killed rank never leaves the others waiting.

    Fair turns: a waiter also holds a shared lock on a second file (``.wait``) while it waits; a
    holder that finds it busy when it releases lets a waiter in before its own next turn.
    """

    _POLL_S = 0.002   # a waiter retries this often
    _YIELD_S = 0.010  # a releasing holder with waiters stays out this long

    def __init__(self, turn_fd: int, wait_fd: int):
        self.turn_fd, self.wait_fd = turn_fd, wait_fd
        self.yield_until = 0.0

    @classmethod
    def for_fd(cls, data_fd: int) -> Optional["_DiskLock"]:
        if not DISK_TURNS:
            return None
        try:
            dev = os.fstat(data_fd).st_dev
            stem = os.path.join(tempfile.gettempdir(), f"imagenet_seq-{os.getuid()}-dev{dev:x}")
            turn = os.open(stem + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # e.g. a read-only temp dir: read without turns
            return None
        try:
            return cls(turn, os.open(stem + ".wait", os.O_RDWR | os.O_CREAT, 0o600))
        except OSError:
            os.close(turn)
            return None

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Wait for the turn; False if ``cancelled()`` became true first."""
        delay = self.yield_until - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        fcntl.flock(self.wait_fd, fcntl.LOCK_SH)  # exclusive only for an instant in release()
        try:
            while True:
                try:
                    fcntl.flock(self.turn_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    if cancelled():
                        return False
                    time.sleep(self._POLL_S)
        finally:
            fcntl.flock(self.wait_fd, fcntl.LOCK_UN)

    def release(self) -> None:
        fcntl.flock(self.turn_fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(self.wait_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # someone is waiting: let them have the next turn
            self.yield_until = time.monotonic() + self._YIELD_S
        else:
            fcntl.flock(self.wait_fd, fcntl.LOCK_UN)
            self.yield_until = 0.0

    def contended(self) -> bool:
        """Whether another reader is waiting for the turn (the holder asks)."""
        try:
            fcntl.flock(self.wait_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.wait_fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        os.close(self.turn_fd)
        os.close(self.wait_fd)


class _Prefetch:
    """Reads one span's bytes into the page cache ahead of the cursor, in turns with the other
    readers of the same disk.

    A background thread keeps up to ``PREFETCH_BYTES`` of the span read ahead of the cursor, in
    bursts of at least half of it. Each burst holds a node-wide lock for the file's device
    (:class:`_DiskLock`) while the disk reads it: several DDP ranks on one disk then take turns,
    and the disk serves one deep sequential queue at a time instead of interleaving every rank's
    stream into a seek per few MB (the kernel's mq-deadline scheduler switches streams after 16
    requests once one has waited 0.5 s). The cursor waits for its bytes to be read rather than
    faulting them in itself, so no reader sends the disk requests out of turn. Bytes already in
    the page cache are neither waited for nor read again.

    The span's byte length is estimated from the mean record size (an exact B-tree lookup costs
    a few seeks); a cursor that runs past the estimate has the thread read ``_EXTEND_BYTES``
    more, in its next turn.
    """

    def __init__(self, fd: int, base: int, span_bytes: int):
        self.fd, self.base, self.span_bytes = fd, base, span_bytes
        self.file_bytes = os.fstat(fd).st_size
        self.cursor = self.queued = self.done = self.end = 0
        self.need = 0  # the byte the cursor waits for (a record larger than the window)
        self.cond = threading.Condition()
        self.stopped = False
        self.thread: Optional[threading.Thread] = None

    def at(self, value, last: bool) -> None:
        """The cursor reached ``value`` (a buffer into the map): return once its bytes are read,
        and (unless ``last``) the first pages of the next record, which LMDB's cursor touches
        when it steps to it."""
        off = np.frombuffer(value, np.uint8).ctypes.data - self.base
        stop = min(off + len(value) + (0 if last else _NEXT_BYTES), self.file_bytes)
        with self.cond:
            if self.thread is None:  # the span's first record: start reading from here
                self.cursor = self.queued = self.done = off - off % _PAGE
                self.end = min(off + self.span_bytes, self.file_bytes)
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="imagenet_seq-readahead")
                self.thread.start()
            self.cursor, self.need = off, stop
            if stop > self.end:
                self.end = min(stop + _EXTEND_BYTES, self.file_bytes)
            if stop > self.done or self.queued - off < PREFETCH_BYTES // 2:
                self.cond.notify_all()  # only when the thread has work: no wake-up per record
            while stop > self.done and self.thread.is_alive():
                self.cond.wait(0.1)

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not None:  # it reads the reader's fd, which may be closed next
            self.thread.join(timeout=10.0)

    def _run(self) -> None:
        lock = _DiskLock.for_fd(self.fd)
        try:
            while True:
                with self.cond:
                    while not self.stopped and self.queued >= self.need and not (
                            self.queued < self.end and
                            self.queued - self.cursor < PREFETCH_BYTES // 2):
                        self.cond.wait()
                    if self.stopped:
                        return
                    begin = self.queued
                    target = max(min(self.cursor + PREFETCH_BYTES, self.end), self.need)
                if not _resident(self.base + begin, target - begin):
                    if lock is not None and not lock.acquire(lambda: self.stopped):
                        return
                    try:
                        target = self._burst(begin, target, lock)
                    finally:
                        if lock is not None:
                            lock.release()
                with self.cond:
                    self.queued = self.done = max(self.done, target)
                    self.cond.notify_all()
        finally:
            if lock is not None:
                lock.close()
            with self.cond:
                self.done = self.file_bytes  # a waiting cursor goes on by itself
                self.cond.notify_all()

    def _queue(self, begin: int, target: int) -> None:
        pos = begin
        while pos < target:  # in read-ahead-sized calls: the disk sees one deep sequential run
            n = min(_FADVISE_STEP, target - pos)
            os.posix_fadvise(self.fd, pos, n, os.POSIX_FADV_WILLNEED)
            pos += n

    def _burst(self, begin: int, target: int, lock: Optional["_DiskLock"]) -> int:
        """Queue ``[begin, target)`` for reading and wait until it is read; while no other
        reader waits for the disk, keep the queue topped up as the cursor moves on (one
        continuous stream). Returns the end of what was read."""
        self._queue(begin, target)
        buf = bytearray(_WAIT_STEP)
        pos = begin
        while pos < target and not self.stopped:
            n = min(_WAIT_STEP, target - pos)
            if not _resident(self.base + pos, n):
                # blocks until the queued pages arrive; reads any the kernel dropped from the queue
                os.preadv(self.fd, [memoryview(buf)[:n]], pos)
            pos += n
            with self.cond:
                self.done = pos
                self.cond.notify_all()
                more = max(min(self.cursor + PREFETCH_BYTES, self.end), self.need)
            if more - target >= PREFETCH_BYTES // 2 and (lock is None or not lock.contended()):
                self._queue(target, more)
                target = more
        return pos


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
        ahead = None if self._base is None else \
            _Prefetch(self._fd, self._base, int(count * self._mean_bytes()))
        try:
            with self._env.begin(buffers=True) as txn:
                cur = txn.cursor()
                if not cur.set_key(fmt.record_key(start)):
                    raise KeyError(f"{self.path}: record {fmt.record_key(start)!r} missing")
                for i in range(start, start + count):
                    key, value = cur.item()
                    if ahead is not None:
                        ahead.at(value, i + 1 == start + count)
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
        finally:
            if ahead is not None:
                ahead.close()

    def _mean_bytes(self) -> float:
        """Mean bytes a record takes in the file (value, LMDB page headers and B-tree)."""
        return os.fstat(self._fd).st_size / max(1, self.meta.num_records)

    def read_all(self) -> Iterator[Tuple[int, bytes, int]]:
        return self.read_range(0, self.meta.num_records)
