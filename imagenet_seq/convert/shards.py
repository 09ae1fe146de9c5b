"""Where a split's records go: one file, or K shards over one or more folders.

The split's plan positions are cut into K contiguous ranges (``manifest.shard_ranges``); shard
``j`` gets the records of the positions in range ``j`` (a skipped image leaves its shard one
record short), in order, so the shards one after the other hold the one-file conversion's
records. K = 1 is today's ``ILSVRC-<split>.lmdb`` (no manifest); K > 1 writes
``ILSVRC-<split>-JJJJJ-of-KKKKK.lmdb`` round-robin over ``[output folder] + --shard-dirs`` and
``ILSVRC-<split>.manifest.json`` last (``format/manifest.py``).

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

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf
from imagenet_seq.format import offsets
from imagenet_seq.convert.passes import ConversionError

__all__ = ["check_dirs", "Layout", "split_files", "foreign_error", "remove_files", "skips", "ShardSink",
           "seal", "finish_split"]


def check_dirs(out_dir: str, shard_dirs: Sequence[str]) -> Optional[str]:
    """Why ``--shard-dirs`` cannot be used as given, or None: each folder must exist (one per
    disk: a missing one is often an unmounted disk, so it is never created) and be named
    once, apart from the output folder."""
    seen = {os.path.realpath(out_dir): "the output folder"}
    for d in shard_dirs:
        if not d:
            return "--shard-dirs holds an empty name; pass folders separated by commas"
        if not os.path.exists(d):
            return (f"--shard-dirs: {d} does not exist; create it (`mkdir -p {d}` on the disk "
                    "it should use: a missing folder is often a disk not mounted) or leave it "
                    "out")
        if not os.path.isdir(d):
            return f"--shard-dirs: {d} is a file, not a folder; pass a folder on the disk to use"
        real = os.path.realpath(d)
        if real in seen:
            return (f"--shard-dirs: {d} is {seen[real]} already; name each folder once (the "
                    "output folder always gets shards)")
        seen[real] = f"named before in --shard-dirs"
    return None


@dataclass(frozen=True)
class Layout:
    """The files of one split's conversion: ``count`` shards over ``folders`` (the output
    folder first), shard ``j`` holding plan positions ``ranges[j]``."""

    split: str
    count: int
    folders: Tuple[str, ...]
    ranges: Tuple[Tuple[int, int], ...]

    @classmethod
    def make(cls, split: str, count: int, out_dir: str, shard_dirs: Sequence[str],
             images: int) -> "Layout":
        folders = (out_dir,) + tuple(shard_dirs) if count > 1 else (out_dir,)
        return cls(split, count, folders, tuple(mf.shard_ranges(images, count)))

    def name(self, j: int) -> str:
        return fmt.split_filename(self.split) if self.count == 1 else \
            mf.shard_filename(self.split, j, self.count)

    def folder(self, j: int) -> str:
        return self.folders[j % len(self.folders)]

    def final(self, j: int) -> str:
        return os.path.join(self.folder(j), self.name(j))

    def partial(self, j: int) -> str:
        return self.final(j) + ".partial"

    def end(self, j: int) -> int:
        """The plan position after shard ``j``'s range."""
        first, n = self.ranges[j]
        return first + n

    @property
    def manifest(self) -> Optional[str]:
        return None if self.count == 1 else \
            os.path.join(self.folders[0], mf.manifest_filename(self.split))

    @property
    def used_folders(self) -> List[str]:
        """The folders that get a shard, as the progress record keeps them (the output folder
        as ``"."``: it may be moved as a whole)."""
        n = min(self.count, len(self.folders))
        return ["."] + [os.path.realpath(f) for f in self.folders[1:n]]

    def describe(self) -> str:
        if self.count == 1:
            return f"one file {self.name(0)}"
        n = min(self.count, len(self.folders))
        return (f"{self.count} shards {self.name(0).replace('00000-of', 'JJJJJ-of')}"
                + (f" over {n} folders" if n > 1 else "") + " + manifest")

    def own(self, run_dir: str) -> set:
        """Paths this layout writes (finished or not)."""
        out = {run_dir}
        for j in range(self.count):
            for p in (self.final(j), self.partial(j)):
                out.update((p, p + "-lock"))
        if self.manifest:
            out.update((self.manifest, self.manifest + ".tmp"))
        return {os.path.realpath(p) for p in out}


def _pattern(split: str):
    return re.compile(rf"^ILSVRC-{re.escape(split)}(\.lmdb|-\d{{5}}-of-\d{{5}}\.lmdb|"
                      r"\.manifest\.json)(\.partial(\.runs(-[0-9a-f]{8})?)?|\.tmp)?(-lock)?$")


def split_files(layout: Layout) -> List[str]:
    """Every file of this split in the layout's folders (any shard count, finished or not),
    and the shards an existing manifest names elsewhere."""
    pat = _pattern(layout.split)
    found: Dict[str, None] = {}
    for folder in layout.folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for n in names:
            if pat.match(n):
                found[os.path.join(folder, n)] = None
    man = os.path.join(layout.folders[0], mf.manifest_filename(layout.split))
    if os.path.isfile(man):
        try:
            doc = mf.read_manifest(man)
            for row in doc["shards"]:
                folder = layout.folders[0] if row["folder"] == "." else row["folder"]
                path = os.path.join(folder, row["name"])
                if os.path.exists(path):
                    found[path] = None
        except (fmt.DamagedFile, ValueError, OSError):
            pass  # a damaged manifest names nothing: the pattern found what is here
    return list(found)


