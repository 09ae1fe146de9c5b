"""A split's records, whatever its shards: the reader the Loader and every tool builds.

``SplitReader(root, split)`` reads any split :func:`~imagenet_seq.format.manifest.open_split`
describes: one file ``ILSVRC-<split>.lmdb``, read exactly as before by its
:class:`~.shard_file.ShardFile`, or the K shard files an ``ILSVRC-<split>.manifest.json``
names, read as one split: ``meta`` holds the split's totals, ``labels`` and ``checksums`` run
in the split's record order, and ``read_spans`` takes spans of split records (a span crossing
a shard boundary is cut there) and yields the records in the spans' order, so the record
stream -- and the shuffle, batches and resume states built on it -- is the one a single file
with the same records gives.

One reader per device: the shards are grouped by the device their files are on
(:mod:`.devices`; ``shard_devices`` / ``IMAGENET_SEQ_SHARD_DEVICES`` override it). One group
is read as one file is: one read-ahead of ``PREFETCH_BYTES`` running across spans and shard
files, in this thread (no hand-over). Several groups each get their own read-ahead thread,
started with the read, keeping up to ``DEVICE_AHEAD_BYTES`` of that group's records read ahead
(in the page cache), while this thread takes the records in the plan's order
(:func:`~.shard_file.read_runs`).

Every shard is checked against the manifest when the reader is made: its ``__meta__``
``"shard"`` entry (conversion, index, count, first record), its record count, the checksum of
its ``__crc__`` and ``__labels__`` and its classes; a shard that disagrees is a
:class:`~imagenet_seq.format.DamagedFile` naming it and the fix.
"""
from __future__ import annotations

import copy
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import lmdb
import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.format.manifest import Split, open_split
from imagenet_seq.read.devices import check_grouping, group_shards
from imagenet_seq.read.shard_file import ShardFile, read_runs

__all__ = ["SplitReader", "ShardFile"]

Item = Tuple[int, bytes, int]
# today's private handles of a one-file split's file, read through the reader (tests, tools)
_ONE_FILE_HANDLES = ("_env", "_fd", "_base", "_index", "_size")


