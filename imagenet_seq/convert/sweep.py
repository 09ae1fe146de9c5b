"""Pass 1's input as one sweep: items in read order, each with its sequence number.

A sweep gives chunks of ``(tag, rel, label, bytes or verdict)``, ``tag = (seq, token,
origin, rel, label)``: ``seq`` counts the items in read order (the same on every run over
the same sources), ``token`` says how to start the sweep again at this item (an archive: the
byte offsets of its header; a folder: None, the read order is recomputed), ``origin`` the
sequence number of the nested tar it came from (``sort_runs.NO_ORIGIN``: none). ``label`` is
the class index, or ``UNKNOWN`` where only the sweep's end tells it (the classes of a tar of
a tree are its class folders, all of them). Verdicts: ``passes.read_pass``.

:class:`FolderSweep`: a scanned folder tree (listing a folder reads no image data), or any
Scan whose source reads by name; items in on-disk order (``source_reader.Reader``).
:class:`ThreadSweep`: an archive read front to back by one thread (``tar_sweep``).
"""
from __future__ import annotations

import hashlib
import queue
import threading
from typing import Callable, Iterator, List, Optional

from imagenet_seq.convert.source_reader import CHUNK, CHUNK_BYTES, QUEUE_CHUNKS, Reader
from imagenet_seq.convert.sort_runs import NO_ORIGIN

__all__ = ["UNKNOWN", "FolderSweep", "ThreadSweep", "chunked"]

UNKNOWN = -1  # a label settled at the merge (stored as 0xFFFFFFFF in the run)


class FolderSweep:
    """The files of a Scan in read order (``order``: indices of ``rels``), read by name."""



    def __init__(self, source, entries, order: List[int], how: str):
        self.source, self.entries, self.order, self.how = source, entries, order, how
        self.total = self.images = len(entries)

    def identity(self) -> str:
        """What a resumed run must find the same: the files, labels and their read order."""
        h = hashlib.sha1()
        for i in self.order:
            rel, label = self.entries[i]
            h.update(f"{rel}\t{label}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def describe(self, rel: str) -> str:
        return self.source.describe(rel)

    def reader(self, cursor: dict, read_ahead: Optional[int]):
        start = cursor["seq"]
        items = []
        for seq in range(start, len(self.order)):
            rel, label = self.entries[self.order[seq]]
            items.append(((seq, None, NO_ORIGIN, rel, label), rel, label))
        if not items:
            return _Empty()
        return Reader(self.source, items, read_ahead)


class _Empty:
    def __iter__(self):
        return iter(())

    def close(self):
        pass


def chunked(items: Iterator[tuple]) -> Iterator[list]:
    """Items in chunks of at most ``CHUNK`` items or ``CHUNK_BYTES`` bytes."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += len(item[3]) if isinstance(item[3], bytes) else 0
        if len(chunk) >= CHUNK or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class ThreadSweep:
    """Runs ``make(cursor)`` (an iterator of items) in one thread, ``QUEUE_CHUNKS`` chunks
    ahead at most; iterate for the chunks; ``close()`` stops it at its next chunk."""

    def __init__(self, make: Callable[[dict], Iterator[tuple]], cursor: dict):
        self._q: "queue.Queue" = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, cursor), daemon=True,
                                        name="imagenet_seq-archive-sweep")
        self._thread.start()

    def _put(self, obj) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make, cursor) -> None:
        items = None
        try:
            items = make(cursor)
            for chunk in chunked(items):
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as e:  # a ScanError (damaged archive), a bug: the consumer's
            self._put(_Failed(e))
        finally:
            if items is not None and hasattr(items, "close"):
                items.close()

    def __iter__(self):
        while True:
            got = self._q.get()
            if got is None:
                return
            if isinstance(got, _Failed):
                raise got.exc
            yield got

    def close(self) -> None:
        self._stop.set()
