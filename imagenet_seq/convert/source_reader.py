"""ONE reader per source disk: the source files' bytes, read in on-disk order, in chunks.

Why one: parallel readers on one HDD interleave their requests and every switch is a seek
(the Loader's lesson, DESIGN.md). So a single thread reads, in the order the files lie on the
disk (``disk_order``), while the worker processes validate and normalise what it has read.
The thread stays ahead by at most ``QUEUE_CHUNKS`` chunks of at most ``CHUNK`` images or
``CHUNK_BYTES`` bytes (one oversized file is a chunk of its own): memory
``QUEUE_CHUNKS * CHUNK_BYTES`` (32 MiB) plus the files being read.

Read-ahead (``--read-ahead N``), order-preserving: the reader reads one file at a time, in read
order, and keeps the file it reads and the next ``N - 1`` open and handed to the kernel to read
ahead (``posix_fadvise(POSIX_FADV_WILLNEED)``, in read order, each file in pieces of
``HINT_PIECE``), at most ``READ_AHEAD_BYTES`` hinted but not yet read. The disk never idles
during the reader's round trips, yet every request reaches it in read order: the one reader
thread submits the hints file after file, and a read finds its pages read or in flight.
``N = 1``: one file at a time, no hint. Why not reads in flight (the previous design, ``N``
helper threads): their requests reach the disk in whatever order the threads submit them, and
a drive that serves requests in arrival order then seeks at almost every file.
``posix_fadvise`` rather than ``readahead(2)``: it is POSIX, in Python's ``os`` (readahead is
not), and works on every filesystem (ext4, XFS, NFS, FUSE); Linux runs both through the same
page-cache readahead, which caps one call at the device's readahead size (128 KiB by default),
hence the pieces. Where ``os.posix_fadvise`` does not exist, files are read one at a time. A
file is opened ahead and read through that descriptor (``read_source``): one open per file (a
round trip on NFS), and a filesystem that drops a file's cache at open (FUSE without
``kernel_cache``) keeps what was read ahead. A file that cannot be opened ahead is reported
when it is read, exactly as without read-ahead.

Defaults, measured (``benchmarks/results/convert_prefetch.md``, 5,000 ImageNet-like files):
a folder 8 (``FolderSource.read_ahead``). On slowfs's arrival-order HDD model 2 reads in flight
cost 4,711-4,739 positionings and ran at 76 img/s; the window of 8 cost 2-5 and ran at 595
(one file at a time: 2, 473). On the NFS model one file at a time lost 41 % against 2 in flight
(every open and read a round trip in turn); the window of 8 ran at 1.2x the 2 in flight. A
window of 4 was within the (busy) machine's noise of 8; 8 covers more latency for ~1 MB of page
cache. An archive does not come through this reader: it is read in one forward sweep
(``tar_sweep.SeqFile``), which the kernel reads ahead itself; ``--read-ahead`` does not apply.
"""
from __future__ import annotations

import collections
import errno
import os
import queue
import stat
import threading
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from imagenet_seq.convert.disk_order import disk_order
from imagenet_seq.convert.images import BrokenImage
from imagenet_seq.convert.scan import not_a_file_reason

__all__ = ["CHUNK", "CHUNK_BYTES", "QUEUE_CHUNKS", "READ_AHEAD", "READ_AHEAD_BYTES",
           "HINT_PIECE", "Item", "read_source", "read_one", "hint_range", "FolderSource",
           "chunked", "ChunkThread", "Reader"]

CHUNK = 32
CHUNK_BYTES = 1 << 20
QUEUE_CHUNKS = 32
READ_AHEAD = 1  # files in the window for a source that does not say (module docstring)
READ_AHEAD_BYTES = 16 << 20  # hinted but not yet read: page cache, not this process's memory
HINT_PIECE = 128 << 10  # one WILLNEED call reads at most the device's readahead size

# (plan position, path relative to the split folder, label, bytes or (status, message))
Item = Tuple[int, str, int, Union[bytes, Tuple[str, str]]]

# Files this thread's read-ahead opened (path -> descriptors, oldest first): ``read_source``
# reads through one of them instead of opening the file again. Per thread, because the reader
# that opens ahead is the thread that reads.
_ahead = threading.local()


