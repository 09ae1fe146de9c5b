"""The sequential reader of one device: records of one LMDB file, or of several files (the
shards of a split on one disk) read in the order a plan needs them, with one read-ahead.

:class:`ShardFile` reads one file of this package's format (a one-file split, or one shard of
a sharded split, ``format/manifest.py``). Records: with the offsets index preprocess writes
(``offsets.py``), each record's bytes are read with ``pread`` from where they lie, and the
read-ahead knows the exact bytes of every span a rank will read this epoch, so it runs on from
one span into the next. Without it (older files, the original tool's) a cursor walks LMDB's
B-tree, whose leaf pages copy-on-write commits leave away from their records: a seek there and
back each on an HDD.

:func:`read_runs` reads runs ``(file, first record, count)`` over several such files: the
records of each device group through one read-ahead (:meth:`Prefetch.over`) that runs across
spans and files in the runs' order; groups on several devices get one read-ahead thread each,
with ``DEVICE_AHEAD_BYTES`` of window, so every device reads its next records while the reader
takes records from another (``read/reader.py`` groups the shards).

Read-ahead (``readahead.py``): up to ``PREFETCH_BYTES`` ahead of the reader, in bursts taken
in turns by the readers of one disk. Measured on the emulated HDD of ``benchmarks/slow_disk.py``
(BENCHMARKS.md): raw stream 92-96 % of the disk's bandwidth; 4 DDP ranks on one disk 87-91 %
(the B-tree path 82 % in the same session as a 91 % run).
"""
from __future__ import annotations

import json
import os
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import lmdb
import numpy as np

from imagenet_seq.format import checksums, mapped
from imagenet_seq import format as fmt
from imagenet_seq.format import offsets as offsets_index
from imagenet_seq.format.manifest import shard_checksum
from imagenet_seq.read import readahead
from imagenet_seq.read.readahead import Prefetch, forward_runs

__all__ = ["ShardFile", "Run", "read_runs"]

Item = Tuple[int, bytes, int]
Run = Tuple[int, int, int]  # (file, first record in it, count)


