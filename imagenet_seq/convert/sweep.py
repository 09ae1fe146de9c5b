"""Pass 1's input as one sweep: items in read order, each with its sequence number.

A sweep gives chunks of ``(tag, rel, label, bytes or verdict)``, ``tag = (seq, token,
origin, rel, label)``: ``seq`` counts the items in read order (the same on every run over
the same sources), ``token`` says how to start the sweep again at this item (an archive: the
byte offsets of its header; a folder: None, the read order is recomputed), ``origin`` the
sequence number of the nested tar it came from (``sort_runs.NO_ORIGIN``: none). ``label`` is
the class index, or ``UNKNOWN`` where only the sweep's end tells it (the classes of a tar of
a tree are its class folders, all of them). Verdicts: ``passes.read_pass``.

:class:`FolderSweep`: a scanned folder tree (listing a folder reads no image data); items in
on-disk order (``source_reader.Reader``).
:class:`ThreadSweep`: an archive read front to back by one thread (``tar_sweep``).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator, List, Optional

from imagenet_seq.convert.source_reader import ChunkThread, Reader, chunked
from imagenet_seq.convert.sort_runs import NO_ORIGIN

__all__ = ["UNKNOWN", "FolderSweep", "ThreadSweep"]

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


class ThreadSweep(ChunkThread):
    """Runs ``make(cursor)`` (an iterator of items) in one thread, ``QUEUE_CHUNKS`` chunks
    ahead at most (:class:`source_reader.ChunkThread`); iterate for the chunks; ``close()``
    stops it at its next chunk."""

    def __init__(self, make: Callable[[dict], Iterator[tuple]], cursor: dict):
        def produce():
            items = make(cursor)
            try:
                yield from chunked(items)
            finally:
                if hasattr(items, "close"):
                    items.close()
        super().__init__("imagenet_seq-archive-sweep", produce)
