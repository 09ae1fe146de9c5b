"""Pass 2's output: the shard being written, the step to the next, the manifest at the end.

Where the conversion's state lives (crash safety): pass 1's progress and skip records are in
shard 0's ``.partial`` (for K = 1 the one file's, as before). During pass 2 the shard being
written holds the progress; at a shard's end (:class:`ShardSink`) the next shard's ``.partial``
is made first, holding the progress as it stands there (the runs' offsets, records written)
and the skip records of the positions after this shard, committed and fsync'd; only then does
this shard's final transaction (labels, checksums, ``__meta__`` with its ``"shard"`` key, its
own skip records kept, the progress deleted) commit, and it is indexed, fsync'd and renamed.
So a kill at any point leaves the state in the lowest-numbered ``.partial`` holding
``__progress__``; every shard before it is finished (renamed, or finished and renamed on
resume). The manifest is made from the finished shards alone (their metadata), so a kill
between the last rename and the manifest loses nothing either.
"""
from __future__ import annotations

import array
import json
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf
from imagenet_seq.format import offsets
from imagenet_seq.convert.passes import ConversionError
from imagenet_seq.convert.settle import report_rows
from imagenet_seq.convert.shards import Layout

__all__ = ["skips", "check_same_file", "seal", "ShardSink", "finish_split"]


def skips(txn) -> List[Tuple[bytes, dict]]:
    """The skip records of an open transaction, in key order: ``(key, record)``."""
    out = []
    cur = txn.cursor()
    if not cur.set_range(fmt.SKIP_PREFIX):
        return out
    for k, v in cur:
        k = bytes(k)
        if not k.startswith(fmt.SKIP_PREFIX):
            break
        out.append((k, json.loads(bytes(v))))
    return out


def _write_offsets(env, path: str, num_records: int) -> None:
    """The offsets index (``offsets.py``); where it cannot be made (no ``/proc/self/maps``) the
    file is complete without it and readers use the B-tree: warn, do not fail the conversion."""
    try:
        offsets.write(env, path, num_records)
    except OSError as e:
        warnings.warn(f"{path}: no offsets index written ({e}); readers will walk the B-tree "
                      "(slower from an HDD)")


def check_same_file(partial: str, ino: int) -> None:
    """The .partial must still be the file this conversion opened: never report success
    over a file another process put there (the lock prevents it where flock works)."""
    try:
        now = os.stat(partial).st_ino
    except FileNotFoundError:
        now = None
    if now != ino:
        raise ConversionError(
            f"{partial} was {'deleted' if now is None else 'replaced'} by another process "
            f"while this conversion wrote it (another conversion into "
            f"{os.path.dirname(partial)}?): what this one wrote is lost and nothing was "
            "renamed; when no other conversion runs there, run again (--resume continues "
            "whatever .partial is there)")


def _remove(path: str) -> None:
    for p in (path, path + "-lock"):
        if os.path.exists(p):
            os.remove(p)


def seal(env, partial: str, ino: int, num_records: int, has_offsets: bool = False) -> None:
    """A finished ``.partial`` (its ``__meta__`` committed) indexed, fsync'd, closed and
    renamed to its final name."""
    try:
        if not has_offsets:
            _write_offsets(env, partial, num_records)
        env.sync(True)
    finally:
        env.close()
    check_same_file(partial, ino)
    os.replace(partial, partial[:-len(".partial")])  # lock=False: renaming the open file is safe
    _remove(partial)