class ShardFile:
    """Reads records of one LMDB file: a one-file split, or one shard of a sharded split.
    Opens the LMDB lazily (after fork), in ``reset_state``; readers of the same file in one
    process share one environment (``format.acquire_env``).

    ``meta``, ``labels`` and ``checksums`` are read once at construction with a short-lived
    environment, so an object can be built in the parent and used in a child process.
    ``labels``, ``checksums`` and the offsets index are read-only views of the file
    (``format/mapped.py``), not copies: every process reading the file -- the ranks of a node,
    forked children -- shares one copy in the page cache (20 bytes a record: 280 MB at 14 M
    records, once per machine); a pickled object carries where they lie and maps them again.

    Records are addressed by their index in this file; the items read carry ``first`` + that
    index (the split's record index, for a shard holding the split's records from ``first``
    on), and so do the errors' record indices. ``shard`` is the ``"shard"`` entry of the
    file's ``__meta__`` (None for a one-file split).
    """

    def __init__(self, path: str, split: str, check_split: bool = True, first: int = 0):
        self.path = path
        self.split = split
        self.first = int(first)
        env = fmt.acquire_env(self.path)
        try:
            self._read_metadata(env)
        except lmdb.Error as e:
            raise fmt.damaged(self.path, e) from None
        finally:
            fmt.release_env(self.path)
        self.legacy = self.meta.legacy
        if check_split and not self.legacy and self.meta.split != split:
            # training on the val file (or the other way round) is silent data leakage
            raise ValueError(
                f"{self.path} holds the {self.meta.split!r} split (its __meta__ says so), but "
                f"mode={split!r} was asked; pass mode={self.meta.split!r}, or the folder that "
                f"holds {fmt.split_filename(split)} (to read this file as {split} data on "
                "purpose, pass check_split=False)")
        self.num_classes = len(self.meta.classes)
        self._env = None
        self._fd: Optional[int] = None
        self._base: Optional[int] = None
        self._size = 0
        self._index: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def _read_metadata(self, env) -> None:
        with env.begin(buffers=True) as txn:
            self.meta = fmt.read_metadata(txn, self.path)
            raw = None if self.meta.legacy else fmt.get_checked(txn, fmt.META_KEY, self.path)
            shard = json.loads(bytes(raw)).get("shard") if raw is not None else None
            self.shard: Optional[Dict] = shard if isinstance(shard, dict) else None
            # what a manifest records of a shard's content (its __crc__ and __labels__)
            self.content = shard_checksum(txn) if self.shard is not None else None
            self.labels: Optional[np.ndarray] = fmt.read_labels(txn, self.meta, self.path)
            self.checksums: Optional[np.ndarray] = None if self.meta.legacy else \
                checksums.read(txn, self.meta.num_records, self.path)

    def __len__(self) -> int:
        return self.meta.num_records

    @property
    def indexed(self) -> bool:
        """Whether records are read through the offsets index (else through the B-tree)."""
        if self._env is None:
            self.reset_state()
        return self._index is not None

    def reset_state(self) -> None:
        self.close()
        # the shared environment may have been opened long ago: the file may have shrunk since
        self._size = fmt.check_file(self.path)
        self._env = fmt.acquire_env(self.path)
        self._fd = os.open(fmt.data_file(self.path), os.O_RDONLY)
        self._base = fmt.map_base(self.path)
        self._index = None if self.legacy else \
            offsets_index.read(self._env, self.meta.num_records, self.path)
        if self._index is not None:
            end = _index_end(*self._index)
            if end > self._size:
                raise fmt.DamagedFile(
                    f"{self.path} is {self._size:,} bytes but its offsets index places records "
                    f"up to byte {end:,}: the file is truncated; {fmt.REMEDY}")

    def close(self) -> None:
        if self._env is not None:
            self._env = None
            fmt.release_env(self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _closed_state(self) -> dict:
        state = dict(self.__dict__)
        state["_env"] = state["_fd"] = state["_base"] = state["_index"] = None
        return state

    def __copy__(self) -> "ShardFile":
        """A closed copy (no handle shared) holding the same ``labels`` / ``checksums``."""
        new = object.__new__(type(self))
        new.__dict__.update(self._closed_state())
        return new

    def __getstate__(self):
        state = self._closed_state()
        for name in ("labels", "checksums"):  # views of the file: mapped again on the far side
            state[name] = mapped.picklable(state[name])
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
        self._check_span(start, count)
        if self._index is not None:
            yield from self._read_indexed([(start, count)])
            return
        ahead = None if self._base is None else \
            Prefetch(self._fd, self._base, int(count * self._mean_bytes()))
        try:
            with self._env.begin(buffers=True) as txn:
                cur = txn.cursor()
                if not cur.set_key(fmt.record_key(start)):
                    raise fmt.DamagedFile(f"{self.path}: record {fmt.record_key(start)!r} "
                                          f"missing: the file is damaged; {fmt.REMEDY}")
                for i in range(start, start + count):
                    key, value = cur.item()
                    if ahead is not None:
                        ahead.at(value, i + 1 == start + count)
                    if bytes(key) != fmt.record_key(i):
                        raise fmt.DamagedFile(
                            f"{self.path}: expected key {fmt.record_key(i)!r}, found "
                            f"{bytes(key)!r}: the file is damaged; {fmt.REMEDY}")
                    fmt.check_in_file(value, self._base, self._size, self.path,
                                      f"record {fmt.record_key(i)!r}")
                    if self.legacy:
                        jpeg, label = fmt.decode_legacy_value(value)
                    else:
                        view, label = fmt.decode_record(value)
                        jpeg = view.tobytes()  # copy out: buffers die with the transaction
                    self._check_label(i, label)
                    yield self.first + i, jpeg, label
                    if i + 1 < start + count and not cur.next():
                        raise fmt.DamagedFile(f"{self.path}: the records end before record "
                                              f"{i + 1}: the file is damaged; {fmt.REMEDY}")
        finally:
            if ahead is not None:
                ahead.close()

    def _check_span(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.meta.num_records:
            raise IndexError(f"range [{start}, {start + count}) outside 0..{self.meta.num_records}")

    def read_spans(self, spans: Sequence[Tuple[int, int]],
                   stop: Optional[threading.Event] = None) -> Iterator[Tuple[int, bytes, int]]:
        """``read_range`` of each ``(start, count)`` in turn; with the offsets index, the
        read-ahead runs on from one span into the next. Ends early once ``stop`` is set."""
        if self._env is None:
            self.reset_state()
        for start, count in spans:
            self._check_span(start, count)
        if self._index is not None:
            yield from self._read_indexed(spans, stop)
            return
        for start, count in spans:
            for rec in self.read_range(start, count):
                if stop is not None and stop.is_set():
                    return
                yield rec

    def _read_indexed(self, spans: Sequence[Tuple[int, int]],
                      stop: Optional[threading.Event] = None) -> Iterator[Item]:
        """Records of ``spans`` through the offsets index: each record's bytes straight from the
        file (``pread``), no B-tree page read; exactly the spans' bytes are read ahead."""
        ahead = None
        if self._base is not None:
            segments = []
            for start, count in spans:
                segments.extend(self._segments(start, count))
            if segments:
                ahead = Prefetch(self._fd, self._base, segments=segments)
        try:
            for start, count in spans:
                for i in range(start, start + count):
                    if stop is not None and stop.is_set():
                        return
                    yield self._indexed_record(i, ahead)
        finally:
            if ahead is not None:
                ahead.close()

    def _segments(self, start: int, count: int) -> List[Tuple[int, int]]:
        """The file ranges the records ``start .. start+count-1`` lie in, as forward runs
        (records stored inside leaf pages left out: they are read through the B-tree)."""
        offs, lens = self._index
        o, n = offs[start:start + count], lens[start:start + count]
        placed = o >= 0
        return forward_runs(o[placed], n[placed])

    def _open(self) -> None:
        if self._env is None:
            self.reset_state()

    def _indexed_record(self, i: int, ahead) -> Item:
        off, n = int(self._index[0][i]), int(self._index[1][i])
        size = fmt.RECORD_HEADER.size
        if off < 0:  # a small value inside a leaf page: through the B-tree
            with self._env.begin(buffers=True) as txn:
                value = txn.get(fmt.record_key(i))
                if value is None:
                    raise fmt.DamagedFile(f"{self.path}: record {fmt.record_key(i)!r} missing: "
                                          f"the file is damaged; {fmt.REMEDY}")
                fmt.check_in_file(value, self._base, self._size, self.path,
                                  f"record {fmt.record_key(i)!r}")
                value = bytes(value)
            header, jpeg = value[:size], value[size:]
        else:
            if ahead is not None:
                ahead.at_bytes(off, n)
            # two reads, so the JPEG lands in its own bytes object (no second copy); pread past
            # the end of a file that shrank while open returns short: no SIGBUS on this path
            header, jpeg = os.pread(self._fd, size, off), os.pread(self._fd, n - size, off + size)
        label = fmt.RECORD_HEADER.unpack(header)[0] if len(header) == size else -1
        if len(jpeg) != n - size or jpeg[:2] != b"\xff\xd8" or (
                self.labels is not None and label != self.labels[i]):
            self._mismatch(i, off, n, len(header) + len(jpeg), label, jpeg[:4])
        self._check_label(i, label)
        return self.first + i, jpeg, label

    def _check_label(self, i: int, label: int) -> None:
        """A label outside the classes, or other than ``__labels__`` gives the record, is
        always an error (no ``skip_broken``), on every read path: a model would index past its
        last output, or learn from a wrong class without a word."""
        if self.num_classes and not 0 <= label < self.num_classes:
            key = fmt.record_key(i)
            raise fmt.RecordError(
                f"record {key!r} (index {i}) of {self.path} has label {label}, outside "
                f"0..{self.num_classes - 1}: the file is damaged; `imagenet-seq-verify "
                f"{self.path}` lists every damaged record; {fmt.REMEDY}", key, self.first + i)
        if self.labels is not None and label != self.labels[i]:
            key = fmt.record_key(i)
            raise fmt.RecordError(
                f"record {key!r} (index {i}) of {self.path} has label {label}, but the file's "
                f"__labels__ says {self.labels[i]}: the record changed after conversion "
                f"(rewritten, or damaged); `imagenet-seq-verify {self.path}` lists every such "
                f"record; {fmt.REMEDY}", key, self.first + i)

    def _mismatch(self, i: int, off: int, n: int, got: int, label: int, head: bytes) -> None:
        """Record ``i`` is not what the offsets index and ``__labels__`` say. Raises the error
        whose advice fixes it: a stale index (the B-tree puts the record elsewhere: rebuilding
        the index fixes it), a file that shrank, a label other than ``__labels__`` gives, or a
        record that is not a JPEG (re-copy)."""
        key = fmt.record_key(i)
        if got < n and os.fstat(self._fd).st_size < off + n:
            raise fmt.DamagedFile(
                f"{self.path} is {os.fstat(self._fd).st_size:,} bytes, but record {key!r} lies "
                f"at bytes [{off:,}, {off + n:,}): the file was truncated while open; {fmt.REMEDY}")
        where = None
        if self._base is not None:
            with self._env.begin(buffers=True) as txn:
                value = txn.get(key)
                if value is not None:
                    where = (np.frombuffer(value, np.uint8).ctypes.data - self._base, len(value))
        if where is not None and where != (off, n) and off >= 0:
            raise offsets_index.StaleOffsets(
                f"{self.path}: record {i} is at byte {where[0]}, its offsets index says {off} "
                "(the file was changed after conversion); rebuild the index with "
                f"`{offsets_index.rebuild_command(self.path)}` (if the file was damaged "
                f"rather than rewritten, `imagenet-seq-verify {self.path}` names the records: "
                "re-copy it)")
        self._check_label(i, label)
        raise fmt.RecordError(
            f"record {key!r} (index {i}) of {self.path} is not a JPEG any more (it starts "
            f"{head!r}, not b'\\xff\\xd8'): it changed after conversion, or the file is damaged; "
            f"`imagenet-seq-verify {self.path}` lists every damaged record; {fmt.REMEDY}", key,
            self.first + i)

    def _mean_bytes(self) -> float:
        """Mean bytes a record takes in the file (value, LMDB page headers and B-tree)."""
        return os.fstat(self._fd).st_size / max(1, self.meta.num_records)

    def read_all(self) -> Iterator[Tuple[int, bytes, int]]:
        return self.read_range(0, self.meta.num_records)


def _index_end(offs: np.ndarray, lens: np.ndarray, step: int = 1 << 20) -> int:
    """The end of the furthest record the offsets index places (in blocks: no temporary
    arrays of the file's record count)."""
    end = 0
    for k in range(0, len(offs), step):
        end = max(end, int((offs[k:k + step] + lens[k:k + step]).max(initial=0)))
    return end


def read_runs(files: Sequence[ShardFile], runs: Sequence[Run], groups: Sequence[int],
              stop: Optional[threading.Event] = None,
              covered: Optional[List[Dict[int, int]]] = None) -> Iterator[Item]:
    """The records of ``runs`` -- ``(file, first record in it, count)`` of ``files`` -- in the
    runs' order (items carry each file's ``first`` + index). Ends early once ``stop`` is set.

    ``groups[f]`` is the device group of file ``f``. With every file's offsets index, each
    group's records are read ahead by one :class:`Prefetch` over that group's files, in the
    runs' order: one group (one disk) reads ``PREFETCH_BYTES`` ahead of the reader across
    spans and files, as one file would; with several groups each one's read-ahead thread
    starts at once and keeps up to ``DEVICE_AHEAD_BYTES`` of its own records read ahead (page
    cache), so the devices read at the same time while this thread takes the records in the
    runs' order. ``covered[g][f]`` (when given) adds the bytes of file ``f`` group ``g``'s
    read-ahead took in hand. Files without the index are read a file's consecutive runs at a
    time (``ShardFile.read_spans``), one device at a time.
    """
    runs = [r for r in runs if r[2] > 0]
    used = sorted({f for f, _, _ in runs})
    for f in used:
        files[f]._open()
    if not all(files[f]._index is not None and files[f]._base is not None for f in used):
        k = 0
        while k < len(runs):
            f, j = runs[k][0], k
            while j < len(runs) and runs[j][0] == f:
                j += 1
            yield from files[f].read_spans([(s, c) for _, s, c in runs[k:j]], stop)
            if stop is not None and stop.is_set():
                return
            k = j
        return
    members: Dict[int, List[int]] = {}  # group -> its files, in the order the runs meet them
    segments: Dict[int, List[Tuple[int, int, int]]] = {}
    for f, start, count in runs:
        fl = members.setdefault(groups[f], [])
        if f not in fl:
            fl.append(f)
        n = fl.index(f)
        segments.setdefault(groups[f], []).extend(
            (n, b, e) for b, e in files[f]._segments(start, count))
    several = len(members) > 1
    window = readahead.DEVICE_AHEAD_BYTES if several else readahead.PREFETCH_BYTES
    aheads, views = {}, {}
    for g, fl in members.items():
        if segments[g]:
            aheads[g] = Prefetch.over([(files[f]._fd, files[f]._base) for f in fl],
                                      segments[g], window)
            views.update((f, aheads[g].file(n)) for n, f in enumerate(fl))
    try:
        if several:
            for ahead in aheads.values():
                ahead.start()  # every device reads from now on, not when its turn comes
        for f, start, count in runs:
            shard, view = files[f], views.get(f)
            for i in range(start, start + count):
                if stop is not None and stop.is_set():
                    return
                yield shard._indexed_record(i, view)
    finally:
        for g, ahead in aheads.items():
            ahead.close()
            if covered is not None:
                for n, f in enumerate(members[g]):
                    covered[g][f] = covered[g].get(f, 0) + ahead.covered[n]
