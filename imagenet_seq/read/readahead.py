"""Read-ahead for the sequential reader: bursts into the page cache, in turns per disk.

:class:`Prefetch` keeps up to ``PREFETCH_BYTES`` of the bytes a reader will need read ahead of
it, queued with ``posix_fadvise(WILLNEED)`` as one deep sequential run, in bursts during which
the reader holds a node-wide lock for the file's device (:class:`DiskLock`): DDP ranks on one
disk take turns instead of interleaving their streams into a seek each few MB. One read-ahead
may run over several files of one device (the shards of a split on one disk, in the order the
reader needs them); a reader of shards on several devices has one per device, each with a
window of ``DEVICE_AHEAD_BYTES`` (``read/shard_file.py``).
"""
from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import tempfile
import threading
import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from imagenet_seq.read.evict import page_residency

__all__ = ["PREFETCH_BYTES", "DEVICE_AHEAD_BYTES", "DISK_TURNS", "forward_runs", "DiskLock",
           "Prefetch"]

PREFETCH_BYTES = 64 << 20  # queued ahead of the cursor (16 MB: 6-7 points less with 4 ranks)
# With shards on several devices, each device's read-ahead runs up to this far ahead of the
# reader (page cache, per device; IMAGENET_SEQ_DEVICE_AHEAD_MB sets it): a device whose records
# the plan needs later keeps reading while the reader takes another device's chunks. The plan
# visits chunks of the devices in random order, so the window must hold several chunks. A
# fluid model of ImageNet's plan (1.28 M records, 1024-record chunks of ~113 MB, reader never
# the bottleneck) gives, for 2 devices, 1.35x one device with 64 MiB, 1.67x with 256 MiB,
# 1.80-1.85x with 512 MiB and 1.90-1.93x with 1 GiB; for 4 devices 3.5x with 512 MiB and
# 3.7x with 1 GiB.
def _mib_from_env(name: str, default: float) -> int:
    try:
        mib = float(os.environ.get(name, default))
    except ValueError:
        mib = -1.0
    if not mib > 0:
        raise ValueError(f"{name}={os.environ.get(name)!r}; expected a size in MiB above 0, "
                         f"e.g. {default:g}")
    return int(mib * (1 << 20))


DEVICE_AHEAD_BYTES = _mib_from_env("IMAGENET_SEQ_DEVICE_AHEAD_MB", 1024)
_FADVISE_STEP = 128 << 10  # the kernel reads at most read_ahead_kb per WILLNEED call


_PAGE = mmap.PAGESIZE
_EXTEND_BYTES = 2 << 20  # read past a span's estimated end in steps of this
_NEXT_BYTES = 3 * _PAGE  # the next record's first page: after this value and maybe a leaf page
_WAIT_STEP = 1 << 20  # the read-ahead thread confirms a burst read this much at a time
_LOOK_AHEAD_SEGMENTS = 4  # segments searched past the reader's for its next bytes
# records further apart than this are read ahead as two runs (reading the gap between them
# costs more than the seek it saves: ~1 MB is what an HDD transfers in one seek's time)
_GAP_BYTES = 1 << 20
# IMAGENET_SEQ_DISK_TURNS=0: readers of one disk do not take turns (each reads when it likes)
DISK_TURNS = os.environ.get("IMAGENET_SEQ_DISK_TURNS", "1") != "0"


def _resident(addr: int, length: int) -> bool:
    """Whether all pages of this process's memory ``[addr, addr + length)`` are in RAM (for a
    file map: whether the page cache holds that part of the file); False when unknown."""
    if length <= 0:
        return True
    vec = page_residency(addr, length)
    return vec is not None and bool((np.frombuffer(vec, np.uint8) & 1).all())


def forward_runs(offs: np.ndarray, lens: np.ndarray) -> List[Tuple[int, int]]:
    """File ranges ``(begin, end)`` covering records at ``offs`` / ``lens`` (in the order they
    are read) as forward runs: a run goes on while each record starts at or after the end of
    the one before, at most ``_GAP_BYTES`` further on. A converted file's span is one run; a
    record rewritten after conversion (it moved: the file's end, or a freed hole) is a run of
    its own, so the read-ahead reads exactly the bytes needed, in the order they are needed."""
    if not len(offs):
        return []
    offs = offs.astype(np.int64)
    ends = offs + lens.astype(np.int64)
    cut = np.flatnonzero((offs[1:] < ends[:-1]) | (offs[1:] - ends[:-1] > _GAP_BYTES)) + 1
    firsts = np.concatenate(([0], cut))
    lasts = np.concatenate((cut, [len(offs)])) - 1
    return [(int(offs[a]), int(ends[b])) for a, b in zip(firsts, lasts)]