def _opened_ahead() -> Dict[str, Deque[int]]:
    fds = getattr(_ahead, "fds", None)
    if fds is None:
        fds = _ahead.fds = {}
    return fds


def read_source(path: str) -> bytes:
    """The bytes of a regular file. Never blocks on a FIFO or device that replaced a file after
    the scan (opened non-blocking, checked with fstat before any read). Reads through the
    descriptor the read-ahead opened for ``path``, when there is one.

    Raises:
        BrokenImage: ``path`` is not a regular file (the reason says what it is).
        OSError: it cannot be read.
    """
    waiting = _opened_ahead().get(path)
    if waiting:
        fd = waiting.popleft()
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            reason = not_a_file_reason(path) if e.errno in (errno.ENOENT, errno.ELOOP) else None
            if reason:
                raise BrokenImage(reason) from None
            raise
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BrokenImage(not_a_file_reason(path) or "not a regular file")
        return f.read()


def read_one(split_dir: str, rel: str) -> Union[bytes, Tuple[str, str]]:
    """The file's bytes, or ('skip', reason) / ('error', message naming the file and the fix)."""
    path = os.path.join(split_dir, rel)
    try:
        return read_source(path)
    except BrokenImage as e:
        return ("skip", str(e))
    except OSError as e:
        return ("error", f"cannot read {path}: {e.strerror or e}; fix it (permissions, disk) "
                         "or remove it, then run again with --resume")


