"""Convert one split in two passes: one sweep over the sources into sorted runs, merged into
the LMDB.

The data path: ONE sweep reads the sources (a folder's files in the order they lie on the disk,
``disk_order``; an archive front to back, no listing first: ``tar_sweep``, ``tree_tar_sweep``,
``wds_sweep``) → N worker processes validate + normalise (``workers``) → pass 1
(``pass1``): the records, tagged with their sort key (``write_order.sort_key``: train a seeded
hash of each relative path, val the path) and their sequence number in the sweep, fill a run
buffer that is sorted and written as one sequential temporary file when full (``sort_runs``)
→ pass 2 (``passes.merge_pass``): the runs are merged by key and appended, in write order, to
``ILSVRC-<split>.lmdb.partial``, renamed to ``ILSVRC-<split>.lmdb`` at the end; what only the
sweep's end tells (a tar's classes, a name met again, a replaced nested tar) is settled there
(``settle``). The output is the same whatever the input form (folder, tar, ImageNet's tar of
tars). A tar of a tree feeds all its splits from one sweep (each split its own runs and
.partial). With ``Options.shards`` / ``shard_gb`` the merge writes K shard files instead, one
after the other, over the output folder and ``Options.shard_dirs``, cut over the records
counted after pass 1, and the manifest last (``shards.py``); one file is the case K = 1.

Crash safety: ``__progress__`` in the .partial (shard 0's in pass 1, the shard being written in
pass 2: ``shards.py``) says where the conversion stands, committed in the same transaction as
what it describes. Pass 1: the sweep's cursor (the first item not yet in a run on disk: an
index in a folder's read order, the byte offset of an archive member's header), the finished
runs (name, records, bytes; each fsync'd before it is listed), skip records. Pass 2: the byte
offset reached in each run and the records written. ``resume=True`` deletes runs that no
commit lists, sweeps again from the cursor and ends with the records of a clean run. The
.partial's fingerprint covers the sources' identity (a folder's files and read order; the
archives' paths, sizes and modification times) and the options. One conversion at a time per
output folder: the folder's lock (``format.convlock``), and each shard folder's, is held
throughout, and each .partial is checked to be the file this conversion opened before it is
renamed, so no conversion reports success over a file it did not write.

Memory (``Options.memory``, default 2 GB): pass 1 holds one run buffer (per split fed by the
sweep, sharing the budget) and pass 2 the runs' read buffers, each ``memory -
fixed_bytes(workers)``; fixed: one uncommitted transaction (``COMMIT_BYTES``), the reader's
queue (32 MiB) and the chunks in flight to the workers (``workers * 8`` chunks of <= 1 MiB);
a folder's scan (``PER_IMAGE_BYTES``) grows with it, an archive has no per-image list; the
merge holds the labels of the shard being written (``PER_RECORD_BYTES`` each).
Temporary space: about the split's source bytes, in ``Options.tmp`` (default: the output
folder), checked against free space before the run (with each output folder's share of the
shards) and deleted at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import lmdb

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf
from imagenet_seq.convert.passes import (DEFAULT_MEMORY, MAX_RUNS,  # noqa: F401
                             ConversionError, merge_pass, prepare_runs)
from imagenet_seq.convert.pass1 import Split, read_pass
from imagenet_seq.convert import shards as sh
from imagenet_seq.convert.resume import existing, fresh_state, open_partial, resume_point
from imagenet_seq.convert.shard_sink import ShardSink, finish_split, skips
from imagenet_seq.convert.settle import decider, settle_skips
from imagenet_seq.convert.sort_runs import HEAD as RUN_HEAD
from imagenet_seq.convert.space import outputs, space_check
from imagenet_seq.convert.sweep import FolderSweep
from imagenet_seq.format.convlock import Busy, ConversionLock
from imagenet_seq.format.lmdbdir import in_place_of_output
from imagenet_seq.format.lmdbfile import DamagedFile
from imagenet_seq.convert.scan import Scan, ScanError
from imagenet_seq.convert.source_reader import FolderSource
from imagenet_seq.convert.write_order import ORDER_VERSION, sort_key, write_order

__all__ = ["Options", "Result", "plan_order", "fingerprint", "convert_split"]


@dataclass
class Options:
    seed: int = 0
    max_size: Optional[int] = None
    quality: int = 95
    workers: int = 0
    strict: bool = False
    memory: int = DEFAULT_MEMORY  # bytes: the buffers' bound (module docstring)
    tmp: Optional[str] = None  # folder for the sorted runs (default: the output folder)
    read_order: str = "auto"  # disk_order method: auto (FIEMAP, else inode), inode, name
    read_ahead: Optional[int] = None  # files in the read-ahead window (None: source_reader's default)
    shards: Optional[int] = None  # K shard files (None: from shard_gb, else one file)
    shard_gb: Optional[float] = None  # K = manifest.shard_count(estimated bytes, shard_gb)
    shard_dirs: Tuple[str, ...] = ()  # folders beside the output folder, shards round-robin

    def content(self) -> dict:
        """Options that change what is written (workers do not)."""
        return {"seed": self.seed, "max_size": self.max_size, "quality": self.quality}


@dataclass
class Result:
    split: str
    path: str
    written: int = 0
    converted: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    resumed_at: int = 0
    already_complete: bool = False
    report: Optional[str] = None  # the skipped-files report the CLI wrote
    read_order: str = "-"  # how the source was ordered (disk_order): fiemap, inode, name
    runs: int = 0
    tmp_bytes: int = 0  # temporary bytes written (the runs)
    read_s: float = 0.0  # wall seconds of pass 1 (read, validate, write the runs)
    merge_s: float = 0.0  # wall seconds of pass 2 (merge into the LMDB, offsets index)
    read_cpu_s: float = 0.0  # CPU seconds of this process (all its threads) in pass 1
    merge_cpu_s: float = 0.0  # and in pass 2 (workers not included)
    shards: List[dict] = field(default_factory=list)  # index, path, folder, records, bytes, ..
    manifest: Optional[str] = None  # the manifest's path (None: one file)


def plan_order(scan: Scan, split: str, seed: int) -> List[Tuple[str, int]]:
    """Write order (``write_order``): train = sorted by a seeded hash of each relative path,
    val = sorted paths."""
    return write_order(scan.entries, split, seed)


def fingerprint(identity: str, classes: Optional[List[str]], opts: Options) -> str:
    """Of what the .partial is a conversion of: the sources (``sweep.identity()``: a folder's
    files and read order; archives' paths, sizes and modification times), the classes where
    known before the sweep, the options and the order's version."""
    return hashlib.sha1(json.dumps([classes, opts.content(), ORDER_VERSION, identity]
                                   ).encode()).hexdigest()


def _committed_skips(env):
    """The skip records of an open environment, in the order they were met."""
    with env.begin() as txn:
        return [d for _, d in skips(txn)]


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


def convert_split(src_root: str, out_dir: str, split: str, scan: Scan, opts: Options,
                  overwrite: bool = False, resume: bool = False,
                  progress: Optional[Callable[[int, int, int], None]] = None,
                  start_progress: Optional[Callable[[int, int, str], None]] = None,
                  notice: Optional[Callable[[str], None]] = None) -> Result:
    """Write ``out_dir/ILSVRC-<split>.lmdb`` from ``scan`` (or, with ``opts.shards`` /
    ``opts.shard_gb`` giving K > 1, K shard files over ``out_dir`` and ``opts.shard_dirs`` and
    ``out_dir/ILSVRC-<split>.manifest.json``).

    ``progress(n_done_delta, bytes_delta, skipped_total)`` is called as records land;
    ``start_progress(total, initial, pass_name)`` before each pass ('read', 'merge');
    ``notice(text)`` with the statement of sizes and free space before the run.

    The conversion lock (``format.convlock``) of the output folder and of each shard folder is
    held throughout (the CLI already holds the output folder's for the whole run); another
    live conversion into one of them is a ConversionError naming its PID, before anything is
    written.
    """
    final = os.path.join(out_dir, fmt.split_filename(split))
    for path in (final, final + ".partial"):
        if os.path.isdir(path):
            raise ConversionError(in_place_of_output(path))
    why = sh.check_dirs(out_dir, opts.shard_dirs)
    if why is not None:
        raise ConversionError(why)
    locks = []
    try:
        for folder in (out_dir,) + tuple(opts.shard_dirs):
            locks.append(ConversionLock(folder))
            locks[-1].acquire()
        return _convert(src_root, out_dir, split, scan, opts, overwrite, resume, progress,
                        start_progress, notice)
    except Busy as e:
        raise ConversionError(str(e)) from None
    finally:
        for lock in reversed(locks):
            lock.release()


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


def _folder_keys(scan: Scan, split: str, seed: int):
    """A folder's sort keys: its place in ``plan_order`` (the same order ``sort_key`` gives;
    a plan that is a list can be replaced whole, as tests of older files do) + the path."""
    place = {rel: i for i, (rel, _) in enumerate(plan_order(scan, split, seed))}

    def key_of(part, rel):
        return place[rel].to_bytes(8, "big") + rel.encode("utf-8", "surrogateescape")
    return key_of


def _folder_sweep(scan: Scan, split_dir: str, opts: Options):
    source = scan.source or FolderSource(split_dir)
    rels = [rel for rel, _ in scan.entries]
    order, how = source.order(rels, [scan.inode_size(r)[0] for r in rels], opts.read_order)
    return FolderSweep(source, scan.entries, list(order), how)


@dataclass
class _Opened:
    """A split ready for its passes (``_open``)."""
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


def _open(src_root, out_dir, split, scan, opts, overwrite, resume, notice):
    """The split's layout, .partial and progress record (fresh or resumed), space checked:
    an :class:`_Opened`, or the Result of a split found complete."""
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
    o = _Opened(split, layout, run_dir, res, sweep, stream, images, src_bytes, known)
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
        n_est = images if images is not None else max(1, src_bytes // 100_000)
        per = [src_bytes * n // max(1, n_est) + n * (RUN_HEAD.size + fmt.RECORD_HEADER.size)
               for _, n in mf.shard_ranges(n_est, layout.count)]
        space_check(src_bytes, sum(per), state, run_dir, outputs(layout, per, state, o.j),
                    split, images if images is not None else 0, opts.memory, opts.workers,
                    notice)
        prepare_runs(run_dir, state, layout.partial(o.j))
    except BaseException:
        if o.env is not None:
            o.env.close()
        raise
    return o


def _unfinished(layout: sh.Layout, run_dir: str) -> List[str]:
    p = layout.partial(0)
    return [p, p + "-lock", run_dir]


def _siblings(o: _Opened, src_root, out_dir, opts, overwrite, resume, notice):
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
            got = _open(src_root, out_dir, s, Scan([], [], [], sweep=shared.view(s)), opts,
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


def _convert(src_root, out_dir, split, scan, opts, overwrite, resume, progress,
             start_progress, notice) -> Result:
    shared = getattr(getattr(scan, "sweep", None), "shared", None)
    if shared is not None and split in shared.swept:  # pass 1 done by a sibling's sweep
        overwrite, resume = False, True
    o = _open(src_root, out_dir, split, scan, opts, overwrite, resume, notice)
    if isinstance(o, Result):
        return o
    layout, run_dir, res, state, stream = o.layout, o.run_dir, o.res, o.state, o.stream
    env, ino, images, known = o.env, o.ino, o.images, o.known
    sink = None
    try:
        t0 = time.perf_counter()
        if state["phase"] == "read":
            t1, c1 = time.perf_counter(), time.process_time()
            if not state["sweep"].get("end"):
                joint = _siblings(o, src_root, out_dir, opts, overwrite, resume, notice)
                try:
                    parts = {split: Split(env, state, run_dir, res)}
                    for g in joint:
                        parts[g.split] = Split(g.env, g.state, g.run_dir, g.res)
                    if joint or shared is not None:
                        o.sweep.joint = list(parts)
                    else:
                        parts = {None: parts[split]}

                    key_of = _folder_keys(scan, split, opts.seed) if stream is None else \
                        (lambda part, rel, seed=opts.seed: sort_key(rel, part.split, seed))
                    for name, part in parts.items():
                        part.split = name or split
                    read_pass(parts, o.sweep, opts, progress, start_progress, key_of)
                    for g in joint:
                        shared.swept.add(g.split)
                        shared.files[g.split] = _unfinished(g.layout, g.run_dir)
                finally:
                    for g in joint:
                        g.env.close()
            res.read_s, res.read_cpu_s = time.perf_counter() - t1, time.process_time() - c1
            # the sweep is over: what only its end tells is settled, once, and committed
            try:
                state["classes"] = known if stream is None else \
                    stream.classes(state["found"])
            except ScanError:  # the inputs need a fix (a flag, a folder): nothing is kept
                env.close()
                env = None
                sh.remove_files(_unfinished(layout, run_dir) + [
                    p for s in getattr(shared, "files", {}).values() for p in s])
                raise
            state["phase"] = "merge"
            settle_skips(env, state.get("found", {}), state)  # commits the state too
        if len(state["runs"]) > MAX_RUNS:
            raise ConversionError(f"{len(state['runs'])} runs for {split}, more than {MAX_RUNS}"
                                  " can be merged at once; pass a larger --memory-mb")
        classes = state["classes"]
        total = sum(r[1] for r in state["runs"])
        if total < layout.count and layout.count > 1:
            raise ConversionError(
                f"--shards {layout.count} for the {total} images of {split}; a shard holds at "
                "least one image's place: pass --overwrite and fewer shards")
        layout = dataclasses.replace(layout, ranges=tuple(mf.shard_ranges(total, layout.count)))
        decide = decider(classes, state.get("found", {}), state.get("skip_last", {}),
                         stream.resolver(state["found"]) if stream is not None else None,
                         getattr(stream, "repeat", None))
        sink, env = ShardSink(layout, env, ino, state, classes, opts.content()), None
        t1, c1 = time.perf_counter(), time.process_time()
        # into the shards one after the other, each indexed (offsets.py), fsync'd, renamed
        try:
            merge_pass(sink, state, run_dir, opts, progress, start_progress,
                       images if images is not None else 0, decide,
                       max(n for _, n in layout.ranges))
        except (OSError, lmdb.Error) as e:  # a full or failing disk: say which (cli.py)
            e.folder = sink.writing
            raise
        res.merge_s, res.merge_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    finally:
        if env is not None:
            env.close()
        if sink is not None:
            sink.close()
    res.shards, res.skipped, res.manifest = finish_split(layout, state["split_id"],
                                                         finished=sink.finished)
    res.runs = len(state["runs"])
    res.tmp_bytes = sum(r[2] for r in state["runs"])
    shutil.rmtree(run_dir, ignore_errors=True)  # after the renames: a kill before keeps them
    res.written = state["written"]
    res.bytes = state["bytes"]
    res.converted = state["converted"]
    res.seconds = time.perf_counter() - t0
    return res