class DiskLock:
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
    def for_fd(cls, data_fd: int) -> Optional["DiskLock"]:
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


class Prefetch:
    """Reads the bytes a reader will need into the page cache ahead of it, in turns with the
    other readers of the same disk.

    The bytes needed are a list of file ranges (segments: the records of one span, or of every
    span of an epoch) read in order; positions below count needed bytes, not file offsets, so
    the read-ahead runs from one span into the next without waiting for the reader to get there.
    A background thread keeps up to ``window`` (default ``PREFETCH_BYTES``) of them read ahead
    of the reader, in bursts of at least half of it (of ``PREFETCH_BYTES`` in a larger window). Each burst holds a node-wide lock for the
    file's device (:class:`DiskLock`) while the disk reads it: several DDP ranks on one disk
    then take turns, and the disk serves one deep sequential queue at a time instead of
    interleaving every rank's stream into a seek per few MB (the kernel's mq-deadline scheduler
    switches streams after 16 requests once one has waited 0.5 s). The reader waits for its
    bytes to be read rather than faulting them in itself, so no reader sends the disk requests
    out of turn. Bytes already in the page cache are neither waited for nor read again.

    Several files (:meth:`over`): segments ``(file, begin, end)`` of the files ``files`` (all
    on one device: the lock is the first file's), read in the order given; the reader says
    where it is in file ``f`` through :meth:`file` ``(f).at_bytes``. ``covered[f]`` counts the
    bytes of file ``f`` this read-ahead took in hand (read, or found in the page cache).

    Without the offsets index the segment is the one span the cursor walks, started at its
    first record and estimated from the mean record size (an exact B-tree lookup costs a few
    seeks); a cursor that runs past the estimate has the thread read ``_EXTEND_BYTES`` more, in
    its next turn.
    """

    def __init__(self, fd: int, base: int, span_bytes: int = 0,
                 segments: Sequence[Tuple[int, int]] = (),
                 files: Optional[Sequence[Tuple[int, int]]] = None,
                 window: Optional[int] = None):
        self.files = list(files) if files else [(fd, base)]  # (fd, map base) of each file
        self.fd, self.base, self.span_bytes = fd, base, span_bytes
        self.window = int(window or PREFETCH_BYTES)
        # a new burst starts once less than this is read ahead: half the window, or (a window
        # larger than PREFETCH_BYTES) a PREFETCH_BYTES burst short of it (a device that waits
        # for half of a large window to be taken idles longer than a burst costs)
        self.refill = self.window - min(self.window // 2, PREFETCH_BYTES)
        self.sizes = [os.fstat(f).st_size for f, _ in self.files]
        self.file_bytes = self.sizes[0]
        self.covered = [0] * len(self.files)
        self.seg_file: List[int] = []  # file offset where each segment starts
        self.seg_fno: List[int] = []  # the file each segment is in
        self.seg_pos: List[int] = [0]  # position (needed bytes) where each starts; then the total
        for seg in segments:
            if len(seg) == 3:
                self._add(seg[1], seg[2], seg[0])
            else:
                self._add(*seg)
        self.cursor = self.queued = self.done = 0
        self.end = self.seg_pos[-1]
        self.need = 0  # the position the reader waits for (a record larger than the window)
        self.cond = threading.Condition()
        self.stopped = False
        self.thread: Optional[threading.Thread] = None
        self._seg = 0  # the segment the reader is in

    @classmethod
    def over(cls, files: Sequence[Tuple[int, int]], segments: Sequence[Tuple[int, int, int]],
             window: Optional[int] = None) -> "Prefetch":
        """A read-ahead over segments ``(file, begin, end)`` of ``files`` ``[(fd, map base)]``
        (one device), in the order given."""
        return cls(files[0][0], files[0][1], segments=segments, files=files, window=window)

    def start(self) -> None:
        """Start reading ahead from the first segment now, before the reader needs a byte
        (else the thread starts at the reader's first :meth:`at_bytes`)."""
        with self.cond:
            if self.thread is None and self.seg_file:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="imagenet_seq-readahead")
                self.thread.start()

    def file(self, f: int) -> "_FileView":
        """The reader's handle for file ``f``: ``.at_bytes(off, length)`` as :meth:`at_bytes`."""
        return _FileView(self, f)

    def _add(self, begin: int, end: int, f: int = 0) -> None:
        begin, end = begin - begin % _PAGE, min(-(-end // _PAGE) * _PAGE, self.sizes[f])
        same = bool(self.seg_file) and self.seg_fno[-1] == f
        last_end = self.seg_file[-1] + self.seg_pos[-1] - self.seg_pos[-2] if same else -1
        if same and self.seg_file[-1] <= begin < last_end:
            begin = last_end  # the page this one shares with the last one
        if end <= begin:
            return
        if begin == last_end:
            self.seg_pos[-1] += end - begin  # contiguous with the last one: one segment
        elif end > begin:
            self.seg_file.append(begin)
            self.seg_fno.append(f)
            self.seg_pos.append(self.seg_pos[-1] + end - begin)

    def at(self, value, last: bool) -> None:
        """The cursor reached ``value`` (a buffer into the map): return once its bytes are read,
        and (unless ``last``) the first pages of the next record, which LMDB's cursor touches
        when it steps to it."""
        off = np.frombuffer(value, np.uint8).ctypes.data - self.base
        if not self.seg_file:  # the span's first record: its one segment starts here
            self._add(off, min(off + self.span_bytes, self.file_bytes))
            self.end = self.seg_pos[-1]
        self.at_bytes(off, len(value) + (0 if last else _NEXT_BYTES))

    def at_bytes(self, off: int, length: int, f: int = 0) -> None:
        """The reader needs bytes ``[off, off + length)`` of file ``f`` (in segment order):
        return once they are read. Bytes outside the segments (a record that moved after the
        reader planned its reads) return at once: the reader reads them itself."""
        k = self._segment_of(off, f)
        if k is None:
            return
        pos = self.seg_pos[k] + off - self.seg_file[k]
        stop = min(pos + length, self.seg_pos[k] + self.sizes[f] - self.seg_file[k])
        with self.cond:
            if self.thread is None:
                self.cursor = self.queued = self.done = pos - pos % _PAGE
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="imagenet_seq-readahead")
                self.thread.start()
            self.cursor, self.need = pos, stop
            if stop > self.end and self.span_bytes:  # past the one segment's estimated end
                self.end = self.seg_pos[-1] = min(stop + _EXTEND_BYTES,
                                                  self.seg_pos[-2] + self.file_bytes
                                                  - self.seg_file[-1])
            if stop > self.done or self.queued - pos < self.refill:
                self.cond.notify_all()  # only when the thread has work: no wake-up per record
            while stop > self.done and self.thread.is_alive():
                self.cond.wait(0.1)

    def _holds(self, k: int, off: int, f: int, slack: int = 0) -> bool:
        """Whether segment ``k`` holds offset ``off`` of file ``f`` (or lies ``slack`` bytes
        past it)."""
        return self.seg_fno[k] == f and \
            0 <= off - self.seg_file[k] < self.seg_pos[k + 1] - self.seg_pos[k] + slack

    def _segment_of(self, off: int, f: int = 0) -> Optional[int]:
        """The segment the reader's next bytes start in: its current one or one of the next
        few (it moves on in segment order); None when none holds them (a record written
        elsewhere after the segments were planned, e.g. in a file changed after conversion:
        read without waiting, correct but out of turn)."""
        if not self.seg_file:
            return None
        k = self._seg
        last = len(self.seg_file) - 1
        # the one estimated segment of a B-tree walk grows as the cursor runs past its end
        if self._holds(k, off, f, _EXTEND_BYTES if self.span_bytes and k == last else 0):
            return k
        for j in range(k + 1, min(k + 1 + _LOOK_AHEAD_SEGMENTS, last + 1)):
            if self._holds(j, off, f):
                self._seg = j  # the reader went on to the next span
                return j
        return None

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not None:  # it reads the reader's fd, which may be closed next
            self.thread.join(timeout=10.0)

    def _file_pieces(self, begin: int, end: int) -> Iterator[Tuple[int, int, int]]:
        """The file ranges ``(file, offset, length)`` of positions ``[begin, end)``."""
        k = max(0, bisect.bisect_right(self.seg_pos, begin) - 1)
        while begin < end and k < len(self.seg_file):
            stop = min(end, self.seg_pos[k + 1])
            if stop > begin:
                yield self.seg_fno[k], self.seg_file[k] + begin - self.seg_pos[k], stop - begin
                begin = stop
            k += 1

    def _pieces(self, begin: int, end: int) -> Iterator[Tuple[int, int]]:
        """The ranges ``(offset, length)`` of positions ``[begin, end)`` (one file's)."""
        for _, off, n in self._file_pieces(begin, end):
            yield off, n

    def _all_resident(self, begin: int, end: int) -> bool:
        return all(_resident(self.files[f][1] + off, n)
                   for f, off, n in self._file_pieces(begin, end))

    def _count(self, begin: int, end: int) -> None:
        for f, _, n in self._file_pieces(begin, end):
            self.covered[f] += n

    def _run(self) -> None:
        lock = DiskLock.for_fd(self.fd)
        try:
            while True:
                with self.cond:
                    while not self.stopped and self.queued >= self.need and not (
                            self.queued < self.end and
                            self.queued - self.cursor < self.refill):
                        self.cond.wait()
                    if self.stopped:
                        return
                    begin = self.queued
                    target = max(min(self.cursor + self.window, self.end), self.need)
                if not self._all_resident(begin, target):
                    if lock is not None and not lock.acquire(lambda: self.stopped):
                        return
                    try:
                        target = self._burst(begin, target, lock)
                    finally:
                        if lock is not None:
                            lock.release()
                self._count(begin, target)
                with self.cond:
                    self.queued = self.done = max(self.done, target)
                    self.cond.notify_all()
        finally:
            if lock is not None:
                lock.close()
            with self.cond:
                self.done = 1 << 62  # a waiting reader goes on by itself
                self.cond.notify_all()

    def _queue(self, begin: int, target: int) -> None:
        for f, pos, n in self._file_pieces(begin, target):
            fd, end = self.files[f][0], pos + n
            while pos < end:  # in read-ahead-sized calls: the disk sees one deep sequential run
                step = min(_FADVISE_STEP, end - pos)
                os.posix_fadvise(fd, pos, step, os.POSIX_FADV_WILLNEED)
                pos += step

    def _burst(self, begin: int, target: int, lock: Optional["DiskLock"]) -> int:
        """Queue positions ``[begin, target)`` for reading and wait until they are read; while
        no other reader waits for the disk, keep the queue topped up as the reader moves on
        (one continuous stream). A window larger than ``PREFETCH_BYTES`` is queued at most that
        much ahead of what is read (the kernel is not handed a GB at once). Returns the end of
        what was read."""
        depth = max(PREFETCH_BYTES, _WAIT_STEP)
        queued = target if self.window <= depth else min(target, begin + depth)
        self._queue(begin, queued)
        buf = bytearray(_WAIT_STEP)
        pos = begin
        while pos < target and not self.stopped:
            step = min(_WAIT_STEP, target - pos)
            for f, off, n in self._file_pieces(pos, pos + step):
                fd, base = self.files[f]
                if not _resident(base + off, n):
                    # blocks until the queued pages arrive; reads any the kernel dropped
                    os.preadv(fd, [memoryview(buf)[:n]], off)
            pos += step
            with self.cond:
                self.done = pos
                self.cond.notify_all()
                more = max(min(self.cursor + self.window, self.end), self.need)
            if more - target >= self.window - self.refill and \
                    (lock is None or not lock.contended()):
                if self.window <= depth:  # a larger window is queued below, as reads go on
                    self._queue(target, more)
                    queued = more
                target = more
            if queued < target and queued - pos < depth // 2:
                top = min(target, pos + depth)
                self._queue(queued, top)
                queued = top
        return pos


class _FileView:
    """One file of a :class:`Prefetch` over several: what a shard's reader tells it."""

    __slots__ = ("ahead", "f")

    def __init__(self, ahead: Prefetch, f: int):
        self.ahead, self.f = ahead, f

    def at_bytes(self, off: int, length: int) -> None:
        self.ahead.at_bytes(off, length, self.f)