class ShardSink:
    """The shard pass 2 writes into, and the step to the next (module docstring).

    ``state`` is the conversion's progress record (shared with the merge); its ``"shard"``
    says which shard is being written, the split record it starts at and its JPEG bytes so far.
    """

    def __init__(self, layout: Layout, env, ino: int, state: dict, classes: List[str],
                 options: dict, alone: bool = False):
        self.layout, self.env, self.ino, self.state = layout, env, ino, state
        self.alone = alone  # one shard written on its own (a distributed conversion)
        self.classes, self.options = classes, options
        self.labels = array.array("I")  # of the shard's records so far (4 bytes each)
        self._next: Optional[tuple] = None
        self.writing = layout.folder(self.index)  # the folder a write goes to now
        self.finished: Dict[int, tuple] = {}  # shard -> (meta, "shard" key, checksum, skips)

    @property
    def index(self) -> int:
        return self.state["shard"]["index"]

    @property
    def end(self) -> int:
        """Merged items from here on belong to later shards."""
        return self.layout.end(self.index)

    def load_labels(self) -> None:
        """The labels of the records a resumed shard holds already (their 4-byte headers)."""
        self.labels = array.array("I")
        n = self.local(self.state["written"])
        if n:
            with self.env.begin(buffers=True) as txn:
                for k in range(n):
                    self.labels.append(fmt.RECORD_HEADER.unpack_from(
                        txn.get(fmt.record_key(k)), 0)[0])

    @property
    def last(self) -> bool:
        return self.alone or self.index == self.layout.count - 1

    def local(self, written: int) -> int:
        """The shard's own record number of the split's record ``written``."""
        return written - self.state["shard"]["first"]

    def hand_over(self, txn) -> None:
        """Make the next shard's ``.partial`` hold the progress from here on; committed and
        fsync'd before this shard's final transaction (``txn``, still open) deletes its own
        progress. Skip records stay in the shard that met them (shard 0 for pass 1's)."""
        j = self.index + 1
        path = self.layout.partial(j)
        self.writing = self.layout.folder(j)
        _remove(path)  # made by a run killed before this shard's end: made again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        env = fmt.open_env(path, readonly=False, lock=False)
        try:
            nxt = {"index": j, "first": self.state["written"], "bytes": 0}
            with env.begin(write=True) as t2:
                t2.put(fmt.PROGRESS_KEY, json.dumps(dict(self.state, shard=nxt)).encode())
            env.sync(True)
            self._next = (env, os.stat(path).st_ino, nxt)
            self.writing = self.layout.folder(self.index)
        except BaseException:
            env.close()
            raise

    def finish(self, txn) -> None:
        """This shard's final records, in its last transaction: labels, metadata (with the
        ``"shard"`` key when there are several), its skip records kept, the progress
        deleted."""
        kept = skips(txn)
        counted = sum(1 for _, d in kept if not d.get("note"))
        labels = np.frombuffer(self.labels, dtype=np.uint32).astype("<i4")
        self.labels = array.array("I")
        n = self.local(self.state["written"])
        if len(labels) != n:
            raise ConversionError(f"internal: {len(labels)} labels for {n} records; run "
                                  "again with --overwrite")
        one = self.layout.count == 1  # the one file is the split: the split's totals
        meta = fmt.Metadata(
            split=self.layout.split, classes=self.classes,
            class_counts=np.bincount(labels, minlength=len(self.classes)).tolist(),
            num_records=n, total_bytes=self.state["bytes"] if one else
            self.state["shard"]["bytes"],
            order="random" if self.layout.split == "train" else "sorted",
            options=self.options, skipped=counted)
        raw, key = meta.to_json(), {}
        if not one:
            doc = json.loads(raw)
            key = doc["shard"] = {"index": self.index, "count": self.layout.count,
                                  "first": self.state["shard"]["first"],
                                  "split_id": self.state["split_id"]}
            raw = json.dumps(doc, sort_keys=True).encode()
        txn.put(fmt.LABELS_KEY, labels.tobytes())
        txn.delete(fmt.PROGRESS_KEY)
        txn.put(fmt.META_KEY, raw)  # metadata last
        # what finish_split needs, without opening the file again (as _read_shard gives it)
        self.finished[self.index] = (meta, key, mf.shard_checksum(txn), kept)

    def seal(self) -> None:
        """After :meth:`finish` committed: index, fsync, rename; the next shard is current."""
        env, self.env = self.env, None
        seal(env, self.layout.partial(self.index), self.ino, self.local(self.state["written"]))
        if self._next is not None:
            self.env, self.ino, self.state["shard"] = self._next
            self._next = None
            self.writing = self.layout.folder(self.index)

    def close(self) -> None:
        for env in (self.env, self._next[0] if self._next else None):
            if env is not None:
                env.close()
        self.env = self._next = None


def _read_shard(path: str) -> Tuple[fmt.Metadata, dict, str, List[Tuple[bytes, dict]]]:
    """A finished shard's metadata, its ``"shard"`` key, checksum and skip records."""
    env = fmt.open_env(path)
    try:
        with env.begin(buffers=True) as txn:
            meta = fmt.read_metadata(txn, path)
            raw = json.loads(bytes(fmt.get_checked(txn, fmt.META_KEY, path)))
            return meta, raw.get("shard") or {}, mf.shard_checksum(txn), skips(txn)
    finally:
        env.close()


def finish_split(layout: Layout, split_id: Optional[str], write: bool = True,
                 finished: Optional[Dict[int, tuple]] = None
                 ) -> Tuple[List[dict], List[Tuple[str, str]], Optional[str]]:
    """Every shard finished: the manifest written (K > 1, ``write``) from the shards' own
    metadata (``finished``: what ``ShardSink`` knows of the shards it wrote; the others are
    read from their files), each shard checked to be this conversion's.
    Returns (a row per shard: index, path, folder, records, bytes, file_bytes; the skipped
    files (path, reason) in the order they were met; the manifest's path or None).

    Raises:
        ConversionError: a shard of another conversion (its split_id or place differs).
    """
    rows, shards, skipped, metas = [], [], [], []
    first = 0
    for j in range(layout.count):
        path = layout.final(j)
        try:
            meta, key, checksum, sk = (finished or {}).get(j) or _read_shard(path)
        except (fmt.DamagedFile, ValueError, OSError) as e:
            raise ConversionError(f"{e} (a finished shard of this conversion); pass "
                                  "--overwrite to convert again") from None
        want = None if layout.count == 1 else {
            "index": j, "count": layout.count, "first": first,
            "split_id": split_id or key.get("split_id")}
        if want is not None and key != want:
            raise ConversionError(
                f"{path} is not shard {j} of this conversion (its __meta__ says {key}, "
                f"expected {want}): it was left by another conversion; pass --overwrite to "
                "convert again")
        split_id = split_id or key.get("split_id")
        metas.append(meta)
        skipped += sk
        shards.append(mf.Shard(j, path, first, meta.num_records, meta.total_bytes,
                               os.path.getsize(path), checksum))
        rows.append({"index": j, "path": path, "folder": layout.folder(j),
                     "records": meta.num_records, "bytes": meta.total_bytes,
                     "file_bytes": os.path.getsize(path)})
        first += meta.num_records
    skipped.sort(key=lambda kd: kd[0])
    manifest = None
    if layout.count > 1 and write:
        totals = {"num_records": first, "total_bytes": sum(m.total_bytes for m in metas),
                  "classes": metas[0].classes,
                  "class_counts": np.sum([m.class_counts for m in metas], axis=0).tolist(),
                  "order": metas[0].order, "options": metas[0].options,
                  "skipped": sum(m.skipped for m in metas)}
        manifest = mf.write_manifest(layout.folders[0], layout.split, split_id, totals, shards)
    return rows, report_rows([d for _, d in skipped]), manifest
