"""Where a split's records go: one file, or K shards over one or more folders.

The split's plan positions are cut into K contiguous ranges (``manifest.shard_ranges``); shard
``j`` gets the records of the positions in range ``j`` (a skipped image leaves its shard one
record short), in order, so the shards one after the other hold the one-file conversion's
records. K = 1 is today's ``ILSVRC-<split>.lmdb`` (no manifest); K > 1 writes
``ILSVRC-<split>-JJJJJ-of-KKKKK.lmdb`` round-robin over ``[output folder] + --shard-dirs`` and
``ILSVRC-<split>.manifest.json`` last (``format/manifest.py``).

This module says which files a layout has and what of a split already lies in its folders
(:func:`split_files`: another layout's files are refused or, with --overwrite, deleted);
``shard_sink`` writes them.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf

__all__ = ["check_dirs", "Layout", "split_files", "foreign_error", "remove_files"]


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
    what = " and ".join(kinds) or f"files of another {layout.split} conversion"
    return (f"{what} is already there ({shown}), and this run writes {layout.describe()}: "
            f"two {layout.split} splits side by side would leave readers to guess which is "
            "meant. Pass --overwrite to replace it (its files, in every folder, are deleted)"
            + (f", or run with {' or '.join(hints)} to keep or --resume it" if hints else "")
            + ", or pass another output folder")


def remove_files(paths: Sequence[str]) -> None:
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)
