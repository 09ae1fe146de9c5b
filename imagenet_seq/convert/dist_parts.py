"""A split's sources cut into one part per process of a distributed conversion.

Parts are contiguous and balanced by bytes: a folder tree's class folders (sorted names; a flat
folder's files) or WebDataset shards (in the order given), cut where the running byte count
passes ``total * (r + 1) / world``. Every process computes the same cut from the same scan.
Part ``r``'s records carry sequence numbers after those of parts ``0 .. r - 1``
(:data:`SEQ_STRIDE`), so the merge meets two copies of one name in the order the
one-process sweep meets them, and the output does not depend on the number of processes.

One archive (a tar of a tree, ImageNet's tarballs) cannot be cut into whole parts without
reading it: refused, naming the ways out.
"""
from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from imagenet_seq.convert.passes import ConversionError
from imagenet_seq.convert.scan import Scan
from imagenet_seq.convert.source_reader import FolderSource
from imagenet_seq.convert.sweep import FolderSweep
from imagenet_seq.convert.wds_sweep import WdsSweep

__all__ = ["SEQ_STRIDE", "Part", "partition"]

SEQ_STRIDE = 1 << 40  # sequence numbers per part (a part's sweep counts from 0)


@dataclass
class Part:
    """What process ``index`` reads: ``sweep`` (``sweep``'s contract; None for another rank's
    folder part, whose read order this rank does not need), ``what`` it is, ``identity``
    (what every rank must agree on: its files and labels)."""
    index: int
    sweep: object
    what: str
    bytes: int
    identity: str

    @property
    def seq_base(self) -> int:
        return self.index * SEQ_STRIDE


def cut(sizes: Sequence[int], world: int) -> List[Tuple[int, int]]:
    """``world`` contiguous ranges of ``sizes``' indices, balanced by their sum: item ``i``
    goes to the rank its middle byte falls in (a range may be empty when there are fewer
    items than processes)."""
    total = max(1, sum(sizes))
    owner, run = [], 0
    for n in sizes:
        owner.append(min(world - 1, (2 * run + n) * world // (2 * total)))
        run += n
    return [(bisect.bisect_left(owner, r), bisect.bisect_right(owner, r)) if r in owner else
            (bisect.bisect_left(owner, r),) * 2 for r in range(world)]


def _group(rel: str) -> str:
    return rel.split("/", 1)[0]


def _folder_parts(scan: Scan, split_dir: str, world: int, read_order: str,
                  rank: int) -> List[Part]:
    groups: Dict[str, List[Tuple[str, int]]] = {}
    for rel, label in scan.entries:
        groups.setdefault(_group(rel), []).append((rel, label))
    names = sorted(groups)
    sizes = [sum(scan.inode_size(rel)[1] for rel, _ in groups[g]) for g in names]
    source = FolderSource(split_dir)
    parts = []
    for r, (lo, hi) in enumerate(cut(sizes, world)):
        entries = [e for g in names[lo:hi] for e in groups[g]]
        sweep = None
        if r == rank:  # the read order (FIEMAP or inodes) of this rank's own files only
            rels = [rel for rel, _ in entries]
            order, how = source.order(rels, [scan.inode_size(x)[0] for x in rels],
                                      read_order) if rels else ([], "-")
            sweep = FolderSweep(source, entries, list(order), how)
        what = (f"folders {names[lo]} .. {names[hi - 1]} ({hi - lo})" if hi > lo else
                "nothing (fewer folders than processes)")
        ident = hashlib.sha1()
        for rel, label in entries:
            ident.update(f"{rel}\t{label}\n".encode("utf-8", "surrogateescape"))
        parts.append(Part(r, sweep, what, sum(sizes[lo:hi]), ident.hexdigest()))
    return parts


def _wds_parts(sweep: WdsSweep, world: int) -> List[Part]:
    sizes = [os.path.getsize(p) for p in sweep.shards]
    parts = []
    for r, (lo, hi) in enumerate(cut(sizes, world)):
        what = (f"shards {os.path.basename(sweep.shards[lo])} .. "
                f"{os.path.basename(sweep.shards[hi - 1])} ({hi - lo})" if hi > lo else
                "nothing (fewer shards than processes)")
        got = sweep.part(lo, hi)
        parts.append(Part(r, got, what, sum(sizes[lo:hi]), got.identity()))
    return parts


def partition(scan: Scan, split: str, split_dir: str, world: int, read_order: str,
              rank: int) -> List[Part]:
    """One :class:`Part` per rank (the same on every rank; only ``rank``'s folder part gets
    its sweep).

    Raises:
        ConversionError: the sources are one archive (it cannot be cut into whole parts).
    """
    stream = getattr(scan, "sweep", None)
    if stream is None:
        return _folder_parts(scan, split_dir, world, read_order, rank)
    if isinstance(stream, WdsSweep):
        return _wds_parts(stream, world)
    raise ConversionError(
        f"{stream.describe('')} is one archive: it cannot be divided between {world} "
        f"processes without reading it first. Convert {split} with one process (without "
        "torchrun), or extract it into a folder tree (train/<class>/<image>), or use "
        "WebDataset shards of it; those are divided by class folder or by shard")
