"""A split made ready for its passes: its layout (one file or K shards), its .partial and
progress record (fresh, or resumed where an interrupted run stopped: ``resume``), its sweep,
the space checked; or found complete already. ``writer`` then runs the passes.

A tar of a tree feeds all its splits from one sweep: :func:`prepare_siblings` makes the other
splits ready too, before anything is read, so that each one's checks (a complete split, a
locked or damaged .partial, space) come first.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional, Union

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf
from imagenet_seq.convert import shards as sh
from imagenet_seq.convert.options import Options, Result
from imagenet_seq.convert.passes import ConversionError, prepare_runs
from imagenet_seq.convert.resume import existing, fresh_state, open_partial, resume_point
from imagenet_seq.convert.scan import Scan
from imagenet_seq.convert.shard_sink import finish_split
from imagenet_seq.convert.source_reader import FolderSource
from imagenet_seq.convert.space import outputs, shard_estimates, space_check
from imagenet_seq.convert.sweep import FolderSweep
from imagenet_seq.convert.write_order import ORDER_VERSION
from imagenet_seq.format.lmdbdir import in_place_of_output
from imagenet_seq.format.lmdbfile import DamagedFile

__all__ = ["Prepared", "fingerprint", "prepare", "prepare_siblings"]


def fingerprint(identity: str, classes: Optional[List[str]], opts: Options) -> str:
    """Of what the .partial is a conversion of: the sources (``sweep.identity()``: a folder's
    files and read order; archives' paths, sizes and modification times), the classes where
    known before the sweep, the options and the order's version."""
    return hashlib.sha1(json.dumps([classes, opts.content(), ORDER_VERSION, identity]
                                   ).encode()).hexdigest()


def _complete(layout: sh.Layout, res: Result, shard_dirs) -> Result:
    """``--resume`` over a finished split: keep it, and report what it skipped."""
    root = layout.final(0) if layout.count == 1 else layout.folders[0]
    try:
        split = mf.open_split(root, layout.split, shard_dirs)
        layout = sh.Layout(layout.split, len(split.shards), tuple(
            os.path.dirname(p) for p in split.paths), layout.ranges)  # where they are now
        rows, res.skipped, _ = finish_split(layout, split.totals.get("split_id"), False)
    except (DamagedFile, ValueError, OSError, ConversionError) as e:
        raise ConversionError(f"{e} (found by --resume, which keeps finished files; pass "
                              "--overwrite to convert it again)") from None
    res.already_complete = True
    res.shards, res.manifest = rows, split.manifest
    res.written, res.bytes = split.num_records, sum(r["bytes"] for r in rows)
    return res


def _shard_count(opts: Options, images: Optional[int], src_bytes: int, split: str) -> int:
    """K: ``--shards``, or from ``--shard-gb`` and the sources' bytes. ``images``: the count
    where known before the sweep (a folder), else None (an archive: checked after it)."""
    top = max(1, images) if images is not None else None
    if opts.shards is not None:
        if top is not None and not 1 <= opts.shards <= top:
            raise ConversionError(
                f"--shards {opts.shards} for the {images} images of {split}; expected 1 to "
                f"{top} (a shard holds at least one image's place): pass fewer, "
                "or convert this split on its own (--splits) with fewer")
        return opts.shards
    if opts.shard_gb is not None:
        try:
            k = mf.shard_count(src_bytes, opts.shard_gb)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        return max(1, min(k, top) if top is not None else k)
    return 1


def _folder_sweep(scan: Scan, split_dir: str, opts: Options):
    source = FolderSource(split_dir)
    rels = [rel for rel, _ in scan.entries]
    order, how = source.order(rels, [scan.inode_size(r)[0] for r in rels], opts.read_order)
    return FolderSweep(source, scan.entries, list(order), how)


@dataclass
class Prepared:
    """A split ready for its passes (:func:`prepare`)."""
    split: str
    layout: sh.Layout
    run_dir: str
    res: Result
    sweep: object
    stream: Optional[object]
    images: Optional[int]
    src_bytes: int
    known: Optional[List[str]]
    j: int = 0
    env: object = None
    ino: Optional[int] = None
    state: Optional[dict] = None


def prepare(src_root: str, out_dir: str, split: str, scan: Scan, opts: Options,
            overwrite: bool, resume: bool, notice) -> Union[Prepared, Result]:
    """The split's layout, .partial and progress record (fresh or resumed), space checked:
    a :class:`Prepared`, or the Result of a split found complete."""
    stream = getattr(scan, "sweep", None)  # an archive read in one sweep (tar_sweep)
    if stream is None and len(scan.entries) >= fmt.MAX_RECORDS:
        raise ConversionError(f"{len(scan.entries)} images in {split}; the format holds at most "
                              f"{fmt.MAX_RECORDS - 1}")
    split_dir = os.path.join(src_root, split)
    if stream is None:
        src_bytes = sum(scan.inode_size(r)[1] for r, _ in scan.entries)
        images = len(scan.entries)
    else:
        src_bytes, images = stream.source_bytes, None
    count = _shard_count(opts, images, src_bytes, split)
    layout = sh.Layout.make(split, count, out_dir, opts.shard_dirs, max(images or 0, count))
    for j in range(layout.count):
        for path in (layout.final(j), layout.partial(j)):
            if os.path.isdir(path):
                raise ConversionError(in_place_of_output(path))
    partial0 = layout.partial(0)
    run_dir = os.path.join(os.path.abspath(opts.tmp or out_dir), os.path.basename(partial0)
                           + ".runs")
    if opts.tmp is not None:  # a shared scratch folder: one run folder per output file
        run_dir += "-" + hashlib.sha1(os.path.abspath(partial0).encode()).hexdigest()[:8]
    res = Result(split, layout.final(0) if layout.count == 1 else layout.manifest)
    if existing(layout, run_dir, overwrite, resume):
        return _complete(layout, res, opts.shard_dirs)

    sweep = stream if stream is not None else _folder_sweep(scan, split_dir, opts)
    res.read_order = sweep.how
    known = scan.classes if stream is None else None
    fp = fingerprint(sweep.identity(), known, opts)
    os.makedirs(out_dir, exist_ok=True)
    if opts.tmp is not None and not os.path.isdir(opts.tmp):
        raise ConversionError(f"--tmp {opts.tmp} is not a folder; create it or pass another")
    o = Prepared(split, layout, run_dir, res, sweep, stream, images, src_bytes, known)
    if resume:
        o.j, o.env, o.ino, o.state = resume_point(layout, known, opts.content(), fp, run_dir)
    if o.j == layout.count:  # every shard finished, killed before the manifest
        rows, res.skipped, res.manifest = finish_split(layout, None)
        shutil.rmtree(run_dir, ignore_errors=True)
        res.shards = rows
        res.written = res.resumed_at = sum(r["records"] for r in rows)
        res.bytes = sum(r["bytes"] for r in rows)
        return res
    try:
        if o.env is None:
            o.env = open_partial(partial0, f"It is an unfinished conversion: delete {partial0} "
                                 "and convert again (or pass --overwrite instead of --resume)",
                                 readonly=False, lock=False)
            o.ino = os.stat(partial0).st_ino
        if o.state is None:
            o.state = fresh_state(fp, layout, run_dir)
        state = o.state
        res.resumed_at = state["written"] if state["phase"] == "merge" else \
            state["sweep"]["seq"]
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        per = shard_estimates(src_bytes, images, layout.count)
        space_check(src_bytes, sum(per), state, run_dir, outputs(layout, per, state, o.j),
                    split, images if images is not None else 0, opts.memory, opts.workers,
                    notice)
        prepare_runs(run_dir, state, layout.partial(o.j))
    except BaseException:
        if o.env is not None:
            o.env.close()
        raise
    return o


def prepare_siblings(o: Prepared, src_root: str, out_dir: str, opts: Options, overwrite: bool,
                     resume: bool, notice) -> List[Prepared]:
    """The other splits one sweep of the same archive feeds at once (a tar of a tree): each
    opened now (its checks, before anything is read), unless complete or past pass 1."""
    shared = getattr(o.stream, "shared", None)
    out = []
    if shared is None:
        return out
    try:
        for s in shared.splits:
            if s == o.split or s in shared.swept:
                continue
            got = prepare(src_root, out_dir, s, Scan([], [], [], sweep=shared.view(s)), opts,
                          overwrite, resume, notice)
            if isinstance(got, Result):
                continue
            if got.state["phase"] != "read" or got.state["sweep"].get("end"):
                got.env.close()
                continue
            out.append(got)
    except BaseException:
        for g in out:
            g.env.close()
        raise
    return out