def foreign_error(layout: Layout, foreign: List[str]) -> str:
    """Files of another layout of the same split: named, with the two ways out."""
    names = [os.path.basename(p) for p in foreign]
    counts = sorted({int(m.group(1)) for n in names
                     for m in [re.search(r"-of-(\d{5})\.lmdb", n)] if m})
    one = any(re.match(rf"^ILSVRC-{re.escape(layout.split)}\.lmdb(\.partial)?$", n)
              for n in names)
    kinds = []
    if one:
        kinds.append(f"a one-file {layout.split} split ({fmt.split_filename(layout.split)})")
    if counts or any(n.endswith(".manifest.json") for n in names):
        kinds.append(f"a sharded {layout.split} split"
                     + (f" of {', '.join(map(str, counts))} shards" if counts else ""))
    hints = []
    if one:
        hints.append("without --shards/--shard-gb")
    for k in counts:
        hints.append(f"--shards {k} (and the --shard-dirs it was written with)")
    shown = ", ".join(foreign[:6]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 6 else "")
    return (f"{' and '.join(kinds) or 'files of the ' + layout.split + ' split'} already "
            f"lie(s) where this run writes {layout.describe()} ({shown}): two {layout.split} "
            "splits side by side leave readers to guess which is meant. Pass --overwrite to "
            "replace it (the files named are deleted)"
            + (f", or run with {' or '.join(hints)} to keep or --resume it" if hints else "")
            + ", or pass another output folder")


def remove_files(paths: Sequence[str]) -> None:
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)


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
    import warnings

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

    def __init__(self, layout: Layout, env, ino: int, state: dict,
                 plan: Sequence[Tuple[str, int]], classes: List[str], options: dict):
        self.layout, self.env, self.ino, self.state = layout, env, ino, state
        self.plan, self.classes, self.options = plan, classes, options
        self._next: Optional[tuple] = None

    @property
    def index(self) -> int:
        return self.state["shard"]["index"]

    @property
    def end(self) -> int:
        """Plan positions from here on belong to later shards."""
        return self.layout.end(self.index)

    @property
    def last(self) -> bool:
        return self.index == self.layout.count - 1

    def local(self, written: int) -> int:
        """The shard's own record number of the split's record ``written``."""
        return written - self.state["shard"]["first"]

    def hand_over(self, txn) -> None:
        """Make the next shard's ``.partial`` hold the progress from here on and the skip
        records of its positions and later ones; committed and fsync'd before this shard's
        final transaction (``txn``, still open) deletes its own progress."""
        j = self.index + 1
        path = self.layout.partial(j)
        _remove(path)  # made by a run killed before this shard's end: made again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        env = fmt.open_env(path, readonly=False, lock=False)
        try:
            nxt = {"index": j, "first": self.state["written"], "bytes": 0}
            with env.begin(write=True) as t2:
                for key, d in skips(txn):
                    if d["pos"] >= self.end:
                        t2.put(key, json.dumps(d).encode())
                t2.put(fmt.PROGRESS_KEY, json.dumps(dict(self.state, shard=nxt)).encode())
            env.sync(True)
            self._next = (env, os.stat(path).st_ino, nxt)
        except BaseException:
            env.close()
            raise

    def finish(self, txn) -> None:
        """This shard's final records, in its last transaction: labels, metadata (with the
        ``"shard"`` key when there are several), its own skip records kept, the progress and
        the skip records handed on deleted."""
        first_pos, end = self.layout.ranges[self.index][0], self.end
        mine = set()
        for key, d in skips(txn):
            if d["pos"] >= end:
                txn.delete(key)  # the next shard holds it (hand_over)
            else:
                mine.add(d["pos"])
        labels = np.array([self.plan[p][1] for p in range(first_pos, end) if p not in mine],
                          dtype="<i4")
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
            options=self.options, skipped=len(mine))
        raw = meta.to_json()
        if not one:
            doc = json.loads(raw)
            doc["shard"] = {"index": self.index, "count": self.layout.count,
                            "first": self.state["shard"]["first"],
                            "split_id": self.state["split_id"]}
            raw = json.dumps(doc, sort_keys=True).encode()
        txn.put(fmt.LABELS_KEY, labels.tobytes())
        txn.delete(fmt.PROGRESS_KEY)
        txn.put(fmt.META_KEY, raw)  # metadata last

    def seal(self) -> None:
        """After :meth:`finish` committed: index, fsync, rename; the next shard is current."""
        env, self.env = self.env, None
        seal(env, self.layout.partial(self.index), self.ino, self.local(self.state["written"]))
        if self._next is not None:
            self.env, self.ino, self.state["shard"] = self._next
            self._next = None

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


def finish_split(layout: Layout, split_id: Optional[str], write: bool = True
                 ) -> Tuple[List[dict], List[Tuple[str, str]], Optional[str]]:
    """Every shard finished: the manifest written (K > 1, ``write``) from the shards' own
    metadata, each shard checked to be this conversion's.
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
            meta, key, checksum, sk = _read_shard(path)
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
    return rows, [(d["path"], d["reason"]) for _, d in skipped], manifest
