"""ONE reader per source disk: the source files' bytes, read in on-disk order, in chunks.

Why one: parallel readers on one HDD interleave their requests and every switch is a seek
(the Loader's lesson, DESIGN.md). So a single thread reads, in the order the files lie on the
disk (``disk_order``), while the worker processes validate and normalise what it has read.
The thread stays ahead by at most ``QUEUE_CHUNKS`` chunks of at most ``CHUNK`` images or
``CHUNK_BYTES`` bytes (one oversized file is a chunk of its own): memory
``QUEUE_CHUNKS * CHUNK_BYTES`` (32 MiB) plus the files being read.

Read-ahead (``--read-ahead N``): the reader keeps ``N`` reads of the NEXT files in on-disk
order in flight (``N`` helper threads, file ``i`` read by helper ``i % N``, results taken in
order). A folder's default is 2: each file costs an open and a read, each a round trip to the
disk's driver, and with one at a time the disk idles during those round trips. On the emulated
HDD (``benchmarks/convert_order.py``, 3,000 files, four alternating pairs on the 2-core
machine, ``results/convert_order_readahead2.json``) 2 in flight won every pair: pass 1 at
547-585 against 417-440 img/s, the whole command 363-383 against 305-333, with the same single
seek; 8 in flight had arrived out of order often enough to cost 327 seeks (an earlier session),
so more than 2 only for a high-latency mount such as NFS. A tar's default is 1: its
members are ``pread`` from one open file, which the kernel already reads ahead. At most
``2 * N`` files are read but not yet chunked.
"""
from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from imagenet_seq.convert.disk_order import disk_order
from imagenet_seq.convert.images import BrokenImage
from imagenet_seq.convert.scan import not_a_file_reason

__all__ = ["CHUNK", "CHUNK_BYTES", "QUEUE_CHUNKS", "READ_AHEAD", "Item", "read_source", "read_one",
           "FolderSource", "Reader"]

CHUNK = 32
CHUNK_BYTES = 1 << 20
QUEUE_CHUNKS = 32
READ_AHEAD = 1  # reads in flight for a source that does not say (see the module docstring)

# (plan position, path relative to the split folder, label, bytes or (status, message))
Item = Tuple[int, str, int, Union[bytes, Tuple[str, str]]]


def read_source(path: str) -> bytes:
    """The bytes of a regular file. Never blocks on a FIFO or device that replaced a file after
    the scan (opened non-blocking, checked with fstat before any read).

    Raises:
        BrokenImage: ``path`` is not a regular file (the reason says what it is).
        OSError: it cannot be read.
    """
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


class FolderSource:
    """Images as files below ``root`` (a split folder of an ImageFolder tree)."""

    read_ahead = 2  # reads in flight by default (module docstring)

    def __init__(self, root: str):
        self.root = root

    def describe(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def read(self, rel: str) -> Union[bytes, Tuple[str, str]]:
        return read_one(self.root, rel)

    def order(self, rels: Sequence[str], keys: Sequence[int], method: str):
        """(indices of ``rels`` in on-disk order, method); ``keys`` = inodes from the scan."""
        return disk_order(self.root, rels, keys, method)

    def close(self) -> None:
        pass


def _read_ahead(read, items: Sequence[Tuple[int, str, int]], stop: threading.Event,
                depth: int) -> Iterator[Tuple[Tuple[int, str, int], object]]:
    """``(item, read(rel))`` in the order of ``items``, with up to ``depth`` reads ahead.

    Helper ``k`` reads items ``k, k + depth, ...`` and hands each result over through its own
    one-slot queue, so the reads in flight are always the next ``depth`` files. The helpers are
    daemon threads and stop at ``stop`` (a read stuck on a dying disk never delays an exit);
    the generator joins them when it ends, so the caller may close the source afterwards.
    """
    depth = max(1, min(depth, len(items)))
    slots = [queue.Queue(maxsize=1) for _ in range(depth)]

    def helper(k: int) -> None:
        for i in range(k, len(items), depth):
            if stop.is_set():
                return
            try:
                got = read(items[i][1])
            except BaseException as e:  # a bug or MemoryError: re-raised by the consumer
                got = _Failed(e)
            while not stop.is_set():
                try:
                    slots[k].put(got, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(got, _Failed):
                return

    helpers = [threading.Thread(target=helper, args=(k,), daemon=True,
                                name=f"imagenet_seq-source-read-{k}") for k in range(depth)]
    for t in helpers:
        t.start()
    try:
        for i, item in enumerate(items):
            while True:
                try:
                    got = slots[i % depth].get(timeout=0.1)
                    break
                except queue.Empty:
                    if stop.is_set():
                        return
            if isinstance(got, _Failed):
                raise got.exc
            yield item, got
    finally:
        stop.set()
        for t in helpers:
            t.join()


def _chunks(source, items: Sequence[Tuple[int, str, int]], stop: threading.Event,
            depth: int) -> Iterator[List[Item]]:
    chunk: List[Item] = []
    size = 0
    reads = _read_ahead(source.read, items, stop, depth)
    try:
        for (pos, rel, label), data in reads:
            chunk.append((pos, rel, label, data))
            size += len(data) if isinstance(data, bytes) else 0
            if len(chunk) >= CHUNK or size >= CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk
    finally:
        reads.close()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Reader:
    """Reads ``items`` ((plan position, rel, label), already in on-disk order) from ``source``
    (``FolderSource``, ``tar_source.TarSource``: ``read(rel)`` -> bytes or verdict) in a thread.

    Iterate for chunks (lists of :data:`Item`) in the same order. ``close()`` stops the thread
    at its next chunk; it is a daemon, so an exit never waits for a read stuck on a dying disk.
    """

    def __init__(self, source, items: Sequence[Tuple[int, str, int]],
                 read_ahead: Optional[int] = None):
        if isinstance(source, str):
            source = FolderSource(source)
        self._depth = (getattr(source, "read_ahead", READ_AHEAD) if read_ahead is None
                       else read_ahead)
        self._q: "queue.Queue" = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, list(items)), daemon=True,
                                        name="imagenet_seq-source-reader")
        self._thread.start()

    def _put(self, obj) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source, items) -> None:
        reads_done = threading.Event()  # the read-ahead helpers' stop; set when they are joined
        chunks = _chunks(source, items, reads_done, self._depth)
        try:
            for chunk in chunks:
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as e:  # a bug or MemoryError: re-raised in the consumer
            self._put(_Failed(e))
        finally:
            chunks.close()  # joins the read-ahead helpers
            source.close()  # here: no other thread can be inside a read of it

    def __iter__(self) -> Iterator[List[Item]]:
        while True:
            got = self._q.get()
            if got is None:
                return
            if isinstance(got, _Failed):
                raise got.exc
            yield got

    def close(self) -> None:
        self._stop.set()