class SplitReader:
    """Reads records of one split (one file or a set of shards). Opens files lazily (after
    fork), in ``reset_state`` or the first read; ``meta``, ``labels`` and ``checksums`` are read
    at construction, so an object can be built in the parent and used in a child process.

    Args:
        root: the folder holding the split (``ILSVRC-<split>.lmdb`` or its manifest), or the
            .lmdb / manifest file itself.
        split: ``'train'`` or ``'val'``.
        check_split: refuse a file whose metadata names the other split.
        shard_dirs: more folders to look for shards in (a disk mounted elsewhere since the
            conversion), after the folder the manifest names.
        shard_devices: how shards are grouped into readers (:mod:`.devices`): None (the
            environment's ``IMAGENET_SEQ_SHARD_DEVICES``, else by device), ``'device'``,
            ``'folder'``, ``'one'`` or one label per shard.

    Attributes:
        path: the one file, or the manifest of a sharded split.
        layout: the :class:`~imagenet_seq.format.manifest.Split` (shards and where they are).
        files: a :class:`~.shard_file.ShardFile` per shard, in split order.
        devices: the device groups, ``[[shard index, ...], ...]``: one reader each.
        covered: per group, ``{shard index: bytes}`` its read-ahead took in hand so far
            (reads of several shards only).
    """

    def __init__(self, root: str, split: str, check_split: bool = True,
                 shard_dirs: Sequence[str] = (), shard_devices: Any = None):
        self.split = split
        self.shard_dirs = tuple(shard_dirs or ())
        self.shard_devices = check_grouping(shard_devices)
        self.layout = _open_layout(root, split, self.shard_dirs)
        self.files = [ShardFile(s.path, split, check_split, s.first) for s in self.layout.shards]
        if self.layout.manifest is None:
            one = self.files[0]
            self.path, self.meta = one.path, one.meta
        else:
            self.path = self.layout.manifest
            self._check_shards()
            self.meta = _split_meta(split, self.layout.totals)
        self._joined_arrays: Dict[str, Optional[np.ndarray]] = {}
        self.legacy = self.meta.legacy
        self.num_classes = len(self.meta.classes)
        self.devices = group_shards(self.paths, self.shard_devices)
        self._group_of = [0] * len(self.files)
        for g, members in enumerate(self.devices):
            for j in members:
                self._group_of[j] = g
        self.covered: List[Dict[int, int]] = [{} for _ in self.devices]

    # -------------------------------------------------------------------------- the split
    @property
    def paths(self) -> List[str]:
        """Every shard file, in split order (one for a one-file split)."""
        return [f.path for f in self.files]

    def __len__(self) -> int:
        return self.meta.num_records

    def __getattr__(self, name: str):
        files = self.__dict__.get("files")
        if name in _ONE_FILE_HANDLES and files is not None and len(files) == 1:
            return getattr(files[0], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def labels(self) -> Optional[np.ndarray]:
        """Every record's label (int32), in split order; None for the original tool's files.
        One file: its read-only view of the file (shared by every process reading it). Shards:
        joined into one array on first use (a copy, 4 bytes a record; the Loader itself reads
        each shard's own view)."""
        return self._joined("labels")

    @property
    def checksums(self) -> Optional[np.ndarray]:
        """Every record's stored CRC-32 (uint32), in split order; None where the file has none.
        As :attr:`labels` (the Loader asks for them only with ``verify=True``)."""
        return self._joined("checksums")

    def _joined(self, what: str) -> Optional[np.ndarray]:
        """Every shard's ``labels`` / ``checksums`` in split order (None if one lacks them)."""
        if len(self.files) == 1:
            return getattr(self.files[0], what)
        if what not in self._joined_arrays:
            parts = [getattr(f, what) for f in self.files]
            self._joined_arrays[what] = None if any(p is None for p in parts) else \
                np.concatenate(parts)
        return self._joined_arrays[what]

    def _check_shards(self) -> None:
        """Each shard is the one the manifest names: the same conversion (``split_id``), index,
        count, first record, record count, content checksum
        (:func:`~imagenet_seq.format.manifest.shard_checksum`) and
        classes; their class counts add up to the split's."""
        manifest, totals, count = self.layout.manifest, self.layout.totals, len(self.files)
        for f, s in zip(self.files, self.layout.shards):
            fix = (f"copy shard {s.index} of this conversion back to {f.path} (from where the "
                   f"conversion wrote it), or convert again")
            info = f.shard
            if f.legacy or info is None:
                raise fmt.DamagedFile(
                    f"{f.path} is not a shard (its __meta__ has no 'shard' entry: a one-file "
                    f"split or another file under this shard's name), but {manifest} names it "
                    f"as shard {s.index} of {count}; {fix}")
            if info.get("split_id") != totals["split_id"]:
                raise fmt.DamagedFile(
                    f"{f.path} is a shard of another conversion (split_id "
                    f"{info.get('split_id')!r}), not of the one {manifest} describes (split_id "
                    f"{totals['split_id']!r}): a shard was copied over from another "
                    f"conversion; {fix}")
            want = {"index": s.index, "count": count, "first": s.first}
            got = {k: info.get(k) for k in want}
            if got != want or f.meta.num_records != s.records:
                raise fmt.DamagedFile(
                    f"{f.path} says it is shard {got['index']} of {got['count']} from record "
                    f"{got['first']} ({f.meta.num_records} records), but {manifest} names it "
                    f"shard {s.index} of {count} from record {s.first} ({s.records} records); "
                    f"{fix}")
            if s.checksum is not None and f.content != s.checksum:
                raise fmt.DamagedFile(
                    f"{f.path}: its record checksums and labels (__crc__, __labels__) are not "
                    f"the ones {manifest} recorded at conversion: the shard was changed or "
                    f"replaced since; {fix}")
            if list(f.meta.classes) != list(totals["classes"]):
                raise fmt.DamagedFile(
                    f"{f.path} has {len(f.meta.classes)} classes other than the "
                    f"{len(totals['classes'])} of {manifest} (first difference: "
                    f"{_first_difference(f.meta.classes, totals['classes'])}); {fix}")
        counts = np.sum([f.meta.class_counts for f in self.files], axis=0).tolist()
        if counts != list(totals["class_counts"]):
            raise fmt.DamagedFile(f"{manifest}: its class counts differ from the sum of its "
                                  "shards' (the manifest was edited or damaged); convert again "
                                  "with preprocess_sequential.py --resume (or --overwrite)")

    # ------------------------------------------------------------------------ file handles
    @property
    def indexed(self) -> bool:
        """Whether records are read through the offsets index (else through the B-tree):
        every shard has it."""
        for f in self.files:
            f._open()
        return all(f._index is not None for f in self.files)

    def reset_state(self) -> None:
        for f in self.files:
            f.reset_state()

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["files"] = [copy.copy(f) for f in self.files]  # closed copies: no handle shared
        state["_joined_arrays"] = {}  # joined again where asked for, not pickled
        return state

    # ---------------------------------------------------------------------------- reading
    def read_spans(self, spans: Sequence[Tuple[int, int]],
                   stop: Optional[threading.Event] = None) -> Iterator[Item]:
        """The records ``(index, jpeg bytes, label)`` of each ``(start, count)`` span of split
        records, in order; the read-ahead runs on from one span (and shard) into the next.
        Ends early once ``stop`` is set."""
        if len(self.files) == 1:
            return self.files[0].read_spans(spans, stop)
        return self._read_shards(list(spans), stop)

    def _read_shards(self, spans: List[Tuple[int, int]],
                     stop: Optional[threading.Event]) -> Iterator[Item]:
        n = len(self)
        for start, count in spans:
            if start < 0 or count < 0 or start + count > n:
                raise IndexError(f"range [{start}, {start + count}) outside 0..{n}")
        runs = self.layout.cut(spans)
        yield from read_runs(self.files, runs, self._group_of, stop, self.covered)

    def read_range(self, start: int, count: int) -> Iterator[Item]:
        """Records ``start .. start+count-1``, in order."""
        if len(self.files) == 1:
            return self.files[0].read_range(start, count)
        return self._read_shards([(start, count)] if count > 0 else [], None)

    def read_all(self) -> Iterator[Item]:
        return self.read_range(0, len(self))


def _open_layout(root: str, split: str, shard_dirs: Tuple[str, ...]) -> Split:
    """:func:`open_split`, an LMDB error met reading a one-file split's metadata named."""
    try:
        return open_split(root, split, shard_dirs)
    except lmdb.Error as e:
        raise fmt.damaged(fmt.find_split(root, split), e) from None


def _split_meta(split: str, totals: Dict[str, Any]) -> fmt.Metadata:
    """The split's metadata from its manifest's totals (what one file's ``__meta__`` holds)."""
    return fmt.Metadata(split=split, classes=list(totals["classes"]),
                        class_counts=[int(c) for c in totals["class_counts"]],
                        num_records=int(totals["num_records"]),
                        total_bytes=int(totals["total_bytes"]), order=totals["order"],
                        options=dict(totals["options"]), skipped=int(totals["skipped"]))


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"class {k}: {x!r} here, {y!r} in the manifest"
    return f"{len(a)} classes here, {len(b)} in the manifest"
