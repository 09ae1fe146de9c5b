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
commit lists, sweeps again from the cursor and ends with the records of a clean run (the
split, its .partial and state made ready first: ``prepare``). The .partial's fingerprint
covers the sources' identity (a folder's files and read order; the archives' paths, sizes and
modification times) and the options. One conversion at a time per output folder: the folder's lock (``format.convlock``), and each shard folder's, is held
throughout, and each .partial is checked to be the file this conversion opened before it is
renamed, so no conversion reports success over a file it did not write.

Memory (``Options.memory``, default 2 GB): pass 1 holds one run buffer (per split fed by the
sweep, sharing the budget) and pass 2 the runs' read buffers, each ``memory -
fixed_bytes(workers)``; fixed: one uncommitted transaction (``COMMIT_BYTES``), the reader's
queue (32 MiB) and the chunks in flight to the workers (``workers * 8`` chunks of <= 1 MiB);
a folder's scan (``PER_IMAGE_BYTES``) grows with it, an archive has no per-image list; the
merge holds the labels and offsets index of the shard being written (``PER_RECORD_BYTES`` each).
Temporary space: about the split's source bytes, in ``Options.tmp`` (default: the output
folder), checked against free space before the run (with each output folder's share of the
shards) and deleted at the end.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Callable, List, Optional, Tuple

import lmdb

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf
from imagenet_seq.convert.passes import (DEFAULT_MEMORY, MAX_RUNS,  # noqa: F401
                                         ConversionError, merge_pass)
from imagenet_seq.convert.pass1 import Split, read_pass
from imagenet_seq.convert import shards as sh
from imagenet_seq.convert.options import Options, Result
from imagenet_seq.convert.prepare import prepare, prepare_siblings
from imagenet_seq.convert.shard_sink import ShardSink, finish_split, skips
from imagenet_seq.convert.settle import decider, settle_skips
from imagenet_seq.format.convlock import Busy, ConversionLock
from imagenet_seq.format.lmdbdir import in_place_of_output
from imagenet_seq.convert.scan import Scan, ScanError
from imagenet_seq.convert.write_order import sort_key, write_order

__all__ = ["Options", "Result", "plan_order", "convert_split"]


def plan_order(scan: Scan, split: str, seed: int) -> List[Tuple[str, int]]:
    """Write order (``write_order``): train = sorted by a seeded hash of each relative path,
    val = sorted paths."""
    return write_order(scan.entries, split, seed)


def _committed_skips(env):
    """The skip records of an open environment, in the order they were met."""
    with env.begin() as txn:
        return [d for _, d in skips(txn)]


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


def _folder_keys(scan: Scan, split: str, seed: int):
    """A folder's sort keys: its place in ``plan_order`` (the same order ``sort_key`` gives;
    a plan that is a list can be replaced whole, as tests of older files do) + the path."""
    place = {rel: i for i, (rel, _) in enumerate(plan_order(scan, split, seed))}

    def key_of(part, rel):
        return place[rel].to_bytes(8, "big") + rel.encode("utf-8", "surrogateescape")
    return key_of


def _unfinished(layout: sh.Layout, run_dir: str) -> List[str]:
    p = layout.partial(0)
    return [p, p + "-lock", run_dir]


def _convert(src_root, out_dir, split, scan, opts, overwrite, resume, progress,
             start_progress, notice) -> Result:
    shared = getattr(getattr(scan, "sweep", None), "shared", None)
    if shared is not None and split in shared.swept:  # pass 1 done by a sibling's sweep
        overwrite, resume = False, True
    o = prepare(src_root, out_dir, split, scan, opts, overwrite, resume, notice)
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
                joint = prepare_siblings(o, src_root, out_dir, opts, overwrite, resume, notice)
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