def hint_range(fd: int, offset: int, size: int) -> int:
    """Ask the kernel to read ``size`` bytes at ``offset`` of ``fd`` into the page cache
    (``POSIX_FADV_WILLNEED``, in pieces of ``HINT_PIECE``, front to back); returns the bytes
    hinted: 0 where the platform or the filesystem has no such hint. Does not wait for the
    data."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return 0
    done = 0
    try:
        while done < size:
            piece = min(HINT_PIECE, size - done)
            advise(fd, offset + done, piece, os.POSIX_FADV_WILLNEED)
            done += piece
    except OSError:  # e.g. ESPIPE, EINVAL: the read still works, just not ahead
        pass
    return done


class FolderSource:
    """Images as files below ``root`` (a split folder of an ImageFolder tree)."""

    read_ahead = 8  # files in the read-ahead window by default (module docstring)

    def __init__(self, root: str):
        self.root = root

    def describe(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def read(self, rel: str) -> Union[bytes, Tuple[str, str]]:
        return read_one(self.root, rel)

    def hint(self, rel: str, budget: int) -> Tuple[int, int, Optional[int]]:
        """Open ``rel`` ahead (this thread's next ``read`` of it reads through that descriptor)
        and hint up to ``budget`` of its bytes: (bytes hinted, bytes left unhinted, the
        descriptor for ``release``). A file that cannot be opened, or is not a regular file, is
        left alone: its read reports it."""
        path = os.path.join(self.root, rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return 0, 0, None
        try:
            st: Optional[os.stat_result] = os.fstat(fd)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return 0, 0, None
        _opened_ahead().setdefault(path, collections.deque()).append(fd)
        n = hint_range(fd, 0, min(st.st_size, budget))
        return n, st.st_size - n, fd

    def release(self, rel: str, fd: Optional[int]) -> None:
        """Close ``fd`` (from ``hint``) unless a read took it."""
        path = os.path.join(self.root, rel)
        fds = _opened_ahead()
        waiting = fds.get(path)
        if waiting and fd in waiting:
            waiting.remove(fd)
            os.close(fd)
        if not waiting:
            fds.pop(path, None)

    def order(self, rels: Sequence[str], keys: Sequence[int], method: str):
        """(indices of ``rels`` in on-disk order, method); ``keys`` = inodes from the scan."""
        return disk_order(self.root, rels, keys, method)

    def close(self) -> None:
        pass


def _read_in_order(source, items: Sequence[Tuple[int, str, int]],
                   depth: int) -> Iterator[Tuple[Tuple[int, str, int], object]]:
    """``(item, source.read(rel))`` in the order of ``items``, one read at a time. Before the
    read of item ``i``, items ``i .. i + depth - 1`` (at most ``READ_AHEAD_BYTES`` of them)
    have been handed to ``source.hint``, in order: item ``i`` itself too when it was not hinted
    yet (the first, or the one after a window stop), so that its request does not reach the
    disk after those of the files behind it. A file hinted only in part (the byte bound) stops
    the window until it is read, so the rest of it, read on demand, still reaches the disk in
    order. Sources without ``hint`` are read one file at a time."""
    hint = getattr(source, "hint", None) if depth > 1 else None
    window: Deque[tuple] = collections.deque()  # (index, hinted, unhinted, release token)
    ahead = 0  # bytes hinted and not yet read
    nxt = 0  # next index to hint
    try:
        for i, item in enumerate(items):
            if hint is not None:
                nxt = max(nxt, i)
                while (nxt < len(items) and nxt - i < depth and ahead < READ_AHEAD_BYTES
                       and not (window and window[-1][2])):
                    n, rest, token = hint(items[nxt][1], READ_AHEAD_BYTES - ahead)
                    window.append((nxt, n, rest, token))
                    ahead += n
                    nxt += 1
            got = source.read(item[1])
            if window and window[0][0] == i:
                _, n, _, token = window.popleft()
                ahead -= n
                source.release(item[1], token)
            yield item, got
    finally:
        for j, _, _, token in window:  # opened ahead, never read: the consumer stopped
            source.release(items[j][1], token)


def chunked(items: Iterator[tuple]) -> Iterator[list]:
    """Items (``item[3]``: bytes or a verdict) in chunks of at most ``CHUNK`` items or
    ``CHUNK_BYTES`` bytes (one larger item is a chunk of its own)."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += len(item[3]) if isinstance(item[3], bytes) else 0
        if len(chunk) >= CHUNK or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _chunks(source, items: Sequence[Tuple[int, str, int]], depth: int) -> Iterator[List[Item]]:
    reads = _read_in_order(source, items, depth)
    try:
        yield from chunked((pos, rel, label, data) for (pos, rel, label), data in reads)
    finally:
        reads.close()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class ChunkThread:
    """Chunks made in a daemon thread named ``name`` by ``produce()`` (called in the thread;
    an iterator of chunks, closed at the end when it can be), at most ``QUEUE_CHUNKS`` ahead of
    the consumer; then ``cleanup()``, in the thread. Iterate for the chunks (an exception in
    the thread is raised here, after the chunks before it); ``close()`` stops the thread at its
    next chunk. A daemon, so an exit never waits for a read stuck on a dying disk."""

    def __init__(self, name: str, produce: Callable[[], Iterator[list]],
                 cleanup: Optional[Callable[[], None]] = None):
        self._q: "queue.Queue" = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce, cleanup), daemon=True,
                                        name=name)
        self._thread.start()

    def _put(self, obj) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce, cleanup) -> None:
        chunks = None
        try:
            chunks = produce()
            for chunk in chunks:
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as e:  # a ScanError (damaged archive), a bug, MemoryError:
            self._put(_Failed(e))  # re-raised in the consumer
        finally:
            try:
                if chunks is not None and hasattr(chunks, "close"):
                    chunks.close()
            finally:
                if cleanup is not None:
                    cleanup()

    def __iter__(self) -> Iterator[list]:
        while True:
            got = self._q.get()
            if got is None:
                return
            if isinstance(got, _Failed):
                raise got.exc
            yield got

    def close(self) -> None:
        self._stop.set()


class Reader(ChunkThread):
    """Reads ``items`` ((plan position, rel, label), already in on-disk order) from ``source``
    (``FolderSource``, or another with its contract: ``read(rel)`` -> bytes or verdict; optional
    ``hint(rel, budget)`` / ``release(rel, token)`` for the read-ahead) in a thread.

    ``read_ahead``: files in the read-ahead window (module docstring); None: the source's
    default. Iterate for chunks (lists of :data:`Item`) in the same order. ``close()`` stops
    the thread at its next chunk (:class:`ChunkThread`); the source is closed by that thread,
    the only one that reads it.
    """

    def __init__(self, source, items: Sequence[Tuple[int, str, int]],
                 read_ahead: Optional[int] = None):
        if isinstance(source, str):
            source = FolderSource(source)
        self._depth = (getattr(source, "read_ahead", READ_AHEAD) if read_ahead is None
                       else read_ahead)
        items = list(items)
        # closing the chunks closes what was opened ahead and not read
        super().__init__("imagenet_seq-source-reader",
                         lambda: _chunks(source, items, self._depth), source.close)
